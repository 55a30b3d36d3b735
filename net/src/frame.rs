//! Building Ethernet/IP/UDP frames (tests, the pps benchmark, and transmit paths that send
//! datagrams without a kernel stack). Pure: writes into a caller's buffer.

use std::net::{Ipv4Addr, Ipv6Addr};

/// Largest frame built (a standard 1500-byte MTU plus the Ethernet header).
pub const FRAME_MAX: usize = 1514;
const ETH_HLEN: usize = 14;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const UDP_HLEN: usize = 8;
const DEFAULT_TTL: u8 = 64;

/// IP version of a built frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpVersion {
    V4,
    V6,
}

/// Addresses and ports of a UDP frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameSpec {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src_ip: std::net::IpAddr,
    pub dst_ip: std::net::IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
}

impl FrameSpec {
    /// Documentation addresses (192.0.2.0/24, 2001:db8::/32), for tests.
    pub fn test(ip: IpVersion, dst_port: u16) -> Self {
        let (src_ip, dst_ip) = match ip {
            IpVersion::V4 => (
                Ipv4Addr::new(192, 0, 2, 1).into(),
                Ipv4Addr::new(192, 0, 2, 2).into(),
            ),
            IpVersion::V6 => (
                Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).into(),
                Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2).into(),
            ),
        };
        Self {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src_ip,
            dst_ip,
            src_port: 40000,
            dst_port,
        }
    }
}

/// Why a frame could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {need} bytes exceeds the buffer ({have}) or FRAME_MAX")]
    TooLarge { need: usize, have: usize },
    #[error("source and destination addresses are of different IP versions")]
    MixedVersions,
}

fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        sum += u32::from(*b) << 8;
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Writes an Ethernet + IPv4/IPv6 + UDP frame carrying `payload` into `buf` with valid
/// checksums (the kernel drops IPv4 with a bad header checksum and UDP with a bad checksum);
/// returns its length.
pub fn build_udp(spec: &FrameSpec, payload: &[u8], buf: &mut [u8]) -> Result<usize, FrameError> {
    use std::net::IpAddr;
    let ip_hlen = match (spec.src_ip, spec.dst_ip) {
        (IpAddr::V4(_), IpAddr::V4(_)) => IPV4_HLEN,
        (IpAddr::V6(_), IpAddr::V6(_)) => IPV6_HLEN,
        _ => return Err(FrameError::MixedVersions),
    };
    let udp_len = UDP_HLEN + payload.len();
    let need = ETH_HLEN + ip_hlen + udp_len;
    if need > buf.len() || need > FRAME_MAX {
        return Err(FrameError::TooLarge {
            need,
            have: buf.len().min(FRAME_MAX),
        });
    }
    let f = &mut buf[..need];
    f[0..6].copy_from_slice(&spec.dst_mac);
    f[6..12].copy_from_slice(&spec.src_mac);
    // Both lengths are below FRAME_MAX, so the u16 conversions below cannot truncate.
    let udp_len16 = udp_len as u16;
    let l4 = ETH_HLEN + ip_hlen;
    // Pseudo-header sum for the UDP checksum.
    let mut pseudo = 0u32;
    match (spec.src_ip, spec.dst_ip) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
            let ip = &mut f[ETH_HLEN..l4];
            ip[0] = 0x45;
            ip[1] = 0;
            ip[2..4].copy_from_slice(&((IPV4_HLEN + udp_len) as u16).to_be_bytes());
            ip[4..8].fill(0); // id, flags, fragment offset
            ip[8] = DEFAULT_TTL;
            ip[9] = 17;
            ip[10..12].fill(0);
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let c = csum_fold(csum_add(0, ip));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            pseudo = csum_add(pseudo, &s.octets());
            pseudo = csum_add(pseudo, &d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
            let ip = &mut f[ETH_HLEN..l4];
            ip[0..4].copy_from_slice(&[0x60, 0, 0, 0]);
            ip[4..6].copy_from_slice(&udp_len16.to_be_bytes());
            ip[6] = 17;
            ip[7] = DEFAULT_TTL;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            pseudo = csum_add(pseudo, &s.octets());
            pseudo = csum_add(pseudo, &d.octets());
        }
        _ => return Err(FrameError::MixedVersions),
    }
    pseudo += 17 + u32::from(udp_len16);
    let udp = &mut f[l4..];
    udp[0..2].copy_from_slice(&spec.src_port.to_be_bytes());
    udp[2..4].copy_from_slice(&spec.dst_port.to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len16.to_be_bytes());
    udp[6..8].fill(0);
    udp[8..].copy_from_slice(payload);
    let mut c = csum_fold(csum_add(pseudo, udp));
    if c == 0 {
        c = 0xffff; // 0 means "no checksum" in UDP over IPv4 and is invalid over IPv6
    }
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    Ok(need)
}

/// The UDP payload of an IPv4/IPv6 UDP frame without VLAN tags or extension headers (as built
/// by [`build_udp`]); `None` for anything else or a truncated frame.
pub fn udp_payload(frame: &[u8]) -> Option<&[u8]> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let l4 = match ethertype {
        0x0800 if frame.get(ETH_HLEN)? >> 4 == 4 && *frame.get(ETH_HLEN + 9)? == 17 => {
            ETH_HLEN + usize::from(frame[ETH_HLEN] & 0xf) * 4
        }
        0x86dd if *frame.get(ETH_HLEN + 6)? == 17 => ETH_HLEN + IPV6_HLEN,
        _ => return None,
    };
    let len = usize::from(u16::from_be_bytes([
        *frame.get(l4 + 4)?,
        *frame.get(l4 + 5)?,
    ]));
    frame.get(l4 + UDP_HLEN..l4.checked_add(len)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ipv4_header_checksum_verifies() {
        let mut buf = [0u8; 128];
        let n = build_udp(&FrameSpec::test(IpVersion::V4, 4420), b"abc", &mut buf).unwrap();
        assert_eq!(n, 14 + 20 + 8 + 3);
        assert_eq!(csum_fold(csum_add(0, &buf[14..34])), 0);
        assert_eq!(udp_payload(&buf[..n]), Some(&b"abc"[..]));
    }

    #[test]
    fn too_large_is_refused() {
        let mut buf = [0u8; 64];
        let r = build_udp(&FrameSpec::test(IpVersion::V6, 1), &[0; 100], &mut buf);
        assert!(matches!(r, Err(FrameError::TooLarge { .. })));
    }

    proptest! {
        #[test]
        fn payload_round_trips(v6 in any::<bool>(), p in proptest::collection::vec(any::<u8>(), 0..1400)) {
            let ip = if v6 { IpVersion::V6 } else { IpVersion::V4 };
            let mut buf = [0u8; FRAME_MAX];
            let n = build_udp(&FrameSpec::test(ip, 7), &p, &mut buf).unwrap();
            prop_assert_eq!(udp_payload(&buf[..n]), Some(&p[..]));
        }

        #[test]
        fn udp_payload_never_panics(f in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = udp_payload(&f);
        }
    }
}
