//! File data: READ and WRITE between guest memory and the datastore — zero-copy where the
//! bytes lie in place on the datastore's file, through a per-thread scratch file otherwise —
//! and truncation at open.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use virtiofsd::filesystem::{ZeroCopyReader, ZeroCopyWriter};
use vmfs::format::{Inode, S_IFMT, S_IFREG};
use vmfs::{Extent, SetAttr};

use super::base::{errno, fs_err, VmfsFs};
use crate::quota::write_bound;

/// Bytes read or written per scratch copy (resident data, unaligned writes): the FUSE limit
/// on one request's payload (virtiofsd's MAX_BUFFER_SIZE).
const SCRATCH_BYTES_MAX: usize = 1 << 20;
/// Bytes one READ returns at most: the protocol's buffer limit (virtiofsd's MAX_BUFFER_SIZE,
/// also the max_write announced at INIT).
pub const READ_BYTES_MAX: u32 = 1 << 20;
/// Bytes one WRITE may carry: the max_write virtiofsd's server announces at INIT (its
/// MAX_BUFFER_SIZE). A guest kernel never sends more; a larger one is hostile.
pub const WRITE_BYTES_MAX: u32 = 1 << 20;
/// Bytes the per-thread scratch file may keep between requests: one scratch copy is up to
/// SCRATCH_BYTES_MAX, and keeping that per polling thread would pin memory for nothing;
/// small copies (resident files, short unaligned writes) keep their pages.
pub const SCRATCH_KEEP_BYTES: u64 = 64 << 10;

std::thread_local! {
    /// Scratch file for data that is not readable in place (resident bytes, partial writes):
    /// virtiofsd's zero-copy readers and writers move bytes only between guest memory and a
    /// file, so small data takes a detour through this memfd.
    static SCRATCH: std::cell::RefCell<Option<File>> = const { std::cell::RefCell::new(None) };
    /// Bytes of the current READ's data buffer (the reply buffer past its header), set by the
    /// request handler; `None` when unknown. virtiofsd's zero-copy writer fills whole guest
    /// buffers, whatever count it is given, so the datastore file is read straight into
    /// guest memory only when the bytes to return fill the buffer exactly: otherwise bytes
    /// past the extent — other files' data, other VMs' disks — would reach the guest. It is
    /// the buffer's size, not the guest's `size`, that matters: the server clamps `size`.
    static READ_BUFFER: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Tells the file system the size of the current READ's data buffer (`None`: not known, so
/// every read goes through an exact-length copy).
pub fn set_read_buffer(bytes: Option<u64>) {
    READ_BUFFER.with(|c| c.set(bytes));
}

fn with_scratch<T>(f: impl FnOnce(&File) -> io::Result<T>) -> io::Result<T> {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.is_none() {
            // SAFETY: memfd_create reads the NUL-terminated name and returns a new fd or -1.
            let fd =
                unsafe { libc::memfd_create(c"strata-fs-scratch".as_ptr(), libc::MFD_CLOEXEC) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: fd is a fresh descriptor nothing else owns.
            *s = Some(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) });
        }
        let Some(file) = s.as_ref() else {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        };
        let r = f(file);
        // Shrink what a large copy left; a file that cannot be shrunk is dropped (its pages
        // go with it) and made again next time.
        let big = file.metadata().map(|m| m.len() > SCRATCH_KEEP_BYTES);
        if !matches!(big, Ok(false)) && file.set_len(0).is_err() {
            *s = None;
        }
        r
    })
}

/// Bytes the current thread's scratch file holds (tests check its bound).
#[cfg(test)]
pub(crate) fn scratch_bytes() -> u64 {
    SCRATCH.with(|s| {
        s.borrow()
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len())
    })
}
impl VmfsFs {
    pub(super) fn truncate_on_open(&self, inode: &Inode, flags: u32) -> io::Result<()> {
        if flags as i32 & libc::O_TRUNC != 0 && inode.mode & S_IFMT == S_IFREG && inode.size != 0 {
            let a = SetAttr {
                size: Some(0),
                ..SetAttr::default()
            };
            self.ds.setattr(inode.ino, &a).map_err(fs_err)?;
        }
        Ok(())
    }

    pub(super) fn read_into<W: ZeroCopyWriter>(
        &self,
        mut w: W,
        ino: u64,
        offset: u64,
        size: u32,
    ) -> io::Result<usize> {
        let mut plan = Vec::new();
        // The pin keeps the planned extents this file's until the reply is copied.
        let (total, _pin) = self
            .ds
            .read_plan(ino, offset, u64::from(size), &mut plan)
            .map_err(fs_err)?;
        let exact = READ_BUFFER.with(|c| c.get()) == Some(total);
        // Zero copy only when one extent fills exactly the guest's buffer (see READ_BUFFER).
        if exact && plan.len() == 1 {
            match &plan[0] {
                Extent::Device { offset, len } if *len == total => {
                    if let Some(f) = self.dev_file.as_ref() {
                        return w.read_from_file_at(f, *len as usize, *offset, None);
                    }
                }
                Extent::Zero { len } if *len == total => {
                    return w.read_from_file_at(&self.zero, *len as usize, 0, None);
                }
                _ => {}
            }
        }
        // Otherwise the reply is assembled in the scratch file, truncated to its exact
        // length, so the copy into guest memory stops there.
        with_scratch(|f| {
            f.set_len(0)?;
            let mut at = 0u64;
            let mut buf = Vec::new();
            for ext in &plan {
                match ext {
                    Extent::Device { offset, len } => {
                        let Some(dev) = self.dev_file.as_ref() else {
                            tracing::warn!("datastore has no file to read extents from");
                            return Err(errno(libc::EIO));
                        };
                        buf.resize(*len as usize, 0);
                        dev.read_exact_at(&mut buf, *offset)?;
                        f.write_all_at(&buf, at)?;
                        at += len;
                    }
                    Extent::Zero { len } => at += len,
                    Extent::Inline(data) => {
                        f.write_all_at(data, at)?;
                        at += data.len() as u64;
                    }
                }
            }
            debug_assert_eq!(at, total);
            f.set_len(at)?;
            w.read_from_file_at(f, at as usize, 0, None)
        })
    }

    pub(super) fn write_from<R: ZeroCopyReader>(
        &self,
        mut r: R,
        ino: u64,
        offset: u64,
        size: u32,
    ) -> io::Result<usize> {
        if size > WRITE_BYTES_MAX {
            return Err(errno(libc::EINVAL));
        }
        // The guest names the offset: a range that wraps or ends past the largest file is
        // refused here, before any datastore arithmetic on it.
        if offset
            .checked_add(u64::from(size))
            .is_none_or(|end| end > vmfs::format::FILE_BYTES_MAX)
        {
            return Err(errno(libc::EFBIG));
        }
        let len = size as usize;
        if let (Some(f), Ok(Some((dev_off, _pin)))) = (
            self.dev_file.as_ref(),
            self.ds.map_direct(ino, offset, u64::from(size)),
        ) {
            // Written space: the bytes go straight to the datastore (no metadata change but
            // the timestamps).
            let n = r.write_to_file_at(f, len, dev_off, None)?;
            self.ds.note_data_write(ino).map_err(fs_err)?;
            return Ok(n);
        }
        let mut buf = vec![0u8; len.min(SCRATCH_BYTES_MAX)];
        let n = with_scratch(|f| {
            let n = r.write_to_file_at(f, buf.len(), 0, None)?;
            f.read_exact_at(&mut buf[..n], 0)?;
            Ok(n)
        })?;
        // Only this path can allocate (the direct one writes blocks already there).
        let before = if self.quota.enabled() {
            Some(self.stat(ino)?)
        } else {
            None
        };
        let write = || self.ds.write_at(ino, offset, &buf[..n]).map_err(fs_err);
        match &before {
            Some(b) => self.charged(b, write_bound(b, offset, n as u64), write)?,
            None => write()?,
        };
        Ok(n)
    }
}
