//! `backend=dpdk` ports (cargo feature `dpdk`): the EAL's arguments and one-time start, DPDK
//! virtual devices opened or hot-plugged, and kernel interfaces as `net_af_xdp` ports with the
//! steering program, whose port map is filled here (the PMD attaches the program itself).

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use dataplane::reactor::ReactorLink;

use super::{hand_to_reactor, step, Ports, PortsError};
use crate::dpdk::{first_allowed_cpu, init_eal, DpdkError, DpdkPort};
use crate::port::PortSpec;

/// EAL arguments when the caller gives none (stratad's `--dpdk-eal`): no hugepages and no PCI
/// scan (virtual devices and `net_af_xdp` need neither), errors only; `-l CPU` with the first
/// CPU of the process's affinity is added ([`default_eal`]): one lcore, the reactors are not EAL
/// lcores (they register with DPDK as non-EAL threads at their first burst).
pub const DEFAULT_EAL: &str = "--no-huge -m 256 --no-pci --log-level=error";

/// [`DEFAULT_EAL`] with `-l` the first CPU this process may run on (`-l 0` fails when CPU 0
/// is not in its affinity, e.g. under taskset or a cpuset).
pub fn default_eal() -> String {
    format!("{DEFAULT_EAL} -l {}", first_allowed_cpu())
}

/// Interface names starting with this are DPDK virtual devices, not kernel interfaces
/// (every DPDK network PMD's name starts with it).
const VDEV_PREFIX: &str = "net_";

/// The EAL arguments: `user` or the default, plus a per-process `--file-prefix` unless one
/// is given, so that two daemons never share DPDK's runtime directory.
pub fn eal_args(user: Option<&str>) -> Vec<String> {
    let default = default_eal();
    let mut args: Vec<String> = user
        .unwrap_or(&default)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    if !args.iter().any(|a| a.starts_with("--file-prefix")) {
        args.push(format!("--file-prefix={}", own_prefix()));
    }
    args
}

/// The `--file-prefix` added to the EAL arguments (named for stratad, the daemon that runs
/// ports).
pub fn own_prefix() -> String {
    format!("stratad-{}", std::process::id())
}

/// The steering object in an anonymous memory file, for the PMD's `xdp_prog=` as
/// `/proc/self/fd/N` (libbpf opens it by path): nothing on disk for another user to
/// pre-create or replace, and no devargs separator (',' '=') in the path.
struct MemObject(OwnedFd);

impl MemObject {
    fn new(bytes: &[u8]) -> std::io::Result<Self> {
        // SAFETY: the name is a NUL-terminated literal; the result is checked.
        let fd = unsafe { libc::memfd_create(c"stratad-steer.bpf.o".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        std::fs::File::from(fd.try_clone()?).write_all(bytes)?;
        Ok(Self(fd))
    }

    fn path(&self) -> String {
        format!("/proc/self/fd/{}", self.0.as_raw_fd())
    }
}

/// Starts `spec`'s DPDK queues (initialising the EAL with `user_eal` or the default at the
/// first call) and hands them to the reactors.
pub fn start(
    ports: &mut Ports,
    spec: &PortSpec,
    links: &[ReactorLink],
    user_eal: Option<&str>,
) -> Result<(), PortsError> {
    let iface = &spec.iface;
    let args = eal_args(user_eal);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    init_eal(&refs).map_err(step(format!("{iface}: DPDK EAL")))?;
    let queues = u16::try_from(spec.queues).map_err(|_| PortsError::Refused {
        iface: iface.clone(),
        why: "too many queues".into(),
    })?;
    let handles = if iface.starts_with(VDEV_PREFIX) {
        // Created by a --vdev of the EAL arguments, or hot-plugged here with default arguments.
        match DpdkPort::open_queues(iface, queues) {
            Ok(h) => h,
            Err(DpdkError::NoPort(_)) => {
                DpdkPort::attach(iface, queues).map_err(step(format!("{iface}: DPDK device")))?
            }
            Err(e) => return Err(step(format!("{iface}: DPDK device"))(e)),
        }
    } else {
        // The PMD attaches with XDP_FLAGS_UPDATE_IF_NOEXIST: a program left attached by a
        // SIGKILLed stratad (netlink attachments outlive their loader) would make every
        // later start fail. Ours is detached; anyone else's is an error naming it.
        match ebpf::detach_stale_steering(iface) {
            Ok(None) => {}
            Ok(Some(id)) => tracing::warn!(%iface, prog = id,
                "detached a steering program left attached (by a killed stratad?)"),
            Err(e) => return Err(step(iface.clone())(e)),
        }
        // Kept open until the PMD has loaded it (in attach).
        let obj = MemObject::new(ebpf::steer_object())
            .map_err(step(format!("{iface}: the XDP object's memory file")))?;
        // busy_budget=0: the reactor polls; preferred busy polling would add a system
        // call to every empty poll.
        let devargs = format!(
            "net_af_xdp_{iface},iface={iface},start_queue=0,queue_count={queues},\
             xdp_prog={},busy_budget=0",
            obj.path()
        );
        let handles = DpdkPort::attach(&devargs, queues)
            .map_err(step(format!("{iface}: DPDK net_af_xdp")))?;
        drop(obj);
        let mut attached = ebpf::AttachedSteering::find(iface)
            .map_err(step(format!("{iface}: the net_af_xdp PMD's XDP program")))?;
        for &p in &spec.steer {
            attached
                .set_port(ebpf::SteerPort::both(p))
                .map_err(step(format!("{iface}: steering port {p}")))?;
        }
        let reader = attached
            .counters_reader()
            .map_err(step(format!("{iface}: steering counters")))?;
        ports
            .counters
            .steering
            .push((iface.clone(), Arc::new(reader)));
        tracing::info!(%iface, ports = ?spec.steer, prog = attached.program_id(),
            "DPDK net_af_xdp port with XDP steering");
        ports.attached.push(attached);
        handles
    };
    for h in handles {
        let q = u32::from(h.queue());
        hand_to_reactor(ports, links, iface, q, Box::new(h))?;
    }
    Ok(())
}
