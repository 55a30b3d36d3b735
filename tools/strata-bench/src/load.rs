//! The load generator: one libblkio `virtio-blk-vhost-user` connection per disk, `queues` queues
//! with `qd` requests each per connection, all driven by this (pinned) thread.
//!
//! Every buffer lives in one memory region allocated and mapped before the run; every request
//! slot has a fixed buffer and a fixed submit-timestamp cell; completions land in a preallocated
//! array. The loop therefore allocates nothing per I/O. Timestamps are taken once per reaped batch
//! (one clock read per `do_io` that returned completions), so a request's latency is measured from
//! the batch in which it was (re)submitted to the batch in which it was reaped.

use std::mem::MaybeUninit;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use blkio::{Blkio, Blkioq, Completion, ReqFlags};

use crate::histogram::Histogram;
use crate::server::{
    self_cpu_time, Counters, CpuClock, CpuSample, MetricsProbe, ProcStatus, SystemCpu,
};
use crate::STOP;

/// Request size: 4 KiB, the usual random-I/O unit.
pub const BLOCK: usize = 4096;
/// libblkio 0.5.1's virtio driver uses no indirect descriptors: every read/write takes three
/// descriptors (request header, data, status byte), so a queue of N entries holds N/3 requests.
const DESCS_PER_REQUEST: u32 = 3;
/// libblkio's default virtqueue size; used unless `qd` needs more descriptors.
const DEFAULT_QUEUE_SIZE: u32 = 256;
/// A run with no completion for this long has hung (server stuck or dead).
const STALL_MAX: Duration = Duration::from_secs(10);
/// Sleep-mode poll(2) timeout: bounds how late the loop notices the end of a phase or a signal.
const POLL_TIMEOUT_MS: libc::c_int = 100;
/// Byte written by the randwrite workload (anything but zero, so writes carry data).
const WRITE_PATTERN: u8 = 0x5a;

/// What the client does while waiting for completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientMode {
    /// Sleep in poll(2) on the queues' completion eventfds (server signals each completion).
    Sleep,
    /// Busy-poll libblkio poll queues (`num-poll-queues`), never sleeping.
    Poll,
}

impl ClientMode {
    pub fn name(self) -> &'static str {
        match self {
            ClientMode::Sleep => "sleep",
            ClientMode::Poll => "poll",
        }
    }
}

/// The request mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// 4 KiB reads at uniformly random 4 KiB-aligned offsets.
    Randread,
    /// 4 KiB writes at uniformly random 4 KiB-aligned offsets.
    Randwrite,
    /// 4 KiB writes, each into a 1 MiB region the run has not written yet (regions in a
    /// scattered order that repeats only after all were written), at a random 4 KiB offset in
    /// it: on a thin vmfs disk, every write allocates a file block.
    Allocwrite,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Randread => "randread",
            Workload::Randwrite => "randwrite",
            Workload::Allocwrite => "allocwrite",
        }
    }
}

/// One measurement's parameters.
#[derive(Debug, Clone)]
pub struct LoadSpec<'a> {
    /// One socket per disk; the client opens one connection to each.
    pub socks: &'a [PathBuf],
    pub workload: Workload,
    pub qd: u32,
    pub queues: u32,
    pub mode: ClientMode,
    pub warmup: Duration,
    pub seconds: Duration,
    pub seed: u64,
    /// Offsets only within (first byte, length) of the disk (4 KiB-aligned); None: the whole
    /// disk.
    pub window: Option<(u64, u64)>,
}

/// Raw figures of one measurement.
#[derive(Debug, Clone, Copy)]
pub struct LoadResult {
    /// I/Os completed inside the measured interval.
    pub ios: u64,
    pub elapsed: Duration,
    pub server_cpu: Duration,
    pub client_cpu: Duration,
    /// Busy and steal time of the server and client CPUs over the measured interval.
    pub machine: CpuSample,
    /// Number of CPUs `machine` covers.
    pub cpus: usize,
    pub capacity: u64,
    /// stratad's own counters over the measured interval (stratad and vmfs systems only).
    pub counters: Option<Counters>,
    /// Server resident memory (KiB) and thread count at the end of the measured interval.
    pub rss_kib: u64,
    pub threads: u64,
}

/// xorshift64*: a tiny, allocation-free PRNG, plenty for picking offsets.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        // The state must not be zero; mix the seed so that small seeds differ.
        Rng((seed ^ 0x9e37_79b9_7f4a_7c15) | 1)
    }

    #[inline]
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the tiny bias is irrelevant here).
    #[inline]
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// One queue with its request slots.
struct Lane {
    q: Blkioq,
    /// Base address of this queue's `qd` buffers inside the memory region.
    buf_base: usize,
    /// Submit time (ns since the run's epoch) of the request in each slot.
    submitted_ns: Vec<u64>,
    completions: Vec<MaybeUninit<Completion>>,
    in_flight: u32,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane")
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

/// What is read at the start and end of the measured interval.
#[derive(Debug)]
pub struct Meters {
    /// CPU time of the server process.
    pub server: CpuClock,
    /// Busy and steal time of the two CPUs.
    pub system: SystemCpu,
    /// stratad's `--metrics` endpoint, when the server is stratad.
    pub metrics: Option<MetricsProbe>,
    /// The server's `/proc/PID/status` (RSS, threads).
    pub status: ProcStatus,
}

/// Phase of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Warmup,
    Measure,
    /// Measurement over: reap what is in flight, submit nothing.
    Drain,
}

/// Connects to every socket of `spec.socks`, runs warm-up then the measured interval, drains and disconnects.
/// `hist` receives the latencies of the measured interval (it is reset first).
pub fn run(
    spec: &LoadSpec<'_>,
    meters: &mut Meters,
    hist: &mut Histogram,
) -> anyhow::Result<LoadResult> {
    let qd = spec.qd as usize;
    let nq = spec.queues as usize;
    let mut conns = Vec::with_capacity(spec.socks.len());
    let mut lanes: Vec<Lane> = Vec::with_capacity(spec.socks.len() * nq);
    for sock in spec.socks {
        let mut conn = Connection::open(sock, spec.qd, spec.queues, spec.mode)?;
        lanes.extend(conn.lanes(qd)?);
        conns.push(conn);
    }
    let capacity = conns.iter().map(|c| c.capacity).min().unwrap_or(0);
    let (first, span) = spec.window.unwrap_or((0, capacity));
    if first % BLOCK as u64 != 0 || first.saturating_add(span) > capacity || span < BLOCK as u64 {
        bail!("offset window {first}+{span} does not fit the disk ({capacity} bytes)");
    }
    let blocks = span / BLOCK as u64;
    let nq = lanes.len();
    let mut fds: Vec<libc::pollfd> = Vec::with_capacity(nq);
    if spec.mode == ClientMode::Sleep {
        for lane in &mut lanes {
            lane.q.set_completion_fd_enabled(true);
            let fd: RawFd = lane
                .q
                .get_completion_fd()
                .context("queue has no completion fd")?;
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
    }

    let mut rng = Rng::new(spec.seed);
    let epoch = Instant::now();
    let now_ns = || epoch.elapsed().as_nanos() as u64;
    let write = spec.workload != Workload::Randread;
    let regions = (span / REGION).max(1);
    let stride = region_stride(regions);
    let next_region = std::cell::Cell::new(0u64);
    let submit = |lane: &mut Lane, slot: usize, rng: &mut Rng, now: u64| {
        let offset = if spec.workload == Workload::Allocwrite {
            let k = next_region.get();
            next_region.set(k.wrapping_add(1));
            let region = (k % regions) * stride % regions;
            first + region * REGION + rng.below(REGION / BLOCK as u64) * BLOCK as u64
        } else {
            first + rng.below(blocks) * BLOCK as u64
        };
        let buf = lane.buf_base + slot * BLOCK;
        lane.submitted_ns[slot] = now;
        if write {
            lane.q
                .write(offset, buf as *const u8, BLOCK, slot, ReqFlags::empty());
        } else {
            lane.q
                .read(offset, buf as *mut u8, BLOCK, slot, ReqFlags::empty());
        }
        lane.in_flight += 1;
    };

    hist.reset();
    let start = now_ns();
    for lane in &mut lanes {
        for slot in 0..qd {
            submit(lane, slot, &mut rng, start);
        }
    }

    let mut phase = Phase::Warmup;
    let mut phase_end = start + spec.warmup.as_nanos() as u64;
    let mut measured_ios = 0u64;
    let mut errors = 0u64;
    let mut first_error = 0i32;
    let mut last_progress = start;
    let (mut t0, mut t1) = (0u64, 0u64);
    let (mut srv0, mut srv1) = (Duration::ZERO, Duration::ZERO);
    let (mut cli0, mut cli1) = (Duration::ZERO, Duration::ZERO);
    let (mut sys0, mut sys1) = (CpuSample::default(), CpuSample::default());
    let (mut counters0, mut counters) = (None, None);
    let (mut rss_kib, mut threads) = (0, 0);

    loop {
        let mut reaped = 0usize;
        for lane in &mut lanes {
            loop {
                // do_io with min_completions 0 never blocks: it kicks the queue if the device
                // wants a notification and returns what has completed.
                let n = lane
                    .q
                    .do_io(&mut lane.completions, 0, None, None)
                    .map_err(blkio_err("do_io"))?;
                if n == 0 {
                    break;
                }
                reaped += n;
                let now = now_ns();
                last_progress = now;
                for i in 0..n {
                    // SAFETY: do_io initialised the first `n` elements of `completions`.
                    let c = unsafe { lane.completions[i].assume_init_ref() };
                    let (slot, ret) = (c.user_data, c.ret);
                    lane.in_flight -= 1;
                    if ret != 0 {
                        errors += 1;
                        first_error = if first_error == 0 { ret } else { first_error };
                    }
                    if phase == Phase::Measure {
                        hist.record(now.saturating_sub(lane.submitted_ns[slot]));
                        measured_ios += 1;
                    }
                    if phase != Phase::Drain {
                        submit(lane, slot, &mut rng, now);
                    }
                }
            }
        }

        let now = now_ns();
        if phase != Phase::Drain && now >= phase_end {
            if phase == Phase::Warmup {
                phase = Phase::Measure;
                hist.reset();
                measured_ios = 0;
                counters0 = match meters.metrics.as_mut() {
                    Some(m) => Some(m.read()?),
                    None => None,
                };
                sys0 = meters.system.read()?;
                srv0 = meters.server.read()?;
                cli0 = self_cpu_time();
                t0 = now_ns();
                phase_end = t0 + spec.seconds.as_nanos() as u64;
            } else {
                t1 = now_ns();
                srv1 = meters.server.read()?;
                cli1 = self_cpu_time();
                sys1 = meters.system.read()?;
                if let (Some(m), Some(c0)) = (meters.metrics.as_mut(), counters0.as_ref()) {
                    counters = Some(m.read()?.since(c0));
                }
                (rss_kib, threads) = meters.status.read()?;
                phase = Phase::Drain;
            }
        }
        if phase == Phase::Drain && lanes.iter().all(|l| l.in_flight == 0) {
            break;
        }
        if STOP.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        if now.saturating_sub(last_progress) > STALL_MAX.as_nanos() as u64 {
            bail!("no completion for {STALL_MAX:?}: server hung or dead");
        }
        if reaped == 0 && spec.mode == ClientMode::Sleep {
            wait_completions(&mut fds)?;
        }
    }

    if errors > 0 {
        bail!(
            "{errors} requests failed (first: {})",
            std::io::Error::from_raw_os_error(-first_error)
        );
    }
    // Dropping the queues and the instance disconnects; libblkio frees the region.
    drop(lanes);
    drop(conns);
    Ok(LoadResult {
        ios: measured_ios,
        elapsed: Duration::from_nanos(t1.saturating_sub(t0)),
        server_cpu: srv1.saturating_sub(srv0),
        client_cpu: cli1.saturating_sub(cli0),
        machine: CpuSample {
            busy: sys1.busy.saturating_sub(sys0.busy),
            steal: sys1.steal.saturating_sub(sys0.steal),
        },
        cpus: meters.system.cpu_count(),
        capacity,
        counters,
        rss_kib,
        threads,
    })
}

/// The allocwrite workload's region: vmfs's file block.
const REGION: u64 = 1 << 20;

/// A step through `regions` that visits each once per cycle in a scattered order: the first
/// number coprime with `regions` at or above 0.618 × regions (golden-ratio spacing).
fn region_stride(regions: u64) -> u64 {
    fn gcd(a: u64, b: u64) -> u64 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    let mut s = (regions as f64 * 0.618) as u64 | 1;
    while gcd(s, regions) != 1 {
        s += 2;
    }
    s
}

/// One started libblkio connection with its queues and buffer region.
pub struct Connection {
    bio: Blkio,
    queues: Vec<Blkioq>,
    /// Base address of the connection's buffer region (`queues * qd` blocks).
    region_addr: usize,
    pub capacity: u64,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Connects to `sock`, starts `queues` queues (poll queues with `ClientMode::Poll`) deep
    /// enough for `qd` requests, and maps a buffer region of `queues * qd` blocks.
    pub fn open(sock: &Path, qd: u32, queues: u32, mode: ClientMode) -> anyhow::Result<Self> {
        let mut bio = Blkio::new("virtio-blk-vhost-user").map_err(blkio_err("new"))?;
        let path = sock.to_str().context("socket path is not UTF-8")?;
        bio.set_str("path", path).map_err(blkio_err("set path"))?;
        bio.connect().map_err(blkio_err("connect"))?;
        let capacity = bio.get_u64("capacity").map_err(blkio_err("capacity"))?;
        if capacity < BLOCK as u64 {
            bail!("device capacity {capacity} is below one {BLOCK}-byte block");
        }
        let nq_i32 = i32::try_from(queues).context("queues")?;
        let (plain, polled) = match mode {
            ClientMode::Sleep => (nq_i32, 0),
            ClientMode::Poll => (0, nq_i32),
        };
        bio.set_i32("num-queues", plain)
            .map_err(blkio_err("num-queues"))?;
        bio.set_i32("num-poll-queues", polled)
            .map_err(blkio_err("num-poll-queues"))?;
        let needed = (qd * DESCS_PER_REQUEST).next_power_of_two();
        if needed > DEFAULT_QUEUE_SIZE {
            let size = i32::try_from(needed).context("queue size")?;
            bio.set_i32("queue-size", size)
                .map_err(blkio_err("queue-size"))?;
        }
        let started = bio.start().map_err(blkio_err("start"))?;
        let queues_v = match mode {
            ClientMode::Sleep => started.queues,
            ClientMode::Poll => started.poll_queues,
        };
        if queues_v.len() != queues as usize {
            bail!(
                "libblkio started {} queues, wanted {queues}",
                queues_v.len()
            );
        }
        let align = usize::try_from(
            bio.get_u64("mem-region-alignment")
                .map_err(blkio_err("align"))?,
        )
        .context("alignment")?
        .max(1);
        let len = (queues as usize * qd as usize * BLOCK).div_ceil(align) * align;
        let region = bio
            .alloc_mem_region(len)
            .map_err(blkio_err("alloc_mem_region"))?;
        bio.map_mem_region(&region)
            .map_err(blkio_err("map_mem_region"))?;
        // SAFETY: the region is `len` bytes of fresh, writable shared memory mapped by libblkio
        // at `region.addr`; no request uses it yet.
        unsafe { std::ptr::write_bytes(region.addr as *mut u8, WRITE_PATTERN, len) };
        Ok(Connection {
            bio,
            queues: queues_v,
            region_addr: region.addr,
            capacity,
        })
    }

    /// Hands the queues out as lanes of `qd` slots each (the connection keeps the instance).
    fn lanes(&mut self, qd: usize) -> anyhow::Result<Vec<Lane>> {
        let base = self.region_addr;
        Ok(std::mem::take(&mut self.queues)
            .into_iter()
            .enumerate()
            .map(|(i, q)| Lane {
                q,
                buf_base: base + i * qd * BLOCK,
                submitted_ns: vec![0; qd],
                completions: std::iter::repeat_with(MaybeUninit::uninit)
                    .take(qd)
                    .collect(),
                in_flight: 0,
            })
            .collect())
    }

    /// Keeps the connection open, for the idle measurement.
    pub fn instance(&self) -> &Blkio {
        &self.bio
    }
}

/// Sleeps until a completion eventfd fires (or the poll timeout), then clears the fired ones.
/// Used-buffer notifications stay enabled, so a completion that lands after the drain above
/// re-arms the eventfd and wakes the next poll.
fn wait_completions(fds: &mut [libc::pollfd]) -> anyhow::Result<()> {
    let nfds = libc::nfds_t::try_from(fds.len()).context("nfds")?;
    // SAFETY: `fds` is a valid, writable array of `nfds` pollfd structures.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), nfds, POLL_TIMEOUT_MS) };
    if rc < 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() == std::io::ErrorKind::Interrupted {
            return Ok(());
        }
        return Err(err).context("poll");
    }
    for pfd in fds.iter_mut() {
        if pfd.revents & libc::POLLIN != 0 {
            let mut val = 0u64;
            // SAFETY: reads 8 bytes into a local u64 from an eventfd (non-blocking, set by
            // libblkio); a failed or short read only means nothing was pending.
            unsafe { libc::read(pfd.fd, (&mut val as *mut u64).cast(), 8) };
        }
        pfd.revents = 0;
    }
    Ok(())
}

/// Maps a libblkio error into anyhow with the failing step.
fn blkio_err(what: &'static str) -> impl Fn(blkio::Error) -> anyhow::Error {
    move |e| anyhow::anyhow!("libblkio {what}: {} ({})", e.message(), e.errno())
}
