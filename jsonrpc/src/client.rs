//! A client connection: calls with typed params and results, each under one deadline (send
//! and answer), responses bounded in size and matched to their request by id.

use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

use crate::error::RpcError;
use crate::message;
use crate::stream::{write_before, LineDeadlines, LineReader, Stream, StreamError};

/// Time a call waits by default: enough for a change that waits for an fsync or a listing of
/// a large registry; a daemon that stops answering fails the call instead of hanging it.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest response read by default (a listing of a million name-server nodes is ~200 MiB of
/// JSON); a bigger one fails the call instead of exhausting memory.
pub const RESPONSE_BYTES_MAX: usize = 512 * 1024 * 1024;

/// A client's bounds.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    /// Default time of one call, from sending the request to the end of its response.
    pub timeout: Duration,
    /// Longest response.
    pub response_bytes_max: usize,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            timeout: CALL_TIMEOUT,
            response_bytes_max: RESPONSE_BYTES_MAX,
        }
    }
}

/// Why a call failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Cannot connect.
    #[error("{addr}: {source}")]
    Connect {
        /// The socket's path or address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// Sending or receiving failed (including a deadline or a response too long).
    #[error("{0}")]
    Stream(#[from] StreamError),
    /// The server closed the connection without answering.
    #[error("the server closed the connection without answering")]
    Closed,
    /// The answer is not a valid response to this call.
    #[error("bad answer from the server: {0}")]
    Protocol(String),
    /// The server answered with an error.
    #[error(transparent)]
    Rpc(#[from] RpcError),
}

/// One connection to a JSON-RPC server.
#[derive(Debug)]
pub struct Client<S: Stream> {
    stream: S,
    reader: LineReader,
    next_id: u64,
    limits: ClientLimits,
}

impl Client<UnixStream> {
    /// Connects to a Unix stream socket.
    pub fn connect_unix(path: &Path, limits: ClientLimits) -> Result<Self, ClientError> {
        let s = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            addr: path.display().to_string(),
            source,
        })?;
        Ok(Client::new(s, limits))
    }
}

impl Client<TcpStream> {
    /// Connects to a TCP address.
    pub fn connect_tcp<A: ToSocketAddrs + std::fmt::Display>(
        addr: A,
        limits: ClientLimits,
    ) -> Result<Self, ClientError> {
        let s = TcpStream::connect(&addr).map_err(|source| ClientError::Connect {
            addr: addr.to_string(),
            source,
        })?;
        // Requests are one small write each: do not wait for more to coalesce.
        let _ = s.set_nodelay(true);
        Ok(Client::new(s, limits))
    }
}

impl<S: Stream> Client<S> {
    /// A client on a connected stream.
    pub fn new(stream: S, limits: ClientLimits) -> Self {
        Client {
            stream,
            reader: LineReader::new(),
            next_id: 1,
            limits,
        }
    }

    /// Calls `method` and waits up to the default timeout for its result.
    pub fn call<P: Serialize, R: DeserializeOwned>(
        &mut self,
        method: &str,
        params: &P,
    ) -> Result<R, ClientError> {
        self.call_with_timeout(method, params, self.limits.timeout)
    }

    /// Calls `method` and waits up to `timeout` for its result (for methods that run long).
    pub fn call_with_timeout<P: Serialize, R: DeserializeOwned>(
        &mut self,
        method: &str,
        params: &P,
        timeout: Duration,
    ) -> Result<R, ClientError> {
        let deadline = Instant::now() + timeout;
        let id = self.next_id;
        self.next_id += 1;
        self.send(Some(id), method, params, deadline)?;
        let when = LineDeadlines {
            first_byte: deadline,
            line: timeout,
            cap: Some(deadline),
        };
        let line = self
            .reader
            .read_line(&mut self.stream, self.limits.response_bytes_max, when)?
            .ok_or(ClientError::Closed)?;
        let (rid, outcome) = message::parse_response(&line).map_err(ClientError::Protocol)?;
        if rid != id {
            return Err(ClientError::Protocol(format!(
                "answer to request {rid}, expected {id}"
            )));
        }
        let v = outcome?;
        serde_json::from_value(v).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Sends a notification: the server runs `method` and answers nothing.
    pub fn notify<P: Serialize>(&mut self, method: &str, params: &P) -> Result<(), ClientError> {
        self.send(None, method, params, Instant::now() + self.limits.timeout)
    }

    fn send<P: Serialize>(
        &mut self,
        id: Option<u64>,
        method: &str,
        params: &P,
        deadline: Instant,
    ) -> Result<(), ClientError> {
        let p = serde_json::to_value(params).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let mut line = message::encode_request(id, method, p);
        line.push('\n');
        write_before(&mut self.stream, line.as_bytes(), deadline)?;
        Ok(())
    }
}
