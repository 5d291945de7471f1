//! `cargo fuzz run forward_generated`: see `harness::forward_generated` (shared with
//! `tests/fuzz_regressions.rs`).
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::forward_generated(data));
