//! Strata's file server: shared folders for VMs over virtio-fs, stored in a vmfs datastore.
//!
//! Map of the crate, bottom to top (each module uses only those above it in this list):
//! - [`quota`]: per-share byte and inode limits — usage counted at open, reserved by each
//!   request that may allocate, corrected to what it really allocated.
//! - [`settings`]: what a share is ([`settings::ShareSpec`], typed, built by the daemon's
//!   spec parser), what serving it consults per request ([`settings::ShareSettings`]: id
//!   maps, group source, permission cache, cache policy, quota limits), and
//!   [`settings::ShareError`].
//! - [`fs`]: [`fs::VmfsFs`], virtiofsd's `FileSystem` trait over a directory tree of the
//!   datastore — inode mapping, server-side permission checks through the permission-profile
//!   cache (`posix_perm`), POSIX ACLs (access and default, kept in xattrs), open handles with
//!   their open-time grants, data through the datastore file (zero-copy where in place).
//!   Split by concept; see its map.
//! - [`handler`]: [`handler::ShareHandler`], dataplane's `FsRequestHandler`: one FUSE request
//!   per descriptor chain, decoded by virtiofsd's `Server`, with EINVAL/EIO replies for what
//!   it cannot decode or panics on.
//! - [`share`]: a share assembled from its spec (settings built, directory opened, handler
//!   made) and its counters for `stats`.
//!
//! The FUSE protocol layer is virtiofsd 1.14's library (`server`, `filesystem`, `fuse`,
//! `descriptor_utils`): its rust-vmm versions are ours, so its readers and writers work on
//! the guest memory our vhost-user layer maps. Its daemon (`VhostUserDaemon`) is not used:
//! the queues run on dataplane's reactors, next to the disks.

pub mod fs;
pub mod handler;
pub mod quota;
pub mod settings;
pub mod share;

#[cfg(test)]
mod fs_tests;
