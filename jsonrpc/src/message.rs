//! Parsing request lines and encoding responses (pure functions; the `jsonrpc` fuzz target
//! drives [`parse`] through [`crate::Methods::handle`]).
//!
//! A line holds one request object or a batch (an array of them). A request is
//! `{"jsonrpc": "2.0", "method": NAME, "params": OBJECT|ARRAY, "id": STRING|NUMBER|null}`;
//! without `id` it is a notification. `params` may be left out (or null): the handler then
//! gets an empty object, so a method without parameters takes `{}`, `[]` or nothing.

use serde_json::{json, Map, Value};

use crate::error::{RpcError, WireError};

/// Most requests in one batch. Bounded by the line length already, but each request may be
/// costly (a listing can answer megabytes): one line must not queue unbounded work and
/// response memory.
pub const BATCH_MAX: usize = 64;

/// One request of a line.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// `None` for a notification (no response); a request may carry `null` (answered).
    pub id: Option<Value>,
    /// The method's name.
    pub method: String,
    /// An object or an array (an empty object when the request had none).
    pub params: Value,
}

/// A request object that is not a valid request: answered with `error` under `id` (null when
/// the id could not be read), even when it has no id (the server cannot tell a broken
/// request from a broken notification).
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    /// The id to answer under.
    pub id: Value,
    /// Why.
    pub error: RpcError,
}

/// What one line holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// One request object.
    Single(Result<Request, Invalid>),
    /// A batch: each element on its own.
    Batch(Vec<Result<Request, Invalid>>),
}

/// Parses one line. An error answers the whole line (under id null): not JSON, an empty
/// batch, or a batch longer than [`BATCH_MAX`].
pub fn parse(line: &[u8]) -> Result<Incoming, RpcError> {
    let v: Value = serde_json::from_slice(line).map_err(RpcError::parse_error)?;
    match v {
        Value::Array(items) => {
            if items.is_empty() {
                return Err(RpcError::invalid_request("empty batch"));
            }
            if items.len() > BATCH_MAX {
                return Err(RpcError::invalid_request(format!(
                    "batch of {} requests (at most {BATCH_MAX})",
                    items.len()
                )));
            }
            Ok(Incoming::Batch(items.into_iter().map(request).collect()))
        }
        v => Ok(Incoming::Single(request(v))),
    }
}

/// Validates one request object.
pub fn request(v: Value) -> Result<Request, Invalid> {
    let Value::Object(mut m) = v else {
        return Err(Invalid {
            id: Value::Null,
            error: RpcError::invalid_request("not a request object"),
        });
    };
    let id = match m.remove("id") {
        None => None,
        Some(id @ (Value::Null | Value::Number(_) | Value::String(_))) => Some(id),
        Some(_) => {
            return Err(Invalid {
                id: Value::Null,
                error: RpcError::invalid_request("id must be a string, a number or null"),
            })
        }
    };
    let invalid = |why: &str| Invalid {
        id: id.clone().unwrap_or(Value::Null),
        error: RpcError::invalid_request(why),
    };
    if m.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(invalid("\"jsonrpc\" must be \"2.0\""));
    }
    let method = match m.remove("method") {
        Some(Value::String(s)) => s,
        _ => return Err(invalid("\"method\" must be a string")),
    };
    let params = match m.remove("params") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(p @ (Value::Object(_) | Value::Array(_))) => p,
        Some(_) => return Err(invalid("\"params\" must be an object or an array")),
    };
    Ok(Request { id, method, params })
}

/// A success response.
pub fn success(id: Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

/// An error response.
pub fn failure(id: Value, error: &RpcError) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": WireError::from(error)})
}

/// A request line (without the newline) as a client sends it.
pub fn encode_request(id: Option<u64>, method: &str, params: Value) -> String {
    match id {
        Some(id) => json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}),
        None => json!({"jsonrpc": "2.0", "method": method, "params": params}),
    }
    .to_string()
}

/// A response as a client reads it: its id and its outcome. `Err(why)` when the line is not
/// a response.
pub fn parse_response(line: &[u8]) -> Result<(Value, Result<Value, RpcError>), String> {
    let v: Value = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    let Value::Object(mut m) = v else {
        return Err("not a response object".into());
    };
    if m.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err("\"jsonrpc\" is not \"2.0\"".into());
    }
    let id = m.remove("id").unwrap_or(Value::Null);
    match (m.remove("result"), m.remove("error")) {
        (Some(r), None) => Ok((id, Ok(r))),
        (None, Some(e)) => {
            let w: WireError =
                serde_json::from_value(e).map_err(|e| format!("bad error object: {e}"))?;
            Ok((id, Err(w.into())))
        }
        _ => Err("a response has exactly one of \"result\" and \"error\"".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    fn one(line: &str) -> Result<Request, Invalid> {
        match parse(line.as_bytes()) {
            Ok(Incoming::Single(r)) => r,
            other => panic!("{line}: {other:?}"),
        }
    }

    #[test]
    fn requests_notifications_and_params() {
        let r = one(r#"{"jsonrpc":"2.0","id":7,"method":"m","params":{"a":1}}"#).expect("ok");
        assert_eq!(r.id, Some(json!(7)));
        assert_eq!(r.params, json!({"a": 1}));
        let r = one(r#"{"jsonrpc":"2.0","method":"m"}"#).expect("ok");
        assert_eq!(r.id, None, "no id: a notification");
        assert_eq!(r.params, json!({}));
        let r = one(r#"{"jsonrpc":"2.0","id":null,"method":"m","params":[1]}"#).expect("ok");
        assert_eq!(r.id, Some(Value::Null), "id null is a request, answered");
        assert_eq!(r.params, json!([1]));
    }

    #[test]
    fn invalid_requests_keep_the_id_when_it_is_readable() {
        for (line, id) in [
            (r#"{"id":3,"method":"m"}"#, json!(3)),
            (r#"{"jsonrpc":"1.0","id":"x","method":"m"}"#, json!("x")),
            (r#"{"jsonrpc":"2.0","id":4,"method":5}"#, json!(4)),
            (
                r#"{"jsonrpc":"2.0","id":4,"method":"m","params":3}"#,
                json!(4),
            ),
            (r#"{"jsonrpc":"2.0","id":[1],"method":"m"}"#, Value::Null),
            (r#"{"jsonrpc":"2.0","id":{},"method":"m"}"#, Value::Null),
            ("17", Value::Null),
            (r#""str""#, Value::Null),
        ] {
            let e = one(line).expect_err(line);
            assert_eq!(e.id, id, "{line}");
            assert_eq!(e.error.code, ErrorCode::InvalidRequest, "{line}");
        }
    }

    #[test]
    fn lines_that_answer_as_a_whole() {
        for (line, code) in [
            ("{", ErrorCode::ParseError),
            ("", ErrorCode::ParseError),
            ("\u{0}", ErrorCode::ParseError),
            ("[]", ErrorCode::InvalidRequest),
        ] {
            assert_eq!(parse(line.as_bytes()).expect_err(line).code, code, "{line}");
        }
        let big = format!("[{}]", vec!["1"; BATCH_MAX + 1].join(","));
        assert_eq!(
            parse(big.as_bytes()).expect_err("batch").code,
            ErrorCode::InvalidRequest
        );
        // Deep nesting is refused by serde_json's recursion limit, not a stack overflow.
        let deep = "[".repeat(100_000);
        assert_eq!(
            parse(deep.as_bytes()).expect_err("deep").code,
            ErrorCode::ParseError
        );
    }

    #[test]
    fn batches_parse_each_element() {
        match parse(br#"[{"jsonrpc":"2.0","id":1,"method":"a"}, 5]"#).expect("batch") {
            Incoming::Batch(v) => {
                assert_eq!(v.len(), 2);
                assert!(v[0].is_ok() && v[1].is_err());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn responses_round_trip() {
        let ok = success(json!(1), json!({"x": 2})).to_string();
        assert_eq!(
            parse_response(ok.as_bytes()).expect("ok"),
            (json!(1), Ok(json!({"x": 2})))
        );
        let e = RpcError::application(-32004, "no such entry");
        let err = failure(json!("a"), &e).to_string();
        assert_eq!(
            parse_response(err.as_bytes()).expect("err"),
            (json!("a"), Err(e))
        );
        assert!(parse_response(br#"{"jsonrpc":"2.0","id":1}"#).is_err());
        assert!(parse_response(br#"{"jsonrpc":"2.0","id":1,"error":{"code":"x"}}"#).is_err());
    }
}
