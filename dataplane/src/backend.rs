//! Block backends: what a virtual disk is stored on.
//!
//! A backend turns a validated request into engine operations ([`BlockBackend::start`]) or
//! completes it at once. Raw image files and block devices ([`RawBackend`]) map a request to one
//! operation on one descriptor; the [`NullBackend`] completes everything immediately (for
//! benchmarks, like QEMU's null-co). A datastore file (vmfs, crate `vmfs-disk`) plugs in the
//! same way: it maps the request's byte range to extents and may return several operations
//! ([`Started::Submitted`] carries their count), or hand the request to another thread and
//! deliver its completion later through the reactor's [`OffloadSink`] (see
//! [`BlockBackend::attach`]).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::blk::request::{ParsedRequest, RequestKind};
use crate::blk::SECTOR_SIZE;
use crate::engine::{IoEngine, IoOp};
use crate::offload::OffloadSink;

/// Errors opening a backend.
#[derive(Debug, Error)]
pub enum BackendError {
    /// The image could not be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// Image path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Another process holds the image's lock.
    #[error("{0} is in use by another process (locked)")]
    Locked(PathBuf),
    /// The image is smaller than one sector.
    #[error("{0} is empty (size below 512 bytes)")]
    Empty(PathBuf),
    /// A size that cannot be served.
    #[error("invalid size: {0}")]
    InvalidSize(String),
}

/// How a request was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    /// This many operations were pushed to the engine with the request's user_data; the request
    /// completes when all have completed.
    Submitted(u16),
    /// Finished at once: bytes transferred (>= 0) or -errno.
    Done(i32),
}

/// Largest number of engine operations one request may need; the reactor keeps this much
/// engine capacity free before it starts a request.
pub const OPS_PER_REQUEST_MAX: usize = 1;

/// The read or write operation for a validated Read/Write request at device offset `offset`.
pub fn rw_op(fd: std::os::fd::RawFd, req: &ParsedRequest, offset: u64) -> IoOp {
    let iov = req.iov.as_ptr();
    let iov_count = req.iov_count as u32;
    if req.kind == RequestKind::Read {
        IoOp::Readv {
            fd,
            iov,
            iov_count,
            offset,
        }
    } else {
        IoOp::Writev {
            fd,
            iov,
            iov_count,
            offset,
        }
    }
}

/// Runs a validated Read or Write request at device offset `offset` with preadv/pwritev on the
/// calling thread (see [`InlineIo`] for when); returns bytes transferred or -errno.
pub fn rw_now(fd: std::os::fd::RawFd, req: &ParsedRequest, offset: u64) -> i32 {
    debug_assert!(matches!(req.kind, RequestKind::Read | RequestKind::Write));
    // SAFETY: the iovecs come from the parser (bounds-checked guest memory, kept mapped by the
    // caller's memory snapshot for the duration of this call); iov_count ≤ SEG_MAX.
    unsafe { crate::engine::sync::execute(rw_op(fd, req, offset)) }
}

/// Which reads and writes of a file a backend runs on the reactor thread ([`rw_now`]) rather
/// than through io_uring, because io_uring would hand each to an io-wq worker thread:
/// - buffered writes: io_uring cannot attempt them without blocking; on the 2-core
///   measurement machine that cost 45–50 µs of CPU per 4 KiB write (19.7 k IOPS) against 19 µs
///   inline (50.5 k IOPS; QSD 29–33 k) — `strata-bench --backend raw --workload randwrite`;
/// - buffered reads of files that refuse `RWF_NOWAIT` (EOPNOTSUPP: tmpfs/shmem on Linux 6.1,
///   for one): a raw image on tmpfs read at 5.3 µs of server CPU per 4 KiB read through
///   io_uring (QSD: 4.9) against 1.9 inline — `strata-bench --backend raw --workload randread`.
///   Files that accept it stay on io_uring, whose submit completes page-cache hits inline.
///
/// O_DIRECT files keep everything on io_uring.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InlineIo {
    /// Writes run inline.
    pub writes: bool,
    /// Reads run inline.
    pub reads: bool,
}

impl InlineIo {
    /// The policy for `fd`, from its open flags (O_DIRECT) and a RWF_NOWAIT probe.
    pub fn probe(fd: std::os::fd::RawFd) -> Self {
        // SAFETY: F_GETFL on a descriptor has no memory effects.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        let buffered = flags >= 0 && flags & libc::O_DIRECT == 0;
        InlineIo {
            writes: buffered,
            reads: buffered && !supports_nowait_reads(fd),
        }
    }

    /// Whether a request of `kind` runs inline.
    pub fn applies(&self, kind: RequestKind) -> bool {
        match kind {
            RequestKind::Read => self.reads,
            RequestKind::Write => self.writes,
            _ => false,
        }
    }
}

/// Whether buffered reads of `fd` can be attempted without blocking (`RWF_NOWAIT`), which is
/// what lets io_uring complete a page-cache hit inline at submit (see [`InlineIo`]).
fn supports_nowait_reads(fd: std::os::fd::RawFd) -> bool {
    let mut byte = [0u8; 1];
    let iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: byte.len(),
    };
    // SAFETY: one iovec over a local 1-byte buffer that outlives the call.
    let rc = unsafe { libc::preadv2(fd, &iov, 1, 0, libc::RWF_NOWAIT) };
    rc >= 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN)
}

/// A virtual disk's storage.
pub trait BlockBackend: Send + Sync + std::fmt::Debug {
    /// Size in bytes (a multiple of 512).
    fn size_bytes(&self) -> u64;
    /// True if writes are refused.
    fn read_only(&self) -> bool;
    /// True if DISCARD and WRITE_ZEROES are supported.
    fn supports_discard(&self) -> bool;
    /// True if a discarded range reads back as zeroes (a SCSI unit then reports LBPRZ);
    /// false where DISCARD is only advisory.
    fn discard_zeroes(&self) -> bool {
        false
    }
    /// Logical block size advertised to the guest.
    fn block_size(&self) -> u32;
    /// Starts `req` (already validated against this backend's size and mode).
    fn start(&self, req: &ParsedRequest, engine: &mut dyn IoEngine, user_data: u64) -> Started;
    /// Called by a reactor after it has started a batch of requests and before it submits
    /// them: a backend that deferred requests ([`Started::Submitted`] without pushing the
    /// operations) finishes them here — with [`IoEngine::inject`] or by pushing operations — or
    /// hands them to another thread, which posts their completions to the reactor's
    /// [`OffloadSink`]. Must not block: the reactor serves other disks.
    fn end_batch(&self, _engine: &mut dyn IoEngine) {}
    /// Called on a reactor's thread when it starts serving one of this backend's queues:
    /// `sink` takes completions of requests the backend finishes on another thread (it
    /// answered them [`Started::Submitted`] and pushed nothing), and delivers them to that
    /// reactor. One sink per reactor; [`OffloadSink::owner`] tells which.
    fn attach(&self, _sink: &OffloadSink) {}
    /// Makes all completed writes durable (used at shutdown).
    fn flush_sync(&self) -> std::io::Result<()>;
    /// A one-line description for logs.
    fn describe(&self) -> String;
}

/// A raw image file or block device.
#[derive(Debug)]
pub struct RawBackend {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
    direct: bool,
    block_device: bool,
    /// Which requests run on the reactor thread.
    inline: InlineIo,
}

impl RawBackend {
    /// Opens `path` (O_DIRECT when `direct`), takes an exclusive advisory lock (shared when
    /// read-only) so two daemons cannot serve one image, and sizes it.
    pub fn open(path: &Path, read_only: bool, direct: bool) -> Result<Self, BackendError> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(!read_only);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let open_err = |source| BackendError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut file = opts.open(path).map_err(open_err)?;
        let lock = if read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a descriptor we own has no memory effects.
        if unsafe { libc::flock(file.as_raw_fd(), lock | libc::LOCK_NB) } != 0 {
            return Err(BackendError::Locked(path.to_path_buf()));
        }
        let meta = file.metadata().map_err(open_err)?;
        let block_device = meta.file_type().is_block_device();
        let len = file.seek(SeekFrom::End(0)).map_err(open_err)?;
        let size = len - len % SECTOR_SIZE;
        if size == 0 {
            return Err(BackendError::Empty(path.to_path_buf()));
        }
        let inline = InlineIo::probe(file.as_raw_fd());
        Ok(RawBackend {
            file,
            path: path.to_path_buf(),
            size,
            read_only,
            direct,
            block_device,
            inline,
        })
    }
}

impl BlockBackend for RawBackend {
    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn supports_discard(&self) -> bool {
        !self.read_only
    }

    fn discard_zeroes(&self) -> bool {
        // DISCARD punches a hole, which reads back as zeroes (files and block devices alike).
        !self.read_only
    }

    fn block_size(&self) -> u32 {
        // O_DIRECT needs guest I/O aligned to the host's logical block; 4 KiB covers 512e and
        // 4Kn devices. Buffered I/O accepts any sector.
        if self.direct {
            4096
        } else {
            512
        }
    }

    fn start(&self, req: &ParsedRequest, engine: &mut dyn IoEngine, user_data: u64) -> Started {
        let fd = self.file.as_raw_fd();
        if self.inline.applies(req.kind) && req.len_bytes() > 0 {
            return Started::Done(rw_now(fd, req, req.offset_bytes()));
        }
        let op = match req.kind {
            RequestKind::Read | RequestKind::Write => rw_op(fd, req, req.offset_bytes()),
            RequestKind::Flush => IoOp::Fsync { fd },
            RequestKind::Discard | RequestKind::WriteZeroes { unmap: true } => IoOp::Fallocate {
                fd,
                mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset: req.offset_bytes(),
                len: req.len_bytes(),
            },
            RequestKind::WriteZeroes { unmap: false } => IoOp::Fallocate {
                fd,
                // Files: punching a hole reads back zeroes on every Linux filesystem, where
                // ZERO_RANGE is missing on some (tmpfs). Devices: ZERO_RANGE is BLKZEROOUT.
                mode: if self.block_device {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                },
                offset: req.offset_bytes(),
                len: req.len_bytes(),
            },
            RequestKind::GetId => return Started::Done(0),
        };
        if req.len_bytes() == 0
            && matches!(
                req.kind,
                RequestKind::Read
                    | RequestKind::Write
                    | RequestKind::Discard
                    | RequestKind::WriteZeroes { .. }
            )
        {
            return Started::Done(0);
        }
        // SAFETY: the iovecs live in the reactor's request slot, which is not reused before the
        // completion for `user_data` is reaped; the buffers are in guest memory kept mapped by
        // the slot's memory snapshot.
        match unsafe { engine.push(op, user_data) } {
            Ok(()) => Started::Submitted(1),
            Err(_) => Started::Done(-libc::EAGAIN),
        }
    }

    fn flush_sync(&self) -> std::io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn describe(&self) -> String {
        format!(
            "raw {} ({} bytes{}{}{}{})",
            self.path.display(),
            self.size,
            if self.read_only { ", read-only" } else { "" },
            if self.direct { ", O_DIRECT" } else { "" },
            if self.inline.reads {
                ", inline reads"
            } else {
                ""
            },
            if self.block_device {
                ", block device"
            } else {
                ""
            }
        )
    }
}

/// A disk that stores nothing: writes are dropped, reads return zeroes (or leave the buffer
/// untouched with `read_zeroes = false`, like null-co's default).
#[derive(Debug)]
pub struct NullBackend {
    size: u64,
    read_zeroes: bool,
}

impl NullBackend {
    /// A null disk of `size` bytes (rounded down to sectors, at least one sector).
    pub fn new(size: u64, read_zeroes: bool) -> Result<Self, BackendError> {
        let size = size - size % SECTOR_SIZE;
        if size == 0 {
            return Err(BackendError::InvalidSize(
                "null disk must be at least 512 bytes".into(),
            ));
        }
        Ok(NullBackend { size, read_zeroes })
    }
}

impl BlockBackend for NullBackend {
    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        false
    }

    fn supports_discard(&self) -> bool {
        true
    }

    fn discard_zeroes(&self) -> bool {
        self.read_zeroes
    }

    fn block_size(&self) -> u32 {
        512
    }

    fn start(&self, req: &ParsedRequest, _engine: &mut dyn IoEngine, _user_data: u64) -> Started {
        if req.kind == RequestKind::Read && self.read_zeroes {
            for iov in &req.iov[..req.iov_count] {
                // SAFETY: the parser derived each iovec from a bounds-checked guest memory
                // slice that the caller keeps mapped; the guest gave us these bytes to write.
                unsafe { std::ptr::write_bytes(iov.iov_base.cast::<u8>(), 0, iov.iov_len) };
            }
        }
        Started::Done(i32::try_from(req.data_len).unwrap_or(i32::MAX))
    }

    fn flush_sync(&self) -> std::io::Result<()> {
        Ok(())
    }

    fn describe(&self) -> String {
        format!("null ({} bytes)", self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_open_sizes_and_locks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.img");
        let f = File::create(&p).unwrap();
        f.set_len(1024 * 1024 + 100).unwrap();
        let b = RawBackend::open(&p, false, false).unwrap();
        assert_eq!(b.size_bytes(), 1024 * 1024);
        assert!(matches!(
            RawBackend::open(&p, false, false),
            Err(BackendError::Locked(_))
        ));
        drop(b);
        RawBackend::open(&p, true, false).unwrap();
    }

    #[test]
    fn raw_open_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing.img");
        assert!(matches!(
            RawBackend::open(&p, false, false),
            Err(BackendError::Open { .. })
        ));
        let e = dir.path().join("empty.img");
        File::create(&e).unwrap();
        assert!(matches!(
            RawBackend::open(&e, false, false),
            Err(BackendError::Empty(_))
        ));
        assert!(NullBackend::new(100, true).is_err());
    }
}
