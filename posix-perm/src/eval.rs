//! Exact permission evaluation, as Linux does it (`generic_permission` →
//! `acl_permission_check` → `posix_acl_permission`), reduced to a [`Profile`]: the exact set of
//! rwx requests a caller may make on an object.
//!
//! A profile is not "the union of the caller's permissions". POSIX.1e grants a request through
//! the group class only when *one* matching group entry holds every requested bit, so a caller
//! in group A (`r--`) and group B (`-w-`) may read and may write but may not open for
//! read-write. Storing one bit per rwx subset (8 bits) keeps that exact, and a cached profile
//! never grants more than evaluating the ACL would.
//!
//! Linux details reproduced here on purpose, because the guest kernel and a host file system
//! both behave this way and the differential tests compare against them:
//! * The owner is judged by the owner mode bits, before and regardless of the ACL.
//! * The ACL is consulted only when the group-class mode bits (the mask) are non-zero. With a
//!   zero mask every masked entry grants nothing, and Linux falls back to the mode: a caller in
//!   the owning group gets nothing, anyone else the *other* bits — so a named user with
//!   `mask::---` gets `other`'s rights, not none.
//! * A caller that matched a group entry but found none holding all requested bits is denied;
//!   it does not fall through to `OTHER`.
//!
//! Root is not special here: [`with_root_override`] adds `CAP_DAC_OVERRIDE` semantics for a
//! caller the server treats as privileged.

use crate::acl::{Acl, AclTag, ACL_EXECUTE, ACL_RWX};

/// The requester: file-system uid and gid and the supplementary groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cred<'a> {
    /// File-system uid (host id, after id mapping).
    pub uid: u32,
    /// File-system gid.
    pub gid: u32,
    /// Supplementary groups (any order; duplicates harmless).
    pub groups: &'a [u32],
}

impl Cred<'_> {
    /// Linux `in_group_p`: the fsgid or any supplementary group.
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

/// What evaluation needs of the object: owner, owning group and mode (file-type bits ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Object {
    /// Owner uid.
    pub uid: u32,
    /// Owning gid.
    pub gid: u32,
    /// Mode; only the 0o777 bits matter here.
    pub mode: u32,
}

/// The exact set of granted requests: bit `k` is set iff requesting the rwx subset `k`
/// (r = 4, w = 2, x = 1) is granted. Bit 0 (the empty request) is always set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Profile(u8);

/// Number of rwx subsets, hence bits in a profile.
const RWX_SUBSETS: u8 = 8;

impl Profile {
    /// A profile that grants nothing but the empty request.
    pub const NONE: Profile = Profile(1);
    /// A profile that grants everything.
    pub const ALL: Profile = Profile(u8::MAX);

    /// Rebuilds a profile from [`Profile::bits`]; the empty request is always granted.
    pub const fn from_bits(bits: u8) -> Profile {
        Profile(bits | 1)
    }

    /// The 8-bit representation.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Whether the request `want` (a combination of r = 4, w = 2, x = 1) is granted. A request
    /// with any other bit set is denied: the profile knows nothing about it.
    pub const fn allows(self, want: u8) -> bool {
        want < RWX_SUBSETS && self.0 & (1 << want) != 0
    }

    /// The profile granting exactly the requests that are subsets of `perm` — what a single
    /// class (owner, other, one entry) yields.
    const fn subsets_of(perm: u8) -> Profile {
        let mut bits = 0u8;
        let mut want = 0u8;
        while want < RWX_SUBSETS {
            if want & !perm == 0 {
                bits |= 1 << want;
            }
            want += 1;
        }
        Profile(bits)
    }
}

/// Evaluates every rwx request for `cred` on `obj` with its access ACL (`None` = mode only),
/// exactly as Linux would. Pure; allocates nothing.
pub fn profile(cred: &Cred, obj: &Object, acl: Option<&Acl>) -> Profile {
    let mut bits = 0u8;
    for want in 0..RWX_SUBSETS {
        if permission(cred, obj, acl, want) {
            bits |= 1 << want;
        }
    }
    debug_assert!(bits & 1 != 0, "the empty request is always granted");
    Profile(bits)
}

/// Adds `CAP_DAC_OVERRIDE`/`CAP_DAC_READ_SEARCH` (Linux `generic_permission`) to a profile:
/// directories may always be read, written and searched; other objects may always be read and
/// written, and executed only if some execute bit is set in `mode` (with an ACL, the mode's
/// group bits are the mask, so this is "some entry class may execute").
pub fn with_root_override(p: Profile, is_dir: bool, mode: u32) -> Profile {
    let any_execute = mode & 0o111 != 0;
    if is_dir || any_execute {
        return Profile::ALL;
    }
    // Read and write are overridable; execute is left to what the DAC check granted.
    Profile(p.0 | Profile::subsets_of(ACL_RWX & !ACL_EXECUTE).0)
}

/// One request, following `acl_permission_check` then `posix_acl_permission`.
fn permission(cred: &Cred, obj: &Object, acl: Option<&Acl>, want: u8) -> bool {
    let mode = obj.mode;
    if cred.uid == obj.uid {
        return covers(class_bits(mode, 6), want);
    }
    // Strict POSIX.1e: an access ACL always decides for non-owners. (Linux skips the ACL
    // when the mode's group bits — the mask — are all zero, which hands named users the
    // "other" bits: more than the ACL grants, so not followed here. The guest kernel still
    // applies its own rule first; a request passes only if both allow it.)
    if let Some(acl) = acl {
        return acl_permission(cred, obj, acl, want);
    }
    let class = if cred.in_group(obj.gid) { 3 } else { 0 };
    covers(class_bits(mode, class), want)
}

/// Linux `posix_acl_permission` for a non-owner: the first matching class decides.
fn acl_permission(cred: &Cred, obj: &Object, acl: &Acl, want: u8) -> bool {
    let mask = acl.mask().unwrap_or(ACL_RWX);
    let mut group_matched = false;
    for entry in acl.entries() {
        match entry.tag {
            // Owners never get here; kept for the literal order of the kernel's walk.
            AclTag::UserObj if cred.uid == obj.uid => return covers(entry.perm, want),
            AclTag::User if entry.id == cred.uid => return covers(entry.perm & mask, want),
            AclTag::GroupObj | AclTag::Group => {
                let gid = if entry.tag == AclTag::GroupObj {
                    obj.gid
                } else {
                    entry.id
                };
                if cred.in_group(gid) {
                    group_matched = true;
                    if covers(entry.perm, want) {
                        return covers(entry.perm & mask, want);
                    }
                }
            }
            AclTag::Other => return !group_matched && covers(entry.perm, want),
            AclTag::UserObj | AclTag::User | AclTag::Mask => {}
        }
    }
    // A valid ACL always has OTHER; deny if it somehow did not (the kernel returns -EIO).
    false
}

fn covers(perm: u8, want: u8) -> bool {
    want & !perm == 0
}

fn class_bits(mode: u32, shift: u32) -> u8 {
    // Masked to three bits, so the narrowing cannot lose anything.
    ((mode >> shift) & u32::from(ACL_RWX)) as u8
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::acl::AclEntry;

    const R: u8 = 4;
    const W: u8 = 2;
    const X: u8 = 1;

    fn acl(entries: &[(AclTag, u32, u8)]) -> Acl {
        Acl::from_entries(
            entries
                .iter()
                .map(|&(tag, id, perm)| AclEntry { tag, id, perm })
                .collect(),
        )
        .unwrap()
    }

    const OWNER: u32 = 100;
    const GROUP: u32 = 200;
    fn file(mode: u32) -> Object {
        Object {
            uid: OWNER,
            gid: GROUP,
            mode,
        }
    }

    #[test]
    fn groups_are_not_a_union() {
        // group:10:r-- group:11:-w- mask::rw-: reading or writing alone is fine, both is not.
        let acl = acl(&[
            (AclTag::UserObj, 0, 7),
            (AclTag::GroupObj, 0, 0),
            (AclTag::Group, 10, R),
            (AclTag::Group, 11, W),
            (AclTag::Mask, 0, R | W),
            (AclTag::Other, 0, 0),
        ]);
        let cred = Cred {
            uid: 1,
            gid: 10,
            groups: &[11],
        };
        let p = profile(&cred, &file(0o760), Some(&acl));
        assert!(p.allows(R));
        assert!(p.allows(W));
        assert!(
            !p.allows(R | W),
            "r in group A, w in group B, ask rw → denied"
        );
    }

    #[test]
    fn matched_group_does_not_fall_through_to_other() {
        let acl = acl(&[
            (AclTag::UserObj, 0, 7),
            (AclTag::GroupObj, 0, 0),
            (AclTag::Group, 10, X),
            (AclTag::Mask, 0, 7),
            (AclTag::Other, 0, R),
        ]);
        let member = Cred {
            uid: 1,
            gid: 99,
            groups: &[10],
        };
        let p = profile(&member, &file(0o774), Some(&acl));
        assert!(
            !p.allows(R),
            "a matching group entry without r denies, other's r is not used"
        );
        assert!(p.allows(X));
        let outsider = Cred {
            uid: 1,
            gid: 99,
            groups: &[],
        };
        assert!(profile(&outsider, &file(0o774), Some(&acl)).allows(R));
    }

    #[test]
    fn mask_limits_named_users_but_not_owner() {
        let acl = acl(&[
            (AclTag::UserObj, 0, 7),
            (AclTag::User, 5, 7),
            (AclTag::GroupObj, 0, 7),
            (AclTag::Mask, 0, R),
            (AclTag::Other, 0, 0),
        ]);
        let obj = file(0o740);
        let named = profile(
            &Cred {
                uid: 5,
                gid: 5,
                groups: &[],
            },
            &obj,
            Some(&acl),
        );
        assert!(named.allows(R));
        assert!(!named.allows(W));
        let owner = profile(
            &Cred {
                uid: OWNER,
                gid: 5,
                groups: &[],
            },
            &obj,
            Some(&acl),
        );
        assert_eq!(owner, Profile::ALL);
        let group = profile(
            &Cred {
                uid: 6,
                gid: GROUP,
                groups: &[],
            },
            &obj,
            Some(&acl),
        );
        assert!(
            group.allows(R) && !group.allows(W),
            "GROUP_OBJ is masked too"
        );
    }

    #[test]
    fn owner_does_not_fall_through_to_group() {
        // Owner has nothing, the owning group everything: the owner (also in that group) is
        // still denied, with and without an ACL.
        let acl = acl(&[
            (AclTag::UserObj, 0, 0),
            (AclTag::GroupObj, 0, 7),
            (AclTag::Other, 0, 7),
        ]);
        let owner = Cred {
            uid: OWNER,
            gid: GROUP,
            groups: &[],
        };
        assert_eq!(profile(&owner, &file(0o077), Some(&acl)), Profile::NONE);
        assert_eq!(profile(&owner, &file(0o077), None), Profile::NONE);
    }

    #[test]
    fn named_user_does_not_fall_through_to_groups() {
        let acl = acl(&[
            (AclTag::UserObj, 0, 7),
            (AclTag::User, 5, 0),
            (AclTag::GroupObj, 0, 7),
            (AclTag::Mask, 0, 7),
            (AclTag::Other, 0, 7),
        ]);
        let cred = Cred {
            uid: 5,
            gid: GROUP,
            groups: &[],
        };
        assert_eq!(profile(&cred, &file(0o777), Some(&acl)), Profile::NONE);
    }

    #[test]
    fn zero_mask_denies_named_entries_strictly() {
        // user:5:rwx mask::--- other::r--: POSIX.1e gives uid 5 nothing (the mask), where
        // Linux would skip the ACL and give it other's r — an over-grant we do not copy.
        let acl = acl(&[
            (AclTag::UserObj, 0, 7),
            (AclTag::User, 5, 7),
            (AclTag::GroupObj, 0, 7),
            (AclTag::Mask, 0, 0),
            (AclTag::Other, 0, R),
        ]);
        let named = profile(
            &Cred {
                uid: 5,
                gid: 5,
                groups: &[],
            },
            &file(0o704),
            Some(&acl),
        );
        assert_eq!(named, Profile::NONE);
        let member = profile(
            &Cred {
                uid: 6,
                gid: 6,
                groups: &[GROUP],
            },
            &file(0o704),
            Some(&acl),
        );
        assert_eq!(member, Profile::NONE);
        let stranger = profile(
            &Cred {
                uid: 7,
                gid: 7,
                groups: &[],
            },
            &file(0o704),
            Some(&acl),
        );
        assert_eq!(stranger, Profile::subsets_of(R));
    }

    #[test]
    fn mode_only_uses_supplementary_groups() {
        let cred = Cred {
            uid: 1,
            gid: 2,
            groups: &[GROUP],
        };
        assert_eq!(
            profile(&cred, &file(0o750), None),
            Profile::subsets_of(R | X)
        );
        let stranger = Cred {
            uid: 1,
            gid: 2,
            groups: &[],
        };
        assert_eq!(
            profile(&stranger, &file(0o751), None),
            Profile::subsets_of(X)
        );
    }

    #[test]
    fn root_override() {
        let none = Profile::NONE;
        assert_eq!(with_root_override(none, true, 0o000), Profile::ALL);
        let file = with_root_override(none, false, 0o600);
        assert!(file.allows(R | W));
        assert!(
            !file.allows(X),
            "no execute bit anywhere → root may not execute"
        );
        assert_eq!(with_root_override(none, false, 0o010), Profile::ALL);
    }

    #[test]
    fn allows_rejects_unknown_bits() {
        assert!(!Profile::ALL.allows(8));
        assert!(Profile::NONE.allows(0));
        assert_eq!(Profile::from_bits(0).bits(), 1);
    }

    /// The reference: each request evaluated on its own by classifying the caller first, then
    /// asking the one class that applies — a different shape from the kernel's single walk.
    fn reference_allows(cred: &Cred, obj: &Object, acl: Option<&Acl>, want: u8) -> bool {
        let bits = |shift: u32| ((obj.mode >> shift) & 7) as u8;
        let subset = |have: u8| (have | want) == have;
        if obj.uid == cred.uid {
            return subset(bits(6));
        }
        let Some(acl) = acl else {
            let in_owning_group = cred.gid == obj.gid || cred.groups.contains(&obj.gid);
            return subset(if in_owning_group { bits(3) } else { bits(0) });
        };
        let entries = acl.entries();
        let mask = entries
            .iter()
            .find(|e| e.tag == AclTag::Mask)
            .map_or(7, |e| e.perm);
        if let Some(user) = entries
            .iter()
            .find(|e| e.tag == AclTag::User && e.id == cred.uid)
        {
            return subset(user.perm & mask);
        }
        let member_of = |gid: u32| cred.gid == gid || cred.groups.contains(&gid);
        let group_perms: Vec<u8> = entries
            .iter()
            .filter(|e| match e.tag {
                AclTag::GroupObj => member_of(obj.gid),
                AclTag::Group => member_of(e.id),
                _ => false,
            })
            .map(|e| e.perm)
            .collect();
        if group_perms.is_empty() {
            let other = entries
                .iter()
                .find(|e| e.tag == AclTag::Other)
                .map_or(0, |e| e.perm);
            return subset(other);
        }
        group_perms
            .iter()
            .any(|&perm| subset(perm) && subset(perm & mask))
    }

    proptest! {
        // The central safety property, and cheap: run it far beyond the default 256 cases.
        #![proptest_config(ProptestConfig::with_cases(8192))]

        #[test]
        fn profile_matches_reference(
            acl in proptest::option::of(crate::acl::tests::arb_valid_acl()),
            uid in 0u32..20,
            gid in 0u32..20,
            groups in proptest::collection::vec(0u32..20, 0..4),
            obj_uid in 0u32..20,
            obj_gid in 0u32..20,
            mode in 0u32..0o1000,
        ) {
            let cred = Cred { uid, gid, groups: &groups };
            let obj = Object { uid: obj_uid, gid: obj_gid, mode };
            let p = profile(&cred, &obj, acl.as_ref());
            for want in 0..8u8 {
                prop_assert_eq!(
                    p.allows(want),
                    reference_allows(&cred, &obj, acl.as_ref(), want),
                    "want {:o}", want
                );
            }
        }

        #[test]
        fn consistent_acl_and_mode_agree_for_minimal_acls(
            mode in 0u32..0o1000, uid in 0u32..4, gid in 0u32..4,
        ) {
            // A minimal ACL equal to the mode must behave exactly like no ACL at all.
            let acl = Acl::from_mode(mode);
            let cred = Cred { uid, gid, groups: &[] };
            let obj = Object { uid: 1, gid: 2, mode };
            prop_assert_eq!(profile(&cred, &obj, Some(&acl)), profile(&cred, &obj, None));
        }

        #[test]
        fn root_override_only_adds(bits: u8, is_dir: bool, mode in 0u32..0o1000) {
            let p = Profile::from_bits(bits);
            let root = with_root_override(p, is_dir, mode);
            prop_assert_eq!(root.bits() & p.bits(), p.bits());
            prop_assert!(root.allows(4 | 2));
        }
    }
}
