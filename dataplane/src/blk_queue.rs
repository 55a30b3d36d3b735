//! A virtio-blk virtqueue on a reactor: the [`Poller`] that pops descriptor chains, parses
//! them ([`crate::blk::request`]), starts them on the disk's backend through the reactor's
//! engine, and completes them (status byte, used ring, one notification decision per loop
//! iteration).
//!
//! The per-request path allocates nothing: requests live in a slab of [`SLOTS_PER_QUEUE_MAX`]
//! preallocated slots, the parser's descriptor scratch and the batch of popped chains are
//! reused, and guest memory is read through a prebuilt region table ([`GuestRam`]) and the
//! fast ring helpers ([`crate::split_ring`], [`crate::used_ring`]). Stopping a queue drains
//! its in-flight requests before the reactor hands it back ([`Poller::take_queue`], with the
//! ring's progress).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::backend::{BlockBackend, Started, OPS_PER_REQUEST_MAX};
use crate::blk::request::{
    chain_scratch, parse_request_with, ChainScratch, ParsedRequest, RequestError, RequestKind,
};
use crate::blk::{DiskGeometry, ID_BYTES};
use crate::engine::Completion;
use crate::guest_ram::GuestRam;
use crate::poller::{tag_of, PollCx, Poller};
use crate::split_ring::{avail_head, avail_ready, Chain};
use crate::stats::{bump, QueueStats};
use crate::used_ring::UsedRing;

/// Descriptor chains taken from one queue per loop iteration, so one busy queue cannot starve
/// the others served by the same reactor.
pub const POP_BATCH_MAX: usize = 64;
/// Requests in flight per virtqueue: the request slab's size. 256 slots cover queue depth 256
/// (libblkio's default queue size) and bound per-queue memory (each slot holds SEG_MAX iovecs).
pub const SLOTS_PER_QUEUE_MAX: usize = 256;
/// Rate limit for guest-error log lines: one per queue per interval.
pub const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Everything a reactor needs to run one virtio-blk virtqueue.
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

/// A virtio-blk virtqueue served by a reactor (send it with `Command::AddPoller`).
pub struct BlkQueue {
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
    stopping: bool,
    /// Descriptor scratch for the request parser (reused; see `parse_request_with`).
    scratch: Box<ChainScratch>,
    /// Requests popped in one poll: (slot, parse outcome), started after the ring walk.
    popped: Box<[(u16, Result<(), RequestError>)]>,
    errors_suppressed: u64,
    error_log_next: Instant,
}

impl std::fmt::Debug for BlkQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkQueue")
            .field("device", &self.run.device)
            .field("index", &self.run.index)
            .field("in_flight", &self.in_flight)
            .field("stopping", &self.stopping)
            .finish()
    }
}

impl BlkQueue {
    /// A queue ready to be handed to a reactor; its slab is sized by the ring (at most
    /// [`SLOTS_PER_QUEUE_MAX`]).
    pub fn new(run: Box<QueueRun>) -> Self {
        let n = usize::from(run.queue.size()).clamp(1, SLOTS_PER_QUEUE_MAX);
        let slots: Box<[Slot]> = (0..n).map(|_| Slot::default()).collect();
        let free = (0..n as u16).rev().collect();
        BlkQueue {
            used: UsedRing::new(&run.queue),
            ram: GuestRam::new(run.mem.memory().into_inner()),
            run,
            slots,
            free,
            in_flight: 0,
            needs_signal: false,
            stopping: false,
            scratch: chain_scratch(),
            popped: vec![(0, Ok(())); POP_BATCH_MAX].into_boxed_slice(),
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

    /// Completes a request whose operations have all finished with `result` (bytes or
    /// -errno).
    fn complete_slot(&mut self, slot_id: u16, result: i32) {
        let slot = &self.slots[usize::from(slot_id)];
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
                RequestKind::Read => bump(&self.run.stats.read_bytes, u64::from(req.data_len)),
                RequestKind::Write => bump(&self.run.stats.write_bytes, u64::from(req.data_len)),
                _ => {}
            }
            (
                virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK as u8,
                req.used_len_ok(),
            )
        } else {
            bump(&self.run.stats.io_errors, 1);
            let kind = req.kind;
            let detail = if result < 0 {
                std::io::Error::from_raw_os_error(-result).to_string()
            } else {
                format!("short transfer: {result} of {expected} bytes")
            };
            self.log_error(&format!("{kind:?} failed"), &detail);
            (virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8, 1)
        };
        self.finish_slot(slot_id, status, used);
    }

    /// Writes the status byte, puts the chain on the used ring and frees the slot.
    fn finish_slot(&mut self, slot_id: u16, status: u8, used: u32) {
        let slot = &mut self.slots[usize::from(slot_id)];
        let mut used = used;
        match slot.req.status {
            // Bounds-checked again (the table may be newer than at parse time).
            Some(addr) => {
                if self.ram.write(addr.0, &[status]).is_none() {
                    used = 0;
                }
            }
            // No status descriptor found (refused chain): nothing was written to the guest.
            None => used = 0,
        }
        let head = slot.head;
        slot.mem = None;
        if self.used.push(&self.ram, head, used).is_none() {
            self.log_error("cannot write used ring", &"used ring outside guest memory");
        }
        bump(&self.run.stats.requests, 1);
        self.free.push(slot_id);
        self.in_flight -= 1;
        self.needs_signal = true;
    }
}

impl Poller for BlkQueue {
    /// Takes new requests from the ring and starts them. Returns the number taken.
    fn poll_io(&mut self, cx: &mut PollCx<'_>) -> usize {
        // Requests a backend completes off the reactor (offload) come back through the
        // reactor's engine, so a stopping queue drains them too (complete runs while stopping).
        if self.stopping {
            return 0;
        }
        let mem = self.run.mem.memory().into_inner();
        if !Arc::ptr_eq(&mem, self.ram.keep()) {
            // A new memory table (SET_MEM_TABLE): allocation here, never per request.
            self.ram = GuestRam::new(mem.clone());
        }
        let engine_room =
            cx.engine.capacity().saturating_sub(cx.engine.in_flight()) / OPS_PER_REQUEST_MAX;
        let budget = POP_BATCH_MAX.min(self.free.len()).min(engine_room);
        if budget == 0 {
            return 0;
        }
        // Phase 1: read the avail ring's idx once for the whole batch (virtio-queue's
        // pop_descriptor_chain re-reads it per chain) and parse each chain into a free slot.
        let (avail, table, size) = (
            self.run.queue.avail_ring(),
            self.run.queue.desc_table(),
            self.run.queue.size(),
        );
        let next_avail = self.run.queue.next_avail();
        let Some(ready) = avail_ready(&self.ram, avail, size, next_avail) else {
            self.log_error(
                "bad avail ring",
                &"index beyond the ring or ring outside guest memory",
            );
            return 0;
        };
        let mut taken = 0;
        {
            let BlkQueue {
                run,
                slots,
                free,
                ram,
                scratch,
                popped,
                ..
            } = &mut *self;
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
                let parsed = parse_request_with(chain, ram, &run.geom, &mut slot.req, scratch);
                popped[taken] = (slot_id, parsed);
                taken += 1;
            }
            run.queue
                .set_next_avail(next_avail.wrapping_add(taken as u16));
        }
        self.in_flight += taken;
        // Phase 2: start (or refuse) what was popped.
        for i in 0..taken {
            let (slot_id, parsed) = self.popped[i];
            let user_data = cx.user_data(slot_id);
            let slot = &mut self.slots[usize::from(slot_id)];
            let outcome = match parsed {
                Err(e) => Err(e),
                Ok(()) if slot.req.kind == RequestKind::GetId => {
                    write_id(&slot.req, &self.run.geom.serial);
                    Ok(Started::Done(0))
                }
                Ok(()) => {
                    slot.mem = Some(mem.clone());
                    Ok(self
                        .run
                        .backend
                        .start(&slot.req, &mut *cx.engine, user_data))
                }
            };
            match outcome {
                Ok(Started::Submitted(ops)) => slot.ops_pending = ops,
                Ok(Started::Done(result)) => self.complete_slot(slot_id, result),
                Err(e) => {
                    if matches!(e, RequestError::Unsupported(_)) {
                        bump(&self.run.stats.unsupported_requests, 1);
                    } else {
                        bump(&self.run.stats.invalid_requests, 1);
                    }
                    self.log_error("refused guest request", &e);
                    self.finish_slot(slot_id, e.status(), 1);
                }
            }
        }
        cx.started(taken);
        taken
    }

    /// Lets the backend finish deferred requests, once per backend per iteration (several
    /// queues of one disk share a backend batch: their metadata commits together).
    fn end_batch(&mut self, cx: &mut PollCx<'_>) {
        let key = Arc::as_ptr(&self.run.backend).cast::<()>() as usize;
        if cx.first_in_batch(key) {
            self.run.backend.end_batch(&mut *cx.engine);
        }
    }

    fn complete(&mut self, _cx: &mut PollCx<'_>, done: &[Completion]) {
        for c in done {
            let slot_id = tag_of(c.user_data);
            let Some(slot) = self.slots.get_mut(usize::from(slot_id)) else {
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
                self.complete_slot(slot_id, result);
            }
        }
    }

    fn flush(&mut self) -> bool {
        if self.needs_signal {
            self.needs_signal = false;
            // One idx store for the iteration's completions, then one decision (with
            // EVENT_IDX, the guest says when it wants an interrupt).
            if self.used.publish(&self.ram, &mut self.run.queue).is_none() {
                self.log_error("cannot write used ring", &"used ring outside guest memory");
            }
            if self.used.needs_notification(&self.ram) {
                if let Ok(call) = self.run.call.lock() {
                    if let Some(call) = call.as_ref() {
                        let _ = call.write(1);
                        bump(&self.run.stats.notifications, 1);
                    }
                }
            }
        }
        self.in_flight == 0
    }

    fn wake_fd(&self) -> RawFd {
        self.run.kick.as_raw_fd()
    }

    fn attach(&mut self, cx: &mut PollCx<'_>) {
        let mem = self.run.mem.memory();
        // Polling from now on: the guest need not kick.
        let _ = self.run.queue.disable_notification(&*mem);
        // A backend that completes requests off the reactor posts them to this reactor's
        // mailbox (which wakes it).
        self.run.backend.attach(cx.offload());
    }

    fn prepare_sleep(&mut self) -> bool {
        // Completions a backend finished off the reactor are the reactor's to check (its
        // offload mailbox), not the queue's.
        drain_eventfd(self.run.kick.as_raw_fd());
        if self.stopping {
            return false;
        }
        let mem = self.run.mem.memory();
        // enable_notification reports whether the ring already holds new requests.
        self.run.queue.enable_notification(&*mem).unwrap_or(true)
    }

    fn end_sleep(&mut self) {
        let mem = self.run.mem.memory();
        let _ = self.run.queue.disable_notification(&*mem);
    }

    fn key(&self) -> Option<(&str, u16)> {
        Some((&self.run.device, self.run.index))
    }

    fn stop(&mut self) {
        self.stopping = true;
    }

    fn take_queue(&mut self) -> Option<Queue> {
        Some(std::mem::take(&mut self.run.queue))
    }
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

#[cfg(test)]
#[path = "blk_queue_tests.rs"]
mod tests;
