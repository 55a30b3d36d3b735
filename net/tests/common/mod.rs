//! Network namespaces and veth pairs for the steering tests: each test gets its own pair of
//! namespaces joined by a veth pair with fixed MACs and addresses, removed on drop (also when
//! the test fails, since the guard drops during unwinding).

#![allow(dead_code)] // each test binary uses a different subset

use std::net::UdpSocket;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const MAC_A: [u8; 6] = [0x02, 0x5a, 0, 0, 0, 0x0a];
pub const MAC_B: [u8; 6] = [0x02, 0x5a, 0, 0, 0, 0x0b];

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Deletes namespaces left by test processes that were killed before their guards ran
/// (names carry the creating pid).
fn sweep_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name
            .strip_prefix("strata-a")
            .or_else(|| name.strip_prefix("strata-b"))
        else {
            continue;
        };
        let Some(pid) = rest.split('-').next() else {
            continue;
        };
        if !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

/// Why a test cannot run here, if it cannot: the only reasons to skip.
pub fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (XDP, AF_XDP and network namespaces)".into());
    }
    if !std::path::Path::new("/proc/self/ns/net").exists() {
        return Some("kernel without network namespaces".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("iproute2 (ip) is not installed: run tools/install-deps.sh".into());
    }
    None
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Two namespaces `ns_a`, `ns_b` with `va` (in A, 10.199.k.1, fd99:k::1) and `vb` (in B,
/// 10.199.k.2, fd99:k::2).
#[derive(Debug)]
pub struct VethPair {
    pub ns_a: String,
    pub ns_b: String,
    pub va: String,
    pub vb: String,
    pub ip4_a: std::net::Ipv4Addr,
    pub ip4_b: std::net::Ipv4Addr,
    pub ip6_a: std::net::Ipv6Addr,
    pub ip6_b: std::net::Ipv6Addr,
}

impl VethPair {
    /// Creates the pair; `Err` carries a skip message when the kernel lacks veth.
    pub fn new() -> Result<Self, String> {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        sweep_stale();
        let tag = format!("{pid}-{k}");
        let subnet = u8::try_from((pid + k * 7) % 200 + 20).unwrap_or(20);
        let p = Self {
            ns_a: format!("strata-a{tag}"),
            ns_b: format!("strata-b{tag}"),
            va: "va".into(),
            vb: "vb".into(),
            ip4_a: std::net::Ipv4Addr::new(10, 199, subnet, 1),
            ip4_b: std::net::Ipv4Addr::new(10, 199, subnet, 2),
            ip6_a: format!("fd99:{subnet}::1").parse().expect("IPv6 literal"),
            ip6_b: format!("fd99:{subnet}::2").parse().expect("IPv6 literal"),
        };
        // From here on, `p`'s drop removes whatever was created.
        ip(&["netns", "add", &p.ns_a])?;
        ip(&["netns", "add", &p.ns_b])?;
        // Created inside A, so a name clash with the host is impossible; peer moved to B.
        let r = ip(&[
            "-n",
            &p.ns_a,
            "link",
            "add",
            &p.va,
            "address",
            &mac_str(MAC_A),
            "type",
            "veth",
            "peer",
            "name",
            &p.vb,
            "address",
            &mac_str(MAC_B),
            "netns",
            &p.ns_b,
        ]);
        if let Err(e) = r {
            if e.contains("not supported") {
                return Err(format!("SKIP: kernel without veth: {e}"));
            }
            return Err(e);
        }
        for (ns, dev, v4, v6) in [
            (&p.ns_a, &p.va, p.ip4_a, p.ip6_a),
            (&p.ns_b, &p.vb, p.ip4_b, p.ip6_b),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", dev])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(p)
    }

    /// Runs `f` on a thread inside namespace `ns` (sockets and interface lookups made there
    /// belong to it).
    pub fn run_in<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{ns}");
        std::thread::scope(|s| {
            s.spawn(move || {
                let file = std::fs::File::open(&path).expect("open namespace");
                use std::os::fd::AsRawFd;
                // SAFETY: `file` is an open namespace file; setns changes only this thread.
                let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("scoped namespace thread")
        })
    }

    /// Whether `vb` has an XDP program attached, per `ip link`.
    pub fn xdp_attached(&self) -> bool {
        let out = Command::new("ip")
            .args(["-n", &self.ns_b, "-d", "link", "show", &self.vb])
            .output()
            .expect("run ip link show");
        let s = String::from_utf8_lossy(&out.stdout);
        s.contains("prog/xdp") || s.contains(" xdp")
    }

    /// `ping` from A to `dst` (IPv4 or IPv6): success of 2 echo requests.
    pub fn ping_from_a(&self, dst: &str) -> bool {
        Command::new("ip")
            .args([
                "netns", "exec", &self.ns_a, "ping", "-c", "2", "-i", "0.2", "-W", "2", dst,
            ])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        // Deleting a namespace destroys its veth end, and with it the peer.
        for ns in [&self.ns_a, &self.ns_b] {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// Runs `body` with a fresh pair, or says why it cannot run here (a failure in CI:
/// `dataplane::test_gate`).
pub fn with_pair(name: &str, body: impl FnOnce(&VethPair)) {
    if let Some(why) = skip_reason() {
        dataplane::test_gate::skip(name, &why);
        return;
    }
    match VethPair::new() {
        Ok(p) => body(&p),
        Err(e) if e.starts_with("SKIP") => dataplane::test_gate::skip(name, &e),
        Err(e) => panic!("{name}: setting up namespaces: {e}"),
    }
}

/// Datagrams received on `sock` until `want` have arrived and the socket has been quiet for
/// 300 ms (so extra, wrongly passed datagrams are counted too), or 5 s have passed.
pub fn recv_all(sock: &UdpSocket, want: usize) -> usize {
    const DEADLINE: Duration = Duration::from_secs(5);
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("socket timeout");
    let mut buf = [0u8; 2048];
    let mut n = 0;
    let end = Instant::now() + DEADLINE;
    while Instant::now() < end {
        match sock.recv(&mut buf) {
            Ok(_) => n += 1,
            Err(_) if n >= want => break,
            Err(_) => {}
        }
    }
    n
}

/// From the calling thread's namespace, sends `per_flow` UDP datagrams to each of three flows:
/// IPv4 to storage port 4420 ("storage4 N"), IPv6 to storage port 3260 ("storage6 N"), and IPv4
/// to non-storage port 9999 ("other N"). Paced (2 ms every 32) so that socket buffers and rings,
/// not steering, never drop on a loaded machine.
pub fn send_mixed_flows(ip4: std::net::Ipv4Addr, ip6: std::net::Ipv6Addr, per_flow: usize) {
    let s4 = UdpSocket::bind("0.0.0.0:0").expect("bind IPv4");
    let s6 = UdpSocket::bind("[::]:0").expect("bind IPv6");
    for i in 0..per_flow {
        s4.send_to(format!("storage4 {i}").as_bytes(), (ip4, 4420))
            .expect("send storage4");
        s6.send_to(format!("storage6 {i}").as_bytes(), (ip6, 3260))
            .expect("send storage6");
        s4.send_to(format!("other {i}").as_bytes(), (ip4, 9999))
            .expect("send other");
        if i % 32 == 31 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}
