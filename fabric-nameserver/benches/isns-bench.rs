//! `isns-bench`: an iSNSP load generator that measures strata-nameserver and open-isns's
//! `isnsd` (file database and in-memory) side by side in one run.
//!
//! Measured per server, each phase on a freshly started server, servers alternating within
//! each phase (strata, isnsd file DB, isnsd in memory, then the next phase):
//! - durable registrations per second (one entity + one target node + one portal per
//!   DevAttrReg, as tgt sends them), over 1 and over N connections, each for `--secs`;
//! - single-name queries per second (DevAttrQry keyed by an iSCSI name, asking for the node
//!   type) at `--small` (1 000) and `--big` (100 000) registered nodes, over 1 and N
//!   connections; the nodes are loaded in bulk (`--bulk` nodes per entity registration);
//! - memory per registered node: the server's RSS after loading `--big` nodes minus its RSS
//!   when empty, divided by the number of nodes.
//!
//! Prints a table with strata/isnsd ratios and the targets and keeps the figures as
//! JSON in `results/isns-bench/isns-bench.json` at the workspace root (`--json FILE` to
//! change it). A benchmark target of the name server's crate (cargo builds the release
//! `strata-nameserver` it starts): `cargo bench -p fabric-nameserver --bench isns-bench [--
//! ARGS]`. Needs `isnsd` (Debian open-isns-server) on PATH. A default run takes about two
//! minutes. `isns_reg_query.py` next to it is the raw one-connection load in Python.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use fabric_nameserver::wire::{
    func, split_pdus, tag, Header, TlvWriter, FLAG_CLIENT, FLAG_LAST_PDU, HEADER_LEN,
};

/// Time allowed for a server to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Read timeout on client sockets: a server that stops answering fails the run.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest reply we accept (single-name queries and registrations answer a few hundred bytes).
const MAX_REPLY_BYTES: usize = 1 << 20;
/// Largest PDU payload we send (isnsd receives PDUs into an 8 KiB buffer).
const MAX_PDU_PAYLOAD: usize = 8180;
/// Most connections (`--connections`).
const MAX_CONNECTIONS: usize = 256;
/// Most nodes per bulk registration: 100 nodes of ~60 bytes fit one 8 KiB PDU.
const MAX_BULK: usize = 100;

/// iSNSP load generator: strata-nameserver vs open-isns isnsd (file DB and in-memory).
#[derive(Debug, Parser)]
#[command(name = "isns-bench")]
struct Cli {
    /// Seconds per rate measurement.
    #[arg(long, default_value_t = 2.0)]
    secs: f64,
    /// Connections of the concurrent measurements.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Registered nodes of the small query measurement.
    #[arg(long, default_value_t = 1000)]
    small: usize,
    /// Registered nodes of the large query measurement (and of the memory measurement).
    #[arg(long, default_value_t = 100_000)]
    big: usize,
    /// Nodes per entity in the bulk loads.
    #[arg(long, default_value_t = 50)]
    bulk: usize,
    /// Give up a bulk load after this many seconds (isnsd's file DB can be slow); the
    /// measurements then run at the nodes loaded so far and say so.
    #[arg(long, default_value_t = 45.0)]
    load_limit_secs: f64,
    /// Servers to measure, comma-separated: strata, isnsd-file, isnsd-mem.
    #[arg(long, default_value = "strata,isnsd-file,isnsd-mem")]
    servers: String,
    /// strata-nameserver binary (default: the one cargo built with this benchmark).
    #[arg(long)]
    nameserver: Option<PathBuf>,
    /// isnsd binary.
    #[arg(long, default_value = "isnsd")]
    isnsd: PathBuf,
    /// Directory for the servers' data (default: a new directory under the system temp dir,
    /// removed at the end). Durable rates depend on its file system.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Write the figures as JSON to FILE (default: results/isns-bench/isns-bench.json; a
    /// relative FILE is taken from the workspace root, since cargo runs benchmarks in the
    /// package's directory).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// The workspace root (the benchmark's crate is one level below it).
fn workspace_root() -> PathBuf {
    let pkg = Path::new(env!("CARGO_MANIFEST_DIR"));
    pkg.parent().unwrap_or(pkg).to_path_buf()
}

/// Where the figures go: `--json`, else results/isns-bench/isns-bench.json.
fn json_path(cli: &Cli) -> PathBuf {
    let root = workspace_root();
    match &cli.json {
        Some(p) => root.join(p),
        None => root.join("results/isns-bench/isns-bench.json"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Strata,
    IsnsdFile,
    IsnsdMem,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Strata => "strata",
            Kind::IsnsdFile => "isnsd-file",
            Kind::IsnsdMem => "isnsd-mem",
        }
    }

    fn parse(s: &str) -> anyhow::Result<Kind> {
        Ok(match s.trim() {
            "strata" => Kind::Strata,
            "isnsd-file" => Kind::IsnsdFile,
            "isnsd-mem" => Kind::IsnsdMem,
            o => bail!("unknown server {o:?} (strata, isnsd-file, isnsd-mem)"),
        })
    }
}

/// A running server process with its own data directory.
#[derive(Debug)]
struct Server {
    kind: Kind,
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Server {
    fn start(kind: Kind, cli: &Cli, base: &Path, tag: &str) -> anyhow::Result<Server> {
        let dir = base.join(format!("{}-{tag}", kind.name()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
        let port = free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let child = match kind {
            Kind::Strata => {
                let bin = match &cli.nameserver {
                    Some(p) => p.clone(),
                    None => PathBuf::from(env!("CARGO_BIN_EXE_strata-nameserver")),
                };
                Command::new(&bin)
                    .args(["--listen", &addr.to_string(), "--data"])
                    .arg(dir.join("data"))
                    .args(["--registration-period", "0"])
                    .env("RUST_LOG", "warn")
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .with_context(|| format!("cannot start {}", bin.display()))?
            }
            Kind::IsnsdFile | Kind::IsnsdMem => {
                let mut conf = format!(
                    "BindAddress = {addr}\nSourceName = isns.bench.server\n\
                     RegistrationPeriod = 36000\nDefaultDiscoveryDomain = 1\nSLPRegister = 0\n\
                     Security = 0\nPIDFile = {d}/isnsd.pid\nControlSocket = {d}/isnsd.sock\n",
                    d = dir.display()
                );
                if kind == Kind::IsnsdFile {
                    let db = dir.join("db");
                    std::fs::create_dir_all(&db)?;
                    conf.push_str(&format!("Database = {}\n", db.display()));
                }
                let cf = dir.join("isnsd.conf");
                std::fs::write(&cf, conf)?;
                Command::new(&cli.isnsd)
                    .args(["-f", "-4", "-c"])
                    .arg(&cf)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .with_context(|| format!("cannot start {}", cli.isnsd.display()))?
            }
        };
        let mut s = Server {
            kind,
            child,
            addr,
            dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while TcpStream::connect(addr).is_err() {
            if let Some(st) = s.child.try_wait()? {
                bail!("{} exited at start: {st}", kind.name());
            }
            if Instant::now() > deadline {
                bail!("{} did not start listening on {addr}", kind.name());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // isnsd listens before it has loaded its database; give it a moment.
        std::thread::sleep(Duration::from_millis(100));
        s.check_alive()?;
        Ok(s)
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("{} exited: {st}", self.kind.name());
        }
        Ok(())
    }

    /// Resident set size in bytes (/proc/PID/status VmRSS).
    fn rss(&self) -> anyhow::Result<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let line = s
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .context("no VmRSS")?;
        let kb: u64 = line
            .split_whitespace()
            .nth(1)
            .context("bad VmRSS")?
            .parse()?;
        Ok(kb * 1024)
    }

    /// strata's counters over its control socket (JSON-RPC `ns_stats`).
    fn strata_stats(&self) -> Option<serde_json::Value> {
        let limits = jsonrpc::ClientLimits {
            timeout: REPLY_TIMEOUT,
            ..Default::default()
        };
        let mut c =
            jsonrpc::Client::connect_unix(&self.dir.join("data/control.sock"), limits).ok()?;
        c.call("ns_stats", &jsonrpc::NoParams {}).ok()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A blocking iSNSP client.
#[derive(Debug)]
struct Client {
    s: TcpStream,
    xid: u16,
    buf: Vec<u8>,
}

impl Client {
    fn connect(addr: SocketAddr) -> anyhow::Result<Client> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(REPLY_TIMEOUT))?;
        Ok(Client {
            s,
            xid: 0,
            buf: Vec::new(),
        })
    }

    /// Sends a request and returns the status of its reply.
    fn call(&mut self, function: u16, w: &TlvWriter) -> anyhow::Result<u32> {
        self.xid = self.xid.wrapping_add(1);
        let pdus = split_pdus(function, FLAG_CLIENT, self.xid, w, MAX_PDU_PAYLOAD);
        self.s.write_all(&pdus)?;
        let mut total = 0usize;
        let mut status = None;
        loop {
            let mut hb = [0u8; HEADER_LEN];
            self.s.read_exact(&mut hb)?;
            let h = Header::decode(&hb);
            total += usize::from(h.length);
            if total > MAX_REPLY_BYTES {
                bail!("reply larger than {MAX_REPLY_BYTES} bytes");
            }
            self.buf.resize(usize::from(h.length), 0);
            self.s.read_exact(&mut self.buf)?;
            if h.function != function | 0x8000 || h.xid != self.xid {
                bail!("unexpected reply {:#x} xid {}", h.function, h.xid);
            }
            if status.is_none() {
                if let [a, b, c, d, ..] = self.buf[..] {
                    status = Some(u32::from_be_bytes([a, b, c, d]));
                }
            }
            if h.flags & FLAG_LAST_PDU != 0 {
                return status.context("reply without status");
            }
        }
    }
}

fn node_name(prefix: &str, i: usize) -> String {
    format!("iqn.2024-01.bench.{prefix}:n{i}")
}

/// Portal IPs: unique per entity (a portal belongs to one entity), drawn from 10.0.0.0/8
/// (registrations) and 11.0.0.0/8 (bulk loads).
fn portal_ip(net: u8, seq: u32) -> std::net::Ipv6Addr {
    std::net::Ipv4Addr::from((u32::from(net) << 24) | (seq & 0x00ff_ffff)).to_ipv6_mapped()
}

/// A registration of one entity with target nodes `names` and one portal `portal`:3260.
fn registration(eid: &str, names: &[String], portal: std::net::Ipv6Addr) -> TlvWriter {
    let mut w = TlvWriter::new();
    w.string(tag::ISCSI_NAME, names.first().map_or("", String::as_str));
    w.delimiter();
    w.string(tag::EID, eid);
    w.u32(tag::ENTITY_PROTOCOL, 2);
    w.ip(tag::PORTAL_IP, &portal);
    w.u32(tag::PORTAL_PORT, 3260);
    for n in names {
        w.string(tag::ISCSI_NAME, n);
        w.u32(tag::ISCSI_NODE_TYPE, 1);
    }
    w
}

fn query(source: &str, name: &str) -> TlvWriter {
    let mut w = TlvWriter::new();
    w.string(tag::ISCSI_NAME, source);
    w.string(tag::ISCSI_NAME, name);
    w.delimiter();
    w.nil(tag::ISCSI_NODE_TYPE);
    w
}

/// Runs `op(conn, i)` on `conns` connections until `secs` elapse; returns operations/s.
fn rate(
    addr: SocketAddr,
    conns: usize,
    secs: f64,
    op: impl Fn(&mut Client, usize, u64) -> anyhow::Result<()> + Sync,
) -> anyhow::Result<f64> {
    let done = AtomicU64::new(0);
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(secs);
    std::thread::scope(|s| -> anyhow::Result<()> {
        let handles: Vec<_> = (0..conns)
            .map(|c| {
                let (op, done) = (&op, &done);
                s.spawn(move || -> anyhow::Result<()> {
                    let mut cl = Client::connect(addr)?;
                    let mut i = 0u64;
                    while Instant::now() < deadline {
                        op(&mut cl, c, i)?;
                        i += 1;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        }
        Ok(())
    })?;
    Ok(done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64())
}

/// Registers nodes `from..to` in bulk over `conns` connections, `bulk` per entity; stops at
/// the time limit. Returns the number of nodes registered (a multiple of `bulk` or `to`).
fn bulk_load(
    addr: SocketAddr,
    conns: usize,
    from: usize,
    to: usize,
    bulk: usize,
    limit: Duration,
) -> anyhow::Result<usize> {
    let next = AtomicU64::new(from as u64);
    let loaded = AtomicU64::new(from as u64);
    let deadline = Instant::now() + limit;
    std::thread::scope(|s| -> anyhow::Result<()> {
        let handles: Vec<_> = (0..conns)
            .map(|_| {
                let (next, loaded) = (&next, &loaded);
                s.spawn(move || -> anyhow::Result<()> {
                    let mut cl = Client::connect(addr)?;
                    loop {
                        let a = next.fetch_add(bulk as u64, Ordering::SeqCst) as usize;
                        if a >= to || Instant::now() > deadline {
                            return Ok(());
                        }
                        let b = (a + bulk).min(to);
                        let names: Vec<String> = (a..b).map(|i| node_name("q", i)).collect();
                        // Unique per entity: the index of its first node.
                        let portal = portal_ip(11, a as u32);
                        let st = cl.call(
                            func::DEV_ATTR_REG,
                            &registration(&format!("bench-q-e{a}"), &names, portal),
                        )?;
                        if st != 0 {
                            bail!("bulk registration failed with status {st}");
                        }
                        loaded.fetch_add((b - a) as u64, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        }
        Ok(())
    })?;
    Ok(loaded.load(Ordering::SeqCst).min(to as u64) as usize)
}

/// Figures of one server.
#[derive(Debug, Default, Clone, serde::Serialize)]
struct Figures {
    reg_1: f64,
    reg_n: f64,
    q_small_1: f64,
    q_small_n: f64,
    q_big_1: f64,
    q_big_n: f64,
    big_nodes_loaded: usize,
    big_load_secs: f64,
    rss_empty_bytes: u64,
    rss_big_bytes: u64,
    bytes_per_node: f64,
    /// strata only: WAL records per group commit during the concurrent registrations.
    records_per_commit: Option<f64>,
    /// strata only: mean time of one group commit (write + fdatasync) during the
    /// one-connection registrations, microseconds: the floor of its latency.
    commit_us_1: Option<f64>,
}

fn registration_phase(kind: Kind, cli: &Cli, base: &Path, f: &mut Figures) -> anyhow::Result<()> {
    let srv = Server::start(kind, cli, base, "reg")?;
    let reg = |prefix: &'static str, base: u32| {
        move |cl: &mut Client, c: usize, i: u64| -> anyhow::Result<()> {
            let name = node_name(prefix, c * 10_000_000 + i as usize);
            // 2^17 registrations per connection before portals repeat: far beyond a run.
            let portal = portal_ip(10, base + ((c as u32) << 17) + (i as u32 & 0x1_ffff));
            let eid = format!("bench-{prefix}-{c}-{i}");
            let st = cl.call(
                func::DEV_ATTR_REG,
                &registration(&eid, std::slice::from_ref(&name), portal),
            )?;
            if st != 0 {
                bail!("registration failed with status {st}");
            }
            Ok(())
        }
    };
    let start = srv.strata_stats();
    f.reg_1 = rate(srv.addr, 1, cli.secs, reg("r1", 0))?;
    let before = srv.strata_stats();
    if let (Some(a), Some(b)) = (&start, &before) {
        let total = |v: &serde_json::Value| {
            v["wal_commit_avg_us"].as_f64().unwrap_or(0.0)
                * v["wal_commits"].as_f64().unwrap_or(0.0)
        };
        let commits =
            b["wal_commits"].as_f64().unwrap_or(0.0) - a["wal_commits"].as_f64().unwrap_or(0.0);
        if commits > 0.0 {
            f.commit_us_1 = Some((total(b) - total(a)) / commits);
        }
    }
    f.reg_n = rate(srv.addr, cli.connections, cli.secs, reg("rn", 1 << 23))?;
    if let (Some(a), Some(b)) = (before, srv.strata_stats()) {
        let d = |k: &str| b[k].as_f64().unwrap_or(0.0) - a[k].as_f64().unwrap_or(0.0);
        if d("wal_commits") > 0.0 {
            f.records_per_commit = Some(d("wal_records") / d("wal_commits"));
        }
    }
    Ok(())
}

fn query_phase(kind: Kind, cli: &Cli, base: &Path, f: &mut Figures) -> anyhow::Result<()> {
    let mut srv = Server::start(kind, cli, base, "query")?;
    f.rss_empty_bytes = srv.rss()?;
    let limit = Duration::from_secs_f64(cli.load_limit_secs);
    // The small set is registered one node per entity, as clients register (isnsd's file
    // DB rewrites a whole entity when a query refreshes it: bulk entities would penalise it).
    let small = bulk_load(srv.addr, cli.connections, 0, cli.small, 1, limit)?;
    if small < cli.small {
        bail!(
            "{}: loaded only {small} of {} nodes",
            kind.name(),
            cli.small
        );
    }
    let q = |n: usize| {
        move |cl: &mut Client, c: usize, i: u64| -> anyhow::Result<()> {
            // A spread of names over the loaded ones (multiplicative hash of the counter).
            let k = ((i as usize).wrapping_add(c * 7919)).wrapping_mul(2_654_435_761) % n;
            let st = cl.call(
                func::DEV_ATTR_QRY,
                &query(&node_name("q", 0), &node_name("q", k)),
            )?;
            if st != 0 {
                bail!("query failed with status {st}");
            }
            Ok(())
        }
    };
    f.q_small_1 = rate(srv.addr, 1, cli.secs, q(small))?;
    f.q_small_n = rate(srv.addr, cli.connections, cli.secs, q(small))?;
    let t = Instant::now();
    let big = bulk_load(srv.addr, cli.connections, small, cli.big, cli.bulk, limit)?;
    f.big_load_secs = t.elapsed().as_secs_f64();
    f.big_nodes_loaded = big;
    srv.check_alive()?;
    f.rss_big_bytes = srv.rss()?;
    f.bytes_per_node = f.rss_big_bytes.saturating_sub(f.rss_empty_bytes) as f64 / big as f64;
    f.q_big_1 = rate(srv.addr, 1, cli.secs, q(big))?;
    f.q_big_n = rate(srv.addr, cli.connections, cli.secs, q(big))?;
    srv.check_alive()?;
    Ok(())
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.1}x", a / b)
    } else {
        "-".into()
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    if cli.connections == 0 || cli.connections > MAX_CONNECTIONS {
        bail!("--connections must be 1..={MAX_CONNECTIONS}");
    }
    if cli.bulk == 0 || cli.bulk > MAX_BULK {
        bail!("--bulk must be 1..={MAX_BULK}");
    }
    if cli.small == 0 || cli.big < cli.small {
        bail!("need 0 < --small <= --big");
    }
    let kinds: Vec<Kind> = cli
        .servers
        .split(',')
        .map(Kind::parse)
        .collect::<anyhow::Result<_>>()?;
    let base = match &cli.work_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("isns-bench-{}", std::process::id())),
    };
    std::fs::create_dir_all(&base)?;
    let mut figs: Vec<Figures> = vec![Figures::default(); kinds.len()];
    let t0 = Instant::now();
    for (k, f) in kinds.iter().zip(figs.iter_mut()) {
        eprintln!(
            "[{:>5.1}s] registrations: {}",
            t0.elapsed().as_secs_f64(),
            k.name()
        );
        registration_phase(*k, cli, &base, f)?;
    }
    for (k, f) in kinds.iter().zip(figs.iter_mut()) {
        eprintln!(
            "[{:>5.1}s] queries and memory: {}",
            t0.elapsed().as_secs_f64(),
            k.name()
        );
        query_phase(*k, cli, &base, f)?;
    }
    if cli.work_dir.is_none() {
        let _ = std::fs::remove_dir_all(&base);
    }
    print_table(cli, &kinds, &figs);
    {
        let path = &json_path(cli);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
        }
        let servers: serde_json::Map<String, serde_json::Value> = kinds
            .iter()
            .zip(&figs)
            .map(|(k, f)| Ok((k.name().to_owned(), serde_json::to_value(f)?)))
            .collect::<anyhow::Result<_>>()?;
        let v = serde_json::json!({
            "connections": cli.connections, "secs": cli.secs, "small": cli.small,
            "big": cli.big, "bulk": cli.bulk, "servers": servers,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&v)?)
            .with_context(|| format!("{}", path.display()))?;
        eprintln!("figures written to {}", path.display());
    }
    eprintln!("total {:.0}s", t0.elapsed().as_secs_f64());
    Ok(())
}

fn print_table(cli: &Cli, kinds: &[Kind], figs: &[Figures]) {
    let n = cli.connections;
    type Get = Box<dyn Fn(&Figures) -> f64>;
    let rows: Vec<(String, Get)> = vec![
        (
            "durable reg/s, 1 conn".into(),
            Box::new(|f: &Figures| f.reg_1),
        ),
        (
            format!("durable reg/s, {n} conns"),
            Box::new(|f: &Figures| f.reg_n),
        ),
        (
            format!("query/s @{} nodes, 1 conn", cli.small),
            Box::new(|f: &Figures| f.q_small_1),
        ),
        (
            format!("query/s @{} nodes, {n} conns", cli.small),
            Box::new(|f: &Figures| f.q_small_n),
        ),
        (
            format!("query/s @{} nodes, 1 conn", cli.big),
            Box::new(|f: &Figures| f.q_big_1),
        ),
        (
            format!("query/s @{} nodes, {n} conns", cli.big),
            Box::new(|f: &Figures| f.q_big_n),
        ),
        (
            format!("bulk load of {} nodes, s", cli.big),
            Box::new(|f: &Figures| f.big_load_secs),
        ),
        (
            "RSS per node, bytes".into(),
            Box::new(|f: &Figures| f.bytes_per_node),
        ),
    ];
    let si = kinds.iter().position(|k| *k == Kind::Strata);
    print!("{:<34}", "");
    for k in kinds {
        print!("{:>12}", k.name());
    }
    if si.is_some() {
        for k in kinds.iter().filter(|k| **k != Kind::Strata) {
            print!(
                "{:>16}",
                format!("strata/{}", k.name().trim_start_matches("isnsd-"))
            );
        }
    }
    println!();
    for (label, get) in &rows {
        print!("{label:<34}");
        for f in figs {
            let v = get(f);
            if v < 100.0 {
                print!("{v:>12.1}");
            } else {
                print!("{v:>12.0}");
            }
        }
        if let Some(si) = si {
            for (k, f) in kinds.iter().zip(figs) {
                if *k != Kind::Strata {
                    print!("{:>16}", ratio(get(&figs[si]), get(f)));
                }
            }
        }
        println!();
    }
    for (k, f) in kinds.iter().zip(figs) {
        if f.big_nodes_loaded < cli.big {
            println!(
                "note: {} loaded only {} of {} nodes within {} s; its large figures are at that size",
                k.name(),
                f.big_nodes_loaded,
                cli.big,
                cli.load_limit_secs
            );
        }
        if let Some(us) = f.commit_us_1 {
            println!(
                "note: {}: one group commit (write + fdatasync) took {us:.0} us on average at 1 connection",
                k.name()
            );
        }
        if let Some(r) = f.records_per_commit {
            println!(
                "note: {}: {r:.1} registrations per group commit at {n} connections",
                k.name()
            );
        }
    }
    let get = |k: Kind| kinds.iter().position(|x| *x == k).map(|i| &figs[i]);
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    if let Some(s) = get(Kind::Strata) {
        if let Some(fdb) = get(Kind::IsnsdFile) {
            println!(
                "target durable reg >= 10x isnsd file DB: 1 conn {} ({}), {n} conns {} ({})",
                verdict(s.reg_1 >= 10.0 * fdb.reg_1),
                ratio(s.reg_1, fdb.reg_1),
                verdict(s.reg_n >= 10.0 * fdb.reg_n),
                ratio(s.reg_n, fdb.reg_n),
            );
        }
        if let Some(mem) = get(Kind::IsnsdMem) {
            println!(
                "target durable reg >= isnsd in-memory: 1 conn {} ({}), {n} conns {} ({})",
                verdict(s.reg_1 >= mem.reg_1),
                ratio(s.reg_1, mem.reg_1),
                verdict(s.reg_n >= mem.reg_n),
                ratio(s.reg_n, mem.reg_n),
            );
        }
        let isnsd_q = [get(Kind::IsnsdFile), get(Kind::IsnsdMem)]
            .into_iter()
            .flatten()
            .map(|f| f.q_small_1.max(f.q_small_n))
            .fold(0.0, f64::max);
        if isnsd_q > 0.0 {
            let sq = s.q_small_1.max(s.q_small_n);
            println!(
                "target queries >= 2x isnsd @{} nodes: {} ({} vs best isnsd {:.0}/s)",
                cli.small,
                verdict(sq >= 2.0 * isnsd_q),
                ratio(sq, isnsd_q),
                isnsd_q
            );
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("isns-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
