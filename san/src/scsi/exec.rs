//! Running one command: the checks every command goes through in order (unit attention,
//! CDB, SPC-2 and persistent reservation conflicts, range lock), then the command itself —
//! emulated at once, or as block I/O steps (`io`).

use super::cdb::{op, Cmd, Geometry, Rw, MAX_UNMAP_BLOCKS, MAX_UNMAP_DESCRIPTORS};
use super::emulate;
use super::io::{check, good, Job, Seg, SegKind, WRITE_SAME_CHUNK};
use super::locks::Acquire;
use super::pr::{Access, PrError};
use super::sense::{key, Sense};
use super::{mode, status, LogicalUnit, Nexus, Outcome, ScsiCx, ScsiTask, Step};

fn conflict() -> Step {
    Step::Done(Outcome {
        status: status::RESERVATION_CONFLICT,
        sense: None,
        data_in: 0,
    })
}

/// ILLEGAL REQUEST, INVALID FIELD IN INFORMATION UNIT (0Eh/03h): the Data-Out the transport
/// delivered does not match what the CDB needs.
fn short_data() -> Step {
    Step::Done(check(Sense::new(key::ILLEGAL_REQUEST, 0x0E, 0x03)))
}

fn done(o: Outcome) -> Step {
    Step::Done(o)
}

/// How `cmd` touches the medium, for reservation checks.
fn access(cmd: &Cmd) -> Access {
    match cmd {
        Cmd::Rw { dir: Rw::Read, .. }
        | Cmd::Verify { .. }
        | Cmd::GetLbaStatus { .. }
        | Cmd::ModeSense(_)
        | Cmd::ReadDefects { .. }
        | Cmd::PreFetch => Access::Read,
        Cmd::Rw { dir: Rw::Write, .. }
        | Cmd::WriteVerify { .. }
        | Cmd::SyncCache
        | Cmd::Unmap { .. }
        | Cmd::WriteSame { .. }
        | Cmd::CompareAndWrite { .. }
        | Cmd::OrWrite { .. }
        | Cmd::ModeSelect { .. }
        | Cmd::StartStop => Access::Write,
        _ => Access::Always,
    }
}

/// Commands a nexus may send while another holds an SPC-2 reservation.
fn spc2_allowed(cmd: &Cmd) -> bool {
    matches!(
        cmd,
        Cmd::Inquiry { .. }
            | Cmd::ReportLuns { .. }
            | Cmd::RequestSense { .. }
            | Cmd::Release6
            | Cmd::ReportOpcodes { .. }
    )
}

fn same_nexus(a: &(std::sync::Arc<str>, std::sync::Arc<str>), n: &Nexus) -> bool {
    a.0 == n.initiator_port && a.1 == n.target_port
}

/// A validated UNMAP parameter list: descriptor count and the LBA span they cover.
struct UnmapList {
    count: usize,
    span: Option<(u64, u64)>,
}

fn unmap_list(g: &Geometry, param_len: u32, data: &[u8]) -> Result<UnmapList, Sense> {
    let empty = UnmapList {
        count: 0,
        span: None,
    };
    if param_len == 0 {
        return Ok(empty);
    }
    let data = &data[..data.len().min(param_len as usize)];
    if data.len() < 8 {
        return Err(Sense::param_list_length_error());
    }
    let bd_len = usize::from(u16::from_be_bytes([data[2], data[3]]));
    let count = bd_len.min(data.len() - 8) / 16;
    if count > MAX_UNMAP_DESCRIPTORS as usize {
        return Err(Sense::invalid_field_in_param_list());
    }
    let mut span: Option<(u64, u64)> = None;
    let mut total: u64 = 0;
    for d in data[8..8 + 16 * count].chunks_exact(16) {
        let mut lba = [0u8; 8];
        lba.copy_from_slice(&d[..8]);
        let lba = u64::from_be_bytes(lba);
        let n = u64::from(u32::from_be_bytes([d[8], d[9], d[10], d[11]]));
        if n > MAX_UNMAP_BLOCKS {
            return Err(Sense::invalid_field_in_param_list());
        }
        match lba.checked_add(n) {
            Some(end) if end <= g.blocks => {
                if n > 0 {
                    span = Some(span.map_or((lba, end), |(s, e)| (s.min(lba), e.max(end))));
                }
            }
            _ => return Err(Sense::lba_out_of_range()),
        }
        total += n;
    }
    if total > MAX_UNMAP_BLOCKS {
        return Err(Sense::invalid_field_in_param_list());
    }
    Ok(UnmapList { count, span })
}

impl LogicalUnit {
    /// The LBA range `cmd` locks (start, end, exclusive), if any.
    fn lock_range(&self, cmd: &Cmd, g: &Geometry, buf: &[u8]) -> Option<(u64, u64, bool)> {
        let r = |lba: u64, n: u64| (n > 0).then_some((lba, lba + n, false));
        match *cmd {
            Cmd::Rw { lba, blocks, .. }
            | Cmd::Verify { lba, blocks, .. }
            | Cmd::WriteVerify { lba, blocks } => r(lba, u64::from(blocks)),
            Cmd::WriteSame { lba, blocks, .. } => r(lba, blocks),
            Cmd::CompareAndWrite { lba, blocks, .. } | Cmd::OrWrite { lba, blocks, .. }
                if blocks > 0 =>
            {
                Some((lba, lba + u64::from(blocks), true))
            }
            Cmd::Unmap { param_len } => unmap_list(g, param_len, buf)
                .ok()
                .and_then(|l| l.span)
                .map(|(s, e)| (s, e, false)),
            _ => None,
        }
    }

    /// Everything `start` does (the caller releases the range lock of a finished command).
    pub(crate) fn start_inner(&self, task: &mut ScsiTask, cx: &mut ScsiCx<'_>) -> Step {
        let cdb_bytes = task.cdb;
        let cdb = &cdb_bytes[..usize::from(task.cdb_len).min(cdb_bytes.len())];
        let Some(&opcode) = cdb.first() else {
            return done(check(Sense::invalid_opcode()));
        };
        let g = self.geometry();
        let decoded = super::cdb::decode(&g, cdb);
        let range = decoded
            .as_ref()
            .ok()
            .and_then(|c| self.lock_range(c, &g, &task.buf));
        let nexus = cx.nexus;
        let cmd = {
            let mut st = self.lock_state();
            let capacity = g.blocks * u64::from(g.block_size);
            if st.capacity != capacity {
                st.capacity = capacity;
                st.uas.raise_all(super::sense::ua::CAPACITY_CHANGED, None);
            }
            if !matches!(opcode, op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE) {
                if let Some(s) = st.uas.take(&nexus.initiator_port) {
                    return done(check(s));
                }
            }
            let cmd = match decoded {
                Ok(c) => c,
                Err(s) => return done(check(s)),
            };
            if let Some(holder) = &st.spc2 {
                if !same_nexus(holder, nexus) && !spc2_allowed(&cmd) {
                    return conflict();
                }
            }
            if st.pr.conflicts(nexus, access(&cmd)) {
                return conflict();
            }
            match cmd {
                Cmd::RequestSense { desc, alloc } => {
                    let s = st
                        .uas
                        .take(&nexus.initiator_port)
                        .unwrap_or(Sense::no_sense());
                    return done(emulate::request_sense(s, desc, alloc, &mut task.buf));
                }
                Cmd::PrIn { sa, alloc } => {
                    return done(match st.pr.read(sa, &mut task.buf) {
                        Ok(()) => emulate::reply(&mut task.buf, alloc),
                        Err(s) => check(s),
                    });
                }
                Cmd::PrOut(c) => {
                    let st = &mut *st;
                    let mut aborted = Vec::new();
                    let res = st.pr.out(nexus, &c, &task.buf, &mut st.uas, &mut aborted);
                    for (i_port, t_port) in aborted {
                        self.record_abort(
                            st,
                            super::aborts::Whom::One {
                                i_port: i_port.into(),
                                t_port: t_port.into(),
                            },
                        );
                    }
                    return match res {
                        Err(PrError::Conflict) => conflict(),
                        Err(PrError::Check(s)) => done(check(s)),
                        Ok(false) => done(good(0)),
                        Ok(true) => match &self.persister {
                            None => done(good(0)),
                            Some(p) => {
                                // Submitted under the lock: snapshots reach the file in order.
                                if p.submit(&st.pr, cx.offload, cx.user_data) {
                                    task.state.job = Job::Persist;
                                    task.state.pending = 1;
                                    task.state.err = 0;
                                    task.state.got = 0;
                                    Step::InFlight
                                } else {
                                    done(check(Sense::internal_failure()))
                                }
                            }
                        },
                    };
                }
                Cmd::Reserve6 => {
                    if st.spc2.as_ref().is_some_and(|h| !same_nexus(h, nexus))
                        || st.pr.blocks_reserve6(nexus)
                    {
                        return conflict();
                    }
                    st.spc2 = Some((nexus.initiator_port.clone(), nexus.target_port.clone()));
                    return done(good(0));
                }
                Cmd::Release6 => {
                    if st.spc2.as_ref().is_some_and(|h| same_nexus(h, nexus)) {
                        st.spc2 = None;
                    }
                    return done(good(0));
                }
                _ => {}
            }
            if let Some(stale) = task
                .state
                .lock
                .take_if(|_| !matches!(cmd, Cmd::CompareAndWrite { .. } | Cmd::OrWrite { .. }))
            {
                // A waiting COMPARE AND WRITE the transport replaced without `abandon`.
                st.locks.release(stale);
            }
            if let Some((start, end, exclusive)) = range {
                let got = if exclusive {
                    st.locks.try_exclusive(start, end, task.state.lock)
                } else {
                    st.locks.try_shared(start, end)
                };
                match got {
                    Acquire::Held(id) => task.state.lock = Some(id),
                    Acquire::Wait(waiting) => {
                        if exclusive {
                            task.state.lock = waiting;
                        }
                        return Step::Blocked;
                    }
                }
            }
            cmd
        };
        self.run(cmd, &g, task, cx)
    }

    /// Runs an admitted command.
    fn run(&self, cmd: Cmd, g: &Geometry, task: &mut ScsiTask, cx: &mut ScsiCx<'_>) -> Step {
        let bs = g.block_size as usize;
        let buf = &mut task.buf;
        let st = &mut task.state;
        st.pending = 0;
        match cmd {
            Cmd::TestUnitReady | Cmd::PreFetch | Cmd::StartStop => done(good(0)),
            Cmd::Inquiry { evpd, page, alloc } => done(emulate::inquiry(
                &self.ident,
                g,
                cx.nexus,
                evpd,
                page,
                alloc,
                buf,
            )),
            Cmd::ReadCapacity10 => done(emulate::read_capacity10(g, buf)),
            Cmd::ReadCapacity16 { alloc } => {
                done(emulate::read_capacity16(&self.ident, g, alloc, buf))
            }
            Cmd::GetLbaStatus { lba, alloc } => done(emulate::get_lba_status(g, lba, alloc, buf)),
            Cmd::ReportOpcodes {
                rctd,
                options,
                opcode,
                sa,
                alloc,
            } => done(emulate::report_opcodes(
                &self.ident,
                rctd,
                options,
                opcode,
                sa,
                alloc,
                buf,
            )),
            Cmd::ModeSense(c) => done(mode::sense(g, &c, buf)),
            Cmd::ReadDefects {
                twelve,
                plist,
                glist,
                format,
                alloc,
            } => done(emulate::read_defects(
                twelve, plist, glist, format, alloc, buf,
            )),
            Cmd::ModeSelect {
                ten,
                pf,
                sp,
                param_len,
            } => done(mode::select(g, ten, pf, sp, param_len, buf)),
            Cmd::ReportLuns { .. } => {
                // The transport answers REPORT LUNS (it knows the target's LUNs).
                done(check(Sense::invalid_opcode()))
            }
            Cmd::Rw {
                dir: Rw::Read,
                lba,
                blocks,
                ..
            } => {
                let n = blocks as usize * bs;
                if n == 0 {
                    return done(good(0));
                }
                buf.resize(n, 0);
                st.seg = seg(SegKind::Read, lba, bs, n, 0);
                st.job = Job::Read { len: n as u32 };
                self.drive(task, cx, None)
            }
            Cmd::Rw {
                dir: Rw::Write,
                lba,
                blocks,
                fua,
            } => self.write(task, cx, lba, blocks, bs, fua),
            Cmd::WriteVerify { lba, blocks } => self.write(task, cx, lba, blocks, bs, true),
            Cmd::Verify {
                lba,
                blocks,
                bytchk,
            } => {
                let n = blocks as usize * bs;
                if bytchk == 0 || n == 0 {
                    return done(good(0));
                }
                let at = if bytchk == 1 { n } else { bs };
                if buf.len() < at {
                    return short_data();
                }
                buf.truncate(at);
                buf.resize(at + n, 0);
                st.seg = seg(SegKind::Read, lba, bs, n, at);
                st.job = Job::Verify { at, n, bytchk };
                self.drive(task, cx, None)
            }
            Cmd::SyncCache => {
                st.seg = Seg {
                    kind: SegKind::Flush,
                    ..Seg::default()
                };
                st.job = Job::Flush;
                self.drive(task, cx, None)
            }
            Cmd::CompareAndWrite { lba, blocks, fua } => {
                let n = blocks as usize * bs;
                if n == 0 {
                    return done(good(0));
                }
                if buf.len() != 2 * n {
                    return short_data();
                }
                buf.resize(3 * n, 0);
                st.seg = seg(SegKind::Read, lba, bs, n, 2 * n);
                st.job = Job::Caw { n, stage: 0, fua };
                self.drive(task, cx, None)
            }
            Cmd::OrWrite { lba, blocks, fua } => {
                let n = blocks as usize * bs;
                if n == 0 {
                    return done(good(0));
                }
                if buf.len() != n {
                    return short_data();
                }
                // [Data-Out | the blocks as read]: read, OR into the Data-Out, write that.
                buf.resize(2 * n, 0);
                st.seg = seg(SegKind::Read, lba, bs, n, n);
                st.job = Job::OrWrite { n, stage: 0, fua };
                self.drive(task, cx, None)
            }
            Cmd::Unmap { param_len } => {
                if !self.ident.thin {
                    return done(check(Sense::invalid_opcode()));
                }
                let list = match unmap_list(g, param_len, buf) {
                    Ok(l) => l,
                    Err(s) => return done(check(s)),
                };
                match self.next_unmap(buf, 0, list.count) {
                    None => done(good(0)),
                    Some((i, off, len)) => {
                        st.job = Job::Unmap {
                            next: i + 1,
                            count: list.count,
                        };
                        st.seg = Seg::new(SegKind::Discard, off, len, 0);
                        self.drive(task, cx, None)
                    }
                }
            }
            Cmd::WriteSame {
                lba,
                blocks,
                unmap,
                ndob,
            } => {
                // UNMAP without a block (the transport allows that: `Fit::ExactOrNone`):
                // deallocate as with NDOB.
                let ndob = ndob || (unmap && buf.is_empty());
                if !ndob && buf.len() < bs {
                    return short_data();
                }
                let zero = ndob || buf[..bs].iter().all(|&b| b == 0);
                let off = lba * bs as u64;
                let total = blocks * bs as u64;
                if zero && self.ident.thin {
                    st.seg = Seg::new(SegKind::Zero { unmap }, off, total, 0);
                    st.job = Job::Idle;
                    return self.drive(task, cx, None);
                }
                // The block repeated into a chunk, written chunk by chunk.
                let chunk = total.min(WRITE_SAME_CHUNK as u64) as usize;
                if ndob {
                    buf.clear();
                    buf.resize(bs, 0);
                }
                buf.truncate(bs);
                while buf.len() < chunk {
                    let more = buf.len().min(chunk - buf.len());
                    buf.extend_from_within(..more);
                }
                st.seg = Seg::new(SegKind::Write, off, chunk as u64, 0);
                st.job = Job::WriteSame {
                    next: off + chunk as u64,
                    end: off + total,
                };
                self.drive(task, cx, None)
            }
            // Answered under the state lock in `start_inner`.
            Cmd::RequestSense { .. }
            | Cmd::PrIn { .. }
            | Cmd::PrOut(_)
            | Cmd::Reserve6
            | Cmd::Release6 => done(check(Sense::internal_failure())),
        }
    }

    /// WRITE / WRITE AND VERIFY: the blocks the Data-Out holds (a transport that got less
    /// than the CDB asked writes what arrived, whole blocks only), then a flush for FUA.
    fn write(
        &self,
        task: &mut ScsiTask,
        cx: &mut ScsiCx<'_>,
        lba: u64,
        blocks: u32,
        bs: usize,
        flush: bool,
    ) -> Step {
        let want = blocks as usize * bs;
        let have = task.buf.len();
        let n = if have < want {
            if !have.is_multiple_of(bs) {
                return short_data();
            }
            have
        } else {
            want
        };
        if n == 0 {
            return done(good(0));
        }
        task.state.seg = seg(SegKind::Write, lba, bs, n, 0);
        task.state.job = Job::Write { flush };
        self.drive(task, cx, None)
    }
}

/// A read or write step of `n` bytes at block `lba`, data at `buf_at`.
fn seg(kind: SegKind, lba: u64, bs: usize, n: usize, buf_at: usize) -> Seg {
    Seg::new(kind, lba * bs as u64, n as u64, buf_at)
}
