//! Tests of the virtio-blk queue on a real reactor thread: requests through a split ring
//! in test guest memory, against a raw image and a fault-injecting engine (a vmfs file: vmfs-disk's tests).

use std::io::{Read, Seek, SeekFrom, Write};

use std::sync::atomic::Ordering;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::backend::RawBackend;
use crate::engine::fault::FaultPlan;
use crate::engine::EngineKind;
use crate::testing::{geometry, BlkHarness, MEM_BYTES};

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
    let queue = h.reactor.link().stop_queue("t".into(), 0).unwrap();
    assert_eq!(queue.next_avail(), 5);
    assert_eq!(queue.next_used(), 5);
    assert_eq!(h.reactor.stats.queues.load(Ordering::Relaxed), 0);
    let _ = std::io::stdout().flush();
}
