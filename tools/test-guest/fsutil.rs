//! `strata-fsutil`: a tiny guest-side helper for the file-server tests, std only, compiled by
//! build-guest.sh --fs with plain `rustc -O -C target-feature=+crt-static` (no cargo, no
//! crates) into the fs guest's /usr/bin. Not part of the workspace.
//!
//! Usage:
//!   strata-fsutil now                      nanoseconds since the epoch (busybox date has no %N)
//!   strata-fsutil meta DIR [N] [--drop-caches]
//!       metadata benchmark in DIR (created if missing): N files (default 10000), four timed
//!       phases, one syscall per file each: create (open O_CREAT|O_EXCL + close), stat
//!       (lstat), chmod (0600), unlink. --drop-caches writes 3 to /proc/sys/vm/drop_caches
//!       before each phase, so stat/chmod/unlink must look names up in the server again.
//!       Prints one line per phase:  meta <phase> files=N secs=S.SSSSSS ops_per_sec=R
//!
//! Exit status: 0 on success, 1 on the first failing operation (with its errno), 2 on usage.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

fn usage() -> ExitCode {
    eprintln!("usage: strata-fsutil now | meta DIR [N] [--drop-caches]");
    ExitCode::from(2)
}

fn drop_caches() {
    // sync first: dirty pages and inodes are not dropped.
    let _ = std::process::Command::new("sync").status();
    if let Ok(mut f) = OpenOptions::new()
        .write(true)
        .open("/proc/sys/vm/drop_caches")
    {
        let _ = f.write_all(b"3\n");
    }
}

fn phase(
    name: &str,
    paths: &[PathBuf],
    drop: bool,
    op: impl Fn(&Path) -> std::io::Result<()>,
) -> Result<(), String> {
    if drop {
        drop_caches();
    }
    let start = Instant::now();
    for p in paths {
        op(p).map_err(|e| format!("{name} {}: {e}", p.display()))?;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "meta {name} files={} secs={secs:.6} ops_per_sec={:.0}",
        paths.len(),
        paths.len() as f64 / secs
    );
    Ok(())
}

fn meta(dir: &Path, n: usize, drop: bool) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    let paths: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("f{i:06}"))).collect();
    phase("create", &paths, drop, |p| {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(p)
            .map(|_| ())
    })?;
    phase("stat", &paths, drop, |p| {
        fs::symlink_metadata(p).map(|_| ())
    })?;
    phase("chmod", &paths, drop, |p| {
        fs::set_permissions(p, fs::Permissions::from_mode(0o600))
    })?;
    phase("unlink", &paths, drop, |p| fs::remove_file(p))?;
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("now") => {
            let ns = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            println!("{ns}");
            ExitCode::SUCCESS
        }
        Some("meta") => {
            let drop = args.iter().any(|a| a == "--drop-caches");
            let rest: Vec<&String> = args[1..].iter().filter(|a| !a.starts_with("--")).collect();
            let Some(dir) = rest.first() else {
                return usage();
            };
            let n = match rest.get(1).map(|s| s.parse::<usize>()) {
                None => 10_000,
                Some(Ok(n)) if n > 0 => n,
                _ => return usage(),
            };
            match meta(Path::new(dir.as_str()), n, drop) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("strata-fsutil: {e}");
                    ExitCode::from(1)
                }
            }
        }
        _ => usage(),
    }
}
