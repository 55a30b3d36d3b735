//! virtio-blk device model: feature bits, limits, config space and request parsing.
//!
//! Parsing ([`request`]) is a pure function of a descriptor chain, guest memory and the disk's
//! geometry; execution lives in [`crate::reactor`] and the backends.

pub mod request;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// virtio-blk addresses the disk in 512-byte sectors, whatever the logical block size.
pub const SECTOR_SHIFT: u32 = 9;
/// Bytes per virtio-blk sector.
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;

/// Data descriptors per request (config `seg_max`). 126 is what QEMU offers (128 descriptors
/// minus header and status); it bounds the per-slot iovec array, so no request allocates.
pub const SEG_MAX: u32 = 126;
/// Largest single data descriptor (config `size_max`): 1 MiB keeps one request's data within
/// what io_uring handles in one SQE without splitting, and matches Linux's max segment size.
pub const SIZE_MAX_BYTES: u32 = 1 << 20;
/// Discard and write-zeroes: one range per request (like QEMU), so parsing stays bounded.
pub const MAX_DISCARD_SEG: u32 = 1;
/// Sectors per discard/write-zeroes request: 32768 sectors = 16 MiB, QEMU's limit.
pub const MAX_DISCARD_SECTORS: u32 = 32768;
/// Largest virtqueue we accept; bounds the per-queue request slab (one slot per descriptor head).
pub const QUEUE_SIZE_MAX: u16 = 1024;
/// Queues per device; bounded so per-device memory is bounded (each queue has a slab).
pub const NUM_QUEUES_MAX: u16 = 16;
/// Length of the GET_ID serial string.
pub const ID_BYTES: usize = 20;

/// Size of the config space we describe (through `write_zeroes_may_unmap` and padding).
pub const CONFIG_SPACE_BYTES: usize = 60;

/// Static description of an exported disk, as the guest sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskGeometry {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Logical block size in bytes (config `blk_size`).
    pub blk_size: u32,
    /// Whether the export refuses writes (VIRTIO_BLK_F_RO).
    pub read_only: bool,
    /// Whether DISCARD and WRITE_ZEROES are offered.
    pub discard: bool,
    /// Number of request queues.
    pub num_queues: u16,
    /// Serial number returned by GET_ID (NUL-padded).
    pub serial: [u8; ID_BYTES],
}

impl DiskGeometry {
    /// The virtio feature bits the device offers (without VHOST_USER_F_PROTOCOL_FEATURES).
    pub fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1u64 << VIRTIO_BLK_F_SIZE_MAX)
            | (1u64 << VIRTIO_BLK_F_SEG_MAX)
            | (1u64 << VIRTIO_BLK_F_BLK_SIZE)
            | (1u64 << VIRTIO_BLK_F_FLUSH)
            | (1u64 << VIRTIO_BLK_F_MQ);
        if self.read_only {
            f |= 1u64 << VIRTIO_BLK_F_RO;
        }
        if self.discard && !self.read_only {
            f |= (1u64 << VIRTIO_BLK_F_DISCARD) | (1u64 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    /// The config space, little-endian, laid out as `struct virtio_blk_config`:
    ///
    /// | offset | size | field |
    /// |---|---|---|
    /// | 0 | 8 | capacity (sectors) |
    /// | 8 | 4 | size_max |
    /// | 12 | 4 | seg_max |
    /// | 16 | 4 | geometry (cylinders u16, heads u8, sectors u8): 0, not offered |
    /// | 20 | 4 | blk_size |
    /// | 24 | 1 | physical_block_exp (0) |
    /// | 25 | 1 | alignment_offset (0) |
    /// | 26 | 2 | min_io_size (blocks, 1) |
    /// | 28 | 4 | opt_io_size (0) |
    /// | 32 | 1 | writeback (0; CONFIG_WCE not offered) |
    /// | 33 | 1 | unused |
    /// | 34 | 2 | num_queues |
    /// | 36 | 4 | max_discard_sectors |
    /// | 40 | 4 | max_discard_seg |
    /// | 44 | 4 | discard_sector_alignment (sectors per logical block) |
    /// | 48 | 4 | max_write_zeroes_sectors |
    /// | 52 | 4 | max_write_zeroes_seg |
    /// | 56 | 1 | write_zeroes_may_unmap (1) |
    /// | 57 | 3 | unused |
    pub fn config_space(&self) -> [u8; CONFIG_SPACE_BYTES] {
        let mut c = [0u8; CONFIG_SPACE_BYTES];
        c[0..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX_BYTES.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&self.blk_size.to_le_bytes());
        c[26..28].copy_from_slice(&1u16.to_le_bytes());
        c[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        let align_sectors = self.blk_size >> SECTOR_SHIFT;
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        c[44..48].copy_from_slice(&align_sectors.to_le_bytes());
        c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        c[56] = 1;
        c
    }

    /// Reads `size` bytes of config space from `offset`; bytes past our layout read as zero
    /// (the frontend may ask for a larger, newer `struct virtio_blk_config`).
    pub fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self.config_space();
        let mut out = vec![0u8; size as usize];
        for (i, b) in out.iter_mut().enumerate() {
            let at = offset as usize + i;
            if at < space.len() {
                *b = space[at];
            }
        }
        out
    }
}

/// A serial number of at most [`ID_BYTES`] bytes, NUL-padded.
pub fn serial_from(name: &str) -> [u8; ID_BYTES] {
    let mut s = [0u8; ID_BYTES];
    let bytes = name.as_bytes();
    let n = bytes.len().min(ID_BYTES);
    s[..n].copy_from_slice(&bytes[..n]);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geom() -> DiskGeometry {
        DiskGeometry {
            capacity_sectors: 2048,
            blk_size: 4096,
            read_only: false,
            discard: true,
            num_queues: 2,
            serial: serial_from("disk0"),
        }
    }

    #[test]
    fn config_space_layout() {
        let c = geom().config_space();
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), SEG_MAX);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 8);
        assert_eq!(c[56], 1);
    }

    #[test]
    fn read_config_pads_and_offsets() {
        let g = geom();
        let v = g.read_config(34, 2);
        assert_eq!(v, vec![2, 0]);
        let v = g.read_config(0, 100);
        assert_eq!(v.len(), 100);
        assert!(v[60..].iter().all(|&b| b == 0));
        assert!(g.read_config(4000, 8).iter().all(|&b| b == 0));
    }

    #[test]
    fn read_only_hides_discard() {
        let mut g = geom();
        g.read_only = true;
        let f = g.features();
        assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    }
}
