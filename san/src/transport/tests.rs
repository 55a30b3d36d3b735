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
use crate::iscsi::pdu::{crc32c, put_digest};
use crate::scsi::{LogicalUnit, LuConfig};
use crate::target::Registry;

const TARGET: &str = "iqn.2026-01.test:target";
const DISK_BYTES: u64 = 16 << 20;

struct Rig {
    server: Option<IscsiServer>,
    reactors: Vec<ReactorHandle>,
    addr: SocketAddr,
    registry: Arc<Registry>,
    _disk: tempfile::NamedTempFile,
}

/// A logical unit on a fresh sparse file.
fn unit(name: &str) -> (Arc<LogicalUnit>, tempfile::NamedTempFile) {
    let disk = tempfile::NamedTempFile::new().expect("tempfile");
    disk.as_file().set_len(DISK_BYTES).expect("size");
    let backend = RawBackend::open(disk.path(), false, false).expect("backend");
    let unit = LogicalUnit::new(
        Arc::new(backend),
        LuConfig {
            name: name.into(),
            state_path: None,
        },
    )
    .expect("unit");
    (Arc::new(unit), disk)
}

impl Rig {
    fn new(engine: EngineKind, reactors: usize) -> Rig {
        let (unit, disk) = unit("disk0");
        let registry = Arc::new(Registry::new());
        registry
            .add_target(TARGET, vec![(0, unit)], None, vec![])
            .expect("target");
        let handles: Vec<ReactorHandle> = (0..reactors)
            .map(|i| ReactorHandle::spawn(i, None, engine).expect("reactor"))
            .collect();
        let server = IscsiServer::start(
            registry.clone(),
            &["127.0.0.1:0".parse().expect("addr")],
            handles.iter().map(|h| h.link()).collect(),
        )
        .expect("server");
        let addr = server.local_addrs()[0];
        Rig {
            server: Some(server),
            reactors: handles,
            addr,
            registry,
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

/// Idle connections opened by the half-open test.
const HOSTILE_CONNECTIONS: usize = 10_000;

/// Raises this process's soft descriptor limit to at least `want` (up to the hard limit): the
/// half-open test holds both ends of its connections.
fn raise_fd_limit(want: u64) {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut l), 0);
        if l.rlim_cur < want {
            l.rlim_cur = want.min(l.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &l), 0);
        }
        assert!(
            l.rlim_cur >= want,
            "descriptor limit {} below {want}",
            l.rlim_cur
        );
    }
}

#[test]
fn idle_half_open_connections_do_not_block_logins() {
    let rig = Rig::new(EngineKind::Uring, 1);
    let mut a = rig.login();
    // 10 000 idle connections (the figure), far more than the login thread keeps:
    // the oldest make room, and an established session keeps working meanwhile.
    let n = HOSTILE_CONNECTIONS;
    // Our ends, the login thread's (at most HALF_OPEN_MAX at a time) and some room.
    raise_fd_limit((n + super::HALF_OPEN_MAX + 1024) as u64);
    let idle: Vec<_> = (0..n)
        .map(|_| std::net::TcpStream::connect(rig.addr).expect("connect"))
        .collect();
    let dropped = (n - super::HALF_OPEN_MAX) as u64;
    rig.wait_for("oldest dropped", |s| s.half_open_dropped >= dropped);
    assert_eq!(a.nop(b"busy").data, b"busy");
    // Trickled bytes: half a BHS.
    let mut trickle = Initiator::connect(rig.addr);
    std::io::Write::write_all(&mut trickle.sock, &[0x43; 20]).expect("write");
    let mut i = rig.login();
    assert_eq!(i.nop(b"x").data, b"x");
    let s = rig.server().stats();
    assert!(s.half_open <= super::HALF_OPEN_MAX as u64, "{s:?}");
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
    // Each was asked to log out first (and did not: cut after the grace time).
    for i in [&mut a, &mut b] {
        let p = i.recv();
        assert_eq!(p.opcode(), 0x32, "Async Message");
        assert_eq!(p.bhs[36], 1, "target requests logout");
        assert!(i.try_recv().is_err());
    }
}

#[test]
fn shutdown_asks_initiators_to_log_out_uring() {
    shutdown_asks_initiators_to_log_out_and_waits_for_them_briefly(EngineKind::Uring);
}

#[test]
fn shutdown_asks_initiators_to_log_out_sync() {
    shutdown_asks_initiators_to_log_out_and_waits_for_them_briefly(EngineKind::Sync);
}

fn shutdown_asks_initiators_to_log_out_and_waits_for_them_briefly(engine: EngineKind) {
    let mut rig = Rig::new(engine, 2);
    let mut a = rig.login();
    let mut b = rig.login_with_isid_variant();
    rig.wait_for("two sessions", |s| s.sessions == 2);
    let server = rig.server.take().expect("server");
    let t0 = Instant::now();
    let stopper = std::thread::spawn(move || server.shutdown());
    // Both initiators get the request (logout within LOGOUT_WITHIN_SECS) and log out.
    for i in [&mut a, &mut b] {
        let p = i.recv();
        assert_eq!(p.opcode(), 0x32, "Async Message");
        assert_eq!(p.bhs[36], 1, "AsyncEvent: target requests logout");
        assert_eq!(
            u16::from_be_bytes([p.bhs[42], p.bhs[43]]),
            super::conn::LOGOUT_WITHIN_SECS,
            "Parameter3"
        );
        assert_eq!(i.logout(), 0, "logout accepted");
    }
    stopper.join().expect("shutdown");
    // Done as soon as they left, well before the grace time ran out.
    assert!(t0.elapsed() < super::SHUTDOWN_LOGOUT_WAIT);
    assert!(a.try_recv().is_err());
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
    assert_eq!(
        (r.status, r.sense.get(2)),
        (2, Some(&6)),
        "UNIT ATTENTION: {r:?}"
    );
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
    // STRATA_ISCSI_TEST_DIR=/dev/shm puts the LUN on tmpfs (benchmarks).
    let disk = match std::env::var("STRATA_ISCSI_TEST_DIR") {
        Ok(dir) => tempfile::NamedTempFile::new_in(dir),
        Err(_) => tempfile::NamedTempFile::new(),
    }
    .expect("tempfile");
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
    // STRATA_ISCSI_TEST_CPU pins the reactor (benchmarks).
    let cpu = std::env::var("STRATA_ISCSI_TEST_CPU")
        .ok()
        .and_then(|c| c.parse().ok());
    // STRATA_ISCSI_TEST_ENGINE=sync runs the synchronous engine.
    let engine = match std::env::var("STRATA_ISCSI_TEST_ENGINE").as_deref() {
        Ok("sync") => EngineKind::Sync,
        _ => EngineKind::Uring,
    };
    let mut reactor = ReactorHandle::spawn(0, cpu, engine).expect("reactor");
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

/// A NOP-Out header (immediate) with the given ITT.
fn nop_out(itt: u32, cmd_sn: u32) -> [u8; 48] {
    let mut b = [0u8; 48];
    b[0] = 0x40;
    b[1] = 0x80;
    b[16..20].copy_from_slice(&itt.to_be_bytes());
    b[20..24].copy_from_slice(&u32::MAX.to_be_bytes());
    b[24..28].copy_from_slice(&cmd_sn.to_be_bytes());
    b
}

#[test]
fn cmdsn_outside_the_window_is_dropped() {
    let rig = Rig::new(EngineKind::Uring, 1);
    let mut i = rig.login();
    let good = i.cmd_sn;
    i.cmd_sn = i.max_cmd_sn.wrapping_add(1);
    let b = i.cmd_bhs(0, &[0u8; 6], 0, false, false);
    i.send(b, &[]);
    i.cmd_sn = good.wrapping_sub(1);
    let b = i.cmd_bhs(0, &[0u8; 6], 0, false, false);
    i.send(b, &[]);
    rig.wait_for("two commands dropped", |s| s.cmdsn_dropped == 2);
    i.cmd_sn = good;
    // The window is intact: a command with ExpCmdSN is answered, and nothing else came.
    let r = i.command(0, &[0u8; 6], &[], 0);
    assert_eq!(r.response, 0);
}

#[test]
fn data_out_for_an_unknown_task_is_rejected() {
    let rig = Rig::new(EngineKind::Uring, 1);
    let mut i = rig.login();
    let mut b = [0u8; 48];
    b[0] = 0x05;
    b[1] = 0x80;
    b[16..20].copy_from_slice(&99u32.to_be_bytes());
    b[20..24].copy_from_slice(&0x1234u32.to_be_bytes());
    i.send(b, &[1u8; 512]);
    let p = i.recv();
    assert_eq!(
        (p.opcode(), p.bhs[2]),
        (0x3f, 0x09),
        "Reject, invalid PDU field"
    );
    assert_eq!(&p.data[8..24], &b[8..24], "the rejected header comes back");
    // SNACK (ERL 0) and an unknown opcode are rejected too.
    let mut s = [0u8; 48];
    s[0] = 0x10;
    s[1] = 0x80;
    i.send(s, &[]);
    assert_eq!(i.recv().opcode(), 0x3f);
    s[0] = 0x1c;
    i.send(s, &[]);
    let p = i.recv();
    assert_eq!(
        (p.opcode(), p.bhs[2]),
        (0x3f, 0x05),
        "command not supported"
    );
    assert_eq!(i.nop(b"alive").data, b"alive");
    rig.wait_for("rejects counted", |s| s.pdus_rejected == 3);
}

#[test]
fn data_digest_error_is_rejected_and_the_connection_goes_on() {
    let rig = Rig::new(EngineKind::Uring, 1);
    let mut i = Initiator::connect(rig.addr);
    let (status, _) = i.login(
        Some(TARGET),
        &[("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C")],
    );
    assert_eq!(status, 0);
    assert!(i.header_digest && i.data_digest, "digests negotiated");
    // A NOP-Out with 4 data bytes and a wrong data digest, written by hand.
    let mut b = nop_out(77, i.cmd_sn);
    b[7] = 4;
    let mut raw = b.to_vec();
    raw.extend_from_slice(&put_digest(crc32c(&[&b])));
    raw.extend_from_slice(b"abcd");
    raw.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    std::io::Write::write_all(&mut i.sock, &raw).expect("write");
    let p = i.recv();
    assert_eq!(
        (p.opcode(), p.bhs[2]),
        (0x3f, 0x02),
        "Reject, data digest error"
    );
    assert_eq!(i.nop(b"alive").data, b"alive");
    assert_eq!(rig.server().stats().data_digest_errors, 1);
}

#[test]
fn header_digest_error_drops_only_that_connection() {
    let rig = Rig::new(EngineKind::Uring, 1);
    let mut other = rig.login_with_isid_variant();
    let mut i = Initiator::connect(rig.addr);
    let (status, _) = i.login(Some(TARGET), &[("HeaderDigest", "CRC32C")]);
    assert_eq!(status, 0);
    let b = nop_out(5, i.cmd_sn);
    let mut raw = b.to_vec();
    raw.extend_from_slice(&[0, 0, 0, 0]);
    std::io::Write::write_all(&mut i.sock, &raw).expect("write");
    assert!(i.try_recv().is_err(), "dropped");
    rig.wait_for("header digest error counted", |s| {
        s.header_digest_errors == 1 && s.sessions == 1
    });
    assert_eq!(other.nop(b"unaffected").data, b"unaffected");
}

#[test]
fn abort_of_a_write_waiting_for_data() {
    let rig = Rig::new(EngineKind::Uring, 1);
    let mut i = Initiator::connect(rig.addr);
    let (status, _) = i.login(
        Some(TARGET),
        &[("ImmediateData", "No"), ("InitialR2T", "Yes")],
    );
    assert_eq!(status, 0);
    let _ = i.command(0, &[0u8; 6], &[], 0); // unit attention
    let b = i.cmd_bhs(0, &write10(0, 8), 4096, false, true);
    let itt = u32::from_be_bytes([b[16], b[17], b[18], b[19]]);
    i.send(b, &[]);
    let r2t = i.recv();
    assert_eq!(r2t.opcode(), 0x31, "R2T");
    assert_eq!(i.tmf(1, 0, itt), 0, "ABORT TASK: function complete");
    assert_eq!(i.tmf(1, 0, itt), 1, "then the task does not exist");
    // Data-Out for the aborted task's TTT is refused; the session goes on.
    i.data_out(itt, r2t.ttt(), &[0u8; 4096], 0, 4096);
    assert_eq!(i.recv().opcode(), 0x3f);
    assert_eq!(i.tmf(5, 0, 0), 0, "LOGICAL UNIT RESET");
    assert_eq!(i.tmf(6, 0, 0), 0, "TARGET WARM RESET");
    assert_eq!(i.nop(b"alive").data, b"alive");
    // TARGET COLD RESET: answered, then the target ends the connection (RFC 7143 §11.5.1).
    assert_eq!(i.tmf(7, 0, 0), 0, "TARGET COLD RESET");
    assert!(i.try_recv().is_err(), "connection ended");
}

#[test]
fn many_commands_in_flight() {
    // A window's worth of reads queued before any answer is read: MaxCmdSN, slots and the
    // send queue's backpressure hold.
    let rig = Rig::new(EngineKind::Uring, 1);
    let mut i = rig.login();
    let _ = i.command(0, &[0u8; 6], &[], 0); // unit attention
    let n = (i.max_cmd_sn.wrapping_sub(i.cmd_sn) + 1).min(128);
    assert!(n >= 64, "window of {n}");
    let mut itts = Vec::new();
    for k in 0..n {
        let b = i.cmd_bhs(0, &read10(k * 8, 64), 64 * 512, true, false);
        itts.push(u32::from_be_bytes([b[16], b[17], b[18], b[19]]));
        i.send(b, &[]);
    }
    let mut done = 0;
    while done < n {
        let p = i.recv();
        assert_eq!(p.opcode(), 0x25);
        if p.flags() & 0x01 != 0 {
            assert_eq!(p.bhs[3], 0);
            done += 1;
        }
    }
    assert_eq!(i.nop(b"x").data, b"x");
    let _ = itts;
}

#[test]
fn lun_added_while_the_session_runs() {
    let rig = Rig::new(EngineKind::Uring, 1);
    let mut i = rig.login();
    let report_luns = |i: &mut Initiator| {
        let mut cdb = [0u8; 12];
        cdb[0] = 0xA0;
        cdb[6..10].copy_from_slice(&4096u32.to_be_bytes());
        let r = i.command(0, &cdb, &[], 4096);
        assert_eq!(r.status, 0, "{r:?}");
        u32::from_be_bytes([r.data[0], r.data[1], r.data[2], r.data[3]]) / 8
    };
    assert_eq!(report_luns(&mut i), 1);
    let (u1, _disk1) = unit("disk1");
    rig.registry.add_lun(TARGET, 1, u1).expect("add LUN");
    assert_eq!(report_luns(&mut i), 2, "the session sees the new table");
    let lun1 = 0x0001_0000_0000_0000;
    let data = pattern(4096, 9);
    let mut w = i.command(lun1, &write10(8, 8), &data, 0);
    if w.status == 2 {
        // The new unit's power-on unit attention.
        w = i.command(lun1, &write10(8, 8), &data, 0);
    }
    assert_eq!(w.status, 0, "{w:?}");
    let r = i.command(lun1, &read10(8, 8), &[], 4096);
    assert!(r.status == 0 && r.data == data);
    rig.registry.remove_lun(TARGET, 1).expect("remove LUN");
    let r = i.command(lun1, &[0u8; 6], &[], 0);
    assert_eq!(
        (r.status, r.sense.get(12)),
        (2, Some(&0x25)),
        "LUN gone: {r:?}"
    );
}

#[test]
fn logins_beyond_the_reactors_room_are_refused() {
    let rig = Rig::new(EngineKind::Uring, 1);
    let sessions: Vec<Initiator> = (0..super::CONNECTIONS_PER_REACTOR_MAX)
        .map(|k| {
            let mut i = Initiator::connect(rig.addr);
            i.isid_variant = k as u8;
            let (status, _) = i.login(Some(TARGET), &[]);
            assert_eq!(status, 0, "login {k}");
            i
        })
        .collect();
    rig.wait_for("reactor full", |s| {
        s.sessions == super::CONNECTIONS_PER_REACTOR_MAX as u64
    });
    let mut extra = Initiator::connect(rig.addr);
    extra.isid_variant = 200;
    let (status, _) = extra.login(Some(TARGET), &[]);
    assert_eq!(status, 0x0302, "target error: out of resources");
    assert_eq!(rig.server().stats().sessions_refused, 1);
    // Discovery needs no reactor.
    let mut d = Initiator::connect(rig.addr);
    assert_eq!(d.login(None, &[]).0, 0);
    drop(sessions);
    rig.wait_for("room again", |s| s.sessions == 0);
    assert_eq!(extra_login(&rig), 0);
}

fn extra_login(rig: &Rig) -> u16 {
    let mut i = Initiator::connect(rig.addr);
    i.login(Some(TARGET), &[]).0
}
