//! The bottom layer: the metadata cache and the open physical transaction.
//!
//! All metadata lives in a cache of 4 KiB blocks loaded on first use (bounded by the metadata
//! regions, which are a small fixed fraction of the volume). An operation modifies cached
//! blocks through [`Meta::md_mut`], which records them in the open physical transaction
//! (`dirty`). [`Meta::commit`] writes the open transaction to the journal (flushing new data
//! blocks first, so nothing is published before its data is durable), then writes the images
//! home. A savepoint ([`Meta::savepoint`]) keeps the pre-images of what one deferred operation
//! changes, so a failure can be undone without touching the rest of the open transaction.
//!
//! A device error in the middle of a metadata update leaves the cache ahead of the disk:
//! `failed` is then set and the datastore refuses every further operation (fail-stop); the
//! next mount replays the journal.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::commit::CommitPolicy;
use crate::device::BlockDevice;
use crate::error::FsError;
use crate::format::*;
use crate::journal::Journal;

/// The device every layer reads and writes.
pub(crate) type Dev = Arc<dyn BlockDevice>;

/// Byte offset of metadata block `n`.
pub(crate) fn blk(n: u64) -> u64 {
    n * MD_BLOCK as u64
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

/// The metadata cache and the open transaction.
pub(crate) struct Meta {
    pub(crate) vh: VolumeHeader,
    pub(crate) journal: Journal,
    cache: HashMap<u64, Box<[u8]>>,
    dirty: BTreeSet<u64>,
    /// New data blocks were written for the open transaction: flush before committing it.
    pub(crate) data_written: bool,
    /// When the open transaction got its first dirty block (for the commit policy).
    dirty_since: Option<Instant>,
    /// Metadata modifications so far (to tell whether a failed operation changed anything).
    changes: u64,
    /// Transactions ended so far (committed or rolled back): upper layers keep per-transaction
    /// state tagged with it and drop it when it moves on.
    txn_seq: u64,
    /// Pre-images of the blocks the running deferred operation changed (see [`Meta::savepoint`]).
    undo: Option<HashMap<u64, Box<[u8]>>>,
    /// The cache may be ahead of the disk after a device error: every operation is refused.
    pub(crate) failed: bool,
    /// The size and age limits of the open transaction (owned by the datastore's facade,
    /// applied here).
    pub(crate) policy: CommitPolicy,
}

/// The transaction state at the start of a deferred operation.
pub(crate) struct MetaSave {
    dirty: BTreeSet<u64>,
    dirty_since: Option<Instant>,
    commits: u64,
}

impl Meta {
    /// An empty cache over a mounted volume.
    pub(crate) fn new(vh: VolumeHeader, journal: Journal) -> Self {
        Meta {
            vh,
            journal,
            cache: HashMap::new(),
            dirty: BTreeSet::new(),
            data_written: false,
            dirty_since: None,
            changes: 0,
            txn_seq: 0,
            undo: None,
            failed: false,
            policy: CommitPolicy::default(),
        }
    }

    /// Expected magic for a metadata block, by region.
    pub(crate) fn magic_for(&self, block: u64) -> Option<u32> {
        self.vh.layout.home_magic(block)
    }

    fn load(&mut self, dev: &Dev, block: u64) -> Result<(), FsError> {
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

    /// A metadata block, read-only.
    #[inline]
    pub(crate) fn md(&mut self, dev: &Dev, block: u64) -> Result<&[u8], FsError> {
        self.load(dev, block)?;
        self.cache
            .get(&block)
            .map(|b| &b[..])
            .ok_or(FsError::Failed)
    }

    /// A metadata block to change: it joins the open transaction.
    #[inline]
    pub(crate) fn md_mut(&mut self, dev: &Dev, block: u64) -> Result<&mut [u8], FsError> {
        self.load(dev, block)?;
        if self.dirty.is_empty() {
            self.dirty_since = Some(Instant::now());
        }
        self.changes += 1;
        if let Some(u) = self.undo.as_mut() {
            if let std::collections::hash_map::Entry::Vacant(v) = u.entry(block) {
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

    /// The metadata block holding inode `ino`, read-only.
    pub(crate) fn inode_md(&mut self, dev: &Dev, ino: u64) -> Result<&[u8], FsError> {
        let b = self.vh.layout.inode_block(ino);
        self.md(dev, b)
    }

    /// The metadata block holding inode `ino`, to change.
    pub(crate) fn inode_md_mut(&mut self, dev: &Dev, ino: u64) -> Result<&mut [u8], FsError> {
        let b = self.vh.layout.inode_block(ino);
        self.md_mut(dev, b)
    }

    /// Forgets a cached block (its storage was rewritten outside the cache, or freed) and
    /// takes it out of the open transaction.
    pub(crate) fn forget(&mut self, block: u64) {
        self.cache.remove(&block);
        self.dirty.remove(&block);
    }

    /// Blocks in the open transaction.
    #[inline]
    pub(crate) fn dirty_len(&self) -> usize {
        self.dirty.len()
    }

    /// Blocks the open transaction may still take before the policy's soft limit.
    #[inline]
    pub(crate) fn room(&self) -> usize {
        self.policy.soft_max().saturating_sub(self.dirty.len())
    }

    /// Whether the open transaction is older than the policy's max age.
    pub(crate) fn commit_due(&self) -> bool {
        self.dirty_since
            .is_some_and(|t| self.policy.due(t.elapsed()))
    }

    /// Whether the open transaction's first change is older than `age`.
    pub(crate) fn older_than(&self, age: std::time::Duration) -> bool {
        self.dirty_since.is_some_and(|t| t.elapsed() >= age)
    }

    /// Metadata modifications so far.
    #[inline]
    pub(crate) fn changes(&self) -> u64 {
        self.changes
    }

    /// Transactions ended so far (see `txn_seq`).
    #[inline]
    pub(crate) fn txn_seq(&self) -> u64 {
        self.txn_seq
    }

    /// Writes the open transaction: data flush, journal commit, home writes. Returns whether
    /// anything was committed.
    pub(crate) fn commit(&mut self, dev: &Dev, stats: &FsStats) -> Result<bool, FsError> {
        if self.dirty.is_empty() {
            return Ok(false);
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
        for (b, img) in blocks {
            dev.write_at(blk(b), &img)?;
            self.cache.insert(b, img.into_boxed_slice());
        }
        self.dirty.clear();
        self.dirty_since = None;
        self.txn_seq += 1;
        stats.commits.store(self.journal.commits, Ordering::Relaxed);
        stats
            .journal_bytes
            .store(self.journal.bytes, Ordering::Relaxed);
        Ok(true)
    }

    /// Forgets the open transaction: its blocks are re-read from their home copies (the
    /// committed state) on next use.
    pub(crate) fn rollback(&mut self) {
        for b in std::mem::take(&mut self.dirty) {
            self.cache.remove(&b);
        }
        self.dirty_since = None;
        self.txn_seq += 1;
    }

    /// Starts recording pre-images for a deferred operation.
    pub(crate) fn savepoint(&mut self) -> MetaSave {
        self.undo = Some(HashMap::new());
        MetaSave {
            dirty: self.dirty.clone(),
            dirty_since: self.dirty_since,
            commits: self.journal.commits,
        }
    }

    /// Ends the recording of [`Meta::savepoint`]; returns the pre-images.
    pub(crate) fn end_savepoint(&mut self) -> Option<HashMap<u64, Box<[u8]>>> {
        self.undo.take()
    }

    /// Puts back the state of a savepoint if no commit happened since (returns false
    /// otherwise: the operation's first half is on disk and cannot be undone).
    pub(crate) fn restore(&mut self, save: MetaSave, pre: HashMap<u64, Box<[u8]>>) -> bool {
        if save.commits != self.journal.commits {
            return false;
        }
        for (b, img) in pre {
            self.cache.insert(b, img);
        }
        self.dirty = save.dirty;
        self.dirty_since = save.dirty_since;
        self.txn_seq += 1;
        true
    }
}
