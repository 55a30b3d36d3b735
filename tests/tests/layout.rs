//! The workspace's layout rules, checked against the tree (issue 13):
//! - the README's "Workspace layout" table names every workspace member, and every path it
//!   names exists;
//! - no source file holds more than `NON_TEST_LINES_MAX` lines of non-test code unless its
//!   opening comment says why (the phrase `over 1000 lines`). Test code is not counted: files
//!   named `*_tests.rs` or under a `tests/` or `*_tests/` folder, and whatever follows a
//!   file's first `#[cfg(test)]`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// A file longer than this is hard to hold in one's head; split it by concept.
const NON_TEST_LINES_MAX: usize = 1000;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace root")
        .to_path_buf()
}

/// The `members = [...]` of the workspace's Cargo.toml.
fn members(root: &Path) -> BTreeSet<String> {
    let toml = std::fs::read_to_string(root.join("Cargo.toml")).expect("Cargo.toml");
    let start = toml.find("members = [").expect("a members list") + "members = [".len();
    let end = start + toml[start..].find(']').expect("the list ends");
    toml[start..end]
        .split(',')
        .map(|m| m.trim().trim_matches('"').to_string())
        .filter(|m| !m.is_empty())
        .collect()
}

/// The paths in the first column of the README's "Workspace layout" table (`` `path/` ``).
fn readme_paths(root: &Path) -> BTreeSet<String> {
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let table = readme
        .split("### Workspace layout")
        .nth(1)
        .expect("a Workspace layout section");
    let mut paths = BTreeSet::new();
    for line in table.lines().skip_while(|l| !l.starts_with('|')) {
        if !line.starts_with('|') {
            break;
        }
        let first = line.split('|').nth(1).unwrap_or("").trim();
        for cell in first.split(", ") {
            let p = cell.trim().trim_matches('`');
            if p.ends_with('/') {
                paths.insert(p.trim_end_matches('/').to_string());
            }
        }
    }
    paths
}

#[test]
fn readme_table_matches_the_workspace() {
    let root = root();
    let listed = readme_paths(&root);
    let missing: Vec<_> = members(&root)
        .into_iter()
        .filter(|m| !listed.contains(m))
        .collect();
    assert!(
        missing.is_empty(),
        "workspace members not in the README's Workspace layout table: {missing:?}"
    );
    let absent: Vec<_> = listed.iter().filter(|p| !root.join(p).is_dir()).collect();
    assert!(
        absent.is_empty(),
        "README table rows for folders that do not exist: {absent:?}"
    );
}

fn is_test_path(rel: &Path) -> bool {
    rel.components().any(|c| {
        let c = c.as_os_str().to_string_lossy();
        c == "tests" || c.ends_with("_tests") || c == "benches" || c == "examples"
    }) || rel.file_name().is_some_and(|n| {
        // `mod tests;` in a file of its own (`tests.rs`) or a `*_tests.rs` beside the code.
        let n = n.to_string_lossy();
        n == "tests.rs" || n.ends_with("_tests.rs")
    })
}

fn rust_sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if p.is_dir() {
            if name != "target" && !name.starts_with('.') && name != "corpus" {
                rust_sources(&p, out);
            }
        } else if name.ends_with(".rs") {
            out.push(p);
        }
    }
}

#[test]
fn no_long_source_file_without_a_reason() {
    let root = root();
    let mut files = Vec::new();
    rust_sources(&root, &mut files);
    assert!(files.len() > 50, "found the sources ({})", files.len());
    let mut long = Vec::new();
    for f in files {
        let rel = f.strip_prefix(&root).expect("under the root");
        if is_test_path(rel) {
            continue;
        }
        let text = std::fs::read_to_string(&f).expect("readable source");
        let code = text
            .lines()
            .take_while(|l| !l.starts_with("#[cfg(test)]"))
            .count();
        let opening: String = text
            .lines()
            .take_while(|l| l.starts_with("//"))
            .collect::<Vec<_>>()
            .join(" ");
        if code > NON_TEST_LINES_MAX && !opening.contains("over 1000 lines") {
            long.push(format!("{} ({code} lines)", rel.display()));
        }
    }
    assert!(
        long.is_empty(),
        "files over {NON_TEST_LINES_MAX} lines of non-test code without a reason in their \
         opening comment: {long:?}"
    );
}
