//! What a share is and how it is served, in types — the bottom of the crate, used by
//! everything above it and using nothing of it but [`crate::quota::QuotaLimits`].
//!
//! - [`ShareSpec`]: a share as the daemon describes it (checked values, no strings to
//!   parse: stratad's spec parser builds it from `--share`).
//! - [`ShareSettings`]: what the file system consults per request, built from a spec when
//!   the share opens (id maps, group source, permission cache, cache policy, quota limits).
//! - [`ShareError`]: why a share could not be set up.

use std::path::PathBuf;
use std::time::Duration;

use posix_perm::cache::PermCache;
use posix_perm::identity::GroupSource;
use posix_perm::idmap::IdMap;
use thiserror::Error;

use crate::quota::QuotaLimits;

/// How long the guest may cache entries and attributes (virtiofsd's `--cache` modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CachePolicy {
    /// 0 s: every access revalidates (revocations apply at once in the guest).
    Never,
    /// 1 s: close-to-open; the default, and the guest-side staleness bound.
    Auto,
    /// 86 400 s: the guest keeps everything; revocations may take a day to reach it.
    Always,
}

impl CachePolicy {
    /// The entry and attribute timeout given to the guest.
    pub fn timeout(self) -> Duration {
        match self {
            Self::Never => Duration::ZERO,
            Self::Auto => Duration::from_secs(1),
            Self::Always => Duration::from_secs(86_400),
        }
    }
}

/// One share as the daemon describes it: its device (socket, tag, queues), its directory
/// and how it is served. Values are checked by whoever builds it (stratad's spec parser);
/// [`crate::share::Share::open`] checks what needs the system (group files, cache sizes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareSpec {
    /// vhost-user socket.
    pub socket: PathBuf,
    /// Datastore directory (relative to its root, no empty, `.` or `..` components).
    pub dir: String,
    /// Mount tag.
    pub tag: String,
    /// Request queues.
    pub queues: u16,
    /// Guest uid → datastore uid (identity when empty).
    pub uid_map: IdMap,
    /// Guest gid → datastore gid (identity when empty).
    pub gid_map: IdMap,
    /// Read-only share.
    pub readonly: bool,
    /// Group file.
    pub groups: Option<PathBuf>,
    /// Passwd file (resolves member names of the group file).
    pub passwd: Option<PathBuf>,
    /// Guest cache policy.
    pub cache: CachePolicy,
    /// Permission cache capacity (entries).
    pub perm_cache: usize,
    /// Staleness bound of cached profiles and group lists.
    pub stale: Duration,
    /// Space limits.
    pub quota: QuotaLimits,
}

/// What a share serves and how.
#[derive(Debug)]
pub struct ShareSettings {
    /// Guest uid → datastore uid.
    pub uid_map: IdMap,
    /// Guest gid → datastore gid.
    pub gid_map: IdMap,
    /// Refuse every change with EROFS.
    pub readonly: bool,
    /// Supplementary groups of callers (none without a group file).
    pub groups: Option<GroupSource>,
    /// Guest-side cache lifetime.
    pub cache: CachePolicy,
    /// The permission-profile cache.
    pub perm: PermCache,
    /// Space limits (none: unlimited, nothing counted).
    pub quota: QuotaLimits,
}

/// Errors of share set-up.
#[derive(Debug, Error)]
pub enum ShareError {
    /// A setting the system refused (group file, permission cache).
    #[error("share {dir}: {what}: {why}")]
    Setting {
        /// Directory.
        dir: String,
        /// The setting (its `--share` key).
        what: &'static str,
        /// Why.
        why: String,
    },
    /// The datastore refused.
    #[error("share {dir}: {source}")]
    Datastore {
        /// Directory.
        dir: String,
        /// Cause.
        source: vmfs::fs::FsError,
    },
    /// Opening a helper file failed.
    #[error("share: {0}")]
    Io(#[from] std::io::Error),
}
