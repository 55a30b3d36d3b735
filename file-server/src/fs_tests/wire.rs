//! FUSE requests through the handler over a real virtqueue, as a guest would send them.

use super::*;
use dataplane::vhost_fs::{FsMemory, FsRequestHandler};
use proptest::prelude::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::handler::ShareHandler;

const REQ_ADDR: u64 = 0x1_0000;
const OUT_ADDR: u64 = 0x8_0000;

fn mem() -> FsMemory {
    FsMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

/// Guest memory large enough for a reply buffer above the 1 MiB READ limit.
fn big_mem() -> FsMemory {
    FsMemory::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
}

/// Sends `req` (readable) with `out_len` writable bytes; returns (used, reply bytes).
fn send(h: &ShareHandler, m: &FsMemory, req: &[u8], out_len: u32) -> (u32, Vec<u8>) {
    send_at(h, m, req, out_len, REQ_ADDR, OUT_ADDR)
}

/// [`send`] with the request and reply buffers at the given guest addresses.
fn send_at(
    h: &ShareHandler,
    m: &FsMemory,
    req: &[u8],
    out_len: u32,
    req_addr: u64,
    out_addr: u64,
) -> (u32, Vec<u8>) {
    let vq = MockSplitQueue::new(m, 16);
    let mut descs = vec![];
    if !req.is_empty() {
        descs.push((req_addr, req.len() as u32, false));
    }
    if out_len > 0 {
        descs.push((out_addr, out_len, true));
    }
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, w))| {
            let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            RawDescriptor::from(Descriptor::new(addr, len, flags, (i + 1) as u16))
        })
        .collect();
    vq.add_desc_chains(&raw, 0).unwrap();
    m.write_slice(req, GuestAddress(req_addr)).unwrap();
    m.write_slice(&vec![0xeeu8; out_len as usize], GuestAddress(out_addr))
        .unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let chain = q.pop_descriptor_chain(m).unwrap();
    let used = h.handle(1, m, chain);
    let mut out = vec![0u8; used as usize];
    m.read_slice(&mut out, GuestAddress(out_addr)).unwrap();
    (used, out)
}

fn header(len: u32, opcode: u32, unique: u64, nodeid: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(40);
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&opcode.to_le_bytes());
    h.extend_from_slice(&unique.to_le_bytes());
    h.extend_from_slice(&nodeid.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes()); // uid
    h.extend_from_slice(&0u32.to_le_bytes()); // gid
    h.extend_from_slice(&1u32.to_le_bytes()); // pid
    h.extend_from_slice(&0u32.to_le_bytes()); // total_extlen, padding
    h
}

fn reply_error(out: &[u8]) -> (i32, u64) {
    assert!(out.len() >= 16, "reply too short: {out:?}");
    let err = i32::from_le_bytes(out[4..8].try_into().unwrap());
    let unique = u64::from_le_bytes(out[8..16].try_into().unwrap());
    (err, unique)
}

fn init(h: &ShareHandler, m: &FsMemory) {
    let mut req = header(40 + 64, 26, 1, 0);
    let mut body = vec![0u8; 64];
    body[0..4].copy_from_slice(&7u32.to_le_bytes());
    body[4..8].copy_from_slice(&38u32.to_le_bytes());
    req.extend_from_slice(&body);
    let (_, out) = send(h, m, &req, 4096);
    assert_eq!(reply_error(&out), (0, 1));
}

#[test]
fn bad_requests_get_error_replies() {
    let f = fixture();
    let h = ShareHandler::new(f.fs.clone());
    let m = mem();
    init(&h, &m);
    // Unknown opcode: ENOSYS.
    let (_, out) = send(&h, &m, &header(40, 9999, 7, 1), 4096);
    assert_eq!(reply_error(&out), (-libc::ENOSYS, 7));
    // LOOKUP whose name is not NUL-terminated: EINVAL, never a panic.
    let mut req = header(44, 1, 8, 1);
    req.extend_from_slice(b"abcd");
    let (_, out) = send(&h, &m, &req, 4096);
    assert_eq!(reply_error(&out), (-libc::EINVAL, 8));
    // GETATTR with a truncated body.
    let mut req = header(42, 3, 9, 1);
    req.extend_from_slice(&[0, 0]);
    let (_, out) = send(&h, &m, &req, 4096);
    assert_eq!(reply_error(&out).1, 9);
    assert_ne!(reply_error(&out).0, 0);
    // A length beyond the protocol's buffer limit.
    let (_, out) = send(&h, &m, &header(u32::MAX, 3, 10, 1), 4096);
    assert_eq!(reply_error(&out), (-libc::ENOMEM, 10));
    // A header cut short: nothing to answer to, nothing written.
    let (used, _) = send(&h, &m, &header(40, 3, 11, 1)[..20], 4096);
    assert_eq!(used, 0);
    // GETATTR of a node that does not exist.
    let mut req = header(56, 3, 12, 999_999);
    req.extend_from_slice(&[0u8; 16]);
    let (_, out) = send(&h, &m, &req, 4096);
    assert_ne!(reply_error(&out).0, 0);
    assert_eq!(
        h.counters()
            .panics
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

/// A WRITE whose payload is longer than its size would make virtiofsd's zero-copy
/// helper write the surplus past the range: refused. A READ with a buffer larger than
/// its size must not receive datastore bytes past the file's data.
#[test]
fn data_requests_move_exactly_their_size() {
    let f = fixture();
    let (file, fh) = f.create(root(), ROOT, "neighbour", 0o644).unwrap();
    // FUSE writes are at most 1 MiB (max_write): two each.
    let secret = vec![0x5au8; 2 << 20];
    let (victim, vh) = f.create(root(), ROOT, "victim", 0o644).unwrap();
    let ones = vec![1u8; 1 << 20];
    for off in [0u64, 1 << 20] {
        let half = &secret[..1 << 20];
        let n =
            f.fs.write(
                root(),
                file,
                fh,
                SliceReader(half),
                1 << 20,
                off,
                None,
                false,
                false,
                0,
            )
            .unwrap();
        assert_eq!(n, 1 << 20);
        f.fs.write(
            root(),
            victim,
            vh,
            SliceReader(&ones),
            1 << 20,
            off,
            None,
            false,
            false,
            0,
        )
        .unwrap();
    }
    let h = ShareHandler::new(f.fs.clone());
    let m = mem();
    init(&h, &m);
    // WRITE size 4 with 4096 payload bytes at the end of the victim's last block.
    let mut req = header(40 + 40 + 4096, 16, 20, victim);
    let mut body = vec![0u8; 40];
    body[0..8].copy_from_slice(&vh.to_le_bytes());
    body[8..16].copy_from_slice(&((2u64 << 20) - 4).to_le_bytes());
    body[16..20].copy_from_slice(&4u32.to_le_bytes());
    req.extend_from_slice(&body);
    req.extend_from_slice(&vec![0xffu8; 4096]);
    let (_, out) = send(&h, &m, &req, 4096);
    assert_eq!(reply_error(&out), (-libc::EINVAL, 20));
    // Reads are at most 1 MiB each (READ_BYTES_MAX).
    let mut w = VecWriter(Vec::new());
    for off in [0u64, 1 << 20] {
        let n =
            f.fs.read(root(), file, fh, &mut w, 1 << 20, off, None, 0)
                .unwrap();
        assert_eq!(n, 1 << 20, "read at {off}");
    }
    assert!(w.0 == secret, "neighbouring file changed");
    // READ size 8 at the victim's end into a 64 KiB buffer: 4 bytes come back, and the
    // rest of the buffer keeps what the guest put there.
    let mut req = header(40 + 40, 15, 21, victim);
    let mut body = vec![0u8; 40];
    body[0..8].copy_from_slice(&vh.to_le_bytes());
    body[8..16].copy_from_slice(&((2u64 << 20) - 4).to_le_bytes());
    body[16..20].copy_from_slice(&8u32.to_le_bytes());
    req.extend_from_slice(&body);
    let (used, _) = send(&h, &m, &req, 0x1_0000);
    assert_eq!(used, 16 + 4);
    let mut buf = vec![0u8; 0x1_0000];
    m.read_slice(&mut buf, GuestAddress(OUT_ADDR)).unwrap();
    assert_eq!(&buf[16..20], &[1, 1, 1, 1]);
    assert!(
        buf[20..].iter().all(|&b| b == 0xee),
        "bytes past the reply were written"
    );
}

/// A READ larger than the 1 MiB limit, into one buffer of exactly its size: the server
/// reads at most 1 MiB, and nothing past it — the next file's block on the device — may
/// reach guest memory. (The reply alone cannot show it: the leak came with an error.)
#[test]
fn oversized_read_leaks_nothing_past_the_file() {
    let f = fixture();
    let mib = 1usize << 20;
    let (a, ah) = f.create(root(), ROOT, "a", 0o644).unwrap();
    let (b, bh) = f.create(root(), ROOT, "b", 0o644).unwrap();
    for (node, h, byte) in [(a, ah, 0xaau8), (b, bh, 0x5b)] {
        let data = vec![byte; mib];
        let n =
            f.fs.write(
                root(),
                node,
                h,
                SliceReader(&data),
                mib as u32,
                0,
                None,
                false,
                false,
                0,
            )
            .unwrap();
        assert_eq!(n, mib);
    }
    // The test is about B's block following A's on the device: check that it does.
    let dev = |node| {
        let mut plan = Vec::new();
        // The pin only matters while reading; the layout is what this checks.
        let (_, _pin) = f
            .fs_ds()
            .read_plan(f.fs_ino(node), 0, mib as u64, &mut plan)
            .unwrap();
        match plan.as_slice() {
            [vmfs::Extent::Device { offset, len }] if *len == mib as u64 => *offset,
            other => panic!("unexpected layout {other:?}"),
        }
    };
    assert_eq!(
        dev(b),
        dev(a) + mib as u64,
        "B does not follow A on the device"
    );
    let h = ShareHandler::new(f.fs.clone());
    let m = big_mem();
    init(&h, &m);
    let size = (mib + (64 << 10)) as u32;
    let mut req = header(40 + 40, 15, 30, a);
    let mut body = vec![0u8; 40];
    body[0..8].copy_from_slice(&ah.to_le_bytes());
    body[16..20].copy_from_slice(&size.to_le_bytes());
    req.extend_from_slice(&body);
    let (used, _) = send(&h, &m, &req, 16 + size);
    let mut buf = vec![0u8; 16 + size as usize];
    m.read_slice(&mut buf, GuestAddress(OUT_ADDR)).unwrap();
    assert!(
        !buf[16 + mib..].contains(&0x5b),
        "bytes of the next file on the device reached the guest"
    );
    // Served, through an exact copy: A's 1 MiB and nothing after it.
    assert_eq!(reply_error(&buf[..16]), (0, 30));
    assert_eq!(used as usize, 16 + mib);
    assert!(buf[16..16 + mib].iter().all(|&x| x == 0xaa));
    assert!(buf[16 + mib..].iter().all(|&x| x == 0xee));
}

/// A WRITE request with `size` and `payload` bytes of data for node `node`, handle `fh`.
/// The header's length is capped at what virtiofsd's server accepts: nothing checks it
/// against the bytes the chain really carries, so a hostile guest can understate it.
fn write_req(unique: u64, node: u64, fh: u64, offset: u64, size: u32, payload: &[u8]) -> Vec<u8> {
    let len = (80 + payload.len()).min(80 + crate::fs::WRITE_BYTES_MAX as usize);
    let mut req = header(len as u32, 16, unique, node);
    let mut body = vec![0u8; 40];
    body[0..8].copy_from_slice(&fh.to_le_bytes());
    body[8..16].copy_from_slice(&offset.to_le_bytes());
    body[16..20].copy_from_slice(&size.to_le_bytes());
    req.extend_from_slice(&body);
    req.extend_from_slice(payload);
    req
}

/// WRITE sizes above the max_write that INIT announces are refused before any byte is
/// copied, and the per-thread scratch file never keeps more than its bound.
#[test]
fn writes_above_max_write_are_refused_and_scratch_shrinks() {
    let f = fixture();
    let (file, fh) = f.create(root(), ROOT, "w", 0o644).unwrap();
    let h = ShareHandler::new(f.fs.clone());
    let m = big_mem();
    // INIT announces max_write (fuse_init_out bytes 20..24 after the header).
    let mut req = header(40 + 64, 26, 1, 0);
    let mut body = vec![0u8; 64];
    body[0..4].copy_from_slice(&7u32.to_le_bytes());
    body[4..8].copy_from_slice(&38u32.to_le_bytes());
    req.extend_from_slice(&body);
    let (_, out) = send(&h, &m, &req, 4096);
    let max_write = u32::from_le_bytes(out[36..40].try_into().unwrap());
    assert_eq!(max_write, crate::fs::WRITE_BYTES_MAX);
    // 3 MiB with a matching payload, in one descriptor, at an offset no single file
    // block covers (so the data would take the scratch path).
    let size = 3u32 << 20;
    let payload = vec![0x77u8; size as usize];
    let req = write_req(40, file, fh, 4096, size, &payload);
    let (_, out) = send_at(&h, &m, &req, 4096, REQ_ADDR, 0x3f_0000);
    assert_eq!(reply_error(&out), (-libc::EINVAL, 40));
    assert_eq!(f.fs.getattr(root(), file, None).unwrap().0.size, 0);
    assert!(
        crate::fs::scratch_bytes() <= crate::fs::SCRATCH_KEEP_BYTES,
        "scratch holds {} bytes",
        crate::fs::scratch_bytes()
    );
    // A write of exactly max_write through the scratch path is served, and the scratch
    // file is shrunk afterwards.
    let payload = vec![0x78u8; max_write as usize];
    let (_, out) = send(
        &h,
        &m,
        &write_req(41, file, fh, 4096, max_write, &payload),
        4096,
    );
    assert_eq!(reply_error(&out), (0, 41));
    assert_eq!(
        f.fs.getattr(root(), file, None).unwrap().0.size,
        4096 + u64::from(max_write)
    );
    assert!(crate::fs::scratch_bytes() <= crate::fs::SCRATCH_KEEP_BYTES);
}

/// One step of a guest session. Nodes and handles are indices into what earlier replies
/// returned (taken modulo their number), so requests reach real objects.
#[derive(Debug, Clone)]
enum Step {
    Lookup {
        dir: usize,
        name: usize,
    },
    Create {
        dir: usize,
        name: usize,
        mode: u32,
        flags: u32,
    },
    Mkdir {
        dir: usize,
        name: usize,
        mode: u32,
    },
    Mknod {
        dir: usize,
        name: usize,
        mode: u32,
    },
    Symlink {
        dir: usize,
        name: usize,
        target: usize,
    },
    Link {
        node: usize,
        dir: usize,
        name: usize,
    },
    Open {
        node: usize,
        flags: u32,
    },
    Opendir {
        node: usize,
    },
    Read {
        node: usize,
        fh: usize,
        offset: u64,
        size: u32,
        out_len: u32,
    },
    Write {
        node: usize,
        fh: usize,
        offset: u64,
        size: u32,
        payload: u32,
        honest: bool,
    },
    Setattr {
        node: usize,
        fh: usize,
        valid: u32,
        size: u64,
        mode: u32,
        uid: u32,
    },
    Fallocate {
        node: usize,
        fh: usize,
        mode: u32,
        offset: u64,
        length: u64,
    },
    Setxattr {
        node: usize,
        name: usize,
        value: u32,
    },
    Getxattr {
        node: usize,
        name: usize,
        size: u32,
    },
    Release {
        node: usize,
        fh: usize,
        dir: bool,
    },
    Forget {
        node: usize,
        count: u64,
    },
    Unlink {
        dir: usize,
        name: usize,
    },
    Rmdir {
        dir: usize,
        name: usize,
    },
    Rename {
        from: usize,
        name: usize,
        to: usize,
        new_name: usize,
        flags: u32,
    },
    Readdir {
        node: usize,
        fh: usize,
        plus: bool,
    },
    Simple {
        node: usize,
        opcode: u32,
    },
}

const NAMES: [&str; 5] = ["a", "b", "c", "dir", "x.img"];
const XATTRS: [&str; 4] = [
    "user.k",
    "system.posix_acl_access",
    "trusted.t",
    "system.posix_acl_default",
];
/// Callers: root, users of the map, and one outside it (refused with EPERM).
const UIDS: [u32; 5] = [0, ALICE, BOB, CAROL, 4_000_000];
const MIB: u32 = 1 << 20;

fn open_flags() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(libc::O_RDWR as u32),
        Just((libc::O_WRONLY | libc::O_TRUNC) as u32),
        Just(libc::O_RDONLY as u32),
        Just((libc::O_RDWR | libc::O_EXCL) as u32),
        any::<u32>(),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let i = || 0usize..64;
    let size = prop_oneof![
        0u32..9000,
        Just(MIB),
        Just(MIB + 1),
        Just(u32::MAX),
        any::<u32>()
    ];
    let offset = prop_oneof![6 => 0u64..(3 << 20), 1 => Just(u64::MAX - 4096), 1 => any::<u64>()];
    prop_oneof![
        1 => (i(), i()).prop_map(|(dir, name)| Step::Lookup { dir, name }),
        3 => (i(), i(), prop_oneof![Just(0o644u32), Just(0o777), Just(0o600), any::<u32>()], open_flags())
            .prop_map(|(dir, name, mode, flags)| Step::Create { dir, name, mode, flags }),
        1 => (i(), i(), any::<u32>()).prop_map(|(dir, name, mode)| Step::Mkdir { dir, name, mode }),
        1 => (i(), i(), any::<u32>()).prop_map(|(dir, name, mode)| Step::Mknod { dir, name, mode }),
        1 => (i(), i(), i()).prop_map(|(dir, name, target)| Step::Symlink { dir, name, target }),
        1 => (i(), i(), i()).prop_map(|(node, dir, name)| Step::Link { node, dir, name }),
        2 => (i(), open_flags()).prop_map(|(node, flags)| Step::Open { node, flags }),
        1 => i().prop_map(|node| Step::Opendir { node }),
        3 => (i(), i(), offset.clone(), size.clone(), prop_oneof![0u32..64, 16u32..9000, Just(16 + MIB), Just(16 + MIB + 4096)])
            .prop_map(|(node, fh, offset, size, out_len)| Step::Read { node, fh, offset, size, out_len }),
        5 => (i(), i(), offset.clone(), prop_oneof![6 => 0u32..9000, 2 => Just(MIB), 1 => Just(MIB + 1), 1 => any::<u32>()], prop_oneof![4 => Just(None), 1 => (0u32..9000).prop_map(Some)], any::<bool>())
            // Mostly a payload of the stated size (capped to what guest memory holds).
            .prop_map(|(node, fh, offset, size, payload, honest)| Step::Write {
                node, fh, offset, size, payload: payload.unwrap_or(size).min(0x17_0000), honest
            }),
        1 => (i(), i(), any::<u32>(), offset.clone(), any::<u32>(), prop::sample::select(&UIDS[..]))
            .prop_map(|(node, fh, valid, size, mode, uid)| Step::Setattr { node, fh, valid, size, mode, uid }),
        2 => (i(), i(), prop_oneof![Just(0u32), Just(1), Just(3), any::<u32>()], offset, prop_oneof![0u64..(8 << 20), any::<u64>()])
            .prop_map(|(node, fh, mode, offset, length)| Step::Fallocate { node, fh, mode, offset, length }),
        1 => (i(), i(), prop_oneof![0u32..100, Just(65_536), Just(70_000), Just(MIB)])
            .prop_map(|(node, name, value)| Step::Setxattr { node, name, value }),
        1 => (i(), i(), prop_oneof![Just(0u32), 1u32..200, Just(MIB + 1)])
            .prop_map(|(node, name, size)| Step::Getxattr { node, name, size }),
        1 => (i(), i(), any::<bool>()).prop_map(|(node, fh, dir)| Step::Release { node, fh, dir }),
        1 => (i(), prop_oneof![Just(1u64), any::<u64>()]).prop_map(|(node, count)| Step::Forget { node, count }),
        1 => (i(), i()).prop_map(|(dir, name)| Step::Unlink { dir, name }),
        1 => (i(), i()).prop_map(|(dir, name)| Step::Rmdir { dir, name }),
        1 => (i(), i(), i(), i(), prop_oneof![Just(0u32), Just(1), Just(2), any::<u32>()])
            .prop_map(|(from, name, to, new_name, flags)| Step::Rename { from, name, to, new_name, flags }),
        1 => (i(), i(), any::<bool>()).prop_map(|(node, fh, plus)| Step::Readdir { node, fh, plus }),
        1 => (i(), prop::sample::select(&[3u32, 5, 17, 20, 23, 25, 34, 46][..]))
            .prop_map(|(node, opcode)| Step::Simple { node, opcode }),
    ]
}

/// What the session has learnt from replies.
struct Session {
    nodes: Vec<u64>,
    /// (node, handle, opened for writing).
    handles: Vec<(u64, u64, bool)>,
    unique: u64,
}

impl Session {
    fn node(&self, i: usize) -> u64 {
        self.nodes[i % self.nodes.len()]
    }

    /// A handle (with its node), or a made-up one when none is open. Half the time the
    /// newest one (opened for writing when `write`): sessions mostly use what they opened.
    fn handle(&self, i: usize, node: usize, write: bool) -> (u64, u64) {
        let newest = self.handles.iter().rev().find(|h| h.2 || !write);
        match (newest, self.handles.len()) {
            (Some(&(n, h, _)), _) if i < 32 => (n, h),
            (_, 0) => (self.node(node), i as u64),
            (_, len) => {
                let (n, h, _) = self.handles[i % len];
                (n, h)
            }
        }
    }
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn le32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_le_bytes());
}

fn le64(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_le_bytes());
}

/// Builds the request of one step: (opcode, node, body, reply buffer size).
fn build(s: &Session, st: &Step) -> (u32, u64, Vec<u8>, u32) {
    let mut b = Vec::new();
    let name = |i: usize| cstr(NAMES[i % NAMES.len()]);
    match *st {
        Step::Lookup { dir, name: n } => {
            b.extend(name(n));
            (1, s.node(dir), b, 4096)
        }
        Step::Create {
            dir,
            name: n,
            mode,
            flags,
        } => {
            le32(&mut b, flags);
            le32(&mut b, mode);
            le32(&mut b, 0o022);
            le32(&mut b, 0);
            b.extend(name(n));
            (35, s.node(dir), b, 4096)
        }
        Step::Mkdir { dir, name: n, mode } => {
            le32(&mut b, mode);
            le32(&mut b, 0o022);
            b.extend(name(n));
            (9, s.node(dir), b, 4096)
        }
        Step::Mknod { dir, name: n, mode } => {
            le32(&mut b, mode);
            le32(&mut b, 0);
            le32(&mut b, 0o022);
            le32(&mut b, 0);
            b.extend(name(n));
            (8, s.node(dir), b, 4096)
        }
        Step::Symlink {
            dir,
            name: n,
            target,
        } => {
            b.extend(name(n));
            b.extend(name(target));
            (6, s.node(dir), b, 4096)
        }
        Step::Link { node, dir, name: n } => {
            le64(&mut b, s.node(node));
            b.extend(name(n));
            (13, s.node(dir), b, 4096)
        }
        Step::Open { node, flags } => {
            le32(&mut b, flags);
            le32(&mut b, 0);
            (14, s.node(node), b, 4096)
        }
        Step::Opendir { node } => {
            le32(&mut b, 0);
            le32(&mut b, 0);
            (27, s.node(node), b, 4096)
        }
        Step::Read {
            node,
            fh,
            offset,
            size,
            out_len,
        } => {
            let (n, h) = s.handle(fh, node, false);
            le64(&mut b, h);
            le64(&mut b, offset);
            le32(&mut b, size);
            b.extend_from_slice(&[0u8; 20]);
            (15, n, b, out_len)
        }
        Step::Write {
            node,
            fh,
            offset,
            size,
            payload,
            ..
        } => {
            let (n, h) = s.handle(fh, node, true);
            le64(&mut b, h);
            le64(&mut b, offset);
            le32(&mut b, size);
            b.extend_from_slice(&[0u8; 20]);
            b.extend(std::iter::repeat_n(0x5au8, payload as usize));
            (16, n, b, 4096)
        }
        Step::Setattr {
            node,
            fh,
            valid,
            size,
            mode,
            uid,
        } => {
            let (_, h) = s.handle(fh, node, true);
            le32(&mut b, valid);
            le32(&mut b, 0);
            le64(&mut b, h);
            le64(&mut b, size);
            b.extend_from_slice(&[0u8; 32]); // lock_owner, atime, mtime, ctime
            b.extend_from_slice(&[0u8; 12]); // *nsec
            le32(&mut b, mode);
            le32(&mut b, 0);
            le32(&mut b, uid);
            le32(&mut b, uid);
            le32(&mut b, 0);
            (4, s.node(node), b, 4096)
        }
        Step::Fallocate {
            node,
            fh,
            mode,
            offset,
            length,
        } => {
            let (n, h) = s.handle(fh, node, true);
            le64(&mut b, h);
            le64(&mut b, offset);
            le64(&mut b, length);
            le32(&mut b, mode);
            le32(&mut b, 0);
            (43, n, b, 4096)
        }
        Step::Setxattr {
            node,
            name: n,
            value,
        } => {
            le32(&mut b, value);
            le32(&mut b, 0);
            b.extend(cstr(XATTRS[n % XATTRS.len()]));
            b.extend(std::iter::repeat_n(2u8, value as usize));
            (21, s.node(node), b, 4096)
        }
        Step::Getxattr {
            node,
            name: n,
            size,
        } => {
            le32(&mut b, size);
            le32(&mut b, 0);
            b.extend(cstr(XATTRS[n % XATTRS.len()]));
            (22, s.node(node), b, 4096)
        }
        Step::Release { node, fh, dir } => {
            let (n, h) = s.handle(fh, node, false);
            le64(&mut b, h);
            b.extend_from_slice(&[0u8; 16]);
            (if dir { 29 } else { 18 }, n, b, 4096)
        }
        Step::Forget { node, count } => {
            le64(&mut b, count);
            (2, s.node(node), b, 0)
        }
        Step::Unlink { dir, name: n } => {
            b.extend(name(n));
            (10, s.node(dir), b, 4096)
        }
        Step::Rmdir { dir, name: n } => {
            b.extend(name(n));
            (11, s.node(dir), b, 4096)
        }
        Step::Rename {
            from,
            name: n,
            to,
            new_name,
            flags,
        } => {
            le64(&mut b, s.node(to));
            if flags != 0 {
                le32(&mut b, flags);
                le32(&mut b, 0);
            }
            b.extend(name(n));
            b.extend(name(new_name));
            (if flags != 0 { 45 } else { 12 }, s.node(from), b, 4096)
        }
        Step::Readdir { node, fh, plus } => {
            let (n, h) = s.handle(fh, node, false);
            le64(&mut b, h);
            le64(&mut b, 0);
            le32(&mut b, 4096);
            b.extend_from_slice(&[0u8; 20]);
            let _ = node;
            (if plus { 44 } else { 28 }, n, b, 4096)
        }
        Step::Simple { node, opcode } => {
            let (_, h) = s.handle(0, node, false);
            match opcode {
                3 => b.extend_from_slice(&[0u8; 16]),
                20 | 25 => {
                    le64(&mut b, h);
                    b.extend_from_slice(&[0u8; 16]);
                }
                23 => {
                    le32(&mut b, 4096);
                    le32(&mut b, 0);
                }
                34 => {
                    le32(&mut b, 4);
                    le32(&mut b, 0);
                }
                46 => {
                    le64(&mut b, h);
                    le64(&mut b, 0);
                    le32(&mut b, 3);
                    le32(&mut b, 0);
                }
                _ => {}
            }
            (opcode, s.node(node), b, 4096)
        }
    }
}

fn header_as(len: u32, opcode: u32, unique: u64, nodeid: u64, uid: u32) -> Vec<u8> {
    let mut h = header(len, opcode, unique, nodeid);
    h[24..28].copy_from_slice(&uid.to_le_bytes());
    h[28..32].copy_from_slice(&uid.to_le_bytes());
    h
}

/// Runs a session; returns nothing, asserting the invariants after every request.
fn run_session(steps: &[(Step, u32)]) -> Result<(), TestCaseError> {
    // Small limits, so sessions reach them.
    const QUOTA_BYTES: u64 = 4 << 20;
    const QUOTA_INODES: u64 = 24;
    let f = fixture();
    let share = ShareSettings {
        quota: crate::quota::QuotaLimits {
            bytes: Some(QUOTA_BYTES),
            inodes: Some(QUOTA_INODES),
        },
        ..settings(f._dir.path(), "0:0:1;1000:1000:100")
    };
    let fs = VmfsFs::new(f.ds.clone(), "shares/session", share).unwrap();
    // Everyone may create in the share's root (sticky, as /tmp).
    let attr = fuse::SetattrIn {
        mode: 0o1777,
        ..Default::default()
    };
    fs.setattr(root(), ROOT, attr, None, SetattrValid::MODE)
        .unwrap();
    let h = ShareHandler::new(fs.clone());
    let m = big_mem();
    init(&h, &m);
    let mut s = Session {
        nodes: vec![ROOT],
        handles: Vec::new(),
        unique: 100,
    };
    for (st, uid) in steps {
        let (opcode, node, body, out_len) = build(&s, st);
        s.unique += 1;
        let honest = !matches!(st, Step::Write { honest: false, .. });
        let len = if honest {
            40 + body.len()
        } else {
            (40 + body.len()).min(80 + MIB as usize)
        };
        let mut req = header_as(len as u32, opcode, s.unique, node, *uid);
        req.extend_from_slice(&body);
        // Requests up to 1.5 MiB at 1 MiB; replies up to 1.5 MiB after them.
        prop_assert!(req.len() <= 0x18_0000 && out_len <= 0x18_0000);
        let (used, out) = send_at(&h, &m, &req, out_len, 0x10_0000, 0x28_0000);
        prop_assert_eq!(
            h.counters()
                .panics
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        prop_assert!(used <= out_len);
        if opcode == 2 {
            prop_assert_eq!(used, 0, "FORGET has no reply");
            continue;
        }
        if used == 0 {
            // Only a reply buffer too short for a header goes unanswered.
            prop_assert!(out_len < 16, "no reply to {:?}", st);
            continue;
        }
        prop_assert!(used >= 16);
        let len = u32::from_le_bytes(out[0..4].try_into().unwrap());
        let (err, unique) = reply_error(&out);
        prop_assert_eq!(len, used, "reply length");
        prop_assert_eq!(unique, s.unique);
        prop_assert!((-4095..=0).contains(&err), "errno {}", err);
        if err != 0 {
            prop_assert_eq!(used, 16);
            continue;
        }
        let word = |at: usize| u64::from_le_bytes(out[at..at + 8].try_into().unwrap());
        match *st {
            Step::Lookup { .. }
            | Step::Mkdir { .. }
            | Step::Mknod { .. }
            | Step::Symlink { .. }
            | Step::Link { .. } => s.nodes.push(word(16)),
            Step::Create { flags, .. } => {
                s.nodes.push(word(16));
                s.handles.push((word(16), word(16 + 128), flags & 3 != 0));
            }
            Step::Open { flags, .. } => s.handles.push((node, word(16), flags & 3 != 0)),
            Step::Opendir { .. } => s.handles.push((node, word(16), false)),
            Step::Release { .. } => {
                let fh = u64::from_le_bytes(body[0..8].try_into().unwrap());
                s.handles.retain(|&(_, h, _)| h != fh);
            }
            Step::Read { size, .. } => {
                prop_assert!(used as usize - 16 <= (size.min(MIB)) as usize);
            }
            _ => {}
        }
        let c = fs.counters();
        prop_assert_eq!(
            c.handles.load(std::sync::atomic::Ordering::Relaxed),
            s.handles.len() as u64
        );
        let (bytes, inodes) = fs.quota().used();
        // Directory growth may pass the byte limit by a block.
        prop_assert!(bytes <= QUOTA_BYTES + u64::from(MIB), "{bytes}");
        prop_assert!(inodes <= QUOTA_INODES);
        prop_assert!(crate::fs::scratch_bytes() <= crate::fs::SCRATCH_KEEP_BYTES);
    }
    // The guest goes away: its handles close, counted usage matches a fresh count, and
    // the datastore is consistent.
    h.disconnected(1);
    prop_assert_eq!(
        fs.counters()
            .handles
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    let fresh = VmfsFs::new(
        f.ds.clone(),
        "shares/session",
        ShareSettings {
            quota: fs.quota().limits(),
            ..settings(f._dir.path(), "")
        },
    )
    .unwrap();
    prop_assert_eq!(fresh.quota().used(), fs.quota().used());
    f.ds.unmount().unwrap();
    let report = vmfs::fsck::fsck(&**f.ds.device()).unwrap();
    prop_assert!(report.clean(), "fsck: {:?}", report.problems);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]
    /// A guest session: requests on one share reusing the node ids and handles earlier
    /// replies gave, as random users, with large WRITE, READ and SETXATTR sizes.
    #[test]
    fn sessions_keep_the_share_consistent(
        steps in proptest::collection::vec(
            (step(), prop_oneof![2 => Just(0u32), 1 => prop::sample::select(&UIDS[..])]),
            1..60,
        )
    ) {
        run_session(&steps)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]
    #[test]
    fn random_requests_never_panic(
        opcode in prop_oneof![1u32..=52, Just(4096u32), any::<u32>()],
        nodeid in prop_oneof![Just(1u64), 0u64..64, any::<u64>()],
        len_delta in -48i64..256,
        body in proptest::collection::vec(any::<u8>(), 0..300),
        out_len in prop_oneof![Just(0u32), 1u32..64, Just(4096u32)],
    ) {
        let f = fixture();
        let h = ShareHandler::new(f.fs.clone());
        let m = mem();
        init(&h, &m);
        let len = (40 + body.len() as i64 + len_delta).max(0) as u32;
        let mut req = header(len, opcode, 77, nodeid);
        req.extend_from_slice(&body);
        let (used, _) = send(&h, &m, &req, out_len);
        prop_assert!(used <= out_len);
        prop_assert_eq!(h.counters().panics.load(std::sync::atomic::Ordering::Relaxed), 0);
    }
}
