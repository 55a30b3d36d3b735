//! The registry's objects and what its operations produce: entities with their portals,
//! nodes and portal groups; discovery domains and DD sets; the policy; the server-assigned
//! counters; the logged mutations and records; outcomes, notifications, errors; who asks
//! (scope, peer).

use super::*;

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
    pub(super) fn children(&self) -> usize {
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
    pub(super) name: Option<String>,
    pub(super) control: bool,
    pub(super) dds: BTreeSet<u32>,
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
pub(super) mod shared_entities {
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
