//! The connection poller: one established iSCSI connection served by a reactor.
//!
//! The socket's receives and sends go through the reactor's engine: one receive is always
//! in flight into the receive buffer (sized for a full PDU at the negotiated limits; every
//! complete PDU in it is handed to the session, the leftover moved to the front), and at most
//! one `sendmsg` whose gather list covers as many queued PDUs as fit (headers, digests and
//! Data-In slices straight from the task buffers; partial sends continue where they
//! stopped). The reactor sleeps on a timerfd (keepalive ticks); engine completions wake it
//! through the engine's own eventfd. With an engine that completes at push time (the
//! synchronous fallback) the poller sleeps on an epoll set of the timerfd and the socket
//! instead, since a receive is not kept in flight there.
//!
//! A connection ends (peer gone, fatal protocol error, logout, server shutdown, session
//! reinstated by a new login): the socket is shut down so an in-flight receive completes,
//! the session abandons its tasks, and once no engine operation references its buffers the
//! poller asks its reactor to remove it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dataplane::engine::{Completion, IoOp};
use dataplane::poller::{tag_of, PollCx, Poller};
use dataplane::reactor::{Command, ReactorLink};

use crate::iscsi::pdu::{frame, PduError};
use crate::iscsi::session::{Flow, Session, TASKS_MAX};

/// Engine tag of the connection's receive.
const TAG_RECV: u16 = u16::MAX;
/// Engine tag of the connection's send.
const TAG_SEND: u16 = u16::MAX - 1;
const _: () = assert!(TASKS_MAX < TAG_SEND as usize);
/// iovecs per `sendmsg`: up to ~40 PDUs (header, data, trailer each) in one system call.
pub const SEND_IOV_MAX: usize = 128;
/// Bytes per `sendmsg` at most (a bigger gather list only fills the socket buffer).
pub const SEND_BYTES_MAX: usize = 1 << 20;
/// Receive buffer room beyond one PDU, so several small PDUs arrive in one receive.
pub const RECV_SLACK: usize = 64 * 1024;
/// Sync engine: how long a receive that found nothing waits before it is tried again while
/// the reactor is kept busy by others (a sleeping reactor wakes on the socket anyway).
pub const SYNC_RECV_RETRY: Duration = Duration::from_micros(50);
/// Polls between two clock readings of a busy connection (keepalive ticks need seconds).
pub const CLOCK_EVERY: u32 = 64;
/// Keepalive tick (the timerfd's period): how often an idle connection is looked at.
pub const TICK: Duration = Duration::from_secs(5);
/// Parameter3 of the Async Message asking for a logout at shutdown: the seconds the
/// initiator has to log out (the server waits `super::SHUTDOWN_LOGOUT_WAIT` for all).
pub const LOGOUT_WITHIN_SECS: u16 = 2;

/// What the server and a connection share: the way to end it from outside (reinstatement,
/// shutdown) and whether it has ended.
#[derive(Debug)]
pub struct ConnShared {
    /// A second descriptor of the socket: `shutdown(2)` through it ends the connection
    /// without racing with the poller closing its own.
    pub dup: OwnedFd,
    /// Set once the poller has left its reactor (or is about to).
    pub ended: AtomicBool,
    /// A new login took over this session's I_T nexus (reinstatement): the nexus lives on,
    /// so the ending connection must not report it lost to the units.
    pub reinstated: AtomicBool,
    /// The server is shutting down: the connection asks its initiator to log out.
    pub logout: AtomicBool,
    /// A second descriptor of the poller's timer, armed to wake its reactor at once.
    pub timer: OwnedFd,
}

impl ConnShared {
    /// The shared part of a connection on `sock` whose poller ticks on `timer`.
    pub fn new(sock: &OwnedFd, timer: &OwnedFd) -> std::io::Result<Self> {
        Ok(ConnShared {
            dup: sock.try_clone()?,
            ended: AtomicBool::new(false),
            reinstated: AtomicBool::new(false),
            logout: AtomicBool::new(false),
            timer: timer.try_clone()?,
        })
    }

    /// Asks the initiator to log out (server shutdown): the poller sends an Async Message
    /// (AsyncEvent 1, target requests logout) on its next iteration, which this wakes.
    pub fn request_logout(&self) {
        self.logout.store(true, Ordering::Release);
        arm_tick(self.timer.as_raw_fd(), true);
    }

    /// Ends the connection: its receive completes and the poller winds down.
    pub fn kill(&self) {
        // SAFETY: shutdown on a descriptor this struct owns; no memory is involved.
        unsafe { libc::shutdown(self.dup.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

/// The sendmsg header and its gather list, at a fixed address while a send is in flight.
struct SendBuf {
    iov: [libc::iovec; SEND_IOV_MAX],
    msg: libc::msghdr,
}

// SAFETY: the raw pointers in SendBuf point into the poller's own buffers (its boxed iovec
// array, the session's send queue and task buffers), which move with the poller; the poller
// is used by one thread at a time (the reactor that owns it).
unsafe impl Send for SendBuf {}

/// Counters the connection keeps up to date for the server.
#[derive(Debug, Default)]
pub struct ConnCounters {
    /// Normal sessions running on reactors.
    pub sessions: AtomicU64,
    /// Connections that ended on a receive or send error or end of stream.
    pub connections_lost: AtomicU64,
}

/// One iSCSI connection on a reactor (see the module comment).
pub struct ConnPoller {
    name: Arc<str>,
    sock: OwnedFd,
    timer: OwnedFd,
    /// Sync-engine mode: an epoll set of the timer and the socket.
    sync_epoll: Option<OwnedFd>,
    session: Session,
    rbuf: Box<[u8]>,
    rstart: usize,
    rend: usize,
    recv_inflight: bool,
    send_inflight: bool,
    /// Sync mode: the last receive found nothing; the next waits for the reactor's wake-up
    /// (the socket is in its epoll set) or, while the reactor stays busy with other pollers,
    /// until this time.
    recv_idle: Option<Instant>,
    send: Box<SendBuf>,
    next_tick: Instant,
    /// Polls so far (the clock is read every [`CLOCK_EVERY`]).
    polls: u32,
    /// The clock is read at the next poll (after a sleep).
    clock_due: bool,
    /// The last reading.
    last_now: Instant,
    closing: bool,
    /// The Async Message asking for a logout went out (server shutdown).
    logout_asked: bool,
    removal_sent: bool,
    /// The reactor is removing the poller itself (its Shutdown, or our own removal request).
    stopped: bool,
    link: ReactorLink,
    shared: Arc<ConnShared>,
    live: Arc<AtomicUsize>,
    counters: Arc<ConnCounters>,
}

impl std::fmt::Debug for ConnPoller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnPoller")
            .field("name", &self.name)
            .field("closing", &self.closing)
            .finish()
    }
}

/// The poller's keepalive timer (periodic, [`TICK`]); created before the poller, so the
/// connection's [`ConnShared`] can hold a descriptor of it.
pub fn timerfd() -> std::io::Result<OwnedFd> {
    // SAFETY: timerfd_create returns a new descriptor we own (or -1).
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if arm_tick(fd.as_raw_fd(), false) != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Arms the keepalive timer `fd` to expire every [`TICK`], the first time at once (`now`) or
/// after a period; returns timerfd_settime's result.
fn arm_tick(fd: RawFd, now: bool) -> libc::c_int {
    let period = libc::timespec {
        tv_sec: TICK.as_secs() as libc::time_t,
        tv_nsec: 0,
    };
    let first = if now {
        // The smallest non-zero value: zero would disarm the timer.
        libc::timespec {
            tv_sec: 0,
            tv_nsec: 1,
        }
    } else {
        period
    };
    let spec = libc::itimerspec {
        it_interval: period,
        it_value: first,
    };
    // SAFETY: spec is a valid itimerspec and `fd` a timerfd the caller holds; the old value is
    // not asked for.
    unsafe { libc::timerfd_settime(fd, 0, &spec, std::ptr::null_mut()) }
}

fn epoll_ctl(ep: RawFd, op: i32, fd: RawFd, events: u32) {
    let mut ev = libc::epoll_event {
        events,
        u64: fd as u64,
    };
    // SAFETY: ev is a valid epoll_event; the descriptors are owned by the poller.
    unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) };
}

/// Everything a connection poller is built from.
#[derive(Debug)]
pub struct ConnSetup {
    /// Name for logs and the reactor's removal key (unique per server).
    pub name: Arc<str>,
    /// The connected socket (blocking mode; the engine never waits on it).
    pub sock: OwnedFd,
    /// The keepalive timer ([`timerfd`]).
    pub timer: OwnedFd,
    /// The session in full-feature phase.
    pub session: Session,
    /// Bytes already received after the login (normally none).
    pub leftover: Vec<u8>,
    /// The reactor that will serve it (for its own removal).
    pub link: ReactorLink,
    /// Shared with the server.
    pub shared: Arc<ConnShared>,
    /// The reactor's live connection count (decremented when the poller is dropped).
    pub live: Arc<AtomicUsize>,
    /// Server counters.
    pub counters: Arc<ConnCounters>,
}

impl ConnPoller {
    /// A poller for an established connection.
    pub fn new(s: ConnSetup) -> std::io::Result<Self> {
        let need = s.session.framing().max_pdu_len() + RECV_SLACK;
        let mut rbuf = vec![0u8; need.max(s.leftover.len())].into_boxed_slice();
        rbuf[..s.leftover.len()].copy_from_slice(&s.leftover);
        // SAFETY: an all-zero msghdr/iovec array is valid (no name, no control data).
        let send: Box<SendBuf> = Box::new(unsafe { std::mem::zeroed() });
        s.counters.sessions.fetch_add(1, Ordering::Relaxed);
        Ok(ConnPoller {
            name: s.name,
            sock: s.sock,
            timer: s.timer,
            sync_epoll: None,
            session: s.session,
            rbuf,
            rstart: 0,
            rend: s.leftover.len(),
            recv_inflight: false,
            send_inflight: false,
            recv_idle: None,
            send,
            next_tick: Instant::now() + TICK,
            polls: 0,
            clock_due: true,
            last_now: Instant::now(),
            closing: false,
            logout_asked: false,
            removal_sent: false,
            stopped: false,
            link: s.link,
            shared: s.shared,
            live: s.live,
            counters: s.counters,
        })
    }

    /// Ends the connection (idempotent): shuts the socket down so in-flight operations
    /// complete, and abandons the session's tasks.
    fn close(&mut self) {
        if self.closing {
            return;
        }
        self.closing = true;
        // SAFETY: shutdown on our own socket; no memory is involved.
        unsafe { libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_RDWR) };
        self.session.abandon();
    }

    /// Hands every complete PDU of the receive buffer to the session (while it can take
    /// them); moves the leftover to the front.
    fn parse(&mut self, cx: &mut PollCx<'_>) -> usize {
        let framing = self.session.framing();
        let mut n = 0;
        while !self.closing && self.session.can_take() && self.rstart < self.rend {
            let buf = &self.rbuf[self.rstart..self.rend];
            match frame(buf, &framing) {
                Ok(None) => break,
                Ok(Some(f)) => {
                    n += 1;
                    let flow = self.session.on_pdu(&f, buf, cx);
                    self.rstart += f.total_len;
                    if flow == Flow::Close {
                        self.close();
                    }
                }
                Err(e) => {
                    n += 1;
                    let skip = match &e {
                        PduError::DataDigest { total_len, .. } => Some(*total_len),
                        _ => None,
                    };
                    tracing::debug!(conn = %self.name, err = %e, "bad PDU");
                    let flow = self.session.on_frame_error(&e);
                    match (flow, skip) {
                        (Flow::Continue, Some(len)) => self.rstart += len,
                        _ => self.close(),
                    }
                }
            }
        }
        if self.rstart == self.rend {
            self.rstart = 0;
            self.rend = 0;
        } else if self.rstart > 0 && self.rbuf.len() - self.rend < self.rbuf.len() / 2 {
            self.rbuf.copy_within(self.rstart..self.rend, 0);
            self.rend -= self.rstart;
            self.rstart = 0;
        }
        n
    }

    fn post_recv(&mut self, cx: &mut PollCx<'_>) {
        if self.recv_inflight || self.closing || !self.session.can_take() {
            return;
        }
        if self.rend == self.rbuf.len() {
            // Full of an incomplete PDU: cannot happen (the buffer holds the largest PDU
            // framing accepts), unless compaction waits; compact now.
            self.rbuf.copy_within(self.rstart..self.rend, 0);
            self.rend -= self.rstart;
            self.rstart = 0;
        }
        let room = self.rbuf.len() - self.rend;
        let op = IoOp::Recv {
            fd: self.sock.as_raw_fd(),
            buf: self.rbuf[self.rend..].as_mut_ptr(),
            len: u32::try_from(room).unwrap_or(u32::MAX),
        };
        // SAFETY: the receive buffer is boxed and owned by the poller, which stays on the
        // reactor until this receive completes (flush reports it in flight); nothing else
        // touches rbuf[rend..] meanwhile.
        match unsafe { cx.engine.push(op, cx.user_data(TAG_RECV)) } {
            Ok(()) => self.recv_inflight = true,
            Err(e) => tracing::debug!(conn = %self.name, err = %e, "receive not posted; retried"),
        }
    }

    fn post_send(&mut self, cx: &mut PollCx<'_>) -> usize {
        if self.send_inflight || !self.session.has_output() {
            return 0;
        }
        let n = self.session.gather(&mut self.send.iov, SEND_BYTES_MAX);
        if n == 0 {
            return 0;
        }
        let sb = &mut *self.send;
        sb.msg.msg_iov = sb.iov.as_mut_ptr();
        sb.msg.msg_iovlen = n;
        let op = IoOp::Send {
            fd: self.sock.as_raw_fd(),
            msg: &sb.msg,
        };
        // SAFETY: the msghdr and iovecs are boxed in the poller; the bytes they name are the
        // session's queued PDUs and the buffers of their tasks, which stay queued and
        // reserved until this send completes and `Session::sent` pops them.
        match unsafe { cx.engine.push(op, cx.user_data(TAG_SEND)) } {
            Ok(()) => {
                self.send_inflight = true;
                1
            }
            Err(e) => {
                tracing::debug!(conn = %self.name, err = %e, "send not posted; retried");
                0
            }
        }
    }

    fn on_recv(&mut self, result: i32, cx: &mut PollCx<'_>) {
        self.recv_inflight = false;
        if result == -libc::EAGAIN || result == -libc::EINTR {
            self.recv_idle = Some(Instant::now() + SYNC_RECV_RETRY);
            return;
        }
        if result <= 0 {
            if !self.closing {
                self.counters
                    .connections_lost
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(conn = %self.name, result, "connection closed by peer");
            }
            self.close();
            return;
        }
        self.rend += result as usize;
        self.parse(cx);
    }

    fn on_send(&mut self, result: i32) {
        self.send_inflight = false;
        if result == -libc::EAGAIN || result == -libc::EINTR {
            if let Some(ep) = &self.sync_epoll {
                // Wake when the socket has room again.
                let events = (libc::EPOLLIN | libc::EPOLLOUT) as u32;
                epoll_ctl(
                    ep.as_raw_fd(),
                    libc::EPOLL_CTL_MOD,
                    self.sock.as_raw_fd(),
                    events,
                );
            }
            return;
        }
        if result < 0 {
            if !self.closing {
                self.counters
                    .connections_lost
                    .fetch_add(1, Ordering::Relaxed);
            }
            self.close();
            return;
        }
        if let Some(ep) = &self.sync_epoll {
            epoll_ctl(
                ep.as_raw_fd(),
                libc::EPOLL_CTL_MOD,
                self.sock.as_raw_fd(),
                libc::EPOLLIN as u32,
            );
        }
        self.session.sent(result as usize);
        if self.session.finished() {
            // Logout answered.
            self.close();
        }
    }

    /// Whether every engine operation referencing the poller's memory has completed.
    fn drained(&self) -> bool {
        !self.recv_inflight && !self.send_inflight && self.session.in_flight() == 0
    }
}

impl Drop for ConnPoller {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::AcqRel);
        self.counters.sessions.fetch_sub(1, Ordering::Relaxed);
        self.shared.ended.store(true, Ordering::Release);
    }
}

impl Poller for ConnPoller {
    fn attach(&mut self, cx: &mut PollCx<'_>) {
        if cx.engine.notify_fd().is_none() {
            // SAFETY: epoll_create1 returns a new descriptor we own (or -1).
            let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
            if ep >= 0 {
                // SAFETY: ep is fresh and owned by nobody else.
                let ep = unsafe { OwnedFd::from_raw_fd(ep) };
                let add = libc::EPOLL_CTL_ADD;
                epoll_ctl(
                    ep.as_raw_fd(),
                    add,
                    self.timer.as_raw_fd(),
                    libc::EPOLLIN as u32,
                );
                epoll_ctl(
                    ep.as_raw_fd(),
                    add,
                    self.sock.as_raw_fd(),
                    libc::EPOLLIN as u32,
                );
                self.sync_epoll = Some(ep);
            }
        }
    }

    fn poll_io(&mut self, cx: &mut PollCx<'_>) -> usize {
        let mut work = 0;
        if !self.closing {
            // The clock is read every CLOCK_EVERY polls (and after a sleep), not on every
            // loop iteration of a busy reactor.
            self.polls = self.polls.wrapping_add(1);
            let now = if self.clock_due
                || self.recv_idle.is_some()
                || self.polls.is_multiple_of(CLOCK_EVERY)
            {
                self.clock_due = false;
                Instant::now()
            } else {
                self.last_now
            };
            self.last_now = now;
            if now >= self.next_tick {
                self.next_tick = now + TICK;
                let mut v = [0u8; 8];
                // SAFETY: reads 8 bytes into v from our timerfd (non-blocking; EAGAIN ok).
                unsafe { libc::read(self.timer.as_raw_fd(), v.as_mut_ptr().cast(), 8) };
                if self.session.tick(now) == Flow::Close {
                    tracing::debug!(conn = %self.name, "keepalive timed out");
                    self.close();
                }
                work += 1;
            }
            if !self.logout_asked && self.shared.logout.load(Ordering::Acquire) {
                self.logout_asked = true;
                let mut v = [0u8; 8];
                // SAFETY: reads 8 bytes into v from our timerfd (non-blocking; EAGAIN ok):
                // consumes the expiry `request_logout` armed.
                unsafe { libc::read(self.timer.as_raw_fd(), v.as_mut_ptr().cast(), 8) };
                self.session.request_logout(LOGOUT_WITHIN_SECS);
                work += 1;
            }
            work += self.session.poll(cx);
            if self.session.finished() {
                // Ended from elsewhere (another nexus's TARGET COLD RESET).
                self.close();
            }
            if !self.recv_inflight && self.rstart < self.rend && self.session.can_take() {
                work += self.parse(cx);
            }
            let sync_waits = self.recv_idle.is_some_and(|t| now < t);
            if !self.recv_inflight && !sync_waits {
                self.post_recv(cx);
            }
        }
        if !self.closing || self.session.has_output() {
            work += self.post_send(cx);
        }
        self.session.end_batch(cx);
        if self.closing && self.drained() {
            // Leaves the reactor at its next flush.
            work += 1;
        }
        work
    }

    fn complete(&mut self, cx: &mut PollCx<'_>, done: &[Completion]) {
        for c in done {
            match tag_of(c.user_data) {
                TAG_RECV => self.on_recv(c.result, cx),
                TAG_SEND => self.on_send(c.result),
                tag => self.session.complete(tag, c.result, cx),
            }
        }
        if !self.closing {
            self.session.poll(cx);
            self.post_recv(cx);
        }
        self.session.end_batch(cx);
        self.post_send(cx);
    }

    fn flush(&mut self) -> bool {
        let drained = self.drained();
        if self.closing && drained && !self.removal_sent {
            self.removal_sent = true;
            if !self.shared.reinstated.load(Ordering::Acquire) {
                self.session.end();
            }
            self.shared.ended.store(true, Ordering::Release);
            if self.stopped {
                // The reactor removes it already.
                return drained;
            }
            // Removal through the reactor's own command queue (the reply goes nowhere: the
            // poller is dropped on the reactor).
            let (reply, _) = std::sync::mpsc::sync_channel(1);
            let _ = self.link.send(Command::RemovePoller {
                device: self.name.clone(),
                index: 0,
                reply,
            });
        }
        drained
    }

    fn wake_fd(&self) -> RawFd {
        match &self.sync_epoll {
            Some(ep) => ep.as_raw_fd(),
            None => self.timer.as_raw_fd(),
        }
    }

    fn end_sleep(&mut self) {
        self.recv_idle = None;
        self.clock_due = true;
    }

    fn prepare_sleep(&mut self) -> bool {
        // Work nothing would wake the reactor for: commands blocked on a range another
        // reactor's session holds (or on engine room), output whose send could not be posted.
        // (Sync mode: a receive that found nothing is retried once the socket is readable:
        // the epoll set wakes the reactor then.)
        !self.closing
            && (self.session.has_blocked() || (self.session.has_output() && !self.send_inflight))
    }

    fn key(&self) -> Option<(&str, u16)> {
        Some((&self.name, 0))
    }

    fn stop(&mut self) {
        self.stopped = true;
        self.close();
    }
}
