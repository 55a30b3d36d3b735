//! Guest memory regions from a vhost-user frontend, checked before they are mapped and guarded
//! against the frontend shrinking them afterwards.
//!
//! Accessing a shared file mapping past the file's end raises SIGBUS, which would kill the
//! process serving every VM. Two defences:
//!
//! - [`check_region_fd`], before mapping: the fd is a regular file (memfd, shm or hugetlbfs
//!   file) holding `offset + size` bytes (fstat). A short fd is refused.
//! - A region whose file cannot shrink any more (memfd with `F_SEAL_SHRINK`: QEMU's
//!   `memory-backend-memfd` seals by default) needs nothing else. An unsealed one (QEMU's
//!   `memory-backend-file`, e.g. on hugetlbfs, which cannot be sealed; libblkio's memfds, which
//!   are created without `MFD_ALLOW_SEALING`) could be truncated later by the frontend, so it is
//!   registered with [`guard`]: a process-wide SIGBUS handler that, for a fault inside a
//!   registered region, replaces the whole region with anonymous zero pages (the access then
//!   completes; the frontend has broken its own guest's memory, nobody else's) and lets any
//!   other SIGBUS take its previous action. Refusing unsealed regions would refuse real
//!   frontends (hugetlbfs-backed QEMU, every libblkio client), so they are accepted with the
//!   guard. Kernel accesses (io_uring, preadv) to a truncated mapping fail with EFAULT, which
//!   the request path already reports as an I/O error.
//!
//! The registry is a fixed array of atomics, so the signal handler reads it without locks or
//! allocation. A [`Guard`] must be dropped before its region is unmapped (the owner keeps the
//! mapping alive at least as long as the guard, see `vhost_device`).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

use thiserror::Error;

/// Unsealed guest memory regions guarded at once across the process: a VM has a handful of
/// regions (QEMU: one per RAM block, plus hotplugged DIMMs), so this covers hundreds of VMs;
/// past it, unsealed regions are refused (sealed ones need no slot).
pub const GUARDED_MAX: usize = 4096;

/// Errors of region checks.
#[derive(Debug, Error)]
pub enum MemGuardError {
    /// The region is empty or its end overflows.
    #[error("memory region of {size} bytes at file offset {offset} is empty or wraps")]
    BadRange {
        /// mmap offset.
        offset: u64,
        /// Size.
        size: u64,
    },
    /// The fd is not a regular file.
    #[error("memory region fd is not a regular file")]
    NotAFile,
    /// The file is shorter than the region.
    #[error("memory region needs {need} bytes of its file, which holds {have}")]
    Short {
        /// offset + size.
        need: u64,
        /// File size.
        have: u64,
    },
    /// fstat failed.
    #[error("memory region fd: {0}")]
    Io(#[from] std::io::Error),
    /// Every guard slot is taken.
    #[error(
        "too many unsealed guest memory regions (at most {GUARDED_MAX}); seal them (F_SEAL_SHRINK)"
    )]
    Full,
}

/// What [`check_region_fd`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sealing {
    /// The file cannot shrink (`F_SEAL_SHRINK`).
    Sealed,
    /// The file may shrink later: map it only with a [`guard`].
    Unsealed,
}

/// Checks that `file` holds `[offset, offset + size)` and whether it can shrink later.
pub fn check_region_fd(file: &File, offset: u64, size: u64) -> Result<Sealing, MemGuardError> {
    let need = offset
        .checked_add(size)
        .filter(|_| size > 0)
        .ok_or(MemGuardError::BadRange { offset, size })?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(MemGuardError::NotAFile);
    }
    if meta.len() < need {
        return Err(MemGuardError::Short {
            need,
            have: meta.len(),
        });
    }
    // SAFETY: F_GET_SEALS reads the file's seal set; no memory is touched.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    Ok(if seals >= 0 && seals & libc::F_SEAL_SHRINK != 0 {
        Sealing::Sealed
    } else {
        Sealing::Unsealed
    })
}

/// Guarded ranges: slot `i` holds `[STARTS[i], STARTS[i] + LENS[i])` when `LENS[i] != 0`.
static STARTS: [AtomicUsize; GUARDED_MAX] = [const { AtomicUsize::new(0) }; GUARDED_MAX];
static LENS: [AtomicUsize; GUARDED_MAX] = [const { AtomicUsize::new(0) }; GUARDED_MAX];
/// Slot ownership (claimed by [`guard`], released by `Guard::drop`).
static CLAIMED: [AtomicBool; GUARDED_MAX] = [const { AtomicBool::new(false) }; GUARDED_MAX];
/// Set by the handler when it replaced the slot's region.
static FAULTED: [AtomicBool; GUARDED_MAX] = [const { AtomicBool::new(false) }; GUARDED_MAX];
/// The SIGBUS action before ours (restored for faults outside guarded regions).
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// A registered region; unregisters on drop.
#[derive(Debug)]
pub struct Guard {
    slot: usize,
}

impl Guard {
    /// Whether the frontend shrank the file under the region and it was replaced by zeroes.
    pub fn faulted(&self) -> bool {
        FAULTED[self.slot].load(Ordering::Acquire)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        LENS[self.slot].store(0, Ordering::Release);
        FAULTED[self.slot].store(false, Ordering::Relaxed);
        CLAIMED[self.slot].store(false, Ordering::Release);
    }
}

/// Guards the mapping `[start, start + len)` of an unsealed file until the guard is dropped.
pub fn guard(start: *mut u8, len: usize) -> Result<Guard, MemGuardError> {
    install()?;
    if len == 0 {
        return Err(MemGuardError::BadRange { offset: 0, size: 0 });
    }
    for slot in 0..GUARDED_MAX {
        if CLAIMED[slot]
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            FAULTED[slot].store(false, Ordering::Relaxed);
            STARTS[slot].store(start as usize, Ordering::Relaxed);
            LENS[slot].store(len, Ordering::Release);
            return Ok(Guard { slot });
        }
    }
    Err(MemGuardError::Full)
}

/// Installs the SIGBUS handler once.
fn install() -> Result<(), MemGuardError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let r = INSTALLED.get_or_init(|| {
        // SAFETY: sigaction structs are plain data, zero is a valid initial value; the handler
        // only uses async-signal-safe operations (atomics, mmap, sigaction).
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_sigbus as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            libc::sigemptyset(&mut act.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &act, &mut old) != 0 {
                return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
            let _ = PREVIOUS.set(old);
        }
        Ok(())
    });
    r.map_err(|e| MemGuardError::Io(std::io::Error::from_raw_os_error(e)))
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for slot in 0..GUARDED_MAX {
        let len = LENS[slot].load(Ordering::Acquire);
        if len == 0 {
            continue;
        }
        let start = STARTS[slot].load(Ordering::Relaxed);
        if addr >= start && addr - start < len {
            // SAFETY: [start, start + len) is a guest memory mapping that its owner keeps
            // mapped while the guard exists; replacing it with private anonymous memory
            // (same size, same protection) keeps every pointer into it valid.
            let p = unsafe {
                libc::mmap(
                    start as *mut libc::c_void,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                FAULTED[slot].store(true, Ordering::Release);
                return;
            }
            break;
        }
    }
    // Not guest memory (or the replacement failed): the previous action, taken when the
    // faulting access runs again.
    if let Some(old) = PREVIOUS.get() {
        // SAFETY: restores an action the kernel gave us; sigaction is async-signal-safe.
        unsafe { libc::sigaction(libc::SIGBUS, old, std::ptr::null_mut()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    fn memfd(len: u64, sealing: bool) -> File {
        let flags = if sealing { libc::MFD_ALLOW_SEALING } else { 0 };
        // SAFETY: memfd_create with a static name; the fd is owned by the File.
        let f = unsafe { File::from_raw_fd(libc::memfd_create(c"t".as_ptr(), flags)) };
        f.set_len(len).unwrap();
        f
    }

    #[test]
    fn short_wrapping_and_sealed_files() {
        let f = memfd(0x10000, true);
        assert_eq!(check_region_fd(&f, 0, 0x10000).unwrap(), Sealing::Unsealed);
        assert!(matches!(
            check_region_fd(&f, 0x1000, 0x10000),
            Err(MemGuardError::Short { .. })
        ));
        assert!(check_region_fd(&f, 0, 0).is_err());
        assert!(check_region_fd(&f, u64::MAX, 2).is_err());
        // SAFETY: adds seals to our own memfd; no memory is touched.
        let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
        assert_eq!(rc, 0);
        assert_eq!(check_region_fd(&f, 0, 0x10000).unwrap(), Sealing::Sealed);
        let dir = File::open("/").unwrap();
        assert!(matches!(
            check_region_fd(&dir, 0, 1),
            Err(MemGuardError::NotAFile)
        ));
    }

    /// A guarded mapping whose file is truncated reads zeroes instead of killing the process.
    #[test]
    fn truncated_guarded_mapping_reads_zeroes() {
        let f = memfd(0x4000, false);
        std::io::Write::write_all(&mut &f, &[7u8; 0x4000]).unwrap();
        // SAFETY: a fresh shared mapping of our memfd, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                0x4000,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let p = p.cast::<u8>();
        let g = guard(p, 0x4000).unwrap();
        // SAFETY: inside the mapping.
        assert_eq!(unsafe { p.add(0x3000).read_volatile() }, 7);
        f.set_len(0).unwrap();
        // SAFETY: inside the mapping; past the file's end now, so this faults and the guard
        // replaces the region.
        assert_eq!(unsafe { p.add(0x3000).read_volatile() }, 0);
        assert!(g.faulted());
        drop(g);
        // SAFETY: our mapping.
        unsafe { libc::munmap(p.cast(), 0x4000) };
    }
}
