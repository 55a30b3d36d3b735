//! The small datastore every vmfs-backed target starts from, built once per process: a
//! 64 MiB volume (vmfs's minimum) holding each kind of object the decoders meet — resident,
//! sub-block and file-block files, a thick disk, directories (one sealed into directory
//! blocks), a symlink, a hard link, a device node, extended attributes — plus a share
//! directory for the FUSE target and, outside it, a file of marker bytes no share may ever
//! hand out.

use std::sync::{Arc, OnceLock};

use vmfs::device::BlockDevice;
use vmfs::format::{
    lsn_of, magic, verify, Layout, Provisioning, VolumeHeader, MD_BLOCK, ROOT_INO, S_IFCHR,
    S_IFDIR, S_IFREG,
};
use vmfs::fs::{Datastore, MkfsOptions};
use vmfs::XattrSetMode;

use crate::cow_disk::CowDisk;

/// Volume size: vmfs's minimum.
pub const VOLUME_BYTES: u64 = 64 << 20;
/// The share the FUSE target serves (a path in the datastore).
pub const SHARE_DIR: &str = "shares/fuzz";
/// Marker filling `/secret`, outside the share: a guest that reads it got bytes it must not.
pub const SECRET: &[u8; 16] = b"STRATA-SECRET-42";
/// Fixed volume identity, so the base image (and thus every replay) is the same each run.
const UUID: [u8; 16] = *b"strata-fuzz-base";

/// The prepared datastore.
#[derive(Debug)]
pub struct Base {
    /// The image (unmounted, clean).
    pub image: Arc<Vec<u8>>,
    /// Its layout.
    pub layout: Layout,
    /// Every sealed metadata block: (block number, magic).
    pub metadata: Vec<(u64, u32)>,
    /// Byte ranges of the image that are not zero (4 KiB granules), to lay the image into a
    /// fresh sparse file quickly.
    pub nonzero: Vec<std::ops::Range<u64>>,
}

impl Base {
    /// A fresh copy-on-write device over the image.
    pub fn disk(&self) -> Arc<CowDisk> {
        Arc::new(CowDisk::new(self.image.clone()))
    }

    /// Index in [`Base::metadata`] of the `nth` sealed block with `magic` (0 if there is none):
    /// the block selector the seeds use.
    pub fn nth_of(&self, magic: u32, nth: usize) -> u16 {
        self.metadata
            .iter()
            .enumerate()
            .filter(|(_, &(_, m))| m == magic)
            .nth(nth)
            .and_then(|(i, _)| u16::try_from(i).ok())
            .unwrap_or(0)
    }
}

/// The base datastore (built on first use).
pub fn base() -> &'static Base {
    static BASE: OnceLock<Base> = OnceLock::new();
    BASE.get_or_init(build)
}

const MAGICS: [u32; 10] = [
    magic::VOLUME,
    magic::HEARTBEAT,
    magic::JSB,
    magic::JDESC,
    magic::JCOMMIT,
    magic::BITMAP,
    magic::INODE,
    magic::POINTER,
    magic::DIR,
    magic::XATTR,
];

fn build() -> Base {
    let disk = Arc::new(CowDisk::zeroed(VOLUME_BYTES));
    Datastore::mkfs(
        disk.clone(),
        &MkfsOptions { uuid: Some(UUID) },
        &mut |_, _| {},
    )
    .expect("mkfs of the fuzz base datastore");
    let ds = Datastore::mount(disk.clone()).expect("mount of the fuzz base datastore");
    populate(&ds).expect("populating the fuzz base datastore");
    ds.unmount().expect("unmount of the fuzz base datastore");
    drop(ds);
    let mut image = disk.image();
    let layout = VolumeHeader::decode(&image[..MD_BLOCK], 0, VOLUME_BYTES)
        .expect("base volume header")
        .layout;
    // The log past its superblock holds only transactions already replayed (unmount reset
    // it): zeroes instead, as mkfs leaves it, keep the image sparse and every run's journal
    // state the same.
    let j = layout.journal;
    image[((j.start + 1) * MD_BLOCK as u64) as usize
        ..((j.start + j.blocks) * MD_BLOCK as u64) as usize]
        .fill(0);
    let metadata = image
        .chunks(MD_BLOCK)
        .enumerate()
        .filter_map(|(i, b)| {
            let m = vmfs::format::get_u32(b, 0);
            (MAGICS.contains(&m) && verify(b, m, i as u64).is_ok()).then_some((i as u64, m))
        })
        .collect();
    let mut nonzero: Vec<std::ops::Range<u64>> = Vec::new();
    for (i, b) in image.chunks(MD_BLOCK).enumerate() {
        if b.iter().all(|&x| x == 0) {
            continue;
        }
        let (s, e) = ((i * MD_BLOCK) as u64, ((i + 1) * MD_BLOCK) as u64);
        match nonzero.last_mut() {
            Some(r) if r.end == s => r.end = e,
            _ => nonzero.push(s..e),
        }
    }
    Base {
        image: Arc::new(image),
        nonzero,
        layout,
        metadata,
    }
}

fn populate(ds: &Datastore) -> Result<(), vmfs::fs::FsError> {
    let mut share = ROOT_INO;
    for comp in SHARE_DIR.split('/') {
        share = ds
            .make_node(share, comp.as_bytes(), S_IFDIR | 0o755, 0, 0, 0)?
            .ino;
    }
    let reg = S_IFREG | 0o644;
    // Resident (in the inode), with extended attributes.
    let small = ds.make_node(share, b"small", reg, 0, 1000, 1000)?.ino;
    ds.write_at(small, 0, b"hello, fuzzer\n")?;
    ds.setxattr(small, b"user.note", b"a value", XattrSetMode::Any)?;
    // Sub-blocks.
    let sub = ds.make_node(share, b"sub", reg, 0, 0, 0)?.ino;
    ds.write_at(sub, 0, &[0x11; 100 << 10])?;
    let big = ds.make_node(share, b"big", reg, 0, 0, 0)?.ino;
    // Two file blocks, then the secret's block right after them on the device: a READ of
    // `big` that moves more than it should past its second block hands out the secret. Both
    // files are mostly zeroes, which the FUSE target's sparse copy of the image skips.
    let mut data = vec![0u8; 2 << 20];
    data[..4096].fill(0x22);
    data[1 << 20..(1 << 20) + 4096].fill(0x33);
    ds.write_at(big, 0, &data)?;
    let secret = ds
        .make_node(ROOT_INO, b"secret", S_IFREG | 0o600, 0, 0, 0)?
        .ino;
    let marked = SECRET.repeat((64 << 10) / SECRET.len());
    data[..marked.len()].copy_from_slice(&marked);
    data[marked.len()..].fill(0);
    ds.write_at(secret, 0, &data)?;
    // Directories: one with enough entries to be sealed into directory blocks.
    let d = ds.make_node(share, b"d", S_IFDIR | 0o755, 0, 0, 0)?.ino;
    for i in 0..40 {
        ds.make_node(d, format!("f{i:02}").as_bytes(), reg, 0, 0, 0)?;
    }
    ds.symlink_at(share, b"link", b"d/f01", 0, 0)?;
    ds.link_at(small, d, b"small-link")?;
    ds.make_node(share, b"null", S_IFCHR | 0o666, 0x103, 0, 0)?;
    // A virtual disk (thick, eager) in the root, as stratad makes them.
    ds.create_file("vm.img", Provisioning::ThickEager, 2 << 20, &mut |_, _| {})?;
    ds.sync()?;
    Ok(())
}

/// Reseals a metadata block after a mutation: magic as found (or `fallback` when the block
/// holds none), its own address, its LSN, a fresh checksum.
pub fn reseal(block: &mut [u8], at: u64, fallback: u32) {
    let m = vmfs::format::get_u32(block, 0);
    let m = if MAGICS.contains(&m) { m } else { fallback };
    let lsn = lsn_of(block);
    vmfs::format::seal(block, m, at, lsn);
}

/// Checks the datastore on `dev` and returns whether it is clean (`None`: unreadable).
pub fn fsck_clean(dev: &dyn BlockDevice) -> Option<bool> {
    vmfs::fsck::fsck(dev).ok().map(|r| r.clean())
}
