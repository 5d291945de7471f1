//! # gemma4-reference: Gemma 4, written to be read
//!
//! A plain-`ndarray`, float32 implementation of Google DeepMind's Gemma 4 language model
//! (E2B, E4B, 31B, 26B-A4B), checked layer by layer against Hugging Face `transformers`.
//! Clarity beats speed: every function is one part of the architecture, with its equation and
//! the section of the shared spec (`../shared/spec/text.md`) it implements.
//!
//! Reading order, following the data:
//! 1. [`config`]: `config.json` in both layouts and both spellings;
//! 2. [`layer_plan`]: the per-layer decisions (sliding/full, head dims, KV sharing, MLP width);
//! 3. [`checkpoint`]: safetensors loading — the only module that knows HF tensor names;
//! 4. [`embedding`] and [`ple`]: scaled embeddings and Per-Layer Embeddings (their scales
//!    rounded to the [`compute_dtype`] a run imitates);
//! 5. [`decoder_layer`]: one layer, built from [`rms_norm`], [`attention`] (with [`rope`],
//!    [`mask`], [`kv_cache`]), [`mlp`] (with [`gelu`]) and [`moe`];
//! 6. [`model`]: the whole forward pass, logits, softcapping and greedy decoding;
//! 7. [`dump`]: the activation dump format other ports compare against;
//! 8. [`faults`]: known porting bugs, switchable for diagnosis and mutation testing,
//!    [`precision`]: runtimes' deliberate precision shortcuts (float16 KV cache, GELU table),
//!    imitated to tell a port right at its precision from a wrong one, and
//!    [`forced_routing`]: a MoE port's near-tie expert choices imposed for a fair comparison;
//! 9. [`parameter_count`]: exact parameter counts from a config alone;
//! 10. [`weight_stream`] and [`memory_plan`]: verifying checkpoints larger than memory, one
//!     layer's weights in memory at a time, with the peak known before the run starts.
//!
//! Images (shared spec: multimodal §1, §3), before step 4:
//! 11. [`vision`]: the image tower, from a file to soft tokens (its own reading order);
//! 12. [`projector`]: soft tokens into the text width (shared with the audio tower);
//! 13. [`merge`]: soft tokens written over their placeholder runs, and [`mask`]'s image blocks
//!     (bidirectional on sliding layers of the large models).
//!
//! Audio (E2B, E4B; shared spec: multimodal §2, §3), also before step 4:
//! 14. [`audio`]: the conformer tower, from a WAV file to soft tokens (its own reading order),
//!     whose soft tokens go through [`projector`] and [`merge`] as images do.

pub mod attention;
pub mod audio;
pub mod checkpoint;
pub mod compute_dtype;
pub mod config;
pub mod decoder_layer;
pub mod dump;
pub mod embedding;
pub mod error;
pub mod faults;
pub mod forced_routing;
pub mod gelu;
pub mod kv_cache;
pub mod layer_plan;
pub mod linear;
pub mod mask;
pub mod memory;
pub mod memory_plan;
pub mod merge;
pub mod mlp;
pub mod model;
pub mod moe;
pub mod parameter_count;
pub mod ple;
pub mod precision;
pub mod projector;
pub mod rms_norm;
pub mod rope;
pub mod vision;
pub mod weight_stream;

pub use compute_dtype::ComputeDtype;
pub use config::ModelConfig;
pub use dump::ActivationDump;
pub use error::{Error, Result};
pub use layer_plan::{LayerPlan, ModelPlan};
pub use model::Gemma4TextModel;
