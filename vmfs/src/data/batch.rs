//! The batched scatter-gather write path of file-block files (virtual disks): segments on
//! allocated blocks go straight to the device; those needing allocation or zeroing are
//! grouped per file block, each group's metadata update one logical transaction.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use crate::alloc::Res;
use crate::data::Files;
use crate::error::FsError;
use crate::format::*;
use crate::txn::{Dev, FsStats};

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

impl Files {
    pub(crate) fn write_batch(
        &mut self,
        dev: &Dev,
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
        if new_blocks > self.free_count(Res::Fb) {
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
