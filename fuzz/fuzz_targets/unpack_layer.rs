#![no_main]
//! libFuzzer on [`twinbox_fuzz_targets::unpack_layer`].
libfuzzer_sys::fuzz_target!(|data: &[u8]| twinbox_fuzz_targets::unpack_layer(data));
