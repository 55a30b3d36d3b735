//! stratad's command-line specs: one parser for `--disk`, `--share` and `--port`, and the
//! scalar options. Pure functions, no I/O (but the group lookup of `--socket-group`).
//!
//! - [`keyvalue`]: the `key=value,...` syntax (QEMU-style, `,,` for a comma inside a value)
//!   as a serde deserializer; the same spec structs read JSON objects (config file, RPC).
//! - [`disk`]: `--disk` → [`DiskSpec`]; [`iscsi`]: `--iscsi-target` → [`IscsiTargetSpec`]; [`share`]: `--share` → the file server's
//!   `ShareSpec`; [`port`]: `--port` → the packet path's `PortSpec`. Each has a serde
//!   struct of what can be written (`*Args`, the keys are its field names) and a checked
//!   conversion into the typed spec the libraries take.
//! - [`scalar`]: sizes, `--socket-mode`, `--socket-group`, `--cpus`.
//!
//! Every error is a [`SpecError`] naming the key and what is wrong with it.

pub mod disk;
pub mod iscsi;
pub mod keyvalue;
#[cfg(feature = "packet")]
pub mod port;
pub mod scalar;
pub mod share;

use serde::de::{self, Deserialize, Deserializer, Visitor};
use thiserror::Error;

pub use disk::{parse_disk_spec, BackendSpec, DiskSpec};
pub use iscsi::{parse_iscsi_target_spec, IscsiTargetSpec};
#[cfg(feature = "packet")]
pub use port::parse_port_spec;
pub use scalar::{parse_cpus, parse_size, parse_socket_group, parse_socket_mode};
pub use share::parse_share_spec;

/// What is wrong with a command-line value.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum SpecError {
    /// An item without `=` where no list continues.
    #[error("'{0}' is not key=value")]
    NotKeyValue(String),
    /// A key we do not know.
    #[error("unknown key '{0}'")]
    UnknownKey(String),
    /// A key given twice.
    #[error("key '{0}' given twice")]
    Duplicate(String),
    /// A required key is absent (or empty).
    #[error("missing '{0}'")]
    Missing(String),
    /// A key that does not apply with the others given.
    #[error("'{key}' does not apply to {to}")]
    NotApplicable {
        /// The key.
        key: String,
        /// What it does not apply to (e.g. `backend=null`).
        to: String,
    },
    /// A value that cannot be used.
    #[error("bad value for '{key}': '{value}' ({why})")]
    BadValue {
        /// The key.
        key: String,
        /// The value as given.
        value: String,
        /// What was expected.
        why: String,
    },
    /// A problem of the whole spec, not of one key (too long; JSON syntax).
    #[error("{0}")]
    Syntax(String),
}

impl SpecError {
    /// A [`SpecError::BadValue`].
    pub fn bad(key: &str, value: impl std::fmt::Display, why: impl Into<String>) -> Self {
        SpecError::BadValue {
            key: key.into(),
            value: value.to_string(),
            why: why.into(),
        }
    }

    /// A [`SpecError::NotApplicable`].
    pub fn not_applicable(key: &str, to: impl Into<String>) -> Self {
        SpecError::NotApplicable {
            key: key.into(),
            to: to.into(),
        }
    }
}

/// A size in bytes: a number, or in the key=value form (and as a JSON string) a number with
/// a K, M, G or T suffix (powers of 1024); a positive multiple of 512.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SizeVisitor;

        impl Visitor<'_> for SizeVisitor {
            type Value = Size;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a size such as 4096, 64M or 1G")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                vmfs::admin::parse_size(v).map(Size).map_err(E::custom)
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                self.visit_str(&v.to_string())
            }
        }

        d.deserialize_any(SizeVisitor)
    }
}
