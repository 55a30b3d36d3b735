//! The JSON-RPC 2.0 control socket (`--control PATH`, the `jsonrpc` crate): one request per
//! line, one response per line, on a Unix socket. This module owns stratad's method table.
//!
//! Methods: `stratad_stats` (reactor, disk and share counters, the iSCSI server's
//! (`iscsi`), and with `--port` the packet queues' counters (`packet_queues`) and the XDP
//! steering program's per interface (`steering`)); the datastore methods of `stratad-rpc`
//! (`datastore_info`, `datastore_ls`, `datastore_mkdir`, `datastore_disk_create`,
//! `datastore_disk_delete`, `datastore_disk_resize`: the same table stratactl runs
//! offline); the iSCSI target methods (`iscsi_get_targets`, `iscsi_target_create`,
//! `iscsi_target_delete`, `iscsi_target_lun_add`, `iscsi_target_lun_remove`: crate::iscsi);
//! `rpc_get_methods`.
//! `stratactl --control PATH ...` is the client.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use dataplane::server::{bind_socket, peer_credentials, SocketAccess, SocketFile, StatsHandle};
use jsonrpc::{Limits, Methods, NoParams, RpcError, Server};
use serde_json::{json, Value};
use stratad_rpc::STRATAD_STATS;
use vmfs::fs::Datastore;

/// Longest request line: requests are a path, a name and a size (a few hundred bytes).
const REQUEST_BYTES_MAX: usize = 64 << 10;
/// Time from a request's first byte to its newline: clients write a request at once, so a
/// silent or trickling one is dropped quickly.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Control clients served at once (each a thread): a handful of administrators' commands.
const CONNECTIONS_MAX: usize = 8;

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
    /// Disks exported by name and the iSCSI targets.
    pub exports: Arc<crate::iscsi::Exports>,
    /// The iSCSI server's counters (`--iscsi-portal`): logins, sessions, commands, and every
    /// rejected or dropped PDU and connection.
    pub iscsi: Option<san::transport::IscsiStatsHandle>,
}

impl Control {
    /// stratad's method table: `stratad_stats` and the datastore methods (`stratad-rpc`).
    pub fn methods(self) -> Methods {
        let mut m = Methods::new();
        let Control {
            stats,
            datastore,
            ports,
            shares,
            exports,
            iscsi,
        } = self;
        m.add(
            STRATAD_STATS,
            move |_: NoParams| -> Result<Value, RpcError> {
                let mut v = stats_json(&stats);
                let (queues, steering) = ports_json(&ports.snapshot());
                v["packet_queues"] = queues;
                v["steering"] = steering;
                v["shares"] = Value::Array(shares.iter().map(share_json).collect());
                v["iscsi"] = iscsi.as_ref().map_or(Value::Null, |h| json!(h.stats()));
                Ok(v)
            },
        );
        // Eager zeroing runs in the call; nobody watches its progress on the daemon's side.
        stratad_rpc::register(&mut m, datastore, Arc::new(|_, _| {}));
        exports.register(&mut m);
        m
    }
}

/// Binds `path` with `access`'s mode and group (replacing a stale socket, never another
/// file) and serves it on a new thread, each client on a thread of its own (at most
/// [`CONNECTIONS_MAX`]). Only root, the daemon's user, or a process of the socket group may
/// use it (SO_PEERCRED): it can remove disks. Returns the socket file, for removing it at
/// exit only if it is still ours.
pub fn spawn(path: &Path, control: Control, access: SocketAccess) -> std::io::Result<SocketFile> {
    let (listener, file) = bind_socket(path, &access).map_err(|e| match e {
        dataplane::server::ServerError::SocketInUse(_) => std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("control socket {} is in use", path.display()),
        ),
        e => std::io::Error::other(e.to_string()),
    })?;
    // The listener was made non-blocking for the vhost-user control loop; this thread blocks.
    listener.set_nonblocking(false)?;
    let limits = Limits {
        request_bytes_max: REQUEST_BYTES_MAX,
        request_timeout: REQUEST_TIMEOUT,
        connections_max: CONNECTIONS_MAX,
        ..Limits::default()
    };
    let server = Server::new(control.methods(), limits);
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            // The control socket lives as long as the process.
            let never = AtomicBool::new(false);
            server.serve(&listener, &never, |s| match peer_credentials(s) {
                Ok((uid, gid)) if access.peer_may_control(uid, gid) => true,
                Ok((uid, gid)) => {
                    tracing::warn!(uid, gid, "control client refused");
                    false
                }
                Err(e) => {
                    tracing::warn!(err = %e, "control client without credentials");
                    false
                }
            })
        })?;
    Ok(file)
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
        "quota": {
            "bytes_max": sh.spec.quota.bytes, "inodes_max": sh.spec.quota.inodes,
            "bytes_used": s.quota_bytes_used, "inodes_used": s.quota_inodes_used,
        },
        "perm_cache": {
            "hits": p.hits, "misses": p.misses, "invalidations": p.invalidations,
            "evictions": p.evictions, "expirations": p.expirations,
            "over_cap_drops": p.over_cap_drops, "entries": p.entries,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataplane::engine::EngineKind;
    use dataplane::server::{Server, ServerConfig};
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;

    fn control(server: &Server) -> Control {
        Control {
            stats: server.stats_handle(),
            datastore: None,
            ports: crate::ports::PortCounters::default(),
            shares: Vec::new(),
            exports: std::sync::Arc::new(crate::iscsi::Exports::new(Vec::new(), None)),
            iscsi: None,
        }
    }

    fn server() -> Server {
        Server::new(&ServerConfig {
            cpus: vec![None],
            engine: EngineKind::Sync,
        })
        .expect("server")
    }

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("stratad-ctl-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("tmp");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        d
    }

    /// The table: `stratad_stats` with every section, the datastore methods (answering that
    /// there is no datastore), `rpc_get_methods`.
    #[test]
    fn the_table_serves_stats_and_lists_its_methods() {
        let s = server();
        let m = control(&s).methods();
        let v = m.call(STRATAD_STATS, json!({})).expect("stats");
        for k in ["reactors", "disks", "packet_queues", "steering", "shares"] {
            assert!(v[k].is_array(), "{k}: {v}");
        }
        assert_eq!(v["reactors"].as_array().map(Vec::len), Some(1));
        assert!(v["iscsi"].is_null(), "no portal, no iSCSI counters: {v}");
        let e = m
            .call(stratad_rpc::DATASTORE_INFO, json!({}))
            .expect_err("no datastore");
        assert_eq!(e.to_string(), "stratad runs without a datastore");
        let names = m.call("rpc_get_methods", json!({})).expect("names");
        assert_eq!(
            names,
            json!([
                "datastore_disk_create",
                "datastore_disk_delete",
                "datastore_disk_resize",
                "datastore_info",
                "datastore_ls",
                "datastore_mkdir",
                "iscsi_get_targets",
                "iscsi_target_create",
                "iscsi_target_delete",
                "iscsi_target_lun_add",
                "iscsi_target_lun_remove",
                "rpc_get_methods",
                "stratad_stats"
            ])
        );
    }

    /// Issue 12 finding 9: the stale-socket cleanup removed whatever was at the path.
    #[test]
    fn never_deletes_a_file_at_the_control_path() {
        let d = tmp("file");
        let p = d.join("control.sock");
        std::fs::write(&p, b"precious").expect("write");
        let s = server();
        assert!(spawn(&p, control(&s), SocketAccess::default()).is_err());
        assert_eq!(std::fs::read(&p).expect("read"), b"precious");
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Issue 12 finding 9: a user other than root, the daemon's and the socket group is
    /// refused even when the socket's mode lets it connect; the daemon's user is served.
    #[test]
    fn control_socket_serves_only_allowed_peers() {
        if !dataplane::test_gate::require_root(
            "control_socket_serves_only_allowed_peers",
            "to connect as another user",
        ) {
            return;
        }
        let d = tmp("peer");
        let p = d.join("control.sock");
        let s = server();
        let access = SocketAccess {
            mode: 0o666,
            group: None,
        };
        spawn(&p, control(&s), access).expect("spawn");
        assert_eq!(
            std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777,
            0o666
        );
        // The daemon's own user gets an answer.
        let mut c = UnixStream::connect(&p).expect("connect");
        writeln!(c, r#"{{"jsonrpc":"2.0","id":1,"method":"stratad_stats"}}"#).expect("send");
        let mut line = String::new();
        BufReader::new(&c).read_line(&mut line).expect("read");
        assert!(line.contains("\"result\""), "{line}");
        drop(c);
        // Another user (nobody) connects, sends the same request, and gets nothing.
        // SAFETY: sockaddr_un is plain data.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr.sun_path.iter_mut().zip(p.as_os_str().as_bytes()) {
            *d = *s as libc::c_char;
        }
        let req = b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"stratad_stats\"}\n";
        // SAFETY: the child only makes async-signal-safe system calls on prepared data,
        // then _exits: 0 = got a reply, 1 = refused, 2 = setup failed.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(65534) != 0
                    || libc::setuid(65534) != 0
                {
                    libc::_exit(2);
                }
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
                if fd < 0 || libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) != 0
                {
                    libc::_exit(2);
                }
                libc::write(fd, req.as_ptr().cast(), req.len());
                let mut b = [0u8; 16];
                let n = libc::read(fd, b.as_mut_ptr().cast(), b.len());
                libc::_exit(if n > 0 { 0 } else { 1 });
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            assert!(libc::WIFEXITED(status));
            assert_eq!(
                libc::WEXITSTATUS(status),
                1,
                "nobody was served (0) or could not connect (2)"
            );
        }
        let _ = std::fs::remove_dir_all(&d);
    }
}
