//! Data and node-id edges: writes and reads at the limits, unknown node ids, files served
//! as disks, hostile timestamps.

use super::*;

/// Offsets are the guest's: a range that wraps around or ends past the largest file is
/// refused before the datastore computes with it (vmfs's direct-write check adds offset and
/// length unchecked, an overflow panic with overflow checks on).
#[test]
fn writes_past_the_largest_file_are_refused() {
    let f = fixture();
    let (file, h) = f.create(root(), ROOT, "edge", 0o644).unwrap();
    for off in [u64::MAX - 4096, vmfs::format::FILE_BYTES_MAX - 2] {
        assert_eq!(
            errno_of(write_all(&f, file, h, off, &[1u8; 5000])),
            libc::EFBIG,
            "{off}"
        );
    }
    assert_eq!(f.fs.getattr(root(), file, None).unwrap().0.size, 0);
}

#[test]
fn sparse_write_far_past_the_end() {
    let f = fixture();
    let (file, h) = f.create(root(), ROOT, "big", 0o644).unwrap();
    let off = (2u64 << 30) + 1;
    let n =
        f.fs.write(
            root(),
            file,
            h,
            SliceReader(b"data"),
            4,
            off,
            None,
            false,
            false,
            0,
        )
        .unwrap();
    assert_eq!(n, 4);
    let (a, _) = f.fs.getattr(root(), file, None).unwrap();
    assert_eq!(a.size, off + 4);
    let mut w = VecWriter(Vec::new());
    f.fs.read(root(), file, h, &mut w, 4, off, None, 0).unwrap();
    assert_eq!(w.0, b"data");
    // The guest reads whole pages: a hole, then the data, then EOF.
    let mut w = VecWriter(Vec::new());
    let n =
        f.fs.read(root(), file, h, &mut w, 131_072, 2 << 30, None, 0)
            .unwrap();
    assert_eq!(n, 5);
    assert_eq!(&w.0[..], b"\0data");
}

#[test]
fn node_ids_never_looked_up_are_refused() {
    let f = fixture();
    let (file, h) = f.create(root(), ROOT, "mine", 0o666).unwrap();
    // Inode numbers are small and dense: a guest guessing them must not reach other files of
    // the datastore (the datastore root, other shares, virtual disks).
    for guess in [2u64, 3, 4, file + 1, file + 100, u64::MAX] {
        if guess == file {
            continue;
        }
        assert_eq!(
            errno_of(f.fs.getattr(root(), guess, None)),
            libc::ESTALE,
            "{guess}"
        );
        assert_eq!(
            errno_of(f.open(root(), guess, libc::O_RDONLY)),
            libc::ESTALE
        );
    }
    // A handle only works with its own node.
    assert!(f.fs.getattr(root(), file, None).is_ok());
    let mut w = VecWriter(Vec::new());
    assert_eq!(
        errno_of(f.fs.read(root(), ROOT, h, &mut w, 10, 0, None, 0)),
        libc::EBADF
    );
    // Forgotten nodes are unusable again.
    f.fs.forget(root(), file, 1);
    assert_eq!(errno_of(f.fs.getattr(root(), file, None)), libc::ESTALE);
}

#[test]
fn read_size_is_clamped() {
    let f = fixture();
    let (file, h) = f.create(root(), ROOT, "big", 0o644).unwrap();
    let mib = vec![0x42u8; 1 << 20];
    for i in 0..4u64 {
        write_all(&f, file, h, i << 20, &mib).unwrap();
    }
    struct Count(usize);
    impl ZeroCopyWriter for Count {
        fn read_from_file_at(
            &mut self,
            _: &File,
            count: usize,
            _: u64,
            _: Option<virtiofsd::oslib::ReadvFlags>,
        ) -> io::Result<usize> {
            self.0 = self.0.max(count);
            Ok(0)
        }
    }
    let mut w = Count(0);
    let _ = f.fs.read(root(), file, h, &mut w, u32::MAX, 0, None, 0);
    assert!(w.0 <= 1 << 20, "asked to copy {} bytes", w.0);
}

#[test]
fn files_served_as_disks_cannot_be_shrunk_or_punched() {
    let f = fixture();
    let (file, h) = f.create(root(), ROOT, "disk.img", 0o666).unwrap();
    let mib = vec![7u8; 1 << 20];
    f.fs.write(
        root(),
        file,
        h,
        SliceReader(&mib),
        1 << 20,
        0,
        None,
        false,
        false,
        0,
    )
    .unwrap();
    // Something else (a disk backend) holds the file open.
    f.fs_ds().open(f.fs_ino(file)).unwrap();
    let attr = fuse::SetattrIn {
        size: 0,
        ..Default::default()
    };
    assert_eq!(
        errno_of(f.fs.setattr(root(), file, attr, Some(h), SetattrValid::SIZE)),
        libc::ETXTBSY
    );
    let punch = (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u32;
    assert_eq!(
        errno_of(f.fs.fallocate(root(), file, h, punch, 0, 1 << 20)),
        libc::ETXTBSY
    );
    // Growing is fine.
    let attr = fuse::SetattrIn {
        size: 2 << 20,
        ..Default::default()
    };
    assert!(f
        .fs
        .setattr(root(), file, attr, Some(h), SetattrValid::SIZE)
        .is_ok());
}

#[test]
fn bad_timestamps_and_foreign_setuid_strips_are_refused() {
    let f = fixture();
    let (file, _) = f.create(root(), ROOT, "suid", 0o644).unwrap();
    f.chmod(root(), file, 0o4755).unwrap();
    // Bob may not strip root's setuid bit: he cannot write the file.
    assert_eq!(errno_of(f.chmod(ctx(BOB, BOB), file, 0o755)), libc::EACCES);
    let attr = fuse::SetattrIn {
        mtime: 5,
        mtimensec: 1_000_000_000,
        ..Default::default()
    };
    assert_eq!(
        errno_of(f.fs.setattr(root(), file, attr, None, SetattrValid::MTIME)),
        libc::EINVAL
    );
    let attr = fuse::SetattrIn {
        mtime: u64::MAX,
        ..Default::default()
    };
    assert!(f
        .fs
        .setattr(root(), file, attr, None, SetattrValid::MTIME)
        .is_err());
}
