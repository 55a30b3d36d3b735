//! The datastore facade: [`Datastore`], the one object other crates use. It owns the device,
//! the lock around the layered state ([`crate::ns::Namespace`] and everything below it), the
//! counters and the commit policy, and brackets every operation in a transaction: committed
//! on return, or (deferred) left in the open transaction and undone alone on failure.
//!
//! Its methods are thin: lock, call one layer's operation, map the result. They are grouped
//! by what they serve: mount and transactions here, extent leases and opens in [`lease`], file
//! data in [`io`], the inode-based POSIX namespace in [`posix`], the path API in [`path`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::alloc::{Res, Space};
use crate::commit::CommitPolicy;
use crate::data::{Extent, Files, OP_RESERVE};
use crate::dir::Dirs;
use crate::format::*;
use crate::inode::{now_ns, Inodes, Ref};
use crate::journal::{Journal, ReplayReport};
use crate::ns::Namespace;
use crate::txn::{blk, Dev, Meta};

mod io;
mod lease;
mod path;
mod posix;

pub use crate::data::WriteSeg;
pub use crate::dir::DIR_BYTES_MAX;
pub use crate::error::FsError;
pub use crate::txn::FsStats;

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
        self.ds.release(self.ino, Ref::Lease);
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
        self.ds.release(self.ino, Ref::Lease);
    }
}

/// Where a byte range of a file lives, from [`Datastore::map`]: device extents (readable and
/// writable in place), zero extents (holes, to-be-zeroed blocks) and inline bytes (resident
/// data, copied out). Valid while the [`ExtentLease`] returned with it lives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mapping {
    /// The pieces, in file order.
    pub extents: Vec<Extent>,
    /// Bytes covered (the range clipped at the end of the file).
    pub len: u64,
}

/// A mounted datastore.
pub struct Datastore {
    pub(crate) dev: Dev,
    pub(crate) inner: Mutex<Namespace>,
    batching: AtomicBool,
    /// Mirror of the commit policy's `deferred`, read before the lock is taken.
    deferred: AtomicBool,
    /// Counters.
    pub stats: FsStats,
    replay: ReplayReport,
}

impl std::fmt::Debug for Datastore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datastore").finish()
    }
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
        dev: Dev,
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
    pub fn mount(dev: Dev) -> Result<Datastore, FsError> {
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
        // The layers, bottom up: metadata cache and transaction, allocator (counts the free
        // resources), inode table, file data, directories, namespace.
        let mut space = Space::new(Meta::new(vh, journal), &dev)?;
        // Both headers carry the mount generation; rewriting them also repairs a bad one.
        space.vh.generation += 1;
        dev.write_at(0, &space.vh.encode(0))?;
        dev.write_at(blk(1), &space.vh.encode(1))?;
        dev.flush()?;
        let inner = Namespace::new(Dirs::new(Files::new(Inodes::new(space))));
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
    pub fn device(&self) -> &Dev {
        &self.dev
    }

    /// Turns batching of logical transactions into one physical transaction on or off (off
    /// commits every file-block group on its own; for measurements and equivalence tests).
    pub fn set_batching(&self, on: bool) {
        self.batching.store(on, Ordering::Relaxed);
    }

    pub(crate) fn lock(&self) -> Result<MutexGuard<'_, Namespace>, FsError> {
        let g = self.inner.lock().map_err(|_| FsError::Failed)?;
        if g.failed {
            return Err(FsError::Failed);
        }
        Ok(g)
    }

    /// Runs `f` under the lock; a device or journal error marks the datastore failed.
    pub(crate) fn with<T>(
        &self,
        f: impl FnOnce(&mut Namespace, &Dev) -> Result<T, FsError>,
    ) -> Result<T, FsError> {
        self.run(false, f)
    }

    /// Runs a mutating operation in a transaction of its own: whatever earlier deferred
    /// writes left uncommitted is committed first, so that if the operation fails part-way
    /// its changes can be rolled back without touching anybody else's.
    pub(crate) fn with_op<T>(
        &self,
        f: impl FnOnce(&mut Namespace, &Dev) -> Result<T, FsError>,
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
        f: impl FnOnce(&mut Namespace, &Dev) -> Result<T, FsError>,
    ) -> Result<T, FsError> {
        let mut g = self.lock()?;
        if commit_first {
            if let Err(e) = g.commit(&self.dev, &self.stats) {
                g.failed = true;
                return Err(e);
            }
        }
        let had_dirty = g.dirty_len() > 0;
        let changes = g.changes();
        let r = f(&mut g, &self.dev);
        match &r {
            Err(FsError::Device(_) | FsError::Journal(_) | FsError::Failed) => g.failed = true,
            Err(e) if g.changes() != changes => {
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
        let f = |r| g.free_count(r);
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

    /// Reads an inode.
    pub fn stat(&self, ino: u64) -> Result<Inode, FsError> {
        self.with(|g, dev| g.get_inode(dev, ino))
    }

    pub(crate) fn batching(&self) -> bool {
        self.batching.load(Ordering::Relaxed)
    }

    /// Runs a namespace operation: committed on return, or (with deferred commits on) left
    /// in the open transaction, undone on failure without touching other pending changes.
    pub(crate) fn ns_op<T>(
        &self,
        f: impl FnOnce(&mut Namespace, &Dev, &FsStats) -> Result<T, FsError>,
    ) -> Result<T, FsError> {
        if !self.deferred.load(Ordering::Relaxed) {
            return self.with_op(|g, dev| {
                let r = f(g, dev, &self.stats)?;
                g.end_op(dev, &self.stats)?;
                Ok(r)
            });
        }
        let mut g = self.lock()?;
        if g.room() < OP_RESERVE {
            if let Err(e) = g.commit(&self.dev, &self.stats) {
                g.failed = true;
                return Err(e);
            }
        }
        let save = g.savepoint();
        let changes = g.changes();
        let r = f(&mut g, &self.dev, &self.stats);
        let pre = g.end_savepoint().unwrap_or_default();
        match &r {
            Err(FsError::Device(_) | FsError::Journal(_) | FsError::Failed) => g.failed = true,
            Err(e) if g.changes() != changes => {
                if !g.restore(save, pre) {
                    tracing::error!(err = %e, "operation failed after a partial commit; stopping the datastore");
                    g.failed = true;
                }
            }
            Err(_) => {}
            Ok(_) => {
                self.stats.logical_txns.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }

    /// The commit policy.
    pub fn commit_policy(&self) -> Result<CommitPolicy, FsError> {
        Ok(self.lock()?.policy)
    }

    /// Replaces the commit policy (see [`CommitPolicy`]).
    pub fn set_commit_policy(&self, policy: CommitPolicy) -> Result<(), FsError> {
        let mut g = self.lock()?;
        g.policy = policy;
        self.deferred.store(policy.deferred, Ordering::Relaxed);
        Ok(())
    }

    /// Commits the open transaction if it is older than the policy's max age: the serving
    /// side calls this every [`CommitPolicy::tick`], bounding how much a crash can lose when
    /// nobody flushes. Returns whether it committed.
    pub fn commit_if_due(&self) -> Result<bool, FsError> {
        self.with(|g, dev| {
            if !g.commit_due() {
                return Ok(false);
            }
            g.commit(dev, &self.stats)?;
            Ok(true)
        })
    }

    /// Commits the open transaction if its first change is older than `interval`.
    /// Superseded by [`Datastore::commit_if_due`], which applies the datastore's policy.
    pub fn commit_if_older(&self, interval: std::time::Duration) -> Result<(), FsError> {
        self.with(|g, dev| {
            if g.older_than(interval) {
                g.commit(dev, &self.stats)?;
            }
            Ok(())
        })
    }

    /// Turns the policy's deferred namespace commits on or off (see
    /// [`CommitPolicy::deferred`]; [`CommitPolicy::serving`] has them on).
    pub fn set_deferred_commit(&self, on: bool) {
        self.deferred.store(on, Ordering::Relaxed);
        if let Ok(mut g) = self.inner.lock() {
            g.policy.deferred = on;
        }
    }
}
