//! Operational negotiation of the login (RFC 7143 §6.2 and §13): the target's answers to
//! each key the initiator offers, the keys the target must propose itself, and the Login
//! Responses (success and failure) on the wire.

use std::sync::atomic::Ordering;

use super::*;

/// Keys that do not apply to discovery sessions (§13: "Irrelevant when SessionType=Discovery").
const DISCOVERY_IRRELEVANT: &[&str] = &[
    "InitialR2T",
    "ImmediateData",
    "MaxBurstLength",
    "FirstBurstLength",
    "MaxOutstandingR2T",
    "DataPDUInOrder",
    "DataSequenceInOrder",
];

/// A numerical value within `min..=max`.
fn num_in(v: &str, min: u64, max: u64) -> Option<u64> {
    parse_num(v).filter(|n| (min..=max).contains(n))
}

impl Login {
    /// Answers one operational key (or records a declaration, or answers a proposal).
    pub(super) fn operational(&mut self, k: &str, v: &str, out: &mut TextBuilder) {
        if self.kind == SessionKind::Discovery && DISCOVERY_IRRELEVANT.contains(&k) {
            out.push(k, "Irrelevant");
            return;
        }
        let offer = self.cfg.offer;
        let p = &mut self.params;
        let seg = (u64::from(DATA_SEGMENT_MIN), u64::from(DATA_SEGMENT_MAX));
        match k {
            "HeaderDigest" | "DataDigest" => {
                let pick = v
                    .split(',')
                    .find(|d| *d == "None" || (*d == "CRC32C" && offer.digests));
                match pick {
                    Some(d) => {
                        let on = d == "CRC32C";
                        if k == "HeaderDigest" {
                            p.header_digest = on;
                        } else {
                            p.data_digest = on;
                        }
                        out.push(k, d);
                    }
                    None => {
                        out.push(k, "Reject");
                    }
                }
            }
            "MaxRecvDataSegmentLength" => match num_in(v, seg.0, seg.1) {
                // Declarative: the initiator's limit bounds what the target sends; the
                // target declares its own in return.
                Some(n) => {
                    p.max_send_data_segment = n as u32;
                    if !self.declared_mrdsl {
                        out.push(k, &p.max_recv_data_segment.to_string());
                        self.declared_mrdsl = true;
                    }
                }
                None => {
                    // The initiator assumes the default for the target's limit then; no
                    // second MaxRecvDataSegmentLength may follow in this response.
                    p.max_recv_data_segment = SessionParams::default().max_recv_data_segment;
                    self.declared_mrdsl = true;
                    out.push(k, "Reject");
                }
            },
            "MaxConnections" => match num_in(v, 1, 65535) {
                Some(n) => {
                    p.max_connections = n.min(1) as u16;
                    out.push(k, &p.max_connections.to_string());
                }
                None => {
                    out.push(k, "Reject");
                }
            },
            "ErrorRecoveryLevel" => match num_in(v, 0, 2) {
                Some(_) => {
                    p.error_recovery_level = 0;
                    out.push(k, "0");
                }
                None => {
                    out.push(k, "Reject");
                }
            },
            "DefaultTime2Wait" => match num_in(v, 0, TIME2_MAX) {
                Some(n) => {
                    // Max-negotiated: never shorter than the target's default.
                    let r = n.max(u64::from(SessionParams::default().default_time2wait));
                    p.default_time2wait = r as u16;
                    out.push(k, &r.to_string());
                }
                None => {
                    out.push(k, "Reject");
                }
            },
            "DefaultTime2Retain" => match num_in(v, 0, TIME2_MAX) {
                Some(n) => {
                    let r = n.min(u64::from(SessionParams::default().default_time2retain));
                    p.default_time2retain = r as u16;
                    out.push(k, &r.to_string());
                }
                None => {
                    out.push(k, "Reject");
                }
            },
            "InitialR2T" => match parse_bool(v) {
                Some(b) => {
                    // OR: Yes wins.
                    p.initial_r2t = b || offer.initial_r2t;
                    out.push(k, yes_no(p.initial_r2t));
                }
                None => {
                    out.push(k, "Reject");
                }
            },
            "ImmediateData" => {
                let answer = self.proposed.has(KeySet::IMMEDIATE_DATA);
                self.sent.add(KeySet::IMMEDIATE_DATA);
                match parse_bool(v) {
                    Some(b) => {
                        // AND: No wins.
                        p.immediate_data = b && offer.immediate_data;
                        if !answer {
                            out.push(k, yes_no(p.immediate_data));
                        }
                    }
                    None => {
                        // Negotiated once and failed: the target's limit holds.
                        p.immediate_data &= offer.immediate_data;
                        out.push(k, "Reject");
                    }
                }
            }
            "DataPDUInOrder" | "DataSequenceInOrder" => match parse_bool(v) {
                // OR with the target's Yes: always Yes (the session needs data in order).
                Some(_) => {
                    out.push(k, "Yes");
                }
                None => {
                    out.push(k, "Reject");
                }
            },
            "MaxBurstLength" | "FirstBurstLength" => {
                let (key, limit, value) = if k == "MaxBurstLength" {
                    (KeySet::MAX_BURST, offer.max_burst, &mut p.max_burst)
                } else {
                    (KeySet::FIRST_BURST, offer.first_burst, &mut p.first_burst)
                };
                let limit = limit.max(DATA_SEGMENT_MIN);
                let answer = self.proposed.has(key);
                self.sent.add(key);
                match num_in(v, seg.0, seg.1) {
                    Some(n) => {
                        // Min-negotiated.
                        *value = n.min(u64::from(limit)) as u32;
                        if !answer {
                            out.push(k, &value.to_string());
                        }
                    }
                    None => {
                        // Negotiated once and failed: the target's limit holds.
                        *value = (*value).min(limit);
                        out.push(k, "Reject");
                    }
                }
            }
            "MaxOutstandingR2T" => match num_in(v, 1, 65535) {
                Some(n) => {
                    p.max_outstanding_r2t =
                        n.min(u64::from(offer.max_outstanding_r2t.max(1))) as u32;
                    out.push(k, &p.max_outstanding_r2t.to_string());
                }
                None => {
                    out.push(k, "Reject");
                }
            },
            // §13.26: obsolete markers; "No" is the answer RFC 3720 initiators expect.
            "IFMarker" | "OFMarker" => {
                out.push(k, "No");
            }
            "IFMarkInt" | "OFMarkInt" => {
                out.push(k, "Reject");
            }
            // §13.23: only the RFC 3720 task reporting.
            "TaskReporting" => {
                out.push(k, "RFC3720");
            }
            // RFC 7144: this target implements RFC 7143 (level 1).
            "iSCSIProtocolLevel" => match num_in(v, 0, 31) {
                Some(n) => {
                    out.push(k, &n.min(1).to_string());
                }
                None => {
                    out.push(k, "Reject");
                }
            },
            // The target declares its own (an answer would repeat the key).
            "TargetPortalGroupTag" => {}
            // Keys only a target declares, or only full-feature phase uses.
            "TargetAlias" | "TargetAddress" | "SendTargets" => {
                out.push(k, "Irrelevant");
            }
            _ => {
                out.push(k, "NotUnderstood");
            }
        }
    }

    /// Whether the target must propose keys whose defaults exceed its offer and that the
    /// initiator did not negotiate.
    pub(super) fn needs_proposals(&self) -> bool {
        let o = &self.cfg.offer;
        let both = KeySet(self.sent.0 | self.proposed.0);
        (!o.immediate_data && !both.has(KeySet::IMMEDIATE_DATA))
            || (o.max_burst < DEFAULT_MAX_BURST && !both.has(KeySet::MAX_BURST))
            || (o.first_burst < DEFAULT_FIRST_BURST && !both.has(KeySet::FIRST_BURST))
    }

    /// Proposes those keys (the target is the originator; the initiator's next request
    /// answers them) and applies the values, which can only shrink the defaults.
    pub(super) fn proposals(&mut self, out: &mut TextBuilder) {
        let o = self.cfg.offer;
        let both = KeySet(self.sent.0 | self.proposed.0);
        if !o.immediate_data && !both.has(KeySet::IMMEDIATE_DATA) {
            self.params.immediate_data = false;
            out.push("ImmediateData", "No");
            self.proposed.add(KeySet::IMMEDIATE_DATA);
        }
        if o.max_burst < DEFAULT_MAX_BURST && !both.has(KeySet::MAX_BURST) {
            self.params.max_burst = o.max_burst.max(DATA_SEGMENT_MIN);
            out.push("MaxBurstLength", &self.params.max_burst.to_string());
            self.proposed.add(KeySet::MAX_BURST);
        }
        if o.first_burst < DEFAULT_FIRST_BURST && !both.has(KeySet::FIRST_BURST) {
            self.params.first_burst = o.first_burst.max(DATA_SEGMENT_MIN);
            out.push("FirstBurstLength", &self.params.first_burst.to_string());
            self.proposed.add(KeySet::FIRST_BURST);
        }
    }

    /// The session that begins: a fresh TSIH and the settled parameters.
    pub(super) fn establish(&mut self) -> Established {
        let tsih = loop {
            let t = self.cfg.tsih.fetch_add(1, Ordering::Relaxed);
            if t != 0 {
                break t;
            }
        };
        // §13.14: FirstBurstLength never exceeds MaxBurstLength.
        self.params.first_burst = self.params.first_burst.min(self.params.max_burst);
        self.over = true;
        Established {
            kind: self.kind,
            initiator_name: self.initiator.clone().unwrap_or_else(|| Arc::from("")),
            isid: self.isid,
            tsih,
            cid: self.cid,
            target: self.target.clone(),
            params: self.params,
            exp_cmd_sn: self.exp_cmd_sn,
            stat_sn: self.stat_sn.wrapping_add(1),
            tpgt: self.cfg.portal.tpgt,
        }
    }

    fn max_cmd_sn(&self) -> u32 {
        self.exp_cmd_sn
            .wrapping_add(self.cfg.offer.cmd_window.max(1))
            .wrapping_sub(1)
    }

    /// Appends a successful Login Response.
    pub(super) fn respond(&mut self, bhs: &Bhs, r: &Response, out: &mut Vec<u8>) {
        let mut b = [0u8; BHS_LEN];
        LoginResponse {
            transit: r.transit,
            cont: false,
            csg: r.csg,
            nsg: if r.transit { r.nsg } else { 0 },
            version_max: ISCSI_VERSION,
            version_active: ISCSI_VERSION,
            isid: bhs.isid(),
            tsih: r.tsih,
            itt: bhs.itt(),
            stat_sn: self.stat_sn,
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
            status_class: 0,
            status_detail: 0,
            data_len: r.text.len() as u32,
        }
        .write(&mut b);
        pdu::append_pdu(out, &b, &r.text, &Framing::LOGIN);
        self.stat_sn = self.stat_sn.wrapping_add(1);
    }

    /// Appends a failed Login Response and ends the login.
    pub(super) fn fail(&mut self, bhs: &Bhs, e: LoginError, out: &mut Vec<u8>) -> LoginStep {
        let st = e.status();
        tracing::debug!(error = %e, "iSCSI login failed");
        let mut b = [0u8; BHS_LEN];
        LoginResponse {
            version_max: ISCSI_VERSION,
            version_active: ISCSI_VERSION,
            isid: bhs.isid(),
            itt: bhs.itt(),
            stat_sn: self.stat_sn,
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
            status_class: (st >> 8) as u8,
            status_detail: st as u8,
            ..LoginResponse::default()
        }
        .write(&mut b);
        pdu::append_pdu(out, &b, &[], &Framing::LOGIN);
        self.stat_sn = self.stat_sn.wrapping_add(1);
        self.over = true;
        self.partial = Vec::new();
        if self.error.is_none() {
            self.error = Some(e);
        }
        LoginStep::Failed
    }
}
