//! `strata-bench`: runs the same libblkio workload against stratad and qemu-storage-daemon (QSD)
//! on equal backends and prints IOPS, latency and server CPU per I/O side by side.
//!
//! Crate map:
//! - `main.rs` (this file): command line, the A B A B schedule, temp dir, raw image, signals.
//! - [`server`]: starts one server (stratad or QSD) pinned to the server CPU, reads its CPU time
//!   from `/proc/PID/stat` and the two CPUs' busy time from `/proc/stat`, stops it (SIGTERM,
//!   SIGKILL on drop, PDEATHSIG if we die).
//! - [`load`]: the load generator, a libblkio `virtio-blk-vhost-user` client pinned to the client
//!   CPU that either sleeps on completion eventfds or busy-polls poll queues; no allocation per
//!   I/O.
//! - [`histogram`]: preallocated log-linear latency histogram.
//! - [`image`]: creates the raw image and pins it in the page cache (mmap + mlock) for the run.
//! - [`report`]: medians, ratios, the printed table and the JSON file.
//! - [`plot`]: the `--plot` SVG (IOPS and server CPU per I/O against qd, latency CDFs).
//!
//! Sweeps: `--qd`, `--queues` and `--disks` take comma-separated lists; every combination is
//! one table cell. For stratad each run also scrapes its `--metrics` endpoint (a free loopback
//! port) before and after the measured interval: busy µs per I/O and batch sizes from its own
//! counters, and RSS and thread count from `/proc/PID/status`. `--idle-seconds` adds the idle
//! cost (server CPU with `--idle-disks` connected but idle disks).
//!
//! Method (see shared/reference/vhost-user-blk.md, "Anchor figures"): server on one core, load
//! generator on the other, each server started fresh per measurement, runs alternating A B A B,
//! medians over rounds. A run of QSD against itself gives ratios within about ±10%: treat that
//! as noise. Each run also records how much of the two CPUs went to neither the server nor the
//! client (`other%`: builds, guests, kernel threads on a shared machine); a run above
//! `--max-other` is measured again (`--retries`) and the table warns about what remains.
//!
//! Example: `strata-bench` (stratad vs QSD, null and raw, sleeping and polling client, about
//! 2.5 minutes); `strata-bench --compare qsd,qsd` measures the noise; `--json FILE` keeps every
//! run's raw figures.

mod histogram;
mod image;
mod iscsi;
mod isolation;
mod load;
mod plot;
mod report;
mod server;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;

use crate::histogram::Histogram;
use crate::load::{ClientMode, LoadSpec, Meters, Workload};
use crate::report::{Cell, Run};
use crate::server::{
    Backend, CpuClock, MetricsProbe, ProcStatus, QsdAio, Server, ServerSpec, System, SystemCpu,
};

/// Set by SIGINT/SIGTERM/SIGHUP: loops notice it and unwind, so servers and the temp dir are
/// cleaned up by their destructors.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// Largest queue depth per queue: 3 descriptors per request (libblkio uses no indirect
/// descriptors) need a 4096-entry ring at 1024, above what vhost-user servers usually accept.
const MAX_QD: u32 = 1024;
/// Largest number of queues (virtio-blk `num_queues` is a u16; more is pointless on 2 cores).
const MAX_QUEUES: u32 = 64;
/// Length of one idle probe before a run (see `Bench::wait_quiet`): long enough to see a
/// compiler or guest, short enough to add little to a run.
const QUIET_PROBE: Duration = Duration::from_millis(500);
/// Most disks on one server: one connection each from this single-threaded client.
const MAX_DISKS: u32 = 256;
/// Time the idle clients are left connected before the idle measurement starts, so that
/// connection set-up and the servers' initial polling are over.
const IDLE_SETTLE: Duration = Duration::from_secs(1);
/// Exit status after SIGINT/SIGTERM/SIGHUP (128 + SIGINT, as shells report it).
const EXIT_INTERRUPTED: u8 = 130;

/// See `--scenario`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    Sweep,
    Isolation,
    Iscsi,
}

/// Which client modes / backends to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ModeChoice {
    Sleep,
    Poll,
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BackendChoice {
    Null,
    Raw,
    Both,
}

/// Compare stratad with qemu-storage-daemon under a libblkio (virtio-blk-vhost-user) load.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Workloads, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "randread")]
    workload: Vec<Workload>,
    /// Requests in flight per queue, comma-separated for a sweep (e.g. `1,4,16,32,128`). With
    /// several disks the depth is spread over them: each disk's queues get qd / disks (at
    /// least 1).
    #[arg(long, value_delimiter = ',', default_value = "32")]
    qd: Vec<u32>,
    /// Number of virtqueues per disk (server and client), comma-separated for a sweep.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    queues: Vec<u32>,
    /// Disks on the one server, comma-separated for a sweep (e.g. `1,8,32`); the client opens
    /// one connection per disk. Several disks need `--backend null`.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    disks: Vec<u32>,
    /// Write an SVG with IOPS and server CPU per I/O against queue depth and latency CDFs
    /// (at qd 1 and 32 when swept, else the smallest and largest qd).
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Idle cost: after the runs, start each system with --idle-disks null disks, connect a
    /// client to every disk that does nothing, and measure the server's CPU over this many
    /// seconds (0: skip).
    #[arg(long, default_value_t = 0.0)]
    idle_seconds: f64,
    /// Disks of the idle-cost measurement.
    #[arg(long, default_value_t = 32)]
    idle_disks: u32,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Warm-up seconds per run (same connection, not measured).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Rounds; each round runs A then B.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Client completion mode: sleep on eventfds, busy-poll, or both.
    #[arg(long, value_enum, default_value = "both")]
    client: ModeChoice,
    /// Backend: null device, raw file in the page cache, or both.
    #[arg(long, value_enum, default_value = "both")]
    backend: BackendChoice,
    /// The two systems compared, A then B (e.g. `qsd,qsd` to measure the noise).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "stratad,qsd")]
    compare: Vec<System>,
    /// stratad binary [default: `stratad` next to this binary, e.g. target/release/stratad].
    #[arg(long)]
    stratad: Option<PathBuf>,
    /// The second stratad build of `--compare stratad,stratad-b` (e.g. an older build).
    #[arg(long, value_name = "PATH")]
    stratad_b: Option<PathBuf>,
    /// What to measure: `sweep`, the table over backends, client modes, workloads, qd,
    /// queues and disks; or `isolation`, disk A's read latency (vmfs, written space, polling
    /// client, randread qd 1) alone and while disk B of the same datastore and stratad does
    /// allocating random writes (thin, never written, qd `--interferer-qd`), see isolation.rs.
    #[arg(long, value_enum, default_value = "sweep")]
    scenario: Scenario,
    /// iSCSI scenario: the targets compared, alternating (`stratad`, `tgtd`).
    #[arg(long, value_delimiter = ',', default_value = "stratad,tgtd")]
    iscsi_targets: Vec<String>,
    /// Isolation: requests in flight on disk B.
    #[arg(long, default_value_t = 32)]
    interferer_qd: u32,
    /// Isolation: size of each B disk in MiB (thin: only what B writes takes memory on
    /// tmpfs). Each first write to a 1 MiB file block allocates it; once B has touched most
    /// blocks its writes stop allocating. 131072 (128 GiB) is vmfs's largest file.
    #[arg(long, default_value_t = 131072)]
    interferer_mib: u64,
    /// qemu-storage-daemon binary (looked up on PATH).
    #[arg(long, default_value = "qemu-storage-daemon")]
    qsd: PathBuf,
    /// QSD AIO engine for the raw backend.
    #[arg(long, value_enum, default_value = "io_uring")]
    qsd_aio: QsdAio,
    /// Null backend `read-zeroes` on both servers (QSD null-co and stratad null): on = reads fill
    /// the buffer with zeroes, off = reads leave it untouched.
    #[arg(long, default_value = "on", value_name = "on|off", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    read_zeroes: bool,
    /// Raw image to use (created and filled if missing) [default: one in the temp dir].
    #[arg(long)]
    image: Option<PathBuf>,
    /// Do not map and mlock the raw image for the run (see `image.rs`: without the pin, the
    /// machine's DAMON pageout scheme evicts parts of it from the page cache mid-run). Only
    /// matters off tmpfs: a tmpfs image is never pinned (nothing evicts it without swap).
    #[arg(long)]
    no_pin_image: bool,
    /// Directory for the run's files (raw image, vmfs datastore, sockets) [default: /dev/shm
    /// when it is a tmpfs, else the system temp dir]. Why tmpfs: "a raw file in the page
    /// cache" must measure the servers, not the host filesystem. On the build machines' ext4
    /// a 4 KiB buffered overwrite costs 24–46 µs of CPU whoever serves it (`perf record`: most
    /// of it in the kernel's ext4_block_write_begin; the same without the image pin).
    #[arg(long)]
    work_dir: Option<PathBuf>,

    /// With the `vmfs` system: write every block of the thin disk before each run, so the
    /// run measures written space (default: never-written space, the allocation path).
    #[arg(long)]
    vmfs_prefill: bool,
    /// Size of a created raw image, in MiB.
    #[arg(long, default_value_t = 1024)]
    image_mib: u64,
    /// CPU for the server.
    #[arg(long, default_value_t = 1)]
    server_cpu: usize,
    /// CPU for the load generator (this process).
    #[arg(long, default_value_t = 0)]
    client_cpu: usize,
    /// A run in which more than this share (percent) of the server and client CPUs went to
    /// other work (builds, guests, kernel threads) is measured again, up to --retries times.
    #[arg(long, default_value_t = 10.0)]
    max_other: f64,
    /// Before each run, wait up to this many seconds for the CPUs to go quiet (busy no more
    /// than --max-other); 0 disables the wait.
    #[arg(long, default_value_t = 30.0)]
    quiet_wait: f64,
    /// How often a disturbed run is measured again before it is kept anyway (and flagged).
    #[arg(long, default_value_t = 2)]
    retries: u32,
    /// Seed of the offset generator (each run derives its own from it).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write all raw figures to this JSON file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("expected on or off, got {s}")),
    }
}

/// A temp directory removed on drop.
#[derive(Debug)]
struct TempDir(PathBuf);

/// `/dev/shm` if it is a tmpfs (statfs magic), else the system temp dir.
fn default_work_base() -> PathBuf {
    let shm = PathBuf::from("/dev/shm");
    if is_tmpfs(&shm) {
        shm
    } else {
        std::env::temp_dir()
    }
}

fn is_tmpfs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: libc::statfs is a plain C struct of integers, for which all-zero is valid.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs only writes into `st`, which we own; `c` is a valid NUL-terminated path
    // for the duration of the call.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type == libc::TMPFS_MAGIC
}

impl TempDir {
    fn new(base: &Path) -> anyhow::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = base.join(format!("strata-bench-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

extern "C" fn on_signal(_sig: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn install_signal_handlers() -> anyhow::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: sigaction is plain data; all-zeroes is a valid value (empty mask, no flags).
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe; `sa` is a
        // valid sigaction and the old action is not requested.
        if unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error()).context("sigaction");
        }
    }
    Ok(())
}

/// `name` if it contains a slash, else its first match on PATH.
fn find_on_path(name: &Path) -> Option<PathBuf> {
    if name.components().count() > 1 {
        return name.exists().then(|| name.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn default_stratad() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    Ok(exe.with_file_name("stratad"))
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        // Destructors have run by now: servers stopped, temp dir removed.
        Err(_) if STOP.load(Ordering::Relaxed) => {
            eprintln!("strata-bench: interrupted");
            ExitCode::from(EXIT_INTERRUPTED)
        }
        Err(e) => {
            eprintln!("Error: {e:?}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.compare.len() != 2 {
        bail!("--compare takes exactly two systems, e.g. stratad,qsd");
    }
    if cli.qd.iter().any(|&q| q == 0 || q > MAX_QD) {
        bail!("--qd must be in 1..={MAX_QD}");
    }
    if cli.queues.iter().any(|&q| q == 0 || q > MAX_QUEUES) {
        bail!("--queues must be in 1..={MAX_QUEUES}");
    }
    if cli.disks.iter().any(|&d| d == 0 || d > MAX_DISKS) || cli.idle_disks > MAX_DISKS {
        bail!("--disks and --idle-disks must be in 1..={MAX_DISKS}");
    }
    if cli.disks.iter().any(|&d| d > 1) && cli.backend != BackendChoice::Null {
        bail!("several disks share no raw image or datastore here: use --backend null");
    }
    if cli.seconds <= 0.0 || cli.warmup < 0.0 || cli.quiet_wait < 0.0 || cli.rounds == 0 {
        bail!("--seconds and --rounds must be positive, --warmup and --quiet-wait not negative");
    }
    install_signal_handlers()?;
    server::pin_current(cli.client_cpu).context("pin the load generator")?;

    let stratad_bin = match &cli.stratad {
        Some(p) => p.clone(),
        None => default_stratad()?,
    };
    if cli.compare.contains(&System::Vmfs) && cli.backend != BackendChoice::Raw {
        bail!("the vmfs system serves a disk as large as the raw image: use --backend raw");
    }
    let stratad_b_bin = cli.stratad_b.clone().unwrap_or_default();
    if cli.compare.contains(&System::StratadB) && !stratad_b_bin.is_file() {
        bail!("--compare ...,stratad-b needs --stratad-b PATH (a stratad binary)");
    }
    if (cli.compare.contains(&System::Stratad) || cli.compare.contains(&System::Vmfs))
        && !stratad_bin.is_file()
    {
        bail!(
            "stratad not found at {} (build it with `cargo build --release -p stratad` or pass \
             --stratad)",
            stratad_bin.display()
        );
    }
    let qsd_bin = if cli.compare.contains(&System::Qsd) {
        find_on_path(&cli.qsd).with_context(|| format!("{} not found", cli.qsd.display()))?
    } else {
        cli.qsd.clone()
    };

    if cli.scenario == Scenario::Iscsi {
        let targets = cli
            .iscsi_targets
            .iter()
            .map(|t| match t.as_str() {
                "stratad" => Ok(iscsi::Target::Stratad),
                "tgtd" => Ok(iscsi::Target::Tgtd),
                other => Err(anyhow::anyhow!("--iscsi-targets: unknown target {other}")),
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let base = cli.work_dir.clone().unwrap_or_else(default_work_base);
        let tmp = TempDir::new(&base)?;
        let image = match &cli.image {
            Some(p) => p.clone(),
            None => tmp.0.join("lun.img"),
        };
        if !image.exists() {
            image::create(&image, cli.image_mib)?;
        }
        eprintln!(
            "iSCSI LUN {} (tmpfs: {})",
            image.display(),
            is_tmpfs(&image)
        );
        let plan = iscsi::Plan {
            stratad: &stratad_bin,
            image: &image,
            dir: &tmp.0,
            targets: &targets,
            qds: &cli.qd,
            rounds: cli.rounds,
            warmup: Duration::from_secs_f64(cli.warmup),
            seconds: Duration::from_secs_f64(cli.seconds),
            server_cpu: cli.server_cpu,
            client_cpu: cli.client_cpu,
            max_other: cli.max_other,
            retries: cli.retries,
            seed: cli.seed,
            wait_quiet: &|| wait_quiet(&cli),
        };
        let runs = iscsi::run(&plan)?;
        if let Some(path) = &cli.json {
            let doc = serde_json::json!({ "settings": cli_json(&cli), "iscsi_runs": runs });
            std::fs::write(path, serde_json::to_string_pretty(&doc)?)
                .with_context(|| format!("write {}", path.display()))?;
            eprintln!("raw figures written to {}", path.display());
        }
        return Ok(());
    }
    if cli.scenario == Scenario::Isolation {
        if cli
            .compare
            .iter()
            .any(|s| !matches!(s, System::Stratad | System::StratadB))
        {
            bail!("the isolation scenario compares stratad builds: --compare stratad,stratad-b");
        }
        if cli.interferer_qd == 0 || cli.interferer_qd > MAX_QD {
            bail!("--interferer-qd must be in 1..={MAX_QD}");
        }
        let base = cli.work_dir.clone().unwrap_or_else(default_work_base);
        let tmp = TempDir::new(&base)?;
        eprintln!("work dir {} (tmpfs: {})", tmp.0.display(), is_tmpfs(&tmp.0));
        let bench = Bench {
            cli: &cli,
            image: &tmp.0,
            stratad_bin: &stratad_bin,
            stratad_b_bin: &stratad_b_bin,
            qsd_bin: &qsd_bin,
            dir: &tmp.0,
        };
        return isolation::run(&bench);
    }
    let backends: &[Backend] = match cli.backend {
        BackendChoice::Null => &[Backend::Null],
        BackendChoice::Raw => &[Backend::Raw],
        BackendChoice::Both => &[Backend::Null, Backend::Raw],
    };
    let modes: &[ClientMode] = match cli.client {
        ModeChoice::Sleep => &[ClientMode::Sleep],
        ModeChoice::Poll => &[ClientMode::Poll],
        ModeChoice::Both => &[ClientMode::Sleep, ClientMode::Poll],
    };

    let base = cli.work_dir.clone().unwrap_or_else(default_work_base);
    let tmp = TempDir::new(&base)?;
    eprintln!("work dir {} (tmpfs: {})", tmp.0.display(), is_tmpfs(&tmp.0));
    let image = match &cli.image {
        Some(p) => p.clone(),
        None => tmp.0.join("raw.img"),
    };
    if backends.contains(&Backend::Raw) && !image.exists() {
        eprintln!(
            "creating {} MiB raw image {}",
            cli.image_mib,
            image.display()
        );
        image::create(&image, cli.image_mib)?;
    }
    let _pinned = if backends.contains(&Backend::Raw) && !cli.no_pin_image && !is_tmpfs(&image) {
        let p = image::Pinned::new(&image)?;
        if !p.locked {
            eprintln!("warning: could not mlock the image; it is mapped and touched instead");
        }
        Some(p)
    } else {
        None
    };

    let labels = report::labels(&cli.compare);
    let total = backends.len()
        * modes.len()
        * cli.workload.len()
        * cli.qd.len()
        * cli.queues.len()
        * cli.disks.len()
        * cli.rounds as usize
        * 2;
    let mut runs: Vec<Run> = Vec::with_capacity(total);
    let mut hist = Histogram::new();
    let mut run_no = 0u64;
    let bench = Bench {
        cli: &cli,
        image: &image,
        stratad_bin: &stratad_bin,
        stratad_b_bin: &stratad_b_bin,
        qsd_bin: &qsd_bin,
        dir: &tmp.0,
    };
    for &backend in backends {
        for &mode in modes {
            for &workload in &cli.workload {
                let mut cells = Vec::new();
                for &queues in &cli.queues {
                    for &disks in &cli.disks {
                        for &qd in &cli.qd {
                            cells.push(Cell {
                                backend,
                                mode,
                                workload,
                                qd,
                                queues,
                                disks,
                            });
                        }
                    }
                }
                for cell in cells {
                    for round in 0..cli.rounds {
                        for (side, &system) in cli.compare.iter().enumerate() {
                            let mut retries = 0;
                            let run = loop {
                                bench.wait_quiet()?;
                                run_no += 1;
                                let label = &labels[side];
                                let run = bench
                                    .measure(&cell, system, label, round, run_no, &mut hist)?;
                                eprintln!("[{}/{total}] {}", runs.len() + 1, run.one_line());
                                if run.other_cpu_pct <= cli.max_other || retries >= cli.retries {
                                    break run;
                                }
                                retries += 1;
                                eprintln!(
                                    "    disturbed: {:.1}% of the CPUs went to other work (limit \
                                 {}%), measuring again ({retries}/{})",
                                    run.other_cpu_pct, cli.max_other, cli.retries
                                );
                            };
                            runs.push(run);
                        }
                    }
                }
            }
        }
    }

    let rows = report::summarize(&runs, &labels);
    println!();
    println!(
        "strata-bench: {} vs {}, 4 KiB, qd {:?} x {:?} queue(s) x {:?} disk(s), {} s (+{} s \
         warm-up) x {} rounds, server CPU {} / client CPU {}",
        labels[0],
        labels[1],
        cli.qd,
        cli.queues,
        cli.disks,
        cli.seconds,
        cli.warmup,
        cli.rounds,
        cli.server_cpu,
        cli.client_cpu
    );
    print!("{}", report::table(&rows, &labels, cli.max_other));
    let mut idle = Vec::new();
    if cli.idle_seconds > 0.0 {
        let mut systems = cli.compare.clone();
        systems.dedup();
        for &system in &systems {
            bench.wait_quiet()?;
            run_no += 1;
            let r = bench.idle(system, run_no)?;
            println!(
                "idle: {} with {} attached idle disks: {:.2}% of a core over {:.0} s, RSS {:.1} \
                 MiB, {} threads",
                system.name(),
                r.disks,
                r.server_cpu_pct,
                r.seconds,
                r.rss_kib as f64 / 1024.0,
                r.threads
            );
            idle.push(r);
        }
    }
    if let Some(path) = &cli.plot {
        plot::write_svg(path, &runs, &rows, &labels)?;
        eprintln!("plots written to {}", path.display());
    }
    if let Some(path) = &cli.json {
        report::write_json(path, &cli_json(&cli), &runs, &rows, &idle)?;
        eprintln!("raw figures written to {}", path.display());
    }
    Ok(())
}

/// Waits (up to `--quiet-wait` seconds) until the server and client CPUs are no busier than
/// `--max-other`, so that runs start on a quiet machine.
fn wait_quiet(cli: &Cli) -> anyhow::Result<()> {
    let mut cpus = SystemCpu::open(&[cli.server_cpu, cli.client_cpu])?;
    let deadline = Instant::now() + Duration::from_secs_f64(cli.quiet_wait);
    let mut told = false;
    loop {
        let t0 = Instant::now();
        let a = cpus.read()?;
        std::thread::sleep(QUIET_PROBE);
        let b = cpus.read()?;
        let span = t0.elapsed().as_secs_f64() * cpus.cpu_count() as f64;
        let busy = 100.0 * b.busy.saturating_sub(a.busy).as_secs_f64() / span;
        if busy <= cli.max_other || Instant::now() >= deadline {
            return Ok(());
        }
        if STOP.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        if !told {
            eprintln!("    waiting for the CPUs to go quiet ({busy:.0}% busy)");
            told = true;
        }
    }
}

/// What every measurement shares.
#[derive(Debug)]
struct Bench<'a> {
    cli: &'a Cli,
    image: &'a Path,
    stratad_bin: &'a Path,
    stratad_b_bin: &'a Path,
    qsd_bin: &'a Path,
    dir: &'a Path,
}

impl Bench<'_> {
    /// Waits (up to `--quiet-wait` seconds) until the server and client CPUs are no busier than
    /// `--max-other`, so that runs start on a quiet machine.
    fn wait_quiet(&self) -> anyhow::Result<()> {
        wait_quiet(self.cli)
    }

    /// Starts a fresh server, runs the load once, stops the server.
    fn measure(
        &self,
        cell: &Cell,
        system: System,
        label: &str,
        round: u32,
        run_no: u64,
        hist: &mut Histogram,
    ) -> anyhow::Result<Run> {
        let cli = self.cli;
        let spec = self.server_spec(system, cell.backend, cell.queues, cell.disks, run_no)?;
        let server = Server::start(&spec)?;
        let mut meters = Meters {
            server: CpuClock::open(server.pid())?,
            system: SystemCpu::open(&[cli.server_cpu, cli.client_cpu])?,
            metrics: match spec.metrics {
                Some(addr) => Some(MetricsProbe::connect(addr)?),
                None => None,
            },
            status: ProcStatus::new(server.pid()),
        };
        let load = LoadSpec {
            socks: &spec.socks,
            workload: cell.workload,
            qd: (cell.qd / cell.disks).max(1),
            queues: cell.queues,
            mode: cell.mode,
            warmup: Duration::from_secs_f64(cli.warmup),
            seconds: Duration::from_secs_f64(cli.seconds),
            seed: cli.seed.wrapping_add(run_no),
            window: None,
        };
        let result = load::run(&load, &mut meters, hist).with_context(|| {
            let log = server.log_tail();
            if log.is_empty() {
                format!("{} run {run_no} (server log empty)", system.name())
            } else {
                format!("{} run {run_no}; server log:\n{log}", system.name())
            }
        })?;
        let status = server.stop()?;
        Ok(Run::new(
            cell,
            system,
            label,
            round,
            &result,
            hist,
            status.code(),
        ))
    }
}

impl Bench<'_> {
    /// The spec of one server with `disks` disks of `queues` queues each.
    fn server_spec(
        &self,
        system: System,
        backend: Backend,
        queues: u32,
        disks: u32,
        run_no: u64,
    ) -> anyhow::Result<ServerSpec<'_>> {
        let cli = self.cli;
        if system == System::Vmfs && disks > 1 {
            bail!("the vmfs system serves one disk");
        }
        let socks = (0..disks)
            .map(|d| self.dir.join(format!("run{run_no}-d{d}.sock")))
            .collect();
        let metrics = match system {
            System::Stratad | System::Vmfs | System::StratadB => {
                Some(server::free_loopback_addr()?)
            }
            System::Qsd => None,
        };
        Ok(ServerSpec {
            system,
            backend,
            image: self.image,
            queues,
            cpu: cli.server_cpu,
            stratad_bin: match system {
                System::StratadB => self.stratad_b_bin,
                _ => self.stratad_bin,
            },
            qsd_bin: self.qsd_bin,
            qsd_aio: cli.qsd_aio,
            read_zeroes: cli.read_zeroes,
            socks,
            metrics,
            log: self.dir.join(format!("run{run_no}.log")),
            vmfs_prefill: cli.vmfs_prefill,
            isolation: None,
        })
    }

    /// Idle cost: `--idle-disks` null disks with a connected client each that submits nothing;
    /// the server's CPU over `--idle-seconds`.
    fn idle(&self, system: System, run_no: u64) -> anyhow::Result<IdleResult> {
        let cli = self.cli;
        let spec = self.server_spec(system, Backend::Null, 1, cli.idle_disks, run_no)?;
        let server = Server::start(&spec)?;
        let conns = spec
            .socks
            .iter()
            .map(|s| load::Connection::open(s, 1, 1, ClientMode::Sleep))
            .collect::<anyhow::Result<Vec<_>>>()?;
        std::thread::sleep(IDLE_SETTLE);
        let mut clock = CpuClock::open(server.pid())?;
        let t0 = Instant::now();
        let c0 = clock.read()?;
        let seconds = Duration::from_secs_f64(cli.idle_seconds);
        while t0.elapsed() < seconds {
            if STOP.load(Ordering::Relaxed) {
                bail!("interrupted");
            }
            std::thread::sleep(QUIET_PROBE);
        }
        let c1 = clock.read()?;
        let elapsed = t0.elapsed().as_secs_f64();
        let (rss_kib, threads) = ProcStatus::new(server.pid()).read()?;
        let connected = conns
            .iter()
            .filter(|c| c.instance().get_u64("capacity").is_ok())
            .count();
        drop(conns);
        server.stop()?;
        Ok(IdleResult {
            system,
            disks: cli.idle_disks,
            connected,
            seconds: elapsed,
            server_cpu_pct: 100.0 * c1.saturating_sub(c0).as_secs_f64() / elapsed,
            rss_kib,
            threads,
        })
    }
}

/// Idle cost of one system.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IdleResult {
    pub system: System,
    pub disks: u32,
    /// Clients still connected at the end.
    pub connected: usize,
    pub seconds: f64,
    /// Server CPU in percent of one core.
    pub server_cpu_pct: f64,
    pub rss_kib: u64,
    pub threads: u64,
}

/// The settings recorded in the JSON file.
fn cli_json(cli: &Cli) -> serde_json::Value {
    serde_json::json!({
        "workloads": cli.workload,
        "qd": cli.qd,
        "queues": cli.queues,
        "seconds": cli.seconds,
        "warmup": cli.warmup,
        "rounds": cli.rounds,
        "compare": cli.compare,
        "qsd_aio": cli.qsd_aio,
        "read_zeroes": cli.read_zeroes,
        "image_mib": cli.image_mib,
        "pin_image": !cli.no_pin_image,
        "work_dir": cli.work_dir.clone().unwrap_or_else(default_work_base),
        "vmfs_prefill": cli.vmfs_prefill,
        "disks": cli.disks,
        "idle_seconds": cli.idle_seconds,
        "idle_disks": cli.idle_disks,
        "server_cpu": cli.server_cpu,
        "client_cpu": cli.client_cpu,
        "seed": cli.seed,
        "max_other": cli.max_other,
        "retries": cli.retries,
        "quiet_wait": cli.quiet_wait,
    })
}
