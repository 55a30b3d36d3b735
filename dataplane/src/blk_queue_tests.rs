//! Tests of the virtio-blk queue on a real reactor thread: requests through a split ring
//! in test guest memory, against a raw image, a vmfs file and a fault-injecting engine.

use std::io::{Read, Seek, SeekFrom, Write};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;

use std::sync::atomic::Ordering;

use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use super::*;
use crate::backend::RawBackend;
use crate::blk::serial_from;
use crate::engine::fault::FaultPlan;
use crate::engine::EngineKind;
use crate::reactor::{Command, ReactorHandle};

const MEM_BYTES: usize = 0x40_0000;
const DISK_BYTES: u64 = 1 << 20;

struct Harness {
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    reactor: ReactorHandle,
    kick: EventFd,
    stats: Arc<QueueStats>,
    _dir: tempfile::TempDir,
    image: std::path::PathBuf,
    next_desc: u16,
    /// Guest addresses of the avail and used rings (descriptor table at 0).
    rings: (GuestAddress, GuestAddress),
    avail_idx: u16,
}

fn geom() -> DiskGeometry {
    DiskGeometry {
        capacity_sectors: DISK_BYTES / 512,
        blk_size: 512,
        read_only: false,
        discard: true,
        num_queues: 1,
        serial: serial_from("test-disk"),
    }
}

fn harness(engine: EngineKind) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(DISK_BYTES)
        .unwrap();
    let backend = Arc::new(RawBackend::open(&image, false, false).unwrap());
    harness_with(engine, backend, dir, image)
}

fn harness_with(
    engine: EngineKind,
    backend: Arc<dyn BlockBackend>,
    dir: tempfile::TempDir,
    image: std::path::PathBuf,
) -> Harness {
    let mem = GuestMemoryAtomic::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).unwrap(),
    );
    let m = mem.memory();
    let vq = MockSplitQueue::new(&*m, 256);
    let queue: Queue = vq.create_queue().unwrap();
    let rings = (vq.avail_addr(), vq.used_addr());
    drop(vq);
    drop(m);
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let stats = Arc::new(QueueStats::default());
    let reactor = ReactorHandle::spawn(0, None, engine).unwrap();
    let run = Box::new(QueueRun {
        device: "t".into(),
        index: 0,
        queue,
        mem: mem.clone(),
        kick: kick.try_clone().unwrap(),
        call: Arc::new(Mutex::new(Some(EventFd::new(EFD_NONBLOCK).unwrap()))),
        backend,
        geom: Arc::new(geom()),
        stats: stats.clone(),
    });
    reactor
        .link()
        .send(Command::AddPoller(Box::new(BlkQueue::new(run))))
        .unwrap();
    Harness {
        mem,
        reactor,
        kick,
        stats,
        _dir: dir,
        image,
        next_desc: 0,
        rings,
        avail_idx: 0,
    }
}

impl Harness {
    /// Submits one request: header at 0x10_0000 + 0x1000*n, data buffer, status.
    /// Returns the status byte after completion.
    fn request(&mut self, t: u32, sector: u64, data: (u64, u32, bool)) -> u8 {
        let m = self.mem.memory();
        let base = 0x10_0000 + u64::from(self.next_desc) * 0x100;
        let hdr_addr = base;
        let status_addr = base + 0x20;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(hdr_addr)).unwrap();
        m.write_obj(0xffu8, GuestAddress(status_addr)).unwrap();
        let d = self.next_desc;
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
        let (avail, used) = self.rings;
        let used_idx = GuestAddress(used.0 + 2);
        let used_before: u16 = m.read_obj(used_idx).unwrap();
        let slot = GuestAddress(avail.0 + 4 + u64::from(self.avail_idx % 256) * 2);
        m.write_obj(d, slot).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        m.write_obj(self.avail_idx, GuestAddress(avail.0 + 2))
            .unwrap();
        self.next_desc = (self.next_desc + 3) % 255;
        self.kick.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while m.read_obj::<u16>(used_idx).unwrap() == used_before {
            assert!(Instant::now() < deadline, "request not completed");
            std::thread::sleep(Duration::from_millis(1));
        }
        m.read_obj::<u8>(GuestAddress(status_addr)).unwrap()
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

/// A vmfs file on a simulated disk (no fd: reads of holes run synchronously, allocating
/// writes are deferred to end_batch and completed by injection).
#[test]
fn vmfs_backend_defers_and_completes() {
    use vmfs::device::SimDisk;
    use vmfs::format::Provisioning;
    use vmfs::fs::{Datastore, MkfsOptions};
    let disk = Arc::new(SimDisk::new(96 << 20));
    Datastore::mkfs(disk.clone(), &MkfsOptions { uuid: None }, &mut |_, _| {}).unwrap();
    let ds = Arc::new(Datastore::mount(disk).unwrap());
    let ino = ds
        .create_file("d.img", Provisioning::Thin, 4 * DISK_BYTES, &mut |_, _| {})
        .unwrap();
    ds.open(ino).unwrap();
    let backend =
        Arc::new(crate::vmfs_backend::VmfsBackend::new(ds.clone(), ino, "d.img", false).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("unused");
    let mut h = harness_with(EngineKind::Uring, backend, dir, image);
    let m = h.mem.memory();
    m.write_slice(&[0x5au8; 4096], GuestAddress(0x20_0000))
        .unwrap();
    drop(m);
    assert_eq!(
        h.request(VIRTIO_BLK_T_OUT, 16, (0x20_0000, 4096, false)),
        VIRTIO_BLK_S_OK as u8
    );
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, 16, (0x30_0000, 4096, true)),
        VIRTIO_BLK_S_OK as u8
    );
    let mut got = vec![0u8; 4096];
    h.mem
        .memory()
        .read_slice(&mut got, GuestAddress(0x30_0000))
        .unwrap();
    assert!(got.iter().all(|&b| b == 0x5a));
    let mut direct = vec![0u8; 4096];
    ds.read(ino, 16 * 512, &mut direct).unwrap();
    assert_eq!(direct, got);
    assert_eq!(
        ds.statfs().unwrap().fb_free,
        ds.statfs().unwrap().fb_total - 1
    );
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
    let queue = h.reactor.link().stop_queue("t".into(), 0).unwrap();
    assert_eq!(queue.next_avail(), 5);
    assert_eq!(queue.next_used(), 5);
    assert_eq!(h.reactor.stats.queues.load(Ordering::Relaxed), 0);
    let _ = std::io::stdout().flush();
}
