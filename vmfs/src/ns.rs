//! The POSIX namespace API for the file server: inode-based lookups and creation of every file
//! type, hard links, symlinks, unlink with orphans, full rename(2)/renameat2 semantics,
//! setattr, cursor-based readdir, extended attributes, and the data path (read plans,
//! writes, fallocate, hole punching, SEEK_DATA/SEEK_HOLE).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::device::BlockDevice;
use crate::format::*;
use crate::fs::{now_ns, Datastore, ExtentPin, FsError, FsStats, Inner, Res, Undo, DIR_BYTES_MAX};

/// Longest symlink target (PATH_MAX - 1: the kernel's limit including the NUL).
pub const SYMLINK_MAX: usize = 4095;
/// Longest extended-attribute name (Linux's XATTR_NAME_MAX).
pub const XATTR_NAME_MAX: usize = 255;
/// Bytes of the xattr block available for entries (after the 32-byte header and the 8-byte
/// xattr-block header).
pub const XATTR_AREA: usize = MD_BLOCK - XATTR_ENTRIES_OFFSET;
/// Where xattr entries start in an xattr block.
pub const XATTR_ENTRIES_OFFSET: usize = MD_HEADER_BYTES + 8;
/// Bytes of an xattr entry header (name_len u16, value_len u16).
pub const XATTR_ENTRY_HEADER: usize = 4;
/// Largest single value: one entry with a one-byte name filling the whole xattr block.
pub const XATTR_VALUE_MAX: usize = XATTR_AREA - XATTR_ENTRY_HEADER - 1;
/// Most hard links of one inode (ext4's limit; nlink is a u32 on disk).
pub const LINK_MAX: u32 = 65000;

/// A timestamp to set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeSet {
    /// The current time.
    Now,
    /// This time, ns since the epoch.
    At(i64),
}

/// Attributes to change; `None` leaves a field alone.
#[derive(Debug, Default, Clone)]
pub struct SetAttr {
    /// Permission bits (0o7777 only; the type bits are preserved).
    pub mode: Option<u32>,
    /// Owner.
    pub uid: Option<u32>,
    /// Group.
    pub gid: Option<u32>,
    /// Size: truncate or extend (regular files only).
    pub size: Option<u64>,
    /// Access time.
    pub atime: Option<TimeSet>,
    /// Modification time.
    pub mtime: Option<TimeSet>,
    /// Change time (otherwise now, on any change).
    pub ctime: Option<TimeSet>,
}

/// renameat2 flags.
#[derive(Debug, Default, Clone, Copy)]
pub struct RenameFlags {
    /// RENAME_NOREPLACE: fail with EEXIST if the target exists.
    pub noreplace: bool,
    /// RENAME_EXCHANGE: swap the two names (both must exist).
    pub exchange: bool,
}

/// setxattr flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XattrSetMode {
    /// Create or replace.
    Any,
    /// XATTR_CREATE: fail if it exists.
    CreateOnly,
    /// XATTR_REPLACE: fail if it does not exist.
    ReplaceOnly,
}

/// lseek whence for [`Datastore::seek`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whence {
    /// SEEK_DATA.
    Data,
    /// SEEK_HOLE.
    Hole,
}

/// One piece of a read plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extent {
    /// `len` bytes at this byte offset of the datastore device.
    Device {
        /// Device byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// `len` bytes of zeroes (hole or to-be-zeroed block).
    Zero {
        /// Bytes.
        len: u64,
    },
    /// Bytes copied out (resident data, or anything not readable in place).
    Inline(Vec<u8>),
}

/// A directory entry with the cookie that continues a listing after it.
#[derive(Debug, Clone)]
pub struct DirCursorEntry {
    /// Pass back to [`Datastore::read_dir_from`] to continue after this entry; never 0.
    pub cookie: u64,
    /// The entry.
    pub entry: DirEntry,
}

/// Dirty blocks a single namespace operation may add to the open transaction at most (a
/// rename touches two directories, two inodes, their parents, bitmaps and pointer blocks of a
/// directory rewrite): a deferred operation starts a new transaction when less room is left,
/// so it never commits half-done.
const OP_RESERVE: usize = 64;
/// File blocks one step of a large FALLOCATE allocates (16 MiB). Each step holds the
/// datastore lock twice, briefly (set free blocks aside; map them, one journal commit of a
/// few blocks), and zeroes its blocks in between without it; so one request stalls other
/// disks and shares for at most one step's metadata work, never for the zeroing of a whole
/// range up to the largest file, and a crash keeps every committed step.
pub const ALLOC_CHUNK_FBS: u64 = 16;

/// What [`Datastore::allocate`]'s steps cover: file blocks `first..last` of the inode of
/// this generation, up to byte `end`.
#[derive(Debug, Clone, Copy)]
struct AllocPlan {
    generation: u32,
    first: u64,
    last: u64,
    end: u64,
}
/// Byte offset in an inode block of the orphan-list link (FORMAT.md §7): in the root inode the
/// first orphan, in an orphan the next one; 0 ends the list.
const ORPHAN_LINK: usize = 152;
/// Byte of the inode block telling a directory's content format (FORMAT.md §10): 0 packed
/// 272-byte entries (resident, or old directories), 1 sealed directory blocks.
pub(crate) const DIR_FORMAT_OFFSET: usize = 97;
/// [`DIR_FORMAT_OFFSET`] value of a sealed directory.
pub(crate) const DIR_SEALED: u8 = 1;
/// Entries per sealed directory block (after its 32-byte header).
pub(crate) const DIRB_ENTRIES: usize = (MD_BLOCK - MD_HEADER_BYTES) / DIRENT_BYTES;
/// Offset in an xattr block of the entry count (u16) and bytes used (u16).
const XATTR_COUNT_OFFSET: usize = MD_HEADER_BYTES;

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
    fn insert(&mut self, e: DirEntry) -> usize {
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

    fn remove(&mut self, slot: usize) {
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

    fn replace(&mut self, slot: usize, e: DirEntry) {
        if let Some(old) = self.slots.get_mut(slot).and_then(Option::take) {
            self.names.remove(&old.name);
        }
        self.names.insert(e.name.clone(), slot);
        self.slots[slot] = Some(e);
        self.changed.insert(slot);
    }
}

/// Validates a name: non-empty, at most [`NAME_MAX`] bytes, no `/` or NUL, not `.` or `..`,
/// and UTF-8 (directory entries store names as UTF-8).
fn check_name(name: &[u8]) -> Result<&str, FsError> {
    let shown = || String::from_utf8_lossy(name).into_owned();
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong(shown()));
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(FsError::InvalidName(shown()));
    }
    std::str::from_utf8(name).map_err(|_| FsError::InvalidName(shown()))
}

fn is_reg(i: &Inode) -> bool {
    i.mode & S_IFMT == S_IFREG
}

/// Parses an xattr block into (name, value) pairs.
fn xattr_parse(b: &[u8]) -> Result<XattrList, FsError> {
    let bad = || FsError::Corrupt(FormatError::Geometry("xattr block: bad entry"));
    let count = usize::from(get_u16(b, XATTR_COUNT_OFFSET));
    let mut out = Vec::with_capacity(count);
    let mut o = XATTR_ENTRIES_OFFSET;
    for _ in 0..count {
        if o + XATTR_ENTRY_HEADER > MD_BLOCK {
            return Err(bad());
        }
        let nl = usize::from(get_u16(b, o));
        let vl = usize::from(get_u16(b, o + 2));
        let s = o + XATTR_ENTRY_HEADER;
        if nl == 0 || nl > XATTR_NAME_MAX || s + nl + vl > MD_BLOCK {
            return Err(bad());
        }
        out.push((b[s..s + nl].to_vec(), b[s + nl..s + nl + vl].to_vec()));
        o = s + nl + vl;
    }
    Ok(out)
}

/// Checks an xattr block's entries (for fsck): they decode, fit, and names are unique.
pub(crate) fn xattr_check(b: &[u8]) -> Result<(), FsError> {
    let list = xattr_parse(b)?;
    let mut names = BTreeSet::new();
    if list.iter().any(|(n, _)| !names.insert(n.clone())) {
        return Err(FsError::Corrupt(FormatError::Geometry(
            "xattr block: duplicate name",
        )));
    }
    if list.is_empty() {
        return Err(FsError::Corrupt(FormatError::Geometry(
            "xattr block: empty (should have been freed)",
        )));
    }
    Ok(())
}

/// Bytes the entries need in an xattr block.
fn xattr_bytes(list: &[(Vec<u8>, Vec<u8>)]) -> usize {
    list.iter()
        .map(|(n, v)| XATTR_ENTRY_HEADER + n.len() + v.len())
        .sum()
}

/// Encodes the entries into an xattr block (header left to the caller's seal).
fn xattr_encode(b: &mut [u8], list: &[(Vec<u8>, Vec<u8>)]) {
    b[MD_HEADER_BYTES..].fill(0);
    put_u16(b, XATTR_COUNT_OFFSET, list.len() as u16);
    put_u16(b, XATTR_COUNT_OFFSET + 2, xattr_bytes(list) as u16);
    let mut o = XATTR_ENTRIES_OFFSET;
    for (n, v) in list {
        put_u16(b, o, n.len() as u16);
        put_u16(b, o + 2, v.len() as u16);
        let s = o + XATTR_ENTRY_HEADER;
        b[s..s + n.len()].copy_from_slice(n);
        b[s + n.len()..s + n.len() + v.len()].copy_from_slice(v);
        o = s + n.len() + v.len();
    }
}

type Dev = Arc<dyn BlockDevice>;
/// Extended attributes as (name, value) pairs, in block order.
type XattrList = Vec<(Vec<u8>, Vec<u8>)>;

impl Inner {
    fn dir_inode(&mut self, dev: &Dev, ino: u64) -> Result<Inode, FsError> {
        let i = self.get_inode(dev, ino)?;
        if !i.is_dir() {
            return Err(FsError::NotDir(format!("inode {ino}")));
        }
        Ok(i)
    }

    /// Reads, changes and writes back one inode.
    fn upd(&mut self, dev: &Dev, ino: u64, f: impl FnOnce(&mut Inode)) -> Result<Inode, FsError> {
        let mut i = self.get_inode(dev, ino)?;
        f(&mut i);
        self.put_inode(dev, &i)?;
        Ok(i)
    }

    /// The directory's index, built on first use.
    fn index(&mut self, dev: &Dev, dir: u64) -> Result<&mut DirIndex, FsError> {
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

    fn dir_find(
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

    fn dir_is_empty(&mut self, dev: &Dev, dir: u64) -> Result<bool, FsError> {
        Ok(self.index(dev, dir)?.names.is_empty())
    }

    /// Writes the directory's slots back (a rewrite of its content into fresh storage, as
    /// the path-based API does, so the change commits atomically with the rest of the
    /// operation) and sets its mtime/ctime.
    fn dir_store(&mut self, dev: &Dev, stats: &FsStats, dir: u64, now: i64) -> Result<(), FsError> {
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
            let b = self.md_mut(dev, self.vh.layout.inode_block(dir))?;
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
            let b = self.md_mut(dev, self.vh.layout.inode_block(dir))?;
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
    fn dir_block(&mut self, dev: &Dev, dir: u64, k: u64) -> Result<u64, FsError> {
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
    fn store_sealed(&mut self, dev: &Dev, dir: u64, now: i64) -> Result<(), FsError> {
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
                    self.cache.remove(&b);
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
                    self.cache.remove(&b);
                    self.dirty.remove(&b);
                }
                self.revoked.insert(fb);
            }
        }
        Ok(())
    }

    /// True if `a` is `d` or lies below directory `d`.
    fn is_within(&mut self, dev: &Dev, mut a: u64, d: u64) -> Result<bool, FsError> {
        // Bounded by the tree depth: each step goes one level up towards the root.
        for _ in 0..self.vh.layout.fd_count {
            if a == d {
                return Ok(true);
            }
            if a == ROOT_INO {
                return Ok(false);
            }
            a = self.get_inode(dev, a)?.parent;
        }
        Err(FsError::Corrupt(FormatError::Geometry(
            "directory parent chain loops",
        )))
    }

    fn orphan_head(&mut self, dev: &Dev) -> Result<u64, FsError> {
        let b = self.vh.layout.inode_block(ROOT_INO);
        Ok(get_u64(self.md(dev, b)?, ORPHAN_LINK))
    }

    fn set_link(&mut self, dev: &Dev, ino: u64, v: u64) -> Result<(), FsError> {
        let b = self.vh.layout.inode_block(ino);
        put_u64(self.md_mut(dev, b)?, ORPHAN_LINK, v);
        Ok(())
    }

    fn orphan_add(&mut self, dev: &Dev, ino: u64) -> Result<(), FsError> {
        let head = self.orphan_head(dev)?;
        self.set_link(dev, ino, head)?;
        self.set_link(dev, ROOT_INO, ino)
    }

    fn orphan_remove(&mut self, dev: &Dev, ino: u64) -> Result<(), FsError> {
        let mut prev = ROOT_INO;
        // Bounded by the number of inodes (the list has no cycles; the bound guards
        // against a corrupt one).
        for _ in 0..self.vh.layout.fd_count {
            let b = self.vh.layout.inode_block(prev);
            let next = get_u64(self.md(dev, b)?, ORPHAN_LINK);
            if next == 0 {
                return Ok(());
            }
            self.check_ino(next)?;
            if next == ino {
                let after = get_u64(self.md(dev, self.vh.layout.inode_block(ino))?, ORPHAN_LINK);
                self.set_link(dev, prev, after)?;
                return self.set_link(dev, ino, 0);
            }
            prev = next;
        }
        Err(FsError::Corrupt(FormatError::Geometry("orphan list loops")))
    }

    /// Drops one link of `ino` (all of a directory's); at zero the inode is freed, or kept as
    /// an orphan while it is open.
    fn drop_link(&mut self, dev: &Dev, stats: &FsStats, ino: u64, now: i64) -> Result<(), FsError> {
        let inode = self.upd(dev, ino, |i| {
            i.nlink = if i.is_dir() {
                0
            } else {
                i.nlink.saturating_sub(1)
            };
            i.ctime_ns = now;
        })?;
        if inode.nlink == 0 {
            if self.in_use(ino) {
                self.dir_index.remove(&ino);
                self.orphan_add(dev, ino)?;
            } else {
                self.free_inode(dev, stats, ino)?;
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn ns_create(
        &mut self,
        dev: &Dev,
        stats: &FsStats,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u32,
        uid: u32,
        gid: u32,
        prov: Provisioning,
        content: &[u8],
    ) -> Result<Inode, FsError> {
        let name = check_name(name)?;
        let p = self.dir_inode(dev, parent)?;
        if p.nlink == 0 {
            return Err(FsError::NotFound(format!("directory {parent} was removed")));
        }
        if self.dir_find(dev, parent, name)?.is_some() {
            return Err(FsError::Exists(name.into()));
        }
        let dir = mode & S_IFMT == S_IFDIR;
        if dir && p.nlink >= LINK_MAX {
            return Err(FsError::TooManyLinks(parent));
        }
        let (ino, generation) = self.alloc_ino(dev)?;
        let now = now_ns();
        let inode = Inode {
            ino,
            generation,
            mode,
            nlink: if dir { 2 } else { 1 },
            uid,
            gid,
            provisioning: prov,
            size: 0,
            mtime_ns: now,
            ctime_ns: now,
            // Disk files (thick) use file blocks from the start; small files start resident
            // and grow into sub-blocks, then file blocks.
            layout: if prov == Provisioning::Thin {
                DataLayout::Resident
            } else {
                DataLayout::FileBlocks
            },
            parent,
            allocated: 0,
            atime_ns: now,
            rdev,
            attr_gen: 1,
            xattr_block: 0,
        };
        self.put_inode(dev, &inode)?;
        if !content.is_empty() {
            self.write_any(dev, stats, ino, 0, content, true)?;
            self.upd(dev, ino, |i| {
                i.mtime_ns = now;
                i.ctime_ns = now;
            })?;
        }
        self.index(dev, parent)?.insert(DirEntry {
            ino,
            generation,
            ftype: ftype_of(mode),
            name: name.to_string(),
        });
        self.dir_store(dev, stats, parent, now)?;
        if dir {
            self.upd(dev, parent, |p| p.nlink += 1)?;
        }
        self.get_inode(dev, ino)
    }

    fn ns_remove(
        &mut self,
        dev: &Dev,
        stats: &FsStats,
        parent: u64,
        name: &[u8],
        want_dir: bool,
    ) -> Result<(), FsError> {
        let name = check_name(name)?;
        self.dir_inode(dev, parent)?;
        let (slot, e) = self
            .dir_find(dev, parent, name)?
            .ok_or_else(|| FsError::NotFound(name.into()))?;
        let inode = self.get_inode(dev, e.ino)?;
        if want_dir {
            if !inode.is_dir() {
                return Err(FsError::NotDir(name.into()));
            }
            if !self.dir_is_empty(dev, e.ino)? {
                return Err(FsError::NotEmpty(name.into()));
            }
        } else if inode.is_dir() {
            return Err(FsError::IsDir(name.into()));
        }
        let now = now_ns();
        self.index(dev, parent)?.remove(slot);
        self.dir_store(dev, stats, parent, now)?;
        if inode.is_dir() {
            self.upd(dev, parent, |p| p.nlink = p.nlink.saturating_sub(1))?;
        }
        self.drop_link(dev, stats, e.ino, now)
    }

    fn ns_link(
        &mut self,
        dev: &Dev,
        stats: &FsStats,
        ino: u64,
        new_parent: u64,
        new_name: &[u8],
    ) -> Result<Inode, FsError> {
        let name = check_name(new_name)?;
        let inode = self.get_inode(dev, ino)?;
        if inode.is_dir() {
            return Err(FsError::NotPermitted("hard link to a directory".into()));
        }
        let p = self.dir_inode(dev, new_parent)?;
        if p.nlink == 0 || inode.nlink == 0 {
            return Err(FsError::NotFound(name.into()));
        }
        if self.dir_find(dev, new_parent, name)?.is_some() {
            return Err(FsError::Exists(name.into()));
        }
        if inode.nlink >= LINK_MAX {
            return Err(FsError::TooManyLinks(ino));
        }
        let now = now_ns();
        self.index(dev, new_parent)?.insert(DirEntry {
            ino,
            generation: inode.generation,
            ftype: ftype_of(inode.mode),
            name: name.to_string(),
        });
        self.dir_store(dev, stats, new_parent, now)?;
        self.upd(dev, ino, |i| {
            i.nlink = i.nlink.saturating_add(1);
            i.ctime_ns = now;
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn ns_rename(
        &mut self,
        dev: &Dev,
        stats: &FsStats,
        sp: u64,
        sname: &[u8],
        dp: u64,
        dname: &[u8],
        flags: RenameFlags,
    ) -> Result<(), FsError> {
        if flags.exchange && flags.noreplace {
            return Err(FsError::Invalid(
                "RENAME_EXCHANGE with RENAME_NOREPLACE".into(),
            ));
        }
        let sname = check_name(sname)?;
        let dname = check_name(dname)?;
        self.dir_inode(dev, sp)?;
        let dpi = self.dir_inode(dev, dp)?;
        let (sslot, se) = self
            .dir_find(dev, sp, sname)?
            .ok_or_else(|| FsError::NotFound(sname.into()))?;
        let dst = self.dir_find(dev, dp, dname)?;
        let src = self.get_inode(dev, se.ino)?;
        let now = now_ns();
        if flags.exchange {
            let (dslot, de) = dst.ok_or_else(|| FsError::NotFound(dname.into()))?;
            if de.ino == se.ino {
                return Ok(());
            }
            let dsti = self.get_inode(dev, de.ino)?;
            if (src.is_dir() && self.is_within(dev, dp, se.ino)?)
                || (dsti.is_dir() && self.is_within(dev, sp, de.ino)?)
            {
                return Err(FsError::Invalid(
                    "cannot move a directory into itself".into(),
                ));
            }
            self.index(dev, sp)?.replace(
                sslot,
                DirEntry {
                    name: sname.to_string(),
                    ..de.clone()
                },
            );
            self.index(dev, dp)?.replace(
                dslot,
                DirEntry {
                    name: dname.to_string(),
                    ..se.clone()
                },
            );
            self.dir_store(dev, stats, sp, now)?;
            if dp != sp {
                self.dir_store(dev, stats, dp, now)?;
                if src.is_dir() != dsti.is_dir() {
                    let (from, to) = if src.is_dir() { (sp, dp) } else { (dp, sp) };
                    self.upd(dev, from, |i| i.nlink = i.nlink.saturating_sub(1))?;
                    self.upd(dev, to, |i| i.nlink += 1)?;
                }
            }
            self.upd(dev, se.ino, |i| {
                i.ctime_ns = now;
                if i.is_dir() {
                    i.parent = dp;
                }
            })?;
            self.upd(dev, de.ino, |i| {
                i.ctime_ns = now;
                if i.is_dir() {
                    i.parent = sp;
                }
            })?;
            return Ok(());
        }
        let mut replaced = None;
        if let Some((dslot, de)) = dst {
            // RENAME_NOREPLACE fails on any existing target, even the same file.
            if flags.noreplace {
                return Err(FsError::Exists(dname.into()));
            }
            if de.ino == se.ino {
                // Two links of one file (or the same name): rename(2) does nothing.
                return Ok(());
            }
            let dsti = self.get_inode(dev, de.ino)?;
            if src.is_dir() {
                if !dsti.is_dir() {
                    return Err(FsError::NotDir(dname.into()));
                }
                if !self.dir_is_empty(dev, de.ino)? {
                    return Err(FsError::NotEmpty(dname.into()));
                }
            } else if dsti.is_dir() {
                return Err(FsError::IsDir(dname.into()));
            }
            replaced = Some((dslot, dsti));
        }
        if src.is_dir() && self.is_within(dev, dp, se.ino)? {
            return Err(FsError::Invalid(
                "cannot move a directory into itself".into(),
            ));
        }
        if src.is_dir() && dp != sp && replaced.is_none() && dpi.nlink >= LINK_MAX {
            return Err(FsError::TooManyLinks(dp));
        }
        let moved = DirEntry {
            name: dname.to_string(),
            ..se.clone()
        };
        self.index(dev, sp)?.remove(sslot);
        match &replaced {
            Some((dslot, _)) => self.index(dev, dp)?.replace(*dslot, moved),
            None => {
                self.index(dev, dp)?.insert(moved);
            }
        }
        self.dir_store(dev, stats, sp, now)?;
        if dp != sp {
            self.dir_store(dev, stats, dp, now)?;
        }
        if let Some((_, dsti)) = replaced {
            if dsti.is_dir() {
                self.upd(dev, dp, |i| i.nlink = i.nlink.saturating_sub(1))?;
            }
            self.drop_link(dev, stats, dsti.ino, now)?;
        }
        if src.is_dir() && dp != sp {
            self.upd(dev, sp, |i| i.nlink = i.nlink.saturating_sub(1))?;
            self.upd(dev, dp, |i| i.nlink += 1)?;
        }
        self.upd(dev, se.ino, |i| {
            i.ctime_ns = now;
            if i.is_dir() {
                i.parent = dp;
            }
        })?;
        Ok(())
    }

    fn ns_setattr(
        &mut self,
        dev: &Dev,
        stats: &FsStats,
        ino: u64,
        a: &SetAttr,
    ) -> Result<Inode, FsError> {
        let inode = self.get_inode(dev, ino)?;
        let now = now_ns();
        let mut changed = false;
        if let Some(size) = a.size {
            if inode.is_dir() {
                return Err(FsError::IsDir(format!("inode {ino}")));
            }
            if !is_reg(&inode) {
                return Err(FsError::Invalid("size of a non-regular file".into()));
            }
            if size > FILE_BYTES_MAX {
                return Err(FsError::Invalid("size beyond the largest file".into()));
            }
            changed = true;
            if size != inode.size {
                if size < inode.size {
                    self.truncate_storage(dev, stats, ino, size)?;
                } else {
                    self.grow_layout(dev, stats, ino, size)?;
                }
                self.upd(dev, ino, |i| {
                    i.size = size;
                    i.mtime_ns = now;
                })?;
            }
        }
        let ts = |t: TimeSet| match t {
            TimeSet::Now => now,
            TimeSet::At(v) => v,
        };
        let mut i = self.get_inode(dev, ino)?;
        if let Some(m) = a.mode {
            i.mode = (i.mode & S_IFMT) | (m & 0o7777);
            i.attr_gen = i.attr_gen.wrapping_add(1);
            changed = true;
        }
        if let Some(u) = a.uid {
            i.uid = u;
            i.attr_gen = i.attr_gen.wrapping_add(1);
            changed = true;
        }
        if let Some(g) = a.gid {
            i.gid = g;
            i.attr_gen = i.attr_gen.wrapping_add(1);
            changed = true;
        }
        if let Some(t) = a.atime {
            i.atime_ns = ts(t);
            changed = true;
        }
        if let Some(t) = a.mtime {
            i.mtime_ns = ts(t);
            changed = true;
        }
        // truncate(2): the times change only when the size does; any other attribute
        // change sets ctime.
        let size_changed = a.size.is_some_and(|s| s != inode.size);
        if let Some(t) = a.ctime {
            i.ctime_ns = ts(t);
        } else if changed && (size_changed || a.size.is_none() || i != inode) {
            i.ctime_ns = now;
        }
        self.put_inode(dev, &i)?;
        Ok(i)
    }

    // ----- xattrs -----

    fn xattrs(&mut self, dev: &Dev, inode: &Inode) -> Result<XattrList, FsError> {
        if inode.xattr_block == 0 {
            return Ok(Vec::new());
        }
        if inode.xattr_block > self.vh.layout.pb_count {
            return Err(FsError::Corrupt(FormatError::Geometry(
                "inode: xattr block out of range",
            )));
        }
        let b = self.vh.layout.pb_block(inode.xattr_block - 1);
        let blk = self.md(dev, b)?;
        if get_u32(blk, 0) != magic::XATTR {
            return Err(FsError::Corrupt(FormatError::Geometry(
                "inode: xattr block is not one",
            )));
        }
        xattr_parse(blk)
    }

    /// Stores the list (allocating or freeing the block), bumps attr_gen and ctime.
    fn xattrs_store(
        &mut self,
        dev: &Dev,
        mut inode: Inode,
        list: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<(), FsError> {
        if xattr_bytes(list) > XATTR_AREA {
            return Err(FsError::XattrTooBig);
        }
        if list.is_empty() {
            if inode.xattr_block != 0 {
                self.release(dev, Res::Pb, inode.xattr_block - 1)?;
                inode.xattr_block = 0;
            }
        } else {
            if inode.xattr_block == 0 {
                inode.xattr_block = self.alloc(dev, Res::Pb)? + 1;
            }
            let b = self.vh.layout.pb_block(inode.xattr_block - 1);
            let blk = self.md_mut(dev, b)?;
            put_u32(blk, 0, magic::XATTR);
            xattr_encode(blk, list);
        }
        inode.attr_gen = inode.attr_gen.wrapping_add(1);
        inode.ctime_ns = now_ns();
        self.put_inode(dev, &inode)
    }

    // ----- data -----

    fn reg_inode(&mut self, dev: &Dev, ino: u64) -> Result<Inode, FsError> {
        let i = self.get_inode(dev, ino)?;
        if i.is_dir() {
            return Err(FsError::IsDir(format!("inode {ino}")));
        }
        if !is_reg(&i) {
            return Err(FsError::Invalid(format!(
                "inode {ino} is not a regular file"
            )));
        }
        Ok(i)
    }

    /// Where byte `pos` of a non-resident file lives: (device offset, bytes to the end of its
    /// block) or `None` for a hole / to-be-zeroed block (with the bytes to its end).
    fn locate(
        &mut self,
        dev: &Dev,
        inode: &Inode,
        pos: u64,
    ) -> Result<(Option<u64>, u64), FsError> {
        match inode.layout {
            DataLayout::Resident => Ok((None, RESIDENT_MAX.saturating_sub(pos).max(1))),
            DataLayout::SubBlocks => {
                let within = pos % SUB_BLOCK;
                let i = (pos / SUB_BLOCK) as usize;
                let a = if i < INODE_ADDRS {
                    self.inode_addr(dev, inode.ino, i)?
                } else {
                    0
                };
                let off = (a != 0).then(|| self.vh.layout.sb_offset(a - 1) + within);
                Ok((off, SUB_BLOCK - within))
            }
            DataLayout::FileBlocks => {
                let within = pos % FILE_BLOCK;
                let off = match self.fb_lookup(dev, inode.ino, pos / FILE_BLOCK)? {
                    Some((fb, false)) => Some(self.vh.layout.fb_offset(fb) + within),
                    _ => None,
                };
                Ok((off, FILE_BLOCK - within))
            }
        }
    }

    /// posix_fallocate, first step: validates, grows the layout, allocates sub-blocks
    /// (bounded: a sub-block file is at most 1 MiB) and, for a file-block file, checks the
    /// space and returns the range for [`Datastore::allocate`]'s chunks.
    fn ns_allocate(
        &mut self,
        dev: &Dev,
        stats: &FsStats,
        ino: u64,
        offset: u64,
        len: u64,
        keep_size: bool,
    ) -> Result<Option<AllocPlan>, FsError> {
        let inode = self.reg_inode(dev, ino)?;
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= FILE_BYTES_MAX && len > 0)
            .ok_or_else(|| FsError::Invalid("bad fallocate range".into()))?;
        // FALLOC_FL_KEEP_SIZE preallocates only within the file: blocks past the end of file
        // are not allowed (fsck, truncate and free all work up to the size).
        let end = if keep_size { end.min(inode.size) } else { end };
        if end <= offset {
            return Ok(None);
        }
        let inode = self.grow_layout(dev, stats, ino, end.max(inode.size))?;
        let now = now_ns();
        match inode.layout {
            DataLayout::Resident => {}
            DataLayout::SubBlocks => {
                for i in (offset / SUB_BLOCK) as usize..end.div_ceil(SUB_BLOCK) as usize {
                    if self.inode_addr(dev, ino, i)? == 0 {
                        let a = self.alloc(dev, Res::Sb)? + 1;
                        dev.write_zeroes(self.vh.layout.sb_offset(a - 1), SUB_BLOCK)?;
                        self.data_written = true;
                        self.set_inode_addr(dev, ino, i, a)?;
                        self.upd(dev, ino, |i| i.allocated = i.allocated.saturating_add(1))?;
                    }
                }
            }
            DataLayout::FileBlocks => {
                let first = offset / FILE_BLOCK;
                let last = end.div_ceil(FILE_BLOCK);
                let mut need = 0;
                for fbi in first..last {
                    if self.fb_lookup(dev, ino, fbi)?.is_none() {
                        need += 1;
                    }
                }
                // Fail before anything when the space is plainly not there; a chunk can still
                // find it gone (taken meanwhile) and stop with what it committed.
                if need > self.free.get(&Res::Fb).copied().unwrap_or(0) {
                    return Err(FsError::NoSpace("file blocks"));
                }
                return Ok(Some(AllocPlan {
                    generation: inode.generation,
                    first,
                    last,
                    end,
                }));
            }
        }
        self.allocated_to(dev, ino, end, keep_size, now)?;
        Ok(None)
    }

    /// Records an allocation up to `end` at time `now`: the size grows to `end` unless
    /// `keep_size` (FALLOC_FL_KEEP_SIZE), and ctime always changes.
    fn allocated_to(
        &mut self,
        dev: &Dev,
        ino: u64,
        end: u64,
        keep_size: bool,
        now: i64,
    ) -> Result<Inode, FsError> {
        self.upd(dev, ino, |i| {
            if !keep_size && end > i.size {
                i.size = end;
                i.mtime_ns = now;
            }
            i.ctime_ns = now;
        })
    }

    fn ns_punch(
        &mut self,
        dev: &Dev,
        stats: &FsStats,
        ino: u64,
        offset: u64,
        len: u64,
    ) -> Result<(), FsError> {
        let inode = self.reg_inode(dev, ino)?;
        let end = offset.saturating_add(len).min(inode.size);
        let now = now_ns();
        if offset < end {
            // Punching frees blocks (and zeroes in place what a lease holder may be using).
            self.check_unleased(ino)?;
            match inode.layout {
                DataLayout::Resident => {
                    let b = self.md_mut(dev, self.vh.layout.inode_block(ino))?;
                    b[INODE_ADDR_OFFSET + offset as usize..INODE_ADDR_OFFSET + end as usize]
                        .fill(0);
                }
                DataLayout::SubBlocks | DataLayout::FileBlocks => {
                    let unit = if inode.layout == DataLayout::SubBlocks {
                        SUB_BLOCK
                    } else {
                        FILE_BLOCK
                    };
                    let mut pos = offset;
                    while pos < end {
                        let u = pos / unit;
                        let ustart = u * unit;
                        let uend = (ustart + unit).min(end);
                        let whole = pos == ustart && (uend == ustart + unit || end >= inode.size);
                        if whole {
                            self.free_unit(dev, stats, &inode, u)?;
                        } else if let (Some(off), _) = self.locate(dev, &inode, pos)? {
                            dev.write_zeroes(off, uend - pos)?;
                        }
                        pos = uend;
                    }
                }
            }
        }
        self.upd(dev, ino, |i| {
            i.mtime_ns = now;
            i.ctime_ns = now;
        })?;
        Ok(())
    }

    /// Frees sub-block or file block `u` of the file, if mapped.
    fn free_unit(
        &mut self,
        dev: &Dev,
        stats: &FsStats,
        inode: &Inode,
        u: u64,
    ) -> Result<(), FsError> {
        let ino = inode.ino;
        if inode.layout == DataLayout::SubBlocks {
            let a = self.inode_addr(dev, ino, u as usize)?;
            if a != 0 {
                self.release(dev, Res::Sb, a - 1)?;
                self.set_inode_addr(dev, ino, u as usize, 0)?;
                self.upd(dev, ino, |i| i.allocated = i.allocated.saturating_sub(1))?;
            }
        } else if let Some((fb, _)) = self.fb_lookup(dev, ino, u)? {
            self.fb_set(dev, ino, u, None)?;
            self.release(dev, Res::Fb, fb)?;
            self.upd(dev, ino, |i| i.allocated = i.allocated.saturating_sub(1))?;
            self.maybe_commit(dev, stats)?;
        }
        Ok(())
    }

    /// Frees orphans (inodes without links) that nobody has open.
    pub(crate) fn reclaim_orphans(&mut self, dev: &Dev, stats: &FsStats) -> Result<u64, FsError> {
        if !self.get_bit(dev, Res::Fd, ROOT_INO)? {
            return Ok(0);
        }
        let mut n = 0;
        let mut cur = self.orphan_head(dev)?;
        // Bounded by the number of inodes (guards against a corrupt, looping list).
        for _ in 0..self.vh.layout.fd_count {
            if cur == 0 {
                break;
            }
            self.check_ino(cur)?;
            let next = get_u64(self.md(dev, self.vh.layout.inode_block(cur))?, ORPHAN_LINK);
            if !self.in_use(cur) {
                self.orphan_remove(dev, cur)?;
                self.free_inode(dev, stats, cur)?;
                n += 1;
                self.maybe_commit(dev, stats)?;
            }
            cur = next;
        }
        Ok(n)
    }
}

/// Splits a datastore path ("/a/b" or "a/b") into its validated components.
fn split_path(path: &str) -> Result<Vec<&str>, FsError> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    for p in &parts {
        if *p == "." || *p == ".." || p.len() > NAME_MAX || p.contains('\0') {
            return Err(FsError::Invalid(format!("bad path component '{p}'")));
        }
    }
    Ok(parts)
}

/// Names the path instead of the last component in an error of a path operation.
fn at_path(e: FsError, path: &str) -> FsError {
    match e {
        FsError::NotFound(_) => FsError::NotFound(path.into()),
        FsError::Exists(_) => FsError::Exists(path.into()),
        FsError::NotDir(_) => FsError::NotDir(path.into()),
        FsError::IsDir(_) => FsError::IsDir(path.into()),
        FsError::NotEmpty(_) => FsError::NotEmpty(path.into()),
        FsError::Busy(_) => FsError::Busy(path.into()),
        e => e,
    }
}

/// The path API (admin side: stratactl, stratad's disk files) is a resolver over the inode
/// namespace: a path becomes (parent inode, name) and the namespace operation does the rest.
impl Inner {
    /// The inode a path names.
    pub(crate) fn resolve_path(&mut self, dev: &Dev, path: &str) -> Result<u64, FsError> {
        let mut ino = ROOT_INO;
        for part in split_path(path)? {
            if !self.get_inode(dev, ino)?.is_dir() {
                return Err(FsError::NotDir(path.into()));
            }
            let (_, e) = self
                .dir_find(dev, ino, part)?
                .ok_or_else(|| FsError::NotFound(path.into()))?;
            ino = e.ino;
        }
        Ok(ino)
    }

    /// The directory holding the last component of a path, and that component.
    fn resolve_parent<'p>(&mut self, dev: &Dev, path: &'p str) -> Result<(u64, &'p str), FsError> {
        let parts = split_path(path)?;
        let (name, dirs) = parts
            .split_last()
            .ok_or_else(|| FsError::Invalid("empty path".into()))?;
        let mut ino = ROOT_INO;
        for d in dirs {
            let (_, e) = self
                .dir_find(dev, ino, d)?
                .ok_or_else(|| FsError::NotFound(path.into()))?;
            if e.ftype != ftype_of(S_IFDIR) {
                return Err(FsError::NotDir(path.into()));
            }
            ino = e.ino;
        }
        Ok((ino, name))
    }

    /// Creates a file or directory owned by root at `path`.
    pub(crate) fn path_create(
        &mut self,
        dev: &Dev,
        stats: &FsStats,
        path: &str,
        mode: u32,
        prov: Provisioning,
    ) -> Result<u64, FsError> {
        let (parent, name) = self.resolve_parent(dev, path)?;
        self.ns_create(
            dev,
            stats,
            parent,
            name.as_bytes(),
            mode,
            0,
            0,
            0,
            prov,
            &[],
        )
        .map(|i| i.ino)
        .map_err(|e| at_path(e, path))
    }

    /// Removes a file or an empty directory. Unlike `unlink_at`, a file in use (a disk being
    /// served, an open handle) is refused with [`FsError::Busy`] instead of becoming an
    /// orphan: the admin side must not pull a served disk's name.
    pub(crate) fn path_remove(
        &mut self,
        dev: &Dev,
        stats: &FsStats,
        path: &str,
        want_dir: bool,
    ) -> Result<(), FsError> {
        let (parent, name) = self.resolve_parent(dev, path)?;
        let (_, e) = self
            .dir_find(dev, parent, name)?
            .ok_or_else(|| FsError::NotFound(path.into()))?;
        let inode = self.get_inode(dev, e.ino)?;
        if inode.is_dir() != want_dir {
            return Err(if want_dir {
                FsError::NotDir(path.into())
            } else {
                FsError::IsDir(path.into())
            });
        }
        if want_dir && !self.dir_is_empty(dev, e.ino)? {
            return Err(FsError::NotEmpty(path.into()));
        }
        if self.in_use(e.ino) {
            return Err(FsError::Busy(path.into()));
        }
        self.ns_remove(dev, stats, parent, name.as_bytes(), want_dir)
            .map_err(|e| at_path(e, path))
    }

    /// Renames `from` to `to`, replacing a file or empty directory there (refused with
    /// [`FsError::Busy`] while the replaced file is in use, as [`Inner::path_remove`]).
    pub(crate) fn path_rename(
        &mut self,
        dev: &Dev,
        stats: &FsStats,
        from: &str,
        to: &str,
    ) -> Result<(), FsError> {
        let (fp, fname) = self.resolve_parent(dev, from)?;
        let (tp, tname) = self.resolve_parent(dev, to)?;
        let (_, moving) = self
            .dir_find(dev, fp, fname)?
            .ok_or_else(|| FsError::NotFound(from.into()))?;
        if let Some((_, target)) = self.dir_find(dev, tp, tname)? {
            if target.ino != moving.ino && self.in_use(target.ino) {
                return Err(FsError::Busy(to.into()));
            }
        }
        let flags = RenameFlags::default();
        self.ns_rename(
            dev,
            stats,
            fp,
            fname.as_bytes(),
            tp,
            tname.as_bytes(),
            flags,
        )
        .map_err(|e| match e {
            FsError::NotFound(_) => FsError::NotFound(from.into()),
            e => at_path(e, to),
        })
    }
}

impl Datastore {
    /// Runs a namespace operation: committed on return, or (with deferred commits on) left
    /// in the open transaction, undone on failure without touching other pending changes.
    fn ns_op<T>(
        &self,
        f: impl FnOnce(&mut Inner, &Dev, &FsStats) -> Result<T, FsError>,
    ) -> Result<T, FsError> {
        if !self.deferred.load(Ordering::Relaxed) {
            return self.with_op(|g, dev| {
                let r = f(g, dev, &self.stats)?;
                g.end_op(dev, &self.stats)?;
                Ok(r)
            });
        }
        let mut g = self.lock()?;
        if g.dirty.len() + OP_RESERVE > crate::fs::TXN_SOFT_MAX {
            if let Err(e) = g.commit(&self.dev, &self.stats) {
                g.failed = true;
                return Err(e);
            }
        }
        g.undo = Some(Undo {
            blocks: HashMap::new(),
            dirty: g.dirty.clone(),
            pending_free: g.pending_free.clone(),
            free: g.free.clone(),
            hints: g.hints.clone(),
            dirty_since: g.dirty_since,
            commits: g.journal.commits,
        });
        let changes = g.changes;
        let r = f(&mut g, &self.dev, &self.stats);
        let undo = g.undo.take();
        match &r {
            Err(FsError::Device(_) | FsError::Journal(_) | FsError::Failed) => g.failed = true,
            Err(e) if g.changes != changes => match undo {
                Some(u) if u.commits == g.journal.commits => {
                    for (b, img) in u.blocks {
                        g.cache.insert(b, img);
                    }
                    g.dirty = u.dirty;
                    g.pending_free = u.pending_free;
                    g.free = u.free;
                    g.hints = u.hints;
                    g.dirty_since = u.dirty_since;
                    g.dir_index.clear();
                }
                _ => {
                    tracing::error!(err = %e, "operation failed after a partial commit; stopping the datastore");
                    g.failed = true;
                }
            },
            Err(_) => {}
            Ok(_) => {
                self.stats.logical_txns.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }

    /// Looks `name` up in directory `parent`.
    pub fn lookup_at(&self, parent: u64, name: &[u8]) -> Result<Inode, FsError> {
        let name = check_name(name)?;
        self.with(|g, dev| {
            g.dir_inode(dev, parent)?;
            let (_, e) = g
                .dir_find(dev, parent, name)?
                .ok_or_else(|| FsError::NotFound(name.into()))?;
            g.get_inode(dev, e.ino)
        })
    }

    /// Creates a node of any type but symlink: regular file, directory, FIFO, character or
    /// block device, socket. `mode` holds the type and permission bits.
    pub fn make_node(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u32,
        uid: u32,
        gid: u32,
    ) -> Result<Inode, FsError> {
        match mode & S_IFMT {
            S_IFREG | S_IFDIR | S_IFIFO | S_IFCHR | S_IFBLK | S_IFSOCK => {}
            _ => return Err(FsError::Invalid(format!("mode {mode:o}: bad file type"))),
        }
        let rdev = if matches!(mode & S_IFMT, S_IFCHR | S_IFBLK) {
            rdev
        } else {
            0
        };
        self.ns_op(|g, dev, st| {
            g.ns_create(
                dev,
                st,
                parent,
                name,
                mode & (S_IFMT | 0o7777),
                rdev,
                uid,
                gid,
                Provisioning::Thin,
                &[],
            )
        })
    }

    /// Creates a symbolic link to `target` (stored as the inode's data, resident when small).
    pub fn symlink_at(
        &self,
        parent: u64,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> Result<Inode, FsError> {
        if target.is_empty() {
            return Err(FsError::NotFound("empty symlink target".into()));
        }
        if target.len() > SYMLINK_MAX {
            return Err(FsError::NameTooLong("symlink target".into()));
        }
        self.ns_op(|g, dev, st| {
            g.ns_create(
                dev,
                st,
                parent,
                name,
                S_IFLNK | 0o777,
                0,
                uid,
                gid,
                Provisioning::Thin,
                target,
            )
        })
    }

    /// Reads a symlink's target.
    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        self.with(|g, dev| {
            let i = g.get_inode(dev, ino)?;
            if i.mode & S_IFMT != S_IFLNK {
                return Err(FsError::Invalid(format!("inode {ino} is not a symlink")));
            }
            if i.size as usize > SYMLINK_MAX {
                return Err(FsError::Corrupt(FormatError::Geometry("symlink too long")));
            }
            let mut buf = vec![0u8; i.size as usize];
            let n = g.read(dev, ino, 0, &mut buf)?;
            buf.truncate(n);
            Ok(buf)
        })
    }

    /// Adds a hard link `new_parent/new_name` to `ino` (not a directory).
    pub fn link_at(&self, ino: u64, new_parent: u64, new_name: &[u8]) -> Result<Inode, FsError> {
        self.ns_op(|g, dev, st| g.ns_link(dev, st, ino, new_parent, new_name))
    }

    /// Removes a non-directory name; the inode is freed with its last link, or when it is
    /// last closed if it is open.
    pub fn unlink_at(&self, parent: u64, name: &[u8]) -> Result<(), FsError> {
        self.ns_op(|g, dev, st| g.ns_remove(dev, st, parent, name, false))
    }

    /// Removes an empty directory.
    pub fn rmdir_at(&self, parent: u64, name: &[u8]) -> Result<(), FsError> {
        self.ns_op(|g, dev, st| g.ns_remove(dev, st, parent, name, true))
    }

    /// rename(2) / renameat2 (RENAME_NOREPLACE, RENAME_EXCHANGE).
    pub fn rename_at(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        flags: RenameFlags,
    ) -> Result<(), FsError> {
        self.ns_op(|g, dev, st| g.ns_rename(dev, st, parent, name, new_parent, new_name, flags))
    }

    /// Changes attributes; returns the updated inode.
    pub fn setattr(&self, ino: u64, attr: &SetAttr) -> Result<Inode, FsError> {
        self.ns_op(|g, dev, st| g.ns_setattr(dev, st, ino, attr))
    }

    /// Lists up to `max` entries of a directory after `cookie` (0 = from the start).
    /// Cookies are slot numbers + 1: stable while other entries come and go.
    pub fn read_dir_from(
        &self,
        dir: u64,
        cookie: u64,
        max: usize,
    ) -> Result<Vec<DirCursorEntry>, FsError> {
        self.with(|g, dev| {
            let idx = g.index(dev, dir)?;
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
        })
    }

    /// Reads an extended attribute.
    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>, FsError> {
        self.with(|g, dev| {
            let i = g.get_inode(dev, ino)?;
            g.xattrs(dev, &i)?
                .into_iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v)
                .ok_or(FsError::NoXattr)
        })
    }

    /// Sets an extended attribute.
    pub fn setxattr(
        &self,
        ino: u64,
        name: &[u8],
        value: &[u8],
        mode: XattrSetMode,
    ) -> Result<(), FsError> {
        if name.is_empty() {
            return Err(FsError::Invalid("empty xattr name".into()));
        }
        if name.len() > XATTR_NAME_MAX {
            return Err(FsError::NameTooLong("xattr name".into()));
        }
        if value.len() > XATTR_VALUE_MAX {
            return Err(FsError::XattrTooBig);
        }
        self.ns_op(|g, dev, _| {
            let i = g.get_inode(dev, ino)?;
            let mut list = g.xattrs(dev, &i)?;
            match (list.iter().position(|(n, _)| n == name), mode) {
                (Some(_), XattrSetMode::CreateOnly) => return Err(FsError::Exists("xattr".into())),
                (None, XattrSetMode::ReplaceOnly) => return Err(FsError::NoXattr),
                (Some(p), _) => list[p].1 = value.to_vec(),
                (None, _) => list.push((name.to_vec(), value.to_vec())),
            }
            if xattr_bytes(&list) > XATTR_AREA {
                return Err(FsError::XattrTooBig);
            }
            g.xattrs_store(dev, i, &list)
        })
    }

    /// Lists extended-attribute names.
    pub fn listxattr(&self, ino: u64) -> Result<Vec<Vec<u8>>, FsError> {
        self.with(|g, dev| {
            let i = g.get_inode(dev, ino)?;
            Ok(g.xattrs(dev, &i)?.into_iter().map(|(n, _)| n).collect())
        })
    }

    /// Removes an extended attribute.
    pub fn removexattr(&self, ino: u64, name: &[u8]) -> Result<(), FsError> {
        self.ns_op(|g, dev, _| {
            let i = g.get_inode(dev, ino)?;
            let mut list = g.xattrs(dev, &i)?;
            let p = list
                .iter()
                .position(|(n, _)| n == name)
                .ok_or(FsError::NoXattr)?;
            list.remove(p);
            g.xattrs_store(dev, i, &list)
        })
    }

    /// Plans a read of `[offset, offset + len)` clipped at the end of the file: device
    /// extents (data blocks, written in place, safe to pread), zero extents (holes,
    /// to-be-zeroed blocks) and inline bytes (resident data). Returns the bytes covered.
    ///
    /// The device extents come with an [`ExtentPin`]: until it is dropped the blocks stay the
    /// file's (shrink, truncate and punch are refused with [`FsError::Busy`]), so a reader
    /// never copies bytes that meanwhile became another file's.
    pub fn read_plan(
        &self,
        ino: u64,
        offset: u64,
        len: u64,
        out: &mut Vec<Extent>,
    ) -> Result<(u64, ExtentPin<'_>), FsError> {
        let n = self.with(|g, dev| {
            let n = Self::read_plan_locked(g, dev, ino, offset, len, out)?;
            g.pin(ino);
            Ok(n)
        })?;
        Ok((n, ExtentPin::new(self, ino)))
    }

    fn read_plan_locked(
        g: &mut Inner,
        dev: &Dev,
        ino: u64,
        offset: u64,
        len: u64,
        out: &mut Vec<Extent>,
    ) -> Result<u64, FsError> {
        {
            let inode = g.get_inode(dev, ino)?;
            if inode.is_dir() {
                return Err(FsError::IsDir(format!("inode {ino}")));
            }
            if offset >= inode.size {
                return Ok(0);
            }
            let n = len.min(inode.size - offset);
            if inode.layout == DataLayout::Resident {
                let mut buf = vec![0u8; n as usize];
                g.read(dev, ino, offset, &mut buf)?;
                out.push(Extent::Inline(buf));
                return Ok(n);
            }
            let mut done = 0u64;
            while done < n {
                let (off, avail) = g.locate(dev, &inode, offset + done)?;
                let l = avail.min(n - done);
                let merged = match (out.last_mut(), off) {
                    (Some(Extent::Device { offset: o, len: pl }), Some(d)) if *o + *pl == d => {
                        *pl += l;
                        true
                    }
                    (Some(Extent::Zero { len: pl }), None) => {
                        *pl += l;
                        true
                    }
                    _ => false,
                };
                if !merged {
                    out.push(match off {
                        Some(d) => Extent::Device { offset: d, len: l },
                        None => Extent::Zero { len: l },
                    });
                }
                done += l;
            }
            Ok(n)
        }
    }

    /// Writes `data` at `offset` of a regular file of any layout, extending it; sets
    /// mtime/ctime. Committed on return unless deferred commits are on.
    pub fn write_at(&self, ino: u64, offset: u64, data: &[u8]) -> Result<Inode, FsError> {
        let batching = self.batching();
        self.ns_op(|g, dev, st| {
            g.reg_inode(dev, ino)?;
            g.write_any(dev, st, ino, offset, data, batching)?;
            g.get_inode(dev, ino)
        })
    }

    /// Records that the caller wrote data in place at a device offset from
    /// [`Datastore::map_direct`] or [`Datastore::read_plan`]: sets mtime/ctime, at most once
    /// per inode per journal transaction, never forcing a commit.
    pub fn note_data_write(&self, ino: u64) -> Result<(), FsError> {
        self.with(|g, dev| {
            if g.noted.contains(&ino) {
                return Ok(());
            }
            if g.dirty.len() + OP_RESERVE > crate::fs::TXN_SOFT_MAX {
                g.commit(dev, &self.stats)?;
            }
            let now = now_ns();
            g.upd(dev, ino, |i| {
                i.mtime_ns = now;
                i.ctime_ns = now;
            })?;
            g.noted.insert(ino);
            Ok(())
        })
    }

    /// posix_fallocate: allocates (zeroed) blocks for the range and extends the size unless
    /// `keep_size`. A file-block range is allocated in steps of [`ALLOC_CHUNK_FBS`] blocks,
    /// each zeroed without the datastore lock and committed on its own: other disks and
    /// shares proceed between (and during) the steps. Out of space part-way, the steps done
    /// stay (with the size covering them), as with Linux filesystems.
    pub fn allocate(
        &self,
        ino: u64,
        offset: u64,
        len: u64,
        keep_size: bool,
    ) -> Result<(), FsError> {
        let plan = self.ns_op(|g, dev, st| g.ns_allocate(dev, st, ino, offset, len, keep_size))?;
        let Some(p) = plan else {
            return Ok(());
        };
        let mut fbi = p.first;
        // Bounded: each step advances by up to ALLOC_CHUNK_FBS blocks to `last`.
        while fbi < p.last {
            let stop = fbi.saturating_add(ALLOC_CHUNK_FBS).min(p.last);
            self.allocate_step(ino, &p, fbi, stop, keep_size)?;
            fbi = stop;
        }
        Ok(())
    }

    /// One step of [`Datastore::allocate`]: sets free blocks aside under the lock, zeroes
    /// them without it (a reserved block is nobody's), then maps them and commits.
    fn allocate_step(
        &self,
        ino: u64,
        p: &AllocPlan,
        first: u64,
        stop: u64,
        keep_size: bool,
    ) -> Result<(), FsError> {
        let gone = || FsError::NotFound(format!("inode {ino} (removed during fallocate)"));
        let (missing, blocks, layout) = self.with(|g, dev| {
            if g.reg_inode(dev, ino)?.generation != p.generation {
                return Err(gone());
            }
            let mut missing = Vec::new();
            for fbi in first..stop {
                if g.fb_lookup(dev, ino, fbi)?.is_none() {
                    missing.push(fbi);
                }
            }
            let blocks = g.reserve_fb(dev, missing.len() as u64)?;
            Ok((missing, blocks, g.vh.layout))
        })?;
        let zeroed = blocks
            .iter()
            .try_for_each(|&fb| self.dev.write_zeroes(layout.fb_offset(fb), FILE_BLOCK));
        let r = match zeroed {
            Err(e) => Err(FsError::Device(e)),
            Ok(()) => self.with_op(|g, dev| {
                let inode = g.reg_inode(dev, ino)?;
                if inode.generation != p.generation {
                    return Err(gone());
                }
                // With KEEP_SIZE, never past a size that shrank meanwhile.
                let keep_to = if keep_size {
                    inode.size.div_ceil(FILE_BLOCK)
                } else {
                    u64::MAX
                };
                for (&fbi, &fb) in missing.iter().zip(&blocks) {
                    if fbi >= keep_to || g.fb_lookup(dev, ino, fbi)?.is_some() {
                        continue;
                    }
                    // Counted as used since it was reserved; now the bitmap says so.
                    g.reserved.remove(&fb);
                    g.put_bit(dev, Res::Fb, fb, true)?;
                    g.data_written = true;
                    g.fb_set(dev, ino, fbi, Some((fb, false)))?;
                    g.upd(dev, ino, |i| i.allocated = i.allocated.saturating_add(1))?;
                }
                let now = now_ns();
                let step_end = p.end.min(stop.saturating_mul(FILE_BLOCK));
                g.allocated_to(dev, ino, step_end, keep_size, now)?;
                g.end_op(dev, &self.stats)
            }),
        };
        // Whatever this step did not publish (an error, blocks mapped meanwhile) goes back.
        if let Ok(mut g) = self.inner.lock() {
            g.unreserve_fb(&blocks);
        }
        r
    }

    /// Punches a hole: the range reads back as zeroes; whole blocks are freed, partial
    /// ranges zeroed in place. The size is unchanged.
    pub fn punch_hole(&self, ino: u64, offset: u64, len: u64) -> Result<(), FsError> {
        self.ns_op(|g, dev, st| g.ns_punch(dev, st, ino, offset, len))
    }

    /// SEEK_DATA / SEEK_HOLE at block granularity (resident files are all data);
    /// `offset >= size` is [`FsError::NoData`] (ENXIO).
    pub fn seek(&self, ino: u64, offset: u64, whence: Whence) -> Result<u64, FsError> {
        self.with(|g, dev| {
            let inode = g.get_inode(dev, ino)?;
            if offset >= inode.size {
                return Err(FsError::NoData(offset));
            }
            if inode.layout == DataLayout::Resident {
                return Ok(match whence {
                    Whence::Data => offset,
                    Whence::Hole => inode.size,
                });
            }
            let mut pos = offset;
            // Bounded by the file's block count: each step moves to the next block.
            while pos < inode.size {
                let (off, avail) = g.locate(dev, &inode, pos)?;
                match (whence, off) {
                    (Whence::Data, Some(_)) | (Whence::Hole, None) => return Ok(pos),
                    _ => pos += avail,
                }
            }
            match whence {
                Whence::Data => Err(FsError::NoData(offset)),
                Whence::Hole => Ok(inode.size),
            }
        })
    }

    /// Namespace operations, `write_at`, `setattr`, xattr changes, `allocate` and
    /// `punch_hole` leave their metadata in the open journal transaction instead of
    /// committing each (committed by [`Datastore::sync`], [`Datastore::commit_if_older`] or
    /// when the transaction nears its size limit). A crash loses uncommitted operations
    /// whole; it never leaves half of one.
    pub fn set_deferred_commit(&self, on: bool) {
        self.deferred.store(on, Ordering::Relaxed);
    }

    /// Frees `ino` if it is an orphan nobody has open any more (called by `close`).
    pub(crate) fn reclaim_if_orphan(&self, ino: u64) -> Result<(), FsError> {
        // Most closes are of linked files: decide that without the undo snapshot of an
        // operation (the file server closes a handle per release).
        let orphan =
            self.with(|g, dev| {
                Ok(!g.in_use(ino)
                    && g.get_bit(dev, Res::Fd, ino)?
                    && g.get_inode(dev, ino)?.nlink == 0)
            })?;
        if !orphan {
            return Ok(());
        }
        self.ns_op(|g, dev, st| {
            if g.in_use(ino) || !g.get_bit(dev, Res::Fd, ino)? {
                return Ok(());
            }
            if g.get_inode(dev, ino)?.nlink == 0 {
                g.orphan_remove(dev, ino)?;
                g.free_inode(dev, st, ino)?;
            }
            Ok(())
        })
    }

    /// Frees every orphan left by a crash (mount does this).
    pub(crate) fn reclaim_orphans(&self) -> Result<u64, FsError> {
        self.with(|g, dev| {
            let n = g.reclaim_orphans(dev, &self.stats)?;
            g.commit(dev, &self.stats)?;
            Ok(n)
        })
    }
}
