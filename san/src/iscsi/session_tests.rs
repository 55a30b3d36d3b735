//! Tests of the session's pure parts (window arithmetic, LUN and nexus names, the send
//! queue); the command paths are driven end to end over TCP in the transport's tests.

use super::out::{OutData, OutQueue, Render, NO_TASK};
use super::*;
use crate::iscsi::params::SessionParams;

#[test]
fn serial_arithmetic_wraps() {
    assert!(serial_lt(1, 2));
    assert!(!serial_lt(2, 2));
    assert!(serial_lt(u32::MAX, 0));
    assert!(!serial_lt(0, u32::MAX));
}

#[test]
fn lun_numbers_peripheral_and_flat() {
    assert_eq!(lun_number(0), Some(0));
    assert_eq!(lun_number(0x0005_0000_0000_0000), Some(5));
    assert_eq!(lun_number(0x4101_0000_0000_0000), Some(0x101));
    assert_eq!(lun_number(0x0001_0001_0000_0000), None, "second level");
    assert_eq!(
        lun_number(0x8000_0000_0000_0000),
        None,
        "logical unit addressing"
    );
}

#[test]
fn nexus_names_follow_the_transport_id_form() {
    let n = nexus(
        "iqn.2026-01.test:i",
        [0x40, 0, 1, 0x37, 0, 0x1],
        "iqn.2026-01.test:t",
        1,
    );
    assert_eq!(&*n.initiator_port, "iqn.2026-01.test:i,i,0x400001370001");
    assert_eq!(&*n.target_port, "iqn.2026-01.test:t,t,0x0001");
    assert_eq!(n.relative_port, 1);
}

#[test]
fn send_queue_gathers_partial_sends_and_releases() {
    let mut q = OutQueue::new(true, true);
    let buf = [9u8; 10];
    let bhs = [1u8; BHS_LEN];
    assert!(q.push(Render {
        bhs,
        data: OutData::Inline(5),
        bytes: b"hello",
        inline: b"hello",
        release: NO_TASK,
        close_after: false,
    }));
    assert!(q.push(Render {
        bhs,
        data: OutData::Task {
            slot: 3,
            off: 2,
            len: 6
        },
        bytes: &buf[2..8],
        inline: &[],
        release: 3,
        close_after: true,
    }));
    // 48 + 4 (header digest) + 5 + 3 pad + 4 digest = 64; then 52 + 6 + 2 + 4 = 64.
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; 8];
    let ptr = buf.as_ptr();
    let n = q.gather(&mut iov, usize::MAX, &|_| ptr);
    assert_eq!(n, 6);
    assert_eq!(iov.iter().take(n).map(|v| v.iov_len).sum::<usize>(), 128);
    let mut got = Vec::new();
    q.sent(70, &mut |r, c| got.push((r, c)));
    assert_eq!(got, vec![(NO_TASK, false)]);
    let n = q.gather(&mut iov, usize::MAX, &|_| ptr);
    // 46 header bytes left, then data, then trailer.
    assert_eq!(n, 3);
    assert_eq!(iov[0].iov_len, 46);
    assert_eq!(iov[1].iov_base as *const u8, ptr.wrapping_add(2));
    q.sent(46 + 6 + 6, &mut |r, c| got.push((r, c)));
    assert_eq!(got, vec![(NO_TASK, false), (3, true)]);
    assert!(q.is_empty());
}

fn session() -> Session {
    let reg = Arc::new(crate::target::Registry::new());
    let target = reg
        .add_target("iqn.2026-01.test:t", vec![], None, vec![])
        .expect("target");
    Session::new(
        SessionSetup {
            initiator_name: Arc::from("iqn.2026-01.test:i"),
            isid: [0x40, 0, 0, 0, 0, 1],
            tsih: 1,
            cid: 0,
            target,
            tpgt: 1,
            params: SessionParams::default(),
            exp_cmd_sn: 10,
            stat_sn: 5,
            portals: vec![],
            registry: reg,
        },
        Arc::new(SessionCounters::default()),
    )
}

#[test]
fn keepalive_pings_an_idle_initiator_then_drops_it() {
    let mut s = session();
    let t0 = Instant::now();
    assert_eq!(s.tick(t0), Flow::Continue);
    assert!(!s.has_output(), "not idle yet");
    let later = t0 + KEEPALIVE_IDLE + Duration::from_secs(1);
    assert_eq!(s.tick(later), Flow::Continue);
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; 4];
    assert_eq!(s.gather(&mut iov, usize::MAX), 1);
    // SAFETY: the iovec points at the queued header, alive until `sent`.
    let hdr = unsafe { std::slice::from_raw_parts(iov[0].iov_base as *const u8, BHS_LEN) };
    assert_eq!(hdr[0], 0x20, "NOP-In");
    assert_eq!(&hdr[16..20], &[0xff; 4], "ITT reserved: a ping");
    assert_ne!(&hdr[20..24], &[0xff; 4], "TTT asks for an answer");
    assert_eq!(&hdr[24..28], &5u32.to_be_bytes(), "StatSN not advanced");
    assert_eq!(
        &hdr[32..36],
        &(10 + TASK_WINDOW - 1).to_be_bytes(),
        "MaxCmdSN"
    );
    s.sent(BHS_LEN);
    assert!(!s.has_output());
    assert_eq!(s.tick(later + Duration::from_secs(1)), Flow::Continue);
    assert_eq!(
        s.tick(later + KEEPALIVE_TIMEOUT + Duration::from_secs(1)),
        Flow::Close
    );
}

#[test]
fn a_deleted_target_ends_its_sessions() {
    let mut s = session();
    assert_eq!(s.tick(Instant::now()), Flow::Continue);
    s.setup
        .registry
        .remove_target("iqn.2026-01.test:t")
        .expect("remove");
    assert_eq!(s.tick(Instant::now()), Flow::Close);
    assert_eq!(s.counters.target_removed.load(Ordering::Relaxed), 1);
}
