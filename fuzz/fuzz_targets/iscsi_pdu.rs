//! libFuzzer entry of the `iscsi_pdu` target (see fuzz::iscsi_pdu).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz::iscsi_pdu::run(data));
