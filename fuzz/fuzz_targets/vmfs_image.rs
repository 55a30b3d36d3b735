//! libFuzzer entry of the `vmfs_image` target (see fuzz::vmfs_image).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz::vmfs_image::run(data));
