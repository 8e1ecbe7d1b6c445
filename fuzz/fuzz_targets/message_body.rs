#![no_main]
//! Fuzz target `message_body`: see `vectors::harness::message_body`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| vectors::harness::message_body(data));
