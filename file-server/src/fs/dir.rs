//! The namespace side: names as FUSE gives them, creation of nodes (checks, ownership,
//! umask or default-ACL inheritance, quota), and READDIR's entry lists.

use std::ffi::{CStr, CString};
use std::io;

use posix_perm::acl::{inherit, Acl};
use virtiofsd::filesystem::{Context, DirEntry, DirectoryIterator};
use vmfs::format::{Inode, S_IFDIR, S_IFMT};
use vmfs::fs::FsError;
use vmfs::XattrSetMode;

use super::base::{errno, fs_err, VmfsFs};
use super::perm::{MAY_EXEC, MAY_WRITE, XATTR_ACL_ACCESS, XATTR_ACL_DEFAULT};
use crate::quota::allocated_bytes;

/// Directory entries produced per READDIR(PLUS) call: a 4 KiB buffer holds about 100 plain
/// entries or 25 "plus" entries; more would only be discarded.
pub(super) const READDIR_ENTRIES_MAX: usize = 128;

/// Entries of one READDIR call.
#[derive(Debug)]
pub struct DirIter {
    /// (node, cookie, type, name) of each entry.
    pub(super) entries: Vec<(u64, u64, u32, CString)>,
    pub(super) next: usize,
}

impl DirectoryIterator for DirIter {
    fn next(&mut self) -> Option<DirEntry<'_>> {
        let (ino, offset, type_, name) = self.entries.get(self.next)?;
        self.next += 1;
        Some(DirEntry {
            ino: *ino,
            offset: *offset,
            type_: *type_,
            name: name.as_c_str(),
        })
    }
}

pub(super) fn name_bytes(name: &CStr) -> io::Result<&[u8]> {
    let b = name.to_bytes();
    if b.is_empty() || b.contains(&b'/') {
        return Err(errno(libc::EINVAL));
    }
    if b.len() > vmfs::format::NAME_MAX {
        return Err(errno(libc::ENAMETOOLONG));
    }
    Ok(b)
}

/// A name that creates or removes an entry: "." and ".." are never valid there.
pub(super) fn new_name(name: &CStr) -> io::Result<&[u8]> {
    let b = name_bytes(name)?;
    if b == b"." || b == b".." {
        return Err(errno(libc::EINVAL));
    }
    Ok(b)
}

pub(super) fn dt_of(mode: u32) -> u32 {
    (mode & S_IFMT) >> 12
}

impl VmfsFs {
    /// Creates a node of `mode` (type included) in `parent`: checks, ownership, umask or
    /// default-ACL inheritance.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn create_node(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
        symlink_target: Option<&[u8]>,
    ) -> io::Result<Inode> {
        self.writable()?;
        let name = new_name(name)?;
        let c = self.caller(ctx)?;
        let dir = self.dir(parent)?;
        self.check(&c, &dir, MAY_WRITE | MAY_EXEC)?;
        let is_dir = mode & S_IFMT == S_IFDIR;
        let default_acl = if symlink_target.is_none() && dir.xattr_block != 0 {
            match self.ds.getxattr(dir.ino, XATTR_ACL_DEFAULT) {
                Ok(v) => Some(Acl::parse(v.as_slice()).map_err(|_| errno(libc::EIO))?),
                Err(FsError::NoXattr) => None,
                Err(e) => return Err(fs_err(e)),
            }
        } else {
            None
        };
        let (mode, access, default) = match &default_acl {
            Some(d) => {
                let inh = inherit(d, mode & 0o7777, is_dir);
                ((mode & S_IFMT) | inh.mode, inh.access, inh.default)
            }
            None => ((mode & S_IFMT) | (mode & 0o7777 & !umask), None, None),
        };
        let (uid, gid, mode) = self.new_owner(&c, &dir, mode);
        let reserved = if self.quota.bytes_full() {
            Err(libc::EDQUOT)
        } else {
            self.quota.reserve(0, 1)
        };
        if let Err(e) = reserved {
            // A name that exists is EEXIST whatever the quota (open(O_CREAT) of an existing
            // file must still work at the limit).
            if self.ds.lookup_at(dir.ino, name).is_ok() {
                return Err(errno(libc::EEXIST));
            }
            return Err(errno(e));
        }
        let made = match symlink_target {
            Some(t) => self.ds.symlink_at(dir.ino, name, t, uid, gid),
            None => self.ds.make_node(dir.ino, name, mode, rdev, uid, gid),
        };
        // The inode was reserved; its bytes and the directory's growth are charged as made.
        let grown = self.ds.stat(dir.ino).map_or(0, |d| {
            i128::from(allocated_bytes(&d)) - i128::from(allocated_bytes(&dir))
        });
        match &made {
            Ok(i) => self.quota.adjust(grown + i128::from(allocated_bytes(i)), 0),
            Err(_) => self.quota.adjust(grown, -1),
        }
        let inode = made.map_err(fs_err)?;
        for (xname, acl) in [(XATTR_ACL_ACCESS, access), (XATTR_ACL_DEFAULT, default)] {
            if let Some(acl) = acl {
                self.ds
                    .setxattr(inode.ino, xname, &acl.encode(), XattrSetMode::Any)
                    .map_err(fs_err)?;
            }
        }
        self.stat(inode.ino)
    }
}
