//! Tests of the POSIX namespace API (ns.rs): every operation, timestamps, link counts,
//! orphans, rename semantics, xattrs, the data path, deferred commits with crashes, and the
//! 10 000-file directory.

use std::sync::Arc;

use crate::device::{BlockDevice, FileDevice, SimDisk, SimOp};
use crate::format::*;
use crate::fs::{Datastore, FsError, MkfsOptions};
use crate::fsck::fsck;
use crate::ns::*;

const VOL: u64 = 96 << 20;

fn fresh() -> (Arc<SimDisk>, Datastore) {
    let disk = Arc::new(SimDisk::new(VOL));
    Datastore::mkfs(disk.clone(), &MkfsOptions { uuid: None }, &mut |_, _| {}).unwrap();
    let ds = Datastore::mount(disk.clone()).unwrap();
    (disk, ds)
}

fn clean(dev: &dyn BlockDevice) {
    let r = fsck(dev).unwrap();
    assert!(r.clean(), "fsck: {:?}", r.problems);
}

fn remount(disk: &Arc<SimDisk>, ds: Datastore) -> Datastore {
    ds.unmount().unwrap();
    drop(ds);
    clean(&**disk);
    Datastore::mount(disk.clone()).unwrap()
}

fn names(ds: &Datastore, dir: u64) -> Vec<String> {
    let mut v: Vec<String> = ds
        .read_dir_from(dir, 0, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|e| e.entry.name)
        .collect();
    v.sort();
    v
}

#[test]
fn node_types_lookup_and_names() {
    let (disk, ds) = fresh();
    let r = ROOT_INO;
    let f = ds.make_node(r, b"f", S_IFREG | 0o640, 0, 7, 8).unwrap();
    assert_eq!(
        (f.mode, f.uid, f.gid, f.nlink, f.size),
        (S_IFREG | 0o640, 7, 8, 1, 0)
    );
    assert_eq!(f.atime_ns, f.mtime_ns);
    let d = ds.make_node(r, b"d", S_IFDIR | 0o755, 0, 0, 0).unwrap();
    assert_eq!(d.nlink, 2);
    assert_eq!(ds.stat(r).unwrap().nlink, 3);
    let c = ds
        .make_node(d.ino, b"c", S_IFCHR | 0o600, 0x0501, 0, 0)
        .unwrap();
    assert_eq!(c.rdev, 0x0501);
    ds.make_node(d.ino, b"b", S_IFBLK | 0o600, 3, 0, 0).unwrap();
    ds.make_node(d.ino, b"p", S_IFIFO | 0o600, 3, 0, 0).unwrap();
    let s = ds
        .make_node(d.ino, b"s", S_IFSOCK | 0o600, 0, 0, 0)
        .unwrap();
    assert_eq!(s.rdev, 0);
    assert_eq!(ds.lookup_at(d.ino, b"c").unwrap().ino, c.ino);
    assert!(matches!(
        ds.lookup_at(d.ino, b"x"),
        Err(FsError::NotFound(_))
    ));
    assert!(matches!(
        ds.make_node(r, b"f", S_IFREG, 0, 0, 0),
        Err(FsError::Exists(_))
    ));
    assert!(matches!(
        ds.make_node(f.ino, b"x", S_IFREG, 0, 0, 0),
        Err(FsError::NotDir(_))
    ));
    for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b"] {
        let e = ds.make_node(r, bad, S_IFREG, 0, 0, 0).unwrap_err();
        assert!(matches!(e, FsError::InvalidName(_)), "{bad:?}: {e}");
        assert_eq!(e.errno(), libc::EINVAL);
    }
    let long = vec![b'a'; NAME_MAX + 1];
    assert_eq!(
        ds.make_node(r, &long, S_IFREG, 0, 0, 0)
            .unwrap_err()
            .errno(),
        libc::ENAMETOOLONG
    );
    ds.make_node(r, &long[..NAME_MAX], S_IFREG, 0, 0, 0)
        .unwrap();
    let ds = remount(&disk, ds);
    let e = ds.read_dir_from(d.ino, 0, 100).unwrap();
    let types: Vec<u8> = e.iter().map(|e| e.entry.ftype).collect();
    assert_eq!(types, vec![4, 5, 6, 7]);
    assert_eq!(ds.lookup_at(d.ino, b"c").unwrap().rdev, 0x0501);
}

#[test]
fn timestamps_follow_linux() {
    let (_disk, ds) = fresh();
    let r = ROOT_INO;
    let d = ds.make_node(r, b"d", S_IFDIR | 0o755, 0, 0, 0).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2));
    let f = ds.make_node(d.ino, b"f", S_IFREG | 0o644, 0, 0, 0).unwrap();
    let dd = ds.stat(d.ino).unwrap();
    assert_eq!(dd.mtime_ns, f.ctime_ns);
    assert_eq!(dd.ctime_ns, f.ctime_ns);
    assert!(dd.mtime_ns > d.mtime_ns);
    std::thread::sleep(std::time::Duration::from_millis(2));
    // link: inode ctime, new parent mtime/ctime; the inode's mtime is untouched.
    let l = ds.link_at(f.ino, r, b"l").unwrap();
    assert_eq!(l.nlink, 2);
    assert!(l.ctime_ns > f.ctime_ns);
    assert_eq!(l.mtime_ns, f.mtime_ns);
    assert_eq!(ds.stat(r).unwrap().mtime_ns, l.ctime_ns);
    std::thread::sleep(std::time::Duration::from_millis(2));
    // chmod: ctime only, attr_gen bumps.
    let c = ds
        .setattr(
            f.ino,
            &SetAttr {
                mode: Some(0o600),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(c.mode, S_IFREG | 0o600);
    assert!(c.ctime_ns > l.ctime_ns);
    assert_eq!(c.mtime_ns, f.mtime_ns);
    assert!(c.attr_gen > l.attr_gen);
    // truncate to the same size: no change; to a new size: mtime and ctime.
    let t = ds
        .setattr(
            f.ino,
            &SetAttr {
                size: Some(0),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!((t.mtime_ns, t.ctime_ns), (c.mtime_ns, c.ctime_ns));
    std::thread::sleep(std::time::Duration::from_millis(2));
    let t = ds
        .setattr(
            f.ino,
            &SetAttr {
                size: Some(10),
                ..Default::default()
            },
        )
        .unwrap();
    assert!(t.mtime_ns > c.mtime_ns && t.ctime_ns == t.mtime_ns);
    // explicit times
    let u = ds
        .setattr(
            f.ino,
            &SetAttr {
                atime: Some(TimeSet::At(5)),
                mtime: Some(TimeSet::At(6)),
                ctime: Some(TimeSet::At(7)),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!((u.atime_ns, u.mtime_ns, u.ctime_ns), (5, 6, 7));
    std::thread::sleep(std::time::Duration::from_millis(2));
    // unlink: target ctime, parent mtime/ctime.
    ds.unlink_at(r, b"l").unwrap();
    let after = ds.stat(f.ino).unwrap();
    assert_eq!(after.nlink, 1);
    assert!(after.ctime_ns > t.ctime_ns);
    assert_eq!(ds.stat(r).unwrap().mtime_ns, after.ctime_ns);
    // write: mtime/ctime
    std::thread::sleep(std::time::Duration::from_millis(2));
    let w = ds.write_at(f.ino, 0, b"hello").unwrap();
    assert!(w.mtime_ns > after.ctime_ns);
    // chown bumps attr_gen
    let o = ds
        .setattr(
            f.ino,
            &SetAttr {
                uid: Some(3),
                gid: Some(4),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!((o.uid, o.gid), (3, 4));
    assert!(o.attr_gen >= w.attr_gen + 2);
}

#[test]
fn hard_links_symlinks_and_errors() {
    let (disk, ds) = fresh();
    let r = ROOT_INO;
    let d = ds.make_node(r, b"d", S_IFDIR | 0o755, 0, 0, 0).unwrap();
    let f = ds.make_node(r, b"f", S_IFREG | 0o644, 0, 0, 0).unwrap();
    ds.write_at(f.ino, 0, b"data").unwrap();
    ds.link_at(f.ino, d.ino, b"g").unwrap();
    assert_eq!(
        ds.link_at(d.ino, r, b"dl").unwrap_err().errno(),
        libc::EPERM
    );
    assert_eq!(
        ds.link_at(f.ino, r, b"f").unwrap_err().errno(),
        libc::EEXIST
    );
    ds.unlink_at(r, b"f").unwrap();
    let g = ds.lookup_at(d.ino, b"g").unwrap();
    assert_eq!((g.ino, g.nlink), (f.ino, 1));
    let mut buf = [0u8; 4];
    ds.read(g.ino, 0, &mut buf).unwrap();
    assert_eq!(&buf, b"data");
    assert_eq!(ds.unlink_at(r, b"d").unwrap_err().errno(), libc::EISDIR);
    assert_eq!(ds.rmdir_at(d.ino, b"g").unwrap_err().errno(), libc::ENOTDIR);
    assert_eq!(ds.rmdir_at(r, b"d").unwrap_err().errno(), libc::ENOTEMPTY);
    // Symlinks, small (resident) and long (sub-block).
    let s = ds.symlink_at(r, b"s", b"d/g", 1, 2).unwrap();
    assert_eq!((s.mode, s.size, s.uid), (S_IFLNK | 0o777, 3, 1));
    assert_eq!(ds.readlink(s.ino).unwrap(), b"d/g");
    let long: Vec<u8> = (0..SYMLINK_MAX).map(|i| b'a' + (i % 26) as u8).collect();
    let s2 = ds.symlink_at(r, b"s2", &long, 0, 0).unwrap();
    assert_eq!(ds.readlink(s2.ino).unwrap(), long);
    let too_long = vec![b'x'; SYMLINK_MAX + 1];
    assert_eq!(
        ds.symlink_at(r, b"s3", &too_long, 0, 0)
            .unwrap_err()
            .errno(),
        libc::ENAMETOOLONG
    );
    assert_eq!(ds.readlink(f.ino).unwrap_err().errno(), libc::EINVAL);
    let ds = remount(&disk, ds);
    assert_eq!(ds.readlink(s2.ino).unwrap(), long);
    ds.unlink_at(r, b"s2").unwrap();
    ds.unlink_at(d.ino, b"g").unwrap();
    ds.rmdir_at(r, b"d").unwrap();
    assert_eq!(ds.stat(r).unwrap().nlink, 2);
    let ds = remount(&disk, ds);
    assert_eq!(names(&ds, r), vec!["s".to_string()]);
}

#[test]
fn link_count_limit() {
    let (_disk, ds) = fresh();
    let f = ds
        .make_node(ROOT_INO, b"f", S_IFREG | 0o644, 0, 0, 0)
        .unwrap();
    // Pretend the file already has LINK_MAX links.
    ds.with(|g, dev| {
        let mut i = g.get_inode(dev, f.ino)?;
        i.nlink = LINK_MAX;
        g.put_inode(dev, &i)?;
        g.commit(dev, &ds.stats)
    })
    .unwrap();
    assert_eq!(
        ds.link_at(f.ino, ROOT_INO, b"g").unwrap_err().errno(),
        libc::EMLINK
    );
}

#[test]
fn unlink_while_open_keeps_an_orphan_until_close_or_mount() {
    let (disk, ds) = fresh();
    let r = ROOT_INO;
    let f = ds.make_node(r, b"f", S_IFREG | 0o644, 0, 0, 0).unwrap();
    ds.write_at(f.ino, 0, &vec![7u8; 200_000]).unwrap();
    ds.setxattr(f.ino, b"user.a", b"1", XattrSetMode::Any)
        .unwrap();
    let free0 = ds.statfs().unwrap();
    ds.open(f.ino).unwrap();
    ds.unlink_at(r, b"f").unwrap();
    let o = ds.stat(f.ino).unwrap();
    assert_eq!(o.nlink, 0);
    let mut buf = vec![0u8; 10];
    ds.read(f.ino, 199_990, &mut buf).unwrap();
    assert_eq!(buf, vec![7u8; 10]);
    // fsck sees the orphan.
    ds.commit().unwrap();
    assert!(fsck(&*disk)
        .unwrap()
        .problems
        .iter()
        .any(|p| p.contains("orphan")));
    ds.close(f.ino);
    assert!(ds.stat(f.ino).is_err());
    let ds = remount(&disk, ds);
    assert!(ds.statfs().unwrap().sb_free > free0.sb_free);
    // Crash with an open orphan: mount reclaims it.
    let g = ds.make_node(r, b"g", S_IFREG | 0o644, 0, 0, 0).unwrap();
    ds.write_at(g.ino, 0, &vec![1u8; 100_000]).unwrap();
    ds.open(g.ino).unwrap();
    ds.unlink_at(r, b"g").unwrap();
    ds.sync().unwrap();
    drop(ds); // a crash: no close, no unmount
    let ds = Datastore::mount(disk.clone()).unwrap();
    assert!(ds.stat(g.ino).is_err());
    ds.unmount().unwrap();
    clean(&*disk);
}

#[test]
fn rename_semantics() {
    let (disk, ds) = fresh();
    let r = ROOT_INO;
    let none = RenameFlags::default();
    let mk = |p: u64, n: &[u8], dir: bool| {
        ds.make_node(
            p,
            n,
            if dir {
                S_IFDIR | 0o755
            } else {
                S_IFREG | 0o644
            },
            0,
            0,
            0,
        )
        .unwrap()
    };
    let a = mk(r, b"a", true);
    let b = mk(r, b"b", true);
    let f = mk(a.ino, b"f", false);
    let g = mk(b.ino, b"g", false);
    let e = mk(r, b"e", true);
    // file over file
    std::thread::sleep(std::time::Duration::from_millis(2));
    ds.rename_at(a.ino, b"f", b.ino, b"g", none).unwrap();
    assert!(ds.stat(g.ino).is_err());
    assert_eq!(ds.lookup_at(b.ino, b"g").unwrap().ino, f.ino);
    assert!(ds.stat(f.ino).unwrap().ctime_ns > f.ctime_ns);
    assert!(ds.stat(a.ino).unwrap().mtime_ns > a.mtime_ns);
    // same inode: nothing happens
    ds.link_at(f.ino, r, b"h").unwrap();
    ds.rename_at(r, b"h", b.ino, b"g", none).unwrap();
    assert_eq!(ds.stat(f.ino).unwrap().nlink, 2);
    assert!(ds.lookup_at(r, b"h").is_ok());
    // dir over empty dir; parents' link counts and '..' follow
    ds.rename_at(r, b"a", b.ino, b"x", none).unwrap();
    assert_eq!(ds.stat(a.ino).unwrap().parent, b.ino);
    assert_eq!(ds.stat(b.ino).unwrap().nlink, 3);
    ds.rename_at(b.ino, b"x", r, b"e", none).unwrap();
    assert!(ds.stat(e.ino).is_err());
    assert_eq!(ds.stat(a.ino).unwrap().parent, r);
    assert_eq!(ds.stat(b.ino).unwrap().nlink, 2);
    assert_eq!(ds.stat(r).unwrap().nlink, 4); // a (named e), b
                                              // errors
    let c = mk(r, b"c", true);
    mk(c.ino, b"inside", false);
    assert_eq!(
        ds.rename_at(r, b"e", r, b"c", none).unwrap_err().errno(),
        libc::ENOTEMPTY
    );
    assert_eq!(
        ds.rename_at(r, b"e", r, b"h", none).unwrap_err().errno(),
        libc::ENOTDIR
    );
    assert_eq!(
        ds.rename_at(r, b"h", r, b"c", none).unwrap_err().errno(),
        libc::EISDIR
    );
    assert_eq!(
        ds.rename_at(r, b"c", c.ino, b"sub", none)
            .unwrap_err()
            .errno(),
        libc::EINVAL
    );
    assert_eq!(
        ds.rename_at(r, b"zz", r, b"y", none).unwrap_err().errno(),
        libc::ENOENT
    );
    let nr = RenameFlags {
        noreplace: true,
        exchange: false,
    };
    assert_eq!(
        ds.rename_at(r, b"h", b.ino, b"g", nr).unwrap_err().errno(),
        libc::EEXIST
    );
    assert_eq!(
        ds.rename_at(r, b"e", r, b"c", nr).unwrap_err().errno(),
        libc::EEXIST
    );
    ds.rename_at(r, b"h", r, b"h2", nr).unwrap();
    // exchange a file and a directory across parents
    let x = RenameFlags {
        noreplace: false,
        exchange: true,
    };
    assert_eq!(
        ds.rename_at(r, b"h2", r, b"nope", x).unwrap_err().errno(),
        libc::ENOENT
    );
    ds.rename_at(r, b"c", b.ino, b"g", x).unwrap();
    assert_eq!(ds.lookup_at(r, b"c").unwrap().ino, f.ino);
    assert_eq!(ds.lookup_at(b.ino, b"g").unwrap().ino, c.ino);
    assert_eq!(ds.stat(c.ino).unwrap().parent, b.ino);
    assert_eq!(ds.stat(b.ino).unwrap().nlink, 3);
    assert_eq!(ds.stat(r).unwrap().nlink, 4); // e, b, c -> e, b
                                              // exchange a dir into its own subtree is refused
    assert_eq!(
        ds.rename_at(b.ino, b"g", c.ino, b"inside", x)
            .unwrap_err()
            .errno(),
        libc::EINVAL
    );
    let ds = remount(&disk, ds);
    assert_eq!(names(&ds, r), vec!["b", "c", "e", "h2"]);
}

#[test]
fn xattrs_round_trip_and_limits() {
    let (disk, ds) = fresh();
    let f = ds
        .make_node(ROOT_INO, b"f", S_IFREG | 0o644, 0, 0, 0)
        .unwrap();
    assert_eq!(
        ds.getxattr(f.ino, b"user.a").unwrap_err().errno(),
        libc::ENODATA
    );
    assert!(ds.listxattr(f.ino).unwrap().is_empty());
    let pb0 = ds.stat(f.ino).unwrap().attr_gen;
    ds.setxattr(f.ino, b"user.a", b"1", XattrSetMode::CreateOnly)
        .unwrap();
    assert!(ds.stat(f.ino).unwrap().attr_gen > pb0);
    assert_eq!(
        ds.setxattr(f.ino, b"user.a", b"2", XattrSetMode::CreateOnly)
            .unwrap_err()
            .errno(),
        libc::EEXIST
    );
    assert_eq!(
        ds.setxattr(f.ino, b"user.b", b"2", XattrSetMode::ReplaceOnly)
            .unwrap_err()
            .errno(),
        libc::ENODATA
    );
    ds.setxattr(f.ino, b"user.a", b"22", XattrSetMode::ReplaceOnly)
        .unwrap();
    ds.setxattr(f.ino, b"user.b", b"", XattrSetMode::Any)
        .unwrap();
    assert_eq!(ds.getxattr(f.ino, b"user.a").unwrap(), b"22");
    assert_eq!(ds.getxattr(f.ino, b"user.b").unwrap(), b"");
    let big = vec![9u8; XATTR_VALUE_MAX];
    assert_eq!(
        ds.setxattr(f.ino, b"user.c", &big, XattrSetMode::Any)
            .unwrap_err()
            .errno(),
        libc::E2BIG
    );
    assert_eq!(
        ds.setxattr(
            f.ino,
            b"user.c",
            &vec![0; XATTR_VALUE_MAX + 1],
            XattrSetMode::Any
        )
        .unwrap_err()
        .errno(),
        libc::E2BIG
    );
    let ds = remount(&disk, ds);
    assert_eq!(
        ds.listxattr(f.ino).unwrap(),
        vec![b"user.a".to_vec(), b"user.b".to_vec()]
    );
    ds.removexattr(f.ino, b"user.a").unwrap();
    ds.removexattr(f.ino, b"user.b").unwrap();
    assert_eq!(
        ds.removexattr(f.ino, b"user.b").unwrap_err().errno(),
        libc::ENODATA
    );
    assert_eq!(ds.stat(f.ino).unwrap().xattr_block, 0);
    // One entry may fill the block exactly; then nothing else fits.
    ds.setxattr(f.ino, b"x", &big[..XATTR_VALUE_MAX], XattrSetMode::Any)
        .unwrap();
    ds.setxattr(f.ino, b"y", b"", XattrSetMode::Any)
        .unwrap_err();
    ds.removexattr(f.ino, b"x").unwrap();
    ds.setxattr(f.ino, b"z", &big[..100], XattrSetMode::Any)
        .unwrap();
    let ds = remount(&disk, ds);
    ds.unlink_at(ROOT_INO, b"f").unwrap();
    let _ = remount(&disk, ds);
}

#[test]
fn data_path_plan_seek_allocate_punch() {
    let (disk, ds) = fresh();
    let f = ds
        .make_node(ROOT_INO, b"f", S_IFREG | 0o644, 0, 0, 0)
        .unwrap();
    ds.write_at(f.ino, 0, b"abc").unwrap();
    let mut plan = Vec::new();
    assert_eq!(ds.read_plan(f.ino, 1, 100, &mut plan).unwrap().0, 2);
    assert_eq!(plan, vec![Extent::Inline(b"bc".to_vec())]);
    assert_eq!(ds.seek(f.ino, 0, Whence::Hole).unwrap(), 3);
    assert_eq!(
        ds.seek(f.ino, 3, Whence::Data).unwrap_err().errno(),
        libc::ENXIO
    );
    // Grows to sub-blocks with a hole in the middle.
    ds.write_at(f.ino, 300_000, b"xyz").unwrap();
    plan.clear();
    let n = ds.read_plan(f.ino, 0, u64::MAX, &mut plan).unwrap().0;
    assert_eq!(n, 300_003);
    let mut got = Vec::new();
    for e in &plan {
        match e {
            Extent::Device { offset, len } => {
                let mut b = vec![0u8; *len as usize];
                disk.read_at(*offset, &mut b).unwrap();
                got.extend(b);
            }
            Extent::Zero { len } => got.extend(vec![0u8; *len as usize]),
            Extent::Inline(b) => got.extend(b),
        }
    }
    let mut want = vec![0u8; 300_003];
    want[..3].copy_from_slice(b"abc");
    want[300_000..].copy_from_slice(b"xyz");
    assert_eq!(got, want);
    assert_eq!(ds.seek(f.ino, 10, Whence::Hole).unwrap(), SUB_BLOCK);
    assert_eq!(
        ds.seek(f.ino, SUB_BLOCK, Whence::Data).unwrap(),
        4 * SUB_BLOCK
    );
    // Punch: partial zeroes, whole blocks freed.
    ds.punch_hole(f.ino, 1, 1).unwrap();
    let sb_before = ds.statfs().unwrap().sb_free;
    ds.punch_hole(f.ino, 4 * SUB_BLOCK, SUB_BLOCK).unwrap();
    ds.commit().unwrap();
    assert_eq!(ds.statfs().unwrap().sb_free, sb_before + 1);
    let mut b = vec![9u8; 300_003];
    ds.read(f.ino, 0, &mut b).unwrap();
    want[1] = 0;
    want[300_000..].fill(0);
    assert_eq!(b, want);
    // fallocate past the end: size grows, blocks read zero, file-block layout.
    ds.allocate(f.ino, 0, 3 * FILE_BLOCK, false).unwrap();
    let i = ds.stat(f.ino).unwrap();
    assert_eq!(
        (i.size, i.layout, i.allocated),
        (3 * FILE_BLOCK, DataLayout::FileBlocks, 3)
    );
    ds.allocate(f.ino, 3 * FILE_BLOCK, FILE_BLOCK, true)
        .unwrap();
    let i = ds.stat(f.ino).unwrap();
    assert_eq!((i.size, i.allocated), (3 * FILE_BLOCK, 3));
    let mut b = vec![9u8; 8];
    ds.read(f.ino, 2 * FILE_BLOCK, &mut b).unwrap();
    assert_eq!(b, vec![0u8; 8]);
    ds.punch_hole(f.ino, FILE_BLOCK, FILE_BLOCK).unwrap();
    assert_eq!(
        ds.seek(f.ino, FILE_BLOCK, Whence::Data).unwrap(),
        2 * FILE_BLOCK
    );
    assert_eq!(ds.seek(f.ino, 0, Whence::Hole).unwrap(), FILE_BLOCK);
    assert!(ds
        .map_direct(f.ino, 2 * FILE_BLOCK, 4096)
        .unwrap()
        .is_some());
    ds.note_data_write(f.ino).unwrap();
    ds.setattr(
        f.ino,
        &SetAttr {
            size: Some(5),
            ..Default::default()
        },
    )
    .unwrap();
    let _ = remount(&disk, ds);
}

#[test]
fn read_dir_cookies_are_stable() {
    let (_disk, ds) = fresh();
    for i in 0..40 {
        ds.make_node(
            ROOT_INO,
            format!("n{i}").as_bytes(),
            S_IFREG | 0o644,
            0,
            0,
            0,
        )
        .unwrap();
    }
    let first = ds.read_dir_from(ROOT_INO, 0, 10).unwrap();
    assert_eq!(first.len(), 10);
    // Removing entries already returned does not shift the rest.
    ds.unlink_at(ROOT_INO, b"n0").unwrap();
    ds.unlink_at(ROOT_INO, b"n5").unwrap();
    let rest = ds
        .read_dir_from(ROOT_INO, first[9].cookie, usize::MAX)
        .unwrap();
    assert_eq!(rest.len(), 30);
    assert_eq!(rest[0].entry.name, "n10");
    assert!(rest.iter().all(|e| e.cookie != 0));
}

/// Deferred commits: operations stay in the open transaction; a crash at any write or flush
/// point leaves a consistent datastore holding a prefix of the synced operations.
#[test]
fn deferred_namespace_ops_survive_crashes() {
    let (disk, ds) = fresh();
    ds.set_deferred_commit(true);
    let base = disk.image();
    let log0 = disk.log_len();
    let r = ROOT_INO;
    let d = ds.make_node(r, b"d", S_IFDIR | 0o755, 0, 0, 0).unwrap();
    let f = ds.make_node(d.ino, b"f", S_IFREG | 0o644, 0, 0, 0).unwrap();
    ds.write_at(f.ino, 0, &vec![3u8; 70_000]).unwrap();
    ds.link_at(f.ino, r, b"hl").unwrap();
    ds.symlink_at(r, b"sl", b"d/f", 0, 0).unwrap();
    ds.setxattr(f.ino, b"user.k", b"v", XattrSetMode::Any)
        .unwrap();
    let flushes_before_sync = disk.flushes();
    ds.sync().unwrap();
    assert!(
        disk.flushes() - flushes_before_sync <= 3,
        "deferred ops must not flush each"
    );
    ds.rename_at(d.ino, b"f", r, b"g", RenameFlags::default())
        .unwrap();
    ds.open(f.ino).unwrap();
    ds.unlink_at(r, b"g").unwrap();
    ds.unlink_at(r, b"hl").unwrap();
    ds.rmdir_at(r, b"d").unwrap();
    ds.sync().unwrap();
    ds.close(f.ino);
    ds.sync().unwrap();
    let log = disk.log();
    let log = &log[log0..];
    let mut points: Vec<usize> = (0..=log.len()).collect();
    points.retain(|&i| i == log.len() || matches!(log.get(i), Some(SimOp::Flush)) || i % 3 == 0);
    let state = |ds: &Datastore| names(ds, ROOT_INO);
    for upto in points {
        for keep_all in [false, true] {
            let img = SimDisk::crash_image(&base, log, upto, &mut |_| keep_all, &mut |_| None);
            let disk2 = Arc::new(SimDisk::from_image(img));
            let ds2 = Datastore::mount(disk2.clone()).unwrap();
            let s = state(&ds2);
            let ok = [
                vec![],
                vec!["d".to_string(), "hl".into(), "sl".into()],
                vec!["sl".to_string()],
            ];
            assert!(ok.contains(&s), "crash at {upto}: {s:?}");
            if s.len() == 3 {
                let d2 = ds2.lookup_at(ROOT_INO, b"d").unwrap();
                let f2 = ds2.lookup_at(d2.ino, b"f").unwrap();
                assert_eq!(f2.nlink, 2);
                assert_eq!(ds2.getxattr(f2.ino, b"user.k").unwrap(), b"v");
            }
            ds2.unmount().unwrap();
            clean(&*disk2);
        }
    }
}

/// A failing deferred operation is undone without disturbing the other pending ones.
#[test]
fn deferred_failure_is_undone() {
    let (disk, ds) = fresh();
    ds.set_deferred_commit(true);
    let f = ds
        .make_node(ROOT_INO, b"f", S_IFREG | 0o644, 0, 0, 0)
        .unwrap();
    // Fill the inode table, then fail a creation half-way (no inode left).
    let mut n = 0;
    loop {
        match ds.make_node(ROOT_INO, format!("x{n}").as_bytes(), S_IFREG, 0, 0, 0) {
            Ok(_) => n += 1,
            Err(FsError::NoSpace(_)) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(ds.make_node(ROOT_INO, b"y", S_IFREG, 0, 0, 0).is_err());
    ds.write_at(f.ino, 0, b"ok").unwrap();
    let ds = remount(&disk, ds);
    assert_eq!(names(&ds, ROOT_INO).len(), n + 1);
}

/// 10 000 files created, stat'ed, chmod'ed and unlinked in one directory on a file-backed
/// datastore (the file server's metadata benchmark).
#[test]
fn ten_thousand_files_in_one_directory() {
    const N: usize = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ds");
    // Enough inodes: one per 4 MiB of (sparse) volume.
    let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::create(&path, 48 << 30).unwrap());
    Datastore::mkfs(dev.clone(), &MkfsOptions { uuid: None }, &mut |_, _| {}).unwrap();
    let ds = Datastore::mount(dev.clone()).unwrap();
    ds.set_deferred_commit(true);
    let d = ds
        .make_node(ROOT_INO, b"bench", S_IFDIR | 0o755, 0, 0, 0)
        .unwrap();
    let t = std::time::Instant::now();
    let mut inos = Vec::with_capacity(N);
    for i in 0..N {
        inos.push(
            ds.make_node(
                d.ino,
                format!("file{i}").as_bytes(),
                S_IFREG | 0o644,
                0,
                0,
                0,
            )
            .unwrap()
            .ino,
        );
    }
    let t_create = t.elapsed();
    for (i, &ino) in inos.iter().enumerate() {
        assert_eq!(
            ds.lookup_at(d.ino, format!("file{i}").as_bytes())
                .unwrap()
                .ino,
            ino
        );
        ds.setattr(
            ino,
            &SetAttr {
                mode: Some(0o600),
                ..Default::default()
            },
        )
        .unwrap();
    }
    let t_chmod = t.elapsed();
    assert_eq!(ds.read_dir_from(d.ino, 0, usize::MAX).unwrap().len(), N);
    for i in 0..N {
        ds.unlink_at(d.ino, format!("file{i}").as_bytes()).unwrap();
    }
    ds.sync().unwrap();
    let total = t.elapsed();
    println!("10000 files: create {t_create:?}, +stat+chmod {t_chmod:?}, +unlink+sync {total:?}");
    assert!(ds.read_dir_from(d.ino, 0, 10).unwrap().is_empty());
    ds.unmount().unwrap();
    drop(ds);
    let r = fsck(&*dev).unwrap();
    assert!(r.clean(), "{:?}", r.problems);
}

/// Issue 12 finding 2: the rule that a served file's blocks never move lives in vmfs. An
/// extent lease (a disk) refuses shrink, truncate (setattr size, O_TRUNC's path), punch and
/// removal, whoever asks; growing stays allowed and the blocks stay where they were.
#[test]
fn extent_lease_refuses_truncate_shrink_and_punch_but_allows_growth() {
    let (disk, ds) = fresh();
    let ds = Arc::new(ds);
    let f = ds
        .make_node(ROOT_INO, b"disk.img", S_IFREG | 0o644, 0, 0, 0)
        .unwrap();
    ds.write_at(f.ino, 0, &vec![7u8; 3 << 20]).unwrap();
    let where_ = |ds: &Datastore| {
        (0..3u64)
            .map(|i| ds.map_direct(f.ino, i << 20, 4096).unwrap().map(|(o, _)| o))
            .collect::<Vec<_>>()
    };
    let before = where_(&ds);
    assert!(before.iter().all(Option::is_some));
    let lease = ds.lease_extents(f.ino).unwrap();
    fn busy<T>(r: Result<T, FsError>) {
        assert!(matches!(r, Err(FsError::Busy(_))), "{:?}", r.map(|_| ()));
    }
    let trunc = SetAttr {
        size: Some(0),
        ..SetAttr::default()
    };
    busy(ds.setattr(f.ino, &trunc));
    busy(ds.set_size(f.ino, 1 << 20));
    busy(ds.punch_hole(f.ino, 0, 1 << 20));
    busy(ds.punch_hole(f.ino, 4096, 8192));
    busy(ds.unlink("disk.img"));
    // Growing is fine (thin: no blocks move).
    let grow = SetAttr {
        size: Some(8 << 20),
        ..SetAttr::default()
    };
    ds.setattr(f.ino, &grow).unwrap();
    ds.allocate(f.ino, 8 << 20, 1 << 20, false).unwrap();
    assert_eq!(where_(&ds), before, "a leased file's blocks moved");
    let mut buf = vec![0u8; 3 << 20];
    ds.read(f.ino, 0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 7));
    drop(lease);
    assert_eq!(ds.lease_count(f.ino), 0);
    ds.setattr(f.ino, &trunc).unwrap();
    ds.unmount().unwrap();
    clean(&*disk);
}

/// A READ's planned extents (and a direct WRITE's offset) are pinned until the caller drops
/// the pin: a truncation in between is refused instead of handing the blocks to another
/// file while the copy runs.
#[test]
fn planned_extents_are_pinned_until_dropped() {
    let (_disk, ds) = fresh();
    let f = ds
        .make_node(ROOT_INO, b"f", S_IFREG | 0o644, 0, 0, 0)
        .unwrap();
    ds.write_at(f.ino, 0, &vec![1u8; 2 << 20]).unwrap();
    let trunc = SetAttr {
        size: Some(0),
        ..SetAttr::default()
    };
    let mut plan = Vec::new();
    let (n, pin) = ds.read_plan(f.ino, 0, 1 << 20, &mut plan).unwrap();
    assert_eq!(n, 1 << 20);
    assert!(matches!(ds.setattr(f.ino, &trunc), Err(FsError::Busy(_))));
    drop(pin);
    let (_, pin) = ds.map_direct(f.ino, 0, 4096).unwrap().unwrap();
    assert!(matches!(
        ds.punch_hole(f.ino, 0, 1 << 20),
        Err(FsError::Busy(_))
    ));
    drop(pin);
    ds.setattr(f.ino, &trunc).unwrap();
    assert_eq!(ds.stat(f.ino).unwrap().size, 0);
}

/// An unlinked file whose last user is a lease is freed when the lease goes.
#[test]
fn orphan_held_by_a_lease_is_freed_when_the_lease_drops() {
    let (disk, ds) = fresh();
    let ds = Arc::new(ds);
    let f = ds
        .make_node(ROOT_INO, b"f", S_IFREG | 0o644, 0, 0, 0)
        .unwrap();
    ds.write_at(f.ino, 0, &vec![1u8; 2 << 20]).unwrap();
    let free0 = ds.statfs().unwrap().fb_free;
    ds.open(f.ino).unwrap();
    let lease = ds.lease_extents(f.ino).unwrap();
    ds.unlink_at(ROOT_INO, b"f").unwrap();
    ds.close(f.ino);
    // Still leased: the blocks are kept.
    assert_eq!(ds.stat(f.ino).unwrap().nlink, 0);
    drop(lease);
    assert!(ds.stat(f.ino).is_err());
    ds.commit().unwrap();
    assert_eq!(ds.statfs().unwrap().fb_free, free0 + 2);
    ds.unmount().unwrap();
    clean(&*disk);
}

/// A SimDisk that calls a hook before every `write_zeroes` (how allocation zeroes blocks).
struct HookDisk {
    inner: SimDisk,
    #[allow(clippy::type_complexity)]
    hook: std::sync::Mutex<Option<Box<dyn FnMut() + Send>>>,
}

impl std::fmt::Debug for HookDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HookDisk").finish()
    }
}

impl BlockDevice for HookDisk {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), crate::device::DeviceError> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), crate::device::DeviceError> {
        self.inner.write_at(offset, buf)
    }
    fn flush(&self) -> Result<(), crate::device::DeviceError> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), crate::device::DeviceError> {
        self.inner.discard(offset, len)
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), crate::device::DeviceError> {
        // Taken out while it runs, so a hook may itself allocate (no re-entry).
        let hook = self.hook.lock().unwrap().take();
        if let Some(mut h) = hook {
            h();
            *self.hook.lock().unwrap() = Some(h);
        }
        self.inner.write_zeroes(offset, len)
    }
}

fn hook_fresh() -> (Arc<HookDisk>, Arc<Datastore>) {
    let disk = Arc::new(HookDisk {
        inner: SimDisk::new(VOL),
        hook: std::sync::Mutex::new(None),
    });
    Datastore::mkfs(disk.clone(), &MkfsOptions { uuid: None }, &mut |_, _| {}).unwrap();
    let ds = Arc::new(Datastore::mount(disk.clone()).unwrap());
    (disk, ds)
}

/// Issue 12 finding 6: a large FALLOCATE zeroes its blocks without the datastore lock, in
/// steps each committed, so another operation proceeds in the middle of it.
#[test]
fn large_fallocate_zeroes_without_the_lock_in_committed_steps() {
    let (disk, ds) = hook_fresh();
    let big = ds
        .make_node(ROOT_INO, b"big", S_IFREG | 0o644, 0, 0, 0)
        .unwrap();
    let other = ds
        .make_node(ROOT_INO, b"other", S_IFREG | 0o644, 0, 0, 0)
        .unwrap();
    ds.write_at(big.ino, 0, &vec![1u8; 2 << 20]).unwrap();
    let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let locked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let commits_seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let (ds, calls, locked, seen) = (
            Arc::downgrade(&ds),
            calls.clone(),
            locked.clone(),
            commits_seen.clone(),
        );
        *disk.hook.lock().unwrap() = Some(Box::new(move || {
            let Some(ds) = ds.upgrade() else { return };
            calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // Held by this thread, the lock would deadlock anything below: only try it.
            if ds.inner.try_lock().is_err() {
                locked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return;
            }
            // Another tenant's operation completes in the middle of the FALLOCATE.
            ds.write_at(other.ino, 0, b"meanwhile").unwrap();
            seen.lock()
                .unwrap()
                .push(ds.stats.commits.load(std::sync::atomic::Ordering::Relaxed));
        }));
    }
    let want = 2 + 3 * ALLOC_CHUNK_FBS + 3;
    ds.allocate(big.ino, 0, want << 20, false).unwrap();
    *disk.hook.lock().unwrap() = None;
    let zeroings = calls.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(zeroings, want - 2, "one zeroing per new block");
    assert_eq!(
        locked.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "blocks were zeroed with the datastore lock held"
    );
    // Steps commit on their own: the commit count grows between the steps.
    let seen = commits_seen.lock().unwrap().clone();
    assert!(seen.first() < seen.last(), "{seen:?}");
    let i = ds.stat(big.ino).unwrap();
    assert_eq!((i.size, i.allocated), (want << 20, want));
    let mut buf = vec![9u8; 1 << 20];
    ds.read(big.ino, (want - 1) << 20, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    ds.read(big.ino, 0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 1));
    ds.unmount().unwrap();
    clean(&*disk);
}

/// Out of space in the middle of a stepped FALLOCATE (another file took the blocks between
/// steps): ENOSPC, the committed steps stay with a size that covers them, no block leaks,
/// and the datastore is fsck-clean.
#[test]
fn fallocate_running_out_of_space_midway_stays_consistent() {
    let (disk, ds) = hook_fresh();
    let big = ds
        .make_node(ROOT_INO, b"big", S_IFREG | 0o644, 0, 0, 0)
        .unwrap();
    let hog = ds
        .make_node(ROOT_INO, b"hog", S_IFREG | 0o644, 0, 0, 0)
        .unwrap();
    ds.write_at(hog.ino, 0, &vec![1u8; 2 << 20]).unwrap();
    let free = ds.statfs().unwrap().fb_free;
    assert!(
        free > 2 * ALLOC_CHUNK_FBS + 8,
        "volume too small for the test"
    );
    {
        let ds = Arc::downgrade(&ds);
        let mut n = 0u64;
        *disk.hook.lock().unwrap() = Some(Box::new(move || {
            n += 1;
            let Some(ds) = ds.upgrade() else { return };
            // During the first step, the hog takes all but a few blocks.
            if n == 1 && ds.inner.try_lock().is_ok() {
                let left = ds.statfs().unwrap().fb_free;
                let take = left - 4;
                ds.allocate(hog.ino, 2 << 20, take << 20, false).unwrap();
            }
        }));
    }
    let r = ds.allocate(big.ino, 0, (free - 4) << 20, false);
    *disk.hook.lock().unwrap() = None;
    assert!(matches!(r, Err(FsError::NoSpace(_))), "{r:?}");
    let i = ds.stat(big.ino).unwrap();
    // The first step committed; the second could not find its blocks.
    assert_eq!(i.allocated, ALLOC_CHUNK_FBS);
    assert_eq!(i.size, ALLOC_CHUNK_FBS << 20);
    let free_now = ds.statfs().unwrap().fb_free;
    ds.unmount().unwrap();
    clean(&*disk);
    let ds = Datastore::mount(disk.clone()).unwrap();
    assert_eq!(
        ds.statfs().unwrap().fb_free,
        free_now,
        "reserved blocks leaked"
    );
}
