//! MODE SENSE / MODE SELECT (6 and 10): the caching page (08h: write cache enabled, the
//! backend's page cache; SYNCHRONIZE CACHE and FUA make data durable), the control page (0Ah)
//! and the informational exceptions control page (1Ch), with block descriptors. Nothing is
//! changeable: MODE SELECT accepts a page equal to the current one and refuses any change.

use super::cdb::{Geometry, ModeSenseCdb};
use super::io::{check, good};
use super::sense::Sense;
use super::Outcome;

/// Page control values.
const PC_CURRENT: u8 = 0;
const PC_CHANGEABLE: u8 = 1;
const PC_DEFAULT: u8 = 2;
const PC_SAVED: u8 = 3;

/// Pages served, in ascending order.
const PAGES: [u8; 3] = [0x08, 0x0A, 0x1C];

/// Page `code` as the unit has it (current = default), or its changeable mask (all zero).
fn page(code: u8, changeable: bool, out: &mut Vec<u8>) {
    let at = out.len();
    match code {
        0x08 => {
            out.extend_from_slice(&[0x08, 0x12]);
            out.resize(at + 20, 0);
            if !changeable {
                out[at + 2] = 0x04; // WCE
            }
        }
        0x0A => {
            out.extend_from_slice(&[0x0A, 0x0A]);
            out.resize(at + 12, 0);
            if !changeable {
                out[at + 3] = 0x10; // QUEUE ALGORITHM MODIFIER: unrestricted reordering
                                    // TAS: tasks another nexus aborts end with TASK ABORTED (see `aborts`).
                out[at + 5] = 0x40;
                out[at + 8] = 0xFF; // BUSY TIMEOUT PERIOD: unlimited
                out[at + 9] = 0xFF;
            }
        }
        _ => {
            out.extend_from_slice(&[0x1C, 0x0A]);
            out.resize(at + 12, 0);
        }
    }
}

/// MODE SENSE (6 or 10).
pub(crate) fn sense(g: &Geometry, c: &ModeSenseCdb, buf: &mut Vec<u8>) -> Outcome {
    let ModeSenseCdb {
        ten,
        dbd,
        llbaa,
        pc,
        page: code,
        subpage,
        alloc,
    } = *c;
    if pc == PC_SAVED {
        return check(Sense::saving_not_supported());
    }
    let all = code == 0x3F;
    if !(all || PAGES.contains(&code)) || !(subpage == 0 || (all && subpage == 0xFF)) {
        return check(Sense::invalid_field_in_cdb());
    }
    buf.clear();
    let hdr = if ten { 8 } else { 4 };
    buf.resize(hdr, 0);
    // Device-specific parameter: WP for read-only units, DPOFUA (FUA honoured).
    let dsp = if g.read_only { 0x80 } else { 0 } | 0x10;
    let long = ten && llbaa;
    let bd_len: usize = if dbd {
        0
    } else if long {
        16
    } else {
        8
    };
    if ten {
        buf[3] = dsp;
        buf[4] = u8::from(long);
        buf[6..8].copy_from_slice(&(bd_len as u16).to_be_bytes());
    } else {
        buf[2] = dsp;
        buf[3] = bd_len as u8;
    }
    if bd_len == 8 {
        let n = g.blocks.min(u64::from(u32::MAX)) as u32;
        buf.extend_from_slice(&n.to_be_bytes());
        buf.push(0);
        buf.extend_from_slice(&g.block_size.to_be_bytes()[1..]);
    } else if bd_len == 16 {
        buf.extend_from_slice(&g.blocks.to_be_bytes());
        buf.extend_from_slice(&[0; 4]);
        buf.extend_from_slice(&g.block_size.to_be_bytes());
    }
    let changeable = pc == PC_CHANGEABLE;
    debug_assert!(pc == PC_CURRENT || pc == PC_DEFAULT || changeable);
    for &p in PAGES.iter().filter(|&&p| all || p == code) {
        page(p, changeable, buf);
    }
    // MODE DATA LENGTH excludes itself.
    if ten {
        let len = (buf.len() - 2) as u16;
        buf[0..2].copy_from_slice(&len.to_be_bytes());
    } else {
        buf[0] = (buf.len() - 1).min(255) as u8;
    }
    buf.truncate(alloc as usize);
    good(buf.len() as u32)
}

/// MODE SELECT (6 or 10) with the parameter list in `data` (`param_len` as declared).
pub(crate) fn select(
    g: &Geometry,
    ten: bool,
    pf: bool,
    sp: bool,
    param_len: u32,
    data: &[u8],
) -> Outcome {
    if param_len == 0 {
        return good(0);
    }
    if sp {
        return check(Sense::invalid_field_in_cdb());
    }
    if !pf {
        return check(Sense::invalid_field_in_cdb());
    }
    let data = &data[..data.len().min(param_len as usize)];
    let hdr = if ten { 8 } else { 4 };
    if data.len() < hdr {
        return check(Sense::param_list_length_error());
    }
    let (bd_len, long) = if ten {
        (
            usize::from(u16::from_be_bytes([data[6], data[7]])),
            data[4] & 1 != 0,
        )
    } else {
        (usize::from(data[3]), false)
    };
    let Some(bds) = data.get(hdr..hdr + bd_len) else {
        return check(Sense::param_list_length_error());
    };
    let each = if long { 16 } else { 8 };
    if bd_len % each != 0 {
        return check(Sense::invalid_field_in_param_list());
    }
    for bd in bds.chunks(each) {
        let bl = if long {
            u32::from_be_bytes([bd[12], bd[13], bd[14], bd[15]])
        } else {
            u32::from_be_bytes([0, bd[5], bd[6], bd[7]])
        };
        if bl != g.block_size && bl != 0 {
            return check(Sense::invalid_field_in_param_list());
        }
    }
    let mut rest = &data[hdr + bd_len..];
    let mut cur = Vec::with_capacity(20);
    while !rest.is_empty() {
        if rest.len() < 2 {
            return check(Sense::param_list_length_error());
        }
        let code = rest[0] & 0x3F;
        if rest[0] & 0x40 != 0 || !PAGES.contains(&code) {
            // Subpage format or a page the unit does not have.
            return check(Sense::invalid_field_in_param_list());
        }
        let len = 2 + usize::from(rest[1]);
        let Some(p) = rest.get(..len) else {
            return check(Sense::param_list_length_error());
        };
        cur.clear();
        page(code, false, &mut cur);
        // The PS bit (saveable) is not a parameter.
        if p.len() != cur.len() || p[1..] != cur[1..] {
            return check(Sense::invalid_field_in_param_list());
        }
        rest = &rest[len..];
    }
    good(0)
}
