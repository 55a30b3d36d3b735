//! fsck: an offline, read-only check of every invariant of a datastore.
//!
//! It reads the device directly with the format module's decoders (not through the
//! datastore code it checks) and reports problems in plain words: checksums and self
//! addresses of every metadata block, an empty journal, each allocated resource referenced
//! exactly once, no reference to a free resource, sizes against block maps, directory entries
//! against inodes (allocation, generation, type), link counts, and reachability.
//!
//! [`recover`] is the one step that writes: after a crash it replays the journal and frees
//! orphans exactly as mount does (as e2fsck replays a journal before checking), so an
//! operator can check a datastore offline without starting stratad first.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use crate::device::{BlockDevice, DeviceError};
use crate::format::*;
use crate::fs::{Datastore, FsError};
use crate::journal::ReplayReport;

/// The result of a check.
#[derive(Debug, Clone, Default)]
pub struct FsckReport {
    /// Problems found, one sentence each; empty when the datastore is clean.
    pub problems: Vec<String>,
    /// Regular files.
    pub files: u64,
    /// Directories (including the root).
    pub dirs: u64,
    /// File blocks in use.
    pub fb_used: u64,
    /// Sub-blocks in use.
    pub sb_used: u64,
    /// Pointer blocks in use.
    pub pb_used: u64,
}

impl FsckReport {
    /// True when no problem was found.
    pub fn clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Problems reported at most; a badly damaged volume would otherwise produce millions.
const PROBLEMS_MAX: usize = 1000;

struct Checker<'a> {
    dev: &'a dyn BlockDevice,
    layout: Layout,
    report: FsckReport,
}

fn blk(n: u64) -> u64 {
    n * MD_BLOCK as u64
}

impl Checker<'_> {
    fn problem(&mut self, p: String) {
        if self.report.problems.len() < PROBLEMS_MAX {
            self.report.problems.push(p);
        }
    }

    /// Reads a metadata block; `None` (with a problem recorded) if it fails validation.
    /// All-zero blocks are valid unused blocks.
    fn read_md(&mut self, block: u64, m: u32, what: &str) -> Result<Option<Vec<u8>>, DeviceError> {
        let mut b = vec![0u8; MD_BLOCK];
        self.dev.read_at(blk(block), &mut b)?;
        if b.iter().all(|&x| x == 0) {
            return Ok(Some(b));
        }
        match verify(&b, m, block) {
            Ok(()) => Ok(Some(b)),
            Err(e) => {
                self.problem(format!("{what} (block {block}) is damaged: {e}"));
                Ok(None)
            }
        }
    }

    fn bitmap(&mut self, region: Region, count: u64, what: &str) -> Result<Vec<bool>, DeviceError> {
        let mut bits = vec![false; count as usize];
        for i in 0..region.blocks {
            let Some(b) = self.read_md(region.start + i, magic::BITMAP, what)? else {
                continue;
            };
            for j in 0..BITS_PER_BITMAP_BLOCK {
                let idx = i * BITS_PER_BITMAP_BLOCK + j;
                let set = bit(&b, j);
                if idx < count {
                    bits[idx as usize] = set;
                } else if set {
                    self.problem(format!(
                        "{what} marks resource {idx} beyond the end as used"
                    ));
                }
            }
        }
        Ok(bits)
    }
}

/// True when the journal holds committed transactions after its tail (a crash before
/// unmount): [`recover`] (or a mount) applies them. `false` when there is no readable
/// volume header or journal superblock ([`fsck`] reports those).
pub fn journal_pending(dev: &dyn BlockDevice) -> Result<bool, DeviceError> {
    let size = dev.size();
    if size < 2 * MD_BLOCK as u64 {
        return Ok(false);
    }
    let mut b = vec![0u8; MD_BLOCK];
    let mut vh = None;
    for at in [0, 1] {
        dev.read_at(blk(at), &mut b)?;
        if let Ok(h) = VolumeHeader::decode(&b, at, size) {
            vh = Some(h);
            break;
        }
    }
    let Some(vh) = vh else {
        return Ok(false);
    };
    let j = vh.layout.journal;
    dev.read_at(blk(j.start), &mut b)?;
    if verify(&b, magic::JSB, j.start).is_err() {
        return Ok(false);
    }
    let (tail, seq) = (get_u64(&b, 32), get_u64(&b, 40));
    if tail == 0 || tail >= j.blocks {
        return Ok(false);
    }
    dev.read_at(blk(j.start + tail), &mut b)?;
    Ok(verify(&b, magic::JDESC, j.start + tail).is_ok() && get_u64(&b, 32) == seq)
}

/// Crash recovery, offline: mounts (journal replay, orphans freed) and unmounts cleanly,
/// leaving an empty journal. Returns what replay did.
pub fn recover(dev: Arc<dyn BlockDevice>) -> Result<ReplayReport, FsError> {
    let ds = Datastore::mount(dev)?;
    let report = ds.replay_report().clone();
    ds.unmount()?;
    Ok(report)
}

/// Checks the datastore on `dev`. `Err` only when the device cannot be read at all.
pub fn fsck(dev: &dyn BlockDevice) -> Result<FsckReport, DeviceError> {
    fsck_with_progress(dev, &mut |_, _| {})
}

/// [`fsck`], calling `progress(done, total)` as it goes through the inode table (the long
/// part on a large datastore).
pub fn fsck_with_progress(
    dev: &dyn BlockDevice,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<FsckReport, DeviceError> {
    let size = dev.size();
    let mut b = vec![0u8; MD_BLOCK];
    let mut report = FsckReport::default();
    if size < 2 * MD_BLOCK as u64 {
        report
            .problems
            .push("the device is too small to hold a datastore".into());
        return Ok(report);
    }
    dev.read_at(0, &mut b)?;
    let primary = VolumeHeader::decode(&b, 0, size);
    dev.read_at(blk(1), &mut b)?;
    let backup = VolumeHeader::decode(&b, 1, size);
    let vh = match (&primary, &backup) {
        (Ok(p), Ok(bk)) => {
            if p.uuid != bk.uuid || p.layout != bk.layout {
                report
                    .problems
                    .push("the primary and backup volume headers disagree".into());
            }
            p.clone()
        }
        (Ok(p), Err(e)) => {
            report
                .problems
                .push(format!("the backup volume header is damaged: {e}"));
            p.clone()
        }
        (Err(e), Ok(bk)) => {
            report
                .problems
                .push(format!("the primary volume header is damaged: {e}"));
            bk.clone()
        }
        (Err(e), Err(_)) => {
            report.problems.push(format!("no valid volume header: {e}"));
            return Ok(report);
        }
    };
    let mut c = Checker {
        dev,
        layout: vh.layout,
        report,
    };
    check_journal(&mut c)?;
    let l = c.layout;
    let fd_bits = c.bitmap(l.fd_bitmap, l.fd_count, "the inode bitmap")?;
    let pb_bits = c.bitmap(l.pb_bitmap, l.pb_count, "the pointer-block bitmap")?;
    let sb_bits = c.bitmap(l.sb_bitmap, l.sb_count, "the sub-block bitmap")?;
    let fb_bits = c.bitmap(l.fb_bitmap, l.fb_count, "the file-block bitmap")?;
    if fd_bits.first() == Some(&true) {
        c.problem("inode 0 (reserved) is marked in use".into());
    }
    let mut pb_ref = vec![false; l.pb_count as usize];
    let mut sb_ref = vec![false; l.sb_count as usize];
    let mut fb_ref = vec![false; l.fb_count as usize];
    let mut inodes: HashMap<u64, (Inode, Vec<u8>)> = HashMap::new();
    for ino in 1..l.fd_count {
        progress(ino, l.fd_count - 1);
        if !fd_bits[ino as usize] {
            continue;
        }
        let what = format!("inode {ino}");
        let Some(blockb) = c.read_md(l.inode_block(ino), magic::INODE, &what)? else {
            continue;
        };
        let inode = match Inode::decode(&blockb) {
            Ok(i) => i,
            Err(e) => {
                c.problem(format!("inode {ino} is unreadable: {e}"));
                continue;
            }
        };
        if inode.ino != ino {
            c.problem(format!("inode {ino} says it is inode {}", inode.ino));
            continue;
        }
        let t = inode.mode & S_IFMT;
        if ftype_of(inode.mode) == 0 {
            c.problem(format!("inode {ino} has an unknown file type {t:o}"));
        }
        if t == S_IFLNK && (inode.size == 0 || inode.size > crate::ns::SYMLINK_MAX as u64) {
            c.problem(format!(
                "symlink {ino} has a target of {} bytes (1..={} allowed)",
                inode.size,
                crate::ns::SYMLINK_MAX
            ));
        }
        if inode.xattr_block != 0 {
            let i = inode.xattr_block - 1;
            if i >= l.pb_count {
                c.problem(format!(
                    "inode {ino} points to xattr block {i}, which does not exist"
                ));
            } else {
                if !pb_bits[i as usize] {
                    c.problem(format!(
                        "inode {ino} uses xattr block {i}, which is marked free"
                    ));
                }
                if pb_ref[i as usize] {
                    c.problem(format!(
                        "pointer block {i} is used by more than one file (inode {ino}'s xattrs too)"
                    ));
                }
                pb_ref[i as usize] = true;
                let what = format!("xattr block of inode {ino}");
                if let Some(xb) = c.read_md(l.pb_block(i), magic::XATTR, &what)? {
                    if let Err(e) = crate::xattr::check(&xb) {
                        c.problem(format!("inode {ino}: {e}"));
                    }
                }
            }
        }
        let count = check_blocks(
            &mut c,
            &inode,
            &blockb,
            &pb_bits,
            &sb_bits,
            &fb_bits,
            &mut pb_ref,
            &mut sb_ref,
            &mut fb_ref,
        )?;
        if count != inode.allocated {
            c.problem(format!(
                "inode {ino} records {} allocated blocks but maps {count}",
                inode.allocated
            ));
        }
        inodes.insert(ino, (inode, blockb));
    }
    for (i, (&set, &r)) in pb_bits.iter().zip(&pb_ref).enumerate() {
        if set && !r {
            c.problem(format!(
                "pointer block {i} is marked in use but no file uses it (leak)"
            ));
        }
    }
    for (i, (&set, &r)) in sb_bits.iter().zip(&sb_ref).enumerate() {
        if set && !r {
            c.problem(format!(
                "sub-block {i} is marked in use but no file uses it (leak)"
            ));
        }
    }
    for (i, (&set, &r)) in fb_bits.iter().zip(&fb_ref).enumerate() {
        if set && !r {
            c.problem(format!(
                "file block {i} is marked in use but no file uses it (leak)"
            ));
        }
    }
    c.report.pb_used = pb_ref.iter().filter(|&&x| x).count() as u64;
    c.report.sb_used = sb_ref.iter().filter(|&&x| x).count() as u64;
    c.report.fb_used = fb_ref.iter().filter(|&&x| x).count() as u64;
    check_tree(&mut c, &inodes)?;
    Ok(c.report)
}

fn check_journal(c: &mut Checker<'_>) -> Result<(), DeviceError> {
    let j = c.layout.journal;
    let Some(sb) = c.read_md(j.start, magic::JSB, "the journal superblock")? else {
        return Ok(());
    };
    let tail = get_u64(&sb, 32);
    let seq = get_u64(&sb, 40);
    if tail == 0 || tail >= j.blocks {
        c.problem("the journal superblock points outside the journal".into());
        return Ok(());
    }
    let mut d = vec![0u8; MD_BLOCK];
    c.dev.read_at(blk(j.start + tail), &mut d)?;
    if verify(&d, magic::JDESC, j.start + tail).is_ok() && get_u64(&d, 32) == seq {
        c.problem("the journal holds transactions not yet replayed (fsck without --no-replay, or a mount, recovers)".into());
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn check_blocks(
    c: &mut Checker<'_>,
    inode: &Inode,
    b: &[u8],
    pb_bits: &[bool],
    sb_bits: &[bool],
    fb_bits: &[bool],
    pb_ref: &mut [bool],
    sb_ref: &mut [bool],
    fb_ref: &mut [bool],
) -> Result<u64, DeviceError> {
    let ino = inode.ino;
    let l = c.layout;
    let mut count = 0u64;
    // Marks resource `i` of a kind referenced; reports out-of-range, free and shared ones.
    let claim = |c: &mut Checker<'_>, kind: &str, i: u64, bits: &[bool], refs: &mut [bool]| {
        if i as usize >= bits.len() {
            c.problem(format!(
                "inode {ino} points to {kind} {i}, which does not exist"
            ));
            return false;
        }
        if !bits[i as usize] {
            c.problem(format!("inode {ino} uses {kind} {i}, which is marked free"));
        }
        if refs[i as usize] {
            c.problem(format!(
                "{kind} {i} is used by more than one file (inode {ino} too)"
            ));
        }
        refs[i as usize] = true;
        true
    };
    match inode.layout {
        DataLayout::Resident => {
            if inode.size > RESIDENT_MAX {
                c.problem(format!(
                    "inode {ino} keeps {} bytes resident (limit {RESIDENT_MAX})",
                    inode.size
                ));
            }
        }
        DataLayout::SubBlocks => {
            if inode.size > SB_FILE_MAX_BLOCKS * SUB_BLOCK {
                c.problem(format!("inode {ino} is too large for sub-blocks"));
            }
            let used = inode.size.div_ceil(SUB_BLOCK);
            for i in 0..INODE_ADDRS {
                let a = inode_addr(b, i);
                if a == 0 {
                    continue;
                }
                if i as u64 >= used {
                    c.problem(format!("inode {ino} maps sub-block slot {i} past its size"));
                }
                if claim(c, "sub-block", a - 1, sb_bits, sb_ref) {
                    count += 1;
                }
            }
        }
        DataLayout::FileBlocks => {
            let used = inode.size.div_ceil(FILE_BLOCK);
            for slot in 0..INODE_ADDRS {
                let a = inode_addr(b, slot);
                if a == 0 {
                    continue;
                }
                if !claim(c, "pointer block", a - 1, pb_bits, pb_ref) {
                    continue;
                }
                let what = format!("pointer block {} of inode {ino}", a - 1);
                let Some(pb) = c.read_md(l.pb_block(a - 1), magic::POINTER, &what)? else {
                    continue;
                };
                let mut mapped = false;
                for e in 0..PB_ENTRIES {
                    let v = pb_entry(&pb, e);
                    if v & !PB_TBZ == 0 {
                        continue;
                    }
                    mapped = true;
                    let fbi = (slot * PB_ENTRIES + e) as u64;
                    if fbi >= used {
                        c.problem(format!("inode {ino} maps file block {fbi} past its size"));
                    }
                    if claim(c, "file block", (v & !PB_TBZ) - 1, fb_bits, fb_ref) {
                        count += 1;
                    }
                }
                if !mapped {
                    // vmfs frees a pointer block with its last entry and only ever frees it
                    // that way, so one that maps nothing would never be freed (a leak once
                    // the inode goes).
                    c.problem(format!(
                        "inode {ino} holds pointer block {} (slot {slot}), which maps nothing",
                        a - 1
                    ));
                }
            }
        }
    }
    Ok(count)
}

/// Reads a directory's bytes with the checker's own block walk.
fn dir_bytes(c: &mut Checker<'_>, inode: &Inode, b: &[u8]) -> Result<Vec<u8>, DeviceError> {
    let size = inode.size.min(crate::dir::DIR_BYTES_MAX) as usize;
    let mut out = vec![0u8; size];
    match inode.layout {
        DataLayout::Resident => {
            let n = size.min(RESIDENT_MAX as usize);
            out[..n].copy_from_slice(&b[INODE_ADDR_OFFSET..INODE_ADDR_OFFSET + n]);
        }
        DataLayout::SubBlocks => {
            for (i, chunk) in out.chunks_mut(SUB_BLOCK as usize).enumerate() {
                let a = inode_addr(b, i);
                if a != 0 && a - 1 < c.layout.sb_count {
                    c.dev.read_at(c.layout.sb_offset(a - 1), chunk)?;
                }
            }
        }
        DataLayout::FileBlocks => {
            for (i, chunk) in out.chunks_mut(FILE_BLOCK as usize).enumerate() {
                let slot = i / PB_ENTRIES;
                let a = inode_addr(b, slot);
                if a == 0 || a > c.layout.pb_count {
                    continue;
                }
                let mut pb = vec![0u8; MD_BLOCK];
                c.dev.read_at(blk(c.layout.pb_block(a - 1)), &mut pb)?;
                let v = pb_entry(&pb, i % PB_ENTRIES);
                if v & !PB_TBZ != 0 && v & PB_TBZ == 0 && (v - 1) < c.layout.fb_count {
                    c.dev.read_at(c.layout.fb_offset(v - 1), chunk)?;
                }
            }
        }
    }
    if b[crate::dir::DIR_FORMAT_OFFSET] == crate::dir::DIR_SEALED {
        // Sealed directory: each 4 KiB block is a directory block (or all zero = empty);
        // hand back the plain array of entries.
        let per = crate::dir::DIRB_ENTRIES * DIRENT_BYTES;
        let mut plain = Vec::with_capacity(out.len() / MD_BLOCK * per);
        for (k, chunk) in out.chunks_exact(MD_BLOCK).enumerate() {
            if chunk.iter().all(|&x| x == 0) {
                plain.resize(plain.len() + per, 0);
                continue;
            }
            if get_u32(chunk, 0) != magic::DIR || crc32_ok(chunk).is_err() {
                c.problem(format!(
                    "directory {}: block {k} is not a valid directory block",
                    inode.ino
                ));
                plain.resize(plain.len() + per, 0);
                continue;
            }
            plain.extend_from_slice(&chunk[MD_HEADER_BYTES..MD_HEADER_BYTES + per]);
        }
        return Ok(plain);
    }
    Ok(out)
}

/// Checks a directory block's magic and crc (its self address is checked by its position).
fn crc32_ok(chunk: &[u8]) -> Result<(), FormatError> {
    verify(chunk, magic::DIR, get_u64(chunk, 8))
}

fn check_tree(
    c: &mut Checker<'_>,
    inodes: &HashMap<u64, (Inode, Vec<u8>)>,
) -> Result<(), DeviceError> {
    let Some((root, _)) = inodes.get(&ROOT_INO) else {
        c.problem("the root directory (inode 1) is missing".into());
        return Ok(());
    };
    if !root.is_dir() {
        c.problem("the root inode is not a directory".into());
        return Ok(());
    }
    let mut refs: HashMap<u64, u32> = HashMap::new();
    let mut subdirs: HashMap<u64, u32> = HashMap::new();
    let mut seen_dirs: HashSet<u64> = HashSet::new();
    let mut queue = VecDeque::from([ROOT_INO]);
    seen_dirs.insert(ROOT_INO);
    // Bounded: each directory is queued once (seen_dirs).
    while let Some(dir) = queue.pop_front() {
        let Some((dinode, dblock)) = inodes.get(&dir) else {
            continue;
        };
        c.report.dirs += 1;
        let bytes = dir_bytes(c, dinode, dblock)?;
        if bytes.len() % DIRENT_BYTES != 0 {
            c.problem(format!("directory {dir} has a partial entry at its end"));
        }
        let mut names = HashSet::new();
        for chunk in bytes.chunks_exact(DIRENT_BYTES) {
            let e = match DirEntry::decode(chunk) {
                Ok(Some(e)) => e,
                Ok(None) => continue,
                Err(err) => {
                    c.problem(format!("directory {dir} has a damaged entry: {err}"));
                    continue;
                }
            };
            if !names.insert(e.name.clone()) {
                c.problem(format!("directory {dir} holds the name '{}' twice", e.name));
            }
            let Some((target, _)) = inodes.get(&e.ino) else {
                c.problem(format!(
                    "entry '{}' in directory {dir} points to inode {}, which is not in use",
                    e.name, e.ino
                ));
                continue;
            };
            if target.generation != e.generation {
                c.problem(format!(
                    "entry '{}' in directory {dir} refers to an older use of inode {}",
                    e.name, e.ino
                ));
            }
            let is_dir = target.is_dir();
            if ftype_of(target.mode) != e.ftype {
                c.problem(format!(
                    "entry '{}' in directory {dir} has the wrong type",
                    e.name
                ));
            }
            *refs.entry(e.ino).or_insert(0) += 1;
            if is_dir {
                *subdirs.entry(dir).or_insert(0) += 1;
                if target.parent != dir {
                    c.problem(format!(
                        "directory {} is in directory {dir} but records parent {}",
                        e.ino, target.parent
                    ));
                }
                if seen_dirs.insert(e.ino) {
                    queue.push_back(e.ino);
                } else {
                    c.problem(format!("directory {} is linked more than once", e.ino));
                }
            }
        }
    }
    let mut inos: Vec<&u64> = inodes.keys().collect();
    inos.sort();
    for &ino in inos {
        let (inode, _) = &inodes[&ino];
        let r = refs.get(&ino).copied().unwrap_or(0);
        if ino != ROOT_INO && r == 0 && inode.nlink == 0 {
            c.problem(format!(
                "inode {ino} is an orphan (unlinked while open); the next mount frees it"
            ));
            continue;
        }
        if ino != ROOT_INO && r == 0 {
            c.problem(format!(
                "inode {ino} is in use but no directory refers to it (orphan)"
            ));
            continue;
        }
        if inode.is_dir() {
            let want = 2 + subdirs.get(&ino).copied().unwrap_or(0);
            if inode.nlink != want {
                c.problem(format!(
                    "directory {ino} has link count {} but {want} links",
                    inode.nlink
                ));
            }
        } else {
            c.report.files += 1;
            if inode.nlink != r {
                c.problem(format!(
                    "file {ino} has link count {} but {r} links",
                    inode.nlink
                ));
            }
        }
    }
    Ok(())
}
