#![no_main]
//! libFuzzer on [`twinbox_fuzz_targets::agent_config`].
libfuzzer_sys::fuzz_target!(|data: &[u8]| twinbox_fuzz_targets::agent_config(data));
