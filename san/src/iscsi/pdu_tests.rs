//! Tests of PDU framing, digests, header accessors and the target PDU builders.

use super::*;
use proptest::prelude::*;

const DIGESTS: Framing = Framing {
    header_digest: true,
    data_digest: true,
    max_recv_data_segment: 8192,
};

fn header(op: u8, flags: u8, ahs_words: u8, data_len: u32) -> [u8; BHS_LEN] {
    let mut b = [0u8; BHS_LEN];
    b[0] = op;
    b[1] = flags;
    b[4] = ahs_words;
    put24(&mut b, 5, data_len);
    b
}

fn pdu(b: &[u8; BHS_LEN], ahs: &[u8], data: &[u8], f: &Framing) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b);
    out.extend_from_slice(ahs);
    if f.header_digest {
        out.extend_from_slice(&put_digest(crc32c(&[b, ahs])));
    }
    if !data.is_empty() {
        let pad = &[0u8; 3][..pad_len(data.len())];
        out.extend_from_slice(data);
        out.extend_from_slice(pad);
        if f.data_digest {
            out.extend_from_slice(&put_digest(crc32c(&[data, pad])));
        }
    }
    out
}

#[test]
fn crc32c_matches_rfc_test_vectors() {
    // RFC 7143 Appendix B.4, bytes as sent on the wire.
    assert_eq!(put_digest(crc32c(&[&[0u8; 32]])), [0xaa, 0x36, 0x91, 0x8a]);
    assert_eq!(
        put_digest(crc32c(&[&[0xffu8; 32]])),
        [0x43, 0xab, 0xa8, 0x62]
    );
    let inc: Vec<u8> = (0u8..32).collect();
    assert_eq!(put_digest(crc32c(&[&inc])), [0x4e, 0x79, 0xdd, 0x46]);
    let dec: Vec<u8> = (0u8..32).rev().collect();
    assert_eq!(put_digest(crc32c(&[&dec])), [0x5c, 0xdb, 0x3f, 0x11]);
    // Split over slices gives the same digest.
    assert_eq!(crc32c(&[&inc[..5], &inc[5..]]), crc32c(&[&inc]));
}

#[test]
fn padding_bytes() {
    assert_eq!(padding(5), &[0, 0, 0]);
    assert_eq!(padding(8), &[] as &[u8]);
    assert_eq!(padding(7).len(), 1);
}

#[test]
fn pad_lengths() {
    assert_eq!(
        [0, 1, 2, 3, 4, 5].map(pad_len),
        [0, 3, 2, 1, 0, 3],
        "padding to 4 bytes"
    );
}

#[test]
fn round_trip_without_and_with_digests() {
    for f in [Framing::LOGIN, DIGESTS] {
        for n in [0usize, 1, 3, 4, 5, 100, 8192] {
            let data: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let b = header(opcode::SCSI_CMD | 0x40, 0xa1, 0, n as u32);
            let mut bytes = pdu(&b, &[], &data, &f);
            assert_eq!(bytes.len(), f.wire_len(0, n));
            // Trailing bytes of the next PDU are not consumed.
            bytes.extend_from_slice(&[9, 9, 9]);
            let fr = frame(&bytes, &f).expect("valid").expect("complete");
            assert_eq!(fr.total_len, bytes.len() - 3);
            assert_eq!(&bytes[fr.data.clone()], &data[..]);
            assert_eq!(fr.bhs.opcode(), opcode::SCSI_CMD);
            assert!(fr.bhs.immediate());
            assert!(fr.bhs.final_bit());
            assert_eq!(fr.bhs.data_len() as usize, n);
            assert!(fr.ahs.is_empty());
        }
    }
}

#[test]
fn append_pdu_frames_back() {
    let b = header(opcode::TEXT_RESP, 0x80, 0, 5);
    let mut out = Vec::new();
    append_pdu(&mut out, &b, b"abcde", &DIGESTS);
    assert_eq!(out.len(), 48 + 4 + 8 + 4);
    let fr = frame(&out, &DIGESTS).expect("ok").expect("complete");
    assert_eq!(&out[fr.data], b"abcde");
    let mut out = Vec::new();
    append_pdu(&mut out, &header(opcode::NOP_IN, 0x80, 0, 0), &[], &DIGESTS);
    assert_eq!(out.len(), 52, "no data digest without data");
}

#[test]
fn every_prefix_is_incomplete() {
    for f in [Framing::LOGIN, DIGESTS] {
        let ahs = [0, 5, 2, 0, 0, 0, 0, 7];
        let b = header(opcode::SCSI_CMD, 0x80, 2, 13);
        let bytes = pdu(&b, &ahs, b"hello, world!", &f);
        for cut in 0..bytes.len() {
            assert_eq!(frame(&bytes[..cut], &f), Ok(None), "cut at {cut}");
        }
        let fr = frame(&bytes, &f).expect("ok").expect("complete");
        assert_eq!(fr.ahs, 48..56);
        assert_eq!(&bytes[fr.ahs], &ahs);
    }
}

#[test]
fn data_segment_longer_than_declared_is_refused_from_the_header() {
    let f = Framing {
        max_recv_data_segment: 4096,
        ..Framing::LOGIN
    };
    let b = header(opcode::DATA_OUT, 0x80, 0, 4097);
    assert_eq!(
        frame(&b, &f),
        Err(PduError::DataSegmentTooLong {
            len: 4097,
            max: 4096
        })
    );
    let b = header(opcode::DATA_OUT, 0x80, 0, 4096);
    assert_eq!(frame(&b, &f), Ok(None));
    // With a header digest the length is trusted only once the digest checked out.
    let f = Framing {
        header_digest: true,
        ..f
    };
    let b = header(opcode::DATA_OUT, 0x80, 0, 5000);
    assert_eq!(frame(&b, &f), Ok(None));
    let bytes = pdu(&b, &[], &[], &f);
    assert!(matches!(
        frame(&bytes, &f),
        Err(PduError::DataSegmentTooLong { len: 5000, .. })
    ));
}

#[test]
fn bad_ahs_is_refused() {
    let f = Framing::LOGIN;
    for (ahs, why) in [
        (&[0u8, 0, 1, 0][..], "zero AHSLength"),
        (
            &[0, 6, 1, 0, 0, 0, 0, 0][..],
            "AHSLength overruns TotalAHSLength",
        ),
        (&[0, 1, 1, 0, 0, 0][..], "truncated AHS header"),
    ] {
        let words = ahs.len().div_ceil(4) as u8;
        let mut area = ahs.to_vec();
        area.resize(usize::from(words) * 4, 0);
        let b = header(opcode::SCSI_CMD, 0x80, words, 0);
        let bytes = pdu(&b, &area, &[], &f);
        if ahs.len() % 4 == 0 {
            assert_eq!(frame(&bytes, &f), Err(PduError::BadAhs(why)));
        } else {
            // Padding to whole words turns a truncated entry into one running over the area.
            assert!(matches!(frame(&bytes, &f), Err(PduError::BadAhs(_))));
        }
    }
    // Two entries end to end are fine: extended CDB (len 17: reserved + 16 more CDB bytes
    // → 20 bytes) and bidirectional read length (len 5 → 8 bytes).
    let mut area = vec![0, 17, 1, 0];
    area.extend_from_slice(&[0; 16]);
    area.extend_from_slice(&[0, 5, 2, 0, 0, 0, 16, 0]);
    let b = header(opcode::SCSI_CMD, 0x80, 7, 0);
    let bytes = pdu(&b, &area, &[], &f);
    let fr = frame(&bytes, &f).expect("ok").expect("complete");
    assert_eq!(fr.ahs, 48..76);
    assert_eq!(fr.total_len, 76);
}

#[test]
fn header_digest_error_closes() {
    let b = header(opcode::NOP_OUT, 0x80, 0, 4);
    let mut bytes = pdu(&b, &[], b"ping", &DIGESTS);
    bytes[48] ^= 1;
    assert!(matches!(
        frame(&bytes, &DIGESTS),
        Err(PduError::HeaderDigest { .. })
    ));
    // A corrupted header with a correct-looking length: the digest is checked first.
    let mut bytes = pdu(&b, &[], b"ping", &DIGESTS);
    bytes[7] = 0xff;
    assert!(matches!(
        frame(&bytes[..52], &DIGESTS),
        Err(PduError::HeaderDigest { .. })
    ));
}

#[test]
fn data_digest_error_names_the_pdu_length() {
    let b = header(opcode::DATA_OUT, 0x80, 0, 6);
    let mut bytes = pdu(&b, &[], b"abcdef", &DIGESTS);
    let len = bytes.len();
    bytes[53] ^= 0x10;
    match frame(&bytes, &DIGESTS) {
        Err(PduError::DataDigest { total_len, bhs, .. }) => {
            assert_eq!(total_len, len);
            assert_eq!(bhs.opcode(), opcode::DATA_OUT);
        }
        other => panic!("expected a data digest error, got {other:?}"),
    }
    // Padding bytes are covered by the digest too.
    let mut bytes = pdu(&b, &[], b"abcdef", &DIGESTS);
    bytes[52 + 6] = 1;
    assert!(matches!(
        frame(&bytes, &DIGESTS),
        Err(PduError::DataDigest { .. })
    ));
}

#[test]
fn initiator_field_accessors() {
    let mut b = [0u8; BHS_LEN];
    b[0] = 0x41; // immediate SCSI command
    b[1] = 0x80 | 0x40 | 0x20 | 0x01;
    b[4] = 2;
    b[5..8].copy_from_slice(&[0x01, 0x02, 0x03]);
    b[8..16].copy_from_slice(&0x0001_0000_0000_0000u64.to_be_bytes());
    b[16..20].copy_from_slice(&0x1122_3344u32.to_be_bytes());
    b[20..24].copy_from_slice(&4096u32.to_be_bytes());
    b[24..28].copy_from_slice(&7u32.to_be_bytes());
    b[28..32].copy_from_slice(&9u32.to_be_bytes());
    b[32] = 0x28;
    b[47] = 0xee;
    let h = Bhs(b);
    assert_eq!(h.opcode(), opcode::SCSI_CMD);
    assert!(h.immediate() && h.final_bit() && h.read_bit() && h.write_bit());
    assert_eq!(h.task_attr(), 1);
    assert_eq!(h.ahs_len(), 8);
    assert_eq!(h.data_len(), 0x010203);
    assert_eq!(h.lun(), 0x0001_0000_0000_0000);
    assert_eq!(h.itt(), 0x1122_3344);
    assert_eq!(h.expected_data_len(), 4096);
    assert_eq!(h.cmdsn(), 7);
    assert_eq!(h.expstatsn(), 9);
    assert_eq!(h.cdb()[0], 0x28);
    assert_eq!(h.cdb()[15], 0xee);

    // Login request.
    let mut b = [0u8; BHS_LEN];
    b[0] = 0x43;
    b[1] = 0x80 | 0x40 | (1 << 2) | 3;
    b[2] = 0;
    b[3] = 0;
    b[8..14].copy_from_slice(&[0x80, 1, 2, 3, 4, 5]);
    b[14..16].copy_from_slice(&0x1234u16.to_be_bytes());
    b[20..22].copy_from_slice(&7u16.to_be_bytes());
    let h = Bhs(b);
    assert_eq!(h.opcode(), opcode::LOGIN_REQ);
    assert!(h.login_transit() && h.continue_bit());
    assert_eq!((h.login_csg(), h.login_nsg()), (1, 3));
    assert_eq!(h.isid(), [0x80, 1, 2, 3, 4, 5]);
    assert_eq!(h.tsih(), 0x1234);
    assert_eq!(h.cid(), 7);
    assert_eq!((h.version_max(), h.version_min()), (0, 0));

    // Data-Out, TMF, logout, SNACK.
    let mut b = [0u8; BHS_LEN];
    b[1] = 0x80 | 0x05;
    b[20..24].copy_from_slice(&0xabcdu32.to_be_bytes());
    b[32..36].copy_from_slice(&11u32.to_be_bytes());
    b[36..40].copy_from_slice(&3u32.to_be_bytes());
    b[40..44].copy_from_slice(&8192u32.to_be_bytes());
    b[44..48].copy_from_slice(&2u32.to_be_bytes());
    let h = Bhs(b);
    assert_eq!(h.ttt(), 0xabcd);
    assert_eq!(h.tmf_rtt(), 0xabcd);
    assert_eq!(h.tmf_function(), 5);
    assert_eq!(h.tmf_ref_cmdsn(), 11);
    assert_eq!(h.datasn(), 3);
    assert_eq!(h.tmf_exp_datasn(), 3);
    assert_eq!(h.buffer_offset(), 8192);
    assert_eq!(h.snack_begrun(), 8192);
    assert_eq!(h.snack_runlength(), 2);
    assert_eq!(h.snack_type(), 5);
    assert_eq!(h.logout_reason(), 5);
    assert!(Bhs::from_slice(&b[..47]).is_none());
    assert!(format!("{h:?}").contains("opcode"));
}

#[test]
fn scsi_response_layout() {
    let mut b = [0u8; BHS_LEN];
    ScsiResponse {
        response: 0,
        status: 0x02,
        residual: Residual::Under(512),
        bidi_residual: Residual::Over(3),
        itt: 0x10,
        stat_sn: 100,
        exp_cmd_sn: 5,
        max_cmd_sn: 36,
        exp_data_sn: 2,
        data_len: 20,
    }
    .write(&mut b);
    assert_eq!(b[0], opcode::SCSI_RESP);
    assert_eq!(b[1], 0x80 | 0x02 | 0x10);
    assert_eq!(b[3], 0x02);
    let h = Bhs(b);
    assert_eq!(h.data_len(), 20);
    assert_eq!(h.itt(), 0x10);
    assert_eq!(be32(&b, 24), 100);
    assert_eq!(be32(&b, 28), 5);
    assert_eq!(be32(&b, 32), 36);
    assert_eq!(be32(&b, 36), 2);
    assert_eq!(be32(&b, 40), 3);
    assert_eq!(be32(&b, 44), 512);
}

#[test]
fn data_in_layout() {
    let mut b = [0xffu8; BHS_LEN];
    DataIn {
        final_: true,
        status: Some(0),
        residual: Residual::Over(4),
        itt: 1,
        ttt: RESERVED_TAG,
        stat_sn: 9,
        exp_cmd_sn: 2,
        max_cmd_sn: 33,
        data_sn: 4,
        buffer_offset: 65536,
        data_len: 4096,
        ..DataIn::default()
    }
    .write(&mut b);
    assert_eq!(b[0], opcode::DATA_IN);
    assert_eq!(b[1], 0x80 | 0x04 | 0x01);
    assert_eq!(b[3], 0);
    assert_eq!(Bhs(b).data_len(), 4096);
    assert_eq!(be32(&b, 20), RESERVED_TAG);
    assert_eq!(be32(&b, 24), 9);
    assert_eq!(be32(&b, 36), 4);
    assert_eq!(be32(&b, 40), 65536);
    assert_eq!(be32(&b, 44), 4);
    // Without status: no S bit, StatSN and residual zero.
    DataIn {
        final_: false,
        stat_sn: 9,
        residual: Residual::Under(1),
        data_len: 8,
        ..DataIn::default()
    }
    .write(&mut b);
    assert_eq!(b[1], 0);
    assert_eq!(be32(&b, 24), 0);
    assert_eq!(be32(&b, 44), 0);
}

#[test]
fn other_builders_layout() {
    let mut b = [0u8; BHS_LEN];
    R2t {
        lun: 1 << 48,
        itt: 2,
        ttt: 3,
        stat_sn: 4,
        exp_cmd_sn: 5,
        max_cmd_sn: 6,
        r2t_sn: 7,
        buffer_offset: 8,
        desired_len: 9,
    }
    .write(&mut b);
    assert_eq!((b[0], b[1]), (opcode::R2T, 0x80));
    assert_eq!(Bhs(b).lun(), 1 << 48);
    assert_eq!(
        [16, 20, 24, 28, 32, 36, 40, 44].map(|o| be32(&b, o)),
        [2, 3, 4, 5, 6, 7, 8, 9]
    );

    NopIn {
        lun: 0,
        itt: 0x77,
        ttt: RESERVED_TAG,
        stat_sn: 1,
        exp_cmd_sn: 2,
        max_cmd_sn: 3,
        data_len: 4,
    }
    .write(&mut b);
    assert_eq!((b[0], b[1]), (opcode::NOP_IN, 0x80));
    assert_eq!(Bhs(b).data_len(), 4);
    assert_eq!([16, 20, 24].map(|o| be32(&b, o)), [0x77, RESERVED_TAG, 1]);

    TmResponse {
        response: 5,
        itt: 8,
        stat_sn: 1,
        exp_cmd_sn: 2,
        max_cmd_sn: 3,
    }
    .write(&mut b);
    assert_eq!((b[0], b[1], b[2]), (opcode::TMF_RESP, 0x80, 5));
    assert_eq!(be32(&b, 16), 8);

    LogoutResponse {
        response: 0,
        itt: 8,
        stat_sn: 1,
        exp_cmd_sn: 2,
        max_cmd_sn: 3,
        time2wait: 2,
        time2retain: 20,
    }
    .write(&mut b);
    assert_eq!((b[0], b[1]), (opcode::LOGOUT_RESP, 0x80));
    assert_eq!((be16(&b, 40), be16(&b, 42)), (2, 20));

    Reject {
        reason: reject::DATA_DIGEST,
        stat_sn: 1,
        exp_cmd_sn: 2,
        max_cmd_sn: 3,
        data_sn: 0,
        data_len: 48,
    }
    .write(&mut b);
    assert_eq!((b[0], b[1], b[2]), (opcode::REJECT, 0x80, 0x02));
    assert_eq!(be32(&b, 16), RESERVED_TAG);
    assert_eq!(Bhs(b).data_len(), 48);

    AsyncMessage {
        lun: 0,
        stat_sn: 1,
        exp_cmd_sn: 2,
        max_cmd_sn: 3,
        event: 1,
        vcode: 0,
        param1: 0,
        param2: 0,
        param3: 5,
        data_len: 0,
    }
    .write(&mut b);
    assert_eq!((b[0], b[36]), (opcode::ASYNC, 1));
    assert_eq!(be16(&b, 42), 5);

    TextResponse {
        final_: false,
        cont: true,
        itt: 4,
        ttt: 0x99,
        data_len: 300,
        ..TextResponse::default()
    }
    .write(&mut b);
    assert_eq!((b[0], b[1]), (opcode::TEXT_RESP, 0x40));
    assert_eq!(be32(&b, 20), 0x99);

    LoginResponse {
        transit: true,
        cont: false,
        csg: stage::OPERATIONAL,
        nsg: stage::FULL_FEATURE,
        version_max: 0,
        version_active: 0,
        isid: [1, 2, 3, 4, 5, 6],
        tsih: 0x42,
        itt: 1,
        stat_sn: 2,
        exp_cmd_sn: 3,
        max_cmd_sn: 4,
        status_class: 2,
        status_detail: 3,
        data_len: 10,
    }
    .write(&mut b);
    assert_eq!((b[0], b[1]), (opcode::LOGIN_RESP, 0x80 | (1 << 2) | 3));
    let h = Bhs(b);
    assert_eq!(h.isid(), [1, 2, 3, 4, 5, 6]);
    assert_eq!(h.tsih(), 0x42);
    assert_eq!((b[36], b[37]), (2, 3));
    assert_eq!(h.data_len(), 10);
}

#[test]
fn max_pdu_len_bounds_what_framing_waits_for() {
    let f = Framing {
        header_digest: true,
        data_digest: true,
        max_recv_data_segment: 513,
    };
    let b = header(opcode::DATA_OUT, 0x80, 255, 513);
    let mut area = Vec::new();
    for _ in 0..(AHS_MAX / 4) {
        area.extend_from_slice(&[0, 1, 9, 0]);
    }
    let bytes = pdu(&b, &area, &[7u8; 513], &f);
    assert_eq!(bytes.len(), f.max_pdu_len());
    let fr = frame(&bytes, &f).expect("ok").expect("complete");
    assert_eq!(fr.total_len, f.max_pdu_len());
}

proptest! {
    #[test]
    fn frame_never_panics_or_overreads(
        bytes in proptest::collection::vec(any::<u8>(), 0..2200),
        hd in any::<bool>(),
        dd in any::<bool>(),
        max in 0u32..2048,
    ) {
        let f = Framing { header_digest: hd, data_digest: dd, max_recv_data_segment: max };
        match frame(&bytes, &f) {
            Ok(Some(fr)) => {
                prop_assert!(fr.total_len <= bytes.len());
                prop_assert!(fr.data.end <= fr.total_len);
                prop_assert!(fr.ahs.end <= fr.data.start);
                prop_assert!(fr.total_len <= f.max_pdu_len());
                prop_assert_eq!(fr.total_len, f.wire_len(fr.ahs.len(), fr.data.len()));
            }
            Ok(None) => prop_assert!(bytes.len() < f.max_pdu_len()),
            Err(_) => {}
        }
    }

    #[test]
    fn framed_pdus_round_trip(
        data in proptest::collection::vec(any::<u8>(), 0..600),
        hd in any::<bool>(),
        dd in any::<bool>(),
        op in 0u8..0x40,
    ) {
        let f = Framing { header_digest: hd, data_digest: dd, max_recv_data_segment: 600 };
        let b = header(op, 0x80, 0, data.len() as u32);
        let bytes = pdu(&b, &[], &data, &f);
        let fr = frame(&bytes, &f).expect("ok").expect("complete");
        prop_assert_eq!(fr.total_len, bytes.len());
        prop_assert_eq!(&bytes[fr.data], &data[..]);
        for cut in [0, 1, 47, 48, bytes.len() - 1] {
            if cut < bytes.len() {
                prop_assert_eq!(frame(&bytes[..cut], &f), Ok(None));
            }
        }
    }
}
