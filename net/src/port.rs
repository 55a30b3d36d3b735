//! One packet port as stratad describes it ([`PortSpec`], built by stratad's `--port`
//! parser from `iface=NAME[,queues=N][,backend=af_xdp|dpdk|socket][,steer=3260,4420]`), and
//! its bounds.

use crate::Backend;

/// Queues a port can have (the XDP socket map's size).
pub const MAX_PORT_QUEUES: u32 = 64;
/// Longest interface name (IFNAMSIZ minus the NUL).
pub const MAX_IFACE_LEN: usize = 15;
/// Storage ports steered when `steer` is not given: iSCSI and NVMe/TCP.
pub const DEFAULT_STEER: [u16; 2] = [3260, 4420];

/// One `--port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    pub iface: String,
    pub queues: u32,
    pub backend: Backend,
    pub steer: Vec<u16>,
}

impl PortSpec {
    /// `queues` queues of `backend` on `iface`, steering the default storage ports
    /// ([`DEFAULT_STEER`]): what a spec naming only those keys gives.
    pub fn new(iface: &str, backend: Backend, queues: u32) -> PortSpec {
        PortSpec {
            iface: iface.to_string(),
            queues,
            backend,
            steer: DEFAULT_STEER.to_vec(),
        }
    }
}
