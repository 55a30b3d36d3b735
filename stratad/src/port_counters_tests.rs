//! Ports on a veth pair, as root, both ends in private network namespaces (the host's links and
//! routes are never touched): stratad's side in one, where the whole test body runs (reactor
//! threads inherit it, so DPDK's close, which detaches by interface index from whichever
//! thread drops the last queue, sees the same namespace), the peer in another that sends
//! storage, other and malformed traffic. The counters are read as clients read them: the
//! control socket's `stratad_stats` and a `--metrics` scrape.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::spec::parse_port_spec;
use dataplane::engine::EngineKind;
use dataplane::server::{Server, ServerConfig};
use net::packet_socket::PacketSocket;
use net::PacketIo;
use serde_json::Value;

use crate::ports::*;

/// Datagrams to the steered port, and to another port.
const STORAGE: u64 = 64;
const OTHER: u64 = 32;
/// How long counters may take to settle on a loaded machine.
const DEADLINE: Duration = Duration::from_secs(10);

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
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

/// `host` in namespace `host_ns` (stratad's), `peer` in namespace `ns`; both namespaces
/// (hence the pair) are removed on drop, also when setup or the test fails.
struct Veth {
    host_ns: String,
    ns: String,
    host: String,
    peer: String,
    host_ip: Ipv4Addr,
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.ns]);
        let _ = ip(&["netns", "del", &self.host_ns]);
    }
}

impl Veth {
    /// None (with a SKIP message; a failure in CI) when not root.
    fn new(tag: char) -> Option<Self> {
        if !dataplane::test_gate::require_root(&format!("veth {tag}"), "network namespaces, XDP") {
            return None;
        }
        let id = std::process::id() % 100_000;
        // Private namespaces: any subnet will do.
        let v = Veth {
            host_ns: format!("stratad-h{tag}{id}"),
            ns: format!("stratad-{tag}{id}"),
            host: format!("sd{tag}{id}"),
            peer: format!("sp{tag}{id}"),
            host_ip: Ipv4Addr::new(10, 77, 0, 1),
        };
        let _ = ip(&["netns", "del", &v.ns]);
        let _ = ip(&["netns", "del", &v.host_ns]);
        let peer_ip = "10.77.0.2/24";
        let host_ip = format!("{}/24", v.host_ip);
        let (hns, ns, host, peer) = (
            v.host_ns.as_str(),
            v.ns.as_str(),
            v.host.as_str(),
            v.peer.as_str(),
        );
        let steps: [&[&str]; 9] = [
            &["netns", "add", hns],
            &["netns", "add", ns],
            // Created inside stratad's namespace, peer moved out: no step in the root one.
            &[
                "-n", hns, "link", "add", host, "type", "veth", "peer", "name", peer,
            ],
            &["-n", hns, "link", "set", peer, "netns", ns],
            &["-n", hns, "addr", "add", &host_ip, "dev", host],
            &["-n", hns, "link", "set", host, "up"],
            // The metrics endpoint listens on 127.0.0.1 there.
            &["-n", hns, "link", "set", "lo", "up"],
            &["-n", ns, "addr", "add", peer_ip, "dev", peer],
            &["-n", ns, "link", "set", peer, "up"],
        ];
        for s in steps {
            ip(s).expect("veth setup");
        }
        Some(v)
    }

    /// Runs `f` on a thread inside namespace `ns` (threads it spawns inherit it).
    fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{ns}");
        std::thread::scope(|s| {
            s.spawn(move || {
                let ns = std::fs::File::open(&path).expect("open namespace");
                // SAFETY: `ns` is an open namespace file; setns changes only this thread.
                let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            // Re-raised here, so the Veth guard of the caller still runs.
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Whether the host end has an XDP program attached, per `ip link`.
    fn xdp_attached(&self) -> bool {
        let out = Command::new("ip")
            .args(["-n", &self.host_ns, "-d", "link", "show", &self.host])
            .output()
            .expect("run ip link show");
        let s = String::from_utf8_lossy(&out.stdout);
        s.contains("prog/xdp") || s.contains(" xdp")
    }
}

/// Removes a file on drop (the control socket, also when the test fails).
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn rpc_stats(sock: &std::path::Path) -> Value {
    let mut s = UnixStream::connect(sock).expect("control socket");
    writeln!(s, r#"{{"jsonrpc":"2.0","id":1,"method":"stratad_stats"}}"#).expect("send");
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).expect("read");
    serde_json::from_str::<Value>(&line).expect("json")["result"].clone()
}

fn scrape(addr: std::net::SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(s, "GET /metrics HTTP/1.0\r\n\r\n").expect("send");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    resp
}

fn server() -> Server {
    Server::new(&ServerConfig {
        cpus: vec![None],
        engine: EngineKind::Sync,
    })
    .expect("reactors")
}

/// In the host namespace: starts `--port iface=HOST,backend=BACKEND,steer=4420` on `v`,
/// sends STORAGE datagrams to 4420, OTHER to 9999 (a kernel socket here), one truncated
/// IPv4 frame and a ping from the peer, and checks `stats`, the metrics and the detach.
fn storage_and_other_traffic_counted(v: &Veth, backend: &str) {
    Veth::in_ns(&v.host_ns, || traffic_counted_in_host_ns(v, backend));
}

fn traffic_counted_in_host_ns(v: &Veth, backend: &str) {
    let mut server = server();
    let spec =
        parse_port_spec(&format!("iface={},backend={backend},steer=4420", v.host)).expect("spec");
    let ports = start(&[spec], &server.reactor_links(), None).expect("start the port");
    let dir = std::env::temp_dir();
    let sock = RemoveOnDrop(dir.join(format!(
        "stratad-ports-{backend}-{}.sock",
        std::process::id()
    )));
    let sock = &sock.0;
    crate::control::spawn(
        sock,
        crate::control::Control {
            stats: server.stats_handle(),
            datastore: None,
            ports: ports.counters.clone(),
            shares: Vec::new(),
            exports: std::sync::Arc::new(crate::iscsi::Exports::new(Vec::new(), None)),
            iscsi: None,
        },
        dataplane::server::SocketAccess::default(),
    )
    .expect("control socket");
    let metrics =
        crate::metrics::spawn("127.0.0.1:0", server.stats_handle(), ports.counters.clone())
            .expect("metrics");
    let kernel = UdpSocket::bind((v.host_ip, 9999)).expect("kernel socket");
    kernel
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let (host_ip, peer) = (v.host_ip, v.peer.clone());
    Veth::in_ns(&v.ns, move || {
        let udp = UdpSocket::bind("0.0.0.0:0").expect("bind");
        for i in 0..STORAGE.max(OTHER) {
            if i < STORAGE {
                udp.send_to(b"storage", (host_ip, 4420)).expect("send");
            }
            if i < OTHER {
                udp.send_to(b"other", (host_ip, 9999)).expect("send");
            }
            if i % 16 == 15 {
                // Paced so that no ring or socket buffer drops on a loaded machine.
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        // Ethernet + 6 bytes of an IPv4 header: malformed for the program.
        let mut frame = [0u8; 20];
        frame[..6].copy_from_slice(&[0xff; 6]);
        frame[6..12].copy_from_slice(&[2, 0x5c, 0, 0, 0, 1]);
        frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let mut ps = PacketSocket::new(&peer, None).expect("packet socket");
        assert_eq!(ps.tx_burst(&[&frame]).expect("send"), 1);
    });
    let ping = Command::new("ip")
        .args(["netns", "exec", &v.ns, "ping", "-c", "1", "-W", "2"])
        .arg(v.host_ip.to_string())
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(ping, "ping through the steered port");
    let mut buf = [0u8; 64];
    let mut other = 0;
    while other < OTHER && kernel.recv(&mut buf).is_ok() {
        other += 1;
    }
    assert_eq!(other, OTHER, "other datagrams at the kernel socket");

    let deadline = Instant::now() + DEADLINE;
    let st = loop {
        let st = rpc_stats(sock);
        let q = st["packet_queues"][0]["rx_frames"].as_u64().unwrap_or(0);
        let s = st["steering"][0]["steered"].as_u64().unwrap_or(0);
        if (q >= STORAGE && s >= STORAGE) || Instant::now() > deadline {
            break st;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let q = &st["packet_queues"];
    assert_eq!(q.as_array().map(Vec::len), Some(1), "{st}");
    assert_eq!(q[0]["iface"], v.host.as_str());
    assert_eq!(q[0]["queue"], 0);
    assert_eq!(q[0]["backend"], backend);
    assert_eq!(
        q[0]["rx_frames"], STORAGE,
        "frames at stratad's queue: {st}"
    );
    assert_eq!(q[0]["errors"], 0);
    let s = &st["steering"];
    assert_eq!(s.as_array().map(Vec::len), Some(1), "{st}");
    assert_eq!(s[0]["iface"], v.host.as_str());
    assert_eq!(s[0]["steered"], STORAGE, "{st}");
    assert_eq!(s[0]["malformed"], 1, "{st}");
    assert_eq!(s[0]["unbound"], 0, "{st}");
    // The 9999 datagrams, ARP and the echo request at least.
    let passed = s[0]["passed"].as_u64().unwrap_or(0);
    assert!(passed > OTHER + 1, "{st}");

    let text = scrape(metrics);
    let h = &v.host;
    for line in [
        format!(
            "strata_packet_queue_rx_frames_total{{iface=\"{h}\",queue=\"0\",backend=\"{backend}\"}} {STORAGE}\n"
        ),
        format!("strata_xdp_steered_total{{iface=\"{h}\"}} {STORAGE}\n"),
        format!("strata_xdp_malformed_total{{iface=\"{h}\"}} 1\n"),
        format!("strata_xdp_unbound_total{{iface=\"{h}\"}} 0\n"),
        // Still growing (ARP, IPv6 neighbour discovery): only its presence.
        format!("strata_xdp_passed_total{{iface=\"{h}\"}} "),
    ] {
        assert!(text.contains(&line), "missing {line:?} in\n{text}");
    }

    // Stopping the reactors drops the queues (closing a DPDK port detaches its program);
    // dropping the ports detaches the af_xdp program.
    server.shutdown();
    drop(server);
    assert_eq!(ports.steering_counters()[0].1[0], STORAGE, "final counters");
    drop(ports);
    assert!(!v.xdp_attached(), "XDP program left on {}", v.host);
}

#[test]
fn af_xdp_port_counters_in_stats_and_metrics() {
    if let Some(v) = Veth::new('x') {
        storage_and_other_traffic_counted(&v, "af_xdp");
    }
}

/// DPDK tests share the process's one EAL; run one at a time. Its runtime directory is
/// removed when the test binary exits.
#[cfg(feature = "dpdk")]
static DPDK: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(feature = "dpdk")]
fn dpdk_serial() -> std::sync::MutexGuard<'static, ()> {
    net::dpdk::remove_runtime_dir_at_exit(&net::ports::dpdk::own_prefix());
    DPDK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(feature = "dpdk")]
#[test]
fn dpdk_net_af_xdp_port_counters_in_stats_and_metrics() {
    let _one = dpdk_serial();
    if let Some(v) = Veth::new('d') {
        storage_and_other_traffic_counted(&v, "dpdk");
    }
}
