//! vmfs datastore files served as virtual disks: the one place where the datastore (`vmfs`)
//! meets the serving side (`dataplane`), so that neither depends on the other.
//!
//! Map of the crate:
//! - [`backend`]: [`VmfsBackend`], a datastore file as a [`dataplane::backend::BlockBackend`]
//!   (direct path on written space, batched journal commits for allocating writes).

pub mod backend;

pub use backend::{VmfsBackend, COMMIT_INTERVAL};
