//! TCP for the SAN protocols: the iSCSI server.
//!
//! - [`IscsiServer`]: the listening portals and the login thread ([`login_thread`]), one
//!   epoll thread that accepts connections and owns them until their login completes (with
//!   bounds on half-open connections, login time and PDU size, so floods and trickled bytes
//!   cost only that thread), serves discovery sessions itself, and hands each normal session
//!   to the least loaded reactor as a [`conn::ConnPoller`].
//! - [`conn`]: the connection poller on a reactor: receives and sends through the reactor's
//!   io_uring engine, the session ([`crate::iscsi::session`]) in between.
//!
//! Session reinstatement (RFC 7143 §6.3.5): a new login with the same initiator name and
//! ISID replaces the running session: the old connection is shut down.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dataplane::reactor::ReactorLink;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::iscsi::session::SessionCounters;
use crate::target::Registry;

pub mod conn;
pub mod login_thread;

#[cfg(test)]
mod test_initiator;
#[cfg(test)]
mod tests;

use conn::{ConnCounters, ConnShared};

/// Connections one reactor serves at most. Each keeps a receive (and at times a send) in
/// flight on the reactor's io_uring for as long as it lives, and the ring holds
/// `dataplane::engine::uring::URING_ENTRIES` (256) operations: 64 connections take at most
/// 128 of them, the rest is left for disk I/O of the sessions and the vhost-user queues.
pub const CONNECTIONS_PER_REACTOR_MAX: usize = 64;
/// Connections in login (or in a discovery session) at once; beyond it the oldest is
/// dropped, so a flood of idle connections cannot keep real initiators out for long.
pub const HALF_OPEN_MAX: usize = 1024;
/// Time from accept to the end of the login; then the connection is dropped.
pub const LOGIN_DEADLINE: Duration = Duration::from_secs(15);
/// Lifetime of a discovery session (SendTargets and logout take milliseconds).
pub const DISCOVERY_DEADLINE: Duration = Duration::from_secs(60);
/// Accept queue length of a portal (the kernel caps it at net.core.somaxconn).
pub const LISTEN_BACKLOG: i32 = 4096;
/// Time `shutdown` waits for sessions to leave their reactors.
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);
/// Time `shutdown` gives the initiators, all together, to log out after it asked them to
/// (Async Message, AsyncEvent 1); the sessions still there then are cut.
pub const SHUTDOWN_LOGOUT_WAIT: Duration = Duration::from_secs(2);

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A portal could not be opened.
    #[error("iSCSI portal {addr}: {source}")]
    Listen {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// No reactor to serve sessions.
    #[error("the iSCSI server needs at least one reactor")]
    NoReactors,
    /// Setting up the login thread failed.
    #[error("iSCSI login thread: {0}")]
    Setup(#[from] std::io::Error),
}

/// Counters of the login thread.
#[derive(Debug, Default)]
pub struct LoginCounters {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Half-open connections dropped to make room for new ones.
    pub half_open_dropped: AtomicU64,
    /// Connections dropped at the login deadline.
    pub login_timeouts: AtomicU64,
    /// Logins that reached full-feature phase (normal and discovery).
    pub logins_ok: AtomicU64,
    /// Logins refused (answered with a failure status).
    pub logins_failed: AtomicU64,
    /// Connections dropped for malformed PDUs or oversized output during login/discovery.
    pub login_protocol_errors: AtomicU64,
    /// Discovery sessions.
    pub discovery_sessions: AtomicU64,
    /// Sessions replaced by a new login with the same initiator and ISID.
    pub sessions_reinstated: AtomicU64,
    /// Normal sessions refused because every reactor was full.
    pub sessions_refused: AtomicU64,
    /// Connections in login or discovery now.
    pub half_open: AtomicU64,
}

/// A snapshot of the server's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct IscsiStats {
    /// Connections accepted.
    pub connections: u64,
    /// Connections in login or discovery now.
    pub half_open: u64,
    /// Half-open connections dropped for room.
    pub half_open_dropped: u64,
    /// Connections dropped at the login deadline.
    pub login_timeouts: u64,
    /// Logins that succeeded.
    pub logins_ok: u64,
    /// Logins refused.
    pub logins_failed: u64,
    /// Connections dropped for protocol errors during login or discovery.
    pub login_protocol_errors: u64,
    /// Discovery sessions.
    pub discovery_sessions: u64,
    /// Normal sessions running.
    pub sessions: u64,
    /// Sessions reinstated.
    pub sessions_reinstated: u64,
    /// Sessions refused (reactors full).
    pub sessions_refused: u64,
    /// Connections lost (peer gone, I/O error).
    pub connections_lost: u64,
    /// SCSI commands.
    pub commands: u64,
    /// PDUs rejected.
    pub pdus_rejected: u64,
    /// Commands dropped for a CmdSN outside the window.
    pub cmdsn_dropped: u64,
    /// Data digest errors.
    pub data_digest_errors: u64,
    /// Header digest errors.
    pub header_digest_errors: u64,
    /// Connections dropped for protocol errors in full-feature phase.
    pub protocol_errors: u64,
    /// Task management requests.
    pub task_management: u64,
    /// Tasks aborted.
    pub tasks_aborted: u64,
    /// Keepalive timeouts.
    pub keepalive_timeouts: u64,
    /// Sessions ended because their target was deleted.
    pub target_removed: u64,
}

/// A running session's identity: initiator name (lower case) and ISID.
pub(crate) type SessionKey = (String, [u8; 6]);

/// Everything the server's threads share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) login: LoginCounters,
    pub(crate) session: Arc<SessionCounters>,
    pub(crate) conn: Arc<ConnCounters>,
    /// Running normal sessions by (initiator name in lower case, ISID).
    pub(crate) sessions: Mutex<HashMap<SessionKey, Arc<ConnShared>>>,
    /// Per reactor: its link and how many connections it serves.
    pub(crate) reactors: Vec<(ReactorLink, Arc<AtomicUsize>)>,
}

/// Reads an [`IscsiServer`]'s counters from any thread, for as long as it is held.
#[derive(Debug, Clone)]
pub struct IscsiStatsHandle {
    shared: Arc<Shared>,
}

impl IscsiStatsHandle {
    /// The counters now.
    pub fn stats(&self) -> IscsiStats {
        let l = &self.shared.login;
        let s = &self.shared.session;
        let c = &self.shared.conn;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        IscsiStats {
            connections: g(&l.accepted),
            half_open: g(&l.half_open),
            half_open_dropped: g(&l.half_open_dropped),
            login_timeouts: g(&l.login_timeouts),
            logins_ok: g(&l.logins_ok),
            logins_failed: g(&l.logins_failed),
            login_protocol_errors: g(&l.login_protocol_errors),
            discovery_sessions: g(&l.discovery_sessions),
            sessions: g(&c.sessions),
            sessions_reinstated: g(&l.sessions_reinstated),
            sessions_refused: g(&l.sessions_refused),
            connections_lost: g(&c.connections_lost),
            commands: g(&s.commands),
            pdus_rejected: g(&s.rejects),
            cmdsn_dropped: g(&s.cmdsn_dropped),
            data_digest_errors: g(&s.data_digest_errors),
            header_digest_errors: g(&s.header_digest_errors),
            protocol_errors: g(&s.protocol_errors),
            task_management: g(&s.task_management),
            tasks_aborted: g(&s.tasks_aborted),
            keepalive_timeouts: g(&s.keepalive_timeouts),
            target_removed: g(&s.target_removed),
        }
    }
}

/// The iSCSI target server (see the module comment).
#[derive(Debug)]
pub struct IscsiServer {
    shared: Arc<Shared>,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    addrs: Vec<SocketAddr>,
}

impl IscsiServer {
    /// Binds `portals` (TPGT 1 for all: one portal group), registers them with `registry`,
    /// and spawns the login thread; sessions run on `reactors`.
    pub fn start(
        registry: Arc<Registry>,
        portals: &[SocketAddr],
        reactors: Vec<ReactorLink>,
    ) -> Result<IscsiServer, TransportError> {
        if reactors.is_empty() {
            return Err(TransportError::NoReactors);
        }
        let mut listeners = Vec::with_capacity(portals.len());
        let mut addrs = Vec::with_capacity(portals.len());
        for &addr in portals {
            let l = std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|source| TransportError::Listen { addr, source })?;
            // A deep accept queue: a burst of connections waits there for the login thread
            // instead of having its SYNs dropped (listen(2) again only resizes it).
            // SAFETY: listen on a socket we own; no memory is involved.
            unsafe { libc::listen(l.as_raw_fd(), LISTEN_BACKLOG) };
            let bound = l
                .local_addr()
                .map_err(|source| TransportError::Listen { addr, source })?;
            let portal = crate::target::Portal {
                addr: bound,
                tpgt: 1,
            };
            registry.add_portal(portal);
            addrs.push(bound);
            listeners.push((l, portal));
        }
        let shared = Arc::new(Shared {
            login: LoginCounters::default(),
            session: Arc::new(SessionCounters::default()),
            conn: Arc::new(ConnCounters::default()),
            sessions: Mutex::new(HashMap::new()),
            reactors: reactors
                .into_iter()
                .map(|l| (l, Arc::new(AtomicUsize::new(0))))
                .collect(),
        });
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let t = login_thread::LoginThread::new(registry, listeners, shared.clone(), stop.clone())?;
        let thread = std::thread::Builder::new()
            .name("iscsi-login".into())
            .spawn(move || t.run())?;
        Ok(IscsiServer {
            shared,
            stop,
            thread: Some(thread),
            addrs,
        })
    }

    /// The addresses listened on (with the ports the kernel chose for port 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The counters now.
    pub fn stats(&self) -> IscsiStats {
        self.stats_handle().stats()
    }

    /// A handle that reads the counters from another thread (the control socket's).
    pub fn stats_handle(&self) -> IscsiStatsHandle {
        IscsiStatsHandle {
            shared: self.shared.clone(),
        }
    }

    /// Stops accepting (the login thread closes its listeners and half-open connections),
    /// asks every session's initiator to log out (Async Message, AsyncEvent 1) and gives
    /// them [`SHUTDOWN_LOGOUT_WAIT`] in all, ends the sessions still there (their sockets
    /// are shut down; each poller leaves its reactor once its in-flight operations
    /// completed), and waits for them up to [`SHUTDOWN_WAIT`].
    pub fn shutdown(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        let Some(t) = self.thread.take() else {
            return;
        };
        let _ = self.stop.write(1);
        let _ = t.join();
        let sessions: Vec<Arc<ConnShared>> = {
            let mut m = self
                .shared
                .sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            m.drain().map(|(_, v)| v).collect()
        };
        for s in &sessions {
            s.request_logout();
        }
        let logout_deadline = Instant::now() + SHUTDOWN_LOGOUT_WAIT;
        while Instant::now() < logout_deadline
            && sessions.iter().any(|s| !s.ended.load(Ordering::Acquire))
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        for s in &sessions {
            if !s.ended.load(Ordering::Acquire) {
                s.kill();
            }
        }
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        while self
            .shared
            .reactors
            .iter()
            .any(|(_, live)| live.load(Ordering::Acquire) > 0)
        {
            if Instant::now() >= deadline {
                tracing::warn!("iSCSI sessions still on their reactors at shutdown");
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        tracing::debug!(fd = self.stop.as_raw_fd(), "iSCSI server stopped");
    }
}

impl Drop for IscsiServer {
    fn drop(&mut self) {
        self.stop_all();
    }
}
