//! Packet queues on a reactor (`Command::AddPoller`): frames are polled next to the
//! virtqueues, and a sleeping reactor is woken by the queue's fd when frames arrive.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use dataplane::engine::EngineKind;
use dataplane::reactor::{Command, ReactorHandle};
use net::poller::{QueuePoller, QueueStats};
use net::{Backend, NetError, PacketIo};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A queue fed by the test: frames pushed into `frames`, `fd` signalled like a NIC interrupt.
#[derive(Debug)]
struct Fed {
    frames: Arc<Mutex<VecDeque<Vec<u8>>>>,
    fd: EventFd,
}

impl PacketIo for Fed {
    fn rx_burst(&mut self, max: usize, f: &mut dyn FnMut(&[u8])) -> Result<usize, NetError> {
        // Clear the signal first: frames pushed after this read signal again.
        let _ = self.fd.read();
        let mut q = self.frames.lock().expect("frames lock");
        let n = max.min(q.len());
        for fr in q.drain(..n) {
            f(&fr);
        }
        if !q.is_empty() {
            // Level-triggered like an XSK ring: still readable while frames wait.
            let _ = self.fd.write(1);
        }
        Ok(n)
    }
    fn tx_burst(&mut self, _frames: &[&[u8]]) -> Result<usize, NetError> {
        Ok(0)
    }
    fn wake_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
    fn backend(&self) -> Backend {
        Backend::Socket
    }
}

#[test]
fn sleeping_reactor_wakes_for_frames() {
    let mut r = ReactorHandle::spawn(0, None, EngineKind::Sync).unwrap();
    let frames = Arc::new(Mutex::new(VecDeque::new()));
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    let signal = fd.try_clone().unwrap();
    let (tx, rx) = mpsc::channel();
    let stats = Arc::new(QueueStats::default());
    let poller = QueuePoller::new(
        Box::new(Fed {
            frames: Arc::clone(&frames),
            fd,
        }),
        Box::new(move |f: &[u8]| tx.send(f.to_vec()).unwrap()),
        Arc::clone(&stats),
    );
    r.link().send(Command::AddPoller(Box::new(poller))).unwrap();
    for round in 0..3u8 {
        // Nothing else wakes the reactor: 50 ms after the last frame (its spin limit is 100 µs)
        // it is blocked in epoll, so the frames below reach it only through the queue's fd.
        std::thread::sleep(Duration::from_millis(50));
        let sleeps = r.stats.sleeps.load(Ordering::Relaxed);
        assert!(
            sleeps > u64::from(round),
            "reactor never slept ({sleeps} sleeps)"
        );
        // 100 frames: more than one burst, so the reactor must keep polling after waking.
        frames
            .lock()
            .unwrap()
            .extend((0..100u8).map(|i| vec![round, i]));
        signal.write(1).unwrap();
        for i in 0..100u8 {
            let f = rx
                .recv_timeout(Duration::from_secs(5))
                .expect("frame not polled");
            assert_eq!(f, vec![round, i]);
        }
    }
    assert_eq!(stats.rx_frames.load(Ordering::Relaxed), 300);
    r.shutdown();
}
