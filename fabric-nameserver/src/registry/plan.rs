//! Query plans (what a DevAttrQry answers, decided under the registry lock and encoded
//! after it), and the encoders and key matchers of every object type.

use super::*;

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
    pub(super) head: TlvWriter,
    pub(super) items: Vec<PlanItem>,
    /// Visibility of each item's nodes then portal groups, from `PlanItem::vis`.
    pub(super) visible: Vec<bool>,
    pub(super) types: BTreeSet<ObjType>,
    pub(super) want: Option<HashSet<u32>>,
}

#[derive(Debug)]
pub(super) struct PlanItem {
    e: Arc<Entity>,
    key_node: Option<usize>,
    vis: usize,
}

impl QueryPlan {
    pub(super) fn add(
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
pub(super) fn append(w: &mut TlvWriter, other: &TlvWriter) {
    let base = w.buf.len();
    w.boundaries
        .extend(other.boundaries.iter().map(|b| b + base));
    w.buf.extend_from_slice(&other.buf);
}

pub(super) fn wants(want: Option<&HashSet<u32>>, t: u32) -> bool {
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

pub(super) fn encode_dd_with(
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
pub(super) fn tlvs_match(w: &TlvWriter, keys: &[Tlv]) -> bool {
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

pub(super) fn node_matches(n: &Node, keys: &[Tlv]) -> bool {
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

pub(super) fn entity_matches(e: &Entity, keys: &[Tlv]) -> bool {
    let mut w = TlvWriter::new();
    encode_entity(&mut w, e, None);
    tlvs_match(&w, keys)
}

pub(super) fn portal_matches(p: &Portal, keys: &[Tlv]) -> bool {
    let mut w = TlvWriter::new();
    encode_portal(&mut w, p, None);
    tlvs_match(&w, keys)
}

pub(super) fn pg_matches(g: &PortalGroup, keys: &[Tlv]) -> bool {
    let mut w = TlvWriter::new();
    encode_pg(&mut w, g, None);
    tlvs_match(&w, keys)
}

pub(super) fn ddset_matches(s: &DdSet, keys: &[Tlv]) -> bool {
    let mut w = TlvWriter::new();
    encode_ddset(&mut w, s, None);
    tlvs_match(&w, keys)
}
