//! Commands the unit answers from what it knows, without the backend: INQUIRY and its VPD
//! pages, READ CAPACITY, REQUEST SENSE, REPORT SUPPORTED OPERATION CODES, GET LBA STATUS,
//! READ DEFECT DATA, REPORT LUNS and the answers for a LUN the target does not have. Each writes its parameter
//! data into the task buffer, cut to the allocation length.

use super::cdb::{op, Geometry, MAX_UNMAP_BLOCKS, MAX_UNMAP_DESCRIPTORS, MAX_WRITE_SAME_BLOCKS};
use super::io::{check, good};
use super::sense::{Sense, FIXED_SENSE_LEN};
use super::{Nexus, Outcome, MAX_TRANSFER_BYTES};

/// Vendor identification (8 ASCII bytes).
pub(crate) const VENDOR: &[u8; 8] = b"STRATA  ";
/// Product identification (16 ASCII bytes).
const PRODUCT: &[u8; 16] = b"VIRTUAL DISK    ";
/// Product revision (4 ASCII bytes).
const REVISION: &[u8; 4] = b"0001";
/// Bytes of standard INQUIRY data.
const STD_INQUIRY_LEN: usize = 96;
/// Preferred I/O size reported in the Block Limits VPD page.
const OPTIMAL_TRANSFER_BYTES: u32 = 128 * 1024;
/// Physical block size the granularities are reported in (4 KiB pages of the backing files).
const PHYSICAL_BLOCK: u32 = 4096;

/// What the unit says about itself.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    /// Unit serial number (ASCII, 16 hex digits).
    pub serial: String,
    /// NAA locally assigned identifier (NAA 3).
    pub naa: u64,
    /// DISCARD/WRITE ZEROES available: thin provisioning pages and UNMAP are offered.
    pub thin: bool,
    /// Deallocated (unmapped) blocks read as zeroes (LBPRZ).
    pub lbprz: bool,
}

impl Identity {
    /// The identity of the unit called `name` (stable: derived from the name).
    pub(crate) fn new(name: &str, thin: bool, lbprz: bool) -> Self {
        // FNV-1a 64: stable across builds and platforms.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        Identity {
            serial: format!("{h:016x}"),
            naa: (0x3 << 60) | (h & 0x0FFF_FFFF_FFFF_FFFF),
            thin,
            lbprz: thin && lbprz,
        }
    }
}

/// Puts `data` (cut to `alloc`) into `buf`; the Data-In length.
pub(crate) fn reply(buf: &mut Vec<u8>, alloc: u32) -> Outcome {
    buf.truncate(alloc as usize);
    good(buf.len() as u32)
}

/// Standard INQUIRY data for a unit (`present`) or peripheral qualifier 3 (no unit).
fn standard_inquiry(buf: &mut Vec<u8>, present: bool) {
    buf.clear();
    buf.resize(STD_INQUIRY_LEN, 0);
    buf[0] = if present { 0x00 } else { 0x7F };
    buf[2] = 0x06; // SPC-4
    buf[3] = 0x12; // HISUP, response data format 2
    buf[4] = (STD_INQUIRY_LEN - 5) as u8;
    buf[7] = 0x02; // CMDQUE
    buf[8..16].copy_from_slice(VENDOR);
    buf[16..32].copy_from_slice(PRODUCT);
    buf[32..36].copy_from_slice(REVISION);
    // Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
    for (i, v) in [0x00A0u16, 0x0960, 0x0460, 0x04C0].iter().enumerate() {
        buf[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
    }
}

/// VPD pages served, in ascending order.
const VPD_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2];

/// INQUIRY.
pub(crate) fn inquiry(
    id: &Identity,
    g: &Geometry,
    nexus: &Nexus,
    evpd: bool,
    page: u8,
    alloc: u32,
    buf: &mut Vec<u8>,
) -> Outcome {
    if !evpd {
        standard_inquiry(buf, true);
        return reply(buf, alloc);
    }
    buf.clear();
    buf.extend_from_slice(&[0x00, page, 0, 0]);
    let bs = g.block_size;
    let per_phys = (PHYSICAL_BLOCK / bs).max(1);
    match page {
        0x00 => buf.extend_from_slice(&VPD_PAGES),
        0x80 => buf.extend_from_slice(id.serial.as_bytes()),
        0x83 => {
            // NAA, binary, associated with the unit.
            buf.extend_from_slice(&[0x01, 0x03, 0x00, 0x08]);
            buf.extend_from_slice(&id.naa.to_be_bytes());
            // T10 vendor ID, ASCII: vendor + serial.
            buf.extend_from_slice(&[0x02, 0x01, 0x00, (8 + id.serial.len()) as u8]);
            buf.extend_from_slice(VENDOR);
            buf.extend_from_slice(id.serial.as_bytes());
            // Relative target port (iSCSI, PIV, target port association).
            buf.extend_from_slice(&[0x51, 0x94, 0x00, 0x04, 0, 0]);
            buf.extend_from_slice(&nexus.relative_port.to_be_bytes());
            // SCSI name string of the target port (UTF-8, NUL-terminated, padded to 4).
            let name = nexus.target_port.as_bytes();
            let name = &name[..name.len().min(251)];
            let padded = (name.len() + 1).div_ceil(4) * 4;
            buf.extend_from_slice(&[0x53, 0x98, 0x00, padded as u8]);
            buf.extend_from_slice(name);
            buf.resize(buf.len() + padded - name.len(), 0);
        }
        0xB0 => {
            buf.resize(64, 0);
            buf[4] = 0x01; // WSNZ: WRITE SAME with 0 blocks is refused (see cdb.rs)
            buf[5] = g.max_caw_blocks() as u8;
            buf[6..8].copy_from_slice(&(per_phys as u16).to_be_bytes());
            buf[8..12].copy_from_slice(&(MAX_TRANSFER_BYTES / bs).to_be_bytes());
            buf[12..16].copy_from_slice(&(OPTIMAL_TRANSFER_BYTES / bs).to_be_bytes());
            if id.thin {
                buf[20..24].copy_from_slice(&(MAX_UNMAP_BLOCKS as u32).to_be_bytes());
                buf[24..28].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
                buf[28..32].copy_from_slice(&per_phys.to_be_bytes());
            }
            buf[36..44].copy_from_slice(&MAX_WRITE_SAME_BLOCKS.to_be_bytes());
        }
        0xB1 => {
            buf.resize(64, 0);
            buf[4..6].copy_from_slice(&1u16.to_be_bytes()); // non-rotating medium
        }
        0xB2 => {
            buf.resize(8, 0);
            if id.thin {
                // LBPU, LBPWS, LBPWS10; LBPRZ when the backend's deallocation reads back as
                // zeroes.
                buf[5] = 0x80 | 0x40 | 0x20 | if id.lbprz { 0x04 } else { 0 };
                buf[6] = 0x02; // provisioning type: thin
            }
        }
        _ => return check(Sense::invalid_field_in_cdb()),
    }
    let len = (buf.len() - 4) as u16;
    buf[2..4].copy_from_slice(&len.to_be_bytes());
    reply(buf, alloc)
}

/// READ CAPACITY (10).
pub(crate) fn read_capacity10(g: &Geometry, buf: &mut Vec<u8>) -> Outcome {
    buf.clear();
    let last = g.blocks.saturating_sub(1).min(u64::from(u32::MAX)) as u32;
    buf.extend_from_slice(&last.to_be_bytes());
    buf.extend_from_slice(&g.block_size.to_be_bytes());
    good(8)
}

/// READ CAPACITY (16).
pub(crate) fn read_capacity16(
    id: &Identity,
    g: &Geometry,
    alloc: u32,
    buf: &mut Vec<u8>,
) -> Outcome {
    buf.clear();
    buf.resize(32, 0);
    buf[0..8].copy_from_slice(&g.blocks.saturating_sub(1).to_be_bytes());
    buf[8..12].copy_from_slice(&g.block_size.to_be_bytes());
    // LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT stays 0 although the backing files' pages
    // are 4 KiB (the Block Limits VPD's granularities say so): with it above 0, libiscsi's
    // GetLBAStatus.UnmapSingle expects the first descriptor to start past the requested
    // LBA, which SBC-4 forbids (it must contain that LBA).
    if id.thin {
        buf[14] = 0x80 | if id.lbprz { 0x40 } else { 0 }; // LBPME, LBPRZ
    }
    reply(buf, alloc)
}

/// REQUEST SENSE data for `sense` (fixed or descriptor format).
pub(crate) fn request_sense(sense: Sense, desc: bool, alloc: u32, buf: &mut Vec<u8>) -> Outcome {
    buf.clear();
    if desc {
        buf.extend_from_slice(&[0x72, sense.key & 0x0F, sense.asc, sense.ascq, 0, 0, 0, 0]);
        if let Some(info) = sense.info {
            buf.extend_from_slice(&[0x00, 0x0A, 0x80, 0]);
            buf.extend_from_slice(&info.to_be_bytes());
        }
        if let Some(byte) = sense.field {
            // Sense-key specific descriptor: SKSV, C/D, FIELD POINTER.
            let [hi, lo] = byte.to_be_bytes();
            buf.extend_from_slice(&[0x02, 0x06, 0, 0, 0xC0, hi, lo, 0]);
        }
        buf[7] = (buf.len() - 8) as u8;
    } else {
        let mut fixed = [0u8; FIXED_SENSE_LEN];
        sense.write_fixed(&mut fixed);
        buf.extend_from_slice(&fixed);
    }
    reply(buf, alloc)
}

/// GET LBA STATUS: the backend cannot tell allocated from deallocated blocks, so everything
/// from `lba` to the end is reported mapped (one descriptor).
pub(crate) fn get_lba_status(g: &Geometry, lba: u64, alloc: u32, buf: &mut Vec<u8>) -> Outcome {
    buf.clear();
    buf.extend_from_slice(&20u32.to_be_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&lba.to_be_bytes());
    let count = (g.blocks - lba).min(u64::from(u32::MAX)) as u32;
    buf.extend_from_slice(&count.to_be_bytes());
    buf.extend_from_slice(&[0x00, 0, 0, 0]);
    reply(buf, alloc)
}

/// READ DEFECT DATA (10 or 12): the header of the lists asked for, with no defects — the
/// unit is a file on a host's storage, which hides its media defects (PLISTV and GLISTV say
/// the empty lists are valid).
pub(crate) fn read_defects(
    twelve: bool,
    plist: bool,
    glist: bool,
    format: u8,
    alloc: u32,
    buf: &mut Vec<u8>,
) -> Outcome {
    buf.clear();
    let flags = u8::from(plist) << 4 | u8::from(glist) << 3 | format;
    buf.extend_from_slice(&[0, flags, 0, 0]);
    if twelve {
        // GENERATION CODE 0 (above), DEFECT LIST LENGTH 0.
        buf.extend_from_slice(&[0; 4]);
    }
    reply(buf, alloc)
}

/// One supported command: opcode, service action (if it has them), CDB length.
struct Supported {
    opcode: u8,
    sa: Option<u8>,
    len: u8,
}

const fn cmd(opcode: u8, len: u8) -> Supported {
    Supported {
        opcode,
        sa: None,
        len,
    }
}

const fn cmd_sa(opcode: u8, sa: u8, len: u8) -> Supported {
    Supported {
        opcode,
        sa: Some(sa),
        len,
    }
}

/// Commands REPORT SUPPORTED OPERATION CODES lists (UNMAP and WRITE SAME's only on thin
/// units — see `supported`).
const SUPPORTED: &[Supported] = &[
    cmd(op::TEST_UNIT_READY, 6),
    cmd(op::REQUEST_SENSE, 6),
    cmd(op::READ_6, 6),
    cmd(op::WRITE_6, 6),
    cmd(op::INQUIRY, 6),
    cmd(op::MODE_SELECT_6, 6),
    cmd(op::RESERVE_6, 6),
    cmd(op::RELEASE_6, 6),
    cmd(op::MODE_SENSE_6, 6),
    cmd(op::START_STOP_UNIT, 6),
    cmd(op::READ_CAPACITY_10, 10),
    cmd(op::READ_10, 10),
    cmd(op::WRITE_10, 10),
    cmd(op::WRITE_AND_VERIFY_10, 10),
    cmd(op::VERIFY_10, 10),
    cmd(op::PRE_FETCH_10, 10),
    cmd(op::READ_DEFECT_DATA_10, 10),
    cmd(op::SYNCHRONIZE_CACHE_10, 10),
    cmd(op::WRITE_SAME_10, 10),
    cmd(op::UNMAP, 10),
    cmd(op::MODE_SELECT_10, 10),
    cmd(op::MODE_SENSE_10, 10),
    cmd_sa(op::PERSISTENT_RESERVE_IN, 0, 10),
    cmd_sa(op::PERSISTENT_RESERVE_IN, 1, 10),
    cmd_sa(op::PERSISTENT_RESERVE_IN, 2, 10),
    cmd_sa(op::PERSISTENT_RESERVE_IN, 3, 10),
    cmd_sa(op::PERSISTENT_RESERVE_OUT, 0, 10),
    cmd_sa(op::PERSISTENT_RESERVE_OUT, 1, 10),
    cmd_sa(op::PERSISTENT_RESERVE_OUT, 2, 10),
    cmd_sa(op::PERSISTENT_RESERVE_OUT, 3, 10),
    cmd_sa(op::PERSISTENT_RESERVE_OUT, 4, 10),
    cmd_sa(op::PERSISTENT_RESERVE_OUT, 5, 10),
    cmd_sa(op::PERSISTENT_RESERVE_OUT, 6, 10),
    cmd(op::READ_16, 16),
    cmd(op::COMPARE_AND_WRITE, 16),
    cmd(op::ORWRITE_16, 16),
    cmd(op::WRITE_16, 16),
    cmd(op::WRITE_AND_VERIFY_16, 16),
    cmd(op::VERIFY_16, 16),
    cmd(op::PRE_FETCH_16, 16),
    cmd(op::SYNCHRONIZE_CACHE_16, 16),
    cmd(op::WRITE_SAME_16, 16),
    cmd_sa(op::SERVICE_ACTION_IN_16, op::SAI_READ_CAPACITY_16, 16),
    cmd_sa(op::SERVICE_ACTION_IN_16, op::SAI_GET_LBA_STATUS, 16),
    cmd(op::REPORT_LUNS, 12),
    cmd_sa(op::MAINTENANCE_IN, op::MI_REPORT_SUPPORTED_OPCODES, 12),
    cmd(op::READ_12, 12),
    cmd(op::WRITE_12, 12),
    cmd(op::WRITE_AND_VERIFY_12, 12),
    cmd(op::VERIFY_12, 12),
    cmd(op::READ_DEFECT_DATA_12, 12),
];

fn offered(s: &Supported, thin: bool) -> bool {
    thin || !matches!(s.opcode, op::UNMAP)
}

/// The command timeouts descriptor (RCTD): no timeouts reported.
const TIMEOUTS: [u8; 12] = [0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// REPORT SUPPORTED OPERATION CODES.
pub(crate) fn report_opcodes(
    id: &Identity,
    rctd: bool,
    options: u8,
    opcode: u8,
    sa: u16,
    alloc: u32,
    buf: &mut Vec<u8>,
) -> Outcome {
    buf.clear();
    let list = SUPPORTED.iter().filter(|s| offered(s, id.thin));
    match options {
        0 => {
            buf.extend_from_slice(&[0; 4]);
            for s in list {
                buf.push(s.opcode);
                buf.push(0);
                buf.extend_from_slice(&u16::from(s.sa.unwrap_or(0)).to_be_bytes());
                buf.push(0);
                buf.push(u8::from(rctd) << 1 | u8::from(s.sa.is_some()));
                buf.extend_from_slice(&u16::from(s.len).to_be_bytes());
                if rctd {
                    buf.extend_from_slice(&TIMEOUTS);
                }
            }
            let len = (buf.len() - 4) as u32;
            buf[0..4].copy_from_slice(&len.to_be_bytes());
        }
        1..=3 => {
            let mut with_sa = list
                .clone()
                .filter(|s| s.opcode == opcode && s.sa.is_some())
                .peekable();
            let has_sa = with_sa.peek().is_some();
            // The REPORTING OPTIONS (byte 2) do not fit the opcode.
            let bad_options = Sense::invalid_field_in_cdb().at_cdb_byte(2);
            let found = match options {
                1 if has_sa => return check(bad_options),
                1 => list.clone().find(|s| s.opcode == opcode),
                2 if !has_sa && list.clone().any(|s| s.opcode == opcode) => {
                    return check(bad_options)
                }
                _ => list
                    .clone()
                    .find(|s| s.opcode == opcode && s.sa.is_none_or(|a| u16::from(a) == sa)),
            };
            match found {
                None => buf.extend_from_slice(&[0, 0x01, 0, 0]),
                Some(s) => {
                    buf.extend_from_slice(&[0, u8::from(rctd) << 7 | 0x03]);
                    buf.extend_from_slice(&u16::from(s.len).to_be_bytes());
                    let len = usize::from(s.len);
                    let at = buf.len();
                    buf.resize(at + len, 0xFF);
                    buf[at] = s.opcode;
                    if let Some(a) = s.sa {
                        buf[at + 1] = 0xE0 | a;
                    }
                    // The CONTROL byte: NACA and link bits are not supported.
                    buf[at + len - 1] = 0x00;
                    if rctd {
                        buf.extend_from_slice(&TIMEOUTS);
                    }
                }
            }
        }
        _ => return check(Sense::invalid_field_in_cdb().at_cdb_byte(2)),
    }
    reply(buf, alloc)
}

/// REPORT LUNS parameter data (see [`super::report_luns`]).
pub(crate) fn report_luns(cdb: &[u8], luns: &[u64], buf: &mut Vec<u8>) -> Outcome {
    if cdb.len() < 12 {
        return check(Sense::invalid_field_in_cdb());
    }
    let select = cdb[2];
    let alloc = u32::from_be_bytes([cdb[6], cdb[7], cdb[8], cdb[9]]);
    if alloc < 16 {
        return check(Sense::invalid_field_in_cdb());
    }
    buf.clear();
    buf.extend_from_slice(&[0; 8]);
    match select {
        // All logical units with an address (0), well-known only (1: none), all (2).
        0x00 | 0x02 => {
            for &lun in luns {
                buf.extend_from_slice(&encode_lun(lun));
            }
        }
        0x01 | 0x10..=0x12 => {}
        _ => return check(Sense::invalid_field_in_cdb()),
    }
    let len = (buf.len() - 8) as u32;
    buf[0..4].copy_from_slice(&len.to_be_bytes());
    reply(buf, alloc)
}

/// SAM-5 single-level LUN: peripheral addressing below 256, flat space addressing below 16384.
pub(crate) fn encode_lun(lun: u64) -> [u8; 8] {
    let mut out = [0u8; 8];
    if lun < 256 {
        out[1] = lun as u8;
    } else {
        let l = (lun & 0x3FFF) as u16;
        out[0] = 0x40 | (l >> 8) as u8;
        out[1] = l as u8;
    }
    out
}

/// Answers for a LUN the target does not have.
pub(crate) fn no_such_lun(cdb: &[u8], buf: &mut Vec<u8>) -> Outcome {
    buf.clear();
    match cdb.first() {
        Some(&op::INQUIRY) if cdb.len() >= 6 => {
            let alloc = u32::from(cdb[3]) << 8 | u32::from(cdb[4]);
            if cdb[1] & 0x01 != 0 {
                // VPD pages of an absent unit: the supported-pages page only.
                buf.extend_from_slice(&[0x7F, cdb[2], 0, 0]);
                if cdb[2] != 0 {
                    return check(Sense::lun_not_supported());
                }
                buf.push(0x00);
                buf[3] = 1;
                return reply(buf, alloc);
            }
            standard_inquiry(buf, false);
            reply(buf, alloc)
        }
        Some(&op::REQUEST_SENSE) if cdb.len() >= 6 => request_sense(
            Sense::lun_not_supported(),
            cdb[1] & 1 != 0,
            u32::from(cdb[4]),
            buf,
        ),
        _ => check(Sense::lun_not_supported()),
    }
}
