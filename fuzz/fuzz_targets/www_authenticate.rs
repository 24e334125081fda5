#![no_main]
//! libFuzzer on [`twinbox_fuzz_targets::www_authenticate`].
libfuzzer_sys::fuzz_target!(|data: &[u8]| twinbox_fuzz_targets::www_authenticate(data));
