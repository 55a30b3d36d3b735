//! Saving a unit's persistent-reservation state to a small file next to the disk, off the
//! reactor: one job thread per unit writes each snapshot (temporary file, fsync, rename,
//! directory fsync) in the order the changes were made and posts the command's completion to
//! the reactor's offload mailbox. Loading happens once, when the unit is created.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Sender};

use dataplane::engine::Completion;
use dataplane::offload::OffloadSink;

use super::pr::PrState;
use super::ScsiError;

/// The state file's largest accepted size: REGISTRATIONS_MAX entries of long iSCSI names.
const STATE_FILE_MAX: u64 = 1 << 20;

/// One snapshot to write, and where its command's completion goes.
struct SaveJob {
    bytes: Vec<u8>,
    sink: OffloadSink,
    user_data: u64,
}

/// A unit's state writer.
#[derive(Debug)]
pub(crate) struct Persister {
    tx: Sender<SaveJob>,
}

impl std::fmt::Debug for SaveJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaveJob")
            .field("bytes", &self.bytes.len())
            .field("user_data", &self.user_data)
            .finish()
    }
}

fn state_err(path: &Path, source: std::io::Error) -> ScsiError {
    ScsiError::State {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads the state saved at `path`: empty when there is none, or when it was saved without
/// APTPL (SPC-5: registrations then do not survive a power loss).
pub(crate) fn load(path: &Path) -> Result<PrState, ScsiError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(PrState::default()),
        Err(e) => return Err(state_err(path, e)),
    };
    let len = file.metadata().map_err(|e| state_err(path, e))?.len();
    if len > STATE_FILE_MAX {
        return Err(state_err(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, "state file too large"),
        ));
    }
    let state: PrState = serde_json::from_reader(std::io::BufReader::new(file)).map_err(|e| {
        state_err(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        )
    })?;
    if state.regs.len() > super::pr::REGISTRATIONS_MAX {
        return Err(state_err(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, "too many registrations"),
        ));
    }
    Ok(if state.aptpl {
        state
    } else {
        PrState::default()
    })
}

/// Writes `bytes` to `path` atomically and durably.
fn save(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp: PathBuf = path.to_path_buf();
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    tmp.set_file_name(name);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

impl Persister {
    /// Starts the writer thread for `path`.
    pub(crate) fn start(path: PathBuf, unit: &str) -> Result<Self, ScsiError> {
        let (tx, rx) = channel::<SaveJob>();
        std::thread::Builder::new()
            .name(format!("pr-save-{}", unit.chars().take(6).collect::<String>()))
            .spawn(move || {
                // Ends when the unit (the sender) is gone.
                while let Ok(job) = rx.recv() {
                    let result = match save(&path, &job.bytes) {
                        Ok(()) => 0,
                        Err(e) => {
                            tracing::error!(path = %path.display(), err = %e, "saving persistent reservations failed");
                            -e.raw_os_error().unwrap_or(libc::EIO)
                        }
                    };
                    job.sink.post(&[Completion {
                        user_data: job.user_data,
                        result,
                    }]);
                }
            })
            .map_err(|e| state_err(Path::new(unit), e))?;
        Ok(Persister { tx })
    }

    /// Queues a snapshot of `state`; its completion goes to `sink` with `user_data`. False if
    /// the writer is gone (the caller fails the command).
    pub(crate) fn submit(&self, state: &PrState, sink: &OffloadSink, user_data: u64) -> bool {
        let Ok(bytes) = serde_json::to_vec(state) else {
            return false;
        };
        sink.handed_over(1);
        let job = SaveJob {
            bytes,
            sink: sink.clone(),
            user_data,
        };
        // Fails only if the writer thread died; the mailbox then counts one job that never
        // comes back, which only makes an idle reactor yield instead of spin.
        self.tx.send(job).is_ok()
    }
}
