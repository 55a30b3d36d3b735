//! Persistent reservations through the unit: service actions, conflicts per type, unit
//! attentions, and the state surviving a reopen of the unit from its state file.

use std::sync::Arc;

use dataplane::backend::{BlockBackend, RawBackend};

use super::sense::{key, ua};
use super::tests::{nexus, read10, write10, Harness};
use super::*;

const MIB: u64 = 1 << 20;

fn prout(action: u8, rtype: u8, key: u64, sa_key: u64, aptpl: bool) -> ([u8; 10], Vec<u8>) {
    let mut c = [0u8; 10];
    c[0] = 0x5F;
    c[1] = action;
    c[2] = rtype;
    c[8] = 24;
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    p[20] = u8::from(aptpl);
    (c, p)
}

fn out(h: &mut Harness, action: u8, rtype: u8, key: u64, sa_key: u64) -> u8 {
    let (c, p) = prout(action, rtype, key, sa_key, false);
    h.run(&c, &p).status
}

fn prin(h: &mut Harness, action: u8) -> Vec<u8> {
    let d = h.run(&[0x5E, action, 0, 0, 0, 0, 0, 0x10, 0, 0], &[]);
    assert!(d.good(), "PRIN {action}: {} {:?}", d.status, d.sense);
    d.data
}

fn keys(h: &mut Harness) -> Vec<u64> {
    let d = prin(h, 0);
    let n = u32::from_be_bytes(d[4..8].try_into().unwrap()) as usize / 8;
    (0..n)
        .map(|i| u64::from_be_bytes(d[8 + 8 * i..16 + 8 * i].try_into().unwrap()))
        .collect()
}

/// (key, type) of the reservation, if any.
fn reservation(h: &mut Harness) -> Option<(u64, u8)> {
    let d = prin(h, 1);
    (u32::from_be_bytes(d[4..8].try_into().unwrap()) == 16).then(|| {
        (
            u64::from_be_bytes(d[8..16].try_into().unwrap()),
            d[21] & 0x0F,
        )
    })
}

const GOOD: u8 = status::GOOD;
const CONFLICT: u8 = status::RESERVATION_CONFLICT;

fn pair() -> (Harness, Harness) {
    let a = Harness::null(MIB).ready();
    let b = Harness::new(a.lu.clone(), nexus("iqn.2026-01.test:b", 2)).ready();
    (a, b)
}

#[test]
fn register_reserve_release_and_read_keys() {
    let (mut a, mut b) = pair();
    assert_eq!(out(&mut a, 0, 0, 0, 0xA), GOOD);
    // Wrong current key: conflict; register-and-ignore works with any.
    assert_eq!(out(&mut a, 0, 0, 0x5, 0xB), CONFLICT);
    assert_eq!(out(&mut a, 6, 0, 0x5, 0xB), GOOD);
    assert_eq!(out(&mut b, 0, 0, 0, 0xC), GOOD);
    assert_eq!(keys(&mut a), vec![0xB, 0xC]);
    let gen = u32::from_be_bytes(prin(&mut a, 0)[0..4].try_into().unwrap());
    assert_eq!(gen, 3);
    // Reserve needs registration and the right key; scope and type are checked.
    let mut c = Harness::new(a.lu.clone(), nexus("iqn.2026-01.test:c", 3)).ready();
    assert_eq!(out(&mut c, 1, 1, 0, 0), CONFLICT);
    assert_eq!(out(&mut a, 1, 1, 0xC, 0), CONFLICT);
    assert_eq!(
        a.run(
            &prout(1, 0x12, 0xB, 0, false).0,
            &prout(1, 0x12, 0xB, 0, false).1
        )
        .asc(),
        (key::ILLEGAL_REQUEST, 0x24, 0)
    );
    assert_eq!(out(&mut a, 1, 2, 0xB, 0), status::CHECK_CONDITION);
    assert_eq!(out(&mut a, 1, 1, 0xB, 0), GOOD);
    assert_eq!(out(&mut a, 1, 1, 0xB, 0), GOOD, "same reservation again");
    assert_eq!(out(&mut a, 1, 3, 0xB, 0), CONFLICT, "another type");
    assert_eq!(out(&mut b, 1, 1, 0xC, 0), CONFLICT);
    assert_eq!(reservation(&mut b), Some((0xB, 1)));
    // Release by a non-holder: no-op; wrong type by the holder: invalid release.
    assert_eq!(out(&mut b, 2, 1, 0xC, 0), GOOD);
    assert_eq!(reservation(&mut b), Some((0xB, 1)));
    let (cdb, p) = prout(2, 3, 0xB, 0, false);
    assert_eq!(a.run(&cdb, &p).asc(), (key::ILLEGAL_REQUEST, 0x26, 0x04));
    assert_eq!(out(&mut a, 2, 1, 0xB, 0), GOOD);
    assert_eq!(reservation(&mut a), None);
    // Unregister.
    assert_eq!(out(&mut b, 0, 0, 0xC, 0), GOOD);
    assert_eq!(keys(&mut a), vec![0xB]);
    // Bad parameter list length, unknown service actions.
    let (mut cdb, p) = prout(0, 0, 0xB, 0xB, false);
    cdb[8] = 20;
    assert_eq!(a.run(&cdb, &p[..20]).asc(), (key::ILLEGAL_REQUEST, 0x1A, 0));
    for sa in 4..0x20 {
        let d = a.run(&[0x5E, sa, 0, 0, 0, 0, 0, 0x10, 0, 0], &[]);
        assert_eq!(d.asc(), (key::ILLEGAL_REQUEST, 0x24, 0), "PRIN action {sa}");
    }
    let (cdb, p) = prout(7, 0, 0xB, 0, false);
    assert_eq!(a.run(&cdb, &p).asc(), (key::ILLEGAL_REQUEST, 0x24, 0));
}

/// (type, reads by a non-registered nexus, writes by one, reads by a registered
/// non-holder, writes by one).
const ACCESS: [(u8, bool, bool, bool, bool); 6] = [
    (1, true, false, true, false),
    (3, false, false, false, false),
    (5, true, false, true, true),
    (6, false, false, true, true),
    (7, true, false, true, true),
    (8, false, false, true, true),
];

#[test]
fn reservation_types_decide_access() {
    for (rtype, rd_unreg, wr_unreg, rd_reg, wr_reg) in ACCESS {
        let (mut a, mut b) = pair();
        let mut c = Harness::new(a.lu.clone(), nexus("iqn.2026-01.test:c", 3)).ready();
        assert_eq!(out(&mut a, 0, 0, 0, 1), GOOD);
        assert_eq!(out(&mut b, 0, 0, 0, 2), GOOD);
        assert_eq!(out(&mut a, 1, rtype, 1, 0), GOOD);
        let ok = |s: u8| s == GOOD;
        assert!(ok(a.run(&read10(0, 1), &[]).status));
        assert!(ok(a.run(&write10(0, 1), &[0; 512]).status));
        assert_eq!(
            ok(c.run(&read10(0, 1), &[]).status),
            rd_unreg,
            "type {rtype}"
        );
        assert_eq!(
            ok(c.run(&write10(0, 1), &[0; 512]).status),
            wr_unreg,
            "type {rtype}"
        );
        assert_eq!(ok(b.run(&read10(0, 1), &[]).status), rd_reg, "type {rtype}");
        assert_eq!(
            ok(b.run(&write10(0, 1), &[0; 512]).status),
            wr_reg,
            "type {rtype}"
        );
        // Never refused: INQUIRY, READ CAPACITY, TEST UNIT READY, PERSISTENT RESERVE IN.
        assert!(c.run(&[0x12, 0, 0, 0, 36, 0], &[]).good());
        assert!(c.run(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).good());
        assert!(c.run(&[0, 0, 0, 0, 0, 0], &[]).good());
        prin(&mut c, 0);
        // The holder unregisters: the reservation goes, except for all-registrants while
        // another registrant remains.
        assert_eq!(out(&mut a, 0, 0, 1, 0), GOOD);
        if rtype == 5 || rtype == 6 {
            assert_eq!(
                b.run(&[0, 0, 0, 0, 0, 0], &[]).asc(),
                (key::UNIT_ATTENTION, 0x2A, 0x04)
            );
        }
        let kept = reservation(&mut b).is_some();
        assert_eq!(kept, rtype == 7 || rtype == 8, "type {rtype}");
    }
}

#[test]
fn preempt_clear_and_their_unit_attentions() {
    let (mut a, mut b) = pair();
    assert_eq!(out(&mut a, 0, 0, 0, 1), GOOD);
    assert_eq!(out(&mut b, 0, 0, 0, 2), GOOD);
    assert_eq!(out(&mut b, 1, 3, 2, 0), GOOD);
    // A preempts B's reservation (B's key): B is unregistered and told.
    assert_eq!(out(&mut a, 4, 1, 1, 2), GOOD);
    assert_eq!(keys(&mut a), vec![1]);
    assert_eq!(reservation(&mut a), Some((1, 1)));
    assert_eq!(
        b.run(&[0, 0, 0, 0, 0, 0], &[]).asc(),
        (key::UNIT_ATTENTION, 0x2A, 0x05)
    );
    // Preempting a key nobody has: conflict; key 0 without all-registrants: invalid.
    assert_eq!(out(&mut a, 4, 1, 1, 9), CONFLICT);
    let (cdb, p) = prout(4, 1, 1, 0, false);
    assert_eq!(a.run(&cdb, &p).asc(), (key::ILLEGAL_REQUEST, 0x26, 0));
    // Non-holder preempt of a registration only (PREEMPT AND ABORT).
    assert_eq!(out(&mut b, 0, 0, 0, 3), GOOD);
    assert_eq!(out(&mut b, 5, 1, 3, 1), GOOD);
    assert_eq!(reservation(&mut b), Some((3, 1)));
    assert_eq!(
        a.run(&[0, 0, 0, 0, 0, 0], &[]).asc(),
        (key::UNIT_ATTENTION, 0x2A, 0x05)
    );
    // All-registrants: key 0 preempts everyone.
    assert_eq!(out(&mut a, 0, 0, 0, 1), GOOD);
    assert_eq!(out(&mut b, 2, 1, 3, 0), GOOD);
    assert_eq!(out(&mut a, 1, 7, 1, 0), GOOD);
    assert_eq!(reservation(&mut a), Some((0, 7)));
    assert_eq!(out(&mut b, 4, 8, 3, 0), GOOD);
    assert_eq!(keys(&mut b), vec![3]);
    assert_eq!(reservation(&mut b), Some((0, 8)));
    // CLEAR: everything goes, the others are told.
    assert_eq!(
        a.run(&[0, 0, 0, 0, 0, 0], &[]).asc(),
        (key::UNIT_ATTENTION, 0x2A, 0x05)
    );
    assert_eq!(out(&mut a, 0, 0, 0, 1), GOOD);
    let _ = a.run(&[0, 0, 0, 0, 0, 0], &[]);
    assert_eq!(out(&mut b, 3, 0, 3, 0), GOOD);
    assert_eq!(
        a.run(&[0, 0, 0, 0, 0, 0], &[]).asc(),
        ua::RESERVATIONS_PREEMPTED.key_asc()
    );
    assert!(keys(&mut a).is_empty());
    assert_eq!(reservation(&mut a), None);
}

#[test]
fn report_capabilities_and_full_status() {
    let (mut a, mut b) = pair();
    let d = prin(&mut a, 2);
    assert_eq!(u16::from_be_bytes([d[0], d[1]]), 8);
    assert_eq!(d[3] & 0x80, 0x80, "TMV");
    assert_eq!(d[4], 0xEA);
    assert_eq!(d[5], 0x01);
    assert_eq!(out(&mut a, 0, 0, 0, 1), GOOD);
    assert_eq!(out(&mut b, 0, 0, 0, 2), GOOD);
    assert_eq!(out(&mut a, 1, 5, 1, 0), GOOD);
    let d = prin(&mut a, 3);
    let len = u32::from_be_bytes(d[4..8].try_into().unwrap()) as usize;
    assert_eq!(len, d.len() - 8);
    let mut at = 8;
    let mut seen = vec![];
    while at < d.len() {
        let k = u64::from_be_bytes(d[at..at + 8].try_into().unwrap());
        let holder = d[at + 12] & 1 != 0;
        let tid_len = u32::from_be_bytes(d[at + 20..at + 24].try_into().unwrap()) as usize;
        let tid = &d[at + 24..at + 24 + tid_len];
        assert_eq!(tid[0], 0x45);
        assert_eq!(tid_len % 4, 0);
        seen.push((
            k,
            holder,
            String::from_utf8_lossy(&tid[4..])
                .trim_end_matches('\0')
                .to_string(),
        ));
        at += 24 + tid_len;
    }
    assert_eq!(seen[0], (1, true, a.nexus.initiator_port.to_string()));
    assert_eq!(seen[1], (2, false, b.nexus.initiator_port.to_string()));
    // Truncated READ KEYS keeps the header's full length.
    let d = a.run(&[0x5E, 0, 0, 0, 0, 0, 0, 0, 12, 0], &[]);
    assert_eq!(d.data.len(), 12);
    assert_eq!(u32::from_be_bytes(d.data[4..8].try_into().unwrap()), 16);
    // A persistent reservation makes RESERVE(6) conflict for others.
    assert_eq!(b.run(&[0x16, 0, 0, 0, 0, 0], &[]).status, CONFLICT);
}

fn open_raw(dir: &std::path::Path) -> Arc<LogicalUnit> {
    let p = dir.join("disk.img");
    if !p.exists() {
        std::fs::File::create(&p).unwrap().set_len(MIB).unwrap();
    }
    let b: Arc<dyn BlockBackend> = Arc::new(RawBackend::open(&p, false, false).unwrap());
    Arc::new(
        LogicalUnit::new(
            b,
            LuConfig {
                name: "raw0".into(),
                state_path: Some(dir.join("disk.pr")),
            },
        )
        .unwrap(),
    )
}

#[test]
fn state_survives_reopening_the_unit_with_aptpl() {
    let dir = tempfile::tempdir().unwrap();
    {
        let lu = open_raw(dir.path());
        let mut a = Harness::new(lu.clone(), nexus("iqn.2026-01.test:a", 1)).ready();
        let mut b = Harness::new(lu, nexus("iqn.2026-01.test:b", 2)).ready();
        let (c, p) = prout(0, 0, 0, 0xA1, true);
        assert!(a.run(&c, &p).good());
        // APTPL: the last REGISTER's bit counts.
        let (c, p) = prout(0, 0, 0, 0xB2, true);
        assert!(b.run(&c, &p).good());
        assert_eq!(out(&mut a, 1, 3, 0xA1, 0), GOOD);
        assert_eq!(b.run(&read10(0, 1), &[]).status, CONFLICT);
    }
    assert!(dir.path().join("disk.pr").exists());
    assert!(!dir.path().join("disk.pr.tmp").exists());
    let lu = open_raw(dir.path());
    let mut a = Harness::new(lu.clone(), nexus("iqn.2026-01.test:a", 1)).ready();
    let mut b = Harness::new(lu, nexus("iqn.2026-01.test:b", 2)).ready();
    assert_eq!(keys(&mut b), vec![0xA1, 0xB2]);
    assert_eq!(reservation(&mut b), Some((0xA1, 3)));
    assert_eq!(b.run(&read10(0, 1), &[]).status, CONFLICT);
    assert!(a.run(&read10(0, 1), &[]).good());
    let d = prin(&mut a, 2);
    assert_eq!(d[3] & 0x01, 1, "PTPL_A");
    // Registering without APTPL: the next reopen starts empty.
    assert_eq!(out(&mut a, 3, 0, 0xA1, 0), GOOD);
    assert_eq!(out(&mut a, 0, 0, 0, 0xA1), GOOD);
    drop((a, b));
    let lu = open_raw(dir.path());
    let mut a = Harness::new(lu, nexus("iqn.2026-01.test:a", 1)).ready();
    assert!(keys(&mut a).is_empty());
    let _ = write10(0, 0);
}

#[test]
fn a_corrupt_state_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("disk.pr"), b"{not json").unwrap();
    let p = dir.path().join("disk.img");
    std::fs::File::create(&p).unwrap().set_len(MIB).unwrap();
    let b: Arc<dyn BlockBackend> = Arc::new(RawBackend::open(&p, false, false).unwrap());
    let r = LogicalUnit::new(
        b,
        LuConfig {
            name: "raw0".into(),
            state_path: Some(dir.path().join("disk.pr")),
        },
    );
    assert!(matches!(r, Err(ScsiError::State { .. })));
}

mod fuzz {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// Random PERSISTENT RESERVE OUT sequences from three nexuses with keys from a small
        /// set: never a panic, and a (non all-registrants) reservation always belongs to a
        /// registered nexus.
        #[test]
        fn random_prout_sequences_keep_the_state_consistent(
            ops in proptest::collection::vec((0usize..3, 0u8..8, 0u8..10, 0u64..4, 0u64..4), 1..60)
        ) {
            let (a, b) = pair();
            let c = Harness::new(a.lu.clone(), nexus("iqn.2026-01.test:c", 3)).ready();
            let mut hs = [a, b, c];
            for (who, action, rtype, key, sa_key) in ops {
                let h = &mut hs[who];
                let (cdb, p) = prout(action, rtype, key, sa_key, false);
                let d = h.run(&cdb, &p);
                if d.status == status::CHECK_CONDITION && d.sense.unwrap().key == key::UNIT_ATTENTION {
                    continue;
                }
                let st = h.lu.lock_state();
                if let Some(r) = &st.pr.res {
                    if r.kind != 7 && r.kind != 8 {
                        prop_assert!(st.pr.regs.iter().any(|g| g.i_port == r.i_port && g.t_port == r.t_port));
                    } else {
                        prop_assert!(!st.pr.regs.is_empty());
                    }
                }
                prop_assert!(st.pr.regs.iter().all(|g| g.key != 0));
            }
        }
    }
}
