//! `stratactl ns ...`: talks JSON-RPC to a name server's control socket (see
//! fabric-nameserver's `control` module for the methods) and prints tables or, with
//! `--json`, the raw results.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use jsonrpc::{Client, ClientError, ClientLimits};
use serde_json::{json, Value};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum NsError {
    /// Connecting, the exchange, or the server's error (its message as is). The client's
    /// default limits fit: a change waits for an fsync, the largest listing (a million
    /// nodes) is ~200 MiB.
    #[error("{0}")]
    Rpc(#[from] ClientError),
}

#[derive(Debug, Args)]
pub struct NsArgs {
    /// The name server's control socket (strata-nameserver puts it at DATA/control.sock).
    #[arg(long, short = 's', default_value = "strata-ns/control.sock")]
    socket: PathBuf,
    /// Print the server's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: NsCmd,
}

#[derive(Debug, Subcommand)]
enum NsCmd {
    /// List registered objects or zoning.
    #[command(subcommand)]
    List(ListWhat),
    /// Discovery domains.
    #[command(subcommand)]
    Dd(DdCmd),
    /// Discovery domain sets.
    #[command(subcommand)]
    Dds(DdsCmd),
    /// Remove a stale network entity with its nodes and portals.
    RemoveEntity { eid: String },
    /// Show or set the default-DD policy.
    Policy {
        /// on: nodes in no discovery domain see each other; off: they see nothing.
        #[arg(long, value_parser = ["on", "off"])]
        default_dd: Option<String>,
    },
    /// Counters.
    Stats,
}

#[derive(Debug, Subcommand)]
enum ListWhat {
    Entities,
    Nodes,
    Portals,
    Dds,
    Ddsets,
}

#[derive(Debug, Subcommand)]
enum DdCmd {
    /// Create a discovery domain.
    Create {
        name: String,
        /// iSCSI names of members (repeatable).
        #[arg(long = "member", short = 'm')]
        members: Vec<String>,
    },
    /// Add members to a DD.
    Add { id: u32, members: Vec<String> },
    /// Remove members from a DD.
    Remove {
        id: u32,
        #[arg(required = true)]
        members: Vec<String>,
    },
    /// Delete a DD.
    Delete { id: u32 },
}

#[derive(Debug, Subcommand)]
enum DdsCmd {
    /// Create a DD set (enabled unless --disabled).
    Create {
        name: String,
        /// DD IDs (repeatable).
        #[arg(long = "dd")]
        dds: Vec<u32>,
        #[arg(long)]
        disabled: bool,
    },
    /// Enable a DD set: its DDs become active.
    Enable { id: u32 },
    /// Disable a DD set: DDs in no other enabled set become inactive.
    Disable { id: u32 },
    /// Add DDs to a set.
    Add { id: u32, dds: Vec<u32> },
    /// Remove DDs from a set.
    Remove { id: u32, dds: Vec<u32> },
    /// Delete a DD set.
    Delete { id: u32 },
}

/// One JSON-RPC call.
fn call(socket: &Path, method: &str, params: Value) -> Result<Value, NsError> {
    let mut c = Client::connect_unix(socket, ClientLimits::default())?;
    Ok(c.call(method, &params)?)
}

/// Renders a value for a table cell.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Prints rows of objects as an aligned table of the given columns.
fn table(rows: &Value, cols: &[&str]) -> String {
    let rows = rows.as_array().cloned().unwrap_or_default();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| cols.iter().map(|c| cell(&r[*c])).collect())
        .collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].len())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let line = |vals: Vec<String>| -> String {
        let mut l = vals
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        l.truncate(l.trim_end().len());
        l + "\n"
    };
    out += &line(cols.iter().map(|c| c.to_uppercase()).collect());
    for r in cells {
        out += &line(r);
    }
    out
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

pub fn run(a: NsArgs) -> Result<(), NsError> {
    let s = &a.socket;
    let (result, cols): (Value, &[&str]) = match a.cmd {
        NsCmd::List(w) => match w {
            ListWhat::Entities => (
                call(s, "ns_entity_list", json!({}))?,
                &[
                    "eid",
                    "protocol",
                    "registration_period_secs",
                    "nodes",
                    "portals",
                ],
            ),
            ListWhat::Nodes => (
                call(s, "ns_node_list", json!({}))?,
                &["name", "type", "alias", "eid", "scn_bitmap"],
            ),
            ListWhat::Portals => (
                call(s, "ns_portal_list", json!({}))?,
                &["ip", "port", "scn_port", "esi_port", "eid"],
            ),
            ListWhat::Dds => (
                call(s, "ns_dd_list", json!({}))?,
                &["id", "name", "active", "members"],
            ),
            ListWhat::Ddsets => (
                call(s, "ns_dds_list", json!({}))?,
                &["id", "name", "enabled", "dds"],
            ),
        },
        NsCmd::Dd(c) => {
            let r = match c {
                DdCmd::Create { name, members } => {
                    call(s, "ns_dd_create", json!({"name": name, "members": members}))?
                }
                DdCmd::Add { id, members } => {
                    call(s, "ns_dd_add", json!({"id": id, "members": members}))?
                }
                DdCmd::Remove { id, members } => {
                    call(s, "ns_dd_remove", json!({"id": id, "members": members}))?
                }
                DdCmd::Delete { id } => call(s, "ns_dd_delete", json!({"id": id}))?,
            };
            (Value::Array(vec![r]), &["id", "name", "active", "members"])
        }
        NsCmd::Dds(c) => {
            let r = match c {
                DdsCmd::Create {
                    name,
                    dds,
                    disabled,
                } => call(
                    s,
                    "ns_dds_create",
                    json!({"name": name, "dds": dds, "enabled": !disabled}),
                )?,
                DdsCmd::Enable { id } => {
                    call(s, "ns_dds_edit", json!({"id": id, "enabled": true}))?
                }
                DdsCmd::Disable { id } => {
                    call(s, "ns_dds_edit", json!({"id": id, "enabled": false}))?
                }
                DdsCmd::Add { id, dds } => call(s, "ns_dds_edit", json!({"id": id, "add": dds}))?,
                DdsCmd::Remove { id, dds } => {
                    call(s, "ns_dds_edit", json!({"id": id, "remove": dds}))?
                }
                DdsCmd::Delete { id } => call(s, "ns_dds_delete", json!({"id": id}))?,
            };
            (Value::Array(vec![r]), &["id", "name", "enabled", "dds"])
        }
        NsCmd::RemoveEntity { eid } => {
            call(s, "ns_entity_delete", json!({"eid": eid}))?;
            (json!({"removed": eid}), &[])
        }
        NsCmd::Policy { default_dd } => {
            let r = match default_dd {
                Some(v) => call(s, "ns_policy_set", json!({"default_dd": v == "on"}))?,
                None => call(s, "ns_policy_get", json!({}))?,
            };
            (r, &[])
        }
        NsCmd::Stats => (call(s, "ns_stats", json!({}))?, &[]),
    };
    // Deletions answer null: print nothing but succeed.
    let shown = match &result {
        Value::Array(a) if a.iter().all(Value::is_null) => Value::Array(vec![]),
        v => v.clone(),
    };
    if a.json {
        println!("{}", pretty(&shown));
    } else if cols.is_empty() {
        // Key/value objects (stats, policy) print as "key: value" lines.
        if let Value::Object(m) = &shown {
            for (k, v) in m {
                println!("{k}: {}", cell(v));
            }
        }
    } else {
        print!("{}", table(&shown, cols));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns_and_renders_lists() {
        let rows = json!([{"id": 1, "name": "zone-a", "members": ["a", "b"]},
                          {"id": 22, "name": "z", "members": []}]);
        let t = table(&rows, &["id", "name", "members"]);
        assert_eq!(t, "ID  NAME    MEMBERS\n1   zone-a  a,b\n22  z\n");
    }
}
