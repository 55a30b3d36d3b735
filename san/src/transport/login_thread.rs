//! The login thread: one epoll loop that accepts connections on every portal and owns them
//! until their login completes. It runs the login state machine ([`Login`]), serves
//! discovery sessions ([`Discovery`]) to their end, and hands each normal session to the
//! least loaded reactor as a [`ConnPoller`].
//!
//! Hostile input stays here: at most [`HALF_OPEN_MAX`] connections (the oldest is dropped
//! for a new one), [`LOGIN_DEADLINE`] from accept to full-feature phase, login PDUs framed
//! with the login-phase limits, output bounded. A connection that trickles bytes or never
//! finishes costs a little memory of this thread, never a reactor.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use dataplane::reactor::Command;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::conn::{self, ConnPoller, ConnSetup, ConnShared};
use super::{
    Shared, CONNECTIONS_PER_REACTOR_MAX, DISCOVERY_DEADLINE, HALF_OPEN_MAX, LOGIN_DEADLINE,
};
use crate::iscsi::discovery::{Discovery, DiscoveryStep};
use crate::iscsi::login::{Established, Login, LoginConfig, LoginOffer, LoginStep, SessionKind};
use crate::iscsi::pdu::{
    append_pdu, frame, reject, stage, Bhs, Framing, LoginResponse, PduError, BHS_LEN,
};
use crate::iscsi::session::{Session, SessionSetup, R2T_MAX, TASK_WINDOW};
use crate::target::{Portal, Registry};

/// epoll token of the stop eventfd.
const TOKEN_STOP: u64 = u64::MAX;
/// Connection tokens start here (listener tokens are their index).
const TOKEN_CONN_BASE: u64 = 1 << 32;
/// Connections accepted per listener wake-up (the rest on the next: level-triggered).
const ACCEPT_BATCH: usize = 64;
/// Bytes read per call.
const READ_CHUNK: usize = 16 * 1024;
/// Output a login or discovery connection may have waiting before it is dropped (a peer
/// that does not read).
const WBUF_MAX: usize = 1 << 20;
/// How long a portal stops accepting after accept(2) failed (out of descriptors).
const ACCEPT_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);
/// epoll events per wait.
const EVENTS_MAX: usize = 256;
/// Longest sleep: deadlines are checked at least this often.
const WAIT_MAX_MS: i32 = 1000;

/// The target's operational offer.
pub fn offer() -> LoginOffer {
    LoginOffer {
        max_recv_data_segment: 256 * 1024,
        // A burst never needs to exceed the largest transfer one command may ask for.
        max_burst: crate::scsi::MAX_TRANSFER_BYTES,
        first_burst: 256 * 1024,
        max_outstanding_r2t: R2T_MAX as u32,
        immediate_data: true,
        initial_r2t: false,
        digests: true,
        cmd_window: TASK_WINDOW,
    }
}

enum Phase {
    Login(Box<Login>),
    Discovery(Box<Discovery>, Framing),
    /// Final Login Response being written; then the session goes to a reactor.
    Handover(Box<Established>),
    /// Output being written; then closed.
    Closing,
}

struct HalfOpen {
    sock: TcpStream,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    wpos: usize,
    phase: Phase,
    deadline: Instant,
    want_out: bool,
    /// A login request named SessionType=Discovery (needs no reactor).
    discovery: bool,
}

/// The login thread's state (see the module comment).
pub(crate) struct LoginThread {
    epoll: Epoll,
    listeners: Vec<(TcpListener, Arc<LoginConfig>)>,
    conns: BTreeMap<u64, HalfOpen>,
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    next_id: u64,
    registry: Arc<Registry>,
    shared: Arc<Shared>,
    /// Kept open while the thread watches it.
    _stop: Arc<EventFd>,
    scratch: Box<[u8]>,
    next_conn_name: u64,
    /// Portals paused after a failed accept: (until, listener index).
    paused: Vec<(Instant, usize)>,
}

impl LoginThread {
    pub(crate) fn new(
        registry: Arc<Registry>,
        listeners: Vec<(TcpListener, Portal)>,
        shared: Arc<Shared>,
        stop: Arc<EventFd>,
    ) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_STOP),
        )?;
        let tsih = Arc::new(AtomicU16::new(1));
        let mut ls = Vec::with_capacity(listeners.len());
        for (i, (l, portal)) in listeners.into_iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                l.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
            let cfg = Arc::new(LoginConfig {
                registry: registry.clone(),
                portal,
                tsih: tsih.clone(),
                offer: offer(),
            });
            ls.push((l, cfg));
        }
        Ok(LoginThread {
            epoll,
            listeners: ls,
            conns: BTreeMap::new(),
            deadlines: BinaryHeap::new(),
            next_id: 0,
            registry,
            shared,
            _stop: stop,
            scratch: vec![0u8; READ_CHUNK].into_boxed_slice(),
            next_conn_name: 0,
            paused: Vec::new(),
        })
    }

    pub(crate) fn run(mut self) {
        let mut events = vec![EpollEvent::default(); EVENTS_MAX];
        loop {
            let wait = if self.paused.is_empty() {
                WAIT_MAX_MS
            } else {
                ACCEPT_PAUSE.as_millis() as i32
            };
            let n = match self.epoll.wait(wait, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => 0,
                Err(e) => {
                    tracing::error!(err = %e, "login thread epoll failed");
                    break;
                }
            };
            let mut stop = false;
            for ev in &events[..n] {
                let token = ev.data();
                if token == TOKEN_STOP {
                    stop = true;
                } else if token < TOKEN_CONN_BASE {
                    self.accept(token as usize);
                } else {
                    let id = token - TOKEN_CONN_BASE;
                    let es = ev.event_set();
                    if es.intersects(EventSet::OUT) {
                        self.write(id);
                    }
                    if es.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                        self.read(id);
                    }
                }
            }
            if stop {
                break;
            }
            self.expire();
            self.prune_sessions();
        }
        // Half-open connections close with the thread; listeners too.
        self.shared
            .login
            .half_open
            .fetch_sub(self.conns.len() as u64, Ordering::Relaxed);
    }

    fn accept(&mut self, li: usize) {
        for _ in 0..ACCEPT_BATCH {
            let Some((l, _)) = self.listeners.get(li) else {
                return;
            };
            let sock = match l.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    // EMFILE and the like: the listener stays readable, so it leaves the
                    // epoll set for a while instead of spinning this thread; the oldest
                    // half-open connection makes room.
                    tracing::warn!(err = %e, "accept failed; pausing this portal");
                    if let Some((&oldest, _)) = self.conns.iter().next() {
                        bump(&self.shared.login.half_open_dropped);
                        self.drop_conn(oldest);
                    }
                    let fd = self.listeners[li].0.as_raw_fd();
                    let _ = self
                        .epoll
                        .ctl(ControlOperation::Delete, fd, EpollEvent::default());
                    self.paused.push((Instant::now() + ACCEPT_PAUSE, li));
                    return;
                }
            };
            bump(&self.shared.login.accepted);
            if sock.set_nonblocking(true).is_err() {
                continue;
            }
            let _ = sock.set_nodelay(true);
            if self.conns.len() >= HALF_OPEN_MAX {
                if let Some((&oldest, _)) = self.conns.iter().next() {
                    bump(&self.shared.login.half_open_dropped);
                    self.drop_conn(oldest);
                }
            }
            let id = self.next_id;
            self.next_id += 1;
            let ev = EpollEvent::new(EventSet::IN, TOKEN_CONN_BASE + id);
            if self
                .epoll
                .ctl(ControlOperation::Add, sock.as_raw_fd(), ev)
                .is_err()
            {
                continue;
            }
            let deadline = Instant::now() + LOGIN_DEADLINE;
            let login = Login::new(self.listeners[li].1.clone());
            self.conns.insert(
                id,
                HalfOpen {
                    sock,
                    rbuf: Vec::new(),
                    wbuf: Vec::new(),
                    wpos: 0,
                    phase: Phase::Login(Box::new(login)),
                    deadline,
                    want_out: false,
                    discovery: false,
                },
            );
            self.deadlines.push(Reverse((deadline, id)));
            self.shared.login.half_open.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn drop_conn(&mut self, id: u64) {
        if let Some(c) = self.conns.remove(&id) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.sock.as_raw_fd(),
                EpollEvent::default(),
            );
            self.shared.login.half_open.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn expire(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.paused.len() {
            let (until, li) = self.paused[i];
            if until > now {
                i += 1;
                continue;
            }
            self.paused.swap_remove(i);
            let fd = self.listeners[li].0.as_raw_fd();
            let ev = EpollEvent::new(EventSet::IN, li as u64);
            let _ = self.epoll.ctl(ControlOperation::Add, fd, ev);
        }
        while let Some(Reverse((at, id))) = self.deadlines.peek().copied() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            // Stale entries (a connection gone, or with a later deadline) are skipped.
            if self.conns.get(&id).is_some_and(|c| c.deadline <= now) {
                bump(&self.shared.login.login_timeouts);
                self.drop_conn(id);
            }
        }
    }

    fn prune_sessions(&mut self) {
        let mut m = self
            .shared
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        m.retain(|_, s| !s.ended.load(Ordering::Acquire));
    }

    fn read(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if matches!(c.phase, Phase::Closing | Phase::Handover(_)) {
            // Nothing more is read; a hang-up ends it.
            let mut probe = [0u8; 1];
            if matches!(c.sock.peek(&mut probe), Ok(0) | Err(_)) {
                self.drop_conn(id);
            }
            return;
        }
        let n = match c.sock.read(&mut self.scratch) {
            Ok(0) => {
                self.drop_conn(id);
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                return
            }
            Err(_) => {
                self.drop_conn(id);
                return;
            }
        };
        c.rbuf.extend_from_slice(&self.scratch[..n]);
        self.process(id);
    }

    /// Frames and handles every complete PDU of a connection's input.
    fn process(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let mut used = 0;
        let mut fatal = false;
        loop {
            let framing = match &c.phase {
                Phase::Login(_) => Framing::LOGIN,
                Phase::Discovery(_, f) => *f,
                _ => break,
            };
            let buf = &c.rbuf[used..];
            let f = match frame(buf, &framing) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(PduError::DataDigest { bhs, total_len, .. }) => {
                    // A discovery session rejects the PDU and goes on (§7.8).
                    if let Phase::Discovery(d, _) = &mut c.phase {
                        d.reject(&bhs, reject::DATA_DIGEST, &mut c.wbuf);
                        used += total_len;
                        continue;
                    }
                    bump(&self.shared.login.login_protocol_errors);
                    fatal = true;
                    break;
                }
                Err(e) => {
                    tracing::debug!(err = %e, "bad PDU during login or discovery");
                    bump(&self.shared.login.login_protocol_errors);
                    fatal = true;
                    break;
                }
            };
            match &mut c.phase {
                Phase::Login(login) => {
                    let data = &buf[f.data.clone()];
                    if memchr::memmem::find(data, b"SessionType=Discovery\0").is_some() {
                        c.discovery = true;
                    }
                    // A normal session about to reach full-feature phase while every reactor
                    // is full: refused now (target error, out of resources) rather than
                    // dropped after a successful login.
                    let to_ffp = f.bhs.login_transit() && f.bhs.login_nsg() == stage::FULL_FEATURE;
                    if to_ffp && !c.discovery && !reactor_room(&self.shared) {
                        bump(&self.shared.login.sessions_refused);
                        refuse(&f.bhs, &mut c.wbuf);
                        c.phase = Phase::Closing;
                        used += f.total_len;
                        break;
                    }
                    match login.on_request(&f.bhs, data, &mut c.wbuf) {
                        LoginStep::Continue => {}
                        LoginStep::Failed => {
                            bump(&self.shared.login.logins_failed);
                            c.phase = Phase::Closing;
                        }
                        LoginStep::Established(est) => {
                            bump(&self.shared.login.logins_ok);
                            match est.kind {
                                SessionKind::Discovery => {
                                    bump(&self.shared.login.discovery_sessions);
                                    let d = Discovery::new(&est, self.registry.clone());
                                    let framing = d.framing();
                                    c.phase = Phase::Discovery(Box::new(d), framing);
                                    c.deadline = Instant::now() + DISCOVERY_DEADLINE;
                                    self.deadlines.push(Reverse((c.deadline, id)));
                                }
                                SessionKind::Normal => c.phase = Phase::Handover(est),
                            }
                        }
                    }
                }
                Phase::Discovery(d, _) => {
                    if d.on_pdu(&f, buf, &mut c.wbuf) == DiscoveryStep::Close {
                        c.phase = Phase::Closing;
                    }
                }
                _ => break,
            }
            used += f.total_len;
            if c.wbuf.len() > WBUF_MAX {
                bump(&self.shared.login.login_protocol_errors);
                fatal = true;
                break;
            }
        }
        c.rbuf.drain(..used);
        if c.rbuf.capacity() > READ_CHUNK * 2 && c.rbuf.len() < READ_CHUNK {
            c.rbuf.shrink_to(READ_CHUNK);
        }
        if fatal {
            self.drop_conn(id);
            return;
        }
        self.write(id);
    }

    /// Writes pending output; then closes or hands over a finished login.
    fn write(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        while c.wpos < c.wbuf.len() {
            match c.sock.write(&c.wbuf[c.wpos..]) {
                Ok(0) => {
                    self.drop_conn(id);
                    return;
                }
                Ok(n) => c.wpos += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if !c.want_out {
                        c.want_out = true;
                        let ev =
                            EpollEvent::new(EventSet::IN | EventSet::OUT, TOKEN_CONN_BASE + id);
                        let _ = self
                            .epoll
                            .ctl(ControlOperation::Modify, c.sock.as_raw_fd(), ev);
                    }
                    return;
                }
                Err(_) => {
                    self.drop_conn(id);
                    return;
                }
            }
        }
        c.wbuf.clear();
        c.wpos = 0;
        if c.want_out {
            c.want_out = false;
            let ev = EpollEvent::new(EventSet::IN, TOKEN_CONN_BASE + id);
            let _ = self
                .epoll
                .ctl(ControlOperation::Modify, c.sock.as_raw_fd(), ev);
        }
        match c.phase {
            Phase::Closing => self.drop_conn(id),
            Phase::Handover(_) => self.handover(id),
            _ => {}
        }
    }

    /// Moves an established normal session to the least loaded reactor.
    fn handover(&mut self, id: u64) {
        let Some(c) = self.conns.remove(&id) else {
            return;
        };
        self.shared.login.half_open.fetch_sub(1, Ordering::Relaxed);
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            c.sock.as_raw_fd(),
            EpollEvent::default(),
        );
        let Phase::Handover(est) = c.phase else {
            return;
        };
        let Some(target) = est.target.clone() else {
            return;
        };
        let Some((link, live)) = self
            .shared
            .reactors
            .iter()
            .min_by_key(|(_, live)| live.load(Ordering::Acquire))
            .filter(|(_, live)| live.load(Ordering::Acquire) < CONNECTIONS_PER_REACTOR_MAX)
            .cloned()
        else {
            bump(&self.shared.login.sessions_refused);
            tracing::warn!("every reactor serves its most iSCSI connections; session refused");
            return;
        };
        // The engine never waits on the socket (io_uring polls it; the sync engine passes
        // MSG_DONTWAIT), so it goes back to blocking mode, which every kernel's io_uring
        // handles without surprises.
        if c.sock.set_nonblocking(false).is_err() {
            return;
        }
        let sock = OwnedFd::from(c.sock);
        let made = conn::timerfd().and_then(|timer| {
            let shared = ConnShared::new(&sock, &timer)?;
            Ok((timer, shared))
        });
        let (timer, shared) = match made {
            Ok((timer, shared)) => (timer, Arc::new(shared)),
            Err(e) => {
                tracing::error!(err = %e, "connection setup failed");
                return;
            }
        };
        let key = (est.initiator_name.to_ascii_lowercase(), est.isid);
        {
            let mut m = self
                .shared
                .sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(old) = m.insert(key, shared.clone()) {
                if !old.ended.load(Ordering::Acquire) {
                    bump(&self.shared.login.sessions_reinstated);
                    old.reinstated.store(true, Ordering::Release);
                    old.kill();
                }
            }
        }
        let setup = SessionSetup {
            initiator_name: est.initiator_name.clone(),
            isid: est.isid,
            tsih: est.tsih,
            cid: est.cid,
            target,
            tpgt: est.tpgt,
            params: est.params,
            exp_cmd_sn: est.exp_cmd_sn,
            stat_sn: est.stat_sn,
            portals: self.registry.portals(),
            registry: self.registry.clone(),
        };
        let session = Session::new(setup, self.shared.session.clone());
        self.next_conn_name += 1;
        let name: Arc<str> = Arc::from(format!("iscsi-conn{}", self.next_conn_name));
        live.fetch_add(1, Ordering::AcqRel);
        let poller = ConnPoller::new(ConnSetup {
            name: name.clone(),
            sock,
            timer,
            session,
            leftover: c.rbuf,
            link: link.clone(),
            shared: shared.clone(),
            live: live.clone(),
            counters: self.shared.conn.clone(),
        });
        match poller {
            Ok(p) => {
                if let Err(e) = link.send(Command::AddPoller(Box::new(p))) {
                    tracing::error!(err = %e, "reactor gone; session dropped");
                }
            }
            Err(e) => {
                live.fetch_sub(1, Ordering::AcqRel);
                shared.ended.store(true, Ordering::Release);
                tracing::error!(err = %e, "connection poller setup failed");
            }
        }
        tracing::debug!(conn = %name, initiator = %est.initiator_name, "session established");
    }
}

/// Whether some reactor can take one more connection.
fn reactor_room(shared: &Shared) -> bool {
    shared
        .reactors
        .iter()
        .any(|(_, live)| live.load(Ordering::Acquire) < CONNECTIONS_PER_REACTOR_MAX)
}

/// The Login Response refusing a login for lack of resources (status 0x0302).
fn refuse(req: &Bhs, out: &mut Vec<u8>) {
    let mut b = [0u8; BHS_LEN];
    LoginResponse {
        transit: false,
        cont: false,
        csg: req.login_csg(),
        nsg: 0,
        version_max: 0,
        version_active: 0,
        isid: req.isid(),
        tsih: 0,
        itt: req.itt(),
        stat_sn: req.expstatsn(),
        exp_cmd_sn: req.cmdsn(),
        max_cmd_sn: req.cmdsn(),
        status_class: 3,
        status_detail: 2,
        data_len: 0,
    }
    .write(&mut b);
    append_pdu(out, &b, &[], &Framing::LOGIN);
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}
