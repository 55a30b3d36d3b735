//! DPDK 22.11 as a [`PacketIo`] backend (cargo feature `dpdk`, off by default).
//!
//! Bindings are generated at build time by bindgen against Debian's `libdpdk` (see
//! `dataplane/build.rs`); DPDK's inline fast-path functions (`rte_eth_rx_burst`,
//! `rte_pktmbuf_alloc`, ...) are called through the C wrappers bindgen emits, once per burst
//! where DPDK allows (`rte_pktmbuf_free_bulk`). The EAL is initialised once per process
//! ([`init_eal`]): DPDK cannot re-initialise it, so the first caller's arguments (virtual
//! devices included) hold for the process.

use std::ffi::CString;
use std::os::fd::RawFd;
use std::sync::OnceLock;

use super::{Backend, PacketIo, RX_BURST_MAX};

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

/// Mbufs per port's pool: RX descriptors + TX descriptors + bursts in hand, rounded to 2^n-1
/// (DPDK's recommendation for ring-backed pools).
pub const POOL_MBUFS: u32 = 8191;
/// Per-lcore mbuf cache.
pub const POOL_CACHE: u32 = 256;
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
    #[error("{call} failed: {msg}")]
    Call { call: &'static str, msg: String },
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

/// Initialises the EAL with `args` (program name first is added) once per process; later calls
/// succeed only with the same arguments.
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
        // SAFETY: argv holds argc valid NUL-terminated strings that outlive the call (the
        // EAL may permute the pointer array, which we own, but does not write the strings).
        let n = unsafe { sys::rte_eal_init(argv.len() as i32, argv.as_mut_ptr()) };
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

/// One started DPDK port with one RX and one TX queue and its own mbuf pool.
#[derive(Debug)]
pub struct DpdkPort {
    port: u16,
    pool: *mut sys::rte_mempool,
    mbufs: [*mut sys::rte_mbuf; RX_BURST_MAX],
}

// SAFETY: the port's queues and pool are used only through `&mut self`, by one thread at a
// time; DPDK queues may move between threads as long as they are not used concurrently.
unsafe impl Send for DpdkPort {}

impl DpdkPort {
    /// Configures and starts the port named `name` (e.g. "net_ring0"); the EAL must be up.
    pub fn open(name: &str) -> Result<Self, DpdkError> {
        let cname = CString::new(name).map_err(|_| DpdkError::NoPort(name.into()))?;
        let mut port = 0u16;
        // SAFETY: `cname` is NUL-terminated and `port` is a live u16 to write.
        if unsafe { sys::rte_eth_dev_get_port_by_name(cname.as_ptr(), &mut port) } != 0 {
            return Err(DpdkError::NoPort(name.into()));
        }
        let call = |call: &'static str, r: i32| {
            if r < 0 {
                Err(DpdkError::Call {
                    call,
                    msg: rte_err(r),
                })
            } else {
                Ok(())
            }
        };
        let pool_name = CString::new(format!("strata_{port}")).map_err(|_| DpdkError::BadArg)?;
        // SAFETY: plain call with a NUL-terminated name; the result is checked for NULL.
        let socket = unsafe { sys::rte_socket_id() } as i32;
        // SAFETY: as above.
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
        let conf = sys::rte_eth_conf::default();
        // SAFETY: `conf` is a valid all-default configuration that outlives the call.
        call("rte_eth_dev_configure", unsafe {
            sys::rte_eth_dev_configure(port, 1, 1, &conf)
        })?;
        // SAFETY: queue 0 of a configured port; NULL conf means driver defaults; `pool` is live.
        call("rte_eth_rx_queue_setup", unsafe {
            sys::rte_eth_rx_queue_setup(port, 0, RING_DESCS, socket as u32, std::ptr::null(), pool)
        })?;
        // SAFETY: as above for TX.
        call("rte_eth_tx_queue_setup", unsafe {
            sys::rte_eth_tx_queue_setup(port, 0, RING_DESCS, socket as u32, std::ptr::null())
        })?;
        // SAFETY: the port is configured with its queues set up.
        call("rte_eth_dev_start", unsafe { sys::rte_eth_dev_start(port) })?;
        Ok(Self {
            port,
            pool,
            mbufs: [std::ptr::null_mut(); RX_BURST_MAX],
        })
    }
}

impl PacketIo for DpdkPort {
    fn rx_burst(&mut self, max: usize, f: &mut dyn FnMut(&[u8])) -> Result<usize, super::NetError> {
        let max = max.min(RX_BURST_MAX) as u16;
        // SAFETY: `mbufs` has room for RX_BURST_MAX >= max pointers; queue 0 is set up and used
        // only by this thread (&mut self).
        let n = unsafe { sys::rte_eth_rx_burst(self.port, 0, self.mbufs.as_mut_ptr(), max) };
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

    fn tx_burst(&mut self, frames: &[&[u8]]) -> Result<usize, super::NetError> {
        let n = frames.len().min(RX_BURST_MAX);
        let mut built = 0usize;
        for fr in &frames[..n] {
            let len =
                u16::try_from(fr.len()).map_err(|_| DpdkError::FrameTooLarge { len: fr.len() })?;
            // SAFETY: `pool` is a live pool created in `open`.
            let m = unsafe { sys::rte_pktmbuf_alloc(self.pool) };
            if m.is_null() {
                break; // pool exhausted: the caller retries later
            }
            // SAFETY: `m` is a fresh mbuf; append returns NULL or `len` writable bytes in it.
            let dst = unsafe { sys::rte_pktmbuf_append(m, len) };
            if dst.is_null() {
                // SAFETY: `m` is ours and unused.
                unsafe { sys::rte_pktmbuf_free(m) };
                return Err(DpdkError::FrameTooLarge { len: fr.len() }.into());
            }
            // SAFETY: `dst` has `len` writable bytes; `fr` has `len` readable ones.
            unsafe { std::ptr::copy_nonoverlapping(fr.as_ptr(), dst.cast::<u8>(), fr.len()) };
            self.mbufs[built] = m;
            built += 1;
        }
        // SAFETY: the first `built` pointers are filled mbufs; the driver takes the ones it sends.
        let sent =
            unsafe { sys::rte_eth_tx_burst(self.port, 0, self.mbufs.as_mut_ptr(), built as u16) };
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

impl Drop for DpdkPort {
    fn drop(&mut self) {
        // SAFETY: the port was started by `open`; stopping it ends its use of the pool, which
        // is then freed (no mbuf of it is held: bursts are freed before returning).
        unsafe {
            sys::rte_eth_dev_stop(self.port);
            sys::rte_eth_dev_close(self.port);
            sys::rte_mempool_free(self.pool);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::frame::{build_udp, udp_payload, FrameSpec, IpVersion, FRAME_MAX};

    fn eal() {
        let prefix = format!("--file-prefix=strata-test-{}", std::process::id());
        init_eal(&[
            "--no-huge",
            "-m",
            "256",
            "--no-pci",
            &prefix,
            "-l",
            "0",
            "--log-level=error",
            "--vdev=net_ring0",
            "--vdev=net_null0,size=64,copy=0",
        ])
        .unwrap();
    }

    #[test]
    fn net_ring_loops_frames_back() {
        eal();
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
        eal();
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
}
