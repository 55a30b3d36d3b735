//! The inode-based POSIX namespace through the datastore (the file server's API): lookups,
//! node creation, links, unlink with orphans, rename, setattr, cursor readdir, symlinks and
//! extended attributes.

use crate::error::FsError;
use crate::format::*;
use crate::fs::Datastore;
use crate::ns::{check_name, DirCursorEntry, RenameFlags, SetAttr, XattrSetMode, SYMLINK_MAX};
use crate::xattr::{self, XATTR_NAME_MAX, XATTR_VALUE_MAX};

impl Datastore {
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
            g.create(
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
            g.create(
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
        self.ns_op(|g, dev, st| g.link(dev, st, ino, new_parent, new_name))
    }

    /// Removes a non-directory name; the inode is freed with its last link, or when it is
    /// last closed if it is open.
    pub fn unlink_at(&self, parent: u64, name: &[u8]) -> Result<(), FsError> {
        self.ns_op(|g, dev, st| g.remove(dev, st, parent, name, false))
    }

    /// Removes an empty directory.
    pub fn rmdir_at(&self, parent: u64, name: &[u8]) -> Result<(), FsError> {
        self.ns_op(|g, dev, st| g.remove(dev, st, parent, name, true))
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
        self.ns_op(|g, dev, st| g.rename(dev, st, parent, name, new_parent, new_name, flags))
    }

    /// Changes attributes; returns the updated inode.
    pub fn setattr(&self, ino: u64, attr: &SetAttr) -> Result<Inode, FsError> {
        self.ns_op(|g, dev, st| g.setattr(dev, st, ino, attr))
    }

    /// Lists up to `max` entries of a directory after `cookie` (0 = from the start).
    /// Cookies are slot numbers + 1: stable while other entries come and go.
    pub fn read_dir_from(
        &self,
        dir: u64,
        cookie: u64,
        max: usize,
    ) -> Result<Vec<DirCursorEntry>, FsError> {
        self.with(|g, dev| g.read_dir_from(dev, dir, cookie, max))
    }

    /// Reads an extended attribute.
    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>, FsError> {
        self.with(|g, dev| xattr::get(g, dev, ino, name))
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
        self.ns_op(|g, dev, _| xattr::set(g, dev, ino, name, value, mode))
    }

    /// Lists extended-attribute names.
    pub fn listxattr(&self, ino: u64) -> Result<Vec<Vec<u8>>, FsError> {
        self.with(|g, dev| xattr::names(g, dev, ino))
    }

    /// Removes an extended attribute.
    pub fn removexattr(&self, ino: u64, name: &[u8]) -> Result<(), FsError> {
        self.ns_op(|g, dev, _| xattr::remove(g, dev, ino, name))
    }

    /// Frees `ino` if it is an orphan nobody has open any more (called at a last release).
    pub(crate) fn reclaim_if_orphan(&self, ino: u64) -> Result<(), FsError> {
        // Most closes are of linked files: decide that without the undo snapshot of an
        // operation (the file server closes a handle per release).
        if !self.with(|g, dev| g.is_free_orphan(dev, ino))? {
            return Ok(());
        }
        self.ns_op(|g, dev, st| g.reclaim_if_orphan(dev, st, ino))
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
