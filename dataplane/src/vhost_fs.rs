//! virtio-fs as a [`DeviceKind`]: the transport of shared folders.
//!
//! The device has one high-priority queue (0) and `num_request_queues` request queues; both
//! carry FUSE requests (virtio spec 5.11). Each started vring becomes an [`FsQueue`] poller on
//! a reactor — the same threads that serve the disks — which pops descriptor chains and hands
//! each, synchronously, to an [`FsRequestHandler`] (the file server: FUSE decoding, permission
//! checks, vmfs). A FUSE request completes within `handle`, so a queue never has requests in
//! flight and can be taken back at any time.
//!
//! The ring is driven like a disk's ([`crate::blk_queue`]): the idle check reads the avail
//! index through the flat region table ([`GuestRam`], [`crate::split_ring`]) and used
//! elements go through [`UsedRing`] (one `idx` store and one notification decision per burst).
//! The chains themselves are walked by virtio-queue's `DescriptorChain` (same bounds, length
//! and loop rules as `split_ring`, which is property-tested against it), because that is the
//! type virtiofsd's FUSE layer reads and writes requests through.
//!
//! Guest memory is mapped with vhost-user-backend's `BitmapMmapRegion` bitmap because the FUSE
//! layer we use (virtiofsd's) reads and writes chains through that memory type.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::Result as VhostResult;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};

use crate::guest_ram::GuestRam;
use crate::reactor::{Command, Poller, ReactorError, ReactorLink};
use crate::split_ring::avail_ready;
use crate::stats::bump;
use crate::used_ring::UsedRing;
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
/// Rate limit for a queue's broken-ring log line (a hostile driver could otherwise make every
/// reactor iteration log).
pub const RING_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(1);

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
        link.send(Command::AddPoller(Box::new(FsQueue::new(
            self.name.clone(),
            index,
            vring,
            self.handler.clone(),
            self.conn.load(Ordering::Relaxed),
        ))))
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
    /// None once the ring was handed back ([`Poller::take_queue`]).
    ring: Option<FsRing>,
    handler: Arc<dyn FsRequestHandler>,
    conn: u64,
    /// Being removed: no new requests (see [`Poller::stop`]).
    stopping: bool,
}

/// The ring of an [`FsQueue`] and the fast-path views of it.
#[derive(Debug)]
struct FsRing {
    vring: StartedVring<BitmapMmapRegion>,
    /// The guest memory table as a flat region table (rebuilt when the frontend sends a new
    /// one, checked at every poll): the avail index and the used ring go through it.
    ram: GuestRam<Arc<FsMemory>>,
    /// Used elements of a burst, published with one `idx` store and one notification
    /// decision.
    used: UsedRing,
    /// No "bad avail ring" log line before this instant (one per [`RING_ERROR_LOG_INTERVAL`]).
    log_next: Instant,
}

impl FsQueue {
    fn new(
        device: Arc<str>,
        index: u16,
        vring: StartedVring<BitmapMmapRegion>,
        handler: Arc<dyn FsRequestHandler>,
        conn: u64,
    ) -> Self {
        let ring = FsRing {
            ram: GuestRam::new(vring.mem.memory().into_inner()),
            used: UsedRing::new(&vring.queue),
            vring,
            log_next: Instant::now(),
        };
        FsQueue {
            device,
            index,
            ring: Some(ring),
            handler,
            conn,
            stopping: false,
        }
    }
}

impl Poller for FsQueue {
    fn poll(&mut self) -> usize {
        let Some(r) = self.ring.as_mut().filter(|_| !self.stopping) else {
            return 0;
        };
        let FsRing {
            vring: v,
            ram,
            used,
            log_next,
        } = r;
        // A load guard, not an Arc clone: no reference count traffic on an idle poll.
        let guard = v.mem.memory();
        if !std::ptr::eq(&*guard, Arc::as_ptr(ram.keep())) {
            // A new memory table (SET_MEM_TABLE): rebuilt here, never per request.
            *ram = GuestRam::new(guard.clone().into_inner());
        }
        // The idle check, done at every iteration of a reactor that spins for its disks,
        // reads one u16 through the region table.
        let (avail, size) = (v.queue.avail_ring(), v.queue.size());
        match avail_ready(ram, avail, size, v.queue.next_avail()) {
            Some(0) => return 0,
            Some(_) => {}
            None => {
                let now = Instant::now();
                if now >= *log_next {
                    tracing::warn!(
                        device = %self.device,
                        queue = self.index,
                        "bad avail ring: index beyond the ring or ring outside guest memory"
                    );
                    *log_next = now + RING_ERROR_LOG_INTERVAL;
                }
                return 0;
            }
        }
        let mem: &FsMemory = &guard;
        // The chains themselves come from virtio-queue: the FUSE layer (virtiofsd's
        // Reader/Writer) takes its DescriptorChain type, which only virtio-queue can create.
        // The iterator reads the avail index once more, for the whole burst.
        let Ok(chains) = v.queue.iter(mem) else {
            return 0;
        };
        let mut n = 0;
        for chain in chains.take(FS_BATCH_MAX) {
            let head = chain.head_index();
            let len = self.handler.handle(self.conn, mem, chain);
            // Refused when the head is not a descriptor index or the ring is outside memory.
            if used.push(ram, head, len).is_none() {
                bump(&v.stats.invalid_requests, 1);
            }
            n += 1;
        }
        if n > 0 {
            bump(&v.stats.requests, n as u64);
            // A used ring outside guest memory publishes nothing and notifies nobody; the
            // guest's driver sees its requests never complete, as with any broken ring.
            let _ = used.publish(ram, &mut v.queue);
            if used.needs_notification(ram) {
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
        self.ring.as_ref().map_or(-1, |r| r.vring.kick.as_raw_fd())
    }

    fn prepare_sleep(&mut self) -> bool {
        let Some(r) = self.ring.as_mut() else {
            return false;
        };
        let v = &mut r.vring;
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

    fn stop(&mut self) {
        self.stopping = true;
    }

    fn take_queue(&mut self) -> Option<Queue> {
        self.ring.take().map(|r| r.vring.queue)
    }
}

#[cfg(test)]
#[path = "vhost_fs_tests.rs"]
mod tests;
