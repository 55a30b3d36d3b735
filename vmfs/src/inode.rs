//! The inode table: on-disk inodes (read, write, allocate), the orphan list threaded
//! through inode blocks, and the in-core references to inodes (opens and extent leases) that
//! keep a file's inode and blocks from being freed or moved.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::alloc::{Res, Space};
use crate::error::FsError;
use crate::format::*;
use crate::txn::Dev;

/// Byte offset in an inode block of the orphan-list link (FORMAT.md §7): in the root inode the
/// first orphan, in an orphan the next one; 0 ends the list.
pub(crate) const ORPHAN_LINK: usize = 152;

/// Nanoseconds since the epoch, for inode timestamps.
pub(crate) fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The inode table, owning the allocator below it.
pub(crate) struct Inodes {
    space: Space,
    /// Opens per inode (disks served, file handles): not freed while open.
    open: HashMap<u64, u32>,
    /// Extent leases per inode (`ExtentLease`, `ExtentPin`, `Mapping`): holders use device
    /// offsets of the file's blocks outside the lock, so no block of it may be freed or moved.
    pins: HashMap<u64, u32>,
}

impl Deref for Inodes {
    type Target = Space;
    #[inline]
    fn deref(&self) -> &Space {
        &self.space
    }
}

impl DerefMut for Inodes {
    #[inline]
    fn deref_mut(&mut self) -> &mut Space {
        &mut self.space
    }
}

/// Which in-core reference to an inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ref {
    /// An open (a disk served, a file handle).
    Open,
    /// An extent lease or pin.
    Lease,
}

impl Inodes {
    /// The inode table over the allocator.
    pub(crate) fn new(space: Space) -> Self {
        Inodes {
            space,
            open: HashMap::new(),
            pins: HashMap::new(),
        }
    }

    /// Takes one reference of `kind` to `ino`.
    pub(crate) fn take_ref(&mut self, ino: u64, kind: Ref) {
        let t = match kind {
            Ref::Open => &mut self.open,
            Ref::Lease => &mut self.pins,
        };
        *t.entry(ino).or_insert(0) += 1;
    }

    /// Drops one reference of `kind`; true if it was the last reference of either kind (an
    /// unlinked file is then freed, as at a last close).
    pub(crate) fn drop_ref(&mut self, ino: u64, kind: Ref) -> bool {
        let (mine, other) = match kind {
            Ref::Lease => (&mut self.pins, &self.open),
            Ref::Open => (&mut self.open, &self.pins),
        };
        if let Some(n) = mine.get_mut(&ino) {
            *n -= 1;
            if *n == 0 {
                mine.remove(&ino);
                return !other.contains_key(&ino);
            }
        }
        false
    }

    /// References of `kind` to `ino`.
    pub(crate) fn ref_count(&self, ino: u64, kind: Ref) -> u64 {
        let t = match kind {
            Ref::Open => &self.open,
            Ref::Lease => &self.pins,
        };
        t.get(&ino).map_or(0, |&n| u64::from(n))
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

    pub(crate) fn check_ino(&self, ino: u64) -> Result<(), FsError> {
        if ino == 0 || ino >= self.vh.layout.fd_count {
            return Err(FsError::Invalid(format!("inode {ino} out of range")));
        }
        Ok(())
    }

    pub(crate) fn get_inode(&mut self, dev: &Dev, ino: u64) -> Result<Inode, FsError> {
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

    pub(crate) fn put_inode(&mut self, dev: &Dev, inode: &Inode) -> Result<(), FsError> {
        self.check_ino(inode.ino)?;
        let b = self.vh.layout.inode_block(inode.ino);
        inode.encode_into(self.md_mut(dev, b)?);
        Ok(())
    }

    /// Reads, changes and writes back one inode.
    pub(crate) fn upd(
        &mut self,
        dev: &Dev,
        ino: u64,
        f: impl FnOnce(&mut Inode),
    ) -> Result<Inode, FsError> {
        let mut i = self.get_inode(dev, ino)?;
        f(&mut i);
        self.put_inode(dev, &i)?;
        Ok(i)
    }

    pub(crate) fn alloc_ino(&mut self, dev: &Dev) -> Result<(u64, u32), FsError> {
        let ino = self.alloc(dev, Res::Fd)?;
        let b = self.vh.layout.inode_block(ino);
        let old_gen = get_u32(self.md(dev, b)?, 40);
        let blockm = self.md_mut(dev, b)?;
        blockm[MD_HEADER_BYTES..].fill(0);
        Ok((ino, old_gen.wrapping_add(1).max(1)))
    }

    pub(crate) fn inode_addr(&mut self, dev: &Dev, ino: u64, i: usize) -> Result<u64, FsError> {
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
        dev: &Dev,
        ino: u64,
        i: usize,
        v: u64,
    ) -> Result<(), FsError> {
        let b = self.vh.layout.inode_block(ino);
        set_inode_addr(self.md_mut(dev, b)?, i, v);
        Ok(())
    }

    pub(crate) fn orphan_head(&mut self, dev: &Dev) -> Result<u64, FsError> {
        let b = self.vh.layout.inode_block(ROOT_INO);
        Ok(get_u64(self.md(dev, b)?, ORPHAN_LINK))
    }

    pub(crate) fn set_link(&mut self, dev: &Dev, ino: u64, v: u64) -> Result<(), FsError> {
        let b = self.vh.layout.inode_block(ino);
        put_u64(self.md_mut(dev, b)?, ORPHAN_LINK, v);
        Ok(())
    }

    pub(crate) fn orphan_add(&mut self, dev: &Dev, ino: u64) -> Result<(), FsError> {
        let head = self.orphan_head(dev)?;
        self.set_link(dev, ino, head)?;
        self.set_link(dev, ROOT_INO, ino)
    }

    pub(crate) fn orphan_remove(&mut self, dev: &Dev, ino: u64) -> Result<(), FsError> {
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
                let after = get_u64(self.inode_md(dev, ino)?, ORPHAN_LINK);
                self.set_link(dev, prev, after)?;
                return self.set_link(dev, ino, 0);
            }
            prev = next;
        }
        Err(FsError::Corrupt(FormatError::Geometry("orphan list loops")))
    }
}
