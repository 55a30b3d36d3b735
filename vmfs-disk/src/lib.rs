//! vmfs datastore files served as virtual disks: the one place where the datastore (`vmfs`)
//! meets the serving side (`dataplane`), so that neither depends on the other.
//!
//! Map of the crate (data flows down):
//! - [`backend`]: [`VmfsBackend`], a datastore file as a [`dataplane::backend::BlockBackend`]:
//!   direct path on written space on the reactor, everything else offloaded.
//! - [`worker`]: the datastore's metadata worker thread: allocating writes (batched journal
//!   commits), reads of holes, WRITE_ZEROES and FLUSH, completions posted back to the reactors.
//! - `served`: one served file as both of them see it (lease, block-map cache, close).

pub mod backend;
mod served;
pub mod worker;

pub use backend::VmfsBackend;
