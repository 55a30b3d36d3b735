//! iSNSP wire format (RFC 4171 §5): the PDU header, TLV attributes, multi-PDU reassembly and
//! reply splitting. Everything here is pure: bytes in, values (or an error) out, no I/O.
//!
//! PDU header, 12 bytes, every field big-endian:
//!
//! | bytes | field | meaning |
//! |---|---|---|
//! | 0..2 | version | iSNSP version, always 0x0001 |
//! | 2..4 | function | function ID; responses have bit 15 set (`0x8000 \| request`) |
//! | 4..6 | pdu_length | length of the payload that follows the header (not the header) |
//! | 6..8 | flags | 0x8000 sender is a client, 0x4000 sender is the server, 0x2000 authentication block present, 0x1000 REPLACE (DevAttrReg), 0x0800 last PDU of the message, 0x0400 first PDU of the message |
//! | 8..10 | xid | transaction ID, echoed in the response |
//! | 10..12 | seq | sequence number of this PDU within its message, from 0 |
//!
//! Payload: a sequence of TLV attributes. Each is tag (4 bytes), length (4 bytes, a multiple of
//! 4) and a value of that many bytes (strings NUL-terminated and zero-padded to 4 bytes;
//! integers 4 bytes; IP addresses 16 bytes, IPv4 as v4-mapped IPv6; timestamps 8 bytes).
//! Responses start with a 4-byte status code before the attributes.

use std::net::Ipv6Addr;

use thiserror::Error;

/// iSNSP version in every header.
pub const ISNS_VERSION: u16 = 1;
/// Header size in bytes.
pub const HEADER_LEN: usize = 12;
/// TLV header (tag + length) size in bytes.
pub const TLV_HEADER_LEN: usize = 8;

pub const FLAG_CLIENT: u16 = 0x8000;
pub const FLAG_SERVER: u16 = 0x4000;
pub const FLAG_AUTH: u16 = 0x2000;
pub const FLAG_REPLACE: u16 = 0x1000;
pub const FLAG_LAST_PDU: u16 = 0x0800;
pub const FLAG_FIRST_PDU: u16 = 0x0400;

/// Bit that turns a request function ID into its response ID.
pub const RESPONSE_BIT: u16 = 0x8000;

/// Largest payload of a PDU we send: open-isns clients receive PDUs into an 8 KiB buffer
/// (`ISNS_MAX_MESSAGE`), header included, so larger replies are split into several PDUs.
pub const MAX_REPLY_PDU_BYTES: usize = 8192;
/// Payload budget of one reply PDU (8 KiB minus the header).
pub const MAX_REPLY_PAYLOAD_BYTES: usize = MAX_REPLY_PDU_BYTES - HEADER_LEN;
/// Largest reassembled request we accept from a client: a registration of the largest entity
/// we allow (see `registry::MAX_OBJECTS_PER_ENTITY`) fits well within it, and it bounds the
/// memory one client can pin with a message that never ends.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// Most PDUs in one request message (a 1 MiB message of 64 KiB PDUs needs 16; small PDUs are
/// allowed but not unboundedly many).
pub const MAX_PDUS_PER_MESSAGE: u16 = 512;
/// Most attributes in one message: a 1 MiB message of minimal (8-byte) TLVs.
pub const MAX_TLVS: usize = MAX_MESSAGE_BYTES / TLV_HEADER_LEN;

/// Function IDs (RFC 4171 §6.1).
pub mod func {
    pub const DEV_ATTR_REG: u16 = 1;
    pub const DEV_ATTR_QRY: u16 = 2;
    pub const DEV_GET_NEXT: u16 = 3;
    pub const DEV_DEREG: u16 = 4;
    pub const SCN_REG: u16 = 5;
    pub const SCN_DEREG: u16 = 6;
    pub const SCN_EVENT: u16 = 7;
    pub const SCN: u16 = 8;
    pub const DD_REG: u16 = 9;
    pub const DD_DEREG: u16 = 10;
    pub const DDS_REG: u16 = 11;
    pub const DDS_DEREG: u16 = 12;
    pub const ESI: u16 = 13;
    pub const HEARTBEAT: u16 = 14;
}

/// Status codes of responses (RFC 4171 §6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    Success = 0,
    Unknown = 1,
    MessageFormat = 2,
    InvalidRegistration = 3,
    AuthUnknown = 4,
    InvalidQuery = 5,
    SourceUnknown = 6,
    SourceAbsent = 7,
    SourceUnauthorized = 8,
    NoSuchEntry = 9,
    VersionNotSupported = 10,
    Internal = 11,
    Busy = 12,
    InvalidUpdate = 14,
    MessageNotSupported = 15,
    ScnEventRejected = 16,
    ScnRegistrationRejected = 17,
    AttributeNotImplemented = 18,
    EsiNotAvailable = 21,
    InvalidDeregistration = 22,
    RegistrationNotSupported = 23,
}

/// Attribute tags (RFC 4171 §6.1) that this server understands.
pub mod tag {
    pub const DELIMITER: u32 = 0;
    pub const EID: u32 = 1;
    pub const ENTITY_PROTOCOL: u32 = 2;
    pub const MGMT_IP: u32 = 3;
    pub const TIMESTAMP: u32 = 4;
    pub const PROTOCOL_VERSION_RANGE: u32 = 5;
    pub const REGISTRATION_PERIOD: u32 = 6;
    pub const ENTITY_INDEX: u32 = 7;
    pub const ENTITY_NEXT_INDEX: u32 = 8;
    pub const PORTAL_IP: u32 = 16;
    pub const PORTAL_PORT: u32 = 17;
    pub const PORTAL_SYMBOLIC_NAME: u32 = 18;
    pub const ESI_INTERVAL: u32 = 19;
    pub const ESI_PORT: u32 = 20;
    pub const PORTAL_INDEX: u32 = 22;
    pub const SCN_PORT: u32 = 23;
    pub const PORTAL_NEXT_INDEX: u32 = 24;
    pub const PORTAL_SECURITY_BITMAP: u32 = 27;
    pub const ISCSI_NAME: u32 = 32;
    pub const ISCSI_NODE_TYPE: u32 = 33;
    pub const ISCSI_ALIAS: u32 = 34;
    pub const ISCSI_SCN_BITMAP: u32 = 35;
    pub const ISCSI_NODE_INDEX: u32 = 36;
    pub const WWNN_TOKEN: u32 = 37;
    pub const ISCSI_NODE_NEXT_INDEX: u32 = 38;
    pub const ISCSI_AUTH_METHOD: u32 = 42;
    pub const PG_ISCSI_NAME: u32 = 48;
    pub const PG_PORTAL_IP: u32 = 49;
    pub const PG_PORTAL_PORT: u32 = 50;
    pub const PG_TAG: u32 = 51;
    pub const PG_INDEX: u32 = 52;
    pub const PG_NEXT_INDEX: u32 = 53;
    pub const DDS_ID: u32 = 2049;
    pub const DDS_NAME: u32 = 2050;
    pub const DDS_STATUS: u32 = 2051;
    pub const DDS_NEXT_ID: u32 = 2052;
    pub const DD_ID: u32 = 2065;
    pub const DD_NAME: u32 = 2066;
    pub const DD_MEMBER_ISCSI_INDEX: u32 = 2067;
    pub const DD_MEMBER_ISCSI_NAME: u32 = 2068;
    pub const DD_MEMBER_FC_PORT_NAME: u32 = 2069;
    pub const DD_MEMBER_PORTAL_INDEX: u32 = 2070;
    pub const DD_MEMBER_PORTAL_IP: u32 = 2071;
    pub const DD_MEMBER_PORTAL_PORT: u32 = 2072;
    pub const DD_FEATURES: u32 = 2078;
    pub const DD_NEXT_ID: u32 = 2079;
}

/// Malformed wire input. Each maps to an iSNS status (mostly Message Format Error).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WireError {
    #[error("unsupported iSNSP version {0}")]
    Version(u16),
    #[error("PDU payload length {0} is not a multiple of 4")]
    UnalignedPdu(usize),
    #[error("truncated TLV at offset {0}")]
    TruncatedTlv(usize),
    #[error("TLV tag {tag} length {len} is not a multiple of 4")]
    UnalignedTlv { tag: u32, len: usize },
    #[error("TLV tag {tag} has length {len}, expected {expected}")]
    BadLength {
        tag: u32,
        len: usize,
        expected: usize,
    },
    #[error("TLV tag {0} is not a valid UTF-8, NUL-terminated string")]
    BadString(u32),
    #[error("more than {MAX_TLVS} attributes")]
    TooManyTlvs,
    #[error("message exceeds {MAX_MESSAGE_BYTES} bytes")]
    MessageTooLarge,
    #[error("message exceeds {MAX_PDUS_PER_MESSAGE} PDUs")]
    TooManyPdus,
    #[error(
        "PDU out of order: expected seq {expected} of xid {xid}, got seq {seq} of xid {got_xid}"
    )]
    OutOfOrder {
        xid: u16,
        expected: u16,
        got_xid: u16,
        seq: u16,
    },
    #[error("first PDU of a message lacks the FIRST flag or has seq {0}")]
    MissingFirst(u16),
    #[error("response payload shorter than its 4-byte status")]
    MissingStatus,
}

impl WireError {
    /// The status a response carries for this error.
    pub fn status(&self) -> Status {
        match self {
            WireError::Version(_) => Status::VersionNotSupported,
            _ => Status::MessageFormat,
        }
    }

    /// Whether the connection must close after answering: after a framing error the byte
    /// stream cannot be trusted to be in step (RFC 4171 §5.1: out-of-order or unparseable
    /// PDUs end the message; a version mismatch means we cannot speak with this client).
    pub fn ends_connection(&self) -> bool {
        matches!(
            self,
            WireError::OutOfOrder { .. }
                | WireError::MissingFirst(_)
                | WireError::MessageTooLarge
                | WireError::TooManyPdus
                | WireError::Version(_)
        )
    }
}

/// The fixed 12-byte PDU header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: u16,
    pub function: u16,
    pub length: u16,
    pub flags: u16,
    pub xid: u16,
    pub seq: u16,
}

impl Header {
    /// Decodes a header. Does not judge the version: the caller answers a bad version with a
    /// status, which needs the function and xid decoded here.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Header {
        let be = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        Header {
            version: be(0),
            function: be(2),
            length: be(4),
            flags: be(6),
            xid: be(8),
            seq: be(10),
        }
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        for (i, v) in [
            self.version,
            self.function,
            self.length,
            self.flags,
            self.xid,
            self.seq,
        ]
        .into_iter()
        .enumerate()
        {
            b[i * 2..i * 2 + 2].copy_from_slice(&v.to_be_bytes());
        }
        b
    }
}

/// One attribute as received: its tag and its (padded) value bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tlv {
    pub tag: u32,
    pub value: Vec<u8>,
}

impl Tlv {
    /// A zero-length value: "no value" in keys, "return this attribute" in queries.
    pub fn is_nil(&self) -> bool {
        self.value.is_empty()
    }

    pub fn as_u32(&self) -> Result<u32, WireError> {
        match self.value.as_slice() {
            [a, b, c, d] => Ok(u32::from_be_bytes([*a, *b, *c, *d])),
            v => Err(WireError::BadLength {
                tag: self.tag,
                len: v.len(),
                expected: 4,
            }),
        }
    }

    pub fn as_u64(&self) -> Result<u64, WireError> {
        let arr: [u8; 8] = self
            .value
            .as_slice()
            .try_into()
            .map_err(|_| WireError::BadLength {
                tag: self.tag,
                len: self.value.len(),
                expected: 8,
            })?;
        Ok(u64::from_be_bytes(arr))
    }

    /// A NUL-terminated, zero-padded UTF-8 string (RFC 4171 §5.5.1: "null-terminated").
    /// Clients that forget the terminator (tgt pads with zeros only when the length is not
    /// already a multiple of 4) are accepted: the value ends at the first NUL or at its end.
    pub fn as_string(&self) -> Result<String, WireError> {
        let end = self
            .value
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(self.value.len());
        if self.value[end..].iter().any(|&c| c != 0) {
            return Err(WireError::BadString(self.tag));
        }
        std::str::from_utf8(&self.value[..end])
            .map(str::to_owned)
            .map_err(|_| WireError::BadString(self.tag))
    }

    pub fn as_ip(&self) -> Result<Ipv6Addr, WireError> {
        let arr: [u8; 16] = self
            .value
            .as_slice()
            .try_into()
            .map_err(|_| WireError::BadLength {
                tag: self.tag,
                len: self.value.len(),
                expected: 16,
            })?;
        Ok(Ipv6Addr::from(arr))
    }
}

/// Splits a payload into TLVs. Pure; rejects truncation, unaligned lengths and floods.
pub fn parse_tlvs(payload: &[u8]) -> Result<Vec<Tlv>, WireError> {
    let mut out = Vec::new();
    let mut off = 0usize;
    while off < payload.len() {
        if out.len() >= MAX_TLVS {
            return Err(WireError::TooManyTlvs);
        }
        let hdr = payload
            .get(off..off + TLV_HEADER_LEN)
            .ok_or(WireError::TruncatedTlv(off))?;
        let tag = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let len = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]) as usize;
        if !len.is_multiple_of(4) {
            return Err(WireError::UnalignedTlv { tag, len });
        }
        let start = off + TLV_HEADER_LEN;
        let value = start
            .checked_add(len)
            .and_then(|end| payload.get(start..end))
            .ok_or(WireError::TruncatedTlv(off))?;
        out.push(Tlv {
            tag,
            value: value.to_vec(),
        });
        off = start + len;
    }
    Ok(out)
}

/// Appends TLVs to an outgoing payload, recording where each one starts so that the payload
/// can later be split into PDUs at attribute boundaries.
#[derive(Debug, Default, Clone)]
pub struct TlvWriter {
    pub buf: Vec<u8>,
    /// Offsets in `buf` where a TLV starts (after any status word).
    pub boundaries: Vec<usize>,
}

impl TlvWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// A response: starts with the 4-byte status.
    pub fn response(status: Status) -> Self {
        let mut w = Self::new();
        w.buf.extend_from_slice(&(status as u32).to_be_bytes());
        w
    }

    fn raw(&mut self, tag: u32, value: &[u8]) {
        let padded = value.len().div_ceil(4) * 4;
        self.boundaries.push(self.buf.len());
        self.buf.extend_from_slice(&tag.to_be_bytes());
        // Values are bounded far below 4 GiB (names ≤ MAX_NAME_BYTES), so this cannot wrap.
        self.buf
            .extend_from_slice(&u32::try_from(padded).unwrap_or(u32::MAX).to_be_bytes());
        self.buf.extend_from_slice(value);
        self.buf.resize(self.buf.len() + (padded - value.len()), 0);
    }

    pub fn nil(&mut self, tag: u32) {
        self.raw(tag, &[]);
    }

    pub fn delimiter(&mut self) {
        self.nil(tag::DELIMITER);
    }

    pub fn u32(&mut self, tag: u32, v: u32) {
        self.raw(tag, &v.to_be_bytes());
    }

    pub fn u64(&mut self, tag: u32, v: u64) {
        self.raw(tag, &v.to_be_bytes());
    }

    /// A string, NUL-terminated then padded (always at least one NUL).
    pub fn string(&mut self, tag: u32, s: &str) {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.raw(tag, &v);
    }

    pub fn ip(&mut self, tag: u32, ip: &Ipv6Addr) {
        self.raw(tag, &ip.octets());
    }

    /// Copies a received TLV verbatim (e.g. echoing the message key of a query).
    pub fn tlv(&mut self, t: &Tlv) {
        self.raw(t.tag, &t.value);
    }
}

/// Encodes a message as PDUs whose payloads are at most `max_payload` bytes, cut at TLV
/// boundaries when possible (naive clients such as tgt parse each PDU on its own), with
/// FIRST/LAST flags and sequence numbers. Always at least one PDU.
pub fn split_pdus(
    function: u16,
    flags: u16,
    xid: u16,
    w: &TlvWriter,
    max_payload: usize,
) -> Vec<u8> {
    // PDU payloads stay multiples of 4 (the receiver checks it) and fit the u16 length field.
    let max_payload = (max_payload & !3).clamp(4, usize::from(u16::MAX) & !3);
    let total = w.buf.len();
    let mut cuts = vec![0usize];
    let mut start = 0usize;
    // Candidate cut points: each TLV start; fall back to a hard cut if one TLV is too long.
    let mut bi = 0usize;
    while total - start > max_payload {
        let limit = start + max_payload;
        let mut best = None;
        while bi < w.boundaries.len() && w.boundaries[bi] <= limit {
            if w.boundaries[bi] > start {
                best = Some(w.boundaries[bi]);
            }
            bi += 1;
        }
        let cut = best.unwrap_or(limit);
        cuts.push(cut);
        start = cut;
    }
    cuts.push(total);
    let npdus = cuts.len() - 1;
    let mut out = Vec::with_capacity(total + npdus * HEADER_LEN);
    for i in 0..npdus {
        let (a, b) = (cuts[i], cuts[i + 1]);
        let mut f = flags & !(FLAG_FIRST_PDU | FLAG_LAST_PDU);
        if i == 0 {
            f |= FLAG_FIRST_PDU;
        }
        if i + 1 == npdus {
            f |= FLAG_LAST_PDU;
        }
        let h = Header {
            version: ISNS_VERSION,
            function,
            // b - a ≤ max_payload ≤ u16::MAX by the clamp above.
            length: u16::try_from(b - a).unwrap_or(u16::MAX),
            flags: f,
            xid,
            // npdus is bounded by the message size over 4 bytes; replies stay far below 2^16
            // PDUs (a 100 000-node reply is a few hundred PDUs).
            seq: u16::try_from(i).unwrap_or(u16::MAX),
        };
        out.extend_from_slice(&h.encode());
        out.extend_from_slice(&w.buf[a..b]);
    }
    out
}

/// A complete (reassembled) message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub function: u16,
    pub flags: u16,
    pub xid: u16,
    pub payload: Vec<u8>,
}

/// Reassembles multi-PDU messages from one connection (RFC 4171 §5.1: PDUs of one message
/// share its xid and carry consecutive sequence numbers, FIRST on the first, LAST on the
/// last). Pure state machine: feed it header + payload, get a message when one completes.
#[derive(Debug, Default)]
pub struct Reassembler {
    partial: Option<Message>,
    next_seq: u16,
}

impl Reassembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes held for an incomplete message (bounded by `MAX_MESSAGE_BYTES`).
    pub fn pending_bytes(&self) -> usize {
        self.partial.as_ref().map_or(0, |m| m.payload.len())
    }

    pub fn push(&mut self, h: &Header, payload: &[u8]) -> Result<Option<Message>, WireError> {
        if h.version != ISNS_VERSION {
            self.partial = None;
            return Err(WireError::Version(h.version));
        }
        if !payload.len().is_multiple_of(4) {
            self.partial = None;
            return Err(WireError::UnalignedPdu(payload.len()));
        }
        match self.partial.as_mut() {
            None => {
                let first = h.flags & FLAG_FIRST_PDU != 0;
                if !first && h.seq != 0 {
                    return Err(WireError::MissingFirst(h.seq));
                }
                // A PDU with neither FIRST nor LAST (seq 0) is taken as a whole message:
                // some clients leave both flags clear on single-PDU messages.
                if h.flags & FLAG_LAST_PDU != 0 || !first {
                    return Ok(Some(Message {
                        function: h.function,
                        flags: h.flags,
                        xid: h.xid,
                        payload: payload.to_vec(),
                    }));
                }
                if payload.len() > MAX_MESSAGE_BYTES {
                    return Err(WireError::MessageTooLarge);
                }
                self.partial = Some(Message {
                    function: h.function,
                    flags: h.flags,
                    xid: h.xid,
                    payload: payload.to_vec(),
                });
                self.next_seq = h.seq.wrapping_add(1);
                Ok(None)
            }
            Some(m) => {
                if h.xid != m.xid || h.seq != self.next_seq || h.function != m.function {
                    let e = WireError::OutOfOrder {
                        xid: m.xid,
                        expected: self.next_seq,
                        got_xid: h.xid,
                        seq: h.seq,
                    };
                    self.partial = None;
                    return Err(e);
                }
                if h.seq >= MAX_PDUS_PER_MESSAGE {
                    self.partial = None;
                    return Err(WireError::TooManyPdus);
                }
                if m.payload.len() + payload.len() > MAX_MESSAGE_BYTES {
                    self.partial = None;
                    return Err(WireError::MessageTooLarge);
                }
                m.payload.extend_from_slice(payload);
                self.next_seq = h.seq.wrapping_add(1);
                if h.flags & FLAG_LAST_PDU != 0 {
                    Ok(self.partial.take())
                } else {
                    Ok(None)
                }
            }
        }
    }
}

/// A client request split into its parts (RFC 4171 §5.6.1): the Source attribute, the
/// Message Key attributes up to the Delimiter, and the Operating Attributes after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub function: u16,
    pub flags: u16,
    pub xid: u16,
    pub source: Option<Tlv>,
    pub keys: Vec<Tlv>,
    pub ops: Vec<Tlv>,
}

impl Request {
    pub fn replace(&self) -> bool {
        self.flags & FLAG_REPLACE != 0
    }

    /// The source as an iSCSI name, if it is one.
    pub fn source_name(&self) -> Option<String> {
        self.source
            .as_ref()
            .filter(|t| t.tag == tag::ISCSI_NAME && !t.is_nil())
            .and_then(|t| t.as_string().ok())
    }
}

/// Parses a reassembled client message. Pure. A missing delimiter is tolerated (everything
/// after the source is then the key), since some clients omit it when there are no
/// operating attributes.
pub fn parse_request(m: &Message) -> Result<Request, WireError> {
    let tlvs = parse_tlvs(&m.payload)?;
    let mut it = tlvs.into_iter();
    let source = it.next().filter(|t| t.tag != tag::DELIMITER);
    let mut keys = Vec::new();
    let mut ops = Vec::new();
    let mut after_delim = source.is_none() && !m.payload.is_empty();
    for t in it {
        if !after_delim && t.tag == tag::DELIMITER {
            after_delim = true;
            continue;
        }
        if after_delim {
            ops.push(t);
        } else {
            keys.push(t);
        }
    }
    Ok(Request {
        function: m.function,
        flags: m.flags,
        xid: m.xid,
        source,
        keys,
        ops,
    })
}

/// Parses the status of a response payload (e.g. a client's SCN response). Pure.
pub fn response_status(payload: &[u8]) -> Result<u32, WireError> {
    match payload {
        [a, b, c, d, ..] => Ok(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => Err(WireError::MissingStatus),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pdu(function: u16, flags: u16, xid: u16, seq: u16, payload: &[u8]) -> (Header, Vec<u8>) {
        (
            Header {
                version: 1,
                function,
                length: payload.len() as u16,
                flags,
                xid,
                seq,
            },
            payload.to_vec(),
        )
    }

    #[test]
    fn header_roundtrip_is_big_endian() {
        let h = Header {
            version: 1,
            function: 0x8002,
            length: 0x0102,
            flags: 0x4c00,
            xid: 7,
            seq: 3,
        };
        let b = h.encode();
        assert_eq!(b, [0, 1, 0x80, 2, 1, 2, 0x4c, 0, 0, 7, 0, 3]);
        assert_eq!(Header::decode(&b), h);
    }

    #[test]
    fn tlv_strings_are_nul_terminated_and_padded() {
        let mut w = TlvWriter::new();
        w.string(tag::ISCSI_NAME, "abcd");
        assert_eq!(w.buf.len(), 8 + 8);
        assert_eq!(&w.buf[4..8], &8u32.to_be_bytes());
        let t = parse_tlvs(&w.buf).unwrap();
        assert_eq!(t[0].as_string().unwrap(), "abcd");
        // Garbage after the NUL is refused.
        let bad = Tlv {
            tag: 32,
            value: b"ab\0c".to_vec(),
        };
        assert_eq!(bad.as_string(), Err(WireError::BadString(32)));
    }

    #[test]
    fn truncated_and_unaligned_tlvs_are_errors() {
        assert_eq!(parse_tlvs(&[0, 0, 0, 1]), Err(WireError::TruncatedTlv(0)));
        let mut b = vec![0, 0, 0, 32, 0, 0, 0, 8, 1, 2, 3, 4];
        assert_eq!(parse_tlvs(&b), Err(WireError::TruncatedTlv(0)));
        b[7] = 3;
        assert_eq!(
            parse_tlvs(&b),
            Err(WireError::UnalignedTlv { tag: 32, len: 3 })
        );
        // A length near u32::MAX must not overflow.
        let huge = [0, 0, 0, 1, 0xff, 0xff, 0xff, 0xfc];
        assert_eq!(parse_tlvs(&huge), Err(WireError::TruncatedTlv(0)));
    }

    #[test]
    fn reassembles_in_order_and_rejects_out_of_order() {
        let mut r = Reassembler::new();
        let (h, p) = pdu(2, FLAG_CLIENT | FLAG_FIRST_PDU, 9, 0, &[0; 8]);
        assert_eq!(r.push(&h, &p), Ok(None));
        let (h, p) = pdu(2, FLAG_CLIENT | FLAG_LAST_PDU, 9, 1, &[1; 4]);
        let m = r.push(&h, &p).unwrap().unwrap();
        assert_eq!(m.payload.len(), 12);
        assert_eq!(m.xid, 9);

        let (h, p) = pdu(2, FLAG_CLIENT | FLAG_FIRST_PDU, 10, 0, &[0; 8]);
        assert_eq!(r.push(&h, &p), Ok(None));
        let (h, p) = pdu(2, FLAG_CLIENT | FLAG_LAST_PDU, 10, 2, &[0; 4]);
        assert!(matches!(
            r.push(&h, &p),
            Err(WireError::OutOfOrder { expected: 1, .. })
        ));
        // Middle PDU with no message started.
        let (h, p) = pdu(2, FLAG_CLIENT, 11, 3, &[0; 4]);
        assert_eq!(r.push(&h, &p), Err(WireError::MissingFirst(3)));
        let (h, p) = pdu(
            2,
            FLAG_CLIENT | FLAG_FIRST_PDU | FLAG_LAST_PDU,
            1,
            0,
            &[0; 3],
        );
        assert_eq!(r.push(&h, &p), Err(WireError::UnalignedPdu(3)));
        let mut h2 = h;
        h2.version = 2;
        assert_eq!(r.push(&h2, &[]), Err(WireError::Version(2)));
    }

    #[test]
    fn request_parts() {
        let mut w = TlvWriter::new();
        w.string(tag::ISCSI_NAME, "src");
        w.nil(tag::ISCSI_NAME);
        w.delimiter();
        w.nil(tag::ISCSI_NODE_TYPE);
        let m = Message {
            function: func::DEV_ATTR_QRY,
            flags: FLAG_CLIENT,
            xid: 1,
            payload: w.buf,
        };
        let r = parse_request(&m).unwrap();
        assert_eq!(r.source_name().as_deref(), Some("src"));
        assert_eq!(r.keys.len(), 1);
        assert!(r.keys[0].is_nil());
        assert_eq!(r.ops.len(), 1);
    }

    #[test]
    fn split_respects_budget_and_boundaries() {
        let mut w = TlvWriter::response(Status::Success);
        for i in 0..1000 {
            w.string(tag::ISCSI_NAME, &format!("iqn.2024-01.test:node{i}"));
        }
        let bytes = split_pdus(0x8002, FLAG_SERVER, 5, &w, MAX_REPLY_PAYLOAD_BYTES);
        let mut off = 0;
        let mut r = Reassembler::new();
        let mut n = 0;
        let mut done = None;
        while off < bytes.len() {
            let h = Header::decode(bytes[off..off + 12].try_into().unwrap());
            let len = h.length as usize;
            assert!(len + HEADER_LEN <= MAX_REPLY_PDU_BYTES);
            let p = &bytes[off + 12..off + 12 + len];
            // Every PDU after the first starts with a whole TLV.
            if n > 0 {
                assert_eq!(&p[0..4], &tag::ISCSI_NAME.to_be_bytes());
            }
            done = r.push(&h, p).unwrap();
            off += 12 + len;
            n += 1;
        }
        assert!(n > 3);
        assert_eq!(done.unwrap().payload, w.buf);
    }

    /// MAX_TLVS is reached: that many minimal TLVs parse, one more is refused; a maximal
    /// message (MAX_MESSAGE_BYTES) of minimal TLVs is exactly at the limit.
    #[test]
    fn max_tlvs_is_reached() {
        let nil = [0u8, 0, 0, 32, 0, 0, 0, 0];
        let at: Vec<u8> = nil
            .iter()
            .copied()
            .cycle()
            .take(MAX_TLVS * TLV_HEADER_LEN)
            .collect();
        assert_eq!(at.len(), MAX_MESSAGE_BYTES);
        assert_eq!(parse_tlvs(&at).unwrap().len(), MAX_TLVS);
        let mut over = at.clone();
        over.extend_from_slice(&nil);
        assert_eq!(parse_tlvs(&over), Err(WireError::TooManyTlvs));
        // Through reassembly: 17 PDUs of up to 65532 bytes make the whole message.
        let mut r = Reassembler::new();
        let chunks: Vec<&[u8]> = at.chunks(65532 & !7).collect();
        let mut done = None;
        for (i, c) in chunks.iter().enumerate() {
            let mut flags = FLAG_CLIENT;
            if i == 0 {
                flags |= FLAG_FIRST_PDU;
            }
            if i + 1 == chunks.len() {
                flags |= FLAG_LAST_PDU;
            }
            let (h, p) = pdu(func::DEV_ATTR_QRY, flags, 1, i as u16, c);
            done = r.push(&h, &p).unwrap();
        }
        let m = done.unwrap();
        assert_eq!(parse_request(&m).unwrap().keys.len() + 1, MAX_TLVS);
        // One PDU more than the message limit allows is refused.
        let (h, p) = pdu(
            func::DEV_ATTR_QRY,
            FLAG_CLIENT | FLAG_FIRST_PDU,
            2,
            0,
            &at[..65528],
        );
        r.push(&h, &p).unwrap();
        let mut seq = 1;
        let res = loop {
            let (h, p) = pdu(func::DEV_ATTR_QRY, FLAG_CLIENT, 2, seq, &at[..65528]);
            match r.push(&h, &p) {
                Ok(None) => seq += 1,
                other => break other,
            }
        };
        assert_eq!(res, Err(WireError::MessageTooLarge));
    }

    proptest! {
        // The parser is total: arbitrary bytes give a value or an error, never a panic, and
        // whatever parses re-encodes to the same bytes.
        #[test]
        fn tlv_parser_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(tlvs) = parse_tlvs(&bytes) {
                let mut w = TlvWriter::new();
                for t in &tlvs { w.tlv(t); }
                prop_assert_eq!(w.buf, bytes);
            }
        }

        #[test]
        fn reassembler_is_total(pdus in proptest::collection::vec(
            (any::<u16>(), any::<u16>(), any::<u16>(), any::<u16>(),
             proptest::collection::vec(any::<u8>(), 0..64)), 0..16)) {
            let mut r = Reassembler::new();
            for (version, flags, xid, seq, payload) in pdus {
                let h = Header { version: version % 3, function: 2, length: payload.len() as u16,
                                 flags, xid: xid % 4, seq: seq % 4 };
                if let Ok(Some(m)) = r.push(&h, &payload) {
                    let _ = parse_request(&m);
                }
                prop_assert!(r.pending_bytes() <= MAX_MESSAGE_BYTES);
            }
        }

        #[test]
        fn split_then_reassemble_is_identity(n in 0usize..400, budget in 16usize..9000) {
            let mut w = TlvWriter::response(Status::Success);
            for i in 0..n { w.u32(tag::ISCSI_NODE_TYPE, i as u32); }
            let bytes = split_pdus(0x8003, FLAG_SERVER, 1, &w, budget);
            let mut off = 0;
            let mut r = Reassembler::new();
            let mut out = None;
            while off < bytes.len() {
                let h = Header::decode(bytes[off..off + 12].try_into().unwrap());
                let len = h.length as usize;
                out = r.push(&h, &bytes[off + 12..off + 12 + len]).unwrap();
                off += 12 + len;
            }
            prop_assert_eq!(out.unwrap().payload, w.buf.clone());
        }
    }
}
