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
//!    it returns [`Step::Done`]. Data-In bytes are then `task.buf[..outcome.data_in]`.
//!
//! A [`LogicalUnit`] is shared (`Arc`) by every session and reactor that exports it: range
//! locks, persistent reservations and unit attentions are per unit, per I_T nexus.

use std::sync::Arc;

use dataplane::engine::IoEngine;
use dataplane::offload::OffloadSink;

pub mod sense;

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
    /// Data-Out on entry to [`LogicalUnit::start`]; Data-In when the command is done.
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

/// A SCSI logical unit on one disk backend, shared by every session that exports it.
#[derive(Debug)]
pub struct LogicalUnit {
    backend: Arc<dyn dataplane::backend::BlockBackend>,
    config: LuConfig,
}

impl LogicalUnit {
    /// A unit serving `backend`.
    pub fn new(
        backend: Arc<dyn dataplane::backend::BlockBackend>,
        config: LuConfig,
    ) -> Result<Self, ScsiError> {
        Ok(LogicalUnit { backend, config })
    }

    /// The unit's backend.
    pub fn backend(&self) -> &Arc<dyn dataplane::backend::BlockBackend> {
        &self.backend
    }

    /// The unit's settings.
    pub fn config(&self) -> &LuConfig {
        &self.config
    }

    /// Decodes `cdb` (pure): the data it moves, or the sense for a CDB that cannot run
    /// (unknown opcode, invalid field, LBA out of range).
    pub fn plan(&self, cdb: &[u8]) -> Result<Xfer, Sense> {
        let _ = cdb;
        Err(Sense::invalid_opcode())
    }

    /// Starts `task` (CDB in `task.cdb`, Data-Out in `task.buf`).
    pub fn start(&self, task: &mut ScsiTask, cx: &mut ScsiCx<'_>) -> Step {
        let _ = (task, cx);
        Step::Done(Outcome {
            status: status::CHECK_CONDITION,
            sense: Some(Sense::invalid_opcode()),
            data_in: 0,
        })
    }

    /// One engine completion (`result`: bytes or -errno) of an operation `task` pushed.
    pub fn complete(&self, task: &mut ScsiTask, result: i32, cx: &mut ScsiCx<'_>) -> Step {
        let _ = (task, result, cx);
        Step::InFlight
    }

    /// The task was aborted by task management before it started (it was blocked) or after
    /// its operations completed: release whatever it holds (range locks).
    pub fn abandon(&self, task: &mut ScsiTask) {
        let _ = task;
    }

    /// A nexus is gone (its session ended): drop its unit attentions (registrations and
    /// reservations stay, as SPC-5 requires).
    pub fn nexus_lost(&self, nexus: &Nexus) {
        let _ = nexus;
    }

    /// LOGICAL UNIT RESET / TARGET WARM RESET from `by`: releases SPC-2 reservations and
    /// establishes a unit attention (29h/03h or 29h/02h) for every other nexus.
    pub fn reset(&self, by: &Nexus, target_reset: bool) {
        let _ = (by, target_reset);
    }
}

/// The answer for a command addressed to a LUN the target does not have: INQUIRY gets
/// peripheral qualifier 3 (no unit), REPORT LUNS is answered by the transport with
/// [`report_luns`], REQUEST SENSE returns the LUN-not-supported sense, everything else CHECK
/// CONDITION, ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED (25h/00h). Data-In goes to `buf`.
pub fn no_such_lun(cdb: &[u8], buf: &mut Vec<u8>) -> Outcome {
    let _ = (cdb, buf);
    Outcome {
        status: status::CHECK_CONDITION,
        sense: Some(Sense::lun_not_supported()),
        data_in: 0,
    }
}

/// REPORT LUNS parameter data for `luns` (SAM-5 single-level LUN format), cut to the CDB's
/// allocation length, into `buf`. Returns the Outcome (INVALID FIELD IN CDB for a bad SELECT
/// REPORT or an allocation length below 16).
pub fn report_luns(cdb: &[u8], luns: &[u64], buf: &mut Vec<u8>) -> Outcome {
    let _ = (cdb, luns, buf);
    Outcome {
        status: status::CHECK_CONDITION,
        sense: Some(Sense::invalid_opcode()),
        data_in: 0,
    }
}
