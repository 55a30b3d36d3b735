//! Running ports: each `--port iface=NAME[,queues=N][,backend=af_xdp|dpdk|socket]
//! [,steer=3260,4420]` ([`PortSpec`]) started as packet queues on a shared NIC port, polled by
//! the same reactors as the disks.
//!
//! - `af_xdp` (default): the XDP steering program is loaded and attached to the interface
//!   (native mode where the driver supports it, generic otherwise), one AF_XDP socket is opened
//!   per queue and registered in the program's XSKMAP, and each socket is handed to reactor
//!   `queue % reactors`. The program is detached when the [`Ports`] are dropped, and when the
//!   process dies, even on SIGKILL (aya attaches through a bpf link).
//! - `socket`: the kernel packet-socket fallback (one queue, no program).
//! - `dpdk` (cargo feature `dpdk`; `ports::dpdk`): the EAL is initialised once, at the first such
//!   port, with the caller's EAL arguments or `dpdk::DEFAULT_EAL` (`--no-huge -m 256 --no-pci
//!   --log-level=error -l CPU`, CPU the first of the process's affinity, plus a per-process
//!   `--file-prefix`). A kernel interface NAME becomes DPDK's `net_af_xdp` port on it, queue q
//!   on the interface's queue q, with the same steering program: the PMD loads it from an
//!   anonymous memory file (`/proc/self/fd/N`) and attaches it itself (netlink, so a SIGKILLed
//!   process leaves it attached; a clean exit removes it; the next start detaches such a
//!   leftover steering program and refuses an interface with another program), and the port
//!   map is filled here. A NAME starting with `net_` is a DPDK virtual device (`net_ring0`,
//!   `net_null0`, `net_tap0`, ...): opened as is when a `--vdev` of the EAL arguments created
//!   it, else hot-plugged with default arguments, and all its traffic is served (no steering).
//!   A port already served by another spec is refused. DPDK queues are poll-only: a reactor
//!   serving one never sleeps (its disks are polled at 100% CPU).
//!
//! No storage protocol consumes the frames yet: queues count them, and the counters (queues,
//! and the steering program's steered/passed/malformed/unbound per interface) are read through
//! [`PortCounters`] (stratad's control socket `stats` and `--metrics` endpoint).

#[cfg(feature = "dpdk")]
pub mod dpdk;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use dataplane::reactor::{Command, ReactorLink};

use crate::af_xdp::{XskConfig, XskSocket};
use crate::classify::PortSet;
use crate::packet_socket::PacketSocket;
use crate::poller::{QueuePoller, QueueStats};
use crate::port::PortSpec;
use crate::{Backend, PacketIo};

/// The steering program's counters of one interface.
pub use ebpf::Counters as SteeringCounters;

/// Why ports could not be started. The message names the interface (and queue) and the step.
#[derive(Debug, thiserror::Error)]
pub enum PortsError {
    #[error("no reactors")]
    NoReactors,
    /// A step of starting a port failed; `context` is "IFACE[ queue Q]: step".
    #[error("{context}: {source}")]
    Step {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The port cannot be served as specified.
    #[error("{iface}: {why}")]
    Refused { iface: String, why: String },
}

/// A `map_err` adapter: wraps an error with what was being done.
fn step<E: std::error::Error + Send + Sync + 'static>(
    context: impl Into<String>,
) -> impl FnOnce(E) -> PortsError {
    let context = context.into();
    move |e| PortsError::Step {
        context,
        source: Box::new(e),
    }
}

/// One packet queue's counters, with where it lives.
#[derive(Debug, Clone)]
pub struct QueueCounters {
    pub iface: String,
    pub queue: u32,
    pub backend: Backend,
    pub stats: Arc<QueueStats>,
}

/// Everything a control plane reads about the ports: cheap to clone, readable from any thread
/// while the ports run.
#[derive(Debug, Clone, Default)]
pub struct PortCounters {
    pub queues: Vec<QueueCounters>,
    /// Steering program counters per interface (af_xdp, and dpdk on a kernel interface).
    pub steering: Vec<(String, Arc<ebpf::CountersReader>)>,
}

/// A point-in-time copy of [`PortCounters`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortsSnapshot {
    /// (interface, queue, backend name, rx frames, rx bytes, receive errors).
    pub queues: Vec<(String, u32, &'static str, u64, u64, u64)>,
    /// (interface, counters); an interface whose map cannot be read is left out (logged).
    pub steering: Vec<(String, SteeringCounters)>,
}

/// The `backend=` name of `b`.
pub fn backend_name(b: Backend) -> &'static str {
    match b {
        Backend::AfXdp => "af_xdp",
        Backend::Socket => "socket",
        Backend::Dpdk => "dpdk",
    }
}

impl PortCounters {
    /// Reads every counter (relaxed loads and one map lookup per steering counter).
    pub fn snapshot(&self) -> PortsSnapshot {
        let l = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        PortsSnapshot {
            queues: self
                .queues
                .iter()
                .map(|q| {
                    (
                        q.iface.clone(),
                        q.queue,
                        backend_name(q.backend),
                        l(&q.stats.rx_frames),
                        l(&q.stats.rx_bytes),
                        l(&q.stats.errors),
                    )
                })
                .collect(),
            steering: self
                .steering
                .iter()
                .filter_map(|(iface, r)| match r.read() {
                    Ok(c) => Some((iface.clone(), c)),
                    Err(e) => {
                        tracing::debug!(%iface, %e, "reading steering counters");
                        None
                    }
                })
                .collect(),
        }
    }
}

/// Packet queues started, kept alive while the daemon runs. Drop it after the reactors have
/// stopped polling the queues: dropping detaches the steering programs.
pub struct Ports {
    /// Steering programs (detached on drop).
    steering: Vec<(String, ebpf::Steering)>,
    /// Programs attached by DPDK's net_af_xdp PMD (map handles only; the PMD detaches them).
    #[cfg(feature = "dpdk")]
    attached: Vec<ebpf::AttachedSteering>,
    /// What `stats` and the metrics endpoint read.
    pub counters: PortCounters,
}

impl std::fmt::Debug for Ports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Ports");
        d.field("queues", &self.counters.queues.len())
            .field("steering", &self.steering.len());
        #[cfg(feature = "dpdk")]
        d.field("dpdk_steering", &self.attached.len());
        d.finish()
    }
}

impl Ports {
    /// Steering counters per interface (steered, passed, malformed, unbound).
    pub fn steering_counters(&self) -> Vec<(String, [u64; 4])> {
        self.counters
            .snapshot()
            .steering
            .into_iter()
            .map(|(iface, c)| (iface, [c.steered, c.passed, c.malformed, c.unbound]))
            .collect()
    }
}

/// Hands queue `q` of `iface` to reactor `q % reactors` and records its counters.
fn hand_to_reactor(
    ports: &mut Ports,
    links: &[ReactorLink],
    iface: &str,
    q: u32,
    io: Box<dyn PacketIo>,
) -> Result<(), PortsError> {
    let link = &links[q as usize % links.len()];
    let backend = io.backend();
    let stats = Arc::new(QueueStats::default());
    // Frames are counted by the poller; no storage protocol consumes them yet.
    let poller = QueuePoller::new(io, Box::new(|_frame: &[u8]| {}), stats.clone());
    link.send(Command::AddPoller(Box::new(poller)))
        .map_err(step(format!("{iface} queue {q}: hand to reactor")))?;
    ports.counters.queues.push(QueueCounters {
        iface: iface.to_owned(),
        queue: q,
        backend,
        stats,
    });
    Ok(())
}

/// Starts every port's queues on the reactors behind `links`. `dpdk_eal` replaces the default
/// EAL arguments of `backend=dpdk` ports.
pub fn start(
    specs: &[PortSpec],
    links: &[ReactorLink],
    dpdk_eal: Option<&str>,
) -> Result<Ports, PortsError> {
    let mut ports = Ports {
        steering: Vec::new(),
        #[cfg(feature = "dpdk")]
        attached: Vec::new(),
        counters: PortCounters::default(),
    };
    if links.is_empty() {
        return Err(PortsError::NoReactors);
    }
    for spec in specs {
        let iface = &spec.iface;
        match spec.backend {
            Backend::AfXdp => {
                let steer_ports: Vec<ebpf::SteerPort> = spec
                    .steer
                    .iter()
                    .map(|&p| ebpf::SteerPort::both(p))
                    .collect();
                let mut steering = ebpf::Steering::load(&steer_ports)
                    .map_err(step(format!("{iface}: load XDP program")))?;
                let mode = steering
                    .attach(iface, ebpf::ModePreference::Auto)
                    .map_err(step(format!("{iface}: attach XDP program")))?;
                tracing::info!(%iface, ?mode, ports = ?spec.steer, "XDP steering attached");
                for q in 0..spec.queues {
                    let xsk = XskSocket::new(iface, q, XskConfig::default())
                        .map_err(step(format!("{iface} queue {q}: AF_XDP socket")))?;
                    steering
                        .register_socket(q, xsk.wake_fd())
                        .map_err(step(format!("{iface} queue {q}: register socket")))?;
                    hand_to_reactor(&mut ports, links, iface, q, Box::new(xsk))?;
                }
                let reader = steering
                    .counters_reader()
                    .map_err(step(format!("{iface}: steering counters")))?;
                ports
                    .counters
                    .steering
                    .push((iface.clone(), Arc::new(reader)));
                ports.steering.push((iface.clone(), steering));
            }
            Backend::Socket => {
                let filter = PortSet::new(&spec.steer).map_err(step(iface.clone()))?;
                let sock = PacketSocket::new(iface, Some(filter))
                    .map_err(step(format!("{iface}: packet socket")))?;
                hand_to_reactor(&mut ports, links, iface, 0, Box::new(sock))?;
            }
            #[cfg(feature = "dpdk")]
            Backend::Dpdk => dpdk::start(&mut ports, spec, links, dpdk_eal)?,
            #[cfg(not(feature = "dpdk"))]
            Backend::Dpdk => {
                let _ = dpdk_eal;
                return Err(PortsError::Refused {
                    iface: iface.clone(),
                    why: "backend=dpdk needs a build with the `dpdk` feature (e.g. cargo \
                          build --release -p stratad --features dpdk; needs libdpdk-dev)"
                        .into(),
                });
            }
        }
    }
    Ok(ports)
}

/// Removes DPDK's runtime directory of this process (made for the `--file-prefix` added to
/// the EAL arguments; DPDK leaves it behind) when dropped: hold it across everything that may
/// use DPDK, so that the directory goes on error returns too. A no-op without the `dpdk`
/// feature or when no DPDK port ran.
#[derive(Debug)]
pub struct DpdkRuntimeDir {
    #[cfg(feature = "dpdk")]
    _guard: crate::dpdk::RuntimeDirGuard,
}

impl Default for DpdkRuntimeDir {
    fn default() -> Self {
        Self::new()
    }
}

impl DpdkRuntimeDir {
    pub fn new() -> Self {
        Self {
            #[cfg(feature = "dpdk")]
            _guard: crate::dpdk::RuntimeDirGuard::new(&dpdk::own_prefix()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::port::PortSpec;
    use crate::Backend;

    #[cfg(not(feature = "dpdk"))]
    #[test]
    fn dpdk_backend_needs_the_feature() {
        use dataplane::engine::EngineKind;
        use dataplane::server::{Server, ServerConfig};

        let server = Server::new(&ServerConfig {
            cpus: vec![None],
            engine: EngineKind::Sync,
        })
        .expect("reactors");
        let spec = PortSpec::new("net_ring0", Backend::Dpdk, 1);
        let err = start(&[spec], &server.reactor_links(), None).expect_err("refused");
        assert!(err.to_string().contains("`dpdk` feature"), "{err}");
    }

    #[test]
    fn no_reactors_is_an_error() {
        let spec = PortSpec::new("lo", Backend::Socket, 1);
        assert!(matches!(
            start(&[spec], &[], None),
            Err(PortsError::NoReactors)
        ));
    }
}
