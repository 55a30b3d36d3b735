//! A daemon's method table: names mapped to handlers that take serde-typed params and
//! return serde-typed results; `rpc_get_methods` (the sorted names) is built in. The table
//! belongs to the daemon that owns the objects; this crate only dispatches.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::RpcError;
use crate::message::{self, Incoming, Invalid, Request};

/// The built-in method listing every method of the table (SPDK's name for it).
pub const GET_METHODS: &str = "rpc_get_methods";

/// Params of a method that takes none: `{}`, `[]` or no params at all (members a client
/// adds anyway are ignored).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize)]
pub struct NoParams {}

type Handler = Box<dyn Fn(Value) -> Result<Value, RpcError> + Send + Sync>;

/// Method name → handler.
#[derive(Default)]
pub struct Methods {
    table: BTreeMap<String, Handler>,
}

impl std::fmt::Debug for Methods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Methods")
            .field("names", &self.names())
            .finish()
    }
}

impl Methods {
    /// A table with only `rpc_get_methods`.
    pub fn new() -> Methods {
        Methods::default()
    }

    /// Adds method `name`: `f` gets the request's params decoded as `P` (a decoding failure
    /// answers -32602 Invalid params without calling it) and its `R` is the result. A later
    /// handler of the same name replaces the earlier one.
    pub fn add<P, R, F>(&mut self, name: &str, f: F) -> &mut Methods
    where
        P: DeserializeOwned,
        R: Serialize,
        F: Fn(P) -> Result<R, RpcError> + Send + Sync + 'static,
    {
        let h = move |params: Value| {
            let p: P = serde_json::from_value(params).map_err(RpcError::invalid_params)?;
            let r = f(p)?;
            serde_json::to_value(r).map_err(RpcError::internal)
        };
        self.table.insert(name.to_owned(), Box::new(h));
        self
    }

    /// Every method's name, sorted, `rpc_get_methods` included.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.table.keys().map(String::as_str).collect();
        if !self.table.contains_key(GET_METHODS) {
            v.push(GET_METHODS);
            v.sort_unstable();
        }
        v
    }

    /// Whether `name` is a method of the table.
    pub fn contains(&self, name: &str) -> bool {
        name == GET_METHODS || self.table.contains_key(name)
    }

    /// Runs one method. A panicking handler is an internal error (the caller's thread and the
    /// other methods carry on).
    pub fn call(&self, method: &str, params: Value) -> Result<Value, RpcError> {
        let Some(h) = self.table.get(method) else {
            if method == GET_METHODS {
                return serde_json::to_value(self.names()).map_err(RpcError::internal);
            }
            return Err(RpcError::method_not_found(method));
        };
        std::panic::catch_unwind(AssertUnwindSafe(|| h(params))).unwrap_or_else(|_| {
            tracing::error!(method, "RPC method panicked");
            Err(RpcError::internal(format!("method '{method}' failed")))
        })
    }

    /// [`Methods::call`] with typed params and result, for a process that runs the methods
    /// itself (e.g. an administration tool working on a datastore without the daemon).
    pub fn call_typed<P: Serialize, R: DeserializeOwned>(
        &self,
        method: &str,
        params: &P,
    ) -> Result<R, RpcError> {
        let p = serde_json::to_value(params).map_err(RpcError::invalid_params)?;
        let v = self.call(method, p)?;
        serde_json::from_value(v).map_err(RpcError::internal)
    }

    fn answer(&self, r: Result<Request, Invalid>) -> Option<Value> {
        match r {
            Ok(Request { id, method, params }) => {
                let out = self.call(&method, params);
                // A notification is run but never answered, not even its error.
                let id = id?;
                Some(match out {
                    Ok(v) => message::success(id, v),
                    Err(e) => message::failure(id, &e),
                })
            }
            Err(Invalid { id, error }) => Some(message::failure(id, &error)),
        }
    }

    /// Handles one request line (without its newline): the response line to send, or `None`
    /// when there is nothing to answer (notifications only).
    pub fn handle(&self, line: &[u8]) -> Option<String> {
        let v = match message::parse(line) {
            Err(e) => Some(message::failure(Value::Null, &e)),
            Ok(Incoming::Single(r)) => self.answer(r),
            Ok(Incoming::Batch(rs)) => {
                let out: Vec<Value> = rs.into_iter().filter_map(|r| self.answer(r)).collect();
                (!out.is_empty()).then_some(Value::Array(out))
            }
        };
        v.map(|v| v.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use serde_json::json;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    #[derive(Deserialize)]
    struct Add {
        a: u32,
        b: u32,
    }

    fn table(counter: Arc<AtomicU64>) -> Methods {
        let mut m = Methods::new();
        m.add("math_add", |p: Add| Ok(p.a + p.b))
            .add("counter_bump", move |_: NoParams| {
                Ok(counter.fetch_add(1, Ordering::SeqCst) + 1)
            })
            .add("boom", |_: NoParams| -> Result<(), RpcError> {
                panic!("handler bug")
            })
            .add("fail", |_: NoParams| -> Result<(), RpcError> {
                Err(RpcError::application(-32004, "no such entry"))
            });
        m
    }

    fn reply(m: &Methods, line: &str) -> Value {
        serde_json::from_str(&m.handle(line.as_bytes()).expect("an answer")).expect("json")
    }

    #[test]
    fn typed_params_results_and_errors() {
        let m = table(Arc::default());
        let r = reply(
            &m,
            r#"{"jsonrpc":"2.0","id":1,"method":"math_add","params":{"a":2,"b":3}}"#,
        );
        assert_eq!(r, json!({"jsonrpc": "2.0", "id": 1, "result": 5}));
        let r = reply(
            &m,
            r#"{"jsonrpc":"2.0","id":2,"method":"math_add","params":{"a":"x"}}"#,
        );
        assert_eq!(r["error"]["code"], -32602, "{r}");
        assert_eq!(r["id"], 2);
        let r = reply(&m, r#"{"jsonrpc":"2.0","id":3,"method":"nope"}"#);
        assert_eq!(r["error"]["code"], -32601, "{r}");
        let r = reply(&m, r#"{"jsonrpc":"2.0","id":4,"method":"fail"}"#);
        assert_eq!(
            r["error"],
            json!({"code": -32004, "message": "no such entry"})
        );
        let r = reply(&m, r#"{"jsonrpc":"2.0","id":5,"method":"boom"}"#);
        assert_eq!(
            r["error"]["code"], -32603,
            "a panic is an internal error: {r}"
        );
        let r = reply(&m, "{oops");
        assert_eq!(r["error"]["code"], -32700);
        assert_eq!(r["id"], Value::Null);
        let sum: u32 = m
            .call_typed("math_add", &json!({"a": 1, "b": 1}))
            .expect("call");
        assert_eq!(sum, 2);
    }

    #[test]
    fn get_methods_lists_the_table() {
        let m = table(Arc::default());
        let r = reply(&m, r#"{"jsonrpc":"2.0","id":1,"method":"rpc_get_methods"}"#);
        assert_eq!(
            r["result"],
            json!([
                "boom",
                "counter_bump",
                "fail",
                "math_add",
                "rpc_get_methods"
            ])
        );
        assert!(m.contains("rpc_get_methods") && m.contains("fail") && !m.contains("x"));
    }

    #[test]
    fn notifications_run_but_are_never_answered() {
        let c = Arc::new(AtomicU64::new(0));
        let m = table(c.clone());
        assert_eq!(
            m.handle(br#"{"jsonrpc":"2.0","method":"counter_bump"}"#),
            None
        );
        assert_eq!(c.load(Ordering::SeqCst), 1, "the notification ran");
        // Not even an error is answered.
        assert_eq!(m.handle(br#"{"jsonrpc":"2.0","method":"nope"}"#), None);
        assert_eq!(m.handle(br#"{"jsonrpc":"2.0","method":"fail"}"#), None);
        // A batch of notifications: nothing; mixed: only the requests.
        let n = r#"{"jsonrpc":"2.0","method":"counter_bump"}"#;
        assert_eq!(m.handle(format!("[{n},{n}]").as_bytes()), None);
        assert_eq!(c.load(Ordering::SeqCst), 3);
        let r = reply(
            &m,
            &format!(r#"[{n},{{"jsonrpc":"2.0","id":9,"method":"counter_bump"}},7]"#),
        );
        let a = r.as_array().expect("array");
        assert_eq!(a.len(), 2, "{r}");
        assert_eq!(a[0], json!({"jsonrpc": "2.0", "id": 9, "result": 5}));
        assert_eq!(a[1]["error"]["code"], -32600);
    }

    #[test]
    fn error_codes_are_typed() {
        let m = table(Arc::default());
        let e = m.call("math_add", json!([])).expect_err("missing");
        assert_eq!(e.code, ErrorCode::InvalidParams);
        let e = m.call("fail", json!({})).expect_err("fail");
        assert_eq!(e.code, ErrorCode::Application(-32004));
    }
}
