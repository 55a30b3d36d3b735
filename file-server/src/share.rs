//! A share, assembled: from its [`ShareSpec`] to the FUSE handler serving it, and its
//! counters for `stats`. The top of the crate: uses the settings, the file system and the
//! handler; nothing here is used by them.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use posix_perm::cache::{PermCache, PermCacheConfig, PermCacheStats};
use posix_perm::identity::GroupSource;
use vmfs::fs::Datastore;

use crate::fs::VmfsFs;
use crate::handler::ShareHandler;
use crate::settings::{ShareError, ShareSettings, ShareSpec};

/// A share being served: its handler (for the vhost-user device) and its counters.
#[derive(Debug, Clone)]
pub struct Share {
    /// What the share serves, as the daemon described it.
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
        let bad = |what: &'static str, why: String| ShareError::Setting {
            dir: spec.dir.clone(),
            what,
            why,
        };
        let groups = match &spec.groups {
            Some(g) => Some(
                GroupSource::new(g.clone(), spec.passwd.clone(), spec.stale)
                    .map_err(|e| bad("groups", e.to_string()))?,
            ),
            None => None,
        };
        let perm = PermCache::new(PermCacheConfig {
            capacity: spec.perm_cache,
            stale_bound: spec.stale,
            ..PermCacheConfig::default()
        })
        .map_err(|e| bad("perm-cache", e.to_string()))?;
        let settings = ShareSettings {
            uid_map: spec.uid_map.clone(),
            gid_map: spec.gid_map.clone(),
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
