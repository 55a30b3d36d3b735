//! When the open journal transaction is committed: one policy object, owned by the
//! datastore, instead of timing constants spread over its callers.
//!
//! Three things end an open transaction besides an explicit commit or sync: its size (an
//! operation commits early at [`CommitPolicy::txn_soft_max`] dirty blocks, well below the
//! journal's per-transaction limit), its age (the serving side calls
//! `Datastore::commit_if_due` every [`CommitPolicy::tick`], which commits once the
//! transaction is older than [`CommitPolicy::max_age`]), and, with
//! [`CommitPolicy::deferred`] off, the end of every namespace operation.

use std::time::Duration;

use crate::format::TXN_BLOCKS_MAX;

/// Dirty blocks at which an operation commits early, keeping every physical transaction well
/// below the journal's per-transaction limit (an operation dirties at most a few blocks per
/// step, so the slack of 32 is never exceeded between checks).
pub(crate) const TXN_SOFT_MAX: usize = TXN_BLOCKS_MAX - 32;
/// Smallest soft limit a policy may set: one namespace operation must fit a transaction.
const TXN_SOFT_MIN: usize = 128;
/// Longest time allocating writes and deferred namespace operations stay uncommitted when
/// nobody flushes: like a filesystem's commit interval, it bounds what a crash can lose (a
/// guest FLUSH or fsync commits at once). Committing every batch instead costs two device
/// flushes per batch.
pub const MAX_AGE_DEFAULT: Duration = Duration::from_secs(1);
/// How often the serving side looks at the open transaction's age: a quarter of the max age,
/// so a transaction is committed at most 1.25 max ages after its first change.
pub const TICK_DEFAULT: Duration = Duration::from_millis(250);

/// The datastore's commit policy (see the module comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitPolicy {
    /// Dirty blocks at which an operation commits early (clamped to what the journal holds).
    pub txn_soft_max: usize,
    /// Age of the open transaction at which `Datastore::commit_if_due` commits it.
    pub max_age: Duration,
    /// How often the serving side should call `Datastore::commit_if_due`.
    pub tick: Duration,
    /// Namespace operations, `write_at`, `setattr`, xattr changes, `allocate` and
    /// `punch_hole` leave their metadata in the open transaction instead of committing each
    /// (a crash loses uncommitted operations whole, never half of one).
    pub deferred: bool,
}

impl Default for CommitPolicy {
    fn default() -> Self {
        CommitPolicy {
            txn_soft_max: TXN_SOFT_MAX,
            max_age: MAX_AGE_DEFAULT,
            tick: TICK_DEFAULT,
            deferred: false,
        }
    }
}

impl CommitPolicy {
    /// The policy of a datastore serving disks and shares: deferred namespace commits, the
    /// default age and tick.
    pub fn serving() -> Self {
        CommitPolicy {
            deferred: true,
            ..CommitPolicy::default()
        }
    }

    /// The soft size limit actually applied: within what one journal transaction holds.
    pub fn soft_max(&self) -> usize {
        self.txn_soft_max.clamp(TXN_SOFT_MIN, TXN_SOFT_MAX)
    }

    /// Whether an open transaction whose first change is `age` old is due.
    pub fn due(&self, age: Duration) -> bool {
        age >= self.max_age
    }
}
