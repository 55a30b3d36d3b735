//! Socket operations (recv, sendmsg) on every engine, over a Unix socketpair.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::fault::{FaultEngine, FaultPlan};
use super::sync::SyncEngine;
use super::uring::UringEngine;
use super::{Completion, IoEngine, IoOp};

/// Waits (bounded) for one completion.
fn reap_one(e: &mut dyn IoEngine) -> Completion {
    let mut out = [Completion::default(); 1];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        e.submit().expect("submit");
        if e.reap(&mut out) == 1 {
            return out[0];
        }
        assert!(Instant::now() < deadline, "no completion");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The completion of operation `user_data` with `result`.
fn done(user_data: u64, result: i32) -> Completion {
    Completion { user_data, result }
}

/// Pushes a sendmsg of `msg` on `fd`.
///
/// # Safety
/// `msg`, its gather list and the bytes it names must stay valid until the completion is
/// reaped.
unsafe fn push_send(e: &mut dyn IoEngine, fd: RawFd, msg: &libc::msghdr, user_data: u64) {
    // SAFETY: the caller keeps msg and what it points to valid until the completion is reaped.
    unsafe { e.push(IoOp::Send { fd, msg }, user_data) }.expect("push send");
}

/// Pushes a receive into all of `buf` on `fd`.
///
/// # Safety
/// `buf` must stay valid and unmoved until the completion is reaped.
unsafe fn push_recv(e: &mut dyn IoEngine, fd: RawFd, buf: &mut [u8], user_data: u64) {
    let op = IoOp::Recv {
        fd,
        buf: buf.as_mut_ptr(),
        len: buf.len() as u32,
    };
    // SAFETY: the caller keeps buf valid until the completion is reaped.
    unsafe { e.push(op, user_data) }.expect("push recv");
}

fn msghdr(iov: &[libc::iovec]) -> libc::msghdr {
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
    m.msg_iov = iov.as_ptr().cast_mut();
    m.msg_iovlen = iov.len();
    m
}

/// Sends two slices in one sendmsg, receives them back, sees EOF, then a send to a closed
/// peer fails with -EPIPE (no SIGPIPE).
fn round_trip(e: &mut dyn IoEngine) {
    let (a, mut b) = UnixStream::pair().expect("socketpair");
    let head = *b"header--";
    let body = [7u8; 100];
    let iov = [
        libc::iovec {
            iov_base: head.as_ptr() as *mut _,
            iov_len: head.len(),
        },
        libc::iovec {
            iov_base: body.as_ptr() as *mut _,
            iov_len: body.len(),
        },
    ];
    let m = msghdr(&iov);
    // SAFETY: m, iov, head and body live until the completion is reaped below.
    unsafe { push_send(e, a.as_raw_fd(), &m, 1) };
    let c = reap_one(e);
    assert_eq!(c, done(1, 108));
    let mut got = [0u8; 108];
    b.read_exact(&mut got).expect("read");
    assert_eq!(&got[..8], b"header--");
    assert!(got[8..].iter().all(|&x| x == 7));

    b.write_all(b"ping").expect("write");
    let mut buf = [0u8; 64];
    // SAFETY: buf lives until the completion is reaped below.
    unsafe { push_recv(e, a.as_raw_fd(), &mut buf, 2) };
    let c = reap_one(e);
    assert_eq!(c, done(2, 4));
    assert_eq!(&buf[..4], b"ping");

    drop(b);
    // SAFETY: as above.
    unsafe { push_recv(e, a.as_raw_fd(), &mut buf, 3) };
    assert_eq!(reap_one(e), done(3, 0), "EOF");
    // SAFETY: as above.
    unsafe { push_send(e, a.as_raw_fd(), &m, 4) };
    assert_eq!(reap_one(e).result, -libc::EPIPE);
}

#[test]
fn uring_socket_ops() {
    let Ok(mut e) = UringEngine::new() else {
        eprintln!("io_uring unavailable; skipped");
        return;
    };
    round_trip(&mut e);
}

#[test]
fn sync_socket_ops() {
    round_trip(&mut SyncEngine::new());
}

#[test]
fn sync_recv_without_data_is_eagain() {
    let (a, _b) = UnixStream::pair().expect("socketpair");
    let mut e = SyncEngine::new();
    let mut buf = [0u8; 8];
    // SAFETY: buf outlives the synchronous operation.
    unsafe { push_recv(&mut e, a.as_raw_fd(), &mut buf, 9) };
    assert_eq!(reap_one(&mut e).result, -libc::EAGAIN);
}

#[test]
fn uring_recv_waits_for_data() {
    let Ok(mut e) = UringEngine::new() else {
        eprintln!("io_uring unavailable; skipped");
        return;
    };
    let (a, mut b) = UnixStream::pair().expect("socketpair");
    let mut buf = [0u8; 8];
    // SAFETY: buf lives until the completion is reaped below.
    unsafe { push_recv(&mut e, a.as_raw_fd(), &mut buf, 5) };
    e.submit().expect("submit");
    std::thread::sleep(Duration::from_millis(20));
    let mut out = [Completion::default(); 1];
    assert_eq!(e.reap(&mut out), 0, "nothing to receive yet");
    assert_eq!(e.in_flight(), 1);
    b.write_all(b"late").expect("write");
    assert_eq!(reap_one(&mut e), done(5, 4));
    // shutdown(2) completes an in-flight receive (how a connection poller stops).
    // SAFETY: as above.
    unsafe { push_recv(&mut e, a.as_raw_fd(), &mut buf, 6) };
    e.submit().expect("submit");
    a.shutdown(std::net::Shutdown::Both).expect("shutdown");
    assert_eq!(reap_one(&mut e), done(6, 0));
}

#[test]
fn fault_engine_fails_socket_ops() {
    let (a, _b) = UnixStream::pair().expect("socketpair");
    let mut e = FaultEngine::new(FaultPlan::Sockets, libc::ECONNRESET);
    let mut buf = [0u8; 8];
    // SAFETY: buf outlives the operation (failed at push time).
    unsafe { push_recv(&mut e, a.as_raw_fd(), &mut buf, 7) };
    assert_eq!(reap_one(&mut e).result, -libc::ECONNRESET);
    assert_eq!(e.injected, 1);
}
