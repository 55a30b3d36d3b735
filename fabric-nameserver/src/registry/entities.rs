//! The life of network entities: registration (entity, portals, nodes, portal groups),
//! refresh, deregistration, registration-period expiry, ESI bookkeeping, administrative
//! removal, the default-DD policy and SCN registration.

use super::*;

impl Registry {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn register(
        &mut self,
        source: &str,
        peer: &Peer,
        key: &RegKey,
        replace: bool,
        attrs: &EntityAttrs,
        objects: &[RegObject],
        now_secs: u64,
    ) -> Result<Outcome, RegistryError> {
        // Which entity: the key, else the EID among the operating attributes, else the
        // source's own entity, else a new one.
        let key_eid =
            match key {
                RegKey::Eid(e) if !e.is_empty() => Some(e.clone()),
                RegKey::Eid(_) | RegKey::None => None,
                RegKey::Node(n) => {
                    Some(self.node_eid.get(n).cloned().ok_or_else(|| {
                        RegistryError::InvalidRegistration(format!("no node {n}"))
                    })?)
                }
                RegKey::Portal(ip, port) => {
                    Some(self.portal_eid.get(&(*ip, *port)).cloned().ok_or_else(|| {
                        RegistryError::InvalidRegistration("no such portal".into())
                    })?)
                }
            };
        let eid = key_eid
            .or_else(|| attrs.eid.clone().filter(|e| !e.is_empty()))
            .or_else(|| self.node_eid.get(source).cloned())
            // A client re-registering after deregistering its nodes (its portals kept the
            // entity alive) means that entity: its portals cannot move to another one.
            .or_else(|| {
                objects.iter().find_map(|o| match o {
                    RegObject::Portal(p) => self.portal_eid.get(&(p.ip?, p.port?)).cloned(),
                    _ => None,
                })
            });
        let eid = match eid {
            Some(e) => e,
            None => loop {
                let n = self.counters.next_eid;
                self.counters.next_eid += 1;
                let e = format!("strata.entity.{n:06}");
                if !self.entities.contains_key(&e) {
                    break e;
                }
            },
        };
        let old = self.entities.get(&eid).map(|e| (**e).clone());
        let joining: Vec<&str> = objects
            .iter()
            .filter_map(|o| match o {
                RegObject::Node(n) => Some(n.name.as_str()),
                _ => None,
            })
            .collect();
        let control = self.is_control(source, peer);
        match &old {
            Some(o) if !self.may_change(source, peer, o, &joining) => {
                return Err(RegistryError::Unauthorized(
                    source.to_owned(),
                    "it may update only its own entity, from the address that registered it",
                ))
            }
            // RFC 4171 §5.6.5.1: a new entity is registered by one of its own nodes.
            None if !control && !joining.contains(&source) => {
                return Err(RegistryError::Unauthorized(
                    source.to_owned(),
                    "a new entity must contain the source node",
                ))
            }
            _ => {}
        }
        for o in objects {
            if let RegObject::Node(n) = o {
                // A pinned control node's name is registered only from its address (else a
                // look-alike would receive its unscoped SCNs).
                if let Some(Some(pin)) = self.control_nodes.get(&n.name) {
                    if peer.addr != Some(pin.to_canonical()) {
                        return Err(RegistryError::Unauthorized(
                            source.to_owned(),
                            "a pinned control node registers from its own address only",
                        ));
                    }
                }
                if n.node_type.is_some_and(|t| t & NODE_CONTROL != 0)
                    && !self.control_nodes.contains_key(&n.name)
                {
                    return Err(RegistryError::Unauthorized(
                        source.to_owned(),
                        "control-node status is granted by the administrator only",
                    ));
                }
            }
        }
        if old.is_none() && self.entities.len() >= MAX_NODES {
            return Err(RegistryError::Full("entities"));
        }
        let mut e = old.clone().unwrap_or_else(|| Entity {
            eid: eid.clone(),
            protocol: 2,
            index: 0,
            mgmt_ip: None,
            period_secs: 0,
            timestamp_secs: 0,
            portals: Vec::new(),
            nodes: Vec::new(),
            pgs: Vec::new(),
            refreshed_secs: now_secs,
            peer: None,
        });
        // The registering peer becomes the entity's owner and SCN/ESI address; a control
        // node updating another host's entity leaves that address alone.
        if old.is_none() || !control {
            e.peer = peer.addr;
        }
        if e.index == 0 {
            e.index = self.alloc_index();
        }
        if old.is_none() {
            e.period_secs = self.default_period_secs;
        }
        if replace {
            e.portals.clear();
            e.nodes.clear();
            e.pgs.clear();
        }
        if let Some(p) = attrs.protocol {
            e.protocol = p;
        }
        if let Some(ip) = attrs.mgmt_ip {
            e.mgmt_ip = Some(ip);
        }
        if let Some(p) = attrs.period_secs {
            e.period_secs = if p == 0 {
                0
            } else {
                p.clamp(MIN_REGISTRATION_PERIOD_SECS, MAX_REGISTRATION_PERIOD_SECS)
            };
        }
        e.timestamp_secs = now_secs;
        e.refreshed_secs = now_secs;
        let mut new_nodes = 0usize;
        for o in objects {
            match o {
                RegObject::Portal(pa) => {
                    let (Some(ip), Some(port)) = (pa.ip, pa.port) else {
                        return Err(RegistryError::InvalidRegistration("portal key".into()));
                    };
                    if let Some(other) = self.portal_eid.get(&(ip, port)) {
                        if *other != eid {
                            return Err(RegistryError::InvalidRegistration(format!(
                                "portal {ip} {port} belongs to entity {other}"
                            )));
                        }
                    }
                    let idx = match e.portals.iter().position(|p| p.ip == ip && p.port == port) {
                        Some(i) => i,
                        None => {
                            let index = old
                                .as_ref()
                                .and_then(|o| {
                                    o.portals.iter().find(|p| p.ip == ip && p.port == port)
                                })
                                .map(|p| p.index)
                                .unwrap_or_else(|| self.alloc_index());
                            e.portals.push(Portal {
                                ip,
                                port,
                                index,
                                symbolic_name: None,
                                esi_interval_secs: None,
                                esi_port: None,
                                scn_port: None,
                                security_bitmap: None,
                            });
                            e.portals.len() - 1
                        }
                    };
                    let p = &mut e.portals[idx];
                    if pa.symbolic_name.is_some() {
                        p.symbolic_name.clone_from(&pa.symbolic_name);
                    }
                    p.esi_interval_secs = pa.esi_interval_secs.or(p.esi_interval_secs);
                    p.esi_port = pa.esi_port.or(p.esi_port);
                    p.scn_port = pa.scn_port.or(p.scn_port);
                    p.security_bitmap = pa.security_bitmap.or(p.security_bitmap);
                }
                RegObject::Node(na) => {
                    if let Some(other) = self.node_eid.get(&na.name) {
                        if *other != eid {
                            return Err(RegistryError::InvalidRegistration(format!(
                                "node {} belongs to entity {other}",
                                na.name
                            )));
                        }
                    }
                    let idx = match e.nodes.iter().position(|n| n.name == na.name) {
                        Some(i) => i,
                        None => {
                            let prev = old
                                .as_ref()
                                .and_then(|o| o.nodes.iter().find(|n| n.name == na.name));
                            let Some(node_type) = na.node_type.or(prev.map(|n| n.node_type)) else {
                                return Err(RegistryError::InvalidRegistration(format!(
                                    "new node {} without a node type",
                                    na.name
                                )));
                            };
                            if prev.is_none() {
                                new_nodes += 1;
                            }
                            let index = prev.map(|n| n.index).unwrap_or_else(|| self.alloc_index());
                            e.nodes.push(Node {
                                name: na.name.clone(),
                                node_type,
                                index,
                                alias: None,
                                scn_bitmap: prev.and_then(|n| n.scn_bitmap),
                                auth_method: None,
                            });
                            e.nodes.len() - 1
                        }
                    };
                    let n = &mut e.nodes[idx];
                    if let Some(t) = na.node_type {
                        n.node_type = t;
                    }
                    if na.alias.is_some() {
                        n.alias.clone_from(&na.alias);
                    }
                    if na.auth_method.is_some() {
                        n.auth_method.clone_from(&na.auth_method);
                    }
                    if let Some(b) = na.scn_bitmap {
                        n.scn_bitmap = Some(b);
                    }
                }
                RegObject::PortalGroup(ga) => {
                    let (Some(name), Some(ip), Some(port)) = (ga.node_name.clone(), ga.ip, ga.port)
                    else {
                        return Err(RegistryError::InvalidRegistration("PG key".into()));
                    };
                    match e
                        .pgs
                        .iter_mut()
                        .find(|g| g.node_name == name && g.ip == ip && g.port == port)
                    {
                        Some(g) => g.tag = ga.tag,
                        None => {
                            let index = self.alloc_index();
                            e.pgs.push(PortalGroup {
                                node_name: name,
                                ip,
                                port,
                                index,
                                tag: ga.tag,
                            });
                        }
                    }
                }
            }
        }
        if e.children() > MAX_OBJECTS_PER_ENTITY {
            return Err(RegistryError::Full("objects per entity"));
        }
        if self.node_eid.len() + new_nodes > MAX_NODES {
            return Err(RegistryError::Full("nodes"));
        }
        let new_esi = e
            .portals
            .iter()
            .filter(|p| p.esi_monitored() && !self.esi_portals.contains_key(&(p.ip, p.port)))
            .count();
        if new_esi > 0 && self.esi_portals.len() + new_esi > crate::esi::MAX_ESI_PORTALS {
            return Err(RegistryError::EsiNotAvailable);
        }
        // SCN: removed (by REPLACE), added and updated nodes.
        let mut out = Outcome::default();
        let old_nodes: Vec<Node> = old.as_ref().map(|o| o.nodes.clone()).unwrap_or_default();
        for n in &old_nodes {
            if !e.nodes.iter().any(|m| m.name == n.name) {
                self.object_event(&mut out, n, scn::OBJECT_REMOVED);
            }
        }
        let updated: Vec<(Node, bool)> = e
            .nodes
            .iter()
            .map(|n| (n.clone(), old_nodes.iter().any(|m| m.name == n.name)))
            .collect();
        self.commit(&mut out, Mutation::PutEntity(e.clone()));
        for (n, existed) in &updated {
            let bit = if *existed {
                scn::OBJECT_UPDATED
            } else {
                scn::OBJECT_ADDED
            };
            self.object_event(&mut out, n, bit);
        }
        let mut w = TlvWriter::response(Status::Success);
        w.string(tag::EID, &eid);
        w.delimiter();
        if let Some(e) = self.entities.get(&eid) {
            encode_entity(&mut w, e, None);
            for n in &e.nodes {
                encode_node(&mut w, n, None);
            }
            for p in &e.portals {
                encode_portal(&mut w, p, None);
            }
            for g in &e.pgs {
                encode_pg(&mut w, g, None);
            }
        }
        out.reply = w;
        Ok(out)
    }

    pub(super) fn deregister(
        &mut self,
        eids: &[String],
        nodes: &[String],
        portals: &[(Ipv6Addr, u32)],
    ) -> Outcome {
        // Deregistering what is not registered succeeds: the client's intent holds.
        let mut out = Outcome::default();
        for eid in eids {
            self.remove_entity(&mut out, eid);
        }
        for name in nodes {
            let Some(eid) = self.node_eid.get(name).cloned() else {
                continue;
            };
            let Some(mut e) = self.entities.get(&eid).map(|e| (**e).clone()) else {
                continue;
            };
            if let Some(n) = e.nodes.iter().find(|n| n.name == *name).cloned() {
                self.object_event(&mut out, &n, scn::OBJECT_REMOVED);
            }
            e.nodes.retain(|n| n.name != *name);
            e.pgs.retain(|g| g.node_name != *name);
            self.put_or_remove(&mut out, e);
        }
        for key in portals {
            let Some(eid) = self.portal_eid.get(key).cloned() else {
                continue;
            };
            let Some(mut e) = self.entities.get(&eid).map(|e| (**e).clone()) else {
                continue;
            };
            e.portals.retain(|p| (p.ip, p.port) != *key);
            e.pgs.retain(|g| (g.ip, g.port) != *key);
            self.put_or_remove(&mut out, e);
        }
        let mut w = TlvWriter::response(Status::Success);
        w.delimiter();
        out.reply = w;
        out
    }

    /// RFC 4171 §5.6.5.4: an entity left with no nodes and no portals is removed too.
    pub(super) fn put_or_remove(&mut self, out: &mut Outcome, e: Entity) {
        if e.nodes.is_empty() && e.portals.is_empty() {
            self.commit(out, Mutation::RemoveEntity(e.eid));
        } else {
            self.commit(out, Mutation::PutEntity(e));
        }
    }

    pub(super) fn remove_entity(&mut self, out: &mut Outcome, eid: &str) {
        let Some(e) = self.entities.get(eid).cloned() else {
            return;
        };
        for n in &e.nodes {
            self.object_event(out, n, scn::OBJECT_REMOVED);
        }
        self.commit(out, Mutation::RemoveEntity(eid.to_owned()));
    }

    /// Removes entities whose registration period elapsed without a refresh.
    pub fn expire(&mut self, now_secs: u64) -> Outcome {
        let expired: Vec<String> = self
            .entities
            .values()
            .filter(|e| e.period_secs > 0 && e.refreshed_secs + u64::from(e.period_secs) < now_secs)
            .map(|e| e.eid.clone())
            .collect();
        let mut out = Outcome::default();
        for eid in expired {
            tracing::info!(%eid, "registration period elapsed, entity removed");
            self.remove_entity(&mut out, &eid);
        }
        out
    }

    /// How many portals ESI monitors.
    pub fn esi_portal_count(&self) -> usize {
        self.esi_portals.len()
    }

    /// The portals to probe with ESI, with their effective intervals.
    pub fn esi_targets(&self, cfg: &crate::esi::EsiConfig) -> Vec<crate::esi::EsiTarget> {
        self.esi_portals
            .iter()
            .filter_map(|((ip, port), eid)| {
                let e = self.entities.get(eid)?;
                let p = e.portals.iter().find(|p| p.ip == *ip && p.port == *port)?;
                let esi_port = u16::try_from(p.esi_port? & 0xffff).ok()?;
                // Probes go to the registering peer, not to the portal address it named.
                let addr = e.peer?;
                Some(crate::esi::EsiTarget {
                    eid: eid.clone(),
                    ip: *ip,
                    port: *port,
                    addr: SocketAddr::new(addr, esi_port),
                    interval_secs: cfg.effective_interval_secs(p.esi_interval_secs.unwrap_or(0)),
                })
            })
            .collect()
    }

    /// Refreshes an entity's registration period (it answered an ESI).
    pub fn touch_entity(&mut self, eid: &str, now_secs: u64) {
        if let Some(e) = self.entities.get_mut(eid) {
            Arc::make_mut(e).refreshed_secs = now_secs;
        }
    }

    /// Deregisters a portal that stopped answering ESI (with its portal groups). An entity
    /// left without any ESI-monitored portal is deregistered with its nodes (open-isns does
    /// the same); otherwise its nodes' subscribers are told the nodes were updated.
    pub fn esi_drop_portal(&mut self, eid: &str, ip: Ipv6Addr, port: u32) -> Outcome {
        let mut out = Outcome::default();
        let Some(mut e) = self.entities.get(eid).map(|e| (**e).clone()) else {
            return out;
        };
        if !e.portals.iter().any(|p| p.ip == ip && p.port == port) {
            return out;
        }
        e.portals.retain(|p| !(p.ip == ip && p.port == port));
        e.pgs.retain(|g| !(g.ip == ip && g.port == port));
        if !e.portals.iter().any(Portal::esi_monitored) {
            tracing::info!(%eid, %ip, port, "ESI not answered, entity removed");
            self.remove_entity(&mut out, eid);
        } else {
            tracing::info!(%eid, %ip, port, "ESI not answered, portal removed");
            let nodes = e.nodes.clone();
            self.commit(&mut out, Mutation::PutEntity(e));
            for n in &nodes {
                self.object_event(&mut out, n, scn::OBJECT_UPDATED);
            }
        }
        out
    }

    /// Removes an entity on the administrator's request.
    pub fn admin_remove_entity(&mut self, eid: &str) -> Result<Outcome, RegistryError> {
        if !self.entities.contains_key(eid) {
            return Err(RegistryError::NoSuchEntry);
        }
        let mut out = Outcome::default();
        self.remove_entity(&mut out, eid);
        Ok(out)
    }

    pub fn set_policy(&mut self, p: Policy) -> Outcome {
        let mut out = Outcome::default();
        self.commit(&mut out, Mutation::SetPolicy(p));
        out
    }

    pub(super) fn scn_register(
        &mut self,
        node: &str,
        bitmap: Option<u32>,
    ) -> Result<Outcome, RegistryError> {
        let eid = self
            .node_eid
            .get(node)
            .cloned()
            .ok_or(RegistryError::NoSuchEntry)?;
        let mut e = self
            .entities
            .get(&eid)
            .map(|e| (**e).clone())
            .ok_or(RegistryError::NoSuchEntry)?;
        for n in e.nodes.iter_mut().filter(|n| n.name == node) {
            n.scn_bitmap = bitmap;
        }
        tracing::debug!(node, ?bitmap, "SCN registration");
        let mut out = Outcome::default();
        self.commit(&mut out, Mutation::PutEntity(e));
        let mut w = TlvWriter::response(Status::Success);
        w.delimiter();
        out.reply = w;
        Ok(out)
    }

    /// Refreshes the registration of the entity the source belongs to.
    pub fn touch(&mut self, source: &str, now_secs: u64) {
        if let Some(eid) = self.node_eid.get(source) {
            if let Some(e) = self.entities.get_mut(eid) {
                Arc::make_mut(e).refreshed_secs = now_secs;
            }
        }
    }
}
