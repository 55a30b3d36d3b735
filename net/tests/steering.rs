//! Storage steering on a shared veth port, as root in namespaces the tests create: storage
//! ports reach the AF_XDP socket, everything else the kernel (sockets, ping, ARP, ND), and the
//! program's counters match what each side received.

mod common;

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::{recv_all, send_mixed_flows, with_pair, VethPair, MAC_A, MAC_B};
use ebpf::{AttachMode, ModePreference, SteerPort, Steering, DEFAULT_STEER_PORTS};
use net::af_xdp::{XskConfig, XskSocket};
use net::classify::{classify, PortSet, Verdict};
use net::frame::{build_udp, udp_payload, FrameSpec, FRAME_MAX};
use net::packet_socket::PacketSocket;
use net::PacketIo;

/// Datagrams per flow: small enough for the socket buffers of a veth pair on a loaded 2-core
/// machine, large enough that an off-by-one in counters shows.
const PER_FLOW: usize = 200;
const DEADLINE: Duration = Duration::from_secs(5);

fn default_ports() -> Vec<SteerPort> {
    DEFAULT_STEER_PORTS.map(SteerPort::both).to_vec()
}

/// Polls `io` until `want` frames arrived or the deadline; returns them.
fn drain(io: &mut dyn PacketIo, want: usize) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let end = Instant::now() + DEADLINE;
    while got.len() < want && Instant::now() < end {
        let n = io
            .rx_burst(64, &mut |f| got.push(f.to_vec()))
            .expect("rx_burst");
        if n == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    // Anything extra arriving shortly after would be a steering bug: look for it.
    std::thread::sleep(Duration::from_millis(50));
    io.rx_burst(64, &mut |f| got.push(f.to_vec()))
        .expect("rx_burst");
    got
}

#[test]
fn storage_to_af_xdp_rest_to_kernel() {
    with_pair("storage_to_af_xdp_rest_to_kernel", |p: &VethPair| {
        let ns_b = p.ns_b.clone();
        // Everything on B's side lives on one thread inside B's namespace; A's traffic is sent
        // from another thread in A while B polls.
        let (tx_ready, rx_ready) = std::sync::mpsc::channel();
        let (tx_done, rx_done) = std::sync::mpsc::channel::<()>();
        let ip4_b = p.ip4_b;
        std::thread::scope(|s| {
            let b = s.spawn(move || {
                VethPair::run_in(&ns_b, move || {
                    let mut steer = Steering::load(&default_ports()).unwrap();
                    let mode = steer.attach("vb", ModePreference::Auto).unwrap();
                    assert_eq!(mode, AttachMode::Native, "veth supports native XDP");
                    let mut xsk = XskSocket::new("vb", 0, XskConfig::default()).unwrap();
                    steer.register_socket(0, xsk.wake_fd()).unwrap();
                    let other = UdpSocket::bind((ip4_b, 9999)).unwrap();
                    // A kernel socket on a steered port must see nothing: XDP takes its frames.
                    let shadow = UdpSocket::bind((ip4_b, 4420)).unwrap();
                    shadow.set_nonblocking(true).unwrap();
                    tx_ready.send(()).unwrap();
                    // 200 UDP/IPv4 to 4420, 200 UDP/IPv6 to 3260, 1 TCP SYN (IPv4) to 3260.
                    let frames = drain(&mut xsk, 2 * PER_FLOW + 1);
                    let kernel_other = recv_all(&other, PER_FLOW);
                    rx_done.recv_timeout(3 * DEADLINE).unwrap();
                    let mut buf = [0u8; 64];
                    let shadow_got = shadow.recv(&mut buf).is_ok();
                    let counters = steer.counters().unwrap();
                    (frames, kernel_other, shadow_got, counters, steer)
                })
            });
            rx_ready.recv_timeout(3 * DEADLINE).unwrap();
            let (ip4_b, ip6_b) = (p.ip4_b, p.ip6_b);
            VethPair::run_in(&p.ns_a, move || {
                send_mixed_flows(ip4_b, ip6_b, PER_FLOW);
                // The SYN is steered, so the connection never completes; only the frame matters.
                let _ = TcpStream::connect_timeout(
                    &SocketAddr::from((ip4_b, 3260)),
                    Duration::from_millis(300),
                );
            });
            assert!(
                p.ping_from_a(&p.ip4_b.to_string()),
                "IPv4 ping through the XDP port"
            );
            assert!(
                p.ping_from_a(&p.ip6_b.to_string()),
                "IPv6 ping through the XDP port"
            );
            tx_done.send(()).unwrap();
            let (frames, kernel_other, shadow_got, c, steer) = b.join().unwrap();

            let ports = PortSet::new(&DEFAULT_STEER_PORTS).unwrap();
            let mut udp4 = 0;
            let mut udp6 = 0;
            let mut tcp = 0;
            for f in &frames {
                assert_eq!(
                    classify(f, &ports),
                    Verdict::Steer,
                    "only storage frames steered"
                );
                match udp_payload(f) {
                    Some(pl) if pl.starts_with(b"storage4 ") => udp4 += 1,
                    Some(pl) if pl.starts_with(b"storage6 ") => udp6 += 1,
                    Some(pl) => panic!("unexpected datagram {pl:?}"),
                    None => tcp += 1,
                }
            }
            assert_eq!(udp4, PER_FLOW, "UDP/IPv4 4420 at the AF_XDP socket");
            assert_eq!(udp6, PER_FLOW, "UDP/IPv6 3260 at the AF_XDP socket");
            // The SYN may be retransmitted within the connect timeout.
            assert!(tcp >= 1, "TCP SYN to 3260 at the AF_XDP socket");
            assert_eq!(kernel_other, PER_FLOW, "UDP 9999 at the kernel socket");
            assert!(
                !shadow_got,
                "a kernel socket on 4420 received a steered datagram"
            );
            assert_eq!(c.steered, frames.len() as u64, "steered counter: {c:?}");
            assert_eq!(c.unbound, 0, "{c:?}");
            assert_eq!(c.malformed, 0, "{c:?}");
            // The 9999 flow, ARP/ND and echo requests all passed through the program.
            assert!(c.passed >= PER_FLOW as u64 + 4, "{c:?}");
            drop(steer);
            assert!(!p.xdp_attached(), "program left on vb after drop");
        });
    });
}

#[test]
fn storage_frames_without_socket_go_to_the_kernel_and_detach_is_clean() {
    with_pair("storage_frames_without_socket", |p: &VethPair| {
        let ns_b = p.ns_b.clone();
        let ip4_b = p.ip4_b;
        let (tx_ready, rx_ready) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            let b = s.spawn(move || {
                VethPair::run_in(&ns_b, move || {
                    let mut steer = Steering::load(&default_ports()).unwrap();
                    steer.attach("vb", ModePreference::Generic).unwrap();
                    assert_eq!(steer.attached().map(|a| a.1), Some(AttachMode::Generic));
                    // Attaching twice is refused rather than silently replacing the link.
                    assert!(steer.attach("vb", ModePreference::Auto).is_err());
                    let sock = UdpSocket::bind((ip4_b, 4420)).unwrap();
                    tx_ready.send(()).unwrap();
                    let got = recv_all(&sock, 50);
                    let c = steer.counters().unwrap();
                    steer.detach().unwrap();
                    (got, c)
                })
            });
            rx_ready.recv_timeout(3 * DEADLINE).unwrap();
            VethPair::run_in(&p.ns_a, move || {
                let s4 = UdpSocket::bind("0.0.0.0:0").unwrap();
                for i in 0..50 {
                    s4.send_to(format!("{i}").as_bytes(), (ip4_b, 4420))
                        .unwrap();
                }
            });
            let (got, c) = b.join().unwrap();
            assert_eq!(
                got, 50,
                "storage datagrams reach the kernel when no socket is bound"
            );
            assert_eq!(c.unbound, 50, "{c:?}");
            assert_eq!(c.steered, 0, "{c:?}");
            assert!(!p.xdp_attached(), "program left on vb after detach");
        });
    });
}

#[test]
fn af_xdp_transmit_and_packet_socket_fallback() {
    with_pair(
        "af_xdp_transmit_and_packet_socket_fallback",
        |p: &VethPair| {
            const N: usize = 100;
            let frames: Vec<Vec<u8>> = (0..N)
                .map(|i| {
                    let mut spec = FrameSpec::test(net::frame::IpVersion::V4, 4420);
                    spec.src_mac = MAC_A;
                    spec.dst_mac = MAC_B;
                    spec.src_ip = p.ip4_a.into();
                    spec.dst_ip = p.ip4_b.into();
                    let mut buf = [0u8; FRAME_MAX];
                    let n = build_udp(&spec, format!("frame {i}").as_bytes(), &mut buf).unwrap();
                    buf[..n].to_vec()
                })
                .collect();
            let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
            let (tx_ready, rx_ready) = std::sync::mpsc::channel();
            let (tx_phase, rx_phase) = std::sync::mpsc::channel();
            let ns_b = p.ns_b.clone();
            std::thread::scope(|s| {
                let b = s.spawn(move || {
                    VethPair::run_in(&ns_b, move || {
                        // Phase 1: the fallback receives A's AF_XDP transmissions.
                        let ports = PortSet::new(&[4420]).unwrap();
                        let mut ps = PacketSocket::new("vb", Some(ports)).unwrap();
                        tx_ready.send(()).unwrap();
                        let via_packet = drain(&mut ps, N);
                        // Phase 2: steering + AF_XDP receive A's packet-socket transmissions.
                        let mut steer = Steering::load(&default_ports()).unwrap();
                        steer.attach("vb", ModePreference::Auto).unwrap();
                        let mut xsk = XskSocket::new("vb", 0, XskConfig::default()).unwrap();
                        steer.register_socket(0, xsk.wake_fd()).unwrap();
                        tx_ready.send(()).unwrap();
                        let via_xsk = drain(&mut xsk, N);
                        rx_phase.recv_timeout(3 * DEADLINE).unwrap();
                        (via_packet, via_xsk)
                    })
                });
                let refs = &refs;
                VethPair::run_in(&p.ns_a, move || {
                    let mut xsk = XskSocket::new("va", 0, XskConfig::default()).unwrap();
                    let mut ps = PacketSocket::new("va", None).unwrap();
                    rx_ready.recv_timeout(3 * DEADLINE).unwrap();
                    let mut sent = 0;
                    let end = Instant::now() + DEADLINE;
                    while sent < N && Instant::now() < end {
                        sent += xsk.tx_burst(&refs[sent..]).unwrap();
                    }
                    assert_eq!(sent, N, "AF_XDP transmit");
                    while xsk.tx_flush().unwrap() > 0 && Instant::now() < end {}
                    assert_eq!(xsk.tx_flush().unwrap(), 0, "AF_XDP transmit completes");
                    rx_ready.recv_timeout(3 * DEADLINE).unwrap();
                    let mut sent = 0;
                    let end = Instant::now() + DEADLINE;
                    while sent < N && Instant::now() < end {
                        sent += ps.tx_burst(&refs[sent..]).unwrap();
                    }
                    assert_eq!(sent, N, "packet socket transmit");
                });
                tx_phase.send(()).unwrap();
                let (via_packet, via_xsk) = b.join().unwrap();
                for (name, got) in [("packet socket", via_packet), ("AF_XDP", via_xsk)] {
                    assert_eq!(got.len(), N, "{name} received");
                    let mut seen: Vec<&[u8]> = got.iter().map(Vec::as_slice).collect();
                    seen.sort();
                    let mut want = refs.to_vec();
                    want.sort();
                    assert_eq!(seen, want, "{name}: frames arrive unchanged");
                }
            });
        },
    );
}
