//! libFuzzer entry of the `scsi` target (see fuzz::scsi).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz::scsi::run(data));
