//! The backend under a real reactor (dataplane's test harness) with its metadata worker held
//! still: offloaded requests stay in flight for as long as a test needs, so the order of
//! completions, what a crash would keep, and how stop and shutdown wait can be observed.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use dataplane::engine::EngineKind;
use dataplane::testing::{geometry, BlkHarness, Pending, DATA_AT, DEVICE};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_OUT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmfs::device::SimDisk;
use vmfs::format::{Provisioning, FILE_BLOCK};
use vmfs::fs::{Datastore, MkfsOptions};

use super::*;

const DATASTORE_BYTES: u64 = 96 << 20;
const DISK_BYTES: u64 = 16 << 20;
/// Long enough for a reactor to pop, start and hand over a request, and to go to sleep.
const SETTLE: Duration = Duration::from_millis(100);
const OK: u8 = VIRTIO_BLK_S_OK as u8;

struct Served {
    sim: Arc<SimDisk>,
    ds: Arc<Datastore>,
    ino: u64,
    backend: Arc<VmfsBackend>,
    h: BlkHarness,
}

/// A thin file on a simulated disk (every first write to a file block allocates) served on
/// one reactor.
fn served() -> Served {
    let sim = Arc::new(SimDisk::new(DATASTORE_BYTES));
    Datastore::mkfs(sim.clone(), &MkfsOptions { uuid: None }, &mut |_, _| {}).unwrap();
    let ds = Arc::new(Datastore::mount(sim.clone()).unwrap());
    let ino = ds
        .create_file("d.img", Provisioning::Thin, DISK_BYTES, &mut |_, _| {})
        .unwrap();
    ds.open(ino).unwrap();
    let backend = Arc::new(VmfsBackend::new(ds.clone(), ino, "d.img", false).unwrap());
    let h = BlkHarness::start(EngineKind::Uring, backend.clone(), geometry(DISK_BYTES));
    Served {
        sim,
        ds,
        ino,
        backend,
        h,
    }
}

/// Guest buffer of write `k` (4 KiB each, filled with `k + 1`).
fn buffer(h: &BlkHarness, k: u64) -> u64 {
    let at = DATA_AT + k * 4096;
    h.mem
        .memory()
        .write_slice(&[k as u8 + 1; 4096], GuestAddress(at))
        .unwrap();
    at
}

/// The sector of write `k`: the start of file block `k`, so each write allocates.
fn sector(k: u64) -> u64 {
    k * FILE_BLOCK / 512
}

/// What file block `k` of the served file reads as after a crash now: only what was flushed
/// to the simulated disk survives (journal replay at mount).
fn after_crash(s: &Served, k: u64) -> Vec<u8> {
    let log = s.sim.log();
    let base = vec![0u8; DATASTORE_BYTES as usize];
    let img = SimDisk::crash_image(&base, &log, log.len(), &mut |_| false, &mut |_| None);
    let ds = Datastore::mount(Arc::new(SimDisk::from_image(img))).unwrap();
    let ino = ds.lookup("d.img").unwrap();
    let mut back = vec![0u8; 4096];
    ds.read(ino, k * FILE_BLOCK, &mut back).unwrap();
    back
}

#[test]
fn flush_completes_after_earlier_writes_and_makes_them_durable() {
    let mut s = served();
    // A completed allocating write is not yet durable (its metadata waits in the open
    // transaction for a flush)...
    let src = buffer(&s.h, 0);
    assert_eq!(
        s.h.request(VIRTIO_BLK_T_OUT, sector(0), (src, 4096, false)),
        OK
    );
    assert_eq!(after_crash(&s, 0), vec![0u8; 4096]);
    // ...the guest's next FLUSH makes it so.
    assert_eq!(s.h.request(VIRTIO_BLK_T_FLUSH, 0, (src, 0, false)), OK);
    assert_eq!(after_crash(&s, 0), vec![1u8; 4096]);

    // A write and a flush in flight together: the flush completes after the write, and
    // covers it.
    let pause = s.backend.worker().pause();
    let src = buffer(&s.h, 1);
    let w = s.h.submit(VIRTIO_BLK_T_OUT, sector(1), (src, 4096, false));
    let f = s.h.submit(VIRTIO_BLK_T_FLUSH, 0, (src, 0, false));
    std::thread::sleep(SETTLE);
    assert!(s.h.completion(w).is_none() && s.h.completion(f).is_none());
    drop(pause);
    assert_eq!((s.h.wait(w), s.h.wait(f)), (OK, OK));
    let (wi, _) = s.h.completion(w).unwrap();
    let (fi, _) = s.h.completion(f).unwrap();
    assert!(wi < fi, "the flush completed before the write it follows");
    assert_eq!(after_crash(&s, 1), vec![2u8; 4096]);
}

/// Requests submitted before a stop, each allocating, one per file block.
const IN_FLIGHT: u64 = 8;

/// Submits IN_FLIGHT allocating writes, request k filling file block k with k + 1.
fn submit_allocating(h: &mut BlkHarness) -> Vec<Pending> {
    (0..IN_FLIGHT)
        .map(|k| {
            let src = buffer(h, k);
            h.submit(VIRTIO_BLK_T_OUT, sector(k), (src, 4096, false))
        })
        .collect()
}

/// Every request of `submit_allocating` completed OK and its block holds its data.
fn assert_all_written(s: &Served, pending: Vec<Pending>) {
    for (k, p) in pending.into_iter().enumerate() {
        assert_eq!(s.h.completion(p).map(|c| c.1), Some(OK));
        let mut back = vec![0u8; 4096];
        s.ds.read(s.ino, k as u64 * FILE_BLOCK, &mut back).unwrap();
        assert_eq!(back, vec![k as u8 + 1; 4096]);
    }
}

#[test]
fn stop_waits_for_offloaded_requests_and_the_sleeping_reactor_wakes_for_them() {
    let mut s = served();
    let pause = s.backend.worker().pause();
    let pending = submit_allocating(&mut s.h);
    std::thread::sleep(SETTLE);
    let sleeps = s.h.reactor.stats.sleeps.load(Ordering::Relaxed);
    let link = s.h.reactor.link();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(link.stop_queue(DEVICE.into(), 0).unwrap()));
    std::thread::sleep(SETTLE);
    assert!(
        rx.try_recv().is_err(),
        "the queue came back with requests in flight"
    );
    assert!(
        s.h.reactor.stats.sleeps.load(Ordering::Relaxed) > sleeps,
        "the reactor kept polling while it had nothing to do"
    );
    drop(pause);
    let run = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(run.next_used(), IN_FLIGHT as u16);
    assert_all_written(&s, pending);
}

#[test]
fn shutdown_completes_offloaded_requests_first() {
    let mut s = served();
    let pause = s.backend.worker().pause();
    let pending = submit_allocating(&mut s.h);
    std::thread::sleep(SETTLE);
    std::thread::scope(|scope| {
        let reactor = &mut s.h.reactor;
        let t = scope.spawn(move || reactor.shutdown());
        std::thread::sleep(SETTLE);
        assert!(
            !t.is_finished(),
            "the reactor exited with requests in flight"
        );
        drop(pause);
        t.join().unwrap();
    });
    assert_all_written(&s, pending);
}

#[test]
fn one_worker_per_datastore() {
    let s = served();
    let other =
        s.ds.create_file("e.img", Provisioning::Thin, DISK_BYTES, &mut |_, _| {})
            .unwrap();
    s.ds.open(other).unwrap();
    let b = VmfsBackend::new(s.ds.clone(), other, "e.img", false).unwrap();
    assert!(Arc::ptr_eq(&b.worker, &s.backend.worker));
    let sim = Arc::new(SimDisk::new(DATASTORE_BYTES));
    Datastore::mkfs(sim.clone(), &MkfsOptions { uuid: None }, &mut |_, _| {}).unwrap();
    let ds2 = Arc::new(Datastore::mount(sim).unwrap());
    let f = ds2
        .create_file("f.img", Provisioning::Thin, DISK_BYTES, &mut |_, _| {})
        .unwrap();
    ds2.open(f).unwrap();
    let c = VmfsBackend::new(ds2, f, "f.img", false).unwrap();
    assert!(!Arc::ptr_eq(&c.worker, &s.backend.worker));
}
