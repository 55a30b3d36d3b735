//! A small blocking iSCSI initiator for the transport's tests: login (operational stage
//! only, no authentication), SCSI commands with immediate data, Data-Out answering R2Ts,
//! Data-In collection, NOP-Out, task management, logout, raw PDUs for hostile input.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::iscsi::pdu::{crc32c, pad_len, put_digest, BHS_LEN};

/// One PDU received.
#[derive(Debug, Clone)]
pub struct Pdu {
    pub bhs: [u8; BHS_LEN],
    pub data: Vec<u8>,
}

impl Pdu {
    pub fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3f
    }
    pub fn flags(&self) -> u8 {
        self.bhs[1]
    }
    pub fn u32_at(&self, at: usize) -> u32 {
        u32::from_be_bytes([
            self.bhs[at],
            self.bhs[at + 1],
            self.bhs[at + 2],
            self.bhs[at + 3],
        ])
    }
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }
    pub fn ttt(&self) -> u32 {
        self.u32_at(20)
    }
    pub fn stat_sn(&self) -> u32 {
        self.u32_at(24)
    }
    pub fn max_cmd_sn(&self) -> u32 {
        self.u32_at(32)
    }
    pub fn residual(&self) -> u32 {
        self.u32_at(44)
    }
}

/// Result of one SCSI command.
#[derive(Debug, Default)]
pub struct CmdResult {
    pub status: u8,
    pub response: u8,
    pub flags: u8,
    pub residual: u32,
    pub data: Vec<u8>,
    pub sense: Vec<u8>,
    pub r2ts: u32,
}

/// A connection of the test initiator.
pub struct Initiator {
    pub sock: TcpStream,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub itt: u32,
    pub header_digest: bool,
    pub data_digest: bool,
    /// Target's MaxRecvDataSegmentLength (bounds what we send).
    pub target_mrdsl: u32,
    pub first_burst: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub max_cmd_sn: u32,
    /// Last byte of the ISID (several sessions from one initiator).
    pub isid_variant: u8,
}

pub const INITIATOR: &str = "iqn.2026-01.test:initiator";

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// Login keys for a normal session to `target` (None: discovery).
pub fn login_keys(target: Option<&str>, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut keys: Vec<(String, String)> = vec![("InitiatorName".into(), INITIATOR.into())];
    match target {
        Some(t) => {
            keys.push(("SessionType".into(), "Normal".into()));
            keys.push(("TargetName".into(), t.into()));
        }
        None => keys.push(("SessionType".into(), "Discovery".into())),
    }
    for (k, v) in extra {
        keys.push(((*k).into(), (*v).into()));
    }
    let mut out = Vec::new();
    for (k, v) in keys {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

fn key<'a>(text: &'a [u8], k: &str) -> Option<&'a str> {
    text.split(|&b| b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix(k).and_then(|r| r.strip_prefix('=')))
}

impl Initiator {
    pub fn connect(addr: SocketAddr) -> Self {
        let sock = TcpStream::connect(addr).expect("connect");
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        sock.set_nodelay(true).expect("nodelay");
        Initiator {
            sock,
            cmd_sn: 1,
            exp_stat_sn: 0,
            itt: 1,
            header_digest: false,
            data_digest: false,
            target_mrdsl: 8192,
            first_burst: 65536,
            immediate_data: true,
            initial_r2t: true,
            max_cmd_sn: 1,
            isid_variant: 0,
        }
    }

    /// Sends a PDU (BHS with its data length filled in, data, padding, digests as set).
    pub fn send(&mut self, mut bhs: [u8; BHS_LEN], data: &[u8]) {
        let n = data.len() as u32;
        bhs[5..8].copy_from_slice(&n.to_be_bytes()[1..]);
        let mut out = bhs.to_vec();
        if self.header_digest {
            out.extend_from_slice(&put_digest(crc32c(&[&bhs])));
        }
        if !data.is_empty() {
            out.extend_from_slice(data);
            let pad = [0u8; 3];
            out.extend_from_slice(&pad[..pad_len(data.len())]);
            if self.data_digest {
                out.extend_from_slice(&put_digest(crc32c(&[data, &pad[..pad_len(data.len())]])));
            }
        }
        self.sock.write_all(&out).expect("send");
    }

    /// Receives one PDU.
    pub fn recv(&mut self) -> Pdu {
        self.try_recv().expect("receive PDU")
    }

    pub fn try_recv(&mut self) -> std::io::Result<Pdu> {
        let mut bhs = [0u8; BHS_LEN];
        self.sock.read_exact(&mut bhs)?;
        if self.header_digest {
            let mut d = [0u8; 4];
            self.sock.read_exact(&mut d)?;
            assert_eq!(d, put_digest(crc32c(&[&bhs])), "header digest");
        }
        let ahs = usize::from(bhs[4]) * 4;
        let mut skip = vec![0u8; ahs];
        self.sock.read_exact(&mut skip)?;
        let len = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]) as usize;
        let mut data = vec![0u8; len + pad_len(len)];
        self.sock.read_exact(&mut data)?;
        if self.data_digest && len > 0 {
            let mut d = [0u8; 4];
            self.sock.read_exact(&mut d)?;
            assert_eq!(d, put_digest(crc32c(&[&data])), "data digest");
        }
        data.truncate(len);
        let p = Pdu { bhs, data };
        // Track StatSN for PDUs carrying status.
        if matches!(p.opcode(), 0x21 | 0x22 | 0x24 | 0x26 | 0x32 | 0x3f)
            || (p.opcode() == 0x25 && p.flags() & 0x01 != 0)
            || (p.opcode() == 0x20 && p.itt() != 0xffff_ffff)
        {
            self.exp_stat_sn = p.stat_sn().wrapping_add(1);
        }
        if matches!(p.opcode(), 0x20..=0x26 | 0x31 | 0x32 | 0x3f) {
            self.max_cmd_sn = p.max_cmd_sn();
        }
        Ok(p)
    }

    fn next_itt(&mut self) -> u32 {
        self.itt += 1;
        self.itt
    }

    /// A request header: byte 0 (opcode, with the I bit), byte 1 (flags), a fresh ITT (also
    /// returned), CmdSN and ExpStatSN.
    fn request(&mut self, op: u8, flags: u8) -> ([u8; BHS_LEN], u32) {
        let mut b = [0u8; BHS_LEN];
        b[0] = op;
        b[1] = flags;
        let itt = self.next_itt();
        put32(&mut b, 16, itt);
        put32(&mut b, 24, self.cmd_sn);
        put32(&mut b, 28, self.exp_stat_sn);
        (b, itt)
    }

    /// Logs in (operational stage straight to full feature); returns the final response's
    /// status (class << 8 | detail) and the negotiated keys.
    pub fn login(&mut self, target: Option<&str>, extra: &[(&str, &str)]) -> (u16, Vec<u8>) {
        let mut text = login_keys(target, extra);
        let itt = self.next_itt();
        let mut all = Vec::new();
        for round in 0..4 {
            let mut b = [0u8; BHS_LEN];
            b[0] = 0x43; // Login, immediate
            b[1] = 0x80 | (1 << 2) | 3; // T, CSG=1, NSG=3
            b[8..14].copy_from_slice(&[0x40, 0, 0, 0x12, 0x34, self.isid_variant]);
            put32(&mut b, 16, itt);
            put32(&mut b, 24, self.cmd_sn);
            put32(&mut b, 28, self.exp_stat_sn);
            self.send(b, &text);
            let r = self.recv();
            assert_eq!(r.opcode(), 0x23, "login response");
            let status = u16::from(r.bhs[36]) << 8 | u16::from(r.bhs[37]);
            all.extend_from_slice(&r.data);
            self.exp_stat_sn = r.stat_sn().wrapping_add(1);
            self.max_cmd_sn = r.max_cmd_sn();
            if status != 0 {
                return (status, all);
            }
            if r.flags() & 0x80 != 0 && r.flags() & 3 == 3 {
                if let Some(v) = key(&all, "MaxRecvDataSegmentLength") {
                    self.target_mrdsl = v.parse().unwrap_or(8192);
                }
                if let Some(v) = key(&all, "FirstBurstLength") {
                    self.first_burst = v.parse().unwrap_or(65536);
                }
                if let Some(v) = key(&all, "ImmediateData") {
                    self.immediate_data = v == "Yes";
                }
                if let Some(v) = key(&all, "InitialR2T") {
                    self.initial_r2t = v == "Yes";
                }
                self.header_digest = key(&all, "HeaderDigest") == Some("CRC32C");
                self.data_digest = key(&all, "DataDigest") == Some("CRC32C");
                return (0, all);
            }
            // The target wants another round (it proposed keys): answer with nothing new.
            assert!(round < 3, "login does not converge");
            text = Vec::new();
        }
        (0xffff, all)
    }

    /// A SCSI Command BHS.
    pub fn cmd_bhs(
        &mut self,
        lun: u64,
        cdb: &[u8],
        edtl: u32,
        read: bool,
        write: bool,
    ) -> [u8; BHS_LEN] {
        let flags = 0x80 | if read { 0x40 } else { 0 } | if write { 0x20 } else { 0 } | 1;
        let (mut b, _) = self.request(0x01, flags);
        b[8..16].copy_from_slice(&lun.to_be_bytes());
        put32(&mut b, 20, edtl);
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        b[32..32 + cdb.len()].copy_from_slice(cdb);
        b
    }

    /// Runs one command to completion: immediate data as allowed, then Data-Out for every
    /// R2T; collects Data-In.
    pub fn command(&mut self, lun: u64, cdb: &[u8], out: &[u8], edtl_in: u32) -> CmdResult {
        let write = !out.is_empty();
        let edtl = if write { out.len() as u32 } else { edtl_in };
        let mut b = self.cmd_bhs(lun, cdb, edtl, !write && edtl > 0, write);
        let itt = u32::from_be_bytes([b[16], b[17], b[18], b[19]]);
        let imm = if write && self.immediate_data {
            out.len()
                .min(self.first_burst as usize)
                .min(self.target_mrdsl as usize)
        } else {
            0
        };
        let mut unsol_end = imm;
        if write && !self.initial_r2t {
            unsol_end = out.len().min(self.first_burst as usize);
        }
        if unsol_end > imm {
            b[1] &= !0x80; // unsolicited Data-Out follows
        }
        self.send(b, &out[..imm]);
        if unsol_end > imm {
            self.data_out(itt, 0xffff_ffff, out, imm, unsol_end - imm);
        }
        let mut res = CmdResult::default();
        loop {
            let p = self.recv();
            match p.opcode() {
                0x31 => {
                    assert_eq!(p.itt(), itt);
                    res.r2ts += 1;
                    let off = p.u32_at(40) as usize;
                    let len = p.u32_at(44) as usize;
                    self.data_out(itt, p.ttt(), out, off, len);
                }
                0x25 => {
                    assert_eq!(p.itt(), itt);
                    let off = p.u32_at(40) as usize;
                    if res.data.len() < off + p.data.len() {
                        res.data.resize(off + p.data.len(), 0);
                    }
                    res.data[off..off + p.data.len()].copy_from_slice(&p.data);
                    if p.flags() & 0x01 != 0 {
                        res.status = p.bhs[3];
                        res.flags = p.flags();
                        res.residual = p.residual();
                        return res;
                    }
                }
                0x21 => {
                    assert_eq!(p.itt(), itt);
                    res.status = p.bhs[3];
                    res.response = p.bhs[2];
                    res.flags = p.flags();
                    res.residual = p.residual();
                    if p.data.len() >= 2 {
                        let n = usize::from(u16::from_be_bytes([p.data[0], p.data[1]]));
                        res.sense = p.data[2..2 + n.min(p.data.len() - 2)].to_vec();
                    }
                    return res;
                }
                op => panic!("unexpected PDU {op:#x} during a command"),
            }
        }
    }

    /// Sends `len` bytes of `buf` from `off` as Data-Out PDUs of the target's segment size.
    pub fn data_out(&mut self, itt: u32, ttt: u32, buf: &[u8], off: usize, len: usize) {
        let seg = self.target_mrdsl as usize;
        let mut at = off;
        let mut sn = 0;
        while at < off + len {
            let n = seg.min(off + len - at);
            let mut b = [0u8; BHS_LEN];
            b[0] = 0x05;
            b[1] = if at + n == off + len { 0x80 } else { 0 };
            put32(&mut b, 16, itt);
            put32(&mut b, 20, ttt);
            put32(&mut b, 28, self.exp_stat_sn);
            put32(&mut b, 36, sn);
            put32(&mut b, 40, at as u32);
            self.send(b, &buf[at..at + n]);
            at += n;
            sn += 1;
        }
    }

    /// NOP-Out ping with data; returns the NOP-In.
    pub fn nop(&mut self, data: &[u8]) -> Pdu {
        let (mut b, itt) = self.request(0x40, 0x80); // immediate NOP-Out
        put32(&mut b, 20, 0xffff_ffff);
        self.send(b, data);
        let p = self.recv();
        assert_eq!(p.opcode(), 0x20);
        assert_eq!(p.itt(), itt);
        p
    }

    /// Logout (close the session); returns the response code.
    pub fn logout(&mut self) -> u8 {
        let (b, _) = self.request(0x46, 0x80);
        self.send(b, &[]);
        let p = self.recv();
        assert_eq!(p.opcode(), 0x26);
        p.bhs[2]
    }

    /// Text request (SendTargets=All); returns the answer's text.
    pub fn send_targets(&mut self) -> Vec<u8> {
        let (mut b, _) = self.request(0x44, 0x80);
        put32(&mut b, 20, 0xffff_ffff);
        self.send(b, b"SendTargets=All\0");
        let p = self.recv();
        assert_eq!(p.opcode(), 0x24);
        p.data
    }

    /// Task management request; returns the response code.
    pub fn tmf(&mut self, function: u8, lun: u64, rtt: u32) -> u8 {
        let (mut b, _) = self.request(0x42, 0x80 | function);
        b[8..16].copy_from_slice(&lun.to_be_bytes());
        put32(&mut b, 20, rtt);
        self.send(b, &[]);
        let p = self.recv();
        assert_eq!(p.opcode(), 0x22);
        p.bhs[2]
    }
}
