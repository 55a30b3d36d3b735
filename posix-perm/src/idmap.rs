//! Per-share id mapping between the ids a guest uses and the ids stored on the host.
//!
//! # Syntax
//!
//! ```text
//! map    = "" | range *( ";" range )
//! range  = GUEST ":" HOST ":" COUNT        (decimal; spaces around fields are allowed)
//! ```
//!
//! `GUEST:HOST:COUNT` maps guest ids `GUEST .. GUEST+COUNT` to host ids `HOST .. HOST+COUNT`,
//! like a line of `/proc/<pid>/uid_map`. Example: `0:100000:65536;65534:65534:1` maps guest root
//! to host 100000 and so on, and keeps `nobody` as is. An empty (or all-blank) map is the
//! identity. `COUNT` is at least 1 and a range must end by 2^32; guest ranges must not overlap
//! each other, nor host ranges each other (the map has to be invertible).
//!
//! A guest id outside every range has no host id: the server refuses the request (EPERM). A host
//! id outside every range is shown to the guest as [`OVERFLOW_ID`], as the kernel does for
//! unmapped ids in a user namespace.

use std::fmt;

use thiserror::Error;

/// What an unmapped host id looks like to a guest (`/proc/sys/kernel/overflowuid`, `nobody`).
pub const OVERFLOW_ID: u32 = 65_534;

/// Most ranges in a map; the same limit as a Linux `uid_map` (340 lines), which no sensible
/// configuration reaches, and which keeps parsing and validation trivially cheap.
pub const IDMAP_RANGES_MAX: usize = 340;

/// Number of ids a `u32` id space holds; ranges must end within it.
const ID_SPACE_SIZE: u64 = 1 << 32;

/// Why a map specification was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IdMapError {
    /// A range is not three `:`-separated fields.
    #[error("range {index} ({text:?}) is not GUEST:HOST:COUNT")]
    BadRange {
        /// Position of the range.
        index: usize,
        /// Its text.
        text: String,
    },
    /// A field is not a decimal number that fits.
    #[error("range {index}: {text:?} is not a decimal id")]
    BadNumber {
        /// Position of the range.
        index: usize,
        /// The field.
        text: String,
    },
    /// `COUNT` is zero.
    #[error("range {index} has a count of zero")]
    ZeroCount {
        /// Position of the range.
        index: usize,
    },
    /// A range runs past the last id.
    #[error("range {index} runs past id 4294967295")]
    Overflow {
        /// Position of the range.
        index: usize,
    },
    /// More than [`IDMAP_RANGES_MAX`] ranges.
    #[error("{count} ranges, more than the limit")]
    TooManyRanges {
        /// Number of ranges given.
        count: usize,
    },
    /// Two guest ranges share ids.
    #[error("guest ranges {first} and {second} overlap")]
    GuestOverlap {
        /// Position of one range.
        first: usize,
        /// Position of the other.
        second: usize,
    },
    /// Two host ranges share ids.
    #[error("host ranges {first} and {second} overlap")]
    HostOverlap {
        /// Position of one range.
        first: usize,
        /// Position of the other.
        second: usize,
    },
}

/// One range: `count` ids from `guest` map to as many from `host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    /// First guest id.
    pub guest: u32,
    /// First host id.
    pub host: u32,
    /// Number of ids (1 ..= 2^32).
    pub count: u64,
}

impl IdRange {
    fn contains(start: u32, count: u64, id: u32) -> bool {
        let offset = u64::from(id).wrapping_sub(u64::from(start));
        id >= start && offset < count
    }
}

/// A validated id map; see the module docs. Lookups are binary searches and allocate nothing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IdMap {
    /// Sorted by `guest`; empty = identity.
    by_guest: Vec<IdRange>,
    /// The same ranges sorted by `host`.
    by_host: Vec<IdRange>,
}

impl IdMap {
    /// The identity map.
    pub fn identity() -> IdMap {
        IdMap::default()
    }

    /// Parses a map specification (see the module docs). Never panics.
    pub fn parse(spec: &str) -> Result<IdMap, IdMapError> {
        if spec.trim().is_empty() {
            return Ok(IdMap::identity());
        }
        let mut ranges = Vec::new();
        for (index, text) in spec.split(';').enumerate() {
            if index >= IDMAP_RANGES_MAX {
                return Err(IdMapError::TooManyRanges {
                    count: spec.split(';').count(),
                });
            }
            ranges.push(parse_range(index, text)?);
        }
        IdMap::from_ranges(ranges)
    }

    /// Builds a map from ranges in any order, with the same checks as [`IdMap::parse`].
    pub fn from_ranges(ranges: Vec<IdRange>) -> Result<IdMap, IdMapError> {
        if ranges.len() > IDMAP_RANGES_MAX {
            return Err(IdMapError::TooManyRanges {
                count: ranges.len(),
            });
        }
        for (index, range) in ranges.iter().enumerate() {
            if range.count == 0 {
                return Err(IdMapError::ZeroCount { index });
            }
            let fits = |start: u32| u64::from(start) + range.count <= ID_SPACE_SIZE;
            if !fits(range.guest) || !fits(range.host) {
                return Err(IdMapError::Overflow { index });
            }
        }
        let mut order: Vec<usize> = (0..ranges.len()).collect();
        order.sort_by_key(|&i| ranges[i].guest);
        if let Some((first, second)) = first_overlap(&ranges, &order, |r| r.guest) {
            return Err(IdMapError::GuestOverlap { first, second });
        }
        let by_guest: Vec<IdRange> = order.iter().map(|&i| ranges[i]).collect();
        order.sort_by_key(|&i| ranges[i].host);
        if let Some((first, second)) = first_overlap(&ranges, &order, |r| r.host) {
            return Err(IdMapError::HostOverlap { first, second });
        }
        let by_host: Vec<IdRange> = order.iter().map(|&i| ranges[i]).collect();
        Ok(IdMap { by_guest, by_host })
    }

    /// Whether this is the identity map.
    pub fn is_identity(&self) -> bool {
        self.by_guest.is_empty()
    }

    /// The ranges, sorted by guest id.
    pub fn ranges(&self) -> &[IdRange] {
        &self.by_guest
    }

    /// The host id for a guest id; `None` when the guest id is outside the map (refuse: EPERM).
    pub fn to_host(&self, guest_id: u32) -> Option<u32> {
        if self.is_identity() {
            return Some(guest_id);
        }
        let range = find(&self.by_guest, guest_id, |r| r.guest)?;
        Some(range.host + (guest_id - range.guest))
    }

    /// The guest id for a host id; `None` when the host id is outside the map.
    pub fn to_guest(&self, host_id: u32) -> Option<u32> {
        if self.is_identity() {
            return Some(host_id);
        }
        let range = find(&self.by_host, host_id, |r| r.host)?;
        Some(range.guest + (host_id - range.host))
    }

    /// The guest id for a host id, or [`OVERFLOW_ID`] when it is outside the map.
    pub fn to_guest_or_overflow(&self, host_id: u32) -> u32 {
        self.to_guest(host_id).unwrap_or(OVERFLOW_ID)
    }
}

impl fmt::Display for IdMap {
    /// The specification [`IdMap::parse`] reads back (empty for the identity).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, range) in self.by_guest.iter().enumerate() {
            let separator = if i == 0 { "" } else { ";" };
            write!(
                f,
                "{separator}{}:{}:{}",
                range.guest, range.host, range.count
            )?;
        }
        Ok(())
    }
}

fn parse_range(index: usize, text: &str) -> Result<IdRange, IdMapError> {
    let fields: Vec<&str> = text.split(':').map(str::trim).collect();
    let [guest, host, count] = fields.as_slice() else {
        return Err(IdMapError::BadRange {
            index,
            text: text.to_owned(),
        });
    };
    let number = |field: &str| -> Result<u64, IdMapError> {
        let digits = !field.is_empty() && field.bytes().all(|byte| byte.is_ascii_digit());
        digits
            .then(|| field.parse::<u64>().ok())
            .flatten()
            .filter(|&value| value <= ID_SPACE_SIZE)
            .ok_or_else(|| IdMapError::BadNumber {
                index,
                text: field.to_owned(),
            })
    };
    let id = |field: &str| -> Result<u32, IdMapError> {
        u32::try_from(number(field)?).map_err(|_| IdMapError::BadNumber {
            index,
            text: field.to_owned(),
        })
    };
    Ok(IdRange {
        guest: id(guest)?,
        host: id(host)?,
        count: number(count)?,
    })
}

/// The first pair of ranges (by original position) that overlap on `start`, with `order`
/// sorting the ranges by that start.
fn first_overlap(
    ranges: &[IdRange],
    order: &[usize],
    start: impl Fn(&IdRange) -> u32,
) -> Option<(usize, usize)> {
    order.windows(2).find_map(|pair| {
        let [a, b] = *pair else { return None };
        let end_a = u64::from(start(&ranges[a])) + ranges[a].count;
        (u64::from(start(&ranges[b])) < end_a).then(|| (a.min(b), a.max(b)))
    })
}

/// The range containing `id`, in ranges sorted (and disjoint) by `start`.
fn find(ranges: &[IdRange], id: u32, start: impl Fn(&IdRange) -> u32) -> Option<&IdRange> {
    let after = ranges.partition_point(|range| start(range) <= id);
    let range = ranges.get(after.checked_sub(1)?)?;
    IdRange::contains(start(range), range.count, id).then_some(range)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn identity_by_default() {
        for spec in ["", "   "] {
            let map = IdMap::parse(spec).unwrap();
            assert!(map.is_identity());
            assert_eq!(map.to_host(0), Some(0));
            assert_eq!(map.to_guest(u32::MAX), Some(u32::MAX));
        }
    }

    #[test]
    fn maps_ranges_both_ways() {
        let map = IdMap::parse("0:100000:65536; 65534 : 65534 : 1").unwrap_err();
        assert_eq!(
            map,
            IdMapError::GuestOverlap {
                first: 0,
                second: 1
            }
        );
        let map = IdMap::parse("1000:2000:10;0:100000:1000;65534:65534:1").unwrap();
        assert_eq!(map.to_host(0), Some(100_000));
        assert_eq!(map.to_host(999), Some(100_999));
        assert_eq!(map.to_host(1005), Some(2005));
        assert_eq!(map.to_host(1010), None);
        assert_eq!(map.to_host(65534), Some(65534));
        assert_eq!(map.to_guest(2009), Some(1009));
        assert_eq!(map.to_guest(0), None);
        assert_eq!(map.to_guest_or_overflow(0), OVERFLOW_ID);
        assert_eq!(map.to_string(), "0:100000:1000;1000:2000:10;65534:65534:1");
    }

    #[test]
    fn full_space_range() {
        let map = IdMap::parse("0:0:4294967296").unwrap();
        assert_eq!(map.to_host(u32::MAX), Some(u32::MAX));
        assert_eq!(
            IdMap::parse("1:0:4294967296"),
            Err(IdMapError::Overflow { index: 0 })
        );
    }

    #[test]
    fn rejects_bad_specs() {
        assert!(matches!(
            IdMap::parse("1:2"),
            Err(IdMapError::BadRange { index: 0, .. })
        ));
        assert!(matches!(
            IdMap::parse("0:0:1;"),
            Err(IdMapError::BadRange { index: 1, .. })
        ));
        assert!(matches!(
            IdMap::parse("a:0:1"),
            Err(IdMapError::BadNumber { .. })
        ));
        assert!(matches!(
            IdMap::parse("-1:0:1"),
            Err(IdMapError::BadNumber { .. })
        ));
        assert!(matches!(
            IdMap::parse("+1:0:1"),
            Err(IdMapError::BadNumber { .. })
        ));
        assert!(matches!(
            IdMap::parse("4294967296:0:1"),
            Err(IdMapError::BadNumber { .. })
        ));
        assert_eq!(
            IdMap::parse("0:0:0"),
            Err(IdMapError::ZeroCount { index: 0 })
        );
        assert_eq!(
            IdMap::parse("4294967295:0:2"),
            Err(IdMapError::Overflow { index: 0 })
        );
        assert_eq!(
            IdMap::parse("0:10:5;100:12:5"),
            Err(IdMapError::HostOverlap {
                first: 0,
                second: 1
            })
        );
        let many = vec!["0:0:1"; IDMAP_RANGES_MAX + 1].join(";");
        assert!(matches!(
            IdMap::parse(&many),
            Err(IdMapError::TooManyRanges { .. })
        ));
    }

    /// Disjoint ranges with host starts assigned in a shuffled order.
    fn arb_ranges() -> impl Strategy<Value = Vec<IdRange>> {
        proptest::collection::vec((0u64..1000, 1u64..1000, 0u64..1000), 1..12)
            .prop_flat_map(|parts| {
                let len = parts.len();
                (
                    Just(parts),
                    Just((0..len).collect::<Vec<_>>()).prop_shuffle(),
                )
            })
            .prop_map(|(parts, host_order)| {
                let mut ranges = Vec::new();
                let mut guest = 0u64;
                for &(gap, count, _) in &parts {
                    guest += gap;
                    ranges.push(IdRange {
                        guest: guest as u32,
                        host: 0,
                        count,
                    });
                    guest += count;
                }
                let mut host = 0u64;
                for &i in &host_order {
                    host += parts[i].2;
                    ranges[i].host = host as u32;
                    host += parts[i].1;
                }
                ranges
            })
    }

    proptest! {
        #[test]
        fn parse_never_panics(spec in "\\PC{0,80}") {
            let _ = IdMap::parse(&spec);
        }

        #[test]
        fn parse_never_panics_on_plausible_specs(spec in "[0-9:; ]{0,60}") {
            if let Ok(map) = IdMap::parse(&spec) {
                prop_assert_eq!(IdMap::parse(&map.to_string()).unwrap(), map);
            }
        }

        #[test]
        fn round_trip(ranges in arb_ranges(), probe in 0u32..30_000) {
            let spec = ranges
                .iter()
                .map(|r| format!("{}:{}:{}", r.guest, r.host, r.count))
                .collect::<Vec<_>>()
                .join(";");
            let map = IdMap::parse(&spec).unwrap();
            prop_assert_eq!(IdMap::parse(&map.to_string()).unwrap(), map.clone());
            for range in &ranges {
                let last = range.guest + (range.count - 1) as u32;
                for guest in [range.guest, last] {
                    let host = map.to_host(guest).unwrap();
                    prop_assert_eq!(map.to_guest(host), Some(guest));
                }
            }
            match map.to_host(probe) {
                Some(host) => prop_assert_eq!(map.to_guest(host), Some(probe)),
                None => prop_assert!(ranges.iter().all(|r| !IdRange::contains(r.guest, r.count, probe))),
            }
            if let Some(guest) = map.to_guest(probe) {
                prop_assert_eq!(map.to_host(guest), Some(probe));
            }
        }
    }
}
