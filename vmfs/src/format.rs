//! On-disk format v1: constants, the metadata block header, the volume header and layout,
//! inodes (file descriptors), pointer blocks, directory entries and journal blocks.
//! Byte-level documentation: `vmfs/FORMAT.md`. Everything is little-endian; encoding and
//! decoding are pure functions over byte slices.

use thiserror::Error;

/// Metadata block size: every metadata structure is one 4 KiB block.
pub const MD_BLOCK: usize = 4096;
/// File block size (VMFS's 1 MiB block).
pub const FILE_BLOCK: u64 = 1 << 20;
/// Sub-block size (VMFS's 64 KiB small-file block).
pub const SUB_BLOCK: u64 = 64 << 10;
/// Metadata blocks per file block.
pub const MD_PER_FB: u64 = FILE_BLOCK / MD_BLOCK as u64;
/// Format version written by this code.
pub const FORMAT_VERSION: u16 = 1;
/// Heartbeat slots reserved for multi-host use.
pub const HB_SLOTS: u32 = 64;
/// Bytes of the common header at the start of every metadata block.
pub const MD_HEADER_BYTES: usize = 32;
/// Bitmap bits per bitmap block.
pub const BITS_PER_BITMAP_BLOCK: u64 = ((MD_BLOCK - MD_HEADER_BYTES) * 8) as u64;
/// Address slots in an inode (after the 256-byte inode header).
pub const INODE_ADDRS: usize = (MD_BLOCK - INODE_ADDR_OFFSET) / 8;
/// Where the address array (or resident data) starts in an inode block.
pub const INODE_ADDR_OFFSET: usize = 256;
/// Offset of the data-layout byte in an inode block ([`DataLayout`] as `u8`).
pub const INODE_LAYOUT_OFFSET: usize = 96;
/// Bytes of data an inode holds resident.
pub const RESIDENT_MAX: u64 = (MD_BLOCK - INODE_ADDR_OFFSET) as u64;
/// Sub-blocks a small file may use before it is converted to file blocks (1 MiB).
pub const SB_FILE_MAX_BLOCKS: u64 = FILE_BLOCK / SUB_BLOCK;
/// Entries in a pointer block.
pub const PB_ENTRIES: usize = (MD_BLOCK - MD_HEADER_BYTES) / 8;
/// Largest file: every inode slot points to a full pointer block of 1 MiB file blocks.
pub const FILE_BYTES_MAX: u64 = INODE_ADDRS as u64 * PB_ENTRIES as u64 * FILE_BLOCK;
/// To-be-zeroed flag in a pointer-block entry: the block is allocated but reads as zeroes.
pub const PB_TBZ: u64 = 1 << 63;
/// Bytes per directory entry.
pub const DIRENT_BYTES: usize = 272;
/// Longest name.
pub const NAME_MAX: usize = 255;
/// Inode number of the root directory.
pub const ROOT_INO: u64 = 1;
/// Journal blocks per transaction at most: one descriptor lists this many block images.
pub const TXN_BLOCKS_MAX: usize = (MD_BLOCK - JDESC_ENTRIES_OFFSET) / 16;
/// Offset of the entry list in a journal descriptor block.
pub const JDESC_ENTRIES_OFFSET: usize = 48;

/// Magic numbers per metadata kind (ASCII tags, little-endian u32).
pub mod magic {
    /// Volume header "SVOL".
    pub const VOLUME: u32 = u32::from_le_bytes(*b"SVOL");
    /// Heartbeat slot "SHBT".
    pub const HEARTBEAT: u32 = u32::from_le_bytes(*b"SHBT");
    /// Journal superblock "SJSB".
    pub const JSB: u32 = u32::from_le_bytes(*b"SJSB");
    /// Journal descriptor "SJDS".
    pub const JDESC: u32 = u32::from_le_bytes(*b"SJDS");
    /// Journal commit "SJCM".
    pub const JCOMMIT: u32 = u32::from_le_bytes(*b"SJCM");
    /// Allocation bitmap "SBMP".
    pub const BITMAP: u32 = u32::from_le_bytes(*b"SBMP");
    /// Inode / file descriptor "SFD_".
    pub const INODE: u32 = u32::from_le_bytes(*b"SFD_");
    /// Pointer block "SPTR".
    pub const POINTER: u32 = u32::from_le_bytes(*b"SPTR");
    /// Directory block "SDIR" (a 4 KiB piece of a sealed directory's file blocks).
    pub const DIR: u32 = u32::from_le_bytes(*b"SDIR");
    /// Extended-attribute block "SXAT" (lives in the pointer-block table).
    pub const XATTR: u32 = u32::from_le_bytes(*b"SXAT");
}

/// Errors decoding on-disk structures.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FormatError {
    /// Wrong magic number.
    #[error("block {block}: bad magic {found:#010x}, expected {expected:#010x}")]
    Magic {
        /// Block number.
        block: u64,
        /// Found.
        found: u32,
        /// Expected.
        expected: u32,
    },
    /// Checksum mismatch.
    #[error("block {0}: checksum mismatch")]
    Checksum(u64),
    /// The block says it lives elsewhere (misdirected write or read).
    #[error("block {block}: header says it is block {claimed} (misdirected I/O)")]
    Misplaced {
        /// Where it was read.
        block: u64,
        /// Where it claims to be.
        claimed: u64,
    },
    /// A version we do not understand.
    #[error("unsupported format version {0}")]
    Version(u16),
    /// Feature bits we do not understand.
    #[error("unsupported incompatible features {0:#x}")]
    Features(u64),
    /// Inconsistent geometry in the volume header.
    #[error("volume header: {0}")]
    Geometry(&'static str),
}

/// Reads a little-endian u64 at `off`.
pub fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Reads a little-endian u32 at `off`.
pub fn get_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

/// Reads a little-endian u16 at `off`.
pub fn get_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

/// Writes a little-endian u64 at `off`.
pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Writes a little-endian u32 at `off`.
pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// Writes a little-endian u16 at `off`.
pub fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

/// The common 32-byte header: magic u32 @0, version u16 @4, kind u16 @6 (reserved, 0),
/// self_block u64 @8, lsn u64 @16, crc32c u32 @24 (over the block with this field zero),
/// reserved u32 @28.
pub fn seal(block: &mut [u8], magic_v: u32, self_block: u64, lsn: u64) {
    assert_eq!(block.len(), MD_BLOCK);
    put_u32(block, 0, magic_v);
    put_u16(block, 4, FORMAT_VERSION);
    put_u16(block, 6, 0);
    put_u64(block, 8, self_block);
    put_u64(block, 16, lsn);
    put_u32(block, 24, 0);
    put_u32(block, 28, 0);
    let crc = crc32c::crc32c(block);
    put_u32(block, 24, crc);
}

/// Checks a metadata block's header: magic, checksum, self address and version.
pub fn verify(block: &[u8], magic_v: u32, at: u64) -> Result<(), FormatError> {
    assert_eq!(block.len(), MD_BLOCK);
    let found = get_u32(block, 0);
    if found != magic_v {
        return Err(FormatError::Magic {
            block: at,
            found,
            expected: magic_v,
        });
    }
    let stored = get_u32(block, 24);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&block[..24]), &[0u8; 4]);
    let crc = crc32c::crc32c_append(crc, &block[28..]);
    if crc != stored {
        return Err(FormatError::Checksum(at));
    }
    let claimed = get_u64(block, 8);
    if claimed != at {
        return Err(FormatError::Misplaced { block: at, claimed });
    }
    let v = get_u16(block, 4);
    if v != FORMAT_VERSION {
        return Err(FormatError::Version(v));
    }
    Ok(())
}

/// The LSN (journal sequence of the last transaction that wrote it) of a metadata block.
pub fn lsn_of(block: &[u8]) -> u64 {
    get_u64(block, 16)
}

/// A contiguous run of metadata blocks (or, for data regions, of resources).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Region {
    /// First 4 KiB block.
    pub start: u64,
    /// Number of 4 KiB blocks the region occupies.
    pub blocks: u64,
}

/// Where everything is; computed by [`Layout::compute`] at mkfs and stored in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Layout {
    /// Heartbeat slots (one block each).
    pub heartbeat: Region,
    /// The journal (block 0 of it is the journal superblock).
    pub journal: Region,
    /// Inode allocation bitmap.
    pub fd_bitmap: Region,
    /// Inode table: one block per inode.
    pub fd_table: Region,
    /// Pointer-block bitmap.
    pub pb_bitmap: Region,
    /// Pointer blocks.
    pub pb_table: Region,
    /// Sub-block bitmap.
    pub sb_bitmap: Region,
    /// Sub-blocks (64 KiB = 16 blocks each).
    pub sb_region: Region,
    /// File-block bitmap.
    pub fb_bitmap: Region,
    /// File blocks (1 MiB = 256 blocks each), 1 MiB aligned.
    pub fb_region: Region,
    /// Inode count.
    pub fd_count: u64,
    /// Pointer-block count.
    pub pb_count: u64,
    /// Sub-block count.
    pub sb_count: u64,
    /// File-block count.
    pub fb_count: u64,
}

fn bitmap_blocks(n: u64) -> u64 {
    n.div_ceil(BITS_PER_BITMAP_BLOCK)
}

/// Space per inode of new volumes: 256 KiB, since file-server shares hold many small files
/// (the inode table then takes 1/64 of the volume).
pub const BYTES_PER_INODE: u64 = 256 << 10;
/// Space per inode of volumes made before shares existed (virtual disks only); still mounted.
pub const BYTES_PER_INODE_V1: u64 = 4 << 20;

impl Layout {
    /// Lays out a volume of `volume_bytes` with [`BYTES_PER_INODE`]. Returns `None` if it is
    /// too small (< 64 MiB).
    pub fn compute(volume_bytes: u64) -> Option<Layout> {
        Self::compute_with(volume_bytes, BYTES_PER_INODE)
    }

    /// Whether `l` is what mkfs computes for `volume_bytes` at either inode density.
    pub fn is_valid_for(l: &Layout, volume_bytes: u64) -> bool {
        [BYTES_PER_INODE, BYTES_PER_INODE_V1]
            .iter()
            .any(|&d| Self::compute_with(volume_bytes, d).as_ref() == Some(l))
    }

    /// Lays out a volume of `volume_bytes` with one inode per `bytes_per_inode`.
    pub fn compute_with(volume_bytes: u64, bytes_per_inode: u64) -> Option<Layout> {
        /// Below this the fixed regions would leave almost no data space.
        const VOLUME_BYTES_MIN: u64 = 64 << 20;
        if volume_bytes < VOLUME_BYTES_MIN {
            return None;
        }
        let total_blocks = volume_bytes / MD_BLOCK as u64;
        let approx_fb = volume_bytes / FILE_BLOCK;
        // Journal: 1/64 of the volume, 4..64 MiB; a transaction (<= 255 blocks) is always
        // less than half of it.
        let journal_bytes = (volume_bytes / 64).clamp(4 << 20, 64 << 20);
        // One inode per `bytes_per_inode`, at least 256; at most 4 Mi (a 16 GiB table).
        let fd_count = (volume_bytes / bytes_per_inode.max(MD_BLOCK as u64)).clamp(256, 1 << 22);
        // Pointer blocks: enough to map every file block, plus one per 4 inodes of slack for
        // partly used pointer blocks.
        let pb_count = approx_fb / PB_ENTRIES as u64 + fd_count / 4 + 16;
        // Sub-blocks: a quarter of the file-block count (1.5 % of the space).
        let sb_count = (approx_fb / 4).max(64);
        let mut next = 256u64; // 1 MiB: headers and padding before.
        let mut take = |blocks: u64| {
            let r = Region {
                start: next,
                blocks,
            };
            next += blocks;
            r
        };
        let heartbeat = take(u64::from(HB_SLOTS));
        let journal = take(journal_bytes / MD_BLOCK as u64);
        let fd_bitmap = take(bitmap_blocks(fd_count));
        let fd_table = take(fd_count);
        let pb_bitmap = take(bitmap_blocks(pb_count));
        let pb_table = take(pb_count);
        let sb_bitmap = take(bitmap_blocks(sb_count));
        let sb_region = take(sb_count * (SUB_BLOCK / MD_BLOCK as u64));
        // The file-block bitmap size depends on the file-block count, which depends on where
        // the region starts: size the bitmap for the upper bound.
        let fb_bitmap = take(bitmap_blocks(approx_fb));
        let fb_start = next.div_ceil(MD_PER_FB) * MD_PER_FB;
        if fb_start >= total_blocks {
            return None;
        }
        let fb_count = (total_blocks - fb_start) / MD_PER_FB;
        if fb_count < 8 {
            return None;
        }
        Some(Layout {
            heartbeat,
            journal,
            fd_bitmap,
            fd_table,
            pb_bitmap,
            pb_table,
            sb_bitmap,
            sb_region,
            fb_bitmap,
            fb_region: Region {
                start: fb_start,
                blocks: fb_count * MD_PER_FB,
            },
            fd_count,
            pb_count,
            sb_count,
            fb_count,
        })
    }

    /// Byte offset of file block `i` (0-based). Callers check `i < fb_count`; an index that
    /// slipped past that saturates (never wraps round to a small, valid-looking offset), so
    /// the device refuses it as out of range.
    pub fn fb_offset(&self, i: u64) -> u64 {
        i.saturating_mul(MD_PER_FB)
            .saturating_add(self.fb_region.start)
            .saturating_mul(MD_BLOCK as u64)
    }

    /// Byte offset of sub-block `i` (0-based); saturates like [`Layout::fb_offset`].
    pub fn sb_offset(&self, i: u64) -> u64 {
        i.saturating_mul(SUB_BLOCK / MD_BLOCK as u64)
            .saturating_add(self.sb_region.start)
            .saturating_mul(MD_BLOCK as u64)
    }

    /// The magic a metadata block at `block` must carry, by the region it lies in; `None`
    /// outside the regions that hold journaled metadata (headers, heartbeat, journal,
    /// sub-block region). The file-block region holds sealed directory blocks. Journal
    /// replay writes only where this is `Some` (pointer-table blocks may also be xattr
    /// blocks: see [`Layout::accepts_home`]).
    pub fn home_magic(&self, block: u64) -> Option<u32> {
        let within = |r: Region| block >= r.start && block - r.start < r.blocks;
        if within(self.fd_table) {
            Some(magic::INODE)
        } else if within(self.pb_table) {
            Some(magic::POINTER)
        } else if within(self.fb_region) {
            Some(magic::DIR)
        } else if within(self.fd_bitmap)
            || within(self.pb_bitmap)
            || within(self.sb_bitmap)
            || within(self.fb_bitmap)
        {
            Some(magic::BITMAP)
        } else {
            None
        }
    }

    /// True when a block image of magic `m` may live at `block` (journal replay's check).
    pub fn accepts_home(&self, block: u64, m: u32) -> bool {
        match self.home_magic(block) {
            Some(magic::POINTER) => m == magic::POINTER || m == magic::XATTR,
            Some(want) => m == want,
            None => false,
        }
    }

    /// Metadata block of inode `ino` (1-based; 0 is never used). Saturates on a wild number
    /// (which then lies in no region and is refused as not metadata).
    pub fn inode_block(&self, ino: u64) -> u64 {
        self.fd_table.start.saturating_add(ino)
    }

    /// Metadata block of pointer block `i` (0-based); saturates like [`Layout::inode_block`].
    pub fn pb_block(&self, i: u64) -> u64 {
        self.pb_table.start.saturating_add(i)
    }
}

/// Volume header fields beyond the common header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeHeader {
    /// Volume identity.
    pub uuid: [u8; 16],
    /// Compatible features (ignored if unknown).
    pub features_compat: u64,
    /// Incompatible features (refuse to mount if unknown).
    pub features_incompat: u64,
    /// Read-only-compatible features (mount read-only if unknown).
    pub features_ro_compat: u64,
    /// Volume size in bytes.
    pub volume_bytes: u64,
    /// Regions.
    pub layout: Layout,
    /// Incremented on every mount.
    pub generation: u64,
}

/// Region table offsets in the volume header, in order.
const VH_REGIONS_OFFSET: usize = 96;

impl VolumeHeader {
    /// Encodes into a sealed block for `at` (0 = primary, 1 = backup).
    pub fn encode(&self, at: u64) -> Vec<u8> {
        let mut b = vec![0u8; MD_BLOCK];
        b[32..48].copy_from_slice(&self.uuid);
        put_u64(&mut b, 48, self.features_compat);
        put_u64(&mut b, 56, self.features_incompat);
        put_u64(&mut b, 64, self.features_ro_compat);
        put_u64(&mut b, 72, self.volume_bytes);
        put_u32(&mut b, 80, MD_BLOCK as u32);
        put_u32(&mut b, 84, FILE_BLOCK as u32);
        put_u32(&mut b, 88, SUB_BLOCK as u32);
        put_u32(&mut b, 92, HB_SLOTS);
        let l = &self.layout;
        let regions = [
            l.heartbeat,
            l.journal,
            l.fd_bitmap,
            l.fd_table,
            l.pb_bitmap,
            l.pb_table,
            l.sb_bitmap,
            l.sb_region,
            l.fb_bitmap,
            l.fb_region,
        ];
        for (i, r) in regions.iter().enumerate() {
            put_u64(&mut b, VH_REGIONS_OFFSET + i * 16, r.start);
            put_u64(&mut b, VH_REGIONS_OFFSET + i * 16 + 8, r.blocks);
        }
        put_u64(&mut b, 256, l.fd_count);
        put_u64(&mut b, 264, l.pb_count);
        put_u64(&mut b, 272, l.sb_count);
        put_u64(&mut b, 280, l.fb_count);
        put_u64(&mut b, 288, self.generation);
        put_u64(&mut b, 296, ROOT_INO);
        seal(&mut b, magic::VOLUME, at, 0);
        b
    }

    /// Decodes and validates a header block read from `at`, for a device of `device_bytes`.
    pub fn decode(b: &[u8], at: u64, device_bytes: u64) -> Result<Self, FormatError> {
        verify(b, magic::VOLUME, at)?;
        let incompat = get_u64(b, 56);
        if incompat != 0 {
            return Err(FormatError::Features(incompat));
        }
        if get_u32(b, 80) as usize != MD_BLOCK
            || u64::from(get_u32(b, 84)) != FILE_BLOCK
            || u64::from(get_u32(b, 88)) != SUB_BLOCK
        {
            return Err(FormatError::Geometry("unsupported block sizes"));
        }
        let volume_bytes = get_u64(b, 72);
        if volume_bytes > device_bytes {
            return Err(FormatError::Geometry(
                "volume is larger than the device (truncated image?)",
            ));
        }
        let r = |i: usize| Region {
            start: get_u64(b, VH_REGIONS_OFFSET + i * 16),
            blocks: get_u64(b, VH_REGIONS_OFFSET + i * 16 + 8),
        };
        let layout = Layout {
            heartbeat: r(0),
            journal: r(1),
            fd_bitmap: r(2),
            fd_table: r(3),
            pb_bitmap: r(4),
            pb_table: r(5),
            sb_bitmap: r(6),
            sb_region: r(7),
            fb_bitmap: r(8),
            fb_region: r(9),
            fd_count: get_u64(b, 256),
            pb_count: get_u64(b, 264),
            sb_count: get_u64(b, 272),
            fb_count: get_u64(b, 280),
        };
        // The layout must be exactly what mkfs computes for this size: any other value is
        // corruption that the checksum happened not to catch.
        if !Layout::is_valid_for(&layout, volume_bytes) {
            return Err(FormatError::Geometry(
                "region table does not match the volume size",
            ));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[32..48]);
        Ok(VolumeHeader {
            uuid,
            features_compat: get_u64(b, 48),
            features_incompat: incompat,
            features_ro_compat: get_u64(b, 64),
            volume_bytes,
            layout,
            generation: get_u64(b, 288),
        })
    }
}

/// How a file's bytes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataLayout {
    /// In the inode itself (up to [`RESIDENT_MAX`] bytes).
    Resident = 0,
    /// Inode addresses are sub-block numbers + 1 (up to 1 MiB).
    SubBlocks = 1,
    /// Inode addresses are pointer-block numbers + 1; entries are file-block numbers + 1.
    FileBlocks = 2,
}

impl DataLayout {
    /// The smallest layout that holds `size` bytes (vmfs converts resident → sub-blocks →
    /// file blocks as a file grows, never back).
    pub fn for_size(size: u64) -> DataLayout {
        if size <= RESIDENT_MAX {
            DataLayout::Resident
        } else if size <= SB_FILE_MAX_BLOCKS * SUB_BLOCK {
            DataLayout::SubBlocks
        } else {
            DataLayout::FileBlocks
        }
    }
}

/// How a file's space is provisioned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provisioning {
    /// Blocks allocated on first write.
    Thin = 0,
    /// All blocks allocated and zeroed at creation.
    ThickEager = 1,
    /// All blocks allocated at creation, marked to-be-zeroed.
    ThickLazy = 2,
}

/// File type bits of `mode` (POSIX values).
pub const S_IFMT: u32 = 0o170000;
/// Regular file.
pub const S_IFREG: u32 = 0o100000;
/// Directory.
pub const S_IFDIR: u32 = 0o040000;
/// Symbolic link.
pub const S_IFLNK: u32 = 0o120000;
/// Character device.
pub const S_IFCHR: u32 = 0o020000;
/// Block device.
pub const S_IFBLK: u32 = 0o060000;
/// FIFO (named pipe).
pub const S_IFIFO: u32 = 0o010000;
/// Unix-domain socket.
pub const S_IFSOCK: u32 = 0o140000;

/// Directory-entry `ftype` of a mode's type bits (documented in FORMAT.md §10); 0 for an
/// unknown type.
pub fn ftype_of(mode: u32) -> u8 {
    match mode & S_IFMT {
        S_IFREG => 1,
        S_IFDIR => 2,
        S_IFLNK => 3,
        S_IFCHR => 4,
        S_IFBLK => 5,
        S_IFIFO => 6,
        S_IFSOCK => 7,
        _ => 0,
    }
}

/// An inode (file descriptor) without its address array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    /// Inode number.
    pub ino: u64,
    /// Bumped each time the slot is reused, so stale directory entries are detectable.
    pub generation: u32,
    /// POSIX mode (type and permission bits).
    pub mode: u32,
    /// Hard links.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Provisioning.
    pub provisioning: Provisioning,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
    /// Change time, ns since the epoch.
    pub ctime_ns: i64,
    /// Data layout.
    pub layout: DataLayout,
    /// Parent directory (for fsck and `..`).
    pub parent: u64,
    /// Blocks of data allocated (file blocks, sub-blocks) — checked by fsck.
    pub allocated: u64,
    /// Access time, ns since the epoch.
    pub atime_ns: i64,
    /// Device number of character and block devices (0 otherwise).
    pub rdev: u32,
    /// Bumped on every change of mode, uid, gid or any extended attribute, so a permission
    /// cache can key its entries on (ino, attr_gen).
    pub attr_gen: u64,
    /// Pointer-block index + 1 of the inode's extended-attribute block; 0 = none.
    pub xattr_block: u64,
}

impl Inode {
    /// True for directories.
    pub fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }

    /// Writes the fields into an inode block (the address area is left alone).
    pub fn encode_into(&self, b: &mut [u8]) {
        put_u64(b, 32, self.ino);
        put_u32(b, 40, self.generation);
        put_u32(b, 44, self.mode);
        put_u32(b, 48, self.nlink);
        put_u32(b, 52, self.uid);
        put_u32(b, 56, self.gid);
        put_u32(b, 60, self.provisioning as u32);
        put_u64(b, 64, self.size);
        put_u64(b, 72, self.mtime_ns as u64);
        put_u64(b, 80, self.ctime_ns as u64);
        b[INODE_LAYOUT_OFFSET] = self.layout as u8;
        put_u64(b, 104, self.parent);
        put_u64(b, 112, self.allocated);
        put_u64(b, 120, self.atime_ns as u64);
        put_u64(b, 128, self.attr_gen);
        put_u64(b, 136, self.xattr_block);
        put_u32(b, 144, self.rdev);
    }

    /// Reads the fields from a verified inode block.
    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        let provisioning = match get_u32(b, 60) {
            0 => Provisioning::Thin,
            1 => Provisioning::ThickEager,
            2 => Provisioning::ThickLazy,
            _ => return Err(FormatError::Geometry("inode: bad provisioning")),
        };
        let layout = match b[INODE_LAYOUT_OFFSET] {
            0 => DataLayout::Resident,
            1 => DataLayout::SubBlocks,
            2 => DataLayout::FileBlocks,
            _ => return Err(FormatError::Geometry("inode: bad data layout")),
        };
        // The size must fit the layout: the resident and sub-block paths index the inode's
        // address area (or its 16 sub-block slots) by offsets below the size.
        let size = get_u64(b, 64);
        let size_max = match layout {
            DataLayout::Resident => RESIDENT_MAX,
            DataLayout::SubBlocks => SB_FILE_MAX_BLOCKS * SUB_BLOCK,
            DataLayout::FileBlocks => FILE_BYTES_MAX,
        };
        if size > size_max {
            return Err(FormatError::Geometry(
                "inode: size too large for its layout",
            ));
        }
        Ok(Inode {
            ino: get_u64(b, 32),
            generation: get_u32(b, 40),
            mode: get_u32(b, 44),
            nlink: get_u32(b, 48),
            uid: get_u32(b, 52),
            gid: get_u32(b, 56),
            provisioning,
            size,
            mtime_ns: get_u64(b, 72) as i64,
            ctime_ns: get_u64(b, 80) as i64,
            layout,
            parent: get_u64(b, 104),
            allocated: get_u64(b, 112),
            atime_ns: get_u64(b, 120) as i64,
            attr_gen: get_u64(b, 128),
            xattr_block: get_u64(b, 136),
            rdev: get_u32(b, 144),
        })
    }
}

/// Address slot `i` of an inode block.
pub fn inode_addr(b: &[u8], i: usize) -> u64 {
    get_u64(b, INODE_ADDR_OFFSET + i * 8)
}

/// Sets address slot `i` of an inode block.
pub fn set_inode_addr(b: &mut [u8], i: usize, v: u64) {
    put_u64(b, INODE_ADDR_OFFSET + i * 8, v)
}

/// Entry `i` of a pointer block.
pub fn pb_entry(b: &[u8], i: usize) -> u64 {
    get_u64(b, MD_HEADER_BYTES + i * 8)
}

/// Sets entry `i` of a pointer block.
pub fn set_pb_entry(b: &mut [u8], i: usize, v: u64) {
    put_u64(b, MD_HEADER_BYTES + i * 8, v)
}

/// Bit `i` of a bitmap block.
pub fn bit(b: &[u8], i: u64) -> bool {
    let byte = MD_HEADER_BYTES + (i / 8) as usize;
    b[byte] & (1 << (i % 8)) != 0
}

/// Sets or clears bit `i` of a bitmap block.
pub fn set_bit(b: &mut [u8], i: u64, v: bool) {
    let byte = MD_HEADER_BYTES + (i / 8) as usize;
    if v {
        b[byte] |= 1 << (i % 8);
    } else {
        b[byte] &= !(1 << (i % 8));
    }
}

/// A directory entry: ino u64 @0 (0 = free), generation u32 @8, name_len u16 @12, ftype u8 @14
/// (1 file, 2 directory), reserved u8 @15, name bytes @16..16+255, zero padded to 272.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Target inode.
    pub ino: u64,
    /// Target generation.
    pub generation: u32,
    /// Type of the target ([`ftype_of`]): 1 file, 2 directory, 3 symlink, 4 char device,
    /// 5 block device, 6 FIFO, 7 socket.
    pub ftype: u8,
    /// Name.
    pub name: String,
}

impl DirEntry {
    /// Encodes into 272 bytes.
    pub fn encode(&self, out: &mut [u8]) {
        assert_eq!(out.len(), DIRENT_BYTES);
        assert!(self.name.len() <= NAME_MAX);
        out.fill(0);
        put_u64(out, 0, self.ino);
        put_u32(out, 8, self.generation);
        put_u16(out, 12, self.name.len() as u16);
        out[14] = self.ftype;
        out[16..16 + self.name.len()].copy_from_slice(self.name.as_bytes());
    }

    /// Decodes; `None` for a free slot, `Err` for garbage.
    pub fn decode(b: &[u8]) -> Result<Option<Self>, FormatError> {
        let ino = get_u64(b, 0);
        if ino == 0 {
            return Ok(None);
        }
        let len = usize::from(get_u16(b, 12));
        if len == 0 || len > NAME_MAX {
            return Err(FormatError::Geometry("directory entry: bad name length"));
        }
        let name = std::str::from_utf8(&b[16..16 + len])
            .map_err(|_| FormatError::Geometry("directory entry: name not UTF-8"))?;
        Ok(Some(DirEntry {
            ino,
            generation: get_u32(b, 8),
            ftype: b[14],
            name: name.to_string(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn seal_verify_detects_damage() {
        let mut b = vec![7u8; MD_BLOCK];
        seal(&mut b, magic::INODE, 42, 9);
        verify(&b, magic::INODE, 42).unwrap();
        assert_eq!(lsn_of(&b), 9);
        assert!(matches!(
            verify(&b, magic::INODE, 43),
            Err(FormatError::Misplaced { .. })
        ));
        assert!(matches!(
            verify(&b, magic::POINTER, 42),
            Err(FormatError::Magic { .. })
        ));
        b[1000] ^= 1;
        assert_eq!(verify(&b, magic::INODE, 42), Err(FormatError::Checksum(42)));
    }

    #[test]
    fn layout_fits_and_header_round_trips() {
        for size in [64u64 << 20, 100 << 20, 4 << 30, (1 << 40) + 12345] {
            let l = Layout::compute(size).unwrap();
            assert!(l.fb_offset(l.fb_count) <= size);
            assert_eq!(l.fb_region.start % MD_PER_FB, 0);
            assert!(l.journal.blocks as usize > 2 * (TXN_BLOCKS_MAX + 2));
            assert!(l.fb_bitmap.blocks * BITS_PER_BITMAP_BLOCK >= l.fb_count);
            let vh = VolumeHeader {
                uuid: [3; 16],
                features_compat: 0,
                features_incompat: 0,
                features_ro_compat: 0,
                volume_bytes: size,
                layout: l,
                generation: 5,
            };
            let b = vh.encode(1);
            assert_eq!(VolumeHeader::decode(&b, 1, size).unwrap(), vh);
            assert!(VolumeHeader::decode(&b, 1, size - 1).is_err());
        }
        assert!(Layout::compute(1 << 20).is_none());
    }

    proptest! {
        /// Random blocks are sealed (and a valid header and inode mutated, then re-sealed)
        /// before decoding, so the checksum passes and the decoders' own checks are reached.
        #[test]
        fn decoders_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), MD_BLOCK),
            muts in proptest::collection::vec((MD_HEADER_BYTES..MD_BLOCK, any::<u8>()), 1..12),
        ) {
            let mut vb = bytes.clone();
            seal(&mut vb, magic::VOLUME, 0, 0);
            prop_assert!(verify(&vb, magic::VOLUME, 0).is_ok());
            let _ = VolumeHeader::decode(&vb, 0, u64::MAX);
            let size = 64u64 << 20;
            let vh = VolumeHeader {
                uuid: [7; 16],
                features_compat: 0,
                features_incompat: 0,
                features_ro_compat: 0,
                volume_bytes: size,
                layout: Layout::compute(size).unwrap(),
                generation: 1,
            };
            let mut hb = vh.encode(0);
            for &(i, v) in &muts {
                hb[i] = v;
            }
            seal(&mut hb, magic::VOLUME, 0, 0);
            if let Ok(h) = VolumeHeader::decode(&hb, 0, u64::MAX) {
                prop_assert!(Layout::is_valid_for(&h.layout, h.volume_bytes));
            }
            let mut ib = bytes.clone();
            seal(&mut ib, magic::INODE, 9, 3);
            prop_assert!(verify(&ib, magic::INODE, 9).is_ok());
            let mut ib2 = vec![0u8; MD_BLOCK];
            Inode {
                ino: 9, generation: 1, mode: S_IFREG | 0o644, nlink: 1, uid: 0, gid: 0,
                provisioning: Provisioning::Thin, size: 100, mtime_ns: 0, ctime_ns: 0,
                layout: DataLayout::Resident, parent: 1, allocated: 0, atime_ns: 0, rdev: 0,
                attr_gen: 1, xattr_block: 0,
            }
            .encode_into(&mut ib2);
            for &(i, v) in &muts {
                ib2[i.min(INODE_ADDR_OFFSET - 1)] = v;
            }
            seal(&mut ib2, magic::INODE, 9, 3);
            for b in [&ib, &ib2] {
                if let Ok(i) = Inode::decode(b) {
                    let max = match i.layout {
                        DataLayout::Resident => RESIDENT_MAX,
                        DataLayout::SubBlocks => SB_FILE_MAX_BLOCKS * SUB_BLOCK,
                        DataLayout::FileBlocks => FILE_BYTES_MAX,
                    };
                    prop_assert!(i.size <= max);
                }
            }
            let _ = DirEntry::decode(&bytes[..DIRENT_BYTES]);
            let mut jb = bytes.clone();
            seal(&mut jb, magic::JDESC, 0, 1);
            prop_assert!(verify(&jb, magic::JDESC, 0).is_ok());
        }

        #[test]
        fn dirent_round_trip(ino in 1u64.., generation: u32, name in "[a-zA-Z0-9._-]{1,255}") {
            let e = DirEntry { ino, generation, ftype: 1, name };
            let mut b = [0u8; DIRENT_BYTES];
            e.encode(&mut b);
            prop_assert_eq!(DirEntry::decode(&b).unwrap(), Some(e));
        }
    }
}
