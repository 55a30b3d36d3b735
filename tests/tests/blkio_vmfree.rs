//! VM-free tests: a libblkio client (`virtio-blk-vhost-user` driver, the `blkio` crate) against
//! `stratad`, checking data, flush, discard/write-zeroes, read-only, capacity limits, multiqueue,
//! reconnect and the null backend without booting a guest.
//!
//! Every test starts its own daemon on sockets in its own temp dir and stops it with SIGTERM at
//! the end, checking that it exits 0. The tests run against stratad; `STRATA_BLKIO_SERVER=qsd`
//! runs the same tests against qemu-storage-daemon instead, to tell a test bug from a daemon bug.
//!
//! libblkio refuses writes to a read-only device on the client side (and refuses to start
//! without `read-only=true` when the device offers VIRTIO_BLK_F_RO), so the read-only test sends
//! its writes with `virtio-driver`, the virtqueue layer under libblkio, to prove the daemon
//! itself refuses them.

use std::fs::File;
use std::mem::MaybeUninit;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use tests::daemon::Stratad;

/// How long one request may take before the test declares the daemon hung.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Sector size of the virtio-blk protocol (offsets and lengths are multiples of it).
const SECTOR: u64 = 512;
/// Largest request of the random tests: 128 KiB spans many pages and, split, many segments.
const MAX_IO: usize = 128 << 10;
/// Most data segments per multi-segment request in the random tests (capped by `max-segments`).
const MAX_SEGS: usize = 8;
/// Size of the images of the random tests: small enough to compare whole, large enough that
/// random requests rarely collide.
const IMAGE_SIZE: u64 = 16 << 20;
/// Size of stratad's null device (`size=1G`).
const NULL_SIZE: u64 = 1 << 30;
/// Largest request the helpers send (split further if the device's `max-transfer` is lower).
const MAX_TRANSFER: usize = 1 << 20;
/// How long QSD may take to create its socket.
const QSD_SOCKET_WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Servers

/// What sits behind one socket.
#[derive(Debug, Clone)]
enum Backing {
    Raw {
        path: PathBuf,
        readonly: bool,
        direct: bool,
    },
    Null,
}

/// One exported disk.
#[derive(Debug, Clone)]
struct Disk {
    sock: PathBuf,
    backing: Backing,
    queues: u32,
}

impl Disk {
    fn raw(sock: PathBuf, path: PathBuf) -> Self {
        Disk {
            sock,
            backing: Backing::Raw {
                path,
                readonly: false,
                direct: false,
            },
            queues: 1,
        }
    }

    fn stratad_arg(&self) -> String {
        let sock = self.sock.display();
        let q = self.queues;
        match &self.backing {
            Backing::Null => format!("socket={sock},backend=null,size=1G,queues={q}"),
            Backing::Raw {
                path,
                readonly,
                direct,
            } => {
                let mut s = format!(
                    "socket={sock},backend=raw,path={},queues={q}",
                    path.display()
                );
                if *readonly {
                    s.push_str(",readonly=on");
                }
                if *direct {
                    s.push_str(",direct=on");
                }
                s
            }
        }
    }
}

/// The daemon under test.
#[derive(Debug)]
enum Server {
    Strata(Stratad),
    Qsd(QsdProc),
}

/// A qemu-storage-daemon child, killed on drop unless stopped.
#[derive(Debug)]
struct QsdProc(Option<Child>);

impl Drop for QsdProc {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Server {
    fn start(disks: &[Disk]) -> Server {
        match std::env::var("STRATA_BLKIO_SERVER").as_deref() {
            Ok("qsd") => Self::start_qsd(disks),
            _ => {
                let mut args = Vec::new();
                for d in disks {
                    args.push("--disk".to_string());
                    args.push(d.stratad_arg());
                }
                let socks: Vec<&Path> = disks.iter().map(|d| d.sock.as_path()).collect();
                Server::Strata(Stratad::spawn(&args, &socks).expect("start stratad"))
            }
        }
    }

    fn start_qsd(disks: &[Disk]) -> Server {
        let mut cmd = Command::new("qemu-storage-daemon");
        for (i, d) in disks.iter().enumerate() {
            let (blockdev, writable) = match &d.backing {
                Backing::Null => (
                    format!("driver=null-co,node-name=n{i},size={NULL_SIZE},read-zeroes=on"),
                    true,
                ),
                Backing::Raw {
                    path,
                    readonly,
                    direct,
                } => (
                    format!(
                        "driver=file,node-name=n{i},filename={},discard=unmap,cache.direct={},\
                         read-only={}",
                        path.display(),
                        if *direct { "on" } else { "off" },
                        if *readonly { "on" } else { "off" }
                    ),
                    !readonly,
                ),
            };
            cmd.arg("--blockdev")
                .arg(blockdev)
                .arg("--export")
                .arg(format!(
                    "type=vhost-user-blk,id=e{i},node-name=n{i},addr.type=unix,addr.path={},\
                 writable={},num-queues={}",
                    d.sock.display(),
                    if writable { "on" } else { "off" },
                    d.queues
                ));
        }
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn qemu-storage-daemon");
        let mut proc = QsdProc(Some(child));
        let deadline = Instant::now() + QSD_SOCKET_WAIT;
        for d in disks {
            while !d.sock.exists() {
                if let Some(c) = proc.0.as_mut() {
                    if let Some(st) = c.try_wait().expect("try_wait") {
                        panic!("qemu-storage-daemon exited early: {st}");
                    }
                }
                assert!(Instant::now() < deadline, "QSD socket did not appear");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Server::Qsd(proc)
    }

    /// SIGTERM and wait; the exit status.
    fn stop(self) -> ExitStatus {
        match self {
            Server::Strata(d) => d.stop().expect("stop stratad"),
            Server::Qsd(mut p) => {
                let mut child = p.0.take().expect("child");
                let pid = libc::pid_t::try_from(child.id()).expect("pid");
                // SAFETY: kill(2) on our own child with a valid signal has no memory effects.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                child.wait().expect("wait for QSD")
            }
        }
    }

    /// Stops the daemon and asserts a clean exit (status 0).
    fn stop_clean(self) {
        let status = self.stop();
        assert!(status.success(), "daemon exited with {status}");
    }
}

/// A per-test temp directory, removed on drop.
#[derive(Debug)]
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("strata-blkio-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// A sparse raw image of `size` bytes.
    fn sparse_image(&self, name: &str, size: u64) -> PathBuf {
        let p = self.path(name);
        File::create(&p)
            .expect("create image")
            .set_len(size)
            .expect("size image");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Client

/// A connected, started libblkio instance with one mapped memory region for all buffers.
struct Client {
    // Declared first so the queues are dropped before the instance.
    queues: Vec<Blkioq>,
    region: MemoryRegion,
    bio: Blkio,
    capacity: u64,
}

/// Result of one request: 0 or a negative errno.
type Ret = i32;

impl Client {
    fn connect(sock: &Path, queues: u32, read_only: bool, region_len: usize) -> Client {
        Self::try_connect(sock, queues, read_only, region_len).expect("connect libblkio")
    }

    fn try_connect(
        sock: &Path,
        queues: u32,
        read_only: bool,
        region_len: usize,
    ) -> Result<Client, blkio::Error> {
        let mut bio = Blkio::new("virtio-blk-vhost-user")?;
        bio.set_str("path", sock.to_str().expect("utf-8 path"))?;
        bio.set_bool("read-only", read_only)?;
        bio.connect()?;
        let capacity = bio.get_u64("capacity")?;
        bio.set_i32("num-queues", i32::try_from(queues).expect("queues"))?;
        let started = bio.start()?;
        let region = bio.alloc_mem_region(region_len)?;
        bio.map_mem_region(&region)?;
        Ok(Client {
            queues: started.queues,
            region,
            bio,
            capacity,
        })
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

    /// Waits for exactly one completion on queue `q`.
    fn wait_one(&mut self, q: usize) -> Ret {
        let mut c = [MaybeUninit::<Completion>::uninit()];
        let mut t = IO_TIMEOUT;
        let n = self.queues[q]
            .do_io(&mut c, 1, Some(&mut t), None)
            .expect("do_io");
        assert_eq!(n, 1, "one completion expected");
        // SAFETY: do_io filled the first n = 1 completions.
        let c = unsafe { c[0].assume_init_ref() };
        c.ret
    }

    /// A device limit from a libblkio property; 0 (no limit) becomes `usize::MAX`.
    fn limit(&self, prop: &str) -> usize {
        let v = match self.bio.get_i32(prop) {
            Ok(v) => usize::try_from(v).unwrap_or(0),
            Err(_) => usize::try_from(self.bio.get_u64(prop).expect(prop)).unwrap_or(0),
        };
        if v == 0 {
            usize::MAX
        } else {
            v
        }
    }

    /// Reads or writes `len` bytes at `off` from/to the start of the region, honouring the
    /// device's `max-transfer` (one request per chunk) and `max-segment-len` (each chunk split
    /// into segments): libblkio sends a buffer as one descriptor and does not split it itself.
    /// Returns the first error.
    fn rw(&mut self, write: bool, off: u64, len: usize) -> Ret {
        let seg = self.limit("max-segment-len");
        let chunk = self.limit("max-transfer").min(MAX_TRANSFER);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk);
            let iov: Vec<libc::iovec> = (0..n)
                .step_by(seg)
                .map(|a| libc::iovec {
                    iov_base: self.ptr(done + a).cast(),
                    iov_len: (n - a).min(seg),
                })
                .collect();
            let cnt = u32::try_from(iov.len()).expect("iovcnt");
            let at = off + done as u64;
            if write {
                self.queues[0].writev(at, iov.as_ptr(), cnt, 0, ReqFlags::empty());
            } else {
                self.queues[0].readv(at, iov.as_ptr(), cnt, 0, ReqFlags::empty());
            }
            let ret = self.wait_one(0);
            if ret != 0 {
                return ret;
            }
            done += n;
        }
        0
    }

    /// Reads `len` bytes at `off` into the start of the region.
    fn read(&mut self, off: u64, len: usize) -> Ret {
        self.rw(false, off, len)
    }

    /// Reads `len` bytes at `off` and returns them (panics on error).
    fn read_vec(&mut self, off: u64, len: usize) -> Vec<u8> {
        assert_eq!(self.read(off, len), 0, "read {len} at {off}");
        self.mem()[..len].to_vec()
    }

    /// Writes `data` at `off` (staged at the start of the region).
    fn write(&mut self, off: u64, data: &[u8]) -> Ret {
        self.mem()[..data.len()].copy_from_slice(data);
        self.rw(true, off, data.len())
    }

    fn flush(&mut self) -> Ret {
        self.queues[0].flush(0, ReqFlags::empty());
        self.wait_one(0)
    }

    fn discard(&mut self, off: u64, len: u64) -> Ret {
        self.queues[0].discard(off, len, 0, ReqFlags::empty());
        self.wait_one(0)
    }

    fn write_zeroes(&mut self, off: u64, len: u64, flags: ReqFlags) -> Ret {
        self.queues[0].write_zeroes(off, len, 0, flags);
        self.wait_one(0)
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).expect("read image")
}

/// Index of the first differing byte, for readable assertion messages.
fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    if let Some(i) = first_diff(got, want) {
        panic!(
            "{what}: first difference at byte {i} (got {:?}, want {:?})",
            got.get(i),
            want.get(i)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Random I/O against an in-memory model

/// How the random test splits requests into segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Split {
    /// One buffer per request (`read`/`write`).
    None,
    /// `readv`/`writev` with segment boundaries at arbitrary bytes.
    AnyByte,
    /// `readv`/`writev` with 512-byte-multiple segments (O_DIRECT-friendly).
    Sectors,
}

/// One request in flight.
#[derive(Debug)]
struct Flight {
    write: bool,
    off: u64,
    len: usize,
    /// Segment list handed to libblkio; kept alive until completion because libblkio may hold
    /// the pointer while the request waits in its backlog.
    _iov: Vec<libc::iovec>,
}

/// Random reads and writes with `qd` requests in flight per queue over `queues` queues, never
/// two overlapping requests in flight at once (the device may reorder them); reads are checked
/// against the model when they complete, and the whole device and the image file at the end.
fn random_io(
    sock: &Path,
    image: &Path,
    queues: u32,
    qd: usize,
    ops: usize,
    split: Split,
    seed: u64,
) {
    let nq = queues as usize;
    let mut c = Client::connect(sock, queues, false, nq * qd * MAX_IO);
    assert_eq!(c.capacity, IMAGE_SIZE, "capacity");
    let mut model = read_file(image);
    let device_max_segs = c.limit("max-segments");
    let max_segs = device_max_segs.clamp(1, MAX_SEGS);
    let max_seg_len = c.limit("max-segment-len");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut slots: Vec<Option<Flight>> = (0..nq * qd).map(|_| None).collect();
    let mut comps: Vec<MaybeUninit<Completion>> = std::iter::repeat_with(MaybeUninit::uninit)
        .take(qd)
        .collect();
    let (mut submitted, mut completed, mut reads_checked, mut multi) = (0usize, 0usize, 0, 0);

    while completed < ops {
        // Fill free slots.
        for slot in 0..slots.len() {
            if submitted == ops || slots[slot].is_some() {
                continue;
            }
            let sectors = rng.gen_range(1..=(MAX_IO as u64 / SECTOR));
            let len = (sectors * SECTOR) as usize;
            let off = rng.gen_range(0..=(IMAGE_SIZE - len as u64) / SECTOR) * SECTOR;
            let overlaps = slots
                .iter()
                .flatten()
                .any(|f| off < f.off + f.len as u64 && f.off < off + len as u64);
            if overlaps {
                continue;
            }
            let write = rng.gen_bool(0.5);
            let base = slot * MAX_IO;
            if write {
                let data = &mut c.mem()[base..base + len];
                rng.fill_bytes(data);
                model[off as usize..off as usize + len].copy_from_slice(data);
            } else {
                // Poison the buffer so a read that transfers nothing cannot pass.
                c.mem()[base..base + len].fill(0xa5);
            }
            let segs = if split == Split::None || len < 2 {
                1
            } else {
                rng.gen_range(1..=max_segs)
            };
            let mut cuts: Vec<usize> = match split {
                Split::Sectors if sectors > 1 => (0..segs - 1)
                    .map(|_| rng.gen_range(1..sectors as usize) * SECTOR as usize)
                    .collect(),
                Split::Sectors => Vec::new(),
                _ => (0..segs - 1).map(|_| rng.gen_range(1..len)).collect(),
            };
            cuts.push(0);
            cuts.push(len);
            cuts.sort_unstable();
            cuts.dedup();
            let mut iov = Vec::new();
            for w in cuts.windows(2) {
                let (mut a, b) = (w[0], w[1]);
                while a < b {
                    let n = (b - a).min(max_seg_len);
                    iov.push(libc::iovec {
                        iov_base: c.ptr(base + a).cast(),
                        iov_len: n,
                    });
                    a += n;
                }
            }
            assert!(iov.len() <= device_max_segs, "too many segments");
            let q = slot / qd;
            let cnt = u32::try_from(iov.len()).expect("iovcnt");
            if iov.len() == 1 && split == Split::None {
                let p = c.ptr(base);
                if write {
                    c.queues[q].write(off, p, len, slot, ReqFlags::empty());
                } else {
                    c.queues[q].read(off, p, len, slot, ReqFlags::empty());
                }
            } else {
                multi += usize::from(iov.len() > 1);
                if write {
                    c.queues[q].writev(off, iov.as_ptr(), cnt, slot, ReqFlags::empty());
                } else {
                    c.queues[q].readv(off, iov.as_ptr(), cnt, slot, ReqFlags::empty());
                }
            }
            slots[slot] = Some(Flight {
                write,
                off,
                len,
                _iov: iov,
            });
            submitted += 1;
        }

        // Reap: poll every busy queue; if none had anything, block on the first busy one.
        let busy: Vec<usize> = (0..nq)
            .filter(|q| slots[q * qd..(q + 1) * qd].iter().any(Option::is_some))
            .collect();
        let mut reaped = 0;
        for (i, &q) in busy.iter().enumerate() {
            let last_chance = reaped == 0 && i + 1 == busy.len();
            let mut t = IO_TIMEOUT;
            let n = c.queues[q]
                .do_io(&mut comps, usize::from(last_chance), Some(&mut t), None)
                .expect("do_io");
            for done in &comps[..n] {
                // SAFETY: do_io initialised the first n completions.
                let done = unsafe { done.assume_init_ref() };
                let f = slots[done.user_data]
                    .take()
                    .expect("completion for an idle slot");
                let kind = if f.write { "write" } else { "read" };
                assert_eq!(done.ret, 0, "{kind} of {} bytes at {} failed", f.len, f.off);
                if !f.write {
                    let base = done.user_data * MAX_IO;
                    let want = &model[f.off as usize..f.off as usize + f.len];
                    let got = &c.mem()[base..base + f.len];
                    assert_same(&format!("read of {} at {}", f.len, f.off), got, want);
                    reads_checked += 1;
                }
                completed += 1;
            }
            reaped += n;
        }
    }
    assert!(
        reads_checked > ops / 4,
        "too few reads checked: {reads_checked}"
    );
    if split != Split::None && max_segs > 1 {
        assert!(multi > ops / 4, "too few multi-segment requests: {multi}");
    }

    // Whole device through the daemon, then (after flush) the file itself.
    for off in (0..IMAGE_SIZE).step_by(MAX_IO) {
        let got = c.read_vec(off, MAX_IO);
        assert_same(
            &format!("device at {off}"),
            &got,
            &model[off as usize..off as usize + MAX_IO],
        );
    }
    assert_eq!(c.flush(), 0, "flush");
    drop(c);
    assert_same("image file", &read_file(image), &model);
}

fn random_test(name: &str, queues: u32, qd: usize, ops: usize, split: Split, direct: bool) {
    let dir = TempDir::new(name);
    let image = dir.sparse_image("disk.img", IMAGE_SIZE);
    let mut disk = Disk::raw(dir.path("vhu.sock"), image.clone());
    disk.queues = queues;
    disk.backing = Backing::Raw {
        path: image.clone(),
        readonly: false,
        direct,
    };
    let server = Server::start(std::slice::from_ref(&disk));
    random_io(
        &disk.sock,
        &image,
        queues,
        qd,
        ops,
        split,
        0x5eed ^ qd as u64,
    );
    server.stop_clean();
}

#[test]
fn random_io_qd1() {
    random_test("qd1", 1, 1, 300, Split::None, false);
}

#[test]
fn random_io_qd4_multisegment_any_byte() {
    random_test("qd4", 1, 4, 600, Split::AnyByte, false);
}

#[test]
fn random_io_qd32_multisegment() {
    random_test("qd32", 1, 32, 2000, Split::AnyByte, false);
}

#[test]
fn random_io_two_queues() {
    random_test("2q", 2, 8, 1500, Split::AnyByte, false);
}

#[test]
fn random_io_direct_sector_segments() {
    random_test("direct", 1, 16, 1000, Split::Sectors, true);
}

// ---------------------------------------------------------------------------------------------
// Targeted tests

/// Starts a daemon with one raw disk on a sparse image of `size` bytes.
fn one_raw_disk(dir: &TempDir, size: u64) -> (Server, Disk, PathBuf) {
    let image = dir.sparse_image("disk.img", size);
    let disk = Disk::raw(dir.path("vhu.sock"), image.clone());
    let server = Server::start(std::slice::from_ref(&disk));
    (server, disk, image)
}

#[test]
fn flush_succeeds_and_data_reaches_the_image() {
    let dir = TempDir::new("flush");
    let (server, disk, image) = one_raw_disk(&dir, IMAGE_SIZE);
    let mut c = Client::connect(&disk.sock, 1, false, 1 << 20);
    let data = pattern(7, 64 << 10);
    assert_eq!(c.write(1 << 20, &data), 0);
    assert_eq!(c.flush(), 0, "flush");
    assert_eq!(c.flush(), 0, "flush with nothing dirty");
    let mut on_disk = vec![0u8; data.len()];
    File::open(&image)
        .expect("open")
        .read_exact_at(&mut on_disk, 1 << 20)
        .expect("read");
    assert_same("image after flush", &on_disk, &data);
    drop(c);
    server.stop_clean();
}

#[test]
fn discard_and_write_zeroes_read_back_zeroes() {
    let dir = TempDir::new("zeroes");
    let (server, disk, image) = one_raw_disk(&dir, IMAGE_SIZE);
    let mut c = Client::connect(&disk.sock, 1, false, 4 << 20);
    let chunk = 4usize << 20;
    // Fill the first 12 MiB with data.
    for i in 0..3u64 {
        assert_eq!(c.write(i * chunk as u64, &pattern(i, chunk)), 0);
    }
    assert_eq!(c.flush(), 0);
    let blocks_full = std::fs::metadata(&image).expect("stat").blocks();

    // Discard 4 MiB (aligned to the 1 MiB discard granularity any sane server accepts).
    let discard_alignment = u64::try_from(c.bio.get_i32("discard-alignment").expect("prop"))
        .expect("alignment")
        .max(SECTOR);
    assert_eq!((4u64 << 20) % discard_alignment, 0);
    assert_eq!(c.discard(0, 4 << 20), 0, "discard");
    assert!(
        c.read_vec(0, chunk).iter().all(|&b| b == 0),
        "discarded range reads zeroes"
    );
    assert_eq!(c.flush(), 0);
    let blocks_after_discard = std::fs::metadata(&image).expect("stat").blocks();
    assert!(
        blocks_after_discard + (3 << 20) / 512 <= blocks_full,
        "discard did not deallocate ({blocks_full} -> {blocks_after_discard} blocks)"
    );

    // Write-zeroes, with unmap allowed (default) and with NO_UNMAP, over data.
    assert_eq!(
        c.write_zeroes(4 << 20, 1 << 20, ReqFlags::empty()),
        0,
        "write-zeroes"
    );
    assert_eq!(
        c.write_zeroes((5 << 20) + 512, 3 * 512, ReqFlags::NO_UNMAP),
        0,
        "no-unmap"
    );
    let got = c.read_vec(4 << 20, chunk);
    let mut want = pattern(1, chunk);
    want[..1 << 20].fill(0);
    want[(1 << 20) + 512..(1 << 20) + 4 * 512].fill(0);
    assert_same("after write-zeroes", &got, &want);
    // Untouched data around the zeroed ranges survives.
    assert_same(
        "third chunk",
        &c.read_vec(8 << 20, chunk),
        &pattern(2, chunk),
    );
    assert_eq!(c.flush(), 0);
    drop(c);
    let file = read_file(&image);
    assert!(
        file[..4 << 20].iter().all(|&b| b == 0),
        "image: discarded range not zero"
    );
    assert_same("image: zeroed chunk", &file[4 << 20..8 << 20], &want);
    server.stop_clean();
}

/// A virtio-driver client that sends raw requests (here: writes to a read-only device, which
/// libblkio would refuse before sending). Returns each request's result.
fn raw_virtio_requests(sock: &Path, ops: &[RawOp]) -> Vec<Ret> {
    use virtio_driver::{
        VhostUser, VirtioBlkConfig, VirtioBlkFeatureFlags, VirtioBlkQueue, VirtioBlkReqBuf,
        VirtioBlkTransport, VirtioFeatureFlags,
    };
    /// Ring entries: plenty for one request at a time.
    const RAW_QUEUE_SIZE: u16 = 64;
    const LEN: usize = 64 << 10;
    // Accept everything the device may offer, RO included: a driver that knows the device is
    // read-only and writes anyway.
    let features = VirtioFeatureFlags::VERSION_1.bits()
        | VirtioBlkFeatureFlags::RO.bits()
        | VirtioBlkFeatureFlags::FLUSH.bits()
        | VirtioBlkFeatureFlags::DISCARD.bits()
        | VirtioBlkFeatureFlags::WRITE_ZEROES.bits();
    let vu =
        VhostUser::<VirtioBlkConfig, VirtioBlkReqBuf>::new(sock.to_str().expect("path"), features)
            .expect("vhost-user connect");
    let mut transport: Box<VirtioBlkTransport> = Box::new(vu);
    let mut queues = VirtioBlkQueue::<usize>::setup_queues(&mut *transport, 1, RAW_QUEUE_SIZE)
        .expect("setup queues");
    let q = &mut queues[0];

    // SAFETY: memfd_create with a valid C string has no memory effects.
    let fd = unsafe { libc::memfd_create(c"raw-virtio".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: ftruncate on our own fd.
    assert_eq!(unsafe { libc::ftruncate(fd, LEN as libc::off_t) }, 0);
    // SAFETY: a fresh shared mapping of our memfd; unmapped at the end of this function.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED);
    transport
        .map_mem_region(addr as usize, LEN, fd, 0)
        .expect("map region");
    // SAFETY: `addr` is LEN writable bytes we mapped above and only this function uses them.
    let buf = unsafe { std::slice::from_raw_parts_mut(addr.cast::<u8>(), LEN) };
    buf.fill(0xee);

    let notifier = transport.get_submission_notifier(0);
    let mut results = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        match *op {
            RawOp::Write { off, len } => q.write(off, &buf[..len], i),
            RawOp::Read { off, len } => q.read(off, &mut buf[..len], i),
            RawOp::Discard { off, len } => q.discard(off, len, i),
            RawOp::WriteZeroes { off, len } => q.write_zeroes(off, len, false, i),
        }
        .expect("queue request");
        notifier.notify().expect("kick");
        let deadline = Instant::now() + IO_TIMEOUT;
        let ret = loop {
            if let Some(done) = q.completions().next() {
                assert_eq!(done.context, i);
                break done.ret;
            }
            assert!(Instant::now() < deadline, "raw request {i} timed out");
            std::thread::sleep(Duration::from_micros(200));
        };
        results.push(ret);
    }
    drop(queues);
    drop(transport);
    // SAFETY: unmapping and closing what we mapped and opened above; the connection is gone.
    unsafe {
        libc::munmap(addr, LEN);
        libc::close(fd);
    }
    results
}

/// A request for [`raw_virtio_requests`].
#[derive(Debug, Clone, Copy)]
enum RawOp {
    Write { off: u64, len: usize },
    Read { off: u64, len: usize },
    Discard { off: u64, len: u64 },
    WriteZeroes { off: u64, len: u64 },
}

#[test]
fn readonly_export_refuses_writes() {
    let dir = TempDir::new("ro");
    let image = dir.sparse_image("disk.img", IMAGE_SIZE);
    let data = pattern(3, 1 << 20);
    File::options()
        .write(true)
        .open(&image)
        .expect("open")
        .write_all_at(&data, 0)
        .expect("fill");
    let mut disk = Disk::raw(dir.path("vhu.sock"), image.clone());
    disk.backing = Backing::Raw {
        path: image.clone(),
        readonly: true,
        direct: false,
    };
    let server = Server::start(std::slice::from_ref(&disk));

    // The device says it is read-only: libblkio refuses to start a writable instance.
    let err = Client::try_connect(&disk.sock, 1, false, 1 << 20)
        .err()
        .expect("read-write start must fail on a read-only device");
    assert_eq!(err.errno(), blkio::Errno::ROFS, "{}", err.message());

    // Reads work.
    let mut c = Client::connect(&disk.sock, 1, true, 1 << 20);
    assert_same("read-only read", &c.read_vec(0, 1 << 20), &data);
    // libblkio fails writes locally (EBADF) without sending them.
    assert!(c.write(0, &[1u8; 4096]) < 0);
    drop(c);

    // The daemon itself refuses writes, discards and write-zeroes sent anyway.
    let rets = raw_virtio_requests(
        &disk.sock,
        &[
            RawOp::Read { off: 0, len: 4096 },
            RawOp::Write { off: 0, len: 4096 },
            RawOp::Write {
                off: 1 << 20,
                len: 64 << 10,
            },
            RawOp::Discard {
                off: 0,
                len: 1 << 20,
            },
            RawOp::WriteZeroes {
                off: 0,
                len: 1 << 20,
            },
            RawOp::Read {
                off: 4096,
                len: 4096,
            },
        ],
    );
    assert_eq!(rets[0], 0, "raw read");
    for (i, what) in [
        (1, "write"),
        (2, "write"),
        (3, "discard"),
        (4, "write-zeroes"),
    ] {
        assert!(rets[i] < 0, "{what} on a read-only export succeeded");
    }
    assert_eq!(rets[5], 0, "read after refused writes");
    server.stop_clean();
    let file = read_file(&image);
    assert_same("read-only image unchanged", &file[..data.len()], &data);
    assert!(
        file[data.len()..].iter().all(|&b| b == 0),
        "read-only image unchanged past data"
    );
    assert_eq!(file.len() as u64, IMAGE_SIZE);
}

#[test]
fn requests_past_the_end_fail_cleanly() {
    // An odd number of 4 KiB blocks, so the end is not on a large power of two.
    let size = IMAGE_SIZE + 3 * 4096;
    let dir = TempDir::new("capacity");
    let (server, disk, image) = one_raw_disk(&dir, size);
    let mut c = Client::connect(&disk.sock, 1, false, 1 << 20);
    assert_eq!(c.capacity, size, "capacity property");
    let tail = pattern(9, 4096);
    assert_eq!(c.write(size - 4096, &tail), 0, "write of the last block");
    assert_same("last block", &c.read_vec(size - 4096, 4096), &tail);
    assert_eq!(c.read(size - 512, 512), 0, "read of the last sector");

    let eio = -libc::EIO;
    assert_eq!(c.read(size, 512), eio, "read at the capacity");
    assert_eq!(c.read(size - 512, 4096), eio, "read straddling the end");
    assert_eq!(
        c.write(size - 512, &[0x77; 1024]),
        eio,
        "write straddling the end"
    );
    assert_eq!(c.write(size, &[0x77; 512]), eio, "write at the capacity");
    assert_eq!(c.read(1 << 62, 512), eio, "read far past the end");
    assert_eq!(
        c.read(u64::MAX - 511, 512),
        eio,
        "read at the largest sector"
    );
    assert!(
        c.discard(size - 4096, 8192) < 0,
        "discard straddling the end"
    );
    assert!(
        c.write_zeroes(size, 4096, ReqFlags::empty()) < 0,
        "write-zeroes past the end"
    );

    // The queue still works and nothing changed.
    assert_same(
        "last block after errors",
        &c.read_vec(size - 4096, 4096),
        &tail,
    );
    assert_eq!(c.flush(), 0);
    drop(c);
    server.stop_clean();
    let meta = std::fs::metadata(&image).expect("stat");
    assert_eq!(meta.len(), size, "image grew");
    assert_same(
        "image tail",
        &read_file(&image)[(size - 4096) as usize..],
        &tail,
    );
}

#[test]
fn reconnect_sees_earlier_data() {
    let dir = TempDir::new("reconnect");
    let (server, disk, image) = one_raw_disk(&dir, IMAGE_SIZE);
    let a = pattern(11, 256 << 10);
    {
        let mut c = Client::connect(&disk.sock, 1, false, 1 << 20);
        assert_eq!(c.write(0, &a), 0);
        assert_eq!(c.flush(), 0);
    }
    // A second client sees it, writes more, then disconnects with requests still in flight.
    let b = pattern(12, 128 << 10);
    {
        let mut c = Client::connect(&disk.sock, 1, false, 4 << 20);
        assert_same("after reconnect", &c.read_vec(0, a.len()), &a);
        assert_eq!(c.write(1 << 20, &b), 0);
        for i in 0..32u64 {
            let p = c.ptr((i as usize + 1) * (64 << 10));
            if i % 2 == 0 {
                c.queues[0].read(i * (64 << 10), p, 64 << 10, 0, ReqFlags::empty());
            } else {
                c.queues[0].write(
                    (8 << 20) + i * (64 << 10),
                    p,
                    64 << 10,
                    0,
                    ReqFlags::empty(),
                );
            }
        }
        // Kick without waiting, then drop the connection.
        let mut none: [MaybeUninit<Completion>; 0] = [];
        c.queues[0].do_io(&mut none, 0, None, None).expect("kick");
    }
    // Several more connect/disconnect cycles, each checking the data.
    for round in 0..5u64 {
        let mut c = Client::connect(&disk.sock, 1, false, 1 << 20);
        assert_same(&format!("round {round}: a"), &c.read_vec(0, a.len()), &a);
        assert_same(
            &format!("round {round}: b"),
            &c.read_vec(1 << 20, b.len()),
            &b,
        );
        let mark = pattern(100 + round, 4096);
        assert_eq!(c.write((2 << 20) + round * 4096, &mark), 0);
        assert_same(
            "own write",
            &c.read_vec((2 << 20) + round * 4096, 4096),
            &mark,
        );
    }
    server.stop_clean();
    let file = read_file(&image);
    assert_same("image a", &file[..a.len()], &a);
    assert_same("image b", &file[1 << 20..(1 << 20) + b.len()], &b);
}

#[test]
fn null_backend_reads_zeroes_and_accepts_writes() {
    let dir = TempDir::new("null");
    let disk = Disk {
        sock: dir.path("null.sock"),
        backing: Backing::Null,
        queues: 2,
    };
    let server = Server::start(std::slice::from_ref(&disk));
    let mut c = Client::connect(&disk.sock, 2, false, 1 << 20);
    assert_eq!(c.capacity, NULL_SIZE, "null capacity");
    let mut rng = StdRng::seed_from_u64(42);
    for _ in 0..200 {
        let len = rng.gen_range(1..=256usize) * 512;
        let off = rng.gen_range(0..=(NULL_SIZE - len as u64) / SECTOR) * SECTOR;
        c.mem()[..len].fill(0xaa);
        assert_eq!(c.read(off, len), 0, "null read");
        assert!(
            c.mem()[..len].iter().all(|&b| b == 0),
            "null read returned non-zero data"
        );
        assert_eq!(c.write(off, &pattern(off, len)), 0, "null write");
    }
    // Both queues work.
    c.mem()[..4096].fill(0xaa);
    let p = c.ptr(0);
    c.queues[1].read(NULL_SIZE - 4096, p, 4096, 0, ReqFlags::empty());
    assert_eq!(c.wait_one(1), 0, "read on queue 1");
    assert!(c.mem()[..4096].iter().all(|&b| b == 0));
    assert_eq!(c.flush(), 0, "null flush");
    assert_eq!(c.read(NULL_SIZE, 512), -libc::EIO, "null read past the end");
    drop(c);
    server.stop_clean();
}

#[test]
fn two_disks_are_independent() {
    let dir = TempDir::new("twodisks");
    let img_a = dir.sparse_image("a.img", IMAGE_SIZE);
    let img_b = dir.sparse_image("b.img", IMAGE_SIZE / 2);
    let disks = [
        Disk::raw(dir.path("a.sock"), img_a.clone()),
        Disk::raw(dir.path("b.sock"), img_b.clone()),
    ];
    let server = Server::start(&disks);
    let mut a = Client::connect(&disks[0].sock, 1, false, 1 << 20);
    let mut b = Client::connect(&disks[1].sock, 1, false, 1 << 20);
    assert_eq!(a.capacity, IMAGE_SIZE);
    assert_eq!(b.capacity, IMAGE_SIZE / 2);
    let da = pattern(21, 64 << 10);
    let db = pattern(22, 64 << 10);
    assert_eq!(a.write(0, &da), 0);
    assert_eq!(b.write(0, &db), 0);
    assert_same("disk a", &a.read_vec(0, da.len()), &da);
    assert_same("disk b", &b.read_vec(0, db.len()), &db);
    drop((a, b));
    server.stop_clean();
    assert_same("image a", &read_file(&img_a)[..da.len()], &da);
    assert_same("image b", &read_file(&img_b)[..db.len()], &db);
}
