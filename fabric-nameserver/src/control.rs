//! The administrator's control socket: JSON-RPC 2.0 over a Unix stream socket (the `jsonrpc`
//! crate: one request per line, one response per line). This module owns the name server's
//! method table; names follow Strata's `object_verb` scheme under the `ns_` prefix. Params
//! are JSON objects:
//!
//! | method | params | result |
//! |---|---|---|
//! | `ns_stats` | – | counters ([`crate::service::StatsReport`]) |
//! | `ns_entity_list` / `ns_node_list` / `ns_portal_list` / `ns_dd_list` / `ns_dds_list` | – | arrays of objects |
//! | `ns_dd_create` | `name`, `members` (iSCSI names) | the DD |
//! | `ns_dd_add` / `ns_dd_remove` | `id`, `members` | the DD |
//! | `ns_dd_delete` | `id` | – |
//! | `ns_dds_create` | `name`, `dds` (DD IDs), `enabled` | the DD set |
//! | `ns_dds_edit` | `id`, optional `name`, `enabled`, `add`, `remove` | the DD set |
//! | `ns_dds_delete` | `id` | – |
//! | `ns_entity_delete` | `eid` | – (removes a stale entity with its nodes and portals) |
//! | `ns_policy_get` / `ns_policy_set` | `default_dd` | the policy |
//! | `rpc_get_methods` | – | the method names |
//!
//! Every change goes through the same path as iSNSP registrations ([`Service::run`]):
//! logged, durable before the answer, and notified to SCN subscribers.

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use jsonrpc::{Limits, Methods, NoParams, RpcError, Server};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::command::DdMember;
use crate::registry::{Policy, RegistryError};
use crate::service::{RunError, Service};

/// Application error: the object does not exist.
pub const NOT_FOUND: i64 = -32004;
/// Application error: the registry refused the change, or it could not be made durable.
pub const SERVER_ERROR: i64 = -32000;

fn run_err(e: RunError) -> RpcError {
    match e {
        RunError::Registry(RegistryError::NoSuchEntry) => {
            RpcError::application(NOT_FOUND, e.to_string())
        }
        e => RpcError::application(SERVER_ERROR, e.to_string()),
    }
}

/// Binds the control socket. A stale socket from a killed server is replaced; the data
/// directory lock (taken before this) guarantees no live server owns it.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path)
}

/// Serves the control socket until `stop` is set (and the listener woken), each client on a
/// thread of its own under the `jsonrpc` crate's default limits (1 MiB requests, deadlines,
/// at most 16 clients at once).
pub fn serve(listener: &UnixListener, svc: &Arc<Service>, stop: &AtomicBool) {
    let server = Server::new(methods(svc), Limits::default());
    server.serve(listener, stop, |_| true);
}

#[derive(Debug, Deserialize)]
struct DdCreate {
    name: String,
    #[serde(default)]
    members: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct DdEdit {
    id: u32,
    #[serde(default)]
    members: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Id {
    id: u32,
}

#[derive(Debug, Deserialize)]
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

#[derive(Debug, Deserialize)]
struct DdsEdit {
    id: u32,
    name: Option<String>,
    enabled: Option<bool>,
    #[serde(default)]
    add: Vec<u32>,
    #[serde(default)]
    remove: Vec<u32>,
}

#[derive(Debug, Deserialize)]
struct Eid {
    eid: String,
}

#[derive(Debug, Deserialize)]
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

/// The name server's method table over `svc`.
pub fn methods(svc: &Arc<Service>) -> Methods {
    let mut m = Methods::new();
    let s = svc.clone();
    m.add("ns_stats", move |_: NoParams| Ok(s.report()));
    let s = svc.clone();
    m.add("ns_entity_list", move |_: NoParams| {
        let reg = s.registry();
        let v: Vec<Value> = reg
            .entities()
            .map(|e| {
                json!({"eid": e.eid, "protocol": e.protocol, "index": e.index,
                       "registration_period_secs": e.period_secs,
                       "timestamp": e.timestamp_secs,
                       "nodes": e.nodes.iter().map(|n| &n.name).collect::<Vec<_>>(),
                       "portals": e.portals.iter()
                           .map(|p| format!("{}:{}", ip_str(&p.ip), p.port & 0xffff))
                           .collect::<Vec<_>>()})
            })
            .collect();
        Ok(v)
    });
    let s = svc.clone();
    m.add("ns_node_list", move |_: NoParams| {
        let reg = s.registry();
        let v: Vec<Value> = reg
            .entities()
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
            .collect();
        Ok(v)
    });
    let s = svc.clone();
    m.add("ns_portal_list", move |_: NoParams| {
        let reg = s.registry();
        let v: Vec<Value> = reg
            .entities()
            .flat_map(|e| e.portals.iter().map(move |p| (e, p)))
            .map(|(e, p)| {
                json!({"ip": ip_str(&p.ip), "port": p.port & 0xffff,
                       "udp": p.port & 0x10000 != 0, "index": p.index,
                       "scn_port": p.scn_port, "esi_port": p.esi_port, "eid": e.eid})
            })
            .collect();
        Ok(v)
    });
    let s = svc.clone();
    m.add("ns_dd_list", move |_: NoParams| {
        let reg = s.registry();
        let v: Vec<Value> = reg
            .dds()
            .map(|d| {
                json!({"id": d.id, "name": d.name, "features": d.features,
                       "active": reg.dd_active(d.id), "members": d.members})
            })
            .collect();
        Ok(v)
    });
    let s = svc.clone();
    m.add("ns_dds_list", move |_: NoParams| {
        let reg = s.registry();
        let v: Vec<Value> = reg
            .ddsets()
            .map(|s| json!({"id": s.id, "name": s.name, "enabled": s.enabled, "dds": s.dds}))
            .collect();
        Ok(v)
    });
    let s = svc.clone();
    m.add("ns_dd_create", move |a: DdCreate| {
        if s.registry().dds().any(|d| d.name == a.name) {
            return Err(RpcError::invalid_params(format!("DD {} exists", a.name)));
        }
        let members = names(a.members);
        s.run(|r| r.dd_register(None, None, Some(&a.name), None, &members))
            .map_err(run_err)?;
        let id = s
            .registry()
            .dds()
            .find(|d| d.name == a.name)
            .map(|d| d.id)
            .unwrap_or(0);
        Ok(dd_json(&s, id))
    });
    let s = svc.clone();
    m.add("ns_dd_add", move |a: DdEdit| {
        let members = names(a.members);
        s.run(|r| r.dd_register(Some(a.id), None, None, None, &members))
            .map_err(run_err)?;
        Ok(dd_json(&s, a.id))
    });
    let s = svc.clone();
    m.add("ns_dd_remove", move |a: DdEdit| {
        if a.members.is_empty() {
            return Err(RpcError::invalid_params(
                "no members named (use ns_dd_delete)",
            ));
        }
        let members = names(a.members);
        s.run(|r| r.dd_deregister(a.id, &members))
            .map_err(run_err)?;
        Ok(dd_json(&s, a.id))
    });
    let s = svc.clone();
    m.add("ns_dd_delete", move |a: Id| {
        s.run(|r| r.dd_deregister(a.id, &[])).map_err(run_err)?;
        Ok(Value::Null)
    });
    let s = svc.clone();
    m.add("ns_dds_create", move |a: DdsCreate| {
        if s.registry().ddsets().any(|d| d.name == a.name) {
            return Err(RpcError::invalid_params(format!(
                "DD set {} exists",
                a.name
            )));
        }
        s.run(|r| r.dds_register(None, None, Some(&a.name), Some(a.enabled), &a.dds))
            .map_err(run_err)?;
        let id = s
            .registry()
            .ddsets()
            .find(|d| d.name == a.name)
            .map(|d| d.id)
            .unwrap_or(0);
        Ok(dds_json(&s, id))
    });
    let s = svc.clone();
    m.add("ns_dds_edit", move |a: DdsEdit| {
        s.run(|r| r.dds_register(Some(a.id), None, a.name.as_deref(), a.enabled, &a.add))
            .map_err(run_err)?;
        if !a.remove.is_empty() {
            s.run(|r| r.dds_deregister(a.id, &a.remove))
                .map_err(run_err)?;
        }
        Ok(dds_json(&s, a.id))
    });
    let s = svc.clone();
    m.add("ns_dds_delete", move |a: Id| {
        s.run(|r| r.dds_deregister(a.id, &[])).map_err(run_err)?;
        Ok(Value::Null)
    });
    let s = svc.clone();
    m.add("ns_entity_delete", move |a: Eid| {
        s.run(|r| r.admin_remove_entity(&a.eid)).map_err(run_err)?;
        Ok(Value::Null)
    });
    let s = svc.clone();
    m.add("ns_policy_get", move |_: NoParams| {
        Ok(json!({"default_dd": s.registry().policy().default_dd}))
    });
    let s = svc.clone();
    m.add("ns_policy_set", move |a: PolicySet| {
        s.run(|r| {
            Ok(r.set_policy(Policy {
                default_dd: a.default_dd,
            }))
        })
        .map_err(run_err)?;
        Ok(json!({"default_dd": a.default_dd}))
    });
    m
}
