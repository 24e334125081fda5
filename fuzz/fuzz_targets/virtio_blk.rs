#![no_main]
//! libFuzzer on [`twinbox_fuzz_targets::virtio_blk`].
libfuzzer_sys::fuzz_target!(|data: &[u8]| twinbox_fuzz_targets::virtio_blk(data));
