//! Target `vmfs_journal`: crafted journals → mount-time replay → fsck and operations.
//!
//! The input describes transactions the way a hostile image could hold them: each block
//! image is a copy of a metadata block of the base datastore with an edit applied (see
//! [`crate::vmfs_image`]), homed at that block or, with the home bit, at any 64-bit block
//! number; they are committed through vmfs's own [`Journal::commit`] (so descriptors, commit
//! blocks and checksums are valid), and a final optional raw byte flip tears the log. Then:
//! fsck, mount (which replays), the operations workout, unmount.

use vmfs::device::BlockDevice;
use vmfs::format::MD_BLOCK;
use vmfs::journal::Journal;

use crate::datastore::{base, fsck_clean};
use crate::input::{Enc, Input};
use crate::vmfs_image::{edit_block, mount_and_exercise, read_edit, selected};

/// Transactions per input at most.
const TXNS_MAX: u8 = 4;
/// Blocks per transaction at most (the format allows more; a few reach every path).
const TXN_BLOCKS: u8 = 6;
/// Home bit of a block's flags: the home address is the input's, not the block's own.
const ANY_HOME: u8 = 1;

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let ops = inp.u8();
    let txns = inp.u8() % (TXNS_MAX + 1);
    let b = base();
    let dev = b.disk();
    let Ok((mut journal, _)) = Journal::replay(&*dev, &b.layout) else {
        return;
    };
    for _ in 0..txns {
        let n = 1 + inp.u8() % TXN_BLOCKS;
        let mut blocks = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            let edit = read_edit(&mut inp);
            let flags = inp.u8();
            let (at, m) = selected(edit.0);
            let mut image = vec![0u8; MD_BLOCK];
            if dev.read_at(at * MD_BLOCK as u64, &mut image).is_err() {
                return;
            }
            edit_block(&dev, &mut image, at, m, edit);
            let home = if flags & ANY_HOME != 0 { inp.u64() } else { at };
            blocks.push((home, image));
        }
        if journal.commit(&*dev, &mut blocks).is_err() {
            return;
        }
    }
    // A torn or damaged log: flip one byte somewhere in the journal.
    let tear = inp.u8();
    if tear != 0 {
        let j = b.layout.journal;
        let pos = u64::from(inp.u32()) % (j.blocks * MD_BLOCK as u64);
        let at = j.start * MD_BLOCK as u64 + pos;
        let mut byte = [0u8];
        if dev.read_at(at, &mut byte).is_ok() {
            byte[0] ^= tear;
            let _ = dev.write_at(at, &byte);
        }
    }
    let _ = fsck_clean(&*dev);
    mount_and_exercise(&dev, ops, false);
}

/// Seeds: one transaction changing an inode's owner; two transactions over inode, directory and
/// pointer blocks (times, LSNs); a transaction homed far outside the device; a torn log.
pub fn seeds() -> Vec<Vec<u8>> {
    use vmfs::format::magic;
    let b = base();
    let find = |m: u32, nth: usize| b.nth_of(m, nth);
    let block = |e: &mut Enc, sel: u16, op: u8, off: u16, val: u64, home: Option<u64>| {
        e.u16(sel).u8(op).u16(off).u64(val);
        match home {
            Some(h) => e.u8(ANY_HOME).u64(h),
            None => e.u8(0),
        };
    };
    let mut out = Vec::new();
    let mut e = Enc::new();
    e.u8(0xf).u8(1).u8(0);
    block(&mut e, find(magic::INODE, 3), 2, 52, 5000, None);
    out.push(e.u8(0).finish());
    let mut e = Enc::new();
    e.u8(0xf).u8(2).u8(1);
    block(
        &mut e,
        find(magic::INODE, 5),
        3,
        72,
        1_600_000_000_000_000_000,
        None,
    );
    block(&mut e, find(magic::DIR, 0), 3, 16, 1, None);
    e.u8(0);
    block(&mut e, find(magic::POINTER, 0), 3, 16, 2, None);
    out.push(e.u8(0).finish());
    let mut e = Enc::new();
    e.u8(0xf).u8(1).u8(0);
    block(&mut e, find(magic::INODE, 2), 3, 48, 9, Some(1 << 40));
    out.push(e.u8(0).finish());
    let mut e = Enc::new();
    e.u8(0xf).u8(1).u8(0);
    block(&mut e, find(magic::INODE, 2), 3, 48, 2, None);
    out.push(e.u8(0x10).u32(MD_BLOCK as u32 + 100).finish());
    out
}
