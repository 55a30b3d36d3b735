//! libFuzzer entry of the `fuse` target (see strata_fuzz::fuse).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| strata_fuzz::fuse::run(data));
