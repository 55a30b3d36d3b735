//! The metadata worker: one thread per datastore that runs, off the reactors, every disk
//! request the direct path cannot serve — allocating writes (allocation, zeroing, block-map
//! updates, journal), reads of holes and to-be-zeroed blocks, WRITE_ZEROES and FLUSH — and
//! posts their completions back to the reactor that started them
//! ([`dataplane::offload::OffloadSink`]).
//!
//! Why one thread per datastore: every one of these requests takes the datastore's lock (held
//! across its device I/O and journal writes), so more threads per datastore would only queue
//! on it; one thread keeps the thread count independent of disks and queues (like the reactor
//! pool), and its first-in-first-out order is what makes FLUSH correct — a flush runs after
//! every request handed over before it, and the direct path's writes completed before it are
//! covered by its device flush. Reactors never wait for it: they hand over a batch and go on
//! polling.
//!
//! Guest data is copied through the worker's bounce buffer with raw copies (guest memory may
//! change under us at any time, so it is never a Rust slice). The thread runs at a lower
//! priority than the reactors (`WORKER_NICE`) and takes no process signals.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;

use dataplane::engine::Completion;
use dataplane::offload::OffloadSink;
use vmfs::fs::{Datastore, FsError, WriteSeg};

use crate::served::ServedFile;

/// Zero buffer for WRITE_ZEROES, written in pieces of this size (one per worker).
const ZERO_CHUNK_BYTES: usize = 1 << 20;
/// Host buffer (one per worker) through which the datastore's byte-slice API reads and writes
/// guest data. 4 MiB holds a typical batch of allocating writes, so the batch stays one call
/// (larger batches take several, all in the same open journal transaction).
pub(crate) const BOUNCE_BYTES: usize = 4 << 20;
/// Requests one job list holds before it grows: one reactor batch (POP_BATCH_MAX = 64
/// requests per queue) on a few queues of the disk.
pub(crate) const JOB_LIST_CAPACITY: usize = 256;
/// Jobs the queue holds before it grows, and emptied job lists kept for reuse (so handing a
/// batch over allocates nothing in the steady state): a few batches from each of a few
/// reactors. Nothing is refused past it: jobs are bounded anyway, since each holds at least
/// one request and each request holds a reactor's slot until its completion is reaped.
const JOBS_QUEUED_CAPACITY: usize = 64;

/// Nice value of the worker thread. Where it shares a CPU with a polling reactor (which never
/// sleeps while a guest keeps it busy), the scheduler splits that CPU by weight: at the
/// default nice 0 the worker takes half of it in slices of up to milliseconds, which a disk
/// reading written space on that reactor sees as latency; at nice 5 (a third of the weight)
/// the reactor wins the CPU back promptly, and an idle reactor yields it to the worker
/// (dataplane's `OFFLOAD_YIELD_AFTER`). Measured with `strata-bench --scenario isolation` on
/// the 2-core machine (reactor and worker on one core): disk A's read p99 next to an
/// allocating disk B was 12–43x A alone at nice 0 and 0.3–3x at nice 5; the price is B's
/// allocating writes next to A (about 40 k/s instead of about 50 k/s when the reactor did
/// them itself, and A at 35–90x). Where spare CPUs exist, the worker runs there and its nice
/// value matters only against other processes.
const WORKER_NICE: libc::c_int = 5;

/// What an offloaded request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpKind {
    Read,
    Write,
    WriteZeroes,
    Flush,
}

/// A request the worker serves.
#[derive(Debug)]
pub(crate) struct Offloaded {
    pub(crate) kind: OpKind,
    pub(crate) user_data: u64,
    /// File offset and length in bytes (from the header's sector range).
    pub(crate) offset: u64,
    pub(crate) len: u64,
    /// Bytes of guest buffers (what a successful read or write reports).
    pub(crate) data_len: u32,
    pub(crate) iov: *const libc::iovec,
    pub(crate) iov_count: usize,
}

// SAFETY: the iovec pointer refers to the reactor's request slot, and the iovecs to guest
// memory kept mapped by that slot's memory snapshot; the reactor neither reuses the slot nor
// drops the snapshot (nor stops the queue) until this request's completion, which the worker
// posts only after its last use of either, has been reaped.
unsafe impl Send for Offloaded {}

/// Requests of one file from one reactor's batch, and where their completions go.
#[derive(Debug)]
struct Job {
    file: Arc<ServedFile>,
    reqs: Vec<Offloaded>,
    sink: OffloadSink,
}

#[derive(Debug, Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Emptied job lists for reuse.
    spare: Vec<Vec<Offloaded>>,
    stop: bool,
    /// Tests hold the worker still to observe requests in flight.
    paused: bool,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic elsewhere (plain pushes and pops).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A datastore's metadata worker; shared by the backends of its files, stopped (after its
/// queued jobs) when the last one goes.
#[derive(Debug)]
pub struct MetaWorker {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// The live workers, one per datastore (found by the datastore's address while it lives).
static WORKERS: Mutex<Vec<(Weak<Datastore>, Weak<MetaWorker>)>> = Mutex::new(Vec::new());

impl MetaWorker {
    /// The worker of `ds`, started if it has none.
    pub fn for_datastore(ds: &Arc<Datastore>) -> std::io::Result<Arc<MetaWorker>> {
        let mut all = WORKERS.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|(d, w)| d.strong_count() > 0 && w.strong_count() > 0);
        let found = all
            .iter()
            .find(|(d, _)| std::ptr::eq(d.as_ptr(), Arc::as_ptr(ds)))
            .and_then(|(_, w)| w.upgrade());
        if let Some(w) = found {
            return Ok(w);
        }
        let w = Arc::new(Self::spawn()?);
        all.push((Arc::downgrade(ds), Arc::downgrade(&w)));
        Ok(w)
    }

    fn spawn() -> std::io::Result<MetaWorker> {
        let shared = Arc::new(Shared::default());
        {
            let mut st = shared.lock();
            st.jobs.reserve(JOBS_QUEUED_CAPACITY);
            st.spare.reserve(JOBS_QUEUED_CAPACITY);
        }
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("vmfs-meta".into())
            .spawn(move || {
                block_process_signals();
                lower_priority();
                run(&s)
            })?;
        Ok(MetaWorker {
            shared,
            thread: Some(thread),
        })
    }

    /// Hands the requests in `reqs` (left empty, with capacity) to the worker; their
    /// completions go to `sink`. Never waits for the worker.
    pub(crate) fn submit(
        &self,
        file: &Arc<ServedFile>,
        reqs: &mut Vec<Offloaded>,
        sink: &OffloadSink,
    ) {
        let mut st = self.shared.lock();
        let fresh = st
            .spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(JOB_LIST_CAPACITY));
        st.jobs.push_back(Job {
            file: file.clone(),
            reqs: std::mem::replace(reqs, fresh),
            sink: sink.clone(),
        });
        drop(st);
        self.shared.cv.notify_one();
    }

    /// Holds the worker before its next job until the guard is dropped (tests: requests stay
    /// in flight for as long as they need).
    #[cfg(test)]
    pub(crate) fn pause(&self) -> PauseGuard<'_> {
        self.shared.lock().paused = true;
        PauseGuard(self)
    }
}

/// See [`MetaWorker::pause`].
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct PauseGuard<'a>(&'a MetaWorker);

#[cfg(test)]
impl Drop for PauseGuard<'_> {
    fn drop(&mut self) {
        self.0.shared.lock().paused = false;
        self.0.shared.cv.notify_one();
    }
}

impl Drop for MetaWorker {
    fn drop(&mut self) {
        {
            let mut st = self.shared.lock();
            st.stop = true;
            st.paused = false;
        }
        self.shared.cv.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Blocks asynchronous signals in the calling (worker) thread: the worker may start before or
/// after the daemon routes SIGTERM and friends to its own handling (e.g. a signalfd, which
/// needs them blocked in every thread), and a library thread must never be the one that takes
/// such a signal's default action. Synchronous fault signals stay deliverable (SIGBUS is how
/// dataplane's guard recovers from a frontend truncating guest memory the worker copies).
fn block_process_signals() {
    // SAFETY: sigset manipulation on a zeroed local set; pthread_sigmask affects only the
    // calling thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        for sig in [
            libc::SIGBUS,
            libc::SIGSEGV,
            libc::SIGFPE,
            libc::SIGILL,
            libc::SIGTRAP,
            libc::SIGSYS,
        ] {
            libc::sigdelset(&mut set, sig);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            tracing::warn!("cannot block signals in the metadata worker");
        }
    }
}

/// Gives the worker thread the nice value [`WORKER_NICE`]; the default priority stays if that
/// is refused.
fn lower_priority() {
    // SAFETY: gettid has no preconditions; setpriority on our own thread id changes only this
    // thread's nice value (raising it needs no privilege).
    let rc = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, WORKER_NICE)
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        tracing::warn!(%err, "cannot lower the metadata worker's priority");
    }
}

/// The worker thread: serves jobs in order until stopped and drained.
fn run(shared: &Shared) {
    let mut scratch = Scratch {
        bounce: vec![0u8; BOUNCE_BYTES],
        zeroes: vec![0u8; ZERO_CHUNK_BYTES],
        pieces: Vec::with_capacity(JOB_LIST_CAPACITY * 2),
        out: Vec::with_capacity(JOB_LIST_CAPACITY),
    };
    loop {
        let job = {
            let mut st = shared.lock();
            loop {
                if !st.paused {
                    if let Some(j) = st.jobs.pop_front() {
                        break j;
                    }
                    if st.stop {
                        return;
                    }
                }
                st = shared.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        };
        let Job {
            file,
            mut reqs,
            sink,
        } = job;
        serve(&file, &reqs, &mut scratch);
        // The last touch of these requests' iovecs and guest memory was above: from here on
        // the reactor may complete them.
        sink.post(&scratch.out);
        scratch.out.clear();
        reqs.clear();
        drop(file);
        let mut st = shared.lock();
        if st.spare.len() < JOBS_QUEUED_CAPACITY {
            st.spare.push(reqs);
        }
    }
}

/// The worker's buffers, allocated once.
#[derive(Debug)]
struct Scratch {
    bounce: Vec<u8>,
    zeroes: Vec<u8>,
    /// (file offset, bounce offset, length) of each piece in the bounce buffer.
    pieces: Vec<(u64, usize, usize)>,
    /// Completions of the job being served.
    out: Vec<Completion>,
}

/// Serves one job's requests in order (consecutive writes as one batch) into `scratch.out`.
fn serve(file: &ServedFile, reqs: &[Offloaded], scratch: &mut Scratch) {
    let mut i = 0;
    while i < reqs.len() {
        let r = &reqs[i];
        match r.kind {
            OpKind::Write => {
                let n = reqs[i..]
                    .iter()
                    .take_while(|d| d.kind == OpKind::Write)
                    .count();
                let run = &reqs[i..i + n];
                let result = write_run(file, run, &mut scratch.bounce, &mut scratch.pieces);
                for d in run {
                    let res = match result {
                        Ok(()) => {
                            file.learn(d.offset, d.len);
                            i32::try_from(d.data_len).unwrap_or(i32::MAX)
                        }
                        Err(errno) => errno,
                    };
                    scratch.out.push(Completion {
                        user_data: d.user_data,
                        result: res,
                    });
                }
                i += n;
                continue;
            }
            OpKind::Read => {
                let res = read(file, r, &mut scratch.bounce);
                if res >= 0 {
                    file.learn(r.offset, r.len);
                }
                scratch.out.push(Completion {
                    user_data: r.user_data,
                    result: res,
                });
            }
            OpKind::WriteZeroes => {
                let res = write_zeroes(file, r, &scratch.zeroes);
                scratch.out.push(Completion {
                    user_data: r.user_data,
                    result: res,
                });
            }
            OpKind::Flush => {
                // Journal commit, then device flush: durable are every write this worker
                // completed before (all handed over earlier) and every direct-path write the
                // guest saw complete before it sent the flush.
                let res = match file.ds.sync() {
                    Ok(()) => 0,
                    Err(e) => {
                        tracing::warn!(file = %file.name, err = %e, "flush failed");
                        ServedFile::errno(&e)
                    }
                };
                scratch.out.push(Completion {
                    user_data: r.user_data,
                    result: res,
                });
            }
        }
        i += 1;
    }
}

/// Writes segments through the datastore: small files one segment at a time through the
/// general path; file-block files through the batched path, either committed now or, when
/// `deferred`, left in the open transaction (committed at FLUSH or after the interval).
fn write_segs(file: &ServedFile, segs: &[WriteSeg<'_>], deferred: bool) -> Result<(), FsError> {
    if file.small {
        segs.iter()
            .try_for_each(|s| file.ds.write(s.ino, s.offset, s.data))
    } else if deferred {
        // Commits by itself once the open transaction is older than the datastore's
        // CommitPolicy allows.
        file.ds.write_batch_deferred(segs)
    } else {
        file.ds.write_batch(segs)
    }
}

/// Copies the writes' guest data into `bounce` and writes it through the batched path, one
/// call per bounce-buffer fill; Err(-errno) if any part failed.
fn write_run(
    file: &ServedFile,
    run: &[Offloaded],
    bounce: &mut [u8],
    pieces: &mut Vec<(u64, usize, usize)>,
) -> Result<(), i32> {
    pieces.clear();
    let mut used = 0usize;
    let flush = |pieces: &mut Vec<(u64, usize, usize)>, bounce: &[u8]| {
        let segs: Vec<WriteSeg<'_>> = pieces
            .drain(..)
            .map(|(offset, at, len)| WriteSeg {
                ino: file.ino,
                offset,
                data: &bounce[at..at + len],
            })
            .collect();
        write_segs(file, &segs, true).map_err(|e| {
            let requests = run.len();
            tracing::warn!(file = %file.name, err = %e, requests, "batched write failed");
            ServedFile::errno(&e)
        })
    };
    for d in run {
        let mut off = d.offset;
        for k in 0..d.iov_count {
            // SAFETY: see `Offloaded`: the slot's iovec array stays valid until this
            // request's completion is reaped; the iovec is copied out (host memory).
            let iov = unsafe { d.iov.add(k).read() };
            let mut done = 0;
            while done < iov.iov_len {
                if used == bounce.len() {
                    flush(pieces, bounce)?;
                    used = 0;
                }
                let n = (iov.iov_len - done).min(bounce.len() - used);
                // SAFETY: the parser checked that the iovec lies in one guest memory region,
                // kept mapped until the request completes; done + n <= iov_len and used + n
                // <= bounce.len(); guest and host buffers are disjoint. A raw copy: no
                // reference to guest memory is formed.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        iov.iov_base.cast::<u8>().add(done).cast_const(),
                        bounce.as_mut_ptr().add(used),
                        n,
                    )
                };
                pieces.push((off, used, n));
                used += n;
                done += n;
                off += n as u64;
            }
        }
    }
    if pieces.is_empty() {
        return Ok(());
    }
    flush(pieces, bounce)
}

/// Reads through the datastore (holes and to-be-zeroed blocks read as zeroes) into the bounce
/// buffer, then copies into guest memory; bytes or -errno.
fn read(file: &ServedFile, r: &Offloaded, bounce: &mut [u8]) -> i32 {
    let mut offset = r.offset;
    for k in 0..r.iov_count {
        // SAFETY: as in `write_run`.
        let iov = unsafe { r.iov.add(k).read() };
        let mut done = 0;
        while done < iov.iov_len {
            let n = (iov.iov_len - done).min(bounce.len());
            let got = match file.ds.read(file.ino, offset, &mut bounce[..n]) {
                Ok(got) => got.min(n),
                Err(e) => {
                    tracing::warn!(file = %file.name, err = %e, "read failed");
                    return ServedFile::errno(&e);
                }
            };
            // Past the file's end: zeroes, never an earlier request's bytes.
            bounce[got..n].fill(0);
            // SAFETY: the parser checked that the iovec lies in one guest memory region, kept
            // mapped until the request completes; done + n <= iov_len; the bounce buffer is
            // host memory, so the ranges are disjoint. A raw copy: no reference to guest
            // memory is formed.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    bounce.as_ptr(),
                    iov.iov_base.cast::<u8>().add(done),
                    n,
                )
            };
            done += n;
            offset += n as u64;
        }
    }
    i32::try_from(r.data_len).unwrap_or(i32::MAX)
}

/// WRITE_ZEROES: zeroes written through the batched path and committed at once.
fn write_zeroes(file: &ServedFile, r: &Offloaded, zeroes: &[u8]) -> i32 {
    let mut segs = Vec::new();
    let mut off = r.offset;
    let end = off + r.len;
    while off < end {
        let n = (end - off).min(zeroes.len() as u64) as usize;
        segs.push(WriteSeg {
            ino: file.ino,
            offset: off,
            data: &zeroes[..n],
        });
        off += n as u64;
    }
    match write_segs(file, &segs, false) {
        Ok(()) => 0,
        Err(e) => ServedFile::errno(&e),
    }
}
