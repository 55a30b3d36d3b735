//! The scalar options of stratad's command line: sizes, `--socket-mode`, `--socket-group`,
//! `--cpus`. Pure functions (but for the group database lookup), no key=value syntax.

use super::SpecError;

/// Parses a size with an optional K, M, G or T suffix (powers of 1024) or plain bytes; a
/// positive multiple of 512 (sizes of disks and quotas are counted in sectors).
pub fn parse_size(key: &str, v: &str) -> Result<u64, SpecError> {
    vmfs::admin::parse_size(v).map_err(|why| SpecError::BadValue {
        key: key.into(),
        value: v.into(),
        why: why.into(),
    })
}

/// `--socket-mode`: permission bits in octal (`600`, `0660`), at most 0777.
pub fn parse_socket_mode(v: &str) -> Result<u32, SpecError> {
    let bad = |why: &str| SpecError::BadValue {
        key: "socket-mode".into(),
        value: v.to_string(),
        why: why.into(),
    };
    let m = u32::from_str_radix(v, 8).map_err(|_| bad("octal permission bits"))?;
    if m & !0o777 != 0 {
        return Err(bad("at most 0777"));
    }
    Ok(m)
}

/// Buffer for one group entry (getgrnam_r); a group with more members than fit is refused.
const GROUP_ENTRY_BYTES: usize = 64 << 10;

/// `--socket-group`: a group name or a numeric gid.
pub fn parse_socket_group(v: &str) -> Result<u32, SpecError> {
    let bad = |why: &str| SpecError::BadValue {
        key: "socket-group".into(),
        value: v.to_string(),
        why: why.into(),
    };
    if let Ok(gid) = v.parse::<u32>() {
        return Ok(gid);
    }
    let name = std::ffi::CString::new(v).map_err(|_| bad("a group name"))?;
    let mut buf = vec![0 as libc::c_char; GROUP_ENTRY_BYTES];
    // SAFETY: group is plain data; zero is a valid value.
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is to a live local of the size passed; getgrnam_r writes only
    // into `group`, `buf` and `result`.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut group,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return Err(bad("no such group"));
    }
    Ok(group.gr_gid)
}

/// Parses a CPU list such as `1`, `0,2` or `0-3`.
pub fn parse_cpus(s: &str) -> Result<Vec<usize>, SpecError> {
    /// More reactors than this is a typo, not a machine.
    const CPU_INDEX_MAX: usize = 4095;
    let bad = |why: &str| SpecError::BadValue {
        key: "cpus".into(),
        value: s.into(),
        why: why.into(),
    };
    let mut out = Vec::new();
    for part in s.split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let a: usize = a
            .trim()
            .parse()
            .map_err(|_| bad("expected numbers like 0,2-3"))?;
        let b: usize = b
            .trim()
            .parse()
            .map_err(|_| bad("expected numbers like 0,2-3"))?;
        if a > b || b > CPU_INDEX_MAX {
            return Err(bad("bad range"));
        }
        for c in a..=b {
            if !out.contains(&c) {
                out.push(c);
            }
        }
        if out.len() > dataplane::server::REACTORS_MAX {
            return Err(bad("too many CPUs"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn socket_options() {
        assert_eq!(parse_socket_mode("600").unwrap(), 0o600);
        assert_eq!(parse_socket_mode("0660").unwrap(), 0o660);
        assert!(parse_socket_mode("1777").is_err());
        assert!(parse_socket_mode("rw").is_err());
        assert!(parse_socket_mode("8").is_err());
        assert_eq!(parse_socket_group("0").unwrap(), 0);
        assert_eq!(parse_socket_group("root").unwrap(), 0);
        assert!(parse_socket_group("no-such-group-here").is_err());
    }

    #[test]
    fn cpus() {
        assert_eq!(parse_cpus("1").unwrap(), vec![1]);
        assert_eq!(parse_cpus("0-2,5").unwrap(), vec![0, 1, 2, 5]);
        assert!(parse_cpus("2-1").is_err());
        assert!(parse_cpus("a").is_err());
        assert!(parse_cpus("").is_err());
    }

    proptest! {
        #[test]
        fn cpus_never_panic(s in "[0-9,\\- ]{0,20}") {
            let _ = parse_cpus(&s);
        }

        #[test]
        fn sizes_round_trip(n in 1u64..1_000_000, unit in 0usize..4) {
            let (suffix, shift) = [("K", 10), ("M", 20), ("G", 30), ("", 9)][unit];
            let s = if suffix.is_empty() { format!("{}", n << shift) } else { format!("{n}{suffix}") };
            prop_assert_eq!(parse_size("size", &s).unwrap(), n << shift);
        }
    }
}
