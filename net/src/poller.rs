//! The hook between packet queues and the reactors.
//!
//! A reactor receives packet queues as `Command::AddPoller(Box<dyn Poller>)` and,
//! in each loop iteration, calls [`Poller::poll`] next to its virtqueue polling (the
//! return value counts as work, so a busy port keeps the reactor spinning). It watches
//! [`Poller::wake_fd`] in its epoll set, level-triggered, so a frame waiting when it goes
//! to sleep wakes it at once; a queue without an fd (-1) keeps it from sleeping.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::{PacketIo, RX_BURST_MAX};

pub use dataplane::reactor::Poller;

/// Counters of one packet queue, shared with the control plane (`stats`).
#[derive(Debug, Default)]
pub struct QueueStats {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub errors: AtomicU64,
}

/// Receive handler of a queue: gets each frame and may transmit replies through the queue.
pub type FrameHandler = Box<dyn FnMut(&[u8]) + Send>;

/// A [`PacketIo`] queue whose received frames go to a handler: the poller a reactor runs.
pub struct QueuePoller {
    io: Box<dyn PacketIo>,
    handler: FrameHandler,
    stats: Arc<QueueStats>,
}

impl std::fmt::Debug for QueuePoller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuePoller")
            .field("backend", &self.io.backend())
            .field("stats", &self.stats)
            .finish()
    }
}

impl QueuePoller {
    pub fn new(io: Box<dyn PacketIo>, handler: FrameHandler, stats: Arc<QueueStats>) -> Self {
        Self { io, handler, stats }
    }
}

impl Poller for QueuePoller {
    fn poll(&mut self) -> usize {
        let mut bytes = 0u64;
        let handler = &mut self.handler;
        let r = self.io.rx_burst(RX_BURST_MAX, &mut |f: &[u8]| {
            bytes += f.len() as u64;
            handler(f);
        });
        match r {
            Ok(n) => {
                self.stats.rx_frames.fetch_add(n as u64, Ordering::Relaxed);
                self.stats.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
                n
            }
            Err(e) => {
                // Counted, and logged at debug level only: a flood of bad descriptors must not
                // flood the log; the counter shows it.
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%e, "packet queue receive");
                0
            }
        }
    }

    fn wake_fd(&self) -> RawFd {
        self.io.wake_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Backend, NetError};
    use std::collections::VecDeque;

    /// An in-memory queue: transmitted frames come back as received ones.
    struct Loopback {
        frames: VecDeque<Vec<u8>>,
        fd: std::os::fd::OwnedFd,
    }

    impl PacketIo for Loopback {
        fn rx_burst(&mut self, max: usize, f: &mut dyn FnMut(&[u8])) -> Result<usize, NetError> {
            let n = max.min(self.frames.len());
            for fr in self.frames.drain(..n) {
                f(&fr);
            }
            Ok(n)
        }
        fn tx_burst(&mut self, frames: &[&[u8]]) -> Result<usize, NetError> {
            self.frames.extend(frames.iter().map(|f| f.to_vec()));
            Ok(frames.len())
        }
        fn wake_fd(&self) -> RawFd {
            use std::os::fd::AsRawFd;
            self.fd.as_raw_fd()
        }
        fn backend(&self) -> Backend {
            Backend::Socket
        }
    }

    #[test]
    fn poll_delivers_in_bursts_and_counts() {
        let fd = std::fs::File::open("/dev/null").unwrap().into();
        let mut io = Loopback {
            frames: VecDeque::new(),
            fd,
        };
        let frames: Vec<Vec<u8>> = (0..100u8).map(|i| vec![i; 60]).collect();
        let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        assert_eq!(io.tx_burst(&refs).unwrap(), 100);
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s2 = Arc::clone(&seen);
        let stats = Arc::new(QueueStats::default());
        let mut p = QueuePoller::new(
            Box::new(io),
            Box::new(move |f| s2.lock().unwrap().push(f[0])),
            Arc::clone(&stats),
        );
        assert_eq!(p.poll(), RX_BURST_MAX);
        assert_eq!(p.poll(), 100 - RX_BURST_MAX);
        assert_eq!(p.poll(), 0);
        assert_eq!(*seen.lock().unwrap(), (0..100u8).collect::<Vec<_>>());
        assert_eq!(stats.rx_frames.load(Ordering::Relaxed), 100);
        assert_eq!(stats.rx_bytes.load(Ordering::Relaxed), 6000);
        assert!(p.wake_fd() >= 0);
    }
}
