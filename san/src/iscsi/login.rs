//! The login phase of one connection (RFC 7143 §6 and §11.12–13): stages and their
//! transitions (T bit, CSG/NSG), text continued over several PDUs (C bit), the leading keys
//! (InitiatorName, SessionType, TargetName), the target lookup and access check, security
//! negotiation (AuthMethod None or CHAP with MD5, one-way or mutual), operational negotiation
//! of every key RFC 7143 defines (§13), and the new session's TSIH. Pure: one Login Request in,
//! one Login Response out; the caller owns the socket and the timeouts.

use std::sync::atomic::AtomicU16;
use std::sync::Arc;

use md5::{Digest, Md5};
use rand::Rng;
use thiserror::Error;

use super::params::SessionParams;
use super::pdu::{
    self, opcode, stage, Bhs, Framing, LoginResponse, BHS_LEN, DATA_SEGMENT_MAX, DATA_SEGMENT_MIN,
    ISCSI_VERSION,
};
use super::text::{self, TextBuilder, TextError, TEXT_LEN_MAX};
use crate::target::{Portal, Registry, Target};

/// Login status codes (§11.13.5): class in the high byte, detail in the low byte.
pub mod status {
    /// Initiator error (not otherwise classified): malformed requests, stage errors.
    pub const INITIATOR_ERROR: u16 = 0x0200;
    /// Authentication failure.
    pub const AUTH_FAILURE: u16 = 0x0201;
    /// Authorization failure: the initiator may not access this target.
    pub const AUTHORIZATION_FAILURE: u16 = 0x0202;
    /// Not found: no such target.
    pub const NOT_FOUND: u16 = 0x0203;
    /// Target removed.
    pub const TARGET_REMOVED: u16 = 0x0204;
    /// Unsupported version.
    pub const UNSUPPORTED_VERSION: u16 = 0x0205;
    /// Missing parameter (InitiatorName, TargetName).
    pub const MISSING_PARAMETER: u16 = 0x0207;
    /// Session type not supported.
    pub const SESSION_TYPE_UNSUPPORTED: u16 = 0x0209;
    /// Session does not exist (a TSIH this target did not give out: no session
    /// reinstatement or added connections at ERL 0 with MaxConnections=1).
    pub const SESSION_DOES_NOT_EXIST: u16 = 0x020a;
    /// Invalid request during login (a PDU other than Login Request).
    pub const INVALID_DURING_LOGIN: u16 = 0x020b;
}

/// Why a login failed (the status the Login Response carried).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LoginError {
    /// A PDU other than a Login Request during login.
    #[error("opcode {0:#04x} during login")]
    NotLogin(u8),
    /// The initiator needs a version this target does not speak.
    #[error("unsupported version (min {0})")]
    Version(u8),
    /// TSIH != 0: the session to join or reinstate does not exist here.
    #[error("no session with TSIH {0}")]
    NoSession(u16),
    /// A required key was missing.
    #[error("missing {0}")]
    Missing(&'static str),
    /// SessionType other than Normal or Discovery.
    #[error("session type {0:?} not supported")]
    SessionType(String),
    /// No such target.
    #[error("no target {0}")]
    NotFound(String),
    /// The initiator may not access the target.
    #[error("{initiator} may not access {target}")]
    Denied {
        /// Initiator name.
        initiator: String,
        /// Target name.
        target: String,
    },
    /// Authentication failed.
    #[error("authentication failed: {0}")]
    Auth(&'static str),
    /// Malformed text.
    #[error("text: {0}")]
    Text(#[from] TextError),
    /// Stage or flag errors.
    #[error("protocol: {0}")]
    Protocol(&'static str),
}

impl LoginError {
    /// The Login Response status of this failure.
    pub fn status(&self) -> u16 {
        match self {
            LoginError::NotLogin(_) => status::INVALID_DURING_LOGIN,
            LoginError::Version(_) => status::UNSUPPORTED_VERSION,
            LoginError::NoSession(_) => status::SESSION_DOES_NOT_EXIST,
            LoginError::Missing(_) => status::MISSING_PARAMETER,
            LoginError::SessionType(_) => status::SESSION_TYPE_UNSUPPORTED,
            LoginError::NotFound(_) => status::NOT_FOUND,
            LoginError::Denied { .. } => status::AUTHORIZATION_FAILURE,
            LoginError::Auth(_) => status::AUTH_FAILURE,
            LoginError::Text(_) | LoginError::Protocol(_) => status::INITIATOR_ERROR,
        }
    }
}

/// Login requests one connection may send before it must be done: real logins take 2–5,
/// CHAP one more; the rest is an initiator stalling the login thread.
pub const LOGIN_PDUS_MAX: u32 = 32;
/// Length of the target's CHAP challenge (RFC 7143 §12.1.3 asks for challenges of at least
/// the MD5 digest's 16 bytes).
pub const CHAP_CHALLENGE_LEN: usize = 16;
/// CHAP_A value of MD5 (RFC 1994).
const CHAP_MD5: &str = "5";
/// Default MaxBurstLength (§13.13), below which the target must propose its own.
const DEFAULT_MAX_BURST: u32 = 262_144;
/// Default FirstBurstLength (§13.14).
const DEFAULT_FIRST_BURST: u32 = 65_536;
/// Largest DefaultTime2Wait/Time2Retain (§13.15–16).
const TIME2_MAX: u64 = 3600;

/// The target's side of operational negotiation: its limits and preferences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginOffer {
    /// The target's MaxRecvDataSegmentLength (declared; bounds the PDUs it receives).
    pub max_recv_data_segment: u32,
    /// Largest MaxBurstLength accepted.
    pub max_burst: u32,
    /// Largest FirstBurstLength accepted.
    pub first_burst: u32,
    /// Largest MaxOutstandingR2T accepted.
    pub max_outstanding_r2t: u32,
    /// Whether the target accepts immediate data (ImmediateData is AND-negotiated).
    pub immediate_data: bool,
    /// Whether the target insists on InitialR2T=Yes (OR-negotiated: Yes forces it).
    pub initial_r2t: bool,
    /// Whether CRC32C digests may be chosen when the initiator lists them.
    pub digests: bool,
    /// Commands the new session may have outstanding: MaxCmdSN = ExpCmdSN + window - 1 in
    /// the final Login Response.
    pub cmd_window: u32,
}

impl Default for LoginOffer {
    fn default() -> Self {
        LoginOffer {
            max_recv_data_segment: 262_144,
            max_burst: 1 << 20,
            first_burst: 65_536,
            max_outstanding_r2t: 1,
            immediate_data: true,
            initial_r2t: true,
            digests: true,
            cmd_window: 32,
        }
    }
}

/// What every login on one portal shares.
#[derive(Debug)]
pub struct LoginConfig {
    /// The exported targets.
    pub registry: Arc<Registry>,
    /// The portal the connection came in on (its TPGT is declared to the initiator).
    pub portal: Portal,
    /// The next TSIH to hand out (0 is skipped: it means "new session").
    pub tsih: Arc<AtomicU16>,
    /// The target's offer.
    pub offer: LoginOffer,
}

/// The two session types (§13.21).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionKind {
    /// SendTargets only.
    Discovery,
    /// SCSI to one target.
    Normal,
}

/// A login that reached full-feature phase.
#[derive(Debug, Clone)]
pub struct Established {
    /// Session type.
    pub kind: SessionKind,
    /// InitiatorName.
    pub initiator_name: Arc<str>,
    /// ISID.
    pub isid: [u8; 6],
    /// The new session's TSIH.
    pub tsih: u16,
    /// The connection's CID.
    pub cid: u16,
    /// The target (Normal sessions).
    pub target: Option<Arc<Target>>,
    /// What was negotiated.
    pub params: SessionParams,
    /// The CmdSN the first command carries (login requests do not advance it).
    pub exp_cmd_sn: u32,
    /// The next StatSN to send.
    pub stat_sn: u32,
    /// The portal group tag declared.
    pub tpgt: u16,
}

/// What a Login Request led to (the response is in `out` in every case).
#[derive(Debug)]
pub enum LoginStep {
    /// More Login Requests are expected.
    Continue,
    /// Full-feature phase begins with these parameters.
    Established(Box<Established>),
    /// The login failed (or was already over): close the connection after sending.
    Failed,
}

/// Security negotiation progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auth {
    /// No AuthMethod chosen yet.
    Start,
    /// AuthMethod=None.
    None,
    /// AuthMethod=CHAP chosen; CHAP_A expected.
    Chap,
    /// Challenge sent; CHAP_N/CHAP_R expected.
    Challenged {
        id: u8,
        challenge: [u8; CHAP_CHALLENGE_LEN],
    },
    /// The initiator proved its secret.
    Done,
}

/// Operational keys the initiator sent (so the target proposes what it must) or the target
/// proposed (so the initiator's next mention is an answer).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct KeySet(u32);

impl KeySet {
    const IMMEDIATE_DATA: u32 = 1;
    const MAX_BURST: u32 = 2;
    const FIRST_BURST: u32 = 4;
    fn has(self, k: u32) -> bool {
        self.0 & k != 0
    }
    fn add(&mut self, k: u32) {
        self.0 |= k;
    }
}

/// The login state machine of one connection.
#[derive(Debug)]
pub struct Login {
    cfg: Arc<LoginConfig>,
    pdus: u32,
    /// Stage the next request must be in (None before the first request).
    stage: Option<u8>,
    isid: [u8; 6],
    cid: u16,
    stat_sn: u32,
    exp_cmd_sn: u32,
    /// Text of a request continued over C-bit PDUs.
    partial: Vec<u8>,
    /// Leading keys processed (the first complete request).
    leading_done: bool,
    initiator: Option<Arc<str>>,
    kind: SessionKind,
    target: Option<Arc<Target>>,
    auth: Auth,
    params: SessionParams,
    sent: KeySet,
    proposed: KeySet,
    declared_mrdsl: bool,
    declared_tpgt: bool,
    over: bool,
    error: Option<LoginError>,
}

fn parse_num(v: &str) -> Option<u64> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if h.is_empty() || h.len() > 16 {
            return None;
        }
        u64::from_str_radix(h, 16).ok()
    } else if !v.is_empty() && v.len() <= 20 && v.bytes().all(|b| b.is_ascii_digit()) {
        v.parse().ok()
    } else {
        None
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "Yes"
    } else {
        "No"
    }
}

fn chap_response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// Compares without an early exit (the response is a secret's proof).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Login {
    /// A connection's login, before its first request.
    pub fn new(cfg: Arc<LoginConfig>) -> Self {
        let params = SessionParams {
            max_recv_data_segment: cfg
                .offer
                .max_recv_data_segment
                .clamp(DATA_SEGMENT_MIN, DATA_SEGMENT_MAX),
            ..SessionParams::default()
        };
        Login {
            cfg,
            pdus: 0,
            stage: None,
            isid: [0; 6],
            cid: 0,
            stat_sn: 0,
            exp_cmd_sn: 0,
            partial: Vec::new(),
            leading_done: false,
            initiator: None,
            kind: SessionKind::Normal,
            target: None,
            auth: Auth::Start,
            params,
            sent: KeySet::default(),
            proposed: KeySet::default(),
            declared_mrdsl: false,
            declared_tpgt: false,
            over: false,
            error: None,
        }
    }

    /// Why the login failed, once it has.
    pub fn error(&self) -> Option<&LoginError> {
        self.error.as_ref()
    }

    /// One complete Login Request PDU (framed without digests: the login phase has none);
    /// appends the complete Login Response PDU (BHS + padded data) to `out`.
    pub fn on_request(&mut self, bhs: &Bhs, data: &[u8], out: &mut Vec<u8>) -> LoginStep {
        if self.over {
            let e = LoginError::Protocol("request after the login ended");
            return self.fail(bhs, e, out);
        }
        self.pdus += 1;
        if self.stage.is_none() {
            // The first StatSN follows the initiator's ExpStatSN, refusals included.
            self.stat_sn = bhs.expstatsn();
        }
        if bhs.opcode() != opcode::LOGIN_REQ {
            return self.fail(bhs, LoginError::NotLogin(bhs.opcode()), out);
        }
        if self.pdus > LOGIN_PDUS_MAX {
            return self.fail(bhs, LoginError::Protocol("too many login requests"), out);
        }
        match self.step(bhs, data) {
            Ok((resp, step)) => {
                self.respond(bhs, &resp, out);
                step
            }
            Err(e) => self.fail(bhs, e, out),
        }
    }

    fn step(&mut self, bhs: &Bhs, data: &[u8]) -> Result<(Response, LoginStep), LoginError> {
        let csg = bhs.login_csg();
        let nsg = bhs.login_nsg();
        let transit = bhs.login_transit();
        let cont = bhs.continue_bit();
        self.exp_cmd_sn = bhs.cmdsn();
        match self.stage {
            None => {
                // The first request fixes the connection's identity.
                self.isid = bhs.isid();
                self.cid = bhs.cid();
                if bhs.version_min() > ISCSI_VERSION {
                    return Err(LoginError::Version(bhs.version_min()));
                }
                if bhs.tsih() != 0 {
                    return Err(LoginError::NoSession(bhs.tsih()));
                }
                if csg != stage::SECURITY && csg != stage::OPERATIONAL {
                    return Err(LoginError::Protocol("first request not in a login stage"));
                }
                self.stage = Some(csg);
            }
            Some(s) => {
                if bhs.isid() != self.isid || bhs.tsih() != 0 {
                    return Err(LoginError::Protocol("ISID or TSIH changed during login"));
                }
                if csg != s {
                    if csg == stage::OPERATIONAL && self.auth_required() && !self.authenticated() {
                        return Err(LoginError::Auth("operational stage before authentication"));
                    }
                    return Err(LoginError::Protocol("request in a stage not agreed"));
                }
            }
        }
        if cont && transit {
            return Err(LoginError::Protocol("C and T bits both set"));
        }
        if transit && (nsg <= csg || nsg == 2) {
            return Err(LoginError::Protocol("invalid next stage"));
        }
        if self.partial.len() + data.len() > TEXT_LEN_MAX {
            return Err(LoginError::Text(TextError::TooLong));
        }
        self.partial.extend_from_slice(data);
        let mut resp = Response {
            csg,
            nsg,
            ..Response::default()
        };
        if cont {
            // §6.5: the target answers each partial text with an empty response.
            return Ok((resp, LoginStep::Continue));
        }
        let whole = std::mem::take(&mut self.partial);
        let pairs = text::parse(&whole)?;
        if !self.leading_done {
            self.leading(&pairs)?;
            self.leading_done = true;
        }
        if csg == stage::OPERATIONAL && self.auth_required() && !self.authenticated() {
            return Err(LoginError::Auth("authentication required"));
        }
        let mut out = TextBuilder::new();
        if !self.declared_tpgt && self.kind == SessionKind::Normal {
            out.push("TargetPortalGroupTag", &self.cfg.portal.tpgt.to_string());
            self.declared_tpgt = true;
        }
        for (k, v) in pairs.iter() {
            self.key(csg, k, v, &mut out)?;
        }
        if csg == stage::SECURITY {
            self.chap_verify(&pairs, &mut out)?;
        }
        if transit {
            if csg == stage::SECURITY && !self.authenticated() {
                if matches!(self.auth, Auth::Start | Auth::None) {
                    return Err(LoginError::Auth("security stage left without CHAP"));
                }
                // CHAP is under way: the target stays (T=0) until it completes.
            } else {
                let mut next = nsg;
                let mut go = true;
                if nsg == stage::FULL_FEATURE
                    && self.kind == SessionKind::Normal
                    && self.needs_proposals()
                {
                    if csg == stage::SECURITY {
                        // Propose in the operational stage (§6.3: the target may pick a
                        // lower next stage).
                        next = stage::OPERATIONAL;
                    } else {
                        // The initiator answers in its next request and transits then.
                        self.proposals(&mut out);
                        go = false;
                    }
                }
                if go {
                    // The target's receive limit is declared before full-feature phase,
                    // in the operational stage's answers: initiators refuse operational
                    // keys in the security stage (open-iscsi's discovery goes straight
                    // from there to full-feature phase), where the default then holds.
                    if next == stage::FULL_FEATURE && !self.declared_mrdsl {
                        if csg == stage::OPERATIONAL {
                            out.push(
                                "MaxRecvDataSegmentLength",
                                &self.params.max_recv_data_segment.to_string(),
                            );
                        } else {
                            self.params.max_recv_data_segment =
                                SessionParams::default().max_recv_data_segment;
                        }
                        self.declared_mrdsl = true;
                    }
                    resp.transit = true;
                    resp.nsg = next;
                    self.stage = Some(next);
                }
            }
        }
        resp.text = out.into_bytes();
        if resp.transit && resp.nsg == stage::FULL_FEATURE {
            let est = self.establish();
            resp.tsih = est.tsih;
            return Ok((resp, LoginStep::Established(Box::new(est))));
        }
        Ok((resp, LoginStep::Continue))
    }

    fn auth_required(&self) -> bool {
        self.kind == SessionKind::Normal && self.target.as_ref().is_some_and(|t| t.chap.is_some())
    }

    fn authenticated(&self) -> bool {
        self.auth == Auth::Done || !self.auth_required()
    }

    /// The leading keys of the first request (§13.4, 13.5, 13.21).
    fn leading(&mut self, pairs: &text::Pairs<'_>) -> Result<(), LoginError> {
        let initiator = text::get(pairs, "InitiatorName")
            .filter(|n| !n.is_empty())
            .ok_or(LoginError::Missing("InitiatorName"))?;
        self.initiator = Some(Arc::from(initiator));
        self.kind = match text::get(pairs, "SessionType") {
            None | Some("Normal") => SessionKind::Normal,
            Some("Discovery") => SessionKind::Discovery,
            Some(other) => return Err(LoginError::SessionType(other.to_string())),
        };
        if self.kind == SessionKind::Normal {
            let name = text::get(pairs, "TargetName")
                .filter(|n| !n.is_empty())
                .ok_or(LoginError::Missing("TargetName"))?;
            let target = self
                .cfg
                .registry
                .target(name)
                .ok_or_else(|| LoginError::NotFound(name.to_string()))?;
            if !self.cfg.registry.may_access(initiator, &target) {
                return Err(LoginError::Denied {
                    initiator: initiator.to_string(),
                    target: name.to_string(),
                });
            }
            self.target = Some(target);
        }
        Ok(())
    }

    /// One key of a request: answers go to `out`.
    fn key(&mut self, csg: u8, k: &str, v: &str, out: &mut TextBuilder) -> Result<(), LoginError> {
        match k {
            "InitiatorName" | "SessionType" | "TargetName" | "InitiatorAlias" => Ok(()),
            "AuthMethod" | "CHAP_A" | "CHAP_N" | "CHAP_R" | "CHAP_I" | "CHAP_C" => {
                if csg != stage::SECURITY {
                    return Err(LoginError::Protocol(
                        "security key outside the security stage",
                    ));
                }
                self.security(k, v, out)
            }
            _ => {
                self.operational(k, v, out);
                Ok(())
            }
        }
    }

    fn security(&mut self, k: &str, v: &str, out: &mut TextBuilder) -> Result<(), LoginError> {
        match (k, self.auth) {
            ("AuthMethod", Auth::Start) => {
                let want_chap = self.auth_required();
                let pick = v.split(',').find(|m| {
                    if want_chap {
                        *m == "CHAP"
                    } else {
                        *m == "None"
                    }
                });
                match pick {
                    Some("CHAP") => {
                        self.auth = Auth::Chap;
                        out.push("AuthMethod", "CHAP");
                    }
                    Some(_) => {
                        self.auth = Auth::None;
                        out.push("AuthMethod", "None");
                    }
                    None => {
                        if want_chap {
                            return Err(LoginError::Auth("initiator does not offer CHAP"));
                        }
                        out.push("AuthMethod", "Reject");
                    }
                }
                Ok(())
            }
            ("CHAP_A", Auth::Chap) => {
                if !v.split(',').any(|a| a == CHAP_MD5) {
                    return Err(LoginError::Auth("no CHAP algorithm in common (MD5 only)"));
                }
                let mut rng = rand::thread_rng();
                let id: u8 = rng.gen();
                let mut challenge = [0u8; CHAP_CHALLENGE_LEN];
                rng.fill(&mut challenge[..]);
                self.auth = Auth::Challenged { id, challenge };
                out.push("CHAP_A", CHAP_MD5)
                    .push("CHAP_I", &id.to_string())
                    .push("CHAP_C", &text::encode_hex(&challenge));
                Ok(())
            }
            // Read together with CHAP_R.
            ("CHAP_N" | "CHAP_I" | "CHAP_C" | "CHAP_R", Auth::Challenged { .. }) => Ok(()),
            _ => Err(LoginError::Auth("security key out of order")),
        }
    }

    /// Verifies CHAP_N/CHAP_R (and answers a mutual challenge) once a request carried them.
    fn chap_verify(
        &mut self,
        pairs: &text::Pairs<'_>,
        out: &mut TextBuilder,
    ) -> Result<(), LoginError> {
        let Auth::Challenged { id, challenge } = self.auth else {
            return Ok(());
        };
        let Some(r) = text::get(pairs, "CHAP_R") else {
            return Ok(());
        };
        let chap = self
            .target
            .as_ref()
            .and_then(|t| t.chap.clone())
            .ok_or(LoginError::Auth("no CHAP credentials"))?;
        let name = text::get(pairs, "CHAP_N").ok_or(LoginError::Auth("CHAP_R without CHAP_N"))?;
        let r = text::decode_binary(r).map_err(|_| LoginError::Auth("malformed CHAP_R"))?;
        let expect = chap_response(id, &chap.secret, &challenge);
        if name != chap.user || !same(&r, &expect) {
            return Err(LoginError::Auth("wrong CHAP name or secret"));
        }
        match (text::get(pairs, "CHAP_I"), text::get(pairs, "CHAP_C")) {
            (None, None) => {}
            (Some(i), Some(c)) => {
                let (mname, msecret) = chap
                    .mutual
                    .as_ref()
                    .ok_or(LoginError::Auth("mutual CHAP asked, no target secret"))?;
                let i = parse_num(i)
                    .and_then(|i| u8::try_from(i).ok())
                    .ok_or(LoginError::Auth("malformed CHAP_I"))?;
                let c = text::decode_binary(c).map_err(|_| LoginError::Auth("malformed CHAP_C"))?;
                if c.is_empty() || same(&c, &challenge) {
                    return Err(LoginError::Auth("initiator reused the target's challenge"));
                }
                if msecret == &chap.secret {
                    return Err(LoginError::Auth("mutual secret equals the initiator's"));
                }
                let resp = chap_response(i, msecret, &c);
                out.push("CHAP_N", mname)
                    .push("CHAP_R", &text::encode_hex(&resp));
            }
            _ => return Err(LoginError::Auth("CHAP_I without CHAP_C or back")),
        }
        self.auth = Auth::Done;
        Ok(())
    }
}

/// Fields of the Login Response being built.
#[derive(Debug, Default)]
struct Response {
    transit: bool,
    csg: u8,
    nsg: u8,
    tsih: u16,
    text: Vec<u8>,
}

#[path = "login_negotiate.rs"]
mod negotiate;

#[cfg(test)]
#[path = "login_tests.rs"]
mod tests;
