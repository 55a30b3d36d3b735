//! The datastore: mkfs, mount (journal replay), files, directories and the batched
//! scatter-gather write path.
//!
//! All metadata lives in a cache of 4 KiB blocks loaded on first use (bounded by the metadata
//! regions, which are a small fixed fraction of the volume). An operation modifies cached
//! blocks and records them in the open physical transaction (`dirty`); a *logical*
//! transaction is the set of blocks one operation or one file-block group dirties. [`commit`]
//! writes the open transaction to the journal (flushing new data blocks first, so nothing is
//! published before its data is durable), then writes the images home. Freed resources stay
//! unallocatable until the transaction that freed them has committed.
//!
//! A device error in the middle of a metadata update leaves the cache ahead of the disk; the
//! datastore then refuses every further operation (fail-stop) and the next mount replays the
//! journal.
//!
//! [`commit`]: Datastore::commit

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use thiserror::Error;

use crate::device::{BlockDevice, DeviceError};
use crate::format::*;
use crate::journal::{Journal, JournalError, ReplayReport};

/// Dirty blocks at which an operation commits early, keeping every physical transaction well
/// below the journal's per-transaction limit (an operation dirties at most a few blocks per
/// step, so the slack of 32 is never exceeded between checks).
pub(crate) const TXN_SOFT_MAX: usize = TXN_BLOCKS_MAX - 32;
/// Directory size limit: directories are read whole into memory for each change.
pub const DIR_BYTES_MAX: u64 = 16 << 20;

/// Errors of datastore operations.
#[derive(Debug, Error)]
pub enum FsError {
    /// Device failure.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// Journal failure.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// A metadata block failed validation.
    #[error("corrupt metadata: {0}")]
    Corrupt(#[from] FormatError),
    /// Not a datastore, or an unusable one.
    #[error("cannot mount: {0}")]
    Mount(String),
    /// No such file or directory.
    #[error("no such file or directory: {0}")]
    NotFound(String),
    /// Name exists.
    #[error("already exists: {0}")]
    Exists(String),
    /// Not a directory.
    #[error("not a directory: {0}")]
    NotDir(String),
    /// Is a directory.
    #[error("is a directory: {0}")]
    IsDir(String),
    /// Directory not empty.
    #[error("directory not empty: {0}")]
    NotEmpty(String),
    /// Invalid name or argument.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// Out of space (file blocks, sub-blocks, pointer blocks or inodes).
    #[error("no space left in the datastore ({0})")]
    NoSpace(&'static str),
    /// The file is open (served as a disk) and the operation would pull blocks from under it.
    #[error("file is in use: {0}")]
    Busy(String),
    /// An earlier device error stopped the datastore.
    #[error("datastore stopped after an I/O error; remount to recover")]
    Failed,
    /// A bad name: empty, `.`, `..`, containing `/` or NUL.
    #[error("invalid name: {0}")]
    InvalidName(String),
    /// A name longer than [`NAME_MAX`] bytes (or a symlink target longer than
    /// [`crate::ns::SYMLINK_MAX`]).
    #[error("name too long: {0}")]
    NameTooLong(String),
    /// The inode already has [`crate::ns::LINK_MAX`] links.
    #[error("too many links: inode {0}")]
    TooManyLinks(u64),
    /// Operation not permitted (hard link to a directory, ...).
    #[error("operation not permitted: {0}")]
    NotPermitted(String),
    /// No such extended attribute.
    #[error("no such extended attribute")]
    NoXattr,
    /// The extended attributes do not fit the inode's xattr block.
    #[error("extended attribute too big")]
    XattrTooBig,
    /// SEEK_DATA/SEEK_HOLE at or past the end of the file.
    #[error("no data at or after offset {0}")]
    NoData(u64),
    /// The datastore or inode is read-only.
    #[error("read-only: {0}")]
    ReadOnly(String),
    /// The operation would cross datastores.
    #[error("cross-device operation")]
    CrossDevice,
}

impl FsError {
    /// The libc errno a POSIX server returns for this error.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::Device(_) | FsError::Journal(_) | FsError::Failed | FsError::Mount(_) => {
                libc::EIO
            }
            FsError::Corrupt(_) => libc::EUCLEAN,
            FsError::NotFound(_) => libc::ENOENT,
            FsError::Exists(_) => libc::EEXIST,
            FsError::NotDir(_) => libc::ENOTDIR,
            FsError::IsDir(_) => libc::EISDIR,
            FsError::NotEmpty(_) => libc::ENOTEMPTY,
            FsError::Invalid(_) | FsError::InvalidName(_) => libc::EINVAL,
            FsError::NoSpace(_) => libc::ENOSPC,
            FsError::Busy(_) => libc::EBUSY,
            FsError::NameTooLong(_) => libc::ENAMETOOLONG,
            FsError::TooManyLinks(_) => libc::EMLINK,
            FsError::NotPermitted(_) => libc::EPERM,
            FsError::NoXattr => libc::ENODATA,
            FsError::XattrTooBig => libc::E2BIG,
            FsError::NoData(_) => libc::ENXIO,
            FsError::ReadOnly(_) => libc::EROFS,
            FsError::CrossDevice => libc::EXDEV,
        }
    }
}

/// An extent lease held for a long time (a disk being served): see
/// [`Datastore::lease_extents`]. Released on drop.
#[derive(Debug)]
pub struct ExtentLease {
    ds: Arc<Datastore>,
    ino: u64,
}

impl ExtentLease {
    /// The leased inode.
    pub fn ino(&self) -> u64 {
        self.ino
    }
}

impl Drop for ExtentLease {
    fn drop(&mut self) {
        self.ds.unpin(self.ino);
    }
}

/// An extent lease for the duration of one I/O (a planned READ, a direct WRITE): returned
/// with the device offsets by [`Datastore::map_direct`] and [`Datastore::read_plan`]; the
/// offsets stay the file's until it is dropped.
#[derive(Debug)]
#[must_use = "the device offsets are valid only while the pin lives"]
pub struct ExtentPin<'a> {
    ds: &'a Datastore,
    ino: u64,
}

impl<'a> ExtentPin<'a> {
    /// Wraps a pin already counted under the lock.
    pub(crate) fn new(ds: &'a Datastore, ino: u64) -> Self {
        ExtentPin { ds, ino }
    }
}

impl Drop for ExtentPin<'_> {
    fn drop(&mut self) {
        self.ds.unpin(self.ino);
    }
}

/// mkfs options.
#[derive(Debug, Clone)]
pub struct MkfsOptions {
    /// Volume identity; random if `None`.
    pub uuid: Option<[u8; 16]>,
}

/// Counts of space, for statfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatFs {
    /// File blocks in all.
    pub fb_total: u64,
    /// File blocks free.
    pub fb_free: u64,
    /// Sub-blocks in all.
    pub sb_total: u64,
    /// Sub-blocks free.
    pub sb_free: u64,
    /// Inodes in all.
    pub fd_total: u64,
    /// Inodes free.
    pub fd_free: u64,
    /// Bytes of the volume.
    pub volume_bytes: u64,
}

/// One segment of a scatter-gather write.
#[derive(Debug, Clone, Copy)]
pub struct WriteSeg<'a> {
    /// File.
    pub ino: u64,
    /// Offset in the file.
    pub offset: u64,
    /// Bytes.
    pub data: &'a [u8],
}

/// Counters of the write path and journal.
#[derive(Debug, Default)]
pub struct FsStats {
    /// Logical transactions (metadata updates of one group or one operation).
    pub logical_txns: AtomicU64,
    /// Physical journal transactions.
    pub commits: AtomicU64,
    /// Journal bytes written.
    pub journal_bytes: AtomicU64,
    /// File blocks allocated by writes.
    pub blocks_allocated: AtomicU64,
    /// Write segments that went straight to allocated blocks.
    pub direct_segments: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Res {
    Fd,
    Pb,
    Sb,
    Fb,
}

pub(crate) struct Inner {
    pub(crate) vh: VolumeHeader,
    pub(crate) journal: Journal,
    pub(crate) cache: HashMap<u64, Box<[u8]>>,
    pub(crate) dirty: BTreeSet<u64>,
    pub(crate) data_written: bool,
    pub(crate) pending_free: HashSet<(Res, u64)>,
    pub(crate) hints: HashMap<Res, u64>,
    pub(crate) free: HashMap<Res, u64>,
    pub(crate) open: HashMap<u64, u32>,
    /// Extent leases per inode ([`ExtentLease`], [`ExtentPin`]): holders use device offsets
    /// of the file's blocks outside the lock, so no block of it may be freed or moved.
    pub(crate) pins: HashMap<u64, u32>,
    /// File blocks set aside by a chunked allocation ([`Datastore::allocate`]) while they are
    /// zeroed without the lock: not in the bitmap yet, counted as used, never handed out.
    pub(crate) reserved: HashSet<u64>,
    pub(crate) zero_block: Vec<u8>,
    pub(crate) failed: bool,
    /// When the open transaction got its first dirty block (for the commit interval).
    pub(crate) dirty_since: Option<std::time::Instant>,
    /// Metadata modifications so far (to tell whether a failed operation changed anything).
    pub(crate) changes: u64,
    /// Savepoint of the running deferred operation, so a failure can be undone without
    /// touching the other uncommitted changes in the open transaction.
    pub(crate) undo: Option<Undo>,
    /// Inodes whose mtime/ctime [`Datastore::note_data_write`] already updated in the open
    /// transaction (at most one update per inode per commit).
    pub(crate) noted: HashSet<u64>,
    /// In-memory directory indexes (see `ns.rs`), dropped on rollback.
    pub(crate) dir_index: HashMap<u64, crate::ns::DirIndex>,
    /// File blocks freed from sealed directories: their blocks may still be in the journal,
    /// and replaying those images over a new owner's data would corrupt it, so they are not
    /// reallocated until the journal has been reset (`revoke_epoch` = journal resets then).
    pub(crate) revoked: HashSet<u64>,
    pub(crate) revoke_epoch: u64,
}

/// Pre-images and allocator state at the start of a deferred operation.
pub(crate) struct Undo {
    pub(crate) blocks: HashMap<u64, Box<[u8]>>,
    pub(crate) dirty: BTreeSet<u64>,
    pub(crate) pending_free: HashSet<(Res, u64)>,
    pub(crate) free: HashMap<Res, u64>,
    pub(crate) hints: HashMap<Res, u64>,
    pub(crate) dirty_since: Option<std::time::Instant>,
    pub(crate) commits: u64,
}

/// A mounted datastore.
pub struct Datastore {
    pub(crate) dev: Arc<dyn BlockDevice>,
    pub(crate) inner: Mutex<Inner>,
    batching: AtomicBool,
    /// Namespace operations leave their metadata in the open transaction (see
    /// [`Datastore::set_deferred_commit`]).
    pub(crate) deferred: AtomicBool,
    /// Counters.
    pub stats: FsStats,
    replay: ReplayReport,
}

impl std::fmt::Debug for Datastore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datastore").finish()
    }
}

pub(crate) fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn blk(n: u64) -> u64 {
    n * MD_BLOCK as u64
}

fn random_u64() -> u64 {
    let mut x = now_ns() as u64 ^ (u64::from(std::process::id()) << 32);
    // splitmix64 finaliser: spreads the clock's low entropy over all bits.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
    x ^ (x >> 31)
}

impl Datastore {
    /// Formats `dev` as an empty datastore (root directory only). Calls `progress(done, total)`
    /// while it zeroes the metadata regions.
    pub fn mkfs(
        dev: Arc<dyn BlockDevice>,
        opts: &MkfsOptions,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(), FsError> {
        let size = dev.size();
        let layout = Layout::compute(size)
            .ok_or_else(|| FsError::Invalid(format!("device of {size} bytes is too small")))?;
        let uuid = opts.uuid.unwrap_or_else(|| {
            let mut u = [0u8; 16];
            u[..8].copy_from_slice(&random_u64().to_le_bytes());
            u[8..].copy_from_slice(&random_u64().rotate_left(17).to_le_bytes());
            u
        });
        // Zero every metadata region (bitmaps, inode table, pointer blocks, heartbeat): an
        // all-zero block is a valid "never used" block of its kind.
        let regions = [
            layout.heartbeat,
            layout.fd_bitmap,
            layout.fd_table,
            layout.pb_bitmap,
            layout.pb_table,
            layout.sb_bitmap,
            layout.fb_bitmap,
        ];
        let total: u64 = regions.iter().map(|r| r.blocks).sum();
        let chunk = vec![0u8; FILE_BLOCK as usize];
        let mut done = 0u64;
        for r in regions {
            let mut b = r.start;
            while b < r.start + r.blocks {
                let n = (r.start + r.blocks - b).min(MD_PER_FB);
                dev.write_at(blk(b), &chunk[..(n as usize) * MD_BLOCK])?;
                b += n;
                done += n;
                progress(done, total);
            }
        }
        // Heartbeat slots: formatted Free (state 0), generation 0.
        for i in 0..u64::from(HB_SLOTS) {
            let mut hb = vec![0u8; MD_BLOCK];
            put_u32(&mut hb, 32, i as u32);
            seal(&mut hb, magic::HEARTBEAT, layout.heartbeat.start + i, 0);
            dev.write_at(blk(layout.heartbeat.start + i), &hb)?;
        }
        Journal::format(&*dev, layout.journal)?;
        // A random first sequence number: journal blocks left by an earlier datastore on the
        // same device can never carry the sequence replay expects.
        let mut jsb = vec![0u8; MD_BLOCK];
        put_u64(&mut jsb, 32, 1);
        put_u64(&mut jsb, 40, (random_u64() >> 24) | 1);
        seal(&mut jsb, magic::JSB, layout.journal.start, 0);
        dev.write_at(blk(layout.journal.start), &jsb)?;
        let vh = VolumeHeader {
            uuid,
            features_compat: 0,
            features_incompat: 0,
            features_ro_compat: 0,
            volume_bytes: size,
            layout,
            generation: 0,
        };
        dev.write_at(blk(0), &vh.encode(0))?;
        dev.write_at(blk(1), &vh.encode(1))?;
        dev.flush()?;
        // The root directory, through the normal transactional path.
        let ds = Datastore::mount(dev)?;
        {
            let mut g = ds.lock()?;
            let ino = g.alloc(&ds.dev, Res::Fd)?;
            assert_eq!(ino, ROOT_INO, "the root directory is the first inode");
            let now = now_ns();
            let inode = Inode {
                ino: ROOT_INO,
                generation: 1,
                mode: S_IFDIR | 0o755,
                nlink: 2,
                uid: 0,
                gid: 0,
                provisioning: Provisioning::Thin,
                size: 0,
                mtime_ns: now,
                ctime_ns: now,
                layout: DataLayout::Resident,
                parent: ROOT_INO,
                allocated: 0,
                atime_ns: now,
                rdev: 0,
                attr_gen: 1,
                xattr_block: 0,
            };
            g.put_inode(&ds.dev, &inode)?;
            g.commit(&ds.dev, &ds.stats)?;
        }
        ds.unmount()?;
        Ok(())
    }

    /// Mounts: validates the volume header (falling back to the backup), replays the journal
    /// and counts free space.
    pub fn mount(dev: Arc<dyn BlockDevice>) -> Result<Datastore, FsError> {
        let size = dev.size();
        if size < 2 * MD_BLOCK as u64 {
            return Err(FsError::Mount(
                "device too small to hold a datastore".into(),
            ));
        }
        let mut b = vec![0u8; MD_BLOCK];
        dev.read_at(0, &mut b)?;
        let vh = match VolumeHeader::decode(&b, 0, size) {
            Ok(vh) => vh,
            Err(primary) => {
                dev.read_at(blk(1), &mut b)?;
                match VolumeHeader::decode(&b, 1, size) {
                    Ok(vh) => {
                        tracing::warn!(%primary, "primary volume header bad; using the backup");
                        vh
                    }
                    Err(_) => {
                        return Err(FsError::Mount(format!(
                            "no valid volume header (primary: {primary})"
                        )))
                    }
                }
            }
        };
        let (journal, replay) = Journal::replay(&*dev, &vh.layout)?;
        if replay.transactions > 0 {
            tracing::info!(
                transactions = replay.transactions,
                applied = replay.blocks_applied,
                skipped = replay.blocks_skipped,
                "journal replayed"
            );
        }
        let mut inner = Inner {
            vh,
            journal,
            cache: HashMap::new(),
            dirty: BTreeSet::new(),
            data_written: false,
            pending_free: HashSet::new(),
            hints: HashMap::new(),
            free: HashMap::new(),
            open: HashMap::new(),
            pins: HashMap::new(),
            reserved: HashSet::new(),
            zero_block: vec![0u8; FILE_BLOCK as usize],
            failed: false,
            dirty_since: None,
            changes: 0,
            undo: None,
            noted: HashSet::new(),
            dir_index: HashMap::new(),
            revoked: HashSet::new(),
            revoke_epoch: 0,
        };
        for r in [Res::Fd, Res::Pb, Res::Sb, Res::Fb] {
            let n = inner.count_free(&dev, r)?;
            inner.free.insert(r, n);
        }
        // Both headers carry the mount generation; rewriting them also repairs a bad one.
        inner.vh.generation += 1;
        dev.write_at(0, &inner.vh.encode(0))?;
        dev.write_at(blk(1), &inner.vh.encode(1))?;
        dev.flush()?;
        let ds = Datastore {
            dev,
            inner: Mutex::new(inner),
            batching: AtomicBool::new(true),
            deferred: AtomicBool::new(false),
            stats: FsStats::default(),
            replay,
        };
        // Files unlinked while open and not closed before a crash or unmount.
        let n = ds.reclaim_orphans()?;
        if n > 0 {
            tracing::info!(orphans = n, "reclaimed orphan inodes");
        }
        Ok(ds)
    }

    /// What mount-time replay did.
    pub fn replay_report(&self) -> &ReplayReport {
        &self.replay
    }

    /// Commits and flushes everything; the journal is left empty.
    pub fn unmount(&self) -> Result<(), FsError> {
        let mut g = self.lock()?;
        g.commit(&self.dev, &self.stats)?;
        g.journal.reset(&*self.dev)?;
        Ok(())
    }

    /// The device.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.dev
    }

    /// Turns batching of logical transactions into one physical transaction on or off (off
    /// commits every file-block group on its own; for measurements and equivalence tests).
    pub fn set_batching(&self, on: bool) {
        self.batching.store(on, Ordering::Relaxed);
    }

    pub(crate) fn lock(&self) -> Result<MutexGuard<'_, Inner>, FsError> {
        let g = self.inner.lock().map_err(|_| FsError::Failed)?;
        if g.failed {
            return Err(FsError::Failed);
        }
        Ok(g)
    }

    /// Runs `f` under the lock; a device or journal error marks the datastore failed.
    pub(crate) fn with<T>(
        &self,
        f: impl FnOnce(&mut Inner, &Arc<dyn BlockDevice>) -> Result<T, FsError>,
    ) -> Result<T, FsError> {
        self.run(false, f)
    }

    /// Runs a mutating operation in a transaction of its own: whatever earlier deferred
    /// writes left uncommitted is committed first, so that if the operation fails part-way
    /// its changes can be rolled back without touching anybody else's.
    pub(crate) fn with_op<T>(
        &self,
        f: impl FnOnce(&mut Inner, &Arc<dyn BlockDevice>) -> Result<T, FsError>,
    ) -> Result<T, FsError> {
        self.run(true, f)
    }

    /// Runs `f` under the lock. A device or journal error stops the datastore (the cache may
    /// be ahead of the disk). Any other error after `f` changed metadata rolls the change
    /// back (cached blocks dropped, free counts recomputed) when the transaction held nothing
    /// else; otherwise the datastore stops rather than commit half an operation.
    fn run<T>(
        &self,
        commit_first: bool,
        f: impl FnOnce(&mut Inner, &Arc<dyn BlockDevice>) -> Result<T, FsError>,
    ) -> Result<T, FsError> {
        let mut g = self.lock()?;
        if commit_first {
            if let Err(e) = g.commit(&self.dev, &self.stats) {
                g.failed = true;
                return Err(e);
            }
        }
        let had_dirty = !g.dirty.is_empty();
        let changes = g.changes;
        let r = f(&mut g, &self.dev);
        match &r {
            Err(FsError::Device(_) | FsError::Journal(_) | FsError::Failed) => g.failed = true,
            Err(e) if g.changes != changes => {
                if had_dirty {
                    tracing::error!(err = %e, "operation failed part-way with other changes pending; stopping the datastore");
                    g.failed = true;
                } else if let Err(re) = g.rollback(&self.dev) {
                    tracing::error!(err = %re, "rollback failed; stopping the datastore");
                    g.failed = true;
                }
            }
            _ => {}
        }
        r
    }

    /// Commits the open transaction (journal commit; new data flushed first).
    pub fn commit(&self) -> Result<(), FsError> {
        self.with(|g, dev| g.commit(dev, &self.stats))
    }

    /// Makes every completed write durable: commit, then device flush.
    pub fn sync(&self) -> Result<(), FsError> {
        self.with(|g, dev| {
            g.commit(dev, &self.stats)?;
            dev.flush()?;
            Ok(())
        })
    }

    /// Space counts.
    pub fn statfs(&self) -> Result<StatFs, FsError> {
        let g = self.lock()?;
        let l = &g.vh.layout;
        let f = |r| g.free.get(&r).copied().unwrap_or(0);
        Ok(StatFs {
            fb_total: l.fb_count,
            fb_free: f(Res::Fb),
            sb_total: l.sb_count,
            sb_free: f(Res::Sb),
            fd_total: l.fd_count - 1,
            fd_free: f(Res::Fd),
            volume_bytes: g.vh.volume_bytes,
        })
    }

    /// The volume layout.
    pub fn layout(&self) -> Result<Layout, FsError> {
        Ok(self.lock()?.vh.layout)
    }

    /// The volume uuid.
    pub fn uuid(&self) -> Result<[u8; 16], FsError> {
        Ok(self.lock()?.vh.uuid)
    }

    /// Resolves a path ("/a/b" or "a/b") to an inode number.
    pub fn lookup(&self, path: &str) -> Result<u64, FsError> {
        self.with(|g, dev| g.resolve_path(dev, path))
    }

    /// Reads an inode.
    pub fn stat(&self, ino: u64) -> Result<Inode, FsError> {
        self.with(|g, dev| g.get_inode(dev, ino))
    }

    /// Lists a directory.
    pub fn readdir(&self, path: &str) -> Result<Vec<DirEntry>, FsError> {
        self.with(|g, dev| {
            let ino = g.resolve_path(dev, path)?;
            let inode = g.get_inode(dev, ino)?;
            if !inode.is_dir() {
                return Err(FsError::NotDir(path.into()));
            }
            g.dir_entries(dev, ino)
        })
    }

    /// Creates a directory.
    pub fn mkdir(&self, path: &str) -> Result<u64, FsError> {
        self.with_op(|g, dev| {
            let ino = g.path_create(dev, &self.stats, path, S_IFDIR | 0o755, Provisioning::Thin)?;
            g.end_op(dev, &self.stats)?;
            Ok(ino)
        })
    }

    /// Creates a regular file of `size` bytes with the given provisioning. Thick eager files
    /// are zeroed (with `progress(done, total)` in file blocks).
    pub fn create_file(
        &self,
        path: &str,
        prov: Provisioning,
        size: u64,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<u64, FsError> {
        let ino = self.with_op(|g, dev| {
            let ino = g.path_create(dev, &self.stats, path, S_IFREG | 0o644, prov)?;
            g.end_op(dev, &self.stats)?;
            Ok(ino)
        })?;
        if size > 0 {
            self.set_size_progress(ino, size, progress)?;
        }
        Ok(ino)
    }

    /// Changes a file's size. Growing a thin file only changes its size; growing a thick file
    /// allocates (eager: zeroed, lazy: marked to-be-zeroed). Shrinking frees whole blocks past
    /// the end; refused while the file is open, since its blocks may be in flight.
    pub fn set_size(&self, ino: u64, size: u64) -> Result<(), FsError> {
        self.set_size_progress(ino, size, &mut |_, _| {})
    }

    fn set_size_progress(
        &self,
        ino: u64,
        size: u64,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(), FsError> {
        self.with_op(|g, dev| {
            if g.get_inode(dev, ino)?.is_dir() {
                return Err(FsError::IsDir(format!("inode {ino}")));
            }
            g.set_size(dev, &self.stats, ino, size, progress)?;
            g.end_op(dev, &self.stats)
        })
    }

    /// Removes a file (or an empty directory with `rmdir`).
    pub fn unlink(&self, path: &str) -> Result<(), FsError> {
        self.with_op(|g, dev| {
            g.path_remove(dev, &self.stats, path, false)?;
            g.end_op(dev, &self.stats)
        })
    }

    /// Removes an empty directory.
    pub fn rmdir(&self, path: &str) -> Result<(), FsError> {
        self.with_op(|g, dev| {
            g.path_remove(dev, &self.stats, path, true)?;
            g.end_op(dev, &self.stats)
        })
    }

    /// Renames `from` to `to`, replacing a file (or empty directory) at `to`.
    pub fn rename(&self, from: &str, to: &str) -> Result<(), FsError> {
        self.with_op(|g, dev| {
            g.path_rename(dev, &self.stats, from, to)?;
            g.end_op(dev, &self.stats)
        })
    }

    /// Reads up to `buf.len()` bytes at `offset`; returns the count (short at end of file).
    pub fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<usize, FsError> {
        self.with(|g, dev| g.read(dev, ino, offset, buf))
    }

    /// Writes `data` at `offset`, extending the file if needed; committed on return.
    pub fn write(&self, ino: u64, offset: u64, data: &[u8]) -> Result<(), FsError> {
        self.with_op(|g, dev| {
            if g.get_inode(dev, ino)?.is_dir() {
                return Err(FsError::IsDir(format!("inode {ino}")));
            }
            g.write_any(dev, &self.stats, ino, offset, data, self.batching())?;
            g.end_op(dev, &self.stats)
        })
    }

    pub(crate) fn batching(&self) -> bool {
        self.batching.load(Ordering::Relaxed)
    }

    /// The batched scatter-gather write path for file-block files (virtual disks): segments of
    /// any number of guest writes, in any order. Segments on allocated blocks go straight to
    /// the device; those needing allocation or zeroing are grouped per file block, each group's
    /// metadata update is one logical transaction, and all of them commit as one physical
    /// journal transaction (one per group with batching off). Segments must lie within the
    /// file's size. Committed on return.
    pub fn write_batch(&self, segs: &[WriteSeg<'_>]) -> Result<(), FsError> {
        self.with(|g, dev| {
            g.write_batch(dev, &self.stats, segs, self.batching())?;
            g.commit(dev, &self.stats)
        })
    }

    /// [`Datastore::write_batch`] without the final commit: the metadata updates stay in the
    /// open transaction (still one physical transaction for all of them) until the next
    /// commit — a guest FLUSH ([`Datastore::sync`]), [`Datastore::commit_if_older`], any
    /// namespace operation, or the transaction growing near its size limit. Until then a
    /// crash loses these writes, which virtio-blk's volatile write cache allows (completed
    /// writes are durable only after a flush); it never exposes other files' old bytes, since
    /// the allocations vanish with the uncommitted transaction.
    pub fn write_batch_deferred(&self, segs: &[WriteSeg<'_>]) -> Result<(), FsError> {
        self.with(|g, dev| g.write_batch(dev, &self.stats, segs, self.batching()))
    }

    /// Commits the open transaction if its first change is older than `interval`, bounding
    /// how much a crash can lose when nobody flushes.
    pub fn commit_if_older(&self, interval: std::time::Duration) -> Result<(), FsError> {
        self.with(|g, dev| match g.dirty_since {
            Some(t) if t.elapsed() >= interval => g.commit(dev, &self.stats),
            _ => Ok(()),
        })
    }

    /// Maps a byte range of a file-block file to a device offset when it lies within one
    /// allocated, already-zeroed file block: the fast path that needs no metadata update.
    /// The offset comes with an [`ExtentPin`]: until it is dropped the block stays the
    /// file's (shrink, truncate and punch are refused with [`FsError::Busy`]).
    pub fn map_direct(
        &self,
        ino: u64,
        offset: u64,
        len: u64,
    ) -> Result<Option<(u64, ExtentPin<'_>)>, FsError> {
        let at = self.with(|g, dev| {
            let at = Self::map_direct_locked(g, dev, ino, offset, len)?;
            if at.is_some() {
                g.pin(ino);
            }
            Ok(at)
        })?;
        Ok(at.map(|a| (a, ExtentPin { ds: self, ino })))
    }

    fn map_direct_locked(
        g: &mut Inner,
        dev: &Arc<dyn BlockDevice>,
        ino: u64,
        offset: u64,
        len: u64,
    ) -> Result<Option<u64>, FsError> {
        {
            let fbi = offset / FILE_BLOCK;
            let Some(end) = offset.checked_add(len) else {
                return Ok(None);
            };
            if len == 0 || (end - 1) / FILE_BLOCK != fbi {
                return Ok(None);
            }
            let inode = g.get_inode(dev, ino)?;
            if inode.layout != DataLayout::FileBlocks || end > inode.size {
                return Ok(None);
            }
            match g.fb_lookup(dev, ino, fbi)? {
                Some((fb, false)) => Ok(Some(g.vh.layout.fb_offset(fb) + offset % FILE_BLOCK)),
                _ => Ok(None),
            }
        }
    }

    /// Takes an extent lease on `ino` for as long as the returned value lives: a disk
    /// backend caches where the file's blocks are and has I/O to them in flight, so none may
    /// be freed or moved (shrink, truncate, punch, layout conversion, removal are refused
    /// with [`FsError::Busy`], by whoever asks). Growing stays allowed.
    pub fn lease_extents(self: &Arc<Self>, ino: u64) -> Result<ExtentLease, FsError> {
        self.with(|g, dev| {
            g.get_inode(dev, ino)?;
            g.pin(ino);
            Ok(())
        })?;
        Ok(ExtentLease {
            ds: self.clone(),
            ino,
        })
    }

    /// Extent leases (and pins) `ino` has.
    pub fn lease_count(&self, ino: u64) -> u64 {
        self.inner
            .lock()
            .map(|g| g.pins.get(&ino).map_or(0, |&n| u64::from(n)))
            .unwrap_or(0)
    }

    pub(crate) fn unpin(&self, ino: u64) {
        self.release(ino, true);
    }

    /// Marks a file open (served as a disk): it cannot be removed or shrunk until closed.
    pub fn open(&self, ino: u64) -> Result<Inode, FsError> {
        self.with(|g, dev| {
            let inode = g.get_inode(dev, ino)?;
            *g.open.entry(ino).or_insert(0) += 1;
            Ok(inode)
        })
    }

    /// How many [`Datastore::open`] references `ino` has (disks served, file handles).
    pub fn open_count(&self, ino: u64) -> u64 {
        self.inner
            .lock()
            .map(|g| g.open.get(&ino).map_or(0, |&n| n as u64))
            .unwrap_or(0)
    }

    /// Undoes one [`Datastore::open`].
    pub fn close(&self, ino: u64) {
        self.release(ino, false);
    }

    /// Drops one reference to `ino`: a lease or pin (`pin`) or an open. The last reference of
    /// either kind frees an unlinked file, as at a last close.
    fn release(&self, ino: u64, pin: bool) {
        let mut last = false;
        // A poisoned lock means a panic elsewhere; the tables go with the datastore.
        if let Ok(mut g) = self.inner.lock() {
            let g = &mut *g;
            let (mine, other) = if pin {
                (&mut g.pins, &g.open)
            } else {
                (&mut g.open, &g.pins)
            };
            if let Some(n) = mine.get_mut(&ino) {
                *n -= 1;
                if *n == 0 {
                    mine.remove(&ino);
                    last = !other.contains_key(&ino);
                }
            }
        }
        if last {
            if let Err(e) = self.reclaim_if_orphan(ino) {
                tracing::warn!(ino, pin, err = %e, "freeing an orphan at its last release failed");
            }
        }
    }
}

fn region_of(l: &Layout, r: Res) -> (Region, u64) {
    match r {
        Res::Fd => (l.fd_bitmap, l.fd_count),
        Res::Pb => (l.pb_bitmap, l.pb_count),
        Res::Sb => (l.sb_bitmap, l.sb_count),
        Res::Fb => (l.fb_bitmap, l.fb_count),
    }
}

/// A resource index decoded from disk (inode address, pointer-block entry, xattr block, ...)
/// must lie inside its region: outside it, the bitmap bit would fall into another metadata
/// block and the data offset outside the region (or past the device).
fn check_index(r: Res, i: u64, count: u64) -> Result<(), FsError> {
    if i >= count {
        return Err(FsError::Corrupt(FormatError::Geometry(match r {
            Res::Fd => "inode number out of range",
            Res::Pb => "pointer block number out of range",
            Res::Sb => "sub-block number out of range",
            Res::Fb => "file block number out of range",
        })));
    }
    Ok(())
}

fn res_name(r: Res) -> &'static str {
    match r {
        Res::Fd => "inodes",
        Res::Pb => "pointer blocks",
        Res::Sb => "sub-blocks",
        Res::Fb => "file blocks",
    }
}

impl Inner {
    /// Expected magic for a metadata block, by region.
    pub(crate) fn magic_for(&self, block: u64) -> Option<u32> {
        self.vh.layout.home_magic(block)
    }

    pub(crate) fn load(&mut self, dev: &Arc<dyn BlockDevice>, block: u64) -> Result<(), FsError> {
        if self.cache.contains_key(&block) {
            return Ok(());
        }
        let m = self
            .magic_for(block)
            .ok_or_else(|| FsError::Invalid(format!("block {block} is not metadata")))?;
        let mut b = vec![0u8; MD_BLOCK].into_boxed_slice();
        dev.read_at(blk(block), &mut b)?;
        if b.iter().any(|&x| x != 0) {
            // The pointer-block table also holds extended-attribute blocks.
            let m = if m == magic::POINTER && get_u32(&b, 0) == magic::XATTR {
                magic::XATTR
            } else {
                m
            };
            verify(&b, m, block)?;
        } else {
            put_u32(&mut b, 0, m);
        }
        self.cache.insert(block, b);
        Ok(())
    }

    pub(crate) fn md(&mut self, dev: &Arc<dyn BlockDevice>, block: u64) -> Result<&[u8], FsError> {
        self.load(dev, block)?;
        self.cache
            .get(&block)
            .map(|b| &b[..])
            .ok_or(FsError::Failed)
    }

    pub(crate) fn md_mut(
        &mut self,
        dev: &Arc<dyn BlockDevice>,
        block: u64,
    ) -> Result<&mut [u8], FsError> {
        self.load(dev, block)?;
        if self.dirty.is_empty() {
            self.dirty_since = Some(std::time::Instant::now());
        }
        self.changes += 1;
        if let Some(u) = self.undo.as_mut() {
            if let std::collections::hash_map::Entry::Vacant(v) = u.blocks.entry(block) {
                if let Some(img) = self.cache.get(&block) {
                    v.insert(img.clone());
                }
            }
        }
        self.dirty.insert(block);
        self.cache
            .get_mut(&block)
            .map(|b| &mut b[..])
            .ok_or(FsError::Failed)
    }

    pub(crate) fn count_free(
        &mut self,
        dev: &Arc<dyn BlockDevice>,
        r: Res,
    ) -> Result<u64, FsError> {
        let (bm, count) = region_of(&self.vh.layout, r);
        let mut used = 0u64;
        for i in 0..bm.blocks {
            let b = self.md(dev, bm.start + i)?;
            let bits = &b[MD_HEADER_BYTES..];
            used += bits.iter().map(|x| u64::from(x.count_ones())).sum::<u64>();
        }
        Ok(count.saturating_sub(used + u64::from(r == Res::Fd)))
    }

    pub(crate) fn get_bit(
        &mut self,
        dev: &Arc<dyn BlockDevice>,
        r: Res,
        i: u64,
    ) -> Result<bool, FsError> {
        let (bm, count) = region_of(&self.vh.layout, r);
        check_index(r, i, count)?;
        let b = self.md(dev, bm.start + i / BITS_PER_BITMAP_BLOCK)?;
        Ok(bit(b, i % BITS_PER_BITMAP_BLOCK))
    }

    pub(crate) fn put_bit(
        &mut self,
        dev: &Arc<dyn BlockDevice>,
        r: Res,
        i: u64,
        v: bool,
    ) -> Result<(), FsError> {
        let (bm, count) = region_of(&self.vh.layout, r);
        check_index(r, i, count)?;
        let b = self.md_mut(dev, bm.start + i / BITS_PER_BITMAP_BLOCK)?;
        set_bit(b, i % BITS_PER_BITMAP_BLOCK, v);
        Ok(())
    }

    /// Allocates one resource and returns its index. Inode numbers are their bitmap index;
    /// index 0 is reserved so that 0 can mean "no inode" in directory entries.
    pub(crate) fn alloc(&mut self, dev: &Arc<dyn BlockDevice>, r: Res) -> Result<u64, FsError> {
        let (_, count) = region_of(&self.vh.layout, r);
        if self.free.get(&r).copied().unwrap_or(0) == 0 {
            return Err(FsError::NoSpace(res_name(r)));
        }
        let start = self.hints.get(&r).copied().unwrap_or(0) % count;
        // Bounded: at most one pass over the bitmap.
        for k in 0..count {
            let i = (start + k) % count;
            if r == Res::Fd && i == 0 {
                continue;
            }
            if self.pending_free.contains(&(r, i))
                || (r == Res::Fb && (self.revoked.contains(&i) || self.reserved.contains(&i)))
                || self.get_bit(dev, r, i)?
            {
                continue;
            }
            self.put_bit(dev, r, i, true)?;
            self.hints.insert(r, i + 1);
            if let Some(f) = self.free.get_mut(&r) {
                *f -= 1;
            }
            return Ok(i);
        }
        Err(FsError::NoSpace(res_name(r)))
    }

    /// Frees a resource; it becomes allocatable after the next commit.
    pub(crate) fn release(
        &mut self,
        dev: &Arc<dyn BlockDevice>,
        r: Res,
        i: u64,
    ) -> Result<(), FsError> {
        // A block mapped twice on a crafted or damaged image (cross-linked) is freed twice:
        // that is corruption to report, never a panic that would poison the datastore lock.
        if !self.get_bit(dev, r, i)? {
            return Err(FsError::Corrupt(FormatError::Geometry(
                "freeing a resource that is already free (cross-linked blocks)",
            )));
        }
        self.put_bit(dev, r, i, false)?;
        self.pending_free.insert((r, i));
        Ok(())
    }

    /// Forgets the open transaction: its blocks are re-read from their home copies (the
    /// committed state) and the free counts recomputed.
    pub(crate) fn rollback(&mut self, dev: &Arc<dyn BlockDevice>) -> Result<(), FsError> {
        for b in std::mem::take(&mut self.dirty) {
            self.cache.remove(&b);
        }
        self.dir_index.clear();
        self.noted.clear();
        self.dirty_since = None;
        self.pending_free.clear();
        self.hints.clear();
        for r in [Res::Fd, Res::Pb, Res::Sb, Res::Fb] {
            let mut n = self.count_free(dev, r)?;
            if r == Res::Fb {
                n = n.saturating_sub(self.reserved.len() as u64);
            }
            self.free.insert(r, n);
        }
        Ok(())
    }

    /// Sets aside up to `n` free file blocks for a chunked allocation (see `reserved`).
    pub(crate) fn reserve_fb(
        &mut self,
        dev: &Arc<dyn BlockDevice>,
        n: u64,
    ) -> Result<Vec<u64>, FsError> {
        let count = self.vh.layout.fb_count;
        if self.free.get(&Res::Fb).copied().unwrap_or(0) < n {
            return Err(FsError::NoSpace(res_name(Res::Fb)));
        }
        let mut got = Vec::new();
        let start = self.hints.get(&Res::Fb).copied().unwrap_or(0) % count;
        // Bounded: at most one pass over the bitmap.
        for k in 0..count {
            if got.len() as u64 == n {
                break;
            }
            let i = (start + k) % count;
            if self.pending_free.contains(&(Res::Fb, i))
                || self.revoked.contains(&i)
                || self.reserved.contains(&i)
                || self.get_bit(dev, Res::Fb, i)?
            {
                continue;
            }
            self.reserved.insert(i);
            got.push(i);
        }
        if (got.len() as u64) < n {
            for i in got {
                self.reserved.remove(&i);
            }
            return Err(FsError::NoSpace(res_name(Res::Fb)));
        }
        if let Some(&last) = got.last() {
            self.hints.insert(Res::Fb, last + 1);
        }
        if let Some(f) = self.free.get_mut(&Res::Fb) {
            *f -= n;
        }
        Ok(got)
    }

    /// Returns reserved file blocks that were not used.
    pub(crate) fn unreserve_fb(&mut self, blocks: &[u64]) {
        for i in blocks {
            if self.reserved.remove(i) {
                if let Some(f) = self.free.get_mut(&Res::Fb) {
                    *f += 1;
                }
            }
        }
    }

    pub(crate) fn commit(
        &mut self,
        dev: &Arc<dyn BlockDevice>,
        stats: &FsStats,
    ) -> Result<(), FsError> {
        if self.dirty.is_empty() {
            return Ok(());
        }
        if self.data_written {
            // New data blocks must be durable before the metadata that publishes them.
            dev.flush()?;
            self.data_written = false;
        }
        let mut blocks: Vec<(u64, Vec<u8>)> = Vec::with_capacity(self.dirty.len());
        for &b in &self.dirty {
            let img = self.cache.get(&b).ok_or(FsError::Failed)?;
            blocks.push((b, img.to_vec()));
        }
        self.journal.commit(&**dev, &mut blocks)?;
        if self.journal.resets != self.revoke_epoch {
            self.revoked.clear();
            self.revoke_epoch = self.journal.resets;
        }
        for (b, img) in blocks {
            dev.write_at(blk(b), &img)?;
            self.cache.insert(b, img.into_boxed_slice());
        }
        self.dirty.clear();
        self.noted.clear();
        self.dirty_since = None;
        let freed = self.pending_free.len() as u64;
        for (r, _) in self.pending_free.drain() {
            if let Some(f) = self.free.get_mut(&r) {
                *f += 1;
            }
        }
        let _ = freed;
        stats.commits.store(self.journal.commits, Ordering::Relaxed);
        stats
            .journal_bytes
            .store(self.journal.bytes, Ordering::Relaxed);
        Ok(())
    }

    /// End of a namespace operation: one logical transaction, committed at once.
    pub(crate) fn end_op(
        &mut self,
        dev: &Arc<dyn BlockDevice>,
        stats: &FsStats,
    ) -> Result<(), FsError> {
        stats.logical_txns.fetch_add(1, Ordering::Relaxed);
        self.commit(dev, stats)
    }

    pub(crate) fn maybe_commit(
        &mut self,
        dev: &Arc<dyn BlockDevice>,
        stats: &FsStats,
    ) -> Result<(), FsError> {
        if self.dirty.len() >= TXN_SOFT_MAX {
            self.commit(dev, stats)?;
        }
        Ok(())
    }

    pub(crate) fn pin(&mut self, ino: u64) {
        *self.pins.entry(ino).or_insert(0) += 1;
    }

    /// Open (a handle, a disk) or holding an extent lease: not to be freed.
    pub(crate) fn in_use(&self, ino: u64) -> bool {
        self.open.contains_key(&ino) || self.pins.contains_key(&ino)
    }

    /// Refuses to free or move blocks of a file someone holds an extent lease on.
    pub(crate) fn check_unleased(&self, ino: u64) -> Result<(), FsError> {
        if self.pins.contains_key(&ino) {
            return Err(FsError::Busy(format!(
                "inode {ino} (its blocks are in use by a disk or an I/O in flight)"
            )));
        }
        Ok(())
    }

    // ----- inodes -----

    pub(crate) fn check_ino(&self, ino: u64) -> Result<(), FsError> {
        if ino == 0 || ino >= self.vh.layout.fd_count {
            return Err(FsError::Invalid(format!("inode {ino} out of range")));
        }
        Ok(())
    }

    pub(crate) fn get_inode(
        &mut self,
        dev: &Arc<dyn BlockDevice>,
        ino: u64,
    ) -> Result<Inode, FsError> {
        self.check_ino(ino)?;
        if !self.get_bit(dev, Res::Fd, ino)? {
            return Err(FsError::NotFound(format!("inode {ino}")));
        }
        let b = self.vh.layout.inode_block(ino);
        let inode = Inode::decode(self.md(dev, b)?)?;
        if inode.ino != ino {
            return Err(FsError::Corrupt(FormatError::Geometry(
                "inode number mismatch",
            )));
        }
        let l = &self.vh.layout;
        if inode.xattr_block > l.pb_count {
            return Err(FsError::Corrupt(FormatError::Geometry(
                "inode: xattr block out of range",
            )));
        }
        if inode.parent >= l.fd_count {
            return Err(FsError::Corrupt(FormatError::Geometry(
                "inode: parent out of range",
            )));
        }
        Ok(inode)
    }

    pub(crate) fn put_inode(
        &mut self,
        dev: &Arc<dyn BlockDevice>,
        inode: &Inode,
    ) -> Result<(), FsError> {
        self.check_ino(inode.ino)?;
        let b = self.vh.layout.inode_block(inode.ino);
        inode.encode_into(self.md_mut(dev, b)?);
        Ok(())
    }

    pub(crate) fn alloc_ino(&mut self, dev: &Arc<dyn BlockDevice>) -> Result<(u64, u32), FsError> {
        let ino = self.alloc(dev, Res::Fd)?;
        let b = self.vh.layout.inode_block(ino);
        let old_gen = get_u32(self.md(dev, b)?, 40);
        let blockm = self.md_mut(dev, b)?;
        blockm[MD_HEADER_BYTES..].fill(0);
        Ok((ino, old_gen.wrapping_add(1).max(1)))
    }

    pub(crate) fn inode_addr(
        &mut self,
        dev: &Arc<dyn BlockDevice>,
        ino: u64,
        i: usize,
    ) -> Result<u64, FsError> {
        let b = self.vh.layout.inode_block(ino);
        let (sb_count, pb_count) = (self.vh.layout.sb_count, self.vh.layout.pb_count);
        let blk = self.md(dev, b)?;
        let a = inode_addr(blk, i);
        // Addresses are index + 1 of a sub-block or pointer block, by the inode's layout;
        // resident inodes hold data there, never read through this.
        let limit = match blk[INODE_LAYOUT_OFFSET] {
            x if x == DataLayout::SubBlocks as u8 => sb_count,
            x if x == DataLayout::FileBlocks as u8 => pb_count,
            _ => u64::MAX,
        };
        if a > limit {
            return Err(FsError::Corrupt(FormatError::Geometry(
                "inode: block address out of range",
            )));
        }
        Ok(a)
    }

    pub(crate) fn set_inode_addr(
        &mut self,
        dev: &Arc<dyn BlockDevice>,
        ino: u64,
        i: usize,
        v: u64,
    ) -> Result<(), FsError> {
        let b = self.vh.layout.inode_block(ino);
        set_inode_addr(self.md_mut(dev, b)?, i, v);
        Ok(())
    }

    // ----- file-block mapping -----

    /// File block `fbi` of `ino`: (file block index, to-be-zeroed) if allocated.
    pub(crate) fn fb_lookup(
        &mut self,
        dev: &Arc<dyn BlockDevice>,
        ino: u64,
        fbi: u64,
    ) -> Result<Option<(u64, bool)>, FsError> {
        let slot = (fbi / PB_ENTRIES as u64) as usize;
        if slot >= INODE_ADDRS {
            return Ok(None);
        }
        let pb = self.inode_addr(dev, ino, slot)?;
        if pb == 0 {
            return Ok(None);
        }
        let pbb = self.vh.layout.pb_block(pb - 1);
        let e = pb_entry(self.md(dev, pbb)?, (fbi % PB_ENTRIES as u64) as usize);
        let fb = e & !PB_TBZ;
        if fb == 0 {
            return Ok(None);
        }
        check_index(Res::Fb, fb - 1, self.vh.layout.fb_count)?;
        Ok(Some((fb - 1, e & PB_TBZ != 0)))
    }

    /// Sets the entry for file block `fbi` (allocating the pointer block if needed);
    /// `fb = None` clears it.
    pub(crate) fn fb_set(
        &mut self,
        dev: &Arc<dyn BlockDevice>,
        ino: u64,
        fbi: u64,
        fb: Option<(u64, bool)>,
    ) -> Result<(), FsError> {
        let slot = (fbi / PB_ENTRIES as u64) as usize;
        if slot >= INODE_ADDRS {
            return Err(FsError::Invalid("file too large".into()));
        }
        let mut pb = self.inode_addr(dev, ino, slot)?;
        if pb == 0 {
            if fb.is_none() {
                return Ok(());
            }
            pb = self.alloc(dev, Res::Pb)? + 1;
            let pbb = self.vh.layout.pb_block(pb - 1);
            self.md_mut(dev, pbb)?[MD_HEADER_BYTES..].fill(0);
            self.set_inode_addr(dev, ino, slot, pb)?;
        }
        let pbb = self.vh.layout.pb_block(pb - 1);
        let v = match fb {
            Some((i, tbz)) => (i + 1) | if tbz { PB_TBZ } else { 0 },
            None => 0,
        };
        set_pb_entry(
            self.md_mut(dev, pbb)?,
            (fbi % PB_ENTRIES as u64) as usize,
            v,
        );
        if fb.is_none() {
            // Free the pointer block once it maps nothing. An entry is a hole when its
            // block bits are 0, whatever its TBZ bit says (FORMAT.md §8; fb_lookup reads it
            // so): a stray TBZ bit on a hole must not keep the block alive, or it would
            // stay in the inode and leak when the inode is freed.
            let empty = (0..PB_ENTRIES).all(|i| pb_entry(&self.cache[&pbb], i) & !PB_TBZ == 0);
            if empty {
                self.set_inode_addr(dev, ino, slot, 0)?;
                self.release(dev, Res::Pb, pb - 1)?;
            }
        }
        Ok(())
    }

    pub(crate) fn free_inode(
        &mut self,
        dev: &Arc<dyn BlockDevice>,
        stats: &FsStats,
        ino: u64,
    ) -> Result<(), FsError> {
        self.revoke_dir_blocks(dev, ino)?;
        self.truncate_storage(dev, stats, ino, 0)?;
        let xb = self.get_inode(dev, ino)?.xattr_block;
        if xb != 0 {
            self.release(dev, Res::Pb, xb - 1)?;
        }
        self.dir_index.remove(&ino);
        let b = self.vh.layout.inode_block(ino);
        let generation = get_u32(self.md(dev, b)?, 40);
        let blockm = self.md_mut(dev, b)?;
        blockm[MD_HEADER_BYTES..].fill(0);
        // Keep the generation so the next use of the slot gets a newer one.
        put_u32(blockm, 40, generation);
        self.release(dev, Res::Fd, ino)
    }

    // ----- data -----

    pub(crate) fn read(
        &mut self,
        dev: &Arc<dyn BlockDevice>,
        ino: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, FsError> {
        let inode = self.get_inode(dev, ino)?;
        if offset >= inode.size {
            return Ok(0);
        }
        let n = (inode.size - offset).min(buf.len() as u64) as usize;
        let buf = &mut buf[..n];
        match inode.layout {
            DataLayout::Resident => {
                let b = self.md(dev, self.vh.layout.inode_block(ino))?;
                let o = INODE_ADDR_OFFSET + offset as usize;
                buf.copy_from_slice(&b[o..o + n]);
            }
            DataLayout::SubBlocks => {
                let mut done = 0usize;
                while done < n {
                    let pos = offset + done as u64;
                    let sbi = (pos / SUB_BLOCK) as usize;
                    let within = pos % SUB_BLOCK;
                    let len = ((SUB_BLOCK - within) as usize).min(n - done);
                    let a = self.inode_addr(dev, ino, sbi)?;
                    let out = &mut buf[done..done + len];
                    if a == 0 {
                        out.fill(0);
                    } else {
                        dev.read_at(self.vh.layout.sb_offset(a - 1) + within, out)?;
                    }
                    done += len;
                }
            }
            DataLayout::FileBlocks => {
                let mut done = 0usize;
                while done < n {
                    let pos = offset + done as u64;
                    let within = pos % FILE_BLOCK;
                    let len = ((FILE_BLOCK - within) as usize).min(n - done);
                    let out = &mut buf[done..done + len];
                    match self.fb_lookup(dev, ino, pos / FILE_BLOCK)? {
                        Some((fb, false)) => {
                            dev.read_at(self.vh.layout.fb_offset(fb) + within, out)?
                        }
                        _ => out.fill(0),
                    }
                    done += len;
                }
            }
        }
        Ok(n)
    }

    /// Writes through whatever layout the file has, converting it upwards when it outgrows
    /// resident data or sub-blocks.
    pub(crate) fn write_any(
        &mut self,
        dev: &Arc<dyn BlockDevice>,
        stats: &FsStats,
        ino: u64,
        offset: u64,
        data: &[u8],
        batching: bool,
    ) -> Result<(), FsError> {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= FILE_BYTES_MAX)
            .ok_or_else(|| FsError::Invalid("write past the largest file size".into()))?;
        let mut inode = self.grow_layout(dev, stats, ino, end)?;
        if end > inode.size {
            inode.size = end;
        }
        inode.mtime_ns = now_ns();
        inode.ctime_ns = inode.mtime_ns;
        self.put_inode(dev, &inode)?;
        if data.is_empty() {
            return Ok(());
        }
        match inode.layout {
            DataLayout::Resident => {
                let b = self.md_mut(dev, self.vh.layout.inode_block(ino))?;
                let o = INODE_ADDR_OFFSET + offset as usize;
                b[o..o + data.len()].copy_from_slice(data);
            }
            DataLayout::SubBlocks => {
                let mut done = 0usize;
                while done < data.len() {
                    let pos = offset + done as u64;
                    let sbi = (pos / SUB_BLOCK) as usize;
                    let within = pos % SUB_BLOCK;
                    let len = ((SUB_BLOCK - within) as usize).min(data.len() - done);
                    let mut a = self.inode_addr(dev, ino, sbi)?;
                    if a == 0 {
                        a = self.alloc(dev, Res::Sb)? + 1;
                        // A fresh sub-block is written whole (zeroes around the data) before
                        // the commit that publishes it.
                        let z = &mut self.zero_block[..SUB_BLOCK as usize];
                        z.fill(0);
                        z[within as usize..within as usize + len]
                            .copy_from_slice(&data[done..done + len]);
                        dev.write_at(self.vh.layout.sb_offset(a - 1), z)?;
                        self.data_written = true;
                        self.set_inode_addr(dev, ino, sbi, a)?;
                        let mut i2 = self.get_inode(dev, ino)?;
                        i2.allocated = i2.allocated.saturating_add(1);
                        self.put_inode(dev, &i2)?;
                    } else {
                        dev.write_at(
                            self.vh.layout.sb_offset(a - 1) + within,
                            &data[done..done + len],
                        )?;
                    }
                    done += len;
                }
            }
            DataLayout::FileBlocks => {
                let seg = [WriteSeg { ino, offset, data }];
                self.write_batch(dev, stats, &seg, batching)?;
            }
        }
        Ok(())
    }

    /// Converts the file to the smallest layout that holds `size` bytes if its current one
    /// cannot; returns the (possibly updated) inode.
    pub(crate) fn grow_layout(
        &mut self,
        dev: &Arc<dyn BlockDevice>,
        stats: &FsStats,
        ino: u64,
        size: u64,
    ) -> Result<Inode, FsError> {
        let inode = self.get_inode(dev, ino)?;
        let needed = DataLayout::for_size(size);
        if (needed as u8) <= (inode.layout as u8) {
            return Ok(inode);
        }
        self.convert(dev, stats, ino, needed)?;
        self.get_inode(dev, ino)
    }

    /// Moves a file's bytes to a larger layout (resident -> sub-blocks -> file blocks).
    pub(crate) fn convert(
        &mut self,
        dev: &Arc<dyn BlockDevice>,
        stats: &FsStats,
        ino: u64,
        to: DataLayout,
    ) -> Result<(), FsError> {
        let inode = self.get_inode(dev, ino)?;
        let mut content = vec![0u8; inode.size as usize];
        self.read(dev, ino, 0, &mut content)?;
        self.truncate_storage(dev, stats, ino, 0)?;
        let mut i2 = self.get_inode(dev, ino)?;
        i2.layout = to;
        i2.size = 0;
        self.put_inode(dev, &i2)?;
        let b = self.md_mut(dev, self.vh.layout.inode_block(ino))?;
        b[INODE_ADDR_OFFSET..].fill(0);
        self.write_any(dev, stats, ino, 0, &content, true)
    }

    /// Frees storage past `size` (whole blocks) and zeroes the tail of the last partial block
    /// in resident files, so a later extension reads zeroes.
    pub(crate) fn truncate_storage(
        &mut self,
        dev: &Arc<dyn BlockDevice>,
        stats: &FsStats,
        ino: u64,
        size: u64,
    ) -> Result<(), FsError> {
        // The one place blocks leave a file (shrink, truncate, layout conversion, free): an
        // extent lease forbids it, whoever asks (see `ExtentLease`).
        self.check_unleased(ino)?;
        let inode = self.get_inode(dev, ino)?;
        match inode.layout {
            DataLayout::Resident => {
                let b = self.md_mut(dev, self.vh.layout.inode_block(ino))?;
                b[INODE_ADDR_OFFSET + size.min(RESIDENT_MAX) as usize..].fill(0);
            }
            DataLayout::SubBlocks => {
                let keep = size.div_ceil(SUB_BLOCK) as usize;
                for i in keep..SB_FILE_MAX_BLOCKS as usize {
                    let a = self.inode_addr(dev, ino, i)?;
                    if a != 0 {
                        self.release(dev, Res::Sb, a - 1)?;
                        self.set_inode_addr(dev, ino, i, 0)?;
                        let mut i2 = self.get_inode(dev, ino)?;
                        i2.allocated = i2.allocated.saturating_sub(1);
                        self.put_inode(dev, &i2)?;
                    }
                }
                if !size.is_multiple_of(SUB_BLOCK) {
                    let a = self.inode_addr(dev, ino, (size / SUB_BLOCK) as usize)?;
                    if a != 0 {
                        let tail = (SUB_BLOCK - size % SUB_BLOCK) as usize;
                        let z = vec![0u8; tail];
                        dev.write_at(self.vh.layout.sb_offset(a - 1) + size % SUB_BLOCK, &z)?;
                        // The zeroes must be durable before the shrink commits, or a crash
                        // could bring the cut-off bytes back on a later extension.
                        self.data_written = true;
                    }
                }
            }
            DataLayout::FileBlocks => {
                let keep = size.div_ceil(FILE_BLOCK);
                let have = inode.size.div_ceil(FILE_BLOCK);
                for fbi in keep..have.max(keep) {
                    if let Some((fb, _)) = self.fb_lookup(dev, ino, fbi)? {
                        self.fb_set(dev, ino, fbi, None)?;
                        self.release(dev, Res::Fb, fb)?;
                        let mut i2 = self.get_inode(dev, ino)?;
                        i2.allocated = i2.allocated.saturating_sub(1);
                        self.put_inode(dev, &i2)?;
                        self.maybe_commit(dev, stats)?;
                    }
                }
                if !size.is_multiple_of(FILE_BLOCK) {
                    if let Some((fb, false)) = self.fb_lookup(dev, ino, size / FILE_BLOCK)? {
                        let tail = (FILE_BLOCK - size % FILE_BLOCK) as usize;
                        self.zero_block[..tail].fill(0);
                        let off = self.vh.layout.fb_offset(fb) + size % FILE_BLOCK;
                        dev.write_at(off, &self.zero_block[..tail])?;
                        self.data_written = true;
                    }
                }
            }
        }
        Ok(())
    }

    pub(crate) fn set_size(
        &mut self,
        dev: &Arc<dyn BlockDevice>,
        stats: &FsStats,
        ino: u64,
        size: u64,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(), FsError> {
        if size > FILE_BYTES_MAX {
            return Err(FsError::Invalid("size beyond the largest file".into()));
        }
        let mut inode = self.get_inode(dev, ino)?;
        if size < inode.size {
            if self.in_use(ino) {
                return Err(FsError::Busy(format!("inode {ino} (shrink while open)")));
            }
            self.truncate_storage(dev, stats, ino, size)?;
            let mut i2 = self.get_inode(dev, ino)?;
            i2.size = size;
            i2.ctime_ns = now_ns();
            return self.put_inode(dev, &i2);
        }
        if size == inode.size {
            return Ok(());
        }
        inode = self.grow_layout(dev, stats, ino, size)?;
        let old = inode.size;
        inode.size = size;
        inode.ctime_ns = now_ns();
        self.put_inode(dev, &inode)?;
        if inode.layout == DataLayout::FileBlocks && inode.provisioning != Provisioning::Thin {
            let eager = inode.provisioning == Provisioning::ThickEager;
            let first = old.div_ceil(FILE_BLOCK);
            let last = size.div_ceil(FILE_BLOCK);
            let need = last - first;
            if need > self.free.get(&Res::Fb).copied().unwrap_or(0) {
                let mut i2 = self.get_inode(dev, ino)?;
                i2.size = old;
                self.put_inode(dev, &i2)?;
                return Err(FsError::NoSpace("file blocks"));
            }
            for fbi in first..last {
                if self.fb_lookup(dev, ino, fbi)?.is_some() {
                    continue;
                }
                let fb = self.alloc(dev, Res::Fb)?;
                if eager {
                    dev.write_zeroes(self.vh.layout.fb_offset(fb), FILE_BLOCK)?;
                    self.data_written = true;
                }
                self.fb_set(dev, ino, fbi, Some((fb, !eager)))?;
                let mut i2 = self.get_inode(dev, ino)?;
                i2.allocated = i2.allocated.saturating_add(1);
                self.put_inode(dev, &i2)?;
                progress(fbi - first + 1, need);
                self.maybe_commit(dev, stats)?;
            }
        }
        Ok(())
    }

    pub(crate) fn write_batch(
        &mut self,
        dev: &Arc<dyn BlockDevice>,
        stats: &FsStats,
        segs: &[WriteSeg<'_>],
        batching: bool,
    ) -> Result<(), FsError> {
        // Validate first: nothing is modified if any segment is bad.
        let mut sizes: BTreeMap<u64, u64> = BTreeMap::new();
        for s in segs {
            if let std::collections::btree_map::Entry::Vacant(v) = sizes.entry(s.ino) {
                let inode = self.get_inode(dev, s.ino)?;
                if inode.layout != DataLayout::FileBlocks {
                    return Err(FsError::Invalid(
                        "batched writes need a file-block file".into(),
                    ));
                }
                v.insert(inode.size);
            }
            let end = s.offset.checked_add(s.data.len() as u64);
            if end.is_none_or(|e| e > sizes[&s.ino]) {
                return Err(FsError::Invalid("write past the end of the file".into()));
            }
        }
        // Split into per-file-block pieces and sort by (file, block), keeping submission
        // order within a block so later segments overwrite earlier ones.
        let mut pieces: Vec<(u64, u64, usize, u64, &[u8])> = Vec::new();
        for (k, s) in segs.iter().enumerate() {
            let mut done = 0usize;
            while done < s.data.len() {
                let pos = s.offset + done as u64;
                let within = pos % FILE_BLOCK;
                let len = ((FILE_BLOCK - within) as usize).min(s.data.len() - done);
                pieces.push((
                    s.ino,
                    pos / FILE_BLOCK,
                    k,
                    within,
                    &s.data[done..done + len],
                ));
                done += len;
            }
        }
        pieces.sort_by_key(|p| (p.0, p.1, p.2));
        // Groups: runs of pieces on the same file block.
        let mut groups: Vec<(usize, usize)> = Vec::new();
        let mut i = 0;
        while i < pieces.len() {
            let mut j = i + 1;
            while j < pieces.len() && (pieces[j].0, pieces[j].1) == (pieces[i].0, pieces[i].1) {
                j += 1;
            }
            groups.push((i, j));
            i = j;
        }
        // Classify; reserve space for the dependent groups before touching anything.
        let mut dependent = Vec::new();
        let mut new_blocks = 0u64;
        for &(a, b) in &groups {
            let (ino, fbi) = (pieces[a].0, pieces[a].1);
            match self.fb_lookup(dev, ino, fbi)? {
                Some((fb, false)) => {
                    let base = self.vh.layout.fb_offset(fb);
                    for p in &pieces[a..b] {
                        dev.write_at(base + p.3, p.4)?;
                    }
                    stats
                        .direct_segments
                        .fetch_add((b - a) as u64, Ordering::Relaxed);
                }
                Some((_, true)) => dependent.push((a, b)),
                None => {
                    new_blocks += 1;
                    dependent.push((a, b));
                }
            }
        }
        if new_blocks > self.free.get(&Res::Fb).copied().unwrap_or(0) {
            return Err(FsError::NoSpace("file blocks"));
        }
        for (a, b) in dependent {
            let (ino, fbi) = (pieces[a].0, pieces[a].1);
            let existing = self.fb_lookup(dev, ino, fbi)?;
            let fb = match existing {
                Some((fb, _)) => fb,
                None => self.alloc(dev, Res::Fb)?,
            };
            // The whole block is zeroed, then the group's data written over it, so no byte of
            // a previous owner can ever be read through this file. Zeroing is a hole punch on
            // a file-backed datastore (no 1 MiB write per allocation).
            let base = self.vh.layout.fb_offset(fb);
            dev.write_zeroes(base, FILE_BLOCK)?;
            for p in &pieces[a..b] {
                dev.write_at(base + p.3, p.4)?;
            }
            self.data_written = true;
            self.fb_set(dev, ino, fbi, Some((fb, false)))?;
            if existing.is_none() {
                let mut inode = self.get_inode(dev, ino)?;
                inode.allocated = inode.allocated.saturating_add(1);
                self.put_inode(dev, &inode)?;
                stats.blocks_allocated.fetch_add(1, Ordering::Relaxed);
            }
            stats.logical_txns.fetch_add(1, Ordering::Relaxed);
            if batching {
                self.maybe_commit(dev, stats)?;
            } else {
                self.commit(dev, stats)?;
            }
        }
        Ok(())
    }
}
