//! The allocator: the four resource bitmaps (inodes, pointer blocks, sub-blocks, file
//! blocks), free counts and allocation hints, over the metadata cache ([`crate::txn`]).
//!
//! Freed resources stay unallocatable until the transaction that freed them has committed
//! (`pending_free`); file blocks of freed sealed directories until the journal no longer holds
//! their images (`revoked`); file blocks set aside by a chunked allocation while they are
//! zeroed without the lock (`reserved`) are counted as used and never handed out.

use std::collections::{HashMap, HashSet};
use std::ops::{Deref, DerefMut};
use std::sync::atomic::Ordering;

use crate::error::FsError;
use crate::format::*;
use crate::txn::{Dev, FsStats, Meta, MetaSave};

/// A kind of allocatable resource, one bitmap each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Res {
    Fd,
    Pb,
    Sb,
    Fb,
}

/// The allocator, owning the metadata cache below it.
pub(crate) struct Space {
    meta: Meta,
    pending_free: HashSet<(Res, u64)>,
    hints: HashMap<Res, u64>,
    free: HashMap<Res, u64>,
    /// File blocks set aside by a chunked allocation while they are zeroed without the lock:
    /// not in the bitmap yet, counted as used, never handed out.
    reserved: HashSet<u64>,
    /// File blocks freed from sealed directories: their blocks may still be in the journal,
    /// and replaying those images over a new owner's data would corrupt it, so they are not
    /// reallocated until the journal has been reset (`revoke_epoch` = journal resets then).
    revoked: HashSet<u64>,
    revoke_epoch: u64,
}

/// The allocator state at the start of a deferred operation.
pub(crate) struct SpaceSave {
    meta: MetaSave,
    pending_free: HashSet<(Res, u64)>,
    free: HashMap<Res, u64>,
    hints: HashMap<Res, u64>,
}

/// Each layer sees the one below it (and, through it, everything beneath), never one above.
impl Deref for Space {
    type Target = Meta;
    #[inline]
    fn deref(&self) -> &Meta {
        &self.meta
    }
}

impl DerefMut for Space {
    #[inline]
    fn deref_mut(&mut self) -> &mut Meta {
        &mut self.meta
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
pub(crate) fn check_index(r: Res, i: u64, count: u64) -> Result<(), FsError> {
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
impl Space {
    /// The allocator over a mounted volume's cache: counts the free resources.
    pub(crate) fn new(meta: Meta, dev: &Dev) -> Result<Self, FsError> {
        let mut sp = Space {
            meta,
            pending_free: HashSet::new(),
            hints: HashMap::new(),
            free: HashMap::new(),
            reserved: HashSet::new(),
            revoked: HashSet::new(),
            revoke_epoch: 0,
        };
        for r in [Res::Fd, Res::Pb, Res::Sb, Res::Fb] {
            let n = sp.count_free(dev, r)?;
            sp.free.insert(r, n);
        }
        Ok(sp)
    }

    /// Free resources of a kind (allocatable now).
    #[inline]
    pub(crate) fn free_count(&self, r: Res) -> u64 {
        self.free.get(&r).copied().unwrap_or(0)
    }

    pub(crate) fn count_free(&mut self, dev: &Dev, r: Res) -> Result<u64, FsError> {
        let (bm, count) = region_of(&self.vh.layout, r);
        let mut used = 0u64;
        for i in 0..bm.blocks {
            let b = self.md(dev, bm.start + i)?;
            let bits = &b[MD_HEADER_BYTES..];
            used += bits.iter().map(|x| u64::from(x.count_ones())).sum::<u64>();
        }
        Ok(count.saturating_sub(used + u64::from(r == Res::Fd)))
    }

    pub(crate) fn get_bit(&mut self, dev: &Dev, r: Res, i: u64) -> Result<bool, FsError> {
        let (bm, count) = region_of(&self.vh.layout, r);
        check_index(r, i, count)?;
        let b = self.md(dev, bm.start + i / BITS_PER_BITMAP_BLOCK)?;
        Ok(bit(b, i % BITS_PER_BITMAP_BLOCK))
    }

    pub(crate) fn put_bit(&mut self, dev: &Dev, r: Res, i: u64, v: bool) -> Result<(), FsError> {
        let (bm, count) = region_of(&self.vh.layout, r);
        check_index(r, i, count)?;
        let b = self.md_mut(dev, bm.start + i / BITS_PER_BITMAP_BLOCK)?;
        set_bit(b, i % BITS_PER_BITMAP_BLOCK, v);
        Ok(())
    }

    /// Allocates one resource and returns its index. Inode numbers are their bitmap index;
    /// index 0 is reserved so that 0 can mean "no inode" in directory entries.
    pub(crate) fn alloc(&mut self, dev: &Dev, r: Res) -> Result<u64, FsError> {
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
    pub(crate) fn release(&mut self, dev: &Dev, r: Res, i: u64) -> Result<(), FsError> {
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
    pub(crate) fn rollback(&mut self, dev: &Dev) -> Result<(), FsError> {
        self.meta.rollback();
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
    pub(crate) fn reserve_fb(&mut self, dev: &Dev, n: u64) -> Result<Vec<u64>, FsError> {
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

    /// Publishes a reserved file block: it leaves the reservation and is marked used.
    pub(crate) fn claim_reserved(&mut self, dev: &Dev, fb: u64) -> Result<(), FsError> {
        self.reserved.remove(&fb);
        self.put_bit(dev, Res::Fb, fb, true)
    }

    /// Keeps a freed file block of a sealed directory from reuse while the journal may hold
    /// images of its blocks.
    pub(crate) fn revoke(&mut self, fb: u64) {
        self.revoked.insert(fb);
    }

    /// Commits the open transaction (see [`Meta::commit`]); what it freed becomes
    /// allocatable, and revoked file blocks once the journal has been reset.
    pub(crate) fn commit(&mut self, dev: &Dev, stats: &FsStats) -> Result<(), FsError> {
        if !self.meta.commit(dev, stats)? {
            return Ok(());
        }
        if self.meta.journal.resets != self.revoke_epoch {
            self.revoked.clear();
            self.revoke_epoch = self.meta.journal.resets;
        }
        for (r, _) in self.pending_free.drain() {
            if let Some(f) = self.free.get_mut(&r) {
                *f += 1;
            }
        }
        Ok(())
    }

    /// End of a namespace operation: one logical transaction, committed at once.
    pub(crate) fn end_op(&mut self, dev: &Dev, stats: &FsStats) -> Result<(), FsError> {
        stats.logical_txns.fetch_add(1, Ordering::Relaxed);
        self.commit(dev, stats)
    }

    /// Commits when the open transaction reached the policy's soft size limit.
    pub(crate) fn maybe_commit(&mut self, dev: &Dev, stats: &FsStats) -> Result<(), FsError> {
        if self.room() == 0 {
            self.commit(dev, stats)?;
        }
        Ok(())
    }

    /// Starts a deferred operation's savepoint (see [`Meta::savepoint`]).
    pub(crate) fn savepoint(&mut self) -> SpaceSave {
        SpaceSave {
            meta: self.meta.savepoint(),
            pending_free: self.pending_free.clone(),
            free: self.free.clone(),
            hints: self.hints.clone(),
        }
    }

    /// Undoes a failed deferred operation, given the pre-images of what it changed
    /// ([`Meta::end_savepoint`]); false if a commit made that impossible.
    pub(crate) fn restore(&mut self, save: SpaceSave, pre: HashMap<u64, Box<[u8]>>) -> bool {
        if !self.meta.restore(save.meta, pre) {
            return false;
        }
        self.pending_free = save.pending_free;
        self.free = save.free;
        self.hints = save.hints;
        true
    }
}
