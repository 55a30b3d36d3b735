//! Serving a method table on stream sockets: one thread per connection, a bounded number of
//! connections, one request line at a time per connection, each read and write under an
//! absolute deadline ([`Limits`]).

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::RpcError;
use crate::message;
use crate::methods::Methods;
use crate::stream::{write_before, LineDeadlines, LineReader, Stream, StreamError};

/// Longest request line by default: requests are names, ids and numbers (a discovery domain
/// with ~15 000 member names fits); a connection never buffers more than this.
pub const REQUEST_BYTES_MAX: usize = 1024 * 1024;
/// Time from a request's first byte to its newline: clients write a request in one go, so a
/// peer trickling bytes (slowloris) loses its connection instead of holding a thread.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection idle this long between requests is closed (a person at a prompt reconnects).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Time to write one response: the largest (a listing of a million name-server nodes,
/// ~200 MiB) takes well under a second on a local socket; a client that stops reading is
/// dropped after this.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections served at once: administration tools open a handful; each costs a thread and
/// up to [`REQUEST_BYTES_MAX`] of buffer. Beyond it a new connection is closed at once.
pub const CONNECTIONS_MAX: usize = 16;
/// Pause after a failed accept (EMFILE and friends), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// How much a connection may hold and for how long (the constants above by default).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest request line.
    pub request_bytes_max: usize,
    /// From a request's first byte to its newline.
    pub request_timeout: Duration,
    /// Between requests.
    pub idle_timeout: Duration,
    /// To write one response.
    pub write_timeout: Duration,
    /// Connections served at once.
    pub connections_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_bytes_max: REQUEST_BYTES_MAX,
            request_timeout: REQUEST_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            write_timeout: WRITE_TIMEOUT,
            connections_max: CONNECTIONS_MAX,
        }
    }
}

/// A listening stream socket.
pub trait Listener {
    /// Its connections.
    type Conn: Stream + 'static;
    /// Waits for the next connection.
    fn accept_conn(&self) -> std::io::Result<Self::Conn>;
}

impl Listener for UnixListener {
    type Conn = std::os::unix::net::UnixStream;
    fn accept_conn(&self) -> std::io::Result<Self::Conn> {
        self.accept().map(|(s, _)| s)
    }
}

impl Listener for TcpListener {
    type Conn = std::net::TcpStream;
    fn accept_conn(&self) -> std::io::Result<Self::Conn> {
        self.accept().map(|(s, _)| s)
    }
}

/// A method table served under [`Limits`]; cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct Server {
    methods: Arc<Methods>,
    limits: Limits,
    active: Arc<AtomicUsize>,
}

/// Gives a connection's slot back when its thread ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Server {
    /// Serves `methods` under `limits`.
    pub fn new(methods: Methods, limits: Limits) -> Server {
        Server {
            methods: Arc::new(methods),
            limits,
            active: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The method table.
    pub fn methods(&self) -> &Methods {
        &self.methods
    }

    /// Connections being served.
    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Serves one connection until the peer closes it, a deadline passes or a request is too
    /// long (answered with -32600 under id null, then closed: the stream cannot be resynced
    /// cheaply). Requests on one connection are answered in order.
    pub fn serve_connection<S: Stream + ?Sized>(&self, s: &mut S) -> Result<(), StreamError> {
        let l = &self.limits;
        let mut reader = LineReader::new();
        loop {
            let when = LineDeadlines {
                first_byte: Instant::now() + l.idle_timeout,
                line: l.request_timeout,
                cap: None,
            };
            let line = match reader.read_line(s, l.request_bytes_max, when) {
                Ok(Some(line)) => line,
                Ok(None) => return Ok(()),
                Err(StreamError::TooLong(n)) => {
                    let e = RpcError::invalid_request(format!("request longer than {n} bytes"));
                    let mut r = message::failure(serde_json::Value::Null, &e).to_string();
                    r.push('\n');
                    // Best effort: the connection is closed either way.
                    let _ = write_before(s, r.as_bytes(), Instant::now() + l.write_timeout);
                    return Err(StreamError::TooLong(n));
                }
                Err(e) => return Err(e),
            };
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            if let Some(mut r) = self.methods.handle(&line) {
                r.push('\n');
                write_before(s, r.as_bytes(), Instant::now() + l.write_timeout)?;
            }
        }
    }

    /// Accepts connections until `stop` is set (checked after each accept: wake a blocked
    /// accept with `shutdown(2)` on the listener) and serves each admitted one on its own
    /// thread. `admit` may refuse a peer (e.g. by its credentials); a refused connection and
    /// one beyond [`Limits::connections_max`] are closed without an answer.
    pub fn serve<L: Listener>(
        &self,
        listener: &L,
        stop: &AtomicBool,
        admit: impl Fn(&L::Conn) -> bool,
    ) {
        loop {
            let conn = listener.accept_conn();
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let mut conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "RPC accept failed");
                    std::thread::sleep(ACCEPT_BACKOFF);
                    continue;
                }
            };
            if !admit(&conn) {
                continue;
            }
            if self.active.fetch_add(1, Ordering::SeqCst) >= self.limits.connections_max {
                self.active.fetch_sub(1, Ordering::SeqCst);
                tracing::warn!(
                    max = self.limits.connections_max,
                    "RPC connection refused: too many connections"
                );
                continue;
            }
            let slot = Slot(self.active.clone());
            let server = self.clone();
            let spawned = std::thread::Builder::new()
                .name("rpc-conn".into())
                .spawn(move || {
                    let _slot = slot;
                    if let Err(e) = server.serve_connection(&mut conn) {
                        tracing::debug!(error = %e, "RPC connection closed");
                    }
                });
            if let Err(e) = spawned {
                // The closure (and its slot) was dropped: the count is already given back.
                tracing::warn!(error = %e, "cannot start an RPC connection thread");
            }
        }
    }
}
