//! Target `vmfs_image`: crafted datastore images → fsck, mount and namespace operations.
//!
//! Random bytes never get past vmfs's checksums, so the input is a list of edits to the
//! decoded structures of the base datastore ([`crate::datastore`]): pick a sealed metadata
//! block (volume header, journal superblock, bitmap, inode, pointer block, directory or xattr
//! block), change a field — integer of any width at any offset, a counter nudged, a bitmap bit
//! flipped, the whole block replaced by another one (cross-links, duplicate inodes) or zeroed —
//! and reseal it (new checksum, its own address), as a hostile image would be. An edit with
//! the no-reseal bit checks the checksum path itself.
//!
//! Then: fsck (must not panic on anything); mount; walk the tree reading everything; write,
//! create, link, rename, truncate, allocate, punch, unlink; unmount. Oracle besides "no
//! panic": an image fsck calls clean stays clean after the operations and unmount.

use std::sync::Arc;

use vmfs::device::BlockDevice;
use vmfs::format::{
    get_u64, put_u16, put_u32, put_u64, MD_BLOCK, MD_HEADER_BYTES, ROOT_INO, S_IFDIR, S_IFLNK,
    S_IFMT, S_IFREG,
};
use vmfs::fs::Datastore;
use vmfs::{Extent, RenameFlags, SetAttr, XattrSetMode};

use crate::cow_disk::CowDisk;
use crate::datastore::{base, fsck_clean, reseal};
use crate::input::{Enc, Input};

/// Edits per input at most.
const EDITS_MAX: usize = 32;
/// Directories walked per run at most (bounds a run on a crafted cycle).
const DIRS_MAX: usize = 24;
/// Entries read per directory at most.
const ENTRIES_MAX: usize = 64;

/// An edit's operation (low 3 bits of its op byte; bit 7 = leave the checksum stale).
const NO_RESEAL: u8 = 0x80;

/// One edit: (block selector, op, offset, value), as read from an input.
pub(crate) type Edit = (u16, u8, usize, u64);

/// Reads one edit.
pub(crate) fn read_edit(inp: &mut Input<'_>) -> Edit {
    let sel = inp.u16();
    let op = inp.u8();
    let off = usize::from(inp.u16()) % MD_BLOCK;
    (sel, op, off, inp.u64())
}

/// The metadata block an edit selects: (block number, magic).
pub(crate) fn selected(sel: u16) -> (u64, u32) {
    let b = base();
    b.metadata[usize::from(sel) % b.metadata.len()]
}

/// Applies an edit's change to `block` (a copy of block `at` of `dev`, magic `m`) and reseals
/// it unless the edit says not to.
pub(crate) fn edit_block(dev: &CowDisk, block: &mut [u8], at: u64, m: u32, edit: Edit) {
    let (_, op, off, val) = edit;
    let fit = |w: usize| off.min(MD_BLOCK - w);
    match op & 7 {
        0 => block[off] = val as u8,
        1 => put_u16(block, fit(2), val as u16),
        2 => put_u32(block, fit(4), val as u32),
        3 => put_u64(block, fit(8), val),
        4 => {
            // Nudge a u64 field (sizes, counts, block numbers) by a small signed amount.
            let o = fit(8);
            let v = get_u64(block, o).wrapping_add(val as i8 as u64);
            put_u64(block, o, v);
        }
        5 => {
            // Another metadata block's contents: duplicates, cross-links.
            let b = base();
            let other = b.metadata[(val as usize) % b.metadata.len()].0;
            let _ = dev.read_at(other * MD_BLOCK as u64, block);
        }
        6 => {
            let bits = ((MD_BLOCK - MD_HEADER_BYTES) * 8) as u64;
            let i = val % bits;
            let byte = MD_HEADER_BYTES + (i / 8) as usize;
            block[byte] ^= 1 << (i % 8);
        }
        _ => block.fill(0),
    }
    if op & NO_RESEAL == 0 && op & 7 != 7 {
        reseal(block, at, m);
    }
}

/// Applies one edit read from `inp` to its block on `dev`.
pub(crate) fn apply_edit(inp: &mut Input<'_>, dev: &CowDisk) {
    let edit = read_edit(inp);
    let (at, m) = selected(edit.0);
    let mut block = vec![0u8; MD_BLOCK];
    if dev.read_at(at * MD_BLOCK as u64, &mut block).is_err() {
        return;
    }
    edit_block(dev, &mut block, at, m, edit);
    let _ = dev.write_at(at * MD_BLOCK as u64, &block);
}

/// Mounted-datastore workout shared with the journal target: reads everything reachable
/// (bounded), then a few changes of each kind. Errors are fine; panics are not.
pub(crate) fn exercise(ds: &Datastore, ops: u8) {
    let mut dirs = vec![ROOT_INO];
    let mut files = Vec::new();
    let mut seen_dirs = 0;
    let mut buf = vec![0u8; 64 << 10];
    let mut extents: Vec<Extent> = Vec::new();
    while let Some(dir) = dirs.pop() {
        if seen_dirs >= DIRS_MAX {
            break;
        }
        seen_dirs += 1;
        let Ok(entries) = ds.read_dir_from(dir, 0, ENTRIES_MAX) else {
            continue;
        };
        for e in entries {
            let Ok(i) = ds.lookup_at(dir, e.entry.name.as_bytes()) else {
                continue;
            };
            let _ = ds.listxattr(i.ino);
            let _ = ds.getxattr(i.ino, b"user.note");
            match i.mode & S_IFMT {
                S_IFDIR => dirs.push(i.ino),
                S_IFLNK => {
                    let _ = ds.readlink(i.ino);
                }
                S_IFREG => {
                    let _ = ds.read(i.ino, 0, &mut buf);
                    let _ = ds.read(i.ino, i.size.saturating_sub(4096), &mut buf[..8192]);
                    extents.clear();
                    let _ = ds.read_plan(i.ino, 0, 4 << 20, &mut extents);
                    files.push((dir, e.entry.name.clone(), i.ino));
                }
                _ => {}
            }
        }
    }
    if ops & 1 != 0 {
        if let Some((_, _, ino)) = files.first() {
            let _ = ds.write_at(*ino, 0, &[0x5a; 4096]);
            let _ = ds.write_at(*ino, (1 << 20) - 100, &[0xa5; 300]);
            let _ = ds.allocate(*ino, 0, 3 << 20, true);
            let _ = ds.punch_hole(*ino, 4096, 64 << 10);
        }
    }
    if ops & 2 != 0 {
        if let Ok(n) = ds.make_node(ROOT_INO, b"new", S_IFREG | 0o644, 0, 0, 0) {
            let _ = ds.write_at(n.ino, 0, &buf[..(60 << 10)]);
            let _ = ds.setxattr(n.ino, b"user.x", &[1; 300], XattrSetMode::Any);
        }
        let _ = ds.make_node(ROOT_INO, b"newdir", S_IFDIR | 0o755, 0, 0, 0);
        let _ = ds.symlink_at(ROOT_INO, b"newlink", b"new", 0, 0);
    }
    if ops & 4 != 0 {
        if let Some((dir, name, ino)) = files.last() {
            let _ = ds.link_at(*ino, ROOT_INO, b"linked");
            let _ = ds.rename_at(
                *dir,
                name.as_bytes(),
                ROOT_INO,
                b"renamed",
                RenameFlags::default(),
            );
            let _ = ds.setattr(
                *ino,
                &SetAttr {
                    size: Some(10),
                    ..SetAttr::default()
                },
            );
            let _ = ds.unlink_at(ROOT_INO, b"renamed");
        }
    }
    if ops & 8 != 0 {
        for (dir, name, _) in files.iter().take(4) {
            let _ = ds.unlink_at(*dir, name.as_bytes());
        }
        let _ = ds.rmdir_at(ROOT_INO, b"newdir");
    }
    let _ = ds.statfs();
    let _ = ds.sync();
}

/// Mounts `dev`, exercises it, unmounts; with `clean_before`, checks fsck still finds it clean.
pub(crate) fn mount_and_exercise(dev: &Arc<CowDisk>, ops: u8, clean_before: bool) {
    let Ok(ds) = Datastore::mount(dev.clone()) else {
        return;
    };
    exercise(&ds, ops);
    let unmounted = ds.unmount().is_ok();
    drop(ds);
    if clean_before && unmounted {
        assert_eq!(
            fsck_clean(&**dev),
            Some(true),
            "a clean datastore is no longer clean after mount, operations and unmount: {:?}",
            vmfs::fsck::fsck(&**dev).map(|r| r.problems)
        );
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let ops = inp.u8();
    let n = usize::from(inp.u8()) % (EDITS_MAX + 1);
    let dev = base().disk();
    for _ in 0..n {
        apply_edit(&mut inp, &dev);
    }
    let clean = fsck_clean(&*dev) == Some(true);
    mount_and_exercise(&dev, ops, clean);
}

/// Seeds: no edit (every operation on the clean base), and one edit of each kind.
pub fn seeds() -> Vec<Vec<u8>> {
    let b = base();
    let find = |m: u32, nth: usize| b.nth_of(m, nth);
    use vmfs::format::magic;
    let mut out = vec![Enc::new().u8(0xf).u8(0).finish()];
    // (block selector, op, offset, value)
    let edits: [(u16, u8, u16, u64); 7] = [
        (find(magic::INODE, 3), 2, 52, 4242),       // an inode's owner
        (find(magic::INODE, 4), 3, 256, 999_999),   // an inode's first address
        (find(magic::POINTER, 0), 3, 32, u64::MAX), // a pointer-block entry
        (find(magic::DIR, 0), 3, 32, 77),           // a directory entry's inode
        (find(magic::BITMAP, 0), 6, 0, 3),          // a bitmap bit
        (find(magic::VOLUME, 0), 4, 112, 5),        // a region size in the header
        (find(magic::JSB, 0), 3, 32, 3),            // the journal tail
    ];
    for (sel, op, off, val) in edits {
        let mut e = Enc::new();
        e.u8(0xf).u8(1).u16(sel).u8(op).u16(off).u64(val);
        out.push(e.finish());
    }
    out
}
