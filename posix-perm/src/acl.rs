//! POSIX.1e access control lists in the Linux xattr format: parsing (hostile input), encoding,
//! the mode <-> ACL relation (`chmod`, "is this ACL just a mode?") and default-ACL inheritance
//! on create.
//!
//! # Wire format (`system.posix_acl_access`, `system.posix_acl_default`)
//!
//! Everything is little-endian, whatever the host (Linux `include/uapi/linux/posix_acl_xattr.h`):
//!
//! | offset      | size | field     | meaning                                              |
//! |-------------|------|-----------|------------------------------------------------------|
//! | 0           | 4    | `version` | u32, must be [`ACL_XATTR_VERSION`] (2)               |
//! | 4 + 8·i     | 2    | `e_tag`   | u16: `USER_OBJ` 0x01, `USER` 0x02, `GROUP_OBJ` 0x04, `GROUP` 0x08, `MASK` 0x10, `OTHER` 0x20 |
//! | 6 + 8·i     | 2    | `e_perm`  | u16: r = 4, w = 2, x = 1; any other bit is invalid   |
//! | 8 + 8·i     | 4    | `e_id`    | u32: uid (`USER`) or gid (`GROUP`); ignored on input and written as `0xFFFF_FFFF` (`ACL_UNDEFINED_ID`) for the other tags |
//!
//! The value length is therefore `4 + 8·n`. A header with no entries means "no ACL" to the
//! kernel (`posix_acl_from_xattr` returns NULL): [`Acl::parse_xattr`] reports that as `None`,
//! [`Acl::parse`] as [`AclError::Empty`].
//!
//! # Validity (Linux `posix_acl_valid`, plus two stricter rules)
//!
//! Entries must come in tag order `USER_OBJ`, `USER`*, `GROUP_OBJ`, `GROUP`*, `MASK`?, `OTHER`,
//! with exactly one `USER_OBJ`, `GROUP_OBJ` and `OTHER` and at most one `MASK`; a `MASK` is
//! required when any named `USER`/`GROUP` entry exists. Like Linux, a `MASK` *without* named
//! entries is accepted (`setfacl -m m::r` produces one). Stricter than the kernel, which no longer
//! checks ids: named ids must not repeat and must not be `ACL_UNDEFINED_ID`. Named entries are
//! then sorted by id, the order `setfacl` (libacl) writes, so an [`Acl`] has one canonical form
//! and encodes byte-identically to what Linux tools produce.

use thiserror::Error;

/// The only xattr ACL version Linux knows (`POSIX_ACL_XATTR_VERSION`).
pub const ACL_XATTR_VERSION: u32 = 2;

/// The id written for entries without a qualifier (`ACL_UNDEFINED_ID`, `(u32)-1`).
pub const ACL_UNDEFINED_ID: u32 = u32::MAX;

/// Largest xattr value Linux accepts (`XATTR_SIZE_MAX`, 64 KiB); a longer value cannot come
/// from a real kernel, so it is rejected before any per-entry work.
pub const ACL_XATTR_SIZE_MAX_BYTES: usize = 65_536;

/// Entries that fit in [`ACL_XATTR_SIZE_MAX_BYTES`] after the 4-byte header (8191). Bounds
/// every walk over an ACL, including the eight walks of a profile evaluation.
pub const ACL_ENTRIES_MAX: usize =
    (ACL_XATTR_SIZE_MAX_BYTES - ACL_HEADER_SIZE_BYTES) / ACL_ENTRY_SIZE_BYTES;

const ACL_HEADER_SIZE_BYTES: usize = 4;
const ACL_ENTRY_SIZE_BYTES: usize = 8;

/// Read permission bit of an entry (and of a request).
pub const ACL_READ: u8 = 4;
/// Write permission bit.
pub const ACL_WRITE: u8 = 2;
/// Execute/search permission bit.
pub const ACL_EXECUTE: u8 = 1;
/// All three permission bits; anything outside is invalid in an entry.
pub const ACL_RWX: u8 = ACL_READ | ACL_WRITE | ACL_EXECUTE;

/// The rwx bits of a mode (`S_IRWXUGO`); chmod/inheritance touch only these.
const MODE_RWX_BITS: u32 = 0o777;

/// Why an ACL value was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AclError {
    /// The value is shorter than the 4-byte header.
    #[error("ACL value of {len_bytes} bytes is shorter than its header")]
    TooShort {
        /// Length of the rejected value.
        len_bytes: usize,
    },
    /// The value is longer than any kernel would produce.
    #[error("ACL value of {len_bytes} bytes exceeds the xattr size limit")]
    TooLong {
        /// Length of the rejected value.
        len_bytes: usize,
    },
    /// The header version is not 2.
    #[error("ACL version {0} is not supported")]
    BadVersion(u32),
    /// The entries do not fill whole 8-byte records.
    #[error("ACL value of {len_bytes} bytes is not a header plus whole entries")]
    Misaligned {
        /// Length of the rejected value.
        len_bytes: usize,
    },
    /// The ACL has no entries (a header-only value means "remove the ACL").
    #[error("ACL has no entries")]
    Empty,
    /// More entries than [`ACL_ENTRIES_MAX`].
    #[error("ACL has {count} entries, more than the limit")]
    TooManyEntries {
        /// Number of entries given.
        count: usize,
    },
    /// An entry's tag is none of the six known tags.
    #[error("ACL entry {index} has unknown tag {tag:#x}")]
    BadTag {
        /// Position of the entry.
        index: usize,
        /// The tag found.
        tag: u16,
    },
    /// An entry's permission has bits outside rwx.
    #[error("ACL entry {index} has invalid permission bits {perm:#x}")]
    BadPerm {
        /// Position of the entry.
        index: usize,
        /// The permission found.
        perm: u16,
    },
    /// Tags are not in the order the kernel requires.
    #[error("ACL entry {index} ({tag:?}) is out of order")]
    OutOfOrder {
        /// Position of the entry.
        index: usize,
        /// Its tag.
        tag: AclTag,
    },
    /// A tag that must appear exactly once is missing.
    #[error("ACL has no {0:?} entry")]
    Missing(AclTag),
    /// A tag that may appear at most once appears twice.
    #[error("ACL has more than one {0:?} entry")]
    Repeated(AclTag),
    /// Named entries exist but there is no `MASK`.
    #[error("ACL has named entries but no mask")]
    MissingMask,
    /// Two named entries of the same tag share an id.
    #[error("ACL names {tag:?} {id} twice")]
    DuplicateId {
        /// `User` or `Group`.
        tag: AclTag,
        /// The repeated id.
        id: u32,
    },
    /// A named entry uses the undefined id, which maps to no user or group.
    #[error("ACL entry {tag:?} uses the undefined id")]
    UndefinedId {
        /// `User` or `Group`.
        tag: AclTag,
    },
}

/// The six entry tags. Discriminants are the wire values, and their numeric order is the order
/// entries must appear in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u16)]
pub enum AclTag {
    /// The file owner (`ACL_USER_OBJ`).
    UserObj = 0x01,
    /// A named user (`ACL_USER`).
    User = 0x02,
    /// The owning group (`ACL_GROUP_OBJ`).
    GroupObj = 0x04,
    /// A named group (`ACL_GROUP`).
    Group = 0x08,
    /// Upper bound for the group class (`ACL_MASK`).
    Mask = 0x10,
    /// Everyone else (`ACL_OTHER`).
    Other = 0x20,
}

impl AclTag {
    /// The tag for a wire value, or `None` for an unknown one.
    pub fn from_wire(tag: u16) -> Option<AclTag> {
        match tag {
            0x01 => Some(AclTag::UserObj),
            0x02 => Some(AclTag::User),
            0x04 => Some(AclTag::GroupObj),
            0x08 => Some(AclTag::Group),
            0x10 => Some(AclTag::Mask),
            0x20 => Some(AclTag::Other),
            _ => None,
        }
    }

    /// Whether the entry carries a uid/gid qualifier.
    pub fn is_named(self) -> bool {
        matches!(self, AclTag::User | AclTag::Group)
    }
}

/// One ACL entry. `id` is meaningful only for [`AclTag::User`] and [`AclTag::Group`]; for the
/// other tags it is always [`ACL_UNDEFINED_ID`] inside an [`Acl`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AclEntry {
    /// What the entry applies to.
    pub tag: AclTag,
    /// uid or gid for named entries.
    pub id: u32,
    /// rwx bits (r = 4, w = 2, x = 1).
    pub perm: u8,
}

impl AclEntry {
    /// An entry without qualifier (`UserObj`, `GroupObj`, `Mask`, `Other`).
    pub fn unnamed(tag: AclTag, perm: u8) -> AclEntry {
        AclEntry {
            tag,
            id: ACL_UNDEFINED_ID,
            perm,
        }
    }

    /// A named entry (`User` or `Group`).
    pub fn named(tag: AclTag, id: u32, perm: u8) -> AclEntry {
        AclEntry { tag, id, perm }
    }
}

/// A validated ACL in canonical order (see the module docs for the rules).
///
/// Invariants: exactly one `UserObj`, `GroupObj`, `Other`; at most one `Mask`, present whenever
/// a named entry is; entries sorted by (tag, id) with no repeated named id; every `perm` ≤ 7;
/// unnamed entries carry [`ACL_UNDEFINED_ID`]; at most [`ACL_ENTRIES_MAX`] entries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Acl {
    entries: Vec<AclEntry>,
}

/// Result of default-ACL inheritance on create (see [`inherit`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inherited {
    /// Mode for the new object: the create mode with its rwx bits narrowed by the ACL; file-type
    /// and setuid/setgid/sticky bits of the create mode are kept.
    pub mode: u32,
    /// Access ACL to store, `None` when it is equivalent to `mode`.
    pub access: Option<Acl>,
    /// Default ACL to store (directories only).
    pub default: Option<Acl>,
}

impl Acl {
    /// Parses an xattr value; a header with no entries is [`AclError::Empty`].
    ///
    /// Never panics, whatever the bytes: every length is checked before it is used.
    pub fn parse(bytes: &[u8]) -> Result<Acl, AclError> {
        Acl::parse_xattr(bytes)?.ok_or(AclError::Empty)
    }

    /// Parses an xattr value as the kernel does: `Ok(None)` for a header with no entries, which
    /// Linux treats as removing the ACL.
    pub fn parse_xattr(bytes: &[u8]) -> Result<Option<Acl>, AclError> {
        let len_bytes = bytes.len();
        if len_bytes > ACL_XATTR_SIZE_MAX_BYTES {
            return Err(AclError::TooLong { len_bytes });
        }
        let Some((header, body)) = bytes.split_first_chunk::<ACL_HEADER_SIZE_BYTES>() else {
            return Err(AclError::TooShort { len_bytes });
        };
        let version = u32::from_le_bytes(*header);
        if version != ACL_XATTR_VERSION {
            return Err(AclError::BadVersion(version));
        }
        if body.len() % ACL_ENTRY_SIZE_BYTES != 0 {
            return Err(AclError::Misaligned { len_bytes });
        }
        if body.is_empty() {
            return Ok(None);
        }
        let mut entries = Vec::with_capacity(body.len() / ACL_ENTRY_SIZE_BYTES);
        let mut previous_tag = AclTag::UserObj;
        for (index, raw) in body.chunks_exact(ACL_ENTRY_SIZE_BYTES).enumerate() {
            let entry = parse_entry(index, raw)?;
            // The kernel's state machine demands tag order; ids within a run are sorted below,
            // which the kernel does not require.
            if entry.tag < previous_tag {
                return Err(AclError::OutOfOrder {
                    index,
                    tag: entry.tag,
                });
            }
            previous_tag = entry.tag;
            entries.push(entry);
        }
        Acl::from_entries(entries).map(Some)
    }

    /// Builds an ACL from entries in any order: sorts them canonically and validates them.
    /// Ids of unnamed entries are ignored (normalised to [`ACL_UNDEFINED_ID`]).
    pub fn from_entries(mut entries: Vec<AclEntry>) -> Result<Acl, AclError> {
        if entries.is_empty() {
            return Err(AclError::Empty);
        }
        if entries.len() > ACL_ENTRIES_MAX {
            return Err(AclError::TooManyEntries {
                count: entries.len(),
            });
        }
        for (index, entry) in entries.iter_mut().enumerate() {
            if entry.perm & !ACL_RWX != 0 {
                return Err(AclError::BadPerm {
                    index,
                    perm: u16::from(entry.perm),
                });
            }
            if !entry.tag.is_named() {
                entry.id = ACL_UNDEFINED_ID;
            } else if entry.id == ACL_UNDEFINED_ID {
                return Err(AclError::UndefinedId { tag: entry.tag });
            }
        }
        entries.sort_unstable_by_key(|entry| (entry.tag, entry.id));
        validate_sorted(&entries)?;
        Ok(Acl { entries })
    }

    /// The minimal ACL equivalent to a mode: `USER_OBJ`, `GROUP_OBJ`, `OTHER` from its rwx bits.
    pub fn from_mode(mode: u32) -> Acl {
        Acl {
            entries: vec![
                AclEntry::unnamed(AclTag::UserObj, mode_class_bits(mode, 6)),
                AclEntry::unnamed(AclTag::GroupObj, mode_class_bits(mode, 3)),
                AclEntry::unnamed(AclTag::Other, mode_class_bits(mode, 0)),
            ],
        }
    }

    /// Encodes the ACL in the xattr format (see the module docs).
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes =
            Vec::with_capacity(ACL_HEADER_SIZE_BYTES + ACL_ENTRY_SIZE_BYTES * self.entries.len());
        bytes.extend_from_slice(&ACL_XATTR_VERSION.to_le_bytes());
        for entry in &self.entries {
            bytes.extend_from_slice(&(entry.tag as u16).to_le_bytes());
            bytes.extend_from_slice(&u16::from(entry.perm).to_le_bytes());
            bytes.extend_from_slice(&entry.id.to_le_bytes());
        }
        bytes
    }

    /// The entries in canonical order.
    pub fn entries(&self) -> &[AclEntry] {
        &self.entries
    }

    /// Permission of the `USER_OBJ` entry.
    pub fn user_obj(&self) -> u8 {
        self.unnamed_perm(AclTag::UserObj).unwrap_or(0)
    }

    /// Permission of the `GROUP_OBJ` entry.
    pub fn group_obj(&self) -> u8 {
        self.unnamed_perm(AclTag::GroupObj).unwrap_or(0)
    }

    /// Permission of the `MASK` entry, if any.
    pub fn mask(&self) -> Option<u8> {
        self.unnamed_perm(AclTag::Mask)
    }

    /// Permission of the `OTHER` entry.
    pub fn other(&self) -> u8 {
        self.unnamed_perm(AclTag::Other).unwrap_or(0)
    }

    /// The 0o777 mode bits this ACL implies: owner = `USER_OBJ`, group = `MASK` if present
    /// else `GROUP_OBJ`, other = `OTHER` (Linux `posix_acl_equiv_mode`'s mode).
    pub fn mode_bits(&self) -> u32 {
        let group_class = self.mask().unwrap_or_else(|| self.group_obj());
        (u32::from(self.user_obj()) << 6) | (u32::from(group_class) << 3) | u32::from(self.other())
    }

    /// `Some(mode bits)` when the ACL is minimal (only `USER_OBJ`, `GROUP_OBJ`, `OTHER`) and can
    /// be dropped in favour of the mode; `None` when it carries more than a mode can.
    pub fn equivalent_mode(&self) -> Option<u32> {
        let minimal = self.entries.len() == 3;
        minimal.then(|| self.mode_bits())
    }

    /// Applies `chmod(mode)` (Linux `__posix_acl_chmod`): `USER_OBJ` takes the owner bits,
    /// `MASK` (or `GROUP_OBJ` when there is no mask) the group bits, `OTHER` the other bits.
    /// Named entries keep their bits; the mask limits them.
    pub fn apply_chmod(&mut self, mode: u32) {
        let has_mask = self.mask().is_some();
        for entry in &mut self.entries {
            match entry.tag {
                AclTag::UserObj => entry.perm = mode_class_bits(mode, 6),
                AclTag::GroupObj if !has_mask => entry.perm = mode_class_bits(mode, 3),
                AclTag::Mask => entry.perm = mode_class_bits(mode, 3),
                AclTag::Other => entry.perm = mode_class_bits(mode, 0),
                AclTag::User | AclTag::Group | AclTag::GroupObj => {}
            }
        }
    }

    /// The same ACL with the qualifiers of named entries translated — `user` for `USER`
    /// entries, `group` for `GROUP` — e.g. guest ids to datastore ids through a share's id
    /// maps. `Ok(None)` when a translation refuses an id; an error when translated ids
    /// collide.
    pub fn map_ids(
        &self,
        user: impl Fn(u32) -> Option<u32>,
        group: impl Fn(u32) -> Option<u32>,
    ) -> Result<Option<Acl>, AclError> {
        let mut entries = self.entries.clone();
        for entry in &mut entries {
            let mapped = match entry.tag {
                AclTag::User => user(entry.id),
                AclTag::Group => group(entry.id),
                _ => continue,
            };
            match mapped {
                Some(id) => entry.id = id,
                None => return Ok(None),
            }
        }
        Acl::from_entries(entries).map(Some)
    }

    /// Encodes the ACL with named qualifiers translated by total functions, e.g. datastore
    /// ids to guest ids with ids outside the map shown as the overflow id. Translated ids
    /// may collide (several unmapped ids shown as one), so the result is for display and is
    /// not re-validated; named entries stay sorted by their shown id.
    pub fn encode_mapped(&self, user: impl Fn(u32) -> u32, group: impl Fn(u32) -> u32) -> Vec<u8> {
        let mut entries = self.entries.clone();
        for entry in &mut entries {
            match entry.tag {
                AclTag::User => entry.id = user(entry.id),
                AclTag::Group => entry.id = group(entry.id),
                _ => {}
            }
        }
        entries.sort_by_key(|entry| (entry.tag, entry.id));
        Acl { entries }.encode()
    }

    fn unnamed_perm(&self, tag: AclTag) -> Option<u8> {
        debug_assert!(!tag.is_named());
        self.entries
            .iter()
            .find(|entry| entry.tag == tag)
            .map(|entry| entry.perm)
    }
}

/// Default-ACL inheritance for an object created in a directory that has a default ACL
/// (Linux `posix_acl_create` + `posix_acl_create_masq`).
///
/// The access ACL is the parent's default ACL with `USER_OBJ`, `MASK` (or `GROUP_OBJ` without a
/// mask) and `OTHER` ANDed with the matching bits of `create_mode`, and the mode is narrowed to
/// what those entries then allow. The umask is *not* applied — the caller applies it only when
/// the parent has no default ACL. The access ACL is `None` when it is equivalent to the mode.
/// Directories also receive the parent's default ACL unchanged as their own default.
pub fn inherit(parent_default: &Acl, create_mode: u32, is_dir: bool) -> Inherited {
    let mut access = parent_default.clone();
    let mut mode = create_mode & MODE_RWX_BITS;
    let has_mask = access.mask().is_some();
    for entry in &mut access.entries {
        let shift = match entry.tag {
            AclTag::UserObj => 6,
            AclTag::Mask => 3,
            AclTag::GroupObj if !has_mask => 3,
            AclTag::Other => 0,
            AclTag::User | AclTag::Group | AclTag::GroupObj => continue,
        };
        entry.perm &= mode_class_bits(mode, shift);
        // Keep every bit outside this class, and of this class only what the entry kept.
        mode &= (u32::from(entry.perm) << shift) | !(u32::from(ACL_RWX) << shift);
    }
    debug_assert_eq!(mode & !MODE_RWX_BITS, 0);
    debug_assert_eq!(access.mode_bits(), mode);
    let access = access.equivalent_mode().is_none().then_some(access);
    Inherited {
        mode: (create_mode & !MODE_RWX_BITS) | mode,
        access,
        default: is_dir.then(|| parent_default.clone()),
    }
}

/// The three rwx bits of a mode class (`shift` 6 = owner, 3 = group, 0 = other).
fn mode_class_bits(mode: u32, shift: u32) -> u8 {
    // Masked to three bits, so the narrowing cannot lose anything.
    ((mode >> shift) & u32::from(ACL_RWX)) as u8
}

fn parse_entry(index: usize, raw: &[u8]) -> Result<AclEntry, AclError> {
    let Some((&[tag_lo, tag_hi, perm_lo, perm_hi], id_bytes)) = raw.split_first_chunk::<4>() else {
        return Err(AclError::Misaligned {
            len_bytes: raw.len(),
        });
    };
    let Ok(id_bytes) = <[u8; 4]>::try_from(id_bytes) else {
        return Err(AclError::Misaligned {
            len_bytes: raw.len(),
        });
    };
    let tag_wire = u16::from_le_bytes([tag_lo, tag_hi]);
    let perm_wire = u16::from_le_bytes([perm_lo, perm_hi]);
    let Some(tag) = AclTag::from_wire(tag_wire) else {
        return Err(AclError::BadTag {
            index,
            tag: tag_wire,
        });
    };
    let Ok(perm) = u8::try_from(perm_wire) else {
        return Err(AclError::BadPerm {
            index,
            perm: perm_wire,
        });
    };
    if perm & !ACL_RWX != 0 {
        return Err(AclError::BadPerm {
            index,
            perm: perm_wire,
        });
    }
    Ok(AclEntry {
        tag,
        id: u32::from_le_bytes(id_bytes),
        perm,
    })
}

/// Checks the structural rules on entries already sorted by (tag, id).
fn validate_sorted(entries: &[AclEntry]) -> Result<(), AclError> {
    let count = |tag: AclTag| entries.iter().filter(|entry| entry.tag == tag).count();
    for tag in [AclTag::UserObj, AclTag::GroupObj, AclTag::Other] {
        match count(tag) {
            0 => return Err(AclError::Missing(tag)),
            1 => {}
            _ => return Err(AclError::Repeated(tag)),
        }
    }
    let masks = count(AclTag::Mask);
    if masks > 1 {
        return Err(AclError::Repeated(AclTag::Mask));
    }
    let has_named = entries.iter().any(|entry| entry.tag.is_named());
    if has_named && masks == 0 {
        return Err(AclError::MissingMask);
    }
    for pair in entries.windows(2) {
        if let [first, second] = pair {
            if first.tag.is_named() && first.tag == second.tag && first.id == second.id {
                return Err(AclError::DuplicateId {
                    tag: first.tag,
                    id: first.id,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;

    fn entry_bytes(tag: u16, perm: u16, id: u32) -> Vec<u8> {
        let mut bytes = tag.to_le_bytes().to_vec();
        bytes.extend_from_slice(&perm.to_le_bytes());
        bytes.extend_from_slice(&id.to_le_bytes());
        bytes
    }

    fn value(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut bytes = 2u32.to_le_bytes().to_vec();
        for &(tag, perm, id) in entries {
            bytes.extend(entry_bytes(tag, perm, id));
        }
        bytes
    }

    const U: u32 = ACL_UNDEFINED_ID;

    fn sample() -> Acl {
        // user::rw- user:1000:r-x user:7:rwx group::r-- group:50:-w- mask::r-x other::---
        Acl::from_entries(vec![
            AclEntry::unnamed(AclTag::UserObj, 6),
            AclEntry::named(AclTag::User, 1000, 5),
            AclEntry::named(AclTag::User, 7, 7),
            AclEntry::unnamed(AclTag::GroupObj, 4),
            AclEntry::named(AclTag::Group, 50, 2),
            AclEntry::unnamed(AclTag::Mask, 5),
            AclEntry::unnamed(AclTag::Other, 0),
        ])
        .unwrap()
    }

    #[test]
    fn encodes_byte_by_byte() {
        let acl = Acl::from_mode(0o751);
        assert_eq!(
            acl.encode(),
            value(&[(0x01, 7, U), (0x04, 5, U), (0x20, 1, U)]),
        );
        assert_eq!(&acl.encode()[..8], &[2, 0, 0, 0, 1, 0, 7, 0]);
    }

    #[test]
    fn parse_sorts_named_ids_and_round_trips() {
        let unsorted = value(&[
            (0x01, 6, 0),
            (0x02, 5, 1000),
            (0x02, 7, 7),
            (0x04, 4, 12345),
            (0x08, 2, 50),
            (0x10, 5, U),
            (0x20, 0, U),
        ]);
        let acl = Acl::parse(&unsorted).unwrap();
        assert_eq!(acl, sample());
        let ids: Vec<u32> = acl.entries().iter().map(|entry| entry.id).collect();
        assert_eq!(ids, vec![U, 7, 1000, U, 50, U, U]);
        assert_eq!(Acl::parse(&acl.encode()).unwrap(), acl);
    }

    #[test]
    fn header_only_means_no_acl() {
        assert_eq!(Acl::parse_xattr(&value(&[])), Ok(None));
        assert_eq!(Acl::parse(&value(&[])), Err(AclError::Empty));
    }

    #[test]
    fn rejects_malformed_values() {
        let minimal = [(0x01, 6, U), (0x04, 4, U), (0x20, 4, U)];
        assert_eq!(
            Acl::parse(&[2, 0]),
            Err(AclError::TooShort { len_bytes: 2 })
        );
        let mut wrong_version = value(&minimal);
        wrong_version[0] = 1;
        assert_eq!(Acl::parse(&wrong_version), Err(AclError::BadVersion(1)));
        let mut truncated = value(&minimal);
        truncated.pop();
        assert!(matches!(
            Acl::parse(&truncated),
            Err(AclError::Misaligned { .. })
        ));
        let bad_tag = value(&[(0x01, 6, U), (0x40, 4, U), (0x20, 4, U)]);
        assert_eq!(
            Acl::parse(&bad_tag),
            Err(AclError::BadTag {
                index: 1,
                tag: 0x40
            })
        );
        let bad_perm = value(&[(0x01, 8, U), (0x04, 4, U), (0x20, 4, U)]);
        assert_eq!(
            Acl::parse(&bad_perm),
            Err(AclError::BadPerm { index: 0, perm: 8 })
        );
        let huge_perm = value(&[(0x01, 0x100, U), (0x04, 4, U), (0x20, 4, U)]);
        assert!(matches!(
            Acl::parse(&huge_perm),
            Err(AclError::BadPerm { .. })
        ));
        let out_of_order = value(&[(0x04, 4, U), (0x01, 6, U), (0x20, 4, U)]);
        assert!(matches!(
            Acl::parse(&out_of_order),
            Err(AclError::OutOfOrder { index: 1, .. })
        ));
        let no_other = value(&[(0x01, 6, U), (0x04, 4, U)]);
        assert_eq!(Acl::parse(&no_other), Err(AclError::Missing(AclTag::Other)));
        let two_owners = value(&[(0x01, 6, U), (0x01, 6, U), (0x04, 4, U), (0x20, 4, U)]);
        assert_eq!(
            Acl::parse(&two_owners),
            Err(AclError::Repeated(AclTag::UserObj))
        );
        let no_mask = value(&[(0x01, 6, U), (0x02, 6, 5), (0x04, 4, U), (0x20, 4, U)]);
        assert_eq!(Acl::parse(&no_mask), Err(AclError::MissingMask));
        let duplicate = value(&[
            (0x01, 6, U),
            (0x04, 4, U),
            (0x08, 4, 9),
            (0x08, 2, 9),
            (0x10, 7, U),
            (0x20, 4, U),
        ]);
        assert_eq!(
            Acl::parse(&duplicate),
            Err(AclError::DuplicateId {
                tag: AclTag::Group,
                id: 9
            })
        );
        let undefined = value(&[
            (0x01, 6, U),
            (0x02, 6, U),
            (0x04, 4, U),
            (0x10, 7, U),
            (0x20, 4, U),
        ]);
        assert_eq!(
            Acl::parse(&undefined),
            Err(AclError::UndefinedId { tag: AclTag::User })
        );
        let too_long = vec![0u8; ACL_XATTR_SIZE_MAX_BYTES + 4];
        assert!(matches!(
            Acl::parse(&too_long),
            Err(AclError::TooLong { .. })
        ));
    }

    #[test]
    fn named_ids_are_translated_both_ways() {
        let acl = sample();
        let shift = |id: u32| id.checked_add(100_000);
        let host = acl.map_ids(shift, shift).unwrap().unwrap();
        let named: Vec<u32> = host
            .entries()
            .iter()
            .filter(|e| e.tag.is_named())
            .map(|e| e.id)
            .collect();
        assert_eq!(named, [100_007, 101_000, 100_050]);
        // Back, with a total function: the original bytes.
        let back = host.encode_mapped(|id| id - 100_000, |id| id - 100_000);
        assert_eq!(back, acl.encode());
        // A refused id refuses the ACL; colliding translations are invalid.
        assert_eq!(acl.map_ids(|id| (id != 7).then_some(id), Some), Ok(None));
        assert!(acl.map_ids(|_| Some(1), Some).is_err());
        // Display may collide (two unmapped users shown as the same id).
        let shown = acl.encode_mapped(|_| 65_534, |id| id);
        assert_eq!(&shown[12..20], &entry_bytes(0x02, 7, 65_534)[..]);
        assert_eq!(&shown[20..28], &entry_bytes(0x02, 5, 65_534)[..]);
    }

    #[test]
    fn mask_without_named_entries_is_accepted_like_linux() {
        let acl = Acl::parse(&value(&[
            (0x01, 6, U),
            (0x04, 6, U),
            (0x10, 4, U),
            (0x20, 0, U),
        ]))
        .unwrap();
        assert_eq!(acl.mode_bits(), 0o640);
        // A mask means the group class differs from GROUP_OBJ, so a mode cannot replace it.
        assert_eq!(acl.equivalent_mode(), None);
    }

    #[test]
    fn mode_bits_use_mask_for_the_group_class() {
        assert_eq!(sample().mode_bits(), 0o650);
        assert_eq!(sample().equivalent_mode(), None);
        assert_eq!(Acl::from_mode(0o4754).mode_bits(), 0o754);
        assert_eq!(Acl::from_mode(0o754).equivalent_mode(), Some(0o754));
    }

    #[test]
    fn chmod_rewrites_mask_not_group_obj() {
        let mut acl = sample();
        acl.apply_chmod(0o701);
        assert_eq!(acl.user_obj(), 7);
        assert_eq!(acl.mask(), Some(0));
        assert_eq!(acl.group_obj(), 4, "GROUP_OBJ is kept when a mask exists");
        assert_eq!(acl.other(), 1);
        assert_eq!(acl.mode_bits(), 0o701);
        let mut minimal = Acl::from_mode(0o644);
        minimal.apply_chmod(0o751);
        assert_eq!(minimal, Acl::from_mode(0o751));
    }

    #[test]
    fn inherit_masks_default_acl_with_create_mode() {
        // setfacl -d: user::rwx user:1000:rwx group::r-x mask::rwx other::r-x
        let default = Acl::from_entries(vec![
            AclEntry::unnamed(AclTag::UserObj, 7),
            AclEntry::named(AclTag::User, 1000, 7),
            AclEntry::unnamed(AclTag::GroupObj, 5),
            AclEntry::unnamed(AclTag::Mask, 7),
            AclEntry::unnamed(AclTag::Other, 5),
        ])
        .unwrap();
        // open(O_CREAT, 0666): no umask, the mask takes the group bits of the create mode.
        let file = inherit(&default, 0o100_666, false);
        assert_eq!(file.mode, 0o100_664);
        let access = file.access.unwrap();
        assert_eq!(access.user_obj(), 6);
        assert_eq!(access.mask(), Some(6));
        assert_eq!(
            access.group_obj(),
            5,
            "GROUP_OBJ is untouched when a mask exists"
        );
        assert_eq!(access.other(), 4);
        assert_eq!(file.default, None);
        // mkdir(02750): setgid kept, default ACL propagated.
        let dir = inherit(&default, 0o42_750, true);
        assert_eq!(dir.mode, 0o42_750);
        assert_eq!(dir.access.unwrap().mode_bits(), 0o750);
        assert_eq!(dir.default, Some(default));
    }

    #[test]
    fn inherit_of_minimal_default_gives_mode_only() {
        let default = Acl::from_mode(0o750);
        let file = inherit(&default, 0o666, false);
        assert_eq!(file.mode, 0o640);
        assert_eq!(file.access, None);
        assert_eq!(file.default, None);
    }

    fn arb_acl() -> impl Strategy<Value = Acl> {
        (
            0u8..8,
            0u8..8,
            0u8..8,
            proptest::option::of(0u8..8),
            proptest::collection::btree_map(0u32..20, 0u8..8, 0..4),
            proptest::collection::btree_map(0u32..20, 0u8..8, 0..4),
        )
            .prop_map(|(user_obj, group_obj, other, mask, users, groups)| {
                let mut entries = vec![
                    AclEntry::unnamed(AclTag::UserObj, user_obj),
                    AclEntry::unnamed(AclTag::GroupObj, group_obj),
                    AclEntry::unnamed(AclTag::Other, other),
                ];
                let needs_mask = !users.is_empty() || !groups.is_empty();
                entries.extend(
                    users
                        .iter()
                        .map(|(&id, &p)| AclEntry::named(AclTag::User, id, p)),
                );
                entries.extend(
                    groups
                        .iter()
                        .map(|(&id, &p)| AclEntry::named(AclTag::Group, id, p)),
                );
                match (mask, needs_mask) {
                    (Some(mask), _) => entries.push(AclEntry::unnamed(AclTag::Mask, mask)),
                    (None, true) => entries.push(AclEntry::unnamed(AclTag::Mask, 7)),
                    (None, false) => {}
                }
                Acl::from_entries(entries).unwrap()
            })
    }

    pub(crate) fn arb_valid_acl() -> impl Strategy<Value = Acl> {
        arb_acl()
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Acl::parse(&bytes);
        }

        #[test]
        fn parse_never_panics_on_plausible_values(
            entries in proptest::collection::vec((0u16..0x41, 0u16..9, 0u32..4), 0..10)
        ) {
            let bytes = value(&entries);
            if let Ok(acl) = Acl::parse(&bytes) {
                // Whatever is accepted re-encodes to something that parses to the same ACL.
                prop_assert_eq!(Acl::parse(&acl.encode()).unwrap(), acl);
            }
        }

        #[test]
        fn encode_parse_round_trip(acl in arb_acl()) {
            let bytes = acl.encode();
            prop_assert_eq!(bytes.len(), 4 + 8 * acl.entries().len());
            prop_assert_eq!(Acl::parse(&bytes).unwrap(), acl);
        }

        #[test]
        fn chmod_then_mode_bits_is_the_mode(acl in arb_acl(), mode in 0u32..0o10000) {
            let mut acl = acl;
            acl.apply_chmod(mode);
            prop_assert_eq!(acl.mode_bits(), mode & 0o777);
        }

        #[test]
        fn inherit_never_widens(acl in arb_acl(), mode in 0u32..0o10000, is_dir: bool) {
            let inherited = inherit(&acl, mode, is_dir);
            prop_assert_eq!(inherited.mode & !0o777, mode & !0o777);
            prop_assert_eq!(inherited.mode & 0o777 & !mode, 0);
            prop_assert_eq!(inherited.mode & 0o777 & !acl.mode_bits(), 0);
            match &inherited.access {
                Some(access) => prop_assert_eq!(access.mode_bits(), inherited.mode & 0o777),
                None => prop_assert!(acl.equivalent_mode().is_some()),
            }
            prop_assert_eq!(inherited.default.is_some(), is_dir);
        }
    }
}
