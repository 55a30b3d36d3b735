//! The redo journal: whole metadata block images, jbd2-style.
//!
//! A physical transaction is `[descriptor][image 1..n][commit]`, written contiguously and made
//! durable with one flush. The commit block carries a crc32c over the descriptor and every
//! image, so a torn or partly reordered transaction is detected at replay and discarded (it was
//! never acknowledged). Block images carry their own header with `lsn = seq`; replay writes an
//! image home only when the home copy is older (`home.lsn < seq`) or unreadable, so replaying
//! twice, or after a partial checkpoint, never regresses newer data.
//!
//! The log is linear: transactions follow each other from the tail recorded in the journal
//! superblock; when the next one would not fit before the end, the home locations are flushed
//! (every committed image was written home right after its commit) and the superblock is reset
//! to the start with the next sequence number. Old transactions left behind carry older
//! sequence numbers and stop replay.

use thiserror::Error;

use crate::device::{BlockDevice, DeviceError};
use crate::format::{
    get_u32, get_u64, lsn_of, magic, put_u32, put_u64, seal, verify, FormatError, Layout, Region,
    JDESC_ENTRIES_OFFSET, MD_BLOCK, TXN_BLOCKS_MAX,
};

/// Errors of the journal.
#[derive(Debug, Error)]
pub enum JournalError {
    /// Device failure.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The journal superblock is unreadable.
    #[error("journal superblock: {0}")]
    Superblock(FormatError),
    /// A committed transaction names a home block outside the metadata regions of its
    /// image's kind (a crafted or damaged journal): nothing of it is replayed.
    #[error("journal transaction targets block {0}, which is not a metadata block of its kind")]
    BadHome(u64),
    /// A committed transaction holds an image that is not sealed for its home block.
    #[error("journal transaction holds a damaged image: {0}")]
    BadImage(FormatError),
    /// A transaction larger than the limit (the caller must commit earlier).
    #[error("transaction of {0} blocks exceeds the limit of {TXN_BLOCKS_MAX}")]
    TooLarge(usize),
}

/// What mount-time replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Complete transactions found after the tail.
    pub transactions: u64,
    /// Block images written home.
    pub blocks_applied: u64,
    /// Block images skipped because home was already as new.
    pub blocks_skipped: u64,
}

/// The journal's write position and counters.
#[derive(Debug)]
pub struct Journal {
    region: Region,
    /// Next free block, relative to the region start (block 0 is the superblock).
    pos: u64,
    /// Sequence number of the next transaction.
    seq: u64,
    /// Transactions committed since mount.
    pub commits: u64,
    /// Bytes written to the journal since mount.
    pub bytes: u64,
    /// Journal resets so far (every transaction before one is never replayed again).
    pub resets: u64,
    /// Scratch buffer for one transaction, kept to avoid allocating per commit.
    buf: Vec<u8>,
}

fn jsb_encode(region: &Region, tail: u64, seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; MD_BLOCK];
    put_u64(&mut b, 32, tail);
    put_u64(&mut b, 40, seq);
    seal(&mut b, magic::JSB, region.start, 0);
    b
}

fn blk(n: u64) -> u64 {
    n * MD_BLOCK as u64
}

/// A transaction as read from the log: its descriptor block and its block images.
type TxnBytes = (Vec<u8>, Vec<u8>);

/// Reads and validates the transaction at log position `pos` expecting sequence `seq`:
/// descriptor, images and commit block with its crc over the body. `None` when any check
/// fails (end of the log, or a torn transaction).
fn read_txn(
    dev: &dyn BlockDevice,
    region: Region,
    pos: u64,
    seq: u64,
) -> Result<Option<TxnBytes>, JournalError> {
    let at = region.start + pos;
    let mut desc = vec![0u8; MD_BLOCK];
    dev.read_at(blk(at), &mut desc)?;
    if verify(&desc, magic::JDESC, at).is_err() || get_u64(&desc, 32) != seq {
        return Ok(None);
    }
    let count = get_u32(&desc, 40) as usize;
    if count == 0 || count > TXN_BLOCKS_MAX || pos + count as u64 + 2 > region.blocks {
        return Ok(None);
    }
    let mut images = vec![0u8; count * MD_BLOCK];
    dev.read_at(blk(at + 1), &mut images)?;
    let mut commit = vec![0u8; MD_BLOCK];
    let commit_at = at + 1 + count as u64;
    dev.read_at(blk(commit_at), &mut commit)?;
    if verify(&commit, magic::JCOMMIT, commit_at).is_err()
        || get_u64(&commit, 32) != seq
        || get_u32(&commit, 40) as usize != count
    {
        return Ok(None);
    }
    let body_crc = crc32c::crc32c_append(crc32c::crc32c(&desc), &images);
    if get_u32(&commit, 48) != body_crc {
        return Ok(None);
    }
    Ok(Some((desc, images)))
}

impl Journal {
    /// Writes an empty journal (superblock: tail 1, sequence 1).
    pub fn format(dev: &dyn BlockDevice, region: Region) -> Result<(), JournalError> {
        dev.write_at(blk(region.start), &jsb_encode(&region, 1, 1))?;
        // An all-zero block after the superblock stops replay immediately.
        dev.write_at(blk(region.start + 1), &vec![0u8; MD_BLOCK])?;
        Ok(())
    }

    /// Replays committed transactions after the tail, then resets the journal. Returns the
    /// journal ready for new transactions.
    /// Every image is written only to a home that `layout` places in a metadata region of
    /// the image's own kind ([`Layout::accepts_home`]), sealed for that home: a crafted
    /// journal cannot write over the volume header, the journal, data, or past the device.
    pub fn replay(
        dev: &dyn BlockDevice,
        layout: &Layout,
    ) -> Result<(Journal, ReplayReport), JournalError> {
        let region = layout.journal;
        let mut sb = vec![0u8; MD_BLOCK];
        dev.read_at(blk(region.start), &mut sb)?;
        verify(&sb, magic::JSB, region.start).map_err(JournalError::Superblock)?;
        let tail = get_u64(&sb, 32);
        let mut seq = get_u64(&sb, 40);
        if tail == 0 || tail >= region.blocks {
            return Err(JournalError::Superblock(FormatError::Geometry(
                "journal tail outside the journal",
            )));
        }
        let mut pos = tail;
        let mut report = ReplayReport::default();
        let mut home = vec![0u8; MD_BLOCK];
        // Bounded: each iteration advances pos by at least 2 within the region.
        while pos + 2 <= region.blocks {
            // A transient read error (a flipped bit on the way) must not end the log early
            // and lose committed transactions: read the transaction a second time before
            // deciding it is torn (a torn write fails both times).
            let txn = match read_txn(dev, region, pos, seq)? {
                Some(t) => Some(t),
                None => read_txn(dev, region, pos, seq)?,
            };
            let Some((desc, images)) = txn else {
                break;
            };
            let count = images.len() / MD_BLOCK;
            // Validate the whole transaction before writing any of it home.
            for i in 0..count {
                let home_block = get_u64(&desc, JDESC_ENTRIES_OFFSET + i * 16);
                let image = &images[i * MD_BLOCK..(i + 1) * MD_BLOCK];
                let m = get_u32(image, 0);
                if !layout.accepts_home(home_block, m) {
                    return Err(JournalError::BadHome(home_block));
                }
                verify(image, m, home_block).map_err(JournalError::BadImage)?;
            }
            for i in 0..count {
                let home_block = get_u64(&desc, JDESC_ENTRIES_OFFSET + i * 16);
                let image = &images[i * MD_BLOCK..(i + 1) * MD_BLOCK];
                dev.read_at(blk(home_block), &mut home)?;
                let home_lsn = if verify(&home, get_u32(image, 0), home_block).is_ok() {
                    lsn_of(&home)
                } else {
                    0
                };
                if home_lsn >= seq {
                    report.blocks_skipped += 1;
                } else {
                    dev.write_at(blk(home_block), image)?;
                    report.blocks_applied += 1;
                }
            }
            report.transactions += 1;
            pos += count as u64 + 2;
            seq += 1;
        }
        // A torn, never-committed transaction at the end of the log carries the sequence
        // number the next transaction would get: skip that number, so that neither a later
        // replay nor fsck can take the leftover for pending work. Sequence numbers only ever
        // grow, so LSN checks stay valid.
        if region.blocks > pos {
            let mut d = vec![0u8; MD_BLOCK];
            dev.read_at(blk(region.start + pos), &mut d)?;
            if verify(&d, magic::JDESC, region.start + pos).is_ok() && get_u64(&d, 32) == seq {
                seq += 1;
            }
        }
        let mut j = Journal {
            region,
            pos,
            seq,
            commits: 0,
            bytes: 0,
            resets: 0,
            buf: Vec::with_capacity((TXN_BLOCKS_MAX + 2) * MD_BLOCK),
        };
        // Home writes durable, then an empty journal: replay is never needed twice.
        j.reset(dev)?;
        Ok((j, report))
    }

    /// Flushes home writes and restarts the log at its beginning.
    pub fn reset(&mut self, dev: &dyn BlockDevice) -> Result<(), JournalError> {
        dev.flush()?;
        dev.write_at(
            blk(self.region.start),
            &jsb_encode(&self.region, 1, self.seq),
        )?;
        dev.flush()?;
        self.pos = 1;
        self.resets += 1;
        Ok(())
    }

    /// The sequence number the next transaction will get (the LSN to stamp on its blocks).
    pub fn next_seq(&self) -> u64 {
        self.seq
    }

    /// Commits `blocks` (home block number, image) as one transaction: stamps each image with
    /// the transaction's sequence number as LSN, writes descriptor + images + commit, flushes.
    /// On return the transaction is durable; the caller then writes the images home.
    pub fn commit(
        &mut self,
        dev: &dyn BlockDevice,
        blocks: &mut [(u64, Vec<u8>)],
    ) -> Result<u64, JournalError> {
        let n = blocks.len();
        if n == 0 {
            return Ok(self.seq);
        }
        if n > TXN_BLOCKS_MAX {
            return Err(JournalError::TooLarge(n));
        }
        if self.pos + n as u64 + 2 > self.region.blocks {
            self.reset(dev)?;
        }
        let seq = self.seq;
        let at = self.region.start + self.pos;
        self.buf.clear();
        self.buf.resize((n + 2) * MD_BLOCK, 0);
        let (desc, rest) = self.buf.split_at_mut(MD_BLOCK);
        put_u64(desc, 32, seq);
        put_u32(desc, 40, n as u32);
        for (i, (home, image)) in blocks.iter_mut().enumerate() {
            let m = get_u32(image, 0);
            seal(image, m, *home, seq);
            put_u64(desc, JDESC_ENTRIES_OFFSET + i * 16, *home);
            put_u32(
                desc,
                JDESC_ENTRIES_OFFSET + i * 16 + 8,
                crc32c::crc32c(image),
            );
            rest[i * MD_BLOCK..(i + 1) * MD_BLOCK].copy_from_slice(image);
        }
        seal(desc, magic::JDESC, at, seq);
        let body_crc = crc32c::crc32c_append(crc32c::crc32c(desc), &rest[..n * MD_BLOCK]);
        let commit = &mut rest[n * MD_BLOCK..];
        put_u64(commit, 32, seq);
        put_u32(commit, 40, n as u32);
        put_u32(commit, 48, body_crc);
        seal(commit, magic::JCOMMIT, at + 1 + n as u64, seq);
        dev.write_at(blk(at), &self.buf)?;
        dev.flush()?;
        self.pos += n as u64 + 2;
        self.seq += 1;
        self.commits += 1;
        self.bytes += ((n + 2) * MD_BLOCK) as u64;
        Ok(seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::SimDisk;

    /// A 64 MiB layout with a small journal (so tests wrap it) in the reserved header area;
    /// test images live in the pointer-block table, a region replay writes to.
    fn layout() -> Layout {
        let mut l = Layout::compute(64 << 20).unwrap();
        l.journal = Region {
            start: 16,
            blocks: 64,
        };
        l
    }

    /// Home block `n` of the tests (a pointer-table block).
    fn h(n: u64) -> u64 {
        layout().pb_table.start + n
    }

    fn image(home: u64, fill: u8) -> Vec<u8> {
        let mut b = vec![fill; MD_BLOCK];
        seal(&mut b, magic::POINTER, home, 0);
        b
    }

    #[test]
    fn commit_then_replay_applies_and_is_idempotent() {
        let d = SimDisk::new(8 << 20);
        Journal::format(&d, layout().journal).unwrap();
        let (mut j, r) = Journal::replay(&d, &layout()).unwrap();
        assert_eq!(r.transactions, 0);
        let base = d.image();
        let start = d.log_len();
        j.commit(&d, &mut [(h(0), image(h(0), 1)), (h(1), image(h(1), 2))])
            .unwrap();
        let log = d.log();
        // Crash right after the commit, before any home write: replay must apply both.
        let img = SimDisk::crash_image(&base, &log, log.len(), &mut |_| true, &mut |_| None);
        let d2 = SimDisk::from_image(img);
        let (_, r) = Journal::replay(&d2, &layout()).unwrap();
        assert_eq!((r.transactions, r.blocks_applied), (1, 2));
        let mut b = vec![0u8; MD_BLOCK];
        d2.read_at(h(0) * 4096, &mut b).unwrap();
        verify(&b, magic::POINTER, h(0)).unwrap();
        assert_eq!(lsn_of(&b), 1);
        // Replaying again finds an empty journal.
        let (_, r) = Journal::replay(&d2, &layout()).unwrap();
        assert_eq!(r.transactions, 0);
        assert!(start < log.len());
    }

    #[test]
    fn torn_transaction_is_discarded() {
        let d = SimDisk::new(8 << 20);
        Journal::format(&d, layout().journal).unwrap();
        let (mut j, _) = Journal::replay(&d, &layout()).unwrap();
        let base = d.image();
        let before = d.log_len();
        j.commit(&d, &mut [(h(0), image(h(0), 1))]).unwrap();
        let log = d.log();
        // Only the first sector of the 3-block journal write landed (the flush never did).
        let upto = log[before..]
            .iter()
            .position(|o| *o == crate::device::SimOp::Flush)
            .unwrap()
            + before;
        let img = SimDisk::crash_image(&base, &log, upto, &mut |_| true, &mut |_| Some(1));
        let d2 = SimDisk::from_image(img);
        let (_, r) = Journal::replay(&d2, &layout()).unwrap();
        assert_eq!(r.transactions, 0);
    }

    #[test]
    fn replay_never_regresses_newer_home() {
        let d = SimDisk::new(8 << 20);
        Journal::format(&d, layout().journal).unwrap();
        let (mut j, _) = Journal::replay(&d, &layout()).unwrap();
        let mut t1 = [(h(0), image(h(0), 1))];
        j.commit(&d, &mut t1).unwrap();
        let mut t2 = [(h(0), image(h(0), 2))];
        j.commit(&d, &mut t2).unwrap();
        // Home holds the newer image (lsn 2); replay of txn 1 must not overwrite it.
        d.write_at(h(0) * 4096, &t2[0].1).unwrap();
        let (_, r) = Journal::replay(&d, &layout()).unwrap();
        assert_eq!(r.transactions, 2);
        let mut b = vec![0u8; MD_BLOCK];
        d.read_at(h(0) * 4096, &mut b).unwrap();
        assert_eq!(lsn_of(&b), 2);
        assert_eq!(b[1000], 2);
    }

    #[test]
    fn wraps_and_rejects_oversized() {
        let d = SimDisk::new(8 << 20);
        Journal::format(&d, layout().journal).unwrap();
        let (mut j, _) = Journal::replay(&d, &layout()).unwrap();
        for i in 0..100u64 {
            let mut t = [(h(20 + i % 5), image(h(20 + i % 5), i as u8))];
            j.commit(&d, &mut t).unwrap();
            d.write_at(h(20 + i % 5) * 4096, &t[0].1).unwrap();
        }
        let (j2, _) = Journal::replay(&d, &layout()).unwrap();
        assert_eq!(j2.next_seq(), 101);
        let mut big: Vec<(u64, Vec<u8>)> = (0..TXN_BLOCKS_MAX as u64 + 1)
            .map(|i| (h(i), image(h(i), 0)))
            .collect();
        assert!(matches!(
            j.commit(&d, &mut big),
            Err(JournalError::TooLarge(_))
        ));
    }
}
