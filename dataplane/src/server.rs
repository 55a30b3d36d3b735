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
    socket_file: SocketFile,
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
    access: SocketAccess,
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

/// Permissions of the sockets stratad creates when none are configured: whoever can connect to
/// a disk socket owns that disk, and the control socket can remove disks, so only the daemon's
/// user (and root) by default.
pub const SOCKET_MODE_DEFAULT: u32 = 0o600;
/// Backlog of a listening socket (frontends connect one at a time).
const LISTEN_BACKLOG: i32 = 16;

/// Who may connect to the sockets stratad creates (`--socket-mode`, `--socket-group`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketAccess {
    /// Permission bits of the socket files (at most 0o777).
    pub mode: u32,
    /// Group of the socket files (e.g. QEMU's, when QEMU runs as another user).
    pub group: Option<u32>,
}

impl Default for SocketAccess {
    fn default() -> Self {
        SocketAccess {
            mode: SOCKET_MODE_DEFAULT,
            group: None,
        }
    }
}

impl SocketAccess {
    /// Whether a peer with these credentials may use a control socket: root, the daemon's own
    /// user, or (with a socket group) a process whose primary group is the socket group.
    /// SO_PEERCRED carries no supplementary groups.
    pub fn peer_may_control(&self, uid: u32, gid: u32) -> bool {
        // SAFETY: geteuid has no memory effects.
        let me = unsafe { libc::geteuid() };
        uid == 0 || uid == me || self.group.is_some_and(|g| g == gid)
    }
}

/// A socket file's identity, so that it is removed only while it is still ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketFile {
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// Removes `path` if it is still this socket file (never a file that replaced it).
    pub fn remove(&self, path: &Path) {
        use std::os::unix::fs::MetadataExt;
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if m.file_type().is_socket() && m.dev() == self.dev && m.ino() == self.ino {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// The peer's (uid, gid) of a connected Unix socket (SO_PEERCRED).
pub fn peer_credentials(stream: &UnixStream) -> std::io::Result<(u32, u32)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a local ucred.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((cred.uid, cred.gid))
}

/// Binds a listening Unix socket at `path` with `access`'s mode and group, replacing a stale
/// socket file but refusing one somebody listens on, and never removing anything that is not
/// a socket. The permissions are set between bind() and listen(): until listen() connections
/// are refused, so nobody connects through the umask's permissions in between.
pub fn bind_socket(
    path: &Path,
    access: &SocketAccess,
) -> Result<(UnixListener, SocketFile), ServerError> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let err = |source: std::io::Error| ServerError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if access.mode & !0o777 != 0 {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("socket mode {:o} has bits outside 0777", access.mode),
        )));
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ServerError::NotASocket(path.to_path_buf()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ServerError::SocketInUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    // SAFETY: sockaddr_un is plain data; zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "socket path empty, too long or containing NUL",
        )));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket() has no memory effects; a non-negative result is a new fd we own.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh socket nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: addr is a valid sockaddr_un of the given length.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    let meta = std::fs::symlink_metadata(path).map_err(err)?;
    let file = SocketFile {
        dev: meta.dev(),
        ino: meta.ino(),
    };
    let set_access = || -> std::io::Result<()> {
        if let Some(g) = access.group {
            std::os::unix::fs::lchown(path, None, Some(g))?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(access.mode))
    };
    if let Err(e) = set_access() {
        file.remove(path);
        return Err(err(e));
    }
    // SAFETY: listen on our socket has no memory effects.
    if unsafe { libc::listen(fd.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
        let e = std::io::Error::last_os_error();
        file.remove(path);
        return Err(err(e));
    }
    let l = UnixListener::from(fd);
    l.set_nonblocking(true).map_err(err)?;
    Ok((l, file))
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
            access: SocketAccess::default(),
        })
    }

    /// Mode and group of the sockets of disks and shares added from now on (default
    /// [`SocketAccess::default`]: 0600, the daemon's group).
    pub fn set_socket_access(&mut self, access: SocketAccess) {
        self.access = access;
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
        let (listener, socket_file) = bind_socket(&socket, &self.access)?;
        let i = self.disks.len();
        self.epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, listener_token(i)),
        )?;
        self.disks.push(Disk {
            name,
            socket,
            socket_file,
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
        self.serve(stop_fd)?;
        self.shutdown();
        Ok(())
    }

    /// Serves frontends until `stop_fd` becomes readable, and returns with everything still
    /// running: the caller stops what else it runs on the reactors (e.g. SAN sessions), then
    /// calls [`Server::shutdown`].
    pub fn serve(&mut self, stop_fd: RawFd) -> Result<(), ServerError> {
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
                // Only our socket: never a file somebody put there since.
                disk.socket_file.remove(&disk.socket);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::NullBackend;
    use std::os::unix::fs::PermissionsExt;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dp-server-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn server() -> Server {
        Server::new(&ServerConfig {
            cpus: vec![None],
            engine: EngineKind::Sync,
        })
        .unwrap()
    }

    fn disk(socket: PathBuf) -> DiskConfig {
        DiskConfig {
            name: "d".into(),
            socket,
            backend: Arc::new(NullBackend::new(1 << 20, true).unwrap()),
            num_queues: 1,
        }
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
    }

    /// Issue 12 finding 9: a disk socket is 0600 whatever the umask, or the configured mode
    /// and group.
    #[test]
    fn sockets_are_private_unless_configured() {
        let d = tmp("mode");
        // SAFETY: umask has no memory effects (the usual 022; the old code then made 0755).
        unsafe { libc::umask(0o022) };
        let mut s = server();
        s.add_disk(disk(d.join("a.sock"))).unwrap();
        assert_eq!(mode(&d.join("a.sock")), 0o600);
        s.set_socket_access(SocketAccess {
            mode: 0o660,
            group: Some(12345),
        });
        s.add_disk(disk(d.join("b.sock"))).unwrap();
        assert_eq!(mode(&d.join("b.sock")), 0o660);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(d.join("b.sock")).unwrap().gid(), 12345);
        s.set_socket_access(SocketAccess {
            mode: 0o1777,
            group: None,
        });
        assert!(s.add_disk(disk(d.join("c.sock"))).is_err());
        drop(s);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A non-socket at a socket path is never removed: not at bind, not at shutdown when it
    /// replaced our socket.
    #[test]
    fn never_removes_a_file_that_is_not_our_socket() {
        let d = tmp("replace");
        let p = d.join("x.sock");
        std::fs::write(&p, b"precious").unwrap();
        let mut s = server();
        assert!(matches!(
            s.add_disk(disk(p.clone())),
            Err(ServerError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&p).unwrap(), b"precious");
        std::fs::remove_file(&p).unwrap();
        s.add_disk(disk(p.clone())).unwrap();
        // Somebody replaces the socket with a file; shutdown must leave it.
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, b"precious").unwrap();
        s.shutdown();
        assert_eq!(std::fs::read(&p).unwrap(), b"precious");
        // Our own socket is removed at shutdown.
        let mut s = server();
        let q = d.join("y.sock");
        s.add_disk(disk(q.clone())).unwrap();
        s.shutdown();
        assert!(!q.exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn control_peers() {
        // SAFETY: geteuid has no memory effects.
        let me = unsafe { libc::geteuid() };
        let a = SocketAccess::default();
        assert!(a.peer_may_control(0, 0));
        assert!(a.peer_may_control(me, 1));
        assert!(me == 65534 || !a.peer_may_control(65534, 65534));
        let g = SocketAccess {
            mode: 0o660,
            group: Some(4242),
        };
        assert!(g.peer_may_control(65533, 4242));
        assert!(me == 65533 || !g.peer_may_control(65533, 4243));
        let (x, y) = UnixStream::pair().unwrap();
        assert_eq!(peer_credentials(&x).unwrap().0, me);
        drop(y);
    }
}
