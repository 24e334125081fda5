#![no_main]
//! libFuzzer on [`twinbox_fuzz_targets::image_json`].
libfuzzer_sys::fuzz_target!(|data: &[u8]| twinbox_fuzz_targets::image_json(data));
