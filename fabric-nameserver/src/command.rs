//! Requests as typed commands: a pure translation of a parsed iSNSP [`Request`] (TLVs) into a
//! validated [`Command`], so that the registry executes only well-formed operations. Every
//! length, count and string is checked here; nothing here touches state.

use std::net::Ipv6Addr;

use thiserror::Error;

use crate::wire::{func, tag, Request, Status, Tlv, WireError};

/// Longest iSCSI name / EID / alias / DD name we store. RFC 3720 limits iSCSI names to 223
/// bytes and RFC 4171 EIDs to 255; a bound keeps one registration's memory small.
pub const MAX_NAME_BYTES: usize = 255;
/// Most objects (portals + nodes + portal groups) in one registration message.
pub const MAX_OBJECTS_PER_MESSAGE: usize = 4096;
/// Most members named in one DD/DDS registration or deregistration message.
pub const MAX_MEMBERS_PER_MESSAGE: usize = 16384;

/// A request that cannot be executed, with the status the response carries.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CommandError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("source attribute missing")]
    SourceAbsent,
    #[error("invalid registration: {0}")]
    InvalidRegistration(String),
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    #[error("attribute {0} not implemented")]
    NotImplemented(u32),
    #[error("function {0} not supported")]
    Unsupported(u16),
    #[error("authentication blocks are not supported")]
    Auth,
    #[error("string attribute {0} longer than {MAX_NAME_BYTES} bytes")]
    TooLong(u32),
    #[error("too many objects or members in one message")]
    TooMany,
}

impl CommandError {
    pub fn status(&self) -> Status {
        match self {
            CommandError::Wire(w) => w.status(),
            CommandError::SourceAbsent => Status::SourceAbsent,
            CommandError::InvalidRegistration(_) => Status::InvalidRegistration,
            CommandError::InvalidQuery(_) => Status::InvalidQuery,
            CommandError::NotImplemented(_) => Status::AttributeNotImplemented,
            CommandError::Unsupported(_) => Status::MessageNotSupported,
            CommandError::Auth => Status::AuthUnknown,
            CommandError::TooLong(_) => Status::MessageFormat,
            CommandError::TooMany => Status::MessageFormat,
        }
    }
}

/// Object types of the iSNS data model that this server stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjType {
    Entity,
    Node,
    Portal,
    PortalGroup,
    Dd,
    DdSet,
}

impl ObjType {
    /// The object type an attribute tag belongs to.
    pub fn of_tag(t: u32) -> Option<ObjType> {
        match t {
            1..=15 => Some(ObjType::Entity),
            16..=31 => Some(ObjType::Portal),
            32..=47 => Some(ObjType::Node),
            48..=63 => Some(ObjType::PortalGroup),
            2049..=2064 => Some(ObjType::DdSet),
            2065..=2080 => Some(ObjType::Dd),
            _ => None,
        }
    }

    /// Key attributes, in the order they open an object in a message.
    pub fn key_tags(self) -> &'static [u32] {
        match self {
            ObjType::Entity => &[tag::EID],
            ObjType::Node => &[tag::ISCSI_NAME],
            ObjType::Portal => &[tag::PORTAL_IP, tag::PORTAL_PORT],
            ObjType::PortalGroup => &[tag::PG_ISCSI_NAME, tag::PG_PORTAL_IP, tag::PG_PORTAL_PORT],
            ObjType::Dd => &[tag::DD_ID],
            ObjType::DdSet => &[tag::DDS_ID],
        }
    }
}

/// An IP address attribute, IPv4 normalised to the v4-mapped form RFC 4171 §6.3.1 asks for
/// (open-isns sends the IPv4-compatible `::a.b.c.d` form; both denote the same portal).
fn ip(t: &Tlv) -> Result<Ipv6Addr, CommandError> {
    Ok(normalize_ip(t.as_ip()?))
}

/// Normalises an IPv4-compatible address (`::a.b.c.d`) to the v4-mapped form. Pure.
pub fn normalize_ip(a: Ipv6Addr) -> Ipv6Addr {
    let s = a.segments();
    if s[..6] == [0; 6] && !a.is_unspecified() && !a.is_loopback() {
        let o = a.octets();
        return std::net::Ipv4Addr::new(o[12], o[13], o[14], o[15]).to_ipv6_mapped();
    }
    a
}

fn string(t: &Tlv) -> Result<String, CommandError> {
    let s = t.as_string()?;
    if s.len() > MAX_NAME_BYTES {
        return Err(CommandError::TooLong(t.tag));
    }
    Ok(s)
}

/// Attributes of a Network Entity in a registration (all optional: updates).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntityAttrs {
    pub eid: Option<String>,
    pub protocol: Option<u32>,
    pub mgmt_ip: Option<Ipv6Addr>,
    pub period_secs: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortalAttrs {
    pub ip: Option<Ipv6Addr>,
    pub port: Option<u32>,
    pub symbolic_name: Option<String>,
    pub esi_interval_secs: Option<u32>,
    pub esi_port: Option<u32>,
    pub scn_port: Option<u32>,
    pub security_bitmap: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeAttrs {
    pub name: String,
    pub node_type: Option<u32>,
    pub alias: Option<String>,
    pub scn_bitmap: Option<u32>,
    pub auth_method: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgAttrs {
    pub node_name: Option<String>,
    pub ip: Option<Ipv6Addr>,
    pub port: Option<u32>,
    pub tag: Option<u32>,
}

/// One object in the operating attributes of a DevAttrReg.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegObject {
    Portal(PortalAttrs),
    Node(NodeAttrs),
    PortalGroup(PgAttrs),
}

/// What identifies the entity a DevAttrReg is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegKey {
    /// No key: a new entity (or the source's).
    None,
    /// EID key; empty means "assign one".
    Eid(String),
    Node(String),
    Portal(Ipv6Addr, u32),
}

/// A query (DevAttrQry) or iteration (DevGetNext), validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuerySpec {
    /// Type of the key objects; `None` when the key is empty (then: all objects of the
    /// requested types).
    pub key_type: Option<ObjType>,
    /// Non-empty key attributes, matched against objects of `key_type`.
    pub keys: Vec<Tlv>,
    /// The key exactly as sent, echoed in the response.
    pub raw_keys: Vec<Tlv>,
    /// Non-empty operating attributes: further filters (DevGetNext scope).
    pub filters: Vec<Tlv>,
    /// Tags requested with zero-length operating attributes (empty: all).
    pub wanted: Vec<u32>,
}

/// A DD or DDS member reference in DDReg/DDDereg.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DdMember {
    Name(String),
    Index(u32),
}

/// A validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    DevAttrReg {
        key: RegKey,
        replace: bool,
        entity: EntityAttrs,
        objects: Vec<RegObject>,
    },
    DevAttrQry(QuerySpec),
    DevGetNext(QuerySpec),
    DevDereg {
        eids: Vec<String>,
        nodes: Vec<String>,
        portals: Vec<(Ipv6Addr, u32)>,
    },
    ScnReg {
        node: String,
        bitmap: u32,
    },
    ScnDereg {
        node: String,
    },
    DdReg {
        key: Option<u32>,
        id: Option<u32>,
        name: Option<String>,
        features: Option<u32>,
        members: Vec<DdMember>,
    },
    DdDereg {
        id: u32,
        members: Vec<DdMember>,
    },
    DdsReg {
        key: Option<u32>,
        id: Option<u32>,
        name: Option<String>,
        enabled: Option<bool>,
        dds: Vec<u32>,
    },
    DdsDereg {
        id: u32,
        dds: Vec<u32>,
    },
}

/// A request with its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// iSCSI name of the source (the only source form iSCSI clients send).
    pub source: String,
    pub command: Command,
}

/// Validates a request. Pure.
pub fn parse_command(req: &Request) -> Result<Parsed, CommandError> {
    if req.flags & crate::wire::FLAG_AUTH != 0 {
        return Err(CommandError::Auth);
    }
    let source = match &req.source {
        Some(t) if t.tag == tag::ISCSI_NAME && !t.is_nil() => string(t)?,
        Some(t) if ObjType::of_tag(t.tag).is_none() && t.tag != tag::DELIMITER => {
            return Err(CommandError::NotImplemented(t.tag))
        }
        _ => return Err(CommandError::SourceAbsent),
    };
    let command = match req.function {
        func::DEV_ATTR_REG => parse_reg(req)?,
        func::DEV_ATTR_QRY => Command::DevAttrQry(parse_query(req, false)?),
        func::DEV_GET_NEXT => Command::DevGetNext(parse_query(req, true)?),
        func::DEV_DEREG => parse_dereg(req)?,
        func::SCN_REG | func::SCN_DEREG => parse_scn(req)?,
        func::DD_REG | func::DD_DEREG => parse_dd(req)?,
        func::DDS_REG | func::DDS_DEREG => parse_dds(req)?,
        f => return Err(CommandError::Unsupported(f)),
    };
    Ok(Parsed { source, command })
}

fn parse_reg(req: &Request) -> Result<Command, CommandError> {
    let mut key = RegKey::None;
    let mut i = 0;
    while i < req.keys.len() {
        let t = &req.keys[i];
        match t.tag {
            tag::EID => key = RegKey::Eid(string(t)?),
            tag::ISCSI_NAME => key = RegKey::Node(string(t)?),
            tag::PORTAL_IP => {
                let port = req
                    .keys
                    .get(i + 1)
                    .filter(|p| p.tag == tag::PORTAL_PORT)
                    .ok_or_else(|| {
                        CommandError::InvalidRegistration("portal key lacks port".into())
                    })?;
                key = RegKey::Portal(ip(t)?, port.as_u32()?);
                i += 1;
            }
            other => {
                return Err(CommandError::InvalidRegistration(format!(
                    "unsupported message key attribute {other}"
                )))
            }
        }
        i += 1;
    }
    let mut entity = EntityAttrs::default();
    let mut objects: Vec<RegObject> = Vec::new();
    for t in &req.ops {
        if objects.len() > MAX_OBJECTS_PER_MESSAGE {
            return Err(CommandError::TooMany);
        }
        // A key attribute opens a new object; other attributes belong to the last object of
        // their type (RFC 4171 §5.6.5.1: objects are listed key first).
        match t.tag {
            tag::EID => entity.eid = Some(string(t)?),
            tag::ENTITY_PROTOCOL => entity.protocol = Some(t.as_u32()?),
            tag::MGMT_IP => entity.mgmt_ip = Some(ip(t)?),
            tag::REGISTRATION_PERIOD => entity.period_secs = Some(t.as_u32()?),
            // Server-assigned or read-only: ignored on registration.
            tag::TIMESTAMP | tag::ENTITY_INDEX | tag::PROTOCOL_VERSION_RANGE => {}
            tag::PORTAL_IP => objects.push(RegObject::Portal(PortalAttrs {
                ip: Some(ip(t)?),
                ..Default::default()
            })),
            tag::PORTAL_PORT
            | tag::PORTAL_SYMBOLIC_NAME
            | tag::ESI_INTERVAL
            | tag::ESI_PORT
            | tag::SCN_PORT
            | tag::PORTAL_SECURITY_BITMAP
            | tag::PORTAL_INDEX => {
                // Portal attributes follow their portal's IP address; one before any is a
                // client error.
                let p = match objects.iter_mut().rev().find_map(|o| match o {
                    RegObject::Portal(p) => Some(p),
                    _ => None,
                }) {
                    Some(p) => p,
                    None => {
                        return Err(CommandError::InvalidRegistration(format!(
                            "portal attribute {} before a portal IP address",
                            t.tag
                        )))
                    }
                };
                match t.tag {
                    tag::PORTAL_PORT => p.port = Some(t.as_u32()?),
                    tag::PORTAL_SYMBOLIC_NAME => p.symbolic_name = Some(string(t)?),
                    tag::ESI_INTERVAL => p.esi_interval_secs = Some(t.as_u32()?),
                    tag::ESI_PORT => p.esi_port = Some(t.as_u32()?),
                    tag::SCN_PORT => p.scn_port = Some(t.as_u32()?),
                    tag::PORTAL_SECURITY_BITMAP => p.security_bitmap = Some(t.as_u32()?),
                    _ => {}
                }
            }
            tag::ISCSI_NAME => objects.push(RegObject::Node(NodeAttrs {
                name: string(t)?,
                ..Default::default()
            })),
            tag::ISCSI_NODE_TYPE
            | tag::ISCSI_ALIAS
            | tag::ISCSI_SCN_BITMAP
            | tag::ISCSI_AUTH_METHOD
            | tag::ISCSI_NODE_INDEX
            | tag::WWNN_TOKEN => {
                let n = match objects.iter_mut().rev().find_map(|o| match o {
                    RegObject::Node(n) => Some(n),
                    _ => None,
                }) {
                    Some(n) => n,
                    None => {
                        return Err(CommandError::InvalidRegistration(format!(
                            "node attribute {} before an iSCSI name",
                            t.tag
                        )))
                    }
                };
                match t.tag {
                    tag::ISCSI_NODE_TYPE => n.node_type = Some(t.as_u32()?),
                    tag::ISCSI_ALIAS => n.alias = Some(string(t)?),
                    tag::ISCSI_SCN_BITMAP => n.scn_bitmap = Some(t.as_u32()?),
                    tag::ISCSI_AUTH_METHOD => n.auth_method = Some(string(t)?),
                    _ => {}
                }
            }
            tag::PG_ISCSI_NAME => objects.push(RegObject::PortalGroup(PgAttrs {
                node_name: Some(string(t)?),
                ..Default::default()
            })),
            tag::PG_PORTAL_IP | tag::PG_PORTAL_PORT | tag::PG_TAG | tag::PG_INDEX => {
                let g = match objects.iter_mut().rev().find_map(|o| match o {
                    RegObject::PortalGroup(g) => Some(g),
                    _ => None,
                }) {
                    Some(g) => g,
                    None => {
                        return Err(CommandError::InvalidRegistration(format!(
                            "portal group attribute {} before a PG iSCSI name",
                            t.tag
                        )))
                    }
                };
                match t.tag {
                    tag::PG_PORTAL_IP => g.ip = Some(ip(t)?),
                    tag::PG_PORTAL_PORT => g.port = Some(t.as_u32()?),
                    // A NIL PGT means "no access through this portal group": kept as None.
                    tag::PG_TAG if !t.is_nil() => g.tag = Some(t.as_u32()?),
                    _ => {}
                }
            }
            other => return Err(CommandError::NotImplemented(other)),
        }
    }
    for o in &objects {
        match o {
            RegObject::Portal(p) if p.port.is_none() => {
                return Err(CommandError::InvalidRegistration(
                    "portal without a port".into(),
                ))
            }
            RegObject::PortalGroup(g) if g.ip.is_none() || g.port.is_none() => {
                return Err(CommandError::InvalidRegistration(
                    "portal group without portal address and port".into(),
                ))
            }
            _ => {}
        }
    }
    Ok(Command::DevAttrReg {
        key,
        replace: req.replace(),
        entity,
        objects,
    })
}

fn parse_query(req: &Request, getnext: bool) -> Result<QuerySpec, CommandError> {
    let mut key_type = None;
    for t in &req.keys {
        let ty = ObjType::of_tag(t.tag).ok_or(CommandError::NotImplemented(t.tag))?;
        if key_type.is_some_and(|k| k != ty) {
            return Err(CommandError::InvalidQuery(
                "key attributes of different object types".into(),
            ));
        }
        key_type = Some(ty);
    }
    if getnext && key_type.is_none() {
        return Err(CommandError::InvalidQuery(
            "DevGetNext without a key".into(),
        ));
    }
    let mut filters = Vec::new();
    let mut wanted = Vec::new();
    for t in &req.ops {
        if t.is_nil() {
            wanted.push(t.tag);
        } else if getnext {
            filters.push(t.clone());
        } else {
            return Err(CommandError::InvalidQuery(format!(
                "operating attribute {} has a value",
                t.tag
            )));
        }
    }
    if getnext {
        // RFC 4171 §5.6.5.3: the operating attributes of DevGetNext are of the key's type.
        for t in filters.iter().map(|t| t.tag).chain(wanted.iter().copied()) {
            if ObjType::of_tag(t) != key_type {
                return Err(CommandError::InvalidQuery(format!(
                    "attribute {t} is not of the key's object type"
                )));
            }
        }
    }
    // Address keys compare in the stored (v4-mapped) form.
    let norm = |t: &Tlv| -> Tlv {
        let is_ip = matches!(
            t.tag,
            tag::MGMT_IP | tag::PORTAL_IP | tag::PG_PORTAL_IP | tag::DD_MEMBER_PORTAL_IP
        );
        match (is_ip, ip(t)) {
            (true, Ok(a)) => Tlv {
                tag: t.tag,
                value: a.octets().to_vec(),
            },
            _ => t.clone(),
        }
    };
    let filters = filters.iter().map(norm).collect();
    Ok(QuerySpec {
        key_type,
        keys: req.keys.iter().filter(|t| !t.is_nil()).map(norm).collect(),
        raw_keys: req.keys.clone(),
        filters,
        wanted,
    })
}

fn parse_dereg(req: &Request) -> Result<Command, CommandError> {
    let (mut eids, mut nodes, mut portals) = (Vec::new(), Vec::new(), Vec::new());
    // Objects to remove are listed in the operating attributes; some clients put them in
    // the key instead, so both are read.
    let all: Vec<&Tlv> = req.keys.iter().chain(req.ops.iter()).collect();
    let mut i = 0;
    while i < all.len() {
        if eids.len() + nodes.len() + portals.len() > MAX_OBJECTS_PER_MESSAGE {
            return Err(CommandError::TooMany);
        }
        let t = all[i];
        match t.tag {
            tag::EID => eids.push(string(t)?),
            tag::ISCSI_NAME => nodes.push(string(t)?),
            tag::PORTAL_IP => {
                let port = all
                    .get(i + 1)
                    .filter(|p| p.tag == tag::PORTAL_PORT)
                    .ok_or_else(|| CommandError::InvalidQuery("portal without port".into()))?;
                portals.push((ip(t)?, port.as_u32()?));
                i += 1;
            }
            other => return Err(CommandError::NotImplemented(other)),
        }
        i += 1;
    }
    Ok(Command::DevDereg {
        eids,
        nodes,
        portals,
    })
}

fn parse_scn(req: &Request) -> Result<Command, CommandError> {
    let node = req
        .keys
        .iter()
        .find(|t| t.tag == tag::ISCSI_NAME)
        .ok_or_else(|| CommandError::InvalidQuery("SCN registration without a node key".into()))
        .and_then(string)?;
    if req.function == func::SCN_DEREG {
        return Ok(Command::ScnDereg { node });
    }
    let bitmap = req
        .ops
        .iter()
        .find(|t| t.tag == tag::ISCSI_SCN_BITMAP)
        .ok_or_else(|| CommandError::InvalidQuery("SCN registration without a bitmap".into()))?
        .as_u32()?;
    Ok(Command::ScnReg { node, bitmap })
}

fn dd_members(tlvs: &[Tlv]) -> Result<Vec<DdMember>, CommandError> {
    let mut out = Vec::new();
    for t in tlvs {
        match t.tag {
            tag::DD_MEMBER_ISCSI_NAME => out.push(DdMember::Name(string(t)?)),
            tag::DD_MEMBER_ISCSI_INDEX => out.push(DdMember::Index(t.as_u32()?)),
            tag::DD_MEMBER_FC_PORT_NAME
            | tag::DD_MEMBER_PORTAL_INDEX
            | tag::DD_MEMBER_PORTAL_IP
            | tag::DD_MEMBER_PORTAL_PORT => return Err(CommandError::NotImplemented(t.tag)),
            _ => {}
        }
        if out.len() > MAX_MEMBERS_PER_MESSAGE {
            return Err(CommandError::TooMany);
        }
    }
    Ok(out)
}

fn key_u32(keys: &[Tlv], t: u32) -> Result<Option<u32>, CommandError> {
    keys.iter()
        .find(|k| k.tag == t && !k.is_nil())
        .map(|k| k.as_u32().map_err(CommandError::from))
        .transpose()
}

fn parse_dd(req: &Request) -> Result<Command, CommandError> {
    let key = key_u32(&req.keys, tag::DD_ID)?;
    let members = dd_members(&req.ops)?;
    if req.function == func::DD_DEREG {
        let id = key.ok_or_else(|| CommandError::InvalidQuery("DDDereg without DD_ID".into()))?;
        return Ok(Command::DdDereg { id, members });
    }
    let mut name = None;
    let mut features = None;
    for t in &req.ops {
        match t.tag {
            tag::DD_NAME => name = Some(string(t)?),
            tag::DD_FEATURES if !t.is_nil() => features = Some(t.as_u32()?),
            _ => {}
        }
    }
    Ok(Command::DdReg {
        key,
        id: key_u32(&req.ops, tag::DD_ID)?,
        name,
        features,
        members,
    })
}

fn parse_dds(req: &Request) -> Result<Command, CommandError> {
    let key = key_u32(&req.keys, tag::DDS_ID)?;
    let mut dds = Vec::new();
    for t in &req.ops {
        if t.tag == tag::DD_ID {
            dds.push(t.as_u32()?);
            if dds.len() > MAX_MEMBERS_PER_MESSAGE {
                return Err(CommandError::TooMany);
            }
        }
    }
    if req.function == func::DDS_DEREG {
        let id = key.ok_or_else(|| CommandError::InvalidQuery("DDSDereg without DDS_ID".into()))?;
        return Ok(Command::DdsDereg { id, dds });
    }
    let mut name = None;
    let mut enabled = None;
    for t in &req.ops {
        match t.tag {
            tag::DDS_NAME => name = Some(string(t)?),
            tag::DDS_STATUS if !t.is_nil() => enabled = Some(t.as_u32()? & 1 != 0),
            _ => {}
        }
    }
    Ok(Command::DdsReg {
        key,
        id: key_u32(&req.ops, tag::DDS_ID)?,
        name,
        enabled,
        dds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{parse_request, Message, TlvWriter, FLAG_CLIENT, FLAG_REPLACE};
    use proptest::prelude::*;

    fn req(function: u16, flags: u16, build: impl FnOnce(&mut TlvWriter)) -> Request {
        let mut w = TlvWriter::new();
        build(&mut w);
        parse_request(&Message {
            function,
            flags,
            xid: 1,
            payload: w.buf,
        })
        .unwrap()
    }

    #[test]
    fn tgt_style_registration() {
        let ip: Ipv6Addr = "::ffff:127.0.0.1".parse().unwrap();
        let r = req(func::DEV_ATTR_REG, FLAG_CLIENT | FLAG_REPLACE, |w| {
            w.string(tag::ISCSI_NAME, "iqn.t:1");
            w.string(tag::EID, "host");
            w.delimiter();
            w.string(tag::EID, "host");
            w.u32(tag::ENTITY_PROTOCOL, 2);
            w.ip(tag::PORTAL_IP, &ip);
            w.u32(tag::PORTAL_PORT, 3260);
            w.u32(tag::SCN_PORT, 4000);
            w.string(tag::ISCSI_NAME, "iqn.t:1");
            w.u32(tag::ISCSI_NODE_TYPE, 1);
        });
        let p = parse_command(&r).unwrap();
        assert_eq!(p.source, "iqn.t:1");
        match p.command {
            Command::DevAttrReg {
                key,
                replace,
                entity,
                objects,
            } => {
                assert_eq!(key, RegKey::Eid("host".into()));
                assert!(replace);
                assert_eq!(entity.protocol, Some(2));
                assert_eq!(objects.len(), 2);
                assert!(
                    matches!(&objects[0], RegObject::Portal(p) if p.scn_port == Some(4000) && p.port == Some(3260))
                );
                assert!(matches!(&objects[1], RegObject::Node(n) if n.node_type == Some(1)));
            }
            c => panic!("unexpected {c:?}"),
        }
    }

    #[test]
    fn errors_map_to_rfc_statuses() {
        let r = req(func::DEV_ATTR_QRY, FLAG_CLIENT, |w| {
            w.delimiter();
        });
        assert_eq!(
            parse_command(&r).unwrap_err().status(),
            Status::SourceAbsent
        );
        let r = req(func::DEV_ATTR_REG, FLAG_CLIENT, |w| {
            w.string(tag::ISCSI_NAME, "s");
            w.delimiter();
            w.u32(tag::ISCSI_NODE_TYPE, 1);
        });
        assert_eq!(
            parse_command(&r).unwrap_err().status(),
            Status::InvalidRegistration
        );
        let r = req(func::DEV_ATTR_REG, FLAG_CLIENT, |w| {
            w.string(tag::ISCSI_NAME, "s");
            w.delimiter();
            w.u32(9999, 1);
        });
        assert_eq!(
            parse_command(&r).unwrap_err().status(),
            Status::AttributeNotImplemented
        );
        let r = req(func::ESI, FLAG_CLIENT, |w| {
            w.string(tag::ISCSI_NAME, "s");
        });
        assert_eq!(
            parse_command(&r).unwrap_err().status(),
            Status::MessageNotSupported
        );
        let r = req(func::DEV_ATTR_QRY, FLAG_CLIENT, |w| {
            w.string(tag::ISCSI_NAME, "s");
            w.string(tag::ISCSI_NAME, "k");
            w.string(tag::EID, "e");
        });
        assert_eq!(
            parse_command(&r).unwrap_err().status(),
            Status::InvalidQuery
        );
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        let r = req(func::DEV_ATTR_QRY, FLAG_CLIENT, |w| {
            w.string(tag::ISCSI_NAME, &long);
        });
        assert_eq!(
            parse_command(&r).unwrap_err().status(),
            Status::MessageFormat
        );
    }

    proptest! {
        // Any sequence of attributes with plausible tags yields a command or an error status,
        // never a panic.
        #[test]
        fn parse_command_is_total(
            function in 0u16..16,
            flags in any::<u16>(),
            tlvs in proptest::collection::vec(
                (prop_oneof![0u32..64, 2049u32..2080, any::<u32>()],
                 proptest::collection::vec(any::<u8>(), 0..6)), 0..24)) {
            let mut w = TlvWriter::new();
            for (t, v) in &tlvs {
                let mut v = v.clone();
                v.resize(v.len().div_ceil(4) * 4, 0);
                w.tlv(&Tlv { tag: *t, value: v });
            }
            let r = parse_request(&Message { function, flags, xid: 0, payload: w.buf }).unwrap();
            if let Err(e) = parse_command(&r) {
                prop_assert_ne!(e.status(), Status::Success);
            }
        }
    }
}
