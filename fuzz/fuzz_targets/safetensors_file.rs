//! `cargo fuzz run safetensors_file`: see `harness::safetensors_file` (shared with `tests/fuzz_regressions.rs`).
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::safetensors_file(data));
