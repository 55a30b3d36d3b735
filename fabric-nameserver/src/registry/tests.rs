//! The registry's unit tests: authorization, SCN/ESI addressing, zoning, limits, query
//! plans, expiry, ESI.

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
