//! Target `isns`: a TCP byte stream from an iSNS client through the name server's path —
//! PDU header decode, multi-PDU reassembly ([`fabric_nameserver::wire::Reassembler`]), request
//! and command parsing, [`Registry::execute`] and the reply split into PDUs — as
//! `serve_connection` and `Service::handle` run it, minus the TCP socket and the disk.
//!
//! Input: the byte stream (PDUs back to back); every 16th input byte of a message's xid also
//! advances the clock, so registrations can expire between messages.
//!
//! Oracle besides "no panic": the WAL path is exact — every mutation record, through its
//! JSON encoding (what the store logs), applied to a replica registry, leaves the replica
//! equal to the live registry (what recovery after a crash would load), index counters
//! aside (they may run ahead of the log, never behind it).

use fabric_nameserver::command::parse_command;
use fabric_nameserver::registry::{Policy, Record, Registry};
use fabric_nameserver::wire::{
    func, parse_request, split_pdus, tag, Header, Reassembler, TlvWriter, FLAG_CLIENT,
    FLAG_REPLACE, FLAG_SERVER, HEADER_LEN, MAX_REPLY_PAYLOAD_BYTES, RESPONSE_BIT,
};

/// Registration period for entities that do not ask (the server's default).
const DEFAULT_PERIOD_SECS: u32 = 900;
/// Clock at the start of every run.
const START_SECS: u64 = 1_700_000_000;
/// Messages handled per input at most (keeps one run short).
const MESSAGES_MAX: usize = 64;

fn replicate(replica: &mut Registry, records: &[Record]) {
    for r in records {
        let json = serde_json::to_vec(r).unwrap_or_default();
        let back: Record = match serde_json::from_slice(&json) {
            Ok(b) => b,
            Err(e) => panic!("a logged record does not decode: {e}"),
        };
        replica.apply(&back);
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut reg = Registry::new(Policy::default(), DEFAULT_PERIOD_SECS);
    let mut replica = Registry::new(Policy::default(), DEFAULT_PERIOD_SECS);
    let mut asm = Reassembler::new();
    let mut now = START_SECS;
    let mut rest = data;
    let mut messages = 0;
    while rest.len() >= HEADER_LEN && messages < MESSAGES_MAX {
        let mut hb = [0u8; HEADER_LEN];
        hb.copy_from_slice(&rest[..HEADER_LEN]);
        rest = &rest[HEADER_LEN..];
        let h = Header::decode(&hb);
        let n = usize::from(h.length);
        if rest.len() < n {
            // The peer closed mid-PDU.
            break;
        }
        let (payload, tail) = rest.split_at(n);
        rest = tail;
        match asm.push(&h, payload) {
            Ok(None) => {}
            Ok(Some(m)) => {
                messages += 1;
                now += u64::from(m.xid >> 12) * 300;
                let expired = reg.expire(now);
                replicate(&mut replica, &expired.mutations);
                if m.function & RESPONSE_BIT != 0 {
                    continue;
                }
                let reply = match parse_request(&m) {
                    Err(e) => TlvWriter::response(e.status()),
                    Ok(req) => match parse_command(&req) {
                        Err(e) => TlvWriter::response(e.status()),
                        Ok(parsed) => match reg.execute(&parsed, now) {
                            Ok(out) => {
                                replicate(&mut replica, &out.mutations);
                                out.reply
                            }
                            Err(e) => TlvWriter::response(e.status()),
                        },
                    },
                };
                let pdus = split_pdus(
                    m.function | RESPONSE_BIT,
                    FLAG_SERVER,
                    m.xid,
                    &reply,
                    MAX_REPLY_PAYLOAD_BYTES,
                );
                assert!(pdus.len() >= HEADER_LEN);
            }
            Err(e) => {
                let w = TlvWriter::response(e.status());
                let _ = split_pdus(
                    h.function | RESPONSE_BIT,
                    FLAG_SERVER,
                    h.xid,
                    &w,
                    MAX_REPLY_PAYLOAD_BYTES,
                );
                if e.ends_connection() {
                    break;
                }
            }
        }
    }
    let mut live = serde_json::to_value(&reg).unwrap_or_default();
    let mut recovered = serde_json::to_value(&replica).unwrap_or_default();
    // Counters may run ahead of the log (an index taken by a request that then failed logs
    // nothing and names nothing); recovery must never put them ahead of the live ones.
    let live_counters = live.get_mut("counters").map(std::mem::take);
    let recovered_counters = recovered.get_mut("counters").map(std::mem::take);
    if let (Some(serde_json::Value::Object(l)), Some(serde_json::Value::Object(r))) =
        (&live_counters, &recovered_counters)
    {
        for (k, v) in r {
            let (a, b) = (v.as_u64(), l.get(k).and_then(|x| x.as_u64()));
            assert!(
                a <= b,
                "recovered counter {k} {a:?} ahead of the live {b:?}"
            );
        }
    }
    assert!(
        live == recovered,
        "replaying the logged records does not rebuild the registry:\nlive {live}\nreplayed {recovered}"
    );
}

fn msg(function: u16, flags: u16, xid: u16, w: &TlvWriter) -> Vec<u8> {
    split_pdus(function, FLAG_CLIENT | flags, xid, w, 65532)
}

fn registration(source: &str, eid: &str, port: u32, nodes: &[(&str, u32)]) -> TlvWriter {
    let mut w = TlvWriter::new();
    w.string(tag::ISCSI_NAME, source);
    w.string(tag::EID, eid);
    w.delimiter();
    w.string(tag::EID, eid);
    w.u32(tag::ENTITY_PROTOCOL, 2);
    w.ip(tag::PORTAL_IP, &std::net::Ipv6Addr::LOCALHOST);
    w.u32(tag::PORTAL_PORT, port);
    w.u32(tag::SCN_PORT, 3205);
    for (n, t) in nodes {
        w.string(tag::ISCSI_NAME, n);
        w.u32(tag::ISCSI_NODE_TYPE, *t);
    }
    w
}

/// Sessions of valid messages: registrations, queries, a DD, SCN registration, deregistration,
/// and a message split over several PDUs.
pub fn seeds() -> Vec<Vec<u8>> {
    const TARGET: u32 = 1;
    const INITIATOR: u32 = 2;
    let reg_t = registration("iqn.t:a", "ent-a", 3260, &[("iqn.t:a", TARGET)]);
    let reg_i = registration("iqn.i:b", "ent-b", 3261, &[("iqn.i:b", INITIATOR)]);
    let mut qry = TlvWriter::new();
    qry.string(tag::ISCSI_NAME, "iqn.i:b");
    qry.u32(tag::ISCSI_NODE_TYPE, TARGET);
    qry.delimiter();
    qry.nil(tag::ISCSI_NAME);
    qry.nil(tag::ISCSI_NODE_TYPE);
    let mut next = TlvWriter::new();
    next.string(tag::ISCSI_NAME, "iqn.i:b");
    next.string(tag::ISCSI_NAME, "");
    next.delimiter();
    next.nil(tag::ISCSI_NAME);
    let mut dd = TlvWriter::new();
    dd.string(tag::ISCSI_NAME, "iqn.i:b");
    dd.delimiter();
    dd.string(tag::DD_NAME, "zone1");
    dd.string(tag::DD_MEMBER_ISCSI_NAME, "iqn.t:a");
    dd.string(tag::DD_MEMBER_ISCSI_NAME, "iqn.i:b");
    let mut dds = TlvWriter::new();
    dds.string(tag::ISCSI_NAME, "iqn.i:b");
    dds.delimiter();
    dds.string(tag::DDS_NAME, "set1");
    dds.u32(tag::DD_ID, 1);
    let mut scn = TlvWriter::new();
    scn.string(tag::ISCSI_NAME, "iqn.i:b");
    scn.string(tag::ISCSI_NAME, "iqn.i:b");
    scn.delimiter();
    scn.u32(tag::ISCSI_SCN_BITMAP, 0x1f);
    let mut dereg = TlvWriter::new();
    dereg.string(tag::ISCSI_NAME, "iqn.t:a");
    dereg.delimiter();
    dereg.string(tag::EID, "ent-a");
    let cat = |v: &[Vec<u8>]| v.concat();
    vec![
        cat(&[msg(func::DEV_ATTR_REG, 0, 1, &reg_t)]),
        cat(&[
            msg(func::DEV_ATTR_REG, 0, 1, &reg_t),
            msg(func::DEV_ATTR_REG, 0, 2, &reg_i),
            msg(func::DEV_ATTR_QRY, 0, 3, &qry),
            msg(func::DEV_GET_NEXT, 0, 4, &next),
        ]),
        cat(&[
            msg(func::DEV_ATTR_REG, 0, 1, &reg_t),
            msg(func::DEV_ATTR_REG, 0, 2, &reg_i),
            msg(func::DD_REG, 0, 3, &dd),
            msg(func::DDS_REG, 0, 4, &dds),
            msg(func::SCN_REG, 0, 5, &scn),
            msg(func::DEV_DEREG, 0, 6, &dereg),
        ]),
        cat(&[
            msg(func::DEV_ATTR_REG, 0, 1, &reg_i),
            msg(func::DEV_ATTR_REG, FLAG_REPLACE, 0x8002, &reg_i),
            // Split into 16-byte PDUs: reassembly.
            split_pdus(func::DEV_ATTR_QRY, FLAG_CLIENT, 3, &qry, 16),
        ]),
    ]
}
