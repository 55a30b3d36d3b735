//! Strata's data plane: virtual disks (vhost-user-blk) and shared folders (vhost-user-fs)
//! served to VMs by polling reactors.
//!
//! Map of the crate:
//! - [`blk`]: virtio-blk features, limits and config space; [`blk::request`] parses and
//!   validates descriptor chains (pure, no I/O).
//! - [`backend`]: the [`backend::BlockBackend`] trait (where a disk's bytes live) with raw
//!   image/block-device and null backends; vmfs files plug in here.
//! - [`guest_ram`]: guest memory regions as a flat table for the per-request path;
//!   [`split_ring`] reads avail entries and descriptor chains through it.
//! - [`engine`]: the [`engine::IoEngine`] trait with io_uring, synchronous and
//!   fault-injecting engines; one engine per reactor.
//! - [`mem_guard`]: checks a frontend's memory-region fds (size, seals) and guards unsealed
//!   mappings against SIGBUS when the frontend shrinks the file later.
//! - [`reactor`]: the fixed pool of polling threads that run every disk's virtqueues.
//! - [`vhost_device`]: the vhost-user protocol state of one device (memory table, vrings,
//!   features, config space), handing started vrings to reactors through a
//!   [`vhost_device::DeviceKind`]: [`vhost_blk`] (virtio-blk) or [`vhost_fs`] (virtio-fs,
//!   whose FUSE requests go to a [`vhost_fs::FsRequestHandler`] such as the file server).
//! - [`server`]: the control thread: listening sockets, frontend connections and reconnects,
//!   orderly shutdown.
//! - [`stats`]: counters shared with the control plane.
//! - [`test_gate`]: the workspace's rule for tests with missing prerequisites (SKIP locally,
//!   fail in CI).
//! - [`used_ring`]: batched used-ring writes (one `idx` store and one notification decision per
//!   reactor loop iteration).
//! - [`vmfs_backend`]: a vmfs datastore file as a backend (direct path on written space,
//!   batched journal commits for allocating writes).

pub mod backend;
pub mod blk;
pub mod engine;
pub mod guest_ram;
pub mod mem_guard;
pub mod reactor;
pub mod server;
pub mod split_ring;
pub mod stats;
pub mod test_gate;
pub mod used_ring;
pub mod vhost_blk;
pub mod vhost_device;
pub mod vhost_fs;
pub mod vmfs_backend;
