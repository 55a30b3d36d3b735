//! Stream sockets under deadlines: the [`Stream`] trait (Unix and TCP stream sockets), a
//! line reader that bounds a line's length and the time from its first byte to its newline,
//! and a writer with an absolute deadline. Deadlines are absolute, not per read: a peer
//! trickling one byte at a time cannot stretch a line (or a response) beyond them.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use thiserror::Error;

/// Bytes asked of the socket per read: one system call brings a typical request or a good
/// part of a large response.
const READ_CHUNK: usize = 64 * 1024;

/// A connected stream socket whose blocking reads and writes can time out.
pub trait Stream: Read + Write + Send {
    /// As [`UnixStream::set_read_timeout`].
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
    /// As [`UnixStream::set_write_timeout`].
    fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
}

impl Stream for UnixStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_write_timeout(self, t)
    }
}

impl Stream for TcpStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        TcpStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        TcpStream::set_write_timeout(self, t)
    }
}

/// Why a line could not be read or written.
#[derive(Debug, Error)]
pub enum StreamError {
    /// The peer closed the stream in the middle of a line.
    #[error("connection closed in the middle of a line")]
    Truncated,
    /// The line is longer than allowed.
    #[error("line longer than {0} bytes")]
    TooLong(usize),
    /// A deadline passed.
    #[error("timed out")]
    TimedOut,
    /// The socket failed.
    #[error(transparent)]
    Io(std::io::Error),
}

impl From<std::io::Error> for StreamError {
    fn from(e: std::io::Error) -> Self {
        match e.kind() {
            // A read or write timeout on a blocking socket is EAGAIN (WouldBlock).
            ErrorKind::WouldBlock | ErrorKind::TimedOut => StreamError::TimedOut,
            _ => StreamError::Io(e),
        }
    }
}

/// When a line must arrive.
#[derive(Debug, Clone, Copy)]
pub struct LineDeadlines {
    /// Its first byte must arrive before this (idle time between requests, or the whole
    /// time a client waits for its response).
    pub first_byte: Instant,
    /// Time from the first byte to the newline.
    pub line: Duration,
    /// Never later than this, whatever `line` says.
    pub cap: Option<Instant>,
}

/// Reads newline-terminated lines, keeping the bytes read past a newline for the next line.
#[derive(Debug, Default)]
pub struct LineReader {
    buf: Vec<u8>,
    /// Bytes at the start of `buf` already searched for a newline.
    scanned: usize,
}

impl LineReader {
    /// A reader with nothing buffered.
    pub fn new() -> LineReader {
        LineReader::default()
    }

    /// The next line (without its newline), `Ok(None)` at a clean end of stream (between
    /// lines). A line longer than `max` bytes is an error as soon as that many bytes are
    /// buffered without a newline.
    pub fn read_line<S: Stream + ?Sized>(
        &mut self,
        s: &mut S,
        max: usize,
        when: LineDeadlines,
    ) -> Result<Option<Vec<u8>>, StreamError> {
        // A line that started in an earlier read (pipelined requests) starts its clock now.
        let mut deadline = (!self.buf.is_empty()).then(|| self.line_deadline(when));
        loop {
            if let Some(i) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                let end = self.scanned + i;
                if end > max {
                    return Err(StreamError::TooLong(max));
                }
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                self.scanned = 0;
                return Ok(Some(line));
            }
            self.scanned = self.buf.len();
            if self.buf.len() > max {
                return Err(StreamError::TooLong(max));
            }
            let until = deadline.unwrap_or(when.first_byte);
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(StreamError::TimedOut);
            }
            s.set_read_timeout(Some(left))?;
            let old = self.buf.len();
            // `old <= max` here: at most `max` + 1 bytes and a newline are ever held.
            let want = READ_CHUNK.min(max.saturating_add(2) - old);
            self.buf.resize(old + want, 0);
            let read = s.read(&mut self.buf[old..]);
            self.buf.truncate(old + *read.as_ref().unwrap_or(&0));
            match read {
                Ok(0) if old == 0 => return Ok(None),
                Ok(0) => return Err(StreamError::Truncated),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
            if deadline.is_none() && !self.buf.is_empty() {
                deadline = Some(self.line_deadline(when));
            }
        }
    }

    fn line_deadline(&self, when: LineDeadlines) -> Instant {
        let d = Instant::now() + when.line;
        when.cap.map_or(d, |c| c.min(d))
    }
}

/// Writes all of `buf` before `deadline`.
pub fn write_before<S: Stream + ?Sized>(
    s: &mut S,
    buf: &[u8],
    deadline: Instant,
) -> Result<(), StreamError> {
    let mut off = 0;
    while off < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(StreamError::TimedOut);
        }
        s.set_write_timeout(Some(left))?;
        match s.write(&buf[off..]) {
            Ok(0) => return Err(StreamError::Io(ErrorKind::WriteZero.into())),
            Ok(n) => off += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
