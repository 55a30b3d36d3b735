//! The bpf(2) commands aya 0.13 does not expose, interface lookup, and the rtnetlink query of
//! the XDP program attached to an interface (aya 0.13 only attaches and detaches).

use std::ffi::CString;
use std::os::fd::RawFd;

use crate::SteerError;

/// `BPF_MAP_DELETE_ELEM` and `BPF_PROG_TEST_RUN` from `enum bpf_cmd` (uapi/linux/bpf.h).
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
/// The kernel refuses XDP test frames larger than a page minus headroom and tailroom; frames
/// are bounded well below that so the call never fails on size.
pub const TEST_RUN_MAX_FRAME: usize = 3000;

/// `union bpf_attr` for `BPF_MAP_*_ELEM` (the fields used).
#[repr(C, align(8))]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr`'s `test` member up to `batch_size`.
#[repr(C, align(8))]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<()> {
    // SAFETY: `attr` is a live, initialised repr(C) prefix of `union bpf_attr` for `cmd`, and
    // its size is passed so the kernel reads (and zero-extends) no more than it; pointers in it
    // were set by the callers to buffers that outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Deletes the `u32` key `key` of the map `map_fd`; a missing key is not an error.
pub fn map_delete_u32(map_fd: RawFd, key: u32) -> Result<(), SteerError> {
    let mut attr = MapElemAttr {
        map_fd: u32::try_from(map_fd).unwrap_or(u32::MAX),
        key: std::ptr::from_ref(&key) as u64,
        ..Default::default()
    };
    match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(source) => Err(SteerError::Syscall {
            call: "BPF_MAP_DELETE_ELEM",
            source,
        }),
    }
}

/// Runs `frame` once through the XDP program `prog_fd`; returns its action.
pub fn prog_test_run(prog_fd: RawFd, frame: &[u8]) -> Result<u32, SteerError> {
    let invalid = |what: &str| SteerError::Syscall {
        call: "BPF_PROG_TEST_RUN",
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_owned()),
    };
    if frame.len() > TEST_RUN_MAX_FRAME {
        return Err(invalid("frame larger than TEST_RUN_MAX_FRAME"));
    }
    let mut attr = TestRunAttr {
        prog_fd: u32::try_from(prog_fd).map_err(|_| invalid("bad program fd"))?,
        data_size_in: u32::try_from(frame.len()).map_err(|_| invalid("frame too large"))?,
        data_in: frame.as_ptr() as u64,
        repeat: 1,
        ..Default::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr).map_err(|source| SteerError::Syscall {
        call: "BPF_PROG_TEST_RUN",
        source,
    })?;
    Ok(attr.retval)
}

/// The index of the interface `name` in the caller's network namespace.
pub fn if_index(name: &str) -> Result<u32, SteerError> {
    let c = CString::new(name).map_err(|_| SteerError::UnknownInterface(name.to_owned()))?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        Err(SteerError::UnknownInterface(name.to_owned()))
    } else {
        Ok(idx)
    }
}

/// rtnetlink message types and attributes (uapi/linux/rtnetlink.h, if_link.h, netlink.h).
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const IFLA_XDP: u16 = 43;
const IFLA_XDP_PROG_ID: u16 = 4;
const IFLA_XDP_DRV_PROG_ID: u16 = 5;
const IFLA_XDP_SKB_PROG_ID: u16 = 6;
/// The attribute type without the NLA_F_NESTED and NLA_F_NET_BYTEORDER flag bits.
const NLA_TYPE_MASK: u16 = 0x3fff;
/// `struct nlmsghdr` and `struct ifinfomsg` sizes.
const NLMSG_HDR_LEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
/// Receive buffer for one RTM_NEWLINK answer: a link message is a few KiB at most without
/// IFLA_EXT_MASK (no per-VF data is asked for).
const NETLINK_REPLY_MAX: usize = 32 << 10;

/// The netlink attributes (type without flags, payload) in `buf`.
fn nl_attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16::from_ne_bytes([*buf.first()?, *buf.get(1)?]));
        let kind = u16::from_ne_bytes([*buf.get(2)?, *buf.get(3)?]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some((kind, payload))
    })
}

/// The id of the XDP program attached to the interface `ifindex` (any mode), if one is.
pub fn xdp_prog_id(ifindex: u32) -> Result<Option<u32>, SteerError> {
    let err = |source: std::io::Error| SteerError::Syscall {
        call: "RTM_GETLINK",
        source,
    };
    let bad = |what: &str| {
        err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            what.to_owned(),
        ))
    };
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor owned by nothing else.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    use std::os::fd::AsRawFd;
    let mut req = [0u8; NLMSG_HDR_LEN + IFINFOMSG_LEN];
    let req_len = req.len() as u32;
    req[0..4].copy_from_slice(&req_len.to_ne_bytes());
    req[4..6].copy_from_slice(&RTM_GETLINK.to_ne_bytes());
    req[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes()); // sequence number
                                                     // ifinfomsg: family AF_UNSPEC, type 0, index, flags 0, change 0.
    req[NLMSG_HDR_LEN + 4..NLMSG_HDR_LEN + 8].copy_from_slice(&ifindex.to_ne_bytes());
    // SAFETY: an all-zero sockaddr_nl addresses the kernel.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: `req` and `kernel` are live for the call and their sizes are passed.
    let r = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            req.as_ptr().cast(),
            req.len(),
            0,
            std::ptr::from_ref(&kernel).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    let mut buf = vec![0u8; NETLINK_REPLY_MAX];
    // SAFETY: `buf` is live and writable for its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    let n = usize::try_from(n).map_err(|_| err(std::io::Error::last_os_error()))?;
    let msg = &buf[..n];
    if msg.len() < NLMSG_HDR_LEN {
        return Err(bad("short netlink answer"));
    }
    let kind = u16::from_ne_bytes([msg[4], msg[5]]);
    if kind == NLMSG_ERROR {
        let code = msg
            .get(NLMSG_HDR_LEN..NLMSG_HDR_LEN + 4)
            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| bad("short netlink error"))?;
        return Err(err(std::io::Error::from_raw_os_error(-code)));
    }
    if kind != RTM_NEWLINK || msg.len() < NLMSG_HDR_LEN + IFINFOMSG_LEN {
        return Err(bad("unexpected netlink answer"));
    }
    let len = (u32::from_ne_bytes([msg[0], msg[1], msg[2], msg[3]]) as usize).min(msg.len());
    let attrs = &msg[NLMSG_HDR_LEN + IFINFOMSG_LEN..len.max(NLMSG_HDR_LEN + IFINFOMSG_LEN)];
    let Some((_, xdp)) = nl_attrs(attrs).find(|(k, _)| *k == IFLA_XDP) else {
        return Ok(None);
    };
    // PROG_ID is given when one mode is attached; DRV/SKB per mode.
    for want in [IFLA_XDP_PROG_ID, IFLA_XDP_DRV_PROG_ID, IFLA_XDP_SKB_PROG_ID] {
        if let Some((_, v)) = nl_attrs(xdp).find(|(k, v)| *k == want && v.len() >= 4) {
            let id = u32::from_ne_bytes([v[0], v[1], v[2], v[3]]);
            if id != 0 {
                return Ok(Some(id));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netlink_attributes_parse_and_stop_at_garbage() {
        // (len 8, type 43 | NLA_F_NESTED, payload 4 bytes), (len 5, type 1, 1 byte + pad).
        let mut buf = Vec::new();
        buf.extend_from_slice(&8u16.to_ne_bytes());
        buf.extend_from_slice(&(43u16 | 0x8000).to_ne_bytes());
        buf.extend_from_slice(&7u32.to_ne_bytes());
        buf.extend_from_slice(&5u16.to_ne_bytes());
        buf.extend_from_slice(&1u16.to_ne_bytes());
        buf.extend_from_slice(&[9, 0, 0, 0]);
        // A length running past the end ends the walk.
        buf.extend_from_slice(&200u16.to_ne_bytes());
        buf.extend_from_slice(&2u16.to_ne_bytes());
        let got: Vec<(u16, Vec<u8>)> = nl_attrs(&buf).map(|(k, v)| (k, v.to_vec())).collect();
        assert_eq!(got, vec![(43, 7u32.to_ne_bytes().to_vec()), (1, vec![9])]);
        assert_eq!(nl_attrs(&[1, 0]).count(), 0);
        assert_eq!(nl_attrs(&[]).count(), 0);
    }

    #[test]
    fn loopback_has_no_xdp_program() {
        // Link queries need no privilege.
        assert_eq!(xdp_prog_id(if_index("lo").unwrap()).unwrap(), None);
    }
}
