//! The datastore's one error type, shared by every layer, and its errno for POSIX servers.

use thiserror::Error;

use crate::device::DeviceError;
use crate::format::FormatError;
use crate::journal::JournalError;

/// Errors of datastore operations.
#[derive(Debug, Error)]
pub enum FsError {
    /// Device failure.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// Journal failure.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// A metadata block failed validation.
    #[error("corrupt metadata: {0}")]
    Corrupt(#[from] FormatError),
    /// Not a datastore, or an unusable one.
    #[error("cannot mount: {0}")]
    Mount(String),
    /// No such file or directory.
    #[error("no such file or directory: {0}")]
    NotFound(String),
    /// Name exists.
    #[error("already exists: {0}")]
    Exists(String),
    /// Not a directory.
    #[error("not a directory: {0}")]
    NotDir(String),
    /// Is a directory.
    #[error("is a directory: {0}")]
    IsDir(String),
    /// Directory not empty.
    #[error("directory not empty: {0}")]
    NotEmpty(String),
    /// Invalid name or argument.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// Out of space (file blocks, sub-blocks, pointer blocks or inodes).
    #[error("no space left in the datastore ({0})")]
    NoSpace(&'static str),
    /// The file is open (served as a disk) and the operation would pull blocks from under it.
    #[error("file is in use: {0}")]
    Busy(String),
    /// An earlier device error stopped the datastore.
    #[error("datastore stopped after an I/O error; remount to recover")]
    Failed,
    /// A bad name: empty, `.`, `..`, containing `/` or NUL.
    #[error("invalid name: {0}")]
    InvalidName(String),
    /// A name longer than [`crate::format::NAME_MAX`] bytes (or a symlink target longer than
    /// `SYMLINK_MAX`).
    #[error("name too long: {0}")]
    NameTooLong(String),
    /// The inode already has `LINK_MAX` links.
    #[error("too many links: inode {0}")]
    TooManyLinks(u64),
    /// Operation not permitted (hard link to a directory, ...).
    #[error("operation not permitted: {0}")]
    NotPermitted(String),
    /// No such extended attribute.
    #[error("no such extended attribute")]
    NoXattr,
    /// The extended attributes do not fit the inode's xattr block.
    #[error("extended attribute too big")]
    XattrTooBig,
    /// SEEK_DATA/SEEK_HOLE at or past the end of the file.
    #[error("no data at or after offset {0}")]
    NoData(u64),
    /// The datastore or inode is read-only.
    #[error("read-only: {0}")]
    ReadOnly(String),
    /// The operation would cross datastores.
    #[error("cross-device operation")]
    CrossDevice,
}

impl FsError {
    /// The libc errno a POSIX server returns for this error.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::Device(_) | FsError::Journal(_) | FsError::Failed | FsError::Mount(_) => {
                libc::EIO
            }
            FsError::Corrupt(_) => libc::EUCLEAN,
            FsError::NotFound(_) => libc::ENOENT,
            FsError::Exists(_) => libc::EEXIST,
            FsError::NotDir(_) => libc::ENOTDIR,
            FsError::IsDir(_) => libc::EISDIR,
            FsError::NotEmpty(_) => libc::ENOTEMPTY,
            FsError::Invalid(_) | FsError::InvalidName(_) => libc::EINVAL,
            FsError::NoSpace(_) => libc::ENOSPC,
            FsError::Busy(_) => libc::EBUSY,
            FsError::NameTooLong(_) => libc::ENAMETOOLONG,
            FsError::TooManyLinks(_) => libc::EMLINK,
            FsError::NotPermitted(_) => libc::EPERM,
            FsError::NoXattr => libc::ENODATA,
            FsError::XattrTooBig => libc::E2BIG,
            FsError::NoData(_) => libc::ENXIO,
            FsError::ReadOnly(_) => libc::EROFS,
            FsError::CrossDevice => libc::EXDEV,
        }
    }
}
