//! TCP for the SAN protocols (being written: see the crate map in lib.rs).
