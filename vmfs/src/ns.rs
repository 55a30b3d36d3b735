//! The POSIX namespace: inode-based lookups and creation of every file type, hard links,
//! symlinks, unlink with orphans (files unlinked while open, freed at their last close or at
//! the next mount), full rename(2)/renameat2 semantics and setattr, over the directory layer.
//! Also the public types of the namespace API (`Datastore`'s inode-based methods).

use std::ops::{Deref, DerefMut};

use crate::alloc::Res;
use crate::data::is_reg;
use crate::dir::Dirs;
use crate::error::FsError;
use crate::format::*;
use crate::inode::{now_ns, ORPHAN_LINK};
use crate::txn::{Dev, FsStats};

pub use crate::data::{Extent, Whence, ALLOC_CHUNK_FBS};
pub use crate::dir::DirCursorEntry;
pub use crate::xattr::{
    XattrSetMode, XATTR_AREA, XATTR_ENTRIES_OFFSET, XATTR_ENTRY_HEADER, XATTR_NAME_MAX,
    XATTR_VALUE_MAX,
};

/// Longest symlink target (PATH_MAX - 1: the kernel's limit including the NUL).
pub const SYMLINK_MAX: usize = 4095;
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

/// Validates a name: non-empty, at most [`NAME_MAX`] bytes, no `/` or NUL, not `.` or `..`,
/// and UTF-8 (directory entries store names as UTF-8).
pub(crate) fn check_name(name: &[u8]) -> Result<&str, FsError> {
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

/// The namespace: the state the datastore locks, owning the directory layer (and through it
/// every layer below). The namespace's own state is on disk (the orphan list).
pub(crate) struct Namespace {
    dirs: Dirs,
}

impl Deref for Namespace {
    type Target = Dirs;
    #[inline]
    fn deref(&self) -> &Dirs {
        &self.dirs
    }
}

impl DerefMut for Namespace {
    #[inline]
    fn deref_mut(&mut self) -> &mut Dirs {
        &mut self.dirs
    }
}

impl Namespace {
    /// The namespace over the directory layer.
    pub(crate) fn new(dirs: Dirs) -> Self {
        Namespace { dirs }
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
                self.forget_dir(ino);
                self.orphan_add(dev, ino)?;
            } else {
                self.free_inode(dev, stats, ino)?;
            }
        }
        Ok(())
    }

    /// Frees an inode with its blocks, xattr block and directory index.
    pub(crate) fn free_inode(
        &mut self,
        dev: &Dev,
        stats: &FsStats,
        ino: u64,
    ) -> Result<(), FsError> {
        self.revoke_dir_blocks(dev, ino)?;
        self.truncate_storage(dev, stats, ino, 0)?;
        let xb = self.get_inode(dev, ino)?.xattr_block;
        if xb != 0 {
            self.release(dev, Res::Pb, xb - 1)?;
        }
        self.forget_dir(ino);
        let b = self.vh.layout.inode_block(ino);
        let generation = get_u32(self.md(dev, b)?, 40);
        let blockm = self.md_mut(dev, b)?;
        blockm[MD_HEADER_BYTES..].fill(0);
        // Keep the generation so the next use of the slot gets a newer one.
        put_u32(blockm, 40, generation);
        self.release(dev, Res::Fd, ino)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn create(
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

    pub(crate) fn remove(
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

    pub(crate) fn link(
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
    pub(crate) fn rename(
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

    pub(crate) fn setattr(
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
            let next = get_u64(self.inode_md(dev, cur)?, ORPHAN_LINK);
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

    /// Frees `ino` if it is an orphan nobody has open any more.
    pub(crate) fn reclaim_if_orphan(
        &mut self,
        dev: &Dev,
        stats: &FsStats,
        ino: u64,
    ) -> Result<(), FsError> {
        if self.in_use(ino) || !self.get_bit(dev, Res::Fd, ino)? {
            return Ok(());
        }
        if self.get_inode(dev, ino)?.nlink == 0 {
            self.orphan_remove(dev, ino)?;
            self.free_inode(dev, stats, ino)?;
        }
        Ok(())
    }

    /// True if `ino` is an orphan nobody has open (decided without a savepoint).
    pub(crate) fn is_free_orphan(&mut self, dev: &Dev, ino: u64) -> Result<bool, FsError> {
        Ok(!self.in_use(ino)
            && self.get_bit(dev, Res::Fd, ino)?
            && self.get_inode(dev, ino)?.nlink == 0)
    }
}
