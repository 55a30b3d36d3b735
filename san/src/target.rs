//! What the SAN target exports: targets with their LUNs, CHAP secrets and initiator lists,
//! the portals they are reached through, and the access policy (discovery domains) that
//! decides which initiator sees which target.
//!
//! One [`Registry`] per daemon, shared by the login thread (discovery, login checks) and the
//! reactors (a session's LUN table). Changes (control RPCs) swap whole tables: a session holds
//! an `Arc` of the table it uses and notices a change through [`Target::generation`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use thiserror::Error;

use crate::scsi::LogicalUnit;

/// Targets one daemon exports at most (each has its own sessions and registrations).
pub const TARGETS_MAX: usize = 256;
/// LUNs per target at most (REPORT LUNS answers fit in one 4 KiB Data-In).
pub const LUNS_PER_TARGET_MAX: usize = 256;
/// Longest iSCSI name (RFC 7143 §4.2.7.1: 223 bytes).
pub const NAME_LEN_MAX: usize = 223;

/// Errors changing the registry.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TargetError {
    /// A target of that name exists.
    #[error("target {0} exists")]
    Exists(String),
    /// No target of that name.
    #[error("no target {0}")]
    NoTarget(String),
    /// The LUN number is taken.
    #[error("target {0} already has LUN {1}")]
    LunExists(String, u64),
    /// No such LUN.
    #[error("target {0} has no LUN {1}")]
    NoLun(String, u64),
    /// A limit was reached.
    #[error("{0}")]
    Limit(String),
    /// A name that is not a valid iSCSI name (iqn., eui. or naa. form).
    #[error("invalid iSCSI name {0:?}: {1}")]
    BadName(String, &'static str),
}

/// CHAP credentials of a target.
#[derive(Clone, PartialEq, Eq)]
pub struct Chap {
    /// The name the initiator must send (CHAP_N).
    pub user: String,
    /// The secret the initiator must know.
    pub secret: Vec<u8>,
    /// Mutual CHAP: the name and secret the target answers the initiator's challenge with.
    pub mutual: Option<(String, Vec<u8>)>,
}

impl std::fmt::Debug for Chap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets never reach logs.
        f.debug_struct("Chap")
            .field("user", &self.user)
            .field("mutual", &self.mutual.as_ref().map(|(u, _)| u))
            .finish()
    }
}

/// A target's LUN table: (LUN number, unit), sorted by LUN.
pub type LunMap = Vec<(u64, Arc<LogicalUnit>)>;

/// One exported target.
#[derive(Debug)]
pub struct Target {
    name: Arc<str>,
    luns: RwLock<Arc<LunMap>>,
    generation: AtomicU64,
    /// CHAP required at login, if set.
    pub chap: Option<Chap>,
    /// Initiator names allowed to log in (empty: any initiator the access policy allows).
    pub allow: Vec<String>,
}

impl Target {
    /// The target's iSCSI name.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The current LUN table.
    pub fn luns(&self) -> Arc<LunMap> {
        self.luns.read().map(|l| l.clone()).unwrap_or_default()
    }

    /// Bumped on every LUN table change; a session re-reads [`Target::luns`] when it moves.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether `initiator` is on this target's own list (empty list: everyone).
    pub fn allows(&self, initiator: &str) -> bool {
        self.allow.is_empty() || self.allow.iter().any(|a| a.eq_ignore_ascii_case(initiator))
    }
}

/// A listening address and its portal group tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Portal {
    /// Address.
    pub addr: SocketAddr,
    /// Target portal group tag (TPGT).
    pub tpgt: u16,
}

impl Portal {
    /// The `TargetAddress` value: `IP:PORT,TPGT` (IPv6 in brackets).
    pub fn target_address(&self) -> String {
        format!("{},{}", self.addr, self.tpgt)
    }
}

/// Which targets an initiator may see and log in to, beyond each target's own list: the
/// name server's discovery domains when stratad registers with one.
pub trait AccessPolicy: Send + Sync + std::fmt::Debug {
    /// Whether `initiator` shares a discovery domain with `target` (or no zoning applies).
    fn visible(&self, initiator: &str, target: &str) -> bool;
}

/// No zoning: every initiator sees every target (subject to the targets' own lists).
#[derive(Debug, Default)]
pub struct OpenAccess;

impl AccessPolicy for OpenAccess {
    fn visible(&self, _initiator: &str, _target: &str) -> bool {
        true
    }
}

/// Everything the daemon exports.
#[derive(Debug)]
pub struct Registry {
    targets: RwLock<BTreeMap<String, Arc<Target>>>,
    portals: RwLock<Vec<Portal>>,
    policy: RwLock<Arc<dyn AccessPolicy>>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            targets: RwLock::new(BTreeMap::new()),
            portals: RwLock::new(Vec::new()),
            policy: RwLock::new(Arc::new(OpenAccess)),
        }
    }
}

/// Checks the form of an iSCSI name (RFC 7143 §4.2.7): `iqn.`, `eui.` or `naa.`, at most 223
/// bytes, no whitespace or control characters.
pub fn check_name(name: &str) -> Result<(), TargetError> {
    let bad = |why| Err(TargetError::BadName(name.to_string(), why));
    if name.is_empty() || name.len() > NAME_LEN_MAX {
        return bad("length must be 1..=223 bytes");
    }
    let lower = name.to_ascii_lowercase();
    if !(lower.starts_with("iqn.") || lower.starts_with("eui.") || lower.starts_with("naa.")) {
        return bad("must start with iqn., eui. or naa.");
    }
    if name.bytes().any(|b| b <= b' ' || b == 0x7f || b == b',') {
        return bad("no spaces, commas or control characters");
    }
    Ok(())
}

impl Registry {
    /// An empty registry with open access.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a target with `luns` (LUN numbers unique).
    pub fn add_target(
        &self,
        name: &str,
        luns: LunMap,
        chap: Option<Chap>,
        allow: Vec<String>,
    ) -> Result<Arc<Target>, TargetError> {
        check_name(name)?;
        for a in &allow {
            check_name(a)?;
        }
        let mut luns = luns;
        luns.sort_by_key(|(n, _)| *n);
        if let Some(w) = luns.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(TargetError::LunExists(name.to_string(), w[0].0));
        }
        if luns.len() > LUNS_PER_TARGET_MAX {
            return Err(TargetError::Limit(format!(
                "at most {LUNS_PER_TARGET_MAX} LUNs per target"
            )));
        }
        let mut targets = self.targets.write().unwrap_or_else(|p| p.into_inner());
        let key = name.to_ascii_lowercase();
        if targets.contains_key(&key) {
            return Err(TargetError::Exists(name.to_string()));
        }
        if targets.len() >= TARGETS_MAX {
            return Err(TargetError::Limit(format!("at most {TARGETS_MAX} targets")));
        }
        let t = Arc::new(Target {
            name: Arc::from(name),
            luns: RwLock::new(Arc::new(luns)),
            generation: AtomicU64::new(0),
            chap,
            allow,
        });
        targets.insert(key, t.clone());
        Ok(t)
    }

    /// Removes a target (its sessions end when they next look it up).
    pub fn remove_target(&self, name: &str) -> Result<Arc<Target>, TargetError> {
        let mut targets = self.targets.write().unwrap_or_else(|p| p.into_inner());
        targets
            .remove(&name.to_ascii_lowercase())
            .ok_or_else(|| TargetError::NoTarget(name.to_string()))
    }

    /// Adds LUN `lun` to target `name`.
    pub fn add_lun(&self, name: &str, lun: u64, unit: Arc<LogicalUnit>) -> Result<(), TargetError> {
        let t = self
            .target(name)
            .ok_or_else(|| TargetError::NoTarget(name.to_string()))?;
        let mut luns = t.luns.write().unwrap_or_else(|p| p.into_inner());
        if luns.iter().any(|(n, _)| *n == lun) {
            return Err(TargetError::LunExists(name.to_string(), lun));
        }
        if luns.len() >= LUNS_PER_TARGET_MAX {
            return Err(TargetError::Limit(format!(
                "at most {LUNS_PER_TARGET_MAX} LUNs per target"
            )));
        }
        let mut next: LunMap = luns.as_ref().clone();
        next.push((lun, unit));
        next.sort_by_key(|(n, _)| *n);
        *luns = Arc::new(next);
        t.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Removes LUN `lun` from target `name`; returns its unit.
    pub fn remove_lun(&self, name: &str, lun: u64) -> Result<Arc<LogicalUnit>, TargetError> {
        let t = self
            .target(name)
            .ok_or_else(|| TargetError::NoTarget(name.to_string()))?;
        let mut luns = t.luns.write().unwrap_or_else(|p| p.into_inner());
        let pos = luns
            .iter()
            .position(|(n, _)| *n == lun)
            .ok_or_else(|| TargetError::NoLun(name.to_string(), lun))?;
        let mut next: LunMap = luns.as_ref().clone();
        let (_, unit) = next.remove(pos);
        *luns = Arc::new(next);
        t.generation.fetch_add(1, Ordering::AcqRel);
        Ok(unit)
    }

    /// The target called `name` (iSCSI names compare case-insensitively).
    pub fn target(&self, name: &str) -> Option<Arc<Target>> {
        let targets = self.targets.read().unwrap_or_else(|p| p.into_inner());
        targets.get(&name.to_ascii_lowercase()).cloned()
    }

    /// Every target, by name.
    pub fn targets(&self) -> Vec<Arc<Target>> {
        let targets = self.targets.read().unwrap_or_else(|p| p.into_inner());
        targets.values().cloned().collect()
    }

    /// Adds a portal (a listener was opened on it).
    pub fn add_portal(&self, portal: Portal) {
        let mut p = self.portals.write().unwrap_or_else(|p| p.into_inner());
        if !p.contains(&portal) {
            p.push(portal);
        }
    }

    /// The portals, in the order they were added.
    pub fn portals(&self) -> Vec<Portal> {
        self.portals
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the access policy (when stratad registers with a name server).
    pub fn set_policy(&self, policy: Arc<dyn AccessPolicy>) {
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = policy;
    }

    /// Whether `initiator` may see (SendTargets) and log in to `target`: the target's own
    /// list and the access policy both allow it.
    pub fn may_access(&self, initiator: &str, target: &Target) -> bool {
        if !target.allows(initiator) {
            return false;
        }
        let policy = self
            .policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        policy.visible(initiator, target.name())
    }

    /// The targets `initiator` may see, for SendTargets=All.
    pub fn visible_to(&self, initiator: &str) -> Vec<Arc<Target>> {
        self.targets()
            .into_iter()
            .filter(|t| self.may_access(initiator, t))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct OnlyA;
    impl AccessPolicy for OnlyA {
        fn visible(&self, initiator: &str, _target: &str) -> bool {
            initiator == "iqn.2026-01.test:a"
        }
    }

    #[test]
    fn names_are_checked_and_unique() {
        let r = Registry::new();
        assert!(matches!(
            r.add_target("bad name", vec![], None, vec![]),
            Err(TargetError::BadName(..))
        ));
        r.add_target("iqn.2026-01.test:t", vec![], None, vec![])
            .expect("add");
        assert_eq!(
            r.add_target("IQN.2026-01.test:T", vec![], None, vec![])
                .err(),
            Some(TargetError::Exists("IQN.2026-01.test:T".into()))
        );
        assert!(r.target("iqn.2026-01.TEST:t").is_some());
        r.remove_target("iqn.2026-01.test:t").expect("remove");
        assert!(r.targets().is_empty());
    }

    #[test]
    fn access_needs_both_the_list_and_the_policy() {
        let r = Registry::new();
        let t = r
            .add_target(
                "iqn.2026-01.test:t",
                vec![],
                None,
                vec!["iqn.2026-01.test:a".into(), "iqn.2026-01.test:b".into()],
            )
            .expect("add");
        assert!(r.may_access("iqn.2026-01.test:b", &t));
        assert!(!r.may_access("iqn.2026-01.test:c", &t));
        r.set_policy(Arc::new(OnlyA));
        assert!(r.may_access("iqn.2026-01.test:a", &t));
        assert!(!r.may_access("iqn.2026-01.test:b", &t));
        assert_eq!(r.visible_to("iqn.2026-01.test:b").len(), 0);
    }

    #[test]
    fn portal_address_form() {
        let p = Portal {
            addr: "127.0.0.1:3260".parse().expect("addr"),
            tpgt: 1,
        };
        assert_eq!(p.target_address(), "127.0.0.1:3260,1");
        let p = Portal {
            addr: "[::1]:3260".parse().expect("addr"),
            tpgt: 2,
        };
        assert_eq!(p.target_address(), "[::1]:3260,2");
    }
}
