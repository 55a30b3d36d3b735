//! libFuzzer entry of the `isns` target (see strata_fuzz::isns).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| strata_fuzz::isns::run(data));
