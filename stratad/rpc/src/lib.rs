//! stratad's datastore methods: their names, typed params and results, and
//! [`register`], which adds them to a method table over one datastore. stratad's control
//! socket serves them (with its own `stratad_stats`); `stratactl` runs the very same table on
//! a datastore it opens itself when stratad is not running (offline mode), so both answer
//! alike. A crate of its own so that stratactl need not build the daemon.
//!
//! Method names follow one scheme across Strata's control sockets, SPDK-style
//! `object_verb`: the object first, from the widest (`datastore`, `ns` for the name server,
//! `stratad` for the daemon itself) to the narrowest (`datastore_disk`), then the verb:
//! `create`/`delete` whole objects, `add`/`remove` members, `get`/`set` a setting, `list`
//! objects, `resize`; views of one object are named for the view (`datastore_info`,
//! `stratad_stats`, `ns_stats`), and directory verbs keep their file-system names
//! (`datastore_ls`, `datastore_mkdir`). `rpc_get_methods` (SPDK's own name) lists a socket's
//! methods.
//!
//! | method | params | result |
//! |---|---|---|
//! | `stratad_stats` | – | counters (stratad only: reactors, disks, shares, packet queues) |
//! | `datastore_info` | – | [`vmfs::admin::Info`] |
//! | `datastore_ls` | `path` (default `/`) | array of [`vmfs::admin::Entry`] |
//! | `datastore_mkdir` | `path` | `{ino}` |
//! | `datastore_disk_create` | `name`, `size`, `provisioning` (`thin` (default), `thick`, `lazy-zeroed`) | `{ino}` |
//! | `datastore_disk_delete` | `name` | `{}` |
//! | `datastore_disk_resize` | `name`, `size` | `{}` |
//!
//! Sizes are byte counts or strings with a K/M/G/T suffix.

use std::sync::Arc;

use jsonrpc::{Methods, NoParams, RpcError};
use serde::{Deserialize, Serialize};
use vmfs::admin::{parse_provisioning, parse_size};
use vmfs::fs::{Datastore, FsError};

/// `stratad_stats`: the daemon's counters (served by stratad itself: reactors, disks, shares,
/// packet queues; not part of [`register`]).
pub const STRATAD_STATS: &str = "stratad_stats";
/// `datastore_info`: the volume, its space and journal counters.
pub const DATASTORE_INFO: &str = "datastore_info";
/// `datastore_ls`: a directory's entries.
pub const DATASTORE_LS: &str = "datastore_ls";
/// `datastore_mkdir`: a new directory.
pub const DATASTORE_MKDIR: &str = "datastore_mkdir";
/// `datastore_disk_create`: a new virtual disk file.
pub const DATASTORE_DISK_CREATE: &str = "datastore_disk_create";
/// `datastore_disk_delete`: removes a virtual disk file.
pub const DATASTORE_DISK_DELETE: &str = "datastore_disk_delete";
/// `datastore_disk_resize`: grows or shrinks a virtual disk file.
pub const DATASTORE_DISK_RESIZE: &str = "datastore_disk_resize";

/// Application error: the datastore refused the operation (the message says why).
pub const DATASTORE_ERROR: i64 = -32000;
/// Application error: stratad runs without a datastore.
pub const NO_DATASTORE: i64 = -32001;

/// A size: bytes, or a string with a K/M/G/T suffix ([`vmfs::admin::parse_size`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Size {
    /// Bytes.
    Bytes(u64),
    /// E.g. "10G".
    Text(String),
}

impl Size {
    fn bytes(&self) -> Result<u64, RpcError> {
        match self {
            Size::Bytes(n) => Ok(*n),
            Size::Text(s) => {
                parse_size(s).map_err(|why| RpcError::invalid_params(format!("size '{s}': {why}")))
            }
        }
    }
}

fn root() -> String {
    "/".into()
}

/// `datastore_ls` params.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LsParams {
    /// Directory (default: the root).
    #[serde(default = "root")]
    pub path: String,
}

/// `datastore_mkdir` params.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MkdirParams {
    /// Path of the new directory.
    pub path: String,
}

/// `datastore_disk_create` params.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskCreateParams {
    /// Name (path inside the datastore).
    pub name: String,
    /// Size.
    pub size: Size,
    /// `thin` (default), `thick` (eager-zeroed) or `lazy-zeroed`.
    #[serde(default)]
    pub provisioning: Option<String>,
}

/// `datastore_disk_delete` params.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskDeleteParams {
    /// Name.
    pub name: String,
}

/// `datastore_disk_resize` params.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskResizeParams {
    /// Name.
    pub name: String,
    /// New size.
    pub size: Size,
}

/// Result of the methods that create an inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Created {
    /// The new inode.
    pub ino: u64,
}

/// Result of the methods with nothing to return (`{}`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {}

/// Follows long operations (eager zeroing): `(done, total)`.
pub type Progress = Arc<dyn Fn(u64, u64) + Send + Sync>;

fn fs_err(e: FsError) -> RpcError {
    RpcError::application(DATASTORE_ERROR, e.to_string())
}

/// Adds the datastore methods over `ds` to `m`. Without a datastore they answer
/// [`NO_DATASTORE`] (they stay listed, so a client learns why rather than "unknown method").
/// `progress` follows eager zeroing in `datastore_disk_create`.
pub fn register(m: &mut Methods, ds: Option<Arc<Datastore>>, progress: Progress) {
    let get = move || -> Result<Arc<Datastore>, RpcError> {
        ds.clone()
            .ok_or_else(|| RpcError::application(NO_DATASTORE, "stratad runs without a datastore"))
    };
    let g = get.clone();
    m.add(DATASTORE_INFO, move |_: NoParams| {
        vmfs::admin::info(&*g()?).map_err(fs_err)
    });
    let g = get.clone();
    m.add(DATASTORE_LS, move |p: LsParams| {
        vmfs::admin::ls(&*g()?, &p.path).map_err(fs_err)
    });
    let g = get.clone();
    m.add(DATASTORE_MKDIR, move |p: MkdirParams| {
        let ino = g()?.mkdir(&p.path).map_err(fs_err)?;
        Ok(Created { ino })
    });
    let g = get.clone();
    m.add(DATASTORE_DISK_CREATE, move |p: DiskCreateParams| {
        let ds = g()?;
        let size = p.size.bytes()?;
        let prov = parse_provisioning(p.provisioning.as_deref().unwrap_or("thin"))
            .map_err(RpcError::invalid_params)?;
        let ino = ds
            .create_file(&p.name, prov, size, &mut |done, total| {
                progress(done, total)
            })
            .map_err(fs_err)?;
        Ok(Created { ino })
    });
    let g = get.clone();
    m.add(DATASTORE_DISK_DELETE, move |p: DiskDeleteParams| {
        g()?.unlink(&p.name).map_err(fs_err)?;
        Ok(Done {})
    });
    m.add(DATASTORE_DISK_RESIZE, move |p: DiskResizeParams| {
        let ds = get()?;
        let size = p.size.bytes()?;
        let ino = ds.lookup(&p.name).map_err(fs_err)?;
        ds.set_size(ino, size).map_err(fs_err)?;
        Ok(Done {})
    });
}

#[cfg(test)]
mod tests;
