//! libFuzzer entry of the `fuse` target (see fuzz::fuse).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz::fuse::run(data));
