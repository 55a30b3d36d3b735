//! Extended attributes: one xattr block per inode (in the pointer-block table) holding
//! (name, value) entries. A stateless layer over the inode table and allocator.

use std::collections::BTreeSet;

use crate::alloc::Res;
use crate::error::FsError;
use crate::format::*;
use crate::inode::{now_ns, Inodes};
use crate::txn::Dev;

/// Longest extended-attribute name (Linux's XATTR_NAME_MAX).
pub const XATTR_NAME_MAX: usize = 255;
/// Bytes of the xattr block available for entries (after the 32-byte header and the 8-byte
/// xattr-block header).
pub const XATTR_AREA: usize = MD_BLOCK - XATTR_ENTRIES_OFFSET;
/// Where xattr entries start in an xattr block.
pub const XATTR_ENTRIES_OFFSET: usize = MD_HEADER_BYTES + 8;
/// Bytes of an xattr entry header (name_len u16, value_len u16).
pub const XATTR_ENTRY_HEADER: usize = 4;
/// Largest single value: one entry with a one-byte name filling the whole xattr block.
pub const XATTR_VALUE_MAX: usize = XATTR_AREA - XATTR_ENTRY_HEADER - 1;
/// Offset in an xattr block of the entry count (u16) and bytes used (u16).
const XATTR_COUNT_OFFSET: usize = MD_HEADER_BYTES;
/// setxattr flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XattrSetMode {
    /// Create or replace.
    Any,
    /// XATTR_CREATE: fail if it exists.
    CreateOnly,
    /// XATTR_REPLACE: fail if it does not exist.
    ReplaceOnly,
}

/// Extended attributes as (name, value) pairs, in block order.
pub(crate) type XattrList = Vec<(Vec<u8>, Vec<u8>)>;

/// Parses an xattr block into (name, value) pairs.
fn parse(b: &[u8]) -> Result<XattrList, FsError> {
    let bad = || FsError::Corrupt(FormatError::Geometry("xattr block: bad entry"));
    let count = usize::from(get_u16(b, XATTR_COUNT_OFFSET));
    let mut out = Vec::with_capacity(count);
    let mut o = XATTR_ENTRIES_OFFSET;
    for _ in 0..count {
        if o + XATTR_ENTRY_HEADER > MD_BLOCK {
            return Err(bad());
        }
        let nl = usize::from(get_u16(b, o));
        let vl = usize::from(get_u16(b, o + 2));
        let s = o + XATTR_ENTRY_HEADER;
        if nl == 0 || nl > XATTR_NAME_MAX || s + nl + vl > MD_BLOCK {
            return Err(bad());
        }
        out.push((b[s..s + nl].to_vec(), b[s + nl..s + nl + vl].to_vec()));
        o = s + nl + vl;
    }
    Ok(out)
}

/// Checks an xattr block's entries (for fsck): they decode, fit, and names are unique.
pub(crate) fn check(b: &[u8]) -> Result<(), FsError> {
    let list = parse(b)?;
    let mut names = BTreeSet::new();
    if list.iter().any(|(n, _)| !names.insert(n.clone())) {
        return Err(FsError::Corrupt(FormatError::Geometry(
            "xattr block: duplicate name",
        )));
    }
    if list.is_empty() {
        return Err(FsError::Corrupt(FormatError::Geometry(
            "xattr block: empty (should have been freed)",
        )));
    }
    Ok(())
}

/// Bytes the entries need in an xattr block.
fn bytes(list: &[(Vec<u8>, Vec<u8>)]) -> usize {
    list.iter()
        .map(|(n, v)| XATTR_ENTRY_HEADER + n.len() + v.len())
        .sum()
}

/// Encodes the entries into an xattr block (header left to the caller's seal).
fn encode(b: &mut [u8], list: &[(Vec<u8>, Vec<u8>)]) {
    b[MD_HEADER_BYTES..].fill(0);
    put_u16(b, XATTR_COUNT_OFFSET, list.len() as u16);
    put_u16(b, XATTR_COUNT_OFFSET + 2, bytes(list) as u16);
    let mut o = XATTR_ENTRIES_OFFSET;
    for (n, v) in list {
        put_u16(b, o, n.len() as u16);
        put_u16(b, o + 2, v.len() as u16);
        let s = o + XATTR_ENTRY_HEADER;
        b[s..s + n.len()].copy_from_slice(n);
        b[s + n.len()..s + n.len() + v.len()].copy_from_slice(v);
        o = s + n.len() + v.len();
    }
}

pub(crate) fn list(g: &mut Inodes, dev: &Dev, inode: &Inode) -> Result<XattrList, FsError> {
    if inode.xattr_block == 0 {
        return Ok(Vec::new());
    }
    if inode.xattr_block > g.vh.layout.pb_count {
        return Err(FsError::Corrupt(FormatError::Geometry(
            "inode: xattr block out of range",
        )));
    }
    let b = g.vh.layout.pb_block(inode.xattr_block - 1);
    let blk = g.md(dev, b)?;
    if get_u32(blk, 0) != magic::XATTR {
        return Err(FsError::Corrupt(FormatError::Geometry(
            "inode: xattr block is not one",
        )));
    }
    parse(blk)
}

/// Stores the list (allocating or freeing the block), bumps attr_gen and ctime.
pub(crate) fn store(
    g: &mut Inodes,
    dev: &Dev,
    mut inode: Inode,
    list: &[(Vec<u8>, Vec<u8>)],
) -> Result<(), FsError> {
    if bytes(list) > XATTR_AREA {
        return Err(FsError::XattrTooBig);
    }
    if list.is_empty() {
        if inode.xattr_block != 0 {
            g.release(dev, Res::Pb, inode.xattr_block - 1)?;
            inode.xattr_block = 0;
        }
    } else {
        if inode.xattr_block == 0 {
            inode.xattr_block = g.alloc(dev, Res::Pb)? + 1;
        }
        let b = g.vh.layout.pb_block(inode.xattr_block - 1);
        let blk = g.md_mut(dev, b)?;
        put_u32(blk, 0, magic::XATTR);
        encode(blk, list);
    }
    inode.attr_gen = inode.attr_gen.wrapping_add(1);
    inode.ctime_ns = now_ns();
    g.put_inode(dev, &inode)
}

/// The value of attribute `name`.
pub(crate) fn get(g: &mut Inodes, dev: &Dev, ino: u64, name: &[u8]) -> Result<Vec<u8>, FsError> {
    let i = g.get_inode(dev, ino)?;
    list(g, dev, &i)?
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v)
        .ok_or(FsError::NoXattr)
}

/// The attribute names of `ino`.
pub(crate) fn names(g: &mut Inodes, dev: &Dev, ino: u64) -> Result<Vec<Vec<u8>>, FsError> {
    let i = g.get_inode(dev, ino)?;
    Ok(list(g, dev, &i)?.into_iter().map(|(n, _)| n).collect())
}

/// Sets attribute `name` (name and value lengths checked by the caller).
pub(crate) fn set(
    g: &mut Inodes,
    dev: &Dev,
    ino: u64,
    name: &[u8],
    value: &[u8],
    mode: XattrSetMode,
) -> Result<(), FsError> {
    let i = g.get_inode(dev, ino)?;
    let mut l = list(g, dev, &i)?;
    match (l.iter().position(|(n, _)| n == name), mode) {
        (Some(_), XattrSetMode::CreateOnly) => return Err(FsError::Exists("xattr".into())),
        (None, XattrSetMode::ReplaceOnly) => return Err(FsError::NoXattr),
        (Some(p), _) => l[p].1 = value.to_vec(),
        (None, _) => l.push((name.to_vec(), value.to_vec())),
    }
    if bytes(&l) > XATTR_AREA {
        return Err(FsError::XattrTooBig);
    }
    store(g, dev, i, &l)
}

/// Removes attribute `name`.
pub(crate) fn remove(g: &mut Inodes, dev: &Dev, ino: u64, name: &[u8]) -> Result<(), FsError> {
    let i = g.get_inode(dev, ino)?;
    let mut l = list(g, dev, &i)?;
    let p = l
        .iter()
        .position(|(n, _)| n == name)
        .ok_or(FsError::NoXattr)?;
    l.remove(p);
    store(g, dev, i, &l)
}
