//! Fault-injecting engine for tests: wraps the synchronous engine and fails chosen operations
//! with a given errno (every `every`-th op, or ops of one kind), so error paths are exercised
//! without a broken disk.

use std::os::fd::RawFd;

use super::sync::SyncEngine;
use super::{Completion, EngineError, IoEngine, IoOp};

/// Which operations fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPlan {
    /// Every n-th operation (1-based) fails.
    EveryNth(u64),
    /// Every write fails.
    Writes,
    /// Every flush fails.
    Flushes,
    /// Every socket operation (receive or send) fails: a connection lost mid-stream.
    Sockets,
}

/// An engine that fails operations according to a [`FaultPlan`] with `errno`; the others
/// run on a wrapped [`SyncEngine`].
#[derive(Debug)]
pub struct FaultEngine {
    plan: FaultPlan,
    errno: i32,
    count: u64,
    inner: SyncEngine,
    /// Operations failed so far.
    pub injected: u64,
}

impl FaultEngine {
    /// A new engine failing per `plan` with `errno` (positive, e.g. `libc::EIO`).
    pub fn new(plan: FaultPlan, errno: i32) -> Self {
        FaultEngine {
            plan,
            errno,
            count: 0,
            inner: SyncEngine::new(),
            injected: 0,
        }
    }

    fn should_fail(&mut self, op: &IoOp) -> bool {
        self.count += 1;
        match self.plan {
            FaultPlan::EveryNth(n) => n != 0 && self.count.is_multiple_of(n),
            FaultPlan::Writes => matches!(op, IoOp::Writev { .. }),
            FaultPlan::Flushes => matches!(op, IoOp::Fsync { .. }),
            FaultPlan::Sockets => matches!(op, IoOp::Recv { .. } | IoOp::Send { .. }),
        }
    }
}

impl IoEngine for FaultEngine {
    unsafe fn push(&mut self, op: IoOp, user_data: u64) -> Result<(), EngineError> {
        if self.inner.in_flight() >= self.inner.capacity() {
            return Err(EngineError::Full);
        }
        if self.should_fail(&op) {
            self.injected += 1;
            self.inner.inject(user_data, -self.errno);
            return Ok(());
        }
        // SAFETY: forwarded from the caller's contract.
        unsafe { self.inner.push(op, user_data) }
    }

    fn inject(&mut self, user_data: u64, result: i32) {
        self.inner.inject(user_data, result);
    }

    fn submit(&mut self) -> Result<(), EngineError> {
        self.inner.submit()
    }

    fn reap(&mut self, out: &mut [Completion]) -> usize {
        self.inner.reap(out)
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }

    fn capacity(&self) -> usize {
        self.inner.capacity()
    }

    fn has_completions(&mut self) -> bool {
        self.inner.has_completions()
    }

    fn notify_fd(&self) -> Option<RawFd> {
        None
    }

    fn drain_notify(&mut self) {}

    fn name(&self) -> &'static str {
        "fault"
    }
}
