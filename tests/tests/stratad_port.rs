//! `stratad --port`: XDP steering on a veth port inside a network namespace. Storage-port
//! datagrams reach the reactor's AF_XDP queue (counted in `stats`), other traffic (ping) keeps
//! working through the kernel, and nothing is left attached after stratad exits.
//!
//! Needs root (namespaces, XDP); skipped with a message otherwise.

use std::io::{BufRead, BufReader, Write};
use std::net::UdpSocket;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tests::daemon::stratad_bin;

/// Datagrams sent to the storage port.
const FRAMES: u64 = 64;
/// How long stratad may take to attach and create its control socket.
const READY_WAIT_MAX: Duration = Duration::from_secs(20);

fn sh(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Removes the namespace (and with it the veth pair) even if the test fails.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        sh(&["ip", "netns", "del", &self.0]);
    }
}

fn rpc_stats(sock: &Path) -> serde_json::Value {
    let mut s = UnixStream::connect(sock).expect("control socket");
    writeln!(s, r#"{{"jsonrpc":"2.0","id":1,"method":"stratad_stats"}}"#).expect("send");
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).expect("read");
    serde_json::from_str::<serde_json::Value>(&line).expect("json")["result"].clone()
}

#[test]
fn port_steers_storage_traffic_to_the_reactor() {
    if !dataplane::test_gate::require_root(
        "port_steers_storage_traffic_to_the_reactor",
        "network namespaces, XDP",
    ) {
        return;
    }
    let id = std::process::id() % 100_000;
    let ns = format!("strata-port-{id}");
    let (host_if, ns_if) = (format!("sph{id}"), format!("spn{id}"));
    let octet = 1 + id % 250;
    let host_ip = format!("10.78.{octet}.1");
    let ns_ip = format!("10.78.{octet}.2");
    sh(&["ip", "netns", "del", &ns]);
    assert!(sh(&["ip", "netns", "add", &ns]), "ip netns add");
    let _guard = Netns(ns.clone());
    assert!(sh(&[
        "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if
    ]));
    assert!(sh(&["ip", "link", "set", &ns_if, "netns", &ns]));
    assert!(sh(&[
        "ip",
        "addr",
        "add",
        &format!("{host_ip}/24"),
        "dev",
        &host_if
    ]));
    assert!(sh(&["ip", "link", "set", &host_if, "up"]));
    let in_ns = |a: &[&str]| {
        let mut v = vec!["ip", "netns", "exec", ns.as_str()];
        v.extend_from_slice(a);
        sh(&v)
    };
    assert!(in_ns(&[
        "ip",
        "addr",
        "add",
        &format!("{ns_ip}/24"),
        "dev",
        &ns_if
    ]));
    assert!(in_ns(&["ip", "link", "set", &ns_if, "up"]));
    let ctl: PathBuf = std::env::temp_dir().join(format!("strata-port-{id}.sock"));
    let _ = std::fs::remove_file(&ctl);
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(stratad_bin())
        .arg("--port")
        .arg(format!("iface={ns_if},queues=1,backend=af_xdp,steer=4420"))
        .arg("--control")
        .arg(&ctl)
        .spawn()
        .expect("spawn stratad");
    let deadline = Instant::now() + READY_WAIT_MAX;
    while !ctl.exists() {
        if let Some(st) = child.try_wait().expect("wait") {
            panic!("stratad exited early: {st}");
        }
        assert!(Instant::now() < deadline, "control socket did not appear");
        std::thread::sleep(Duration::from_millis(20));
    }
    let udp = UdpSocket::bind(format!("{host_ip}:0")).expect("bind");
    for _ in 0..FRAMES {
        udp.send_to(b"storage", format!("{ns_ip}:4420"))
            .expect("send");
    }
    // Other traffic still reaches the kernel on the same interface.
    assert!(
        sh(&["ping", "-c", "2", "-W", "2", &ns_ip]),
        "ping through the steered port"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let rx = loop {
        let st = rpc_stats(&ctl);
        let rx = st["packet_queues"][0]["rx_frames"].as_u64().unwrap_or(0);
        if rx >= FRAMES || Instant::now() > deadline {
            break rx;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(rx, FRAMES, "frames counted by the reactor's AF_XDP queue");
    // SAFETY: kill(2) on our child's pid (the `ip netns exec` process execs stratad).
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait");
    assert!(status.success(), "stratad exit after SIGTERM: {status}");
    let out = Command::new("ip")
        .args(["netns", "exec", &ns, "ip", "link", "show", &ns_if])
        .output()
        .expect("ip link show");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("xdp"), "XDP program left attached: {text}");
}
