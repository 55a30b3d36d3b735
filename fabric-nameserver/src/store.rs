//! Durability: a write-ahead log with group commit, and snapshots.
//!
//! Files in the data directory:
//! - `wal.log`: records appended in order. Each record, fixed layout, little-endian:
//!
//!   | bytes | field |
//!   |---|---|
//!   | 0..4 | `len`: payload length in bytes (≤ [`MAX_RECORD_BYTES`]) |
//!   | 4..8 | `crc`: CRC32C of bytes 8..16+len (sequence number and payload) |
//!   | 8..16 | `seq`: sequence number, strictly increasing from 1 |
//!   | 16..16+len | payload (a JSON-encoded registry record) |
//!
//!   Recovery reads records until the first one that is short or fails its CRC. If no valid
//!   record follows, that is a write torn by a crash (only the last, unacknowledged batch can
//!   be): the file is truncated there and every record newer than the snapshot replayed. If
//!   a valid record does follow, the log is corrupt in the middle: truncating would silently
//!   drop records that were durable and acknowledged, so recovery fails with
//!   [`StoreError::CorruptLog`] naming the offset, and the operator decides (restore the
//!   file, or truncate it there knowingly). A filesystem that persisted a later page of the
//!   last unsynced batch before an earlier one would also be reported; it loses nothing
//!   acknowledged, and the message says how to proceed.
//! - `snapshot.json`: `{"seq": S, "state": ...}`, the whole state after record S; written to
//!   `snapshot.json.tmp`, fsynced, renamed over the old one, and the directory fsynced, before
//!   the log is truncated.
//!
//! Group commit: callers append records to an in-memory batch (in the order they change the
//! registry) and wait; one committer thread writes the whole batch with a single `write` and
//! one `fdatasync`, then wakes every caller whose record is now durable. Under load a batch
//! holds every registration that arrived during the previous fsync.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};

use thiserror::Error;

/// Largest record payload: one entity at its largest (MAX_OBJECTS_PER_ENTITY children of a
/// few hundred bytes of JSON each) fits comfortably.
pub const MAX_RECORD_BYTES: usize = 16 * 1024 * 1024;
/// Record header size.
pub const RECORD_HEADER_LEN: usize = 16;
/// Log size after which the server writes a snapshot and truncates the log.
pub const SNAPSHOT_AFTER_WAL_BYTES: u64 = 64 * 1024 * 1024;

const WAL_FILE: &str = "wal.log";
const SNAPSHOT_FILE: &str = "snapshot.json";
const SNAPSHOT_TMP: &str = "snapshot.json.tmp";
const LOCK_FILE: &str = "lock";

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data directory {0} is in use by another name server")]
    Locked(PathBuf),
    #[error("record of {0} bytes exceeds the limit")]
    RecordTooLarge(usize),
    #[error("the log cannot be written (an earlier write failed); refusing further changes")]
    Failed,
    #[error("snapshot {0} is corrupt: {1}")]
    Snapshot(PathBuf, String),
    #[error(
        "write-ahead log {path} is corrupt at byte {offset}, and a valid record (sequence \
         {next_seq}) follows at byte {next_offset}: this is not a torn tail, and cutting the \
         log there would lose durable records. Restore the file from a copy, or, to discard \
         everything from byte {offset} on, truncate it to {offset} bytes \
         (`truncate -s {offset} {path}`)"
    )]
    CorruptLog {
        path: PathBuf,
        offset: usize,
        next_offset: usize,
        next_seq: u64,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What recovery found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// The snapshot's state (JSON) and sequence number.
    pub snapshot: Option<(u64, Vec<u8>)>,
    /// Records newer than the snapshot, in order.
    pub records: Vec<Vec<u8>>,
    /// Bytes dropped from the end of the log (a torn write).
    pub truncated_bytes: u64,
}

#[derive(Debug)]
struct Shared {
    batch: Vec<u8>,
    /// Records in `batch`.
    batch_records: u64,
    last_seq: u64,
    durable_seq: u64,
    failed: bool,
    shutdown: bool,
}

/// Counters of the log's activity.
#[derive(Debug, Default, Clone, Copy)]
pub struct StoreStats {
    pub commits: u64,
    pub records: u64,
    pub snapshots: u64,
    pub wal_bytes: u64,
    /// Time spent in write + fdatasync of batches, and the longest one (nanoseconds).
    pub commit_nanos: u64,
    pub max_commit_nanos: u64,
}

/// The write-ahead log of one data directory.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    shared: Mutex<Shared>,
    work: Condvar,
    durable: Condvar,
    wal: Mutex<(File, StoreStats)>,
    _lock: File,
}

/// Encodes one record (header + payload). Pure.
pub fn encode_record(seq: u64, payload: &[u8], out: &mut Vec<u8>) {
    let mut crc = crc32c::crc32c(&seq.to_le_bytes());
    crc = crc32c::crc32c_append(crc, payload);
    // Payload length is checked against MAX_RECORD_BYTES (< 4 GiB) by the caller.
    out.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(payload);
}

/// Decodes records from a log image; returns them with the length of the valid prefix.
/// Pure: a short or corrupt record ends the log.
pub fn decode_records(buf: &[u8]) -> (Vec<(u64, &[u8])>, usize) {
    let mut out = Vec::new();
    let mut off = 0usize;
    while let Some(h) = buf.get(off..off + RECORD_HEADER_LEN) {
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let seq_bytes = &h[8..16];
        if len > MAX_RECORD_BYTES {
            break;
        }
        let start = off + RECORD_HEADER_LEN;
        let Some(payload) = buf.get(start..start + len) else {
            break;
        };
        let c = crc32c::crc32c_append(crc32c::crc32c(seq_bytes), payload);
        if c != crc {
            break;
        }
        let mut sb = [0u8; 8];
        sb.copy_from_slice(seq_bytes);
        out.push((u64::from_le_bytes(sb), payload));
        off = start + len;
    }
    (out, off)
}

/// After a bad record at `bad`, the first valid record further on, as (offset, sequence
/// number), if any. Pure. Records are written with consecutive sequence numbers, each at
/// least a header long, so a record after `bad` has a sequence number above `prev_seq` (the
/// last good one; `floor_seq`, the snapshot's, bounds it when there is none) by at most the
/// number of headers that fit: candidates outside that window are skipped before their CRC
/// is computed, which keeps the scan linear on garbage.
pub fn find_record_after(
    buf: &[u8],
    bad: usize,
    prev_seq: u64,
    floor_seq: u64,
) -> Option<(usize, u64)> {
    let remaining = buf.len().saturating_sub(bad);
    let max_seq = prev_seq
        .max(floor_seq)
        .saturating_add((remaining / RECORD_HEADER_LEN) as u64 + 1);
    let mut off = bad + 1;
    while let Some(h) = buf.get(off..off + RECORD_HEADER_LEN) {
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let mut sb = [0u8; 8];
        sb.copy_from_slice(&h[8..16]);
        let seq = u64::from_le_bytes(sb);
        let start = off + RECORD_HEADER_LEN;
        if seq > prev_seq && seq <= max_seq && len <= MAX_RECORD_BYTES {
            if let Some(payload) = buf.get(start..start + len) {
                if crc32c::crc32c_append(crc32c::crc32c(&h[8..16]), payload) == crc {
                    return Some((off, seq));
                }
            }
        }
        off += 1;
    }
    None
}

fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

impl Store {
    /// Opens (creating if needed) a data directory, locks it, and recovers its contents.
    pub fn open(dir: &Path) -> Result<(Store, Recovered), StoreError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        // SAFETY: flock on a file descriptor we own and keep open for the Store's lifetime.
        let rc = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&lock),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        };
        if rc != 0 {
            return Err(StoreError::Locked(dir.to_owned()));
        }
        let mut rec = Recovered::default();
        let snap_path = dir.join(SNAPSHOT_FILE);
        let mut snap_seq = 0;
        match std::fs::read(&snap_path) {
            Ok(bytes) => {
                let v: SnapshotHeader = serde_json::from_slice(&bytes)
                    .map_err(|e| StoreError::Snapshot(snap_path.clone(), e.to_string()))?;
                snap_seq = v.seq;
                rec.snapshot = Some((v.seq, bytes));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&snap_path)(e)),
        }
        let wal_path = dir.join(WAL_FILE);
        let mut wal = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&wal_path)
            .map_err(io(&wal_path))?;
        let mut buf = Vec::new();
        wal.read_to_end(&mut buf).map_err(io(&wal_path))?;
        let (records, valid) = decode_records(&buf);
        let mut last_seq = snap_seq;
        let mut last_logged = 0;
        for (seq, payload) in records {
            if seq > snap_seq {
                rec.records.push(payload.to_vec());
            }
            last_seq = last_seq.max(seq);
            last_logged = seq;
        }
        if valid < buf.len() {
            if let Some((next_offset, next_seq)) =
                find_record_after(&buf, valid, last_logged, snap_seq)
            {
                return Err(StoreError::CorruptLog {
                    path: wal_path,
                    offset: valid,
                    next_offset,
                    next_seq,
                });
            }
            rec.truncated_bytes = (buf.len() - valid) as u64;
            tracing::warn!(
                bytes = rec.truncated_bytes,
                "write-ahead log ends with a torn record; truncating it"
            );
            wal.set_len(valid as u64).map_err(io(&wal_path))?;
            wal.sync_all().map_err(io(&wal_path))?;
        }
        fsync_dir(dir)?;
        let stats = StoreStats {
            wal_bytes: valid as u64,
            ..Default::default()
        };
        let store = Store {
            dir: dir.to_owned(),
            shared: Mutex::new(Shared {
                batch: Vec::new(),
                batch_records: 0,
                last_seq,
                durable_seq: last_seq,
                failed: false,
                shutdown: false,
            }),
            work: Condvar::new(),
            durable: Condvar::new(),
            wal: Mutex::new((wal, stats)),
            _lock: lock,
        };
        Ok((store, rec))
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        // A panic while holding the lock cannot leave Shared inconsistent (plain fields).
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wal(&self) -> MutexGuard<'_, (File, StoreStats)> {
        self.wal.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a record to the current batch; returns its sequence number. Callers append in
    /// the order they changed the state (under the registry lock).
    pub fn append(&self, payload: &[u8]) -> Result<u64, StoreError> {
        if payload.len() > MAX_RECORD_BYTES {
            return Err(StoreError::RecordTooLarge(payload.len()));
        }
        let mut s = self.shared();
        if s.failed {
            return Err(StoreError::Failed);
        }
        s.last_seq += 1;
        let seq = s.last_seq;
        encode_record(seq, payload, &mut s.batch);
        s.batch_records += 1;
        drop(s);
        self.work.notify_one();
        Ok(seq)
    }

    /// The sequence number of the last appended record.
    pub fn last_seq(&self) -> u64 {
        self.shared().last_seq
    }

    /// Blocks until record `seq` is durable.
    pub fn wait_durable(&self, seq: u64) -> Result<(), StoreError> {
        let mut s = self.shared();
        while s.durable_seq < seq {
            if s.failed {
                return Err(StoreError::Failed);
            }
            s = self.durable.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        Ok(())
    }

    pub fn stats(&self) -> StoreStats {
        self.wal().1
    }

    /// The committer loop: run on its own thread until [`Store::shutdown`].
    pub fn run_committer(&self) {
        loop {
            let (batch, nrec, last) = {
                let mut s = self.shared();
                while s.batch.is_empty() && !s.shutdown {
                    s = self.work.wait(s).unwrap_or_else(|p| p.into_inner());
                }
                if s.batch.is_empty() && s.shutdown {
                    return;
                }
                let n = std::mem::take(&mut s.batch_records);
                (std::mem::take(&mut s.batch), n, s.last_seq)
            };
            let result = {
                let mut w = self.wal();
                let t = std::time::Instant::now();
                let r = w.0.write_all(&batch).and_then(|()| w.0.sync_data());
                let nanos = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
                if r.is_ok() {
                    w.1.commit_nanos = w.1.commit_nanos.saturating_add(nanos);
                    w.1.max_commit_nanos = w.1.max_commit_nanos.max(nanos);
                    w.1.commits += 1;
                    w.1.records += nrec;
                    w.1.wal_bytes += batch.len() as u64;
                }
                r
            };
            let mut s = self.shared();
            match result {
                Ok(()) => s.durable_seq = s.durable_seq.max(last),
                Err(e) => {
                    tracing::error!(error = %e, "write-ahead log write failed");
                    s.failed = true;
                }
            }
            drop(s);
            self.durable.notify_all();
        }
    }

    /// Stops the committer after it has written what is pending.
    pub fn shutdown(&self) {
        self.shared().shutdown = true;
        self.work.notify_all();
    }

    /// Whether the log has grown enough to be worth a snapshot.
    pub fn wants_snapshot(&self) -> bool {
        self.wal().1.wal_bytes >= SNAPSHOT_AFTER_WAL_BYTES
    }

    /// Writes a snapshot. `capture` runs with the batch lock held and must serialise the
    /// state that includes exactly the records appended so far (the caller holds the
    /// registry lock around this call, so no record can be appended concurrently).
    pub fn snapshot(&self, state_json: &[u8]) -> Result<(), StoreError> {
        // Everything appended so far is reflected in `state_json`: the pending batch is
        // superseded by the snapshot and dropped.
        let seq = {
            let mut s = self.shared();
            if s.failed {
                return Err(StoreError::Failed);
            }
            s.batch.clear();
            s.batch_records = 0;
            s.last_seq
        };
        let mut w = self.wal();
        let tmp = self.dir.join(SNAPSHOT_TMP);
        let dst = self.dir.join(SNAPSHOT_FILE);
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(format!("{{\"seq\":{seq},\"state\":").as_bytes())?;
            f.write_all(state_json)?;
            f.write_all(b"}")?;
            f.sync_all()?;
            std::fs::rename(&tmp, &dst)
        };
        if let Err(e) = write() {
            self.shared().failed = true;
            self.durable.notify_all();
            return Err(io(&tmp)(e));
        }
        fsync_dir(&self.dir)?;
        {
            let mut s = self.shared();
            s.durable_seq = s.durable_seq.max(seq);
        }
        self.durable.notify_all();
        // The log's records are all ≤ seq now (batches taken by the committer before the
        // snapshot are older); records it writes later are > seq or harmlessly ≤ seq.
        w.0.set_len(0).map_err(io(&dst))?;
        w.0.sync_all().map_err(io(&dst))?;
        w.1.wal_bytes = 0;
        w.1.snapshots += 1;
        Ok(())
    }
}

#[derive(serde::Deserialize)]
struct SnapshotHeader {
    seq: u64,
}

/// Extracts the `state` of a snapshot file image.
pub fn snapshot_state<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    #[derive(serde::Deserialize)]
    struct Snap<T> {
        state: T,
    }
    serde_json::from_slice::<Snap<T>>(bytes)
        .map(|s| s.state)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    #[test]
    fn records_survive_reopen_and_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (s, rec) = Store::open(dir.path()).unwrap();
            assert!(rec.records.is_empty());
            let s = Arc::new(s);
            let c = s.clone();
            let t = std::thread::spawn(move || c.run_committer());
            let mut last = 0;
            for i in 0..10u32 {
                last = s.append(format!("r{i}").as_bytes()).unwrap();
            }
            s.wait_durable(last).unwrap();
            s.shutdown();
            t.join().unwrap();
        }
        // Tear the last record.
        let wal = dir.path().join(WAL_FILE);
        let len = std::fs::metadata(&wal).unwrap().len();
        let f = OpenOptions::new().write(true).open(&wal).unwrap();
        f.set_len(len - 1).unwrap();
        drop(f);
        let (s, rec) = Store::open(dir.path()).unwrap();
        assert_eq!(rec.records.len(), 9);
        assert_eq!(rec.records[8], b"r8");
        assert!(rec.truncated_bytes > 0);
        assert_eq!(s.last_seq(), 9);
    }

    fn write_log(dir: &Path, n: u32) -> Vec<u64> {
        let (s, _) = Store::open(dir).unwrap();
        let s = Arc::new(s);
        let c = s.clone();
        let t = std::thread::spawn(move || c.run_committer());
        let mut ends = Vec::new();
        for i in 0..n {
            let seq = s.append(format!("record {i}").as_bytes()).unwrap();
            s.wait_durable(seq).unwrap();
            ends.push(std::fs::metadata(dir.join(WAL_FILE)).unwrap().len());
        }
        s.shutdown();
        t.join().unwrap();
        ends
    }

    /// Issue 12 finding 14: a bad record with valid ones after it is corruption, not a torn
    /// tail: recovery refuses (naming the offset) and leaves the file as it was.
    #[test]
    fn corruption_before_the_tail_is_an_error_not_a_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let ends = write_log(dir.path(), 10);
        let wal = dir.path().join(WAL_FILE);
        let mut bytes = std::fs::read(&wal).unwrap();
        // Flip a payload byte of the fourth record (records 5..10 stay valid).
        let bad = ends[2] as usize;
        bytes[bad + RECORD_HEADER_LEN + 2] ^= 0x40;
        std::fs::write(&wal, &bytes).unwrap();
        match Store::open(dir.path()) {
            Err(e @ StoreError::CorruptLog { .. }) => {
                let StoreError::CorruptLog {
                    offset,
                    next_offset,
                    next_seq,
                    ..
                } = &e
                else {
                    unreachable!()
                };
                assert_eq!(
                    (*offset, *next_offset, *next_seq),
                    (bad, ends[3] as usize, 5)
                );
                assert!(e.to_string().contains(&format!("byte {bad}")), "{e}");
            }
            other => panic!("expected CorruptLog, got {other:?}"),
        }
        assert_eq!(std::fs::read(&wal).unwrap(), bytes, "the log was modified");
        // The same damage in the last record is a torn tail: cut, the rest replayed.
        let mut bytes = std::fs::read(&wal).unwrap();
        bytes[bad + RECORD_HEADER_LEN + 2] ^= 0x40;
        let last = ends[8] as usize;
        bytes[last + RECORD_HEADER_LEN + 2] ^= 0x40;
        std::fs::write(&wal, &bytes).unwrap();
        let (_, rec) = Store::open(dir.path()).unwrap();
        assert_eq!(rec.records.len(), 9);
        assert_eq!(std::fs::metadata(&wal).unwrap().len(), ends[8]);
    }

    #[test]
    fn snapshot_supersedes_log() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (s, _) = Store::open(dir.path()).unwrap();
            let s = Arc::new(s);
            let c = s.clone();
            let t = std::thread::spawn(move || c.run_committer());
            let a = s.append(b"1").unwrap();
            s.wait_durable(a).unwrap();
            s.snapshot(b"{\"x\":1}").unwrap();
            let b = s.append(b"2").unwrap();
            s.wait_durable(b).unwrap();
            s.shutdown();
            t.join().unwrap();
        }
        let (_, rec) = Store::open(dir.path()).unwrap();
        let (seq, bytes) = rec.snapshot.unwrap();
        assert_eq!(seq, 1);
        let v: serde_json::Value = snapshot_state(&bytes).unwrap();
        assert_eq!(v["x"], 1);
        assert_eq!(rec.records, vec![b"2".to_vec()]);
    }

    #[test]
    fn second_open_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _a = Store::open(dir.path()).unwrap();
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Locked(_))
        ));
    }

    proptest! {
        #[test]
        fn decode_is_total_and_prefix_exact(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..8),
            cut in any::<usize>(), garbage in proptest::collection::vec(any::<u8>(), 0..40)) {
            let mut buf = Vec::new();
            for (i, p) in payloads.iter().enumerate() { encode_record(i as u64 + 1, p, &mut buf); }
            let (recs, valid) = decode_records(&buf);
            prop_assert_eq!(recs.len(), payloads.len());
            prop_assert_eq!(valid, buf.len());
            let cut = cut % (buf.len() + 1);
            let mut torn = buf[..cut].to_vec();
            torn.extend_from_slice(&garbage);
            let (recs, valid) = decode_records(&torn);
            prop_assert!(valid <= torn.len());
            for (i, (seq, p)) in recs.iter().enumerate() {
                // Whatever decodes from a torn log is a true prefix (up to a CRC collision).
                if valid <= cut { prop_assert_eq!(*seq, i as u64 + 1); prop_assert_eq!(*p, &payloads[i][..]); }
            }
        }

        // Damage to any record but the last is told apart from a torn tail: the next record
        // is found (up to a CRC collision); damage to the last one finds nothing.
        #[test]
        fn damage_before_the_tail_is_found(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 2..8),
            victim in any::<prop::sample::Index>(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut buf = Vec::new();
            let mut starts = Vec::new();
            for (i, p) in payloads.iter().enumerate() {
                starts.push(buf.len());
                encode_record(i as u64 + 1, p, &mut buf);
            }
            starts.push(buf.len());
            let v = victim.index(payloads.len());
            let byte = starts[v] + at.index(starts[v + 1] - starts[v]);
            buf[byte] ^= 1 << bit;
            let (recs, valid) = decode_records(&buf);
            prop_assume!(valid == starts[v]);
            let prev = recs.last().map_or(0, |r| r.0);
            let found = find_record_after(&buf, valid, prev, 0);
            if v + 1 < payloads.len() {
                prop_assert_eq!(found, Some((starts[v + 1], v as u64 + 2)));
            } else {
                prop_assert_eq!(found, None);
            }
        }
    }
}
