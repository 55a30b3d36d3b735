//! Tests of VmfsFs through virtiofsd's FileSystem trait, as the FUSE server calls it: permission checks
//! (modes, ACLs, groups, sticky), the cache's invalidation, names, symlinks, data.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use posix_perm::acl::{Acl, AclEntry, AclTag};
use posix_perm::cache::{PermCache, PermCacheConfig};
use posix_perm::identity::GroupSource;
use posix_perm::idmap::IdMap;
use virtiofsd::filesystem::{
    Context, Extensions, FileSystem, SetattrValid, SetxattrFlags, ZeroCopyReader, ZeroCopyWriter,
};
use virtiofsd::fuse;
use vmfs::device::FileDevice;
use vmfs::fs::{Datastore, MkfsOptions};

use crate::fs::{VmfsFs, XATTR_ACL_ACCESS, XATTR_ACL_DEFAULT};
use crate::settings::{CachePolicy, ShareSettings};

const ROOT: u64 = fuse::ROOT_ID;
const ALICE: u32 = 1000;
const BOB: u32 = 1001;
const CAROL: u32 = 1002;
const G_A: u32 = 2000;
const G_B: u32 = 2001;

struct Fixture {
    fs: VmfsFs,
    ds: Arc<Datastore>,
    _dir: tempfile::TempDir,
}

fn settings(dir: &std::path::Path, uid_map: &str) -> ShareSettings {
    let group = dir.join("group");
    std::fs::write(
        &group,
        format!("ga:x:{G_A}:carol\ngb:x:{G_B}:carol\nstaff:x:3000:alice,bob\n"),
    )
    .unwrap();
    let passwd = dir.join("passwd");
    std::fs::write(
        &passwd,
        format!(
            "alice:x:{ALICE}:{ALICE}::/:/bin/sh\nbob:x:{BOB}:{BOB}::/:/bin/sh\ncarol:x:{CAROL}:{CAROL}::/:/bin/sh\n"
        ),
    )
    .unwrap();
    ShareSettings {
        uid_map: IdMap::parse(uid_map).unwrap(),
        gid_map: IdMap::parse("").unwrap(),
        readonly: false,
        groups: Some(GroupSource::new(group, Some(passwd), Duration::from_millis(20)).unwrap()),
        cache: CachePolicy::Auto,
        perm: PermCache::new(PermCacheConfig::default()).unwrap(),
        quota: crate::quota::QuotaLimits::default(),
    }
}

fn fixture_with(uid_map: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let dev = Arc::new(FileDevice::create(&dir.path().join("ds.vmfs"), 256 << 20).unwrap());
    Datastore::mkfs(dev.clone(), &MkfsOptions { uuid: None }, &mut |_, _| {}).unwrap();
    let ds = Arc::new(Datastore::mount(dev).unwrap());
    ds.set_deferred_commit(true);
    let fs = VmfsFs::new(ds.clone(), "shares/test", settings(dir.path(), uid_map)).unwrap();
    Fixture { fs, ds, _dir: dir }
}

fn fixture_maps(uid_map: &str, gid_map: &str) -> Fixture {
    let f = fixture_with(uid_map);
    let settings = ShareSettings {
        gid_map: IdMap::parse(gid_map).unwrap(),
        ..settings(f._dir.path(), uid_map)
    };
    let fs = VmfsFs::new(f.ds.clone(), "shares/mapped", settings).unwrap();
    Fixture { fs, ..f }
}

fn fixture_quota(bytes: Option<u64>, inodes: Option<u64>) -> Fixture {
    let f = fixture();
    let fs = quota_share(&f, bytes, inodes);
    Fixture { fs, ..f }
}

/// A share of "shares/quota" in `f`'s datastore with the given limits.
fn quota_share(f: &Fixture, bytes: Option<u64>, inodes: Option<u64>) -> VmfsFs {
    let settings = ShareSettings {
        quota: crate::quota::QuotaLimits { bytes, inodes },
        ..settings(f._dir.path(), "")
    };
    VmfsFs::new(f.ds.clone(), "shares/quota", settings).unwrap()
}

fn fixture() -> Fixture {
    fixture_with("")
}

fn ctx(uid: u32, gid: u32) -> Context {
    Context {
        uid: uid.into(),
        gid: gid.into(),
        pid: 1,
    }
}

fn root() -> Context {
    ctx(0, 0)
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn errno_of<T>(r: io::Result<T>) -> i32 {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.raw_os_error().unwrap(),
    }
}

struct VecWriter(Vec<u8>);

impl ZeroCopyWriter for VecWriter {
    fn read_from_file_at(
        &mut self,
        f: &File,
        count: usize,
        off: u64,
        _flags: Option<virtiofsd::oslib::ReadvFlags>,
    ) -> io::Result<usize> {
        let mut buf = vec![0u8; count];
        let n = f.read_at(&mut buf, off)?;
        self.0.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

struct SliceReader<'a>(&'a [u8]);

impl ZeroCopyReader for SliceReader<'_> {
    fn write_to_file_at(
        &mut self,
        f: &File,
        count: usize,
        off: u64,
        _flags: Option<virtiofsd::oslib::WritevFlags>,
    ) -> io::Result<usize> {
        let n = count.min(self.0.len());
        f.write_all_at(&self.0[..n], off)?;
        self.0 = &self.0[n..];
        Ok(n)
    }
}

impl Fixture {
    fn fs_ds(&self) -> &Datastore {
        &self.ds
    }

    /// Node id → datastore inode (the identity except for the share root).
    fn fs_ino(&self, node: u64) -> u64 {
        assert_ne!(node, ROOT);
        node
    }

    fn mkdir(&self, cx: Context, parent: u64, name: &str, mode: u32) -> io::Result<u64> {
        self.fs
            .mkdir(cx, parent, &c(name), mode, 0, Extensions::default())
            .map(|e| e.inode)
    }

    fn create(&self, cx: Context, parent: u64, name: &str, mode: u32) -> io::Result<(u64, u64)> {
        let (e, h, _) = self.fs.create(
            cx,
            parent,
            &c(name),
            mode,
            false,
            libc::O_RDWR as u32,
            0,
            Extensions::default(),
        )?;
        Ok((e.inode, h.unwrap()))
    }

    fn open(&self, cx: Context, ino: u64, flags: i32) -> io::Result<u64> {
        self.fs
            .open(cx, ino, false, flags as u32)
            .map(|(h, _)| h.unwrap())
    }

    fn chmod(&self, cx: Context, ino: u64, mode: u32) -> io::Result<fuse::Attr> {
        let attr = fuse::SetattrIn {
            mode,
            ..Default::default()
        };
        self.fs
            .setattr(cx, ino, attr, None, SetattrValid::MODE)
            .map(|(a, _)| a)
    }

    fn chown(&self, cx: Context, ino: u64, uid: u32, gid: u32) -> io::Result<fuse::Attr> {
        let attr = fuse::SetattrIn {
            uid: uid.into(),
            gid: gid.into(),
            ..Default::default()
        };
        self.fs
            .setattr(cx, ino, attr, None, SetattrValid::UID | SetattrValid::GID)
            .map(|(a, _)| a)
    }

    fn set_acl(&self, cx: Context, ino: u64, name: &[u8], acl: &Acl) -> io::Result<()> {
        let n = CString::new(name).unwrap();
        self.fs
            .setxattr(cx, ino, &n, &acl.encode(), 0, SetxattrFlags::empty())
    }
}

fn acl(entries: &[(AclTag, u32, u8)]) -> Acl {
    Acl::from_entries(
        entries
            .iter()
            .map(|&(t, id, p)| {
                if t.is_named() {
                    AclEntry::named(t, id, p)
                } else {
                    AclEntry::unnamed(t, p)
                }
            })
            .collect(),
    )
    .unwrap()
}

fn write_all(f: &Fixture, node: u64, h: u64, off: u64, data: &[u8]) -> io::Result<usize> {
    f.fs.write(
        root(),
        node,
        h,
        SliceReader(data),
        data.len() as u32,
        off,
        None,
        false,
        false,
        0,
    )
}

/// Bytes of data blocks allocated to the files of the share's root directory, per vmfs.
fn allocated_in_root(f: &Fixture) -> u64 {
    let root = f.fs.root_ino();
    f.fs_ds()
        .read_dir_from(root, 0, 1000)
        .unwrap()
        .iter()
        .map(|e| crate::quota::allocated_bytes(&f.fs_ds().stat(e.entry.ino).unwrap()))
        .sum()
}

mod data;
mod perm;
mod quota;
mod wire;
