//! Starting, measuring and stopping the servers under test (stratad and qemu-storage-daemon).
//!
//! Every server is started fresh for one measurement, pinned to the server CPU (the equivalent
//! of `taskset -c CPU`, done with `sched_setaffinity` between fork and exec) and tied to this
//! process with `PR_SET_PDEATHSIG`, so that no server outlives the bench even when the bench is
//! killed. Its CPU time is read from `/proc/PID/stat` (utime + stime of all its threads).

use std::fs::File;
use std::io;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::STOP;

/// How long a server may take to create its socket: QSD and stratad both listen within a few
/// milliseconds, this only bounds a hang.
const SOCKET_WAIT_MAX: Duration = Duration::from_secs(30);
/// How long a server may take to drain and exit after SIGTERM before it is killed.
const STOP_WAIT_MAX: Duration = Duration::from_secs(10);
/// Poll interval while waiting for a socket or an exit.
const WAIT_STEP: Duration = Duration::from_millis(5);
/// Size of the null device on both servers: 1 GiB, as in the anchor figures.
pub const NULL_SIZE: u64 = 1 << 30;
/// Room for one `/proc/PID/stat` line (its 52 fields are well under 1 KiB, even with a 16-byte
/// command name).
const STAT_BUF: usize = 1024;

/// Which server implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum System {
    /// Strata's daemon.
    Stratad,
    /// qemu-storage-daemon's vhost-user-blk export.
    Qsd,
    /// Strata's daemon serving a thin file of a vmfs datastore, as large as the raw image
    /// (with `--backend raw`; compare with `stratad` for vmfs against a raw file).
    Vmfs,
    /// A second stratad build (`--stratad-b`), run like `stratad`: two builds side by side.
    #[serde(rename = "stratad-b")]
    StratadB,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Stratad => "stratad",
            System::Qsd => "qsd",
            System::Vmfs => "vmfs",
            System::StratadB => "stratad-b",
        }
    }
}

/// Which storage behind the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// No storage: reads return zeroes, writes are dropped (QSD `null-co,read-zeroes=on`).
    Null,
    /// A raw image file through the page cache (QSD `file,cache.direct=off`).
    Raw,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Null => "null",
            Backend::Raw => "raw",
        }
    }
}

/// QSD's file AIO engine for the raw backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QsdAio {
    /// A worker thread pool doing preadv/pwritev (QEMU's default).
    Threads,
    /// Linux io_uring (stratad's engine too).
    #[value(name = "io_uring")]
    IoUring,
}

/// Everything needed to start one server.
#[derive(Debug, Clone)]
pub struct ServerSpec<'a> {
    pub system: System,
    pub backend: Backend,
    /// Raw image (only for `Backend::Raw`).
    pub image: &'a Path,
    pub queues: u32,
    pub cpu: usize,
    pub stratad_bin: &'a Path,
    pub qsd_bin: &'a Path,
    pub qsd_aio: QsdAio,
    /// Null backend: reads fill the buffer with zeroes (both servers get the same setting).
    pub read_zeroes: bool,
    /// One socket per disk (several disks only with the null backend).
    pub socks: Vec<PathBuf>,
    /// stratad's `--metrics` address (stratad and vmfs systems).
    pub metrics: Option<SocketAddr>,
    pub log: PathBuf,
    /// vmfs: write every block of the thin disk before the run (measure written space).
    pub vmfs_prefill: bool,
    /// The isolation scenario's two vmfs disks instead of `backend` (stratad systems only).
    pub isolation: Option<IsolationDisks>,
}

/// The isolation scenario's datastore: disk A (written space) and two B disks (never written:
/// one for B alone, one for B next to A), all thin files of one datastore served by one
/// stratad, sockets `socks[0..3]`.
#[derive(Debug, Clone, Copy)]
pub struct IsolationDisks {
    /// Size of disk A, every block written before the server starts.
    pub a_bytes: u64,
    /// Size of each B disk (thin, nothing written: its writes allocate).
    pub b_bytes: u64,
}

/// File names of the isolation scenario's disks: A, B (alone), B (next to A).
pub const ISOLATION_FILES: [&str; 3] = ["a.img", "b-alone.img", "b-with-a.img"];

impl ServerSpec<'_> {
    fn command(&self) -> Command {
        let sock = self
            .socks
            .first()
            .map(|s| s.display().to_string())
            .unwrap_or_default();
        match self.system {
            System::Stratad | System::StratadB if self.isolation.is_some() => {
                let mut cmd = Command::new(self.stratad_bin);
                cmd.arg("--cpus")
                    .arg(self.cpu.to_string())
                    .arg("--datastore")
                    .arg(self.datastore());
                for (sock, file) in self.socks.iter().zip(ISOLATION_FILES) {
                    cmd.arg("--disk").arg(format!(
                        "socket={},backend=vmfs,file={file},queues={}",
                        sock.display(),
                        self.queues
                    ));
                }
                if std::env::var_os("RUST_LOG").is_none() {
                    cmd.env("RUST_LOG", "warn");
                }
                cmd
            }
            System::Stratad | System::StratadB => {
                let mut cmd = Command::new(self.stratad_bin);
                cmd.arg("--cpus").arg(self.cpu.to_string());
                for sock in &self.socks {
                    let sock = sock.display();
                    let disk = match self.backend {
                        Backend::Null => format!(
                            "socket={sock},backend=null,size={NULL_SIZE},queues={},read-zeroes={}",
                            self.queues,
                            on_off(self.read_zeroes)
                        ),
                        Backend::Raw => format!(
                            "socket={sock},backend=raw,path={},queues={}",
                            self.image.display(),
                            self.queues
                        ),
                    };
                    cmd.arg("--disk").arg(disk);
                }
                if let Some(addr) = self.metrics {
                    cmd.arg("--metrics").arg(addr.to_string());
                }
                if std::env::var_os("RUST_LOG").is_none() {
                    cmd.env("RUST_LOG", "warn");
                }
                cmd
            }
            System::Vmfs => {
                let mut cmd = Command::new(self.stratad_bin);
                cmd.arg("--cpus")
                    .arg(self.cpu.to_string())
                    .arg("--datastore")
                    .arg(self.datastore())
                    .arg("--disk")
                    .arg(format!(
                        "socket={sock},backend=vmfs,file={VMFS_DISK},queues={}",
                        self.queues
                    ));
                if let Some(addr) = self.metrics {
                    cmd.arg("--metrics").arg(addr.to_string());
                }
                if std::env::var_os("RUST_LOG").is_none() {
                    cmd.env("RUST_LOG", "warn");
                }
                cmd
            }
            System::Qsd => {
                let mut cmd = Command::new(self.qsd_bin);
                for (i, sock) in self.socks.iter().enumerate() {
                    let sock = sock.display();
                    let blockdev = match self.backend {
                        Backend::Null => format!(
                            "driver=null-co,node-name=n{i},size={NULL_SIZE},read-zeroes={}",
                            on_off(self.read_zeroes)
                        ),
                        Backend::Raw => format!(
                            "driver=file,node-name=n{i},filename={},cache.direct=off,aio={}",
                            self.image.display(),
                            match self.qsd_aio {
                                QsdAio::Threads => "threads",
                                QsdAio::IoUring => "io_uring",
                            }
                        ),
                    };
                    let export = format!(
                        "type=vhost-user-blk,id=e{i},node-name=n{i},addr.type=unix,\
                         addr.path={sock},writable=on,num-queues={}",
                        self.queues
                    );
                    cmd.arg("--blockdev")
                        .arg(blockdev)
                        .arg("--export")
                        .arg(export);
                }
                cmd
            }
        }
    }
}

/// Name of the thin disk file inside the benchmark's datastore.
const VMFS_DISK: &str = "disk.img";
/// Datastore space beyond the disk: the fixed metadata regions (journal, tables) of a
/// volume of a few GiB fit in this.
const VMFS_SLACK_BYTES: u64 = 256 << 20;

impl ServerSpec<'_> {
    pub fn datastore(&self) -> PathBuf {
        self.log.with_extension("vmfs")
    }

    /// Makes a fresh datastore with the isolation scenario's disks: A thin with every block
    /// written, B thin and never written.
    fn prepare_isolation(&self, disks: IsolationDisks) -> anyhow::Result<()> {
        use std::sync::Arc;
        use vmfs::fs::{Datastore, MkfsOptions, WriteSeg};
        let path = self.datastore();
        let _ = std::fs::remove_file(&path);
        let a = disks.a_bytes;
        let dev = Arc::new(
            vmfs::device::FileDevice::create(
                &path,
                a + a / 16 + 2 * (disks.b_bytes + disks.b_bytes / 16) + VMFS_SLACK_BYTES,
            )
            .context("create datastore")?,
        );
        Datastore::mkfs(dev.clone(), &MkfsOptions { uuid: None }, &mut |_, _| {})
            .context("mkfs")?;
        let ds = Datastore::mount(dev).context("mount")?;
        let thin = vmfs::format::Provisioning::Thin;
        let [a_name, b_names @ ..] = ISOLATION_FILES;
        let ino = ds
            .create_file(a_name, thin, a, &mut |_, _| {})
            .context("create disk A")?;
        for b in b_names {
            ds.create_file(b, thin, disks.b_bytes, &mut |_, _| {})
                .with_context(|| format!("create disk {b}"))?;
        }
        let block = vec![0x5au8; vmfs::format::FILE_BLOCK as usize];
        let mut off = 0;
        while off < a {
            let n = (a - off).min(block.len() as u64) as usize;
            ds.write_batch(&[WriteSeg {
                ino,
                offset: off,
                data: &block[..n],
            }])
            .context("prefill disk A")?;
            off += n as u64;
        }
        ds.unmount().context("unmount")?;
        Ok(())
    }

    /// Makes a fresh datastore with a thin disk as large as the raw image; with
    /// `vmfs_prefill`, writes every block of it first.
    fn prepare_vmfs(&self) -> anyhow::Result<()> {
        use std::sync::Arc;
        use vmfs::fs::{Datastore, MkfsOptions, WriteSeg};
        let disk_bytes = std::fs::metadata(self.image)
            .context("raw image (vmfs disks take its size)")?
            .len();
        let path = self.datastore();
        let _ = std::fs::remove_file(&path);
        let dev = Arc::new(
            vmfs::device::FileDevice::create(
                &path,
                disk_bytes + disk_bytes / 16 + VMFS_SLACK_BYTES,
            )
            .context("create datastore")?,
        );
        Datastore::mkfs(dev.clone(), &MkfsOptions { uuid: None }, &mut |_, _| {})
            .context("mkfs")?;
        let ds = Datastore::mount(dev).context("mount")?;
        let ino = ds
            .create_file(
                VMFS_DISK,
                vmfs::format::Provisioning::Thin,
                disk_bytes,
                &mut |_, _| {},
            )
            .context("create thin disk")?;
        if self.vmfs_prefill {
            let block = vec![0x5au8; vmfs::format::FILE_BLOCK as usize];
            let mut off = 0;
            while off < disk_bytes {
                let n = (disk_bytes - off).min(block.len() as u64) as usize;
                ds.write_batch(&[WriteSeg {
                    ino,
                    offset: off,
                    data: &block[..n],
                }])
                .context("prefill")?;
                off += n as u64;
            }
        }
        ds.unmount().context("unmount")?;
        Ok(())
    }
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// A running server; killed on drop unless stopped before.
#[derive(Debug)]
pub struct Server {
    child: Option<Child>,
    pid: u32,
    system: System,
    log: PathBuf,
}

impl Server {
    /// Starts the server pinned to `spec.cpu` and waits until its socket exists.
    pub fn start(spec: &ServerSpec<'_>) -> anyhow::Result<Self> {
        for sock in &spec.socks {
            if sock.exists() {
                std::fs::remove_file(sock).context("remove stale socket")?;
            }
        }
        if spec.system == System::Vmfs {
            spec.prepare_vmfs()?;
        }
        if let Some(disks) = spec.isolation {
            spec.prepare_isolation(disks)?;
        }
        let log = File::create(&spec.log).context("create server log")?;
        let log_err = log.try_clone().context("clone server log")?;
        let mut cmd = spec.command();
        cmd.stdin(Stdio::null()).stdout(log).stderr(log_err);
        let cpu = spec.cpu;
        // SAFETY: the closure runs in the child between fork and exec and only makes the
        // async-signal-safe system calls prctl(2) and sched_setaffinity(2) on plain stack data.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                pin_current(cpu)
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", spec.system.name()))?;
        let mut server = Server {
            pid: child.id(),
            child: Some(child),
            system: spec.system,
            log: spec.log.clone(),
        };
        let deadline = Instant::now() + SOCKET_WAIT_MAX;
        // Servers create their sockets in order: the last one appearing means all are there.
        let last = spec.socks.last().context("no socket")?;
        while !last.exists() {
            if let Some(status) = server.try_wait()? {
                bail!(
                    "{} exited early with {status}; log:\n{}",
                    spec.system.name(),
                    server.log_tail()
                );
            }
            if STOP.load(Ordering::Relaxed) {
                bail!("interrupted");
            }
            if Instant::now() > deadline {
                bail!(
                    "socket {} did not appear; log:\n{}",
                    last.display(),
                    server.log_tail()
                );
            }
            std::thread::sleep(WAIT_STEP);
        }
        Ok(server)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => Ok(None),
        }
    }

    /// The last lines of the server's log, for error messages.
    pub fn log_tail(&self) -> String {
        /// Lines of server log quoted in an error.
        const TAIL_LINES: usize = 20;
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
    }

    /// SIGTERM, then wait for the exit (SIGKILL after `STOP_WAIT_MAX`).
    pub fn stop(mut self) -> anyhow::Result<ExitStatus> {
        let mut child = self.child.take().context("already stopped")?;
        let pid = libc::pid_t::try_from(child.id()).context("pid")?;
        // SAFETY: kill(2) on our own child's pid with a valid signal has no memory effects.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_WAIT_MAX;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{} did not exit within {STOP_WAIT_MAX:?} of SIGTERM",
                    self.system.name()
                );
            }
            std::thread::sleep(WAIT_STEP);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Pins the calling thread (and so its future children) to one CPU.
pub fn pin_current(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is a plain bit array for which all-zeroes is a valid (empty) value.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit inside `set`; it checks `cpu` against the set's size.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid, initialised cpu_set_t of the size passed; pid 0 is this thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads a process's CPU time (user + system, all threads) from `/proc/PID/stat` without
/// allocating: the file is opened once and re-read with pread.
#[derive(Debug)]
pub struct CpuClock {
    file: File,
    buf: [u8; STAT_BUF],
    ticks_per_sec: u64,
}

impl CpuClock {
    pub fn open(pid: u32) -> anyhow::Result<Self> {
        let file = File::open(format!("/proc/{pid}/stat")).context("open /proc/PID/stat")?;
        // SAFETY: sysconf has no memory effects.
        let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let ticks_per_sec = u64::try_from(tck)
            .ok()
            .filter(|&t| t > 0)
            .context("CLK_TCK")?;
        Ok(CpuClock {
            file,
            buf: [0; STAT_BUF],
            ticks_per_sec,
        })
    }

    /// utime + stime.
    pub fn read(&mut self) -> anyhow::Result<Duration> {
        let n = self
            .file
            .read_at(&mut self.buf, 0)
            .context("read /proc/PID/stat")?;
        let text = std::str::from_utf8(&self.buf[..n]).context("stat is not UTF-8")?;
        // The command name (field 2) is in parentheses and may contain spaces: fields after the
        // last ')' start with field 3 (state); utime and stime are fields 14 and 15.
        let rest = text
            .rsplit_once(')')
            .map(|(_, r)| r)
            .context("malformed stat")?;
        let mut fields = rest.split_ascii_whitespace().skip(11);
        let utime: u64 = fields
            .next()
            .context("no utime")?
            .parse()
            .context("utime")?;
        let stime: u64 = fields
            .next()
            .context("no stime")?
            .parse()
            .context("stime")?;
        let ticks = utime + stime;
        Ok(Duration::from_micros(
            ticks * 1_000_000 / self.ticks_per_sec,
        ))
    }
}

/// CPU time of this process (user + system), from getrusage(2).
pub fn self_cpu_time() -> Duration {
    // SAFETY: rusage is plain data for which all-zeroes is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Room for the head of `/proc/stat`: the per-CPU lines come first and fit easily (the long
/// `intr` line after them is not needed).
const PROC_STAT_HEAD: usize = 8192;

/// Busy and steal time of the benchmark's CPUs.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSample {
    /// user + nice + system + irq + softirq, summed over the CPUs.
    pub busy: Duration,
    /// Time the hypervisor ran something else, summed over the CPUs.
    pub steal: Duration,
}

/// Reads the busy time of the server and client CPUs from `/proc/stat`, so a run can report how
/// much CPU went to neither the server nor the load generator (builds, guests, kernel threads):
/// on a shared 2-core machine that is the main source of noise.
#[derive(Debug)]
pub struct SystemCpu {
    file: File,
    buf: Box<[u8]>,
    cpus: Vec<usize>,
    ticks_per_sec: u64,
}

impl SystemCpu {
    pub fn open(cpus: &[usize]) -> anyhow::Result<Self> {
        let file = File::open("/proc/stat").context("open /proc/stat")?;
        // SAFETY: sysconf has no memory effects.
        let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let ticks_per_sec = u64::try_from(tck)
            .ok()
            .filter(|&t| t > 0)
            .context("CLK_TCK")?;
        let mut cpus = cpus.to_vec();
        cpus.sort_unstable();
        cpus.dedup();
        Ok(SystemCpu {
            file,
            buf: vec![0; PROC_STAT_HEAD].into_boxed_slice(),
            cpus,
            ticks_per_sec,
        })
    }

    /// Number of distinct CPUs measured.
    pub fn cpu_count(&self) -> usize {
        self.cpus.len()
    }

    pub fn read(&mut self) -> anyhow::Result<CpuSample> {
        let n = self
            .file
            .read_at(&mut self.buf, 0)
            .context("read /proc/stat")?;
        let text = std::str::from_utf8(&self.buf[..n]).unwrap_or("");
        let (mut busy, mut steal, mut found) = (0u64, 0u64, 0usize);
        for line in text.lines() {
            let mut f = line.split_ascii_whitespace();
            let Some(name) = f.next() else { continue };
            let Some(idx) = name
                .strip_prefix("cpu")
                .and_then(|i| i.parse::<usize>().ok())
            else {
                continue;
            };
            if !self.cpus.contains(&idx) {
                continue;
            }
            // user nice system idle iowait irq softirq steal ...
            let v: Vec<u64> = f.take(8).map(|x| x.parse().unwrap_or(0)).collect();
            if v.len() < 8 {
                bail!("short /proc/stat line: {line}");
            }
            busy += v[0] + v[1] + v[2] + v[5] + v[6];
            steal += v[7];
            found += 1;
        }
        if found != self.cpus.len() {
            bail!("/proc/stat lacks some of CPUs {:?}", self.cpus);
        }
        let d = |t: u64| Duration::from_micros(t * 1_000_000 / self.ticks_per_sec);
        Ok(CpuSample {
            busy: d(busy),
            steal: d(steal),
        })
    }
}

/// How long a server's metrics endpoint may take to answer after its sockets appeared.
const METRICS_WAIT_MAX: Duration = Duration::from_secs(5);
/// Timeout of one metrics scrape (a scrape takes well under a millisecond).
const METRICS_TIMEOUT: Duration = Duration::from_secs(2);

/// A free TCP port on the loopback for stratad's `--metrics` (bound, read, released: another
/// process could take it in between, which would only make the server fail to start).
pub fn free_loopback_addr() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").context("bind a loopback port")?;
    l.local_addr().context("local_addr")
}

/// stratad's counters summed over reactors and queues (from its Prometheus endpoint).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Counters {
    pub busy_s: f64,
    /// Busy time in TSC cycles (busy_cycles / requests = cycles per I/O).
    pub busy_cycles: f64,
    pub spin_idle_s: f64,
    pub sleep_s: f64,
    pub sleeps: f64,
    pub requests: f64,
    pub pop_batches: f64,
    pub submits: f64,
    pub submitted_ops: f64,
    pub reap_batches: f64,
    pub reaped: f64,
    pub notifications: f64,
}

impl Counters {
    /// The difference `self - earlier`.
    pub fn since(&self, e: &Counters) -> Counters {
        Counters {
            busy_s: self.busy_s - e.busy_s,
            busy_cycles: self.busy_cycles - e.busy_cycles,
            spin_idle_s: self.spin_idle_s - e.spin_idle_s,
            sleep_s: self.sleep_s - e.sleep_s,
            sleeps: self.sleeps - e.sleeps,
            requests: self.requests - e.requests,
            pop_batches: self.pop_batches - e.pop_batches,
            submits: self.submits - e.submits,
            submitted_ops: self.submitted_ops - e.submitted_ops,
            reap_batches: self.reap_batches - e.reap_batches,
            reaped: self.reaped - e.reaped,
            notifications: self.notifications - e.notifications,
        }
    }

    /// Sums the samples of the families it knows in a Prometheus text exposition.
    pub fn parse(text: &str) -> Counters {
        let mut c = Counters::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((name_labels, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let name = name_labels.split('{').next().unwrap_or("");
            let Ok(v) = value.parse::<f64>() else {
                continue;
            };
            let field = match name {
                "strata_reactor_busy_seconds_total" => &mut c.busy_s,
                "strata_reactor_busy_cycles_total" => &mut c.busy_cycles,
                "strata_reactor_spin_idle_seconds_total" => &mut c.spin_idle_s,
                "strata_reactor_sleep_seconds_total" => &mut c.sleep_s,
                "strata_reactor_sleeps_total" => &mut c.sleeps,
                "strata_reactor_requests_total" => &mut c.requests,
                "strata_reactor_pop_batches_total" => &mut c.pop_batches,
                "strata_reactor_submits_total" => &mut c.submits,
                "strata_reactor_submitted_ops_total" => &mut c.submitted_ops,
                "strata_reactor_reap_batches_total" => &mut c.reap_batches,
                "strata_reactor_reaped_total" => &mut c.reaped,
                "strata_queue_notifications_total" => &mut c.notifications,
                _ => continue,
            };
            *field += v;
        }
        c
    }
}

/// Scrapes stratad's `--metrics` endpoint.
#[derive(Debug)]
pub struct MetricsProbe {
    addr: SocketAddr,
}

impl MetricsProbe {
    /// Waits until the endpoint answers.
    pub fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let probe = MetricsProbe { addr };
        let deadline = Instant::now() + METRICS_WAIT_MAX;
        loop {
            match probe.read() {
                Ok(_) => return Ok(probe),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(WAIT_STEP),
            }
        }
    }

    pub fn read(&self) -> anyhow::Result<Counters> {
        let mut s = TcpStream::connect_timeout(&self.addr, METRICS_TIMEOUT)
            .with_context(|| format!("connect to metrics {}", self.addr))?;
        s.set_read_timeout(Some(METRICS_TIMEOUT))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .context("send scrape")?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).context("read scrape")?;
        if !resp.starts_with("HTTP/1.0 200") {
            bail!(
                "metrics endpoint answered: {}",
                resp.lines().next().unwrap_or("")
            );
        }
        Ok(Counters::parse(resp.split("\r\n\r\n").nth(1).unwrap_or("")))
    }
}

/// Reads VmRSS and Threads from `/proc/PID/status`.
#[derive(Debug)]
pub struct ProcStatus {
    path: PathBuf,
}

impl ProcStatus {
    pub fn new(pid: u32) -> Self {
        ProcStatus {
            path: PathBuf::from(format!("/proc/{pid}/status")),
        }
    }

    /// (resident KiB, threads).
    pub fn read(&self) -> anyhow::Result<(u64, u64)> {
        let text = std::fs::read_to_string(&self.path).context("read /proc/PID/status")?;
        let field = |key: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_ascii_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Ok((field("VmRSS:"), field("Threads:")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_sum_over_reactors_and_queues() {
        let text = "# TYPE strata_reactor_requests_total counter\n\
            strata_reactor_requests_total{reactor=\"0\",cpu=\"1\"} 10\n\
            strata_reactor_requests_total{reactor=\"1\",cpu=\"\"} 5\n\
            strata_reactor_busy_seconds_total{reactor=\"0\",cpu=\"1\"} 0.25\n\
            strata_queue_notifications_total{disk=\"a b\",queue=\"0\"} 3\n\
            strata_queue_requests_total{disk=\"a\",queue=\"0\"} 99\n";
        let c = Counters::parse(text);
        assert_eq!(c.requests, 15.0);
        assert_eq!(c.busy_s, 0.25);
        assert_eq!(c.notifications, 3.0);
        let d = c.since(&Counters {
            requests: 5.0,
            ..Counters::default()
        });
        assert_eq!(d.requests, 10.0);
    }
}
