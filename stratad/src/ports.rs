//! `--port` wiring: stratad starts its packet ports with the `net` crate (`net::ports`:
//! steering programs, AF_XDP and packet sockets, the DPDK EAL and hot-plugged devices) and
//! reads their counters for the control socket's `stats` and the `--metrics` endpoint
//! ([`PortCounters`], [`PortsSnapshot`]).
//!
//! The packet path is optional (cargo feature `packet`, on by default): a build without it
//! has neither the `net` nor the `ebpf` crate (so needs no clang, libbpf or DPDK), refuses
//! `--port` saying so, and reports no packet queues or steering counters.

#[cfg(feature = "packet")]
pub use with_packet::*;
#[cfg(not(feature = "packet"))]
pub use without_packet::*;

#[cfg(feature = "packet")]
mod with_packet {
    pub use crate::spec::parse_port_spec;
    use dataplane::reactor::ReactorLink;
    use net::port::PortSpec;
    pub use net::ports::{DpdkRuntimeDir, PortCounters, Ports, PortsSnapshot, SteeringCounters};

    /// Starts every port's queues on the reactors behind `links` ([`net::ports::start`]);
    /// `dpdk_eal` is `--dpdk-eal`.
    pub fn start(
        specs: &[PortSpec],
        links: &[ReactorLink],
        dpdk_eal: Option<&str>,
    ) -> Result<Ports, String> {
        net::ports::start(specs, links, dpdk_eal).map_err(|e| e.to_string())
    }
}

/// The same names as with the packet path, for a build without it: no port can be specified,
/// so every view is empty.
#[cfg(not(feature = "packet"))]
mod without_packet {
    use dataplane::reactor::ReactorLink;

    /// `--port` given to a build without the packet path.
    #[derive(Debug, thiserror::Error)]
    #[error(
        "stratad was built without the packet feature (cargo build -p stratad --features packet)"
    )]
    pub struct NoPacketFeature;

    /// A `--port` specification: none exists in this build.
    #[derive(Debug)]
    pub enum PortSpec {}

    /// Refuses every `--port`.
    pub fn parse_port_spec(_spec: &str) -> Result<PortSpec, NoPacketFeature> {
        Err(NoPacketFeature)
    }

    /// A steering program's counters (the fields of `ebpf::Counters`).
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct SteeringCounters {
        pub steered: u64,
        pub passed: u64,
        pub malformed: u64,
        pub unbound: u64,
    }

    /// What the control socket and the metrics endpoint read: always empty here.
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    pub struct PortsSnapshot {
        /// (interface, queue, backend name, rx frames, rx bytes, receive errors).
        pub queues: Vec<(String, u32, &'static str, u64, u64, u64)>,
        /// (interface, counters).
        pub steering: Vec<(String, SteeringCounters)>,
    }

    /// The ports' counters: always the empty snapshot.
    #[derive(Debug, Clone, Default)]
    pub struct PortCounters {
        empty: PortsSnapshot,
    }

    impl PortCounters {
        pub fn snapshot(&self) -> PortsSnapshot {
            self.empty.clone()
        }
    }

    /// No ports run.
    #[derive(Debug, Default)]
    pub struct Ports {
        pub counters: PortCounters,
    }

    impl Ports {
        pub fn steering_counters(&self) -> Vec<(String, [u64; 4])> {
            Vec::new()
        }
    }

    /// Nothing to start: a [`PortSpec`] cannot exist.
    pub fn start(
        specs: &[PortSpec],
        _links: &[ReactorLink],
        _dpdk_eal: Option<&str>,
    ) -> Result<Ports, String> {
        match specs.first() {
            Some(spec) => match *spec {},
            None => Ok(Ports::default()),
        }
    }

    /// No DPDK runtime directory to remove.
    #[derive(Debug, Default)]
    pub struct DpdkRuntimeDir;

    impl DpdkRuntimeDir {
        pub fn new() -> Self {
            Self
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn port_is_refused_with_the_reason() {
            let err = parse_port_spec("iface=eth0").expect_err("no packet path");
            assert!(
                err.to_string()
                    .contains("stratad was built without the packet feature"),
                "{err}"
            );
            assert_eq!(
                start(&[], &[], None).expect("no ports").steering_counters(),
                []
            );
        }
    }
}
