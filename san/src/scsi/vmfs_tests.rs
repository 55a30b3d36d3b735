//! The unit on a datastore file (vmfs backend on a simulated disk): every request goes to the
//! datastore's metadata worker at `end_batch` and comes back through the offload mailbox, the
//! path a thin datastore disk takes; out of space becomes DATA PROTECT, 27h/07h; UNMAP is
//! advisory there (no LBPRZ), WRITE SAME with UNMAP zeroes.

use std::sync::Arc;

use vmfs::device::SimDisk;
use vmfs::format::Provisioning;
use vmfs::fs::{Datastore, MkfsOptions};
use vmfs_disk::VmfsBackend;

use super::sense::key;
use super::tests::{caw, nexus, read10, write10, Harness};
use super::*;

const MIB: u64 = 1 << 20;

/// A thin `disk_bytes` file on a `ds_bytes` datastore, as a unit.
fn unit(ds_bytes: u64, disk_bytes: u64) -> Harness {
    let sim = Arc::new(SimDisk::new(ds_bytes));
    Datastore::mkfs(sim.clone(), &MkfsOptions { uuid: None }, &mut |_, _| {}).unwrap();
    let ds = Arc::new(Datastore::mount(sim).unwrap());
    let ino = ds
        .create_file("lun.img", Provisioning::Thin, disk_bytes, &mut |_, _| {})
        .unwrap();
    ds.open(ino).unwrap();
    let b = Arc::new(VmfsBackend::new(ds, ino, "lun.img", false).unwrap());
    let lu = LogicalUnit::new(
        b,
        LuConfig {
            name: "lun.img".into(),
            state_path: None,
        },
    )
    .unwrap();
    Harness::new(Arc::new(lu), nexus("iqn.2026-01.test:a", 1)).ready()
}

#[test]
fn reads_writes_caw_unmap_and_sync_through_the_worker() {
    let mut h = unit(96 * MIB, 16 * MIB);
    // A hole reads as zeroes.
    assert!(h.run(&read10(0, 8), &[]).data.iter().all(|&b| b == 0));
    let data: Vec<u8> = (0..8 * 512).map(|i| (i % 251) as u8).collect();
    assert!(h.run(&write10(2048, 8), &data).good());
    assert_eq!(h.run(&read10(2048, 8), &[]).data, data);
    let mut cw = data[..512].to_vec();
    cw.extend_from_slice(&[7; 512]);
    assert!(h.run(&caw(2048, 1), &cw).good());
    assert_eq!(h.run(&read10(2048, 1), &[]).data, vec![7; 512]);
    assert_eq!(h.run(&caw(2048, 1), &cw).asc(), (key::MISCOMPARE, 0x1D, 0));
    // Deallocation is advisory on a datastore file: LBPRZ is not claimed, UNMAP succeeds
    // and leaves the data; WRITE SAME with UNMAP still zeroes.
    let b2 = h.run(&[0x12, 1, 0xB2, 0, 255, 0], &[]).data;
    assert_eq!(b2[5] & 0xE4, 0xE0);
    let mut list = vec![0u8, 22, 0, 16];
    list.extend_from_slice(&[0; 4]);
    list.extend_from_slice(&2048u64.to_be_bytes());
    list.extend_from_slice(&4u32.to_be_bytes());
    list.extend_from_slice(&[0; 4]);
    let mut c = [0u8; 10];
    c[0] = 0x42;
    c[8] = list.len() as u8;
    assert!(h.run(&c, &list).good());
    let back = h.run(&read10(2048, 8), &[]).data;
    assert_eq!(back[512..], data[512..]);
    let mut ws = [0u8; 10];
    ws[0] = 0x41;
    ws[1] = 0x08;
    ws[2..6].copy_from_slice(&2048u32.to_be_bytes());
    ws[7..9].copy_from_slice(&4u16.to_be_bytes());
    assert!(h.run(&ws, &[0; 512]).good());
    let back = h.run(&read10(2048, 8), &[]).data;
    assert!(back[..4 * 512].iter().all(|&b| b == 0));
    assert_eq!(back[4 * 512..], data[4 * 512..]);
    assert!(h.run(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).good());
}

#[test]
fn out_of_space_is_data_protect_space_allocation_failed() {
    // A 256 MiB thin file on a 96 MiB datastore: writing it all runs out of space.
    let mut h = unit(96 * MIB, 256 * MIB);
    let chunk = vec![0x5Au8; MIB as usize];
    let blocks = (MIB / 512) as u16;
    let mut failed = None;
    for i in 0..256u32 {
        let d = h.run(&write10(i * u32::from(blocks), blocks), &chunk);
        if !d.good() {
            failed = Some(d.asc());
            break;
        }
    }
    assert_eq!(failed, Some((key::DATA_PROTECT, 0x27, 0x07)));
}
