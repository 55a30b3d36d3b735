//! Tests of the datastore's extent mappings ([`Datastore::map`]) and commit policy
//! ([`CommitPolicy`], [`Datastore::commit_if_due`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::commit::{CommitPolicy, MAX_AGE_DEFAULT, TICK_DEFAULT, TXN_SOFT_MAX};
use crate::format::*;
use crate::fs::{Datastore, FsError, WriteSeg};
use crate::fs_tests::{assert_clean, fresh};
use crate::ns::{Extent, SetAttr};

fn busy<T>(r: Result<T, FsError>) {
    assert!(matches!(r, Err(FsError::Busy(_))), "{:?}", r.map(|_| ()));
}

fn truncate_to(size: u64) -> SetAttr {
    SetAttr {
        size: Some(size),
        ..SetAttr::default()
    }
}

fn commits(ds: &Datastore) -> u64 {
    ds.stats.commits.load(Ordering::Relaxed)
}

/// A mapping's device extents hold the file's bytes, its hole reads as zero extents, and
/// while the lease lives nothing mapped can be freed, moved or truncated; growing works.
#[test]
fn map_returns_extents_held_until_the_lease_drops() {
    let (disk, ds) = fresh();
    let ds = Arc::new(ds);
    let f = ds
        .make_node(ROOT_INO, b"disk.img", S_IFREG | 0o644, 0, 0, 0)
        .unwrap();
    ds.write_at(f.ino, 0, &vec![7u8; 3 << 20]).unwrap();
    ds.setattr(f.ino, &truncate_to(5 << 20)).unwrap();
    let (m, lease) = ds.map(f.ino, 0..(6 << 20)).unwrap();
    assert_eq!(m.len, 5 << 20, "clipped at the end of the file");
    assert_eq!(ds.lease_count(f.ino), 1);
    let mut pos = 0u64;
    for e in &m.extents {
        match e {
            Extent::Device { offset, len } => {
                assert!(pos + len <= 3 << 20, "device extent over the hole");
                let mut buf = vec![0u8; *len as usize];
                ds.device().read_at(*offset, &mut buf).unwrap();
                assert!(buf.iter().all(|&b| b == 7));
                pos += len;
            }
            Extent::Zero { len } => {
                assert!(pos >= 3 << 20, "zero extent over written data");
                pos += len;
            }
            Extent::Inline(_) => panic!("inline extent in a file-block file"),
        }
    }
    assert_eq!(pos, 5 << 20);
    busy(ds.setattr(f.ino, &truncate_to(0)));
    busy(ds.set_size(f.ino, 1 << 20));
    busy(ds.punch_hole(f.ino, 0, 1 << 20));
    busy(ds.unlink("disk.img"));
    ds.setattr(f.ino, &truncate_to(8 << 20)).unwrap();
    ds.allocate(f.ino, 5 << 20, 1 << 20, false).unwrap();
    let (again, lease2) = ds.map(f.ino, 0..(3 << 20)).unwrap();
    assert_eq!(
        again
            .extents
            .iter()
            .find(|e| matches!(e, Extent::Device { .. })),
        m.extents.first(),
        "a mapped block moved"
    );
    drop(lease);
    busy(ds.setattr(f.ino, &truncate_to(0)));
    drop(lease2);
    assert_eq!(ds.lease_count(f.ino), 0);
    ds.setattr(f.ino, &truncate_to(0)).unwrap();
    ds.unmount().unwrap();
    assert_clean(&*disk);
}

/// Resident data is copied out inline; a range past the end maps nothing but still leases.
#[test]
fn map_of_resident_data_and_past_the_end() {
    let (_disk, ds) = fresh();
    let ds = Arc::new(ds);
    let f = ds
        .make_node(ROOT_INO, b"small", S_IFREG | 0o644, 0, 0, 0)
        .unwrap();
    ds.write_at(f.ino, 0, b"hello").unwrap();
    let (m, lease) = ds.map(f.ino, 1..100).unwrap();
    assert_eq!(m.len, 4);
    assert_eq!(m.extents, vec![Extent::Inline(b"ello".to_vec())]);
    drop(lease);
    let (m, lease) = ds.map(f.ino, 10..20).unwrap();
    assert_eq!((m.len, m.extents.len()), (0, 0));
    assert_eq!(ds.lease_count(f.ino), 1);
    drop(lease);
    assert_eq!(ds.lease_count(f.ino), 0);
    let d = ds
        .make_node(ROOT_INO, b"dir", S_IFDIR | 0o755, 0, 0, 0)
        .unwrap();
    assert!(matches!(ds.map(d.ino, 0..1), Err(FsError::IsDir(_))));
    assert_eq!(ds.lease_count(d.ino), 0, "a failed map leases nothing");
}

/// A file unlinked while mapped keeps its blocks until the mapping's lease drops.
#[test]
fn mapped_file_unlinked_is_freed_at_the_lease_drop() {
    let (disk, ds) = fresh();
    let ds = Arc::new(ds);
    let f = ds
        .make_node(ROOT_INO, b"f", S_IFREG | 0o644, 0, 0, 0)
        .unwrap();
    ds.write_at(f.ino, 0, &vec![1u8; 2 << 20]).unwrap();
    let free0 = ds.statfs().unwrap().fb_free;
    let (_, lease) = ds.map(f.ino, 0..(2 << 20)).unwrap();
    ds.unlink_at(ROOT_INO, b"f").unwrap();
    ds.commit().unwrap();
    assert_eq!(ds.stat(f.ino).unwrap().nlink, 0);
    assert_eq!(ds.statfs().unwrap().fb_free, free0);
    drop(lease);
    assert!(ds.stat(f.ino).is_err());
    ds.commit().unwrap();
    assert_eq!(ds.statfs().unwrap().fb_free, free0 + 2);
    ds.unmount().unwrap();
    assert_clean(&*disk);
}

#[test]
fn commit_policy_defaults_and_limits() {
    let p = CommitPolicy::default();
    assert_eq!(
        (p.max_age, p.tick, p.deferred, p.soft_max()),
        (MAX_AGE_DEFAULT, TICK_DEFAULT, false, TXN_SOFT_MAX)
    );
    assert!(CommitPolicy::serving().deferred);
    let tiny = CommitPolicy {
        txn_soft_max: 1,
        ..p
    };
    assert!(tiny.soft_max() > 1 && tiny.soft_max() <= TXN_SOFT_MAX);
    let huge = CommitPolicy {
        txn_soft_max: usize::MAX,
        ..p
    };
    assert_eq!(huge.soft_max(), TXN_SOFT_MAX);
    assert!(p.due(MAX_AGE_DEFAULT) && !p.due(MAX_AGE_DEFAULT / 2));
    let (_disk, ds) = fresh();
    assert_eq!(ds.commit_policy().unwrap(), p);
    ds.set_deferred_commit(true);
    assert!(ds.commit_policy().unwrap().deferred);
}

/// Deferred namespace operations stay in the open transaction until it is due; then
/// `commit_if_due` commits it, once.
#[test]
fn commit_if_due_follows_the_policy_age() {
    let (disk, ds) = fresh();
    ds.set_commit_policy(CommitPolicy {
        max_age: Duration::from_secs(3600),
        ..CommitPolicy::serving()
    })
    .unwrap();
    let c0 = commits(&ds);
    ds.make_node(ROOT_INO, b"a", S_IFREG | 0o644, 0, 0, 0)
        .unwrap();
    assert_eq!(commits(&ds), c0, "a deferred operation committed");
    assert!(!ds.commit_if_due().unwrap());
    assert_eq!(commits(&ds), c0);
    ds.set_commit_policy(CommitPolicy {
        max_age: Duration::ZERO,
        ..CommitPolicy::serving()
    })
    .unwrap();
    assert!(ds.commit_if_due().unwrap());
    assert_eq!(commits(&ds), c0 + 1);
    assert!(!ds.commit_if_due().unwrap(), "nothing left to commit");
    ds.unmount().unwrap();
    assert_clean(&*disk);
}

/// Allocating deferred writes commit by themselves once the open transaction is older than
/// the policy's max age (the disk backend needs no timer of its own for that).
#[test]
fn deferred_batches_commit_when_due() {
    let (disk, ds) = fresh();
    let ino = ds
        .create_file("d.img", Provisioning::Thin, 8 << 20, &mut |_, _| {})
        .unwrap();
    let data = vec![3u8; 4096];
    let seg = |fbi: u64| WriteSeg {
        ino,
        offset: fbi * FILE_BLOCK,
        data: &data,
    };
    ds.set_commit_policy(CommitPolicy {
        max_age: Duration::from_secs(3600),
        ..CommitPolicy::default()
    })
    .unwrap();
    let c0 = commits(&ds);
    ds.write_batch_deferred(&[seg(0)]).unwrap();
    ds.write_batch_deferred(&[seg(1)]).unwrap();
    assert_eq!(commits(&ds), c0, "committed before the max age");
    ds.set_commit_policy(CommitPolicy {
        max_age: Duration::ZERO,
        ..CommitPolicy::default()
    })
    .unwrap();
    ds.write_batch_deferred(&[seg(2)]).unwrap();
    assert_eq!(commits(&ds), c0 + 1, "one commit for the three batches");
    ds.unmount().unwrap();
    assert_clean(&*disk);
}
