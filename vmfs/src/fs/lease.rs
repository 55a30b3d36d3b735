//! Extent leases and opens: what keeps a file's blocks (leases) or its inode (opens) from
//! being freed or moved while someone outside the lock uses them.

use std::ops::Range;
use std::sync::Arc;

use crate::data::Extent;
use crate::error::FsError;
use crate::format::Inode;
use crate::fs::{Datastore, ExtentLease, ExtentPin, Mapping};
use crate::inode::Ref;

impl Datastore {
    /// Maps a byte range of a file-block file to a device offset when it lies within one
    /// allocated, already-zeroed file block: the fast path that needs no metadata update.
    /// The offset comes with an [`ExtentPin`]: until it is dropped the block stays the
    /// file's (shrink, truncate and punch are refused with [`FsError::Busy`]).
    pub fn map_direct(
        &self,
        ino: u64,
        offset: u64,
        len: u64,
    ) -> Result<Option<(u64, ExtentPin<'_>)>, FsError> {
        let at = self.with(|g, dev| {
            let at = g.map_direct(dev, ino, offset, len)?;
            if at.is_some() {
                g.take_ref(ino, Ref::Lease);
            }
            Ok(at)
        })?;
        Ok(at.map(|a| (a, ExtentPin { ds: self, ino })))
    }

    /// Plans a read of `[offset, offset + len)` clipped at the end of the file: device
    /// extents (data blocks, written in place, safe to pread), zero extents (holes,
    /// to-be-zeroed blocks) and inline bytes (resident data). Returns the bytes covered.
    ///
    /// The device extents come with an [`ExtentPin`]: until it is dropped the blocks stay the
    /// file's (shrink, truncate and punch are refused with [`FsError::Busy`]), so a reader
    /// never copies bytes that meanwhile became another file's.
    pub fn read_plan(
        &self,
        ino: u64,
        offset: u64,
        len: u64,
        out: &mut Vec<Extent>,
    ) -> Result<(u64, ExtentPin<'_>), FsError> {
        let n = self.with(|g, dev| {
            let n = g.read_plan(dev, ino, offset, len, out)?;
            g.take_ref(ino, Ref::Lease);
            Ok(n)
        })?;
        Ok((n, ExtentPin::new(self, ino)))
    }

    /// Maps `range` of file `ino` (clipped at its end) and leases the file's extents for as
    /// long as the returned [`ExtentLease`] lives: no mapped block can be freed, moved or
    /// truncated meanwhile (shrink, truncate, punch, layout conversion fail with
    /// [`FsError::Busy`]; an unlinked file is freed at the lease's drop). Growing stays
    /// allowed. Unlike [`Datastore::read_plan`]'s pin, the lease is owned, so a disk backend
    /// can keep it with a cached mapping.
    pub fn map(
        self: &Arc<Self>,
        ino: u64,
        range: Range<u64>,
    ) -> Result<(Mapping, ExtentLease), FsError> {
        let mut extents = Vec::new();
        let len = range.end.saturating_sub(range.start);
        let n = self.with(|g, dev| {
            let n = g.read_plan(dev, ino, range.start, len, &mut extents)?;
            g.take_ref(ino, Ref::Lease);
            Ok(n)
        })?;
        Ok((
            Mapping { extents, len: n },
            ExtentLease {
                ds: self.clone(),
                ino,
            },
        ))
    }

    /// Takes an extent lease on `ino` for as long as the returned value lives: a disk
    /// backend caches where the file's blocks are and has I/O to them in flight, so none may
    /// be freed or moved (shrink, truncate, punch, layout conversion, removal are refused
    /// with [`FsError::Busy`], by whoever asks). Growing stays allowed.
    pub fn lease_extents(self: &Arc<Self>, ino: u64) -> Result<ExtentLease, FsError> {
        self.with(|g, dev| {
            g.get_inode(dev, ino)?;
            g.take_ref(ino, Ref::Lease);
            Ok(())
        })?;
        Ok(ExtentLease {
            ds: self.clone(),
            ino,
        })
    }

    /// Extent leases (and pins) `ino` has.
    pub fn lease_count(&self, ino: u64) -> u64 {
        self.inner
            .lock()
            .map(|g| g.ref_count(ino, Ref::Lease))
            .unwrap_or(0)
    }

    /// Marks a file open (served as a disk): it cannot be removed or shrunk until closed.
    pub fn open(&self, ino: u64) -> Result<Inode, FsError> {
        self.with(|g, dev| {
            let inode = g.get_inode(dev, ino)?;
            g.take_ref(ino, Ref::Open);
            Ok(inode)
        })
    }

    /// How many [`Datastore::open`] references `ino` has (disks served, file handles).
    pub fn open_count(&self, ino: u64) -> u64 {
        self.inner
            .lock()
            .map(|g| g.ref_count(ino, Ref::Open))
            .unwrap_or(0)
    }

    /// Undoes one [`Datastore::open`].
    pub fn close(&self, ino: u64) {
        self.release(ino, Ref::Open);
    }

    /// Drops one reference of `kind` to `ino`. The last reference of either kind frees an
    /// unlinked file, as at a last close.
    pub(crate) fn release(&self, ino: u64, kind: Ref) {
        // A poisoned lock means a panic elsewhere; the tables go with the datastore.
        let last = self
            .inner
            .lock()
            .map(|mut g| g.drop_ref(ino, kind))
            .unwrap_or(false);
        if last {
            if let Err(e) = self.reclaim_if_orphan(ino) {
                tracing::warn!(ino, ?kind, err = %e, "freeing an orphan at its last release failed");
            }
        }
    }
}
