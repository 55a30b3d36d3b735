//! `stratactl fsck` after a crash: it recovers (journal replay) before checking, as e2fsck
//! does; `--no-replay` only looks.
// Test code: helpers outside #[test] functions panic on failure too.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use vmfs::device::FileDevice;
use vmfs::format::Provisioning;
use vmfs::fs::{Datastore, MkfsOptions};

fn fsck(path: &Path, extra: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_stratactl"))
        .arg("--datastore")
        .arg(path)
        .arg("fsck")
        .args(extra)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
    )
}

#[test]
fn fsck_replays_an_unreplayed_journal_and_no_replay_only_looks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ds.img");
    let dev = Arc::new(FileDevice::create(&path, 64 << 20).unwrap());
    Datastore::mkfs(dev.clone(), &MkfsOptions { uuid: None }, &mut |_, _| {}).unwrap();
    let ds = Datastore::mount(dev).unwrap();
    ds.mkdir("vms").unwrap();
    let ino = ds
        .create_file("vms/a.img", Provisioning::Thin, 4 << 20, &mut |_, _| {})
        .unwrap();
    ds.write(ino, 1 << 20, &[7u8; 4096]).unwrap();
    // A crash: no unmount, the journal still holds the committed transactions.
    drop(ds);
    let before = std::fs::read(&path).unwrap();

    let (ok, out) = fsck(&path, &["--no-replay"]);
    assert!(!ok, "{out}");
    assert!(out.contains("not yet replayed"), "{out}");
    assert!(
        std::fs::read(&path).unwrap() == before,
        "--no-replay wrote to the datastore"
    );

    let (ok, out) = fsck(&path, &[]);
    assert!(ok, "{out}");
    assert!(out.contains("recovered: replayed"), "{out}");
    assert!(out.contains("clean:"), "{out}");

    // Recovered for good: a second run has nothing to replay, and the data is there.
    let (ok, out) = fsck(&path, &["--no-replay"]);
    assert!(ok && !out.contains("recovered"), "{out}");
    let ds = Datastore::mount(Arc::new(FileDevice::open(&path, false).unwrap())).unwrap();
    let ino = ds.lookup("vms/a.img").unwrap();
    let mut buf = [0u8; 4096];
    ds.read(ino, 1 << 20, &mut buf).unwrap();
    assert_eq!(buf, [7u8; 4096]);
}
