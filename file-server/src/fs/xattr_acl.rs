//! Extended attributes and POSIX ACLs: who may read or write which namespace, and ACL
//! writes — validated, mapped to datastore ids, mirrored into the mode bits (and chmod
//! mirrored into the access ACL), as Linux filesystems do.

use std::io;

use posix_perm::acl::Acl;
use virtiofsd::filesystem::SetxattrFlags;
use vmfs::format::{Inode, S_IFDIR, S_IFMT, S_IFREG};
use vmfs::fs::FsError;
use vmfs::{SetAttr, XattrSetMode};

use super::base::{errno, fs_err, VmfsFs};
use super::perm::{
    Caller, MAY_READ, MAY_WRITE, S_ISGID, S_ISVTX, XATTR_ACL_ACCESS, XATTR_ACL_DEFAULT,
};

impl VmfsFs {
    pub(super) fn is_acl_name(name: &[u8]) -> bool {
        name == XATTR_ACL_ACCESS || name == XATTR_ACL_DEFAULT
    }

    /// Who may touch an xattr: ACLs and `user.*` follow Linux (`xattr_permission`);
    /// `trusted.*` and `security.*` are root's.
    pub(super) fn check_xattr(
        &self,
        c: &Caller,
        inode: &Inode,
        name: &[u8],
        write: bool,
    ) -> io::Result<()> {
        if Self::is_acl_name(name) {
            if write && !(c.is_root() || c.uid == inode.uid) {
                return Err(errno(libc::EPERM));
            }
            return Ok(());
        }
        if name.starts_with(b"trusted.") || name.starts_with(b"security.") {
            if !c.is_root() {
                return Err(errno(libc::EPERM));
            }
            return Ok(());
        }
        if name.starts_with(b"user.") {
            let t = inode.mode & S_IFMT;
            if t != S_IFREG && t != S_IFDIR {
                return Err(errno(if write { libc::EPERM } else { libc::ENODATA }));
            }
            if t == S_IFDIR
                && inode.mode & S_ISVTX != 0
                && write
                && !c.is_root()
                && c.uid != inode.uid
            {
                return Err(errno(libc::EPERM));
            }
            return self.check(c, inode, if write { MAY_WRITE } else { MAY_READ });
        }
        Err(errno(libc::EOPNOTSUPP))
    }

    /// chmod on a file with an access ACL updates the ACL's owner, mask (or group) and other
    /// entries, as Linux's `posix_acl_chmod`.
    pub(super) fn chmod_acl(&self, inode: &Inode, mode: u32) -> io::Result<()> {
        if inode.xattr_block == 0 {
            return Ok(());
        }
        if let Some(mut acl) = self.access_acl(inode)? {
            acl.apply_chmod(mode);
            self.ds
                .setxattr(
                    inode.ino,
                    XATTR_ACL_ACCESS,
                    &acl.encode(),
                    XattrSetMode::Any,
                )
                .map_err(fs_err)?;
        }
        Ok(())
    }

    /// setxattr of an ACL: validated, mirrored into the mode bits; an ACL equivalent to a
    /// mode is stored as the mode alone (as Linux filesystems do).
    pub(super) fn set_acl(
        &self,
        c: &Caller,
        i: &Inode,
        name: &[u8],
        value: &[u8],
        extra: SetxattrFlags,
    ) -> io::Result<()> {
        // Named entries hold guest ids: stored as datastore ids, like owners; an id outside
        // the share's maps cannot be named (EINVAL, as setxattr of an invalid ACL).
        let acl = Acl::parse(value)
            .and_then(|a| {
                a.map_ids(
                    |u| self.settings.uid_map.to_host(u),
                    |g| self.settings.gid_map.to_host(g),
                )
            })
            .ok()
            .flatten()
            .ok_or_else(|| errno(libc::EINVAL))?;
        if name == XATTR_ACL_DEFAULT {
            if !i.is_dir() {
                return Err(errno(libc::EACCES));
            }
            return self
                .ds
                .setxattr(i.ino, name, &acl.encode(), XattrSetMode::Any)
                .map_err(fs_err);
        }
        let mut mode = (i.mode & 0o7000) | acl.mode_bits();
        let kill_sgid = extra.contains(SetxattrFlags::SETXATTR_ACL_KILL_SGID)
            || (!c.is_root() && !c.in_group(i.gid));
        if kill_sgid {
            mode &= !S_ISGID;
        }
        let a = SetAttr {
            mode: Some(mode),
            ..SetAttr::default()
        };
        self.ds.setattr(i.ino, &a).map_err(fs_err)?;
        let r = if acl.equivalent_mode().is_some() {
            match self.ds.removexattr(i.ino, name) {
                Err(FsError::NoXattr) => Ok(()),
                r => r,
            }
        } else {
            self.ds
                .setxattr(i.ino, name, &acl.encode(), XattrSetMode::Any)
        };
        r.map_err(fs_err)?;
        self.settings.perm.invalidate_object(i.ino);
        Ok(())
    }
}
