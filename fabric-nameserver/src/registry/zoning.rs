//! Soft zoning: what a source may see (active DDs, the default-DD policy, control nodes), who
//! hears of a change (SCN recipients and their addresses), and the DD and DD-set operations
//! with the SCNs their changes cause.

use super::*;

impl Registry {
    // --- visibility ---------------------------------------------------------------------------

    /// What `name` sees (control nodes: everything). Used for SCN subscribers, whose
    /// notifications go to their own registered address.
    pub fn scope_for(&self, name: &str) -> Scope {
        Scope {
            name: Some(name.to_owned()),
            control: self.is_control_name(name),
            dds: self.active_dds_of(name),
        }
    }

    pub(super) fn active_dds_of(&self, name: &str) -> BTreeSet<u32> {
        self.member_dds
            .get(name)
            .map(|s| {
                s.iter()
                    .copied()
                    .filter(|d| self.active_dds.contains(d))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn visible(&self, scope: &Scope, node: &str) -> bool {
        if scope.control || scope.name.as_deref() == Some(node) {
            return true;
        }
        match self.member_dds.get(node) {
            Some(s) if s.iter().any(|d| self.active_dds.contains(d)) => {
                s.iter().any(|d| scope.dds.contains(d))
            }
            _ => self.policy.default_dd && scope.dds.is_empty(),
        }
    }

    pub(super) fn entity_visible(&self, scope: &Scope, e: &Entity) -> bool {
        scope.control
            || e.nodes.iter().any(|n| self.visible(scope, &n.name))
            || scope
                .name
                .as_deref()
                .is_some_and(|s| self.node_eid.get(s) == Some(&e.eid))
    }

    // --- discovery domains --------------------------------------------------------------------

    pub(super) fn resolve_members(
        &self,
        members: &[DdMember],
    ) -> Result<Vec<String>, RegistryError> {
        members
            .iter()
            .map(|m| match m {
                DdMember::Name(n) => Ok(n.clone()),
                DdMember::Index(i) => self
                    .entities
                    .values()
                    .flat_map(|e| e.nodes.iter())
                    .find(|n| n.index == *i)
                    .map(|n| n.name.clone())
                    .ok_or(RegistryError::NoSuchEntry),
            })
            .collect()
    }

    /// Visible (subscriber, node) pairs that a DD change touching `affected` can alter: an
    /// affected subscriber against every registered node (joining or leaving a DD, it may
    /// gain or lose anyone, default-domain members included); any other subscriber against
    /// `nodes` (the affected nodes and their DDs' members).
    pub(super) fn visibility_matrix(
        &self,
        affected: &BTreeSet<String>,
        nodes: &BTreeSet<String>,
    ) -> HashSet<(String, String)> {
        let mut seen = HashSet::new();
        let mut checks = 0usize;
        for sub in &self.subscribers {
            let scope = self.scope_for(sub);
            let candidates: Box<dyn Iterator<Item = &String>> = if affected.contains(sub) {
                Box::new(self.node_eid.keys())
            } else {
                Box::new(nodes.iter())
            };
            for n in candidates {
                checks += 1;
                if checks > MAX_SCN_CHECKS {
                    tracing::warn!("DD change touches too many nodes; SCNs truncated");
                    return seen;
                }
                if n != sub && self.visible(&scope, n) {
                    seen.insert((sub.clone(), n.clone()));
                }
            }
        }
        seen
    }

    /// Runs a DD/DDS change and turns visibility changes into SCNs: management subscribers get
    /// DD member added/removed, others object added/removed for nodes they gain or lose.
    pub(super) fn with_dd_scns(
        &mut self,
        out: &mut Outcome,
        dd: u32,
        affected: BTreeSet<String>,
        change: impl FnOnce(&mut Self, &mut Outcome),
    ) {
        // Nodes whose visibility may change: the affected members, plus, when they enter or
        // leave the default domain, everybody else there — approximated by the members of
        // the DD (bounded by MAX_DD_MEMBERS).
        let mut nodes = affected.clone();
        if let Some(d) = self.dds.get(&dd) {
            nodes.extend(d.members.iter().cloned());
        }
        let before = self.visibility_matrix(&affected, &nodes);
        change(self, out);
        let after = self.visibility_matrix(&affected, &nodes);
        for (pairs, bit_mgmt, bit_obj) in [
            (
                after.difference(&before),
                scn::DD_MEMBER_ADDED,
                scn::OBJECT_ADDED,
            ),
            (
                before.difference(&after),
                scn::DD_MEMBER_REMOVED,
                scn::OBJECT_REMOVED,
            ),
        ] {
            let mut pairs: Vec<&(String, String)> = pairs.collect();
            pairs.sort();
            for (sub, n) in pairs {
                let Some((_, sn)) = self.node(sub) else {
                    continue;
                };
                let bm = normalize_scn_bitmap(sn.scn_bitmap.unwrap_or(0));
                let subject_node = self.node(n).map(|(_, x)| x.clone());
                if bm & scn::MANAGEMENT != 0 && bm & bit_mgmt != 0 {
                    out.notifications.push(Notification {
                        dest: sub.clone(),
                        addr: self.scn_addr(sub),
                        bitmap: bit_mgmt,
                        subject: Subject::DdMember {
                            dd,
                            member: n.clone(),
                        },
                    });
                } else if let Some(sn2) = subject_node {
                    if self.wants(bm, bit_obj, &sn2) {
                        out.notifications.push(Notification {
                            dest: sub.clone(),
                            addr: self.scn_addr(sub),
                            bitmap: bit_obj,
                            subject: Subject::Node(n.clone()),
                        });
                    }
                }
            }
        }
    }

    /// DDReg: creates a DD or adds members (and name/features) to one.
    pub fn dd_register(
        &mut self,
        key: Option<u32>,
        id: Option<u32>,
        name: Option<&str>,
        features: Option<u32>,
        members: &[DdMember],
    ) -> Result<Outcome, RegistryError> {
        let members = self.resolve_members(members)?;
        let existing = match key {
            Some(k) => Some(
                self.dds
                    .get(&k)
                    .cloned()
                    .ok_or(RegistryError::NoSuchEntry)?,
            ),
            // Without a key, a DD of the same name is the one meant (isnsadm --dd-register
            // dd-name=X twice adds to X rather than creating a second X).
            None => id
                .and_then(|i| self.dds.get(&i).cloned())
                .or_else(|| name.and_then(|n| self.dds.values().find(|d| d.name == n).cloned())),
        };
        let mut d = match existing {
            Some(d) => d,
            None => {
                if self.dds.len() >= MAX_DDS {
                    return Err(RegistryError::Full("discovery domains"));
                }
                let id = match id {
                    Some(i) if i != 0 => i,
                    _ => loop {
                        let i = self.counters.next_dd_id;
                        self.counters.next_dd_id = i.wrapping_add(1).max(1);
                        if !self.dds.contains_key(&i) {
                            break i;
                        }
                    },
                };
                Dd {
                    id,
                    name: format!("DD{id}"),
                    features: 0,
                    members: BTreeSet::new(),
                }
            }
        };
        if let Some(n) = name {
            d.name = n.to_owned();
        }
        if let Some(f) = features {
            d.features = f;
        }
        let added: BTreeSet<String> = members
            .into_iter()
            .filter(|m| !d.members.contains(m))
            .collect();
        d.members.extend(added.iter().cloned());
        if d.members.len() > MAX_DD_MEMBERS {
            return Err(RegistryError::Full("DD members"));
        }
        let mut out = Outcome::default();
        let id = d.id;
        self.with_dd_scns(&mut out, id, added, |r, out| {
            r.commit(out, Mutation::PutDd(d))
        });
        let mut w = TlvWriter::response(Status::Success);
        w.delimiter();
        if let Some(d) = self.dds.get(&id) {
            self.encode_dd(&mut w, d, None);
        }
        out.reply = w;
        Ok(out)
    }

    /// DDDereg: removes members, or the whole DD when none are named.
    pub fn dd_deregister(
        &mut self,
        id: u32,
        members: &[DdMember],
    ) -> Result<Outcome, RegistryError> {
        let mut d = self
            .dds
            .get(&id)
            .cloned()
            .ok_or(RegistryError::NoSuchEntry)?;
        let mut out = Outcome::default();
        if members.is_empty() {
            let all = d.members.clone();
            self.with_dd_scns(&mut out, id, all, |r, out| {
                r.commit(out, Mutation::RemoveDd(id));
                // DD sets that listed it are logged too, so replay needs no cascade logic.
                let sets: Vec<DdSet> = r
                    .ddsets
                    .values()
                    .filter(|s| s.dds.contains(&id))
                    .cloned()
                    .collect();
                for s in sets {
                    r.commit(out, Mutation::PutDdSet(s));
                }
            });
        } else {
            let names = self.resolve_members(members)?;
            let removed: BTreeSet<String> = names
                .into_iter()
                .filter(|n| d.members.contains(n))
                .collect();
            for n in &removed {
                d.members.remove(n);
            }
            self.with_dd_scns(&mut out, id, removed, |r, out| {
                r.commit(out, Mutation::PutDd(d))
            });
        }
        let mut w = TlvWriter::response(Status::Success);
        w.delimiter();
        out.reply = w;
        Ok(out)
    }

    /// Runs a DDS change with SCNs for every DD it touches.
    pub(super) fn dds_change(&mut self, out: &mut Outcome, touched: &BTreeSet<u32>, m: Mutation) {
        let members: BTreeSet<String> = touched
            .iter()
            .filter_map(|d| self.dds.get(d))
            .flat_map(|d| d.members.iter().cloned())
            .collect();
        let dd = touched.iter().next().copied().unwrap_or(0);
        self.with_dd_scns(out, dd, members, |r, out| r.commit(out, m));
    }

    /// DDSReg: creates a DD set or edits one (name, status, added DDs).
    pub fn dds_register(
        &mut self,
        key: Option<u32>,
        id: Option<u32>,
        name: Option<&str>,
        enabled: Option<bool>,
        dds: &[u32],
    ) -> Result<Outcome, RegistryError> {
        for d in dds {
            if !self.dds.contains_key(d) {
                return Err(RegistryError::NoSuchEntry);
            }
        }
        let existing = match key {
            Some(k) => Some(
                self.ddsets
                    .get(&k)
                    .cloned()
                    .ok_or(RegistryError::NoSuchEntry)?,
            ),
            None => id
                .and_then(|i| self.ddsets.get(&i).cloned())
                .or_else(|| name.and_then(|n| self.ddsets.values().find(|s| s.name == n).cloned())),
        };
        let mut s = match existing {
            Some(s) => s,
            None => {
                if self.ddsets.len() >= MAX_DDS {
                    return Err(RegistryError::Full("DD sets"));
                }
                let id = match id {
                    Some(i) if i != 0 => i,
                    _ => loop {
                        let i = self.counters.next_dds_id;
                        self.counters.next_dds_id = i.wrapping_add(1).max(1);
                        if !self.ddsets.contains_key(&i) {
                            break i;
                        }
                    },
                };
                DdSet {
                    id,
                    name: format!("DDS{id}"),
                    enabled: false,
                    dds: BTreeSet::new(),
                }
            }
        };
        let mut touched: BTreeSet<u32> = dds.iter().copied().collect();
        if let Some(n) = name {
            s.name = n.to_owned();
        }
        if let Some(en) = enabled {
            if en != s.enabled {
                touched.extend(s.dds.iter().copied());
            }
            s.enabled = en;
        }
        s.dds.extend(dds.iter().copied());
        let id = s.id;
        let mut out = Outcome::default();
        self.dds_change(&mut out, &touched, Mutation::PutDdSet(s));
        let mut w = TlvWriter::response(Status::Success);
        w.delimiter();
        if let Some(s) = self.ddsets.get(&id) {
            encode_ddset(&mut w, s, None);
        }
        out.reply = w;
        Ok(out)
    }

    /// DDSDereg: removes DDs from a set, or the set when none are named.
    pub fn dds_deregister(&mut self, id: u32, dds: &[u32]) -> Result<Outcome, RegistryError> {
        let mut s = self
            .ddsets
            .get(&id)
            .cloned()
            .ok_or(RegistryError::NoSuchEntry)?;
        let mut out = Outcome::default();
        if dds.is_empty() {
            let touched = s.dds.clone();
            self.dds_change(&mut out, &touched, Mutation::RemoveDdSet(id));
        } else {
            let touched: BTreeSet<u32> = dds.iter().copied().collect();
            for d in dds {
                s.dds.remove(d);
            }
            self.dds_change(&mut out, &touched, Mutation::PutDdSet(s));
        }
        let mut w = TlvWriter::response(Status::Success);
        w.delimiter();
        out.reply = w;
        Ok(out)
    }

    // --- who hears of a change ----------------------------------------------------------------

    /// Where `node` receives SCNs: the SCN port of a portal of its entity, at the address of
    /// the peer that registered the entity (never an address taken from the registration,
    /// which would let a client aim the server's connections at a third party).
    pub(super) fn scn_addr(&self, node: &str) -> Option<SocketAddr> {
        let (e, _) = self.node(node)?;
        let ip = e.peer?;
        e.portals.iter().find_map(|p| {
            let port = u16::try_from(p.scn_port? & 0xffff).ok()?;
            Some(SocketAddr::new(ip, port))
        })
    }

    /// Notifications for an object event about `subject` (a node) to every subscriber that
    /// can see it. `seen_by` answers visibility (before removal for removals).
    pub(super) fn object_event(&self, out: &mut Outcome, subject: &Node, bit: u32) {
        for sub in &self.subscribers {
            if *sub == subject.name {
                continue;
            }
            let Some((_, sn)) = self.node(sub) else {
                continue;
            };
            let bm = normalize_scn_bitmap(sn.scn_bitmap.unwrap_or(0));
            if !self.wants(bm, bit, subject) {
                continue;
            }
            if !self.visible(&self.scope_for(sub), &subject.name) {
                continue;
            }
            out.notifications.push(Notification {
                dest: sub.clone(),
                addr: self.scn_addr(sub),
                bitmap: bit,
                subject: Subject::Node(subject.name.clone()),
            });
        }
    }

    pub(super) fn wants(&self, bm: u32, bit: u32, subject: &Node) -> bool {
        if bm & bit == 0 {
            return false;
        }
        let t = bm & scn::TARGET_AND_SELF != 0;
        let i = bm & scn::INITIATOR_AND_SELF != 0;
        if t || i {
            return (t && subject.node_type & NODE_TARGET != 0)
                || (i && subject.node_type & NODE_INITIATOR != 0);
        }
        true
    }

    pub(super) fn encode_dd(&self, w: &mut TlvWriter, d: &Dd, want: Option<&HashSet<u32>>) {
        encode_dd_with(w, d, want, |m| self.node(m).map(|(_, n)| n.index));
    }
}
