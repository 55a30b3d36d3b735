//! The maintenance side of the client: the registration state, the messages that register,
//! check and deregister the entity (built by pure functions), and the maintenance thread's
//! rounds (see the parent module for the policy).

use std::collections::BTreeSet;
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use super::conn::{Conn, Response};
use super::{v6, ClientError, Shared, Timing, ENTITY_PROTOCOL_ISCSI, RETRY_MIN, SCN_BITMAP};
use crate::registry::NODE_TARGET;
use crate::wire::{func, tag, Status, TlvWriter, FLAG_REPLACE};

/// The registration side's state (under one lock: requests to the server are serialised).
#[derive(Debug)]
pub(super) struct State {
    pub(super) targets: BTreeSet<String>,
    pub(super) portals: Vec<(SocketAddr, u16)>,
    pub(super) registered: bool,
    pub(super) conn: Option<Conn>,
    /// Portals as last registered (address as sent, port, tag).
    pub(super) reg_portals: Vec<(Ipv6Addr, u32, u16)>,
    pub(super) failures: u32,
}

#[derive(Debug)]
pub(super) struct Worker {
    pub(super) shared: Arc<Shared>,
    pub(super) state: Mutex<State>,
    pub(super) wake: Condvar,
    pub(super) esi_port: u16,
    pub(super) scn_port: u16,
}

/// What a full registration names besides its portals and targets.
#[derive(Debug)]
pub(super) struct RegistrationParts<'a> {
    pub(super) source: &'a str,
    /// Empty: let the server assign one.
    pub(super) eid: &'a str,
    pub(super) timing: &'a Timing,
    pub(super) esi_port: u16,
    pub(super) scn_port: u16,
}

/// The full registration (sent with REPLACE): entity, portals (with ESI interval, ESI and
/// SCN ports), target nodes, and a portal group per (target, portal). Pure.
pub(super) fn registration(
    p: &RegistrationParts<'_>,
    portals: &[(Ipv6Addr, u32, u16)],
    targets: &BTreeSet<String>,
) -> TlvWriter {
    let mut w = TlvWriter::new();
    w.string(tag::ISCSI_NAME, p.source);
    if p.eid.is_empty() {
        w.nil(tag::EID);
    } else {
        w.string(tag::EID, p.eid);
    }
    w.delimiter();
    if !p.eid.is_empty() {
        w.string(tag::EID, p.eid);
    }
    w.u32(tag::ENTITY_PROTOCOL, ENTITY_PROTOCOL_ISCSI);
    if let Some(period) = p.timing.registration_period_secs {
        w.u32(tag::REGISTRATION_PERIOD, period);
    }
    for (ip, port, _) in portals {
        w.ip(tag::PORTAL_IP, ip);
        w.u32(tag::PORTAL_PORT, *port);
        w.u32(tag::ESI_INTERVAL, p.timing.esi_interval_secs);
        w.u32(tag::ESI_PORT, u32::from(p.esi_port));
        w.u32(tag::SCN_PORT, u32::from(p.scn_port));
    }
    for name in targets {
        w.string(tag::ISCSI_NAME, name);
        w.u32(tag::ISCSI_NODE_TYPE, NODE_TARGET);
    }
    for name in targets {
        write_pgs(&mut w, name, portals);
    }
    w
}

fn write_pgs(w: &mut TlvWriter, target: &str, portals: &[(Ipv6Addr, u32, u16)]) {
    for (ip, port, pgt) in portals {
        w.string(tag::PG_ISCSI_NAME, target);
        w.ip(tag::PG_PORTAL_IP, ip);
        w.u32(tag::PG_PORTAL_PORT, *port);
        w.u32(tag::PG_TAG, u32::from(*pgt));
    }
}

impl Worker {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn run(&self) {
        let mut st = self.lock();
        loop {
            let wait = if st.failures == 0 {
                self.shared.timing.check_interval
            } else {
                let shift = st.failures.saturating_sub(1).min(16);
                RETRY_MIN
                    .saturating_mul(1 << shift)
                    .min(self.shared.timing.check_interval)
            };
            let until = Instant::now() + wait;
            while !self.shared.stopped() {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                st = self
                    .wake
                    .wait_timeout(st, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            if self.shared.stopped() {
                return;
            }
            self.round(&mut st);
        }
    }

    /// One maintenance round: register, or check and re-register.
    pub(super) fn round(&self, st: &mut State) {
        let r = self.sync(st);
        if let Err(e) = &r {
            tracing::warn!(server = %self.shared.server, error = %e, "iSNS round failed");
        }
        let _ = self.note(st, r);
    }

    /// Counts a result; a status error makes the next round register from scratch.
    pub(super) fn note(
        &self,
        st: &mut State,
        r: Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        let r = self.note_inner(st, r);
        self.shared
            .registered
            .store(st.registered, std::sync::atomic::Ordering::SeqCst);
        r
    }

    fn note_inner(&self, st: &mut State, r: Result<(), ClientError>) -> Result<(), ClientError> {
        match &r {
            Ok(()) => st.failures = 0,
            Err(e) => {
                st.failures = st.failures.saturating_add(1);
                self.shared.stats.errors.inc();
                if matches!(e, ClientError::Status { .. }) {
                    st.registered = false;
                }
            }
        }
        r
    }

    fn sync(&self, st: &mut State) -> Result<(), ClientError> {
        if st.targets.is_empty() {
            return Ok(());
        }
        if !st.registered {
            return self.register_all(st);
        }
        if self.check(st)? {
            return Ok(());
        }
        tracing::info!(server = %self.shared.server, eid = %self.shared.eid(),
            "registration missing at the name server; registering again");
        self.register_all(st)
    }

    fn call(
        &self,
        st: &mut State,
        function: u16,
        flags: u16,
        w: &TlvWriter,
    ) -> Result<Response, ClientError> {
        let t = self.shared.timing.io_timeout;
        let conn = match st.conn.as_mut() {
            Some(c) => c,
            None => st.conn.insert(Conn::connect(self.shared.server, t)?),
        };
        let r = conn.call(function, flags, w, t);
        if r.is_err() {
            st.conn = None;
        }
        r
    }

    fn expect_ok(function: u16, r: &Response) -> Result<(), ClientError> {
        if r.status == Status::Success as u32 {
            Ok(())
        } else {
            Err(ClientError::Status {
                function,
                status: r.status,
            })
        }
    }

    /// Registers the whole entity with REPLACE, then each target's SCN registration.
    pub(super) fn register_all(&self, st: &mut State) -> Result<(), ClientError> {
        let Some(source) = st.targets.iter().next().cloned() else {
            return Ok(());
        };
        if st.conn.is_none() {
            st.conn = Some(Conn::connect(
                self.shared.server,
                self.shared.timing.io_timeout,
            )?);
        }
        let local = st.conn.as_ref().and_then(Conn::local_ip);
        let mut portals = Vec::new();
        for (addr, pgt) in &st.portals {
            let ip = if addr.ip().is_unspecified() {
                local.ok_or_else(|| {
                    ClientError::Protocol(
                        "no local address to register for a wildcard portal".into(),
                    )
                })?
            } else {
                addr.ip()
            };
            portals.push((v6(ip), u32::from(addr.port()), *pgt));
        }
        let eid = self.shared.eid();
        let w = registration(
            &RegistrationParts {
                source: &source,
                eid: &eid,
                timing: &self.shared.timing,
                esi_port: self.esi_port,
                scn_port: self.scn_port,
            },
            &portals,
            &st.targets,
        );
        let r = self.call(st, func::DEV_ATTR_REG, FLAG_REPLACE, &w)?;
        Self::expect_ok(func::DEV_ATTR_REG, &r)?;
        // The reply starts with the entity's key: the EID (the server's, if we sent none).
        if let Some(e) = r.tlvs.iter().find(|t| t.tag == tag::EID && !t.is_nil()) {
            let got = e.as_string()?;
            if got != eid {
                *self.shared.eid.write().unwrap_or_else(|p| p.into_inner()) = got;
            }
        }
        st.reg_portals = portals;
        let targets: Vec<String> = st.targets.iter().cloned().collect();
        for name in &targets {
            self.scn_register(st, name)?;
        }
        st.registered = true;
        self.shared.stats.registrations.inc();
        self.shared.bump_generation();
        tracing::info!(server = %self.shared.server, eid = %self.shared.eid(),
            targets = targets.len(), portals = st.reg_portals.len(), "registered with iSNS");
        Ok(())
    }

    fn scn_register(&self, st: &mut State, name: &str) -> Result<(), ClientError> {
        let mut w = TlvWriter::new();
        w.string(tag::ISCSI_NAME, name);
        w.string(tag::ISCSI_NAME, name);
        w.delimiter();
        w.u32(tag::ISCSI_SCN_BITMAP, SCN_BITMAP);
        let r = self.call(st, func::SCN_REG, 0, &w)?;
        Self::expect_ok(func::SCN_REG, &r)
    }

    /// Adds one node (and its portal groups) to the registered entity.
    pub(super) fn register_node(&self, st: &mut State, name: &str) -> Result<(), ClientError> {
        let eid = self.shared.eid();
        let mut w = TlvWriter::new();
        w.string(tag::ISCSI_NAME, name);
        w.string(tag::EID, &eid);
        w.delimiter();
        w.string(tag::ISCSI_NAME, name);
        w.u32(tag::ISCSI_NODE_TYPE, NODE_TARGET);
        let portals = st.reg_portals.clone();
        write_pgs(&mut w, name, &portals);
        let r = self.call(st, func::DEV_ATTR_REG, 0, &w)?;
        Self::expect_ok(func::DEV_ATTR_REG, &r)?;
        self.scn_register(st, name)
    }

    pub(super) fn deregister_node(&self, st: &mut State, name: &str) -> Result<(), ClientError> {
        let mut w = TlvWriter::new();
        w.string(tag::ISCSI_NAME, name);
        w.delimiter();
        w.string(tag::ISCSI_NAME, name);
        let r = self.call(st, func::DEV_DEREG, 0, &w)?;
        Self::expect_ok(func::DEV_DEREG, &r)
    }

    /// DevDereg of the entity, with `source` (one of its nodes) as the source.
    pub(super) fn deregister_entity(
        &self,
        st: &mut State,
        source: &str,
    ) -> Result<(), ClientError> {
        let eid = self.shared.eid();
        let mut w = TlvWriter::new();
        w.string(tag::ISCSI_NAME, source);
        w.delimiter();
        w.string(tag::EID, &eid);
        let r = self.call(st, func::DEV_DEREG, 0, &w)?;
        Self::expect_ok(func::DEV_DEREG, &r)?;
        st.registered = false;
        self.shared.bump_generation();
        tracing::info!(server = %self.shared.server, %eid, "deregistered from iSNS");
        Ok(())
    }

    /// Whether the server still has our entity with every portal and target. Ok(false):
    /// register again.
    fn check(&self, st: &mut State) -> Result<bool, ClientError> {
        let Some(source) = st.targets.iter().next().cloned() else {
            return Ok(true);
        };
        let mut w = TlvWriter::new();
        w.string(tag::ISCSI_NAME, &source);
        w.string(tag::EID, &self.shared.eid());
        w.delimiter();
        w.nil(tag::PORTAL_IP);
        w.nil(tag::PORTAL_PORT);
        w.nil(tag::ISCSI_NAME);
        let r = self.call(st, func::DEV_ATTR_QRY, 0, &w)?;
        self.shared.stats.checks.inc();
        if r.status == Status::SourceUnknown as u32 || r.status == Status::NoSuchEntry as u32 {
            return Ok(false);
        }
        Self::expect_ok(func::DEV_ATTR_QRY, &r)?;
        let ops = r.operating();
        let mut names = BTreeSet::new();
        let mut portals = BTreeSet::new();
        for (i, t) in ops.iter().enumerate() {
            match t.tag {
                tag::ISCSI_NAME if !t.is_nil() => {
                    names.insert(t.as_string()?);
                }
                tag::PORTAL_IP if !t.is_nil() => {
                    if let Some(p) = ops.get(i + 1).filter(|p| p.tag == tag::PORTAL_PORT) {
                        portals.insert((
                            crate::command::normalize_ip(t.as_ip()?),
                            p.as_u32()? & 0xffff,
                        ));
                    }
                }
                _ => {}
            }
        }
        for (ip, port, _) in &st.reg_portals {
            if !portals.contains(&(crate::command::normalize_ip(*ip), *port & 0xffff)) {
                return Ok(false);
            }
        }
        // Targets in discovery domains apart do not see each other: those missing from the
        // entity's answer are asked for one by one, each as its own source (a node always
        // sees itself).
        let missing: Vec<String> = st
            .targets
            .iter()
            .filter(|t| !names.contains(*t))
            .cloned()
            .collect();
        for name in missing {
            let mut w = TlvWriter::new();
            w.string(tag::ISCSI_NAME, &name);
            w.string(tag::ISCSI_NAME, &name);
            w.delimiter();
            w.nil(tag::ISCSI_NODE_TYPE);
            let r = self.call(st, func::DEV_ATTR_QRY, 0, &w)?;
            if r.status != Status::Success as u32 {
                return Ok(false);
            }
            let found = r
                .operating()
                .iter()
                .any(|t| t.tag == tag::ISCSI_NAME && t.as_string().is_ok_and(|n| n == name));
            if !found {
                return Ok(false);
            }
        }
        Ok(true)
    }
}
