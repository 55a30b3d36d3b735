//! The iSCSI protocol (RFC 7143), sans I/O: every part takes bytes (or parsed PDUs) in and
//! puts bytes out, so it is tested and fuzzed without sockets.
//!
//! - [`pdu`]: the 48-byte Basic Header Segment of every opcode, PDU framing (AHS, padding,
//!   digests, length checks against the negotiated limits), CRC32C digests, and the builders
//!   of the target's PDUs. Pure.
//! - [`text`]: `key=value\0` text segments (login and text requests). Pure.
//! - [`params`]: the session and connection parameters negotiation settles.
//! - [`login`]: the login state machine of one connection: security negotiation (None, CHAP
//!   one-way and mutual), operational negotiation, stage transitions, the target and access
//!   checks.
//! - [`replies`]: answers both session kinds build alike (Reject of a header, NOP-In echo,
//!   Logout Response).
//! - [`discovery`]: the full-feature phase of a discovery session (SendTargets, logout, NOP).
//! - [`session`]: the full-feature phase of a normal session's connection: CmdSN window, task
//!   slots, immediate and unsolicited data, R2T/Data-Out, Data-In with status, task
//!   management, NOP-In/Out, logout, connection loss.

pub mod discovery;
pub mod login;
pub mod params;
pub mod pdu;
pub mod replies;
pub mod session;
pub mod text;
