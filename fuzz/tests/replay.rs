//! Replays every target's checked-in seed corpus and regression inputs through the same
//! `run` functions the libFuzzer binaries call, so `cargo test` exercises the targets (and a
//! crash once found stays fixed) without any fuzzing tool installed.
//!
//! `STRATA_FUZZ_WRITE_SEEDS=1 cargo test -p fuzz` rewrites `corpus/<target>/seed-*`
//! from the targets' `seeds()` after a change of an input layout.

use std::fs;
use std::path::{Path, PathBuf};

fn dir(kind: &str, target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(kind)
        .join(target)
}

fn files(d: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match fs::read_dir(d) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != "README.md"))
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

#[test]
fn seeds_are_checked_in() {
    let write = std::env::var_os("STRATA_FUZZ_WRITE_SEEDS").is_some();
    for (name, _, seeds) in fuzz::TARGETS {
        let d = dir("corpus", name);
        let seeds = seeds();
        assert!(!seeds.is_empty(), "{name}: no seeds");
        if write {
            fs::create_dir_all(&d).unwrap();
            for old in files(&d).iter().filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("seed-"))
            }) {
                fs::remove_file(old).unwrap();
            }
        }
        for (i, s) in seeds.iter().enumerate() {
            let p = d.join(format!("seed-{i:02}"));
            if write {
                fs::write(&p, s).unwrap();
            }
            let on_disk = fs::read(&p).unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (STRATA_FUZZ_WRITE_SEEDS=1 writes the seeds)",
                    p.display()
                )
            });
            assert!(
                on_disk == *s,
                "{} differs from {name}::seeds()[{i}] (STRATA_FUZZ_WRITE_SEEDS=1 rewrites it)",
                p.display()
            );
        }
    }
}

fn replay(kind: &str) {
    for (name, run, _) in fuzz::TARGETS {
        for p in files(&dir(kind, name)) {
            let data = fs::read(&p).expect("reading a fuzz input");
            eprintln!("{name}: {}", p.display());
            run(&data);
        }
    }
}

#[test]
fn corpus_replays_cleanly() {
    replay("corpus");
}

#[test]
fn regressions_replay_cleanly() {
    replay("regressions");
}

/// Every target also survives the degenerate inputs a fuzzer starts from.
#[test]
fn empty_and_tiny_inputs() {
    for (_, run, _) in fuzz::TARGETS {
        run(&[]);
        run(&[0]);
        run(&[0xff; 64]);
    }
}

/// Inputs that crash today's code on bugs being fixed elsewhere (`crashes/<target>/`, one
/// file per crash, named after its cause): `cargo test -p fuzz -- --ignored` lists
/// those that still panic. Inputs named `signal-*` (they kill the process) and `hang-*` are
/// left to the libFuzzer binary (`tools/fuzz.sh` prints how). Once one passes, move it to
/// `regressions/<target>/`.
#[test]
#[ignore = "open crashes: fixed on other branches, then moved to regressions/"]
fn open_crashes() {
    let mut still = Vec::new();
    for (name, run, _) in fuzz::TARGETS {
        for p in files(&dir("crashes", name)) {
            let file = p.file_name().map(|n| n.to_string_lossy().into_owned());
            let file = file.unwrap_or_default();
            if file.starts_with("signal-") || file.starts_with("hang-") {
                continue;
            }
            let data = fs::read(&p).expect("reading a fuzz input");
            if std::panic::catch_unwind(|| run(&data)).is_err() {
                still.push(format!("{name}/{file}"));
            }
        }
    }
    assert!(still.is_empty(), "still crashing: {still:#?}");
}
