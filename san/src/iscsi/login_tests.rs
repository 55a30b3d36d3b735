//! Tests of the login state machine: every path to full-feature phase and every failure.

use std::collections::HashMap;
use std::sync::atomic::AtomicU16;

use super::*;
use crate::iscsi::pdu::frame;
use crate::target::Chap;

const INI: &str = "iqn.2026-01.test:ini";
const OPEN: &str = "iqn.2026-01.test:open";
const CHAP_T: &str = "iqn.2026-01.test:chap";
const MUTUAL: &str = "iqn.2026-01.test:mutual";
const PRIVATE: &str = "iqn.2026-01.test:private";
const SECRET: &[u8] = b"initiator-secret-16";
const MSECRET: &[u8] = b"target-secret-0016";

fn config(offer: LoginOffer) -> Arc<LoginConfig> {
    let reg = Registry::new();
    reg.add_target(OPEN, vec![], None, vec![]).expect("add");
    let chap = Chap {
        user: "alice".into(),
        secret: SECRET.to_vec(),
        mutual: None,
    };
    reg.add_target(CHAP_T, vec![], Some(chap.clone()), vec![])
        .expect("add");
    let mutual = Chap {
        mutual: Some(("target-name".into(), MSECRET.to_vec())),
        ..chap
    };
    reg.add_target(MUTUAL, vec![], Some(mutual), vec![])
        .expect("add");
    reg.add_target(PRIVATE, vec![], None, vec!["iqn.2026-01.test:other".into()])
        .expect("add");
    Arc::new(LoginConfig {
        registry: Arc::new(reg),
        portal: Portal {
            addr: "127.0.0.1:3260".parse().expect("addr"),
            tpgt: 7,
        },
        tsih: Arc::new(AtomicU16::new(1)),
        offer,
    })
}

struct Req {
    csg: u8,
    nsg: u8,
    transit: bool,
    cont: bool,
    tsih: u16,
    vmin: u8,
    op: u8,
    cmdsn: u32,
}

impl Default for Req {
    fn default() -> Self {
        Req {
            csg: 0,
            nsg: 1,
            transit: true,
            cont: false,
            tsih: 0,
            vmin: 0,
            op: opcode::LOGIN_REQ,
            cmdsn: 10,
        }
    }
}

impl Req {
    /// The operational stage, moving to full feature phase.
    fn operational() -> Self {
        Req {
            csg: 1,
            nsg: 3,
            ..Req::default()
        }
    }
    /// The security stage, not moving on.
    fn staying() -> Self {
        Req {
            transit: false,
            ..Req::default()
        }
    }
}

fn bhs(r: &Req, data_len: usize) -> Bhs {
    let mut b = [0u8; BHS_LEN];
    b[0] = 0x40 | r.op;
    b[1] =
        (if r.transit { 0x80 } else { 0 }) | (if r.cont { 0x40 } else { 0 }) | (r.csg << 2) | r.nsg;
    b[3] = r.vmin;
    b[5..8].copy_from_slice(&(data_len as u32).to_be_bytes()[1..]);
    b[8..14].copy_from_slice(&[0x80, 0, 0x12, 0x34, 0, 1]);
    b[14..16].copy_from_slice(&r.tsih.to_be_bytes());
    b[16..20].copy_from_slice(&0x55u32.to_be_bytes());
    b[20..22].copy_from_slice(&3u16.to_be_bytes());
    b[24..28].copy_from_slice(&r.cmdsn.to_be_bytes());
    b[28..32].copy_from_slice(&100u32.to_be_bytes());
    Bhs(b)
}

fn kv(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut t = TextBuilder::new();
    for (k, v) in pairs {
        t.push(k, v);
    }
    t.into_bytes()
}

/// A decoded Login Response.
struct Resp {
    bhs: Bhs,
    keys: HashMap<String, String>,
    order: Vec<String>,
}

impl Resp {
    fn status(&self) -> u16 {
        u16::from_be_bytes([self.bhs.0[36], self.bhs.0[37]])
    }
    fn get(&self, k: &str) -> Option<&str> {
        self.keys.get(k).map(|s| s.as_str())
    }
    fn stat_sn(&self) -> u32 {
        self.bhs.cmdsn()
    }
}

fn send(l: &mut Login, r: &Req, pairs: &[(&str, &str)]) -> (LoginStep, Resp) {
    let data = kv(pairs);
    send_raw(l, r, &data)
}

fn send_raw(l: &mut Login, r: &Req, data: &[u8]) -> (LoginStep, Resp) {
    let mut out = Vec::new();
    let step = l.on_request(&bhs(r, data.len()), data, &mut out);
    let f = frame(&out, &Framing::LOGIN)
        .expect("valid response")
        .expect("complete response");
    assert_eq!(f.total_len, out.len(), "exactly one PDU");
    assert_eq!(f.bhs.opcode(), opcode::LOGIN_RESP);
    assert_eq!(f.bhs.itt(), 0x55, "ITT echoed");
    assert_eq!(f.bhs.isid(), [0x80, 0, 0x12, 0x34, 0, 1], "ISID echoed");
    let pairs = text::parse(&out[f.data.clone()]).expect("response text");
    let keys = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let order = pairs.iter().map(|(k, _)| k.to_string()).collect();
    (
        step,
        Resp {
            bhs: f.bhs,
            keys,
            order,
        },
    )
}

/// A login straight into the operational stage of the open target: the names, then `keys`.
fn send_operational(l: &mut Login, keys: &[(&str, &str)]) -> (LoginStep, Resp) {
    let mut pairs = vec![("InitiatorName", INI), ("TargetName", OPEN)];
    pairs.extend_from_slice(keys);
    send(l, &Req::operational(), &pairs)
}

fn failed(step: &LoginStep, resp: &Resp, st: u16) {
    assert!(matches!(step, LoginStep::Failed), "{step:?}");
    assert_eq!(resp.status(), st, "status");
    assert!(
        resp.stat_sn() >= 100,
        "StatSN follows the initiator's ExpStatSN"
    );
    assert!(!resp.bhs.login_transit());
    assert_eq!(resp.bhs.tsih(), 0);
}

fn established(step: LoginStep) -> Established {
    match step {
        LoginStep::Established(e) => *e,
        other => panic!("expected Established, got {other:?}"),
    }
}

const OPEN_ISCSI_OPS: &[(&str, &str)] = &[
    ("HeaderDigest", "None"),
    ("DataDigest", "None"),
    ("MaxConnections", "1"),
    ("InitialR2T", "No"),
    ("ImmediateData", "Yes"),
    ("MaxRecvDataSegmentLength", "262144"),
    ("MaxBurstLength", "16776192"),
    ("FirstBurstLength", "262144"),
    ("DefaultTime2Wait", "0"),
    ("DefaultTime2Retain", "0"),
    ("MaxOutstandingR2T", "1"),
    ("DataPDUInOrder", "Yes"),
    ("DataSequenceInOrder", "Yes"),
    ("ErrorRecoveryLevel", "0"),
    ("IFMarker", "No"),
    ("OFMarker", "No"),
];

#[test]
fn normal_login_without_authentication() {
    let mut l = Login::new(config(LoginOffer::default()));
    let (step, r) = send(
        &mut l,
        &Req::default(),
        &[
            ("InitiatorName", INI),
            ("InitiatorAlias", "host"),
            ("SessionType", "Normal"),
            ("TargetName", OPEN),
            ("AuthMethod", "None"),
        ],
    );
    assert!(matches!(step, LoginStep::Continue));
    assert_eq!(r.status(), 0);
    assert!(r.bhs.login_transit());
    assert_eq!((r.bhs.login_csg(), r.bhs.login_nsg()), (0, 1));
    assert_eq!(r.get("AuthMethod"), Some("None"));
    assert_eq!(r.get("TargetPortalGroupTag"), Some("7"));
    assert_eq!(
        r.get("MaxRecvDataSegmentLength"),
        None,
        "not in the security stage"
    );
    assert_eq!(r.bhs.tsih(), 0, "TSIH only in the final response");
    assert_eq!(
        r.stat_sn(),
        100,
        "first StatSN from the initiator's ExpStatSN"
    );
    assert_eq!(r.bhs.expstatsn(), 10, "ExpCmdSN = the login's CmdSN");
    let first_stat = r.stat_sn();

    let mut ops = OPEN_ISCSI_OPS.to_vec();
    ops.push(("X-com.example.foo", "1"));
    let (step, r) = send(&mut l, &Req::operational(), &ops);
    assert_eq!(r.status(), 0);
    assert!(r.bhs.login_transit());
    assert_eq!((r.bhs.login_csg(), r.bhs.login_nsg()), (1, 3));
    assert_eq!(r.stat_sn(), first_stat + 1);
    assert_ne!(r.bhs.tsih(), 0);
    // MaxCmdSN opens the offered window.
    assert_eq!(
        u32::from_be_bytes(r.bhs.0[32..36].try_into().expect("4")),
        10 + 31
    );
    for (k, want) in [
        ("HeaderDigest", "None"),
        ("DataDigest", "None"),
        ("MaxConnections", "1"),
        ("InitialR2T", "Yes"),
        ("ImmediateData", "Yes"),
        ("MaxRecvDataSegmentLength", "262144"),
        ("MaxBurstLength", "1048576"),
        ("FirstBurstLength", "65536"),
        ("DefaultTime2Wait", "2"),
        ("DefaultTime2Retain", "0"),
        ("MaxOutstandingR2T", "1"),
        ("DataPDUInOrder", "Yes"),
        ("DataSequenceInOrder", "Yes"),
        ("ErrorRecoveryLevel", "0"),
        ("IFMarker", "No"),
        ("OFMarker", "No"),
        ("X-com.example.foo", "NotUnderstood"),
    ] {
        assert_eq!(r.get(k), Some(want), "{k}");
    }
    // Answers keep the request's order.
    assert_eq!(r.order[0], "HeaderDigest");
    let e = established(step);
    assert_eq!(e.kind, SessionKind::Normal);
    assert_eq!(&*e.initiator_name, INI);
    assert_eq!(
        e.target.as_ref().map(|t| t.name().to_string()),
        Some(OPEN.into())
    );
    assert_eq!(e.tsih, r.bhs.tsih());
    assert_eq!(e.cid, 3);
    assert_eq!(e.isid, [0x80, 0, 0x12, 0x34, 0, 1]);
    assert_eq!(e.exp_cmd_sn, 10);
    assert_eq!(e.stat_sn, first_stat + 2);
    assert_eq!(e.tpgt, 7);
    let p = e.params;
    assert_eq!(p.max_send_data_segment, 262144);
    assert_eq!(p.max_recv_data_segment, 262144);
    assert_eq!(p.max_burst, 1 << 20);
    assert_eq!(p.first_burst, 65536);
    assert!(p.initial_r2t && p.immediate_data);
    assert!(!p.header_digest && !p.data_digest);
    // Nothing more is accepted.
    let (step, r) = send(&mut l, &Req::default(), &[]);
    failed(&step, &r, status::INITIATOR_ERROR);
}

#[test]
fn login_straight_into_operational_stage_with_digests() {
    let mut l = Login::new(config(LoginOffer::default()));
    let (step, r) = send_operational(
        &mut l,
        &[
            ("HeaderDigest", "CRC32C,None"),
            ("DataDigest", "None,CRC32C"),
            ("MaxRecvDataSegmentLength", "0x2000"),
        ],
    );
    assert_eq!(r.get("HeaderDigest"), Some("CRC32C"));
    assert_eq!(r.get("DataDigest"), Some("None"));
    assert_eq!(r.get("TargetPortalGroupTag"), Some("7"));
    let e = established(step);
    assert!(e.params.header_digest && !e.params.data_digest);
    assert_eq!(e.params.max_send_data_segment, 8192);
}

#[test]
fn digests_follow_the_offer_and_bad_values_are_rejected() {
    let mut l = Login::new(config(LoginOffer {
        digests: false,
        ..LoginOffer::default()
    }));
    let (step, r) = send_operational(
        &mut l,
        &[
            ("HeaderDigest", "CRC32C,None"),
            ("DataDigest", "CRC32C"),
            ("MaxRecvDataSegmentLength", "100"),
            ("MaxBurstLength", "-1"),
            ("ErrorRecoveryLevel", "2"),
            ("InitialR2T", "Maybe"),
            ("IFMarkInt", "2048~8192"),
            ("DefaultTime2Wait", "3601"),
        ],
    );
    assert_eq!(r.get("HeaderDigest"), Some("None"));
    assert_eq!(r.get("DataDigest"), Some("Reject"));
    assert_eq!(r.get("MaxRecvDataSegmentLength"), Some("Reject"));
    assert_eq!(r.get("MaxBurstLength"), Some("Reject"));
    assert_eq!(r.get("ErrorRecoveryLevel"), Some("0"));
    assert_eq!(r.get("InitialR2T"), Some("Reject"));
    assert_eq!(r.get("IFMarkInt"), Some("Reject"));
    assert_eq!(r.get("DefaultTime2Wait"), Some("Reject"));
    let e = established(step);
    assert!(!e.params.header_digest && !e.params.data_digest);
    assert_eq!(e.params.max_send_data_segment, 8192, "default kept");
    assert_eq!(
        e.params.max_recv_data_segment, 8192,
        "no declaration after a Reject"
    );
    assert_eq!(e.params.error_recovery_level, 0);
}

#[test]
fn discovery_session() {
    let mut l = Login::new(config(LoginOffer::default()));
    let (step, r) = send(
        &mut l,
        &Req::default(),
        &[
            ("InitiatorName", INI),
            ("SessionType", "Discovery"),
            ("AuthMethod", "CHAP,None"),
        ],
    );
    assert!(matches!(step, LoginStep::Continue));
    assert_eq!(r.get("AuthMethod"), Some("None"));
    assert_eq!(r.get("TargetPortalGroupTag"), None);
    let (step, r) = send(
        &mut l,
        &Req::operational(),
        &[
            ("HeaderDigest", "None"),
            ("MaxBurstLength", "262144"),
            ("InitialR2T", "Yes"),
            ("MaxRecvDataSegmentLength", "32768"),
        ],
    );
    assert_eq!(r.get("MaxBurstLength"), Some("Irrelevant"));
    assert_eq!(r.get("InitialR2T"), Some("Irrelevant"));
    assert_eq!(r.get("MaxRecvDataSegmentLength"), Some("262144"));
    let e = established(step);
    assert_eq!(e.kind, SessionKind::Discovery);
    assert!(e.target.is_none());
    assert_eq!(e.params.max_send_data_segment, 32768);
}

#[test]
fn leading_key_failures() {
    let cfg = config(LoginOffer::default());
    let cases: &[(&[(&str, &str)], u16)] = &[
        (&[("TargetName", OPEN)], status::MISSING_PARAMETER),
        (&[("InitiatorName", INI)], status::MISSING_PARAMETER),
        (
            &[
                ("InitiatorName", INI),
                ("TargetName", "iqn.2026-01.test:none"),
            ],
            status::NOT_FOUND,
        ),
        (
            &[("InitiatorName", INI), ("TargetName", PRIVATE)],
            status::AUTHORIZATION_FAILURE,
        ),
        (
            &[("InitiatorName", INI), ("SessionType", "Boot")],
            status::SESSION_TYPE_UNSUPPORTED,
        ),
    ];
    for (pairs, st) in cases {
        let mut l = Login::new(cfg.clone());
        let (step, r) = send(&mut l, &Req::default(), pairs);
        failed(&step, &r, *st);
        assert!(l.error().is_some());
    }
}

#[test]
fn header_failures() {
    let cfg = config(LoginOffer::default());
    let ok = [("InitiatorName", INI), ("TargetName", OPEN)];
    let cases = [
        (
            Req {
                tsih: 9,
                ..Req::default()
            },
            status::SESSION_DOES_NOT_EXIST,
        ),
        (
            Req {
                vmin: 1,
                ..Req::default()
            },
            status::UNSUPPORTED_VERSION,
        ),
        (
            Req {
                op: opcode::SCSI_CMD,
                ..Req::default()
            },
            status::INVALID_DURING_LOGIN,
        ),
        (
            Req {
                cont: true,
                transit: true,
                ..Req::default()
            },
            status::INITIATOR_ERROR,
        ),
        (
            Req {
                nsg: 2,
                ..Req::default()
            },
            status::INITIATOR_ERROR,
        ),
        (
            Req {
                csg: 1,
                nsg: 1,
                ..Req::default()
            },
            status::INITIATOR_ERROR,
        ),
        (
            Req {
                csg: 3,
                nsg: 3,
                transit: false,
                ..Req::default()
            },
            status::INITIATOR_ERROR,
        ),
    ];
    for (req, st) in cases {
        let mut l = Login::new(cfg.clone());
        let (step, r) = send(&mut l, &req, &ok);
        failed(&step, &r, st);
    }
    // Malformed text.
    let mut l = Login::new(cfg.clone());
    let (step, r) = send_raw(&mut l, &Req::default(), b"InitiatorName\0");
    failed(&step, &r, status::INITIATOR_ERROR);
    let mut l = Login::new(cfg);
    let (step, r) = send_raw(
        &mut l,
        &Req::default(),
        b"InitiatorName=a\0InitiatorName=b\0",
    );
    failed(&step, &r, status::INITIATOR_ERROR);
}

#[test]
fn stage_must_follow_the_agreed_transition() {
    let cfg = config(LoginOffer::default());
    let mut l = Login::new(cfg);
    let first = [
        ("InitiatorName", INI),
        ("TargetName", OPEN),
        ("AuthMethod", "None"),
    ];
    let (step, r) = send(&mut l, &Req::staying(), &first);
    assert!(matches!(step, LoginStep::Continue));
    assert!(!r.bhs.login_transit());
    // The target did not agree to leave the security stage.
    let (step, r) = send(&mut l, &Req::operational(), &[]);
    failed(&step, &r, status::INITIATOR_ERROR);
}

fn chap_answer(r: &Resp, secret: &[u8]) -> String {
    let id: u8 = r.get("CHAP_I").expect("CHAP_I").parse().expect("id");
    let c = text::decode_binary(r.get("CHAP_C").expect("CHAP_C")).expect("challenge");
    assert!(c.len() >= CHAP_CHALLENGE_LEN);
    text::encode_hex(&chap_response(id, secret, &c))
}

fn chap_start(l: &mut Login, target: &str) -> Resp {
    let (step, r) = send(
        l,
        &Req::default(),
        &[
            ("InitiatorName", INI),
            ("TargetName", target),
            ("AuthMethod", "CHAP,None"),
        ],
    );
    assert!(matches!(step, LoginStep::Continue));
    assert_eq!(r.get("AuthMethod"), Some("CHAP"));
    assert!(!r.bhs.login_transit(), "no transit before CHAP completes");
    let (step, r) = send(l, &Req::staying(), &[("CHAP_A", "7,5")]);
    assert!(matches!(step, LoginStep::Continue));
    assert_eq!(r.get("CHAP_A"), Some("5"));
    r
}

fn finish_operational(l: &mut Login) -> Established {
    let (step, r) = send(l, &Req::operational(), OPEN_ISCSI_OPS);
    assert_eq!(r.status(), 0);
    established(step)
}

#[test]
fn one_way_chap() {
    let mut l = Login::new(config(LoginOffer::default()));
    let r = chap_start(&mut l, CHAP_T);
    let answer = chap_answer(&r, SECRET);
    let (step, r) = send(
        &mut l,
        &Req::default(),
        &[("CHAP_N", "alice"), ("CHAP_R", &answer)],
    );
    assert!(matches!(step, LoginStep::Continue));
    assert_eq!(r.status(), 0);
    assert!(r.bhs.login_transit());
    assert!(r.get("CHAP_R").is_none(), "no mutual answer unasked");
    let e = finish_operational(&mut l);
    assert_eq!(e.target.map(|t| t.name().to_string()), Some(CHAP_T.into()));
}

#[test]
fn chap_response_in_base64() {
    let mut l = Login::new(config(LoginOffer::default()));
    let r = chap_start(&mut l, CHAP_T);
    let hex = chap_answer(&r, SECRET);
    let raw = text::decode_binary(&hex).expect("hex");
    // Encode base64 by hand (16 bytes → 24 characters with "==").
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::from("0b");
    for chunk in raw.chunks(3) {
        let mut n = [0u8; 3];
        n[..chunk.len()].copy_from_slice(chunk);
        let v = u32::from(n[0]) << 16 | u32::from(n[1]) << 8 | u32::from(n[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(char::from(A[((v >> (18 - 6 * i)) & 63) as usize]));
            } else {
                b64.push('=');
            }
        }
    }
    let (_, r) = send(
        &mut l,
        &Req::default(),
        &[("CHAP_N", "alice"), ("CHAP_R", &b64)],
    );
    assert_eq!(r.status(), 0);
    assert!(r.bhs.login_transit());
}

#[test]
fn chap_wrong_secret_or_name_fails() {
    let cfg = config(LoginOffer::default());
    for (name, secret) in [("alice", &b"wrong-secret-000"[..]), ("bob", SECRET)] {
        let mut l = Login::new(cfg.clone());
        let r = chap_start(&mut l, CHAP_T);
        let answer = chap_answer(&r, secret);
        let (step, r) = send(
            &mut l,
            &Req::default(),
            &[("CHAP_N", name), ("CHAP_R", &answer)],
        );
        failed(&step, &r, status::AUTH_FAILURE);
    }
    // A malformed response.
    let mut l = Login::new(cfg.clone());
    chap_start(&mut l, CHAP_T);
    let (step, r) = send(
        &mut l,
        &Req::default(),
        &[("CHAP_N", "alice"), ("CHAP_R", "0xzz")],
    );
    failed(&step, &r, status::AUTH_FAILURE);
    // No common algorithm.
    let mut l = Login::new(cfg);
    send(
        &mut l,
        &Req::default(),
        &[
            ("InitiatorName", INI),
            ("TargetName", CHAP_T),
            ("AuthMethod", "CHAP"),
        ],
    );
    let (step, r) = send(&mut l, &Req::default(), &[("CHAP_A", "6,7")]);
    failed(&step, &r, status::AUTH_FAILURE);
}

#[test]
fn mutual_chap() {
    let mut l = Login::new(config(LoginOffer::default()));
    let r = chap_start(&mut l, MUTUAL);
    let answer = chap_answer(&r, SECRET);
    let my_challenge = [0x5au8; 20];
    let (step, r) = send(
        &mut l,
        &Req::default(),
        &[
            ("CHAP_N", "alice"),
            ("CHAP_R", &answer),
            ("CHAP_I", "42"),
            ("CHAP_C", &text::encode_hex(&my_challenge)),
        ],
    );
    assert!(matches!(step, LoginStep::Continue));
    assert_eq!(r.status(), 0);
    assert!(r.bhs.login_transit());
    assert_eq!(r.get("CHAP_N"), Some("target-name"));
    let want = text::encode_hex(&chap_response(42, MSECRET, &my_challenge));
    assert_eq!(r.get("CHAP_R"), Some(want.as_str()));
    finish_operational(&mut l);
}

#[test]
fn mutual_chap_refusals() {
    let cfg = config(LoginOffer::default());
    // The target has no mutual secret.
    let mut l = Login::new(cfg.clone());
    let r = chap_start(&mut l, CHAP_T);
    let answer = chap_answer(&r, SECRET);
    let (step, r) = send(
        &mut l,
        &Req::default(),
        &[
            ("CHAP_N", "alice"),
            ("CHAP_R", &answer),
            ("CHAP_I", "1"),
            ("CHAP_C", "0x0102030405060708090a0b0c0d0e0f10"),
        ],
    );
    failed(&step, &r, status::AUTH_FAILURE);
    // The initiator reflects the target's own challenge.
    let mut l = Login::new(cfg.clone());
    let r = chap_start(&mut l, MUTUAL);
    let answer = chap_answer(&r, SECRET);
    let c = r.get("CHAP_C").expect("C").to_string();
    let (step, r) = send(
        &mut l,
        &Req::default(),
        &[
            ("CHAP_N", "alice"),
            ("CHAP_R", &answer),
            ("CHAP_I", "1"),
            ("CHAP_C", &c),
        ],
    );
    failed(&step, &r, status::AUTH_FAILURE);
    // CHAP_I without CHAP_C.
    let mut l = Login::new(cfg);
    let r = chap_start(&mut l, MUTUAL);
    let answer = chap_answer(&r, SECRET);
    let (step, r) = send(
        &mut l,
        &Req::default(),
        &[("CHAP_N", "alice"), ("CHAP_R", &answer), ("CHAP_I", "1")],
    );
    failed(&step, &r, status::AUTH_FAILURE);
}

#[test]
fn chap_target_refuses_skipped_or_out_of_order_security() {
    let cfg = config(LoginOffer::default());
    // Operational stage first.
    let mut l = Login::new(cfg.clone());
    let (step, r) = send(
        &mut l,
        &Req::operational(),
        &[("InitiatorName", INI), ("TargetName", CHAP_T)],
    );
    failed(&step, &r, status::AUTH_FAILURE);
    // AuthMethod=None only.
    let mut l = Login::new(cfg.clone());
    let (step, r) = send(
        &mut l,
        &Req::default(),
        &[
            ("InitiatorName", INI),
            ("TargetName", CHAP_T),
            ("AuthMethod", "None"),
        ],
    );
    failed(&step, &r, status::AUTH_FAILURE);
    // Transit without any AuthMethod.
    let mut l = Login::new(cfg.clone());
    let (step, r) = send(
        &mut l,
        &Req::default(),
        &[("InitiatorName", INI), ("TargetName", CHAP_T)],
    );
    failed(&step, &r, status::AUTH_FAILURE);
    // CHAP_R before the challenge.
    let mut l = Login::new(cfg.clone());
    send(
        &mut l,
        &Req::staying(),
        &[
            ("InitiatorName", INI),
            ("TargetName", CHAP_T),
            ("AuthMethod", "CHAP"),
        ],
    );
    let (step, r) = send(
        &mut l,
        &Req::default(),
        &[("CHAP_N", "alice"), ("CHAP_R", "0x00")],
    );
    failed(&step, &r, status::AUTH_FAILURE);
    // Moving to the operational stage in the middle of CHAP.
    let mut l = Login::new(cfg);
    chap_start(&mut l, CHAP_T);
    let (step, r) = send(&mut l, &Req::operational(), &[]);
    failed(&step, &r, status::AUTH_FAILURE);
}

#[test]
fn text_continued_over_several_pdus() {
    let mut l = Login::new(config(LoginOffer::default()));
    let data = kv(&[
        ("InitiatorName", INI),
        ("TargetName", OPEN),
        ("AuthMethod", "None"),
    ]);
    let (a, b) = data.split_at(17);
    let (step, r) = send_raw(
        &mut l,
        &Req {
            transit: false,
            cont: true,
            ..Req::default()
        },
        a,
    );
    assert!(matches!(step, LoginStep::Continue));
    assert_eq!(r.bhs.data_len(), 0, "empty answer to a partial text");
    assert!(!r.bhs.login_transit());
    let (step, r) = send_raw(&mut l, &Req::default(), b);
    assert!(matches!(step, LoginStep::Continue));
    assert_eq!(r.get("AuthMethod"), Some("None"));
    assert!(r.bhs.login_transit());
}

#[test]
fn oversized_text_and_endless_logins_fail() {
    let cfg = config(LoginOffer::default());
    let mut l = Login::new(cfg.clone());
    let chunk = vec![b'a'; 8192];
    let cont = Req {
        transit: false,
        cont: true,
        ..Req::default()
    };
    let mut last = None;
    for _ in 0..(TEXT_LEN_MAX / chunk.len() + 1) {
        let (step, r) = send_raw(&mut l, &cont, &chunk);
        if matches!(step, LoginStep::Failed) {
            last = Some(r.status());
            break;
        }
    }
    assert_eq!(last, Some(status::INITIATOR_ERROR));

    let mut l = Login::new(cfg);
    let stay = Req::staying();
    send(
        &mut l,
        &stay,
        &[("InitiatorName", INI), ("TargetName", OPEN)],
    );
    let mut failed_at = None;
    for i in 1..=LOGIN_PDUS_MAX {
        let (step, _) = send(&mut l, &stay, &[]);
        if matches!(step, LoginStep::Failed) {
            failed_at = Some(i + 1);
            break;
        }
    }
    assert_eq!(failed_at, Some(LOGIN_PDUS_MAX + 1));
}

#[test]
fn target_proposes_limits_below_the_defaults() {
    let mut l = Login::new(config(LoginOffer {
        max_burst: 65536,
        first_burst: 16384,
        immediate_data: false,
        ..LoginOffer::default()
    }));
    let ff = Req::operational();
    let (step, r) = send(&mut l, &ff, &[("InitiatorName", INI), ("TargetName", OPEN)]);
    assert!(matches!(step, LoginStep::Continue));
    assert!(!r.bhs.login_transit(), "the target waits for the answers");
    assert_eq!(r.get("MaxBurstLength"), Some("65536"));
    assert_eq!(r.get("FirstBurstLength"), Some("16384"));
    assert_eq!(r.get("ImmediateData"), Some("No"));
    let (step, r) = send(
        &mut l,
        &ff,
        &[
            ("MaxBurstLength", "65536"),
            ("FirstBurstLength", "8192"),
            ("ImmediateData", "No"),
        ],
    );
    assert!(r.bhs.login_transit());
    assert!(
        r.get("MaxBurstLength").is_none(),
        "answers are not answered"
    );
    let e = established(step);
    assert_eq!(e.params.max_burst, 65536);
    assert_eq!(e.params.first_burst, 8192);
    assert!(!e.params.immediate_data);

    // From the security stage the target moves to the operational stage first.
    let mut l = Login::new(config(LoginOffer {
        max_burst: 65536,
        ..LoginOffer::default()
    }));
    let (step, r) = send(
        &mut l,
        &Req {
            nsg: 3,
            ..Req::default()
        },
        &[
            ("InitiatorName", INI),
            ("TargetName", OPEN),
            ("AuthMethod", "None"),
        ],
    );
    assert!(matches!(step, LoginStep::Continue));
    assert!(r.bhs.login_transit());
    assert_eq!(r.bhs.login_nsg(), 1);
}

#[test]
fn tsih_skips_zero() {
    let cfg = config(LoginOffer::default());
    cfg.tsih
        .store(u16::MAX, std::sync::atomic::Ordering::Relaxed);
    let mut tsihs = Vec::new();
    for _ in 0..2 {
        let mut l = Login::new(cfg.clone());
        let (step, _) = send(
            &mut l,
            &Req::operational(),
            &[("InitiatorName", INI), ("TargetName", OPEN)],
        );
        tsihs.push(established(step).tsih);
    }
    assert_eq!(tsihs, [u16::MAX, 1]);
}

#[test]
fn rejected_limits_are_not_proposed_again() {
    let mut l = Login::new(config(LoginOffer {
        max_burst: 65536,
        first_burst: 16384,
        immediate_data: false,
        ..LoginOffer::default()
    }));
    let (step, r) = send_operational(
        &mut l,
        &[
            ("MaxBurstLength", "1"),
            ("FirstBurstLength", "x"),
            ("ImmediateData", "Perhaps"),
            ("TargetPortalGroupTag", "9"),
        ],
    );
    assert_eq!(r.get("MaxBurstLength"), Some("Reject"));
    assert_eq!(r.get("FirstBurstLength"), Some("Reject"));
    assert_eq!(r.get("ImmediateData"), Some("Reject"));
    assert_eq!(r.order.len(), 5, "no proposal repeats a key: {:?}", r.order);
    let e = established(step);
    assert_eq!(e.params.max_burst, 65536);
    assert_eq!(e.params.first_burst, 16384);
    assert!(!e.params.immediate_data);
}

#[test]
fn security_stage_straight_to_full_feature_declares_no_operational_key() {
    // open-iscsi's discovery with default settings: T=1, CSG=0, NSG=3.
    let mut l = Login::new(config(LoginOffer::default()));
    let (step, r) = send(
        &mut l,
        &Req {
            nsg: 3,
            ..Req::default()
        },
        &[
            ("InitiatorName", INI),
            ("SessionType", "Discovery"),
            ("AuthMethod", "None"),
        ],
    );
    assert_eq!(r.order, ["AuthMethod"], "only security keys");
    assert!(r.bhs.login_transit());
    assert_eq!((r.bhs.login_csg(), r.bhs.login_nsg()), (0, 3));
    let e = established(step);
    assert_eq!(
        e.params.max_recv_data_segment, 8192,
        "undeclared: the default"
    );
    assert_eq!(e.params.max_send_data_segment, 8192);
}
