//! Helpers shared by the guest end-to-end tests (e2e_guest, e2e_vmfs): one guest at a time
//! under a hard time-out, clean daemon stops, and guest runs cut short when stratad dies.

use std::sync::{mpsc, Mutex};
use std::time::Duration;

use test_guest::{GuestRun, VmConfig};

use crate::daemon::Stratad;

/// Hard limit for one whole test: up to two boots (~6 s each under TCG), the fio jobs (tens of
/// seconds) and up to two stratad start/stop cycles; generous for a loaded 2-core CI machine.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(600);

/// One guest at a time (see the module doc).
static ONE_GUEST_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs `body` on its own thread and fails the test if it takes longer than [`TEST_TIMEOUT`].
pub fn with_deadline(body: impl FnOnce() + Send + 'static) {
    let _serial = ONE_GUEST_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let (done_tx, done_rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        body();
        let _ = done_tx.send(());
    });
    match done_rx.recv_timeout(TEST_TIMEOUT) {
        Ok(()) => {
            if let Err(panic) = worker.join() {
                std::panic::resume_unwind(panic);
            }
        }
        // The body panicked (the sender was dropped without sending): report its panic.
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(panic) = worker.join() {
                std::panic::resume_unwind(panic);
            }
            panic!("test body ended without reporting");
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("test did not finish within {TEST_TIMEOUT:?}")
        }
    }
}

/// Stops stratad with SIGTERM and asserts a clean exit (status 0).
pub fn stop_cleanly(daemon: Stratad) {
    let status = daemon.stop().expect("stop stratad");
    assert!(
        status.success(),
        "stratad exited with {status} after SIGTERM"
    );
}

/// Whether process `pid` has exited (a zombie counts as exited: it is no longer serving).
pub fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name: "pid (comm) S ...".
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state == "Z" || state == "X"),
        Err(_) => true,
    }
}

/// Runs `script` in a guest attached to `daemon`, failing the test (with the logs) unless it
/// exits 0. If stratad exits meanwhile, the run is cut short (the guest would otherwise hang
/// on its disk until the time-out).
pub fn run_ok(cfg: &VmConfig, daemon: &Stratad, script: &str) -> GuestRun {
    let pid = daemon.pid();
    let run = cfg
        .run_script_watched(script, || {
            if exited(pid) {
                Err(format!("stratad (pid {pid}) exited during the guest run"))
            } else {
                Ok(())
            }
        })
        .and_then(|run| run.expect_success())
        .unwrap_or_else(|e| panic!("guest run failed: {e}"));
    eprintln!(
        "guest ran in {:.1} s (boot {:.1} s)\n{}",
        run.elapsed.as_secs_f64(),
        run.boot_time.map(|t| t.as_secs_f64()).unwrap_or(f64::NAN),
        run.output
    );
    run
}
