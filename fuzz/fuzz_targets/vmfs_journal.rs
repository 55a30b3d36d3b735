//! libFuzzer entry of the `vmfs_journal` target (see fuzz::vmfs_journal).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz::vmfs_journal::run(data));
