//! A vmfs datastore file served as a virtual disk.
//!
//! Requests on written space (one allocated, zeroed file block whose place is cached) go
//! straight to the datastore device through the reactor's engine, like a raw image: the fast
//! path costs one atomic load. Everything else — writes that need allocation, zeroing or a
//! pointer update, reads of holes and to-be-zeroed blocks, requests spanning file blocks or on
//! blocks not looked up yet, WRITE_ZEROES and FLUSH — is offloaded: `start` records it, and
//! `end_batch` (once per reactor loop iteration) hands the batch to the datastore's metadata
//! worker ([`crate::worker`]) and returns at once. The worker runs the datastore's batched
//! write path, so the metadata of every allocating write in the batch joins one journal
//! transaction (group commit, committed at the guest's next FLUSH, when the datastore's
//! `vmfs::commit::CommitPolicy` says it is due,
//! or near its size limit), and posts the completions to the reactor that started them. So no
//! device I/O or datastore lock is taken on a reactor thread, except for blocks past the
//! block-map cache's reach (disks over 1 TiB), looked up on every I/O.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use dataplane::backend::{rw_now, rw_op, BlockBackend, InlineIo, Started};
use dataplane::blk::request::{ParsedRequest, RequestKind};
use dataplane::blk::SECTOR_SIZE;
use dataplane::engine::IoEngine;
use dataplane::offload::OffloadSink;
use vmfs::fs::Datastore;

use crate::served::{Placement, ServedFile};
use crate::worker::{MetaWorker, Offloaded, OpKind, JOB_LIST_CAPACITY};

/// One reactor's view of the backend: its completion sink and the requests it offloaded in
/// the current loop iteration.
#[derive(Debug)]
struct Lane {
    sink: OffloadSink,
    pending: Vec<Offloaded>,
}

/// A datastore file as a block backend.
#[derive(Debug)]
pub struct VmfsBackend {
    file: Arc<ServedFile>,
    worker: Arc<MetaWorker>,
    size: u64,
    read_only: bool,
    fd: Option<RawFd>,
    /// One per reactor serving a queue of this disk (few: at most one per reactor thread).
    lanes: Mutex<Vec<Lane>>,
    /// Which direct-path requests run on the reactor thread (from the device's fd: O_DIRECT,
    /// RWF_NOWAIT support).
    inline: InlineIo,
}

impl VmfsBackend {
    /// Serves file `ino` of `ds` (already opened with [`Datastore::open`], which keeps it
    /// from being removed or shrunk while served; closed when the backend and its last
    /// offloaded request are gone). Requests it cannot serve directly go to the datastore's
    /// metadata worker, started with the first backend of the datastore.
    pub fn new(ds: Arc<Datastore>, ino: u64, name: &str, read_only: bool) -> Result<Self, String> {
        let inode = ds.stat(ino).map_err(|e| e.to_string())?;
        if inode.is_dir() {
            return Err(format!("{name} is a directory"));
        }
        let size = inode.size - inode.size % SECTOR_SIZE;
        if size == 0 {
            return Err(format!("{name} is empty"));
        }
        let worker = MetaWorker::for_datastore(&ds)
            .map_err(|e| format!("cannot start the metadata worker: {e}"))?;
        let fd = ds.device().raw_fd();
        let small = inode.layout != vmfs::format::DataLayout::FileBlocks;
        let file = ServedFile::new(ds, ino, name, size, small).map_err(|e| e.to_string())?;
        Ok(VmfsBackend {
            file: Arc::new(file),
            worker,
            size,
            read_only,
            fd,
            lanes: Mutex::new(Vec::new()),
            inline: fd.map(InlineIo::probe).unwrap_or_default(),
        })
    }

    /// The datastore.
    pub fn datastore(&self) -> &Arc<Datastore> {
        &self.file.ds
    }

    /// The datastore's metadata worker (tests hold it still).
    #[cfg(test)]
    pub(crate) fn worker(&self) -> &MetaWorker {
        &self.worker
    }

    /// Pushes `op` on `fd`-relative offset `dev_offset`.
    fn push(
        &self,
        engine: &mut dyn IoEngine,
        req: &ParsedRequest,
        dev_offset: u64,
        ud: u64,
    ) -> Started {
        let Some(fd) = self.fd else {
            return Started::Done(-libc::EIO);
        };
        if self.inline.applies(req.kind) {
            return Started::Done(rw_now(fd, req, dev_offset));
        }
        let op = rw_op(fd, req, dev_offset);
        // SAFETY: the iovecs live in the reactor's slot until this user_data completes; the
        // buffers are guest memory kept mapped by the slot's snapshot; the target range lies
        // within one allocated file block of this (open, so never freed) file.
        match unsafe { engine.push(op, ud) } {
            Ok(()) => Started::Submitted(1),
            Err(_) => Started::Done(-libc::EAGAIN),
        }
    }

    /// The device offset of a Read/Write request on written space, if the reactor may serve
    /// it directly.
    fn direct(&self, req: &ParsedRequest) -> Option<u64> {
        self.fd?;
        let (off, len) = (req.offset_bytes(), req.len_bytes());
        match self.file.placement(off, len) {
            Placement::Direct(at) => Some(at),
            Placement::Unknown => None,
            Placement::Uncached => self.file.look_up(off, len),
        }
    }

    /// Records `req` for the metadata worker (handed over at `end_batch`).
    fn offload(&self, req: &ParsedRequest, kind: OpKind, user_data: u64) -> Started {
        let o = Offloaded {
            kind,
            user_data,
            offset: req.offset_bytes(),
            len: req.len_bytes(),
            data_len: req.data_len,
            iov: req.iov.as_ptr(),
            iov_count: req.iov_count,
        };
        let me = std::thread::current().id();
        let Ok(mut lanes) = self.lanes.lock() else {
            return Started::Done(-libc::EIO);
        };
        match lanes.iter_mut().find(|l| l.sink.owner() == me) {
            Some(lane) => {
                lane.pending.push(o);
                Started::Submitted(1)
            }
            None => {
                // Only a caller that never attached (not a reactor) gets here.
                tracing::error!(
                    file = %self.file.name,
                    "request from a thread without a completion sink"
                );
                Started::Done(-libc::EIO)
            }
        }
    }
}

impl BlockBackend for VmfsBackend {
    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn supports_discard(&self) -> bool {
        !self.read_only
    }

    fn block_size(&self) -> u32 {
        512
    }

    fn start(&self, req: &ParsedRequest, engine: &mut dyn IoEngine, user_data: u64) -> Started {
        match req.kind {
            RequestKind::Read => match self.direct(req) {
                Some(at) => self.push(engine, req, at, user_data),
                None => self.offload(req, OpKind::Read, user_data),
            },
            RequestKind::Write => {
                if req.len_bytes() == 0 {
                    return Started::Done(0);
                }
                match self.direct(req) {
                    Some(at) => self.push(engine, req, at, user_data),
                    None => self.offload(req, OpKind::Write, user_data),
                }
            }
            // Journal commit and device flush, after everything handed over before it.
            RequestKind::Flush => self.offload(req, OpKind::Flush, user_data),
            // Discard is advisory: blocks stay allocated (thin reclamation comes with UNMAP
            // support in the datastore).
            RequestKind::Discard => Started::Done(0),
            RequestKind::WriteZeroes { .. } if req.len_bytes() == 0 => Started::Done(0),
            RequestKind::WriteZeroes { .. } => self.offload(req, OpKind::WriteZeroes, user_data),
            RequestKind::GetId => Started::Done(0),
        }
    }

    fn end_batch(&self, _engine: &mut dyn IoEngine) {
        let me = std::thread::current().id();
        let Ok(mut lanes) = self.lanes.lock() else {
            return;
        };
        if let Some(lane) = lanes.iter_mut().find(|l| l.sink.owner() == me) {
            if !lane.pending.is_empty() {
                lane.sink.handed_over(lane.pending.len());
                self.worker
                    .submit(&self.file, &mut lane.pending, &lane.sink);
            }
        }
    }

    fn attach(&self, sink: &OffloadSink) {
        let Ok(mut lanes) = self.lanes.lock() else {
            return;
        };
        match lanes.iter_mut().find(|l| l.sink.owner() == sink.owner()) {
            Some(lane) => lane.sink = sink.clone(),
            None => lanes.push(Lane {
                sink: sink.clone(),
                pending: Vec::with_capacity(JOB_LIST_CAPACITY),
            }),
        }
    }

    fn flush_sync(&self) -> std::io::Result<()> {
        self.file.ds.sync().map_err(std::io::Error::other)
    }

    fn describe(&self) -> String {
        format!(
            "vmfs file {} ({} bytes{})",
            self.file.name,
            self.size,
            if self.read_only { ", read-only" } else { "" }
        )
    }
}

#[cfg(test)]
mod lease_tests {
    use vmfs::device::SimDisk;
    use vmfs::format::Provisioning;
    use vmfs::fs::{FsError, MkfsOptions};
    use vmfs::SetAttr;

    use super::*;

    /// Issue 12 finding 2: while a file is served, its blocks stay put whoever asks vmfs to
    /// truncate (the file server's O_TRUNC path calls `setattr`) or punch it: the map cache
    /// and in-flight I/O rely on it.
    #[test]
    fn served_file_cannot_be_truncated_or_punched_by_anyone() {
        let disk = Arc::new(SimDisk::new(64 << 20));
        Datastore::mkfs(disk.clone(), &MkfsOptions { uuid: None }, &mut |_, _| {}).unwrap();
        let ds = Arc::new(Datastore::mount(disk).unwrap());
        let ino = ds
            .create_file("disk.img", Provisioning::Thin, 4 << 20, &mut |_, _| {})
            .unwrap();
        ds.write(ino, 1 << 20, &[9u8; 1 << 20]).unwrap();
        // As stratad serves a disk: open, then the backend.
        ds.open(ino).unwrap();
        let b = VmfsBackend::new(ds.clone(), ino, "disk.img", false).unwrap();
        let at = ds.map_direct(ino, 1 << 20, 4096).unwrap().unwrap().0;
        let trunc = SetAttr {
            size: Some(0),
            ..SetAttr::default()
        };
        assert!(matches!(ds.setattr(ino, &trunc), Err(FsError::Busy(_))));
        assert!(matches!(
            ds.punch_hole(ino, 1 << 20, 1 << 20),
            Err(FsError::Busy(_))
        ));
        assert_eq!(ds.stat(ino).unwrap().size, 4 << 20);
        assert_eq!(ds.map_direct(ino, 1 << 20, 4096).unwrap().unwrap().0, at);
        drop(b);
        ds.setattr(ino, &trunc).unwrap();
    }
}

#[cfg(test)]
#[path = "backend_tests.rs"]
mod backend_tests;
