//! Which frames are storage traffic: the userspace mirror of `ebpf/src/steer.bpf.c`.
//!
//! Pure functions over untrusted bytes. The XDP program and [`classify`] must agree frame by
//! frame (net/tests/differential.rs runs both on the same frames); the packet-socket fallback
//! uses [`classify`] to pick storage frames out of everything the interface receives.

/// IPv6 extension headers walked before a frame counts as malformed (`MAX_IPV6_EXT_HEADERS`).
pub const MAX_IPV6_EXT_HEADERS: usize = 6;
/// 802.1Q/802.1ad tags skipped (`MAX_VLAN_TAGS`).
pub const MAX_VLAN_TAGS: usize = 2;
/// Ports a [`PortSet`] holds (the XDP map's `MAX_STEER_PORTS`).
pub const MAX_STEER_PORTS: usize = 16;
/// Protocol mask bit: TCP.
pub const PROTO_TCP: u8 = 1;
/// Protocol mask bit: UDP.
pub const PROTO_UDP: u8 = 2;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const VLAN_HLEN: usize = 4;
const IPV4_HLEN_MIN: usize = 20;
const IPV6_HLEN: usize = 40;
const TCP_HLEN_MIN: usize = 20;
const UDP_HLEN: usize = 8;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;
/// IPv4 flags+offset bits that mark a fragment (MF and the offset; not DF).
const IPV4_FRAG_MASK: u16 = 0x3fff;

/// What the steering program does with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Storage traffic: to the queue's AF_XDP socket.
    Steer,
    /// Everything else: to the kernel.
    Pass,
    /// Truncated or invalid headers: counted, then to the kernel.
    Malformed,
}

/// Destination ports to steer, each with a mask of [`PROTO_TCP`] | [`PROTO_UDP`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortSet {
    ports: Vec<(u16, u8)>,
}

/// A [`PortSet`] cannot take more than [`MAX_STEER_PORTS`] ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("at most {MAX_STEER_PORTS} steering ports")]
pub struct TooManyPorts;

impl PortSet {
    /// `ports`, each for TCP and UDP.
    pub fn new(ports: &[u16]) -> Result<Self, TooManyPorts> {
        let mut s = Self::default();
        for &p in ports {
            s.insert(p, PROTO_TCP | PROTO_UDP)?;
        }
        Ok(s)
    }

    /// Adds `mask` to `port`'s protocols.
    pub fn insert(&mut self, port: u16, mask: u8) -> Result<(), TooManyPorts> {
        if let Some(e) = self.ports.iter_mut().find(|(p, _)| *p == port) {
            e.1 |= mask;
            return Ok(());
        }
        if self.ports.len() >= MAX_STEER_PORTS {
            return Err(TooManyPorts);
        }
        self.ports.push((port, mask));
        Ok(())
    }

    /// The ports and their masks.
    pub fn iter(&self) -> impl Iterator<Item = (u16, u8)> + '_ {
        self.ports.iter().copied()
    }

    fn mask(&self, port: u16) -> u8 {
        self.ports
            .iter()
            .find(|(p, _)| *p == port)
            .map_or(0, |(_, m)| *m)
    }
}

fn be16(b: &[u8], off: usize) -> Option<u16> {
    let s = b.get(off..off.checked_add(2)?)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}

fn check_l4(f: &[u8], off: usize, proto: u8, ports: &PortSet) -> Verdict {
    let (hlen, bit) = match proto {
        IPPROTO_TCP => (TCP_HLEN_MIN, PROTO_TCP),
        IPPROTO_UDP => (UDP_HLEN, PROTO_UDP),
        _ => return Verdict::Pass,
    };
    if f.len() < off.saturating_add(hlen) {
        return Verdict::Malformed;
    }
    // TCP data offset (header length in words) is the high nibble of byte 12.
    if proto == IPPROTO_TCP && f[off + 12] >> 4 < 5 {
        return Verdict::Malformed;
    }
    let Some(dport) = be16(f, off + 2) else {
        return Verdict::Malformed;
    };
    if ports.mask(dport) & bit != 0 {
        Verdict::Steer
    } else {
        Verdict::Pass
    }
}

fn classify_ipv4(f: &[u8], off: usize, ports: &PortSet) -> Verdict {
    if f.len() < off + IPV4_HLEN_MIN {
        return Verdict::Malformed;
    }
    let (version, ihl) = (f[off] >> 4, usize::from(f[off] & 0xf));
    if version != 4 || ihl < 5 {
        return Verdict::Malformed;
    }
    match be16(f, off + 6) {
        Some(frag) if frag & IPV4_FRAG_MASK != 0 => return Verdict::Pass,
        Some(_) => {}
        None => return Verdict::Malformed,
    }
    let l4 = off + ihl * 4;
    if l4 > f.len() {
        return Verdict::Malformed;
    }
    check_l4(f, l4, f[off + 9], ports)
}

fn classify_ipv6(f: &[u8], off: usize, ports: &PortSet) -> Verdict {
    if f.len() < off + IPV6_HLEN {
        return Verdict::Malformed;
    }
    if f[off] >> 4 != 6 {
        return Verdict::Malformed;
    }
    let mut next = f[off + 6];
    let mut p = off + IPV6_HLEN;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        if next == IPPROTO_TCP || next == IPPROTO_UDP {
            return check_l4(f, p, next, ports);
        }
        let words = match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH => {
                if f.len() < p + 2 {
                    return Verdict::Malformed;
                }
                usize::from(f[p + 1])
            }
            // Fragments are reassembled by the kernel; ICMPv6, ESP, no-next-header and the rest
            // are not storage traffic.
            _ => return Verdict::Pass,
        };
        let len = if next == IPPROTO_AH {
            (words + 2) * 4
        } else {
            (words + 1) * 8
        };
        next = f[p];
        p += len;
        if p > f.len() {
            return Verdict::Malformed;
        }
    }
    match next {
        IPPROTO_TCP | IPPROTO_UDP => check_l4(f, p, next, ports),
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH => Verdict::Malformed,
        _ => Verdict::Pass,
    }
}

/// Classifies an Ethernet frame as the steering program does.
pub fn classify(frame: &[u8], ports: &PortSet) -> Verdict {
    let Some(mut proto) = be16(frame, 12) else {
        return Verdict::Malformed;
    };
    let mut off = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        let Some(inner) = be16(frame, off + 2) else {
            return Verdict::Malformed;
        };
        proto = inner;
        off += VLAN_HLEN;
    }
    match proto {
        ETH_P_IP => classify_ipv4(frame, off, ports),
        ETH_P_IPV6 => classify_ipv6(frame, off, ports),
        _ => Verdict::Pass,
    }
}

// IPPROTO_FRAGMENT is handled by the catch-all arm; named for readers comparing with the C.
const _: u8 = IPPROTO_FRAGMENT;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{build_udp, FrameSpec, IpVersion};
    use proptest::prelude::*;

    fn ports() -> PortSet {
        PortSet::new(&[3260, 4420]).unwrap()
    }

    #[test]
    fn storage_udp_is_steered_and_others_pass() {
        for ip in [IpVersion::V4, IpVersion::V6] {
            let mut buf = [0u8; 256];
            let n = build_udp(&FrameSpec::test(ip, 4420), b"hi", &mut buf).unwrap();
            assert_eq!(classify(&buf[..n], &ports()), Verdict::Steer);
            let n = build_udp(&FrameSpec::test(ip, 9999), b"hi", &mut buf).unwrap();
            assert_eq!(classify(&buf[..n], &ports()), Verdict::Pass);
            // Every truncation of a steered frame short of its UDP header is malformed.
            let n = build_udp(&FrameSpec::test(ip, 3260), b"", &mut buf).unwrap();
            for cut in 0..n {
                assert_eq!(
                    classify(&buf[..cut], &ports()),
                    Verdict::Malformed,
                    "cut {cut}"
                );
            }
        }
    }

    #[test]
    fn bad_ihl_fragments_and_arp() {
        let mut buf = [0u8; 256];
        let n = build_udp(&FrameSpec::test(IpVersion::V4, 4420), b"x", &mut buf).unwrap();
        let mut f = buf[..n].to_vec();
        f[14] = 0x44; // IHL 4
        assert_eq!(classify(&f, &ports()), Verdict::Malformed);
        f[14] = 0x4f; // IHL 15: options run past the frame
        assert_eq!(classify(&f, &ports()), Verdict::Malformed);
        let mut f = buf[..n].to_vec();
        f[14 + 6] = 0x20; // MF
        assert_eq!(classify(&f, &ports()), Verdict::Pass);
        let mut f = buf[..n].to_vec();
        f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(classify(&f, &ports()), Verdict::Pass);
    }

    #[test]
    fn ipv6_extension_chains() {
        let mut buf = [0u8; 512];
        let n = build_udp(&FrameSpec::test(IpVersion::V6, 4420), b"", &mut buf).unwrap();
        let base = buf[..n].to_vec();
        // Insert k hop-by-hop/destination-options headers of 8 bytes before UDP.
        let chain = |k: usize| {
            let mut f = base[..54].to_vec();
            f[20] = if k > 0 { IPPROTO_DSTOPTS } else { IPPROTO_UDP };
            for i in 0..k {
                let next = if i + 1 == k {
                    IPPROTO_UDP
                } else {
                    IPPROTO_DSTOPTS
                };
                f.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
            }
            f.extend_from_slice(&base[54..]);
            f
        };
        for k in 0..=MAX_IPV6_EXT_HEADERS {
            assert_eq!(classify(&chain(k), &ports()), Verdict::Steer, "{k} headers");
        }
        assert_eq!(
            classify(&chain(MAX_IPV6_EXT_HEADERS + 1), &ports()),
            Verdict::Malformed
        );
        // A header length that runs past the frame.
        let mut f = chain(1);
        f[55] = 200;
        assert_eq!(classify(&f, &ports()), Verdict::Malformed);
    }

    proptest! {
        // Arbitrary bytes never panic, and classification only ever reads the frame.
        #[test]
        fn arbitrary_frames_never_panic(f in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = classify(&f, &ports());
        }

        // Valid frames with random mutations of their headers never panic and steer only
        // storage ports.
        #[test]
        fn mutated_headers(v6 in any::<bool>(), dport in any::<u16>(),
                           muts in proptest::collection::vec((0usize..80, any::<u8>()), 0..6),
                           cut in 0usize..120) {
            let ip = if v6 { IpVersion::V6 } else { IpVersion::V4 };
            let mut buf = [0u8; 256];
            let n = build_udp(&FrameSpec::test(ip, dport), b"payload", &mut buf).unwrap();
            let mut f = buf[..n].to_vec();
            let unmutated = classify(&f, &ports());
            prop_assert_eq!(unmutated == Verdict::Steer, dport == 3260 || dport == 4420);
            for (i, b) in muts {
                if i < f.len() { f[i] = b; }
            }
            f.truncate(cut.min(f.len()));
            let _ = classify(&f, &ports());
        }
    }
}
