//! Synchronous engine: each op runs at push time; completions wait in a bounded ring.
//! Socket operations never wait: they complete with `-EAGAIN` when the socket is not ready.

use std::collections::VecDeque;
use std::os::fd::RawFd;

use super::{Completion, EngineError, IoEngine, IoOp};

/// Completions held between push and reap; equal to the io_uring engine's capacity so the
/// reactor's batching behaves the same with either engine.
pub const SYNC_CAPACITY: usize = super::uring::URING_ENTRIES as usize;

/// Executes operations with preadv/pwritev/fdatasync/fallocate/recv/sendmsg on the calling
/// thread.
#[derive(Debug)]
pub struct SyncEngine {
    done: VecDeque<Completion>,
}

impl Default for SyncEngine {
    fn default() -> Self {
        Self::new()
    }
}

impl SyncEngine {
    /// A new engine with its completion ring preallocated.
    pub fn new() -> Self {
        SyncEngine {
            done: VecDeque::with_capacity(SYNC_CAPACITY),
        }
    }
}

fn ret_to_result(ret: isize) -> i32 {
    if ret < 0 {
        -std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    } else {
        i32::try_from(ret).unwrap_or(i32::MAX)
    }
}

/// Runs one op synchronously on the calling thread; returns bytes or -errno.
///
/// # Safety
/// As for [`IoEngine::push`]: the iovec and buffers must be valid for the call.
pub(crate) unsafe fn execute(op: IoOp) -> i32 {
    match op {
        IoOp::Readv {
            fd,
            iov,
            iov_count,
            offset,
        } => {
            let Ok(off) = libc::off_t::try_from(offset) else {
                return -libc::EINVAL;
            };
            // SAFETY: the caller guarantees iov points to iov_count valid iovecs whose buffers
            // are writable for the duration of the call.
            ret_to_result(unsafe { libc::preadv(fd, iov, iov_count as i32, off) })
        }
        IoOp::Writev {
            fd,
            iov,
            iov_count,
            offset,
        } => {
            let Ok(off) = libc::off_t::try_from(offset) else {
                return -libc::EINVAL;
            };
            // SAFETY: as above, buffers readable for the duration of the call.
            ret_to_result(unsafe { libc::pwritev(fd, iov, iov_count as i32, off) })
        }
        IoOp::Fsync { fd } => {
            // SAFETY: fdatasync on a caller-owned descriptor has no memory effects.
            ret_to_result(unsafe { libc::fdatasync(fd) } as isize)
        }
        IoOp::Fallocate {
            fd,
            mode,
            offset,
            len,
        } => {
            let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
            else {
                return -libc::EINVAL;
            };
            // SAFETY: fallocate on a caller-owned descriptor has no memory effects.
            ret_to_result(unsafe { libc::fallocate(fd, mode, off, l) } as isize)
        }
        IoOp::Recv { fd, buf, len } => {
            // SAFETY: the caller guarantees buf is `len` writable bytes for the call; with
            // MSG_DONTWAIT the call never blocks the reactor (no data: -EAGAIN).
            ret_to_result(unsafe { libc::recv(fd, buf.cast(), len as usize, libc::MSG_DONTWAIT) })
        }
        IoOp::Send { fd, msg } => {
            // SAFETY: the caller guarantees msg and the iovecs and buffers it names are valid
            // for the call; MSG_NOSIGNAL turns a closed peer into -EPIPE, MSG_DONTWAIT a full
            // socket buffer into -EAGAIN.
            ret_to_result(unsafe {
                libc::sendmsg(fd, msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
            })
        }
    }
}

impl IoEngine for SyncEngine {
    unsafe fn push(&mut self, op: IoOp, user_data: u64) -> Result<(), EngineError> {
        if self.done.len() >= SYNC_CAPACITY {
            return Err(EngineError::Full);
        }
        // SAFETY: forwarded from the caller's contract.
        let result = unsafe { execute(op) };
        self.done.push_back(Completion { user_data, result });
        Ok(())
    }

    fn inject(&mut self, user_data: u64, result: i32) {
        self.done.push_back(Completion { user_data, result });
    }

    fn submit(&mut self) -> Result<(), EngineError> {
        Ok(())
    }

    fn reap(&mut self, out: &mut [Completion]) -> usize {
        let mut n = 0;
        while n < out.len() {
            match self.done.pop_front() {
                Some(c) => {
                    out[n] = c;
                    n += 1;
                }
                None => break,
            }
        }
        n
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    fn capacity(&self) -> usize {
        SYNC_CAPACITY
    }

    fn has_completions(&mut self) -> bool {
        !self.done.is_empty()
    }

    fn notify_fd(&self) -> Option<RawFd> {
        None
    }

    fn drain_notify(&mut self) {}

    fn name(&self) -> &'static str {
        "sync"
    }
}
