//! DPDK 22.11 as a [`PacketIo`] backend (cargo feature `dpdk`, off by default).
//!
//! Bindings are generated at build time by bindgen against Debian's `libdpdk` (see
//! `net/build.rs`); DPDK's inline fast-path functions (`rte_eth_rx_burst`,
//! `rte_pktmbuf_alloc`, ...) are called through the C wrappers bindgen emits, once per burst
//! where DPDK allows (`rte_pktmbuf_free_bulk`). The EAL is initialised once per process
//! ([`init_eal`]): DPDK cannot re-initialise it, so the first caller's arguments hold for the
//! process. Devices are either named in those arguments (`--vdev=net_ring0`) and opened with
//! [`DpdkPort::open`], or hot-plugged later with [`DpdkPort::attach`] (e.g.
//! `net_af_xdp0,iface=eth0,xdp_prog=steer.bpf.o`), which is how stratad adds one per `--port`.
//! A port has one or more queue pairs, one [`DpdkPort`] handle each, with a mbuf pool per queue.
//!
//! Queues are poll-only: [`PacketIo::wake_fd`] is -1, so a reactor serving one never sleeps.
//!
//! DPDK's control path (configure, start, hot-plug, close, mempool create/free) is not
//! thread-safe: every such call here runs under one process-wide lock ([`control`]), whichever
//! thread (a reactor dropping a queue, the main thread starting ports) makes it. A port is
//! claimed by one [`DpdkPort::open_queues`] / [`DpdkPort::attach`] at a time; opening a port
//! already claimed in this process fails with [`DpdkError::PortInUse`].
//!
//! A thread that drives a queue registers itself with DPDK (`rte_thread_register`) on its first
//! burst, so it gets an lcore id and with it the mempools' per-lcore mbuf caches; it is
//! unregistered when it exits.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use crate::{Backend, PacketIo, RX_BURST_MAX};

#[allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    dead_code,
    missing_debug_implementations,
    unsafe_op_in_unsafe_fn,
    clippy::all,
    clippy::undocumented_unsafe_blocks
)]
mod sys {
    include!(concat!(env!("OUT_DIR"), "/dpdk_bindings.rs"));
}

/// Mbufs per queue's pool: RX descriptors + TX descriptors + bursts in hand, rounded to 2^n-1
/// (DPDK's recommendation for ring-backed pools).
pub const POOL_MBUFS: u32 = 8191;
/// Per-lcore mbuf cache.
pub const POOL_CACHE: u32 = 256;
/// Bytes of frame an mbuf of the pools holds (`RTE_MBUF_DEFAULT_DATAROOM`: the pools' buffers
/// are `RTE_MBUF_DEFAULT_BUF_SIZE`, data room plus headroom); longer frames are refused.
pub const MBUF_DATA_ROOM: usize = sys::RTE_MBUF_DEFAULT_DATAROOM as usize;
/// RX and TX descriptors per queue.
pub const RING_DESCS: u16 = 1024;
/// Longest EAL argument list accepted.
pub const MAX_EAL_ARGS: usize = 32;

/// Errors of the DPDK backend.
#[derive(Debug, thiserror::Error)]
pub enum DpdkError {
    #[error("rte_eal_init failed: {0}")]
    Eal(String),
    #[error("the EAL was already initialised with other arguments ({0:?})")]
    EalArgs(Vec<String>),
    #[error("invalid EAL argument (NUL byte or more than {MAX_EAL_ARGS})")]
    BadArg,
    #[error("no DPDK port named {0:?}")]
    NoPort(String),
    #[error("invalid device arguments {0:?} (NUL byte)")]
    BadDevargs(String),
    #[error("a port needs at least one queue")]
    NoQueues,
    #[error("DPDK port {0:?} is already in use in this process")]
    PortInUse(String),
    #[error("{call} failed: {msg}")]
    Call { call: &'static str, msg: String },
    #[error("DPDK control call made while this thread holds the control lock")]
    Reentrant,
    #[error("frame of {len} bytes does not fit an mbuf")]
    FrameTooLarge { len: usize },
}

fn rte_err(code: i32) -> String {
    // SAFETY: rte_strerror returns a pointer to a static or thread-local NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(sys::rte_strerror(code.abs())) }
        .to_string_lossy()
        .into_owned()
}

static EAL: OnceLock<Result<Vec<String>, String>> = OnceLock::new();

/// Ports claimed by a live [`Device`], under the control-path lock.
static CONTROL: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

thread_local! {
    /// Whether this thread holds [`CONTROL`] (so that a Device dropped on a failure path of
    /// `start`, which holds it, does not lock it again).
    static CONTROL_HELD: Cell<bool> = const { Cell::new(false) };
}

/// The process-wide DPDK control-path lock, with the set of claimed ports. Reentrant per
/// thread: None when this thread already holds it (its outer holder has the set).
struct Control(MutexGuard<'static, BTreeSet<u16>>);

impl Drop for Control {
    fn drop(&mut self) {
        CONTROL_HELD.with(|h| h.set(false));
    }
}

fn control() -> Option<Control> {
    if CONTROL_HELD.with(Cell::get) {
        return None;
    }
    let g = CONTROL.lock().unwrap_or_else(PoisonError::into_inner);
    CONTROL_HELD.with(|h| h.set(true));
    Some(Control(g))
}

/// The first CPU of the calling thread's affinity (0 if it cannot be read): an lcore for
/// `-l` that the EAL can pin its main thread to.
pub fn first_allowed_cpu() -> usize {
    affinity()
        .and_then(|set| {
            // SAFETY: CPU_ISSET reads the bit of a valid cpu_set_t for an index below
            // CPU_SETSIZE.
            (0..libc::CPU_SETSIZE as usize).find(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        })
        .unwrap_or(0)
}

/// DPDK's runtime directory for `--file-prefix=PREFIX`: /var/run/dpdk/PREFIX when the real
/// uid is 0, else $XDG_RUNTIME_DIR/dpdk/PREFIX or /tmp/dpdk/PREFIX (EAL's
/// `eal_create_runtime_dir`, which checks `getuid()`).
pub fn runtime_dir(prefix: &str) -> PathBuf {
    // SAFETY: getuid has no preconditions.
    let base = if unsafe { libc::getuid() } == 0 {
        PathBuf::from("/var/run")
    } else {
        std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp"))
    };
    base.join("dpdk").join(prefix)
}

/// Removes DPDK's runtime directory of a `--file-prefix` on drop (DPDK leaves it behind). Hold
/// it for as long as the EAL may be used: in practice until the process ends.
#[derive(Debug)]
pub struct RuntimeDirGuard(PathBuf);

impl RuntimeDirGuard {
    /// A guard on the runtime directory of `prefix` (see [`runtime_dir`]).
    pub fn new(prefix: &str) -> Self {
        Self(runtime_dir(prefix))
    }
}

impl Drop for RuntimeDirGuard {
    fn drop(&mut self) {
        if self.0.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.0) {
                tracing::debug!(dir = %self.0.display(), %e, "removing DPDK's runtime directory");
            }
        }
    }
}

static AT_EXIT_DIR: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn remove_at_exit_dir() {
    if let Some(d) = AT_EXIT_DIR.get() {
        drop(RuntimeDirGuard(d.clone()));
    }
}

/// Removes DPDK's runtime directory of `prefix` when the process exits normally (`atexit`):
/// for test binaries, whose tests share one EAL and have no scope that outlives them all. Only
/// the first call's prefix is kept.
pub fn remove_runtime_dir_at_exit(prefix: &str) {
    if AT_EXIT_DIR.set(runtime_dir(prefix)).is_ok() {
        // SAFETY: registers a function without arguments that only reads a static set above.
        unsafe { libc::atexit(remove_at_exit_dir) };
    }
}

/// This thread's registration with DPDK; unregistered when the thread exits.
struct Registration(Cell<Option<bool>>);

impl Drop for Registration {
    fn drop(&mut self) {
        if self.0.get() == Some(true) {
            // SAFETY: this thread registered itself and makes no further DPDK call.
            unsafe { sys::rte_thread_unregister() };
        }
    }
}

thread_local! {
    /// None: not tried yet; Some(registered).
    static REGISTERED: Registration = const { Registration(Cell::new(None)) };
}

/// Registers the calling thread with DPDK once (an lcore id, hence per-lcore mempool caches).
/// EAL lcores already have an id; a failure (no lcore id left) is logged once and the thread
/// goes on unregistered, without caches.
fn register_thread() {
    REGISTERED.with(|r| {
        if r.0.get().is_some() {
            return;
        }
        // SAFETY: plain call; LCORE_ID_ANY (u32::MAX) means an unregistered thread.
        if unsafe { sys::rte_lcore_id() } != u32::MAX {
            r.0.set(Some(false)); // an EAL lcore: nothing to undo at exit
            return;
        }
        // SAFETY: plain call; the EAL is up (a queue exists).
        let ok = unsafe { sys::rte_thread_register() } == 0;
        if !ok {
            tracing::warn!(
                "rte_thread_register failed: DPDK queues on this thread run without mbuf caches"
            );
        }
        r.0.set(Some(ok));
    });
}

/// The calling thread's CPU affinity, to restore after `rte_eal_init` (which pins it).
fn affinity() -> Option<libc::cpu_set_t> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set; sched_getaffinity writes at most its
    // size into it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        (libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0)
            .then_some(set)
    }
}

/// EAL arguments for DPDK without hugepages or PCI devices (what every user of this module on
/// this kind of machine runs: tests, benchmarks, stratad's default): `-m 256` MiB of ordinary
/// memory, one lcore `lcore`, runtime files under `file_prefix`, quiet logs, then `extra`
/// (`--vdev=...`).
pub fn no_huge_eal_args(file_prefix: &str, lcore: usize, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["--no-huge", "-m", "256", "--no-pci", "--log-level=error"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    args.push(format!("--file-prefix={file_prefix}"));
    args.push("-l".to_owned());
    args.push(lcore.to_string());
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

/// Initialises the EAL with `args` (program name first is added) once per process; later calls
/// succeed only with the same arguments.
///
/// `rte_eal_init` pins the calling thread to the main lcore's CPU; the caller is not a DPDK
/// worker (stratad's main thread, a test thread) and threads it spawns later would inherit the
/// pin, so its previous affinity is restored. Callers that want a pinned polling thread pin it
/// themselves.
pub fn init_eal(args: &[&str]) -> Result<(), DpdkError> {
    if args.len() >= MAX_EAL_ARGS {
        return Err(DpdkError::BadArg);
    }
    let wanted: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let r = EAL.get_or_init(|| {
        let mut owned: Vec<CString> = Vec::with_capacity(args.len() + 1);
        for a in std::iter::once("strata").chain(args.iter().copied()) {
            owned.push(CString::new(a).map_err(|_| "NUL in an EAL argument".to_owned())?);
        }
        let mut argv: Vec<*mut libc::c_char> =
            owned.iter().map(|c| c.as_ptr().cast_mut()).collect();
        let saved = affinity();
        // SAFETY: argv holds argc valid NUL-terminated strings that outlive the call (the
        // EAL may permute the pointer array, which we own, but does not write the strings).
        let n = unsafe { sys::rte_eal_init(argv.len() as i32, argv.as_mut_ptr()) };
        if let Some(set) = saved {
            // SAFETY: `set` is a valid cpu_set_t read by the kernel for exactly its size.
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
        }
        if n < 0 {
            // rte_errno is a C thread-local, which bindings cannot read; DPDK logs the reason.
            Err(format!("returned {n} (the DPDK log above says why)"))
        } else {
            Ok(wanted.clone())
        }
    });
    match r {
        Ok(a) if *a == wanted => Ok(()),
        Ok(a) => Err(DpdkError::EalArgs(a.clone())),
        Err(e) => Err(DpdkError::Eal(e.clone())),
    }
}

/// Bus of the virtual devices (`net_ring`, `net_null`, `net_af_xdp`, ...).
const VDEV_BUS: &str = "vdev";

/// Maps a negative DPDK return value to [`DpdkError::Call`].
fn check(call: &'static str, r: i32) -> Result<(), DpdkError> {
    if r < 0 {
        Err(DpdkError::Call {
            call,
            msg: rte_err(r),
        })
    } else {
        Ok(())
    }
}

/// Removes the hot-plugged virtual device `name` (logged, not returned: called on drop paths).
fn unplug(name: &str) {
    if let (Ok(bus), Ok(cname)) = (CString::new(VDEV_BUS), CString::new(name)) {
        // SAFETY: both strings are NUL-terminated and outlive the call.
        let r = unsafe { sys::rte_eal_hotplug_remove(bus.as_ptr(), cname.as_ptr()) };
        if r < 0 {
            tracing::warn!(device = %name, err = %rte_err(r), "DPDK hot-unplug");
        }
    }
}

/// A configured DPDK port and the mbuf pools of its receive queues. Shared by the port's
/// [`DpdkPort`] queues; the last one dropped stops and closes the port, removes it if it was
/// hot-plugged, and only then frees the pools (a started port's rings hold mbufs of them).
#[derive(Debug)]
struct Device {
    port: u16,
    name: String,
    hotplugged: bool,
    started: bool,
    pools: Vec<*mut sys::rte_mempool>,
}

// SAFETY: after construction a Device is only read (port id, pool pointers) and finally
// dropped by one thread; DPDK's control calls in Drop may run on any thread, and run under the
// process-wide control lock.
unsafe impl Send for Device {}
// SAFETY: as above: no method mutates through `&Device`.
unsafe impl Sync for Device {}

impl Drop for Device {
    fn drop(&mut self) {
        // Under the control lock (None: the failing `start` that builds this Device holds it).
        let mut guard = control();
        // SAFETY: `port` is a valid port id of ours; stopping a started port and closing a
        // configured one are allowed.
        let (stop, close) = unsafe {
            let stop = if self.started {
                sys::rte_eth_dev_stop(self.port)
            } else {
                0
            };
            (stop, sys::rte_eth_dev_close(self.port))
        };
        if stop < 0 {
            tracing::warn!(device = %self.name, err = %rte_err(stop), "rte_eth_dev_stop");
        }
        if close < 0 {
            // The port's queues may still reference the pools: leak them (and keep the port
            // claimed) rather than free memory the driver could still touch.
            tracing::error!(device = %self.name, err = %rte_err(close),
                pools = self.pools.len(), "rte_eth_dev_close failed: leaking the port's mbuf pools");
            return;
        }
        if self.hotplugged {
            unplug(&self.name);
        }
        for &p in &self.pools {
            // SAFETY: each pool was created by `start` for this port, which is closed (so no
            // queue references it), and no mbuf of it is in use: bursts free their mbufs
            // before returning.
            unsafe { sys::rte_mempool_free(p) };
        }
        if let Some(g) = guard.as_mut() {
            g.0.remove(&self.port);
        }
        // Without the guard, the holder (`start`) never inserted the port.
    }
}

/// One queue (receive and transmit queue `queue`) of a started DPDK port, with its own mbuf
/// pool. Queues of one port may be driven by different threads.
#[derive(Debug)]
pub struct DpdkPort {
    dev: Arc<Device>,
    queue: u16,
    pool: *mut sys::rte_mempool,
    mbufs: [*mut sys::rte_mbuf; RX_BURST_MAX],
}

// SAFETY: the queue and its pool are used only through `&mut self`, by one thread at a time;
// DPDK queues may move between threads as long as they are not used concurrently, and the
// shared Device is Sync.
unsafe impl Send for DpdkPort {}

impl DpdkPort {
    /// Configures and starts the port named `name` (e.g. "net_ring0") with one queue; the EAL
    /// must be up.
    pub fn open(name: &str) -> Result<Self, DpdkError> {
        Self::open_queues(name, 1)?
            .pop()
            .ok_or_else(|| DpdkError::NoPort(name.into()))
    }

    /// Configures and starts the port named `name` with `queues` receive and transmit queue
    /// pairs, one [`DpdkPort`] each (in queue order).
    pub fn open_queues(name: &str, queues: u16) -> Result<Vec<Self>, DpdkError> {
        let mut control = control().ok_or(DpdkError::Reentrant)?;
        Self::start(&mut control.0, name, queues, false)
    }

    /// Hot-plugs the virtual device `devargs` (`NAME[,KEY=VALUE...]`, as for `--vdev`, e.g.
    /// `net_af_xdp0,iface=eth0,queue_count=2`), then configures and starts it with `queues`
    /// queue pairs. The device is removed again when its last queue is dropped, so the same
    /// name can be plugged anew.
    pub fn attach(devargs: &str, queues: u16) -> Result<Vec<Self>, DpdkError> {
        if queues == 0 {
            return Err(DpdkError::NoQueues);
        }
        let (name, args) = devargs.split_once(',').unwrap_or((devargs, ""));
        let bad = |_| DpdkError::BadDevargs(devargs.to_owned());
        let bus = CString::new(VDEV_BUS).map_err(bad)?;
        let cname = CString::new(name).map_err(bad)?;
        let cargs = CString::new(args).map_err(bad)?;
        let mut control = control().ok_or(DpdkError::Reentrant)?;
        // SAFETY: three NUL-terminated strings that outlive the call; the EAL is up (callers
        // hold that invariant, as for every DPDK call here).
        check("rte_eal_hotplug_add", unsafe {
            sys::rte_eal_hotplug_add(bus.as_ptr(), cname.as_ptr(), cargs.as_ptr())
        })?;
        let r = Self::start(&mut control.0, name, queues, true);
        if let Err(DpdkError::NoPort(_)) = &r {
            // Plugged but not an ethdev (no Device owns it yet): unplug it here.
            unplug(name);
        }
        r
    }

    /// Configures and starts port `name`; the caller holds the control lock, whose set of
    /// claimed ports is `claimed`.
    fn start(
        claimed: &mut BTreeSet<u16>,
        name: &str,
        queues: u16,
        hotplugged: bool,
    ) -> Result<Vec<Self>, DpdkError> {
        if queues == 0 {
            return Err(DpdkError::NoQueues);
        }
        let cname = CString::new(name).map_err(|_| DpdkError::NoPort(name.into()))?;
        let mut port = 0u16;
        // SAFETY: `cname` is NUL-terminated and `port` is a live u16 to write.
        if unsafe { sys::rte_eth_dev_get_port_by_name(cname.as_ptr(), &mut port) } != 0 {
            return Err(DpdkError::NoPort(name.into()));
        }
        if claimed.contains(&port) {
            return Err(DpdkError::PortInUse(name.into()));
        }
        // From here on, dropping `dev` undoes whatever was done (close, unplug, free pools).
        let mut dev = Device {
            port,
            name: name.to_owned(),
            hotplugged,
            started: false,
            pools: Vec::with_capacity(usize::from(queues)),
        };
        // SAFETY: plain call without arguments.
        let socket = unsafe { sys::rte_socket_id() } as i32;
        let conf = sys::rte_eth_conf::default();
        // SAFETY: `conf` is a valid all-default configuration that outlives the call.
        check("rte_eth_dev_configure", unsafe {
            sys::rte_eth_dev_configure(port, queues, queues, &conf)
        })?;
        for q in 0..queues {
            let pool_name = CString::new(format!("strata_{port}_{q}"))
                .map_err(|_| DpdkError::NoPort(name.into()))?;
            // SAFETY: plain call with a NUL-terminated name; the result is checked for NULL.
            let pool = unsafe {
                sys::rte_pktmbuf_pool_create(
                    pool_name.as_ptr(),
                    POOL_MBUFS,
                    POOL_CACHE,
                    0,
                    sys::RTE_MBUF_DEFAULT_BUF_SIZE as u16,
                    socket,
                )
            };
            if pool.is_null() {
                return Err(DpdkError::Call {
                    call: "rte_pktmbuf_pool_create",
                    msg: "no pool (out of memory? -m too small?)".into(),
                });
            }
            dev.pools.push(pool);
            // SAFETY: queue q < queues of a configured port; NULL conf means driver defaults;
            // `pool` is live until the Device is dropped, after the port is closed.
            check("rte_eth_rx_queue_setup", unsafe {
                sys::rte_eth_rx_queue_setup(
                    port,
                    q,
                    RING_DESCS,
                    socket as u32,
                    std::ptr::null(),
                    pool,
                )
            })?;
            // SAFETY: as above for TX.
            check("rte_eth_tx_queue_setup", unsafe {
                sys::rte_eth_tx_queue_setup(port, q, RING_DESCS, socket as u32, std::ptr::null())
            })?;
        }
        // SAFETY: the port is configured with all its queues set up.
        check("rte_eth_dev_start", unsafe { sys::rte_eth_dev_start(port) })?;
        dev.started = true;
        claimed.insert(port);
        let pools = dev.pools.clone();
        let dev = Arc::new(dev);
        Ok(pools
            .into_iter()
            .zip(0u16..)
            .map(|(pool, queue)| Self {
                dev: Arc::clone(&dev),
                queue,
                pool,
                mbufs: [std::ptr::null_mut(); RX_BURST_MAX],
            })
            .collect())
    }

    /// DPDK's id of the port.
    pub fn port_id(&self) -> u16 {
        self.dev.port
    }

    /// The queue pair this handle drives.
    pub fn queue(&self) -> u16 {
        self.queue
    }
}

impl PacketIo for DpdkPort {
    fn rx_burst(&mut self, max: usize, f: &mut dyn FnMut(&[u8])) -> Result<usize, crate::NetError> {
        register_thread();
        let max = max.min(RX_BURST_MAX) as u16;
        // SAFETY: `mbufs` has room for RX_BURST_MAX >= max pointers; the queue is set up and
        // used only by this thread (&mut self).
        let n = unsafe {
            sys::rte_eth_rx_burst(self.dev.port, self.queue, self.mbufs.as_mut_ptr(), max)
        };
        for &m in &self.mbufs[..usize::from(n)] {
            // SAFETY: `m` is a valid mbuf just received; its first segment holds data_len bytes
            // at buf_addr + data_off (rte_pktmbuf_mtod). Multi-segment frames are handed over
            // as their first segment only (jumbo frames are not configured).
            let frame = unsafe {
                let m = &*m;
                std::slice::from_raw_parts(
                    m.buf_addr.cast::<u8>().add(usize::from(m.data_off)),
                    usize::from(m.data_len),
                )
            };
            f(frame);
        }
        if n > 0 {
            // SAFETY: the first n pointers are mbufs we own and no longer reference.
            unsafe { sys::rte_pktmbuf_free_bulk(self.mbufs.as_mut_ptr(), u32::from(n)) };
        }
        Ok(usize::from(n))
    }

    fn tx_burst(&mut self, frames: &[&[u8]]) -> Result<usize, crate::NetError> {
        register_thread();
        let n = frames.len().min(RX_BURST_MAX);
        // Checked before any mbuf is allocated, so that no error path holds mbufs.
        if let Some(fr) = frames[..n].iter().find(|f| f.len() > MBUF_DATA_ROOM) {
            return Err(DpdkError::FrameTooLarge { len: fr.len() }.into());
        }
        let mut built = 0usize;
        for fr in &frames[..n] {
            // Cannot fail: fr.len() <= MBUF_DATA_ROOM < 2^16.
            let len = u16::try_from(fr.len()).unwrap_or(u16::MAX);
            // SAFETY: `pool` is a live pool of this queue's device.
            let m = unsafe { sys::rte_pktmbuf_alloc(self.pool) };
            if m.is_null() {
                break; // pool exhausted: the caller retries later
            }
            // SAFETY: `m` is a fresh mbuf; append returns NULL or `len` writable bytes in it.
            let dst = unsafe { sys::rte_pktmbuf_append(m, len) };
            if dst.is_null() {
                // SAFETY: `m` and the `built` mbufs before it are ours and unused.
                unsafe {
                    sys::rte_pktmbuf_free(m);
                    if built > 0 {
                        sys::rte_pktmbuf_free_bulk(self.mbufs.as_mut_ptr(), built as u32);
                    }
                }
                return Err(DpdkError::FrameTooLarge { len: fr.len() }.into());
            }
            // SAFETY: `dst` has `len` writable bytes; `fr` has `len` readable ones.
            unsafe { std::ptr::copy_nonoverlapping(fr.as_ptr(), dst.cast::<u8>(), fr.len()) };
            self.mbufs[built] = m;
            built += 1;
        }
        // SAFETY: the first `built` pointers are filled mbufs; the driver takes the ones it sends.
        let sent = unsafe {
            sys::rte_eth_tx_burst(
                self.dev.port,
                self.queue,
                self.mbufs.as_mut_ptr(),
                built as u16,
            )
        };
        let sent = usize::from(sent);
        if sent < built {
            // SAFETY: mbufs the driver did not take are still ours.
            unsafe {
                sys::rte_pktmbuf_free_bulk(self.mbufs[sent..].as_mut_ptr(), (built - sent) as u32)
            };
        }
        Ok(sent)
    }

    /// DPDK queues are polled: there is no descriptor to sleep on (-1). A reactor serving one
    /// keeps spinning, or sleeps on a timer.
    fn wake_fd(&self) -> RawFd {
        -1
    }

    fn backend(&self) -> Backend {
        Backend::Dpdk
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{build_udp, udp_payload, FrameSpec, IpVersion, FRAME_MAX};

    /// The tests share the process's one EAL and run one at a time (DPDK's control path is
    /// not meant for concurrent configuration from several threads).
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn eal() -> std::sync::MutexGuard<'static, ()> {
        let guard = SERIAL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let prefix = format!("strata-test-{}", std::process::id());
        remove_runtime_dir_at_exit(&prefix);
        let args = no_huge_eal_args(
            &prefix,
            first_allowed_cpu(),
            &["--vdev=net_ring0", "--vdev=net_null0,size=64,copy=0"],
        );
        init_eal(&args.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
        guard
    }

    #[test]
    fn net_ring_loops_frames_back() {
        let _serial = eal();
        let mut port = DpdkPort::open("net_ring0").unwrap();
        let frames: Vec<Vec<u8>> = (0..100u32)
            .map(|i| {
                let mut b = [0u8; FRAME_MAX];
                let n = build_udp(
                    &FrameSpec::test(IpVersion::V4, 4420),
                    &i.to_be_bytes(),
                    &mut b,
                )
                .unwrap();
                b[..n].to_vec()
            })
            .collect();
        let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        let mut sent = 0;
        while sent < refs.len() {
            sent += port.tx_burst(&refs[sent..]).unwrap();
        }
        let mut got = Vec::new();
        while got.len() < 100 {
            let n = port
                .rx_burst(RX_BURST_MAX, &mut |f| {
                    got.push(u32::from_be_bytes(
                        udp_payload(f).unwrap().try_into().unwrap(),
                    ))
                })
                .unwrap();
            assert!(
                n > 0 || got.len() == 100,
                "net_ring lost frames: {}",
                got.len()
            );
        }
        assert_eq!(got, (0..100).collect::<Vec<_>>());
        assert_eq!(port.rx_burst(RX_BURST_MAX, &mut |_| {}).unwrap(), 0);
        assert_eq!(port.wake_fd(), -1);
    }

    #[test]
    fn net_null_receives_and_frees_without_leaking() {
        let _serial = eal();
        let mut port = DpdkPort::open("net_null0").unwrap();
        let mut frames = 0usize;
        let mut bytes = 0usize;
        // Many times the pool size: a leaked mbuf per burst would exhaust it.
        for _ in 0..(4 * POOL_MBUFS as usize / RX_BURST_MAX + 1) {
            frames += port
                .rx_burst(RX_BURST_MAX, &mut |f| bytes += f.len())
                .unwrap();
        }
        assert!(frames > 4 * POOL_MBUFS as usize, "{frames} frames");
        assert_eq!(bytes, frames * 64);
    }

    #[test]
    fn hotplugged_device_serves_each_queue_and_unplugs() {
        let _serial = eal();
        for round in 0..2 {
            // The same name twice: dropping the queues must have removed the device.
            let mut queues = DpdkPort::attach("net_null_hp0,size=64,copy=0", 2)
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(queues.len(), 2);
            let port = queues[0].port_id();
            for (i, q) in queues.iter_mut().enumerate() {
                assert_eq!(usize::from(q.queue()), i);
                assert_eq!(q.port_id(), port);
                let mut frames = 0;
                for _ in 0..4 {
                    frames += q
                        .rx_burst(RX_BURST_MAX, &mut |f| assert_eq!(f.len(), 64))
                        .unwrap();
                }
                assert!(frames > 0, "queue {i} received nothing");
            }
            // Queues may be dropped in any order and on any thread.
            let last = queues.pop().unwrap();
            std::thread::spawn(move || drop(last)).join().unwrap();
            drop(queues);
        }
        assert!(matches!(
            DpdkPort::attach("net_null_hp1", 0),
            Err(DpdkError::NoQueues)
        ));
        assert!(matches!(
            DpdkPort::attach("net_nonexistent_driver0", 1),
            Err(DpdkError::Call { .. })
        ));
    }

    #[test]
    fn a_claimed_port_is_refused_and_left_running() {
        let _serial = eal();
        // (A closed port is released by DPDK: hot-plugged devices, so the name can be reused.)
        let mut port = DpdkPort::attach("net_null_cl0,size=64,copy=0", 1)
            .unwrap()
            .remove(0);
        // The same device again (a second --port on it) must not reconfigure or close it.
        assert!(matches!(
            DpdkPort::open("net_null_cl0"),
            Err(DpdkError::PortInUse(_))
        ));
        assert!(DpdkPort::attach("net_null_cl0", 1).is_err());
        assert!(port.rx_burst(RX_BURST_MAX, &mut |_| {}).unwrap() > 0);
        drop(port);
        // Released when the last queue is dropped.
        drop(DpdkPort::attach("net_null_cl0", 1).unwrap());
    }

    #[test]
    fn oversized_frame_is_refused_without_leaking_mbufs() {
        let _serial = eal();
        let mut port = DpdkPort::attach("net_ring_big0", 1).unwrap().remove(0);
        let small = [0u8; 64];
        let big = vec![0u8; MBUF_DATA_ROOM + 1];
        // More bursts than the pool has mbufs: a leak of the small frames' mbufs per refused
        // burst would exhaust it.
        for _ in 0..(POOL_MBUFS as usize / 8 + 1) {
            let frames: [&[u8]; 9] = [
                &small, &small, &small, &small, &small, &small, &small, &small, &big,
            ];
            assert!(matches!(
                port.tx_burst(&frames),
                Err(crate::NetError::Dpdk(DpdkError::FrameTooLarge { .. }))
            ));
        }
        assert_eq!(port.tx_burst(&[&small]).unwrap(), 1);
        assert_eq!(port.rx_burst(RX_BURST_MAX, &mut |_| {}).unwrap(), 1);
    }

    #[test]
    fn queue_threads_register_with_dpdk() {
        let _serial = eal();
        let mut port = DpdkPort::attach("net_null_reg0", 1).unwrap().remove(0);
        let port = std::thread::spawn(move || {
            // SAFETY: plain call.
            let lcore = || unsafe { sys::rte_lcore_id() };
            assert_eq!(lcore(), u32::MAX, "unregistered at first");
            port.rx_burst(RX_BURST_MAX, &mut |_| {}).unwrap();
            assert_ne!(lcore(), u32::MAX, "registered by the burst");
            port
        })
        .join()
        .unwrap();
        drop(port);
    }
}
