//! `pps`: receive packets per second per core, AF_XDP (frames steered by the XDP program)
//! against a kernel UDP socket (`recvmmsg`), for the same UDP flow on a veth pair, alternating
//! A B A B and printing medians; optionally DPDK's `net_null` receive-and-free loop as the
//! framework's per-packet overhead.
//!
//! Runs as root. It creates two network namespaces joined by a veth pair and removes them at
//! the end (also on error). A sender thread in namespace A, pinned to `--sender-cpu`, transmits
//! prebuilt 64-byte UDP frames through an `AF_PACKET` socket as fast as it can; the receiver
//! thread in B, pinned to `--receiver-cpu`, polls for `--seconds`.
//!
//! # What is measured, and why not just the receive rate
//!
//! On veth there is no NIC: the kernel's receive work for a frame (the XDP program and the copy
//! into the AF_XDP ring, or GRO, IP, UDP and the socket queue) runs in the receiving device's
//! NAPI poll, by default a softirq on the *sending* CPU. Both paths are then capped by the one
//! sender core, which does the transmit and the whole kernel receive; the receive rates mostly
//! show the sender's limit, and the receiver thread's CPU time leaves out the kernel's share of
//! each path. The comparison made here instead:
//!
//! - the same NAPI mode for both paths, as with a NIC: GRO on the receiving veth and TSO off on
//!   the sending one (veth then receives through NAPI without an XDP program too), and threaded
//!   NAPI (`/sys/class/net/DEV/threaded`), its kernel thread pinned to `--napi-cpu` (default:
//!   the receiver's CPU, so that one core does all of the receive work, as a NIC's interrupt
//!   and NAPI on the application's core; the receiver then yields the CPU on empty polls, as
//!   softirq processing would preempt it);
//! - the receive path's CPU cost per packet = the NAPI thread's run time (`/proc/TID/schedstat`:
//!   all of the kernel's receive work) per packet NAPI handled (the receiving veth's
//!   `rx_packets`), + the receiver thread's busy time (time stamp counter around polls that
//!   returned frames; idle polls are not work) per packet received. Packets NAPI handled but
//!   the receiver never got (socket buffer or AF_XDP ring full) are shown as `lost`;
//! - packets per second per core = 1 / that cost: the rate one core doing all of the receive
//!   work would reach, independent of which side of the veth pair was the bottleneck.
//!
//! The throughput columns (rx and sender Mpps) are printed too. `--softirq` keeps the kernel's
//! default (NAPI in the sender's softirq), in which the kernel's receive share cannot be
//! separated from the sender's. On veth the AF_XDP path also pays a copy real NICs do not:
//! veth converts each skb to an XDP buffer (frames sent by a socket lack XDP headroom) and then
//! copies it into the UMEM (copy mode). On a virtual machine, context switches (NAPI thread
//! wake-ups) are expensive and dominate both paths' kernel share at low batch sizes.

use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use ebpf::{ModePreference, SteerPort, Steering};
use net::af_xdp::{XskConfig, XskSocket};
use net::frame::{build_udp, FrameSpec, IpVersion, FRAME_MAX};
use net::packet_socket::PacketSocket;
use net::PacketIo;

/// Frames per transmit / receive burst.
const BURST: usize = 64;
/// Warm-up before counting (ARP, page faults, NAPI settling).
const WARMUP: Duration = Duration::from_millis(300);
/// Longest run accepted, so a typo cannot tie up a shared machine.
const MAX_SECONDS: u64 = 60;
const MAX_ROUNDS: u32 = 20;
const PORT: u16 = 4420;
const MAC_A: [u8; 6] = [0x02, 0x5b, 0, 0, 0, 0x0a];
const MAC_B: [u8; 6] = [0x02, 0x5b, 0, 0, 0, 0x0b];
const IP_A: Ipv4Addr = Ipv4Addr::new(10, 198, 0, 1);
const IP_B: Ipv4Addr = Ipv4Addr::new(10, 198, 0, 2);
/// The sender publishes its CPU time every this many bursts (a clock read per burst would be
/// part of what it measures).
const SENDER_CLOCK_EVERY: u32 = 16;
/// `SIOCETHTOOL` and the legacy `ETHTOOL_SGRO` command (uapi/linux/sockios.h, ethtool.h).
const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_SGRO: u32 = 0x2c;
const ETHTOOL_STSO: u32 = 0x1f;
/// Busy polls between deadline checks in a measurement window.
const DEADLINE_CHECK_EVERY: u32 = 64;
/// How long to wait for the NAPI kernel thread to appear after enabling threaded NAPI.
const NAPI_THREAD_WAIT: Duration = Duration::from_secs(2);

#[derive(Parser, Debug)]
#[command(
    about = "AF_XDP vs kernel UDP socket receive cost per packet on a veth pair \
                   (see the top of src/main.rs for the method)"
)]
struct Args {
    /// Measured seconds per run.
    #[arg(long, default_value_t = 2)]
    seconds: u64,
    /// Runs per path (alternating).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// UDP payload bytes (18 gives 64-byte frames with the 4-byte FCS counted).
    #[arg(long, default_value_t = 18)]
    payload: usize,
    #[arg(long, default_value_t = 0)]
    sender_cpu: usize,
    #[arg(long, default_value_t = 1)]
    receiver_cpu: usize,
    /// CPU of the receiving veth's NAPI kernel thread (default: the receiver's CPU).
    #[arg(long)]
    napi_cpu: Option<usize>,
    /// Keep NAPI in softirq context on the sending CPU (the kernel default): the kernel's
    /// receive work is then not measured separately.
    #[arg(long)]
    softirq: bool,
    /// Also time DPDK's net_null receive-and-free loop (build with `--features dpdk`).
    #[cfg(feature = "dpdk")]
    #[arg(long)]
    dpdk_null: bool,
}

/// The time stamp counter (x86_64) or a monotonic nanosecond clock elsewhere: cheap enough
/// to read around every poll.
#[allow(unused_unsafe)] // _rdtsc is an unsafe fn in older toolchains only
fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC has no preconditions (every x86_64 CPU has it); it only reads a counter.
        unsafe { std::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        u64::try_from(START.get_or_init(Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

fn thread_cpu_ns() -> u64 {
    // SAFETY: a zeroed timespec is valid and clock_gettime writes only into it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: as above; CLOCK_THREAD_CPUTIME_ID is always available on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Pins thread `tid` (0: the caller) to `cpu`.
fn pin(tid: libc::pid_t, cpu: usize) -> Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        bail!("cpu {cpu} out of range");
    }
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it (cpu < CPU_SETSIZE), and
    // sched_setaffinity reads exactly its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!(
                "pinning thread {tid} to cpu {cpu}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// DPDK `net_null` receive-and-free loop through [`PacketIo`]: the per-packet cost of the
/// framework (burst call, wrapper, mbuf free) with no device behind it. Timed twice, on the
/// same CPU: on the EAL main lcore, then on a plain thread as stratad's reactors are (which
/// registers with DPDK at its first burst and so also gets a per-lcore mbuf cache). Returns
/// (main lcore, registered thread) ns per packet.
#[cfg(feature = "dpdk")]
fn dpdk_null(args: &Args) -> Result<(f64, f64)> {
    use net::dpdk::{init_eal, no_huge_eal_args, DpdkPort, RuntimeDirGuard};
    let prefix = format!("strata-pps-{}", std::process::id());
    // Removed when this returns, also on errors (DPDK leaves it behind).
    let _runtime_dir = RuntimeDirGuard::new(&prefix);
    let eal = no_huge_eal_args(
        &prefix,
        args.receiver_cpu,
        &["--vdev=net_null0,size=64,copy=0"],
    );
    init_eal(&eal.iter().map(String::as_str).collect::<Vec<_>>())?;
    // init_eal leaves the caller's affinity as it was: pin explicitly.
    pin(0, args.receiver_cpu)?;
    let mut port = DpdkPort::open("net_null0")?;
    let seconds = args.seconds;
    let measure = move |port: &mut DpdkPort| -> Result<f64> {
        let warm_end = Instant::now() + WARMUP;
        while Instant::now() < warm_end {
            port.rx_burst(BURST, &mut |f| {
                std::hint::black_box(f);
            })?;
        }
        let c0 = thread_cpu_ns();
        let end = Instant::now() + Duration::from_secs(seconds);
        let mut n = 0u64;
        while Instant::now() < end {
            n += port.rx_burst(BURST, &mut |f| {
                std::hint::black_box(f);
            })? as u64;
        }
        let cpu = thread_cpu_ns() - c0;
        Ok(cpu as f64 / n.max(1) as f64)
    };
    let main_lcore = measure(&mut port)?;
    let cpu = args.receiver_cpu;
    let reactor_like = std::thread::spawn(move || -> Result<f64> {
        pin(0, cpu)?;
        measure(&mut port)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("DPDK measuring thread panicked"))??;
    Ok((main_lcore, reactor_like))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    AfXdp,
    KernelUdp,
}

#[derive(Debug, Clone, Copy)]
struct RunResult {
    rx_pps: f64,
    tx_pps: f64,
    /// Kernel receive work (the NAPI thread) per frame NAPI handled; None with --softirq.
    napi_ns: Option<f64>,
    /// Share of the frames NAPI handled that the receiver did not get.
    lost: f64,
    /// Receiver thread busy time per frame received.
    app_ns: f64,
    /// Sender thread CPU time per frame sent.
    sender_ns: f64,
}

impl RunResult {
    /// The receive path's CPU cost per frame (NAPI + application), if measured.
    fn path_ns(&self) -> Option<f64> {
        self.napi_ns.map(|k| k + self.app_ns)
    }
}

struct Namespaces {
    a: String,
    b: String,
    va: String,
    vb: String,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Namespaces {
    fn create(threaded_napi: bool) -> Result<Self> {
        let pid = std::process::id();
        // Device names unique to this process: the NAPI thread is found by its name.
        let ns = Self {
            a: format!("strata-ppsa{pid}"),
            b: format!("strata-ppsb{pid}"),
            va: format!("ppa{}", pid % 100_000),
            vb: format!("ppb{}", pid % 100_000),
        };
        let mac = |m: [u8; 6]| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        ip(&["netns", "add", &ns.a])?;
        ip(&["netns", "add", &ns.b])?;
        ip(&[
            "-n",
            &ns.a,
            "link",
            "add",
            &ns.va,
            "address",
            &mac(MAC_A),
            "type",
            "veth",
            "peer",
            "name",
            &ns.vb,
            "address",
            &mac(MAC_B),
            "netns",
            &ns.b,
        ])?;
        for (n, dev, addr) in [(&ns.a, &ns.va, IP_A), (&ns.b, &ns.vb, IP_B)] {
            ip(&["-n", n, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", n, "link", "set", dev, "up"])?;
        }
        // Static neighbours: the sender bypasses the stack, so nothing would answer ARP.
        ip(&[
            "-n",
            &ns.b,
            "neigh",
            "add",
            &IP_A.to_string(),
            "lladdr",
            &mac(MAC_A),
            "dev",
            &ns.vb,
        ])?;
        if threaded_napi {
            // GRO on the receiving end: veth receives through NAPI without an XDP program too
            // (both paths alike); then the NAPI instance can be made a kernel thread of its own.
            // TSO off on the sending end: veth bypasses NAPI for skbs of a TSO-capable sender
            // that GRO could not merge (`veth_skb_is_eligible_for_gro`), i.e. for every frame
            // of the kernel path. Neither matters to 64-byte frames otherwise.
            for (n, dev, cmd, on) in [
                (&ns.a, &ns.va, ETHTOOL_STSO, 0),
                (&ns.b, &ns.vb, ETHTOOL_SGRO, 1),
            ] {
                std::thread::scope(|s| {
                    s.spawn(move || -> Result<()> {
                        enter(n)?;
                        ethtool_set(dev, cmd, on)
                    })
                    .join()
                })
                .map_err(|_| anyhow::anyhow!("ethtool thread panicked"))??;
            }
            let out = Command::new("ip")
                .args(["netns", "exec", &ns.b, "sh", "-c"])
                .arg(format!("echo 1 > /sys/class/net/{}/threaded", ns.vb))
                .output()
                .context("running ip netns exec")?;
            if !out.status.success() {
                bail!(
                    "enabling threaded NAPI on {}: {} (try --softirq)",
                    ns.vb,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        Ok(ns)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in [&self.a, &self.b] {
            if let Err(e) = ip(&["netns", "del", n]) {
                eprintln!("pps: removing namespace {n}: {e}");
            }
        }
    }
}

/// `struct ifreq` with the `ifr_data` member (the size of the kernel's union).
#[repr(C)]
struct IfreqData {
    name: [u8; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

/// `struct ethtool_value`.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// A legacy ethtool set command on `dev` (in the calling thread's namespace), e.g.
/// `ETHTOOL_SGRO` 1 as `ethtool -K DEV gro on` (ethtool itself is not needed).
fn ethtool_set(dev: &str, cmd: u32, data: u32) -> Result<()> {
    let sock = UdpSocket::bind("0.0.0.0:0").context("control socket")?;
    let mut val = EthtoolValue { cmd, data };
    let mut req = IfreqData {
        name: [0; libc::IFNAMSIZ],
        data: std::ptr::from_mut(&mut val).cast(),
        _pad: [0; 16],
    };
    if dev.len() >= libc::IFNAMSIZ {
        bail!("interface name {dev:?} too long");
    }
    req.name[..dev.len()].copy_from_slice(dev.as_bytes());
    // SAFETY: `req` is a live ifreq whose data pointer points at a live ethtool_value; the
    // kernel reads and writes only those for ETHTOOL_SGRO.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL, std::ptr::from_mut(&mut req)) };
    if r != 0 {
        bail!(
            "ethtool command {cmd:#x} on {dev}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// The NAPI kernel threads of `dev` ("napi/DEV-ID", the name truncated to 15 bytes).
fn napi_threads(dev: &str) -> Result<Vec<libc::pid_t>> {
    let prefix = format!("napi/{dev}-");
    let mut tids = Vec::new();
    for e in std::fs::read_dir("/proc")
        .context("reading /proc")?
        .flatten()
    {
        let Some(pid) = e
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let comm = comm.trim_end();
        if comm.starts_with(&prefix) {
            tids.push(pid);
        }
    }
    Ok(tids)
}

/// Total run time (ns) of threads `tids`, from /proc/TID/schedstat.
fn run_time_ns(tids: &[libc::pid_t]) -> u64 {
    tids.iter()
        .filter_map(|t| std::fs::read_to_string(format!("/proc/{t}/schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// `rx_packets` of `dev` in the calling thread's namespace (/proc/thread-self/net/dev; veth
/// counts there every packet its NAPI handled).
fn rx_packets(dev: &str) -> Result<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/net/dev").context("net/dev")?;
    for line in text.lines() {
        if let Some((name, rest)) = line.split_once(':') {
            if name.trim() == dev {
                // Fields: rx bytes, rx packets, ...
                return rest
                    .split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse().ok())
                    .context("parsing net/dev");
            }
        }
    }
    bail!("{dev} not in /proc/thread-self/net/dev")
}

/// Moves the calling thread into namespace `ns`.
fn enter(ns: &str) -> Result<()> {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).context("opening namespace")?;
    // SAFETY: `f` is an open namespace file; setns changes only the calling thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// What the sender publishes for the receiver's measurement window.
struct SenderState {
    stop: AtomicBool,
    sent: AtomicU64,
    cpu_ns: AtomicU64,
}

/// One measurement window's raw figures.
struct Window {
    rx: u64,
    /// Packets the receiving veth's NAPI handled (its rx_packets).
    napi_pkts: u64,
    busy_ticks: u64,
    ticks: u64,
    elapsed: Duration,
    napi_ns: Option<u64>,
    sent: u64,
    sender_cpu_ns: u64,
}

/// Receives with `recv` (returns frames got, 0 when idle) for `seconds` after the warm-up,
/// timing the polls that found frames.
fn measure(
    seconds: u64,
    dev: &str,
    napi: Option<&[libc::pid_t]>,
    yield_when_idle: bool,
    sender: &SenderState,
    mut recv: impl FnMut() -> Result<usize>,
) -> Result<Window> {
    let warm_end = Instant::now() + WARMUP;
    while Instant::now() < warm_end {
        recv()?;
    }
    let napi0 = napi.map(run_time_ns);
    let pkts0 = rx_packets(dev)?;
    let (sent0, scpu0) = (
        sender.sent.load(Ordering::Relaxed),
        sender.cpu_ns.load(Ordering::Relaxed),
    );
    let t0 = Instant::now();
    let k0 = ticks();
    let end = t0 + Duration::from_secs(seconds);
    let (mut rx, mut busy, mut polls) = (0u64, 0u64, 0u32);
    loop {
        let t = ticks();
        let n = recv()? as u64;
        if n > 0 {
            rx += n;
            busy += ticks().wrapping_sub(t);
        }
        polls = polls.wrapping_add(1);
        // The clock is read on idle polls and every DEADLINE_CHECK_EVERY busy ones: a read per
        // busy poll would be counted as receive work.
        if (n == 0 || polls.is_multiple_of(DEADLINE_CHECK_EVERY)) && Instant::now() >= end {
            break;
        }
        if n == 0 && yield_when_idle {
            // Lets the NAPI thread on this CPU run now rather than at the next tick.
            std::thread::yield_now();
        }
    }
    let napi_pkts = rx_packets(dev)?.saturating_sub(pkts0);
    Ok(Window {
        rx,
        napi_pkts,
        busy_ticks: busy,
        ticks: ticks().wrapping_sub(k0),
        elapsed: t0.elapsed(),
        napi_ns: napi
            .map(run_time_ns)
            .zip(napi0)
            .map(|(a, b)| a.saturating_sub(b)),
        sent: sender.sent.load(Ordering::Relaxed) - sent0,
        sender_cpu_ns: sender.cpu_ns.load(Ordering::Relaxed) - scpu0,
    })
}

fn run(ns: &Namespaces, path: Path, args: &Args, frame: &[u8]) -> Result<RunResult> {
    let st = SenderState {
        stop: AtomicBool::new(false),
        sent: AtomicU64::new(0),
        cpu_ns: AtomicU64::new(0),
    };
    std::thread::scope(|s| -> Result<RunResult> {
        let sender = s.spawn(|| -> Result<()> {
            enter(&ns.a)?;
            pin(0, args.sender_cpu)?;
            let mut sock = PacketSocket::new(&ns.va, None)?;
            let burst: Vec<&[u8]> = vec![frame; BURST];
            let mut i = 0u32;
            while !st.stop.load(Ordering::Relaxed) {
                let n = sock.tx_burst(&burst)?;
                st.sent.fetch_add(n as u64, Ordering::Relaxed);
                i = i.wrapping_add(1);
                if i.is_multiple_of(SENDER_CLOCK_EVERY) {
                    st.cpu_ns.store(thread_cpu_ns(), Ordering::Relaxed);
                }
            }
            Ok(())
        });
        let receiver = || -> Result<RunResult> {
            enter(&ns.b)?;
            pin(0, args.receiver_cpu)?;
            let yield_idle =
                !args.softirq && args.napi_cpu.unwrap_or(args.receiver_cpu) == args.receiver_cpu;
            // Found (and pinned) after the program is attached: attaching may re-create NAPI.
            let napi_tids = || -> Result<Option<Vec<libc::pid_t>>> {
                if args.softirq {
                    return Ok(None);
                }
                let cpu = args.napi_cpu.unwrap_or(args.receiver_cpu);
                let end = Instant::now() + NAPI_THREAD_WAIT;
                loop {
                    let tids = napi_threads(&ns.vb)?;
                    if !tids.is_empty() {
                        for &t in &tids {
                            pin(t, cpu)?;
                        }
                        return Ok(Some(tids));
                    }
                    if Instant::now() > end {
                        bail!("no NAPI thread for {} (try --softirq)", ns.vb);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            };
            let w = match path {
                Path::AfXdp => {
                    let mut steer = Steering::load(&[SteerPort::both(PORT)])?;
                    steer.attach(&ns.vb, ModePreference::Auto)?;
                    let mut xsk = XskSocket::new(&ns.vb, 0, XskConfig::default())?;
                    steer.register_socket(0, xsk.wake_fd())?;
                    let tids = napi_tids()?;
                    measure(
                        args.seconds,
                        &ns.vb,
                        tids.as_deref(),
                        yield_idle,
                        &st,
                        || {
                            Ok(xsk.rx_burst(BURST, &mut |f| {
                                std::hint::black_box(f);
                            })?)
                        },
                    )?
                }
                Path::KernelUdp => {
                    let sock = UdpSocket::bind((IP_B, PORT))?;
                    sock.set_nonblocking(true)?;
                    let mut bufs = vec![[0u8; 2048]; BURST];
                    let tids = napi_tids()?;
                    measure(
                        args.seconds,
                        &ns.vb,
                        tids.as_deref(),
                        yield_idle,
                        &st,
                        || recvmmsg(&sock, &mut bufs),
                    )?
                }
            };
            let secs = w.elapsed.as_secs_f64();
            let rx = w.rx.max(1) as f64;
            let ns_per_tick = w.elapsed.as_nanos() as f64 / w.ticks.max(1) as f64;
            Ok(RunResult {
                rx_pps: w.rx as f64 / secs,
                tx_pps: w.sent as f64 / secs,
                napi_ns: w.napi_ns.map(|k| k as f64 / w.napi_pkts.max(1) as f64),
                lost: 1.0 - w.rx as f64 / w.napi_pkts.max(w.rx).max(1) as f64,
                app_ns: w.busy_ticks as f64 * ns_per_tick / rx,
                sender_ns: w.sender_cpu_ns as f64 / w.sent.max(1) as f64,
            })
        };
        let r = std::thread::scope(|s2| s2.spawn(receiver).join());
        st.stop.store(true, Ordering::Relaxed);
        let sender_result = sender.join();
        let r = r.map_err(|_| anyhow::anyhow!("receiver panicked"))??;
        sender_result.map_err(|_| anyhow::anyhow!("sender panicked"))??;
        Ok(r)
    })
}

fn recvmmsg(sock: &UdpSocket, bufs: &mut [[u8; 2048]]) -> Result<usize> {
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: all-zero is a valid mmsghdr.
    let mut msgs: Vec<libc::mmsghdr> = (0..bufs.len())
        .map(|_| unsafe { std::mem::zeroed() })
        .collect();
    for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: each header points at one live iovec over a live 2 KiB buffer; all outlive the
    // call, and the count passed is the number of headers.
    let r = unsafe {
        libc::recvmmsg(
            sock.as_raw_fd(),
            msgs.as_mut_ptr(),
            msgs.len() as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            return Ok(0);
        }
        return Err(e.into());
    }
    Ok(r as usize)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.seconds == 0 || args.seconds > MAX_SECONDS {
        bail!("--seconds must be 1..={MAX_SECONDS}");
    }
    if args.rounds == 0 || args.rounds > MAX_ROUNDS {
        bail!("--rounds must be 1..={MAX_ROUNDS}");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("pps needs root (namespaces, XDP, AF_XDP)");
    }
    let mut spec = FrameSpec::test(IpVersion::V4, PORT);
    spec.src_mac = MAC_A;
    spec.dst_mac = MAC_B;
    spec.src_ip = IP_A.into();
    spec.dst_ip = IP_B.into();
    let mut buf = [0u8; FRAME_MAX];
    let len = build_udp(&spec, &vec![0x5a; args.payload], &mut buf)?;
    let frame = &buf[..len];
    let ns = Namespaces::create(!args.softirq)?;
    let mut results: Vec<(Path, RunResult)> = Vec::new();
    let opt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
    for round in 0..args.rounds {
        for path in [Path::AfXdp, Path::KernelUdp] {
            let r = run(&ns, path, &args, frame)?;
            eprintln!(
                "round {round} {path:?}: rx {:.0} pps (sender {:.0} pps, lost {:.1}%), napi {} + \
                 app {:.1} ns/pkt, sender {:.1} ns/pkt",
                r.rx_pps,
                r.tx_pps,
                100.0 * r.lost,
                opt(r.napi_ns),
                r.app_ns,
                r.sender_ns
            );
            results.push((path, r));
        }
    }
    let napi_where = if args.softirq {
        "softirq on the sender's cpu (not separated)".to_owned()
    } else {
        format!(
            "threaded, cpu {}",
            args.napi_cpu.unwrap_or(args.receiver_cpu)
        )
    };
    println!(
        "frame {len} B (+4 B FCS), {} s x {} rounds, sender cpu {}, receiver cpu {}, NAPI {napi_where}",
        args.seconds, args.rounds, args.sender_cpu, args.receiver_cpu
    );
    println!(
        "{:<10} {:>8} {:>9} {:>6} {:>9} {:>9} {:>9} {:>10} {:>10}",
        "path",
        "rx Mpps",
        "send Mpps",
        "lost",
        "send ns",
        "napi ns",
        "app ns",
        "rx-path ns",
        "Mpps/core"
    );
    let mut med = Vec::new();
    for path in [Path::AfXdp, Path::KernelUdp] {
        let pick = |f: &dyn Fn(&RunResult) -> Option<f64>| -> Option<f64> {
            let v: Vec<f64> = results
                .iter()
                .filter(|(p, _)| *p == path)
                .filter_map(|(_, r)| f(r))
                .collect();
            (!v.is_empty()).then(|| median(v))
        };
        let rx = pick(&|r| Some(r.rx_pps)).unwrap_or(0.0);
        let path_ns = pick(&|r| r.path_ns());
        let per_core = path_ns.map(|ns| 1e3 / ns);
        med.push((rx, per_core));
        println!(
            "{:<10} {:>8.3} {:>9.3} {:>5.1}% {:>9.1} {:>9} {:>9.1} {:>10} {:>10}",
            format!("{path:?}"),
            rx / 1e6,
            pick(&|r| Some(r.tx_pps)).unwrap_or(0.0) / 1e6,
            100.0 * pick(&|r| Some(r.lost)).unwrap_or(0.0),
            pick(&|r| Some(r.sender_ns)).unwrap_or(0.0),
            opt(pick(&|r| r.napi_ns)),
            pick(&|r| Some(r.app_ns)).unwrap_or(0.0),
            opt(path_ns),
            per_core.map_or("-".to_owned(), |m| format!("{m:.3}")),
        );
    }
    if let [(xdp, xdp_core), (udp, udp_core)] = med[..] {
        if udp > 0.0 {
            println!(
                "AF_XDP / kernel UDP, throughput (sender-bound on veth): {:.2}x",
                xdp / udp
            );
        }
        if let (Some(x), Some(u)) = (xdp_core, udp_core) {
            println!(
                "AF_XDP / kernel UDP, packets per second per receive core: {:.2}x (target >= 2x)",
                x / u
            );
        }
    }
    #[cfg(feature = "dpdk")]
    if args.dpdk_null {
        let (main_lcore, reactor_like) = dpdk_null(&args)?;
        for (what, ns_pkt) in [
            ("EAL main lcore", main_lcore),
            ("registered non-EAL thread, as a reactor", reactor_like),
        ] {
            println!(
                "DPDK net_null receive-and-free, {what}: {ns_pkt:.1} ns/pkt, {:.1} Mpps/core \
                 (target <= 30 ns)",
                1e3 / ns_pkt
            );
        }
    }
    Ok(())
}
