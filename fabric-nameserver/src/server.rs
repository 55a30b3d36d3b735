//! The running server: starts the [`Service`] over the recovered data directory and runs its
//! threads — the iSNSP TCP listener with one thread per client connection, the control
//! socket ([`crate::control`]), the housekeeping thread (registration-period expiry,
//! snapshots) and the ESI monitor thread (see [`crate::esi`]).

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::admission::Admission;
use crate::registry::{Peer, Policy, Record, Registry};
use crate::store::{snapshot_state, Store, StoreError};
use crate::wire::{
    split_pdus, Header, Reassembler, TlvWriter, FLAG_SERVER, HEADER_LEN, MAX_REPLY_PAYLOAD_BYTES,
    RESPONSE_BIT,
};

pub use crate::service::{
    unix_now, RunError, Service, Stats, StatsReport, MAX_REPLY_BYTES_IN_FLIGHT, REPLY_RESERVE_STEP,
};

pub use crate::admission::{
    MAX_CONNECTIONS, MAX_CONNECTIONS_PER_HOST, MAX_CONNECTIONS_PER_NETWORK,
};

/// A connection idle this long between PDUs is closed (tgt keeps its connection and queries
/// every 30 s).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Absolute time allowed for a whole PDU (header and payload, at most 64 KiB) from its first
/// byte: a deadline, not a per-read timeout, so that a client trickling a byte at a time
/// cannot hold its connection (a thread and its buffers) forever.
pub const PDU_TIMEOUT: Duration = Duration::from_secs(10);
/// Absolute time allowed for a multi-PDU message from its first PDU to its last (clients
/// send a message in one go; this bounds how long one can pin up to 1 MiB of reassembly).
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Absolute time allowed to write one reply (at most `registry::MAX_REPLY_BYTES`: at
/// least ~280 KiB/s at the largest) to a client that reads slowly or not at all.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Housekeeping period: expiry checks and snapshot decisions.
pub const HOUSEKEEPING_PERIOD: Duration = Duration::from_secs(1);

#[derive(Debug, Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot load state: {0}")]
    Load(String),
    #[error("cannot start thread: {0}")]
    Thread(std::io::Error),
    #[error("control socket {path}: {source}")]
    Control {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// JSON-RPC control socket (default: `<data_dir>/control.sock`).
    pub control: Option<PathBuf>,
    /// Default-DD policy for a new data directory (a stored policy wins).
    pub default_dd: bool,
    /// Registration period for entities that do not ask for one (0: none).
    pub registration_period_secs: u32,
    /// Entity Status Inquiry timing.
    pub esi: crate::esi::EsiConfig,
    /// Connection limits and deadlines.
    pub limits: Limits,
    /// Control nodes (iSCSI names) the administrator authorizes, each optionally pinned to
    /// the peer address it must connect from. Only these may change discovery domains, act
    /// on other entities, register the control node type or management SCNs, and see
    /// everything. The control socket is always authorized.
    pub control_nodes: BTreeMap<String, Option<IpAddr>>,
}

impl Config {
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Config {
        Config {
            listen,
            data_dir,
            control: None,
            default_dd: true,
            registration_period_secs: 900,
            esi: crate::esi::EsiConfig::default(),
            control_nodes: BTreeMap::new(),
            limits: Limits::default(),
        }
    }

    pub fn control_path(&self) -> PathBuf {
        self.control
            .clone()
            .unwrap_or_else(|| self.data_dir.join("control.sock"))
    }
}

/// How many connections the server holds and how long it waits for them (the constants
/// above by default; tests shrink them to reach them quickly).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub conns: crate::admission::ConnLimits,
    pub idle_timeout: Duration,
    pub pdu_timeout: Duration,
    pub message_timeout: Duration,
    pub write_timeout: Duration,
    /// Reply bytes all connections may hold at once ([`MAX_REPLY_BYTES_IN_FLIGHT`]).
    pub reply_bytes_in_flight: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            conns: crate::admission::ConnLimits::default(),
            idle_timeout: IDLE_TIMEOUT,
            pdu_timeout: PDU_TIMEOUT,
            message_timeout: MESSAGE_TIMEOUT,
            write_timeout: WRITE_TIMEOUT,
            reply_bytes_in_flight: MAX_REPLY_BYTES_IN_FLIGHT,
        }
    }
}

/// Loads the registry from a recovered store image.
fn load(rec: crate::store::Recovered, cfg: &Config) -> Result<Registry, ServerError> {
    let mut reg = match rec.snapshot {
        Some((_, bytes)) => {
            let mut r: Registry = snapshot_state(&bytes).map_err(ServerError::Load)?;
            r.rebuild_indexes();
            r
        }
        None => Registry::new(
            Policy {
                default_dd: cfg.default_dd,
            },
            cfg.registration_period_secs,
        ),
    };
    reg.set_default_period(cfg.registration_period_secs);
    reg.set_control_nodes(cfg.control_nodes.clone());
    for (i, bytes) in rec.records.iter().enumerate() {
        let r: Record = serde_json::from_slice(bytes)
            .map_err(|e| ServerError::Load(format!("log record {i}: {e}")))?;
        reg.apply(&r);
    }
    reg.refresh_all(unix_now());
    Ok(reg)
}

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    pub local_addr: SocketAddr,
    pub control_path: PathBuf,
    pub service: Arc<Service>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    store: Arc<Store>,
    /// Handles on the listening sockets, to wake their accept loops at shutdown.
    listen_wake: TcpListener,
    control_wake: std::os::unix::net::UnixListener,
    /// Inode of our control socket, so that shutdown never removes another server's.
    control_ino: Option<u64>,
}

/// Makes a blocked `accept` on this socket return (Linux: shutdown of a listening socket
/// wakes its waiters with EINVAL).
fn wake_listener(fd: std::os::fd::RawFd) {
    // SAFETY: `fd` belongs to a listener owned by the caller and open for the whole call;
    // shutdown does not close it or touch memory.
    unsafe {
        libc::shutdown(fd, libc::SHUT_RDWR);
    }
}

impl ServerHandle {
    /// Stops accepting, finishes pending log writes, and joins the server's threads.
    pub fn shutdown(mut self) {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        self.stop.store(true, Ordering::SeqCst);
        wake_listener(self.listen_wake.as_raw_fd());
        wake_listener(self.control_wake.as_raw_fd());
        self.store.shutdown();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let ours =
            std::fs::metadata(&self.control_path).is_ok_and(|m| Some(m.ino()) == self.control_ino);
        if ours {
            let _ = std::fs::remove_file(&self.control_path);
        }
    }
}

/// Starts a server: recovers the data directory, then listens.
pub fn start(cfg: Config) -> Result<ServerHandle, ServerError> {
    let (store, rec) = Store::open(&cfg.data_dir)?;
    let recovered = rec.records.len();
    let reg = load(rec, &cfg)?;
    let (e, n, p, d, s) = reg.counts();
    tracing::info!(
        entities = e,
        nodes = n,
        portals = p,
        dds = d,
        ddsets = s,
        replayed_records = recovered,
        "state recovered"
    );
    let store = Arc::new(store);
    let listener = TcpListener::bind(cfg.listen).map_err(|source| ServerError::Listen {
        addr: cfg.listen,
        source,
    })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| ServerError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let control_path = cfg.control_path();
    let control = crate::control::bind(&control_path).map_err(|source| ServerError::Control {
        path: control_path.clone(),
        source,
    })?;
    let control_ino = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&control_path).ok().map(|m| m.ino())
    };
    let wake_err = |source| ServerError::Control {
        path: control_path.clone(),
        source,
    };
    let listen_wake = listener.try_clone().map_err(wake_err)?;
    let control_wake = control.try_clone().map_err(wake_err)?;
    let service = Arc::new(Service::new(
        reg,
        store.clone(),
        cfg.limits.reply_bytes_in_flight,
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(f)
            .map_err(ServerError::Thread)
    };
    {
        let st = store.clone();
        threads.push(spawn("wal-commit", Box::new(move || st.run_committer()))?);
    }
    {
        let (svc, stop) = (service.clone(), stop.clone());
        threads.push(spawn(
            "housekeeping",
            Box::new(move || {
                // Short naps so that shutdown does not wait a whole period.
                let nap = Duration::from_millis(50);
                let mut slept = Duration::ZERO;
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(nap);
                    slept += nap;
                    if slept >= HOUSEKEEPING_PERIOD {
                        slept = Duration::ZERO;
                        svc.housekeeping();
                    }
                }
            }),
        )?);
    }
    {
        let (svc, stop, esi) = (service.clone(), stop.clone(), cfg.esi);
        threads.push(spawn(
            "esi",
            Box::new(move || {
                let mut m = crate::esi::Monitor::new(esi);
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(m.tick());
                    svc.esi_round(&mut m, &esi);
                }
            }),
        )?);
    }
    {
        let (svc, stop, limits) = (service.clone(), stop.clone(), cfg.limits);
        threads.push(spawn(
            "isns-accept",
            Box::new(move || accept_loop(&listener, &svc, &stop, limits)),
        )?);
    }
    {
        let (svc, stop) = (service.clone(), stop.clone());
        threads.push(spawn(
            "control",
            Box::new(move || crate::control::serve(&control, &svc, &stop)),
        )?);
    }
    tracing::info!(%local_addr, control = %control_path.display(), "iSNS server listening");
    Ok(ServerHandle {
        local_addr,
        control_path,
        service,
        stop,
        threads,
        store,
        listen_wake,
        control_wake,
        control_ino,
    })
}

fn accept_loop(listener: &TcpListener, svc: &Arc<Service>, stop: &AtomicBool, limits: Limits) {
    let admission = Arc::new(Mutex::new(Admission::new(limits.conns)));
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(_) if stop.load(Ordering::SeqCst) => return,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                // EMFILE and friends: back off instead of spinning.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let Ok(peer) = stream.peer_addr() else {
            continue;
        };
        let admitted = admission
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(peer.ip());
        if let Err(why) = admitted {
            svc.stats
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, ?why, "connection refused: limit reached");
            let _ = stream.shutdown(Shutdown::Both);
            continue;
        }
        svc.stats.connections.fetch_add(1, Ordering::Relaxed);
        let (svc, adm) = (svc.clone(), admission.clone());
        let spawned = std::thread::Builder::new()
            .name("isns-conn".into())
            .spawn(move || {
                if let Err(e) = serve_connection(stream, &svc, &limits) {
                    if e.kind() == ErrorKind::TimedOut || e.kind() == ErrorKind::WouldBlock {
                        svc.stats
                            .connections_timed_out
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::debug!(%peer, error = %e, "connection closed");
                }
                adm.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .release(peer.ip());
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start connection thread");
            admission
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .release(peer.ip());
        }
    }
}

/// Reads exactly `buf.len()` bytes before `deadline` (an absolute bound however the bytes
/// trickle in). Pre-deadline end of stream is `UnexpectedEof`; the deadline is `TimedOut`.
fn read_before(s: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> std::io::Result<()> {
    let mut off = 0;
    while off < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf[off..]) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => off += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes all of `buf` before `deadline`.
fn write_before(s: &mut TcpStream, buf: &[u8], deadline: Instant) -> std::io::Result<()> {
    let mut off = 0;
    while off < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        s.set_write_timeout(Some(left))?;
        match s.write(&buf[off..]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => off += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Waits up to `wait` for the first byte of the next PDU; `Ok(None)` on a clean end of
/// stream.
fn first_byte(s: &mut TcpStream, wait: Duration) -> std::io::Result<Option<u8>> {
    let mut b = [0u8; 1];
    loop {
        if wait.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        s.set_read_timeout(Some(wait))?;
        match s.read(&mut b) {
            Ok(0) => return Ok(None),
            Ok(_) => return Ok(Some(b[0])),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn serve_connection(mut s: TcpStream, svc: &Service, limits: &Limits) -> std::io::Result<()> {
    let peer = Peer::new(s.peer_addr()?.ip());
    s.set_nodelay(true)?;
    let mut r = Reassembler::new();
    let mut payload = Vec::new();
    // Deadline of the message being reassembled, if one is.
    let mut message_deadline: Option<Instant> = None;
    loop {
        // Between PDUs: the idle timeout, or what is left of the message's time.
        let wait = match message_deadline {
            Some(d) => d
                .saturating_duration_since(Instant::now())
                .min(limits.idle_timeout),
            None => limits.idle_timeout,
        };
        let Some(b0) = first_byte(&mut s, wait)? else {
            return Ok(());
        };
        let started = Instant::now();
        let mut deadline = started + limits.pdu_timeout;
        if let Some(d) = message_deadline {
            deadline = deadline.min(d);
        }
        let mut hb = [0u8; HEADER_LEN];
        hb[0] = b0;
        read_before(&mut s, &mut hb[1..], deadline)?;
        let h = Header::decode(&hb);
        payload.resize(usize::from(h.length), 0);
        read_before(&mut s, &mut payload, deadline)?;
        let pushed = r.push(&h, &payload);
        message_deadline = match (&pushed, message_deadline) {
            (Ok(None), None) => Some(started + limits.message_timeout),
            (Ok(None), d) => d,
            _ => None,
        };
        match pushed {
            Ok(None) => {}
            Ok(Some(m)) => {
                // The reservation is held until the reply is written.
                if let Some((reply, _reservation)) = svc.handle_reserved(&m, &peer) {
                    write_before(&mut s, &reply, Instant::now() + limits.write_timeout)?;
                }
            }
            Err(e) => {
                svc.stats.format_errors.fetch_add(1, Ordering::Relaxed);
                svc.stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "bad PDU");
                let w = TlvWriter::response(e.status());
                let reply = split_pdus(
                    h.function | RESPONSE_BIT,
                    FLAG_SERVER,
                    h.xid,
                    &w,
                    MAX_REPLY_PAYLOAD_BYTES,
                );
                if h.function & RESPONSE_BIT == 0 {
                    write_before(&mut s, &reply, Instant::now() + limits.write_timeout)?;
                }
                // After a framing error the stream is out of step (`ends_connection`).
                if e.ends_connection() {
                    let _ = s.shutdown(Shutdown::Both);
                    return Ok(());
                }
            }
        }
    }
}
