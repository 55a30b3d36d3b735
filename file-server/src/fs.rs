//! [`VmfsFs`]: virtiofsd's `FileSystem` trait over a directory tree of a vmfs datastore.
//!
//! FUSE node ids are vmfs inode numbers, except that the share's root directory is node 1
//! (FUSE's root) and the datastore root — never reachable from inside a share — takes the
//! share root's number: a bijection, so no table is needed.
//!
//! Every operation is checked here, on the server, as the caller described by the FUSE header
//! (uid, gid mapped through the share's id maps; supplementary groups from the share's group
//! file): the guest kernel checks too, but a guest is not trusted to. Checks use the exact
//! POSIX.1e evaluation of `posix_perm` through the permission-profile cache. I/O on an open
//! handle uses the grant made at open (as SMB servers do), not a check per read or write.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use posix_perm::acl::{inherit, Acl};
use posix_perm::cache::ProfileKey;
use posix_perm::eval::{profile, with_root_override, Cred, Object, Profile};
use virtiofsd::filesystem::{
    Context, DirEntry, DirectoryIterator, Entry, Extensions, FileSystem, FsOptions, GetxattrReply,
    ListxattrReply, OpenOptions, SerializableFileSystem, SetattrValid, SetxattrFlags,
    ZeroCopyReader, ZeroCopyWriter,
};
use virtiofsd::fuse;
use virtiofsd::soft_idmap::Id;
use vmfs::format::{Inode, S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFREG, S_IFSOCK};
use vmfs::fs::{Datastore, FsError};
use vmfs::{Extent, RenameFlags, SetAttr, TimeSet, Whence, XattrSetMode};

use crate::quota::{allocated_bytes, write_bound, Quota};
use crate::settings::{ShareError, ShareSettings};

/// Name of the access ACL xattr (Linux).
pub const XATTR_ACL_ACCESS: &[u8] = b"system.posix_acl_access";
/// Name of the default ACL xattr (Linux).
pub const XATTR_ACL_DEFAULT: &[u8] = b"system.posix_acl_default";
/// Open handles per share: bounds the handle table a guest can grow (the guest kernel keeps
/// one per open file; Linux's default RLIMIT_NOFILE hard limit is far below this per process).
pub const HANDLES_MAX: usize = 65_536;
/// Directory entries produced per READDIR(PLUS) call: a 4 KiB buffer holds about 100 plain
/// entries or 25 "plus" entries; more would only be discarded.
const READDIR_ENTRIES_MAX: usize = 128;
/// Bytes read or written per scratch copy (resident data, unaligned writes): the FUSE limit
/// on one request's payload (virtiofsd's MAX_BUFFER_SIZE).
const SCRATCH_BYTES_MAX: usize = 1 << 20;
/// Bytes one READ returns at most: the protocol's buffer limit (virtiofsd's MAX_BUFFER_SIZE,
/// also the max_write announced at INIT).
pub const READ_BYTES_MAX: u32 = 1 << 20;
/// Bytes one WRITE may carry: the max_write virtiofsd's server announces at INIT (its
/// MAX_BUFFER_SIZE). A guest kernel never sends more; a larger one is hostile.
pub const WRITE_BYTES_MAX: u32 = 1 << 20;
/// Bytes the per-thread scratch file may keep between requests: one scratch copy is up to
/// SCRATCH_BYTES_MAX, and keeping that per polling thread would pin memory for nothing;
/// small copies (resident files, short unaligned writes) keep their pages.
pub const SCRATCH_KEEP_BYTES: u64 = 64 << 10;
/// The id shown for host ids that the share's map does not cover.
pub const OVERFLOW_ID: u32 = 65_534;

const MAY_READ: u8 = 4;
const MAY_WRITE: u8 = 2;
const MAY_EXEC: u8 = 1;
const S_ISUID: u32 = 0o4000;
const S_ISGID: u32 = 0o2000;
const S_ISVTX: u32 = 0o1000;
const S_IXGRP: u32 = 0o010;

std::thread_local! {
    /// The vhost-user connection the current request came from (set by the request handler;
    /// FUSE's Context has no room for it). Keys per-VM state such as cached profiles.
    static CURRENT_CONN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// Scratch file for data that is not readable in place (resident bytes, partial writes):
    /// virtiofsd's zero-copy readers and writers move bytes only between guest memory and a
    /// file, so small data takes a detour through this memfd.
    static SCRATCH: std::cell::RefCell<Option<File>> = const { std::cell::RefCell::new(None) };
    /// Bytes of the current READ's data buffer (the reply buffer past its header), set by the
    /// request handler; `None` when unknown. virtiofsd's zero-copy writer fills whole guest
    /// buffers, whatever count it is given, so the datastore file is read straight into
    /// guest memory only when the bytes to return fill the buffer exactly: otherwise bytes
    /// past the extent — other files' data, other VMs' disks — would reach the guest. It is
    /// the buffer's size, not the guest's `size`, that matters: the server clamps `size`.
    static READ_BUFFER: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Tells the file system the size of the current READ's data buffer (`None`: not known, so
/// every read goes through an exact-length copy).
pub fn set_read_buffer(bytes: Option<u64>) {
    READ_BUFFER.with(|c| c.set(bytes));
}

/// Sets the connection whose requests this thread serves next.
pub fn set_current_conn(conn: u64) {
    CURRENT_CONN.with(|c| c.set(conn));
}

fn current_conn() -> u64 {
    CURRENT_CONN.with(|c| c.get())
}

fn with_scratch<T>(f: impl FnOnce(&File) -> io::Result<T>) -> io::Result<T> {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.is_none() {
            // SAFETY: memfd_create reads the NUL-terminated name and returns a new fd or -1.
            let fd =
                unsafe { libc::memfd_create(c"strata-fs-scratch".as_ptr(), libc::MFD_CLOEXEC) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: fd is a fresh descriptor nothing else owns.
            *s = Some(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) });
        }
        let Some(file) = s.as_ref() else {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        };
        let r = f(file);
        // Shrink what a large copy left; a file that cannot be shrunk is dropped (its pages
        // go with it) and made again next time.
        let big = file.metadata().map(|m| m.len() > SCRATCH_KEEP_BYTES);
        if !matches!(big, Ok(false)) && file.set_len(0).is_err() {
            *s = None;
        }
        r
    })
}

/// Bytes the current thread's scratch file holds (tests check its bound).
#[cfg(test)]
pub(crate) fn scratch_bytes() -> u64 {
    SCRATCH.with(|s| {
        s.borrow()
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len())
    })
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

fn fs_err(e: FsError) -> io::Error {
    let n = e.errno();
    if n == libc::EIO || n == libc::EUCLEAN {
        // Not a caller's mistake: the datastore failed or found corruption.
        tracing::warn!(err = %e, "datastore error");
    }
    errno(n)
}

/// Counters of one share (besides the permission cache's own).
#[derive(Debug, Default)]
pub struct FsCounters {
    /// Requests refused by a server-side permission check.
    pub denied: AtomicU64,
    /// Requests refused because the caller's id is outside the share's map.
    pub unmapped_ids: AtomicU64,
    /// Open handles now.
    pub handles: AtomicU64,
    /// Requests naming a node id the guest never looked up (refused with ESTALE).
    pub unknown_nodes: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct Handle {
    ino: u64,
    read: bool,
    write: bool,
}

/// The caller of one request, in datastore ids.
struct Caller {
    uid: u32,
    gid: u32,
    groups: Arc<[u32]>,
    groups_epoch: u64,
}

impl Caller {
    fn is_root(&self) -> bool {
        self.uid == 0
    }

    fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.binary_search(&gid).is_ok()
    }

    fn cred(&self) -> Cred<'_> {
        Cred {
            uid: self.uid,
            gid: self.gid,
            groups: &self.groups,
        }
    }
}

#[derive(Default)]
struct State {
    /// FUSE lookup counts per vmfs inode, with the inode's generation at lookup: a node id
    /// is usable while counted here and while its inode was not freed and reused since.
    lookups: HashMap<u64, (u64, u32)>,
    handles: HashMap<u64, Handle>,
    next_handle: u64,
}

/// A share: one directory tree of a datastore served over FUSE. Cloning is cheap and
/// shares everything (the protocol server owns one clone, the control plane another).
#[derive(Debug, Clone)]
pub struct VmfsFs {
    ds: Arc<Datastore>,
    root: u64,
    settings: Arc<ShareSettings>,
    state: Arc<Mutex<State>>,
    dev_file: Option<Arc<File>>,
    zero: Arc<File>,
    counters: Arc<FsCounters>,
    /// The share's space limits and usage.
    quota: Arc<Quota>,
    /// Requests that can free blocks or inodes (unlink, rmdir, rename, setattr, fallocate,
    /// open with O_TRUNC, release) hold it exclusively; all others share it. A request that
    /// resolved a node or planned device extents thus finishes before anything it uses can
    /// be freed — and reused by another file, share or disk. Taken by the request handler.
    gate: Arc<std::sync::RwLock<()>>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("lookups", &self.lookups.len())
            .field("handles", &self.handles.len())
            .finish()
    }
}

/// Entries of one READDIR call.
#[derive(Debug)]
pub struct DirIter {
    entries: Vec<(u64, u64, u32, CString)>,
    next: usize,
}

impl DirectoryIterator for DirIter {
    fn next(&mut self) -> Option<DirEntry<'_>> {
        let (ino, offset, type_, name) = self.entries.get(self.next)?;
        self.next += 1;
        Some(DirEntry {
            ino: *ino,
            offset: *offset,
            type_: *type_,
            name: name.as_c_str(),
        })
    }
}

fn name_bytes(name: &CStr) -> io::Result<&[u8]> {
    let b = name.to_bytes();
    if b.is_empty() || b.contains(&b'/') {
        return Err(errno(libc::EINVAL));
    }
    if b.len() > vmfs::format::NAME_MAX {
        return Err(errno(libc::ENAMETOOLONG));
    }
    Ok(b)
}

/// A name that creates or removes an entry: "." and ".." are never valid there.
fn new_name(name: &CStr) -> io::Result<&[u8]> {
    let b = name_bytes(name)?;
    if b == b"." || b == b".." {
        return Err(errno(libc::EINVAL));
    }
    Ok(b)
}

fn dt_of(mode: u32) -> u32 {
    (mode & S_IFMT) >> 12
}

impl VmfsFs {
    /// Serves directory `dir` of `ds` (created, root-owned 0755, if missing).
    pub fn new(
        ds: Arc<Datastore>,
        dir: &str,
        settings: ShareSettings,
    ) -> Result<Self, ShareError> {
        let ds_err = |source| ShareError::Datastore {
            dir: dir.to_string(),
            source,
        };
        let mut root = vmfs::format::ROOT_INO;
        for comp in dir.split('/').filter(|c| !c.is_empty()) {
            root = match ds.lookup_at(root, comp.as_bytes()) {
                Ok(i) => i.ino,
                Err(FsError::NotFound(_)) => {
                    ds.make_node(root, comp.as_bytes(), S_IFDIR | 0o755, 0, 0, 0)
                        .map_err(ds_err)?
                        .ino
                }
                Err(e) => return Err(ds_err(e)),
            };
        }
        if !ds.stat(root).map_err(ds_err)?.is_dir() {
            return Err(ds_err(FsError::NotDir(dir.into())));
        }
        ds.sync().map_err(ds_err)?;
        let dev_file = ds
            .device()
            .as_file()
            .and_then(|f| f.try_clone().ok())
            .map(Arc::new);
        let zero = Arc::new(File::open("/dev/zero")?);
        let quota = Arc::new(Quota::open(&ds, root, settings.quota).map_err(ds_err)?);
        Ok(VmfsFs {
            ds,
            root,
            settings: Arc::new(settings),
            state: Arc::new(Mutex::new(State {
                next_handle: 1,
                ..State::default()
            })),
            dev_file,
            zero,
            counters: Arc::new(FsCounters::default()),
            quota,
            gate: Arc::new(std::sync::RwLock::new(())),
        })
    }

    /// The lock that orders freeing requests against all others (see the field).
    pub fn gate(&self) -> &std::sync::RwLock<()> {
        &self.gate
    }

    /// Refuses to free blocks of a file that something besides this share's handles holds
    /// open (ETXTBSY). For a served disk vmfs refuses on its own (its extent lease, EBUSY),
    /// whoever asks; this check answers first and also keeps a share from shrinking a file
    /// another share has open.
    fn not_served_elsewhere(&self, ino: u64) -> io::Result<()> {
        let ours = self
            .lock()
            .handles
            .values()
            .filter(|h| h.ino == ino)
            .count() as u64;
        if self.ds.open_count(ino) > ours {
            return Err(errno(libc::ETXTBSY));
        }
        Ok(())
    }

    /// The share's counters.
    pub fn counters(&self) -> &FsCounters {
        &self.counters
    }

    /// The share's space limits and usage.
    pub fn quota(&self) -> &Quota {
        &self.quota
    }

    /// Runs `op`, which changes the data of `before`'s inode, having reserved `bound` bytes
    /// of the share's quota (EDQUOT when that would pass it); then replaces the reservation
    /// by the change of the inode's allocated bytes.
    fn charged<T>(
        &self,
        before: &Inode,
        bound: u64,
        op: impl FnOnce() -> io::Result<T>,
    ) -> io::Result<T> {
        if !self.quota.enabled() {
            return op();
        }
        self.quota.reserve(bound, 0).map_err(errno)?;
        let r = op();
        let was = allocated_bytes(before);
        let now = self
            .ds
            .stat(before.ino)
            .map_or(was, |i| allocated_bytes(&i));
        self.quota
            .adjust(i128::from(now) - i128::from(was) - i128::from(bound), 0);
        r
    }

    /// Credits the space and inode of `victim` to the quota if it was just freed (its last
    /// link and opener gone).
    fn credit_if_freed(&self, victim: &Inode) {
        if !self.quota.enabled() {
            return;
        }
        let freed = self
            .ds
            .stat(victim.ino)
            .map_or(true, |i| i.generation != victim.generation);
        if freed {
            self.quota.adjust(-i128::from(allocated_bytes(victim)), -1);
        }
    }

    /// Closes the datastore's open of `ino`, crediting the quota when that freed an
    /// unlinked file.
    fn close_ino(&self, ino: u64) {
        let orphan = if self.quota.enabled() {
            self.ds.stat(ino).ok().filter(|i| i.nlink == 0)
        } else {
            None
        };
        self.ds.close(ino);
        if let Some(i) = orphan {
            self.credit_if_freed(&i);
        }
    }

    /// The share's settings (permission cache counters live there).
    pub fn settings(&self) -> &ShareSettings {
        &self.settings
    }

    /// The datastore inode of the share's root.
    pub fn root_ino(&self) -> u64 {
        self.root
    }

    /// Drops everything one connection held: lookup references, handles, cached profiles.
    pub fn disconnected(&self, conn: u64) {
        let mut st = self.lock();
        for h in st.handles.values() {
            self.close_ino(h.ino);
        }
        st.lookups.clear();
        st.handles.clear();
        self.counters.handles.store(0, Ordering::Relaxed);
        drop(st);
        self.settings.perm.drop_vm(conn as u32);
        if let Err(e) = self.ds.sync() {
            tracing::error!(err = %e, "commit after disconnect failed");
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a request panicked mid-update; the tables stay usable
        // (each update is a single insert or remove).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// FUSE node id → vmfs inode, without checks.
    fn map_node(&self, node: u64) -> u64 {
        if node == fuse::ROOT_ID {
            self.root
        } else if node == self.root {
            vmfs::format::ROOT_INO
        } else {
            node
        }
    }

    /// FUSE node id → vmfs inode, for a node the guest may use: the share root, or one this
    /// connection looked up (and has not forgotten). Node ids are inode numbers, so without
    /// this a guest could name any inode of the datastore — other shares, virtual disks.
    fn vino(&self, node: u64) -> io::Result<u64> {
        let ino = self.map_node(node);
        if ino == self.root {
            return Ok(ino);
        }
        let known = self
            .lock()
            .lookups
            .get(&ino)
            .map(|&(_, generation)| generation);
        match known {
            // An inode freed (no handle kept it) and reused by another file — possibly in
            // another share — is a different object: its generation changed.
            Some(g) if self.ds.stat(ino).ok().map(|i| i.generation) == Some(g) => Ok(ino),
            _ => {
                self.counters.unknown_nodes.fetch_add(1, Ordering::Relaxed);
                Err(errno(libc::ESTALE))
            }
        }
    }

    /// vmfs inode → FUSE node id.
    fn node(&self, ino: u64) -> u64 {
        if ino == self.root {
            fuse::ROOT_ID
        } else if ino == vmfs::format::ROOT_INO {
            self.root
        } else {
            ino
        }
    }

    fn caller(&self, ctx: &Context) -> io::Result<Caller> {
        let (guid, ggid) = (ctx.uid.into_inner(), ctx.gid.into_inner());
        let (Some(uid), Some(gid)) = (
            self.settings.uid_map.to_host(guid),
            self.settings.gid_map.to_host(ggid),
        ) else {
            self.counters.unmapped_ids.fetch_add(1, Ordering::Relaxed);
            return Err(errno(libc::EPERM));
        };
        let (groups, groups_epoch) = match &self.settings.groups {
            Some(src) => {
                let g = src.groups_of(uid, Instant::now());
                (g.ids, g.epoch)
            }
            None => (Arc::from(Vec::new()), 0),
        };
        Ok(Caller {
            uid,
            gid,
            groups,
            groups_epoch,
        })
    }

    fn stat(&self, ino: u64) -> io::Result<Inode> {
        self.ds.stat(ino).map_err(fs_err)
    }

    fn access_acl(&self, inode: &Inode) -> io::Result<Option<Acl>> {
        match self.ds.getxattr(inode.ino, XATTR_ACL_ACCESS) {
            Ok(v) => Acl::parse(v.as_slice())
                .map(Some)
                .map_err(|_| errno(libc::EIO)),
            Err(FsError::NoXattr) => Ok(None),
            Err(e) => Err(fs_err(e)),
        }
    }

    /// The caller's exact permission profile on `inode`, cached.
    fn profile_of(&self, c: &Caller, inode: &Inode) -> io::Result<Profile> {
        let key = ProfileKey {
            vm: current_conn() as u32,
            ino: inode.ino,
            generation: inode.generation,
            uid: c.uid,
            gid: c.gid,
            groups_epoch: c.groups_epoch,
        };
        let now = Instant::now();
        if let Some(p) = self.settings.perm.get(&key, inode.attr_gen, now) {
            return Ok(p);
        }
        let acl = if inode.xattr_block != 0 {
            self.access_acl(inode)?
        } else {
            None
        };
        let obj = Object {
            uid: inode.uid,
            gid: inode.gid,
            mode: inode.mode,
        };
        let mut p = profile(&c.cred(), &obj, acl.as_ref());
        if c.is_root() {
            p = with_root_override(p, inode.is_dir(), inode.mode);
        }
        self.settings.perm.insert(&key, inode.attr_gen, p, now);
        Ok(p)
    }

    fn check(&self, c: &Caller, inode: &Inode, want: u8) -> io::Result<()> {
        if self.profile_of(c, inode)?.allows(want) {
            Ok(())
        } else {
            self.counters.denied.fetch_add(1, Ordering::Relaxed);
            Err(errno(libc::EACCES))
        }
    }

    fn writable(&self) -> io::Result<()> {
        if self.settings.readonly {
            Err(errno(libc::EROFS))
        } else {
            Ok(())
        }
    }

    fn dir(&self, node: u64) -> io::Result<Inode> {
        let d = self.stat(self.vino(node)?)?;
        if !d.is_dir() {
            return Err(errno(libc::ENOTDIR));
        }
        Ok(d)
    }

    /// Sticky-directory rule (Linux `check_sticky`): in a sticky directory only the owner of
    /// the entry, of the directory, or root may remove or rename it.
    fn sticky_ok(c: &Caller, dir: &Inode, victim: &Inode) -> io::Result<()> {
        if dir.mode & S_ISVTX != 0 && !c.is_root() && c.uid != dir.uid && c.uid != victim.uid {
            return Err(errno(libc::EPERM));
        }
        Ok(())
    }

    fn attr(&self, i: &Inode) -> fuse::Attr {
        let split = |ns: i64| {
            let s = ns.div_euclid(1_000_000_000);
            (s as u64, ns.rem_euclid(1_000_000_000) as u32)
        };
        let (atime, atimensec) = split(i.atime_ns);
        let (mtime, mtimensec) = split(i.mtime_ns);
        let (ctime, ctimensec) = split(i.ctime_ns);
        let uid = self.settings.uid_map.to_guest(i.uid).unwrap_or(OVERFLOW_ID);
        let gid = self.settings.gid_map.to_guest(i.gid).unwrap_or(OVERFLOW_ID);
        fuse::Attr {
            ino: self.node(i.ino),
            size: i.size,
            blocks: i.size.div_ceil(512),
            atime,
            mtime,
            ctime,
            atimensec,
            mtimensec,
            ctimensec,
            mode: i.mode,
            nlink: i.nlink,
            uid: uid.into(),
            gid: gid.into(),
            rdev: i.rdev,
            blksize: 4096,
            flags: 0,
        }
    }

    /// An entry reply for `inode`, counting one FUSE lookup reference.
    fn entry(&self, inode: &Inode) -> io::Result<Entry> {
        if inode.ino != self.root {
            let mut st = self.lock();
            let e = st.lookups.entry(inode.ino).or_insert((0, inode.generation));
            if e.1 != inode.generation {
                // The slot was reused: the old node is gone for good.
                *e = (0, inode.generation);
            }
            e.0 += 1;
        }
        let t = self.settings.cache.timeout();
        Ok(Entry {
            inode: self.node(inode.ino),
            generation: u64::from(inode.generation),
            attr: self.attr(inode),
            attr_timeout: t,
            entry_timeout: t,
        })
    }

    /// Owner and group of a new object in `parent` (BSD group semantics when the parent is
    /// setgid), and its mode with setgid dropped where Linux drops it.
    fn new_owner(&self, c: &Caller, parent: &Inode, mut mode: u32) -> (u32, u32, u32) {
        let gid = if parent.mode & S_ISGID != 0 {
            if mode & S_IFMT == S_IFDIR {
                mode |= S_ISGID;
            }
            parent.gid
        } else {
            c.gid
        };
        if mode & S_IFMT != S_IFDIR
            && mode & S_ISGID != 0
            && mode & S_IXGRP != 0
            && !c.is_root()
            && !c.in_group(gid)
        {
            mode &= !S_ISGID;
        }
        (c.uid, gid, mode)
    }

    /// Creates a node of `mode` (type included) in `parent`: checks, ownership, umask or
    /// default-ACL inheritance.
    #[allow(clippy::too_many_arguments)]
    fn create_node(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
        symlink_target: Option<&[u8]>,
    ) -> io::Result<Inode> {
        self.writable()?;
        let name = new_name(name)?;
        let c = self.caller(ctx)?;
        let dir = self.dir(parent)?;
        self.check(&c, &dir, MAY_WRITE | MAY_EXEC)?;
        let is_dir = mode & S_IFMT == S_IFDIR;
        let default_acl = if symlink_target.is_none() && dir.xattr_block != 0 {
            match self.ds.getxattr(dir.ino, XATTR_ACL_DEFAULT) {
                Ok(v) => Some(Acl::parse(v.as_slice()).map_err(|_| errno(libc::EIO))?),
                Err(FsError::NoXattr) => None,
                Err(e) => return Err(fs_err(e)),
            }
        } else {
            None
        };
        let (mode, access, default) = match &default_acl {
            Some(d) => {
                let inh = inherit(d, mode & 0o7777, is_dir);
                ((mode & S_IFMT) | inh.mode, inh.access, inh.default)
            }
            None => ((mode & S_IFMT) | (mode & 0o7777 & !umask), None, None),
        };
        let (uid, gid, mode) = self.new_owner(&c, &dir, mode);
        let reserved = if self.quota.bytes_full() {
            Err(libc::EDQUOT)
        } else {
            self.quota.reserve(0, 1)
        };
        if let Err(e) = reserved {
            // A name that exists is EEXIST whatever the quota (open(O_CREAT) of an existing
            // file must still work at the limit).
            if self.ds.lookup_at(dir.ino, name).is_ok() {
                return Err(errno(libc::EEXIST));
            }
            return Err(errno(e));
        }
        let made = match symlink_target {
            Some(t) => self.ds.symlink_at(dir.ino, name, t, uid, gid),
            None => self.ds.make_node(dir.ino, name, mode, rdev, uid, gid),
        };
        // The inode was reserved; its bytes and the directory's growth are charged as made.
        let grown = self.ds.stat(dir.ino).map_or(0, |d| {
            i128::from(allocated_bytes(&d)) - i128::from(allocated_bytes(&dir))
        });
        match &made {
            Ok(i) => self.quota.adjust(grown + i128::from(allocated_bytes(i)), 0),
            Err(_) => self.quota.adjust(grown, -1),
        }
        let inode = made.map_err(fs_err)?;
        for (xname, acl) in [(XATTR_ACL_ACCESS, access), (XATTR_ACL_DEFAULT, default)] {
            if let Some(acl) = acl {
                self.ds
                    .setxattr(inode.ino, xname, &acl.encode(), XattrSetMode::Any)
                    .map_err(fs_err)?;
            }
        }
        self.stat(inode.ino)
    }

    fn open_handle(&self, ino: u64, read: bool, write: bool) -> io::Result<u64> {
        let mut st = self.lock();
        if st.handles.len() >= HANDLES_MAX {
            return Err(errno(libc::ENFILE));
        }
        // An open handle keeps the inode's data: unlinked while open, it becomes an orphan
        // that vmfs frees at the last close (or at the next mount after a crash).
        self.ds.open(ino).map_err(fs_err)?;
        let h = st.next_handle;
        st.next_handle += 1;
        st.handles.insert(h, Handle { ino, read, write });
        self.counters.handles.fetch_add(1, Ordering::Relaxed);
        Ok(h)
    }

    fn close_handle(&self, h: u64) {
        let removed = self.lock().handles.remove(&h);
        if let Some(hd) = removed {
            self.counters.handles.fetch_sub(1, Ordering::Relaxed);
            self.close_ino(hd.ino);
        }
    }

    fn handle(&self, h: u64, ino: u64) -> io::Result<Handle> {
        match self.lock().handles.get(&h) {
            Some(hd) if hd.ino == ino => Ok(*hd),
            _ => Err(errno(libc::EBADF)),
        }
    }

    /// Checks open flags against the caller's profile; returns (read, write).
    fn open_grant(&self, c: &Caller, inode: &Inode, flags: u32) -> io::Result<(bool, bool)> {
        let acc = flags as i32 & libc::O_ACCMODE;
        let read = acc == libc::O_RDONLY || acc == libc::O_RDWR;
        let write = acc == libc::O_WRONLY || acc == libc::O_RDWR;
        let trunc = flags as i32 & libc::O_TRUNC != 0;
        if (write || trunc) && self.settings.readonly {
            return Err(errno(libc::EROFS));
        }
        if (write || trunc) && inode.is_dir() {
            return Err(errno(libc::EISDIR));
        }
        let mut want = 0;
        if read {
            want |= MAY_READ;
        }
        if write || trunc {
            want |= MAY_WRITE;
        }
        self.check(c, inode, want)?;
        Ok((read, write))
    }

    fn truncate_on_open(&self, inode: &Inode, flags: u32) -> io::Result<()> {
        if flags as i32 & libc::O_TRUNC != 0 && inode.mode & S_IFMT == S_IFREG && inode.size != 0 {
            let a = SetAttr {
                size: Some(0),
                ..SetAttr::default()
            };
            self.ds.setattr(inode.ino, &a).map_err(fs_err)?;
        }
        Ok(())
    }

    fn do_setattr(
        &self,
        c: &Caller,
        inode: &Inode,
        attr: &fuse::SetattrIn,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<Inode> {
        let owner = c.is_root() || c.uid == inode.uid;
        let mut a = SetAttr::default();
        if valid.contains(SetattrValid::UID) || valid.contains(SetattrValid::GID) {
            let new_uid = if valid.contains(SetattrValid::UID) {
                let u = attr.uid.into_inner();
                Some(self.settings.uid_map.to_host(u).ok_or(errno(libc::EPERM))?)
            } else {
                None
            };
            let new_gid = if valid.contains(SetattrValid::GID) {
                let g = attr.gid.into_inner();
                Some(self.settings.gid_map.to_host(g).ok_or(errno(libc::EPERM))?)
            } else {
                None
            };
            if !c.is_root() {
                // Linux chown_ok / chgrp_ok: only root gives files away; an owner may change
                // the group to one of its own groups.
                if new_uid.is_some_and(|u| u != inode.uid || c.uid != inode.uid) {
                    return Err(errno(libc::EPERM));
                }
                if let Some(g) = new_gid {
                    if c.uid != inode.uid || (g != inode.gid && !c.in_group(g)) {
                        return Err(errno(libc::EPERM));
                    }
                }
            }
            a.uid = new_uid;
            a.gid = new_gid;
            // Changing the owner or group of a regular file drops setuid, and setgid when
            // group-executable (Linux does this in the filesystem, so the server must).
            if inode.mode & S_IFMT == S_IFREG && !valid.contains(SetattrValid::MODE) {
                let mut m = inode.mode & 0o7777;
                m &= !S_ISUID;
                if m & S_IXGRP != 0 {
                    m &= !S_ISGID;
                }
                if m != inode.mode & 0o7777 {
                    a.mode = Some(m);
                }
            }
        }
        if valid.contains(SetattrValid::MODE) {
            let mut m = attr.mode & 0o7777;
            let old = inode.mode & 0o7777;
            // A non-owner may only drop setuid/setgid (the kernel's kill-priv on write).
            let only_kills_priv = m == old & !(S_ISUID | S_ISGID) || m == old;
            if !owner {
                if !only_kills_priv {
                    return Err(errno(libc::EPERM));
                }
                // Linux drops these bits for a writer; anyone else may not.
                match handle {
                    Some(h) if self.handle(h, inode.ino)?.write => {}
                    _ => self.check(c, inode, MAY_WRITE)?,
                }
            }
            let gid = a.gid.unwrap_or(inode.gid);
            if !c.is_root() && !c.in_group(gid) {
                m &= !S_ISGID;
            }
            a.mode = Some(m);
        }
        if valid.contains(SetattrValid::SIZE) {
            if inode.is_dir() {
                return Err(errno(libc::EISDIR));
            }
            if inode.mode & S_IFMT != S_IFREG {
                return Err(errno(libc::EINVAL));
            }
            match handle {
                Some(h) if self.handle(h, inode.ino)?.write => {}
                _ => self.check(c, inode, MAY_WRITE)?,
            }
            if attr.size < inode.size {
                self.not_served_elsewhere(inode.ino)?;
            }
            a.size = Some(attr.size);
        }
        let explicit_times = (valid.contains(SetattrValid::ATIME)
            && !valid.contains(SetattrValid::ATIME_NOW))
            || (valid.contains(SetattrValid::MTIME) && !valid.contains(SetattrValid::MTIME_NOW));
        if valid.intersects(SetattrValid::ATIME | SetattrValid::MTIME) {
            if explicit_times {
                if !owner {
                    return Err(errno(libc::EPERM));
                }
            } else if !owner {
                self.check(c, inode, MAY_WRITE)?;
            }
            let t = |now: bool, s: u64, ns: u32| -> io::Result<TimeSet> {
                if now {
                    return Ok(TimeSet::Now);
                }
                if ns >= 1_000_000_000 {
                    return Err(errno(libc::EINVAL));
                }
                // Seconds are a signed 64-bit count on the wire; ns since the epoch must fit.
                i64::try_from(s)
                    .ok()
                    .and_then(|s| s.checked_mul(1_000_000_000))
                    .and_then(|v| v.checked_add(i64::from(ns)))
                    .map(TimeSet::At)
                    .ok_or_else(|| errno(libc::EOVERFLOW))
            };
            if valid.contains(SetattrValid::ATIME) {
                a.atime = Some(t(
                    valid.contains(SetattrValid::ATIME_NOW),
                    attr.atime,
                    attr.atimensec,
                )?);
            }
            if valid.contains(SetattrValid::MTIME) {
                a.mtime = Some(t(
                    valid.contains(SetattrValid::MTIME_NOW),
                    attr.mtime,
                    attr.mtimensec,
                )?);
            }
        }
        let out = self.ds.setattr(inode.ino, &a).map_err(fs_err)?;
        if let Some(m) = a.mode {
            self.chmod_acl(&out, m)?;
        }
        Ok(out)
    }

    /// chmod on a file with an access ACL updates the ACL's owner, mask (or group) and other
    /// entries, as Linux's `posix_acl_chmod`.
    fn chmod_acl(&self, inode: &Inode, mode: u32) -> io::Result<()> {
        if inode.xattr_block == 0 {
            return Ok(());
        }
        if let Some(mut acl) = self.access_acl(inode)? {
            acl.apply_chmod(mode);
            self.ds
                .setxattr(
                    inode.ino,
                    XATTR_ACL_ACCESS,
                    &acl.encode(),
                    XattrSetMode::Any,
                )
                .map_err(fs_err)?;
        }
        Ok(())
    }

    fn read_into<W: ZeroCopyWriter>(
        &self,
        mut w: W,
        ino: u64,
        offset: u64,
        size: u32,
    ) -> io::Result<usize> {
        let mut plan = Vec::new();
        // The pin keeps the planned extents this file's until the reply is copied.
        let (total, _pin) = self
            .ds
            .read_plan(ino, offset, u64::from(size), &mut plan)
            .map_err(fs_err)?;
        let exact = READ_BUFFER.with(|c| c.get()) == Some(total);
        // Zero copy only when one extent fills exactly the guest's buffer (see READ_BUFFER).
        if exact && plan.len() == 1 {
            match &plan[0] {
                Extent::Device { offset, len } if *len == total => {
                    if let Some(f) = self.dev_file.as_ref() {
                        return w.read_from_file_at(f, *len as usize, *offset, None);
                    }
                }
                Extent::Zero { len } if *len == total => {
                    return w.read_from_file_at(&self.zero, *len as usize, 0, None);
                }
                _ => {}
            }
        }
        // Otherwise the reply is assembled in the scratch file, truncated to its exact
        // length, so the copy into guest memory stops there.
        with_scratch(|f| {
            f.set_len(0)?;
            let mut at = 0u64;
            let mut buf = Vec::new();
            for ext in &plan {
                match ext {
                    Extent::Device { offset, len } => {
                        let Some(dev) = self.dev_file.as_ref() else {
                            tracing::warn!("datastore has no file to read extents from");
                            return Err(errno(libc::EIO));
                        };
                        buf.resize(*len as usize, 0);
                        dev.read_exact_at(&mut buf, *offset)?;
                        f.write_all_at(&buf, at)?;
                        at += len;
                    }
                    Extent::Zero { len } => at += len,
                    Extent::Inline(data) => {
                        f.write_all_at(data, at)?;
                        at += data.len() as u64;
                    }
                }
            }
            debug_assert_eq!(at, total);
            f.set_len(at)?;
            w.read_from_file_at(f, at as usize, 0, None)
        })
    }

    fn write_from<R: ZeroCopyReader>(
        &self,
        mut r: R,
        ino: u64,
        offset: u64,
        size: u32,
    ) -> io::Result<usize> {
        if size > WRITE_BYTES_MAX {
            return Err(errno(libc::EINVAL));
        }
        // The guest names the offset: a range that wraps or ends past the largest file is
        // refused here, before any datastore arithmetic on it.
        if offset
            .checked_add(u64::from(size))
            .is_none_or(|end| end > vmfs::format::FILE_BYTES_MAX)
        {
            return Err(errno(libc::EFBIG));
        }
        let len = size as usize;
        if let (Some(f), Ok(Some((dev_off, _pin)))) = (
            self.dev_file.as_ref(),
            self.ds.map_direct(ino, offset, u64::from(size)),
        ) {
            // Written space: the bytes go straight to the datastore (no metadata change but
            // the timestamps).
            let n = r.write_to_file_at(f, len, dev_off, None)?;
            self.ds.note_data_write(ino).map_err(fs_err)?;
            return Ok(n);
        }
        let mut buf = vec![0u8; len.min(SCRATCH_BYTES_MAX)];
        let n = with_scratch(|f| {
            let n = r.write_to_file_at(f, buf.len(), 0, None)?;
            f.read_exact_at(&mut buf[..n], 0)?;
            Ok(n)
        })?;
        // Only this path can allocate (the direct one writes blocks already there).
        let before = if self.quota.enabled() {
            Some(self.stat(ino)?)
        } else {
            None
        };
        let write = || self.ds.write_at(ino, offset, &buf[..n]).map_err(fs_err);
        match &before {
            Some(b) => self.charged(b, write_bound(b, offset, n as u64), write)?,
            None => write()?,
        };
        Ok(n)
    }

    fn is_acl_name(name: &[u8]) -> bool {
        name == XATTR_ACL_ACCESS || name == XATTR_ACL_DEFAULT
    }

    /// Who may touch an xattr: ACLs and `user.*` follow Linux (`xattr_permission`);
    /// `trusted.*` and `security.*` are root's.
    fn check_xattr(&self, c: &Caller, inode: &Inode, name: &[u8], write: bool) -> io::Result<()> {
        if Self::is_acl_name(name) {
            if write && !(c.is_root() || c.uid == inode.uid) {
                return Err(errno(libc::EPERM));
            }
            return Ok(());
        }
        if name.starts_with(b"trusted.") || name.starts_with(b"security.") {
            if !c.is_root() {
                return Err(errno(libc::EPERM));
            }
            return Ok(());
        }
        if name.starts_with(b"user.") {
            let t = inode.mode & S_IFMT;
            if t != S_IFREG && t != S_IFDIR {
                return Err(errno(if write { libc::EPERM } else { libc::ENODATA }));
            }
            if t == S_IFDIR
                && inode.mode & S_ISVTX != 0
                && write
                && !c.is_root()
                && c.uid != inode.uid
            {
                return Err(errno(libc::EPERM));
            }
            return self.check(c, inode, if write { MAY_WRITE } else { MAY_READ });
        }
        Err(errno(libc::EOPNOTSUPP))
    }
}

impl FileSystem for VmfsFs {
    type Inode = u64;
    type Handle = u64;
    type DirIter = DirIter;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        // POSIX ACLs need DONT_MASK (the server applies the umask only when no default ACL
        // is inherited) and SETXATTR_EXT (the kill-sgid flag on ACL changes).
        let mut want = FsOptions::DO_READDIRPLUS | FsOptions::READDIRPLUS_AUTO;
        let acl = FsOptions::POSIX_ACL | FsOptions::DONT_MASK | FsOptions::SETXATTR_EXT;
        if capable.contains(acl) {
            want |= acl;
        }
        Ok(want)
    }

    fn destroy(&self) {
        if let Err(e) = self.ds.sync() {
            tracing::error!(err = %e, "commit at unmount failed");
        }
    }

    fn lookup(&self, ctx: Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let c = self.caller(&ctx)?;
        let dir = self.dir(parent)?;
        self.check(&c, &dir, MAY_EXEC)?;
        let b = name_bytes(name)?;
        let inode = match b {
            b"." => dir,
            b".." => {
                if dir.ino == self.root {
                    dir
                } else {
                    self.stat(dir.parent)?
                }
            }
            _ => self.ds.lookup_at(dir.ino, b).map_err(fs_err)?,
        };
        self.entry(&inode)
    }

    fn forget(&self, _ctx: Context, inode: u64, count: u64) {
        let ino = self.map_node(inode);
        let mut st = self.lock();
        if let Some((n, _)) = st.lookups.get_mut(&ino) {
            // The count comes from the guest: never below zero, whatever it says.
            *n = n.saturating_sub(count);
            if *n == 0 {
                st.lookups.remove(&ino);
            }
        }
    }

    fn getattr(
        &self,
        ctx: Context,
        inode: u64,
        _handle: Option<u64>,
    ) -> io::Result<(fuse::Attr, Duration)> {
        self.caller(&ctx)?;
        let i = self.stat(self.vino(inode)?)?;
        Ok((self.attr(&i), self.settings.cache.timeout()))
    }

    fn setattr(
        &self,
        ctx: Context,
        inode: u64,
        attr: fuse::SetattrIn,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(fuse::Attr, Duration)> {
        self.writable()?;
        let c = self.caller(&ctx)?;
        let i = self.stat(self.vino(inode)?)?;
        // Growing a file is sparse, but may move its bytes to a larger layout.
        let bound = if valid.contains(SetattrValid::SIZE) && attr.size > i.size {
            write_bound(&i, attr.size, 0)
        } else {
            0
        };
        let out = self.charged(&i, bound, || self.do_setattr(&c, &i, &attr, handle, valid))?;
        Ok((self.attr(&out), self.settings.cache.timeout()))
    }

    fn readlink(&self, ctx: Context, inode: u64) -> io::Result<Vec<u8>> {
        self.caller(&ctx)?;
        // The target is returned as stored and never followed here: the guest resolves it
        // against its own mount, so it cannot reach outside the share on the server.
        self.ds.readlink(self.vino(inode)?).map_err(fs_err)
    }

    fn symlink(
        &self,
        ctx: Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
        _extensions: Extensions,
    ) -> io::Result<Entry> {
        let target = linkname.to_bytes();
        if target.is_empty() {
            return Err(errno(libc::ENOENT));
        }
        if target.len() > vmfs::SYMLINK_MAX {
            return Err(errno(libc::ENAMETOOLONG));
        }
        let i = self.create_node(&ctx, parent, name, S_IFLNK | 0o777, 0, 0, Some(target))?;
        self.entry(&i)
    }

    fn mknod(
        &self,
        ctx: Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
        _extensions: Extensions,
    ) -> io::Result<Entry> {
        let t = mode & S_IFMT;
        let t = if t == 0 { S_IFREG } else { t };
        if ![S_IFREG, S_IFIFO, S_IFCHR, S_IFBLK, S_IFSOCK].contains(&t) {
            return Err(errno(libc::EINVAL));
        }
        if (t == S_IFCHR || t == S_IFBLK) && ctx.uid.into_inner() != 0 {
            return Err(errno(libc::EPERM));
        }
        let i = self.create_node(&ctx, parent, name, t | (mode & 0o7777), rdev, umask, None)?;
        self.entry(&i)
    }

    fn mkdir(
        &self,
        ctx: Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
        _extensions: Extensions,
    ) -> io::Result<Entry> {
        let i = self.create_node(
            &ctx,
            parent,
            name,
            S_IFDIR | (mode & 0o7777),
            0,
            umask,
            None,
        )?;
        self.entry(&i)
    }

    fn unlink(&self, ctx: Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        let name = new_name(name)?;
        let c = self.caller(&ctx)?;
        let dir = self.dir(parent)?;
        self.check(&c, &dir, MAY_WRITE | MAY_EXEC)?;
        let victim = self.ds.lookup_at(dir.ino, name).map_err(fs_err)?;
        Self::sticky_ok(&c, &dir, &victim)?;
        self.ds.unlink_at(dir.ino, name).map_err(fs_err)?;
        self.credit_if_freed(&victim);
        Ok(())
    }

    fn rmdir(&self, ctx: Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        let name = new_name(name)?;
        let c = self.caller(&ctx)?;
        let dir = self.dir(parent)?;
        self.check(&c, &dir, MAY_WRITE | MAY_EXEC)?;
        let victim = self.ds.lookup_at(dir.ino, name).map_err(fs_err)?;
        Self::sticky_ok(&c, &dir, &victim)?;
        self.ds.rmdir_at(dir.ino, name).map_err(fs_err)?;
        self.credit_if_freed(&victim);
        Ok(())
    }

    fn rename(
        &self,
        ctx: Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.writable()?;
        let known = libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE;
        if flags & !known != 0 {
            return Err(errno(libc::EINVAL));
        }
        let f = RenameFlags {
            noreplace: flags & libc::RENAME_NOREPLACE != 0,
            exchange: flags & libc::RENAME_EXCHANGE != 0,
        };
        if f.noreplace && f.exchange {
            return Err(errno(libc::EINVAL));
        }
        let (oldname, newname) = (new_name(oldname)?, new_name(newname)?);
        let c = self.caller(&ctx)?;
        let od = self.dir(olddir)?;
        let nd = self.dir(newdir)?;
        self.check(&c, &od, MAY_WRITE | MAY_EXEC)?;
        self.check(&c, &nd, MAY_WRITE | MAY_EXEC)?;
        let src = self.ds.lookup_at(od.ino, oldname).map_err(fs_err)?;
        Self::sticky_ok(&c, &od, &src)?;
        let dst = match self.ds.lookup_at(nd.ino, newname) {
            Ok(d) => Some(d),
            Err(FsError::NotFound(_)) => None,
            Err(e) => return Err(fs_err(e)),
        };
        if let Some(d) = &dst {
            Self::sticky_ok(&c, &nd, d)?;
        }
        // Moving a directory to another parent rewrites its "..": write access to it needed.
        if od.ino != nd.ino {
            if src.is_dir() {
                self.check(&c, &src, MAY_WRITE)?;
            }
            if f.exchange {
                if let Some(d) = dst.as_ref().filter(|d| d.is_dir()) {
                    self.check(&c, d, MAY_WRITE)?;
                }
            }
        }
        if self.quota.bytes_full() && od.ino != nd.ino {
            // A new entry in another directory may grow it.
            return Err(errno(libc::EDQUOT));
        }
        self.ds
            .rename_at(od.ino, oldname, nd.ino, newname, f)
            .map_err(fs_err)?;
        if let Some(d) = dst.as_ref().filter(|_| !f.exchange) {
            self.credit_if_freed(d);
        }
        Ok(())
    }

    fn link(&self, ctx: Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        self.writable()?;
        let newname = new_name(newname)?;
        let c = self.caller(&ctx)?;
        let src = self.stat(self.vino(inode)?)?;
        if src.is_dir() {
            return Err(errno(libc::EPERM));
        }
        let dir = self.dir(newparent)?;
        self.check(&c, &dir, MAY_WRITE | MAY_EXEC)?;
        if self.quota.bytes_full() {
            return Err(errno(libc::EDQUOT));
        }
        let i = self.charged(&dir, 0, || {
            self.ds.link_at(src.ino, dir.ino, newname).map_err(fs_err)
        })?;
        self.entry(&i)
    }

    fn open(
        &self,
        ctx: Context,
        inode: u64,
        _kill_priv: bool,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        let c = self.caller(&ctx)?;
        let i = self.stat(self.vino(inode)?)?;
        let (read, write) = self.open_grant(&c, &i, flags)?;
        self.charged(&i, 0, || self.truncate_on_open(&i, flags))?;
        let h = self.open_handle(i.ino, read, write)?;
        Ok((Some(h), OpenOptions::empty()))
    }

    fn create(
        &self,
        ctx: Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        _kill_priv: bool,
        flags: u32,
        umask: u32,
        _extensions: Extensions,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions)> {
        let c = self.caller(&ctx)?;
        let i = match self.create_node(
            &ctx,
            parent,
            name,
            S_IFREG | (mode & 0o7777),
            0,
            umask,
            None,
        ) {
            Ok(i) => i,
            Err(e)
                if e.raw_os_error() == Some(libc::EEXIST) && flags as i32 & libc::O_EXCL == 0 =>
            {
                let dir = self.dir(parent)?;
                let i = self
                    .ds
                    .lookup_at(dir.ino, new_name(name)?)
                    .map_err(fs_err)?;
                self.open_grant(&c, &i, flags)?;
                self.charged(&i, 0, || self.truncate_on_open(&i, flags))?;
                self.stat(i.ino)?
            }
            Err(e) => return Err(e),
        };
        let acc = flags as i32 & libc::O_ACCMODE;
        let read = acc == libc::O_RDONLY || acc == libc::O_RDWR;
        let write = acc == libc::O_WRONLY || acc == libc::O_RDWR;
        // The creator may write a file it just created whatever its mode (open(2) semantics).
        let h = self.open_handle(i.ino, read, write)?;
        let e = self.entry(&i)?;
        Ok((e, Some(h), OpenOptions::empty()))
    }

    fn read<W: ZeroCopyWriter>(
        &self,
        _ctx: Context,
        inode: u64,
        handle: u64,
        w: W,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _flags: u32,
    ) -> io::Result<usize> {
        let ino = self.vino(inode)?;
        let h = self.handle(handle, ino)?;
        if !h.read {
            return Err(errno(libc::EBADF));
        }
        // The guest names the size; it may not make the server read (and buffer) more than
        // one FUSE buffer's worth.
        let size = size.min(READ_BYTES_MAX);
        self.read_into(w, ino, offset, size)
    }

    fn write<R: ZeroCopyReader>(
        &self,
        _ctx: Context,
        inode: u64,
        handle: u64,
        r: R,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _delayed_write: bool,
        _kill_priv: bool,
        _flags: u32,
    ) -> io::Result<usize> {
        self.writable()?;
        let ino = self.vino(inode)?;
        let h = self.handle(handle, ino)?;
        if !h.write {
            return Err(errno(libc::EBADF));
        }
        self.write_from(r, ino, offset, size)
    }

    fn flush(&self, _ctx: Context, inode: u64, handle: u64, _lock_owner: u64) -> io::Result<()> {
        self.handle(handle, self.vino(inode)?).map(|_| ())
    }

    fn fsync(&self, _ctx: Context, inode: u64, _datasync: bool, handle: u64) -> io::Result<()> {
        self.handle(handle, self.vino(inode)?)?;
        self.ds.sync().map_err(fs_err)
    }

    fn fallocate(
        &self,
        _ctx: Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.writable()?;
        let ino = self.vino(inode)?;
        let h = self.handle(handle, ino)?;
        if !h.write {
            return Err(errno(libc::EBADF));
        }
        let keep = mode as i32 & libc::FALLOC_FL_KEEP_SIZE != 0;
        let punch = mode as i32 & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let known = libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE;
        if mode as i32 & !known != 0 || (punch && !keep) {
            return Err(errno(libc::EOPNOTSUPP));
        }
        if length == 0 {
            return Err(errno(libc::EINVAL));
        }
        // Absurd ranges are refused before any work: past the largest file, or more space
        // than the whole datastore has.
        if offset
            .checked_add(length)
            .is_none_or(|end| end > vmfs::format::FILE_BYTES_MAX)
        {
            return Err(errno(libc::EFBIG));
        }
        let i = self.stat(ino)?;
        if punch {
            self.not_served_elsewhere(ino)?;
            return self.charged(&i, 0, || {
                self.ds.punch_hole(ino, offset, length).map_err(fs_err)
            });
        }
        let st = self.ds.statfs().map_err(fs_err)?;
        if length > st.fb_total.saturating_mul(vmfs::format::FILE_BLOCK) {
            return Err(errno(libc::ENOSPC));
        }
        // One request may not allocate past the share's quota, however large.
        self.charged(&i, write_bound(&i, offset, length), || {
            self.ds.allocate(ino, offset, length, keep).map_err(fs_err)
        })
    }

    fn release(
        &self,
        _ctx: Context,
        _inode: u64,
        _flags: u32,
        handle: u64,
        _flush: bool,
        _flock_release: bool,
        _lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.close_handle(handle);
        Ok(())
    }

    fn statfs(&self, ctx: Context, _inode: u64) -> io::Result<libc::statvfs64> {
        self.caller(&ctx)?;
        let s = self.ds.statfs().map_err(fs_err)?;
        // SAFETY: statvfs64 is plain old data; all-zero is a valid value.
        let mut st: libc::statvfs64 = unsafe { std::mem::zeroed() };
        // Reported in file blocks: the unit space is allocated in (sub-blocks come out of
        // file blocks, so free file blocks are what any file can still grow by).
        let fb = vmfs::format::FILE_BLOCK;
        st.f_bsize = fb;
        st.f_frsize = fb;
        st.f_blocks = s.fb_total;
        st.f_bfree = s.fb_free;
        st.f_bavail = s.fb_free;
        st.f_files = s.fd_total;
        st.f_ffree = s.fd_free;
        st.f_favail = s.fd_free;
        st.f_namemax = vmfs::format::NAME_MAX as u64;
        // A share with limits looks like a file system of the limits' size (as `df` shows a
        // project quota on XFS), never larger than the datastore.
        let (bytes_used, inodes_used) = self.quota.used();
        let limits = self.quota.limits();
        if let Some(max) = limits.bytes {
            st.f_blocks = st.f_blocks.min(max / fb);
            let left = max.saturating_sub(bytes_used) / fb;
            st.f_bfree = st.f_bfree.min(left);
            st.f_bavail = st.f_bfree;
        }
        if let Some(max) = limits.inodes {
            st.f_files = st.f_files.min(max);
            st.f_ffree = st.f_ffree.min(max.saturating_sub(inodes_used));
            st.f_favail = st.f_ffree;
        }
        if self.settings.readonly {
            st.f_flag |= libc::ST_RDONLY;
        }
        Ok(st)
    }

    fn setxattr(
        &self,
        ctx: Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
        extra_flags: SetxattrFlags,
    ) -> io::Result<()> {
        self.writable()?;
        let c = self.caller(&ctx)?;
        let i = self.stat(self.vino(inode)?)?;
        let n = name.to_bytes();
        self.check_xattr(&c, &i, n, true)?;
        let mode = match flags as i32 {
            0 => XattrSetMode::Any,
            libc::XATTR_CREATE => XattrSetMode::CreateOnly,
            libc::XATTR_REPLACE => XattrSetMode::ReplaceOnly,
            _ => return Err(errno(libc::EINVAL)),
        };
        if Self::is_acl_name(n) {
            return self.set_acl(&c, &i, n, value, extra_flags);
        }
        self.ds.setxattr(i.ino, n, value, mode).map_err(fs_err)
    }

    fn getxattr(
        &self,
        ctx: Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        let c = self.caller(&ctx)?;
        let i = self.stat(self.vino(inode)?)?;
        let n = name.to_bytes();
        self.check_xattr(&c, &i, n, false)?;
        let mut v = self.ds.getxattr(i.ino, n).map_err(fs_err)?;
        if Self::is_acl_name(n) {
            // Stored in datastore ids; the guest sees its own (unmapped ones as the overflow
            // id, as owners are shown).
            let acl = Acl::parse(&v).map_err(|_| errno(libc::EIO))?;
            v = acl.encode_mapped(
                |u| self.settings.uid_map.to_guest(u).unwrap_or(OVERFLOW_ID),
                |g| self.settings.gid_map.to_guest(g).unwrap_or(OVERFLOW_ID),
            );
        }
        if size == 0 {
            Ok(GetxattrReply::Count(v.len() as u32))
        } else if v.len() > size as usize {
            Err(errno(libc::ERANGE))
        } else {
            Ok(GetxattrReply::Value(v))
        }
    }

    fn listxattr(&self, ctx: Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        self.caller(&ctx)?;
        let i = self.stat(self.vino(inode)?)?;
        let mut out = Vec::new();
        for n in self.ds.listxattr(i.ino).map_err(fs_err)? {
            out.extend_from_slice(&n);
            out.push(0);
        }
        if size == 0 {
            Ok(ListxattrReply::Count(out.len() as u32))
        } else if out.len() > size as usize {
            Err(errno(libc::ERANGE))
        } else {
            Ok(ListxattrReply::Names(out))
        }
    }

    fn removexattr(&self, ctx: Context, inode: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        let c = self.caller(&ctx)?;
        let i = self.stat(self.vino(inode)?)?;
        let n = name.to_bytes();
        self.check_xattr(&c, &i, n, true)?;
        self.ds.removexattr(i.ino, n).map_err(fs_err)?;
        self.settings.perm.invalidate_object(i.ino);
        Ok(())
    }

    fn opendir(
        &self,
        ctx: Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        let c = self.caller(&ctx)?;
        let d = self.dir(inode)?;
        let acc = flags as i32 & libc::O_ACCMODE;
        if acc != libc::O_RDONLY {
            return Err(errno(libc::EISDIR));
        }
        self.check(&c, &d, MAY_READ)?;
        let h = self.open_handle(d.ino, true, false)?;
        Ok((Some(h), OpenOptions::empty()))
    }

    fn readdir(
        &self,
        _ctx: Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
    ) -> io::Result<DirIter> {
        let ino = self.vino(inode)?;
        self.handle(handle, ino)?;
        let d = self.stat(ino)?;
        let max = (size as usize / 32).clamp(1, READDIR_ENTRIES_MAX);
        let mut entries = Vec::new();
        // "." and ".." come first, at cookies 1 and 2; datastore entries follow, their
        // cookies shifted by 2.
        if offset == 0 {
            entries.push((self.node(d.ino), 1, dt_of(S_IFDIR), c".".to_owned()));
        }
        if offset <= 1 {
            let parent = if d.ino == self.root { d.ino } else { d.parent };
            entries.push((self.node(parent), 2, dt_of(S_IFDIR), c"..".to_owned()));
        }
        let cookie = offset.saturating_sub(2);
        for e in self.ds.read_dir_from(d.ino, cookie, max).map_err(fs_err)? {
            let Ok(name) = CString::new(e.entry.name.clone()) else {
                continue;
            };
            let t = match self.ds.stat(e.entry.ino) {
                Ok(i) => dt_of(i.mode),
                Err(_) => continue,
            };
            entries.push((self.node(e.entry.ino), e.cookie + 2, t, name));
        }
        Ok(DirIter { entries, next: 0 })
    }

    fn fsyncdir(
        &self,
        _ctx: Context,
        _inode: u64,
        _datasync: bool,
        _handle: u64,
    ) -> io::Result<()> {
        self.ds.sync().map_err(fs_err)
    }

    fn releasedir(&self, _ctx: Context, _inode: u64, _flags: u32, handle: u64) -> io::Result<()> {
        self.close_handle(handle);
        Ok(())
    }

    fn access(&self, ctx: Context, inode: u64, mask: u32) -> io::Result<()> {
        let c = self.caller(&ctx)?;
        let i = self.stat(self.vino(inode)?)?;
        if mask as i32 == libc::F_OK {
            return Ok(());
        }
        self.check(&c, &i, (mask & 7) as u8)
    }

    fn lseek(
        &self,
        _ctx: Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        let ino = self.vino(inode)?;
        self.handle(handle, ino)?;
        let w = match whence as i32 {
            libc::SEEK_DATA => Whence::Data,
            libc::SEEK_HOLE => Whence::Hole,
            // The guest kernel handles SEEK_SET/CUR/END itself.
            _ => return Err(errno(libc::EINVAL)),
        };
        self.ds.seek(ino, offset, w).map_err(fs_err)
    }

    fn syncfs(&self, _ctx: Context, _inode: u64) -> io::Result<()> {
        self.ds.sync().map_err(fs_err)
    }
}

impl VmfsFs {
    /// setxattr of an ACL: validated, mirrored into the mode bits; an ACL equivalent to a
    /// mode is stored as the mode alone (as Linux filesystems do).
    fn set_acl(
        &self,
        c: &Caller,
        i: &Inode,
        name: &[u8],
        value: &[u8],
        extra: SetxattrFlags,
    ) -> io::Result<()> {
        // Named entries hold guest ids: stored as datastore ids, like owners; an id outside
        // the share's maps cannot be named (EINVAL, as setxattr of an invalid ACL).
        let acl = Acl::parse(value)
            .and_then(|a| {
                a.map_ids(
                    |u| self.settings.uid_map.to_host(u),
                    |g| self.settings.gid_map.to_host(g),
                )
            })
            .ok()
            .flatten()
            .ok_or_else(|| errno(libc::EINVAL))?;
        if name == XATTR_ACL_DEFAULT {
            if !i.is_dir() {
                return Err(errno(libc::EACCES));
            }
            return self
                .ds
                .setxattr(i.ino, name, &acl.encode(), XattrSetMode::Any)
                .map_err(fs_err);
        }
        let mut mode = (i.mode & 0o7000) | acl.mode_bits();
        let kill_sgid = extra.contains(SetxattrFlags::SETXATTR_ACL_KILL_SGID)
            || (!c.is_root() && !c.in_group(i.gid));
        if kill_sgid {
            mode &= !S_ISGID;
        }
        let a = SetAttr {
            mode: Some(mode),
            ..SetAttr::default()
        };
        self.ds.setattr(i.ino, &a).map_err(fs_err)?;
        let r = if acl.equivalent_mode().is_some() {
            match self.ds.removexattr(i.ino, name) {
                Err(FsError::NoXattr) => Ok(()),
                r => r,
            }
        } else {
            self.ds
                .setxattr(i.ino, name, &acl.encode(), XattrSetMode::Any)
        };
        r.map_err(fs_err)?;
        self.settings.perm.invalidate_object(i.ino);
        Ok(())
    }
}

impl SerializableFileSystem for VmfsFs {}
