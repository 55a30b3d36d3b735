//! The base of [`VmfsFs`]: the type, its tables (lookup counts, open handles), the mapping
//! between FUSE node ids and vmfs inodes, attributes and entry replies, quota accounting
//! around operations, and errno conversion. Everything else in `fs` builds on this; this
//! uses nothing of them.
//!
//! FUSE node ids are vmfs inode numbers, except that the share's root directory is node 1
//! (FUSE's root) and the datastore root — never reachable from inside a share — takes the
//! share root's number: a bijection, so no table is needed.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtiofsd::filesystem::Entry;
use virtiofsd::fuse;
use vmfs::format::{Inode, S_IFDIR};
use vmfs::fs::{Datastore, FsError};

use crate::quota::{allocated_bytes, Quota};
use crate::settings::{ShareError, ShareSettings};

/// Open handles per share: bounds the handle table a guest can grow (the guest kernel keeps
/// one per open file; Linux's default RLIMIT_NOFILE hard limit is far below this per process).
pub const HANDLES_MAX: usize = 65_536;
/// The id shown for host ids that the share's map does not cover.
pub const OVERFLOW_ID: u32 = 65_534;

pub(super) fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

pub(super) fn fs_err(e: FsError) -> io::Error {
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
pub(super) struct Handle {
    pub(super) ino: u64,
    pub(super) read: bool,
    pub(super) write: bool,
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
    pub(super) ds: Arc<Datastore>,
    /// The datastore inode of the share's root.
    pub(super) root: u64,
    pub(super) settings: Arc<ShareSettings>,
    state: Arc<Mutex<State>>,
    /// The datastore's file, for zero-copy data moves (none on a device without one).
    pub(super) dev_file: Option<Arc<File>>,
    /// /dev/zero, for zero-copy reads of holes.
    pub(super) zero: Arc<File>,
    pub(super) counters: Arc<FsCounters>,
    /// The share's space limits and usage.
    pub(super) quota: Arc<Quota>,
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

impl VmfsFs {
    /// Serves directory `dir` of `ds` (created, root-owned 0755, if missing).
    pub fn new(ds: Arc<Datastore>, dir: &str, settings: ShareSettings) -> Result<Self, ShareError> {
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

    /// The share's counters.
    pub fn counters(&self) -> &FsCounters {
        &self.counters
    }

    /// The share's space limits and usage.
    pub fn quota(&self) -> &Quota {
        &self.quota
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
    pub(super) fn map_node(&self, node: u64) -> u64 {
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
    pub(super) fn vino(&self, node: u64) -> io::Result<u64> {
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

    /// Drops `count` FUSE lookup references of `node` (FORGET).
    pub(super) fn forget_node(&self, node: u64, count: u64) {
        let ino = self.map_node(node);
        let mut st = self.lock();
        if let Some((n, _)) = st.lookups.get_mut(&ino) {
            // The count comes from the guest: never below zero, whatever it says.
            *n = n.saturating_sub(count);
            if *n == 0 {
                st.lookups.remove(&ino);
            }
        }
    }

    /// vmfs inode → FUSE node id.
    pub(super) fn node(&self, ino: u64) -> u64 {
        if ino == self.root {
            fuse::ROOT_ID
        } else if ino == vmfs::format::ROOT_INO {
            self.root
        } else {
            ino
        }
    }

    pub(super) fn stat(&self, ino: u64) -> io::Result<Inode> {
        self.ds.stat(ino).map_err(fs_err)
    }

    pub(super) fn dir(&self, node: u64) -> io::Result<Inode> {
        let d = self.stat(self.vino(node)?)?;
        if !d.is_dir() {
            return Err(errno(libc::ENOTDIR));
        }
        Ok(d)
    }

    pub(super) fn writable(&self) -> io::Result<()> {
        if self.settings.readonly {
            Err(errno(libc::EROFS))
        } else {
            Ok(())
        }
    }

    pub(super) fn attr(&self, i: &Inode) -> fuse::Attr {
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
    pub(super) fn entry(&self, inode: &Inode) -> io::Result<Entry> {
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

    pub(super) fn open_handle(&self, ino: u64, read: bool, write: bool) -> io::Result<u64> {
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

    pub(super) fn close_handle(&self, h: u64) {
        let removed = self.lock().handles.remove(&h);
        if let Some(hd) = removed {
            self.counters.handles.fetch_sub(1, Ordering::Relaxed);
            self.close_ino(hd.ino);
        }
    }

    pub(super) fn handle(&self, h: u64, ino: u64) -> io::Result<Handle> {
        match self.lock().handles.get(&h) {
            Some(hd) if hd.ino == ino => Ok(*hd),
            _ => Err(errno(libc::EBADF)),
        }
    }

    /// Refuses to free blocks of a file that something besides this share's handles holds
    /// open (ETXTBSY). For a served disk vmfs refuses on its own (its extent lease, EBUSY),
    /// whoever asks; this check answers first and also keeps a share from shrinking a file
    /// another share has open.
    pub(super) fn not_served_elsewhere(&self, ino: u64) -> io::Result<()> {
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

    /// Runs `op`, which changes the data of `before`'s inode, having reserved `bound` bytes
    /// of the share's quota (EDQUOT when that would pass it); then replaces the reservation
    /// by the change of the inode's allocated bytes.
    pub(super) fn charged<T>(
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
    pub(super) fn credit_if_freed(&self, victim: &Inode) {
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
    pub(super) fn close_ino(&self, ino: u64) {
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
}
