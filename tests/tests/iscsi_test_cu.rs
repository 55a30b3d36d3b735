//! libiscsi's conformance suite against the iSCSI target under test.
//!
//! `iscsi_test_cu_conformance` serves a 1 GiB LUN (a sparse file) from the target chosen by
//! `STRATA_ISCSI_TARGET` (`stratad`, the default, or `tgtd`), restricted to the suite's two
//! initiator names, and runs
//!
//! ```text
//! iscsi-test-cu --dataloss --test=ALL -i INIT1 -I INIT2 URL URL
//! ```
//!
//! (the second URL is the multipath URL: the MultipathIO suite runs two sessions from two
//! initiator names, CompareAndWrite across them included). Every test's outcome is compared with
//! tests/expected/iscsi-test-cu/TARGET.txt: an unexpected failure or skip, or a test missing
//! from either side, fails the test and prints the list; a test that now passes where a skip or
//! failure was expected is printed as a note.
//!
//! `STRATA_ISCSI_CU_RECORD=FILE` writes the run's outcomes as an expected-results file to FILE
//! (how tgtd's reference file was made: `STRATA_ISCSI_TARGET=tgtd STRATA_ISCSI_CU_RECORD=...`).
//! The raw output is kept in the test's output on failure.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dataplane::test_gate;
use test_guest::ScratchDir;
use tests::iscsi::{on_path, IscsiTarget, TargetKind, TargetSpec};
use tests::iscsi_cu::{compare, parse, parse_expected, Outcome};

/// Hard limit for the suite: tgtd needs about 20 s on this project's 2-core machines; a hung
/// target must fail the run, not hold CI.
const SUITE_TIMEOUT: Duration = Duration::from_secs(300);
/// Size of the LUN.
const LUN_BYTES: u64 = 1 << 30;
/// The suite's initiator names (both allowed on the target).
const INITIATOR_1: &str = "iqn.2026-12.org.strata.test:cu-1";
const INITIATOR_2: &str = "iqn.2026-12.org.strata.test:cu-2";
/// Where a run's outcomes are written as an expected-results file (see the module doc).
const RECORD_ENV: &str = "STRATA_ISCSI_CU_RECORD";

fn expected_file(kind: TargetKind) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("expected")
        .join("iscsi-test-cu")
        .join(format!("{}.txt", kind.name()))
}

/// Runs iscsi-test-cu with `args`; its combined stdout and stderr. Killed at the time-out.
fn run_suite(args: &[String], timeout: Duration) -> String {
    let mut child = Command::new("iscsi-test-cu")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn iscsi-test-cu");
    // Readers on threads so neither pipe can fill up and stall the suite.
    let mut out = child.stdout.take().expect("stdout piped");
    let mut err = child.stderr.take().expect("stderr piped");
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let started = Instant::now();
    loop {
        if child.try_wait().expect("wait for iscsi-test-cu").is_some() {
            break;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let out = String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned();
            panic!("iscsi-test-cu did not finish within {timeout:?}; output so far:\n{out}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut all = out_reader.join().unwrap_or_default();
    all.extend(err_reader.join().unwrap_or_default());
    eprintln!("iscsi-test-cu ran {:.1} s", started.elapsed().as_secs_f64());
    String::from_utf8_lossy(&all).into_owned()
}

#[test]
fn iscsi_test_cu_conformance() {
    const NAME: &str = "iscsi_test_cu_conformance";
    let kind = TargetKind::from_env().expect(tests::iscsi::TARGET_ENV);
    if !on_path("iscsi-test-cu") {
        test_gate::skip(NAME, "iscsi-test-cu not installed (package libiscsi-bin)");
        return;
    }
    if let Some(why) = kind.unavailable() {
        test_gate::skip(NAME, &format!("{}: {why}", kind.name()));
        return;
    }
    let expected_text = std::fs::read_to_string(expected_file(kind))
        .unwrap_or_else(|e| panic!("read {}: {e}", expected_file(kind).display()));
    let expected = parse_expected(&expected_text)
        .unwrap_or_else(|e| panic!("{}: {e}", expected_file(kind).display()));

    let dir = ScratchDir::new("iscsi-cu").expect("scratch dir");
    let image = dir.join("lun.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(LUN_BYTES))
        .expect("create the LUN image");
    let spec = TargetSpec {
        iqn: "iqn.2026-12.org.strata.test:cu".to_string(),
        image,
        allow: vec![INITIATOR_1.to_string(), INITIATOR_2.to_string()],
        isns: None,
        log: dir.join("target.log"),
    };
    let target = IscsiTarget::start(kind, &spec).expect("start the target");
    let url = target.url();
    eprintln!("{} serving {url}", kind.name());
    let args: Vec<String> = [
        "--dataloss",
        "--test=ALL",
        "-i",
        INITIATOR_1,
        "-I",
        INITIATOR_2,
        &url,
        &url,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let output = run_suite(&args, SUITE_TIMEOUT);
    let alive = !tests::e2e::exited(target.pid());
    let stopped = target.stop();

    let report = parse(&output);
    eprintln!("{}: {}", kind.name(), report.totals());
    if let Ok(path) = std::env::var(RECORD_ENV) {
        let header = format!(
            "iscsi-test-cu --dataloss --test=ALL (libiscsi 1.19, two initiator names, multipath \
             URL) against {} on a 1 GiB sparse file.\nRecorded by tests/tests/iscsi_test_cu.rs \
             with {RECORD_ENV}; {}.\nFormat: Suite.Test pass|skip|fail [reason]",
            kind.name(),
            report.totals()
        );
        std::fs::write(&path, report.render_expected(&header)).expect("write the record");
        eprintln!("outcomes written to {path}");
    }
    let diff = compare(&report, &expected);
    for note in &diff.notes {
        eprintln!("note: {note}");
    }
    if !diff.errors.is_empty() || !alive {
        panic!(
            "iscsi-test-cu against {} differs from {}:\n  {}\n{}\n--- iscsi-test-cu output ---\n{output}",
            kind.name(),
            expected_file(kind).display(),
            diff.errors.join("\n  "),
            if alive {
                String::new()
            } else {
                format!("{} died during the suite", kind.name())
            }
        );
    }
    // The parser and CUnit agree on the totals (a parse that lost tests would pass silently).
    let summary = report.summary.expect("the run printed its summary");
    assert_eq!(summary.ran as usize, report.results.len(), "{output}");
    assert_eq!(
        summary.failed as usize,
        report.count(Outcome::Fail),
        "{output}"
    );
    assert!(report.count(Outcome::Pass) > 0, "{output}");
    stopped.expect("stop the target");
}
