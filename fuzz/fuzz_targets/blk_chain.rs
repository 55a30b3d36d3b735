//! libFuzzer entry of the `blk_chain` target (see fuzz::blk_chain).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz::blk_chain::run(data));
