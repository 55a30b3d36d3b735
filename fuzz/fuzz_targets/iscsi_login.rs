//! libFuzzer entry of the `iscsi_login` target (see fuzz::iscsi_login).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz::iscsi_login::run(data));
