//! A small iSCSI initiator load generator (RFC 7143): one TCP connection, login without
//! authentication straight into operational negotiation (ImmediateData=Yes, InitialR2T=No
//! offered; R2T is answered if the target insists), then `qd` READ(10)/WRITE(10) commands of
//! one 4 KiB block group each in flight at random aligned LBAs, a latency histogram of
//! submit-to-status times. No allocation per I/O: PDUs are built in and read into
//! preallocated buffers; ITT = slot number.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::histogram::Histogram;

/// Basic header segment length.
const BHS: usize = 48;
/// Bytes per I/O.
pub const IO_BYTES: usize = 4096;
/// Largest data segment we accept from the target (declared in the login).
const MAX_RECV: usize = 262_144;
/// Login rounds before giving up (a target may want several to agree on the keys).
const LOGIN_ROUNDS: usize = 4;
/// Largest queue depth (slots are preallocated).
pub const MAX_QD: usize = 256;
/// Receive buffer: two of the largest PDUs we accept (header, AHS, data, padding).
const RBUF_BYTES: usize = 2 * (BHS + 1020 + MAX_RECV + 4);
/// SCSI status CHECK CONDITION.
const CHECK_CONDITION: u8 = 0x02;
/// READ CAPACITY attempts: unit attentions (power on, reset) come one per command.
const UNIT_ATTENTION_RETRIES: usize = 4;
/// Socket time-out: a target that stops answering fails the run instead of hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// READ(10).
    Read,
    /// WRITE(10).
    Write,
}

/// A logged-in session.
#[derive(Debug)]
pub struct Session {
    sock: TcpStream,
    lun: u64,
    cmd_sn: u32,
    exp_stat_sn: u32,
    max_cmd_sn: u32,
    immediate_data: bool,
    /// Logical block size and count (READ CAPACITY(10)).
    pub block_bytes: u32,
    pub blocks: u64,
    hdr: [u8; BHS],
    /// Receive buffer: PDUs are read ahead in as few syscalls as the socket allows (a
    /// blocking read per header and per data segment would double the client's cost per I/O).
    rbuf: Vec<u8>,
    /// Unparsed bytes are `rbuf[rpos..rend]`.
    rpos: usize,
    rend: usize,
    /// Where the last received PDU's data segment starts in `rbuf`.
    data_at: usize,
    tx: Vec<u8>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

impl Session {
    /// Connects and logs in as `initiator` to `target`'s `lun`.
    pub fn login(
        addr: SocketAddr,
        initiator: &str,
        target: &str,
        lun: u64,
    ) -> anyhow::Result<Self> {
        let sock = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(IO_TIMEOUT))?;
        let mut s = Session {
            sock,
            lun,
            cmd_sn: 1,
            exp_stat_sn: 0,
            max_cmd_sn: 1,
            immediate_data: false,
            block_bytes: 512,
            blocks: 0,
            hdr: [0; BHS],
            rbuf: vec![0; RBUF_BYTES],
            rpos: 0,
            rend: 0,
            data_at: 0,
            tx: vec![0; BHS + MAX_RECV],
        };
        let keys = format!(
            "InitiatorName={initiator}\0TargetName={target}\0SessionType=Normal\0\
             HeaderDigest=None\0DataDigest=None\0ImmediateData=Yes\0InitialR2T=No\0\
             MaxRecvDataSegmentLength={MAX_RECV}\0FirstBurstLength=262144\0\
             MaxBurstLength=1048576\0MaxConnections=1\0ErrorRecoveryLevel=0\0\
             DefaultTime2Wait=0\0DefaultTime2Retain=0\0MaxOutstandingR2T=1\0\
             DataPDUInOrder=Yes\0DataSequenceInOrder=Yes\0"
        );
        let mut answer = String::new();
        let mut data = keys.into_bytes();
        for _ in 0..LOGIN_ROUNDS {
            let mut h = [0u8; BHS];
            h[0] = 0x43; // Login request, immediate.
            h[1] = 0x80 | (1 << 2) | 3; // Transit, CSG operational, NSG full feature.
            h[8..14].copy_from_slice(&[0x80, 0x5a, 0x01, 0x02, 0x03, 0x04]); // ISID (random).
            put32(&mut h, 24, s.cmd_sn);
            put32(&mut h, 28, s.exp_stat_sn);
            s.send(&h, &data)?;
            let len = s.recv()?;
            if s.hdr[0] & 0x3f != 0x23 {
                bail!("login: unexpected opcode {:#x}", s.hdr[0]);
            }
            let (class, detail) = (s.hdr[36], s.hdr[37]);
            if class != 0 {
                bail!("login refused: status {class:#04x}/{detail:#04x}");
            }
            answer.push_str(&String::from_utf8_lossy(s.data(len)));
            s.exp_stat_sn = be32(&s.hdr, 24).wrapping_add(1);
            s.max_cmd_sn = be32(&s.hdr, 32);
            if s.hdr[1] & 0x80 != 0 && s.hdr[1] & 3 == 3 {
                s.immediate_data = answer.split('\0').any(|kv| kv == "ImmediateData=Yes");
                s.read_capacity()?;
                return Ok(s);
            }
            data.clear();
        }
        bail!("login did not reach full feature phase in {LOGIN_ROUNDS} rounds")
    }

    /// Sends one PDU: header and data (padded), one write.
    fn send(&mut self, h: &[u8; BHS], data: &[u8]) -> anyhow::Result<()> {
        let mut hdr = *h;
        let n = data.len();
        hdr[5..8].copy_from_slice(&u32::try_from(n)?.to_be_bytes()[1..]);
        let total = BHS + pad4(n);
        self.tx[..BHS].copy_from_slice(&hdr);
        self.tx[BHS..BHS + n].copy_from_slice(data);
        self.tx[BHS + n..total].fill(0);
        self.sock.write_all(&self.tx[..total]).context("send")?;
        Ok(())
    }

    /// Makes at least `need` unparsed bytes available in `rbuf`.
    fn fill(&mut self, need: usize) -> anyhow::Result<()> {
        if self.rend - self.rpos >= need {
            return Ok(());
        }
        if self.rpos + need > self.rbuf.len() {
            self.rbuf.copy_within(self.rpos..self.rend, 0);
            self.rend -= self.rpos;
            self.rpos = 0;
        }
        while self.rend - self.rpos < need {
            let n = self
                .sock
                .read(&mut self.rbuf[self.rend..])
                .context("recv")?;
            if n == 0 {
                bail!("the target closed the connection");
            }
            self.rend += n;
        }
        Ok(())
    }

    /// Reads one PDU: the header into `hdr`, the data left in `rbuf` (see [`Session::data`]);
    /// returns the data length.
    fn recv(&mut self) -> anyhow::Result<usize> {
        self.fill(BHS)?;
        self.hdr
            .copy_from_slice(&self.rbuf[self.rpos..self.rpos + BHS]);
        let ahs = usize::from(self.hdr[4]) * 4;
        let n = (usize::from(self.hdr[5]) << 16)
            | (usize::from(self.hdr[6]) << 8)
            | usize::from(self.hdr[7]);
        let total = BHS + ahs + pad4(n);
        if n > MAX_RECV || total > self.rbuf.len() {
            bail!("PDU data of {n} bytes exceeds {MAX_RECV}");
        }
        self.fill(total)?;
        self.data_at = self.rpos + BHS + ahs;
        self.rpos += total;
        Ok(n)
    }

    /// The last received PDU's first `n` data bytes (valid until the next receive).
    fn data(&self, n: usize) -> &[u8] {
        &self.rbuf[self.data_at..self.data_at + n]
    }

    /// A SCSI command header for slot `itt`.
    fn command(&mut self, itt: u32, cdb: &[u8], read: bool, edtl: u32) -> [u8; BHS] {
        let mut h = [0u8; BHS];
        h[0] = 0x01;
        h[1] = 0x80 | if read { 0x40 } else { 0x20 } | 1;
        h[8..16].copy_from_slice(&lun_field(self.lun));
        put32(&mut h, 16, itt);
        put32(&mut h, 20, edtl);
        put32(&mut h, 24, self.cmd_sn);
        put32(&mut h, 28, self.exp_stat_sn);
        h[32..32 + cdb.len()].copy_from_slice(cdb);
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        h
    }

    /// READ CAPACITY(10), retried past the unit attentions a fresh nexus may report first
    /// (power on, reset: CHECK CONDITION on the first commands).
    fn read_capacity(&mut self) -> anyhow::Result<()> {
        let mut last = None;
        for _ in 0..UNIT_ATTENTION_RETRIES {
            match self.read_capacity_once() {
                Ok(()) => return Ok(()),
                Err(e) if self.hdr[3] == CHECK_CONDITION => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("READ CAPACITY failed")))
    }

    fn read_capacity_once(&mut self) -> anyhow::Result<()> {
        let cdb = [0x25u8, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let h = self.command(0, &cdb, true, 8);
        self.send(&h, &[])?;
        let mut cap = [0u8; 8];
        loop {
            let n = self.recv()?;
            match self.hdr[0] & 0x3f {
                0x25 => {
                    let k = n.min(8);
                    cap[..k].copy_from_slice(self.data(k));
                    if self.hdr[1] & 1 != 0 {
                        self.note_status()?;
                        break;
                    }
                }
                0x21 => {
                    self.note_status()?;
                    break;
                }
                0x20 => self.answer_nop()?,
                op => bail!("READ CAPACITY: unexpected opcode {op:#x}"),
            }
        }
        self.blocks = u64::from(be32(&cap, 0)) + 1;
        self.block_bytes = be32(&cap, 4);
        if self.block_bytes == 0 || !IO_BYTES.is_multiple_of(self.block_bytes as usize) {
            bail!("block size {} does not divide {IO_BYTES}", self.block_bytes);
        }
        Ok(())
    }

    /// StatSN/MaxCmdSN bookkeeping of a status-carrying PDU; errors on a non-GOOD status.
    fn note_status(&mut self) -> anyhow::Result<()> {
        self.exp_stat_sn = be32(&self.hdr, 24).wrapping_add(1);
        self.max_cmd_sn = be32(&self.hdr, 32);
        let status = self.hdr[3];
        if self.hdr[0] & 0x3f == 0x21 && (self.hdr[2] != 0 || status != 0) {
            bail!(
                "command failed: response {:#x} status {status:#x}",
                self.hdr[2]
            );
        }
        if status != 0 {
            bail!("command failed: status {status:#x}");
        }
        Ok(())
    }

    /// ExpCmdSN/MaxCmdSN of a target PDU that carries them (Data-In, R2T, NOP-In).
    fn note_window(&mut self) {
        self.max_cmd_sn = be32(&self.hdr, 32);
    }

    /// Whether the next CmdSN is inside the target's window (serial arithmetic, RFC 1982).
    fn window_open(&self) -> bool {
        self.max_cmd_sn.wrapping_sub(self.cmd_sn) < 1 << 31
    }

    fn answer_nop(&mut self) -> anyhow::Result<()> {
        let ttt = be32(&self.hdr, 20);
        if ttt == 0xffff_ffff {
            return Ok(());
        }
        let mut h = [0u8; BHS];
        h[0] = 0x40; // NOP-Out, immediate.
        h[1] = 0x80;
        h[8..16].copy_from_slice(&self.hdr[8..16]);
        put32(&mut h, 16, 0xffff_ffff);
        put32(&mut h, 20, ttt);
        put32(&mut h, 24, self.cmd_sn);
        put32(&mut h, 28, self.exp_stat_sn);
        self.send(&h, &[])
    }
}

fn lun_field(lun: u64) -> [u8; 8] {
    let mut f = [0u8; 8];
    if lun < 256 {
        f[1] = lun as u8;
    } else {
        f[0] = 0x40 | ((lun >> 8) as u8 & 0x3f);
        f[1] = lun as u8;
    }
    f
}

/// What one run measured.
#[derive(Debug, Clone, Copy)]
pub struct LoadResult {
    /// Completed I/Os in the measured interval.
    pub ios: u64,
    /// The measured interval.
    pub elapsed: Duration,
}

/// One run's workload.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// Reads or writes.
    pub op: Op,
    /// Commands in flight.
    pub qd: usize,
    /// Unmeasured lead-in.
    pub warmup: Duration,
    /// Measured interval.
    pub seconds: Duration,
    /// Seed of the LBA generator.
    pub seed: u64,
}

/// Runs `w` on `s`, recording latencies of the measured part into `hist`; `at_start` is called
/// when the measured part begins (CPU meters).
pub fn run(
    s: &mut Session,
    w: &Workload,
    hist: &mut Histogram,
    mut at_start: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<LoadResult> {
    let Workload {
        op,
        qd,
        warmup,
        seconds,
        seed,
    } = *w;
    if qd == 0 || qd > MAX_QD {
        bail!("qd must be in 1..={MAX_QD}");
    }
    let per_io = (IO_BYTES as u32 / s.block_bytes) as u64;
    let groups = s.blocks / per_io;
    if groups == 0 {
        bail!("LUN smaller than one I/O");
    }
    let payload = vec![0xa5u8; IO_BYTES];
    let mut started = [Instant::now(); MAX_QD];
    let mut rng = seed | 1;
    let next_lba = |rng: &mut u64| {
        // xorshift64: cheap, allocation-free offsets.
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        (*rng % groups) * per_io
    };
    let read = op == Op::Read;
    let submit = |s: &mut Session,
                  slot: u32,
                  lba: u64,
                  started: &mut [Instant; MAX_QD]|
     -> anyhow::Result<()> {
        let mut cdb = [0u8; 10];
        cdb[0] = if read { 0x28 } else { 0x2a };
        cdb[2..6].copy_from_slice(&u32::try_from(lba)?.to_be_bytes());
        cdb[7..9].copy_from_slice(&u16::try_from(per_io)?.to_be_bytes());
        let h = s.command(slot, &cdb, read, IO_BYTES as u32);
        started[slot as usize] = Instant::now();
        if read || !s.immediate_data {
            s.send(&h, &[])
        } else {
            s.send(&h, &payload)
        }
    };
    // Slots waiting for the target's CmdSN window (MaxCmdSN) to open.
    let mut deferred = [0u32; MAX_QD];
    let mut n_deferred = 0usize;
    for slot in 0..qd as u32 {
        deferred[n_deferred] = slot;
        n_deferred += 1;
    }
    let t0 = Instant::now();
    let mut measuring = false;
    let mut m0 = t0;
    let mut ios = 0u64;
    loop {
        while n_deferred > 0 && s.window_open() {
            n_deferred -= 1;
            let lba = next_lba(&mut rng);
            submit(s, deferred[n_deferred], lba, &mut started)?;
        }
        let now = Instant::now();
        if !measuring && now.duration_since(t0) >= warmup {
            measuring = true;
            m0 = now;
            at_start()?;
        }
        if measuring && now.duration_since(m0) >= seconds {
            break;
        }
        let n = s.recv()?;
        let itt = be32(&s.hdr, 16);
        let done = match s.hdr[0] & 0x3f {
            0x25 => {
                s.note_window();
                if s.hdr[1] & 1 != 0 {
                    s.note_status()?;
                    true
                } else {
                    false
                }
            }
            0x21 => {
                s.note_status()?;
                true
            }
            0x31 => {
                s.note_window();
                // R2T: send the requested range as one Data-Out.
                let ttt = be32(&s.hdr, 20);
                let offset = (be32(&s.hdr, 40) as usize).min(IO_BYTES);
                let len = (be32(&s.hdr, 44) as usize).min(IO_BYTES - offset);
                let mut h = [0u8; BHS];
                h[0] = 0x05;
                h[1] = 0x80;
                h[8..16].copy_from_slice(&lun_field(s.lun));
                put32(&mut h, 16, itt);
                put32(&mut h, 20, ttt);
                put32(&mut h, 28, s.exp_stat_sn);
                put32(&mut h, 40, u32::try_from(offset)?);
                s.send(&h, &payload[offset..offset + len])?;
                false
            }
            0x20 => {
                s.note_window();
                s.answer_nop()?;
                false
            }
            0x3f => bail!("target sent Reject (reason {:#x})", s.hdr[2]),
            op => bail!("unexpected opcode {op:#x} ({n} data bytes)"),
        };
        if !done {
            continue;
        }
        let slot = itt as usize;
        if slot >= qd {
            bail!("completion for unknown ITT {itt}");
        }
        if measuring {
            let ns = started[slot].elapsed().as_nanos();
            hist.record(u64::try_from(ns).unwrap_or(u64::MAX));
            ios += 1;
        }
        deferred[n_deferred] = itt;
        n_deferred += 1;
    }
    let elapsed = m0.elapsed();
    Ok(LoadResult { ios, elapsed })
}
