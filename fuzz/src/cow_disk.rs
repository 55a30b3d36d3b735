//! A copy-on-write [`BlockDevice`]: reads come from a shared base image unless the page was
//! written since. Each fuzz run starts from the same datastore for the cost of the pages it
//! touches (vmfs needs at least 64 MiB; copying that per run would cap a target at a few
//! dozen runs a second).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use vmfs::device::{BlockDevice, DeviceError};

/// Copy-on-write granule.
const PAGE: u64 = 4096;

/// A device whose unwritten pages read from `base`.
#[derive(Debug)]
pub struct CowDisk {
    base: Arc<Vec<u8>>,
    pages: Mutex<HashMap<u64, Box<[u8]>>>,
}

impl CowDisk {
    /// A device over `base` (its length is the device size, a multiple of 4 KiB).
    pub fn new(base: Arc<Vec<u8>>) -> Self {
        CowDisk {
            base,
            pages: Mutex::new(HashMap::new()),
        }
    }

    /// A zeroed device of `size` bytes.
    pub fn zeroed(size: u64) -> Self {
        Self::new(Arc::new(vec![0u8; size as usize]))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Box<[u8]>>> {
        self.pages.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The whole current contents.
    pub fn image(&self) -> Vec<u8> {
        let mut img = self.base.to_vec();
        for (p, b) in self.lock().iter() {
            let at = (*p * PAGE) as usize;
            img[at..at + PAGE as usize].copy_from_slice(b);
        }
        img
    }

    fn check(&self, offset: u64, len: usize) -> Result<(), DeviceError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.base.len() as u64 => Ok(()),
            _ => Err(DeviceError::OutOfRange { offset, len }),
        }
    }
}

impl BlockDevice for CowDisk {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.check(offset, buf.len())?;
        let pages = self.lock();
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let (p, o) = (at / PAGE, (at % PAGE) as usize);
            let n = (PAGE as usize - o).min(buf.len() - done);
            let src = match pages.get(&p) {
                Some(b) => &b[o..o + n],
                None => &self.base[at as usize..at as usize + n],
            };
            buf[done..done + n].copy_from_slice(src);
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), DeviceError> {
        self.check(offset, buf.len())?;
        let mut pages = self.lock();
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let (p, o) = (at / PAGE, (at % PAGE) as usize);
            let n = (PAGE as usize - o).min(buf.len() - done);
            let page = pages.entry(p).or_insert_with(|| {
                let s = (p * PAGE) as usize;
                self.base[s..s + PAGE as usize].into()
            });
            page[o..o + n].copy_from_slice(&buf[done..done + n]);
            done += n;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        // Contents become unspecified: keeping them is a valid choice.
        self.check(offset, usize::try_from(len).unwrap_or(usize::MAX))
    }

    fn size(&self) -> u64 {
        self.base.len() as u64
    }
}
