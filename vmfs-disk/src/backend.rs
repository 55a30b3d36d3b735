//! A vmfs datastore file served as a virtual disk.
//!
//! Requests on written space (one allocated, zeroed file block) go straight to the datastore
//! device through the reactor's engine, like a raw image: the fast path costs one block-map
//! lookup. Writes that need allocation, zeroing or a pointer update are deferred: `start`
//! records them, and `end_batch` (called once per reactor loop iteration) hands all of them to
//! the datastore's batched scatter-gather path, so the metadata of every such write in the
//! batch joins one physical journal transaction (group commit), then completes them. The
//! transaction commits at the guest's next FLUSH, or after [`COMMIT_INTERVAL`], or when it
//! nears its size limit, so allocating writes do not pay two device flushes each.
//! Reads of holes and to-be-zeroed blocks, and requests spanning file blocks, run
//! synchronously.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use vmfs::format::FILE_BLOCK;
use vmfs::fs::{Datastore, WriteSeg};

use dataplane::backend::{rw_now, rw_op, BlockBackend, InlineIo, Started};
use dataplane::blk::request::{ParsedRequest, RequestKind};
use dataplane::blk::SECTOR_SIZE;
use dataplane::engine::IoEngine;

/// Deferred writes kept between `start` and `end_batch` before the list has to grow: one
/// reactor batch (POP_BATCH_MAX requests per queue) on a few queues.
const DEFERRED_CAPACITY: usize = 256;
/// File blocks whose device offsets are cached (8 bytes each): 1 Mi blocks = a 1 TiB disk in
/// 8 MiB of memory; blocks past this are looked up in the datastore on every I/O.
const MAP_CACHE_BLOCKS_MAX: u64 = 1 << 20;
/// Longest time allocating writes stay uncommitted when the guest does not flush: like a
/// filesystem's commit interval, it bounds what a crash can lose (a guest FLUSH commits at
/// once). Committing every batch instead costs two device flushes per batch.
pub const COMMIT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// Zero buffer for WRITE_ZEROES, written in pieces of this size.
const ZERO_CHUNK_BYTES: usize = 1 << 20;
/// Host buffer (one per reactor thread, allocated on first use) through which the datastore's
/// byte-slice API reads and writes guest data: guest memory may change under us at any time,
/// so it is never a Rust slice, only copied with raw copies. 4 MiB holds a typical batch of
/// allocating writes, so the batch stays one call (larger batches take several, all in the
/// same open journal transaction).
const BOUNCE_BYTES: usize = 4 << 20;

std::thread_local! {
    static BOUNCE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's bounce buffer (BOUNCE_BYTES long), or returns None if it is
/// already in use (impossible: nothing called from `f` comes back here).
fn with_bounce<R>(f: impl FnOnce(&mut [u8]) -> R) -> Option<R> {
    BOUNCE.with(|b| {
        let mut b = b.try_borrow_mut().ok()?;
        if b.len() != BOUNCE_BYTES {
            b.resize(BOUNCE_BYTES, 0);
        }
        Some(f(&mut b))
    })
}

/// A write waiting for the batch's journal commit.
#[derive(Debug)]
struct Deferred {
    thread: ThreadId,
    user_data: u64,
    offset: u64,
    iov: *const libc::iovec,
    iov_count: usize,
    len: u32,
}

// SAFETY: the iovec pointer refers to the reactor's request slot and guest memory kept mapped
// by it until the request completes; a Deferred is only ever consumed by the reactor thread
// that created it (`thread`), which is the thread owning that slot.
unsafe impl Send for Deferred {}

/// A datastore file as a block backend.
#[derive(Debug)]
pub struct VmfsBackend {
    ds: Arc<Datastore>,
    ino: u64,
    name: String,
    size: u64,
    read_only: bool,
    fd: Option<RawFd>,
    deferred: Mutex<Vec<Deferred>>,
    zeroes: Vec<u8>,
    /// Device offset + 1 of each file block known to be allocated and zeroed (0: unknown).
    /// The file's blocks never move or go away while `_lease` lives (vmfs refuses to shrink,
    /// truncate, punch or remove it, whoever asks), and to-be-zeroed blocks only ever become
    /// zeroed, so an entry stays valid.
    map_cache: Box<[AtomicU64]>,
    /// vmfs's extent lease on the file, for as long as it is served.
    _lease: vmfs::fs::ExtentLease,
    /// The file is small (resident or sub-block layout): writes go through the datastore's
    /// general write path, one segment at a time, instead of the batched file-block path.
    small: bool,
    /// Which direct-path requests run on the reactor thread (from the device's fd: O_DIRECT,
    /// RWF_NOWAIT support).
    inline: InlineIo,
}

impl VmfsBackend {
    /// Serves file `ino` of `ds` (already opened with [`Datastore::open`], which keeps it
    /// from being removed or shrunk while served).
    pub fn new(ds: Arc<Datastore>, ino: u64, name: &str, read_only: bool) -> Result<Self, String> {
        let lease = ds.lease_extents(ino).map_err(|e| e.to_string())?;
        let inode = ds.stat(ino).map_err(|e| e.to_string())?;
        if inode.is_dir() {
            return Err(format!("{name} is a directory"));
        }
        let size = inode.size - inode.size % SECTOR_SIZE;
        if size == 0 {
            return Err(format!("{name} is empty"));
        }
        let fd = ds.device().raw_fd();
        Ok(VmfsBackend {
            ds,
            ino,
            name: name.to_string(),
            size,
            read_only,
            fd,
            deferred: Mutex::new(Vec::with_capacity(DEFERRED_CAPACITY)),
            zeroes: vec![0u8; ZERO_CHUNK_BYTES],
            inline: fd.map(InlineIo::probe).unwrap_or_default(),
            small: inode.layout != vmfs::format::DataLayout::FileBlocks,
            map_cache: (0..size.div_ceil(FILE_BLOCK).min(MAP_CACHE_BLOCKS_MAX))
                .map(|_| AtomicU64::new(0))
                .collect(),
            _lease: lease,
        })
    }

    /// The datastore.
    pub fn datastore(&self) -> &Arc<Datastore> {
        &self.ds
    }

    fn errno(e: &vmfs::fs::FsError) -> i32 {
        match e {
            vmfs::fs::FsError::NoSpace(_) => -libc::ENOSPC,
            _ => -libc::EIO,
        }
    }

    /// Reads through the datastore (holes and to-be-zeroed blocks read as zeroes) into the
    /// bounce buffer, then copies into guest memory.
    fn read_sync(&self, req: &ParsedRequest) -> i32 {
        let r = with_bounce(|bounce| {
            let mut offset = req.offset_bytes();
            for iov in &req.iov[..req.iov_count] {
                let mut done = 0;
                while done < iov.iov_len {
                    let n = (iov.iov_len - done).min(bounce.len());
                    let got = match self.ds.read(self.ino, offset, &mut bounce[..n]) {
                        Ok(got) => got.min(n),
                        Err(e) => {
                            tracing::warn!(file = %self.name, err = %e, "read failed");
                            return Self::errno(&e);
                        }
                    };
                    // Past the file's end: zeroes, never an earlier request's bytes.
                    bounce[got..n].fill(0);
                    // SAFETY: the parser checked that the iovec lies in one guest memory
                    // region, kept mapped by the slot's snapshot during this call; done + n
                    // <= iov_len; the bounce buffer is host memory, so the ranges are
                    // disjoint. A raw copy: no reference to guest memory is formed.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            bounce.as_ptr(),
                            iov.iov_base.cast::<u8>().add(done),
                            n,
                        )
                    };
                    done += n;
                    offset += n as u64;
                }
            }
            i32::try_from(req.data_len).unwrap_or(i32::MAX)
        });
        r.unwrap_or(-libc::EIO)
    }

    /// Writes segments through the datastore: small files one segment at a time through the
    /// general path; file-block files through the batched path, either committed now or, when
    /// `deferred`, left in the open transaction (committed at FLUSH or after the interval).
    fn write_segs(&self, segs: &[WriteSeg<'_>], deferred: bool) -> Result<(), vmfs::fs::FsError> {
        if self.small {
            segs.iter()
                .try_for_each(|s| self.ds.write(s.ino, s.offset, s.data))
        } else if deferred {
            self.ds
                .write_batch_deferred(segs)
                .and_then(|()| self.ds.commit_if_older(COMMIT_INTERVAL))
        } else {
            self.ds.write_batch(segs)
        }
    }

    /// Copies the deferred writes' guest data into `bounce` and writes it through the batched
    /// path, one call per bounce-buffer fill; Err(-errno) if any part failed.
    fn write_deferred(&self, mine: &[Deferred], bounce: &mut [u8]) -> Result<(), i32> {
        // (file offset, bounce offset, length) of each piece in the bounce buffer.
        let mut pieces: Vec<(u64, usize, usize)> = Vec::with_capacity(mine.len() * 2);
        let mut used = 0usize;
        let flush = |pieces: &mut Vec<(u64, usize, usize)>, bounce: &[u8]| {
            let segs: Vec<WriteSeg<'_>> = pieces
                .drain(..)
                .map(|(offset, at, len)| WriteSeg {
                    ino: self.ino,
                    offset,
                    data: &bounce[at..at + len],
                })
                .collect();
            self.write_segs(&segs, true).map_err(|e| {
                tracing::warn!(file = %self.name, err = %e, requests = mine.len(), "batched write failed");
                Self::errno(&e)
            })
        };
        for d in mine {
            let mut off = d.offset;
            for k in 0..d.iov_count {
                // SAFETY: see `Deferred`: the slot's iovec array stays valid until this
                // request's completion is injected; the iovec is copied out (host memory).
                let iov = unsafe { d.iov.add(k).read() };
                let mut done = 0;
                while done < iov.iov_len {
                    if used == bounce.len() {
                        flush(&mut pieces, bounce)?;
                        used = 0;
                    }
                    let n = (iov.iov_len - done).min(bounce.len() - used);
                    // SAFETY: the parser checked that the iovec lies in one guest memory
                    // region, kept mapped until the request completes; done + n <= iov_len
                    // and used + n <= bounce.len(); guest and host buffers are disjoint. A
                    // raw copy: no reference to guest memory is formed.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            iov.iov_base.cast::<u8>().add(done).cast_const(),
                            bounce.as_mut_ptr().add(used),
                            n,
                        )
                    };
                    pieces.push((off, used, n));
                    used += n;
                    done += n;
                    off += n as u64;
                }
            }
        }
        if pieces.is_empty() {
            return Ok(());
        }
        flush(&mut pieces, bounce)
    }

    fn write_zeroes(&self, req: &ParsedRequest) -> i32 {
        let mut segs = Vec::new();
        let mut off = req.offset_bytes();
        let end = off + req.len_bytes();
        while off < end {
            let n = (end - off).min(ZERO_CHUNK_BYTES as u64) as usize;
            segs.push(WriteSeg {
                ino: self.ino,
                offset: off,
                data: &self.zeroes[..n],
            });
            off += n as u64;
        }
        match self.write_segs(&segs, false) {
            Ok(()) => 0,
            Err(e) => Self::errno(&e),
        }
    }

    /// Pushes `op` on `fd`-relative offset `dev_offset`.
    fn push(
        &self,
        engine: &mut dyn IoEngine,
        req: &ParsedRequest,
        dev_offset: u64,
        ud: u64,
    ) -> Started {
        let Some(fd) = self.fd else {
            return Started::Done(-libc::EIO);
        };
        if self.inline.applies(req.kind) {
            return Started::Done(rw_now(fd, req, dev_offset));
        }
        let op = rw_op(fd, req, dev_offset);
        // SAFETY: the iovecs live in the reactor's slot until this user_data completes; the
        // buffers are guest memory kept mapped by the slot's snapshot; the target range lies
        // within one allocated file block of this (open, so never freed) file.
        match unsafe { engine.push(op, ud) } {
            Ok(()) => Started::Submitted(1),
            Err(_) => Started::Done(-libc::EAGAIN),
        }
    }

    fn direct(&self, req: &ParsedRequest) -> Option<u64> {
        self.fd?;
        let off = req.offset_bytes();
        let len = req.len_bytes();
        if len == 0 || (off + len - 1) / FILE_BLOCK != off / FILE_BLOCK {
            return None;
        }
        let fbi = off / FILE_BLOCK;
        let cached = self.map_cache.get(fbi as usize);
        if let Some(c) = cached {
            let v = c.load(Ordering::Relaxed);
            if v != 0 {
                return Some(v - 1 + off % FILE_BLOCK);
            }
        }
        // The backend's own lease (`_lease`) keeps the block mapped; the per-call pin is
        // redundant here and dropped at once.
        let (at, _) = self.ds.map_direct(self.ino, off, len).ok().flatten()?;
        // vmfs range-checks the block numbers it decodes; this bound keeps the io_uring path,
        // which bypasses the device's own range check, inside the datastore regardless.
        if at
            .checked_add(len)
            .is_none_or(|end| end > self.ds.device().size())
        {
            return None;
        }
        if let Some(c) = cached {
            c.store(at - off % FILE_BLOCK + 1, Ordering::Relaxed);
        }
        Some(at)
    }
}

impl BlockBackend for VmfsBackend {
    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn supports_discard(&self) -> bool {
        !self.read_only
    }

    fn block_size(&self) -> u32 {
        512
    }

    fn start(&self, req: &ParsedRequest, engine: &mut dyn IoEngine, user_data: u64) -> Started {
        match req.kind {
            RequestKind::Read => match self.direct(req) {
                Some(at) => self.push(engine, req, at, user_data),
                None => Started::Done(self.read_sync(req)),
            },
            RequestKind::Write => {
                if req.len_bytes() == 0 {
                    return Started::Done(0);
                }
                if let Some(at) = self.direct(req) {
                    return self.push(engine, req, at, user_data);
                }
                let d = Deferred {
                    thread: std::thread::current().id(),
                    user_data,
                    offset: req.offset_bytes(),
                    iov: req.iov.as_ptr(),
                    iov_count: req.iov_count,
                    len: req.data_len,
                };
                match self.deferred.lock() {
                    Ok(mut v) => {
                        v.push(d);
                        Started::Submitted(1)
                    }
                    Err(_) => Started::Done(-libc::EIO),
                }
            }
            RequestKind::Flush => {
                // Journal commits are durable when they return; a device flush makes the
                // direct-path data durable too.
                let r = match self.ds.sync() {
                    Ok(()) => 0,
                    Err(e) => Self::errno(&e),
                };
                Started::Done(r)
            }
            // Discard is advisory: blocks stay allocated (thin reclamation comes with UNMAP
            // support in the datastore).
            RequestKind::Discard => Started::Done(0),
            RequestKind::WriteZeroes { .. } => Started::Done(self.write_zeroes(req)),
            RequestKind::GetId => Started::Done(0),
        }
    }

    fn end_batch(&self, engine: &mut dyn IoEngine) {
        let me = std::thread::current().id();
        let mine: Vec<Deferred> = match self.deferred.lock() {
            Ok(mut v) => {
                if v.is_empty() {
                    return;
                }
                let (mine, others): (Vec<Deferred>, Vec<Deferred>) =
                    v.drain(..).partition(|d| d.thread == me);
                *v = others;
                mine
            }
            Err(_) => return,
        };
        if mine.is_empty() {
            return;
        }
        let result =
            with_bounce(|bounce| self.write_deferred(&mine, bounce)).unwrap_or(Err(-libc::EIO));
        for d in &mine {
            let r = match result {
                Ok(()) => i32::try_from(d.len).unwrap_or(i32::MAX),
                Err(errno) => errno,
            };
            engine.inject(d.user_data, r);
        }
    }

    fn flush_sync(&self) -> std::io::Result<()> {
        self.ds.sync().map_err(std::io::Error::other)
    }

    fn describe(&self) -> String {
        format!(
            "vmfs file {} ({} bytes{})",
            self.name,
            self.size,
            if self.read_only { ", read-only" } else { "" }
        )
    }
}

impl Drop for VmfsBackend {
    fn drop(&mut self) {
        self.ds.close(self.ino);
    }
}

#[cfg(test)]
mod lease_tests {
    use vmfs::device::SimDisk;
    use vmfs::format::Provisioning;
    use vmfs::fs::{FsError, MkfsOptions};
    use vmfs::SetAttr;

    use super::*;

    /// Issue 12 finding 2: while a file is served, its blocks stay put whoever asks vmfs to
    /// truncate (the file server's O_TRUNC path calls `setattr`) or punch it: the map cache
    /// and in-flight I/O rely on it.
    #[test]
    fn served_file_cannot_be_truncated_or_punched_by_anyone() {
        let disk = Arc::new(SimDisk::new(64 << 20));
        Datastore::mkfs(disk.clone(), &MkfsOptions { uuid: None }, &mut |_, _| {}).unwrap();
        let ds = Arc::new(Datastore::mount(disk).unwrap());
        let ino = ds
            .create_file("disk.img", Provisioning::Thin, 4 << 20, &mut |_, _| {})
            .unwrap();
        ds.write(ino, 1 << 20, &[9u8; 1 << 20]).unwrap();
        // As stratad serves a disk: open, then the backend.
        ds.open(ino).unwrap();
        let b = VmfsBackend::new(ds.clone(), ino, "disk.img", false).unwrap();
        let at = ds.map_direct(ino, 1 << 20, 4096).unwrap().unwrap().0;
        let trunc = SetAttr {
            size: Some(0),
            ..SetAttr::default()
        };
        assert!(matches!(ds.setattr(ino, &trunc), Err(FsError::Busy(_))));
        assert!(matches!(
            ds.punch_hole(ino, 1 << 20, 1 << 20),
            Err(FsError::Busy(_))
        ));
        assert_eq!(ds.stat(ino).unwrap().size, 4 << 20);
        assert_eq!(ds.map_direct(ino, 1 << 20, 4096).unwrap().unwrap().0, at);
        drop(b);
        ds.setattr(ino, &trunc).unwrap();
    }
}
