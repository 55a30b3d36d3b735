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
mod load;
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
use crate::server::{Backend, CpuClock, QsdAio, Server, ServerSpec, System, SystemCpu};

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
/// Exit status after SIGINT/SIGTERM/SIGHUP (128 + SIGINT, as shells report it).
const EXIT_INTERRUPTED: u8 = 130;

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
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 32)]
    qd: u32,
    /// Number of virtqueues (server and client).
    #[arg(long, default_value_t = 1)]
    queues: u32,
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
    /// machine's DAMON pageout scheme evicts parts of it from the page cache mid-run).
    #[arg(long)]
    no_pin_image: bool,

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

impl TempDir {
    fn new() -> anyhow::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("strata-bench-{}-{nanos:x}", std::process::id()));
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
    if cli.qd == 0 || cli.qd > MAX_QD {
        bail!("--qd must be in 1..={MAX_QD}");
    }
    if cli.queues == 0 || cli.queues > MAX_QUEUES {
        bail!("--queues must be in 1..={MAX_QUEUES}");
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

    let tmp = TempDir::new()?;
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
    let _pinned = if backends.contains(&Backend::Raw) && !cli.no_pin_image {
        let p = image::Pinned::new(&image)?;
        if !p.locked {
            eprintln!("warning: could not mlock the image; it is mapped and touched instead");
        }
        Some(p)
    } else {
        None
    };

    let labels = report::labels(&cli.compare);
    let total = backends.len() * modes.len() * cli.workload.len() * cli.rounds as usize * 2;
    let mut runs: Vec<Run> = Vec::with_capacity(total);
    let mut hist = Histogram::new();
    let mut run_no = 0u64;
    let bench = Bench {
        cli: &cli,
        image: &image,
        stratad_bin: &stratad_bin,
        qsd_bin: &qsd_bin,
        dir: &tmp.0,
    };
    for &backend in backends {
        for &mode in modes {
            for &workload in &cli.workload {
                let cell = Cell {
                    backend,
                    mode,
                    workload,
                    qd: cli.qd,
                    queues: cli.queues,
                };
                for round in 0..cli.rounds {
                    for (side, &system) in cli.compare.iter().enumerate() {
                        let mut retries = 0;
                        let run = loop {
                            bench.wait_quiet()?;
                            run_no += 1;
                            let label = &labels[side];
                            let run =
                                bench.measure(&cell, system, label, round, run_no, &mut hist)?;
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

    let rows = report::summarize(&runs, &labels);
    println!();
    println!(
        "strata-bench: {} vs {}, 4 KiB, qd {} x {} queue(s), {} s (+{} s warm-up) x {} rounds, \
         server CPU {} / client CPU {}",
        labels[0],
        labels[1],
        cli.qd,
        cli.queues,
        cli.seconds,
        cli.warmup,
        cli.rounds,
        cli.server_cpu,
        cli.client_cpu
    );
    print!("{}", report::table(&rows, &labels, cli.max_other));
    if let Some(path) = &cli.json {
        report::write_json(path, &cli_json(&cli), &runs, &rows)?;
        eprintln!("raw figures written to {}", path.display());
    }
    Ok(())
}

/// What every measurement shares.
#[derive(Debug)]
struct Bench<'a> {
    cli: &'a Cli,
    image: &'a Path,
    stratad_bin: &'a Path,
    qsd_bin: &'a Path,
    dir: &'a Path,
}

impl Bench<'_> {
    /// Waits (up to `--quiet-wait` seconds) until the server and client CPUs are no busier than
    /// `--max-other`, so that runs start on a quiet machine.
    fn wait_quiet(&self) -> anyhow::Result<()> {
        let cli = self.cli;
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
        let spec = ServerSpec {
            system,
            backend: cell.backend,
            image: self.image,
            queues: cli.queues,
            cpu: cli.server_cpu,
            stratad_bin: self.stratad_bin,
            qsd_bin: self.qsd_bin,
            qsd_aio: cli.qsd_aio,
            read_zeroes: cli.read_zeroes,
            sock: self.dir.join(format!("run{run_no}.sock")),
            log: self.dir.join(format!("run{run_no}.log")),
            vmfs_prefill: cli.vmfs_prefill,
        };
        let server = Server::start(&spec)?;
        let mut meters = Meters {
            server: CpuClock::open(server.pid())?,
            system: SystemCpu::open(&[cli.server_cpu, cli.client_cpu])?,
        };
        let load = LoadSpec {
            sock: &spec.sock,
            workload: cell.workload,
            qd: cli.qd,
            queues: cli.queues,
            mode: cell.mode,
            warmup: Duration::from_secs_f64(cli.warmup),
            seconds: Duration::from_secs_f64(cli.seconds),
            seed: cli.seed.wrapping_add(run_no),
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
        "vmfs_prefill": cli.vmfs_prefill,
        "server_cpu": cli.server_cpu,
        "client_cpu": cli.client_cpu,
        "seed": cli.seed,
        "max_other": cli.max_other,
        "retries": cli.retries,
        "quiet_wait": cli.quiet_wait,
    })
}
