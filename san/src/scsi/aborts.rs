//! Task aborts one nexus causes for others (SAM-5 5.6; SPC-5 5.14.6.5): a PERSISTENT RESERVE
//! OUT with PREEMPT AND ABORT aborts the tasks of the nexuses it preempts, a LOGICAL UNIT
//! RESET or TARGET WARM RESET those of every other nexus. The unit cannot reach into the
//! transports' task sets, so it logs whose tasks were aborted, numbered by an epoch the
//! transports read without a lock: a transport tags each command it takes with the epoch
//! then, and when the epoch moves it aborts the commands an entry newer than their tag
//! names, answering TASK ABORTED (the control mode page reports TAS = 1).

use std::collections::VecDeque;
use std::sync::Arc;

use super::Nexus;

/// Entries kept: transports look at the log on their next reactor iteration after the epoch
/// moves, so only the last few matter; older ones are dropped.
pub(crate) const ABORTS_MAX: usize = 64;

/// The nexuses an entry aborts the tasks of.
#[derive(Debug, Clone)]
pub(crate) enum Whom {
    /// One nexus (preempted).
    One { i_port: Arc<str>, t_port: Arc<str> },
    /// Every nexus but the one that asked (a reset: that transport aborts its own tasks).
    AllBut { i_port: Arc<str>, t_port: Arc<str> },
}

impl Whom {
    fn names(&self, n: &Nexus) -> bool {
        match self {
            Whom::One { i_port, t_port } => {
                **i_port == *n.initiator_port && **t_port == *n.target_port
            }
            Whom::AllBut { i_port, t_port } => {
                !(**i_port == *n.initiator_port && **t_port == *n.target_port)
            }
        }
    }
}

#[derive(Debug)]
struct Entry {
    whom: Whom,
    epoch: u64,
    /// A TARGET COLD RESET: the transports of the nexuses named end their connections too.
    hard: bool,
}

/// The unit's abort log (kept under the unit's state lock; the epoch beside it is atomic).
#[derive(Debug, Default)]
pub(crate) struct AbortLog {
    entries: VecDeque<Entry>,
}

impl AbortLog {
    /// Logs `whom` at `epoch` (the unit's epoch after this abort).
    pub(crate) fn record(&mut self, whom: Whom, epoch: u64) {
        self.push(Entry {
            whom,
            epoch,
            hard: false,
        });
    }

    /// Logs a TARGET COLD RESET (`whom`'s connections end too) at `epoch`.
    pub(crate) fn record_hard(&mut self, whom: Whom, epoch: u64) {
        self.push(Entry {
            whom,
            epoch,
            hard: true,
        });
    }

    fn push(&mut self, e: Entry) {
        if self.entries.len() == ABORTS_MAX {
            self.entries.pop_front();
        }
        self.entries.push_back(e);
    }

    /// Whether a cold-reset entry newer than `since` names `n`.
    pub(crate) fn hard_since(&self, n: &Nexus, since: u64) -> bool {
        self.entries
            .iter()
            .rev()
            .take_while(|e| e.epoch > since)
            .any(|e| e.hard && e.whom.names(n))
    }

    /// Whether an entry newer than `since` names `n`.
    pub(crate) fn names_since(&self, n: &Nexus, since: u64) -> bool {
        self.entries
            .iter()
            .rev()
            .take_while(|e| e.epoch > since)
            .any(|e| e.whom.names(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nexus(i: &str) -> Nexus {
        Nexus {
            initiator_port: i.into(),
            initiator_name: "n".into(),
            target_port: "t".into(),
            relative_port: 1,
        }
    }

    #[test]
    fn entries_name_nexuses_after_an_epoch_and_stay_bounded() {
        let (a, b) = (nexus("a"), nexus("b"));
        let mut log = AbortLog::default();
        log.record(
            Whom::One {
                i_port: "a".into(),
                t_port: "t".into(),
            },
            1,
        );
        assert!(log.names_since(&a, 0));
        assert!(!log.names_since(&a, 1), "a command taken after it");
        assert!(!log.names_since(&b, 0));
        log.record(
            Whom::AllBut {
                i_port: "a".into(),
                t_port: "t".into(),
            },
            2,
        );
        assert!(log.names_since(&b, 1));
        assert!(!log.names_since(&a, 1));
        assert!(!log.hard_since(&b, 0), "not a cold reset");
        for e in 3..3 + ABORTS_MAX as u64 {
            log.record(
                Whom::One {
                    i_port: "c".into(),
                    t_port: "t".into(),
                },
                e,
            );
        }
        assert_eq!(log.entries.len(), ABORTS_MAX);
    }
}
