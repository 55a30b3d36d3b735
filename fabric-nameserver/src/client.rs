//! An iSNS client (RFC 4171) for a target daemon: registers a Network Entity (protocol
//! iSCSI) with its portals and its targets (iSCSI Storage Nodes of type Target, each with a
//! Portal Group per portal carrying the portal's group tag), keeps that registration alive,
//! answers the server's Entity Status Inquiries, listens for State Change Notifications, and
//! answers "may this initiator see this target?" from the server's discovery domains
//! ([`DdAccess`]). It speaks the messages this crate's server handles (see `registry`): the
//! same wire codec ([`crate::wire`]), the same attribute layout.
//!
//! Threads, not a reactor: a maintenance thread (registration, periodic check, re-registration)
//! and a listener thread (the ESI/SCN port, [`inbound`]); every network operation has a
//! deadline ([`Timing::io_timeout`]). Callers of [`IsnsClient::add_target`],
//! [`IsnsClient::remove_target`] and [`DdAccess::visible`] block for at most a few of them.
//!
//! Staying registered: the entity is registered with REPLACE (so leftovers of an earlier run
//! go), then every [`Timing::check_interval`] the client asks for its entity (DevAttrQry
//! keyed by its EID, for its portals and nodes). The query also refreshes the registration
//! period. A missing entity, portal or node — the name server lost its state, an
//! administrator removed the entity, ESI dropped a portal — or a Source Unknown / No Such
//! Entry answer makes it register everything again. A failed step drops the connection;
//! the next round reconnects (backing off from [`RETRY_MIN`] up to the check interval).
//!
//! ESI/SCN port: one TCP listener on the wildcard address of the server's address family
//! (the server probes the address our registration came from, at the ESI port we register,
//! and sends SCNs there to the SCN port), or two when distinct ports are configured. Every
//! target registers for SCNs (SCNReg) of initiators being added, removed or updated in its
//! view — which is also how a discovery-domain change reaches a non-control node — and an
//! SCN drops the visibility cache.
//!
//! With no targets nothing is registered (a new entity must contain its source node, RFC
//! 4171 §5.6.5.1); removing the last target deregisters the entity.
//!
//! Files: this one (the API: [`IsnsClient`], [`EntityInfo`], [`Timing`], errors, what the
//! threads share); `worker` (registration state, the messages, the maintenance rounds);
//! `access` ([`DdAccess`]: visibility queries and their cache); `inbound` (the ESI/SCN
//! port); `conn` (one request/response connection with deadlines). Calls run one way:
//! this file → `worker`, `access` → `conn` → [`crate::wire`]; this file → `inbound` →
//! [`crate::wire`].

mod access;
mod conn;
mod inbound;
mod worker;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use thiserror::Error;

pub use access::DdAccess;
use worker::{State, Worker};

use crate::registry::{scn, MAX_OBJECTS_PER_ENTITY};
use crate::wire::WireError;

/// RFC 4171 §6.3.5's minimum ESI interval, which servers raise smaller values to.
pub const DEFAULT_ESI_INTERVAL_SECS: u32 = crate::esi::RFC_MIN_ESI_INTERVAL_SECS;
/// How often the client checks that its registration is still there: well inside what a
/// server takes to drop an entity that stops answering ESI (3 × 20 s by default).
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// How long a discovery-domain answer is used without asking again (SCNs drop it sooner;
/// this bounds how long a change the server sends no SCN for takes to apply).
pub const DEFAULT_VISIBILITY_TTL: Duration = Duration::from_secs(2);
/// Deadline of one connect, and of one request until its response.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(3);
/// First pause after a failed round; doubled per failure up to the check interval.
pub const RETRY_MIN: Duration = Duration::from_millis(250);
/// Most portals of one entity (each one is also a portal group per target).
pub const MAX_PORTALS: usize = 64;
/// Longest iSCSI name (RFC 7143 §4.2.7.1: 223 bytes).
pub const MAX_ISCSI_NAME: usize = 223;
/// Longest Entity ID (RFC 4171 §6.2.1).
pub const MAX_EID: usize = 255;
/// Entity Protocol value of iSCSI (RFC 4171 §6.2.2).
const ENTITY_PROTOCOL_ISCSI: u32 = 2;
/// SCNs each target registers for: initiators entering (object added), leaving (removed)
/// or changing in its view, initiators only (bit "Initiator and self information only").
pub const SCN_BITMAP: u32 =
    scn::OBJECT_ADDED | scn::OBJECT_REMOVED | scn::OBJECT_UPDATED | scn::INITIATOR_AND_SELF;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("name server I/O: {0}")]
    Io(String),
    #[error("name server did not answer in time")]
    Timeout,
    #[error("name server answered function {function:#x} with status {status}")]
    Status { function: u16, status: u32 },
    #[error("malformed response: {0}")]
    Wire(#[from] WireError),
    #[error("response has function {0:#x}")]
    WrongFunction(u16),
    #[error("response larger than {} bytes", conn::MAX_RESPONSE_BYTES)]
    TooLarge,
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("invalid entity: {0}")]
    Invalid(String),
    #[error("cannot open the ESI/SCN port {port}: {source}")]
    Listen { port: u16, source: std::io::Error },
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
}

impl ClientError {
    fn io(e: std::io::Error) -> ClientError {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ClientError::Timeout,
            _ => ClientError::Io(e.to_string()),
        }
    }
}

/// What the client registers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntityInfo {
    /// Entity ID; empty: the server assigns one (kept for re-registrations).
    pub eid: String,
    /// The target's portals with their portal group tags. An unspecified address (0.0.0.0,
    /// ::) is registered as the address the client reaches the name server from.
    pub portals: Vec<(SocketAddr, u16)>,
    /// iSCSI names of the targets (registered as Storage Nodes of type Target).
    pub targets: Vec<String>,
    /// Port of the listener for ESI (and SCN unless `scn_port` names another); None: any.
    pub esi_port: Option<u16>,
    /// Port for SCNs; None: the ESI port.
    pub scn_port: Option<u16>,
}

/// Timing of the client; [`Timing::default`] is for production, tests shorten it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// ESI Interval registered on each portal (the server raises it to its minimum).
    pub esi_interval_secs: u32,
    /// Period of the registration check.
    pub check_interval: Duration,
    /// How long a visibility answer is used.
    pub visibility_ttl: Duration,
    /// Deadline of a connect and of a request.
    pub io_timeout: Duration,
    /// Registration Period asked for; None: the server's default.
    pub registration_period_secs: Option<u32>,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            esi_interval_secs: DEFAULT_ESI_INTERVAL_SECS,
            check_interval: DEFAULT_CHECK_INTERVAL,
            visibility_ttl: DEFAULT_VISIBILITY_TTL,
            io_timeout: DEFAULT_IO_TIMEOUT,
            registration_period_secs: None,
        }
    }
}

/// Counters and state, for `stratactl` and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// The last round left the entity registered (as far as the client knows).
    pub registered: bool,
    /// Full registrations (the first one and every re-registration).
    pub registrations: u64,
    /// Registration checks answered.
    pub checks: u64,
    /// ESIs answered.
    pub esi_answered: u64,
    /// SCNs received.
    pub scn_received: u64,
    /// Visibility queries sent, and those that failed.
    pub queries: u64,
    pub query_errors: u64,
    /// Failed maintenance rounds and calls.
    pub errors: u64,
}

#[derive(Debug, Default)]
struct Counter(AtomicU64);

impl Counter {
    fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
struct Stats {
    registrations: Counter,
    checks: Counter,
    esi: Counter,
    scn: Counter,
    queries: Counter,
    query_errors: Counter,
    errors: Counter,
}

/// What the maintenance side, the listener and [`DdAccess`] share.
#[derive(Debug)]
struct Shared {
    server: SocketAddr,
    timing: Timing,
    /// The Entity ID in use (the server's choice when none was given).
    eid: RwLock<String>,
    /// Moves when what initiators may see can have changed (SCN, registration, targets).
    generation: AtomicU64,
    stop: AtomicBool,
    /// Mirror of the registration state's flag, readable without waiting for a round.
    registered: AtomicBool,
    stats: Stats,
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }
    fn bump_generation(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
    fn eid(&self) -> String {
        self.eid.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl inbound::Events for Shared {
    fn esi(&self) {
        self.stats.esi.inc();
    }
    fn scn(&self, bitmap: u32) {
        // The cache goes first: whoever sees the counter move must not get an old answer.
        self.bump_generation();
        self.stats.scn.inc();
        tracing::debug!(bitmap, "SCN received; discovery-domain cache dropped");
    }
}

/// A running iSNS client. [`IsnsClient::stop`] (or dropping it) deregisters and joins.
#[derive(Debug)]
pub struct IsnsClient {
    worker: Arc<Worker>,
    access: Arc<DdAccess>,
    threads: Vec<JoinHandle<()>>,
}

fn check_name(what: &str, n: &str, max: usize) -> Result<(), ClientError> {
    if n.is_empty() || n.len() > max || n.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(ClientError::Invalid(format!(
            "{what} {n:?}: 1..={max} bytes without spaces or control characters"
        )));
    }
    Ok(())
}

fn check_size(targets: usize, portals: usize) -> Result<(), ClientError> {
    // Nodes + portals + one portal group per (target, portal), as the server counts them.
    if portals > MAX_PORTALS || targets + portals + targets * portals > MAX_OBJECTS_PER_ENTITY {
        return Err(ClientError::Invalid(format!(
            "{targets} targets × {portals} portals exceed the {MAX_OBJECTS_PER_ENTITY} objects \
             an entity may have"
        )));
    }
    Ok(())
}

fn listen(server: SocketAddr, port: u16) -> Result<TcpListener, ClientError> {
    let any: IpAddr = if server.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let l =
        TcpListener::bind((any, port)).map_err(|source| ClientError::Listen { port, source })?;
    l.set_nonblocking(true)
        .map_err(|source| ClientError::Listen { port, source })?;
    Ok(l)
}

fn port_of(l: &TcpListener) -> Result<u16, ClientError> {
    l.local_addr()
        .map(|a| a.port())
        .map_err(|source| ClientError::Listen { port: 0, source })
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

impl IsnsClient {
    /// Starts a client with [`Timing::default`]; see [`IsnsClient::start_with`].
    pub fn start(server: SocketAddr, entity: EntityInfo) -> Result<IsnsClient, ClientError> {
        Self::start_with(server, entity, Timing::default())
    }

    /// Opens the ESI/SCN port, registers the entity once (a failure is logged and retried
    /// in the background: a name server that is down must not stop the daemon), and
    /// starts the maintenance and listener threads. Errors: invalid names or sizes, a port
    /// that cannot be opened, no thread.
    pub fn start_with(
        server: SocketAddr,
        entity: EntityInfo,
        timing: Timing,
    ) -> Result<IsnsClient, ClientError> {
        if !entity.eid.is_empty() {
            check_name("entity ID", &entity.eid, MAX_EID)?;
        }
        let mut targets = BTreeSet::new();
        for t in &entity.targets {
            check_name("target", t, MAX_ISCSI_NAME)?;
            targets.insert(t.clone());
        }
        let mut portals: Vec<(SocketAddr, u16)> = Vec::new();
        for p in &entity.portals {
            if p.0.port() == 0 {
                return Err(ClientError::Invalid(format!("portal {} has port 0", p.0)));
            }
            if !portals.iter().any(|q| q.0 == p.0) {
                portals.push(*p);
            }
        }
        check_size(targets.len(), portals.len())?;
        if timing.check_interval.is_zero() || timing.io_timeout.is_zero() {
            return Err(ClientError::Invalid("zero interval or timeout".into()));
        }
        let esi = listen(server, entity.esi_port.unwrap_or(0))?;
        let esi_port = port_of(&esi)?;
        let mut listeners = vec![esi];
        let scn_port = match entity.scn_port {
            Some(p) if p != esi_port => {
                let l = listen(server, p)?;
                let port = port_of(&l)?;
                listeners.push(l);
                port
            }
            _ => esi_port,
        };
        let shared = Arc::new(Shared {
            server,
            timing,
            eid: RwLock::new(entity.eid.clone()),
            generation: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            registered: AtomicBool::new(false),
            stats: Stats::default(),
        });
        let worker = Arc::new(Worker {
            shared: shared.clone(),
            state: Mutex::new(State {
                targets,
                portals,
                registered: false,
                conn: None,
                reg_portals: Vec::new(),
                failures: 0,
            }),
            wake: Condvar::new(),
            esi_port,
            scn_port,
        });
        let mut threads = Vec::new();
        {
            let (s, events) = (shared.clone(), shared.clone() as Arc<dyn inbound::Events>);
            threads.push(
                std::thread::Builder::new()
                    .name("isns-esi".into())
                    .spawn(move || inbound::serve(&listeners, &s.stop, &events))
                    .map_err(ClientError::Thread)?,
            );
        }
        // The first round here, so that in the usual case the targets are registered when
        // start returns.
        {
            let mut st = worker.lock();
            worker.round(&mut st);
        }
        {
            let w = worker.clone();
            let spawned = std::thread::Builder::new()
                .name("isns-client".into())
                .spawn(move || w.run());
            match spawned {
                Ok(h) => threads.push(h),
                Err(e) => {
                    shared.stop.store(true, Ordering::SeqCst);
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(ClientError::Thread(e));
                }
            }
        }
        Ok(IsnsClient {
            access: Arc::new(DdAccess::new(shared)),
            worker,
            threads,
        })
    }

    /// Registers another target (a Storage Node with a portal group per portal, and its SCN
    /// registration). It is part of the desired state even when this fails (the error says
    /// the server has not confirmed it): the next maintenance round registers it.
    pub fn add_target(&self, name: &str) -> Result<(), ClientError> {
        check_name("target", name, MAX_ISCSI_NAME)?;
        let mut st = self.worker.lock();
        if st.targets.contains(name) {
            return Ok(());
        }
        check_size(st.targets.len() + 1, st.portals.len())?;
        st.targets.insert(name.to_owned());
        self.worker.shared.bump_generation();
        let r = if st.registered {
            self.worker.register_node(&mut st, name)
        } else {
            self.worker.register_all(&mut st)
        };
        self.worker.note(&mut st, r)
    }

    /// Deregisters a target (the whole entity when it was the last one). It leaves the
    /// desired state even when this fails; the next re-registration (REPLACE) drops it.
    pub fn remove_target(&self, name: &str) -> Result<(), ClientError> {
        let mut st = self.worker.lock();
        if !st.targets.remove(name) {
            return Ok(());
        }
        self.worker.shared.bump_generation();
        if !st.registered {
            return Ok(());
        }
        let r = if st.targets.is_empty() {
            self.worker.deregister_entity(&mut st, name)
        } else {
            self.worker.deregister_node(&mut st, name)
        };
        self.worker.note(&mut st, r)
    }

    /// The discovery-domain access checker (shareable; outlives `stop` answering false).
    pub fn access(&self) -> Arc<DdAccess> {
        self.access.clone()
    }

    /// Shorthand for [`DdAccess::visible`].
    pub fn visible(&self, initiator: &str, target: &str) -> bool {
        self.access.visible(initiator, target)
    }

    /// The Entity ID in use (empty until the server assigned one, when none was given).
    pub fn eid(&self) -> String {
        self.worker.shared.eid()
    }

    /// The port the client answers ESIs on, and the one it receives SCNs on.
    pub fn ports(&self) -> (u16, u16) {
        (self.worker.esi_port, self.worker.scn_port)
    }

    pub fn stats(&self) -> ClientStats {
        let s = &self.worker.shared.stats;
        ClientStats {
            registered: self.worker.shared.registered.load(Ordering::SeqCst),
            registrations: s.registrations.get(),
            checks: s.checks.get(),
            esi_answered: s.esi.get(),
            scn_received: s.scn.get(),
            queries: s.queries.get(),
            query_errors: s.query_errors.get(),
            errors: s.errors.get(),
        }
    }

    /// Stops the threads and deregisters the entity (DevDereg of its EID). The error, if
    /// any, is the deregistration's: the server then drops the entity when ESI goes
    /// unanswered.
    pub fn stop(mut self) -> Result<(), ClientError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), ClientError> {
        if self.threads.is_empty() {
            return Ok(());
        }
        {
            let _st = self.worker.lock();
            self.worker.shared.stop.store(true, Ordering::SeqCst);
            self.worker.wake.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let mut st = self.worker.lock();
        let Some(source) = st.targets.iter().next().cloned() else {
            return Ok(());
        };
        if !st.registered {
            return Ok(());
        }
        let r = self.worker.deregister_entity(&mut st, &source);
        st.conn = None;
        self.worker
            .shared
            .registered
            .store(st.registered, Ordering::SeqCst);
        r
    }
}

impl Drop for IsnsClient {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(error = %e, "iSNS deregistration failed");
        }
    }
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
