//! # gemma4: conformance tooling for Gemma 4 ports
//!
//! The library behind the `gemma4` command (shared contracts §1): run the bundled golden
//! cases (`conform`), write activation dumps (`dump`), compare a port's dump with ours
//! (`compare`), describe a checkpoint (`inspect`) and generate text from a prompt or a chat
//! (`generate`: tokenizer, chat template, sampling). The model itself lives in
//! `gemma4-reference` (readable) and `gemma4-optimized` (fast).

pub mod chat_template;
pub mod compare;
pub mod compare_decode;
pub mod compare_diagnosis;
pub mod compare_routing;
pub mod compare_structure;
pub mod comparison;
pub mod conform;
pub mod engine;
pub mod generate;
pub mod generate_cli;
pub mod golden;
pub mod inspect;
pub mod prompt;
pub mod sampling;
pub mod tokenizer;
pub mod tokens;

pub use gemma4_reference as reference;
