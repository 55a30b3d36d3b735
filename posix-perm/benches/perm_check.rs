//! Cost of a cached permission check: `PermCache::get` hitting in a warm cache of 10,000
//! entries (target ≤ 100 ns), next to the uncached evaluation it replaces.

use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use posix_perm::acl::{Acl, AclEntry, AclTag};
use posix_perm::{profile, Cred, Object, PermCache, PermCacheConfig, Profile, ProfileKey};

/// Entries in the warm cache: a busy share, well under the default capacity.
const WARM_ENTRIES: u64 = 10_000;
/// Principals per object in the warm cache (10,000 = 2,500 objects × 4 users).
const PRINCIPALS_PER_OBJECT: u64 = 4;

fn key(i: u64) -> ProfileKey {
    let uid = 1000 + (i % PRINCIPALS_PER_OBJECT) as u32;
    ProfileKey {
        vm: 1,
        ino: 0x1_0000 + i / PRINCIPALS_PER_OBJECT,
        generation: 1,
        uid,
        gid: uid,
        groups_epoch: 7,
    }
}

fn cached_check(c: &mut Criterion) {
    let cache = PermCache::new(PermCacheConfig::default()).expect("default config is valid");
    let now = Instant::now();
    for i in 0..WARM_ENTRIES {
        cache.insert(&key(i), 42, Profile::from_bits(0x3f), now);
    }
    let keys: Vec<ProfileKey> = (0..WARM_ENTRIES).map(key).collect();
    let mut next = 0usize;
    c.bench_function("perm_cache_get_hit_warm_10k", |b| {
        b.iter(|| {
            // Walk the keys in a stride so consecutive lookups touch different shards and lines.
            next = (next + 7919) % keys.len();
            let hit = cache.get(black_box(&keys[next]), 42, now);
            debug_assert!(hit.is_some());
            black_box(hit)
        })
    });
    assert_eq!(
        cache.stats().misses,
        0,
        "every lookup in the bench must hit"
    );
}

fn uncached_check(c: &mut Criterion) {
    let acl = Acl::from_entries(vec![
        AclEntry::unnamed(AclTag::UserObj, 7),
        AclEntry::named(AclTag::User, 1001, 6),
        AclEntry::unnamed(AclTag::GroupObj, 5),
        AclEntry::named(AclTag::Group, 50, 4),
        AclEntry::named(AclTag::Group, 51, 2),
        AclEntry::unnamed(AclTag::Mask, 7),
        AclEntry::unnamed(AclTag::Other, 0),
    ])
    .expect("valid ACL");
    let groups = [10, 20, 51];
    let cred = Cred {
        uid: 1002,
        gid: 100,
        groups: &groups,
    };
    let obj = Object {
        uid: 0,
        gid: 50,
        mode: 0o100_770,
    };
    c.bench_function("profile_eval_7_entry_acl", |b| {
        b.iter(|| {
            black_box(profile(
                black_box(&cred),
                black_box(&obj),
                Some(black_box(&acl)),
            ))
        })
    });
}

criterion_group!(benches, cached_check, uncached_check);
criterion_main!(benches);
