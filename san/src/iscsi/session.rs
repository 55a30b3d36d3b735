//! The full-feature phase of a normal session's one connection (ERL 0, MaxConnections 1),
//! sans socket: the transport hands it framed PDUs and engine completions, it drives the SCSI
//! units and queues the answers in its send queue ([`out::OutQueue`]), which the transport
//! turns into `sendmsg` calls.
//!
//! - CmdSN window: ExpCmdSN/MaxCmdSN in serial arithmetic. MaxCmdSN is ExpCmdSN plus the free
//!   task slots of the window, so an initiator that respects it never finds the slab full;
//!   commands outside the window are dropped and counted. Immediate commands (no CmdSN
//!   advance) use a few slots of their own.
//! - Task slots: a slab of [`TASKS_MAX`] tasks, each with a [`ScsiTask`] whose buffer keeps its
//!   capacity, so steady-state I/O allocates nothing. A slot is busy from its SCSI Command
//!   until the last PDU naming its buffer has been sent.
//! - Writes: immediate data, unsolicited Data-Out up to FirstBurstLength (InitialR2T=No), then
//!   R2T sequences of MaxBurstLength, up to MaxOutstandingR2T at once; Data-Out offsets and
//!   DataSNs are checked per sequence.
//! - Reads: Data-In PDUs of the initiator's MaxRecvDataSegmentLength straight from the task
//!   buffer, F at each MaxBurstLength, the status in the last one when there is no sense
//!   (phase collapse), else a SCSI Response with the sense data.
//! - Residuals (RFC 7143 §11.4.5): the expected data transfer length against what the command
//!   moves (the CDB's length for writes, the bytes produced for reads).
//! - Task management, NOP-In/Out (echo and keepalive), Logout, Text (SendTargets), Reject.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dataplane::poller::PollCx;

use crate::iscsi::params::SessionParams;
use crate::iscsi::pdu::{
    opcode, reject, Bhs, DataIn, Frame, Framing, LogoutResponse, NopIn, PduError, R2t, Reject,
    Residual, ScsiResponse, TextResponse, TmResponse, BHS_LEN, RESERVED_TAG,
};
use crate::scsi::sense::FIXED_SENSE_LEN;
use crate::scsi::{
    self, status, DataDir, LogicalUnit, Nexus, Outcome, ScsiCx, ScsiTask, Step, Xfer,
};
use crate::target::{LunMap, Portal, Target};

pub mod out;

use out::{OutData, OutQueue, Render, INLINE_MAX, NO_TASK, OUT_RESERVE};

/// Commands in the CmdSN window: the task slots non-immediate commands can use.
pub const TASK_WINDOW: u32 = 128;
/// Slots kept for immediate commands (they do not consume CmdSN, so the window does not
/// bound them).
pub const IMMEDIATE_SLOTS: usize = 8;
/// Task slots per session: a command leaves the window when its status is queued (so the
/// MaxCmdSN sent with that status already counts its slot as free), but keeps its slot
/// until the status is sent; hence twice the window, plus the immediate ones. A slot's
/// buffer grows only when used, and the free list hands out the most recently used first.
pub const TASKS_MAX: usize = 2 * TASK_WINDOW as usize + IMMEDIATE_SLOTS;
/// R2T sequences outstanding per command at most (the MaxOutstandingR2T the target offers).
pub const R2T_MAX: usize = 4;
/// Idle time after which the target pings the initiator (NOP-In wanting a NOP-Out).
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// Time the initiator has to answer a ping before the connection is dropped.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(30);
/// Buffer capacity a free task slot keeps: larger transfers (up to the 1 MiB a command may
/// move) allocate their buffer and give it back when done, so an idle session holds at most
/// this much per slot it ever used, while 4–256 KiB I/O allocates nothing.
pub const BUF_KEEP: usize = 256 * 1024;
/// Engine capacity a command needs free before it starts: its own operation
/// (`OPS_PER_REQUEST_MAX`) plus the connection's receive and send.
const ENGINE_RESERVE: usize = dataplane::backend::OPS_PER_REQUEST_MAX + 2;
/// REPORT LUNS opcode (answered here from the target's table).
const REPORT_LUNS: u8 = 0xA0;
/// Bytes of a SCSI Response's sense data segment: 2-byte SenseLength + fixed sense.
const SENSE_SEGMENT: usize = 2 + FIXED_SENSE_LEN;

const _: () = assert!(TASKS_MAX < u16::MAX as usize);
const _: () = assert!(SENSE_SEGMENT <= INLINE_MAX);

/// Counters of full-feature events, shared by every session of a server.
#[derive(Debug, Default)]
pub struct SessionCounters {
    /// SCSI commands taken.
    pub commands: AtomicU64,
    /// Commands (and other CmdSN-bearing PDUs) dropped for a CmdSN outside the window.
    pub cmdsn_dropped: AtomicU64,
    /// Reject PDUs sent.
    pub rejects: AtomicU64,
    /// Data digest errors (PDU rejected).
    pub data_digest_errors: AtomicU64,
    /// Header digest errors (connection dropped).
    pub header_digest_errors: AtomicU64,
    /// Protocol errors that dropped the connection.
    pub protocol_errors: AtomicU64,
    /// Task management requests.
    pub task_management: AtomicU64,
    /// Keepalive pings unanswered (connection dropped).
    pub keepalive_timeouts: AtomicU64,
    /// Tasks aborted (task management or connection loss).
    pub tasks_aborted: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// What a session starts from: the login's outcome.
#[derive(Debug, Clone)]
pub struct SessionSetup {
    /// InitiatorName.
    pub initiator_name: Arc<str>,
    /// ISID.
    pub isid: [u8; 6],
    /// TSIH.
    pub tsih: u16,
    /// Connection ID.
    pub cid: u16,
    /// The target logged in to.
    pub target: Arc<Target>,
    /// Portal group tag of the portal.
    pub tpgt: u16,
    /// Negotiated parameters.
    pub params: SessionParams,
    /// ExpCmdSN after login.
    pub exp_cmd_sn: u32,
    /// Next StatSN to send.
    pub stat_sn: u32,
    /// Portals, for SendTargets in the session.
    pub portals: Vec<Portal>,
}

/// Whether the connection goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep going.
    Continue,
    /// Close the connection now (fatal error).
    Close,
}

/// a < b in serial number arithmetic (RFC 1982, 32 bits).
pub fn serial_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 1 << 31
}

/// The LUN number of an 8-byte SAM LUN (peripheral or flat addressing, single level).
pub fn lun_number(raw: u64) -> Option<u64> {
    let b = raw.to_be_bytes();
    if b[2..].iter().any(|&x| x != 0) {
        return None;
    }
    match b[0] >> 6 {
        0 if b[0] == 0 => Some(u64::from(b[1])),
        1 => Some((u64::from(b[0] & 0x3f) << 8) | u64::from(b[1])),
        _ => None,
    }
}

/// The iSCSI port names of a nexus (SPC-5 TransportID, iSCSI format).
pub fn nexus(initiator: &str, isid: [u8; 6], target: &str, tpgt: u16) -> Nexus {
    let mut id = [0u8; 8];
    id[2..].copy_from_slice(&isid);
    Nexus {
        initiator_port: Arc::from(format!("{initiator},i,0x{:012x}", u64::from_be_bytes(id))),
        initiator_name: Arc::from(initiator),
        target_port: Arc::from(format!("{target},t,0x{tpgt:04x}")),
        relative_port: tpgt.max(1),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum St {
    #[default]
    Free,
    /// Collecting Data-Out.
    DataOut,
    /// Ready to start; the unit said Blocked (retried each poll).
    Blocked,
    /// Engine operations in flight.
    Running,
    /// Done; its answer waits to be rendered.
    Ready,
    /// Its answer is (partly) in the send queue.
    Sending,
}

#[derive(Debug, Clone, Copy, Default)]
struct R2tRec {
    active: bool,
    ttt: u32,
    off: u32,
    len: u32,
    got: u32,
    data_sn: u32,
}

#[derive(Debug, Default)]
struct Task {
    scsi: ScsiTask,
    st: St,
    itt: u32,
    lun_raw: u64,
    unit: Option<Arc<LogicalUnit>>,
    immediate: bool,
    /// Counts against the CmdSN window (non-immediate, status not queued yet).
    counted: bool,
    read: bool,
    write: bool,
    /// Expected Data Transfer Length.
    edtl: u32,
    xfer: Option<Xfer>,
    /// Data-Out bytes the command uses: min(EDTL, the CDB's length).
    take: u32,
    /// End of the unsolicited data (immediate + unsolicited Data-Out).
    unsol_len: u32,
    unsol_next: u32,
    unsol_data_sn: u32,
    unsol_done: bool,
    /// Next offset to solicit.
    r2t_next: u32,
    r2t_sn: u32,
    r2ts: [R2tRec; R2T_MAX],
    /// R2T generation, so a stale TTT never matches a reused slot.
    ttt_gen: u16,
    outcome: Option<Outcome>,
    /// Data-In bytes rendered so far.
    sent: u32,
    data_sn: u32,
    aborted: bool,
}

#[derive(Debug, Clone, Copy)]
struct PendingTmf {
    itt: u32,
    response: u8,
}

/// The full-feature phase of one connection (see the module comment).
#[derive(Debug)]
pub struct Session {
    p: SessionParams,
    setup: SessionSetup,
    nexus: Nexus,
    luns: Arc<LunMap>,
    lun_numbers: Vec<u64>,
    luns_gen: u64,
    stat_sn: u32,
    exp_cmd_sn: u32,
    /// Non-immediate tasks holding a slot.
    busy: u32,
    tasks: Box<[Task]>,
    free: Vec<u16>,
    blocked: VecDeque<u16>,
    ready: VecDeque<u16>,
    running: usize,
    out: OutQueue,
    counters: Arc<SessionCounters>,
    tmf: Option<PendingTmf>,
    last_rx: Instant,
    ping: Option<(u32, Instant)>,
    ping_seq: u32,
    /// A Logout Response (or a fatal Reject) is queued: take no more PDUs.
    closing: bool,
    /// The last queued PDU asked for the connection to close and it was sent.
    closed: bool,
    /// Scratch for [`Session::sent`]: tasks whose last PDU went out (capacity: the send
    /// queue's size, so it never grows).
    released: Vec<u16>,
}

impl Session {
    /// A session in full-feature phase after `setup`'s login.
    pub fn new(setup: SessionSetup, counters: Arc<SessionCounters>) -> Self {
        let p = setup.params;
        let nexus = nexus(
            &setup.initiator_name,
            setup.isid,
            setup.target.name(),
            setup.tpgt,
        );
        let luns = setup.target.luns();
        let luns_gen = setup.target.generation();
        let lun_numbers = luns.iter().map(|(n, _)| *n).collect();
        let mut free: Vec<u16> = (0..TASKS_MAX as u16).collect();
        free.reverse();
        Session {
            p,
            nexus,
            luns,
            lun_numbers,
            luns_gen,
            stat_sn: setup.stat_sn,
            exp_cmd_sn: setup.exp_cmd_sn,
            busy: 0,
            tasks: (0..TASKS_MAX).map(|_| Task::default()).collect(),
            free,
            blocked: VecDeque::with_capacity(TASKS_MAX),
            ready: VecDeque::with_capacity(TASKS_MAX),
            running: 0,
            out: OutQueue::new(p.header_digest, p.data_digest),
            counters,
            tmf: None,
            last_rx: Instant::now(),
            ping: None,
            ping_seq: 0,
            closing: false,
            closed: false,
            released: Vec::with_capacity(out::OUT_SLOTS),
            setup,
        }
    }

    /// How received PDUs are framed on this connection.
    pub fn framing(&self) -> Framing {
        Framing {
            header_digest: self.p.header_digest,
            data_digest: self.p.data_digest,
            max_recv_data_segment: self.p.max_recv_data_segment,
        }
    }

    /// The nexus of this session.
    pub fn nexus(&self) -> &Nexus {
        &self.nexus
    }

    /// Whether the next received PDU may be handled now: room for its answers in the send
    /// queue, and no logout in progress.
    pub fn can_take(&self) -> bool {
        // Slots held by commands already out of the window (status queued, not yet sent)
        // must leave room for a full window of new ones.
        let held = TASKS_MAX - self.free.len() - self.busy as usize;
        !self.closing
            && self.out.free() >= OUT_RESERVE
            && held + TASK_WINDOW as usize + IMMEDIATE_SLOTS < TASKS_MAX
    }

    /// Whether the session is done (a Logout Response or fatal Reject went out).
    pub fn finished(&self) -> bool {
        self.closed
    }

    /// Tasks with engine operations in flight (their buffers are in the kernel's hands).
    pub fn in_flight(&self) -> usize {
        self.running
    }

    /// Whether anything waits in the send queue.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    fn max_cmd_sn(&self) -> u32 {
        self.exp_cmd_sn
            .wrapping_add(TASK_WINDOW.saturating_sub(self.busy))
            .wrapping_sub(1)
    }

    /// Checks a CmdSN-bearing PDU against the window and advances ExpCmdSN; false: drop it.
    fn take_cmdsn(&mut self, bhs: &Bhs) -> bool {
        if bhs.immediate() {
            return true;
        }
        let sn = bhs.cmdsn();
        if serial_lt(sn, self.exp_cmd_sn) || serial_lt(self.max_cmd_sn(), sn) {
            bump(&self.counters.cmdsn_dropped);
            tracing::debug!(
                cmdsn = sn,
                exp = self.exp_cmd_sn,
                max = self.max_cmd_sn(),
                "CmdSN outside the window; dropped"
            );
            return false;
        }
        self.exp_cmd_sn = sn.wrapping_add(1);
        true
    }

    fn next_stat_sn(&mut self) -> u32 {
        let s = self.stat_sn;
        self.stat_sn = s.wrapping_add(1);
        s
    }

    fn push(&mut self, bhs: [u8; BHS_LEN], inline: &[u8], close_after: bool) {
        let data = if inline.is_empty() {
            OutData::None
        } else if inline.len() <= INLINE_MAX {
            OutData::Inline(inline.len() as u8)
        } else {
            OutData::Owned(inline.into())
        };
        let ok = self.out.push(Render {
            bhs,
            data,
            bytes: inline,
            inline,
            release: NO_TASK,
            close_after,
        });
        if !ok {
            // Cannot happen while PDUs are taken only with OUT_RESERVE entries free.
            tracing::error!("send queue full; answer dropped");
        }
    }

    fn reject(&mut self, reason: u8, bhs: &Bhs) {
        bump(&self.counters.rejects);
        let mut b = [0u8; BHS_LEN];
        Reject {
            reason,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
            data_sn: 0,
            data_len: BHS_LEN as u32,
        }
        .write(&mut b);
        self.push(b, &bhs.0, false);
    }

    /// A framing error of the PDU at the head of the receive buffer. Data digest errors are
    /// answered with a Reject (the caller skips the PDU); everything else closes.
    pub fn on_frame_error(&mut self, e: &PduError) -> Flow {
        match e {
            PduError::DataDigest { bhs, .. } => {
                bump(&self.counters.data_digest_errors);
                self.reject(reject::DATA_DIGEST, bhs);
                Flow::Continue
            }
            PduError::HeaderDigest { .. } => {
                bump(&self.counters.header_digest_errors);
                Flow::Close
            }
            _ => {
                bump(&self.counters.protocol_errors);
                Flow::Close
            }
        }
    }

    /// One framed PDU; `buf` holds it at the ranges `frame` gives.
    pub fn on_pdu(&mut self, frame: &Frame, buf: &[u8], cx: &mut PollCx<'_>) -> Flow {
        self.last_rx = Instant::now();
        let bhs = frame.bhs;
        let data = &buf[frame.data.clone()];
        match bhs.opcode() {
            opcode::SCSI_CMD => self.on_command(&bhs, data, cx),
            opcode::DATA_OUT => self.on_data_out(&bhs, data, cx),
            opcode::NOP_OUT => {
                self.on_nop_out(&bhs, data);
                Flow::Continue
            }
            opcode::TMF_REQ => {
                self.on_tmf(&bhs);
                Flow::Continue
            }
            opcode::LOGOUT_REQ => {
                self.on_logout(&bhs);
                Flow::Continue
            }
            opcode::TEXT_REQ => {
                self.on_text(&bhs, data);
                Flow::Continue
            }
            opcode::SNACK => {
                // ERL 0: no SNACK support (§11.16).
                self.reject(reject::PROTOCOL_ERROR, &bhs);
                Flow::Continue
            }
            opcode::LOGIN_REQ => {
                self.reject(reject::PROTOCOL_ERROR, &bhs);
                Flow::Continue
            }
            _ => {
                self.reject(reject::COMMAND_NOT_SUPPORTED, &bhs);
                Flow::Continue
            }
        }
    }

    fn refresh_luns(&mut self) {
        let g = self.setup.target.generation();
        if g != self.luns_gen {
            self.luns = self.setup.target.luns();
            self.lun_numbers.clear();
            self.lun_numbers.extend(self.luns.iter().map(|(n, _)| *n));
            self.luns_gen = g;
        }
    }

    fn unit_of(&self, raw: u64) -> Option<Arc<LogicalUnit>> {
        let n = lun_number(raw)?;
        self.luns
            .binary_search_by_key(&n, |(l, _)| *l)
            .ok()
            .map(|i| self.luns[i].1.clone())
    }

    fn on_command(&mut self, bhs: &Bhs, data: &[u8], cx: &mut PollCx<'_>) -> Flow {
        if !bhs.immediate() && self.busy >= TASK_WINDOW {
            // The initiator ignored MaxCmdSN.
            bump(&self.counters.cmdsn_dropped);
            return Flow::Continue;
        }
        if !self.take_cmdsn(bhs) {
            return Flow::Continue;
        }
        let Some(slot) = self.free.pop() else {
            self.reject(reject::IMMEDIATE_REJECTED, bhs);
            return Flow::Continue;
        };
        bump(&self.counters.commands);
        if !data.is_empty() && !self.p.immediate_data {
            self.free.push(slot);
            self.reject(reject::PROTOCOL_ERROR, bhs);
            return Flow::Continue;
        }
        self.refresh_luns();
        let unit = self.unit_of(bhs.lun());
        let p = self.p;
        let t = &mut self.tasks[usize::from(slot)];
        t.st = St::DataOut;
        t.itt = bhs.itt();
        t.lun_raw = bhs.lun();
        t.immediate = bhs.immediate();
        t.counted = !t.immediate;
        if t.counted {
            self.busy += 1;
        }
        t.read = bhs.read_bit();
        t.write = bhs.write_bit();
        t.edtl = bhs.expected_data_len();
        t.scsi.cdb = *bhs.cdb();
        t.scsi.cdb_len = 16;
        t.scsi.buf.clear();
        t.xfer = None;
        t.take = 0;
        t.outcome = None;
        t.sent = 0;
        t.data_sn = 0;
        t.r2t_sn = 0;
        t.r2ts = [R2tRec::default(); R2T_MAX];
        t.aborted = false;
        t.unit = unit;
        let cdb = t.scsi.cdb;
        if cdb[0] == REPORT_LUNS {
            let o = scsi::report_luns(&cdb, &self.lun_numbers, &mut t.scsi.buf);
            self.finish(slot, o);
            return Flow::Continue;
        }
        let Some(unit) = t.unit.clone() else {
            let o = scsi::no_such_lun(&cdb, &mut t.scsi.buf);
            self.finish(slot, o);
            return Flow::Continue;
        };
        let xfer = match unit.plan(&cdb) {
            Ok(x) => x,
            Err(sense) => {
                let o = Outcome {
                    status: status::CHECK_CONDITION,
                    sense: Some(sense),
                    data_in: 0,
                };
                self.finish(slot, o);
                return Flow::Continue;
            }
        };
        t.xfer = Some(xfer);
        if xfer.dir != DataDir::Out {
            self.start(slot, cx);
            return Flow::Continue;
        }
        // A write: collect min(EDTL, CDB length) bytes.
        let take = if t.write { t.edtl.min(xfer.len) } else { 0 };
        t.take = take;
        t.scsi.buf.resize(take as usize, 0);
        let imm = data.len() as u32;
        if imm > p.first_burst || imm > t.edtl {
            // More immediate data than FirstBurstLength or the transfer.
            return self.protocol_reject(slot, bhs);
        }
        let n = imm.min(take) as usize;
        t.scsi.buf[..n].copy_from_slice(&data[..n]);
        // Unsolicited Data-Out follows unless InitialR2T=Yes or the command's F bit says
        // none does (§11.3.4); it ends at FirstBurstLength or the transfer's end.
        t.unsol_len = if p.initial_r2t || bhs.final_bit() {
            imm
        } else {
            p.first_burst.min(t.edtl)
        };
        t.unsol_done = t.unsol_len == imm;
        t.unsol_next = imm;
        t.unsol_data_sn = 0;
        t.r2t_next = t.unsol_len.min(take);
        self.issue_r2ts(slot);
        self.maybe_start_write(slot, cx);
        Flow::Continue
    }

    fn protocol_reject(&mut self, slot: u16, bhs: &Bhs) -> Flow {
        self.release(slot);
        self.reject(reject::PROTOCOL_ERROR, bhs);
        Flow::Continue
    }

    fn issue_r2ts(&mut self, slot: u16) {
        let p = self.p;
        let limit = (p.max_outstanding_r2t as usize).clamp(1, R2T_MAX);
        loop {
            let exp = self.exp_cmd_sn;
            let max = self.max_cmd_sn();
            let stat = self.stat_sn;
            let t = &mut self.tasks[usize::from(slot)];
            if t.r2t_next >= t.take {
                return;
            }
            if t.r2ts.iter().filter(|r| r.active).count() >= limit {
                return;
            }
            let Some(i) = t.r2ts.iter().position(|r| !r.active) else {
                return;
            };
            let len = p.max_burst.max(1).min(t.take - t.r2t_next);
            t.ttt_gen = t.ttt_gen.wrapping_add(1) & 0x7fff;
            let ttt = (u32::from(t.ttt_gen) << 16) | u32::from(slot);
            t.r2ts[i] = R2tRec {
                active: true,
                ttt,
                off: t.r2t_next,
                len,
                got: 0,
                data_sn: 0,
            };
            let mut b = [0u8; BHS_LEN];
            R2t {
                lun: t.lun_raw,
                itt: t.itt,
                ttt,
                stat_sn: stat,
                exp_cmd_sn: exp,
                max_cmd_sn: max,
                r2t_sn: t.r2t_sn,
                buffer_offset: t.r2t_next,
                desired_len: len,
            }
            .write(&mut b);
            t.r2t_sn += 1;
            t.r2t_next += len;
            self.push(b, &[], false);
        }
    }

    fn maybe_start_write(&mut self, slot: u16, cx: &mut PollCx<'_>) {
        let t = &self.tasks[usize::from(slot)];
        if t.st == St::DataOut
            && t.unsol_done
            && t.r2t_next >= t.take
            && !t.r2ts.iter().any(|r| r.active)
        {
            // Every byte of [0, take) arrived (unsolicited, then solicited from there).
            self.start(slot, cx);
        }
    }

    fn on_data_out(&mut self, bhs: &Bhs, data: &[u8], cx: &mut PollCx<'_>) -> Flow {
        let ttt = bhs.ttt();
        let len = data.len() as u32;
        let off = bhs.buffer_offset();
        let slot = if ttt == RESERVED_TAG {
            // Unsolicited: by ITT among tasks still taking unsolicited data.
            let found = self
                .tasks
                .iter()
                .position(|t| t.st == St::DataOut && !t.unsol_done && t.itt == bhs.itt());
            let Some(i) = found else {
                self.reject(reject::INVALID_PDU_FIELD, bhs);
                return Flow::Continue;
            };
            let slot = i as u16;
            let t = &mut self.tasks[i];
            if off != t.unsol_next
                || bhs.datasn() != t.unsol_data_sn
                || off.checked_add(len).is_none_or(|e| e > t.unsol_len)
            {
                self.reject(reject::PROTOCOL_ERROR, bhs);
                return Flow::Continue;
            }
            place(&mut t.scsi.buf, off, data);
            t.unsol_next += len;
            t.unsol_data_sn += 1;
            if bhs.final_bit() || t.unsol_next == t.unsol_len {
                t.unsol_done = true;
                // A short unsolicited burst (F before FirstBurstLength): solicit from there.
                if t.unsol_next < t.unsol_len {
                    t.unsol_len = t.unsol_next;
                    t.r2t_next = t.r2t_next.min(t.unsol_len.min(t.take));
                    self.issue_r2ts(slot);
                }
            }
            slot
        } else {
            let slot = (ttt & 0xffff) as usize;
            let Some(t) = self
                .tasks
                .get_mut(slot)
                .filter(|t| t.st == St::DataOut && t.itt == bhs.itt())
            else {
                self.reject(reject::INVALID_PDU_FIELD, bhs);
                return Flow::Continue;
            };
            let Some(r) = t.r2ts.iter_mut().find(|r| r.active && r.ttt == ttt) else {
                self.reject(reject::INVALID_PDU_FIELD, bhs);
                return Flow::Continue;
            };
            if off != r.off + r.got
                || bhs.datasn() != r.data_sn
                || r.got.checked_add(len).is_none_or(|g| g > r.len)
            {
                self.reject(reject::PROTOCOL_ERROR, bhs);
                return Flow::Continue;
            }
            r.got += len;
            r.data_sn += 1;
            if r.got == r.len {
                r.active = false;
            }
            place(&mut t.scsi.buf, off, data);
            self.issue_r2ts(slot as u16);
            slot as u16
        };
        self.maybe_start_write(slot, cx);
        Flow::Continue
    }

    fn start(&mut self, slot: u16, cx: &mut PollCx<'_>) {
        let Session {
            tasks,
            nexus,
            running,
            blocked,
            ..
        } = self;
        let t = &mut tasks[usize::from(slot)];
        let Some(unit) = t.unit.clone() else {
            return;
        };
        // Room on the engine for the command's operation and this connection's receive
        // and send, like the vhost-user queues keep; otherwise retried on a later poll.
        if cx.engine.capacity().saturating_sub(cx.engine.in_flight()) < ENGINE_RESERVE {
            if t.st != St::Blocked {
                t.st = St::Blocked;
                blocked.push_back(slot);
            }
            return;
        }
        let mut scx = ScsiCx {
            user_data: cx.user_data(slot),
            offload: cx.offload(),
            engine: &mut *cx.engine,
            nexus,
        };
        match unit.start(&mut t.scsi, &mut scx) {
            Step::InFlight => {
                t.st = St::Running;
                *running += 1;
            }
            Step::Blocked => {
                if t.st != St::Blocked {
                    t.st = St::Blocked;
                    blocked.push_back(slot);
                }
            }
            Step::Done(o) => {
                if t.st == St::Blocked {
                    blocked.retain(|&s| s != slot);
                }
                self.finish(slot, o);
            }
        }
    }

    /// An engine completion for task `tag`.
    pub fn complete(&mut self, tag: u16, result: i32, cx: &mut PollCx<'_>) {
        let Session {
            tasks,
            nexus,
            running,
            ..
        } = self;
        let Some(t) = tasks
            .get_mut(usize::from(tag))
            .filter(|t| t.st == St::Running)
        else {
            tracing::error!(tag, "completion for a task not running");
            return;
        };
        let Some(unit) = t.unit.clone() else {
            return;
        };
        let mut scx = ScsiCx {
            user_data: cx.user_data(tag),
            offload: cx.offload(),
            engine: &mut *cx.engine,
            nexus,
        };
        match unit.complete(&mut t.scsi, result, &mut scx) {
            Step::InFlight => {}
            Step::Blocked => {
                tracing::error!(tag, "unit answered a completion with Blocked");
            }
            Step::Done(o) => {
                *running -= 1;
                self.finish(tag, o);
            }
        }
    }

    fn finish(&mut self, slot: u16, o: Outcome) {
        let t = &mut self.tasks[usize::from(slot)];
        if t.aborted {
            if let Some(u) = t.unit.clone() {
                u.abandon(&mut t.scsi);
            }
            self.release(slot);
            return;
        }
        t.outcome = Some(o);
        t.st = St::Ready;
        self.ready.push_back(slot);
    }

    fn uncount(&mut self, slot: u16) {
        let t = &mut self.tasks[usize::from(slot)];
        if t.counted {
            t.counted = false;
            self.busy = self.busy.saturating_sub(1);
        }
    }

    fn release(&mut self, slot: u16) {
        let t = &mut self.tasks[usize::from(slot)];
        if t.st == St::Free {
            return;
        }
        t.st = St::Free;
        t.unit = None;
        t.xfer = None;
        if t.scsi.buf.capacity() > BUF_KEEP {
            t.scsi.buf = Vec::new();
        }
        if t.counted {
            t.counted = false;
            self.busy = self.busy.saturating_sub(1);
        }
        self.free.push(slot);
    }

    /// Per reactor iteration: retries blocked tasks, renders finished ones into the send
    /// queue, answers a task management request whose aborts completed. Returns the work
    /// done.
    pub fn poll(&mut self, cx: &mut PollCx<'_>) -> usize {
        let mut work = 0;
        for _ in 0..self.blocked.len() {
            let Some(slot) = self.blocked.pop_front() else {
                break;
            };
            self.tasks[usize::from(slot)].st = St::DataOut;
            self.start(slot, cx);
            if self.tasks[usize::from(slot)].st != St::Blocked {
                work += 1;
            }
        }
        work += self.render();
        self.check_tmf();
        work
    }

    fn residual(t: &Task, o: &Outcome) -> Residual {
        let actual = match t.xfer.map(|x| x.dir) {
            Some(DataDir::Out) => t.xfer.map_or(0, |x| x.len),
            Some(DataDir::In) => o.data_in,
            // No data, or a command that did not get as far as a plan (no-such-LUN, sense).
            _ => o.data_in,
        };
        if actual < t.edtl {
            Residual::Under(t.edtl - actual)
        } else if actual > t.edtl {
            Residual::Over(actual - t.edtl)
        } else {
            Residual::None
        }
    }

    fn render(&mut self) -> usize {
        let mut n = 0;
        while let Some(&slot) = self.ready.front() {
            if !self.render_task(slot) {
                break;
            }
            self.ready.pop_front();
            n += 1;
        }
        n
    }

    /// Queues the task's Data-In and status while the queue has room; true when all of it
    /// is queued.
    fn render_task(&mut self, slot: u16) -> bool {
        let p = self.p;
        let seg_max = p.max_send_data_segment.max(512);
        let burst = p.max_burst.max(seg_max);
        loop {
            if self.out.free() <= OUT_RESERVE / 2 {
                return false;
            }
            let t = &self.tasks[usize::from(slot)];
            let Some(o) = t.outcome else {
                return true;
            };
            let produced = o.data_in.min(t.scsi.buf.len() as u32);
            let send_len = if t.read { produced.min(t.edtl) } else { 0 };
            let residual = Self::residual(t, &o);
            let seg = seg_max.min(send_len - t.sent).min(burst - t.sent % burst);
            let end = t.sent + seg;
            let collapse = t.sent < send_len && end == send_len && o.sense.is_none();
            if collapse || t.sent >= send_len {
                // The status goes out with this PDU: the command leaves the window.
                self.uncount(slot);
            }
            let exp = self.exp_cmd_sn;
            let max = self.max_cmd_sn();
            let t = &self.tasks[usize::from(slot)];
            if t.sent < send_len {
                let last = end == send_len;
                let stat_sn = if collapse { self.next_stat_sn() } else { 0 };
                let t = &self.tasks[usize::from(slot)];
                let mut b = [0u8; BHS_LEN];
                DataIn {
                    final_: last || end.is_multiple_of(burst),
                    ack: false,
                    status: collapse.then_some(o.status),
                    residual,
                    lun: 0,
                    itt: t.itt,
                    ttt: RESERVED_TAG,
                    stat_sn,
                    exp_cmd_sn: exp,
                    max_cmd_sn: max,
                    data_sn: t.data_sn,
                    buffer_offset: t.sent,
                    data_len: seg,
                }
                .write(&mut b);
                let bytes = &t.scsi.buf[t.sent as usize..end as usize];
                self.out.push(Render {
                    bhs: b,
                    data: OutData::Task {
                        slot,
                        off: t.sent,
                        len: seg,
                    },
                    bytes,
                    inline: &[],
                    release: if collapse { slot } else { NO_TASK },
                    close_after: false,
                });
                let t = &mut self.tasks[usize::from(slot)];
                t.sent = end;
                t.data_sn += 1;
                if collapse {
                    t.st = St::Sending;
                    return true;
                }
                continue;
            }
            // The SCSI Response.
            let mut sense = [0u8; SENSE_SEGMENT];
            let data_len = match o.sense {
                Some(s) if o.status == status::CHECK_CONDITION => {
                    let mut f = [0u8; FIXED_SENSE_LEN];
                    s.write_fixed(&mut f);
                    sense[..2].copy_from_slice(&(FIXED_SENSE_LEN as u16).to_be_bytes());
                    sense[2..].copy_from_slice(&f);
                    SENSE_SEGMENT
                }
                _ => 0,
            };
            let exp_data_sn = if t.xfer.map(|x| x.dir) == Some(DataDir::Out) {
                t.r2t_sn
            } else {
                t.data_sn
            };
            let itt = t.itt;
            let stat_sn = self.next_stat_sn();
            let mut b = [0u8; BHS_LEN];
            ScsiResponse {
                response: 0,
                status: o.status,
                residual,
                bidi_residual: Residual::None,
                itt,
                stat_sn,
                exp_cmd_sn: exp,
                max_cmd_sn: max,
                exp_data_sn,
                data_len: data_len as u32,
            }
            .write(&mut b);
            let inline = &sense[..data_len];
            self.out.push(Render {
                bhs: b,
                data: if data_len > 0 {
                    OutData::Inline(data_len as u8)
                } else {
                    OutData::None
                },
                bytes: inline,
                inline,
                release: slot,
                close_after: false,
            });
            self.tasks[usize::from(slot)].st = St::Sending;
            return true;
        }
    }

    fn on_nop_out(&mut self, bhs: &Bhs, data: &[u8]) {
        if !self.take_cmdsn(bhs) {
            return;
        }
        if bhs.itt() == RESERVED_TAG {
            // An answer to our ping (or a ping that wants no answer).
            if self.ping.is_some_and(|(ttt, _)| ttt == bhs.ttt()) {
                self.ping = None;
            }
            return;
        }
        let mut b = [0u8; BHS_LEN];
        let data = &data[..data.len().min(self.p.max_send_data_segment as usize)];
        NopIn {
            lun: bhs.lun(),
            itt: bhs.itt(),
            ttt: RESERVED_TAG,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
            data_len: data.len() as u32,
        }
        .write(&mut b);
        self.push(b, data, false);
    }

    /// Keepalive: pings an idle initiator, drops one that does not answer.
    pub fn tick(&mut self, now: Instant) -> Flow {
        if let Some((_, sent)) = self.ping {
            if now.saturating_duration_since(sent) > KEEPALIVE_TIMEOUT {
                bump(&self.counters.keepalive_timeouts);
                return Flow::Close;
            }
            return Flow::Continue;
        }
        if now.saturating_duration_since(self.last_rx) >= KEEPALIVE_IDLE && self.can_take() {
            self.ping_seq = self.ping_seq.wrapping_add(1) & 0x7fff_ffff;
            let ttt = 0x8000_0000 | self.ping_seq;
            let mut b = [0u8; BHS_LEN];
            NopIn {
                lun: 0,
                itt: RESERVED_TAG,
                ttt,
                stat_sn: self.stat_sn,
                exp_cmd_sn: self.exp_cmd_sn,
                max_cmd_sn: self.max_cmd_sn(),
                data_len: 0,
            }
            .write(&mut b);
            self.push(b, &[], false);
            self.ping = Some((ttt, now));
        }
        Flow::Continue
    }

    fn abort_task(&mut self, slot: u16) {
        let st = self.tasks[usize::from(slot)].st;
        match st {
            St::Free | St::Sending => {}
            St::Running => {
                bump(&self.counters.tasks_aborted);
                self.tasks[usize::from(slot)].aborted = true;
            }
            St::Blocked | St::DataOut | St::Ready => {
                bump(&self.counters.tasks_aborted);
                if st == St::Blocked {
                    self.blocked.retain(|&s| s != slot);
                    let t = &mut self.tasks[usize::from(slot)];
                    if let Some(u) = t.unit.clone() {
                        u.abandon(&mut t.scsi);
                    }
                }
                if st == St::Ready {
                    self.ready.retain(|&s| s != slot);
                }
                self.release(slot);
            }
        }
    }

    fn on_tmf(&mut self, bhs: &Bhs) {
        bump(&self.counters.task_management);
        if !self.take_cmdsn(bhs) {
            return;
        }
        let lun = bhs.lun();
        let response = match bhs.tmf_function() {
            // ABORT TASK
            1 => {
                let rtt = bhs.tmf_rtt();
                // A task whose status is already queued has completed: "task does not
                // exist", as for one not found (initiators treat both as the task gone).
                match self
                    .tasks
                    .iter()
                    .position(|t| !matches!(t.st, St::Free | St::Sending) && t.itt == rtt)
                {
                    Some(i) => {
                        self.abort_task(i as u16);
                        0
                    }
                    None => 1,
                }
            }
            // ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET
            f @ (2 | 3 | 5) => {
                if f == 5 && self.unit_of(lun).is_none() {
                    2
                } else {
                    for i in 0..TASKS_MAX {
                        if self.tasks[i].st != St::Free && self.tasks[i].lun_raw == lun {
                            self.abort_task(i as u16);
                        }
                    }
                    if f == 5 {
                        if let Some(u) = self.unit_of(lun) {
                            u.reset(&self.nexus, false);
                        }
                    }
                    0
                }
            }
            // TARGET WARM RESET
            6 => {
                for i in 0..TASKS_MAX {
                    self.abort_task(i as u16);
                }
                self.refresh_luns();
                for (_, u) in self.luns.iter() {
                    u.reset(&self.nexus, true);
                }
                0
            }
            // TASK REASSIGN: needs ERL 2.
            8 => 4,
            _ => 5,
        };
        self.tmf = Some(PendingTmf {
            itt: bhs.itt(),
            response,
        });
        self.check_tmf();
    }

    /// Answers the pending task management request once no aborted task is in flight.
    fn check_tmf(&mut self) {
        let Some(tmf) = self.tmf else {
            return;
        };
        if self.tasks.iter().any(|t| t.st == St::Running && t.aborted) {
            return;
        }
        self.tmf = None;
        let mut b = [0u8; BHS_LEN];
        TmResponse {
            response: tmf.response,
            itt: tmf.itt,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
        }
        .write(&mut b);
        self.push(b, &[], false);
    }

    fn on_logout(&mut self, bhs: &Bhs) {
        if !self.take_cmdsn(bhs) {
            return;
        }
        let response = match bhs.logout_reason() {
            0 => 0,
            1 if bhs.cid() == self.setup.cid => 0,
            1 => 1,
            // Remove the connection for recovery: ERL 0 has none.
            _ => 2,
        };
        let mut b = [0u8; BHS_LEN];
        LogoutResponse {
            response,
            itt: bhs.itt(),
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
            time2wait: 0,
            time2retain: 0,
        }
        .write(&mut b);
        let close = response == 0;
        self.push(b, &[], close);
        if close {
            self.closing = true;
        }
    }

    fn on_text(&mut self, bhs: &Bhs, data: &[u8]) {
        if !self.take_cmdsn(bhs) {
            return;
        }
        let mut text = Vec::new();
        let asks = data
            .split(|&b| b == 0)
            .any(|kv| kv.starts_with(b"SendTargets="));
        if asks {
            // In a normal session SendTargets reports the session's own target.
            text.extend_from_slice(b"TargetName=");
            text.extend_from_slice(self.setup.target.name().as_bytes());
            text.push(0);
            for p in &self.setup.portals {
                text.extend_from_slice(b"TargetAddress=");
                text.extend_from_slice(p.target_address().as_bytes());
                text.push(0);
            }
        }
        text.truncate(self.p.max_send_data_segment as usize);
        let mut b = [0u8; BHS_LEN];
        TextResponse {
            final_: true,
            cont: false,
            lun: bhs.lun(),
            itt: bhs.itt(),
            ttt: RESERVED_TAG,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
            data_len: text.len() as u32,
        }
        .write(&mut b);
        self.push(b, &text, false);
    }

    /// Fills `iov` with queued bytes (see [`OutQueue::gather`]).
    pub fn gather(&self, iov: &mut [libc::iovec], max_bytes: usize) -> usize {
        let tasks = &self.tasks;
        self.out.gather(iov, max_bytes, &|slot| {
            tasks[usize::from(slot)].scsi.buf.as_ptr()
        })
    }

    /// `bytes` of the gathered queue went out: releases tasks whose answers are sent.
    pub fn sent(&mut self, bytes: usize) {
        let mut released = std::mem::take(&mut self.released);
        let mut close = false;
        self.out.sent(bytes, &mut |slot, c| {
            if slot != NO_TASK {
                released.push(slot);
            }
            close |= c;
        });
        for &slot in &released {
            self.release(slot);
        }
        released.clear();
        self.released = released;
        if close {
            self.closed = true;
        }
    }

    /// The connection is gone: aborts every task. Tasks with operations in flight stay until
    /// their completions arrive ([`Session::in_flight`]); the caller keeps the session until
    /// then.
    pub fn abandon(&mut self) {
        for i in 0..TASKS_MAX {
            let st = self.tasks[i].st;
            if st == St::Sending {
                self.release(i as u16);
            } else {
                self.abort_task(i as u16);
            }
        }
        self.tmf = None;
    }

    /// The session ended: its nexus is gone for every unit of the target.
    pub fn end(&mut self) {
        self.refresh_luns();
        for (_, u) in self.luns.iter() {
            u.nexus_lost(&self.nexus);
        }
    }
}

/// Copies Data-Out bytes at `off` into the command's buffer (bytes beyond it are dropped:
/// the command uses fewer than the initiator sends).
fn place(buf: &mut [u8], off: u32, data: &[u8]) {
    let off = off as usize;
    if off >= buf.len() {
        return;
    }
    let n = data.len().min(buf.len() - off);
    buf[off..off + n].copy_from_slice(&data[..n]);
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
