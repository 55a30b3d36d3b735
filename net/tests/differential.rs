//! The XDP program and its userspace mirror (`net::classify`) agree on every frame:
//! crafted malformed frames (truncated headers, bad IHL, long or broken IPv6 extension chains,
//! VLAN stacks) and random mutations of valid ones run through the kernel's verified copy of
//! the program (BPF_PROG_TEST_RUN), whose counters say which way it went. Needs root (bpf).

use ebpf::{Counters, SteerPort, Steering, DEFAULT_STEER_PORTS};
use net::classify::{classify, PortSet, Verdict, MAX_IPV6_EXT_HEADERS};
use net::frame::{build_udp, FrameSpec, IpVersion};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// XDP_PASS: the program never drops, steering falls back to it when no socket is bound.
const XDP_PASS: u32 = 2;
/// The kernel refuses test frames shorter than an Ethernet header.
const ETH_HLEN: usize = 14;
/// Random frames per run: enough to cover every branch many times, under a second.
const CASES: u32 = 1500;

fn verdict_of(before: Counters, after: Counters) -> Verdict {
    let d = (
        after.steered - before.steered + after.unbound - before.unbound,
        after.passed - before.passed,
        after.malformed - before.malformed,
    );
    match d {
        (1, 0, 0) => Verdict::Steer,
        (0, 1, 0) => Verdict::Pass,
        (0, 0, 1) => Verdict::Malformed,
        _ => panic!("one frame moved counters by {d:?}"),
    }
}

struct Harness {
    steer: Steering,
    ports: PortSet,
}

impl Harness {
    fn new() -> Option<Self> {
        if !dataplane::test_gate::require_root("differential", "loading XDP programs") {
            return None;
        }
        let steer = Steering::load(&DEFAULT_STEER_PORTS.map(SteerPort::both))
            .expect("load the steering program");
        let ports = PortSet::new(&DEFAULT_STEER_PORTS).expect("port set");
        Some(Self { steer, ports })
    }

    /// Runs `f` through both classifiers and checks they agree; returns the verdict.
    fn check(&self, f: &[u8]) -> Verdict {
        let user = classify(f, &self.ports);
        if f.len() < ETH_HLEN {
            assert_eq!(user, Verdict::Malformed);
            return user;
        }
        let before = self.steer.counters().expect("read counters");
        let action = self.steer.test_run(f).expect("BPF_PROG_TEST_RUN");
        let kernel = verdict_of(before, self.steer.counters().expect("read counters"));
        assert_eq!(action, XDP_PASS, "no socket bound: every frame passes");
        assert_eq!(kernel, user, "XDP and userspace disagree on {f:02x?}");
        kernel
    }
}

fn udp(ip: IpVersion, port: u16) -> Vec<u8> {
    let mut buf = [0u8; 256];
    let n = build_udp(&FrameSpec::test(ip, port), b"0123456789", &mut buf).expect("build frame");
    buf[..n].to_vec()
}

/// An IPv6 UDP frame with `k` destination-options headers of `len8` 8-byte units each.
fn v6_chain(k: usize, len8: u8) -> Vec<u8> {
    let base = udp(IpVersion::V6, 4420);
    let mut f = base[..54].to_vec();
    f[20] = if k > 0 { 60 } else { 17 };
    for i in 0..k {
        let next = if i + 1 == k { 17 } else { 60 };
        f.push(next);
        f.push(len8 - 1);
        f.extend(std::iter::repeat_n(0u8, usize::from(len8) * 8 - 2));
    }
    f.extend_from_slice(&base[54..]);
    f
}

#[test]
fn crafted_frames_agree() {
    let Some(h) = Harness::new() else { return };
    let expect = |f: &[u8], v: Verdict| assert_eq!(h.check(f), v, "{f:02x?}");
    let v4 = udp(IpVersion::V4, 4420);
    let v6 = udp(IpVersion::V6, 3260);
    expect(&v4, Verdict::Steer);
    expect(&v6, Verdict::Steer);
    expect(&udp(IpVersion::V4, 80), Verdict::Pass);
    // Every truncation inside the headers.
    for cut in ETH_HLEN..42 {
        expect(&v4[..cut], Verdict::Malformed);
    }
    for cut in ETH_HLEN..62 {
        expect(&v6[..cut], Verdict::Malformed);
    }
    // Bad IHL (below 5; past the frame) and a wrong version nibble.
    for b in [0x40, 0x44, 0x4f, 0x55, 0x65] {
        let mut f = v4.clone();
        f[14] = b;
        expect(&f, Verdict::Malformed);
    }
    // Fragments pass (the kernel reassembles).
    let mut f = v4.clone();
    f[20] = 0x20;
    expect(&f, Verdict::Pass);
    // IPv6 extension chains: up to the bound, one past it, and lengths running off the end.
    for k in 0..=MAX_IPV6_EXT_HEADERS {
        expect(&v6_chain(k, 1), Verdict::Steer);
    }
    expect(&v6_chain(MAX_IPV6_EXT_HEADERS + 1, 1), Verdict::Malformed);
    let mut f = v6_chain(2, 1);
    f[55] = 255;
    expect(&f, Verdict::Malformed);
    expect(&v6_chain(3, 32), Verdict::Steer);
    // A fragment header ends the walk with Pass; so does ICMPv6.
    let mut f = v6_chain(1, 1);
    f[54] = 44;
    expect(&f, Verdict::Pass);
    let mut f = v6.clone();
    f[20] = 58;
    expect(&f, Verdict::Pass);
    // VLAN: one and two tags steer, a truncated tag is malformed, a third tag passes.
    let tagged = |tags: &[u16]| {
        let mut f = v4[..12].to_vec();
        for t in tags {
            f.extend_from_slice(&t.to_be_bytes());
            f.extend_from_slice(&[0, 7]);
        }
        f.extend_from_slice(&v4[12..]);
        f
    };
    expect(&tagged(&[0x8100]), Verdict::Steer);
    expect(&tagged(&[0x88a8, 0x8100]), Verdict::Steer);
    expect(&tagged(&[0x8100, 0x8100, 0x8100]), Verdict::Pass);
    expect(&tagged(&[0x8100])[..16], Verdict::Malformed);
    // TCP with a data offset below 5.
    let mut f = v4.clone();
    f[23] = 6;
    f.resize(14 + 20 + 20, 0);
    f[34 + 2..34 + 4].copy_from_slice(&4420u16.to_be_bytes());
    f[34 + 12] = 0x50;
    expect(&f, Verdict::Steer);
    f[34 + 12] = 0x40;
    expect(&f, Verdict::Malformed);
    // Runt frames (userspace only: the kernel refuses them before the program runs).
    for n in 0..ETH_HLEN {
        expect(&v4[..n], Verdict::Malformed);
    }
}

#[test]
fn random_frames_agree() {
    let Some(h) = Harness::new() else { return };
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        ..Config::default()
    });
    let strategy = (
        0usize..4,
        prop_oneof![Just(4420u16), Just(3260u16), any::<u16>()],
        proptest::collection::vec((0usize..120, any::<u8>()), 0..6),
        0usize..160,
    );
    let seen = std::cell::Cell::new([0u32; 3]);
    runner
        .run(&strategy, |(shape, port, muts, cut)| {
            let mut f = match shape {
                0 => udp(IpVersion::V4, port),
                1 => udp(IpVersion::V6, port),
                2 => v6_chain(3, 1),
                _ => (0..cut as u8).collect(),
            };
            for (i, b) in muts {
                if i < f.len() {
                    f[i] = b;
                }
            }
            f.truncate(cut.max(ETH_HLEN));
            let v = h.check(&f);
            let mut s = seen.get();
            s[v as usize] += 1;
            seen.set(s);
            Ok(())
        })
        .unwrap();
    // The generator must exercise all three outcomes, or agreement proves little.
    let seen = seen.get();
    assert!(seen.iter().all(|&n| n > 50), "verdict spread {seen:?}");
}
