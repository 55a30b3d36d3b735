//! The metadata workload of the shared-folder benchmark without a guest: create, stat, chmod
//! and unlink N files in one directory through the FileSystem trait, as the FUSE server calls
//! it, on a file-backed datastore. Prints server-side µs per operation for each phase.
//!
//! `cargo run --release -p file-server --example meta_ops [-- N]`

use std::ffi::CString;
use std::sync::Arc;
use std::time::Instant;

use file_server::fs::VmfsFs;
use file_server::settings::{CachePolicy, ShareSettings};
use posix_perm::cache::{PermCache, PermCacheConfig};
use posix_perm::idmap::IdMap;
use virtiofsd::filesystem::{Context, Extensions, FileSystem, SetattrValid};
use virtiofsd::fuse;
use vmfs::device::FileDevice;
use vmfs::fs::{Datastore, MkfsOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let dir = std::env::temp_dir().join(format!("meta-ops-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let dev = Arc::new(FileDevice::create(&dir.join("ds.vmfs"), 16 << 30)?);
    Datastore::mkfs(dev.clone(), &MkfsOptions { uuid: None }, &mut |_, _| {})?;
    let ds = Arc::new(Datastore::mount(dev)?);
    ds.set_deferred_commit(true);
    let settings = ShareSettings {
        uid_map: IdMap::identity(),
        gid_map: IdMap::identity(),
        readonly: false,
        groups: None,
        cache: CachePolicy::Auto,
        perm: PermCache::new(PermCacheConfig::default())?,
        quota: file_server::quota::QuotaLimits::default(),
    };
    let fs = VmfsFs::new(ds.clone(), "bench", settings)?;
    let ctx = Context {
        uid: 0.into(),
        gid: 0.into(),
        pid: 1,
    };
    let root = fuse::ROOT_ID;
    let d = fs
        .mkdir(
            ctx,
            root,
            &CString::new("d")?,
            0o755,
            0,
            Extensions::default(),
        )?
        .inode;
    let names: Vec<CString> = (0..n)
        .map(|i| CString::new(format!("f{i}")))
        .collect::<Result<_, _>>()?;
    let mut inos = Vec::with_capacity(n as usize);
    let phase = |name: &str, t: Instant| {
        let s = t.elapsed().as_secs_f64();
        println!(
            "{name:7} {:8.0} ops/s  {:6.2} us/op",
            n as f64 / s,
            s * 1e6 / n as f64
        );
    };
    let t = Instant::now();
    for name in &names {
        let (e, h, _) = fs.create(
            ctx,
            d,
            name,
            0o644,
            false,
            libc::O_RDWR as u32,
            0o022,
            Extensions::default(),
        )?;
        if let Some(h) = h {
            fs.release(ctx, e.inode, 0, h, false, false, None)?;
        }
        inos.push(e.inode);
    }
    phase("create", t);
    let t = Instant::now();
    for &ino in &inos {
        fs.getattr(ctx, ino, None)?;
    }
    phase("stat", t);
    let t = Instant::now();
    for &ino in &inos {
        let a = fuse::SetattrIn {
            mode: 0o600,
            ..Default::default()
        };
        fs.setattr(ctx, ino, a, None, SetattrValid::MODE)?;
    }
    phase("chmod", t);
    let t = Instant::now();
    for (name, &ino) in names.iter().zip(&inos) {
        fs.unlink(ctx, d, name)?;
        fs.forget(ctx, ino, 1);
    }
    phase("unlink", t);
    ds.sync()?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
