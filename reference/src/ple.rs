//! Per-Layer Embeddings (PLE) of E2B and E4B (shared spec: text §4, §10 step 6, §15.9–10).
//!
//! Before the layers, one tensor `ple` `[T, L, P]` is built from two parts:
//!
//! ```text
//! token   = embed_tokens_per_layer.weight[ids] · √P          (√P in the compute dtype)
//! context = RMSNorm_{per_layer_projection_norm}((x⁰ · per_layer_model_projectionᵀ) · D^(−1/2))
//! ple     = (context + token) · 2^(−1/2)
//! ```
//!
//! `[T, L·P]` tables are read layer-major (column `l·P + p` belongs to layer `l`); the norm runs
//! over `P` with one weight shared by all layers; `x⁰` is the √D-scaled main embedding.
//! Multimodal placeholder tokens use the pad row of the table.
//!
//! Inside layer `l`, after the feed-forward residual (`h₂`):
//!
//! ```text
//! h₃ = h₂ + RMSNorm_{post_per_layer_input_norm}((gelu_tanh(h₂ · per_layer_input_gateᵀ) ⊙ ple[:, l]) · per_layer_projectionᵀ)
//! ```
//!
//! Most scale mistakes here barely move the logits (the RMSNorms absorb them), which is why the
//! dump holds `per_layer_inputs` and the conformance tests check it directly.

use ndarray::{Array2, Array3, ArrayView2, Zip};

use crate::checkpoint::{LayerPleWeights, PleWeights};
use crate::compute_dtype::ComputeDtype;
use crate::embedding::{embedding_scale, scaled_embedding};
use crate::faults::{fault_active, Fault};
use crate::gelu::gelu_tanh;
use crate::linear::linear;
use crate::rms_norm::{rms_norm, rms_norm_rows};

/// Builds `ple` `[T, L, P]` from the PLE table's rows of the tokens (`table_rows` `[T, L·P]`,
/// placeholders already mapped to the pad row; looked up by the loader) and the scaled main
/// embedding `x⁰` (`[T, D]`); `compute` is the dtype `√P` is rounded to.
pub fn per_layer_inputs(
    table_rows: ArrayView2<f32>,
    scaled_embeddings: &Array2<f32>,
    weights: &PleWeights,
    num_layers: usize,
    eps: f64,
    compute: ComputeDtype,
) -> Array3<f32> {
    let tokens = table_rows.nrows();
    let width = weights.projection_norm.len(); // P
    let hidden_size = scaled_embeddings.ncols(); // D

    // Token part: table rows times √P (rounded to the compute dtype, like the main embedding).
    let token_scale = if fault_active(Fault::PleNoTokenScale) {
        1.0
    } else {
        embedding_scale(width, compute)
    };
    let token_part = scaled_embedding(table_rows, token_scale);

    // Context part: project the scaled embedding, times D^(-1/2), then RMSNorm over P.
    let projection_scale = if fault_active(Fault::PleNoProjectionScale) {
        1.0
    } else {
        (hidden_size as f64).powf(-0.5) as f32
    };
    let context = if fault_active(Fault::PleProjectionScaleFoldedBf16) {
        // Bug: the scale folded into bfloat16 weights in the checkpoint's dtype, a second
        // rounding of every weight: bf16(w · bf16(D^(-1/2))).
        let scale = half::bf16::from_f32(projection_scale).to_f32();
        let folded = weights
            .model_projection
            .mapv(|w| half::bf16::from_f32(w * scale).to_f32());
        linear(scaled_embeddings.view(), &folded)
    } else {
        linear(scaled_embeddings.view(), &weights.model_projection).mapv(|v| v * projection_scale)
    };
    let context = context
        .into_shape_with_order((tokens * num_layers, width))
        .expect("[T, L·P] is layer-major");
    let context = rms_norm_rows(context.view(), Some(&weights.projection_norm), eps);

    // Sum, then 2^(-1/2).
    let input_scale = if fault_active(Fault::PleNoInputScale) {
        1.0
    } else {
        std::f64::consts::FRAC_1_SQRT_2 as f32
    };
    let token_part = token_part
        .into_shape_with_order((tokens * num_layers, width))
        .expect("[T, L·P] is layer-major");
    let combined = Zip::from(&context)
        .and(&token_part)
        .map_collect(|&c, &t| (c + t) * input_scale);
    combined
        .into_shape_with_order((tokens, num_layers, width))
        .expect("same element count")
}

/// The PLE branch of one layer: `h₂` `[T, D]` and this layer's slice `ple[:, l]` `[T, P]` →
/// the normed branch output `[T, D]` (the caller adds it to `h₂`).
pub fn per_layer_embedding_branch(
    h2: &Array2<f32>,
    layer_input: ArrayView2<f32>,
    weights: &LayerPleWeights,
    eps: f64,
) -> Array2<f32> {
    let gate = linear(h2.view(), &weights.input_gate); // [T, P]
    let gated = Zip::from(&gate)
        .and(&layer_input)
        .map_collect(|&g, &p| gelu_tanh(g) * p);
    let projected = linear(gated.view(), &weights.projection); // [T, D]
    rms_norm(&projected, &weights.post_norm, eps)
}
