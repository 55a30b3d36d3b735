//! The server over real TCP with a raw iSNSP client: registration, queries, iteration,
//! deregistration, large multi-PDU replies, zoning, SCN delivery, hostile input, restart.
// Test code: helpers outside #[test] functions panic on failure too.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use common::*;
use fabric_nameserver::wire::{
    func, parse_tlvs, tag, Header, Status, TlvWriter, FLAG_CLIENT, FLAG_FIRST_PDU, FLAG_LAST_PDU,
    HEADER_LEN, MAX_REPLY_PDU_BYTES,
};

const TARGET: u32 = 1;
const INITIATOR: u32 = 2;

#[test]
fn register_query_iterate_deregister() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start_server(dir.path());
    let mut c = Client::connect(srv.local_addr);
    let r = c.call(
        func::DEV_ATTR_REG,
        0,
        &registration(
            "iqn.t:a",
            "ent-a",
            3260,
            None,
            &[("iqn.t:a", TARGET), ("iqn.t:b", TARGET)],
        ),
    );
    assert_eq!(r.status, 0);
    assert_eq!(r.strings(tag::EID)[0], "ent-a");
    let r = c.call(
        func::DEV_ATTR_REG,
        0,
        &registration("iqn.i:1", "ent-i", 3261, None, &[("iqn.i:1", INITIATOR)]),
    );
    assert_eq!(r.status, 0);

    // Single node by name: node type returned.
    let r = c.call(func::DEV_ATTR_QRY, 0, &query_name("iqn.i:1", "iqn.t:b"));
    assert_eq!(r.status, 0);
    assert_eq!(r.strings(tag::ISCSI_NAME), vec!["iqn.t:b", "iqn.t:b"]);
    let types: Vec<u32> = r
        .tlvs
        .iter()
        .filter(|t| t.tag == tag::ISCSI_NODE_TYPE && !t.is_nil())
        .map(|t| t.as_u32().unwrap())
        .collect();
    assert_eq!(types, vec![TARGET]);
    assert_eq!(
        visible(&mut c, "iqn.i:1", TARGET),
        vec!["iqn.t:a", "iqn.t:b"]
    );
    assert_eq!(visible(&mut c, "iqn.t:a", INITIATOR), vec!["iqn.i:1"]);

    // DevGetNext walks every node in name order, then answers No Such Entry.
    let mut seen = Vec::new();
    let mut last: Option<String> = None;
    loop {
        let mut w = TlvWriter::new();
        w.string(tag::ISCSI_NAME, "iqn.i:1");
        match &last {
            Some(n) => w.string(tag::ISCSI_NAME, n),
            None => w.nil(tag::ISCSI_NAME),
        }
        w.delimiter();
        let r = c.call(func::DEV_GET_NEXT, 0, &w);
        if r.status == Status::NoSuchEntry as u32 {
            break;
        }
        assert_eq!(r.status, 0);
        let name = r.strings(tag::ISCSI_NAME)[0].clone();
        seen.push(name.clone());
        last = Some(name);
    }
    assert_eq!(seen, vec!["iqn.i:1", "iqn.t:a", "iqn.t:b"]);

    // Deregister one node, then the entity.
    let mut w = TlvWriter::new();
    w.string(tag::ISCSI_NAME, "iqn.t:a");
    w.delimiter();
    w.string(tag::ISCSI_NAME, "iqn.t:b");
    assert_eq!(c.call(func::DEV_DEREG, 0, &w).status, 0);
    assert_eq!(visible(&mut c, "iqn.i:1", TARGET), vec!["iqn.t:a"]);
    let mut w = TlvWriter::new();
    w.string(tag::ISCSI_NAME, "iqn.t:a");
    w.delimiter();
    w.string(tag::EID, "ent-a");
    assert_eq!(c.call(func::DEV_DEREG, 0, &w).status, 0);
    assert!(visible(&mut c, "iqn.i:1", TARGET).is_empty());
    let st = srv.service.report();
    assert_eq!((st.entities, st.nodes), (1, 1));
    srv.shutdown();
}

#[test]
fn replace_flag_replaces_children_and_portals_cannot_move() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start_server(dir.path());
    let mut c = Client::connect(srv.local_addr);
    let reg = registration(
        "iqn.t:a",
        "e1",
        3260,
        None,
        &[("iqn.t:a", TARGET), ("iqn.t:b", TARGET)],
    );
    assert_eq!(c.call(func::DEV_ATTR_REG, 0, &reg).status, 0);
    let reg = registration("iqn.t:c", "e1", 3260, None, &[("iqn.t:c", TARGET)]);
    assert_eq!(c.call(func::DEV_ATTR_REG, 0x1000, &reg).status, 0);
    assert_eq!(visible(&mut c, "iqn.t:c", TARGET), vec!["iqn.t:c"]);
    // Another entity claiming the same portal is refused (Invalid Registration).
    let reg = registration("iqn.t:d", "e2", 3260, None, &[("iqn.t:d", TARGET)]);
    assert_eq!(
        c.call(func::DEV_ATTR_REG, 0, &reg).status,
        Status::InvalidRegistration as u32
    );
    srv.shutdown();
}

#[test]
fn hundred_thousand_nodes_all_targets_query_is_split_into_8k_pdus() {
    const NODES: usize = 100_000;
    const PER_ENTITY: usize = 4000;
    let dir = tempfile::tempdir().unwrap();
    let srv = start_server(dir.path());
    let mut c = Client::connect(srv.local_addr);
    let t0 = Instant::now();
    for e in 0..NODES / PER_ENTITY {
        let names: Vec<String> = (0..PER_ENTITY)
            .map(|i| format!("iqn.2024-01.test:t{:06}", e * PER_ENTITY + i))
            .collect();
        let nodes: Vec<(&str, u32)> = names.iter().map(|n| (n.as_str(), TARGET)).collect();
        let reg = registration(&names[0], &format!("e{e}"), 3260 + e as u32, None, &nodes);
        // 4000 nodes do not fit one 64 KiB PDU: the request itself is multi-PDU.
        assert_eq!(c.call(func::DEV_ATTR_REG, 0, &reg).status, 0);
    }
    let reg_elapsed = t0.elapsed();
    let t1 = Instant::now();
    let r = c.call(
        func::DEV_ATTR_QRY,
        0,
        &query_type("iqn.2024-01.test:t000000", TARGET),
    );
    let q_elapsed = t1.elapsed();
    assert_eq!(r.status, 0);
    let names = r.strings(tag::ISCSI_NAME);
    assert_eq!(names.len(), NODES);
    assert!(r.pdus > 100, "{} PDUs", r.pdus);
    assert!(r.max_pdu_bytes <= MAX_REPLY_PDU_BYTES);
    // A single-name query at this size is still a map lookup.
    let t2 = Instant::now();
    for i in 0..1000 {
        let n = format!("iqn.2024-01.test:t{:06}", i * 97);
        let r = c.call(
            func::DEV_ATTR_QRY,
            0,
            &query_name("iqn.2024-01.test:t000000", &n),
        );
        assert_eq!(r.status, 0);
        assert_eq!(r.strings(tag::ISCSI_NAME)[1], n);
    }
    let single = t2.elapsed();
    eprintln!(
        "100k nodes: registered in {reg_elapsed:?} (25 messages); all-targets query {q_elapsed:?}, \
         {} PDUs of <= {} bytes; 1000 single-name queries {single:?}",
        r.pdus, r.max_pdu_bytes
    );
    srv.shutdown();
}

#[test]
fn discovery_domains_and_sets_scope_queries() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start_server_with_admin(dir.path());
    let mut c = Client::connect(srv.local_addr);
    for (n, e, p, t) in [
        ("iqn.t:a", "ea", 3260, TARGET),
        ("iqn.i:b", "eb", 3261, INITIATOR),
        ("iqn.i:c", "ec", 3262, INITIATOR),
    ] {
        assert_eq!(
            c.call(
                func::DEV_ATTR_REG,
                0,
                &registration(n, e, p, None, &[(n, t)])
            )
            .status,
            0
        );
    }
    // Default DD: everybody sees the target.
    assert_eq!(visible(&mut c, "iqn.i:c", TARGET), vec!["iqn.t:a"]);
    // DD {a, b}: b sees a, c (default domain) does not.
    let mut w = TlvWriter::new();
    w.string(tag::ISCSI_NAME, ADMIN);
    w.delimiter();
    w.string(tag::DD_NAME, "zone1");
    w.string(tag::DD_MEMBER_ISCSI_NAME, "iqn.t:a");
    w.string(tag::DD_MEMBER_ISCSI_NAME, "iqn.i:b");
    let r = c.call(func::DD_REG, 0, &w);
    assert_eq!(r.status, 0);
    let dd_id = r
        .tlvs
        .iter()
        .find(|t| t.tag == tag::DD_ID)
        .unwrap()
        .as_u32()
        .unwrap();
    assert_eq!(visible(&mut c, "iqn.i:b", TARGET), vec!["iqn.t:a"]);
    assert!(visible(&mut c, "iqn.i:c", TARGET).is_empty());
    assert_eq!(visible(&mut c, "iqn.t:a", INITIATOR), vec!["iqn.i:b"]);
    // A disabled DD set holding the DD deactivates it: back to the default domain.
    let mut w = TlvWriter::new();
    w.string(tag::ISCSI_NAME, ADMIN);
    w.delimiter();
    w.string(tag::DDS_NAME, "set1");
    w.u32(tag::DDS_STATUS, 0);
    w.u32(tag::DD_ID, dd_id);
    let r = c.call(func::DDS_REG, 0, &w);
    assert_eq!(r.status, 0);
    let dds_id = r
        .tlvs
        .iter()
        .find(|t| t.tag == tag::DDS_ID)
        .unwrap()
        .as_u32()
        .unwrap();
    assert_eq!(visible(&mut c, "iqn.i:c", TARGET), vec!["iqn.t:a"]);
    // Enabling it re-activates the DD.
    let mut w = TlvWriter::new();
    w.string(tag::ISCSI_NAME, ADMIN);
    w.u32(tag::DDS_ID, dds_id);
    w.delimiter();
    w.u32(tag::DDS_STATUS, 1);
    assert_eq!(c.call(func::DDS_REG, 0, &w).status, 0);
    assert!(visible(&mut c, "iqn.i:c", TARGET).is_empty());
    // Removing b from the DD: b is back in the default domain, with c (a is still zoned).
    let mut w = TlvWriter::new();
    w.string(tag::ISCSI_NAME, ADMIN);
    w.u32(tag::DD_ID, dd_id);
    w.delimiter();
    w.string(tag::DD_MEMBER_ISCSI_NAME, "iqn.i:b");
    assert_eq!(c.call(func::DD_DEREG, 0, &w).status, 0);
    assert!(visible(&mut c, "iqn.i:b", TARGET).is_empty());
    assert_eq!(
        visible(&mut c, "iqn.i:c", INITIATOR),
        vec!["iqn.i:b", "iqn.i:c"]
    );
    // With the default DD off, unzoned nodes see only themselves.
    let p = rpc(
        &srv.control_path,
        "ns_policy_set",
        serde_json::json!({"default_dd": false}),
    );
    assert_eq!(p["result"]["default_dd"], false);
    assert_eq!(visible(&mut c, "iqn.i:c", INITIATOR), vec!["iqn.i:c"]);
    srv.shutdown();
}

/// An SCN receiver: answers the `ok_after`-th and later SCNs, drops earlier ones unanswered.
fn scn_receiver(
    ok_after: usize,
) -> (
    u16,
    std::sync::mpsc::Receiver<Vec<fabric_nameserver::wire::Tlv>>,
) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for (i, conn) in l.incoming().enumerate() {
            let mut s = conn.unwrap();
            let mut hb = [0u8; HEADER_LEN];
            if s.read_exact(&mut hb).is_err() {
                continue;
            }
            let h = Header::decode(&hb);
            let mut p = vec![0u8; h.length as usize];
            s.read_exact(&mut p).unwrap();
            if i + 1 < ok_after {
                drop(s);
                continue;
            }
            let tlvs = parse_tlvs(&p).unwrap();
            let mut w = TlvWriter::response(Status::Success);
            w.tlv(&tlvs[0]);
            let resp = fabric_nameserver::wire::split_pdus(
                h.function | 0x8000,
                FLAG_CLIENT,
                h.xid,
                &w,
                8000,
            );
            s.write_all(&resp).unwrap();
            if tx.send(tlvs).is_err() {
                return;
            }
        }
    });
    (port, rx)
}

#[test]
fn scn_is_delivered_with_retries_and_scoped_by_dd() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start_server(dir.path());
    let mut c = Client::connect(srv.local_addr);
    let (port, rx) = scn_receiver(2);
    let reg = registration("iqn.t:a", "ea", 3260, Some(port), &[("iqn.t:a", TARGET)]);
    assert_eq!(c.call(func::DEV_ATTR_REG, 0, &reg).status, 0);
    let mut w = TlvWriter::new();
    w.string(tag::ISCSI_NAME, "iqn.t:a");
    w.string(tag::ISCSI_NAME, "iqn.t:a");
    w.delimiter();
    // Object added/removed/updated, the bitmap tgt registers.
    w.u32(tag::ISCSI_SCN_BITMAP, 0x9c);
    assert_eq!(c.call(func::SCN_REG, 0, &w).status, 0);
    // An initiator registers: the target hears about it (after one unanswered attempt).
    let reg = registration("iqn.i:b", "eb", 3261, None, &[("iqn.i:b", INITIATOR)]);
    assert_eq!(c.call(func::DEV_ATTR_REG, 0, &reg).status, 0);
    let scn = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(scn[0].tag, tag::ISCSI_NAME);
    assert_eq!(scn[0].as_string().unwrap(), "iqn.t:a");
    assert_eq!(scn[1].tag, tag::TIMESTAMP);
    let bitmap = scn.iter().find(|t| t.tag == tag::ISCSI_SCN_BITMAP).unwrap();
    assert_eq!(bitmap.as_u32().unwrap(), 1 << 3, "object added");
    assert_eq!(scn.last().unwrap().as_string().unwrap(), "iqn.i:b");
    // Zoning the target away from the initiator is an "object removed" for the target.
    let r = rpc(
        &srv.control_path,
        "ns_dd_create",
        serde_json::json!({"name": "z", "members": ["iqn.t:a"]}),
    );
    assert!(r["result"]["id"].is_u64(), "{r}");
    let scn = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let bitmap = scn.iter().find(|t| t.tag == tag::ISCSI_SCN_BITMAP).unwrap();
    assert_eq!(bitmap.as_u32().unwrap(), 1 << 4, "object removed");
    // A node outside the target's DD registers: no SCN for the target.
    let reg = registration("iqn.i:c", "ec", 3262, None, &[("iqn.i:c", INITIATOR)]);
    assert_eq!(c.call(func::DEV_ATTR_REG, 0, &reg).status, 0);
    assert!(rx.recv_timeout(Duration::from_millis(500)).is_err());
    let st = srv.service.report();
    assert_eq!(st.scns_sent, 2);
    assert!(st.scns_retried >= 1);
    srv.shutdown();
}

#[test]
fn hostile_input_gets_error_status_and_others_are_still_served() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start_server(dir.path());
    let mut good = Client::connect(srv.local_addr);
    let reg = registration("iqn.t:a", "ea", 3260, None, &[("iqn.t:a", TARGET)]);
    assert_eq!(good.call(func::DEV_ATTR_REG, 0, &reg).status, 0);

    // TLV whose length runs past the PDU: Message Format Error, connection stays usable.
    let mut bad = Client::connect(srv.local_addr);
    let mut raw = Header {
        version: 1,
        function: func::DEV_ATTR_QRY,
        length: 12,
        flags: FLAG_CLIENT | FLAG_FIRST_PDU | FLAG_LAST_PDU,
        xid: 7,
        seq: 0,
    }
    .encode()
    .to_vec();
    raw.extend_from_slice(&[0, 0, 0, 32, 0, 0, 1, 0, b'a', b'b', 0, 0]);
    bad.s.write_all(&raw).unwrap();
    let r = bad.read_reply();
    assert_eq!(r.status, Status::MessageFormat as u32);
    assert_eq!(visible(&mut bad, "iqn.x:probe", TARGET), vec!["iqn.t:a"]);

    // Unknown attribute in a registration: Attribute Not Implemented.
    let mut w = registration("iqn.t:z", "ez", 3299, None, &[("iqn.t:z", TARGET)]);
    w.u32(0x7777, 1);
    assert_eq!(
        bad.call(func::DEV_ATTR_REG, 0, &w).status,
        Status::AttributeNotImplemented as u32
    );
    // Missing source: Source Absent. Unknown function: Message Not Supported.
    let mut w = TlvWriter::new();
    w.delimiter();
    assert_eq!(
        bad.call(func::DEV_ATTR_QRY, 0, &w).status,
        Status::SourceAbsent as u32
    );
    let mut w = TlvWriter::new();
    w.string(tag::ISCSI_NAME, "x");
    assert_eq!(
        bad.call(99, 0, &w).status,
        Status::MessageNotSupported as u32
    );

    // Out-of-order fragments: Message Format Error and the connection is closed.
    let mut ooo = Client::connect(srv.local_addr);
    let mut raw = Vec::new();
    for (seq, flags) in [(0u16, FLAG_FIRST_PDU), (2, FLAG_LAST_PDU)] {
        raw.extend_from_slice(
            &Header {
                version: 1,
                function: func::DEV_ATTR_QRY,
                length: 8,
                flags: FLAG_CLIENT | flags,
                xid: 1,
                seq,
            }
            .encode(),
        );
        raw.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
    }
    ooo.s.write_all(&raw).unwrap();
    assert_eq!(ooo.read_reply().status, Status::MessageFormat as u32);
    let mut buf = [0u8; 1];
    assert_eq!(
        ooo.s.read(&mut buf).unwrap(),
        0,
        "closed after a framing error"
    );

    // Wrong version: Version Not Supported, closed.
    let mut v = Client::connect(srv.local_addr);
    let mut h = Header {
        version: 9,
        function: func::DEV_ATTR_QRY,
        length: 0,
        flags: FLAG_CLIENT | FLAG_FIRST_PDU | FLAG_LAST_PDU,
        xid: 3,
        seq: 0,
    };
    v.s.write_all(&h.encode()).unwrap();
    assert_eq!(v.read_reply().status, Status::VersionNotSupported as u32);

    // Flood: a message that never ends is cut at the per-client limit.
    let mut flood = Client::connect(srv.local_addr);
    h.version = 1;
    h.length = 65532;
    let chunk = vec![0u8; 65532];
    let mut closed = false;
    for seq in 0..64u16 {
        h.seq = seq;
        h.flags = FLAG_CLIENT | if seq == 0 { FLAG_FIRST_PDU } else { 0 };
        if flood.s.write_all(&h.encode()).is_err() || flood.s.write_all(&chunk).is_err() {
            closed = true;
            break;
        }
    }
    if !closed {
        let r = flood.read_reply();
        assert_eq!(r.status, Status::MessageFormat as u32);
    }

    // Random garbage on yet another connection.
    let mut g = Client::connect(srv.local_addr);
    let junk: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let _ = g.s.write_all(&junk);

    // Meanwhile the well-behaved client is served.
    assert_eq!(visible(&mut good, "iqn.t:a", TARGET), vec!["iqn.t:a"]);
    let st = srv.service.report();
    assert!(st.format_errors >= 3, "{st:?}");
    srv.shutdown();
}

#[test]
fn state_survives_restart_and_directories_are_independent() {
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let a = start_server(d1.path());
    let b = start_server(d2.path());
    // One server per data directory.
    assert!(
        fabric_nameserver::server::start(fabric_nameserver::server::Config::new(
            "127.0.0.1:0".parse().unwrap(),
            d1.path().to_owned()
        ))
        .is_err()
    );
    let mut ca = Client::connect(a.local_addr);
    let mut cb = Client::connect(b.local_addr);
    let reg = registration("iqn.t:a", "ea", 3260, None, &[("iqn.t:a", TARGET)]);
    assert_eq!(ca.call(func::DEV_ATTR_REG, 0, &reg).status, 0);
    let r = rpc(
        &a.control_path,
        "ns_dd_create",
        serde_json::json!({"name": "z", "members": ["iqn.t:a", "iqn.i:x"]}),
    );
    assert_eq!(r["result"]["name"], "z");
    assert!(visible(&mut cb, "iqn.i:x", TARGET).is_empty());
    a.service.snapshot().unwrap();
    let reg = registration("iqn.t:b", "eb", 3261, None, &[("iqn.t:b", TARGET)]);
    assert_eq!(ca.call(func::DEV_ATTR_REG, 0, &reg).status, 0);
    drop(ca);
    a.shutdown();
    // Snapshot + log replay.
    let a = start_server(d1.path());
    let mut ca = Client::connect(a.local_addr);
    assert_eq!(visible(&mut ca, "iqn.i:x", TARGET), vec!["iqn.t:a"]);
    assert_eq!(visible(&mut ca, "iqn.t:b", TARGET), vec!["iqn.t:b"]);
    let dds = rpc(&a.control_path, "ns_dd_list", serde_json::json!({}));
    assert_eq!(dds["result"][0]["members"].as_array().unwrap().len(), 2);
    a.shutdown();
    b.shutdown();
}

/// Accepts SCN connections on `addr`, reports each (its first TLVs) and answers Success.
fn scn_sink(addr: SocketAddr) -> std::sync::mpsc::Receiver<()> {
    let l = TcpListener::bind(addr).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut s) = conn else { return };
            let mut hb = [0u8; HEADER_LEN];
            if s.read_exact(&mut hb).is_err() {
                continue;
            }
            let h = Header::decode(&hb);
            let mut p = vec![0u8; h.length as usize];
            if s.read_exact(&mut p).is_err() {
                continue;
            }
            let w = TlvWriter::response(Status::Success);
            let resp = fabric_nameserver::wire::split_pdus(
                h.function | 0x8000,
                FLAG_CLIENT,
                h.xid,
                &w,
                8000,
            );
            let _ = s.write_all(&resp);
            if tx.send(()).is_err() {
                return;
            }
        }
    });
    rx
}

/// Issue 12 finding 3: another host (127.0.0.2) naming a registered target as its source
/// can neither take over nor remove its entity, create discovery domains, make itself a
/// control node, nor aim the server's SCNs at a third party's address.
#[test]
fn another_host_cannot_hijack_entities_or_aim_scns_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start_server(dir.path());
    let mut owner = Client::connect(srv.local_addr);
    let reg = registration(
        "iqn.t:victim",
        "ev",
        3260,
        None,
        &[("iqn.t:victim", TARGET)],
    );
    assert_eq!(owner.call(func::DEV_ATTR_REG, 0, &reg).status, 0);
    let mut evil = Client::connect_from(srv.local_addr, "127.0.0.2".parse().unwrap());
    let unauthorized = Status::SourceUnauthorized as u32;

    // REPLACE the victim's entity with a portal of the attacker's, as the victim.
    let mut w = TlvWriter::new();
    w.string(tag::ISCSI_NAME, "iqn.t:victim");
    w.string(tag::EID, "ev");
    w.delimiter();
    w.string(tag::EID, "ev");
    w.ip(tag::PORTAL_IP, &"::ffff:127.0.0.2".parse().unwrap());
    w.u32(tag::PORTAL_PORT, 3260);
    w.string(tag::ISCSI_NAME, "iqn.t:victim");
    w.u32(tag::ISCSI_NODE_TYPE, TARGET);
    assert_eq!(
        evil.call(func::DEV_ATTR_REG, 0x1000, &w).status,
        unauthorized
    );
    // Deregister it.
    let mut w = TlvWriter::new();
    w.string(tag::ISCSI_NAME, "iqn.t:victim");
    w.delimiter();
    w.string(tag::EID, "ev");
    assert_eq!(evil.call(func::DEV_DEREG, 0, &w).status, unauthorized);
    // Create a discovery domain.
    let mut w = TlvWriter::new();
    w.string(tag::ISCSI_NAME, "iqn.t:victim");
    w.delimiter();
    w.string(tag::DD_NAME, "evil-zone");
    w.string(tag::DD_MEMBER_ISCSI_NAME, "iqn.t:victim");
    assert_eq!(evil.call(func::DD_REG, 0, &w).status, unauthorized);
    // Make itself a control node.
    let reg = registration("iqn.x:evil", "ex", 3300, None, &[("iqn.x:evil", 4)]);
    assert_eq!(evil.call(func::DEV_ATTR_REG, 0, &reg).status, unauthorized);

    // SCNs: the attacker registers a portal at the owner's address (127.0.0.1) with an SCN
    // port where a third party listens; the SCN must go to the attacker's own address.
    let probe = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let third_party = scn_sink(SocketAddr::from(([127, 0, 0, 1], port)));
    let attacker_own = scn_sink(SocketAddr::from(([127, 0, 0, 2], port)));
    let mut w = TlvWriter::new();
    w.string(tag::ISCSI_NAME, "iqn.x:evil");
    w.delimiter();
    w.string(tag::EID, "ex");
    w.ip(tag::PORTAL_IP, &"::ffff:127.0.0.1".parse().unwrap());
    w.u32(tag::PORTAL_PORT, 3301);
    w.u32(tag::SCN_PORT, u32::from(port));
    w.string(tag::ISCSI_NAME, "iqn.x:evil");
    w.u32(tag::ISCSI_NODE_TYPE, INITIATOR);
    assert_eq!(evil.call(func::DEV_ATTR_REG, 0, &w).status, 0);
    let mut w = TlvWriter::new();
    w.string(tag::ISCSI_NAME, "iqn.x:evil");
    w.string(tag::ISCSI_NAME, "iqn.x:evil");
    w.delimiter();
    w.u32(tag::ISCSI_SCN_BITMAP, 0x08); // object added
    assert_eq!(evil.call(func::SCN_REG, 0, &w).status, 0);
    let reg = registration("iqn.t:v2", "ev2", 3261, None, &[("iqn.t:v2", TARGET)]);
    assert_eq!(owner.call(func::DEV_ATTR_REG, 0, &reg).status, 0);
    assert!(attacker_own.recv_timeout(Duration::from_secs(10)).is_ok());
    assert!(third_party.recv_timeout(Duration::from_secs(2)).is_err());

    // The victim is untouched.
    {
        let reg = srv.service.registry();
        let (e, _) = reg.node("iqn.t:victim").unwrap();
        let ips: Vec<_> = e.portals.iter().map(|p| p.ip).collect();
        assert_eq!(
            ips,
            vec!["::ffff:127.0.0.1".parse::<std::net::Ipv6Addr>().unwrap()]
        );
    }
    assert!(srv.service.report().unauthorized >= 4);
    srv.shutdown();
}
