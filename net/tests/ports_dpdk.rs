//! `backend=dpdk` ports on DPDK virtual devices (`net_null`), started through [`net::ports`]
//! on real reactors (cargo feature `dpdk`; needs root): a poll-only queue keeps its reactor
//! polling, and a port already served is refused while the first keeps serving.

#![cfg(feature = "dpdk")]

use std::time::{Duration, Instant};

use dataplane::engine::EngineKind;
use dataplane::server::{Server, ServerConfig};
use net::port::PortSpec;
use net::ports::{start, Ports};
use net::Backend;

/// How long counters may take to move on a loaded machine.
const DEADLINE: Duration = Duration::from_secs(10);

/// The tests share the process's one EAL; run one at a time. Its runtime directory is removed
/// when the test binary exits.
static DPDK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// None (with a SKIP message; a failure in CI) when not root.
fn dpdk_serial() -> Option<std::sync::MutexGuard<'static, ()>> {
    if !dataplane::test_gate::require_root("dpdk", "DPDK") {
        return None;
    }
    net::dpdk::remove_runtime_dir_at_exit(&net::ports::dpdk::own_prefix());
    Some(
        DPDK.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    )
}

fn server() -> Server {
    Server::new(&ServerConfig {
        cpus: vec![None],
        engine: EngineKind::Sync,
    })
    .expect("reactors")
}

#[test]
fn dpdk_virtual_device_port_keeps_its_reactor_polling() {
    let Some(_one) = dpdk_serial() else {
        return;
    };
    let server = server();
    let spec = PortSpec::new("net_null_sd0", Backend::Dpdk, 2);
    let ports = start(&[spec], &server.reactor_links(), None).expect("start net_null");
    assert!(ports.counters.steering.is_empty(), "no steering on a vdev");
    let frames = |ports: &Ports| -> Vec<u64> {
        ports
            .counters
            .snapshot()
            .queues
            .iter()
            .map(|q| q.3)
            .collect()
    };
    let deadline = Instant::now() + DEADLINE;
    while frames(&ports).contains(&0) {
        assert!(Instant::now() < deadline, "net_null frames not polled");
        std::thread::sleep(Duration::from_millis(10));
    }
    // A poll-only queue: the reactor no longer sleeps.
    let sleeps = || server.stats().reactors[0].1.sleeps;
    let before = sleeps();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(sleeps(), before, "reactor slept with a DPDK queue");
    let snap = ports.counters.snapshot();
    assert_eq!(snap.queues.len(), 2);
    assert!(snap.queues.iter().all(|q| q.2 == "dpdk" && q.5 == 0));
    drop(server);
    drop(ports);
}

#[test]
fn dpdk_port_given_twice_is_refused_and_keeps_serving() {
    let Some(_one) = dpdk_serial() else {
        return;
    };
    let server = server();
    let spec = PortSpec::new("net_null_sd1", Backend::Dpdk, 1);
    let ports = start(std::slice::from_ref(&spec), &server.reactor_links(), None).expect("first");
    let err = start(&[spec], &server.reactor_links(), None).expect_err("same port again");
    assert!(err.to_string().contains("already in use"), "{err}");
    // The first one still runs.
    let frames = || ports.counters.snapshot().queues[0].3;
    let before = frames();
    let deadline = Instant::now() + DEADLINE;
    while frames() == before {
        assert!(Instant::now() < deadline, "the first port stopped");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(server);
    drop(ports);
}
