//! The server and client over real sockets, with hostile peers: bad JSON, huge lines,
//! slowloris, silence, too many connections, and a server that answers wrongly.
// Test code: helpers outside #[test] functions panic on failure too.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use jsonrpc::{
    Client, ClientError, ClientLimits, ErrorCode, Limits, Methods, NoParams, RpcError, Server,
};
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Deserialize)]
struct Echo {
    text: String,
}

fn methods() -> Methods {
    let mut m = Methods::new();
    m.add("echo_text", |p: Echo| Ok(p.text))
        .add("sleep_short", |_: NoParams| {
            std::thread::sleep(Duration::from_millis(50));
            Ok(true)
        })
        .add("big_get", |_: NoParams| Ok("x".repeat(100_000)));
    m
}

fn short_limits() -> Limits {
    Limits {
        request_bytes_max: 4096,
        request_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(500),
        write_timeout: Duration::from_secs(2),
        connections_max: 4,
    }
}

fn sock_path(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("jsonrpc-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d.join("rpc.sock")
}

/// Starts a Unix server on its own thread (detached: it lives until the test process ends).
fn unix_server(name: &str, limits: Limits) -> (PathBuf, Server) {
    let path = sock_path(name);
    let l = UnixListener::bind(&path).unwrap();
    let server = Server::new(methods(), limits);
    let s = server.clone();
    std::thread::spawn(move || s.serve(&l, &AtomicBool::new(false), |_| true));
    (path, server)
}

fn raw(path: &PathBuf) -> (UnixStream, BufReader<UnixStream>) {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let r = BufReader::new(s.try_clone().unwrap());
    (s, r)
}

fn read_json(r: &mut BufReader<UnixStream>) -> Value {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

/// Reads until the server closes the connection; returns how long that took.
fn closed_within(s: &mut UnixStream, bound: Duration) -> Duration {
    let t = Instant::now();
    s.set_read_timeout(Some(bound)).unwrap();
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return t.elapsed(),
            Ok(_) => {}
            // Closed with our bytes unread.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return t.elapsed(),
            Err(e) => panic!("not closed within {bound:?}: {e}"),
        }
    }
}

#[test]
fn calls_over_unix_and_tcp() {
    let (path, _) = unix_server("calls", Limits::default());
    let mut c = Client::connect_unix(&path, ClientLimits::default()).unwrap();
    let r: String = c.call("echo_text", &json!({"text": "hi"})).unwrap();
    assert_eq!(r, "hi");
    // A notification is not answered: the next call's answer is the next line.
    c.notify("echo_text", &json!({"text": "ignored"})).unwrap();
    let r: String = c.call("echo_text", &json!({"text": "again"})).unwrap();
    assert_eq!(r, "again");
    let names: Vec<String> = c.call("rpc_get_methods", &NoParams {}).unwrap();
    assert_eq!(
        names,
        ["big_get", "echo_text", "rpc_get_methods", "sleep_short"]
    );
    match c.call::<_, Value>("nope", &NoParams {}) {
        Err(ClientError::Rpc(e)) => assert_eq!(e.code, ErrorCode::MethodNotFound),
        other => panic!("{other:?}"),
    }
    match c.call::<_, Value>("echo_text", &json!({"txt": 1})) {
        Err(ClientError::Rpc(RpcError {
            code: ErrorCode::InvalidParams,
            ..
        })) => {}
        other => panic!("{other:?}"),
    }

    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let server = Server::new(methods(), Limits::default());
    std::thread::spawn(move || server.serve(&l, &AtomicBool::new(false), |_| true));
    let mut c = Client::connect_tcp(addr, ClientLimits::default()).unwrap();
    let r: String = c.call("echo_text", &json!({"text": "tcp"})).unwrap();
    assert_eq!(r, "tcp");
}

#[test]
fn bad_json_is_answered_and_the_connection_carries_on() {
    let (path, _) = unix_server("badjson", short_limits());
    let (mut s, mut r) = raw(&path);
    s.write_all(b"{not json\n\n[]\n\"x\"\n").unwrap();
    assert_eq!(read_json(&mut r)["error"]["code"], -32700);
    // The empty line is skipped, not answered.
    assert_eq!(read_json(&mut r)["error"]["code"], -32600);
    assert_eq!(read_json(&mut r)["error"]["code"], -32600);
    // Pipelined requests in one write, answered in order.
    s.write_all(
        b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"echo_text\",\"params\":{\"text\":\"a\"}}\n\
          {\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"echo_text\",\"params\":{\"text\":\"b\"}}\n",
    )
    .unwrap();
    assert_eq!(
        read_json(&mut r),
        json!({"jsonrpc": "2.0", "id": 1, "result": "a"})
    );
    assert_eq!(
        read_json(&mut r),
        json!({"jsonrpc": "2.0", "id": 2, "result": "b"})
    );
    // Invalid UTF-8 and NUL bytes are a parse error, not a panic.
    s.write_all(b"\xff\xfe\x00{\n").unwrap();
    assert_eq!(read_json(&mut r)["error"]["code"], -32700);
}

#[test]
fn a_huge_line_is_refused_and_the_server_carries_on() {
    let (path, _) = unix_server("huge", short_limits());
    let (mut s, mut r) = raw(&path);
    // Far more than request_bytes_max, without a newline: the server answers once it holds
    // more than the limit, and closes (the writer may see EPIPE: that is fine).
    let junk = vec![b'a'; 64 * 1024];
    let _ = s.write_all(&junk);
    let v = read_json(&mut r);
    assert_eq!(v["error"]["code"], -32600, "{v}");
    assert_eq!(v["id"], Value::Null);
    closed_within(&mut s, Duration::from_secs(2));
    // A line just under the limit is fine.
    let mut c = Client::connect_unix(&path, ClientLimits::default()).unwrap();
    let text = "y".repeat(3000);
    let back: String = c.call("echo_text", &json!({ "text": text })).unwrap();
    assert_eq!(back.len(), 3000);
}

#[test]
fn slowloris_and_silent_peers_lose_their_connection() {
    let (path, _) = unix_server("slow", short_limits());
    // One byte every 50 ms: the request deadline (300 ms from the first byte) closes it, even
    // though no single read waits long.
    let (mut s, _) = raw(&path);
    let start = Instant::now();
    let req =
        b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"echo_text\",\"params\":{\"text\":\"slow\"}}";
    for b in req {
        if s.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = start.elapsed() + closed_within(&mut s, Duration::from_secs(3));
    assert!(took < Duration::from_secs(3), "{took:?}");
    // Silent after connecting: the idle timeout (500 ms) closes it.
    let (mut s, _) = raw(&path);
    let took = closed_within(&mut s, Duration::from_secs(3));
    assert!(took >= Duration::from_millis(400), "{took:?}");
    // Meanwhile and after, other clients are served.
    let mut c = Client::connect_unix(&path, ClientLimits::default()).unwrap();
    let r: String = c.call("echo_text", &json!({"text": "ok"})).unwrap();
    assert_eq!(r, "ok");
}

#[test]
fn connections_beyond_the_limit_are_closed() {
    let (path, server) = unix_server("many", short_limits());
    let held: Vec<_> = (0..4).map(|_| raw(&path)).collect();
    let t = Instant::now();
    while server.active_connections() < 4 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(server.active_connections(), 4);
    let (mut extra, _) = raw(&path);
    closed_within(&mut extra, Duration::from_secs(2));
    drop(held);
    // The slots come back when those connections end.
    let t = Instant::now();
    while server.active_connections() > 0 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut c = Client::connect_unix(&path, ClientLimits::default()).unwrap();
    let r: bool = c.call("sleep_short", &NoParams {}).unwrap();
    assert!(r);
}

#[test]
fn a_client_bounds_what_a_server_sends() {
    // A server that never answers: the call times out.
    let path = sock_path("mute");
    let l = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming() {
            held.push(s);
        }
    });
    let limits = ClientLimits {
        timeout: Duration::from_millis(300),
        response_bytes_max: 1000,
    };
    let mut c = Client::connect_unix(&path, limits).unwrap();
    let t = Instant::now();
    match c.call::<_, Value>("echo_text", &json!({"text": "x"})) {
        Err(ClientError::Stream(jsonrpc::stream::StreamError::TimedOut)) => {}
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(2));

    // A response longer than the client's limit fails the call.
    let (path, _) = unix_server("long", Limits::default());
    let mut c = Client::connect_unix(&path, limits).unwrap();
    match c.call::<_, String>("big_get", &NoParams {}) {
        Err(ClientError::Stream(jsonrpc::stream::StreamError::TooLong(1000))) => {}
        other => panic!("{other:?}"),
    }

    // A server that answers another id, or garbage.
    for answer in [
        "{\"jsonrpc\":\"2.0\",\"id\":99,\"result\":1}\n",
        "garbage\n",
        "{\"jsonrpc\":\"2.0\",\"id\":1}\n",
    ] {
        let path = sock_path("liar");
        let l = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            if let Ok((s, _)) = l.accept() {
                let mut line = String::new();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let _ = r.read_line(&mut line);
                let _ = (&s).write_all(answer.as_bytes());
            }
        });
        let mut c = Client::connect_unix(&path, limits).unwrap();
        match c.call::<_, Value>("echo_text", &json!({"text": "x"})) {
            Err(ClientError::Protocol(_)) => {}
            other => panic!("{answer}: {other:?}"),
        }
    }
    let missing = sock_path("missing");
    match Client::connect_unix(&missing, limits) {
        Err(e @ ClientError::Connect { .. }) => assert!(e.to_string().contains("missing")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_server_keeps_serving_after_a_client_vanishes_mid_request() {
    let (path, server) = unix_server("vanish", short_limits());
    for _ in 0..8 {
        let (mut s, _) = raw(&path);
        s.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"met").unwrap();
    }
    // Let the accept loop take them all from the backlog before counting.
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    while server.active_connections() > 0 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(server.active_connections(), 0);
    let mut c = Client::connect_unix(&path, ClientLimits::default()).unwrap();
    let r: String = c.call("echo_text", &json!({"text": "still"})).unwrap();
    assert_eq!(r, "still");
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any bytes: no panic; the answer, if any, is one JSON response (or a batch of them).
        #[test]
        fn any_line_is_answered_with_json_or_nothing(line in proptest::collection::vec(any::<u8>(), 0..512)) {
            let m = methods();
            if let Some(r) = m.handle(&line) {
                let v: Value = serde_json::from_str(&r).unwrap();
                let all = match &v { Value::Array(a) => a.clone(), v => vec![v.clone()] };
                for x in all {
                    prop_assert_eq!(&x["jsonrpc"], "2.0");
                    prop_assert!(x.get("result").is_some() != x.get("error").is_some());
                }
            }
        }

        /// Request-shaped JSON with arbitrary members.
        #[test]
        fn request_shaped_lines(id in prop_oneof![Just(json!(null)), any::<i64>().prop_map(|i| json!(i)), ".{0,8}".prop_map(|s| json!(s))],
                                method in prop_oneof![Just("echo_text".to_string()), Just("rpc_get_methods".to_string()), ".{0,12}"],
                                text in proptest::option::of(".{0,16}"),
                                notify in any::<bool>()) {
            let m = methods();
            let mut req = json!({"jsonrpc": "2.0", "method": method, "params": {"text": text}});
            if !notify {
                req["id"] = id.clone();
            }
            let r = m.handle(req.to_string().as_bytes());
            prop_assert_eq!(r.is_none(), notify);
            if let Some(r) = r {
                let v: Value = serde_json::from_str(&r).unwrap();
                prop_assert_eq!(&v["id"], &id);
            }
        }
    }
}
