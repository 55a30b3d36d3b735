//! SETATTR: ownership (through the id maps, Linux's chown rules), mode (setuid/setgid
//! dropping, the ACL mirror), size, timestamps — each with its permission rule.

use std::io;

use virtiofsd::filesystem::SetattrValid;
use virtiofsd::fuse;
use virtiofsd::soft_idmap::Id;
use vmfs::format::{Inode, S_IFMT, S_IFREG};
use vmfs::{SetAttr, TimeSet};

use super::base::{errno, fs_err, VmfsFs};
use super::perm::{Caller, MAY_WRITE, S_ISGID, S_ISUID, S_IXGRP};

impl VmfsFs {
    pub(super) fn do_setattr(
        &self,
        c: &Caller,
        inode: &Inode,
        attr: &fuse::SetattrIn,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<Inode> {
        let owner = c.is_root() || c.uid == inode.uid;
        let mut a = SetAttr::default();
        if valid.contains(SetattrValid::UID) || valid.contains(SetattrValid::GID) {
            let new_uid = if valid.contains(SetattrValid::UID) {
                let u = attr.uid.into_inner();
                Some(self.settings.uid_map.to_host(u).ok_or(errno(libc::EPERM))?)
            } else {
                None
            };
            let new_gid = if valid.contains(SetattrValid::GID) {
                let g = attr.gid.into_inner();
                Some(self.settings.gid_map.to_host(g).ok_or(errno(libc::EPERM))?)
            } else {
                None
            };
            if !c.is_root() {
                // Linux chown_ok / chgrp_ok: only root gives files away; an owner may change
                // the group to one of its own groups.
                if new_uid.is_some_and(|u| u != inode.uid || c.uid != inode.uid) {
                    return Err(errno(libc::EPERM));
                }
                if let Some(g) = new_gid {
                    if c.uid != inode.uid || (g != inode.gid && !c.in_group(g)) {
                        return Err(errno(libc::EPERM));
                    }
                }
            }
            a.uid = new_uid;
            a.gid = new_gid;
            // Changing the owner or group of a regular file drops setuid, and setgid when
            // group-executable (Linux does this in the filesystem, so the server must).
            if inode.mode & S_IFMT == S_IFREG && !valid.contains(SetattrValid::MODE) {
                let mut m = inode.mode & 0o7777;
                m &= !S_ISUID;
                if m & S_IXGRP != 0 {
                    m &= !S_ISGID;
                }
                if m != inode.mode & 0o7777 {
                    a.mode = Some(m);
                }
            }
        }
        if valid.contains(SetattrValid::MODE) {
            let mut m = attr.mode & 0o7777;
            let old = inode.mode & 0o7777;
            // A non-owner may only drop setuid/setgid (the kernel's kill-priv on write).
            let only_kills_priv = m == old & !(S_ISUID | S_ISGID) || m == old;
            if !owner {
                if !only_kills_priv {
                    return Err(errno(libc::EPERM));
                }
                // Linux drops these bits for a writer; anyone else may not.
                match handle {
                    Some(h) if self.handle(h, inode.ino)?.write => {}
                    _ => self.check(c, inode, MAY_WRITE)?,
                }
            }
            let gid = a.gid.unwrap_or(inode.gid);
            if !c.is_root() && !c.in_group(gid) {
                m &= !S_ISGID;
            }
            a.mode = Some(m);
        }
        if valid.contains(SetattrValid::SIZE) {
            if inode.is_dir() {
                return Err(errno(libc::EISDIR));
            }
            if inode.mode & S_IFMT != S_IFREG {
                return Err(errno(libc::EINVAL));
            }
            match handle {
                Some(h) if self.handle(h, inode.ino)?.write => {}
                _ => self.check(c, inode, MAY_WRITE)?,
            }
            if attr.size < inode.size {
                self.not_served_elsewhere(inode.ino)?;
            }
            a.size = Some(attr.size);
        }
        let explicit_times = (valid.contains(SetattrValid::ATIME)
            && !valid.contains(SetattrValid::ATIME_NOW))
            || (valid.contains(SetattrValid::MTIME) && !valid.contains(SetattrValid::MTIME_NOW));
        if valid.intersects(SetattrValid::ATIME | SetattrValid::MTIME) {
            if explicit_times {
                if !owner {
                    return Err(errno(libc::EPERM));
                }
            } else if !owner {
                self.check(c, inode, MAY_WRITE)?;
            }
            let t = |now: bool, s: u64, ns: u32| -> io::Result<TimeSet> {
                if now {
                    return Ok(TimeSet::Now);
                }
                if ns >= 1_000_000_000 {
                    return Err(errno(libc::EINVAL));
                }
                // Seconds are a signed 64-bit count on the wire; ns since the epoch must fit.
                i64::try_from(s)
                    .ok()
                    .and_then(|s| s.checked_mul(1_000_000_000))
                    .and_then(|v| v.checked_add(i64::from(ns)))
                    .map(TimeSet::At)
                    .ok_or_else(|| errno(libc::EOVERFLOW))
            };
            if valid.contains(SetattrValid::ATIME) {
                a.atime = Some(t(
                    valid.contains(SetattrValid::ATIME_NOW),
                    attr.atime,
                    attr.atimensec,
                )?);
            }
            if valid.contains(SetattrValid::MTIME) {
                a.mtime = Some(t(
                    valid.contains(SetattrValid::MTIME_NOW),
                    attr.mtime,
                    attr.mtimensec,
                )?);
            }
        }
        let out = self.ds.setattr(inode.ino, &a).map_err(fs_err)?;
        if let Some(m) = a.mode {
            self.chmod_acl(&out, m)?;
        }
        Ok(out)
    }
}
