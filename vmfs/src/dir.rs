//! Directories: the in-memory index of each directory (entry slots, name map, free slots)
//! kept in step with its content, and the two content formats (FORMAT.md §10): packed
//! 272-byte entries stored as file data (resident in the inode while small), and sealed,
//! journaled 4 KiB directory blocks once a directory outgrows its inode.

use std::collections::{BTreeSet, HashMap};
use std::ops::{Deref, DerefMut};

use crate::alloc::{Res, SpaceSave};
use crate::data::Files;
use crate::error::FsError;
use crate::format::*;
use crate::txn::{Dev, FsStats};

/// Directory size limit: directories are read whole into memory for each change.
pub const DIR_BYTES_MAX: u64 = 16 << 20;
/// Byte of the inode block telling a directory's content format (FORMAT.md §10): 0 packed
/// 272-byte entries (resident, or old directories), 1 sealed directory blocks.
pub(crate) const DIR_FORMAT_OFFSET: usize = 97;
/// [`DIR_FORMAT_OFFSET`] value of a sealed directory.
pub(crate) const DIR_SEALED: u8 = 1;
/// Entries per sealed directory block (after its 32-byte header).
pub(crate) const DIRB_ENTRIES: usize = (MD_BLOCK - MD_HEADER_BYTES) / DIRENT_BYTES;

/// A directory entry with the cookie that continues a listing after it.
#[derive(Debug, Clone)]
pub struct DirCursorEntry {
    /// Pass back to `Datastore::read_dir_from` to continue after this entry; never 0.
    pub cookie: u64,
    /// The entry.
    pub entry: DirEntry,
}

/// The in-memory index of one directory: its entry slots (272-byte entries, `None` = free),
/// a name map and the free slots, built once from the directory's content and kept in step
/// with every change made through this module.
#[derive(Debug)]
pub(crate) struct DirIndex {
    slots: Vec<Option<DirEntry>>,
    names: HashMap<String, usize>,
    free: BTreeSet<usize>,
    /// Slots changed since the directory was last stored (sealed directories rewrite only
    /// the blocks holding them).
    changed: BTreeSet<usize>,
}

impl DirIndex {
    pub(crate) fn insert(&mut self, e: DirEntry) -> usize {
        let slot = match self.free.pop_first() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        self.names.insert(e.name.clone(), slot);
        self.slots[slot] = Some(e);
        self.changed.insert(slot);
        slot
    }

    pub(crate) fn remove(&mut self, slot: usize) {
        if let Some(e) = self.slots.get_mut(slot).and_then(Option::take) {
            self.names.remove(&e.name);
            self.free.insert(slot);
            self.changed.insert(slot);
        }
        // Trailing free slots are dropped so the directory shrinks.
        while matches!(self.slots.last(), Some(None)) {
            self.slots.pop();
            self.free.remove(&self.slots.len());
        }
    }

    pub(crate) fn replace(&mut self, slot: usize, e: DirEntry) {
        if let Some(old) = self.slots.get_mut(slot).and_then(Option::take) {
            self.names.remove(&old.name);
        }
        self.names.insert(e.name.clone(), slot);
        self.slots[slot] = Some(e);
        self.changed.insert(slot);
    }
}

/// The directory layer, owning the data layer below it.
pub(crate) struct Dirs {
    files: Files,
    /// Indexes of the directories used since mount (or since the last rollback, which drops
    /// them: they may hold uncommitted entries).
    dir_index: HashMap<u64, DirIndex>,
}

impl Deref for Dirs {
    type Target = Files;
    #[inline]
    fn deref(&self) -> &Files {
        &self.files
    }
}

impl DerefMut for Dirs {
    #[inline]
    fn deref_mut(&mut self) -> &mut Files {
        &mut self.files
    }
}

impl Dirs {
    /// The directory layer over the data layer.
    pub(crate) fn new(files: Files) -> Self {
        Dirs {
            files,
            dir_index: HashMap::new(),
        }
    }

    /// Drops the index of a directory being freed or orphaned.
    pub(crate) fn forget_dir(&mut self, dir: u64) {
        self.dir_index.remove(&dir);
    }

    /// Forgets the open transaction (see [`crate::alloc::Space::rollback`]); the indexes go
    /// with it.
    pub(crate) fn rollback(&mut self, dev: &Dev) -> Result<(), FsError> {
        self.dir_index.clear();
        self.files.rollback(dev)
    }

    /// Undoes a failed deferred operation (see [`crate::alloc::Space::restore`]); the
    /// indexes are rebuilt from the restored blocks on next use.
    pub(crate) fn restore(&mut self, save: SpaceSave, pre: HashMap<u64, Box<[u8]>>) -> bool {
        self.dir_index.clear();
        self.files.restore(save, pre)
    }

    /// Up to `max` entries of a directory after `cookie` (0 = from the start). Cookies are
    /// slot numbers + 1: stable while other entries come and go.
    pub(crate) fn read_dir_from(
        &mut self,
        dev: &Dev,
        dir: u64,
        cookie: u64,
        max: usize,
    ) -> Result<Vec<DirCursorEntry>, FsError> {
        let idx = self.index(dev, dir)?;
        let start = usize::try_from(cookie).unwrap_or(usize::MAX);
        Ok(idx
            .slots
            .iter()
            .enumerate()
            .skip(start)
            .filter_map(|(s, e)| {
                e.as_ref().map(|e| DirCursorEntry {
                    cookie: s as u64 + 1,
                    entry: e.clone(),
                })
            })
            .take(max)
            .collect())
    }

    pub(crate) fn dir_inode(&mut self, dev: &Dev, ino: u64) -> Result<Inode, FsError> {
        let i = self.get_inode(dev, ino)?;
        if !i.is_dir() {
            return Err(FsError::NotDir(format!("inode {ino}")));
        }
        Ok(i)
    }

    /// The directory's index, built on first use.
    pub(crate) fn index(&mut self, dev: &Dev, dir: u64) -> Result<&mut DirIndex, FsError> {
        if !self.dir_index.contains_key(&dir) {
            let inode = self.dir_inode(dev, dir)?;
            if inode.size > DIR_BYTES_MAX {
                return Err(FsError::Corrupt(FormatError::Geometry(
                    "directory too large",
                )));
            }
            let sealed = self.dir_is_sealed(dev, dir)?;
            let mut buf = vec![0u8; if sealed { 0 } else { inode.size as usize }];
            let n = if sealed {
                0
            } else {
                self.read(dev, dir, 0, &mut buf)?
            };
            let mut idx = DirIndex {
                slots: Vec::with_capacity(n / DIRENT_BYTES),
                names: HashMap::new(),
                free: BTreeSet::new(),
                changed: BTreeSet::new(),
            };
            if sealed {
                for k in 0..inode.size / MD_BLOCK as u64 {
                    let b = self.dir_block(dev, dir, k)?;
                    let blk = self.md(dev, b)?;
                    buf.extend_from_slice(
                        &blk[MD_HEADER_BYTES..MD_HEADER_BYTES + DIRB_ENTRIES * DIRENT_BYTES],
                    );
                }
            }
            let n = if sealed { buf.len() } else { n };
            for (slot, chunk) in buf[..n].chunks_exact(DIRENT_BYTES).enumerate() {
                let e = DirEntry::decode(chunk)?;
                match &e {
                    Some(e) => {
                        idx.names.insert(e.name.clone(), slot);
                    }
                    None => {
                        idx.free.insert(slot);
                    }
                }
                idx.slots.push(e);
            }
            while matches!(idx.slots.last(), Some(None)) {
                idx.slots.pop();
                idx.free.remove(&idx.slots.len());
            }
            self.dir_index.insert(dir, idx);
        }
        self.dir_index.get_mut(&dir).ok_or(FsError::Failed)
    }

    pub(crate) fn dir_find(
        &mut self,
        dev: &Dev,
        dir: u64,
        name: &str,
    ) -> Result<Option<(usize, DirEntry)>, FsError> {
        let idx = self.index(dev, dir)?;
        Ok(idx
            .names
            .get(name)
            .and_then(|&s| idx.slots[s].clone().map(|e| (s, e))))
    }

    pub(crate) fn dir_is_empty(&mut self, dev: &Dev, dir: u64) -> Result<bool, FsError> {
        Ok(self.index(dev, dir)?.names.is_empty())
    }

    /// Writes the directory's slots back and sets its mtime/ctime: sealed directories write
    /// their changed blocks; resident ones rewrite the inode block; packed, non-resident ones
    /// (older directories) rewrite their content into fresh storage, so the change commits
    /// atomically with the rest of the operation.
    pub(crate) fn dir_store(
        &mut self,
        dev: &Dev,
        stats: &FsStats,
        dir: u64,
        now: i64,
    ) -> Result<(), FsError> {
        let bytes = self.index(dev, dir)?.slots.len() as u64 * DIRENT_BYTES as u64;
        if bytes > DIR_BYTES_MAX {
            return Err(FsError::NoSpace("directory entries"));
        }
        // Sealed directories write only their changed blocks: no whole-directory encoding
        // (that made every change O(entries)).
        if self.dir_is_sealed(dev, dir)? {
            return self.store_sealed(dev, dir, now);
        }
        let idx = self.index(dev, dir)?;
        let mut buf = vec![0u8; idx.slots.len() * DIRENT_BYTES];
        for (e, chunk) in idx.slots.iter().zip(buf.chunks_exact_mut(DIRENT_BYTES)) {
            if let Some(e) = e {
                e.encode(chunk);
            }
        }
        let inode = self.get_inode(dev, dir)?;
        if inode.layout == DataLayout::Resident && buf.len() as u64 > RESIDENT_MAX {
            // Outgrown the inode: becomes a sealed directory (journaled 4 KiB blocks).
            let b = self.inode_md_mut(dev, dir)?;
            b[INODE_ADDR_OFFSET..].fill(0);
            b[DIR_FORMAT_OFFSET] = DIR_SEALED;
            self.upd(dev, dir, |i| {
                i.layout = DataLayout::FileBlocks;
                i.size = 0;
            })?;
            let idx = self.index(dev, dir)?;
            idx.changed = (0..idx.slots.len()).collect();
            return self.store_sealed(dev, dir, now);
        }
        if inode.layout == DataLayout::Resident && buf.len() as u64 <= RESIDENT_MAX {
            // Resident: the content lives in the (journaled) inode block; rewrite in place.
            let b = self.inode_md_mut(dev, dir)?;
            b[INODE_ADDR_OFFSET..].fill(0);
            b[INODE_ADDR_OFFSET..INODE_ADDR_OFFSET + buf.len()].copy_from_slice(&buf);
        } else {
            self.truncate_storage(dev, stats, dir, 0)?;
            self.upd(dev, dir, |i| i.size = 0)?;
            self.write_any(dev, stats, dir, 0, &buf, true)?;
        }
        self.upd(dev, dir, |i| {
            i.size = buf.len() as u64;
            i.mtime_ns = now;
            i.ctime_ns = now;
        })?;
        self.index(dev, dir)?.changed.clear();
        Ok(())
    }

    pub(crate) fn dir_is_sealed(&mut self, dev: &Dev, dir: u64) -> Result<bool, FsError> {
        let b = self.vh.layout.inode_block(dir);
        Ok(self.md(dev, b)?[DIR_FORMAT_OFFSET] == DIR_SEALED)
    }

    /// Metadata block number of block `k` of a sealed directory.
    pub(crate) fn dir_block(&mut self, dev: &Dev, dir: u64, k: u64) -> Result<u64, FsError> {
        let per_fb = FILE_BLOCK / MD_BLOCK as u64;
        match self.fb_lookup(dev, dir, k / per_fb)? {
            Some((fb, _)) => Ok(self.vh.layout.fb_offset(fb) / MD_BLOCK as u64 + k % per_fb),
            None => Err(FsError::Corrupt(FormatError::Geometry(
                "sealed directory block not mapped",
            ))),
        }
    }

    /// Writes the changed slots of a sealed directory: only the 4 KiB blocks holding them,
    /// through the journal; grows its storage by zeroed file blocks when needed.
    pub(crate) fn store_sealed(&mut self, dev: &Dev, dir: u64, now: i64) -> Result<(), FsError> {
        let inode = self.get_inode(dev, dir)?;
        let idx = self.index(dev, dir)?;
        let need = idx.slots.len().div_ceil(DIRB_ENTRIES) as u64;
        let changed: BTreeSet<u64> = idx
            .changed
            .iter()
            .map(|&s| (s / DIRB_ENTRIES) as u64)
            .collect();
        let mut blocks = inode.size / MD_BLOCK as u64;
        if need * MD_BLOCK as u64 > DIR_BYTES_MAX {
            return Err(FsError::NoSpace("directory entries"));
        }
        let per_fb = FILE_BLOCK / MD_BLOCK as u64;
        while blocks < need {
            if blocks.is_multiple_of(per_fb) && self.fb_lookup(dev, dir, blocks / per_fb)?.is_none()
            {
                let fb = self.alloc(dev, Res::Fb)?;
                // Zeroed before the commit publishing it: an all-zero block is an empty
                // directory block.
                dev.write_zeroes(self.vh.layout.fb_offset(fb), FILE_BLOCK)?;
                self.data_written = true;
                let first = self.vh.layout.fb_offset(fb) / MD_BLOCK as u64;
                for b in first..first + per_fb {
                    self.forget(b);
                }
                self.fb_set(dev, dir, blocks / per_fb, Some((fb, false)))?;
                self.upd(dev, dir, |i| i.allocated = i.allocated.saturating_add(1))?;
            }
            blocks += 1;
        }
        for k in changed {
            if k >= blocks {
                continue;
            }
            let b = self.dir_block(dev, dir, k)?;
            let mut img = vec![0u8; DIRB_ENTRIES * DIRENT_BYTES];
            let idx = self.index(dev, dir)?;
            for (j, chunk) in img.chunks_exact_mut(DIRENT_BYTES).enumerate() {
                if let Some(Some(e)) = idx.slots.get(k as usize * DIRB_ENTRIES + j) {
                    e.encode(chunk);
                }
            }
            let blk = self.md_mut(dev, b)?;
            put_u32(blk, 0, magic::DIR);
            blk[MD_HEADER_BYTES..MD_HEADER_BYTES + img.len()].copy_from_slice(&img);
        }
        self.index(dev, dir)?.changed.clear();
        self.upd(dev, dir, |i| {
            i.size = blocks * MD_BLOCK as u64;
            i.mtime_ns = now;
            i.ctime_ns = now;
        })?;
        Ok(())
    }

    /// The entries of a directory, in slot order.
    pub(crate) fn dir_entries(&mut self, dev: &Dev, dir: u64) -> Result<Vec<DirEntry>, FsError> {
        Ok(self
            .index(dev, dir)?
            .slots
            .iter()
            .flatten()
            .cloned()
            .collect())
    }

    /// Before a sealed directory's file blocks are freed: forget their cached blocks and keep
    /// the file blocks from reuse until the journal no longer holds their images.
    pub(crate) fn revoke_dir_blocks(&mut self, dev: &Dev, ino: u64) -> Result<(), FsError> {
        let inode = self.get_inode(dev, ino)?;
        if !inode.is_dir() || !self.dir_is_sealed(dev, ino)? {
            return Ok(());
        }
        let per_fb = FILE_BLOCK / MD_BLOCK as u64;
        for fbi in 0..inode.size.div_ceil(FILE_BLOCK) {
            if let Some((fb, _)) = self.fb_lookup(dev, ino, fbi)? {
                let first = self.vh.layout.fb_offset(fb) / MD_BLOCK as u64;
                for b in first..first + per_fb {
                    self.forget(b);
                }
                self.revoke(fb);
            }
        }
        Ok(())
    }
}
