//! The steady-state iSCSI I/O path allocates nothing per command.
//!
//! A counting global allocator (dataplane's `testing::count_alloc`, installed as this test
//! binary's own) counts every allocation in the process while an initiator (written here so
//! that it allocates nothing itself once logged in) runs 4 KiB READ and WRITE commands,
//! several in flight, against a target served by a reactor: once warmed up, ten times more
//! commands must not cost more allocations (task slots keep their buffers, the send queue and
//! receive buffer are preallocated).
//!
//! Everything runs in one `#[test]` so no other test thread allocates during the counted
//! windows.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use dataplane::backend::RawBackend;
use dataplane::engine::EngineKind;
use dataplane::reactor::ReactorHandle;
use dataplane::testing::count_alloc::{allocations, CountingAlloc};
use san::scsi::{LogicalUnit, LuConfig};
use san::target::Registry;
use san::transport::IscsiServer;

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

const TARGET: &str = "iqn.2026-01.test:noalloc";
/// Commands in flight per round.
const DEPTH: u32 = 16;
const IO: usize = 4096;

/// A non-allocating initiator after login: fixed buffers only.
struct Ini {
    s: TcpStream,
    cmd_sn: u32,
    stat_sn: u32,
    itt: u32,
    data: [u8; IO],
    hdr: [u8; 48],
    rx: [u8; IO],
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Ini {
    fn login(addr: std::net::SocketAddr) -> Ini {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_nodelay(true).expect("nodelay");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let keys = format!(
            "InitiatorName=iqn.2026-01.test:i\0SessionType=Normal\0TargetName={TARGET}\0\
             ImmediateData=Yes\0InitialR2T=Yes\0HeaderDigest=None\0DataDigest=None\0\
             MaxRecvDataSegmentLength=262144\0"
        );
        let mut b = [0u8; 48];
        b[0] = 0x43;
        b[1] = 0x80 | (1 << 2) | 3;
        b[8..14].copy_from_slice(&[0x40, 0, 0, 0, 0, 9]);
        put32(&mut b, 16, 1);
        put32(&mut b, 24, 1);
        let n = keys.len();
        b[5..8].copy_from_slice(&(n as u32).to_be_bytes()[1..]);
        let mut pdu = b.to_vec();
        pdu.extend_from_slice(keys.as_bytes());
        pdu.resize(48 + n.div_ceil(4) * 4, 0);
        s.write_all(&pdu).expect("login");
        let mut ini = Ini {
            s,
            cmd_sn: 1,
            stat_sn: 0,
            itt: 1,
            data: [0x5a; IO],
            hdr: [0; 48],
            rx: [0; IO],
        };
        let len = ini.recv_hdr();
        ini.skip(len);
        assert_eq!(ini.hdr[0] & 0x3f, 0x23, "login response");
        assert_eq!((ini.hdr[36], ini.hdr[37]), (0, 0), "login succeeded");
        assert_eq!(ini.hdr[1] & 0x83, 0x83, "full feature phase");
        ini.stat_sn = be32(&ini.hdr, 24).wrapping_add(1);
        ini
    }

    /// Reads one BHS; returns its data segment length (padded).
    fn recv_hdr(&mut self) -> usize {
        self.s.read_exact(&mut self.hdr).expect("header");
        let n = u32::from_be_bytes([0, self.hdr[5], self.hdr[6], self.hdr[7]]) as usize;
        n.div_ceil(4) * 4
    }

    fn skip(&mut self, mut len: usize) {
        while len > 0 {
            let n = len.min(self.rx.len());
            self.s.read_exact(&mut self.rx[..n]).expect("data");
            len -= n;
        }
    }

    fn send_cmd(&mut self, write: bool, lba: u32) {
        let mut b = [0u8; 48];
        b[0] = 0x01;
        b[1] = 0x80 | if write { 0x20 } else { 0x40 } | 1;
        self.itt = self.itt.wrapping_add(1);
        put32(&mut b, 16, self.itt);
        put32(&mut b, 20, IO as u32);
        put32(&mut b, 24, self.cmd_sn);
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        put32(&mut b, 28, self.stat_sn);
        b[32] = if write { 0x2A } else { 0x28 };
        b[34..38].copy_from_slice(&(lba * 8).to_be_bytes());
        b[39..41].copy_from_slice(&8u16.to_be_bytes());
        if write {
            b[5..8].copy_from_slice(&(IO as u32).to_be_bytes()[1..]);
            self.s.write_all(&b).expect("cmd");
            self.s.write_all(&self.data).expect("immediate data");
        } else {
            self.s.write_all(&b).expect("cmd");
        }
    }

    /// Waits for `n` statuses (GOOD).
    fn reap(&mut self, mut n: u32) {
        while n > 0 {
            let len = self.recv_hdr();
            let op = self.hdr[0] & 0x3f;
            let status_here = op == 0x21 || (op == 0x25 && self.hdr[1] & 0x01 != 0);
            self.skip(len);
            if status_here {
                assert_eq!(self.hdr[3], 0, "GOOD");
                self.stat_sn = be32(&self.hdr, 24).wrapping_add(1);
                n -= 1;
            } else {
                assert_eq!(op, 0x25, "Data-In");
            }
        }
    }

    fn round(&mut self) {
        for k in 0..DEPTH {
            self.send_cmd(k % 2 == 0, k);
        }
        self.reap(DEPTH);
    }
}

#[test]
fn iscsi_io_path_allocates_nothing_per_command() {
    let disk = tempfile::NamedTempFile::new().expect("tempfile");
    disk.as_file().set_len(8 << 20).expect("size");
    let backend = RawBackend::open(disk.path(), false, false).expect("backend");
    let unit = LogicalUnit::new(
        Arc::new(backend),
        LuConfig {
            name: "noalloc".into(),
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
        &["127.0.0.1:0".parse().expect("addr")],
        vec![reactor.link()],
    )
    .expect("server");
    let mut ini = Ini::login(server.local_addrs()[0]);
    // The first command of a nexus meets a unit attention (power on): TEST UNIT READY
    // takes it.
    let mut tur = [0u8; 48];
    tur[0] = 0x01;
    tur[1] = 0x80;
    put32(&mut tur, 16, 1_000_000);
    put32(&mut tur, 24, ini.cmd_sn);
    ini.cmd_sn += 1;
    ini.s.write_all(&tur).expect("tur");
    let len = ini.recv_hdr();
    ini.skip(len);
    ini.stat_sn = be32(&ini.hdr, 24).wrapping_add(1);

    // Warm up: every slot the rounds use gets its buffer, every table its size.
    for _ in 0..20 {
        ini.round();
    }
    let count = |ini: &mut Ini, rounds: u32| {
        let before = allocations();
        for _ in 0..rounds {
            ini.round();
        }
        allocations() - before
    };
    let small = count(&mut ini, 10);
    let large = count(&mut ini, 100);
    eprintln!("allocations: {small} for 10 rounds, {large} for 100");
    assert!(
        large <= small + 2,
        "allocations grow with commands: {small} for 10 rounds, {large} for 100 \
         ({DEPTH} commands each)"
    );
    drop(ini);
    server.shutdown();
    reactor.shutdown();
}
