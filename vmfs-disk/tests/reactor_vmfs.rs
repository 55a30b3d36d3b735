//! A vmfs file served by a real reactor (dataplane's test harness): allocating writes are
//! deferred past the reactor's batch and completed later; reads see them.

use std::sync::Arc;

use dataplane::engine::EngineKind;
use dataplane::testing::{geometry, BlkHarness, DATA_AT};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmfs::device::SimDisk;
use vmfs::format::Provisioning;
use vmfs::fs::{Datastore, MkfsOptions};
use vmfs_disk::VmfsBackend;

const DISK_BYTES: u64 = 4 << 20;

/// A vmfs file on a simulated disk (no fd: reads of holes go through the datastore, allocating
/// writes are deferred and completed by injection).
#[test]
fn vmfs_backend_defers_and_completes() {
    let disk = Arc::new(SimDisk::new(96 << 20));
    Datastore::mkfs(disk.clone(), &MkfsOptions { uuid: None }, &mut |_, _| {}).unwrap();
    let ds = Arc::new(Datastore::mount(disk).unwrap());
    let ino = ds
        .create_file("d.img", Provisioning::Thin, DISK_BYTES, &mut |_, _| {})
        .unwrap();
    ds.open(ino).unwrap();
    let backend = Arc::new(VmfsBackend::new(ds.clone(), ino, "d.img", false).unwrap());
    let mut h = BlkHarness::start(EngineKind::Uring, backend, geometry(DISK_BYTES));
    let (src, dst) = (DATA_AT, DATA_AT + 0x10_0000);
    h.mem
        .memory()
        .write_slice(&[0x5au8; 4096], GuestAddress(src))
        .unwrap();
    assert_eq!(
        h.request(VIRTIO_BLK_T_OUT, 16, (src, 4096, false)),
        VIRTIO_BLK_S_OK as u8
    );
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, 16, (dst, 4096, true)),
        VIRTIO_BLK_S_OK as u8
    );
    let mut got = vec![0u8; 4096];
    h.mem
        .memory()
        .read_slice(&mut got, GuestAddress(dst))
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
