//! stratad as an iSCSI target: the disks it can export by name, one SCSI logical unit per
//! disk (shared by every target that exports it, so reservations and COMPARE AND WRITE
//! locks hold across targets), the target registry built from `--iscsi-target`, the control
//! methods that change it while running, and the check that keeps `--port` from steering a
//! portal's TCP port away from its kernel socket.
//!
//! The protocol and the transport live in the `san` crate; this module only assembles them.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use dataplane::backend::BlockBackend;
use fabric_nameserver::client::{DdAccess, EntityInfo, IsnsClient};
use jsonrpc::{Methods, NoParams, RpcError};
use san::scsi::{LogicalUnit, LuConfig};
use san::target::{Chap, Registry, TargetError};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::spec::iscsi::{IscsiTargetArgs, LUN_MAX};
use crate::spec::IscsiTargetSpec;

/// Shortest CHAP secret accepted: RFC 7143 §12.1.3 asks for at least 96 bits of randomness,
/// and a short secret falls to an offline dictionary attack on one captured exchange.
pub const CHAP_SECRET_MIN: usize = 12;
/// Longest CHAP secret read from a file (RFC 1994 secrets are short; this bounds the read).
pub const CHAP_SECRET_MAX: usize = 255;

/// Control methods.
pub const ISCSI_GET_TARGETS: &str = "iscsi_get_targets";
/// Creates a target with its first LUN (the `--iscsi-target` keys as JSON).
pub const ISCSI_TARGET_CREATE: &str = "iscsi_target_create";
/// Deletes a target.
pub const ISCSI_TARGET_DELETE: &str = "iscsi_target_delete";
/// Adds a LUN to a target.
pub const ISCSI_TARGET_LUN_ADD: &str = "iscsi_target_lun_add";
/// Removes a LUN from a target.
pub const ISCSI_TARGET_LUN_REMOVE: &str = "iscsi_target_lun_remove";
/// Application error code of the iSCSI methods.
pub const ISCSI_ERROR: i64 = -32010;

/// Errors assembling or changing the exports.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// `disk=` names no `--disk`.
    #[error("no disk named {0:?} (give it with --disk ...,name={0})")]
    NoDisk(String),
    /// A registry rule.
    #[error(transparent)]
    Target(#[from] TargetError),
    /// A SCSI unit could not be set up.
    #[error(transparent)]
    Scsi(#[from] san::scsi::ScsiError),
    /// Two values for one target disagree on a target-wide setting.
    #[error("--iscsi-target {iqn}: {what} differs between its values (give it once)")]
    Conflict {
        /// Target.
        iqn: String,
        /// The setting.
        what: &'static str,
    },
    /// A CHAP secret file.
    #[error("CHAP secret {path}: {why}")]
    Secret {
        /// File.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// A spec error (RPC form).
    #[error(transparent)]
    Spec(#[from] crate::spec::SpecError),
}

/// One disk that can be exported.
#[derive(Debug)]
struct Disk {
    backend: Arc<dyn BlockBackend>,
    /// Its unit, made on first export and kept (its reservations outlive a target's removal).
    unit: Option<Arc<LogicalUnit>>,
}

/// The disks by name, their units, and the registry of targets.
#[derive(Debug)]
pub struct Exports {
    disks: Mutex<BTreeMap<String, Disk>>,
    /// Where units keep persistent-reservation state (`pr-NAME.json`), if anywhere.
    state_dir: Option<PathBuf>,
    /// What the transport serves.
    pub registry: Arc<Registry>,
    /// The name server registration (`--isns`), told of targets created and deleted while
    /// running.
    isns: Mutex<Option<IsnsClient>>,
}

/// Access by the name server's discovery domains: an initiator sees (SendTargets) and may
/// log in to a target only if they share a DD.
#[derive(Debug)]
struct DdPolicy(Arc<DdAccess>);

impl san::target::AccessPolicy for DdPolicy {
    fn visible(&self, initiator: &str, target: &str) -> bool {
        self.0.visible(initiator, target)
    }
}

/// Reads a CHAP secret: the file's first line, without its line end.
fn read_secret(path: &str) -> Result<Vec<u8>, ExportError> {
    let err = |why: String| ExportError::Secret {
        path: path.to_string(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if meta.len() > (CHAP_SECRET_MAX + 2) as u64 {
        return Err(err(format!("longer than {CHAP_SECRET_MAX} bytes")));
    }
    let text = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let line = text.split(|b| *b == b'\n').next().unwrap_or(&[]);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() < CHAP_SECRET_MIN || line.len() > CHAP_SECRET_MAX {
        return Err(err(format!(
            "must be {CHAP_SECRET_MIN} to {CHAP_SECRET_MAX} bytes (RFC 7143 asks for 96 bits or more)"
        )));
    }
    Ok(line.to_vec())
}

fn chap_of(spec: &IscsiTargetSpec) -> Result<Option<Chap>, ExportError> {
    let Some(c) = &spec.chap else { return Ok(None) };
    let secret = read_secret(&c.secret_file)?;
    let mutual = match &c.mutual {
        Some((user, file)) => {
            let s = read_secret(file)?;
            if s == secret {
                // RFC 7143 §12.1.3: the same secret in both directions lets an attacker
                // reflect the target's own challenge back at it.
                return Err(ExportError::Secret {
                    path: file.clone(),
                    why: "the mutual secret must differ from the initiator's".into(),
                });
            }
            Some((user.clone(), s))
        }
        None => None,
    };
    Ok(Some(Chap {
        user: c.user.clone(),
        secret,
        mutual,
    }))
}

impl Exports {
    /// The exportable disks (name → backend) and the reservation state directory.
    pub fn new(disks: Vec<(String, Arc<dyn BlockBackend>)>, state_dir: Option<PathBuf>) -> Self {
        Exports {
            disks: Mutex::new(
                disks
                    .into_iter()
                    .map(|(n, backend)| {
                        (
                            n,
                            Disk {
                                backend,
                                unit: None,
                            },
                        )
                    })
                    .collect(),
            ),
            state_dir,
            registry: Arc::new(Registry::new()),
            isns: Mutex::new(None),
        }
    }

    /// Registers the targets and the portals (those the transport listens on) with the iSNS
    /// server at `server` and from then on
    /// lets its discovery domains decide who sees what. The client keeps the registration
    /// (ESI answers, re-registration after a name-server restart) on its own thread; a name
    /// server that is down now is retried in the background.
    pub fn register_isns(
        &self,
        server: SocketAddr,
    ) -> Result<(), fabric_nameserver::client::ClientError> {
        let entity = EntityInfo {
            eid: String::new(),
            portals: self
                .registry
                .portals()
                .iter()
                .map(|p| (p.addr, p.tpgt))
                .collect(),
            targets: self
                .registry
                .targets()
                .iter()
                .map(|t| t.name().to_string())
                .collect(),
            esi_port: None,
            scn_port: None,
        };
        let client = IsnsClient::start(server, entity)?;
        self.registry
            .set_policy(Arc::new(DdPolicy(client.access())));
        tracing::info!(%server, eid = %client.eid(), "registered with the iSNS server");
        *self.isns.lock().unwrap_or_else(|p| p.into_inner()) = Some(client);
        Ok(())
    }

    /// Deregisters from the name server (at shutdown).
    pub fn deregister_isns(&self) {
        let client = self.isns.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(c) = client {
            if let Err(e) = c.stop() {
                tracing::warn!(err = %e, "iSNS deregistration failed");
            }
        }
    }

    /// Tells the name server of a target created (`add`) or deleted while running.
    fn isns_update(&self, iqn: &str, add: bool) {
        let guard = self.isns.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = guard.as_ref() {
            let r = if add {
                c.add_target(iqn)
            } else {
                c.remove_target(iqn)
            };
            if let Err(e) = r {
                // The client keeps what it was told and retries each round.
                tracing::warn!(target = %iqn, err = %e, "iSNS update not confirmed yet");
            }
        }
    }

    /// The unit serving disk `name` (made on first use).
    fn unit(&self, name: &str) -> Result<Arc<LogicalUnit>, ExportError> {
        let mut disks = self.disks.lock().unwrap_or_else(|p| p.into_inner());
        let d = disks
            .get_mut(name)
            .ok_or_else(|| ExportError::NoDisk(name.to_string()))?;
        if let Some(u) = &d.unit {
            return Ok(u.clone());
        }
        let state_path = match &self.state_dir {
            Some(dir) => {
                crate::create_private_dir(dir).map_err(|source| san::scsi::ScsiError::State {
                    path: dir.clone(),
                    source,
                })?;
                Some(dir.join(state_file_name(name)))
            }
            None => None,
        };
        let u = Arc::new(LogicalUnit::new(
            d.backend.clone(),
            LuConfig {
                name: name.to_string(),
                state_path,
            },
        )?);
        d.unit = Some(u.clone());
        Ok(u)
    }

    /// Creates the targets of `specs` (values with the same iqn make one target with several
    /// LUNs, numbered in order unless `lun=` says otherwise).
    pub fn create_targets(&self, specs: &[IscsiTargetSpec]) -> Result<(), ExportError> {
        let mut groups: BTreeMap<String, Vec<&IscsiTargetSpec>> = BTreeMap::new();
        let mut order = Vec::new();
        for s in specs {
            let key = s.iqn.to_ascii_lowercase();
            if !groups.contains_key(&key) {
                order.push(key.clone());
            }
            groups.entry(key).or_default().push(s);
        }
        for key in order {
            let group = &groups[&key];
            self.create_target(group)?;
        }
        Ok(())
    }

    /// One target from its values.
    fn create_target(&self, group: &[&IscsiTargetSpec]) -> Result<(), ExportError> {
        let first = group[0];
        let conflict = |what| ExportError::Conflict {
            iqn: first.iqn.clone(),
            what,
        };
        let mut chap = None;
        let mut allow: Vec<String> = Vec::new();
        for s in group {
            if s.chap.is_some() {
                if chap.is_some() && chap.as_ref() != Some(&s.chap) {
                    return Err(conflict("chap"));
                }
                chap = Some(s.chap.clone());
            }
            if !s.allow.is_empty() {
                if !allow.is_empty() && allow != s.allow {
                    return Err(conflict("allow"));
                }
                allow = s.allow.clone();
            }
        }
        let chap = match chap.flatten() {
            Some(c) => chap_of(&IscsiTargetSpec {
                chap: Some(c),
                ..first.clone()
            })?,
            None => None,
        };
        let mut luns = Vec::with_capacity(group.len());
        let mut next = 0u64;
        for s in group {
            let n = match s.lun {
                Some(n) => n,
                None => {
                    while luns.iter().any(|(l, _)| *l == next) {
                        next += 1;
                    }
                    next
                }
            };
            if n > LUN_MAX {
                return Err(ExportError::Target(TargetError::Limit(format!(
                    "LUN numbers go to {LUN_MAX}"
                ))));
            }
            luns.push((n, self.unit(&s.disk)?));
        }
        self.registry.add_target(&first.iqn, luns, chap, allow)?;
        tracing::info!(target = %first.iqn, luns = group.len(), "iSCSI target created");
        Ok(())
    }

    /// The control methods over these exports.
    pub fn register(self: &Arc<Self>, m: &mut Methods) {
        let rpc_err = |e: ExportError| RpcError::application(ISCSI_ERROR, e.to_string());
        let me = self.clone();
        m.add(
            ISCSI_GET_TARGETS,
            move |_: NoParams| -> Result<Value, RpcError> { Ok(me.targets_json()) },
        );
        let me = self.clone();
        m.add(ISCSI_TARGET_CREATE, move |a: IscsiTargetArgs| {
            let spec = IscsiTargetSpec::try_from(a).map_err(|e| rpc_err(e.into()))?;
            me.create_target(&[&spec]).map_err(rpc_err)?;
            me.isns_update(&spec.iqn, true);
            Ok(json!({}))
        });
        let me = self.clone();
        m.add(ISCSI_TARGET_DELETE, move |p: IqnParams| {
            me.registry
                .remove_target(&p.iqn)
                .map_err(|e| rpc_err(e.into()))?;
            me.isns_update(&p.iqn, false);
            tracing::info!(target = %p.iqn, "iSCSI target deleted");
            Ok(json!({}))
        });
        let me = self.clone();
        m.add(ISCSI_TARGET_LUN_ADD, move |p: LunAddParams| {
            let t = me
                .registry
                .target(&p.iqn)
                .ok_or_else(|| rpc_err(TargetError::NoTarget(p.iqn.clone()).into()))?;
            let lun = match p.lun {
                Some(l) if l > LUN_MAX => {
                    return Err(RpcError::invalid_params(format!("lun goes to {LUN_MAX}")))
                }
                Some(l) => l,
                None => (0..=LUN_MAX)
                    .find(|n| !t.luns().iter().any(|(l, _)| l == n))
                    .ok_or_else(|| RpcError::invalid_params("no free LUN number"))?,
            };
            let unit = me.unit(&p.disk).map_err(rpc_err)?;
            me.registry
                .add_lun(&p.iqn, lun, unit)
                .map_err(|e| rpc_err(e.into()))?;
            Ok(json!({ "lun": lun }))
        });
        let me = self.clone();
        m.add(ISCSI_TARGET_LUN_REMOVE, move |p: LunRemoveParams| {
            me.registry
                .remove_lun(&p.iqn, p.lun)
                .map_err(|e| rpc_err(e.into()))?;
            Ok(json!({}))
        });
    }

    /// Targets, portals and LUNs as JSON (`iscsi_get_targets`).
    pub fn targets_json(&self) -> Value {
        let disk_of = |u: &Arc<LogicalUnit>| u.config().name.clone();
        let targets: Vec<Value> = self
            .registry
            .targets()
            .iter()
            .map(|t| {
                let luns: Vec<Value> = t
                    .luns()
                    .iter()
                    .map(|(n, u)| json!({"lun": n, "disk": disk_of(u)}))
                    .collect();
                json!({
                    "iqn": t.name().as_ref(),
                    "luns": luns,
                    "chap": t.chap.as_ref().map(|c| json!({"user": c.user, "mutual": c.mutual.is_some()})),
                    "allow": t.allow,
                })
            })
            .collect();
        let portals: Vec<Value> = self
            .registry
            .portals()
            .iter()
            .map(|p| json!({"address": p.addr.to_string(), "tpgt": p.tpgt}))
            .collect();
        json!({ "targets": targets, "portals": portals })
    }
}

/// The file name of disk `name`'s reservation state (any character outside [A-Za-z0-9._-]
/// becomes `_`, so a name cannot leave the directory).
fn state_file_name(name: &str) -> String {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("pr-{safe}.json")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IqnParams {
    iqn: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LunAddParams {
    iqn: String,
    disk: String,
    lun: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LunRemoveParams {
    iqn: String,
    lun: u64,
}

/// The addresses of interface `iface` (getifaddrs), for the steering check.
fn iface_addrs(iface: &str) -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below; each node's ifa_addr is
    // either null or points to a sockaddr of the family it names, valid until freeifaddrs.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut p = head;
        while !p.is_null() {
            let ifa = &*p;
            let name = std::ffi::CStr::from_ptr(ifa.ifa_name).to_string_lossy();
            if name == iface && !ifa.ifa_addr.is_null() {
                match i32::from((*ifa.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                        out.push(IpAddr::from(
                            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                        ));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                        out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            p = ifa.ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out
}

/// Refuses a `--port` that steers, on interface `iface`, a TCP port a kernel-socket portal
/// listens on there: the steering program would hand the portal's packets to an AF_XDP queue
/// no TCP stack reads, and initiators would hang. (Until Strata's own TCP runs on those
/// queues.) A portal on the wildcard address listens on every interface.
pub fn check_steering(iface: &str, steered: &[u16], portals: &[SocketAddr]) -> Result<(), String> {
    let addrs = iface_addrs(iface);
    for p in portals {
        let on_iface = p.ip().is_unspecified() || addrs.contains(&p.ip());
        if on_iface && steered.contains(&p.port()) {
            return Err(format!(
                "--port iface={iface} steers TCP port {} away from the kernel, but the iSCSI \
                 portal {p} listens there with a kernel socket (Strata's TCP on AF_XDP queues \
                 does not exist yet): leave {} out of the port's steer= list",
                p.port(),
                p.port()
            ));
        }
    }
    Ok(())
}

/// The default reservation-state directory: `DIR/iscsi-state` of the data directory.
pub fn default_state_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("iscsi-state")
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataplane::backend::NullBackend;

    fn exports() -> Exports {
        let b: Arc<dyn BlockBackend> = Arc::new(NullBackend::new(1 << 20, true).unwrap());
        let c: Arc<dyn BlockBackend> = Arc::new(NullBackend::new(2 << 20, true).unwrap());
        Exports::new(vec![("d0".into(), b), ("d1".into(), c)], None)
    }

    fn spec(s: &str) -> IscsiTargetSpec {
        crate::spec::parse_iscsi_target_spec(s).unwrap()
    }

    #[test]
    fn values_with_one_iqn_make_one_target_with_numbered_luns() {
        let e = exports();
        e.create_targets(&[
            spec("iqn=iqn.2026-12.t:a,disk=d0"),
            spec("iqn=iqn.2026-12.t:b,disk=d1,lun=5"),
            spec("iqn=iqn.2026-12.t:a,disk=d1"),
        ])
        .unwrap();
        let a = e.registry.target("iqn.2026-12.t:a").unwrap();
        let luns: Vec<u64> = a.luns().iter().map(|(n, _)| *n).collect();
        assert_eq!(luns, vec![0, 1]);
        let b = e.registry.target("iqn.2026-12.t:b").unwrap();
        assert_eq!(b.luns()[0].0, 5);
        // One unit per disk, whichever targets export it.
        assert!(Arc::ptr_eq(&a.luns()[1].1, &b.luns()[0].1));
    }

    #[test]
    fn unknown_disk_and_conflicts_are_refused() {
        let e = exports();
        assert!(matches!(
            e.create_targets(&[spec("iqn=iqn.2026-12.t:a,disk=nope")]),
            Err(ExportError::NoDisk(_))
        ));
        assert!(matches!(
            e.create_targets(&[
                spec("iqn=iqn.2026-12.t:c,disk=d0,allow=iqn.x:1"),
                spec("iqn=iqn.2026-12.t:c,disk=d1,allow=iqn.x:2"),
            ]),
            Err(ExportError::Conflict { what: "allow", .. })
        ));
        assert!(matches!(
            e.create_targets(&[
                spec("iqn=iqn.2026-12.t:d,disk=d0,lun=1"),
                spec("iqn=iqn.2026-12.t:d,disk=d1,lun=1"),
            ]),
            Err(ExportError::Target(TargetError::LunExists(..)))
        ));
    }

    #[test]
    fn secrets_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "abc\n").unwrap();
        let good = dir.path().join("good");
        std::fs::write(&good, "0123456789abcdef\n").unwrap();
        assert!(matches!(
            read_secret(short.to_str().unwrap()),
            Err(ExportError::Secret { .. })
        ));
        assert_eq!(
            read_secret(good.to_str().unwrap()).unwrap(),
            b"0123456789abcdef"
        );
        let e = exports();
        let same = format!(
            "iqn=iqn.2026-12.t:m,disk=d0,chap-user=u,chap-secret-file={0},mutual-user=t,mutual-secret-file={0}",
            good.display()
        );
        assert!(matches!(
            e.create_targets(&[spec(&same)]),
            Err(ExportError::Secret { .. })
        ));
    }

    /// The control methods change targets while running, and refuse what the flags refuse.
    #[test]
    fn targets_change_through_the_control_methods() {
        let e = Arc::new(exports());
        let mut m = Methods::new();
        e.register(&mut m);
        m.call(
            ISCSI_TARGET_CREATE,
            json!({"iqn": "iqn.2026-12.t:r", "disk": "d0"}),
        )
        .unwrap();
        let err = m
            .call(
                ISCSI_TARGET_CREATE,
                json!({"iqn": "iqn.2026-12.t:r", "disk": "d1"}),
            )
            .unwrap_err();
        assert!(err.to_string().contains("exists"), "{err}");
        let v = m
            .call(
                ISCSI_TARGET_LUN_ADD,
                json!({"iqn": "iqn.2026-12.t:r", "disk": "d1"}),
            )
            .unwrap();
        assert_eq!(v["lun"], 1);
        let err = m
            .call(
                ISCSI_TARGET_LUN_ADD,
                json!({"iqn": "iqn.2026-12.t:r", "disk": "zz"}),
            )
            .unwrap_err();
        assert!(err.to_string().contains("no disk"), "{err}");
        let v = m.call(ISCSI_GET_TARGETS, json!({})).unwrap();
        assert_eq!(v["targets"][0]["luns"][1]["disk"], "d1");
        m.call(
            ISCSI_TARGET_LUN_REMOVE,
            json!({"iqn": "iqn.2026-12.t:r", "lun": 0}),
        )
        .unwrap();
        assert_eq!(
            e.registry.target("iqn.2026-12.t:r").unwrap().luns().len(),
            1
        );
        m.call(ISCSI_TARGET_DELETE, json!({"iqn": "iqn.2026-12.t:r"}))
            .unwrap();
        assert!(m
            .call(ISCSI_TARGET_DELETE, json!({"iqn": "iqn.2026-12.t:r"}))
            .is_err());
        assert_eq!(
            m.call(ISCSI_GET_TARGETS, json!({})).unwrap()["targets"],
            json!([])
        );
    }

    #[test]
    fn state_file_names_stay_in_their_directory() {
        assert_eq!(state_file_name("../etc/x"), "pr-.._etc_x.json");
        assert_eq!(state_file_name("disk0"), "pr-disk0.json");
    }

    #[test]
    fn steering_a_portal_port_is_refused() {
        let any: SocketAddr = "0.0.0.0:3260".parse().unwrap();
        assert!(check_steering("lo", &[3260, 4420], &[any]).is_err());
        assert!(check_steering("lo", &[4420], &[any]).is_ok());
        let lo: SocketAddr = "127.0.0.1:3260".parse().unwrap();
        assert!(check_steering("lo", &[3260], &[lo]).is_err());
        // A portal on an address of another interface is not affected.
        assert!(check_steering("nonexistent0", &[3260], &[lo]).is_ok());
    }
}
