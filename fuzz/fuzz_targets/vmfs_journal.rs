//! libFuzzer entry of the `vmfs_journal` target (see strata_fuzz::vmfs_journal).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| strata_fuzz::vmfs_journal::run(data));
