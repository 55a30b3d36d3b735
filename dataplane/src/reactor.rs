//! Reactors: a fixed pool of polling threads that serve the virtqueues of every disk.
//!
//! SPDK's model, not one thread per queue: each started virtqueue is handed to one reactor
//! (round-robin at device creation), and a reactor polls all its queues and its own I/O engine
//! in one loop. When nothing has happened for [`SPIN_IDLE_MAX`], the reactor arms guest
//! notifications, re-checks every ring and its engine (so a kick or completion that raced with
//! arming is not lost), and sleeps in epoll on its queues' kick eventfds, its engine's
//! completion fd and its command eventfd.
//!
//! Queues move between the control thread and a reactor by value ([`Command::Start`] and
//! [`Command::Stop`]): while a queue runs, only its reactor touches it, so the hot path takes
//! no lock. Stopping drains the queue's in-flight requests before the queue is handed back.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::{BlockBackend, Started, OPS_PER_REQUEST_MAX};
use crate::blk::request::{
    chain_scratch, parse_request_with, ChainScratch, ParsedRequest, RequestError, RequestKind,
};
use crate::blk::{DiskGeometry, ID_BYTES};
use crate::engine::{Completion, EngineKind, IoEngine};
use crate::guest_ram::GuestRam;
use crate::offload::OffloadSink;
use crate::split_ring::{avail_head, avail_ready, Chain};
use crate::stats::{bump, tsc, QueueStats, ReactorStats};
use crate::used_ring::UsedRing;

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
/// Descriptor chains taken from one queue per loop iteration, so one busy queue cannot starve
/// the others served by the same reactor.
pub const POP_BATCH_MAX: usize = 64;
/// Completions reaped per loop iteration (the size of the reactor's completion array).
pub const REAP_BATCH_MAX: usize = 128;
/// Requests in flight per virtqueue: the request slab's size. 256 slots cover queue depth 256
/// (libblkio's default queue size) and bound per-queue memory (each slot holds SEG_MAX iovecs).
pub const SLOTS_PER_QUEUE_MAX: usize = 256;
/// Virtqueues one reactor can serve; bounds the epoll set and the user_data encoding.
pub const QUEUES_PER_REACTOR_MAX: usize = 4096;
/// Rate limit for guest-error log lines: one per queue per interval.
pub const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(1);
/// epoll events handled per wake-up.
const EPOLL_EVENTS_MAX: usize = 64;
/// epoll token of the command eventfd.
const TOKEN_WAKE: u64 = u64::MAX;
/// epoll token of the engine's completion fd.
const TOKEN_ENGINE: u64 = u64::MAX - 1;
/// Epoll token of packet queues' wake fds (net::poller).
const TOKEN_PACKET: u64 = u64::MAX - 2;

/// Errors of the reactor layer.
#[derive(Debug, Error)]
pub enum ReactorError {
    /// Creating the thread's epoll set or eventfd failed.
    #[error("reactor setup: {0}")]
    Setup(#[from] std::io::Error),
    /// The reactor thread is gone.
    #[error("reactor {0} is not running")]
    Gone(usize),
}

/// Everything a reactor needs to run one virtqueue.
pub struct QueueRun {
    /// Device name for logs.
    pub device: Arc<str>,
    /// Queue index within the device.
    pub index: u16,
    /// The split virtqueue (addresses, size, indices).
    pub queue: Queue,
    /// Guest memory; replaced atomically by the control thread on SET_MEM_TABLE.
    pub mem: GuestMemoryAtomic<GuestMemoryMmap>,
    /// Kick eventfd (guest → device); set non-blocking.
    pub kick: EventFd,
    /// Call eventfd (device → guest); QEMU may replace it while the queue runs.
    pub call: Arc<Mutex<Option<EventFd>>>,
    /// Where the data lives.
    pub backend: Arc<dyn BlockBackend>,
    /// What the guest was told about the disk.
    pub geom: Arc<DiskGeometry>,
    /// Counters of this queue.
    pub stats: Arc<QueueStats>,
}

impl std::fmt::Debug for QueueRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueRun")
            .field("device", &self.device)
            .field("index", &self.index)
            .finish()
    }
}

/// Messages from the control thread.
#[derive(Debug)]
pub enum Command {
    /// Start serving a queue.
    Start(Box<QueueRun>),
    /// Stop a queue: finish its in-flight requests, then send it back.
    Stop {
        /// Device name.
        device: Arc<str>,
        /// Queue index.
        index: u16,
        /// Where the stopped queue goes.
        reply: SyncSender<Box<QueueRun>>,
    },
    /// Drain everything and exit the thread.
    Shutdown,
    /// Poll something in every iteration, next to the virtqueues (packet or virtio-fs queue).
    AddPoller(Box<dyn Poller>),
    /// Remove the poller whose [`Poller::key`] is (device, index) and send it back. Pollers
    /// finish each request within `poll`, so there is nothing in flight to wait for.
    RemovePoller {
        /// Device name.
        device: Arc<str>,
        /// Queue index.
        index: u16,
        /// Where the removed poller goes.
        reply: SyncSender<Box<dyn Poller>>,
    },
}

/// What a reactor polls besides virtio-blk queues: packet queues (net::poller) and virtio-fs
/// queues (vhost_fs). Polled once per loop iteration; slept on through [`Poller::wake_fd`]
/// (level-triggered EPOLLIN).
pub trait Poller: Send + std::fmt::Debug {
    /// Does at most one bounded burst of work; returns the items handled (0: idle).
    fn poll(&mut self) -> usize;
    /// The descriptor to sleep on (EPOLLIN when work waits); negative: poll-only.
    fn wake_fd(&self) -> RawFd;
    /// Called before the reactor sleeps: re-arm notifications and report whether work is
    /// already pending (then the reactor does not sleep).
    fn prepare_sleep(&mut self) -> bool {
        false
    }
    /// Whether the reactor should spin (up to SPIN_IDLE_MAX) for this poller's next work
    /// before sleeping. Worth it for packet queues (sub-µs work items); not for virtio-fs
    /// queues, whose requests cost µs of system calls each.
    fn spin(&self) -> bool {
        true
    }
    /// Identity for [`Command::RemovePoller`]: (device, queue index). Packet queues have none.
    fn key(&self) -> Option<(&str, u16)> {
        None
    }
    /// The virtqueue a removed poller served, handed back to the control thread.
    fn take_queue(&mut self) -> Option<virtio_queue::Queue> {
        None
    }
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

    /// Removes `device`'s poller for queue `index` and returns it.
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

    /// Stops `device`'s queue `index` and waits until its in-flight requests have completed.
    pub fn stop_queue(&self, device: Arc<str>, index: u16) -> Result<Box<QueueRun>, ReactorError> {
        let (reply, rx) = mpsc::sync_channel(1);
        self.send(Command::Stop {
            device,
            index,
            reply,
        })?;
        rx.recv().map_err(|_| ReactorError::Gone(self.id))
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

/// One in-flight request.
#[derive(Debug, Default)]
struct Slot {
    req: ParsedRequest,
    head: u16,
    ops_pending: u16,
    /// First failure among the request's operations (-errno), 0 if none.
    error: i32,
    /// Keeps the guest memory the iovecs point into mapped until completion.
    mem: Option<Arc<GuestMemoryMmap>>,
}

/// A queue being served.
struct ActiveQueue {
    run: Box<QueueRun>,
    /// Completed chains go here; published once per loop iteration.
    used: UsedRing,
    /// The guest memory table as a flat region table (rebuilt when the frontend sends a new
    /// one; checked at every poll of the queue, so at most one loop iteration stale).
    ram: GuestRam<Arc<GuestMemoryMmap>>,
    slots: Box<[Slot]>,
    free: Vec<u16>,
    in_flight: usize,
    needs_signal: bool,
    /// Requests were started in this loop iteration (the backend's batch needs ending).
    batch_touched: bool,
    stopping: Option<SyncSender<Box<QueueRun>>>,
    errors_suppressed: u64,
    error_log_next: Instant,
}

impl ActiveQueue {
    fn new(run: Box<QueueRun>) -> Self {
        let n = usize::from(run.queue.size()).clamp(1, SLOTS_PER_QUEUE_MAX);
        let slots: Box<[Slot]> = (0..n).map(|_| Slot::default()).collect();
        let free = (0..n as u16).rev().collect();
        ActiveQueue {
            used: UsedRing::new(&run.queue),
            ram: GuestRam::new(run.mem.memory().into_inner()),
            run,
            slots,
            free,
            in_flight: 0,
            needs_signal: false,
            batch_touched: false,
            stopping: None,
            errors_suppressed: 0,
            error_log_next: Instant::now(),
        }
    }

    /// Logs a guest or backend error at most once per [`ERROR_LOG_INTERVAL`].
    fn log_error(&mut self, what: &str, detail: &dyn std::fmt::Display) {
        let now = Instant::now();
        if now >= self.error_log_next {
            tracing::warn!(
                device = %self.run.device,
                queue = self.run.index,
                suppressed = self.errors_suppressed,
                "{what}: {detail}"
            );
            self.errors_suppressed = 0;
            self.error_log_next = now + ERROR_LOG_INTERVAL;
        } else {
            self.errors_suppressed += 1;
        }
    }
}

struct Reactor {
    id: usize,
    rx: Receiver<Command>,
    wake: EventFd,
    epoll: Epoll,
    engine: Box<dyn IoEngine>,
    queues: Vec<Option<ActiveQueue>>,
    stats: Arc<ReactorStats>,
    completions: Box<[Completion]>,
    /// Descriptor scratch for the request parser (reused; see `parse_request_with`).
    scratch: Box<ChainScratch>,
    /// Requests popped in one poll: (slot, parse outcome), started after the ring walk.
    popped: Box<[(u16, Result<(), RequestError>)]>,
    exiting: bool,
    /// Packet queues (net::poller), polled each iteration and slept on through their fds.
    packets: Vec<Box<dyn Poller>>,
    /// Completions of requests backends finished on other threads (offload); its posts wake
    /// this reactor through `wake`.
    offload: OffloadSink,
}

fn user_data(queue_slot: usize, slot: u16) -> u64 {
    ((queue_slot as u64) << 16) | u64::from(slot)
}

fn split_user_data(ud: u64) -> (usize, u16) {
    ((ud >> 16) as usize, (ud & 0xffff) as u16)
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
            queues: Vec::new(),
            stats,
            completions: vec![Completion::default(); REAP_BATCH_MAX].into_boxed_slice(),
            scratch: chain_scratch(),
            popped: vec![(0, Ok(())); POP_BATCH_MAX].into_boxed_slice(),
            exiting: false,
            packets: Vec::new(),
            offload,
        })
    }

    fn run(&mut self) {
        let mut last_work = Instant::now();
        // The event loop runs until a Shutdown command has drained every queue.
        loop {
            let t0 = Instant::now();
            let c0 = tsc();
            self.handle_commands();
            if self.exiting && self.queues.iter().all(Option::is_none) {
                break;
            }
            let mut work = 0usize;
            for qs in 0..self.queues.len() {
                let taken = self.poll_queue(qs);
                if taken > 0 {
                    if let Some(aq) = self.queues[qs].as_mut() {
                        aq.batch_touched = true;
                    }
                }
                work += taken;
            }
            if work > 0 {
                bump(&self.stats.pop_batches, 1);
                self.end_batches();
            }
            // Packet queues: one bounded burst each, counted as work like virtqueue requests.
            for p in &mut self.packets {
                work += p.poll();
            }
            self.submit();
            // Offloaded requests finished elsewhere: reaped below like engine completions.
            self.offload.inject_into(&mut *self.engine);
            work += self.reap();
            self.signal_and_finish_stops();
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
            // Spin only for what gains from it: virtio-blk queues and pollers that ask to.
            let spin_for = if self.queues.iter().any(Option::is_some)
                || self.packets.iter().any(|p| p.spin())
            {
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
                Ok(Command::Start(run)) => self.start_queue(run),
                Ok(Command::Stop {
                    device,
                    index,
                    reply,
                }) => {
                    let found = self.queues.iter_mut().flatten().find(|q| {
                        q.run.device == device && q.run.index == index && q.stopping.is_none()
                    });
                    match found {
                        Some(q) => q.stopping = Some(reply),
                        None => tracing::error!(%device, index, "stop for a queue not served here"),
                    }
                }
                Ok(Command::Shutdown) => {
                    self.exiting = true;
                    for q in self.queues.iter_mut().flatten() {
                        if q.stopping.is_none() {
                            // Dropping the reply sender later tells nobody; the queue is
                            // simply drained and dropped.
                            let (tx, _rx) = mpsc::sync_channel(1);
                            q.stopping = Some(tx);
                        }
                    }
                }
                Ok(Command::AddPoller(p)) => {
                    // Level-triggered EPOLLIN: a frame waiting when the reactor goes to sleep
                    // wakes it at once, so no re-check is needed after arming.
                    let fd = p.wake_fd();
                    if fd >= 0 {
                        let ev = EpollEvent::new(EventSet::IN, TOKEN_PACKET);
                        if let Err(e) = self.epoll.ctl(ControlOperation::Add, fd, ev) {
                            tracing::error!(%e, "cannot watch a packet queue; polling it only");
                        }
                    }
                    self.packets.push(p);
                }
                Ok(Command::RemovePoller {
                    device,
                    index,
                    reply,
                }) => {
                    let pos = self
                        .packets
                        .iter()
                        .position(|p| p.key() == Some((&*device, index)));
                    match pos {
                        Some(i) => {
                            let p = self.packets.swap_remove(i);
                            let fd = p.wake_fd();
                            if fd >= 0 {
                                let _ = self.epoll.ctl(
                                    ControlOperation::Delete,
                                    fd,
                                    EpollEvent::default(),
                                );
                            }
                            let _ = reply.send(p);
                        }
                        None => tracing::error!(%device, index, "remove for a poller not here"),
                    }
                }
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => break,
            }
        }
    }

    fn start_queue(&mut self, mut run: Box<QueueRun>) {
        let slot = match self.queues.iter().position(Option::is_none) {
            Some(s) => s,
            None if self.queues.len() < QUEUES_PER_REACTOR_MAX => {
                self.queues.push(None);
                self.queues.len() - 1
            }
            None => {
                tracing::error!(device = %run.device, "reactor queue table full");
                return;
            }
        };
        let mem = run.mem.memory();
        // Polling from now on: the guest need not kick.
        let _ = run.queue.disable_notification(&*mem);
        drop(mem);
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            run.kick.as_raw_fd(),
            EpollEvent::new(EventSet::IN, slot as u64),
        ) {
            tracing::error!(device = %run.device, err = %e, "cannot watch kick fd");
        }
        run.backend.attach(&self.offload);
        tracing::debug!(reactor = self.id, device = %run.device, queue = run.index, "queue started");
        self.queues[slot] = Some(ActiveQueue::new(run));
        bump(&self.stats.queues, 1);
    }

    /// Takes new requests from queue `qs` and starts them. Returns the number taken.
    fn poll_queue(&mut self, qs: usize) -> usize {
        let Some(aq) = self.queues[qs].as_mut() else {
            return 0;
        };
        if aq.stopping.is_some() {
            return 0;
        }
        let mem = aq.run.mem.memory().into_inner();
        if !Arc::ptr_eq(&mem, aq.ram.keep()) {
            // A new memory table (SET_MEM_TABLE): allocation here, never per request.
            aq.ram = GuestRam::new(mem.clone());
        }
        let engine_room = self
            .engine
            .capacity()
            .saturating_sub(self.engine.in_flight())
            / OPS_PER_REQUEST_MAX;
        let budget = POP_BATCH_MAX.min(aq.free.len()).min(engine_room);
        if budget == 0 {
            return 0;
        }
        // Phase 1: read the avail ring's idx once for the whole batch (virtio-queue's
        // pop_descriptor_chain re-reads it per chain) and parse each chain into a free slot.
        let (avail, table, size) = (
            aq.run.queue.avail_ring(),
            aq.run.queue.desc_table(),
            aq.run.queue.size(),
        );
        let next_avail = aq.run.queue.next_avail();
        let Some(ready) = avail_ready(&aq.ram, avail, size, next_avail) else {
            aq.log_error(
                "bad avail ring",
                &"index beyond the ring or ring outside guest memory",
            );
            return 0;
        };
        let mut taken = 0;
        {
            let ActiveQueue {
                run,
                slots,
                free,
                ram,
                ..
            } = &mut *aq;
            let n = usize::from(ready).min(budget);
            for k in 0..n {
                let index = next_avail.wrapping_add(k as u16);
                let Some(head) = avail_head(ram, avail, size, index) else {
                    break;
                };
                let Some(slot_id) = free.pop() else { break };
                let slot = &mut slots[usize::from(slot_id)];
                slot.head = head;
                slot.error = 0;
                slot.ops_pending = 0;
                let chain = Chain::new(ram, table, size, head);
                let parsed =
                    parse_request_with(chain, ram, &run.geom, &mut slot.req, &mut self.scratch);
                self.popped[taken] = (slot_id, parsed);
                taken += 1;
            }
            run.queue
                .set_next_avail(next_avail.wrapping_add(taken as u16));
        }
        aq.in_flight += taken;
        // Phase 2: start (or refuse) what was popped.
        for i in 0..taken {
            let (slot_id, parsed) = self.popped[i];
            let slot = &mut aq.slots[usize::from(slot_id)];
            let outcome = match parsed {
                Err(e) => Err(e),
                Ok(()) if slot.req.kind == RequestKind::GetId => {
                    write_id(&slot.req, &aq.run.geom.serial);
                    Ok(Started::Done(0))
                }
                Ok(()) => {
                    slot.mem = Some(mem.clone());
                    Ok(aq
                        .run
                        .backend
                        .start(&slot.req, &mut *self.engine, user_data(qs, slot_id)))
                }
            };
            match outcome {
                Ok(Started::Submitted(ops)) => slot.ops_pending = ops,
                Ok(Started::Done(result)) => {
                    complete_slot(aq, slot_id, result);
                }
                Err(e) => {
                    if matches!(e, RequestError::Unsupported(_)) {
                        bump(&aq.run.stats.unsupported_requests, 1);
                    } else {
                        bump(&aq.run.stats.invalid_requests, 1);
                    }
                    aq.log_error("refused guest request", &e);
                    finish_slot(aq, slot_id, e.status(), 1);
                }
            }
        }
        bump(&self.stats.requests, taken as u64);
        taken
    }

    /// Lets each backend that received requests in this iteration finish deferred ones, once
    /// per backend (several queues of one disk, or disks of one datastore, share a backend
    /// batch: their metadata commits together).
    fn end_batches(&mut self) {
        let Reactor { queues, engine, .. } = self;
        for i in 0..queues.len() {
            let (head, tail) = queues.split_at_mut(i + 1);
            let Some(aq) = head[i].as_mut() else {
                continue;
            };
            if !aq.batch_touched {
                continue;
            }
            aq.batch_touched = false;
            for other in tail.iter_mut().flatten() {
                if Arc::ptr_eq(&other.run.backend, &aq.run.backend) {
                    other.batch_touched = false;
                }
            }
            aq.run.backend.end_batch(&mut **engine);
        }
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

    /// Reaps engine completions and completes their requests. Returns the number reaped.
    fn reap(&mut self) -> usize {
        let n = self.engine.reap(&mut self.completions);
        if n > 0 {
            bump(&self.stats.reap_batches, 1);
            bump(&self.stats.reaped, n as u64);
        }
        for i in 0..n {
            let c = self.completions[i];
            let (qs, slot_id) = split_user_data(c.user_data);
            let Some(aq) = self.queues.get_mut(qs).and_then(Option::as_mut) else {
                tracing::error!(user_data = c.user_data, "completion for an unknown queue");
                continue;
            };
            let Some(slot) = aq.slots.get_mut(usize::from(slot_id)) else {
                tracing::error!(user_data = c.user_data, "completion for an unknown slot");
                continue;
            };
            assert!(slot.ops_pending > 0, "completion for an idle slot");
            slot.ops_pending -= 1;
            if c.result < 0 && slot.error == 0 {
                slot.error = c.result;
            }
            if slot.ops_pending == 0 {
                let result = if slot.error != 0 {
                    slot.error
                } else {
                    c.result
                };
                complete_slot(aq, slot_id, result);
            }
        }
        n
    }

    fn signal_and_finish_stops(&mut self) {
        for qs in 0..self.queues.len() {
            let Some(aq) = self.queues[qs].as_mut() else {
                continue;
            };
            if aq.needs_signal {
                aq.needs_signal = false;
                // One idx store for the iteration's completions, then one decision (with
                // EVENT_IDX, the guest says when it wants an interrupt).
                if aq.used.publish(&aq.ram, &mut aq.run.queue).is_none() {
                    aq.log_error("cannot write used ring", &"used ring outside guest memory");
                }
                if aq.used.needs_notification(&aq.ram) {
                    if let Ok(call) = aq.run.call.lock() {
                        if let Some(call) = call.as_ref() {
                            let _ = call.write(1);
                            bump(&aq.run.stats.notifications, 1);
                        }
                    }
                }
            }
            if aq.stopping.is_some() && aq.in_flight == 0 {
                if let Some(aq) = self.queues[qs].take() {
                    let _ = self.epoll.ctl(
                        ControlOperation::Delete,
                        aq.run.kick.as_raw_fd(),
                        EpollEvent::default(),
                    );
                    bump(&self.stats.queues, u64::MAX); // wrapping -1
                    tracing::debug!(device = %aq.run.device, queue = aq.run.index, "queue stopped");
                    if let Some(reply) = aq.stopping {
                        let _ = reply.send(aq.run);
                    }
                }
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
        for aq in self.queues.iter_mut().flatten() {
            drain_eventfd(aq.run.kick.as_raw_fd());
            let mem = aq.run.mem.memory();
            // enable_notification reports whether the ring already holds new requests.
            if aq.stopping.is_none() && aq.run.queue.enable_notification(&*mem).unwrap_or(true) {
                pending = true;
            }
        }
        for p in self.packets.iter_mut() {
            // A poll-only packet queue (no fd, e.g. DPDK) keeps the reactor spinning.
            if p.prepare_sleep() || p.wake_fd() < 0 {
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
        for aq in self.queues.iter_mut().flatten() {
            let mem = aq.run.mem.memory();
            let _ = aq.run.queue.disable_notification(&*mem);
        }
    }
}

/// Completes a request whose operations have all finished with `result` (bytes or -errno).
fn complete_slot(aq: &mut ActiveQueue, slot_id: u16, result: i32) {
    let slot = &aq.slots[usize::from(slot_id)];
    let req = &slot.req;
    let expected = match req.kind {
        RequestKind::Read | RequestKind::Write => i64::from(req.data_len),
        _ => 0,
    };
    let ok = if req.kind == RequestKind::GetId || req.kind == RequestKind::Flush {
        result >= 0
    } else {
        i64::from(result) == expected || (expected == 0 && result >= 0)
    };
    let (status, used) = if ok {
        match req.kind {
            RequestKind::Read => bump(&aq.run.stats.read_bytes, u64::from(req.data_len)),
            RequestKind::Write => bump(&aq.run.stats.write_bytes, u64::from(req.data_len)),
            _ => {}
        }
        (
            virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK as u8,
            req.used_len_ok(),
        )
    } else {
        bump(&aq.run.stats.io_errors, 1);
        let kind = req.kind;
        let detail = if result < 0 {
            std::io::Error::from_raw_os_error(-result).to_string()
        } else {
            format!("short transfer: {result} of {expected} bytes")
        };
        aq.log_error(&format!("{kind:?} failed"), &detail);
        (virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8, 1)
    };
    finish_slot(aq, slot_id, status, used);
}

/// Writes the status byte, puts the chain on the used ring and frees the slot.
fn finish_slot(aq: &mut ActiveQueue, slot_id: u16, status: u8, used: u32) {
    let slot = &mut aq.slots[usize::from(slot_id)];
    let mut used = used;
    match slot.req.status {
        // Bounds-checked again (the table may be newer than at parse time).
        Some(addr) => {
            if aq.ram.write(addr.0, &[status]).is_none() {
                used = 0;
            }
        }
        // No status descriptor found (refused chain): nothing was written to the guest.
        None => used = 0,
    }
    let head = slot.head;
    slot.mem = None;
    if aq.used.push(&aq.ram, head, used).is_none() {
        aq.log_error("cannot write used ring", &"used ring outside guest memory");
    }
    bump(&aq.run.stats.requests, 1);
    aq.free.push(slot_id);
    aq.in_flight -= 1;
    aq.needs_signal = true;
}

/// Copies the serial into a GET_ID request's buffers.
fn write_id(req: &ParsedRequest, serial: &[u8; ID_BYTES]) {
    let mut done = 0usize;
    for iov in &req.iov[..req.iov_count] {
        if done >= ID_BYTES {
            break;
        }
        let n = iov.iov_len.min(ID_BYTES - done);
        // SAFETY: the iovec comes from a bounds-checked guest memory slice (the parser), held
        // mapped by the caller's memory snapshot; n is within both the iovec and the serial.
        unsafe {
            std::ptr::copy_nonoverlapping(serial[done..].as_ptr(), iov.iov_base.cast::<u8>(), n)
        };
        done += n;
    }
}

fn drain_eventfd(fd: RawFd) {
    let mut buf = 0u64;
    // SAFETY: reads at most 8 bytes into a local u64 from a non-blocking eventfd.
    unsafe { libc::read(fd, (&mut buf as *mut u64).cast(), 8) };
}

/// Reports how many queues each reactor serves (for stats and tests).
pub fn queues_served(handles: &[ReactorHandle]) -> Vec<u64> {
    handles
        .iter()
        .map(|h| h.stats.queues.load(Ordering::Relaxed))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, SeekFrom, Write};

    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    };
    use vm_memory::GuestAddress;

    use super::*;
    use crate::backend::RawBackend;
    use crate::engine::fault::FaultPlan;
    use crate::testing::{geometry, BlkHarness, MEM_BYTES};
    use vm_memory::Bytes;

    const DISK_BYTES: u64 = 1 << 20;

    /// A raw image file served by the shared test harness.
    struct RawDisk {
        h: BlkHarness,
        image: std::path::PathBuf,
        _dir: tempfile::TempDir,
    }

    impl std::ops::Deref for RawDisk {
        type Target = BlkHarness;
        fn deref(&self) -> &BlkHarness {
            &self.h
        }
    }

    impl std::ops::DerefMut for RawDisk {
        fn deref_mut(&mut self) -> &mut BlkHarness {
            &mut self.h
        }
    }

    fn harness(engine: EngineKind) -> RawDisk {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("d.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(DISK_BYTES)
            .unwrap();
        let backend = Arc::new(RawBackend::open(&image, false, false).unwrap());
        RawDisk {
            h: BlkHarness::start(engine, backend, geometry(DISK_BYTES)),
            image,
            _dir: dir,
        }
    }

    /// A new memory table (SET_MEM_TABLE, e.g. memory hotplug) is picked up by the reactor's
    /// cached region table: a buffer in a region added while the queue runs is served.
    #[test]
    fn memory_added_while_running_is_served() {
        const ADDED_AT: u64 = 0x100_0000;
        let mut h = harness(EngineKind::Uring);
        // Outside the current table: refused, and nothing is touched.
        let s = h.request(VIRTIO_BLK_T_IN, 0, (ADDED_AT, 4096, true));
        assert_eq!(s, VIRTIO_BLK_S_IOERR as u8);
        let added =
            vm_memory::GuestRegionMmap::from_range(GuestAddress(ADDED_AT), 0x1_0000, None).unwrap();
        let bigger = h.mem.memory().insert_region(Arc::new(added)).unwrap();
        h.mem.lock().unwrap().replace(bigger);
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 13) as u8).collect();
        h.mem
            .memory()
            .write_slice(&pattern, GuestAddress(ADDED_AT))
            .unwrap();
        let s = h.request(VIRTIO_BLK_T_OUT, 16, (ADDED_AT, 4096, false));
        assert_eq!(s, VIRTIO_BLK_S_OK as u8);
        let mut f = std::fs::File::open(&h.image).unwrap();
        f.seek(SeekFrom::Start(16 * 512)).unwrap();
        let mut back = vec![0u8; 4096];
        f.read_exact(&mut back).unwrap();
        assert_eq!(back, pattern);
    }

    #[test]
    fn write_then_read_back() {
        let mut h = harness(EngineKind::Uring);
        let m = h.mem.memory();
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        m.write_slice(&pattern, GuestAddress(0x20_0000)).unwrap();
        drop(m);
        let s = h.request(VIRTIO_BLK_T_OUT, 8, (0x20_0000, 4096, false));
        assert_eq!(s, VIRTIO_BLK_S_OK as u8);
        // The bytes are in the image at sector 8.
        let mut f = std::fs::File::open(&h.image).unwrap();
        f.seek(SeekFrom::Start(4096)).unwrap();
        let mut back = vec![0u8; 4096];
        f.read_exact(&mut back).unwrap();
        assert_eq!(back, pattern);
        // And a guest read returns them.
        let s = h.request(VIRTIO_BLK_T_IN, 8, (0x30_0000, 4096, true));
        assert_eq!(s, VIRTIO_BLK_S_OK as u8);
        let mut got = vec![0u8; 4096];
        h.mem
            .memory()
            .read_slice(&mut got, GuestAddress(0x30_0000))
            .unwrap();
        assert_eq!(got, pattern);
        let st = h.stats.snapshot();
        assert_eq!(st.requests, 2);
        assert_eq!((st.read_bytes, st.write_bytes), (4096, 4096));
        assert!(st.notifications >= 1);
    }

    #[test]
    fn hostile_requests_get_status_and_are_counted() {
        let mut h = harness(EngineKind::Sync);
        // Past the end of the disk.
        let s = h.request(VIRTIO_BLK_T_IN, DISK_BYTES / 512, (0x20_0000, 512, true));
        assert_eq!(s, VIRTIO_BLK_S_IOERR as u8);
        // Buffer outside guest memory.
        let s = h.request(VIRTIO_BLK_T_IN, 0, (MEM_BYTES as u64 - 100, 512, true));
        assert_eq!(s, VIRTIO_BLK_S_IOERR as u8);
        // Unknown type.
        let s = h.request(77, 0, (0x20_0000, 512, true));
        assert_eq!(s, VIRTIO_BLK_S_UNSUPP as u8);
        // The queue still works afterwards.
        let s = h.request(VIRTIO_BLK_T_GET_ID, 0, (0x20_0000, 20, true));
        assert_eq!(s, VIRTIO_BLK_S_OK as u8);
        let mut id = [0u8; 9];
        h.mem
            .memory()
            .read_slice(&mut id, GuestAddress(0x20_0000))
            .unwrap();
        assert_eq!(&id, b"test-disk");
        let st = h.stats.snapshot();
        assert_eq!(st.invalid_requests, 2);
        assert_eq!(st.unsupported_requests, 1);
        assert_eq!(st.requests, 4);
    }

    #[test]
    fn engine_faults_become_ioerr() {
        // Buffered writes run inline (backend::InlineIo), so the engine's faults are exercised with
        // flushes (an empty data descriptor is allowed in a FLUSH chain).
        let mut h = harness(EngineKind::Fault(FaultPlan::Flushes, libc::EIO));
        let s = h.request(VIRTIO_BLK_T_FLUSH, 0, (0x20_0000, 0, false));
        assert_eq!(s, VIRTIO_BLK_S_IOERR as u8);
        let s = h.request(VIRTIO_BLK_T_IN, 0, (0x20_0000, 4096, true));
        assert_eq!(s, VIRTIO_BLK_S_OK as u8);
        assert_eq!(h.stats.snapshot().io_errors, 1);
    }

    #[test]
    fn stop_returns_queue_with_progress() {
        let mut h = harness(EngineKind::Uring);
        for i in 0..5 {
            assert_eq!(
                h.request(VIRTIO_BLK_T_IN, i, (0x20_0000, 512, true)),
                VIRTIO_BLK_S_OK as u8
            );
        }
        let run = h.reactor.link().stop_queue("t".into(), 0).unwrap();
        assert_eq!(run.queue.next_avail(), 5);
        assert_eq!(run.queue.next_used(), 5);
        assert_eq!(h.reactor.stats.queues.load(Ordering::Relaxed), 0);
        let _ = std::io::stdout().flush();
    }
}
