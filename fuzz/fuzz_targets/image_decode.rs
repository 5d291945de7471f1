//! `cargo fuzz run image_decode`: see `harness::image_decode` (shared with `tests/fuzz_regressions.rs`).
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::image_decode(data));
