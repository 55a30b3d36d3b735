//! An [`FsQueue`] polled directly over a split ring in test guest memory: requests reach the
//! handler and come back on the used ring with one notification per burst; a burst is
//! bounded; hostile rings are refused without a panic; the ring goes back with its progress.

use std::sync::Mutex;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::stats::QueueStats;

const MEM_BYTES: usize = 0x10_0000;
/// Ring layout: descriptor table at 0 (up to 256 entries), avail and used rings on their own
/// pages (virtio-queue's mock layout overlaps them once a ring has been used all around).
const AVAIL_ADDR: u64 = 0x1000;
const USED_ADDR: u64 = 0x2000;
const REQ_ADDR: u64 = 0x1_0000;
const OUT_ADDR: u64 = 0x2_0000;
/// Bytes the test handler writes into each chain's writable part (at most).
const REPLY_BYTES: u32 = 24;

/// Records the heads it serves and answers with REPLY_BYTES bytes (less if the chain has less
/// writable room).
#[derive(Debug, Default)]
struct Recorder {
    heads: Mutex<Vec<u16>>,
}

impl FsRequestHandler for Recorder {
    fn handle(&self, _conn: u64, _mem: &FsMemory, chain: DescriptorChain<&FsMemory>) -> u32 {
        self.heads.lock().unwrap().push(chain.head_index());
        let room: u32 = chain.writable().map(|d| d.len()).sum();
        room.min(REPLY_BYTES)
    }
}

struct Rig {
    mem: FsMemory,
    queue: FsQueue,
    handler: Arc<Recorder>,
    stats: Arc<QueueStats>,
    call: EventFd,
    size: u16,
    avail_idx: u16,
}

/// A started queue of `size` entries with nothing offered yet.
fn rig(size: u16) -> Rig {
    let mem = FsMemory::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).unwrap();
    let mut queue = Queue::new(size).unwrap();
    queue.set_size(size);
    queue.set_desc_table_address(Some(0), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_ADDR as u32), Some(0));
    queue.set_used_ring_address(Some(USED_ADDR as u32), Some(0));
    queue.set_ready(true);
    assert!(queue.is_valid(&mem));
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    let stats = Arc::new(QueueStats::default());
    let vring = StartedVring {
        queue,
        mem: GuestMemoryAtomic::new(mem.clone()),
        kick: EventFd::new(EFD_NONBLOCK).unwrap(),
        call: Arc::new(std::sync::Mutex::new(Some(call.try_clone().unwrap()))),
        stats: stats.clone(),
    };
    let handler = Arc::new(Recorder::default());
    let queue = FsQueue::new("share".into(), 1, vring, handler.clone(), 1);
    Rig {
        mem,
        queue,
        handler,
        stats,
        call,
        size,
        avail_idx: 0,
    }
}

impl Rig {
    fn desc(&self, d: u16, addr: u64, len: u32, flags: u32, next: u16) {
        let raw = RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next));
        self.mem
            .write_obj(raw, GuestAddress(16 * u64::from(d)))
            .unwrap();
    }

    /// Offers `head` as the next avail entry (not yet published).
    fn offer(&mut self, head: u16) {
        let slot = AVAIL_ADDR + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Offers a request chain (readable header, writable reply) at descriptors d, d + 1.
    fn offer_request(&mut self, d: u16) {
        self.desc(d, REQ_ADDR, 40, VRING_DESC_F_NEXT, d + 1);
        self.desc(d + 1, OUT_ADDR, 64, VRING_DESC_F_WRITE, 0);
        self.offer(d);
    }

    fn publish(&self, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(AVAIL_ADDR + 2))
            .unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED_ADDR + 2)).unwrap()
    }

    /// The (id, len) of used element `i`.
    fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = USED_ADDR + 4 + 8 * u64::from(i % self.size);
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }
}

#[test]
fn requests_come_back_on_the_used_ring_with_one_notification() {
    let mut r = rig(16);
    for d in [0, 2, 4] {
        r.offer_request(d);
    }
    r.publish(r.avail_idx);
    assert_eq!(r.queue.poll(), 3);
    assert_eq!(*r.handler.heads.lock().unwrap(), vec![0, 2, 4]);
    assert_eq!(r.used_idx(), 3);
    for (i, head) in [0u32, 2, 4].into_iter().enumerate() {
        assert_eq!(r.used_elem(i as u16), (head, REPLY_BYTES));
    }
    assert_eq!(r.call.read().unwrap(), 1);
    let st = r.stats.snapshot();
    assert_eq!(
        (st.requests, st.notifications, st.invalid_requests),
        (3, 1, 0)
    );
    // Nothing more: idle, no notification.
    assert_eq!(r.queue.poll(), 0);
    assert_eq!(r.stats.snapshot().notifications, 1);
    // Stopped: a request offered now stays on the ring for whoever serves it next.
    r.queue.stop();
    r.offer_request(6);
    r.publish(r.avail_idx);
    assert_eq!(r.queue.poll(), 0);
    assert_eq!(r.used_idx(), 3);
    let q = r.queue.take_queue().unwrap();
    assert_eq!((q.next_avail(), q.next_used()), (3, 3));
    assert_eq!(r.queue.poll(), 0);
    assert_eq!(r.queue.wake_fd(), -1);
}

#[test]
fn a_burst_is_bounded_and_the_ring_wraps() {
    // 128 entries: room for 40 two-descriptor chains; four rounds wrap the rings.
    let mut r = rig(128);
    let total = FS_BATCH_MAX + 8;
    for _ in 0..4 {
        for k in 0..total {
            r.offer_request(2 * k as u16);
        }
        r.publish(r.avail_idx);
        let before = r.used_idx();
        assert_eq!(r.queue.poll(), FS_BATCH_MAX);
        assert_eq!(r.used_idx(), before.wrapping_add(FS_BATCH_MAX as u16));
        assert_eq!(r.queue.poll(), 8);
        assert_eq!(r.used_idx(), before.wrapping_add(total as u16));
        for k in 0..total as u16 {
            assert_eq!(
                r.used_elem(before.wrapping_add(k)),
                (2 * u32::from(k), REPLY_BYTES)
            );
        }
    }
    assert_eq!(r.stats.snapshot().requests, 4 * total as u64);
    assert_eq!(r.stats.snapshot().invalid_requests, 0);
}

#[test]
fn hostile_rings_are_refused_without_a_panic() {
    let mut r = rig(16);
    // An avail index more than a ring ahead of the device: nothing is taken.
    r.publish(r.size + 2);
    assert_eq!(r.queue.poll(), 0);
    assert!(r.handler.heads.lock().unwrap().is_empty());
    // A head that is not a descriptor index: nothing can go on the used ring (the head
    // cannot be written back); counted, and the queue goes on.
    r.offer(r.size + 5);
    r.publish(r.avail_idx);
    assert_eq!(r.queue.poll(), 1);
    assert_eq!(r.used_idx(), 0);
    assert_eq!(r.stats.snapshot().invalid_requests, 1);
    // A descriptor loop (0 → 1 → 0 ...) ends at the ring size; the chain is served once.
    r.desc(0, OUT_ADDR, 8, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1);
    r.desc(1, OUT_ADDR, 8, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0);
    r.offer(0);
    r.publish(r.avail_idx);
    assert_eq!(r.queue.poll(), 1);
    assert_eq!(r.used_idx(), 1);
    assert_eq!(r.used_elem(0), (0, REPLY_BYTES));
    // A used ring outside guest memory: the request is served, nothing is written, no panic.
    r.offer_request(2);
    r.publish(r.avail_idx);
    let q = r.queue.ring.as_mut().unwrap();
    q.used = {
        let mut bad = Queue::new(16).unwrap();
        bad.set_used_ring_address(Some(0xffff_f000), Some(0xffff));
        bad.set_next_used(1);
        UsedRing::new(&bad)
    };
    assert_eq!(r.queue.poll(), 1);
    assert_eq!(r.stats.snapshot().invalid_requests, 2);
}
