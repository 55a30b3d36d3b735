//! Supplementary groups of a (host) uid, from an administrator-configured group file.
//!
//! FUSE requests carry only uid, gid and pid, never supplementary groups, so the server needs
//! its own source. Format, as `/etc/group`, one group per line:
//!
//! ```text
//! name:password:gid:member1,member2,...
//! ```
//!
//! A member is a user name, resolved through the optional passwd-format file
//! (`name:password:uid:gid:gecos:home:shell`), or else a decimal uid. As with `getgrouplist`,
//! a user's primary gid from the passwd file is one of its groups too. Blank lines and lines
//! starting with `#` are ignored; any other line that does not parse is skipped and counted
//! (never a panic). Members that resolve to nothing are counted too.
//!
//! # Freshness
//!
//! Both files are indexed whole (uid → sorted groups). At most once per `ttl` a lookup checks
//! the files' identity (device, inode, length, mtime, ctime); when that changed they are
//! re-read, and when the resulting index differs the `epoch` is bumped. So a membership change
//! is visible within `ttl` of being written, and profiles cached under the old epoch can no
//! longer be found. A file that cannot be read on refresh keeps the last good index (counted):
//! an unreadable file must not silently remove groups, because with ACLs a group membership can
//! *deny* (a matching group entry stops the fall-through to `other`).
//!
//! # Bounds
//!
//! Files larger than [`IDENTITY_FILE_SIZE_MAX_BYTES`], indexing more than
//! [`GROUPS_CACHED_UIDS_MAX`] uids, or giving a uid more than [`GROUPS_PER_UID_MAX`] groups are
//! refused as a whole, for the same reason (a truncated index could over-grant).

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;

/// Default lifetime of an answer: group-file changes show within 1 s, and the files are
/// stat()ed at most once a second whatever the request rate.
pub const GROUPS_TTL_DEFAULT: Duration = Duration::from_secs(1);

/// Largest group or passwd file accepted (16 MiB): an order of magnitude above a 100,000-user
/// directory export, small enough that a re-read cannot stall a reactor for long.
pub const IDENTITY_FILE_SIZE_MAX_BYTES: u64 = 16 << 20;

/// Most uids indexed (with at least one group). 1 Mi uids × a few groups stays well under
/// 100 MiB, and no share served by one file server has more users.
pub const GROUPS_CACHED_UIDS_MAX: usize = 1 << 20;

/// Most groups per uid: Linux's `NGROUPS_MAX` (65,536); a kernel could not hold more.
pub const GROUPS_PER_UID_MAX: usize = 65_536;

/// Why the group source could not be (re)loaded.
#[derive(Debug, Error)]
pub enum IdentityError {
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A file is larger than [`IDENTITY_FILE_SIZE_MAX_BYTES`].
    #[error("{path} is {size_bytes} bytes, more than the limit")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size_bytes: u64,
    },
    /// A file is not UTF-8.
    #[error("{path} is not UTF-8 text")]
    NotText {
        /// The file.
        path: PathBuf,
    },
    /// The files give more than [`GROUPS_CACHED_UIDS_MAX`] uids groups.
    #[error("the group file gives groups to more than {GROUPS_CACHED_UIDS_MAX} uids")]
    TooManyUids,
    /// Some uid would have more than [`GROUPS_PER_UID_MAX`] groups.
    #[error("uid {uid} would have more than {GROUPS_PER_UID_MAX} groups")]
    TooManyGroups {
        /// The uid.
        uid: u32,
    },
}

/// A uid's supplementary groups and the epoch they belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Groups {
    /// Sorted, without duplicates; empty for a uid the files do not know.
    pub ids: Arc<[u32]>,
    /// Changes whenever any membership changes; part of every cached profile's key.
    pub epoch: u64,
}

/// Counters of a [`GroupSource`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupSourceStats {
    /// Current epoch.
    pub epoch: u64,
    /// uids with at least one group.
    pub uids_indexed: u64,
    /// Lines skipped as malformed in the last load (group and passwd files).
    pub malformed_lines: u64,
    /// Group members that named no known user in the last load.
    pub unresolved_members: u64,
    /// Successful re-reads after the first load.
    pub reloads: u64,
    /// Re-reads that failed (the previous index was kept).
    pub reload_errors: u64,
}

/// Groups from a group file (and optional passwd file). Thread-safe; see the module docs.
#[derive(Debug)]
pub struct GroupSource {
    group_path: PathBuf,
    passwd_path: Option<PathBuf>,
    ttl: Duration,
    state: Mutex<SourceState>,
}

#[derive(Debug)]
struct SourceState {
    index: HashMap<u32, Arc<[u32]>>,
    empty: Arc<[u32]>,
    stamps: (FileStamp, Option<FileStamp>),
    checked_at: Instant,
    stats: GroupSourceStats,
}

/// What identifies a file's content version without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len_bytes: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

/// Result of parsing the files: uid → sorted, deduplicated groups, plus counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupTable {
    /// uid → groups (sorted, no duplicates).
    pub by_uid: HashMap<u32, Vec<u32>>,
    /// Lines skipped as malformed.
    pub malformed_lines: u64,
    /// Members naming no known user.
    pub unresolved_members: u64,
}

/// Parsed passwd file: names to uids, and each uid's primary gid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PasswdTable {
    /// User name → uid (first line wins, as in `getpwnam`).
    pub uid_by_name: HashMap<String, u32>,
    /// uid → primary gid (first line wins, as in `getpwuid`).
    pub gid_by_uid: HashMap<u32, u32>,
    /// Lines skipped as malformed.
    pub malformed_lines: u64,
}

impl GroupSource {
    /// Loads the files now; fails if they cannot be loaded (there is no previous index to keep).
    pub fn new(
        group_path: impl Into<PathBuf>,
        passwd_path: Option<PathBuf>,
        ttl: Duration,
    ) -> Result<GroupSource, IdentityError> {
        let group_path = group_path.into();
        let stamps = read_stamps(&group_path, passwd_path.as_deref())?;
        let table = load(&group_path, passwd_path.as_deref())?;
        let mut stats = GroupSourceStats {
            epoch: 1,
            ..GroupSourceStats::default()
        };
        let index = build_index(table, &mut stats);
        let state = SourceState {
            index,
            empty: Arc::from(Vec::new()),
            stamps,
            checked_at: Instant::now(),
            stats,
        };
        Ok(GroupSource {
            group_path,
            passwd_path,
            ttl,
            state: Mutex::new(state),
        })
    }

    /// The groups of `uid`, at most `ttl` stale at `now`. Allocates nothing unless the files
    /// are due for a check and changed.
    pub fn groups_of(&self, uid: u32, now: Instant) -> Groups {
        let mut state = self.lock();
        if now.saturating_duration_since(state.checked_at) >= self.ttl {
            state.checked_at = now;
            self.refresh(&mut state);
        }
        let ids = state.index.get(&uid).unwrap_or(&state.empty);
        Groups {
            ids: Arc::clone(ids),
            epoch: state.stats.epoch,
        }
    }

    /// The counters.
    pub fn stats(&self) -> GroupSourceStats {
        self.lock().stats
    }

    /// Re-reads the files if their stamps changed; bumps the epoch if the index did.
    fn refresh(&self, state: &mut SourceState) {
        let stamps = match read_stamps(&self.group_path, self.passwd_path.as_deref()) {
            Ok(stamps) => stamps,
            Err(_) => {
                state.stats.reload_errors += 1;
                return;
            }
        };
        if stamps == state.stamps {
            return;
        }
        let table = match load(&self.group_path, self.passwd_path.as_deref()) {
            Ok(table) => table,
            Err(_) => {
                state.stats.reload_errors += 1;
                return;
            }
        };
        let mut stats = state.stats;
        let index = build_index(table, &mut stats);
        if index != state.index {
            stats.epoch += 1;
            state.index = index;
        }
        stats.reloads += 1;
        state.stats = stats;
        state.stamps = stamps;
    }

    fn lock(&self) -> MutexGuard<'_, SourceState> {
        // The state is replaced whole, never left half-updated, so a poisoned lock is safe.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Parses a passwd-format file (`name:password:uid:gid:gecos:home:shell`).
pub fn parse_passwd(text: &str) -> PasswdTable {
    let mut table = PasswdTable::default();
    for line in text.lines() {
        if is_ignored(line) {
            continue;
        }
        let fields: Vec<&str> = line.split(':').collect();
        let parsed = match fields.as_slice() {
            [name, _, uid, gid, _, _, _] if !name.is_empty() => {
                parse_id(uid).zip(parse_id(gid)).map(|ids| (*name, ids))
            }
            _ => None,
        };
        let Some((name, (uid, gid))) = parsed else {
            table.malformed_lines += 1;
            continue;
        };
        table.uid_by_name.entry(name.to_owned()).or_insert(uid);
        table.gid_by_uid.entry(uid).or_insert(gid);
    }
    table
}

/// Parses a group file (`name:password:gid:members`) against a passwd table; every uid the
/// passwd table knows also gets its primary gid.
pub fn parse_group(text: &str, passwd: &PasswdTable) -> GroupTable {
    let mut table = GroupTable {
        malformed_lines: passwd.malformed_lines,
        ..GroupTable::default()
    };
    for (&uid, &gid) in &passwd.gid_by_uid {
        table.by_uid.entry(uid).or_default().push(gid);
    }
    for line in text.lines() {
        if is_ignored(line) {
            continue;
        }
        let parsed = match line.split(':').collect::<Vec<_>>().as_slice() {
            [name, _, gid, members] if !name.is_empty() => parse_id(gid).map(|gid| (gid, *members)),
            _ => None,
        };
        let Some((gid, members)) = parsed else {
            table.malformed_lines += 1;
            continue;
        };
        for member in members
            .split(',')
            .map(str::trim)
            .filter(|member| !member.is_empty())
        {
            // A passwd name wins over reading the member as a number, as name lookup does.
            let uid = passwd
                .uid_by_name
                .get(member)
                .copied()
                .or_else(|| parse_id(member));
            match uid {
                Some(uid) => table.by_uid.entry(uid).or_default().push(gid),
                None => table.unresolved_members += 1,
            }
        }
    }
    for groups in table.by_uid.values_mut() {
        groups.sort_unstable();
        groups.dedup();
    }
    table
}

/// A decimal id; `u32::MAX` is `(uid_t)-1`, which names nobody.
fn parse_id(text: &str) -> Option<u32> {
    let valid = !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit());
    valid
        .then(|| text.parse().ok())
        .flatten()
        .filter(|&id| id != u32::MAX)
}

fn is_ignored(line: &str) -> bool {
    let line = line.trim();
    line.is_empty() || line.starts_with('#')
}

fn read_stamps(
    group_path: &Path,
    passwd_path: Option<&Path>,
) -> Result<(FileStamp, Option<FileStamp>), IdentityError> {
    Ok((stamp(group_path)?, passwd_path.map(stamp).transpose()?))
}

fn stamp(path: &Path) -> Result<FileStamp, IdentityError> {
    let meta = fs::metadata(path).map_err(|source| read_error(path, source))?;
    let nanos = |seconds: i64, nanoseconds: i64| {
        i128::from(seconds) * 1_000_000_000 + i128::from(nanoseconds)
    };
    Ok(FileStamp {
        dev: meta.dev(),
        ino: meta.ino(),
        len_bytes: meta.len(),
        mtime_ns: nanos(meta.mtime(), meta.mtime_nsec()),
        ctime_ns: nanos(meta.ctime(), meta.ctime_nsec()),
    })
}

fn load(group_path: &Path, passwd_path: Option<&Path>) -> Result<GroupTable, IdentityError> {
    let passwd = match passwd_path {
        Some(path) => parse_passwd(&read_text(path)?),
        None => PasswdTable::default(),
    };
    let table = parse_group(&read_text(group_path)?, &passwd);
    if table.by_uid.len() > GROUPS_CACHED_UIDS_MAX {
        return Err(IdentityError::TooManyUids);
    }
    if let Some((&uid, _)) = table
        .by_uid
        .iter()
        .find(|(_, groups)| groups.len() > GROUPS_PER_UID_MAX)
    {
        return Err(IdentityError::TooManyGroups { uid });
    }
    Ok(table)
}

fn read_text(path: &Path) -> Result<String, IdentityError> {
    use std::io::Read;
    let file = fs::File::open(path).map_err(|source| read_error(path, source))?;
    let mut bytes = Vec::new();
    // Read one byte past the limit to tell "at the limit" from "over it" without trusting a
    // stat that may be racing a writer.
    file.take(IDENTITY_FILE_SIZE_MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| read_error(path, source))?;
    let size_bytes = bytes.len() as u64;
    if size_bytes > IDENTITY_FILE_SIZE_MAX_BYTES {
        return Err(IdentityError::TooLarge {
            path: path.to_owned(),
            size_bytes,
        });
    }
    String::from_utf8(bytes).map_err(|_| IdentityError::NotText {
        path: path.to_owned(),
    })
}

fn read_error(path: &Path, source: std::io::Error) -> IdentityError {
    IdentityError::Read {
        path: path.to_owned(),
        source,
    }
}

fn build_index(table: GroupTable, stats: &mut GroupSourceStats) -> HashMap<u32, Arc<[u32]>> {
    stats.malformed_lines = table.malformed_lines;
    stats.unresolved_members = table.unresolved_members;
    let index: HashMap<u32, Arc<[u32]>> = table
        .by_uid
        .into_iter()
        .map(|(uid, groups)| (uid, Arc::from(groups)))
        .collect();
    stats.uids_indexed = index.len() as u64;
    index
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use proptest::prelude::*;

    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
                          alice:x:1000:1000::/home/alice:/bin/sh\n\
                          bob:x:1001:100::/home/bob:/bin/sh\n\
                          broken line\n";
    const GROUP: &str = "# comment\n\
                         \n\
                         wheel:x:10:alice,root\n\
                         staff:x:50:alice,bob,2000,nosuchuser\n\
                         staff2:x:50:bob\n\
                         bad:x:notanumber:alice\n\
                         short:x:60\n\
                         empty:x:70:\n";

    #[test]
    fn parses_groups_with_passwd_names_and_numeric_members() {
        let table = parse_group(GROUP, &parse_passwd(PASSWD));
        assert_eq!(table.by_uid[&1000], vec![10, 50, 1000]);
        assert_eq!(
            table.by_uid[&1001],
            vec![50, 100],
            "duplicates removed, primary gid added"
        );
        assert_eq!(table.by_uid[&0], vec![0, 10]);
        assert_eq!(table.by_uid[&2000], vec![50]);
        assert_eq!(table.malformed_lines, 3, "one passwd and two group lines");
        assert_eq!(table.unresolved_members, 1);
    }

    fn write(path: &Path, text: &str) {
        let mut file = fs::File::create(path).unwrap();
        file.write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn reloads_within_ttl_and_bumps_epoch_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let group = dir.path().join("group");
        let passwd = dir.path().join("passwd");
        write(&group, GROUP);
        write(&passwd, PASSWD);
        let ttl = Duration::from_secs(1);
        let source = GroupSource::new(&group, Some(passwd.clone()), ttl).unwrap();
        let t0 = Instant::now();
        let before = source.groups_of(1001, t0);
        assert_eq!(&*before.ids, &[50, 100]);
        assert_eq!(source.groups_of(4242, t0).ids.len(), 0);

        write(&group, &format!("{GROUP}extra:x:80:bob\n"));
        // Within the ttl nothing is re-checked.
        let soon = source.groups_of(1001, t0 + Duration::from_millis(10));
        assert_eq!(soon, before);
        let later = source.groups_of(1001, t0 + Duration::from_secs(2));
        assert_eq!(&*later.ids, &[50, 80, 100]);
        assert!(later.epoch > before.epoch);

        // A rewrite with the same memberships re-reads but keeps the epoch.
        write(&group, &format!("{GROUP}extra:x:80:bob\n\n"));
        let same = source.groups_of(1001, t0 + Duration::from_secs(4));
        assert_eq!(same, later);
        assert_eq!(source.stats().reloads, 2);

        // An unreadable file keeps the last good index.
        fs::remove_file(&group).unwrap();
        let kept = source.groups_of(1001, t0 + Duration::from_secs(6));
        assert_eq!(kept, later);
        assert_eq!(source.stats().reload_errors, 1);
    }

    #[test]
    fn missing_file_fails_to_load() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("group");
        assert!(matches!(
            GroupSource::new(&missing, None, GROUPS_TTL_DEFAULT),
            Err(IdentityError::Read { .. })
        ));
    }

    proptest! {
        #[test]
        fn parser_never_panics(group in "\\PC*", passwd in "\\PC*") {
            let table = parse_group(&group, &parse_passwd(&passwd));
            for groups in table.by_uid.values() {
                prop_assert!(groups.windows(2).all(|pair| pair[0] < pair[1]));
            }
        }

        #[test]
        fn parser_never_panics_on_colon_soup(text in "[a-z0-9:,#\n ]{0,200}") {
            let _ = parse_group(&text, &parse_passwd(&text));
        }

        #[test]
        fn generated_files_parse_to_their_memberships(
            members_by_gid in proptest::collection::btree_map(
                0u32..1000,
                proptest::collection::btree_set(0u32..50, 0..6),
                0..20,
            ),
            garbage in proptest::collection::vec("[a-z:]{1,12}", 0..5),
        ) {
            // Garbage lines have no digits, so no gid: each must be skipped and counted.
            let mut text = String::new();
            for (i, (gid, uids)) in members_by_gid.iter().enumerate() {
                let members: Vec<String> = uids.iter().map(u32::to_string).collect();
                text.push_str(&format!("g{gid}:x:{gid}:{}\n", members.join(",")));
                if let Some(junk) = garbage.get(i) {
                    text.push_str(junk);
                    text.push('\n');
                }
            }
            let table = parse_group(&text, &PasswdTable::default());
            let mut expected: HashMap<u32, Vec<u32>> = HashMap::new();
            for (&gid, uids) in &members_by_gid {
                for &uid in uids {
                    expected.entry(uid).or_default().push(gid);
                }
            }
            prop_assert_eq!(table.by_uid, expected);
            let junk_lines = garbage.len().min(members_by_gid.len());
            prop_assert_eq!(table.malformed_lines, junk_lines as u64);
            prop_assert_eq!(table.unresolved_members, 0);
        }
    }
}
