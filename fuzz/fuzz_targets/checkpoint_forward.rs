//! `cargo fuzz run checkpoint_forward`: see `harness::checkpoint_forward` (shared with `tests/fuzz_regressions.rs`).
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::checkpoint_forward(data));
