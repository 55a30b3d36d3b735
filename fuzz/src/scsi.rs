//! Target `scsi`: sequences of SCSI commands from two I_T nexuses through
//! [`san::scsi::LogicalUnit`]'s transport contract (`plan`, then `start` / `complete` driven
//! with dataplane's synchronous engine until `Done`), over a null backend or a raw backend on
//! a small memfd.
//!
//! Input: a config byte (bit 0: raw backend on a 256 KiB memfd, else null; bit 1: the null
//! backend's size is 2 TiB instead of 1 MiB), then steps: a flags byte (bit 0: nexus B, else
//! A; bit 1: leave the command in flight or blocked while the next steps run, so commands of
//! both nexuses overlap (COMPARE AND WRITE range locks); bit 2: pad the Data-Out to the
//! planned length, as a transport whose EDTL matches the CDB does), a CDB length byte (6 +
//! n % 11), the CDB and a length-prefixed Data-Out.
//!
//! Oracles besides "no panic": `Done`'s Data-In fits the task buffer and the planned length
//! (the allocation length); CHECK CONDITION always carries sense with a defined key; a
//! command never stays blocked once nothing else runs, and an operation in flight always
//! completes; on the raw backend a READ of a block returns what the last WRITE of it put
//! there (when neither overlapped a command of the other nexus); a READ or WRITE that ends
//! GOOD was allowed by the persistent reservation held when it started (read by a third,
//! observing nexus with READ FULL STATUS).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use dataplane::backend::{BlockBackend, NullBackend, RawBackend};
use dataplane::engine::sync::SyncEngine;
use dataplane::engine::{Completion, IoEngine};
use dataplane::offload::OffloadSink;
use san::scsi::sense::key;
use san::scsi::{
    status, DataDir, LogicalUnit, LuConfig, Nexus, Outcome, ScsiCx, ScsiTask, Step, Xfer,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::input::{Enc, Input};

/// Steps per input at most.
const STEPS_MAX: usize = 64;
/// Data-Out bytes per command at most (the input's length prefix allows 64 KiB).
const DATA_OUT_MAX: usize = 64 * 1024;
/// Raw backend size: small, so fuzzed LBAs land inside it and the shadow stays small.
const RAW_BYTES: u64 = 256 * 1024;
/// Null backend sizes (a large one reaches 64-bit LBAs and capacity fields).
const NULL_SMALL: u64 = 1 << 20;
const NULL_LARGE: u64 = 2 << 40;
/// Rounds of retries and reaps while driving one command; far more than any command needs
/// (a WRITE SAME or UNMAP steps through at most a few dozen operations).
const DRIVE_ROUNDS: usize = 4096;
/// Commands of the two nexuses that may be outstanding at once.
const SLOTS: usize = 2;
/// Retries of the observer's READ FULL STATUS past unit attentions.
const OBSERVE_TRIES: usize = 4;
/// Allocation length of the observer's READ FULL STATUS.
const OBSERVE_ALLOC: u16 = 8192;
/// REPORT LUNS, which the transport answers for the unit.
const REPORT_LUNS: u8 = 0xA0;

const INI: [&str; 3] = [
    "iqn.2026-01.fuzz:a",
    "iqn.2026-01.fuzz:b",
    "iqn.2026-01.fuzz:observer",
];
const TARGET_PORT: &str = "iqn.2026-01.fuzz:t,t,0x0001";

fn nexus(i: usize) -> Nexus {
    let name = INI[i];
    Nexus {
        initiator_port: format!("{name},i,0x{:012x}", 0x4000_0000_0000_u64 + i as u64).into(),
        initiator_name: name.into(),
        target_port: TARGET_PORT.into(),
        relative_port: 1,
    }
}

/// A raw backend on a fresh memfd (the backend opens it again by path; the memfd itself is
/// closed when this returns).
fn raw_backend() -> Option<Arc<dyn BlockBackend>> {
    // SAFETY: a NUL-terminated name and flags; returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"fuzz-scsi".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is a fresh descriptor we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(RAW_BYTES).ok()?;
    let path = format!("/proc/self/fd/{}", f.as_raw_fd());
    let b = RawBackend::open(std::path::Path::new(&path), false, false).ok()?;
    Some(Arc::new(b))
}

/// Where a READ or WRITE lands: (is_write, lba, blocks), for the shadow and the reservation
/// oracle. WRITE AND VERIFY counts as a write.
fn rw_range(cdb: &[u8; 16]) -> Option<(bool, u64, u64)> {
    let be = |r: std::ops::Range<usize>| cdb[r].iter().fold(0u64, |a, &b| a << 8 | u64::from(b));
    let (w, lba, n) = match cdb[0] {
        0x08 | 0x0A => {
            let n = match cdb[4] {
                0 => 256,
                n => u64::from(n),
            };
            (cdb[0] == 0x0A, be(1..4) & 0x1f_ffff, n)
        }
        0x28 | 0x2A | 0x2E => (cdb[0] != 0x28, be(2..6), be(7..9)),
        0xA8 | 0xAA | 0xAE => (cdb[0] != 0xA8, be(2..6), be(6..10)),
        0x88 | 0x8A | 0x8E => (cdb[0] != 0x88, be(2..10), be(10..14)),
        _ => return None,
    };
    Some((w, lba, n))
}

/// Commands that change the medium in ways the shadow does not follow: it is dropped.
fn clobbers(op: u8) -> bool {
    matches!(op, 0x41 | 0x93 | 0x42 | 0x89 | 0x04 | 0x48)
}

/// Persistent reservation state as READ FULL STATUS reported it.
#[derive(Debug, Default, Clone, Copy)]
struct PrView {
    /// Reservation type, if one is held.
    kind: Option<u8>,
    /// Per nexus A, B: (registered, holds the reservation).
    of: [(bool, bool); SLOTS],
}

impl PrView {
    /// Whether `n` must get RESERVATION CONFLICT for a write (or a read) (SPC-5 table 109).
    fn conflicts(&self, n: usize, write: bool) -> bool {
        let (registered, holder) = self.of[n];
        match self.kind {
            Some(1) => write && !holder,
            Some(3) => !holder,
            Some(5) | Some(7) => write && !registered,
            Some(6) | Some(8) => !registered,
            _ => false,
        }
    }
}

fn parse_full_status(d: &[u8]) -> PrView {
    let mut v = PrView::default();
    let Some(len) = d.get(4..8) else {
        return v;
    };
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    let end = (8 + len).min(d.len());
    let mut at = 8;
    while at + 24 <= end {
        let desc = &d[at..at + 24];
        let holder = desc[12] & 1 != 0;
        let tid_len = u32::from_be_bytes([desc[20], desc[21], desc[22], desc[23]]) as usize;
        let tid = &d[(at + 24).min(end)..(at + 24 + tid_len).min(end)];
        if holder {
            v.kind = Some(desc[13] & 0x0f);
        }
        for (i, name) in INI.iter().take(SLOTS).enumerate() {
            let mut pat = name.as_bytes().to_vec();
            pat.extend_from_slice(b",i,");
            if tid.windows(pat.len()).any(|w| w == pat.as_slice()) {
                v.of[i] = (true, holder);
            }
        }
        at += 24 + tid_len;
    }
    v
}

#[derive(Debug, Default)]
struct Slot {
    task: ScsiTask,
    nexus: usize,
    /// None: free; Some(true): in flight; Some(false): blocked.
    running: Option<bool>,
    xfer: Option<Xfer>,
    /// The reservation seen when the command last started (reads and writes only).
    pr: Option<PrView>,
    /// The other nexus's command was outstanding at some time during this one (their
    /// operations may have run in either order: the shadow neither trusts nor records it).
    overlapped: bool,
}

struct Harness {
    lu: Arc<LogicalUnit>,
    engine: SyncEngine,
    sink: OffloadSink,
    nexus: [Nexus; 3],
    raw: bool,
    block: u64,
    blocks: u64,
    /// Raw backend: the bytes of blocks written by a READ/WRITE-class command that ended
    /// GOOD, by LBA.
    shadow: std::collections::BTreeMap<u64, Vec<u8>>,
    slots: [Slot; SLOTS],
}

fn check_outcome(o: &Outcome, task: &ScsiTask, xfer: Option<Xfer>) {
    assert!(
        o.data_in as usize <= task.buf.len(),
        "Data-In {} beyond the task buffer {} (cdb {:02x?})",
        o.data_in,
        task.buf.len(),
        &task.cdb[..usize::from(task.cdb_len)]
    );
    if o.data_in > 0 {
        let x = xfer.expect("Data-In from a command that planned none");
        assert!(
            x.dir == DataDir::In && o.data_in <= x.len,
            "Data-In {} beyond the plan {x:?} (cdb {:02x?})",
            o.data_in,
            &task.cdb[..usize::from(task.cdb_len)]
        );
    }
    if o.status == status::CHECK_CONDITION {
        let s = o.sense.expect("CHECK CONDITION without sense");
        assert!(
            s.key <= key::MISCOMPARE && s.key != 0x0C,
            "undefined sense key {s:?}"
        );
    }
    assert!(
        matches!(
            o.status,
            status::GOOD
                | status::CHECK_CONDITION
                | status::CONDITION_MET
                | status::BUSY
                | status::RESERVATION_CONFLICT
                | status::TASK_SET_FULL
                | status::TASK_ABORTED
        ),
        "unknown status {:#x}",
        o.status
    );
}

impl Harness {
    fn new(cfg: u8) -> Option<Harness> {
        let raw = cfg & 1 != 0;
        let backend: Arc<dyn BlockBackend> = if raw {
            raw_backend()?
        } else {
            let size = if cfg & 2 != 0 { NULL_LARGE } else { NULL_SMALL };
            Arc::new(NullBackend::new(size, true).ok()?)
        };
        let block = u64::from(backend.block_size());
        let blocks = backend.size_bytes() / block;
        let lu = LogicalUnit::new(
            backend,
            LuConfig {
                name: "fuzz0".into(),
                state_path: None,
            },
        )
        .ok()?;
        let sink = OffloadSink::new(EventFd::new(EFD_NONBLOCK).ok()?);
        lu.attach(&sink);
        Some(Harness {
            lu: Arc::new(lu),
            engine: SyncEngine::new(),
            sink,
            nexus: [nexus(0), nexus(1), nexus(2)],
            raw,
            block,
            blocks,
            shadow: Default::default(),
            slots: Default::default(),
        })
    }

    /// Runs a command of the observing nexus to its end, outside the slots (user_data 0).
    fn observe(&mut self) -> Option<PrView> {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x5E;
        cdb[1] = 0x03; // READ FULL STATUS
        cdb[7..9].copy_from_slice(&OBSERVE_ALLOC.to_be_bytes());
        for _ in 0..OBSERVE_TRIES {
            let mut t = ScsiTask::default();
            t.cdb = cdb;
            t.cdb_len = 10;
            let mut step = {
                let mut cx = ScsiCx {
                    engine: &mut self.engine,
                    user_data: 0,
                    offload: &self.sink,
                    nexus: &self.nexus[2],
                };
                self.lu.start(&mut t, &mut cx)
            };
            self.lu.end_batch(&mut self.engine);
            for _ in 0..DRIVE_ROUNDS {
                let Step::InFlight = step else { break };
                let c = self.reap().expect("observer's operation never completed");
                if c.user_data != 0 {
                    // A deferred command's operation, not the observer's.
                    self.complete_slot(c);
                    continue;
                }
                let mut cx = ScsiCx {
                    engine: &mut self.engine,
                    user_data: 0,
                    offload: &self.sink,
                    nexus: &self.nexus[2],
                };
                step = self.lu.complete(&mut t, c.result, &mut cx);
                self.lu.end_batch(&mut self.engine);
            }
            match step {
                Step::Done(o) if o.status == status::GOOD => {
                    return Some(parse_full_status(&t.buf[..o.data_in as usize]));
                }
                Step::Done(_) => continue,
                _ => panic!("READ FULL STATUS did not finish: {step:?}"),
            }
        }
        None
    }

    fn reap(&mut self) -> Option<Completion> {
        for _ in 0..DRIVE_ROUNDS {
            self.sink.inject_into(&mut self.engine);
            let _ = self.engine.submit();
            let mut c = [Completion::default(); 1];
            if self.engine.reap(&mut c) == 1 {
                return Some(c[0]);
            }
            std::thread::yield_now();
        }
        None
    }

    /// (Re)starts slot `i`'s command; returns whether it is done.
    fn start(&mut self, i: usize) -> bool {
        let other = SLOTS - 1 - i;
        if self.slots[other].running.is_some() {
            self.slots[i].overlapped = true;
            self.slots[other].overlapped = true;
        }
        let rw = rw_range(&self.slots[i].task.cdb);
        self.slots[i].pr = if rw.is_some() { self.observe() } else { None };
        let s = &mut self.slots[i];
        let mut cx = ScsiCx {
            engine: &mut self.engine,
            user_data: i as u64 + 1,
            offload: &self.sink,
            nexus: &self.nexus[s.nexus],
        };
        let step = self.lu.start(&mut s.task, &mut cx);
        self.lu.end_batch(&mut self.engine);
        self.step(i, step)
    }

    fn step(&mut self, i: usize, step: Step) -> bool {
        match step {
            Step::InFlight => {
                self.slots[i].running = Some(true);
                false
            }
            Step::Blocked => {
                self.slots[i].running = Some(false);
                false
            }
            Step::Done(o) => {
                self.slots[i].running = None;
                self.done(i, o);
                true
            }
        }
    }

    /// Drives every outstanding command until slot `want` (or, with None, every slot) is
    /// free.
    fn drive(&mut self, want: Option<usize>) {
        for _ in 0..DRIVE_ROUNDS {
            let busy = |h: &Harness| match want {
                Some(i) => h.slots[i].running.is_some(),
                None => h.slots.iter().any(|s| s.running.is_some()),
            };
            if !busy(self) {
                return;
            }
            if self.slots.iter().any(|s| s.running == Some(true)) {
                let c = self.reap().expect("an operation in flight never completed");
                self.complete_slot(c);
                continue;
            }
            // Only blocked commands: nothing holds their ranges any more.
            for i in 0..SLOTS {
                if self.slots[i].running == Some(false) {
                    self.start(i);
                }
            }
        }
        panic!(
            "commands never finished: {:?}",
            self.slots.iter().map(|s| s.running).collect::<Vec<_>>()
        );
    }

    /// Hands a completion to the slot command whose operation it is.
    fn complete_slot(&mut self, c: Completion) {
        let i = (c.user_data as usize)
            .checked_sub(1)
            .filter(|&i| i < SLOTS && self.slots[i].running == Some(true))
            .unwrap_or_else(|| panic!("completion for no command in flight: {c:?}"));
        let s = &mut self.slots[i];
        let mut cx = ScsiCx {
            engine: &mut self.engine,
            user_data: c.user_data,
            offload: &self.sink,
            nexus: &self.nexus[s.nexus],
        };
        let step = self.lu.complete(&mut s.task, c.result, &mut cx);
        self.lu.end_batch(&mut self.engine);
        assert!(step != Step::Blocked, "Blocked answered to a completion");
        self.step(i, step);
    }

    fn done(&mut self, i: usize, o: Outcome) {
        let s = &self.slots[i];
        if crate::trace() {
            eprintln!(
                "scsi: nexus {} cdb {:02x?} -> status {:#x} sense {:?} data_in {}",
                s.nexus,
                &s.task.cdb[..usize::from(s.task.cdb_len)],
                o.status,
                o.sense,
                o.data_in
            );
        }
        check_outcome(&o, &s.task, s.xfer);
        let cdb = s.task.cdb;
        let Some((write, lba, n)) = rw_range(&cdb) else {
            if clobbers(cdb[0]) {
                self.shadow.clear();
            }
            return;
        };
        if o.status == status::GOOD {
            if let Some(pr) = s.pr {
                assert!(
                    !pr.conflicts(s.nexus, write),
                    "nexus {} {} allowed under {pr:?} (cdb {:02x?})",
                    s.nexus,
                    if write { "write" } else { "read" },
                    &cdb[..usize::from(s.task.cdb_len)]
                );
            }
        }
        if !self.raw || lba >= self.blocks {
            return;
        }
        let n = n.min(self.blocks - lba);
        let bs = self.block as usize;
        if write {
            let full = o.status == status::GOOD
                && !s.overlapped
                && s.task.buf.len() as u64 == n * self.block;
            for b in 0..n {
                if full {
                    let at = b as usize * bs;
                    self.shadow
                        .insert(lba + b, s.task.buf[at..at + bs].to_vec());
                } else {
                    self.shadow.remove(&(lba + b));
                }
            }
        } else if o.status == status::GOOD
            && !s.overlapped
            && u64::from(o.data_in) == n * self.block
        {
            for b in 0..n {
                if let Some(want) = self.shadow.get(&(lba + b)) {
                    let at = b as usize * bs;
                    assert!(
                        s.task.buf[at..at + bs] == want[..],
                        "block {} reads back other bytes than written",
                        lba + b
                    );
                }
            }
        }
    }

    /// One step of the input: a command of nexus `n` in slot `n`.
    fn command(&mut self, flags: u8, cdb: &[u8], data: &[u8]) {
        let i = usize::from(flags & 1);
        self.drive(Some(i));
        let xfer = self.lu.plan(cdb);
        let s = &mut self.slots[i];
        s.nexus = i;
        s.overlapped = false;
        s.task.cdb = [0; 16];
        s.task.cdb[..cdb.len()].copy_from_slice(cdb);
        s.task.cdb_len = cdb.len() as u8;
        s.task.buf.clear();
        if cdb[0] == REPORT_LUNS {
            // The transport answers it from its LUN table.
            let o = san::scsi::report_luns(cdb, &[0], &mut s.task.buf);
            let alloc = s.task.cdb[6..10]
                .iter()
                .fold(0u32, |a, &b| a << 8 | u32::from(b));
            let x = Xfer {
                dir: DataDir::In,
                len: alloc,
                fit: san::scsi::Fit::Residual,
            };
            check_outcome(&o, &s.task, Some(x));
            return;
        }
        match xfer {
            Err(sense) => {
                // The transport answers a CDB the plan refuses without starting it.
                let o = Outcome {
                    status: status::CHECK_CONDITION,
                    sense: Some(sense),
                    data_in: 0,
                };
                s.xfer = None;
                check_outcome(&o, &s.task, None);
                return;
            }
            Ok(x) => {
                s.xfer = Some(x);
                if x.dir == DataDir::Out {
                    let len = x.len as usize;
                    s.task.buf.extend_from_slice(&data[..data.len().min(len)]);
                    if flags & 4 != 0 {
                        s.task.buf.resize(len, 0);
                    }
                }
            }
        }
        if !self.start(i) && flags & 2 == 0 {
            self.drive(Some(i));
        }
    }
}

/// Runs one input (see the module comment).
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let Some(mut h) = Harness::new(inp.u8()) else {
        return;
    };
    for _ in 0..STEPS_MAX {
        if inp.is_empty() {
            break;
        }
        let flags = inp.u8();
        let n = 6 + usize::from(inp.u8()) % 11;
        let cdb = inp.bytes(n);
        if cdb.is_empty() {
            break;
        }
        let chunk = inp.chunk();
        let out = &chunk[..chunk.len().min(DATA_OUT_MAX)];
        h.command(flags, cdb, out);
    }
    h.drive(None);
}

fn step(e: &mut Enc, flags: u8, cdb: &[u8], data: &[u8]) {
    e.u8(flags).u8((cdb.len() - 6) as u8).bytes(cdb).chunk(data);
}

fn rw10(op: u8, lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = op;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn rw16(op: u8, lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = op;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// PERSISTENT RESERVE OUT `sa` of type `kind` with (key, service action key).
fn pr_out(sa: u8, kind: u8, rk: u64, sark: u64) -> ([u8; 10], Vec<u8>) {
    let mut c = [0u8; 10];
    c[0] = 0x5F;
    c[1] = sa;
    c[2] = kind;
    c[8] = 24;
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&rk.to_be_bytes());
    p[8..16].copy_from_slice(&sark.to_be_bytes());
    (c, p)
}

/// Seeds: the usual first commands, reads and writes of both sizes, COMPARE AND WRITE
/// (also overlapping a deferred one), UNMAP, WRITE SAME, reservations held against the other
/// nexus, REPORT LUNS and MODE SENSE.
pub fn seeds() -> Vec<Vec<u8>> {
    let tur = [0u8; 6];
    let inquiry = [0x12, 0, 0, 0, 96, 0];
    let vpd_b0 = [0x12, 1, 0xB0, 0, 64, 0];
    let rc16 = [0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0];
    let report_luns = [0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
    let mode_sense = [0x1A, 0, 0x3F, 0, 255, 0];
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    let mut out = Vec::new();
    for cfg in [1u8, 0, 2] {
        let mut e = Enc::new();
        e.u8(cfg);
        step(&mut e, 0, &tur, &[]);
        step(&mut e, 0, &inquiry, &[]);
        step(&mut e, 0, &vpd_b0, &[]);
        step(&mut e, 0, &rc16, &[]);
        step(&mut e, 0, &report_luns, &[]);
        step(&mut e, 0, &mode_sense, &[]);
        step(&mut e, 4, &rw10(0x2A, 4, 2), &pattern[..1024]);
        step(&mut e, 0, &rw10(0x28, 4, 2), &[]);
        step(&mut e, 4, &rw16(0x8A, 9, 1), &pattern[..512]);
        step(&mut e, 1, &rw16(0x88, 8, 3), &[]);
        out.push(e.finish());
    }
    // COMPARE AND WRITE then an overlapping one from the other nexus while the first is in
    // flight; UNMAP and WRITE SAME in between.
    let mut e = Enc::new();
    e.u8(1);
    step(&mut e, 1, &tur, &[]);
    step(&mut e, 4, &rw10(0x2A, 0, 1), &[0u8; 512]);
    let mut caw = [0u8; 16];
    caw[0] = 0x89;
    caw[13] = 1;
    let mut cmp = vec![0u8; 512];
    cmp.extend_from_slice(&pattern[..512]);
    step(&mut e, 2 | 4, &caw, &cmp);
    step(&mut e, 1 | 4, &caw, &cmp);
    step(&mut e, 0, &rw10(0x28, 0, 1), &[]);
    let mut unmap = [0u8; 10];
    unmap[0] = 0x42;
    unmap[8] = 24;
    let mut ud = vec![0, 22, 0, 16, 0, 0, 0, 0];
    ud.extend_from_slice(&16u64.to_be_bytes());
    ud.extend_from_slice(&8u32.to_be_bytes());
    ud.extend_from_slice(&[0; 4]);
    step(&mut e, 0, &unmap, &ud);
    let mut ws = [0u8; 10];
    ws[0] = 0x41;
    ws[5] = 32;
    ws[8] = 4;
    step(&mut e, 4, &ws, &pattern[..512]);
    step(&mut e, 1, &rw10(0x28, 30, 8), &[]);
    out.push(e.finish());
    // Reservations: A registers and takes Exclusive Access; B (unregistered) writes and
    // reads; B registers, A switches to Write Exclusive - Registrants Only; A releases.
    for kind in [3u8, 1, 6, 8] {
        let mut e = Enc::new();
        e.u8(1);
        step(&mut e, 0, &tur, &[]);
        step(&mut e, 1, &tur, &[]);
        let (c, p) = pr_out(0, 0, 0, 0xAA);
        step(&mut e, 0, &c, &p);
        let (c, p) = pr_out(1, kind, 0xAA, 0);
        step(&mut e, 0, &c, &p);
        step(&mut e, 1 | 4, &rw10(0x2A, 2, 1), &pattern[..512]);
        step(&mut e, 1, &rw10(0x28, 2, 1), &[]);
        let (c, p) = pr_out(0, 0, 0, 0xBB);
        step(&mut e, 1, &c, &p);
        step(&mut e, 1 | 4, &rw10(0x2A, 2, 1), &pattern[..512]);
        let (c, p) = pr_out(2, kind, 0xAA, 0);
        step(&mut e, 0, &c, &p);
        let mut pr_in = [0u8; 10];
        pr_in[0] = 0x5E;
        pr_in[1] = 3;
        pr_in[8] = 255;
        step(&mut e, 1, &pr_in, &[]);
        out.push(e.finish());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reservation oracle sees what the unit holds: after A registers and takes
    /// Exclusive Access, the observer reads A as the registered holder and B as a stranger
    /// whose writes and reads must conflict.
    #[test]
    fn observer_reads_the_reservation() {
        let mut h = Harness::new(1).expect("harness");
        assert!(h.observe().is_some_and(|v| v.kind.is_none()));
        for (flags, (c, p)) in [(0u8, pr_out(0, 0, 0, 0xAA)), (0, pr_out(1, 3, 0xAA, 0))] {
            h.command(flags, &c, &p);
            h.command(flags, &c, &p);
        }
        let v = h.observe().expect("READ FULL STATUS");
        assert_eq!(v.kind, Some(3));
        assert_eq!(v.of, [(true, true), (false, false)]);
        assert!(v.conflicts(1, true) && v.conflicts(1, false));
        assert!(!v.conflicts(0, true));
    }
}
