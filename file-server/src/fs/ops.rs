//! The FUSE operations: virtiofsd's `FileSystem` trait on [`VmfsFs`], each operation
//! composed from the rooms below (node mapping and tables in `base`, checks in `perm`,
//! names and creation in `dir`, data in `io`, SETATTR in `attr`, xattrs and ACLs in
//! `xattr_acl`).

use std::ffi::{CStr, CString};
use std::io;
use std::time::Duration;

use posix_perm::acl::Acl;
use virtiofsd::filesystem::{
    Context, Entry, Extensions, FileSystem, FsOptions, GetxattrReply, ListxattrReply, OpenOptions,
    SerializableFileSystem, SetattrValid, SetxattrFlags, ZeroCopyReader, ZeroCopyWriter,
};
use virtiofsd::fuse;
use virtiofsd::soft_idmap::Id;
use vmfs::format::{S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFREG, S_IFSOCK};
use vmfs::fs::FsError;
use vmfs::{RenameFlags, Whence, XattrSetMode};

use super::base::{errno, fs_err, VmfsFs, OVERFLOW_ID};
use super::dir::{dt_of, name_bytes, new_name, DirIter, READDIR_ENTRIES_MAX};
use super::io::READ_BYTES_MAX;
use super::perm::{MAY_EXEC, MAY_READ, MAY_WRITE};
use crate::quota::write_bound;

impl FileSystem for VmfsFs {
    type Inode = u64;
    type Handle = u64;
    type DirIter = DirIter;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        // POSIX ACLs need DONT_MASK (the server applies the umask only when no default ACL
        // is inherited) and SETXATTR_EXT (the kill-sgid flag on ACL changes).
        let mut want = FsOptions::DO_READDIRPLUS | FsOptions::READDIRPLUS_AUTO;
        let acl = FsOptions::POSIX_ACL | FsOptions::DONT_MASK | FsOptions::SETXATTR_EXT;
        if capable.contains(acl) {
            want |= acl;
        }
        Ok(want)
    }

    fn destroy(&self) {
        if let Err(e) = self.ds.sync() {
            tracing::error!(err = %e, "commit at unmount failed");
        }
    }

    fn lookup(&self, ctx: Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let c = self.caller(&ctx)?;
        let dir = self.dir(parent)?;
        self.check(&c, &dir, MAY_EXEC)?;
        let b = name_bytes(name)?;
        let inode = match b {
            b"." => dir,
            b".." => {
                if dir.ino == self.root {
                    dir
                } else {
                    self.stat(dir.parent)?
                }
            }
            _ => self.ds.lookup_at(dir.ino, b).map_err(fs_err)?,
        };
        self.entry(&inode)
    }

    fn forget(&self, _ctx: Context, inode: u64, count: u64) {
        self.forget_node(inode, count);
    }

    fn getattr(
        &self,
        ctx: Context,
        inode: u64,
        _handle: Option<u64>,
    ) -> io::Result<(fuse::Attr, Duration)> {
        self.caller(&ctx)?;
        let i = self.stat(self.vino(inode)?)?;
        Ok((self.attr(&i), self.settings.cache.timeout()))
    }

    fn setattr(
        &self,
        ctx: Context,
        inode: u64,
        attr: fuse::SetattrIn,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(fuse::Attr, Duration)> {
        self.writable()?;
        let c = self.caller(&ctx)?;
        let i = self.stat(self.vino(inode)?)?;
        // Growing a file is sparse, but may move its bytes to a larger layout.
        let bound = if valid.contains(SetattrValid::SIZE) && attr.size > i.size {
            write_bound(&i, attr.size, 0)
        } else {
            0
        };
        let out = self.charged(&i, bound, || self.do_setattr(&c, &i, &attr, handle, valid))?;
        Ok((self.attr(&out), self.settings.cache.timeout()))
    }

    fn readlink(&self, ctx: Context, inode: u64) -> io::Result<Vec<u8>> {
        self.caller(&ctx)?;
        // The target is returned as stored and never followed here: the guest resolves it
        // against its own mount, so it cannot reach outside the share on the server.
        self.ds.readlink(self.vino(inode)?).map_err(fs_err)
    }

    fn symlink(
        &self,
        ctx: Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
        _extensions: Extensions,
    ) -> io::Result<Entry> {
        let target = linkname.to_bytes();
        if target.is_empty() {
            return Err(errno(libc::ENOENT));
        }
        if target.len() > vmfs::SYMLINK_MAX {
            return Err(errno(libc::ENAMETOOLONG));
        }
        let i = self.create_node(&ctx, parent, name, S_IFLNK | 0o777, 0, 0, Some(target))?;
        self.entry(&i)
    }

    fn mknod(
        &self,
        ctx: Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
        _extensions: Extensions,
    ) -> io::Result<Entry> {
        let t = mode & S_IFMT;
        let t = if t == 0 { S_IFREG } else { t };
        if ![S_IFREG, S_IFIFO, S_IFCHR, S_IFBLK, S_IFSOCK].contains(&t) {
            return Err(errno(libc::EINVAL));
        }
        if (t == S_IFCHR || t == S_IFBLK) && ctx.uid.into_inner() != 0 {
            return Err(errno(libc::EPERM));
        }
        let i = self.create_node(&ctx, parent, name, t | (mode & 0o7777), rdev, umask, None)?;
        self.entry(&i)
    }

    fn mkdir(
        &self,
        ctx: Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
        _extensions: Extensions,
    ) -> io::Result<Entry> {
        let i = self.create_node(
            &ctx,
            parent,
            name,
            S_IFDIR | (mode & 0o7777),
            0,
            umask,
            None,
        )?;
        self.entry(&i)
    }

    fn unlink(&self, ctx: Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        let name = new_name(name)?;
        let c = self.caller(&ctx)?;
        let dir = self.dir(parent)?;
        self.check(&c, &dir, MAY_WRITE | MAY_EXEC)?;
        let victim = self.ds.lookup_at(dir.ino, name).map_err(fs_err)?;
        Self::sticky_ok(&c, &dir, &victim)?;
        self.ds.unlink_at(dir.ino, name).map_err(fs_err)?;
        self.credit_if_freed(&victim);
        Ok(())
    }

    fn rmdir(&self, ctx: Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        let name = new_name(name)?;
        let c = self.caller(&ctx)?;
        let dir = self.dir(parent)?;
        self.check(&c, &dir, MAY_WRITE | MAY_EXEC)?;
        let victim = self.ds.lookup_at(dir.ino, name).map_err(fs_err)?;
        Self::sticky_ok(&c, &dir, &victim)?;
        self.ds.rmdir_at(dir.ino, name).map_err(fs_err)?;
        self.credit_if_freed(&victim);
        Ok(())
    }

    fn rename(
        &self,
        ctx: Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.writable()?;
        let known = libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE;
        if flags & !known != 0 {
            return Err(errno(libc::EINVAL));
        }
        let f = RenameFlags {
            noreplace: flags & libc::RENAME_NOREPLACE != 0,
            exchange: flags & libc::RENAME_EXCHANGE != 0,
        };
        if f.noreplace && f.exchange {
            return Err(errno(libc::EINVAL));
        }
        let (oldname, newname) = (new_name(oldname)?, new_name(newname)?);
        let c = self.caller(&ctx)?;
        let od = self.dir(olddir)?;
        let nd = self.dir(newdir)?;
        self.check(&c, &od, MAY_WRITE | MAY_EXEC)?;
        self.check(&c, &nd, MAY_WRITE | MAY_EXEC)?;
        let src = self.ds.lookup_at(od.ino, oldname).map_err(fs_err)?;
        Self::sticky_ok(&c, &od, &src)?;
        let dst = match self.ds.lookup_at(nd.ino, newname) {
            Ok(d) => Some(d),
            Err(FsError::NotFound(_)) => None,
            Err(e) => return Err(fs_err(e)),
        };
        if let Some(d) = &dst {
            Self::sticky_ok(&c, &nd, d)?;
        }
        // Moving a directory to another parent rewrites its "..": write access to it needed.
        if od.ino != nd.ino {
            if src.is_dir() {
                self.check(&c, &src, MAY_WRITE)?;
            }
            if f.exchange {
                if let Some(d) = dst.as_ref().filter(|d| d.is_dir()) {
                    self.check(&c, d, MAY_WRITE)?;
                }
            }
        }
        if self.quota.bytes_full() && od.ino != nd.ino {
            // A new entry in another directory may grow it.
            return Err(errno(libc::EDQUOT));
        }
        self.ds
            .rename_at(od.ino, oldname, nd.ino, newname, f)
            .map_err(fs_err)?;
        if let Some(d) = dst.as_ref().filter(|_| !f.exchange) {
            self.credit_if_freed(d);
        }
        Ok(())
    }

    fn link(&self, ctx: Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        self.writable()?;
        let newname = new_name(newname)?;
        let c = self.caller(&ctx)?;
        let src = self.stat(self.vino(inode)?)?;
        if src.is_dir() {
            return Err(errno(libc::EPERM));
        }
        let dir = self.dir(newparent)?;
        self.check(&c, &dir, MAY_WRITE | MAY_EXEC)?;
        if self.quota.bytes_full() {
            return Err(errno(libc::EDQUOT));
        }
        let i = self.charged(&dir, 0, || {
            self.ds.link_at(src.ino, dir.ino, newname).map_err(fs_err)
        })?;
        self.entry(&i)
    }

    fn open(
        &self,
        ctx: Context,
        inode: u64,
        _kill_priv: bool,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        let c = self.caller(&ctx)?;
        let i = self.stat(self.vino(inode)?)?;
        let (read, write) = self.open_grant(&c, &i, flags)?;
        self.charged(&i, 0, || self.truncate_on_open(&i, flags))?;
        let h = self.open_handle(i.ino, read, write)?;
        Ok((Some(h), OpenOptions::empty()))
    }

    fn create(
        &self,
        ctx: Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        _kill_priv: bool,
        flags: u32,
        umask: u32,
        _extensions: Extensions,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions)> {
        let c = self.caller(&ctx)?;
        let i = match self.create_node(
            &ctx,
            parent,
            name,
            S_IFREG | (mode & 0o7777),
            0,
            umask,
            None,
        ) {
            Ok(i) => i,
            Err(e)
                if e.raw_os_error() == Some(libc::EEXIST) && flags as i32 & libc::O_EXCL == 0 =>
            {
                let dir = self.dir(parent)?;
                let i = self
                    .ds
                    .lookup_at(dir.ino, new_name(name)?)
                    .map_err(fs_err)?;
                self.open_grant(&c, &i, flags)?;
                self.charged(&i, 0, || self.truncate_on_open(&i, flags))?;
                self.stat(i.ino)?
            }
            Err(e) => return Err(e),
        };
        let acc = flags as i32 & libc::O_ACCMODE;
        let read = acc == libc::O_RDONLY || acc == libc::O_RDWR;
        let write = acc == libc::O_WRONLY || acc == libc::O_RDWR;
        // The creator may write a file it just created whatever its mode (open(2) semantics).
        let h = self.open_handle(i.ino, read, write)?;
        let e = self.entry(&i)?;
        Ok((e, Some(h), OpenOptions::empty()))
    }

    fn read<W: ZeroCopyWriter>(
        &self,
        _ctx: Context,
        inode: u64,
        handle: u64,
        w: W,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _flags: u32,
    ) -> io::Result<usize> {
        let ino = self.vino(inode)?;
        let h = self.handle(handle, ino)?;
        if !h.read {
            return Err(errno(libc::EBADF));
        }
        // The guest names the size; it may not make the server read (and buffer) more than
        // one FUSE buffer's worth.
        let size = size.min(READ_BYTES_MAX);
        self.read_into(w, ino, offset, size)
    }

    fn write<R: ZeroCopyReader>(
        &self,
        _ctx: Context,
        inode: u64,
        handle: u64,
        r: R,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _delayed_write: bool,
        _kill_priv: bool,
        _flags: u32,
    ) -> io::Result<usize> {
        self.writable()?;
        let ino = self.vino(inode)?;
        let h = self.handle(handle, ino)?;
        if !h.write {
            return Err(errno(libc::EBADF));
        }
        self.write_from(r, ino, offset, size)
    }

    fn flush(&self, _ctx: Context, inode: u64, handle: u64, _lock_owner: u64) -> io::Result<()> {
        self.handle(handle, self.vino(inode)?).map(|_| ())
    }

    fn fsync(&self, _ctx: Context, inode: u64, _datasync: bool, handle: u64) -> io::Result<()> {
        self.handle(handle, self.vino(inode)?)?;
        self.ds.sync().map_err(fs_err)
    }

    fn fallocate(
        &self,
        _ctx: Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.writable()?;
        let ino = self.vino(inode)?;
        let h = self.handle(handle, ino)?;
        if !h.write {
            return Err(errno(libc::EBADF));
        }
        let keep = mode as i32 & libc::FALLOC_FL_KEEP_SIZE != 0;
        let punch = mode as i32 & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let known = libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE;
        if mode as i32 & !known != 0 || (punch && !keep) {
            return Err(errno(libc::EOPNOTSUPP));
        }
        if length == 0 {
            return Err(errno(libc::EINVAL));
        }
        // Absurd ranges are refused before any work: past the largest file, or more space
        // than the whole datastore has.
        if offset
            .checked_add(length)
            .is_none_or(|end| end > vmfs::format::FILE_BYTES_MAX)
        {
            return Err(errno(libc::EFBIG));
        }
        let i = self.stat(ino)?;
        if punch {
            self.not_served_elsewhere(ino)?;
            return self.charged(&i, 0, || {
                self.ds.punch_hole(ino, offset, length).map_err(fs_err)
            });
        }
        let st = self.ds.statfs().map_err(fs_err)?;
        if length > st.fb_total.saturating_mul(vmfs::format::FILE_BLOCK) {
            return Err(errno(libc::ENOSPC));
        }
        // One request may not allocate past the share's quota, however large.
        self.charged(&i, write_bound(&i, offset, length), || {
            self.ds.allocate(ino, offset, length, keep).map_err(fs_err)
        })
    }

    fn release(
        &self,
        _ctx: Context,
        _inode: u64,
        _flags: u32,
        handle: u64,
        _flush: bool,
        _flock_release: bool,
        _lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.close_handle(handle);
        Ok(())
    }

    fn statfs(&self, ctx: Context, _inode: u64) -> io::Result<libc::statvfs64> {
        self.caller(&ctx)?;
        let s = self.ds.statfs().map_err(fs_err)?;
        // SAFETY: statvfs64 is plain old data; all-zero is a valid value.
        let mut st: libc::statvfs64 = unsafe { std::mem::zeroed() };
        // Reported in file blocks: the unit space is allocated in (sub-blocks come out of
        // file blocks, so free file blocks are what any file can still grow by).
        let fb = vmfs::format::FILE_BLOCK;
        st.f_bsize = fb;
        st.f_frsize = fb;
        st.f_blocks = s.fb_total;
        st.f_bfree = s.fb_free;
        st.f_bavail = s.fb_free;
        st.f_files = s.fd_total;
        st.f_ffree = s.fd_free;
        st.f_favail = s.fd_free;
        st.f_namemax = vmfs::format::NAME_MAX as u64;
        // A share with limits looks like a file system of the limits' size (as `df` shows a
        // project quota on XFS), never larger than the datastore.
        let (bytes_used, inodes_used) = self.quota.used();
        let limits = self.quota.limits();
        if let Some(max) = limits.bytes {
            st.f_blocks = st.f_blocks.min(max / fb);
            let left = max.saturating_sub(bytes_used) / fb;
            st.f_bfree = st.f_bfree.min(left);
            st.f_bavail = st.f_bfree;
        }
        if let Some(max) = limits.inodes {
            st.f_files = st.f_files.min(max);
            st.f_ffree = st.f_ffree.min(max.saturating_sub(inodes_used));
            st.f_favail = st.f_ffree;
        }
        if self.settings.readonly {
            st.f_flag |= libc::ST_RDONLY;
        }
        Ok(st)
    }

    fn setxattr(
        &self,
        ctx: Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
        extra_flags: SetxattrFlags,
    ) -> io::Result<()> {
        self.writable()?;
        let c = self.caller(&ctx)?;
        let i = self.stat(self.vino(inode)?)?;
        let n = name.to_bytes();
        self.check_xattr(&c, &i, n, true)?;
        let mode = match flags as i32 {
            0 => XattrSetMode::Any,
            libc::XATTR_CREATE => XattrSetMode::CreateOnly,
            libc::XATTR_REPLACE => XattrSetMode::ReplaceOnly,
            _ => return Err(errno(libc::EINVAL)),
        };
        if Self::is_acl_name(n) {
            return self.set_acl(&c, &i, n, value, extra_flags);
        }
        self.ds.setxattr(i.ino, n, value, mode).map_err(fs_err)
    }

    fn getxattr(
        &self,
        ctx: Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        let c = self.caller(&ctx)?;
        let i = self.stat(self.vino(inode)?)?;
        let n = name.to_bytes();
        self.check_xattr(&c, &i, n, false)?;
        let mut v = self.ds.getxattr(i.ino, n).map_err(fs_err)?;
        if Self::is_acl_name(n) {
            // Stored in datastore ids; the guest sees its own (unmapped ones as the overflow
            // id, as owners are shown).
            let acl = Acl::parse(&v).map_err(|_| errno(libc::EIO))?;
            v = acl.encode_mapped(
                |u| self.settings.uid_map.to_guest(u).unwrap_or(OVERFLOW_ID),
                |g| self.settings.gid_map.to_guest(g).unwrap_or(OVERFLOW_ID),
            );
        }
        if size == 0 {
            Ok(GetxattrReply::Count(v.len() as u32))
        } else if v.len() > size as usize {
            Err(errno(libc::ERANGE))
        } else {
            Ok(GetxattrReply::Value(v))
        }
    }

    fn listxattr(&self, ctx: Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        self.caller(&ctx)?;
        let i = self.stat(self.vino(inode)?)?;
        let mut out = Vec::new();
        for n in self.ds.listxattr(i.ino).map_err(fs_err)? {
            out.extend_from_slice(&n);
            out.push(0);
        }
        if size == 0 {
            Ok(ListxattrReply::Count(out.len() as u32))
        } else if out.len() > size as usize {
            Err(errno(libc::ERANGE))
        } else {
            Ok(ListxattrReply::Names(out))
        }
    }

    fn removexattr(&self, ctx: Context, inode: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        let c = self.caller(&ctx)?;
        let i = self.stat(self.vino(inode)?)?;
        let n = name.to_bytes();
        self.check_xattr(&c, &i, n, true)?;
        self.ds.removexattr(i.ino, n).map_err(fs_err)?;
        self.settings.perm.invalidate_object(i.ino);
        Ok(())
    }

    fn opendir(
        &self,
        ctx: Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        let c = self.caller(&ctx)?;
        let d = self.dir(inode)?;
        let acc = flags as i32 & libc::O_ACCMODE;
        if acc != libc::O_RDONLY {
            return Err(errno(libc::EISDIR));
        }
        self.check(&c, &d, MAY_READ)?;
        let h = self.open_handle(d.ino, true, false)?;
        Ok((Some(h), OpenOptions::empty()))
    }

    fn readdir(
        &self,
        _ctx: Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
    ) -> io::Result<DirIter> {
        let ino = self.vino(inode)?;
        self.handle(handle, ino)?;
        let d = self.stat(ino)?;
        let max = (size as usize / 32).clamp(1, READDIR_ENTRIES_MAX);
        let mut entries = Vec::new();
        // "." and ".." come first, at cookies 1 and 2; datastore entries follow, their
        // cookies shifted by 2.
        if offset == 0 {
            entries.push((self.node(d.ino), 1, dt_of(S_IFDIR), c".".to_owned()));
        }
        if offset <= 1 {
            let parent = if d.ino == self.root { d.ino } else { d.parent };
            entries.push((self.node(parent), 2, dt_of(S_IFDIR), c"..".to_owned()));
        }
        let cookie = offset.saturating_sub(2);
        for e in self.ds.read_dir_from(d.ino, cookie, max).map_err(fs_err)? {
            let Ok(name) = CString::new(e.entry.name.clone()) else {
                continue;
            };
            let t = match self.ds.stat(e.entry.ino) {
                Ok(i) => dt_of(i.mode),
                Err(_) => continue,
            };
            entries.push((self.node(e.entry.ino), e.cookie + 2, t, name));
        }
        Ok(DirIter { entries, next: 0 })
    }

    fn fsyncdir(
        &self,
        _ctx: Context,
        _inode: u64,
        _datasync: bool,
        _handle: u64,
    ) -> io::Result<()> {
        self.ds.sync().map_err(fs_err)
    }

    fn releasedir(&self, _ctx: Context, _inode: u64, _flags: u32, handle: u64) -> io::Result<()> {
        self.close_handle(handle);
        Ok(())
    }

    fn access(&self, ctx: Context, inode: u64, mask: u32) -> io::Result<()> {
        let c = self.caller(&ctx)?;
        let i = self.stat(self.vino(inode)?)?;
        if mask as i32 == libc::F_OK {
            return Ok(());
        }
        self.check(&c, &i, (mask & 7) as u8)
    }

    fn lseek(
        &self,
        _ctx: Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        let ino = self.vino(inode)?;
        self.handle(handle, ino)?;
        let w = match whence as i32 {
            libc::SEEK_DATA => Whence::Data,
            libc::SEEK_HOLE => Whence::Hole,
            // The guest kernel handles SEEK_SET/CUR/END itself.
            _ => return Err(errno(libc::EINVAL)),
        };
        self.ds.seek(ino, offset, w).map_err(fs_err)
    }

    fn syncfs(&self, _ctx: Context, _inode: u64) -> io::Result<()> {
        self.ds.sync().map_err(fs_err)
    }
}

impl SerializableFileSystem for VmfsFs {}
