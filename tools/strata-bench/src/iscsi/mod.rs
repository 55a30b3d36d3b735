//! `--scenario iscsi`: Strata's iSCSI target against tgtd on the same tmpfs-backed LUN, with
//! this crate's own initiator ([`initiator`]): 4 KiB random read and write at each `--qd`,
//! client pinned to `--client-cpu`, target to `--server-cpu`, the two targets alternating over
//! `--rounds`; IOPS, p50/p99 latency and target CPU per I/O (utime+stime of the target's
//! process from /proc/PID/stat). Each run starts a fresh target.

pub mod initiator;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::histogram::Histogram;
use crate::server::{free_loopback_addr, self_cpu_time, CpuClock, SystemCpu};

/// Target IQN of the benchmark LUN.
const IQN: &str = "iqn.2026-12.org.strata.bench:lun";
/// The load generator's initiator name.
const INITIATOR: &str = "iqn.2026-12.org.strata.bench:client";
/// How long a target may take to accept connections.
const START_WAIT: Duration = Duration::from_secs(20);

/// One of the compared targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// stratad `--iscsi-portal`/`--iscsi-target` on a raw disk.
    Stratad,
    /// tgt's tgtd.
    Tgtd,
}

impl Target {
    /// The name printed in the table.
    pub fn name(self) -> &'static str {
        match self {
            Target::Stratad => "stratad",
            Target::Tgtd => "tgtd",
        }
    }
}

/// A running target process; killed on drop (tgtd ignores SIGTERM).
#[derive(Debug)]
struct Running {
    child: Child,
    portal: SocketAddr,
    lun: u64,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(
    target: Target,
    stratad: &Path,
    image: &Path,
    dir: &Path,
    cpu: usize,
    run: u64,
) -> anyhow::Result<Running> {
    let portal = free_loopback_addr()?;
    let (child, lun) = match target {
        Target::Stratad => {
            // taskset pins every thread (login thread included), --cpus the reactor.
            let child = Command::new("taskset")
                .args(["-c", &cpu.to_string()])
                .arg(stratad)
                .args(["--cpus", &cpu.to_string(), "--disk"])
                .arg(format!("backend=raw,path={},name=lun0", image.display()))
                .args(["--iscsi-portal", &portal.to_string(), "--iscsi-target"])
                .arg(format!("iqn={IQN},disk=lun0"))
                .arg("--iscsi-state-dir")
                .arg(dir.join(format!("iscsi-state{run}")))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("spawn stratad")?;
            (child, 0)
        }
        Target::Tgtd => {
            let control = (1000 + (std::process::id() as u64 * 3 + run) % 27_000).to_string();
            let child = Command::new("taskset")
                .args([
                    "-c",
                    &cpu.to_string(),
                    "tgtd",
                    "-f",
                    "-C",
                    &control,
                    "--iscsi",
                ])
                .arg(format!("portal={portal}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("spawn tgtd")?;
            let adm = |args: &[&str]| -> anyhow::Result<bool> {
                Ok(Command::new("tgtadm")
                    .args(["-C", &control, "--lld", "iscsi"])
                    .args(args)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()?
                    .success())
            };
            let t0 = Instant::now();
            while !adm(&["--op", "show", "--mode", "target"])? {
                if t0.elapsed() > START_WAIT {
                    bail!("tgtd did not come up");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let img = image.display().to_string();
            for args in [
                vec!["--op", "new", "--mode", "target", "--tid", "1", "-T", IQN],
                vec![
                    "--op",
                    "new",
                    "--mode",
                    "logicalunit",
                    "--tid",
                    "1",
                    "--lun",
                    "1",
                    "-b",
                    &img,
                ],
                vec![
                    "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL",
                ],
            ] {
                if !adm(&args)? {
                    bail!("tgtadm {args:?} failed");
                }
            }
            (child, 1)
        }
    };
    let r = Running { child, portal, lun };
    let t0 = Instant::now();
    while std::net::TcpStream::connect(portal).is_err() {
        if t0.elapsed() > START_WAIT {
            bail!("{} portal {portal} did not come up", target.name());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(r)
}

/// One measurement (one row of `--json`).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Measurement {
    pub target: Target,
    pub op: initiator::Op,
    pub qd: usize,
    pub round: u32,
    pub ios: u64,
    pub seconds: f64,
    pub iops: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Target process CPU (utime + stime) per I/O.
    pub cpu_us_per_io: f64,
    /// Share of the two CPUs that went to neither the target nor the load generator.
    pub other_cpu_pct: f64,
}

/// What the scenario needs from the command line.
pub struct Plan<'a> {
    pub stratad: &'a Path,
    pub image: &'a Path,
    /// Scratch directory (stratad's persistent-reservation state).
    pub dir: &'a Path,
    pub targets: &'a [Target],
    pub qds: &'a [u32],
    pub rounds: u32,
    pub warmup: Duration,
    pub seconds: Duration,
    pub server_cpu: usize,
    pub client_cpu: usize,
    /// A run with more other work than this (percent) is measured again...
    pub max_other: f64,
    /// ...up to this many times.
    pub retries: u32,
    pub seed: u64,
    /// Waits for the CPUs to go quiet before a run.
    pub wait_quiet: &'a dyn Fn() -> anyhow::Result<()>,
}

impl std::fmt::Debug for Plan<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("targets", &self.targets)
            .field("qds", &self.qds)
            .field("rounds", &self.rounds)
            .finish_non_exhaustive()
    }
}

/// Starts `target` fresh, logs in and runs one measurement.
fn measure(
    plan: &Plan<'_>,
    target: Target,
    op: initiator::Op,
    qd: u32,
    round: u32,
    run_no: u64,
    hist: &mut Histogram,
) -> anyhow::Result<Measurement> {
    let t = start(
        target,
        plan.stratad,
        plan.image,
        plan.dir,
        plan.server_cpu,
        run_no,
    )?;
    let mut s = initiator::Session::login(t.portal, INITIATOR, IQN, t.lun)?;
    let mut clock = CpuClock::open(t.child.id())?;
    let mut system = SystemCpu::open(&[plan.server_cpu, plan.client_cpu])?;
    let mut start_marks = None;
    hist.reset();
    let workload = initiator::Workload {
        op,
        qd: qd as usize,
        warmup: plan.warmup,
        seconds: plan.seconds,
        seed: plan.seed.wrapping_add(run_no),
    };
    let r = initiator::run(&mut s, &workload, hist, || {
        start_marks = Some((clock.read()?, system.read()?.busy, self_cpu_time()));
        Ok(())
    })?;
    let (c1, busy1, me1) = (clock.read()?, system.read()?.busy, self_cpu_time());
    let (c0, busy0, me0) = start_marks.unwrap_or((c1, busy1, me1));
    let secs = r.elapsed.as_secs_f64();
    let target_cpu = c1.saturating_sub(c0);
    let other = busy1
        .saturating_sub(busy0)
        .saturating_sub(target_cpu + me1.saturating_sub(me0));
    let span = secs * system.cpu_count() as f64;
    Ok(Measurement {
        target,
        op,
        qd: qd as usize,
        round,
        ios: r.ios,
        seconds: secs,
        iops: r.ios as f64 / secs,
        p50_us: hist.quantile(0.5) as f64 / 1000.0,
        p99_us: hist.quantile(0.99) as f64 / 1000.0,
        cpu_us_per_io: target_cpu.as_secs_f64() * 1e6 / r.ios.max(1) as f64,
        other_cpu_pct: 100.0 * other.as_secs_f64() / span,
    })
}

/// Runs every (op, qd) cell, targets alternating within each round; prints one line per run
/// and the table of medians at the end.
pub fn run(plan: &Plan<'_>) -> anyhow::Result<Vec<Measurement>> {
    let mut out = Vec::new();
    let mut hist = Histogram::new();
    let mut run_no = 0u64;
    for op in [initiator::Op::Read, initiator::Op::Write] {
        for &qd in plan.qds {
            for round in 0..plan.rounds {
                for &target in plan.targets {
                    let mut retries = 0;
                    let m = loop {
                        if crate::STOP.load(std::sync::atomic::Ordering::Relaxed) {
                            bail!("interrupted");
                        }
                        (plan.wait_quiet)()?;
                        run_no += 1;
                        let m = measure(plan, target, op, qd, round, run_no, &mut hist)?;
                        eprintln!(
                            "{} {:?} qd {qd} round {round}: {:.0} IOPS, p50 {:.1} µs, p99 {:.1} µs, \
                             target CPU {:.1} µs/IO, other {:.1}%",
                            target.name(),
                            op,
                            m.iops,
                            m.p50_us,
                            m.p99_us,
                            m.cpu_us_per_io,
                            m.other_cpu_pct
                        );
                        if m.other_cpu_pct <= plan.max_other || retries >= plan.retries {
                            break m;
                        }
                        retries += 1;
                        eprintln!(
                            "    disturbed, measuring again ({retries}/{})",
                            plan.retries
                        );
                    };
                    out.push(m);
                }
            }
        }
    }
    println!(
        "\nstrata-bench iSCSI: 4 KiB, {} s (+{} s warm-up) x {} rounds, medians; target CPU {}, \
         client CPU {}",
        plan.seconds.as_secs_f64(),
        plan.warmup.as_secs_f64(),
        plan.rounds,
        plan.server_cpu,
        plan.client_cpu
    );
    println!(
        "| target | workload | qd | IOPS | p50 µs | p99 µs | target CPU µs/IO | other % max |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut distinct = plan.targets.to_vec();
    distinct.dedup();
    for op in [initiator::Op::Read, initiator::Op::Write] {
        for &qd in plan.qds {
            for &target in &distinct {
                let cell: Vec<&Measurement> = out
                    .iter()
                    .filter(|m| m.target == target && m.op == op && m.qd == qd as usize)
                    .collect();
                let med = |f: fn(&Measurement) -> f64| {
                    let mut v: Vec<f64> = cell.iter().map(|m| f(m)).collect();
                    v.sort_by(|a, b| a.total_cmp(b));
                    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
                };
                let other_max = cell.iter().map(|m| m.other_cpu_pct).fold(0.0, f64::max);
                println!(
                    "| {} | rand{} | {qd} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} |",
                    target.name(),
                    if op == initiator::Op::Read {
                        "read"
                    } else {
                        "write"
                    },
                    med(|m| m.iops),
                    med(|m| m.p50_us),
                    med(|m| m.p99_us),
                    med(|m| m.cpu_us_per_io),
                    other_max
                );
            }
        }
    }
    Ok(out)
}
