//! The device side of a split virtqueue's used ring, written in batches.
//!
//! virtio-queue's `add_used` stores the ring's `idx` after every element. That field shares a
//! cache line with the ring's first elements and is what a polling driver spins on, so at
//! millions of requests per second each store moves the line between the device's and the
//! driver's cores once per request. [`UsedRing`] writes elements as requests complete and
//! publishes `idx` once per reactor loop iteration ([`UsedRing::publish`]), then decides on a
//! guest notification for the whole batch ([`UsedRing::needs_notification`]: the driver's
//! `used_event` with EVENT_IDX — Linux's `vring_need_event` — else the avail ring's
//! `VRING_AVAIL_F_NO_INTERRUPT` flag).
//!
//! Layout (virtio 1.x, split ring, little-endian): used ring = flags u16 @0, idx u16 @2,
//! then `size` elements of { id u32, len u32 } @4 (the avail ring's fields are read through
//! [`crate::split_ring`]). Every access goes through [`GuestRam`]'s bounds checks, so a hostile
//! ring address yields an error, never an access outside guest memory.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_queue::{Queue, QueueT};

use crate::guest_ram::GuestRam;
use crate::split_ring::{avail_flags, used_event};

/// Bytes before the first element of the used ring (flags, idx).
const USED_HEADER_BYTES: u64 = 4;
/// Bytes of one used element (id u32, len u32).
const USED_ELEM_BYTES: u64 = 8;
/// `VRING_AVAIL_F_NO_INTERRUPT`: the driver asks for no notifications (without EVENT_IDX).
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Batched writer of one queue's used ring. Owns the queue's used index while the queue runs:
/// the [`Queue`]'s `next_used` is brought up to date at every [`UsedRing::publish`].
#[derive(Debug, Clone)]
pub struct UsedRing {
    used: u64,
    avail: u64,
    size: u16,
    event_idx: bool,
    /// Index the next element goes to: published plus pending elements.
    next: Wrapping<u16>,
    /// Last value stored to the ring's `idx`.
    published: Wrapping<u16>,
    /// `published` at the last notification decision (Linux's `old` in vring_need_event).
    decided: Wrapping<u16>,
}

impl UsedRing {
    /// Takes over the used ring of `queue` at its current `next_used`.
    pub fn new(queue: &Queue) -> Self {
        let next = Wrapping(queue.next_used());
        UsedRing {
            used: queue.used_ring(),
            avail: queue.avail_ring(),
            size: queue.size().max(1),
            event_idx: queue.event_idx_enabled(),
            next,
            published: next,
            decided: next,
        }
    }

    /// Elements written since the last publish.
    pub fn pending(&self) -> u16 {
        (self.next - self.published).0
    }

    /// Writes one element (not yet visible to the driver: see [`UsedRing::publish`]).
    /// None when the ring is outside guest memory or `head` is not a descriptor index.
    pub fn push<K>(&mut self, mem: &GuestRam<K>, head: u16, len: u32) -> Option<()> {
        if head >= self.size {
            return None;
        }
        // The reactor never has more chains out than the ring holds, so the pending elements
        // never wrap onto ones the driver has not seen yet.
        debug_assert!(self.pending() < self.size, "used ring overrun");
        let slot = u64::from(self.next.0 % self.size);
        let addr = self
            .used
            .checked_add(USED_HEADER_BYTES + slot * USED_ELEM_BYTES)?;
        let mut elem = [0u8; USED_ELEM_BYTES as usize];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write(addr, &elem)?;
        self.next += Wrapping(1);
        Some(())
    }

    /// Makes every pushed element visible: one release store of `idx` (orders the elements
    /// before it), and records the new index in `queue`.
    pub fn publish<K>(&mut self, mem: &GuestRam<K>, queue: &mut Queue) -> Option<()> {
        if self.next == self.published {
            return Some(());
        }
        mem.store_u16(self.used.checked_add(2)?, self.next.0, Ordering::Release)?;
        self.published = self.next;
        queue.set_next_used(self.next.0);
        Some(())
    }

    /// Whether the driver wants a notification for what was published since the last
    /// decision. Errors (a ring outside guest memory) answer yes: a spurious interrupt is
    /// harmless, a lost one hangs the guest.
    pub fn needs_notification<K>(&mut self, mem: &GuestRam<K>) -> bool {
        let new = self.published;
        let old = self.decided;
        self.decided = new;
        // The idx store above must be visible before the driver's event index or flags are
        // read, or a driver re-enabling notifications in between would be missed.
        fence(Ordering::SeqCst);
        if self.event_idx {
            match used_event(mem, self.avail, self.size) {
                Some(v) => need_event(Wrapping(v), new, old),
                None => true,
            }
        } else {
            match avail_flags(mem, self.avail) {
                Some(flags) => new != old && flags & AVAIL_F_NO_INTERRUPT == 0,
                None => true,
            }
        }
    }
}

/// Linux's `vring_need_event`: whether `event` lies in `(old, new]`, in wrapping index space.
pub fn need_event(event: Wrapping<u16>, new: Wrapping<u16>, old: Wrapping<u16>) -> bool {
    (new - event - Wrapping(1)).0 < (new - old).0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

    const QSIZE: u16 = 16;

    fn setup(event_idx: bool) -> (GuestMemoryMmap, Queue) {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let vq = MockSplitQueue::new(&m, QSIZE);
        let mut q = vq.create_queue::<Queue>().unwrap();
        q.set_event_idx(event_idx);
        (m, q)
    }

    fn read_used(m: &GuestMemoryMmap, q: &Queue) -> (u16, Vec<(u32, u32)>) {
        let base = GuestAddress(q.used_ring());
        let idx: u16 = m.read_obj(base.unchecked_add(2)).unwrap();
        let elems = (0..u64::from(QSIZE))
            .map(|i| {
                let a = base.unchecked_add(4 + 8 * i);
                (
                    m.read_obj::<u32>(a).unwrap(),
                    m.read_obj::<u32>(a.unchecked_add(4)).unwrap(),
                )
            })
            .collect();
        (idx, elems)
    }

    #[test]
    fn nothing_is_visible_before_publish() {
        let (m, mut q) = setup(false);
        let mut r = UsedRing::new(&q);
        let ram = GuestRam::new(&m);
        r.push(&ram, 3, 512).unwrap();
        assert_eq!(r.pending(), 1);
        assert_eq!(read_used(&m, &q).0, 0);
        r.publish(&ram, &mut q).unwrap();
        assert_eq!(read_used(&m, &q), {
            let mut e = vec![(0, 0); QSIZE as usize];
            e[0] = (3, 512);
            (1, e)
        });
        assert_eq!(q.next_used(), 1);
        assert!(r.needs_notification(&ram));
        // Nothing new published: no second notification.
        assert!(!r.needs_notification(&ram));
        // A head that is not a descriptor index is refused.
        assert!(r.push(&ram, QSIZE, 1).is_none());
    }

    #[test]
    fn no_interrupt_flag_is_honoured() {
        let (m, mut q) = setup(false);
        m.write_obj(AVAIL_F_NO_INTERRUPT.to_le(), GuestAddress(q.avail_ring()))
            .unwrap();
        let mut r = UsedRing::new(&q);
        let ram = GuestRam::new(&m);
        r.push(&ram, 1, 1).unwrap();
        r.publish(&ram, &mut q).unwrap();
        assert!(!r.needs_notification(&ram));
    }

    #[test]
    fn ring_outside_memory_is_an_error_not_a_fault() {
        let (m, mut q) = setup(false);
        q.set_used_ring_address(Some(0xffff_f000), None);
        let mut r = UsedRing::new(&q);
        assert!(r.push(&GuestRam::new(&m), 1, 1).is_none());
    }

    proptest! {
        /// Batches of completions written through UsedRing leave the ring exactly as
        /// virtio-queue's add_used does, and the notification decisions match its
        /// needs_notification (EVENT_IDX) for any driver used_event.
        #[test]
        fn matches_virtio_queue(
            batches in proptest::collection::vec(
                (proptest::collection::vec((0u16..QSIZE, any::<u32>()), 0..8), any::<u16>()),
                1..40,
            ),
            start in any::<u16>(),
            event_idx in any::<bool>(),
        ) {
            // Two identical memories and queues: one written by each implementation.
            let (m, mut mine) = setup(event_idx);
            let (m2, mut theirs) = setup(event_idx);
            mine.set_next_used(start);
            theirs.set_next_used(start);
            let mut r = UsedRing::new(&mine);
            let ram = GuestRam::new(&m);
            for (elems, used_event) in batches {
                let ev_addr = GuestAddress(mine.avail_ring() + 4 + 2 * u64::from(QSIZE));
                m.write_obj(used_event.to_le(), ev_addr).unwrap();
                m2.write_obj(used_event.to_le(), ev_addr).unwrap();
                for &(head, len) in &elems {
                    r.push(&ram, head, len).unwrap();
                    theirs.add_used(&m2, head, len).unwrap();
                }
                r.publish(&ram, &mut mine).unwrap();
                let a = r.needs_notification(&ram);
                let b = theirs.needs_notification(&m2).unwrap();
                if event_idx {
                    prop_assert_eq!(a, b);
                } else {
                    // virtio-queue always notifies without EVENT_IDX; we skip empty batches.
                    prop_assert_eq!(a, !elems.is_empty());
                }
                prop_assert_eq!(read_used(&m, &mine), read_used(&m2, &theirs));
                prop_assert_eq!(mine.next_used(), theirs.next_used());
            }
        }
    }

    #[test]
    fn need_event_is_linux_formula() {
        let w = Wrapping;
        assert!(need_event(w(0), w(1), w(0)));
        assert!(!need_event(w(5), w(3), w(0)));
        assert!(need_event(w(65535), w(1), w(65534)));
        assert!(!need_event(w(1), w(1), w(1)));
    }
}
