//! Strata's test guest: a minimal Linux VM that runs a shell script against vhost-user devices.
//!
//! The guest is a Debian 6.1 kernel plus a busybox initramfs with fio and the virtio/virtiofs
//! modules, built once per machine by `tools/test-guest/build-guest.sh` into a cache
//! (`$STRATA_GUEST_DIR`, default `~/.cache/strata/guest`). QEMU boots it under TCG (KVM guests
//! hang on this project's machines) with shared memfd memory, which vhost-user requires.
//!
//! Crate map:
//! - [`image`]: [`ensure_guest`] runs the build script (a no-op once the cache is complete) and
//!   returns the [`GuestImage`] (kernel + initramfs paths); [`ensure_guest_variant`] does the
//!   same for a [`GuestVariant`].
//! - [`vm`]: [`VmConfig`] (vCPUs, memory, [`BlkDevice`]s, [`FsDevice`]s, a user-mode NIC,
//!   time-out) and
//!   [`VmConfig::run_script`], which boots QEMU, runs a script in the guest and returns a
//!   [`GuestRun`]: the script's exit code and output and the serial console log. QEMU is killed
//!   at the time-out, or earlier when the watch of [`VmConfig::run_script_watched`] fails (e.g.
//!   the vhost-user back-end died, which would otherwise hang the guest until the time-out).
//! - [`fio`]: [`FioJob`], a builder for the fio command lines the tests and `strata-vm` run.
//! - [`fs`]: vhost-user-fs workloads ([`FsWorkload`]: pjdfstest, a metadata benchmark, fio on
//!   a file in the share, a caller's script) rendered into one guest script by [`fs_script`],
//!   and [`FsReport`], which parses their output (pjdfstest's summary and failures, ops/s per
//!   metadata phase, fio IOPS). A VM with fs devices boots the fs variant of the guest
//!   ([`GuestVariant::Fs`], `build-guest.sh --fs`: pjdfstest, test users, setfacl/getfacl).
//!   The iSCSI tests boot [`GuestVariant::Iscsi`] (`build-guest.sh --iscsi`: open-iscsi's
//!   iscsiadm/iscsid, the iscsi_tcp and virtio_net modules) with [`VmConfig::net`], QEMU's
//!   user-mode network on which the host is 10.0.2.2.
//! - [`virtiofsd`]: [`Virtiofsd`], the reference vhost-user-fs back-end (virtiofsd 1.14.0,
//!   installed by `tools/install-virtiofsd.sh`), started fresh per boot.
//! - [`scratch`]: [`ScratchDir`], a self-removing temporary directory for images, sockets and
//!   QEMU's files.
//! - [`GuestError`]: what can go wrong, with the serial log attached where there is one.
//!
//! The binary `strata-vm` (src/bin/strata-vm.rs) boots the guest attached to given
//! vhost-user-blk sockets and runs a script or a short default fio job. The binary `fs-guest`
//! (src/bin/fs-guest.rs) boots the fs guest on a vhost-user-fs socket (or on a fresh virtiofsd
//! it starts) and runs [`FsWorkload`]s, printing the parsed results (or JSON).
//!
//! Guest protocol (shared with build-guest.sh): the script is handed over as the fw_cfg file
//! `opt/strata/script`; its stdout/stderr go to the second serial port; the init prints
//! `STRATA-GUEST-READY` on the console before the script and `STRATA-GUEST-EXIT=<code>` after
//! it, then powers off. Kernel parameter `strata.disks=N` makes the init wait for N disks.

pub mod fio;
pub mod fs;
pub mod image;
pub mod scratch;
pub mod virtiofsd;
pub mod vm;

pub use fio::FioJob;
pub use fs::{fs_script, FioSummary, FsReport, FsWorkload, MetaPhase, PjdfstestSummary};
pub use image::{ensure_guest, ensure_guest_variant, guest_dir, GuestImage, GuestVariant};
pub use scratch::ScratchDir;
pub use virtiofsd::{virtiofsd_binary, Virtiofsd};
pub use vm::{BlkDevice, FsDevice, GuestRun, VmConfig};

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// How many trailing lines of a log an error message shows.
const LOG_TAIL_LINES: usize = 40;

/// Errors of the guest harness.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// build-guest.sh failed or could not be run.
    #[error("building the guest failed: {0}")]
    Build(String),
    /// An I/O error on the harness side (scratch files, spawning QEMU).
    #[error("{context}: {source}")]
    Io {
        /// What the harness was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The VM did not finish within its time-out; QEMU was killed.
    #[error(
        "guest did not finish within {timeout:?} (QEMU killed)\n--- serial console (tail) ---\n{}\n--- script output (tail) ---\n{}",
        tail(serial_log),
        tail(output)
    )]
    Timeout {
        /// The time-out that expired.
        timeout: Duration,
        /// The serial console up to the kill.
        serial_log: String,
        /// The script's output up to the kill.
        output: String,
    },
    /// The caller's watch (see [`VmConfig::run_script_watched`]) stopped the run; QEMU was
    /// killed.
    #[error(
        "guest run aborted: {reason} (QEMU killed)\n--- serial console (tail) ---\n{}\n--- script output (tail) ---\n{}",
        tail(serial_log),
        tail(output)
    )]
    Aborted {
        /// Why the watch stopped the run.
        reason: String,
        /// The serial console up to the kill.
        serial_log: String,
        /// The script's output up to the kill.
        output: String,
    },
    /// QEMU exited without the guest reporting the script's exit code (QEMU could not start,
    /// a vhost-user socket refused, the guest kernel panicked, ...).
    #[error(
        "QEMU exited ({status}) without a script exit code\n--- QEMU stderr (tail) ---\n{}\n--- serial console (tail) ---\n{}\n--- script output (tail) ---\n{}",
        tail(qemu_log),
        tail(serial_log),
        tail(output)
    )]
    NoExitCode {
        /// QEMU's exit status.
        status: ExitStatus,
        /// QEMU's stderr.
        qemu_log: String,
        /// The serial console.
        serial_log: String,
        /// The script's output.
        output: String,
    },
    /// The script ran but exited non-zero (returned by [`GuestRun::expect_success`]).
    #[error(
        "guest script exited with {exit_code}\n--- script output (tail) ---\n{}\n--- serial console (tail) ---\n{}",
        tail(output),
        tail(serial_log)
    )]
    ScriptFailed {
        /// The script's exit code.
        exit_code: i32,
        /// The script's output.
        output: String,
        /// The serial console.
        serial_log: String,
    },
    /// A path the harness needs is not usable (e.g. a missing vhost-user socket).
    #[error("{0}: {1}")]
    BadPath(PathBuf, &'static str),
}

impl GuestError {
    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        GuestError::Io {
            context: context.into(),
            source,
        }
    }
}

/// The last [`LOG_TAIL_LINES`] lines of `log`.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    let start = lines.len().saturating_sub(LOG_TAIL_LINES);
    lines[start..].join("\n")
}

/// Result alias of this crate.
pub type Result<T, E = GuestError> = std::result::Result<T, E>;
