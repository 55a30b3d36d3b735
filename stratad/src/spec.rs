//! Parsing of `--disk` and `--cpus` arguments: pure functions, no I/O.
//!
//! `--disk socket=PATH,backend=raw,path=IMAGE[,queues=N][,readonly=on][,direct=on][,name=N]`
//! `--disk socket=PATH,backend=null,size=SIZE[,queues=N][,read-zeroes=on|off][,name=N]`
//! `--disk socket=PATH,backend=vmfs,file=NAME[,queues=N][,readonly=on][,name=N]`

use std::path::PathBuf;

use dataplane::blk::NUM_QUEUES_MAX;
use thiserror::Error;

/// What is wrong with a command-line value.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SpecError {
    /// A key we do not know.
    #[error("unknown key '{0}'")]
    UnknownKey(String),
    /// An item without `=`.
    #[error("'{0}' is not key=value")]
    NotKeyValue(String),
    /// A key given twice.
    #[error("key '{0}' given twice")]
    Duplicate(String),
    /// A required key is absent.
    #[error("missing '{0}'")]
    Missing(&'static str),
    /// A key that does not apply to this backend.
    #[error("'{key}' does not apply to backend={backend}")]
    NotApplicable {
        /// The key.
        key: &'static str,
        /// The backend.
        backend: &'static str,
    },
    /// A value that cannot be parsed.
    #[error("bad value for '{key}': '{value}' ({why})")]
    BadValue {
        /// The key.
        key: &'static str,
        /// The value.
        value: String,
        /// What was expected.
        why: &'static str,
    },
}

/// Which storage a disk uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSpec {
    /// A raw image file or block device.
    Raw {
        /// Image path.
        path: PathBuf,
        /// Open read-only and export with VIRTIO_BLK_F_RO.
        readonly: bool,
        /// O_DIRECT.
        direct: bool,
    },
    /// A file of the datastore given with --datastore.
    Vmfs {
        /// Path of the file inside the datastore.
        file: String,
        /// Export read-only.
        readonly: bool,
    },
    /// A null disk.
    Null {
        /// Size in bytes.
        size: u64,
        /// Reads return zeroes.
        read_zeroes: bool,
    },
}

/// One `--disk` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// vhost-user socket path.
    pub socket: PathBuf,
    /// Storage.
    pub backend: BackendSpec,
    /// Request queues.
    pub queues: u16,
    /// Name (serial, logs); defaults to the socket's file stem.
    pub name: Option<String>,
}

fn parse_bool(key: &'static str, v: &str) -> Result<bool, SpecError> {
    match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(SpecError::BadValue {
            key,
            value: v.into(),
            why: "expected on or off",
        }),
    }
}

/// Parses a size with an optional K, M, G or T suffix (powers of 1024) or plain bytes.
pub fn parse_size(key: &'static str, v: &str) -> Result<u64, SpecError> {
    vmfs::admin::parse_size(v).map_err(|why| SpecError::BadValue {
        key,
        value: v.into(),
        why,
    })
}

/// Parses one `--disk` value.
pub fn parse_disk_spec(s: &str) -> Result<DiskSpec, SpecError> {
    const KEYS: [&str; 10] = [
        "socket",
        "backend",
        "path",
        "size",
        "queues",
        "readonly",
        "direct",
        "read-zeroes",
        "name",
        "file",
    ];
    let mut vals: [Option<&str>; 10] = [None; 10];
    for item in s.split(',') {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| SpecError::NotKeyValue(item.into()))?;
        let idx = KEYS
            .iter()
            .position(|&key| key == k)
            .ok_or_else(|| SpecError::UnknownKey(k.into()))?;
        if vals[idx].is_some() {
            return Err(SpecError::Duplicate(k.into()));
        }
        vals[idx] = Some(v);
    }
    let [socket, backend, path, size, queues, readonly, direct, read_zeroes, name, file] = vals;
    let socket = socket
        .filter(|s| !s.is_empty())
        .ok_or(SpecError::Missing("socket"))?;
    let queues = match queues {
        None => 1,
        Some(q) => match q.parse::<u16>() {
            Ok(n) if (1..=NUM_QUEUES_MAX).contains(&n) => n,
            _ => {
                return Err(SpecError::BadValue {
                    key: "queues",
                    value: q.into(),
                    why: "expected 1 to 16",
                })
            }
        },
    };
    let na = |key, backend| SpecError::NotApplicable { key, backend };
    let backend = match backend.ok_or(SpecError::Missing("backend"))? {
        "raw" | "null" if file.is_some() => return Err(na("file", "raw or null")),
        "vmfs" => {
            for (key, v) in [("path", path), ("size", size), ("direct", direct)] {
                if v.is_some() {
                    return Err(na(key, "vmfs"));
                }
            }
            if read_zeroes.is_some() {
                return Err(na("read-zeroes", "vmfs"));
            }
            BackendSpec::Vmfs {
                file: file
                    .filter(|f| !f.is_empty())
                    .ok_or(SpecError::Missing("file"))?
                    .to_string(),
                readonly: readonly
                    .map(|v| parse_bool("readonly", v))
                    .transpose()?
                    .unwrap_or(false),
            }
        }
        "raw" => {
            if size.is_some() {
                return Err(na("size", "raw"));
            }
            if read_zeroes.is_some() {
                return Err(na("read-zeroes", "raw"));
            }
            let path = path
                .filter(|p| !p.is_empty())
                .ok_or(SpecError::Missing("path"))?;
            BackendSpec::Raw {
                path: PathBuf::from(path),
                readonly: readonly
                    .map(|v| parse_bool("readonly", v))
                    .transpose()?
                    .unwrap_or(false),
                direct: direct
                    .map(|v| parse_bool("direct", v))
                    .transpose()?
                    .unwrap_or(false),
            }
        }
        "null" => {
            if path.is_some() {
                return Err(na("path", "null"));
            }
            if readonly.is_some() {
                return Err(na("readonly", "null"));
            }
            if direct.is_some() {
                return Err(na("direct", "null"));
            }
            BackendSpec::Null {
                size: parse_size("size", size.ok_or(SpecError::Missing("size"))?)?,
                read_zeroes: read_zeroes
                    .map(|v| parse_bool("read-zeroes", v))
                    .transpose()?
                    .unwrap_or(true),
            }
        }
        other => {
            return Err(SpecError::BadValue {
                key: "backend",
                value: other.into(),
                why: "expected raw, null or vmfs",
            })
        }
    };
    Ok(DiskSpec {
        socket: PathBuf::from(socket),
        backend,
        queues,
        name: name.map(String::from),
    })
}

/// `--socket-mode`: permission bits in octal (`600`, `0660`), at most 0777.
pub fn parse_socket_mode(v: &str) -> Result<u32, SpecError> {
    let bad = |why| SpecError::BadValue {
        key: "socket-mode",
        value: v.to_string(),
        why,
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
    let bad = |why| SpecError::BadValue {
        key: "socket-group",
        value: v.to_string(),
        why,
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
    let bad = |why| SpecError::BadValue {
        key: "cpus",
        value: s.into(),
        why,
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
    fn raw_spec() {
        let d = parse_disk_spec("socket=/tmp/a.sock,backend=raw,path=/x.img,queues=2,readonly=on")
            .unwrap();
        assert_eq!(d.queues, 2);
        assert_eq!(
            d.backend,
            BackendSpec::Raw {
                path: "/x.img".into(),
                readonly: true,
                direct: false
            }
        );
    }

    #[test]
    fn null_spec() {
        let d = parse_disk_spec("socket=s,backend=null,size=1G").unwrap();
        assert_eq!(
            d.backend,
            BackendSpec::Null {
                size: 1 << 30,
                read_zeroes: true
            }
        );
    }

    #[test]
    fn vmfs_spec() {
        let d = parse_disk_spec("socket=s,backend=vmfs,file=vm1.img,queues=2").unwrap();
        assert_eq!(
            d.backend,
            BackendSpec::Vmfs {
                file: "vm1.img".into(),
                readonly: false
            }
        );
        assert_eq!(
            parse_disk_spec("socket=s,backend=vmfs"),
            Err(SpecError::Missing("file"))
        );
        assert!(parse_disk_spec("socket=s,backend=vmfs,file=f,path=p").is_err());
        assert!(parse_disk_spec("socket=s,backend=raw,path=p,file=f").is_err());
    }

    #[test]
    fn errors() {
        assert_eq!(
            parse_disk_spec("socket=s,backend=raw,path=p,colour=red"),
            Err(SpecError::UnknownKey("colour".into()))
        );
        assert_eq!(
            parse_disk_spec("backend=raw,path=p"),
            Err(SpecError::Missing("socket"))
        );
        assert_eq!(
            parse_disk_spec("socket=s,backend=raw"),
            Err(SpecError::Missing("path"))
        );
        assert_eq!(
            parse_disk_spec("socket=s,backend=null"),
            Err(SpecError::Missing("size"))
        );
        assert!(parse_disk_spec("socket=s,backend=null,size=1X").is_err());
        assert!(parse_disk_spec("socket=s,backend=raw,path=p,queues=0").is_err());
        assert!(parse_disk_spec("socket=s,backend=raw,path=p,queues=17").is_err());
        assert!(parse_disk_spec("socket=s,socket=t,backend=null,size=1M").is_err());
        assert!(parse_disk_spec("socket=s,backend=null,size=1M,path=x").is_err());
        assert!(parse_disk_spec("socket=s,backend=nvme").is_err());
        assert_eq!(parse_socket_mode("600").unwrap(), 0o600);
        assert_eq!(parse_socket_mode("0660").unwrap(), 0o660);
        assert!(parse_socket_mode("1777").is_err());
        assert!(parse_socket_mode("rw").is_err());
        assert!(parse_socket_mode("8").is_err());
        assert_eq!(parse_socket_group("0").unwrap(), 0);
        assert_eq!(parse_socket_group("root").unwrap(), 0);
        assert!(parse_socket_group("no-such-group-here").is_err());
        assert!(parse_disk_spec("socket").is_err());
        assert!(parse_disk_spec("socket=s,backend=null,size=99999999999999999999T").is_err());
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
        fn disk_spec_never_panics(s in ".{0,80}") {
            let _ = parse_disk_spec(&s);
        }

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
