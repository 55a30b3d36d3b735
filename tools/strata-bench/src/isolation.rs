//! The isolation scenario (`--scenario isolation`): how much one disk's allocating writes
//! disturb another disk's reads when both are files of one vmfs datastore served by one
//! stratad (one reactor, on the server CPU).
//!
//! Disk A is written space (every block written before the server starts) read by a polling
//! client at qd 1 (4 KiB random reads: the latency-sensitive tenant); disk B is a thin file
//! never written, whose 4 KiB writes at qd `--interferer-qd` (sleeping client) each go to a
//! file block not written before (workload `allocwrite`), so each allocates one (the noisy
//! tenant). Each run starts a fresh server and measures
//! three phases: A alone; B alone (briefly: 0.1 s + 0.6 s); A while B writes (B starts first
//! and runs through A's warm-up and measured interval). The two B phases write two B disks of the same size, so
//! each starts on never-written space. Reported per system: A's p50 and p99 alone and with B,
//! the ratio of the p99s, B's IOPS alone and with A, and how many blocks each B disk allocated
//! against how many writes it took (read from the datastore after the server stopped: fewer
//! blocks than writes means B went through all its blocks and its later writes did not
//! allocate; vmfs files top out at 128 GiB = 131 072 blocks). Both clients run on the client
//! CPU.

use std::time::Duration;

use anyhow::Context;

use crate::histogram::{Histogram, LatencySummary};
use crate::load::{self, ClientMode, LoadSpec, Meters, Workload};
use crate::server::{
    Backend, CpuClock, IsolationDisks, ProcStatus, Server, System, SystemCpu, ISOLATION_FILES,
};
use crate::{report, Bench, STOP};

/// Disk B keeps writing this long after A's measured interval ends, so that B's load covers
/// all of it even if B's connection came up late.
const INTERFERER_TAIL: Duration = Duration::from_millis(500);
/// B alone's warm-up and measured interval: short, so that B does not run through all the
/// blocks of its disk (131 072 at most) at the rates seen here (up to 180 k allocations/s).
const B_ALONE_WARMUP: Duration = Duration::from_millis(100);
const B_ALONE_SECONDS: Duration = Duration::from_millis(600);
/// Disk A's size: small enough to prefill quickly, larger than any cache in the path.
const A_BYTES: u64 = 1 << 30;

/// One isolation measurement (one system, one round).
#[derive(Debug, Clone, serde::Serialize)]
pub struct IsolationRun {
    pub system: System,
    pub label: String,
    pub round: u32,
    pub a_alone: LatencySummary,
    pub a_alone_iops: f64,
    pub a_with_b: LatencySummary,
    pub a_with_b_iops: f64,
    /// A's p99 with B over A's p99 alone.
    pub p99_ratio: f64,
    pub b_alone_iops: f64,
    pub b_with_a_iops: f64,
    /// Writes B completed alone and next to A (B alone's warm-up not counted).
    pub b_writes: [u64; 2],
    /// File blocks each B disk allocated (B alone's warm-up included).
    pub b_blocks_allocated: [u64; 2],
}

fn iops(r: &load::LoadResult) -> f64 {
    r.ios as f64 / r.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
}

fn meters(server: &Server, bench: &Bench<'_>) -> anyhow::Result<Meters> {
    Ok(Meters {
        server: CpuClock::open(server.pid())?,
        system: SystemCpu::open(&[bench.cli.server_cpu, bench.cli.client_cpu])?,
        metrics: None,
        status: ProcStatus::new(server.pid()),
    })
}

/// Runs the scenario for both systems of `--compare`, A B A B, and prints the table.
pub fn run(bench: &Bench<'_>) -> anyhow::Result<()> {
    let cli = bench.cli;
    let labels = report::labels(&cli.compare);
    let mut runs = Vec::new();
    let mut hist = Histogram::new();
    let mut run_no = 0u64;
    for round in 0..cli.rounds {
        for (side, &system) in cli.compare.iter().enumerate() {
            bench.wait_quiet()?;
            run_no += 1;
            let r = measure(bench, system, &labels[side], round, run_no, &mut hist)?;
            eprintln!(
                "[{}/{}] {} round {round}: A p50/p99 {:.1}/{:.1} µs alone, {:.1}/{:.1} µs with \
                 B ({:.2}x); B {:.1} k IOPS alone, {:.1} k with A; writes/blocks allocated \
                 {:?}/{:?}",
                runs.len() + 1,
                cli.rounds as usize * 2,
                r.label,
                r.a_alone.p50_us,
                r.a_alone.p99_us,
                r.a_with_b.p50_us,
                r.a_with_b.p99_us,
                r.p99_ratio,
                r.b_alone_iops / 1000.0,
                r.b_with_a_iops / 1000.0,
                r.b_writes,
                r.b_blocks_allocated
            );
            runs.push(r);
        }
    }
    println!();
    println!(
        "strata-bench isolation: disk A vmfs written space, randread qd 1, polling client; \
         disk B thin never-written, allocwrite qd {} (sleeping client), same datastore and \
         stratad; {} s (+{} s warm-up) x {} rounds, server CPU {} / client CPU {}; medians",
        cli.interferer_qd, cli.seconds, cli.warmup, cli.rounds, cli.server_cpu, cli.client_cpu
    );
    println!(
        "{:<12} {:>12} {:>12} {:>12} {:>12} {:>10} {:>13} {:>13}",
        "system",
        "A alone p50",
        "A alone p99",
        "A+B p50",
        "A+B p99",
        "p99 ratio",
        "B alone kIOPS",
        "B+A kIOPS"
    );
    for label in &labels {
        let mine: Vec<&IsolationRun> = runs.iter().filter(|r| &r.label == label).collect();
        let med = |f: fn(&IsolationRun) -> f64| report::median(mine.iter().map(|r| f(r)).collect());
        println!(
            "{:<12} {:>9.1} µs {:>9.1} µs {:>9.1} µs {:>9.1} µs {:>9.2}x {:>13.1} {:>13.1}",
            label,
            med(|r| r.a_alone.p50_us),
            med(|r| r.a_alone.p99_us),
            med(|r| r.a_with_b.p50_us),
            med(|r| r.a_with_b.p99_us),
            med(|r| r.p99_ratio),
            med(|r| r.b_alone_iops) / 1000.0,
            med(|r| r.b_with_a_iops) / 1000.0,
        );
    }
    if let Some(path) = &cli.json {
        let doc = serde_json::json!({
            "scenario": "isolation",
            "compare": cli.compare,
            "interferer_qd": cli.interferer_qd,
            "interferer_mib": cli.interferer_mib,
            "a_bytes": A_BYTES,
            "seconds": cli.seconds,
            "warmup": cli.warmup,
            "rounds": cli.rounds,
            "server_cpu": cli.server_cpu,
            "client_cpu": cli.client_cpu,
            "runs": runs,
        });
        let text = serde_json::to_string_pretty(&doc).context("serialize")?;
        std::fs::write(path, text).with_context(|| format!("write {}", path.display()))?;
        eprintln!("raw figures written to {}", path.display());
    }
    Ok(())
}

/// One fresh server: A alone, then A with B.
fn measure(
    bench: &Bench<'_>,
    system: System,
    label: &str,
    round: u32,
    run_no: u64,
    hist: &mut Histogram,
) -> anyhow::Result<IsolationRun> {
    let cli = bench.cli;
    let mut spec = bench.server_spec(system, Backend::Raw, 1, 3, run_no)?;
    spec.metrics = None;
    spec.isolation = Some(IsolationDisks {
        a_bytes: A_BYTES,
        b_bytes: cli.interferer_mib << 20,
    });
    let server = Server::start(&spec)?;
    let warmup = Duration::from_secs_f64(cli.warmup);
    let seconds = Duration::from_secs_f64(cli.seconds);
    let a_socks = &spec.socks[..1];
    let (b_alone_socks, b_socks) = (&spec.socks[1..2], &spec.socks[2..3]);
    let a_load = LoadSpec {
        socks: a_socks,
        workload: Workload::Randread,
        qd: 1,
        queues: 1,
        mode: ClientMode::Poll,
        warmup,
        seconds,
        seed: cli.seed.wrapping_add(run_no),
        window: None,
    };
    let log = |e: anyhow::Error| {
        let tail = server.log_tail();
        e.context(format!(
            "{} run {run_no}; server log:\n{tail}",
            system.name()
        ))
    };
    let alone = load::run(&a_load, &mut meters(&server, bench)?, hist).map_err(log)?;
    let a_alone = hist.summary();
    let b_alone_load = LoadSpec {
        socks: b_alone_socks,
        workload: Workload::Allocwrite,
        qd: cli.interferer_qd,
        queues: 1,
        mode: ClientMode::Sleep,
        warmup: B_ALONE_WARMUP,
        seconds: B_ALONE_SECONDS,
        seed: cli.seed.wrapping_add(run_no).wrapping_mul(31),
        window: None,
    };
    let mut b_hist = Histogram::new();
    let b_alone =
        load::run(&b_alone_load, &mut meters(&server, bench)?, &mut b_hist).map_err(log)?;
    let b_load = LoadSpec {
        socks: b_socks,
        warmup: Duration::ZERO,
        seconds: warmup + seconds + INTERFERER_TAIL,
        seed: cli.seed.wrapping_add(run_no).wrapping_mul(37),
        ..b_alone_load.clone()
    };
    let mut b_meters = meters(&server, bench)?;
    let mut a_meters = meters(&server, bench)?;
    let (with_b, b) = std::thread::scope(|scope| {
        let b = scope.spawn(move || load::run(&b_load, &mut b_meters, &mut b_hist));
        let a = load::run(&a_load, &mut a_meters, hist);
        let b = b
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("disk B's load panicked")));
        (a, b)
    });
    let with_b = with_b.map_err(log)?;
    let b = b.map_err(log)?;
    let a_with_b = hist.summary();
    server.stop()?;
    if STOP.load(std::sync::atomic::Ordering::Relaxed) {
        anyhow::bail!("interrupted");
    }
    let b_blocks_allocated = allocated_blocks(&spec.datastore())?;
    let _ = std::fs::remove_file(spec.datastore());
    Ok(IsolationRun {
        system,
        label: label.to_string(),
        round,
        p99_ratio: a_with_b.p99_us / a_alone.p99_us.max(f64::MIN_POSITIVE),
        a_alone,
        a_alone_iops: iops(&alone),
        a_with_b,
        a_with_b_iops: iops(&with_b),
        b_alone_iops: iops(&b_alone),
        b_with_a_iops: iops(&b),
        b_writes: [b_alone.ios, b.ios],
        b_blocks_allocated,
    })
}

/// File blocks each B disk holds (mounts the stopped server's datastore).
fn allocated_blocks(path: &std::path::Path) -> anyhow::Result<[u64; 2]> {
    use std::sync::Arc;
    let dev = Arc::new(vmfs::device::FileDevice::open(path, false).context("open datastore")?);
    let ds = vmfs::fs::Datastore::mount(dev).context("mount datastore")?;
    let [_, b_names @ ..] = ISOLATION_FILES;
    let mut blocks = [0; 2];
    for (n, b) in blocks.iter_mut().zip(b_names) {
        let ino = ds.lookup(b).with_context(|| format!("disk {b}"))?;
        *n = ds.stat(ino).with_context(|| format!("stat {b}"))?.allocated;
    }
    ds.unmount().context("unmount")?;
    Ok(blocks)
}
