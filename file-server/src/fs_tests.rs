//! VmfsFs through virtiofsd's FileSystem trait, as the FUSE server calls it: permission checks
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

#[test]
fn share_root_is_created_root_owned_0755() {
    let f = fixture();
    let (a, _) = f.fs.getattr(root(), ROOT, None).unwrap();
    assert_eq!(a.mode & 0o7777, 0o755);
    assert_eq!(a.mode & libc::S_IFMT, libc::S_IFDIR);
    assert_eq!((a.uid.into_inner(), a.gid.into_inner()), (0, 0));
}

use virtiofsd::soft_idmap::Id;

#[test]
fn mode_bits_are_enforced_by_the_server() {
    let f = fixture();
    let d = f.mkdir(root(), ROOT, "private", 0o700).unwrap();
    f.chown(root(), d, ALICE, ALICE).unwrap();
    let (file, _) = f.create(ctx(ALICE, ALICE), d, "secret", 0o600).unwrap();
    // Bob cannot search Alice's 0700 directory, whatever his guest kernel thinks.
    assert_eq!(
        errno_of(f.fs.lookup(ctx(BOB, BOB), d, &c("secret"))),
        libc::EACCES
    );
    assert!(f.fs.lookup(ctx(ALICE, ALICE), d, &c("secret")).is_ok());
    assert_eq!(
        errno_of(f.open(ctx(BOB, BOB), file, libc::O_RDONLY)),
        libc::EACCES
    );
    // Opening the directory up lets Bob search it, but the file stays Alice's.
    f.chmod(ctx(ALICE, ALICE), d, 0o755).unwrap();
    assert!(f.fs.lookup(ctx(BOB, BOB), d, &c("secret")).is_ok());
    assert_eq!(
        errno_of(f.open(ctx(BOB, BOB), file, libc::O_RDONLY)),
        libc::EACCES
    );
    // Only the owner (or root) changes modes; only root gives files away.
    assert_eq!(errno_of(f.chmod(ctx(BOB, BOB), file, 0o666)), libc::EPERM);
    assert_eq!(
        errno_of(f.chown(ctx(ALICE, ALICE), file, BOB, ALICE)),
        libc::EPERM
    );
    f.chown(root(), file, BOB, BOB).unwrap();
    assert!(f.open(ctx(BOB, BOB), file, libc::O_RDWR).is_ok());
}

#[test]
fn acl_grant_and_revocation_apply_at_once() {
    let f = fixture();
    let (file, _) = f.create(root(), ROOT, "shared", 0o600).unwrap();
    f.chown(root(), file, ALICE, ALICE).unwrap();
    assert_eq!(
        errno_of(f.open(ctx(BOB, BOB), file, libc::O_RDONLY)),
        libc::EACCES
    );
    let grant = acl(&[
        (AclTag::UserObj, 0, 6),
        (AclTag::User, BOB, 6),
        (AclTag::GroupObj, 0, 0),
        (AclTag::Mask, 0, 4),
        (AclTag::Other, 0, 0),
    ]);
    f.set_acl(ctx(ALICE, ALICE), file, XATTR_ACL_ACCESS, &grant)
        .unwrap();
    // The mask limits Bob's rw- to r--, and the mode's group bits mirror the mask.
    assert!(f.open(ctx(BOB, BOB), file, libc::O_RDONLY).is_ok());
    assert_eq!(
        errno_of(f.open(ctx(BOB, BOB), file, libc::O_WRONLY)),
        libc::EACCES
    );
    let (a, _) = f.fs.getattr(root(), file, None).unwrap();
    assert_eq!(a.mode & 0o777, 0o640);
    // chmod rewrites the mask: the next check refuses, no staleness window.
    f.chmod(ctx(ALICE, ALICE), file, 0o600).unwrap();
    assert_eq!(
        errno_of(f.open(ctx(BOB, BOB), file, libc::O_RDONLY)),
        libc::EACCES
    );
    f.chmod(ctx(ALICE, ALICE), file, 0o640).unwrap();
    assert!(f.open(ctx(BOB, BOB), file, libc::O_RDONLY).is_ok());
    // Removing the ACL revokes too.
    f.fs.removexattr(ctx(ALICE, ALICE), file, &c("system.posix_acl_access"))
        .unwrap();
    f.chmod(ctx(ALICE, ALICE), file, 0o600).unwrap();
    assert_eq!(
        errno_of(f.open(ctx(BOB, BOB), file, libc::O_RDONLY)),
        libc::EACCES
    );
    let st = f.fs.settings().perm.stats();
    assert!(st.hits + st.misses > 0 && st.invalidations > 0, "{st:?}");
}

/// Named ACL entries are ids like owners: stored in datastore ids (guest ids mapped on set,
/// unmapped ones refused), shown in guest ids (unmapped ones as the overflow id), evaluated
/// against the caller's mapped ids.
#[test]
fn acl_ids_go_through_the_id_maps() {
    let f = fixture_maps(
        "0:0:1;1000:101000:100",
        "0:0:1;1000:101000:100;2000:102000:100",
    );
    let (file, _) = f.create(root(), ROOT, "mapped", 0o600).unwrap();
    let grant = acl(&[
        (AclTag::UserObj, 0, 6),
        (AclTag::User, BOB, 6),
        (AclTag::GroupObj, 0, 0),
        (AclTag::Group, G_A, 4),
        (AclTag::Mask, 0, 6),
        (AclTag::Other, 0, 0),
    ]);
    f.set_acl(root(), file, XATTR_ACL_ACCESS, &grant).unwrap();
    // Stored in datastore ids.
    let stored = f
        .fs_ds()
        .getxattr(f.fs_ino(file), XATTR_ACL_ACCESS)
        .unwrap();
    let stored = Acl::parse(&stored).unwrap();
    let named: Vec<(AclTag, u32)> = stored
        .entries()
        .iter()
        .filter(|e| e.tag.is_named())
        .map(|e| (e.tag, e.id))
        .collect();
    assert_eq!(
        named,
        [
            (AclTag::User, 100_000 + BOB),
            (AclTag::Group, 100_000 + G_A)
        ]
    );
    // Evaluated against the caller's mapped ids: Bob (guest 1001, datastore 101001) may write;
    // Alice (in no entry) may not; a member of ga (by its primary gid) may read.
    assert!(f.open(ctx(BOB, BOB), file, libc::O_RDWR).is_ok());
    assert_eq!(
        errno_of(f.open(ctx(ALICE, ALICE), file, libc::O_RDONLY)),
        libc::EACCES
    );
    assert!(f.open(ctx(ALICE, G_A), file, libc::O_RDONLY).is_ok());
    // Shown in guest ids.
    let got = match f
        .fs
        .getxattr(root(), file, &c("system.posix_acl_access"), 4096)
        .unwrap()
    {
        virtiofsd::filesystem::GetxattrReply::Value(v) => v,
        _ => panic!("expected a value"),
    };
    assert_eq!(Acl::parse(&got).unwrap(), grant);
    // An id outside the map cannot be named (as chown to it is refused).
    let unmapped = acl(&[
        (AclTag::UserObj, 0, 6),
        (AclTag::User, 5, 6),
        (AclTag::GroupObj, 0, 0),
        (AclTag::Mask, 0, 6),
        (AclTag::Other, 0, 0),
    ]);
    assert_eq!(
        errno_of(f.set_acl(root(), file, XATTR_ACL_ACCESS, &unmapped)),
        libc::EINVAL
    );
    let unmapped_default = acl(&[
        (AclTag::UserObj, 0, 7),
        (AclTag::GroupObj, 0, 0),
        (AclTag::Group, 7, 5),
        (AclTag::Mask, 0, 7),
        (AclTag::Other, 0, 0),
    ]);
    assert_eq!(
        errno_of(f.set_acl(root(), ROOT, XATTR_ACL_DEFAULT, &unmapped_default)),
        libc::EINVAL
    );
    // A datastore id the map does not cover is shown as the overflow id.
    let foreign = acl(&[
        (AclTag::UserObj, 0, 6),
        (AclTag::User, 7, 6),
        (AclTag::GroupObj, 0, 0),
        (AclTag::Mask, 0, 6),
        (AclTag::Other, 0, 0),
    ]);
    f.fs_ds()
        .setxattr(
            f.fs_ino(file),
            XATTR_ACL_ACCESS,
            &foreign.encode(),
            vmfs::XattrSetMode::Any,
        )
        .unwrap();
    let got = match f
        .fs
        .getxattr(root(), file, &c("system.posix_acl_access"), 4096)
        .unwrap()
    {
        virtiofsd::filesystem::GetxattrReply::Value(v) => v,
        _ => panic!("expected a value"),
    };
    let shown: Vec<u32> = Acl::parse(&got)
        .unwrap()
        .entries()
        .iter()
        .filter(|e| e.tag.is_named())
        .map(|e| e.id)
        .collect();
    assert_eq!(shown, [crate::fs::OVERFLOW_ID]);
}

#[test]
fn group_entries_are_not_unioned() {
    let f = fixture();
    let (file, _) = f.create(root(), ROOT, "f", 0o600).unwrap();
    // Carol is in ga (r) and gb (w): asking rw through the group class must fail on Linux.
    let a = acl(&[
        (AclTag::UserObj, 0, 6),
        (AclTag::GroupObj, 0, 0),
        (AclTag::Group, G_A, 4),
        (AclTag::Group, G_B, 2),
        (AclTag::Mask, 0, 6),
        (AclTag::Other, 0, 6),
    ]);
    f.set_acl(root(), file, XATTR_ACL_ACCESS, &a).unwrap();
    let carol = ctx(CAROL, CAROL);
    assert!(f.open(carol, file, libc::O_RDONLY).is_ok());
    assert!(f.open(carol, file, libc::O_WRONLY).is_ok());
    assert_eq!(errno_of(f.open(carol, file, libc::O_RDWR)), libc::EACCES);
    // Bob is in neither group: "other" (rw) applies.
    assert!(f.open(ctx(BOB, BOB), file, libc::O_RDWR).is_ok());
}

#[test]
fn default_acl_is_inherited_and_umask_ignored() {
    let f = fixture();
    let d = f.mkdir(root(), ROOT, "proj", 0o777).unwrap();
    let def = acl(&[
        (AclTag::UserObj, 0, 7),
        (AclTag::User, BOB, 7),
        (AclTag::GroupObj, 0, 5),
        (AclTag::Mask, 0, 7),
        (AclTag::Other, 0, 0),
    ]);
    f.set_acl(root(), d, XATTR_ACL_DEFAULT, &def).unwrap();
    let e =
        f.fs.create(
            ctx(ALICE, ALICE),
            d,
            &c("doc"),
            0o666,
            false,
            libc::O_RDWR as u32,
            0o022,
            Extensions::default(),
        )
        .unwrap()
        .0;
    // Mode = default ACL ∩ create mode; the umask is not applied when a default ACL exists.
    assert_eq!(e.attr.mode & 0o777, 0o660);
    assert!(f.open(ctx(BOB, BOB), e.inode, libc::O_RDWR).is_ok());
    let sub = f.mkdir(ctx(ALICE, ALICE), d, "sub", 0o755).unwrap();
    let r =
        f.fs.getxattr(root(), sub, &c("system.posix_acl_default"), 4096)
            .unwrap();
    assert!(
        matches!(r, virtiofsd::filesystem::GetxattrReply::Value(v) if Acl::parse(&v).unwrap() == def)
    );
    // Without a default ACL the umask applies (mkdir's 0777 was umasked by the guest's 0).
    let open = f.mkdir(root(), ROOT, "open", 0o777).unwrap();
    let plain =
        f.fs.create(
            ctx(ALICE, ALICE),
            open,
            &c("plain"),
            0o666,
            false,
            libc::O_RDWR as u32,
            0o022,
            Extensions::default(),
        )
        .unwrap()
        .0
        .inode;
    let (a, _) = f.fs.getattr(root(), plain, None).unwrap();
    assert_eq!(a.mode & 0o777, 0o644);
}

#[test]
fn hostile_names_are_refused() {
    let f = fixture();
    for bad in ["a/b", "..", ".", "/etc"] {
        let r = f.mkdir(root(), ROOT, bad, 0o755);
        assert_eq!(errno_of(r), libc::EINVAL, "{bad}");
        let r = f.create(root(), ROOT, bad, 0o644);
        assert_eq!(errno_of(r), libc::EINVAL, "{bad}");
    }
    let long = "x".repeat(256);
    assert_eq!(
        errno_of(f.mkdir(root(), ROOT, &long, 0o755)),
        libc::ENAMETOOLONG
    );
    // ".." at the share root stays at the root: the datastore above is unreachable.
    let e = f.fs.lookup(root(), ROOT, &c("..")).unwrap();
    assert_eq!(e.inode, ROOT);
    // Node ids outside the share (the datastore root's number) do not reach it either.
    let (a, _) = f.fs.getattr(root(), ROOT, None).unwrap();
    assert_eq!(a.ino, ROOT);
}

#[test]
fn symlinks_are_stored_not_followed() {
    let f = fixture();
    let e =
        f.fs.symlink(
            root(),
            &c("../../../etc/shadow"),
            ROOT,
            &c("escape"),
            Extensions::default(),
        )
        .unwrap();
    assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(
        f.fs.readlink(root(), e.inode).unwrap(),
        b"../../../etc/shadow"
    );
    let looked = f.fs.lookup(root(), ROOT, &c("escape")).unwrap();
    assert_eq!(looked.inode, e.inode);
    assert_eq!(looked.attr.mode & libc::S_IFMT, libc::S_IFLNK);
}

#[test]
fn unmapped_uids_are_refused() {
    // Guest ids 0..=2000 map to host 100000.. ; anything else is refused.
    let f = fixture_with("0:100000:2001");
    assert!(f.fs.getattr(ctx(1000, 0), ROOT, None).is_ok());
    assert_eq!(
        errno_of(f.fs.getattr(ctx(5000, 0), ROOT, None)),
        libc::EPERM
    );
    // The share root is host-root owned: outside the map, shown as the overflow id.
    let (a, _) = f.fs.getattr(ctx(0, 0), ROOT, None).unwrap();
    assert_eq!(a.uid.into_inner(), crate::fs::OVERFLOW_ID);
    // Guest root is host 100000, not root: it cannot write the root-owned 0755 share root.
    assert_eq!(errno_of(f.mkdir(ctx(0, 0), ROOT, "x", 0o755)), libc::EACCES);
}

#[test]
fn sticky_directories_protect_other_users_entries() {
    let f = fixture();
    let tmp = f.mkdir(root(), ROOT, "tmp", 0o777).unwrap();
    f.chmod(root(), tmp, 0o1777).unwrap();
    f.create(ctx(ALICE, ALICE), tmp, "a", 0o644).unwrap();
    assert_eq!(
        errno_of(f.fs.unlink(ctx(BOB, BOB), tmp, &c("a"))),
        libc::EPERM
    );
    f.fs.unlink(ctx(ALICE, ALICE), tmp, &c("a")).unwrap();
}

#[test]
fn write_read_truncate() {
    let f = fixture();
    let (file, h) = f.create(root(), ROOT, "data", 0o644).unwrap();
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let n =
        f.fs.write(
            root(),
            file,
            h,
            SliceReader(&payload),
            payload.len() as u32,
            4096,
            None,
            false,
            false,
            0,
        )
        .unwrap();
    assert_eq!(n, payload.len());
    let mut w = VecWriter(Vec::new());
    let n =
        f.fs.read(root(), file, h, &mut w, 400_000, 0, None, 0)
            .unwrap();
    assert_eq!(n, 4096 + payload.len());
    assert!(w.0[..4096].iter().all(|&b| b == 0));
    assert_eq!(&w.0[4096..], &payload[..]);
    // A read-only handle cannot write; Bob cannot open the 0644 file for writing.
    let ro = f.open(root(), file, libc::O_RDONLY).unwrap();
    assert_eq!(
        errno_of(f.fs.write(
            root(),
            file,
            ro,
            SliceReader(b"x"),
            1,
            0,
            None,
            false,
            false,
            0
        )),
        libc::EBADF
    );
    assert_eq!(
        errno_of(f.open(ctx(BOB, BOB), file, libc::O_WRONLY)),
        libc::EACCES
    );
    let attr = fuse::SetattrIn {
        size: 10,
        ..Default::default()
    };
    let (a, _) =
        f.fs.setattr(root(), file, attr, None, SetattrValid::SIZE)
            .unwrap();
    assert_eq!(a.size, 10);
}

/// An inode number freed and given to a new file must not inherit the old file's cached
/// permission profile: the cache keys carry the inode's generation.
#[test]
fn reused_inode_numbers_do_not_inherit_cached_profiles() {
    let f = fixture();
    let (old, h) = f.create(root(), ROOT, "open-to-all", 0o666).unwrap();
    f.fs.release(root(), old, 0, h, false, false, None).unwrap();
    // Bob opens it read-write: his profile of the inode is cached.
    let bh = f.open(ctx(BOB, BOB), old, libc::O_RDWR).unwrap();
    f.fs.release(root(), old, 0, bh, false, false, None)
        .unwrap();
    f.fs.unlink(root(), ROOT, &c("open-to-all")).unwrap();
    f.fs.forget(root(), old, 2);
    // A freed number is reused after the next commit, once allocation wraps around: create
    // root-private files until one takes it (same attr_gen as the old file's: both fresh).
    f.fs_ds().sync().unwrap();
    let total = f.fs_ds().statfs().unwrap().fd_total;
    let mut new = 0;
    for n in 0..total {
        let name = format!("private{n}");
        let i = f
            .fs_ds()
            .make_node(
                f.fs.root_ino(),
                name.as_bytes(),
                libc::S_IFREG | 0o600,
                0,
                0,
                0,
            )
            .unwrap();
        if i.ino == f.fs_ino(old) {
            f.fs.lookup(root(), ROOT, &c(&name)).unwrap();
            new = i.ino;
            break;
        }
    }
    assert_eq!(new, old, "the datastore did not reuse the inode number");
    assert_eq!(
        errno_of(f.open(ctx(BOB, BOB), new, libc::O_RDONLY)),
        libc::EACCES
    );
}

#[test]
fn disconnect_drops_the_vms_cached_profiles() {
    let f = fixture();
    crate::fs::set_current_conn(7);
    f.fs.lookup(ctx(BOB, BOB), ROOT, &c("..")).unwrap();
    assert!(f.fs.settings().perm.stats().entries > 0);
    f.fs.disconnected(7);
    assert_eq!(f.fs.settings().perm.stats().entries, 0);
}

/// FUSE requests through the handler over a real virtqueue, as a guest would send them.
mod wire {
    use super::*;
    use dataplane::vhost_fs::{FsMemory, FsRequestHandler};
    use proptest::prelude::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress};

    use crate::handler::ShareHandler;

    const REQ_ADDR: u64 = 0x1_0000;
    const OUT_ADDR: u64 = 0x8_0000;

    fn mem() -> FsMemory {
        FsMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// Guest memory large enough for a reply buffer above the 1 MiB READ limit.
    fn big_mem() -> FsMemory {
        FsMemory::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    /// Sends `req` (readable) with `out_len` writable bytes; returns (used, reply bytes).
    fn send(h: &ShareHandler, m: &FsMemory, req: &[u8], out_len: u32) -> (u32, Vec<u8>) {
        send_at(h, m, req, out_len, REQ_ADDR, OUT_ADDR)
    }

    /// [`send`] with the request and reply buffers at the given guest addresses.
    fn send_at(
        h: &ShareHandler,
        m: &FsMemory,
        req: &[u8],
        out_len: u32,
        req_addr: u64,
        out_addr: u64,
    ) -> (u32, Vec<u8>) {
        let vq = MockSplitQueue::new(m, 16);
        let mut descs = vec![];
        if !req.is_empty() {
            descs.push((req_addr, req.len() as u32, false));
        }
        if out_len > 0 {
            descs.push((out_addr, out_len, true));
        }
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, w))| {
                let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
                if i + 1 < descs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                RawDescriptor::from(Descriptor::new(addr, len, flags, (i + 1) as u16))
            })
            .collect();
        vq.add_desc_chains(&raw, 0).unwrap();
        m.write_slice(req, GuestAddress(req_addr)).unwrap();
        m.write_slice(&vec![0xeeu8; out_len as usize], GuestAddress(out_addr))
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.pop_descriptor_chain(m).unwrap();
        let used = h.handle(1, m, chain);
        let mut out = vec![0u8; used as usize];
        m.read_slice(&mut out, GuestAddress(out_addr)).unwrap();
        (used, out)
    }

    fn header(len: u32, opcode: u32, unique: u64, nodeid: u64) -> Vec<u8> {
        let mut h = Vec::with_capacity(40);
        h.extend_from_slice(&len.to_le_bytes());
        h.extend_from_slice(&opcode.to_le_bytes());
        h.extend_from_slice(&unique.to_le_bytes());
        h.extend_from_slice(&nodeid.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes()); // uid
        h.extend_from_slice(&0u32.to_le_bytes()); // gid
        h.extend_from_slice(&1u32.to_le_bytes()); // pid
        h.extend_from_slice(&0u32.to_le_bytes()); // total_extlen, padding
        h
    }

    fn reply_error(out: &[u8]) -> (i32, u64) {
        assert!(out.len() >= 16, "reply too short: {out:?}");
        let err = i32::from_le_bytes(out[4..8].try_into().unwrap());
        let unique = u64::from_le_bytes(out[8..16].try_into().unwrap());
        (err, unique)
    }

    fn init(h: &ShareHandler, m: &FsMemory) {
        let mut req = header(40 + 64, 26, 1, 0);
        let mut body = vec![0u8; 64];
        body[0..4].copy_from_slice(&7u32.to_le_bytes());
        body[4..8].copy_from_slice(&38u32.to_le_bytes());
        req.extend_from_slice(&body);
        let (_, out) = send(h, m, &req, 4096);
        assert_eq!(reply_error(&out), (0, 1));
    }

    #[test]
    fn bad_requests_get_error_replies() {
        let f = fixture();
        let h = ShareHandler::new(f.fs.clone());
        let m = mem();
        init(&h, &m);
        // Unknown opcode: ENOSYS.
        let (_, out) = send(&h, &m, &header(40, 9999, 7, 1), 4096);
        assert_eq!(reply_error(&out), (-libc::ENOSYS, 7));
        // LOOKUP whose name is not NUL-terminated: EINVAL, never a panic.
        let mut req = header(44, 1, 8, 1);
        req.extend_from_slice(b"abcd");
        let (_, out) = send(&h, &m, &req, 4096);
        assert_eq!(reply_error(&out), (-libc::EINVAL, 8));
        // GETATTR with a truncated body.
        let mut req = header(42, 3, 9, 1);
        req.extend_from_slice(&[0, 0]);
        let (_, out) = send(&h, &m, &req, 4096);
        assert_eq!(reply_error(&out).1, 9);
        assert_ne!(reply_error(&out).0, 0);
        // A length beyond the protocol's buffer limit.
        let (_, out) = send(&h, &m, &header(u32::MAX, 3, 10, 1), 4096);
        assert_eq!(reply_error(&out), (-libc::ENOMEM, 10));
        // A header cut short: nothing to answer to, nothing written.
        let (used, _) = send(&h, &m, &header(40, 3, 11, 1)[..20], 4096);
        assert_eq!(used, 0);
        // GETATTR of a node that does not exist.
        let mut req = header(56, 3, 12, 999_999);
        req.extend_from_slice(&[0u8; 16]);
        let (_, out) = send(&h, &m, &req, 4096);
        assert_ne!(reply_error(&out).0, 0);
        assert_eq!(
            h.counters()
                .panics
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }

    /// A WRITE whose payload is longer than its size would make virtiofsd's zero-copy
    /// helper write the surplus past the range: refused. A READ with a buffer larger than
    /// its size must not receive datastore bytes past the file's data.
    #[test]
    fn data_requests_move_exactly_their_size() {
        let f = fixture();
        let (file, fh) = f.create(root(), ROOT, "neighbour", 0o644).unwrap();
        // FUSE writes are at most 1 MiB (max_write): two each.
        let secret = vec![0x5au8; 2 << 20];
        let (victim, vh) = f.create(root(), ROOT, "victim", 0o644).unwrap();
        let ones = vec![1u8; 1 << 20];
        for off in [0u64, 1 << 20] {
            let half = &secret[..1 << 20];
            let n =
                f.fs.write(
                    root(),
                    file,
                    fh,
                    SliceReader(half),
                    1 << 20,
                    off,
                    None,
                    false,
                    false,
                    0,
                )
                .unwrap();
            assert_eq!(n, 1 << 20);
            f.fs.write(
                root(),
                victim,
                vh,
                SliceReader(&ones),
                1 << 20,
                off,
                None,
                false,
                false,
                0,
            )
            .unwrap();
        }
        let h = ShareHandler::new(f.fs.clone());
        let m = mem();
        init(&h, &m);
        // WRITE size 4 with 4096 payload bytes at the end of the victim's last block.
        let mut req = header(40 + 40 + 4096, 16, 20, victim);
        let mut body = vec![0u8; 40];
        body[0..8].copy_from_slice(&vh.to_le_bytes());
        body[8..16].copy_from_slice(&((2u64 << 20) - 4).to_le_bytes());
        body[16..20].copy_from_slice(&4u32.to_le_bytes());
        req.extend_from_slice(&body);
        req.extend_from_slice(&vec![0xffu8; 4096]);
        let (_, out) = send(&h, &m, &req, 4096);
        assert_eq!(reply_error(&out), (-libc::EINVAL, 20));
        // Reads are at most 1 MiB each (READ_BYTES_MAX).
        let mut w = VecWriter(Vec::new());
        for off in [0u64, 1 << 20] {
            let n =
                f.fs.read(root(), file, fh, &mut w, 1 << 20, off, None, 0)
                    .unwrap();
            assert_eq!(n, 1 << 20, "read at {off}");
        }
        assert!(w.0 == secret, "neighbouring file changed");
        // READ size 8 at the victim's end into a 64 KiB buffer: 4 bytes come back, and the
        // rest of the buffer keeps what the guest put there.
        let mut req = header(40 + 40, 15, 21, victim);
        let mut body = vec![0u8; 40];
        body[0..8].copy_from_slice(&vh.to_le_bytes());
        body[8..16].copy_from_slice(&((2u64 << 20) - 4).to_le_bytes());
        body[16..20].copy_from_slice(&8u32.to_le_bytes());
        req.extend_from_slice(&body);
        let (used, _) = send(&h, &m, &req, 0x1_0000);
        assert_eq!(used, 16 + 4);
        let mut buf = vec![0u8; 0x1_0000];
        m.read_slice(&mut buf, GuestAddress(OUT_ADDR)).unwrap();
        assert_eq!(&buf[16..20], &[1, 1, 1, 1]);
        assert!(
            buf[20..].iter().all(|&b| b == 0xee),
            "bytes past the reply were written"
        );
    }

    /// A READ larger than the 1 MiB limit, into one buffer of exactly its size: the server
    /// reads at most 1 MiB, and nothing past it — the next file's block on the device — may
    /// reach guest memory. (The reply alone cannot show it: the leak came with an error.)
    #[test]
    fn oversized_read_leaks_nothing_past_the_file() {
        let f = fixture();
        let mib = 1usize << 20;
        let (a, ah) = f.create(root(), ROOT, "a", 0o644).unwrap();
        let (b, bh) = f.create(root(), ROOT, "b", 0o644).unwrap();
        for (node, h, byte) in [(a, ah, 0xaau8), (b, bh, 0x5b)] {
            let data = vec![byte; mib];
            let n =
                f.fs.write(
                    root(),
                    node,
                    h,
                    SliceReader(&data),
                    mib as u32,
                    0,
                    None,
                    false,
                    false,
                    0,
                )
                .unwrap();
            assert_eq!(n, mib);
        }
        // The test is about B's block following A's on the device: check that it does.
        let dev = |node| {
            let mut plan = Vec::new();
            // The pin only matters while reading; the layout is what this checks.
            let (_, _pin) = f
                .fs_ds()
                .read_plan(f.fs_ino(node), 0, mib as u64, &mut plan)
                .unwrap();
            match plan.as_slice() {
                [vmfs::Extent::Device { offset, len }] if *len == mib as u64 => *offset,
                other => panic!("unexpected layout {other:?}"),
            }
        };
        assert_eq!(
            dev(b),
            dev(a) + mib as u64,
            "B does not follow A on the device"
        );
        let h = ShareHandler::new(f.fs.clone());
        let m = big_mem();
        init(&h, &m);
        let size = (mib + (64 << 10)) as u32;
        let mut req = header(40 + 40, 15, 30, a);
        let mut body = vec![0u8; 40];
        body[0..8].copy_from_slice(&ah.to_le_bytes());
        body[16..20].copy_from_slice(&size.to_le_bytes());
        req.extend_from_slice(&body);
        let (used, _) = send(&h, &m, &req, 16 + size);
        let mut buf = vec![0u8; 16 + size as usize];
        m.read_slice(&mut buf, GuestAddress(OUT_ADDR)).unwrap();
        assert!(
            !buf[16 + mib..].contains(&0x5b),
            "bytes of the next file on the device reached the guest"
        );
        // Served, through an exact copy: A's 1 MiB and nothing after it.
        assert_eq!(reply_error(&buf[..16]), (0, 30));
        assert_eq!(used as usize, 16 + mib);
        assert!(buf[16..16 + mib].iter().all(|&x| x == 0xaa));
        assert!(buf[16 + mib..].iter().all(|&x| x == 0xee));
    }

    /// A WRITE request with `size` and `payload` bytes of data for node `node`, handle `fh`.
    /// The header's length is capped at what virtiofsd's server accepts: nothing checks it
    /// against the bytes the chain really carries, so a hostile guest can understate it.
    fn write_req(
        unique: u64,
        node: u64,
        fh: u64,
        offset: u64,
        size: u32,
        payload: &[u8],
    ) -> Vec<u8> {
        let len = (80 + payload.len()).min(80 + crate::fs::WRITE_BYTES_MAX as usize);
        let mut req = header(len as u32, 16, unique, node);
        let mut body = vec![0u8; 40];
        body[0..8].copy_from_slice(&fh.to_le_bytes());
        body[8..16].copy_from_slice(&offset.to_le_bytes());
        body[16..20].copy_from_slice(&size.to_le_bytes());
        req.extend_from_slice(&body);
        req.extend_from_slice(payload);
        req
    }

    /// WRITE sizes above the max_write that INIT announces are refused before any byte is
    /// copied, and the per-thread scratch file never keeps more than its bound.
    #[test]
    fn writes_above_max_write_are_refused_and_scratch_shrinks() {
        let f = fixture();
        let (file, fh) = f.create(root(), ROOT, "w", 0o644).unwrap();
        let h = ShareHandler::new(f.fs.clone());
        let m = big_mem();
        // INIT announces max_write (fuse_init_out bytes 20..24 after the header).
        let mut req = header(40 + 64, 26, 1, 0);
        let mut body = vec![0u8; 64];
        body[0..4].copy_from_slice(&7u32.to_le_bytes());
        body[4..8].copy_from_slice(&38u32.to_le_bytes());
        req.extend_from_slice(&body);
        let (_, out) = send(&h, &m, &req, 4096);
        let max_write = u32::from_le_bytes(out[36..40].try_into().unwrap());
        assert_eq!(max_write, crate::fs::WRITE_BYTES_MAX);
        // 3 MiB with a matching payload, in one descriptor, at an offset no single file
        // block covers (so the data would take the scratch path).
        let size = 3u32 << 20;
        let payload = vec![0x77u8; size as usize];
        let req = write_req(40, file, fh, 4096, size, &payload);
        let (_, out) = send_at(&h, &m, &req, 4096, REQ_ADDR, 0x3f_0000);
        assert_eq!(reply_error(&out), (-libc::EINVAL, 40));
        assert_eq!(f.fs.getattr(root(), file, None).unwrap().0.size, 0);
        assert!(
            crate::fs::scratch_bytes() <= crate::fs::SCRATCH_KEEP_BYTES,
            "scratch holds {} bytes",
            crate::fs::scratch_bytes()
        );
        // A write of exactly max_write through the scratch path is served, and the scratch
        // file is shrunk afterwards.
        let payload = vec![0x78u8; max_write as usize];
        let (_, out) = send(
            &h,
            &m,
            &write_req(41, file, fh, 4096, max_write, &payload),
            4096,
        );
        assert_eq!(reply_error(&out), (0, 41));
        assert_eq!(
            f.fs.getattr(root(), file, None).unwrap().0.size,
            4096 + u64::from(max_write)
        );
        assert!(crate::fs::scratch_bytes() <= crate::fs::SCRATCH_KEEP_BYTES);
    }

    /// One step of a guest session. Nodes and handles are indices into what earlier replies
    /// returned (taken modulo their number), so requests reach real objects.
    #[derive(Debug, Clone)]
    enum Step {
        Lookup {
            dir: usize,
            name: usize,
        },
        Create {
            dir: usize,
            name: usize,
            mode: u32,
            flags: u32,
        },
        Mkdir {
            dir: usize,
            name: usize,
            mode: u32,
        },
        Mknod {
            dir: usize,
            name: usize,
            mode: u32,
        },
        Symlink {
            dir: usize,
            name: usize,
            target: usize,
        },
        Link {
            node: usize,
            dir: usize,
            name: usize,
        },
        Open {
            node: usize,
            flags: u32,
        },
        Opendir {
            node: usize,
        },
        Read {
            node: usize,
            fh: usize,
            offset: u64,
            size: u32,
            out_len: u32,
        },
        Write {
            node: usize,
            fh: usize,
            offset: u64,
            size: u32,
            payload: u32,
            honest: bool,
        },
        Setattr {
            node: usize,
            fh: usize,
            valid: u32,
            size: u64,
            mode: u32,
            uid: u32,
        },
        Fallocate {
            node: usize,
            fh: usize,
            mode: u32,
            offset: u64,
            length: u64,
        },
        Setxattr {
            node: usize,
            name: usize,
            value: u32,
        },
        Getxattr {
            node: usize,
            name: usize,
            size: u32,
        },
        Release {
            node: usize,
            fh: usize,
            dir: bool,
        },
        Forget {
            node: usize,
            count: u64,
        },
        Unlink {
            dir: usize,
            name: usize,
        },
        Rmdir {
            dir: usize,
            name: usize,
        },
        Rename {
            from: usize,
            name: usize,
            to: usize,
            new_name: usize,
            flags: u32,
        },
        Readdir {
            node: usize,
            fh: usize,
            plus: bool,
        },
        Simple {
            node: usize,
            opcode: u32,
        },
    }

    const NAMES: [&str; 5] = ["a", "b", "c", "dir", "x.img"];
    const XATTRS: [&str; 4] = [
        "user.k",
        "system.posix_acl_access",
        "trusted.t",
        "system.posix_acl_default",
    ];
    /// Callers: root, users of the map, and one outside it (refused with EPERM).
    const UIDS: [u32; 5] = [0, ALICE, BOB, CAROL, 4_000_000];
    const MIB: u32 = 1 << 20;

    fn open_flags() -> impl Strategy<Value = u32> {
        prop_oneof![
            Just(libc::O_RDWR as u32),
            Just((libc::O_WRONLY | libc::O_TRUNC) as u32),
            Just(libc::O_RDONLY as u32),
            Just((libc::O_RDWR | libc::O_EXCL) as u32),
            any::<u32>(),
        ]
    }

    fn step() -> impl Strategy<Value = Step> {
        let i = || 0usize..64;
        let size = prop_oneof![
            0u32..9000,
            Just(MIB),
            Just(MIB + 1),
            Just(u32::MAX),
            any::<u32>()
        ];
        let offset =
            prop_oneof![6 => 0u64..(3 << 20), 1 => Just(u64::MAX - 4096), 1 => any::<u64>()];
        prop_oneof![
            1 => (i(), i()).prop_map(|(dir, name)| Step::Lookup { dir, name }),
            3 => (i(), i(), prop_oneof![Just(0o644u32), Just(0o777), Just(0o600), any::<u32>()], open_flags())
                .prop_map(|(dir, name, mode, flags)| Step::Create { dir, name, mode, flags }),
            1 => (i(), i(), any::<u32>()).prop_map(|(dir, name, mode)| Step::Mkdir { dir, name, mode }),
            1 => (i(), i(), any::<u32>()).prop_map(|(dir, name, mode)| Step::Mknod { dir, name, mode }),
            1 => (i(), i(), i()).prop_map(|(dir, name, target)| Step::Symlink { dir, name, target }),
            1 => (i(), i(), i()).prop_map(|(node, dir, name)| Step::Link { node, dir, name }),
            2 => (i(), open_flags()).prop_map(|(node, flags)| Step::Open { node, flags }),
            1 => i().prop_map(|node| Step::Opendir { node }),
            3 => (i(), i(), offset.clone(), size.clone(), prop_oneof![0u32..64, 16u32..9000, Just(16 + MIB), Just(16 + MIB + 4096)])
                .prop_map(|(node, fh, offset, size, out_len)| Step::Read { node, fh, offset, size, out_len }),
            5 => (i(), i(), offset.clone(), prop_oneof![6 => 0u32..9000, 2 => Just(MIB), 1 => Just(MIB + 1), 1 => any::<u32>()], prop_oneof![4 => Just(None), 1 => (0u32..9000).prop_map(Some)], any::<bool>())
                // Mostly a payload of the stated size (capped to what guest memory holds).
                .prop_map(|(node, fh, offset, size, payload, honest)| Step::Write {
                    node, fh, offset, size, payload: payload.unwrap_or(size).min(0x17_0000), honest
                }),
            1 => (i(), i(), any::<u32>(), offset.clone(), any::<u32>(), prop::sample::select(&UIDS[..]))
                .prop_map(|(node, fh, valid, size, mode, uid)| Step::Setattr { node, fh, valid, size, mode, uid }),
            2 => (i(), i(), prop_oneof![Just(0u32), Just(1), Just(3), any::<u32>()], offset, prop_oneof![0u64..(8 << 20), any::<u64>()])
                .prop_map(|(node, fh, mode, offset, length)| Step::Fallocate { node, fh, mode, offset, length }),
            1 => (i(), i(), prop_oneof![0u32..100, Just(65_536), Just(70_000), Just(MIB)])
                .prop_map(|(node, name, value)| Step::Setxattr { node, name, value }),
            1 => (i(), i(), prop_oneof![Just(0u32), 1u32..200, Just(MIB + 1)])
                .prop_map(|(node, name, size)| Step::Getxattr { node, name, size }),
            1 => (i(), i(), any::<bool>()).prop_map(|(node, fh, dir)| Step::Release { node, fh, dir }),
            1 => (i(), prop_oneof![Just(1u64), any::<u64>()]).prop_map(|(node, count)| Step::Forget { node, count }),
            1 => (i(), i()).prop_map(|(dir, name)| Step::Unlink { dir, name }),
            1 => (i(), i()).prop_map(|(dir, name)| Step::Rmdir { dir, name }),
            1 => (i(), i(), i(), i(), prop_oneof![Just(0u32), Just(1), Just(2), any::<u32>()])
                .prop_map(|(from, name, to, new_name, flags)| Step::Rename { from, name, to, new_name, flags }),
            1 => (i(), i(), any::<bool>()).prop_map(|(node, fh, plus)| Step::Readdir { node, fh, plus }),
            1 => (i(), prop::sample::select(&[3u32, 5, 17, 20, 23, 25, 34, 46][..]))
                .prop_map(|(node, opcode)| Step::Simple { node, opcode }),
        ]
    }

    /// What the session has learnt from replies.
    struct Session {
        nodes: Vec<u64>,
        /// (node, handle, opened for writing).
        handles: Vec<(u64, u64, bool)>,
        unique: u64,
    }

    impl Session {
        fn node(&self, i: usize) -> u64 {
            self.nodes[i % self.nodes.len()]
        }

        /// A handle (with its node), or a made-up one when none is open. Half the time the
        /// newest one (opened for writing when `write`): sessions mostly use what they opened.
        fn handle(&self, i: usize, node: usize, write: bool) -> (u64, u64) {
            let newest = self.handles.iter().rev().find(|h| h.2 || !write);
            match (newest, self.handles.len()) {
                (Some(&(n, h, _)), _) if i < 32 => (n, h),
                (_, 0) => (self.node(node), i as u64),
                (_, len) => {
                    let (n, h, _) = self.handles[i % len];
                    (n, h)
                }
            }
        }
    }

    fn cstr(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    }

    fn le32(v: &mut Vec<u8>, x: u32) {
        v.extend_from_slice(&x.to_le_bytes());
    }

    fn le64(v: &mut Vec<u8>, x: u64) {
        v.extend_from_slice(&x.to_le_bytes());
    }

    /// Builds the request of one step: (opcode, node, body, reply buffer size).
    fn build(s: &Session, st: &Step) -> (u32, u64, Vec<u8>, u32) {
        let mut b = Vec::new();
        let name = |i: usize| cstr(NAMES[i % NAMES.len()]);
        match *st {
            Step::Lookup { dir, name: n } => {
                b.extend(name(n));
                (1, s.node(dir), b, 4096)
            }
            Step::Create {
                dir,
                name: n,
                mode,
                flags,
            } => {
                le32(&mut b, flags);
                le32(&mut b, mode);
                le32(&mut b, 0o022);
                le32(&mut b, 0);
                b.extend(name(n));
                (35, s.node(dir), b, 4096)
            }
            Step::Mkdir { dir, name: n, mode } => {
                le32(&mut b, mode);
                le32(&mut b, 0o022);
                b.extend(name(n));
                (9, s.node(dir), b, 4096)
            }
            Step::Mknod { dir, name: n, mode } => {
                le32(&mut b, mode);
                le32(&mut b, 0);
                le32(&mut b, 0o022);
                le32(&mut b, 0);
                b.extend(name(n));
                (8, s.node(dir), b, 4096)
            }
            Step::Symlink {
                dir,
                name: n,
                target,
            } => {
                b.extend(name(n));
                b.extend(name(target));
                (6, s.node(dir), b, 4096)
            }
            Step::Link { node, dir, name: n } => {
                le64(&mut b, s.node(node));
                b.extend(name(n));
                (13, s.node(dir), b, 4096)
            }
            Step::Open { node, flags } => {
                le32(&mut b, flags);
                le32(&mut b, 0);
                (14, s.node(node), b, 4096)
            }
            Step::Opendir { node } => {
                le32(&mut b, 0);
                le32(&mut b, 0);
                (27, s.node(node), b, 4096)
            }
            Step::Read {
                node,
                fh,
                offset,
                size,
                out_len,
            } => {
                let (n, h) = s.handle(fh, node, false);
                le64(&mut b, h);
                le64(&mut b, offset);
                le32(&mut b, size);
                b.extend_from_slice(&[0u8; 20]);
                (15, n, b, out_len)
            }
            Step::Write {
                node,
                fh,
                offset,
                size,
                payload,
                ..
            } => {
                let (n, h) = s.handle(fh, node, true);
                le64(&mut b, h);
                le64(&mut b, offset);
                le32(&mut b, size);
                b.extend_from_slice(&[0u8; 20]);
                b.extend(std::iter::repeat_n(0x5au8, payload as usize));
                (16, n, b, 4096)
            }
            Step::Setattr {
                node,
                fh,
                valid,
                size,
                mode,
                uid,
            } => {
                let (_, h) = s.handle(fh, node, true);
                le32(&mut b, valid);
                le32(&mut b, 0);
                le64(&mut b, h);
                le64(&mut b, size);
                b.extend_from_slice(&[0u8; 32]); // lock_owner, atime, mtime, ctime
                b.extend_from_slice(&[0u8; 12]); // *nsec
                le32(&mut b, mode);
                le32(&mut b, 0);
                le32(&mut b, uid);
                le32(&mut b, uid);
                le32(&mut b, 0);
                (4, s.node(node), b, 4096)
            }
            Step::Fallocate {
                node,
                fh,
                mode,
                offset,
                length,
            } => {
                let (n, h) = s.handle(fh, node, true);
                le64(&mut b, h);
                le64(&mut b, offset);
                le64(&mut b, length);
                le32(&mut b, mode);
                le32(&mut b, 0);
                (43, n, b, 4096)
            }
            Step::Setxattr {
                node,
                name: n,
                value,
            } => {
                le32(&mut b, value);
                le32(&mut b, 0);
                b.extend(cstr(XATTRS[n % XATTRS.len()]));
                b.extend(std::iter::repeat_n(2u8, value as usize));
                (21, s.node(node), b, 4096)
            }
            Step::Getxattr {
                node,
                name: n,
                size,
            } => {
                le32(&mut b, size);
                le32(&mut b, 0);
                b.extend(cstr(XATTRS[n % XATTRS.len()]));
                (22, s.node(node), b, 4096)
            }
            Step::Release { node, fh, dir } => {
                let (n, h) = s.handle(fh, node, false);
                le64(&mut b, h);
                b.extend_from_slice(&[0u8; 16]);
                (if dir { 29 } else { 18 }, n, b, 4096)
            }
            Step::Forget { node, count } => {
                le64(&mut b, count);
                (2, s.node(node), b, 0)
            }
            Step::Unlink { dir, name: n } => {
                b.extend(name(n));
                (10, s.node(dir), b, 4096)
            }
            Step::Rmdir { dir, name: n } => {
                b.extend(name(n));
                (11, s.node(dir), b, 4096)
            }
            Step::Rename {
                from,
                name: n,
                to,
                new_name,
                flags,
            } => {
                le64(&mut b, s.node(to));
                if flags != 0 {
                    le32(&mut b, flags);
                    le32(&mut b, 0);
                }
                b.extend(name(n));
                b.extend(name(new_name));
                (if flags != 0 { 45 } else { 12 }, s.node(from), b, 4096)
            }
            Step::Readdir { node, fh, plus } => {
                let (n, h) = s.handle(fh, node, false);
                le64(&mut b, h);
                le64(&mut b, 0);
                le32(&mut b, 4096);
                b.extend_from_slice(&[0u8; 20]);
                let _ = node;
                (if plus { 44 } else { 28 }, n, b, 4096)
            }
            Step::Simple { node, opcode } => {
                let (_, h) = s.handle(0, node, false);
                match opcode {
                    3 => b.extend_from_slice(&[0u8; 16]),
                    20 | 25 => {
                        le64(&mut b, h);
                        b.extend_from_slice(&[0u8; 16]);
                    }
                    23 => {
                        le32(&mut b, 4096);
                        le32(&mut b, 0);
                    }
                    34 => {
                        le32(&mut b, 4);
                        le32(&mut b, 0);
                    }
                    46 => {
                        le64(&mut b, h);
                        le64(&mut b, 0);
                        le32(&mut b, 3);
                        le32(&mut b, 0);
                    }
                    _ => {}
                }
                (opcode, s.node(node), b, 4096)
            }
        }
    }

    fn header_as(len: u32, opcode: u32, unique: u64, nodeid: u64, uid: u32) -> Vec<u8> {
        let mut h = header(len, opcode, unique, nodeid);
        h[24..28].copy_from_slice(&uid.to_le_bytes());
        h[28..32].copy_from_slice(&uid.to_le_bytes());
        h
    }

    /// Runs a session; returns nothing, asserting the invariants after every request.
    fn run_session(steps: &[(Step, u32)]) -> Result<(), TestCaseError> {
        // Small limits, so sessions reach them.
        const QUOTA_BYTES: u64 = 4 << 20;
        const QUOTA_INODES: u64 = 24;
        let f = fixture();
        let share = ShareSettings {
            quota: crate::quota::QuotaLimits {
                bytes: Some(QUOTA_BYTES),
                inodes: Some(QUOTA_INODES),
            },
            ..settings(f._dir.path(), "0:0:1;1000:1000:100")
        };
        let fs = VmfsFs::new(f.ds.clone(), "shares/session", share).unwrap();
        // Everyone may create in the share's root (sticky, as /tmp).
        let attr = fuse::SetattrIn {
            mode: 0o1777,
            ..Default::default()
        };
        fs.setattr(root(), ROOT, attr, None, SetattrValid::MODE)
            .unwrap();
        let h = ShareHandler::new(fs.clone());
        let m = big_mem();
        init(&h, &m);
        let mut s = Session {
            nodes: vec![ROOT],
            handles: Vec::new(),
            unique: 100,
        };
        for (st, uid) in steps {
            let (opcode, node, body, out_len) = build(&s, st);
            s.unique += 1;
            let honest = !matches!(st, Step::Write { honest: false, .. });
            let len = if honest {
                40 + body.len()
            } else {
                (40 + body.len()).min(80 + MIB as usize)
            };
            let mut req = header_as(len as u32, opcode, s.unique, node, *uid);
            req.extend_from_slice(&body);
            // Requests up to 1.5 MiB at 1 MiB; replies up to 1.5 MiB after them.
            prop_assert!(req.len() <= 0x18_0000 && out_len <= 0x18_0000);
            let (used, out) = send_at(&h, &m, &req, out_len, 0x10_0000, 0x28_0000);
            prop_assert_eq!(
                h.counters()
                    .panics
                    .load(std::sync::atomic::Ordering::Relaxed),
                0
            );
            prop_assert!(used <= out_len);
            if opcode == 2 {
                prop_assert_eq!(used, 0, "FORGET has no reply");
                continue;
            }
            if used == 0 {
                // Only a reply buffer too short for a header goes unanswered.
                prop_assert!(out_len < 16, "no reply to {:?}", st);
                continue;
            }
            prop_assert!(used >= 16);
            let len = u32::from_le_bytes(out[0..4].try_into().unwrap());
            let (err, unique) = reply_error(&out);
            prop_assert_eq!(len, used, "reply length");
            prop_assert_eq!(unique, s.unique);
            prop_assert!((-4095..=0).contains(&err), "errno {}", err);
            if err != 0 {
                prop_assert_eq!(used, 16);
                continue;
            }
            let word = |at: usize| u64::from_le_bytes(out[at..at + 8].try_into().unwrap());
            match *st {
                Step::Lookup { .. }
                | Step::Mkdir { .. }
                | Step::Mknod { .. }
                | Step::Symlink { .. }
                | Step::Link { .. } => s.nodes.push(word(16)),
                Step::Create { flags, .. } => {
                    s.nodes.push(word(16));
                    s.handles.push((word(16), word(16 + 128), flags & 3 != 0));
                }
                Step::Open { flags, .. } => s.handles.push((node, word(16), flags & 3 != 0)),
                Step::Opendir { .. } => s.handles.push((node, word(16), false)),
                Step::Release { .. } => {
                    let fh = u64::from_le_bytes(body[0..8].try_into().unwrap());
                    s.handles.retain(|&(_, h, _)| h != fh);
                }
                Step::Read { size, .. } => {
                    prop_assert!(used as usize - 16 <= (size.min(MIB)) as usize);
                }
                _ => {}
            }
            let c = fs.counters();
            prop_assert_eq!(
                c.handles.load(std::sync::atomic::Ordering::Relaxed),
                s.handles.len() as u64
            );
            let (bytes, inodes) = fs.quota().used();
            // Directory growth may pass the byte limit by a block.
            prop_assert!(bytes <= QUOTA_BYTES + u64::from(MIB), "{bytes}");
            prop_assert!(inodes <= QUOTA_INODES);
            prop_assert!(crate::fs::scratch_bytes() <= crate::fs::SCRATCH_KEEP_BYTES);
        }
        // The guest goes away: its handles close, counted usage matches a fresh count, and
        // the datastore is consistent.
        h.disconnected(1);
        prop_assert_eq!(
            fs.counters()
                .handles
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        let fresh = VmfsFs::new(
            f.ds.clone(),
            "shares/session",
            ShareSettings {
                quota: fs.quota().limits(),
                ..settings(f._dir.path(), "")
            },
        )
        .unwrap();
        prop_assert_eq!(fresh.quota().used(), fs.quota().used());
        f.ds.unmount().unwrap();
        let report = vmfs::fsck::fsck(&**f.ds.device()).unwrap();
        prop_assert!(report.clean(), "fsck: {:?}", report.problems);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]
        /// A guest session: requests on one share reusing the node ids and handles earlier
        /// replies gave, as random users, with large WRITE, READ and SETXATTR sizes.
        #[test]
        fn sessions_keep_the_share_consistent(
            steps in proptest::collection::vec(
                (step(), prop_oneof![2 => Just(0u32), 1 => prop::sample::select(&UIDS[..])]),
                1..60,
            )
        ) {
            run_session(&steps)?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]
        #[test]
        fn random_requests_never_panic(
            opcode in prop_oneof![1u32..=52, Just(4096u32), any::<u32>()],
            nodeid in prop_oneof![Just(1u64), 0u64..64, any::<u64>()],
            len_delta in -48i64..256,
            body in proptest::collection::vec(any::<u8>(), 0..300),
            out_len in prop_oneof![Just(0u32), 1u32..64, Just(4096u32)],
        ) {
            let f = fixture();
            let h = ShareHandler::new(f.fs.clone());
            let m = mem();
            init(&h, &m);
            let len = (40 + body.len() as i64 + len_delta).max(0) as u32;
            let mut req = header(len, opcode, 77, nodeid);
            req.extend_from_slice(&body);
            let (used, _) = send(&h, &m, &req, out_len);
            prop_assert!(used <= out_len);
            prop_assert_eq!(h.counters().panics.load(std::sync::atomic::Ordering::Relaxed), 0);
        }
    }
}

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
