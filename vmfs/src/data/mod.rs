//! File data: reads and writes through every layout (resident in the inode, sub-blocks,
//! file blocks), layout conversion as a file grows, truncation and size changes; the batched
//! scatter-gather write path of virtual disks ([`batch`]); fallocate, hole punching,
//! SEEK_DATA/SEEK_HOLE, read plans and direct mappings ([`space`]).

use std::collections::HashSet;
use std::ops::{Deref, DerefMut};

use crate::alloc::Res;
use crate::error::FsError;
use crate::format::*;
use crate::inode::{now_ns, Inodes};
use crate::txn::{Dev, FsStats};

pub(crate) mod batch;
pub(crate) mod space;

pub use batch::WriteSeg;
pub(crate) use space::AllocPlan;
pub use space::{Extent, Whence, ALLOC_CHUNK_FBS};

/// Dirty blocks a single namespace operation may add to the open transaction at most (a
/// rename touches two directories, two inodes, their parents, bitmaps and pointer blocks of a
/// directory rewrite): a deferred operation starts a new transaction when less room is left,
/// so it never commits half-done.
pub(crate) const OP_RESERVE: usize = 64;

/// The data layer, owning the inode table below it.
pub(crate) struct Files {
    inodes: Inodes,
    /// One file block of zeroes (sub-block and tail zeroing), allocated once at mount.
    zero_block: Vec<u8>,
    /// Inodes whose mtime/ctime [`Files::note_write`] already updated in the open
    /// transaction (at most one update per inode per commit), valid for transaction
    /// `noted_txn`.
    noted: HashSet<u64>,
    noted_txn: u64,
}

impl Deref for Files {
    type Target = Inodes;
    #[inline]
    fn deref(&self) -> &Inodes {
        &self.inodes
    }
}

impl DerefMut for Files {
    #[inline]
    fn deref_mut(&mut self) -> &mut Inodes {
        &mut self.inodes
    }
}

/// A regular file (not a directory, symlink or special file).
pub(crate) fn is_reg(i: &Inode) -> bool {
    i.mode & S_IFMT == S_IFREG
}

impl Files {
    /// The data layer over the inode table.
    pub(crate) fn new(inodes: Inodes) -> Self {
        Files {
            inodes,
            zero_block: vec![0u8; FILE_BLOCK as usize],
            noted: HashSet::new(),
            noted_txn: 0,
        }
    }

    /// Records a data write made in place (at device offsets the caller mapped): sets
    /// mtime/ctime at most once per inode per journal transaction, never forcing a commit
    /// beyond keeping room in the transaction.
    pub(crate) fn note_write(
        &mut self,
        dev: &Dev,
        stats: &FsStats,
        ino: u64,
    ) -> Result<(), FsError> {
        if self.noted_txn != self.txn_seq() {
            self.noted.clear();
            self.noted_txn = self.txn_seq();
        }
        if self.noted.contains(&ino) {
            return Ok(());
        }
        if self.room() < OP_RESERVE {
            self.commit(dev, stats)?;
        }
        let now = now_ns();
        self.upd(dev, ino, |i| {
            i.mtime_ns = now;
            i.ctime_ns = now;
        })?;
        // The commit above (if any) moved the transaction on.
        if self.noted_txn != self.txn_seq() {
            self.noted.clear();
            self.noted_txn = self.txn_seq();
        }
        self.noted.insert(ino);
        Ok(())
    }

    pub(crate) fn reg_inode(&mut self, dev: &Dev, ino: u64) -> Result<Inode, FsError> {
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

    pub(crate) fn read(
        &mut self,
        dev: &Dev,
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
                let b = self.inode_md(dev, ino)?;
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
        dev: &Dev,
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
                let b = self.inode_md_mut(dev, ino)?;
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
                        let at = self.vh.layout.sb_offset(a - 1);
                        let z = &mut self.zero_block[..SUB_BLOCK as usize];
                        z.fill(0);
                        z[within as usize..within as usize + len]
                            .copy_from_slice(&data[done..done + len]);
                        dev.write_at(at, z)?;
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
        dev: &Dev,
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
        dev: &Dev,
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
        let b = self.inode_md_mut(dev, ino)?;
        b[INODE_ADDR_OFFSET..].fill(0);
        self.write_any(dev, stats, ino, 0, &content, true)
    }

    /// Frees storage past `size` (whole blocks) and zeroes the tail of the last partial block
    /// in resident files, so a later extension reads zeroes.
    pub(crate) fn truncate_storage(
        &mut self,
        dev: &Dev,
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
                let b = self.inode_md_mut(dev, ino)?;
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
        dev: &Dev,
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
            if need > self.free_count(Res::Fb) {
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
}
