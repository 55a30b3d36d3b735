//! Behaviour tests of the datastore on the simulated disk.

use std::sync::Arc;

use crate::device::{BlockDevice, SimDisk};
use crate::format::*;
use crate::fs::{Datastore, FsError, MkfsOptions, WriteSeg};
use crate::fsck::fsck;

pub(crate) const VOL: u64 = 96 << 20;

pub(crate) fn fresh() -> (Arc<SimDisk>, Datastore) {
    let disk = Arc::new(SimDisk::new(VOL));
    Datastore::mkfs(disk.clone(), &MkfsOptions { uuid: None }, &mut |_, _| {}).unwrap();
    let ds = Datastore::mount(disk.clone()).unwrap();
    (disk, ds)
}

pub(crate) fn assert_clean(dev: &dyn BlockDevice) {
    let r = fsck(dev).unwrap();
    assert!(r.clean(), "fsck problems: {:#?}", r.problems);
}

#[test]
fn mkfs_mount_fsck_clean() {
    let (disk, ds) = fresh();
    assert_eq!(ds.readdir("/").unwrap().len(), 0);
    let st = ds.statfs().unwrap();
    assert_eq!(st.fb_free, st.fb_total);
    ds.unmount().unwrap();
    assert_clean(&*disk);
}

#[test]
fn thin_file_allocates_on_first_write() {
    let (disk, ds) = fresh();
    let ino = ds
        .create_file("vm1.img", Provisioning::Thin, 10 << 20, &mut |_, _| {})
        .unwrap();
    let free0 = ds.statfs().unwrap().fb_free;
    let mut buf = vec![1u8; 8192];
    ds.read(ino, 5 << 20, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    ds.write(ino, (5 << 20) + 4096, &[7u8; 4096]).unwrap();
    assert_eq!(ds.statfs().unwrap().fb_free, free0 - 1);
    ds.read(ino, 5 << 20, &mut buf).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0));
    assert!(buf[4096..].iter().all(|&b| b == 7));
    // Written space now takes the direct path.
    assert!(ds.map_direct(ino, 5 << 20, 4096).unwrap().is_some());
    assert!(ds.map_direct(ino, 6 << 20, 4096).unwrap().is_none());
    assert!(matches!(
        ds.write_batch(&[WriteSeg {
            ino,
            offset: 10 << 20,
            data: &[1]
        }]),
        Err(FsError::Invalid(_))
    ));
    ds.unmount().unwrap();
    assert_clean(&*disk);
}

#[test]
fn thick_lazy_reads_zero_and_eager_is_zeroed() {
    let (disk, ds) = fresh();
    let free0 = ds.statfs().unwrap().fb_free;
    let lazy = ds
        .create_file("lazy.img", Provisioning::ThickLazy, 4 << 20, &mut |_, _| {})
        .unwrap();
    let eager = ds
        .create_file(
            "eager.img",
            Provisioning::ThickEager,
            3 << 20,
            &mut |_, _| {},
        )
        .unwrap();
    assert_eq!(ds.statfs().unwrap().fb_free, free0 - 7);
    let mut buf = vec![9u8; 4096];
    ds.read(lazy, 1 << 20, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    // A to-be-zeroed block is not on the direct path until its first write zeroes it.
    assert!(ds.map_direct(lazy, 0, 4096).unwrap().is_none());
    ds.write(lazy, 100, b"hello").unwrap();
    assert!(ds.map_direct(lazy, 0, 4096).unwrap().is_some());
    assert!(ds.map_direct(eager, 0, 4096).unwrap().is_some());
    assert_eq!(ds.statfs().unwrap().fb_free, free0 - 7);
    ds.unmount().unwrap();
    assert_clean(&*disk);
}

#[test]
fn small_files_grow_through_layouts() {
    let (disk, ds) = fresh();
    let ino = ds
        .create_file("notes.txt", Provisioning::Thin, 0, &mut |_, _| {})
        .unwrap();
    let mut model = Vec::new();
    for (i, step) in [100usize, 3000, 5000, 70_000, 500_000, 1_200_000]
        .iter()
        .enumerate()
    {
        let data: Vec<u8> = (0..*step).map(|k| (k * 31 + i) as u8).collect();
        let off = model.len() as u64 / 2;
        ds.write(ino, off, &data).unwrap();
        let end = off as usize + data.len();
        if model.len() < end {
            model.resize(end, 0);
        }
        model[off as usize..end].copy_from_slice(&data);
        let mut back = vec![0u8; model.len()];
        assert_eq!(ds.read(ino, 0, &mut back).unwrap(), model.len());
        assert_eq!(back, model, "after step {i}");
    }
    assert_eq!(ds.stat(ino).unwrap().layout, DataLayout::FileBlocks);
    ds.set_size(ino, 10).unwrap();
    ds.set_size(ino, 5000).unwrap();
    let mut back = vec![1u8; 5000];
    ds.read(ino, 0, &mut back).unwrap();
    assert_eq!(&back[..10], &model[..10]);
    assert!(back[10..].iter().all(|&b| b == 0));
    ds.unmount().unwrap();
    assert_clean(&*disk);
}

#[test]
fn directories_rename_unlink() {
    let (disk, ds) = fresh();
    ds.mkdir("a").unwrap();
    ds.mkdir("a/b").unwrap();
    ds.create_file("a/b/f", Provisioning::Thin, 2 << 20, &mut |_, _| {})
        .unwrap();
    ds.create_file("a/g", Provisioning::Thin, 0, &mut |_, _| {})
        .unwrap();
    assert!(matches!(ds.mkdir("a/b"), Err(FsError::Exists(_))));
    assert!(matches!(ds.rmdir("a"), Err(FsError::NotEmpty(_))));
    assert!(matches!(ds.unlink("a/b"), Err(FsError::IsDir(_))));
    assert!(matches!(ds.rename("a", "a/b/c"), Err(FsError::Invalid(_))));
    ds.rename("a/b", "b2").unwrap();
    let ino = ds.lookup("b2/f").unwrap();
    ds.write(ino, 0, &[5u8; 100]).unwrap();
    ds.rename("a/g", "b2/f").unwrap();
    assert_eq!(ds.readdir("b2").unwrap().len(), 1);
    ds.unlink("b2/f").unwrap();
    ds.rmdir("b2").unwrap();
    ds.unlink("a/b/x").unwrap_err();
    assert_eq!(ds.readdir("/").unwrap().len(), 1);
    ds.unmount().unwrap();
    assert_clean(&*disk);
    // Freed space is back after remount.
    let ds = Datastore::mount(disk.clone()).unwrap();
    let st = ds.statfs().unwrap();
    assert_eq!(st.fb_free, st.fb_total);
}

#[test]
fn freed_blocks_not_reused_before_commit_and_open_files_protected() {
    let (_disk, ds) = fresh();
    let ino = ds
        .create_file("d.img", Provisioning::ThickLazy, 2 << 20, &mut |_, _| {})
        .unwrap();
    ds.open(ino).unwrap();
    assert!(matches!(ds.unlink("d.img"), Err(FsError::Busy(_))));
    assert!(matches!(ds.set_size(ino, 1 << 20), Err(FsError::Busy(_))));
    // Hot grow while open.
    ds.set_size(ino, 3 << 20).unwrap();
    assert_eq!(ds.stat(ino).unwrap().size, 3 << 20);
    ds.close(ino);
    ds.unlink("d.img").unwrap();
}

#[test]
fn batched_write_is_one_commit_and_matches_naive() {
    let segs_data: Vec<(u64, Vec<u8>)> = (0..40u64)
        .map(|i| {
            (
                (((i * 7919) % 60) << 20) | ((i * 512) % 4096 * 8),
                vec![i as u8 + 1; 8192],
            )
        })
        .collect();
    let mut images = Vec::new();
    for batching in [true, false] {
        let (disk, ds) = fresh();
        ds.set_batching(batching);
        let ino = ds
            .create_file("d", Provisioning::Thin, 64 << 20, &mut |_, _| {})
            .unwrap();
        let before = ds.stats.commits.load(std::sync::atomic::Ordering::Relaxed);
        let segs: Vec<WriteSeg<'_>> = segs_data
            .iter()
            .map(|(o, d)| WriteSeg {
                ino,
                offset: *o,
                data: d,
            })
            .collect();
        ds.write_batch(&segs).unwrap();
        let commits = ds.stats.commits.load(std::sync::atomic::Ordering::Relaxed) - before;
        if batching {
            assert_eq!(commits, 1);
        } else {
            assert!(commits >= 30, "{commits}");
        }
        let mut content = vec![0u8; 64 << 20];
        ds.read(ino, 0, &mut content).unwrap();
        images.push(content);
        ds.unmount().unwrap();
        assert_clean(&*disk);
    }
    assert!(images[0] == images[1]);
}

#[test]
fn bad_images_fail_mount_cleanly() {
    let (disk, ds) = fresh();
    ds.unmount().unwrap();
    drop(ds);
    let img = disk.image();
    // Not a datastore.
    let zero = Arc::new(SimDisk::new(VOL));
    assert!(matches!(Datastore::mount(zero), Err(FsError::Mount(_))));
    // Truncated.
    let short = Arc::new(SimDisk::from_image(img[..(VOL / 2) as usize].to_vec()));
    assert!(Datastore::mount(short).is_err());
    // Primary header damaged: the backup is used and the primary repaired.
    let mut bad = img.clone();
    bad[100] ^= 0xff;
    let d = Arc::new(SimDisk::from_image(bad));
    let ds = Datastore::mount(d.clone()).unwrap();
    ds.unmount().unwrap();
    assert_clean(&*d);
    // Both headers damaged.
    let mut bad = img.clone();
    bad[100] ^= 0xff;
    bad[4096 + 100] ^= 0xff;
    assert!(matches!(
        Datastore::mount(Arc::new(SimDisk::from_image(bad))),
        Err(FsError::Mount(_))
    ));
    // Random garbage over the metadata never panics.
    for seed in 0..20u64 {
        let mut g = img.clone();
        let mut x = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
        for _ in 0..64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = (x % (12 << 20)) as usize;
            g[at] ^= (x >> 32) as u8 | 1;
        }
        let d = Arc::new(SimDisk::from_image(g));
        let _ = fsck(&*d).unwrap();
        if let Ok(ds) = Datastore::mount(d) {
            let _ = ds.readdir("/");
            let _ = ds.create_file("x", Provisioning::Thin, 3 << 20, &mut |_, _| {});
        }
    }
}

#[test]
fn fsck_finds_damage() {
    let (disk, ds) = fresh();
    let ino = ds
        .create_file("f", Provisioning::ThickLazy, 2 << 20, &mut |_, _| {})
        .unwrap();
    ds.unmount().unwrap();
    let layout = ds.layout().unwrap();
    drop(ds);
    // Flip a byte in the inode block.
    let at = layout.inode_block(ino) * MD_BLOCK as u64 + 500;
    let mut b = [0u8; 1];
    disk.read_at(at, &mut b).unwrap();
    disk.write_at(at, &[b[0] ^ 1]).unwrap();
    let r = fsck(&*disk).unwrap();
    assert!(!r.clean());
    assert!(
        r.problems.iter().any(|p| p.contains("inode")),
        "{:?}",
        r.problems
    );
}

#[test]
fn fsck_recover_replays_a_crashed_journal_then_checks_clean() {
    let (disk, ds) = fresh();
    ds.mkdir("d").unwrap();
    // A crash: the journal still holds the committed transactions.
    drop(ds);
    assert!(crate::fsck::journal_pending(&*disk).unwrap());
    assert!(!crate::fsck::fsck(&*disk).unwrap().clean());
    let rep = crate::fsck::recover(disk.clone()).unwrap();
    assert!(rep.transactions > 0);
    assert!(!crate::fsck::journal_pending(&*disk).unwrap());
    assert_clean(&*disk);
    let ds = Datastore::mount(disk.clone()).unwrap();
    assert!(ds.lookup("d").is_ok());
}
