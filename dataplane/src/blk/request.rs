//! virtio-blk request parsing and validation: a pure function from a descriptor chain, guest
//! memory and the disk's geometry to a [`ParsedRequest`]. Nothing here performs I/O.
//!
//! Chain layout accepted (what Linux, QEMU and libblkio drivers send):
//!
//! | descriptor | direction | content |
//! |---|---|---|
//! | first | device-readable, exactly 16 bytes | header: type u32, reserved u32, sector u64 (LE) |
//! | middle (0..=SEG_MAX) | depends on type | data |
//! | last | device-writable, ≥ 1 byte | data (if longer than 1 byte) then the status byte |
//!
//! Every guest address is checked to lie inside one guest memory region before a host pointer
//! is taken; a request that fails validation still gets its status byte written when the status
//! descriptor itself is valid, so nothing the guest submits is lost.

use thiserror::Error;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, GuestAddress, GuestMemory};

use crate::guest_ram::GuestRam;

use super::{
    DiskGeometry, MAX_DISCARD_SECTORS, SECTOR_SHIFT, SECTOR_SIZE, SEG_MAX, SIZE_MAX_BYTES,
};

/// Header length: type (4), reserved (4), sector (8).
pub const HEADER_BYTES: u32 = 16;
/// One discard/write-zeroes range: sector u64, num_sectors u32, flags u32.
pub const DISCARD_RANGE_BYTES: u32 = 16;
/// Descriptors we look at per chain: header + SEG_MAX data + status.
const CHAIN_DESCS_MAX: usize = SEG_MAX as usize + 2;

/// What the request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// VIRTIO_BLK_T_IN: read sectors into the data segments.
    Read,
    /// VIRTIO_BLK_T_OUT: write the data segments.
    Write,
    /// VIRTIO_BLK_T_FLUSH: make completed writes durable.
    Flush,
    /// VIRTIO_BLK_T_GET_ID: write the serial into the data segment.
    GetId,
    /// VIRTIO_BLK_T_DISCARD of `num_sectors` from `sector`.
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES; `unmap` allows deallocating the range.
    WriteZeroes {
        /// VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP was set.
        unmap: bool,
    },
}

/// Why a request was refused. Each maps to a virtio-blk status via [`RequestError::status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum RequestError {
    /// The chain has no descriptor at all.
    #[error("empty descriptor chain")]
    EmptyChain,
    /// The last descriptor is not device-writable, or is empty, or lies outside guest memory.
    #[error("no valid status descriptor")]
    NoStatus,
    /// The chain has fewer than header + status descriptors.
    #[error("descriptor chain too short")]
    ChainTooShort,
    /// The chain has more than SEG_MAX data descriptors.
    #[error("descriptor chain longer than seg_max")]
    ChainTooLong,
    /// The header descriptor is writable or not 16 bytes.
    #[error("malformed request header descriptor")]
    BadHeader,
    /// A descriptor points outside guest memory (or spans two regions).
    #[error("descriptor outside guest memory")]
    BadAddress,
    /// A data descriptor has the wrong direction for the request type.
    #[error("data descriptor has the wrong direction")]
    WrongDirection,
    /// A data descriptor is larger than size_max.
    #[error("data descriptor larger than size_max")]
    SegmentTooLarge,
    /// Data length not a multiple of the sector size.
    #[error("data length not a multiple of 512")]
    Unaligned,
    /// The sector range extends past the capacity.
    #[error("sector range past the end of the disk")]
    OutOfRange,
    /// A write-type request on a read-only export.
    #[error("write to a read-only export")]
    ReadOnly,
    /// Malformed discard/write-zeroes payload.
    #[error("malformed discard/write-zeroes range")]
    BadDiscard,
    /// A request type or flag the device does not implement.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
}

impl RequestError {
    /// The virtio-blk status byte to answer with.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A validated request. `iov` holds host addresses of guest buffers, each checked to lie in a
/// mapped guest region; they stay valid as long as the guest memory snapshot used for parsing.
#[derive(Debug)]
pub struct ParsedRequest {
    /// Request type.
    pub kind: RequestKind,
    /// First sector (for Read/Write/Discard/WriteZeroes).
    pub sector: u64,
    /// Sectors covered by Discard/WriteZeroes; for Read/Write, `data_len >> 9`.
    pub num_sectors: u64,
    /// Host iovecs of the data segments (Read/Write/GetId).
    pub iov: [libc::iovec; SEG_MAX as usize],
    /// Valid entries in `iov`.
    pub iov_count: usize,
    /// Total data bytes.
    pub data_len: u32,
    /// Guest address of the status byte, when a valid status descriptor was found.
    pub status: Option<GuestAddress>,
}

// SAFETY: the raw pointers in `iov` point into guest memory mappings; a ParsedRequest is moved
// between threads only together with (or before taking) the memory snapshot that keeps them
// mapped, and the pointers are never dereferenced by this type itself.
unsafe impl Send for ParsedRequest {}

impl Default for ParsedRequest {
    fn default() -> Self {
        ParsedRequest {
            kind: RequestKind::Flush,
            sector: 0,
            num_sectors: 0,
            iov: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; SEG_MAX as usize],
            iov_count: 0,
            data_len: 0,
            status: None,
        }
    }
}

impl ParsedRequest {
    /// Bytes the device writes into the chain's writable part on success (used-ring length).
    pub fn used_len_ok(&self) -> u32 {
        match self.kind {
            RequestKind::Read => self.data_len.saturating_add(1),
            RequestKind::GetId => self.data_len.min(super::ID_BYTES as u32).saturating_add(1),
            _ => 1,
        }
    }

    /// Byte offset on the disk of the first sector.
    pub fn offset_bytes(&self) -> u64 {
        self.sector << SECTOR_SHIFT
    }

    /// Byte length of the sector range.
    pub fn len_bytes(&self) -> u64 {
        self.num_sectors << SECTOR_SHIFT
    }
}

/// Parses and validates one descriptor chain into `out`.
///
/// `out.status` is set whenever the status descriptor is valid, even if `Err` is returned, so
/// the caller can answer the error to the guest.
pub fn parse_request<M, I>(
    chain: I,
    mem: &M,
    geom: &DiskGeometry,
    out: &mut ParsedRequest,
) -> Result<(), RequestError>
where
    M: GuestMemory,
    I: Iterator<Item = Descriptor>,
{
    let mut scratch = [Descriptor::new(0, 0, 0, 0); CHAIN_DESCS_MAX];
    parse_request_with(chain, &GuestRam::new(mem), geom, out, &mut scratch)
}

/// Descriptor scratch for [`parse_request_with`]: one per reactor, reused for every chain.
pub type ChainScratch = [Descriptor; CHAIN_DESCS_MAX];

/// A fresh [`ChainScratch`].
pub fn chain_scratch() -> Box<ChainScratch> {
    Box::new([Descriptor::new(0, 0, 0, 0); CHAIN_DESCS_MAX])
}

/// [`parse_request`] for the reactors' per-I/O path: guest memory through a prebuilt
/// [`GuestRam`] table, and caller-provided descriptor scratch, which would otherwise zero 2 KiB
/// of stack per request (measurable at millions of requests per second). Only the first
/// `count` entries of the scratch are read back, all written by this call.
pub fn parse_request_with<K, I>(
    chain: I,
    mem: &GuestRam<K>,
    geom: &DiskGeometry,
    out: &mut ParsedRequest,
    descs: &mut ChainScratch,
) -> Result<(), RequestError>
where
    I: Iterator<Item = Descriptor>,
{
    out.status = None;
    out.iov_count = 0;
    out.data_len = 0;
    out.num_sectors = 0;
    out.sector = 0;

    let mut count = 0usize;
    // The chain iterator is bounded by the queue size and an indirect table's size (up to
    // 65 535 entries), but a chain longer than CHAIN_DESCS_MAX is refused whatever its length:
    // stop reading the guest's descriptors one past the limit, so a guest cannot make a shared
    // reactor walk a huge indirect table. Such a chain has no known last descriptor, so it gets
    // no status byte (it still goes back on the used ring, with length 0).
    for d in chain.take(CHAIN_DESCS_MAX + 1) {
        if count < CHAIN_DESCS_MAX {
            descs[count] = d;
        }
        count += 1;
    }
    if count > CHAIN_DESCS_MAX {
        return Err(RequestError::ChainTooLong);
    }
    let last = match count.checked_sub(1) {
        Some(i) => descs[i],
        None => return Err(RequestError::EmptyChain),
    };

    // Status: last byte of the last descriptor, which must be device-writable.
    if !last.is_write_only() || last.len() == 0 {
        return Err(RequestError::NoStatus);
    }
    let status_addr = last
        .addr()
        .checked_add(u64::from(last.len()) - 1)
        .ok_or(RequestError::NoStatus)?;
    if !mem.contains(status_addr.0) {
        return Err(RequestError::NoStatus);
    }
    out.status = Some(status_addr);

    if count < 2 {
        return Err(RequestError::ChainTooShort);
    }

    let header = descs[0];
    if header.is_write_only() || header.len() != HEADER_BYTES {
        return Err(RequestError::BadHeader);
    }
    let hdr = mem
        .read::<{ HEADER_BYTES as usize }>(header.addr().0)
        .ok_or(RequestError::BadAddress)?;
    let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes([
        hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
    ]);

    // Data descriptors: everything between header and status, plus the part of the last
    // descriptor before the status byte.
    let middle = &descs[1..count - 1];
    let tail_data = if last.len() > 1 {
        Some(Descriptor::new(
            last.addr().0,
            last.len() - 1,
            last.flags(),
            0,
        ))
    } else {
        None
    };

    let kind = match req_type {
        VIRTIO_BLK_T_IN => RequestKind::Read,
        VIRTIO_BLK_T_OUT => RequestKind::Write,
        VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
        VIRTIO_BLK_T_GET_ID => RequestKind::GetId,
        VIRTIO_BLK_T_DISCARD if geom.discard => RequestKind::Discard,
        VIRTIO_BLK_T_WRITE_ZEROES if geom.discard => RequestKind::WriteZeroes { unmap: false },
        other => return Err(RequestError::Unsupported(other)),
    };
    out.kind = kind;

    let writes_guest = matches!(kind, RequestKind::Read | RequestKind::GetId);
    for d in middle.iter().chain(tail_data.iter()) {
        if d.is_write_only() != writes_guest {
            return Err(RequestError::WrongDirection);
        }
    }

    match kind {
        RequestKind::Read | RequestKind::Write => {
            if kind == RequestKind::Write && geom.read_only {
                return Err(RequestError::ReadOnly);
            }
            collect_segments(middle.iter().chain(tail_data.iter()), mem, out)?;
            if !u64::from(out.data_len).is_multiple_of(SECTOR_SIZE) {
                return Err(RequestError::Unaligned);
            }
            let num = u64::from(out.data_len) >> SECTOR_SHIFT;
            check_range(sector, num, geom)?;
            out.sector = sector;
            out.num_sectors = num;
        }
        RequestKind::Flush => {
            if middle.iter().chain(tail_data.iter()).any(|d| d.len() != 0) {
                return Err(RequestError::WrongDirection);
            }
        }
        RequestKind::GetId => {
            collect_segments(middle.iter().chain(tail_data.iter()), mem, out)?;
        }
        RequestKind::Discard | RequestKind::WriteZeroes { .. } => {
            if geom.read_only {
                return Err(RequestError::ReadOnly);
            }
            parse_discard(middle, tail_data, mem, geom, kind, out)?;
        }
    }
    Ok(())
}

fn collect_segments<'a, K>(
    descs: impl Iterator<Item = &'a Descriptor>,
    mem: &GuestRam<K>,
    out: &mut ParsedRequest,
) -> Result<(), RequestError> {
    let mut total: u32 = 0;
    for d in descs {
        if d.len() == 0 {
            continue;
        }
        if d.len() > SIZE_MAX_BYTES {
            return Err(RequestError::SegmentTooLarge);
        }
        if out.iov_count >= SEG_MAX as usize {
            return Err(RequestError::ChainTooLong);
        }
        // One region must hold [addr, addr + len) before a host pointer exists.
        let host = mem
            .host(d.addr().0, d.len() as usize)
            .ok_or(RequestError::BadAddress)?;
        out.iov[out.iov_count] = libc::iovec {
            iov_base: host.cast(),
            iov_len: d.len() as usize,
        };
        out.iov_count += 1;
        total = total
            .checked_add(d.len())
            .ok_or(RequestError::SegmentTooLarge)?;
    }
    out.data_len = total;
    Ok(())
}

fn check_range(sector: u64, num: u64, geom: &DiskGeometry) -> Result<(), RequestError> {
    let end = sector.checked_add(num).ok_or(RequestError::OutOfRange)?;
    if end > geom.capacity_sectors {
        return Err(RequestError::OutOfRange);
    }
    Ok(())
}

fn parse_discard<K>(
    middle: &[Descriptor],
    tail_data: Option<Descriptor>,
    mem: &GuestRam<K>,
    geom: &DiskGeometry,
    kind: RequestKind,
    out: &mut ParsedRequest,
) -> Result<(), RequestError> {
    if tail_data.is_some() || middle.len() != 1 || middle[0].len() != DISCARD_RANGE_BYTES {
        return Err(RequestError::BadDiscard);
    }
    let range = mem
        .read::<{ DISCARD_RANGE_BYTES as usize }>(middle[0].addr().0)
        .ok_or(RequestError::BadAddress)?;
    let sector = u64::from_le_bytes([
        range[0], range[1], range[2], range[3], range[4], range[5], range[6], range[7],
    ]);
    let num = u32::from_le_bytes([range[8], range[9], range[10], range[11]]);
    let flags = u32::from_le_bytes([range[12], range[13], range[14], range[15]]);
    if num > MAX_DISCARD_SECTORS {
        return Err(RequestError::BadDiscard);
    }
    let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
    let reserved = flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    // The spec: reserved bits, and the unmap bit of a discard, must be zero -> UNSUPP.
    if reserved != 0 || (kind == RequestKind::Discard && unmap) {
        return Err(RequestError::Unsupported(flags));
    }
    // Discard ranges must be aligned to the logical block size (discard_sector_alignment).
    let align = u64::from(geom.blk_size >> SECTOR_SHIFT).max(1);
    if kind == RequestKind::Discard
        && (!sector.is_multiple_of(align) || !u64::from(num).is_multiple_of(align))
    {
        return Err(RequestError::BadDiscard);
    }
    check_range(sector, u64::from(num), geom)?;
    out.sector = sector;
    out.num_sectors = u64::from(num);
    if let RequestKind::WriteZeroes { .. } = kind {
        out.kind = RequestKind::WriteZeroes { unmap };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{GuestMemoryMmap, GuestRegionMmap};

    use super::*;
    use crate::blk::serial_from;
    use vm_memory::Bytes;

    const MEM_BYTES: usize = 0x10_0000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).unwrap()
    }

    fn geom() -> DiskGeometry {
        DiskGeometry {
            capacity_sectors: 1024,
            blk_size: 512,
            read_only: false,
            discard: true,
            num_queues: 1,
            serial: serial_from("t"),
        }
    }

    /// Builds a chain of (addr, len, writable) descriptors, writes `header` at the first one's
    /// address, and parses it through a real virtio-queue Queue.
    fn run(
        m: &GuestMemoryMmap,
        descs: &[(u64, u32, bool)],
        header: Option<(u32, u64)>,
        g: &DiskGeometry,
    ) -> (Result<(), RequestError>, ParsedRequest) {
        let vq = MockSplitQueue::new(m, 256);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, w))| {
                let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
                if i + 1 < descs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                RawDescriptor::from(Descriptor::new(addr, len, flags, (i + 1) as u16))
            })
            .collect();
        vq.add_desc_chains(&raw, 0).unwrap();
        if let Some((t, sector)) = header {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&t.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            m.write_slice(&h, GuestAddress(descs[0].0)).unwrap();
        }
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.pop_descriptor_chain(m).unwrap();
        let mut out = ParsedRequest::default();
        let r = parse_request(chain, m, g, &mut out);
        (r, out)
    }

    #[test]
    fn read_request_ok() {
        let m = mem();
        let (r, p) = run(
            &m,
            &[(0x8000, 16, false), (0x9000, 4096, true), (0xa000, 1, true)],
            Some((VIRTIO_BLK_T_IN, 8)),
            &geom(),
        );
        r.unwrap();
        assert_eq!(p.kind, RequestKind::Read);
        assert_eq!(p.sector, 8);
        assert_eq!(p.num_sectors, 8);
        assert_eq!(p.iov_count, 1);
        assert_eq!(p.used_len_ok(), 4097);
        assert_eq!(p.status, Some(GuestAddress(0xa000)));
    }

    #[test]
    fn data_and_status_in_one_descriptor() {
        let m = mem();
        let (r, p) = run(
            &m,
            &[(0x8000, 16, false), (0x9000, 513, true)],
            Some((VIRTIO_BLK_T_IN, 0)),
            &geom(),
        );
        r.unwrap();
        assert_eq!(p.data_len, 512);
        assert_eq!(p.status, Some(GuestAddress(0x9200)));
    }

    #[test]
    fn write_with_wrong_direction() {
        let m = mem();
        let (r, p) = run(
            &m,
            &[(0x8000, 16, false), (0x9000, 512, true), (0xa000, 1, true)],
            Some((VIRTIO_BLK_T_OUT, 0)),
            &geom(),
        );
        assert_eq!(r, Err(RequestError::WrongDirection));
        assert!(p.status.is_some());
    }

    #[test]
    fn out_of_range_and_overflow() {
        let m = mem();
        let (r, _) = run(
            &m,
            &[(0x8000, 16, false), (0x9000, 1024, true), (0xa000, 1, true)],
            Some((VIRTIO_BLK_T_IN, 1023)),
            &geom(),
        );
        assert_eq!(r, Err(RequestError::OutOfRange));
        let (r, _) = run(
            &m,
            &[(0x8000, 16, false), (0x9000, 1024, true), (0xa000, 1, true)],
            Some((VIRTIO_BLK_T_IN, u64::MAX)),
            &geom(),
        );
        assert_eq!(r, Err(RequestError::OutOfRange));
    }

    #[test]
    fn address_outside_memory() {
        let m = mem();
        let (r, p) = run(
            &m,
            &[
                (0x8000, 16, false),
                (MEM_BYTES as u64 - 256, 512, true),
                (0xa000, 1, true),
            ],
            Some((VIRTIO_BLK_T_IN, 0)),
            &geom(),
        );
        assert_eq!(r, Err(RequestError::BadAddress));
        assert!(p.status.is_some());
        let (r, p) = run(
            &m,
            &[(0x8000, 16, false), (0x9000, 512, true), (1 << 40, 1, true)],
            Some((VIRTIO_BLK_T_IN, 0)),
            &geom(),
        );
        assert_eq!(r, Err(RequestError::NoStatus));
        assert!(p.status.is_none());
    }

    #[test]
    fn unknown_type_is_unsupp() {
        let m = mem();
        let (r, _) = run(
            &m,
            &[(0x8000, 16, false), (0xa000, 1, true)],
            Some((99, 0)),
            &geom(),
        );
        assert_eq!(r, Err(RequestError::Unsupported(99)));
        assert_eq!(r.unwrap_err().status(), VIRTIO_BLK_S_UNSUPP as u8);
    }

    #[test]
    fn read_only_refuses_writes() {
        let m = mem();
        let mut g = geom();
        g.read_only = true;
        let (r, _) = run(
            &m,
            &[(0x8000, 16, false), (0x9000, 512, false), (0xa000, 1, true)],
            Some((VIRTIO_BLK_T_OUT, 0)),
            &g,
        );
        assert_eq!(r, Err(RequestError::ReadOnly));
    }

    #[test]
    fn header_checks() {
        let m = mem();
        let (r, _) = run(
            &m,
            &[(0x8000, 8, false), (0xa000, 1, true)],
            Some((VIRTIO_BLK_T_FLUSH, 0)),
            &geom(),
        );
        assert_eq!(r, Err(RequestError::BadHeader));
        let (r, _) = run(&m, &[(0xa000, 1, true)], None, &geom());
        assert_eq!(r, Err(RequestError::ChainTooShort));
        let (r, _) = run(
            &m,
            &[(0x8000, 16, false), (0xa000, 1, false)],
            Some((VIRTIO_BLK_T_FLUSH, 0)),
            &geom(),
        );
        assert_eq!(r, Err(RequestError::NoStatus));
    }

    #[test]
    fn flush_and_get_id() {
        let m = mem();
        let (r, p) = run(
            &m,
            &[(0x8000, 16, false), (0xa000, 1, true)],
            Some((VIRTIO_BLK_T_FLUSH, 0)),
            &geom(),
        );
        r.unwrap();
        assert_eq!(p.kind, RequestKind::Flush);
        let (r, p) = run(
            &m,
            &[(0x8000, 16, false), (0x9000, 20, true), (0xa000, 1, true)],
            Some((VIRTIO_BLK_T_GET_ID, 0)),
            &geom(),
        );
        r.unwrap();
        assert_eq!(p.kind, RequestKind::GetId);
        assert_eq!(p.used_len_ok(), 21);
    }

    #[test]
    fn write_zeroes_with_unmap() {
        let m = mem();
        let mut range = [0u8; 16];
        range[0..8].copy_from_slice(&16u64.to_le_bytes());
        range[8..12].copy_from_slice(&32u32.to_le_bytes());
        range[12..16].copy_from_slice(&1u32.to_le_bytes());
        m.write_slice(&range, GuestAddress(0x9000)).unwrap();
        let (r, p) = run(
            &m,
            &[(0x8000, 16, false), (0x9000, 16, false), (0xa000, 1, true)],
            Some((VIRTIO_BLK_T_WRITE_ZEROES, 0)),
            &geom(),
        );
        r.unwrap();
        assert_eq!(p.kind, RequestKind::WriteZeroes { unmap: true });
        assert_eq!((p.sector, p.num_sectors), (16, 32));
        // The same flags on a discard are refused.
        let (r, _) = run(
            &m,
            &[(0x8000, 16, false), (0x9000, 16, false), (0xa000, 1, true)],
            Some((VIRTIO_BLK_T_DISCARD, 0)),
            &geom(),
        );
        assert_eq!(r, Err(RequestError::Unsupported(1)));
    }

    #[test]
    fn too_many_segments() {
        let m = mem();
        let mut d = vec![(0x8000u64, 16u32, false)];
        for i in 0..(SEG_MAX as u64 + 1) {
            d.push((0x10000 + i * 512, 512, true));
        }
        d.push((0xa000, 1, true));
        let (r, p) = run(&m, &d, Some((VIRTIO_BLK_T_IN, 0)), &geom());
        assert_eq!(r, Err(RequestError::ChainTooLong));
        // The walk stopped at the limit: the last descriptor (the status) was never read.
        assert!(p.status.is_none());
    }

    /// A chain iterator that counts how many descriptors were taken from it.
    struct Counting<'a> {
        left: u32,
        taken: &'a std::cell::Cell<u32>,
    }

    impl Iterator for Counting<'_> {
        type Item = Descriptor;
        fn next(&mut self) -> Option<Descriptor> {
            if self.left == 0 {
                return None;
            }
            self.left -= 1;
            self.taken.set(self.taken.get() + 1);
            let flags = if self.left == 0 {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            Some(Descriptor::new(0x9000, 512, flags, 0))
        }
    }

    /// Finding 10 of issue 12: a 65 535-entry indirect table is refused after reading one
    /// descriptor past the limit, not after walking all of it.
    #[test]
    fn too_long_chain_stops_at_the_limit() {
        let m = mem();
        let taken = std::cell::Cell::new(0);
        let chain = Counting {
            left: u32::from(u16::MAX),
            taken: &taken,
        };
        let mut out = ParsedRequest::default();
        let r = parse_request(chain, &m, &geom(), &mut out);
        assert_eq!(r, Err(RequestError::ChainTooLong));
        assert_eq!(taken.get() as usize, CHAIN_DESCS_MAX + 1);
        assert!(out.status.is_none());
    }

    #[test]
    fn region_spanning_segment_refused() {
        let m = GuestMemoryMmap::<()>::from_regions(vec![
            GuestRegionMmap::from_range(GuestAddress(0), 0x10000, None).unwrap(),
            GuestRegionMmap::from_range(GuestAddress(0x10000), 0x10000, None).unwrap(),
        ])
        .unwrap();
        let (r, _) = run(
            &m,
            &[(0x8000, 16, false), (0xff00, 512, true), (0xa000, 1, true)],
            Some((VIRTIO_BLK_T_IN, 0)),
            &geom(),
        );
        assert_eq!(r, Err(RequestError::BadAddress));
    }

    proptest! {
        /// Arbitrary chains (addresses, lengths, directions, header bytes) never panic, and any
        /// accepted request's iovecs lie inside guest memory and its range inside the disk.
        #[test]
        fn arbitrary_chains_are_safe(
            descs in proptest::collection::vec(
                (0u64..(MEM_BYTES as u64 + 0x1000), 0u32..0x3000, any::<bool>()), 1..8),
            t in prop_oneof![Just(0u32), Just(1), Just(4), Just(8), Just(11), Just(13), any::<u32>()],
            sector in prop_oneof![0u64..2048, any::<u64>()],
        ) {
            let m = mem();
            // Keep the descriptor table area (first pages used by the mock queue) untouched
            // by header writes: place headers only where they fit.
            let header = if descs[0].0 >= 0x8000 && descs[0].0 + 16 <= MEM_BYTES as u64 {
                Some((t, sector))
            } else {
                None
            };
            let (r, p) = run(&m, &descs, header, &geom());
            if r.is_ok() {
                prop_assert!(p.status.is_some());
                let base = m.get_host_address(GuestAddress(0)).unwrap() as usize;
                for iov in &p.iov[..p.iov_count] {
                    let start = iov.iov_base as usize;
                    prop_assert!(start >= base && start + iov.iov_len <= base + MEM_BYTES);
                }
                prop_assert!(p.sector + p.num_sectors <= 1024 || p.kind == RequestKind::GetId
                    || p.kind == RequestKind::Flush);
            }
        }

        /// Discard and write-zeroes with any range payload: accepted exactly when the range is
        /// well-formed (at most MAX_DISCARD_SECTORS, no reserved flag, no unmap on a discard,
        /// aligned, inside the disk, writable export), and then parsed as sent.
        #[test]
        fn discard_payloads_are_validated(
            t in prop_oneof![Just(VIRTIO_BLK_T_DISCARD), Just(VIRTIO_BLK_T_WRITE_ZEROES)],
            sector in prop_oneof![0u64..1100, any::<u64>()],
            num in prop_oneof![0u32..1100, Just(MAX_DISCARD_SECTORS), Just(MAX_DISCARD_SECTORS + 1), any::<u32>()],
            flags in prop_oneof![Just(0u32), Just(VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP), any::<u32>()],
            blk_size in prop_oneof![Just(512u32), Just(4096u32)],
            read_only in any::<bool>(),
        ) {
            let m = mem();
            let mut range = [0u8; 16];
            range[0..8].copy_from_slice(&sector.to_le_bytes());
            range[8..12].copy_from_slice(&num.to_le_bytes());
            range[12..16].copy_from_slice(&flags.to_le_bytes());
            m.write_slice(&range, GuestAddress(0x9000)).unwrap();
            let mut g = geom();
            g.blk_size = blk_size;
            g.read_only = read_only;
            let (r, p) = run(
                &m,
                &[(0x8000, 16, false), (0x9000, 16, false), (0xa000, 1, true)],
                Some((t, 0)),
                &g,
            );
            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            let align = u64::from(blk_size / 512);
            let discard = t == VIRTIO_BLK_T_DISCARD;
            let ok = !read_only
                && num <= MAX_DISCARD_SECTORS
                && flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP == 0
                && !(discard && unmap)
                && (!discard || (sector % align == 0 && u64::from(num) % align == 0))
                && sector.checked_add(u64::from(num)).is_some_and(|e| e <= g.capacity_sectors);
            prop_assert_eq!(r.is_ok(), ok, "{:?}", r);
            prop_assert!(p.status.is_some());
            if ok {
                prop_assert_eq!((p.sector, p.num_sectors), (sector, u64::from(num)));
                let kind = if discard {
                    RequestKind::Discard
                } else {
                    RequestKind::WriteZeroes { unmap }
                };
                prop_assert_eq!(p.kind, kind);
            }
        }

        /// Chains through an indirect table (the reactors' walk, `split_ring::Chain`, over
        /// random table contents and table lengths up to well past seg_max) never panic, and
        /// any accepted request lies in guest memory and inside the disk.
        #[test]
        fn indirect_chains_are_safe(
            entries in proptest::collection::vec(
                (prop_oneof![0x8000u64..0x20000, 0u64..(MEM_BYTES as u64 + 0x1000)],
                 prop_oneof![Just(16u32), Just(512u32), Just(1u32), 0u32..0x3000],
                 0u16..8,
                 0u16..300), 0..300),
            table_len in prop_oneof![Just(None), Just(Some(0u32)), Just(Some(17u32)), any::<u32>().prop_map(Some)],
            t in prop_oneof![Just(VIRTIO_BLK_T_IN), Just(VIRTIO_BLK_T_OUT), Just(VIRTIO_BLK_T_DISCARD), any::<u32>()],
            sector in prop_oneof![0u64..2048, any::<u64>()],
            seq in any::<bool>(),
        ) {
            use crate::split_ring::Chain;
            const TABLE: u64 = 0x40000;
            let m = mem();
            // Optionally a well-formed sequential chain (NEXT to i + 1, last one writable) so
            // that long valid-looking chains reach the length limit.
            for (i, &(a, l, f, n)) in entries.iter().enumerate() {
                let (f, n) = if seq {
                    let last = i + 1 == entries.len();
                    let w = if i == 0 { 0 } else if last { VRING_DESC_F_WRITE as u16 } else { f & VRING_DESC_F_WRITE as u16 };
                    (w | if last { 0 } else { VRING_DESC_F_NEXT as u16 }, (i + 1) as u16)
                } else {
                    (f, n)
                };
                let a = if seq && i == 0 { 0x8000 } else { a };
                let mut b = [0u8; 16];
                b[..8].copy_from_slice(&a.to_le_bytes());
                b[8..12].copy_from_slice(&l.to_le_bytes());
                b[12..14].copy_from_slice(&f.to_le_bytes());
                b[14..].copy_from_slice(&n.to_le_bytes());
                m.write_slice(&b, GuestAddress(TABLE + 16 * i as u64)).unwrap();
            }
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&t.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            m.write_slice(&h, GuestAddress(0x8000)).unwrap();
            // The queue's table: one INDIRECT descriptor at index 0.
            let len = table_len.unwrap_or(16 * entries.len() as u32);
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&TABLE.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&(virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16).to_le_bytes());
            m.write_slice(&d, GuestAddress(0x1000)).unwrap();
            let ram = GuestRam::new(&m);
            let chain = Chain::new(&ram, 0x1000, 256, 0);
            let mut out = ParsedRequest::default();
            let mut scratch = chain_scratch();
            let r = parse_request_with(chain, &ram, &geom(), &mut out, &mut scratch);
            if r.is_ok() {
                prop_assert!(out.status.is_some());
                let base = m.get_host_address(GuestAddress(0)).unwrap() as usize;
                for iov in &out.iov[..out.iov_count] {
                    let start = iov.iov_base as usize;
                    prop_assert!(start >= base && start + iov.iov_len <= base + MEM_BYTES);
                }
                prop_assert!(out.sector + out.num_sectors <= 1024);
            }
            if seq && table_len.is_none() && entries.len() > CHAIN_DESCS_MAX {
                prop_assert_eq!(r, Err(RequestError::ChainTooLong));
            }
        }
    }
}
