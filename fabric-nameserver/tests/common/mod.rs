//! Test helpers: a raw iSNSP client, in-process and subprocess servers.
// Test code: helpers panic on failure like the tests that use them.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fabric_nameserver::server::{start, Config, ServerHandle};
use fabric_nameserver::wire::{
    func, parse_tlvs, split_pdus, tag, Header, Tlv, TlvWriter, FLAG_CLIENT, FLAG_FIRST_PDU,
    FLAG_LAST_PDU, HEADER_LEN,
};

/// A reply: status, attributes, and how it was framed.
#[derive(Debug)]
pub struct Reply {
    pub function: u16,
    pub status: u32,
    pub tlvs: Vec<Tlv>,
    pub pdus: usize,
    pub max_pdu_bytes: usize,
}

impl Reply {
    pub fn strings(&self, t: u32) -> Vec<String> {
        self.tlvs
            .iter()
            .filter(|x| x.tag == t && !x.is_nil())
            .map(|x| x.as_string().unwrap())
            .collect()
    }
}

pub struct Client {
    pub s: TcpStream,
    xid: u16,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Client { s, xid: 0 }
    }

    /// Connects from a chosen local address (e.g. 127.0.0.2: another host, as far as the
    /// server can tell).
    pub fn connect_from(addr: SocketAddr, local: std::net::Ipv4Addr) -> Client {
        use std::os::fd::FromRawFd;
        let SocketAddr::V4(v4) = addr else {
            panic!("IPv4 only")
        };
        let sin = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(ip).to_be(),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: plain socket calls on a descriptor created here, with sockaddr_in values
        // that live across each call; the descriptor is handed to TcpStream, which owns it.
        let s = unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0);
            let a = sin(local, 0);
            assert_eq!(
                libc::bind(fd, (&a as *const libc::sockaddr_in).cast(), len),
                0
            );
            let b = sin(*v4.ip(), v4.port());
            assert_eq!(
                libc::connect(fd, (&b as *const libc::sockaddr_in).cast(), len),
                0
            );
            TcpStream::from_raw_fd(fd)
        };
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Client { s, xid: 0 }
    }

    pub fn send(&mut self, function: u16, flags: u16, w: &TlvWriter) -> u16 {
        self.xid = self.xid.wrapping_add(1);
        let bytes = split_pdus(function, FLAG_CLIENT | flags, self.xid, w, 65532);
        self.s.write_all(&bytes).unwrap();
        self.xid
    }

    pub fn call(&mut self, function: u16, flags: u16, w: &TlvWriter) -> Reply {
        let xid = self.send(function, flags, w);
        let r = self.read_reply();
        assert_eq!(r.function, function | 0x8000);
        let _ = xid;
        r
    }

    pub fn read_reply(&mut self) -> Reply {
        self.try_read_reply()
            .expect("connection closed before the reply")
    }

    /// The next reply, or None if the connection ends first.
    pub fn try_read_reply(&mut self) -> Option<Reply> {
        // Replies may exceed the server's request limit (Reassembler), so PDUs are joined
        // here, checking order.
        let mut payload = Vec::new();
        let mut pdus = 0u16;
        let mut max = 0;
        loop {
            let mut hb = [0u8; HEADER_LEN];
            self.s.read_exact(&mut hb).ok()?;
            let h = Header::decode(&hb);
            let mut p = vec![0u8; h.length as usize];
            self.s.read_exact(&mut p).ok()?;
            assert_eq!(h.seq, pdus, "reply PDUs in order");
            assert_eq!(h.flags & FLAG_FIRST_PDU != 0, pdus == 0);
            pdus += 1;
            max = max.max(p.len() + HEADER_LEN);
            payload.extend_from_slice(&p);
            if h.flags & FLAG_LAST_PDU != 0 {
                let status = u32::from_be_bytes(payload[..4].try_into().unwrap());
                return Some(Reply {
                    function: h.function,
                    status,
                    tlvs: parse_reply_tlvs(&payload[4..]),
                    pdus: usize::from(pdus),
                    max_pdu_bytes: max,
                });
            }
        }
    }
}

/// TLVs of a reply: like `wire::parse_tlvs` but without the request-side count limit
/// (a 100 000-node reply has 200 000 attributes).
fn parse_reply_tlvs(mut b: &[u8]) -> Vec<Tlv> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let len = u32::from_be_bytes(b[4..8].try_into().unwrap()) as usize;
        out.extend(parse_tlvs(&b[..8 + len]).unwrap());
        b = &b[8 + len..];
    }
    out
}

/// A DevAttrReg of one entity with one portal and the given nodes (name, type).
pub fn registration(
    source: &str,
    eid: &str,
    portal_port: u32,
    scn_port: Option<u16>,
    nodes: &[(&str, u32)],
) -> TlvWriter {
    let mut w = TlvWriter::new();
    w.string(tag::ISCSI_NAME, source);
    w.string(tag::EID, eid);
    w.delimiter();
    w.string(tag::EID, eid);
    w.u32(tag::ENTITY_PROTOCOL, 2);
    w.ip(tag::PORTAL_IP, &"::ffff:127.0.0.1".parse().unwrap());
    w.u32(tag::PORTAL_PORT, portal_port);
    if let Some(p) = scn_port {
        w.u32(tag::SCN_PORT, u32::from(p));
    }
    for (n, t) in nodes {
        w.string(tag::ISCSI_NAME, n);
        w.u32(tag::ISCSI_NODE_TYPE, *t);
    }
    w
}

/// DevAttrQry for all nodes of a type (the "all targets" query), returning names and types.
pub fn query_type(source: &str, node_type: u32) -> TlvWriter {
    let mut w = TlvWriter::new();
    w.string(tag::ISCSI_NAME, source);
    w.u32(tag::ISCSI_NODE_TYPE, node_type);
    w.delimiter();
    w.nil(tag::ISCSI_NAME);
    w.nil(tag::ISCSI_NODE_TYPE);
    w
}

pub fn query_name(source: &str, name: &str) -> TlvWriter {
    let mut w = TlvWriter::new();
    w.string(tag::ISCSI_NAME, source);
    w.string(tag::ISCSI_NAME, name);
    w.delimiter();
    w.nil(tag::ISCSI_NODE_TYPE);
    w
}

pub fn start_server(dir: &Path) -> ServerHandle {
    start(Config::new("127.0.0.1:0".parse().unwrap(), dir.to_owned())).unwrap()
}

/// The control node the tests' administrator acts as (DD changes over iSNSP).
pub const ADMIN: &str = "iqn.2024-01.test:admin";

/// A server where [`ADMIN`] is an authorized control node.
pub fn start_server_with_admin(dir: &Path) -> ServerHandle {
    let mut cfg = Config::new("127.0.0.1:0".parse().unwrap(), dir.to_owned());
    cfg.control_nodes.insert(ADMIN.to_owned(), None);
    start(cfg).unwrap()
}

/// Names visible to `source` through DevAttrQry on node type `t`.
pub fn visible(c: &mut Client, source: &str, t: u32) -> Vec<String> {
    let r = c.call(func::DEV_ATTR_QRY, 0, &query_type(source, t));
    assert_eq!(r.status, 0);
    let mut v = r.strings(tag::ISCSI_NAME);
    v.sort();
    v
}

/// A `strata-nameserver` child process on an ephemeral port.
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
    pub data: PathBuf,
}

impl Proc {
    pub fn spawn(data: &Path) -> Proc {
        Self::spawn_with(data, &[])
    }

    /// With extra command-line arguments (e.g. `--control-node NAME`).
    pub fn spawn_with(data: &Path, extra: &[&str]) -> Proc {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_strata-nameserver"))
            .args(["--listen", &addr.to_string(), "--data"])
            .arg(data)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        // The control socket comes up separately (after the listener, replacing the one a
        // killed predecessor left behind): wait until it accepts too.
        let control = data.join("control.sock");
        while std::os::unix::net::UnixStream::connect(&control).is_err() {
            assert!(Instant::now() < deadline, "control socket did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        Proc {
            child,
            addr,
            data: data.to_owned(),
        }
    }

    pub fn control(&self) -> PathBuf {
        self.data.join("control.sock")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP port free at the time of the call (bind to 0, read, release).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One JSON-RPC call on a control socket.
pub fn rpc(path: &Path, method: &str, params: serde_json::Value) -> serde_json::Value {
    use std::io::BufRead;
    let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
    let req = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    writeln!(s, "{req}").unwrap();
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

/// Panics with a helpful message when a client tool is missing.
pub fn require_tool(name: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{name} not found: run `bash tools/install-deps.sh` (or tools/test.sh) first"
    );
}
