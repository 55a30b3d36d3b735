//! I/O engines: the edge between the reactors and the kernel.
//!
//! One engine per reactor thread. A backend turns a validated request into [`IoOp`]s pushed to
//! the engine, and a SAN connection its socket receives and sends ([`IoOp::Recv`],
//! [`IoOp::Send`]); the reactor submits them in one batch and later reaps [`Completion`]s,
//! matched by `user_data`. [`uring::UringEngine`] uses io_uring; [`sync::SyncEngine`] executes each op
//! at push time (fallback where io_uring is unavailable, and for tests);
//! [`fault::FaultEngine`] wraps another engine and injects errors.

pub mod fault;
pub mod sync;
pub mod uring;

#[cfg(test)]
mod socket_tests;

use std::os::fd::RawFd;

use thiserror::Error;

/// Errors of the engine layer.
#[derive(Debug, Error)]
pub enum EngineError {
    /// The engine has as many operations in flight as it can hold; retry after reaping.
    #[error("engine full")]
    Full,
    /// Setting up or driving the kernel interface failed.
    #[error("engine I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// One operation on a file descriptor. Offsets and lengths are in bytes.
#[derive(Debug, Clone, Copy)]
pub enum IoOp {
    /// preadv(fd, iov, iov_count, offset).
    Readv {
        /// Target file.
        fd: RawFd,
        /// Scatter list; must stay valid until the completion is reaped.
        iov: *const libc::iovec,
        /// Entries in `iov`.
        iov_count: u32,
        /// File offset.
        offset: u64,
    },
    /// pwritev(fd, iov, iov_count, offset).
    Writev {
        /// Target file.
        fd: RawFd,
        /// Gather list; must stay valid until the completion is reaped.
        iov: *const libc::iovec,
        /// Entries in `iov`.
        iov_count: u32,
        /// File offset.
        offset: u64,
    },
    /// fdatasync(fd).
    Fsync {
        /// Target file.
        fd: RawFd,
    },
    /// fallocate(fd, mode, offset, len): punch holes and zero ranges.
    Fallocate {
        /// Target file.
        fd: RawFd,
        /// FALLOC_FL_* flags.
        mode: i32,
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
    },
    /// recv(fd, buf, len, 0) on a connected socket: completes with the bytes received (0 at
    /// end of stream) or -errno. The synchronous engines never wait: with no data they
    /// complete with `-EAGAIN` (the caller retries when the socket is readable).
    Recv {
        /// Connected socket.
        fd: RawFd,
        /// Where the bytes go; must stay valid and unaliased until the completion is reaped.
        buf: *mut u8,
        /// Room at `buf`.
        len: u32,
    },
    /// sendmsg(fd, msg, MSG_NOSIGNAL) on a connected socket: a gather list of several PDUs
    /// in one call. Completes with the bytes sent (possibly fewer than asked: the caller sends
    /// the rest) or -errno (`-EPIPE` / `-ECONNRESET` once the peer is gone, never SIGPIPE).
    /// The synchronous engines complete with `-EAGAIN` when the socket buffer is full.
    ///
    /// A `msghdr` rather than an iovec list: io_uring reads the header (and the iovecs it
    /// names) when it issues the operation, so the caller keeps both in place, like the
    /// iovecs of [`IoOp::Readv`], until the completion is reaped.
    Send {
        /// Connected socket.
        fd: RawFd,
        /// `msg_iov`/`msg_iovlen` set, no name or control data; must stay valid until the
        /// completion is reaped, with the iovecs and buffers it points to.
        msg: *const libc::msghdr,
    },
}

/// A finished operation: `result` is bytes transferred (>= 0) or a negated errno.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Completion {
    /// The value given to [`IoEngine::push`].
    pub user_data: u64,
    /// Bytes transferred, or -errno.
    pub result: i32,
}

/// An I/O engine owned by one reactor thread.
pub trait IoEngine: std::fmt::Debug {
    /// Queues `op`; it reaches the kernel at the next [`IoEngine::submit`] (or at once for
    /// synchronous engines). Returns [`EngineError::Full`] when `in_flight() == capacity()`.
    ///
    /// # Safety
    /// Every pointer in `op` (the iovec array and the buffers it describes) must stay valid
    /// and unaliased by Rust references until the completion carrying `user_data` is reaped.
    unsafe fn push(&mut self, op: IoOp, user_data: u64) -> Result<(), EngineError>;

    /// Queues a completion that happened outside the engine (a request a backend finished
    /// later, e.g. after a batched journal commit), delivered by the next [`IoEngine::reap`]
    /// like any other. Counts as in flight until reaped.
    fn inject(&mut self, user_data: u64, result: i32);

    /// Hands queued operations to the kernel in one call.
    fn submit(&mut self) -> Result<(), EngineError>;

    /// Moves up to `out.len()` finished operations into `out`; returns how many.
    fn reap(&mut self, out: &mut [Completion]) -> usize;

    /// Operations pushed and not yet reaped.
    fn in_flight(&self) -> usize;

    /// The most operations that may be in flight at once.
    fn capacity(&self) -> usize;

    /// True when [`IoEngine::reap`] would return something now.
    fn has_completions(&mut self) -> bool;

    /// A file descriptor that becomes readable when completions arrive (for sleeping reactors);
    /// `None` if completions are always immediately available.
    fn notify_fd(&self) -> Option<RawFd>;

    /// Clears the readiness of [`IoEngine::notify_fd`] before the reactor sleeps.
    fn drain_notify(&mut self);

    /// A short name for logs and stats.
    fn name(&self) -> &'static str;
}

/// Which engine a reactor builds for itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring (default).
    Uring,
    /// Synchronous system calls.
    Sync,
    /// Synchronous, failing operations per plan with the errno (tests).
    Fault(fault::FaultPlan, i32),
}

impl EngineKind {
    /// Builds the engine; io_uring falls back to sync when the kernel refuses it.
    pub fn build(self) -> Box<dyn IoEngine> {
        match self {
            EngineKind::Uring => match uring::UringEngine::new() {
                Ok(e) => Box::new(e),
                Err(err) => {
                    tracing::warn!(%err, "io_uring unavailable, using the synchronous engine");
                    Box::new(sync::SyncEngine::new())
                }
            },
            EngineKind::Sync => Box::new(sync::SyncEngine::new()),
            EngineKind::Fault(plan, errno) => Box::new(fault::FaultEngine::new(plan, errno)),
        }
    }
}
