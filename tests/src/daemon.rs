//! Spawning `stratad` for tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How long a freshly started stratad may take to create its sockets.
const SOCKET_WAIT_MAX: Duration = Duration::from_secs(30);
/// How long stratad may take to drain and exit after SIGTERM.
const STOP_WAIT_MAX: Duration = Duration::from_secs(30);

/// The workspace root (tests/ is one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Path of the release `stratad` binary, built once per test process.
pub fn stratad_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = workspace_root();
        let status = Command::new(env!("CARGO"))
            .args(["build", "--release", "-p", "stratad"])
            .current_dir(&root)
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build -p stratad failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        target.join("release").join("stratad")
    })
    .clone()
}

/// A running stratad; killed (SIGKILL) on drop if not stopped cleanly before.
#[derive(Debug)]
pub struct Stratad {
    child: Option<Child>,
}

impl Stratad {
    /// Starts stratad with `args` and waits until every socket in `sockets` accepts connections.
    pub fn spawn(args: &[String], sockets: &[&Path]) -> anyhow::Result<Self> {
        // A socket file left by a killed daemon would look ready at once: remove it, so the
        // wait below sees the new daemon's socket (stratad replaces stale sockets itself).
        for sock in sockets {
            let _ = std::fs::remove_file(sock);
        }
        let child = Command::new(stratad_bin())
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .context("spawn stratad")?;
        let mut daemon = Stratad { child: Some(child) };
        let deadline = Instant::now() + SOCKET_WAIT_MAX;
        for sock in sockets {
            while !sock.exists() {
                if let Some(status) = daemon.try_wait()? {
                    bail!("stratad exited early with {status}");
                }
                if Instant::now() > deadline {
                    bail!("socket {} did not appear", sock.display());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(daemon)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => Ok(None),
        }
    }

    /// Sends SIGTERM and waits for a clean exit; returns the exit status.
    pub fn stop(mut self) -> anyhow::Result<ExitStatus> {
        let mut child = self.child.take().context("already stopped")?;
        let pid = libc::pid_t::try_from(child.id()).context("pid")?;
        // SAFETY: kill(2) with a pid we own and a valid signal number has no memory effects.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_WAIT_MAX;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("stratad did not exit within {STOP_WAIT_MAX:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Stratad {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
