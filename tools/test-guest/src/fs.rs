//! vhost-user-fs workloads for the fs guest ([`GuestVariant::Fs`](crate::GuestVariant::Fs)) and
//! parsers for their output.
//!
//! [`fs_script`] renders one guest script that mounts a share (`mount -t virtiofs TAG
//! /mnt/TAG`) and runs [`FsWorkload`]s one after the other, each in a fresh directory of the
//! share, between section markers:
//!
//! ```text
//! STRATA-FS-MOUNTED <tag>
//! STRATA-FS-BEGIN <name>
//! ... the workload's output ...
//! STRATA-FS-END <name> rc=<exit code> ns=<guest wall time>
//! ```
//!
//! [`FsReport::parse`] splits the script output back into [`FsSection`]s and parses what it
//! knows: pjdfstest's summary ([`PjdfstestSummary`]), the metadata benchmark's phases
//! ([`MetaPhase`]) and fio's IOPS ([`FioSummary`]).

use std::fmt::Write as _;
use std::time::Duration;

use crate::fio::FioJob;

/// Printed after a successful mount, with the tag.
pub const MOUNTED_MARKER: &str = "STRATA-FS-MOUNTED ";
/// Printed before a workload, with its name.
pub const BEGIN_MARKER: &str = "STRATA-FS-BEGIN ";
/// Printed after a workload: `STRATA-FS-END <name> rc=<code> ns=<nanoseconds>`.
pub const END_MARKER: &str = "STRATA-FS-END ";
/// The script's exit code when the mount fails.
pub const MOUNT_FAILED_EXIT: i32 = 90;
/// Default file count of [`FsWorkload::Meta`].
pub const DEFAULT_META_FILES: u32 = 10_000;

/// One workload run in the mounted share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsWorkload {
    /// pjdfstest 0.2.2 with /etc/pjdfstest.toml (features posix_fallocate, utimensat,
    /// utime_now; naptime 0.01), optionally only the tests whose names contain a pattern.
    Pjdfstest {
        /// Test name filters (substring match); empty runs all 398 tests.
        patterns: Vec<String>,
    },
    /// `strata-fsutil meta`: create, stat, chmod 0600 and unlink `files` files, one syscall
    /// per file and phase, timed per phase.
    Meta {
        /// Number of files.
        files: u32,
        /// Drop the guest's caches before each phase (lookups go to the server again).
        drop_caches: bool,
    },
    /// fio 4 KiB random 50/50 read/write, libaio, O_DIRECT, on one file in the share.
    FioRandrw {
        /// The file's size (fio `--size`, e.g. "128M").
        size: String,
        /// Time-based runtime in seconds (after laying out the file).
        runtime_secs: u32,
        /// `--iodepth`.
        iodepth: u32,
    },
    /// A caller's script (busybox sh), run with `MNT` (the mount point) and `DIR` (its fresh
    /// directory in the share, also the working directory) in the environment.
    Script {
        /// Section name.
        name: String,
        /// The script text.
        body: String,
    },
}

impl FsWorkload {
    /// All of pjdfstest.
    pub fn pjdfstest() -> Self {
        FsWorkload::Pjdfstest {
            patterns: Vec::new(),
        }
    }

    /// The metadata benchmark on [`DEFAULT_META_FILES`] files, caches kept.
    pub fn meta() -> Self {
        FsWorkload::Meta {
            files: DEFAULT_META_FILES,
            drop_caches: false,
        }
    }

    /// fio randrw on a 128 MiB file for 20 s at iodepth 16.
    pub fn fio_randrw() -> Self {
        FsWorkload::FioRandrw {
            size: "128M".to_string(),
            runtime_secs: 20,
            iodepth: 16,
        }
    }

    /// The section name: `pjdfstest`, `meta`, `fio-randrw` or the script's name.
    pub fn name(&self) -> &str {
        match self {
            FsWorkload::Pjdfstest { .. } => "pjdfstest",
            FsWorkload::Meta { .. } => "meta",
            FsWorkload::FioRandrw { .. } => "fio-randrw",
            FsWorkload::Script { name, .. } => name,
        }
    }

    /// Shell commands run in a subshell with `$DIR` (a fresh directory in the share) as the
    /// working directory.
    fn commands(&self, index: usize) -> String {
        match self {
            FsWorkload::Pjdfstest { patterns } => {
                let mut cmd =
                    String::from("NO_COLOR=1 pjdfstest -c /etc/pjdfstest.toml -p \"$DIR\"");
                for pat in patterns {
                    cmd.push(' ');
                    cmd.push_str(&shell_quote(pat));
                }
                cmd
            }
            FsWorkload::Meta { files, drop_caches } => format!(
                "strata-fsutil meta \"$DIR/meta\" {files}{}",
                if *drop_caches { " --drop-caches" } else { "" }
            ),
            FsWorkload::FioRandrw {
                size,
                runtime_secs,
                iodepth,
            } => {
                let mut job = FioJob::new("fs-randrw", "$DIR/fio.dat", "randrw", "4k")
                    .size(size)
                    .iodepth(*iodepth);
                job.runtime_secs = Some(*runtime_secs);
                // fio's layout of the file is not part of the measurement; unlink afterwards.
                format!("{} && rm -f \"$DIR/fio.dat\"", job.command())
            }
            FsWorkload::Script { body, .. } => {
                let delim = format!("STRATA_FS_SCRIPT_{index}_EOF");
                format!(
                    "cat >/tmp/strata-fs-script-{index}.sh <<'{delim}'\n{body}\n{delim}\nsh /tmp/strata-fs-script-{index}.sh"
                )
            }
        }
    }
}

/// The guest script: mount `tag` on `/mnt/<tag>` (options `mount_opts`, e.g. "" or
/// "-o dax"), run `workloads` each in `/mnt/<tag>/strata-<name>.<pid>` (removed afterwards),
/// unmount. Exits 0 if every workload exited 0, 1 otherwise, [`MOUNT_FAILED_EXIT`] if the
/// mount failed.
pub fn fs_script(tag: &str, mount_opts: &str, workloads: &[FsWorkload]) -> String {
    let tag_q = shell_quote(tag);
    let mnt = shell_quote(&format!("/mnt/{tag}"));
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"echo "guest: Linux $(uname -r), $(grep -c ^processor /proc/cpuinfo) vCPU(s), $(awk '/MemTotal/ {{print $2 / 1024}}' /proc/meminfo) MiB"
MNT={mnt}
mkdir -p "$MNT"
tries=0
until mount -t virtiofs {mount_opts} {tag_q} "$MNT"; do
    tries=$((tries + 1))
    if [ "$tries" -ge 20 ]; then
        echo "mount -t virtiofs {tag} failed"
        exit {MOUNT_FAILED_EXIT}
    fi
    sleep 0.2
done
echo "{MOUNTED_MARKER}{tag}"
grep " $MNT " /proc/mounts
export MNT
overall=0"#
    );
    for (i, w) in workloads.iter().enumerate() {
        let name = w.name();
        let dir = shell_quote(&format!("strata-{}.", sanitize(name)));
        let _ = writeln!(
            s,
            r#"DIR="$MNT/"{dir}$$
rm -rf "$DIR"; mkdir -p "$DIR"
export DIR
echo "{BEGIN_MARKER}{name}"
t0=$(strata-fsutil now)
(
cd "$DIR" || exit 1
{cmds}
)
rc=$?
t1=$(strata-fsutil now)
echo "{END_MARKER}{name} rc=$rc ns=$((t1 - t0))"
[ "$rc" -eq 0 ] || overall=1
cd /
rm -rf "$DIR""#,
            cmds = w.commands(i)
        );
    }
    s.push_str("cd /\nsync\numount \"$MNT\" || echo \"umount $MNT failed\"\nexit $overall\n");
    s
}

/// `s` in single quotes for busybox sh.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A section name as a file-name part.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `text` without ANSI escape sequences (pjdfstest colours its output when it thinks it may).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // CSI: parameters and intermediates up to a final byte in @..~.
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            } else {
                // Two-character escapes such as ESC ( B.
                chars.next();
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// One failed pjdfstest test case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PjdfstestFailure {
    /// The test's name (e.g. `chmod::eperm_not_owner`).
    pub name: String,
    /// The panic message (the indented lines after the FAILED line), or "PASSED UNEXPECTEDLY".
    pub message: String,
}

/// pjdfstest's result: its `Summary:` line and the names of failed and skipped tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PjdfstestSummary {
    /// Passed tests.
    pub passed: u32,
    /// Failed tests, unexpected passes included (as pjdfstest counts them).
    pub failed: u32,
    /// Skipped tests (missing features, remounts not allowed, ...).
    pub skipped: u32,
    /// Failures listed in `expected_failures`.
    pub expected_failures: u32,
    /// All tests.
    pub total: u32,
    /// The failed tests with their messages.
    pub failures: Vec<PjdfstestFailure>,
    /// The names of skipped tests.
    pub skipped_names: Vec<String>,
}

impl PjdfstestSummary {
    /// Parses pjdfstest's output; `None` without a `Summary:` line (it did not finish).
    ///
    /// Per test, pjdfstest prints `<name> <padding> ok|skipped|FAILED|PASSED UNEXPECTEDLY|failed
    /// as expected`, then tab-indented detail lines (skip reasons, the panic message), and at
    /// the end `Summary: F failed, S skipped, P passed, E expected failures, T total`.
    pub fn parse(output: &str) -> Option<Self> {
        let text = strip_ansi(output);
        let mut summary = PjdfstestSummary::default();
        let mut found = false;
        // Index in `failures` of the failure whose message lines are being collected.
        let mut collecting: Option<usize> = None;
        for line in text.lines() {
            if let Some(idx) = collecting {
                if let Some(detail) = line.strip_prefix('\t') {
                    let msg = &mut summary.failures[idx].message;
                    if !msg.is_empty() {
                        msg.push('\n');
                    }
                    msg.push_str(detail.trim_end());
                    continue;
                }
                if line.starts_with("Backtrace:") || line.starts_with("  ") {
                    continue;
                }
                collecting = None;
            }
            let trimmed = line.trim_end();
            if let Some(rest) = trimmed.strip_prefix("Summary:") {
                found = true;
                for part in rest.split(',') {
                    let mut words = part.split_whitespace();
                    let Some(n) = words.next().and_then(|n| n.parse::<u32>().ok()) else {
                        continue;
                    };
                    match words.collect::<Vec<_>>().join(" ").as_str() {
                        "failed" => summary.failed = n,
                        "skipped" => summary.skipped = n,
                        "passed" => summary.passed = n,
                        "expected failures" => summary.expected_failures = n,
                        "total" => summary.total = n,
                        _ => {}
                    }
                }
                continue;
            }
            let Some(name) = trimmed.split_whitespace().next() else {
                continue;
            };
            if !name.contains("::") {
                continue;
            }
            if trimmed.ends_with(" FAILED") {
                summary.failures.push(PjdfstestFailure {
                    name: name.to_string(),
                    message: String::new(),
                });
                collecting = Some(summary.failures.len() - 1);
            } else if trimmed.ends_with(" PASSED UNEXPECTEDLY") {
                summary.failures.push(PjdfstestFailure {
                    name: name.to_string(),
                    message: "PASSED UNEXPECTEDLY".to_string(),
                });
            } else if trimmed.ends_with(" skipped") {
                summary.skipped_names.push(name.to_string());
            }
        }
        found.then_some(summary)
    }
}

/// One phase of the metadata benchmark.
#[derive(Debug, Clone, PartialEq)]
pub struct MetaPhase {
    /// `create`, `stat`, `chmod` or `unlink`.
    pub phase: String,
    /// Files operated on.
    pub files: u64,
    /// Guest wall time of the phase.
    pub secs: f64,
    /// `files / secs`.
    pub ops_per_sec: f64,
}

/// Parses `meta <phase> files=N secs=S ops_per_sec=R` lines (strata-fsutil meta).
pub fn parse_meta(output: &str) -> Vec<MetaPhase> {
    output
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            if words.next()? != "meta" {
                return None;
            }
            let phase = words.next()?.to_string();
            let (mut files, mut secs, mut ops) = (None, None, None);
            for w in words {
                match w.split_once('=')? {
                    ("files", v) => files = v.parse().ok(),
                    ("secs", v) => secs = v.parse().ok(),
                    ("ops_per_sec", v) => ops = v.parse().ok(),
                    _ => {}
                }
            }
            Some(MetaPhase {
                phase,
                files: files?,
                secs: secs?,
                ops_per_sec: ops?,
            })
        })
        .collect()
}

/// fio's group-reported IOPS and bandwidth.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FioSummary {
    /// Read IOPS (0 when the job did not read).
    pub read_iops: f64,
    /// Write IOPS.
    pub write_iops: f64,
    /// Read bandwidth in KiB/s.
    pub read_kib_s: f64,
    /// Write bandwidth in KiB/s.
    pub write_kib_s: f64,
}

impl FioSummary {
    /// Parses fio's normal output (`  read: IOPS=1234, BW=4936KiB/s (...)` and the write line;
    /// IOPS may carry a k/M suffix); `None` if neither line is present.
    pub fn parse(output: &str) -> Option<Self> {
        let mut s = FioSummary::default();
        let mut found = false;
        for line in output.lines() {
            let line = line.trim_start();
            let (is_read, rest) = if let Some(r) = line.strip_prefix("read: IOPS=") {
                (true, r)
            } else if let Some(r) = line.strip_prefix("write: IOPS=") {
                (false, r)
            } else {
                continue;
            };
            let mut parts = rest.split(',');
            let iops = parts.next().and_then(parse_scaled).unwrap_or(0.0);
            let bw = parts
                .next()
                .and_then(|p| p.trim().strip_prefix("BW="))
                .and_then(|p| p.split_whitespace().next())
                .and_then(parse_bw_kib)
                .unwrap_or(0.0);
            found = true;
            if is_read {
                s.read_iops = iops;
                s.read_kib_s = bw;
            } else {
                s.write_iops = iops;
                s.write_kib_s = bw;
            }
        }
        found.then_some(s)
    }
}

/// `1234`, `12.3k`, `1.2M`.
fn parse_scaled(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()? {
        'k' => (&s[..s.len() - 1], 1e3),
        'M' => (&s[..s.len() - 1], 1e6),
        _ => (s, 1.0),
    };
    num.parse::<f64>().ok().map(|n| n * mult)
}

/// `4936KiB/s`, `12.3MiB/s`, `512B/s`, `1.1GiB/s` in KiB/s.
fn parse_bw_kib(s: &str) -> Option<f64> {
    let s = s.strip_suffix("/s")?;
    for (unit, kib) in [
        ("GiB", 1024.0 * 1024.0),
        ("MiB", 1024.0),
        ("KiB", 1.0),
        ("B", 1.0 / 1024.0),
    ] {
        if let Some(num) = s.strip_suffix(unit) {
            return num.parse::<f64>().ok().map(|n| n * kib);
        }
    }
    None
}

/// The output of one workload.
#[derive(Debug, Clone, PartialEq)]
pub struct FsSection {
    /// The workload's name.
    pub name: String,
    /// Its exit code; `None` if the end marker is missing (the guest died or timed out).
    pub rc: Option<i32>,
    /// Guest wall time between the markers.
    pub elapsed: Option<Duration>,
    /// The lines between the markers.
    pub output: String,
}

/// A parsed [`fs_script`] run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FsReport {
    /// Whether the mount marker was seen.
    pub mounted: bool,
    /// The sections, in order.
    pub sections: Vec<FsSection>,
}

impl FsReport {
    /// Splits the script's output at the markers.
    pub fn parse(output: &str) -> Self {
        let mut report = FsReport::default();
        let mut current: Option<FsSection> = None;
        for line in output.lines() {
            if line.starts_with(MOUNTED_MARKER) {
                report.mounted = true;
            } else if let Some(name) = line.strip_prefix(BEGIN_MARKER) {
                if let Some(open) = current.take() {
                    report.sections.push(open);
                }
                current = Some(FsSection {
                    name: name.trim().to_string(),
                    rc: None,
                    elapsed: None,
                    output: String::new(),
                });
            } else if let Some(rest) = line.strip_prefix(END_MARKER) {
                if let Some(mut sec) = current.take() {
                    for word in rest.split_whitespace() {
                        match word.split_once('=') {
                            Some(("rc", v)) => sec.rc = v.parse().ok(),
                            Some(("ns", v)) => {
                                sec.elapsed = v.parse::<u64>().ok().map(Duration::from_nanos)
                            }
                            _ => {}
                        }
                    }
                    report.sections.push(sec);
                }
            } else if let Some(sec) = current.as_mut() {
                sec.output.push_str(line);
                sec.output.push('\n');
            }
        }
        if let Some(open) = current {
            report.sections.push(open);
        }
        report
    }

    /// The section called `name`.
    pub fn section(&self, name: &str) -> Option<&FsSection> {
        self.sections.iter().find(|s| s.name == name)
    }

    /// pjdfstest's summary, if it ran and finished.
    pub fn pjdfstest(&self) -> Option<PjdfstestSummary> {
        PjdfstestSummary::parse(&self.section("pjdfstest")?.output)
    }

    /// The metadata benchmark's phases (empty if it did not run).
    pub fn meta(&self) -> Vec<MetaPhase> {
        self.section("meta")
            .map(|s| parse_meta(&s.output))
            .unwrap_or_default()
    }

    /// fio's summary, if the fio workload ran.
    pub fn fio(&self) -> Option<FioSummary> {
        FioSummary::parse(&self.section("fio-randrw")?.output)
    }

    /// Whether the share was mounted, every section ended with exit code 0 and pjdfstest (if
    /// it ran) reported no failure.
    pub fn success(&self) -> bool {
        self.mounted
            && self.sections.iter().all(|s| s.rc == Some(0))
            && self.pjdfstest().is_none_or(|p| p.failed == 0)
    }

    /// A JSON object: `mounted`, `success`, and per section `name`, `rc`, `secs`, plus
    /// `pjdfstest` / `meta` / `fio` results where parsed.
    pub fn to_json(&self) -> String {
        let mut j = String::new();
        let _ = write!(
            j,
            "{{\"mounted\":{},\"success\":{},\"sections\":[",
            self.mounted,
            self.success()
        );
        for (i, s) in self.sections.iter().enumerate() {
            if i > 0 {
                j.push(',');
            }
            let _ = write!(
                j,
                "{{\"name\":{},\"rc\":{},\"secs\":{}}}",
                json_str(&s.name),
                s.rc.map_or("null".to_string(), |r| r.to_string()),
                s.elapsed
                    .map_or("null".to_string(), |d| format!("{:.3}", d.as_secs_f64()))
            );
        }
        j.push(']');
        if let Some(p) = self.pjdfstest() {
            let _ = write!(
                j,
                ",\"pjdfstest\":{{\"passed\":{},\"failed\":{},\"skipped\":{},\"expected_failures\":{},\"total\":{},\"failures\":[",
                p.passed, p.failed, p.skipped, p.expected_failures, p.total
            );
            for (i, f) in p.failures.iter().enumerate() {
                if i > 0 {
                    j.push(',');
                }
                let _ = write!(
                    j,
                    "{{\"name\":{},\"message\":{}}}",
                    json_str(&f.name),
                    json_str(&f.message)
                );
            }
            j.push_str("],\"skipped_names\":[");
            let names: Vec<String> = p.skipped_names.iter().map(|n| json_str(n)).collect();
            j.push_str(&names.join(","));
            j.push_str("]}");
        }
        let meta = self.meta();
        if !meta.is_empty() {
            j.push_str(",\"meta\":[");
            for (i, m) in meta.iter().enumerate() {
                if i > 0 {
                    j.push(',');
                }
                let _ = write!(
                    j,
                    "{{\"phase\":{},\"files\":{},\"secs\":{:.6},\"ops_per_sec\":{:.0}}}",
                    json_str(&m.phase),
                    m.files,
                    m.secs,
                    m.ops_per_sec
                );
            }
            j.push(']');
        }
        if let Some(f) = self.fio() {
            let _ = write!(
                j,
                ",\"fio\":{{\"read_iops\":{:.0},\"write_iops\":{:.0},\"read_kib_s\":{:.0},\"write_kib_s\":{:.0}}}",
                f.read_iops, f.write_iops, f.read_kib_s, f.write_kib_s
            );
        }
        j.push('}');
        j
    }

    /// A few human-readable lines: one per section, with the parsed results.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        if !self.mounted {
            out.push_str("mount: FAILED\n");
        }
        for s in &self.sections {
            let rc =
                s.rc.map_or("none (did not finish)".to_string(), |r| r.to_string());
            let secs = s
                .elapsed
                .map_or("?".to_string(), |d| format!("{:.1} s", d.as_secs_f64()));
            let _ = writeln!(out, "{}: exit {rc}, {secs}", s.name);
            match s.name.as_str() {
                "pjdfstest" => match PjdfstestSummary::parse(&s.output) {
                    Some(p) => {
                        let _ = writeln!(
                            out,
                            "  {} passed, {} failed, {} skipped, {} expected failures, {} total",
                            p.passed, p.failed, p.skipped, p.expected_failures, p.total
                        );
                        for f in &p.failures {
                            let first = f.message.lines().next().unwrap_or("");
                            let _ = writeln!(out, "  FAILED {}: {first}", f.name);
                        }
                    }
                    None => out.push_str("  no pjdfstest summary\n"),
                },
                "meta" => {
                    for m in parse_meta(&s.output) {
                        let _ = writeln!(
                            out,
                            "  {:<7} {:>7} files {:>9.3} s {:>10.0} ops/s",
                            m.phase, m.files, m.secs, m.ops_per_sec
                        );
                    }
                }
                "fio-randrw" => match FioSummary::parse(&s.output) {
                    Some(f) => {
                        let _ = writeln!(
                            out,
                            "  read {:.0} IOPS ({:.0} KiB/s), write {:.0} IOPS ({:.0} KiB/s)",
                            f.read_iops, f.read_kib_s, f.write_iops, f.write_kib_s
                        );
                    }
                    None => out.push_str("  no fio result\n"),
                },
                _ => {}
            }
        }
        out
    }
}

/// `s` as a JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const PJD: &str = "\
chmod::ok_case                                                                ok
chown::erofs_named                                                       skipped
\tRemounts (allow_remount) are not allowed in the configuration file
\x1b[34mopen::bad_case\x1b[0m                                                          \x1b[31mFAILED\x1b[0m
\tassertion `left == right` failed
\t  left: EACCES
link::weird                                                  PASSED UNEXPECTEDLY
rename::x                                                         ok

\x1b[1;32mSummary\x1b[0m: 2 failed, 1 skipped, 2 passed, 0 expected failures, 5 total
";

    #[test]
    fn parses_pjdfstest_summary_and_failures() {
        let s = PjdfstestSummary::parse(PJD).unwrap();
        assert_eq!(
            (s.passed, s.failed, s.skipped, s.expected_failures, s.total),
            (2, 2, 1, 0, 5)
        );
        assert_eq!(s.failures.len(), 2);
        assert_eq!(s.failures[0].name, "open::bad_case");
        assert_eq!(
            s.failures[0].message,
            "assertion `left == right` failed\n  left: EACCES"
        );
        assert_eq!(s.failures[1].name, "link::weird");
        assert_eq!(s.skipped_names, vec!["chown::erofs_named".to_string()]);
        assert!(PjdfstestSummary::parse("chmod::x ok\n").is_none());
        let real = "Summary: 0 failed, 23 skipped, 375 passed, 0 expected failures, 398 total";
        let r = PjdfstestSummary::parse(real).unwrap();
        assert_eq!((r.passed, r.failed, r.skipped, r.total), (375, 0, 23, 398));
    }

    #[test]
    fn parses_meta_and_fio() {
        let m = parse_meta(
            "meta create files=2000 secs=2.642305 ops_per_sec=757\nnoise\nmeta stat files=2000 secs=0.239068 ops_per_sec=8366\n",
        );
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].phase, "stat");
        assert_eq!(m[1].ops_per_sec, 8366.0);
        let fio = "fs-randrw: (groupid=0, jobs=1): err= 0: pid=80\n  read: IOPS=1234, BW=4936KiB/s (5054kB/s)(96.5MiB/20001msec)\n  write: IOPS=12.5k, BW=48.8MiB/s (51.2MB/s)(977MiB/20001msec); 0 zone resets\n";
        let f = FioSummary::parse(fio).unwrap();
        assert_eq!(f.read_iops, 1234.0);
        assert_eq!(f.read_kib_s, 4936.0);
        assert_eq!(f.write_iops, 12500.0);
        assert!((f.write_kib_s - 48.8 * 1024.0).abs() < 0.01);
        assert!(FioSummary::parse("nothing").is_none());
    }

    #[test]
    fn report_splits_sections() {
        let out = format!(
            "guest: Linux\n{MOUNTED_MARKER}fs\n{BEGIN_MARKER}pjdfstest\n{PJD}{END_MARKER}pjdfstest rc=1 ns=7250000000\n{BEGIN_MARKER}meta\nmeta create files=10 secs=0.5 ops_per_sec=20\n{END_MARKER}meta rc=0 ns=1000\n{BEGIN_MARKER}fio-randrw\nhalf"
        );
        let r = FsReport::parse(&out);
        assert!(r.mounted);
        assert_eq!(r.sections.len(), 3);
        assert_eq!(r.sections[0].rc, Some(1));
        assert_eq!(r.sections[0].elapsed, Some(Duration::from_millis(7250)));
        assert_eq!(r.pjdfstest().unwrap().failed, 2);
        assert_eq!(r.meta()[0].files, 10);
        assert_eq!(r.sections[2].rc, None);
        assert!(!r.success());
        let json = r.to_json();
        assert!(json.starts_with("{\"mounted\":true,\"success\":false,"));
        assert!(json.contains("\"pjdfstest\":{\"passed\":2,\"failed\":2,"));
        assert!(json.contains("\"message\":\"assertion `left == right` failed\\n  left: EACCES\""));
        assert!(r.summary().contains("FAILED open::bad_case"));
    }

    #[test]
    fn script_mounts_and_brackets_workloads() {
        let s = fs_script(
            "fs",
            "",
            &[
                FsWorkload::pjdfstest(),
                FsWorkload::Pjdfstest {
                    patterns: vec!["chmod".into()],
                },
                FsWorkload::meta(),
                FsWorkload::fio_randrw(),
                FsWorkload::Script {
                    name: "mine".into(),
                    body: "echo hi".into(),
                },
            ],
        );
        assert!(s.contains("mount -t virtiofs  'fs' \"$MNT\""));
        assert!(s.contains("NO_COLOR=1 pjdfstest -c /etc/pjdfstest.toml -p \"$DIR\" 'chmod'"));
        assert!(s.contains("strata-fsutil meta \"$DIR/meta\" 10000"));
        assert!(s.contains("--filename=$DIR/fio.dat --rw=randrw --bs=4k --size=128M"));
        assert!(s.contains("<<'STRATA_FS_SCRIPT_4_EOF'\necho hi\nSTRATA_FS_SCRIPT_4_EOF\n"));
        assert!(s.contains("echo \"STRATA-FS-END mine rc=$rc ns=$((t1 - t0))\""));
    }
}
