//! Executing a validated command: dispatch (in place, or as a query plan for the server) and
//! the checks before a change (authorization of the source and its peer address).

use super::*;

impl Registry {
    // --- execution ----------------------------------------------------------------------------

    /// Executes a validated command from `p.source` at an unknown address (see
    /// [`Peer::unknown`]): what a fuzzer or a test without a socket uses.
    pub fn execute(&mut self, p: &Parsed, now_secs: u64) -> Result<Outcome, RegistryError> {
        self.execute_from(p, &Peer::unknown(), now_secs)
    }

    /// Executes a validated command from `p.source`, received from `peer`, after checking
    /// that the source may do it (see the module documentation). Encodes query replies
    /// in place (see [`Registry::execute_planned`] for the server's way).
    pub fn execute_from(
        &mut self,
        p: &Parsed,
        peer: &Peer,
        now_secs: u64,
    ) -> Result<Outcome, RegistryError> {
        match self.execute_planned(p, peer, now_secs)? {
            Executed::Done(out) => Ok(out),
            Executed::Query(plan) => Ok(Outcome {
                reply: plan.encode(&mut |_| Ok(()))?,
                ..Default::default()
            }),
        }
    }

    /// Like [`Registry::execute_from`], but a DevAttrQry over entities comes back as a
    /// [`QueryPlan`] to encode after the registry lock is released.
    pub fn execute_planned(
        &mut self,
        p: &Parsed,
        peer: &Peer,
        now_secs: u64,
    ) -> Result<Executed, RegistryError> {
        let dd_change = matches!(
            p.command,
            Command::DdReg { .. }
                | Command::DdDereg { .. }
                | Command::DdsReg { .. }
                | Command::DdsDereg { .. }
        );
        if dd_change && !self.is_control(&p.source, peer) {
            return Err(RegistryError::Unauthorized(
                p.source.clone(),
                "discovery domains are changed by control nodes only",
            ));
        }
        // Only the owner's messages refresh its registration period.
        if let Some(eid) = self.node_eid.get(&p.source) {
            if self
                .entities
                .get(eid)
                .is_some_and(|e| e.peer.is_none() || e.peer == peer.addr)
            {
                self.touch(&p.source, now_secs);
            }
        }
        let out = match &p.command {
            Command::DevAttrReg {
                key,
                replace,
                entity,
                objects,
            } => self.register(&p.source, peer, key, *replace, entity, objects, now_secs),
            Command::DevAttrQry(q) => {
                let scope = self.checked_scope(&p.source, peer)?;
                return self.query(&scope, q);
            }
            Command::DevGetNext(q) => {
                let scope = self.checked_scope(&p.source, peer)?;
                self.get_next(&scope, q)
            }
            Command::DevDereg {
                eids,
                nodes,
                portals,
            } => {
                self.check_dereg(&p.source, peer, eids, nodes, portals)?;
                Ok(self.deregister(eids, nodes, portals))
            }
            Command::ScnReg { node, bitmap } => {
                self.check_scn(&p.source, peer, node, Some(*bitmap))?;
                self.scn_register(node, Some(*bitmap))
            }
            Command::ScnDereg { node } => {
                self.check_scn(&p.source, peer, node, None)?;
                self.scn_register(node, None)
            }
            Command::DdReg {
                key,
                id,
                name,
                features,
                members,
            } => self.dd_register(*key, *id, name.as_deref(), *features, members),
            Command::DdDereg { id, members } => self.dd_deregister(*id, members),
            Command::DdsReg {
                key,
                id,
                name,
                enabled,
                dds,
            } => self.dds_register(*key, *id, name.as_deref(), *enabled, dds),
            Command::DdsDereg { id, dds } => self.dds_deregister(*id, dds),
        };
        out.map(Executed::Done)
    }

    /// The scope of a querying source. An unregistered source is answered from its DD
    /// memberships (a DD may name nodes before they register); with no DD and no default
    /// DD it has nothing to see and is told so (open-iscsi then registers and retries).
    pub(super) fn checked_scope(&self, source: &str, peer: &Peer) -> Result<Scope, RegistryError> {
        let mut s = self.scope_for(source);
        s.control = self.is_control(source, peer);
        if self.node(source).is_none() && s.dds.is_empty() && !self.policy.default_dd {
            return Err(RegistryError::SourceUnknown(source.to_owned()));
        }
        Ok(s)
    }

    /// RFC 4171 §5.6.5.4: a DevDereg may remove only objects of the source's own entity
    /// (or come from a control node). Checked for every named object before any is removed.
    pub(super) fn check_dereg(
        &self,
        source: &str,
        peer: &Peer,
        eids: &[String],
        nodes: &[String],
        portals: &[(Ipv6Addr, u32)],
    ) -> Result<(), RegistryError> {
        let owners = eids
            .iter()
            .cloned()
            .chain(nodes.iter().filter_map(|n| self.node_eid.get(n).cloned()))
            .chain(
                portals
                    .iter()
                    .filter_map(|k| self.portal_eid.get(k).cloned()),
            );
        for eid in owners {
            if let Some(e) = self.entities.get(&eid) {
                if !self.may_change(source, peer, e, &[]) {
                    return Err(RegistryError::Unauthorized(
                        source.to_owned(),
                        "it may deregister only objects of its own entity",
                    ));
                }
            }
        }
        Ok(())
    }

    /// SCN registrations: for nodes of the source's own entity; the management bit only for
    /// control nodes (RFC 4171 §6.4.4).
    pub(super) fn check_scn(
        &self,
        source: &str,
        peer: &Peer,
        node: &str,
        bitmap: Option<u32>,
    ) -> Result<(), RegistryError> {
        if let Some((e, _)) = self.node(node) {
            if !self.may_change(source, peer, e, &[]) {
                return Err(RegistryError::Unauthorized(
                    source.to_owned(),
                    "it may register SCNs only for nodes of its own entity",
                ));
            }
        }
        let mgmt = bitmap.is_some_and(|b| normalize_scn_bitmap(b) & scn::MANAGEMENT != 0);
        if mgmt && !self.is_control(source, peer) {
            return Err(RegistryError::ScnRejected(
                "management SCNs are for control nodes only",
            ));
        }
        Ok(())
    }
}
