//! `--port iface=NAME[,queues=N][,backend=af_xdp|dpdk|socket][,steer=3260,4420]`: packet
//! queues on a shared NIC port, polled by the same reactors as the disks.
//!
//! For `af_xdp`, the XDP steering program is loaded and attached to the interface (native
//! mode where the driver supports it, generic otherwise), one AF_XDP socket is opened per
//! queue and registered in the program's XSKMAP, and each socket is handed to reactor
//! `queue % reactors`. `socket` is the kernel packet-socket fallback (one queue, no program).
//! No storage protocol consumes the frames yet: queues count them (`stats`). The program is
//! detached when stratad exits, even on SIGKILL (aya attaches through a bpf link).

use std::sync::Arc;

use dataplane::net::af_xdp::{XskConfig, XskSocket};
use dataplane::net::classify::PortSet;
use dataplane::net::packet_socket::PacketSocket;
use dataplane::net::poller::{QueuePoller, QueueStats};
use dataplane::net::port::PortSpec;
use dataplane::net::{Backend, PacketIo};
use dataplane::reactor::{Command, ReactorLink};

/// Packet queues started, kept alive while stratad runs.
pub struct Ports {
    /// Steering programs (detached on drop).
    steering: Vec<(String, ebpf::Steering)>,
    /// (interface, queue, counters) per packet queue.
    pub queues: Vec<(String, u32, Arc<QueueStats>)>,
}

impl std::fmt::Debug for Ports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ports")
            .field("queues", &self.queues.len())
            .finish()
    }
}

impl Ports {
    /// Steering counters per interface (steered, passed, malformed, unbound).
    pub fn steering_counters(&self) -> Vec<(String, [u64; 4])> {
        self.steering
            .iter()
            .filter_map(|(iface, s)| {
                s.counters()
                    .ok()
                    .map(|c| (iface.clone(), [c.steered, c.passed, c.malformed, c.unbound]))
            })
            .collect()
    }
}

fn hand_to_reactor(
    links: &[ReactorLink],
    q: u32,
    io: Box<dyn PacketIo>,
    stats: Arc<QueueStats>,
) -> Result<(), String> {
    let link = &links[q as usize % links.len()];
    // Frames are counted by the poller; no storage protocol consumes them yet.
    let poller = QueuePoller::new(io, Box::new(|_frame: &[u8]| {}), stats);
    link.send(Command::AddPoller(Box::new(poller)))
        .map_err(|e| e.to_string())
}

/// Starts every port's queues on the reactors behind `links`.
pub fn start(specs: &[PortSpec], links: &[ReactorLink]) -> Result<Ports, String> {
    let mut ports = Ports {
        steering: Vec::new(),
        queues: Vec::new(),
    };
    if links.is_empty() {
        return Err("no reactors".into());
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
                    .map_err(|e| format!("{iface}: load XDP program: {e}"))?;
                let mode = steering
                    .attach(iface, ebpf::ModePreference::Auto)
                    .map_err(|e| format!("{iface}: attach XDP program: {e}"))?;
                tracing::info!(%iface, ?mode, ports = ?spec.steer, "XDP steering attached");
                for q in 0..spec.queues {
                    let xsk = XskSocket::new(iface, q, XskConfig::default())
                        .map_err(|e| format!("{iface} queue {q}: AF_XDP socket: {e}"))?;
                    steering
                        .register_socket(q, xsk.wake_fd())
                        .map_err(|e| format!("{iface} queue {q}: register socket: {e}"))?;
                    let stats = Arc::new(QueueStats::default());
                    hand_to_reactor(links, q, Box::new(xsk), stats.clone())?;
                    ports.queues.push((iface.clone(), q, stats));
                }
                ports.steering.push((iface.clone(), steering));
            }
            Backend::Socket => {
                let filter = PortSet::new(&spec.steer).map_err(|e| format!("{iface}: {e}"))?;
                let sock = PacketSocket::new(iface, Some(filter))
                    .map_err(|e| format!("{iface}: packet socket: {e}"))?;
                let stats = Arc::new(QueueStats::default());
                hand_to_reactor(links, 0, Box::new(sock), stats.clone())?;
                ports.queues.push((iface.clone(), 0, stats));
            }
            Backend::Dpdk => {
                return Err(format!(
                    "{iface}: backend=dpdk needs a stratad built with the dataplane `dpdk` feature"
                ))
            }
        }
    }
    Ok(ports)
}
