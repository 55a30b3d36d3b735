//! The full-feature phase of a discovery session (RFC 7143 §4.3, Appendix C): Text
//! requests with SendTargets, NOP-Out, Logout; every other PDU is rejected. Pure: one
//! framed PDU in, its responses out.
//!
//! [`TextExchange`] is the Text Request/Response exchange itself (request text continued
//! over C-bit PDUs, answers longer than the initiator's MaxRecvDataSegmentLength sent in
//! pieces with a Target Transfer Tag, §11.10–11.11, SendTargets), shared with normal
//! sessions, where SendTargets names only the session's own target.

use std::net::SocketAddr;
use std::sync::Arc;

use thiserror::Error;

use super::login::Established;
use super::params::SessionParams;
use super::pdu::{
    self, opcode, reject, Bhs, Frame, Framing, LogoutResponse, NopIn, Reject, TextResponse,
    BHS_LEN, RESERVED_TAG,
};
use super::text::{self, TextBuilder, TextError, TEXT_LEN_MAX};
use crate::target::{check_name, Portal, Registry, Target};

/// Commands a discovery session may have outstanding (MaxCmdSN = ExpCmdSN + window - 1):
/// discovery is one request at a time, a few allow pipelining NOPs behind a text request.
pub const DISCOVERY_CMD_WINDOW: u32 = 8;

/// What the caller does after a PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscoveryStep {
    /// Keep the connection.
    Continue,
    /// Close it once `out` is sent (logout, or an unrecoverable error).
    Close,
}

/// Why a PDU was rejected (logged; the initiator gets a Reject).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DiscoveryError {
    /// Not a PDU a discovery session accepts.
    #[error("opcode {0:#04x} in a discovery session")]
    Opcode(u8),
    /// A Target Transfer Tag that continues no exchange.
    #[error("unknown target transfer tag {0:#x}")]
    Ttt(u32),
    /// Malformed request text.
    #[error("text: {0}")]
    Text(#[from] TextError),
    /// Flags that contradict each other.
    #[error("{0}")]
    Flags(&'static str),
}

impl DiscoveryError {
    /// The Reject reason for this error (§11.17.1).
    pub fn reject_reason(&self) -> u8 {
        match self {
            DiscoveryError::Opcode(_) => reject::PROTOCOL_ERROR,
            _ => reject::INVALID_PDU_FIELD,
        }
    }
}

/// One Text Response to send: its flags, tag and data (the caller adds the sequence
/// numbers: StatSN, ExpCmdSN, MaxCmdSN).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextReply {
    /// F bit.
    pub final_: bool,
    /// C bit (more text follows in the next response).
    pub cont: bool,
    /// Target Transfer Tag (the initiator continues the exchange with it; reserved when
    /// final).
    pub ttt: u32,
    /// Data segment (at most the initiator's MaxRecvDataSegmentLength).
    pub data: Vec<u8>,
}

impl TextReply {
    /// The Text Response header for this reply to `req`.
    pub fn response(
        &self,
        req: &Bhs,
        stat_sn: u32,
        exp_cmd_sn: u32,
        max_cmd_sn: u32,
    ) -> TextResponse {
        TextResponse {
            final_: self.final_,
            cont: self.cont,
            lun: req.lun(),
            itt: req.itt(),
            ttt: self.ttt,
            stat_sn,
            exp_cmd_sn,
            max_cmd_sn,
            data_len: self.data.len() as u32,
        }
    }
}

/// A text response still being sent in pieces.
#[derive(Debug)]
struct Pending {
    itt: u32,
    ttt: u32,
    text: Vec<u8>,
    sent: usize,
}

/// A request text gathered over C-bit PDUs.
#[derive(Debug)]
struct Partial {
    itt: u32,
    ttt: u32,
    text: Vec<u8>,
}

/// The Text Request/Response exchange of one connection (one exchange at a time, §11.10).
#[derive(Debug)]
pub struct TextExchange {
    next_ttt: u32,
    pending: Option<Pending>,
    partial: Option<Partial>,
    local: Option<SocketAddr>,
}

impl Default for TextExchange {
    fn default() -> Self {
        Self::new()
    }
}

impl TextExchange {
    /// No exchange under way.
    pub fn new() -> Self {
        TextExchange {
            next_ttt: 1,
            pending: None,
            partial: None,
            local: None,
        }
    }

    /// The connection's local address: SendTargets names it for a portal that listens on
    /// a wildcard address (same port) instead of leaving that portal out.
    pub fn set_local_address(&mut self, addr: SocketAddr) {
        self.local = Some(addr);
    }

    fn tag(&mut self) -> u32 {
        let t = self.next_ttt;
        self.next_ttt = match t.wrapping_add(1) {
            RESERVED_TAG => 1,
            n => n,
        };
        t
    }

    /// One Text Request (header and data segment) from `initiator`. `scope` is the normal
    /// session's target (SendTargets then names only it, Appendix C) or `None` in a
    /// discovery session (every target the initiator may see). `max_send` is the
    /// initiator's MaxRecvDataSegmentLength.
    pub fn on_request(
        &mut self,
        bhs: &Bhs,
        data: &[u8],
        registry: &Registry,
        initiator: &str,
        scope: Option<&Target>,
        max_send: u32,
    ) -> Result<TextReply, DiscoveryError> {
        let cont = bhs.continue_bit();
        if cont && bhs.final_bit() {
            return Err(DiscoveryError::Flags("Text Request with both F and C"));
        }
        let ttt = bhs.ttt();
        if ttt != RESERVED_TAG {
            if self
                .pending
                .as_ref()
                .is_some_and(|p| p.ttt == ttt && p.itt == bhs.itt())
            {
                return Ok(self.piece(max_send));
            }
            if !self
                .partial
                .as_ref()
                .is_some_and(|p| p.ttt == ttt && p.itt == bhs.itt())
            {
                return Err(DiscoveryError::Ttt(ttt));
            }
        } else {
            // §11.10.4: a reserved TTT starts a new exchange; an old one is dropped.
            self.pending = None;
            self.partial = None;
        }
        let mut partial = self.partial.take().unwrap_or(Partial {
            itt: bhs.itt(),
            ttt: RESERVED_TAG,
            text: Vec::new(),
        });
        if partial.text.len() + data.len() > TEXT_LEN_MAX {
            return Err(DiscoveryError::Text(TextError::TooLong));
        }
        partial.text.extend_from_slice(data);
        if cont {
            // More request text follows: an empty response with a tag to continue with.
            partial.ttt = self.tag();
            let ttt = partial.ttt;
            self.partial = Some(partial);
            return Ok(TextReply {
                final_: false,
                cont: false,
                ttt,
                data: Vec::new(),
            });
        }
        let pairs = text::parse(&partial.text)?;
        let mut t = TextBuilder::new();
        for (k, v) in pairs.iter() {
            match *k {
                "SendTargets" => send_targets(registry, initiator, scope, self.local, v, &mut t),
                _ => {
                    t.push(k, "NotUnderstood");
                }
            }
        }
        self.pending = Some(Pending {
            itt: bhs.itt(),
            ttt: RESERVED_TAG,
            text: t.into_bytes(),
            sent: 0,
        });
        Ok(self.piece(max_send))
    }

    /// The next piece of the pending answer (§11.11: F=0, C=1 and a TTT while more
    /// follows).
    fn piece(&mut self, max_send: u32) -> TextReply {
        let Some(mut p) = self.pending.take() else {
            return TextReply {
                final_: true,
                cont: false,
                ttt: RESERVED_TAG,
                data: Vec::new(),
            };
        };
        let max = (max_send as usize).max(1);
        let end = (p.sent + max).min(p.text.len());
        let data = p.text[p.sent..end].to_vec();
        p.sent = end;
        if p.sent < p.text.len() {
            p.ttt = self.tag();
            let ttt = p.ttt;
            self.pending = Some(p);
            TextReply {
                final_: false,
                cont: true,
                ttt,
                data,
            }
        } else {
            TextReply {
                final_: true,
                cont: false,
                ttt: RESERVED_TAG,
                data,
            }
        }
    }
}

/// Answers one SendTargets key: `All` (every target the initiator may see; in a normal
/// session its own), an iSCSI name (that target, if visible and in scope), or nothing (the
/// session's target; none in a discovery session). Any other value is answered `Reject`.
fn send_targets(
    registry: &Registry,
    initiator: &str,
    scope: Option<&Target>,
    local: Option<SocketAddr>,
    v: &str,
    t: &mut TextBuilder,
) {
    let in_scope = |tg: &Target| scope.is_none_or(|s| s.name().eq_ignore_ascii_case(tg.name()));
    let targets: Vec<Arc<Target>> = match v {
        "All" => registry
            .visible_to(initiator)
            .into_iter()
            .filter(|tg| in_scope(tg))
            .collect(),
        "" => scope
            .and_then(|s| registry.target(s.name()))
            .into_iter()
            .collect(),
        name if check_name(name).is_ok() => registry
            .target(name)
            .filter(|tg| registry.may_access(initiator, tg) && in_scope(tg))
            .into_iter()
            .collect(),
        _ => {
            t.push("SendTargets", "Reject");
            return;
        }
    };
    // A wildcard listener has no address an initiator could use: it is named by the
    // connection's own address when that came in on its port, else left out (without any
    // TargetAddress the initiator reuses the discovery connection's, §13.8).
    let portals: Vec<Portal> = registry
        .portals()
        .into_iter()
        .filter_map(|p| {
            if !p.addr.ip().is_unspecified() {
                return Some(p);
            }
            local
                .filter(|l| l.port() == p.addr.port() && !l.ip().is_unspecified())
                .map(|addr| Portal { addr, tpgt: p.tpgt })
        })
        .collect();
    for tg in targets {
        t.push("TargetName", tg.name());
        for p in &portals {
            t.push("TargetAddress", &p.target_address());
        }
    }
}

/// One discovery session's connection.
#[derive(Debug)]
pub struct Discovery {
    initiator: Arc<str>,
    registry: Arc<Registry>,
    params: SessionParams,
    cid: u16,
    stat_sn: u32,
    exp_cmd_sn: u32,
    text: TextExchange,
    last_error: Option<DiscoveryError>,
}

impl Discovery {
    /// The full-feature phase of the discovery session `est` began.
    pub fn new(est: &Established, registry: Arc<Registry>) -> Self {
        Discovery {
            initiator: est.initiator_name.clone(),
            registry,
            params: est.params,
            cid: est.cid,
            stat_sn: est.stat_sn,
            exp_cmd_sn: est.exp_cmd_sn,
            text: TextExchange::new(),
            last_error: None,
        }
    }

    /// The connection's local address (see [`TextExchange::set_local_address`]).
    pub fn with_local_address(mut self, addr: SocketAddr) -> Self {
        self.text.set_local_address(addr);
        self
    }

    /// How received PDUs are framed on this connection.
    pub fn framing(&self) -> Framing {
        self.params.framing()
    }

    /// Why the last PDU was rejected.
    pub fn last_error(&self) -> Option<&DiscoveryError> {
        self.last_error.as_ref()
    }

    fn max_cmd_sn(&self) -> u32 {
        self.exp_cmd_sn.wrapping_add(DISCOVERY_CMD_WINDOW - 1)
    }

    fn next_stat_sn(&mut self) -> u32 {
        let s = self.stat_sn;
        self.stat_sn = s.wrapping_add(1);
        s
    }

    /// One framed full-feature PDU (`frame` from [`pdu::frame`] over `buf`); appends the
    /// responses (with the negotiated digests) to `out`.
    pub fn on_pdu(&mut self, frame: &Frame, buf: &[u8], out: &mut Vec<u8>) -> DiscoveryStep {
        let bhs = &frame.bhs;
        let Some(data) = buf.get(frame.data.clone()) else {
            return DiscoveryStep::Close;
        };
        // §3.2.2.1: a non-immediate request in order advances ExpCmdSN; discovery is
        // lenient about the rest (no tasks to protect).
        if !bhs.immediate()
            && bhs.cmdsn() == self.exp_cmd_sn
            && matches!(
                bhs.opcode(),
                opcode::TEXT_REQ | opcode::LOGOUT_REQ | opcode::NOP_OUT
            )
        {
            self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
        }
        let r = match bhs.opcode() {
            opcode::TEXT_REQ => {
                let max_send = self.params.max_send_data_segment;
                self.text
                    .on_request(bhs, data, &self.registry, &self.initiator, None, max_send)
                    .map(|reply| {
                        let mut b = [0u8; BHS_LEN];
                        let (e, m) = (self.exp_cmd_sn, self.max_cmd_sn());
                        reply.response(bhs, self.next_stat_sn(), e, m).write(&mut b);
                        pdu::append_pdu(out, &b, &reply.data, &self.framing());
                        DiscoveryStep::Continue
                    })
            }
            opcode::NOP_OUT => {
                self.nop(bhs, data, out);
                Ok(DiscoveryStep::Continue)
            }
            opcode::LOGOUT_REQ => Ok(self.logout(bhs, out)),
            op => Err(DiscoveryError::Opcode(op)),
        };
        match r {
            Ok(step) => step,
            Err(e) => {
                tracing::debug!(error = %e, "discovery session rejects a PDU");
                self.reject(bhs, e.reject_reason(), out);
                self.last_error = Some(e);
                DiscoveryStep::Continue
            }
        }
    }

    /// Appends a Reject of `bhs` (for instance after a data digest error, reason 0x02).
    pub fn reject(&mut self, bhs: &Bhs, reason: u8, out: &mut Vec<u8>) {
        let mut b = [0u8; BHS_LEN];
        Reject::of_header(
            reason,
            self.next_stat_sn(),
            self.exp_cmd_sn,
            self.max_cmd_sn(),
        )
        .write(&mut b);
        pdu::append_pdu(out, &b, bhs.as_bytes(), &self.framing());
    }

    fn nop(&mut self, bhs: &Bhs, data: &[u8], out: &mut Vec<u8>) {
        if bhs.itt() == RESERVED_TAG {
            // An answer to a target ping (none are sent here) or a bare ExpStatSN update.
            return;
        }
        let echo = &data[..data.len().min(self.params.max_send_data_segment as usize)];
        let mut b = [0u8; BHS_LEN];
        NopIn::echo(
            bhs,
            echo.len() as u32,
            self.next_stat_sn(),
            self.exp_cmd_sn,
            self.max_cmd_sn(),
        )
        .write(&mut b);
        pdu::append_pdu(out, &b, echo, &self.framing());
    }

    fn logout(&mut self, bhs: &Bhs, out: &mut Vec<u8>) -> DiscoveryStep {
        let answer = LogoutResponse::to_request(
            bhs,
            self.cid,
            self.next_stat_sn(),
            self.exp_cmd_sn,
            self.max_cmd_sn(),
        );
        let mut b = [0u8; BHS_LEN];
        answer.write(&mut b);
        pdu::append_pdu(out, &b, &[], &self.framing());
        if answer.response == 0 {
            DiscoveryStep::Close
        } else {
            DiscoveryStep::Continue
        }
    }
}

#[cfg(test)]
#[path = "discovery_tests.rs"]
mod tests;
