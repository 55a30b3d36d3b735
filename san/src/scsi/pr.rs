//! Persistent reservations (SPC-5 5.13): registrations per I_T nexus, the reservation and its
//! type, the PERSISTENT RESERVE IN/OUT service actions, and the conflict check every command
//! goes through. Pure state and functions; the unit keeps the state behind its lock and saves
//! it (see `persist`) after every change.

use serde::{Deserialize, Serialize};

use super::cdb::PrOutCdb;
use super::sense::{ua, Sense};
use super::ua::UnitAttentions;
use super::Nexus;

/// Registrations the unit keeps: every initiator port of a large cluster, with room.
pub(crate) const REGISTRATIONS_MAX: usize = 256;
/// Bytes of a PERSISTENT RESERVE OUT parameter list (SPC-5 6.17.3, without SPEC_I_PT).
pub(crate) const PROUT_PARAM_LEN: usize = 24;

/// Reservation types.
pub(crate) mod kind {
    pub const WE: u8 = 1;
    pub const EA: u8 = 3;
    pub const WE_RO: u8 = 5;
    pub const EA_RO: u8 = 6;
    pub const WE_AR: u8 = 7;
    pub const EA_AR: u8 = 8;
}

/// PERSISTENT RESERVE OUT service actions.
pub(crate) mod sa {
    pub const REGISTER: u8 = 0;
    pub const RESERVE: u8 = 1;
    pub const RELEASE: u8 = 2;
    pub const CLEAR: u8 = 3;
    pub const PREEMPT: u8 = 4;
    pub const PREEMPT_AND_ABORT: u8 = 5;
    pub const REGISTER_AND_IGNORE: u8 = 6;
    /// PERSISTENT RESERVE IN.
    pub const READ_KEYS: u8 = 0;
    pub const READ_RESERVATION: u8 = 1;
    pub const REPORT_CAPABILITIES: u8 = 2;
    pub const READ_FULL_STATUS: u8 = 3;
}

/// How a command touches the medium, for the conflict check (SPC-5 table 63 / SBC-4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Never conflicts (INQUIRY, REPORT LUNS, REQUEST SENSE, READ CAPACITY, TEST UNIT READY,
    /// PERSISTENT RESERVE IN/OUT — the latter checks its own rules).
    Always,
    /// Conflicts under the exclusive-access types.
    Read,
    /// Conflicts under every type.
    Write,
}

/// One registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Registration {
    pub i_port: String,
    pub t_port: String,
    pub rel_port: u16,
    pub key: u64,
}

/// The reservation (holder meaningful for the types that are not all-registrants).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Reservation {
    pub i_port: String,
    pub t_port: String,
    pub kind: u8,
}

/// A unit's persistent-reservation state (also its saved form).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PrState {
    pub generation: u32,
    pub aptpl: bool,
    pub regs: Vec<Registration>,
    pub res: Option<Reservation>,
}

/// Why a PERSISTENT RESERVE OUT failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PrError {
    Conflict,
    Check(Sense),
}

fn all_registrants(k: u8) -> bool {
    matches!(k, kind::WE_AR | kind::EA_AR)
}

fn registrants_only(k: u8) -> bool {
    matches!(k, kind::WE_RO | kind::EA_RO)
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

impl PrState {
    fn find(&self, n: &Nexus) -> Option<usize> {
        self.regs
            .iter()
            .position(|r| *r.i_port == *n.initiator_port && *r.t_port == *n.target_port)
    }

    fn is_holder(&self, n: &Nexus) -> bool {
        match &self.res {
            None => false,
            Some(r) if all_registrants(r.kind) => self.find(n).is_some(),
            Some(r) => *r.i_port == *n.initiator_port && *r.t_port == *n.target_port,
        }
    }

    /// True if a command of `access` from `n` conflicts with the reservation.
    pub(crate) fn conflicts(&self, n: &Nexus, access: Access) -> bool {
        let Some(res) = &self.res else {
            return false;
        };
        if access == Access::Always || self.is_holder(n) {
            return false;
        }
        let registered = self.find(n).is_some();
        match res.kind {
            kind::WE => access == Access::Write,
            kind::EA => true,
            kind::WE_RO | kind::WE_AR => !registered && access == Access::Write,
            kind::EA_RO | kind::EA_AR => !registered,
            _ => false,
        }
    }

    /// Whether `n` may do SPC-2 RESERVE(6): not while another nexus holds a persistent
    /// reservation.
    pub(crate) fn blocks_reserve6(&self, n: &Nexus) -> bool {
        self.res.is_some() && !self.is_holder(n)
    }

    /// Drops the reservation, telling the other registrants when SPC-5 says so.
    fn release_res(&mut self, by: &Nexus, uas: &mut UnitAttentions) {
        if let Some(r) = self.res.take() {
            if registrants_only(r.kind) || all_registrants(r.kind) {
                for reg in &self.regs {
                    if *reg.i_port != *by.initiator_port {
                        uas.raise(&reg.i_port, ua::RESERVATIONS_RELEASED);
                    }
                }
            }
        }
    }

    /// Removes registration `i`; a holder of a (non all-registrants) reservation loses it, as
    /// does the last registrant of an all-registrants one.
    fn unregister(&mut self, i: usize, by: &Nexus, uas: &mut UnitAttentions) {
        let reg = self.regs.remove(i);
        let drop_res = match &self.res {
            Some(r) if all_registrants(r.kind) => self.regs.is_empty(),
            Some(r) => r.i_port == reg.i_port && r.t_port == reg.t_port,
            None => false,
        };
        if drop_res {
            self.release_res(by, uas);
        }
    }

    /// PERSISTENT RESERVE OUT. `params` is the parameter list as received, `param_len` what
    /// the CDB declared. Returns whether the state changed (and must be saved). A PREEMPT
    /// AND ABORT adds the nexuses it preempted (initiator port, target port) to `aborted`:
    /// their tasks are to be aborted.
    pub(crate) fn out(
        &mut self,
        n: &Nexus,
        c: &PrOutCdb,
        params: &[u8],
        uas: &mut UnitAttentions,
        aborted: &mut Vec<(String, String)>,
    ) -> Result<bool, PrError> {
        let PrOutCdb {
            action,
            scope,
            rtype,
            param_len,
        } = *c;
        if action > sa::REGISTER_AND_IGNORE {
            // REGISTER AND MOVE (7) and reserved actions.
            return Err(PrError::Check(Sense::invalid_field_in_cdb()));
        }
        if param_len as usize != PROUT_PARAM_LEN || params.len() < PROUT_PARAM_LEN {
            return Err(PrError::Check(Sense::param_list_length_error()));
        }
        let key = be64(&params[0..8]);
        let sa_key = be64(&params[8..16]);
        let flags = params[20];
        let (spec_i_pt, all_tg_pt, aptpl) =
            (flags & 0x08 != 0, flags & 0x04 != 0, flags & 0x01 != 0);
        if spec_i_pt || all_tg_pt {
            return Err(PrError::Check(Sense::invalid_field_in_param_list()));
        }
        let me = self.find(n);
        let needs_type = matches!(
            action,
            sa::RESERVE | sa::RELEASE | sa::PREEMPT | sa::PREEMPT_AND_ABORT
        );
        if needs_type {
            if scope != 0 {
                return Err(PrError::Check(Sense::invalid_field_in_cdb()));
            }
            if !matches!(
                rtype,
                kind::WE | kind::EA | kind::WE_RO | kind::EA_RO | kind::WE_AR | kind::EA_AR
            ) {
                return Err(PrError::Check(Sense::invalid_field_in_cdb()));
            }
        }
        match action {
            sa::REGISTER | sa::REGISTER_AND_IGNORE => {
                let ignore = action == sa::REGISTER_AND_IGNORE;
                match me {
                    None => {
                        if !ignore && key != 0 {
                            return Err(PrError::Conflict);
                        }
                        if sa_key == 0 {
                            return Ok(false);
                        }
                        if self.regs.len() >= REGISTRATIONS_MAX {
                            return Err(PrError::Check(
                                Sense::insufficient_registration_resources(),
                            ));
                        }
                        self.regs.push(Registration {
                            i_port: n.initiator_port.to_string(),
                            t_port: n.target_port.to_string(),
                            rel_port: n.relative_port,
                            key: sa_key,
                        });
                    }
                    Some(i) => {
                        if !ignore && key != self.regs[i].key {
                            return Err(PrError::Conflict);
                        }
                        if sa_key == 0 {
                            self.unregister(i, n, uas);
                        } else {
                            self.regs[i].key = sa_key;
                        }
                    }
                }
                self.aptpl = aptpl;
                self.generation = self.generation.wrapping_add(1);
                Ok(true)
            }
            _ => {
                let Some(i) = me else {
                    return Err(PrError::Conflict);
                };
                if self.regs[i].key != key {
                    return Err(PrError::Conflict);
                }
                match action {
                    sa::RESERVE => self.reserve(n, rtype),
                    sa::RELEASE => self.release(n, rtype, uas),
                    sa::CLEAR => {
                        for reg in &self.regs {
                            if *reg.i_port != *n.initiator_port {
                                uas.raise(&reg.i_port, ua::RESERVATIONS_PREEMPTED);
                            }
                        }
                        self.regs.clear();
                        self.res = None;
                        self.generation = self.generation.wrapping_add(1);
                        Ok(true)
                    }
                    _ => {
                        let victims = if action == sa::PREEMPT_AND_ABORT {
                            Some(aborted)
                        } else {
                            None
                        };
                        self.preempt(n, rtype, sa_key, uas, victims)
                    }
                }
            }
        }
    }

    fn reserve(&mut self, n: &Nexus, rtype: u8) -> Result<bool, PrError> {
        match &self.res {
            Some(r) if self.is_holder(n) && r.kind == rtype => Ok(false),
            Some(_) => Err(PrError::Conflict),
            None => {
                self.res = Some(Reservation {
                    i_port: n.initiator_port.to_string(),
                    t_port: n.target_port.to_string(),
                    kind: rtype,
                });
                Ok(true)
            }
        }
    }

    fn release(&mut self, n: &Nexus, rtype: u8, uas: &mut UnitAttentions) -> Result<bool, PrError> {
        match &self.res {
            Some(r) if self.is_holder(n) => {
                if r.kind != rtype {
                    return Err(PrError::Check(Sense::invalid_pr_release()));
                }
                self.release_res(n, uas);
                Ok(true)
            }
            // No reservation, or held by another nexus: nothing to do (GOOD).
            _ => Ok(false),
        }
    }

    fn preempt(
        &mut self,
        n: &Nexus,
        rtype: u8,
        sa_key: u64,
        uas: &mut UnitAttentions,
        aborted: Option<&mut Vec<(String, String)>>,
    ) -> Result<bool, PrError> {
        let holder_key = match &self.res {
            Some(r) if all_registrants(r.kind) => Some(0),
            Some(r) => self
                .regs
                .iter()
                .find(|g| g.i_port == r.i_port && g.t_port == r.t_port)
                .map(|g| g.key),
            None => None,
        };
        let me_i = &*n.initiator_port;
        let me_t = &*n.target_port;
        let is_me = |g: &Registration| g.i_port == me_i && g.t_port == me_t;
        let takes_reservation = match holder_key {
            // All-registrants: key 0 preempts everyone else and the reservation.
            Some(0) if self.res.as_ref().is_some_and(|r| all_registrants(r.kind)) => sa_key == 0,
            Some(h) => h == sa_key,
            None => false,
        };
        if !takes_reservation && sa_key == 0 {
            return Err(PrError::Check(Sense::invalid_field_in_param_list()));
        }
        let victims: Vec<(String, String)> = self
            .regs
            .iter()
            .filter(|g| !is_me(g) && (sa_key == 0 || g.key == sa_key))
            .map(|g| (g.i_port.clone(), g.t_port.clone()))
            .collect();
        if !takes_reservation && !self.regs.iter().any(|g| g.key == sa_key) {
            return Err(PrError::Conflict);
        }
        self.regs
            .retain(|g| is_me(g) || !(sa_key == 0 || g.key == sa_key));
        for (v, _) in &victims {
            uas.raise(v, ua::REGISTRATIONS_PREEMPTED);
        }
        if let Some(aborted) = aborted {
            aborted.extend(victims);
        }
        if takes_reservation {
            let old = self.res.take();
            if let Some(old) = old {
                if old.kind != rtype {
                    // The other registrants' reservation changed under them.
                    for reg in &self.regs {
                        if !is_me(reg) {
                            uas.raise(&reg.i_port, ua::RESERVATIONS_RELEASED);
                        }
                    }
                }
            }
            self.res = Some(Reservation {
                i_port: me_i.to_string(),
                t_port: me_t.to_string(),
                kind: rtype,
            });
        } else if let Some(r) = &self.res {
            // The holder's registration was removed with the victims: so is its reservation.
            let holder_gone = !all_registrants(r.kind)
                && !self
                    .regs
                    .iter()
                    .any(|g| g.i_port == r.i_port && g.t_port == r.t_port);
            if holder_gone || (all_registrants(r.kind) && self.regs.is_empty()) {
                self.res = None;
            }
        }
        self.generation = self.generation.wrapping_add(1);
        Ok(true)
    }

    /// PERSISTENT RESERVE IN parameter data into `out` (whole; the caller cuts it to the
    /// allocation length).
    pub(crate) fn read(&self, action: u8, out: &mut Vec<u8>) -> Result<(), Sense> {
        out.clear();
        out.extend_from_slice(&self.generation.to_be_bytes());
        match action {
            sa::READ_KEYS => {
                out.extend_from_slice(&((self.regs.len() * 8) as u32).to_be_bytes());
                for r in &self.regs {
                    out.extend_from_slice(&r.key.to_be_bytes());
                }
            }
            sa::READ_RESERVATION => match &self.res {
                None => out.extend_from_slice(&0u32.to_be_bytes()),
                Some(r) => {
                    out.extend_from_slice(&16u32.to_be_bytes());
                    let key = if all_registrants(r.kind) {
                        0
                    } else {
                        self.regs
                            .iter()
                            .find(|g| g.i_port == r.i_port && g.t_port == r.t_port)
                            .map_or(0, |g| g.key)
                    };
                    out.extend_from_slice(&key.to_be_bytes());
                    out.extend_from_slice(&[0, 0, 0, 0, 0, r.kind & 0x0F, 0, 0]);
                }
            },
            sa::REPORT_CAPABILITIES => {
                out.clear();
                // Length 8; CRH (RESERVE(6) yields to persistent reservations) and PTPL_C;
                // TMV with the types supported, PTPL_A as set.
                out.extend_from_slice(&[0, 8, 0x10 | 0x01, 0x80 | u8::from(self.aptpl)]);
                // WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX; EX_AC_AR.
                out.extend_from_slice(&[0x80 | 0x40 | 0x20 | 0x08 | 0x02, 0x01, 0, 0]);
            }
            sa::READ_FULL_STATUS => {
                let start = out.len();
                out.extend_from_slice(&0u32.to_be_bytes());
                for r in &self.regs {
                    let holder = match &self.res {
                        Some(res) if all_registrants(res.kind) => Some(res.kind),
                        Some(res) if res.i_port == r.i_port && res.t_port == r.t_port => {
                            Some(res.kind)
                        }
                        _ => None,
                    };
                    out.extend_from_slice(&r.key.to_be_bytes());
                    out.extend_from_slice(&[0; 4]);
                    out.push(u8::from(holder.is_some()));
                    out.push(holder.unwrap_or(0) & 0x0F);
                    out.extend_from_slice(&[0; 4]);
                    out.extend_from_slice(&r.rel_port.to_be_bytes());
                    // iSCSI TransportID, initiator port format (01b): name,i,0xISID, NUL,
                    // padded to a multiple of 4.
                    let name = r.i_port.as_bytes();
                    let padded = (name.len() + 1).div_ceil(4) * 4;
                    let tid_len = 4 + padded;
                    out.extend_from_slice(&(tid_len as u32).to_be_bytes());
                    out.extend_from_slice(&[0x45, 0]);
                    out.extend_from_slice(&(padded as u16).to_be_bytes());
                    out.extend_from_slice(name);
                    out.resize(out.len() + padded - name.len(), 0);
                }
                let len = (out.len() - start - 4) as u32;
                out[start..start + 4].copy_from_slice(&len.to_be_bytes());
            }
            _ => return Err(Sense::invalid_field_in_cdb()),
        }
        Ok(())
    }
}
