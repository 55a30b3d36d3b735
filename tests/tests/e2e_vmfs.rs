//! End-to-end tests on a VMFS-backed disk: a Linux guest (tools/test-guest, QEMU TCG) against
//! stratad serving a thin file of a vmfs datastore (`backend=vmfs`), made with
//! `stratactl mkfs` + `stratactl disk create --thin` in a temp dir. After each test stratad is
//! stopped and `stratactl --datastore PATH fsck` must report the datastore clean (exit 0).
//!
//! - `vmfs_data_survives_daemon_restart`: fio writes verifiable data (crc32c headers), stratad
//!   is stopped with SIGTERM (must exit 0) and restarted on the same datastore, and a second
//!   boot verifies every block (`--verify_only`); a verify of never-written space must fail.
//! - `vmfs_two_queues_two_vcpus`: a 2-queue export seen by a 2-vCPU guest has two blk-mq
//!   hardware queues, both carry I/O, and two parallel fio jobs verify their data.
//! - `vmfs_readonly_export_refuses_writes`: data written through a writable export (libblkio)
//!   is then served with `readonly=on`; the guest sees a read-only disk, a write fails, reads
//!   return the data, and the file's contents are unchanged.
//! - `vmfs_kill9_while_guest_writes`: the guest writes region A with fio (crc32c), fsyncs it
//!   (a virtio-blk FLUSH) and prints a marker, then keeps writing region B with a fixed byte
//!   pattern and never flushes. The test kills stratad with SIGKILL mid-write, kills QEMU,
//!   restarts stratad (journal replay), stops it with SIGTERM, runs fsck (must be clean), then
//!   boots a guest that verifies region A fully, and reads region B back with libblkio: every
//!   sector must be zeroes or the pattern, never anything else.
//!
//! The guests share this machine's two cores, so the tests take a lock and boot one at a time;
//! each runs under a hard time-out.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use test_guest::{FioJob, ScratchDir, VmConfig};
use tests::daemon::Stratad;
use tests::e2e::{exited, run_ok, stop_cleanly, with_deadline};
use tests::vmfs::{kill9, spawn_after_crash, BackgroundGuest, Provisioning, TestDatastore};

/// Hard limit for one guest run (QEMU is killed after it).
const VM_TIMEOUT: Duration = Duration::from_secs(240);
/// Size of the datastore file (sparse).
const DATASTORE_SIZE: &str = "1G";
/// Size of the thin disk file the guest sees.
const DISK_SIZE: u64 = 256 << 20;
/// Name of the disk file in the datastore.
const DISK: &str = "disk0.img";

/// A fresh datastore in `dir` holding a thin [`DISK_SIZE`] file [`DISK`].
fn thin_datastore(dir: &ScratchDir) -> TestDatastore {
    let ds = TestDatastore::mkfs(&dir.join("ds.vmfs"), DATASTORE_SIZE).expect("mkfs");
    ds.disk_create(DISK, &format!("{}M", DISK_SIZE >> 20), Provisioning::Thin)
        .expect("disk create");
    ds
}

// ---------------------------------------------------------------------------------------------
// A minimal libblkio client (host-side writes and reads of the served disk)

/// How long one request may take before the test declares the daemon hung.
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// Bytes per request (one descriptor; stratad's `size_max` is 1 MiB).
const CHUNK: usize = 1 << 20;

/// A connected libblkio instance with one queue and one [`CHUNK`]-byte buffer.
struct Client {
    // Declared first so the queue is dropped before the instance.
    queue: Blkioq,
    region: MemoryRegion,
    // Kept alive for the queue and the mapped region.
    _bio: Blkio,
    capacity: u64,
}

impl Client {
    fn connect(sock: &Path, read_only: bool) -> Client {
        let mut bio = Blkio::new("virtio-blk-vhost-user").expect("blkio instance");
        bio.set_str("path", sock.to_str().expect("utf-8 path"))
            .expect("path");
        bio.set_bool("read-only", read_only).expect("read-only");
        bio.connect().expect("connect libblkio");
        let capacity = bio.get_u64("capacity").expect("capacity");
        bio.set_i32("num-queues", 1).expect("num-queues");
        let mut started = bio.start().expect("start libblkio");
        let region = bio.alloc_mem_region(CHUNK).expect("alloc region");
        bio.map_mem_region(&region).expect("map region");
        Client {
            queue: started.queues.remove(0),
            region,
            _bio: bio,
            capacity,
        }
    }

    fn mem(&mut self) -> &mut [u8] {
        // SAFETY: libblkio mapped `region.len` writable bytes at `region.addr` for the life of
        // `self.bio`; `&mut self` ensures no request of ours uses them (every helper waits for
        // its request before returning).
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    fn wait_one(&mut self, what: &str) {
        let mut c = [MaybeUninit::<Completion>::uninit()];
        let mut t = IO_TIMEOUT;
        let n = self
            .queue
            .do_io(&mut c, 1, Some(&mut t), None)
            .expect("do_io");
        assert_eq!(n, 1, "{what}: no completion within {IO_TIMEOUT:?}");
        // SAFETY: do_io filled the first n = 1 completions.
        let ret = unsafe { c[0].assume_init_ref() }.ret;
        assert_eq!(ret, 0, "{what} failed: {ret}");
    }

    /// Writes `data` at `off`, in requests of at most [`CHUNK`] bytes.
    fn write(&mut self, off: u64, data: &[u8]) {
        for (i, piece) in data.chunks(CHUNK).enumerate() {
            self.mem()[..piece.len()].copy_from_slice(piece);
            let at = off + (i * CHUNK) as u64;
            let p = self.region.addr as *const u8;
            self.queue.write(at, p, piece.len(), 0, ReqFlags::empty());
            self.wait_one(&format!("write of {} bytes at {at}", piece.len()));
        }
    }

    /// Reads `len` bytes at `off`.
    fn read(&mut self, off: u64, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            let at = off + done as u64;
            let p = self.region.addr as *mut u8;
            self.mem()[..n].fill(0xee);
            self.queue.read(at, p, n, 0, ReqFlags::empty());
            self.wait_one(&format!("read of {n} bytes at {at}"));
            out.extend_from_slice(&self.mem()[..n]);
            done += n;
        }
        out
    }

    fn flush(&mut self) {
        self.queue.flush(0, ReqFlags::empty());
        self.wait_one("flush");
    }
}

// ---------------------------------------------------------------------------------------------
// The scenarios of e2e_guest.rs on a vmfs disk

#[test]
fn vmfs_data_survives_daemon_restart() {
    with_deadline(|| {
        let dir = ScratchDir::new("e2e-vmfs-persist").expect("scratch dir");
        let ds = thin_datastore(&dir);
        let sock = dir.join("blk.sock");
        let args = ds.disk_args(&sock, DISK, "");
        let cfg = VmConfig::new().blk(&sock, 1).timeout(VM_TIMEOUT);
        let job = FioJob::new("persist", "/dev/vda", "randwrite", "4k-64k")
            .size("32M")
            .iodepth(16)
            .verify("crc32c");

        let daemon = Stratad::spawn(&args, &[&sock]).expect("start stratad");
        let write = job.clone().write_only();
        let script = format!("set -e\n{}\nsync\n", write.checked_command());
        run_ok(&cfg, &daemon, &script);
        stop_cleanly(daemon);
        ds.assert_fsck_clean("after the write boot");
        let ls = ds.ls().expect("ls");
        eprintln!("{ls}");

        let daemon = Stratad::spawn(&args, &[&sock]).expect("restart stratad");
        // The same job's layout (fixed seeds) replayed as a pure verify; then a control: the
        // same verify over a range that was never written (a hole of the thin file, reading
        // zeroes) must fail, which shows the verify really reads and checks the data.
        let verify = job.clone().verify_only();
        let control = FioJob::new("control", "/dev/vda", "randwrite", "4k-64k")
            .size("4M")
            .verify("crc32c")
            .verify_only()
            .arg("--offset=128M");
        let script = format!(
            "set -e\n{}\necho verify-ok\nif {} >/tmp/control.log 2>&1; then\n  echo 'control: verify of unwritten data passed'\n  exit 1\nfi\necho control-failed-as-expected\n",
            verify.checked_command(),
            control.command()
        );
        let run = run_ok(&cfg, &daemon, &script);
        assert!(run.output.contains("verify-ok"), "{}", run.output);
        assert!(
            run.output.contains("control-failed-as-expected"),
            "{}",
            run.output
        );
        stop_cleanly(daemon);
        ds.assert_fsck_clean("after the verify boot");
    });
}

#[test]
fn vmfs_two_queues_two_vcpus() {
    with_deadline(|| {
        let dir = ScratchDir::new("e2e-vmfs-mq").expect("scratch dir");
        let ds = thin_datastore(&dir);
        let sock = dir.join("blk.sock");
        let daemon =
            Stratad::spawn(&ds.disk_args(&sock, DISK, ",queues=2"), &[&sock]).expect("start");
        let cfg = VmConfig::new().cpus(2).blk(&sock, 2).timeout(VM_TIMEOUT);
        // One job per vCPU, so that each submits on its own hardware queue.
        let job = FioJob::new("mq", "/dev/vda", "randwrite", "4k-64k")
            .size("16M")
            .jobs(2)
            .iodepth(16)
            .verify("crc32c")
            .arg("--cpus_allowed=0-1")
            .arg("--cpus_allowed_policy=split");
        let script = format!(
            r#"set -e
queues=$(ls /sys/block/vda/mq | wc -l)
echo "hw-queues=$queues"
[ "$queues" -eq 2 ]
{}
# Completion interrupts per virtqueue (MSI-X vector "virtioN-req.Q"), summed over the vCPUs.
awk '/virtio[0-9]+-req\./ {{ n = 0; for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+$/) n += $i; print "irqs " $NF "=" n }}' /proc/interrupts
"#,
            job.checked_command()
        );
        let run = run_ok(&cfg, &daemon, &script);
        assert!(run.output.contains("hw-queues=2"), "{}", run.output);
        for q in 0..2 {
            let suffix = format!("-req.{q}=");
            let irqs = run
                .output
                .lines()
                .filter_map(|l| l.strip_prefix("irqs "))
                .find_map(|l| l.split_once(&suffix).map(|(_, n)| n))
                .and_then(|n| n.trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no interrupt count for queue {q}:\n{}", run.output));
            assert!(irqs > 0, "virtqueue {q} completed no I/O:\n{}", run.output);
        }
        stop_cleanly(daemon);
        ds.assert_fsck_clean("after the two-queue run");
    });
}

#[test]
fn vmfs_readonly_export_refuses_writes() {
    with_deadline(|| {
        const PATTERN: &[u8] = b"STRATA-READONLY-PATTERN";
        /// The span the test writes and later compares: the pattern at 0 and at 1 MiB, a
        /// random-looking 1 MiB at 2 MiB, and a hole up to 4 MiB.
        const SPAN: usize = 4 << 20;
        let dir = ScratchDir::new("e2e-vmfs-ro").expect("scratch dir");
        let ds = thin_datastore(&dir);
        let sock = dir.join("blk.sock");

        // Write the data through a writable export, flush, stop cleanly.
        let mut want = vec![0u8; SPAN];
        want[..PATTERN.len()].copy_from_slice(PATTERN);
        want[1 << 20..(1 << 20) + PATTERN.len()].copy_from_slice(PATTERN);
        for (i, b) in want[2 << 20..3 << 20].iter_mut().enumerate() {
            *b = (i.wrapping_mul(2_654_435_761) >> 13) as u8;
        }
        let daemon = Stratad::spawn(&ds.disk_args(&sock, DISK, ""), &[&sock]).expect("start");
        {
            let mut c = Client::connect(&sock, false);
            assert_eq!(c.capacity, DISK_SIZE, "capacity");
            c.write(0, &want[..3 << 20]);
            c.flush();
        }
        stop_cleanly(daemon);
        ds.assert_fsck_clean("after writing the data");

        let daemon = Stratad::spawn(&ds.disk_args(&sock, DISK, ",readonly=on"), &[&sock])
            .expect("start stratad read-only");
        let cfg = VmConfig::new().blk(&sock, 1).timeout(VM_TIMEOUT);
        let len = PATTERN.len();
        let script = format!(
            r#"ro=$(cat /sys/block/vda/ro)
echo "ro=$ro"
[ "$ro" = 1 ] || exit 10
echo "head=$(dd if=/dev/vda bs=4096 count=1 iflag=direct 2>/dev/null | head -c {len})"
echo "at-1M=$(dd if=/dev/vda bs=4096 skip=256 count=1 iflag=direct 2>/dev/null | head -c {len})"
dd if=/dev/vda of=/dev/null bs=64k count=256 iflag=direct || exit 11
if dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct conv=fsync; then
    echo "write to the read-only disk succeeded"
    exit 12
fi
echo write-refused
if dd if=/dev/zero of=/dev/vda bs=4096 seek=256 count=1 conv=fsync; then
    echo "buffered write to the read-only disk succeeded"
    exit 13
fi
echo buffered-write-refused
"#
        );
        let run = run_ok(&cfg, &daemon, &script);
        let pattern = String::from_utf8_lossy(PATTERN);
        assert!(run.output.contains("ro=1"), "{}", run.output);
        assert!(
            run.output.contains(&format!("head={pattern}")),
            "read of sector 0 did not return the file's data:\n{}",
            run.output
        );
        assert!(
            run.output.contains(&format!("at-1M={pattern}")),
            "read at 1 MiB did not return the file's data:\n{}",
            run.output
        );
        assert!(run.output.contains("write-refused"), "{}", run.output);
        // The file's contents, read back through the (still read-only) export.
        {
            let mut c = Client::connect(&sock, true);
            let got = c.read(0, SPAN);
            if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
                panic!(
                    "the read-only file changed: first difference at byte {i} (got {}, want {})",
                    got[i], want[i]
                );
            }
        }
        stop_cleanly(daemon);
        ds.assert_fsck_clean("after the read-only run");
    });
}

// ---------------------------------------------------------------------------------------------
// kill -9 of stratad while the guest writes

/// Region A (flushed): fio with crc32c headers over [0, 32 MiB).
const A_SIZE: &str = "32M";
/// Region B (never flushed): [64 MiB, 256 MiB), filled with [`B_PATTERN`].
const B_OFFSET: u64 = 64 << 20;
const B_LEN: u64 = 192 << 20;
/// What fio writes in region B (`--buffer_pattern`), repeated from the start of each block.
const B_PATTERN: &[u8] = b"STRATA-B";
/// Region B's write rate: slow enough that the kill lands long before fio has covered the
/// region (so it holds both written and never-written space), fast enough to span several
/// of stratad's 1 s commit intervals.
const B_RATE: &str = "16m";
/// How long region B is written before the kill.
const B_WRITE_BEFORE_KILL: Duration = Duration::from_secs(3);

#[test]
fn vmfs_kill9_while_guest_writes() {
    with_deadline(|| {
        let dir = ScratchDir::new("e2e-vmfs-kill9").expect("scratch dir");
        let ds = thin_datastore(&dir);
        let sock = dir.join("blk.sock");
        let args = ds.disk_args(&sock, DISK, "");
        let cfg = VmConfig::new().blk(&sock, 1).timeout(VM_TIMEOUT);
        let job_a = FioJob::new("flushed", "/dev/vda", "randwrite", "4k-64k")
            .size(A_SIZE)
            .iodepth(16)
            .verify("crc32c");
        // fsync(2) of the block device at the end of the job: the guest sends a FLUSH.
        let write_a = job_a.clone().write_only().arg("--end_fsync=1");
        // Region B: random writes (the first ones allocate thin blocks, later ones hit written
        // space) for far longer than the test waits, never flushed.
        let hex: String = B_PATTERN.iter().map(|b| format!("{b:02x}")).collect();
        let mut write_b = FioJob::new("unflushed", "/dev/vda", "randwrite", "4k-64k")
            .iodepth(16)
            .arg(&format!("--offset={B_OFFSET}"))
            .arg(&format!("--size={B_LEN}"))
            .arg(&format!("--buffer_pattern=0x{hex}"))
            .arg("--scramble_buffers=0")
            .arg("--refill_buffers=0")
            .arg(&format!("--rate={B_RATE}"));
        write_b.runtime_secs = Some(200);
        let script = format!(
            "set -e\n{}\necho PHASE-A-FLUSHED\necho PHASE-B-START\n{}\necho PHASE-B-DONE\n",
            write_a.checked_command(),
            write_b.checked_command()
        );

        let daemon = Stratad::spawn(&args, &[&sock]).expect("start stratad");
        let mut guest = BackgroundGuest::start(&cfg, &script).expect("boot guest");
        guest
            .wait_for_output("PHASE-B-START", VM_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}"));
        let a_done = guest.elapsed();
        std::thread::sleep(B_WRITE_BEFORE_KILL);
        assert!(
            !exited(daemon.pid()),
            "stratad exited before the kill:\n{}",
            guest.output()
        );
        let before_kill = guest.output();
        assert!(
            !before_kill.contains("PHASE-B-DONE") && !before_kill.contains("failed"),
            "region B's writer ended before the kill:\n{before_kill}"
        );
        kill9(daemon);
        let output = guest.kill();
        eprintln!(
            "region A flushed {:.1} s after QEMU started; stratad killed {:.1} s later\n--- guest output ---\n{output}",
            a_done.as_secs_f64(),
            B_WRITE_BEFORE_KILL.as_secs_f64()
        );

        // Before any mount: fsck reads the home locations only, so a journal that still holds
        // committed transactions is reported (and what it covers may look inconsistent).
        let raw = ds.fsck().expect("fsck");
        eprintln!(
            "fsck right after kill -9 (before journal replay): {}\n{}",
            if raw.clean { "clean" } else { "not clean" },
            raw.output.trim()
        );

        // Restart (the mount replays the journal; the killed daemon's socket file is still
        // there), stop cleanly: now fsck must be clean.
        let daemon = spawn_after_crash(&args, &[&sock]).expect("restart stratad after kill -9");
        stop_cleanly(daemon);
        ds.assert_fsck_clean("after kill -9 and a restart");

        // Serve again: a guest verifies region A entirely; then libblkio reads region B.
        let daemon = Stratad::spawn(&args, &[&sock]).expect("restart stratad");
        let verify_a = job_a.clone().verify_only();
        let script = format!(
            "set -e\n{}\necho region-a-verified\n",
            verify_a.checked_command()
        );
        let run = run_ok(&cfg, &daemon, &script);
        assert!(run.output.contains("region-a-verified"), "{}", run.output);

        let mut c = Client::connect(&sock, true);
        let (mut zero, mut pattern, mut other) = (0u64, 0u64, Vec::new());
        for at in (B_OFFSET..B_OFFSET + B_LEN).step_by(CHUNK) {
            let data = c.read(at, CHUNK);
            for (i, sector) in data.chunks(512).enumerate() {
                if sector.iter().all(|&b| b == 0) {
                    zero += 1;
                } else if sector
                    .iter()
                    .enumerate()
                    .all(|(j, &b)| b == B_PATTERN[j % B_PATTERN.len()])
                {
                    pattern += 1;
                } else {
                    other.push(at + (i * 512) as u64);
                }
            }
        }
        // The region before B (between A and B) was never written: zeroes.
        let gap = c.read(32 << 20, 32 << 20);
        drop(c);
        eprintln!(
            "region B after the crash: {pattern} sectors of the pattern, {zero} of zeroes, {} other",
            other.len()
        );
        assert!(
            other.is_empty(),
            "region B holds {} sectors that are neither zeroes nor the guest's pattern (first at byte {:?})",
            other.len(),
            other.first()
        );
        assert!(
            gap.iter().all(|&b| b == 0),
            "never-written space between regions A and B is not zero"
        );
        stop_cleanly(daemon);
        ds.assert_fsck_clean("after verifying");
    });
}
