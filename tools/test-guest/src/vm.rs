//! Booting the guest under QEMU TCG and running one script in it.

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::image::{ensure_guest_variant, GuestImage, GuestVariant};
use crate::scratch::ScratchDir;
use crate::{GuestError, Result};

/// Default hard time-out of one VM run. A boot takes about 6 s under TCG on this project's
/// 2-core machines and the tests' fio jobs well under a minute; 5 minutes leaves room for a
/// loaded CI machine while a hung guest still fails the run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// How often the harness checks whether QEMU has exited (and whether the guest has booted).
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Default guest RAM: fio plus its libraries occupy ~90 MB of initramfs, unpacked in RAM.
pub const DEFAULT_MEMORY_MIB: u32 = 512;

/// Printed by the guest init on the console just before the script starts.
pub const READY_MARKER: &str = "STRATA-GUEST-READY";
/// Printed by the guest init on the console after the script, followed by its exit code.
pub const EXIT_MARKER: &str = "STRATA-GUEST-EXIT=";

/// A vhost-user-blk device (`-device vhost-user-blk-pci`). The first one is `/dev/vda` in the
/// guest, the second `/dev/vdb`, and so on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkDevice {
    /// The back-end's listening socket.
    pub socket: PathBuf,
    /// `num-queues`.
    pub num_queues: u16,
    /// `queue-size`; `None` keeps QEMU's default (128).
    pub queue_size: Option<u16>,
}

impl BlkDevice {
    /// A device on `socket` with `num_queues` queues.
    pub fn new(socket: impl Into<PathBuf>, num_queues: u16) -> Self {
        BlkDevice {
            socket: socket.into(),
            num_queues,
            queue_size: None,
        }
    }
}

/// A vhost-user-fs device (`-device vhost-user-fs-pci`), mounted in the guest by the script
/// with `mount -t virtiofs TAG /mnt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsDevice {
    /// The back-end's listening socket.
    pub socket: PathBuf,
    /// The mount tag.
    pub tag: String,
    /// `queue-size`; `None` keeps QEMU's default (128). [`FsDevice::new`] sets
    /// [`DEFAULT_FS_QUEUE_SIZE`].
    pub queue_size: Option<u16>,
}

/// The request queues' size of [`FsDevice::new`], as virtiofsd's documentation uses.
pub const DEFAULT_FS_QUEUE_SIZE: u16 = 1024;

impl FsDevice {
    /// A device on `socket` with mount tag `tag` and `queue-size=1024`.
    pub fn new(socket: impl Into<PathBuf>, tag: &str) -> Self {
        FsDevice {
            socket: socket.into(),
            tag: tag.to_string(),
            queue_size: Some(DEFAULT_FS_QUEUE_SIZE),
        }
    }
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// vCPUs (`-smp`).
    pub cpus: u32,
    /// Guest RAM in MiB (a shared memfd of this size).
    pub memory_mib: u32,
    /// vhost-user-blk devices, in guest order.
    pub blk: Vec<BlkDevice>,
    /// vhost-user-fs devices.
    pub fs: Vec<FsDevice>,
    /// Hard time-out: QEMU is killed when it expires.
    pub timeout: Duration,
    /// The QEMU binary (`$STRATA_QEMU`, else `qemu-system-x86_64` from `PATH`).
    pub qemu: PathBuf,
    /// Extra kernel command-line arguments.
    pub extra_kernel_args: Vec<String>,
    /// Extra QEMU arguments.
    pub extra_qemu_args: Vec<String>,
    /// The initramfs; `None` picks [`GuestVariant::Fs`] when there are fs devices, else
    /// [`GuestVariant::Base`].
    pub variant: Option<GuestVariant>,
    /// A virtio-net NIC on QEMU's user-mode network (slirp): the guest is 10.0.2.15/24 once
    /// its script configures eth0, and 10.0.2.2 is the host's loopback (a target listening on
    /// 127.0.0.1 is reachable there). No host-side set-up and no root needed.
    pub net: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            cpus: 1,
            memory_mib: DEFAULT_MEMORY_MIB,
            blk: Vec::new(),
            fs: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            qemu: std::env::var_os("STRATA_QEMU")
                .filter(|q| !q.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64")),
            extra_kernel_args: Vec::new(),
            extra_qemu_args: Vec::new(),
            variant: None,
            net: false,
        }
    }
}

/// The outcome of a script that ran to completion in the guest.
#[derive(Debug, Clone)]
pub struct GuestRun {
    /// The script's exit code.
    pub exit_code: i32,
    /// The script's stdout and stderr (second serial port), `\r` removed.
    pub output: String,
    /// The serial console (kernel messages and the init's markers), `\r` removed.
    pub serial_log: String,
    /// QEMU's own stderr.
    pub qemu_log: String,
    /// From QEMU's start to the guest's ready marker (as seen by polling the console).
    pub boot_time: Option<Duration>,
    /// From QEMU's start to its exit.
    pub elapsed: Duration,
}

impl GuestRun {
    /// Whether the script exited 0.
    pub fn success(&self) -> bool {
        self.exit_code == 0
    }

    /// `Ok(self)` if the script exited 0, else [`GuestError::ScriptFailed`] with the logs.
    pub fn expect_success(self) -> Result<Self> {
        if self.success() {
            Ok(self)
        } else {
            Err(GuestError::ScriptFailed {
                exit_code: self.exit_code,
                output: self.output,
                serial_log: self.serial_log,
            })
        }
    }
}

impl VmConfig {
    /// The defaults: 1 vCPU, [`DEFAULT_MEMORY_MIB`], no devices, [`DEFAULT_TIMEOUT`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the vCPU count.
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    /// Sets the guest RAM.
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Adds a vhost-user-blk device.
    pub fn blk(mut self, socket: impl Into<PathBuf>, num_queues: u16) -> Self {
        self.blk.push(BlkDevice::new(socket, num_queues));
        self
    }

    /// Adds a vhost-user-fs device.
    pub fn fs(mut self, socket: impl Into<PathBuf>, tag: &str) -> Self {
        self.fs.push(FsDevice::new(socket, tag));
        self
    }

    /// Sets the hard time-out.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Adds the user-mode network NIC (see [`VmConfig::net`]).
    pub fn net(mut self) -> Self {
        self.net = true;
        self
    }

    /// Boots the given initramfs variant (see [`VmConfig::variant`]).
    pub fn variant(mut self, variant: GuestVariant) -> Self {
        self.variant = Some(variant);
        self
    }

    /// The variant this configuration boots.
    pub fn image_variant(&self) -> GuestVariant {
        self.variant.unwrap_or(if self.fs.is_empty() {
            GuestVariant::Base
        } else {
            GuestVariant::Fs
        })
    }

    /// The kernel command line.
    pub fn kernel_cmdline(&self) -> String {
        let mut args = vec![
            "console=ttyS0".to_string(),
            "loglevel=1".to_string(),
            "quiet".to_string(),
            // Reboot (which -no-reboot turns into QEMU's exit) at once on a panic.
            "panic=-1".to_string(),
            format!("strata.disks={}", self.blk.len()),
        ];
        args.extend(self.extra_kernel_args.iter().cloned());
        args.join(" ")
    }

    /// QEMU's arguments for `image`, with the script and the serial logs at the given paths.
    pub fn qemu_args(&self, image: &GuestImage, files: &RunFiles) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |a: &str| args.push(OsString::from(a));
        push("-accel");
        push("tcg");
        push("-machine");
        push("q35");
        push("-cpu");
        push("max");
        push("-smp");
        push(&self.cpus.to_string());
        push("-m");
        push(&format!("{}M", self.memory_mib));
        // vhost-user back-ends map guest memory: it must be a shareable file descriptor.
        push("-object");
        push(&format!(
            "memory-backend-memfd,id=mem,size={}M,share=on",
            self.memory_mib
        ));
        push("-numa");
        push("node,memdev=mem");
        push("-nodefaults");
        push("-display");
        push("none");
        push("-monitor");
        push("none");
        push("-no-reboot");
        push("-kernel");
        push(&qemu_path(&image.kernel));
        push("-initrd");
        push(&qemu_path(&image.initrd));
        push("-append");
        push(&self.kernel_cmdline());
        push("-serial");
        push(&format!("file:{}", files.console.display()));
        push("-serial");
        push(&format!("file:{}", files.output.display()));
        push("-fw_cfg");
        push(&format!(
            "name=opt/strata/script,file={}",
            qemu_path(&files.script)
        ));
        for (i, dev) in self.blk.iter().enumerate() {
            push("-chardev");
            push(&format!("socket,id=blk{i},path={}", qemu_path(&dev.socket)));
            push("-device");
            let mut device = format!(
                "vhost-user-blk-pci,chardev=blk{i},num-queues={}",
                dev.num_queues
            );
            if let Some(size) = dev.queue_size {
                device.push_str(&format!(",queue-size={size}"));
            }
            push(&device);
        }
        for (i, dev) in self.fs.iter().enumerate() {
            push("-chardev");
            push(&format!("socket,id=fs{i},path={}", qemu_path(&dev.socket)));
            push("-device");
            let mut device = format!(
                "vhost-user-fs-pci,chardev=fs{i},tag={}",
                dev.tag.replace(',', ",,")
            );
            if let Some(size) = dev.queue_size {
                device.push_str(&format!(",queue-size={size}"));
            }
            push(&device);
        }
        if self.net {
            push("-netdev");
            push("user,id=net0");
            push("-device");
            // No option ROM: the guest boots with -kernel and never PXE-boots.
            push("virtio-net-pci,netdev=net0,romfile=");
        }
        for extra in &self.extra_qemu_args {
            push(extra);
        }
        args
    }

    /// Boots the guest, runs `script` (busybox sh) in it and waits for it to finish or for the
    /// time-out, whichever comes first. A script that ran returns `Ok` whatever its exit code
    /// (see [`GuestRun::expect_success`]).
    pub fn run_script(&self, script: &str) -> Result<GuestRun> {
        self.run_script_watched(script, || Ok(()))
    }

    /// [`VmConfig::run_script`], calling `watch` every poll interval while the guest runs: an
    /// `Err(reason)` (say, "the back-end exited") kills QEMU at once and returns
    /// [`GuestError::Aborted`] instead of waiting for the time-out.
    pub fn run_script_watched(
        &self,
        script: &str,
        mut watch: impl FnMut() -> std::result::Result<(), String>,
    ) -> Result<GuestRun> {
        let image = ensure_guest_variant(self.image_variant())?;
        for dev in &self.blk {
            if !dev.socket.exists() {
                return Err(GuestError::BadPath(
                    dev.socket.clone(),
                    "vhost-user-blk socket does not exist",
                ));
            }
        }
        for dev in &self.fs {
            if !dev.socket.exists() {
                return Err(GuestError::BadPath(
                    dev.socket.clone(),
                    "vhost-user-fs socket does not exist",
                ));
            }
        }
        let scratch = ScratchDir::new("strata-vm")?;
        let files = RunFiles::in_dir(scratch.path());
        std::fs::write(&files.script, script)
            .map_err(|e| GuestError::io(format!("write {}", files.script.display()), e))?;
        let qemu_log_file = File::create(&files.qemu_log)
            .map_err(|e| GuestError::io(format!("create {}", files.qemu_log.display()), e))?;
        let qemu_log_err = qemu_log_file
            .try_clone()
            .map_err(|e| GuestError::io("dup QEMU log fd", e))?;

        let mut cmd = Command::new(&self.qemu);
        cmd.args(self.qemu_args(&image, &files))
            .stdin(Stdio::null())
            .stdout(qemu_log_file)
            .stderr(qemu_log_err);
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
        // which is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                // QEMU must not outlive the harness (e.g. a test process killed by its runner).
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        tracing::debug!(qemu = %self.qemu.display(), cpus = self.cpus, blk = self.blk.len(), "booting guest");
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| GuestError::io(format!("spawn {}", self.qemu.display()), e))?;
        let waited = wait_for_exit(&mut child, &files, started, self.timeout, &mut watch);
        if waited.is_err() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let (end, boot_time) = waited?;
        let elapsed = started.elapsed();
        let serial_log = read_log(&files.console);
        let output = read_log(&files.output);
        let qemu_log = read_log(&files.qemu_log);
        let status = match end {
            WaitEnd::Exited(status) => status,
            WaitEnd::TimedOut => {
                return Err(GuestError::Timeout {
                    timeout: self.timeout,
                    serial_log,
                    output,
                })
            }
            WaitEnd::Aborted(reason) => {
                return Err(GuestError::Aborted {
                    reason,
                    serial_log,
                    output,
                })
            }
        };
        match parse_exit_code(&serial_log) {
            Some(exit_code) => Ok(GuestRun {
                exit_code,
                output,
                serial_log,
                qemu_log,
                boot_time,
                elapsed,
            }),
            None => Err(GuestError::NoExitCode {
                status,
                qemu_log,
                serial_log,
                output,
            }),
        }
    }
}

/// The files of one run, in its scratch directory.
#[derive(Debug, Clone)]
pub struct RunFiles {
    /// The script, handed to the guest through fw_cfg.
    pub script: PathBuf,
    /// First serial port: the console.
    pub console: PathBuf,
    /// Second serial port: the script's output.
    pub output: PathBuf,
    /// QEMU's stdout and stderr.
    pub qemu_log: PathBuf,
}

impl RunFiles {
    /// The standard names in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        RunFiles {
            script: dir.join("script.sh"),
            console: dir.join("console.log"),
            output: dir.join("output.log"),
            qemu_log: dir.join("qemu.log"),
        }
    }
}

/// How a wait for QEMU ended.
#[derive(Debug)]
enum WaitEnd {
    /// QEMU exited by itself.
    Exited(std::process::ExitStatus),
    /// The time-out expired; QEMU was killed.
    TimedOut,
    /// The watch callback failed with this reason; QEMU was killed.
    Aborted(String),
}

/// Waits for QEMU to exit, killing it at the time-out or when `watch` fails; also returns the
/// boot time if the ready marker was seen.
fn wait_for_exit(
    child: &mut Child,
    files: &RunFiles,
    started: Instant,
    timeout: Duration,
    watch: &mut dyn FnMut() -> std::result::Result<(), String>,
) -> Result<(WaitEnd, Option<Duration>)> {
    let mut boot_time = None;
    loop {
        let exited = child
            .try_wait()
            .map_err(|e| GuestError::io("wait for QEMU", e))?;
        if boot_time.is_none() && read_log(&files.console).contains(READY_MARKER) {
            boot_time = Some(started.elapsed());
        }
        if let Some(status) = exited {
            return Ok((WaitEnd::Exited(status), boot_time));
        }
        let end = if started.elapsed() >= timeout {
            tracing::warn!(?timeout, "guest timed out, killing QEMU");
            Some(WaitEnd::TimedOut)
        } else if let Err(reason) = watch() {
            tracing::warn!(%reason, "guest run aborted, killing QEMU");
            Some(WaitEnd::Aborted(reason))
        } else {
            None
        };
        if let Some(end) = end {
            let _ = child.kill();
            let _ = child.wait();
            return Ok((end, boot_time));
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// A log file as text (lossy UTF-8, `\r` removed); empty if it cannot be read.
fn read_log(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).replace('\r', ""),
        Err(_) => String::new(),
    }
}

/// The script's exit code from the last [`EXIT_MARKER`] on the console.
pub fn parse_exit_code(serial_log: &str) -> Option<i32> {
    let at = serial_log.rfind(EXIT_MARKER)?;
    let digits: String = serial_log[at + EXIT_MARKER.len()..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// A path as a QEMU option value: commas are doubled, QEMU's escape.
fn qemu_path(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_code_is_the_last_marker() {
        assert_eq!(parse_exit_code("x\nSTRATA-GUEST-EXIT=0\n"), Some(0));
        assert_eq!(
            parse_exit_code("STRATA-GUEST-EXIT=3\n[ 1.0] foo STRATA-GUEST-EXIT=127\n"),
            Some(127)
        );
        assert_eq!(parse_exit_code("STRATA-GUEST-READY\n"), None);
        assert_eq!(parse_exit_code("STRATA-GUEST-EXIT=\n"), None);
    }

    #[test]
    fn qemu_args_attach_devices_with_shared_memory() {
        let image = GuestImage {
            kernel: PathBuf::from("/g/vmlinuz"),
            initrd: PathBuf::from("/g/initrd.img"),
            manifest: String::new(),
        };
        let cfg = VmConfig::new()
            .cpus(2)
            .blk("/s/a,b.sock", 2)
            .fs("/s/fs.sock", "data");
        let files = RunFiles::in_dir(Path::new("/r"));
        let args: Vec<String> = cfg
            .qemu_args(&image, &files)
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("-accel tcg"));
        assert!(joined.contains("memory-backend-memfd,id=mem,size=512M,share=on"));
        assert!(joined.contains("-smp 2"));
        assert!(joined.contains("socket,id=blk0,path=/s/a,,b.sock"));
        assert!(joined.contains("vhost-user-blk-pci,chardev=blk0,num-queues=2"));
        assert!(joined.contains("vhost-user-fs-pci,chardev=fs0,tag=data,queue-size=1024"));
        assert_eq!(cfg.image_variant(), GuestVariant::Fs);
        assert_eq!(VmConfig::new().image_variant(), GuestVariant::Base);
        assert!(joined.contains("name=opt/strata/script,file=/r/script.sh"));
        assert!(cfg.kernel_cmdline().contains("strata.disks=1"));
        assert!(!joined.contains("-netdev"));
        let net = VmConfig::new().net().variant(GuestVariant::Iscsi);
        let joined = net
            .qemu_args(&image, &files)
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(joined.contains("-netdev user,id=net0"), "{joined}");
        assert!(joined.contains("virtio-net-pci,netdev=net0"), "{joined}");
        assert_eq!(net.image_variant(), GuestVariant::Iscsi);
    }
}
