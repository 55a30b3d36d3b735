//! Target `blk_chain`: the virtio-blk request path of a reactor over a fake guest memory —
//! avail ring, descriptor chain walk ([`dataplane::split_ring`], direct and indirect) and the
//! request parser ([`dataplane::blk::request::parse_request_with`]) — as `BlkQueue::poll_io` calls
//! them.
//!
//! Input: `size_log u8, next_avail u16, table u32, avail u32, geometry flags u8`, then the
//! guest memory image from guest address 0. Guest memory is two regions with a hole between
//! them, so a buffer straddling regions or landing in the hole is reachable.
//!
//! Oracle besides "no panic": every accepted request's iovecs lie inside one mapped region
//! (checked against the mapping, then touched), add up to `data_len`, and its sector range
//! lies on the disk; the status byte is writable guest memory.

use dataplane::blk::request::{chain_scratch, parse_request_with, ParsedRequest, RequestKind};
use dataplane::blk::{serial_from, DiskGeometry, QUEUE_SIZE_MAX, SECTOR_SIZE, SEG_MAX};
use dataplane::guest_ram::GuestRam;
use dataplane::split_ring::{avail_flags, avail_head, avail_ready, used_event, Chain};
use vm_memory::{
    GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};

use crate::input::{Enc, Input};

/// The two guest regions: (start, length). The hole between them is one page.
const REGIONS: [(u64, usize); 2] = [(0, 0x8000), (0x9000, 0x8000)];
/// Where the seeds put the descriptor table and the avail ring.
const SEED_TABLE: u64 = 0;
const SEED_AVAIL: u64 = 0x4000;
/// Disk size the parser checks ranges against: 1 GiB.
const CAPACITY_SECTORS: u64 = 1 << 21;

fn guest_addr_of(offset: usize) -> u64 {
    // Input bytes fill region 0, then region 1.
    if offset < REGIONS[0].1 {
        offset as u64
    } else {
        REGIONS[1].0 + (offset - REGIONS[0].1) as u64
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let size_log = inp.u8() % (QUEUE_SIZE_MAX.trailing_zeros() as u8 + 1);
    let size: u16 = 1 << size_log;
    let next_avail = inp.u16();
    let table = u64::from(inp.u32());
    let avail = u64::from(inp.u32());
    let gflags = inp.u8();
    let geom = DiskGeometry {
        capacity_sectors: CAPACITY_SECTORS,
        blk_size: if gflags & 4 != 0 { 4096 } else { 512 },
        read_only: gflags & 1 != 0,
        discard: gflags & 2 == 0,
        num_queues: 1,
        serial: serial_from("fuzz-disk"),
    };
    let ranges: Vec<(GuestAddress, usize)> =
        REGIONS.iter().map(|&(s, l)| (GuestAddress(s), l)).collect();
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&ranges) else {
        return;
    };
    let image = inp.rest();
    let total: usize = REGIONS.iter().map(|r| r.1).sum();
    for (i, piece) in image[..image.len().min(total)].chunks(256).enumerate() {
        let at = guest_addr_of(i * 256);
        // Chunks of 256 never straddle the regions (both are multiples of 256 long).
        if vm_memory::Bytes::write_slice(&mem, piece, GuestAddress(at)).is_err() {
            return;
        }
    }
    let hosts: Vec<(usize, usize)> = mem
        .iter()
        .filter_map(|r| {
            let h = r.get_host_address(MemoryRegionAddress(0)).ok()?;
            Some((h as usize, r.len() as usize))
        })
        .collect();
    let ram = GuestRam::new(&mem);
    let _ = avail_flags(&ram, avail);
    let _ = used_event(&ram, avail, size);
    let Some(ready) = avail_ready(&ram, avail, size, next_avail) else {
        return;
    };
    let mut scratch = chain_scratch();
    let mut req = ParsedRequest::default();
    let mut bounce = vec![0u8; dataplane::blk::SIZE_MAX_BYTES as usize];
    for i in 0..ready {
        let Some(head) = avail_head(&ram, avail, size, next_avail.wrapping_add(i)) else {
            return;
        };
        let chain = Chain::new(&ram, table, size, head);
        let res = parse_request_with(chain, &ram, &geom, &mut req, &mut scratch);
        if let Some(status) = req.status {
            assert!(
                ram.write(status.0, &[0]).is_some(),
                "status byte outside guest memory"
            );
        }
        if res.is_err() {
            continue;
        }
        check_request(&req, &geom, &hosts, &mut bounce);
    }
}

fn check_request(
    req: &ParsedRequest,
    geom: &DiskGeometry,
    hosts: &[(usize, usize)],
    bounce: &mut [u8],
) {
    assert!(req.status.is_some(), "accepted request without status");
    assert!(req.iov_count <= SEG_MAX as usize);
    let mut sum = 0usize;
    for iov in &req.iov[..req.iov_count] {
        let base = iov.iov_base as usize;
        let len = iov.iov_len;
        sum += len;
        assert!(
            hosts
                .iter()
                .any(|&(h, l)| base >= h && base.checked_add(len).is_some_and(|e| e <= h + l)),
            "iovec {base:#x}+{len} outside guest memory"
        );
        assert!(len <= bounce.len());
        // Touch the segment as the engine would (just checked to lie inside one mapping).
        match req.kind {
            RequestKind::Read | RequestKind::GetId => {
                // SAFETY: [base, base + len) lies inside a live mapping of `mem` (checked
                // above); guest memory is plain bytes, and this thread is its only user.
                unsafe { std::ptr::write_bytes(iov.iov_base.cast::<u8>(), 0xab, len) };
            }
            _ => {
                // SAFETY: as above; copied out, never referenced.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        iov.iov_base.cast::<u8>(),
                        bounce.as_mut_ptr(),
                        len,
                    )
                };
            }
        }
    }
    assert_eq!(
        sum, req.data_len as usize,
        "iovecs do not add up to data_len"
    );
    let end = req.sector.checked_add(req.num_sectors);
    match req.kind {
        RequestKind::Read | RequestKind::Write => {
            assert!(!(req.kind == RequestKind::Write && geom.read_only));
            assert_eq!(u64::from(req.data_len) % SECTOR_SIZE, 0);
            assert_eq!(req.num_sectors, u64::from(req.data_len) / SECTOR_SIZE);
            assert!(
                end.is_some_and(|e| e <= geom.capacity_sectors),
                "range past the disk"
            );
        }
        RequestKind::Discard | RequestKind::WriteZeroes { .. } => {
            assert!(geom.discard && !geom.read_only);
            assert!(
                end.is_some_and(|e| e <= geom.capacity_sectors),
                "range past the disk"
            );
        }
        RequestKind::Flush | RequestKind::GetId => {}
    }
}

/// One descriptor: (addr, len, flags, next).
type Desc = (u64, u32, u16, u16);

const F_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
const F_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
const F_INDIRECT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;

/// A seed: queue of 16 entries, table at 0, avail at 0x4000, `heads` published, the given
/// descriptors, and `blobs` written at their guest addresses (region 0 only).
fn seed(descs: &[Desc], heads: &[u16], blobs: &[(u64, &[u8])]) -> Vec<u8> {
    let mut mem = vec![0u8; 0x6000];
    for (i, d) in descs.iter().enumerate() {
        let o = i * 16;
        mem[o..o + 8].copy_from_slice(&d.0.to_le_bytes());
        mem[o + 8..o + 12].copy_from_slice(&d.1.to_le_bytes());
        mem[o + 12..o + 14].copy_from_slice(&d.2.to_le_bytes());
        mem[o + 14..o + 16].copy_from_slice(&d.3.to_le_bytes());
    }
    let a = SEED_AVAIL as usize;
    mem[a + 2..a + 4].copy_from_slice(&(heads.len() as u16).to_le_bytes());
    for (i, h) in heads.iter().enumerate() {
        mem[a + 4 + 2 * i..a + 6 + 2 * i].copy_from_slice(&h.to_le_bytes());
    }
    for (at, b) in blobs {
        let at = *at as usize;
        mem[at..at + b.len()].copy_from_slice(b);
    }
    // Trailing zeroes add nothing: the target zero-fills.
    while mem.last() == Some(&0) {
        mem.pop();
    }
    let mut e = Enc::new();
    e.u8(4)
        .u16(0)
        .u32(SEED_TABLE as u32)
        .u32(SEED_AVAIL as u32)
        .u8(0)
        .bytes(&mem);
    e.finish()
}

fn hdr(t: u32, sector: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(16);
    h.extend_from_slice(&t.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

/// A handful of valid chains: read, write across both regions, flush, get-id, discard,
/// write-zeroes, and an indirect read.
pub fn seeds() -> Vec<Vec<u8>> {
    use virtio_bindings::virtio_blk::*;
    const H: u64 = 0x5000;
    const DATA: u64 = 0x5100;
    let st = 0x5f00;
    let range = |sector: u64, n: u32, flags: u32| {
        let mut r = sector.to_le_bytes().to_vec();
        r.extend_from_slice(&n.to_le_bytes());
        r.extend_from_slice(&flags.to_le_bytes());
        r
    };
    let read = hdr(VIRTIO_BLK_T_IN, 8);
    let write = hdr(VIRTIO_BLK_T_OUT, 0);
    let flush = hdr(VIRTIO_BLK_T_FLUSH, 0);
    let getid = hdr(VIRTIO_BLK_T_GET_ID, 0);
    let discard = hdr(VIRTIO_BLK_T_DISCARD, 0);
    let wz = hdr(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let dr = range(64, 8, 0);
    let wzr = range(128, 16, 1);
    vec![
        seed(
            &[
                (H, 16, F_NEXT, 1),
                (DATA, 1024, F_NEXT | F_WRITE, 2),
                (st, 1, F_WRITE, 0),
            ],
            &[0],
            &[(H, &read)],
        ),
        seed(
            &[
                (H, 16, F_NEXT, 1),
                (DATA, 512, F_NEXT, 2),
                (0x9000, 512, F_NEXT, 3),
                (st, 1, F_WRITE, 0),
            ],
            &[0],
            &[(H, &write)],
        ),
        seed(
            &[
                (H, 16, F_NEXT, 1),
                (st, 1, F_WRITE, 0),
                (H + 16, 16, F_NEXT, 3),
                (st + 1, 21, F_WRITE, 0),
            ],
            &[0, 2],
            &[(H, &flush), (H + 16, &getid)],
        ),
        seed(
            &[
                (H, 16, F_NEXT, 1),
                (H + 32, 16, F_NEXT, 2),
                (st, 1, F_WRITE, 0),
                (H + 64, 16, F_NEXT, 4),
                (H + 96, 16, F_NEXT, 5),
                (st + 1, 1, F_WRITE, 0),
            ],
            &[0, 3],
            &[(H, &discard), (H + 32, &dr), (H + 64, &wz), (H + 96, &wzr)],
        ),
        // Indirect: head descriptor points at a table of three at 0x5800.
        {
            let mut t = Vec::new();
            for (a, l, f, n) in [
                (H, 16u32, F_NEXT, 1u16),
                (DATA, 512, F_NEXT | F_WRITE, 2),
                (st, 1, F_WRITE, 0),
            ] {
                t.extend_from_slice(&a.to_le_bytes());
                t.extend_from_slice(&l.to_le_bytes());
                t.extend_from_slice(&f.to_le_bytes());
                t.extend_from_slice(&n.to_le_bytes());
            }
            seed(
                &[(0x5800, 48, F_INDIRECT, 0)],
                &[0],
                &[(H, &read), (0x5800, &t)],
            )
        },
    ]
}
