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

/// A session on a real unit (a sparse file) with a synchronous engine, for driving PDUs.
struct Driven {
    s: Session,
    engine: dataplane::engine::sync::SyncEngine,
    round: dataplane::poller::Round,
    offload: dataplane::offload::OffloadSink,
    /// Every byte the session sent, in order (no digests in these tests).
    wire: Vec<u8>,
    _disk: Option<tempfile::NamedTempFile>,
}

impl Driven {
    fn new(params: SessionParams) -> Driven {
        let disk = tempfile::NamedTempFile::new().expect("tempfile");
        disk.as_file().set_len(1 << 20).expect("size");
        let backend =
            dataplane::backend::RawBackend::open(disk.path(), false, false).expect("backend");
        let unit = LogicalUnit::new(
            Arc::new(backend),
            scsi::LuConfig {
                name: "d".into(),
                state_path: None,
            },
        )
        .expect("unit");
        let reg = Arc::new(crate::target::Registry::new());
        let target = reg
            .add_target(
                "iqn.2026-01.test:t",
                vec![(0, Arc::new(unit))],
                None,
                vec![],
            )
            .expect("target");
        let s = Session::new(
            SessionSetup {
                initiator_name: Arc::from("iqn.2026-01.test:i"),
                isid: [0; 6],
                tsih: 1,
                cid: 0,
                target,
                tpgt: 1,
                params,
                exp_cmd_sn: 0,
                stat_sn: 0,
                portals: vec![],
                registry: reg,
            },
            Arc::new(SessionCounters::default()),
        );
        let wake = vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd");
        Driven {
            s,
            engine: dataplane::engine::sync::SyncEngine::new(),
            round: dataplane::poller::Round::default(),
            offload: dataplane::offload::OffloadSink::new(wake),
            wire: Vec::new(),
            _disk: Some(disk),
        }
    }

    /// Hands `pdu` (header and data as framed) to the session, then runs the engine's
    /// completions and drains the send queue as if everything was sent.
    fn feed(&mut self, bhs: [u8; BHS_LEN], data: &[u8]) -> Flow {
        let mut buf = bhs.to_vec();
        buf[5..8].copy_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
        buf.extend_from_slice(data);
        let frame = Frame {
            total_len: buf.len(),
            bhs: Bhs::from_slice(&buf).expect("bhs"),
            ahs: BHS_LEN..BHS_LEN,
            data: BHS_LEN..buf.len(),
        };
        let mut cx = PollCx::new(&mut self.engine, 0, &mut self.round, &self.offload);
        let flow = if self.s.can_take() {
            self.s.on_pdu(&frame, &buf, &mut cx)
        } else {
            Flow::Continue
        };
        self.settle();
        flow
    }

    fn settle(&mut self) {
        use dataplane::engine::IoEngine;
        let mut done = [dataplane::engine::Completion::default(); 64];
        for _ in 0..64 {
            let mut cx = PollCx::new(&mut self.engine, 0, &mut self.round, &self.offload);
            self.s.poll(&mut cx);
            self.s.end_batch(&mut cx);
            let n = self.engine.reap(&mut done);
            for c in &done[..n] {
                let mut cx = PollCx::new(&mut self.engine, 0, &mut self.round, &self.offload);
                self.s
                    .complete(dataplane::poller::tag_of(c.user_data), c.result, &mut cx);
            }
            let mut iov = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; 64];
            let k = self.s.gather(&mut iov, usize::MAX);
            let bytes: usize = iov[..k].iter().map(|v| v.iov_len).sum();
            for v in &iov[..k] {
                // SAFETY: the iovecs point at queued bytes, alive until `sent`.
                let b = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
                self.wire.extend_from_slice(b);
            }
            self.s.sent(bytes);
            if n == 0 && k == 0 {
                break;
            }
        }
    }

    /// Another session (ISID `isid`, so another nexus) on the same target and unit.
    fn peer(&self, isid: [u8; 6]) -> Driven {
        let mut setup = self.s.setup.clone();
        setup.isid = isid;
        setup.exp_cmd_sn = 0;
        setup.stat_sn = 0;
        let wake = vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd");
        Driven {
            s: Session::new(setup, Arc::new(SessionCounters::default())),
            engine: dataplane::engine::sync::SyncEngine::new(),
            round: dataplane::poller::Round::default(),
            offload: dataplane::offload::OffloadSink::new(wake),
            wire: Vec::new(),
            _disk: None,
        }
    }

    /// The PDUs sent since the last call: (header, data segment).
    fn take_pdus(&mut self) -> Vec<([u8; BHS_LEN], Vec<u8>)> {
        let mut out = Vec::new();
        let wire = std::mem::take(&mut self.wire);
        let mut at = 0;
        while at + BHS_LEN <= wire.len() {
            let mut h = [0u8; BHS_LEN];
            h.copy_from_slice(&wire[at..at + BHS_LEN]);
            let len = u32::from_be_bytes([0, h[5], h[6], h[7]]) as usize;
            let start = at + BHS_LEN + usize::from(h[4]) * 4;
            out.push((h, wire[start..start + len].to_vec()));
            at = start + len.div_ceil(4) * 4;
        }
        out
    }

    /// Clears the power-on unit attention with a TEST UNIT READY (CmdSN `sn`).
    fn clear_ua(&mut self, sn: u32) {
        let mut tur = [0u8; BHS_LEN];
        tur[0] = 0x01;
        tur[1] = 0x80;
        tur[16..20].copy_from_slice(&0x7000_0000u32.to_be_bytes());
        tur[24..28].copy_from_slice(&sn.to_be_bytes());
        assert_eq!(self.feed(tur, &[]), Flow::Continue);
        self.take_pdus();
    }
}

/// A SCSI Command header: ITT, CmdSN, EDTL, W bit and F bit set, `cdb`.
fn command(itt: u32, cmd_sn: u32, edtl: u32, write: bool, cdb: &[u8]) -> [u8; BHS_LEN] {
    let mut b = [0u8; BHS_LEN];
    b[0] = 0x01;
    b[1] = 0x80 | if write { 0x20 } else { 0x40 };
    b[16..20].copy_from_slice(&itt.to_be_bytes());
    b[20..24].copy_from_slice(&edtl.to_be_bytes());
    b[24..28].copy_from_slice(&cmd_sn.to_be_bytes());
    b[32..32 + cdb.len()].copy_from_slice(cdb);
    b
}

/// The (status, sense key, ASC) of the SCSI Response for `itt` among `pdus`.
fn response_of(pdus: &[([u8; BHS_LEN], Vec<u8>)], itt: u32) -> Option<(u8, u8, u8)> {
    pdus.iter()
        .find(|(h, _)| h[0] & 0x3f == 0x21 && h[16..20] == itt.to_be_bytes())
        .map(|(h, d)| {
            let (key, asc) = if d.len() >= 2 + 14 {
                (d[2 + 2] & 0x0f, d[2 + 12])
            } else {
                (0, 0)
            };
            (h[3], key, asc)
        })
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
    /// Hostile PDU sequences (initiator opcodes with arbitrary fields and data) never panic
    /// the session, and whatever they do, it ends with nothing in flight once abandoned.
    #[test]
    fn hostile_pdus_never_panic(
        pdus in proptest::collection::vec(
            (0usize..9, proptest::collection::vec(proptest::prelude::any::<u8>(), BHS_LEN),
             0usize..3, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)),
            1..24),
        immediate_data in proptest::prelude::any::<bool>(),
        initial_r2t in proptest::prelude::any::<bool>(),
    ) {
        let params = SessionParams {
            immediate_data,
            initial_r2t,
            max_outstanding_r2t: 2,
            first_burst: 4096,
            max_burst: 8192,
            max_recv_data_segment: 4096,
            max_send_data_segment: 1024,
            ..SessionParams::default()
        };
        let mut d = Driven::new(params);
        const OPS: [u8; 9] = [0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x10, 0x1f];
        for (op, fields, cdb_kind, data) in pdus {
            let mut b = [0u8; BHS_LEN];
            b.copy_from_slice(&fields);
            b[0] = (b[0] & 0x40) | OPS[op];
            b[4] = 0; // no AHS (framing checks those)
            if OPS[op] == 0x01 {
                // Mostly plausible CDBs, so commands get past the plan.
                let cdbs: [&[u8]; 3] = [
                    &[0x2A, 0, 0, 0, 0, 1, 0, 0, 4, 0],
                    &[0x28, 0, 0, 0, 0, 2, 0, 0, 3, 0],
                    &[0x00, 0, 0, 0, 0, 0],
                ];
                let c = cdbs[cdb_kind];
                b[32..32 + c.len()].copy_from_slice(c);
                b[8..16].fill(0);
            }
            let _ = d.feed(b, &data);
        }
        d.s.abandon();
        d.settle();
        proptest::prop_assert_eq!(d.s.in_flight(), 0);
    }
}

#[test]
fn write_with_r2t_and_read_back_through_the_session() {
    let mut d = Driven::new(SessionParams {
        immediate_data: false,
        initial_r2t: true,
        ..SessionParams::default()
    });
    // TEST UNIT READY takes the power-on unit attention.
    let mut tur = [0u8; BHS_LEN];
    tur[0] = 0x01;
    tur[1] = 0x80;
    assert_eq!(d.feed(tur, &[]), Flow::Continue);
    // WRITE(10) of 8 blocks: the target asks for the data with an R2T.
    let mut w = [0u8; BHS_LEN];
    w[0] = 0x01;
    w[1] = 0xA0;
    w[16..20].copy_from_slice(&7u32.to_be_bytes());
    w[20..24].copy_from_slice(&4096u32.to_be_bytes());
    w[24..28].copy_from_slice(&1u32.to_be_bytes());
    w[32..42].copy_from_slice(&[0x2A, 0, 0, 0, 0, 0, 0, 0, 8, 0]);
    let mut cx = PollCx::new(&mut d.engine, 0, &mut d.round, &d.offload);
    let mut buf = w.to_vec();
    let frame = Frame {
        total_len: BHS_LEN,
        bhs: Bhs::from_slice(&buf).expect("bhs"),
        ahs: BHS_LEN..BHS_LEN,
        data: BHS_LEN..BHS_LEN,
    };
    d.s.on_pdu(&frame, &buf, &mut cx);
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; 8];
    assert_eq!(d.s.gather(&mut iov, usize::MAX), 1);
    // SAFETY: the iovec points at the queued R2T header, alive until `sent`.
    let r2t = unsafe { std::slice::from_raw_parts(iov[0].iov_base as *const u8, BHS_LEN) };
    assert_eq!(r2t[0], 0x31);
    let ttt: [u8; 4] = r2t[20..24].try_into().expect("ttt");
    assert_eq!(&r2t[44..48], &4096u32.to_be_bytes(), "desired length");
    d.s.sent(BHS_LEN);
    // Data-Out answering it.
    let mut o = [0u8; BHS_LEN];
    o[0] = 0x05;
    o[1] = 0x80;
    o[16..20].copy_from_slice(&7u32.to_be_bytes());
    o[20..24].copy_from_slice(&ttt);
    buf = vec![0x5a; 4096];
    assert_eq!(d.feed(o, &buf), Flow::Continue);
    assert!(!d.s.has_output(), "status sent");
    assert_eq!(d.s.in_flight(), 0);
}

#[test]
fn compare_and_write_with_a_data_length_other_than_its_blocks_is_refused() {
    let mut d = Driven::new(SessionParams::default());
    d.clear_ua(0);
    // COMPARE AND WRITE of 1 block at LBA 0 (1024 bytes of Data-Out) with immediate data.
    let mut caw = [0u8; 16];
    caw[0] = 0x89;
    caw[13] = 1;
    let data = vec![0u8; 1024];
    assert_eq!(
        d.feed(command(1, 1, 1024, true, &caw), &data),
        Flow::Continue
    );
    assert_eq!(
        response_of(&d.take_pdus(), 1),
        Some((0, 0, 0)),
        "exact: runs"
    );
    // 256 blocks wrap to 0 in the one-byte field: 256 KiB of Data-Out for no blocks.
    caw[13] = 0;
    let burst = vec![0u8; 8192];
    assert_eq!(
        d.feed(command(2, 2, 256 * 1024, true, &caw), &burst),
        Flow::Continue
    );
    assert_eq!(
        response_of(&d.take_pdus(), 2),
        Some((status::CHECK_CONDITION, 0x05, 0x24)),
        "INVALID FIELD IN CDB"
    );
    // Data-Out of 4 blocks for a 1-block COMPARE AND WRITE, and 2 blocks for 3.
    for (i, (blocks, edtl)) in [(1u8, 4096u32), (3, 2048)].into_iter().enumerate() {
        caw[13] = blocks;
        let itt = 3 + i as u32;
        let imm = vec![0u8; edtl.min(8192) as usize];
        d.feed(command(itt, itt, edtl, true, &caw), &imm);
        assert_eq!(
            response_of(&d.take_pdus(), itt),
            Some((status::CHECK_CONDITION, 0x05, 0x24))
        );
    }
    // WRITE SAME(16) of one block's pattern: only exactly one block.
    let mut ws = [0u8; 16];
    ws[0] = 0x93;
    ws[13] = 8;
    d.feed(command(5, 5, 256, true, &ws), &[0u8; 256]);
    assert_eq!(
        response_of(&d.take_pdus(), 5),
        Some((status::CHECK_CONDITION, 0x05, 0x24))
    );
    d.feed(command(6, 6, 512, true, &ws), &[0u8; 512]);
    assert_eq!(response_of(&d.take_pdus(), 6), Some((0, 0, 0)));
    // With UNMAP, no block at all is accepted too (deallocate); without, it is not.
    d.feed(command(7, 7, 0, true, &ws), &[]);
    assert_eq!(
        response_of(&d.take_pdus(), 7),
        Some((status::CHECK_CONDITION, 0x05, 0x24))
    );
    ws[1] = 0x08;
    d.feed(command(8, 8, 0, true, &ws), &[]);
    assert_eq!(response_of(&d.take_pdus(), 8), Some((0, 0, 0)));
    d.feed(command(9, 9, 1024, true, &ws), &[0u8; 1024]);
    assert_eq!(
        response_of(&d.take_pdus(), 9),
        Some((status::CHECK_CONDITION, 0x05, 0x24))
    );
}

/// PERSISTENT RESERVE OUT (`action`, type Write Exclusive) with reservation key `key` and
/// service action key `sa_key`, as command `itt`/`sn` of `d`; its status.
fn prout(d: &mut Driven, itt: u32, sn: u32, action: u8, key: u64, sa_key: u64) -> u8 {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x5F;
    cdb[1] = action;
    cdb[2] = 0x01;
    cdb[8] = 24;
    let mut params = [0u8; 24];
    params[0..8].copy_from_slice(&key.to_be_bytes());
    params[8..16].copy_from_slice(&sa_key.to_be_bytes());
    d.feed(command(itt, sn, 24, true, &cdb), &params);
    response_of(&d.take_pdus(), itt).expect("PROUT response").0
}

/// A WRITE(10) of 8 blocks at LBA 0 that waits for its data (InitialR2T, sent without
/// immediate data):
/// the R2T's Target Transfer Tag.
fn write_waiting_for_data(d: &mut Driven, itt: u32, sn: u32) -> [u8; 4] {
    d.feed(
        command(itt, sn, 4096, true, &[0x2A, 0, 0, 0, 0, 0, 0, 0, 8, 0]),
        &[],
    );
    let pdus = d.take_pdus();
    let (r2t, _) = pdus.iter().find(|(h, _)| h[0] == 0x31).expect("R2T");
    r2t[20..24].try_into().expect("ttt")
}

/// The Data-Out answering `ttt` for command `itt` (4096 bytes, final).
/// Immediate data allowed (the PROUT parameter lists use it), unsolicited Data-Out not: a
/// write sending no immediate data waits for an R2T.
fn r2t_params() -> SessionParams {
    SessionParams {
        immediate_data: true,
        initial_r2t: true,
        ..SessionParams::default()
    }
}

/// Sends TMF `function` (ITT 9, CmdSN 1) and checks it is answered "function complete".
fn tmf_done(d: &mut Driven, function: u8) {
    let mut tmf = [0u8; BHS_LEN];
    tmf[0] = 0x42;
    tmf[1] = 0x80 | function;
    tmf[16..20].copy_from_slice(&9u32.to_be_bytes());
    tmf[24..28].copy_from_slice(&1u32.to_be_bytes());
    d.feed(tmf, &[]);
    let pdus = d.take_pdus();
    assert!(
        pdus.iter().any(|(h, _)| h[0] == 0x22 && h[2] == 0),
        "TMF done"
    );
}

fn data_out(d: &mut Driven, itt: u32, ttt: [u8; 4]) {
    let mut o = [0u8; BHS_LEN];
    o[0] = 0x05;
    o[1] = 0x80;
    o[16..20].copy_from_slice(&itt.to_be_bytes());
    o[20..24].copy_from_slice(&ttt);
    d.feed(o, &[0x5a; 4096]);
}

#[test]
fn preempt_and_abort_aborts_the_preempted_nexus_tasks() {
    let mut a = Driven::new(r2t_params());
    let mut b = a.peer([0x40, 0, 0, 0, 0, 2]);
    let mut c = a.peer([0x40, 0, 0, 0, 0, 3]);
    a.clear_ua(0);
    b.clear_ua(0);
    c.clear_ua(0);
    // A, B and C register (keys 0xA, 0xB, 0xC); A reserves.
    assert_eq!(prout(&mut a, 1, 1, 0, 0, 0xA), 0);
    assert_eq!(prout(&mut b, 1, 1, 0, 0, 0xB), 0);
    assert_eq!(prout(&mut c, 1, 1, 0, 0, 0xC), 0);
    assert_eq!(prout(&mut a, 2, 2, 1, 0xA, 0), 0);
    // A's and C's writes wait for their data.
    let ttt_a = write_waiting_for_data(&mut a, 3, 3);
    let ttt_c = write_waiting_for_data(&mut c, 2, 2);
    // B preempts A's key and aborts its tasks; C is not preempted.
    assert_eq!(prout(&mut b, 2, 2, 5, 0xB, 0xA), 0);
    // A's write ends with TASK ABORTED once its data is in; nothing is written.
    a.settle();
    data_out(&mut a, 3, ttt_a);
    assert_eq!(
        response_of(&a.take_pdus(), 3),
        Some((status::TASK_ABORTED, 0, 0))
    );
    // C's write is not aborted: it runs, and meets B's Write Exclusive reservation.
    c.settle();
    data_out(&mut c, 2, ttt_c);
    assert_eq!(
        response_of(&c.take_pdus(), 2),
        Some((status::RESERVATION_CONFLICT, 0, 0)),
        "not aborted: it ran (and met B's reservation)"
    );
    // A new command of A's runs normally (here: the preemption's unit attention).
    a.feed(command(4, 4, 0, false, &[0, 0, 0, 0, 0, 0]), &[]);
    assert_eq!(
        response_of(&a.take_pdus(), 4),
        Some((status::CHECK_CONDITION, 0x06, 0x2A))
    );
    // Plain PREEMPT aborts nothing.
    let ttt_c = write_waiting_for_data(&mut c, 3, 3);
    assert_eq!(prout(&mut b, 3, 3, 4, 0xB, 0xC), 0);
    c.settle();
    data_out(&mut c, 3, ttt_c);
    assert_ne!(
        response_of(&c.take_pdus(), 3).map(|r| r.0),
        Some(status::TASK_ABORTED)
    );
}

#[test]
fn a_logical_unit_reset_aborts_other_nexuses_tasks() {
    let mut a = Driven::new(r2t_params());
    let mut b = a.peer([0x40, 0, 0, 0, 0, 2]);
    a.clear_ua(0);
    b.clear_ua(0);
    let ttt = write_waiting_for_data(&mut a, 1, 1);
    // LOGICAL UNIT RESET from B.
    tmf_done(&mut b, 5);
    a.settle();
    data_out(&mut a, 1, ttt);
    assert_eq!(
        response_of(&a.take_pdus(), 1),
        Some((status::TASK_ABORTED, 0, 0))
    );
}

#[test]
fn a_data_out_out_of_sequence_ends_its_command_at_once() {
    let params = r2t_params();
    let mut d = Driven::new(params);
    d.clear_ua(0);
    for (itt, sn, datasn) in [(1u32, 1u32, 1u32), (2, 2, 27), (3, 3, u32::MAX)] {
        let ttt = write_waiting_for_data(&mut d, itt, sn);
        let mut o = [0u8; BHS_LEN];
        o[0] = 0x05;
        o[1] = 0x80;
        o[16..20].copy_from_slice(&itt.to_be_bytes());
        o[20..24].copy_from_slice(&ttt);
        o[36..40].copy_from_slice(&datasn.to_be_bytes());
        d.feed(o, &[0x5a; 4096]);
        let pdus = d.take_pdus();
        assert!(pdus.iter().any(|(h, _)| h[0] == 0x3f), "Reject");
        assert_eq!(
            response_of(&pdus, itt),
            Some((status::CHECK_CONDITION, 0x0B, 0x47)),
            "ABORTED COMMAND, PROTOCOL SERVICE CRC ERROR"
        );
        // The right Data-Out, late: no command any more (rejected), the session goes on.
        o[36..40].fill(0);
        assert_eq!(d.feed(o, &[0x5a; 4096]), Flow::Continue);
        let pdus = d.take_pdus();
        assert!(pdus.iter().all(|(h, _)| h[0] == 0x3f));
    }
    d.feed(command(9, 4, 0, false, &[0, 0, 0, 0, 0, 0]), &[]);
    assert_eq!(response_of(&d.take_pdus(), 9), Some((0, 0, 0)));
    assert_eq!(d.s.in_flight(), 0);
}

#[test]
fn a_data_out_with_a_data_digest_error_ends_its_command() {
    let mut d = Driven::new(r2t_params());
    d.clear_ua(0);
    let ttt = write_waiting_for_data(&mut d, 1, 1);
    let mut o = [0u8; BHS_LEN];
    o[0] = 0x05;
    o[1] = 0x80;
    o[16..20].copy_from_slice(&1u32.to_be_bytes());
    o[20..24].copy_from_slice(&ttt);
    let e = PduError::DataDigest {
        got: 1,
        computed: 2,
        total_len: BHS_LEN + 4096 + 4,
        bhs: Bhs::from_slice(&o).expect("bhs"),
    };
    assert_eq!(d.s.on_frame_error(&e), Flow::Continue);
    d.settle();
    let pdus = d.take_pdus();
    assert!(pdus.iter().any(|(h, _)| h[0] == 0x3f && h[2] == 0x02));
    assert_eq!(
        response_of(&pdus, 1),
        Some((status::CHECK_CONDITION, 0x0B, 0x47))
    );
}

#[test]
fn a_command_reusing_an_active_itt_is_rejected_as_task_in_progress() {
    let mut d = Driven::new(r2t_params());
    d.clear_ua(0);
    let ttt = write_waiting_for_data(&mut d, 5, 1);
    // Another command with ITT 5 while the write waits for its data.
    d.feed(command(5, 2, 0, false, &[0, 0, 0, 0, 0, 0]), &[]);
    let pdus = d.take_pdus();
    assert_eq!(pdus.len(), 1);
    assert_eq!(pdus[0].0[0], 0x3f, "Reject");
    assert_eq!(pdus[0].0[2], 0x07, "task in progress");
    assert_eq!(
        &pdus[0].1[16..20],
        &5u32.to_be_bytes(),
        "the rejected header"
    );
    // The write goes on undisturbed; then ITT 5 is free again.
    data_out(&mut d, 5, ttt);
    assert_eq!(response_of(&d.take_pdus(), 5), Some((0, 0, 0)));
    d.feed(command(5, 3, 0, false, &[0, 0, 0, 0, 0, 0]), &[]);
    assert_eq!(response_of(&d.take_pdus(), 5), Some((0, 0, 0)));
}

#[test]
fn a_target_cold_reset_ends_every_connection() {
    let mut a = Driven::new(SessionParams::default());
    let mut b = a.peer([0x40, 0, 0, 0, 0, 2]);
    a.clear_ua(0);
    b.clear_ua(0);
    // RESERVE(6) from A.
    a.feed(command(1, 1, 0, false, &[0x16, 0, 0, 0, 0, 0]), &[]);
    assert_eq!(response_of(&a.take_pdus(), 1), Some((0, 0, 0)));
    // TARGET COLD RESET from B: answered, then B's connection ends.
    tmf_done(&mut b, 7);
    assert!(b.s.finished(), "B's connection ends after the answer");
    assert!(!b.s.can_take());
    // A's connection ends on its next iteration.
    assert!(!a.s.finished());
    a.settle();
    assert!(a.s.finished());
    // The SPC-2 reservation is gone: a new nexus may reserve.
    let mut c = a.peer([0x40, 0, 0, 0, 0, 3]);
    c.feed(command(1, 0, 0, false, &[0x16, 0, 0, 0, 0, 0]), &[]);
    // Its first command reports the power-on unit attention, then RESERVE(6) works.
    c.take_pdus();
    c.feed(command(2, 1, 0, false, &[0x16, 0, 0, 0, 0, 0]), &[]);
    assert_eq!(response_of(&c.take_pdus(), 2), Some((0, 0, 0)));
}
