//! (being written: see the crate map in mod.rs)
