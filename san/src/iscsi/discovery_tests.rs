//! Tests of the discovery session: SendTargets (visibility, portals, long answers in
//! pieces), continued requests, NOP, logout, and rejects.

use super::*;
use crate::iscsi::login::SessionKind;
use crate::iscsi::pdu::frame;
use crate::target::Portal;

const INI: &str = "iqn.2026-01.test:ini";

fn registry(targets: usize) -> Arc<Registry> {
    let r = Registry::new();
    for i in 0..targets {
        r.add_target(&format!("iqn.2026-01.test:t{i:03}"), vec![], None, vec![])
            .expect("add");
    }
    r.add_target(
        "iqn.2026-01.test:hidden",
        vec![],
        None,
        vec!["iqn.2026-01.test:someone-else".into()],
    )
    .expect("add");
    for (addr, tpgt) in [
        ("10.0.0.1:3260", 1),
        ("[fd00::1]:3260", 2),
        ("0.0.0.0:3260", 3),
    ] {
        r.add_portal(Portal {
            addr: addr.parse().expect("addr"),
            tpgt,
        });
    }
    Arc::new(r)
}

fn session(reg: &Arc<Registry>, params: SessionParams) -> Discovery {
    let est = Established {
        kind: SessionKind::Discovery,
        initiator_name: Arc::from(INI),
        isid: [0x80, 0, 0, 0, 0, 1],
        tsih: 5,
        cid: 1,
        target: None,
        params,
        exp_cmd_sn: 20,
        stat_sn: 50,
        tpgt: 1,
    };
    Discovery::new(&est, reg.clone())
}

struct Pdu {
    op: u8,
    flags: u8,
    immediate: bool,
    itt: u32,
    ttt: u32,
    cmdsn: u32,
    data: Vec<u8>,
}

impl Default for Pdu {
    fn default() -> Self {
        Pdu {
            op: opcode::TEXT_REQ,
            flags: 0x80,
            immediate: false,
            itt: 7,
            ttt: RESERVED_TAG,
            cmdsn: 20,
            data: Vec::new(),
        }
    }
}

impl Pdu {
    /// A Text Request carrying `pairs` (`;`-separated), the other fields the defaults.
    fn text(pairs: &str) -> Pdu {
        Pdu {
            data: text(pairs),
            ..Pdu::default()
        }
    }
}

fn wire(p: &Pdu, f: &Framing) -> Vec<u8> {
    let mut b = [0u8; BHS_LEN];
    b[0] = p.op | if p.immediate { 0x40 } else { 0 };
    b[1] = p.flags;
    b[5..8].copy_from_slice(&(p.data.len() as u32).to_be_bytes()[1..]);
    b[8..16].copy_from_slice(&3u64.to_be_bytes());
    b[16..20].copy_from_slice(&p.itt.to_be_bytes());
    b[20..24].copy_from_slice(&p.ttt.to_be_bytes());
    b[24..28].copy_from_slice(&p.cmdsn.to_be_bytes());
    let mut out = Vec::new();
    pdu::append_pdu(&mut out, &b, &p.data, f);
    out
}

/// Sends one PDU; returns the step and the response PDUs (header, data).
fn send(d: &mut Discovery, p: &Pdu) -> (DiscoveryStep, Vec<(Bhs, Vec<u8>)>) {
    let f = d.framing();
    let bytes = wire(p, &f);
    let fr = frame(&bytes, &f).expect("valid").expect("complete");
    let mut out = Vec::new();
    let step = d.on_pdu(&fr, &bytes, &mut out);
    let mut pdus = Vec::new();
    let mut rest = &out[..];
    while !rest.is_empty() {
        let fr = frame(rest, &f)
            .expect("valid response")
            .expect("whole response");
        pdus.push((fr.bhs, rest[fr.data.clone()].to_vec()));
        rest = &rest[fr.total_len..];
    }
    (step, pdus)
}

fn text(pairs: &str) -> Vec<u8> {
    pairs.replace(';', "\0").into_bytes()
}

fn u32_at(b: &Bhs, at: usize) -> u32 {
    u32::from_be_bytes(b.0[at..at + 4].try_into().expect("4"))
}

#[test]
fn send_targets_all_lists_visible_targets_and_usable_portals() {
    let reg = registry(2);
    let mut d = session(&reg, SessionParams::default());
    let (step, pdus) = send(&mut d, &Pdu::text("SendTargets=All;"));
    assert_eq!(step, DiscoveryStep::Continue);
    assert_eq!(pdus.len(), 1);
    let (h, data) = &pdus[0];
    assert_eq!(h.opcode(), opcode::TEXT_RESP);
    assert!(h.final_bit() && !h.continue_bit());
    assert_eq!(h.itt(), 7);
    assert_eq!(h.ttt(), RESERVED_TAG);
    assert_eq!(h.lun(), 3);
    assert_eq!(u32_at(h, 24), 50, "StatSN");
    assert_eq!(u32_at(h, 28), 21, "ExpCmdSN advanced");
    assert_eq!(u32_at(h, 32), 21 + DISCOVERY_CMD_WINDOW - 1, "MaxCmdSN");
    assert_eq!(
        std::str::from_utf8(data).expect("utf8"),
        "TargetName=iqn.2026-01.test:t000\0TargetAddress=10.0.0.1:3260,1\0\
         TargetAddress=[fd00::1]:3260,2\0\
         TargetName=iqn.2026-01.test:t001\0TargetAddress=10.0.0.1:3260,1\0\
         TargetAddress=[fd00::1]:3260,2\0"
    );
}

#[test]
fn send_targets_by_name_and_unknown_keys() {
    let reg = registry(2);
    let mut d = session(&reg, SessionParams::default());
    let (_, pdus) = send(
        &mut d,
        &Pdu::text("SendTargets=iqn.2026-01.test:T001;X-foo=1;"),
    );
    let body = String::from_utf8(pdus[0].1.clone()).expect("utf8");
    assert!(body.starts_with("TargetName=iqn.2026-01.test:t001\0"));
    assert!(!body.contains("t000"));
    assert!(body.ends_with("X-foo=NotUnderstood\0"));
    for name in ["iqn.2026-01.test:hidden", "iqn.2026-01.test:none", ""] {
        let (_, pdus) = send(
            &mut d,
            &Pdu {
                cmdsn: 21,
                data: format!("SendTargets={name}\0").into_bytes(),
                ..Pdu::default()
            },
        );
        assert!(pdus[0].1.is_empty(), "{name}: nothing visible");
        assert!(pdus[0].0.final_bit());
    }
}

#[test]
fn long_answers_continue_with_a_target_transfer_tag() {
    let reg = registry(40);
    let params = SessionParams {
        max_send_data_segment: 512,
        ..SessionParams::default()
    };
    let mut d = session(&reg, params);
    let (_, mut pdus) = send(&mut d, &Pdu::text("SendTargets=All;"));
    let mut whole = Vec::new();
    let mut rounds = 0;
    let mut cmdsn = 21;
    loop {
        let (h, data) = pdus.remove(0);
        assert!(data.len() <= 512);
        whole.extend_from_slice(&data);
        if h.final_bit() {
            assert!(!h.continue_bit());
            assert_eq!(h.ttt(), RESERVED_TAG);
            break;
        }
        assert!(h.continue_bit());
        assert_ne!(h.ttt(), RESERVED_TAG);
        rounds += 1;
        assert!(rounds < 100);
        let (_, next) = send(
            &mut d,
            &Pdu {
                ttt: h.ttt(),
                cmdsn,
                ..Pdu::default()
            },
        );
        cmdsn += 1;
        pdus = next;
    }
    assert!(rounds >= 2);
    // Pieces split anywhere; joined they are the whole answer (repeated keys are fine in
    // a SendTargets answer, so count entries by hand).
    let entries: Vec<&[u8]> = whole.split(|&b| b == 0).filter(|e| !e.is_empty()).collect();
    assert_eq!(entries.len(), 40 * 3);
    assert_eq!(
        entries
            .iter()
            .filter(|e| e.starts_with(b"TargetName=iqn.2026-01.test:t"))
            .count(),
        40
    );
    assert_eq!(whole.last(), Some(&0));
    // The finished exchange cannot be continued.
    let (_, pdus) = send(
        &mut d,
        &Pdu {
            ttt: 1,
            cmdsn,
            ..Pdu::default()
        },
    );
    assert_eq!(pdus[0].0.opcode(), opcode::REJECT);
    assert_eq!(pdus[0].0 .0[2], reject::INVALID_PDU_FIELD);
    assert!(matches!(d.last_error(), Some(DiscoveryError::Ttt(1))));
}

#[test]
fn request_text_continued_over_pdus() {
    let reg = registry(1);
    let mut d = session(&reg, SessionParams::default());
    let (_, pdus) = send(
        &mut d,
        &Pdu {
            flags: 0x40,
            data: b"SendTar".to_vec(),
            ..Pdu::default()
        },
    );
    let (h, data) = &pdus[0];
    assert!(data.is_empty() && !h.final_bit());
    assert_ne!(h.ttt(), RESERVED_TAG);
    let (_, pdus) = send(
        &mut d,
        &Pdu {
            ttt: h.ttt(),
            cmdsn: 21,
            data: text("gets=All;"),
            ..Pdu::default()
        },
    );
    assert!(pdus[0].0.final_bit());
    assert!(pdus[0].1.starts_with(b"TargetName=iqn.2026-01.test:t000\0"));
    // F and C together are refused.
    let (_, pdus) = send(
        &mut d,
        &Pdu {
            flags: 0xc0,
            cmdsn: 22,
            ..Pdu::default()
        },
    );
    assert_eq!(pdus[0].0.opcode(), opcode::REJECT);
    // Malformed text is refused.
    let (_, pdus) = send(
        &mut d,
        &Pdu {
            cmdsn: 23,
            data: b"nokey\0".to_vec(),
            ..Pdu::default()
        },
    );
    assert_eq!(pdus[0].0.opcode(), opcode::REJECT);
}

#[test]
fn nop_out_is_echoed() {
    let reg = registry(0);
    let mut d = session(&reg, SessionParams::default());
    let (step, pdus) = send(
        &mut d,
        &Pdu {
            op: opcode::NOP_OUT,
            immediate: true,
            itt: 9,
            data: b"ping!".to_vec(),
            ..Pdu::default()
        },
    );
    assert_eq!(step, DiscoveryStep::Continue);
    let (h, data) = &pdus[0];
    assert_eq!(h.opcode(), opcode::NOP_IN);
    assert_eq!((h.itt(), h.ttt()), (9, RESERVED_TAG));
    assert_eq!(data, b"ping!");
    assert_eq!(u32_at(h, 28), 20, "immediate: ExpCmdSN not advanced");
    // ITT 0xffffffff: nothing to answer.
    let (_, pdus) = send(
        &mut d,
        &Pdu {
            op: opcode::NOP_OUT,
            immediate: true,
            itt: RESERVED_TAG,
            ..Pdu::default()
        },
    );
    assert!(pdus.is_empty());
}

#[test]
fn logout_closes() {
    let reg = registry(0);
    let mut d = session(&reg, SessionParams::default());
    // Another connection's CID: not found, the session goes on.
    let mut p = Pdu {
        op: opcode::LOGOUT_REQ,
        flags: 0x81,
        ..Pdu::default()
    };
    let (step, pdus) = send(&mut d, &p);
    assert_eq!(step, DiscoveryStep::Continue);
    assert_eq!(pdus[0].0 .0[2], 1);
    p.flags = 0x82;
    p.cmdsn = 21;
    let (step, pdus) = send(&mut d, &p);
    assert_eq!(step, DiscoveryStep::Continue);
    assert_eq!(pdus[0].0 .0[2], 2, "recovery not supported");
    p.flags = 0x80;
    p.cmdsn = 22;
    let (step, pdus) = send(&mut d, &p);
    assert_eq!(step, DiscoveryStep::Close);
    let (h, _) = &pdus[0];
    assert_eq!(h.opcode(), opcode::LOGOUT_RESP);
    assert_eq!(h.0[2], 0);
    assert_eq!(u32_at(h, 24), 52, "StatSN advanced by each response");
}

#[test]
fn other_pdus_are_rejected_with_their_header() {
    let reg = registry(0);
    let mut d = session(&reg, SessionParams::default());
    for op in [
        opcode::SCSI_CMD,
        opcode::TMF_REQ,
        opcode::DATA_OUT,
        opcode::SNACK,
        opcode::LOGIN_REQ,
        0x1f,
    ] {
        let p = Pdu {
            op,
            ..Pdu::default()
        };
        let (step, pdus) = send(&mut d, &p);
        assert_eq!(step, DiscoveryStep::Continue);
        let (h, data) = &pdus[0];
        assert_eq!(h.opcode(), opcode::REJECT);
        assert_eq!(h.0[2], reject::PROTOCOL_ERROR);
        assert_eq!(data.len(), BHS_LEN);
        assert_eq!(data[0] & 0x3f, op);
    }
}

#[test]
fn responses_carry_the_negotiated_digests() {
    let reg = registry(1);
    let params = SessionParams {
        header_digest: true,
        data_digest: true,
        ..SessionParams::default()
    };
    let mut d = session(&reg, params);
    assert!(d.framing().header_digest && d.framing().data_digest);
    // `send` frames the responses with digests checked.
    let (_, pdus) = send(&mut d, &Pdu::text("SendTargets=All;"));
    assert!(!pdus[0].1.is_empty());
    // A data digest error reported by the caller.
    let mut out = Vec::new();
    d.reject(&pdus[0].0, reject::DATA_DIGEST, &mut out);
    let fr = frame(&out, &d.framing()).expect("ok").expect("complete");
    assert_eq!(fr.bhs.0[2], reject::DATA_DIGEST);
}

#[test]
fn a_frame_outside_its_buffer_closes() {
    let reg = registry(0);
    let mut d = session(&reg, SessionParams::default());
    let bytes = wire(&Pdu::text("SendTargets=All;"), &d.framing());
    let fr = frame(&bytes, &d.framing()).expect("ok").expect("complete");
    let mut out = Vec::new();
    assert_eq!(d.on_pdu(&fr, &bytes[..50], &mut out), DiscoveryStep::Close);
    assert!(out.is_empty());
}

#[test]
fn invalid_send_targets_requests_fail_for_the_initiator() {
    // What libiscsi's iSCSI.iSCSISendTargets.Invalid sends: each answer must be something
    // an initiator treats as an error (neither TargetName nor TargetAddress).
    let reg = registry(1);
    let mut d = session(&reg, SessionParams::default());
    for (i, (req, want)) in [
        ("SendTargetsPlease=All", "SendTargetsPlease=NotUnderstood\0"),
        ("SendTargets=Alle", "SendTargets=Reject\0"),
        ("SendTargets=A", "SendTargets=Reject\0"),
        ("sENDtARGETS=aLL", "sENDtARGETS=NotUnderstood\0"),
    ]
    .into_iter()
    .enumerate()
    {
        let (_, pdus) = send(
            &mut d,
            &Pdu {
                immediate: true,
                cmdsn: 20 + i as u32,
                data: format!("{req}\0").into_bytes(),
                ..Pdu::default()
            },
        );
        assert_eq!(pdus[0].0.opcode(), opcode::TEXT_RESP);
        assert_eq!(std::str::from_utf8(&pdus[0].1).expect("utf8"), want);
    }
}

#[test]
fn normal_sessions_see_only_their_own_target() {
    let reg = registry(3);
    let own = reg.target("iqn.2026-01.test:t001").expect("target");
    let mut x = TextExchange::new();
    let req = |data: &str| {
        let p = Pdu {
            data: data.replace(';', "\0").into_bytes(),
            ..Pdu::default()
        };
        let bytes = wire(&p, &Framing::LOGIN);
        (Bhs::from_slice(&bytes).expect("bhs"), p.data)
    };
    for (ask, listed) in [
        ("SendTargets=All;", true),
        ("SendTargets=;", true),
        ("SendTargets=iqn.2026-01.test:t001;", true),
        ("SendTargets=iqn.2026-01.test:t000;", false),
    ] {
        let (bhs, data) = req(ask);
        let reply = x
            .on_request(&bhs, &data, &reg, INI, Some(&own), 8192)
            .expect("answer");
        assert!(reply.final_ && !reply.cont && reply.ttt == RESERVED_TAG);
        let body = String::from_utf8(reply.data).expect("utf8");
        assert_eq!(
            body.contains("TargetName=iqn.2026-01.test:t001\0"),
            listed,
            "{ask}"
        );
        assert!(
            !body.contains("t000") && !body.contains("t002"),
            "{ask}: {body}"
        );
        let h = reply_header(&bhs);
        assert_eq!(h.itt(), 7);
    }
}

fn reply_header(req: &Bhs) -> Bhs {
    let reply = TextReply {
        final_: true,
        cont: false,
        ttt: RESERVED_TAG,
        data: vec![1, 2, 3],
    };
    let mut b = [0u8; BHS_LEN];
    reply.response(req, 4, 5, 6).write(&mut b);
    let h = Bhs(b);
    assert_eq!(h.opcode(), opcode::TEXT_RESP);
    assert_eq!(h.data_len(), 3);
    assert_eq!(u32_at(&h, 24), 4);
    h
}

#[test]
fn a_wildcard_portal_is_named_by_the_connection_address() {
    let reg = registry(1);
    let local: std::net::SocketAddr = "198.51.100.7:3260".parse().expect("addr");
    let mut d = session(&reg, SessionParams::default()).with_local_address(local);
    let (_, pdus) = send(&mut d, &Pdu::text("SendTargets=All;"));
    let body = String::from_utf8(pdus[0].1.clone()).expect("utf8");
    assert!(
        body.contains("TargetAddress=198.51.100.7:3260,3\0"),
        "{body}"
    );
    assert!(!body.contains("0.0.0.0"));
    // Another port: that listener is not the one the connection came in on.
    let other: std::net::SocketAddr = "198.51.100.7:3261".parse().expect("addr");
    let mut d = session(&reg, SessionParams::default()).with_local_address(other);
    let (_, pdus) = send(&mut d, &Pdu::text("SendTargets=All;"));
    let body = String::from_utf8(pdus[0].1.clone()).expect("utf8");
    assert!(!body.contains(",3\0"), "{body}");
}
