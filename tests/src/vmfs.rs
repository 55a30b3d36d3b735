//! Test support for vmfs-backed disks: datastores made with `stratactl`, stratad arguments for
//! `backend=vmfs`, offline fsck, kill -9 of stratad, and a guest run in the background (so that
//! a test can act — kill the back-end — while the guest's script is still running).

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use test_guest::vm::RunFiles;
use test_guest::{ensure_guest, ScratchDir, VmConfig};

use crate::daemon::{workspace_root, Stratad};

/// How often [`BackgroundGuest::wait_for_output`] polls the script's output.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Path of the release `stratactl` binary, built once per test process.
pub fn stratactl_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = workspace_root();
        let status = Command::new(env!("CARGO"))
            .args(["build", "--release", "-p", "stratactl"])
            .current_dir(&root)
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build -p stratactl failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        target.join("release").join("stratactl")
    })
    .clone()
}

/// How a disk file's space is provisioned (`stratactl disk create` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provisioning {
    /// `--thin`: blocks allocated on first write.
    Thin,
    /// `--thick`: eager-zeroed.
    Thick,
    /// `--lazy-zeroed`: allocated up front, zeroed on first write (reads return zeroes).
    LazyZeroed,
}

impl Provisioning {
    fn flag(self) -> &'static str {
        match self {
            Provisioning::Thin => "--thin",
            Provisioning::Thick => "--thick",
            Provisioning::LazyZeroed => "--lazy-zeroed",
        }
    }
}

/// The outcome of `stratactl --datastore PATH fsck`.
#[derive(Debug, Clone)]
pub struct FsckReport {
    /// Exit status 0.
    pub clean: bool,
    /// stdout and stderr.
    pub output: String,
}

/// A datastore file made with `stratactl mkfs`.
#[derive(Debug, Clone)]
pub struct TestDatastore {
    path: PathBuf,
}

/// Runs `stratactl args`, failing unless it exits 0; returns its stdout.
fn stratactl(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(stratactl_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run stratactl")?;
    if !out.status.success() {
        bail!(
            "stratactl {} exited with {}:\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl TestDatastore {
    /// `stratactl mkfs PATH --size SIZE` (e.g. "1G").
    pub fn mkfs(path: &Path, size: &str) -> anyhow::Result<Self> {
        let p = path.to_str().context("utf-8 datastore path")?;
        stratactl(&["mkfs", p, "--size", size])?;
        Ok(TestDatastore {
            path: path.to_path_buf(),
        })
    }

    /// The datastore file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn path_str(&self) -> anyhow::Result<&str> {
        self.path.to_str().context("utf-8 datastore path")
    }

    /// `stratactl --datastore PATH disk create NAME --size SIZE --thin|--thick|--lazy-zeroed`.
    pub fn disk_create(&self, name: &str, size: &str, kind: Provisioning) -> anyhow::Result<()> {
        let p = self.path_str()?;
        stratactl(&[
            "--datastore",
            p,
            "disk",
            "create",
            name,
            "--size",
            size,
            kind.flag(),
        ])?;
        Ok(())
    }

    /// `stratactl --datastore PATH disk rm NAME`.
    pub fn disk_rm(&self, name: &str) -> anyhow::Result<()> {
        stratactl(&["--datastore", self.path_str()?, "disk", "rm", name])?;
        Ok(())
    }

    /// `stratactl --datastore PATH ls`.
    pub fn ls(&self) -> anyhow::Result<String> {
        stratactl(&["--datastore", self.path_str()?, "ls"])
    }

    /// The bytes allocated to file `name` of the root directory (`allocated_bytes` of
    /// `stratactl --json ls`).
    pub fn allocated_bytes(&self, name: &str) -> anyhow::Result<u64> {
        let json = stratactl(&["--json", "--datastore", self.path_str()?, "ls"])?;
        // A flat array of flat objects: find the one naming the file.
        let entry = json
            .split('}')
            .find(|obj| obj.contains(&format!("\"name\":\"{name}\"")))
            .with_context(|| format!("{name} not in `ls --json`: {json}"))?;
        let key = "\"allocated_bytes\":";
        let at = entry
            .find(key)
            .with_context(|| format!("no allocated_bytes in {entry}"))?;
        let digits: String = entry[at + key.len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits
            .parse()
            .with_context(|| format!("allocated_bytes of {entry}"))
    }

    /// `stratactl --datastore PATH fsck` (stratad must be stopped).
    pub fn fsck(&self) -> anyhow::Result<FsckReport> {
        let out = Command::new(stratactl_bin())
            .args(["--datastore", self.path_str()?, "fsck"])
            .stdin(Stdio::null())
            .output()
            .context("run stratactl fsck")?;
        Ok(FsckReport {
            clean: out.status.success(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        })
    }

    /// Runs fsck and panics with its report unless it is clean.
    pub fn assert_fsck_clean(&self, when: &str) {
        let report = self.fsck().expect("run fsck");
        assert!(report.clean, "fsck {when}: not clean:\n{}", report.output);
        eprintln!("fsck {when}: {}", report.output.trim());
    }

    /// stratad's arguments serving file `name` on `sock`:
    /// `--datastore PATH --disk socket=SOCK,backend=vmfs,file=NAME` plus `options` (e.g.
    /// ",queues=2" or ",readonly=on").
    pub fn disk_args(&self, sock: &Path, name: &str, options: &str) -> Vec<String> {
        vec![
            "--datastore".to_string(),
            self.path.display().to_string(),
            "--disk".to_string(),
            format!(
                "socket={},backend=vmfs,file={name}{options}",
                sock.display()
            ),
        ]
    }
}

/// Kills stratad with SIGKILL (no drain, no flush, no journal checkpoint) and reaps it.
pub fn kill9(daemon: Stratad) {
    let pid = libc::pid_t::try_from(daemon.pid()).expect("pid");
    // SAFETY: kill(2) on our own child with a valid signal number has no memory effects.
    let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
    assert_eq!(
        rc,
        0,
        "kill -9 stratad: {}",
        std::io::Error::last_os_error()
    );
    // Drop reaps the child (its SIGKILL to an already dying process is harmless).
    drop(daemon);
}

/// Identity of a socket file: inode and change time (a new bind of the same path may reuse
/// the inode number, never the nanosecond ctime).
fn socket_identity(path: &Path) -> Option<(u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.ino(), m.ctime(), m.ctime_nsec()))
}

/// Starts stratad where a killed one left its socket files behind: [`Stratad::spawn`] alone
/// would return at once (the stale files exist); this waits until stratad has replaced each of
/// them with its own listening socket (it removes stale sockets and binds anew).
pub fn spawn_after_crash(args: &[String], sockets: &[&Path]) -> anyhow::Result<Stratad> {
    let stale: Vec<_> = sockets.iter().map(|s| socket_identity(s)).collect();
    let daemon = Stratad::spawn(args, sockets)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    for (sock, old) in sockets.iter().zip(stale) {
        loop {
            let now = socket_identity(sock);
            if now.is_some() && (old.is_none() || now != old) {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "stratad did not replace the stale socket {}",
                    sock.display()
                );
            }
            if std::fs::read_to_string(format!("/proc/{}/stat", daemon.pid()))
                .map(|s| s.contains(") Z"))
                .unwrap_or(true)
            {
                bail!("stratad exited before binding {}", sock.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(daemon)
}

/// A guest whose script runs while the test goes on: the test waits for lines of the script's
/// output and can kill QEMU at any point. QEMU is killed on drop.
#[derive(Debug)]
pub struct BackgroundGuest {
    child: Option<Child>,
    files: RunFiles,
    started: Instant,
    _scratch: ScratchDir,
}

impl BackgroundGuest {
    /// Boots `cfg` running `script` (see [`VmConfig::run_script`] for the protocol).
    pub fn start(cfg: &VmConfig, script: &str) -> anyhow::Result<Self> {
        let image = ensure_guest()?;
        let scratch = ScratchDir::new("strata-bg")?;
        let files = RunFiles::in_dir(scratch.path());
        std::fs::write(&files.script, script).context("write script")?;
        let log = File::create(&files.qemu_log).context("create QEMU log")?;
        let log_err = log.try_clone().context("dup QEMU log")?;
        let mut cmd = Command::new(&cfg.qemu);
        cmd.args(cfg.qemu_args(&image, &files))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
        // which is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                // QEMU must not outlive the test.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().context("spawn QEMU")?;
        Ok(BackgroundGuest {
            child: Some(child),
            files,
            started: Instant::now(),
            _scratch: scratch,
        })
    }

    /// The script's output so far (`\r` removed).
    pub fn output(&self) -> String {
        read_log(&self.files.output)
    }

    /// The serial console so far.
    pub fn console(&self) -> String {
        read_log(&self.files.console)
    }

    /// Time since QEMU started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits until the script's output contains `marker`; fails (with the logs) if QEMU exits
    /// first or `timeout` passes.
    pub fn wait_for_output(&mut self, marker: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.output().contains(marker) {
                return Ok(());
            }
            let exited = match self.child.as_mut() {
                Some(c) => c.try_wait()?,
                None => bail!("QEMU already killed"),
            };
            if let Some(status) = exited {
                bail!(
                    "QEMU exited ({status}) before the guest printed {marker:?}\n--- output ---\n{}\n--- console ---\n{}\n--- qemu ---\n{}",
                    self.output(),
                    self.console(),
                    read_log(&self.files.qemu_log)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the guest did not print {marker:?} within {timeout:?}\n--- output ---\n{}\n--- console ---\n{}",
                    self.output(),
                    self.console()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Kills QEMU (SIGKILL) and returns the script's output up to then.
    pub fn kill(mut self) -> String {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.output()
    }
}

impl Drop for BackgroundGuest {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A log file as text (lossy UTF-8, `\r` removed); empty if it cannot be read.
fn read_log(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).replace('\r', ""),
        Err(_) => String::new(),
    }
}
