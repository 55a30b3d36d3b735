//! Target `iscsi_pdu`: a received iSCSI byte stream through PDU framing
//! ([`san::iscsi::pdu::frame`]) under arbitrary framing settings (digests on or off, any
//! MaxRecvDataSegmentLength), every BHS accessor on each framed header, the text parser on
//! each data segment, and the target's PDU builders fed from the framed fields.
//!
//! Input: one byte of flags (bit 0 header digest, bit 1 data digest, bit 2 "fix digests":
//! the harness recomputes the digests of each PDU so framing gets past them), a u16
//! MaxRecvDataSegmentLength, then the stream.
//!
//! Oracles besides "no panic": a framed PDU lies within the bytes it was framed from, its
//! length is what [`Framing::wire_len`] says, and re-encoding it (no AHS, zero padding)
//! gives back the same bytes; "incomplete" is only said of fewer bytes than
//! [`Framing::max_pdu_len`]; a data digest error names a length inside the stream; every
//! builder's header frames back with the opcode, tag and length it was given.

use san::iscsi::pdu::{
    self, frame, opcode, AsyncMessage, Bhs, DataIn, Framing, LoginResponse, LogoutResponse, NopIn,
    PduError, R2t, Reject, Residual, ScsiResponse, TextResponse, TmResponse, BHS_LEN, DIGEST_LEN,
};
use san::iscsi::text;

use crate::input::{Enc, Input};

/// PDUs framed per input at most (keeps one run short).
const PDUS_MAX: usize = 256;

fn touch(b: &Bhs) -> u64 {
    // Every accessor: none may panic on any header.
    let mut acc = u64::from(b.opcode())
        ^ u64::from(b.immediate())
        ^ u64::from(b.flags())
        ^ u64::from(b.final_bit())
        ^ b.ahs_len() as u64
        ^ u64::from(b.data_len())
        ^ b.lun()
        ^ u64::from(b.itt())
        ^ u64::from(b.ttt())
        ^ u64::from(b.cmdsn())
        ^ u64::from(b.expstatsn());
    acc ^= u64::from(b.read_bit()) ^ u64::from(b.write_bit()) ^ u64::from(b.task_attr());
    acc ^= u64::from(b.expected_data_len()) ^ u64::from(b.cdb()[15]);
    acc ^= u64::from(b.datasn()) ^ u64::from(b.buffer_offset());
    acc ^= u64::from(b.tmf_function())
        ^ u64::from(b.tmf_rtt())
        ^ u64::from(b.tmf_ref_cmdsn())
        ^ u64::from(b.tmf_exp_datasn());
    acc ^= u64::from(b.login_transit())
        ^ u64::from(b.continue_bit())
        ^ u64::from(b.login_csg())
        ^ u64::from(b.login_nsg())
        ^ u64::from(b.version_max())
        ^ u64::from(b.version_min())
        ^ u64::from(b.isid()[5])
        ^ u64::from(b.tsih())
        ^ u64::from(b.cid());
    acc ^= u64::from(b.logout_reason())
        ^ u64::from(b.snack_type())
        ^ u64::from(b.snack_begrun())
        ^ u64::from(b.snack_runlength());
    acc
}

/// Builds every target PDU from a received header's fields and checks each frames back.
fn builders(b: &Bhs) {
    let len = b.data_len() & 0xffff;
    let f = Framing {
        header_digest: b.flags() & 1 != 0,
        data_digest: false,
        max_recv_data_segment: 0x1_0000,
    };
    let residual = match b.flags() & 3 {
        0 => Residual::None,
        1 => Residual::Under(b.cmdsn()),
        _ => Residual::Over(b.cmdsn()),
    };
    let mut h = [0u8; BHS_LEN];
    let check = |h: &[u8; BHS_LEN], op: u8, data_len: u32| {
        let mut out = Vec::new();
        let data = vec![0u8; data_len as usize];
        pdu::append_pdu(&mut out, h, &data, &f);
        let fr = frame(&out, &f)
            .unwrap_or_else(|e| panic!("built {op:#x} does not frame: {e}"))
            .unwrap_or_else(|| panic!("built {op:#x} incomplete"));
        assert_eq!(fr.total_len, out.len());
        assert_eq!(fr.bhs.opcode(), op);
        assert_eq!(fr.bhs.data_len(), data_len);
    };
    ScsiResponse {
        response: b.0[2],
        status: b.0[3],
        residual,
        bidi_residual: residual,
        itt: b.itt(),
        data_len: len,
        ..ScsiResponse::default()
    }
    .write(&mut h);
    check(&h, opcode::SCSI_RESP, len);
    assert_eq!(Bhs(h).itt(), b.itt());
    DataIn {
        final_: b.final_bit(),
        ack: b.immediate(),
        status: b.read_bit().then_some(b.0[3]),
        residual,
        itt: b.itt(),
        data_len: len,
        ..DataIn::default()
    }
    .write(&mut h);
    check(&h, opcode::DATA_IN, len);
    R2t {
        itt: b.itt(),
        desired_len: b.expected_data_len(),
        ..R2t::default()
    }
    .write(&mut h);
    check(&h, opcode::R2T, 0);
    NopIn {
        itt: b.itt(),
        data_len: len,
        ..NopIn::default()
    }
    .write(&mut h);
    check(&h, opcode::NOP_IN, len);
    TmResponse {
        response: b.0[2],
        itt: b.itt(),
        ..TmResponse::default()
    }
    .write(&mut h);
    check(&h, opcode::TMF_RESP, 0);
    LogoutResponse {
        itt: b.itt(),
        ..LogoutResponse::default()
    }
    .write(&mut h);
    check(&h, opcode::LOGOUT_RESP, 0);
    Reject {
        reason: b.0[2],
        data_len: BHS_LEN as u32,
        ..Reject::default()
    }
    .write(&mut h);
    check(&h, opcode::REJECT, BHS_LEN as u32);
    AsyncMessage {
        event: b.0[2],
        data_len: len,
        ..AsyncMessage::default()
    }
    .write(&mut h);
    check(&h, opcode::ASYNC, len);
    TextResponse {
        final_: b.final_bit(),
        cont: b.continue_bit(),
        itt: b.itt(),
        ttt: b.ttt(),
        data_len: len,
        ..TextResponse::default()
    }
    .write(&mut h);
    check(&h, opcode::TEXT_RESP, len);
    LoginResponse {
        transit: b.login_transit(),
        cont: b.continue_bit(),
        csg: b.login_csg(),
        nsg: b.login_nsg(),
        isid: b.isid(),
        tsih: b.tsih(),
        itt: b.itt(),
        status_class: b.0[36],
        status_detail: b.0[37],
        data_len: len,
        ..LoginResponse::default()
    }
    .write(&mut h);
    check(&h, opcode::LOGIN_RESP, len);
    let back = Bhs(h);
    assert_eq!((back.isid(), back.tsih()), (b.isid(), b.tsih()));
}

/// Recomputes the digests of the PDU at the start of `buf` in place (as far as its bytes
/// reach), so framing gets past them to the checks behind.
fn fix_digests(buf: &mut [u8], f: &Framing) {
    let Some(b) = Bhs::from_slice(buf) else {
        return;
    };
    let hd_at = BHS_LEN + b.ahs_len();
    if f.header_digest && buf.len() >= hd_at + DIGEST_LEN {
        let d = pdu::put_digest(pdu::crc32c(&[&buf[..hd_at]]));
        buf[hd_at..hd_at + DIGEST_LEN].copy_from_slice(&d);
    }
    let data_at = hd_at + if f.header_digest { DIGEST_LEN } else { 0 };
    let n = b.data_len() as usize;
    let padded = data_at + n + pdu::pad_len(n);
    if f.data_digest && n > 0 && buf.len() >= padded + DIGEST_LEN {
        let d = pdu::put_digest(pdu::crc32c(&[&buf[data_at..padded]]));
        buf[padded..padded + DIGEST_LEN].copy_from_slice(&d);
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.u8();
    let f = Framing {
        header_digest: flags & 1 != 0,
        data_digest: flags & 2 != 0,
        max_recv_data_segment: u32::from(input.u16()),
    };
    let fix = flags & 4 != 0;
    let mut stream = input.rest().to_vec();
    let mut at = 0;
    let mut sink = 0u64;
    for _ in 0..PDUS_MAX {
        let rest = &mut stream[at..];
        if fix {
            fix_digests(rest, &f);
        }
        match frame(rest, &f) {
            Ok(Some(fr)) => {
                assert!(fr.total_len <= rest.len(), "frame past the buffer");
                assert!(fr.ahs.start == BHS_LEN && fr.ahs.end <= fr.data.start);
                assert!(fr.data.end <= fr.total_len);
                assert_eq!(fr.total_len, f.wire_len(fr.ahs.len(), fr.data.len()));
                assert!(fr.total_len <= f.max_pdu_len());
                assert_eq!(fr.bhs.as_bytes()[..], rest[..BHS_LEN]);
                let seg = &rest[fr.data.clone()];
                let pad_zero = rest[fr.data.end..fr.data.end + pdu::pad_len(seg.len())]
                    .iter()
                    .all(|&b| b == 0);
                if fr.ahs.is_empty() && pad_zero {
                    let mut again = Vec::new();
                    pdu::append_pdu(&mut again, fr.bhs.as_bytes(), seg, &f);
                    assert!(again[..] == rest[..fr.total_len], "re-encoding differs");
                }
                if let Ok(pairs) = text::parse(seg) {
                    for (_, v) in pairs.iter() {
                        let _ = text::decode_binary(v);
                    }
                }
                sink ^= touch(&fr.bhs);
                builders(&fr.bhs);
                at += fr.total_len;
            }
            Ok(None) => {
                assert!(
                    rest.len() < f.max_pdu_len(),
                    "incomplete with a whole PDU's bytes"
                );
                break;
            }
            Err(PduError::DataDigest { total_len, bhs, .. }) => {
                assert!(total_len <= rest.len() && total_len >= BHS_LEN);
                assert_eq!(bhs.as_bytes()[..], rest[..BHS_LEN]);
                at += total_len;
            }
            Err(_) => break,
        }
    }
    std::hint::black_box(sink);
}

fn header(op: u8, flags: u8, ahs_words: u8, data_len: u32, itt: u32) -> [u8; BHS_LEN] {
    let mut b = [0u8; BHS_LEN];
    b[0] = op;
    b[1] = flags;
    b[4] = ahs_words;
    b[5..8].copy_from_slice(&data_len.to_be_bytes()[1..]);
    b[16..20].copy_from_slice(&itt.to_be_bytes());
    b
}

/// The seed corpus.
pub fn seeds() -> Vec<Vec<u8>> {
    let plain = Framing {
        header_digest: false,
        data_digest: false,
        max_recv_data_segment: 8192,
    };
    let digests = Framing {
        header_digest: true,
        data_digest: true,
        ..plain
    };
    let mut out = Vec::new();
    for (flags, f) in [(0u8, plain), (3, digests)] {
        let mut e = Enc::new();
        e.u8(flags).u16(8192);
        let mut s = Vec::new();
        let mut cmd = header(0x41, 0xa1, 0, 5, 1);
        cmd[32] = 0x2a;
        pdu::append_pdu(&mut s, &cmd, b"hello", &f);
        pdu::append_pdu(&mut s, &header(0x05, 0x80, 0, 512, 1), &[0xaa; 512], &f);
        pdu::append_pdu(&mut s, &header(0x00, 0x80, 0, 0, 2), &[], &f);
        pdu::append_pdu(
            &mut s,
            &header(0x04, 0x80, 0, 16, 3),
            b"SendTargets=All\0",
            &f,
        );
        pdu::append_pdu(&mut s, &header(0x06, 0x80, 0, 0, 4), &[], &f);
        out.push(e.bytes(&s).finish());
    }
    // AHS (extended CDB) without digests, then a truncated PDU.
    let mut e = Enc::new();
    e.u8(0).u16(4096);
    let mut s = header(0x01, 0x80, 5, 0, 9).to_vec();
    s.extend_from_slice(&[0, 17, 1, 0]);
    s.extend_from_slice(&[0x7f; 16]);
    s.extend_from_slice(&header(0x05, 0x00, 0, 100, 9)[..]);
    s.extend_from_slice(&[1; 40]);
    out.push(e.bytes(&s).finish());
    // Digests the harness fixes up, with a login request's text.
    let mut e = Enc::new();
    e.u8(7).u16(8192);
    let mut s = Vec::new();
    pdu::append_pdu(
        &mut s,
        &header(0x43, 0x87, 0, 31, 1),
        b"InitiatorName=iqn.x:y\0CHAP_C=0x",
        &Framing::LOGIN,
    );
    s.extend_from_slice(&[0; 8]);
    out.push(e.bytes(&s).finish());
    out
}
