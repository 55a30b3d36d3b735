//! Strata's data plane: virtual disks served to VMs over vhost-user-blk.
//!
//! Map of the crate:
//! - [`blk`]: virtio-blk features, limits and config space; [`blk::request`] parses and
//!   validates descriptor chains (pure, no I/O).
//! - [`backend`]: the [`backend::BlockBackend`] trait (where a disk's bytes live) with raw
//!   image/block-device and null backends; vmfs files plug in here.
//! - [`engine`]: the [`engine::IoEngine`] trait with io_uring, synchronous and
//!   fault-injecting engines; one engine per reactor.
//! - [`reactor`]: the fixed pool of polling threads that run every disk's virtqueues.
//! - [`vhost_blk`]: the vhost-user protocol state of one device (memory table, vrings,
//!   features, config space), handing started vrings to reactors.
//! - [`server`]: the control thread: listening sockets, frontend connections and reconnects,
//!   orderly shutdown.
//! - [`stats`]: counters shared with the control plane.
//! - [`net`]: packet I/O ([`net::PacketIo`]: AF_XDP, packet socket) and storage classifier.
//! - [`vmfs_backend`]: a vmfs datastore file as a backend (direct path on written space,
//!   batched journal commits for allocating writes).

pub mod backend;
pub mod blk;
pub mod engine;
pub mod net;
pub mod reactor;
pub mod server;
pub mod stats;
pub mod vhost_blk;
pub mod vmfs_backend;
