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
const RTM_SETLINK: u16 = 19;
const NLM_F_ACK: u16 = 4;
const NLA_F_NESTED: u16 = 0x8000;
const IFLA_XDP_FD: u16 = 1;
const IFLA_XDP_ATTACHED: u16 = 2;
const IFLA_XDP_FLAGS: u16 = 3;
const IFLA_XDP_HW_PROG_ID: u16 = 7;
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

/// Opens a NETLINK_ROUTE socket, sends `req` to the kernel and returns its (first) answer.
fn netlink_call(call: &'static str, req: &[u8]) -> Result<Vec<u8>, SteerError> {
    use std::os::fd::AsRawFd;
    let err = |source: std::io::Error| SteerError::Syscall { call, source };
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
    buf.truncate(n);
    if buf.len() < NLMSG_HDR_LEN {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "short netlink answer",
        )));
    }
    Ok(buf)
}

/// A `struct nlmsghdr` + `struct ifinfomsg` (family AF_UNSPEC) for `ifindex`, with room for
/// attributes appended by the caller (the length is fixed up by [`nl_finish`]).
fn nl_link_msg(kind: u16, flags: u16, ifindex: u32) -> Vec<u8> {
    let mut req = vec![0u8; NLMSG_HDR_LEN + IFINFOMSG_LEN];
    req[4..6].copy_from_slice(&kind.to_ne_bytes());
    req[6..8].copy_from_slice(&flags.to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes()); // sequence number
    req[NLMSG_HDR_LEN + 4..NLMSG_HDR_LEN + 8].copy_from_slice(&ifindex.to_ne_bytes());
    req
}

fn nl_finish(req: &mut [u8]) {
    let len = u32::try_from(req.len()).unwrap_or(u32::MAX);
    req[0..4].copy_from_slice(&len.to_ne_bytes());
}

/// The error code of an NLMSG_ERROR answer (0 is an acknowledgement), None for another type.
fn nl_error_code(msg: &[u8]) -> Option<i32> {
    let kind = u16::from_ne_bytes([msg[4], msg[5]]);
    if kind != NLMSG_ERROR {
        return None;
    }
    Some(
        msg.get(NLMSG_HDR_LEN..NLMSG_HDR_LEN + 4)
            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .unwrap_or(-libc::EBADMSG),
    )
}

/// `XDP_FLAGS_*` mode bits (uapi/linux/if_link.h).
pub const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
pub const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
pub const XDP_FLAGS_HW_MODE: u32 = 1 << 3;
/// `IFLA_XDP_ATTACHED` values (`XDP_ATTACHED_*`).
const XDP_ATTACHED_DRV: u8 = 1;
const XDP_ATTACHED_SKB: u8 = 2;
const XDP_ATTACHED_HW: u8 = 3;

/// The XDP programs attached to the interface `ifindex`: (program id, `XDP_FLAGS_*_MODE` of
/// its attach mode) per mode, at most one each.
pub fn xdp_programs(ifindex: u32) -> Result<Vec<(u32, u32)>, SteerError> {
    let bad = |what: &str| SteerError::Syscall {
        call: "RTM_GETLINK",
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned()),
    };
    let mut req = nl_link_msg(RTM_GETLINK, NLM_F_REQUEST, ifindex);
    nl_finish(&mut req);
    let msg = netlink_call("RTM_GETLINK", &req)?;
    if let Some(code) = nl_error_code(&msg) {
        return Err(SteerError::Syscall {
            call: "RTM_GETLINK",
            source: std::io::Error::from_raw_os_error(-code),
        });
    }
    let kind = u16::from_ne_bytes([msg[4], msg[5]]);
    if kind != RTM_NEWLINK || msg.len() < NLMSG_HDR_LEN + IFINFOMSG_LEN {
        return Err(bad("unexpected netlink answer"));
    }
    let len = (u32::from_ne_bytes([msg[0], msg[1], msg[2], msg[3]]) as usize).min(msg.len());
    let attrs = &msg[NLMSG_HDR_LEN + IFINFOMSG_LEN..len.max(NLMSG_HDR_LEN + IFINFOMSG_LEN)];
    let Some((_, xdp)) = nl_attrs(attrs).find(|(k, _)| *k == IFLA_XDP) else {
        return Ok(Vec::new());
    };
    let u32_of = |want: u16| {
        nl_attrs(xdp)
            .find(|(k, v)| *k == want && v.len() >= 4)
            .map(|(_, v)| u32::from_ne_bytes([v[0], v[1], v[2], v[3]]))
            .filter(|&id| id != 0)
    };
    let attached = nl_attrs(xdp)
        .find(|(k, v)| *k == IFLA_XDP_ATTACHED && !v.is_empty())
        .map_or(0, |(_, v)| v[0]);
    let mut progs = Vec::new();
    // Per-mode ids are given when several modes are attached; PROG_ID with the mode otherwise.
    for (attr, mode) in [
        (IFLA_XDP_DRV_PROG_ID, XDP_FLAGS_DRV_MODE),
        (IFLA_XDP_SKB_PROG_ID, XDP_FLAGS_SKB_MODE),
        (IFLA_XDP_HW_PROG_ID, XDP_FLAGS_HW_MODE),
    ] {
        if let Some(id) = u32_of(attr) {
            progs.push((id, mode));
        }
    }
    if progs.is_empty() {
        if let Some(id) = u32_of(IFLA_XDP_PROG_ID) {
            let mode = match attached {
                XDP_ATTACHED_DRV => XDP_FLAGS_DRV_MODE,
                XDP_ATTACHED_SKB => XDP_FLAGS_SKB_MODE,
                XDP_ATTACHED_HW => XDP_FLAGS_HW_MODE,
                _ => 0,
            };
            progs.push((id, mode));
        }
    }
    Ok(progs)
}

/// The id of the XDP program attached to the interface `ifindex` (any mode), if one is.
pub fn xdp_prog_id(ifindex: u32) -> Result<Option<u32>, SteerError> {
    Ok(xdp_programs(ifindex)?.first().map(|&(id, _)| id))
}

/// Attaches the loaded XDP program `prog_fd` to `ifindex` by netlink (`IFLA_XDP_FD`, as
/// libbpf's `bpf_xdp_attach` and DPDK's net_af_xdp PMD do) with `XDP_FLAGS_*` `flags`; a
/// `prog_fd` of -1 detaches the program of the mode in `flags`. A program attached this way
/// stays attached when its loader exits.
pub fn xdp_set_link_fd(ifindex: u32, prog_fd: RawFd, flags: u32) -> Result<(), SteerError> {
    let mut req = nl_link_msg(RTM_SETLINK, NLM_F_REQUEST | NLM_F_ACK, ifindex);
    // IFLA_XDP (nested) { IFLA_XDP_FD: s32, IFLA_XDP_FLAGS: u32 }.
    req.extend_from_slice(&20u16.to_ne_bytes());
    req.extend_from_slice(&(IFLA_XDP | NLA_F_NESTED).to_ne_bytes());
    req.extend_from_slice(&8u16.to_ne_bytes());
    req.extend_from_slice(&IFLA_XDP_FD.to_ne_bytes());
    req.extend_from_slice(&prog_fd.to_ne_bytes());
    req.extend_from_slice(&8u16.to_ne_bytes());
    req.extend_from_slice(&IFLA_XDP_FLAGS.to_ne_bytes());
    req.extend_from_slice(&flags.to_ne_bytes());
    nl_finish(&mut req);
    let msg = netlink_call("RTM_SETLINK", &req)?;
    match nl_error_code(&msg) {
        Some(0) => Ok(()),
        Some(code) => Err(SteerError::Syscall {
            call: "RTM_SETLINK",
            source: std::io::Error::from_raw_os_error(-code),
        }),
        None => Err(SteerError::Syscall {
            call: "RTM_SETLINK",
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "unexpected netlink answer",
            ),
        }),
    }
}

/// Detaches the XDP program of every mode from `ifindex` by netlink. Fails (EBUSY) for a
/// program attached through a bpf link, which only its link's owner can detach.
pub fn xdp_detach_all(ifindex: u32) -> Result<(), SteerError> {
    for (_, mode) in xdp_programs(ifindex)? {
        xdp_set_link_fd(ifindex, -1, mode)?;
    }
    Ok(())
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
