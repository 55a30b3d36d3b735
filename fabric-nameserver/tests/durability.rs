//! kill -9 during a registration storm: every acknowledged registration is there after a
//! restart. Also reports the durable registration rate (group commit) it observed.
// Test code: helpers outside #[test] functions panic on failure too.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use fabric_nameserver::wire::{func, tag, TlvWriter};

const CONNECTIONS: usize = 8;
const STORM: Duration = Duration::from_millis(1500);

#[test]
fn kill_9_during_registration_storm_loses_no_acknowledged_registration() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut srv = Proc::spawn(&data);
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let workers: Vec<_> = (0..CONNECTIONS)
        .map(|w| {
            let (acked, stop, addr) = (acked.clone(), stop.clone(), srv.addr);
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                for i in 0u64.. {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let name = format!("iqn.2024-01.storm:w{w}-{i}");
                    // One entity with one target node per registration (no portal, so
                    // that workers never contend for one).
                    let mut reg = TlvWriter::new();
                    reg.string(tag::ISCSI_NAME, &name);
                    reg.string(tag::EID, &format!("e-{w}-{i}"));
                    reg.delimiter();
                    reg.string(tag::EID, &format!("e-{w}-{i}"));
                    reg.u32(tag::ENTITY_PROTOCOL, 2);
                    reg.string(tag::ISCSI_NAME, &name);
                    reg.u32(tag::ISCSI_NODE_TYPE, 1);
                    c.send(func::DEV_ATTR_REG, 0, &reg);
                    // The server dies mid-storm: a missing reply just ends this worker.
                    let Some(r) = c.try_read_reply() else {
                        return;
                    };
                    assert_eq!(r.status, 0);
                    acked.lock().unwrap().push(name);
                }
            })
        })
        .collect();
    std::thread::sleep(STORM);
    srv.child.kill().unwrap(); // SIGKILL
    srv.child.wait().unwrap();
    let elapsed = t0.elapsed();
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        let _ = w.join();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 100,
        "only {} registrations acknowledged",
        acked.len()
    );
    eprintln!(
        "storm: {} durable registrations acknowledged in {elapsed:?} over {CONNECTIONS} connections \
         ({:.0}/s)",
        acked.len(),
        acked.len() as f64 / elapsed.as_secs_f64()
    );
    drop(srv);

    let srv = Proc::spawn(&data);
    let nodes = rpc(&srv.control(), "ns_node_list", serde_json::json!({}));
    let present: HashSet<String> = nodes["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_owned())
        .collect();
    let missing: Vec<&String> = acked.iter().filter(|n| !present.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged registrations lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    // The server still takes registrations after recovery.
    let mut c = Client::connect(srv.addr);
    let reg = registration(
        "iqn.2024-01.after:x",
        "after",
        9,
        None,
        &[("iqn.2024-01.after:x", 1)],
    );
    assert_eq!(c.call(func::DEV_ATTR_REG, 0, &reg).status, 0);
}
