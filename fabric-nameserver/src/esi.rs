//! Entity Status Inquiry (RFC 4171 §5.6.5.13, §6.3.5, §6.3.6): the server probes every portal
//! that registered an ESI Port (and a non-zero ESI Interval) once per interval; a portal that
//! misses [`EsiConfig::retries`] consecutive probes is deregistered, and an entity left with
//! no ESI-monitored portal is deregistered with its nodes (SCNs go to the subscribers that saw
//! them). A good response refreshes the entity's registration period, as a re-registration
//! would (open-isns does the same).
//!
//! ESI message (server → client, no Source attribute), TLVs: Timestamp (tag 4, 8 bytes),
//! EID (1), Portal IP (16), Portal Port (17). The client answers function 0x800D with a status
//! word followed by the same attributes; we accept it when the status is 0 and the portal it
//! echoes is the one probed. One TCP connection per probe (as open-isns), connect and answer
//! bounded by [`EsiConfig::timeout`].
//!
//! Heartbeat (RFC 4171 §5.6.5.14) is a server-discovery and backup-server mechanism (UDP
//! multicast, no response); nothing in the RFC makes a server send it, and we have no backup
//! servers, so it is not sent. Heartbeat or ESI messages sent *to* the server are answered
//! Message Not Supported.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::wire::{
    func, parse_tlvs, response_status, split_pdus, tag, Header, TlvWriter, WireError, FLAG_SERVER,
    HEADER_LEN, MAX_REPLY_PAYLOAD_BYTES, RESPONSE_BIT,
};

/// RFC 4171 §6.3.5: "The minimum ESI Interval is 20 seconds"; smaller requests are raised.
pub const RFC_MIN_ESI_INTERVAL_SECS: u32 = 20;
/// Probes without answer after which a portal is deregistered (open-isns `ESIRetries`).
pub const DEFAULT_ESI_RETRIES: u32 = 3;
/// Largest ESI interval we honour (longer requests are lowered to it): a day.
pub const MAX_ESI_INTERVAL_SECS: u32 = 24 * 3600;
/// Most portals monitored at once; registrations beyond get ESI Not Available (status 21).
pub const MAX_ESI_PORTALS: usize = 65_536;
/// Probes in flight at once (each is a thread with a bounded connect/read).
pub const MAX_PARALLEL_PROBES: usize = 16;
/// Largest ESI response we read.
pub const MAX_ESI_RESPONSE_BYTES: usize = 8192;
/// Longest the monitor sleeps between looks at the registry (also bounds shutdown latency).
pub const MAX_ESI_TICK: Duration = Duration::from_millis(250);

/// ESI timing. `unit` is the length of one "second" of the ESI Interval attribute: 1 s in
/// production; tests shorten it to run ESI scenarios in a fraction of the real time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EsiConfig {
    /// Smallest interval honoured (registered values below are raised to it).
    pub min_interval_secs: u32,
    /// Consecutive unanswered probes before the portal is deregistered; 0 disables ESI.
    pub retries: u32,
    /// Time allowed to connect and to receive the response, per probe.
    pub timeout: Duration,
    /// Length of one interval second.
    pub unit: Duration,
}

impl Default for EsiConfig {
    fn default() -> Self {
        EsiConfig {
            min_interval_secs: RFC_MIN_ESI_INTERVAL_SECS,
            retries: DEFAULT_ESI_RETRIES,
            timeout: Duration::from_secs(5),
            unit: Duration::from_secs(1),
        }
    }
}

impl EsiConfig {
    /// The interval the server uses for a registered value (raised to the minimum, capped).
    pub fn effective_interval_secs(&self, registered: u32) -> u32 {
        registered
            .max(self.min_interval_secs)
            .clamp(1, MAX_ESI_INTERVAL_SECS)
    }

    fn period(&self, interval_secs: u32) -> Duration {
        self.unit.saturating_mul(interval_secs)
    }

    fn tick(&self) -> Duration {
        (self.unit / 4).clamp(Duration::from_millis(10), MAX_ESI_TICK)
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum EsiError {
    #[error("{0}")]
    Io(String),
    #[error("malformed ESI response: {0}")]
    Wire(#[from] WireError),
    #[error("ESI response has function {0:#x}")]
    WrongFunction(u16),
    #[error("client answered status {0}")]
    Status(u32),
    #[error("ESI response names another portal")]
    WrongPortal,
    #[error("ESI response larger than {MAX_ESI_RESPONSE_BYTES} bytes")]
    TooLarge,
}

impl From<std::io::Error> for EsiError {
    fn from(e: std::io::Error) -> Self {
        EsiError::Io(e.to_string())
    }
}

/// A monitored portal, as the registry reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EsiTarget {
    pub eid: String,
    pub ip: Ipv6Addr,
    pub port: u32,
    /// Where the probe goes: the portal's IP and its ESI port.
    pub addr: SocketAddr,
    /// Effective interval, in interval seconds.
    pub interval_secs: u32,
}

/// Encodes an ESI message. Pure.
pub fn encode_esi(eid: &str, ip: &Ipv6Addr, port: u32, xid: u16, now_secs: u64) -> Vec<u8> {
    let mut w = TlvWriter::new();
    w.u64(tag::TIMESTAMP, now_secs);
    w.string(tag::EID, eid);
    w.ip(tag::PORTAL_IP, ip);
    w.u32(tag::PORTAL_PORT, port);
    split_pdus(func::ESI, FLAG_SERVER, xid, &w, MAX_REPLY_PAYLOAD_BYTES)
}

/// Checks an ESI response payload (status word, then the echoed attributes). Pure. A
/// response that echoes no portal is accepted (the status is what matters); one that echoes
/// a different portal is not.
pub fn check_esi_response(payload: &[u8], ip: &Ipv6Addr, port: u32) -> Result<(), EsiError> {
    let status = response_status(payload)?;
    if status != 0 {
        return Err(EsiError::Status(status));
    }
    let tlvs = parse_tlvs(&payload[4..])?;
    for t in &tlvs {
        match t.tag {
            tag::PORTAL_IP if !t.is_nil() && crate::command::normalize_ip(t.as_ip()?) != *ip => {
                return Err(EsiError::WrongPortal);
            }
            tag::PORTAL_PORT if !t.is_nil() && t.as_u32()? & 0xffff != port & 0xffff => {
                return Err(EsiError::WrongPortal);
            }
            _ => {}
        }
    }
    Ok(())
}

/// Sends one ESI and waits for its response.
pub fn probe(t: &EsiTarget, xid: u16, now_secs: u64, timeout: Duration) -> Result<(), EsiError> {
    let mut s = TcpStream::connect_timeout(&t.addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    s.write_all(&encode_esi(&t.eid, &t.ip, t.port, xid, now_secs))?;
    let deadline = Instant::now() + timeout;
    let mut payload = Vec::new();
    loop {
        if Instant::now() > deadline {
            return Err(EsiError::Io("timed out".into()));
        }
        let mut hb = [0u8; HEADER_LEN];
        s.read_exact(&mut hb)?;
        let h = Header::decode(&hb);
        if payload.len() + usize::from(h.length) > MAX_ESI_RESPONSE_BYTES {
            return Err(EsiError::TooLarge);
        }
        let mut p = vec![0u8; usize::from(h.length)];
        s.read_exact(&mut p)?;
        if h.xid != xid {
            continue;
        }
        if h.function != func::ESI | RESPONSE_BIT {
            return Err(EsiError::WrongFunction(h.function));
        }
        payload.extend_from_slice(&p);
        if h.flags & crate::wire::FLAG_LAST_PDU != 0 || h.flags & crate::wire::FLAG_FIRST_PDU == 0 {
            return check_esi_response(&payload, &t.ip, t.port);
        }
    }
}

/// Per-portal probe state kept by the monitor (not logged: after a restart every portal
/// starts a fresh interval).
#[derive(Debug, Clone, Copy)]
struct ProbeState {
    next: Instant,
    misses: u32,
}

/// What one monitor round decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RoundResult {
    /// Entities that answered (to refresh).
    pub answered: Vec<String>,
    /// Portals that missed their last allowed probe (to deregister).
    pub dead: Vec<(String, Ipv6Addr, u32)>,
    pub sent: u64,
    pub failed: u64,
}

/// The monitor's schedule: which portals are due, and what their answers mean.
#[derive(Debug)]
pub struct Monitor {
    cfg: EsiConfig,
    state: HashMap<(Ipv6Addr, u32), ProbeState>,
    xid: u16,
}

impl Monitor {
    pub fn new(cfg: EsiConfig) -> Monitor {
        Monitor {
            cfg,
            state: HashMap::new(),
            xid: 0,
        }
    }

    pub fn tick(&self) -> Duration {
        self.cfg.tick()
    }

    /// One round: forgets portals no longer monitored, probes the due ones (in parallel,
    /// bounded) and reports answers and dead portals.
    pub fn round(&mut self, targets: &[EsiTarget], now: Instant, now_secs: u64) -> RoundResult {
        let mut out = RoundResult::default();
        if self.cfg.retries == 0 {
            return out;
        }
        let live: std::collections::HashSet<(Ipv6Addr, u32)> =
            targets.iter().map(|t| (t.ip, t.port)).collect();
        self.state.retain(|k, _| live.contains(k));
        let mut due = Vec::new();
        for t in targets {
            let period = self.cfg.period(t.interval_secs);
            let st = self.state.entry((t.ip, t.port)).or_insert(ProbeState {
                next: now + period,
                misses: 0,
            });
            if st.next <= now {
                due.push(t);
            }
        }
        for chunk in due.chunks(MAX_PARALLEL_PROBES) {
            let results: Vec<Result<(), EsiError>> = std::thread::scope(|s| {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|t| {
                        self.xid = self.xid.wrapping_add(1);
                        let (xid, timeout) = (self.xid, self.cfg.timeout);
                        s.spawn(move || probe(t, xid, now_secs, timeout))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(EsiError::Io("probe panicked".into())))
                    })
                    .collect()
            });
            for (t, r) in chunk.iter().zip(results) {
                out.sent += 1;
                let period = self.cfg.period(t.interval_secs);
                let Some(st) = self.state.get_mut(&(t.ip, t.port)) else {
                    continue;
                };
                st.next = Instant::now() + period;
                match r {
                    Ok(()) => {
                        st.misses = 0;
                        out.answered.push(t.eid.clone());
                    }
                    Err(e) => {
                        out.failed += 1;
                        st.misses += 1;
                        tracing::debug!(eid = %t.eid, addr = %t.addr, misses = st.misses,
                            error = %e, "ESI not answered");
                        if st.misses >= self.cfg.retries {
                            out.dead.push((t.eid.clone(), t.ip, t.port));
                        }
                    }
                }
            }
        }
        for (_, ip, port) in &out.dead {
            self.state.remove(&(*ip, *port));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn payload_of(pdus: &[u8]) -> (Header, Vec<u8>) {
        let h = Header::decode(pdus[..HEADER_LEN].try_into().unwrap());
        (h, pdus[HEADER_LEN..].to_vec())
    }

    #[test]
    fn esi_message_layout_and_echo_is_accepted() {
        let ip: Ipv6Addr = "::ffff:10.0.0.1".parse().unwrap();
        let (h, p) = payload_of(&encode_esi("ent", &ip, 3260, 7, 99));
        assert_eq!(h.function, func::ESI);
        assert_eq!(h.xid, 7);
        assert_ne!(h.flags & FLAG_SERVER, 0);
        let tlvs = parse_tlvs(&p).unwrap();
        let tags: Vec<u32> = tlvs.iter().map(|t| t.tag).collect();
        assert_eq!(
            tags,
            vec![tag::TIMESTAMP, tag::EID, tag::PORTAL_IP, tag::PORTAL_PORT]
        );
        // The client's answer: status 0 + the same attributes.
        let mut resp = 0u32.to_be_bytes().to_vec();
        resp.extend_from_slice(&p);
        assert_eq!(check_esi_response(&resp, &ip, 3260), Ok(()));
        assert_eq!(
            check_esi_response(&resp, &ip, 3261),
            Err(EsiError::WrongPortal)
        );
        let mut bad = 9u32.to_be_bytes().to_vec();
        bad.extend_from_slice(&p);
        assert_eq!(
            check_esi_response(&bad, &ip, 3260),
            Err(EsiError::Status(9))
        );
        assert_eq!(
            check_esi_response(&[0, 0], &ip, 3260),
            Err(EsiError::Wire(WireError::MissingStatus))
        );
        // A bare status (no echo) is accepted.
        assert_eq!(check_esi_response(&[0; 4], &ip, 3260), Ok(()));
    }

    #[test]
    fn interval_is_raised_to_the_minimum_and_capped() {
        let c = EsiConfig::default();
        assert_eq!(c.effective_interval_secs(1), RFC_MIN_ESI_INTERVAL_SECS);
        assert_eq!(c.effective_interval_secs(60), 60);
        assert_eq!(c.effective_interval_secs(u32::MAX), MAX_ESI_INTERVAL_SECS);
        let fast = EsiConfig {
            min_interval_secs: 0,
            ..c
        };
        assert_eq!(fast.effective_interval_secs(0), 1);
    }

    #[test]
    fn unreachable_portal_dies_after_retries() {
        // A port with nothing listening: every probe fails at once (connection refused).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = EsiConfig {
            min_interval_secs: 1,
            retries: 2,
            timeout: Duration::from_millis(200),
            unit: Duration::from_millis(1),
        };
        let t = EsiTarget {
            eid: "e".into(),
            ip: "::ffff:127.0.0.1".parse().unwrap(),
            port: 3260,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            interval_secs: 1,
        };
        let mut m = Monitor::new(cfg);
        let start = Instant::now();
        // First round schedules, does not probe.
        assert_eq!(m.round(std::slice::from_ref(&t), start, 0).sent, 0);
        let later = start + Duration::from_millis(5);
        let r = m.round(std::slice::from_ref(&t), later, 0);
        assert_eq!((r.sent, r.failed, r.dead.len()), (1, 1, 0));
        std::thread::sleep(Duration::from_millis(5));
        let r = m.round(std::slice::from_ref(&t), Instant::now(), 0);
        assert_eq!((r.sent, r.failed), (1, 1));
        assert_eq!(r.dead, vec![("e".to_owned(), t.ip, 3260)]);
    }

    proptest! {
        // The response check is total: arbitrary bytes give Ok or an error, never a panic.
        #[test]
        fn response_check_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..128),
                                   port in any::<u32>()) {
            let _ = check_esi_response(&bytes, &Ipv6Addr::LOCALHOST, port);
        }

        // Whatever we send, echoed with status 0, is accepted for that portal.
        #[test]
        fn echo_roundtrip(eid in "[a-z0-9.:-]{1,64}", a in any::<u32>(), port in 0u32..65536,
                          xid in any::<u16>(), ts in any::<u64>()) {
            let ip = std::net::Ipv4Addr::from(a).to_ipv6_mapped();
            let (_, p) = payload_of(&encode_esi(&eid, &ip, port, xid, ts));
            let mut resp = vec![0u8; 4];
            resp.extend_from_slice(&p);
            prop_assert_eq!(check_esi_response(&resp, &ip, port), Ok(()));
        }
    }
}
