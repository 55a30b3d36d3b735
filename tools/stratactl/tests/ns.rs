//! `stratactl ns` against a real name server (in-process, on a temporary directory).
// Test code: helpers outside #[test] functions panic on failure too.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use fabric_nameserver::server::{start, Config};

fn stratactl(sock: &std::path::Path, args: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_stratactl"))
        .arg("ns")
        .arg("--socket")
        .arg(sock)
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
    )
}

#[test]
fn ns_subcommands_manage_zoning_and_report() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(Config::new(
        "127.0.0.1:0".parse().unwrap(),
        dir.path().to_owned(),
    ))
    .unwrap();
    let sock = srv.control_path.clone();

    let (ok, out) = stratactl(
        &sock,
        &["dd", "create", "zone-a", "-m", "iqn.t:a", "-m", "iqn.i:b"],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("zone-a") && out.contains("iqn.i:b,iqn.t:a"),
        "{out}"
    );
    let (ok, out) = stratactl(&sock, &["dd", "add", "1", "iqn.i:c"]);
    assert!(ok && out.contains("iqn.i:c"), "{out}");
    let (ok, out) = stratactl(&sock, &["dd", "remove", "1", "iqn.i:b"]);
    assert!(ok && !out.contains("iqn.i:b"), "{out}");
    let (ok, out) = stratactl(&sock, &["--json", "list", "dds"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["members"], serde_json::json!(["iqn.i:c", "iqn.t:a"]));
    assert_eq!(v[0]["active"], true);

    let (ok, out) = stratactl(&sock, &["dds", "create", "set1", "--dd", "1", "--disabled"]);
    assert!(ok && out.contains("false"), "{out}");
    let (_, out) = stratactl(&sock, &["--json", "list", "dds"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v[0]["active"], false,
        "a DD only in a disabled set is inactive"
    );
    let (ok, out) = stratactl(&sock, &["dds", "enable", "1"]);
    assert!(ok && out.contains("true"), "{out}");

    let (ok, out) = stratactl(&sock, &["policy", "--default-dd", "off"]);
    assert!(ok && out.contains("default_dd: false"), "{out}");
    let (ok, out) = stratactl(&sock, &["stats"]);
    assert!(
        ok && out.contains("dds: 1") && out.contains("wal_records:"),
        "{out}"
    );
    let (ok, out) = stratactl(&sock, &["list", "nodes"]);
    assert!(ok && out.starts_with("NAME"), "{out}");

    // Errors are reported and exit non-zero.
    let (ok, out) = stratactl(&sock, &["remove-entity", "nope"]);
    assert!(!ok && out.contains("no such entry"), "{out}");
    let (ok, out) = stratactl(&sock, &["dd", "delete", "1"]);
    assert!(ok, "{out}");
    let (ok, out) = stratactl(&dir.path().join("missing.sock"), &["stats"]);
    assert!(!ok && out.contains("missing.sock"), "{out}");
    srv.shutdown();
}
