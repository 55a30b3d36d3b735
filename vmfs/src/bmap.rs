//! The block map of file-block files: up to `INODE_ADDRS` pointer blocks in the inode, each
//! mapping `PB_ENTRIES` file blocks (with a to-be-zeroed bit). Part of the inode layer.

use crate::alloc::{check_index, Res};
use crate::error::FsError;
use crate::format::*;
use crate::inode::Inodes;
use crate::txn::Dev;

impl Inodes {
    /// File block `fbi` of `ino`: (file block index, to-be-zeroed) if allocated.
    pub(crate) fn fb_lookup(
        &mut self,
        dev: &Dev,
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
        dev: &Dev,
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
            let b = self.md(dev, pbb)?;
            let empty = (0..PB_ENTRIES).all(|i| pb_entry(b, i) & !PB_TBZ == 0);
            if empty {
                self.set_inode_addr(dev, ino, slot, 0)?;
                self.release(dev, Res::Pb, pb - 1)?;
            }
        }
        Ok(())
    }
}
