//! virtio-fs as a [`DeviceKind`]: the transport of shared folders.
//!
//! The device has one high-priority queue (0) and `num_request_queues` request queues; both
//! carry FUSE requests (virtio spec 5.11). Each started vring becomes an [`FsQueue`] poller on
//! a reactor — the same threads that serve the disks — which pops descriptor chains and hands
//! each, synchronously, to an [`FsRequestHandler`] (the file server: FUSE decoding, permission
//! checks, vmfs). A FUSE request completes within `handle`, so a queue never has requests in
//! flight and can be taken back at any time.
//!
//! Guest memory is mapped with vhost-user-backend's `BitmapMmapRegion` bitmap because the FUSE
//! layer we use (virtiofsd's) reads and writes chains through that memory type.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vhost::vhost_user::Result as VhostResult;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};

use crate::reactor::{Command, Poller, ReactorError, ReactorLink};
use crate::stats::bump;
use crate::vhost_device::{DeviceKind, StartedVring, VhostDevice};

/// Guest memory as the virtio-fs device maps it.
pub type FsMemory = GuestMemoryMmap<BitmapMmapRegion>;

/// A virtio-fs device as seen by one vhost-user frontend.
pub type FsDevice = VhostDevice<FsKind>;

/// Bytes of the mount tag in the config space (virtio spec: `u8 tag[36]`).
pub const TAG_BYTES: usize = 36;
/// Request queues one share offers at most. The guest driver uses one per vCPU at most; more
/// would only cost reactor slots.
pub const REQUEST_QUEUES_MAX: u16 = 8;
/// FUSE requests one poll handles before the reactor moves on to its other queues: bounds how
/// long a burst on a share can delay the disks served by the same reactor.
pub const FS_BATCH_MAX: usize = 32;

/// Serves FUSE requests (implemented by the file server).
pub trait FsRequestHandler: Send + Sync + std::fmt::Debug {
    /// Serves one request chain of connection `conn`; returns the bytes written into the
    /// chain's device-writable part. Hostile chains get an error reply (or 0 bytes), never
    /// a panic.
    fn handle(&self, conn: u64, mem: &FsMemory, chain: DescriptorChain<&FsMemory>) -> u32;
    /// The frontend of connection `conn` is gone: drop its per-connection state (open
    /// handles, lookup counts, cached permission profiles).
    fn disconnected(&self, _conn: u64) {}
}

/// The virtio-fs specifics of an [`FsDevice`].
#[derive(Debug)]
pub struct FsKind {
    name: Arc<str>,
    tag: [u8; TAG_BYTES],
    request_queues: u16,
    handler: Arc<dyn FsRequestHandler>,
    /// Connection number, bumped at each disconnect, so per-connection state never leaks
    /// from one VM (or one boot) to the next.
    conn: AtomicU64,
}

impl DeviceKind for FsKind {
    type Bitmap = BitmapMmapRegion;

    fn name(&self) -> &Arc<str> {
        &self.name
    }

    fn features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
    }

    fn num_queues(&self) -> u16 {
        1 + self.request_queues
    }

    fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut cfg = [0u8; TAG_BYTES + 4];
        cfg[..TAG_BYTES].copy_from_slice(&self.tag);
        cfg[TAG_BYTES..].copy_from_slice(&u32::from(self.request_queues).to_le_bytes());
        let start = (offset as usize).min(cfg.len());
        let end = start.saturating_add(size as usize).min(cfg.len());
        cfg[start..end].to_vec()
    }

    fn start(
        &self,
        index: u16,
        vring: StartedVring<BitmapMmapRegion>,
        link: &ReactorLink,
    ) -> Result<(), ReactorError> {
        link.send(Command::AddPoller(Box::new(FsQueue {
            device: self.name.clone(),
            index,
            vring: Some(vring),
            handler: self.handler.clone(),
            conn: self.conn.load(Ordering::Relaxed),
        })))
    }

    fn stop(&self, index: u16, link: &ReactorLink) -> Result<Queue, ReactorError> {
        link.stop_queue(self.name.clone(), index)
    }

    fn disconnected(&self) {
        let conn = self.conn.fetch_add(1, Ordering::Relaxed);
        self.handler.disconnected(conn);
    }
}

impl FsDevice {
    /// A share named `name` with mount tag `tag` and `request_queues` request queues; queue
    /// `i` is served by `links[i % links.len()]`.
    pub fn new_fs(
        name: &str,
        tag: &str,
        request_queues: u16,
        handler: Arc<dyn FsRequestHandler>,
        links: Vec<ReactorLink>,
    ) -> VhostResult<Self> {
        let invalid = vhost::vhost_user::Error::InvalidParam;
        if tag.is_empty() || tag.len() > TAG_BYTES {
            return Err(invalid);
        }
        if request_queues == 0 || request_queues > REQUEST_QUEUES_MAX {
            return Err(invalid);
        }
        let mut t = [0u8; TAG_BYTES];
        t[..tag.len()].copy_from_slice(tag.as_bytes());
        let kind = FsKind {
            name: name.into(),
            tag: t,
            request_queues,
            handler,
            conn: AtomicU64::new(1),
        };
        VhostDevice::new(kind, links)
    }
}

/// One virtio-fs virtqueue on a reactor.
#[derive(Debug)]
pub struct FsQueue {
    device: Arc<str>,
    index: u16,
    vring: Option<StartedVring<BitmapMmapRegion>>,
    handler: Arc<dyn FsRequestHandler>,
    conn: u64,
}

impl Poller for FsQueue {
    fn poll(&mut self) -> usize {
        let Some(v) = self.vring.as_mut() else {
            return 0;
        };
        let guard = v.mem.memory();
        let mem: &FsMemory = &guard;
        let mut n = 0;
        while n < FS_BATCH_MAX {
            let Some(chain) = v.queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let used = self.handler.handle(self.conn, mem, chain);
            if v.queue.add_used(mem, head, used).is_err() {
                bump(&v.stats.invalid_requests, 1);
            }
            n += 1;
        }
        if n > 0 {
            bump(&v.stats.requests, n as u64);
            if v.queue.needs_notification(mem).unwrap_or(true) {
                if let Ok(call) = v.call.lock() {
                    if let Some(call) = call.as_ref() {
                        let _ = call.write(1);
                        bump(&v.stats.notifications, 1);
                    }
                }
            }
        }
        n
    }

    fn wake_fd(&self) -> RawFd {
        self.vring.as_ref().map_or(-1, |v| v.kick.as_raw_fd())
    }

    fn prepare_sleep(&mut self) -> bool {
        let Some(v) = self.vring.as_mut() else {
            return false;
        };
        // Consume the kicks seen so far; a kick after this point wakes the epoll wait.
        let _ = v.kick.read();
        let guard = v.mem.memory();
        v.queue.enable_notification(&*guard).unwrap_or(true)
    }

    fn spin(&self) -> bool {
        false
    }

    fn key(&self) -> Option<(&str, u16)> {
        Some((&self.device, self.index))
    }

    fn take_queue(&mut self) -> Option<Queue> {
        self.vring.take().map(|v| v.queue)
    }
}
