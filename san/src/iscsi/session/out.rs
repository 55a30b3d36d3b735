//! The send queue of one connection: PDUs rendered in wire order (so StatSN, assigned at
//! render time, rises in the order the initiator sees), each as a header (BHS and header
//! digest), a data segment that is either a few inline bytes, a slice of a task's buffer
//! (zero copy for Data-In) or an owned buffer (rare: NOP echo, text responses), and a trailer
//! (padding and data digest). The transport turns the queued PDUs into one gather list per
//! `sendmsg` and reports how many bytes went out; fully sent PDUs release their task.
//!
//! The queue is a fixed ring of [`OUT_SLOTS`] entries, preallocated: rendering allocates
//! nothing except for owned data segments.

use crate::iscsi::pdu::{crc32c, pad_len, put_digest, BHS_LEN, DIGEST_LEN};

/// PDUs queued per connection. A command needs one entry per Data-In PDU or response; the
/// session renders Data-In lazily (only while entries are free) and stops taking PDUs from
/// the wire while fewer than [`OUT_RESERVE`] are free, so the ring never overflows.
pub const OUT_SLOTS: usize = 512;
/// Free entries the session keeps for the answers one received PDU can cause (a response,
/// R2Ts up to MaxOutstandingR2T, a Reject, a NOP-In): below this it takes no further PDU.
pub const OUT_RESERVE: usize = 16;
/// Data bytes carried inline in an entry (sense data with its length prefix, a rejected
/// header, small text answers).
pub const INLINE_MAX: usize = 64;
/// Entry slot meaning "releases no task".
pub const NO_TASK: u16 = u16::MAX;

/// Where an entry's data segment lives.
#[derive(Debug, Default)]
pub enum OutData {
    /// No data segment.
    #[default]
    None,
    /// `len` bytes of the entry's inline buffer.
    Inline(u8),
    /// A slice of a task's buffer (the task stays reserved until the entry is sent).
    Task {
        /// Task slot.
        slot: u16,
        /// Offset in its buffer.
        off: u32,
        /// Bytes.
        len: u32,
    },
    /// An owned buffer.
    Owned(Box<[u8]>),
}

/// One queued PDU.
#[derive(Debug)]
pub struct OutPdu {
    hdr: [u8; BHS_LEN + DIGEST_LEN],
    hdr_len: u8,
    inline: [u8; INLINE_MAX],
    data: OutData,
    /// Padding (zeroes) and the data digest.
    trailer: [u8; 3 + DIGEST_LEN],
    trailer_len: u8,
    /// Task slot whose buffer this entry points into and which is released once every entry
    /// naming it as `release` is sent ([`NO_TASK`]: none).
    pub release: u16,
    /// Close the connection once this entry is sent (Logout Response, fatal Reject).
    pub close_after: bool,
}

impl Default for OutPdu {
    fn default() -> Self {
        OutPdu {
            hdr: [0; BHS_LEN + DIGEST_LEN],
            hdr_len: 0,
            inline: [0; INLINE_MAX],
            data: OutData::None,
            trailer: [0; 3 + DIGEST_LEN],
            trailer_len: 0,
            release: NO_TASK,
            close_after: false,
        }
    }
}

impl OutPdu {
    fn data_len(&self) -> usize {
        match &self.data {
            OutData::None => 0,
            OutData::Inline(n) => usize::from(*n),
            OutData::Task { len, .. } => *len as usize,
            OutData::Owned(b) => b.len(),
        }
    }

    fn wire_len(&self) -> usize {
        usize::from(self.hdr_len) + self.data_len() + usize::from(self.trailer_len)
    }
}

/// The ring of queued PDUs (see the module comment).
#[derive(Debug)]
pub struct OutQueue {
    slots: Box<[OutPdu]>,
    /// First unsent entry.
    head: usize,
    /// Entries queued.
    len: usize,
    /// Bytes of the head entry already sent (a partial send).
    head_sent: usize,
    header_digest: bool,
    data_digest: bool,
}

/// What [`OutQueue::push`] queues: a BHS and where its data lies. The BHS's data segment
/// length must match.
#[derive(Debug)]
pub struct Render<'a> {
    /// The header.
    pub bhs: [u8; BHS_LEN],
    /// The data segment.
    pub data: OutData,
    /// The data's bytes, for the digest (the same bytes `data` names).
    pub bytes: &'a [u8],
    /// Inline bytes to copy (with `OutData::Inline`).
    pub inline: &'a [u8],
    /// Task released when sent.
    pub release: u16,
    /// Close after sending.
    pub close_after: bool,
}

impl OutQueue {
    /// An empty ring; digests as negotiated for the connection.
    pub fn new(header_digest: bool, data_digest: bool) -> Self {
        OutQueue {
            slots: (0..OUT_SLOTS).map(|_| OutPdu::default()).collect(),
            head: 0,
            len: 0,
            head_sent: 0,
            header_digest,
            data_digest,
        }
    }

    /// Entries free.
    pub fn free(&self) -> usize {
        OUT_SLOTS - self.len
    }

    /// Entries queued (unsent or partly sent).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Nothing queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues one PDU; false when the ring is full (the caller keeps [`OUT_RESERVE`] free).
    pub fn push(&mut self, r: Render<'_>) -> bool {
        if self.len == OUT_SLOTS {
            return false;
        }
        let i = (self.head + self.len) % OUT_SLOTS;
        let e = &mut self.slots[i];
        e.hdr[..BHS_LEN].copy_from_slice(&r.bhs);
        e.hdr_len = BHS_LEN as u8;
        if self.header_digest {
            e.hdr[BHS_LEN..].copy_from_slice(&put_digest(crc32c(&[&r.bhs])));
            e.hdr_len += DIGEST_LEN as u8;
        }
        let n = match &r.data {
            OutData::Inline(n) => {
                let n = usize::from(*n).min(INLINE_MAX).min(r.inline.len());
                e.inline[..n].copy_from_slice(&r.inline[..n]);
                n
            }
            OutData::None => 0,
            OutData::Task { len, .. } => *len as usize,
            OutData::Owned(b) => b.len(),
        };
        let pad = pad_len(n);
        e.trailer = [0; 3 + DIGEST_LEN];
        e.trailer_len = pad as u8;
        if self.data_digest && n > 0 {
            let bytes = match &r.data {
                OutData::Inline(_) => &e.inline[..n],
                OutData::Owned(b) => &b[..],
                _ => r.bytes,
            };
            let crc = crc32c(&[bytes, &[0u8; 3][..pad]]);
            e.trailer[pad..pad + DIGEST_LEN].copy_from_slice(&put_digest(crc));
            e.trailer_len += DIGEST_LEN as u8;
        }
        e.data = r.data;
        e.release = r.release;
        e.close_after = r.close_after;
        self.len += 1;
        true
    }

    /// Fills `iov` with the queued bytes from the first unsent one, up to `iov.len()` entries
    /// and `max_bytes`; `task_buf(slot)` gives a task buffer's start. Returns the entries
    /// used (0: nothing to send).
    ///
    /// The pointers stay valid while the entries stay queued and the task buffers they name
    /// are not touched (their tasks are held until [`OutQueue::sent`] pops them).
    pub fn gather(
        &self,
        iov: &mut [libc::iovec],
        max_bytes: usize,
        task_buf: &dyn Fn(u16) -> *const u8,
    ) -> usize {
        let mut n = 0;
        let mut bytes = 0;
        let mut skip = self.head_sent;
        for k in 0..self.len {
            let e = &self.slots[(self.head + k) % OUT_SLOTS];
            let data_ptr: *const u8 = match &e.data {
                OutData::None => std::ptr::null(),
                OutData::Inline(_) => e.inline.as_ptr(),
                OutData::Task { slot, off, .. } => {
                    // Offsets were checked against the buffer when the entry was rendered.
                    task_buf(*slot).wrapping_add(*off as usize)
                }
                OutData::Owned(b) => b.as_ptr(),
            };
            let parts: [(*const u8, usize); 3] = [
                (e.hdr.as_ptr(), usize::from(e.hdr_len)),
                (data_ptr, e.data_len()),
                (e.trailer.as_ptr(), usize::from(e.trailer_len)),
            ];
            for (p, len) in parts {
                if len == 0 {
                    continue;
                }
                if skip >= len {
                    skip -= len;
                    continue;
                }
                if n == iov.len() || bytes >= max_bytes {
                    return n;
                }
                iov[n] = libc::iovec {
                    iov_base: p.wrapping_add(skip) as *mut libc::c_void,
                    iov_len: len - skip,
                };
                bytes += len - skip;
                skip = 0;
                n += 1;
            }
        }
        n
    }

    /// `bytes` were sent: pops fully sent entries, calling `done(release, close_after)` for
    /// each.
    pub fn sent(&mut self, mut bytes: usize, done: &mut dyn FnMut(u16, bool)) {
        while self.len > 0 {
            let e = &mut self.slots[self.head];
            let left = e.wire_len() - self.head_sent;
            if bytes < left {
                self.head_sent += bytes;
                return;
            }
            bytes -= left;
            self.head_sent = 0;
            let (release, close) = (e.release, e.close_after);
            e.data = OutData::None; // drops an owned buffer
            self.head = (self.head + 1) % OUT_SLOTS;
            self.len -= 1;
            done(release, close);
        }
    }
}
