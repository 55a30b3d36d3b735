//! The datastore commands offline (`--datastore`, stratactl runs stratad's method table
//! itself) and online (`--control`, against that same table served on a socket as stratad
//! serves it): the same answers either way, under the `datastore_*` method names.
// Test code: helpers outside #[test] functions panic on failure too.
#![allow(clippy::unwrap_used)]

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use jsonrpc::{Limits, Methods, Server};
use serde_json::Value;
use vmfs::device::FileDevice;
use vmfs::fs::Datastore;

fn stratactl(target: &[&str], args: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_stratactl"))
        .args(target)
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
    )
}

fn json(target: &[&str], args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let (ok, out) = stratactl(target, &a);
    assert!(ok, "{args:?}: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// Creates, lists, resizes and removes disks through `target`; returns the final listing.
fn exercise(target: &[&str], prefix: &str) -> Value {
    let (ok, out) = stratactl(target, &["mkdir", prefix]);
    assert!(ok, "{out}");
    let d = format!("{prefix}/a.img");
    let (ok, out) = stratactl(target, &["disk", "create", &d, "--size", "2M", "--thick"]);
    assert!(ok, "{out}");
    let (ok, out) = stratactl(target, &["disk", "create", &d, "--size", "2M"]);
    assert!(!ok, "a second create fails: {out}");
    let e = format!("{prefix}/b.img");
    let (ok, out) = stratactl(target, &["disk", "create", &e, "--size", "1M"]);
    assert!(ok, "{out}");
    let (ok, out) = stratactl(target, &["disk", "resize", &e, "--size", "3M"]);
    assert!(ok, "{out}");
    let (ok, out) = stratactl(target, &["disk", "rm", &d]);
    assert!(ok, "{out}");
    let info = json(target, &["info"]);
    assert!(info["free_bytes"].as_u64().unwrap() > 0, "{info}");
    let mut ls = json(target, &["ls", prefix]);
    // Inode numbers differ between the two runs; everything else must not.
    for e in ls.as_array_mut().unwrap() {
        e.as_object_mut().unwrap().remove("ino");
    }
    ls
}

#[test]
fn offline_and_online_run_the_same_methods() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ds.img");
    let p = path.to_str().unwrap();
    let (ok, out) = stratactl(&[], &["mkfs", p, "--size", "64M"]);
    assert!(ok, "{out}");

    let offline = exercise(&["--datastore", p], "/off");

    // Online: the same table, served as stratad serves it.
    let ds = Arc::new(Datastore::mount(Arc::new(FileDevice::open(&path, false).unwrap())).unwrap());
    let mut m = Methods::new();
    stratad_rpc::register(&mut m, Some(ds.clone()), Arc::new(|_, _| {}));
    let sock = dir.path().join("control.sock");
    let l = UnixListener::bind(&sock).unwrap();
    let server = Server::new(m, Limits::default());
    std::thread::spawn(move || server.serve(&l, &AtomicBool::new(false), |_| true));
    let s = sock.to_str().unwrap();
    let online = exercise(&["--control", s], "/on");
    assert_eq!(offline, online);
    let names: Vec<&str> = online
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["b.img"]);
    assert_eq!(online[0]["size"], 3 << 20);
    // A refusal of the datastore is the command's error, not a protocol one.
    let (ok, out) = stratactl(&["--control", s], &["disk", "rm", "/on/none.img"]);
    assert!(!ok && !out.contains("bad answer"), "{out}");
    assert!(Path::new(&sock).exists());
}
