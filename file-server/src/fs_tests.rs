//! VmfsFs through virtiofsd's FileSystem trait, as the FUSE server calls it: permission checks
//! (modes, ACLs, groups, sticky), the cache's invalidation, names, symlinks, data.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use strata_perm::acl::{Acl, AclEntry, AclTag};
use strata_perm::cache::{PermCache, PermCacheConfig};
use strata_perm::identity::GroupSource;
use strata_perm::idmap::IdMap;
use virtiofsd::filesystem::{
    Context, Extensions, FileSystem, SetattrValid, SetxattrFlags, ZeroCopyReader, ZeroCopyWriter,
};
use virtiofsd::fuse;
use vmfs::device::FileDevice;
use vmfs::fs::{Datastore, MkfsOptions};

use crate::fs::{CachePolicy, ShareSettings, VmfsFs, XATTR_ACL_ACCESS, XATTR_ACL_DEFAULT};

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

    /// Sends `req` (readable) with `out_len` writable bytes; returns (used, reply bytes).
    fn send(h: &ShareHandler, m: &FsMemory, req: &[u8], out_len: u32) -> (u32, Vec<u8>) {
        let vq = MockSplitQueue::new(m, 16);
        let mut descs = vec![];
        if !req.is_empty() {
            descs.push((REQ_ADDR, req.len() as u32, false));
        }
        if out_len > 0 {
            descs.push((OUT_ADDR, out_len, true));
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
        m.write_slice(req, GuestAddress(REQ_ADDR)).unwrap();
        m.write_slice(&vec![0xeeu8; out_len as usize], GuestAddress(OUT_ADDR))
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.pop_descriptor_chain(m).unwrap();
        let used = h.handle(1, m, chain);
        let mut out = vec![0u8; used as usize];
        m.read_slice(&mut out, GuestAddress(OUT_ADDR)).unwrap();
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
        f.fs.write(
            root(),
            file,
            h,
            SliceReader(&mib),
            1 << 20,
            i << 20,
            None,
            false,
            false,
            0,
        )
        .unwrap();
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

/// Issue 12 finding 2: open with O_TRUNC (and create on an existing file) used to truncate a
/// file a disk backend serves, freeing blocks the VM keeps using. vmfs now refuses it itself
/// (the disk holds an extent lease), whatever guard the caller remembers.
#[test]
fn o_trunc_open_of_a_served_disk_file_is_refused_and_keeps_its_blocks() {
    let f = fixture();
    let (file, h) = f.create(root(), ROOT, "disk.img", 0o666).unwrap();
    let mib = vec![7u8; 1 << 20];
    for i in 0..2u64 {
        f.fs.write(
            root(),
            file,
            h,
            SliceReader(&mib),
            1 << 20,
            i << 20,
            None,
            false,
            false,
            0,
        )
        .unwrap();
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
