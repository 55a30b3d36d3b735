//! [`ShareHandler`]: the bridge from a virtio-fs queue (dataplane's reactors) to FUSE.
//!
//! virtiofsd's `Server` decodes each request from the descriptor chain and dispatches it to
//! [`VmfsFs`]. Two defences sit around it, because a guest is hostile: a request the server
//! cannot decode (short buffers, bad lengths) gets an EINVAL reply built here instead of no
//! reply (virtiofsd's own daemon exits the process in that case), and a panic inside the
//! protocol layer becomes an EIO reply instead of taking the reactor thread down.

use std::io::Read;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};

use dataplane::vhost_fs::{FsMemory, FsRequestHandler};
use virtio_queue::DescriptorChain;
use virtiofsd::descriptor_utils::{Reader, Writer};
use virtiofsd::fuse::{InHeader, OutHeader};
use virtiofsd::server::Server;

use crate::fs::{set_current_conn, set_read_buffer, VmfsFs, WRITE_BYTES_MAX};

/// FUSE opcodes that have no reply (fuse.h).
const FUSE_FORGET: u32 = 2;
const FUSE_BATCH_FORGET: u32 = 42;
const FUSE_READ: u32 = 15;
const FUSE_WRITE: u32 = 16;
/// Opcodes that may free blocks or inodes (see `VmfsFs::gate`).
const FUSE_SETATTR: u32 = 4;
const FUSE_UNLINK: u32 = 10;
const FUSE_RMDIR: u32 = 11;
const FUSE_RENAME: u32 = 12;
const FUSE_OPEN: u32 = 14;
const FUSE_RELEASE: u32 = 18;
const FUSE_RELEASEDIR: u32 = 29;
const FUSE_CREATE: u32 = 35;
const FUSE_DESTROY: u32 = 38;
const FUSE_FALLOCATE: u32 = 43;
const FUSE_RENAME2: u32 = 45;
/// `struct fuse_write_in` bytes (fuse.h, ABI 7.9+).
const WRITE_IN_BYTES: usize = 40;

/// Counters of the protocol layer.
#[derive(Debug, Default)]
pub struct HandlerCounters {
    /// Requests served.
    pub requests: AtomicU64,
    /// Requests that could not be decoded (answered with EINVAL, or dropped when not even
    /// the header was readable).
    pub malformed: AtomicU64,
    /// Panics caught in the protocol layer (answered with EIO).
    pub panics: AtomicU64,
}

/// Serves one share's FUSE requests.
pub struct ShareHandler {
    server: Server<VmfsFs>,
    fs: VmfsFs,
    counters: HandlerCounters,
}

impl std::fmt::Debug for ShareHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShareHandler")
            .field("fs", &self.fs)
            .finish()
    }
}

impl ShareHandler {
    /// A handler serving `fs`.
    pub fn new(fs: VmfsFs) -> Self {
        ShareHandler {
            server: Server::new(fs.clone()),
            fs,
            counters: HandlerCounters::default(),
        }
    }

    /// The file system behind the handler.
    pub fn fs(&self) -> &VmfsFs {
        &self.fs
    }

    /// Protocol counters.
    pub fn counters(&self) -> &HandlerCounters {
        &self.counters
    }

    /// Writes an error reply for a request whose header is readable; returns bytes written.
    fn reply_error(mem: &FsMemory, chain: DescriptorChain<&FsMemory>, err: i32) -> u32 {
        let Ok(mut r) = Reader::new(mem, chain.clone()) else {
            return 0;
        };
        let Ok(header) = r.read_obj::<InHeader>() else {
            return 0;
        };
        let Ok(mut w) = Writer::new(mem, chain) else {
            return 0;
        };
        let out = OutHeader {
            len: std::mem::size_of::<OutHeader>() as u32,
            error: -err,
            unique: header.unique,
        };
        match w.write_obj(out) {
            Ok(()) => w.bytes_written() as u32,
            Err(_) => 0,
        }
    }
}

impl FsRequestHandler for ShareHandler {
    fn handle(&self, conn: u64, mem: &FsMemory, chain: DescriptorChain<&FsMemory>) -> u32 {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        set_current_conn(conn);
        let (Ok(r), Ok(w)) = (
            Reader::new(mem, chain.clone()),
            Writer::new(mem, chain.clone()),
        ) else {
            // Descriptors outside guest memory: nothing can be read or written safely.
            self.counters.malformed.fetch_add(1, Ordering::Relaxed);
            return 0;
        };
        // Every reply starts with an OutHeader; a chain with less writable space can only
        // carry requests that get no reply (FORGET, BATCH_FORGET). virtiofsd's server
        // panics on such chains otherwise (it splits the writer unchecked).
        if w.available_bytes() < std::mem::size_of::<OutHeader>() {
            let mut peek = r.clone();
            let no_reply = matches!(
                peek.read_obj::<InHeader>().map(|h| h.opcode),
                Ok(FUSE_FORGET) | Ok(FUSE_BATCH_FORGET)
            );
            if !no_reply {
                self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                return 0;
            }
        }
        // READ and WRITE move data with virtiofsd's zero-copy helpers, which transfer whole
        // guest buffers whatever count they are given: a WRITE whose payload is not exactly
        // its size (or above max_write) would write past its range in the datastore or
        // through the scratch file, so it is refused; a READ
        // whose buffer is not exactly what it returns (its size clamped to 1 MiB, then to the
        // end of the file) is served through an exact-length copy (see `set_read_buffer`).
        let mut peek = r.clone();
        let header = peek.read_obj::<InHeader>().ok();
        let mut read_buffer = None;
        match header.map(|h| h.opcode) {
            Some(FUSE_WRITE) => {
                let mut body = [0u8; WRITE_IN_BYTES];
                // Above max_write (what INIT announced) only a hostile guest sends: refused
                // before a byte is copied, so no request can make the server buffer more.
                let ok = peek.read_exact(&mut body).is_ok() && {
                    let size = u32::from_le_bytes([body[16], body[17], body[18], body[19]]);
                    size <= WRITE_BYTES_MAX && peek.available_bytes() == size as usize
                };
                if !ok {
                    self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                    return Self::reply_error(mem, chain, libc::EINVAL);
                }
            }
            Some(FUSE_READ) => {
                read_buffer = w
                    .available_bytes()
                    .checked_sub(std::mem::size_of::<OutHeader>())
                    .map(|n| n as u64);
            }
            _ => {}
        }
        set_read_buffer(read_buffer);
        let frees = matches!(
            header.map(|h| h.opcode),
            Some(
                FUSE_SETATTR
                    | FUSE_UNLINK
                    | FUSE_RMDIR
                    | FUSE_RENAME
                    | FUSE_RENAME2
                    | FUSE_OPEN
                    | FUSE_CREATE
                    | FUSE_RELEASE
                    | FUSE_RELEASEDIR
                    | FUSE_FALLOCATE
                    | FUSE_DESTROY
            )
        );
        let gate = self.fs.gate();
        let res = catch_unwind(AssertUnwindSafe(|| {
            // A poisoned gate only means a request panicked; the lock protects no data.
            if frees {
                let _g = gate.write().unwrap_or_else(|p| p.into_inner());
                self.server.handle_message(r, w, None::<&mut ()>)
            } else {
                let _g = gate.read().unwrap_or_else(|p| p.into_inner());
                self.server.handle_message(r, w, None::<&mut ()>)
            }
        }));
        match res {
            Ok(Ok(n)) => n as u32,
            Ok(Err(e)) => {
                self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(err = %e, "undecodable FUSE request");
                Self::reply_error(mem, chain, libc::EINVAL)
            }
            Err(_) => {
                self.counters.panics.fetch_add(1, Ordering::Relaxed);
                tracing::error!("panic in the FUSE layer; request answered with EIO");
                Self::reply_error(mem, chain, libc::EIO)
            }
        }
    }

    fn disconnected(&self, conn: u64) {
        self.fs.disconnected(conn);
    }
}
