//! The cached guest image (kernel + initramfs) and the build script that makes it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::{GuestError, Result};

/// How long build-guest.sh may take. A first build on a fresh machine runs `apt-get update`,
/// installs fio/busybox/cpio/kmod and downloads a ~70 MB kernel package: about a minute on this
/// project's machines; the bound leaves room for a slow mirror without hanging a test run.
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);
/// How often the build's child process is polled.
const BUILD_POLL: Duration = Duration::from_millis(100);

/// The build script, next to this crate's manifest.
pub const BUILD_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/build-guest.sh");

/// A built guest: the files QEMU boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    /// The kernel (`-kernel`).
    pub kernel: PathBuf,
    /// The initramfs (`-initrd`).
    pub initrd: PathBuf,
    /// What was built from which packages (key=value lines).
    pub manifest: String,
}

/// The guest cache directory: `$STRATA_GUEST_DIR`, else `$HOME/.cache/strata/guest`, the same
/// rule build-guest.sh applies.
pub fn guest_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("STRATA_GUEST_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache").join("strata").join("guest")
}

/// Which initramfs to boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum GuestVariant {
    /// busybox, fio and the virtio/virtiofs modules (`build-guest.sh`).
    #[default]
    Base,
    /// The base plus the file-server test tools (`build-guest.sh --fs`): pjdfstest and its
    /// config, test users (alice 1000, bob 1001, tests, nobody), setfacl/getfacl and
    /// strata-fsutil. Same kernel; the cache is `<guest dir>/fs/`.
    Fs,
    /// The base plus the iSCSI initiator (`build-guest.sh --iscsi`): the virtio_net, iscsi_tcp
    /// and sd_mod modules (loaded at boot), open-iscsi's iscsiadm and iscsid with their
    /// libraries and /etc/iscsi. Boot it with [`crate::VmConfig::net`] so the guest reaches
    /// the host at 10.0.2.2. Same kernel; the cache is `<guest dir>/iscsi/`.
    Iscsi,
}

impl GuestVariant {
    /// The variant's build-script flag and cache subdirectory (`None` for the base guest).
    fn flag_and_dir(self) -> Option<(&'static str, &'static str)> {
        match self {
            GuestVariant::Base => None,
            GuestVariant::Fs => Some(("--fs", "fs")),
            GuestVariant::Iscsi => Some(("--iscsi", "iscsi")),
        }
    }
}

/// Makes sure the base guest is built (runs build-guest.sh, which returns at once when the
/// cache is complete) and returns it. The script runs at most once per process while it
/// succeeds; the script's own lock serialises concurrent processes.
pub fn ensure_guest() -> Result<GuestImage> {
    ensure_guest_variant(GuestVariant::Base)
}

/// [`ensure_guest`] for a given [`GuestVariant`] (`Fs` runs `build-guest.sh --fs`: the first
/// time on a machine it builds pjdfstest from crates.io, a few minutes; `Iscsi` runs
/// `build-guest.sh --iscsi`, which downloads the kernel package once more for its modules).
pub fn ensure_guest_variant(variant: GuestVariant) -> Result<GuestImage> {
    static BUILT: Mutex<[Option<GuestImage>; 3]> = Mutex::new([None, None, None]);
    let slot = match variant {
        GuestVariant::Base => 0,
        GuestVariant::Fs => 1,
        GuestVariant::Iscsi => 2,
    };
    let mut built = BUILT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(image) = built[slot].as_ref() {
        return Ok(image.clone());
    }
    let dir = guest_dir();
    run_build_script(&dir, variant)?;
    let image = match variant.flag_and_dir() {
        None => load(&dir)?,
        Some((flag, sub)) => {
            let base = load(&dir)?;
            let overlay = load_variant(&dir.join(sub), flag)?;
            GuestImage {
                kernel: base.kernel,
                ..overlay
            }
        }
    };
    built[slot] = Some(image.clone());
    Ok(image)
}

fn run_build_script(dir: &Path, variant: GuestVariant) -> Result<()> {
    let started = Instant::now();
    let mut cmd = Command::new("bash");
    cmd.arg(BUILD_SCRIPT);
    if let Some((flag, _)) = variant.flag_and_dir() {
        cmd.arg(flag);
    }
    let mut child = cmd
        .env("STRATA_GUEST_DIR", dir)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| GuestError::io(format!("run {BUILD_SCRIPT}"), e))?;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break,
            Ok(Some(status)) => {
                return Err(GuestError::Build(format!(
                    "{BUILD_SCRIPT} exited with {status}"
                )))
            }
            Ok(None) => {}
            Err(e) => return Err(GuestError::io("wait for build-guest.sh", e)),
        }
        if started.elapsed() > BUILD_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(GuestError::Build(format!(
                "{BUILD_SCRIPT} did not finish within {BUILD_TIMEOUT:?}"
            )));
        }
        std::thread::sleep(BUILD_POLL);
    }
    tracing::debug!(elapsed = ?started.elapsed(), dir = %dir.display(), "guest image ready");
    Ok(())
}

fn load(dir: &Path) -> Result<GuestImage> {
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initrd.img");
    for file in [&kernel, &initrd] {
        if !file.is_file() {
            return Err(GuestError::Build(format!(
                "{} missing after build-guest.sh",
                file.display()
            )));
        }
    }
    let manifest_path = dir.join("manifest");
    let manifest = std::fs::read_to_string(&manifest_path)
        .map_err(|e| GuestError::io(format!("read {}", manifest_path.display()), e))?;
    Ok(GuestImage {
        kernel,
        initrd,
        manifest,
    })
}

/// A variant's initramfs and manifest (its kernel is the base guest's); `flag` is the build
/// script's flag that makes it.
fn load_variant(dir: &Path, flag: &str) -> Result<GuestImage> {
    let initrd = dir.join("initrd.img");
    if !initrd.is_file() {
        return Err(GuestError::Build(format!(
            "{} missing after build-guest.sh {flag}",
            initrd.display()
        )));
    }
    let manifest_path = dir.join("manifest");
    let manifest = std::fs::read_to_string(&manifest_path)
        .map_err(|e| GuestError::io(format!("read {}", manifest_path.display()), e))?;
    Ok(GuestImage {
        kernel: PathBuf::new(),
        initrd,
        manifest,
    })
}
