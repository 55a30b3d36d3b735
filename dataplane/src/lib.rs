//! Strata's data plane: virtual disks (vhost-user-blk) and shared folders (vhost-user-fs)
//! served to VMs by polling reactors.
//!
//! Map of the crate:
//! - [`blk`]: virtio-blk features, limits and config space; [`blk::request`] parses and
//!   validates descriptor chains (pure, no I/O).
//! - [`backend`]: the [`backend::BlockBackend`] trait (where a disk's bytes live) with raw
//!   image/block-device and null backends; vmfs files plug in here (crate `vmfs-disk`).
//! - [`guest_ram`]: guest memory regions as a flat table for the per-request path;
//!   [`split_ring`] reads avail entries and descriptor chains through it.
//! - [`engine`]: the [`engine::IoEngine`] trait with io_uring, synchronous and
//!   fault-injecting engines; one engine per reactor.
//! - [`offload`]: completions of requests a backend finished on another thread, handed back
//!   to the reactor that started them (and waking it).
//! - [`mem_guard`]: checks a frontend's memory-region fds (size, seals) and guards unsealed
//!   mappings against SIGBUS when the frontend shrinks the file later.
//! - [`poller`]: the [`poller::Poller`] trait, the one thing a reactor serves (virtio-blk,
//!   virtio-fs and packet queues alike), and the [`poller::PollCx`] through which a poller
//!   uses its reactor's engine.
//! - [`reactor`]: the fixed pool of polling threads, each running one loop over its pollers
//!   and its I/O engine.
//! - [`blk_queue`]: a virtio-blk virtqueue as a poller (request slab, parse, start on the
//!   backend, complete, used ring and notification).
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
//! - `testing` (feature `test-utils`): a virtio-blk queue on a running reactor, driven like a
//!   guest drives it, for backend tests here and in other crates; and the counting global
//!   allocator of the no-allocation-per-I/O tests.

pub mod backend;
pub mod blk;
pub mod blk_queue;
pub mod engine;
pub mod guest_ram;
pub mod mem_guard;
pub mod offload;
pub mod poller;
pub mod reactor;
pub mod server;
pub mod split_ring;
pub mod stats;
pub mod test_gate;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
pub mod used_ring;
pub mod vhost_blk;
pub mod vhost_device;
pub mod vhost_fs;
