//! The raw image shared by both servers: created with real data, and optionally pinned in the
//! page cache for the whole run.
//!
//! Why pin: the build machines run a DAMON `pageout` scheme (kdamond, `paddr` operations) that
//! pages out *unmapped* file pages not touched for a few seconds. A raw image read through the
//! page cache by a server (pread or io_uring, never mmap) is exactly that, so parts of it drop out
//! of memory during a run and random reads stall for milliseconds on the disk. Mapping the image
//! here (which makes its pages "mapped", outside the scheme's filter) and mlock-ing it keeps the
//! "raw file in the page cache" backend what its name says, equally for both servers.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::{bail, Context};

/// Chunk used to fill the raw image with data.
const FILL_CHUNK: usize = 1 << 20;

/// Creates `path` with `mib` MiB of non-zero data (so reads hit real page-cache pages, not
/// holes) and syncs it, so no writeback runs during the measurements.
pub fn create(path: &Path, mib: u64) -> anyhow::Result<()> {
    let mut f = File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut chunk = vec![0u8; FILL_CHUNK];
    for (i, b) in chunk.iter_mut().enumerate() {
        *b = (i % 251) as u8 + 1;
    }
    for _ in 0..mib {
        f.write_all(&chunk).context("fill image")?;
    }
    f.sync_all().context("sync image")?;
    Ok(())
}

/// A read-only shared mapping of the image, mlocked if allowed; unmapped on drop.
#[derive(Debug)]
pub struct Pinned {
    addr: *mut libc::c_void,
    len: usize,
    pub locked: bool,
}

impl Pinned {
    /// Maps `path` and locks it into memory (faulting every page in). If mlock is refused
    /// (RLIMIT_MEMLOCK without CAP_IPC_LOCK) the pages are touched instead and stay mapped,
    /// which still keeps them out of the pageout scheme.
    pub fn new(path: &Path) -> anyhow::Result<Self> {
        let f = File::open(path).with_context(|| format!("open {}", path.display()))?;
        let len = usize::try_from(f.metadata().context("stat image")?.len()).context("size")?;
        if len == 0 {
            bail!("image {} is empty", path.display());
        }
        // SAFETY: a fresh read-only shared mapping of a file we opened; nothing aliases it and
        // it is only read (by the kernel for mlock, or by `touch` below) until munmap in drop.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap image");
        }
        let mut pinned = Pinned {
            addr,
            len,
            locked: false,
        };
        // SAFETY: [addr, addr + len) is the mapping created above.
        pinned.locked = unsafe { libc::mlock(addr, len) } == 0;
        if !pinned.locked {
            pinned.touch();
        }
        Ok(pinned)
    }

    /// Reads one byte per page so every page is resident and mapped.
    fn touch(&self) {
        // SAFETY: sysconf has no memory effects.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .unwrap_or(4096)
            .max(1);
        let mut sum = 0u8;
        for off in (0..self.len).step_by(page) {
            // SAFETY: `off < len`, inside the readable mapping; volatile so it is not elided.
            sum ^= unsafe { std::ptr::read_volatile(self.addr.cast::<u8>().add(off)) };
        }
        std::hint::black_box(sum);
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `new` (munmap also unlocks it).
        unsafe { libc::munmap(self.addr, self.len) };
    }
}
