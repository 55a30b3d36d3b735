//! Target `fuse`: sequences of FUSE requests → replies through the file server's
//! [`ShareHandler`] (virtiofsd's protocol layer) on a real [`VmfsFs`] over the base datastore
//! ([`crate::datastore`]), each request in a descriptor chain over guest memory as a virtio-fs
//! queue delivers it.
//!
//! The datastore sits in a memfd behind vmfs's `FileDevice` (brought back to the base image
//! before every run), so reads and writes take the same zero-copy paths as in stratad.
//!
//! Input: `share flags u8`, then requests: `out_len u32` (top bit: up to 3.75 MiB, else up to
//! 64 KiB), `flags u8`, `request chunk` (u16 length and bytes). The header's `len` and
//! `unique` are fixed up unless flag bit 0 says to keep the input's; bit 1 splits the writable
//! buffer in two descriptors, bit 2 the request; bit 3 sizes the buffer of a READ or READDIR
//! from its `size`, as a kernel does. Node ids and file handles are deterministic (inode
//! numbers, handles from 1), so requests can name what earlier ones created. An INIT opens
//! every run.
//!
//! Oracle besides "no panic" (including panics the handler catches): a reply fits its buffer
//! and its header says its length; and no byte of `/secret` — a file outside the share — ever
//! reaches guest memory.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use dataplane::vhost_fs::{FsMemory, FsRequestHandler};
use file_server::fs::VmfsFs;
use file_server::handler::ShareHandler;
use file_server::quota::QuotaLimits;
use file_server::settings::{CachePolicy, ShareSettings};
use posix_perm::cache::{PermCache, PermCacheConfig};
use posix_perm::idmap::IdMap;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmfs::device::FileDevice;
use vmfs::fs::Datastore;

use crate::datastore::{base, SECRET, SHARE_DIR, VOLUME_BYTES};
use crate::input::{Enc, Input};

/// Guest memory: enough for a READ of 2 MiB and more (the READ limit is 1 MiB).
const MEM_BYTES: usize = 4 << 20;
/// Where requests go (the queue's rings live below).
const REQ_ADDR: u64 = 0x1_0000;
/// Where reply buffers go.
const OUT_ADDR: u64 = 0x4_0000;
/// Largest request and reply buffer.
const REQ_MAX: usize = (OUT_ADDR - REQ_ADDR) as usize;
const OUT_MAX: u32 = (MEM_BYTES as u64 - OUT_ADDR) as u32;
/// Top bit of an input's `out_len`: a buffer of up to [`OUT_MAX`] bytes; without it, up to
/// [`SMALL_OUT_MAX`] (filling and scanning megabytes per request would slow every run down).
const BIG_OUT: u32 = 1 << 31;
/// Largest reply buffer without [`BIG_OUT`].
const SMALL_OUT_MAX: u32 = 64 << 10;
/// The share's byte and inode quotas (a quarter of the datastore; a few hundred names).
const QUOTA_BYTES: u64 = 16 << 20;
const QUOTA_INODES: u64 = 256;
/// Requests per run at most.
const REQUESTS_MAX: usize = 24;
/// Fill of reply buffers before each request.
const FILL: u8 = 0xee;

/// Keep the input's header `len` and `unique`.
const KEEP_HEADER: u8 = 1;
/// Two writable descriptors.
const SPLIT_OUT: u8 = 2;
/// Two readable descriptors.
const SPLIT_REQ: u8 = 4;
/// A READ, READDIR or READDIRPLUS gets a reply buffer of exactly 16 + its `size` (what a
/// kernel sends, and what the zero-copy READ path keys on).
const MATCH_OUT: u8 = 8;

thread_local! {
    /// This thread's datastore memfd (tests replay on several threads at once).
    static MEMFD: Option<File> = {
        // SAFETY: a NUL-terminated name and flags; returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(c"fuzz-ds".as_ptr(), libc::MFD_CLOEXEC) };
        // SAFETY: fd is a fresh descriptor we own.
        (fd >= 0).then(|| unsafe { File::from_raw_fd(fd) })
    };
}

/// Bytes per page of the memfd (its hole granularity).
const PAGE: usize = 4096;

/// The base datastore in this thread's memfd, opened as vmfs opens a datastore file.
///
/// Rewriting the whole image every run would dominate the run time, so the memfd is brought
/// back to the base image by difference: pages of the image that changed are rewritten, and
/// data the last run put where the image has holes is punched out again.
fn file_disk() -> Option<Arc<FileDevice>> {
    let b = base();
    MEMFD.with(|m| {
        let f = m.as_ref()?;
        if f.metadata().ok()?.len() != VOLUME_BYTES {
            f.set_len(0).ok()?;
            f.set_len(VOLUME_BYTES).ok()?;
        }
        let mut page = [0u8; PAGE];
        for r in &b.nonzero {
            for at in (r.start..r.end).step_by(PAGE) {
                let want = &b.image[at as usize..at as usize + PAGE];
                f.read_exact_at(&mut page, at).ok()?;
                if page != *want {
                    f.write_all_at(want, at).ok()?;
                }
            }
        }
        punch_outside(f, &b.nonzero)?;
        let path = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
        FileDevice::open(&path, false).ok().map(Arc::new)
    })
}

/// Punches every data range of `f` that lies outside `keep` (sorted, disjoint).
fn punch_outside(f: &File, keep: &[std::ops::Range<u64>]) -> Option<()> {
    let fd = f.as_raw_fd();
    let mut pos: libc::off_t = 0;
    loop {
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            return Some(()); // ENXIO: no data past pos.
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return None;
        }
        let (start, e) = (data as u64, hole as u64);
        let mut s = start;
        for k in keep.iter().filter(|k| k.end > start && k.start < e) {
            if k.start > s {
                punch(fd, s, k.start - s)?;
            }
            s = s.max(k.end);
        }
        if s < e {
            punch(fd, s, e - s)?;
        }
        pos = hole;
    }
}

fn punch(fd: RawFd, offset: u64, len: u64) -> Option<()> {
    // SAFETY: fallocate on a descriptor we own; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    (r == 0).then_some(())
}

fn settings(readonly: bool) -> Option<ShareSettings> {
    Some(ShareSettings {
        uid_map: IdMap::parse("").ok()?,
        gid_map: IdMap::parse("").ok()?,
        readonly,
        groups: None,
        cache: CachePolicy::Auto,
        // A small cache: cheap to set up per run, and eviction gets exercised.
        perm: PermCache::new(PermCacheConfig {
            capacity: 1024,
            ..PermCacheConfig::default()
        })
        .ok()?,
        // Limits well inside the 64 MiB datastore, so EDQUOT paths are reachable.
        quota: QuotaLimits {
            bytes: Some(QUOTA_BYTES),
            inodes: Some(QUOTA_INODES),
        },
    })
}

/// With [`MATCH_OUT`], the reply buffer a read-like request's `size` asks for.
fn match_out(req: &[u8], flags: u8) -> Option<u32> {
    const READ: u32 = 15;
    const READDIR: u32 = 28;
    const READDIRPLUS: u32 = 44;
    if flags & MATCH_OUT == 0 {
        return None;
    }
    let word = |at: usize| {
        req.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    // fuse_in_header is 40 bytes; `size` is at 16 in fuse_read_in.
    match word(4)? {
        READ | READDIR | READDIRPLUS => Some(word(56)?.saturating_add(16).min(OUT_MAX)),
        _ => None,
    }
}

/// `OUT_MAX` bytes of [`FILL`].
fn fill_bytes() -> &'static [u8] {
    static FILL_BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    FILL_BYTES.get_or_init(|| vec![FILL; OUT_MAX as usize])
}

/// Sends one request; returns the used length.
fn send(h: &ShareHandler, m: &FsMemory, req: &[u8], out_len: u32, flags: u8) -> u32 {
    let vq = MockSplitQueue::new(m, 16);
    let mut descs: Vec<(u64, u32, bool)> = Vec::new();
    if !req.is_empty() {
        let n = req.len() as u32;
        if flags & SPLIT_REQ != 0 && n > 1 {
            descs.push((REQ_ADDR, n / 2, false));
            descs.push((REQ_ADDR + u64::from(n / 2), n - n / 2, false));
        } else {
            descs.push((REQ_ADDR, n, false));
        }
    }
    if out_len > 0 {
        if flags & SPLIT_OUT != 0 && out_len > 1 {
            descs.push((OUT_ADDR, out_len / 2, true));
            descs.push((
                OUT_ADDR + u64::from(out_len / 2),
                out_len - out_len / 2,
                true,
            ));
        } else {
            descs.push((OUT_ADDR, out_len, true));
        }
    }
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, w))| {
            let mut f = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < descs.len() {
                f |= VRING_DESC_F_NEXT as u16;
            }
            RawDescriptor::from(Descriptor::new(addr, len, f, (i + 1) as u16))
        })
        .collect();
    if raw.is_empty() || vq.add_desc_chains(&raw, 0).is_err() {
        return 0;
    }
    if m.write_slice(req, GuestAddress(REQ_ADDR)).is_err() {
        return 0;
    }
    let Ok(mut q) = vq.create_queue::<Queue>() else {
        return 0;
    };
    let Some(chain) = q.pop_descriptor_chain(m) else {
        return 0;
    };
    h.handle(1, m, chain)
}

fn check_reply(m: &FsMemory, out_len: u32, used: u32, out: &mut Vec<u8>) {
    assert!(
        used <= out_len,
        "reply of {used} bytes in a {out_len}-byte buffer"
    );
    out.resize(out_len as usize, 0);
    if m.read_slice(out, GuestAddress(OUT_ADDR)).is_err() {
        return;
    }
    if used >= 16 {
        let len = u32::from_le_bytes([out[0], out[1], out[2], out[3]]);
        assert_eq!(
            len, used,
            "reply header length differs from the bytes written"
        );
    }
    // The marker's first byte never occurs in the fill, so this is a quick scan.
    for (i, _) in out.iter().enumerate().filter(|(_, &b)| b == SECRET[0]) {
        assert!(
            out.get(i..i + SECRET.len()) != Some(&SECRET[..]),
            "bytes of a file outside the share reached the guest (at reply offset {i}, \
             {used} bytes used of {out_len})"
        );
    }
}

fn header(len: u32, opcode: u32, unique: u64, nodeid: u64, uid: u32, gid: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(40);
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&opcode.to_le_bytes());
    h.extend_from_slice(&unique.to_le_bytes());
    h.extend_from_slice(&nodeid.to_le_bytes());
    h.extend_from_slice(&uid.to_le_bytes());
    h.extend_from_slice(&gid.to_le_bytes());
    h.extend_from_slice(&1u32.to_le_bytes()); // pid
    h.extend_from_slice(&0u32.to_le_bytes()); // total_extlen, padding
    h
}

/// FUSE opcodes the seeds use.
mod op {
    pub const LOOKUP: u32 = 1;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIRPLUS: u32 = 44;
    pub const CREATE: u32 = 35;
    pub const FALLOCATE: u32 = 43;
    pub const LSEEK: u32 = 46;
}

fn init_request() -> Vec<u8> {
    let mut req = header(40 + 64, op::INIT, 1, 0, 0, 0);
    let mut body = vec![0u8; 64];
    body[0..4].copy_from_slice(&7u32.to_le_bytes());
    body[4..8].copy_from_slice(&38u32.to_le_bytes());
    body[8..12].copy_from_slice(&(128u32 << 10).to_le_bytes());
    // Every flag the kernel might offer: the server picks what it supports.
    body[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    req.extend_from_slice(&body);
    req
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let share_flags = inp.u8();
    let Some(dev) = file_disk() else {
        return;
    };
    let Ok(ds) = Datastore::mount(dev) else {
        return;
    };
    let ds = Arc::new(ds);
    ds.set_deferred_commit(share_flags & 2 != 0);
    let Some(settings) = settings(share_flags & 1 != 0) else {
        return;
    };
    let Ok(fs) = VmfsFs::new(ds, SHARE_DIR, settings) else {
        return;
    };
    let h = ShareHandler::new(fs);
    let Ok(m) = FsMemory::from_ranges(&[(GuestAddress(0), MEM_BYTES)]) else {
        return;
    };
    let mut out = Vec::new();
    let init = init_request();
    let used = send(&h, &m, &init, 4096, 0);
    check_reply(&m, 4096, used, &mut out);
    let mut n = 0;
    while !inp.is_empty() && n < REQUESTS_MAX {
        n += 1;
        let raw = inp.u32();
        let out_len = if raw & BIG_OUT != 0 {
            (raw & !BIG_OUT) % (OUT_MAX + 1)
        } else {
            raw % (SMALL_OUT_MAX + 1)
        };
        let flags = inp.u8();
        let mut req = inp.chunk().to_vec();
        req.truncate(REQ_MAX);
        let out_len = match_out(&req, flags).unwrap_or(out_len);
        if flags & KEEP_HEADER == 0 && req.len() >= 16 {
            let len = req.len() as u32;
            req[0..4].copy_from_slice(&len.to_le_bytes());
            req[8..16].copy_from_slice(&(n as u64 + 1).to_le_bytes());
        }
        if m.write_slice(&fill_bytes()[..out_len as usize], GuestAddress(OUT_ADDR))
            .is_err()
        {
            continue;
        }
        let used = send(&h, &m, &req, out_len, flags);
        check_reply(&m, out_len, used, &mut out);
        if crate::trace() {
            let op = req
                .get(4..8)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            let err = out
                .get(4..8)
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            eprintln!("fuse: opcode {op:?} used {used} error {err:?}");
        }
    }
    h.disconnected(1);
    assert_eq!(
        h.counters().panics.load(Ordering::Relaxed),
        0,
        "the FUSE server panicked (caught by the handler)"
    );
}

/// One request of a seed: (out_len, flags, bytes).
type Req = (u32, u8, Vec<u8>);

fn req(opcode: u32, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut r = header(0, opcode, 0, nodeid, 0, 0);
    r.extend_from_slice(body);
    r
}

fn name(n: &str) -> Vec<u8> {
    let mut v = n.as_bytes().to_vec();
    v.push(0);
    v
}

fn read_in(fh: u64, offset: u64, size: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(40);
    b.extend_from_slice(&fh.to_le_bytes());
    b.extend_from_slice(&offset.to_le_bytes());
    b.extend_from_slice(&size.to_le_bytes());
    b.extend_from_slice(&[0u8; 20]);
    b
}

fn encode(share_flags: u8, reqs: &[Req]) -> Vec<u8> {
    let mut e = Enc::new();
    e.u8(share_flags);
    for (out_len, flags, bytes) in reqs {
        let raw = if *out_len > SMALL_OUT_MAX {
            out_len | BIG_OUT
        } else {
            *out_len
        };
        e.u32(raw).u8(*flags).chunk(bytes);
    }
    e.finish()
}

/// Sessions of valid requests: file I/O (including a READ of `big`'s second MiB into a buffer
/// of exactly its size: the secret's block follows on the device), directories, creation and removal, xattrs, fallocate and lseek.
pub fn seeds() -> Vec<Vec<u8>> {
    // Inode numbers of the base datastore (node ids are inode numbers).
    let ino = |path: &str| -> u64 {
        let dev = base().disk();
        let Ok(ds) = Datastore::mount(dev) else {
            return 0;
        };
        let mut at = vmfs::format::ROOT_INO;
        for c in format!("{SHARE_DIR}/{path}")
            .split('/')
            .filter(|c| *c != ".")
        {
            at = ds.lookup_at(at, c.as_bytes()).map(|i| i.ino).unwrap_or(0);
        }
        at
    };
    let (small, big, d, link) = (ino("small"), ino("big"), ino("d"), ino("link"));
    // The inode the next file created gets (allocation is deterministic).
    let next = {
        let dev = base().disk();
        Datastore::mount(dev)
            .and_then(|ds| ds.make_node(ino("."), b"x", 0o100644, 0, 0, 0))
            .map(|i| i.ino)
            .unwrap_or(0)
    };
    let root = 1u64;
    let open = 0u32
        .to_le_bytes()
        .iter()
        .chain(&[0u8; 4])
        .copied()
        .collect::<Vec<_>>();
    let rdwr = 2u32
        .to_le_bytes()
        .iter()
        .chain(&[0u8; 4])
        .copied()
        .collect::<Vec<_>>();
    let release = [1u64.to_le_bytes().to_vec(), vec![0u8; 16]].concat();
    let mut write_in = read_in(1, 0, 8192);
    write_in.extend_from_slice(&[0x61; 8192]);
    let mut create = Vec::new();
    for v in [2u32, 0o100644, 0o022, 0] {
        create.extend_from_slice(&v.to_le_bytes());
    }
    create.extend_from_slice(&name("newf"));
    let mut mkdir = Vec::new();
    mkdir.extend_from_slice(&0o755u32.to_le_bytes());
    mkdir.extend_from_slice(&0o022u32.to_le_bytes());
    mkdir.extend_from_slice(&name("nd"));
    let mut rename = root.to_le_bytes().to_vec();
    rename.extend_from_slice(&name("nd"));
    rename.extend_from_slice(&name("nd2"));
    let mut setattr = vec![0u8; 88];
    setattr[0..4].copy_from_slice(&(1u32 << 3).to_le_bytes()); // FATTR_SIZE
    setattr[16..24].copy_from_slice(&100u64.to_le_bytes());
    let mut getxattr = 256u32.to_le_bytes().to_vec();
    getxattr.extend_from_slice(&[0u8; 4]);
    getxattr.extend_from_slice(&name("user.note"));
    let mut fallocate = 1u64.to_le_bytes().to_vec();
    fallocate.extend_from_slice(&0u64.to_le_bytes());
    fallocate.extend_from_slice(&(3u64 << 20).to_le_bytes());
    fallocate.extend_from_slice(&[0u8; 8]);
    let mut lseek = 1u64.to_le_bytes().to_vec();
    lseek.extend_from_slice(&4096u64.to_le_bytes());
    lseek.extend_from_slice(&3u32.to_le_bytes()); // SEEK_DATA
    lseek.extend_from_slice(&[0u8; 4]);
    let k = 4096u32;
    vec![
        encode(
            0,
            &[
                (k, 0, req(op::LOOKUP, root, &name("small"))),
                (k, 0, req(op::GETATTR, small, &[0u8; 16])),
                (k, 0, req(op::OPEN, small, &open)),
                (k, SPLIT_OUT, req(op::READ, small, &read_in(1, 0, 4096))),
                (k, 0, req(op::RELEASE, small, &release)),
            ],
        ),
        encode(
            0,
            &[
                (k, 0, req(op::LOOKUP, root, &name("d"))),
                (k, 0, req(op::OPENDIR, d, &open)),
                (8192, 0, req(op::READDIRPLUS, d, &read_in(1, 0, 8192))),
                (k, 0, req(op::LOOKUP, root, &name("link"))),
                (k, 0, req(op::READLINK, link, &[])),
            ],
        ),
        encode(
            0,
            &[
                (k, 0, req(op::CREATE, root, &create)),
                (k, SPLIT_REQ, req(op::WRITE, next, &write_in)),
                (k, 0, req(op::SETATTR, next, &setattr)),
                (k, 0, req(op::FALLOCATE, next, &fallocate)),
                (k, 0, req(op::LSEEK, next, &lseek)),
                (k, 0, req(op::UNLINK, root, &name("newf"))),
            ],
        ),
        encode(
            0,
            &[
                (k, 0, req(op::MKDIR, root, &mkdir)),
                (k, 0, req(op::RENAME, root, &rename)),
                (k, 0, req(op::RMDIR, root, &name("nd2"))),
                (k, 0, req(op::STATFS, root, &[])),
                (k, 0, req(op::LOOKUP, root, &name("small"))),
                (k, 0, req(op::GETXATTR, small, &getxattr)),
                (k, 0, req(op::LISTXATTR, small, &getxattr[..8])),
            ],
        ),
        encode(
            0,
            &[
                (k, 0, req(op::LOOKUP, root, &name("big"))),
                (k, 0, req(op::OPEN, big, &rdwr)),
                (
                    16 + (1 << 20),
                    MATCH_OUT,
                    req(op::READ, big, &read_in(1, 1 << 20, 1 << 20)),
                ),
            ],
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs that write, create and remove leave nothing behind for the next run.
    #[test]
    fn memfd_is_back_to_the_base_image_before_each_run() {
        for s in seeds() {
            run(&s);
        }
        let dev = file_disk().expect("datastore memfd");
        drop(dev);
        let mut img = vec![0u8; VOLUME_BYTES as usize];
        MEMFD.with(|m| {
            m.as_ref()
                .expect("memfd")
                .read_exact_at(&mut img, 0)
                .expect("reading the memfd")
        });
        assert!(
            img == *base().image,
            "the memfd differs from the base image"
        );
    }
}
