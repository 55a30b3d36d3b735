//! Strata's XDP programs and their loader.
//!
//! Map of the crate:
//! - `src/steer.bpf.c`: the storage steering program (C, compiled by `build.rs` with
//!   `clang -target bpf -g -O2`): storage TCP/UDP destination ports go to the AF_XDP socket of
//!   the receive queue, everything else (and malformed frames) to the kernel. Its userspace
//!   mirror is `net::classify`.
//! - [`Steering`]: loads it with aya, fills the port map, attaches it (native XDP, else generic),
//!   registers AF_XDP sockets per queue, reads the per-CPU [`Counters`], and runs single frames
//!   through the kernel's copy of the program ([`Steering::test_run`]) for tests.
//! - [`CountersReader`]: the counters through a descriptor of their own, for a stats thread.
//! - [`AttachedSteering`]: the same program when another loader attached it (DPDK's
//!   `net_af_xdp` PMD loads [`steer_object`] from its `xdp_prog=` file with an empty port map):
//!   found through the interface, its port map filled and its counters read.
//! - [`sys`]: the bpf(2) commands aya 0.13 does not expose (test run, map delete) and the
//!   rtnetlink query of an interface's XDP program.
//!
//! The packet path (`net` crate) is its user; the tests that need AF_XDP sockets, veth pairs or
//! the userspace classifier (steering, the differential test, detach on a killed holder, DPDK's
//! `net_af_xdp`) live in `net/tests/`, so this crate depends on nothing of Strata's.

pub mod sys;

use std::os::fd::{AsFd, AsRawFd, RawFd};

use std::borrow::{Borrow, BorrowMut};

use aya::maps::{HashMap, Map, MapData, MapInfo, PerCpuArray, XskMap};
use aya::programs::{loaded_programs, ProgramError, Xdp, XdpFlags};
use aya::Ebpf;

/// Entries of `xsks_map`: AF_XDP sockets are indexed by receive queue, so this bounds the
/// queues a port can steer (equal to `MAX_QUEUES` in steer.bpf.c).
pub const MAX_QUEUES: u32 = 64;
/// Entries of `steer_ports` (equal to `MAX_STEER_PORTS` in steer.bpf.c).
pub const MAX_STEER_PORTS: usize = 16;
/// iSCSI and NVMe/TCP.
pub const DEFAULT_STEER_PORTS: [u16; 2] = [3260, 4420];
/// Bit of a port's protocol mask: steer TCP segments to this port.
pub const PROTO_TCP: u8 = 1;
/// Bit of a port's protocol mask: steer UDP datagrams to this port.
pub const PROTO_UDP: u8 = 2;

const PROGRAM: &str = "storage_steer";
const MAP_XSKS: &str = "xsks_map";
const MAP_PORTS: &str = "steer_ports";
const MAP_COUNTERS: &str = "counters";
/// Indexes of the `counters` map, as `CNT_*` in steer.bpf.c.
const CNT_STEERED: u32 = 0;
const CNT_PASSED: u32 = 1;
const CNT_MALFORMED: u32 = 2;
const CNT_UNBOUND: u32 = 3;

/// The compiled steering program, embedded so that a deployed binary needs no object file.
static STEER_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/steer.bpf.o"));

/// The compiled steering program (the ELF object clang built from `src/steer.bpf.c`), for
/// loaders other than [`Steering`]: DPDK's `net_af_xdp` PMD takes it as an `xdp_prog=` file
/// (its XSKMAP is named `xsks_map`, as the PMD requires); see [`AttachedSteering`].
pub fn steer_object() -> &'static [u8] {
    STEER_OBJ
}

/// Sums the per-CPU counters of a `counters` map.
fn sum_counters<T: Borrow<MapData>>(arr: &PerCpuArray<T, u64>) -> Result<Counters, SteerError> {
    let sum = |i: u32| -> Result<u64, SteerError> {
        Ok(arr
            .get(&i, 0)?
            .iter()
            .copied()
            .fold(0u64, u64::wrapping_add))
    };
    Ok(Counters {
        steered: sum(CNT_STEERED)?,
        passed: sum(CNT_PASSED)?,
        malformed: sum(CNT_MALFORMED)?,
        unbound: sum(CNT_UNBOUND)?,
    })
}

/// Adds, changes or (mask 0) removes a port in a `steer_ports` map.
fn set_port_in<T: BorrowMut<MapData>>(
    ports: &mut HashMap<T, u16, u8>,
    port: SteerPort,
) -> Result<(), SteerError> {
    if port.protocols == 0 {
        match ports.remove(&port.port) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    } else {
        Ok(ports.insert(port.port, port.protocols, 0)?)
    }
}

/// A read-only handle on a steering program's counters through a map descriptor of its own:
/// `Send` and `Sync`, so a stats thread can read while the owner of the program keeps it, and
/// still readable (the final values) after the program is detached.
pub struct CountersReader {
    map_id: u32,
    map: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for CountersReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountersReader")
            .field("map_id", &self.map_id)
            .finish()
    }
}

impl CountersReader {
    fn from_map_id(map_id: u32) -> Result<Self, SteerError> {
        let data = MapData::from_id(map_id)?;
        Ok(Self {
            map_id,
            map: PerCpuArray::try_from(Map::PerCpuArray(data))?,
        })
    }

    /// The counters, summed over CPUs.
    pub fn read(&self) -> Result<Counters, SteerError> {
        sum_counters(&self.map)
    }

    /// Another handle on the same map.
    pub fn try_clone(&self) -> Result<Self, SteerError> {
        Self::from_map_id(self.map_id)
    }
}

/// Errors of loading, attaching and driving the steering program.
#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    #[error("loading the XDP object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("XDP program: {0}")]
    Program(#[from] ProgramError),
    #[error("XDP map: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("the XDP object has no {0}")]
    Missing(&'static str),
    #[error("no interface named {0:?}")]
    UnknownInterface(String),
    #[error("{count} steering ports given, at most {MAX_STEER_PORTS}")]
    TooManyPorts { count: usize },
    #[error("queue {queue} out of range (at most {MAX_QUEUES} queues)")]
    QueueOutOfRange { queue: u32 },
    #[error("cannot attach XDP to {iface}: native mode: {native}; generic mode: {generic}")]
    Attach {
        iface: String,
        native: Box<ProgramError>,
        generic: Box<ProgramError>,
    },
    #[error("cannot attach XDP to {iface} in {mode:?} mode: {source}")]
    AttachMode {
        iface: String,
        mode: AttachMode,
        source: Box<ProgramError>,
    },
    #[error("the program is already attached to interface index {ifindex}")]
    AlreadyAttached { ifindex: u32 },
    #[error("no XDP program is attached to {0}")]
    NotAttached(String),
    #[error("the XDP program on {iface} is {name:?}, not the steering program")]
    ForeignProgram { iface: String, name: String },
    #[error(
        "interface {iface} already has XDP program id {id} ({name:?}) attached, which is not \
         Strata's steering program; detach it first (ip link set dev {iface} xdp off)"
    )]
    OtherProgramAttached {
        iface: String,
        id: u32,
        name: String,
    },
    #[error("XDP program {0} is no longer loaded")]
    ProgramGone(u32),
    #[error("bpf({call}): {source}")]
    Syscall {
        call: &'static str,
        source: std::io::Error,
    },
}

/// How the program runs on the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// In the driver, before an skb exists (fast; veth supports it).
    Native,
    /// After skb allocation (works on every device; copies).
    Generic,
}

/// Which attach modes to try.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ModePreference {
    /// Native, then generic if the driver refuses native.
    #[default]
    Auto,
    Native,
    Generic,
}

/// A destination port and the protocols ([`PROTO_TCP`] | [`PROTO_UDP`]) to steer on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SteerPort {
    pub port: u16,
    pub protocols: u8,
}

impl SteerPort {
    /// TCP and UDP on `port`.
    pub fn both(port: u16) -> Self {
        Self {
            port,
            protocols: PROTO_TCP | PROTO_UDP,
        }
    }
}

/// Sums of the per-CPU counters of the program.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Redirected to an AF_XDP socket.
    pub steered: u64,
    /// Not storage traffic: passed to the kernel.
    pub passed: u64,
    /// Truncated or invalid headers: passed to the kernel (which drops and counts them).
    pub malformed: u64,
    /// Storage traffic on a queue without a socket: passed to the kernel.
    pub unbound: u64,
}

/// The steering program, loaded (maps created) and optionally attached to one interface.
///
/// Dropping it detaches the program: aya attaches XDP through a bpf link (kernel >= 5.9), which
/// the kernel also removes when the process dies, so no program outlives `stratad`, even on
/// SIGKILL.
#[derive(Debug)]
pub struct Steering {
    ebpf: Ebpf,
    attached: Option<(u32, aya::programs::xdp::XdpLinkId, AttachMode)>,
}

impl Steering {
    /// Loads the program into the kernel (verifier included) with `ports` in its port map.
    pub fn load(ports: &[SteerPort]) -> Result<Self, SteerError> {
        if ports.len() > MAX_STEER_PORTS {
            return Err(SteerError::TooManyPorts { count: ports.len() });
        }
        let mut ebpf = Ebpf::load(STEER_OBJ)?;
        {
            let prog: &mut Xdp = ebpf
                .program_mut(PROGRAM)
                .ok_or(SteerError::Missing(PROGRAM))?
                .try_into()?;
            prog.load()?;
        }
        let mut s = Self {
            ebpf,
            attached: None,
        };
        for p in ports {
            s.set_port(*p)?;
        }
        Ok(s)
    }

    /// Adds or changes a steered port (a mask of 0 removes it).
    pub fn set_port(&mut self, port: SteerPort) -> Result<(), SteerError> {
        let map = self
            .ebpf
            .map_mut(MAP_PORTS)
            .ok_or(SteerError::Missing(MAP_PORTS))?;
        let mut ports: HashMap<&mut MapData, u16, u8> = HashMap::try_from(map)?;
        set_port_in(&mut ports, port)
    }

    /// Attaches the program to `iface`. With [`ModePreference::Auto`], native mode is tried
    /// first and generic mode only if the driver refuses native; the error names both reasons.
    pub fn attach(&mut self, iface: &str, pref: ModePreference) -> Result<AttachMode, SteerError> {
        if let Some((ifindex, _, _)) = self.attached {
            return Err(SteerError::AlreadyAttached { ifindex });
        }
        let ifindex = sys::if_index(iface)?;
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(PROGRAM)
            .ok_or(SteerError::Missing(PROGRAM))?
            .try_into()?;
        let try_mode = |prog: &mut Xdp, mode: AttachMode| {
            let flags = match mode {
                AttachMode::Native => XdpFlags::DRV_MODE,
                AttachMode::Generic => XdpFlags::SKB_MODE,
            };
            prog.attach_to_if_index(ifindex, flags)
        };
        let (link, mode) = match pref {
            ModePreference::Native | ModePreference::Generic => {
                let mode = if pref == ModePreference::Native {
                    AttachMode::Native
                } else {
                    AttachMode::Generic
                };
                let link = try_mode(prog, mode).map_err(|e| SteerError::AttachMode {
                    iface: iface.to_owned(),
                    mode,
                    source: Box::new(e),
                })?;
                (link, mode)
            }
            ModePreference::Auto => match try_mode(prog, AttachMode::Native) {
                Ok(link) => (link, AttachMode::Native),
                Err(native) => match try_mode(prog, AttachMode::Generic) {
                    Ok(link) => {
                        tracing::info!(iface, %native, "native XDP refused; using generic mode");
                        (link, AttachMode::Generic)
                    }
                    Err(generic) => {
                        return Err(SteerError::Attach {
                            iface: iface.to_owned(),
                            native: Box::new(native),
                            generic: Box::new(generic),
                        })
                    }
                },
            },
        };
        self.attached = Some((ifindex, link, mode));
        Ok(mode)
    }

    /// The interface index and mode the program is attached with, if any.
    pub fn attached(&self) -> Option<(u32, AttachMode)> {
        self.attached.as_ref().map(|(i, _, m)| (*i, *m))
    }

    /// Detaches the program from its interface (a no-op when not attached).
    pub fn detach(&mut self) -> Result<(), SteerError> {
        if let Some((_, link, _)) = self.attached.take() {
            let prog: &mut Xdp = self
                .ebpf
                .program_mut(PROGRAM)
                .ok_or(SteerError::Missing(PROGRAM))?
                .try_into()?;
            prog.detach(link)?;
        }
        Ok(())
    }

    /// Steers storage frames received on `queue` to the AF_XDP socket `fd` (bound to that
    /// queue of the attached interface; the kernel refuses other sockets at redirect time).
    pub fn register_socket(&mut self, queue: u32, fd: RawFd) -> Result<(), SteerError> {
        if queue >= MAX_QUEUES {
            return Err(SteerError::QueueOutOfRange { queue });
        }
        let map = self
            .ebpf
            .map_mut(MAP_XSKS)
            .ok_or(SteerError::Missing(MAP_XSKS))?;
        let mut xsks: XskMap<&mut MapData> = XskMap::try_from(map)?;
        xsks.set(queue, fd, 0)?;
        Ok(())
    }

    /// Stops steering `queue`'s storage frames to a socket: they go to the kernel again.
    pub fn unregister_socket(&mut self, queue: u32) -> Result<(), SteerError> {
        if queue >= MAX_QUEUES {
            return Err(SteerError::QueueOutOfRange { queue });
        }
        let fd = match self.ebpf.map(MAP_XSKS) {
            Some(Map::XskMap(data)) => data.fd().as_fd().as_raw_fd(),
            _ => return Err(SteerError::Missing(MAP_XSKS)),
        };
        sys::map_delete_u32(fd, queue)
    }

    /// The program's counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, SteerError> {
        let map = self
            .ebpf
            .map(MAP_COUNTERS)
            .ok_or(SteerError::Missing(MAP_COUNTERS))?;
        let arr: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
        sum_counters(&arr)
    }

    /// A handle on the counters for another thread (see [`CountersReader`]).
    pub fn counters_reader(&self) -> Result<CountersReader, SteerError> {
        match self.ebpf.map(MAP_COUNTERS) {
            Some(Map::PerCpuArray(data)) => CountersReader::from_map_id(data.info()?.id()),
            _ => Err(SteerError::Missing(MAP_COUNTERS)),
        }
    }

    /// Runs `frame` once through the loaded program in the kernel (BPF_PROG_TEST_RUN, nothing
    /// is sent) and returns the XDP action. Counters are updated as for a received frame.
    pub fn test_run(&self, frame: &[u8]) -> Result<u32, SteerError> {
        let prog = self
            .ebpf
            .program(PROGRAM)
            .ok_or(SteerError::Missing(PROGRAM))?;
        let fd = prog.fd()?.as_fd().as_raw_fd();
        sys::prog_test_run(fd, frame)
    }
}

impl Drop for Steering {
    fn drop(&mut self) {
        // Dropping `ebpf` would detach too; doing it here logs a failure instead of hiding it.
        if let Err(e) = self.detach() {
            tracing::warn!(%e, "detaching the steering program");
        }
    }
}

/// The steering program as attached to an interface by another loader, found through the
/// interface: DPDK's `net_af_xdp` PMD loads and attaches an `xdp_prog=` object itself (with
/// [`steer_object`], its `steer_ports` map starts empty, so it steers nothing until filled
/// here) and puts its own AF_XDP sockets in `xsks_map`.
///
/// Holds descriptors of the program's maps only: the program stays as long as its loader
/// keeps it attached (the PMD detaches it when its port is closed).
pub struct AttachedSteering {
    iface: String,
    prog_id: u32,
    ports: HashMap<MapData, u16, u8>,
    counters: CountersReader,
}

impl std::fmt::Debug for AttachedSteering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttachedSteering")
            .field("iface", &self.iface)
            .field("prog_id", &self.prog_id)
            .finish()
    }
}

/// The name the kernel reports for the loaded program `id`.
fn program_name(id: u32) -> Result<String, SteerError> {
    // aya 0.13 has no ProgramInfo::from_id: walk the loaded programs for the id.
    let info = loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .ok_or(SteerError::ProgramGone(id))?;
    Ok(String::from_utf8_lossy(info.name()).into_owned())
}

/// Makes `iface` free for a loader that attaches by netlink without replacing (DPDK's
/// net_af_xdp PMD uses `XDP_FLAGS_UPDATE_IF_NOEXIST`): if the steering program is attached
/// (left behind by a killed process: a netlink attachment outlives its loader), it is detached
/// and its id returned; if another program is attached, fails with
/// [`SteerError::OtherProgramAttached`] naming it. Ok(None) when nothing is attached.
pub fn detach_stale_steering(iface: &str) -> Result<Option<u32>, SteerError> {
    let ifindex = sys::if_index(iface)?;
    let progs = sys::xdp_programs(ifindex)?;
    let Some(&(id, _)) = progs.first() else {
        return Ok(None);
    };
    for &(id, _) in &progs {
        let name = program_name(id)?;
        if name != PROGRAM {
            return Err(SteerError::OtherProgramAttached {
                iface: iface.into(),
                id,
                name,
            });
        }
    }
    sys::xdp_detach_all(ifindex)?;
    Ok(Some(id))
}

impl AttachedSteering {
    /// Finds the steering program attached to `iface` (in the caller's network namespace);
    /// fails if none is attached or the attached program is another one.
    pub fn find(iface: &str) -> Result<Self, SteerError> {
        let ifindex = sys::if_index(iface)?;
        let prog_id =
            sys::xdp_prog_id(ifindex)?.ok_or_else(|| SteerError::NotAttached(iface.into()))?;
        // aya 0.13 has no ProgramInfo::from_id: walk the loaded programs for the id.
        let info = loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == prog_id)
            .ok_or(SteerError::ProgramGone(prog_id))?;
        let name = String::from_utf8_lossy(info.name()).into_owned();
        if name != PROGRAM {
            return Err(SteerError::ForeignProgram {
                iface: iface.into(),
                name,
            });
        }
        let (mut ports, mut counters) = (None, None);
        for id in info.map_ids()?.ok_or(SteerError::Missing("map ids"))? {
            match MapInfo::from_id(id)?.name_as_str() {
                Some(MAP_PORTS) => ports = Some(id),
                Some(MAP_COUNTERS) => counters = Some(id),
                _ => {}
            }
        }
        let ports = MapData::from_id(ports.ok_or(SteerError::Missing(MAP_PORTS))?)?;
        let counters = counters.ok_or(SteerError::Missing(MAP_COUNTERS))?;
        Ok(Self {
            iface: iface.into(),
            prog_id,
            ports: HashMap::try_from(Map::HashMap(ports))?,
            counters: CountersReader::from_map_id(counters)?,
        })
    }

    /// The kernel's id of the program.
    pub fn program_id(&self) -> u32 {
        self.prog_id
    }

    /// Adds or changes a steered port (a mask of 0 removes it).
    pub fn set_port(&mut self, port: SteerPort) -> Result<(), SteerError> {
        set_port_in(&mut self.ports, port)
    }

    /// The program's counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, SteerError> {
        self.counters.read()
    }

    /// A handle on the counters for another thread.
    pub fn counters_reader(&self) -> Result<CountersReader, SteerError> {
        self.counters.try_clone()
    }
}
