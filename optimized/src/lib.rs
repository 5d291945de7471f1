//! # gemma4-optimized: the Gemma 4 text decoder, vision tower and audio tower, made fast
//!
//! The same model as `gemma4-reference`, module for module (`attention`, `rope`, `mask`, `ple`,
//! `moe`, `mlp`, `decoder_layer`, `model`, `kv_cache`, `rms_norm`, `gelu`, `embedding`,
//! `linear`, `checkpoint`; `vision/` with `patch_embedding`, `rope_2d`, `encoder_layer`,
//! `clipped_linear`, `pooling`, `weights`; `audio/` with `subsampling`, `feed_forward`,
//! `attention`, `light_conv`, `conformer_layer`, `tower`, `weights`; `projector`), each function
//! tested against its reference twin on random inputs, and the whole engine tested dump against
//! dump (`tests/optimized_*.rs` in the root package). Images and audio clips enter through
//! [`Gemma4Optimized::load_for`] and [`Gemma4Optimized::dump_prompt`].
//!
//! What makes it fast (measured in `docs/performance.md`):
//! - weights **as stored**: bf16/f16/f32 checkpoints are memory-mapped and never converted;
//!   16-bit weights are widened inside the kernels ([`checkpoint`], [`simd`]);
//! - the PLE table stays on disk: only the rows of the tokens seen are read ([`ple`]);
//! - decode GEMVs through a hand-written AVX2/FMA kernel (AVX-512 on Intel CPUs) streaming each
//!   weight row once; prefill
//!   GEMMs through a packed AVX-512 kernel that widens 16-bit weights while packing them
//!   ([`gemm512`]; the `gemm` crate on widened blocks on CPUs without AVX-512); both split over
//!   threads in fixed blocks ([`linear`]);
//! - an opt-in fast prefill for generation on bf16 weights (`Precision::Bf16Activations`,
//!   `gemma4 generate --fast-prefill`): the prompt's products on bf16-rounded activations with
//!   AVX-512 BF16, or on AMX tiles where the CPU has them ([`amx`]), as torch and llama.cpp do;
//!   never used for dumps;
//! - fused norms, residual adds, GeGLU and `layer_scalar` ([`rms_norm`], [`gelu`], [`ple`]);
//! - attention over the visible key range only, straight from the cache ([`attention`], [`mask`]),
//!   image blocks of `"vision"` models included (bidirectional on sliding layers);
//! - the vision tower on the same kernels: clipped products grouped on the pool, one 2D RoPE
//!   table per image, attention over the patches as blocked products ([`vision`]);
//! - the audio tower on the same kernels: the subsampling convolutions as blocked im2col
//!   products, chunked local attention over each chunk's own key window (linear in the clip's
//!   length), fused norms and residual adds ([`audio`]);
//! - a KV cache that is a ring of `W` positions on sliding layers, one tensor on K=V layers and
//!   nothing on KV-shared layers ([`kv_cache`]);
//! - MoE that runs only the chosen experts, grouped by expert ([`moe`]);
//! - prefill for generation runs KV-shared layers, the LM head, and everything of the last
//!   cache-writing layer but its keys and values, on the last position only
//!   ([`model::Logits::Last`]).
//!
//! Validation (config, layer plan, checkpoint headers, tensor shapes and dtypes, token ids) is the
//! reference's own code, so both engines reject bad input with the same error.

pub mod allocator;
pub mod amx;
pub mod attention;
pub mod audio;
pub mod checkpoint;
pub mod decoder_layer;
pub mod embedding;
pub mod gelu;
pub mod gemm512;
pub mod kv_cache;
pub mod linear;
pub mod mask;
pub mod mlp;
pub mod model;
pub mod moe;
pub mod parallel;
pub mod ple;
pub mod projector;
pub mod rms_norm;
pub mod rope;
pub mod simd;
pub mod synthetic;
#[cfg(test)]
pub(crate) mod testing;
pub mod vision;

pub use model::{Gemma4Optimized, Logits};
