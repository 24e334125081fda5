#![no_main]
//! libFuzzer on [`twinbox_fuzz_targets::dockerfile`].
libfuzzer_sys::fuzz_target!(|data: &[u8]| twinbox_fuzz_targets::dockerfile(data));
