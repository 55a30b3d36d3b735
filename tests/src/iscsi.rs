//! iSCSI targets for the peer tests (iscsi-test-cu, the Linux initiator in the guest) and the
//! iSNS name server they discover through.
//!
//! The target under test is chosen by `STRATA_ISCSI_TARGET`: `stratad` (the default: Strata's
//! own target, `--iscsi-portal`/`--iscsi-target`) or `tgtd` (tgt 1.0.85, the reference peer
//! the figures of shared/reference/san.md were taken with). Both serve one LUN backed by a
//! file, on a free loopback port, optionally restricted to a list of initiators and
//! registered with an iSNS server whose discovery domains then decide who sees the target.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::daemon::{stratad_bin, workspace_root, Stratad};

/// Environment variable naming the target under test (`stratad` or `tgtd`).
pub const TARGET_ENV: &str = "STRATA_ISCSI_TARGET";
/// How long a target may take to accept connections on its portal.
const START_WAIT_MAX: Duration = Duration::from_secs(30);
/// How often start-up is polled.
const POLL: Duration = Duration::from_millis(50);
/// tgtd's management channel is a Unix socket numbered by `-C N`; tgtd refuses numbers from
/// about 32 768 on, so test instances take numbers from this base within this span.
const TGTD_CONTROL_BASE: u32 = 1_000;
const TGTD_CONTROL_SPAN: u32 = 27_000;

/// Which iSCSI target serves the LUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// Strata's target in stratad.
    Stratad,
    /// tgt's user-space target (the reference peer).
    Tgtd,
}

impl TargetKind {
    /// The target named by `STRATA_ISCSI_TARGET` (default `stratad`).
    pub fn from_env() -> anyhow::Result<Self> {
        match std::env::var(TARGET_ENV).ok().as_deref() {
            None | Some("") | Some("stratad") => Ok(TargetKind::Stratad),
            Some("tgtd") => Ok(TargetKind::Tgtd),
            Some(other) => bail!("{TARGET_ENV}={other}: expected stratad or tgtd"),
        }
    }

    /// The name used in file names and messages.
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Stratad => "stratad",
            TargetKind::Tgtd => "tgtd",
        }
    }

    /// The LUN number the disk gets: tgtd keeps LUN 0 for its controller device.
    pub fn lun(self) -> u32 {
        match self {
            TargetKind::Stratad => 0,
            TargetKind::Tgtd => 1,
        }
    }

    /// Why this target cannot run here (`None` when it can); see `dataplane::test_gate`.
    pub fn unavailable(self) -> Option<String> {
        match self {
            TargetKind::Tgtd => {
                if !on_path("tgtd") || !on_path("tgtadm") {
                    return Some("tgtd/tgtadm not installed (package tgt)".into());
                }
                // SAFETY: geteuid has no memory effects.
                if unsafe { libc::geteuid() } != 0 {
                    return Some("tgtd needs root (its control socket is in /var/run)".into());
                }
                None
            }
            TargetKind::Stratad => {
                if stratad_serves_iscsi() {
                    None
                } else {
                    Some("this stratad has no --iscsi-portal option yet".into())
                }
            }
        }
    }
}

/// Whether the release stratad knows `--iscsi-portal` (asked once per process).
fn stratad_serves_iscsi() -> bool {
    static KNOWS: OnceLock<bool> = OnceLock::new();
    *KNOWS.get_or_init(|| {
        Command::new(stratad_bin())
            .arg("--help")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout).contains("--iscsi-portal")
                    || String::from_utf8_lossy(&o.stderr).contains("--iscsi-portal")
            })
            .unwrap_or(false)
    })
}

/// Whether `tool` is an executable file on PATH.
pub fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// A TCP port free on 127.0.0.1 at the time of the call.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// What to serve.
#[derive(Debug, Clone)]
pub struct TargetSpec {
    /// The target's IQN.
    pub iqn: String,
    /// The LUN's backing file (its size is the LUN's).
    pub image: PathBuf,
    /// Initiators allowed to log in; empty: everyone (or whoever the name server allows).
    pub allow: Vec<String>,
    /// Register with this iSNS server, which then decides access by discovery domain.
    pub isns: Option<SocketAddr>,
    /// Where the target's log goes.
    pub log: PathBuf,
}

/// A running target.
#[derive(Debug)]
pub struct IscsiTarget {
    /// Which target it is.
    pub kind: TargetKind,
    /// The portal (127.0.0.1:PORT).
    pub portal: SocketAddr,
    /// The target's IQN.
    pub iqn: String,
    /// The disk's LUN.
    pub lun: u32,
    process: TargetProcess,
}

#[derive(Debug)]
enum TargetProcess {
    Stratad(Stratad),
    Tgtd(Tgtd),
}

impl IscsiTarget {
    /// Starts `kind` serving `spec` and waits until its portal accepts connections.
    pub fn start(kind: TargetKind, spec: &TargetSpec) -> anyhow::Result<Self> {
        let portal: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let process = match kind {
            TargetKind::Stratad => TargetProcess::Stratad(start_stratad(portal, spec)?),
            TargetKind::Tgtd => TargetProcess::Tgtd(Tgtd::start(portal, spec)?),
        };
        let target = IscsiTarget {
            kind,
            portal,
            iqn: spec.iqn.clone(),
            lun: kind.lun(),
            process,
        };
        target.wait_for_portal()?;
        Ok(target)
    }

    /// The libiscsi URL of the LUN.
    pub fn url(&self) -> String {
        format!("iscsi://{}/{}/{}", self.portal, self.iqn, self.lun)
    }

    /// The target's process id (for CPU accounting and liveness checks).
    pub fn pid(&self) -> u32 {
        match &self.process {
            TargetProcess::Stratad(d) => d.pid(),
            TargetProcess::Tgtd(t) => t.child.id(),
        }
    }

    fn wait_for_portal(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_WAIT_MAX;
        while TcpStream::connect(self.portal).is_err() {
            if crate::e2e::exited(self.pid()) {
                bail!("{} exited before its portal came up", self.kind.name());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} portal {} did not come up",
                    self.kind.name(),
                    self.portal
                );
            }
            std::thread::sleep(POLL);
        }
        Ok(())
    }

    /// Stops the target: stratad by SIGTERM (it must exit 0), tgtd by SIGKILL (it ignores
    /// SIGTERM while targets exist).
    pub fn stop(self) -> anyhow::Result<()> {
        match self.process {
            TargetProcess::Stratad(d) => {
                let status = d.stop()?;
                if !status.success() {
                    bail!("stratad exited with {status} after SIGTERM");
                }
                Ok(())
            }
            TargetProcess::Tgtd(t) => {
                drop(t);
                Ok(())
            }
        }
    }
}

fn start_stratad(portal: SocketAddr, spec: &TargetSpec) -> anyhow::Result<Stratad> {
    let mut target = format!("iqn={},disk=lun0", spec.iqn);
    if !spec.allow.is_empty() {
        target.push_str(&format!(",allow={}", spec.allow.join(";")));
    }
    let mut args = vec![
        "--disk".to_string(),
        format!(
            "backend=raw,path={},name=lun0",
            spec.image.display().to_string().replace(',', ",,")
        ),
        "--iscsi-portal".to_string(),
        portal.to_string(),
        "--iscsi-target".to_string(),
        target,
        // Persistent reservations are kept beside the image, not in the working directory.
        "--iscsi-state-dir".to_string(),
        spec.image
            .with_extension("iscsi-state")
            .display()
            .to_string(),
    ];
    if let Some(isns) = spec.isns {
        args.push("--isns".to_string());
        args.push(isns.to_string());
    }
    Stratad::spawn(&args, &[])
}

/// tgtd with one target (tid 1) and one disk LUN (1).
#[derive(Debug)]
struct Tgtd {
    child: Child,
    control: String,
}

impl Tgtd {
    fn start(portal: SocketAddr, spec: &TargetSpec) -> anyhow::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = std::process::id()
            .wrapping_mul(7)
            .wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed));
        let control = (TGTD_CONTROL_BASE + n % TGTD_CONTROL_SPAN).to_string();
        let log = std::fs::File::create(&spec.log)
            .with_context(|| format!("create {}", spec.log.display()))?;
        let child = Command::new("tgtd")
            .args(["-f", "-C", &control, "--iscsi"])
            .arg(format!("portal={portal}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn tgtd")?;
        let t = Tgtd { child, control };
        let deadline = Instant::now() + START_WAIT_MAX;
        while t.adm(&["--op", "show", "--mode", "sys"]).is_err() {
            if Instant::now() > deadline {
                bail!("tgtd's control channel {} did not come up", t.control);
            }
            std::thread::sleep(POLL);
        }
        if let Some(isns) = spec.isns {
            // Order matters: tgt's parser lets iSNSServerPort fall through into
            // iSNSAccessControl (see fabric-nameserver's real_clients test).
            let ip = isns.ip().to_string();
            let port = isns.port().to_string();
            for (name, value) in [
                ("iSNSServerIP", ip.as_str()),
                ("iSNSServerPort", port.as_str()),
                ("iSNSAccessControl", "On"),
                ("iSNS", "On"),
            ] {
                t.adm(&[
                    "--op", "update", "--mode", "sys", "--name", name, "-v", value,
                ])?;
            }
        }
        let image = spec.image.display().to_string();
        t.adm(&[
            "--lld", "iscsi", "--op", "new", "--mode", "target", "--tid", "1", "-T", &spec.iqn,
        ])?;
        t.adm(&[
            "--lld",
            "iscsi",
            "--op",
            "new",
            "--mode",
            "logicalunit",
            "--tid",
            "1",
            "--lun",
            "1",
            "-b",
            &image,
        ])?;
        if spec.allow.is_empty() {
            t.adm(&[
                "--lld", "iscsi", "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL",
            ])?;
        }
        for initiator in &spec.allow {
            t.adm(&[
                "--lld",
                "iscsi",
                "--op",
                "bind",
                "--mode",
                "target",
                "--tid",
                "1",
                "--initiator-name",
                initiator,
            ])?;
        }
        Ok(t)
    }

    fn adm(&self, args: &[&str]) -> anyhow::Result<()> {
        let o = Command::new("tgtadm")
            .args(["-C", &self.control])
            .args(args)
            .output()
            .context("run tgtadm")?;
        if !o.status.success() {
            bail!(
                "tgtadm {args:?}: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for Tgtd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Path of the release `strata-nameserver`, built once per test process.
pub fn nameserver_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = workspace_root();
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "--release",
                "-p",
                "fabric-nameserver",
                "--bin",
                "strata-nameserver",
            ])
            .current_dir(&root)
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build -p fabric-nameserver failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        target.join("release").join("strata-nameserver")
    })
    .clone()
}

/// The name server's control node in the tests (may register and zone other nodes).
pub const ADMIN_NODE: &str = "iqn.2026-12.org.strata.test:admin";

/// A strata-nameserver on a free loopback port; killed on drop.
#[derive(Debug)]
pub struct NameServer {
    child: Child,
    /// Its iSNS address.
    pub addr: SocketAddr,
    /// Its data directory (the control socket is `control.sock` in it).
    pub data: PathBuf,
}

impl NameServer {
    /// Starts a name server keeping its state in `data`, with [`ADMIN_NODE`] as its control
    /// node (so [`NameServer::register_initiator`] may register others); waits for its
    /// listener and control socket.
    pub fn start(data: &Path) -> anyhow::Result<Self> {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let child = Command::new(nameserver_bin())
            .args(["--listen", &addr.to_string(), "--data"])
            .arg(data)
            .args(["--control-node", ADMIN_NODE])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("spawn strata-nameserver")?;
        let ns = NameServer {
            child,
            addr,
            data: data.to_path_buf(),
        };
        let deadline = Instant::now() + START_WAIT_MAX;
        while TcpStream::connect(addr).is_err()
            || std::os::unix::net::UnixStream::connect(ns.control()).is_err()
        {
            if Instant::now() > deadline {
                bail!("strata-nameserver did not come up on {addr}");
            }
            std::thread::sleep(POLL);
        }
        Ok(ns)
    }

    /// The control socket (JSON-RPC).
    pub fn control(&self) -> PathBuf {
        self.data.join("control.sock")
    }

    /// One JSON-RPC call on the control socket; the `result`, or an error with the reply.
    pub fn rpc(
        &self,
        method: &str,
        params: serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        use std::io::{BufRead, Write};
        let mut s = std::os::unix::net::UnixStream::connect(self.control())?;
        let req =
            serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        writeln!(s, "{req}")?;
        let mut line = String::new();
        std::io::BufReader::new(s).read_line(&mut line)?;
        let reply: serde_json::Value = serde_json::from_str(&line)?;
        match reply.get("result") {
            Some(r) => Ok(r.clone()),
            None => bail!("{method}: {reply}"),
        }
    }

    /// Registers initiator `name` (as open-iscsi's iscsid would if it spoke iSNS: `iscsiadm`
    /// registers only for the time of a discovery and deregisters after it, and a target with
    /// iSNS access control, such as tgtd, admits only registered initiators of its domains).
    /// Uses open-isns's `isnsadm` as the control node.
    pub fn register_initiator(&self, name: &str) -> anyhow::Result<()> {
        let conf = self.data.join("isnsadm.conf");
        std::fs::write(
            &conf,
            format!(
                "ServerAddress = {}\nSourceName = {ADMIN_NODE}\nSecurity = 0\n",
                self.addr
            ),
        )?;
        let o = Command::new("isnsadm")
            .arg("-c")
            .arg(&conf)
            .args(["--register", &format!("initiator={name}")])
            .output()
            .context("run isnsadm")?;
        if !o.status.success() {
            bail!(
                "isnsadm --register initiator={name}: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(())
    }

    /// Whether a node named `name` is registered.
    pub fn has_node(&self, name: &str) -> anyhow::Result<bool> {
        let nodes = self.rpc("ns_node_list", serde_json::json!({}))?;
        Ok(nodes
            .as_array()
            .is_some_and(|a| a.iter().any(|n| n["name"] == name)))
    }
}

impl Drop for NameServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 200 ms until it is true; an error after `max`.
pub fn wait_until(
    what: &str,
    max: Duration,
    mut f: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + max;
    while !f()? {
        if Instant::now() > deadline {
            bail!("timed out after {max:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}
