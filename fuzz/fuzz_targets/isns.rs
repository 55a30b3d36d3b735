//! libFuzzer entry of the `isns` target (see fuzz::isns).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz::isns::run(data));
