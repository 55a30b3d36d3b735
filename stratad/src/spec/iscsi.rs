//! `--iscsi-target`: what it accepts ([`IscsiTargetArgs`]) and what it means
//! ([`IscsiTargetSpec`]).
//!
//! `iqn=IQN,disk=NAME[,lun=N][,chap-user=U,chap-secret-file=F][,mutual-user=U,
//! mutual-secret-file=F][,allow=IQN;IQN...]`
//!
//! One value exports one disk as one LUN; giving the same `iqn` again adds a LUN to that
//! target (LUN numbers default to 0, 1, ... in order). A target's CHAP and `allow` settings
//! are given once, on any of its values. The same keys (as JSON) create targets over the
//! control socket.

use serde::Deserialize;

use super::{keyvalue, SpecError};

/// The keys of `--iscsi-target` (and of the `iscsi_target_create` RPC), as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct IscsiTargetArgs {
    /// Target name (iqn./eui./naa. form).
    pub iqn: String,
    /// Name of a `--disk`.
    pub disk: String,
    /// LUN number (default: the next free one of this target).
    pub lun: Option<u64>,
    /// CHAP name the initiator must send.
    pub chap_user: Option<String>,
    /// File holding the CHAP secret (first line; kept out of the command line and `ps`).
    pub chap_secret_file: Option<String>,
    /// Mutual CHAP: the name the target answers with.
    pub mutual_user: Option<String>,
    /// Mutual CHAP: file holding the target's secret.
    pub mutual_secret_file: Option<String>,
    /// Initiator names allowed, `;`-separated (default: any the name server's zoning allows).
    pub allow: Option<String>,
}

/// CHAP settings of a target, with the secrets' files (read when the target is created).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChapSpec {
    /// CHAP_N the initiator sends.
    pub user: String,
    /// Its secret's file.
    pub secret_file: String,
    /// Mutual CHAP name and secret file.
    pub mutual: Option<(String, String)>,
}

/// One `--iscsi-target`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IscsiTargetSpec {
    /// Target name.
    pub iqn: String,
    /// Disk name.
    pub disk: String,
    /// LUN number, if given.
    pub lun: Option<u64>,
    /// CHAP, if required.
    pub chap: Option<ChapSpec>,
    /// Allowed initiators (empty: any).
    pub allow: Vec<String>,
}

/// Largest LUN number accepted (SAM-5 flat space addressing, 14 bits: what REPORT LUNS and
/// the single-level LUN format carry).
pub const LUN_MAX: u64 = 16383;

/// Parses one `--iscsi-target` value.
pub fn parse_iscsi_target_spec(s: &str) -> Result<IscsiTargetSpec, SpecError> {
    IscsiTargetSpec::try_from(keyvalue::from_str::<IscsiTargetArgs>(s)?)
}

impl TryFrom<IscsiTargetArgs> for IscsiTargetSpec {
    type Error = SpecError;

    fn try_from(a: IscsiTargetArgs) -> Result<Self, SpecError> {
        if a.iqn.is_empty() {
            return Err(SpecError::Missing("iqn".into()));
        }
        if a.disk.is_empty() {
            return Err(SpecError::Missing("disk".into()));
        }
        if let Some(l) = a.lun.filter(|l| *l > LUN_MAX) {
            return Err(SpecError::bad("lun", l, format!("expected 0 to {LUN_MAX}")));
        }
        let nonempty = |v: Option<String>| v.filter(|s| !s.is_empty());
        let chap = match (nonempty(a.chap_user), nonempty(a.chap_secret_file)) {
            (None, None) => None,
            (Some(_), None) => return Err(SpecError::Missing("chap-secret-file".into())),
            (None, Some(_)) => return Err(SpecError::Missing("chap-user".into())),
            (Some(user), Some(secret_file)) => Some((user, secret_file)),
        };
        let mutual = match (nonempty(a.mutual_user), nonempty(a.mutual_secret_file)) {
            (None, None) => None,
            (Some(_), None) => return Err(SpecError::Missing("mutual-secret-file".into())),
            (None, Some(_)) => return Err(SpecError::Missing("mutual-user".into())),
            (Some(u), Some(f)) => Some((u, f)),
        };
        let chap = match (chap, mutual) {
            (None, Some(_)) => {
                // Mutual CHAP authenticates the target after the initiator: it needs CHAP.
                return Err(SpecError::not_applicable(
                    "mutual-user",
                    "a target without chap-user",
                ));
            }
            (None, None) => None,
            (Some((user, secret_file)), mutual) => Some(ChapSpec {
                user,
                secret_file,
                mutual,
            }),
        };
        let allow = a
            .allow
            .as_deref()
            .unwrap_or("")
            .split(';')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        Ok(IscsiTargetSpec {
            iqn: a.iqn,
            disk: a.disk,
            lun: a.lun,
            chap,
            allow,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn minimal_and_full() {
        let t = parse_iscsi_target_spec("iqn=iqn.2026-12.io.strata:t0,disk=d0").unwrap();
        assert_eq!(t.iqn, "iqn.2026-12.io.strata:t0");
        assert_eq!(t.disk, "d0");
        assert_eq!((t.lun, t.chap, t.allow.len()), (None, None, 0));
        let t = parse_iscsi_target_spec(
            "iqn=iqn.a:t,disk=d,lun=3,chap-user=u,chap-secret-file=/s,mutual-user=m,\
             mutual-secret-file=/ms,allow=iqn.a:i1; iqn.a:i2",
        )
        .unwrap();
        assert_eq!(t.lun, Some(3));
        assert_eq!(
            t.chap,
            Some(ChapSpec {
                user: "u".into(),
                secret_file: "/s".into(),
                mutual: Some(("m".into(), "/ms".into()))
            })
        );
        assert_eq!(t.allow, vec!["iqn.a:i1".to_string(), "iqn.a:i2".into()]);
    }

    #[test]
    fn errors() {
        assert_eq!(
            parse_iscsi_target_spec("disk=d"),
            Err(SpecError::Missing("iqn".into()))
        );
        assert_eq!(
            parse_iscsi_target_spec("iqn=iqn.a:t"),
            Err(SpecError::Missing("disk".into()))
        );
        assert_eq!(
            parse_iscsi_target_spec("iqn=iqn.a:t,disk=d,chap-user=u"),
            Err(SpecError::Missing("chap-secret-file".into()))
        );
        assert!(
            parse_iscsi_target_spec("iqn=iqn.a:t,disk=d,mutual-user=m,mutual-secret-file=f")
                .is_err()
        );
        assert!(parse_iscsi_target_spec("iqn=iqn.a:t,disk=d,lun=16384").is_err());
        assert_eq!(
            parse_iscsi_target_spec("iqn=iqn.a:t,disk=d,colour=red"),
            Err(SpecError::UnknownKey("colour".into()))
        );
    }

    #[test]
    fn json_form() {
        let a: IscsiTargetArgs = serde_json::from_value(
            serde_json::json!({"iqn": "iqn.a:t", "disk": "d", "lun": 1, "allow": "iqn.a:i"}),
        )
        .unwrap();
        let t = IscsiTargetSpec::try_from(a).unwrap();
        assert_eq!((t.lun, t.allow.len()), (Some(1), 1));
    }

    proptest! {
        #[test]
        fn never_panics(s in ".{0,120}") {
            let _ = parse_iscsi_target_spec(&s);
        }
    }
}
