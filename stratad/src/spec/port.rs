//! `--port`: what it accepts ([`PortArgs`]) and its conversion into the packet path's
//! [`PortSpec`].
//!
//! `iface=NAME[,queues=N][,backend=af_xdp|dpdk|socket][,steer=3260,4420]`
//!
//! `steer` is a list, so bare numbers after `steer=` extend it (see [`super::keyvalue`]):
//! `iface=eth0,steer=3260,4420,queues=2` steers 3260 and 4420 on two queues.

use net::classify::MAX_STEER_PORTS;
use net::port::{PortSpec, DEFAULT_STEER, MAX_IFACE_LEN, MAX_PORT_QUEUES};
use net::Backend;
use serde::Deserialize;

use super::{keyvalue, SpecError};

/// Which implementation moves a port's frames (the `backend` key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PortBackend {
    /// XDP steering into AF_XDP sockets (the default).
    AfXdp,
    /// A DPDK port.
    Dpdk,
    /// A kernel packet socket.
    Socket,
}

/// The keys of `--port` (and of a port in JSON), as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PortArgs {
    /// Interface (or DPDK virtual device) name.
    pub iface: String,
    /// Packet queues.
    pub queues: Option<u32>,
    /// Implementation.
    pub backend: Option<PortBackend>,
    /// TCP/UDP ports steered to stratad.
    pub steer: Option<Vec<u16>>,
}

/// Parses one `--port` value.
pub fn parse_port_spec(s: &str) -> Result<PortSpec, SpecError> {
    PortSpec::try_from(keyvalue::from_str::<PortArgs>(s)?)
}

impl TryFrom<PortArgs> for PortSpec {
    type Error = SpecError;

    fn try_from(a: PortArgs) -> Result<PortSpec, SpecError> {
        let iface = a.iface;
        if iface.is_empty()
            || iface.len() > MAX_IFACE_LEN
            || iface.contains('/')
            || iface.chars().any(char::is_whitespace)
        {
            return Err(SpecError::bad(
                "iface",
                &iface,
                format!("1 to {MAX_IFACE_LEN} bytes, no '/' or whitespace"),
            ));
        }
        let queues = match a.queues {
            None => 1,
            Some(q) if (1..=MAX_PORT_QUEUES).contains(&q) => q,
            Some(q) => {
                return Err(SpecError::bad(
                    "queues",
                    q,
                    format!("expected 1 to {MAX_PORT_QUEUES}"),
                ))
            }
        };
        let mut steer = a.steer.unwrap_or_else(|| DEFAULT_STEER.to_vec());
        let list = || {
            steer
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        if steer.len() > MAX_STEER_PORTS {
            return Err(SpecError::bad(
                "steer",
                list(),
                format!("at most {MAX_STEER_PORTS} ports"),
            ));
        }
        if steer.contains(&0) {
            return Err(SpecError::bad("steer", list(), "ports are 1 to 65535"));
        }
        steer.sort_unstable();
        steer.dedup();
        Ok(PortSpec {
            iface,
            queues,
            backend: match a.backend.unwrap_or(PortBackend::AfXdp) {
                PortBackend::AfXdp => Backend::AfXdp,
                PortBackend::Dpdk => Backend::Dpdk,
                PortBackend::Socket => Backend::Socket,
            },
            steer,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The key=value form of `p`, every key written out.
    fn format(p: &PortSpec) -> String {
        let backend = match p.backend {
            Backend::AfXdp => "af_xdp",
            Backend::Dpdk => "dpdk",
            Backend::Socket => "socket",
        };
        let steer: Vec<String> = p.steer.iter().map(u16::to_string).collect();
        format!(
            "iface={},steer={},queues={},backend={backend}",
            keyvalue::escape(&p.iface),
            steer.join(","),
            p.queues
        )
    }

    #[test]
    fn defaults_and_lists() {
        let p = parse_port_spec("iface=eth0").unwrap();
        assert_eq!(
            p,
            PortSpec {
                iface: "eth0".into(),
                queues: 1,
                backend: Backend::AfXdp,
                steer: vec![3260, 4420]
            }
        );
        let p = parse_port_spec("iface=vB,steer=4420,9000,3260,queues=4,backend=socket").unwrap();
        assert_eq!(p.steer, vec![3260, 4420, 9000]);
        assert_eq!(p.queues, 4);
        assert_eq!(p.backend, Backend::Socket);
        let p = parse_port_spec("iface=net_ring0,backend=dpdk,steer=4420,4420").unwrap();
        assert_eq!((p.backend, p.steer), (Backend::Dpdk, vec![4420]));
    }

    #[test]
    fn errors() {
        let bad_key = |s: &str| match parse_port_spec(s) {
            Err(SpecError::BadValue { key, .. }) => key,
            other => panic!("{s}: {other:?}"),
        };
        assert_eq!(
            parse_port_spec("queues=2"),
            Err(SpecError::Missing("iface".into()))
        );
        assert_eq!(bad_key("iface=a,queues=0"), "queues");
        assert_eq!(bad_key("iface=a,queues=65"), "queues");
        assert_eq!(bad_key("iface=a,steer=0"), "steer");
        assert_eq!(bad_key("iface=a,steer=65536"), "steer");
        assert_eq!(bad_key("iface=a,4420"), "iface");
        assert_eq!(bad_key("iface=abcdefghijklmnop"), "iface");
        assert_eq!(bad_key("iface=a/b"), "iface");
        assert_eq!(bad_key("iface=a,backend=x"), "backend");
        assert_eq!(
            parse_port_spec("iface=a,iface=b"),
            Err(SpecError::Duplicate("iface".into()))
        );
        assert_eq!(
            parse_port_spec("4420,iface=a"),
            Err(SpecError::NotKeyValue("4420".into()))
        );
        assert_eq!(
            parse_port_spec("iface=a,mtu=9000"),
            Err(SpecError::UnknownKey("mtu".into()))
        );
        let many: Vec<String> = (1..=17).map(|p| p.to_string()).collect();
        assert_eq!(
            bad_key(&format!("iface=a,steer={}", many.join(","))),
            "steer"
        );
    }

    #[test]
    fn json_gives_the_same_spec() {
        let a: PortArgs =
            keyvalue::from_str("iface=eth0,steer=3260,4420,queues=2,backend=socket").unwrap();
        let b: PortArgs = keyvalue::from_json(serde_json::json!({
            "iface": "eth0", "steer": [3260, 4420], "queues": 2, "backend": "socket"
        }))
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(
            PortSpec::try_from(a).unwrap(),
            PortSpec::try_from(b).unwrap()
        );
    }

    fn arb_port() -> impl Strategy<Value = PortSpec> {
        (
            "[a-z][a-z0-9_.,-]{0,14}",
            1..=MAX_PORT_QUEUES,
            prop_oneof![
                Just(Backend::AfXdp),
                Just(Backend::Dpdk),
                Just(Backend::Socket)
            ],
            proptest::collection::btree_set(1u16.., 1..=MAX_STEER_PORTS),
        )
            .prop_map(|(iface, queues, backend, steer)| PortSpec {
                iface,
                queues,
                backend,
                steer: steer.into_iter().collect(),
            })
    }

    proptest! {
        #[test]
        fn never_panics(s in "[a-z0-9=,_]{0,80}") {
            let _ = parse_port_spec(&s);
        }

        #[test]
        fn hostile_strings_never_panic(s in ".{0,120}") {
            let _ = parse_port_spec(&s);
        }

        #[test]
        fn formatted_specs_parse_back(p in arb_port()) {
            prop_assert_eq!(parse_port_spec(&format(&p)).unwrap(), p);
        }
    }
}
