#![no_main]
//! libFuzzer on [`twinbox_fuzz_targets::runtime_config`].
libfuzzer_sys::fuzz_target!(|data: &[u8]| twinbox_fuzz_targets::runtime_config(data));
