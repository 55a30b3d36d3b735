//! The client's ESI/SCN port: a TCP listener the name server connects to for Entity Status
//! Inquiries (RFC 4171 §5.6.5.13: answered with status 0 and the attributes echoed, which is
//! what `esi::check_esi_response` accepts) and State Change Notifications (§5.6.5.7:
//! answered with status 0 and the destination attribute; the callback then runs, which
//! drops the discovery-domain cache). Other messages are answered Message Not Supported.
//!
//! One thread serves it: connections one at a time, each bounded by [`INBOUND_TIMEOUT`] and
//! [`MAX_INBOUND_BYTES`], so a silent or hostile peer delays the next probe by at most that
//! timeout (2 s: the server waits 5 s for an ESI answer, retries SCNs, and drops a portal
//! only after several missed ESIs).

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::wire::{
    func, parse_tlvs, split_pdus, tag, Header, Reassembler, Status, TlvWriter, FLAG_CLIENT,
    HEADER_LEN, MAX_REPLY_PAYLOAD_BYTES, RESPONSE_BIT,
};

/// Time one inbound connection may take to deliver a message (from accept).
pub const INBOUND_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest inbound message: an ESI is ~60 bytes, an SCN a few hundred.
pub const MAX_INBOUND_BYTES: usize = 16 * 1024;
/// Messages served on one connection before it is closed (the server sends one).
pub const MAX_MESSAGES_PER_CONN: usize = 8;
/// How often the accept loop looks at the stop flag.
pub const ACCEPT_POLL: Duration = Duration::from_millis(50);

/// What the listener tells its owner.
pub(crate) trait Events: Send + Sync {
    fn esi(&self);
    fn scn(&self, bitmap: u32);
}

/// Serves the listeners (non-blocking) until `stop` is set.
pub(crate) fn serve(listeners: &[TcpListener], stop: &AtomicBool, events: &Arc<dyn Events>) {
    while !stop.load(Ordering::SeqCst) {
        let mut idle = true;
        for l in listeners {
            match l.accept() {
                Ok((s, peer)) => {
                    idle = false;
                    if let Err(e) = serve_conn(s, events.as_ref()) {
                        tracing::debug!(%peer, error = %e, "ESI/SCN connection ended");
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => {
                    tracing::warn!(error = %e, "ESI/SCN accept failed");
                }
            }
        }
        if idle {
            std::thread::sleep(ACCEPT_POLL);
        }
    }
}

fn read_full(s: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> std::io::Result<bool> {
    let mut off = 0;
    while off < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf[off..]) {
            Ok(0) if off == 0 => return Ok(false),
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => off += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn serve_conn(mut s: TcpStream, events: &dyn Events) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    s.set_write_timeout(Some(INBOUND_TIMEOUT))?;
    let deadline = Instant::now() + INBOUND_TIMEOUT;
    let mut r = Reassembler::new();
    let mut served = 0;
    while served < MAX_MESSAGES_PER_CONN {
        let mut hb = [0u8; HEADER_LEN];
        if !read_full(&mut s, &mut hb, deadline)? {
            return Ok(());
        }
        let h = Header::decode(&hb);
        if r.pending_bytes() + usize::from(h.length) > MAX_INBOUND_BYTES {
            return Err(std::io::Error::other("inbound message too large"));
        }
        let mut p = vec![0u8; usize::from(h.length)];
        read_full(&mut s, &mut p, deadline)?;
        let m = match r.push(&h, &p) {
            Ok(Some(m)) => m,
            Ok(None) => continue,
            Err(e) => {
                answer(&mut s, h.function, h.xid, &TlvWriter::response(e.status()))?;
                return Ok(());
            }
        };
        served += 1;
        let tlvs = match parse_tlvs(&m.payload) {
            Ok(t) => t,
            Err(e) => {
                answer(&mut s, m.function, m.xid, &TlvWriter::response(e.status()))?;
                continue;
            }
        };
        match m.function {
            func::ESI => {
                let mut w = TlvWriter::response(Status::Success);
                for t in &tlvs {
                    w.tlv(t);
                }
                answer(&mut s, m.function, m.xid, &w)?;
                events.esi();
            }
            func::SCN => {
                let mut w = TlvWriter::response(Status::Success);
                if let Some(dest) = tlvs.first().filter(|t| t.tag == tag::ISCSI_NAME) {
                    w.tlv(dest);
                }
                answer(&mut s, m.function, m.xid, &w)?;
                let bitmap = tlvs
                    .iter()
                    .find(|t| t.tag == tag::ISCSI_SCN_BITMAP)
                    .and_then(|t| t.as_u32().ok())
                    .unwrap_or(0);
                events.scn(bitmap);
            }
            f => {
                answer(
                    &mut s,
                    f,
                    m.xid,
                    &TlvWriter::response(Status::MessageNotSupported),
                )?;
            }
        }
    }
    Ok(())
}

fn answer(s: &mut TcpStream, function: u16, xid: u16, w: &TlvWriter) -> std::io::Result<()> {
    let bytes = split_pdus(
        function | RESPONSE_BIT,
        FLAG_CLIENT,
        xid,
        w,
        MAX_REPLY_PAYLOAD_BYTES,
    );
    s.write_all(&bytes)
}
