//! A share's settings as given on stratad's command line, and its construction.
//!
//! `--share socket=PATH,dir=NAME[,tag=TAG][,queues=N][,uid-map=MAP][,gid-map=MAP]
//! [,readonly=on][,groups=FILE][,passwd=FILE][,cache=never|auto|always][,perm-cache=N]
//! [,stale-ms=MS][,quota-bytes=SIZE][,quota-inodes=N]`
//!
//! - `dir`: a directory of the datastore (created root-owned 0755 when missing).
//! - `tag`: the mount tag (default: `dir`'s last component), at most 36 bytes.
//! - `uid-map`/`gid-map`: `GUEST:HOST:COUNT[;...]`; ids outside the map are refused (EPERM).
//! - `groups`/`passwd`: the group source for callers' supplementary groups, /etc/group and
//!   /etc/passwd formats; re-read when changed, cached per uid for at most the stale bound.
//! - `cache`: how long the guest caches entries and attributes (0 s, 1 s, a day).
//! - `perm-cache`: capacity of the permission-profile cache; `stale-ms`: its staleness bound.
//! - `quota-bytes`: most bytes of data blocks the share's files may hold (K/M/G/T suffixes,
//!   a multiple of 512); `quota-inodes`: most files, directories and links below its root.
//!   Past them requests fail with EDQUOT; statfs shows the limits (see [`crate::quota`]).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use posix_perm::cache::{PermCache, PermCacheConfig, PermCacheStats};
use posix_perm::identity::GroupSource;
use posix_perm::idmap::IdMap;
use thiserror::Error;
use vmfs::fs::Datastore;

use crate::fs::{CachePolicy, ShareSettings, VmfsFs};
use crate::handler::ShareHandler;
use crate::quota::QuotaLimits;

/// Request queues of a share unless `queues=` says otherwise.
pub const SHARE_QUEUES_DEFAULT: u16 = 1;

/// Errors of share set-up.
#[derive(Debug, Error)]
pub enum ShareError {
    /// A bad `--share` option.
    #[error("--share: {0}")]
    Spec(String),
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

/// A parsed `--share` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareSpec {
    /// vhost-user socket.
    pub socket: PathBuf,
    /// Datastore directory.
    pub dir: String,
    /// Mount tag.
    pub tag: String,
    /// Request queues.
    pub queues: u16,
    /// uid map (empty: identity).
    pub uid_map: String,
    /// gid map (empty: identity).
    pub gid_map: String,
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

fn bool_opt(k: &str, v: &str) -> Result<bool, ShareError> {
    match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(ShareError::Spec(format!(
            "{k}: expected on or off, got {v:?}"
        ))),
    }
}

/// Parses a `--share` value (pure; see the module doc for the syntax).
pub fn parse_share_spec(s: &str) -> Result<ShareSpec, ShareError> {
    let bad = |m: String| ShareError::Spec(m);
    let mut socket = None;
    let mut dir = None;
    let mut tag = None;
    let mut spec = ShareSpec {
        socket: PathBuf::new(),
        dir: String::new(),
        tag: String::new(),
        queues: SHARE_QUEUES_DEFAULT,
        uid_map: String::new(),
        gid_map: String::new(),
        readonly: false,
        groups: None,
        passwd: None,
        cache: CachePolicy::Auto,
        perm_cache: PermCacheConfig::default().capacity,
        stale: PermCacheConfig::default().stale_bound,
        quota: QuotaLimits::default(),
    };
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| bad(format!("{part:?}: expected key=value")))?;
        match k {
            "socket" => socket = Some(PathBuf::from(v)),
            "dir" => dir = Some(v.to_string()),
            "tag" => tag = Some(v.to_string()),
            "queues" => {
                spec.queues = v
                    .parse()
                    .ok()
                    .filter(|q| (1..=dataplane::vhost_fs::REQUEST_QUEUES_MAX).contains(q))
                    .ok_or_else(|| {
                        bad(format!(
                            "queues: 1..={} expected, got {v:?}",
                            dataplane::vhost_fs::REQUEST_QUEUES_MAX
                        ))
                    })?
            }
            "uid-map" => spec.uid_map = v.to_string(),
            "gid-map" => spec.gid_map = v.to_string(),
            "readonly" => spec.readonly = bool_opt(k, v)?,
            "groups" => spec.groups = Some(PathBuf::from(v)),
            "passwd" => spec.passwd = Some(PathBuf::from(v)),
            "cache" => {
                spec.cache = CachePolicy::parse(v)
                    .ok_or_else(|| bad(format!("cache: never, auto or always, got {v:?}")))?
            }
            "perm-cache" => {
                spec.perm_cache = v
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| bad(format!("perm-cache: a positive count, got {v:?}")))?
            }
            "stale-ms" => {
                let ms: u64 = v
                    .parse()
                    .map_err(|_| bad(format!("stale-ms: milliseconds, got {v:?}")))?;
                spec.stale = Duration::from_millis(ms);
            }
            "quota-bytes" => {
                let n = vmfs::admin::parse_size(v)
                    .map_err(|why| bad(format!("quota-bytes: {why}, got {v:?}")))?;
                spec.quota.bytes = Some(n);
            }
            "quota-inodes" => {
                spec.quota.inodes = Some(
                    v.parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| bad(format!("quota-inodes: a positive count, got {v:?}")))?,
                )
            }
            _ => return Err(bad(format!("unknown key {k:?}"))),
        }
    }
    spec.socket = socket.ok_or_else(|| bad("socket= is required".into()))?;
    let dir = dir.ok_or_else(|| bad("dir= is required".into()))?;
    let trimmed = dir.trim_matches('/');
    if trimmed.is_empty()
        || trimmed
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == ".." || c.len() > vmfs::format::NAME_MAX)
    {
        return Err(bad(format!("dir: a datastore directory path, got {dir:?}")));
    }
    spec.dir = trimmed.to_string();
    let tag = tag.unwrap_or_else(|| {
        let last = trimmed.rsplit('/').next().unwrap_or(trimmed);
        last.chars().take(dataplane::vhost_fs::TAG_BYTES).collect()
    });
    if tag.is_empty() || tag.len() > dataplane::vhost_fs::TAG_BYTES {
        return Err(bad(format!(
            "tag: 1..={} bytes, got {tag:?}",
            dataplane::vhost_fs::TAG_BYTES
        )));
    }
    spec.tag = tag;
    Ok(spec)
}

/// A share being served: its handler (for the vhost-user device) and its counters.
#[derive(Debug, Clone)]
pub struct Share {
    /// The parsed option.
    pub spec: ShareSpec,
    /// The FUSE request handler.
    pub handler: Arc<ShareHandler>,
}

/// Counters of one share, for `stats`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ShareStats {
    /// Permission-profile cache.
    pub perm: PermCacheStats,
    /// FUSE requests served.
    pub requests: u64,
    /// Requests that could not be decoded.
    pub malformed: u64,
    /// Panics caught in the protocol layer.
    pub panics: u64,
    /// Requests refused by a server-side permission check.
    pub denied: u64,
    /// Requests refused for an unmapped uid/gid.
    pub unmapped_ids: u64,
    /// Open handles.
    pub handles: u64,
    /// Requests naming node ids never looked up.
    pub unknown_nodes: u64,
    /// Bytes of data blocks the share holds (counted only with a quota).
    pub quota_bytes_used: u64,
    /// Inodes below the share's root (counted only with a quota).
    pub quota_inodes_used: u64,
}

impl Share {
    /// Opens (creating if needed) the share's directory in `ds`.
    pub fn open(ds: Arc<Datastore>, spec: ShareSpec) -> Result<Share, ShareError> {
        let bad = |m: String| ShareError::Spec(m);
        let uid_map = IdMap::parse(&spec.uid_map).map_err(|e| bad(format!("uid-map: {e}")))?;
        let gid_map = IdMap::parse(&spec.gid_map).map_err(|e| bad(format!("gid-map: {e}")))?;
        let groups = match &spec.groups {
            Some(g) => Some(
                GroupSource::new(g.clone(), spec.passwd.clone(), spec.stale)
                    .map_err(|e| bad(format!("groups: {e}")))?,
            ),
            None => None,
        };
        let perm = PermCache::new(PermCacheConfig {
            capacity: spec.perm_cache,
            stale_bound: spec.stale,
            ..PermCacheConfig::default()
        })
        .map_err(|e| bad(format!("perm-cache: {e}")))?;
        let settings = ShareSettings {
            uid_map,
            gid_map,
            readonly: spec.readonly,
            groups,
            cache: spec.cache,
            perm,
            quota: spec.quota,
        };
        let fs = VmfsFs::new(ds, &spec.dir, settings)?;
        Ok(Share {
            spec,
            handler: Arc::new(ShareHandler::new(fs)),
        })
    }

    /// Current counters.
    pub fn stats(&self) -> ShareStats {
        let fs = self.handler.fs();
        let c = fs.counters();
        let h = self.handler.counters();
        let (quota_bytes_used, quota_inodes_used) = fs.quota().used();
        ShareStats {
            perm: fs.settings().perm.stats(),
            requests: h.requests.load(Ordering::Relaxed),
            malformed: h.malformed.load(Ordering::Relaxed),
            panics: h.panics.load(Ordering::Relaxed),
            denied: c.denied.load(Ordering::Relaxed),
            unmapped_ids: c.unmapped_ids.load(Ordering::Relaxed),
            handles: c.handles.load(Ordering::Relaxed),
            unknown_nodes: c.unknown_nodes.load(Ordering::Relaxed),
            quota_bytes_used,
            quota_inodes_used,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_minimal_and_full_specs() {
        let s = parse_share_spec("socket=/tmp/fs.sock,dir=share0").unwrap();
        assert_eq!(s.socket, PathBuf::from("/tmp/fs.sock"));
        assert_eq!(s.dir, "share0");
        assert_eq!(s.tag, "share0");
        assert_eq!(s.cache, CachePolicy::Auto);
        assert!(!s.readonly);
        let s = parse_share_spec(
            "socket=s,dir=/vms/a/,tag=t,queues=2,uid-map=0:1000:10,readonly=on,cache=never,stale-ms=50",
        )
        .unwrap();
        assert_eq!(
            (s.dir.as_str(), s.tag.as_str(), s.queues),
            ("vms/a", "t", 2)
        );
        assert!(s.readonly);
        assert_eq!(s.stale, Duration::from_millis(50));
        assert_eq!(s.uid_map, "0:1000:10");
        assert_eq!(s.quota, QuotaLimits::default());
        let s = parse_share_spec("socket=s,dir=q,quota-bytes=10G,quota-inodes=1000").unwrap();
        assert_eq!(
            s.quota,
            QuotaLimits {
                bytes: Some(10 << 30),
                inodes: Some(1000)
            }
        );
    }

    #[test]
    fn rejects_bad_specs() {
        for bad in [
            "dir=x",
            "socket=s",
            "socket=s,dir=..",
            "socket=s,dir=a/../b",
            "socket=s,dir=x,queues=0",
            "socket=s,dir=x,cache=sometimes",
            "socket=s,dir=x,bogus=1",
            "socket=s,dir=x,readonly=maybe",
            "socket=s,dir=x,tag=0123456789012345678901234567890123456789",
            "socket=s,dir=x,quota-bytes=0",
            "socket=s,dir=x,quota-bytes=100",
            "socket=s,dir=x,quota-bytes=lots",
            "socket=s,dir=x,quota-bytes=99999999999T",
            "socket=s,dir=x,quota-inodes=0",
            "socket=s,dir=x,quota-inodes=-1",
        ] {
            assert!(parse_share_spec(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn parser_never_panics(s in ".{0,200}") {
            let _ = parse_share_spec(&s);
        }
    }
}
