//! File data through the datastore: reads, writes (single and batched scatter-gather),
//! size changes, posix_fallocate in lock-free zeroing steps, hole punching and seeking.

use crate::data::{AllocPlan, Whence, WriteSeg, ALLOC_CHUNK_FBS};
use crate::error::FsError;
use crate::format::*;
use crate::fs::Datastore;

impl Datastore {
    /// Reads up to `buf.len()` bytes at `offset`; returns the count (short at end of file).
    pub fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<usize, FsError> {
        self.with(|g, dev| g.read(dev, ino, offset, buf))
    }

    /// Writes `data` at `offset`, extending the file if needed; committed on return.
    pub fn write(&self, ino: u64, offset: u64, data: &[u8]) -> Result<(), FsError> {
        self.with_op(|g, dev| {
            if g.get_inode(dev, ino)?.is_dir() {
                return Err(FsError::IsDir(format!("inode {ino}")));
            }
            g.write_any(dev, &self.stats, ino, offset, data, self.batching())?;
            g.end_op(dev, &self.stats)
        })
    }

    /// The batched scatter-gather write path for file-block files (virtual disks): segments of
    /// any number of guest writes, in any order. Segments on allocated blocks go straight to
    /// the device; those needing allocation or zeroing are grouped per file block, each group's
    /// metadata update is one logical transaction, and all of them commit as one physical
    /// journal transaction (one per group with batching off). Segments must lie within the
    /// file's size. Committed on return.
    pub fn write_batch(&self, segs: &[WriteSeg<'_>]) -> Result<(), FsError> {
        self.with(|g, dev| {
            g.write_batch(dev, &self.stats, segs, self.batching())?;
            g.commit(dev, &self.stats)
        })
    }

    /// [`Datastore::write_batch`] without the final commit: the metadata updates stay in the
    /// open transaction (still one physical transaction for all of them) until the next
    /// commit — a guest FLUSH ([`Datastore::sync`]), any namespace operation, the
    /// transaction growing near its size limit, or its age passing the commit policy's max
    /// age (checked here and by [`Datastore::commit_if_due`]). Until then a
    /// crash loses these writes, which virtio-blk's volatile write cache allows (completed
    /// writes are durable only after a flush); it never exposes other files' old bytes, since
    /// the allocations vanish with the uncommitted transaction.
    pub fn write_batch_deferred(&self, segs: &[WriteSeg<'_>]) -> Result<(), FsError> {
        self.with(|g, dev| {
            g.write_batch(dev, &self.stats, segs, self.batching())?;
            if g.commit_due() {
                g.commit(dev, &self.stats)?;
            }
            Ok(())
        })
    }

    /// Changes a file's size. Growing a thin file only changes its size; growing a thick file
    /// allocates (eager: zeroed, lazy: marked to-be-zeroed). Shrinking frees whole blocks past
    /// the end; refused while the file is open, since its blocks may be in flight.
    pub fn set_size(&self, ino: u64, size: u64) -> Result<(), FsError> {
        self.set_size_progress(ino, size, &mut |_, _| {})
    }

    pub(crate) fn set_size_progress(
        &self,
        ino: u64,
        size: u64,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(), FsError> {
        self.with_op(|g, dev| {
            if g.get_inode(dev, ino)?.is_dir() {
                return Err(FsError::IsDir(format!("inode {ino}")));
            }
            g.set_size(dev, &self.stats, ino, size, progress)?;
            g.end_op(dev, &self.stats)
        })
    }

    /// Writes `data` at `offset` of a regular file of any layout, extending it; sets
    /// mtime/ctime. Committed on return unless deferred commits are on.
    pub fn write_at(&self, ino: u64, offset: u64, data: &[u8]) -> Result<Inode, FsError> {
        let batching = self.batching();
        self.ns_op(|g, dev, st| {
            g.reg_inode(dev, ino)?;
            g.write_any(dev, st, ino, offset, data, batching)?;
            g.get_inode(dev, ino)
        })
    }

    /// Records that the caller wrote data in place at a device offset from
    /// [`Datastore::map_direct`] or [`Datastore::read_plan`]: sets mtime/ctime, at most once
    /// per inode per journal transaction, never forcing a commit.
    pub fn note_data_write(&self, ino: u64) -> Result<(), FsError> {
        self.with(|g, dev| g.note_write(dev, &self.stats, ino))
    }

    /// posix_fallocate: allocates (zeroed) blocks for the range and extends the size unless
    /// `keep_size`. A file-block range is allocated in steps of [`ALLOC_CHUNK_FBS`] blocks,
    /// each zeroed without the datastore lock and committed on its own: other disks and
    /// shares proceed between (and during) the steps. Out of space part-way, the steps done
    /// stay (with the size covering them), as with Linux filesystems.
    pub fn allocate(
        &self,
        ino: u64,
        offset: u64,
        len: u64,
        keep_size: bool,
    ) -> Result<(), FsError> {
        let plan =
            self.ns_op(|g, dev, st| g.allocate_start(dev, st, ino, offset, len, keep_size))?;
        let Some(p) = plan else {
            return Ok(());
        };
        let mut fbi = p.first;
        // Bounded: each step advances by up to ALLOC_CHUNK_FBS blocks to `last`.
        while fbi < p.last {
            let stop = fbi.saturating_add(ALLOC_CHUNK_FBS).min(p.last);
            self.allocate_step(ino, &p, fbi, stop, keep_size)?;
            fbi = stop;
        }
        Ok(())
    }

    /// One step of [`Datastore::allocate`]: sets free blocks aside under the lock, zeroes
    /// them without it (a reserved block is nobody's), then maps them and commits.
    fn allocate_step(
        &self,
        ino: u64,
        p: &AllocPlan,
        first: u64,
        stop: u64,
        keep_size: bool,
    ) -> Result<(), FsError> {
        let (missing, blocks, layout) = self.with(|g, dev| {
            let (missing, blocks) = g.allocate_reserve(dev, ino, p, first, stop)?;
            Ok((missing, blocks, g.vh.layout))
        })?;
        let zeroed = blocks
            .iter()
            .try_for_each(|&fb| self.dev.write_zeroes(layout.fb_offset(fb), FILE_BLOCK));
        let r = match zeroed {
            Err(e) => Err(FsError::Device(e)),
            Ok(()) => self.with_op(|g, dev| {
                g.allocate_publish(dev, ino, p, &missing, &blocks, stop, keep_size)?;
                g.end_op(dev, &self.stats)
            }),
        };
        // Whatever this step did not publish (an error, blocks mapped meanwhile) goes back.
        if let Ok(mut g) = self.inner.lock() {
            g.unreserve_fb(&blocks);
        }
        r
    }

    /// Punches a hole: the range reads back as zeroes; whole blocks are freed, partial
    /// ranges zeroed in place. The size is unchanged.
    pub fn punch_hole(&self, ino: u64, offset: u64, len: u64) -> Result<(), FsError> {
        self.ns_op(|g, dev, st| g.punch(dev, st, ino, offset, len))
    }

    /// SEEK_DATA / SEEK_HOLE at block granularity (resident files are all data);
    /// `offset >= size` is [`FsError::NoData`] (ENXIO).
    pub fn seek(&self, ino: u64, offset: u64, whence: Whence) -> Result<u64, FsError> {
        self.with(|g, dev| g.seek(dev, ino, offset, whence))
    }
}
