//! The server's resource limits, reached over real sockets: connections per host, per
//! network and in all; the idle timeout; absolute per-PDU and per-message deadlines (a
//! client trickling bytes is cut off however slowly it sends).
// Test code: helpers outside #[test] functions panic on failure too.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::*;
use fabric_nameserver::admission::ConnLimits;
use fabric_nameserver::server::{start, Config, Limits, MAX_CONNECTIONS_PER_HOST, PDU_TIMEOUT};
use fabric_nameserver::wire::{func, Header, Status, FLAG_CLIENT, FLAG_FIRST_PDU, FLAG_LAST_PDU};

const TARGET: u32 = 1;

/// Whether the server closed the connection within `within` (reads see end of stream).
fn closed_within(c: &mut Client, within: Duration) -> bool {
    c.s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 64];
    match c.s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => panic!("unexpected data"),
        Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => false,
        Err(_) => true,
    }
}

fn served(c: &mut Client) -> bool {
    visible(c, "iqn.x:probe", TARGET).is_empty()
}

fn server_with(
    dir: &std::path::Path,
    f: impl FnOnce(&mut Limits),
) -> fabric_nameserver::server::ServerHandle {
    let mut cfg = Config::new("127.0.0.1:0".parse().unwrap(), dir.to_owned());
    f(&mut cfg.limits);
    start(cfg).unwrap()
}

/// The production per-host limit (128) over loopback: the next connection is closed at
/// once, the admitted ones are served, and a slot frees when one closes.
#[test]
fn per_host_limit_is_reached_and_released() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start_server(dir.path());
    let mut conns: Vec<Client> = (0..MAX_CONNECTIONS_PER_HOST)
        .map(|_| Client::connect(srv.local_addr))
        .collect();
    let mut extra = Client::connect(srv.local_addr);
    assert!(closed_within(&mut extra, Duration::from_secs(5)));
    assert!(served(&mut conns[0]));
    assert!(served(conns.last_mut().unwrap()));
    // Another host (127.0.0.2, same /24) is still admitted.
    let mut other = Client::connect_from(srv.local_addr, Ipv4Addr::new(127, 0, 0, 2));
    assert!(served(&mut other));
    drop(conns.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut again = Client::connect(srv.local_addr);
        if !closed_within(&mut again, Duration::from_millis(300)) {
            assert!(served(&mut again));
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed");
    }
    assert!(srv.service.report().connections_refused >= 1);
    srv.shutdown();
}

/// Per-network and total limits (shrunk to small numbers) over several loopback addresses.
#[test]
fn per_network_and_total_limits_count_prefixes() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server_with(dir.path(), |l| {
        l.conns = ConnLimits {
            total: 5,
            per_host: 2,
            per_network: 3,
        }
    });
    let from = |a, b, c, d| Client::connect_from(srv.local_addr, Ipv4Addr::new(a, b, c, d));
    let mut keep = vec![from(127, 0, 0, 1), from(127, 0, 0, 1)];
    let mut refused = from(127, 0, 0, 1);
    assert!(
        closed_within(&mut refused, Duration::from_secs(5)),
        "host limit"
    );
    keep.push(from(127, 0, 0, 2));
    let mut refused = from(127, 0, 0, 3);
    assert!(
        closed_within(&mut refused, Duration::from_secs(5)),
        "network limit"
    );
    keep.push(from(127, 0, 1, 1));
    keep.push(from(127, 0, 1, 2));
    let mut refused = from(127, 0, 2, 1);
    assert!(
        closed_within(&mut refused, Duration::from_secs(5)),
        "total limit"
    );
    for c in &mut keep {
        assert!(served(c));
    }
    srv.shutdown();
}

/// The idle timeout closes a silent connection; one that keeps talking stays.
#[test]
fn idle_connections_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server_with(dir.path(), |l| l.idle_timeout = Duration::from_millis(600));
    let mut idle = Client::connect(srv.local_addr);
    let mut busy = Client::connect(srv.local_addr);
    let t = Instant::now();
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(250));
        assert!(served(&mut busy));
    }
    assert!(closed_within(&mut idle, Duration::from_secs(2)));
    assert!(t.elapsed() < Duration::from_secs(4));
    srv.shutdown();
}

/// Issue 12 finding 7: a PDU trickled one byte per second, which never trips a per-read
/// timeout, is cut at the absolute PDU deadline (production value).
#[test]
fn trickled_pdu_is_cut_at_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start_server(dir.path());
    let mut c = Client::connect(srv.local_addr);
    let mut bytes = Header {
        version: 1,
        function: func::DEV_ATTR_QRY,
        length: 1000,
        flags: FLAG_CLIENT | FLAG_FIRST_PDU | FLAG_LAST_PDU,
        xid: 1,
        seq: 0,
    }
    .encode()
    .to_vec();
    bytes.resize(12 + 1000, 0);
    let start = Instant::now();
    let mut closed = false;
    for b in bytes {
        let _ = c.s.write_all(&[b]);
        if closed_within(&mut c, Duration::from_secs(1)) {
            closed = true;
            break;
        }
        if start.elapsed() > PDU_TIMEOUT + Duration::from_secs(5) {
            break;
        }
    }
    let took = start.elapsed();
    assert!(closed, "still open after {took:?}");
    assert!(took < PDU_TIMEOUT + Duration::from_secs(3), "{took:?}");
    // Counted by the connection thread just after it closed the socket.
    let t = Instant::now();
    while srv.service.report().connections_timed_out == 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "timeout not counted");
        std::thread::sleep(Duration::from_millis(20));
    }
    srv.shutdown();
}

/// A multi-PDU message whose PDUs each arrive in time but never end is cut at the message
/// deadline.
#[test]
fn endless_message_is_cut_at_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server_with(dir.path(), |l| l.message_timeout = Duration::from_secs(1));
    let mut c = Client::connect(srv.local_addr);
    let start = Instant::now();
    let mut closed = false;
    for seq in 0..40u16 {
        let mut pdu = Header {
            version: 1,
            function: func::DEV_ATTR_QRY,
            length: 8,
            flags: FLAG_CLIENT | if seq == 0 { FLAG_FIRST_PDU } else { 0 },
            xid: 1,
            seq,
        }
        .encode()
        .to_vec();
        pdu.extend_from_slice(&[0; 8]);
        let _ = c.s.write_all(&pdu);
        if closed_within(&mut c, Duration::from_millis(200)) {
            closed = true;
            break;
        }
    }
    assert!(closed);
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
    srv.shutdown();
}

/// Issue 12 finding 7: addresses of one /24 share one quarter of the slots (production
/// values): two hosts fill it, a third host of the same network is refused, another
/// network is admitted.
#[test]
fn one_network_holds_at_most_a_quarter_of_the_slots() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start_server(dir.path());
    let mut held = Vec::new();
    for host in [1, 2] {
        for _ in 0..MAX_CONNECTIONS_PER_HOST {
            held.push(Client::connect_from(
                srv.local_addr,
                Ipv4Addr::new(127, 0, 0, host),
            ));
        }
    }
    let mut third = Client::connect_from(srv.local_addr, Ipv4Addr::new(127, 0, 0, 3));
    assert!(closed_within(&mut third, Duration::from_secs(5)));
    let mut elsewhere = Client::connect_from(srv.local_addr, Ipv4Addr::new(127, 0, 9, 1));
    assert!(served(&mut elsewhere));
    srv.shutdown();
}

/// Replies are bounded in total: with a small in-flight budget, a query whose reply does not
/// fit is answered Busy while small ones are served; with the default budget it succeeds.
#[test]
fn replies_beyond_the_in_flight_budget_are_answered_busy() {
    let names: Vec<String> = (0..20_000)
        .map(|i| format!("iqn.2024-01.test:n{i:06}"))
        .collect();
    let load = |c: &mut Client| {
        for (k, chunk) in names.chunks(4000).enumerate() {
            let nodes: Vec<(&str, u32)> = chunk.iter().map(|n| (n.as_str(), TARGET)).collect();
            let r = c.call(
                func::DEV_ATTR_REG,
                0,
                &registration(nodes[0].0, &format!("e{k}"), 3260 + k as u32, None, &nodes),
            );
            assert_eq!(r.status, 0);
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let srv = server_with(dir.path(), |l| l.reply_bytes_in_flight = 1024 * 1024);
    let mut c = Client::connect(srv.local_addr);
    load(&mut c);
    // ~20 000 × 48 bytes ≈ 1 MiB of reply (2 MiB with its PDU copy): over the budget.
    let r = c.call(func::DEV_ATTR_QRY, 0, &query_type(&names[0], TARGET));
    assert_eq!(r.status, Status::Busy as u32);
    let r = c.call(func::DEV_ATTR_QRY, 0, &query_name(&names[0], &names[7]));
    assert_eq!(r.status, 0);
    srv.shutdown();
    let dir = tempfile::tempdir().unwrap();
    let srv = start_server(dir.path());
    let mut c = Client::connect(srv.local_addr);
    load(&mut c);
    let r = c.call(func::DEV_ATTR_QRY, 0, &query_type(&names[0], TARGET));
    assert_eq!(r.status, 0);
    assert_eq!(
        r.strings(fabric_nameserver::wire::tag::ISCSI_NAME).len(),
        20_000
    );
    srv.shutdown();
}
