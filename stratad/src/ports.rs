//! `--port iface=NAME[,queues=N][,backend=af_xdp|dpdk|socket][,steer=3260,4420]`: packet
//! queues on a shared NIC port, polled by the same reactors as the disks.
//!
//! - `af_xdp` (default): the XDP steering program is loaded and attached to the interface
//!   (native mode where the driver supports it, generic otherwise), one AF_XDP socket is opened
//!   per queue and registered in the program's XSKMAP, and each socket is handed to reactor
//!   `queue % reactors`. The program is detached when stratad exits, even on SIGKILL (aya
//!   attaches through a bpf link).
//! - `socket`: the kernel packet-socket fallback (one queue, no program).
//! - `dpdk` (a stratad built with `--features dpdk`): the EAL is initialised once, at the first
//!   such port, with `--dpdk-eal` (default `--no-huge -m 256 --no-pci --log-level=error -l CPU`,
//!   CPU the first of stratad's affinity, plus a per-process `--file-prefix`). A kernel
//!   interface NAME becomes DPDK's `net_af_xdp` port on it, queue q on the interface's queue q,
//!   with the same steering program: the PMD loads it from an anonymous memory file
//!   (`/proc/self/fd/N`) and attaches it itself (netlink, so a SIGKILLed stratad leaves it
//!   attached; a clean exit removes it; the next start detaches such a leftover steering
//!   program and refuses an interface with another program), and stratad fills its port map.
//!   A NAME starting with `net_` is a DPDK virtual device (`net_ring0`, `net_null0`,
//!   `net_tap0`, ...): opened as is when a `--vdev` of `--dpdk-eal` created it, else
//!   hot-plugged with default arguments, and all its traffic is served (no steering). A port
//!   already served by another `--port` is refused. DPDK queues are poll-only: a reactor
//!   serving one never sleeps (its disks are polled at 100% CPU).
//!
//! No storage protocol consumes the frames yet: queues count them, and the counters (queues,
//! and the steering program's steered/passed/malformed/unbound per interface) are in the
//! control socket's `stats` and the `--metrics` endpoint, through [`PortCounters`].

use std::sync::atomic::Ordering;
use std::sync::Arc;

use dataplane::net::af_xdp::{XskConfig, XskSocket};
use dataplane::net::classify::PortSet;
use dataplane::net::packet_socket::PacketSocket;
use dataplane::net::poller::{QueuePoller, QueueStats};
use dataplane::net::port::PortSpec;
use dataplane::net::{Backend, PacketIo};
use dataplane::reactor::{Command, ReactorLink};

/// One packet queue's counters, with where it lives.
#[derive(Debug, Clone)]
pub struct QueueCounters {
    pub iface: String,
    pub queue: u32,
    pub backend: Backend,
    pub stats: Arc<QueueStats>,
}

/// Everything the control socket and the metrics endpoint read about the ports: cheap to clone,
/// readable from any thread while the ports run.
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
    pub steering: Vec<(String, ebpf::Counters)>,
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

/// Packet queues started, kept alive while stratad runs.
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
) -> Result<(), String> {
    let link = &links[q as usize % links.len()];
    let backend = io.backend();
    let stats = Arc::new(QueueStats::default());
    // Frames are counted by the poller; no storage protocol consumes them yet.
    let poller = QueuePoller::new(io, Box::new(|_frame: &[u8]| {}), stats.clone());
    link.send(Command::AddPoller(Box::new(poller)))
        .map_err(|e| e.to_string())?;
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
) -> Result<Ports, String> {
    let mut ports = Ports {
        steering: Vec::new(),
        #[cfg(feature = "dpdk")]
        attached: Vec::new(),
        counters: PortCounters::default(),
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
                    hand_to_reactor(&mut ports, links, iface, q, Box::new(xsk))?;
                }
                let reader = steering
                    .counters_reader()
                    .map_err(|e| format!("{iface}: steering counters: {e}"))?;
                ports
                    .counters
                    .steering
                    .push((iface.clone(), Arc::new(reader)));
                ports.steering.push((iface.clone(), steering));
            }
            Backend::Socket => {
                let filter = PortSet::new(&spec.steer).map_err(|e| format!("{iface}: {e}"))?;
                let sock = PacketSocket::new(iface, Some(filter))
                    .map_err(|e| format!("{iface}: packet socket: {e}"))?;
                hand_to_reactor(&mut ports, links, iface, 0, Box::new(sock))?;
            }
            #[cfg(feature = "dpdk")]
            Backend::Dpdk => dpdk::start(&mut ports, spec, links, dpdk_eal)?,
            #[cfg(not(feature = "dpdk"))]
            Backend::Dpdk => {
                let _ = dpdk_eal;
                return Err(format!(
                    "{iface}: backend=dpdk needs a stratad built with the `dpdk` feature \
                     (cargo build --release -p stratad --features dpdk; needs libdpdk-dev)"
                ));
            }
        }
    }
    Ok(ports)
}

/// Removes DPDK's runtime directory of this process (made for the `--file-prefix` stratad
/// adds; DPDK leaves it behind) when dropped: hold it across everything that may use DPDK,
/// so that the directory goes on error returns too. A no-op without the `dpdk` feature or when
/// no DPDK port ran.
#[derive(Debug)]
pub struct DpdkRuntimeDir {
    #[cfg(feature = "dpdk")]
    _guard: dataplane::net::dpdk::RuntimeDirGuard,
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
            _guard: dataplane::net::dpdk::RuntimeDirGuard::new(&dpdk::own_prefix()),
        }
    }
}

#[cfg(feature = "dpdk")]
mod dpdk {
    use std::io::Write;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::sync::Arc;

    use dataplane::net::dpdk::{first_allowed_cpu, init_eal, DpdkPort};
    use dataplane::net::port::PortSpec;
    use dataplane::reactor::ReactorLink;

    use super::{hand_to_reactor, Ports};

    /// EAL arguments when `--dpdk-eal` is not given: no hugepages and no PCI scan (virtual
    /// devices and `net_af_xdp` need neither), errors only; `-l CPU` with the first CPU of
    /// stratad's affinity is added ([`default_eal`]): one lcore, the reactors are not EAL
    /// lcores (they register with DPDK as non-EAL threads at their first burst).
    pub const DEFAULT_EAL: &str = "--no-huge -m 256 --no-pci --log-level=error";

    /// [`DEFAULT_EAL`] with `-l` the first CPU stratad may run on (`-l 0` fails when CPU 0
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

    /// The `--file-prefix` stratad adds.
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
            let fd =
                unsafe { libc::memfd_create(c"stratad-steer.bpf.o".as_ptr(), libc::MFD_CLOEXEC) };
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

    pub fn start(
        ports: &mut Ports,
        spec: &PortSpec,
        links: &[ReactorLink],
        user_eal: Option<&str>,
    ) -> Result<(), String> {
        let iface = &spec.iface;
        let args = eal_args(user_eal);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        init_eal(&refs).map_err(|e| format!("{iface}: DPDK EAL: {e}"))?;
        let queues = u16::try_from(spec.queues).map_err(|_| format!("{iface}: too many queues"))?;
        let handles = if iface.starts_with(VDEV_PREFIX) {
            // Created by --dpdk-eal's --vdev, or hot-plugged here with default arguments.
            match DpdkPort::open_queues(iface, queues) {
                Ok(h) => h,
                Err(dataplane::net::dpdk::DpdkError::NoPort(_)) => DpdkPort::attach(iface, queues)
                    .map_err(|e| format!("{iface}: DPDK device: {e}"))?,
                Err(e) => return Err(format!("{iface}: DPDK device: {e}")),
            }
        } else {
            // The PMD attaches with XDP_FLAGS_UPDATE_IF_NOEXIST: a program left attached by a
            // SIGKILLed stratad (netlink attachments outlive their loader) would make every
            // later start fail. Ours is detached; anyone else's is an error naming it.
            match ebpf::detach_stale_steering(iface) {
                Ok(None) => {}
                Ok(Some(id)) => tracing::warn!(%iface, prog = id,
                    "detached a steering program left attached (by a killed stratad?)"),
                Err(e) => return Err(format!("{iface}: {e}")),
            }
            // Kept open until the PMD has loaded it (in attach).
            let obj = MemObject::new(ebpf::steer_object())
                .map_err(|e| format!("{iface}: the XDP object's memory file: {e}"))?;
            // busy_budget=0: the reactor polls; preferred busy polling would add a system
            // call to every empty poll.
            let devargs = format!(
                "net_af_xdp_{iface},iface={iface},start_queue=0,queue_count={queues},\
                 xdp_prog={},busy_budget=0",
                obj.path()
            );
            let handles = DpdkPort::attach(&devargs, queues)
                .map_err(|e| format!("{iface}: DPDK net_af_xdp: {e}"))?;
            drop(obj);
            let mut attached = ebpf::AttachedSteering::find(iface)
                .map_err(|e| format!("{iface}: the net_af_xdp PMD's XDP program: {e}"))?;
            for &p in &spec.steer {
                attached
                    .set_port(ebpf::SteerPort::both(p))
                    .map_err(|e| format!("{iface}: steering port {p}: {e}"))?;
            }
            let reader = attached
                .counters_reader()
                .map_err(|e| format!("{iface}: steering counters: {e}"))?;
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
}

/// Ports on a veth pair, as root, both ends in private network namespaces (the host's links and
/// routes are never touched): stratad's side in one, where the whole test body runs (reactor
/// threads inherit it, so DPDK's close, which detaches by interface index from whichever
/// thread drops the last queue, sees the same namespace), the peer in another that sends
/// storage, other and malformed traffic. The counters are read as clients read them: the control socket's `stats`
/// and a `--metrics` scrape.
#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{Ipv4Addr, TcpStream, UdpSocket};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::process::Command;
    use std::time::{Duration, Instant};

    use dataplane::engine::EngineKind;
    use dataplane::net::packet_socket::PacketSocket;
    use dataplane::net::port::parse_port_spec;
    use dataplane::server::{Server, ServerConfig};
    use serde_json::Value;

    use super::*;

    /// Datagrams to the steered port, and to another port.
    const STORAGE: u64 = 64;
    const OTHER: u64 = 32;
    /// How long counters may take to settle on a loaded machine.
    const DEADLINE: Duration = Duration::from_secs(10);

    fn ip(args: &[&str]) -> Result<(), String> {
        let out = Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| format!("ip: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// `host` in namespace `host_ns` (stratad's), `peer` in namespace `ns`; both namespaces
    /// (hence the pair) are removed on drop, also when setup or the test fails.
    struct Veth {
        host_ns: String,
        ns: String,
        host: String,
        peer: String,
        host_ip: Ipv4Addr,
    }

    impl Drop for Veth {
        fn drop(&mut self) {
            let _ = ip(&["netns", "del", &self.ns]);
            let _ = ip(&["netns", "del", &self.host_ns]);
        }
    }

    impl Veth {
        /// None (with a SKIP message; a failure in CI) when not root.
        fn new(tag: char) -> Option<Self> {
            if !dataplane::test_gate::require_root(
                &format!("veth {tag}"),
                "network namespaces, XDP",
            ) {
                return None;
            }
            let id = std::process::id() % 100_000;
            // Private namespaces: any subnet will do.
            let v = Veth {
                host_ns: format!("stratad-h{tag}{id}"),
                ns: format!("stratad-{tag}{id}"),
                host: format!("sd{tag}{id}"),
                peer: format!("sp{tag}{id}"),
                host_ip: Ipv4Addr::new(10, 77, 0, 1),
            };
            let _ = ip(&["netns", "del", &v.ns]);
            let _ = ip(&["netns", "del", &v.host_ns]);
            let peer_ip = "10.77.0.2/24";
            let host_ip = format!("{}/24", v.host_ip);
            let (hns, ns, host, peer) = (
                v.host_ns.as_str(),
                v.ns.as_str(),
                v.host.as_str(),
                v.peer.as_str(),
            );
            let steps: [&[&str]; 9] = [
                &["netns", "add", hns],
                &["netns", "add", ns],
                // Created inside stratad's namespace, peer moved out: no step in the root one.
                &[
                    "-n", hns, "link", "add", host, "type", "veth", "peer", "name", peer,
                ],
                &["-n", hns, "link", "set", peer, "netns", ns],
                &["-n", hns, "addr", "add", &host_ip, "dev", host],
                &["-n", hns, "link", "set", host, "up"],
                // The metrics endpoint listens on 127.0.0.1 there.
                &["-n", hns, "link", "set", "lo", "up"],
                &["-n", ns, "addr", "add", peer_ip, "dev", peer],
                &["-n", ns, "link", "set", peer, "up"],
            ];
            for s in steps {
                ip(s).expect("veth setup");
            }
            Some(v)
        }

        /// Runs `f` on a thread inside namespace `ns` (threads it spawns inherit it).
        fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
            let path = format!("/run/netns/{ns}");
            std::thread::scope(|s| {
                s.spawn(move || {
                    let ns = std::fs::File::open(&path).expect("open namespace");
                    // SAFETY: `ns` is an open namespace file; setns changes only this thread.
                    let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
                    f()
                })
                .join()
                // Re-raised here, so the Veth guard of the caller still runs.
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
            })
        }

        /// Call in the host namespace.
        fn xdp_attached(&self) -> bool {
            let ifindex = ebpf::sys::if_index(&self.host).expect("ifindex");
            ebpf::sys::xdp_prog_id(ifindex).expect("query").is_some()
        }
    }

    /// Removes a file on drop (the control socket, also when the test fails).
    struct RemoveOnDrop(std::path::PathBuf);

    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn rpc_stats(sock: &std::path::Path) -> Value {
        let mut s = UnixStream::connect(sock).expect("control socket");
        writeln!(s, r#"{{"jsonrpc":"2.0","id":1,"method":"stratad_stats"}}"#).expect("send");
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).expect("read");
        serde_json::from_str::<Value>(&line).expect("json")["result"].clone()
    }

    fn scrape(addr: std::net::SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).expect("connect");
        write!(s, "GET /metrics HTTP/1.0\r\n\r\n").expect("send");
        let mut resp = String::new();
        s.read_to_string(&mut resp).expect("read");
        resp
    }

    fn server() -> Server {
        Server::new(&ServerConfig {
            cpus: vec![None],
            engine: EngineKind::Sync,
        })
        .expect("reactors")
    }

    /// In the host namespace: starts `--port iface=HOST,backend=BACKEND,steer=4420` on `v`,
    /// sends STORAGE datagrams to 4420, OTHER to 9999 (a kernel socket here), one truncated
    /// IPv4 frame and a ping from the peer, and checks `stats`, the metrics and the detach.
    fn storage_and_other_traffic_counted(v: &Veth, backend: &str) {
        Veth::in_ns(&v.host_ns, || traffic_counted_in_host_ns(v, backend));
    }

    fn traffic_counted_in_host_ns(v: &Veth, backend: &str) {
        let mut server = server();
        let spec = parse_port_spec(&format!("iface={},backend={backend},steer=4420", v.host))
            .expect("spec");
        let ports = start(&[spec], &server.reactor_links(), None).expect("start the port");
        let dir = std::env::temp_dir();
        let sock = RemoveOnDrop(dir.join(format!(
            "stratad-ports-{backend}-{}.sock",
            std::process::id()
        )));
        let sock = &sock.0;
        crate::control::spawn(
            sock,
            crate::control::Control {
                stats: server.stats_handle(),
                datastore: None,
                ports: ports.counters.clone(),
                shares: Vec::new(),
            },
            dataplane::server::SocketAccess::default(),
        )
        .expect("control socket");
        let metrics =
            crate::metrics::spawn("127.0.0.1:0", server.stats_handle(), ports.counters.clone())
                .expect("metrics");
        let kernel = UdpSocket::bind((v.host_ip, 9999)).expect("kernel socket");
        kernel
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let (host_ip, peer) = (v.host_ip, v.peer.clone());
        Veth::in_ns(&v.ns, move || {
            let udp = UdpSocket::bind("0.0.0.0:0").expect("bind");
            for i in 0..STORAGE.max(OTHER) {
                if i < STORAGE {
                    udp.send_to(b"storage", (host_ip, 4420)).expect("send");
                }
                if i < OTHER {
                    udp.send_to(b"other", (host_ip, 9999)).expect("send");
                }
                if i % 16 == 15 {
                    // Paced so that no ring or socket buffer drops on a loaded machine.
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            // Ethernet + 6 bytes of an IPv4 header: malformed for the program.
            let mut frame = [0u8; 20];
            frame[..6].copy_from_slice(&[0xff; 6]);
            frame[6..12].copy_from_slice(&[2, 0x5c, 0, 0, 0, 1]);
            frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
            let mut ps = PacketSocket::new(&peer, None).expect("packet socket");
            assert_eq!(ps.tx_burst(&[&frame]).expect("send"), 1);
        });
        let ping = Command::new("ip")
            .args(["netns", "exec", &v.ns, "ping", "-c", "1", "-W", "2"])
            .arg(v.host_ip.to_string())
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(ping, "ping through the steered port");
        let mut buf = [0u8; 64];
        let mut other = 0;
        while other < OTHER && kernel.recv(&mut buf).is_ok() {
            other += 1;
        }
        assert_eq!(other, OTHER, "other datagrams at the kernel socket");

        let deadline = Instant::now() + DEADLINE;
        let st = loop {
            let st = rpc_stats(sock);
            let q = st["packet_queues"][0]["rx_frames"].as_u64().unwrap_or(0);
            let s = st["steering"][0]["steered"].as_u64().unwrap_or(0);
            if (q >= STORAGE && s >= STORAGE) || Instant::now() > deadline {
                break st;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let q = &st["packet_queues"];
        assert_eq!(q.as_array().map(Vec::len), Some(1), "{st}");
        assert_eq!(q[0]["iface"], v.host.as_str());
        assert_eq!(q[0]["queue"], 0);
        assert_eq!(q[0]["backend"], backend);
        assert_eq!(
            q[0]["rx_frames"], STORAGE,
            "frames at stratad's queue: {st}"
        );
        assert_eq!(q[0]["errors"], 0);
        let s = &st["steering"];
        assert_eq!(s.as_array().map(Vec::len), Some(1), "{st}");
        assert_eq!(s[0]["iface"], v.host.as_str());
        assert_eq!(s[0]["steered"], STORAGE, "{st}");
        assert_eq!(s[0]["malformed"], 1, "{st}");
        assert_eq!(s[0]["unbound"], 0, "{st}");
        // The 9999 datagrams, ARP and the echo request at least.
        let passed = s[0]["passed"].as_u64().unwrap_or(0);
        assert!(passed > OTHER + 1, "{st}");

        let text = scrape(metrics);
        let h = &v.host;
        for line in [
            format!(
                "strata_packet_queue_rx_frames_total{{iface=\"{h}\",queue=\"0\",backend=\"{backend}\"}} {STORAGE}\n"
            ),
            format!("strata_xdp_steered_total{{iface=\"{h}\"}} {STORAGE}\n"),
            format!("strata_xdp_malformed_total{{iface=\"{h}\"}} 1\n"),
            format!("strata_xdp_unbound_total{{iface=\"{h}\"}} 0\n"),
            // Still growing (ARP, IPv6 neighbour discovery): only its presence.
            format!("strata_xdp_passed_total{{iface=\"{h}\"}} "),
        ] {
            assert!(text.contains(&line), "missing {line:?} in\n{text}");
        }

        // Stopping the reactors drops the queues (closing a DPDK port detaches its program);
        // dropping the ports detaches the af_xdp program.
        server.shutdown();
        drop(server);
        assert_eq!(ports.steering_counters()[0].1[0], STORAGE, "final counters");
        drop(ports);
        assert!(!v.xdp_attached(), "XDP program left on {}", v.host);
    }

    #[test]
    fn af_xdp_port_counters_in_stats_and_metrics() {
        if let Some(v) = Veth::new('x') {
            storage_and_other_traffic_counted(&v, "af_xdp");
        }
    }

    #[cfg(not(feature = "dpdk"))]
    #[test]
    fn dpdk_backend_needs_the_feature() {
        let server = server();
        let spec = parse_port_spec("iface=net_ring0,backend=dpdk").expect("spec");
        let err = start(&[spec], &server.reactor_links(), None).expect_err("refused");
        assert!(err.contains("`dpdk` feature"), "{err}");
    }

    /// DPDK tests share the process's one EAL; run one at a time. Its runtime directory is
    /// removed when the test binary exits.
    #[cfg(feature = "dpdk")]
    static DPDK: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[cfg(feature = "dpdk")]
    fn dpdk_serial() -> std::sync::MutexGuard<'static, ()> {
        dataplane::net::dpdk::remove_runtime_dir_at_exit(&dpdk::own_prefix());
        DPDK.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    #[cfg(feature = "dpdk")]
    #[test]
    fn dpdk_net_af_xdp_port_counters_in_stats_and_metrics() {
        let _one = dpdk_serial();
        if let Some(v) = Veth::new('d') {
            storage_and_other_traffic_counted(&v, "dpdk");
        }
    }

    /// DPDK needs root here; says SKIP otherwise (a failure in CI).
    #[cfg(feature = "dpdk")]
    fn dpdk_root() -> bool {
        dataplane::test_gate::require_root("dpdk", "DPDK")
    }

    #[cfg(feature = "dpdk")]
    #[test]
    fn dpdk_virtual_device_port_keeps_its_reactor_polling() {
        let _one = dpdk_serial();
        if !dpdk_root() {
            return;
        }
        let server = server();
        let spec = parse_port_spec("iface=net_null_sd0,backend=dpdk,queues=2").expect("spec");
        let ports = start(&[spec], &server.reactor_links(), None).expect("start net_null");
        assert!(ports.counters.steering.is_empty(), "no steering on a vdev");
        let frames = |ports: &Ports| -> Vec<u64> {
            ports
                .counters
                .snapshot()
                .queues
                .iter()
                .map(|q| q.3)
                .collect()
        };
        let deadline = Instant::now() + DEADLINE;
        while frames(&ports).contains(&0) {
            assert!(Instant::now() < deadline, "net_null frames not polled");
            std::thread::sleep(Duration::from_millis(10));
        }
        // A poll-only queue: the reactor no longer sleeps.
        let sleeps = || server.stats().reactors[0].1.sleeps;
        let before = sleeps();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(sleeps(), before, "reactor slept with a DPDK queue");
        let snap = ports.counters.snapshot();
        assert_eq!(snap.queues.len(), 2);
        assert!(snap.queues.iter().all(|q| q.2 == "dpdk" && q.5 == 0));
        drop(server);
        drop(ports);
    }

    #[cfg(feature = "dpdk")]
    #[test]
    fn dpdk_port_given_twice_is_refused_and_keeps_serving() {
        let _one = dpdk_serial();
        if !dpdk_root() {
            return;
        }
        let server = server();
        let spec = parse_port_spec("iface=net_null_sd1,backend=dpdk").expect("spec");
        let ports =
            start(std::slice::from_ref(&spec), &server.reactor_links(), None).expect("first");
        let err = start(&[spec], &server.reactor_links(), None).expect_err("same port again");
        assert!(err.contains("already in use"), "{err}");
        // The first one still runs.
        let frames = || ports.counters.snapshot().queues[0].3;
        let before = frames();
        let deadline = Instant::now() + DEADLINE;
        while frames() == before {
            assert!(Instant::now() < deadline, "the first port stopped");
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(server);
        drop(ports);
    }
}
