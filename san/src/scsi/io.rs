//! Block I/O of one command on the unit's backend: the steps a command takes (read, write,
//! flush, deallocate, compare) as a small state machine kept in the task, driven by `start`
//! (first step) and by each engine completion (next step).
//!
//! Every step is one backend request whose iovec points into `task.buf`; the request lives in
//! the task (boxed once per task slot, reused), so its iovec stays valid until the completion.

use dataplane::backend::Started;
use dataplane::blk::request::{ParsedRequest, RequestKind};
use dataplane::blk::SECTOR_SHIFT;

use super::sense::Sense;
use super::{status, Outcome, ScsiCx, ScsiTask, Step};
use crate::scsi::LogicalUnit;

/// Bytes one WRITE SAME step writes: the block repeated to this size (or the whole range if
/// smaller), so a long WRITE SAME takes few steps and a bounded buffer.
pub(crate) const WRITE_SAME_CHUNK: usize = 1 << 20;

/// Memory alignment O_DIRECT backends need (they advertise 4 KiB logical blocks): a step
/// whose data in `task.buf` is not aligned goes through the task's aligned bounce buffer.
pub(crate) const DIRECT_ALIGN: usize = 4096;

/// One aligned page of a bounce buffer.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(4096))]
pub(crate) struct Page(pub(crate) [u8; DIRECT_ALIGN]);

/// The first `len` bytes of `pages` (grown to hold them; grows once per task slot).
fn bounce(pages: &mut Vec<Page>, len: usize) -> &mut [u8] {
    let need = len.div_ceil(DIRECT_ALIGN);
    if pages.len() < need {
        pages.resize(need, Page([0; DIRECT_ALIGN]));
    }
    // SAFETY: `pages` holds at least `need` pages of plain bytes, contiguous (repr(C) arrays
    // without padding: size == align == 4096); the slice borrows `pages` mutably.
    unsafe { std::slice::from_raw_parts_mut(pages.as_mut_ptr().cast::<u8>(), len) }
}

/// The backend operation of one step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum SegKind {
    #[default]
    Read,
    Write,
    Flush,
    /// Zero the range; `unmap`: it may be deallocated.
    Zero {
        unmap: bool,
    },
    /// Deallocate the range (advisory on some backends: see `Identity::lbprz`).
    Discard,
}

/// One step: `len` bytes at disk byte `off`, data at `task.buf[buf_at..]`; `done` bytes of it
/// finished (short transfers continue where they stopped).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Seg {
    pub(crate) kind: SegKind,
    pub(crate) off: u64,
    pub(crate) len: u64,
    pub(crate) buf_at: usize,
    pub(crate) done: u64,
    /// The data of the part in flight is in the task's bounce buffer.
    pub(crate) bounced: bool,
}

impl Seg {
    /// A step of `len` bytes at disk byte `off`, data at `task.buf[buf_at..]`, nothing of it
    /// done yet.
    pub(crate) fn new(kind: SegKind, off: u64, len: u64, buf_at: usize) -> Seg {
        Seg {
            kind,
            off,
            len,
            buf_at,
            done: 0,
            bounced: false,
        }
    }
}

/// What a command does after its current step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Job {
    #[default]
    Idle,
    /// READ: Data-In is `task.buf[..len]`.
    Read { len: u32 },
    /// WRITE (and WRITE AND VERIFY): then a flush when `flush`.
    Write { flush: bool },
    /// A flush is the last step.
    Flush,
    /// VERIFY with BYTCHK: the blocks were read into `task.buf[at..at + n]`; compare them with
    /// the Data-Out (`bytchk` 1: all of it; 3: its one block against each).
    Verify { at: usize, n: usize, bytchk: u8 },
    /// COMPARE AND WRITE of `n` bytes: 0 = reading, 1 = writing, 2 = flushing (FUA).
    Caw { n: usize, stage: u8, fua: bool },
    /// ORWRITE of `n` bytes: 0 = reading (into `task.buf[n..2n]`), 1 = writing, 2 = flushing.
    OrWrite { n: usize, stage: u8, fua: bool },
    /// WRITE SAME by chunks: next disk byte and end.
    WriteSame { next: u64, end: u64 },
    /// UNMAP: next descriptor of the parameter list in `task.buf`, and their count.
    Unmap { next: usize, count: usize },
    /// A persistent-reservation state write is running on the job thread.
    Persist,
}

/// What happened to the step that just finished.
enum Next {
    /// `task.state.seg` holds the next step.
    Issue,
    Finish(Outcome),
}

pub(crate) fn good(data_in: u32) -> Outcome {
    Outcome {
        status: status::GOOD,
        sense: None,
        data_in,
    }
}

pub(crate) fn check(sense: Sense) -> Outcome {
    Outcome {
        status: status::CHECK_CONDITION,
        sense: Some(sense),
        data_in: 0,
    }
}

/// The outcome for a failed step (`errno` positive).
fn failed(kind: SegKind, errno: i32) -> Outcome {
    match errno {
        libc::ENOSPC | libc::EDQUOT => check(Sense::space_allocation_failed()),
        libc::EROFS | libc::EPERM | libc::EACCES => check(Sense::write_protected()),
        // The engine had no room: the initiator retries a BUSY command.
        libc::EAGAIN | libc::ENOMEM => Outcome {
            status: status::BUSY,
            sense: None,
            data_in: 0,
        },
        libc::EIO | libc::ENODATA | libc::EBADMSG => match kind {
            SegKind::Read => check(Sense::read_error()),
            _ => check(Sense::write_error()),
        },
        _ => check(Sense::internal_failure()),
    }
}

/// Offset of the first byte where `a` and `b` differ.
pub(crate) fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

impl LogicalUnit {
    /// Starts `task`'s current step and follows its steps until one is in flight or the
    /// command is done. `last` is the result of the step that just finished, if any.
    pub(crate) fn drive(
        &self,
        task: &mut ScsiTask,
        cx: &mut ScsiCx<'_>,
        mut last: Option<i32>,
    ) -> Step {
        loop {
            if let Some(res) = last.take() {
                match self.advance(task, res) {
                    Next::Issue => {}
                    Next::Finish(outcome) => return self.finish(task, outcome),
                }
            }
            match self.issue(task, cx) {
                Started::Submitted(0) => last = Some(0),
                Started::Submitted(n) => {
                    task.state.pending = n;
                    task.state.err = 0;
                    task.state.got = 0;
                    return Step::InFlight;
                }
                Started::Done(r) => last = Some(r),
            }
        }
    }

    /// Ends a command: releases its range lock.
    pub(crate) fn finish(&self, task: &mut ScsiTask, outcome: Outcome) -> Step {
        self.release(task);
        task.state.job = Job::Idle;
        Step::Done(outcome)
    }

    /// Pushes the remaining part of the current step to the backend.
    fn issue(&self, task: &mut ScsiTask, cx: &mut ScsiCx<'_>) -> Started {
        let seg = task.state.seg;
        let req = task.state.req.get_or_insert_with(Box::default);
        let req: &mut ParsedRequest = req;
        let off = seg.off + seg.done;
        let len = seg.len - seg.done;
        req.sector = off >> SECTOR_SHIFT;
        req.num_sectors = len >> SECTOR_SHIFT;
        req.iov_count = 0;
        req.data_len = 0;
        req.status = None;
        req.kind = match seg.kind {
            SegKind::Read => RequestKind::Read,
            SegKind::Write => RequestKind::Write,
            SegKind::Flush => RequestKind::Flush,
            SegKind::Zero { unmap } => RequestKind::WriteZeroes { unmap },
            SegKind::Discard => RequestKind::Discard,
        };
        task.state.seg.bounced = false;
        if matches!(seg.kind, SegKind::Read | SegKind::Write) {
            let at = seg.buf_at + seg.done as usize;
            let Some(mut data) = task.buf.get_mut(at..at + len as usize) else {
                return Started::Done(-libc::EINVAL);
            };
            if self.geometry().block_size as usize == DIRECT_ALIGN
                && !(data.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
            {
                let b = bounce(&mut task.state.bounce, data.len());
                if seg.kind == SegKind::Write {
                    b.copy_from_slice(data);
                }
                data = b;
                task.state.seg.bounced = true;
            }
            req.iov[0] = libc::iovec {
                iov_base: data.as_mut_ptr().cast(),
                iov_len: data.len(),
            };
            req.iov_count = 1;
            // Bounded by MAX_TRANSFER_BYTES (and WRITE_SAME_CHUNK).
            req.data_len = data.len() as u32;
        } else if seg.kind == SegKind::Flush {
            req.sector = 0;
            req.num_sectors = 0;
        }
        let req: &ParsedRequest = req;
        self.backend.start(req, cx.engine, cx.user_data)
    }

    /// Accounts for a finished step and picks the next.
    fn advance(&self, task: &mut ScsiTask, res: i32) -> Next {
        let st = &mut task.state;
        let seg = &mut st.seg;
        if res < 0 {
            return Next::Finish(failed(seg.kind, -res));
        }
        if matches!(seg.kind, SegKind::Read | SegKind::Write) {
            let res = res as u64;
            if seg.bounced && seg.kind == SegKind::Read {
                let at = seg.buf_at + seg.done as usize;
                let n = res.min(seg.len - seg.done) as usize;
                let b = bounce(&mut st.bounce, n);
                if let Some(dst) = task.buf.get_mut(at..at + n) {
                    dst.copy_from_slice(b);
                }
            }
            if res == 0 && seg.len > seg.done {
                // End of file where the unit has blocks: the backing file shrank.
                return Next::Finish(failed(seg.kind, libc::EIO));
            }
            seg.done = (seg.done + res).min(seg.len);
            if seg.done < seg.len {
                return Next::Issue;
            }
        }
        match st.job {
            Job::Idle | Job::Persist => Next::Finish(good(0)),
            Job::Read { len } => Next::Finish(good(len)),
            Job::Flush => Next::Finish(good(0)),
            Job::Write { flush } => {
                if flush && seg.kind == SegKind::Write {
                    *seg = Seg {
                        kind: SegKind::Flush,
                        ..Seg::default()
                    };
                    Next::Issue
                } else {
                    Next::Finish(good(0))
                }
            }
            Job::Verify { at, n, bytchk } => {
                let (want, got) = task.buf.split_at(at);
                let got = &got[..n];
                let diff = if bytchk == 1 {
                    first_difference(&want[..n], got)
                } else {
                    let bs = want.len().max(1);
                    got.chunks(bs)
                        .enumerate()
                        .find_map(|(i, blk)| first_difference(want, blk).map(|d| i * bs + d))
                };
                match diff {
                    Some(d) => Next::Finish(check(Sense::miscompare(d as u64))),
                    None => Next::Finish(good(0)),
                }
            }
            Job::Caw { n, stage, fua } => match stage {
                0 => {
                    let (verify, rest) = task.buf.split_at(n);
                    if let Some(d) = first_difference(verify, &rest[n..2 * n]) {
                        return Next::Finish(check(Sense::miscompare(d as u64)));
                    }
                    st.job = Job::Caw { n, stage: 1, fua };
                    *seg = Seg::new(SegKind::Write, seg.off, n as u64, n);
                    Next::Issue
                }
                1 if fua => {
                    st.job = Job::Caw { n, stage: 2, fua };
                    *seg = Seg {
                        kind: SegKind::Flush,
                        ..Seg::default()
                    };
                    Next::Issue
                }
                _ => Next::Finish(good(0)),
            },
            Job::OrWrite { n, stage, fua } => match stage {
                0 => {
                    let (data, medium) = task.buf.split_at_mut(n);
                    for (d, m) in data.iter_mut().zip(&medium[..n]) {
                        *d |= *m;
                    }
                    st.job = Job::OrWrite { n, stage: 1, fua };
                    *seg = Seg::new(SegKind::Write, seg.off, n as u64, 0);
                    Next::Issue
                }
                1 if fua => {
                    st.job = Job::OrWrite { n, stage: 2, fua };
                    *seg = Seg {
                        kind: SegKind::Flush,
                        ..Seg::default()
                    };
                    Next::Issue
                }
                _ => Next::Finish(good(0)),
            },
            Job::WriteSame { next, end } => {
                if next >= end {
                    return Next::Finish(good(0));
                }
                let len = (end - next).min(task.buf.len() as u64);
                st.job = Job::WriteSame {
                    next: next + len,
                    end,
                };
                *seg = Seg::new(SegKind::Write, next, len, 0);
                Next::Issue
            }
            Job::Unmap { next, count } => match self.next_unmap(&task.buf, next, count) {
                Some((i, off, len)) => {
                    st.job = Job::Unmap { next: i + 1, count };
                    *seg = Seg::new(SegKind::Discard, off, len, 0);
                    Next::Issue
                }
                None => Next::Finish(good(0)),
            },
        }
    }

    /// The next UNMAP descriptor from `from` with blocks to deallocate: (index, byte offset,
    /// byte length). The list was validated before the first step.
    pub(crate) fn next_unmap(
        &self,
        list: &[u8],
        from: usize,
        count: usize,
    ) -> Option<(usize, u64, u64)> {
        let bs = u64::from(self.geometry().block_size);
        (from..count).find_map(|i| {
            let d = list.get(8 + 16 * i..8 + 16 * i + 12)?;
            let lba = u64::from_be_bytes(d[..8].try_into().ok()?);
            let n = u64::from(u32::from_be_bytes(d[8..12].try_into().ok()?));
            (n > 0).then_some((i, lba * bs, n * bs))
        })
    }

    /// One engine completion of the current step.
    pub(crate) fn step_done(&self, task: &mut ScsiTask, result: i32, cx: &mut ScsiCx<'_>) -> Step {
        let st = &mut task.state;
        if st.pending == 0 {
            // Not ours (or already finished): nothing to do but report it.
            tracing::warn!(unit = %self.config.name, "completion for a command with nothing in flight");
            return Step::InFlight;
        }
        st.pending -= 1;
        if result < 0 {
            if st.err == 0 {
                st.err = result;
            }
        } else {
            st.got = st.got.saturating_add(result as u64);
        }
        if st.pending > 0 {
            return Step::InFlight;
        }
        let res = if st.err < 0 {
            st.err
        } else {
            i32::try_from(st.got).unwrap_or(i32::MAX)
        };
        if st.job == Job::Persist {
            let outcome = if res < 0 {
                tracing::error!(unit = %self.config.name, errno = -res, "persistent reservation state not saved");
                check(Sense::internal_failure())
            } else {
                good(0)
            };
            return self.finish(task, outcome);
        }
        self.drive(task, cx, Some(res))
    }
}
