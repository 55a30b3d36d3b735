//! Range locks that make COMPARE AND WRITE (and ORWRITE) atomic against every other command
//! on its blocks, across all sessions and reactors of a unit.
//!
//! Every block command registers its LBA range for its lifetime ("shared"); a COMPARE AND
//! WRITE or ORWRITE registers an exclusive range. A shared range overlapping an exclusive one cannot
//! start (the transport retries it later); an exclusive range is inserted at once (so later
//! commands queue behind it and it cannot starve) but only *runs* once no overlapping shared
//! range older than it remains, and no older overlapping exclusive range. The table is bounded:
//! when it is full, a command waits like a blocked one.

/// Shared ranges held at once: the command slots of every session of one unit (a few
/// hundred in practice) with room to spare.
pub(crate) const SHARED_MAX: usize = 1024;
/// Exclusive (COMPARE AND WRITE) ranges held or waiting at once.
pub(crate) const EXCLUSIVE_MAX: usize = 64;

/// A held or waiting range: `Shared(i)` / `Exclusive(i)` index the table, `seq` tells an
/// entry from a later reuse of its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockId {
    Shared(u16),
    Exclusive(u16, u64),
}

#[derive(Debug, Clone, Copy)]
struct Range {
    start: u64,
    end: u64,
    /// Order of insertion (exclusive entries wait only for what came before them).
    seq: u64,
}

impl Range {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start < end && start < self.end
    }
}

/// The unit's range-lock table.
#[derive(Debug)]
pub(crate) struct LockTable {
    shared: Vec<Option<Range>>,
    free: Vec<u16>,
    exclusive: Vec<Option<Range>>,
    /// Entries in `exclusive` (most of the time 0: shared requests then skip the scan).
    exclusive_count: usize,
    seq: u64,
}

/// What [`LockTable::try_shared`] / [`LockTable::try_exclusive`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Acquire {
    /// Held: run.
    Held(LockId),
    /// Not held; for an exclusive request the id is its waiting entry (retry with it).
    Wait(Option<LockId>),
}

impl Default for LockTable {
    fn default() -> Self {
        LockTable {
            shared: vec![None; SHARED_MAX],
            free: (0..SHARED_MAX as u16).rev().collect(),
            exclusive: vec![None; EXCLUSIVE_MAX],
            exclusive_count: 0,
            seq: 0,
        }
    }
}

impl LockTable {
    /// Registers a shared range `[start, end)` unless an exclusive range overlaps it.
    pub(crate) fn try_shared(&mut self, start: u64, end: u64) -> Acquire {
        if self.exclusive_count > 0
            && self
                .exclusive
                .iter()
                .flatten()
                .any(|r| r.overlaps(start, end))
        {
            return Acquire::Wait(None);
        }
        let Some(i) = self.free.pop() else {
            return Acquire::Wait(None);
        };
        self.seq += 1;
        self.shared[usize::from(i)] = Some(Range {
            start,
            end,
            seq: self.seq,
        });
        Acquire::Held(LockId::Shared(i))
    }

    /// Asks for an exclusive range `[start, end)`; `waiting` is the id a previous attempt of
    /// the same command got.
    pub(crate) fn try_exclusive(
        &mut self,
        start: u64,
        end: u64,
        waiting: Option<LockId>,
    ) -> Acquire {
        let (idx, seq) = match waiting {
            Some(LockId::Exclusive(i, seq))
                if self
                    .exclusive
                    .get(usize::from(i))
                    .copied()
                    .flatten()
                    .is_some_and(|r| r.seq == seq) =>
            {
                (i, seq)
            }
            _ => {
                let Some(i) = self.exclusive.iter().position(|e| e.is_none()) else {
                    return Acquire::Wait(None);
                };
                self.seq += 1;
                self.exclusive_count += 1;
                self.exclusive[i] = Some(Range {
                    start,
                    end,
                    seq: self.seq,
                });
                (i as u16, self.seq)
            }
        };
        let id = LockId::Exclusive(idx, seq);
        let older = |r: &Range| r.seq < seq && r.overlaps(start, end);
        if self.shared.iter().flatten().any(older) || self.exclusive.iter().flatten().any(older) {
            Acquire::Wait(Some(id))
        } else {
            Acquire::Held(id)
        }
    }

    /// Releases a range (held or waiting). Unknown or stale ids are ignored.
    pub(crate) fn release(&mut self, id: LockId) {
        match id {
            LockId::Shared(i) => {
                if let Some(slot) = self.shared.get_mut(usize::from(i)) {
                    if slot.take().is_some() {
                        self.free.push(i);
                    }
                }
            }
            LockId::Exclusive(i, seq) => {
                if let Some(slot) = self.exclusive.get_mut(usize::from(i)) {
                    if slot.is_some_and(|r| r.seq == seq) {
                        *slot = None;
                        self.exclusive_count -= 1;
                    }
                }
            }
        }
    }

    /// Ranges registered (tests).
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.shared.iter().flatten().count() + self.exclusive.iter().flatten().count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_waits_for_older_and_blocks_newer() {
        let mut t = LockTable::default();
        let Acquire::Held(a) = t.try_shared(0, 8) else {
            panic!()
        };
        let Acquire::Wait(Some(w)) = t.try_exclusive(4, 5, None) else {
            panic!()
        };
        // Newer overlapping commands queue behind the waiting CAW; others run.
        assert_eq!(t.try_shared(4, 6), Acquire::Wait(None));
        assert!(matches!(t.try_shared(5, 9), Acquire::Held(_)));
        assert_eq!(t.try_exclusive(4, 5, Some(w)), Acquire::Wait(Some(w)));
        t.release(a);
        assert_eq!(t.try_exclusive(4, 5, Some(w)), Acquire::Held(w));
        // A second CAW on the same block waits for the first.
        let Acquire::Wait(Some(w2)) = t.try_exclusive(4, 5, None) else {
            panic!()
        };
        t.release(w);
        assert_eq!(t.try_exclusive(4, 5, Some(w2)), Acquire::Held(w2));
        t.release(w2);
        t.release(w2);
        assert_eq!(t.held(), 1);
    }

    #[test]
    fn table_is_bounded() {
        let mut t = LockTable::default();
        for _ in 0..SHARED_MAX {
            assert!(matches!(t.try_shared(0, 1), Acquire::Held(_)));
        }
        assert_eq!(t.try_shared(0, 1), Acquire::Wait(None));
        let mut t = LockTable::default();
        for i in 0..EXCLUSIVE_MAX as u64 {
            assert!(matches!(t.try_exclusive(i, i + 1, None), Acquire::Held(_)));
        }
        assert_eq!(t.try_exclusive(100, 101, None), Acquire::Wait(None));
    }
}
