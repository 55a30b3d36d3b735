//! The kernel-socket fallback: an `AF_PACKET` socket on the interface, for hosts where no XDP
//! program can be attached. It receives a *copy* of each frame (the kernel stack still gets
//! the original), so storage ports must have no kernel listener; an optional [`PortSet`] keeps
//! only storage frames, chosen by the same classifier as the XDP program. Bursts use
//! `recvmmsg`/`sendmmsg` into preallocated buffers.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::classify::{classify, PortSet, Verdict};
use crate::{Backend, PacketIo, RX_BURST_MAX};

/// Receive buffer per frame: a 1500-byte MTU frame plus VLAN tags, rounded up.
pub const FRAME_BUF: usize = 2048;
/// Frames per `sendmmsg`.
pub const TX_BURST_MAX: usize = 64;

/// Errors of packet sockets.
#[derive(Debug, thiserror::Error)]
pub enum PacketSocketError {
    #[error("{call}: {source}")]
    Sys {
        call: &'static str,
        source: std::io::Error,
    },
    #[error("no interface named {0:?}")]
    UnknownInterface(String),
    #[error("frame of {len} bytes exceeds {FRAME_BUF}")]
    FrameTooLarge { len: usize },
}

fn sys_err(call: &'static str) -> PacketSocketError {
    PacketSocketError::Sys {
        call,
        source: std::io::Error::last_os_error(),
    }
}

/// An `AF_PACKET` raw socket bound to one interface.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    filter: Option<PortSet>,
    bufs: Vec<[u8; FRAME_BUF]>,
    /// Frames received but not storage traffic (dropped by the userspace filter).
    pub filtered: u64,
}

impl PacketSocket {
    /// Opens a non-blocking packet socket on `iface`; with `filter`, only frames the steering
    /// classifier would steer are delivered.
    pub fn new(iface: &str, filter: Option<PortSet>) -> Result<Self, PacketSocketError> {
        let cname = std::ffi::CString::new(iface)
            .map_err(|_| PacketSocketError::UnknownInterface(iface.into()))?;
        // SAFETY: `cname` is a valid NUL-terminated string for the duration of the call.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            return Err(PacketSocketError::UnknownInterface(iface.into()));
        }
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation; the result is checked and owned right away.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::c_int::from(proto),
            )
        };
        if raw < 0 {
            return Err(sys_err("socket(AF_PACKET)"));
        }
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let one: libc::c_int = 1;
        // SAFETY: `one` is a live c_int and its size is passed. Without this option the socket
        // would also receive every frame it sends.
        let r = unsafe {
            libc::setsockopt(
                raw,
                libc::SOL_PACKET,
                libc::PACKET_IGNORE_OUTGOING,
                std::ptr::from_ref(&one).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(sys_err("PACKET_IGNORE_OUTGOING"));
        }
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto;
        sa.sll_ifindex = ifindex as i32;
        // SAFETY: `sa` is a live sockaddr_ll and its size is passed.
        let r = unsafe {
            libc::bind(
                raw,
                std::ptr::from_ref(&sa).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(sys_err("bind(AF_PACKET)"));
        }
        Ok(Self {
            fd,
            filter,
            bufs: vec![[0u8; FRAME_BUF]; RX_BURST_MAX],
            filtered: 0,
        })
    }
}

impl PacketIo for PacketSocket {
    fn rx_burst(&mut self, max: usize, f: &mut dyn FnMut(&[u8])) -> Result<usize, crate::NetError> {
        let n = max.min(RX_BURST_MAX);
        if n == 0 {
            return Ok(0);
        }
        let mut iovs: Vec<libc::iovec> = self.bufs[..n]
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: FRAME_BUF,
            })
            .collect();
        // SAFETY: all-zero is a valid mmsghdr (null pointers, zero lengths).
        let mut msgs: Vec<libc::mmsghdr> = (0..n).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: `msgs` holds `n` headers, each pointing at one live iovec over a live buffer
        // of FRAME_BUF bytes; all outlive the call.
        let r = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                return Ok(0);
            }
            return Err(PacketSocketError::Sys {
                call: "recvmmsg",
                source: e,
            }
            .into());
        }
        let got = r as usize;
        let mut delivered = 0;
        for (m, buf) in msgs.iter().zip(self.bufs.iter()).take(got) {
            // Truncated frames (MSG_TRUNC) are delivered cut at FRAME_BUF; parsers bound reads.
            let len = (m.msg_len as usize).min(FRAME_BUF);
            let frame = &buf[..len];
            if let Some(ports) = &self.filter {
                if classify(frame, ports) != Verdict::Steer {
                    self.filtered += 1;
                    continue;
                }
            }
            f(frame);
            delivered += 1;
        }
        Ok(delivered)
    }

    fn tx_burst(&mut self, frames: &[&[u8]]) -> Result<usize, crate::NetError> {
        let n = frames.len().min(TX_BURST_MAX);
        if n == 0 {
            return Ok(0);
        }
        if let Some(f) = frames[..n].iter().find(|f| f.len() > FRAME_BUF) {
            return Err(PacketSocketError::FrameTooLarge { len: f.len() }.into());
        }
        let mut iovs: Vec<libc::iovec> = frames[..n]
            .iter()
            .map(|f| libc::iovec {
                // sendmmsg only reads through iov_base; the cast to *mut is the C API's.
                iov_base: f.as_ptr().cast_mut().cast(),
                iov_len: f.len(),
            })
            .collect();
        // SAFETY: all-zero is a valid mmsghdr.
        let mut msgs: Vec<libc::mmsghdr> = (0..n).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: `msgs` holds `n` headers pointing at live iovecs over the caller's frames,
        // which the kernel only reads; all outlive the call. The socket is bound, so no
        // destination address is needed.
        let r = unsafe {
            libc::sendmmsg(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::ENOBUFS)) {
                return Ok(0);
            }
            return Err(PacketSocketError::Sys {
                call: "sendmmsg",
                source: e,
            }
            .into());
        }
        Ok(r as usize)
    }

    fn wake_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn backend(&self) -> Backend {
        Backend::Socket
    }
}
