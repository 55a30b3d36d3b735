//! Permission logic of Strata's virtio-fs file server. The server checks every request itself
//! (a guest is not trusted), so this crate owns:
//!
//! * [`acl`] — POSIX.1e ACLs in the Linux xattr format (`system.posix_acl_access`/`_default`):
//!   hostile-input parsing, encoding, chmod, mode equivalence, default-ACL inheritance on create.
//! * [`eval`] — exact Linux permission evaluation (`generic_permission` + `posix_acl_permission`)
//!   into a [`Profile`]: one bit per rwx request, so caching never over-grants; root override.
//! * [`cache`] — [`PermCache`], the bounded, sharded cache of profiles per (VM, object,
//!   principal) with generation invalidation, a staleness bound and a per-object principal cap.
//! * [`identity`] — supplementary groups from an administrator's group file ([`GroupSource`]),
//!   with an epoch that changes when memberships do.
//! * [`idmap`] — per-share guest <-> host id ranges ([`IdMap`]).
//!
//! Not here: fetching ACLs and attributes (the datastore), FUSE decoding and the decision of
//! which request needs which bits (the `file-server` crate).

#![warn(missing_docs)]

pub mod acl;
pub mod cache;
pub mod eval;
pub mod identity;
pub mod idmap;

pub use acl::{inherit, Acl, AclEntry, AclError, AclTag, Inherited};
pub use cache::{PermCache, PermCacheConfig, PermCacheError, PermCacheStats, ProfileKey};
pub use eval::{profile, with_root_override, Cred, Object, Profile};
pub use identity::{GroupSource, GroupSourceStats, Groups, IdentityError};
pub use idmap::{IdMap, IdMapError, IdRange, OVERFLOW_ID};
