//! Target `iscsi_login`: a connection's Login Requests through the login state machine
//! ([`san::iscsi::login::Login`]: stages, C-bit text, leading keys, CHAP, operational
//! negotiation), then, once a discovery session reaches full-feature phase, its PDUs through
//! [`san::iscsi::discovery::Discovery`] (SendTargets with continued answers, NOP, logout,
//! rejects), framed with the digests the login settled.
//!
//! Input: a config byte (bit 0: CRC32C digests offered; bit 1: limits below the RFC
//! defaults, so the target proposes keys; bits 2–4: command window), then steps. A login
//! step is a raw header and data, a request built from dictionaries of keys and values
//! (optionally split over two C-bit PDUs), or a CHAP answer the harness computes from the
//! last challenge (right or wrong name and secret, optionally with a mutual challenge), since
//! no fuzzer can find an MD5 response. A discovery step is a raw PDU or a text request
//! (SendTargets, continuing the last answer's tag), optionally with its last byte flipped.
//!
//! Oracles besides "no panic": every Login Request gets exactly one well-formed Login
//! Response echoing its ITT and ISID, carrying status 0 unless the login failed, and a failed
//! login stays failed; a session is established only with a non-zero TSIH and parameters in
//! RFC 7143's ranges and within the target's offer; a normal session's target is one the
//! initiator may access, and one with CHAP only after the harness sent that target's right
//! secret; discovery responses frame with the negotiated digests, fit the initiator's
//! MaxRecvDataSegmentLength, and never name a target the initiator may not see.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU16;
use std::sync::Arc;

use md5::{Digest, Md5};
use san::iscsi::discovery::{Discovery, DiscoveryStep};
use san::iscsi::login::Login;
use san::iscsi::login::{LoginConfig, LoginOffer, LoginStep, SessionKind};
use san::iscsi::pdu::{self, frame, opcode, reject, Bhs, Framing, PduError, BHS_LEN};
use san::iscsi::text::{self, TextBuilder};
use san::target::{Chap, Portal, Registry};

use crate::input::{Enc, Input};

/// Steps per input at most.
const STEPS_MAX: usize = 48;
/// Open targets in the registry (enough that SendTargets=All outgrows a 512-byte segment).
const OPEN_TARGETS: usize = 8;

const INI: &str = "iqn.2026-01.fuzz:ini";
const CHAP_T: &str = "iqn.2026-01.fuzz:chap";
const MUTUAL: &str = "iqn.2026-01.fuzz:mutual";
const PRIVATE: &str = "iqn.2026-01.fuzz:private";
const USER: &str = "alice";
const SECRET: &[u8] = b"fuzz-initiator-secret";
const MSECRET: &[u8] = b"fuzz-target-secret-01";
const ISID: [u8; 6] = [0x80, 0, 0, 0x12, 0x34, 0x56];

const KEYS: &[&str] = &[
    "InitiatorName",
    "TargetName",
    "SessionType",
    "AuthMethod",
    "CHAP_A",
    "HeaderDigest",
    "DataDigest",
    "MaxRecvDataSegmentLength",
    "MaxBurstLength",
    "FirstBurstLength",
    "ImmediateData",
    "InitialR2T",
    "MaxOutstandingR2T",
    "MaxConnections",
    "ErrorRecoveryLevel",
    "DefaultTime2Wait",
    "DefaultTime2Retain",
    "DataPDUInOrder",
    "DataSequenceInOrder",
    "IFMarker",
    "OFMarkInt",
    "TaskReporting",
    "iSCSIProtocolLevel",
    "SendTargets",
    "InitiatorAlias",
    "X-vendor.key",
    "CHAP_N",
    "CHAP_R",
    "CHAP_I",
    "CHAP_C",
    "TargetAlias",
];

const VALUES: &[&str] = &[
    INI,
    "iqn.2026-01.fuzz:t0",
    CHAP_T,
    MUTUAL,
    PRIVATE,
    "Normal",
    "Discovery",
    "None",
    "CHAP",
    "CHAP,None",
    "5",
    "CRC32C",
    "CRC32C,None",
    "None,CRC32C",
    "Yes",
    "No",
    "0",
    "1",
    "2",
    "512",
    "8192",
    "65536",
    "262144",
    "16777215",
    "16777216",
    "0x2000",
    "All",
    "",
    "Reject",
    USER,
    "0x00",
];

fn target_name(i: usize) -> String {
    format!("iqn.2026-01.fuzz:t{i}")
}

fn config(cfg: u8) -> Arc<LoginConfig> {
    let reg = Registry::new();
    for i in 0..OPEN_TARGETS {
        let _ = reg.add_target(&target_name(i), vec![], None, vec![]);
    }
    let chap = Chap {
        user: USER.into(),
        secret: SECRET.to_vec(),
        mutual: None,
    };
    let _ = reg.add_target(CHAP_T, vec![], Some(chap.clone()), vec![]);
    let mutual = Chap {
        mutual: Some(("fuzz-target".into(), MSECRET.to_vec())),
        ..chap
    };
    let _ = reg.add_target(MUTUAL, vec![], Some(mutual), vec![]);
    let _ = reg.add_target(PRIVATE, vec![], None, vec!["iqn.2026-01.fuzz:other".into()]);
    for (addr, tpgt) in [("192.0.2.1:3260", 1), ("[2001:db8::1]:3260", 2)] {
        let addr: SocketAddr = match addr.parse() {
            Ok(a) => a,
            Err(_) => continue,
        };
        reg.add_portal(Portal { addr, tpgt });
    }
    let low = cfg & 2 != 0;
    Arc::new(LoginConfig {
        registry: Arc::new(reg),
        portal: Portal {
            addr: SocketAddr::from(([192, 0, 2, 1], 3260)),
            tpgt: 1,
        },
        tsih: Arc::new(AtomicU16::new(u16::MAX - 1)),
        offer: LoginOffer {
            digests: cfg & 1 != 0,
            max_burst: if low { 65536 } else { 1 << 20 },
            first_burst: if low { 16384 } else { 65536 },
            immediate_data: !low,
            cmd_window: u32::from(cfg >> 2 & 7),
            ..LoginOffer::default()
        },
    })
}

/// A Login Request header.
fn login_bhs(flags: u8, itt: u32, data_len: usize) -> Bhs {
    let mut b = [0u8; BHS_LEN];
    b[0] = 0x40 | opcode::LOGIN_REQ;
    b[1] = flags;
    b[5..8].copy_from_slice(&(data_len as u32).to_be_bytes()[1..]);
    b[8..14].copy_from_slice(&ISID);
    b[16..20].copy_from_slice(&itt.to_be_bytes());
    b[24..28].copy_from_slice(&1u32.to_be_bytes());
    Bhs(b)
}

fn raw_bhs(input: &mut Input<'_>, data_len: usize) -> Bhs {
    let mut b = [0u8; BHS_LEN];
    let got = input.bytes(BHS_LEN);
    b[..got.len()].copy_from_slice(got);
    b[5..8].copy_from_slice(&(data_len as u32).to_be_bytes()[1..]);
    Bhs(b)
}

fn dict_pairs(input: &mut Input<'_>, t: &mut TextBuilder) {
    let n = input.u8() % 12;
    for _ in 0..n {
        let k = KEYS[usize::from(input.u8()) % KEYS.len()];
        let vi = input.u8();
        let raw;
        let v = if vi == 0xff {
            raw = String::from_utf8_lossy(input.chunk()).into_owned();
            raw.as_str()
        } else {
            VALUES[usize::from(vi) % VALUES.len()]
        };
        t.push(k, v);
    }
}

fn md5_response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// Login-phase state the oracles need.
#[derive(Default)]
struct Tracker {
    /// The last challenge the target sent.
    challenge: Option<(u8, Vec<u8>)>,
    /// Whether the harness answered a challenge of this connection with the right name and
    /// secret (every CHAP target here shares them, so the challenge is what binds).
    proved: bool,
    failed: bool,
}

/// Sends one Login Request; checks the response.
fn login_step(
    login: &mut Login,
    tr: &mut Tracker,
    bhs: &Bhs,
    data: &[u8],
) -> Option<Box<san::iscsi::login::Established>> {
    let mut out = Vec::new();
    let step = login.on_request(bhs, data, &mut out);
    let fr = match frame(&out, &Framing::LOGIN) {
        Ok(Some(fr)) => fr,
        other => panic!("login response does not frame: {other:?}"),
    };
    assert_eq!(fr.total_len, out.len(), "one response per request");
    assert_eq!(fr.bhs.opcode(), opcode::LOGIN_RESP);
    assert_eq!(fr.bhs.itt(), bhs.itt(), "ITT echoed");
    assert_eq!(fr.bhs.isid(), bhs.isid(), "ISID echoed");
    assert!(fr.data.len() <= 8192, "login response over 8 KiB");
    let st = u16::from_be_bytes([fr.bhs.as_bytes()[36], fr.bhs.as_bytes()[37]]);
    if tr.failed {
        assert!(
            matches!(step, LoginStep::Failed),
            "a failed login came back"
        );
    }
    match &step {
        LoginStep::Failed => {
            assert_ne!(st, 0, "failure with success status");
            assert!(!fr.bhs.login_transit());
            tr.failed = true;
        }
        _ => assert_eq!(st, 0, "status {st:#06x} without failing"),
    }
    let seg = &out[fr.data.clone()];
    if let Ok(pairs) = text::parse(seg) {
        let id = text::get(&pairs, "CHAP_I").and_then(|i| i.parse().ok());
        let c = text::get(&pairs, "CHAP_C").and_then(|c| text::decode_binary(c).ok());
        if let (Some(id), Some(c)) = (id, c) {
            tr.challenge = Some((id, c));
        }
    } else {
        panic!(
            "login response text does not parse: {:?}",
            String::from_utf8_lossy(seg)
        );
    }
    match step {
        LoginStep::Established(e) => {
            assert_ne!(e.tsih, 0);
            assert!(fr.bhs.login_transit() && fr.bhs.login_nsg() == 3);
            assert_eq!(fr.bhs.tsih(), e.tsih);
            Some(e)
        }
        _ => None,
    }
}

fn check_established(cfg: &LoginConfig, tr: &Tracker, e: &san::iscsi::login::Established) {
    let p = &e.params;
    let o = &cfg.offer;
    assert!((512..=16_777_215).contains(&p.max_send_data_segment));
    assert!(p.first_burst <= p.max_burst);
    assert!(p.max_outstanding_r2t >= 1);
    assert_eq!(p.error_recovery_level, 0);
    assert_eq!(p.max_connections, 1);
    assert!(o.digests || (!p.header_digest && !p.data_digest));
    match e.kind {
        SessionKind::Normal => {
            // The data-transfer keys are irrelevant to discovery sessions; in normal ones
            // the offer bounds them (proposed by the target when the initiator is silent).
            assert!(p.max_burst >= 512 && p.max_burst <= o.max_burst.max(512));
            assert!(p.first_burst <= o.first_burst.max(512));
            assert!(p.max_outstanding_r2t <= o.max_outstanding_r2t.max(1));
            assert!(o.immediate_data || !p.immediate_data);
            assert!(p.initial_r2t || !o.initial_r2t);
            let t = e.target.as_ref().expect("normal session without a target");
            assert!(cfg.registry.may_access(&e.initiator_name, t));
            if t.chap.is_some() {
                assert!(tr.proved, "CHAP target logged in without its secret");
            }
        }
        SessionKind::Discovery => assert!(e.target.is_none()),
    }
}

/// One discovery-phase step; false once the connection is over.
fn discovery_step(
    d: &mut Discovery,
    max_send: usize,
    input: &mut Input<'_>,
    last_ttt: &mut u32,
) -> bool {
    let kind = input.u8();
    let f = d.framing();
    let (bhs, data) = if kind & 1 == 0 {
        let data = input.chunk().to_vec();
        (raw_bhs(input, data.len()), data)
    } else {
        let v = VALUES[usize::from(input.u8()) % VALUES.len()];
        let cont = kind & 2 != 0;
        let data = if cont {
            Vec::new()
        } else {
            format!("SendTargets={v}\0").into_bytes()
        };
        let mut b = [0u8; BHS_LEN];
        b[0] = opcode::TEXT_REQ;
        b[1] = 0x80;
        b[5..8].copy_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
        b[16..20].copy_from_slice(&7u32.to_be_bytes());
        let ttt = if cont { *last_ttt } else { pdu::RESERVED_TAG };
        b[20..24].copy_from_slice(&ttt.to_be_bytes());
        b[24..28].copy_from_slice(&u32::from(input.u8()).to_be_bytes());
        (Bhs(b), data)
    };
    let mut bytes = Vec::new();
    pdu::append_pdu(&mut bytes, bhs.as_bytes(), &data, &f);
    if kind & 0x40 != 0 {
        if let Some(b) = bytes.last_mut() {
            *b ^= 0x01;
        }
    }
    let mut out = Vec::new();
    let step = match frame(&bytes, &f) {
        Ok(Some(fr)) => d.on_pdu(&fr, &bytes, &mut out),
        Err(PduError::DataDigest { bhs, .. }) => {
            d.reject(&bhs, reject::DATA_DIGEST, &mut out);
            DiscoveryStep::Continue
        }
        Ok(None) | Err(_) => return false,
    };
    let mut rest = &out[..];
    while !rest.is_empty() {
        let fr = match frame(rest, &f) {
            Ok(Some(fr)) => fr,
            other => panic!("discovery response does not frame: {other:?}"),
        };
        assert!(
            fr.data.len() <= max_send,
            "response over MaxRecvDataSegmentLength"
        );
        let seg = &rest[fr.data.clone()];
        if fr.bhs.opcode() == opcode::TEXT_RESP {
            assert!(
                !seg.windows(PRIVATE.len()).any(|w| w == PRIVATE.as_bytes()),
                "SendTargets named a target the initiator may not see"
            );
            if !fr.bhs.final_bit() {
                *last_ttt = fr.bhs.ttt();
            }
        }
        rest = &rest[fr.total_len..];
    }
    step == DiscoveryStep::Continue
}

/// Runs one input.
pub fn run(data: &[u8]) {
    outcome(data);
}

/// What an input reached (for the seeds' own test).
#[derive(Debug, Default, PartialEq, Eq)]
struct Outcome {
    established: Option<SessionKind>,
    failed: bool,
    discovery_steps: usize,
}

fn outcome(data: &[u8]) -> Outcome {
    let mut result = Outcome::default();
    let mut input = Input::new(data);
    let cfg = config(input.u8());
    let mut login = Login::new(cfg.clone());
    let mut tr = Tracker::default();
    // The discovery session and the initiator's MaxRecvDataSegmentLength.
    let mut disc: Option<(Discovery, usize)> = None;
    let mut last_ttt = pdu::RESERVED_TAG;
    for step in 0..STEPS_MAX {
        if input.is_empty() {
            break;
        }
        if let Some((d, max_send)) = disc.as_mut() {
            if !discovery_step(d, *max_send, &mut input, &mut last_ttt) {
                break;
            }
            result.discovery_steps += 1;
            continue;
        }
        let kind = input.u8();
        let itt = step as u32;
        let est = match kind % 4 {
            0 => {
                let data = input.chunk().to_vec();
                let bhs = raw_bhs(&mut input, data.len());
                login_step(&mut login, &mut tr, &bhs, &data)
            }
            1 | 3 => {
                let flags = input.u8();
                let mut t = TextBuilder::new();
                dict_pairs(&mut input, &mut t);
                let text = t.into_bytes();
                if kind % 4 == 3 && !text.is_empty() {
                    let cut = usize::from(input.u8()) % text.len();
                    let first = login_bhs((flags & 0x0f) | 0x40, itt, cut);
                    if login_step(&mut login, &mut tr, &first, &text[..cut]).is_some() {
                        panic!("a C-bit request established a session");
                    }
                    let rest = &text[cut..];
                    login_step(
                        &mut login,
                        &mut tr,
                        &login_bhs(flags, itt, rest.len()),
                        rest,
                    )
                } else {
                    login_step(
                        &mut login,
                        &mut tr,
                        &login_bhs(flags, itt, text.len()),
                        &text,
                    )
                }
            }
            _ => {
                let flags = input.u8();
                let right_name = input.u8() & 1 == 0;
                let right_secret = input.u8() & 1 == 0;
                let mutual = input.u8();
                let mut t = TextBuilder::new();
                t.push("CHAP_N", if right_name { USER } else { "mallory" });
                if let Some((id, c)) = tr.challenge.clone() {
                    let secret: &[u8] = if right_secret { SECRET } else { b"wrong" };
                    t.push("CHAP_R", &text::encode_hex(&md5_response(id, secret, &c)));
                    if right_name && right_secret {
                        tr.proved = true;
                    }
                    if mutual & 1 != 0 {
                        let mine = input.chunk();
                        let mine = if mine.is_empty() { c.as_slice() } else { mine };
                        t.push("CHAP_I", &(mutual >> 1).to_string());
                        t.push("CHAP_C", &text::encode_hex(mine));
                    }
                }
                let text = t.into_bytes();
                login_step(
                    &mut login,
                    &mut tr,
                    &login_bhs(flags, itt, text.len()),
                    &text,
                )
            }
        };
        result.failed = tr.failed;
        if let Some(e) = est {
            check_established(&cfg, &tr, &e);
            result.established = Some(e.kind);
            if e.kind != SessionKind::Discovery {
                break;
            }
            disc = Some((
                Discovery::new(&e, cfg.registry.clone()),
                e.params.max_send_data_segment as usize,
            ));
        }
    }
    result
}

struct Seed(Enc);

impl Seed {
    fn new(cfg: u8) -> Self {
        let mut e = Enc::new();
        e.u8(cfg);
        Seed(e)
    }
    fn key(k: &str) -> u8 {
        KEYS.iter().position(|x| *x == k).unwrap_or(0) as u8
    }
    fn value(v: &str) -> u8 {
        VALUES.iter().position(|x| *x == v).unwrap_or(0) as u8
    }
    /// A dictionary request (`split`: over two C-bit PDUs, cut at that byte).
    fn request(&mut self, flags: u8, pairs: &[(&str, &str)], split: Option<u8>) -> &mut Self {
        self.0
            .u8(if split.is_some() { 3 } else { 1 })
            .u8(flags)
            .u8(pairs.len() as u8);
        for (k, v) in pairs {
            self.0.u8(Self::key(k)).u8(Self::value(v));
        }
        if let Some(c) = split {
            self.0.u8(c);
        }
        self
    }
    /// The opening of a CHAP login (`flags`: staying in the security stage): the names and
    /// AuthMethod, then CHAP_A=5 (MD5).
    fn chap_start(&mut self, flags: u8, target: &str, methods: &str) -> &mut Self {
        let names = [
            ("InitiatorName", INI),
            ("TargetName", target),
            ("AuthMethod", methods),
        ];
        self.request(flags, &names, None)
            .request(flags, &[("CHAP_A", "5")], None)
    }
    fn chap(&mut self, flags: u8, right: bool, mutual: Option<&[u8]>) -> &mut Self {
        self.0
            .u8(2)
            .u8(flags)
            .u8(0)
            .u8(if right { 0 } else { 1 })
            .u8(if mutual.is_some() { 1 | (42 << 1) } else { 0 });
        if let Some(m) = mutual {
            self.0.chunk(m);
        }
        self
    }
    fn send_targets(&mut self, v: &str, cmdsn: u8) -> &mut Self {
        self.0.u8(1).u8(Self::value(v)).u8(cmdsn);
        self
    }
    fn continue_text(&mut self, cmdsn: u8) -> &mut Self {
        self.0.u8(3).u8(0).u8(cmdsn);
        self
    }
    fn raw(&mut self, bhs: &[u8; BHS_LEN], data: &[u8], corrupt: bool) -> &mut Self {
        self.0
            .u8(if corrupt { 0x40 } else { 0 })
            .chunk(data)
            .bytes(bhs);
        self
    }
    fn finish(&mut self) -> Vec<u8> {
        self.0.finish()
    }
}

const OPS: &[(&str, &str)] = &[
    ("HeaderDigest", "None"),
    ("DataDigest", "None"),
    ("MaxRecvDataSegmentLength", "262144"),
    ("MaxBurstLength", "262144"),
    ("FirstBurstLength", "65536"),
    ("ImmediateData", "Yes"),
    ("InitialR2T", "Yes"),
    ("ErrorRecoveryLevel", "0"),
    ("IFMarker", "No"),
    ("X-vendor.key", "1"),
];

/// The seed corpus.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut nop = [0u8; BHS_LEN];
    nop[0] = 0x40 | opcode::NOP_OUT;
    nop[1] = 0x80;
    nop[16..20].copy_from_slice(&9u32.to_be_bytes());
    nop[20..24].copy_from_slice(&u32::MAX.to_be_bytes());
    let mut logout = [0u8; BHS_LEN];
    logout[0] = opcode::LOGOUT_REQ;
    logout[1] = 0x80;
    let mut scsi = [0u8; BHS_LEN];
    scsi[0] = opcode::SCSI_CMD;
    scsi[1] = 0x80;
    // T=1 CSG=0 NSG=1; T=0 CSG=0 NSG=1; T=1 CSG=1 NSG=3; T=1 CSG=0 NSG=3.
    let (sec_go, sec_stay, op_go, sec_ff) = (0x81, 0x01, 0x87, 0x83);
    vec![
        // Discovery with a 512-byte segment limit: the answer comes in pieces.
        Seed::new(0)
            .request(
                op_go,
                &[
                    ("InitiatorName", INI),
                    ("SessionType", "Discovery"),
                    ("MaxRecvDataSegmentLength", "512"),
                    ("MaxBurstLength", "262144"),
                ],
                None,
            )
            .send_targets("All", 1)
            .continue_text(2)
            .continue_text(3)
            .raw(&nop, b"ping", false)
            .raw(&scsi, &[], false)
            .raw(&logout, &[], false)
            .finish(),
        // Discovery with digests, a corrupted data digest, then SendTargets by name.
        Seed::new(1)
            .request(
                sec_ff,
                &[
                    ("InitiatorName", INI),
                    ("SessionType", "Discovery"),
                    ("AuthMethod", "CHAP,None"),
                    ("HeaderDigest", "CRC32C,None"),
                    ("DataDigest", "CRC32C"),
                ],
                None,
            )
            .raw(&nop, b"corrupted", true)
            .send_targets("iqn.2026-01.fuzz:t0", 1)
            .send_targets(PRIVATE, 2)
            .finish(),
        // A normal session without authentication, its first request split.
        Seed::new(4 << 2)
            .request(
                sec_go,
                &[
                    ("InitiatorName", INI),
                    ("TargetName", "iqn.2026-01.fuzz:t0"),
                    ("AuthMethod", "None"),
                ],
                Some(20),
            )
            .request(op_go, OPS, None)
            .finish(),
        // One-way CHAP.
        Seed::new(0)
            .chap_start(sec_stay, CHAP_T, "CHAP,None")
            .chap(sec_go, true, None)
            .request(op_go, OPS, None)
            .finish(),
        // Mutual CHAP, with limits the target proposes.
        Seed::new(2)
            .chap_start(sec_stay, MUTUAL, "CHAP")
            .chap(sec_go, true, Some(&[0x11; 16]))
            .request(op_go, &[("HeaderDigest", "None")], None)
            .request(
                op_go,
                &[
                    ("MaxBurstLength", "65536"),
                    ("FirstBurstLength", "8192"),
                    ("ImmediateData", "No"),
                ],
                None,
            )
            .finish(),
        // Wrong secret; a private target; operational stage first on a CHAP target.
        Seed::new(0)
            .chap_start(sec_stay, CHAP_T, "CHAP")
            .chap(sec_go, false, None)
            .request(op_go, OPS, None)
            .finish(),
        Seed::new(0)
            .request(
                sec_go,
                &[("InitiatorName", INI), ("TargetName", PRIVATE)],
                None,
            )
            .finish(),
        Seed::new(0)
            .request(
                op_go,
                &[("InitiatorName", INI), ("TargetName", CHAP_T)],
                None,
            )
            .finish(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_reach_what_they_are_for() {
        let got: Vec<Outcome> = seeds().iter().map(|s| outcome(s)).collect();
        let d = Some(SessionKind::Discovery);
        let n = Some(SessionKind::Normal);
        let want = [
            (d, false, 5),
            (d, false, 3),
            (n, false, 0),
            (n, false, 0),
            (n, false, 0),
            (None, true, 0),
            (None, true, 0),
            (None, true, 0),
        ];
        assert_eq!(got.len(), want.len());
        for (i, (g, (est, failed, steps))) in got.iter().zip(want).enumerate() {
            assert_eq!(
                (g.established, g.failed, g.discovery_steps),
                (est, failed, steps),
                "seed {i}"
            );
        }
    }
}
