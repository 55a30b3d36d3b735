//! vmfs: a journaled, VMFS-like datastore whose files are virtual disks.
//!
//! Map of the crate. The datastore is a stack of layers; each owns its state and the layer
//! below it (and derefs to it), so a layer sees everything beneath it and nothing above:
//!
//! ```text
//! fs (Datastore facade: lock, transactions, leases, path/POSIX/data APIs; commit policy)
//!  └ ns     namespace: create, link, unlink + orphans, rename, setattr
//!     └ dir    directories: in-memory index, packed and sealed content     xattr (stateless,
//!        └ data   file data: layouts, writes, write batches, fallocate,     over inode)
//!           │      punch, seek, read plans, direct maps
//!           └ inode  inode table, orphan list, opens and extent leases; bmap: block map
//!              └ alloc  bitmaps, free counts, pending frees, reservations
//!                 └ txn    metadata cache and open transaction (size/age limits from commit)
//! ```
//!
//! - [`format`]: the on-disk format v1 (byte layout in `vmfs/FORMAT.md`): metadata block
//!   header with magic, self address, LSN and crc32c; volume header and region layout; inodes,
//!   pointer blocks, bitmaps, directory entries.
//! - [`device`]: the [`device::BlockDevice`] trait (the only I/O surface), a file/block-device
//!   implementation and a simulated disk that records writes and flushes and injects faults.
//! - [`journal`]: the redo journal of whole metadata blocks, commit and idempotent replay.
//! - [`error`]: [`error::FsError`], the one error type of every layer.
//! - [`commit`]: [`commit::CommitPolicy`], when the open transaction is committed.
//! - `txn`, `alloc`, `inode` (+ `bmap`), `data`, `xattr`, `dir`, [`ns`]: the layers above.
//! - [`fs`]: the [`fs::Datastore`]: mkfs, mount, files (thin, thick eager, thick lazy;
//!   resident, sub-block and file-block layouts), the path API (a resolver over the
//!   namespace), the inode-based POSIX API for the file server, the batched scatter-gather
//!   write path, and extent leases ([`fs::ExtentLease`], [`fs::ExtentPin`], [`fs::Mapping`]):
//!   while a disk serves a file or an I/O uses its device offsets, no block of it is freed.
//! - [`fsck`]: the offline checker of every invariant, and offline crash recovery.
//! - [`admin`]: `info` and `ls` views shared by stratactl and stratad's control socket.

pub mod admin;
pub mod commit;
pub mod device;
pub mod error;
pub mod format;
pub mod fs;
pub mod fsck;
pub mod journal;
pub mod ns;

mod alloc;
mod bmap;
mod data;
mod dir;
mod inode;
mod txn;
mod xattr;

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
mod lease_commit_tests;
#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod ns_tests;
