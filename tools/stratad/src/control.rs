//! The JSON-RPC 2.0 control socket (`--control PATH`): one request per line, one response per
//! line, on a Unix socket, served by one thread.
//!
//! Methods: `stats` (reactor, disk and share counters, and with `--port` the packet queues'
//! counters (`packet_queues`) and the XDP steering program's per interface (`steering`)), and
//! when a datastore is open: `info`,
//! `ls {path}`, `mkdir {path}`, `disk.create {name, size, provisioning}`, `disk.rm {name}`,
//! `disk.resize {name, size}`. `stratactl --control PATH ...` is the client.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dataplane::server::StatsHandle;
use serde_json::{json, Value};
use vmfs::fs::Datastore;

/// A client must send its request line within this time; the control thread serves one client
/// at a time and must not be held by a silent one.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request line accepted (a request is a few hundred bytes).
const REQUEST_BYTES_MAX: u64 = 64 << 10;

/// JSON-RPC error codes.
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;
const SERVER_ERROR: i64 = -32000;

/// What the control thread can reach.
#[derive(Debug, Clone)]
pub struct Control {
    /// Counters.
    pub stats: StatsHandle,
    /// The open datastore, if any.
    pub datastore: Option<Arc<Datastore>>,
    /// Packet queues and steering programs (`--port`).
    pub ports: crate::ports::PortCounters,
    /// Shared folders (`--share`).
    pub shares: Vec<file_server::share::Share>,
}

struct RpcError(i64, String);

impl Control {
    fn ds(&self) -> Result<&Arc<Datastore>, RpcError> {
        self.datastore
            .as_ref()
            .ok_or_else(|| RpcError(SERVER_ERROR, "stratad runs without a datastore".into()))
    }

    fn call(&self, method: &str, p: &Value) -> Result<Value, RpcError> {
        match method {
            "stats" => {
                let mut v = stats_json(&self.stats);
                let (queues, steering) = ports_json(&self.ports.snapshot());
                v["packet_queues"] = queues;
                v["steering"] = steering;
                v["shares"] = Value::Array(self.shares.iter().map(share_json).collect());
                Ok(v)
            }
            method => vmfs::admin::call(self.ds()?, method, p, &mut |_, _| {}).map_err(|e| {
                let code = match e {
                    vmfs::admin::AdminError::UnknownMethod(_) => METHOD_NOT_FOUND,
                    vmfs::admin::AdminError::Params(_) => INVALID_PARAMS,
                    vmfs::admin::AdminError::Fs(_) => SERVER_ERROR,
                };
                RpcError(code, e.to_string())
            }),
        }
    }

    /// Answers one request line.
    pub fn handle_line(&self, line: &str) -> Value {
        let req: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                return json!({"jsonrpc": "2.0", "id": null,
                    "error": {"code": -32700, "message": format!("parse error: {e}")}})
            }
        };
        let id = req.get("id").cloned().unwrap_or(Value::Null);
        let Some(method) = req.get("method").and_then(Value::as_str) else {
            return json!({"jsonrpc": "2.0", "id": id,
                "error": {"code": INVALID_REQUEST, "message": "missing method"}});
        };
        let params = req.get("params").cloned().unwrap_or(Value::Null);
        match self.call(method, &params) {
            Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
            Err(RpcError(code, message)) => {
                json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
            }
        }
    }

    fn serve_client(&self, stream: UnixStream) -> std::io::Result<()> {
        stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        let mut writer = stream.try_clone()?;
        let mut reader = BufReader::new(std::io::Read::take(stream, REQUEST_BYTES_MAX));
        let mut line = String::new();
        // One client may send several requests; bounded by REQUEST_BYTES_MAX in total.
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let resp = self.handle_line(line.trim());
            writeln!(writer, "{resp}")?;
        }
    }
}

/// Binds `path` (replacing a stale socket) and serves it on a new thread.
pub fn spawn(path: &Path, control: Control) -> std::io::Result<PathBuf> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("control socket {} is in use", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => {
                        if let Err(e) = control.serve_client(s) {
                            tracing::debug!(err = %e, "control client");
                        }
                    }
                    Err(e) => tracing::warn!(err = %e, "control accept"),
                }
            }
        })?;
    Ok(path.to_path_buf())
}

fn stats_json(h: &StatsHandle) -> Value {
    let s = h.stats();
    let reactors: Vec<Value> = s
        .reactors
        .iter()
        .enumerate()
        .map(|(i, (cpu, r))| {
            json!({
                "reactor": i, "cpu": cpu, "busy_ns": r.busy_ns, "busy_cycles": r.busy_cycles,
                "cycles_per_io": r.cycles_per_io(), "spin_idle_ns": r.spin_idle_ns,
                "sleep_ns": r.sleep_ns, "sleeps": r.sleeps, "requests": r.requests,
                "submits": r.submits, "submitted_ops": r.submitted_ops, "queues": r.queues,
                "pop_batches": r.pop_batches, "reap_batches": r.reap_batches, "reaped": r.reaped,
            })
        })
        .collect();
    let disks: Vec<Value> = s
        .disks
        .iter()
        .map(|d| {
            let queues: Vec<Value> = d
                .queues
                .iter()
                .map(|q| {
                    json!({
                        "requests": q.requests, "read_bytes": q.read_bytes,
                        "write_bytes": q.write_bytes, "invalid_requests": q.invalid_requests,
                        "unsupported_requests": q.unsupported_requests, "io_errors": q.io_errors,
                        "notifications": q.notifications,
                    })
                })
                .collect();
            json!({"name": d.name, "kind": d.kind, "socket": d.socket, "queues": queues})
        })
        .collect();
    json!({ "reactors": reactors, "disks": disks })
}

/// `packet_queues`: one object per queue; `steering`: one per interface with a steering
/// program (af_xdp, or dpdk on a kernel interface).
pub fn ports_json(p: &crate::ports::PortsSnapshot) -> (Value, Value) {
    let queues = p
        .queues
        .iter()
        .map(|(iface, q, backend, frames, bytes, errors)| {
            json!({"iface": iface, "queue": q, "backend": backend, "rx_frames": frames,
                   "rx_bytes": bytes, "errors": errors})
        })
        .collect();
    let steering = p
        .steering
        .iter()
        .map(|(iface, c)| {
            json!({"iface": iface, "steered": c.steered, "passed": c.passed,
                   "malformed": c.malformed, "unbound": c.unbound})
        })
        .collect();
    (Value::Array(queues), Value::Array(steering))
}

fn share_json(sh: &file_server::share::Share) -> Value {
    let s = sh.stats();
    let p = s.perm;
    json!({
        "dir": sh.spec.dir, "tag": sh.spec.tag, "socket": sh.spec.socket,
        "requests": s.requests, "malformed": s.malformed, "panics": s.panics,
        "denied": s.denied, "unmapped_ids": s.unmapped_ids, "handles": s.handles,
        "unknown_nodes": s.unknown_nodes,
        "perm_cache": {
            "hits": p.hits, "misses": p.misses, "invalidations": p.invalidations,
            "evictions": p.evictions, "expirations": p.expirations,
            "over_cap_drops": p.over_cap_drops, "entries": p.entries,
        },
    })
}
