//! Byte and inode quotas: refusals, statfs, what opening and truncation may still do.

use super::*;

#[test]
fn byte_quota_stops_writes_and_statfs_shows_it() {
    const MIB: u64 = 1 << 20;
    let f = fixture_quota(Some(4 * MIB), None);
    let st = f.fs.statfs(root(), ROOT).unwrap();
    assert_eq!((st.f_blocks, st.f_bfree), (4, 4));
    let (file, h) = f.create(root(), ROOT, "fill", 0o644).unwrap();
    let (other, oh) = f.create(root(), ROOT, "prealloc", 0o644).unwrap();
    let chunk = vec![3u8; MIB as usize];
    let mut written = 0u64;
    let mut refused = None;
    for i in 0..16u64 {
        match write_all(&f, file, h, i * MIB, &chunk) {
            Ok(n) => written += n as u64,
            Err(e) => {
                refused = e.raw_os_error();
                break;
            }
        }
    }
    assert_eq!(
        refused,
        Some(libc::EDQUOT),
        "16 MiB written into a 4 MiB quota"
    );
    // The bound may refuse a little early, never late.
    assert!((2 * MIB..=4 * MIB).contains(&written), "{written}");
    let (used, _) = f.fs.quota().used();
    assert_eq!(
        used,
        allocated_in_root(&f),
        "counted usage matches the datastore"
    );
    assert!(used <= 4 * MIB);
    let st = f.fs.statfs(root(), ROOT).unwrap();
    assert_eq!(st.f_bfree, (4 * MIB - used) / MIB);
    // Rewriting allocated space is never refused.
    assert_eq!(write_all(&f, file, h, 0, &chunk[..4096]).unwrap(), 4096);
    // No new entries once the bytes are used up (a directory may grow by a block).
    assert_eq!(
        errno_of(f.create(root(), ROOT, "more", 0o644)),
        libc::EDQUOT
    );
    // A single FALLOCATE cannot pass the quota, nor ask for absurd sizes.
    assert_eq!(
        errno_of(f.fs.fallocate(root(), other, oh, 0, 0, 8 * MIB)),
        libc::EDQUOT
    );
    assert_eq!(
        errno_of(f.fs.fallocate(root(), other, oh, 0, 0, 200 << 30)),
        libc::ENOSPC
    );
    assert_eq!(
        errno_of(f.fs.fallocate(root(), other, oh, 0, u64::MAX - 5, 10)),
        libc::EFBIG
    );
    assert_eq!(
        f.fs.quota().used().0,
        used,
        "refused requests allocate nothing"
    );
    // Freeing space gives it back; a fresh share counts the same usage from the datastore.
    f.fs.release(root(), file, 0, h, false, false, None)
        .unwrap();
    f.fs.unlink(root(), ROOT, &c("fill")).unwrap();
    assert_eq!(f.fs.quota().used().0, allocated_in_root(&f));
    f.fs.fallocate(root(), other, oh, 0, 0, 2 * MIB).unwrap();
    let (used, _) = f.fs.quota().used();
    assert_eq!(used, allocated_in_root(&f));
    assert_eq!(quota_share(&f, Some(4 * MIB), None).quota().used().0, used);
}

#[test]
fn inode_quota_stops_creation_but_not_opening() {
    let f = fixture_quota(None, Some(3));
    let d = f.mkdir(root(), ROOT, "d", 0o755).unwrap();
    let (file, h) = f.create(root(), d, "f", 0o644).unwrap();
    f.fs.release(root(), file, 0, h, false, false, None)
        .unwrap();
    f.fs.symlink(root(), &c("f"), d, &c("l"), Extensions::default())
        .unwrap();
    let st = f.fs.statfs(root(), ROOT).unwrap();
    assert_eq!((st.f_files, st.f_ffree), (3, 0));
    assert_eq!(
        errno_of(f.fs.mknod(
            root(),
            ROOT,
            &c("n"),
            libc::S_IFIFO | 0o644,
            0,
            0,
            Extensions::default()
        )),
        libc::EDQUOT
    );
    assert_eq!(errno_of(f.mkdir(root(), ROOT, "e", 0o755)), libc::EDQUOT);
    assert_eq!(errno_of(f.create(root(), ROOT, "g", 0o644)), libc::EDQUOT);
    // An existing name still opens through CREATE, and a hard link takes no inode.
    let (again, h) = f.create(root(), d, "f", 0o644).unwrap();
    assert_eq!(again, file);
    f.fs.release(root(), file, 0, h, false, false, None)
        .unwrap();
    f.fs.link(root(), file, ROOT, &c("hard")).unwrap();
    // Removing the last link of a file frees its inode for the next creation.
    f.fs.unlink(root(), d, &c("f")).unwrap();
    assert_eq!(f.fs.quota().used().1, 3);
    f.fs.unlink(root(), ROOT, &c("hard")).unwrap();
    assert_eq!(f.fs.quota().used().1, 2);
    assert!(f.create(root(), ROOT, "g", 0o644).is_ok());
    assert_eq!(quota_share(&f, None, Some(3)).quota().used().1, 3);
}

/// Issue 12 finding 2: open with O_TRUNC (and create on an existing file) used to truncate a
/// file a disk backend serves, freeing blocks the VM keeps using. vmfs now refuses it itself
/// (the disk holds an extent lease), whatever guard the caller remembers.
#[test]
fn o_trunc_open_of_a_served_disk_file_is_refused_and_keeps_its_blocks() {
    let f = fixture();
    let (file, h) = f.create(root(), ROOT, "disk.img", 0o666).unwrap();
    let mib = vec![7u8; 1 << 20];
    for i in 0..2u64 {
        write_all(&f, file, h, i << 20, &mib).unwrap();
    }
    f.fs.release(root(), file, 0, h, false, false, None)
        .unwrap();
    let ino = f.fs_ino(file);
    let at = f.ds.map_direct(ino, 1 << 20, 4096).unwrap().unwrap().0;
    // What a served disk holds (the dataplane's VmfsBackend takes it).
    let lease = f.ds.lease_extents(ino).unwrap();
    let e = errno_of(f.open(root(), file, libc::O_RDWR | libc::O_TRUNC));
    assert!(e == libc::EBUSY || e == libc::ETXTBSY, "errno {e}");
    let e = errno_of(f.fs.create(
        root(),
        ROOT,
        &c("disk.img"),
        0o666,
        false,
        (libc::O_RDWR | libc::O_TRUNC) as u32,
        0,
        Extensions::default(),
    ));
    assert!(e == libc::EBUSY || e == libc::ETXTBSY, "errno {e}");
    assert_eq!(f.ds.stat(ino).unwrap().size, 2 << 20);
    assert_eq!(f.ds.map_direct(ino, 1 << 20, 4096).unwrap().unwrap().0, at);
    drop(lease);
    let h = f.open(root(), file, libc::O_RDWR | libc::O_TRUNC).unwrap();
    assert_eq!(f.ds.stat(ino).unwrap().size, 0);
    f.fs.release(root(), file, 0, h, false, false, None)
        .unwrap();
}
