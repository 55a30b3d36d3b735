//! The iSNS client (`fabric_nameserver::client`) against a real strata-nameserver: in
//! process (with ESI time scaled) and as a child process (killed and restarted, with and
//! without its data): registration as the server and `isnsadm` see it, ESI answered,
//! targets added and removed, deregistration on stop, re-registration after the server
//! lost its state or an administrator removed the entity, and discovery-domain visibility
//! following DD edits (through SCNs, and through the cache TTL where the server sends none).
// Test code: helpers outside #[test] functions panic on failure too.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fabric_nameserver::client::{EntityInfo, IsnsClient, Timing, SCN_BITMAP};
use fabric_nameserver::esi::EsiConfig;
use fabric_nameserver::server::{start, Config, ServerHandle};
use fabric_nameserver::wire::{func, tag, TlvWriter};
use serde_json::{json, Value};

const TA: &str = "iqn.2024-01.test.strata:disk-a";
const TB: &str = "iqn.2024-01.test.strata:disk-b";
const TC: &str = "iqn.2024-01.test.strata:disk-c";
const I1: &str = "iqn.2024-01.test.host:init1";
const I2: &str = "iqn.2024-01.test.host:init2";
const INITIATOR: u32 = 2;

/// The workspace's rule for missing prerequisites (dataplane/src/test_gate.rs): outside CI
/// a SKIP line, in CI a failure.
fn skip(test: &str, why: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    assert!(
        !ci,
        "{test}: prerequisite missing in CI: {why} (see tools/install-deps.sh)"
    );
    eprintln!("SKIP {test}: {why}");
}

fn has_tool(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn fast_esi() -> EsiConfig {
    EsiConfig {
        min_interval_secs: 1,
        retries: 3,
        timeout: Duration::from_millis(300),
        unit: Duration::from_millis(100),
    }
}

fn server(dir: &Path) -> ServerHandle {
    let mut cfg = Config::new("127.0.0.1:0".parse().unwrap(), dir.to_owned());
    cfg.esi = fast_esi();
    start(cfg).unwrap()
}

fn entity(eid: &str, targets: &[&str]) -> EntityInfo {
    EntityInfo {
        eid: eid.into(),
        portals: vec![
            ("127.0.0.1:3260".parse().unwrap(), 1),
            ("0.0.0.0:3261".parse().unwrap(), 2),
        ],
        targets: targets.iter().map(|s| s.to_string()).collect(),
        esi_port: None,
        scn_port: None,
    }
}

fn timing(check: Duration, ttl: Duration) -> Timing {
    Timing {
        esi_interval_secs: 1,
        check_interval: check,
        visibility_ttl: ttl,
        io_timeout: Duration::from_secs(2),
        registration_period_secs: None,
    }
}

fn result(v: Value) -> Value {
    assert!(v.get("error").is_none(), "RPC error: {v}");
    v["result"].clone()
}

/// Nodes as the control socket lists them: (name, eid, scn bitmap).
fn nodes(control: &Path) -> Vec<(String, String, Option<u64>)> {
    let mut v: Vec<_> = result(rpc(control, "ns_node_list", json!({})))
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap().to_owned(),
                n["eid"].as_str().unwrap().to_owned(),
                n["scn_bitmap"].as_u64(),
            )
        })
        .collect();
    v.sort();
    v
}

fn node_names(control: &Path) -> Vec<String> {
    nodes(control).into_iter().map(|n| n.0).collect()
}

fn entities(control: &Path) -> Vec<String> {
    result(rpc(control, "ns_entity_list", json!({})))
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["eid"].as_str().unwrap().to_owned())
        .collect()
}

/// Portal group tags the server holds for `target` (asked as the target itself).
fn pg_tags(addr: SocketAddr, target: &str) -> Vec<(u32, u32)> {
    let mut c = Client::connect(addr);
    let mut w = TlvWriter::new();
    w.string(tag::ISCSI_NAME, target);
    w.string(tag::ISCSI_NAME, target);
    w.delimiter();
    w.nil(tag::PG_PORTAL_PORT);
    w.nil(tag::PG_TAG);
    let r = c.call(func::DEV_ATTR_QRY, 0, &w);
    assert_eq!(r.status, 0);
    let mut out = Vec::new();
    let mut port = None;
    for t in &r.tlvs {
        match t.tag {
            tag::PG_PORTAL_PORT => port = Some(t.as_u32().unwrap()),
            tag::PG_TAG => out.push((port.take().unwrap(), t.as_u32().unwrap())),
            _ => {}
        }
    }
    out.sort();
    out
}

#[test]
fn registers_answers_esi_adds_removes_and_deregisters_on_stop() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path());
    let ctl = srv.control_path.clone();
    let c = IsnsClient::start_with(
        srv.local_addr,
        entity("strata.test.host1", &[TA, TB]),
        timing(Duration::from_millis(200), Duration::from_secs(2)),
    )
    .unwrap();
    // start registers before returning when the server is up.
    let st = c.stats();
    assert!(st.registered, "{st:?}");
    assert_eq!(st.registrations, 1);
    assert_eq!(c.eid(), "strata.test.host1");

    let n = nodes(&ctl);
    assert_eq!(
        n,
        vec![
            (
                TA.into(),
                "strata.test.host1".into(),
                Some(u64::from(SCN_BITMAP))
            ),
            (
                TB.into(),
                "strata.test.host1".into(),
                Some(u64::from(SCN_BITMAP))
            ),
        ]
    );
    let node_list = result(rpc(&ctl, "ns_node_list", json!({})));
    assert!(node_list
        .as_array()
        .unwrap()
        .iter()
        .all(|n| n["type"] == json!(["target"])));
    let portals = result(rpc(&ctl, "ns_portal_list", json!({})));
    let (esi_port, scn_port) = c.ports();
    let mut seen: Vec<(String, u64)> = portals
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            assert_eq!(p["esi_port"], json!(esi_port));
            assert_eq!(p["scn_port"], json!(scn_port));
            (
                p["ip"].as_str().unwrap().to_owned(),
                p["port"].as_u64().unwrap(),
            )
        })
        .collect();
    seen.sort();
    // The wildcard portal is registered as the address the client reaches the server from.
    assert_eq!(
        seen,
        vec![("127.0.0.1".into(), 3260), ("127.0.0.1".into(), 3261)]
    );
    assert_eq!(pg_tags(srv.local_addr, TA), vec![(3260, 1), (3261, 2)]);

    // ESI: probed every 100 ms here; three missed probes would drop the entity, so being
    // still registered after a second and a half means the answers were accepted.
    wait_until("ESI answers", Duration::from_secs(5), || {
        c.stats().esi_answered >= 5
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(entities(&ctl), vec!["strata.test.host1".to_owned()]);
    let stats = result(rpc(&ctl, "ns_stats", json!({})));
    assert!(stats["esi_sent"].as_u64().unwrap() >= 5, "{stats}");
    assert_eq!(stats["esi_removed_portals"], json!(0), "{stats}");

    // Targets come and go while running.
    c.add_target(TC).unwrap();
    assert_eq!(node_names(&ctl), vec![TA, TB, TC]);
    assert_eq!(pg_tags(srv.local_addr, TC), vec![(3260, 1), (3261, 2)]);
    c.remove_target(TB).unwrap();
    assert_eq!(node_names(&ctl), vec![TA, TC]);
    // Checks keep passing: no re-registration was needed.
    let before = c.stats().checks;
    wait_until("checks", Duration::from_secs(5), || {
        c.stats().checks >= before + 3
    });
    assert_eq!(c.stats().registrations, 1);

    c.stop().unwrap();
    assert!(entities(&ctl).is_empty());
    assert!(node_names(&ctl).is_empty());
    srv.shutdown();
}

#[test]
fn last_target_removed_deregisters_and_first_added_registers() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path());
    let ctl = srv.control_path.clone();
    // No EID given: the server assigns one, kept from then on.
    let mut info = entity("", &[]);
    info.portals.truncate(1);
    let c = IsnsClient::start_with(
        srv.local_addr,
        info,
        timing(Duration::from_millis(200), Duration::from_secs(2)),
    )
    .unwrap();
    assert!(!c.stats().registered);
    assert!(entities(&ctl).is_empty());
    c.add_target(TA).unwrap();
    let eid = c.eid();
    assert!(!eid.is_empty());
    assert_eq!(entities(&ctl), vec![eid.clone()]);
    c.remove_target(TA).unwrap();
    assert!(entities(&ctl).is_empty());
    c.add_target(TB).unwrap();
    assert_eq!(entities(&ctl), vec![eid.clone()]);
    assert_eq!(node_names(&ctl), vec![TB]);
    drop(c); // dropping stops and deregisters too
    assert!(entities(&ctl).is_empty());
    srv.shutdown();
}

/// A strata-nameserver child on a fixed port, so that a restart keeps the address.
struct NsProc {
    child: Child,
    addr: SocketAddr,
    data: std::path::PathBuf,
}

impl NsProc {
    fn spawn(port: u16, data: &Path) -> NsProc {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_strata-nameserver"))
            .args(["--listen", &addr.to_string(), "--data"])
            .arg(data)
            .args(["--control-node", ADMIN])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let control = data.join("control.sock");
        wait_until("the server", Duration::from_secs(20), || {
            std::net::TcpStream::connect(addr).is_ok()
                && std::os::unix::net::UnixStream::connect(&control).is_ok()
        });
        NsProc {
            child,
            addr,
            data: data.to_owned(),
        }
    }

    fn control(&self) -> std::path::PathBuf {
        self.data.join("control.sock")
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for NsProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn reregisters_after_restart_state_loss_and_removal() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let ns = NsProc::spawn(port, &dir.path().join("a"));
    let c = IsnsClient::start_with(
        ns.addr,
        entity("strata.test.host2", &[TA, TB]),
        timing(Duration::from_millis(200), Duration::from_secs(2)),
    )
    .unwrap();
    assert_eq!(node_names(&ns.control()), vec![TA, TB]);
    assert_eq!(c.stats().registrations, 1);

    // Restart on the same data: the registration is durable, nothing to redo.
    ns.kill();
    let ns = NsProc::spawn(port, &dir.path().join("a"));
    assert_eq!(node_names(&ns.control()), vec![TA, TB]);
    let checks = c.stats().checks;
    wait_until("checks after restart", Duration::from_secs(10), || {
        c.stats().checks >= checks + 2
    });
    assert_eq!(c.stats().registrations, 1);

    // Restart without its data (a new server, or a lost disk): the client registers again.
    ns.kill();
    let ns = NsProc::spawn(port, &dir.path().join("b"));
    wait_until("re-registration", Duration::from_secs(10), || {
        node_names(&ns.control()) == vec![TA, TB]
    });
    assert!(c.stats().registrations >= 2);
    assert_eq!(
        entities(&ns.control()),
        vec!["strata.test.host2".to_owned()]
    );
    // SCN registrations came back with it.
    assert!(nodes(&ns.control())
        .iter()
        .all(|n| n.2 == Some(u64::from(SCN_BITMAP))));

    // An administrator removes the entity: it is back within a check interval.
    let regs = c.stats().registrations;
    result(rpc(
        &ns.control(),
        "ns_entity_delete",
        json!({"eid": "strata.test.host2"}),
    ));
    wait_until(
        "re-registration after removal",
        Duration::from_secs(10),
        || c.stats().registrations > regs && node_names(&ns.control()) == vec![TA, TB],
    );

    // While the server is down, adding a target fails but is kept and registered later.
    ns.kill();
    assert!(c.add_target(TC).is_err());
    let ns = NsProc::spawn(port, &dir.path().join("b"));
    wait_until(
        "the target added while down",
        Duration::from_secs(10),
        || node_names(&ns.control()) == vec![TA, TB, TC],
    );
    c.stop().unwrap();
    assert!(entities(&ns.control()).is_empty());
}

#[test]
fn isnsadm_lists_the_registered_targets() {
    if !has_tool("isnsadm") {
        skip(
            "isnsadm_lists_the_registered_targets",
            "isnsadm (open-isns-utils) not installed",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ns = NsProc::spawn(free_port(), &dir.path().join("data"));
    let c = IsnsClient::start_with(
        ns.addr,
        entity("strata.test.host3", &[TA, TB]),
        timing(Duration::from_secs(5), Duration::from_secs(2)),
    )
    .unwrap();
    let conf = dir.path().join("client.conf");
    std::fs::write(
        &conf,
        format!(
            "ServerAddress = {}\nSourceName = {ADMIN}\nSecurity = 0\n",
            ns.addr
        ),
    )
    .unwrap();
    let list = |what: &str| {
        let o = Command::new("isnsadm")
            .arg("-c")
            .arg(&conf)
            .args(["--list", what])
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let out = list("nodes");
    assert!(out.contains(TA) && out.contains(TB), "{out}");
    assert!(out.contains("Target"), "{out}");
    let out = list("portals");
    assert!(
        out.contains("127.0.0.1") && out.contains("3260/tcp"),
        "{out}"
    );
    let out = list("entities");
    assert!(out.contains("strata.test.host3"), "{out}");
    c.stop().unwrap();
    let out = list("nodes");
    assert!(!out.contains(TA), "{out}");
}

/// Registers an initiator node of its own entity (as a host's iSCSI initiator would).
fn register_initiator(addr: SocketAddr, name: &str, eid: &str, port: u32) {
    let mut c = Client::connect(addr);
    let r = c.call(
        func::DEV_ATTR_REG,
        0,
        &registration(name, eid, port, None, &[(name, INITIATOR)]),
    );
    assert_eq!(r.status, 0);
}

#[test]
fn dd_edits_reach_visibility_through_scn() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path());
    let ctl = srv.control_path.clone();
    register_initiator(srv.local_addr, I1, "host-i1", 50001);
    // A long TTL: only SCNs (or re-registration) can explain an answer changing.
    let c = IsnsClient::start_with(
        srv.local_addr,
        entity("strata.test.host4", &[TA, TB]),
        timing(Duration::from_secs(60), Duration::from_secs(600)),
    )
    .unwrap();
    let acc = c.access();
    // No DDs, default DD on: everyone sees everyone; an initiator iSNS never heard of too.
    assert!(acc.visible(I1, TA) && acc.visible(I1, TB));
    assert!(acc.visible(I2, TA));
    // A target that is not ours is never visible through our entity.
    assert!(!acc.visible(I1, "iqn.2024-01.test.strata:other"));
    let q0 = c.stats().queries;
    assert!(acc.visible(I1, TA));
    assert_eq!(c.stats().queries, q0, "answered from the cache");

    // DD1 = {TA, I1}: TB (outside any DD, default domain) loses I1: an SCN to TB.
    let scns = c.stats().scn_received;
    let dd1 = result(rpc(
        &ctl,
        "ns_dd_create",
        json!({"name": "dd1", "members": [TA, I1]}),
    ));
    let dd1 = dd1["id"].as_u64().unwrap();
    wait_until("SCN for dd1", Duration::from_secs(5), || {
        c.stats().scn_received > scns
    });
    assert!(acc.visible(I1, TA));
    assert!(!acc.visible(I1, TB));

    // DD2 = {TB} then I1 joins it: I1 sees TB again, told by an SCN.
    let dd2 = result(rpc(
        &ctl,
        "ns_dd_create",
        json!({"name": "dd2", "members": [TB]}),
    ));
    let dd2 = dd2["id"].as_u64().unwrap();
    let scns = c.stats().scn_received;
    result(rpc(&ctl, "ns_dd_add", json!({"id": dd2, "members": [I1]})));
    wait_until("SCN for dd2", Duration::from_secs(5), || {
        c.stats().scn_received > scns
    });
    assert!(acc.visible(I1, TB));
    assert!(acc.visible(I1, TA));

    // I1 leaves DD1: TA is no longer visible to it.
    let scns = c.stats().scn_received;
    result(rpc(
        &ctl,
        "ns_dd_remove",
        json!({"id": dd1, "members": [I1]}),
    ));
    wait_until("SCN for dd1 removal", Duration::from_secs(5), || {
        c.stats().scn_received > scns
    });
    assert!(!acc.visible(I1, TA));
    assert!(acc.visible(I1, TB));
    // An initiator in no DD does not see targets that are in one.
    assert!(!acc.visible(I2, TA) && !acc.visible(I2, TB));
    c.stop().unwrap();
    // After stop: nothing is visible.
    assert!(!acc.visible(I1, TB));
    srv.shutdown();
}

#[test]
fn unknown_initiators_follow_the_default_dd_policy_within_the_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path());
    let ctl = srv.control_path.clone();
    let ttl = Duration::from_millis(300);
    let c = IsnsClient::start_with(
        srv.local_addr,
        entity("strata.test.host5", &[TA, TB]),
        timing(Duration::from_secs(60), ttl),
    )
    .unwrap();
    // I2 is registered nowhere. Default DD on, no DDs: visible.
    assert!(c.visible(I2, TA));
    // Policy off: the server no longer answers an unknown source (no SCN for this change;
    // the TTL bounds how long the old answer lasts).
    result(rpc(&ctl, "ns_policy_set", json!({"default_dd": false})));
    std::thread::sleep(ttl + Duration::from_millis(100));
    assert!(!c.visible(I2, TA));
    // A DD naming I2 before it ever registers: it sees TA, not TB.
    result(rpc(
        &ctl,
        "ns_dd_create",
        json!({"name": "pre", "members": [TA, I2]}),
    ));
    std::thread::sleep(ttl + Duration::from_millis(100));
    assert!(c.visible(I2, TA));
    assert!(!c.visible(I2, TB));
    c.stop().unwrap();
    srv.shutdown();
}

#[test]
fn server_away_uses_recent_answers_and_refuses_unknown_ones_without_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let ns = NsProc::spawn(free_port(), &dir.path().join("data"));
    let ttl = Duration::from_millis(100);
    let c = IsnsClient::start_with(
        ns.addr,
        entity("strata.test.host6", &[TA]),
        timing(Duration::from_secs(60), ttl),
    )
    .unwrap();
    assert!(c.visible(I1, TA));
    ns.kill();
    std::thread::sleep(ttl * 2);
    // The answer from a moment ago stands; an initiator never asked about is refused.
    assert!(c.visible(I1, TA));
    let errors = c.stats().query_errors;
    assert!(errors >= 1);
    let t0 = Instant::now();
    assert!(!c.visible(I2, TA));
    assert!(!c.visible(I2, TA));
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "no query while the server was just found away"
    );
    assert_eq!(c.stats().query_errors, errors + 2);
    drop(c);
}

#[test]
fn registers_and_answers_esi_over_ipv6() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        skip("registers_and_answers_esi_over_ipv6", "no IPv6 loopback");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::new("[::1]:0".parse().unwrap(), dir.path().to_owned());
    cfg.esi = fast_esi();
    let srv = start(cfg).unwrap();
    let mut info = entity("strata.test.host7", &[TA]);
    info.portals = vec![("[::]:3260".parse().unwrap(), 7)];
    let c = IsnsClient::start_with(
        srv.local_addr,
        info,
        timing(Duration::from_millis(200), Duration::from_secs(2)),
    )
    .unwrap();
    assert!(c.stats().registered);
    let portals = result(rpc(&srv.control_path, "ns_portal_list", json!({})));
    assert_eq!(portals[0]["ip"], json!("::1"), "{portals}");
    wait_until("ESI answers over IPv6", Duration::from_secs(5), || {
        c.stats().esi_answered >= 3
    });
    assert!(c.visible(I1, TA));
    c.stop().unwrap();
    assert!(entities(&srv.control_path).is_empty());
    srv.shutdown();
}
