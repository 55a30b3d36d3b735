//! The path API (admin side: stratactl, stratad's disk files): a thin resolver over the
//! inode namespace. A path becomes (parent inode, name) and the namespace operation does the
//! rest; errors name the path.

use crate::error::FsError;
use crate::format::*;
use crate::fs::Datastore;
use crate::ns::{Namespace, RenameFlags};
use crate::txn::{Dev, FsStats};

/// Splits a datastore path ("/a/b" or "a/b") into its validated components.
fn split_path(path: &str) -> Result<Vec<&str>, FsError> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    for p in &parts {
        if *p == "." || *p == ".." || p.len() > NAME_MAX || p.contains('\0') {
            return Err(FsError::Invalid(format!("bad path component '{p}'")));
        }
    }
    Ok(parts)
}

/// Names the path instead of the last component in an error of a path operation.
fn at_path(e: FsError, path: &str) -> FsError {
    match e {
        FsError::NotFound(_) => FsError::NotFound(path.into()),
        FsError::Exists(_) => FsError::Exists(path.into()),
        FsError::NotDir(_) => FsError::NotDir(path.into()),
        FsError::IsDir(_) => FsError::IsDir(path.into()),
        FsError::NotEmpty(_) => FsError::NotEmpty(path.into()),
        FsError::Busy(_) => FsError::Busy(path.into()),
        e => e,
    }
}

/// The inode a path names.
fn resolve(g: &mut Namespace, dev: &Dev, path: &str) -> Result<u64, FsError> {
    let mut ino = ROOT_INO;
    for part in split_path(path)? {
        if !g.get_inode(dev, ino)?.is_dir() {
            return Err(FsError::NotDir(path.into()));
        }
        let (_, e) = g
            .dir_find(dev, ino, part)?
            .ok_or_else(|| FsError::NotFound(path.into()))?;
        ino = e.ino;
    }
    Ok(ino)
}

/// The directory holding the last component of a path, and that component.
fn resolve_parent<'p>(
    g: &mut Namespace,
    dev: &Dev,
    path: &'p str,
) -> Result<(u64, &'p str), FsError> {
    let parts = split_path(path)?;
    let (name, dirs) = parts
        .split_last()
        .ok_or_else(|| FsError::Invalid("empty path".into()))?;
    let mut ino = ROOT_INO;
    for d in dirs {
        let (_, e) = g
            .dir_find(dev, ino, d)?
            .ok_or_else(|| FsError::NotFound(path.into()))?;
        if e.ftype != ftype_of(S_IFDIR) {
            return Err(FsError::NotDir(path.into()));
        }
        ino = e.ino;
    }
    Ok((ino, name))
}

/// Creates a file or directory owned by root at `path`.
fn create(
    g: &mut Namespace,
    dev: &Dev,
    stats: &FsStats,
    path: &str,
    mode: u32,
    prov: Provisioning,
) -> Result<u64, FsError> {
    let (parent, name) = resolve_parent(g, dev, path)?;
    g.create(
        dev,
        stats,
        parent,
        name.as_bytes(),
        mode,
        0,
        0,
        0,
        prov,
        &[],
    )
    .map(|i| i.ino)
    .map_err(|e| at_path(e, path))
}

/// Removes a file or an empty directory. Unlike `unlink_at`, a file in use (a disk being
/// served, an open handle) is refused with [`FsError::Busy`] instead of becoming an
/// orphan: the admin side must not pull a served disk's name.
fn remove(
    g: &mut Namespace,
    dev: &Dev,
    stats: &FsStats,
    path: &str,
    want_dir: bool,
) -> Result<(), FsError> {
    let (parent, name) = resolve_parent(g, dev, path)?;
    let (_, e) = g
        .dir_find(dev, parent, name)?
        .ok_or_else(|| FsError::NotFound(path.into()))?;
    let inode = g.get_inode(dev, e.ino)?;
    if inode.is_dir() != want_dir {
        return Err(if want_dir {
            FsError::NotDir(path.into())
        } else {
            FsError::IsDir(path.into())
        });
    }
    if want_dir && !g.dir_is_empty(dev, e.ino)? {
        return Err(FsError::NotEmpty(path.into()));
    }
    if g.in_use(e.ino) {
        return Err(FsError::Busy(path.into()));
    }
    g.remove(dev, stats, parent, name.as_bytes(), want_dir)
        .map_err(|e| at_path(e, path))
}

/// Renames `from` to `to`, replacing a file or empty directory there (refused with
/// [`FsError::Busy`] while the replaced file is in use, as `remove`).
fn rename(
    g: &mut Namespace,
    dev: &Dev,
    stats: &FsStats,
    from: &str,
    to: &str,
) -> Result<(), FsError> {
    let (fp, fname) = resolve_parent(g, dev, from)?;
    let (tp, tname) = resolve_parent(g, dev, to)?;
    let (_, moving) = g
        .dir_find(dev, fp, fname)?
        .ok_or_else(|| FsError::NotFound(from.into()))?;
    if let Some((_, target)) = g.dir_find(dev, tp, tname)? {
        if target.ino != moving.ino && g.in_use(target.ino) {
            return Err(FsError::Busy(to.into()));
        }
    }
    let flags = RenameFlags::default();
    g.rename(
        dev,
        stats,
        fp,
        fname.as_bytes(),
        tp,
        tname.as_bytes(),
        flags,
    )
    .map_err(|e| match e {
        FsError::NotFound(_) => FsError::NotFound(from.into()),
        e => at_path(e, to),
    })
}

impl Datastore {
    /// Resolves a path ("/a/b" or "a/b") to an inode number.
    pub fn lookup(&self, path: &str) -> Result<u64, FsError> {
        self.with(|g, dev| resolve(g, dev, path))
    }

    /// Lists a directory.
    pub fn readdir(&self, path: &str) -> Result<Vec<DirEntry>, FsError> {
        self.with(|g, dev| {
            let ino = resolve(g, dev, path)?;
            let inode = g.get_inode(dev, ino)?;
            if !inode.is_dir() {
                return Err(FsError::NotDir(path.into()));
            }
            g.dir_entries(dev, ino)
        })
    }

    /// Creates a directory.
    pub fn mkdir(&self, path: &str) -> Result<u64, FsError> {
        self.with_op(|g, dev| {
            let ino = create(
                g,
                dev,
                &self.stats,
                path,
                S_IFDIR | 0o755,
                Provisioning::Thin,
            )?;
            g.end_op(dev, &self.stats)?;
            Ok(ino)
        })
    }

    /// Creates a regular file of `size` bytes with the given provisioning. Thick eager files
    /// are zeroed (with `progress(done, total)` in file blocks).
    pub fn create_file(
        &self,
        path: &str,
        prov: Provisioning,
        size: u64,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<u64, FsError> {
        let ino = self.with_op(|g, dev| {
            let ino = create(g, dev, &self.stats, path, S_IFREG | 0o644, prov)?;
            g.end_op(dev, &self.stats)?;
            Ok(ino)
        })?;
        if size > 0 {
            self.set_size_progress(ino, size, progress)?;
        }
        Ok(ino)
    }

    /// Removes a file (or an empty directory with `rmdir`).
    pub fn unlink(&self, path: &str) -> Result<(), FsError> {
        self.with_op(|g, dev| {
            remove(g, dev, &self.stats, path, false)?;
            g.end_op(dev, &self.stats)
        })
    }

    /// Removes an empty directory.
    pub fn rmdir(&self, path: &str) -> Result<(), FsError> {
        self.with_op(|g, dev| {
            remove(g, dev, &self.stats, path, true)?;
            g.end_op(dev, &self.stats)
        })
    }

    /// Renames `from` to `to`, replacing a file (or empty directory) at `to`.
    pub fn rename(&self, from: &str, to: &str) -> Result<(), FsError> {
        self.with_op(|g, dev| {
            rename(g, dev, &self.stats, from, to)?;
            g.end_op(dev, &self.stats)
        })
    }
}
