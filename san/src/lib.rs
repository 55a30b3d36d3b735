//! Strata's SAN protocols, served from the same reactors as the vhost-user disks.
//!
//! Map of the crate:
//! - [`scsi`]: SCSI (SBC-4/SPC-5) logical units on the disk backends: CDB decoding (pure),
//!   emulated commands (INQUIRY and its VPD pages, mode pages, REPORT LUNS, sense), block I/O
//!   through the reactor's engine, COMPARE AND WRITE with range locks shared by all sessions,
//!   persistent reservations (persisted with the disk), unit attentions. Transport-neutral:
//!   iSCSI today, other SCSI transports can reuse it.
//! - [`iscsi`]: the iSCSI protocol (RFC 7143) in pure functions and state machines that take
//!   bytes in and put bytes out: PDU framing and digests, text keys, login (security and
//!   operational negotiation, CHAP), discovery sessions, and the full-feature session of one
//!   connection (CmdSN window, R2T/Data-Out, Data-In, task management, NOP, logout).
//! - [`target`]: what is exported: targets, their LUNs, CHAP secrets and initiator lists, the
//!   portals, and the access policy (discovery domains) consulted at discovery and login.
//! - [`transport`]: TCP for the protocols: listening portals, the login thread that owns
//!   connections until they reach full-feature phase, and the connection poller that runs a
//!   session on a reactor with its receives and sends going through the reactor's io_uring
//!   engine.
//!
//! Dependencies run one way: `transport` → `iscsi` → `target` → `scsi` → `dataplane`.

pub mod iscsi;
pub mod scsi;
pub mod target;
pub mod transport;
