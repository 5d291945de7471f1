//! `cargo fuzz run activation_dump`: see `harness::activation_dump` (shared with `tests/fuzz_regressions.rs`).
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::activation_dump(data));
