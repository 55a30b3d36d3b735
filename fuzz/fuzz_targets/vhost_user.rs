//! libFuzzer entry of the `vhost_user` target (see fuzz::vhost_user).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz::vhost_user::run(data));
