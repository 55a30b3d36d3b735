//! The control socket's JSON-RPC surface: the method table, typed errors, notifications.
// Test code: helpers outside #[test] functions panic on failure too.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::json;

#[test]
fn the_control_socket_lists_its_methods_and_types_its_errors() {
    let dir = tempfile::tempdir().unwrap();
    let srv = common::start_server(dir.path());
    let ctl = srv.control_path.clone();
    let names = common::rpc(&ctl, "rpc_get_methods", json!({}));
    assert_eq!(
        names["result"],
        json!([
            "ns_dd_add",
            "ns_dd_create",
            "ns_dd_delete",
            "ns_dd_list",
            "ns_dd_remove",
            "ns_dds_create",
            "ns_dds_delete",
            "ns_dds_edit",
            "ns_dds_list",
            "ns_entity_delete",
            "ns_entity_list",
            "ns_node_list",
            "ns_policy_get",
            "ns_policy_set",
            "ns_portal_list",
            "ns_stats",
            "rpc_get_methods"
        ])
    );
    // The old names are gone.
    let r = common::rpc(&ctl, "list_dds", json!({}));
    assert_eq!(r["error"]["code"], -32601, "{r}");
    // Missing object: the application's not-found code; bad params: -32602.
    let r = common::rpc(&ctl, "ns_entity_delete", json!({"eid": "nope"}));
    assert_eq!(r["error"]["code"], -32004, "{r}");
    let r = common::rpc(&ctl, "ns_dd_create", json!({"members": []}));
    assert_eq!(r["error"]["code"], -32602, "{r}");
    let r = common::rpc(&ctl, "ns_dd_remove", json!({"id": 1, "members": []}));
    assert_eq!(r["error"]["code"], -32602, "{r}");

    // A notification changes the state and gets no answer: the next line answers the
    // request sent after it.
    let mut s = UnixStream::connect(&ctl).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    writeln!(
        s,
        r#"{{"jsonrpc":"2.0","method":"ns_dd_create","params":{{"name":"z","members":["iqn.x:a"]}}}}"#
    )
    .unwrap();
    writeln!(s, r#"{{"jsonrpc":"2.0","id":"q","method":"ns_dd_list"}}"#).unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["id"], "q");
    assert_eq!(v["result"][0]["name"], "z", "{v}");
    srv.shutdown();
}
