//! `--share`: what it accepts ([`ShareArgs`]) and its conversion into the file server's
//! [`ShareSpec`].
//!
//! `socket=PATH,dir=NAME[,tag=TAG][,queues=N][,uid-map=MAP][,gid-map=MAP][,readonly=on]
//! [,groups=FILE][,passwd=FILE][,cache=never|auto|always][,perm-cache=N][,stale-ms=MS]
//! [,quota-bytes=SIZE][,quota-inodes=N]`
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
//!   Past them requests fail with EDQUOT; statfs shows the limits.

use std::path::PathBuf;
use std::time::Duration;

use dataplane::vhost_fs::{REQUEST_QUEUES_MAX, TAG_BYTES};
use file_server::quota::QuotaLimits;
use file_server::settings::{CachePolicy, ShareSpec};
use posix_perm::cache::PermCacheConfig;
use posix_perm::idmap::IdMap;
use serde::Deserialize;

use super::{keyvalue, Size, SpecError};

/// Request queues of a share unless `queues=` says otherwise.
pub const SHARE_QUEUES_DEFAULT: u16 = 1;

/// The `cache` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheArg {
    /// [`CachePolicy::Never`].
    Never,
    /// [`CachePolicy::Auto`].
    Auto,
    /// [`CachePolicy::Always`].
    Always,
}

/// The keys of `--share` (and of a share in JSON), as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ShareArgs {
    /// vhost-user socket.
    pub socket: PathBuf,
    /// Datastore directory.
    pub dir: String,
    /// Mount tag.
    pub tag: Option<String>,
    /// Request queues.
    pub queues: Option<u16>,
    /// uid map.
    pub uid_map: Option<String>,
    /// gid map.
    pub gid_map: Option<String>,
    /// Read-only share.
    pub readonly: Option<bool>,
    /// Group file.
    pub groups: Option<PathBuf>,
    /// Passwd file.
    pub passwd: Option<PathBuf>,
    /// Guest cache policy.
    pub cache: Option<CacheArg>,
    /// Permission cache capacity (entries).
    pub perm_cache: Option<usize>,
    /// Staleness bound of cached profiles and group lists, in milliseconds.
    pub stale_ms: Option<u64>,
    /// Byte limit.
    pub quota_bytes: Option<Size>,
    /// Inode limit.
    pub quota_inodes: Option<u64>,
}

/// Parses one `--share` value.
pub fn parse_share_spec(s: &str) -> Result<ShareSpec, SpecError> {
    ShareSpec::try_from(keyvalue::from_str::<ShareArgs>(s)?)
}

impl TryFrom<ShareArgs> for ShareSpec {
    type Error = SpecError;

    fn try_from(a: ShareArgs) -> Result<ShareSpec, SpecError> {
        if a.socket.as_os_str().is_empty() {
            return Err(SpecError::Missing("socket".into()));
        }
        let trimmed = a.dir.trim_matches('/');
        if trimmed.is_empty()
            || trimmed
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == ".." || c.len() > vmfs::format::NAME_MAX)
        {
            return Err(SpecError::bad(
                "dir",
                &a.dir,
                "a datastore directory path without empty, . or .. components",
            ));
        }
        let tag = a.tag.unwrap_or_else(|| {
            let last = trimmed.rsplit('/').next().unwrap_or(trimmed);
            last.chars().take(TAG_BYTES).collect()
        });
        if tag.is_empty() || tag.len() > TAG_BYTES {
            return Err(SpecError::bad(
                "tag",
                &tag,
                format!("1 to {TAG_BYTES} bytes"),
            ));
        }
        let queues = match a.queues {
            None => SHARE_QUEUES_DEFAULT,
            Some(q) if (1..=REQUEST_QUEUES_MAX).contains(&q) => q,
            Some(q) => {
                return Err(SpecError::bad(
                    "queues",
                    q,
                    format!("expected 1 to {REQUEST_QUEUES_MAX}"),
                ))
            }
        };
        let idmap = |key: &str, v: Option<String>| match v {
            None => Ok(IdMap::identity()),
            Some(v) => IdMap::parse(&v).map_err(|e| SpecError::bad(key, &v, e.to_string())),
        };
        let defaults = PermCacheConfig::default();
        let perm_cache = match a.perm_cache {
            None => defaults.capacity,
            Some(0) => return Err(SpecError::bad("perm-cache", 0, "a positive count")),
            Some(n) => n,
        };
        let quota_inodes = match a.quota_inodes {
            Some(0) => return Err(SpecError::bad("quota-inodes", 0, "a positive count")),
            n => n,
        };
        Ok(ShareSpec {
            socket: a.socket,
            dir: trimmed.to_string(),
            tag,
            queues,
            uid_map: idmap("uid-map", a.uid_map)?,
            gid_map: idmap("gid-map", a.gid_map)?,
            readonly: a.readonly.unwrap_or(false),
            groups: a.groups,
            passwd: a.passwd,
            cache: match a.cache.unwrap_or(CacheArg::Auto) {
                CacheArg::Never => CachePolicy::Never,
                CacheArg::Auto => CachePolicy::Auto,
                CacheArg::Always => CachePolicy::Always,
            },
            perm_cache,
            stale: a
                .stale_ms
                .map(Duration::from_millis)
                .unwrap_or(defaults.stale_bound),
            quota: QuotaLimits {
                bytes: a.quota_bytes.map(|s| s.0),
                inodes: quota_inodes,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use posix_perm::idmap::IdRange;
    use proptest::prelude::*;

    use super::*;
    use crate::spec::keyvalue::escape;

    /// The key=value form of `s`, every key written out.
    fn format(s: &ShareSpec) -> String {
        let mut out = format!(
            "socket={},dir={},tag={},queues={},uid-map={},gid-map={},readonly={},cache={},\
             perm-cache={},stale-ms={}",
            escape(&s.socket.to_string_lossy()),
            escape(&s.dir),
            escape(&s.tag),
            s.queues,
            s.uid_map,
            s.gid_map,
            if s.readonly { "on" } else { "off" },
            match s.cache {
                CachePolicy::Never => "never",
                CachePolicy::Auto => "auto",
                CachePolicy::Always => "always",
            },
            s.perm_cache,
            s.stale.as_millis(),
        );
        if let Some(g) = &s.groups {
            out += &format!(",groups={}", escape(&g.to_string_lossy()));
        }
        if let Some(p) = &s.passwd {
            out += &format!(",passwd={}", escape(&p.to_string_lossy()));
        }
        if let Some(b) = s.quota.bytes {
            out += &format!(",quota-bytes={b}");
        }
        if let Some(n) = s.quota.inodes {
            out += &format!(",quota-inodes={n}");
        }
        out
    }

    #[test]
    fn parses_minimal_and_full_specs() {
        let s = parse_share_spec("socket=/tmp/fs.sock,dir=share0").unwrap();
        assert_eq!(s.socket, PathBuf::from("/tmp/fs.sock"));
        assert_eq!(s.dir, "share0");
        assert_eq!(s.tag, "share0");
        assert_eq!(s.queues, SHARE_QUEUES_DEFAULT);
        assert_eq!(s.cache, CachePolicy::Auto);
        assert_eq!(s.perm_cache, PermCacheConfig::default().capacity);
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
        assert_eq!(s.uid_map, IdMap::parse("0:1000:10").unwrap());
        assert_eq!(s.gid_map, IdMap::identity());
        assert_eq!(s.quota, QuotaLimits::default());
        let s = parse_share_spec("socket=s,dir=q,quota-bytes=10G,quota-inodes=1000,").unwrap();
        assert_eq!(
            s.quota,
            QuotaLimits {
                bytes: Some(10 << 30),
                inodes: Some(1000)
            }
        );
        let s = parse_share_spec(
            "socket=/run/a,,b.sock,dir=x,uid-map=0:0:1001;2000:3000:5,groups=/etc/g,,1,passwd=/p",
        )
        .unwrap();
        assert_eq!(s.socket, PathBuf::from("/run/a,b.sock"));
        assert_eq!(s.groups, Some(PathBuf::from("/etc/g,1")));
        assert_eq!(s.passwd, Some(PathBuf::from("/p")));
        assert_eq!(s.uid_map.ranges().len(), 2);
    }

    #[test]
    fn rejects_bad_specs() {
        for (bad, key) in [
            ("dir=x", "socket"),
            ("socket=s", "dir"),
            ("socket=,dir=x", "socket"),
            ("socket=s,dir=..", "dir"),
            ("socket=s,dir=a/../b", "dir"),
            ("socket=s,dir=x,queues=0", "queues"),
            ("socket=s,dir=x,queues=9", "queues"),
            ("socket=s,dir=x,cache=sometimes", "cache"),
            ("socket=s,dir=x,bogus=1", "bogus"),
            ("socket=s,dir=x,readonly=maybe", "readonly"),
            (
                "socket=s,dir=x,tag=0123456789012345678901234567890123456789",
                "tag",
            ),
            ("socket=s,dir=x,uid-map=0:0", "uid-map"),
            ("socket=s,dir=x,gid-map=a:b:c", "gid-map"),
            ("socket=s,dir=x,perm-cache=0", "perm-cache"),
            ("socket=s,dir=x,stale-ms=soon", "stale-ms"),
            ("socket=s,dir=x,quota-bytes=0", "quota-bytes"),
            ("socket=s,dir=x,quota-bytes=100", "quota-bytes"),
            ("socket=s,dir=x,quota-bytes=lots", "quota-bytes"),
            ("socket=s,dir=x,quota-bytes=99999999999T", "quota-bytes"),
            ("socket=s,dir=x,quota-inodes=0", "quota-inodes"),
            ("socket=s,dir=x,quota-inodes=-1", "quota-inodes"),
            ("socket=s,dir=x,dir=y", "dir"),
        ] {
            let e = parse_share_spec(bad).unwrap_err();
            assert!(
                e.to_string().contains(&format!("'{key}'")),
                "{bad}: {e} does not name {key}"
            );
        }
    }

    #[test]
    fn json_gives_the_same_spec() {
        let a: ShareArgs = keyvalue::from_str(
            "socket=/s,dir=d,tag=t,queues=2,uid-map=0:1000:10,readonly=on,cache=always,\
             perm-cache=64,stale-ms=5,quota-bytes=1G,quota-inodes=9,groups=/g,passwd=/p",
        )
        .unwrap();
        let b: ShareArgs = keyvalue::from_json(serde_json::json!({
            "socket": "/s", "dir": "d", "tag": "t", "queues": 2, "uid-map": "0:1000:10",
            "readonly": true, "cache": "always", "perm-cache": 64, "stale-ms": 5,
            "quota-bytes": 1073741824u64, "quota-inodes": 9, "groups": "/g", "passwd": "/p"
        }))
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(
            ShareSpec::try_from(a).unwrap(),
            ShareSpec::try_from(b).unwrap()
        );
    }

    fn arb_idmap() -> impl Strategy<Value = IdMap> {
        proptest::collection::vec((0u32..1 << 20, 0u32..1 << 20, 1u64..1000), 0..4).prop_map(|v| {
            // Spread the ranges so that they never overlap.
            let ranges = v
                .into_iter()
                .enumerate()
                .map(|(i, (g, h, count))| IdRange {
                    guest: (i as u32) << 24 | g,
                    host: (i as u32) << 24 | h,
                    count,
                })
                .collect();
            IdMap::from_ranges(ranges).unwrap_or_default()
        })
    }

    fn arb_share() -> impl Strategy<Value = ShareSpec> {
        let text = "[^\\x00]{1,20}";
        (
            (
                text,
                proptest::collection::vec("[^/\\x00]{1,12}", 1..4)
                    .prop_filter("no . or ..", |v| v.iter().all(|c| c != "." && c != "..")),
                "[a-z,]{1,36}",
                1..=REQUEST_QUEUES_MAX,
                arb_idmap(),
                arb_idmap(),
                any::<bool>(),
            ),
            (
                proptest::option::of(text),
                proptest::option::of(text),
                prop_oneof![
                    Just(CachePolicy::Never),
                    Just(CachePolicy::Auto),
                    Just(CachePolicy::Always)
                ],
                1usize..1 << 20,
                0u64..1 << 30,
                proptest::option::of(1u64..1 << 30),
                proptest::option::of(1u64..u64::MAX),
            ),
        )
            .prop_map(
                |(
                    (socket, dir, tag, queues, uid_map, gid_map, readonly),
                    (groups, passwd, cache, perm_cache, stale_ms, sectors, inodes),
                )| ShareSpec {
                    socket: socket.into(),
                    dir: dir.join("/"),
                    tag,
                    queues,
                    uid_map,
                    gid_map,
                    readonly,
                    groups: groups.map(PathBuf::from),
                    passwd: passwd.map(PathBuf::from),
                    cache,
                    perm_cache,
                    stale: Duration::from_millis(stale_ms),
                    quota: QuotaLimits {
                        bytes: sectors.map(|n| n * 512),
                        inodes,
                    },
                },
            )
    }

    proptest! {
        #[test]
        fn formatted_specs_parse_back(s in arb_share()) {
            prop_assert_eq!(parse_share_spec(&format(&s)).unwrap(), s);
        }

        #[test]
        fn parser_never_panics(s in ".{0,200}") {
            let _ = parse_share_spec(&s);
        }

        #[test]
        fn parser_never_panics_on_keys(s in "(socket|dir|tag|uid-map|quota-bytes|=|,|;|:|0|1G|/|\\.\\.){0,40}") {
            let _ = parse_share_spec(&s);
        }
    }
}
