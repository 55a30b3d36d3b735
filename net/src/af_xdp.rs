//! AF_XDP sockets: frames redirected by the XDP steering program land in a UMEM this process
//! owns, through four shared rings (fill, RX, TX, completion), without system calls on the
//! data path except need_wakeup kicks.
//!
//! Everything is preallocated at creation: the UMEM (`frame_count` frames of `frame_size`
//! bytes), the rings, and the split of frames between receive (kept in the fill ring) and
//! transmit (a free list refilled from the completion ring). The socket is written with libc
//! directly (about the size of a libxdp dependency's build script, and nothing to vendor).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::{Backend, PacketIo, RX_BURST_MAX};

/// UMEM frame size: 2 KiB holds a 1500-byte MTU frame; aligned-mode chunks must be a power
/// of two between 2 KiB and the page size.
pub const FRAME_SIZE: u32 = 2048;
/// Frames in a UMEM by default: half for receive, half for transmit.
pub const DEFAULT_FRAME_COUNT: u32 = 4096;
/// Upper bound on frames (32 MiB of UMEM at 2 KiB).
pub const MAX_FRAME_COUNT: u32 = 1 << 14;
/// Descriptors per ring by default (a power of two, as the kernel requires).
pub const DEFAULT_RING_SIZE: u32 = 2048;
/// Upper bound on ring sizes.
pub const MAX_RING_SIZE: u32 = 1 << 14;
/// `sendto` kicks per transmit burst in copy mode: the kernel sends at most 32 frames per
/// kick (`TX_BATCH_SIZE`), so a burst of [`RX_BURST_MAX`] needs a few; the rest waits for the
/// next burst or [`PacketIo::tx_flush`].
pub const TX_KICKS_MAX: u32 = 4;

/// Errors of AF_XDP sockets.
#[derive(Debug, thiserror::Error)]
pub enum XskError {
    #[error("{call}: {source}")]
    Sys {
        call: &'static str,
        source: std::io::Error,
    },
    #[error("invalid AF_XDP configuration: {0}")]
    Config(&'static str),
    #[error("no interface named {0:?}")]
    UnknownInterface(String),
    #[error("frame of {len} bytes exceeds the UMEM frame size {FRAME_SIZE}")]
    FrameTooLarge { len: usize },
    #[error("kernel returned an RX descriptor outside the UMEM (addr {addr:#x}, len {len})")]
    BadDescriptor { addr: u64, len: u32 },
}

fn sys_err(call: &'static str) -> XskError {
    XskError::Sys {
        call,
        source: std::io::Error::last_os_error(),
    }
}

/// Copy or zero-copy binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum XskMode {
    /// Let the kernel choose (zero-copy where the driver supports it).
    #[default]
    Auto,
    Copy,
    ZeroCopy,
}

/// Sizes and flags of an AF_XDP socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XskConfig {
    /// UMEM frames, a power of two in 2..=[`MAX_FRAME_COUNT`].
    pub frame_count: u32,
    /// Descriptors per ring, a power of two in 2..=[`MAX_RING_SIZE`], at least
    /// `frame_count / 2` so the fill ring holds every receive frame.
    pub ring_size: u32,
    /// Ask the kernel to set need_wakeup flags instead of kicking on every burst.
    pub need_wakeup: bool,
    pub mode: XskMode,
}

impl Default for XskConfig {
    fn default() -> Self {
        Self {
            frame_count: DEFAULT_FRAME_COUNT,
            ring_size: DEFAULT_RING_SIZE,
            need_wakeup: true,
            mode: XskMode::Auto,
        }
    }
}

impl XskConfig {
    fn validate(&self) -> Result<(), XskError> {
        if !self.frame_count.is_power_of_two()
            || self.frame_count < 2
            || self.frame_count > MAX_FRAME_COUNT
        {
            return Err(XskError::Config("frame_count"));
        }
        if !self.ring_size.is_power_of_two()
            || self.ring_size < 2
            || self.ring_size > MAX_RING_SIZE
            || self.ring_size < self.frame_count / 2
        {
            return Err(XskError::Config("ring_size"));
        }
        Ok(())
    }
}

/// An anonymous shared mapping, unmapped on drop.
#[derive(Debug)]
struct Mmap {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mmap {
    fn new(len: usize, fd: RawFd, offset: i64, call: &'static str) -> Result<Self, XskError> {
        let flags = if fd < 0 {
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE
        } else {
            libc::MAP_SHARED | libc::MAP_POPULATE
        };
        // SAFETY: a fresh mapping at an address the kernel chooses; no existing memory is
        // affected. The result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(sys_err(call));
        }
        NonNull::new(p.cast::<u8>())
            .map(|ptr| Self { ptr, len })
            .ok_or(XskError::Config("mmap returned NULL"))
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly one mapping made by `Mmap::new`, and every pointer
        // into it (rings, UMEM slices) belongs to the owning `XskSocket`, which is being dropped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// One of the four rings: producer and consumer indexes shared with the kernel, free-running
/// u32 counters masked into `size` slots of `T`.
#[derive(Debug)]
struct Ring<T> {
    _map: Mmap,
    producer: NonNull<AtomicU32>,
    consumer: NonNull<AtomicU32>,
    flags: NonNull<AtomicU32>,
    desc: NonNull<T>,
    mask: u32,
}

impl<T: Copy> Ring<T> {
    fn map(
        fd: RawFd,
        off: &libc::xdp_ring_offset,
        size: u32,
        pgoff: i64,
        call: &'static str,
    ) -> Result<Self, XskError> {
        let desc_off = usize::try_from(off.desc).map_err(|_| XskError::Config("ring offset"))?;
        let len = desc_off + size as usize * std::mem::size_of::<T>();
        let map = Mmap::new(len, fd, pgoff, call)?;
        let at = |o: u64| -> Result<NonNull<u8>, XskError> {
            let o = usize::try_from(o).map_err(|_| XskError::Config("ring offset"))?;
            if o + 4 > len {
                return Err(XskError::Config("ring offset outside the mapping"));
            }
            // SAFETY: `o + 4 <= len`, so the pointer stays inside the mapping.
            Ok(unsafe { NonNull::new_unchecked(map.ptr.as_ptr().add(o)) })
        };
        Ok(Self {
            producer: at(off.producer)?.cast(),
            consumer: at(off.consumer)?.cast(),
            flags: at(off.flags)?.cast(),
            desc: at(off.desc)?.cast(),
            mask: size - 1,
            _map: map,
        })
    }

    fn producer(&self) -> &AtomicU32 {
        // SAFETY: points into our live mapping at the kernel-given, 4-aligned offset; the kernel
        // accesses it atomically too.
        unsafe { self.producer.as_ref() }
    }

    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: as for `producer`.
        unsafe { self.consumer.as_ref() }
    }

    fn needs_wakeup(&self) -> bool {
        // SAFETY: as for `producer`.
        let flags = unsafe { self.flags.as_ref() };
        flags.load(Ordering::Relaxed) & libc::XDP_RING_NEED_WAKEUP != 0
    }

    fn read(&self, idx: u32) -> T {
        // SAFETY: `idx & mask` < ring size, and the mapping holds `size` descriptors after
        // `desc`; the slot was published by the kernel (acquire on producer) before we read it.
        unsafe {
            self.desc
                .as_ptr()
                .add((idx & self.mask) as usize)
                .read_volatile()
        }
    }

    fn write(&self, idx: u32, v: T) {
        // SAFETY: as for `read`; the slot is ours until we publish it with a release store.
        unsafe {
            self.desc
                .as_ptr()
                .add((idx & self.mask) as usize)
                .write_volatile(v)
        }
    }
}

/// Counters of one socket (this side's view; the kernel's drops are in `XDP_STATISTICS`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XskStats {
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub kicks: u64,
}

/// An AF_XDP socket bound to one queue of one interface, with its own UMEM.
#[derive(Debug)]
pub struct XskSocket {
    fd: OwnedFd,
    umem: Mmap,
    fill: Ring<u64>,
    comp: Ring<u64>,
    rx: Ring<libc::xdp_desc>,
    tx: Ring<libc::xdp_desc>,
    /// Transmit frames not in flight (UMEM addresses).
    tx_free: Vec<u64>,
    /// Frames set aside for transmit (the UMEM's second half).
    tx_frames: u32,
    need_wakeup: bool,
    /// Bound in zero-copy mode (the driver's own rings); copy mode always needs TX kicks.
    zero_copy: bool,
    ifindex: u32,
    queue: u32,
    stats: XskStats,
}

// SAFETY: the raw pointers all point into mappings owned by the socket; moving the socket to
// another thread moves that ownership with it, and nothing is shared with other userspace
// threads.
unsafe impl Send for XskSocket {}

fn setsockopt<T>(fd: RawFd, opt: libc::c_int, v: &T, call: &'static str) -> Result<(), XskError> {
    // SAFETY: `v` is a live value of the type the option expects, and its size is passed.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_XDP,
            opt,
            std::ptr::from_ref(v).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(sys_err(call))
    } else {
        Ok(())
    }
}

impl XskSocket {
    /// Creates a socket with a fresh UMEM and binds it to `queue` of `iface`. Frames reach it
    /// only once an XDP program redirects to it (see `ebpf::Steering::register_socket`).
    pub fn new(iface: &str, queue: u32, cfg: XskConfig) -> Result<Self, XskError> {
        cfg.validate()?;
        let cname =
            std::ffi::CString::new(iface).map_err(|_| XskError::UnknownInterface(iface.into()))?;
        // SAFETY: `cname` is a valid NUL-terminated string for the duration of the call.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            return Err(XskError::UnknownInterface(iface.into()));
        }
        // SAFETY: plain socket creation; the result is checked and owned right away.
        let raw = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(sys_err("socket(AF_XDP)"));
        }
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let umem_len = cfg.frame_count as usize * FRAME_SIZE as usize;
        let umem = Mmap::new(umem_len, -1, 0, "mmap(UMEM)")?;
        let reg = libc::xdp_umem_reg {
            addr: umem.ptr.as_ptr() as u64,
            len: umem_len as u64,
            chunk_size: FRAME_SIZE,
            headroom: 0,
            flags: 0,
            tx_metadata_len: 0,
        };
        setsockopt(raw, libc::XDP_UMEM_REG, &reg, "XDP_UMEM_REG")?;
        let n = cfg.ring_size;
        setsockopt(raw, libc::XDP_UMEM_FILL_RING, &n, "XDP_UMEM_FILL_RING")?;
        setsockopt(
            raw,
            libc::XDP_UMEM_COMPLETION_RING,
            &n,
            "XDP_UMEM_COMPLETION_RING",
        )?;
        setsockopt(raw, libc::XDP_RX_RING, &n, "XDP_RX_RING")?;
        setsockopt(raw, libc::XDP_TX_RING, &n, "XDP_TX_RING")?;
        // SAFETY: all-zero is a valid xdp_mmap_offsets (plain integers).
        let mut off: libc::xdp_mmap_offsets = unsafe { std::mem::zeroed() };
        let mut optlen = std::mem::size_of::<libc::xdp_mmap_offsets>() as libc::socklen_t;
        // SAFETY: `off` and `optlen` are live and sized as passed.
        let r = unsafe {
            libc::getsockopt(
                raw,
                libc::SOL_XDP,
                libc::XDP_MMAP_OFFSETS,
                std::ptr::from_mut(&mut off).cast(),
                &mut optlen,
            )
        };
        if r < 0 {
            return Err(sys_err("XDP_MMAP_OFFSETS"));
        }
        if optlen as usize != std::mem::size_of::<libc::xdp_mmap_offsets>() {
            return Err(XskError::Config("kernel without ring flags (before 5.4)"));
        }
        let fill = Ring::map(
            raw,
            &off.fr,
            n,
            libc::XDP_UMEM_PGOFF_FILL_RING as i64,
            "mmap(fill)",
        )?;
        let comp = Ring::map(
            raw,
            &off.cr,
            n,
            libc::XDP_UMEM_PGOFF_COMPLETION_RING as i64,
            "mmap(completion)",
        )?;
        let rx = Ring::map(raw, &off.rx, n, libc::XDP_PGOFF_RX_RING, "mmap(rx)")?;
        let tx = Ring::map(raw, &off.tx, n, libc::XDP_PGOFF_TX_RING, "mmap(tx)")?;
        let mut flags = match cfg.mode {
            XskMode::Auto => 0,
            XskMode::Copy => libc::XDP_COPY,
            XskMode::ZeroCopy => libc::XDP_ZEROCOPY,
        };
        if cfg.need_wakeup {
            flags |= libc::XDP_USE_NEED_WAKEUP;
        }
        let sa = libc::sockaddr_xdp {
            sxdp_family: libc::AF_XDP as u16,
            sxdp_flags: flags,
            sxdp_ifindex: ifindex,
            sxdp_queue_id: queue,
            sxdp_shared_umem_fd: 0,
        };
        // SAFETY: `sa` is a live sockaddr_xdp and its size is passed.
        let r = unsafe {
            libc::bind(
                raw,
                std::ptr::from_ref(&sa).cast(),
                std::mem::size_of::<libc::sockaddr_xdp>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(sys_err("bind(AF_XDP)"));
        }
        let mut opts = libc::xdp_options { flags: 0 };
        let mut optlen = std::mem::size_of::<libc::xdp_options>() as libc::socklen_t;
        // SAFETY: `opts` and `optlen` are live and sized as passed.
        let r = unsafe {
            libc::getsockopt(
                raw,
                libc::SOL_XDP,
                libc::XDP_OPTIONS,
                std::ptr::from_mut(&mut opts).cast(),
                &mut optlen,
            )
        };
        if r < 0 {
            return Err(sys_err("XDP_OPTIONS"));
        }
        let zero_copy = opts.flags & libc::XDP_OPTIONS_ZEROCOPY != 0;
        // The first half of the frames receive: all of them wait in the fill ring.
        let rx_frames = cfg.frame_count / 2;
        for i in 0..rx_frames {
            fill.write(i, u64::from(i) * u64::from(FRAME_SIZE));
        }
        fill.producer().store(rx_frames, Ordering::Release);
        let tx_free = (rx_frames..cfg.frame_count)
            .map(|i| u64::from(i) * u64::from(FRAME_SIZE))
            .collect();
        Ok(Self {
            fd,
            umem,
            fill,
            comp,
            rx,
            tx,
            tx_free,
            tx_frames: cfg.frame_count - rx_frames,
            need_wakeup: cfg.need_wakeup,
            zero_copy,
            ifindex,
            queue,
            stats: XskStats::default(),
        })
    }

    /// Whether the kernel bound the socket in zero-copy mode.
    pub fn zero_copy(&self) -> bool {
        self.zero_copy
    }

    /// The interface index and queue this socket is bound to.
    pub fn binding(&self) -> (u32, u32) {
        (self.ifindex, self.queue)
    }

    /// This side's counters.
    pub fn stats(&self) -> XskStats {
        self.stats
    }

    /// The kernel's drop counters for this socket: (rx_dropped, rx_ring_full,
    /// rx_fill_ring_empty_descs).
    pub fn kernel_drops(&self) -> Result<(u64, u64, u64), XskError> {
        // SAFETY: all-zero is a valid xdp_statistics.
        let mut st: libc::xdp_statistics = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::xdp_statistics>() as libc::socklen_t;
        // SAFETY: `st` and `len` are live and sized as passed.
        let r = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_XDP,
                libc::XDP_STATISTICS,
                std::ptr::from_mut(&mut st).cast(),
                &mut len,
            )
        };
        if r < 0 {
            return Err(sys_err("XDP_STATISTICS"));
        }
        Ok((st.rx_dropped, st.rx_ring_full, st.rx_fill_ring_empty_descs))
    }

    fn kick_rx(&mut self) {
        self.stats.kicks += 1;
        // SAFETY: a zero-length, non-blocking receive on our socket: no buffer is written. It
        // only asks the kernel to process the fill ring; errors (EAGAIN) are expected.
        unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                std::ptr::null_mut(),
                0,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
    }

    fn kick_tx(&mut self) {
        self.stats.kicks += 1;
        // SAFETY: a zero-length, non-blocking send on our socket: no buffer is read. It asks
        // the kernel to process the TX ring; EAGAIN/EBUSY/ENOBUFS mean "try later" and the
        // frames stay queued, so the result is not needed.
        unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                std::ptr::null(),
                0,
                libc::MSG_DONTWAIT,
                std::ptr::null(),
                0,
            )
        };
    }

    /// Descriptors in the TX ring the kernel has not taken yet.
    fn tx_queued(&self) -> u32 {
        let prod = self.tx.producer().load(Ordering::Relaxed);
        prod.wrapping_sub(self.tx.consumer().load(Ordering::Acquire))
    }

    /// Gets queued descriptors moving. Copy mode transmits only from sendto(), at most 32
    /// frames per call, so it kicks until the ring is empty (bounded by [`TX_KICKS_MAX`]);
    /// zero-copy drivers with need_wakeup say when they need a kick.
    fn push_tx(&mut self) {
        if self.zero_copy {
            if !self.need_wakeup || self.tx.needs_wakeup() {
                self.kick_tx();
            }
            return;
        }
        for _ in 0..TX_KICKS_MAX {
            self.kick_tx();
            if self.tx_queued() == 0 {
                break;
            }
        }
    }

    /// Moves completed transmit frames back to the free list.
    fn reclaim_tx(&mut self) {
        let prod = self.comp.producer().load(Ordering::Acquire);
        let cons = self.comp.consumer().load(Ordering::Relaxed);
        let n = prod.wrapping_sub(cons);
        for i in 0..n {
            self.tx_free.push(self.comp.read(cons.wrapping_add(i)));
        }
        self.comp.consumer().store(prod, Ordering::Release);
    }

    fn umem_slice(&self, addr: u64, len: u32) -> Result<&[u8], XskError> {
        let bad = || XskError::BadDescriptor { addr, len };
        let start = usize::try_from(addr).map_err(|_| bad())?;
        let end = start.checked_add(len as usize).ok_or_else(bad)?;
        if end > self.umem.len {
            return Err(bad());
        }
        // SAFETY: `start..end` lies inside the UMEM mapping; the kernel wrote this frame before
        // publishing its descriptor and will not touch it until we return it to the fill ring.
        Ok(unsafe { std::slice::from_raw_parts(self.umem.ptr.as_ptr().add(start), len as usize) })
    }
}

impl PacketIo for XskSocket {
    fn rx_burst(&mut self, max: usize, f: &mut dyn FnMut(&[u8])) -> Result<usize, crate::NetError> {
        let max = max.min(RX_BURST_MAX) as u32;
        let prod = self.rx.producer().load(Ordering::Acquire);
        let cons = self.rx.consumer().load(Ordering::Relaxed);
        let n = prod.wrapping_sub(cons).min(max);
        if n == 0 {
            if self.need_wakeup && self.fill.needs_wakeup() {
                self.kick_rx();
            }
            return Ok(0);
        }
        let fill_prod = self.fill.producer().load(Ordering::Relaxed);
        let mut result = Ok(());
        for i in 0..n {
            let d = self.rx.read(cons.wrapping_add(i));
            match self.umem_slice(d.addr, d.len) {
                Ok(frame) => f(frame),
                Err(e) => result = Err(e),
            }
            // Back to the fill ring whatever happened (aligned mode: the frame's base address).
            self.fill.write(
                fill_prod.wrapping_add(i),
                d.addr & !u64::from(FRAME_SIZE - 1),
            );
        }
        self.rx
            .consumer()
            .store(cons.wrapping_add(n), Ordering::Release);
        self.fill
            .producer()
            .store(fill_prod.wrapping_add(n), Ordering::Release);
        self.stats.rx_frames += u64::from(n);
        if self.need_wakeup && self.fill.needs_wakeup() {
            self.kick_rx();
        }
        result?;
        Ok(n as usize)
    }

    fn tx_burst(&mut self, frames: &[&[u8]]) -> Result<usize, crate::NetError> {
        self.reclaim_tx();
        let prod = self.tx.producer().load(Ordering::Relaxed);
        let cons = self.tx.consumer().load(Ordering::Acquire);
        let space = (self.tx.mask + 1) - prod.wrapping_sub(cons);
        let mut sent = 0u32;
        for frame in frames.iter().take(space as usize) {
            if frame.len() > FRAME_SIZE as usize {
                return Err(XskError::FrameTooLarge { len: frame.len() }.into());
            }
            let Some(addr) = self.tx_free.pop() else {
                break;
            };
            // SAFETY: `addr` is a free transmit frame (not in any ring), FRAME_SIZE bytes inside
            // the UMEM (addresses are multiples of FRAME_SIZE below frame_count * FRAME_SIZE),
            // and frame.len() <= FRAME_SIZE.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    frame.as_ptr(),
                    self.umem.ptr.as_ptr().add(addr as usize),
                    frame.len(),
                );
            }
            self.tx.write(
                prod.wrapping_add(sent),
                libc::xdp_desc {
                    addr,
                    len: frame.len() as u32,
                    options: 0,
                },
            );
            sent += 1;
        }
        if sent > 0 {
            self.tx
                .producer()
                .store(prod.wrapping_add(sent), Ordering::Release);
            self.stats.tx_frames += u64::from(sent);
        }
        if sent > 0 {
            self.push_tx();
        }
        Ok(sent as usize)
    }

    fn tx_flush(&mut self) -> Result<usize, crate::NetError> {
        self.reclaim_tx();
        if self.tx_queued() > 0 {
            self.push_tx();
        }
        self.reclaim_tx();
        let in_flight = (self.tx_frames - self.tx_free.len() as u32) as usize;
        Ok(in_flight)
    }

    fn wake_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn backend(&self) -> Backend {
        Backend::AfXdp
    }
}
