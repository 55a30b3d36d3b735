//! Administration views of a datastore (`info`, `ls`) and the parsers of their inputs (sizes,
//! provisioning modes): typed values with their JSON shapes. The RPC methods that serve them
//! (stratad's control socket, stratactl offline) live with the daemon, in `stratad-rpc`.

use serde::Serialize;

use crate::format::{Provisioning, FILE_BLOCK, SUB_BLOCK};
use crate::fs::{Datastore, FsError};

/// The volume and its space (`datastore_info`).
#[derive(Debug, Clone, Serialize)]
pub struct Info {
    /// Volume uuid, hex.
    pub uuid: String,
    /// Volume size.
    pub volume_bytes: u64,
    /// File blocks in all / free.
    pub file_blocks_total: u64,
    /// Free file blocks.
    pub file_blocks_free: u64,
    /// Sub-blocks in all.
    pub sub_blocks_total: u64,
    /// Free sub-blocks.
    pub sub_blocks_free: u64,
    /// Inodes in all.
    pub inodes_total: u64,
    /// Free inodes.
    pub inodes_free: u64,
    /// Bytes free for file data (file blocks).
    pub free_bytes: u64,
    /// Journal transactions since mount.
    pub journal_commits: u64,
    /// Journal bytes since mount.
    pub journal_bytes: u64,
    /// Logical transactions since mount.
    pub logical_transactions: u64,
}

/// One directory entry (`datastore_ls`).
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// Name.
    pub name: String,
    /// Inode.
    pub ino: u64,
    /// "file" or "dir".
    pub kind: &'static str,
    /// Size in bytes.
    pub size: u64,
    /// "thin", "thick" or "lazy-zeroed".
    pub provisioning: &'static str,
    /// Bytes of storage allocated.
    pub allocated_bytes: u64,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The name of a provisioning mode.
pub fn provisioning_name(p: Provisioning) -> &'static str {
    match p {
        Provisioning::Thin => "thin",
        Provisioning::ThickEager => "thick",
        Provisioning::ThickLazy => "lazy-zeroed",
    }
}

/// Parses "thin", "thick" (eager-zeroed) or "lazy-zeroed".
pub fn parse_provisioning(s: &str) -> Result<Provisioning, FsError> {
    match s {
        "thin" => Ok(Provisioning::Thin),
        "thick" | "eager-zeroed" => Ok(Provisioning::ThickEager),
        "lazy-zeroed" | "lazy" => Ok(Provisioning::ThickLazy),
        other => Err(FsError::Invalid(format!(
            "provisioning '{other}' (expected thin, thick or lazy-zeroed)"
        ))),
    }
}

/// `info`.
pub fn info(ds: &Datastore) -> Result<Info, FsError> {
    let st = ds.statfs()?;
    let l = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    Ok(Info {
        uuid: hex(&ds.uuid()?),
        volume_bytes: st.volume_bytes,
        file_blocks_total: st.fb_total,
        file_blocks_free: st.fb_free,
        sub_blocks_total: st.sb_total,
        sub_blocks_free: st.sb_free,
        inodes_total: st.fd_total,
        inodes_free: st.fd_free,
        free_bytes: st.fb_free * FILE_BLOCK,
        journal_commits: l(&ds.stats.commits),
        journal_bytes: l(&ds.stats.journal_bytes),
        logical_transactions: l(&ds.stats.logical_txns),
    })
}

/// `ls PATH`.
pub fn ls(ds: &Datastore, path: &str) -> Result<Vec<Entry>, FsError> {
    let mut out = Vec::new();
    for e in ds.readdir(path)? {
        let inode = ds.stat(e.ino)?;
        let unit = match inode.layout {
            crate::format::DataLayout::Resident => 0,
            crate::format::DataLayout::SubBlocks => SUB_BLOCK,
            crate::format::DataLayout::FileBlocks => FILE_BLOCK,
        };
        out.push(Entry {
            name: e.name,
            ino: e.ino,
            kind: if inode.is_dir() { "dir" } else { "file" },
            size: inode.size,
            provisioning: provisioning_name(inode.provisioning),
            allocated_bytes: inode.allocated * unit,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Parses a size with an optional K, M, G or T suffix (powers of 1024), or plain bytes; it must
/// be a positive multiple of 512.
pub fn parse_size(v: &str) -> Result<u64, &'static str> {
    let (num, shift) = match v.as_bytes().last() {
        Some(b'k' | b'K') => (&v[..v.len() - 1], 10),
        Some(b'm' | b'M') => (&v[..v.len() - 1], 20),
        Some(b'g' | b'G') => (&v[..v.len() - 1], 30),
        Some(b't' | b'T') => (&v[..v.len() - 1], 40),
        _ => (v, 0),
    };
    let n: u64 = num.parse().map_err(|_| "expected a number with K/M/G/T")?;
    let size = n.checked_mul(1u64 << shift).ok_or("too large")?;
    if size < 512 || !size.is_multiple_of(512) {
        return Err("must be a positive multiple of 512");
    }
    Ok(size)
}
