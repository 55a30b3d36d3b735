//! Target `jsonrpc`: a control-socket connection's byte stream through the `jsonrpc` crate's
//! server path — line framing with its length bound ([`jsonrpc::stream::LineReader`]),
//! request parsing ([`jsonrpc::message::parse`]: single requests, notifications, batches) and
//! dispatch to a small method table with typed params ([`jsonrpc::Methods`]) — as
//! `Server::serve_connection` runs it over an in-memory stream instead of a socket.
//!
//! Input: byte 0 picks how the stream is cut into reads (1..=16 bytes each, so lines arrive
//! in pieces and several at once); the rest is what the peer sends.
//!
//! Oracle besides "no panic": every line the server writes is one JSON-RPC response (or a
//! non-empty array of them) with exactly one of `result` and `error`; the server never
//! answers more lines than it was sent; and each request line parsed on its own gets the
//! answer the parser says it should — none for notifications, its own id otherwise.

use std::io::{Read, Write};
use std::time::Duration;

use jsonrpc::message::{self, Incoming};
use jsonrpc::{Limits, Methods, NoParams, RpcError, Server, Stream};
use serde::Deserialize;
use serde_json::{json, Value};

/// Request bytes the target's server accepts: small, so that inputs reach the too-long path.
const REQUEST_BYTES_MAX: usize = 512;

#[derive(Deserialize)]
struct Add {
    a: u32,
    b: u32,
}

#[derive(Deserialize)]
struct Echo {
    text: String,
}

fn methods() -> Methods {
    let mut m = Methods::new();
    m.add("math_add", |p: Add| {
        p.a.checked_add(p.b)
            .ok_or_else(|| RpcError::invalid_params("overflow"))
    })
    .add("echo_text", |p: Echo| Ok(p.text))
    .add("ping", |_: NoParams| Ok(json!({})))
    .add("fail", |_: NoParams| -> Result<(), RpcError> {
        Err(RpcError::application(-32004, "no such entry"))
    });
    m
}

/// The peer's bytes, handed out `chunk` at a time; what the server writes is kept.
struct MemStream<'a> {
    input: &'a [u8],
    chunk: usize,
    output: Vec<u8>,
}

impl Read for MemStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.chunk.min(buf.len()).min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for MemStream<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Stream for MemStream<'_> {
    fn set_read_timeout(&self, _: Option<Duration>) -> std::io::Result<()> {
        Ok(())
    }
    fn set_write_timeout(&self, _: Option<Duration>) -> std::io::Result<()> {
        Ok(())
    }
}

fn check_response(v: &Value) {
    let one = |r: &Value| {
        assert_eq!(r["jsonrpc"], "2.0", "{r}");
        assert!(
            r.get("result").is_some() != r.get("error").is_some(),
            "a response has one of result and error: {r}"
        );
        if let Some(e) = r.get("error") {
            assert!(e["code"].is_i64() && e["message"].is_string(), "{r}");
        }
    };
    match v {
        Value::Array(a) => {
            assert!(!a.is_empty(), "an empty batch answer is sent as nothing");
            a.iter().for_each(one);
        }
        r => one(r),
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let Some((&b0, stream)) = data.split_first() else {
        return;
    };
    let m = methods();
    // The per-line oracle: what the parser says each line must get.
    for line in stream.split(|&b| b == b'\n') {
        if line.len() > REQUEST_BYTES_MAX || line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let answer = m.handle(line);
        match message::parse(line) {
            Ok(Incoming::Single(Ok(req))) => match (&req.id, &answer) {
                (None, None) => {}
                (None, Some(a)) => panic!("a notification was answered: {a}"),
                (Some(_), None) => panic!("a request was not answered"),
                (Some(id), Some(a)) => {
                    let v: Value = serde_json::from_str(a).unwrap_or_default();
                    assert_eq!(&v["id"], id, "{a}");
                }
            },
            Ok(Incoming::Batch(reqs)) => {
                let want = reqs
                    .iter()
                    .filter(|r| !matches!(r, Ok(req) if req.id.is_none()))
                    .count();
                let got = answer.as_deref().map_or(0, |a| {
                    serde_json::from_str::<Value>(a)
                        .ok()
                        .and_then(|v| v.as_array().map(Vec::len))
                        .unwrap_or(usize::MAX)
                });
                assert_eq!(got, want, "batch answers: {answer:?}");
            }
            Ok(Incoming::Single(Err(_))) | Err(_) => {
                assert!(answer.is_some(), "an invalid line is answered")
            }
        }
    }
    // The connection path over the whole stream.
    let server = Server::new(
        m,
        Limits {
            request_bytes_max: REQUEST_BYTES_MAX,
            // Deadlines are not what this target explores (the stream never waits).
            request_timeout: Duration::from_secs(3600),
            idle_timeout: Duration::from_secs(3600),
            write_timeout: Duration::from_secs(3600),
            connections_max: 1,
        },
    );
    let mut s = MemStream {
        input: stream,
        chunk: usize::from(b0 % 16) + 1,
        output: Vec::new(),
    };
    let _ = server.serve_connection(&mut s);
    let sent_lines = stream.split(|&b| b == b'\n').count();
    let mut answered = 0;
    for line in s.output.split(|&b| b == b'\n') {
        if line.is_empty() {
            continue;
        }
        answered += 1;
        let v: Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => panic!("the server wrote a line that is not JSON ({e}): {line:?}"),
        };
        check_response(&v);
    }
    assert!(
        answered <= sent_lines,
        "{answered} answers to {sent_lines} lines"
    );
    assert!(
        s.output.is_empty() || s.output.ends_with(b"\n"),
        "every answer ends its line"
    );
}

fn stream(chunk: u8, lines: &[&str]) -> Vec<u8> {
    let mut v = vec![chunk];
    for l in lines {
        v.extend_from_slice(l.as_bytes());
        v.push(b'\n');
    }
    v
}

/// Connections of valid and invalid requests: calls with typed params, notifications,
/// batches, errors of every code, and a line over the length bound.
pub fn seeds() -> Vec<Vec<u8>> {
    let long = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"echo_text","params":{{"text":"{}"}}}}"#,
        "x".repeat(REQUEST_BYTES_MAX)
    );
    vec![
        stream(
            0,
            &[
                r#"{"jsonrpc":"2.0","id":1,"method":"math_add","params":{"a":2,"b":3}}"#,
                r#"{"jsonrpc":"2.0","id":"s","method":"echo_text","params":{"text":"hi"}}"#,
                r#"{"jsonrpc":"2.0","id":null,"method":"rpc_get_methods"}"#,
                r#"{"jsonrpc":"2.0","method":"ping"}"#,
            ],
        ),
        stream(
            3,
            &[
                r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","method":"ping"},5]"#,
                r#"[{"jsonrpc":"2.0","method":"ping"}]"#,
                "[]",
            ],
        ),
        stream(
            7,
            &[
                "{oops",
                r#"{"jsonrpc":"2.0","id":2,"method":"nope"}"#,
                r#"{"jsonrpc":"2.0","id":3,"method":"math_add","params":{"a":"x"}}"#,
                r#"{"jsonrpc":"2.0","id":4,"method":"math_add","params":[4294967295,1]}"#,
                r#"{"jsonrpc":"2.0","id":5,"method":"fail"}"#,
                r#"{"jsonrpc":"1.0","id":6,"method":"ping"}"#,
                r#"{"jsonrpc":"2.0","id":[7],"method":"ping","params":3}"#,
                "",
                "   ",
            ],
        ),
        stream(15, &[&long, r#"{"jsonrpc":"2.0","id":9,"method":"ping"}"#]),
    ]
}
