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
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap,
};
use vmm_sys_util::eventfd::EventFd;

use crate::blk::QUEUE_SIZE_MAX;
use crate::reactor::{ReactorError, ReactorLink};
use crate::stats::QueueStats;

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

#[derive(Debug, Clone, Copy)]
struct AddrMapping {
    vmm_addr: u64,
    size: u64,
    gpa_base: u64,
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
    mappings: Vec<AddrMapping>,
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
            mappings: Vec::new(),
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
        self.mappings
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
        self.mappings.clear();
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
        let mut regions = Vec::with_capacity(ctx.len());
        let mut mappings = Vec::with_capacity(ctx.len());
        for (region, file) in ctx.iter().zip(files) {
            let r = GuestRegionMmap::new(
                region.mmap_region::<K::Bitmap>(file)?,
                GuestAddress(region.guest_phys_addr),
            )
            .ok_or(VhostError::InvalidParam)?;
            mappings.push(AddrMapping {
                vmm_addr: region.user_addr,
                size: region.memory_size,
                gpa_base: region.guest_phys_addr,
            });
            regions.push(r);
        }
        let mem = GuestMemoryMmap::from_regions(regions).map_err(other)?;
        // Running reactors pick the new table up at their next poll; requests in flight keep
        // the old mappings alive through their snapshot.
        self.mem.lock().map_err(other)?.replace(mem);
        self.mappings = mappings;
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
        Ok(VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
    }

    fn set_protocol_features(&mut self, features: u64) -> VhostResult<()> {
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
        if self.mappings.len() as u64 >= MEM_SLOTS_MAX {
            return Err(VhostError::InvalidParam);
        }
        let r = Arc::new(
            GuestRegionMmap::new(
                region.mmap_region::<K::Bitmap>(fd)?,
                GuestAddress(region.guest_phys_addr),
            )
            .ok_or(VhostError::InvalidParam)?,
        );
        let mem = self.mem.memory().insert_region(r).map_err(other)?;
        self.mem.lock().map_err(other)?.replace(mem);
        self.mappings.push(AddrMapping {
            vmm_addr: region.user_addr,
            size: region.memory_size,
            gpa_base: region.guest_phys_addr,
        });
        Ok(())
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VhostResult<()> {
        let (mem, _) = self
            .mem
            .memory()
            .remove_region(GuestAddress(region.guest_phys_addr), region.memory_size)
            .map_err(other)?;
        self.mem.lock().map_err(other)?.replace(mem);
        self.mappings
            .retain(|m| m.gpa_base != region.guest_phys_addr);
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
