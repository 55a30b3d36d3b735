//! Entity Status Inquiry over real TCP: a fake entity answers the server's ESI probes for a
//! while, then stops; the server deregisters it and an SCN subscriber hears of it. Time is
//! scaled (one ESI-interval second = 100 ms) so the scenario takes about two seconds.
// Test code: helpers outside #[test] functions panic on failure too.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use fabric_nameserver::esi::EsiConfig;
use fabric_nameserver::server::{start, Config};
use fabric_nameserver::wire::{
    func, parse_tlvs, split_pdus, tag, Header, Status, Tlv, TlvWriter, FLAG_CLIENT, HEADER_LEN,
};

const TARGET: u32 = 1;
const INITIATOR: u32 = 2;
const OBJECT_REMOVED: u32 = 1 << 4;

fn fast_esi() -> EsiConfig {
    EsiConfig {
        min_interval_secs: 1,
        retries: 3,
        timeout: Duration::from_millis(300),
        unit: Duration::from_millis(100),
    }
}

/// Reads one PDU; None when the peer closes.
fn read_pdu(s: &mut std::net::TcpStream) -> Option<(Header, Vec<u8>)> {
    let mut hb = [0u8; HEADER_LEN];
    s.read_exact(&mut hb).ok()?;
    let h = Header::decode(&hb);
    let mut p = vec![0u8; h.length as usize];
    s.read_exact(&mut p).ok()?;
    Some((h, p))
}

/// Answers a server message with status 0 and the given attributes echoed.
fn answer(s: &mut std::net::TcpStream, h: &Header, echo: &[Tlv]) {
    let mut w = TlvWriter::response(Status::Success);
    for t in echo {
        w.tlv(t);
    }
    let resp = split_pdus(h.function | 0x8000, FLAG_CLIENT, h.xid, &w, 8000);
    s.write_all(&resp).unwrap();
}

/// A fake entity's ESI port: answers the first `answers` ESIs (echoing their attributes),
/// then closes, so that later probes are refused.
fn esi_responder(answers: usize) -> (u16, Arc<AtomicUsize>, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let answered = Arc::new(AtomicUsize::new(0));
    let a = answered.clone();
    let t = std::thread::spawn(move || {
        for conn in l.incoming() {
            let mut s = conn.unwrap();
            let Some((h, p)) = read_pdu(&mut s) else {
                continue;
            };
            assert_eq!(h.function, func::ESI);
            let tlvs = parse_tlvs(&p).unwrap();
            let tags: Vec<u32> = tlvs.iter().map(|t| t.tag).collect();
            assert_eq!(
                tags,
                vec![tag::TIMESTAMP, tag::EID, tag::PORTAL_IP, tag::PORTAL_PORT]
            );
            assert_eq!(tlvs[1].as_string().unwrap(), "ent-esi");
            assert_eq!(tlvs[3].as_u32().unwrap(), 3260);
            answer(&mut s, &h, &tlvs);
            if a.fetch_add(1, Ordering::SeqCst) + 1 >= answers {
                return; // drops the listener: the entity "dies"
            }
        }
    });
    (port, answered, t)
}

/// An SCN port that answers every SCN and passes on (bitmap, subject name).
fn scn_listener() -> (u16, std::sync::mpsc::Receiver<(u32, String)>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let mut s = conn.unwrap();
            let Some((h, p)) = read_pdu(&mut s) else {
                continue;
            };
            let tlvs = parse_tlvs(&p).unwrap();
            answer(&mut s, &h, &tlvs[..1]);
            let bitmap = tlvs
                .iter()
                .find(|t| t.tag == tag::ISCSI_SCN_BITMAP)
                .unwrap()
                .as_u32()
                .unwrap();
            let subject = tlvs.last().unwrap().as_string().unwrap();
            if tx.send((bitmap, subject)).is_err() {
                return;
            }
        }
    });
    (port, rx)
}

#[test]
fn entity_that_stops_answering_esi_is_deregistered_with_scn() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::new("127.0.0.1:0".parse().unwrap(), dir.path().to_owned());
    cfg.esi = fast_esi();
    let srv = start(cfg).unwrap();
    let mut c = Client::connect(srv.local_addr);

    // The subscriber: an initiator with an SCN port, registered for object events.
    let (scn_port, scns) = scn_listener();
    let reg = registration(
        "iqn.i:watch",
        "ent-watch",
        3261,
        Some(scn_port),
        &[("iqn.i:watch", INITIATOR)],
    );
    assert_eq!(c.call(func::DEV_ATTR_REG, 0, &reg).status, 0);
    let mut w = TlvWriter::new();
    w.string(tag::ISCSI_NAME, "iqn.i:watch");
    w.string(tag::ISCSI_NAME, "iqn.i:watch");
    w.delimiter();
    w.u32(tag::ISCSI_SCN_BITMAP, 0x1c);
    assert_eq!(c.call(func::SCN_REG, 0, &w).status, 0);

    // The monitored target: ESI interval 2 (= 200 ms here) on its portal.
    let (esi_port, answered, responder) = esi_responder(3);
    let mut reg = registration("iqn.t:esi", "ent-esi", 3260, None, &[("iqn.t:esi", TARGET)]);
    // Portal attributes follow the portal key in `registration`; append ESI ones to it by
    // re-registering the portal.
    reg.ip(tag::PORTAL_IP, &"::ffff:127.0.0.1".parse().unwrap());
    reg.u32(tag::PORTAL_PORT, 3260);
    reg.u32(tag::ESI_INTERVAL, 2);
    reg.u32(tag::ESI_PORT, u32::from(esi_port));
    let t0 = Instant::now();
    assert_eq!(c.call(func::DEV_ATTR_REG, 0, &reg).status, 0);
    let _ = scns.recv_timeout(Duration::from_secs(5)).unwrap(); // "object added"
    assert_eq!(srv.service.report().esi_monitored_portals, 1);

    // While it answers, it stays registered.
    responder.join().unwrap();
    assert_eq!(answered.load(Ordering::SeqCst), 3);
    assert_eq!(visible(&mut c, "iqn.i:watch", TARGET), vec!["iqn.t:esi"]);

    // Then three probes go unanswered: deregistered, and the subscriber is told.
    let (bitmap, subject) = scns.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!((bitmap, subject.as_str()), (OBJECT_REMOVED, "iqn.t:esi"));
    let elapsed = t0.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1000) && elapsed < Duration::from_secs(6),
        "{elapsed:?}"
    );
    assert!(visible(&mut c, "iqn.i:watch", TARGET).is_empty());
    let st = srv.service.report();
    assert_eq!(
        (st.entities, st.nodes),
        (1, 1),
        "only the subscriber is left"
    );
    assert_eq!(st.esi_removed_portals, 1);
    assert_eq!(st.esi_monitored_portals, 0);
    assert!(st.esi_sent >= 6 && st.esi_failed >= 3, "{st:?}");
    srv.shutdown();
}

#[test]
fn entity_that_keeps_answering_stays_registered() {
    // Probed every 100 ms (interval 1 s scaled), it answers every time and stays.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::new("127.0.0.1:0".parse().unwrap(), dir.path().to_owned());
    cfg.esi = fast_esi();
    let srv = start(cfg).unwrap();
    let mut c = Client::connect(srv.local_addr);
    let (esi_port, answered, _responder) = esi_responder(usize::MAX);
    let mut reg = registration("iqn.t:a", "ent-esi", 3260, None, &[("iqn.t:a", TARGET)]);
    reg.ip(tag::PORTAL_IP, &"::ffff:127.0.0.1".parse().unwrap());
    reg.u32(tag::PORTAL_PORT, 3260);
    reg.u32(tag::ESI_INTERVAL, 1);
    reg.u32(tag::ESI_PORT, u32::from(esi_port));
    assert_eq!(c.call(func::DEV_ATTR_REG, 0, &reg).status, 0);
    std::thread::sleep(Duration::from_millis(600));
    assert!(answered.load(Ordering::SeqCst) >= 3);
    let st = srv.service.report();
    assert_eq!(
        (st.entities, st.esi_failed, st.esi_removed_portals),
        (1, 0, 0)
    );
    srv.shutdown();
}
