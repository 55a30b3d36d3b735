//! DPDK's `net_af_xdp` PMD on a veth port with Strata's steering program as its `xdp_prog=`
//! (`cargo test -p net --features dpdk --test dpdk_af_xdp`, as root).
//!
//! The PMD loads and attaches the object itself and puts its AF_XDP socket in `xsks_map`; the
//! program's `steer_ports` map starts empty (the PMD knows nothing of it), so until it is filled
//! every frame passes to the kernel. [`AttachedSteering`] finds the program through the
//! interface and fills the map. Then storage datagrams (UDP/IPv4 4420, UDP/IPv6 3260) reach the
//! DPDK port, other datagrams a kernel socket on the same interface, ping keeps working, the
//! counters match, and closing the port detaches the program.
//!
//! The EAL is initialised once per process, inside B's namespace (the PMD resolves `iface=` at
//! probe time, in `rte_eal_init`), so this binary holds this one test.

#![cfg(feature = "dpdk")]

mod common;

use std::net::UdpSocket;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{recv_all, send_mixed_flows, with_pair, VethPair};
use ebpf::{AttachedSteering, SteerPort, DEFAULT_STEER_PORTS};
use net::classify::{classify, PortSet, Verdict};
use net::dpdk::{first_allowed_cpu, init_eal, no_huge_eal_args, DpdkPort, RuntimeDirGuard};
use net::frame::udp_payload;
use net::PacketIo;

/// Datagrams per flow (as in steering.rs).
const PER_FLOW: usize = 200;
const DEADLINE: Duration = Duration::from_secs(5);
/// The DPDK device name of the port.
const VDEV: &str = "net_af_xdp0";

/// Removes the object file written for the PMD, also when the test fails.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Polls `io` until `want` frames arrived or the deadline, then a little longer for extras.
fn drain(io: &mut dyn PacketIo, want: usize) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let end = Instant::now() + DEADLINE;
    while got.len() < want && Instant::now() < end {
        if io
            .rx_burst(64, &mut |f| got.push(f.to_vec()))
            .expect("rx_burst")
            == 0
        {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let end = Instant::now() + Duration::from_millis(100);
    while Instant::now() < end {
        io.rx_burst(64, &mut |f| got.push(f.to_vec()))
            .expect("rx_burst");
    }
    got
}

#[test]
fn net_af_xdp_pmd_with_the_steering_program() {
    with_pair(
        "net_af_xdp_pmd_with_the_steering_program",
        |p: &VethPair| {
            let obj = TempFile(
                std::env::temp_dir().join(format!("strata-steer-{}.bpf.o", std::process::id())),
            );
            std::fs::write(&obj.0, ebpf::steer_object()).expect("write the XDP object");
            let prefix = format!("strata-afxdp-{}", std::process::id());
            // Removed also when an assertion fails (the panic unwinds through it).
            let _runtime_dir = RuntimeDirGuard::new(&prefix);
            let vdev = format!("--vdev={VDEV},iface={},xdp_prog={}", p.vb, obj.0.display());
            let (ns_b, vb, ip4_b) = (p.ns_b.clone(), p.vb.clone(), p.ip4_b);
            let (tx_ready, rx_ready) = std::sync::mpsc::channel();
            let (tx_done, rx_done) = std::sync::mpsc::channel::<()>();
            std::thread::scope(|s| {
                let b = s.spawn(move || {
                    VethPair::run_in(&ns_b, move || {
                        let args = no_huge_eal_args(&prefix, first_allowed_cpu(), &[&vdev]);
                        init_eal(&args.iter().map(String::as_str).collect::<Vec<_>>())
                            .expect("EAL with net_af_xdp");
                        // Queue setup loads and attaches the program.
                        let mut port = DpdkPort::open(VDEV).expect("start the net_af_xdp port");
                        let mut steer = AttachedSteering::find(&vb).expect("the PMD's program");
                        assert_eq!(steer.counters().unwrap().steered, 0);
                        for storage in DEFAULT_STEER_PORTS {
                            steer.set_port(SteerPort::both(storage)).unwrap();
                        }
                        let other = UdpSocket::bind((ip4_b, 9999)).unwrap();
                        tx_ready.send(()).unwrap();
                        let frames = drain(&mut port, 2 * PER_FLOW);
                        let kernel_other = recv_all(&other, PER_FLOW);
                        rx_done.recv_timeout(3 * DEADLINE).unwrap();
                        let counters = steer.counters().unwrap();
                        // Closing the port detaches the program (the PMD attached it by netlink,
                        // not by a bpf link, so only the close removes it).
                        drop(port);
                        let ifindex = ebpf::sys::if_index(&vb).unwrap();
                        let left = ebpf::sys::xdp_prog_id(ifindex).unwrap();
                        (frames, kernel_other, counters, left)
                    })
                });
                rx_ready.recv_timeout(3 * DEADLINE).unwrap();
                let (ip4_b, ip6_b) = (p.ip4_b, p.ip6_b);
                VethPair::run_in(&p.ns_a, move || {
                    send_mixed_flows(ip4_b, ip6_b, PER_FLOW);
                });
                assert!(
                    p.ping_from_a(&p.ip4_b.to_string()),
                    "IPv4 ping through the DPDK-served port"
                );
                tx_done.send(()).unwrap();
                let (frames, kernel_other, c, left) = b.join().unwrap();

                let ports = PortSet::new(&DEFAULT_STEER_PORTS).unwrap();
                let (mut udp4, mut udp6) = (0, 0);
                for f in &frames {
                    assert_eq!(classify(f, &ports), Verdict::Steer, "only storage frames");
                    match udp_payload(f) {
                        Some(pl) if pl.starts_with(b"storage4 ") => udp4 += 1,
                        Some(pl) if pl.starts_with(b"storage6 ") => udp6 += 1,
                        other => panic!("unexpected frame at the DPDK port: {other:?}"),
                    }
                }
                assert_eq!(udp4, PER_FLOW, "UDP/IPv4 4420 at the DPDK port");
                assert_eq!(udp6, PER_FLOW, "UDP/IPv6 3260 at the DPDK port");
                assert_eq!(kernel_other, PER_FLOW, "UDP 9999 at the kernel socket");
                assert_eq!(c.steered, frames.len() as u64, "{c:?}");
                assert_eq!(c.unbound, 0, "{c:?}");
                assert_eq!(c.malformed, 0, "{c:?}");
                assert!(c.passed >= PER_FLOW as u64 + 2, "{c:?}");
                assert_eq!(left, None, "XDP program left on {} after close", p.vb);
            });
        },
    );
}
