//! SCSI Command intake and the Data-Out side of a session: the CmdSN and slot checks, LUN
//! lookup, the unit's plan, immediate and unsolicited data, R2T sequences and Data-Out
//! checks (offsets, DataSN, TTT), until the command can start.

use super::*;

impl Session {
    pub(super) fn on_command(&mut self, bhs: &Bhs, data: &[u8], cx: &mut PollCx<'_>) -> Flow {
        if !bhs.immediate() && self.busy >= TASK_WINDOW {
            // The initiator ignored MaxCmdSN.
            bump(&self.counters.cmdsn_dropped);
            return Flow::Continue;
        }
        if !self.take_cmdsn(bhs) {
            return Flow::Continue;
        }
        if bhs.itt() == RESERVED_TAG || self.active_itts.contains(&bhs.itt()) {
            // The ITT of a command still active (or the reserved one): an initiator must
            // not reuse a tag before the command's status (RFC 7143 §11.1.3). Rejected as
            // "task in progress", the running command undisturbed.
            self.reject(reject::TASK_IN_PROGRESS, bhs);
            return Flow::Continue;
        }
        let Some(slot) = self.free.pop() else {
            self.reject(reject::IMMEDIATE_REJECTED, bhs);
            return Flow::Continue;
        };
        bump(&self.counters.commands);
        if !data.is_empty() && !self.p.immediate_data {
            self.free.push(slot);
            self.reject(reject::PROTOCOL_ERROR, bhs);
            return Flow::Continue;
        }
        self.refresh_luns();
        self.attach_units(cx);
        let unit = self.unit_of(bhs.lun());
        let p = self.p;
        self.active_itts[usize::from(slot)] = bhs.itt();
        let t = &mut self.tasks[usize::from(slot)];
        t.st = St::DataOut;
        t.itt = bhs.itt();
        t.lun_raw = bhs.lun();
        t.immediate = bhs.immediate();
        t.counted = !t.immediate;
        if t.counted {
            self.busy += 1;
        }
        t.read = bhs.read_bit();
        t.write = bhs.write_bit();
        t.edtl = bhs.expected_data_len();
        t.scsi.cdb = *bhs.cdb();
        t.scsi.cdb_len = 16;
        t.scsi.buf.clear();
        t.xfer = None;
        t.take = 0;
        t.outcome = None;
        t.sent = 0;
        t.data_sn = 0;
        t.r2t_sn = 0;
        t.r2ts = [R2tRec::default(); R2T_MAX];
        t.aborted = false;
        t.aborted_by_other = false;
        t.epoch = unit.as_ref().map_or(0, |u| u.abort_epoch());
        t.unit = unit;
        let cdb = t.scsi.cdb;
        if cdb[0] == REPORT_LUNS {
            let o = scsi::report_luns(&cdb, &self.lun_numbers, &mut t.scsi.buf);
            self.finish(slot, o);
            return Flow::Continue;
        }
        let Some(unit) = t.unit.clone() else {
            let o = scsi::no_such_lun(&cdb, &mut t.scsi.buf);
            self.finish(slot, o);
            return Flow::Continue;
        };
        let planned = unit.plan(&cdb).and_then(|x| {
            // A command whose data has a fixed structure runs only with exactly that data.
            let edtl = if t.write || x.dir != DataDir::Out {
                t.edtl
            } else {
                0
            };
            if !x.fit.accepts(x.len, edtl) {
                Err(scsi::Sense::invalid_field_in_cdb())
            } else {
                Ok(x)
            }
        });
        let xfer = match planned {
            Ok(x) => x,
            Err(sense) => {
                let o = Outcome {
                    status: status::CHECK_CONDITION,
                    sense: Some(sense),
                    data_in: 0,
                };
                self.finish(slot, o);
                return Flow::Continue;
            }
        };
        t.xfer = Some(xfer);
        if xfer.dir != DataDir::Out {
            self.start(slot, cx);
            return Flow::Continue;
        }
        // A write: collect min(EDTL, CDB length) bytes.
        let take = if t.write { t.edtl.min(xfer.len) } else { 0 };
        t.take = take;
        t.scsi.buf.resize(take as usize, 0);
        let imm = data.len() as u32;
        if imm > p.first_burst || imm > t.edtl {
            // More immediate data than FirstBurstLength or the transfer.
            return self.protocol_reject(slot, bhs);
        }
        let n = imm.min(take) as usize;
        t.scsi.buf[..n].copy_from_slice(&data[..n]);
        // Unsolicited Data-Out follows unless InitialR2T=Yes or the command's F bit says
        // none does (§11.3.4); it ends at FirstBurstLength or the transfer's end.
        t.unsol_len = if p.initial_r2t || bhs.final_bit() {
            imm
        } else {
            p.first_burst.min(t.edtl)
        };
        t.unsol_done = t.unsol_len == imm;
        t.unsol_next = imm;
        t.unsol_data_sn = 0;
        t.r2t_next = t.unsol_len.min(take);
        self.issue_r2ts(slot);
        self.maybe_start_write(slot, cx);
        Flow::Continue
    }

    /// A Data-Out out of sequence (DataSN, offset, length) for a command collecting its
    /// data: at ErrorRecoveryLevel 0 the target cannot ask for the data again (recovery
    /// R2Ts are ERL 1), so — a sequence error being an implied digest error (RFC 7143
    /// §7.9, §7.8) — the PDU is rejected and the command ends at once with CHECK
    /// CONDITION, ABORTED COMMAND, PROTOCOL SERVICE CRC ERROR (§11.4.7.2), instead of
    /// waiting for data that will never come. Its later Data-Out PDUs find no command and
    /// are rejected too; the session goes on.
    pub(super) fn data_out_sequence_error(&mut self, slot: u16, bhs: &Bhs) {
        self.reject(reject::PROTOCOL_ERROR, bhs);
        self.terminate_data_out(slot);
    }

    /// Ends a command still collecting Data-Out with PROTOCOL SERVICE CRC ERROR (see
    /// [`Session::data_out_sequence_error`]).
    pub(super) fn terminate_data_out(&mut self, slot: u16) {
        let t = &mut self.tasks[usize::from(slot)];
        if t.st != St::DataOut {
            return;
        }
        t.r2ts = [R2tRec::default(); R2T_MAX];
        t.unsol_done = true;
        if let Some(u) = t.unit.clone() {
            u.abandon(&mut t.scsi);
        }
        self.finish(
            slot,
            Outcome {
                status: status::CHECK_CONDITION,
                sense: Some(scsi::Sense::protocol_crc_error()),
                data_in: 0,
            },
        );
    }

    /// The command a Data-Out names (unsolicited: by ITT; solicited: by its TTT), if it is
    /// collecting data.
    pub(super) fn data_out_task(&self, bhs: &Bhs) -> Option<u16> {
        let ttt = bhs.ttt();
        let slot = if ttt == RESERVED_TAG {
            self.tasks
                .iter()
                .position(|t| t.st == St::DataOut && !t.unsol_done && t.itt == bhs.itt())?
        } else {
            let slot = (ttt & 0xffff) as usize;
            let t = self.tasks.get(slot)?;
            if !(t.st == St::DataOut
                && t.itt == bhs.itt()
                && t.r2ts.iter().any(|r| r.active && r.ttt == ttt))
            {
                return None;
            }
            slot
        };
        Some(slot as u16)
    }

    pub(super) fn protocol_reject(&mut self, slot: u16, bhs: &Bhs) -> Flow {
        self.release(slot);
        self.reject(reject::PROTOCOL_ERROR, bhs);
        Flow::Continue
    }

    pub(super) fn issue_r2ts(&mut self, slot: u16) {
        let p = self.p;
        let limit = (p.max_outstanding_r2t as usize).clamp(1, R2T_MAX);
        loop {
            let exp = self.exp_cmd_sn;
            let max = self.max_cmd_sn();
            let stat = self.stat_sn;
            let t = &mut self.tasks[usize::from(slot)];
            if t.r2t_next >= t.take {
                return;
            }
            if t.r2ts.iter().filter(|r| r.active).count() >= limit {
                return;
            }
            let Some(i) = t.r2ts.iter().position(|r| !r.active) else {
                return;
            };
            let len = p.max_burst.max(1).min(t.take - t.r2t_next);
            t.ttt_gen = t.ttt_gen.wrapping_add(1) & 0x7fff;
            let ttt = (u32::from(t.ttt_gen) << 16) | u32::from(slot);
            t.r2ts[i] = R2tRec {
                active: true,
                ttt,
                off: t.r2t_next,
                len,
                got: 0,
                data_sn: 0,
            };
            let mut b = [0u8; BHS_LEN];
            R2t {
                lun: t.lun_raw,
                itt: t.itt,
                ttt,
                stat_sn: stat,
                exp_cmd_sn: exp,
                max_cmd_sn: max,
                r2t_sn: t.r2t_sn,
                buffer_offset: t.r2t_next,
                desired_len: len,
            }
            .write(&mut b);
            t.r2t_sn += 1;
            t.r2t_next += len;
            self.push(b, &[], false);
        }
    }

    pub(super) fn maybe_start_write(&mut self, slot: u16, cx: &mut PollCx<'_>) {
        let t = &self.tasks[usize::from(slot)];
        if t.st == St::DataOut
            && t.unsol_done
            && t.r2t_next >= t.take
            && !t.r2ts.iter().any(|r| r.active)
        {
            // Every byte of [0, take) arrived (unsolicited, then solicited from there).
            self.start(slot, cx);
        }
    }

    pub(super) fn on_data_out(&mut self, bhs: &Bhs, data: &[u8], cx: &mut PollCx<'_>) -> Flow {
        let ttt = bhs.ttt();
        let len = data.len() as u32;
        let off = bhs.buffer_offset();
        let slot = if ttt == RESERVED_TAG {
            // Unsolicited: by ITT among tasks still taking unsolicited data.
            let found = self
                .tasks
                .iter()
                .position(|t| t.st == St::DataOut && !t.unsol_done && t.itt == bhs.itt());
            let Some(i) = found else {
                self.reject(reject::INVALID_PDU_FIELD, bhs);
                return Flow::Continue;
            };
            let slot = i as u16;
            let t = &mut self.tasks[i];
            if off != t.unsol_next
                || bhs.datasn() != t.unsol_data_sn
                || off.checked_add(len).is_none_or(|e| e > t.unsol_len)
            {
                self.data_out_sequence_error(slot, bhs);
                return Flow::Continue;
            }
            place(&mut t.scsi.buf, off, data);
            t.unsol_next += len;
            t.unsol_data_sn += 1;
            if bhs.final_bit() || t.unsol_next == t.unsol_len {
                t.unsol_done = true;
                // A short unsolicited burst (F before FirstBurstLength): solicit from there.
                if t.unsol_next < t.unsol_len {
                    t.unsol_len = t.unsol_next;
                    t.r2t_next = t.r2t_next.min(t.unsol_len.min(t.take));
                    self.issue_r2ts(slot);
                }
            }
            slot
        } else {
            let slot = (ttt & 0xffff) as usize;
            let Some(t) = self
                .tasks
                .get_mut(slot)
                .filter(|t| t.st == St::DataOut && t.itt == bhs.itt())
            else {
                self.reject(reject::INVALID_PDU_FIELD, bhs);
                return Flow::Continue;
            };
            let Some(r) = t.r2ts.iter_mut().find(|r| r.active && r.ttt == ttt) else {
                self.reject(reject::INVALID_PDU_FIELD, bhs);
                return Flow::Continue;
            };
            if off != r.off + r.got
                || bhs.datasn() != r.data_sn
                || r.got.checked_add(len).is_none_or(|g| g > r.len)
            {
                self.data_out_sequence_error(slot as u16, bhs);
                return Flow::Continue;
            }
            r.got += len;
            r.data_sn += 1;
            if r.got == r.len {
                r.active = false;
            }
            place(&mut t.scsi.buf, off, data);
            self.issue_r2ts(slot as u16);
            slot as u16
        };
        self.maybe_start_write(slot, cx);
        Flow::Continue
    }
}

/// Copies Data-Out bytes at `off` into the command's buffer (bytes beyond it are dropped:
/// the command uses fewer than the initiator sends).
fn place(buf: &mut [u8], off: u32, data: &[u8]) {
    let off = off as usize;
    if off >= buf.len() {
        return;
    }
    let n = data.len().min(buf.len() - off);
    buf[off..off + n].copy_from_slice(&data[..n]);
}
