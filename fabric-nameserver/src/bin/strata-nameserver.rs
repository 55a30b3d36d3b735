//! `strata-nameserver`: runs the iSNS name server on one address and one data directory.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use fabric_nameserver::server::{start, Config};

/// Durable iSNS name server (RFC 4171) with discovery-domain zoning and SCNs.
///
/// State (registrations, discovery domains, policy) lives in DIR: a write-ahead log fsynced
/// before every answer (group commit) plus periodic snapshots; one server per directory.
/// Administer it with `stratactl ns --socket DIR/control.sock ...`.
#[derive(Debug, Parser)]
#[command(name = "strata-nameserver", version)]
struct Args {
    /// iSNSP TCP address to listen on (RFC 4171's port is 3205). The default is loopback
    /// only: serving a network is an explicit choice (e.g. `--listen 0.0.0.0:3205`), since
    /// iSNSP carries no authentication here (see `--control-node`).
    #[arg(long, default_value = "127.0.0.1:3205")]
    listen: SocketAddr,
    /// An iSCSI name the administrator authorizes as a control node (repeatable): only
    /// control nodes may create or change discovery domains and DD sets, change or
    /// deregister other clients' entities, register with the control node type, register
    /// management SCNs, and see every node. `NAME@ADDR` also requires the request to come
    /// from that IP address (recommended on a network: the iSNS source name is not
    /// authenticated). The control socket is always authorized.
    #[arg(long = "control-node", value_name = "NAME[@ADDR]", value_parser = parse_control_node)]
    control_nodes: Vec<(String, Option<IpAddr>)>,
    /// Data directory (created if missing).
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// JSON-RPC control socket (default: DIR/control.sock).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Default discovery domain for a new data directory: nodes in no discovery domain see
    /// each other (like open-isns's DefaultDiscoveryDomain = 1). Later changes go through
    /// `stratactl ns policy`.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    default_dd: String,
    /// Registration period in seconds for entities that do not ask for one; an entity not
    /// refreshed within its period is deregistered. 0 disables expiry.
    #[arg(long, default_value_t = 900)]
    registration_period: u32,
    /// Smallest ESI interval honoured, in seconds (RFC 4171: 20); portals that register an
    /// ESI port are probed once per interval.
    #[arg(long, default_value_t = fabric_nameserver::esi::RFC_MIN_ESI_INTERVAL_SECS)]
    esi_min_interval: u32,
    /// Unanswered ESI probes in a row after which a portal (and an entity left without
    /// ESI-monitored portals) is deregistered; 0 disables ESI.
    #[arg(long, default_value_t = fabric_nameserver::esi::DEFAULT_ESI_RETRIES)]
    esi_retries: u32,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut cfg = Config::new(args.listen, args.data);
    cfg.control = args.control;
    cfg.default_dd = args.default_dd == "on";
    cfg.registration_period_secs = args.registration_period;
    cfg.esi.min_interval_secs = args.esi_min_interval;
    cfg.esi.retries = args.esi_retries;
    cfg.control_nodes = args.control_nodes.into_iter().collect();
    if !args.listen.ip().is_loopback() {
        tracing::warn!(
            listen = %args.listen,
            control_nodes = cfg.control_nodes.len(),
            "serving iSNS beyond this host: clients are bound to their entities by address, \
             control nodes by name (pin them with NAME@ADDR)"
        );
    }
    // Block SIGTERM/SIGINT before any thread starts, so every thread inherits the mask and
    // the signals wait for sigwait below instead of killing the process.
    let set = match block_signals() {
        Ok(set) => set,
        Err(e) => {
            eprintln!("strata-nameserver: cannot block signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let handle = match start(cfg) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("strata-nameserver: {e}");
            return ExitCode::FAILURE;
        }
    };
    // SIGTERM/SIGINT: stop and exit 0. Every acknowledged change is already durable, so
    // shutdown only has to stop accepting and finish the log writer.
    match wait_for_signal(&set) {
        Ok(sig) => tracing::info!(signal = sig, "shutting down"),
        Err(e) => {
            eprintln!("strata-nameserver: cannot wait for signals: {e}");
            return ExitCode::FAILURE;
        }
    }
    handle.shutdown();
    ExitCode::SUCCESS
}

/// Parses `NAME` or `NAME@ADDR` (an iSCSI name holds no `@`; the last one splits).
fn parse_control_node(s: &str) -> Result<(String, Option<IpAddr>), String> {
    let (name, addr) = match s.rsplit_once('@') {
        Some((n, a)) => (
            n,
            Some(
                a.parse::<IpAddr>()
                    .map_err(|e| format!("bad address {a:?}: {e}"))?,
            ),
        ),
        None => (s, None),
    };
    if name.is_empty() || name.len() > fabric_nameserver::command::MAX_NAME_BYTES {
        return Err(format!("bad control node name {name:?}"));
    }
    Ok((name.to_owned(), addr))
}

/// Blocks SIGTERM and SIGINT in the calling thread (and threads it starts later).
fn block_signals() -> std::io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use; sigaddset and
    // pthread_sigmask only read/write that local set and this thread's signal mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        Ok(set)
    }
}

/// Waits for one of the blocked signals.
fn wait_for_signal(set: &libc::sigset_t) -> std::io::Result<i32> {
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is an initialised sigset_t and `sig` a valid out-pointer.
    let rc = unsafe { libc::sigwait(set, &mut sig) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(sig)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listens_on_loopback_unless_told_otherwise() {
        let a = Args::parse_from(["strata-nameserver", "--data", "/tmp/x"]);
        assert!(a.listen.ip().is_loopback(), "{}", a.listen);
        assert!(a.control_nodes.is_empty());
        let a = Args::parse_from([
            "strata-nameserver",
            "--data",
            "/tmp/x",
            "--listen",
            "0.0.0.0:3205",
            "--control-node",
            "iqn.a:admin",
            "--control-node",
            "iqn.b:admin@10.0.0.1",
        ]);
        assert!(!a.listen.ip().is_loopback());
        assert_eq!(
            a.control_nodes,
            vec![
                ("iqn.a:admin".to_owned(), None),
                ("iqn.b:admin".to_owned(), Some("10.0.0.1".parse().unwrap()))
            ]
        );
        assert!(Args::try_parse_from(["x", "--data", "d", "--control-node", "a@nope"]).is_err());
    }
}
