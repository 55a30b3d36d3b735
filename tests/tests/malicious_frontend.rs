//! A hostile vhost-user frontend against one disk of a stratad while a libblkio client keeps
//! doing I/O on another disk of the same daemon (issue 12): the hostile frontend sends a memory
//! region larger than its memfd, runs a queue of garbage descriptor chains (including a
//! 65 535-entry indirect table) while replacing the memory table over and over, truncates its
//! memory file under the running queue, floods kicks, and stalls in the middle of a message.
//! The other disk must be served throughout (every request completes, data intact, no long
//! stall), and stratad must stay up, accept the hostile frontend again, and exit cleanly.
//!
//! The hostile side writes raw vhost-user messages (a library frontend cannot stop mid-message).

use std::io::{Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};
use tests::daemon::Stratad;

/// vhost-user requests used here (vhost-user spec numbering).
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
/// Header flags: protocol version 1.
const VERSION_1: u32 = 1;
/// VHOST_USER_F_PROTOCOL_FEATURES: left out, so rings run as soon as they are set up.
const PROTOCOL_FEATURES: u64 = 1 << 30;
/// The hostile guest's memory and where its frontend claims to have mapped it.
const EVIL_MEM: usize = 1 << 20;
const EVIL_VMM: u64 = 0x7f00_0000_0000;
/// Ring layout in the hostile guest's memory.
const QSIZE: u16 = 64;
const DESC_AT: u64 = 0;
const AVAIL_AT: u64 = 0x1000;
const USED_AT: u64 = 0x2000;
/// How long the hostile frontend stalls mid-message: past stratad's 5 s message time-out.
const STALL: Duration = Duration::from_secs(7);
/// Longest a request of the good client may take while the other frontend misbehaves.
const GOOD_LATENCY_MAX: Duration = Duration::from_secs(2);
/// Good disk size and request size.
const GOOD_SIZE: u64 = 16 << 20;
const IO: usize = 64 << 10;

fn memfd(len: usize) -> OwnedFd {
    // SAFETY: memfd_create with a static name; a non-negative result is a new fd we own.
    let fd = unsafe { libc::memfd_create(c"evil".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: fd is ours alone.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on our own fd.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), len as i64) }, 0);
    fd
}

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd has no memory effects; a non-negative result is a new fd we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd");
    // SAFETY: fd is ours alone.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn kick(fd: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a local buffer to our eventfd.
    unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8) };
}

/// A shared mapping of a memfd (the hostile guest's view of its memory).
struct Mapping(*mut u8);

impl Mapping {
    fn new(fd: &OwnedFd) -> Mapping {
        // SAFETY: a new shared mapping of EVIL_MEM bytes of our memfd, unmapped on drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                EVIL_MEM,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Mapping(p.cast())
    }

    fn write(&self, at: u64, bytes: &[u8]) {
        assert!(at as usize + bytes.len() <= EVIL_MEM);
        // SAFETY: inside our mapping; the file is EVIL_MEM long while we write.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.0.add(at as usize), bytes.len())
        };
    }

    /// Garbage descriptors (a fixed pseudo-random pattern), one of them an indirect table of
    /// 65 535 entries, and `QSIZE` avail entries pointing at them.
    fn fill_garbage(&self, seed: u64) {
        let mut x = seed | 1;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..u64::from(QSIZE) {
            let r = next();
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&(r % (EVIL_MEM as u64 + 0x1000)).to_le_bytes());
            d[8..12].copy_from_slice(&((r >> 20) as u32 % 0x3000).to_le_bytes());
            d[12..14].copy_from_slice(&((r >> 40) as u16 % 8).to_le_bytes());
            d[14..16].copy_from_slice(&((r >> 48) as u16 % (QSIZE + 2)).to_le_bytes());
            if i == 3 {
                // INDIRECT, 65 535 entries at 0x10000 (garbage in memory, chained by NEXT).
                d[..8].copy_from_slice(&0x10000u64.to_le_bytes());
                d[8..12].copy_from_slice(&(65_535u32 * 16).to_le_bytes());
                d[12..14].copy_from_slice(&4u16.to_le_bytes());
            }
            self.write(DESC_AT + 16 * i, &d);
            let head = (next() % u64::from(QSIZE)) as u16;
            self.write(AVAIL_AT + 4 + 2 * i, &head.to_le_bytes());
        }
        // The indirect table: all NEXT to the following entry, so it is 65 535 long.
        for i in 0..4096u64 {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&0x8000u64.to_le_bytes());
            d[8..12].copy_from_slice(&512u32.to_le_bytes());
            d[12..14].copy_from_slice(&1u16.to_le_bytes());
            d[14..16].copy_from_slice(&((i + 1) as u16).to_le_bytes());
            if 0x10000 + 16 * i + 16 <= EVIL_MEM as u64 {
                self.write(0x10000 + 16 * i, &d);
            }
        }
    }

    fn set_avail_idx(&self, idx: u16) {
        self.write(AVAIL_AT + 2, &idx.to_le_bytes());
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our mapping of EVIL_MEM bytes.
        unsafe { libc::munmap(self.0.cast(), EVIL_MEM) };
    }
}

/// A frontend speaking raw vhost-user.
struct Evil {
    s: UnixStream,
}

impl Evil {
    fn connect(sock: &Path) -> Evil {
        let s = UnixStream::connect(sock).expect("connect the hostile frontend");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        Evil { s }
    }

    /// Sends one message (header + payload) with `fds` attached.
    fn send(&self, req: u32, payload: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
        let mut msg = Vec::with_capacity(12 + payload.len());
        msg.extend_from_slice(&req.to_le_bytes());
        msg.extend_from_slice(&VERSION_1.to_le_bytes());
        msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        msg.extend_from_slice(payload);
        self.send_raw(&msg, fds)
    }

    fn send_raw(&self, bytes: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        let fd_bytes = std::mem::size_of_val(fds) as u32;
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
        let mut cbuf = vec![0u64; space.div_ceil(8)];
        // SAFETY: msghdr is plain data; zero is valid.
        let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        if !fds.is_empty() {
            mh.msg_control = cbuf.as_mut_ptr().cast();
            mh.msg_controllen = space as _;
            // SAFETY: msg_control points at `space` bytes, enough for one cmsg with the fds.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&mh);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(c),
                    fd_bytes as usize,
                );
            }
        }
        // SAFETY: mh describes live local buffers.
        let n = unsafe { libc::sendmsg(self.s.as_raw_fd(), &mh, libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        assert_eq!(n as usize, bytes.len(), "short sendmsg");
        Ok(())
    }

    fn get_features(&mut self) -> u64 {
        self.send(GET_FEATURES, &[], &[]).expect("send");
        let mut reply = [0u8; 20];
        self.s.read_exact(&mut reply).expect("GET_FEATURES reply");
        u64::from_le_bytes(reply[12..20].try_into().expect("8 bytes"))
    }

    fn set_mem_table(&self, size: u64, fd: &OwnedFd) -> std::io::Result<()> {
        let mut p = Vec::new();
        p.extend_from_slice(&1u32.to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        for v in [0u64, size, EVIL_VMM, 0] {
            p.extend_from_slice(&v.to_le_bytes());
        }
        self.send(SET_MEM_TABLE, &p, &[fd.as_raw_fd()])
    }

    fn vring_state(&self, req: u32, index: u32, num: u32) -> std::io::Result<()> {
        let mut p = index.to_le_bytes().to_vec();
        p.extend_from_slice(&num.to_le_bytes());
        self.send(req, &p, &[])
    }

    fn vring_fd(&self, req: u32, fd: &OwnedFd) -> std::io::Result<()> {
        self.send(req, &0u64.to_le_bytes(), &[fd.as_raw_fd()])
    }

    fn set_vring_addr(&self) -> std::io::Result<()> {
        let mut p = Vec::new();
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        for v in [
            EVIL_VMM + DESC_AT,
            EVIL_VMM + USED_AT,
            EVIL_VMM + AVAIL_AT,
            0,
        ] {
            p.extend_from_slice(&v.to_le_bytes());
        }
        self.send(SET_VRING_ADDR, &p, &[])
    }
}

/// The well-behaved client: writes and reads back 64 KiB blocks until told to stop; returns
/// (requests done, slowest request).
fn good_client(sock: PathBuf, stop: Arc<AtomicBool>) -> (u64, Duration) {
    let mut bio = Blkio::new("virtio-blk-vhost-user").expect("blkio");
    bio.set_str("path", sock.to_str().expect("utf-8"))
        .expect("path");
    bio.connect().expect("connect the good client");
    bio.set_i32("num-queues", 1).expect("queues");
    let mut started = bio.start().expect("start");
    let region = bio.alloc_mem_region(2 * IO).expect("region");
    bio.map_mem_region(&region).expect("map");
    let q = &mut started.queues[0];
    let buf = region.addr as *mut u8;
    let (mut done, mut slowest) = (0u64, Duration::ZERO);
    let wait = |q: &mut blkio::Blkioq| {
        let mut c = [MaybeUninit::<Completion>::uninit()];
        let mut t = Duration::from_secs(10);
        let n = q.do_io(&mut c, 1, Some(&mut t), None).expect("do_io");
        assert_eq!(n, 1, "the good disk stopped answering");
        // SAFETY: do_io filled the first n = 1 completions.
        let ret = unsafe { c[0].assume_init_ref() }.ret;
        assert_eq!(ret, 0, "good disk I/O failed");
    };
    while !stop.load(Ordering::Relaxed) {
        let off = (done * IO as u64) % GOOD_SIZE;
        let fill = (done % 251) as u8;
        let t0 = Instant::now();
        // SAFETY: the region holds 2 * IO bytes mapped by libblkio; no request is in flight.
        unsafe { std::ptr::write_bytes(buf, fill, IO) };
        q.write(off, buf, IO, 0, ReqFlags::empty());
        wait(q);
        // SAFETY: the second half of the region.
        let back = unsafe { buf.add(IO) };
        q.read(off, back, IO, 0, ReqFlags::empty());
        wait(q);
        // SAFETY: IO bytes of the region, read completed.
        let got = unsafe { std::slice::from_raw_parts(back, IO) };
        assert!(
            got.iter().all(|&b| b == fill),
            "good disk returned wrong data"
        );
        slowest = slowest.max(t0.elapsed());
        done += 1;
    }
    (done, slowest)
}

#[test]
fn hostile_frontend_cannot_disturb_another_disk() {
    let dir = std::env::temp_dir().join(format!("strata-evil-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let img = dir.join("good.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(GOOD_SIZE))
        .expect("image");
    let good = dir.join("good.sock");
    let evil_sock = dir.join("evil.sock");
    let args: Vec<String> = vec![
        "--disk".into(),
        format!(
            "socket={},backend=raw,path={}",
            good.display(),
            img.display()
        ),
        "--disk".into(),
        format!("socket={},backend=null,size=64M", evil_sock.display()),
    ];
    let daemon = Stratad::spawn(&args, &[&good, &evil_sock]).expect("stratad");
    let pid = daemon.pid();

    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (good, stop) = (good.clone(), stop.clone());
        std::thread::spawn(move || good_client(good, stop))
    };

    let mut evil = Evil::connect(&evil_sock);
    let features = evil.get_features();
    evil.send(SET_OWNER, &[], &[]).expect("owner");
    evil.send(
        SET_FEATURES,
        &(features & !PROTOCOL_FEATURES).to_le_bytes(),
        &[],
    )
    .expect("features");
    // 1. A region larger than its memfd (SIGBUS on first access before the fix).
    let short = memfd(EVIL_MEM / 16);
    evil.set_mem_table(EVIL_MEM as u64, &short)
        .expect("short table");
    // 2. A real table and a running queue of garbage.
    let mut fd = memfd(EVIL_MEM);
    let mut mem = Mapping::new(&fd);
    mem.fill_garbage(1);
    evil.set_mem_table(EVIL_MEM as u64, &fd).expect("table");
    evil.vring_state(SET_VRING_NUM, 0, u32::from(QSIZE))
        .expect("num");
    evil.vring_state(SET_VRING_BASE, 0, 0).expect("base");
    evil.set_vring_addr().expect("addr");
    let call = eventfd();
    let kickfd = eventfd();
    evil.vring_fd(SET_VRING_CALL, &call).expect("call");
    evil.vring_fd(SET_VRING_KICK, &kickfd).expect("kick");
    // 3. Garbage chains and kick floods, with the memory table replaced under the running
    // queue every few rounds.
    let mut idx = 0u16;
    for round in 0..200u64 {
        idx = idx.wrapping_add(QSIZE);
        mem.set_avail_idx(idx);
        for _ in 0..50 {
            kick(&kickfd);
        }
        if round % 10 == 9 {
            let next = memfd(EVIL_MEM);
            let m = Mapping::new(&next);
            m.fill_garbage(round);
            m.set_avail_idx(idx);
            evil.set_mem_table(EVIL_MEM as u64, &next)
                .expect("replace table");
            (fd, mem) = (next, m);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // 4. The memory file truncated under the running queue, then more kicks.
    drop(mem);
    // SAFETY: ftruncate on our own memfd.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 0) }, 0);
    for _ in 0..1000 {
        kick(&kickfd);
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(!tests::e2e::exited(pid), "stratad died (SIGBUS?)");
    // 5. A message cut off in the middle, then silence past the daemon's time-out.
    let mut partial = SET_VRING_NUM.to_le_bytes().to_vec();
    partial.extend_from_slice(&VERSION_1.to_le_bytes());
    partial.extend_from_slice(&8u32.to_le_bytes());
    partial.extend_from_slice(&0u32.to_le_bytes());
    evil.send_raw(&partial, &[]).expect("partial message");
    std::thread::sleep(STALL);
    // The daemon gave up on the stalled frontend: its connection is closed.
    let mut b = [0u8; 1];
    assert!(
        matches!(evil.s.read(&mut b), Ok(0) | Err(_)),
        "stalled connection still open"
    );
    let _ = evil.s.write_all(&[0u8; 4]);
    for _ in 0..1000 {
        kick(&kickfd);
    }
    // 6. The hostile disk's socket still serves a new connection.
    let mut again = Evil::connect(&evil_sock);
    assert_eq!(again.get_features(), features);
    drop(again);

    stop.store(true, Ordering::Relaxed);
    let (done, slowest) = client.join().expect("good client");
    assert!(done > 100, "the good disk served only {done} request pairs");
    assert!(
        slowest < GOOD_LATENCY_MAX,
        "a good request took {slowest:?} while the other frontend misbehaved"
    );
    assert!(!tests::e2e::exited(pid), "stratad died");
    let status = daemon.stop().expect("stop");
    assert!(status.success(), "stratad exited with {status}");
    let _ = std::fs::remove_dir_all(&dir);
}
