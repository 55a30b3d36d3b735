//! The vhost-user protocol side of one device, whatever its type.
//!
//! [`VhostDevice`] implements the `vhost` crate's `VhostUserBackendReqHandlerMut`: the control
//! thread feeds it the frontend's messages (memory table, vring setup, features, config space).
//! It does not process virtqueues itself: when a vring becomes ready (addresses, kick fd and
//! enable all present) its queue is handed to a reactor by the [`DeviceKind`] (virtio-blk:
//! [`crate::vhost_blk`], virtio-fs: [`crate::vhost_fs`]), and taken back, drained, when the
//! frontend stops it (GET_VRING_BASE, disable, reset, disconnect).
//!
//! We use `vhost`'s message layer rather than `vhost-user-backend`'s daemon because the daemon
//! spawns worker threads per backend; our reactors are a fixed pool shared by all devices.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::VhostUserBackendReqHandlerMut;
use vhost::vhost_user::{Error as VhostError, GpuBackend, Result as VhostResult};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::NewBitmap;
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress,
};
use vmm_sys_util::eventfd::EventFd;

use crate::blk::QUEUE_SIZE_MAX;
use crate::mem_guard::{self, check_region_fd, Guard, Sealing};
use crate::reactor::{ReactorError, ReactorLink};
use crate::stats::QueueStats;

/// The vhost-user protocol features served (see README "Supported virtio-blk features").
const OFFERED_PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::CONFIG)
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);

/// Guest memory as a device of kind `K` maps it.
pub type DeviceMemory<K> = GuestMemoryAtomic<GuestMemoryMmap<<K as DeviceKind>::Bitmap>>;

/// What differs between device types: features, config space, and how a started vring is
/// served by a reactor.
pub trait DeviceKind: Send + 'static {
    /// Dirty-page bitmap of the guest memory mapping (`()` when nothing logs).
    type Bitmap: NewBitmap + Send + Sync + 'static;
    /// Name (logs, stats).
    fn name(&self) -> &Arc<str>;
    /// Virtio feature bits offered (without VHOST_USER_F_PROTOCOL_FEATURES).
    fn features(&self) -> u64;
    /// Virtqueues of the device.
    fn num_queues(&self) -> u16;
    /// Reads the device's config space.
    fn read_config(&self, offset: u32, size: u32) -> Vec<u8>;
    /// Hands a ready vring to `link`'s reactor.
    fn start(
        &self,
        index: u16,
        vring: StartedVring<Self::Bitmap>,
        link: &ReactorLink,
    ) -> Result<(), ReactorError>;
    /// Takes vring `index` back from `link`'s reactor once its requests completed.
    fn stop(&self, index: u16, link: &ReactorLink) -> Result<Queue, ReactorError>;
    /// The frontend is gone (per-connection state may be dropped).
    fn disconnected(&self) {}
}

/// Everything a reactor needs to serve one vring.
#[derive(Debug)]
pub struct StartedVring<B: NewBitmap + Send + Sync + 'static> {
    /// The ring (ready, addresses validated).
    pub queue: Queue,
    /// Guest memory (swapped atomically on memory-table changes).
    pub mem: GuestMemoryAtomic<GuestMemoryMmap<B>>,
    /// The frontend's kick eventfd (non-blocking).
    pub kick: EventFd,
    /// The call eventfd; swapped in place when the frontend changes it.
    pub call: Arc<Mutex<Option<EventFd>>>,
    /// The queue's counters.
    pub stats: Arc<QueueStats>,
}

/// Memory slots offered with CONFIGURE_MEM_SLOTS (the KVM limit vhost-user-backend uses too).
pub const MEM_SLOTS_MAX: u64 = 509;
/// Unsealed (SIGBUS-guarded) regions one device may hold, mapped or retired: the guard slots
/// are process-wide (`mem_guard::GUARDED_MAX`), so one frontend must not take them all from
/// the others. A VM has a handful of RAM regions (more only with many hot-plugged DIMMs, and
/// QEMU's memfd backends are sealed and need no slot).
pub const GUARDED_PER_DEVICE_MAX: usize = 128;

/// One mapped guest memory region. Field order matters: the SIGBUS guard is dropped before the
/// mapping can be unmapped (see [`crate::mem_guard`]).
struct MappedRegion<B: NewBitmap + Send + Sync + 'static> {
    /// Registered when the file can still shrink.
    guard: Option<Guard>,
    /// Shared with the memory tables (current and older snapshots still in use by reactors).
    region: Arc<GuestRegionMmap<B>>,
    /// The frontend's address of the region (vring addresses are given in it).
    vmm_addr: u64,
    size: u64,
    gpa_base: u64,
}

impl<B: NewBitmap + Send + Sync + 'static> MappedRegion<B> {
    /// Checks the region's fd (size, seals), maps it and guards it if it can still shrink.
    fn map(region: &VhostUserMemoryRegion, file: File) -> VhostResult<Self> {
        let sealing =
            check_region_fd(&file, region.mmap_offset, region.memory_size).map_err(|e| {
                tracing::warn!(err = %e, "memory region refused");
                VhostError::InvalidParam
            })?;
        let r = GuestRegionMmap::new(
            region.mmap_region::<B>(file)?,
            GuestAddress(region.guest_phys_addr),
        )
        .ok_or(VhostError::InvalidParam)?;
        let guard = match sealing {
            Sealing::Sealed => None,
            Sealing::Unsealed => {
                let host = r
                    .get_host_address(MemoryRegionAddress(0))
                    .map_err(|_| VhostError::InvalidParam)?;
                let len = usize::try_from(r.len()).map_err(|_| VhostError::InvalidParam)?;
                Some(mem_guard::guard(host, len).map_err(other)?)
            }
        };
        Ok(MappedRegion {
            guard,
            region: Arc::new(r),
            vmm_addr: region.user_addr,
            size: region.memory_size,
            gpa_base: region.guest_phys_addr,
        })
    }

    /// Whether the frontend-address ranges of two regions overlap (vring addresses would be
    /// ambiguous).
    fn vmm_range_overlaps(&self, other: &Self) -> bool {
        let (a, b) = (self.vmm_addr, other.vmm_addr);
        a < b.saturating_add(other.size) && b < a.saturating_add(self.size)
    }
}

/// One vring's control-side state.
struct Vring {
    /// The queue while it is stopped; `None` while a reactor runs it.
    queue: Option<Queue>,
    kick: Option<EventFd>,
    call: Arc<Mutex<Option<EventFd>>>,
    enabled: bool,
    addresses_set: bool,
    stats: Arc<QueueStats>,
}

impl Vring {
    fn new() -> VhostResult<Self> {
        Ok(Vring {
            queue: Some(Queue::new(QUEUE_SIZE_MAX).map_err(|_| VhostError::InvalidParam)?),
            kick: None,
            call: Arc::new(Mutex::new(None)),
            enabled: false,
            addresses_set: false,
            stats: Arc::new(QueueStats::default()),
        })
    }

    fn running(&self) -> bool {
        self.queue.is_none()
    }
}

/// A device as seen by one vhost-user frontend.
pub struct VhostDevice<K: DeviceKind> {
    kind: K,
    name: Arc<str>,
    links: Vec<ReactorLink>,
    vrings: Vec<Vring>,
    mem: DeviceMemory<K>,
    /// The regions of the current memory table.
    regions: Vec<MappedRegion<K::Bitmap>>,
    /// Regions no longer in the table, kept (mapped and guarded) until no reactor snapshot
    /// uses them any more; see [`VhostDevice::reap_regions`].
    retired: Vec<MappedRegion<K::Bitmap>>,
    owned: bool,
    acked_features: u64,
    acked_protocol_features: u64,
}

impl<K: DeviceKind> std::fmt::Debug for VhostDevice<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostDevice")
            .field("name", &self.name)
            .finish()
    }
}

pub(crate) fn other<E: std::fmt::Display>(e: E) -> VhostError {
    VhostError::ReqHandlerError(io::Error::other(e.to_string()))
}

fn file_to_eventfd(file: File) -> VhostResult<EventFd> {
    let fd = file.into_raw_fd();
    // SAFETY: fd was just released from a File we owned, so EventFd takes sole ownership.
    let efd = unsafe { EventFd::from_raw_fd(fd) };
    // Reactors read kick fds until EAGAIN; they must never block.
    // SAFETY: fcntl on an fd we own has no memory effects.
    unsafe {
        let flags = libc::fcntl(efd.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(efd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
    Ok(efd)
}

impl<K: DeviceKind> VhostDevice<K> {
    /// A device of `kind`, its queue `i` served by `links[i % links.len()]`.
    pub fn new(kind: K, links: Vec<ReactorLink>) -> VhostResult<Self> {
        assert!(!links.is_empty(), "a device needs at least one reactor");
        assert!(kind.num_queues() >= 1);
        let vrings = (0..kind.num_queues())
            .map(|_| Vring::new())
            .collect::<VhostResult<Vec<_>>>()?;
        Ok(VhostDevice {
            name: kind.name().clone(),
            kind,
            links,
            vrings,
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            regions: Vec::new(),
            retired: Vec::new(),
            owned: false,
            acked_features: 0,
            acked_protocol_features: 0,
        })
    }

    /// Device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device type's own state.
    pub fn kind(&self) -> &K {
        &self.kind
    }

    /// Counters per queue.
    pub fn queue_stats(&self) -> Vec<Arc<QueueStats>> {
        self.vrings.iter().map(|v| v.stats.clone()).collect()
    }

    fn link(&self, index: usize) -> &ReactorLink {
        &self.links[index % self.links.len()]
    }

    fn vring_index(&self, index: u32) -> VhostResult<usize> {
        let i = index as usize;
        if i < self.vrings.len() {
            Ok(i)
        } else {
            Err(VhostError::InvalidParam)
        }
    }

    fn event_idx(&self) -> bool {
        self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0
    }

    fn vmm_va_to_gpa(&self, va: u64) -> VhostResult<u64> {
        self.regions
            .iter()
            .find(|m| va >= m.vmm_addr && va - m.vmm_addr < m.size)
            .map(|m| va - m.vmm_addr + m.gpa_base)
            .ok_or(VhostError::InvalidParam)
    }

    /// Hands vring `i` to its reactor if it is fully set up and enabled.
    fn start_if_ready(&mut self, i: usize) -> VhostResult<()> {
        let event_idx = self.event_idx();
        let v = &mut self.vrings[i];
        if v.running() || !v.enabled || !v.addresses_set {
            return Ok(());
        }
        let Some(kick) = v.kick.as_ref() else {
            return Ok(());
        };
        let mem = self.mem.memory();
        let Some(queue) = v.queue.as_mut() else {
            return Ok(());
        };
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        if !queue.is_valid(&*mem) {
            queue.set_ready(false);
            tracing::warn!(device = %self.name, queue = i, "vring addresses outside guest memory");
            return Err(VhostError::InvalidParam);
        }
        let kick = kick.try_clone().map_err(other)?;
        let Some(queue) = v.queue.take() else {
            return Ok(());
        };
        let vring = StartedVring {
            queue,
            mem: self.mem.clone(),
            kick,
            call: v.call.clone(),
            stats: v.stats.clone(),
        };
        let link = &self.links[i % self.links.len()];
        if let Err(e) = self.kind.start(i as u16, vring, link) {
            tracing::error!(device = %self.name, queue = i, err = %e, "cannot start queue");
            return Err(other(e));
        }
        tracing::debug!(device = %self.name, queue = i, reactor = link.id(), "vring started");
        Ok(())
    }

    /// Takes vring `i` back from its reactor after its in-flight requests completed.
    fn stop(&mut self, i: usize) -> VhostResult<()> {
        if !self.vrings[i].running() {
            return Ok(());
        }
        let mut queue = self.kind.stop(i as u16, self.link(i)).map_err(other)?;
        queue.set_ready(false);
        self.vrings[i].queue = Some(queue);
        Ok(())
    }

    /// Stops every vring (draining in-flight requests).
    pub fn stop_all(&mut self) {
        for i in 0..self.vrings.len() {
            if let Err(e) = self.stop(i) {
                tracing::error!(device = %self.name, queue = i, err = %e, "stop failed");
            }
        }
    }

    /// Guarded regions this device would hold with `table` as its memory table (retired
    /// regions keep their guard until unmapped).
    fn guarded_after<'r>(&self, table: impl Iterator<Item = &'r MappedRegion<K::Bitmap>>) -> usize
    where
        K::Bitmap: 'r,
    {
        let guarded = |m: &&MappedRegion<K::Bitmap>| m.guard.is_some();
        table.filter(guarded).count() + self.retired.iter().filter(guarded).count()
    }

    /// Unmaps retired regions that no memory table snapshot uses any more (the reactors drop
    /// theirs at their next poll, in-flight requests at completion); the others wait for the
    /// next call. The guard goes before the mapping.
    fn reap_regions(&mut self) {
        let name = &self.name;
        self.retired.retain(|m| {
            if m.guard.as_ref().is_some_and(Guard::faulted) {
                tracing::warn!(device = %name, gpa = m.gpa_base,
                    "frontend shrank a guest memory file: the region was replaced by zeroes");
            }
            Arc::strong_count(&m.region) > 1
        });
    }

    /// Forgets the frontend: stops the vrings and drops memory, fds and negotiated features,
    /// ready for the next connection.
    pub fn disconnect(&mut self) {
        self.stop_all();
        for v in self.vrings.iter_mut() {
            if let Some(q) = v.queue.as_mut() {
                q.reset();
            }
            v.kick = None;
            if let Ok(mut c) = v.call.lock() {
                *c = None;
            }
            v.enabled = false;
            v.addresses_set = false;
        }
        if let Ok(g) = self.mem.lock() {
            g.replace(GuestMemoryMmap::new());
        }
        self.retired.append(&mut self.regions);
        self.reap_regions();
        self.kind.disconnected();
        self.owned = false;
        self.acked_features = 0;
        self.acked_protocol_features = 0;
    }
}

impl<K: DeviceKind> VhostUserBackendReqHandlerMut for VhostDevice<K> {
    fn set_owner(&mut self) -> VhostResult<()> {
        if self.owned {
            return Err(VhostError::InvalidOperation("already claimed"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VhostResult<()> {
        self.disconnect();
        Ok(())
    }

    fn reset_device(&mut self) -> VhostResult<()> {
        self.stop_all();
        for v in self.vrings.iter_mut() {
            v.enabled = false;
        }
        self.acked_features = 0;
        Ok(())
    }

    fn get_features(&mut self) -> VhostResult<u64> {
        Ok(self.kind.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
    }

    fn set_features(&mut self, features: u64) -> VhostResult<()> {
        let offered = self.kind.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if features & !offered != 0 {
            return Err(VhostError::InvalidParam);
        }
        self.acked_features = features;
        // Without PROTOCOL_FEATURES the rings are enabled as soon as they start (vhost-user
        // spec, "Ring states").
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            for i in 0..self.vrings.len() {
                self.vrings[i].enabled = true;
                self.start_if_ready(i)?;
            }
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
    ) -> VhostResult<()> {
        self.reap_regions();
        if ctx.len() != files.len() || ctx.len() as u64 > MEM_SLOTS_MAX {
            return Err(VhostError::InvalidParam);
        }
        let mut regions: Vec<MappedRegion<K::Bitmap>> = Vec::with_capacity(ctx.len());
        for (region, file) in ctx.iter().zip(files) {
            let m = MappedRegion::map(region, file)?;
            if regions.iter().any(|r| r.vmm_range_overlaps(&m))
                || self.guarded_after(regions.iter().chain([&m])) > GUARDED_PER_DEVICE_MAX
            {
                return Err(VhostError::InvalidParam);
            }
            regions.push(m);
        }
        // vm-memory refuses overlapping guest-physical ranges.
        let mem =
            GuestMemoryMmap::from_arc_regions(regions.iter().map(|m| m.region.clone()).collect())
                .map_err(other)?;
        // Running reactors pick the new table up at their next poll; requests in flight keep
        // the old mappings alive through their snapshot, and `retired` keeps them guarded.
        self.mem.lock().map_err(other)?.replace(mem);
        let old = std::mem::replace(&mut self.regions, regions);
        self.retired.extend(old);
        self.reap_regions();
        Ok(())
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostResult<()> {
        let i = self.vring_index(index)?;
        self.stop(i)?;
        let size = u16::try_from(num).map_err(|_| VhostError::InvalidParam)?;
        if size == 0 || size > QUEUE_SIZE_MAX {
            return Err(VhostError::InvalidParam);
        }
        let q = self.vrings[i]
            .queue
            .as_mut()
            .ok_or(VhostError::InvalidParam)?;
        q.try_set_size(size).map_err(|_| VhostError::InvalidParam)?;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VhostResult<()> {
        let i = self.vring_index(index)?;
        self.stop(i)?;
        let desc = self.vmm_va_to_gpa(descriptor)?;
        let avail = self.vmm_va_to_gpa(available)?;
        let used = self.vmm_va_to_gpa(used)?;
        let mem = self.mem.memory();
        let v = &mut self.vrings[i];
        let q = v.queue.as_mut().ok_or(VhostError::InvalidParam)?;
        q.try_set_desc_table_address(GuestAddress(desc))
            .map_err(|_| VhostError::InvalidParam)?;
        q.try_set_avail_ring_address(GuestAddress(avail))
            .map_err(|_| VhostError::InvalidParam)?;
        q.try_set_used_ring_address(GuestAddress(used))
            .map_err(|_| VhostError::InvalidParam)?;
        // After a guest driver reset the used index restarts from what the ring holds (as
        // libvhost-user and vhost-user-backend do).
        if let Ok(idx) = q.used_idx(&*mem, std::sync::atomic::Ordering::Acquire) {
            q.set_next_used(idx.0);
        }
        v.addresses_set = true;
        drop(mem);
        self.start_if_ready(i)
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostResult<()> {
        let i = self.vring_index(index)?;
        self.stop(i)?;
        let base = u16::try_from(base).map_err(|_| VhostError::InvalidParam)?;
        let q = self.vrings[i]
            .queue
            .as_mut()
            .ok_or(VhostError::InvalidParam)?;
        q.set_next_avail(base);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VhostResult<VhostUserVringState> {
        let i = self.vring_index(index)?;
        // "stop ring upon receiving VHOST_USER_GET_VRING_BASE": drain, then report.
        self.stop(i)?;
        let v = &mut self.vrings[i];
        v.kick = None;
        if let Ok(mut c) = v.call.lock() {
            *c = None;
        }
        let next_avail = v.queue.as_ref().map(|q| q.next_avail()).unwrap_or(0);
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        let i = self.vring_index(u32::from(index))?;
        self.stop(i)?;
        self.vrings[i].kick = match fd {
            Some(f) => Some(file_to_eventfd(f)?),
            None => None,
        };
        self.start_if_ready(i)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        let i = self.vring_index(u32::from(index))?;
        let efd = match fd {
            Some(f) => Some(file_to_eventfd(f)?),
            None => None,
        };
        // Swapped in place: QEMU changes call fds of running rings (interrupt masking).
        *self.vrings[i].call.lock().map_err(other)? = efd;
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VhostResult<()> {
        self.vring_index(u32::from(index))?;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VhostResult<VhostUserProtocolFeatures> {
        Ok(OFFERED_PROTOCOL_FEATURES)
    }

    fn set_protocol_features(&mut self, features: u64) -> VhostResult<()> {
        // A frontend acks a subset of what was offered (vhost-user spec); anything else would
        // make us believe in a protocol we do not speak (e.g. INFLIGHT_SHMFD, LOG_SHMFD).
        if features & !OFFERED_PROTOCOL_FEATURES.bits() != 0 {
            return Err(VhostError::InvalidParam);
        }
        self.acked_protocol_features = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VhostResult<u64> {
        Ok(u64::from(self.kind.num_queues()))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostResult<()> {
        let i = self.vring_index(index)?;
        self.vrings[i].enabled = enable;
        if enable {
            self.start_if_ready(i)
        } else {
            self.stop(i)
        }
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VhostResult<Vec<u8>> {
        Ok(self.kind.read_config(offset, size))
    }

    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VhostResult<()> {
        // Nothing in our config space is writable (CONFIG_WCE is not offered).
        Err(VhostError::InvalidOperation("config space is read-only"))
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VhostResult<()> {
        Err(VhostError::InvalidOperation("not a GPU device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostResult<File> {
        Err(VhostError::InvalidOperation("shared objects not supported"))
    }

    fn get_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
    ) -> VhostResult<(VhostUserInflight, File)> {
        Err(VhostError::InvalidOperation(
            "inflight tracking not offered",
        ))
    }

    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> VhostResult<()> {
        Err(VhostError::InvalidOperation(
            "inflight tracking not offered",
        ))
    }

    fn get_max_mem_slots(&mut self) -> VhostResult<u64> {
        Ok(MEM_SLOTS_MAX)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
    ) -> VhostResult<()> {
        self.reap_regions();
        if self.regions.len() as u64 >= MEM_SLOTS_MAX {
            return Err(VhostError::InvalidParam);
        }
        let m = MappedRegion::map(region, fd)?;
        if self.regions.iter().any(|r| r.vmm_range_overlaps(&m))
            || self.guarded_after(self.regions.iter().chain([&m])) > GUARDED_PER_DEVICE_MAX
        {
            return Err(VhostError::InvalidParam);
        }
        // vm-memory refuses a region overlapping another in guest-physical space.
        let mem = self
            .mem
            .memory()
            .insert_region(m.region.clone())
            .map_err(other)?;
        self.mem.lock().map_err(other)?.replace(mem);
        self.regions.push(m);
        Ok(())
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VhostResult<()> {
        self.reap_regions();
        let (mem, _) = self
            .mem
            .memory()
            .remove_region(GuestAddress(region.guest_phys_addr), region.memory_size)
            .map_err(other)?;
        self.mem.lock().map_err(other)?.replace(mem);
        if let Some(k) = self
            .regions
            .iter()
            .position(|m| m.gpa_base == region.guest_phys_addr && m.size == region.memory_size)
        {
            let m = self.regions.swap_remove(k);
            self.retired.push(m);
        }
        self.reap_regions();
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VhostResult<Option<File>> {
        Err(VhostError::InvalidOperation(
            "device state transfer not offered",
        ))
    }

    fn check_device_state(&mut self) -> VhostResult<()> {
        Err(VhostError::InvalidOperation(
            "device state transfer not offered",
        ))
    }

    fn get_shmem_config(&mut self) -> VhostResult<VhostUserShMemConfig> {
        Err(VhostError::InvalidOperation("no shared memory regions"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VhostResult<()> {
        Err(VhostError::InvalidOperation("dirty logging not offered"))
    }
}

#[cfg(test)]
mod tests {
    //! The control plane against a hostile frontend: out-of-range vring parameters, bad memory
    //! tables, messages out of order, memory files shrunk under running queues.
    use super::*;
    use crate::backend::NullBackend;
    use crate::blk::{serial_from, DiskGeometry};
    use crate::engine::EngineKind;
    use crate::reactor::ReactorHandle;
    use crate::vhost_blk::BlkDevice;
    use std::os::fd::FromRawFd;

    /// Guest-physical base and frontend address of the test memory.
    const GPA: u64 = 0;
    const VMM: u64 = 0x7f00_0000_0000;
    const MEM: u64 = 0x10000;

    fn device() -> (ReactorHandle, BlkDevice) {
        let r = ReactorHandle::spawn(0, None, EngineKind::Sync).unwrap();
        let geom = DiskGeometry {
            capacity_sectors: 2048,
            blk_size: 512,
            read_only: false,
            discard: false,
            num_queues: 1,
            serial: serial_from("t"),
        };
        let backend = Arc::new(NullBackend::new(1 << 20, true).unwrap());
        let d = BlkDevice::new_blk("t", geom, backend, vec![r.link()]).unwrap();
        (r, d)
    }

    /// The frontend's copy of an eventfd, as a message carries it.
    fn efd_file(e: &EventFd) -> File {
        let fd = e.try_clone().unwrap().into_raw_fd();
        // SAFETY: fd was just released from a clone we owned, so the File owns it alone.
        unsafe { File::from_raw_fd(fd) }
    }

    fn fl() -> VhostUserVringAddrFlags {
        VhostUserVringAddrFlags::empty()
    }

    fn memfd(len: u64) -> File {
        // SAFETY: memfd_create with a static name; the new fd is owned by the File.
        let f = unsafe { File::from_raw_fd(libc::memfd_create(c"guest".as_ptr(), 0)) };
        f.set_len(len).unwrap();
        f
    }

    fn region(gpa: u64, size: u64, vmm: u64) -> VhostUserMemoryRegion {
        VhostUserMemoryRegion::new(gpa, size, vmm, 0)
    }

    fn single(gpa: u64, size: u64, vmm: u64) -> VhostUserSingleMemoryRegion {
        VhostUserSingleMemoryRegion::new(gpa, size, vmm, 0)
    }

    #[test]
    fn out_of_range_vring_parameters_are_refused() {
        let (_r, mut d) = device();
        for num in [0, u32::from(QUEUE_SIZE_MAX) + 1, 1 << 16, u32::MAX] {
            assert!(d.set_vring_num(0, num).is_err(), "num {num}");
        }
        d.set_vring_num(0, 256).unwrap();
        assert!(d.set_vring_num(1, 256).is_err());
        assert!(d.set_vring_num(u32::MAX, 256).is_err());
        assert!(d.set_vring_base(0, 1 << 16).is_err());
        assert!(d.set_vring_base(7, 0).is_err());
        d.set_vring_base(0, 5).unwrap();
        assert!(d.get_vring_base(3).is_err());
        assert!(d.set_vring_enable(9, true).is_err());
        assert!(d.set_vring_kick(200, None).is_err());
        assert!(d.set_vring_call(200, None).is_err());
        // Addresses before any memory table, then outside it.
        assert!(d
            .set_vring_addr(0, fl(), VMM, VMM + 0x2000, VMM + 0x1000, 0)
            .is_err());
        d.set_mem_table(&[region(GPA, MEM, VMM)], vec![memfd(MEM)])
            .unwrap();
        assert!(d.set_vring_addr(0, fl(), VMM + MEM, VMM, VMM, 0).is_err());
        assert!(d.set_vring_addr(0, fl(), u64::MAX, VMM, VMM, 0).is_err());
        // A ring that starts inside memory but runs past its end is refused when it starts.
        d.set_vring_num(0, 1024).unwrap();
        d.set_vring_addr(0, fl(), VMM + MEM - 0x100, VMM, VMM + 0x100, 0)
            .unwrap();
        let features = d.get_features().unwrap();
        d.set_features(features).unwrap();
        d.set_vring_kick(0, Some(efd_file(&EventFd::new(0).unwrap())))
            .unwrap();
        assert!(d.set_vring_enable(0, true).is_err());
    }

    #[test]
    fn protocol_features_never_offered_are_refused() {
        let (_r, mut d) = device();
        let offered = d.get_protocol_features().unwrap().bits();
        d.set_protocol_features(offered).unwrap();
        let inflight = VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits();
        assert_eq!(offered & inflight, 0);
        assert!(d.set_protocol_features(offered | inflight).is_err());
        assert!(d.set_protocol_features(u64::MAX).is_err());
    }

    #[test]
    fn bad_memory_tables_are_refused() {
        let (_r, mut d) = device();
        // Issue 12 finding 4: a region larger than its file.
        assert!(d
            .set_mem_table(&[region(GPA, MEM, VMM)], vec![memfd(MEM / 2)])
            .is_err());
        assert!(d
            .add_mem_region(&single(GPA, MEM, VMM), memfd(0x1000))
            .is_err());
        // Empty, wrapping, or regions/fds mismatched.
        assert!(d
            .set_mem_table(&[region(GPA, 0, VMM)], vec![memfd(MEM)])
            .is_err());
        assert!(d.set_mem_table(&[region(GPA, MEM, VMM)], vec![]).is_err());
        // Overlapping in guest-physical space, then in the frontend's address space.
        assert!(d
            .set_mem_table(
                &[
                    region(GPA, MEM, VMM),
                    region(GPA + 0x1000, MEM, VMM + 2 * MEM)
                ],
                vec![memfd(MEM), memfd(MEM)]
            )
            .is_err());
        assert!(d
            .set_mem_table(
                &[
                    region(GPA, MEM, VMM),
                    region(GPA + 2 * MEM, MEM, VMM + 0x1000)
                ],
                vec![memfd(MEM), memfd(MEM)]
            )
            .is_err());
        d.set_mem_table(&[region(GPA, MEM, VMM)], vec![memfd(MEM)])
            .unwrap();
        assert!(d
            .add_mem_region(&single(GPA + 0x8000, MEM, VMM + 4 * MEM), memfd(MEM))
            .is_err());
        d.add_mem_region(&single(GPA + MEM, MEM, VMM + MEM), memfd(MEM))
            .unwrap();
        d.remove_mem_region(&single(GPA + MEM, MEM, VMM + MEM))
            .unwrap();
        assert!(d
            .remove_mem_region(&single(GPA + MEM, MEM, VMM + MEM))
            .is_err());
    }

    /// Messages in an order no sane frontend sends: kick before anything, enable before
    /// addresses, base while running, a second memory table under a running queue.
    #[test]
    fn out_of_order_messages_do_not_break_the_device() {
        let (_r, mut d) = device();
        let kick = EventFd::new(0).unwrap();
        d.set_vring_kick(0, Some(efd_file(&kick))).unwrap();
        d.set_vring_enable(0, true).unwrap();
        assert!(d.get_vring_base(0).is_ok());
        d.set_vring_kick(0, Some(efd_file(&kick))).unwrap();
        d.set_mem_table(&[region(GPA, MEM, VMM)], vec![memfd(MEM)])
            .unwrap();
        d.set_vring_num(0, 64).unwrap();
        d.set_vring_addr(0, fl(), VMM, VMM + 0x2000, VMM + 0x1000, 0)
            .unwrap();
        // Running now (kick, enable and addresses present).
        assert!(d.vrings[0].running());
        kick.write(1).unwrap();
        d.set_vring_base(0, 3).unwrap();
        assert!(!d.vrings[0].running());
        d.set_vring_enable(0, true).unwrap();
        d.set_mem_table(&[region(GPA, MEM, VMM)], vec![memfd(MEM)])
            .unwrap();
        kick.write(1).unwrap();
        let base = d.get_vring_base(0).unwrap().num;
        assert_eq!(base, 3);
        d.reset_owner().unwrap();
        assert!(d.regions.is_empty());
    }

    /// Issue 12 finding 4: the frontend truncates its (unsealed) memory file while the
    /// control thread and a reactor use the memory. Before the guard this killed the process
    /// with SIGBUS.
    #[test]
    fn memory_file_truncated_under_a_running_queue() {
        let (_r, mut d) = device();
        let f = memfd(MEM);
        let keep = f.try_clone().unwrap();
        d.set_mem_table(&[region(GPA, MEM, VMM)], vec![f]).unwrap();
        d.set_vring_num(0, 64).unwrap();
        let kick = EventFd::new(0).unwrap();
        d.set_vring_kick(0, Some(efd_file(&kick))).unwrap();
        d.set_vring_enable(0, true).unwrap();
        keep.set_len(0).unwrap();
        // The control thread reads the used index from guest memory here.
        d.set_vring_addr(0, fl(), VMM, VMM + 0x2000, VMM + 0x1000, 0)
            .unwrap();
        assert!(d.vrings[0].running());
        // The reactor reads the avail ring.
        kick.write(1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(d.regions[0].guard.as_ref().is_some_and(Guard::faulted));
        let base = d.get_vring_base(0).unwrap().num;
        assert_eq!(base, 0);
        d.reset_owner().unwrap();
    }

    /// A sealed (F_SEAL_SHRINK) memfd, as QEMU's memory-backend-memfd sends, needs no guard.
    #[test]
    fn one_frontend_cannot_take_every_guard_slot() {
        let (_r, mut d) = device();
        let at = |i: u64| single(GPA + i * MEM, MEM, VMM + i * MEM);
        for i in 0..GUARDED_PER_DEVICE_MAX as u64 {
            d.add_mem_region(&at(i), memfd(MEM)).unwrap();
        }
        // Unsealed memfds are guarded: past the per-device share they are refused.
        assert!(d
            .add_mem_region(&at(GUARDED_PER_DEVICE_MAX as u64), memfd(MEM))
            .is_err());
        // Another frontend's device still gets its regions guarded.
        let (_r2, mut other) = device();
        other.add_mem_region(&at(0), memfd(MEM)).unwrap();
        assert!(other.regions[0].guard.is_some());
    }

    #[test]
    fn sealed_memory_needs_no_guard() {
        let (_r, mut d) = device();
        // SAFETY: memfd_create with a static name; the new fd is owned by the File.
        let f = unsafe {
            File::from_raw_fd(libc::memfd_create(
                c"sealed".as_ptr(),
                libc::MFD_ALLOW_SEALING,
            ))
        };
        f.set_len(MEM).unwrap();
        // SAFETY: adds seals to our own memfd.
        let rc = unsafe {
            libc::fcntl(
                f.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
            )
        };
        assert_eq!(rc, 0);
        d.set_mem_table(&[region(GPA, MEM, VMM)], vec![f]).unwrap();
        assert!(d.regions[0].guard.is_none());
        d.set_mem_table(&[region(GPA, MEM, VMM)], vec![memfd(MEM)])
            .unwrap();
        assert!(d.regions[0].guard.is_some());
    }
}
