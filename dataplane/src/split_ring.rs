//! The driver side of a split virtqueue as the reactors read it: available ring entries and
//! descriptor chains, through [`GuestRam`] (see there for why not vm-memory's accessors).
//!
//! [`Chain`] yields exactly what virtio-queue 0.17's `DescriptorChain` yields for the same
//! memory (a property test checks it): descriptors of 16 bytes (addr u64, len u32, flags u16,
//! next u16, little-endian) followed through `NEXT` for at most the table's size, one level of
//! `INDIRECT` table (length a multiple of 16, at most 65535 entries, no indirect inside), and a
//! chain longer than 2^32 bytes cut off. Anything malformed ends the chain early; the request
//! parser then refuses what is left.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use virtio_queue::desc::split::Descriptor;

use crate::guest_ram::GuestRam;

/// Bytes of one descriptor.
const DESC_BYTES: u64 = 16;
/// Bytes before the avail ring's entries (flags u16, idx u16).
const AVAIL_HEADER_BYTES: u64 = 4;
/// Bytes of one avail ring entry (a head index, u16).
const AVAIL_ELEM_BYTES: u64 = 2;

/// Reads the avail ring's `idx` (acquire: entries and descriptors written before it are then
/// visible) and returns how many chains wait past `next_avail`, or None when the ring is not
/// in guest memory or the driver claims more than `size` chains (a broken or hostile driver).
pub fn avail_ready<K>(ram: &GuestRam<K>, avail: u64, size: u16, next_avail: u16) -> Option<u16> {
    let idx = ram.load_u16(avail.checked_add(2)?, Ordering::Acquire)?;
    let ready = (Wrapping(idx) - Wrapping(next_avail)).0;
    (ready <= size).then_some(ready)
}

/// The avail ring's `flags` (bit 0: `VRING_AVAIL_F_NO_INTERRUPT`).
pub fn avail_flags<K>(ram: &GuestRam<K>, avail: u64) -> Option<u16> {
    ram.load_u16(avail, Ordering::Acquire)
}

/// The driver's `used_event` (EVENT_IDX), after the avail ring's `size` entries.
pub fn used_event<K>(ram: &GuestRam<K>, avail: u64, size: u16) -> Option<u16> {
    let at = AVAIL_HEADER_BYTES + u64::from(size) * AVAIL_ELEM_BYTES;
    ram.load_u16(avail.checked_add(at)?, Ordering::Acquire)
}

/// The head descriptor index in avail ring slot `index % size`.
pub fn avail_head<K>(ram: &GuestRam<K>, avail: u64, size: u16, index: u16) -> Option<u16> {
    let slot = u64::from(index % size.max(1));
    ram.load_u16(
        avail.checked_add(AVAIL_HEADER_BYTES + AVAIL_ELEM_BYTES * slot)?,
        Ordering::Relaxed,
    )
}

/// A descriptor chain starting at `head` of the table at `table` with `size` entries.
#[derive(Debug)]
pub struct Chain<'r, K> {
    ram: &'r GuestRam<K>,
    table: u64,
    size: u16,
    next: u16,
    ttl: u16,
    indirect: bool,
    yielded_bytes: u32,
    head: u16,
}

impl<'r, K> Chain<'r, K> {
    /// The chain whose head is `head` in the queue's descriptor table.
    pub fn new(ram: &'r GuestRam<K>, table: u64, size: u16, head: u16) -> Self {
        Chain {
            ram,
            table,
            size,
            next: head,
            ttl: size,
            indirect: false,
            yielded_bytes: 0,
            head,
        }
    }

    /// The head index (what goes back on the used ring).
    pub fn head_index(&self) -> u16 {
        self.head
    }

    fn read_desc(&self) -> Option<Descriptor> {
        let addr = self.table.checked_add(u64::from(self.next) * DESC_BYTES)?;
        let b = self.ram.read::<16>(addr)?;
        let a = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        let len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        let flags = u16::from_le_bytes([b[12], b[13]]);
        let next = u16::from_le_bytes([b[14], b[15]]);
        Some(Descriptor::new(a, len, flags, next))
    }
}

impl<K> Iterator for Chain<'_, K> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        loop {
            if self.ttl == 0 || self.next >= self.size {
                return None;
            }
            let desc = self.read_desc()?;
            if desc.flags() & VRING_DESC_F_INDIRECT as u16 != 0 {
                // One level only, a whole number of descriptors, at most u16::MAX of them.
                if self.indirect || desc.len() % DESC_BYTES as u32 != 0 {
                    self.ttl = 0;
                    return None;
                }
                let entries = u16::try_from(desc.len() / DESC_BYTES as u32).ok()?;
                self.table = desc.addr().0;
                self.size = entries;
                self.next = 0;
                self.ttl = entries;
                self.indirect = true;
                continue;
            }
            self.yielded_bytes = self.yielded_bytes.checked_add(desc.len())?;
            if desc.flags() & VRING_DESC_F_NEXT as u16 != 0 {
                self.next = desc.next();
                self.ttl -= 1;
            } else {
                self.ttl = 0;
            }
            return Some(desc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT, QueueT};
    use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

    const QSIZE: u16 = 8;
    /// Where random indirect tables go.
    const INDIRECT_AT: u64 = 0x8000;

    fn desc_bytes(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..].copy_from_slice(&next.to_le_bytes());
        b
    }

    fn flat(d: &Descriptor) -> (u64, u32, u16, u16) {
        (d.addr().0, d.len(), d.flags(), d.next())
    }

    /// A descriptor with mostly-valid fields: small lengths, flags among NEXT/WRITE/INDIRECT,
    /// next within (or just past) the table, addresses sometimes at the indirect area.
    fn any_desc() -> impl Strategy<Value = (u64, u32, u16, u16)> {
        (
            prop_oneof![Just(INDIRECT_AT), 0u64..0x20000, Just(u64::MAX - 8)],
            prop_oneof![
                Just(16u32),
                Just(48u32),
                Just(17u32),
                0u32..0x1000,
                Just(u32::MAX)
            ],
            0u16..8,
            0u16..(QSIZE + 2),
        )
    }

    proptest! {
        /// Our chain walk yields exactly virtio-queue's DescriptorChain for any table.
        #[test]
        fn chain_matches_virtio_queue(
            table in proptest::collection::vec(any_desc(), QSIZE as usize),
            indirect in proptest::collection::vec(any_desc(), 4),
            head in 0u16..(QSIZE + 1),
        ) {
            let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
            let vq = MockSplitQueue::new(&m, QSIZE);
            let mut q: Queue = vq.create_queue().unwrap();
            for (i, &(a, l, f, n)) in table.iter().enumerate() {
                m.write_slice(&desc_bytes(a, l, f, n), vq.desc_table_addr().unchecked_add(16 * i as u64)).unwrap();
            }
            for (i, &(a, l, f, n)) in indirect.iter().enumerate() {
                m.write_slice(&desc_bytes(a, l, f, n), GuestAddress(INDIRECT_AT + 16 * i as u64)).unwrap();
            }
            let avail = q.avail_ring();
            m.write_obj(head.to_le(), GuestAddress(avail + 4)).unwrap();
            m.write_obj(1u16.to_le(), GuestAddress(avail + 2)).unwrap();

            let ram = GuestRam::new(&m);
            prop_assert_eq!(avail_ready(&ram, avail, QSIZE, q.next_avail()), Some(1));
            let h = avail_head(&ram, avail, QSIZE, q.next_avail()).unwrap();
            let ours: Vec<_> = Chain::new(&ram, q.desc_table(), QSIZE, h).map(|d| flat(&d)).collect();
            let chain = q.iter(&m).unwrap().next().unwrap();
            prop_assert_eq!(chain.head_index(), h);
            let theirs: Vec<_> = chain.map(|d| flat(&d)).collect();
            prop_assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn avail_index_beyond_the_ring_is_refused() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let vq = MockSplitQueue::new(&m, QSIZE);
        let q: Queue = vq.create_queue().unwrap();
        let ram = GuestRam::new(&m);
        m.write_obj((QSIZE + 1).to_le(), GuestAddress(q.avail_ring() + 2))
            .unwrap();
        assert_eq!(avail_ready(&ram, q.avail_ring(), QSIZE, 0), None);
        m.write_obj(QSIZE.to_le(), GuestAddress(q.avail_ring() + 2))
            .unwrap();
        assert_eq!(avail_ready(&ram, q.avail_ring(), QSIZE, 0), Some(QSIZE));
        // A ring outside guest memory.
        assert_eq!(avail_ready(&ram, 0xffff_0000, QSIZE, 0), None);
    }

    #[test]
    fn circular_chain_ends() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let ram = GuestRam::new(&m);
        for i in 0..QSIZE {
            m.write_slice(
                &desc_bytes(0x4000, 1, VRING_DESC_F_NEXT as u16, (i + 1) % 2),
                GuestAddress(0x1000 + 16 * u64::from(i)),
            )
            .unwrap();
        }
        assert_eq!(
            Chain::new(&ram, 0x1000, QSIZE, 0).count(),
            usize::from(QSIZE)
        );
    }
}
