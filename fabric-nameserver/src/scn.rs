//! State-change notification delivery: SCN messages (RFC 4171 §5.6.5.7) sent from the
//! server to the SCN port a node registered on its portal, with retries.
//!
//! SCN payload, as TLVs: Destination (iSCSI name, tag 32), Timestamp (tag 4, 8 bytes, Unix
//! seconds), SCN bitmap (tag 35) of the event, then the changed object's key: iSCSI name (32)
//! for object events; DD_ID (2065) and the member's iSCSI name (2068) for DD member events.
//! The client answers with an SCN response (function 0x8008) whose status we check.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;

use crate::registry::{Notification, Subject};
use crate::wire::{
    func, response_status, split_pdus, tag, Header, TlvWriter, WireError, FLAG_SERVER, HEADER_LEN,
    MAX_REPLY_PAYLOAD_BYTES, RESPONSE_BIT,
};

/// Delivery attempts per notification before it counts as failed.
pub const SCN_ATTEMPTS: u32 = 3;
/// Time allowed for connecting to the client and for its response, per attempt.
pub const SCN_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before the second attempt; doubled before each further one.
pub const SCN_RETRY_DELAY: Duration = Duration::from_millis(250);
/// Notifications queued for delivery; beyond it new ones are dropped (and counted failed)
/// rather than letting a flood of changes grow memory without bound.
pub const MAX_QUEUED_SCNS: usize = 65_536;
/// Delivery threads, so that one unresponsive client does not hold up the others.
pub const SCN_WORKERS: usize = 4;
/// Largest SCN response we read.
const MAX_SCN_RESPONSE_BYTES: usize = 8192;

#[derive(Debug, Error)]
pub enum ScnError {
    #[error("destination has no SCN port")]
    NoAddress,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("malformed SCN response: {0}")]
    Wire(#[from] WireError),
    #[error("SCN response has function {0:#x}")]
    WrongFunction(u16),
    #[error("client answered status {0}")]
    Status(u32),
}

/// Delivery counters.
#[derive(Debug, Default)]
pub struct ScnStats {
    pub sent: AtomicU64,
    pub failed: AtomicU64,
    pub retried: AtomicU64,
}

/// Encodes an SCN message. Pure.
pub fn encode_scn(n: &Notification, xid: u16, now_secs: u64) -> Vec<u8> {
    let mut w = TlvWriter::new();
    w.string(tag::ISCSI_NAME, &n.dest);
    w.u64(tag::TIMESTAMP, now_secs);
    w.u32(tag::ISCSI_SCN_BITMAP, n.bitmap);
    match &n.subject {
        Subject::Node(name) => w.string(tag::ISCSI_NAME, name),
        Subject::DdMember { dd, member } => {
            w.u32(tag::DD_ID, *dd);
            w.string(tag::DD_MEMBER_ISCSI_NAME, member);
        }
    }
    split_pdus(func::SCN, FLAG_SERVER, xid, &w, MAX_REPLY_PAYLOAD_BYTES)
}

fn deliver_once(addr: SocketAddr, pdus: &[u8], xid: u16) -> Result<(), ScnError> {
    let mut s = TcpStream::connect_timeout(&addr, SCN_TIMEOUT)?;
    s.set_read_timeout(Some(SCN_TIMEOUT))?;
    s.set_write_timeout(Some(SCN_TIMEOUT))?;
    s.set_nodelay(true)?;
    s.write_all(pdus)?;
    // Read PDUs until the response to our xid arrives (a client may interleave others).
    loop {
        let mut hb = [0u8; HEADER_LEN];
        s.read_exact(&mut hb)?;
        let h = Header::decode(&hb);
        let len = usize::from(h.length).min(MAX_SCN_RESPONSE_BYTES);
        let mut p = vec![0u8; usize::from(h.length)];
        s.read_exact(&mut p)?;
        if h.xid != xid {
            continue;
        }
        if h.function != func::SCN | RESPONSE_BIT {
            return Err(ScnError::WrongFunction(h.function));
        }
        let status = response_status(&p[..len])?;
        if status != 0 {
            return Err(ScnError::Status(status));
        }
        return Ok(());
    }
}

/// The delivery side: a bounded queue and worker threads.
#[derive(Debug)]
pub struct ScnSender {
    tx: SyncSender<Notification>,
    pub stats: Arc<ScnStats>,
}

impl ScnSender {
    /// Starts `SCN_WORKERS` delivery threads.
    pub fn start(now: fn() -> u64) -> ScnSender {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Notification>(MAX_QUEUED_SCNS);
        let rx = Arc::new(Mutex::new(rx));
        let stats = Arc::new(ScnStats::default());
        let xid = Arc::new(AtomicU16::new(1));
        for i in 0..SCN_WORKERS {
            let rx = rx.clone();
            let stats = stats.clone();
            let xid = xid.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("scn-{i}"))
                .spawn(move || worker(&rx, &stats, &xid, now));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start SCN worker");
            }
        }
        ScnSender { tx, stats }
    }

    pub fn send(&self, n: Notification) {
        match self.tx.try_send(n) {
            Ok(()) => {}
            Err(TrySendError::Full(n)) | Err(TrySendError::Disconnected(n)) => {
                tracing::warn!(dest = %n.dest, "SCN queue full, notification dropped");
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn worker(rx: &Mutex<Receiver<Notification>>, stats: &ScnStats, xid: &AtomicU16, now: fn() -> u64) {
    loop {
        let n = {
            let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
            match rx.recv() {
                Ok(n) => n,
                Err(_) => return,
            }
        };
        let Some(addr) = n.addr else {
            tracing::debug!(dest = %n.dest, "no SCN port registered; SCN not delivered");
            stats.failed.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let id = xid.fetch_add(1, Ordering::Relaxed);
        let pdus = encode_scn(&n, id, now());
        let mut delay = SCN_RETRY_DELAY;
        let mut ok = false;
        for attempt in 0..SCN_ATTEMPTS {
            if attempt > 0 {
                stats.retried.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(delay);
                delay *= 2;
            }
            match deliver_once(addr, &pdus, id) {
                Ok(()) => {
                    ok = true;
                    break;
                }
                Err(e) => {
                    tracing::debug!(dest = %n.dest, %addr, attempt, error = %e, "SCN attempt failed")
                }
            }
        }
        if ok {
            tracing::debug!(dest = %n.dest, bitmap = n.bitmap, "SCN delivered");
            stats.sent.fetch_add(1, Ordering::Relaxed);
        } else {
            tracing::warn!(dest = %n.dest, %addr, "SCN not delivered after retries");
            stats.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}
