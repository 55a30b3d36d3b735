//! Reactors: a fixed pool of polling threads that serve the queues of every disk, share and
//! port.
//!
//! SPDK's model, not one thread per queue: each started queue is handed to one reactor
//! (round-robin at device creation) as a [`Poller`] (a virtio-blk queue, a virtio-fs queue or
//! a packet queue — this file knows none of them), and a reactor polls all its pollers and its
//! own I/O engine in one loop: commands, one burst per poller, one engine submit, one reap
//! whose completions go back to the pollers that started them, end of iteration (used rings
//! published, guests notified). When nothing has happened for [`SPIN_IDLE_MAX`], the reactor
//! asks every poller to arm notifications, re-checks them and its engine (so a kick or
//! completion that raced with arming is not lost), and sleeps in epoll on their wake fds, its
//! engine's completion fd and its command eventfd.
//!
//! Pollers move between the control thread and a reactor by value ([`Command::AddPoller`]
//! and [`Command::RemovePoller`]): while a queue runs, only its reactor touches it, so the hot
//! path takes no lock. Removing a poller waits for its in-flight work before it is handed back.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;
use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::engine::{Completion, EngineKind, IoEngine};
use crate::offload::OffloadSink;
use crate::poller::{poller_of, PollCx, Round, TAG_BITS};
use crate::stats::{bump, tsc, ReactorStats};

pub use crate::poller::Poller;

/// How long a reactor keeps polling without finding work before it sleeps. 100 µs covers the
/// gap between a guest's completion handling and its next submission at moderate queue depths
/// (so busy disks never pay a wake-up), while an idle reactor burns at most this much per
/// wake-up (idle disks cost nothing).
pub const SPIN_IDLE_MAX: Duration = Duration::from_micros(100);
/// Idle time after which a spinning reactor yields its CPU while requests it handed to another
/// thread are outstanding (see `offload`): that thread may share the CPU. Longer than the gap
/// between a polling guest's completion and its next request (a few µs), so a busy disk keeps
/// the CPU; shorter than [`SPIN_IDLE_MAX`], so the wait for offloaded work does not burn it.
pub const OFFLOAD_YIELD_AFTER: Duration = Duration::from_micros(20);
/// Completions reaped per loop iteration (the size of the reactor's completion array).
pub const REAP_BATCH_MAX: usize = 128;
/// Pollers (queues) one reactor can serve; bounds the epoll set and the user_data encoding.
pub const QUEUES_PER_REACTOR_MAX: usize = 4096;
/// epoll events handled per wake-up.
const EPOLL_EVENTS_MAX: usize = 64;
/// epoll token of the command eventfd.
const TOKEN_WAKE: u64 = u64::MAX;
/// epoll token of the engine's completion fd.
const TOKEN_ENGINE: u64 = u64::MAX - 1;
/// Batch keys of one iteration's end-of-batch dedup before its list grows (see `Round`): one
/// per distinct backend with work in the iteration, so a handful.
const BATCHES_PER_ROUND: usize = 16;

const _: () = assert!(QUEUES_PER_REACTOR_MAX <= 1 << (64 - TAG_BITS));

/// Errors of the reactor layer.
#[derive(Debug, Error)]
pub enum ReactorError {
    /// Creating the thread's epoll set or eventfd failed.
    #[error("reactor setup: {0}")]
    Setup(#[from] std::io::Error),
    /// The reactor thread is gone.
    #[error("reactor {0} is not running")]
    Gone(usize),
    /// A removed poller served no virtqueue.
    #[error("{0} queue {1}: the poller serves no virtqueue")]
    NoQueue(Arc<str>, u16),
}

/// Messages from the control thread.
#[derive(Debug)]
pub enum Command {
    /// Drain everything and exit the thread.
    Shutdown,
    /// Serve a poller (a virtio-blk, virtio-fs or packet queue) from the next iteration on.
    AddPoller(Box<dyn Poller>),
    /// Stop the poller whose [`Poller::key`] is (device, index): it takes no new work; once
    /// its in-flight work has completed it is removed and sent back.
    RemovePoller {
        /// Device name.
        device: Arc<str>,
        /// Queue index.
        index: u16,
        /// Where the removed poller goes.
        reply: SyncSender<Box<dyn Poller>>,
    },
}

/// A cloneable way to send commands to one reactor.
#[derive(Debug, Clone)]
pub struct ReactorLink {
    id: usize,
    tx: Sender<Command>,
    wake: Arc<EventFd>,
}

impl ReactorLink {
    /// Reactor index.
    pub fn id(&self) -> usize {
        self.id
    }

    /// Sends a command and wakes the reactor.
    pub fn send(&self, cmd: Command) -> Result<(), ReactorError> {
        self.tx.send(cmd).map_err(|_| ReactorError::Gone(self.id))?;
        self.wake.write(1).map_err(ReactorError::Setup)?;
        Ok(())
    }

    /// Removes `device`'s poller for queue `index` once its in-flight work has completed, and
    /// returns it.
    pub fn remove_poller(
        &self,
        device: Arc<str>,
        index: u16,
    ) -> Result<Box<dyn Poller>, ReactorError> {
        let (reply, rx) = mpsc::sync_channel(1);
        self.send(Command::RemovePoller {
            device,
            index,
            reply,
        })?;
        rx.recv().map_err(|_| ReactorError::Gone(self.id))
    }

    /// Stops `device`'s virtqueue `index`, waits until its in-flight requests have completed,
    /// and returns the ring with its progress (next avail and used indices).
    pub fn stop_queue(&self, device: Arc<str>, index: u16) -> Result<Queue, ReactorError> {
        let mut p = self.remove_poller(device.clone(), index)?;
        p.take_queue().ok_or(ReactorError::NoQueue(device, index))
    }
}

/// The owner's handle on one reactor thread.
#[derive(Debug)]
pub struct ReactorHandle {
    link: ReactorLink,
    /// The reactor's counters.
    pub stats: Arc<ReactorStats>,
    /// The CPU it is pinned to, if any.
    pub cpu: Option<usize>,
    thread: Option<JoinHandle<()>>,
}

impl ReactorHandle {
    /// Spawns reactor `id`, pinned to `cpu` if given, with an engine of `engine` kind.
    pub fn spawn(
        id: usize,
        cpu: Option<usize>,
        engine: EngineKind,
    ) -> Result<ReactorHandle, ReactorError> {
        let (tx, rx) = mpsc::channel();
        let wake = EventFd::new(EFD_NONBLOCK)?;
        let wake_r = wake.try_clone()?;
        let stats = Arc::new(ReactorStats::default());
        let stats_r = stats.clone();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), std::io::Error>>(1);
        let thread = std::thread::Builder::new()
            .name(format!("reactor{id}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    pin_to_cpu(cpu);
                }
                match Reactor::new(id, rx, wake_r, stats_r, engine) {
                    Ok(mut r) => {
                        let _ = ready_tx.send(Ok(()));
                        r.run();
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(ReactorError::Setup(e)),
            Err(_) => return Err(ReactorError::Gone(id)),
        }
        Ok(ReactorHandle {
            link: ReactorLink {
                id,
                tx,
                wake: Arc::new(wake),
            },
            stats,
            cpu,
            thread: Some(thread),
        })
    }

    /// A sender for this reactor's commands.
    pub fn link(&self) -> ReactorLink {
        self.link.clone()
    }

    /// Asks the reactor to drain its queues and exit, and joins it.
    pub fn shutdown(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.link.send(Command::Shutdown);
            let _ = t.join();
        }
    }
}

impl Drop for ReactorHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes within it (cpu is checked against its
    // capacity), and sched_setaffinity(0) affects only the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= libc::CPU_SETSIZE as usize {
            tracing::warn!(cpu, "cpu index out of range, not pinning");
            return;
        }
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::warn!(cpu, err = %std::io::Error::last_os_error(), "cannot pin reactor");
        }
    }
}

/// One poller on the reactor.
struct Entry {
    poller: Box<dyn Poller>,
    /// Whether the poller is being removed, and where it goes once drained.
    stopping: Stopping,
    /// Its poll took work in the current iteration (its batch needs ending).
    took: bool,
    /// [`Poller::spin`], asked once when the poller is added.
    spins: bool,
}

/// The removal state of a poller.
enum Stopping {
    /// Serving.
    No,
    /// Removed once drained, and sent back (RemovePoller).
    Reply(SyncSender<Box<dyn Poller>>),
    /// Removed once drained, and dropped (Shutdown).
    Discard,
}

struct Reactor {
    id: usize,
    rx: Receiver<Command>,
    wake: EventFd,
    epoll: Epoll,
    engine: Box<dyn IoEngine>,
    /// Stable indices: a poller's index is in the user_data of its operations.
    pollers: Vec<Option<Entry>>,
    stats: Arc<ReactorStats>,
    completions: Box<[Completion]>,
    round: Round,
    exiting: bool,
    /// Completions of requests backends finished on other threads (see `offload`); its posts
    /// wake this reactor through `wake`.
    offload: OffloadSink,
    /// Pollers that want the reactor to spin before sleeping ([`Poller::spin`]): kept as a
    /// count so an idle loop iteration does not ask every poller.
    spinners: usize,
    /// Pollers being removed: while there are none, an iteration without work skips the
    /// pollers' flush (nothing completed, nothing to publish or to remove).
    stopping: usize,
}

impl Reactor {
    fn new(
        id: usize,
        rx: Receiver<Command>,
        wake: EventFd,
        stats: Arc<ReactorStats>,
        engine: EngineKind,
    ) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_WAKE),
        )?;
        let engine = engine.build();
        if let Some(fd) = engine.notify_fd() {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, TOKEN_ENGINE),
            )?;
        }
        tracing::debug!(reactor = id, engine = engine.name(), "reactor started");
        let offload = OffloadSink::new(wake.try_clone()?);
        Ok(Reactor {
            id,
            rx,
            wake,
            epoll,
            engine,
            pollers: Vec::new(),
            stats,
            completions: vec![Completion::default(); REAP_BATCH_MAX].into_boxed_slice(),
            round: Round::with_capacity(BATCHES_PER_ROUND),
            exiting: false,
            offload,
            spinners: 0,
            stopping: 0,
        })
    }

    fn run(&mut self) {
        let mut last_work = Instant::now();
        // The event loop runs until a Shutdown command has drained every poller.
        loop {
            let t0 = Instant::now();
            let c0 = tsc();
            self.handle_commands();
            if self.exiting && self.pollers.iter().all(Option::is_none) {
                break;
            }
            let mut work = self.poll();
            self.submit();
            // Offloaded requests finished elsewhere: reaped below like engine completions.
            self.offload.inject_into(&mut *self.engine);
            work += self.reap();
            if work > 0 || self.stopping > 0 {
                self.flush();
            }
            let t1 = Instant::now();
            let spent = u64::try_from((t1 - t0).as_nanos()).unwrap_or(u64::MAX);
            if work > 0 {
                bump(&self.stats.busy_ns, spent);
                bump(&self.stats.busy_cycles, tsc().wrapping_sub(c0));
                last_work = t1;
                continue;
            }
            bump(&self.stats.spin_idle_ns, spent);
            // Idle for a while with requests finishing on another thread (offload): let that
            // thread have this CPU should it share it, rather than spin against it.
            if self.offload.outstanding() && t1 - last_work >= OFFLOAD_YIELD_AFTER {
                std::thread::yield_now();
            }
            // Spin only for what gains from it (see Poller::spin).
            let spin_for = if self.spinners > 0 {
                SPIN_IDLE_MAX
            } else {
                Duration::ZERO
            };
            if t1 - last_work >= spin_for {
                self.sleep();
                last_work = Instant::now();
            }
        }
        tracing::debug!(reactor = self.id, "reactor exiting");
    }

    fn handle_commands(&mut self) {
        loop {
            match self.rx.try_recv() {
                Ok(Command::Shutdown) => {
                    self.exiting = true;
                    for e in self.pollers.iter_mut().flatten() {
                        if matches!(e.stopping, Stopping::No) {
                            // Nobody waits for it: drained, then dropped.
                            e.poller.stop();
                            e.stopping = Stopping::Discard;
                            self.stopping += 1;
                        }
                    }
                }
                Ok(Command::AddPoller(p)) => self.add(p),
                Ok(Command::RemovePoller {
                    device,
                    index,
                    reply,
                }) => {
                    let found = self.pollers.iter_mut().flatten().find(|e| {
                        matches!(e.stopping, Stopping::No)
                            && e.poller.key() == Some((&*device, index))
                    });
                    match found {
                        Some(e) => {
                            e.poller.stop();
                            e.stopping = Stopping::Reply(reply);
                            self.stopping += 1;
                        }
                        None => tracing::error!(%device, index, "remove for a poller not here"),
                    }
                }
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => break,
            }
        }
    }

    fn add(&mut self, mut poller: Box<dyn Poller>) {
        let index = match self.pollers.iter().position(Option::is_none) {
            Some(i) => i,
            None if self.pollers.len() < QUEUES_PER_REACTOR_MAX => {
                self.pollers.push(None);
                self.pollers.len() - 1
            }
            None => {
                tracing::error!(poller = ?poller, "reactor poller table full");
                return;
            }
        };
        poller.attach(&mut PollCx::new(
            &mut *self.engine,
            index,
            &mut self.round,
            &self.offload,
        ));
        // Level-triggered EPOLLIN: work waiting when the reactor goes to sleep wakes it at
        // once.
        let fd = poller.wake_fd();
        if fd >= 0 {
            let ev = EpollEvent::new(EventSet::IN, index as u64);
            if let Err(e) = self.epoll.ctl(ControlOperation::Add, fd, ev) {
                tracing::error!(%e, poller = ?poller, "cannot watch a poller's fd; polling it only");
            }
        }
        if let Some((device, queue)) = poller.key() {
            tracing::debug!(reactor = self.id, %device, queue, "queue started");
            bump(&self.stats.queues, 1);
        }
        // Added after Shutdown: drained and dropped like the others, so the thread can exit.
        if self.exiting {
            poller.stop();
            self.stopping += 1;
        }
        let spins = poller.spin();
        if spins {
            self.spinners += 1;
        }
        self.pollers[index] = Some(Entry {
            poller,
            stopping: if self.exiting {
                Stopping::Discard
            } else {
                Stopping::No
            },
            took: false,
            spins,
        });
    }

    /// One burst from every poller, then the end of their batches. Returns the items taken.
    fn poll(&mut self) -> usize {
        let Reactor {
            pollers,
            engine,
            round,
            stats,
            offload,
            ..
        } = self;
        round.clear();
        let mut work = 0;
        for (index, e) in pollers.iter_mut().enumerate() {
            let Some(e) = e.as_mut() else { continue };
            // Stopping pollers are polled too: they take no new work, but may have in-flight
            // work of their own to finish (see Poller::stop).
            let n = e
                .poller
                .poll_io(&mut PollCx::new(&mut **engine, index, round, offload));
            e.took = n > 0;
            work += n;
        }
        if work == 0 {
            return 0;
        }
        for (index, e) in pollers.iter_mut().enumerate() {
            let Some(e) = e.as_mut().filter(|e| e.took) else {
                continue;
            };
            e.poller
                .end_batch(&mut PollCx::new(&mut **engine, index, round, offload));
        }
        let requests = round.requests();
        if requests > 0 {
            bump(&stats.pop_batches, 1);
            bump(&stats.requests, requests);
        }
        work
    }

    fn submit(&mut self) {
        let ops = self.engine.in_flight();
        if let Err(e) = self.engine.submit() {
            tracing::error!(reactor = self.id, err = %e, "engine submit failed");
        } else if ops > 0 {
            bump(&self.stats.submits, 1);
            bump(&self.stats.submitted_ops, ops as u64);
        }
    }

    /// Reaps engine completions and hands them to the pollers that started them: grouped by
    /// poller, one call per poller. Returns the number reaped.
    fn reap(&mut self) -> usize {
        let Reactor {
            pollers,
            engine,
            round,
            completions,
            stats,
            offload,
            ..
        } = self;
        let n = engine.reap(completions);
        if n == 0 {
            return 0;
        }
        bump(&stats.reap_batches, 1);
        bump(&stats.reaped, n as u64);
        let done = &mut completions[..n];
        // In place, no allocation; completion order within a queue is free (virtio lets a
        // device complete requests in any order).
        done.sort_unstable_by_key(|c| poller_of(c.user_data));
        for run in done.chunk_by(|a, b| poller_of(a.user_data) == poller_of(b.user_data)) {
            let index = poller_of(run[0].user_data);
            match pollers.get_mut(index).and_then(Option::as_mut) {
                Some(e) => e
                    .poller
                    .complete(&mut PollCx::new(&mut **engine, index, round, offload), run),
                None => tracing::error!(
                    user_data = run[0].user_data,
                    count = run.len(),
                    "completions for an unknown poller"
                ),
            }
        }
        n
    }

    /// Ends the iteration for every poller, and removes the stopping ones that are drained.
    fn flush(&mut self) {
        for slot in self.pollers.iter_mut() {
            let Some(e) = slot.as_mut() else { continue };
            let idle = e.poller.flush();
            if !idle || matches!(e.stopping, Stopping::No) {
                continue;
            }
            let Some(Entry {
                poller,
                stopping,
                spins,
                ..
            }) = slot.take()
            else {
                continue;
            };
            self.stopping -= 1;
            if spins {
                self.spinners -= 1;
            }
            let fd = poller.wake_fd();
            if fd >= 0 {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
            if let Some((device, queue)) = poller.key() {
                bump(&self.stats.queues, u64::MAX); // wrapping -1
                tracing::debug!(reactor = self.id, %device, queue, "queue stopped");
            }
            if let Stopping::Reply(reply) = stopping {
                let _ = reply.send(poller);
            }
        }
    }

    /// Arms notifications, re-checks for work, and sleeps in epoll if there is none.
    fn sleep(&mut self) {
        let mut pending = self.engine.in_flight() > 0 && self.engine.notify_fd().is_none();
        self.engine.drain_notify();
        if self.engine.has_completions() || self.offload.pending() {
            pending = true;
        }
        for e in self.pollers.iter_mut().flatten() {
            // A poll-only poller (no fd, e.g. a DPDK queue) keeps the reactor spinning.
            if e.poller.prepare_sleep() || e.poller.wake_fd() < 0 {
                pending = true;
            }
        }
        if !pending && !self.exiting {
            let mut events = [EpollEvent::default(); EPOLL_EVENTS_MAX];
            let t0 = Instant::now();
            bump(&self.stats.sleeps, 1);
            let _ = self.epoll.wait(-1, &mut events);
            let spent = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
            bump(&self.stats.sleep_ns, spent);
            let _ = self.wake.read();
        }
        for e in self.pollers.iter_mut().flatten() {
            e.poller.end_sleep();
        }
    }
}

/// Reports how many virtqueues each reactor serves (for stats and tests).
pub fn queues_served(handles: &[ReactorHandle]) -> Vec<u64> {
    handles
        .iter()
        .map(|h| h.stats.queues.load(Ordering::Relaxed))
        .collect()
}
