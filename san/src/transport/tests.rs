//! End-to-end tests: a real TCP connection through [`IscsiServer`] to sessions on real
//! reactors (io_uring and the synchronous engine), driven by the test initiator.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dataplane::backend::RawBackend;
use dataplane::engine::EngineKind;
use dataplane::reactor::ReactorHandle;

use super::test_initiator::{Initiator, INITIATOR};
use super::IscsiServer;
use crate::scsi::{LogicalUnit, LuConfig};
use crate::target::Registry;

const TARGET: &str = "iqn.2026-01.test:target";
const DISK_BYTES: u64 = 16 << 20;

struct Rig {
    server: Option<IscsiServer>,
    reactors: Vec<ReactorHandle>,
    addr: SocketAddr,
    _disk: tempfile::NamedTempFile,
}

impl Rig {
    fn new(engine: EngineKind, reactors: usize) -> Rig {
        let disk = tempfile::NamedTempFile::new().expect("tempfile");
        disk.as_file().set_len(DISK_BYTES).expect("size");
        let backend = RawBackend::open(disk.path(), false, false).expect("backend");
        let unit = LogicalUnit::new(
            Arc::new(backend),
            LuConfig {
                name: "disk0".into(),
                state_path: None,
            },
        )
        .expect("unit");
        let registry = Arc::new(Registry::new());
        registry
            .add_target(TARGET, vec![(0, Arc::new(unit))], None, vec![])
            .expect("target");
        let handles: Vec<ReactorHandle> = (0..reactors)
            .map(|i| ReactorHandle::spawn(i, None, engine).expect("reactor"))
            .collect();
        let server = IscsiServer::start(
            registry,
            &["127.0.0.1:0".parse().expect("addr")],
            handles.iter().map(|h| h.link()).collect(),
        )
        .expect("server");
        let addr = server.local_addrs()[0];
        Rig {
            server: Some(server),
            reactors: handles,
            addr,
            _disk: disk,
        }
    }

    fn server(&self) -> &IscsiServer {
        self.server.as_ref().expect("server")
    }

    fn login(&self) -> Initiator {
        let mut i = Initiator::connect(self.addr);
        let (status, _) = i.login(Some(TARGET), &[("ImmediateData", "Yes")]);
        assert_eq!(status, 0, "login");
        i
    }

    /// Waits until `f` holds on the server's counters.
    fn wait_for(&self, what: &str, f: impl Fn(&super::IscsiStats) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f(&self.server().stats()) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
        for r in &mut self.reactors {
            r.shutdown();
        }
    }
}

fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x28;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn write10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = read10(lba, blocks);
    c[0] = 0x2A;
    c
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn nop_text_logout(engine: EngineKind) {
    let rig = Rig::new(engine, 1);
    let mut i = rig.login();
    rig.wait_for("session on a reactor", |s| s.sessions == 1);
    let p = i.nop(b"ping-data");
    assert_eq!(p.data, b"ping-data");
    let big = pattern(5000, 3);
    assert_eq!(i.nop(&big).data, big, "echo beyond the inline size");
    let text = i.send_targets();
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains(&format!("TargetName={TARGET}")), "{text}");
    assert!(
        text.contains(&format!("TargetAddress={},1", rig.addr)),
        "{text}"
    );
    assert_eq!(i.logout(), 0);
    assert!(i.try_recv().is_err(), "connection closed after logout");
    rig.wait_for("session gone", |s| s.sessions == 0);
}

#[test]
fn login_nop_text_logout_uring() {
    nop_text_logout(EngineKind::Uring);
}

#[test]
fn login_nop_text_logout_sync() {
    nop_text_logout(EngineKind::Sync);
}

#[test]
fn discovery_session_lists_the_target() {
    let rig = Rig::new(EngineKind::Uring, 1);
    let mut i = Initiator::connect(rig.addr);
    let (status, _) = i.login(None, &[]);
    assert_eq!(status, 0);
    let text = String::from_utf8_lossy(&i.send_targets()).to_string();
    assert!(text.contains(&format!("TargetName={TARGET}")), "{text}");
    assert_eq!(i.logout(), 0);
    let s = rig.server().stats();
    assert_eq!(s.discovery_sessions, 1);
    assert_eq!(s.sessions, 0);
}

#[test]
fn login_to_an_unknown_target_fails() {
    let rig = Rig::new(EngineKind::Uring, 1);
    let mut i = Initiator::connect(rig.addr);
    let (status, _) = i.login(Some("iqn.2026-01.test:nope"), &[]);
    assert_eq!(status >> 8, 2, "initiator error class");
    assert!(i.try_recv().is_err(), "closed after a failed login");
    rig.wait_for("failed login counted", |s| s.logins_failed == 1);
}

#[test]
fn garbage_during_login_drops_the_connection_only() {
    let rig = Rig::new(EngineKind::Uring, 1);
    let mut good = rig.login();
    let mut bad = Initiator::connect(rig.addr);
    // A BHS whose data segment is far beyond the login limit.
    let mut b = [0u8; 48];
    b[0] = 0x43;
    b[5] = 0x7f;
    std::io::Write::write_all(&mut bad.sock, &b).expect("write");
    let got = bad.try_recv();
    assert!(got.is_err(), "dropped: {got:?}");
    rig.wait_for("protocol error counted", |s| s.login_protocol_errors == 1);
    assert_eq!(good.nop(b"still here").data, b"still here");
}

#[test]
fn idle_half_open_connections_do_not_block_logins() {
    let rig = Rig::new(EngineKind::Uring, 1);
    let idle: Vec<_> = (0..200)
        .map(|_| std::net::TcpStream::connect(rig.addr).expect("connect"))
        .collect();
    // Trickled bytes: half a BHS.
    let mut trickle = Initiator::connect(rig.addr);
    std::io::Write::write_all(&mut trickle.sock, &[0x43; 20]).expect("write");
    let mut i = rig.login();
    assert_eq!(i.nop(b"x").data, b"x");
    rig.wait_for("half-open counted", |s| s.half_open >= 200);
    drop(idle);
}

#[test]
fn reinstatement_replaces_the_old_session() {
    let rig = Rig::new(EngineKind::Uring, 1);
    let mut first = rig.login();
    rig.wait_for("first session", |s| s.sessions == 1);
    let mut second = rig.login();
    assert!(first.try_recv().is_err(), "old connection closed");
    rig.wait_for("reinstated", |s| {
        s.sessions_reinstated == 1 && s.sessions == 1
    });
    assert_eq!(second.nop(b"new").data, b"new");
}

#[test]
fn shutdown_ends_live_sessions() {
    let mut rig = Rig::new(EngineKind::Uring, 2);
    let mut a = rig.login();
    let mut b = rig.login_with_isid_variant();
    rig.wait_for("two sessions", |s| s.sessions == 2);
    let t0 = Instant::now();
    rig.server.take().expect("server").shutdown();
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(a.try_recv().is_err());
    assert!(b.try_recv().is_err());
}

impl Rig {
    /// A second session from the same initiator (another ISID).
    fn login_with_isid_variant(&self) -> Initiator {
        let mut i = Initiator::connect(self.addr);
        i.isid_variant = 1;
        let (status, _) = i.login(Some(TARGET), &[]);
        assert_eq!(status, 0, "login");
        i
    }
}

fn read_write(engine: EngineKind, extra: &[(&str, &str)]) {
    let rig = Rig::new(engine, 1);
    let mut i = Initiator::connect(rig.addr);
    let (status, _) = i.login(Some(TARGET), extra);
    assert_eq!(status, 0);
    // The new nexus sees a unit attention (power on) first.
    let r = i.command(0, &[0u8; 6], &[], 0);
    assert_eq!((r.status, r.sense.get(2)), (2, Some(&6)), "UNIT ATTENTION: {r:?}");
    let r = i.command(0, &[0u8; 6], &[], 0);
    assert_eq!(r.status, 0, "TEST UNIT READY: {r:?}");
    for (lba, blocks, seed) in [(0u32, 8u16, 1u8), (100, 512, 2), (3000, 2048, 3)] {
        let data = pattern(usize::from(blocks) * 512, seed);
        let w = i.command(0, &write10(lba, blocks), &data, 0);
        assert_eq!((w.status, w.residual), (0, 0), "WRITE {blocks}: {w:?}");
        let r = i.command(0, &read10(lba, blocks), &[], data.len() as u32);
        assert_eq!(r.status, 0, "READ {blocks}");
        assert!(r.data == data, "READ {blocks} returns what was written");
    }
    // Residual underflow: the initiator expects more than the CDB moves.
    let r = i.command(0, &read10(0, 1), &[], 4096);
    assert_eq!(r.status, 0);
    assert_eq!(r.data.len(), 512);
    assert_eq!((r.flags & 0x06, r.residual), (0x02, 4096 - 512), "U bit");
    // Residual overflow: less expected than the CDB moves.
    let r = i.command(0, &read10(0, 2), &[], 512);
    assert_eq!(r.data.len(), 512);
    assert_eq!((r.flags & 0x06, r.residual), (0x04, 512), "O bit");
    // Unknown LUN.
    let r = i.command(7, &[0u8; 6], &[], 0);
    assert_eq!(r.status, 2);
    assert_eq!((r.sense[12], r.sense[13]), (0x25, 0x00), "{r:?}");
    assert_eq!(i.logout(), 0);
}

#[test]
fn read_write_uring() {
    read_write(EngineKind::Uring, &[("ImmediateData", "Yes")]);
}

#[test]
fn read_write_sync() {
    read_write(EngineKind::Sync, &[("ImmediateData", "Yes")]);
}

#[test]
fn read_write_unsolicited_data_out() {
    read_write(
        EngineKind::Uring,
        &[("ImmediateData", "No"), ("InitialR2T", "No")],
    );
}

#[test]
fn read_write_with_digests() {
    read_write(
        EngineKind::Uring,
        &[("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C")],
    );
}

/// Serves a target on STRATA_ISCSI_TEST_PORT for manual runs with other initiators
/// (`cargo test -p san serve_for_manual_testing -- --ignored --nocapture`).
#[test]
#[ignore]
fn serve_for_manual_testing() {
    let port: u16 = std::env::var("STRATA_ISCSI_TEST_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3260);
    let secs: u64 = std::env::var("STRATA_ISCSI_TEST_SECS")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(120);
    let disk = tempfile::NamedTempFile::new().expect("tempfile");
    disk.as_file().set_len(1 << 30).expect("size");
    let backend = RawBackend::open(disk.path(), false, false).expect("backend");
    let unit = LogicalUnit::new(
        Arc::new(backend),
        LuConfig {
            name: "disk0".into(),
            state_path: None,
        },
    )
    .expect("unit");
    let registry = Arc::new(Registry::new());
    registry
        .add_target(TARGET, vec![(0, Arc::new(unit))], None, vec![])
        .expect("target");
    let mut reactor = ReactorHandle::spawn(0, None, EngineKind::Uring).expect("reactor");
    let server = IscsiServer::start(
        registry,
        &[SocketAddr::from(([127, 0, 0, 1], port))],
        vec![reactor.link()],
    )
    .expect("server");
    println!("serving iscsi://127.0.0.1:{port}/{TARGET}/0 (initiator {INITIATOR}) for {secs} s");
    std::thread::sleep(Duration::from_secs(secs));
    println!("{:?}", server.stats());
    server.shutdown();
    reactor.shutdown();
}
