//! libiscsi's conformance suite (`iscsi-test-cu`): its verbose CUnit output parsed into one
//! outcome per test, the expected-results files (tests/expected/iscsi-test-cu/TARGET.txt) and
//! the comparison of the two.
//!
//! Output shape (CUnit 2.1 verbose mode, as iscsi-test-cu 1.19 prints it):
//!
//! ```text
//! Suite: CompareAndWrite
//!   Test: Simple ...    [SKIPPED] COMPAREANDWRITE is not implemented.
//! passed
//!   Test: BeyondEol ...    [FAILED] GET_LBA_STATUS successful but should have failed ...
//! FAILED
//!     1. test_get_lba_status_beyond_eol.c:38  - CU_ASSERT_EQUAL(_r,0)
//!   Test: Standard ...passed
//! Run Summary:    Type  Total    Ran Passed Failed Inactive
//!                tests    230    230    222      8        0
//! ```
//!
//! CUnit's verdict (`passed`/`FAILED`) decides; a passed test whose output says `[SKIPPED]`
//! is a skip (CUnit counts skips as passes). A `[FAILED]` message under a passed verdict is
//! not a failure (libiscsi prints some from clean-up code); the verdict is what CUnit counts.
//!
//! Expected-results file: one test per line, `Suite.Test pass|skip|fail [reason]`; `#` starts a
//! comment. Every test the suite runs must be listed.

use std::collections::BTreeMap;
use std::fmt;

/// A test's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Ran and passed.
    Pass,
    /// Passed without testing anything: the test saw a missing feature and skipped.
    Skip,
    /// CUnit's verdict was FAILED (or the run stopped inside the test).
    Fail,
}

impl Outcome {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "pass" => Some(Outcome::Pass),
            "skip" => Some(Outcome::Skip),
            "fail" => Some(Outcome::Fail),
            _ => None,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Pass => "pass",
            Outcome::Skip => "skip",
            Outcome::Fail => "fail",
        })
    }
}

/// One test's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestResult {
    /// `Suite.Test`.
    pub name: String,
    /// What happened.
    pub outcome: Outcome,
    /// The skip reason or the first failure message (empty for a plain pass).
    pub message: String,
}

/// CUnit's `tests` summary row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Tests registered.
    pub total: u32,
    /// Tests run.
    pub ran: u32,
    /// Tests passed (skips included).
    pub passed: u32,
    /// Tests failed.
    pub failed: u32,
}

/// A parsed run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Every test, in run order.
    pub results: Vec<TestResult>,
    /// The summary row, if the run got that far.
    pub summary: Option<Summary>,
}

impl Report {
    /// How many tests had `outcome`.
    pub fn count(&self, outcome: Outcome) -> usize {
        self.results.iter().filter(|r| r.outcome == outcome).count()
    }

    /// One line: totals by outcome.
    pub fn totals(&self) -> String {
        format!(
            "{} tests: {} passed, {} skipped, {} failed",
            self.results.len(),
            self.count(Outcome::Pass),
            self.count(Outcome::Skip),
            self.count(Outcome::Fail)
        )
    }

    /// The report as an expected-results file (header comment lines first).
    pub fn render_expected(&self, header: &str) -> String {
        let mut out = String::new();
        for line in header.lines() {
            out.push_str(&format!("# {line}\n").replace("# \n", "#\n"));
        }
        for r in &self.results {
            if r.message.is_empty() {
                out.push_str(&format!("{} {}\n", r.name, r.outcome));
            } else {
                out.push_str(&format!("{} {} {}\n", r.name, r.outcome, r.message));
            }
        }
        out
    }
}

/// A test being collected: its name and the text it printed.
struct Pending {
    name: String,
    text: Vec<String>,
}

impl Pending {
    fn finish(self) -> TestResult {
        let verdict = verdict(&self.text);
        let skipped = self
            .text
            .iter()
            .find_map(|l| l.split_once("[SKIPPED]").map(|(_, m)| m.trim().to_string()));
        let failed = self
            .text
            .iter()
            .find_map(|l| l.split_once("[FAILED]").map(|(_, m)| m.trim().to_string()))
            .or_else(|| {
                // An assertion line: "    1. file.c:38  - CU_ASSERT_EQUAL(_r,0)".
                self.text
                    .iter()
                    .map(|l| l.trim())
                    .find(|l| l.starts_with("1. "))
                    .map(|l| l[3..].to_string())
            });
        let (outcome, message) = match (verdict, skipped) {
            (Some(Outcome::Fail), _) => (Outcome::Fail, failed.unwrap_or_default()),
            (Some(_), Some(reason)) => (Outcome::Skip, reason),
            (Some(_), None) => (Outcome::Pass, String::new()),
            (None, _) => (
                Outcome::Fail,
                "no verdict: iscsi-test-cu stopped inside this test".to_string(),
            ),
        };
        TestResult {
            name: self.name,
            outcome,
            message,
        }
    }
}

/// CUnit's verdict in a test's text: right after the `...` of the test line (no output), or
/// at the start of a later line (alone, or followed by a message libiscsi printed after the
/// verdict: `passed    [FAILED] PRIN command: ...`), or at the end of an output line that
/// lacked a newline. Messages are bracketed (`[FAILED]`), so a bare leading word is CUnit's.
fn verdict(text: &[String]) -> Option<Outcome> {
    let leading = |s: &str| {
        ["passed", "FAILED"]
            .into_iter()
            .find(|w| {
                s.strip_prefix(w)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace))
            })
            .map(|w| {
                if w == "passed" {
                    Outcome::Pass
                } else {
                    Outcome::Fail
                }
            })
    };
    if let Some(v) = text.iter().find_map(|l| leading(l.trim_start())) {
        return Some(v);
    }
    text.iter().find_map(|l| {
        let t = l.trim_end();
        if t.ends_with("passed") {
            Some(Outcome::Pass)
        } else if t.ends_with("FAILED") && !t.ends_with("[FAILED]") {
            Some(Outcome::Fail)
        } else {
            None
        }
    })
}

/// Parses iscsi-test-cu's verbose output.
pub fn parse(output: &str) -> Report {
    let mut report = Report::default();
    let mut suite = String::new();
    let mut pending: Option<Pending> = None;
    let mut in_summary = false;
    for line in output.lines() {
        if let Some(name) = line.strip_prefix("Suite: ") {
            report.results.extend(pending.take().map(Pending::finish));
            suite = name.trim().to_string();
        } else if let Some(rest) = line.strip_prefix("  Test: ") {
            report.results.extend(pending.take().map(Pending::finish));
            let (name, text) = rest.split_once(" ...").unwrap_or((rest, ""));
            pending = Some(Pending {
                name: format!("{suite}.{}", name.trim()),
                text: vec![text.trim_start().to_string()],
            });
        } else if line.starts_with("Run Summary:") {
            report.results.extend(pending.take().map(Pending::finish));
            in_summary = true;
        } else if in_summary {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.first() == Some(&"tests") && cols.len() >= 5 {
                let n = |i: usize| cols[i].parse::<u32>().ok();
                if let (Some(total), Some(ran), Some(passed), Some(failed)) =
                    (n(1), n(2), n(3), n(4))
                {
                    report.summary = Some(Summary {
                        total,
                        ran,
                        passed,
                        failed,
                    });
                }
            }
        } else if let Some(p) = pending.as_mut() {
            p.text.push(line.to_string());
        }
    }
    report.results.extend(pending.take().map(Pending::finish));
    report
}

/// One expected outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// The outcome.
    pub outcome: Outcome,
    /// Why (for skips and failures).
    pub reason: String,
}

/// Parses an expected-results file; errors name the line.
pub fn parse_expected(text: &str) -> Result<BTreeMap<String, Expected>, String> {
    let mut map = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.splitn(3, char::is_whitespace);
        let name = parts.next().unwrap_or_default();
        let outcome = parts.next().unwrap_or_default().trim();
        let reason = parts.next().unwrap_or_default().trim().to_string();
        let outcome = Outcome::parse(outcome)
            .ok_or_else(|| format!("line {}: expected pass|skip|fail after the name", i + 1))?;
        if outcome != Outcome::Pass && reason.is_empty() {
            return Err(format!("line {}: a {outcome} needs a reason", i + 1));
        }
        if map
            .insert(name.to_string(), Expected { outcome, reason })
            .is_some()
        {
            return Err(format!("line {}: {name} listed twice", i + 1));
        }
    }
    Ok(map)
}

/// The comparison of a run with its expected results.
#[derive(Debug, Clone, Default)]
pub struct Diff {
    /// What fails the test: unexpected failures and skips, unlisted or missing tests.
    pub errors: Vec<String>,
    /// What does not: tests now passing that were expected to skip or fail (update the file).
    pub notes: Vec<String>,
}

/// Compares `report` with `expected`.
pub fn compare(report: &Report, expected: &BTreeMap<String, Expected>) -> Diff {
    let mut diff = Diff::default();
    let mut seen = std::collections::BTreeSet::new();
    for r in &report.results {
        seen.insert(r.name.as_str());
        let Some(e) = expected.get(&r.name) else {
            diff.errors.push(format!(
                "{}: not in the expected file (got {} {})",
                r.name, r.outcome, r.message
            ));
            continue;
        };
        match (e.outcome, r.outcome) {
            (a, b) if a == b => {}
            (_, Outcome::Fail) => diff.errors.push(format!(
                "{}: FAILED, expected {}: {}",
                r.name, e.outcome, r.message
            )),
            (Outcome::Pass, Outcome::Skip) => diff.errors.push(format!(
                "{}: SKIPPED, expected to run and pass: {}",
                r.name, r.message
            )),
            (was, now) => diff.notes.push(format!(
                "{}: {now} (expected {was}: {}); update the expected file",
                r.name, e.reason
            )),
        }
    }
    for name in expected.keys() {
        if !seen.contains(name.as_str()) {
            diff.errors.push(format!(
                "{name}: expected but not run (missing from the output)"
            ));
        }
    }
    diff
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
Suite: CompareAndWrite
  Test: Simple ...    [SKIPPED] COMPAREANDWRITE is not implemented.
    [SKIPPED] COMPAREANDWRITE is not implemented.
passed
Suite: GetLBAStatus
  Test: Simple ...passed
  Test: BeyondEol ...    [FAILED] GET_LBA_STATUS successful but should have failed
FAILED
    1. test_get_lba_status_beyond_eol.c:38  - CU_ASSERT_EQUAL(_r,0)
Suite: ModeSense6
  Test: Control ...    [WARNING] BUSY_TIMEOUT_PERIOD is undefined.
passed
Suite: Reserve6
  Test: LUNReset ...passed    [FAILED] PRIN command: failed with sense.
  Test: LUNReset2 ...    [FAILED] RESERVE6 command: failed with sense. UNIT_ATTENTION
passed    [FAILED] PRIN command: failed with sense. UNIT_ATTENTION

Suite: WriteSame10
  Test: UnmapVPD ...    [FAILED] WRITESAME10 command failed with status 2
passed
Suite: iSCSIdatasn
  Test: iSCSIDataSnInvalid ...FAILED
    1. test_iscsi_datasn_invalid.c:98  - CU_ASSERT_NOT_EQUAL(ret,0)

Run Summary:    Type  Total    Ran Passed Failed Inactive
              suites     51     51    n/a      0        0
               tests      8      8      6      2        0
             asserts  55149  55149  55138     11      n/a
";

    #[test]
    fn parses_verdicts_skips_and_summary() {
        let r = parse(SAMPLE);
        let got: Vec<(&str, Outcome)> = r
            .results
            .iter()
            .map(|t| (t.name.as_str(), t.outcome))
            .collect();
        assert_eq!(
            got,
            vec![
                ("CompareAndWrite.Simple", Outcome::Skip),
                ("GetLBAStatus.Simple", Outcome::Pass),
                ("GetLBAStatus.BeyondEol", Outcome::Fail),
                ("ModeSense6.Control", Outcome::Pass),
                ("Reserve6.LUNReset", Outcome::Pass),
                ("Reserve6.LUNReset2", Outcome::Pass),
                ("WriteSame10.UnmapVPD", Outcome::Pass),
                ("iSCSIdatasn.iSCSIDataSnInvalid", Outcome::Fail),
            ]
        );
        assert_eq!(r.results[0].message, "COMPAREANDWRITE is not implemented.");
        assert!(r.results[2]
            .message
            .starts_with("GET_LBA_STATUS successful"));
        assert!(r.results[7]
            .message
            .contains("test_iscsi_datasn_invalid.c:98"));
        assert_eq!(
            r.summary,
            Some(Summary {
                total: 8,
                ran: 8,
                passed: 6,
                failed: 2
            })
        );
        assert_eq!(r.count(Outcome::Fail) as u32, r.summary.unwrap().failed);
    }

    #[test]
    fn a_run_cut_short_fails_its_last_test() {
        let r = parse("Suite: Read10\n  Test: Simple ...passed\n  Test: BeyondEol ...");
        assert_eq!(r.results.len(), 2);
        assert_eq!(r.results[1].outcome, Outcome::Fail);
        assert!(r.summary.is_none());
    }

    #[test]
    fn expected_file_round_trips_and_compares() {
        let r = parse(SAMPLE);
        let text = r.render_expected("tgtd reference\n\nline two");
        assert!(
            text.starts_with("# tgtd reference\n#\n# line two\n"),
            "{text}"
        );
        let exp = parse_expected(&text).unwrap();
        assert_eq!(exp.len(), 8);
        let d = compare(&r, &exp);
        assert!(d.errors.is_empty() && d.notes.is_empty(), "{d:?}");

        // Expect everything to pass: the failures and the skip are errors.
        let all_pass: String = r
            .results
            .iter()
            .map(|t| format!("{} pass\n", t.name))
            .collect();
        let d = compare(&r, &parse_expected(&all_pass).unwrap());
        assert_eq!(d.errors.len(), 3, "{d:?}");
        assert!(d.errors.iter().any(|e| e.contains("SKIPPED")));

        // A test expected to fail that passes is a note; unlisted and missing tests are errors.
        let mut exp = parse_expected(&text).unwrap();
        exp.insert(
            "GetLBAStatus.Simple".into(),
            Expected {
                outcome: Outcome::Fail,
                reason: "x".into(),
            },
        );
        exp.remove("ModeSense6.Control");
        exp.insert(
            "Gone.Test".into(),
            Expected {
                outcome: Outcome::Pass,
                reason: String::new(),
            },
        );
        let d = compare(&r, &exp);
        assert_eq!(d.notes.len(), 1, "{d:?}");
        assert_eq!(d.errors.len(), 2, "{d:?}");
    }

    #[test]
    fn expected_file_errors_name_the_line() {
        assert!(parse_expected("A.B pass\nA.C maybe\n")
            .unwrap_err()
            .contains("line 2"));
        assert!(parse_expected("A.B skip\n").unwrap_err().contains("reason"));
        assert!(parse_expected("A.B pass\nA.B pass\n")
            .unwrap_err()
            .contains("twice"));
    }
}
