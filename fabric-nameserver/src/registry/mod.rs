//! The name server's state and the operations on it: Network Entities with their Portals,
//! iSCSI Storage Nodes and Portal Groups; Discovery Domains (DDs) and DD Sets; the default-DD
//! policy. Executing a [`Command`] is deterministic given the state and the clock: it yields
//! the response attributes, the [`Mutation`]s to log (the write-ahead log replays them with
//! [`Registry::apply`]) and the state-change [`Notification`]s to deliver. No I/O here.
//!
//! Soft zoning: a source sees a node when both are members of a common *active* DD (a DD in
//! no DD Set, or in at least one enabled DD Set), when the node is itself, when the source is
//! a control node, or, under the default-DD policy, when neither is a member of any active DD.
//!
//! Authorization (RFC 4171 §5.6.5, §6.4.2): control nodes are the ones the administrator
//! lists ([`Registry::set_control_nodes`], optionally pinned to a peer address); a node
//! registering the control bit without being listed is refused. A network request
//! ([`Registry::execute_from`], with the peer's address) may change only the entity its
//! source node belongs to, and only from the address that registered that entity (the
//! source attribute is unauthenticated: the peer address is what binds an entity to its
//! owner); DD and DD-set changes and management SCN registrations need a control node. SCNs
//! and ESI probes go only to the address of the peer that registered the entity, never to
//! an address a client names.
//!
//! Files, by concept; each adds its part of `impl Registry`, and calls run one way, from
//! the dispatch down to the state (`execute` → `entities`, `query` → `zoning` → this file →
//! `model`, `plan`):
//! - [`model`]: the objects (entities, portals, nodes, portal groups, DDs, DD sets, policy),
//!   the logged [`Mutation`]s and [`Record`]s, outcomes, notifications, errors, who asks.
//! - [`plan`]: query plans, encoded outside the registry lock, and the object encoders and
//!   key matchers they use.
//! - this file: the [`Registry`] state, its indexes, replay ([`Registry::apply`]), and the
//!   authorization predicates.
//! - `zoning`: visibility (soft zoning), who hears of a change (SCN recipients), and the DD
//!   and DD-set operations.
//! - `entities`: registration, refresh, deregistration, expiry, ESI, administrative removal,
//!   policy, SCN registration.
//! - `query`: DevAttrQry and DevGetNext.
//! - `execute`: command dispatch and the checks before a change.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::command::{
    Command, DdMember, EntityAttrs, ObjType, Parsed, QuerySpec, RegKey, RegObject,
};
use crate::wire::{tag, Status, Tlv, TlvWriter};

mod entities;
mod execute;
pub mod model;
pub mod plan;
mod query;
mod zoning;

pub use model::*;
pub use plan::*;

/// Most registered iSCSI nodes (and, separately, entities and portals). At the few hundred
/// bytes each one costs, this bounds the registry to a few hundred MiB.
pub const MAX_NODES: usize = 1_000_000;
/// Most children (portals + nodes + portal groups) of one entity.
pub const MAX_OBJECTS_PER_ENTITY: usize = 4096;
/// Most discovery domains and DD sets.
pub const MAX_DDS: usize = 16_384;
/// Most members of one DD.
pub const MAX_DD_MEMBERS: usize = 100_000;
/// Largest reply we build: the "all targets" query (name and type, ~48 bytes a node) at
/// 100 000 nodes is ~5 MiB, so 16 MiB answers ~340 000 nodes that way; larger sets are what
/// DevGetNext iteration is for. Beyond it the query fails with Internal Error rather than
/// pinning memory (the server also caps the total of replies in flight).
pub const MAX_REPLY_BYTES: usize = 16 * 1024 * 1024;
/// Most (subscriber, changed node) visibility checks one DD change may cost for SCNs; a
/// larger change still applies, but its SCNs are limited to the first checks.
pub const MAX_SCN_CHECKS: usize = 4_000_000;
/// Registration period bounds (seconds). 0 from the client means "never expires".
pub const MIN_REGISTRATION_PERIOD_SECS: u32 = 10;
pub const MAX_REGISTRATION_PERIOD_SECS: u32 = 7 * 24 * 3600;

/// Node type bits (RFC 4171 §6.4.2).
pub const NODE_TARGET: u32 = 1;
pub const NODE_INITIATOR: u32 = 2;
pub const NODE_CONTROL: u32 = 4;

/// SCN bitmap bits as they appear in the 32-bit value (RFC 4171 §6.4.4 numbers bits from the
/// most significant, so its "bit 31" is our `1 << 0`).
pub mod scn {
    pub const DD_MEMBER_ADDED: u32 = 1 << 0;
    pub const DD_MEMBER_REMOVED: u32 = 1 << 1;
    pub const OBJECT_UPDATED: u32 = 1 << 2;
    pub const OBJECT_ADDED: u32 = 1 << 3;
    pub const OBJECT_REMOVED: u32 = 1 << 4;
    pub const MANAGEMENT: u32 = 1 << 5;
    pub const TARGET_AND_SELF: u32 = 1 << 6;
    pub const INITIATOR_AND_SELF: u32 = 1 << 7;
    pub const ALL: u32 = 0xff;
}

/// Normalises an SCN bitmap from a client. tgt (and IET before it) bit-reverse the word,
/// putting the flags in the top byte; no defined flag lives there, so a bitmap with only
/// top-byte bits is read reversed.
pub fn normalize_scn_bitmap(b: u32) -> u32 {
    if b & scn::ALL == 0 && b != 0 {
        b.reverse_bits() & scn::ALL
    } else {
        b & scn::ALL
    }
}

/// The whole registry. Serialised as-is into snapshots.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Registry {
    #[serde(with = "model::shared_entities")]
    entities: BTreeMap<String, Arc<Entity>>,
    dds: BTreeMap<u32, Dd>,
    ddsets: BTreeMap<u32, DdSet>,
    policy: Policy,
    counters: Counters,
    // Derived indexes, rebuilt after loading.
    #[serde(skip)]
    node_eid: BTreeMap<String, String>,
    #[serde(skip)]
    portal_eid: BTreeMap<(Ipv6Addr, u32), String>,
    #[serde(skip)]
    member_dds: HashMap<String, BTreeSet<u32>>,
    #[serde(skip)]
    active_dds: HashSet<u32>,
    #[serde(skip)]
    subscribers: BTreeSet<String>,
    /// Portals monitored by ESI (an ESI port and a non-zero interval), to their entity.
    #[serde(skip)]
    esi_portals: BTreeMap<(Ipv6Addr, u32), String>,
    /// Registration period given to entities that do not ask for one (configuration).
    #[serde(skip)]
    default_period_secs: u32,
    /// Control nodes the administrator authorized (configuration), each optionally pinned
    /// to the one peer address it may act from.
    #[serde(skip)]
    control_nodes: BTreeMap<String, Option<IpAddr>>,
}

impl Registry {
    pub fn new(policy: Policy, default_period_secs: u32) -> Registry {
        let mut r = Registry {
            policy,
            default_period_secs,
            ..Default::default()
        };
        r.rebuild_indexes();
        r
    }

    /// Sets the registration period for entities that do not ask for one.
    pub fn set_default_period(&mut self, secs: u32) {
        self.default_period_secs = secs;
    }

    /// Sets the administrator's list of control nodes: name → the peer address it must
    /// come from (`None`: any address).
    pub fn set_control_nodes(&mut self, nodes: BTreeMap<String, Option<IpAddr>>) {
        self.control_nodes = nodes;
    }

    /// Whether `name` is a listed control node whose registration (where its SCNs go) came
    /// from its pinned address, if it has one: what it may see through SCNs.
    fn is_control_name(&self, name: &str) -> bool {
        match self.control_nodes.get(name) {
            Some(None) => true,
            Some(Some(a)) => self
                .node(name)
                .is_some_and(|(e, _)| e.peer == Some(a.to_canonical())),
            None => false,
        }
    }

    /// Whether a request from `source` at `peer` carries control-node authority.
    fn is_control(&self, source: &str, peer: &Peer) -> bool {
        match self.control_nodes.get(source) {
            Some(None) => true,
            Some(Some(a)) => peer.addr == Some(a.to_canonical()),
            None => false,
        }
    }

    /// Whether `source` at `peer` may change entity `e`. `joining`: nodes the request adds,
    /// which may act for their entity (tgt registers each new target with that target as
    /// the source). Control nodes may change any entity.
    fn may_change(&self, source: &str, peer: &Peer, e: &Entity, joining: &[&str]) -> bool {
        if self.is_control(source, peer) {
            return true;
        }
        let member = e.nodes.iter().any(|n| n.name == source);
        match e.peer {
            // Logged before addresses were recorded: the source must already be a member.
            None => member,
            Some(a) => peer.addr == Some(a) && (member || joining.contains(&source)),
        }
    }

    /// Rebuilds derived indexes (after deserialising a snapshot).
    pub fn rebuild_indexes(&mut self) {
        self.node_eid.clear();
        self.portal_eid.clear();
        self.subscribers.clear();
        self.esi_portals.clear();
        for e in self.entities.values() {
            for n in &e.nodes {
                self.node_eid.insert(n.name.clone(), e.eid.clone());
                if n.scn_bitmap.is_some_and(|b| b != 0) {
                    self.subscribers.insert(n.name.clone());
                }
            }
            for p in &e.portals {
                self.portal_eid.insert((p.ip, p.port), e.eid.clone());
                if p.esi_monitored() {
                    self.esi_portals.insert((p.ip, p.port), e.eid.clone());
                }
            }
        }
        self.member_dds.clear();
        for d in self.dds.values() {
            for m in &d.members {
                self.member_dds.entry(m.clone()).or_default().insert(d.id);
            }
        }
        self.recompute_active();
    }

    /// Gives every entity a fresh registration period (after loading).
    pub fn refresh_all(&mut self, now_secs: u64) {
        for e in self.entities.values_mut() {
            Arc::make_mut(e).refreshed_secs = now_secs;
        }
    }

    fn recompute_active(&mut self) {
        let mut in_set: HashSet<u32> = HashSet::new();
        let mut enabled: HashSet<u32> = HashSet::new();
        for s in self.ddsets.values() {
            for d in &s.dds {
                in_set.insert(*d);
                if s.enabled {
                    enabled.insert(*d);
                }
            }
        }
        self.active_dds = self
            .dds
            .keys()
            .copied()
            .filter(|d| !in_set.contains(d) || enabled.contains(d))
            .collect();
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    pub fn counts(&self) -> (usize, usize, usize, usize, usize) {
        (
            self.entities.len(),
            self.node_eid.len(),
            self.portal_eid.len(),
            self.dds.len(),
            self.ddsets.len(),
        )
    }

    pub fn entities(&self) -> impl Iterator<Item = &Entity> {
        self.entities.values().map(|e| &**e)
    }

    pub fn dds(&self) -> impl Iterator<Item = &Dd> {
        self.dds.values()
    }

    pub fn ddsets(&self) -> impl Iterator<Item = &DdSet> {
        self.ddsets.values()
    }

    pub fn node(&self, name: &str) -> Option<(&Entity, &Node)> {
        let e: &Entity = self.entities.get(self.node_eid.get(name)?)?;
        e.nodes.iter().find(|n| n.name == name).map(|n| (e, n))
    }

    pub fn dd_active(&self, id: u32) -> bool {
        self.active_dds.contains(&id)
    }

    // --- replay -----------------------------------------------------------------------------

    /// Applies a logged record (replay, and the live path after validation).
    pub fn apply(&mut self, r: &Record) {
        self.counters = r.counters;
        match &r.mutation {
            Mutation::PutEntity(e) => {
                self.remove_entity_raw(&e.eid);
                for n in &e.nodes {
                    self.node_eid.insert(n.name.clone(), e.eid.clone());
                    if n.scn_bitmap.is_some_and(|b| b != 0) {
                        self.subscribers.insert(n.name.clone());
                    }
                }
                for p in &e.portals {
                    self.portal_eid.insert((p.ip, p.port), e.eid.clone());
                    if p.esi_monitored() {
                        self.esi_portals.insert((p.ip, p.port), e.eid.clone());
                    }
                }
                self.entities.insert(e.eid.clone(), Arc::new(e.clone()));
            }
            Mutation::RemoveEntity(eid) => {
                self.remove_entity_raw(eid);
            }
            Mutation::PutDd(d) => {
                self.remove_dd_raw(d.id);
                for m in &d.members {
                    self.member_dds.entry(m.clone()).or_default().insert(d.id);
                }
                self.dds.insert(d.id, d.clone());
                self.recompute_active();
            }
            Mutation::RemoveDd(id) => {
                self.remove_dd_raw(*id);
                for s in self.ddsets.values_mut() {
                    s.dds.remove(id);
                }
                self.recompute_active();
            }
            Mutation::PutDdSet(s) => {
                self.ddsets.insert(s.id, s.clone());
                self.recompute_active();
            }
            Mutation::RemoveDdSet(id) => {
                self.ddsets.remove(id);
                self.recompute_active();
            }
            Mutation::SetPolicy(p) => self.policy = *p,
        }
    }

    fn remove_entity_raw(&mut self, eid: &str) -> Option<Arc<Entity>> {
        let old = self.entities.remove(eid)?;
        for n in &old.nodes {
            self.node_eid.remove(&n.name);
            self.subscribers.remove(&n.name);
        }
        for p in &old.portals {
            self.portal_eid.remove(&(p.ip, p.port));
            self.esi_portals.remove(&(p.ip, p.port));
        }
        Some(old)
    }

    fn remove_dd_raw(&mut self, id: u32) {
        if let Some(old) = self.dds.remove(&id) {
            for m in &old.members {
                if let Some(s) = self.member_dds.get_mut(m) {
                    s.remove(&id);
                    if s.is_empty() {
                        self.member_dds.remove(m);
                    }
                }
            }
        }
    }

    /// Logs and applies a mutation.
    fn commit(&mut self, out: &mut Outcome, m: Mutation) {
        let r = Record {
            counters: self.counters,
            mutation: m,
        };
        self.apply(&r);
        out.mutations.push(r);
    }

    fn alloc_index(&mut self) -> u32 {
        let i = self.counters.next_index;
        self.counters.next_index = self.counters.next_index.wrapping_add(1).max(1);
        i
    }
}

#[cfg(test)]
mod tests;
