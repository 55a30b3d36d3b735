//! Journal commits and bytes per guest write, batching on vs off.
//!
//! Replays what stratad's reactor does with a queue depth of 32 on never-written space of a
//! thin disk: every reactor batch of 32 random 4 KiB writes goes to `write_batch` (one
//! physical journal transaction for the whole batch) — or, with batching off, each
//! file-block group commits on its own. A third mode is stratad's default: batches join the
//! open transaction and commit at the guest's flush (here: every 1024 writes).
//!
//! Run: `cargo run --release -p vmfs --example journal_batching [WRITES]`

use std::sync::atomic::Ordering;
use std::sync::Arc;

use vmfs::device::FileDevice;
use vmfs::format::Provisioning;
use vmfs::fs::{Datastore, MkfsOptions, WriteSeg};

/// Requests per reactor batch: the queue depth.
const QD: usize = 32;
/// Guest writes between flushes in the deferred mode.
const FLUSH_EVERY: usize = 1024;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let writes: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(4096);
    let dir = std::env::temp_dir().join(format!("vmfs-batching-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    println!("{writes} random 4 KiB writes at queue depth {QD} on never-written space");
    println!(
        "{:<26} {:>9} {:>14} {:>18}",
        "mode", "commits", "writes/commit", "journal B/write"
    );
    for mode in [
        "batching off",
        "batching on",
        "batching on, commit at flush",
    ] {
        let path = dir.join("ds");
        let _ = std::fs::remove_file(&path);
        let dev = Arc::new(FileDevice::create(&path, 8 << 30)?);
        Datastore::mkfs(dev.clone(), &MkfsOptions { uuid: None }, &mut |_, _| {})?;
        let ds = Datastore::mount(dev)?;
        ds.set_batching(mode != "batching off");
        let disk_bytes: u64 = 6 << 30;
        let ino = ds.create_file("d", Provisioning::Thin, disk_bytes, &mut |_, _| {})?;
        let c0 = ds.stats.commits.load(Ordering::Relaxed);
        let b0 = ds.stats.journal_bytes.load(Ordering::Relaxed);
        let data = vec![0xa5u8; 4096];
        // A fixed linear congruential sequence: reproducible offsets over the whole disk.
        let mut x: u64 = 12345;
        let mut done = 0;
        while done < writes {
            let n = QD.min(writes - done);
            let segs: Vec<WriteSeg<'_>> = (0..n)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    WriteSeg {
                        ino,
                        offset: ((x >> 16) % (disk_bytes / 4096)) * 4096,
                        data: &data,
                    }
                })
                .collect();
            if mode == "batching on, commit at flush" {
                ds.write_batch_deferred(&segs)?;
                if (done + n) / FLUSH_EVERY != done / FLUSH_EVERY {
                    ds.sync()?;
                }
            } else {
                ds.write_batch(&segs)?;
            }
            done += n;
        }
        ds.sync()?;
        let commits = ds.stats.commits.load(Ordering::Relaxed) - c0;
        let bytes = ds.stats.journal_bytes.load(Ordering::Relaxed) - b0;
        println!(
            "{:<26} {:>9} {:>14.1} {:>18.0}",
            mode,
            commits,
            writes as f64 / commits.max(1) as f64,
            bytes as f64 / writes as f64
        );
        ds.unmount()?;
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
