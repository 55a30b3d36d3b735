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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::command::{
    Command, DdMember, EntityAttrs, ObjType, Parsed, QuerySpec, RegKey, RegObject,
};
use crate::wire::{tag, Status, Tlv, TlvWriter};

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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Portal {
    pub ip: Ipv6Addr,
    /// Port; bit 16 set means UDP (RFC 4171 §6.3.2).
    pub port: u32,
    pub index: u32,
    pub symbolic_name: Option<String>,
    pub esi_interval_secs: Option<u32>,
    pub esi_port: Option<u32>,
    pub scn_port: Option<u32>,
    pub security_bitmap: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub node_type: u32,
    pub index: u32,
    pub alias: Option<String>,
    pub scn_bitmap: Option<u32>,
    pub auth_method: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortalGroup {
    pub node_name: String,
    pub ip: Ipv6Addr,
    pub port: u32,
    pub index: u32,
    pub tag: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entity {
    pub eid: String,
    pub protocol: u32,
    pub index: u32,
    pub mgmt_ip: Option<Ipv6Addr>,
    /// 0: never expires.
    pub period_secs: u32,
    /// Unix time of the last registration.
    pub timestamp_secs: u64,
    pub portals: Vec<Portal>,
    pub nodes: Vec<Node>,
    pub pgs: Vec<PortalGroup>,
    /// Unix time of the last message from one of its nodes (not logged: after a restart
    /// every entity gets a full period).
    #[serde(skip)]
    pub refreshed_secs: u64,
    /// Address of the peer that registered the entity: the only address that may change it
    /// (besides control nodes) and the only one SCNs and ESI probes are sent to. `None` for
    /// entities logged before addresses were recorded: no SCN/ESI until they re-register.
    #[serde(default)]
    pub peer: Option<IpAddr>,
}

impl Portal {
    /// Whether the server probes this portal with ESI: it registered an ESI port and did not
    /// ask for interval 0 ("no ESI", RFC 4171 §6.3.5). Without an interval the minimum one
    /// is used.
    pub fn esi_monitored(&self) -> bool {
        self.esi_port.is_some_and(|p| p & 0xffff != 0) && self.esi_interval_secs != Some(0)
    }
}

impl Entity {
    fn children(&self) -> usize {
        self.portals.len() + self.nodes.len() + self.pgs.len()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dd {
    pub id: u32,
    pub name: String,
    pub features: u32,
    pub members: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DdSet {
    pub id: u32,
    pub name: String,
    pub enabled: bool,
    pub dds: BTreeSet<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Nodes in no active DD see each other (open-isns's DefaultDiscoveryDomain = 1).
    pub default_dd: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { default_dd: true }
    }
}

/// Server-assigned counters, logged with every mutation so that replay never reuses an
/// index or ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub next_index: u32,
    pub next_dd_id: u32,
    pub next_dds_id: u32,
    pub next_eid: u64,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            next_index: 1,
            next_dd_id: 1,
            next_dds_id: 1,
            next_eid: 1,
        }
    }
}

/// A state change, as logged in the write-ahead log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mutation {
    PutEntity(Entity),
    RemoveEntity(String),
    PutDd(Dd),
    RemoveDd(u32),
    PutDdSet(DdSet),
    RemoveDdSet(u32),
    SetPolicy(Policy),
}

/// A logged record: the mutation with the counters after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub counters: Counters,
    pub mutation: Mutation,
}

/// What an SCN is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    Node(String),
    DdMember { dd: u32, member: String },
}

/// A state-change notification to deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub dest: String,
    /// Where the destination listens for SCNs (a portal of its entity with an SCN port).
    pub addr: Option<SocketAddr>,
    pub bitmap: u32,
    pub subject: Subject,
}

/// An operation's result.
#[derive(Debug, Default)]
pub struct Outcome {
    pub reply: TlvWriter,
    pub mutations: Vec<Record>,
    pub notifications: Vec<Notification>,
}

/// A command the registry refuses, with its status.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RegistryError {
    #[error("invalid registration: {0}")]
    InvalidRegistration(String),
    #[error("source {0} unknown")]
    SourceUnknown(String),
    #[error("no such entry")]
    NoSuchEntry,
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    #[error("registry full: {0}")]
    Full(&'static str),
    #[error("reply larger than {MAX_REPLY_BYTES} bytes")]
    ReplyTooLarge,
    #[error(
        "ESI monitoring is at its limit of {} portals",
        crate::esi::MAX_ESI_PORTALS
    )]
    EsiNotAvailable,
    #[error("source {0} is not authorized: {1}")]
    Unauthorized(String, &'static str),
    #[error("SCN registration rejected: {0}")]
    ScnRejected(&'static str),
    #[error("server busy: too many large replies in flight")]
    Busy,
}

impl RegistryError {
    pub fn status(&self) -> Status {
        match self {
            RegistryError::InvalidRegistration(_) => Status::InvalidRegistration,
            RegistryError::SourceUnknown(_) => Status::SourceUnknown,
            RegistryError::NoSuchEntry => Status::NoSuchEntry,
            RegistryError::InvalidQuery(_) => Status::InvalidQuery,
            RegistryError::Full(_) => Status::Busy,
            RegistryError::ReplyTooLarge => Status::Internal,
            RegistryError::EsiNotAvailable => Status::EsiNotAvailable,
            RegistryError::Unauthorized(..) => Status::SourceUnauthorized,
            RegistryError::ScnRejected(_) => Status::ScnRegistrationRejected,
            RegistryError::Busy => Status::Busy,
        }
    }
}

/// Who is asking: decides visibility.
#[derive(Debug, Clone)]
pub struct Scope {
    name: Option<String>,
    control: bool,
    dds: BTreeSet<u32>,
}

impl Scope {
    /// The administrator (control socket): sees everything.
    pub fn admin() -> Scope {
        Scope {
            name: None,
            control: true,
            dds: BTreeSet::new(),
        }
    }
}

/// Where a network request comes from: the TCP peer's address (canonical: an IPv4 peer on
/// a dual-stack socket is its IPv4 address). `None` when unknown (e.g. a fuzzer driving
/// the registry directly): such a requester owns no entity and gets no SCN or ESI.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Peer {
    pub addr: Option<IpAddr>,
}

impl Peer {
    pub fn new(addr: IpAddr) -> Peer {
        Peer {
            addr: Some(addr.to_canonical()),
        }
    }

    pub fn unknown() -> Peer {
        Peer { addr: None }
    }
}

/// Entities are shared (`Arc`) so that a query can take the ones it answers with out of the
/// registry lock and encode its reply after releasing it; a change to an entity a reply is
/// still being built from copies it first (`Arc::make_mut`). Serialised as plain entities.
mod shared_entities {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serializer};

    use super::Entity;

    pub fn serialize<S: Serializer>(
        m: &BTreeMap<String, Arc<Entity>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_map(m.iter().map(|(k, v)| (k, &**v)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Arc<Entity>>, D::Error> {
        let m = BTreeMap::<String, Entity>::deserialize(d)?;
        Ok(m.into_iter().map(|(k, v)| (k, Arc::new(v))).collect())
    }
}

/// The whole registry. Serialised as-is into snapshots.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Registry {
    #[serde(with = "shared_entities")]
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

    fn active_dds_of(&self, name: &str) -> BTreeSet<u32> {
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

    fn entity_visible(&self, scope: &Scope, e: &Entity) -> bool {
        scope.control
            || e.nodes.iter().any(|n| self.visible(scope, &n.name))
            || scope
                .name
                .as_deref()
                .is_some_and(|s| self.node_eid.get(s) == Some(&e.eid))
    }

    /// Refreshes the registration of the entity the source belongs to.
    pub fn touch(&mut self, source: &str, now_secs: u64) {
        if let Some(eid) = self.node_eid.get(source) {
            if let Some(e) = self.entities.get_mut(eid) {
                Arc::make_mut(e).refreshed_secs = now_secs;
            }
        }
    }

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
    fn checked_scope(&self, source: &str, peer: &Peer) -> Result<Scope, RegistryError> {
        let mut s = self.scope_for(source);
        s.control = self.is_control(source, peer);
        if self.node(source).is_none() && s.dds.is_empty() && !self.policy.default_dd {
            return Err(RegistryError::SourceUnknown(source.to_owned()));
        }
        Ok(s)
    }

    /// RFC 4171 §5.6.5.4: a DevDereg may remove only objects of the source's own entity
    /// (or come from a control node). Checked for every named object before any is removed.
    fn check_dereg(
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
    fn check_scn(
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

    /// Where `node` receives SCNs: the SCN port of a portal of its entity, at the address of
    /// the peer that registered the entity (never an address taken from the registration,
    /// which would let a client aim the server's connections at a third party).
    fn scn_addr(&self, node: &str) -> Option<SocketAddr> {
        let (e, _) = self.node(node)?;
        let ip = e.peer?;
        e.portals.iter().find_map(|p| {
            let port = u16::try_from(p.scn_port? & 0xffff).ok()?;
            Some(SocketAddr::new(ip, port))
        })
    }

    /// Notifications for an object event about `subject` (a node) to every subscriber that
    /// can see it. `seen_by` answers visibility (before removal for removals).
    fn object_event(&self, out: &mut Outcome, subject: &Node, bit: u32) {
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

    fn wants(&self, bm: u32, bit: u32, subject: &Node) -> bool {
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

    #[allow(clippy::too_many_arguments)]
    fn register(
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

    fn deregister(
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
    fn put_or_remove(&mut self, out: &mut Outcome, e: Entity) {
        if e.nodes.is_empty() && e.portals.is_empty() {
            self.commit(out, Mutation::RemoveEntity(e.eid));
        } else {
            self.commit(out, Mutation::PutEntity(e));
        }
    }

    fn remove_entity(&mut self, out: &mut Outcome, eid: &str) {
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

    fn scn_register(&mut self, node: &str, bitmap: Option<u32>) -> Result<Outcome, RegistryError> {
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

    // --- discovery domains --------------------------------------------------------------------

    fn resolve_members(&self, members: &[DdMember]) -> Result<Vec<String>, RegistryError> {
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
    fn visibility_matrix(
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
    fn with_dd_scns(
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
    fn dds_change(&mut self, out: &mut Outcome, touched: &BTreeSet<u32>, m: Mutation) {
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

    // --- queries ------------------------------------------------------------------------------

    fn encode_dd(&self, w: &mut TlvWriter, d: &Dd, want: Option<&HashSet<u32>>) {
        encode_dd_with(w, d, want, |m| self.node(m).map(|(_, n)| n.index));
    }

    /// A query (DevAttrQry). Entity-family answers are planned under the registry lock
    /// (which objects, what the source may see of them) and encoded by
    /// [`QueryPlan::encode`], which the server runs after releasing the lock; DD and DD-set
    /// answers (bounded by DD counts) are encoded here.
    fn query(&self, scope: &Scope, q: &QuerySpec) -> Result<Executed, RegistryError> {
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

    fn dd_matches(&self, d: &Dd, keys: &[Tlv]) -> bool {
        let mut w = TlvWriter::new();
        self.encode_dd(&mut w, d, None);
        tlvs_match(&w, keys)
    }

    /// Adds to `plan` the entities matching the query key (with the key node, when the key
    /// was a node) and, for each, which of its nodes and portal groups the source may see.
    fn plan_key_objects(
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

    fn get_next(&self, scope: &Scope, q: &QuerySpec) -> Result<Outcome, RegistryError> {
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

/// What executing a command produced: a finished outcome, or a query whose reply is still to
/// be encoded (outside the registry lock) from the plan.
#[derive(Debug)]
pub enum Executed {
    Done(Outcome),
    Query(QueryPlan),
}

/// Most entities one query plan may hold: every entity the registry can have (a plan entry
/// is a pointer and an index, ~24 bytes, so the largest plan is ~24 MiB).
pub const MAX_PLAN_ITEMS: usize = MAX_NODES;

/// A DevAttrQry answer decided under the registry lock: the matching entities (shared,
/// immutable snapshots of them) and what the source may see of each. Encoding it needs no
/// registry access, so the server does it after releasing the lock.
#[derive(Debug)]
pub struct QueryPlan {
    /// Status, echoed keys and delimiter.
    head: TlvWriter,
    items: Vec<PlanItem>,
    /// Visibility of each item's nodes then portal groups, from `PlanItem::vis`.
    visible: Vec<bool>,
    types: BTreeSet<ObjType>,
    want: Option<HashSet<u32>>,
}

#[derive(Debug)]
struct PlanItem {
    e: Arc<Entity>,
    key_node: Option<usize>,
    vis: usize,
}

impl QueryPlan {
    fn add(
        &mut self,
        e: Arc<Entity>,
        key_node: Option<usize>,
        visible: impl Fn(&str) -> bool,
    ) -> Result<(), RegistryError> {
        if self.items.len() >= MAX_PLAN_ITEMS {
            return Err(RegistryError::ReplyTooLarge);
        }
        let vis = self.visible.len();
        // Visibility is needed only where no key node decides it.
        if key_node.is_none()
            && (self.types.contains(&ObjType::Node) || self.types.contains(&ObjType::PortalGroup))
        {
            self.visible
                .extend(e.nodes.iter().map(|n| visible(&n.name)));
            self.visible
                .extend(e.pgs.iter().map(|g| visible(&g.node_name)));
        }
        self.items.push(PlanItem { e, key_node, vis });
        Ok(())
    }

    /// Number of entities the reply covers.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Encodes the reply. `grow` is told the reply's size after each entity and may stop
    /// it (the server's memory budget); the reply never exceeds [`MAX_REPLY_BYTES`].
    pub fn encode(
        self,
        grow: &mut dyn FnMut(usize) -> Result<(), RegistryError>,
    ) -> Result<TlvWriter, RegistryError> {
        let mut w = self.head;
        let want = self.want.as_ref();
        let mut emitted: HashSet<u32> = HashSet::new();
        for it in &self.items {
            let e = &*it.e;
            let key_node = it.key_node.and_then(|i| e.nodes.get(i));
            let node_visible = |i: usize| self.visible.get(it.vis + i).copied().unwrap_or(false);
            let pg_visible = |i: usize| {
                self.visible
                    .get(it.vis + e.nodes.len() + i)
                    .copied()
                    .unwrap_or(false)
            };
            for t in &self.types {
                match t {
                    ObjType::Entity => {
                        if emitted.insert(e.index) {
                            encode_entity(&mut w, e, want);
                        }
                    }
                    ObjType::Node => match key_node {
                        Some(n) => {
                            if emitted.insert(n.index) {
                                encode_node(&mut w, n, want);
                            }
                        }
                        None => {
                            for (i, n) in e.nodes.iter().enumerate() {
                                if node_visible(i) && emitted.insert(n.index) {
                                    encode_node(&mut w, n, want);
                                }
                            }
                        }
                    },
                    ObjType::Portal => {
                        for p in &e.portals {
                            if emitted.insert(p.index) {
                                encode_portal(&mut w, p, want);
                            }
                        }
                    }
                    ObjType::PortalGroup => {
                        for (i, g) in e.pgs.iter().enumerate() {
                            let ok = match key_node {
                                Some(n) => g.node_name == n.name,
                                None => pg_visible(i),
                            };
                            if ok && emitted.insert(g.index) {
                                encode_pg(&mut w, g, want);
                            }
                        }
                    }
                    ObjType::Dd | ObjType::DdSet => {}
                }
            }
            if w.buf.len() > MAX_REPLY_BYTES {
                return Err(RegistryError::ReplyTooLarge);
            }
            grow(w.buf.len())?;
        }
        Ok(w)
    }
}

/// Appends another writer's TLVs (keeping boundaries for PDU splitting).
fn append(w: &mut TlvWriter, other: &TlvWriter) {
    let base = w.buf.len();
    w.boundaries
        .extend(other.boundaries.iter().map(|b| b + base));
    w.buf.extend_from_slice(&other.buf);
}

fn wants(want: Option<&HashSet<u32>>, t: u32) -> bool {
    want.is_none_or(|w| w.contains(&t))
}

pub fn encode_entity(w: &mut TlvWriter, e: &Entity, want: Option<&HashSet<u32>>) {
    w.string(tag::EID, &e.eid);
    if wants(want, tag::ENTITY_PROTOCOL) {
        w.u32(tag::ENTITY_PROTOCOL, e.protocol);
    }
    if let (Some(ip), true) = (e.mgmt_ip, wants(want, tag::MGMT_IP)) {
        w.ip(tag::MGMT_IP, &ip);
    }
    if wants(want, tag::TIMESTAMP) {
        w.u64(tag::TIMESTAMP, e.timestamp_secs);
    }
    if wants(want, tag::REGISTRATION_PERIOD) {
        w.u32(tag::REGISTRATION_PERIOD, e.period_secs);
    }
    if wants(want, tag::ENTITY_INDEX) {
        w.u32(tag::ENTITY_INDEX, e.index);
    }
}

pub fn encode_node(w: &mut TlvWriter, n: &Node, want: Option<&HashSet<u32>>) {
    w.string(tag::ISCSI_NAME, &n.name);
    if wants(want, tag::ISCSI_NODE_TYPE) {
        w.u32(tag::ISCSI_NODE_TYPE, n.node_type);
    }
    if let (Some(a), true) = (&n.alias, wants(want, tag::ISCSI_ALIAS)) {
        w.string(tag::ISCSI_ALIAS, a);
    }
    if let (Some(b), true) = (n.scn_bitmap, wants(want, tag::ISCSI_SCN_BITMAP)) {
        w.u32(tag::ISCSI_SCN_BITMAP, b);
    }
    if wants(want, tag::ISCSI_NODE_INDEX) {
        w.u32(tag::ISCSI_NODE_INDEX, n.index);
    }
    if let (Some(a), true) = (&n.auth_method, wants(want, tag::ISCSI_AUTH_METHOD)) {
        w.string(tag::ISCSI_AUTH_METHOD, a);
    }
}

pub fn encode_portal(w: &mut TlvWriter, p: &Portal, want: Option<&HashSet<u32>>) {
    w.ip(tag::PORTAL_IP, &p.ip);
    w.u32(tag::PORTAL_PORT, p.port);
    if let (Some(s), true) = (&p.symbolic_name, wants(want, tag::PORTAL_SYMBOLIC_NAME)) {
        w.string(tag::PORTAL_SYMBOLIC_NAME, s);
    }
    if let (Some(v), true) = (p.esi_interval_secs, wants(want, tag::ESI_INTERVAL)) {
        w.u32(tag::ESI_INTERVAL, v);
    }
    if let (Some(v), true) = (p.esi_port, wants(want, tag::ESI_PORT)) {
        w.u32(tag::ESI_PORT, v);
    }
    if wants(want, tag::PORTAL_INDEX) {
        w.u32(tag::PORTAL_INDEX, p.index);
    }
    if let (Some(v), true) = (p.scn_port, wants(want, tag::SCN_PORT)) {
        w.u32(tag::SCN_PORT, v);
    }
    if let (Some(v), true) = (p.security_bitmap, wants(want, tag::PORTAL_SECURITY_BITMAP)) {
        w.u32(tag::PORTAL_SECURITY_BITMAP, v);
    }
}

pub fn encode_pg(w: &mut TlvWriter, g: &PortalGroup, want: Option<&HashSet<u32>>) {
    w.string(tag::PG_ISCSI_NAME, &g.node_name);
    w.ip(tag::PG_PORTAL_IP, &g.ip);
    w.u32(tag::PG_PORTAL_PORT, g.port);
    if wants(want, tag::PG_TAG) {
        match g.tag {
            Some(t) => w.u32(tag::PG_TAG, t),
            None => w.nil(tag::PG_TAG),
        }
    }
    if wants(want, tag::PG_INDEX) {
        w.u32(tag::PG_INDEX, g.index);
    }
}

fn encode_dd_with(
    w: &mut TlvWriter,
    d: &Dd,
    want: Option<&HashSet<u32>>,
    index_of: impl Fn(&str) -> Option<u32>,
) {
    w.u32(tag::DD_ID, d.id);
    if wants(want, tag::DD_NAME) {
        w.string(tag::DD_NAME, &d.name);
    }
    if wants(want, tag::DD_FEATURES) {
        w.u32(tag::DD_FEATURES, d.features);
    }
    let names = wants(want, tag::DD_MEMBER_ISCSI_NAME);
    let idx = wants(want, tag::DD_MEMBER_ISCSI_INDEX);
    for m in &d.members {
        if idx {
            if let Some(i) = index_of(m) {
                w.u32(tag::DD_MEMBER_ISCSI_INDEX, i);
            }
        }
        if names {
            w.string(tag::DD_MEMBER_ISCSI_NAME, m);
        }
    }
}

pub fn encode_ddset(w: &mut TlvWriter, s: &DdSet, want: Option<&HashSet<u32>>) {
    w.u32(tag::DDS_ID, s.id);
    if wants(want, tag::DDS_NAME) {
        w.string(tag::DDS_NAME, &s.name);
    }
    if wants(want, tag::DDS_STATUS) {
        w.u32(tag::DDS_STATUS, u32::from(s.enabled));
    }
    if wants(want, tag::DD_ID) {
        for d in &s.dds {
            w.u32(tag::DD_ID, *d);
        }
    }
}

/// Does an object (encoded) carry every given attribute value? Node types match as
/// bitmasks (a key "target" matches a target that is also an initiator).
fn tlvs_match(w: &TlvWriter, keys: &[Tlv]) -> bool {
    if keys.is_empty() {
        return true;
    }
    let Ok(have) = crate::wire::parse_tlvs(&w.buf) else {
        return false;
    };
    keys.iter().all(|k| {
        have.iter().any(|h| {
            h.tag == k.tag
                && if k.tag == tag::ISCSI_NODE_TYPE {
                    match (h.as_u32(), k.as_u32()) {
                        (Ok(a), Ok(b)) => a & b == b,
                        _ => false,
                    }
                } else if let (Ok(a), Ok(b)) = (h.as_string(), k.as_string()) {
                    // Strings compare without their padding.
                    a == b
                } else {
                    h.value == k.value
                }
        })
    })
}

fn node_matches(n: &Node, keys: &[Tlv]) -> bool {
    // Fast path for the common key "node type".
    if let [k] = keys {
        if k.tag == tag::ISCSI_NODE_TYPE {
            return k.as_u32().is_ok_and(|b| n.node_type & b == b);
        }
    }
    let mut w = TlvWriter::new();
    encode_node(&mut w, n, None);
    tlvs_match(&w, keys)
}

fn entity_matches(e: &Entity, keys: &[Tlv]) -> bool {
    let mut w = TlvWriter::new();
    encode_entity(&mut w, e, None);
    tlvs_match(&w, keys)
}

fn portal_matches(p: &Portal, keys: &[Tlv]) -> bool {
    let mut w = TlvWriter::new();
    encode_portal(&mut w, p, None);
    tlvs_match(&w, keys)
}

fn pg_matches(g: &PortalGroup, keys: &[Tlv]) -> bool {
    let mut w = TlvWriter::new();
    encode_pg(&mut w, g, None);
    tlvs_match(&w, keys)
}

fn ddset_matches(s: &DdSet, keys: &[Tlv]) -> bool {
    let mut w = TlvWriter::new();
    encode_ddset(&mut w, s, None);
    tlvs_match(&w, keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{NodeAttrs, PortalAttrs};
    use std::collections::BTreeMap;

    fn reg_entity(r: &mut Registry, eid: &str, node: &str, esi_port: Option<u32>, now: u64) {
        let ip: Ipv6Addr = "::ffff:127.0.0.1".parse().unwrap();
        let objects = vec![
            RegObject::Portal(PortalAttrs {
                ip: Some(ip),
                port: Some(3260 + r.entities.len() as u32),
                esi_port,
                esi_interval_secs: esi_port.map(|_| 30),
                scn_port: Some(5000),
                ..Default::default()
            }),
            RegObject::Node(NodeAttrs {
                name: node.into(),
                node_type: Some(NODE_TARGET),
                ..Default::default()
            }),
        ];
        let attrs = EntityAttrs {
            period_secs: Some(10),
            ..Default::default()
        };
        let peer = Peer::new("127.0.0.1".parse().unwrap());
        r.register(
            node,
            &peer,
            &RegKey::Eid(eid.into()),
            false,
            &attrs,
            &objects,
            now,
        )
        .unwrap();
    }

    fn parsed(source: &str, command: Command) -> Parsed {
        Parsed {
            source: source.into(),
            command,
        }
    }

    fn reg_cmd(
        eid: &str,
        replace: bool,
        portal: (&str, u32, Option<u32>),
        nodes: &[(&str, u32)],
    ) -> Command {
        let mut objects = vec![RegObject::Portal(PortalAttrs {
            ip: Some(portal.0.parse().unwrap()),
            port: Some(portal.1),
            scn_port: portal.2,
            esi_port: portal.2,
            ..Default::default()
        })];
        for (n, t) in nodes {
            objects.push(RegObject::Node(NodeAttrs {
                name: (*n).into(),
                node_type: Some(*t),
                ..Default::default()
            }));
        }
        Command::DevAttrReg {
            key: RegKey::Eid(eid.into()),
            replace,
            entity: EntityAttrs::default(),
            objects,
        }
    }

    fn status(r: Result<Outcome, RegistryError>) -> Status {
        match r {
            Ok(_) => Status::Success,
            Err(e) => e.status(),
        }
    }

    #[test]
    fn only_the_owner_or_a_control_node_changes_an_entity() {
        let mut r = Registry::new(Policy::default(), 900);
        r.set_control_nodes(BTreeMap::from([
            ("iqn.ctl:any".to_owned(), None),
            (
                "iqn.ctl:pinned".to_owned(),
                Some("10.0.0.9".parse().unwrap()),
            ),
        ]));
        let owner = Peer::new("10.0.0.1".parse().unwrap());
        let evil = Peer::new("10.0.0.66".parse().unwrap());
        let tgt = reg_cmd(
            "e1",
            false,
            ("::ffff:10.0.0.1", 3260, Some(4000)),
            &[("iqn.t:a", NODE_TARGET)],
        );
        assert_eq!(
            status(r.execute_from(&parsed("iqn.t:a", tgt), &owner, 1)),
            Status::Success
        );
        // Hijack: REPLACE with the attacker's portal, claiming the target's own name.
        let hijack = reg_cmd(
            "e1",
            true,
            ("::ffff:10.0.0.66", 3260, None),
            &[("iqn.t:a", NODE_TARGET)],
        );
        assert_eq!(
            status(r.execute_from(&parsed("iqn.t:a", hijack.clone()), &evil, 2)),
            Status::SourceUnauthorized
        );
        // ... or naming a node of its own that "joins" the entity.
        let join = reg_cmd(
            "e1",
            true,
            ("::ffff:10.0.0.66", 3260, None),
            &[("iqn.x:evil", NODE_TARGET)],
        );
        assert_eq!(
            status(r.execute_from(&parsed("iqn.x:evil", join), &evil, 2)),
            Status::SourceUnauthorized
        );
        let p = &r.entities["e1"].portals;
        assert_eq!((p.len(), p[0].ip), (1, "::ffff:10.0.0.1".parse().unwrap()));
        // Deregistration of someone else's entity, node or portal.
        for cmd in [
            Command::DevDereg {
                eids: vec!["e1".into()],
                nodes: vec![],
                portals: vec![],
            },
            Command::DevDereg {
                eids: vec![],
                nodes: vec!["iqn.t:a".into()],
                portals: vec![],
            },
            Command::DevDereg {
                eids: vec![],
                nodes: vec![],
                portals: vec![("::ffff:10.0.0.1".parse().unwrap(), 3260)],
            },
        ] {
            assert_eq!(
                status(r.execute_from(&parsed("iqn.t:a", cmd), &evil, 3)),
                Status::SourceUnauthorized
            );
        }
        // SCN registration for someone else's node.
        let scn = Command::ScnReg {
            node: "iqn.t:a".into(),
            bitmap: scn::OBJECT_ADDED,
        };
        assert_eq!(
            status(r.execute_from(&parsed("iqn.t:a", scn), &evil, 3)),
            Status::SourceUnauthorized
        );
        assert_eq!(r.counts().1, 1);
        // A new entity must hold its source; the control bit is the administrator's to give.
        let other = reg_cmd(
            "e2",
            false,
            ("::ffff:10.0.0.66", 3260, None),
            &[("iqn.x:other", NODE_TARGET)],
        );
        assert_eq!(
            status(r.execute_from(&parsed("iqn.x:evil", other), &evil, 4)),
            Status::SourceUnauthorized
        );
        let ctl = reg_cmd(
            "e3",
            false,
            ("::ffff:10.0.0.66", 3260, None),
            &[("iqn.x:evil", NODE_CONTROL)],
        );
        assert_eq!(
            status(r.execute_from(&parsed("iqn.x:evil", ctl), &evil, 4)),
            Status::SourceUnauthorized
        );
        // DDs: control nodes only; a pinned control node only from its address.
        let dd = || Command::DdReg {
            key: None,
            id: None,
            name: Some("z".into()),
            features: None,
            members: vec![DdMember::Name("iqn.x:evil".into())],
        };
        assert_eq!(
            status(r.execute_from(&parsed("iqn.t:a", dd()), &owner, 5)),
            Status::SourceUnauthorized
        );
        assert_eq!(
            status(r.execute_from(&parsed("iqn.ctl:pinned", dd()), &evil, 5)),
            Status::SourceUnauthorized
        );
        assert_eq!(
            status(r.execute_from(
                &parsed("iqn.ctl:pinned", dd()),
                &Peer::new("10.0.0.9".parse().unwrap()),
                5
            )),
            Status::Success
        );
        let dds = Command::DdsReg {
            key: None,
            id: None,
            name: Some("s".into()),
            enabled: Some(true),
            dds: vec![],
        };
        assert_eq!(
            status(r.execute_from(&parsed("iqn.t:a", dds), &owner, 5)),
            Status::SourceUnauthorized
        );
        // Management SCNs: control nodes only.
        let mgmt = Command::ScnReg {
            node: "iqn.t:a".into(),
            bitmap: scn::MANAGEMENT | scn::DD_MEMBER_ADDED,
        };
        assert_eq!(
            status(r.execute_from(&parsed("iqn.t:a", mgmt), &owner, 6)),
            Status::ScnRegistrationRejected
        );
        // The owner may update (a second target joining from the same host, as tgt does),
        // and a control node may act on any entity from anywhere.
        let second = reg_cmd(
            "e1",
            false,
            ("::ffff:10.0.0.1", 3261, None),
            &[("iqn.t:b", NODE_TARGET)],
        );
        assert_eq!(
            status(r.execute_from(&parsed("iqn.t:b", second), &owner, 7)),
            Status::Success
        );
        let rm = Command::DevDereg {
            eids: vec![],
            nodes: vec!["iqn.t:b".into()],
            portals: vec![],
        };
        assert_eq!(
            status(r.execute_from(&parsed("iqn.ctl:any", rm), &evil, 8)),
            Status::Success
        );
        assert_eq!(r.counts().1, 1);
        // ...without becoming the entity's SCN/ESI address.
        assert_eq!(r.entities["e1"].peer, owner.addr);
        // A pinned control node's name cannot be registered from elsewhere (its SCNs are
        // unscoped).
        let lookalike = reg_cmd(
            "e7",
            false,
            ("::ffff:10.0.0.66", 3390, Some(4000)),
            &[("iqn.ctl:pinned", NODE_INITIATOR)],
        );
        assert_eq!(
            status(r.execute_from(&parsed("iqn.ctl:pinned", lookalike), &evil, 9)),
            Status::SourceUnauthorized
        );
        // An unknown requester (no address) owns nothing.
        let rm = Command::DevDereg {
            eids: vec!["e1".into()],
            nodes: vec![],
            portals: vec![],
        };
        assert_eq!(
            status(r.execute(&parsed("iqn.t:a", rm), 9)),
            Status::SourceUnauthorized
        );
    }

    #[test]
    fn scn_and_esi_go_to_the_registering_peer_not_to_a_named_address() {
        let mut r = Registry::new(Policy::default(), 900);
        let owner = Peer::new("10.0.0.1".parse().unwrap());
        // The portal names a third party's address (192.0.2.7) with SCN and ESI ports.
        let c = reg_cmd(
            "e1",
            false,
            ("::ffff:192.0.2.7", 3260, Some(4000)),
            &[("iqn.t:a", NODE_TARGET)],
        );
        r.execute_from(&parsed("iqn.t:a", c), &owner, 1).unwrap();
        let scn = Command::ScnReg {
            node: "iqn.t:a".into(),
            bitmap: scn::OBJECT_ADDED,
        };
        r.execute_from(&parsed("iqn.t:a", scn), &owner, 1).unwrap();
        let c = reg_cmd(
            "e2",
            false,
            ("::ffff:10.0.0.2", 3260, None),
            &[("iqn.i:b", NODE_INITIATOR)],
        );
        let out = r
            .execute_from(
                &parsed("iqn.i:b", c),
                &Peer::new("10.0.0.2".parse().unwrap()),
                2,
            )
            .unwrap();
        assert_eq!(out.notifications.len(), 1);
        assert_eq!(
            out.notifications[0].addr,
            Some("10.0.0.1:4000".parse().unwrap())
        );
        let t = r.esi_targets(&crate::esi::EsiConfig::default());
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].addr, "10.0.0.1:4000".parse().unwrap());
    }

    #[test]
    fn the_control_node_type_alone_does_not_see_past_zoning() {
        let mut r = Registry::new(Policy { default_dd: false }, 900);
        let p = Peer::new("10.0.0.1".parse().unwrap());
        let c = reg_cmd(
            "e1",
            false,
            ("::ffff:10.0.0.1", 3260, None),
            &[("iqn.t:a", NODE_TARGET)],
        );
        r.execute_from(&parsed("iqn.t:a", c), &p, 1).unwrap();
        // A node that made itself "control" before authorization existed (e.g. replayed
        // from an old log) is not a control node unless the administrator lists it.
        let mut e = (*r.entities["e1"]).clone();
        e.eid = "e9".into();
        e.portals[0].port = 9;
        e.nodes = vec![Node {
            name: "iqn.x:ctl".into(),
            node_type: NODE_CONTROL,
            index: 99,
            alias: None,
            scn_bitmap: None,
            auth_method: None,
        }];
        r.apply(&Record {
            counters: r.counters,
            mutation: Mutation::PutEntity(e),
        });
        assert!(!r.visible(&r.scope_for("iqn.x:ctl"), "iqn.t:a"));
        r.set_control_nodes(BTreeMap::from([("iqn.x:ctl".to_owned(), None)]));
        assert!(r.visible(&r.scope_for("iqn.x:ctl"), "iqn.t:a"));
    }

    /// Registers `count` target nodes named `{prefix}{i:07}` (from `first`) in one entity,
    /// with `alias` on each, from the entity's own first node.
    fn bulk(
        r: &mut Registry,
        eid: &str,
        prefix: &str,
        first: usize,
        count: usize,
        alias: &str,
    ) -> Result<Outcome, RegistryError> {
        let objects: Vec<RegObject> = (first..first + count)
            .map(|i| {
                RegObject::Node(NodeAttrs {
                    name: format!("{prefix}{i:07}"),
                    node_type: Some(NODE_TARGET),
                    alias: (!alias.is_empty()).then(|| alias.to_owned()),
                    ..Default::default()
                })
            })
            .collect();
        let source = format!("{prefix}{first:07}");
        let peer = Peer::new("10.0.0.1".parse().unwrap());
        r.register(
            &source,
            &peer,
            &RegKey::Eid(eid.into()),
            false,
            &EntityAttrs::default(),
            &objects,
            1,
        )
    }

    fn all_targets(wanted: &[u32]) -> Parsed {
        let mut key = TlvWriter::new();
        key.u32(tag::ISCSI_NODE_TYPE, NODE_TARGET);
        let keys = crate::wire::parse_tlvs(&key.buf).unwrap();
        parsed(
            "iqn.q:asker",
            Command::DevAttrQry(QuerySpec {
                key_type: Some(ObjType::Node),
                keys: keys.clone(),
                raw_keys: keys,
                filters: vec![],
                wanted: wanted.to_vec(),
            }),
        )
    }

    /// MAX_NODES is reached: exactly that many nodes register, one more is refused (Busy).
    #[test]
    fn max_nodes_is_reached() {
        let mut r = Registry::new(Policy::default(), 900);
        let mut n = 0;
        let mut k = 0;
        while n < MAX_NODES {
            let count = (MAX_NODES - n).min(MAX_OBJECTS_PER_ENTITY);
            bulk(&mut r, &format!("e{k}"), "iqn.n:", n, count, "").unwrap();
            n += count;
            k += 1;
        }
        assert_eq!(r.counts().1, MAX_NODES);
        let e = bulk(&mut r, "e-over", "iqn.n:", MAX_NODES, 1, "").unwrap_err();
        assert_eq!(e, RegistryError::Full("nodes"));
        assert_eq!(e.status(), Status::Busy);
    }

    /// A reply that would exceed MAX_REPLY_BYTES is refused (Internal Error), not built.
    #[test]
    fn reply_beyond_max_reply_bytes_is_refused() {
        let mut r = Registry::new(Policy::default(), 900);
        let alias = "a".repeat(250);
        // 284 bytes a node with its alias: 15 × 4096 nodes ≈ 17.4 MB > 16 MiB.
        for k in 0..15 {
            bulk(&mut r, &format!("e{k}"), "iqn.big:", k * 4096, 4096, &alias).unwrap();
        }
        let q = all_targets(&[tag::ISCSI_NAME, tag::ISCSI_ALIAS]);
        let r1 = r.execute_from(&q, &Peer::unknown(), 2);
        assert!(
            matches!(r1, Err(RegistryError::ReplyTooLarge)),
            "reply of {:?} bytes",
            r1.map(|o| o.reply.buf.len())
        );
        // Names only (~48 bytes a node) fit.
        let out = r
            .execute_from(&all_targets(&[tag::ISCSI_NAME]), &Peer::unknown(), 2)
            .unwrap();
        assert!(out.reply.buf.len() < MAX_REPLY_BYTES);
    }

    /// A query plan is encoded from what it captured, without the registry: changes made
    /// after planning (the server releases the lock first) neither block nor alter it.
    #[test]
    fn query_plan_encodes_without_the_registry() {
        let mut r = Registry::new(Policy::default(), 900);
        bulk(&mut r, "e0", "iqn.p:", 0, 100, "").unwrap();
        let q = all_targets(&[tag::ISCSI_NAME]);
        let Executed::Query(plan) = r.execute_planned(&q, &Peer::unknown(), 2).unwrap() else {
            panic!("expected a plan");
        };
        assert_eq!(plan.len(), 100);
        // Meanwhile the entity is replaced and then removed.
        bulk(&mut r, "e0", "iqn.p:", 0, 1, "changed").unwrap();
        r.admin_remove_entity("e0").unwrap();
        assert_eq!(r.counts().1, 0);
        let mut steps = 0;
        let w = plan
            .encode(&mut |_| {
                steps += 1;
                Ok(())
            })
            .unwrap();
        let names = crate::wire::parse_tlvs(&w.buf[4..])
            .unwrap()
            .into_iter()
            .filter(|t| t.tag == tag::ISCSI_NAME)
            .count();
        assert_eq!(names, 100);
        assert_eq!(steps, 100);
        // The budget callback stops the encoding.
        bulk(&mut r, "e1", "iqn.p:", 0, 10, "").unwrap();
        let Executed::Query(plan) = r.execute_planned(&q, &Peer::unknown(), 3).unwrap() else {
            panic!("expected a plan");
        };
        assert_eq!(
            plan.encode(&mut |_| Err(RegistryError::Busy)).unwrap_err(),
            RegistryError::Busy
        );
    }

    #[test]
    fn registration_period_expiry_removes_entity_with_scn() {
        let mut r = Registry::new(Policy::default(), 900);
        reg_entity(&mut r, "e1", "iqn.a", None, 1000);
        reg_entity(&mut r, "e2", "iqn.b", None, 1000);
        r.scn_register("iqn.b", Some(scn::OBJECT_REMOVED)).unwrap();
        // e2 is refreshed (a message from its node), e1 is not.
        r.touch("iqn.b", 1008);
        assert!(r.expire(1010).mutations.is_empty());
        let out = r.expire(1011);
        assert_eq!(
            out.mutations
                .iter()
                .map(|m| &m.mutation)
                .collect::<Vec<_>>(),
            vec![&Mutation::RemoveEntity("e1".into())]
        );
        assert_eq!(out.notifications.len(), 1);
        assert_eq!(out.notifications[0].dest, "iqn.b");
        assert_eq!(out.notifications[0].subject, Subject::Node("iqn.a".into()));
        assert_eq!(out.notifications[0].bitmap, scn::OBJECT_REMOVED);
    }

    #[test]
    fn esi_index_follows_registrations_and_drop_removes_entity() {
        let mut r = Registry::new(Policy::default(), 900);
        reg_entity(&mut r, "e1", "iqn.a", Some(7000), 1000);
        reg_entity(&mut r, "e2", "iqn.b", None, 1000);
        r.scn_register("iqn.b", Some(scn::OBJECT_REMOVED)).unwrap();
        let cfg = crate::esi::EsiConfig::default();
        let t = r.esi_targets(&cfg);
        assert_eq!(t.len(), 1);
        assert_eq!(
            (t[0].eid.as_str(), t[0].addr.port(), t[0].interval_secs),
            ("e1", 7000, 30)
        );
        // An ESI answer refreshes the registration period.
        r.touch_entity("e1", 1009);
        assert!(r.expire(1011).mutations.len() == 1, "only e2 expires");
        let out = r.esi_drop_portal("e1", t[0].ip, t[0].port);
        assert_eq!(out.mutations.len(), 1);
        assert_eq!(r.esi_portal_count(), 0);
        assert_eq!(r.counts().0, 0);
        // Snapshot/replay rebuilds the index.
        reg_entity(&mut r, "e3", "iqn.c", Some(7001), 2000);
        let json = serde_json::to_vec(&r).unwrap();
        let mut back: Registry = serde_json::from_slice(&json).unwrap();
        back.rebuild_indexes();
        assert_eq!(back.esi_portal_count(), 1);
    }
}
