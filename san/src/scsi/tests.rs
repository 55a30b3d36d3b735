//! Unit tests of the SCSI unit through its contract (plan / start / complete) on raw (a
//! temporary file), null and test backends with the synchronous engine.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dataplane::backend::{BlockBackend, NullBackend, RawBackend, Started};
use dataplane::blk::request::{ParsedRequest, RequestKind};
use dataplane::engine::sync::SyncEngine;
use dataplane::engine::{Completion, IoEngine};
use dataplane::offload::OffloadSink;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::sense::{key, ua, Sense};
use super::*;

pub(crate) fn nexus(name: &str, isid: u64) -> Nexus {
    Nexus {
        initiator_port: format!("{name},i,0x{isid:012x}").into(),
        initiator_name: name.into(),
        target_port: "iqn.2026-01.test:t,t,0x0001".into(),
        relative_port: 1,
    }
}

/// One reactor's worth of context around a unit.
pub(crate) struct Harness {
    pub lu: Arc<LogicalUnit>,
    pub engine: Box<dyn IoEngine>,
    pub sink: OffloadSink,
    pub nexus: Nexus,
    pub next_ud: u64,
}

pub(crate) struct Done {
    pub status: u8,
    pub sense: Option<Sense>,
    pub data: Vec<u8>,
}

impl Done {
    pub fn good(&self) -> bool {
        self.status == status::GOOD
    }
    pub fn asc(&self) -> (u8, u8, u8) {
        let s = self.sense.expect("sense");
        (s.key, s.asc, s.ascq)
    }
}

impl Harness {
    pub fn new(lu: Arc<LogicalUnit>, nexus: Nexus) -> Self {
        let sink = OffloadSink::new(EventFd::new(EFD_NONBLOCK).unwrap());
        lu.attach(&sink);
        Harness {
            lu,
            engine: Box::new(SyncEngine::new()),
            sink,
            nexus,
            next_ud: 1,
        }
    }

    pub fn null(bytes: u64) -> Self {
        let b: Arc<dyn BlockBackend> = Arc::new(NullBackend::new(bytes, true).unwrap());
        let lu = LogicalUnit::new(
            b,
            LuConfig {
                name: "null0".into(),
                state_path: None,
            },
        )
        .unwrap();
        Harness::new(Arc::new(lu), nexus("iqn.2026-01.test:a", 1))
    }

    /// A raw unit on a temporary file; the directory lives as long as the returned guard.
    pub fn raw(bytes: u64) -> (Self, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.img");
        std::fs::File::create(&p).unwrap().set_len(bytes).unwrap();
        let b: Arc<dyn BlockBackend> = Arc::new(RawBackend::open(&p, false, false).unwrap());
        let lu = LogicalUnit::new(
            b,
            LuConfig {
                name: "raw0".into(),
                state_path: Some(dir.path().join("disk.pr")),
            },
        )
        .unwrap();
        (
            Harness::new(Arc::new(lu), nexus("iqn.2026-01.test:a", 1)),
            dir,
        )
    }

    pub fn task(&self, cdb: &[u8], data: &[u8]) -> ScsiTask {
        let mut t = ScsiTask::default();
        t.cdb[..cdb.len()].copy_from_slice(cdb);
        t.cdb_len = cdb.len() as u8;
        t.buf = data.to_vec();
        t
    }

    /// Starts `task` with user_data `ud`.
    pub fn start(&mut self, task: &mut ScsiTask, ud: u64) -> Step {
        let mut cx = ScsiCx {
            engine: &mut *self.engine,
            user_data: ud,
            offload: &self.sink,
            nexus: &self.nexus,
        };
        let step = self.lu.start(task, &mut cx);
        self.lu.end_batch(&mut *self.engine);
        step
    }

    /// Waits for the next completion (engine or mailbox).
    pub fn reap_one(&mut self) -> Completion {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.sink.inject_into(&mut *self.engine);
            self.engine.submit().unwrap();
            let mut c = [Completion::default(); 1];
            if self.engine.reap(&mut c) == 1 {
                return c[0];
            }
            assert!(Instant::now() < deadline, "no completion");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Delivers one completion to `task`.
    pub fn complete(&mut self, task: &mut ScsiTask, c: Completion) -> Step {
        let mut cx = ScsiCx {
            engine: &mut *self.engine,
            user_data: c.user_data,
            offload: &self.sink,
            nexus: &self.nexus,
        };
        let step = self.lu.complete(task, c.result, &mut cx);
        self.lu.end_batch(&mut *self.engine);
        step
    }

    /// Runs a task to its end (it must not block).
    pub fn finish(&mut self, task: &mut ScsiTask, mut step: Step) -> Done {
        loop {
            match step {
                Step::Done(o) => {
                    let data = task.buf[..o.data_in as usize].to_vec();
                    return Done {
                        status: o.status,
                        sense: o.sense,
                        data,
                    };
                }
                Step::Blocked => panic!("blocked"),
                Step::InFlight => {
                    let c = self.reap_one();
                    step = self.complete(task, c);
                }
            }
        }
    }

    /// Runs one command (checking `plan` agrees on the Data-Out length).
    pub fn run(&mut self, cdb: &[u8], data: &[u8]) -> Done {
        if let Ok(x) = self.lu.plan(cdb) {
            if x.dir == DataDir::Out {
                assert!(data.len() <= x.len as usize, "more Data-Out than planned");
            }
        }
        let mut t = self.task(cdb, data);
        let ud = self.next_ud;
        self.next_ud += 1;
        let step = self.start(&mut t, ud);
        self.finish(&mut t, step)
    }

    /// Clears the power-on unit attention.
    pub fn ready(mut self) -> Self {
        let d = self.run(&[0, 0, 0, 0, 0, 0], &[]);
        assert_eq!(d.asc(), (key::UNIT_ATTENTION, 0x29, 0x00));
        assert!(self.run(&[0, 0, 0, 0, 0, 0], &[]).good());
        self
    }
}

pub(crate) fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x28;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

pub(crate) fn write10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = read10(lba, blocks);
    c[0] = 0x2A;
    c
}

fn rw16(opcode: u8, lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = opcode;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

const MIB: u64 = 1 << 20;

#[test]
fn first_command_reports_power_on_then_runs() {
    let mut h = Harness::null(MIB);
    // INQUIRY does not report (nor clear) the unit attention.
    let d = h.run(&[0x12, 0, 0, 0, 96, 0], &[]);
    assert!(d.good());
    let d = h.run(&[0, 0, 0, 0, 0, 0], &[]);
    assert_eq!(d.asc(), (key::UNIT_ATTENTION, 0x29, 0x00));
    assert!(h.run(&[0, 0, 0, 0, 0, 0], &[]).good());
}

#[test]
fn inquiry_standard_and_vpd_pages() {
    let mut h = Harness::null(MIB).ready();
    let d = h.run(&[0x12, 0, 0, 0x01, 0x04, 0], &[]);
    assert!(d.good());
    assert_eq!(d.data.len(), 96);
    assert_eq!(d.data[0], 0);
    assert_eq!(d.data[2], 6);
    assert_eq!(d.data[3] & 0x0F, 2);
    assert_eq!(usize::from(d.data[4]), d.data.len() - 5);
    assert_eq!(&d.data[8..16], b"STRATA  ");
    // Cut to the allocation length.
    assert_eq!(h.run(&[0x12, 0, 0, 0, 5, 0], &[]).data.len(), 5);
    // Supported pages, each served.
    let d = h.run(&[0x12, 1, 0, 0, 255, 0], &[]);
    assert_eq!(&d.data[4..], &[0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]);
    for &p in &d.data[4..] {
        let v = h.run(&[0x12, 1, p, 0, 255, 0], &[]);
        assert!(v.good(), "page {p:#x}");
        assert_eq!(v.data[1], p);
        assert_eq!(
            usize::from(u16::from_be_bytes([v.data[2], v.data[3]])),
            v.data.len() - 4
        );
    }
    // Device identification: NAA, T10 vendor, relative port, target port name.
    let v = h.run(&[0x12, 1, 0x83, 0, 255, 0], &[]);
    let mut at = 4;
    let mut types = vec![];
    while at < v.data.len() {
        types.push(v.data[at + 1] & 0x0F);
        at += 4 + usize::from(v.data[at + 3]);
    }
    assert_eq!(types, vec![3, 1, 4, 8]);
    assert_eq!(v.data[4 + 4] >> 4, 3, "NAA 3");
    // Block limits: CAW length ≥ 1, max transfer, unmap limits.
    let v = h.run(&[0x12, 1, 0xB0, 0, 255, 0], &[]);
    assert!(v.data[5] >= 1);
    assert_eq!(
        u32::from_be_bytes(v.data[8..12].try_into().unwrap()),
        MAX_TRANSFER_BYTES / 512
    );
    assert!(u32::from_be_bytes(v.data[20..24].try_into().unwrap()) > 0);
    assert!(u32::from_be_bytes(v.data[24..28].try_into().unwrap()) > 0);
    // Provisioning: LBPU, LBPWS, LBPWS10, LBPRZ, thin.
    let v = h.run(&[0x12, 1, 0xB2, 0, 255, 0], &[]);
    assert_eq!(v.data[5] & 0xE4, 0xE4);
    assert_eq!(v.data[6] & 0x07, 2);
    // Unknown page, page without EVPD.
    assert_eq!(
        h.run(&[0x12, 1, 0x99, 0, 255, 0], &[]).asc(),
        (key::ILLEGAL_REQUEST, 0x24, 0)
    );
    assert_eq!(
        h.run(&[0x12, 0, 0x80, 0, 255, 0], &[]).asc(),
        (key::ILLEGAL_REQUEST, 0x24, 0)
    );
}

#[test]
fn read_capacity_10_and_16() {
    let mut h = Harness::null(8 * MIB).ready();
    let d = h.run(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
    assert_eq!(d.data, [0, 0, 0x3F, 0xFF, 0, 0, 2, 0]);
    let mut c = [0u8; 16];
    c[0] = 0x9E;
    c[1] = 0x10;
    c[13] = 32;
    let d = h.run(&c, &[]);
    assert_eq!(d.data.len(), 32);
    assert_eq!(
        u64::from_be_bytes(d.data[0..8].try_into().unwrap()),
        8 * 2048 - 1
    );
    assert_eq!(d.data[14] & 0xC0, 0xC0, "LBPME and LBPRZ");
    assert_eq!(d.data[13] & 0x0F, 0, "LBPPBE: see emulate.rs");
}

#[test]
fn write_same_unmap_without_a_block_deallocates() {
    let (h, _dir) = Harness::raw(MIB);
    let mut h = h.ready();
    assert!(h.run(&write10(1, 7), &pattern(7 * 512, 4)).good());
    let mut ws = rw16(0x93, 1, 7);
    ws[1] = 0x08;
    assert_eq!(
        h.lu.plan(&ws).map(|x| x.fit),
        Ok(Fit::ExactOrNone),
        "UNMAP: the block may be left out"
    );
    assert!(h.run(&ws, &[]).good());
    assert!(h.run(&read10(1, 7), &[]).data.iter().all(|&b| b == 0));
    // Without UNMAP the block is required.
    ws[1] = 0;
    assert_eq!(h.lu.plan(&ws).map(|x| x.fit), Ok(Fit::Exact));
    assert!(!h.run(&ws, &[]).good());
}

#[test]
fn writes_read_back_in_every_cdb_size() {
    let (h, _dir) = Harness::raw(4 * MIB);
    let mut h = h.ready();
    let data = pattern(8 * 512, 1);
    assert!(h.run(&write10(16, 8), &data).good());
    assert_eq!(h.run(&read10(16, 8), &[]).data, data);
    // 16-byte with FUA (write then flush).
    let mut w = rw16(0x8A, 100, 8);
    w[1] = 0x08;
    let data2 = pattern(8 * 512, 7);
    assert!(h.run(&w, &data2).good());
    assert_eq!(h.run(&rw16(0x88, 100, 8), &[]).data, data2);
    // 12-byte and 6-byte.
    let mut r12 = [0u8; 12];
    r12[0] = 0xA8;
    r12[2..6].copy_from_slice(&16u32.to_be_bytes());
    r12[6..10].copy_from_slice(&8u32.to_be_bytes());
    assert_eq!(h.run(&r12, &[]).data, data);
    let d = h.run(&[0x08, 0, 0, 16, 8, 0], &[]);
    assert_eq!(d.data, data);
    assert!(h.run(&[0x0A, 0, 0, 200, 1, 0], &pattern(512, 3)).good());
    assert_eq!(h.run(&read10(200, 1), &[]).data, pattern(512, 3));
    // READ(6) length 0 means 256 blocks.
    assert_eq!(h.run(&[0x08, 0, 0, 0, 0, 0], &[]).data.len(), 256 * 512);
    // Zero blocks: nothing moves.
    assert!(h.run(&read10(0, 0), &[]).good());
    // The largest transfer works, one block more is refused.
    let big = (MAX_TRANSFER_BYTES / 512) as u16;
    assert_eq!(
        h.run(&read10(0, big), &[]).data.len(),
        MAX_TRANSFER_BYTES as usize
    );
    assert_eq!(
        h.run(&read10(0, big + 1), &[]).asc(),
        (key::ILLEGAL_REQUEST, 0x24, 0)
    );
    // Synchronize cache.
    assert!(h.run(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).good());
    assert!(h.run(&rw16(0x91, 0, 0), &[]).good());
}

#[test]
fn short_data_out_writes_whole_blocks_only() {
    let (h, _dir) = Harness::raw(MIB);
    let mut h = h.ready();
    assert!(h.run(&write10(0, 2), &pattern(1024, 9)).good());
    // Two blocks asked, one arrived: that one is written.
    assert!(h.run(&write10(0, 2), &pattern(512, 1)).good());
    let d = h.run(&read10(0, 2), &[]);
    assert_eq!(d.data[..512], pattern(512, 1)[..]);
    assert_eq!(d.data[512..], pattern(1024, 9)[512..]);
    // Part of a block: refused.
    assert_eq!(
        h.run(&write10(0, 1), &[1; 200]).asc(),
        (key::ILLEGAL_REQUEST, 0x0E, 0x03)
    );
}

#[test]
fn out_of_range_protection_and_unknown_opcodes() {
    let mut h = Harness::null(MIB).ready();
    let blocks = (MIB / 512) as u32;
    assert_eq!(
        h.run(&read10(blocks, 1), &[]).asc(),
        (key::ILLEGAL_REQUEST, 0x21, 0)
    );
    assert_eq!(
        h.run(&read10(blocks - 1, 2), &[]).asc(),
        (key::ILLEGAL_REQUEST, 0x21, 0)
    );
    assert!(h.run(&read10(blocks - 1, 1), &[]).good());
    assert!(h.run(&read10(blocks, 0), &[]).good());
    assert_eq!(
        h.run(&read10(blocks + 1, 0), &[]).asc(),
        (key::ILLEGAL_REQUEST, 0x21, 0)
    );
    assert_eq!(
        h.run(&rw16(0x88, u64::MAX, 1), &[]).asc(),
        (key::ILLEGAL_REQUEST, 0x21, 0)
    );
    assert_eq!(
        h.run(&rw16(0x88, 1 << 63, 0), &[]).asc(),
        (key::ILLEGAL_REQUEST, 0x21, 0)
    );
    let mut r = read10(0, 1);
    r[1] = 0x20; // RDPROTECT
    assert_eq!(h.run(&r, &[]).asc(), (key::ILLEGAL_REQUEST, 0x24, 0));
    assert_eq!(
        h.run(&[0xC0, 0, 0, 0, 0, 0], &[]).asc(),
        (key::ILLEGAL_REQUEST, 0x20, 0)
    );
    assert_eq!(h.lu.plan(&[0xC0]), Err(Sense::invalid_opcode()));
    assert_eq!(h.lu.plan(&[0x28, 0, 0]), Err(Sense::invalid_field_in_cdb()));
    assert_eq!(
        h.lu.plan(&read10(0, 4)),
        Ok(Xfer {
            dir: DataDir::In,
            len: 2048,
            fit: Fit::Residual,
        })
    );
}

#[test]
fn request_sense_reports_and_clears_unit_attention() {
    let mut h = Harness::null(MIB);
    let d = h.run(&[0x03, 0, 0, 0, 18, 0], &[]);
    assert!(d.good());
    assert_eq!(
        (d.data[2] & 0x0F, d.data[12], d.data[13]),
        (key::UNIT_ATTENTION, 0x29, 0)
    );
    let d = h.run(&[0x03, 0, 0, 0, 18, 0], &[]);
    assert_eq!((d.data[2] & 0x0F, d.data[12]), (key::NO_SENSE, 0));
    // Descriptor format.
    let d = h.run(&[0x03, 1, 0, 0, 252, 0], &[]);
    assert_eq!(d.data[0], 0x72);
}

#[test]
fn mode_sense_and_select() {
    let mut h = Harness::null(MIB).ready();
    // All pages, MODE SENSE(6), with a block descriptor.
    let d = h.run(&[0x1A, 0, 0x3F, 0, 255, 0], &[]);
    assert!(d.good());
    assert_eq!(usize::from(d.data[0]), d.data.len() - 1);
    assert_eq!(d.data[2] & 0x10, 0x10, "DPOFUA");
    assert_eq!(d.data[3], 8);
    let pages: Vec<u8> = {
        let mut at = 4 + 8;
        let mut v = vec![];
        while at < d.data.len() {
            v.push(d.data[at] & 0x3F);
            at += 2 + usize::from(d.data[at + 1]);
        }
        v
    };
    assert_eq!(pages, vec![0x08, 0x0A, 0x1C]);
    // Caching page alone, DBD, MODE SENSE(10) with long LBA.
    let d = h.run(&[0x1A, 0x08, 0x08, 0, 255, 0], &[]);
    assert_eq!(d.data[3], 0);
    assert_eq!(d.data[4], 0x08);
    assert_eq!(d.data[6] & 0x04, 0x04, "WCE");
    let d = h.run(&[0x5A, 0x10, 0x0A, 0, 0, 0, 0, 0, 255, 0], &[]);
    assert_eq!(u16::from_be_bytes([d.data[6], d.data[7]]), 16);
    assert_eq!(d.data[8 + 16], 0x0A);
    // Changeable: nothing. Saved: not supported. Unknown page: refused.
    let d = h.run(&[0x1A, 0x08, 0x48, 0, 255, 0], &[]);
    assert_eq!(d.data[4 + 2], 0);
    assert_eq!(
        h.run(&[0x1A, 0, 0xC8, 0, 255, 0], &[]).asc(),
        (key::ILLEGAL_REQUEST, 0x39, 0)
    );
    assert_eq!(
        h.run(&[0x1A, 0, 0x19, 0, 255, 0], &[]).asc(),
        (key::ILLEGAL_REQUEST, 0x24, 0)
    );
    // MODE SELECT: the current caching page back is accepted, a change is refused.
    let cur = h.run(&[0x1A, 0x08, 0x08, 0, 255, 0], &[]).data;
    let mut list = vec![0u8; 4];
    list.extend_from_slice(&cur[4..]);
    let n = list.len() as u8;
    assert!(h.run(&[0x15, 0x10, 0, 0, n, 0], &list).good());
    list[4 + 2] &= !0x04; // clear WCE
    assert_eq!(
        h.run(&[0x15, 0x10, 0, 0, n, 0], &list).asc(),
        (key::ILLEGAL_REQUEST, 0x26, 0)
    );
    assert_eq!(
        h.run(&[0x15, 0x11, 0, 0, n, 0], &list).asc(),
        (key::ILLEGAL_REQUEST, 0x24, 0)
    );
}

fn unmap_list(descs: &[(u64, u32)]) -> Vec<u8> {
    let mut v = vec![0u8; 8];
    v[0..2].copy_from_slice(&((6 + 16 * descs.len()) as u16).to_be_bytes());
    v[2..4].copy_from_slice(&((16 * descs.len()) as u16).to_be_bytes());
    for &(lba, n) in descs {
        v.extend_from_slice(&lba.to_be_bytes());
        v.extend_from_slice(&n.to_be_bytes());
        v.extend_from_slice(&[0; 4]);
    }
    v
}

fn unmap_cdb(len: usize) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x42;
    c[7..9].copy_from_slice(&(len as u16).to_be_bytes());
    c
}

#[test]
fn unmap_deallocates_to_zeroes_and_validates_the_list() {
    let (h, _dir) = Harness::raw(4 * MIB);
    let mut h = h.ready();
    assert!(h.run(&write10(0, 64), &pattern(64 * 512, 5)).good());
    let list = unmap_list(&[(8, 8), (32, 16), (40, 0)]);
    assert!(h.run(&unmap_cdb(list.len()), &list).good());
    let d = h.run(&read10(0, 64), &[]).data;
    let want = pattern(64 * 512, 5);
    assert_eq!(d[..8 * 512], want[..8 * 512]);
    assert!(d[8 * 512..16 * 512].iter().all(|&b| b == 0));
    assert_eq!(d[16 * 512..32 * 512], want[16 * 512..32 * 512]);
    assert!(d[32 * 512..48 * 512].iter().all(|&b| b == 0));
    // Empty list, beyond the end, too many blocks, too short.
    assert!(h.run(&unmap_cdb(0), &[]).good());
    let blocks = 4 * MIB / 512;
    let l = unmap_list(&[(blocks - 1, 2)]);
    assert_eq!(
        h.run(&unmap_cdb(l.len()), &l).asc(),
        (key::ILLEGAL_REQUEST, 0x21, 0)
    );
    let l = unmap_list(&[(0, u32::MAX)]);
    assert_eq!(
        h.run(&unmap_cdb(l.len()), &l).asc(),
        (key::ILLEGAL_REQUEST, 0x26, 0)
    );
    assert_eq!(
        h.run(&unmap_cdb(4), &[0; 4]).asc(),
        (key::ILLEGAL_REQUEST, 0x1A, 0)
    );
    let mut anchor = unmap_cdb(0);
    anchor[1] = 1;
    assert_eq!(h.run(&anchor, &[]).asc(), (key::ILLEGAL_REQUEST, 0x24, 0));
}

#[test]
fn write_same_pattern_zero_unmap_and_ndob() {
    let (h, _dir) = Harness::raw(8 * MIB);
    let mut h = h.ready();
    let block = pattern(512, 42);
    // WRITE SAME(10) of 3000 blocks (more than one chunk).
    let mut c = [0u8; 10];
    c[0] = 0x41;
    c[2..6].copy_from_slice(&10u32.to_be_bytes());
    c[7..9].copy_from_slice(&3000u16.to_be_bytes());
    assert!(h.run(&c, &block).good());
    for lba in [10u32, 1000, 2500, 3009] {
        assert_eq!(h.run(&read10(lba, 1), &[]).data, block, "lba {lba}");
    }
    assert_ne!(h.run(&read10(3010, 1), &[]).data, block);
    // WRITE SAME(16) with UNMAP and zeroes, then NDOB.
    let mut c16 = rw16(0x93, 10, 100);
    c16[1] = 0x08;
    assert!(h.run(&c16, &[0; 512]).good());
    assert!(h.run(&read10(10, 100), &[]).data.iter().all(|&b| b == 0));
    let mut c16 = rw16(0x93, 1000, 10);
    c16[1] = 0x09;
    assert!(h.run(&c16, &[]).good());
    assert!(h.run(&read10(1000, 10), &[]).data.iter().all(|&b| b == 0));
    // Zero blocks (WSNZ), ANCHOR, beyond the end.
    let mut z = c;
    z[7..9].copy_from_slice(&0u16.to_be_bytes());
    assert_eq!(h.run(&z, &block).asc(), (key::ILLEGAL_REQUEST, 0x24, 0));
    let mut a = rw16(0x93, 0, 1);
    a[1] = 0x18;
    assert_eq!(h.run(&a, &block).asc(), (key::ILLEGAL_REQUEST, 0x24, 0));
    let end = 8 * MIB / 512;
    assert_eq!(
        h.run(&rw16(0x93, end - 1, 2), &block).asc(),
        (key::ILLEGAL_REQUEST, 0x21, 0)
    );
}

#[test]
fn write_same_length_is_bounded_with_and_without_unmap() {
    let (h, _dir) = Harness::raw(64 * MIB);
    let mut h = h.ready();
    let page = h.run(&[0x12, 0x01, 0xB0, 0, 64, 0], &[]).data;
    assert_eq!(page[4] & 0x01, 1, "WSNZ");
    assert_eq!(
        &page[36..44],
        &0xFFFFu64.to_be_bytes(),
        "MAXIMUM WRITE SAME LENGTH"
    );
    for unmap in [0u8, 0x08] {
        // One block more than the limit (libiscsi's WriteSame16.Unmap sends 65536).
        let mut ws = rw16(0x93, 0, 65536);
        ws[1] = unmap;
        assert_eq!(h.lu.plan(&ws), Err(Sense::invalid_field_in_cdb()));
        let mut ok = rw16(0x93, 0, 65535);
        ok[1] = unmap;
        assert!(h.lu.plan(&ok).is_ok());
    }
}

#[test]
fn verify_compares_and_reports_the_offset() {
    let (h, _dir) = Harness::raw(MIB);
    let mut h = h.ready();
    let data = pattern(4 * 512, 3);
    assert!(h.run(&write10(4, 4), &data).good());
    let mut v = read10(4, 4);
    v[0] = 0x2F;
    v[1] = 0x02; // BYTCHK 1
    assert!(h.run(&v, &data).good());
    let mut bad = data.clone();
    bad[1000] ^= 1;
    let d = h.run(&v, &bad);
    assert_eq!(d.asc(), (key::MISCOMPARE, 0x1D, 0));
    assert_eq!(d.sense.unwrap().info, Some(1000));
    // BYTCHK 0: medium check only.
    v[1] = 0;
    assert!(h.run(&v, &[]).good());
    // BYTCHK 3: one block against each.
    let one = pattern(512, 77);
    let mut ws = [0u8; 10];
    ws[0] = 0x41;
    ws[2..6].copy_from_slice(&4u32.to_be_bytes());
    ws[7..9].copy_from_slice(&4u16.to_be_bytes());
    assert!(h.run(&ws, &one).good());
    v[1] = 0x06;
    assert!(h.run(&v, &one).good());
    // WRITE AND VERIFY(16).
    assert!(h.run(&rw16(0x8E, 20, 4), &data).good());
    assert_eq!(h.run(&read10(20, 4), &[]).data, data);
}

/// COMPARE AND WRITE of `blocks` at `lba`.
pub(crate) fn caw(lba: u64, blocks: u8) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x89;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[13] = blocks;
    c
}

#[test]
fn compare_and_write_matches_then_writes_or_reports_miscompare() {
    let (h, _dir) = Harness::raw(MIB);
    let mut h = h.ready();
    let old = pattern(1024, 1);
    let new = pattern(1024, 2);
    assert!(h.run(&write10(8, 2), &old).good());
    let mut data = old.clone();
    data.extend_from_slice(&new);
    assert!(h.run(&caw(8, 2), &data).good());
    assert_eq!(h.run(&read10(8, 2), &[]).data, new);
    // The same command again miscompares (the blocks now hold `new`) at byte 0.
    let d = h.run(&caw(8, 2), &data);
    assert_eq!(d.asc(), (key::MISCOMPARE, 0x1D, 0));
    assert_ne!(h.run(&read10(8, 2), &[]).data, old);
    let mut partial = new.clone();
    partial[700] ^= 0xFF;
    partial.extend_from_slice(&old);
    let d = h.run(&caw(8, 2), &partial);
    assert_eq!(d.sense.unwrap().info, Some(700));
    assert_eq!(h.run(&read10(8, 2), &[]).data, new);
    // Wrong Data-Out size, too many blocks.
    assert!(!h.run(&caw(8, 2), &new).good());
    assert_eq!(
        h.lu.plan(&caw(8, 255)),
        Ok(Xfer {
            dir: DataDir::Out,
            len: 2 * 255 * 512,
            fit: Fit::Exact,
        })
    );
    assert!(h.run(&caw(8, 0), &[]).good());
}

#[test]
fn orwrite_ors_the_data_into_the_blocks_atomically() {
    let (a, _dir) = Harness::raw(MIB);
    let mut a = a.ready();
    assert!(a.run(&write10(3, 2), &[0x0Fu8; 1024]).good());
    let or = rw16(0x8B, 3, 2);
    assert_eq!(
        a.lu.plan(&or).map(|x| (x.len, x.fit)),
        Ok((1024, Fit::Exact))
    );
    let mut data = vec![0xA0u8; 1024];
    data[1023] = 0x50;
    assert!(a.run(&or, &data).good());
    let got = a.run(&read10(3, 2), &[]).data;
    assert!(got[..1023].iter().all(|&b| b == 0xAF));
    assert_eq!(got[1023], 0x5F);
    // FUA (a flush after the write), zero blocks, beyond the end, protection information.
    let mut fua = or;
    fua[1] = 0x08;
    assert!(a.run(&fua, &[0u8; 1024]).good());
    assert!(a.run(&rw16(0x8B, 0, 0), &[]).good());
    let end = MIB / 512;
    assert_eq!(
        a.run(&rw16(0x8B, end, 1), &[0; 512]).asc(),
        (key::ILLEGAL_REQUEST, 0x21, 0)
    );
    let mut prot = or;
    prot[1] = 0x20;
    assert_eq!(a.lu.plan(&prot), Err(Sense::invalid_field_in_cdb()));
    // It waits for an overlapping read in flight, like COMPARE AND WRITE, and a write
    // arriving meanwhile waits behind it.
    let mut rd = a.task(&read10(4, 1), &[]);
    assert_eq!(a.start(&mut rd, 100), Step::InFlight);
    let c_read = a.reap_one();
    let mut ow = a.task(&rw16(0x8B, 4, 1), &[0x01; 512]);
    assert_eq!(a.start(&mut ow, 101), Step::Blocked);
    let mut wr = a.task(&write10(4, 1), &[0x10; 512]);
    assert_eq!(a.start(&mut wr, 102), Step::Blocked);
    assert!(a.complete(&mut rd, c_read) != Step::InFlight);
    let step = a.start(&mut ow, 101);
    assert_eq!(step, Step::InFlight);
    assert!(a.finish(&mut ow, step).good());
    let step = a.start(&mut wr, 102);
    assert!(a.finish(&mut wr, step).good());
    assert_eq!(a.run(&read10(4, 1), &[]).data, vec![0x10; 512]);
    assert_eq!(a.lu.lock_state().locks.held(), 0);
}

#[test]
fn compare_and_write_is_atomic_across_nexuses() {
    let (a, _dir) = Harness::raw(MIB);
    let mut a = a.ready();
    let mut b = Harness::new(a.lu.clone(), nexus("iqn.2026-01.test:b", 2)).ready();
    let old = pattern(512, 1);
    assert!(a.run(&write10(5, 1), &old).good());
    // A read on A is in flight (its completion not yet delivered).
    let mut rd = a.task(&read10(4, 4), &[]);
    assert_eq!(a.start(&mut rd, 100), Step::InFlight);
    let c_read = a.reap_one();
    // B's COMPARE AND WRITE on an overlapping block waits for it.
    let mut data = old.clone();
    data.extend_from_slice(&pattern(512, 9));
    let mut cw = b.task(&caw(5, 1), &data);
    assert_eq!(b.start(&mut cw, 200), Step::Blocked);
    // While the CAW waits, a new overlapping write from A waits behind it; others run.
    let mut wr = a.task(&write10(5, 1), &pattern(512, 3));
    assert_eq!(a.start(&mut wr, 101), Step::Blocked);
    assert!(a.run(&read10(100, 1), &[]).good());
    // The read finishes: the CAW runs (its read in flight), and the write still waits.
    assert!(
        a.complete(&mut rd, c_read)
            == Step::Done(Outcome {
                status: 0,
                sense: None,
                data_in: 2048
            })
    );
    let step = b.start(&mut cw, 200);
    assert_eq!(step, Step::InFlight);
    assert_eq!(a.start(&mut wr, 101), Step::Blocked);
    let d = b.finish(&mut cw, step);
    assert!(d.good());
    // Now the write runs, after the CAW.
    let step = a.start(&mut wr, 101);
    assert!(a.finish(&mut wr, step).good());
    assert_eq!(a.run(&read10(5, 1), &[]).data, pattern(512, 3));
    // An abandoned waiting CAW releases its place.
    let mut rd = a.task(&read10(5, 1), &[]);
    assert_eq!(a.start(&mut rd, 102), Step::InFlight);
    let c = a.reap_one();
    let mut cw = b.task(&caw(5, 1), &data);
    assert_eq!(b.start(&mut cw, 201), Step::Blocked);
    b.lu.abandon(&mut cw);
    assert!(a.complete(&mut rd, c) != Step::InFlight);
    assert_eq!(a.lu.lock_state().locks.held(), 0);
}

#[test]
fn get_lba_status_and_report_opcodes() {
    let mut h = Harness::null(MIB).ready();
    let mut c = [0u8; 16];
    c[0] = 0x9E;
    c[1] = 0x12;
    c[2..10].copy_from_slice(&5u64.to_be_bytes());
    c[13] = 24;
    let d = h.run(&c, &[]);
    assert_eq!(d.data.len(), 24);
    assert_eq!(u64::from_be_bytes(d.data[8..16].try_into().unwrap()), 5);
    assert_eq!(
        u32::from_be_bytes(d.data[16..20].try_into().unwrap()),
        2048 - 5
    );
    assert_eq!(d.data[20] & 0x0F, 0);
    c[2..10].copy_from_slice(&2048u64.to_be_bytes());
    assert_eq!(h.run(&c, &[]).asc(), (key::ILLEGAL_REQUEST, 0x21, 0));
    // All commands, then each one alone.
    let all = h.run(&[0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0], &[]);
    assert!(all.good());
    let len = u32::from_be_bytes(all.data[0..4].try_into().unwrap()) as usize;
    assert_eq!(len, all.data.len() - 4);
    for d in all.data[4..].chunks(8) {
        let servactv = d[5] & 1 != 0;
        let opt = if servactv { 2 } else { 1 };
        let one = h.run(&[0xA3, 0x0C, opt, d[0], d[2], d[3], 0, 0, 1, 0, 0, 0], &[]);
        assert!(one.good(), "opcode {:#x}", d[0]);
        assert_eq!(one.data[1] & 0x07, 3);
        assert_eq!(one.data[4], d[0]);
        let wrong = if servactv { 1 } else { 2 };
        let bad = h.run(
            &[0xA3, 0x0C, wrong, d[0], d[2], d[3], 0, 0, 1, 0, 0, 0],
            &[],
        );
        // INVALID FIELD IN CDB pointing at the REPORTING OPTIONS byte (a pointer-less one
        // reads as "command not supported" to initiators).
        assert_eq!(bad.asc(), (key::ILLEGAL_REQUEST, 0x24, 0));
        assert_eq!(bad.sense.and_then(|s| s.field), Some(2));
        let mut fixed = [0u8; crate::scsi::sense::FIXED_SENSE_LEN];
        bad.sense.expect("sense").write_fixed(&mut fixed);
        assert_eq!(fixed[15..18], [0xC0, 0, 2], "SKSV, C/D, FIELD POINTER");
    }
    // An unsupported opcode: "not supported".
    let one = h.run(&[0xA3, 0x0C, 1, 0xC0, 0, 0, 0, 0, 1, 0, 0, 0], &[]);
    assert_eq!(one.data[1] & 0x07, 1);
}

#[test]
fn read_defect_data_reports_empty_lists() {
    let mut h = Harness::null(MIB).ready();
    // (10): both lists, short block format.
    let d = h.run(&[0x37, 0, 0x18, 0, 0, 0, 0, 0, 32, 0], &[]);
    assert!(d.good());
    assert_eq!(d.data, [0, 0x18, 0, 0]);
    // (12): the request bits in byte 1; 8-byte header.
    let d = h.run(&[0xB7, 0x13, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0], &[]);
    assert!(d.good());
    assert_eq!(d.data, [0, 0x13, 0, 0, 0, 0, 0, 0]);
    // Cut to the allocation length; a reserved format is refused.
    assert_eq!(h.run(&[0x37, 0, 0, 0, 0, 0, 0, 0, 2, 0], &[]).data.len(), 2);
    assert_eq!(
        h.run(&[0x37, 0, 0x01, 0, 0, 0, 0, 0, 32, 0], &[]).asc(),
        (key::ILLEGAL_REQUEST, 0x24, 0)
    );
}

#[test]
fn reset_and_capacity_unit_attentions() {
    let mut a = Harness::null(MIB).ready();
    let mut b = Harness::new(a.lu.clone(), nexus("iqn.2026-01.test:b", 2)).ready();
    a.lu.reset(&a.nexus, false);
    assert_eq!(
        a.run(&[0, 0, 0, 0, 0, 0], &[]).asc(),
        ua::LUN_RESET.key_asc()
    );
    assert!(a.run(&[0, 0, 0, 0, 0, 0], &[]).good());
    assert_eq!(
        b.run(&[0, 0, 0, 0, 0, 0], &[]).asc(),
        ua::LUN_RESET.key_asc()
    );
    assert!(b.run(&[0, 0, 0, 0, 0, 0], &[]).good());
    // A lost nexus starts again with POWER ON.
    b.lu.nexus_lost(&b.nexus);
    assert_eq!(
        b.run(&[0, 0, 0, 0, 0, 0], &[]).asc(),
        ua::POWER_ON.key_asc()
    );
}

impl Sense {
    pub(crate) fn key_asc(&self) -> (u8, u8, u8) {
        (self.key, self.asc, self.ascq)
    }
}

/// A backend whose writes fail with a fixed errno.
#[derive(Debug)]
struct FailingWrites(i32);

impl BlockBackend for FailingWrites {
    fn size_bytes(&self) -> u64 {
        MIB
    }
    fn read_only(&self) -> bool {
        false
    }
    fn supports_discard(&self) -> bool {
        true
    }
    fn block_size(&self) -> u32 {
        512
    }
    fn start(&self, req: &ParsedRequest, _e: &mut dyn IoEngine, _ud: u64) -> Started {
        match req.kind {
            RequestKind::Read => Started::Done(req.data_len as i32),
            _ => Started::Done(-self.0),
        }
    }
    fn flush_sync(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn describe(&self) -> String {
        "failing".into()
    }
}

#[test]
fn backend_errors_map_to_sense() {
    for (errno, want) in [
        (libc::ENOSPC, (key::DATA_PROTECT, 0x27, 0x07)),
        (libc::EIO, (key::MEDIUM_ERROR, 0x0C, 0x00)),
        (libc::EINVAL, (key::HARDWARE_ERROR, 0x44, 0x00)),
    ] {
        let lu = LogicalUnit::new(
            Arc::new(FailingWrites(errno)),
            LuConfig {
                name: "f".into(),
                state_path: None,
            },
        )
        .unwrap();
        let mut h = Harness::new(Arc::new(lu), nexus("iqn.2026-01.test:a", 1)).ready();
        assert_eq!(
            h.run(&write10(0, 1), &[0; 512]).asc(),
            want,
            "errno {errno}"
        );
        assert!(h.run(&read10(0, 1), &[]).good());
    }
    let lu = LogicalUnit::new(
        Arc::new(FailingWrites(libc::EAGAIN)),
        LuConfig {
            name: "f".into(),
            state_path: None,
        },
    )
    .unwrap();
    let mut h = Harness::new(Arc::new(lu), nexus("iqn.2026-01.test:a", 1)).ready();
    assert_eq!(h.run(&write10(0, 1), &[0; 512]).status, status::BUSY);
}

/// A deferred request: kind, disk offset, buffer address and length, user_data.
type Deferred = (RequestKind, u64, usize, usize, u64);

/// A backend that defers every request to `end_batch` and completes it there through the
/// engine (what a datastore backend does, with its worker thread in between).
#[derive(Debug)]
struct Deferring {
    mem: Mutex<Vec<u8>>,
    pending: Mutex<Vec<Deferred>>,
}

// SAFETY (test): the raw iovec pointer in `pending` is only used in end_batch, on the thread
// that started the request, while the task (and its buffer) is in flight.
impl BlockBackend for Deferring {
    fn size_bytes(&self) -> u64 {
        self.mem.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        false
    }
    fn supports_discard(&self) -> bool {
        false
    }
    fn block_size(&self) -> u32 {
        4096
    }
    fn start(&self, req: &ParsedRequest, _e: &mut dyn IoEngine, ud: u64) -> Started {
        let iov = req.iov[0];
        self.pending.lock().unwrap().push((
            req.kind,
            req.offset_bytes(),
            iov.iov_base as usize,
            if req.iov_count > 0 { iov.iov_len } else { 0 },
            ud,
        ));
        Started::Submitted(1)
    }
    fn end_batch(&self, engine: &mut dyn IoEngine) {
        let mut mem = self.mem.lock().unwrap();
        for (kind, off, ptr, len, ud) in self.pending.lock().unwrap().drain(..) {
            let off = off as usize;
            // SAFETY: ptr/len is the iovec of a task still in flight (see above).
            let buf = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) };
            match kind {
                RequestKind::Read => buf.copy_from_slice(&mem[off..off + len]),
                RequestKind::Write => mem[off..off + len].copy_from_slice(buf),
                _ => {}
            }
            engine.inject(ud, len as i32);
        }
    }
    fn flush_sync(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn describe(&self) -> String {
        "deferring".into()
    }
}

#[test]
fn deferred_backend_with_4k_blocks_completes_through_end_batch() {
    let b = Arc::new(Deferring {
        mem: Mutex::new(vec![0; MIB as usize]),
        pending: Mutex::new(vec![]),
    });
    let lu = LogicalUnit::new(
        b.clone(),
        LuConfig {
            name: "d".into(),
            state_path: None,
        },
    )
    .unwrap();
    let mut h = Harness::new(Arc::new(lu), nexus("iqn.2026-01.test:a", 1)).ready();
    let data = pattern(2 * 4096, 4);
    assert!(h.run(&write10(3, 2), &data).good());
    assert_eq!(h.run(&read10(3, 2), &[]).data, data);
    let d = h.run(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
    assert_eq!(d.data[4..8], 4096u32.to_be_bytes());
    // Not thin: no UNMAP, provisioning page without LBPU.
    assert_eq!(
        h.run(&unmap_cdb(0), &[]).asc(),
        (key::ILLEGAL_REQUEST, 0x20, 0)
    );
    let mut ws = [0u8; 10];
    ws[0] = 0x41;
    ws[7..9].copy_from_slice(&2u16.to_be_bytes());
    ws[1] = 0x08;
    assert!(h.run(&ws, &[0; 4096]).good());
    assert!(h.run(&read10(0, 2), &[]).data.iter().all(|&b| b == 0));
    // The disk grows: the next command reports CAPACITY DATA HAS CHANGED, then runs.
    b.mem.lock().unwrap().resize(2 * MIB as usize, 0);
    assert_eq!(
        h.run(&read10(300, 1), &[]).asc(),
        ua::CAPACITY_CHANGED.key_asc()
    );
    assert!(h.run(&read10(300, 1), &[]).good());
}

#[test]
fn reserve6_excludes_other_nexuses() {
    let mut a = Harness::null(MIB).ready();
    let mut b = Harness::new(a.lu.clone(), nexus("iqn.2026-01.test:b", 2)).ready();
    assert!(a.run(&[0x16, 0, 0, 0, 0, 0], &[]).good());
    assert!(a.run(&[0x16, 0, 0, 0, 0, 0], &[]).good());
    assert_eq!(
        b.run(&[0x16, 0, 0, 0, 0, 0], &[]).status,
        status::RESERVATION_CONFLICT
    );
    assert!(b.run(&[0x17, 0, 0, 0, 0, 0], &[]).good());
    assert_eq!(
        b.run(&[0x1A, 0, 0x3F, 0, 255, 0], &[]).status,
        status::RESERVATION_CONFLICT
    );
    assert!(b.run(&[0x12, 0, 0, 0, 36, 0], &[]).good());
    assert!(a.run(&[0x1A, 0, 0x3F, 0, 255, 0], &[]).good());
    assert!(a.run(&[0x17, 0, 0, 0, 0, 0], &[]).good());
    assert!(b.run(&[0x16, 0, 0, 0, 0, 0], &[]).good());
    // A LUN reset drops it.
    a.lu.reset(&a.nexus, false);
    let _ = a.run(&[0, 0, 0, 0, 0, 0], &[]);
    assert!(a.run(&[0x16, 0, 0, 0, 0, 0], &[]).good());
}

#[test]
fn no_such_lun_and_report_luns() {
    let mut buf = Vec::new();
    let o = no_such_lun(&[0x12, 0, 0, 0, 36, 0], &mut buf);
    assert_eq!(o.status, status::GOOD);
    assert_eq!(buf[0], 0x7F);
    let o = no_such_lun(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], &mut buf);
    assert_eq!(o.sense, Some(Sense::lun_not_supported()));
    let o = no_such_lun(&[0x03, 0, 0, 0, 18, 0], &mut buf);
    assert_eq!((o.status, buf[12]), (status::GOOD, 0x25));
    let mut c = [0u8; 12];
    c[0] = 0xA0;
    c[9] = 255;
    let o = report_luns(&c, &[0, 1, 300], &mut buf);
    assert_eq!(o.data_in, 8 + 24);
    assert_eq!(buf[0..4], 24u32.to_be_bytes());
    assert_eq!(buf[8 + 8 + 1], 1);
    assert_eq!(buf[8 + 16], 0x41);
    c[9] = 15;
    assert_eq!(
        report_luns(&c, &[0], &mut buf).sense,
        Some(Sense::invalid_field_in_cdb())
    );
    c[9] = 16;
    c[2] = 0x77;
    assert_eq!(
        report_luns(&c, &[0], &mut buf).sense,
        Some(Sense::invalid_field_in_cdb())
    );
}

mod fuzz {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any CDB with any Data-Out: plan and start never panic, and a finished command's
        /// Data-In fits the buffer and the plan.
        #[test]
        fn any_cdb_any_data(cdb in proptest::collection::vec(any::<u8>(), 0..=16),
                            opcode in prop::sample::select(vec![0x00u8, 0x03, 0x08, 0x0A, 0x12, 0x15, 0x16, 0x17, 0x1A, 0x1B, 0x25, 0x28, 0x2A, 0x2E, 0x2F, 0x34, 0x35, 0x37, 0x41, 0x42, 0x55, 0x5A, 0x5E, 0x5F, 0x88, 0x89, 0x8A, 0x8B, 0x8E, 0x8F, 0x90, 0x91, 0x93, 0x9E, 0xA0, 0xA3, 0xA8, 0xAA, 0xAE, 0xAF, 0xB7, 0xFF]),
                            data in proptest::collection::vec(any::<u8>(), 0..600),
                            fill in 0usize..3) {
            let mut h = Harness::null(64 * 1024);
            let mut cdb = cdb;
            // Mostly implemented opcodes (deep paths), sometimes the random one.
            if let (Some(c), false) = (cdb.first_mut(), fill == 2) { *c = opcode; }
            let plan = h.lu.plan(&cdb);
            let mut data = data;
            if let (Ok(x), 1) = (plan, fill) {
                // Exactly the Data-Out the plan asks for (bounded for the test).
                data.resize((x.len as usize).min(64 * 1024), 0x5A);
            }
            if let Ok(x) = plan {
                if x.dir == DataDir::Out { data.truncate(x.len as usize); }
            }
            for _ in 0..2 {
                let mut t = h.task(&cdb, &data);
                let step = h.start(&mut t, 9);
                if step == Step::Blocked { h.lu.abandon(&mut t); continue; }
                let d = h.finish(&mut t, step);
                if let Ok(x) = plan {
                    if x.dir == DataDir::In { prop_assert!(d.data.len() <= x.len as usize); }
                }
            }
        }
    }
}

#[test]
fn io_uring_with_o_direct_4k_blocks_bounces_unaligned_buffers() {
    let Ok(engine) = dataplane::engine::uring::UringEngine::new() else {
        eprintln!("io_uring unavailable: test skipped");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("direct.img");
    std::fs::File::create(&p).unwrap().set_len(4 * MIB).unwrap();
    let Ok(b) = RawBackend::open(&p, false, true) else {
        eprintln!("O_DIRECT unsupported here: test skipped");
        return;
    };
    let lu = LogicalUnit::new(
        Arc::new(b),
        LuConfig {
            name: "direct".into(),
            state_path: None,
        },
    )
    .unwrap();
    let mut h = Harness::new(Arc::new(lu), nexus("iqn.2026-01.test:a", 1));
    h.engine = Box::new(engine);
    let mut h = h.ready();
    let data = pattern(64 * 4096, 11);
    assert!(h.run(&write10(7, 64), &data).good());
    assert_eq!(h.run(&read10(7, 64), &[]).data, data);
    // CAW and FUA through the same path.
    let mut cw = data[..4096].to_vec();
    cw.extend_from_slice(&pattern(4096, 12));
    assert!(h.run(&caw(7, 1), &cw).good());
    assert_eq!(h.run(&read10(7, 1), &[]).data, pattern(4096, 12));
    let mut w = rw16(0x8A, 100, 2);
    w[1] = 0x08;
    assert!(h.run(&w, &pattern(8192, 13)).good());
    assert_eq!(h.run(&rw16(0x88, 100, 2), &[]).data, pattern(8192, 13));
}

#[test]
fn block_limits_stay_within_what_initiators_accept() {
    let mut h = Harness::null(MIB).ready();
    let v = h.run(&[0x12, 1, 0xB0, 0, 255, 0], &[]).data;
    assert_eq!(v[3], 0x3C);
    let max_unmap = u32::from_be_bytes(v[20..24].try_into().unwrap());
    let max_bdc = u32::from_be_bytes(v[24..28].try_into().unwrap());
    assert!(max_unmap > 0 && max_unmap <= 1 << 20);
    assert!(max_bdc > 0 && max_bdc <= 1 << 20);
    let max_ws = u64::from_be_bytes(v[36..44].try_into().unwrap());
    // One block past MAXIMUM WRITE SAME LENGTH is refused, with or without UNMAP.
    for flags in [0u8, 0x08] {
        let mut c = rw16(0x93, 0, (max_ws + 1) as u32);
        c[1] = flags;
        assert_eq!(
            h.lu.plan(&c),
            Err(Sense::invalid_field_in_cdb()),
            "flags {flags:#x}"
        );
    }
}
