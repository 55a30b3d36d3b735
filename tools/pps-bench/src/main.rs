//! `pps`: receive packets per second on one core, AF_XDP (frames steered by the XDP program)
//! against a kernel UDP socket (`recvmmsg`), for the same UDP flow on a veth pair, alternating
//! A B A B and printing medians.
//!
//! Runs as root. It creates two network namespaces joined by a veth pair and removes them at
//! the end (also on error). A sender thread in namespace A, pinned to `--sender-cpu`, transmits
//! prebuilt 64-byte UDP frames through an `AF_PACKET` socket as fast as it can; the receiver
//! thread in B, pinned to `--receiver-cpu`, counts what arrives for `--seconds`. Besides
//! packets per second it reports the receiver thread's CPU time per packet. On veth, the
//! kernel's receive work (XDP, or the IP/UDP stack) runs in the softirq of the *sending* CPU,
//! so the receiver figure is the userspace side of each path; the sender rate shows whether the
//! sender was the bottleneck.

use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use dataplane::net::af_xdp::{XskConfig, XskSocket};
use dataplane::net::frame::{build_udp, FrameSpec, IpVersion, FRAME_MAX};
use dataplane::net::packet_socket::PacketSocket;
use dataplane::net::PacketIo;
use ebpf::{ModePreference, SteerPort, Steering};

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

#[derive(Parser, Debug)]
#[command(about = "AF_XDP vs kernel UDP socket receive rate on a veth pair")]
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
    /// Also time DPDK's net_null receive-and-free loop (build with `--features dpdk`).
    #[cfg(feature = "dpdk")]
    #[arg(long)]
    dpdk_null: bool,
}

/// DPDK `net_null` receive-and-free loop through [`PacketIo`]: the per-packet cost of the
/// framework (burst call, wrapper, mbuf free) with no device behind it.
#[cfg(feature = "dpdk")]
fn dpdk_null(args: &Args) -> Result<()> {
    use dataplane::net::dpdk::{init_eal, DpdkPort};
    let prefix = format!("--file-prefix=strata-pps-{}", std::process::id());
    let lcore = args.receiver_cpu.to_string();
    init_eal(&[
        "--no-huge",
        "-m",
        "256",
        "--no-pci",
        &prefix,
        "-l",
        &lcore,
        "--log-level=error",
        "--vdev=net_null0,size=64,copy=0",
    ])?;
    let mut port = DpdkPort::open("net_null0")?;
    let (n, cpu, secs) = measure(args.seconds, || {
        Ok(port.rx_burst(BURST, &mut |f| {
            std::hint::black_box(f);
        })?)
    })?;
    println!(
        "{:<12} {:>14.3} {:>14} {:>18.1}",
        "DPDK null",
        n as f64 / secs / 1e6,
        "-",
        cpu as f64 / n.max(1) as f64
    );
    Ok(())
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
    rx_cpu_ns_per_pkt: f64,
}

struct Namespaces {
    a: String,
    b: String,
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
    fn create() -> Result<Self> {
        let pid = std::process::id();
        let ns = Self {
            a: format!("strata-ppsa{pid}"),
            b: format!("strata-ppsb{pid}"),
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
            "va",
            "address",
            &mac(MAC_A),
            "type",
            "veth",
            "peer",
            "name",
            "vb",
            "address",
            &mac(MAC_B),
            "netns",
            &ns.b,
        ])?;
        for (n, dev, addr) in [(&ns.a, "va", IP_A), (&ns.b, "vb", IP_B)] {
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
            "vb",
        ])?;
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

/// Moves the calling thread into namespace `ns` and onto `cpu`.
fn enter(ns: &str, cpu: usize) -> Result<()> {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).context("opening namespace")?;
    // SAFETY: `f` is an open namespace file; setns changes only the calling thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it (cpu is bounded by
    // CPU_SETSIZE below), and sched_setaffinity reads exactly its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= libc::CPU_SETSIZE as usize {
            bail!("cpu {cpu} out of range");
        }
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("pinning to cpu {cpu}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn thread_cpu_ns() -> u64 {
    // SAFETY: a zeroed timespec is valid and clock_gettime writes only into it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: as above; CLOCK_THREAD_CPUTIME_ID is always available on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Receives with `recv` (returns frames got, 0 when idle) until `stop`; counts after warm-up.
fn measure(seconds: u64, mut recv: impl FnMut() -> Result<usize>) -> Result<(u64, u64, f64)> {
    let warm_end = Instant::now() + WARMUP;
    while Instant::now() < warm_end {
        recv()?;
    }
    let t0 = Instant::now();
    let c0 = thread_cpu_ns();
    let end = t0 + Duration::from_secs(seconds);
    let mut n = 0u64;
    while Instant::now() < end {
        n += recv()? as u64;
    }
    let cpu = thread_cpu_ns() - c0;
    Ok((n, cpu, t0.elapsed().as_secs_f64()))
}

fn run(ns: &Namespaces, path: Path, args: &Args, frame: &[u8]) -> Result<RunResult> {
    let stop = AtomicBool::new(false);
    let sent = AtomicU64::new(0);
    std::thread::scope(|s| -> Result<RunResult> {
        let sender = s.spawn(|| -> Result<()> {
            enter(&ns.a, args.sender_cpu)?;
            let mut sock = PacketSocket::new("va", None)?;
            let burst: Vec<&[u8]> = vec![frame; BURST];
            while !stop.load(Ordering::Relaxed) {
                let n = sock.tx_burst(&burst)?;
                sent.fetch_add(n as u64, Ordering::Relaxed);
            }
            Ok(())
        });
        let receiver = || -> Result<RunResult> {
            enter(&ns.b, args.receiver_cpu)?;
            let sent0 = sent.load(Ordering::Relaxed);
            let t_send = Instant::now();
            let (n, cpu, secs) = match path {
                Path::AfXdp => {
                    let mut steer = Steering::load(&[SteerPort::both(PORT)])?;
                    steer.attach("vb", ModePreference::Auto)?;
                    let mut xsk = XskSocket::new("vb", 0, XskConfig::default())?;
                    steer.register_socket(0, xsk.wake_fd())?;
                    measure(args.seconds, || {
                        Ok(xsk.rx_burst(BURST, &mut |f| {
                            std::hint::black_box(f);
                        })?)
                    })?
                }
                Path::KernelUdp => {
                    let sock = UdpSocket::bind((IP_B, PORT))?;
                    sock.set_nonblocking(true)?;
                    let mut bufs = vec![[0u8; 2048]; BURST];
                    measure(args.seconds, || recvmmsg(&sock, &mut bufs))?
                }
            };
            let tx = sent.load(Ordering::Relaxed) - sent0;
            let tx_secs = t_send.elapsed().as_secs_f64();
            Ok(RunResult {
                rx_pps: n as f64 / secs,
                tx_pps: tx as f64 / tx_secs,
                rx_cpu_ns_per_pkt: if n > 0 { cpu as f64 / n as f64 } else { 0.0 },
            })
        };
        let r = std::thread::scope(|s2| s2.spawn(receiver).join());
        stop.store(true, Ordering::Relaxed);
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
    let ns = Namespaces::create()?;
    let mut results: Vec<(Path, RunResult)> = Vec::new();
    for round in 0..args.rounds {
        for path in [Path::AfXdp, Path::KernelUdp] {
            let r = run(&ns, path, &args, frame)?;
            eprintln!(
                "round {round} {path:?}: rx {:.0} pps (sender {:.0} pps), receiver {:.1} ns/pkt",
                r.rx_pps, r.tx_pps, r.rx_cpu_ns_per_pkt
            );
            results.push((path, r));
        }
    }
    println!(
        "frame {len} B (+4 B FCS), {} s x {} rounds, sender cpu {}, receiver cpu {}",
        args.seconds, args.rounds, args.sender_cpu, args.receiver_cpu
    );
    println!(
        "{:<12} {:>14} {:>14} {:>18}",
        "path", "rx Mpps", "sender Mpps", "rx-thread ns/pkt"
    );
    let mut med = Vec::new();
    for path in [Path::AfXdp, Path::KernelUdp] {
        let pick = |f: fn(&RunResult) -> f64| {
            median(
                results
                    .iter()
                    .filter(|(p, _)| *p == path)
                    .map(|(_, r)| f(r))
                    .collect(),
            )
        };
        let rx = pick(|r| r.rx_pps);
        med.push(rx);
        println!(
            "{:<12} {:>14.3} {:>14.3} {:>18.1}",
            format!("{path:?}"),
            rx / 1e6,
            pick(|r| r.tx_pps) / 1e6,
            pick(|r| r.rx_cpu_ns_per_pkt)
        );
    }
    if let [xdp, udp] = med[..] {
        if udp > 0.0 {
            println!("AF_XDP / kernel UDP: {:.2}x", xdp / udp);
        }
    }
    #[cfg(feature = "dpdk")]
    if args.dpdk_null {
        dpdk_null(&args)?;
    }
    Ok(())
}
