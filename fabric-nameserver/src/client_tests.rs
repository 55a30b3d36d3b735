//! Unit tests of the client: its registration message as the server's own parser reads it,
//! and its ESI/SCN port answering the server's own probe and notification code.
// Test code: unwrap on setup failures is the point.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv6Addr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::inbound::{self, Events};
use super::worker::{registration, RegistrationParts};
use super::*;
use crate::command::{parse_command, Command, RegKey, RegObject};
use crate::registry::{Notification, Subject};
use crate::wire::{
    func, parse_request, parse_tlvs, response_status, tag, Header, Message, Reassembler, Status,
    TlvWriter, FLAG_CLIENT, FLAG_REPLACE, HEADER_LEN,
};

fn parse(function: u16, flags: u16, w: &TlvWriter) -> Command {
    let m = Message {
        function,
        flags: FLAG_CLIENT | flags,
        xid: 1,
        payload: w.buf.clone(),
    };
    parse_command(&parse_request(&m).unwrap()).unwrap().command
}

#[test]
fn registration_reads_as_entity_portals_targets_and_groups() {
    let ip: Ipv6Addr = "::ffff:10.0.0.7".parse().unwrap();
    let portals = vec![(ip, 3260, 1), (ip, 3261, 2)];
    let targets: BTreeSet<String> = ["iqn.2024-01.t:a", "iqn.2024-01.t:b"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let timing = Timing {
        registration_period_secs: Some(600),
        ..Timing::default()
    };
    let w = registration(
        &RegistrationParts {
            source: "iqn.2024-01.t:a",
            eid: "host1",
            timing: &timing,
            esi_port: 40000,
            scn_port: 40001,
        },
        &portals,
        &targets,
    );
    let Command::DevAttrReg {
        key,
        replace,
        entity,
        objects,
    } = parse(func::DEV_ATTR_REG, FLAG_REPLACE, &w)
    else {
        panic!("not a registration")
    };
    assert_eq!(key, RegKey::Eid("host1".into()));
    assert!(replace);
    assert_eq!(entity.protocol, Some(2));
    assert_eq!(entity.period_secs, Some(600));
    let ps: Vec<_> = objects
        .iter()
        .filter_map(|o| match o {
            RegObject::Portal(p) => Some(p),
            _ => None,
        })
        .collect();
    assert_eq!(ps.len(), 2);
    for (p, port) in ps.iter().zip([3260, 3261]) {
        assert_eq!(p.ip, Some(ip));
        assert_eq!(p.port, Some(port));
        assert_eq!(p.esi_port, Some(40000));
        assert_eq!(p.scn_port, Some(40001));
        assert_eq!(p.esi_interval_secs, Some(DEFAULT_ESI_INTERVAL_SECS));
    }
    let nodes: Vec<_> = objects
        .iter()
        .filter_map(|o| match o {
            RegObject::Node(n) => Some((n.name.as_str(), n.node_type)),
            _ => None,
        })
        .collect();
    assert_eq!(
        nodes,
        vec![("iqn.2024-01.t:a", Some(1)), ("iqn.2024-01.t:b", Some(1))]
    );
    let pgs: Vec<_> = objects
        .iter()
        .filter_map(|o| match o {
            RegObject::PortalGroup(g) => Some((g.node_name.clone().unwrap(), g.port, g.tag)),
            _ => None,
        })
        .collect();
    assert_eq!(pgs.len(), 4);
    assert!(pgs.contains(&("iqn.2024-01.t:b".into(), Some(3261), Some(2))));
    assert!(pgs.contains(&("iqn.2024-01.t:a".into(), Some(3260), Some(1))));

    // Without an EID the key asks the server to assign one.
    let w = registration(
        &RegistrationParts {
            source: "iqn.2024-01.t:a",
            eid: "",
            timing: &Timing::default(),
            esi_port: 1,
            scn_port: 1,
        },
        &portals,
        &targets,
    );
    let Command::DevAttrReg { key, entity, .. } = parse(func::DEV_ATTR_REG, FLAG_REPLACE, &w)
    else {
        panic!("not a registration")
    };
    assert_eq!(key, RegKey::Eid(String::new()));
    assert_eq!(entity.eid, None);
    assert_eq!(entity.period_secs, None);
}

#[test]
fn names_and_sizes_are_checked() {
    assert!(check_name("target", "iqn.2024-01.t:a", MAX_ISCSI_NAME).is_ok());
    assert!(check_name("target", "", MAX_ISCSI_NAME).is_err());
    assert!(check_name("target", "iqn.x y", MAX_ISCSI_NAME).is_err());
    assert!(check_name("target", &"a".repeat(224), MAX_ISCSI_NAME).is_err());
    assert!(check_size(100, 4).is_ok());
    assert!(check_size(1000, 4).is_err());
    assert!(check_size(1, MAX_PORTALS + 1).is_err());
}

#[derive(Default)]
struct Counts {
    esi: AtomicU32,
    scn: AtomicU32,
    last_bitmap: AtomicU32,
}

impl Events for Counts {
    fn esi(&self) {
        self.esi.fetch_add(1, Ordering::SeqCst);
    }
    fn scn(&self, bitmap: u32) {
        self.scn.fetch_add(1, Ordering::SeqCst);
        self.last_bitmap.store(bitmap, Ordering::SeqCst);
    }
}

/// A listener served by `inbound::serve` on a thread; stopped and joined on drop.
struct Port {
    port: u16,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    t: Option<std::thread::JoinHandle<()>>,
}

impl Port {
    fn start() -> Port {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let counts = Arc::new(Counts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (s, ev) = (stop.clone(), counts.clone() as Arc<dyn Events>);
        let t = std::thread::spawn(move || inbound::serve(&[l], &s, &ev));
        Port {
            port,
            counts,
            stop,
            t: Some(t),
        }
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.t.take() {
            t.join().unwrap();
        }
    }
}

/// Sends one message and reads the one-PDU answer (header, payload).
fn exchange(port: u16, bytes: &[u8]) -> (Header, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    let mut hb = [0u8; HEADER_LEN];
    s.read_exact(&mut hb).unwrap();
    let h = Header::decode(&hb);
    let mut p = vec![0u8; usize::from(h.length)];
    s.read_exact(&mut p).unwrap();
    let mut r = Reassembler::new();
    let m = r.push(&h, &p).unwrap().unwrap();
    (h, m.payload)
}

#[test]
fn esi_port_answers_the_servers_probe() {
    let port = Port::start();
    let t = crate::esi::EsiTarget {
        eid: "host1".into(),
        ip: "::ffff:10.0.0.7".parse().unwrap(),
        port: 3260,
        addr: ([127, 0, 0, 1], port.port).into(),
        interval_secs: 20,
    };
    // The server's own probe: connect, ESI, check the echo of the portal.
    for xid in 1..=3 {
        crate::esi::probe(&t, xid, 1_700_000_000, Duration::from_secs(5)).unwrap();
    }
    assert_eq!(port.counts.esi.load(Ordering::SeqCst), 3);
}

#[test]
fn scn_port_acknowledges_and_reports() {
    let port = Port::start();
    let n = Notification {
        dest: "iqn.2024-01.t:a".into(),
        addr: None,
        bitmap: crate::registry::scn::OBJECT_ADDED,
        subject: Subject::Node("iqn.2024-01.i:x".into()),
    };
    let (h, p) = exchange(port.port, &crate::scn::encode_scn(&n, 9, 1_700_000_000));
    assert_eq!(h.function, func::SCN | 0x8000);
    assert_eq!(h.xid, 9);
    assert_eq!(response_status(&p).unwrap(), 0);
    let echo = parse_tlvs(&p[4..]).unwrap();
    assert_eq!(echo[0].tag, tag::ISCSI_NAME);
    assert_eq!(echo[0].as_string().unwrap(), "iqn.2024-01.t:a");
    assert_eq!(port.counts.scn.load(Ordering::SeqCst), 1);
    assert_eq!(
        port.counts.last_bitmap.load(Ordering::SeqCst),
        crate::registry::scn::OBJECT_ADDED
    );
}

#[test]
fn other_messages_and_garbage_do_not_stop_the_port() {
    let port = Port::start();
    // A DevAttrQry sent to a client: Message Not Supported.
    let mut w = TlvWriter::new();
    w.string(tag::ISCSI_NAME, "x");
    let bytes = crate::wire::split_pdus(func::DEV_ATTR_QRY, FLAG_CLIENT, 4, &w, 8000);
    let (h, p) = exchange(port.port, &bytes);
    assert_eq!(h.function, func::DEV_ATTR_QRY | 0x8000);
    assert_eq!(
        response_status(&p).unwrap(),
        Status::MessageNotSupported as u32
    );
    // Garbage, a silent connection and a truncated one: the port still answers ESI after.
    let mut s = TcpStream::connect(("127.0.0.1", port.port)).unwrap();
    s.write_all(&[0xff; 40]).unwrap();
    drop(s);
    let silent = TcpStream::connect(("127.0.0.1", port.port)).unwrap();
    let mut cut = TcpStream::connect(("127.0.0.1", port.port)).unwrap();
    cut.write_all(&[0, 1, 0, 13, 0, 8]).unwrap();
    drop(cut);
    let t = crate::esi::EsiTarget {
        eid: "e".into(),
        ip: "::ffff:127.0.0.1".parse().unwrap(),
        port: 3260,
        addr: ([127, 0, 0, 1], port.port).into(),
        interval_secs: 20,
    };
    crate::esi::probe(&t, 1, 0, Duration::from_secs(5)).unwrap();
    drop(silent);
    assert_eq!(port.counts.esi.load(Ordering::SeqCst), 1);
}
