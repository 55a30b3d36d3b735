//! vmfs: a journaled, VMFS-like datastore whose files are virtual disks.
//!
//! Map of the crate:
//! - [`format`]: the on-disk format v1 (byte layout in `vmfs/FORMAT.md`): metadata block
//!   header with magic, self address, LSN and crc32c; volume header and region layout; inodes,
//!   pointer blocks, bitmaps, directory entries.
//! - [`device`]: the [`device::BlockDevice`] trait (the only I/O surface), a file/block-device
//!   implementation and a simulated disk that records writes and flushes and injects faults.
//! - [`journal`]: the redo journal of whole metadata blocks, commit and idempotent replay.
//! - [`fs`]: the [`fs::Datastore`]: mkfs, mount, files (thin, thick eager, thick lazy;
//!   resident, sub-block and file-block layouts), directories, the batched
//!   scatter-gather write path, and extent leases ([`fs::ExtentLease`], [`fs::ExtentPin`]):
//!   while a disk serves a file or an I/O uses its device offsets, no block of it is freed.
//! - [`ns`]: the inode-based POSIX namespace for the file server: every file type, hard
//!   links, symlinks, orphans, rename(2)/renameat2, setattr, cursor readdir over an
//!   in-memory directory index (sealed, journaled directory blocks), xattrs, read plans,
//!   fallocate/punch/seek, and deferred commits.
//! - [`fsck`]: the offline checker of every invariant, and offline crash recovery.
//! - [`admin`]: `info` and `ls` views shared by stratactl and stratad's control socket.

pub mod admin;
pub mod device;
pub mod format;
pub mod fs;
pub mod fsck;
pub mod journal;
pub mod ns;

pub use ns::{
    DirCursorEntry, Extent, RenameFlags, SetAttr, TimeSet, Whence, XattrSetMode, LINK_MAX,
    SYMLINK_MAX, XATTR_NAME_MAX, XATTR_VALUE_MAX,
};

#[cfg(test)]
mod crafted_tests;
#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod fs_tests;
#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod ns_tests;
