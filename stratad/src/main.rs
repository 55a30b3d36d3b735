//! `stratad`, the Strata storage daemon: exports virtual disks to VMs over vhost-user-blk,
//! and to other hosts as an iSCSI target.
//!
//! - `spec`: parsing of `--disk`, `--share`, `--port`, `--iscsi-target` (one key=value
//!   parser, serde structs that read JSON too) and the scalar options (pure, property-tested).
//! - `iscsi`: the disks exported by name, their SCSI units, the iSCSI targets and their
//!   control methods (the protocol is the `san` crate's).
//! - this file: command line, the datastore (`--datastore`), the embedded default (a data
//!   directory with a datastore file holding a thin disk),
//!   signal handling (SIGTERM/SIGINT through a signalfd: stop accepting, drain, flush, exit 0)
//!   and logging. The data path lives in the `dataplane` crate.

mod control;
mod iscsi;
mod metrics;
mod ports;
mod spec;

/// The packet counters end to end (ports, control socket, metrics endpoint).
#[cfg(all(test, feature = "packet"))]
mod port_counters_tests;

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use dataplane::backend::{BlockBackend, NullBackend, RawBackend};
use dataplane::engine::EngineKind;
use dataplane::server::{DiskConfig, Server, ServerConfig, ShareConfig, SocketAccess};
use vmfs::commit::CommitPolicy;
use vmfs::device::{BlockDevice, FileDevice};
use vmfs::format::Provisioning;
use vmfs::fs::{Datastore, FsError, MkfsOptions};
use vmfs_disk::VmfsBackend;

use crate::spec::{
    parse_cpus, parse_disk_spec, parse_iscsi_target_spec, parse_share_spec, parse_socket_group,
    parse_socket_mode, BackendSpec, DiskSpec, SpecError,
};

/// Size of the embedded default datastore file (sparse: it costs no space until written).
const DEFAULT_DATASTORE_BYTES: u64 = 8 << 30;
/// Size of the default thin virtual disk inside it.
const DEFAULT_DISK_BYTES: u64 = 4 << 30;
/// Names inside the data directory and the datastore.
const DEFAULT_DATASTORE_NAME: &str = "datastore.vmfs";
const DEFAULT_DISK_NAME: &str = "disk0.img";
const DEFAULT_SOCKET_NAME: &str = "disk0.sock";
/// Queues of the default disk: QEMU's vhost-user-blk-pci asks for one queue per vCPU unless
/// told otherwise and refuses a backend with fewer, so the default offers enough for common
/// VMs (a frontend may use fewer).
const DEFAULT_DISK_QUEUES: u16 = 4;

#[derive(Debug, Parser)]
#[command(
    name = "stratad",
    version,
    about = "Strata storage daemon: serves virtual disks to VMs over vhost-user-blk and to other hosts over iSCSI",
    after_help = "DISK SPECS:\n  \
        socket=PATH,backend=raw,path=IMAGE[,queues=N][,readonly=on][,direct=on][,name=NAME]\n  \
        socket=PATH,backend=null,size=SIZE[,queues=N][,read-zeroes=on|off][,name=NAME]\n  \
        socket=PATH,backend=vmfs,file=NAME[,queues=N][,readonly=on][,name=NAME]  (needs --datastore)\n  \
        A disk with name=NAME needs no socket=: it is then only exported by name (--iscsi-target).\n\n\
        ISCSI TARGET SPECS:\n  \
        iqn=IQN,disk=NAME[,lun=N][,chap-user=U,chap-secret-file=F][,mutual-user=U,mutual-secret-file=F][,allow=IQN;IQN]\n  \
        The same iqn given again adds a LUN (numbered 0, 1, ... unless lun= says otherwise).\n\n\
        In --disk, --share and --port specs a comma inside a value is written ,, (as in QEMU).\n\n\
        With no --disk, stratad serves a thin disk of a datastore file in the data \
        directory (both created on first start) and prints the QEMU options that attach to it."
)]
struct Args {
    /// Export a disk (repeatable); see DISK SPECS below.
    #[arg(long = "disk", value_name = "SPEC")]
    disks: Vec<String>,

    /// Export a directory of the datastore as a virtio-fs shared folder (repeatable):
    /// `socket=PATH,dir=NAME[,tag=TAG][,queues=N][,uid-map=G:H:N][,gid-map=G:H:N]
    /// [,readonly=on][,groups=FILE][,passwd=FILE][,cache=never|auto|always]`. Needs
    /// --datastore.
    #[arg(long = "share", value_name = "SPEC")]
    shares: Vec<String>,

    /// Serve packet queues of a NIC port (repeatable):
    /// `iface=NAME[,queues=N][,backend=af_xdp|dpdk|socket][,steer=3260,4420]`. af_xdp (default):
    /// XDP steering of the `steer` TCP/UDP ports into one AF_XDP socket per queue, everything
    /// else to the kernel. socket: kernel packet socket, one queue. dpdk (a stratad built with
    /// `--features dpdk`): for a kernel interface, DPDK's net_af_xdp PMD on it with the same
    /// steering program; NAME starting with `net_` (e.g. net_ring0, net_null0, net_tap0) is a
    /// DPDK virtual device, hot-plugged with default arguments unless --dpdk-eal's --vdev
    /// created it, serving all its traffic. Counters: `stats`, --metrics.
    #[arg(long = "port", value_name = "SPEC")]
    ports: Vec<String>,

    /// EAL arguments for `backend=dpdk` ports, one string, e.g. "-m 1024 -l 0
    /// --vdev=net_null0,size=64"; default "--no-huge -m 256 --no-pci --log-level=error -l CPU",
    /// CPU being the first CPU stratad may run on.
    /// A `--file-prefix=stratad-PID` is added unless given. Needs the `dpdk` feature.
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    dpdk_eal: Option<String>,

    /// CPUs for the reactor (polling) threads, one thread per CPU, e.g. `1` or `0-1`.
    /// Default: one unpinned reactor.
    #[arg(long, value_name = "LIST")]
    cpus: Option<String>,

    /// Datastore (file or block device) whose files `backend=vmfs` disks serve.
    #[arg(long, value_name = "PATH")]
    datastore: Option<PathBuf>,

    /// Create the datastore at --datastore with this size (e.g. 16G) if it does not hold one.
    #[arg(long, value_name = "SIZE", requires = "datastore")]
    create: Option<String>,

    /// JSON-RPC control socket (`stratactl --control PATH`); default: `DIR/control.sock` in
    /// the embedded default, none otherwise.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,

    /// Serve Prometheus text metrics (reactor and queue counters) over HTTP at this address,
    /// e.g. `127.0.0.1:9187`; off by default.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,

    /// Data directory for the embedded default (used when no --disk is given).
    #[arg(long, value_name = "DIR", default_value = "strata-data")]
    data_dir: PathBuf,

    /// Permission bits (octal) of the disk, share and control sockets stratad creates.
    /// Whoever can connect to a disk socket owns that disk; widen it (e.g. 660 with
    /// --socket-group) only for a QEMU running as another user.
    #[arg(long, value_name = "MODE", default_value = "600")]
    socket_mode: String,

    /// Group (name or gid) of the sockets stratad creates; members whose primary group it is
    /// may also use the control socket.
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,

    /// Listen for iSCSI initiators at this address (repeatable), e.g. `0.0.0.0:3260`.
    #[arg(long = "iscsi-portal", value_name = "ADDR:PORT")]
    iscsi_portals: Vec<std::net::SocketAddr>,

    /// Export a disk as a LUN of an iSCSI target (repeatable); see ISCSI TARGET SPECS below.
    #[arg(long = "iscsi-target", value_name = "SPEC", requires = "iscsi_portals")]
    iscsi_targets: Vec<String>,

    /// Register the iSCSI targets and portals with this iSNS server (strata-nameserver),
    /// e.g. `127.0.0.1:3205`, and let its discovery domains decide which initiator sees
    /// (SendTargets) and may log in to which target.
    #[arg(long, value_name = "HOST:PORT", requires = "iscsi_portals")]
    isns: Option<String>,

    /// Where the iSCSI LUNs keep their persistent reservations (one file per disk name), so
    /// they survive a restart. Default: DATA-DIR/iscsi-state.
    #[arg(long, value_name = "DIR")]
    iscsi_state_dir: Option<PathBuf>,

    /// I/O engine of the reactors.
    #[arg(long, value_name = "ENGINE", default_value = "uring", value_parser = ["uring", "sync"])]
    engine: String,
}

#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error("{option} {spec}: {err}")]
    Spec {
        option: &'static str,
        spec: String,
        err: SpecError,
    },
    #[error(transparent)]
    SpecOther(#[from] SpecError),
    #[error(transparent)]
    Backend(#[from] dataplane::backend::BackendError),
    #[error(transparent)]
    Server(#[from] dataplane::server::ServerError),
    #[error("{what}: {err}")]
    Io { what: String, err: std::io::Error },
    #[error("datastore {path}: {err}")]
    Datastore { path: String, err: String },
    #[error("{0}")]
    Port(String),
    #[error("--disk {0}: backend=vmfs needs --datastore PATH")]
    NoDatastore(String),
    #[error(transparent)]
    Share(#[from] file_server::settings::ShareError),
    #[error("--share needs --datastore PATH")]
    ShareWithoutDatastore,
    #[error(transparent)]
    Export(#[from] iscsi::ExportError),
    #[error("iSCSI: {0}")]
    Iscsi(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MainError {
    let what = what.into();
    move |err| MainError::Io { what, err }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stratad: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Raises the soft limit on open descriptors to the hard limit: every iSCSI connection, disk
/// image and frontend socket holds one, and a daemon's load should be bounded by its own
/// limits (connections per reactor, half-open connections), not by the login shell's 1024.
fn raise_fd_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                tracing::warn!(err = %std::io::Error::last_os_error(), "cannot raise the descriptor limit");
            }
        }
    }
}

/// Blocks SIGTERM and SIGINT in every thread (reactors inherit the mask) and returns a
/// signalfd that becomes readable when one arrives.
fn stop_signal_fd() -> Result<OwnedFd, MainError> {
    // SAFETY: sigset manipulation on a zeroed local set; pthread_sigmask and signalfd are
    // called with valid pointers; the returned fd is checked before taking ownership.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io_err("block signals")(std::io::Error::last_os_error()));
        }
        let fd: RawFd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(io_err("signalfd")(std::io::Error::last_os_error()));
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

fn open_backend(
    spec: &DiskSpec,
    index: usize,
    ds: Option<&Arc<Datastore>>,
) -> Result<Arc<dyn BlockBackend>, MainError> {
    Ok(match &spec.backend {
        BackendSpec::Vmfs { file, readonly } => {
            let ds = ds.ok_or_else(|| MainError::NoDatastore(spec.display_name(index)))?;
            let ds_err = |err: String| MainError::Datastore {
                path: file.clone(),
                err,
            };
            let ino = ds.lookup(file).map_err(|e| ds_err(e.to_string()))?;
            ds.open(ino).map_err(|e| ds_err(e.to_string()))?;
            let b = VmfsBackend::new(ds.clone(), ino, file, *readonly);
            match b {
                Ok(b) => Arc::new(b),
                Err(e) => {
                    ds.close(ino);
                    return Err(ds_err(e));
                }
            }
        }
        BackendSpec::Raw {
            path,
            readonly,
            direct,
        } => Arc::new(RawBackend::open(path, *readonly, *direct)?),
        BackendSpec::Null { size, read_zeroes } => Arc::new(NullBackend::new(*size, *read_zeroes)?),
    })
}

/// Opens (or with `create`, makes) the datastore at `path`.
fn open_datastore(path: &Path, create: Option<u64>) -> Result<Arc<Datastore>, MainError> {
    let err = |e: String| MainError::Datastore {
        path: path.display().to_string(),
        err: e,
    };
    let dev: Arc<dyn BlockDevice> = match create {
        Some(size) => Arc::new(FileDevice::create(path, size).map_err(|e| err(e.to_string()))?),
        None => Arc::new(FileDevice::open(path, false).map_err(|e| err(e.to_string()))?),
    };
    match Datastore::mount(dev.clone()) {
        Ok(ds) => Ok(Arc::new(ds)),
        Err(FsError::Mount(why)) if create.is_some() => {
            tracing::info!(path = %path.display(), %why, "formatting a new datastore");
            Datastore::mkfs(dev.clone(), &MkfsOptions { uuid: None }, &mut |_, _| {})
                .map_err(|e| err(e.to_string()))?;
            Ok(Arc::new(
                Datastore::mount(dev).map_err(|e| err(e.to_string()))?,
            ))
        }
        Err(e) => Err(err(e.to_string())),
    }
}

/// Creates `dir` (and missing parents) as 0700 whatever the umask: the data directory holds
/// the datastore and the sockets, private to the daemon's user.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(dir)
}

/// Prepares the embedded default: a datastore file in the data directory with a thin disk,
/// and the socket path.
fn default_disk(data_dir: &Path) -> Result<(DiskSpec, Arc<Datastore>), MainError> {
    create_private_dir(data_dir).map_err(io_err(format!("create {}", data_dir.display())))?;
    let abs = |p: PathBuf| std::fs::canonicalize(&p).unwrap_or(p);
    let dir = abs(data_dir.to_path_buf());
    let ds = open_datastore(
        &dir.join(DEFAULT_DATASTORE_NAME),
        Some(DEFAULT_DATASTORE_BYTES),
    )?;
    if ds.lookup(DEFAULT_DISK_NAME).is_err() {
        ds.create_file(
            DEFAULT_DISK_NAME,
            Provisioning::Thin,
            DEFAULT_DISK_BYTES,
            &mut |_, _| {},
        )
        .map_err(|e| MainError::Datastore {
            path: DEFAULT_DISK_NAME.into(),
            err: e.to_string(),
        })?;
        tracing::info!(
            disk = DEFAULT_DISK_NAME,
            bytes = DEFAULT_DISK_BYTES,
            "created default thin disk"
        );
    }
    Ok((
        DiskSpec {
            socket: Some(dir.join(DEFAULT_SOCKET_NAME)),
            backend: BackendSpec::Vmfs {
                file: DEFAULT_DISK_NAME.into(),
                readonly: false,
            },
            queues: DEFAULT_DISK_QUEUES,
            name: Some("disk0".into()),
        },
        ds,
    ))
}

fn qemu_hint(spec: &DiskSpec) -> String {
    let socket = spec.socket.as_deref().unwrap_or(Path::new("-"));
    format!(
        "qemu-system-x86_64 -m 1G -object memory-backend-memfd,id=mem,size=1G,share=on \
         -numa node,memdev=mem -chardev socket,id=disk0,path={} \
         -device vhost-user-blk-pci,chardev=disk0,num-queues={} ...",
        socket.display(),
        spec.queues
    )
}

/// Bounds how long acknowledged but uncommitted changes (a share's namespace operations, a
/// disk's allocating writes between guest FLUSHes) stay in the open journal transaction when
/// nobody syncs or writes more: commits it when the datastore's [`CommitPolicy`] says it is
/// due, looking every policy tick. One thread per daemon, whatever the number of disks and
/// shares.
fn spawn_committer(ds: Arc<Datastore>) -> std::io::Result<()> {
    // The policy is set before serving starts and not changed after, so its tick is read
    // once here rather than under the datastore lock on every round.
    let tick = ds
        .commit_policy()
        .map_or(CommitPolicy::default().tick, |p| p.tick);
    std::thread::Builder::new()
        .name("vmfs-commit".into())
        .spawn(move || loop {
            std::thread::sleep(tick);
            if let Err(e) = ds.commit_if_due() {
                tracing::error!(err = %e, "periodic commit failed");
            }
        })
        .map(|_| ())
}

fn run(args: Args) -> Result<(), MainError> {
    // First of all: blocks SIGTERM/SIGINT in this thread, so every thread spawned from here
    // on (datastore and disk workers, reservation writers, reactors, the iSCSI login thread)
    // inherits the mask and the signals reach only the signalfd. A thread spawned earlier
    // would take them with the default action: death (a SCSI unit's reservation writer did,
    // in iSCSI-only mode). A signal during startup waits in the signalfd and stops the
    // daemon as soon as it serves.
    let stop = stop_signal_fd()?;
    raise_fd_limit();
    let mut specs = Vec::with_capacity(args.disks.len());
    let spec_err = |option, spec: &String| {
        let spec = spec.clone();
        move |err| MainError::Spec { option, spec, err }
    };
    for s in &args.disks {
        specs.push(parse_disk_spec(s).map_err(spec_err("--disk", s))?);
    }
    let mut datastore = match &args.datastore {
        Some(p) => {
            let create = args
                .create
                .as_deref()
                .map(|s| spec::parse_size("create", s))
                .transpose()?;
            Some(open_datastore(p, create)?)
        }
        None => None,
    };
    let mut port_specs = Vec::with_capacity(args.ports.len());
    for p in &args.ports {
        port_specs.push(
            ports::parse_port_spec(p).map_err(|e| MainError::Port(format!("--port {p}: {e}")))?,
        );
    }
    let mut iscsi_specs = Vec::with_capacity(args.iscsi_targets.len());
    for s in &args.iscsi_targets {
        iscsi_specs.push(parse_iscsi_target_spec(s).map_err(spec_err("--iscsi-target", s))?);
    }
    #[cfg(feature = "packet")]
    for p in &port_specs {
        if p.backend != net::Backend::Socket {
            iscsi::check_steering(&p.iface, &p.steer, &args.iscsi_portals)
                .map_err(MainError::Port)?;
        }
    }
    let mut share_specs = Vec::with_capacity(args.shares.len());
    for s in &args.shares {
        share_specs.push(parse_share_spec(s).map_err(spec_err("--share", s))?);
    }
    let embedded = specs.is_empty() && datastore.is_none() && port_specs.is_empty();
    if embedded {
        let (spec, ds) = default_disk(&args.data_dir)?;
        specs.push(spec);
        datastore = Some(ds);
    }
    let access = SocketAccess {
        mode: parse_socket_mode(&args.socket_mode)?,
        group: args
            .socket_group
            .as_deref()
            .map(parse_socket_group)
            .transpose()?,
    };
    let cpus: Vec<Option<usize>> = match &args.cpus {
        Some(list) => parse_cpus(list)?.into_iter().map(Some).collect(),
        None => vec![None],
    };
    let engine = if args.engine == "sync" {
        EngineKind::Sync
    } else {
        EngineKind::Uring
    };
    // Open every backend before any socket appears, so a bad spec fails cleanly.
    let mut backends = Vec::with_capacity(specs.len());
    for (i, s) in specs.iter().enumerate() {
        backends.push(open_backend(s, i, datastore.as_ref())?);
    }
    let names: Vec<String> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| s.display_name(i))
        .collect();
    let exported_only: Vec<Option<Arc<dyn BlockBackend>>> = specs
        .iter()
        .zip(&backends)
        .map(|(s, b)| s.socket.is_none().then(|| b.clone()))
        .collect();
    let exports = Arc::new(iscsi::Exports::new(
        names
            .iter()
            .cloned()
            .zip(backends.iter().cloned())
            .collect(),
        Some(
            args.iscsi_state_dir
                .clone()
                .unwrap_or_else(|| iscsi::default_state_dir(&args.data_dir)),
        ),
    ));
    exports.create_targets(&iscsi_specs)?;
    let mut shares = Vec::with_capacity(share_specs.len());
    if !share_specs.is_empty() {
        let ds = datastore.as_ref().ok_or(MainError::ShareWithoutDatastore)?;
        // Namespace operations of shares accumulate in the open journal transaction, which
        // is committed at FUSE fsync/syncfs, every second, or when it fills (as disk writes
        // are at a guest FLUSH): one fdatasync per metadata operation would cost more than
        // the operation.
        ds.set_commit_policy(CommitPolicy::serving())
            .map_err(|e| MainError::Datastore {
                path: args
                    .datastore
                    .as_ref()
                    .map_or_else(String::new, |p| p.display().to_string()),
                err: e.to_string(),
            })?;
        for s in share_specs {
            shares.push(file_server::share::Share::open(ds.clone(), s)?);
        }
    }
    if let Some(ds) = &datastore {
        spawn_committer(ds.clone()).map_err(io_err("commit thread"))?;
    }
    // Declared before the server and the ports, so dropped after them, on every return.
    let _dpdk_runtime_dir = ports::DpdkRuntimeDir::new();
    let mut server = Server::new(&ServerConfig { cpus, engine })?;
    server.set_socket_access(access);
    for ((spec, backend), name) in specs.iter().zip(backends).zip(names) {
        // A disk without a socket is exported by name only (iSCSI).
        let Some(socket) = &spec.socket else { continue };
        server.add_disk(DiskConfig {
            name,
            socket: socket.clone(),
            backend,
            num_queues: spec.queues,
        })?;
    }
    let iscsi_server = if args.iscsi_portals.is_empty() {
        None
    } else {
        let s = san::transport::IscsiServer::start(
            exports.registry.clone(),
            &args.iscsi_portals,
            server.reactor_links(),
        )
        .map_err(|e| MainError::Iscsi(e.to_string()))?;
        for p in &args.iscsi_portals {
            tracing::info!(portal = %p, "iSCSI portal listening");
        }
        if let Some(ns) = &args.isns {
            let addr = std::net::ToSocketAddrs::to_socket_addrs(ns)
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| MainError::Iscsi(format!("--isns {ns}: not HOST:PORT")))?;
            exports
                .register_isns(addr)
                .map_err(|e| MainError::Iscsi(format!("--isns {ns}: {e}")))?;
        }
        Some(s)
    };
    for sh in &shares {
        server.add_share(ShareConfig {
            name: sh.spec.dir.clone(),
            socket: sh.spec.socket.clone(),
            tag: sh.spec.tag.clone(),
            request_queues: sh.spec.queues,
            handler: sh.handler.clone(),
        })?;
    }
    let ports = ports::start(
        &port_specs,
        &server.reactor_links(),
        args.dpdk_eal.as_deref(),
    )
    .map_err(MainError::Port)?;
    let control_path = args.control.clone().or_else(|| {
        embedded.then(|| {
            let dir = std::fs::canonicalize(&args.data_dir).unwrap_or(args.data_dir.clone());
            dir.join("control.sock")
        })
    });
    let mut control_file = None;
    if let Some(p) = &control_path {
        control_file = Some(
            control::spawn(
                p,
                control::Control {
                    stats: server.stats_handle(),
                    datastore: datastore.clone(),
                    ports: ports.counters.clone(),
                    shares: shares.clone(),
                    exports: exports.clone(),
                    iscsi: iscsi_server.as_ref().map(|s| s.stats_handle()),
                },
                access,
            )
            .map_err(io_err(format!("control socket {}", p.display())))?,
        );
        tracing::info!(socket = %p.display(), "control socket ready");
    }
    if let Some(addr) = &args.metrics {
        let bound = metrics::spawn(addr, server.stats_handle(), ports.counters.clone())
            .map_err(io_err(format!("metrics endpoint {addr}")))?;
        tracing::info!(%bound, "metrics endpoint ready");
    }
    if embedded {
        let socket = specs[0].socket.as_deref().unwrap_or(Path::new("-"));
        println!("stratad: serving {}", socket.display());
        println!("attach a VM with: {}", qemu_hint(&specs[0]));
    }
    tracing::info!(disks = specs.len(), shares = shares.len(), "stratad ready");
    server.serve(std::os::fd::AsRawFd::as_raw_fd(&stop))?;
    exports.deregister_isns();
    if let Some(s) = iscsi_server {
        // Sessions end before the reactors that serve them stop.
        s.shutdown();
    }
    server.shutdown();
    // The server flushed the disks it serves over vhost-user; these are exported by name only.
    for (i, (spec, backend)) in specs.iter().zip(&exported_only).enumerate() {
        if let Some(b) = backend {
            if let Err(e) = b.flush_sync() {
                tracing::error!(disk = %spec.display_name(i), err = %e, "flush at shutdown failed");
            }
        }
    }
    let stats = server.stats();
    for d in &stats.disks {
        let reqs: u64 = d.queues.iter().map(|q| q.requests).sum();
        let errs: u64 = d
            .queues
            .iter()
            .map(|q| q.invalid_requests + q.unsupported_requests + q.io_errors)
            .sum();
        tracing::info!(disk = %d.name, requests = reqs, errors = errs, "disk stats");
    }
    for (i, (cpu, r)) in stats.reactors.iter().enumerate() {
        tracing::info!(
            reactor = i,
            cpu = ?cpu,
            busy_ms = r.busy_ns / 1_000_000,
            spin_idle_ms = r.spin_idle_ns / 1_000_000,
            sleep_ms = r.sleep_ns / 1_000_000,
            requests = r.requests,
            "reactor stats"
        );
    }
    drop(server);
    for (iface, c) in ports.steering_counters() {
        tracing::info!(%iface, steered = c[0], passed = c[1], malformed = c[2], unbound = c[3], "XDP steering stats");
    }
    // Detaches the steering programs, after the reactors have stopped polling the sockets.
    drop(ports);
    if let (Some(p), Some(f)) = (&control_path, control_file) {
        f.remove(p);
    }
    if let Some(ds) = datastore {
        if let Err(e) = ds.unmount() {
            tracing::error!(err = %e, "datastore unmount failed");
            return Err(MainError::Datastore {
                path: "-".into(),
                err: e.to_string(),
            });
        }
    }
    tracing::info!("stratad stopped cleanly");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Issue 12 finding 9: directories stratad creates are 0700 (create_dir_all gave 0755).
    #[test]
    fn data_dir_is_private() {
        let base = std::env::temp_dir().join(format!("stratad-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        // SAFETY: umask has no memory effects.
        unsafe { libc::umask(0o022) };
        let d = base.join("a").join("b");
        create_private_dir(&d).expect("create");
        for p in [&base, &d] {
            let mode = std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", p.display());
        }
        let _ = std::fs::remove_dir_all(&base);
    }
}
