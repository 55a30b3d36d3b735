//! The answers of finished commands: Data-In PDUs straight from the task buffer (bursts of
//! MaxBurstLength, segments of the initiator's MaxRecvDataSegmentLength, status in the last
//! one when there is no sense), SCSI Responses with sense data, residual counts.

use super::*;

impl Session {
    pub(super) fn residual(t: &Task, o: &Outcome) -> Residual {
        let actual = match t.xfer.map(|x| x.dir) {
            Some(DataDir::Out) => t.xfer.map_or(0, |x| x.len),
            Some(DataDir::In) => o.data_in,
            // No data, or a command that did not get as far as a plan (no-such-LUN, sense).
            _ => o.data_in,
        };
        if actual < t.edtl {
            Residual::Under(t.edtl - actual)
        } else if actual > t.edtl {
            Residual::Over(actual - t.edtl)
        } else {
            Residual::None
        }
    }

    pub(super) fn render(&mut self) -> usize {
        let mut n = 0;
        while let Some(&slot) = self.ready.front() {
            if !self.render_task(slot) {
                break;
            }
            self.ready.pop_front();
            n += 1;
        }
        n
    }

    /// Queues the task's Data-In and status while the queue has room; true when all of it
    /// is queued.
    pub(super) fn render_task(&mut self, slot: u16) -> bool {
        let p = self.p;
        let seg_max = p.max_send_data_segment.max(512);
        let burst = p.max_burst.max(seg_max);
        loop {
            if self.out.free() <= OUT_RESERVE / 2 {
                return false;
            }
            let t = &self.tasks[usize::from(slot)];
            let Some(o) = t.outcome else {
                return true;
            };
            let produced = o.data_in.min(t.scsi.buf.len() as u32);
            let send_len = if t.read { produced.min(t.edtl) } else { 0 };
            let residual = Self::residual(t, &o);
            let seg = seg_max.min(send_len - t.sent).min(burst - t.sent % burst);
            let end = t.sent + seg;
            let collapse = t.sent < send_len && end == send_len && o.sense.is_none();
            if collapse || t.sent >= send_len {
                // The status goes out with this PDU: the command leaves the window.
                self.uncount(slot);
            }
            let exp = self.exp_cmd_sn;
            let max = self.max_cmd_sn();
            let t = &self.tasks[usize::from(slot)];
            if t.sent < send_len {
                let last = end == send_len;
                let stat_sn = if collapse { self.next_stat_sn() } else { 0 };
                let t = &self.tasks[usize::from(slot)];
                let mut b = [0u8; BHS_LEN];
                DataIn {
                    final_: last || end.is_multiple_of(burst),
                    ack: false,
                    status: collapse.then_some(o.status),
                    residual,
                    lun: 0,
                    itt: t.itt,
                    ttt: RESERVED_TAG,
                    stat_sn,
                    exp_cmd_sn: exp,
                    max_cmd_sn: max,
                    data_sn: t.data_sn,
                    buffer_offset: t.sent,
                    data_len: seg,
                }
                .write(&mut b);
                let bytes = &t.scsi.buf[t.sent as usize..end as usize];
                self.out.push(Render {
                    bhs: b,
                    data: OutData::Task {
                        slot,
                        off: t.sent,
                        len: seg,
                    },
                    bytes,
                    inline: &[],
                    release: if collapse { slot } else { NO_TASK },
                    close_after: false,
                });
                let t = &mut self.tasks[usize::from(slot)];
                t.sent = end;
                t.data_sn += 1;
                if collapse {
                    t.st = St::Sending;
                    self.retire_itt(slot);
                    return true;
                }
                continue;
            }
            // The SCSI Response.
            let mut sense = [0u8; SENSE_SEGMENT];
            let data_len = match o.sense {
                Some(s) if o.status == status::CHECK_CONDITION => {
                    let mut f = [0u8; FIXED_SENSE_LEN];
                    s.write_fixed(&mut f);
                    sense[..2].copy_from_slice(&(FIXED_SENSE_LEN as u16).to_be_bytes());
                    sense[2..].copy_from_slice(&f);
                    SENSE_SEGMENT
                }
                _ => 0,
            };
            let exp_data_sn = if t.xfer.map(|x| x.dir) == Some(DataDir::Out) {
                t.r2t_sn
            } else {
                t.data_sn
            };
            let itt = t.itt;
            let stat_sn = self.next_stat_sn();
            let mut b = [0u8; BHS_LEN];
            ScsiResponse {
                response: 0,
                status: o.status,
                residual,
                bidi_residual: Residual::None,
                itt,
                stat_sn,
                exp_cmd_sn: exp,
                max_cmd_sn: max,
                exp_data_sn,
                data_len: data_len as u32,
            }
            .write(&mut b);
            let inline = &sense[..data_len];
            self.out.push(Render {
                bhs: b,
                data: if data_len > 0 {
                    OutData::Inline(data_len as u8)
                } else {
                    OutData::None
                },
                bytes: inline,
                inline,
                release: slot,
                close_after: false,
            });
            self.tasks[usize::from(slot)].st = St::Sending;
            self.retire_itt(slot);
            return true;
        }
    }
}
