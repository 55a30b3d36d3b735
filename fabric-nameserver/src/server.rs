//! The running server: the iSNSP TCP listener with one thread per client connection, the
//! [`Service`] that executes requests against the registry and makes their effects durable
//! before answering, the housekeeping thread (registration-period expiry, snapshots) and the
//! ESI monitor thread (see [`crate::esi`]).

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use thiserror::Error;

use crate::admission::Admission;
use crate::command::{parse_command, CommandError};
use crate::registry::{Executed, Outcome, Peer, Policy, Record, Registry, RegistryError};
use crate::scn::ScnSender;
use crate::store::{snapshot_state, Store, StoreError};
use crate::wire::{
    parse_request, split_pdus, Header, Message, Reassembler, Status, TlvWriter, FLAG_SERVER,
    HEADER_LEN, MAX_REPLY_PAYLOAD_BYTES, RESPONSE_BIT,
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

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Counters reported by `stats`.
#[derive(Debug, Default)]
pub struct Stats {
    pub connections: AtomicU64,
    pub connections_refused: AtomicU64,
    /// Connections closed because a PDU, a message or a reply missed its deadline.
    pub connections_timed_out: AtomicU64,
    pub messages: AtomicU64,
    pub registrations: AtomicU64,
    pub queries: AtomicU64,
    pub deregistrations: AtomicU64,
    pub dd_changes: AtomicU64,
    pub scn_registrations: AtomicU64,
    pub errors: AtomicU64,
    pub format_errors: AtomicU64,
    pub expired_entities: AtomicU64,
    pub reply_pdus: AtomicU64,
    pub esi_sent: AtomicU64,
    pub esi_failed: AtomicU64,
    pub esi_removed_portals: AtomicU64,
    /// Requests refused with Source Unauthorized.
    pub unauthorized: AtomicU64,
}

/// A stats report (JSON for `stratactl ns stats`).
#[derive(Debug, Serialize)]
pub struct StatsReport {
    pub entities: usize,
    pub nodes: usize,
    pub portals: usize,
    pub dds: usize,
    pub ddsets: usize,
    pub default_dd: bool,
    pub connections: u64,
    pub connections_refused: u64,
    pub connections_timed_out: u64,
    pub messages: u64,
    pub registrations: u64,
    pub queries: u64,
    pub deregistrations: u64,
    pub dd_changes: u64,
    pub scn_registrations: u64,
    pub errors: u64,
    pub format_errors: u64,
    pub expired_entities: u64,
    pub reply_pdus: u64,
    pub esi_monitored_portals: usize,
    pub esi_sent: u64,
    pub esi_failed: u64,
    pub esi_removed_portals: u64,
    pub unauthorized: u64,
    pub scns_sent: u64,
    pub scns_failed: u64,
    pub scns_retried: u64,
    pub wal_commits: u64,
    pub wal_records: u64,
    pub wal_bytes: u64,
    /// Mean and longest time of one group commit (write + fdatasync), microseconds.
    pub wal_commit_avg_us: u64,
    pub wal_commit_max_us: u64,
    pub snapshots: u64,
}

/// Most reply bytes held by all connections at once (replies being encoded plus their PDU
/// copies, until written): 128 MiB, four replies of the largest size each with its copy. A
/// query that would exceed it is answered Busy (12); clients retry.
pub const MAX_REPLY_BYTES_IN_FLIGHT: usize = 128 * 1024 * 1024;
/// Granularity of reply reservations (a reply grows by many small TLVs).
pub const REPLY_RESERVE_STEP: usize = 1024 * 1024;

/// A reply's share of [`MAX_REPLY_BYTES_IN_FLIGHT`], returned when dropped.
#[derive(Debug)]
struct ReplyReservation<'a> {
    counter: &'a AtomicUsize,
    bytes: usize,
}

impl Drop for ReplyReservation<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// Executes requests: registry + durability + notifications.
#[derive(Debug)]
pub struct Service {
    registry: Mutex<Registry>,
    store: Arc<Store>,
    scn: ScnSender,
    pub stats: Stats,
    /// Reply bytes in flight, and their limit (see [`MAX_REPLY_BYTES_IN_FLIGHT`]).
    reply_bytes: AtomicUsize,
    reply_budget: usize,
}

impl Service {
    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        // Registry operations validate before they mutate; a panic mid-operation (a bug)
        // leaves at worst one half-applied change, better served than a dead server.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a registry operation, logs its mutations, waits until they (and everything
    /// before them) are durable, then queues its notifications.
    pub fn run(
        &self,
        op: impl FnOnce(&mut Registry) -> Result<Outcome, RegistryError>,
    ) -> Result<Outcome, RunError> {
        match self.run_planned(|reg| op(reg).map(Executed::Done))? {
            Executed::Done(out) => Ok(out),
            // `op` returns only finished outcomes.
            Executed::Query(_) => Err(RunError::Registry(RegistryError::Busy)),
        }
    }

    /// Like [`Service::run`], for operations that may return a query plan: the lock is
    /// released before the plan is encoded.
    fn run_planned(
        &self,
        op: impl FnOnce(&mut Registry) -> Result<Executed, RegistryError>,
    ) -> Result<Executed, RunError> {
        let (ex, seq) = {
            let mut reg = self.registry();
            let ex = op(&mut reg)?;
            let mut seq = self.store.last_seq();
            if let Executed::Done(out) = &ex {
                for r in &out.mutations {
                    let json =
                        serde_json::to_vec(r).map_err(|e| RunError::Encode(e.to_string()))?;
                    seq = self.store.append(&json)?;
                }
            }
            (ex, seq)
        };
        // Queries wait too: they must not expose state that is not yet durable.
        self.store.wait_durable(seq)?;
        if let Executed::Done(out) = &ex {
            for n in &out.notifications {
                self.scn.send(n.clone());
            }
        }
        Ok(ex)
    }

    /// Reserves reply memory (`bytes` more) against the in-flight budget.
    fn reserve(&self, r: &mut ReplyReservation<'_>, bytes: usize, force: bool) -> bool {
        let before = self.reply_bytes.fetch_add(bytes, Ordering::SeqCst);
        if !force && before + bytes > self.reply_budget {
            self.reply_bytes.fetch_sub(bytes, Ordering::SeqCst);
            return false;
        }
        r.bytes += bytes;
        true
    }

    /// Handles one client message from an unknown address (see [`Peer::unknown`]).
    pub fn handle(&self, m: &Message) -> Option<Vec<u8>> {
        self.handle_from(m, &Peer::unknown())
    }

    /// Handles one client message received from `peer`; returns the reply PDUs (None for
    /// messages that take no reply, such as responses from the client).
    pub fn handle_from(&self, m: &Message, peer: &Peer) -> Option<Vec<u8>> {
        self.handle_reserved(m, peer)
            .map(|(pdus, _reservation)| pdus)
    }

    /// [`Service::handle_from`], with the reply's share of the in-flight budget, to keep
    /// until the reply is written.
    fn handle_reserved(&self, m: &Message, peer: &Peer) -> Option<(Vec<u8>, ReplyReservation<'_>)> {
        if m.function & RESPONSE_BIT != 0 {
            return None;
        }
        self.stats.messages.fetch_add(1, Ordering::Relaxed);
        let resp_fn = m.function | RESPONSE_BIT;
        let mut res = ReplyReservation {
            counter: &self.reply_bytes,
            bytes: 0,
        };
        let reply = match self.execute(m, peer, &mut res) {
            Ok(w) => w,
            Err(status) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                TlvWriter::response(status)
            }
        };
        let pdus = split_pdus(resp_fn, FLAG_SERVER, m.xid, &reply, MAX_REPLY_PAYLOAD_BYTES);
        self.stats.reply_pdus.fetch_add(
            reply.buf.len().div_ceil(MAX_REPLY_PAYLOAD_BYTES).max(1) as u64,
            Ordering::Relaxed,
        );
        Some((pdus, res))
    }

    fn execute(
        &self,
        m: &Message,
        peer: &Peer,
        res: &mut ReplyReservation<'_>,
    ) -> Result<TlvWriter, Status> {
        let req = parse_request(m).map_err(|e| {
            self.stats.format_errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %e, "malformed message");
            e.status()
        })?;
        let parsed = parse_command(&req).map_err(|e| {
            if matches!(e, CommandError::Wire(_)) {
                self.stats.format_errors.fetch_add(1, Ordering::Relaxed);
            }
            tracing::debug!(function = m.function, error = %e, "request refused");
            e.status()
        })?;
        let counter = match req.function {
            crate::wire::func::DEV_ATTR_REG => &self.stats.registrations,
            crate::wire::func::DEV_ATTR_QRY | crate::wire::func::DEV_GET_NEXT => {
                &self.stats.queries
            }
            crate::wire::func::DEV_DEREG => &self.stats.deregistrations,
            crate::wire::func::SCN_REG | crate::wire::func::SCN_DEREG => {
                &self.stats.scn_registrations
            }
            _ => &self.stats.dd_changes,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let now = unix_now();
        let encoded = match self.run_planned(|reg| reg.execute_planned(&parsed, peer, now)) {
            // A finished reply (at most one entity, or DDs) is counted, never refused: its
            // effects are already made.
            Ok(Executed::Done(out)) => {
                self.reserve(res, 2 * out.reply.buf.len(), true);
                Ok(out.reply)
            }
            // Encoded outside the registry lock, in steps of REPLY_RESERVE_STEP, each
            // reserving room for the reply and its PDU copy.
            Ok(Executed::Query(plan)) => plan
                .encode(&mut |len| {
                    while 2 * len > res.bytes {
                        if !self.reserve(res, REPLY_RESERVE_STEP, false) {
                            return Err(RegistryError::Busy);
                        }
                    }
                    Ok(())
                })
                .map_err(RunError::Registry),
            Err(e) => Err(e),
        };
        match encoded {
            Ok(w) => Ok(w),
            Err(RunError::Registry(e)) => {
                if matches!(e, RegistryError::Unauthorized(..)) {
                    self.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(source = %parsed.source, peer = ?peer.addr, error = %e,
                        "request refused");
                }
                tracing::debug!(source = %parsed.source, error = %e, "request failed");
                Err(e.status())
            }
            Err(e) => {
                tracing::error!(error = %e, "request not made durable");
                Err(Status::Internal)
            }
        }
    }

    pub fn report(&self) -> StatsReport {
        let (entities, nodes, portals, dds, ddsets) = self.registry().counts();
        let default_dd = self.registry().policy().default_dd;
        let esi_monitored_portals = self.registry().esi_portal_count();
        let st = self.store.stats();
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsReport {
            entities,
            nodes,
            portals,
            dds,
            ddsets,
            default_dd,
            connections: g(&self.stats.connections),
            connections_refused: g(&self.stats.connections_refused),
            connections_timed_out: g(&self.stats.connections_timed_out),
            messages: g(&self.stats.messages),
            registrations: g(&self.stats.registrations),
            queries: g(&self.stats.queries),
            deregistrations: g(&self.stats.deregistrations),
            dd_changes: g(&self.stats.dd_changes),
            scn_registrations: g(&self.stats.scn_registrations),
            errors: g(&self.stats.errors),
            format_errors: g(&self.stats.format_errors),
            expired_entities: g(&self.stats.expired_entities),
            reply_pdus: g(&self.stats.reply_pdus),
            esi_monitored_portals,
            esi_sent: g(&self.stats.esi_sent),
            esi_failed: g(&self.stats.esi_failed),
            esi_removed_portals: g(&self.stats.esi_removed_portals),
            unauthorized: g(&self.stats.unauthorized),
            scns_sent: g(&self.scn.stats.sent),
            scns_failed: g(&self.scn.stats.failed),
            scns_retried: g(&self.scn.stats.retried),
            wal_commits: st.commits,
            wal_records: st.records,
            wal_bytes: st.wal_bytes,
            wal_commit_avg_us: st.commit_nanos / st.commits.max(1) / 1000,
            wal_commit_max_us: st.max_commit_nanos / 1000,
            snapshots: st.snapshots,
        }
    }

    /// Writes a snapshot now (holding the registry lock, so that it matches the log).
    pub fn snapshot(&self) -> Result<(), RunError> {
        let reg = self.registry();
        let json = serde_json::to_vec(&*reg).map_err(|e| RunError::Encode(e.to_string()))?;
        self.store.snapshot(&json)?;
        Ok(())
    }

    /// One ESI round: probes the due portals (outside the registry lock), refreshes the
    /// entities that answered, deregisters the portals that stopped answering.
    fn esi_round(&self, m: &mut crate::esi::Monitor, cfg: &crate::esi::EsiConfig) {
        let targets = self.registry().esi_targets(cfg);
        if targets.is_empty() {
            let _ = m.round(&[], std::time::Instant::now(), unix_now());
            return;
        }
        let r = m.round(&targets, std::time::Instant::now(), unix_now());
        self.stats.esi_sent.fetch_add(r.sent, Ordering::Relaxed);
        self.stats.esi_failed.fetch_add(r.failed, Ordering::Relaxed);
        if !r.answered.is_empty() {
            let now = unix_now();
            let mut reg = self.registry();
            for eid in &r.answered {
                reg.touch_entity(eid, now);
            }
        }
        for (eid, ip, port) in &r.dead {
            // Counted before the SCNs go out, so that whoever hears of the removal sees it
            // counted.
            let drop = |reg: &mut Registry| {
                self.stats
                    .esi_removed_portals
                    .fetch_add(1, Ordering::Relaxed);
                Ok(reg.esi_drop_portal(eid, *ip, *port))
            };
            if let Err(e) = self.run(drop) {
                tracing::error!(error = %e, "ESI deregistration failed");
            }
        }
    }

    fn housekeeping(&self) {
        let now = unix_now();
        match self.run(|reg| Ok(reg.expire(now))) {
            Ok(out) => {
                let n = out
                    .mutations
                    .iter()
                    .filter(|r| matches!(r.mutation, crate::registry::Mutation::RemoveEntity(_)))
                    .count();
                self.stats
                    .expired_entities
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => tracing::error!(error = %e, "expiry failed"),
        }
        if self.store.wants_snapshot() {
            let t = std::time::Instant::now();
            match self.snapshot() {
                Ok(()) => tracing::info!(
                    elapsed_ms = t.elapsed().as_millis() as u64,
                    "snapshot written"
                ),
                Err(e) => tracing::error!(error = %e, "snapshot failed"),
            }
        }
    }
}

#[derive(Debug, Error)]
pub enum RunError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot encode record: {0}")]
    Encode(String),
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
    let control = crate::control::bind(&control_path)?;
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
    let service = Arc::new(Service {
        registry: Mutex::new(reg),
        store: store.clone(),
        scn: ScnSender::start(unix_now),
        stats: Stats::default(),
        reply_bytes: AtomicUsize::new(0),
        reply_budget: cfg.limits.reply_bytes_in_flight,
    });
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
