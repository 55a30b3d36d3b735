//! The one queue model of a reactor: everything it serves is a [`Poller`].
//!
//! virtio-blk queues ([`crate::blk_queue`]), virtio-fs queues ([`crate::vhost_fs`]) and packet
//! queues (the `net` crate's queue poller) all implement this trait; the reactor ([`crate::reactor`])
//! keeps one list of them and knows nothing of what they serve. A poller's life on a reactor,
//! and what each hook is for:
//!
//! - [`Poller::attach`] once when the reactor takes it;
//! - every loop iteration: [`Poller::poll_io`] (one bounded burst; it may push operations to
//!   the reactor's engine through [`PollCx`]), then [`Poller::end_batch`] for those that took
//!   work, then — after the reactor submitted and reaped — [`Poller::complete`] with the
//!   completions whose user_data it made with [`PollCx::user_data`], and [`Poller::flush`]
//!   (publish, notify, report whether anything is still in flight);
//! - around a sleep: [`Poller::prepare_sleep`] and [`Poller::end_sleep`];
//! - [`Poller::stop`] when it is being removed: its polls take no new work (they go on, to
//!   finish what is in flight), and it leaves the reactor once [`Poller::flush`] reports
//!   nothing in flight.
//!
//! Each hook is one dynamic call per poller per loop iteration, never one per request: the
//! reactor hands a poller all its completions of one reap in one slice.

use std::os::fd::RawFd;

use crate::engine::{Completion, IoEngine};
use crate::offload::OffloadSink;

/// Bits of an engine operation's user_data that belong to the poller (its own tag, e.g. a
/// request slot); the bits above carry the poller's index on its reactor, by which the
/// reactor routes completions.
pub const TAG_BITS: u32 = 16;

/// The poller index encoded in a user_data made by [`PollCx::user_data`].
pub fn poller_of(user_data: u64) -> usize {
    (user_data >> TAG_BITS) as usize
}

/// The poller's own tag in a user_data made by [`PollCx::user_data`].
pub fn tag_of(user_data: u64) -> u16 {
    (user_data & ((1 << TAG_BITS) - 1)) as u16
}

/// Per-iteration state the reactor shares with its pollers through [`PollCx`].
#[derive(Debug, Default)]
pub struct Round {
    /// Batch keys already ended in this iteration (see [`PollCx::first_in_batch`]). Cleared,
    /// not freed, each iteration: it grows to the most distinct batches seen in one iteration.
    batches: Vec<usize>,
    /// Requests started in this iteration (the reactor adds them to its stats once).
    requests: u64,
}

impl Round {
    /// Room for `batches` distinct batch keys per iteration before the list grows.
    pub fn with_capacity(batches: usize) -> Self {
        Round {
            batches: Vec::with_capacity(batches),
            requests: 0,
        }
    }

    /// Starts a new iteration.
    pub fn clear(&mut self) {
        self.batches.clear();
        self.requests = 0;
    }

    /// Requests the pollers started since [`Round::clear`].
    pub fn requests(&self) -> u64 {
        self.requests
    }
}

/// What a poller may use of its reactor during one hook call.
#[derive(Debug)]
pub struct PollCx<'a> {
    /// The reactor's I/O engine. Operations pushed here are submitted once per iteration,
    /// after every poller polled; their completions come back through [`Poller::complete`] if
    /// their user_data was made by [`PollCx::user_data`].
    pub engine: &'a mut dyn IoEngine,
    index: usize,
    round: &'a mut Round,
    offload: &'a OffloadSink,
}

impl<'a> PollCx<'a> {
    /// A context for the poller at `index` of a reactor's table.
    pub fn new(
        engine: &'a mut dyn IoEngine,
        index: usize,
        round: &'a mut Round,
        offload: &'a OffloadSink,
    ) -> Self {
        PollCx {
            engine,
            index,
            round,
            offload,
        }
    }

    /// The reactor's mailbox for completions finished on other threads: a backend that
    /// offloads requests posts their completions here, the reactor injects them into its
    /// engine (so they reach [`Poller::complete`] like any other) and wakes for them.
    pub fn offload(&self) -> &'a OffloadSink {
        self.offload
    }

    /// The user_data for an engine operation carrying `tag`: its completion is routed back to
    /// this poller's [`Poller::complete`] with the same user_data.
    pub fn user_data(&self, tag: u16) -> u64 {
        ((self.index as u64) << TAG_BITS) | u64::from(tag)
    }

    /// True the first time `key` is seen in this iteration: pollers sharing one batch (several
    /// queues of one disk backend) end it once, after all of them have added to it.
    pub fn first_in_batch(&mut self, key: usize) -> bool {
        if self.round.batches.contains(&key) {
            return false;
        }
        self.round.batches.push(key);
        true
    }

    /// Counts `n` requests started (the reactor's `requests` and `pop_batches` counters).
    pub fn started(&mut self, n: usize) {
        self.round.requests += n as u64;
    }
}

/// Something a reactor serves: a virtqueue (virtio-blk, virtio-fs) or a packet queue.
///
/// Polled once per loop iteration; slept on through [`Poller::wake_fd`] (level-triggered
/// EPOLLIN). Pollers that finish each item within the poll call implement [`Poller::poll`]
/// only; pollers that start I/O on the reactor's engine implement [`Poller::poll_io`],
/// [`Poller::complete`] and [`Poller::flush`].
pub trait Poller: Send + std::fmt::Debug {
    /// Does at most one bounded burst of work that needs nothing from the reactor; returns
    /// the items handled (0: idle).
    fn poll(&mut self) -> usize {
        0
    }

    /// Does at most one bounded burst of work, possibly pushing operations to `cx.engine`;
    /// returns the items taken (0: idle). The reactor calls this one; by default it is
    /// [`Poller::poll`].
    fn poll_io(&mut self, _cx: &mut PollCx<'_>) -> usize {
        self.poll()
    }

    /// Called after every poller of the iteration polled, for each whose poll took work:
    /// the place to end a batch that several pollers add to (see [`PollCx::first_in_batch`]).
    fn end_batch(&mut self, _cx: &mut PollCx<'_>) {}

    /// Completions of operations this poller pushed (user_data from [`PollCx::user_data`]),
    /// all of one reap at once.
    fn complete(&mut self, _cx: &mut PollCx<'_>, _done: &[Completion]) {}

    /// End of a loop iteration that did work (polled items or reaped completions, on any
    /// poller), and of every iteration while a poller is being removed: publish what
    /// completed and notify. Returns true when nothing is in flight (a stopping poller is
    /// removed then).
    fn flush(&mut self) -> bool {
        true
    }

    /// The descriptor to sleep on (EPOLLIN when work waits); negative: poll-only.
    fn wake_fd(&self) -> RawFd;

    /// Called once when the reactor takes the poller, before its first poll.
    fn attach(&mut self, _cx: &mut PollCx<'_>) {}

    /// Called before the reactor sleeps: re-arm notifications and report whether work is
    /// already pending (then the reactor does not sleep).
    fn prepare_sleep(&mut self) -> bool {
        false
    }

    /// Called after the sleep (or the decision not to): the reactor is polling again.
    fn end_sleep(&mut self) {}

    /// Whether the reactor should spin (up to its spin limit) for this poller's next work
    /// before sleeping (asked once, when the reactor takes the poller). Worth it for block and packet queues (µs and sub-µs work items); not
    /// for virtio-fs queues, whose requests cost µs of system calls each.
    fn spin(&self) -> bool {
        true
    }

    /// Identity for removal: (device, queue index). Packet queues have none.
    fn key(&self) -> Option<(&str, u16)> {
        None
    }

    /// The poller is being removed: from now on its polls take no new work (they are still
    /// called, to finish what is in flight), and it leaves once [`Poller::flush`] reports
    /// nothing in flight. The default suits pollers that are removed in the same iteration
    /// (nothing in flight), where one more burst is harmless.
    fn stop(&mut self) {}

    /// The virtqueue a removed poller served (with its progress: next avail and used
    /// indices), handed back to the control thread.
    fn take_queue(&mut self) -> Option<virtio_queue::Queue> {
        None
    }
}
