//! Counters shared between the reactors (writers) and the control plane (readers).
//!
//! Each counter has one writer thread, so updates are relaxed loads and stores, not atomic
//! read-modify-writes: cheap on the per-I/O path.

use std::sync::atomic::{AtomicU64, Ordering};

/// Adds `n` to a single-writer counter.
#[inline]
pub fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// Per-virtqueue counters.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Requests completed (any status).
    pub requests: AtomicU64,
    /// Bytes read by the guest.
    pub read_bytes: AtomicU64,
    /// Bytes written by the guest.
    pub write_bytes: AtomicU64,
    /// Requests refused by validation (bad chains, addresses, ranges): VIRTIO_BLK_S_IOERR.
    pub invalid_requests: AtomicU64,
    /// Requests of unknown or unsupported types: VIRTIO_BLK_S_UNSUPP.
    pub unsupported_requests: AtomicU64,
    /// Requests the backend failed: VIRTIO_BLK_S_IOERR.
    pub io_errors: AtomicU64,
    /// Guest notifications sent (call eventfd writes).
    pub notifications: AtomicU64,
}

/// A plain copy of [`QueueStats`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueStatsSnapshot {
    /// See [`QueueStats::requests`].
    pub requests: u64,
    /// See [`QueueStats::read_bytes`].
    pub read_bytes: u64,
    /// See [`QueueStats::write_bytes`].
    pub write_bytes: u64,
    /// See [`QueueStats::invalid_requests`].
    pub invalid_requests: u64,
    /// See [`QueueStats::unsupported_requests`].
    pub unsupported_requests: u64,
    /// See [`QueueStats::io_errors`].
    pub io_errors: u64,
    /// See [`QueueStats::notifications`].
    pub notifications: u64,
}

impl QueueStats {
    /// Reads all counters.
    pub fn snapshot(&self) -> QueueStatsSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        QueueStatsSnapshot {
            requests: l(&self.requests),
            read_bytes: l(&self.read_bytes),
            write_bytes: l(&self.write_bytes),
            invalid_requests: l(&self.invalid_requests),
            unsupported_requests: l(&self.unsupported_requests),
            io_errors: l(&self.io_errors),
            notifications: l(&self.notifications),
        }
    }
}

/// Per-reactor counters.
#[derive(Debug, Default)]
pub struct ReactorStats {
    /// Time in loop iterations that found work.
    pub busy_ns: AtomicU64,
    /// The same time in time-stamp-counter cycles (x86 `rdtsc`; 0 elsewhere): busy cycles /
    /// requests = cycles per I/O, comparable across machines of one clock rate. On a reactor
    /// that also serves packet queues (`--port`) the busy time includes their frames, which
    /// `requests` does not count: cycles per I/O is then an upper bound.
    pub busy_cycles: AtomicU64,
    /// Time spinning without work (bounded by the spin limit before each sleep).
    pub spin_idle_ns: AtomicU64,
    /// Time asleep in epoll_wait.
    pub sleep_ns: AtomicU64,
    /// Times the reactor went to sleep.
    pub sleeps: AtomicU64,
    /// Requests started.
    pub requests: AtomicU64,
    /// Engine submissions (system calls for io_uring) that carried at least one operation.
    pub submits: AtomicU64,
    /// Operations carried by those submissions (ops / submits = batch size).
    pub submitted_ops: AtomicU64,
    /// Virtqueues currently served.
    pub queues: AtomicU64,
    /// Loop iterations that took at least one request from the rings
    /// (requests / pop_batches = descriptors drained per poll).
    pub pop_batches: AtomicU64,
    /// Engine reaps that returned at least one completion.
    pub reap_batches: AtomicU64,
    /// Completions returned by those reaps (reaped / reap_batches = completions per reap).
    pub reaped: AtomicU64,
}

/// A plain copy of [`ReactorStats`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReactorStatsSnapshot {
    /// See [`ReactorStats::busy_ns`].
    pub busy_ns: u64,
    /// See [`ReactorStats::busy_cycles`].
    pub busy_cycles: u64,
    /// See [`ReactorStats::spin_idle_ns`].
    pub spin_idle_ns: u64,
    /// See [`ReactorStats::sleep_ns`].
    pub sleep_ns: u64,
    /// See [`ReactorStats::sleeps`].
    pub sleeps: u64,
    /// See [`ReactorStats::requests`].
    pub requests: u64,
    /// See [`ReactorStats::submits`].
    pub submits: u64,
    /// See [`ReactorStats::submitted_ops`].
    pub submitted_ops: u64,
    /// See [`ReactorStats::queues`].
    pub queues: u64,
    /// See [`ReactorStats::pop_batches`].
    pub pop_batches: u64,
    /// See [`ReactorStats::reap_batches`].
    pub reap_batches: u64,
    /// See [`ReactorStats::reaped`].
    pub reaped: u64,
}

impl ReactorStatsSnapshot {
    /// Busy TSC cycles per request started (0 before any).
    pub fn cycles_per_io(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.busy_cycles as f64 / self.requests as f64
        }
    }
}

/// The time-stamp counter (cycles at the TSC's constant rate), or 0 where there is none.
#[inline]
pub fn tsc() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: rdtsc reads a register; it has no memory effects and exists on every x86_64.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        0
    }
}

impl ReactorStats {
    /// Reads all counters.
    pub fn snapshot(&self) -> ReactorStatsSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ReactorStatsSnapshot {
            busy_ns: l(&self.busy_ns),
            busy_cycles: l(&self.busy_cycles),
            spin_idle_ns: l(&self.spin_idle_ns),
            sleep_ns: l(&self.sleep_ns),
            sleeps: l(&self.sleeps),
            requests: l(&self.requests),
            submits: l(&self.submits),
            submitted_ops: l(&self.submitted_ops),
            queues: l(&self.queues),
            pop_batches: l(&self.pop_batches),
            reap_batches: l(&self.reap_batches),
            reaped: l(&self.reaped),
        }
    }
}
