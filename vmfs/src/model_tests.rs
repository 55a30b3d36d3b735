//! Model-based and equivalence tests (reference vmfs.md §8: 18, 27).
//!
//! - A proptest drives random operation sequences (create thin / lazy / eager, writes through
//!   `write` and `write_batch`, reads, size changes, mkdir, rename, unlink, rmdir, clean and
//!   crash remounts) against an in-memory model of paths and contents, comparing every result
//!   (including which error) and, at the end, every byte, then running fsck.
//! - Equivalence: random scatter-gather arrays through `write_batch` with batching on, off,
//!   and a naive per-segment `write` give identical contents and block counts; batching on
//!   gives one journal commit per call that needs metadata.
//!
//! Seeds are fixed (`VMFS_TEST_SEED=<u64>` overrides) and printed on failure.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::device::SimDisk;
use crate::format::*;
use crate::fs::{Datastore, FsError, MkfsOptions, WriteSeg};
use crate::fsck::fsck;

const VOL: u64 = 96 << 20;

fn seed() -> u64 {
    std::env::var("VMFS_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_2024_0002)
}

fn fresh(vol: u64) -> (Arc<SimDisk>, Datastore) {
    let disk = Arc::new(SimDisk::new(vol));
    Datastore::mkfs(disk.clone(), &MkfsOptions { uuid: None }, &mut |_, _| {}).unwrap();
    let ds = Datastore::mount(disk.clone()).unwrap();
    (disk, ds)
}

/// Error kinds the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ek {
    NotFound,
    Exists,
    NotDir,
    IsDir,
    NotEmpty,
    Invalid,
    Other,
}

fn kind(e: &FsError) -> Ek {
    match e {
        FsError::NotFound(_) => Ek::NotFound,
        FsError::Exists(_) => Ek::Exists,
        FsError::NotDir(_) => Ek::NotDir,
        FsError::IsDir(_) => Ek::IsDir,
        FsError::NotEmpty(_) => Ek::NotEmpty,
        FsError::Invalid(_) => Ek::Invalid,
        _ => Ek::Other,
    }
}

/// Paths the operations choose from: nested directories, and names below a file.
const PATHS: [&str; 10] = [
    "a", "b", "d1", "d2", "d1/a", "d1/b", "d1/d3", "d1/d3/a", "d2/a", "a/x",
];

#[derive(Debug, Clone)]
enum Op {
    Mkdir(usize),
    /// Path, provisioning (0 thin, 1 lazy, 2 eager), size.
    Create(usize, u8, u64),
    /// Path, offset, length, data seed; through `write`.
    Write(usize, u64, usize, u8),
    /// Segments: path, offset as a fraction of the size (/ 1000), length, data seed;
    /// `oob` makes the first segment run past the end.
    Batch(Vec<(usize, u32, usize, u8)>, bool),
    Read(usize, u64, usize),
    SetSize(usize, u64),
    Rename(usize, usize),
    Unlink(usize),
    Rmdir(usize),
    /// Clean (unmount) or crash (drop, mount the image as it is).
    Remount(bool),
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let p = 0..PATHS.len();
    // Small writes stay below 256 KiB (resident and sub-block files); large ones end beyond
    // 1 MiB (file blocks). Bounds keep every run within the volume's space.
    let small = (p.clone(), 0u64..200_000, 1usize..5000, any::<u8>())
        .prop_map(|(p, o, l, s)| Op::Write(p, o, l, s));
    let large = (
        p.clone(),
        (1u64 << 20) - 65536..3 << 20,
        65537usize..300_000,
        any::<u8>(),
    )
        .prop_map(|(p, o, l, s)| Op::Write(p, o, l, s));
    let seg = (p.clone(), 0u32..1000, 1usize..200_000, any::<u8>());
    prop_oneof![
        2 => p.clone().prop_map(Op::Mkdir),
        3 => (p.clone(), 0u8..3, prop_oneof![Just(0u64), 0u64..5000, 0u64..(3 << 20)])
            .prop_map(|(p, k, s)| Op::Create(p, k, s)),
        4 => small,
        3 => large,
        3 => (proptest::collection::vec(seg, 1..5), proptest::bool::weighted(0.1))
            .prop_map(|(s, oob)| Op::Batch(s, oob)),
        2 => (p.clone(), 0u64..(3 << 20), 1usize..100_000).prop_map(|(p, o, l)| Op::Read(p, o, l)),
        2 => (p.clone(), prop_oneof![0u64..5000, 0u64..300_000, 0u64..(7 << 19)])
            .prop_map(|(p, s)| Op::SetSize(p, s)),
        2 => (p.clone(), p.clone()).prop_map(|(a, b)| Op::Rename(a, b)),
        2 => p.clone().prop_map(Op::Unlink),
        1 => p.clone().prop_map(Op::Rmdir),
        1 => any::<bool>().prop_map(Op::Remount),
    ]
}

#[derive(Debug, Clone)]
enum Node {
    Dir,
    File {
        data: Vec<u8>,
        /// True once the file uses 1 MiB file blocks (thick files always; thin files once
        /// they grew past 1 MiB; a layout never shrinks back).
        fb: bool,
        thick: bool,
    },
}

#[derive(Debug, Default)]
struct Model {
    nodes: BTreeMap<String, Node>,
}

fn parent_of(p: &str) -> Option<&str> {
    p.rfind('/').map(|i| &p[..i])
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i as u8).wrapping_mul(31)) | 1)
        .collect()
}

impl Model {
    /// The datastore's path walk: every proper prefix must exist (NotFound) and be a
    /// directory (NotDir).
    fn parent_ok(&self, p: &str) -> Result<(), Ek> {
        let parts: Vec<&str> = p.split('/').collect();
        for i in 1..parts.len() {
            match self.nodes.get(&parts[..i].join("/")) {
                None => return Err(Ek::NotFound),
                Some(Node::File { .. }) => return Err(Ek::NotDir),
                Some(Node::Dir) => {}
            }
        }
        Ok(())
    }

    fn lookup(&self, p: &str) -> Result<&Node, Ek> {
        self.parent_ok(p)?;
        self.nodes.get(p).ok_or(Ek::NotFound)
    }

    fn has_children(&self, p: &str) -> bool {
        let prefix = format!("{p}/");
        self.nodes.keys().any(|k| k.starts_with(&prefix))
    }

    fn file_mut(&mut self, p: &str) -> (&mut Vec<u8>, &mut bool, bool) {
        match self.nodes.get_mut(p) {
            Some(Node::File { data, fb, thick }) => (data, fb, *thick),
            _ => unreachable!("not a file"),
        }
    }

    fn resize(&mut self, p: &str, size: u64) {
        let (data, fb, _) = self.file_mut(p);
        data.resize(size as usize, 0);
        if size > 1 << 20 {
            *fb = true;
        }
    }

    fn rename(&mut self, from: &str, to: &str) -> Result<(), Ek> {
        self.parent_ok(from)?;
        self.parent_ok(to)?;
        let moving = self.nodes.get(from).ok_or(Ek::NotFound)?.clone();
        if from == to {
            return Ok(());
        }
        let moving_dir = matches!(moving, Node::Dir);
        if moving_dir && to.starts_with(&format!("{from}/")) {
            return Err(Ek::Invalid);
        }
        if let Some(target) = self.nodes.get(to) {
            match (target, moving_dir) {
                (Node::Dir, false) => return Err(Ek::IsDir),
                (Node::File { .. }, true) => return Err(Ek::NotDir),
                (Node::Dir, true) if self.has_children(to) => return Err(Ek::NotEmpty),
                _ => {}
            }
            self.nodes.remove(to);
        }
        let prefix = format!("{from}/");
        let moved: Vec<String> = self
            .nodes
            .keys()
            .filter(|k| *k == from || k.starts_with(&prefix))
            .cloned()
            .collect();
        for k in moved {
            let n = self.nodes.remove(&k).unwrap();
            self.nodes.insert(format!("{to}{}", &k[from.len()..]), n);
        }
        Ok(())
    }
}

/// Runs one case; returns a description of the first divergence.
fn run_case(ops: &[Op]) -> Result<(), String> {
    let (disk, ds) = fresh(VOL);
    let mut disk = disk;
    let mut ds = Some(ds);
    let mut m = Model::default();
    for (i, op) in ops.iter().enumerate() {
        let d = ds.as_ref().unwrap();
        let ctx = format!("op {i} {op:?}");
        let check = |got: Result<(), FsError>, want: Result<(), Ek>| -> Result<(), String> {
            let got = got.map_err(|e| kind(&e));
            if got != want {
                return Err(format!("{ctx}: datastore {got:?}, model {want:?}"));
            }
            Ok(())
        };
        match op {
            Op::Mkdir(p) => {
                let p = PATHS[*p];
                let want = m.parent_ok(p).and_then(|()| match m.nodes.get(p) {
                    Some(_) => Err(Ek::Exists),
                    None => Ok(()),
                });
                check(d.mkdir(p).map(|_| ()), want)?;
                if want.is_ok() {
                    m.nodes.insert(p.into(), Node::Dir);
                }
            }
            Op::Create(p, k, size) => {
                let p = PATHS[*p];
                let prov = [
                    Provisioning::Thin,
                    Provisioning::ThickLazy,
                    Provisioning::ThickEager,
                ][*k as usize];
                let want = m.parent_ok(p).and_then(|()| match m.nodes.get(p) {
                    Some(_) => Err(Ek::Exists),
                    None => Ok(()),
                });
                check(
                    d.create_file(p, prov, *size, &mut |_, _| {}).map(|_| ()),
                    want,
                )?;
                if want.is_ok() {
                    let thick = *k != 0;
                    m.nodes.insert(
                        p.into(),
                        Node::File {
                            data: vec![0; *size as usize],
                            fb: thick || *size > 1 << 20,
                            thick,
                        },
                    );
                }
            }
            Op::Write(p, off, len, s) => {
                let p = PATHS[*p];
                let node = m.lookup(p).cloned();
                let got = d.lookup(p);
                let got_k = got.as_ref().map(|_| ()).map_err(kind);
                let want_k = node.as_ref().map(|_| ()).map_err(|e| *e);
                if got_k != want_k {
                    return Err(format!("{ctx}: lookup gave {got_k:?}, model {want_k:?}"));
                }
                if let (Ok(ino), Ok(Node::File { .. })) = (got, node) {
                    let data = pattern(*s, *len);
                    d.write(ino, *off, &data)
                        .map_err(|e| format!("{ctx}: {e}"))?;
                    let end = *off as usize + len;
                    let cur = m.file_mut(p).0.len().max(end);
                    m.resize(p, cur as u64);
                    m.file_mut(p).0[*off as usize..end].copy_from_slice(&data);
                }
            }
            Op::Batch(segs, oob) => {
                // Resolve every path; skip the op if any is not an existing file.
                let mut plan = Vec::new();
                for (k, &(p, frac, len, s)) in segs.iter().enumerate() {
                    let path = PATHS[p];
                    let Ok(Node::File { data, fb, .. }) = m.lookup(path) else {
                        plan.clear();
                        break;
                    };
                    let size = data.len() as u64;
                    if size == 0 {
                        plan.clear();
                        break;
                    }
                    let off = size * u64::from(frac) / 1000;
                    let mut len = (len as u64).min(size - off).max(1);
                    if *oob && k == 0 {
                        len = size - off + 1;
                    }
                    let ino = d.lookup(path).map_err(|e| format!("{ctx}: {e}"))?;
                    plan.push((path, ino, off, len as usize, pattern(s, len as usize), *fb));
                }
                if plan.is_empty() {
                    continue;
                }
                let want = if plan.iter().any(|s| !s.5) || *oob {
                    Err(Ek::Invalid)
                } else {
                    Ok(())
                };
                let ws: Vec<WriteSeg<'_>> = plan
                    .iter()
                    .map(|s| WriteSeg {
                        ino: s.1,
                        offset: s.2,
                        data: &s.4,
                    })
                    .collect();
                check(d.write_batch(&ws), want)?;
                if want.is_ok() {
                    for (path, _, off, len, data, _) in &plan {
                        let off = *off as usize;
                        m.file_mut(path).0[off..off + len].copy_from_slice(data);
                    }
                }
            }
            Op::Read(p, off, len) => {
                let p = PATHS[*p];
                if let (Ok(ino), Ok(Node::File { data, .. })) = (d.lookup(p), m.lookup(p)) {
                    let mut buf = vec![0u8; *len];
                    let n = d
                        .read(ino, *off, &mut buf)
                        .map_err(|e| format!("{ctx}: {e}"))?;
                    let from = (*off as usize).min(data.len());
                    let want = &data[from..(from + len).min(data.len())];
                    if &buf[..n] != want {
                        return Err(format!(
                            "{ctx}: read {n} bytes differ from the model's {}",
                            want.len()
                        ));
                    }
                }
            }
            Op::SetSize(p, size) => {
                let p = PATHS[*p];
                if let (Ok(ino), Ok(Node::File { .. })) = (d.lookup(p), m.lookup(p)) {
                    d.set_size(ino, *size).map_err(|e| format!("{ctx}: {e}"))?;
                    m.resize(p, *size);
                }
            }
            Op::Rename(a, b) => {
                let (a, b) = (PATHS[*a], PATHS[*b]);
                let want = m.rename(a, b);
                check(d.rename(a, b), want)?;
            }
            Op::Unlink(p) => {
                let p = PATHS[*p];
                let want = m.lookup(p).and_then(|n| match n {
                    Node::Dir => Err(Ek::IsDir),
                    Node::File { .. } => Ok(()),
                });
                check(d.unlink(p), want)?;
                if want.is_ok() {
                    m.nodes.remove(p);
                }
            }
            Op::Rmdir(p) => {
                let p = PATHS[*p];
                let want = m.lookup(p).and_then(|n| match n {
                    Node::File { .. } => Err(Ek::NotDir),
                    Node::Dir if m.has_children(p) => Err(Ek::NotEmpty),
                    Node::Dir => Ok(()),
                });
                check(d.rmdir(p), want)?;
                if want.is_ok() {
                    m.nodes.remove(p);
                }
            }
            Op::Remount(clean) => {
                let old = ds.take().unwrap();
                if *clean {
                    old.unmount().map_err(|e| format!("{ctx}: {e}"))?;
                    drop(old);
                } else {
                    // Every call committed before returning: the image as it is must mount
                    // with everything (replaying what the journal holds).
                    drop(old);
                    disk = Arc::new(SimDisk::from_image(disk.image()));
                }
                ds = Some(Datastore::mount(disk.clone()).map_err(|e| format!("{ctx}: {e}"))?);
                compare_all(ds.as_ref().unwrap(), &m).map_err(|e| format!("{ctx}: {e}"))?;
            }
        }
        // Sizes of every file after every operation.
        let d = ds.as_ref().unwrap();
        for (p, n) in &m.nodes {
            if let Node::File { data, .. } = n {
                let ino = d.lookup(p).map_err(|e| format!("{ctx}: lookup {p}: {e}"))?;
                let size = d.stat(ino).map_err(|e| format!("{ctx}: {e}"))?.size;
                if size != data.len() as u64 {
                    return Err(format!("{ctx}: {p} has size {size}, model {}", data.len()));
                }
            }
        }
    }
    let d = ds.take().unwrap();
    compare_all(&d, &m)?;
    d.unmount().map_err(|e| e.to_string())?;
    drop(d);
    let r = fsck(&*disk).map_err(|e| e.to_string())?;
    if !r.clean() {
        return Err(format!("fsck: {:?}", r.problems));
    }
    Ok(())
}

/// Every directory lists exactly the model's children; every file reads the model's bytes.
fn compare_all(d: &Datastore, m: &Model) -> Result<(), String> {
    let mut dirs: BTreeSet<&str> = BTreeSet::from([""]);
    for (p, n) in &m.nodes {
        if matches!(n, Node::Dir) {
            dirs.insert(p);
        }
    }
    for dir in dirs {
        let mut names: Vec<String> = d
            .readdir(if dir.is_empty() { "/" } else { dir })
            .map_err(|e| format!("readdir {dir}: {e}"))?
            .into_iter()
            .map(|e| {
                if dir.is_empty() {
                    e.name
                } else {
                    format!("{dir}/{}", e.name)
                }
            })
            .collect();
        names.sort();
        let want: Vec<String> = m
            .nodes
            .keys()
            .filter(|k| parent_of(k).unwrap_or("") == dir)
            .cloned()
            .collect();
        if names != want {
            return Err(format!("directory '{dir}' lists {names:?}, model {want:?}"));
        }
    }
    for (p, n) in &m.nodes {
        if let Node::File { data, .. } = n {
            let ino = d.lookup(p).map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; data.len() + 10];
            let got = d.read(ino, 0, &mut buf).map_err(|e| e.to_string())?;
            if got != data.len() || buf[..got] != data[..] {
                let first = buf.iter().zip(data).position(|(a, b)| a != b);
                return Err(format!(
                    "{p}: {got} bytes read, model {}; first difference at {first:?}",
                    data.len()
                ));
            }
        }
    }
    Ok(())
}

#[test]
fn model_based_random_operations() {
    let seed = seed();
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases: 32,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    );
    let strategy = proptest::collection::vec(op_strategy(), 30);
    let r = runner.run(&strategy, |ops| {
        run_case(&ops).map_err(|e| TestCaseError::fail(format!("seed {seed}: {e}")))
    });
    if let Err(e) = r {
        panic!("seed {seed}: {e}");
    }
}

/// An operation that fails for lack of space must leave no trace. Here creating a 15th
/// entry converts the parent directory from resident to sealed directory blocks; with no file
/// block left the conversion fails half-way, and the half-converted directory (size and
/// layout changed, entries gone) must not stay in the metadata cache, be seen by later calls
/// or be committed by the next successful operation.
#[test]
fn failed_operation_leaves_no_trace() {
    let (disk, ds) = fresh(VOL);
    ds.mkdir("d").unwrap();
    for i in 0..14 {
        ds.create_file(&format!("d/f{i}"), Provisioning::Thin, 0, &mut |_, _| {})
            .unwrap();
    }
    // Use up every file block with one thick (lazily zeroed) file.
    let free = ds.statfs().unwrap().fb_free;
    ds.create_file(
        "fill",
        Provisioning::ThickLazy,
        free * FILE_BLOCK,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(ds.statfs().unwrap().fb_free, 0);
    let r = ds.create_file("d/f14", Provisioning::Thin, 0, &mut |_, _| {});
    assert!(matches!(r, Err(FsError::NoSpace(_))), "{r:?}");
    assert_eq!(
        ds.readdir("d").unwrap().len(),
        14,
        "the failed create emptied d"
    );
    ds.mkdir("other").unwrap();
    ds.unmount().unwrap();
    drop(ds);
    let r = fsck(&*disk).unwrap();
    assert!(r.clean(), "{:?}", r.problems);
    let ds = Datastore::mount(disk).unwrap();
    assert_eq!(ds.readdir("d").unwrap().len(), 14);
}

/// Where each file block of each file stands, for predicting which batches need metadata.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Blk {
    /// Not allocated (thin).
    Hole,
    /// Allocated, to be zeroed (lazy).
    Tbz,
    /// Allocated and written (or eager-zeroed).
    Ready,
}

#[test]
fn batched_unbatched_and_naive_writes_are_equivalent() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    const FILE: u64 = 6 << 20;
    let provs = [
        Provisioning::Thin,
        Provisioning::ThickLazy,
        Provisioning::ThickEager,
    ];
    // 0: batching on, 1: batching off, 2: naive per-segment write().
    let mut stores = Vec::new();
    for mode in 0..3 {
        let (_disk, ds) = fresh(64 << 20);
        ds.set_batching(mode != 1);
        let inos: Vec<u64> = provs
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                ds.create_file(&format!("f{i}"), p, FILE, &mut |_, _| {})
                    .unwrap()
            })
            .collect();
        stores.push((ds, inos));
    }
    let blocks = (FILE / FILE_BLOCK) as usize;
    let mut state: Vec<Vec<Blk>> = vec![
        vec![Blk::Hole; blocks],
        vec![Blk::Tbz; blocks],
        vec![Blk::Ready; blocks],
    ];
    for round in 0..24 {
        let ctx = format!("seed {seed}, batch {round}");
        // Unsorted, possibly overlapping segments over all three files.
        let nseg = rng.gen_range(1..12);
        let segs: Vec<(usize, u64, Vec<u8>)> = (0..nseg)
            .map(|k| {
                let f = rng.gen_range(0..3);
                let len = if rng.gen_bool(0.3) {
                    rng.gen_range(1..300_000)
                } else {
                    rng.gen_range(1..9) * 512
                };
                let off = rng.gen_range(0..FILE - len as u64);
                let fill = (round * 16 + k) as u8 | 1;
                (f, off, (0..len).map(|i| fill ^ (i as u8 & 0xf0)).collect())
            })
            .collect();
        let mut dependent = BTreeSet::new();
        for (f, off, data) in &segs {
            for b in off / FILE_BLOCK..=(off + data.len() as u64 - 1) / FILE_BLOCK {
                if state[*f][b as usize] != Blk::Ready {
                    dependent.insert((*f, b));
                }
            }
        }
        for (mode, (ds, inos)) in stores.iter().enumerate() {
            let c0 = ds.stats.commits.load(Ordering::Relaxed);
            if mode == 2 {
                for (f, off, data) in &segs {
                    ds.write(inos[*f], *off, data).unwrap();
                }
                continue;
            }
            let ws: Vec<WriteSeg<'_>> = segs
                .iter()
                .map(|(f, off, data)| WriteSeg {
                    ino: inos[*f],
                    offset: *off,
                    data,
                })
                .collect();
            ds.write_batch(&ws).unwrap();
            let commits = ds.stats.commits.load(Ordering::Relaxed) - c0;
            let want = if mode == 0 {
                u64::from(!dependent.is_empty())
            } else {
                dependent.len() as u64
            };
            assert_eq!(
                commits,
                want,
                "{ctx}: mode {mode}, {} dependent groups",
                dependent.len()
            );
        }
        for &(f, b) in &dependent {
            state[f][b as usize] = Blk::Ready;
        }
        // Identical contents and block counts in all three.
        for f in 0..3 {
            let mut contents = Vec::new();
            for (ds, inos) in &stores {
                let mut buf = vec![0u8; FILE as usize];
                ds.read(inos[f], 0, &mut buf).unwrap();
                contents.push((buf, ds.stat(inos[f]).unwrap().allocated));
            }
            assert!(
                contents[0].0 == contents[1].0,
                "{ctx}: file {f}: batched != unbatched"
            );
            assert!(
                contents[0].0 == contents[2].0,
                "{ctx}: file {f}: batched != naive"
            );
            assert_eq!(contents[0].1, contents[1].1, "{ctx}");
            assert_eq!(contents[0].1, contents[2].1, "{ctx}");
        }
    }
    for (ds, _) in &stores {
        ds.unmount().unwrap();
        let r = fsck(&**ds.device()).unwrap();
        assert!(r.clean(), "{:?}", r.problems);
    }
}
