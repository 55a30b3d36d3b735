//! The permission-profile cache: a bounded, sharded LRU of [`Profile`]s keyed by
//! (VM, object, principal), so that a repeated check costs one hash lookup instead of an ACL
//! fetch and eight evaluations.
//!
//! # Why a cached profile is never wrong for long
//!
//! * Object changes: every entry records the object's `attr_gen` (bumped by the datastore on
//!   chmod, chown, ACL and xattr changes) and a lookup under another generation misses and drops
//!   the entry. Exact for changes made through the datastore.
//! * Object reuse: the key holds the object's generation (bumped when its number is given to a
//!   new object), so a new object never meets a deleted one's profiles.
//! * Group changes: the key holds the principal's `groups_epoch` (see
//!   [`crate::identity`]), so profiles computed under old group lists become unreachable and
//!   age out of the LRU.
//! * Anything else (out-of-band edits the generation does not see): no entry is served once it
//!   is [`PermCacheConfig::stale_bound`] old (default [`STALE_BOUND_DEFAULT`]).
//!
//! # Why it stays bounded under a hostile guest
//!
//! A guest chooses the uid/gid of every request, so it could fill the cache with principals of
//! one object. Each (VM, object) holds at most [`PermCacheConfig::principals_per_object_max`]
//! principals; beyond that, lookups miss and inserts are dropped (and counted), and the caller
//! evaluates uncached. Total entries never exceed [`PermCache::capacity`].
//!
//! # Concurrency and cost
//!
//! Shards are chosen by object (`ino`), each a `Mutex` around an LRU, so reactor threads working
//! on different files rarely meet on a lock; counters live next to their shard's lock (one cache
//! line pair per shard) so a hit touches no shared line. A hit allocates nothing.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lru::LruCache;
use thiserror::Error;

use crate::eval::Profile;

/// Number of shards. Power of two (shard = top bits of a hashed ino). 16 makes two reactor
/// threads meet on the same lock about 1 time in 16 even when both are busy.
pub const PERM_CACHE_SHARDS: usize = 16;
const PERM_CACHE_SHARD_BITS: u32 = PERM_CACHE_SHARDS.trailing_zeros();
const _: () = assert!(PERM_CACHE_SHARDS.is_power_of_two());

/// Default total entries (2^18 = 262,144). An entry costs about 130 bytes (key and value 64, LRU
/// links 16, hash slot 9, object index 32, allocator slack), so the cache stays near 32 MiB,
/// while covering e.g. 64 VMs × 4,096 hot files with one principal each.
pub const PERM_CACHE_CAPACITY_DEFAULT: usize = 1 << 18;

/// Default staleness bound: no entry is served once it is this old. Matches the guest's own
/// attribute validity in the `auto` cache mode (1 s), so the server adds no new staleness class.
pub const STALE_BOUND_DEFAULT: Duration = Duration::from_secs(1);

/// Default principals cached per (VM, object). Real sharing rarely has more than a handful of
/// distinct users per file; 64 absorbs a busy shared directory while limiting what a guest
/// spraying uids can take to 64 entries per file it can name.
pub const PRINCIPALS_PER_OBJECT_MAX_DEFAULT: usize = 64;

/// Why a cache could not be built.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PermCacheError {
    /// The capacity is zero.
    #[error("permission cache capacity must be at least 1")]
    ZeroCapacity,
    /// The per-object principal cap is zero.
    #[error("principals per object must be at least 1")]
    ZeroPrincipalsPerObject,
}

/// Cache key: who asks about what, over which connection, under which group list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProfileKey {
    /// Connection (VM) id; lets a disconnect drop exactly that VM's entries.
    pub vm: u32,
    /// Object id in the datastore.
    pub ino: u64,
    /// The object's generation: an inode number freed and given to a new object names a
    /// different object, which must not inherit the old one's profiles (both start at the
    /// same `attr_gen`).
    pub generation: u32,
    /// Caller's (mapped) uid.
    pub uid: u32,
    /// Caller's (mapped) gid.
    pub gid: u32,
    /// Epoch of the group list the profile was computed with.
    pub groups_epoch: u64,
}

/// Tunables of a [`PermCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PermCacheConfig {
    /// Total entries; rounded up to a multiple of [`PERM_CACHE_SHARDS`].
    pub capacity: usize,
    /// Entries are served only while younger than this (zero disables caching).
    pub stale_bound: Duration,
    /// Principals cached per (VM, object).
    pub principals_per_object_max: usize,
}

impl Default for PermCacheConfig {
    fn default() -> Self {
        PermCacheConfig {
            capacity: PERM_CACHE_CAPACITY_DEFAULT,
            stale_bound: STALE_BOUND_DEFAULT,
            principals_per_object_max: PRINCIPALS_PER_OBJECT_MAX_DEFAULT,
        }
    }
}

/// Counter snapshot. Every lookup is exactly one of hit or miss.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PermCacheStats {
    /// Lookups served from the cache.
    pub hits: u64,
    /// Lookups not served (absent, other generation, too old).
    pub misses: u64,
    /// Entries dropped because the object or groups changed: lookups under another `attr_gen`,
    /// plus entries removed by `invalidate_object`, `invalidate_all` and `drop_vm`.
    pub invalidations: u64,
    /// Entries pushed out by the capacity bound (LRU).
    pub evictions: u64,
    /// Entries dropped at lookup because they were older than the staleness bound.
    pub expirations: u64,
    /// Inserts refused by the per-object principal cap.
    pub over_cap_drops: u64,
    /// Entries currently cached.
    pub entries: u64,
}

/// The bounded, sharded profile cache. All methods take `&self`.
#[derive(Debug)]
pub struct PermCache {
    shards: Box<[Shard]>,
    stale_bound: Duration,
    principals_per_object_max: usize,
    capacity_per_shard: usize,
}

/// One shard; aligned so neighbouring shards' locks and counters never share a cache line
/// (128 bytes covers the adjacent-line prefetcher).
#[derive(Debug)]
#[repr(align(128))]
struct Shard {
    state: Mutex<ShardState>,
    hits: AtomicU64,
    misses: AtomicU64,
    invalidations: AtomicU64,
    evictions: AtomicU64,
    expirations: AtomicU64,
    over_cap_drops: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct CacheEntry {
    attr_gen: u64,
    inserted_at: Instant,
    profile: Profile,
}

/// Keys of one shard's entries, by object, for `invalidate_object` and the per-object cap.
/// Invariant: a key is listed here iff it is in `lru`; no list is empty.
type ObjectIndex = HashMap<u64, Vec<ProfileKey>, lru::DefaultHasher>;

#[derive(Debug)]
struct ShardState {
    lru: LruCache<ProfileKey, CacheEntry>,
    objects: ObjectIndex,
}

/// Per-shard capacity of the default configuration.
const CAPACITY_PER_SHARD_DEFAULT: NonZeroUsize =
    match NonZeroUsize::new(PERM_CACHE_CAPACITY_DEFAULT / PERM_CACHE_SHARDS) {
        Some(capacity) => capacity,
        None => panic!("the default capacity fills every shard"),
    };
const _: () = assert!(PERM_CACHE_CAPACITY_DEFAULT.is_multiple_of(PERM_CACHE_SHARDS));
const _: () = assert!(PRINCIPALS_PER_OBJECT_MAX_DEFAULT > 0);

impl Default for PermCache {
    /// A cache with [`PermCacheConfig::default`].
    fn default() -> Self {
        PermCache::build(CAPACITY_PER_SHARD_DEFAULT, PermCacheConfig::default())
    }
}

impl PermCache {
    /// A cache with the given tunables.
    pub fn new(config: PermCacheConfig) -> Result<PermCache, PermCacheError> {
        let capacity_per_shard = NonZeroUsize::new(config.capacity.div_ceil(PERM_CACHE_SHARDS))
            .ok_or(PermCacheError::ZeroCapacity)?;
        if config.principals_per_object_max == 0 {
            return Err(PermCacheError::ZeroPrincipalsPerObject);
        }
        Ok(PermCache::build(capacity_per_shard, config))
    }

    fn build(capacity_per_shard: NonZeroUsize, config: PermCacheConfig) -> PermCache {
        let shards = (0..PERM_CACHE_SHARDS)
            .map(|_| Shard::new(capacity_per_shard))
            .collect();
        PermCache {
            shards,
            stale_bound: config.stale_bound,
            principals_per_object_max: config.principals_per_object_max,
            capacity_per_shard: capacity_per_shard.get(),
        }
    }

    /// Most entries the cache ever holds.
    pub fn capacity(&self) -> usize {
        self.capacity_per_shard * PERM_CACHE_SHARDS
    }

    /// The cached profile for `key`, if present, computed under `attr_gen`, and younger than
    /// the staleness bound at `now`. An entry of another generation or too old is dropped.
    /// Allocates nothing.
    pub fn get(&self, key: &ProfileKey, attr_gen: u64, now: Instant) -> Option<Profile> {
        let shard = self.shard(key.ino);
        let mut state = shard.lock();
        let Some(entry) = state.lru.get(key).copied() else {
            drop(state);
            bump(&shard.misses);
            return None;
        };
        let outcome = if entry.attr_gen != attr_gen {
            Some(&shard.invalidations)
        } else if now.saturating_duration_since(entry.inserted_at) >= self.stale_bound {
            Some(&shard.expirations)
        } else {
            None
        };
        match outcome {
            None => {
                drop(state);
                bump(&shard.hits);
                Some(entry.profile)
            }
            Some(reason) => {
                state.remove(key);
                drop(state);
                bump(reason);
                bump(&shard.misses);
                None
            }
        }
    }

    /// Caches `profile` for `key`, computed under `attr_gen` at `now`.
    ///
    /// The caller must read `attr_gen` *before* reading the mode and ACL it evaluates: then a
    /// change racing the evaluation bumps the generation past the one recorded, and the entry
    /// is never served (the other order could tag an old profile with the new generation).
    /// Dropped (and counted) when the (VM, object) already holds the maximum of principals.
    pub fn insert(&self, key: &ProfileKey, attr_gen: u64, profile: Profile, now: Instant) {
        let shard = self.shard(key.ino);
        let entry = CacheEntry {
            attr_gen,
            inserted_at: now,
            profile,
        };
        let mut state = shard.lock();
        if let Some(slot) = state.lru.get_mut(key) {
            *slot = entry;
            return;
        }
        let principals = state.objects.get(&key.ino).map_or(0, |keys| {
            keys.iter().filter(|cached| cached.vm == key.vm).count()
        });
        if principals >= self.principals_per_object_max {
            drop(state);
            bump(&shard.over_cap_drops);
            return;
        }
        let evicted = state.lru.push(*key, entry);
        state.objects.entry(key.ino).or_default().push(*key);
        if let Some((evicted_key, _)) = evicted {
            // `key` was absent, so what came back is the LRU victim, never `key` itself.
            debug_assert_ne!(evicted_key, *key);
            unindex(&mut state.objects, &evicted_key);
            drop(state);
            bump(&shard.evictions);
        }
    }

    /// Drops every entry of object `ino`, for all VMs and principals (e.g. after chmod).
    pub fn invalidate_object(&self, ino: u64) {
        let shard = self.shard(ino);
        let mut state = shard.lock();
        let ShardState { lru, objects } = &mut *state;
        let removed = objects.remove(&ino).map_or(0, |keys| {
            for key in &keys {
                lru.pop(key);
            }
            keys.len()
        });
        drop(state);
        add(&shard.invalidations, removed);
    }

    /// Drops every entry (e.g. the group file changed and epochs are not relied on).
    pub fn invalidate_all(&self) {
        for shard in self.shards.iter() {
            let mut state = shard.lock();
            let removed = state.lru.len();
            state.lru.clear();
            state.objects.clear();
            drop(state);
            add(&shard.invalidations, removed);
        }
    }

    /// Drops every entry of connection `vm` (disconnect or device reset). Walks the whole cache;
    /// allocates nothing.
    pub fn drop_vm(&self, vm: u32) {
        for shard in self.shards.iter() {
            let mut state = shard.lock();
            let ShardState { lru, objects } = &mut *state;
            let mut removed = 0;
            objects.retain(|_, keys| {
                keys.retain(|key| {
                    let keep = key.vm != vm;
                    if !keep {
                        lru.pop(key);
                        removed += 1;
                    }
                    keep
                });
                !keys.is_empty()
            });
            drop(state);
            add(&shard.invalidations, removed);
        }
    }

    /// A snapshot of the counters (each read atomically, not all at one instant).
    pub fn stats(&self) -> PermCacheStats {
        let mut stats = PermCacheStats::default();
        for shard in self.shards.iter() {
            stats.hits += shard.hits.load(Ordering::Relaxed);
            stats.misses += shard.misses.load(Ordering::Relaxed);
            stats.invalidations += shard.invalidations.load(Ordering::Relaxed);
            stats.evictions += shard.evictions.load(Ordering::Relaxed);
            stats.expirations += shard.expirations.load(Ordering::Relaxed);
            stats.over_cap_drops += shard.over_cap_drops.load(Ordering::Relaxed);
            stats.entries += shard.lock().lru.len() as u64;
        }
        stats
    }

    fn shard(&self, ino: u64) -> &Shard {
        // Fibonacci hashing: sequential inos land in different shards.
        let index = (ino.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (u64::BITS - PERM_CACHE_SHARD_BITS))
            as usize;
        &self.shards[index]
    }
}

impl Shard {
    fn new(capacity: NonZeroUsize) -> Shard {
        Shard {
            state: Mutex::new(ShardState {
                lru: LruCache::new(capacity),
                objects: ObjectIndex::default(),
            }),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            expirations: AtomicU64::new(0),
            over_cap_drops: AtomicU64::new(0),
        }
    }

    /// Locks the shard. A panic while it was held (a bug) may have left the object index out of
    /// step with the LRU, so the shard is emptied rather than trusted: a cache may forget.
    fn lock(&self) -> MutexGuard<'_, ShardState> {
        match self.state.lock() {
            Ok(guard) => guard,
            Err(poisoned) => {
                let mut guard = poisoned.into_inner();
                guard.lru.clear();
                guard.objects.clear();
                self.state.clear_poison();
                guard
            }
        }
    }
}

impl ShardState {
    fn remove(&mut self, key: &ProfileKey) {
        if self.lru.pop(key).is_some() {
            unindex(&mut self.objects, key);
        }
    }
}

fn unindex(objects: &mut ObjectIndex, key: &ProfileKey) {
    let Some(keys) = objects.get_mut(&key.ino) else {
        debug_assert!(false, "cached key missing from the object index");
        return;
    };
    if let Some(position) = keys.iter().position(|cached| cached == key) {
        keys.swap_remove(position);
    }
    if keys.is_empty() {
        objects.remove(&key.ino);
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn add(counter: &AtomicU64, count: usize) {
    counter.fetch_add(count as u64, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(vm: u32, ino: u64, uid: u32) -> ProfileKey {
        ProfileKey {
            vm,
            ino,
            generation: 1,
            uid,
            gid: uid,
            groups_epoch: 1,
        }
    }

    fn cache(capacity: usize, principals: usize) -> PermCache {
        PermCache::new(PermCacheConfig {
            capacity,
            stale_bound: Duration::from_secs(1),
            principals_per_object_max: principals,
        })
        .unwrap()
    }

    fn p(bits: u8) -> Profile {
        Profile::from_bits(bits)
    }

    #[test]
    fn hit_and_miss() {
        let cache = cache(1024, 64);
        let now = Instant::now();
        assert_eq!(cache.get(&key(1, 5, 7), 3, now), None);
        cache.insert(&key(1, 5, 7), 3, p(0x0f), now);
        assert_eq!(cache.get(&key(1, 5, 7), 3, now), Some(p(0x0f)));
        assert_eq!(cache.get(&key(2, 5, 7), 3, now), None, "another VM");
        assert_eq!(cache.get(&key(1, 5, 8), 3, now), None, "another user");
        let reused = ProfileKey {
            generation: 2,
            ..key(1, 5, 7)
        };
        assert_eq!(
            cache.get(&reused, 3, now),
            None,
            "another object, same number"
        );
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses, stats.entries), (1, 4, 1));
    }

    #[test]
    fn capacity_bound_and_eviction_count() {
        let cache = cache(64, 64);
        assert_eq!(cache.capacity(), 64);
        let now = Instant::now();
        for ino in 0..1000 {
            cache.insert(&key(1, ino, 1), 0, p(1), now);
            assert!(cache.stats().entries <= 64);
        }
        let stats = cache.stats();
        assert_eq!(stats.evictions + stats.entries, 1000);
        assert!(stats.entries >= 48, "most shards full: {}", stats.entries);
        // The most recent insert is still there, the first long gone.
        assert_eq!(cache.get(&key(1, 999, 1), 0, now), Some(p(1)));
        assert_eq!(cache.get(&key(1, 0, 1), 0, now), None);
    }

    #[test]
    fn lru_keeps_recently_used() {
        // One object, so one shard of capacity 4.
        let cache = cache(4 * PERM_CACHE_SHARDS, 64);
        let now = Instant::now();
        for uid in 0..4 {
            cache.insert(&key(1, 9, uid), 0, p(1), now);
        }
        assert!(cache.get(&key(1, 9, 0), 0, now).is_some());
        cache.insert(&key(1, 9, 4), 0, p(1), now);
        assert!(
            cache.get(&key(1, 9, 0), 0, now).is_some(),
            "recently used survives"
        );
        assert!(
            cache.get(&key(1, 9, 1), 0, now).is_none(),
            "least recently used evicted"
        );
        assert_eq!(cache.stats().evictions, 1);
    }

    #[test]
    fn staleness_bound() {
        let cache = cache(1024, 64);
        let t0 = Instant::now();
        cache.insert(&key(1, 5, 7), 0, p(3), t0);
        let just_before = t0 + Duration::from_millis(999);
        assert_eq!(cache.get(&key(1, 5, 7), 0, just_before), Some(p(3)));
        assert_eq!(
            cache.get(&key(1, 5, 7), 0, t0 + Duration::from_secs(1)),
            None
        );
        let stats = cache.stats();
        assert_eq!((stats.expirations, stats.entries), (1, 0));
        // A clock that appears to go backwards does not make entries immortal or panic.
        cache.insert(&key(1, 5, 7), 0, p(3), just_before);
        assert_eq!(cache.get(&key(1, 5, 7), 0, t0), Some(p(3)));
    }

    #[test]
    fn zero_stale_bound_disables_caching() {
        let cache = PermCache::new(PermCacheConfig {
            stale_bound: Duration::ZERO,
            ..PermCacheConfig::default()
        })
        .unwrap();
        assert_eq!(PermCache::default().capacity(), PERM_CACHE_CAPACITY_DEFAULT);
        let now = Instant::now();
        cache.insert(&key(1, 5, 7), 0, p(3), now);
        assert_eq!(cache.get(&key(1, 5, 7), 0, now), None);
    }

    #[test]
    fn attr_gen_invalidates() {
        let cache = cache(1024, 64);
        let now = Instant::now();
        cache.insert(&key(1, 5, 7), 10, p(3), now);
        assert_eq!(cache.get(&key(1, 5, 7), 11, now), None);
        let stats = cache.stats();
        assert_eq!(
            (stats.invalidations, stats.misses, stats.entries),
            (1, 1, 0)
        );
        // Re-inserting under the new generation serves again; the old one no longer does.
        cache.insert(&key(1, 5, 7), 11, p(7), now);
        assert_eq!(cache.get(&key(1, 5, 7), 11, now), Some(p(7)));
        cache.insert(&key(1, 5, 7), 12, p(1), now);
        assert_eq!(cache.get(&key(1, 5, 7), 11, now), None);
    }

    #[test]
    fn invalidate_object_and_all() {
        let cache = cache(1024, 64);
        let now = Instant::now();
        for vm in 0..3 {
            for uid in 0..5 {
                cache.insert(&key(vm, 5, uid), 0, p(3), now);
                cache.insert(&key(vm, 6, uid), 0, p(3), now);
            }
        }
        cache.invalidate_object(5);
        assert_eq!(cache.stats().entries, 15);
        assert_eq!(cache.stats().invalidations, 15);
        assert_eq!(cache.get(&key(2, 5, 4), 0, now), None);
        assert_eq!(cache.get(&key(2, 6, 4), 0, now), Some(p(3)));
        cache.invalidate_all();
        assert_eq!(cache.stats().entries, 0);
        assert_eq!(cache.get(&key(2, 6, 4), 0, now), None);
    }

    #[test]
    fn drop_vm_removes_only_that_vm() {
        let cache = cache(1024, 64);
        let now = Instant::now();
        for ino in 0..50 {
            cache.insert(&key(1, ino, 1), 0, p(3), now);
            cache.insert(&key(2, ino, 1), 0, p(3), now);
        }
        cache.drop_vm(1);
        assert_eq!(cache.stats().entries, 50);
        for ino in 0..50 {
            assert_eq!(cache.get(&key(1, ino, 1), 0, now), None);
            assert_eq!(cache.get(&key(2, ino, 1), 0, now), Some(p(3)));
        }
        // The per-object counts were released too: VM 1 may fill its slots again.
        cache.insert(&key(1, 0, 1), 0, p(3), now);
        assert_eq!(cache.get(&key(1, 0, 1), 0, now), Some(p(3)));
    }

    #[test]
    fn per_object_principal_cap() {
        let cache = cache(1024, 4);
        let now = Instant::now();
        for uid in 0..10 {
            cache.insert(&key(1, 5, uid), 0, p(3), now);
        }
        let stats = cache.stats();
        assert_eq!((stats.entries, stats.over_cap_drops), (4, 6));
        assert_eq!(
            cache.get(&key(1, 5, 9), 0, now),
            None,
            "over the cap: computed uncached"
        );
        // Updating an existing principal is not a new principal.
        cache.insert(&key(1, 5, 0), 0, p(7), now);
        assert_eq!(cache.get(&key(1, 5, 0), 0, now), Some(p(7)));
        // The cap is per VM and per object.
        cache.insert(&key(2, 5, 9), 0, p(3), now);
        cache.insert(&key(1, 6, 9), 0, p(3), now);
        assert_eq!(cache.stats().entries, 6);
        // Slots freed by invalidation are reusable.
        cache.insert(&key(1, 5, 1), 1, p(3), now);
        assert_eq!(cache.get(&key(1, 5, 2), 1, now), None);
        cache.insert(&key(1, 5, 9), 1, p(3), now);
        assert_eq!(cache.get(&key(1, 5, 9), 1, now), Some(p(3)));
    }

    #[test]
    fn uid_spray_stays_bounded() {
        let cache = cache(4096, 64);
        let now = Instant::now();
        for uid in 0..100_000 {
            cache.insert(&key(1, u64::from(uid % 8), uid), 0, p(3), now);
        }
        let stats = cache.stats();
        assert_eq!(stats.entries, 8 * 64);
        assert_eq!(stats.over_cap_drops, 100_000 - 8 * 64);
    }

    #[test]
    fn rejects_zero_sizes() {
        let zero = PermCacheConfig {
            capacity: 0,
            ..PermCacheConfig::default()
        };
        assert_eq!(
            PermCache::new(zero).unwrap_err(),
            PermCacheError::ZeroCapacity
        );
        let zero = PermCacheConfig {
            principals_per_object_max: 0,
            ..PermCacheConfig::default()
        };
        assert_eq!(
            PermCache::new(zero).unwrap_err(),
            PermCacheError::ZeroPrincipalsPerObject
        );
    }

    #[test]
    fn concurrent_use() {
        let cache = std::sync::Arc::new(cache(256, 8));
        let now = Instant::now();
        let threads: Vec<_> = (0..4u32)
            .map(|t| {
                let cache = std::sync::Arc::clone(&cache);
                std::thread::spawn(move || {
                    for i in 0..20_000u64 {
                        let k = key(t, i % 97, (i % 13) as u32);
                        if cache.get(&k, i % 3, now).is_none() {
                            cache.insert(&k, i % 3, p(3), now);
                        }
                        if i % 1000 == 0 {
                            cache.invalidate_object(i % 97);
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let stats = cache.stats();
        assert!(stats.entries <= 256);
        assert_eq!(stats.hits + stats.misses, 80_000);
    }
}
