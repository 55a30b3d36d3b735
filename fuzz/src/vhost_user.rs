//! Target `vhost_user`: a frontend's message stream through the `vhost` crate's message layer
//! ([`BackendReqHandler`], as stratad's control thread runs it) into dataplane's
//! [`VhostDevice`] for a virtio-blk disk on a null backend, served by a real reactor.
//!
//! Input: `guest image chunk` (u16 length + bytes: the initial contents of every memory fd),
//! then messages: `request u8, fd spec u8, header flags u8, body chunk`. The fd spec attaches
//! 0–3 descriptors of one kind: a memfd of 64 KiB, of 4 KiB (shorter than any region that
//! claims more: a frontend's short memfd), of 1 MiB, or an eventfd. The header carries the
//! body's true size, so the message layer reads whole messages; everything inside is the
//! input's. After the messages every eventfd handed over is signalled (a kick) and the
//! frontend disconnects, which stops and drains every started queue.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use dataplane::backend::{BlockBackend, NullBackend};
use dataplane::blk::{serial_from, DiskGeometry};
use dataplane::engine::EngineKind;
use dataplane::reactor::{ReactorHandle, ReactorLink};
use dataplane::vhost_blk::BlkDevice;
use vhost::vhost_user::BackendReqHandler;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::input::{Enc, Input};

/// Messages per input at most.
const MESSAGES_MAX: usize = 48;
/// vhost-user protocol version in the header flags.
const VERSION: u32 = 0x1;
/// Header flag: the frontend wants an ack.
const NEED_REPLY: u32 = 0x8;
/// Disk size of the null backend.
const DISK_BYTES: u64 = 1 << 20;
/// How long a run waits for the reactor to serve a kicked queue (a queue that never started
/// would otherwise cost this on every run).
const SERVE_WAIT: Duration = Duration::from_millis(2);
/// Memfd sizes of the fd kinds (the fourth kind is an eventfd).
const MEMFD_BYTES: [u64; 3] = [64 << 10, 4 << 10, 1 << 20];

fn geometry() -> DiskGeometry {
    DiskGeometry {
        capacity_sectors: DISK_BYTES / 512,
        blk_size: 512,
        read_only: false,
        discard: true,
        num_queues: 2,
        serial: serial_from("fuzz-vhost"),
    }
}

/// One reactor for the process (a reactor is a thread; one per run would be slow).
fn reactor() -> Option<ReactorLink> {
    static LINK: OnceLock<Option<Mutex<ReactorLink>>> = OnceLock::new();
    LINK.get_or_init(|| {
        let h = ReactorHandle::spawn(0, None, EngineKind::Sync).ok()?;
        let link = h.link();
        // The reactor thread lives as long as the process.
        std::mem::forget(h);
        Some(Mutex::new(link))
    })
    .as_ref()
    .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()).clone())
}

fn memfd(size: u64, image: &[u8]) -> Option<File> {
    // SAFETY: a NUL-terminated name and flags; returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"fuzz-guest".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is a fresh descriptor we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).ok()?;
    let n = image.len().min(size as usize);
    f.write_all_at(&image[..n], 0).ok()?;
    Some(f)
}

fn eventfd() -> Option<File> {
    // SAFETY: plain syscall; returns a new fd or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    // SAFETY: fd is a fresh descriptor we own.
    (fd >= 0).then(|| unsafe { File::from_raw_fd(fd) })
}

/// Gives the reactor a moment to serve what the kicks announced: until some request has
/// completed on a queue of `dev`, at most [`SERVE_WAIT`].
fn wait_for_requests(dev: &Mutex<BlkDevice>) {
    let stats = match dev.lock() {
        Ok(d) => d.queue_stats(),
        Err(_) => return,
    };
    let done = || {
        stats.iter().any(|q| {
            q.requests.load(Ordering::Relaxed) + q.invalid_requests.load(Ordering::Relaxed) > 0
        })
    };
    let start = Instant::now();
    while !done() && start.elapsed() < SERVE_WAIT {
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// Bytes waiting on socket `fd`.
fn pending_bytes(fd: RawFd) -> libc::c_int {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer we pass.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) } < 0 {
        return 0;
    }
    n
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let image = inp.chunk();
    let Some(link) = reactor() else {
        return;
    };
    let Ok(backend) = NullBackend::new(DISK_BYTES, true) else {
        return;
    };
    let backend: Arc<dyn BlockBackend> = Arc::new(backend);
    let Ok(dev) = BlkDevice::new_blk("fuzz", geometry(), backend, vec![link]) else {
        return;
    };
    let dev = Arc::new(Mutex::new(dev));
    let Ok((frontend, backend_sock)) = UnixStream::pair() else {
        return;
    };
    let mut handler = BackendReqHandler::from_stream(backend_sock, dev.clone());
    let mut kicks: Vec<File> = Vec::new();
    let mut sent = 0usize;
    while !inp.is_empty() && sent < MESSAGES_MAX {
        let request = u32::from(inp.u8());
        let spec = inp.u8();
        let hflags = inp.u8();
        let body = inp.chunk();
        let mut files = Vec::new();
        for _ in 0..(spec & 3) {
            let kind = usize::from((spec >> 2) & 3);
            let f = match MEMFD_BYTES.get(kind) {
                Some(&size) => memfd(size, image),
                None => eventfd(),
            };
            let Some(f) = f else {
                return;
            };
            if kind == MEMFD_BYTES.len() {
                if let Ok(k) = f.try_clone() {
                    kicks.push(k);
                }
            }
            files.push(f);
        }
        let flags = VERSION | if hflags & 1 != 0 { NEED_REPLY } else { 0 };
        let mut hdr = Vec::with_capacity(12);
        hdr.extend_from_slice(&request.to_le_bytes());
        hdr.extend_from_slice(&flags.to_le_bytes());
        hdr.extend_from_slice(&(body.len() as u32).to_le_bytes());
        let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        let msg = [hdr.as_slice(), body];
        let ok = if fds.is_empty() {
            (&frontend)
                .write_all(&[hdr.as_slice(), body].concat())
                .is_ok()
        } else {
            frontend.send_with_fds(&msg[..], &fds).is_ok()
        };
        if !ok {
            break;
        }
        // Our copies close here; the backend holds its own.
        drop(files);
        sent += 1;
    }
    let _ = frontend.shutdown(std::net::Shutdown::Write);
    // One request per message (a bad one may consume less or more of the stream; the bound
    // and the end of the stream stop the loop).
    for _ in 0..sent + 1 {
        if pending_bytes(handler.as_raw_fd()) <= 0 {
            break;
        }
        let r = handler.handle_request();
        if crate::trace() {
            eprintln!("vhost_user: {r:?}");
        }
    }
    for k in &kicks {
        let _ = (&*k).write_all(&1u64.to_ne_bytes());
    }
    if !kicks.is_empty() {
        wait_for_requests(&dev);
    }
    if let Ok(mut d) = dev.lock() {
        d.disconnect();
        if crate::trace() {
            for q in d.queue_stats() {
                eprintln!("vhost_user: queue {q:?}");
            }
        }
    }
    drop(handler);
}

fn msg(e: &mut Enc, request: u8, spec: u8, body: &[u8]) {
    e.u8(request).u8(spec).u8(0).chunk(body);
}

/// QEMU's start-up sequence for one queue (features, protocol features, memory table of one
/// 64 KiB region, ring size, base, addresses, kick and call eventfds, enable), with a guest
/// image holding a ring with one read request; and variants: memory added with
/// ADD_MEM_REG, a config read, queue stop with GET_VRING_BASE.
pub fn seeds() -> Vec<Vec<u8>> {
    const UA: u64 = 0x7f00_0000_0000;
    let features = geometry().features() | 0x4000_0000;
    let u64b = |v: u64| v.to_le_bytes().to_vec();
    let state = |i: u32, n: u32| [i.to_le_bytes(), n.to_le_bytes()].concat();
    let region = |gpa: u64, size: u64, ua: u64| {
        [
            gpa.to_le_bytes(),
            size.to_le_bytes(),
            ua.to_le_bytes(),
            0u64.to_le_bytes(),
        ]
        .concat()
    };
    let mem_table = [vec![1, 0, 0, 0, 0, 0, 0, 0], region(0, 64 << 10, UA)].concat();
    let mut addr = state(0, 0);
    for v in [UA, UA + 0x2000, UA + 0x1000, 0] {
        addr.extend_from_slice(&v.to_le_bytes());
    }
    // Guest image: descriptor table at 0 (16 entries), avail at 0x1000, used at 0x2000; one
    // read of 512 bytes: header at 0x3000, data at 0x3100, status at 0x3400.
    let mut img = vec![0u8; 0x3410];
    let descs: [(u64, u32, u16, u16); 3] =
        [(0x3000, 16, 1, 1), (0x3100, 512, 3, 2), (0x3400, 1, 2, 0)];
    for (i, (a, l, f, n)) in descs.iter().enumerate() {
        let o = i * 16;
        img[o..o + 8].copy_from_slice(&a.to_le_bytes());
        img[o + 8..o + 12].copy_from_slice(&l.to_le_bytes());
        img[o + 12..o + 14].copy_from_slice(&f.to_le_bytes());
        img[o + 14..o + 16].copy_from_slice(&n.to_le_bytes());
    }
    img[0x1002] = 1; // avail idx 1, ring[0] = 0
    let start = |e: &mut Enc, mem: &[u8], add_reg: bool| {
        msg(e, 1, 0, &[]); // GET_FEATURES
        msg(e, 15, 0, &[]); // GET_PROTOCOL_FEATURES
        msg(e, 16, 0, &u64b(0x1 | 0x8 | 0x200 | 0x8000)); // MQ, REPLY_ACK, CONFIG, MEM_SLOTS
        msg(e, 17, 0, &[]); // GET_QUEUE_NUM
        msg(e, 3, 0, &[]); // SET_OWNER
        msg(e, 2, 0, &u64b(features)); // SET_FEATURES
        if add_reg {
            msg(e, 36, 0, &[]); // GET_MAX_MEM_SLOTS
            msg(e, 37, 1, &[vec![0u8; 8], mem[8..].to_vec()].concat()); // ADD_MEM_REG
        } else {
            msg(e, 5, 1, mem); // SET_MEM_TABLE, one 64 KiB memfd
        }
        msg(e, 8, 0, &state(0, 16)); // SET_VRING_NUM
        msg(e, 10, 0, &state(0, 0)); // SET_VRING_BASE
        msg(e, 9, 0, &addr); // SET_VRING_ADDR
        msg(e, 12, 1 | (3 << 2), &u64b(0)); // SET_VRING_KICK + eventfd
        msg(e, 13, 1 | (3 << 2), &u64b(0)); // SET_VRING_CALL + eventfd
        msg(e, 18, 0, &state(0, 1)); // SET_VRING_ENABLE
    };
    let mut out = Vec::new();
    let mut e = Enc::new();
    e.chunk(&img);
    start(&mut e, &mem_table, false);
    out.push(e.finish());
    let mut e = Enc::new();
    e.chunk(&img);
    start(&mut e, &mem_table, true);
    msg(&mut e, 11, 0, &state(0, 0)); // GET_VRING_BASE
    msg(
        &mut e,
        38,
        0,
        &[vec![0u8; 8], mem_table[8..].to_vec()].concat(),
    ); // REM_MEM_REG
    out.push(e.finish());
    let mut e = Enc::new();
    e.chunk(&[]);
    msg(&mut e, 1, 0, &[]);
    msg(&mut e, 15, 0, &[]);
    msg(&mut e, 16, 0, &u64b(0x200));
    let mut cfg = vec![0u8; 12 + 60];
    cfg[4..8].copy_from_slice(&60u32.to_le_bytes());
    msg(&mut e, 24, 0, &cfg); // GET_CONFIG
    msg(&mut e, 4, 0, &[]); // RESET_OWNER
    out.push(e.finish());
    out
}
