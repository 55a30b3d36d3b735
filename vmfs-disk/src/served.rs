//! One datastore file while it is served as a disk: what the backend (on reactor threads) and
//! the metadata worker (on its own thread) both use — the file's identity, its extent lease,
//! and the cache of where its written blocks are on the device.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vmfs::format::FILE_BLOCK;
use vmfs::fs::{Datastore, ExtentLease, FsError};

/// File blocks whose device offsets are cached (8 bytes each): 1 Mi blocks = a 1 TiB disk in
/// 8 MiB of memory; blocks past this are looked up in the datastore on every I/O.
pub(crate) const MAP_CACHE_BLOCKS_MAX: u64 = 1 << 20;

/// Where a request's bytes are, as far as the reactor can tell without the datastore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placement {
    /// Within one cached, allocated and zeroed file block: at this device offset.
    Direct(u64),
    /// Not known to be written space (a hole, a to-be-zeroed block, not looked up yet, or
    /// spanning file blocks): the datastore's paths must serve it.
    Unknown,
    /// Within one file block past the cache's reach: look it up on every I/O.
    Uncached,
}

/// A served file, shared by its backend and the jobs it hands to the metadata worker; the
/// last of them to go closes the file (so a job in flight never outlives the open).
#[derive(Debug)]
pub(crate) struct ServedFile {
    pub(crate) ds: Arc<Datastore>,
    pub(crate) ino: u64,
    pub(crate) name: String,
    /// The file is small (resident or sub-block layout): writes go through the datastore's
    /// general write path, one segment at a time, instead of the batched file-block path.
    pub(crate) small: bool,
    /// Device offset + 1 of each file block known to be allocated and zeroed (0: unknown).
    /// The file's blocks never move or go away while `_lease` lives (vmfs refuses to shrink,
    /// truncate, punch or remove it, whoever asks), and to-be-zeroed blocks only ever become
    /// zeroed, so an entry stays valid.
    map_cache: Box<[AtomicU64]>,
    /// vmfs's extent lease on the file, for as long as it is served.
    _lease: ExtentLease,
}

impl ServedFile {
    /// Takes the lease on `ino` (already opened with [`Datastore::open`]; closed when the
    /// last holder of this value drops it).
    pub(crate) fn new(
        ds: Arc<Datastore>,
        ino: u64,
        name: &str,
        size: u64,
        small: bool,
    ) -> Result<Self, FsError> {
        let lease = ds.lease_extents(ino)?;
        Ok(ServedFile {
            ds,
            ino,
            name: name.to_string(),
            small,
            map_cache: (0..size.div_ceil(FILE_BLOCK).min(MAP_CACHE_BLOCKS_MAX))
                .map(|_| AtomicU64::new(0))
                .collect(),
            _lease: lease,
        })
    }

    /// Where `len > 0` bytes at `off` are, from the cache alone (no lock, no I/O).
    pub(crate) fn placement(&self, off: u64, len: u64) -> Placement {
        if len == 0 || (off + len - 1) / FILE_BLOCK != off / FILE_BLOCK {
            return Placement::Unknown;
        }
        match self.map_cache.get((off / FILE_BLOCK) as usize) {
            Some(c) => match c.load(Ordering::Relaxed) {
                0 => Placement::Unknown,
                v => Placement::Direct(v - 1 + off % FILE_BLOCK),
            },
            None => Placement::Uncached,
        }
    }

    /// Asks the datastore where `len` bytes at `off` (within one file block) are on the
    /// device, if they are written space, and caches the answer. Takes the datastore's lock:
    /// for the metadata worker, and for blocks past the cache's reach.
    pub(crate) fn look_up(&self, off: u64, len: u64) -> Option<u64> {
        // The backend's own lease keeps the block mapped; the per-call pin is redundant here
        // and dropped at once.
        let (at, _) = self.ds.map_direct(self.ino, off, len).ok().flatten()?;
        // vmfs range-checks the block numbers it decodes; this bound keeps the io_uring path,
        // which bypasses the device's own range check, inside the datastore regardless.
        if at
            .checked_add(len)
            .is_none_or(|end| end > self.ds.device().size())
        {
            return None;
        }
        if let Some(c) = self.map_cache.get((off / FILE_BLOCK) as usize) {
            c.store(at - off % FILE_BLOCK + 1, Ordering::Relaxed);
        }
        Some(at)
    }

    /// After the worker served a request: caches the block's place if it is now written
    /// space, so the next request there takes the direct path.
    pub(crate) fn learn(&self, off: u64, len: u64) {
        if self.placement(off, len) == Placement::Unknown
            && len > 0
            && (off + len - 1) / FILE_BLOCK == off / FILE_BLOCK
        {
            self.look_up(off, len);
        }
    }

    /// The errno a datastore error is reported to the guest as.
    pub(crate) fn errno(e: &FsError) -> i32 {
        match e {
            FsError::NoSpace(_) => -libc::ENOSPC,
            _ => -libc::EIO,
        }
    }
}

impl Drop for ServedFile {
    fn drop(&mut self) {
        self.ds.close(self.ino);
    }
}
