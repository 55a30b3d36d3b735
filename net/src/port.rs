//! `--port iface=NAME[,queues=N][,backend=af_xdp|dpdk|socket][,steer=3260,4420]`: parsed by
//! a pure function (command-line input is untrusted too).
//!
//! `steer` takes a comma-separated list, so bare numbers after `steer=` extend it:
//! `iface=eth0,steer=3260,4420,queues=2` steers 3260 and 4420 on two queues.

use crate::classify::MAX_STEER_PORTS;
use crate::Backend;

/// Queues a port can have (the XDP socket map's size).
pub const MAX_PORT_QUEUES: u32 = 64;
/// Longest interface name (IFNAMSIZ minus the NUL).
pub const MAX_IFACE_LEN: usize = 15;
/// Storage ports steered when `steer` is not given: iSCSI and NVMe/TCP.
pub const DEFAULT_STEER: [u16; 2] = [3260, 4420];
/// Longest specification accepted.
pub const MAX_SPEC_LEN: usize = 512;

/// One `--port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    pub iface: String,
    pub queues: u32,
    pub backend: Backend,
    pub steer: Vec<u16>,
}

/// What is wrong with a `--port` specification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortSpecError {
    #[error("specification longer than {MAX_SPEC_LEN} bytes")]
    TooLong,
    #[error("missing iface=")]
    MissingIface,
    #[error("interface name {0:?} is empty, too long or has '/' or whitespace")]
    BadIface(String),
    #[error("unknown key {0:?}")]
    UnknownKey(String),
    #[error("{0} given twice")]
    Duplicate(&'static str),
    #[error("queues must be 1..={MAX_PORT_QUEUES}, got {0:?}")]
    BadQueues(String),
    #[error("backend must be af_xdp, dpdk or socket, got {0:?}")]
    BadBackend(String),
    #[error("bad steering port {0:?} (1..=65535)")]
    BadPort(String),
    #[error("at most {MAX_STEER_PORTS} steering ports")]
    TooManyPorts,
}

/// Parses one `--port` value.
pub fn parse_port_spec(s: &str) -> Result<PortSpec, PortSpecError> {
    if s.len() > MAX_SPEC_LEN {
        return Err(PortSpecError::TooLong);
    }
    let mut iface = None;
    let mut queues = None;
    let mut backend = None;
    let mut steer: Option<Vec<u16>> = None;
    let mut in_steer = false;
    let parse_port = |v: &str| match v.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(PortSpecError::BadPort(v.to_owned())),
    };
    for tok in s.split(',') {
        let Some((key, val)) = tok.split_once('=') else {
            // A bare token continues the steer list.
            match (&mut steer, in_steer) {
                (Some(list), true) => {
                    if list.len() >= MAX_STEER_PORTS {
                        return Err(PortSpecError::TooManyPorts);
                    }
                    list.push(parse_port(tok)?);
                    continue;
                }
                _ => return Err(PortSpecError::UnknownKey(tok.to_owned())),
            }
        };
        in_steer = false;
        match key {
            "iface" => {
                if iface.is_some() {
                    return Err(PortSpecError::Duplicate("iface"));
                }
                if val.is_empty()
                    || val.len() > MAX_IFACE_LEN
                    || val.contains('/')
                    || val.chars().any(char::is_whitespace)
                {
                    return Err(PortSpecError::BadIface(val.to_owned()));
                }
                iface = Some(val.to_owned());
            }
            "queues" => {
                if queues.is_some() {
                    return Err(PortSpecError::Duplicate("queues"));
                }
                match val.parse::<u32>() {
                    Ok(q) if (1..=MAX_PORT_QUEUES).contains(&q) => queues = Some(q),
                    _ => return Err(PortSpecError::BadQueues(val.to_owned())),
                }
            }
            "backend" => {
                if backend.is_some() {
                    return Err(PortSpecError::Duplicate("backend"));
                }
                backend = Some(match val {
                    "af_xdp" => Backend::AfXdp,
                    "dpdk" => Backend::Dpdk,
                    "socket" => Backend::Socket,
                    _ => return Err(PortSpecError::BadBackend(val.to_owned())),
                });
            }
            "steer" => {
                if steer.is_some() {
                    return Err(PortSpecError::Duplicate("steer"));
                }
                steer = Some(vec![parse_port(val)?]);
                in_steer = true;
            }
            _ => return Err(PortSpecError::UnknownKey(key.to_owned())),
        }
    }
    let mut steer = steer.unwrap_or_else(|| DEFAULT_STEER.to_vec());
    steer.sort_unstable();
    steer.dedup();
    Ok(PortSpec {
        iface: iface.ok_or(PortSpecError::MissingIface)?,
        queues: queues.unwrap_or(1),
        backend: backend.unwrap_or(Backend::AfXdp),
        steer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
    }

    #[test]
    fn errors() {
        use PortSpecError as E;
        assert_eq!(parse_port_spec("queues=2"), Err(E::MissingIface));
        assert_eq!(
            parse_port_spec("iface=a,queues=0"),
            Err(E::BadQueues("0".into()))
        );
        assert_eq!(
            parse_port_spec("iface=a,queues=65"),
            Err(E::BadQueues("65".into()))
        );
        assert_eq!(
            parse_port_spec("iface=a,steer=0"),
            Err(E::BadPort("0".into()))
        );
        assert_eq!(
            parse_port_spec("iface=a,4420"),
            Err(E::UnknownKey("4420".into()))
        );
        assert_eq!(
            parse_port_spec("iface=a,iface=b"),
            Err(E::Duplicate("iface"))
        );
        assert_eq!(
            parse_port_spec("iface=abcdefghijklmnop"),
            Err(E::BadIface("abcdefghijklmnop".into()))
        );
        assert_eq!(
            parse_port_spec("iface=a,backend=x"),
            Err(E::BadBackend("x".into()))
        );
        let many: Vec<String> = (1..=17).map(|p| p.to_string()).collect();
        assert_eq!(
            parse_port_spec(&format!("iface=a,steer={}", many.join(","))),
            Err(E::TooManyPorts)
        );
    }

    proptest! {
        #[test]
        fn never_panics(s in "[a-z0-9=,_]{0,80}") {
            let _ = parse_port_spec(&s);
        }

        #[test]
        fn round_trips(iface in "[a-z][a-z0-9]{0,14}", q in 1u32..=64,
                       ports in proptest::collection::btree_set(1u16.., 1..16)) {
            let list: Vec<String> = ports.iter().map(u16::to_string).collect();
            let s = format!("iface={iface},steer={},queues={q}", list.join(","));
            let p = parse_port_spec(&s).unwrap();
            prop_assert_eq!(p.iface, iface);
            prop_assert_eq!(p.queues, q);
            prop_assert_eq!(p.steer, ports.into_iter().collect::<Vec<_>>());
        }
    }
}
