//! The reference vhost-user-fs back-end: virtiofsd 1.14.0 (crates.io), installed into a cache
//! by `tools/install-virtiofsd.sh`, started fresh per guest boot (it exits when QEMU
//! disconnects).

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{GuestError, Result};

/// The install script (beside this crate's directory).
pub const INSTALL_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../install-virtiofsd.sh");
/// How long virtiofsd may take to create its socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Virtiofsd::stop`] waits for it to exit by itself before killing it.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The virtiofsd binary: `$STRATA_VIRTIOFSD` if set, else the cached install (running
/// `tools/install-virtiofsd.sh` if needed: a few minutes the first time on a machine).
pub fn virtiofsd_binary() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("STRATA_VIRTIOFSD").filter(|b| !b.is_empty()) {
        return Ok(PathBuf::from(bin));
    }
    let out = Command::new("bash")
        .arg(INSTALL_SCRIPT)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| GuestError::io(format!("run {INSTALL_SCRIPT}"), e))?;
    if !out.status.success() {
        return Err(GuestError::Build(format!(
            "{INSTALL_SCRIPT} exited with {}",
            out.status
        )));
    }
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .to_string();
    if path.is_empty() {
        return Err(GuestError::Build(format!(
            "{INSTALL_SCRIPT} printed no path"
        )));
    }
    Ok(PathBuf::from(path))
}

/// A running virtiofsd.
#[derive(Debug)]
pub struct Virtiofsd {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Virtiofsd {
    /// Starts `bin --socket-path=SOCKET --shared-dir=DIR --cache=CACHE --posix-acl EXTRA...`
    /// with its stderr in `log`, and waits until the socket exists.
    pub fn start(
        bin: &Path,
        socket: &Path,
        shared_dir: &Path,
        cache: &str,
        extra: &[String],
        log: &Path,
    ) -> Result<Self> {
        let _ = std::fs::remove_file(socket);
        let log_file = File::create(log)
            .map_err(|e| GuestError::io(format!("create {}", log.display()), e))?;
        let log_err = log_file
            .try_clone()
            .map_err(|e| GuestError::io("dup virtiofsd log fd", e))?;
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--socket-path={}", socket.display()))
            .arg(format!("--shared-dir={}", shared_dir.display()))
            .arg(format!("--cache={cache}"))
            .arg("--posix-acl")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err);
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
        // which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| GuestError::io(format!("spawn {}", bin.display()), e))?;
        let mut daemon = Virtiofsd {
            child,
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
        };
        let started = Instant::now();
        while !socket.exists() {
            if daemon.exited() || started.elapsed() > START_TIMEOUT {
                let log = std::fs::read_to_string(log).unwrap_or_default();
                daemon.kill();
                return Err(GuestError::Build(format!(
                    "virtiofsd did not create {} within {START_TIMEOUT:?}:\n{log}",
                    socket.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(daemon)
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its log (stderr) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits briefly for it to exit (it does when QEMU disconnects), then kills it.
    pub fn stop(mut self) {
        let started = Instant::now();
        while !self.exited() && started.elapsed() < STOP_GRACE {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        if !self.exited() {
            self.kill();
        }
    }
}
