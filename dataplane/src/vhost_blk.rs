//! virtio-blk as a [`DeviceKind`]: features and config space from the disk's geometry; a
//! started vring becomes a [`BlkQueue`] poller on a reactor, which parses and executes its
//! requests.

use std::sync::Arc;

use vhost::vhost_user::Result as VhostResult;
use virtio_queue::Queue;

use crate::backend::BlockBackend;
use crate::blk::DiskGeometry;
use crate::blk_queue::{BlkQueue, QueueRun};
use crate::reactor::{Command, ReactorError, ReactorLink};
use crate::vhost_device::{DeviceKind, StartedVring, VhostDevice};

/// A virtio-blk device as seen by one vhost-user frontend.
pub type BlkDevice = VhostDevice<BlkKind>;

/// The virtio-blk specifics of a [`BlkDevice`].
#[derive(Debug)]
pub struct BlkKind {
    name: Arc<str>,
    geom: Arc<DiskGeometry>,
    backend: Arc<dyn BlockBackend>,
}

impl DeviceKind for BlkKind {
    // Nothing logs dirty pages (no live migration), so no bitmap on the per-I/O path.
    type Bitmap = ();

    fn name(&self) -> &Arc<str> {
        &self.name
    }

    fn features(&self) -> u64 {
        self.geom.features()
    }

    fn num_queues(&self) -> u16 {
        self.geom.num_queues
    }

    fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.geom.read_config(offset, size)
    }

    fn start(
        &self,
        index: u16,
        vring: StartedVring<()>,
        link: &ReactorLink,
    ) -> Result<(), ReactorError> {
        let run = Box::new(QueueRun {
            device: self.name.clone(),
            index,
            queue: vring.queue,
            mem: vring.mem,
            kick: vring.kick,
            call: vring.call,
            backend: self.backend.clone(),
            geom: self.geom.clone(),
            stats: vring.stats,
        });
        link.send(Command::AddPoller(Box::new(BlkQueue::new(run))))
    }

    fn stop(&self, index: u16, link: &ReactorLink) -> Result<Queue, ReactorError> {
        link.stop_queue(self.name.clone(), index)
    }
}

impl BlkDevice {
    /// A disk named `name` on `backend`, its queue `i` served by `links[i % links.len()]`.
    pub fn new_blk(
        name: &str,
        geom: DiskGeometry,
        backend: Arc<dyn BlockBackend>,
        links: Vec<ReactorLink>,
    ) -> VhostResult<Self> {
        let kind = BlkKind {
            name: name.into(),
            geom: Arc::new(geom),
            backend,
        };
        VhostDevice::new(kind, links)
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn BlockBackend> {
        &self.kind().backend
    }

    /// The geometry offered to guests.
    pub fn geometry(&self) -> &DiskGeometry {
        &self.kind().geom
    }
}
