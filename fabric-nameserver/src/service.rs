//! The service: executes requests against the registry, makes their effects durable before
//! answering (write-ahead log), queues their notifications, and counts. The iSNSP listener
//! ([`crate::server`]) and the control socket ([`crate::control`]) both call it; it knows
//! neither (data flows one way: server → control → service → registry/store).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use thiserror::Error;

use crate::command::{parse_command, CommandError};
use crate::registry::{Executed, Outcome, Peer, Registry, RegistryError};
use crate::scn::ScnSender;
use crate::store::{Store, StoreError};
use crate::wire::{
    parse_request, split_pdus, Message, Status, TlvWriter, FLAG_SERVER, MAX_REPLY_PAYLOAD_BYTES,
    RESPONSE_BIT,
};

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Counters reported by `stats`.
#[derive(Debug, Default)]
pub struct Stats {
    pub connections: AtomicU64,
    pub connections_refused: AtomicU64,
    /// Connections closed because a PDU, a message or a reply missed its deadline.
    pub connections_timed_out: AtomicU64,
    pub messages: AtomicU64,
    pub registrations: AtomicU64,
    pub queries: AtomicU64,
    pub deregistrations: AtomicU64,
    pub dd_changes: AtomicU64,
    pub scn_registrations: AtomicU64,
    pub errors: AtomicU64,
    pub format_errors: AtomicU64,
    pub expired_entities: AtomicU64,
    pub reply_pdus: AtomicU64,
    pub esi_sent: AtomicU64,
    pub esi_failed: AtomicU64,
    pub esi_removed_portals: AtomicU64,
    /// Requests refused with Source Unauthorized.
    pub unauthorized: AtomicU64,
}

/// A stats report (JSON for `stratactl ns stats`).
#[derive(Debug, Serialize)]
pub struct StatsReport {
    pub entities: usize,
    pub nodes: usize,
    pub portals: usize,
    pub dds: usize,
    pub ddsets: usize,
    pub default_dd: bool,
    pub connections: u64,
    pub connections_refused: u64,
    pub connections_timed_out: u64,
    pub messages: u64,
    pub registrations: u64,
    pub queries: u64,
    pub deregistrations: u64,
    pub dd_changes: u64,
    pub scn_registrations: u64,
    pub errors: u64,
    pub format_errors: u64,
    pub expired_entities: u64,
    pub reply_pdus: u64,
    pub esi_monitored_portals: usize,
    pub esi_sent: u64,
    pub esi_failed: u64,
    pub esi_removed_portals: u64,
    pub unauthorized: u64,
    pub scns_sent: u64,
    pub scns_failed: u64,
    pub scns_retried: u64,
    pub wal_commits: u64,
    pub wal_records: u64,
    pub wal_bytes: u64,
    /// Mean and longest time of one group commit (write + fdatasync), microseconds.
    pub wal_commit_avg_us: u64,
    pub wal_commit_max_us: u64,
    pub snapshots: u64,
}

/// Most reply bytes held by all connections at once (replies being encoded plus their PDU
/// copies, until written): 128 MiB, four replies of the largest size each with its copy. A
/// query that would exceed it is answered Busy (12); clients retry.
pub const MAX_REPLY_BYTES_IN_FLIGHT: usize = 128 * 1024 * 1024;
/// Granularity of reply reservations (a reply grows by many small TLVs).
pub const REPLY_RESERVE_STEP: usize = 1024 * 1024;

/// A reply's share of [`MAX_REPLY_BYTES_IN_FLIGHT`], returned when dropped.
#[derive(Debug)]
pub(crate) struct ReplyReservation<'a> {
    counter: &'a AtomicUsize,
    bytes: usize,
}

impl Drop for ReplyReservation<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// Executes requests: registry + durability + notifications.
#[derive(Debug)]
pub struct Service {
    registry: Mutex<Registry>,
    store: Arc<Store>,
    scn: ScnSender,
    pub stats: Stats,
    /// Reply bytes in flight, and their limit (see [`MAX_REPLY_BYTES_IN_FLIGHT`]).
    reply_bytes: AtomicUsize,
    reply_budget: usize,
}

impl Service {
    /// A service over a loaded registry and an open store; notifications start their
    /// sender thread now.
    pub(crate) fn new(registry: Registry, store: Arc<Store>, reply_budget: usize) -> Service {
        Service {
            registry: Mutex::new(registry),
            store,
            scn: ScnSender::start(unix_now),
            stats: Stats::default(),
            reply_bytes: AtomicUsize::new(0),
            reply_budget,
        }
    }

    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        // Registry operations validate before they mutate; a panic mid-operation (a bug)
        // leaves at worst one half-applied change, better served than a dead server.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a registry operation, logs its mutations, waits until they (and everything
    /// before them) are durable, then queues its notifications.
    pub fn run(
        &self,
        op: impl FnOnce(&mut Registry) -> Result<Outcome, RegistryError>,
    ) -> Result<Outcome, RunError> {
        match self.run_planned(|reg| op(reg).map(Executed::Done))? {
            Executed::Done(out) => Ok(out),
            // `op` returns only finished outcomes.
            Executed::Query(_) => Err(RunError::Registry(RegistryError::Busy)),
        }
    }

    /// Like [`Service::run`], for operations that may return a query plan: the lock is
    /// released before the plan is encoded.
    fn run_planned(
        &self,
        op: impl FnOnce(&mut Registry) -> Result<Executed, RegistryError>,
    ) -> Result<Executed, RunError> {
        let (ex, seq) = {
            let mut reg = self.registry();
            let ex = op(&mut reg)?;
            let mut seq = self.store.last_seq();
            if let Executed::Done(out) = &ex {
                for r in &out.mutations {
                    let json =
                        serde_json::to_vec(r).map_err(|e| RunError::Encode(e.to_string()))?;
                    seq = self.store.append(&json)?;
                }
            }
            (ex, seq)
        };
        // Queries wait too: they must not expose state that is not yet durable.
        self.store.wait_durable(seq)?;
        if let Executed::Done(out) = &ex {
            for n in &out.notifications {
                self.scn.send(n.clone());
            }
        }
        Ok(ex)
    }

    /// Reserves reply memory (`bytes` more) against the in-flight budget.
    fn reserve(&self, r: &mut ReplyReservation<'_>, bytes: usize, force: bool) -> bool {
        let before = self.reply_bytes.fetch_add(bytes, Ordering::SeqCst);
        if !force && before + bytes > self.reply_budget {
            self.reply_bytes.fetch_sub(bytes, Ordering::SeqCst);
            return false;
        }
        r.bytes += bytes;
        true
    }

    /// Handles one client message from an unknown address (see [`Peer::unknown`]).
    pub fn handle(&self, m: &Message) -> Option<Vec<u8>> {
        self.handle_from(m, &Peer::unknown())
    }

    /// Handles one client message received from `peer`; returns the reply PDUs (None for
    /// messages that take no reply, such as responses from the client).
    pub fn handle_from(&self, m: &Message, peer: &Peer) -> Option<Vec<u8>> {
        self.handle_reserved(m, peer)
            .map(|(pdus, _reservation)| pdus)
    }

    /// [`Service::handle_from`], with the reply's share of the in-flight budget, to keep
    /// until the reply is written.
    pub(crate) fn handle_reserved(
        &self,
        m: &Message,
        peer: &Peer,
    ) -> Option<(Vec<u8>, ReplyReservation<'_>)> {
        if m.function & RESPONSE_BIT != 0 {
            return None;
        }
        self.stats.messages.fetch_add(1, Ordering::Relaxed);
        let resp_fn = m.function | RESPONSE_BIT;
        let mut res = ReplyReservation {
            counter: &self.reply_bytes,
            bytes: 0,
        };
        let reply = match self.execute(m, peer, &mut res) {
            Ok(w) => w,
            Err(status) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                TlvWriter::response(status)
            }
        };
        let pdus = split_pdus(resp_fn, FLAG_SERVER, m.xid, &reply, MAX_REPLY_PAYLOAD_BYTES);
        self.stats.reply_pdus.fetch_add(
            reply.buf.len().div_ceil(MAX_REPLY_PAYLOAD_BYTES).max(1) as u64,
            Ordering::Relaxed,
        );
        Some((pdus, res))
    }

    fn execute(
        &self,
        m: &Message,
        peer: &Peer,
        res: &mut ReplyReservation<'_>,
    ) -> Result<TlvWriter, Status> {
        let req = parse_request(m).map_err(|e| {
            self.stats.format_errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %e, "malformed message");
            e.status()
        })?;
        let parsed = parse_command(&req).map_err(|e| {
            if matches!(e, CommandError::Wire(_)) {
                self.stats.format_errors.fetch_add(1, Ordering::Relaxed);
            }
            tracing::debug!(function = m.function, error = %e, "request refused");
            e.status()
        })?;
        let counter = match req.function {
            crate::wire::func::DEV_ATTR_REG => &self.stats.registrations,
            crate::wire::func::DEV_ATTR_QRY | crate::wire::func::DEV_GET_NEXT => {
                &self.stats.queries
            }
            crate::wire::func::DEV_DEREG => &self.stats.deregistrations,
            crate::wire::func::SCN_REG | crate::wire::func::SCN_DEREG => {
                &self.stats.scn_registrations
            }
            _ => &self.stats.dd_changes,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let now = unix_now();
        let encoded = match self.run_planned(|reg| reg.execute_planned(&parsed, peer, now)) {
            // A finished reply (at most one entity, or DDs) is counted, never refused: its
            // effects are already made.
            Ok(Executed::Done(out)) => {
                self.reserve(res, 2 * out.reply.buf.len(), true);
                Ok(out.reply)
            }
            // Encoded outside the registry lock, in steps of REPLY_RESERVE_STEP, each
            // reserving room for the reply and its PDU copy.
            Ok(Executed::Query(plan)) => plan
                .encode(&mut |len| {
                    while 2 * len > res.bytes {
                        if !self.reserve(res, REPLY_RESERVE_STEP, false) {
                            return Err(RegistryError::Busy);
                        }
                    }
                    Ok(())
                })
                .map_err(RunError::Registry),
            Err(e) => Err(e),
        };
        match encoded {
            Ok(w) => Ok(w),
            Err(RunError::Registry(e)) => {
                if matches!(e, RegistryError::Unauthorized(..)) {
                    self.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(source = %parsed.source, peer = ?peer.addr, error = %e,
                        "request refused");
                }
                tracing::debug!(source = %parsed.source, error = %e, "request failed");
                Err(e.status())
            }
            Err(e) => {
                tracing::error!(error = %e, "request not made durable");
                Err(Status::Internal)
            }
        }
    }

    pub fn report(&self) -> StatsReport {
        let (entities, nodes, portals, dds, ddsets) = self.registry().counts();
        let default_dd = self.registry().policy().default_dd;
        let esi_monitored_portals = self.registry().esi_portal_count();
        let st = self.store.stats();
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsReport {
            entities,
            nodes,
            portals,
            dds,
            ddsets,
            default_dd,
            connections: g(&self.stats.connections),
            connections_refused: g(&self.stats.connections_refused),
            connections_timed_out: g(&self.stats.connections_timed_out),
            messages: g(&self.stats.messages),
            registrations: g(&self.stats.registrations),
            queries: g(&self.stats.queries),
            deregistrations: g(&self.stats.deregistrations),
            dd_changes: g(&self.stats.dd_changes),
            scn_registrations: g(&self.stats.scn_registrations),
            errors: g(&self.stats.errors),
            format_errors: g(&self.stats.format_errors),
            expired_entities: g(&self.stats.expired_entities),
            reply_pdus: g(&self.stats.reply_pdus),
            esi_monitored_portals,
            esi_sent: g(&self.stats.esi_sent),
            esi_failed: g(&self.stats.esi_failed),
            esi_removed_portals: g(&self.stats.esi_removed_portals),
            unauthorized: g(&self.stats.unauthorized),
            scns_sent: g(&self.scn.stats.sent),
            scns_failed: g(&self.scn.stats.failed),
            scns_retried: g(&self.scn.stats.retried),
            wal_commits: st.commits,
            wal_records: st.records,
            wal_bytes: st.wal_bytes,
            wal_commit_avg_us: st.commit_nanos / st.commits.max(1) / 1000,
            wal_commit_max_us: st.max_commit_nanos / 1000,
            snapshots: st.snapshots,
        }
    }

    /// Writes a snapshot now (holding the registry lock, so that it matches the log).
    pub fn snapshot(&self) -> Result<(), RunError> {
        let reg = self.registry();
        let json = serde_json::to_vec(&*reg).map_err(|e| RunError::Encode(e.to_string()))?;
        self.store.snapshot(&json)?;
        Ok(())
    }

    /// One ESI round: probes the due portals (outside the registry lock), refreshes the
    /// entities that answered, deregisters the portals that stopped answering.
    pub(crate) fn esi_round(&self, m: &mut crate::esi::Monitor, cfg: &crate::esi::EsiConfig) {
        let targets = self.registry().esi_targets(cfg);
        if targets.is_empty() {
            let _ = m.round(&[], std::time::Instant::now(), unix_now());
            return;
        }
        let r = m.round(&targets, std::time::Instant::now(), unix_now());
        self.stats.esi_sent.fetch_add(r.sent, Ordering::Relaxed);
        self.stats.esi_failed.fetch_add(r.failed, Ordering::Relaxed);
        if !r.answered.is_empty() {
            let now = unix_now();
            let mut reg = self.registry();
            for eid in &r.answered {
                reg.touch_entity(eid, now);
            }
        }
        for (eid, ip, port) in &r.dead {
            // Counted before the SCNs go out, so that whoever hears of the removal sees it
            // counted.
            let drop = |reg: &mut Registry| {
                self.stats
                    .esi_removed_portals
                    .fetch_add(1, Ordering::Relaxed);
                Ok(reg.esi_drop_portal(eid, *ip, *port))
            };
            if let Err(e) = self.run(drop) {
                tracing::error!(error = %e, "ESI deregistration failed");
            }
        }
    }

    pub(crate) fn housekeeping(&self) {
        let now = unix_now();
        match self.run(|reg| Ok(reg.expire(now))) {
            Ok(out) => {
                let n = out
                    .mutations
                    .iter()
                    .filter(|r| matches!(r.mutation, crate::registry::Mutation::RemoveEntity(_)))
                    .count();
                self.stats
                    .expired_entities
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => tracing::error!(error = %e, "expiry failed"),
        }
        if self.store.wants_snapshot() {
            let t = std::time::Instant::now();
            match self.snapshot() {
                Ok(()) => tracing::info!(
                    elapsed_ms = t.elapsed().as_millis() as u64,
                    "snapshot written"
                ),
                Err(e) => tracing::error!(error = %e, "snapshot failed"),
            }
        }
    }
}

#[derive(Debug, Error)]
pub enum RunError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot encode record: {0}")]
    Encode(String),
}
