//! `--disk`: what it accepts ([`DiskArgs`]) and what it means ([`DiskSpec`]).
//!
//! `socket=PATH,backend=raw,path=IMAGE[,queues=N][,readonly=on][,direct=on][,name=N]`
//! `socket=PATH,backend=null,size=SIZE[,queues=N][,read-zeroes=on|off][,name=N]`
//! `socket=PATH,backend=vmfs,file=NAME[,queues=N][,readonly=on][,name=N]`
//!
//! `socket` may be left out when `name` is given: the disk is then not served over
//! vhost-user, only exported by name elsewhere (an `--iscsi-target`).

use std::path::PathBuf;

use dataplane::blk::NUM_QUEUES_MAX;
use serde::Deserialize;

use super::{keyvalue, Size, SpecError};

/// Request queues of a disk unless `queues=` says otherwise.
pub const DISK_QUEUES_DEFAULT: u16 = 1;

/// Which storage a disk uses (the `backend` key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// A raw image file or block device.
    Raw,
    /// A null disk.
    Null,
    /// A file of the datastore.
    Vmfs,
}

/// The keys of `--disk` (and of a disk in JSON), as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DiskArgs {
    /// vhost-user socket path (none: the disk is only exported by name, e.g. over iSCSI).
    pub socket: Option<PathBuf>,
    /// Storage kind.
    pub backend: BackendKind,
    /// Image path (raw).
    pub path: Option<PathBuf>,
    /// Size (null).
    pub size: Option<Size>,
    /// Request queues.
    pub queues: Option<u16>,
    /// Export read-only (raw, vmfs).
    pub readonly: Option<bool>,
    /// O_DIRECT (raw).
    pub direct: Option<bool>,
    /// Reads return zeroes (null).
    pub read_zeroes: Option<bool>,
    /// Name (serial, logs).
    pub name: Option<String>,
    /// Datastore file (vmfs).
    pub file: Option<String>,
}

/// Which storage a disk uses, with its settings.
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

/// One `--disk`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// vhost-user socket path, if the disk is served to a VM on this host.
    pub socket: Option<PathBuf>,
    /// Storage.
    pub backend: BackendSpec,
    /// Request queues.
    pub queues: u16,
    /// Name (serial, logs, `--iscsi-target disk=`); defaults to the socket's file stem.
    pub name: Option<String>,
}

impl DiskSpec {
    /// The disk's name: `name=`, else the socket's file stem, else `disk{index}`.
    pub fn display_name(&self, index: usize) -> String {
        self.name.clone().unwrap_or_else(|| {
            self.socket
                .as_ref()
                .and_then(|s| s.file_stem())
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| format!("disk{index}"))
        })
    }
}

/// Parses one `--disk` value.
pub fn parse_disk_spec(s: &str) -> Result<DiskSpec, SpecError> {
    DiskSpec::try_from(keyvalue::from_str::<DiskArgs>(s)?)
}

impl TryFrom<DiskArgs> for DiskSpec {
    type Error = SpecError;

    fn try_from(a: DiskArgs) -> Result<DiskSpec, SpecError> {
        let socket = a.socket.filter(|s| !s.as_os_str().is_empty());
        if socket.is_none() && a.name.as_deref().is_none_or(str::is_empty) {
            // A disk with neither could be reached by nothing.
            return Err(SpecError::Missing(
                "socket (or name, for a disk exported by name only)".into(),
            ));
        }
        let queues = match a.queues {
            None => DISK_QUEUES_DEFAULT,
            Some(n) if (1..=NUM_QUEUES_MAX).contains(&n) => n,
            Some(n) => {
                return Err(SpecError::bad(
                    "queues",
                    n,
                    format!("expected 1 to {NUM_QUEUES_MAX}"),
                ))
            }
        };
        // Keys of another backend are refused rather than ignored: they are typos or
        // misunderstandings, and silently serving something else is worse.
        let given = [
            ("path", a.path.is_some()),
            ("size", a.size.is_some()),
            ("readonly", a.readonly.is_some()),
            ("direct", a.direct.is_some()),
            ("read-zeroes", a.read_zeroes.is_some()),
            ("file", a.file.is_some()),
        ];
        let (kind, applies): (&str, &[&str]) = match a.backend {
            BackendKind::Raw => ("raw", &["path", "readonly", "direct"]),
            BackendKind::Null => ("null", &["size", "read-zeroes"]),
            BackendKind::Vmfs => ("vmfs", &["file", "readonly"]),
        };
        if let Some((key, _)) = given
            .iter()
            .find(|(key, present)| *present && !applies.contains(key))
        {
            return Err(SpecError::not_applicable(key, format!("backend={kind}")));
        }
        let missing = |key: &str| SpecError::Missing(key.into());
        let backend = match a.backend {
            BackendKind::Raw => BackendSpec::Raw {
                path: a
                    .path
                    .filter(|p| !p.as_os_str().is_empty())
                    .ok_or_else(|| missing("path"))?,
                readonly: a.readonly.unwrap_or(false),
                direct: a.direct.unwrap_or(false),
            },
            BackendKind::Null => BackendSpec::Null {
                size: a.size.ok_or_else(|| missing("size"))?.0,
                read_zeroes: a.read_zeroes.unwrap_or(true),
            },
            BackendKind::Vmfs => BackendSpec::Vmfs {
                file: a
                    .file
                    .filter(|f| !f.is_empty())
                    .ok_or_else(|| missing("file"))?,
                readonly: a.readonly.unwrap_or(false),
            },
        };
        Ok(DiskSpec {
            socket,
            backend,
            queues,
            name: a.name,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::spec::keyvalue::escape;

    /// The key=value form of `d`, every key written out.
    fn format(d: &DiskSpec) -> String {
        let on = |b: bool| if b { "on" } else { "off" };
        let mut s = format!("queues={}", d.queues);
        if let Some(socket) = &d.socket {
            s += &format!(",socket={}", escape(&socket.to_string_lossy()));
        }
        match &d.backend {
            BackendSpec::Raw {
                path,
                readonly,
                direct,
            } => {
                s += &format!(
                    ",backend=raw,path={},readonly={},direct={}",
                    escape(&path.to_string_lossy()),
                    on(*readonly),
                    on(*direct)
                )
            }
            BackendSpec::Null { size, read_zeroes } => {
                s += &format!(",backend=null,size={size},read-zeroes={}", on(*read_zeroes))
            }
            BackendSpec::Vmfs { file, readonly } => {
                s += &format!(
                    ",backend=vmfs,file={},readonly={}",
                    escape(file),
                    on(*readonly)
                )
            }
        }
        if let Some(n) = &d.name {
            s += &format!(",name={}", escape(n));
        }
        s
    }

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
    fn commas_in_paths() {
        let d = parse_disk_spec("socket=/run/a,,b.sock,backend=raw,path=/img/x,,y,,.img").unwrap();
        assert_eq!(d.socket, Some(PathBuf::from("/run/a,b.sock")));
        assert_eq!(
            d.backend,
            BackendSpec::Raw {
                path: "/img/x,y,.img".into(),
                readonly: false,
                direct: false
            }
        );
        // A single comma inside a value is an error that says how to write it.
        let e = parse_disk_spec("socket=s,backend=raw,path=/img/x,y.img").unwrap_err();
        assert!(
            matches!(&e, SpecError::BadValue { key, .. } if key == "path"),
            "{e}"
        );
        assert!(e.to_string().contains(",,"), "{e}");
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
        let d = parse_disk_spec("socket=s,backend=null,size=64M,queues=4,read-zeroes=off").unwrap();
        assert_eq!(
            (d.backend, d.queues),
            (
                BackendSpec::Null {
                    size: 64 << 20,
                    read_zeroes: false
                },
                4
            )
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
            Err(SpecError::Missing("file".into()))
        );
        assert_eq!(
            parse_disk_spec("socket=s,backend=vmfs,file=f,path=p"),
            Err(SpecError::not_applicable("path", "backend=vmfs"))
        );
        assert!(parse_disk_spec("socket=s,backend=raw,path=p,file=f").is_err());
    }

    #[test]
    fn errors() {
        assert_eq!(
            parse_disk_spec("socket=s,backend=raw,path=p,colour=red"),
            Err(SpecError::UnknownKey("colour".into()))
        );
        let no_socket = || {
            Err(SpecError::Missing(
                "socket (or name, for a disk exported by name only)".into(),
            ))
        };
        assert_eq!(parse_disk_spec("backend=raw,path=p"), no_socket());
        assert_eq!(parse_disk_spec("socket=,backend=raw,path=p"), no_socket());
        assert_eq!(parse_disk_spec("backend=raw,path=p,name="), no_socket());
        // A named disk needs no socket: it is exported by name only (e.g. over iSCSI).
        let d = parse_disk_spec("backend=null,size=1M,name=lun0").unwrap();
        assert_eq!(d.socket, None);
        assert_eq!(d.display_name(3), "lun0");
        assert_eq!(
            parse_disk_spec("socket=s,backend=raw"),
            Err(SpecError::Missing("path".into()))
        );
        assert_eq!(
            parse_disk_spec("socket=s,backend=null"),
            Err(SpecError::Missing("size".into()))
        );
        assert_eq!(
            parse_disk_spec("socket=s,backend=raw,path=p,queues=0"),
            Err(SpecError::bad("queues", 0, "expected 1 to 16"))
        );
        assert!(parse_disk_spec("socket=s,backend=null,size=1X").is_err());
        assert!(parse_disk_spec("socket=s,backend=raw,path=p,queues=17").is_err());
        assert!(parse_disk_spec("socket=s,backend=raw,path=p,readonly=maybe").is_err());
        assert_eq!(
            parse_disk_spec("socket=s,socket=t,backend=null,size=1M"),
            Err(SpecError::Duplicate("socket".into()))
        );
        assert!(parse_disk_spec("socket=s,backend=null,size=1M,path=x").is_err());
        assert!(parse_disk_spec("socket=s,backend=null,size=1M,readonly=on").is_err());
        assert!(parse_disk_spec("socket=s,backend=raw,path=p,size=1M").is_err());
        assert!(
            matches!(parse_disk_spec("socket=s,backend=nvme"), Err(SpecError::BadValue { key, .. }) if key == "backend")
        );
        assert_eq!(
            parse_disk_spec("socket"),
            Err(SpecError::NotKeyValue("socket".into()))
        );
        assert!(parse_disk_spec("socket=s,backend=null,size=99999999999999999999T").is_err());
    }

    #[test]
    fn json_gives_the_same_spec() {
        for (kv, json) in [
            (
                "socket=/r/a,,b.sock,backend=raw,path=/i.img,queues=2,readonly=on,direct=off,name=d",
                serde_json::json!({"socket": "/r/a,b.sock", "backend": "raw", "path": "/i.img",
                    "queues": 2, "readonly": true, "direct": false, "name": "d"}),
            ),
            (
                "socket=s,backend=null,size=1G,read-zeroes=off",
                serde_json::json!({"socket": "s", "backend": "null", "size": "1G",
                    "read-zeroes": false}),
            ),
            (
                "socket=s,backend=null,size=4096",
                serde_json::json!({"socket": "s", "backend": "null", "size": 4096}),
            ),
            (
                "socket=s,backend=vmfs,file=vm1.img",
                serde_json::json!({"socket": "s", "backend": "vmfs", "file": "vm1.img"}),
            ),
        ] {
            let a: DiskArgs = keyvalue::from_str(kv).unwrap();
            let b: DiskArgs = keyvalue::from_json(json).unwrap();
            assert_eq!(a, b, "{kv}");
            assert_eq!(DiskSpec::try_from(a), DiskSpec::try_from(b));
        }
    }

    fn arb_disk() -> impl Strategy<Value = DiskSpec> {
        let text = "[^\\x00]{1,24}";
        let backend = prop_oneof![
            (text, any::<bool>(), any::<bool>()).prop_map(|(p, readonly, direct)| {
                BackendSpec::Raw {
                    path: p.into(),
                    readonly,
                    direct,
                }
            }),
            (1u64..1 << 40, any::<bool>()).prop_map(|(sectors, read_zeroes)| BackendSpec::Null {
                size: sectors * 512,
                read_zeroes
            }),
            (text, any::<bool>()).prop_map(|(file, readonly)| BackendSpec::Vmfs { file, readonly }),
        ];
        (
            proptest::option::of(text),
            backend,
            1..=NUM_QUEUES_MAX,
            proptest::option::of(".{0,12}"),
        )
            .prop_filter("a disk needs a socket or a name", |(socket, _, _, name)| {
                socket.is_some() || name.as_deref().is_some_and(|n| !n.is_empty())
            })
            .prop_map(|(socket, backend, queues, name)| DiskSpec {
                socket: socket.map(Into::into),
                backend,
                queues,
                name,
            })
    }

    proptest! {
        #[test]
        fn formatted_specs_parse_back(d in arb_disk()) {
            prop_assert_eq!(parse_disk_spec(&format(&d)).unwrap(), d);
        }

        #[test]
        fn disk_spec_never_panics(s in ".{0,80}") {
            let _ = parse_disk_spec(&s);
        }

        #[test]
        fn disk_spec_keys_never_panic(s in "(socket|backend|raw|null|vmfs|path|size|queues|readonly|on|1M|,|=){0,30}") {
            let _ = parse_disk_spec(&s);
        }
    }
}
