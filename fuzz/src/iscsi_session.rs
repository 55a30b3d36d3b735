//! Target `iscsi_session`: a normal session's full-feature phase
//! ([`san::iscsi::session::Session`]) fed a byte stream of initiator PDUs the way the
//! transport's connection feeds it (frame PDU after PDU with the negotiated framing while the
//! session can take them, skip a PDU with a data digest error, stop at a fatal error), over a
//! null-backed LUN 0 with dataplane's synchronous engine, sending everything it queues (whole
//! or in small pieces) between reads.
//!
//! Input: two config bytes (header and data digests, ImmediateData, InitialR2T,
//! MaxOutstandingR2T, both MaxRecvDataSegmentLengths, FirstBurstLength, MaxBurstLength,
//! sends cut into pieces), then records: a flags byte, a 48-byte header and a length-prefixed
//! data segment. Flags (bit 0) say whether the record goes on the wire as is (any bytes,
//! partial PDUs included) or as a PDU the harness frames: DataSegmentLength, no AHS, padding
//! and digests filled in (bit 3: data digest then corrupted); bit 1 fills CmdSN and ExpStatSN
//! from the harness's counters; bit 2 turns the record into the Data-Out PDUs answering every
//! R2T the target sent and the harness did not answer yet (their ITT, TTT, offsets, DataSNs,
//! split at the target's MaxRecvDataSegmentLength), which no fuzzer could guess (nothing
//! when there is none).
//!
//! Oracles besides "no panic": every PDU the target sends frames with the negotiated digests
//! within the initiator's MaxRecvDataSegmentLength and is a target opcode; StatSN goes up by
//! one per status-bearing PDU (SCSI Response, Data-In with status, TM, Text and Logout
//! Responses, Reject, NOP-In answering a NOP-Out), and R2Ts and pings carry the next one;
//! Data-In never lies beyond the Expected Data Transfer Length of a command with its ITT;
//! once the connection is dropped, no operation stays in flight.

use std::sync::Arc;
use std::time::Instant;

use dataplane::backend::{BlockBackend, NullBackend};
use dataplane::engine::sync::SyncEngine;
use dataplane::engine::{Completion, IoEngine};
use dataplane::offload::OffloadSink;
use dataplane::poller::{tag_of, PollCx, Round};
use san::iscsi::params::SessionParams;
use san::iscsi::pdu::{crc32c, frame, pad_len, Framing, PduError, BHS_LEN};
use san::iscsi::session::{Flow, Session, SessionCounters, SessionSetup};
use san::scsi::{LogicalUnit, LuConfig};
use san::target::Registry;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::input::{Enc, Input};

/// Records per input at most.
const RECORDS_MAX: usize = 64;
/// The null LUN's size (reads up to the 1 MiB a command may move, anywhere).
const LUN_BYTES: u64 = 64 << 20;
/// Rounds of poll/reap/send per settle at most (each round makes progress or the settle
/// ends): one raw record may hold a full window of 1 MiB reads (128 MiB of Data-In), about
/// 135 000 rounds in 1000-byte sends; a session that keeps finding work past this is stuck.
const SETTLE_ROUNDS: usize = 1 << 20;
/// Bytes per send when sends are cut into pieces.
const SEND_PIECE: usize = 1000;
/// Data-Out PDUs the harness builds for one R2T at most.
const R2T_PDUS_MAX: usize = 64;
/// R2Ts remembered for answers (a session has at most 4 per command outstanding).
const R2T_QUEUE: usize = 16;

const MRDSL: [u32; 4] = [512, 4096, 8192, 65536];
const BURST: [u32; 4] = [512, 4096, 65536, 262144];
const RESERVED: u32 = 0xffff_ffff;
const STAT_SN0: u32 = 0x1000;
const CMD_SN0: u32 = 0xffff_fff0;

fn params(a: u8, b: u8) -> SessionParams {
    let first_burst = BURST[usize::from(b >> 4 & 3)];
    SessionParams {
        header_digest: a & 1 != 0,
        data_digest: a & 2 != 0,
        immediate_data: a & 4 != 0,
        initial_r2t: a & 8 != 0,
        max_outstanding_r2t: u32::from(a >> 4 & 3) + 1,
        max_recv_data_segment: MRDSL[usize::from(b & 3)],
        max_send_data_segment: MRDSL[usize::from(b >> 2 & 3)],
        first_burst,
        max_burst: BURST[usize::from(b >> 6)].max(first_burst),
        ..SessionParams::default()
    }
}

/// An R2T seen: (LUN, ITT, TTT, offset, length).
type LastR2t = (u64, u32, u32, u32, u32);

struct Harness {
    s: Session,
    engine: SyncEngine,
    round: Round,
    offload: OffloadSink,
    p: SessionParams,
    /// Receive buffer and where its unread bytes start.
    rbuf: Vec<u8>,
    closed: bool,
    piecewise: bool,
    cmd_sn: u32,
    /// Next StatSN the target must use.
    stat_sn: u32,
    /// Largest EDTL of the commands with each ITT.
    edtl: std::collections::HashMap<u32, u32>,
    /// R2Ts seen and not answered yet (the oldest dropped past [`R2T_QUEUE`]).
    r2t: std::collections::VecDeque<LastR2t>,
    /// Bytes sent but not yet a whole PDU.
    out: Vec<u8>,
}

impl Harness {
    fn new(p: SessionParams, piecewise: bool) -> Option<Harness> {
        let backend: Arc<dyn BlockBackend> = Arc::new(NullBackend::new(LUN_BYTES, true).ok()?);
        let unit = LogicalUnit::new(
            backend,
            LuConfig {
                name: "n0".into(),
                state_path: None,
            },
        )
        .ok()?;
        let reg = Arc::new(Registry::new());
        let target = reg
            .add_target(
                "iqn.2026-01.fuzz:t",
                vec![(0, Arc::new(unit))],
                None,
                vec![],
            )
            .ok()?;
        let s = Session::new(
            SessionSetup {
                initiator_name: Arc::from("iqn.2026-01.fuzz:i"),
                isid: [0x80, 0, 0, 0, 0, 1],
                tsih: 1,
                cid: 0,
                target,
                tpgt: 1,
                params: p,
                exp_cmd_sn: CMD_SN0,
                stat_sn: STAT_SN0,
                portals: vec![],
                registry: reg,
            },
            Arc::new(SessionCounters::default()),
        );
        Some(Harness {
            s,
            engine: SyncEngine::new(),
            round: Round::default(),
            offload: OffloadSink::new(EventFd::new(EFD_NONBLOCK).ok()?),
            p,
            rbuf: Vec::new(),
            closed: false,
            piecewise,
            cmd_sn: CMD_SN0,
            stat_sn: STAT_SN0,
            edtl: Default::default(),
            r2t: Default::default(),
            out: Vec::new(),
        })
    }

    /// Appends one PDU the harness frames: lengths, padding and digests as negotiated.
    fn push_pdu(&mut self, mut bhs: [u8; BHS_LEN], data: &[u8], corrupt: bool) {
        bhs[4] = 0;
        let n = (data.len() as u32).to_be_bytes();
        bhs[5..8].copy_from_slice(&n[1..]);
        self.rbuf.extend_from_slice(&bhs);
        if self.p.header_digest {
            self.rbuf.extend_from_slice(&crc32c(&[&bhs]).to_le_bytes());
        }
        if !data.is_empty() {
            let pad = [0u8; 3];
            let pad = &pad[..pad_len(data.len())];
            self.rbuf.extend_from_slice(data);
            self.rbuf.extend_from_slice(pad);
            if self.p.data_digest {
                let mut d = crc32c(&[data, pad]);
                if corrupt {
                    d ^= 1;
                }
                self.rbuf.extend_from_slice(&d.to_le_bytes());
            }
        }
    }

    /// One record (see the module comment).
    fn record(&mut self, flags: u8, mut bhs: [u8; BHS_LEN], data: &[u8]) {
        if flags & 1 != 0 {
            self.rbuf.extend_from_slice(&bhs);
            self.rbuf.extend_from_slice(data);
            return;
        }
        if flags & 4 != 0 {
            while let Some((lun, itt, ttt, off, len)) = self.r2t.pop_front() {
                let seg = self.p.max_recv_data_segment as usize;
                let mut buf = data.to_vec();
                buf.resize(len as usize, 0);
                let pieces = buf.chunks(seg.max(1)).take(R2T_PDUS_MAX).count();
                for (i, c) in buf.chunks(seg.max(1)).take(R2T_PDUS_MAX).enumerate() {
                    let mut b = [0u8; BHS_LEN];
                    b[0] = 0x05;
                    b[1] = if i + 1 == pieces { 0x80 } else { 0 };
                    b[8..16].copy_from_slice(&lun.to_be_bytes());
                    b[16..20].copy_from_slice(&itt.to_be_bytes());
                    b[20..24].copy_from_slice(&ttt.to_be_bytes());
                    b[28..32].copy_from_slice(&self.stat_sn.to_be_bytes());
                    b[36..40].copy_from_slice(&(i as u32).to_be_bytes());
                    let o = off.wrapping_add((i * seg) as u32);
                    b[40..44].copy_from_slice(&o.to_be_bytes());
                    self.push_pdu(b, c, false);
                }
            }
            return;
        }
        let op = bhs[0] & 0x3f;
        if flags & 2 != 0 && matches!(op, 0x00 | 0x01 | 0x02 | 0x04 | 0x06) {
            bhs[24..28].copy_from_slice(&self.cmd_sn.to_be_bytes());
            bhs[28..32].copy_from_slice(&self.stat_sn.to_be_bytes());
            if bhs[0] & 0x40 == 0 {
                self.cmd_sn = self.cmd_sn.wrapping_add(1);
            }
        }
        self.push_pdu(bhs, data, flags & 8 != 0);
    }

    /// What the connection does with its receive buffer: PDU after PDU while the session
    /// can take them.
    fn parse(&mut self) {
        let framing = self.s.framing();
        let mut at = 0;
        while !self.closed && self.s.can_take() && at < self.rbuf.len() {
            let buf = &self.rbuf[at..];
            let mut cx = PollCx::new(&mut self.engine, 0, &mut self.round, &self.offload);
            match frame(buf, &framing) {
                Ok(None) => break,
                Ok(Some(f)) => {
                    assert!(f.total_len > 0 && f.total_len <= buf.len(), "frame length");
                    if f.bhs.opcode() == 0x01 {
                        let e = self.edtl.entry(f.bhs.itt()).or_insert(0);
                        *e = (*e).max(f.bhs.expected_data_len());
                    }
                    let flow = self.s.on_pdu(&f, buf, &mut cx);
                    at += f.total_len;
                    if flow == Flow::Close {
                        self.closed = true;
                    }
                }
                Err(e) => {
                    let skip = match &e {
                        PduError::DataDigest { total_len, .. } => Some(*total_len),
                        _ => None,
                    };
                    match (self.s.on_frame_error(&e), skip) {
                        (Flow::Continue, Some(len)) => at += len,
                        _ => self.closed = true,
                    }
                }
            }
            self.s.end_batch(&mut cx);
        }
        self.rbuf.drain(..at.min(self.rbuf.len()));
    }

    /// Runs the session until it has nothing to do: polls, engine completions, sends (whole
    /// or in pieces), and takes more of the receive buffer as room frees up.
    fn settle(&mut self) {
        let mut done = [Completion::default(); 64];
        for _ in 0..SETTLE_ROUNDS {
            let mut cx = PollCx::new(&mut self.engine, 0, &mut self.round, &self.offload);
            if !self.closed && self.s.tick(Instant::now()) == Flow::Close {
                self.closed = true;
            }
            let mut work = self.s.poll(&mut cx);
            self.s.end_batch(&mut cx);
            self.offload.inject_into(&mut self.engine);
            let _ = self.engine.submit();
            let n = self.engine.reap(&mut done);
            for c in &done[..n] {
                let mut cx = PollCx::new(&mut self.engine, 0, &mut self.round, &self.offload);
                self.s.complete(tag_of(c.user_data), c.result, &mut cx);
                self.s.end_batch(&mut cx);
            }
            work += n;
            if !self.closed || self.s.has_output() {
                work += self.send();
            }
            if !self.closed && self.s.can_take() && !self.rbuf.is_empty() {
                let before = self.rbuf.len();
                self.parse();
                work += before - self.rbuf.len();
            }
            if work == 0 {
                return;
            }
        }
        panic!("the session never settled");
    }

    /// One gather and send (of at most [`SEND_PIECE`] bytes when sends are cut, as a socket
    /// with little room takes part of a gather list); returns the bytes sent.
    fn send(&mut self) -> usize {
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 64];
        let max = if self.piecewise {
            SEND_PIECE
        } else {
            usize::MAX
        };
        let k = self.s.gather(&mut iov, max);
        let mut bytes = 0;
        for v in &iov[..k] {
            let take = v.iov_len.min(max - bytes);
            if take == 0 {
                break;
            }
            assert!(!v.iov_base.is_null(), "gathered a null buffer");
            // SAFETY: the session's gather list points at its queued headers, inline data and
            // task buffers, which stay put until `sent` is called below.
            let b = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, take) };
            self.out.extend_from_slice(b);
            bytes += take;
        }
        if bytes > 0 {
            self.s.sent(bytes);
            self.check_out();
        }
        bytes
    }

    /// Checks the whole PDUs sent so far.
    fn check_out(&mut self) {
        let f = Framing {
            header_digest: self.p.header_digest,
            data_digest: self.p.data_digest,
            max_recv_data_segment: self.p.max_send_data_segment,
        };
        let mut at = 0;
        while at < self.out.len() {
            let buf = &self.out[at..];
            let fr = match frame(buf, &f) {
                Ok(Some(fr)) => fr,
                Ok(None) => break,
                Err(e) => panic!("the target sent a PDU that does not frame: {e:?}"),
            };
            let b = fr.bhs.as_bytes();
            let op = fr.bhs.opcode();
            assert!(
                (0x20..=0x3f).contains(&op) && b[0] & 0xc0 == 0,
                "not a target opcode: {:#x}",
                b[0]
            );
            assert_eq!(fr.ahs.len(), 0, "target PDU with AHS");
            let stat_sn = u32::from_be_bytes([b[24], b[25], b[26], b[27]]);
            let itt = fr.bhs.itt();
            if crate::trace() {
                eprintln!(
                    "iscsi_session: out {op:#04x} flags {:#04x} itt {itt:#x} statsn {stat_sn} \
                     data {} status {:#x}",
                    b[1],
                    fr.data.len(),
                    b[3]
                );
            }
            let status_bearing = match op {
                0x21 | 0x22 | 0x24 | 0x26 | 0x3f | 0x32 => true,
                0x25 => b[1] & 1 != 0,
                0x20 => itt != RESERVED,
                _ => false,
            };
            if op == 0x31 || (op == 0x20 && itt == RESERVED) {
                // R2T and a ping carry the next StatSN without using it.
                assert_eq!(stat_sn, self.stat_sn, "StatSN of opcode {op:#x}");
            }
            if status_bearing {
                assert_eq!(
                    stat_sn, self.stat_sn,
                    "StatSN of opcode {op:#x} out of sequence"
                );
                self.stat_sn = self.stat_sn.wrapping_add(1);
            }
            if op == 0x25 {
                let len = fr.data.len() as u64;
                let off = u64::from(fr.bhs.buffer_offset());
                let edtl = self.edtl.get(&itt).copied();
                assert!(
                    edtl.is_some_and(|e| off + len <= u64::from(e)),
                    "Data-In [{off}, +{len}) of ITT {itt:#x} beyond its EDTL {edtl:?}"
                );
            }
            if op == 0x31 {
                let r = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
                if self.r2t.len() == R2T_QUEUE {
                    self.r2t.pop_front();
                }
                self.r2t
                    .push_back((fr.bhs.lun(), itt, fr.bhs.ttt(), r(40), r(44)));
            }
            at += fr.total_len;
        }
        self.out.drain(..at);
    }

    /// The connection is gone: the transport abandons the session's tasks and keeps it until
    /// their operations completed.
    fn close(&mut self) {
        self.closed = true;
        self.s.abandon();
        self.settle();
        assert_eq!(self.s.in_flight(), 0, "operations in flight after abandon");
        self.s.end();
    }
}

/// Runs one input (see the module comment).
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let (a, b) = (inp.u8(), inp.u8());
    let Some(mut h) = Harness::new(params(a, b), a & 0x80 != 0) else {
        return;
    };
    for _ in 0..RECORDS_MAX {
        if inp.is_empty() || h.closed || h.s.finished() {
            break;
        }
        let flags = inp.u8();
        let mut bhs = [0u8; BHS_LEN];
        let got = inp.bytes(BHS_LEN);
        bhs[..got.len()].copy_from_slice(got);
        let d = inp.chunk();
        h.record(flags, bhs, d);
        h.parse();
        h.settle();
    }
    if !h.closed && !h.s.finished() {
        assert!(
            h.out.is_empty(),
            "a partial PDU left in the sent bytes: {} bytes",
            h.out.len()
        );
    }
    h.close();
}

fn cmd(imm: bool, flags: u8, itt: u32, edtl: u32, cdb: &[u8]) -> [u8; BHS_LEN] {
    let mut b = [0u8; BHS_LEN];
    b[0] = 0x01 | if imm { 0x40 } else { 0 };
    b[1] = flags;
    b[16..20].copy_from_slice(&itt.to_be_bytes());
    b[20..24].copy_from_slice(&edtl.to_be_bytes());
    b[32..32 + cdb.len()].copy_from_slice(cdb);
    b
}

fn rec(e: &mut Enc, flags: u8, bhs: &[u8; BHS_LEN], data: &[u8]) {
    e.u8(flags).bytes(bhs).chunk(data);
}

/// Seeds: TEST UNIT READY, INQUIRY, READ CAPACITY(16), REPORT LUNS, a write with immediate
/// data, one answered after an R2T, reads, NOP-Out, an ABORT TASK, a LUN RESET and a logout,
/// under several negotiations.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let w10 = [0x2A, 0, 0, 0, 0, 8, 0, 0, 8, 0];
    let r10 = [0x28, 0, 0, 0, 0, 8, 0, 0, 8, 0];
    let r16 = [0x88, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x08, 0, 0, 0];
    let rc16 = [0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0];
    let data: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
    for (a, b) in [(0x04u8, 0x55u8), (0x0b, 0xa6), (0x1f, 0x05), (0x84, 0xf1)] {
        let mut e = Enc::new();
        e.u8(a).u8(b);
        rec(&mut e, 2, &cmd(false, 0x80, 1, 0, &[0; 6]), &[]);
        rec(
            &mut e,
            2,
            &cmd(false, 0xC0, 2, 96, &[0x12, 0, 0, 0, 96, 0]),
            &[],
        );
        rec(&mut e, 2, &cmd(false, 0xC0, 3, 32, &rc16), &[]);
        rec(
            &mut e,
            2,
            &cmd(
                false,
                0xC0,
                4,
                64,
                &[0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0],
            ),
            &[],
        );
        // Write: immediate data (taken if ImmediateData=Yes), the rest after R2Ts.
        rec(&mut e, 2, &cmd(false, 0xA0, 5, 4096, &w10), &data[..512]);
        for _ in 0..8 {
            rec(&mut e, 4, &[0; BHS_LEN], &data);
        }
        rec(&mut e, 2, &cmd(false, 0xC0, 6, 4096, &r10), &[]);
        rec(&mut e, 2, &cmd(false, 0xC0, 7, 1 << 20, &r16), &[]);
        // NOP-Out ping with data.
        let mut nop = [0u8; BHS_LEN];
        nop[0] = 0x40;
        nop[1] = 0x80;
        nop[16..20].copy_from_slice(&8u32.to_be_bytes());
        nop[20..24].copy_from_slice(&RESERVED.to_be_bytes());
        rec(&mut e, 2, &nop, b"ping");
        // ABORT TASK of ITT 7, LOGICAL UNIT RESET.
        let mut tmf = [0u8; BHS_LEN];
        tmf[0] = 0x42;
        tmf[1] = 0x81;
        tmf[16..20].copy_from_slice(&9u32.to_be_bytes());
        tmf[20..24].copy_from_slice(&7u32.to_be_bytes());
        rec(&mut e, 2, &tmf, &[]);
        tmf[1] = 0x85;
        tmf[16..20].copy_from_slice(&10u32.to_be_bytes());
        tmf[20..24].copy_from_slice(&RESERVED.to_be_bytes());
        rec(&mut e, 2, &tmf, &[]);
        // Logout (close the session).
        let mut lo = [0u8; BHS_LEN];
        lo[0] = 0x46;
        lo[1] = 0x80;
        lo[16..20].copy_from_slice(&11u32.to_be_bytes());
        rec(&mut e, 2, &lo, &[]);
        out.push(e.finish());
    }
    // Unsolicited Data-Out (InitialR2T=No), a data digest error, a raw partial PDU.
    let mut e = Enc::new();
    e.u8(0x06).u8(0x55);
    rec(&mut e, 2, &cmd(false, 0x20, 1, 4096, &w10), &data[..1024]);
    let mut d = [0u8; BHS_LEN];
    d[0] = 0x05;
    d[1] = 0x80;
    d[16..20].copy_from_slice(&1u32.to_be_bytes());
    d[20..24].copy_from_slice(&RESERVED.to_be_bytes());
    d[40..44].copy_from_slice(&1024u32.to_be_bytes());
    rec(&mut e, 0, &d, &data[..3072]);
    rec(&mut e, 2 | 8, &cmd(false, 0xA0, 2, 512, &w10), &data[..512]);
    rec(&mut e, 1, &cmd(false, 0x80, 3, 0, &[0; 6]), &[]);
    rec(&mut e, 2, &cmd(false, 0xC0, 4, 4096, &r10), &[]);
    out.push(e.finish());
    out
}
