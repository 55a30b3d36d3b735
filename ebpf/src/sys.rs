//! The bpf(2) commands aya 0.13 does not expose, and interface lookup.

use std::ffi::CString;
use std::os::fd::RawFd;

use crate::SteerError;

/// `BPF_MAP_DELETE_ELEM` and `BPF_PROG_TEST_RUN` from `enum bpf_cmd` (uapi/linux/bpf.h).
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
/// The kernel refuses XDP test frames larger than a page minus headroom and tailroom; frames
/// are bounded well below that so the call never fails on size.
pub const TEST_RUN_MAX_FRAME: usize = 3000;

/// `union bpf_attr` for `BPF_MAP_*_ELEM` (the fields used).
#[repr(C, align(8))]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr`'s `test` member up to `batch_size`.
#[repr(C, align(8))]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<()> {
    // SAFETY: `attr` is a live, initialised repr(C) prefix of `union bpf_attr` for `cmd`, and
    // its size is passed so the kernel reads (and zero-extends) no more than it; pointers in it
    // were set by the callers to buffers that outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Deletes the `u32` key `key` of the map `map_fd`; a missing key is not an error.
pub fn map_delete_u32(map_fd: RawFd, key: u32) -> Result<(), SteerError> {
    let mut attr = MapElemAttr {
        map_fd: u32::try_from(map_fd).unwrap_or(u32::MAX),
        key: std::ptr::from_ref(&key) as u64,
        ..Default::default()
    };
    match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(source) => Err(SteerError::Syscall {
            call: "BPF_MAP_DELETE_ELEM",
            source,
        }),
    }
}

/// Runs `frame` once through the XDP program `prog_fd`; returns its action.
pub fn prog_test_run(prog_fd: RawFd, frame: &[u8]) -> Result<u32, SteerError> {
    let invalid = |what: &str| SteerError::Syscall {
        call: "BPF_PROG_TEST_RUN",
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_owned()),
    };
    if frame.len() > TEST_RUN_MAX_FRAME {
        return Err(invalid("frame larger than TEST_RUN_MAX_FRAME"));
    }
    let mut attr = TestRunAttr {
        prog_fd: u32::try_from(prog_fd).map_err(|_| invalid("bad program fd"))?,
        data_size_in: u32::try_from(frame.len()).map_err(|_| invalid("frame too large"))?,
        data_in: frame.as_ptr() as u64,
        repeat: 1,
        ..Default::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr).map_err(|source| SteerError::Syscall {
        call: "BPF_PROG_TEST_RUN",
        source,
    })?;
    Ok(attr.retval)
}

/// The index of the interface `name` in the caller's network namespace.
pub fn if_index(name: &str) -> Result<u32, SteerError> {
    let c = CString::new(name).map_err(|_| SteerError::UnknownInterface(name.to_owned()))?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        Err(SteerError::UnknownInterface(name.to_owned()))
    } else {
        Ok(idx)
    }
}
