//! The parameters a login settles for a session and its connection (RFC 7143 §13), with the
//! defaults and the target's offers.

use super::pdu::Framing;

/// Negotiated values. "Initiator's" limits bound what the target sends; "target's" bound what
/// it receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionParams {
    /// CRC32C header digests on this connection.
    pub header_digest: bool,
    /// CRC32C data digests on this connection.
    pub data_digest: bool,
    /// Largest data segment the target may send (the initiator's MaxRecvDataSegmentLength).
    pub max_send_data_segment: u32,
    /// Largest data segment the target accepts (its own MaxRecvDataSegmentLength).
    pub max_recv_data_segment: u32,
    /// FirstBurstLength: unsolicited data (immediate + unsolicited Data-Out) per command.
    pub first_burst: u32,
    /// MaxBurstLength: data per R2T sequence or Data-In sequence.
    pub max_burst: u32,
    /// ImmediateData=Yes.
    pub immediate_data: bool,
    /// InitialR2T=Yes (no unsolicited Data-Out PDUs).
    pub initial_r2t: bool,
    /// MaxOutstandingR2T.
    pub max_outstanding_r2t: u32,
    /// DataPDUInOrder=Yes.
    pub data_pdu_in_order: bool,
    /// DataSequenceInOrder=Yes.
    pub data_sequence_in_order: bool,
    /// ErrorRecoveryLevel (only 0 is offered).
    pub error_recovery_level: u8,
    /// MaxConnections (1: one connection per session).
    pub max_connections: u16,
    /// DefaultTime2Wait.
    pub default_time2wait: u16,
    /// DefaultTime2Retain.
    pub default_time2retain: u16,
}

impl Default for SessionParams {
    /// RFC 7143 defaults (§13).
    fn default() -> Self {
        SessionParams {
            header_digest: false,
            data_digest: false,
            max_send_data_segment: 8192,
            max_recv_data_segment: 8192,
            first_burst: 65536,
            max_burst: 262144,
            immediate_data: true,
            initial_r2t: true,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
            max_connections: 1,
            default_time2wait: 2,
            default_time2retain: 20,
        }
    }
}

impl SessionParams {
    /// How the target frames the PDUs it receives on a connection with these parameters.
    pub fn framing(&self) -> Framing {
        Framing {
            header_digest: self.header_digest,
            data_digest: self.data_digest,
            max_recv_data_segment: self.max_recv_data_segment,
        }
    }
}
