//! iSCSI PDUs (RFC 7143 §11): the 48-byte Basic Header Segment with typed accessors for every
//! initiator PDU's fields, framing of a received byte stream (AHS, padding, CRC32C header and
//! data digests, length checks against the negotiated limits), and builders that write the
//! BHS of every PDU the target sends. Pure: no I/O, and framing allocates nothing (the data
//! segment stays in the caller's buffer and is named by a range).

use std::ops::Range;

use thiserror::Error;

/// Length of the Basic Header Segment (§11.2.1).
pub const BHS_LEN: usize = 48;
/// Largest Additional Header Segment area: TotalAHSLength is one byte counting 4-byte words.
pub const AHS_MAX: usize = 255 * 4;
/// Length of a CRC32C digest on the wire.
pub const DIGEST_LEN: usize = 4;
/// Largest data segment the 24-bit DataSegmentLength can describe (and the largest
/// MaxRecvDataSegmentLength §13.12 allows).
pub const DATA_SEGMENT_MAX: u32 = (1 << 24) - 1;
/// Smallest MaxRecvDataSegmentLength §13.12 allows.
pub const DATA_SEGMENT_MIN: u32 = 512;
/// The reserved tag value (§11.2.1.7: "no tag").
pub const RESERVED_TAG: u32 = 0xffff_ffff;
/// The only iSCSI version (§11.12.4: Version-max/min 0x00).
pub const ISCSI_VERSION: u8 = 0x00;

/// Opcodes (§11.2.1.2), low 6 bits of byte 0.
pub mod opcode {
    /// NOP-Out.
    pub const NOP_OUT: u8 = 0x00;
    /// SCSI Command.
    pub const SCSI_CMD: u8 = 0x01;
    /// SCSI Task Management Function Request.
    pub const TMF_REQ: u8 = 0x02;
    /// Login Request.
    pub const LOGIN_REQ: u8 = 0x03;
    /// Text Request.
    pub const TEXT_REQ: u8 = 0x04;
    /// SCSI Data-Out.
    pub const DATA_OUT: u8 = 0x05;
    /// Logout Request.
    pub const LOGOUT_REQ: u8 = 0x06;
    /// SNACK Request.
    pub const SNACK: u8 = 0x10;
    /// NOP-In.
    pub const NOP_IN: u8 = 0x20;
    /// SCSI Response.
    pub const SCSI_RESP: u8 = 0x21;
    /// SCSI Task Management Function Response.
    pub const TMF_RESP: u8 = 0x22;
    /// Login Response.
    pub const LOGIN_RESP: u8 = 0x23;
    /// Text Response.
    pub const TEXT_RESP: u8 = 0x24;
    /// SCSI Data-In.
    pub const DATA_IN: u8 = 0x25;
    /// Logout Response.
    pub const LOGOUT_RESP: u8 = 0x26;
    /// Ready To Transfer.
    pub const R2T: u8 = 0x31;
    /// Asynchronous Message.
    pub const ASYNC: u8 = 0x32;
    /// Reject.
    pub const REJECT: u8 = 0x3f;
}

/// Reject reasons (§11.17.1).
pub mod reject {
    /// Data (payload) digest error; the initiator may resend.
    pub const DATA_DIGEST: u8 = 0x02;
    /// SNACK reject.
    pub const SNACK: u8 = 0x03;
    /// Protocol error (e.g. a SNACK for a status already acknowledged).
    pub const PROTOCOL_ERROR: u8 = 0x04;
    /// Command not supported.
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    /// Immediate command rejected: too many immediate commands.
    pub const IMMEDIATE_REJECTED: u8 = 0x06;
    /// Task in progress.
    pub const TASK_IN_PROGRESS: u8 = 0x07;
    /// Invalid data ACK.
    pub const INVALID_DATA_ACK: u8 = 0x08;
    /// Invalid PDU field.
    pub const INVALID_PDU_FIELD: u8 = 0x09;
    /// Long operation reject: out of resources to generate a TTT.
    pub const OUT_OF_RESOURCES: u8 = 0x0a;
    /// Waiting for logout.
    pub const WAITING_FOR_LOGOUT: u8 = 0x0c;
}

/// Login stages (§11.12.3: CSG and NSG).
pub mod stage {
    /// SecurityNegotiation.
    pub const SECURITY: u8 = 0;
    /// LoginOperationalNegotiation.
    pub const OPERATIONAL: u8 = 1;
    /// FullFeaturePhase.
    pub const FULL_FEATURE: u8 = 3;
}

/// Errors framing a received PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum PduError {
    /// The header digest does not match: nothing in the header can be trusted, so the
    /// connection must be closed (ERL 0).
    #[error("header digest mismatch: got {got:#010x}, computed {computed:#010x}")]
    HeaderDigest {
        /// The digest on the wire.
        got: u32,
        /// The digest of the bytes received.
        computed: u32,
    },
    /// The data digest does not match: the PDU (`total_len` bytes) is dropped and answered
    /// with a Reject (reason 0x02); the connection may continue.
    #[error("data digest mismatch: got {got:#010x}, computed {computed:#010x}")]
    DataDigest {
        /// The digest on the wire.
        got: u32,
        /// The digest of the bytes received.
        computed: u32,
        /// Length of the whole PDU, to skip it.
        total_len: usize,
        /// Its header, for the Reject's data segment.
        bhs: Bhs,
    },
    /// DataSegmentLength exceeds what this side declared it receives.
    #[error("data segment of {len} bytes exceeds MaxRecvDataSegmentLength {max}")]
    DataSegmentTooLong {
        /// DataSegmentLength of the PDU.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// The AHS area does not hold well-formed AHS entries.
    #[error("malformed AHS: {0}")]
    BadAhs(&'static str),
}

/// A copy of a received Basic Header Segment with typed accessors. Fields that belong to one
/// opcode read the bytes that opcode defines; calling another opcode's accessor reads the
/// same bytes under another name (the caller dispatches on [`Bhs::opcode`] first).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Bhs(pub [u8; BHS_LEN]);

impl std::fmt::Debug for Bhs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bhs")
            .field("opcode", &format_args!("{:#04x}", self.opcode()))
            .field("immediate", &self.immediate())
            .field("flags", &format_args!("{:#04x}", self.flags()))
            .field("ahs_len", &self.ahs_len())
            .field("data_len", &self.data_len())
            .field("itt", &format_args!("{:#x}", self.itt()))
            .finish()
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn put24(b: &mut [u8], at: usize, v: u32) {
    let v = v.min(DATA_SEGMENT_MAX).to_be_bytes();
    b[at..at + 3].copy_from_slice(&v[1..]);
}

impl Bhs {
    /// The first [`BHS_LEN`] bytes of `buf` (`None` if it is shorter).
    pub fn from_slice(buf: &[u8]) -> Option<Bhs> {
        let b: &[u8; BHS_LEN] = buf.get(..BHS_LEN)?.try_into().ok()?;
        Some(Bhs(*b))
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; BHS_LEN] {
        &self.0
    }

    // ---- common fields (§11.2.1) ----

    /// Opcode (low 6 bits of byte 0).
    pub fn opcode(&self) -> u8 {
        self.0[0] & 0x3f
    }
    /// The I bit: immediate delivery (initiator PDUs).
    pub fn immediate(&self) -> bool {
        self.0[0] & 0x40 != 0
    }
    /// Byte 1 (opcode-specific flags).
    pub fn flags(&self) -> u8 {
        self.0[1]
    }
    /// The F bit (final PDU of a sequence / final text or login PDU).
    pub fn final_bit(&self) -> bool {
        self.0[1] & 0x80 != 0
    }
    /// TotalAHSLength in bytes.
    pub fn ahs_len(&self) -> usize {
        usize::from(self.0[4]) * 4
    }
    /// DataSegmentLength in bytes (without padding).
    pub fn data_len(&self) -> u32 {
        u32::from_be_bytes([0, self.0[5], self.0[6], self.0[7]])
    }
    /// LUN field (bytes 8..16), as the 8-byte SAM LUN.
    pub fn lun(&self) -> u64 {
        u64::from_be_bytes([
            self.0[8], self.0[9], self.0[10], self.0[11], self.0[12], self.0[13], self.0[14],
            self.0[15],
        ])
    }
    /// Initiator Task Tag.
    pub fn itt(&self) -> u32 {
        be32(&self.0, 16)
    }
    /// Target Transfer Tag (NOP-Out, Text, Data-Out, SNACK).
    pub fn ttt(&self) -> u32 {
        be32(&self.0, 20)
    }
    /// CmdSN (SCSI Command, TMF, NOP-Out, Text, Login, Logout).
    pub fn cmdsn(&self) -> u32 {
        be32(&self.0, 24)
    }
    /// ExpStatSN.
    pub fn expstatsn(&self) -> u32 {
        be32(&self.0, 28)
    }

    // ---- SCSI Command (§11.3) ----

    /// The R bit: the command reads (Data-In expected).
    pub fn read_bit(&self) -> bool {
        self.0[1] & 0x40 != 0
    }
    /// The W bit: the command writes (Data-Out expected).
    pub fn write_bit(&self) -> bool {
        self.0[1] & 0x20 != 0
    }
    /// Task attributes (ATTR, low 3 bits of byte 1).
    pub fn task_attr(&self) -> u8 {
        self.0[1] & 0x07
    }
    /// Expected Data Transfer Length.
    pub fn expected_data_len(&self) -> u32 {
        be32(&self.0, 20)
    }
    /// The 16-byte CDB field.
    pub fn cdb(&self) -> &[u8; 16] {
        self.0[32..48].try_into().unwrap_or(&[0; 16])
    }

    // ---- SCSI Data-Out (§11.7) ----

    /// DataSN (Data-Out; also ExpDataSN of a TMF or SNACK's BegRun is elsewhere).
    pub fn datasn(&self) -> u32 {
        be32(&self.0, 36)
    }
    /// Buffer Offset.
    pub fn buffer_offset(&self) -> u32 {
        be32(&self.0, 40)
    }

    // ---- Task Management Function Request (§11.5) ----

    /// TMF function code (low 7 bits of byte 1).
    pub fn tmf_function(&self) -> u8 {
        self.0[1] & 0x7f
    }
    /// Referenced Task Tag.
    pub fn tmf_rtt(&self) -> u32 {
        be32(&self.0, 20)
    }
    /// RefCmdSN.
    pub fn tmf_ref_cmdsn(&self) -> u32 {
        be32(&self.0, 32)
    }
    /// ExpDataSN of a TMF.
    pub fn tmf_exp_datasn(&self) -> u32 {
        be32(&self.0, 36)
    }

    // ---- Login Request (§11.12) ----

    /// The T (transit) bit.
    pub fn login_transit(&self) -> bool {
        self.0[1] & 0x80 != 0
    }
    /// The C (continue) bit of Login and Text requests.
    pub fn continue_bit(&self) -> bool {
        self.0[1] & 0x40 != 0
    }
    /// Current stage.
    pub fn login_csg(&self) -> u8 {
        (self.0[1] >> 2) & 0x03
    }
    /// Next stage.
    pub fn login_nsg(&self) -> u8 {
        self.0[1] & 0x03
    }
    /// Version-max.
    pub fn version_max(&self) -> u8 {
        self.0[2]
    }
    /// Version-min.
    pub fn version_min(&self) -> u8 {
        self.0[3]
    }
    /// ISID.
    pub fn isid(&self) -> [u8; 6] {
        [
            self.0[8], self.0[9], self.0[10], self.0[11], self.0[12], self.0[13],
        ]
    }
    /// TSIH.
    pub fn tsih(&self) -> u16 {
        be16(&self.0, 14)
    }
    /// CID (Login and Logout requests).
    pub fn cid(&self) -> u16 {
        be16(&self.0, 20)
    }

    // ---- Logout Request (§11.14) ----

    /// Reason code (low 7 bits of byte 1).
    pub fn logout_reason(&self) -> u8 {
        self.0[1] & 0x7f
    }

    // ---- SNACK Request (§11.16) ----

    /// SNACK type (low 4 bits of byte 1).
    pub fn snack_type(&self) -> u8 {
        self.0[1] & 0x0f
    }
    /// BegRun.
    pub fn snack_begrun(&self) -> u32 {
        be32(&self.0, 40)
    }
    /// RunLength.
    pub fn snack_runlength(&self) -> u32 {
        be32(&self.0, 44)
    }
}

/// What framing checks, from the negotiated parameters of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    /// CRC32C header digest present.
    pub header_digest: bool,
    /// CRC32C data digest present (after a non-empty data segment).
    pub data_digest: bool,
    /// Largest DataSegmentLength accepted (this side's MaxRecvDataSegmentLength).
    pub max_recv_data_segment: u32,
}

impl Framing {
    /// The login phase: no digests, the default 8 KiB segments (§13.12).
    pub const LOGIN: Framing = Framing {
        header_digest: false,
        data_digest: false,
        max_recv_data_segment: 8192,
    };

    /// Most bytes one PDU can take under these settings (what a receive buffer must hold).
    pub fn max_pdu_len(&self) -> usize {
        BHS_LEN
            + AHS_MAX
            + DIGEST_LEN
            + self.max_recv_data_segment.min(DATA_SEGMENT_MAX) as usize
            + 3
            + DIGEST_LEN
    }

    /// Length on the wire of a PDU with `ahs` AHS bytes and a `data`-byte data segment.
    pub fn wire_len(&self, ahs: usize, data: usize) -> usize {
        let hd = if self.header_digest { DIGEST_LEN } else { 0 };
        let dd = if self.data_digest && data > 0 {
            DIGEST_LEN
        } else {
            0
        };
        BHS_LEN + ahs + hd + data + pad_len(data) + dd
    }
}

/// One complete PDU at the start of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Bytes the PDU takes (header, AHS, digests, data, padding): consume this many.
    pub total_len: usize,
    /// Its header.
    pub bhs: Bhs,
    /// Where its AHS lies in the buffer.
    pub ahs: Range<usize>,
    /// Where its data segment (without padding) lies in the buffer.
    pub data: Range<usize>,
}

/// Padding after a data segment of `n` bytes (to a 4-byte boundary).
pub fn pad_len(n: usize) -> usize {
    (4 - (n & 3)) & 3
}

/// The padding bytes after a data segment of `n` bytes (zeros, §11.2.3), to send from a
/// static buffer and to feed the data digest: `crc32c(&[data, padding(data.len())])`.
pub fn padding(n: usize) -> &'static [u8] {
    const ZEROS: [u8; 3] = [0; 3];
    &ZEROS[..pad_len(n)]
}

/// CRC32C over the concatenation of `parts` (iSCSI digests, §12.1), as a number; on the wire
/// it is sent least significant byte first (see [`put_digest`]).
pub fn crc32c(parts: &[&[u8]]) -> u32 {
    parts
        .iter()
        .fold(0u32, |crc, p| crc32c::crc32c_append(crc, p))
}

/// The wire bytes of a digest (RFC 7143 Appendix B: least significant byte first).
pub fn put_digest(crc: u32) -> [u8; DIGEST_LEN] {
    crc.to_le_bytes()
}

fn get_digest(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Checks that the AHS area holds AHS entries end to end (§11.2.2: AHSLength, AHSType,
/// AHS-specific bytes, padded to 4 bytes).
fn check_ahs(mut ahs: &[u8]) -> Result<(), PduError> {
    while !ahs.is_empty() {
        if ahs.len() < 4 {
            return Err(PduError::BadAhs("truncated AHS header"));
        }
        let len = usize::from(be16(ahs, 0));
        if len == 0 {
            return Err(PduError::BadAhs("zero AHSLength"));
        }
        let take = 3 + len + pad_len(3 + len);
        if take > ahs.len() {
            return Err(PduError::BadAhs("AHSLength overruns TotalAHSLength"));
        }
        ahs = &ahs[take..];
    }
    Ok(())
}

/// Frames the PDU at the start of `buf`: `Ok(None)` while bytes are missing (never more than
/// [`Framing::max_pdu_len`] are needed), the complete PDU with its digests checked, or why
/// it cannot be accepted. Never reads past `buf` and allocates nothing.
pub fn frame(buf: &[u8], f: &Framing) -> Result<Option<Frame>, PduError> {
    let Some(bhs) = Bhs::from_slice(buf) else {
        return Ok(None);
    };
    let ahs_len = bhs.ahs_len();
    let ahs = BHS_LEN..BHS_LEN + ahs_len;
    let mut at = ahs.end;
    if f.header_digest {
        let Some(d) = buf.get(at..at + DIGEST_LEN) else {
            return Ok(None);
        };
        let computed = crc32c(&[&buf[..at]]);
        let got = get_digest(d);
        if got != computed {
            return Err(PduError::HeaderDigest { got, computed });
        }
        at += DIGEST_LEN;
    }
    let len = bhs.data_len();
    let max = f.max_recv_data_segment.min(DATA_SEGMENT_MAX);
    if len > max {
        return Err(PduError::DataSegmentTooLong { len, max });
    }
    if buf.len() < ahs.end {
        return Ok(None);
    }
    check_ahs(&buf[ahs.clone()])?;
    let len = len as usize;
    let data = at..at + len;
    let padded = data.end + pad_len(len);
    let total_len = if f.data_digest && len > 0 {
        padded + DIGEST_LEN
    } else {
        padded
    };
    if buf.len() < total_len {
        return Ok(None);
    }
    if f.data_digest && len > 0 {
        let computed = crc32c(&[&buf[data.start..padded]]);
        let got = get_digest(&buf[padded..total_len]);
        if got != computed {
            return Err(PduError::DataDigest {
                got,
                computed,
                total_len,
                bhs,
            });
        }
    }
    Ok(Some(Frame {
        total_len,
        bhs,
        ahs,
        data,
    }))
}

/// Appends a whole PDU (header, header digest, data, padding, data digest) to `out`: for the
/// login thread and discovery sessions, where a copy of a small data segment does not matter.
pub fn append_pdu(out: &mut Vec<u8>, bhs: &[u8; BHS_LEN], data: &[u8], f: &Framing) {
    out.extend_from_slice(bhs);
    if f.header_digest {
        out.extend_from_slice(&put_digest(crc32c(&[bhs])));
    }
    if data.is_empty() {
        return;
    }
    let pad = padding(data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(pad);
    if f.data_digest {
        out.extend_from_slice(&put_digest(crc32c(&[data, pad])));
    }
}

// ---- builders of target PDUs ----

/// Clears `b` and writes the opcode, flags and DataSegmentLength.
fn start(b: &mut [u8; BHS_LEN], op: u8, flags: u8, data_len: u32) {
    *b = [0; BHS_LEN];
    b[0] = op;
    b[1] = flags;
    put24(b, 5, data_len);
}

/// Writes the fields every target PDU carries after [`start`]'s (§11.2.1): the Initiator Task
/// Tag and the StatSN / ExpCmdSN / MaxCmdSN triple.
fn put_itt_sns(b: &mut [u8; BHS_LEN], itt: u32, stat_sn: u32, exp_cmd_sn: u32, max_cmd_sn: u32) {
    put32(b, 16, itt);
    put32(b, 24, stat_sn);
    put32(b, 28, exp_cmd_sn);
    put32(b, 32, max_cmd_sn);
}

/// Writes the LUN and Target Transfer Tag of the target PDUs that carry both (Data-In, R2T,
/// NOP-In, Text Response).
fn put_lun_ttt(b: &mut [u8; BHS_LEN], lun: u64, ttt: u32) {
    b[8..16].copy_from_slice(&lun.to_be_bytes());
    put32(b, 20, ttt);
}

/// Residual count of a response (§11.4.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Residual {
    /// The transfer matched the expected length.
    #[default]
    None,
    /// Underflow by this many bytes (U bit).
    Under(u32),
    /// Overflow by this many bytes (O bit).
    Over(u32),
}

impl Residual {
    fn bits_and_count(self) -> (u8, u32) {
        match self {
            Residual::None => (0, 0),
            Residual::Under(n) => (0x02, n),
            Residual::Over(n) => (0x04, n),
        }
    }
}

/// SCSI Response (§11.4).
#[derive(Debug, Clone, Copy, Default)]
pub struct ScsiResponse {
    /// iSCSI response code (0x00 command completed at target, 0x01 target failure).
    pub response: u8,
    /// SCSI status.
    pub status: u8,
    /// Residual of the (read or write) transfer.
    pub residual: Residual,
    /// Residual of the read part of a bidirectional command.
    pub bidi_residual: Residual,
    /// Initiator Task Tag.
    pub itt: u32,
    /// StatSN.
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
    /// ExpDataSN: Data-In PDUs sent for this command (reads) or R2Ts (writes).
    pub exp_data_sn: u32,
    /// Data segment length (sense: 2-byte SenseLength + sense bytes).
    pub data_len: u32,
}

impl ScsiResponse {
    /// Writes the BHS.
    pub fn write(&self, b: &mut [u8; BHS_LEN]) {
        let (u, n) = self.residual.bits_and_count();
        let (bu, bn) = self.bidi_residual.bits_and_count();
        start(b, opcode::SCSI_RESP, 0x80 | u | (bu << 2), self.data_len);
        put_itt_sns(b, self.itt, self.stat_sn, self.exp_cmd_sn, self.max_cmd_sn);
        b[2] = self.response;
        b[3] = self.status;
        put32(b, 36, self.exp_data_sn);
        put32(b, 40, bn);
        put32(b, 44, n);
    }
}

/// SCSI Data-In (§11.7).
#[derive(Debug, Clone, Copy, Default)]
pub struct DataIn {
    /// F bit: last PDU of the sequence.
    pub final_: bool,
    /// A bit: the target asks for a DataACK SNACK (ERL > 0 only).
    pub ack: bool,
    /// S bit with the SCSI status (only with `final_`): the PDU carries the command's status.
    pub status: Option<u8>,
    /// Residual (meaningful with `status`).
    pub residual: Residual,
    /// LUN (set with `ack`; otherwise reserved, written as given).
    pub lun: u64,
    /// Initiator Task Tag.
    pub itt: u32,
    /// Target Transfer Tag (0xffffffff unless `ack`).
    pub ttt: u32,
    /// StatSN (only with `status`).
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
    /// DataSN.
    pub data_sn: u32,
    /// Buffer Offset.
    pub buffer_offset: u32,
    /// Data segment length.
    pub data_len: u32,
}

impl DataIn {
    /// Writes the BHS.
    pub fn write(&self, b: &mut [u8; BHS_LEN]) {
        let mut flags = 0;
        if self.final_ || self.status.is_some() {
            flags |= 0x80;
        }
        if self.ack {
            flags |= 0x40;
        }
        let mut count = 0;
        if self.status.is_some() {
            let (bits, n) = self.residual.bits_and_count();
            flags |= 0x01 | bits;
            count = n;
        }
        // StatSN only with the status.
        let stat_sn = self.status.map_or(0, |_| self.stat_sn);
        start(b, opcode::DATA_IN, flags, self.data_len);
        put_itt_sns(b, self.itt, stat_sn, self.exp_cmd_sn, self.max_cmd_sn);
        if let Some(st) = self.status {
            b[3] = st;
        }
        put_lun_ttt(b, self.lun, self.ttt);
        put32(b, 36, self.data_sn);
        put32(b, 40, self.buffer_offset);
        put32(b, 44, count);
    }
}

/// Ready To Transfer (§11.8).
#[derive(Debug, Clone, Copy, Default)]
pub struct R2t {
    /// LUN.
    pub lun: u64,
    /// Initiator Task Tag.
    pub itt: u32,
    /// Target Transfer Tag the Data-Out PDUs must carry.
    pub ttt: u32,
    /// StatSN (the next one; not advanced by an R2T).
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
    /// R2TSN.
    pub r2t_sn: u32,
    /// Buffer Offset.
    pub buffer_offset: u32,
    /// Desired Data Transfer Length.
    pub desired_len: u32,
}

impl R2t {
    /// Writes the BHS.
    pub fn write(&self, b: &mut [u8; BHS_LEN]) {
        start(b, opcode::R2T, 0x80, 0);
        put_itt_sns(b, self.itt, self.stat_sn, self.exp_cmd_sn, self.max_cmd_sn);
        put_lun_ttt(b, self.lun, self.ttt);
        put32(b, 36, self.r2t_sn);
        put32(b, 40, self.buffer_offset);
        put32(b, 44, self.desired_len);
    }
}

/// NOP-In (§11.19).
#[derive(Debug, Clone, Copy, Default)]
pub struct NopIn {
    /// LUN (echoed from the NOP-Out, or set for a target ping).
    pub lun: u64,
    /// Initiator Task Tag (the NOP-Out's, or 0xffffffff for a target ping).
    pub itt: u32,
    /// Target Transfer Tag (0xffffffff in an answer; a tag for a ping that wants one back).
    pub ttt: u32,
    /// StatSN.
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
    /// Data segment length (ping data echoed).
    pub data_len: u32,
}

impl NopIn {
    /// Writes the BHS.
    pub fn write(&self, b: &mut [u8; BHS_LEN]) {
        start(b, opcode::NOP_IN, 0x80, self.data_len);
        put_itt_sns(b, self.itt, self.stat_sn, self.exp_cmd_sn, self.max_cmd_sn);
        put_lun_ttt(b, self.lun, self.ttt);
    }
}

/// SCSI Task Management Function Response (§11.6).
#[derive(Debug, Clone, Copy, Default)]
pub struct TmResponse {
    /// Response (0 function complete, 1 task does not exist, 2 LUN does not exist, 3 task
    /// still allegiant, 4 reassignment unsupported, 5 function not supported, 6 authorization
    /// failed, 0xff rejected).
    pub response: u8,
    /// Initiator Task Tag of the TMF request.
    pub itt: u32,
    /// StatSN.
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
}

impl TmResponse {
    /// Writes the BHS.
    pub fn write(&self, b: &mut [u8; BHS_LEN]) {
        start(b, opcode::TMF_RESP, 0x80, 0);
        put_itt_sns(b, self.itt, self.stat_sn, self.exp_cmd_sn, self.max_cmd_sn);
        b[2] = self.response;
    }
}

/// Logout Response (§11.15).
#[derive(Debug, Clone, Copy, Default)]
pub struct LogoutResponse {
    /// Response (0 closed successfully, 1 CID not found, 2 recovery not supported, 3 cleanup
    /// failed).
    pub response: u8,
    /// Initiator Task Tag.
    pub itt: u32,
    /// StatSN.
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
    /// Time2Wait.
    pub time2wait: u16,
    /// Time2Retain.
    pub time2retain: u16,
}

impl LogoutResponse {
    /// Writes the BHS.
    pub fn write(&self, b: &mut [u8; BHS_LEN]) {
        start(b, opcode::LOGOUT_RESP, 0x80, 0);
        put_itt_sns(b, self.itt, self.stat_sn, self.exp_cmd_sn, self.max_cmd_sn);
        b[2] = self.response;
        put16(b, 40, self.time2wait);
        put16(b, 42, self.time2retain);
    }
}

/// Reject (§11.17); its data segment is the rejected PDU's 48-byte header.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reject {
    /// Reason (see [`reject`]).
    pub reason: u8,
    /// StatSN.
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
    /// DataSN/R2TSN (only for a rejected SNACK; else 0).
    pub data_sn: u32,
    /// Data segment length (normally [`BHS_LEN`]).
    pub data_len: u32,
}

impl Reject {
    /// Writes the BHS.
    pub fn write(&self, b: &mut [u8; BHS_LEN]) {
        start(b, opcode::REJECT, 0x80, self.data_len);
        put_itt_sns(
            b,
            RESERVED_TAG,
            self.stat_sn,
            self.exp_cmd_sn,
            self.max_cmd_sn,
        );
        b[2] = self.reason;
        put32(b, 36, self.data_sn);
    }
}

/// Asynchronous Message (§11.9).
#[derive(Debug, Clone, Copy, Default)]
pub struct AsyncMessage {
    /// LUN (for a SCSI async event).
    pub lun: u64,
    /// StatSN.
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
    /// AsyncEvent (0 SCSI event, 1 logout request, 2 connection drop, 3 all connections
    /// drop, 4 renegotiation, 0xff vendor).
    pub event: u8,
    /// AsyncVCode.
    pub vcode: u8,
    /// Parameter1.
    pub param1: u16,
    /// Parameter2.
    pub param2: u16,
    /// Parameter3.
    pub param3: u16,
    /// Data segment length (sense data for a SCSI event).
    pub data_len: u32,
}

impl AsyncMessage {
    /// Writes the BHS.
    pub fn write(&self, b: &mut [u8; BHS_LEN]) {
        start(b, opcode::ASYNC, 0x80, self.data_len);
        put_itt_sns(
            b,
            RESERVED_TAG,
            self.stat_sn,
            self.exp_cmd_sn,
            self.max_cmd_sn,
        );
        b[8..16].copy_from_slice(&self.lun.to_be_bytes());
        b[36] = self.event;
        b[37] = self.vcode;
        put16(b, 38, self.param1);
        put16(b, 40, self.param2);
        put16(b, 42, self.param3);
    }
}

/// Text Response (§11.11).
#[derive(Debug, Clone, Copy, Default)]
pub struct TextResponse {
    /// F bit: the last response of this exchange.
    pub final_: bool,
    /// C bit: the text continues in the next response (never with `final_`).
    pub cont: bool,
    /// LUN (echoed).
    pub lun: u64,
    /// Initiator Task Tag.
    pub itt: u32,
    /// Target Transfer Tag (0xffffffff with `final_`, else a tag for the continuation).
    pub ttt: u32,
    /// StatSN.
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
    /// Data segment length.
    pub data_len: u32,
}

impl TextResponse {
    /// Writes the BHS.
    pub fn write(&self, b: &mut [u8; BHS_LEN]) {
        let flags = if self.final_ { 0x80 } else { 0 } | if self.cont { 0x40 } else { 0 };
        start(b, opcode::TEXT_RESP, flags, self.data_len);
        put_itt_sns(b, self.itt, self.stat_sn, self.exp_cmd_sn, self.max_cmd_sn);
        put_lun_ttt(b, self.lun, self.ttt);
    }
}

/// Login Response (§11.13).
#[derive(Debug, Clone, Copy, Default)]
pub struct LoginResponse {
    /// T bit: the target agrees to move to `nsg`.
    pub transit: bool,
    /// C bit: the response text continues.
    pub cont: bool,
    /// Current stage.
    pub csg: u8,
    /// Next stage (meaningful with `transit`).
    pub nsg: u8,
    /// Version-max.
    pub version_max: u8,
    /// Version-active.
    pub version_active: u8,
    /// ISID (echoed).
    pub isid: [u8; 6],
    /// TSIH (the new session's in the final response).
    pub tsih: u16,
    /// Initiator Task Tag.
    pub itt: u32,
    /// StatSN.
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
    /// Status-Class (0 success, 1 redirection, 2 initiator error, 3 target error).
    pub status_class: u8,
    /// Status-Detail.
    pub status_detail: u8,
    /// Data segment length.
    pub data_len: u32,
}

impl LoginResponse {
    /// Writes the BHS.
    pub fn write(&self, b: &mut [u8; BHS_LEN]) {
        let mut flags = ((self.csg & 3) << 2) | (self.nsg & 3);
        if self.transit {
            flags |= 0x80;
        }
        if self.cont {
            flags |= 0x40;
        }
        start(b, opcode::LOGIN_RESP, flags, self.data_len);
        put_itt_sns(b, self.itt, self.stat_sn, self.exp_cmd_sn, self.max_cmd_sn);
        b[2] = self.version_max;
        b[3] = self.version_active;
        b[8..14].copy_from_slice(&self.isid);
        put16(b, 14, self.tsih);
        b[36] = self.status_class;
        b[37] = self.status_detail;
    }
}

#[cfg(test)]
#[path = "pdu_tests.rs"]
mod tests;
