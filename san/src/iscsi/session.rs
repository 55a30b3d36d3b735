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
    opcode, reject, AsyncMessage, Bhs, DataIn, Frame, Framing, LogoutResponse, NopIn, PduError,
    R2t, Reject, Residual, ScsiResponse, TextResponse, TmResponse, BHS_LEN, RESERVED_TAG,
};
use crate::scsi::sense::FIXED_SENSE_LEN;
use crate::scsi::{
    self, status, DataDir, LogicalUnit, Nexus, Outcome, ScsiCx, ScsiTask, Step, Xfer,
};
use crate::target::{LunMap, Portal, Registry, Target};

mod data;
mod manage;
pub mod out;
mod respond;

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
/// Task management requests answered later (waiting for aborted operations) at most;
/// more are rejected.
pub const TMF_PENDING_MAX: usize = 8;
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
/// AsyncEvent of an Async Message asking the initiator to log out (RFC 7143 §11.9.1).
const ASYNC_LOGOUT_REQUEST: u8 = 1;
/// REPORT LUNS opcode (answered here from the target's table).
const REPORT_LUNS: u8 = 0xA0;
/// Bytes of a SCSI Response's sense data segment: 2-byte SenseLength + fixed sense.
const SENSE_SEGMENT: usize = 2 + FIXED_SENSE_LEN;

/// The answer of a command another nexus aborted (SAM-5 5.6 with TAS = 1).
const TASK_ABORTED: Outcome = Outcome {
    status: status::TASK_ABORTED,
    sense: None,
    data_in: 0,
};

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
    /// Sessions ended because their target was deleted.
    pub target_removed: AtomicU64,
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
    /// The registry the target is exported from (a session ends when its target leaves).
    pub registry: Arc<Registry>,
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
    /// Aborted by this session (task management, connection loss): no answer.
    aborted: bool,
    /// The unit's abort epoch when the command was taken (see `LogicalUnit::abort_epoch`).
    epoch: u64,
    /// Aborted by another nexus (PREEMPT AND ABORT, a reset): answered TASK ABORTED.
    aborted_by_other: bool,
}

#[derive(Debug, Clone, Copy)]
struct PendingTmf {
    itt: u32,
    response: u8,
    /// Close the connection after the answer (TARGET COLD RESET).
    close: bool,
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
    /// Each unit's abort epoch as last looked at (parallel to `luns`).
    abort_seen: Vec<u64>,
    stat_sn: u32,
    exp_cmd_sn: u32,
    /// Non-immediate tasks holding a slot.
    busy: u32,
    tasks: Box<[Task]>,
    /// The ITT of each slot whose command is active (taken, status not yet queued);
    /// RESERVED_TAG otherwise. Compact, so a new command's ITT is checked against the active
    /// ones without walking the task slots.
    active_itts: Box<[u32]>,
    free: Vec<u16>,
    blocked: VecDeque<u16>,
    ready: VecDeque<u16>,
    running: usize,
    out: OutQueue,
    counters: Arc<SessionCounters>,
    /// Task management requests waiting for their aborted tasks' operations.
    tmf: VecDeque<PendingTmf>,
    /// When a PDU was last seen, as of the last tick (the receive path does not read the
    /// clock: it sets `rx_seen`, and the next tick dates it).
    last_rx: Instant,
    rx_seen: bool,
    ping: Option<(u32, Instant)>,
    ping_seq: u32,
    /// A Logout Response (or a fatal Reject) is queued: take no more PDUs.
    closing: bool,
    /// The last queued PDU asked for the connection to close and it was sent.
    closed: bool,
    /// Another nexus's TARGET COLD RESET ends this connection.
    dropped: bool,
    /// The units of `luns` were given this reactor's offload sink.
    attached: bool,
    /// Commands were started or stepped since the last [`Session::end_batch`].
    started: bool,
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
        let abort_seen = luns.iter().map(|(_, u)| u.abort_epoch()).collect();
        let mut free: Vec<u16> = (0..TASKS_MAX as u16).collect();
        free.reverse();
        Session {
            p,
            nexus,
            luns,
            lun_numbers,
            luns_gen,
            abort_seen,
            stat_sn: setup.stat_sn,
            exp_cmd_sn: setup.exp_cmd_sn,
            busy: 0,
            tasks: (0..TASKS_MAX).map(|_| Task::default()).collect(),
            active_itts: vec![RESERVED_TAG; TASKS_MAX].into_boxed_slice(),
            free,
            blocked: VecDeque::with_capacity(TASKS_MAX),
            ready: VecDeque::with_capacity(TASKS_MAX),
            running: 0,
            out: OutQueue::new(p.header_digest, p.data_digest),
            counters,
            tmf: VecDeque::with_capacity(TMF_PENDING_MAX),
            last_rx: Instant::now(),
            rx_seen: false,
            ping: None,
            ping_seq: 0,
            closing: false,
            closed: false,
            dropped: false,
            attached: false,
            started: false,
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

    /// Whether the session is done (a Logout Response or fatal Reject went out, or another
    /// nexus's TARGET COLD RESET ended it).
    pub fn finished(&self) -> bool {
        self.closed || self.dropped
    }

    /// Tasks with engine operations in flight (their buffers are in the kernel's hands).
    pub fn in_flight(&self) -> usize {
        self.running
    }

    /// Whether commands wait to be started again (see [`Step::Blocked`]).
    pub fn has_blocked(&self) -> bool {
        !self.blocked.is_empty()
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
        Reject::of_header(
            reason,
            self.next_stat_sn(),
            self.exp_cmd_sn,
            self.max_cmd_sn(),
        )
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
                // Data lost from a command collecting Data-Out: at ERL 0 it cannot be asked
                // for again, so the command ends (RFC 7143 §7.8; see `terminate_data_out`).
                if bhs.opcode() == opcode::DATA_OUT {
                    if let Some(slot) = self.data_out_task(bhs) {
                        self.terminate_data_out(slot);
                    }
                }
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
        self.rx_seen = true;
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
            self.abort_seen.clear();
            self.abort_seen
                .extend(self.luns.iter().map(|(_, u)| u.abort_epoch()));
            self.luns_gen = g;
            self.attached = false;
        }
    }

    /// Gives every unit of the LUN table this reactor's offload sink (once per table; the
    /// units' `attach` is idempotent), before any command of the session starts here.
    fn attach_units(&mut self, cx: &PollCx<'_>) {
        if !self.attached {
            for (_, u) in self.luns.iter() {
                u.attach(cx.offload());
            }
            self.attached = true;
        }
    }

    /// After a burst of starts and completions: lets the units' backends hand over the
    /// requests they deferred in this reactor iteration (datastore disks batch them).
    pub fn end_batch(&mut self, cx: &mut PollCx<'_>) {
        if self.started {
            self.started = false;
            for (_, u) in self.luns.iter() {
                u.end_batch(&mut *cx.engine);
            }
        }
    }

    fn unit_of(&self, raw: u64) -> Option<Arc<LogicalUnit>> {
        let n = lun_number(raw)?;
        self.luns
            .binary_search_by_key(&n, |(l, _)| *l)
            .ok()
            .map(|i| self.luns[i].1.clone())
    }

    fn start(&mut self, slot: u16, cx: &mut PollCx<'_>) {
        self.started = true;
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
        if t.aborted_by_other {
            // Aborted while it collected its data or waited: it never runs.
            if t.st == St::Blocked {
                blocked.retain(|&s| s != slot);
            }
            unit.abandon(&mut t.scsi);
            self.finish(slot, TASK_ABORTED);
            return;
        }
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
        self.started = true;
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
        let o = if t.aborted_by_other { TASK_ABORTED } else { o };
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

    /// The command in `slot` is no longer active (its status is queued, or it is gone): its
    /// ITT may be used again.
    fn retire_itt(&mut self, slot: u16) {
        self.active_itts[usize::from(slot)] = RESERVED_TAG;
    }

    fn release(&mut self, slot: u16) {
        self.retire_itt(slot);
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
        let mut work = self.check_aborts();
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
        self.tmf.clear();
    }

    /// The session ended: its nexus is gone for every unit of the target.
    pub fn end(&mut self) {
        self.refresh_luns();
        for (_, u) in self.luns.iter() {
            u.nexus_lost(&self.nexus);
        }
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
