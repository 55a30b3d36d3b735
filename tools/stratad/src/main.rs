//! `stratad`, the Strata storage daemon: exports virtual disks to VMs over vhost-user-blk.
//!
//! - `spec`: parsing of `--disk` and `--cpus` (pure, property-tested).
//! - this file: command line, the embedded default (a data directory with a sparse image),
//!   signal handling (SIGTERM/SIGINT through a signalfd: stop accepting, drain, flush, exit 0)
//!   and logging. The data path lives in the `dataplane` crate.

mod spec;

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use dataplane::backend::{BlockBackend, NullBackend, RawBackend};
use dataplane::engine::EngineKind;
use dataplane::server::{DiskConfig, Server, ServerConfig};

use crate::spec::{parse_cpus, parse_disk_spec, BackendSpec, DiskSpec};

/// Size of the embedded default disk image (sparse: it costs no space until written).
const DEFAULT_IMAGE_BYTES: u64 = 4 << 30;
/// File names inside the data directory.
const DEFAULT_IMAGE_NAME: &str = "disk0.img";
const DEFAULT_SOCKET_NAME: &str = "disk0.sock";

#[derive(Debug, Parser)]
#[command(
    name = "stratad",
    version,
    about = "Strata storage daemon: serves virtual disks to VMs over vhost-user-blk",
    after_help = "DISK SPECS:\n  \
        socket=PATH,backend=raw,path=IMAGE[,queues=N][,readonly=on][,direct=on][,name=NAME]\n  \
        socket=PATH,backend=null,size=SIZE[,queues=N][,read-zeroes=on|off][,name=NAME]\n\n\
        With no --disk, stratad serves a sparse default image from the data directory \
        and prints the QEMU options that attach to it."
)]
struct Args {
    /// Export a disk (repeatable); see DISK SPECS below.
    #[arg(long = "disk", value_name = "SPEC")]
    disks: Vec<String>,

    /// CPUs for the reactor (polling) threads, one thread per CPU, e.g. `1` or `0-1`.
    /// Default: one unpinned reactor.
    #[arg(long, value_name = "LIST")]
    cpus: Option<String>,

    /// Data directory for the embedded default (used when no --disk is given).
    #[arg(long, value_name = "DIR", default_value = "strata-data")]
    data_dir: PathBuf,

    /// I/O engine of the reactors.
    #[arg(long, value_name = "ENGINE", default_value = "uring", value_parser = ["uring", "sync"])]
    engine: String,
}

#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error("--disk {spec}: {err}")]
    Spec { spec: String, err: spec::SpecError },
    #[error(transparent)]
    SpecOther(#[from] spec::SpecError),
    #[error(transparent)]
    Backend(#[from] dataplane::backend::BackendError),
    #[error(transparent)]
    Server(#[from] dataplane::server::ServerError),
    #[error("{what}: {err}")]
    Io { what: String, err: std::io::Error },
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

fn open_backend(spec: &DiskSpec) -> Result<Arc<dyn BlockBackend>, MainError> {
    Ok(match &spec.backend {
        BackendSpec::Raw {
            path,
            readonly,
            direct,
        } => Arc::new(RawBackend::open(path, *readonly, *direct)?),
        BackendSpec::Null { size, read_zeroes } => Arc::new(NullBackend::new(*size, *read_zeroes)?),
    })
}

/// Prepares the embedded default: the data directory, a sparse image and the socket path.
fn default_disk(data_dir: &Path) -> Result<DiskSpec, MainError> {
    std::fs::create_dir_all(data_dir).map_err(io_err(format!("create {}", data_dir.display())))?;
    let image = data_dir.join(DEFAULT_IMAGE_NAME);
    if !image.exists() {
        let f =
            std::fs::File::create(&image).map_err(io_err(format!("create {}", image.display())))?;
        f.set_len(DEFAULT_IMAGE_BYTES)
            .map_err(io_err(format!("size {}", image.display())))?;
        tracing::info!(image = %image.display(), bytes = DEFAULT_IMAGE_BYTES, "created default image");
    }
    let abs = |p: PathBuf| std::fs::canonicalize(&p).unwrap_or(p);
    let dir = abs(data_dir.to_path_buf());
    Ok(DiskSpec {
        socket: dir.join(DEFAULT_SOCKET_NAME),
        backend: BackendSpec::Raw {
            path: dir.join(DEFAULT_IMAGE_NAME),
            readonly: false,
            direct: false,
        },
        queues: 1,
        name: Some("disk0".into()),
    })
}

fn qemu_hint(spec: &DiskSpec) -> String {
    format!(
        "qemu-system-x86_64 -m 1G -object memory-backend-memfd,id=mem,size=1G,share=on \
         -numa node,memdev=mem -chardev socket,id=disk0,path={} \
         -device vhost-user-blk-pci,chardev=disk0,num-queues={} ...",
        spec.socket.display(),
        spec.queues
    )
}

fn run(args: Args) -> Result<(), MainError> {
    let mut specs = Vec::with_capacity(args.disks.len());
    for s in &args.disks {
        specs.push(parse_disk_spec(s).map_err(|err| MainError::Spec {
            spec: s.clone(),
            err,
        })?);
    }
    let embedded = specs.is_empty();
    if embedded {
        specs.push(default_disk(&args.data_dir)?);
    }
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
    for s in &specs {
        backends.push(open_backend(s)?);
    }
    let stop = stop_signal_fd()?;
    let mut server = Server::new(&ServerConfig { cpus, engine })?;
    for (i, (spec, backend)) in specs.iter().zip(backends).enumerate() {
        let name = spec.name.clone().unwrap_or_else(|| {
            spec.socket
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| format!("disk{i}"))
        });
        server.add_disk(DiskConfig {
            name,
            socket: spec.socket.clone(),
            backend,
            num_queues: spec.queues,
        })?;
    }
    if embedded {
        println!("stratad: serving {}", specs[0].socket.display());
        println!("attach a VM with: {}", qemu_hint(&specs[0]));
    }
    tracing::info!(disks = specs.len(), "stratad ready");
    server.run(std::os::fd::AsRawFd::as_raw_fd(&stop))?;
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
    tracing::info!("stratad stopped cleanly");
    Ok(())
}
