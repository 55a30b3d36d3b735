//! Completions of work a backend handed to another thread (e.g. a datastore's metadata
//! thread), delivered back to the reactor that started it.
//!
//! Each reactor owns one [`OffloadSink`] and gives it to every backend of the queues it starts
//! ([`crate::backend::BlockBackend::attach`]). A backend that answers a request with
//! [`crate::backend::Started::Submitted`] without pushing engine operations may finish the
//! request on any thread and [`OffloadSink::post`] its completion; the reactor moves posted
//! completions into its engine once per loop iteration ([`OffloadSink::inject_into`]), where
//! they are reaped like any other, and a post wakes the reactor if it sleeps (the sink writes
//! the reactor's command eventfd, which is always in its epoll set). The request's slot, its
//! iovecs and the guest memory they point into stay reserved until that completion is reaped,
//! and a stopping queue waits for it, so the other thread may use them until it posts.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use vmm_sys_util::eventfd::EventFd;

use crate::engine::{Completion, IoEngine};

/// Completions the mailbox holds without growing: one reactor batch's worth of requests on a
/// few queues. More may wait (the list grows, once); their number is bounded by the request
/// slots of the reactor's queues, since each holds a slot until reaped.
const MAILBOX_CAPACITY: usize = 256;

#[derive(Debug)]
struct Mailbox {
    done: Mutex<Vec<Completion>>,
    /// Entries in `done`, readable without the lock (the reactor's per-iteration check).
    count: AtomicUsize,
    /// Requests handed to other threads and not yet posted back.
    outstanding: AtomicUsize,
    /// The reactor's wake eventfd (a second descriptor of it).
    wake: EventFd,
    owner: ThreadId,
}

/// A reactor's mailbox for completions of offloaded work (see the module comment). Cloning
/// shares it.
#[derive(Debug, Clone)]
pub struct OffloadSink(Arc<Mailbox>);

impl OffloadSink {
    /// A mailbox owned by the calling thread (the reactor), waking it through `wake`.
    pub fn new(wake: EventFd) -> Self {
        OffloadSink(Arc::new(Mailbox {
            done: Mutex::new(Vec::with_capacity(MAILBOX_CAPACITY)),
            count: AtomicUsize::new(0),
            outstanding: AtomicUsize::new(0),
            wake,
            owner: std::thread::current().id(),
        }))
    }

    /// The thread that drains this sink: backends key per-reactor state by it.
    pub fn owner(&self) -> ThreadId {
        self.0.owner
    }

    /// Records that `n` requests were handed to another thread, which will [`Self::post`]
    /// their completions (called by the backend on the reactor's thread).
    pub fn handed_over(&self, n: usize) {
        self.0.outstanding.fetch_add(n, Ordering::Relaxed);
    }

    /// True while requests handed over have not all been posted back: an idle reactor then
    /// yields its CPU instead of spinning, in case the thread doing that work shares it.
    pub fn outstanding(&self) -> bool {
        self.0.outstanding.load(Ordering::Relaxed) > 0
    }

    /// Hands completions (user_data given to `start`, bytes or -errno) to the owning reactor
    /// and wakes it. Callable from any thread.
    pub fn post(&self, completions: &[Completion]) {
        if completions.is_empty() {
            return;
        }
        // Saturating: a post without `handed_over` (allowed) must not wrap the count.
        let _ = self
            .0
            .outstanding
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(completions.len()))
            });
        {
            // A poisoned lock only means a panic elsewhere; the list itself stays consistent.
            let mut done = self.0.done.lock().unwrap_or_else(|e| e.into_inner());
            done.extend_from_slice(completions);
            self.0.count.fetch_add(completions.len(), Ordering::SeqCst);
        }
        // After the count: a reactor that saw no pending work before sleeping is woken by
        // this write. An eventfd write fails only when its counter would overflow, i.e. when
        // it is already readable.
        let _ = self.0.wake.write(1);
    }

    /// True when posted completions wait to be injected (checked before the reactor sleeps).
    pub fn pending(&self) -> bool {
        self.0.count.load(Ordering::SeqCst) > 0
    }

    /// Moves posted completions into `engine` ([`IoEngine::inject`]); returns how many. Called
    /// by the owning reactor once per loop iteration, before it reaps.
    pub fn inject_into(&self, engine: &mut dyn IoEngine) -> usize {
        if !self.pending() {
            return 0;
        }
        let mut done = self.0.done.lock().unwrap_or_else(|e| e.into_inner());
        let n = done.len();
        for c in done.drain(..) {
            engine.inject(c.user_data, c.result);
        }
        self.0.count.fetch_sub(n, Ordering::SeqCst);
        n
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;
    use crate::engine::EngineKind;

    #[test]
    fn posted_completions_wake_and_are_reaped() {
        let wake = EventFd::new(EFD_NONBLOCK).unwrap();
        let sink = OffloadSink::new(wake.try_clone().unwrap());
        assert_eq!(sink.owner(), std::thread::current().id());
        let mut engine = EngineKind::Sync.build();
        assert_eq!(sink.inject_into(&mut *engine), 0);
        let remote = sink.clone();
        sink.handed_over(2);
        assert!(sink.outstanding());
        std::thread::spawn(move || {
            remote.post(&[
                Completion {
                    user_data: 7,
                    result: 4096,
                },
                Completion {
                    user_data: 9,
                    result: -libc::EIO,
                },
            ])
        })
        .join()
        .unwrap();
        assert!(sink.pending());
        assert!(!sink.outstanding());
        assert_eq!(wake.read().unwrap(), 1, "the post woke the owner");
        assert_eq!(sink.inject_into(&mut *engine), 2);
        assert!(!sink.pending());
        let mut out = [Completion::default(); 4];
        assert_eq!(engine.reap(&mut out), 2);
        assert_eq!(out[0].user_data, 7);
        assert_eq!(out[1].result, -libc::EIO);
    }
}
