//! The steady-state request path allocates nothing per I/O.
//!
//! A counting global allocator (`testing::count_alloc`, installed as this test binary's own)
//! counts every allocation in the process while a reactor serves batches of guest requests on a split virtqueue: once warmed up, ten
//! times more requests must not cost more allocations (the request slab, the completion array,
//! the engine's rings and the reactor's tables are all preallocated).
//!
//! Everything runs in one `#[test]` so no other test thread allocates during the counted
//! windows.

use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dataplane::backend::{BlockBackend, NullBackend, RawBackend};
use dataplane::blk::{serial_from, DiskGeometry};
use dataplane::blk_queue::{BlkQueue, QueueRun};
use dataplane::engine::EngineKind;
use dataplane::reactor::{Command, ReactorHandle};
use dataplane::stats::QueueStats;
use dataplane::testing::count_alloc::{allocations, CountingAlloc};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Guest memory: descriptor table and rings at 0, headers at HDR_BASE, data at DATA_BASE.
const MEM_BYTES: usize = 0x40_0000;
const HDR_BASE: u64 = 0x10_0000;
/// Spacing of request headers (header at +0, status byte at +STATUS_OFF).
const HDR_STRIDE: u64 = 0x100;
const STATUS_OFF: u64 = 0x20;
const DATA_BASE: u64 = 0x20_0000;
/// Ring size of the split queue.
const QUEUE_SIZE: u16 = 256;
/// Avail ring (4 + 2 * 256 + 2 bytes) after the 4 KiB descriptor table, used ring
/// (4 + 8 * 256 + 2 bytes) on the next page.
const AVAIL_ADDR: u64 = 0x1000;
const USED_ADDR: u64 = 0x2000;
/// Requests per round: 3 descriptors each (header, data, status) fill 192 of the 256 entries;
/// 64 is the reactor's POP_BATCH_MAX, a realistic deep-queue batch.
const BATCH: u16 = 64;
/// 4 KiB requests, the usual random-I/O unit.
const IO_BYTES: u32 = 4096;
const DISK_BYTES: u64 = 1 << 20;
/// Rounds before counting: the reactor's first queue pass, io_uring's first submissions and
/// any lazily initialised state (thread-locals, tracing callsites) happen here.
const WARMUP_ROUNDS: u32 = 50;
/// The two counted windows: the second carries ten times the requests of the first.
const SHORT_ROUNDS: u32 = 50;
const LONG_ROUNDS: u32 = 500;
/// Allocations the longer window may show above the shorter one: a few one-off events
/// (a reactor falling asleep for the first time, a timer) but nothing proportional to the
/// 28,800 extra requests.
const SLACK: u64 = 8;
/// A round that does not complete within this time has hung.
const ROUND_MAX: Duration = Duration::from_secs(10);

struct Rig {
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    kick: EventFd,
    stats: Arc<QueueStats>,
    used: GuestAddress,
    avail: GuestAddress,
    avail_idx: u16,
    _reactor: ReactorHandle,
}

impl Rig {
    fn new(engine: EngineKind, backend: Arc<dyn BlockBackend>) -> Rig {
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).expect("guest memory"),
        );
        let m = mem.memory();
        // The rings are laid out here, not by virtio-queue's MockSplitQueue: its 0.17 layout
        // starts the used ring 256 bytes after the avail ring, inside the avail ring's
        // entries, which a run through all 256 entries overwrites.
        let (avail, used) = (GuestAddress(AVAIL_ADDR), GuestAddress(USED_ADDR));
        let mut queue = Queue::new(QUEUE_SIZE).expect("queue");
        queue.set_size(QUEUE_SIZE);
        queue.set_desc_table_address(Some(0), Some(0));
        queue.set_avail_ring_address(Some(AVAIL_ADDR as u32), Some(0));
        queue.set_used_ring_address(Some(USED_ADDR as u32), Some(0));
        queue.set_ready(true);
        assert!(queue.is_valid(&*m), "queue layout");
        // Fixed descriptor chains: request i reads (even i) or writes (odd i) 4 KiB at
        // sector 8*i through its own header, data buffer and status byte.
        for i in 0..BATCH {
            let hdr = HDR_BASE + u64::from(i) * HDR_STRIDE;
            let t = if i % 2 == 0 {
                VIRTIO_BLK_T_IN
            } else {
                VIRTIO_BLK_T_OUT
            };
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&t.to_le_bytes());
            h[8..16].copy_from_slice(&(u64::from(i) * 8).to_le_bytes());
            m.write_slice(&h, GuestAddress(hdr)).expect("header");
            let d = i * 3;
            let data_flags = if t == VIRTIO_BLK_T_IN {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            let descs = [
                Descriptor::new(hdr, 16, VRING_DESC_F_NEXT as u16, d + 1),
                Descriptor::new(
                    DATA_BASE + u64::from(i) * u64::from(IO_BYTES),
                    IO_BYTES,
                    data_flags | VRING_DESC_F_NEXT as u16,
                    d + 2,
                ),
                Descriptor::new(hdr + STATUS_OFF, 1, VRING_DESC_F_WRITE as u16, 0),
            ];
            for (k, desc) in descs.iter().enumerate() {
                let at = GuestAddress((u64::from(d) + k as u64) * 16);
                m.write_obj(RawDescriptor::from(*desc), at)
                    .expect("descriptor");
            }
        }
        drop(m);
        let kick = EventFd::new(EFD_NONBLOCK).expect("kick");
        let stats = Arc::new(QueueStats::default());
        let reactor = ReactorHandle::spawn(0, None, engine).expect("reactor");
        let geom = DiskGeometry {
            capacity_sectors: DISK_BYTES / 512,
            blk_size: 512,
            read_only: false,
            discard: true,
            num_queues: 1,
            serial: serial_from("alloc-test"),
        };
        let run = Box::new(QueueRun {
            device: "t".into(),
            index: 0,
            queue,
            mem: mem.clone(),
            kick: kick.try_clone().expect("kick clone"),
            call: Arc::new(Mutex::new(Some(EventFd::new(EFD_NONBLOCK).expect("call")))),
            backend,
            geom: Arc::new(geom),
            stats: stats.clone(),
        });
        reactor
            .link()
            .send(Command::AddPoller(Box::new(BlkQueue::new(run))))
            .expect("start");
        Rig {
            mem,
            kick,
            stats,
            used,
            avail,
            avail_idx: 0,
            _reactor: reactor,
        }
    }

    /// Offers the BATCH chains, kicks, and spins until all are on the used ring with status OK.
    /// Allocates nothing itself.
    fn round(&mut self) {
        let m = self.mem.memory();
        let used_idx = GuestAddress(self.used.0 + 2);
        let before: u16 = m.read_obj(used_idx).expect("used idx");
        for i in 0..BATCH {
            let hdr = HDR_BASE + u64::from(i) * HDR_STRIDE;
            m.write_obj(0xffu8, GuestAddress(hdr + STATUS_OFF))
                .expect("status");
            let slot = self.avail.0 + 4 + u64::from(self.avail_idx % QUEUE_SIZE) * 2;
            m.write_obj(i * 3, GuestAddress(slot)).expect("avail slot");
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        // Publish the ring entries and status bytes before the index, as a driver's write
        // barrier does (without it the compiler may sink the plain stores past the index).
        fence(Ordering::SeqCst);
        m.write_obj(self.avail_idx, GuestAddress(self.avail.0 + 2))
            .expect("avail idx");
        self.kick.write(1).expect("kick");
        let deadline = Instant::now() + ROUND_MAX;
        if std::env::var_os("DBG").is_some() && self.avail_idx > 400 {
            std::thread::sleep(Duration::from_millis(500));
            for k in 0..(QUEUE_SIZE) {
                let e: u64 = m
                    .read_obj(GuestAddress(self.used.0 + 4 + u64::from(k) * 8))
                    .expect("x");
                eprint!("{}:{} ", e & 0xffff_ffff, e >> 32);
            }
            for i in 0..BATCH {
                let st: u8 = m
                    .read_obj(GuestAddress(
                        HDR_BASE + u64::from(i) * HDR_STRIDE + STATUS_OFF,
                    ))
                    .expect("x");
                eprint!("[{i}]={st} ");
            }
            eprintln!();
        }
        while m.read_obj::<u16>(used_idx).expect("used idx") != before.wrapping_add(BATCH) {
            assert!(
                Instant::now() < deadline,
                "round did not complete: used {} of {before}+{BATCH}, stats {:?}",
                m.read_obj::<u16>(used_idx).expect("used idx"),
                self.stats.snapshot()
            );
            std::hint::spin_loop();
        }
        // Read the status bytes only after seeing the used index (the driver's read barrier).
        fence(Ordering::SeqCst);
        for i in 0..BATCH {
            let hdr = HDR_BASE + u64::from(i) * HDR_STRIDE;
            let status: u8 = m.read_obj(GuestAddress(hdr + STATUS_OFF)).expect("status");
            assert_eq!(
                status,
                VIRTIO_BLK_S_OK as u8,
                "request {i} failed: {:?}",
                self.stats.snapshot()
            );
        }
    }

    /// Allocations during `rounds` rounds.
    fn count(&mut self, rounds: u32) -> u64 {
        let a = allocations();
        for _ in 0..rounds {
            self.round();
        }
        allocations() - a
    }
}

fn check(what: &str, engine: EngineKind, backend: Arc<dyn BlockBackend>) {
    let mut rig = Rig::new(engine, backend);
    rig.count(WARMUP_ROUNDS);
    let short = rig.count(SHORT_ROUNDS);
    let long = rig.count(LONG_ROUNDS);
    let requests = u64::from(LONG_ROUNDS) * u64::from(BATCH);
    eprintln!(
        "{what}: {short} allocations in {} requests, {long} in {requests}",
        u64::from(SHORT_ROUNDS) * u64::from(BATCH)
    );
    assert!(
        long <= short + SLACK,
        "{what}: allocations grow with requests: {short} in {SHORT_ROUNDS} rounds, {long} in \
         {LONG_ROUNDS} rounds of {BATCH}"
    );
    let total = u64::from(WARMUP_ROUNDS + SHORT_ROUNDS + LONG_ROUNDS) * u64::from(BATCH);
    assert_eq!(rig.stats.snapshot().requests, total);
}

#[test]
fn steady_state_request_path_does_not_allocate() {
    let dir = tempfile::tempdir().expect("tmp");
    let image = dir.path().join("d.img");
    std::fs::File::create(&image)
        .expect("image")
        .set_len(DISK_BYTES)
        .expect("size");
    let raw: Arc<dyn BlockBackend> =
        Arc::new(RawBackend::open(&image, false, false).expect("raw backend"));
    check("raw file, io_uring", EngineKind::Uring, raw.clone());
    check("raw file, sync engine", EngineKind::Sync, raw);
    let null: Arc<dyn BlockBackend> =
        Arc::new(NullBackend::new(DISK_BYTES, true).expect("null backend"));
    check("null, io_uring", EngineKind::Uring, null);
}
