//! Datastore commands: `mkfs`, `info`, `ls`, `mkdir`, `disk create|rm|resize`, `fsck`.
//!
//! Offline on `--datastore PATH` (the file or device is locked while in use, so this fails
//! clearly when stratad serves it), or online through stratad's control socket
//! (`--control PATH`) for everything but `mkfs` and `fsck`, which need the device to
//! themselves.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use jsonrpc::{Client, ClientError, ClientLimits, ErrorCode, Methods};
use serde_json::{json, Value};
use stratad_rpc::{
    DATASTORE_DISK_CREATE, DATASTORE_DISK_DELETE, DATASTORE_DISK_RESIZE, DATASTORE_INFO,
    DATASTORE_LS, DATASTORE_MKDIR, STRATAD_STATS,
};
use vmfs::device::{BlockDevice, FileDevice};
use vmfs::fs::{Datastore, MkfsOptions};

/// Time stratad has to answer a call that does not allocate.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Time stratad has to create or resize a disk: eager zeroing runs in the call (a 16 TiB
/// thick disk at 200 MB/s takes a day); the bound only keeps a hung daemon from hanging the
/// command forever.
const ALLOCATING_CALL_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Errors of the datastore commands; the message is what the user sees.
#[derive(Debug, thiserror::Error)]
pub enum VmfsCmdError {
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// The datastore operation failed.
    #[error("{0}")]
    Failed(String),
    /// fsck found problems (already printed).
    #[error("fsck found {0} problem(s)")]
    Unclean(usize),
}

/// Where the datastore is.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// Datastore file or block device (offline access).
    #[arg(long, global = true, value_name = "PATH")]
    pub datastore: Option<PathBuf>,
    /// stratad's control socket (online access while stratad serves the datastore).
    #[arg(long, global = true, value_name = "PATH")]
    pub control: Option<PathBuf>,
}

/// Datastore subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum VmfsCommand {
    /// Format PATH (a file, created sparse if missing, or a block device) as a datastore.
    Mkfs {
        /// File or device.
        path: PathBuf,
        /// Size of a new file, e.g. 4G (a device's size is its own).
        #[arg(long)]
        size: Option<String>,
        /// Format even if PATH already holds a datastore.
        #[arg(long)]
        force: bool,
    },
    /// Show the volume: identity, size, free space, journal counters.
    Info,
    /// List a directory of the datastore.
    Ls {
        /// Directory (default: the root).
        #[arg(default_value = "/")]
        path: String,
    },
    /// Create a directory in the datastore.
    Mkdir {
        /// Path.
        path: String,
    },
    /// Virtual disk files.
    #[command(subcommand)]
    Disk(DiskCommand),
    /// Check every invariant of an unmounted datastore; exit status 0 only when clean. After
    /// a crash it first recovers as a mount would (journal replay, orphans freed), as e2fsck
    /// replays a journal before checking.
    Fsck {
        /// Do not recover: open the datastore read-only, write nothing, and report a journal
        /// still to replay as a problem.
        #[arg(long)]
        no_replay: bool,
    },
    /// stratad's counters (needs --control): reactors, disks' and shares' queues, shares'
    /// permission caches, packet queues.
    Stats,
}

/// `disk` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum DiskCommand {
    /// Create a virtual disk file.
    Create {
        /// Name (path inside the datastore).
        name: String,
        /// Size, e.g. 10G.
        #[arg(long)]
        size: String,
        /// Allocate on first write (default).
        #[arg(long, group = "prov")]
        thin: bool,
        /// Allocate and zero everything now (eager-zeroed thick).
        #[arg(long, group = "prov")]
        thick: bool,
        /// Allocate now, zero on first write (lazy-zeroed thick).
        #[arg(long = "lazy-zeroed", group = "prov")]
        lazy_zeroed: bool,
    },
    /// Remove a virtual disk file.
    Rm {
        /// Name.
        name: String,
    },
    /// Grow (also while served) or shrink (not while served) a virtual disk file.
    Resize {
        /// Name.
        name: String,
        /// New size.
        #[arg(long)]
        size: String,
    },
}

fn size_arg(s: &str) -> Result<u64, VmfsCmdError> {
    vmfs::admin::parse_size(s).map_err(|why| VmfsCmdError::Usage(format!("size '{s}': {why}")))
}

/// Prints `done/total` as a percentage on stderr, on one line, for long operations.
fn progress(label: &'static str) -> impl Fn(u64, u64) + Send + Sync {
    let last = AtomicU64::new(u64::MAX);
    // Only for a person watching: scripts and logs get no carriage-return noise.
    let shown = std::io::IsTerminal::is_terminal(&std::io::stderr());
    move |done, total| {
        if !shown {
            return;
        }
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        if last.swap(pct, Ordering::Relaxed) != pct {
            eprint!("\r{label}: {pct:3}%");
            if done >= total {
                eprintln!();
            }
        }
    }
}

fn open(path: &Path) -> Result<Arc<Datastore>, VmfsCmdError> {
    let dev = FileDevice::open(path, false).map_err(|e| {
        VmfsCmdError::Failed(match e {
            vmfs::device::DeviceError::Locked => format!(
                "{} is in use (is stratad serving it? use --control SOCKET)",
                path.display()
            ),
            e => format!("{}: {e}", path.display()),
        })
    })?;
    let ds = Datastore::mount(Arc::new(dev))
        .map_err(|e| VmfsCmdError::Failed(format!("{}: {e}", path.display())))?;
    Ok(Arc::new(ds))
}

fn rpc(sock: &Path, method: &str, params: Value) -> Result<Value, VmfsCmdError> {
    let timeout = match method {
        DATASTORE_DISK_CREATE | DATASTORE_DISK_RESIZE => ALLOCATING_CALL_TIMEOUT,
        _ => CALL_TIMEOUT,
    };
    let failed = |e: ClientError| match e {
        ClientError::Rpc(e) => VmfsCmdError::Failed(e.message),
        e => VmfsCmdError::Failed(format!("{}: {e}", sock.display())),
    };
    let mut c = Client::connect_unix(sock, ClientLimits::default()).map_err(failed)?;
    c.call_with_timeout(method, &params, timeout)
        .map_err(failed)
}

/// Where requests go: an offline datastore (served by stratad's own method table, as the
/// daemon would) or a control socket.
enum Backend {
    Offline(Arc<Datastore>, Methods),
    Online(PathBuf),
}

impl Backend {
    fn offline(ds: Arc<Datastore>) -> Backend {
        let mut m = Methods::new();
        stratad_rpc::register(&mut m, Some(ds.clone()), Arc::new(progress("allocating")));
        Backend::Offline(ds, m)
    }

    fn call(&self, method: &str, params: Value) -> Result<Value, VmfsCmdError> {
        match self {
            Backend::Online(sock) => rpc(sock, method, params),
            Backend::Offline(_, m) => m.call(method, params).map_err(|e| match e.code {
                ErrorCode::InvalidParams => VmfsCmdError::Usage(e.message),
                _ => VmfsCmdError::Failed(e.message),
            }),
        }
    }

    fn close(self) -> Result<(), VmfsCmdError> {
        if let Backend::Offline(ds, m) = self {
            // The table holds the datastore too: drop it first.
            drop(m);
            ds.unmount()
                .map_err(|e| VmfsCmdError::Failed(format!("unmount: {e}")))?;
        }
        Ok(())
    }
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn print_value(method: &str, v: &Value, as_json: bool) {
    if as_json {
        println!("{v}");
        return;
    }
    match method {
        DATASTORE_INFO => {
            let g = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
            println!(
                "uuid        {}",
                v.get("uuid").and_then(Value::as_str).unwrap_or("")
            );
            println!("size        {}", human(g("volume_bytes")));
            println!(
                "free        {} ({} of {} file blocks)",
                human(g("free_bytes")),
                g("file_blocks_free"),
                g("file_blocks_total")
            );
            println!(
                "sub-blocks  {} of {} free",
                g("sub_blocks_free"),
                g("sub_blocks_total")
            );
            println!(
                "inodes      {} of {} free",
                g("inodes_free"),
                g("inodes_total")
            );
            println!(
                "journal     {} commits, {} since mount",
                g("journal_commits"),
                human(g("journal_bytes"))
            );
        }
        DATASTORE_LS => {
            for e in v.as_array().into_iter().flatten() {
                let g = |k: &str| e.get(k).and_then(Value::as_u64).unwrap_or(0);
                let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                println!(
                    "{:<4} {:>12} {:>12} {:<12} {}",
                    s("kind"),
                    human(g("size")),
                    human(g("allocated_bytes")),
                    s("provisioning"),
                    s("name")
                );
            }
        }
        _ => {}
    }
}

fn print_stats(v: &Value, as_json: bool) {
    if as_json {
        println!("{v}");
        return;
    }
    let g = |o: &Value, k: &str| o.get(k).and_then(Value::as_u64).unwrap_or(0);
    for r in v
        .get("reactors")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        println!(
            "reactor {:>2}  busy {:>8} ms  sleep {:>8} ms  requests {}  cycles/IO {:.0}",
            g(r, "reactor"),
            g(r, "busy_ns") / 1_000_000,
            g(r, "sleep_ns") / 1_000_000,
            g(r, "requests"),
            r.get("cycles_per_io")
                .and_then(Value::as_f64)
                .unwrap_or(0.0)
        );
    }
    for d in v
        .get("disks")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let reqs: u64 = d
            .get("queues")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|q| g(q, "requests"))
            .sum();
        println!(
            "{:<4} {:<20} requests {reqs}",
            d.get("kind").and_then(Value::as_str).unwrap_or(""),
            d.get("name").and_then(Value::as_str).unwrap_or("")
        );
    }
    for s in v
        .get("shares")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let p = s.get("perm_cache").cloned().unwrap_or(Value::Null);
        println!(
            "share {:<20} requests {} denied {} unmapped {} malformed {} handles {}",
            s.get("dir").and_then(Value::as_str).unwrap_or(""),
            g(s, "requests"),
            g(s, "denied"),
            g(s, "unmapped_ids"),
            g(s, "malformed"),
            g(s, "handles")
        );
        println!(
            "      perm cache: hits {} misses {} invalidations {} evictions {} expirations {} entries {}",
            g(&p, "hits"),
            g(&p, "misses"),
            g(&p, "invalidations"),
            g(&p, "evictions"),
            g(&p, "expirations"),
            g(&p, "entries")
        );
        // Usage is counted only for a share with a limit (no cost per request otherwise).
        let q = s.get("quota").cloned().unwrap_or(Value::Null);
        let limit = |k: &str| q.get(k).and_then(Value::as_u64).map(|n| n.to_string());
        let (bytes, inodes) = (limit("bytes_max"), limit("inodes_max"));
        if bytes.is_some() || inodes.is_some() {
            println!(
                "      quota: bytes {} of {} inodes {} of {}",
                g(&q, "bytes_used"),
                bytes.as_deref().unwrap_or("-"),
                g(&q, "inodes_used"),
                inodes.as_deref().unwrap_or("-")
            );
        }
    }
    for q in v
        .get("packet_queues")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        println!(
            "port {:<12} queue {:>2} {:<7} rx frames {} bytes {} errors {}",
            q.get("iface").and_then(Value::as_str).unwrap_or(""),
            g(q, "queue"),
            q.get("backend").and_then(Value::as_str).unwrap_or(""),
            g(q, "rx_frames"),
            g(q, "rx_bytes"),
            g(q, "errors")
        );
    }
    for s in v
        .get("steering")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        println!(
            "xdp  {:<12} steered {} passed {} malformed {} unbound {}",
            s.get("iface").and_then(Value::as_str).unwrap_or(""),
            g(s, "steered"),
            g(s, "passed"),
            g(s, "malformed"),
            g(s, "unbound")
        );
    }
}

/// Runs a datastore command.
pub fn run(target: &Target, cmd: &VmfsCommand, as_json: bool) -> Result<(), VmfsCmdError> {
    match cmd {
        VmfsCommand::Mkfs { path, size, force } => {
            return mkfs(path, size.as_deref(), *force, as_json)
        }
        VmfsCommand::Fsck { no_replay } => return fsck(target, *no_replay, as_json),
        VmfsCommand::Stats => {
            let sock = target.control.as_ref().ok_or_else(|| {
                VmfsCmdError::Usage("stats needs --control SOCKET (stratad running)".into())
            })?;
            let v = rpc(sock, STRATAD_STATS, json!({}))?;
            print_stats(&v, as_json);
            return Ok(());
        }
        _ => {}
    }
    let backend = match (&target.control, &target.datastore) {
        (Some(sock), _) => Backend::Online(sock.clone()),
        (None, Some(p)) => Backend::offline(open(p)?),
        (None, None) => {
            return Err(VmfsCmdError::Usage(
                "give --datastore PATH (offline) or --control SOCKET (stratad running)".into(),
            ))
        }
    };
    let (method, params) = match cmd {
        VmfsCommand::Info => (DATASTORE_INFO, json!({})),
        VmfsCommand::Ls { path } => (DATASTORE_LS, json!({ "path": path })),
        VmfsCommand::Mkdir { path } => (DATASTORE_MKDIR, json!({ "path": path })),
        VmfsCommand::Disk(DiskCommand::Create {
            name,
            size,
            thick,
            lazy_zeroed,
            ..
        }) => {
            let prov = if *thick {
                "thick"
            } else if *lazy_zeroed {
                "lazy-zeroed"
            } else {
                "thin"
            };
            (
                DATASTORE_DISK_CREATE,
                json!({"name": name, "size": size_arg(size)?, "provisioning": prov}),
            )
        }
        VmfsCommand::Disk(DiskCommand::Rm { name }) => {
            (DATASTORE_DISK_DELETE, json!({ "name": name }))
        }
        VmfsCommand::Disk(DiskCommand::Resize { name, size }) => (
            DATASTORE_DISK_RESIZE,
            json!({"name": name, "size": size_arg(size)?}),
        ),
        VmfsCommand::Mkfs { .. } | VmfsCommand::Fsck { .. } | VmfsCommand::Stats => {
            return Err(VmfsCmdError::Usage("mkfs and fsck run offline".into()))
        }
    };
    let result = backend.call(method, params);
    let closed = backend.close();
    let v = result?;
    closed?;
    print_value(method, &v, as_json);
    Ok(())
}

fn mkfs(path: &Path, size: Option<&str>, force: bool, as_json: bool) -> Result<(), VmfsCmdError> {
    let fail = |e: &dyn std::fmt::Display| VmfsCmdError::Failed(format!("{}: {e}", path.display()));
    let dev: Arc<dyn BlockDevice> = match size {
        Some(s) => Arc::new(FileDevice::create(path, size_arg(s)?).map_err(|e| fail(&e))?),
        None if path.exists() => Arc::new(FileDevice::open(path, false).map_err(|e| fail(&e))?),
        None => {
            return Err(VmfsCmdError::Usage(format!(
                "{} does not exist: give --size to create it",
                path.display()
            )))
        }
    };
    if !force {
        if let Ok(ds) = Datastore::mount(dev.clone()) {
            drop(ds);
            return Err(VmfsCmdError::Failed(format!(
                "{} already holds a datastore (use --force to format it again)",
                path.display()
            )));
        }
    }
    Datastore::mkfs(
        dev.clone(),
        &MkfsOptions { uuid: None },
        &mut progress("mkfs"),
    )
    .map_err(|e| fail(&e))?;
    let ds = Datastore::mount(dev).map_err(|e| fail(&e))?;
    let info = vmfs::admin::info(&ds).map_err(|e| fail(&e))?;
    ds.unmount().map_err(|e| fail(&e))?;
    let v = serde_json::to_value(info).map_err(|e| fail(&e))?;
    print_value(DATASTORE_INFO, &v, as_json);
    Ok(())
}

fn fsck(target: &Target, no_replay: bool, as_json: bool) -> Result<(), VmfsCmdError> {
    let Some(path) = &target.datastore else {
        return Err(VmfsCmdError::Usage(
            "fsck runs offline: give --datastore PATH (and stop stratad first)".into(),
        ));
    };
    let open_err = |e| {
        VmfsCmdError::Failed(match e {
            vmfs::device::DeviceError::Locked => {
                format!("{} is in use; fsck needs stratad stopped", path.display())
            }
            e => format!("{}: {e}", path.display()),
        })
    };
    let dev: Arc<dyn BlockDevice> = if no_replay {
        Arc::new(FileDevice::open_read_only(path).map_err(open_err)?)
    } else {
        Arc::new(FileDevice::open(path, false).map_err(open_err)?)
    };
    // Recovery first (unless --no-replay): a crash leaves committed transactions in the
    // journal, which are not problems but work a mount would do.
    let mut recovered = Value::Null;
    let pending =
        vmfs::fsck::journal_pending(&*dev).map_err(|e| VmfsCmdError::Failed(e.to_string()))?;
    if pending && !no_replay {
        match vmfs::fsck::recover(dev.clone()) {
            Ok(rep) => {
                if !as_json {
                    println!(
                        "recovered: replayed {} journal transaction(s) ({} block(s) written home)",
                        rep.transactions, rep.blocks_applied
                    );
                }
                recovered = json!({"transactions": rep.transactions,
                                   "blocks_applied": rep.blocks_applied});
            }
            // The check below reports what is wrong; the recovery error says why it stopped.
            Err(e) => {
                if !as_json {
                    println!("problem: recovery failed: {e}");
                }
                recovered = json!({"error": e.to_string()});
            }
        }
    }
    let mut r = vmfs::fsck::fsck_with_progress(&*dev, &mut progress("fsck"))
        .map_err(|e| VmfsCmdError::Failed(e.to_string()))?;
    if let Some(e) = recovered.get("error").and_then(|e| e.as_str()) {
        r.problems.insert(0, format!("recovery failed: {e}"));
    }
    if as_json {
        println!(
            "{}",
            json!({"clean": r.clean(), "problems": r.problems, "files": r.files,
                   "dirs": r.dirs, "file_blocks_used": r.fb_used,
                   "sub_blocks_used": r.sb_used, "pointer_blocks_used": r.pb_used,
                   "recovered": recovered})
        );
    } else {
        for p in &r.problems {
            println!("problem: {p}");
        }
        println!(
            "{}: {} files, {} directories, {} file blocks, {} sub-blocks, {} pointer blocks in use",
            if r.clean() { "clean" } else { "NOT CLEAN" },
            r.files,
            r.dirs,
            r.fb_used,
            r.sb_used,
            r.pb_used
        );
    }
    if r.clean() {
        Ok(())
    } else {
        Err(VmfsCmdError::Unclean(r.problems.len()))
    }
}
