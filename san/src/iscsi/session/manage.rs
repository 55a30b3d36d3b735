//! Everything a session does besides commands: NOP-Out answers and keepalive pings, task
//! management (aborts wait for in-flight operations), logout, text requests.

use super::*;

impl Session {
    pub(super) fn on_nop_out(&mut self, bhs: &Bhs, data: &[u8]) {
        if !self.take_cmdsn(bhs) {
            return;
        }
        if bhs.itt() == RESERVED_TAG {
            // An answer to our ping (or a ping that wants no answer).
            if self.ping.is_some_and(|(ttt, _)| ttt == bhs.ttt()) {
                self.ping = None;
            }
            return;
        }
        let mut b = [0u8; BHS_LEN];
        let data = &data[..data.len().min(self.p.max_send_data_segment as usize)];
        NopIn::echo(
            bhs,
            data.len() as u32,
            self.next_stat_sn(),
            self.exp_cmd_sn,
            self.max_cmd_sn(),
        )
        .write(&mut b);
        self.push(b, data, false);
    }

    /// Periodic (the connection's tick): pings an idle initiator and drops one that does not
    /// answer; ends the session when its target left the registry.
    pub fn tick(&mut self, now: Instant) -> Flow {
        // A target deleted (or replaced) in the registry ends its sessions.
        let name = self.setup.target.name();
        let current = self.setup.registry.target(name);
        if !current.is_some_and(|t| Arc::ptr_eq(&t, &self.setup.target)) {
            bump(&self.counters.target_removed);
            return Flow::Close;
        }
        if std::mem::take(&mut self.rx_seen) {
            self.last_rx = now;
        }
        if let Some((_, sent)) = self.ping {
            if now.saturating_duration_since(sent) > KEEPALIVE_TIMEOUT {
                bump(&self.counters.keepalive_timeouts);
                return Flow::Close;
            }
            return Flow::Continue;
        }
        if now.saturating_duration_since(self.last_rx) >= KEEPALIVE_IDLE && self.can_take() {
            self.ping_seq = self.ping_seq.wrapping_add(1) & 0x7fff_ffff;
            let ttt = 0x8000_0000 | self.ping_seq;
            let mut b = [0u8; BHS_LEN];
            NopIn {
                lun: 0,
                itt: RESERVED_TAG,
                ttt,
                stat_sn: self.stat_sn,
                exp_cmd_sn: self.exp_cmd_sn,
                max_cmd_sn: self.max_cmd_sn(),
                data_len: 0,
            }
            .write(&mut b);
            self.push(b, &[], false);
            self.ping = Some((ttt, now));
        }
        Flow::Continue
    }

    pub(super) fn abort_task(&mut self, slot: u16) {
        let st = self.tasks[usize::from(slot)].st;
        match st {
            St::Free | St::Sending => {}
            St::Running => {
                bump(&self.counters.tasks_aborted);
                self.tasks[usize::from(slot)].aborted = true;
            }
            St::Blocked | St::DataOut | St::Ready => {
                bump(&self.counters.tasks_aborted);
                if st == St::Blocked {
                    self.blocked.retain(|&s| s != slot);
                    let t = &mut self.tasks[usize::from(slot)];
                    if let Some(u) = t.unit.clone() {
                        u.abandon(&mut t.scsi);
                    }
                }
                if st == St::Ready {
                    self.ready.retain(|&s| s != slot);
                }
                self.release(slot);
            }
        }
    }

    /// Per iteration: aborts the commands another nexus aborted on their unit (see
    /// `LogicalUnit::abort_epoch`); one atomic load per unit when nothing happened. Returns
    /// the commands aborted.
    pub(super) fn check_aborts(&mut self) -> usize {
        let mut n = 0;
        for i in 0..self.luns.len().min(self.abort_seen.len()) {
            let epoch = self.luns[i].1.abort_epoch();
            if epoch == self.abort_seen[i] {
                continue;
            }
            let seen = std::mem::replace(&mut self.abort_seen[i], epoch);
            let unit = self.luns[i].1.clone();
            if !unit.aborted_since(&self.nexus, seen) {
                continue;
            }
            if unit.hard_reset_since(&self.nexus, seen) {
                // A TARGET COLD RESET: the connection ends (its tasks are abandoned).
                self.dropped = true;
            }
            for slot in 0..TASKS_MAX {
                let t = &self.tasks[slot];
                if matches!(t.st, St::Free | St::Sending)
                    || t.aborted
                    || t.aborted_by_other
                    || !t.unit.as_ref().is_some_and(|u| Arc::ptr_eq(u, &unit))
                    || !unit.aborted_since(&self.nexus, t.epoch)
                {
                    continue;
                }
                self.abort_by_other(slot as u16);
                n += 1;
            }
        }
        n
    }

    /// Another nexus aborted this command: it ends with TASK ABORTED — at once if it waits
    /// for a range lock or its answer is not rendered yet, once its data is in if it collects
    /// Data-Out (the initiator sends it anyway), once its operations complete if it runs.
    fn abort_by_other(&mut self, slot: u16) {
        bump(&self.counters.tasks_aborted);
        let t = &mut self.tasks[usize::from(slot)];
        t.aborted_by_other = true;
        match t.st {
            St::Blocked => {
                self.blocked.retain(|&s| s != slot);
                let t = &mut self.tasks[usize::from(slot)];
                if let Some(u) = t.unit.clone() {
                    u.abandon(&mut t.scsi);
                }
                self.finish(slot, TASK_ABORTED);
            }
            St::Ready if t.sent == 0 => t.outcome = Some(TASK_ABORTED),
            _ => {}
        }
    }

    pub(super) fn on_tmf(&mut self, bhs: &Bhs) {
        bump(&self.counters.task_management);
        if !self.take_cmdsn(bhs) {
            return;
        }
        let lun = bhs.lun();
        let mut cold = false;
        let response = match bhs.tmf_function() {
            // ABORT TASK
            1 => {
                let rtt = bhs.tmf_rtt();
                // A task whose status is already queued has completed: "task does not
                // exist", as for one not found (initiators treat both as the task gone).
                match self
                    .tasks
                    .iter()
                    .position(|t| !matches!(t.st, St::Free | St::Sending) && t.itt == rtt)
                {
                    Some(i) => {
                        self.abort_task(i as u16);
                        0
                    }
                    None => 1,
                }
            }
            // ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET
            f @ (2 | 3 | 5) => {
                if f == 5 && self.unit_of(lun).is_none() {
                    2
                } else {
                    for i in 0..TASKS_MAX {
                        if self.tasks[i].st != St::Free && self.tasks[i].lun_raw == lun {
                            self.abort_task(i as u16);
                        }
                    }
                    if f == 5 {
                        if let Some(u) = self.unit_of(lun) {
                            u.reset(&self.nexus, false);
                        }
                    }
                    0
                }
            }
            // TARGET WARM RESET
            6 => {
                self.reset_target(false);
                0
            }
            // TARGET COLD RESET: a warm reset, then every connection of the target ends —
            // this one once the answer is out, the others when they see the reset.
            7 => {
                self.reset_target(true);
                cold = true;
                0
            }
            // TASK REASSIGN: needs ERL 2.
            8 => 4,
            _ => 5,
        };
        if self.tmf.len() == TMF_PENDING_MAX {
            // An initiator piling up task management while aborts wait.
            self.reject(reject::OUT_OF_RESOURCES, bhs);
            return;
        }
        self.tmf.push_back(PendingTmf {
            itt: bhs.itt(),
            response,
            close: cold,
        });
        self.check_tmf();
    }

    /// TARGET WARM or COLD RESET: every task of the session aborted, then every unit reset.
    fn reset_target(&mut self, cold: bool) {
        for i in 0..TASKS_MAX {
            self.abort_task(i as u16);
        }
        self.refresh_luns();
        for (_, u) in self.luns.iter() {
            if cold {
                u.cold_reset(&self.nexus);
            } else {
                u.reset(&self.nexus, true);
            }
        }
    }

    /// Answers the pending task management requests, in order, once no aborted task is in
    /// flight.
    pub(super) fn check_tmf(&mut self) {
        if self.tmf.is_empty() || self.tasks.iter().any(|t| t.st == St::Running && t.aborted) {
            return;
        }
        while let Some(tmf) = self.tmf.pop_front() {
            self.answer_tmf(tmf);
        }
    }

    fn answer_tmf(&mut self, tmf: PendingTmf) {
        let mut b = [0u8; BHS_LEN];
        TmResponse {
            response: tmf.response,
            itt: tmf.itt,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
        }
        .write(&mut b);
        self.push(b, &[], tmf.close);
        if tmf.close {
            // TARGET COLD RESET: the connection ends once the answer is out.
            self.closing = true;
        }
    }

    /// Asks the initiator to log out within `secs` seconds (Async Message, AsyncEvent 1:
    /// the server is shutting down). Nothing if the session is already closing.
    pub fn request_logout(&mut self, secs: u16) {
        if self.closing {
            return;
        }
        let mut b = [0u8; BHS_LEN];
        AsyncMessage {
            lun: 0,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
            event: ASYNC_LOGOUT_REQUEST,
            vcode: 0,
            param1: 0,
            param2: 0,
            param3: secs,
            data_len: 0,
        }
        .write(&mut b);
        self.push(b, &[], false);
    }

    pub(super) fn on_logout(&mut self, bhs: &Bhs) {
        if !self.take_cmdsn(bhs) {
            return;
        }
        let answer = LogoutResponse::to_request(
            bhs,
            self.setup.cid,
            self.next_stat_sn(),
            self.exp_cmd_sn,
            self.max_cmd_sn(),
        );
        let mut b = [0u8; BHS_LEN];
        answer.write(&mut b);
        let close = answer.response == 0;
        self.push(b, &[], close);
        if close {
            self.closing = true;
        }
    }

    pub(super) fn on_text(&mut self, bhs: &Bhs, data: &[u8]) {
        if !self.take_cmdsn(bhs) {
            return;
        }
        let mut text = Vec::new();
        let asks = data
            .split(|&b| b == 0)
            .any(|kv| kv.starts_with(b"SendTargets="));
        if asks {
            // In a normal session SendTargets reports the session's own target.
            text.extend_from_slice(b"TargetName=");
            text.extend_from_slice(self.setup.target.name().as_bytes());
            text.push(0);
            for p in &self.setup.portals {
                text.extend_from_slice(b"TargetAddress=");
                text.extend_from_slice(p.target_address().as_bytes());
                text.push(0);
            }
        }
        text.truncate(self.p.max_send_data_segment as usize);
        let mut b = [0u8; BHS_LEN];
        TextResponse {
            final_: true,
            cont: false,
            lun: bhs.lun(),
            itt: bhs.itt(),
            ttt: RESERVED_TAG,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
            data_len: text.len() as u32,
        }
        .write(&mut b);
        self.push(b, &text, false);
    }
}
