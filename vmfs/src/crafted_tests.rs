//! Crafted datastore images (issue 12, finding 8): a decoded structure is changed on disk and
//! its block re-sealed, so the checksum accepts it and the decoders and the code using their
//! numbers are what is tested. Each case must give a clear error, never a panic, and never an
//! access outside the structure the number names.

use std::sync::Arc;

use crate::device::{BlockDevice, SimDisk};
use crate::format::*;
use crate::fs::{Datastore, FsError, MkfsOptions};
use crate::journal::{Journal, JournalError};

const VOL: u64 = 64 << 20;

fn fresh() -> (Arc<SimDisk>, Datastore) {
    let disk = Arc::new(SimDisk::new(VOL));
    Datastore::mkfs(disk.clone(), &MkfsOptions { uuid: None }, &mut |_, _| {}).unwrap();
    let ds = Datastore::mount(disk.clone()).unwrap();
    (disk, ds)
}

/// Reads metadata block `at`, lets `f` change it, re-seals it (same magic and LSN) and
/// writes it back.
pub(crate) fn reseal(dev: &dyn BlockDevice, at: u64, f: impl FnOnce(&mut [u8])) {
    let mut b = vec![0u8; MD_BLOCK];
    dev.read_at(at * MD_BLOCK as u64, &mut b).unwrap();
    let (m, lsn) = (get_u32(&b, 0), lsn_of(&b));
    f(&mut b);
    seal(&mut b, m, at, lsn);
    dev.write_at(at * MD_BLOCK as u64, &b).unwrap();
}

/// Unmounts `ds`, applies `f` to the image, mounts again.
fn craft(disk: &Arc<SimDisk>, ds: Datastore, f: impl FnOnce(&Layout)) -> Datastore {
    let l = ds.layout().unwrap();
    ds.unmount().unwrap();
    drop(ds);
    f(&l);
    Datastore::mount(disk.clone()).unwrap()
}

fn corrupt<T: std::fmt::Debug>(r: Result<T, FsError>) {
    assert!(matches!(r, Err(FsError::Corrupt(_))), "{r:?}");
}

/// A file of `mib` MiB of file blocks, all written.
fn disk_file(ds: &Datastore, name: &str, mib: u64) -> u64 {
    let ino = ds
        .create_file(name, Provisioning::Thin, mib << 20, &mut |_, _| {})
        .unwrap();
    for i in 0..mib {
        ds.write(ino, i << 20, &vec![0x5a; 1 << 20]).unwrap();
    }
    ino
}

/// The pointer block (table index) of a file-block file's first slot.
fn first_pb(disk: &SimDisk, l: &Layout, ino: u64) -> u64 {
    let mut b = vec![0u8; MD_BLOCK];
    disk.read_at(l.inode_block(ino) * MD_BLOCK as u64, &mut b)
        .unwrap();
    inode_addr(&b, 0) - 1
}

#[test]
fn wild_file_block_number_is_refused_not_wrapped() {
    let (disk, ds) = fresh();
    let ino = disk_file(&ds, "a", 2);
    let ds = craft(&disk, ds, |l| {
        let pb = first_pb(&disk, l, ino);
        // An entry whose byte offset wraps to 0: without a range check the file would map
        // the volume header (and the disk backend's io_uring path would read it directly).
        let wrap = (1u64 << 44) - l.fb_region.start / MD_PER_FB;
        reseal(&*disk, l.pb_block(pb), |b| set_pb_entry(b, 0, wrap + 1));
    });
    let mut buf = vec![0u8; 4096];
    corrupt(ds.read(ino, 0, &mut buf));
    corrupt(ds.map_direct(ino, 0, 4096));
    let mut plan = Vec::new();
    assert!(ds.read_plan(ino, 0, 4096, &mut plan).is_err());
    // The datastore still works for everything else.
    let b = disk_file(&ds, "b", 2);
    ds.read(b, 0, &mut buf).unwrap();
    assert_eq!(buf[0], 0x5a);
}

#[test]
fn wild_sub_block_and_pointer_block_addresses_are_refused() {
    let (disk, ds) = fresh();
    let small = ds
        .create_file("s", Provisioning::Thin, 0, &mut |_, _| {})
        .unwrap();
    ds.write(small, 0, &vec![1u8; 100_000]).unwrap();
    let big = disk_file(&ds, "big", 2);
    let ds = craft(&disk, ds, |l| {
        // Sub-block slot 0 past the sub-block region (into the bitmaps and file blocks).
        let sb = l.sb_count + 3;
        reseal(&*disk, l.inode_block(small), |b| {
            set_inode_addr(b, 0, sb + 1)
        });
        // Pointer-block slot past the pointer-block table.
        let pb = l.pb_count + 7;
        reseal(&*disk, l.inode_block(big), |b| set_inode_addr(b, 0, pb + 1));
    });
    let mut buf = vec![0u8; 10];
    corrupt(ds.read(small, 0, &mut buf));
    corrupt(ds.write(small, 0, b"x"));
    corrupt(ds.read(big, 0, &mut buf));
    corrupt(ds.set_size(big, 0));
    assert!(ds.stat(ROOT_INO).is_ok());
}

#[test]
fn resident_size_beyond_the_inode_is_refused() {
    let (disk, ds) = fresh();
    let f = ds
        .create_file("r", Provisioning::Thin, 0, &mut |_, _| {})
        .unwrap();
    ds.write(f, 0, b"hello").unwrap();
    let ds = craft(&disk, ds, |l| {
        reseal(&*disk, l.inode_block(f), |b| put_u64(b, 64, 1 << 30));
    });
    let mut buf = vec![0u8; 1 << 16];
    corrupt(ds.read(f, 0, &mut buf));
    corrupt(ds.punch_hole(f, 0, 1 << 16));
    assert!(ds.stat(ROOT_INO).is_ok());
}

#[test]
fn cross_linked_blocks_give_an_error_not_a_poisoned_datastore() {
    let (disk, ds) = fresh();
    let a = disk_file(&ds, "a", 2);
    let b = disk_file(&ds, "b", 2);
    let other = disk_file(&ds, "c", 2);
    let ds = craft(&disk, ds, |l| {
        // b's first entry points at a's file block.
        let pa = first_pb(&disk, l, a);
        let mut blk = vec![0u8; MD_BLOCK];
        disk.read_at(l.pb_block(pa) * MD_BLOCK as u64, &mut blk)
            .unwrap();
        let e = pb_entry(&blk, 0);
        let pbb = first_pb(&disk, l, b);
        reseal(&*disk, l.pb_block(pbb), |blk| set_pb_entry(blk, 0, e));
    });
    ds.set_size(a, 0).unwrap();
    // Freeing the same block again is corruption, reported as such.
    corrupt(ds.set_size(b, 0));
    // No panic held the lock: the datastore still serves other files.
    let mut buf = vec![0u8; 8];
    ds.read(other, 0, &mut buf).unwrap();
    assert_eq!(buf, [0x5a; 8]);
}

#[test]
fn wild_orphan_link_and_xattr_block_are_refused() {
    let (disk, ds) = fresh();
    let f = ds
        .create_file("x", Provisioning::Thin, 0, &mut |_, _| {})
        .unwrap();
    let l = ds.layout().unwrap();
    ds.unmount().unwrap();
    drop(ds);
    reseal(&*disk, l.inode_block(f), |b| put_u64(b, 136, u64::MAX));
    // The orphan list head (in the root inode) names an inode past the table: mount's
    // orphan reclaim must refuse it, not compute a block number that wraps.
    reseal(&*disk, l.inode_block(ROOT_INO), |b| {
        put_u64(b, 152, u64::MAX)
    });
    assert!(matches!(
        Datastore::mount(disk.clone()),
        Err(FsError::Invalid(_) | FsError::Corrupt(_))
    ));
    reseal(&*disk, l.inode_block(ROOT_INO), |b| put_u64(b, 152, 0));
    let ds = Datastore::mount(disk.clone()).unwrap();
    corrupt(ds.stat(f));
    corrupt(ds.getxattr(f, b"user.a"));
}

/// Problems fsck finds on `disk` (asserting it can read it at all).
fn fsck_problems(disk: &SimDisk) -> Vec<String> {
    crate::fsck::fsck(disk).unwrap().problems
}

#[test]
fn tbz_bit_on_a_hole_does_not_keep_a_pointer_block_alive() {
    // FORMAT.md §8: an entry whose bits 0-62 are 0 is a hole whatever bit 63 (TBZ) says, so
    // fsck accepts a stray TBZ bit in an unused slot. Clearing the file's real entries must
    // still free the pointer block (found by the vmfs_image fuzzer: the block leaked on
    // unlink because "maps nothing" was tested as "every entry is 0").
    let (disk, ds) = fresh();
    let a = disk_file(&ds, "a", 2);
    let b = disk_file(&ds, "b", 2);
    let l = ds.layout().unwrap();
    let ds = craft(&disk, ds, |l| {
        for ino in [a, b] {
            let pb = first_pb(&disk, l, ino);
            reseal(&*disk, l.pb_block(pb), |blk| set_pb_entry(blk, 167, PB_TBZ));
        }
    });
    ds.unmount().unwrap();
    assert_eq!(fsck_problems(&disk), Vec::<String>::new());
    let ds = Datastore::mount(disk.clone()).unwrap();
    // The hole reads as zeroes and is not a mapped block.
    let mut buf = vec![1u8; 8];
    ds.read(a, 0, &mut buf).unwrap();
    assert_eq!(buf, [0x5a; 8]);
    // Shrink to a partial first block, then remove (the fuzzer's setattr size 10 + unlink);
    // and a plain truncation to 0.
    ds.set_size(a, 10).unwrap();
    ds.unlink("a").unwrap();
    ds.set_size(b, 0).unwrap();
    ds.unmount().unwrap();
    drop(ds);
    assert_eq!(fsck_problems(&disk), Vec::<String>::new());
    // b's pointer block was freed with its last mapped entry, not left in b's inode.
    let mut ib = vec![0u8; MD_BLOCK];
    disk.read_at(l.inode_block(b) * MD_BLOCK as u64, &mut ib)
        .unwrap();
    assert_eq!(inode_addr(&ib, 0), 0);
}

#[test]
fn fsck_reports_a_pointer_block_that_maps_nothing() {
    // FORMAT.md §8: a pointer block is freed in the transaction that clears its last entry,
    // so a file holding one that maps nothing is inconsistent; vmfs would never free it
    // (truncation frees pointer blocks through their entries), so it must not pass as clean.
    let (disk, ds) = fresh();
    let a = disk_file(&ds, "a", 2);
    let l = ds.layout().unwrap();
    ds.unmount().unwrap();
    drop(ds);
    let pb = first_pb(&disk, &l, a);
    let mut blk = vec![0u8; MD_BLOCK];
    disk.read_at(l.pb_block(pb) * MD_BLOCK as u64, &mut blk)
        .unwrap();
    let fbs = [pb_entry(&blk, 0) - 1, pb_entry(&blk, 1) - 1];
    reseal(&*disk, l.pb_block(pb), |blk| {
        set_pb_entry(blk, 0, 0);
        set_pb_entry(blk, 1, 0);
        set_pb_entry(blk, 3, PB_TBZ);
    });
    // Keep `allocated` and the file-block bitmap consistent, so only the empty pointer
    // block is wrong.
    reseal(&*disk, l.inode_block(a), |b| put_u64(b, 112, 0));
    reseal(&*disk, l.fb_bitmap.start, |b| {
        for fb in fbs {
            set_bit(b, fb, false);
        }
    });
    let problems = fsck_problems(&disk);
    assert!(
        problems.len() == 1 && problems[0].contains(&format!("pointer block {pb}")),
        "{problems:?}"
    );
}

#[test]
fn journal_replay_writes_only_metadata_homes() {
    let (disk, ds) = fresh();
    let l = ds.layout().unwrap();
    ds.unmount().unwrap();
    drop(ds);
    let mut header = vec![0u8; MD_BLOCK];
    disk.read_at(0, &mut header).unwrap();
    // A committed transaction whose image claims to belong over the volume header.
    let (mut j, _) = Journal::replay(&*disk, &l).unwrap();
    let mut evil = vec![0u8; MD_BLOCK];
    put_u32(&mut evil, 0, magic::VOLUME);
    j.commit(&*disk, &mut [(0, evil)]).unwrap();
    match Datastore::mount(disk.clone()) {
        Err(FsError::Journal(JournalError::BadHome(0))) => {}
        r => panic!("mount replayed into the volume header: {:?}", r.map(|_| ())),
    }
    let mut now = vec![0u8; MD_BLOCK];
    disk.read_at(0, &mut now).unwrap();
    assert_eq!(now, header, "the volume header was overwritten");
}

#[test]
fn journal_replay_refuses_homes_past_the_device_or_of_another_kind() {
    for (home_of, m) in [
        // Past the device, far enough that a byte offset would overflow.
        (
            &(|_: &Layout| u64::MAX / 2) as &dyn Fn(&Layout) -> u64,
            magic::POINTER,
        ),
        // Inside the data (sub-block) region: not metadata at all.
        (&|l: &Layout| l.sb_region.start + 1, magic::POINTER),
        // An inode image aimed at a bitmap block.
        (&|l: &Layout| l.fb_bitmap.start, magic::INODE),
    ] {
        let (disk, ds) = fresh();
        let l = ds.layout().unwrap();
        ds.unmount().unwrap();
        drop(ds);
        let home = home_of(&l);
        let (mut j, _) = Journal::replay(&*disk, &l).unwrap();
        let mut img = vec![0u8; MD_BLOCK];
        put_u32(&mut img, 0, m);
        let before = disk.image();
        j.commit(&*disk, &mut [(home, img)]).unwrap();
        let after_commit = disk.image();
        assert!(matches!(
            Datastore::mount(disk.clone()),
            Err(FsError::Journal(JournalError::BadHome(h))) if h == home
        ));
        assert!(disk.image() == after_commit, "replay wrote something");
        assert!(before != after_commit);
    }
}

/// A populated image (files of every layout, a directory, xattrs) and its layout.
fn base_image() -> (Vec<u8>, Layout, Vec<u64>) {
    static BASE: std::sync::OnceLock<(Vec<u8>, Layout, Vec<u64>)> = std::sync::OnceLock::new();
    BASE.get_or_init(|| {
        let (disk, ds) = fresh();
        let r = ds
            .create_file("r", Provisioning::Thin, 0, &mut |_, _| {})
            .unwrap();
        ds.write(r, 0, b"resident").unwrap();
        let s = ds
            .create_file("s", Provisioning::Thin, 0, &mut |_, _| {})
            .unwrap();
        ds.write(s, 0, &vec![3u8; 200_000]).unwrap();
        let f = disk_file(&ds, "f", 3);
        let l = ds.create_file("lazy", Provisioning::ThickLazy, 3 << 20, &mut |_, _| {});
        let d = ds.mkdir("d").unwrap();
        ds.setxattr(f, b"user.k", b"v", crate::XattrSetMode::Any)
            .unwrap();
        let layout = ds.layout().unwrap();
        ds.unmount().unwrap();
        (disk.image(), layout, vec![ROOT_INO, r, s, f, l.unwrap(), d])
    })
    .clone()
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
    /// Any inode or pointer block of a real image, changed anywhere past its header and
    /// re-sealed: mount, reads, writes, truncation, removal and fsck give results or errors,
    /// never a panic; nothing reaches past the device.
    #[test]
    fn mutated_metadata_never_panics(
        which in 0usize..6,
        pb in proptest::prelude::any::<bool>(),
        muts in proptest::collection::vec(
            (MD_HEADER_BYTES..MD_BLOCK, proptest::prelude::any::<u64>()), 1..6),
    ) {
        let (img, l, inos) = base_image();
        let disk = Arc::new(SimDisk::from_image(img));
        let ino = inos[which];
        let mut at = l.inode_block(ino);
        if pb {
            let mut b = vec![0u8; MD_BLOCK];
            disk.read_at(at * MD_BLOCK as u64, &mut b).unwrap();
            if b[INODE_LAYOUT_OFFSET] == DataLayout::FileBlocks as u8 && inode_addr(&b, 0) != 0 {
                at = l.pb_block(inode_addr(&b, 0) - 1);
            }
        }
        reseal(&*disk, at, |b| {
            for &(i, v) in &muts {
                // Whole 8-byte fields (block numbers, sizes) or single bytes.
                let i = i & !7;
                if v & 1 == 0 {
                    put_u64(b, i, v >> 1);
                } else {
                    b[i] = (v >> 8) as u8;
                }
            }
        });
        let _ = crate::fsck::fsck(&*disk);
        if let Ok(ds) = Datastore::mount(disk.clone()) {
            let mut buf = vec![0u8; 300_000];
            for &i in &inos {
                let _ = ds.read(i, 0, &mut buf);
                let _ = ds.read(i, 1 << 20, &mut buf[..4096]);
                let _ = ds.map_direct(i, 0, 4096);
                let _ = ds.write(i, 4096, b"data");
                let _ = ds.listxattr(i);
                let _ = ds.readdir("/");
            }
            let _ = ds.set_size(ino, 1);
            let _ = ds.unlink("f");
            let _ = ds.rmdir("d");
            let _ = ds.write(inos[2], 0, &vec![1u8; 2 << 20]);
            let _ = ds.unmount();
        }
        let _ = crate::fsck::fsck(&*disk);
    }
}
