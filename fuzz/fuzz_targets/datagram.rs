#![no_main]
//! Fuzz target `datagram`: see `vectors::harness::datagram`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| vectors::harness::datagram(data));
