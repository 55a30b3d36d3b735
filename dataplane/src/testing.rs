//! Test support (feature `test-utils`, like virtio-queue's `test-utils`): one virtio-blk
//! queue served by a running reactor, driven the way a guest drives it — guest memory, a mock
//! split virtqueue laid out in it, and helpers that place a request's header, data and status
//! descriptors, publish the chain, kick, and wait for the used ring. Built only on the
//! reactor's public API ([`ReactorHandle::spawn`], [`Command::AddPoller`] of a [`BlkQueue`], `stop_queue`, stats),
//! so any backend crate can test its backend under a real reactor.
//! [`count_alloc`] holds the counting global allocator of the no-allocation-per-I/O tests.

pub mod count_alloc;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::BlockBackend;
use crate::blk::{serial_from, DiskGeometry};
use crate::blk_queue::{BlkQueue, QueueRun};
use crate::engine::EngineKind;
use crate::reactor::{Command, ReactorHandle};
use crate::stats::QueueStats;

/// Guest memory of the harness: one region at guest address 0. The descriptor table and rings
/// sit at its start, request headers and status bytes at [`HEADERS_AT`]; data buffers may go
/// anywhere from [`DATA_AT`] on.
pub const MEM_BYTES: usize = 0x40_0000;
/// Where request headers and status bytes are placed (0x100 bytes per request).
pub const HEADERS_AT: u64 = 0x10_0000;
/// First guest address free for data buffers.
pub const DATA_AT: u64 = 0x20_0000;
/// Entries of the mock virtqueue (libblkio's default queue size).
pub const QUEUE_SIZE: u16 = 256;
/// How long [`BlkHarness::wait`] waits for a completion before failing the test.
pub const COMPLETION_TIMEOUT: Duration = Duration::from_secs(10);
/// Descriptors per request chain (header, data, status).
const DESCS_PER_REQUEST: u16 = 3;
/// Device name and queue index the harness starts its queue under (for `stop_queue`).
pub const DEVICE: &str = "t";

/// The geometry of a one-queue, read-write disk of `bytes` with DISCARD, serial "test-disk".
pub fn geometry(bytes: u64) -> DiskGeometry {
    DiskGeometry {
        capacity_sectors: bytes / 512,
        blk_size: 512,
        read_only: false,
        discard: true,
        num_queues: 1,
        serial: serial_from("test-disk"),
    }
}

/// A request that was published and kicked but whose completion has not been waited for.
#[derive(Debug, Clone, Copy)]
pub struct Pending {
    status_addr: GuestAddress,
    /// The chain's head descriptor (what the used ring reports).
    head: u16,
    /// The used ring's index when the request was published: its completion is at or after.
    used_from: u16,
}

/// One virtio-blk queue on a running reactor.
#[derive(Debug)]
pub struct BlkHarness {
    /// Guest memory (replaceable, as SET_MEM_TABLE does).
    pub mem: GuestMemoryAtomic<GuestMemoryMmap>,
    /// The reactor serving the queue.
    pub reactor: ReactorHandle,
    /// The queue's kick eventfd (guest → device).
    pub kick: EventFd,
    /// The queue's counters.
    pub stats: Arc<QueueStats>,
    next_desc: u16,
    /// Guest addresses of the avail and used rings (descriptor table at 0).
    rings: (GuestAddress, GuestAddress),
    avail_idx: u16,
}

impl BlkHarness {
    /// Spawns a reactor with an engine of `engine` kind and starts one queue of a disk with
    /// geometry `geom` on `backend`. Panics on setup failure (test code).
    pub fn start(engine: EngineKind, backend: Arc<dyn BlockBackend>, geom: DiskGeometry) -> Self {
        #[allow(clippy::unwrap_used)]
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).unwrap(),
        );
        let m = mem.memory();
        let vq = MockSplitQueue::new(&*m, QUEUE_SIZE);
        #[allow(clippy::unwrap_used)]
        let queue: Queue = vq.create_queue().unwrap();
        let rings = (vq.avail_addr(), vq.used_addr());
        drop(vq);
        drop(m);
        #[allow(clippy::unwrap_used)]
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let stats = Arc::new(QueueStats::default());
        #[allow(clippy::unwrap_used)]
        let reactor = ReactorHandle::spawn(0, None, engine).unwrap();
        #[allow(clippy::unwrap_used)]
        let run = Box::new(QueueRun {
            device: DEVICE.into(),
            index: 0,
            queue,
            mem: mem.clone(),
            kick: kick.try_clone().unwrap(),
            call: Arc::new(Mutex::new(Some(EventFd::new(EFD_NONBLOCK).unwrap()))),
            backend,
            geom: Arc::new(geom),
            stats: stats.clone(),
        });
        #[allow(clippy::unwrap_used)]
        reactor
            .link()
            .send(Command::AddPoller(Box::new(BlkQueue::new(run))))
            .unwrap();
        BlkHarness {
            mem,
            reactor,
            kick,
            stats,
            next_desc: 0,
            rings,
            avail_idx: 0,
        }
    }

    /// Publishes one request of type `t` at `sector` with one data descriptor
    /// `data = (guest address, length, device-writable)` and kicks; does not wait.
    #[allow(clippy::unwrap_used)]
    pub fn submit(&mut self, t: u32, sector: u64, data: (u64, u32, bool)) -> Pending {
        let used_from = self.used_idx();
        let m = self.mem.memory();
        let d = self.next_desc;
        let hdr_addr = HEADERS_AT + u64::from(d) * 0x100;
        let status_addr = hdr_addr + 0x20;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(hdr_addr)).unwrap();
        m.write_obj(0xffu8, GuestAddress(status_addr)).unwrap();
        let wflag = if data.2 { VRING_DESC_F_WRITE as u16 } else { 0 };
        let descs = [
            Descriptor::new(hdr_addr, 16, VRING_DESC_F_NEXT as u16, d + 1),
            Descriptor::new(data.0, data.1, wflag | VRING_DESC_F_NEXT as u16, d + 2),
            Descriptor::new(status_addr, 1, VRING_DESC_F_WRITE as u16, 0),
        ];
        for (i, desc) in descs.iter().enumerate() {
            let at = GuestAddress((u64::from(d) + i as u64) * 16);
            m.write_obj(RawDescriptor::from(*desc), at).unwrap();
        }
        let (avail, _) = self.rings;
        let slot = GuestAddress(avail.0 + 4 + u64::from(self.avail_idx % QUEUE_SIZE) * 2);
        m.write_obj(d, slot).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        m.write_obj(self.avail_idx, GuestAddress(avail.0 + 2))
            .unwrap();
        // The last chain start that fits whole below QUEUE_SIZE descriptors.
        self.next_desc = (self.next_desc + DESCS_PER_REQUEST) % (QUEUE_SIZE - 1);
        self.kick.write(1).unwrap();
        Pending {
            status_addr: GuestAddress(status_addr),
            head: d,
            used_from,
        }
    }

    /// The used ring's index: how many requests have completed so far.
    #[allow(clippy::unwrap_used)]
    pub fn used_idx(&self) -> u16 {
        let (_, used) = self.rings;
        self.mem
            .memory()
            .read_obj::<u16>(GuestAddress(used.0 + 2))
            .unwrap()
    }

    /// The descriptor head of used ring entry `i` (0-based): the completion order.
    #[allow(clippy::unwrap_used)]
    pub fn used_head(&self, i: u16) -> u16 {
        let (_, used) = self.rings;
        let at = used.0 + 4 + u64::from(i % QUEUE_SIZE) * 8;
        self.mem.memory().read_obj::<u32>(GuestAddress(at)).unwrap() as u16
    }

    /// The position of `p`'s completion in the used ring (0-based, counted like the used
    /// index) once it is published there, with its status byte; None while in flight.
    #[allow(clippy::unwrap_used)]
    pub fn completion(&self, p: Pending) -> Option<(u16, u8)> {
        let end = self.used_idx();
        let mut i = p.used_from;
        while i != end {
            if self.used_head(i) == p.head {
                let s = self.mem.memory().read_obj::<u8>(p.status_addr).unwrap();
                return Some((i, s));
            }
            i = i.wrapping_add(1);
        }
        None
    }

    /// Waits (up to [`COMPLETION_TIMEOUT`]) until the used ring holds `p`'s completion and
    /// returns its status byte.
    pub fn wait(&self, p: Pending) -> u8 {
        let deadline = Instant::now() + COMPLETION_TIMEOUT;
        loop {
            if let Some((_, s)) = self.completion(p) {
                return s;
            }
            assert!(Instant::now() < deadline, "request not completed");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Submits one request and waits for it; returns its status byte.
    pub fn request(&mut self, t: u32, sector: u64, data: (u64, u32, bool)) -> u8 {
        let p = self.submit(t, sector, data);
        self.wait(p)
    }
}
