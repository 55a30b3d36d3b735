//! io_uring engine (the `io-uring` crate): ops are queued as SQEs, submitted in one
//! `io_uring_enter` per reactor iteration, and completions signalled through a registered
//! eventfd so a sleeping reactor wakes up.

use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Completion, EngineError, IoEngine, IoOp};

/// Submission queue entries per reactor. 256 covers queue depth 32 on 8 queues (or 128 on two)
/// without the reactor ever waiting for ring space; the completion queue is twice that (kernel
/// default), and in-flight operations are capped at this number so it can never overflow.
/// Socket connections count against it too: each keeps one receive (and at most one send) in
/// flight for as long as it lives, so the SAN transport bounds connections per reactor
/// (`san::transport::CONNECTIONS_PER_REACTOR_MAX`) well below this.
pub const URING_ENTRIES: u32 = 256;

/// io_uring-backed engine.
pub struct UringEngine {
    ring: IoUring,
    notify: EventFd,
    in_flight: usize,
    queued: usize,
    /// Completions injected by backends, delivered before the ring's own.
    injected: std::collections::VecDeque<Completion>,
}

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringEngine")
            .field("in_flight", &self.in_flight)
            .field("queued", &self.queued)
            .finish()
    }
}

impl UringEngine {
    /// Sets up a ring and registers its completion eventfd.
    pub fn new() -> Result<Self, EngineError> {
        let ring = IoUring::builder().build(URING_ENTRIES)?;
        let notify = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(notify.as_raw_fd())?;
        Ok(UringEngine {
            ring,
            notify,
            in_flight: 0,
            queued: 0,
            injected: std::collections::VecDeque::with_capacity(URING_ENTRIES as usize),
        })
    }

    fn entry(op: IoOp, user_data: u64) -> squeue::Entry {
        match op {
            IoOp::Readv {
                fd,
                iov,
                iov_count,
                offset,
            } => opcode::Readv::new(types::Fd(fd), iov, iov_count)
                .offset(offset)
                .build(),
            IoOp::Writev {
                fd,
                iov,
                iov_count,
                offset,
            } => opcode::Writev::new(types::Fd(fd), iov, iov_count)
                .offset(offset)
                .build(),
            IoOp::Fsync { fd } => opcode::Fsync::new(types::Fd(fd))
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            IoOp::Fallocate {
                fd,
                mode,
                offset,
                len,
            } => opcode::Fallocate::new(types::Fd(fd), len)
                .offset(offset)
                .mode(mode)
                .build(),
            IoOp::Recv { fd, buf, len } => opcode::Recv::new(types::Fd(fd), buf, len).build(),
            IoOp::Send { fd, msg } => opcode::SendMsg::new(types::Fd(fd), msg)
                .flags(libc::MSG_NOSIGNAL as u32)
                .build(),
        }
        .user_data(user_data)
    }
}

impl IoEngine for UringEngine {
    unsafe fn push(&mut self, op: IoOp, user_data: u64) -> Result<(), EngineError> {
        if self.in_flight >= URING_ENTRIES as usize {
            return Err(EngineError::Full);
        }
        let entry = Self::entry(op, user_data);
        // SAFETY: the caller guarantees the buffers and iovec outlive the operation; the SQE
        // holds only those pointers and plain values.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            // The SQ is full of queued entries: hand them to the kernel and retry once.
            self.submit()?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(&entry) }.map_err(|_| EngineError::Full)?;
        }
        self.in_flight += 1;
        self.queued += 1;
        Ok(())
    }

    fn inject(&mut self, user_data: u64, result: i32) {
        self.injected.push_back(Completion { user_data, result });
        self.in_flight += 1;
    }

    fn submit(&mut self) -> Result<(), EngineError> {
        if self.queued == 0 {
            return Ok(());
        }
        loop {
            match self.ring.submit() {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // Completion queue backlog: the caller reaps and calls again.
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.queued = 0;
        Ok(())
    }

    fn reap(&mut self, out: &mut [Completion]) -> usize {
        let mut n = 0;
        while n < out.len() {
            let Some(c) = self.injected.pop_front() else {
                break;
            };
            out[n] = c;
            n += 1;
        }
        let mut cq = self.ring.completion();
        while n < out.len() {
            match cq.next() {
                Some(cqe) => {
                    out[n] = Completion {
                        user_data: cqe.user_data(),
                        result: cqe.result(),
                    };
                    n += 1;
                }
                None => break,
            }
        }
        drop(cq);
        self.in_flight -= n;
        n
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn capacity(&self) -> usize {
        URING_ENTRIES as usize
    }

    fn has_completions(&mut self) -> bool {
        !self.injected.is_empty() || !self.ring.completion().is_empty()
    }

    fn notify_fd(&self) -> Option<RawFd> {
        Some(self.notify.as_raw_fd())
    }

    fn drain_notify(&mut self) {
        // EAGAIN when nothing was signalled is expected.
        let _ = self.notify.read();
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }
}
