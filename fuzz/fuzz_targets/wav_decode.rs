//! `cargo fuzz run wav_decode`: see `harness::wav_decode` (shared with `tests/fuzz_regressions.rs`).
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::wav_decode(data));
