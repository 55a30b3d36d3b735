//! One TCP connection from the client to the name server: a request out, its response in,
//! under a deadline. Framing is [`crate::wire`]'s; this file owns only the socket handling.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::ClientError;
use crate::wire::{
    parse_tlvs, response_status, split_pdus, tag, Header, Tlv, TlvWriter, FLAG_CLIENT,
    FLAG_FIRST_PDU, FLAG_LAST_PDU, HEADER_LEN, MAX_REPLY_PAYLOAD_BYTES, RESPONSE_BIT,
};

/// Largest response we accept: our entity's registration echo (at most
/// `registry::MAX_OBJECTS_PER_ENTITY` objects of a few hundred bytes) fits many times over.
pub const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// A decoded response: its status and the attributes after the status word.
#[derive(Debug)]
pub(crate) struct Response {
    pub status: u32,
    pub tlvs: Vec<Tlv>,
}

impl Response {
    /// The attributes after the delimiter (the operating attributes of a response).
    pub fn operating(&self) -> &[Tlv] {
        match self.tlvs.iter().position(|t| t.tag == tag::DELIMITER) {
            Some(i) => &self.tlvs[i + 1..],
            None => &self.tlvs,
        }
    }
}

#[derive(Debug)]
pub(crate) struct Conn {
    s: TcpStream,
    xid: u16,
}

impl Conn {
    pub fn connect(server: SocketAddr, timeout: Duration) -> Result<Conn, ClientError> {
        let s = TcpStream::connect_timeout(&server, timeout).map_err(ClientError::io)?;
        s.set_nodelay(true).map_err(ClientError::io)?;
        s.set_write_timeout(Some(timeout))
            .map_err(ClientError::io)?;
        Ok(Conn { s, xid: 0 })
    }

    /// Our address on this connection: what the server sees, and where it sends ESI and SCN.
    pub fn local_ip(&self) -> Option<IpAddr> {
        self.s.local_addr().ok().map(|a| a.ip().to_canonical())
    }

    /// Sends one request and waits (at most `timeout`) for its response. Responses to
    /// other transaction IDs (a request that timed out earlier) are skipped. Any error
    /// leaves the connection out of step: the caller drops it.
    pub fn call(
        &mut self,
        function: u16,
        flags: u16,
        w: &TlvWriter,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        self.xid = self.xid.wrapping_add(1);
        let xid = self.xid;
        let bytes = split_pdus(
            function,
            FLAG_CLIENT | flags,
            xid,
            w,
            MAX_REPLY_PAYLOAD_BYTES,
        );
        self.s.write_all(&bytes).map_err(ClientError::io)?;
        let deadline = Instant::now() + timeout;
        let mut payload = Vec::new();
        let mut next_seq = 0u16;
        loop {
            let mut hb = [0u8; HEADER_LEN];
            self.read_exact(&mut hb, deadline)?;
            let h = Header::decode(&hb);
            let len = usize::from(h.length);
            if payload.len() + len > MAX_RESPONSE_BYTES {
                return Err(ClientError::TooLarge);
            }
            let mut p = vec![0u8; len];
            self.read_exact(&mut p, deadline)?;
            if h.xid != xid {
                continue;
            }
            if h.function != function | RESPONSE_BIT {
                return Err(ClientError::WrongFunction(h.function));
            }
            if h.seq != next_seq {
                return Err(ClientError::Protocol(format!(
                    "response PDU {} where {next_seq} was expected",
                    h.seq
                )));
            }
            next_seq = next_seq.wrapping_add(1);
            payload.extend_from_slice(&p);
            // Single-PDU responses may carry neither FIRST nor LAST (see wire::Reassembler).
            let single = h.seq == 0 && h.flags & FLAG_FIRST_PDU == 0;
            if h.flags & FLAG_LAST_PDU != 0 || single {
                let status = response_status(&payload)?;
                let tlvs = parse_tlvs(&payload[4..])?;
                return Ok(Response { status, tlvs });
            }
        }
    }

    fn read_exact(&mut self, buf: &mut [u8], deadline: Instant) -> Result<(), ClientError> {
        let mut off = 0;
        while off < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout);
            }
            self.s
                .set_read_timeout(Some(left))
                .map_err(ClientError::io)?;
            match self.s.read(&mut buf[off..]) {
                Ok(0) => {
                    return Err(ClientError::io(std::io::Error::from(
                        std::io::ErrorKind::UnexpectedEof,
                    )))
                }
                Ok(n) => off += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(ClientError::Timeout)
                }
                Err(e) => return Err(ClientError::io(e)),
            }
        }
        Ok(())
    }
}
