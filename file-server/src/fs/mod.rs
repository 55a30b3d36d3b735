//! [`VmfsFs`]: virtiofsd's `FileSystem` trait over a directory tree of a vmfs datastore.
//!
//! Every operation is checked here, on the server, as the caller described by the FUSE header
//! (uid, gid mapped through the share's id maps; supplementary groups from the share's group
//! file): the guest kernel checks too, but a guest is not trusted to. Checks use the exact
//! POSIX.1e evaluation of `posix_perm` through the permission-profile cache. I/O on an open
//! handle uses the grant made at open (as SMB servers do), not a check per read or write.
//!
//! Rooms, each using only those listed before it:
//! - [`base`]: the type, node ids ↔ inodes, lookup and handle tables, attributes and entry
//!   replies, quota accounting around an operation, errno conversion.
//! - [`perm`]: the caller, its cached permission profile, access checks and open grants.
//! - [`dir`]: names, node creation (ownership, umask or default ACL), READDIR entries.
//! - [`io`]: READ and WRITE data paths (zero-copy or through the scratch file).
//! - [`xattr_acl`]: xattr namespaces' rules, ACL writes and the mode ↔ ACL mirror.
//! - [`attr`]: the SETATTR rules.
//! - [`ops`]: the `FileSystem` trait, composed of the above.

pub mod attr;
pub mod base;
pub mod dir;
pub mod io;
pub mod ops;
pub mod perm;
pub mod xattr_acl;

pub use self::base::{FsCounters, VmfsFs, HANDLES_MAX, OVERFLOW_ID};
pub use self::dir::DirIter;
#[cfg(test)]
pub(crate) use self::io::scratch_bytes;
pub use self::io::{set_read_buffer, READ_BYTES_MAX, SCRATCH_KEEP_BYTES, WRITE_BYTES_MAX};
pub use self::perm::{set_current_conn, XATTR_ACL_ACCESS, XATTR_ACL_DEFAULT};
