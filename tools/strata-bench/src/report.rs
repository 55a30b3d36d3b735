//! Results: one [`Run`] per measurement, medians per table cell and side, A/B ratios, the printed
//! table and the JSON file.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use crate::histogram::{Histogram, LatencySummary};
use crate::load::{ClientMode, LoadResult, Workload};
use crate::server::{Backend, Counters, System};

/// One table cell: everything but the system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Cell {
    pub backend: Backend,
    #[serde(rename = "client")]
    pub mode: ClientMode,
    pub workload: Workload,
    /// Requests in flight per queue of each disk.
    pub qd: u32,
    pub queues: u32,
    /// Disks served by the one server (the client connects to each).
    pub disks: u32,
}

/// Raw figures of one measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    #[serde(flatten)]
    pub cell: Cell,
    pub system: System,
    pub label: String,
    pub round: u32,
    pub ios: u64,
    pub seconds: f64,
    pub iops: f64,
    pub latency: LatencySummary,
    pub server_cpu_us: f64,
    pub server_cpu_us_per_io: f64,
    pub client_cpu_us_per_io: f64,
    /// Busy time of the server and client CPUs spent on neither (other processes, kernel
    /// threads), in percent of those CPUs' time: the noise indicator.
    pub other_cpu_pct: f64,
    /// Hypervisor steal time on those CPUs, in percent of their time.
    pub steal_pct: f64,
    pub capacity: u64,
    pub server_exit_code: Option<i32>,
    /// Server resident memory (KiB) and threads at the end of the measured interval.
    pub server_rss_kib: u64,
    pub server_threads: u64,
    /// stratad's own counters over the measured interval (stratad and vmfs only).
    pub counters: Option<Counters>,
    /// stratad's busy time per I/O (its counters), in µs: CPU spent in loop iterations that
    /// found work, without the idle spinning that /proc counts as CPU time.
    pub busy_us_per_io: Option<f64>,
    /// The same in time-stamp-counter cycles per I/O (stratad's `busy_cycles`).
    pub busy_cycles_per_io: Option<f64>,
    /// Requests taken per loop iteration that found some, operations per io_uring submit,
    /// completions per reap, requests per guest notification.
    pub batch: Option<Batches>,
    /// Latency CDF points `[µs, fraction]` of the measured interval.
    pub cdf: Vec<[f64; 2]>,
}

/// Average batch sizes from stratad's counters.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Batches {
    pub requests_per_poll: f64,
    pub ops_per_submit: f64,
    pub completions_per_reap: f64,
    pub requests_per_notification: f64,
}

fn per(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

impl Batches {
    fn new(c: &Counters) -> Self {
        Batches {
            requests_per_poll: per(c.requests, c.pop_batches),
            ops_per_submit: per(c.submitted_ops, c.submits),
            completions_per_reap: per(c.reaped, c.reap_batches),
            requests_per_notification: per(c.requests, c.notifications),
        }
    }
}

impl Run {
    pub fn new(
        cell: &Cell,
        system: System,
        label: &str,
        round: u32,
        r: &LoadResult,
        hist: &Histogram,
        exit: Option<i32>,
    ) -> Self {
        let seconds = r.elapsed.as_secs_f64();
        let per_io = |d: std::time::Duration| {
            if r.ios == 0 {
                0.0
            } else {
                d.as_secs_f64() * 1e6 / r.ios as f64
            }
        };
        let cpu_time = seconds * r.cpus as f64;
        let pct = |d: std::time::Duration| {
            if cpu_time > 0.0 {
                100.0 * d.as_secs_f64() / cpu_time
            } else {
                0.0
            }
        };
        let other = r.machine.busy.saturating_sub(r.server_cpu + r.client_cpu);
        Run {
            cell: *cell,
            system,
            label: label.to_string(),
            round,
            ios: r.ios,
            seconds,
            iops: if seconds > 0.0 {
                r.ios as f64 / seconds
            } else {
                0.0
            },
            latency: hist.summary(),
            server_cpu_us: r.server_cpu.as_secs_f64() * 1e6,
            server_cpu_us_per_io: per_io(r.server_cpu),
            client_cpu_us_per_io: per_io(r.client_cpu),
            other_cpu_pct: pct(other),
            steal_pct: pct(r.machine.steal),
            capacity: r.capacity,
            server_exit_code: exit,
            server_rss_kib: r.rss_kib,
            server_threads: r.threads,
            counters: r.counters,
            busy_us_per_io: r.counters.map(|c| per(c.busy_s * 1e6, r.ios as f64)),
            busy_cycles_per_io: r.counters.map(|c| per(c.busy_cycles, r.ios as f64)),
            batch: r.counters.as_ref().map(Batches::new),
            cdf: hist.cdf(),
        }
    }

    /// Progress line printed after each run.
    pub fn one_line(&self) -> String {
        format!(
            "{} {} {} qd {} q {} disks {} round {}: {:<8} {:>9.1} kIOPS  p50 {:>8.1} us  p99 {:>8.1} us  srv {:>6.2} \
             us/IO  cli {:>6.2} us/IO  other {:>4.1}%  steal {:>4.1}%  exit {:?}",
            self.cell.backend.name(),
            self.cell.mode.name(),
            self.cell.workload.name(),
            self.cell.qd,
            self.cell.queues,
            self.cell.disks,
            self.round + 1,
            self.label,
            self.iops / 1e3,
            self.latency.p50_us,
            self.latency.p99_us,
            self.server_cpu_us_per_io,
            self.client_cpu_us_per_io,
            self.other_cpu_pct,
            self.steal_pct,
            self.server_exit_code,
        )
    }
}

/// Medians of one side of one cell.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct SideSummary {
    pub runs: usize,
    pub iops_median: f64,
    pub iops_min: f64,
    pub iops_max: f64,
    pub p50_us_median: f64,
    pub p99_us_median: f64,
    pub server_cpu_us_per_io_median: f64,
    pub client_cpu_us_per_io_median: f64,
    pub other_cpu_pct_max: f64,
    /// stratad's busy µs per I/O from its counters (0 for QSD, which has none).
    pub busy_us_per_io_median: f64,
    pub rss_kib_max: u64,
    pub threads_max: u64,
}

/// One cell's two sides and their ratios (A / B).
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    #[serde(flatten)]
    pub cell: Cell,
    pub a: SideSummary,
    pub b: SideSummary,
    pub ratio_iops: f64,
    pub ratio_p50: f64,
    pub ratio_p99: f64,
    pub ratio_server_cpu_per_io: f64,
}

/// Display names of the two sides: the system names, or `qsd(A)`/`qsd(B)` when both are equal.
pub fn labels(systems: &[System]) -> [String; 2] {
    match systems {
        [a, b] if a != b => [a.name().to_string(), b.name().to_string()],
        [a, ..] => [format!("{}(A)", a.name()), format!("{}(B)", a.name())],
        [] => ["A".into(), "B".into()],
    }
}

/// The median of `v` (0 for none; the mean of the middle two for an even count).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn side(runs: &[&Run]) -> SideSummary {
    let col = |f: fn(&Run) -> f64| runs.iter().map(|r| f(r)).collect::<Vec<f64>>();
    let iops = col(|r| r.iops);
    SideSummary {
        runs: runs.len(),
        iops_median: median(iops.clone()),
        iops_min: iops.iter().copied().fold(f64::INFINITY, f64::min),
        iops_max: iops.iter().copied().fold(0.0, f64::max),
        p50_us_median: median(col(|r| r.latency.p50_us)),
        p99_us_median: median(col(|r| r.latency.p99_us)),
        server_cpu_us_per_io_median: median(col(|r| r.server_cpu_us_per_io)),
        client_cpu_us_per_io_median: median(col(|r| r.client_cpu_us_per_io)),
        other_cpu_pct_max: runs.iter().map(|r| r.other_cpu_pct).fold(0.0, f64::max),
        busy_us_per_io_median: median(col(|r| r.busy_us_per_io.unwrap_or(0.0))),
        rss_kib_max: runs.iter().map(|r| r.server_rss_kib).max().unwrap_or(0),
        threads_max: runs.iter().map(|r| r.server_threads).max().unwrap_or(0),
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        f64::NAN
    } else {
        a / b
    }
}

/// Groups runs by cell (in first-seen order) and computes medians and ratios.
pub fn summarize(runs: &[Run], labels: &[String; 2]) -> Vec<Row> {
    let mut cells: Vec<Cell> = Vec::new();
    for r in runs {
        if !cells.contains(&r.cell) {
            cells.push(r.cell);
        }
    }
    cells
        .into_iter()
        .map(|cell| {
            let pick = |label: &str| -> Vec<&Run> {
                runs.iter()
                    .filter(|r| r.cell == cell && r.label == label)
                    .collect()
            };
            let a = side(&pick(&labels[0]));
            let b = side(&pick(&labels[1]));
            Row {
                cell,
                a,
                b,
                ratio_iops: ratio(a.iops_median, b.iops_median),
                ratio_p50: ratio(a.p50_us_median, b.p50_us_median),
                ratio_p99: ratio(a.p99_us_median, b.p99_us_median),
                ratio_server_cpu_per_io: ratio(
                    a.server_cpu_us_per_io_median,
                    b.server_cpu_us_per_io_median,
                ),
            }
        })
        .collect()
}

/// The printed table: two lines per cell (A, B) and a ratio line.
/// `max_other`: the share of other work (percent) above which the table warns.
pub fn table(rows: &[Row], labels: &[String; 2], max_other: f64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<5} {:<6} {:<10} {:>4} {:>2} {:>3}  {:<11} {:>9} {:>19} {:>9} {:>9} {:>10} {:>10} {:>9} {:>7} {:>4} {:>7}",
        "back",
        "client",
        "workload",
        "qd",
        "q",
        "dsk",
        "system",
        "kIOPS",
        "(min-max)",
        "p50 us",
        "p99 us",
        "srv us/IO",
        "cli us/IO",
        "busy us/IO",
        "RSS MiB",
        "thr",
        "other%"
    );
    for row in rows {
        let c = &row.cell;
        for (label, s) in [(&labels[0], &row.a), (&labels[1], &row.b)] {
            let _ = writeln!(
                out,
                "{:<5} {:<6} {:<10} {:>4} {:>2} {:>3}  {:<11} {:>9.1} {:>19} {:>9.1} {:>9.1} {:>10.2} {:>10.2} {:>9} {:>7.1} {:>4} {:>7.1}",
                c.backend.name(),
                c.mode.name(),
                c.workload.name(),
                c.qd,
                c.queues,
                c.disks,
                label,
                s.iops_median / 1e3,
                format!("({:.1}-{:.1})", s.iops_min / 1e3, s.iops_max / 1e3),
                s.p50_us_median,
                s.p99_us_median,
                s.server_cpu_us_per_io_median,
                s.client_cpu_us_per_io_median,
                if s.busy_us_per_io_median > 0.0 {
                    format!("{:.3}", s.busy_us_per_io_median)
                } else {
                    "-".to_string()
                },
                s.rss_kib_max as f64 / 1024.0,
                s.threads_max,
                s.other_cpu_pct_max,
            );
        }
        let _ = writeln!(
            out,
            "{:<36}  {:<11} {:>9.2} {:>19} {:>9.2} {:>9.2} {:>10.2}",
            "",
            format!("{}/{}", short(&labels[0]), short(&labels[1])),
            row.ratio_iops,
            "",
            row.ratio_p50,
            row.ratio_p99,
            row.ratio_server_cpu_per_io,
        );
    }
    let worst = rows
        .iter()
        .flat_map(|r| [r.a.other_cpu_pct_max, r.b.other_cpu_pct_max])
        .fold(0.0, f64::max);
    let _ = writeln!(
        out,
        "medians over rounds; ratios are A/B; other% = the largest share of the two CPUs that went \
         to neither server nor client in any run of that line"
    );
    if worst > max_other {
        let _ = writeln!(
            out,
            "warning: up to {worst:.1}% of the CPUs went to other work during a run: these \
             figures are disturbed, rerun on a quiet machine"
        );
    }
    out
}

/// "stratad" -> "Strata", "qsd" -> "QSD", "qsd(A)" -> "A".
fn short(label: &str) -> String {
    match label {
        "stratad" => "Strata".into(),
        "qsd" => "QSD".into(),
        l => l
            .split_once('(')
            .map(|(_, r)| r.trim_end_matches(')').to_string())
            .unwrap_or_else(|| l.to_string()),
    }
}

/// Writes settings, every run and the summary rows.
pub fn write_json(
    path: &Path,
    settings: &serde_json::Value,
    runs: &[Run],
    rows: &[Row],
    idle: &[crate::IdleResult],
) -> anyhow::Result<()> {
    let doc = serde_json::json!({
        "settings": settings, "runs": runs, "summary": rows, "idle": idle,
    });
    let text = serde_json::to_string_pretty(&doc).context("serialise results")?;
    std::fs::write(path, text + "\n").with_context(|| format!("write {}", path.display()))
}
