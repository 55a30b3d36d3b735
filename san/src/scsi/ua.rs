//! Unit attentions per I_T nexus (SAM-5 5.14, SPC-5 5.12): the first command of a nexus the
//! unit has not seen reports POWER ON (29h/00h); resets, preempted or released reservations and
//! capacity changes queue a condition for the nexuses they affect, reported (and cleared) one
//! per command.

use std::collections::HashMap;
use std::sync::Arc;

use super::sense::{ua, Sense};

/// Conditions queued per nexus; the oldest are dropped past this (SAM-5 lets a unit report
/// fewer than all), so a nexus that never sends a command cannot grow the queue.
const QUEUED_MAX: usize = 8;
/// Nexuses tracked at once; past it the least useful entries (those with nothing pending) are
/// dropped, and a dropped nexus just sees POWER ON again.
pub(crate) const NEXUSES_MAX: usize = 4096;

#[derive(Debug, Default)]
struct Pending {
    queue: Vec<Sense>,
}

/// The unit's unit-attention table, keyed by initiator port name.
#[derive(Debug, Default)]
pub(crate) struct UnitAttentions {
    nexuses: HashMap<Arc<str>, Pending>,
}

impl UnitAttentions {
    /// The condition to report to `port` for a command that reports unit attentions, taken
    /// off its queue (a new nexus gets POWER ON).
    pub(crate) fn take(&mut self, port: &Arc<str>) -> Option<Sense> {
        match self.nexuses.get_mut(port) {
            Some(p) if p.queue.is_empty() => None,
            Some(p) => Some(p.queue.remove(0)),
            None => {
                self.make_room();
                self.nexuses.insert(port.clone(), Pending::default());
                Some(ua::POWER_ON)
            }
        }
    }

    /// Queues `cond` for every known nexus except `except` (e.g. the one that caused it).
    pub(crate) fn raise_all(&mut self, cond: Sense, except: Option<&str>) {
        for (port, p) in self.nexuses.iter_mut() {
            if Some(&**port) != except {
                push(p, cond);
            }
        }
    }

    /// Queues `cond` for one nexus (if known: an unknown one gets POWER ON anyway).
    pub(crate) fn raise(&mut self, port: &str, cond: Sense) {
        if let Some(p) = self.nexuses.get_mut(port) {
            push(p, cond);
        }
    }

    /// Forgets a nexus (its session ended).
    pub(crate) fn forget(&mut self, port: &str) {
        self.nexuses.remove(port);
    }

    fn make_room(&mut self) {
        if self.nexuses.len() < NEXUSES_MAX {
            return;
        }
        let idle: Vec<Arc<str>> = self
            .nexuses
            .iter()
            .filter(|(_, p)| p.queue.is_empty())
            .map(|(k, _)| k.clone())
            .take(NEXUSES_MAX / 4)
            .collect();
        if idle.is_empty() {
            self.nexuses.clear();
        }
        for k in idle {
            self.nexuses.remove(&k);
        }
    }
}

fn push(p: &mut Pending, cond: Sense) {
    if p.queue.contains(&cond) {
        return;
    }
    if p.queue.len() >= QUEUED_MAX {
        p.queue.remove(0);
    }
    p.queue.push(cond);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_on_then_queued_conditions() {
        let mut u = UnitAttentions::default();
        let a: Arc<str> = "a".into();
        let b: Arc<str> = "b".into();
        assert_eq!(u.take(&a), Some(ua::POWER_ON));
        assert_eq!(u.take(&a), None);
        assert_eq!(u.take(&b), Some(ua::POWER_ON));
        u.raise_all(ua::LUN_RESET, Some("b"));
        u.raise("a", ua::RESERVATIONS_PREEMPTED);
        u.raise("a", ua::RESERVATIONS_PREEMPTED);
        assert_eq!(u.take(&b), None);
        assert_eq!(u.take(&a), Some(ua::LUN_RESET));
        assert_eq!(u.take(&a), Some(ua::RESERVATIONS_PREEMPTED));
        assert_eq!(u.take(&a), None);
        u.forget("a");
        assert_eq!(u.take(&a), Some(ua::POWER_ON));
    }
}
