//! libFuzzer entry of the `iscsi_session` target (see fuzz::iscsi_session).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz::iscsi_session::run(data));
