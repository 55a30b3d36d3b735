//! Per-share space limits (`--share ...,quota-bytes=SIZE,quota-inodes=N`).
//!
//! Without limits a guest can fill the datastore that every other VM's thin disks and shares
//! grow into. A share's usage — bytes of data blocks allocated to its files and directories,
//! and inodes below its root — is counted once when the share opens (a walk of its tree) and
//! then kept by the operations that change it: each one that may allocate first *reserves*
//! an upper bound of what it can allocate (refused with EDQUOT when that would pass the
//! limit), then replaces the reservation by the exact change it made (the inode's allocated
//! blocks before and after). Concurrent requests thus cannot pass the limit together.
//!
//! Bounds are worst cases, so near the limit a write that would in fact fit can be refused;
//! writes into space already allocated go through the direct path and are never refused.
//! Not charged: extended-attribute blocks, and directory growth may pass the byte limit by a
//! block (entries are refused once the limit is reached). Space of an unlinked file that
//! something outside the share (a disk) still holds open is credited when the share next
//! opens.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};

use vmfs::format::{DataLayout, Inode, FILE_BLOCK, SUB_BLOCK};
use vmfs::fs::{Datastore, FsError};

/// Directory entries read per step of the usage walk (a bounded batch, not a whole directory).
const WALK_BATCH_ENTRIES: usize = 256;

/// A share's limits and usage. With no limit set nothing is counted (no cost per request).
#[derive(Debug, Default)]
pub struct Quota {
    bytes_max: Option<u64>,
    inodes_max: Option<u64>,
    bytes_used: AtomicU64,
    inodes_used: AtomicU64,
}

/// Limits of one share as given on the command line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaLimits {
    /// Bytes of data blocks the share's files may hold.
    pub bytes: Option<u64>,
    /// Inodes (files, directories, links, nodes) below the share's root.
    pub inodes: Option<u64>,
}

/// Bytes of data blocks allocated to an inode.
pub fn allocated_bytes(i: &Inode) -> u64 {
    let unit = match i.layout {
        DataLayout::Resident => 0,
        DataLayout::SubBlocks => SUB_BLOCK,
        DataLayout::FileBlocks => FILE_BLOCK,
    };
    i.allocated.saturating_mul(unit)
}

/// The most bytes writing (or allocating) `[offset, offset + len)` of file `i` can allocate:
/// every block of the range in the layout the file will have, plus a block for moving its
/// present bytes to a larger layout (vmfs converts resident → sub-blocks → file blocks).
pub fn write_bound(i: &Inode, offset: u64, len: u64) -> u64 {
    let end = offset.saturating_add(len);
    let size = i.size.max(end);
    let needed = DataLayout::for_size(size);
    let layout = if (needed as u8) > (i.layout as u8) {
        needed
    } else {
        i.layout
    };
    let unit = match layout {
        DataLayout::Resident => return 0,
        DataLayout::SubBlocks => SUB_BLOCK,
        DataLayout::FileBlocks => FILE_BLOCK,
    };
    let conversion = if layout != i.layout && i.size > 0 {
        unit
    } else {
        0
    };
    let blocks = end.div_ceil(unit).saturating_sub(offset / unit);
    blocks.saturating_mul(unit).saturating_add(conversion)
}

impl Quota {
    /// Limits for the share rooted at `root`; counts its present usage when a limit is set.
    pub fn open(ds: &Datastore, root: u64, limits: QuotaLimits) -> Result<Quota, FsError> {
        let q = Quota {
            bytes_max: limits.bytes,
            inodes_max: limits.inodes,
            ..Quota::default()
        };
        if q.enabled() {
            let (bytes, inodes) = usage_of(ds, root)?;
            q.bytes_used.store(bytes, Ordering::Relaxed);
            q.inodes_used.store(inodes, Ordering::Relaxed);
        }
        Ok(q)
    }

    /// Whether any limit is set (otherwise usage is not kept).
    pub fn enabled(&self) -> bool {
        self.bytes_max.is_some() || self.inodes_max.is_some()
    }

    /// The limits.
    pub fn limits(&self) -> QuotaLimits {
        QuotaLimits {
            bytes: self.bytes_max,
            inodes: self.inodes_max,
        }
    }

    /// (bytes, inodes) in use, as counted.
    pub fn used(&self) -> (u64, u64) {
        (
            self.bytes_used.load(Ordering::Relaxed),
            self.inodes_used.load(Ordering::Relaxed),
        )
    }

    /// Reserves `bytes` and `inodes`, or refuses with EDQUOT when that would pass a limit.
    pub fn reserve(&self, bytes: u64, inodes: u64) -> Result<(), i32> {
        if !self.enabled() {
            return Ok(());
        }
        reserve_one(&self.bytes_used, self.bytes_max, bytes)?;
        if let Err(e) = reserve_one(&self.inodes_used, self.inodes_max, inodes) {
            self.adjust(-(bytes as i128), 0);
            return Err(e);
        }
        Ok(())
    }

    /// Whether the byte limit is reached (new directory entries are then refused).
    pub fn bytes_full(&self) -> bool {
        self.bytes_max
            .is_some_and(|max| self.bytes_used.load(Ordering::Relaxed) >= max)
    }

    /// Applies a change of usage (a reservation replaced by what was really allocated, or
    /// space freed). Saturates at zero: usage is never negative, whatever the deltas.
    pub fn adjust(&self, bytes: i128, inodes: i128) {
        if !self.enabled() {
            return;
        }
        for (counter, delta) in [(&self.bytes_used, bytes), (&self.inodes_used, inodes)] {
            if delta == 0 {
                continue;
            }
            let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                let n = i128::from(v)
                    .saturating_add(delta)
                    .clamp(0, i128::from(u64::MAX));
                u64::try_from(n).ok()
            });
        }
    }
}

fn reserve_one(counter: &AtomicU64, max: Option<u64>, n: u64) -> Result<(), i32> {
    counter
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            let next = v.checked_add(n)?;
            match max {
                Some(m) if n > 0 && next > m => None,
                _ => Some(next),
            }
        })
        .map(|_| ())
        .map_err(|_| libc::EDQUOT)
}

/// Bytes allocated in the tree below `root` (the root's own included) and inodes below it.
/// Bounded by the datastore: every inode is visited once (hard links are counted once), and
/// each directory is read in batches that stop when its cookies stop advancing.
fn usage_of(ds: &Datastore, root: u64) -> Result<(u64, u64), FsError> {
    let mut bytes = allocated_bytes(&ds.stat(root)?);
    let mut inodes = 0u64;
    let mut seen = HashSet::new();
    let mut dirs = vec![root];
    while let Some(dir) = dirs.pop() {
        let mut cookie = 0;
        loop {
            let batch = ds.read_dir_from(dir, cookie, WALK_BATCH_ENTRIES)?;
            let Some(last) = batch.last().map(|e| e.cookie) else {
                break;
            };
            for e in &batch {
                if e.entry.ino == root || !seen.insert(e.entry.ino) {
                    continue;
                }
                let i = ds.stat(e.entry.ino)?;
                inodes += 1;
                bytes = bytes.saturating_add(allocated_bytes(&i));
                if i.is_dir() {
                    dirs.push(i.ino);
                }
            }
            if last <= cookie {
                break;
            }
            cookie = last;
        }
    }
    Ok((bytes, inodes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmfs::format::Provisioning;

    fn file(size: u64, layout: DataLayout) -> Inode {
        Inode {
            ino: 5,
            generation: 1,
            mode: vmfs::format::S_IFREG | 0o644,
            nlink: 1,
            uid: 0,
            gid: 0,
            provisioning: Provisioning::Thin,
            size,
            mtime_ns: 0,
            ctime_ns: 0,
            layout,
            parent: 1,
            allocated: 0,
            atime_ns: 0,
            rdev: 0,
            attr_gen: 1,
            xattr_block: 0,
        }
    }

    #[test]
    fn write_bounds_cover_the_blocks_and_conversions() {
        // Small writes to a new file stay resident: nothing allocated.
        assert_eq!(write_bound(&file(0, DataLayout::Resident), 0, 100), 0);
        // Into sub-blocks: the sub-blocks touched, plus one for the resident bytes.
        assert_eq!(
            write_bound(&file(10, DataLayout::Resident), 60_000, 10_000),
            2 * SUB_BLOCK + SUB_BLOCK
        );
        // Past 1 MiB: file blocks touched, plus one for the present data.
        assert_eq!(
            write_bound(&file(4096, DataLayout::SubBlocks), FILE_BLOCK - 1, 2),
            2 * FILE_BLOCK + FILE_BLOCK
        );
        assert_eq!(
            write_bound(&file(8 << 20, DataLayout::FileBlocks), 0, 1),
            FILE_BLOCK
        );
        // Absurd ranges saturate instead of wrapping.
        assert_eq!(
            write_bound(&file(0, DataLayout::FileBlocks), u64::MAX - 1, u64::MAX),
            FILE_BLOCK
        );
        assert!(write_bound(&file(0, DataLayout::FileBlocks), 0, u64::MAX) > 1 << 60);
    }

    #[test]
    fn reservations_stop_at_the_limit() {
        let q = Quota {
            bytes_max: Some(100),
            inodes_max: Some(2),
            ..Quota::default()
        };
        assert_eq!(q.reserve(60, 1), Ok(()));
        assert_eq!(q.reserve(60, 0), Err(libc::EDQUOT));
        assert_eq!(q.reserve(0, 2), Err(libc::EDQUOT));
        assert_eq!(q.used(), (60, 1), "a refused reservation leaves no trace");
        q.adjust(-70, -5);
        assert_eq!(q.used(), (0, 0), "never below zero");
        assert_eq!(q.reserve(100, 2), Ok(()));
        assert!(q.bytes_full());
        // Without limits nothing is counted.
        let none = Quota::default();
        assert_eq!(none.reserve(u64::MAX, u64::MAX), Ok(()));
        assert_eq!(none.used(), (0, 0));
    }
}
