//! CDB decoding (pure): opcode and fields of every command the unit implements, checked
//! against the unit's geometry, into a [`Cmd`]. Nothing here touches the unit's state, so
//! `LogicalUnit::plan` can run it before any data moves and a fuzzer can run it on anything.

use super::sense::Sense;
use super::{DataDir, Fit, Xfer, MAX_TRANSFER_BYTES};

/// Operation codes (SPC-5, SBC-4).
pub(crate) mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0A;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const MODE_SENSE_6: u8 = 0x1A;
    pub const START_STOP_UNIT: u8 = 0x1B;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2A;
    pub const WRITE_AND_VERIFY_10: u8 = 0x2E;
    pub const VERIFY_10: u8 = 0x2F;
    pub const PRE_FETCH_10: u8 = 0x34;
    pub const READ_DEFECT_DATA_10: u8 = 0x37;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const MODE_SENSE_10: u8 = 0x5A;
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5E;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5F;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const ORWRITE_16: u8 = 0x8B;
    pub const WRITE_16: u8 = 0x8A;
    pub const WRITE_AND_VERIFY_16: u8 = 0x8E;
    pub const VERIFY_16: u8 = 0x8F;
    pub const PRE_FETCH_16: u8 = 0x90;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9E;
    pub const REPORT_LUNS: u8 = 0xA0;
    pub const MAINTENANCE_IN: u8 = 0xA3;
    pub const READ_12: u8 = 0xA8;
    pub const WRITE_12: u8 = 0xAA;
    pub const WRITE_AND_VERIFY_12: u8 = 0xAE;
    pub const VERIFY_12: u8 = 0xAF;
    pub const READ_DEFECT_DATA_12: u8 = 0xB7;

    /// SERVICE ACTION IN(16) actions.
    pub const SAI_READ_CAPACITY_16: u8 = 0x10;
    pub const SAI_GET_LBA_STATUS: u8 = 0x12;
    /// MAINTENANCE IN action.
    pub const MI_REPORT_SUPPORTED_OPCODES: u8 = 0x0C;
}

/// The unit's geometry the decoder checks LBAs and lengths against.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    /// Logical block size in bytes (512 or 4096).
    pub block_size: u32,
    /// Number of logical blocks.
    pub blocks: u64,
    /// Writes are refused.
    pub read_only: bool,
}

impl Geometry {
    /// Most blocks one command may transfer.
    pub fn max_transfer_blocks(&self) -> u32 {
        MAX_TRANSFER_BYTES / self.block_size
    }

    /// Most blocks one COMPARE AND WRITE may cover: its Data-Out (twice the blocks) must fit
    /// the transfer limit; the field is one byte.
    pub fn max_caw_blocks(&self) -> u32 {
        (MAX_TRANSFER_BYTES / 2 / self.block_size).min(u8::MAX as u32)
    }
}

/// Most blocks one WRITE SAME may cover (without UNMAP each block is written: 32 MiB of
/// 512-byte blocks), so one command keeps the backend busy for a bounded time. The largest
/// length WRITE SAME(10) can carry; a larger WRITE SAME(16) is refused, which initiators learn from the Block Limits VPD and split (libiscsi's
/// WriteSame16.Unmap checks a 65536-block request fails when the limit is below it).
pub(crate) const MAX_WRITE_SAME_BLOCKS: u64 = 0xFFFF;
/// Most blocks one UNMAP (all descriptors together) may deallocate:
/// 512 MiB of 512-byte blocks (libiscsi calls counts above 2^20 insane). Block Limits VPD
/// reports both.
pub(crate) const MAX_UNMAP_BLOCKS: u64 = 1 << 20;
/// Most block descriptors in one UNMAP parameter list.
pub(crate) const MAX_UNMAP_DESCRIPTORS: u32 = 64;

/// Longest parameter list (UNMAP, MODE SELECT, PERSISTENT RESERVE OUT) the unit accepts:
/// far above what any of them needs, so a hostile length cannot make the transport buffer
/// megabytes.
pub(crate) const MAX_PARAM_LIST: u32 = 64 * 1024;

/// What a block command does with its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rw {
    Read,
    Write,
}

/// MODE SENSE (6 or 10) fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ModeSenseCdb {
    pub ten: bool,
    pub dbd: bool,
    pub llbaa: bool,
    pub pc: u8,
    pub page: u8,
    pub subpage: u8,
    pub alloc: u32,
}

/// PERSISTENT RESERVE OUT fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PrOutCdb {
    pub action: u8,
    pub scope: u8,
    pub rtype: u8,
    pub param_len: u32,
}

/// A decoded command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cmd {
    TestUnitReady,
    RequestSense {
        desc: bool,
        alloc: u32,
    },
    Inquiry {
        evpd: bool,
        page: u8,
        alloc: u32,
    },
    ReportLuns {
        alloc: u32,
    },
    ReadCapacity10,
    ReadCapacity16 {
        alloc: u32,
    },
    /// READ/WRITE 6/10/12/16.
    Rw {
        dir: Rw,
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    /// VERIFY 10/12/16: bytchk 0 (medium only), 1 (compare all), 3 (one block against all).
    Verify {
        lba: u64,
        blocks: u32,
        bytchk: u8,
    },
    /// WRITE AND VERIFY 10/12/16.
    WriteVerify {
        lba: u64,
        blocks: u32,
    },
    SyncCache,
    PreFetch,
    Unmap {
        param_len: u32,
    },
    WriteSame {
        lba: u64,
        blocks: u64,
        unmap: bool,
        ndob: bool,
    },
    CompareAndWrite {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    /// ORWRITE(16): the blocks become medium OR Data-Out, atomically like COMPARE AND WRITE.
    OrWrite {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    GetLbaStatus {
        lba: u64,
        alloc: u32,
    },
    ModeSense(ModeSenseCdb),
    ModeSelect {
        ten: bool,
        pf: bool,
        sp: bool,
        param_len: u32,
    },
    ReportOpcodes {
        rctd: bool,
        options: u8,
        opcode: u8,
        sa: u16,
        alloc: u32,
    },
    PrIn {
        sa: u8,
        alloc: u32,
    },
    PrOut(PrOutCdb),
    Reserve6,
    Release6,
    StartStop,
    /// READ DEFECT DATA 10/12: the lists asked for and their format.
    ReadDefects {
        twelve: bool,
        plist: bool,
        glist: bool,
        format: u8,
        alloc: u32,
    },
}

fn be16(b: &[u8]) -> u32 {
    u32::from(b[0]) << 8 | u32::from(b[1])
}
fn be24(b: &[u8]) -> u32 {
    u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// The CDB length each opcode group implies (SPC-5 4.2.5.1).
fn cdb_len(opcode: u8) -> usize {
    match opcode >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        _ => 16,
    }
}

/// The LBA and transfer length of a 10-, 12- or 16-byte block command CDB (SBC-4 4.2.2: the
/// layouts READ, WRITE, VERIFY and the others share), told apart by the opcode's group.
fn lba_and_blocks(c: &[u8]) -> (u64, u32) {
    match cdb_len(c[0]) {
        10 => (u64::from(be32(&c[2..6])), be16(&c[7..9])),
        12 => (u64::from(be32(&c[2..6])), be32(&c[6..10])),
        _ => (be64(&c[2..10]), be32(&c[10..14])),
    }
}

/// Checks an LBA range against the capacity.
fn range(g: &Geometry, lba: u64, blocks: u64) -> Result<(), Sense> {
    // With 0 blocks the end of the unit itself is still a valid address.
    match lba.checked_add(blocks) {
        Some(end) if end <= g.blocks => Ok(()),
        _ => Err(Sense::lba_out_of_range()),
    }
}

/// Refuses protection information (RDPROTECT/WRPROTECT/VRPROTECT in bits 7..5 of byte 1):
/// the unit is not formatted with it.
fn no_protect(cdb: &[u8]) -> Result<(), Sense> {
    if cdb[1] & 0xE0 != 0 {
        Err(Sense::invalid_field_in_cdb())
    } else {
        Ok(())
    }
}

/// A read or write of `blocks` from `lba`, checked.
fn rw(g: &Geometry, dir: Rw, lba: u64, blocks: u32, fua: bool) -> Result<Cmd, Sense> {
    if blocks > g.max_transfer_blocks() {
        return Err(Sense::invalid_field_in_cdb());
    }
    range(g, lba, u64::from(blocks))?;
    if dir == Rw::Write && g.read_only {
        return Err(Sense::write_protected());
    }
    Ok(Cmd::Rw {
        dir,
        lba,
        blocks,
        fua,
    })
}

/// Decodes `cdb` against `g`.
pub(crate) fn decode(g: &Geometry, cdb: &[u8]) -> Result<Cmd, Sense> {
    let Some(&opcode) = cdb.first() else {
        return Err(Sense::invalid_opcode());
    };
    if cdb.len() < cdb_len(opcode) {
        // Too short: an unknown opcode still says so; a known one has an invalid CDB.
        let mut padded = [0u8; 16];
        padded[..cdb.len()].copy_from_slice(cdb);
        return match decode_full(g, &padded) {
            Err(s) if s == Sense::invalid_opcode() => Err(s),
            _ => Err(Sense::invalid_field_in_cdb()),
        };
    }
    decode_full(g, cdb)
}

/// Decodes a CDB at least as long as its opcode's group requires.
fn decode_full(g: &Geometry, cdb: &[u8]) -> Result<Cmd, Sense> {
    let opcode = cdb[0];
    let c = cdb;
    let param = |len: u32| -> Result<u32, Sense> {
        if len > MAX_PARAM_LIST {
            Err(Sense::param_list_length_error())
        } else {
            Ok(len)
        }
    };
    let write_checks = |lba: u64, blocks: u64| -> Result<(), Sense> {
        range(g, lba, blocks)?;
        if g.read_only {
            return Err(Sense::write_protected());
        }
        Ok(())
    };
    match opcode {
        op::TEST_UNIT_READY => Ok(Cmd::TestUnitReady),
        op::REQUEST_SENSE => Ok(Cmd::RequestSense {
            desc: c[1] & 1 != 0,
            alloc: u32::from(c[4]),
        }),
        op::INQUIRY => {
            let evpd = c[1] & 1 != 0;
            // CMDDT (obsolete) set, or a page code without EVPD: invalid.
            if c[1] & 0x02 != 0 || (!evpd && c[2] != 0) {
                return Err(Sense::invalid_field_in_cdb());
            }
            Ok(Cmd::Inquiry {
                evpd,
                page: c[2],
                alloc: be16(&c[3..5]),
            })
        }
        op::REPORT_LUNS => Ok(Cmd::ReportLuns {
            alloc: be32(&c[6..10]),
        }),
        op::READ_CAPACITY_10 => {
            // PMI with LBA, obsolete: only the plain form is served.
            if c[8] & 1 != 0 || be32(&c[2..6]) != 0 {
                return Err(Sense::invalid_field_in_cdb());
            }
            Ok(Cmd::ReadCapacity10)
        }
        op::SERVICE_ACTION_IN_16 => match c[1] & 0x1F {
            op::SAI_READ_CAPACITY_16 => Ok(Cmd::ReadCapacity16 {
                alloc: be32(&c[10..14]),
            }),
            op::SAI_GET_LBA_STATUS => {
                let lba = be64(&c[2..10]);
                if lba >= g.blocks {
                    return Err(Sense::lba_out_of_range());
                }
                Ok(Cmd::GetLbaStatus {
                    lba,
                    alloc: be32(&c[10..14]),
                })
            }
            _ => Err(Sense::invalid_field_in_cdb()),
        },
        op::READ_6 | op::WRITE_6 => {
            let lba = u64::from(be24(&c[1..4]) & 0x1F_FFFF);
            // A transfer length of 0 means 256 blocks in the 6-byte CDBs.
            let blocks = if c[4] == 0 { 256 } else { u32::from(c[4]) };
            let dir = if opcode == op::READ_6 {
                Rw::Read
            } else {
                Rw::Write
            };
            rw(g, dir, lba, blocks, false)
        }
        op::READ_10 | op::WRITE_10 | op::READ_12 | op::WRITE_12 | op::READ_16 | op::WRITE_16 => {
            no_protect(c)?;
            let dir = if matches!(opcode, op::READ_10 | op::READ_12 | op::READ_16) {
                Rw::Read
            } else {
                Rw::Write
            };
            let (lba, blocks) = lba_and_blocks(c);
            rw(g, dir, lba, blocks, c[1] & 0x08 != 0)
        }
        op::VERIFY_10 | op::VERIFY_12 | op::VERIFY_16 => {
            no_protect(c)?;
            let (lba, blocks) = lba_and_blocks(c);
            let bytchk = (c[1] >> 1) & 0x03;
            if bytchk == 2 || blocks > g.max_transfer_blocks() {
                return Err(Sense::invalid_field_in_cdb());
            }
            range(g, lba, u64::from(blocks))?;
            Ok(Cmd::Verify {
                lba,
                blocks,
                bytchk,
            })
        }
        op::WRITE_AND_VERIFY_10 | op::WRITE_AND_VERIFY_12 | op::WRITE_AND_VERIFY_16 => {
            no_protect(c)?;
            let (lba, blocks) = lba_and_blocks(c);
            // BYTCHK other than 0 and 1 is reserved here.
            if (c[1] >> 1) & 0x03 > 1 || blocks > g.max_transfer_blocks() {
                return Err(Sense::invalid_field_in_cdb());
            }
            write_checks(lba, u64::from(blocks))?;
            Ok(Cmd::WriteVerify { lba, blocks })
        }
        op::SYNCHRONIZE_CACHE_10 | op::SYNCHRONIZE_CACHE_16 => {
            let (lba, blocks) = lba_and_blocks(c);
            let blocks = u64::from(blocks);
            range(g, lba, blocks)?;
            Ok(Cmd::SyncCache)
        }
        op::PRE_FETCH_10 | op::PRE_FETCH_16 => {
            let (lba, blocks) = lba_and_blocks(c);
            let blocks = u64::from(blocks);
            range(g, lba, blocks)?;
            Ok(Cmd::PreFetch)
        }
        op::UNMAP => {
            // ANCHOR: the unit has no anchored state.
            if c[1] & 0x01 != 0 {
                return Err(Sense::invalid_field_in_cdb());
            }
            if g.read_only {
                return Err(Sense::write_protected());
            }
            Ok(Cmd::Unmap {
                param_len: param(be16(&c[7..9]))?,
            })
        }
        op::WRITE_SAME_10 | op::WRITE_SAME_16 => {
            let (lba, blocks) = lba_and_blocks(c);
            let blocks = u64::from(blocks);
            no_protect(c)?;
            let anchor = c[1] & 0x10 != 0;
            let unmap = c[1] & 0x08 != 0;
            // NDOB exists only in the 16-byte form.
            let ndob = opcode == op::WRITE_SAME_16 && c[1] & 0x01 != 0;
            if anchor || (opcode == op::WRITE_SAME_10 && c[1] & 0x01 != 0) {
                return Err(Sense::invalid_field_in_cdb());
            }
            // A length of 0 means "from the LBA to the end of the unit", which SBC-4 allows
            // only when the Block Limits VPD says so: WSNZ = 1 here, refused. (With 0 allowed,
            // libiscsi's WriteSame10.UnmapUntilEnd sends a non-zero block with UNMAP and
            // expects zeroes back, which SBC-4 forbids: reads must return the block sent.)
            // MAXIMUM WRITE SAME LENGTH applies with UNMAP too.
            if blocks == 0 || blocks > MAX_WRITE_SAME_BLOCKS {
                return Err(Sense::invalid_field_in_cdb());
            }
            write_checks(lba, blocks)?;
            Ok(Cmd::WriteSame {
                lba,
                blocks,
                unmap,
                ndob,
            })
        }
        op::COMPARE_AND_WRITE => {
            no_protect(c)?;
            let lba = be64(&c[2..10]);
            let blocks = u32::from(c[13]);
            if blocks > g.max_caw_blocks() {
                return Err(Sense::invalid_field_in_cdb());
            }
            write_checks(lba, u64::from(blocks))?;
            Ok(Cmd::CompareAndWrite {
                lba,
                blocks,
                fua: c[1] & 0x08 != 0,
            })
        }
        op::ORWRITE_16 => {
            // ORPROTECT: no protection information.
            no_protect(c)?;
            let lba = be64(&c[2..10]);
            let blocks = be32(&c[10..14]);
            if blocks > g.max_transfer_blocks() {
                return Err(Sense::invalid_field_in_cdb());
            }
            write_checks(lba, u64::from(blocks))?;
            Ok(Cmd::OrWrite {
                lba,
                blocks,
                fua: c[1] & 0x08 != 0,
            })
        }
        op::MODE_SENSE_6 | op::MODE_SENSE_10 => {
            let ten = opcode == op::MODE_SENSE_10;
            Ok(Cmd::ModeSense(ModeSenseCdb {
                ten,
                dbd: c[1] & 0x08 != 0,
                llbaa: ten && c[1] & 0x10 != 0,
                pc: c[2] >> 6,
                page: c[2] & 0x3F,
                subpage: c[3],
                alloc: if ten { be16(&c[7..9]) } else { u32::from(c[4]) },
            }))
        }
        op::MODE_SELECT_6 | op::MODE_SELECT_10 => {
            let ten = opcode == op::MODE_SELECT_10;
            Ok(Cmd::ModeSelect {
                ten,
                pf: c[1] & 0x10 != 0,
                sp: c[1] & 0x01 != 0,
                param_len: if ten { be16(&c[7..9]) } else { u32::from(c[4]) },
            })
        }
        op::MAINTENANCE_IN if c[1] & 0x1F == op::MI_REPORT_SUPPORTED_OPCODES => {
            Ok(Cmd::ReportOpcodes {
                rctd: c[2] & 0x80 != 0,
                options: c[2] & 0x07,
                opcode: c[3],
                sa: be16(&c[4..6]) as u16,
                alloc: be32(&c[6..10]),
            })
        }
        op::PERSISTENT_RESERVE_IN => Ok(Cmd::PrIn {
            sa: c[1] & 0x1F,
            alloc: be16(&c[7..9]),
        }),
        op::PERSISTENT_RESERVE_OUT => Ok(Cmd::PrOut(PrOutCdb {
            action: c[1] & 0x1F,
            scope: c[2] >> 4,
            rtype: c[2] & 0x0F,
            param_len: param(be32(&c[5..9]))?,
        })),
        op::READ_DEFECT_DATA_10 | op::READ_DEFECT_DATA_12 => {
            let twelve = opcode == op::READ_DEFECT_DATA_12;
            // The request bits sit in byte 2 of the 10-byte CDB, byte 1 of the 12-byte one.
            let at = if twelve { 1 } else { 2 };
            let format = c[at] & 0x07;
            // Short block, long block, bytes from index, physical sector, vendor specific;
            // the others are reserved.
            if matches!(format, 1 | 2 | 7) {
                return Err(Sense::invalid_field_in_cdb().at_cdb_byte(at as u16));
            }
            Ok(Cmd::ReadDefects {
                twelve,
                plist: c[at] & 0x10 != 0,
                glist: c[at] & 0x08 != 0,
                format,
                alloc: if twelve {
                    be32(&c[6..10])
                } else {
                    be16(&c[7..9])
                },
            })
        }
        op::RESERVE_6 => Ok(Cmd::Reserve6),
        op::RELEASE_6 => Ok(Cmd::Release6),
        op::START_STOP_UNIT => Ok(Cmd::StartStop),
        _ => Err(Sense::invalid_opcode()),
    }
}

impl Cmd {
    /// The data the command moves.
    pub(crate) fn xfer(&self, g: &Geometry) -> Xfer {
        let bs = g.block_size;
        let (dir, len) = match *self {
            Cmd::TestUnitReady
            | Cmd::SyncCache
            | Cmd::PreFetch
            | Cmd::Reserve6
            | Cmd::Release6
            | Cmd::StartStop => (DataDir::None, 0),
            Cmd::RequestSense { alloc, .. }
            | Cmd::Inquiry { alloc, .. }
            | Cmd::ReportLuns { alloc }
            | Cmd::ReadCapacity16 { alloc }
            | Cmd::GetLbaStatus { alloc, .. }
            | Cmd::ModeSense(ModeSenseCdb { alloc, .. })
            | Cmd::ReportOpcodes { alloc, .. }
            | Cmd::ReadDefects { alloc, .. }
            | Cmd::PrIn { alloc, .. } => (DataDir::In, alloc),
            Cmd::ReadCapacity10 => (DataDir::In, 8),
            Cmd::Rw {
                dir: Rw::Read,
                blocks,
                ..
            } => (DataDir::In, blocks * bs),
            Cmd::Rw {
                dir: Rw::Write,
                blocks,
                ..
            }
            | Cmd::WriteVerify { blocks, .. }
            | Cmd::OrWrite { blocks, .. } => (DataDir::Out, blocks * bs),
            Cmd::Verify { blocks, bytchk, .. } => match bytchk {
                0 => (DataDir::None, 0),
                1 => (DataDir::Out, blocks * bs),
                _ => (DataDir::Out, if blocks == 0 { 0 } else { bs }),
            },
            Cmd::Unmap { param_len }
            | Cmd::ModeSelect { param_len, .. }
            | Cmd::PrOut(PrOutCdb { param_len, .. }) => (DataDir::Out, param_len),
            Cmd::WriteSame { ndob, .. } => {
                if ndob {
                    (DataDir::None, 0)
                } else {
                    (DataDir::Out, bs)
                }
            }
            Cmd::CompareAndWrite { blocks, .. } => (DataDir::Out, 2 * blocks * bs),
        };
        let fit = match self {
            // An atomic read-modify-write of part of its blocks means nothing.
            Cmd::CompareAndWrite { .. }
            | Cmd::OrWrite { .. }
            | Cmd::WriteSame { unmap: false, .. } => Fit::Exact,
            Cmd::WriteSame {
                unmap: true,
                ndob: false,
                ..
            } => Fit::ExactOrNone,
            _ => Fit::Residual,
        };
        if len == 0 {
            Xfer {
                dir: DataDir::None,
                len: 0,
                fit,
            }
        } else {
            Xfer { dir, len, fit }
        }
    }
}
