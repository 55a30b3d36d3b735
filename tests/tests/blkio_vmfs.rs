//! VM-free tests of stratad's vmfs back-end: a libblkio client (`virtio-blk-vhost-user`, the
//! `blkio` crate) against files of a datastore made with `stratactl`.
//!
//! To make stale data visible, every datastore is first *dirtied*: a thin file filling most of
//! it is written with a non-zero pattern and removed, so the disks under test are allocated
//! from blocks that held another file's bytes. Reads of never-written space must still return
//! zeroes.
//!
//! - `thin_random_io_matches_model`: random-offset reads and writes (many segments, several in
//!   flight) on a thin disk: first writes allocate, later ones hit written space; every read,
//!   the whole disk, and the whole disk again after a restart match an in-memory model, and the
//!   file's allocation is exactly the 1 MiB blocks written.
//! - `lazy_zeroed_reads_zeroes_before_writes`: a thick lazy-zeroed disk reads zeroes
//!   everywhere before any write, partial writes keep zeroes around them, also after a restart.
//! - `flush_makes_allocating_writes_durable`: writes that allocate, then FLUSH; stratad is
//!   killed with SIGKILL (no drain, no flush of its own); after a restart the data is there.
//! - `write_zeroes_reads_back_zeroes`: WRITE_ZEROES (with and without NO_UNMAP) over written
//!   data, holes and partial blocks; DISCARD succeeds and leaves the rest intact.
//! - `data_persists_across_restart`: write + flush, SIGTERM (exit 0), restart, read back.
//!
//! Every test ends with stratad stopped cleanly and `stratactl fsck` clean.

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use test_guest::ScratchDir;
use tests::daemon::Stratad;
use tests::vmfs::{kill9, spawn_after_crash, Provisioning, TestDatastore};

/// How long one request may take before the test declares the daemon hung.
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// Sector size of the virtio-blk protocol.
const SECTOR: u64 = 512;
/// vmfs file block.
const BLOCK: u64 = 1 << 20;
/// Largest request of the random test (spans file blocks now and then).
const MAX_IO: usize = 256 << 10;
/// Largest request of the helpers (one descriptor: stratad's `size_max` is 1 MiB).
const CHUNK: usize = 1 << 20;
/// Datastore size: small, so that the dirtying file covers most of its blocks.
const DATASTORE_SIZE: &str = "256M";
/// The dirtying file: written whole with [`JUNK`], then removed.
const JUNK_SIZE: u64 = 200 << 20;
/// The byte the dirtying file holds.
const JUNK: u8 = 0xdb;
/// Size of the disks under test.
const DISK_SIZE: u64 = 32 << 20;
/// Name of the disk under test.
const DISK: &str = "disk.img";

// ---------------------------------------------------------------------------------------------
// Datastore and daemon

/// A datastore in a scratch dir, its socket and stratad's arguments for [`DISK`].
struct Setup {
    ds: TestDatastore,
    sock: PathBuf,
    args: Vec<String>,
    _dir: ScratchDir,
}

impl Setup {
    /// A dirtied datastore (see the module doc) with [`DISK`] of [`DISK_SIZE`] bytes.
    fn new(name: &str, kind: Provisioning) -> Setup {
        let dir = ScratchDir::new(&format!("blkio-vmfs-{name}")).expect("scratch dir");
        let ds = TestDatastore::mkfs(&dir.join("ds.vmfs"), DATASTORE_SIZE).expect("mkfs");
        let sock = dir.join("vhu.sock");
        ds.disk_create(
            "junk.img",
            &format!("{}M", JUNK_SIZE >> 20),
            Provisioning::Thin,
        )
        .expect("create junk");
        let daemon = Stratad::spawn(&ds.disk_args(&sock, "junk.img", ""), &[&sock]).expect("start");
        {
            let mut c = Client::connect(&sock, 1, false);
            let junk = vec![JUNK; CHUNK];
            for off in (0..JUNK_SIZE).step_by(CHUNK) {
                c.write(off, &junk);
            }
            c.flush();
        }
        stop_cleanly(daemon);
        ds.disk_rm("junk.img").expect("rm junk");
        ds.disk_create(DISK, &format!("{}M", DISK_SIZE >> 20), kind)
            .expect("disk create");
        let args = ds.disk_args(&sock, DISK, "");
        Setup {
            ds,
            sock,
            args,
            _dir: dir,
        }
    }

    /// Starts stratad serving [`DISK`].
    fn start(&self) -> Stratad {
        Stratad::spawn(&self.args, &[&self.sock]).expect("start stratad")
    }
}

/// Stops stratad with SIGTERM and asserts a clean exit (status 0).
fn stop_cleanly(daemon: Stratad) {
    let status = daemon.stop().expect("stop stratad");
    assert!(
        status.success(),
        "stratad exited with {status} after SIGTERM"
    );
}

// ---------------------------------------------------------------------------------------------
// Client

/// A connected libblkio instance with `queues` queues and one memory region.
struct Client {
    // Declared first so the queues are dropped before the instance.
    queues: Vec<Blkioq>,
    region: MemoryRegion,
    _bio: Blkio,
    capacity: u64,
}

/// Result of one request: 0 or a negative errno.
type Ret = i32;

impl Client {
    fn connect(sock: &Path, region_len: usize, read_only: bool) -> Client {
        let mut bio = Blkio::new("virtio-blk-vhost-user").expect("blkio instance");
        bio.set_str("path", sock.to_str().expect("utf-8 path"))
            .expect("path");
        bio.set_bool("read-only", read_only).expect("read-only");
        bio.connect().expect("connect libblkio");
        let capacity = bio.get_u64("capacity").expect("capacity");
        bio.set_i32("num-queues", 1).expect("num-queues");
        let started = bio.start().expect("start libblkio");
        let region = bio
            .alloc_mem_region(region_len.max(CHUNK))
            .expect("alloc region");
        bio.map_mem_region(&region).expect("map region");
        Client {
            queues: started.queues,
            region,
            _bio: bio,
            capacity,
        }
    }

    /// The whole memory region as a byte slice.
    fn mem(&mut self) -> &mut [u8] {
        // SAFETY: libblkio mapped `region.len` writable bytes at `region.addr` for the life of
        // `self.bio`; `&mut self` ensures no request of ours is using them (helpers wait for
        // their requests before returning).
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    fn ptr(&self, off: usize) -> *mut u8 {
        assert!(off <= self.region.len);
        (self.region.addr + off) as *mut u8
    }

    /// Waits for exactly one completion; returns (user_data, ret).
    fn wait_one(&mut self) -> (usize, Ret) {
        let mut c = [MaybeUninit::<Completion>::uninit()];
        let mut t = IO_TIMEOUT;
        let n = self.queues[0]
            .do_io(&mut c, 1, Some(&mut t), None)
            .expect("do_io");
        assert_eq!(n, 1, "no completion within {IO_TIMEOUT:?}");
        // SAFETY: do_io filled the first n = 1 completions.
        let c = unsafe { c[0].assume_init_ref() };
        (c.user_data, c.ret)
    }

    fn wait_ok(&mut self, what: &str) {
        let (_, ret) = self.wait_one();
        assert_eq!(ret, 0, "{what} failed: {ret}");
    }

    /// Writes `data` at `off`, in requests of at most [`CHUNK`] bytes.
    fn write(&mut self, off: u64, data: &[u8]) {
        for (i, piece) in data.chunks(CHUNK).enumerate() {
            self.mem()[..piece.len()].copy_from_slice(piece);
            let at = off + (i * CHUNK) as u64;
            let p = self.ptr(0);
            self.queues[0].write(at, p, piece.len(), 0, ReqFlags::empty());
            self.wait_ok(&format!("write of {} bytes at {at}", piece.len()));
        }
    }

    /// Reads `len` bytes at `off`.
    fn read(&mut self, off: u64, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            let at = off + done as u64;
            // Poison the buffer so a read that transfers nothing cannot pass.
            self.mem()[..n].fill(0xa5);
            let p = self.ptr(0);
            self.queues[0].read(at, p, n, 0, ReqFlags::empty());
            self.wait_ok(&format!("read of {n} bytes at {at}"));
            out.extend_from_slice(&self.mem()[..n]);
            done += n;
        }
        out
    }

    fn flush(&mut self) {
        self.queues[0].flush(0, ReqFlags::empty());
        self.wait_ok("flush");
    }

    fn discard(&mut self, off: u64, len: u64) {
        self.queues[0].discard(off, len, 0, ReqFlags::empty());
        self.wait_ok(&format!("discard of {len} at {off}"));
    }

    fn write_zeroes(&mut self, off: u64, len: u64, flags: ReqFlags) {
        self.queues[0].write_zeroes(off, len, 0, flags);
        self.wait_ok(&format!("write-zeroes of {len} at {off}"));
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// Panics at the first differing byte, naming it.
fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        let stale = if got[i] == JUNK {
            " (the removed file's byte)"
        } else {
            ""
        };
        panic!(
            "{what}: first difference at byte {i} (got {:#04x}{stale}, want {:#04x})",
            got[i], want[i]
        );
    }
}

/// Reads the whole disk and compares it with `model`.
fn check_disk(c: &mut Client, model: &[u8], what: &str) {
    let got = c.read(0, model.len());
    assert_same(what, &got, model);
}

// ---------------------------------------------------------------------------------------------
// Tests

/// One request in flight.
#[derive(Debug)]
struct Flight {
    write: bool,
    off: u64,
    len: usize,
    /// Segment list handed to libblkio, kept alive until completion.
    _iov: Vec<libc::iovec>,
}

#[test]
fn thin_random_io_matches_model() {
    const QD: usize = 8;
    const OPS: usize = 1500;
    let setup = Setup::new("random", Provisioning::Thin);
    let daemon = setup.start();
    let mut c = Client::connect(&setup.sock, QD * MAX_IO, false);
    assert_eq!(c.capacity, DISK_SIZE, "capacity");
    let mut model = vec![0u8; DISK_SIZE as usize];
    let mut written_blocks = vec![false; (DISK_SIZE / BLOCK) as usize];
    let mut rng = StdRng::seed_from_u64(0x7a11_5eed);
    let mut slots: Vec<Option<Flight>> = (0..QD).map(|_| None).collect();
    let (mut submitted, mut completed, mut reads_checked) = (0usize, 0usize, 0usize);
    let (mut allocating, mut overwriting) = (0usize, 0usize);

    while completed < OPS {
        for slot in 0..QD {
            if submitted == OPS || slots[slot].is_some() {
                continue;
            }
            let sectors = rng.gen_range(1..=(MAX_IO as u64 / SECTOR));
            let len = (sectors * SECTOR) as usize;
            let off = rng.gen_range(0..=(DISK_SIZE - len as u64) / SECTOR) * SECTOR;
            let overlaps = slots
                .iter()
                .flatten()
                .any(|f| off < f.off + f.len as u64 && f.off < off + len as u64);
            if overlaps {
                continue;
            }
            // Reads of never-written space are as interesting as reads of data: 50/50.
            let write = rng.gen_bool(0.5);
            let base = slot * MAX_IO;
            if write {
                let blocks = (off / BLOCK) as usize..=((off + len as u64 - 1) / BLOCK) as usize;
                if blocks.clone().all(|b| written_blocks[b]) {
                    overwriting += 1;
                } else {
                    allocating += 1;
                }
                for b in blocks {
                    written_blocks[b] = true;
                }
                let data = &mut c.mem()[base..base + len];
                rng.fill_bytes(data);
                model[off as usize..off as usize + len].copy_from_slice(data);
            } else {
                c.mem()[base..base + len].fill(0xa5);
            }
            // 1 to 4 segments cut at arbitrary bytes.
            let segs = rng.gen_range(1..=4usize).min(len);
            let mut cuts: Vec<usize> = (0..segs - 1).map(|_| rng.gen_range(1..len)).collect();
            cuts.push(0);
            cuts.push(len);
            cuts.sort_unstable();
            cuts.dedup();
            let iov: Vec<libc::iovec> = cuts
                .windows(2)
                .map(|w| libc::iovec {
                    iov_base: c.ptr(base + w[0]).cast(),
                    iov_len: w[1] - w[0],
                })
                .collect();
            let cnt = u32::try_from(iov.len()).expect("iovcnt");
            if write {
                c.queues[0].writev(off, iov.as_ptr(), cnt, slot, ReqFlags::empty());
            } else {
                c.queues[0].readv(off, iov.as_ptr(), cnt, slot, ReqFlags::empty());
            }
            slots[slot] = Some(Flight {
                write,
                off,
                len,
                _iov: iov,
            });
            submitted += 1;
        }
        // Reap at least one completion.
        let (slot, ret) = c.wait_one();
        let f = slots[slot].take().expect("completion for an idle slot");
        let kind = if f.write { "write" } else { "read" };
        assert_eq!(ret, 0, "{kind} of {} bytes at {} failed", f.len, f.off);
        if !f.write {
            let base = slot * MAX_IO;
            let want = &model[f.off as usize..f.off as usize + f.len];
            let got = c.mem()[base..base + f.len].to_vec();
            assert_same(&format!("read of {} at {}", f.len, f.off), &got, want);
            reads_checked += 1;
        }
        completed += 1;
    }
    eprintln!(
        "{OPS} requests: {allocating} writes allocating, {overwriting} on written space, {reads_checked} reads checked"
    );
    assert!(
        allocating > 0 && overwriting > OPS / 10,
        "too few of one kind of write"
    );
    check_disk(&mut c, &model, "whole disk");
    c.flush();
    drop(c);
    stop_cleanly(daemon);
    setup.ds.assert_fsck_clean("after the random run");
    let touched = written_blocks.iter().filter(|&&w| w).count() as u64;
    let allocated = setup.ds.allocated_bytes(DISK).expect("allocated bytes");
    assert_eq!(
        allocated,
        touched * BLOCK,
        "a thin file holds exactly the blocks written ({touched} of {})",
        DISK_SIZE / BLOCK
    );

    let daemon = setup.start();
    let mut c = Client::connect(&setup.sock, 0, false);
    check_disk(&mut c, &model, "whole disk after a restart");
    drop(c);
    stop_cleanly(daemon);
    setup.ds.assert_fsck_clean("after the restart");
}

#[test]
fn lazy_zeroed_reads_zeroes_before_writes() {
    let setup = Setup::new("lazy", Provisioning::LazyZeroed);
    assert_eq!(
        setup.ds.allocated_bytes(DISK).expect("allocated"),
        DISK_SIZE,
        "a lazy-zeroed file is allocated up front"
    );
    let daemon = setup.start();
    let mut c = Client::connect(&setup.sock, 0, false);
    assert_eq!(c.capacity, DISK_SIZE, "capacity");
    let mut model = vec![0u8; DISK_SIZE as usize];
    check_disk(&mut c, &model, "lazy-zeroed disk before any write");
    // Partial writes into to-be-zeroed blocks: a sector in the middle of block 3, a piece
    // across the boundary of blocks 7 and 8, a whole block (10).
    let writes = [
        ((3 * BLOCK) + 4096 + 512, 512usize),
        ((8 * BLOCK) - 3 * 4096, 6 * 4096),
        (10 * BLOCK, BLOCK as usize),
    ];
    for (i, &(off, len)) in writes.iter().enumerate() {
        let data = pattern(i as u64 + 1, len);
        c.write(off, &data);
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    check_disk(&mut c, &model, "after partial writes");
    c.flush();
    drop(c);
    stop_cleanly(daemon);
    setup.ds.assert_fsck_clean("after the writes");

    let daemon = setup.start();
    let mut c = Client::connect(&setup.sock, 0, false);
    check_disk(&mut c, &model, "after a restart");
    drop(c);
    stop_cleanly(daemon);
    setup.ds.assert_fsck_clean("after the restart");
}

#[test]
fn flush_makes_allocating_writes_durable() {
    let setup = Setup::new("flush", Provisioning::Thin);
    let daemon = setup.start();
    let mut c = Client::connect(&setup.sock, 0, false);
    let mut model = vec![0u8; DISK_SIZE as usize];
    // Each write allocates: block starts, block middles, a write across two blocks.
    let writes = [
        (0u64, 64usize << 10),
        (5 * BLOCK + 12288, 4096),
        (9 * BLOCK - 8192, 16384),
        (20 * BLOCK + 512, 1536),
    ];
    for (i, &(off, len)) in writes.iter().enumerate() {
        let data = pattern(100 + i as u64, len);
        c.write(off, &data);
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    c.flush();
    c.flush();
    // No SIGTERM: a flushed write must survive without stratad's own shutdown flush.
    drop(c);
    kill9(daemon);
    // Issue 12: fsck right after the crash replays the journal first (as e2fsck does), then
    // checks: clean, with no mount in between.
    setup
        .ds
        .assert_fsck_clean("right after kill -9 (replaying the journal)");

    let daemon = spawn_after_crash(&setup.args, &[&setup.sock]).expect("restart");
    let mut c = Client::connect(&setup.sock, 0, false);
    check_disk(&mut c, &model, "flushed data after kill -9 and a restart");
    drop(c);
    stop_cleanly(daemon);
    setup.ds.assert_fsck_clean("after the restart");
}

#[test]
fn write_zeroes_reads_back_zeroes() {
    let setup = Setup::new("zeroes", Provisioning::Thin);
    let daemon = setup.start();
    let mut c = Client::connect(&setup.sock, 0, false);
    let mut model = vec![0u8; DISK_SIZE as usize];
    // Data in [0, 8 MiB) and [16 MiB, 20 MiB); the rest are holes.
    for (off, len) in [(0u64, 8usize << 20), (16 << 20, 4 << 20)] {
        let data = pattern(off, len);
        c.write(off, &data);
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    c.flush();
    // WRITE_ZEROES over: a whole written block, a partial range of written data, a range
    // from written data into a hole, a hole only, and with NO_UNMAP.
    let zeroes: [(u64, u64, ReqFlags); 5] = [
        (BLOCK, BLOCK, ReqFlags::empty()),
        (3 * BLOCK + 512, 3 * 512, ReqFlags::empty()),
        (7 * BLOCK + 4096, 2 * BLOCK, ReqFlags::empty()),
        (12 * BLOCK + 8192, 8192, ReqFlags::empty()),
        (17 * BLOCK - 4096, 3 * 4096, ReqFlags::NO_UNMAP),
    ];
    for &(off, len, flags) in &zeroes {
        c.write_zeroes(off, len, flags);
        model[off as usize..(off + len) as usize].fill(0);
    }
    check_disk(&mut c, &model, "after write-zeroes");
    // DISCARD of a written block succeeds (its contents are then unspecified); everything
    // else stays as it was.
    c.discard(18 * BLOCK, BLOCK);
    let mut got = c.read(0, DISK_SIZE as usize);
    got[(18 * BLOCK) as usize..(19 * BLOCK) as usize]
        .copy_from_slice(&model[(18 * BLOCK) as usize..(19 * BLOCK) as usize]);
    assert_same("after discard (outside the discarded block)", &got, &model);
    let discarded = c.read(18 * BLOCK, BLOCK as usize);
    let old = &model[(18 * BLOCK) as usize..(19 * BLOCK) as usize];
    assert!(
        discarded == old || discarded.iter().all(|&b| b == 0),
        "a discarded block reads neither its old data nor zeroes"
    );
    model[(18 * BLOCK) as usize..(19 * BLOCK) as usize].copy_from_slice(&discarded);
    c.flush();
    drop(c);
    stop_cleanly(daemon);
    setup.ds.assert_fsck_clean("after write-zeroes");

    let daemon = setup.start();
    let mut c = Client::connect(&setup.sock, 0, false);
    check_disk(&mut c, &model, "after a restart");
    drop(c);
    stop_cleanly(daemon);
    setup.ds.assert_fsck_clean("after the restart");
}

#[test]
fn data_persists_across_restart() {
    let setup = Setup::new("persist", Provisioning::Thin);
    let daemon = setup.start();
    let mut c = Client::connect(&setup.sock, 0, false);
    let mut model = vec![0u8; DISK_SIZE as usize];
    let writes = [
        (0u64, 1usize << 20),
        (4 * BLOCK + 512, 512),
        (6 * BLOCK - 512, 1024),
        (DISK_SIZE - 4096, 4096),
    ];
    for (i, &(off, len)) in writes.iter().enumerate() {
        let data = pattern(200 + i as u64, len);
        c.write(off, &data);
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    // Overwrite part of written space.
    let data = pattern(300, 8192);
    c.write(4096, &data);
    model[4096..4096 + 8192].copy_from_slice(&data);
    c.flush();
    drop(c);
    stop_cleanly(daemon);
    setup.ds.assert_fsck_clean("after the writes");

    let daemon = setup.start();
    let mut c = Client::connect(&setup.sock, 0, false);
    check_disk(&mut c, &model, "after a restart");
    drop(c);
    stop_cleanly(daemon);
    setup.ds.assert_fsck_clean("after the restart");
}
