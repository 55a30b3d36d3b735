//! Test support for virtio-fs shares (`stratad --share`): the fs guest's user and group files
//! (for a share's `passwd=`/`groups=`), stratad arguments, the control socket's `stratad_stats`, the
//! datastore's listing, a tiny check protocol for guest scripts, and a guest (fs variant) run
//! in the background so that a test can kill stratad while the guest is still connected.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;
use test_guest::vm::RunFiles;
use test_guest::{ensure_guest_variant, GuestVariant, ScratchDir, VmConfig};

use crate::vmfs::stratactl_bin;

/// The fs guest's /etc/passwd (tools/test-guest/build-guest.sh, `--fs`).
pub const GUEST_PASSWD: &str = "\
root:x:0:0:root:/root:/bin/sh
alice:x:1000:1000:alice:/tmp:/bin/sh
bob:x:1001:1001:bob:/tmp:/bin/sh
tests:x:1100:1100:pjdfstest:/tmp:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
";

/// The fs guest's /etc/group (tools/test-guest/build-guest.sh, `--fs`).
pub const GUEST_GROUP: &str = "\
root:x:0:
alice:x:1000:
bob:x:1001:
tests:x:1100:
team:x:2000:alice
shared:x:2001:alice,bob
nobody:x:65534:
";

/// Writes [`GUEST_PASSWD`] and [`GUEST_GROUP`] into `dir`; returns the share options
/// `,passwd=PATH,groups=PATH`.
pub fn identity_options(dir: &Path) -> anyhow::Result<String> {
    let passwd = dir.join("passwd");
    let group = dir.join("group");
    std::fs::write(&passwd, GUEST_PASSWD).context("write passwd")?;
    std::fs::write(&group, GUEST_GROUP).context("write group")?;
    Ok(format!(
        ",passwd={},groups={}",
        passwd.display(),
        group.display()
    ))
}

/// stratad's arguments: `--datastore DS`, one `--share SPEC` per entry of `shares`, and
/// `--control CTL` when given.
pub fn stratad_args(datastore: &Path, shares: &[String], control: Option<&Path>) -> Vec<String> {
    let mut args = vec!["--datastore".to_string(), datastore.display().to_string()];
    for s in shares {
        args.push("--share".to_string());
        args.push(s.clone());
    }
    if let Some(c) = control {
        args.push("--control".to_string());
        args.push(c.display().to_string());
    }
    args
}

/// One JSON-RPC call on stratad's control socket; returns the `result` member.
pub fn control_call(control: &Path, method: &str) -> anyhow::Result<Value> {
    let mut stream =
        UnixStream::connect(control).with_context(|| format!("connect {}", control.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    writeln!(
        stream,
        "{}",
        serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method})
    )?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let v: Value = serde_json::from_str(&line).with_context(|| format!("reply {line:?}"))?;
    match v.get("result") {
        Some(r) => Ok(r.clone()),
        None => bail!("{method} failed: {line}"),
    }
}

/// The `stats` entry of the share with mount tag `tag`.
pub fn share_stats(control: &Path, tag: &str) -> anyhow::Result<Value> {
    let stats = control_call(control, "stratad_stats")?;
    stats["shares"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["tag"] == tag))
        .cloned()
        .with_context(|| format!("no share with tag {tag} in stats: {stats}"))
}

/// A counter of a share's stats (`"denied"`, or `"perm_cache.hits"`).
pub fn counter(stats: &Value, path: &str) -> u64 {
    path.split('.')
        .fold(stats, |v, k| &v[k])
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {path} in {stats}"))
}

/// One entry of `stratactl --json ls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LsEntry {
    /// Name.
    pub name: String,
    /// "dir" or "file" (symlinks and other non-directories are "file").
    pub kind: String,
    /// Size in bytes (a symlink's is its target's length).
    pub size: u64,
}

/// `stratactl --json --datastore DS ls PATH` (stratad stopped).
pub fn ls(datastore: &Path, path: &str) -> anyhow::Result<Vec<LsEntry>> {
    let ds = datastore.to_str().context("utf-8 datastore path")?;
    let out = stratactl(&["--json", "--datastore", ds, "ls", path])?;
    let v: Value = serde_json::from_str(&out).context("ls --json")?;
    Ok(v.as_array()
        .context("ls --json: not an array")?
        .iter()
        .map(|e| LsEntry {
            name: e["name"].as_str().unwrap_or_default().to_string(),
            kind: e["kind"].as_str().unwrap_or_default().to_string(),
            size: e["size"].as_u64().unwrap_or(u64::MAX),
        })
        .collect())
}

/// Shell functions for guest scripts (busybox sh); each prints one `CHECK <name> ok` or
/// `CHECK <name> FAILED: <why>` line:
///
/// - `expect_ok NAME CMD...`: CMD exits 0;
/// - `expect_fail NAME PATTERN CMD...`: CMD exits non-zero and its output contains PATTERN
///   (e.g. "Permission denied");
/// - `expect_eq NAME WANT GOT`: the two strings are equal.
pub const CHECK_FUNCS: &str = r#"
expect_ok() {
    _n=$1; shift
    if "$@" >/tmp/check.out 2>&1; then echo "CHECK $_n ok"
    else echo "CHECK $_n FAILED: exit $?: $(cat /tmp/check.out)"; fi
}
expect_fail() {
    _n=$1; _p=$2; shift 2
    if "$@" >/tmp/check.out 2>&1; then echo "CHECK $_n FAILED: succeeded: $(cat /tmp/check.out)"
    elif grep -q "$_p" /tmp/check.out; then echo "CHECK $_n ok"
    else echo "CHECK $_n FAILED: not '$_p': $(cat /tmp/check.out)"; fi
}
expect_eq() {
    if [ "$2" = "$3" ]; then echo "CHECK $1 ok"
    else echo "CHECK $1 FAILED: want '$2', got '$3'"; fi
}
"#;

/// Asserts that the guest's output holds a `CHECK <name> ok` line for every name of `names`
/// and no failed check; the panic message lists every failure and the whole output.
pub fn assert_checks(output: &str, names: &[&str]) {
    let mut problems = Vec::new();
    for line in output.lines() {
        if let Some(rest) = line.strip_prefix("CHECK ") {
            if !rest.ends_with(" ok") {
                problems.push(line.to_string());
            }
        }
    }
    for name in names {
        if !output.lines().any(|l| l == format!("CHECK {name} ok")) {
            problems.push(format!("check {name}: no ok line"));
        }
    }
    assert!(
        problems.is_empty(),
        "guest checks failed:\n  {}\n--- guest output ---\n{output}",
        problems.join("\n  ")
    );
}

/// The value of the first output line `KEY=value`.
pub fn output_value<'a>(output: &'a str, key: &str) -> Option<&'a str> {
    output
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// The fs guest running a script while the test goes on (see
/// [`crate::vmfs::BackgroundGuest`], which boots the base guest); QEMU is killed on drop.
#[derive(Debug)]
pub struct BackgroundFsGuest {
    child: Option<Child>,
    files: RunFiles,
    _scratch: ScratchDir,
}

impl BackgroundFsGuest {
    /// Boots `cfg` with the fs variant of the guest, running `script`.
    pub fn start(cfg: &VmConfig, script: &str) -> anyhow::Result<Self> {
        let image = ensure_guest_variant(GuestVariant::Fs)?;
        let scratch = ScratchDir::new("strata-fs-bg")?;
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
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().context("spawn QEMU")?;
        Ok(BackgroundFsGuest {
            child: Some(child),
            files,
            _scratch: scratch,
        })
    }

    /// The script's output so far.
    pub fn output(&self) -> String {
        read_log(&self.files.output)
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
            if exited.is_some() || Instant::now() > deadline {
                bail!(
                    "the guest did not print {marker:?} (QEMU exited: {exited:?})\n--- output ---\n{}\n--- console ---\n{}",
                    self.output(),
                    read_log(&self.files.console)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills QEMU and returns the script's output up to then.
    pub fn kill(mut self) -> String {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.output()
    }
}

impl Drop for BackgroundFsGuest {
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

/// `stratactl ARGS`, failing unless it exits 0; returns its stdout.
pub fn stratactl(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(stratactl_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run stratactl")?;
    if !out.status.success() {
        bail!(
            "stratactl {} exited with {}: {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A guest script: mounts share `tag` on `/mnt/<tag>` (`$MNT`), defines [`CHECK_FUNCS`], runs
/// `body`, syncs, unmounts and prints `SCRIPT-DONE`. Exits 90 if the mount fails.
pub fn mount_script(tag: &str, body: &str) -> String {
    format!(
        r#"MNT=/mnt/{tag}
mkdir -p "$MNT"
n=0
until mount -t virtiofs {tag} "$MNT"; do
    n=$((n + 1))
    if [ "$n" -ge 20 ]; then echo "mount -t virtiofs {tag} failed"; exit 90; fi
    sleep 0.2
done
{CHECK_FUNCS}
{body}
cd /
sync
umount "$MNT" || echo "umount $MNT failed"
echo SCRIPT-DONE
"#
    )
}
