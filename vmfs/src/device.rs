//! The I/O edge of the datastore: the [`BlockDevice`] trait, a file/block-device
//! implementation ([`FileDevice`]) and a simulated disk for tests ([`SimDisk`]) that records
//! writes and flushes and injects faults.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Mutex;

use thiserror::Error;

/// Errors of a block device.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// An I/O error (real or injected).
    #[error("device I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// Access past the end of the device.
    #[error("access past the end of the device: offset {offset} length {len}")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        len: usize,
    },
    /// The device does not implement compare-and-write.
    #[error("compare-and-write not supported")]
    Unsupported,
    /// Another process holds the device.
    #[error("device is in use by another process (locked)")]
    Locked,
}

/// A block device holding a datastore. Offsets and lengths are bytes.
pub trait BlockDevice: Send + Sync + std::fmt::Debug {
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError>;
    /// Writes `buf` at `offset` (durable only after [`BlockDevice::flush`]).
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), DeviceError>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), DeviceError>;
    /// Tells the device a range is unused (contents become unspecified).
    fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError>;
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Makes `len` bytes at `offset` read as zeroes (durable after a flush). The default
    /// writes zeroes; devices that can zero without moving the bytes (hole punching in a file,
    /// WRITE ZEROES on a disk) do that instead.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        /// Zeroes written per call by the default implementation.
        const CHUNK: u64 = 1 << 20;
        let zeroes = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            self.write_at(offset + done, &zeroes[..n as usize])?;
            done += n;
        }
        Ok(())
    }
    /// Atomically writes `new` at `offset` if the bytes there equal `expect` (one sector);
    /// reserved for the multi-host heartbeat and lock protocol.
    fn compare_and_write(
        &self,
        _offset: u64,
        _expect: &[u8],
        _new: &[u8],
    ) -> Result<bool, DeviceError> {
        Err(DeviceError::Unsupported)
    }
    /// A file descriptor for asynchronous data I/O on the same bytes, if there is one.
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
    /// The file holding the datastore, when there is one, so a server can pread/pwrite the
    /// device extents of a read plan (`Extent::Device`) directly.
    fn as_file(&self) -> Option<&File> {
        None
    }
}

fn check_range(size: u64, offset: u64, len: usize) -> Result<(), DeviceError> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DeviceError::OutOfRange { offset, len }),
    }
}

/// A datastore on a file or block device.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    size: u64,
    direct: bool,
    block_device: bool,
}

impl FileDevice {
    /// Opens `path` read-write (O_DIRECT if `direct`) and locks it exclusively.
    pub fn open(path: &Path, direct: bool) -> Result<Self, DeviceError> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(true);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        Self::locked(opts.open(path)?, libc::LOCK_EX, direct)
    }

    /// Opens `path` read-only with a shared lock (refused while a writer such as stratad
    /// holds it): for a look that must not write, like `fsck --no-replay`. Writes fail.
    pub fn open_read_only(path: &Path) -> Result<Self, DeviceError> {
        Self::locked(
            OpenOptions::new().read(true).open(path)?,
            libc::LOCK_SH,
            false,
        )
    }

    /// Takes `lock` (flock, non-blocking: a datastore in use elsewhere is refused, not waited
    /// for) on `file` and reads its size.
    fn locked(mut file: File, lock: libc::c_int, direct: bool) -> Result<Self, DeviceError> {
        // SAFETY: flock on a descriptor we own has no memory effects.
        if unsafe { libc::flock(file.as_raw_fd(), lock | libc::LOCK_NB) } != 0 {
            return Err(DeviceError::Locked);
        }
        let size = file.seek(SeekFrom::End(0))?;
        let block_device =
            std::os::unix::fs::FileTypeExt::is_block_device(&file.metadata()?.file_type());
        Ok(FileDevice {
            file,
            size,
            direct,
            block_device,
        })
    }

    /// Creates (or extends) a sparse file of `size` bytes and opens it.
    pub fn create(path: &Path, size: u64) -> Result<Self, DeviceError> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        if f.metadata()?.len() < size {
            f.set_len(size)?;
        }
        drop(f);
        Self::open(path, false)
    }

    /// Whether O_DIRECT is on.
    pub fn direct(&self) -> bool {
        self.direct
    }
}

impl BlockDevice for FileDevice {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        check_range(self.size, offset, buf.len())?;
        self.file.read_exact_at(buf, offset)?;
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), DeviceError> {
        check_range(self.size, offset, buf.len())?;
        self.file.write_all_at(buf, offset)?;
        Ok(())
    }

    fn flush(&self) -> Result<(), DeviceError> {
        self.file.sync_data()?;
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        check_range(self.size, offset, 0)?;
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(DeviceError::OutOfRange { offset, len: 0 });
        };
        // SAFETY: fallocate on a descriptor we own has no memory effects.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if r != 0 {
            // Discard is advisory: a filesystem without hole punching just keeps the bytes.
            tracing::debug!(err = %std::io::Error::last_os_error(), "discard not applied");
        }
        Ok(())
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        check_range(self.size, offset, 0)?;
        check_range(self.size, offset.saturating_add(len), 0)?;
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(DeviceError::OutOfRange { offset, len: 0 });
        };
        // Files: a punched hole reads as zeroes on every Linux filesystem and costs no data
        // write. Block devices: ZERO_RANGE is BLKZEROOUT (WRITE ZEROES where supported).
        let mode = if self.block_device {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        };
        // SAFETY: fallocate on a descriptor we own has no memory effects.
        if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) } == 0 {
            return Ok(());
        }
        // Not supported here: write the zeroes.
        let zeroes = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64);
            self.write_at(offset + done, &zeroes[..n as usize])?;
            done += n;
        }
        Ok(())
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }

    fn as_file(&self) -> Option<&File> {
        Some(&self.file)
    }
}

/// What a recorded operation was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimOp {
    /// A write of these bytes at this offset.
    Write {
        /// Offset.
        offset: u64,
        /// Data.
        data: Vec<u8>,
    },
    /// A flush barrier.
    Flush,
}

/// Faults the simulated disk can inject.
#[derive(Debug, Clone, Default)]
pub struct SimFaults {
    /// Fail the n-th (1-based) write with EIO; 0 = never.
    pub fail_write_nth: u64,
    /// Fail the n-th read with EIO; 0 = never.
    pub fail_read_nth: u64,
    /// Flip one bit in the n-th read's data; 0 = never.
    pub flip_read_nth: u64,
    /// Send the n-th write to `offset + misdirect_by` instead; 0 = never.
    pub misdirect_write_nth: u64,
    /// Displacement of a misdirected write.
    pub misdirect_by: u64,
}

#[derive(Debug, Default)]
struct SimState {
    /// What the medium holds, all writes applied (the "live" view).
    live: Vec<u8>,
    /// Every write and flush since creation, in order.
    log: Vec<SimOp>,
    writes: u64,
    reads: u64,
    flushes: u64,
    faults: SimFaults,
}

/// An in-memory disk that records every write and flush so tests can build the image a crash
/// at any point would leave (see [`SimDisk::crash_image`]), and that injects faults.
#[derive(Debug)]
pub struct SimDisk {
    state: Mutex<SimState>,
    size: u64,
}

impl SimDisk {
    /// A zeroed disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self::from_image(vec![0u8; size as usize])
    }

    /// A disk holding `image`.
    pub fn from_image(image: Vec<u8>) -> Self {
        let size = image.len() as u64;
        SimDisk {
            state: Mutex::new(SimState {
                live: image,
                ..SimState::default()
            }),
            size,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SimState> {
        // A panic in another test thread must not hide this disk's state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the faults to inject from now on (counters keep running).
    pub fn set_faults(&self, f: SimFaults) {
        self.lock().faults = f;
    }

    /// The recorded operations.
    pub fn log(&self) -> Vec<SimOp> {
        self.lock().log.clone()
    }

    /// Number of recorded operations (a crash point is an index into the log).
    pub fn log_len(&self) -> usize {
        self.lock().log.len()
    }

    /// The current contents (every write applied).
    pub fn image(&self) -> Vec<u8> {
        self.lock().live.clone()
    }

    /// Flushes issued so far.
    pub fn flushes(&self) -> u64 {
        self.lock().flushes
    }

    /// Builds the image a crash would leave after the first `upto` logged operations, given
    /// `base` (the image when logging started): every write before the last flush within
    /// `upto` lands; each later, unflushed write lands only if `keep(i)` says so (i counts
    /// unflushed writes from 0); with `tear`, a kept write lands only its first 512-byte
    /// sectors when `tear(i)` returns `Some(sectors)`.
    pub fn crash_image(
        base: &[u8],
        log: &[SimOp],
        upto: usize,
        keep: &mut dyn FnMut(usize) -> bool,
        tear: &mut dyn FnMut(usize) -> Option<usize>,
    ) -> Vec<u8> {
        let mut img = base.to_vec();
        let ops = &log[..upto.min(log.len())];
        let last_flush = ops.iter().rposition(|o| *o == SimOp::Flush);
        let durable_end = last_flush.map(|i| i + 1).unwrap_or(0);
        for op in &ops[..durable_end] {
            if let SimOp::Write { offset, data } = op {
                img[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
            }
        }
        let mut n = 0usize;
        for op in &ops[durable_end..] {
            if let SimOp::Write { offset, data } = op {
                if keep(n) {
                    let len = match tear(n) {
                        Some(sectors) => (sectors * 512).min(data.len()),
                        None => data.len(),
                    };
                    img[*offset as usize..*offset as usize + len].copy_from_slice(&data[..len]);
                }
                n += 1;
            }
        }
        img
    }
}

fn eio() -> DeviceError {
    DeviceError::Io(std::io::Error::from_raw_os_error(libc::EIO))
}

impl BlockDevice for SimDisk {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        check_range(self.size, offset, buf.len())?;
        let mut s = self.lock();
        s.reads += 1;
        if s.faults.fail_read_nth != 0 && s.reads == s.faults.fail_read_nth {
            return Err(eio());
        }
        let o = offset as usize;
        buf.copy_from_slice(&s.live[o..o + buf.len()]);
        if s.faults.flip_read_nth != 0 && s.reads == s.faults.flip_read_nth && !buf.is_empty() {
            let i = buf.len() / 2;
            buf[i] ^= 0x10;
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), DeviceError> {
        check_range(self.size, offset, buf.len())?;
        let mut s = self.lock();
        s.writes += 1;
        if s.faults.fail_write_nth != 0 && s.writes == s.faults.fail_write_nth {
            return Err(eio());
        }
        let mut at = offset;
        if s.faults.misdirect_write_nth != 0 && s.writes == s.faults.misdirect_write_nth {
            let moved = offset.wrapping_add(s.faults.misdirect_by);
            if check_range(self.size, moved, buf.len()).is_ok() {
                at = moved;
            }
        }
        let o = at as usize;
        s.live[o..o + buf.len()].copy_from_slice(buf);
        s.log.push(SimOp::Write {
            offset: at,
            data: buf.to_vec(),
        });
        Ok(())
    }

    fn flush(&self) -> Result<(), DeviceError> {
        let mut s = self.lock();
        s.flushes += 1;
        s.log.push(SimOp::Flush);
        Ok(())
    }

    fn discard(&self, offset: u64, _len: u64) -> Result<(), DeviceError> {
        check_range(self.size, offset, 0)?;
        Ok(())
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn compare_and_write(
        &self,
        offset: u64,
        expect: &[u8],
        new: &[u8],
    ) -> Result<bool, DeviceError> {
        if expect.len() != new.len() {
            return Err(DeviceError::OutOfRange {
                offset,
                len: new.len(),
            });
        }
        check_range(self.size, offset, new.len())?;
        let mut s = self.lock();
        let o = offset as usize;
        if s.live[o..o + expect.len()] != *expect {
            return Ok(false);
        }
        s.live[o..o + new.len()].copy_from_slice(new);
        s.log.push(SimOp::Write {
            offset,
            data: new.to_vec(),
        });
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_image_keeps_flushed_and_chosen_writes() {
        let d = SimDisk::new(4096);
        d.write_at(0, &[1; 512]).unwrap();
        d.flush().unwrap();
        d.write_at(512, &[2; 1024]).unwrap();
        d.write_at(2048, &[3; 512]).unwrap();
        let log = d.log();
        let base = vec![0u8; 4096];
        let none = SimDisk::crash_image(&base, &log, log.len(), &mut |_| false, &mut |_| None);
        assert_eq!(&none[..512], &[1; 512]);
        assert_eq!(&none[512..1536], &[0; 1024]);
        let torn = SimDisk::crash_image(&base, &log, log.len(), &mut |i| i == 0, &mut |_| Some(1));
        assert_eq!(&torn[512..1024], &[2; 512]);
        assert_eq!(&torn[1024..1536], &[0; 512]);
        assert_eq!(&torn[2048..2560], &[0; 512]);
    }

    #[test]
    fn faults_and_cas() {
        let d = SimDisk::new(8192);
        d.set_faults(SimFaults {
            fail_write_nth: 2,
            ..SimFaults::default()
        });
        d.write_at(0, &[1; 512]).unwrap();
        assert!(d.write_at(0, &[1; 512]).is_err());
        assert!(d.read_at(8000, &mut [0; 512]).is_err());
        assert!(d.compare_and_write(0, &[1; 512], &[5; 512]).unwrap());
        assert!(!d.compare_and_write(0, &[1; 512], &[6; 512]).unwrap());
    }

    #[test]
    fn file_device_lock_and_range() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ds");
        let d = FileDevice::create(&p, 1 << 20).unwrap();
        assert!(matches!(
            FileDevice::open(&p, false),
            Err(DeviceError::Locked)
        ));
        d.write_at(4096, b"hello").unwrap();
        let mut b = [0u8; 5];
        d.read_at(4096, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        assert!(d.write_at(1 << 20, b"x").is_err());
    }
}
