//! Who may do what: the caller of a request (ids through the share's maps, supplementary
//! groups from its group source), its permission profile on an inode (the exact POSIX.1e
//! evaluation of `posix_perm`, cached per connection), and the rules built on it — access
//! checks, the sticky bit, the owner of new objects, the grant of an open.
//!
//! Every operation is checked here, on the server, as the caller described by the FUSE header:
//! the guest kernel checks too, but a guest is not trusted to. I/O on an open handle uses the
//! grant made at open (as SMB servers do), not a check per read or write.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use posix_perm::acl::Acl;
use posix_perm::cache::ProfileKey;
use posix_perm::eval::{profile, with_root_override, Cred, Object, Profile};
use virtiofsd::filesystem::Context;
use virtiofsd::soft_idmap::Id;
use vmfs::format::{Inode, S_IFDIR, S_IFMT};
use vmfs::fs::FsError;

use super::base::{errno, fs_err, VmfsFs};

/// Name of the access ACL xattr (Linux).
pub const XATTR_ACL_ACCESS: &[u8] = b"system.posix_acl_access";
/// Name of the default ACL xattr (Linux).
pub const XATTR_ACL_DEFAULT: &[u8] = b"system.posix_acl_default";

pub(super) const MAY_READ: u8 = 4;
pub(super) const MAY_WRITE: u8 = 2;
pub(super) const MAY_EXEC: u8 = 1;
pub(super) const S_ISUID: u32 = 0o4000;
pub(super) const S_ISGID: u32 = 0o2000;
pub(super) const S_ISVTX: u32 = 0o1000;
pub(super) const S_IXGRP: u32 = 0o010;

std::thread_local! {
    /// The vhost-user connection the current request came from (set by the request handler;
    /// FUSE's Context has no room for it). Keys per-VM state such as cached profiles.
    static CURRENT_CONN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Sets the connection whose requests this thread serves next.
pub fn set_current_conn(conn: u64) {
    CURRENT_CONN.with(|c| c.set(conn));
}

fn current_conn() -> u64 {
    CURRENT_CONN.with(|c| c.get())
}

/// The caller of one request, in datastore ids.
pub(super) struct Caller {
    pub(super) uid: u32,
    pub(super) gid: u32,
    groups: Arc<[u32]>,
    groups_epoch: u64,
}

impl Caller {
    pub(super) fn is_root(&self) -> bool {
        self.uid == 0
    }

    pub(super) fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.binary_search(&gid).is_ok()
    }

    fn cred(&self) -> Cred<'_> {
        Cred {
            uid: self.uid,
            gid: self.gid,
            groups: &self.groups,
        }
    }
}

impl VmfsFs {
    pub(super) fn caller(&self, ctx: &Context) -> io::Result<Caller> {
        let (guid, ggid) = (ctx.uid.into_inner(), ctx.gid.into_inner());
        let (Some(uid), Some(gid)) = (
            self.settings.uid_map.to_host(guid),
            self.settings.gid_map.to_host(ggid),
        ) else {
            self.counters.unmapped_ids.fetch_add(1, Ordering::Relaxed);
            return Err(errno(libc::EPERM));
        };
        let (groups, groups_epoch) = match &self.settings.groups {
            Some(src) => {
                let g = src.groups_of(uid, Instant::now());
                (g.ids, g.epoch)
            }
            None => (Arc::from(Vec::new()), 0),
        };
        Ok(Caller {
            uid,
            gid,
            groups,
            groups_epoch,
        })
    }

    pub(super) fn access_acl(&self, inode: &Inode) -> io::Result<Option<Acl>> {
        match self.ds.getxattr(inode.ino, XATTR_ACL_ACCESS) {
            Ok(v) => Acl::parse(v.as_slice())
                .map(Some)
                .map_err(|_| errno(libc::EIO)),
            Err(FsError::NoXattr) => Ok(None),
            Err(e) => Err(fs_err(e)),
        }
    }

    /// The caller's exact permission profile on `inode`, cached.
    pub(super) fn profile_of(&self, c: &Caller, inode: &Inode) -> io::Result<Profile> {
        let key = ProfileKey {
            vm: current_conn() as u32,
            ino: inode.ino,
            generation: inode.generation,
            uid: c.uid,
            gid: c.gid,
            groups_epoch: c.groups_epoch,
        };
        let now = Instant::now();
        if let Some(p) = self.settings.perm.get(&key, inode.attr_gen, now) {
            return Ok(p);
        }
        let acl = if inode.xattr_block != 0 {
            self.access_acl(inode)?
        } else {
            None
        };
        let obj = Object {
            uid: inode.uid,
            gid: inode.gid,
            mode: inode.mode,
        };
        let mut p = profile(&c.cred(), &obj, acl.as_ref());
        if c.is_root() {
            p = with_root_override(p, inode.is_dir(), inode.mode);
        }
        self.settings.perm.insert(&key, inode.attr_gen, p, now);
        Ok(p)
    }

    pub(super) fn check(&self, c: &Caller, inode: &Inode, want: u8) -> io::Result<()> {
        if self.profile_of(c, inode)?.allows(want) {
            Ok(())
        } else {
            self.counters.denied.fetch_add(1, Ordering::Relaxed);
            Err(errno(libc::EACCES))
        }
    }

    /// Sticky-directory rule (Linux `check_sticky`): in a sticky directory only the owner of
    /// the entry, of the directory, or root may remove or rename it.
    pub(super) fn sticky_ok(c: &Caller, dir: &Inode, victim: &Inode) -> io::Result<()> {
        if dir.mode & S_ISVTX != 0 && !c.is_root() && c.uid != dir.uid && c.uid != victim.uid {
            return Err(errno(libc::EPERM));
        }
        Ok(())
    }

    /// Owner and group of a new object in `parent` (BSD group semantics when the parent is
    /// setgid), and its mode with setgid dropped where Linux drops it.
    pub(super) fn new_owner(&self, c: &Caller, parent: &Inode, mut mode: u32) -> (u32, u32, u32) {
        let gid = if parent.mode & S_ISGID != 0 {
            if mode & S_IFMT == S_IFDIR {
                mode |= S_ISGID;
            }
            parent.gid
        } else {
            c.gid
        };
        if mode & S_IFMT != S_IFDIR
            && mode & S_ISGID != 0
            && mode & S_IXGRP != 0
            && !c.is_root()
            && !c.in_group(gid)
        {
            mode &= !S_ISGID;
        }
        (c.uid, gid, mode)
    }

    /// Checks open flags against the caller's profile; returns (read, write).
    pub(super) fn open_grant(
        &self,
        c: &Caller,
        inode: &Inode,
        flags: u32,
    ) -> io::Result<(bool, bool)> {
        let acc = flags as i32 & libc::O_ACCMODE;
        let read = acc == libc::O_RDONLY || acc == libc::O_RDWR;
        let write = acc == libc::O_WRONLY || acc == libc::O_RDWR;
        let trunc = flags as i32 & libc::O_TRUNC != 0;
        if (write || trunc) && self.settings.readonly {
            return Err(errno(libc::EROFS));
        }
        if (write || trunc) && inode.is_dir() {
            return Err(errno(libc::EISDIR));
        }
        let mut want = 0;
        if read {
            want |= MAY_READ;
        }
        if write || trunc {
            want |= MAY_WRITE;
        }
        self.check(c, inode, want)?;
        Ok((read, write))
    }
}
