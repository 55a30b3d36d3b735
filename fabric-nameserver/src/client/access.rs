//! Discovery-domain access for a target daemon: may an initiator see one of our targets?
//! Asked of the name server, answered from a short-lived cache.
//!
//! The question is one DevAttrQry per initiator: Source = the initiator's iSCSI name, key =
//! our Entity ID, asking for iSCSI names. The server answers with the nodes of our entity
//! that the initiator may see under its soft zoning (a common active DD; the default DD when
//! neither is in one; control nodes see all), so one answer covers every target of ours (a
//! SendTargets or a login burst costs one round trip). The answer is cached for the TTL,
//! and dropped at once when an SCN arrives or the client re-registers (the generation moves).
//!
//! Unknown initiators (not registered in iSNS): the server answers from their DD
//! memberships, since a DD may name a node before it registers; an initiator in no DD sees
//! our targets only when the server's default-DD policy is on and they are in no active DD
//! either; with the policy off the server answers Source Unknown, which reads as "sees
//! nothing". That is the server's own rule, applied unchanged.
//!
//! When the name server cannot be asked (down, timeout), the last answer for that initiator
//! is used if it is younger than [`STALE_GRACE`] (a name-server restart does not refuse
//! logins that were allowed a moment ago); without one, access is refused (fail closed).
//! After a failure the server is not asked again for [`QUERY_RETRY_AFTER`], so a login
//! burst during an outage waits out at most one timeout.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::conn::Conn;
use super::{ClientError, Shared};
use crate::wire::{func, tag, Status, TlvWriter};

/// Initiators whose answers are cached; beyond it the expired ones go, then all.
pub const MAX_CACHED_INITIATORS: usize = 4096;
/// How long an answer is used when the name server cannot be reached.
pub const STALE_GRACE: Duration = Duration::from_secs(300);
/// After a failed query, how long answers come from the cache alone (stale or refused)
/// without asking again: logins must not each wait out a timeout while the server is away.
pub const QUERY_RETRY_AFTER: Duration = Duration::from_secs(5);
/// Longest iSCSI name the name server accepts (`command::MAX_NAME_BYTES`).
const MAX_NAME: usize = crate::command::MAX_NAME_BYTES;

#[derive(Debug)]
struct Entry {
    targets: BTreeSet<String>,
    at: Instant,
    generation: u64,
}

#[derive(Debug, Default)]
struct Inner {
    conn: Option<Conn>,
    cache: HashMap<String, Entry>,
    /// Set after a failed query: no query before then.
    quiet_until: Option<Instant>,
}

/// Whether initiators may see this client's targets, by the name server's discovery
/// domains. Cheap to share (`Arc`); `visible` may block for at most the client's I/O
/// timeout (a query), never while the answer is cached.
#[derive(Debug)]
pub struct DdAccess {
    shared: Arc<Shared>,
    inner: Mutex<Inner>,
}

impl DdAccess {
    pub(super) fn new(shared: Arc<Shared>) -> DdAccess {
        DdAccess {
            shared,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Whether `initiator` shares an active discovery domain with `target` (one of this
    /// client's targets), per the name server (see the module documentation for unknown
    /// initiators and an unreachable server). After the client stopped: false.
    pub fn visible(&self, initiator: &str, target: &str) -> bool {
        if self.shared.stopped() || initiator.is_empty() || initiator.len() > MAX_NAME {
            return false;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let generation = self.shared.generation();
        if let Some(e) = inner.cache.get(initiator) {
            if e.generation == generation && e.at.elapsed() < self.shared.timing.visibility_ttl {
                return e.targets.contains(target);
            }
        }
        let quiet = inner.quiet_until.is_some_and(|t| Instant::now() < t);
        let fetched = if quiet {
            Err(ClientError::Io(
                "name server unreachable a moment ago".into(),
            ))
        } else {
            self.fetch(&mut inner, initiator)
        };
        match fetched {
            Ok(targets) => {
                inner.quiet_until = None;
                let ok = targets.contains(target);
                if inner.cache.len() >= MAX_CACHED_INITIATORS
                    && !inner.cache.contains_key(initiator)
                {
                    inner.cache.retain(|_, e| e.at.elapsed() < STALE_GRACE);
                    if inner.cache.len() >= MAX_CACHED_INITIATORS {
                        inner.cache.clear();
                    }
                }
                inner.cache.insert(
                    initiator.to_owned(),
                    Entry {
                        targets,
                        at: Instant::now(),
                        generation,
                    },
                );
                ok
            }
            Err(e) => {
                if !quiet {
                    inner.quiet_until = Some(Instant::now() + QUERY_RETRY_AFTER);
                }
                self.shared.stats.query_errors.inc();
                let stale = inner
                    .cache
                    .get(initiator)
                    .filter(|e| e.at.elapsed() < STALE_GRACE)
                    .map(|e| e.targets.contains(target));
                if quiet {
                    tracing::debug!(initiator, target, ?stale, "name server away; cached answer");
                } else {
                    tracing::warn!(initiator, target, error = %e, ?stale,
                        "discovery-domain query failed");
                }
                stale.unwrap_or(false)
            }
        }
    }

    /// Forgets every cached answer.
    pub fn invalidate(&self) {
        self.shared.bump_generation();
    }

    fn fetch(&self, inner: &mut Inner, initiator: &str) -> Result<BTreeSet<String>, ClientError> {
        let eid = self.shared.eid();
        if eid.is_empty() {
            // Not registered yet: none of our targets is in iSNS.
            return Ok(BTreeSet::new());
        }
        let mut w = TlvWriter::new();
        w.string(tag::ISCSI_NAME, initiator);
        w.string(tag::EID, &eid);
        w.delimiter();
        w.nil(tag::ISCSI_NAME);
        let t = &self.shared.timing;
        let conn = match inner.conn.as_mut() {
            Some(c) => c,
            None => inner
                .conn
                .insert(Conn::connect(self.shared.server, t.io_timeout)?),
        };
        self.shared.stats.queries.inc();
        let r = match conn.call(func::DEV_ATTR_QRY, 0, &w, t.io_timeout) {
            Ok(r) => r,
            Err(e) => {
                inner.conn = None;
                return Err(e);
            }
        };
        if r.status == Status::SourceUnknown as u32 {
            return Ok(BTreeSet::new());
        }
        if r.status != 0 {
            return Err(ClientError::Status {
                function: func::DEV_ATTR_QRY,
                status: r.status,
            });
        }
        let mut out = BTreeSet::new();
        for t in r.operating() {
            if t.tag == tag::ISCSI_NAME && !t.is_nil() {
                out.insert(t.as_string()?);
            }
        }
        Ok(out)
    }
}
