//! SCSI logical units on Strata's disk backends (SBC-4 block commands, SPC-5 primary
//! commands), independent of the transport that carries them.
//!
//! The contract with a transport (iSCSI's session today):
//! 1. [`LogicalUnit::plan`] decodes a CDB (pure) and says which data it moves ([`Xfer`]), so
//!    the transport can ask for Data-Out and compute residuals before anything runs.
//! 2. The transport fills [`ScsiTask::buf`] with the Data-Out bytes (if any) and calls
//!    [`LogicalUnit::start`]. The unit either finishes at once ([`Step::Done`]), starts
//!    operations on the reactor's engine with the user_data in [`ScsiCx`] ([`Step::InFlight`]),
//!    or cannot start yet because an overlapping COMPARE AND WRITE (or another command a CAW
//!    waits for) holds the range ([`Step::Blocked`]: the transport calls `start` again later).
//! 3. Each engine completion carrying that user_data goes to [`LogicalUnit::complete`] until
//!    it returns [`Step::Done`] (a command of several steps — FUA write then flush, COMPARE
//!    AND WRITE's read then write, WRITE SAME chunks, UNMAP descriptors — starts its next
//!    step inside `complete` and answers [`Step::InFlight`] again). Data-In bytes are then
//!    `task.buf[..outcome.data_in]`. `task.buf` must stay untouched while in flight.
//! 4. A task the transport drops while [`Step::Blocked`] (abort, session end) goes to
//!    [`LogicalUnit::abandon`]; one with operations in flight must wait for their
//!    completions first (the engine writes into its buffer).
//!
//! What the transport must also do, per reactor:
//! - [`LogicalUnit::attach`] with the reactor's [`OffloadSink`], on the reactor's thread,
//!   before it starts the unit's commands there (a datastore backend hands work to its
//!   metadata thread and posts the completions to that sink; without it those requests fail
//!   with EIO). Idempotent: calling it when a session lands on the reactor is fine.
//! - [`LogicalUnit::end_batch`] once per reactor loop iteration for every unit it started or
//!   completed commands on, after the iteration's `start`/`complete` calls and before
//!   submitting the engine (a datastore backend hands the iteration's deferred requests over
//!   there; without it they never complete). Cheap when nothing was deferred.
//! - move the sink's completions into the engine ([`OffloadSink::inject_into`]) once per
//!   iteration before reaping, as the vhost-user reactor does (persistent-reservation state
//!   writes complete through it too), and route them by user_data like engine completions.
//! - answer REPORT LUNS itself with [`report_luns`] (the unit does not know the target's
//!   LUNs) and commands to absent LUNs with [`no_such_lun`];
//! - on LOGICAL UNIT RESET / TARGET WARM RESET call [`LogicalUnit::reset`], and on a session's
//!   end [`LogicalUnit::nexus_lost`].
//!
//! A [`LogicalUnit`] is shared (`Arc`) by every session and reactor that exports it: range
//! locks, persistent reservations and unit attentions are per unit, per I_T nexus.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use dataplane::blk::request::ParsedRequest;
use dataplane::engine::IoEngine;
use dataplane::offload::OffloadSink;

mod aborts;
mod cdb;
mod emulate;
mod exec;
mod io;
mod locks;
mod mode;
mod persist;
mod pr;
pub mod sense;
mod ua;

#[cfg(test)]
mod pr_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod vmfs_tests;

pub use sense::Sense;

/// SCSI status codes (SAM-5).
pub mod status {
    /// GOOD.
    pub const GOOD: u8 = 0x00;
    /// CHECK CONDITION (sense data follows).
    pub const CHECK_CONDITION: u8 = 0x02;
    /// CONDITION MET.
    pub const CONDITION_MET: u8 = 0x04;
    /// BUSY.
    pub const BUSY: u8 = 0x08;
    /// RESERVATION CONFLICT.
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    /// TASK SET FULL.
    pub const TASK_SET_FULL: u8 = 0x28;
    /// TASK ABORTED.
    pub const TASK_ABORTED: u8 = 0x40;
}

/// An I_T nexus: one initiator port talking to one target port. For iSCSI the initiator port
/// name is `<initiator name>,i,0x<ISID as 12 hex digits>` and the target port name
/// `<target name>,t,0x<TPGT as 4 hex digits>` (SPC-5 TransportID, iSCSI format).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Nexus {
    /// The initiator port's name (see above).
    pub initiator_port: Arc<str>,
    /// The initiator's name alone (the part before `,i,`).
    pub initiator_name: Arc<str>,
    /// The target port's name (see above).
    pub target_port: Arc<str>,
    /// Relative target port identifier (VPD 83h, REPORT TARGET PORT GROUPS), ≥ 1.
    pub relative_port: u16,
}

/// Largest data transfer of one command (Block Limits VPD MAXIMUM TRANSFER LENGTH); CDBs
/// asking for more get ILLEGAL REQUEST, INVALID FIELD IN CDB.
pub const MAX_TRANSFER_BYTES: u32 = 1 << 20;

/// Direction of a command's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataDir {
    /// No data phase.
    None,
    /// Target to initiator (Data-In).
    In,
    /// Initiator to target (Data-Out).
    Out,
}

/// The data a decoded CDB moves: its direction and its length in bytes as the CDB says it
/// (transfer length × block size, or the allocation/parameter list length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Xfer {
    /// Direction.
    pub dir: DataDir,
    /// Bytes.
    pub len: u32,
    /// What an expected transfer length other than `len` means (see [`Fit`]).
    pub fit: Fit,
}

/// How a transport treats a command whose expected data transfer length (the initiator's
/// side) differs from [`Xfer::len`] (the CDB's side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// Runs with what arrives (or fits) and reports the residual (reads, writes, parameter
    /// lists: SAM-5 5.4.2).
    Residual,
    /// The data has a fixed structure that no other length can carry (COMPARE AND WRITE:
    /// the compare half then the write half; WRITE SAME: one block): the transport refuses
    /// the command with [`Sense::invalid_field_in_cdb`] (libiscsi's InvalidDataOutSize
    /// tests).
    Exact,
    /// As `Exact`, but no data at all is accepted too: WRITE SAME with UNMAP then
    /// deallocates as with NDOB (reads return zeroes), as initiators unmapping without a
    /// block expect (libiscsi's WriteSame*.UnmapUnaligned).
    ExactOrNone,
}

impl Fit {
    /// Whether a command planned with this fit and `len` may run with `edtl` bytes.
    pub fn accepts(self, len: u32, edtl: u32) -> bool {
        match self {
            Fit::Residual => true,
            Fit::Exact => edtl == len,
            Fit::ExactOrNone => edtl == len || edtl == 0,
        }
    }
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// SCSI status (see [`status`]).
    pub status: u8,
    /// Sense data for CHECK CONDITION.
    pub sense: Option<Sense>,
    /// Data-In bytes produced in `task.buf` (0 for writes).
    pub data_in: u32,
}

/// What [`LogicalUnit::start`] / [`LogicalUnit::complete`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Operations are in flight on the engine; completions go to [`LogicalUnit::complete`].
    InFlight,
    /// The command's range is locked by another command (COMPARE AND WRITE atomicity); call
    /// [`LogicalUnit::start`] again on a later reactor iteration. Nothing was started.
    Blocked,
    /// Finished.
    Done(Outcome),
}

/// What a unit may use of its reactor while it runs a command.
#[derive(Debug)]
pub struct ScsiCx<'a> {
    /// The reactor's engine.
    pub engine: &'a mut dyn IoEngine,
    /// The user_data for every operation this command pushes (the transport routes their
    /// completions back by it).
    pub user_data: u64,
    /// The reactor's mailbox for completions finished on other threads (backends that
    /// offload, persistent-reservation state writes).
    pub offload: &'a OffloadSink,
    /// The nexus that sent the command.
    pub nexus: &'a Nexus,
}

/// One command in flight: its data buffer and the unit's private progress. Owned by the
/// transport's task slot and reused for the next command (the buffer keeps its capacity, so
/// steady-state I/O allocates nothing).
#[derive(Debug, Default)]
pub struct ScsiTask {
    /// Data-Out on entry to [`LogicalUnit::start`]; Data-In when the command is done. Must
    /// not be touched (moved, grown) while the command is in flight: the engine writes into it.
    pub buf: Vec<u8>,
    /// The CDB (up to 16 bytes used; longer CDBs are refused).
    pub cdb: [u8; 16],
    /// Valid bytes of `cdb`.
    pub cdb_len: u8,
    /// The unit's progress (private).
    pub(crate) state: TaskState,
}

/// The unit's private progress of one command.
#[derive(Debug, Default)]
pub(crate) struct TaskState {
    /// Engine operations still in flight.
    pub(crate) pending: u16,
    /// First error among the current step's operations.
    pub(crate) err: i32,
    /// Bytes the current step's operations reported.
    pub(crate) got: u64,
    /// The backend request of the current step (boxed once per task slot: its iovec must stay
    /// put until the completion).
    pub(crate) req: Option<Box<ParsedRequest>>,
    /// What the command does next.
    pub(crate) job: io::Job,
    /// The current step.
    pub(crate) seg: io::Seg,
    /// The range lock held (or waited for) in the unit's table.
    pub(crate) lock: Option<locks::LockId>,
    /// Aligned bounce buffer for O_DIRECT backends (grown once per task slot).
    pub(crate) bounce: Vec<io::Page>,
}

/// Errors setting up a logical unit.
#[derive(Debug, thiserror::Error)]
pub enum ScsiError {
    /// The backend cannot be exported (size or block size unsuited).
    #[error("cannot export as a SCSI logical unit: {0}")]
    Unsupported(String),
    /// Reading or writing the unit's persistent state failed.
    #[error("persistent state {path}: {source}")]
    State {
        /// File.
        path: std::path::PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// Settings of one logical unit.
#[derive(Debug, Clone)]
pub struct LuConfig {
    /// Device name (logs; the basis of the unit serial number and NAA identifier).
    pub name: String,
    /// Where the unit keeps its persistent-reservation state, if anywhere (a file next to a
    /// raw image, or in the datastore with the disk file); `None`: memory only.
    pub state_path: Option<std::path::PathBuf>,
}

/// What every command of a unit consults, behind one lock: range locks, unit attentions,
/// persistent reservations, the SPC-2 reservation, the capacity last reported.
#[derive(Debug, Default)]
struct UnitState {
    locks: locks::LockTable,
    uas: ua::UnitAttentions,
    pr: pr::PrState,
    /// The I_T nexus holding an SPC-2 RESERVE(6) reservation: (initiator port, target port).
    spc2: Option<(Arc<str>, Arc<str>)>,
    /// Capacity in bytes when last seen (a change raises CAPACITY DATA HAS CHANGED).
    capacity: u64,
    /// Whose tasks other nexuses aborted (see `aborts`); `LogicalUnit::abort_epoch` numbers
    /// its entries.
    aborts: aborts::AbortLog,
}

/// A SCSI logical unit on one disk backend, shared by every session that exports it.
#[derive(Debug)]
pub struct LogicalUnit {
    backend: Arc<dyn dataplane::backend::BlockBackend>,
    config: LuConfig,
    ident: emulate::Identity,
    state: Mutex<UnitState>,
    persister: Option<persist::Persister>,
    /// The epoch of the newest abort-log entry (read without the lock by every transport
    /// iteration; written under it).
    abort_epoch: AtomicU64,
}

impl LogicalUnit {
    /// A unit serving `backend`; loads the persistent-reservation state saved at
    /// `config.state_path` (if any, and saved with APTPL) and starts its writer thread.
    pub fn new(
        backend: Arc<dyn dataplane::backend::BlockBackend>,
        config: LuConfig,
    ) -> Result<Self, ScsiError> {
        let bs = backend.block_size();
        if !(bs == 512 || bs == 4096) {
            return Err(ScsiError::Unsupported(format!("block size {bs}")));
        }
        let capacity = backend.size_bytes();
        if capacity < u64::from(bs) {
            return Err(ScsiError::Unsupported(format!("size {capacity} bytes")));
        }
        let (pr, persister) = match &config.state_path {
            Some(path) => (
                persist::load(path)?,
                Some(persist::Persister::start(path.clone(), &config.name)?),
            ),
            None => (pr::PrState::default(), None),
        };
        let ident = emulate::Identity::new(
            &config.name,
            backend.supports_discard() && !backend.read_only(),
            backend.discard_zeroes(),
        );
        Ok(LogicalUnit {
            backend,
            config,
            ident,
            state: Mutex::new(UnitState {
                pr,
                capacity,
                ..UnitState::default()
            }),
            persister,
            abort_epoch: AtomicU64::new(0),
        })
    }

    /// The unit's backend.
    pub fn backend(&self) -> &Arc<dyn dataplane::backend::BlockBackend> {
        &self.backend
    }

    /// The unit's settings.
    pub fn config(&self) -> &LuConfig {
        &self.config
    }

    /// Gives the backend the calling reactor's completion mailbox (see the module comment);
    /// call on the reactor's thread before starting commands there. Idempotent.
    pub fn attach(&self, sink: &OffloadSink) {
        self.backend.attach(sink);
    }

    /// Lets the backend finish the requests it deferred during this reactor iteration (see
    /// the module comment): call once per iteration after starting commands, before
    /// submitting the engine. Never blocks.
    pub fn end_batch(&self, engine: &mut dyn IoEngine) {
        self.backend.end_batch(engine);
    }

    fn geometry(&self) -> cdb::Geometry {
        let block_size = self.backend.block_size();
        cdb::Geometry {
            block_size,
            blocks: self.backend.size_bytes() / u64::from(block_size),
            read_only: self.backend.read_only(),
        }
    }

    fn lock_state(&self) -> MutexGuard<'_, UnitState> {
        // A panic elsewhere while holding the lock leaves tables that are still consistent
        // (every update is a single step).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decodes `cdb` (pure): the data it moves, or the sense for a CDB that cannot run
    /// (unknown opcode, invalid field, LBA out of range). For Data-In the length is the
    /// allocation length (the most the command returns; `Outcome::data_in` says how much it
    /// did).
    pub fn plan(&self, cdb: &[u8]) -> Result<Xfer, Sense> {
        let g = self.geometry();
        cdb::decode(&g, cdb).map(|c| c.xfer(&g))
    }

    /// Starts `task` (CDB in `task.cdb`, Data-Out in `task.buf`).
    pub fn start(&self, task: &mut ScsiTask, cx: &mut ScsiCx<'_>) -> Step {
        let step = self.start_inner(task, cx);
        if let Step::Done(_) = step {
            self.release(task);
            task.state.job = io::Job::Idle;
        }
        step
    }

    /// Releases the task's range lock, if any.
    fn release(&self, task: &mut ScsiTask) {
        if let Some(id) = task.state.lock.take() {
            self.lock_state().locks.release(id);
        }
    }

    /// One engine completion (`result`: bytes or -errno) of an operation `task` pushed.
    pub fn complete(&self, task: &mut ScsiTask, result: i32, cx: &mut ScsiCx<'_>) -> Step {
        self.step_done(task, result, cx)
    }

    /// The task was aborted by task management before it started (it was blocked) or after
    /// its operations completed: release whatever it holds (range locks).
    pub fn abandon(&self, task: &mut ScsiTask) {
        self.release(task);
        task.state.job = io::Job::Idle;
        task.state.pending = 0;
    }

    /// A nexus is gone (its session ended): drop its unit attentions and its SPC-2
    /// reservation (registrations and persistent reservations stay, as SPC-5 requires).
    pub fn nexus_lost(&self, nexus: &Nexus) {
        let mut st = self.lock_state();
        st.uas.forget(&nexus.initiator_port);
        if st
            .spc2
            .as_ref()
            .is_some_and(|(i, t)| *i == nexus.initiator_port && *t == nexus.target_port)
        {
            st.spc2 = None;
        }
    }

    /// The unit's abort epoch. A transport tags each command it takes with it and, whenever
    /// it has moved since the transport last looked (one atomic load per iteration), asks
    /// [`LogicalUnit::aborted_since`] about its commands: those another nexus aborted (PREEMPT
    /// AND ABORT, LOGICAL UNIT RESET, TARGET WARM RESET) end with TASK ABORTED status
    /// (SAM-5 5.6, TAS = 1) — once their operations in flight, if any, completed.
    pub fn abort_epoch(&self) -> u64 {
        self.abort_epoch.load(Ordering::Acquire)
    }

    /// Whether another nexus aborted `nexus`'s tasks after epoch `since` (a command tagged
    /// `since` is then aborted).
    pub fn aborted_since(&self, nexus: &Nexus, since: u64) -> bool {
        since < self.abort_epoch() && self.lock_state().aborts.names_since(nexus, since)
    }

    /// Logs an abort (under the state lock) and moves the epoch.
    fn record_abort(&self, st: &mut UnitState, whom: aborts::Whom) {
        let epoch = self.abort_epoch.load(Ordering::Relaxed) + 1;
        st.aborts.record(whom, epoch);
        self.abort_epoch.store(epoch, Ordering::Release);
    }

    /// LOGICAL UNIT RESET / TARGET WARM RESET from `by`: releases SPC-2 reservations and
    /// establishes a unit attention (29h/03h or 29h/02h) for every nexus — the one that asked
    /// too (SAM-5 6.3.3; libiscsi's MultipathIO.Reset expects it on every path) — and aborts
    /// the tasks of every other nexus (see [`LogicalUnit::abort_epoch`]; `by`'s transport
    /// aborts its own). Persistent reservations stay.
    pub fn reset(&self, by: &Nexus, target_reset: bool) {
        let cond = if target_reset {
            sense::ua::TARGET_RESET
        } else {
            sense::ua::LUN_RESET
        };
        self.reset_as(by, cond, false);
    }

    /// TARGET COLD RESET from `by`: a TARGET WARM RESET that also ends the connections of
    /// every other nexus (RFC 7143 §11.5.1; see [`LogicalUnit::hard_reset_since`]); `by`'s
    /// transport ends its own after its answer.
    pub fn cold_reset(&self, by: &Nexus) {
        self.reset_as(by, sense::ua::POWER_ON, true);
    }

    /// Whether a TARGET COLD RESET logged after epoch `since` asks the transports of the
    /// other nexuses to end their connections (checked when [`LogicalUnit::abort_epoch`]
    /// moved).
    pub fn hard_reset_since(&self, nexus: &Nexus, since: u64) -> bool {
        since < self.abort_epoch() && self.lock_state().aborts.hard_since(nexus, since)
    }

    fn reset_as(&self, by: &Nexus, cond: Sense, hard: bool) {
        let mut st = self.lock_state();
        let whom = aborts::Whom::AllBut {
            i_port: by.initiator_port.clone(),
            t_port: by.target_port.clone(),
        };
        if hard {
            let epoch = self.abort_epoch.load(Ordering::Relaxed) + 1;
            st.aborts.record_hard(whom, epoch);
            self.abort_epoch.store(epoch, Ordering::Release);
        } else {
            self.record_abort(&mut st, whom);
        }
        st.spc2 = None;
        tracing::debug!(unit = %self.config.name, by = %by.initiator_port, ?cond, hard, "reset");
        st.uas.raise_all(cond, None);
    }
}

/// The answer for a command addressed to a LUN the target does not have: INQUIRY gets
/// peripheral qualifier 3 (no unit), REPORT LUNS is answered by the transport with
/// [`report_luns`], REQUEST SENSE returns the LUN-not-supported sense, everything else CHECK
/// CONDITION, ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED (25h/00h). Data-In goes to `buf`.
pub fn no_such_lun(cdb: &[u8], buf: &mut Vec<u8>) -> Outcome {
    emulate::no_such_lun(cdb, buf)
}

/// REPORT LUNS parameter data for `luns` (SAM-5 single-level LUN format), cut to the CDB's
/// allocation length, into `buf`. Returns the Outcome (INVALID FIELD IN CDB for a bad SELECT
/// REPORT or an allocation length below 16).
pub fn report_luns(cdb: &[u8], luns: &[u64], buf: &mut Vec<u8>) -> Outcome {
    emulate::report_luns(cdb, luns, buf)
}
