//! Space management of file data: where a byte lives (`locate`), read plans and direct
//! mappings for in-place I/O, posix_fallocate (in chunks zeroed without the lock), hole
//! punching and SEEK_DATA/SEEK_HOLE.

use crate::alloc::Res;
use crate::data::Files;
use crate::error::FsError;
use crate::format::*;
use crate::inode::now_ns;
use crate::txn::{Dev, FsStats};

/// lseek whence for `Datastore::seek`.
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

/// File blocks one step of a large FALLOCATE allocates (16 MiB). Each step holds the
/// datastore lock twice, briefly (set free blocks aside; map them, one journal commit of a
/// few blocks), and zeroes its blocks in between without it; so one request stalls other
/// disks and shares for at most one step's metadata work, never for the zeroing of a whole
/// range up to the largest file, and a crash keeps every committed step.
pub const ALLOC_CHUNK_FBS: u64 = 16;

/// What `Datastore::allocate`'s steps cover: file blocks `first..last` of the inode of
/// this generation, up to byte `end`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AllocPlan {
    pub(crate) generation: u32,
    pub(crate) first: u64,
    pub(crate) last: u64,
    pub(crate) end: u64,
}

impl Files {
    /// Where byte `pos` of a non-resident file lives: (device offset, bytes to the end of its
    /// block) or `None` for a hole / to-be-zeroed block (with the bytes to its end).
    pub(crate) fn locate(
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
    /// space and returns the range for `Datastore::allocate`'s chunks.
    pub(crate) fn allocate_start(
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
                if need > self.free_count(Res::Fb) {
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
    pub(crate) fn allocated_to(
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

    pub(crate) fn punch(
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
                    let b = self.inode_md_mut(dev, ino)?;
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

    /// Plans a read of `[offset, offset + len)` clipped at the end of the file into `out`
    /// (device extents, zero extents, inline bytes); returns the bytes covered.
    pub(crate) fn read_plan(
        &mut self,
        dev: &Dev,
        ino: u64,
        offset: u64,
        len: u64,
        out: &mut Vec<Extent>,
    ) -> Result<u64, FsError> {
        {
            let inode = self.get_inode(dev, ino)?;
            if inode.is_dir() {
                return Err(FsError::IsDir(format!("inode {ino}")));
            }
            if offset >= inode.size {
                return Ok(0);
            }
            let n = len.min(inode.size - offset);
            if inode.layout == DataLayout::Resident {
                let mut buf = vec![0u8; n as usize];
                self.read(dev, ino, offset, &mut buf)?;
                out.push(Extent::Inline(buf));
                return Ok(n);
            }
            let mut done = 0u64;
            while done < n {
                let (off, avail) = self.locate(dev, &inode, offset + done)?;
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

    /// The device offset of a byte range of a file-block file when it lies within one
    /// allocated, already-zeroed file block (the fast path that needs no metadata update).
    pub(crate) fn map_direct(
        &mut self,
        dev: &Dev,
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
            let inode = self.get_inode(dev, ino)?;
            if inode.layout != DataLayout::FileBlocks || end > inode.size {
                return Ok(None);
            }
            match self.fb_lookup(dev, ino, fbi)? {
                Some((fb, false)) => Ok(Some(self.vh.layout.fb_offset(fb) + offset % FILE_BLOCK)),
                _ => Ok(None),
            }
        }
    }

    /// First locked half of one `Datastore::allocate` step: the holes among file blocks
    /// `first..stop` and as many free blocks set aside for them (zeroed by the caller without
    /// the lock).
    pub(crate) fn allocate_reserve(
        &mut self,
        dev: &Dev,
        ino: u64,
        p: &AllocPlan,
        first: u64,
        stop: u64,
    ) -> Result<(Vec<u64>, Vec<u64>), FsError> {
        if self.reg_inode(dev, ino)?.generation != p.generation {
            return Err(alloc_gone(ino));
        }
        let mut missing = Vec::new();
        for fbi in first..stop {
            if self.fb_lookup(dev, ino, fbi)?.is_none() {
                missing.push(fbi);
            }
        }
        let blocks = self.reserve_fb(dev, missing.len() as u64)?;
        Ok((missing, blocks))
    }

    /// Second locked half of one allocate step: maps the zeroed reserved `blocks` at the
    /// holes `missing` that are still holes and records the allocation up to the step's end.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn allocate_publish(
        &mut self,
        dev: &Dev,
        ino: u64,
        p: &AllocPlan,
        missing: &[u64],
        blocks: &[u64],
        stop: u64,
        keep_size: bool,
    ) -> Result<(), FsError> {
        let inode = self.reg_inode(dev, ino)?;
        if inode.generation != p.generation {
            return Err(alloc_gone(ino));
        }
        // With KEEP_SIZE, never past a size that shrank meanwhile.
        let keep_to = if keep_size {
            inode.size.div_ceil(FILE_BLOCK)
        } else {
            u64::MAX
        };
        for (&fbi, &fb) in missing.iter().zip(blocks) {
            if fbi >= keep_to || self.fb_lookup(dev, ino, fbi)?.is_some() {
                continue;
            }
            // Counted as used since it was reserved; now the bitmap says so.
            self.claim_reserved(dev, fb)?;
            self.data_written = true;
            self.fb_set(dev, ino, fbi, Some((fb, false)))?;
            self.upd(dev, ino, |i| i.allocated = i.allocated.saturating_add(1))?;
        }
        let now = now_ns();
        let step_end = p.end.min(stop.saturating_mul(FILE_BLOCK));
        self.allocated_to(dev, ino, step_end, keep_size, now)?;
        Ok(())
    }

    /// SEEK_DATA / SEEK_HOLE at block granularity (resident files are all data);
    /// `offset >= size` is [`FsError::NoData`] (ENXIO).
    pub(crate) fn seek(
        &mut self,
        dev: &Dev,
        ino: u64,
        offset: u64,
        whence: Whence,
    ) -> Result<u64, FsError> {
        let inode = self.get_inode(dev, ino)?;
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
            let (off, avail) = self.locate(dev, &inode, pos)?;
            match (whence, off) {
                (Whence::Data, Some(_)) | (Whence::Hole, None) => return Ok(pos),
                _ => pos += avail,
            }
        }
        match whence {
            Whence::Data => Err(FsError::NoData(offset)),
            Whence::Hole => Ok(inode.size),
        }
    }
}

/// The inode an allocation works on was removed (or its number reused) between steps.
fn alloc_gone(ino: u64) -> FsError {
    FsError::NotFound(format!("inode {ino} (removed during fallocate)"))
}
