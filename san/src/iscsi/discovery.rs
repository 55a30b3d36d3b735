//! The full-feature phase of a discovery session (RFC 7143 §4.3, Appendix C): Text
//! requests with SendTargets (answers longer than the initiator's MaxRecvDataSegmentLength
//! continue over several Text Responses, §11.10–11.11), NOP-Out, Logout; every other PDU is
//! rejected. Pure: one framed PDU in, its responses out.

use std::sync::Arc;

use thiserror::Error;

use super::login::Established;
use super::params::SessionParams;
use super::pdu::{
    self, opcode, reject, Bhs, Frame, Framing, LogoutResponse, NopIn, Reject, TextResponse,
    BHS_LEN, RESERVED_TAG,
};
use super::text::{self, TextBuilder, TextError, TEXT_LEN_MAX};
use crate::target::{Registry, Target};

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

/// One discovery session's connection.
#[derive(Debug)]
pub struct Discovery {
    initiator: Arc<str>,
    registry: Arc<Registry>,
    params: SessionParams,
    cid: u16,
    stat_sn: u32,
    exp_cmd_sn: u32,
    next_ttt: u32,
    pending: Option<Pending>,
    partial: Option<Partial>,
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
            next_ttt: 1,
            pending: None,
            partial: None,
            last_error: None,
        }
    }

    /// How received PDUs are framed on this connection.
    pub fn framing(&self) -> Framing {
        Framing {
            header_digest: self.params.header_digest,
            data_digest: self.params.data_digest,
            max_recv_data_segment: self.params.max_recv_data_segment,
        }
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

    fn tag(&mut self) -> u32 {
        let t = self.next_ttt;
        self.next_ttt = match t.wrapping_add(1) {
            RESERVED_TAG => 1,
            n => n,
        };
        t
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
            opcode::TEXT_REQ => self.text(bhs, data, out),
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
                let reason = match e {
                    DiscoveryError::Opcode(_) => reject::PROTOCOL_ERROR,
                    _ => reject::INVALID_PDU_FIELD,
                };
                tracing::debug!(error = %e, "discovery session rejects a PDU");
                self.last_error = Some(e);
                self.reject(bhs, reason, out);
                DiscoveryStep::Continue
            }
        }
    }

    /// Appends a Reject of `bhs` (for instance after a data digest error, reason 0x02).
    pub fn reject(&mut self, bhs: &Bhs, reason: u8, out: &mut Vec<u8>) {
        let mut b = [0u8; BHS_LEN];
        Reject {
            reason,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
            data_sn: 0,
            data_len: BHS_LEN as u32,
        }
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
        NopIn {
            lun: bhs.lun(),
            itt: bhs.itt(),
            ttt: RESERVED_TAG,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
            data_len: echo.len() as u32,
        }
        .write(&mut b);
        pdu::append_pdu(out, &b, echo, &self.framing());
    }

    fn logout(&mut self, bhs: &Bhs, out: &mut Vec<u8>) -> DiscoveryStep {
        // §11.14.1 reasons: 0 close the session, 1 close a connection, 2 remove it for
        // recovery (not supported at ERL 0).
        let (response, step) = match bhs.logout_reason() {
            0 => (0, DiscoveryStep::Close),
            1 if bhs.cid() == self.cid => (0, DiscoveryStep::Close),
            1 => (1, DiscoveryStep::Continue),
            _ => (2, DiscoveryStep::Continue),
        };
        let mut b = [0u8; BHS_LEN];
        LogoutResponse {
            response,
            itt: bhs.itt(),
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
            time2wait: 0,
            time2retain: 0,
        }
        .write(&mut b);
        pdu::append_pdu(out, &b, &[], &self.framing());
        step
    }

    fn text(
        &mut self,
        bhs: &Bhs,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<DiscoveryStep, DiscoveryError> {
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
                self.send_piece(bhs, out);
                return Ok(DiscoveryStep::Continue);
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
            self.text_response(bhs, false, false, ttt, &[], out);
            return Ok(DiscoveryStep::Continue);
        }
        let pairs = text::parse(&partial.text)?;
        let mut t = TextBuilder::new();
        for (k, v) in pairs.iter() {
            match *k {
                "SendTargets" => self.send_targets(v, &mut t),
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
        self.send_piece(bhs, out);
        Ok(DiscoveryStep::Continue)
    }

    /// `SendTargets=All` (every target the initiator may see), `SendTargets=<name>` (that
    /// one, if visible), or empty (nothing: a discovery session has no target of its own).
    fn send_targets(&self, v: &str, t: &mut TextBuilder) {
        let targets: Vec<Arc<Target>> = match v {
            "All" => self.registry.visible_to(&self.initiator),
            "" => Vec::new(),
            name => self
                .registry
                .target(name)
                .filter(|tg| self.registry.may_access(&self.initiator, tg))
                .into_iter()
                .collect(),
        };
        let portals = self.registry.portals();
        for tg in targets {
            t.push("TargetName", tg.name());
            // A wildcard listener has no address an initiator could use: leaving
            // TargetAddress out tells it to reuse the discovery connection's (§13.8).
            for p in portals.iter().filter(|p| !p.addr.ip().is_unspecified()) {
                t.push("TargetAddress", &p.target_address());
            }
        }
    }

    /// Sends the next piece of the pending response (§11.11: F=0, C=1 and a TTT while
    /// more follows).
    fn send_piece(&mut self, bhs: &Bhs, out: &mut Vec<u8>) {
        let Some(mut p) = self.pending.take() else {
            return;
        };
        let max = (self.params.max_send_data_segment as usize).max(1);
        let end = (p.sent + max).min(p.text.len());
        let piece = p.text[p.sent..end].to_vec();
        p.sent = end;
        if p.sent < p.text.len() {
            p.ttt = self.tag();
            let ttt = p.ttt;
            self.pending = Some(p);
            self.text_response(bhs, false, true, ttt, &piece, out);
        } else {
            self.text_response(bhs, true, false, RESERVED_TAG, &piece, out);
        }
    }

    fn text_response(
        &mut self,
        bhs: &Bhs,
        final_: bool,
        cont: bool,
        ttt: u32,
        data: &[u8],
        out: &mut Vec<u8>,
    ) {
        let mut b = [0u8; BHS_LEN];
        TextResponse {
            final_,
            cont,
            lun: bhs.lun(),
            itt: bhs.itt(),
            ttt,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
            data_len: data.len() as u32,
        }
        .write(&mut b);
        pdu::append_pdu(out, &b, data, &self.framing());
    }
}

#[cfg(test)]
#[path = "discovery_tests.rs"]
mod tests;
