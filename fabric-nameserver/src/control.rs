//! The administrator's control socket: JSON-RPC 2.0 over a Unix stream socket, one request
//! per line, one response per line. Methods (params are JSON objects):
//!
//! | method | params | result |
//! |---|---|---|
//! | `stats` | – | counters ([`crate::server::StatsReport`]) |
//! | `list_entities` / `list_nodes` / `list_portals` / `list_dds` / `list_ddsets` | – | arrays of objects |
//! | `dd_create` | `name`, `members` (iSCSI names) | the DD |
//! | `dd_add` / `dd_remove` | `id`, `members` | the DD (remove with no members deletes it) |
//! | `dd_delete` | `id` | – |
//! | `dds_create` | `name`, `dds` (DD IDs), `enabled` | the DD set |
//! | `dds_edit` | `id`, optional `name`, `enabled`, `add`, `remove` | the DD set |
//! | `dds_delete` | `id` | – |
//! | `entity_remove` | `eid` | – (removes a stale entity with its nodes and portals) |
//! | `policy_get` / `policy_set` | `default_dd` | the policy |
//!
//! Every change goes through the same path as iSNSP registrations: logged, durable before
//! the answer, and notified to SCN subscribers.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use thiserror::Error;

use crate::command::DdMember;
use crate::registry::{Policy, RegistryError};
use crate::server::{RunError, ServerError, Service};

/// Longest request line accepted.
pub const MAX_REQUEST_BYTES: u64 = 1024 * 1024;
/// A control connection idle this long is closed.
pub const CONTROL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// JSON-RPC error codes.
const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;
const SERVER_ERROR: i64 = -32000;
/// Application error: the object does not exist.
const NOT_FOUND: i64 = -32004;

#[derive(Debug, Error)]
pub enum ControlError {
    #[error("unknown method {0}")]
    Method(String),
    #[error("invalid params: {0}")]
    Params(String),
    #[error(transparent)]
    Run(#[from] RunError),
}

impl ControlError {
    fn code(&self) -> i64 {
        match self {
            ControlError::Method(_) => METHOD_NOT_FOUND,
            ControlError::Params(_) => INVALID_PARAMS,
            ControlError::Run(RunError::Registry(RegistryError::NoSuchEntry)) => NOT_FOUND,
            ControlError::Run(_) => SERVER_ERROR,
        }
    }
}

pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    // A stale socket from a killed server is replaced; the data directory lock (taken
    // before this) guarantees no live server owns it.
    if path.exists() {
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|source| ServerError::Control {
        path: path.to_owned(),
        source,
    })
}

pub fn serve(listener: &UnixListener, svc: &Arc<Service>, stop: &AtomicBool) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(_) if stop.load(Ordering::SeqCst) => return,
            Err(e) => {
                tracing::warn!(error = %e, "control accept failed");
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
        };
        let svc = svc.clone();
        let _ = std::thread::Builder::new()
            .name("control-conn".into())
            .spawn(move || {
                if let Err(e) = serve_conn(stream, &svc) {
                    tracing::debug!(error = %e, "control connection closed");
                }
            });
    }
}

fn serve_conn(stream: UnixStream, svc: &Service) -> std::io::Result<()> {
    stream.set_read_timeout(Some(CONTROL_IDLE_TIMEOUT))?;
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        let n = (&mut reader)
            .take(MAX_REQUEST_BYTES + 1)
            .read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        if n as u64 > MAX_REQUEST_BYTES {
            let r = error_response(Value::Null, INVALID_REQUEST, "request too long");
            writeln!(out, "{r}")?;
            return Ok(());
        }
        if line.trim().is_empty() {
            continue;
        }
        let resp = handle_line(svc, &line);
        writeln!(out, "{resp}")?;
    }
}

fn error_response(id: Value, code: i64, msg: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": msg}})
}

/// Handles one JSON-RPC request line.
pub fn handle_line(svc: &Service, line: &str) -> Value {
    let v: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return error_response(Value::Null, PARSE_ERROR, &e.to_string()),
    };
    let id = v.get("id").cloned().unwrap_or(Value::Null);
    let Some(method) = v.get("method").and_then(Value::as_str) else {
        return error_response(id, INVALID_REQUEST, "missing method");
    };
    let params = v.get("params").cloned().unwrap_or(json!({}));
    match call(svc, method, params) {
        Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
        Err(e) => error_response(id, e.code(), &e.to_string()),
    }
}

fn params<T: for<'de> Deserialize<'de>>(p: Value) -> Result<T, ControlError> {
    serde_json::from_value(p).map_err(|e| ControlError::Params(e.to_string()))
}

#[derive(Deserialize)]
struct DdCreate {
    name: String,
    #[serde(default)]
    members: Vec<String>,
}

#[derive(Deserialize)]
struct DdEdit {
    id: u32,
    #[serde(default)]
    members: Vec<String>,
}

#[derive(Deserialize)]
struct Id {
    id: u32,
}

#[derive(Deserialize)]
struct DdsCreate {
    name: String,
    #[serde(default)]
    dds: Vec<u32>,
    #[serde(default = "yes")]
    enabled: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
struct DdsEdit {
    id: u32,
    name: Option<String>,
    enabled: Option<bool>,
    #[serde(default)]
    add: Vec<u32>,
    #[serde(default)]
    remove: Vec<u32>,
}

#[derive(Deserialize)]
struct Eid {
    eid: String,
}

#[derive(Deserialize)]
struct PolicySet {
    default_dd: bool,
}

fn ip_str(ip: &std::net::Ipv6Addr) -> String {
    match ip.to_ipv4_mapped() {
        Some(v4) => v4.to_string(),
        None => ip.to_string(),
    }
}

fn dd_json(svc: &Service, id: u32) -> Value {
    let reg = svc.registry();
    let v = reg
        .dds()
        .find(|d| d.id == id)
        .map(|d| {
            json!({"id": d.id, "name": d.name, "features": d.features,
                   "active": reg.dd_active(d.id), "members": d.members})
        })
        .unwrap_or(Value::Null);
    v
}

fn dds_json(svc: &Service, id: u32) -> Value {
    let reg = svc.registry();
    let v = reg
        .ddsets()
        .find(|s| s.id == id)
        .map(|s| json!({"id": s.id, "name": s.name, "enabled": s.enabled, "dds": s.dds}))
        .unwrap_or(Value::Null);
    v
}

fn names(members: Vec<String>) -> Vec<DdMember> {
    members.into_iter().map(DdMember::Name).collect()
}

fn call(svc: &Service, method: &str, p: Value) -> Result<Value, ControlError> {
    match method {
        "stats" => {
            serde_json::to_value(svc.report()).map_err(|e| ControlError::Params(e.to_string()))
        }
        "list_entities" => {
            let reg = svc.registry();
            Ok(Value::Array(
                reg.entities()
                    .map(|e| {
                        json!({"eid": e.eid, "protocol": e.protocol, "index": e.index,
                               "registration_period_secs": e.period_secs,
                               "timestamp": e.timestamp_secs,
                               "nodes": e.nodes.iter().map(|n| &n.name).collect::<Vec<_>>(),
                               "portals": e.portals.iter()
                                   .map(|p| format!("{}:{}", ip_str(&p.ip), p.port & 0xffff))
                                   .collect::<Vec<_>>()})
                    })
                    .collect(),
            ))
        }
        "list_nodes" => {
            let reg = svc.registry();
            Ok(Value::Array(
                reg.entities()
                    .flat_map(|e| e.nodes.iter().map(move |n| (e, n)))
                    .map(|(e, n)| {
                        let t = n.node_type;
                        let mut types = Vec::new();
                        if t & crate::registry::NODE_TARGET != 0 {
                            types.push("target");
                        }
                        if t & crate::registry::NODE_INITIATOR != 0 {
                            types.push("initiator");
                        }
                        if t & crate::registry::NODE_CONTROL != 0 {
                            types.push("control");
                        }
                        json!({"name": n.name, "type": types, "alias": n.alias,
                               "index": n.index, "eid": e.eid, "scn_bitmap": n.scn_bitmap})
                    })
                    .collect(),
            ))
        }
        "list_portals" => {
            let reg = svc.registry();
            Ok(Value::Array(
                reg.entities()
                    .flat_map(|e| e.portals.iter().map(move |p| (e, p)))
                    .map(|(e, p)| {
                        json!({"ip": ip_str(&p.ip), "port": p.port & 0xffff,
                               "udp": p.port & 0x10000 != 0, "index": p.index,
                               "scn_port": p.scn_port, "esi_port": p.esi_port, "eid": e.eid})
                    })
                    .collect(),
            ))
        }
        "list_dds" => {
            let reg = svc.registry();
            Ok(Value::Array(
                reg.dds()
                    .map(|d| {
                        json!({"id": d.id, "name": d.name, "features": d.features,
                               "active": reg.dd_active(d.id), "members": d.members})
                    })
                    .collect(),
            ))
        }
        "list_ddsets" => {
            let reg = svc.registry();
            Ok(Value::Array(
                reg.ddsets()
                    .map(
                        |s| json!({"id": s.id, "name": s.name, "enabled": s.enabled, "dds": s.dds}),
                    )
                    .collect(),
            ))
        }
        "dd_create" => {
            let a: DdCreate = params(p)?;
            if svc.registry().dds().any(|d| d.name == a.name) {
                return Err(ControlError::Params(format!("DD {} exists", a.name)));
            }
            let members = names(a.members);
            svc.run(|r| r.dd_register(None, None, Some(&a.name), None, &members))?;
            let id = svc
                .registry()
                .dds()
                .find(|d| d.name == a.name)
                .map(|d| d.id)
                .unwrap_or(0);
            Ok(dd_json(svc, id))
        }
        "dd_add" => {
            let a: DdEdit = params(p)?;
            let members = names(a.members);
            svc.run(|r| r.dd_register(Some(a.id), None, None, None, &members))?;
            Ok(dd_json(svc, a.id))
        }
        "dd_remove" => {
            let a: DdEdit = params(p)?;
            if a.members.is_empty() {
                return Err(ControlError::Params(
                    "no members named (use dd_delete)".into(),
                ));
            }
            let members = names(a.members);
            svc.run(|r| r.dd_deregister(a.id, &members))?;
            Ok(dd_json(svc, a.id))
        }
        "dd_delete" => {
            let a: Id = params(p)?;
            svc.run(|r| r.dd_deregister(a.id, &[]))?;
            Ok(Value::Null)
        }
        "dds_create" => {
            let a: DdsCreate = params(p)?;
            if svc.registry().ddsets().any(|s| s.name == a.name) {
                return Err(ControlError::Params(format!("DD set {} exists", a.name)));
            }
            svc.run(|r| r.dds_register(None, None, Some(&a.name), Some(a.enabled), &a.dds))?;
            let id = svc
                .registry()
                .ddsets()
                .find(|s| s.name == a.name)
                .map(|s| s.id)
                .unwrap_or(0);
            Ok(dds_json(svc, id))
        }
        "dds_edit" => {
            let a: DdsEdit = params(p)?;
            svc.run(|r| r.dds_register(Some(a.id), None, a.name.as_deref(), a.enabled, &a.add))?;
            if !a.remove.is_empty() {
                svc.run(|r| r.dds_deregister(a.id, &a.remove))?;
            }
            Ok(dds_json(svc, a.id))
        }
        "dds_delete" => {
            let a: Id = params(p)?;
            svc.run(|r| r.dds_deregister(a.id, &[]))?;
            Ok(Value::Null)
        }
        "entity_remove" => {
            let a: Eid = params(p)?;
            svc.run(|r| r.admin_remove_entity(&a.eid))?;
            Ok(Value::Null)
        }
        "policy_get" => Ok(json!({"default_dd": svc.registry().policy().default_dd})),
        "policy_set" => {
            let a: PolicySet = params(p)?;
            svc.run(|r| {
                Ok(r.set_policy(Policy {
                    default_dd: a.default_dd,
                }))
            })?;
            Ok(json!({"default_dd": a.default_dd}))
        }
        m => Err(ControlError::Method(m.to_owned())),
    }
}
