//! Packet I/O for the storage network path.
//!
//! Map of the module:
//! - [`PacketIo`]: burst receive/transmit of Ethernet frames plus an fd to sleep on, with
//!   backends [`af_xdp::XskSocket`] (frames steered by the XDP program of the `ebpf` crate) and
//!   [`packet_socket::PacketSocket`] (kernel `AF_PACKET` fallback).
//! - `dpdk` (cargo feature `dpdk`): DPDK 22.11 ports as a third [`PacketIo`] backend.
//! - [`classify`]: which frames are storage traffic; the pure mirror of the XDP program.
//! - [`frame`]: building and reading UDP frames (tests, benchmark, datagram transmit).
//! - [`port`]: a port's typed specification (stratad parses `--port iface=NAME,...`).
//! - [`poller`]: [`poller::Poller`], the hook a reactor polls each iteration.

pub mod af_xdp;
pub mod classify;
#[cfg(feature = "dpdk")]
pub mod dpdk;
pub mod frame;
pub mod packet_socket;
pub mod poller;
pub mod port;

use std::os::fd::RawFd;

/// Frames handed out by one `rx_burst` call at most (bounds per-burst buffers and latency).
pub const RX_BURST_MAX: usize = 64;

/// Which implementation moves the frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    AfXdp,
    Socket,
    Dpdk,
}

/// Errors of packet I/O, by backend.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("AF_XDP: {0}")]
    Xsk(#[from] af_xdp::XskError),
    #[error("packet socket: {0}")]
    Socket(#[from] packet_socket::PacketSocketError),
    #[cfg(feature = "dpdk")]
    #[error("DPDK: {0}")]
    Dpdk(#[from] dpdk::DpdkError),
}

/// Burst packet I/O on one queue of one port, driven by one reactor thread.
pub trait PacketIo: Send {
    /// Hands up to `max` (at most [`RX_BURST_MAX`]) received frames to `f`, one call each;
    /// a frame's bytes are valid only during its call (zero-copy backends lend their buffer).
    /// Returns the number of frames delivered.
    fn rx_burst(&mut self, max: usize, f: &mut dyn FnMut(&[u8])) -> Result<usize, NetError>;

    /// Queues `frames` for transmission (copied; the caller keeps its buffers) and returns
    /// how many were taken: fewer when rings or buffers are full, to be retried later.
    fn tx_burst(&mut self, frames: &[&[u8]]) -> Result<usize, NetError>;

    /// Pushes queued transmissions on (backends that need kicks) and returns how many frames
    /// are still in flight; 0 means everything handed to `tx_burst` has left.
    fn tx_flush(&mut self) -> Result<usize, NetError> {
        Ok(0)
    }

    /// A descriptor that polls readable when frames wait, for a reactor going to sleep; -1
    /// for poll-only backends (DPDK), on which a reactor must not sleep without a timer.
    fn wake_fd(&self) -> RawFd;

    /// The backend behind this queue.
    fn backend(&self) -> Backend;
}
