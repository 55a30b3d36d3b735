//! The control thread: one epoll loop over every disk's listening socket and frontend
//! connection, feeding vhost-user messages to the devices, plus orderly shutdown.
//!
//! Thread count is fixed: this thread plus the reactor pool, whatever the number of disks.
//! A frontend that disconnects has its vrings drained and its state dropped; the socket keeps
//! listening, so a restarted or reconnecting QEMU is served again.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use thiserror::Error;
use vhost::vhost_user::{BackendReqHandler, Error as VhostError};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::backend::BlockBackend;
use crate::blk::{serial_from, DiskGeometry, NUM_QUEUES_MAX, SECTOR_SIZE};
use crate::engine::EngineKind;
use crate::reactor::{ReactorError, ReactorHandle};
use crate::stats::QueueStats;
use crate::stats::{QueueStatsSnapshot, ReactorStatsSnapshot};
use crate::vhost_blk::BlkDevice;
use crate::vhost_fs::{FsDevice, FsRequestHandler, REQUEST_QUEUES_MAX};

/// Disks one daemon serves; bounds the epoll token space and start-up work.
pub const DISKS_MAX: usize = 1024;
/// Reactor threads at most (one per CPU on the largest machines we expect).
pub const REACTORS_MAX: usize = 256;
/// How long the control thread waits for the rest of a vhost-user message once its first bytes
/// arrived. The control thread serves every disk, so a frontend that stalls mid-message must
/// not hold it longer than this; it is disconnected instead.
pub const MESSAGE_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// epoll events handled per control-loop wake-up.
const CONTROL_EVENTS_MAX: usize = 32;
/// epoll token of the stop fd; disk `i` uses `1 + 2i` (listener) and `2 + 2i` (connection).
const TOKEN_STOP: u64 = 0;

/// Errors of the control plane.
#[derive(Debug, Error)]
pub enum ServerError {
    /// Something else is listening on the socket path.
    #[error("socket {0} is in use by another process")]
    SocketInUse(PathBuf),
    /// The socket path exists and is not a socket.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// Binding or watching the socket failed.
    #[error("socket {path}: {source}")]
    Socket {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Bad disk parameters.
    #[error("disk {name}: {reason}")]
    InvalidDisk {
        /// Disk name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// Reactor start-up failed.
    #[error(transparent)]
    Reactor(#[from] ReactorError),
    /// epoll failed.
    #[error("control loop: {0}")]
    Io(#[from] std::io::Error),
}

/// Reactor pool configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// One entry per reactor: the CPU to pin it to, or `None` for no pinning.
    pub cpus: Vec<Option<usize>>,
    /// I/O engine each reactor builds.
    pub engine: EngineKind,
}

/// One exported disk.
#[derive(Debug)]
pub struct DiskConfig {
    /// Name (logs, stats, GET_ID serial).
    pub name: String,
    /// vhost-user socket path.
    pub socket: PathBuf,
    /// Storage.
    pub backend: Arc<dyn BlockBackend>,
    /// Request queues offered.
    pub num_queues: u16,
}

/// One exported shared folder (vhost-user-fs).
#[derive(Debug)]
pub struct ShareConfig {
    /// Name (logs, stats).
    pub name: String,
    /// vhost-user socket path.
    pub socket: PathBuf,
    /// Mount tag offered in the config space.
    pub tag: String,
    /// Request queues offered (besides the high-priority queue).
    pub request_queues: u16,
    /// Serves the FUSE requests.
    pub handler: Arc<dyn FsRequestHandler>,
}

/// A device of either type; the control loop treats both alike.
#[derive(Clone)]
enum Device {
    Blk(Arc<Mutex<BlkDevice>>),
    Fs(Arc<Mutex<FsDevice>>),
}

enum Conn {
    Blk(BackendReqHandler<Mutex<BlkDevice>>),
    Fs(BackendReqHandler<Mutex<FsDevice>>),
}

impl Conn {
    fn handle_request(&mut self) -> Result<(), VhostError> {
        match self {
            Conn::Blk(c) => c.handle_request(),
            Conn::Fs(c) => c.handle_request(),
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Conn::Blk(c) => c.as_raw_fd(),
            Conn::Fs(c) => c.as_raw_fd(),
        }
    }
}

impl Device {
    fn connect(&self, stream: UnixStream) -> Conn {
        match self {
            Device::Blk(d) => Conn::Blk(BackendReqHandler::from_stream(stream, d.clone())),
            Device::Fs(d) => Conn::Fs(BackendReqHandler::from_stream(stream, d.clone())),
        }
    }

    fn disconnect(&self) -> bool {
        match self {
            Device::Blk(d) => d.lock().map(|mut d| d.disconnect()).is_ok(),
            Device::Fs(d) => d.lock().map(|mut d| d.disconnect()).is_ok(),
        }
    }

    fn queue_stats(&self) -> Vec<Arc<QueueStats>> {
        match self {
            Device::Blk(d) => d.lock().map(|d| d.queue_stats()).unwrap_or_default(),
            Device::Fs(d) => d.lock().map(|d| d.queue_stats()).unwrap_or_default(),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Device::Blk(_) => "blk",
            Device::Fs(_) => "fs",
        }
    }
}

struct Disk {
    name: String,
    socket: PathBuf,
    listener: Option<UnixListener>,
    device: Device,
    conn: Option<Conn>,
    connections: u64,
}

/// Counters of one disk.
#[derive(Debug, Clone)]
pub struct DiskStats {
    /// Disk name.
    pub name: String,
    /// Device type: "blk" (disk) or "fs" (shared folder).
    pub kind: &'static str,
    /// Socket path.
    pub socket: PathBuf,
    /// Whether a frontend is connected.
    pub connected: bool,
    /// Frontend connections accepted so far.
    pub connections: u64,
    /// Per-queue counters.
    pub queues: Vec<QueueStatsSnapshot>,
}

/// Counters of the whole daemon.
#[derive(Debug, Clone)]
pub struct ServerStats {
    /// Per reactor: pinned CPU and counters.
    pub reactors: Vec<(Option<usize>, ReactorStatsSnapshot)>,
    /// Per disk.
    pub disks: Vec<DiskStats>,
}

/// A handle that reads the counters from another thread while the server runs.
#[derive(Clone)]
pub struct StatsHandle {
    reactors: Vec<(Option<usize>, Arc<crate::stats::ReactorStats>)>,
    disks: Vec<(String, PathBuf, Device)>,
}

impl std::fmt::Debug for StatsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatsHandle").finish()
    }
}

impl StatsHandle {
    /// Current counters (connection state is not tracked here).
    pub fn stats(&self) -> ServerStats {
        ServerStats {
            reactors: self
                .reactors
                .iter()
                .map(|(cpu, r)| (*cpu, r.snapshot()))
                .collect(),
            disks: self
                .disks
                .iter()
                .map(|(name, socket, dev)| DiskStats {
                    name: name.clone(),
                    kind: dev.kind(),
                    socket: socket.clone(),
                    connected: false,
                    connections: 0,
                    queues: dev.queue_stats().iter().map(|q| q.snapshot()).collect(),
                })
                .collect(),
        }
    }
}

/// The daemon's control plane and reactor pool.
pub struct Server {
    reactors: Vec<ReactorHandle>,
    disks: Vec<Disk>,
    epoll: Epoll,
    next_reactor: usize,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("reactors", &self.reactors.len())
            .field("disks", &self.disks.len())
            .finish()
    }
}

fn listener_token(i: usize) -> u64 {
    1 + 2 * i as u64
}

fn conn_token(i: usize) -> u64 {
    2 + 2 * i as u64
}

/// Errors after which the connection cannot continue (transport broken or desynchronised).
fn is_fatal(e: &VhostError) -> bool {
    matches!(
        e,
        VhostError::Disconnected
            | VhostError::PartialMessage
            | VhostError::SocketBroken(_)
            | VhostError::SocketError(_)
            | VhostError::InvalidMessage
            | VhostError::OversizedMsg
            | VhostError::IncorrectFds
            // The socket is blocking with a read time-out: a retry means the time-out expired.
            | VhostError::SocketRetry(_)
    )
}

/// Binds `path`, replacing a stale socket file but refusing one somebody listens on.
fn bind_socket(path: &Path) -> Result<UnixListener, ServerError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ServerError::NotASocket(path.to_path_buf()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ServerError::SocketInUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(|source| ServerError::Socket {
            path: path.to_path_buf(),
            source,
        })?;
    }
    let l = UnixListener::bind(path).map_err(|source| ServerError::Socket {
        path: path.to_path_buf(),
        source,
    })?;
    l.set_nonblocking(true)
        .map_err(|source| ServerError::Socket {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(l)
}

impl Server {
    /// Starts the reactor pool.
    pub fn new(cfg: &ServerConfig) -> Result<Self, ServerError> {
        if cfg.cpus.is_empty() || cfg.cpus.len() > REACTORS_MAX {
            return Err(ServerError::InvalidDisk {
                name: "-".into(),
                reason: format!("between 1 and {REACTORS_MAX} reactors required"),
            });
        }
        let mut reactors = Vec::with_capacity(cfg.cpus.len());
        for (id, cpu) in cfg.cpus.iter().enumerate() {
            reactors.push(ReactorHandle::spawn(id, *cpu, cfg.engine)?);
        }
        Ok(Server {
            reactors,
            disks: Vec::new(),
            epoll: Epoll::new()?,
            next_reactor: 0,
        })
    }

    /// Adds a disk and starts listening on its socket. Queue `q` of the disk is served by
    /// reactor `(first + q) % reactors`, `first` advancing per disk so load spreads evenly.
    pub fn add_disk(&mut self, cfg: DiskConfig) -> Result<(), ServerError> {
        let invalid = |reason: String| ServerError::InvalidDisk {
            name: cfg.name.clone(),
            reason,
        };
        if self.disks.len() >= DISKS_MAX {
            return Err(invalid(format!("at most {DISKS_MAX} disks")));
        }
        if cfg.num_queues == 0 || cfg.num_queues > NUM_QUEUES_MAX {
            return Err(invalid(format!("queues must be 1..={NUM_QUEUES_MAX}")));
        }
        if self.disks.iter().any(|d| d.socket == cfg.socket) {
            return Err(ServerError::SocketInUse(cfg.socket.clone()));
        }
        let b = &cfg.backend;
        let geom = DiskGeometry {
            capacity_sectors: b.size_bytes() / SECTOR_SIZE,
            blk_size: b.block_size(),
            read_only: b.read_only(),
            discard: b.supports_discard(),
            num_queues: cfg.num_queues,
            serial: serial_from(&cfg.name),
        };
        let n = self.reactors.len();
        let links = (0..usize::from(cfg.num_queues).min(n))
            .map(|q| self.reactors[(self.next_reactor + q) % n].link())
            .collect();
        self.next_reactor = (self.next_reactor + 1) % n;
        let device =
            BlkDevice::new_blk(&cfg.name, geom, cfg.backend.clone(), links).map_err(|e| {
                ServerError::InvalidDisk {
                    name: cfg.name.clone(),
                    reason: e.to_string(),
                }
            })?;
        tracing::info!(
            disk = %cfg.name,
            socket = %cfg.socket.display(),
            backend = %cfg.backend.describe(),
            queues = cfg.num_queues,
            "disk exported"
        );
        self.listen(
            cfg.name,
            cfg.socket,
            Device::Blk(Arc::new(Mutex::new(device))),
        )
    }

    /// Adds a shared folder (vhost-user-fs) and starts listening on its socket; its queues
    /// are spread over the reactors like a disk's.
    pub fn add_share(&mut self, cfg: ShareConfig) -> Result<(), ServerError> {
        let invalid = |reason: String| ServerError::InvalidDisk {
            name: cfg.name.clone(),
            reason,
        };
        if self.disks.len() >= DISKS_MAX {
            return Err(invalid(format!("at most {DISKS_MAX} devices")));
        }
        if cfg.request_queues == 0 || cfg.request_queues > REQUEST_QUEUES_MAX {
            return Err(invalid(format!(
                "request queues must be 1..={REQUEST_QUEUES_MAX}"
            )));
        }
        if self.disks.iter().any(|d| d.socket == cfg.socket) {
            return Err(ServerError::SocketInUse(cfg.socket.clone()));
        }
        let n = self.reactors.len();
        let links = (0..usize::from(cfg.request_queues + 1).min(n))
            .map(|q| self.reactors[(self.next_reactor + q) % n].link())
            .collect();
        self.next_reactor = (self.next_reactor + 1) % n;
        let device = FsDevice::new_fs(
            &cfg.name,
            &cfg.tag,
            cfg.request_queues,
            cfg.handler.clone(),
            links,
        )
        .map_err(|e| invalid(e.to_string()))?;
        tracing::info!(
            share = %cfg.name,
            socket = %cfg.socket.display(),
            tag = %cfg.tag,
            queues = cfg.request_queues,
            "share exported"
        );
        self.listen(
            cfg.name,
            cfg.socket,
            Device::Fs(Arc::new(Mutex::new(device))),
        )
    }

    fn listen(&mut self, name: String, socket: PathBuf, device: Device) -> Result<(), ServerError> {
        let listener = bind_socket(&socket)?;
        let i = self.disks.len();
        self.epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, listener_token(i)),
        )?;
        self.disks.push(Disk {
            name,
            socket,
            listener: Some(listener),
            device,
            conn: None,
            connections: 0,
        });
        Ok(())
    }

    /// Serves frontends until `stop_fd` becomes readable (a signalfd or eventfd), then shuts
    /// down: stops accepting, drains in-flight requests, flushes every disk.
    pub fn run(&mut self, stop_fd: RawFd) -> Result<(), ServerError> {
        self.epoll.ctl(
            ControlOperation::Add,
            stop_fd,
            EpollEvent::new(EventSet::IN, TOKEN_STOP),
        )?;
        let mut events = [EpollEvent::default(); CONTROL_EVENTS_MAX];
        // The control loop ends only when the stop fd fires.
        'serve: loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            for ev in &events[..n] {
                let token = ev.data();
                if token == TOKEN_STOP {
                    break 'serve;
                }
                let i = ((token - 1) / 2) as usize;
                if token % 2 == 1 {
                    self.accept(i);
                } else {
                    self.serve_message(i);
                }
            }
        }
        self.shutdown();
        Ok(())
    }

    fn accept(&mut self, i: usize) {
        let Some(disk) = self.disks.get_mut(i) else {
            return;
        };
        let Some(listener) = disk.listener.as_ref() else {
            return;
        };
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) => {
                tracing::warn!(disk = %disk.name, err = %e, "accept failed");
                return;
            }
        };
        if disk.conn.is_some() {
            tracing::warn!(disk = %disk.name, "refusing a second frontend while one is connected");
            return;
        }
        if let Err(e) = stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_read_timeout(Some(MESSAGE_READ_TIMEOUT)))
        {
            tracing::warn!(disk = %disk.name, err = %e, "cannot configure connection");
            return;
        }
        let conn = disk.device.connect(stream);
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            conn.fd(),
            EpollEvent::new(EventSet::IN | EventSet::HANG_UP, conn_token(i)),
        ) {
            tracing::warn!(disk = %disk.name, err = %e, "cannot watch connection");
            return;
        }
        disk.connections += 1;
        tracing::info!(disk = %disk.name, connection = disk.connections, "frontend connected");
        disk.conn = Some(conn);
    }

    fn serve_message(&mut self, i: usize) {
        let Some(disk) = self.disks.get_mut(i) else {
            return;
        };
        let Some(conn) = disk.conn.as_mut() else {
            return;
        };
        match conn.handle_request() {
            Ok(()) => {}
            Err(e) if is_fatal(&e) => {
                if matches!(e, VhostError::Disconnected) {
                    tracing::info!(disk = %disk.name, "frontend disconnected");
                } else {
                    tracing::warn!(disk = %disk.name, err = %e, "dropping frontend connection");
                }
                self.disconnect(i);
            }
            Err(e) => tracing::warn!(disk = %disk.name, err = %e, "vhost-user request refused"),
        }
    }

    fn disconnect(&mut self, i: usize) {
        let disk = &mut self.disks[i];
        if let Some(conn) = disk.conn.take() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, conn.fd(), EpollEvent::default());
        }
        if !disk.device.disconnect() {
            tracing::error!(disk = %disk.name, "device state poisoned");
        }
    }

    /// Stops accepting, drains every disk's in-flight requests, flushes, removes the sockets
    /// and stops the reactors. Idempotent.
    pub fn shutdown(&mut self) {
        for disk in self.disks.iter_mut() {
            if let Some(l) = disk.listener.take() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    l.as_raw_fd(),
                    EpollEvent::default(),
                );
                let _ = std::fs::remove_file(&disk.socket);
            }
        }
        for i in 0..self.disks.len() {
            self.disconnect(i);
            let disk = &self.disks[i];
            if let Device::Blk(d) = &disk.device {
                if let Ok(d) = d.lock() {
                    if let Err(e) = d.backend().flush_sync() {
                        tracing::error!(disk = %disk.name, err = %e, "flush at shutdown failed");
                    }
                }
            }
        }
        for r in self.reactors.iter_mut() {
            r.shutdown();
        }
    }

    /// Links to every reactor (for handing them other work, e.g. packet queues).
    pub fn reactor_links(&self) -> Vec<crate::reactor::ReactorLink> {
        self.reactors.iter().map(|r| r.link()).collect()
    }

    /// A handle for reading counters from another thread (disks added later are not in it).
    pub fn stats_handle(&self) -> StatsHandle {
        StatsHandle {
            reactors: self
                .reactors
                .iter()
                .map(|r| (r.cpu, r.stats.clone()))
                .collect(),
            disks: self
                .disks
                .iter()
                .map(|d| (d.name.clone(), d.socket.clone(), d.device.clone()))
                .collect(),
        }
    }

    /// Current counters.
    pub fn stats(&self) -> ServerStats {
        ServerStats {
            reactors: self
                .reactors
                .iter()
                .map(|r| (r.cpu, r.stats.snapshot()))
                .collect(),
            disks: self
                .disks
                .iter()
                .map(|d| DiskStats {
                    name: d.name.clone(),
                    kind: d.device.kind(),
                    socket: d.socket.clone(),
                    connected: d.conn.is_some(),
                    connections: d.connections,
                    queues: d
                        .device
                        .queue_stats()
                        .iter()
                        .map(|q| q.snapshot())
                        .collect(),
                })
                .collect(),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}
