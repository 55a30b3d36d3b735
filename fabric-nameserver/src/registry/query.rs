//! Queries: DevAttrQry (a plan of the matching objects, encoded later) and DevGetNext
//! (iteration over the registry in key order).

use super::*;

impl Registry {
    // --- queries ------------------------------------------------------------------------------

    /// A query (DevAttrQry). Entity-family answers are planned under the registry lock
    /// (which objects, what the source may see of them) and encoded by
    /// [`QueryPlan::encode`], which the server runs after releasing the lock; DD and DD-set
    /// answers (bounded by DD counts) are encoded here.
    pub(super) fn query(&self, scope: &Scope, q: &QuerySpec) -> Result<Executed, RegistryError> {
        let want: HashSet<u32> = q.wanted.iter().copied().collect();
        let want_opt = if want.is_empty() { None } else { Some(&want) };
        let mut wanted_types: BTreeSet<ObjType> = q
            .wanted
            .iter()
            .filter_map(|t| ObjType::of_tag(*t))
            .collect();
        if wanted_types.is_empty() {
            // No attribute named: everything about the matching objects (as open-isns does).
            wanted_types.extend([
                ObjType::Entity,
                ObjType::Node,
                ObjType::Portal,
                ObjType::PortalGroup,
            ]);
            if matches!(q.key_type, Some(ObjType::Dd | ObjType::DdSet)) {
                wanted_types.clear();
                wanted_types.insert(q.key_type.unwrap_or(ObjType::Dd));
            }
        }
        let mut w = TlvWriter::response(Status::Success);
        for k in &q.raw_keys {
            w.tlv(k);
        }
        w.delimiter();
        let dd_family = match q.key_type {
            Some(t) => matches!(t, ObjType::Dd | ObjType::DdSet),
            None => wanted_types.contains(&ObjType::Dd) || wanted_types.contains(&ObjType::DdSet),
        };
        if !dd_family {
            let mut plan = QueryPlan {
                head: w,
                items: Vec::new(),
                visible: Vec::new(),
                types: wanted_types,
                want: (!want.is_empty()).then_some(want),
            };
            self.plan_key_objects(scope, q, &mut plan)?;
            return Ok(Executed::Query(plan));
        }
        let check = |w: &TlvWriter| {
            if w.buf.len() > MAX_REPLY_BYTES {
                Err(RegistryError::ReplyTooLarge)
            } else {
                Ok(())
            }
        };
        // DD and DD set queries (administrative: scoped to DDs the source is in, unless
        // control).
        if wanted_types.contains(&ObjType::Dd) {
            for d in self.dds.values() {
                let visible =
                    scope.control || scope.name.as_ref().is_some_and(|n| d.members.contains(n));
                if visible && (q.key_type != Some(ObjType::Dd) || self.dd_matches(d, &q.keys)) {
                    self.encode_dd(&mut w, d, want_opt);
                    check(&w)?;
                }
            }
        }
        if wanted_types.contains(&ObjType::DdSet) && scope.control {
            for s in self.ddsets.values() {
                if q.key_type != Some(ObjType::DdSet) || ddset_matches(s, &q.keys) {
                    encode_ddset(&mut w, s, want_opt);
                    check(&w)?;
                }
            }
        }
        Ok(Executed::Done(Outcome {
            reply: w,
            ..Default::default()
        }))
    }

    pub(super) fn dd_matches(&self, d: &Dd, keys: &[Tlv]) -> bool {
        let mut w = TlvWriter::new();
        self.encode_dd(&mut w, d, None);
        tlvs_match(&w, keys)
    }

    /// Adds to `plan` the entities matching the query key (with the key node, when the key
    /// was a node) and, for each, which of its nodes and portal groups the source may see.
    pub(super) fn plan_key_objects(
        &self,
        scope: &Scope,
        q: &QuerySpec,
        plan: &mut QueryPlan,
    ) -> Result<(), RegistryError> {
        let mut add = |e: &Arc<Entity>, key_node: Option<usize>| {
            plan.add(e.clone(), key_node, |name| self.visible(scope, name))
        };
        match q.key_type {
            Some(ObjType::Node) => {
                // Fast path: key by name.
                if let [k] = q.keys.as_slice() {
                    if k.tag == tag::ISCSI_NAME {
                        let name = k
                            .as_string()
                            .map_err(|e| RegistryError::InvalidQuery(e.to_string()))?;
                        if let Some(e) = self.node_eid.get(&name).and_then(|i| self.entities.get(i))
                        {
                            if let Some(i) = e.nodes.iter().position(|n| n.name == name) {
                                if self.visible(scope, &name) {
                                    add(e, Some(i))?;
                                }
                            }
                        }
                        return Ok(());
                    }
                }
                for e in self.entities.values() {
                    for (i, n) in e.nodes.iter().enumerate() {
                        if node_matches(n, &q.keys) && self.visible(scope, &n.name) {
                            add(e, Some(i))?;
                        }
                    }
                }
            }
            Some(ObjType::Entity) => {
                for e in self.entities.values() {
                    if entity_matches(e, &q.keys) && self.entity_visible(scope, e) {
                        add(e, None)?;
                    }
                }
            }
            Some(ObjType::Portal) => {
                for e in self.entities.values() {
                    if e.portals.iter().any(|p| portal_matches(p, &q.keys))
                        && self.entity_visible(scope, e)
                    {
                        add(e, None)?;
                    }
                }
            }
            Some(ObjType::PortalGroup) => {
                for e in self.entities.values() {
                    for g in &e.pgs {
                        if pg_matches(g, &q.keys) && self.visible(scope, &g.node_name) {
                            if let Some(i) = e.nodes.iter().position(|n| n.name == g.node_name) {
                                add(e, Some(i))?;
                            }
                        }
                    }
                }
            }
            None => {
                for e in self.entities.values() {
                    if self.entity_visible(scope, e) {
                        add(e, None)?;
                    }
                }
            }
            Some(ObjType::Dd | ObjType::DdSet) => {}
        }
        Ok(())
    }

    pub(super) fn get_next(&self, scope: &Scope, q: &QuerySpec) -> Result<Outcome, RegistryError> {
        use std::ops::Bound::{Excluded, Unbounded};
        let want: HashSet<u32> = q.wanted.iter().copied().collect();
        let want_opt = if want.is_empty() { None } else { Some(&want) };
        let mut body = TlvWriter::new();
        let mut key = TlvWriter::new();
        let after = |t: u32| q.keys.iter().find(|k| k.tag == t);
        let bad = |e: crate::wire::WireError| RegistryError::InvalidQuery(e.to_string());
        let found = match q.key_type {
            Some(ObjType::Node) => {
                let start = match after(tag::ISCSI_NAME) {
                    Some(k) => Excluded(k.as_string().map_err(bad)?),
                    None => Unbounded,
                };
                self.node_eid
                    .range::<String, _>((start, Unbounded))
                    .filter_map(|(name, _)| self.node(name))
                    .find(|(_, n)| self.visible(scope, &n.name) && node_matches(n, &q.filters))
                    .map(|(_, n)| {
                        key.string(tag::ISCSI_NAME, &n.name);
                        encode_node(&mut body, n, want_opt);
                    })
            }
            Some(ObjType::Entity) => {
                let start = match after(tag::EID) {
                    Some(k) => Excluded(k.as_string().map_err(bad)?),
                    None => Unbounded,
                };
                self.entities
                    .range::<String, _>((start, Unbounded))
                    .map(|(_, e)| e)
                    .find(|e| self.entity_visible(scope, e) && entity_matches(e, &q.filters))
                    .map(|e| {
                        key.string(tag::EID, &e.eid);
                        encode_entity(&mut body, e, want_opt);
                    })
            }
            Some(ObjType::Portal) => {
                let start = match (after(tag::PORTAL_IP), after(tag::PORTAL_PORT)) {
                    (Some(i), Some(p)) => {
                        Excluded((i.as_ip().map_err(bad)?, p.as_u32().map_err(bad)?))
                    }
                    _ => Unbounded,
                };
                self.portal_eid
                    .range((start, Unbounded))
                    .filter_map(|(k, eid)| {
                        let e = self.entities.get(eid)?;
                        Some((e, e.portals.iter().find(|p| (p.ip, p.port) == *k)?))
                    })
                    .find(|(e, p)| self.entity_visible(scope, e) && portal_matches(p, &q.filters))
                    .map(|(_, p)| {
                        key.ip(tag::PORTAL_IP, &p.ip);
                        key.u32(tag::PORTAL_PORT, p.port);
                        encode_portal(&mut body, p, want_opt);
                    })
            }
            Some(ObjType::PortalGroup) => {
                let start = match (
                    after(tag::PG_ISCSI_NAME),
                    after(tag::PG_PORTAL_IP),
                    after(tag::PG_PORTAL_PORT),
                ) {
                    (Some(n), Some(i), Some(p)) => Some((
                        n.as_string().map_err(bad)?,
                        i.as_ip().map_err(bad)?,
                        p.as_u32().map_err(bad)?,
                    )),
                    _ => None,
                };
                let mut all: Vec<&PortalGroup> = self
                    .entities
                    .values()
                    .flat_map(|e| e.pgs.iter())
                    .filter(|g| self.visible(scope, &g.node_name) && pg_matches(g, &q.filters))
                    .filter(|g| {
                        start
                            .as_ref()
                            .is_none_or(|s| (g.node_name.clone(), g.ip, g.port) > *s)
                    })
                    .collect();
                all.sort_by(|a, b| (&a.node_name, a.ip, a.port).cmp(&(&b.node_name, b.ip, b.port)));
                all.first().map(|g| {
                    key.string(tag::PG_ISCSI_NAME, &g.node_name);
                    key.ip(tag::PG_PORTAL_IP, &g.ip);
                    key.u32(tag::PG_PORTAL_PORT, g.port);
                    encode_pg(&mut body, g, want_opt);
                })
            }
            Some(ObjType::Dd) => {
                let start = match after(tag::DD_ID) {
                    Some(k) => Excluded(k.as_u32().map_err(bad)?),
                    None => Unbounded,
                };
                self.dds
                    .range((start, Unbounded))
                    .map(|(_, d)| d)
                    .find(|d| {
                        scope.control
                            || scope.name.as_ref().is_some_and(|n| d.members.contains(n))
                            // Like open-isns, DDs are listed to any source when the default
                            // DD makes the server an open one.
                            || self.policy.default_dd
                    })
                    .map(|d| {
                        key.u32(tag::DD_ID, d.id);
                        self.encode_dd(&mut body, d, want_opt);
                    })
            }
            Some(ObjType::DdSet) => {
                let start = match after(tag::DDS_ID) {
                    Some(k) => Excluded(k.as_u32().map_err(bad)?),
                    None => Unbounded,
                };
                self.ddsets
                    .range((start, Unbounded))
                    .map(|(_, s)| s)
                    .find(|_| scope.control || self.policy.default_dd)
                    .map(|s| {
                        key.u32(tag::DDS_ID, s.id);
                        encode_ddset(&mut body, s, want_opt);
                    })
            }
            None => None,
        };
        if found.is_none() {
            return Err(RegistryError::NoSuchEntry);
        }
        let mut w = TlvWriter::response(Status::Success);
        append(&mut w, &key);
        w.delimiter();
        append(&mut w, &body);
        Ok(Outcome {
            reply: w,
            ..Default::default()
        })
    }
}
