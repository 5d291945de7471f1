//! Per-Layer Embeddings (PLE) of E2B and E4B (shared spec: text §4, §10 step 6, §15.9–10).
//!
//! ```text
//! token   = embed_tokens_per_layer.weight[ids] · √P          (√P in the table's dtype)
//! context = RMSNorm_{per_layer_projection_norm}((x⁰ · per_layer_model_projectionᵀ) · D^(−1/2))
//! ple     = (context + token) · 2^(−1/2)                      [T, L, P], layer-major
//! h₃ = h₂ + RMSNorm_{post_per_layer_input_norm}((gelu_tanh(h₂ · gateᵀ) ⊙ ple[:, l]) · projectionᵀ)
//! ```
//!
//! **PLE in flash**: the table (`[262144, L·P]`, 4.7 GB in bf16 for E2B) stays in the mapped
//! checkpoint file; only the `T` rows of the tokens in the input are read (`Matrix::row_scaled_into`
//! touches just those pages), so it costs disk space, not memory.

use crate::checkpoint::{LayerPleWeights, PleWeights};
use crate::linear::linear;
use crate::parallel::for_each_row;
use crate::rms_norm::{add_normed_scaled, rms_norm_in_place};

/// Builds `ple` `[T, L·P]` (layer-major) from the PLE ids and the scaled main embedding `x⁰`
/// (`[T, D]`). `token_scale` is `√P` rounded to the table's dtype.
pub fn per_layer_inputs(
    ple_ids: &[usize],
    scaled_embeddings: &[f32],
    hidden_size: usize,
    weights: &PleWeights,
    token_scale: f32,
    eps: f64,
) -> Vec<f32> {
    let tokens = ple_ids.len();
    let width = weights.projection_norm.len();
    let projection_scale = (hidden_size as f64).powf(-0.5) as f32;
    let input_scale = std::f64::consts::FRAC_1_SQRT_2 as f32;
    let mut context = linear(scaled_embeddings, tokens, &weights.model_projection);
    // The rest, token by token (in parallel for a prompt): the same operations in the same
    // order as one pass per step over all tokens, so the same bits.
    for_each_row(&mut context, weights.model_projection.rows, |t, row| {
        let mut token_part = vec![0.0f32; row.len()];
        weights
            .table
            .row_scaled_into(ple_ids[t], token_scale, &mut token_part);
        row.iter_mut().for_each(|v| *v *= projection_scale);
        for layer in row.chunks_exact_mut(width) {
            rms_norm_in_place(layer, width, Some(&weights.projection_norm), eps);
        }
        for (c, &t) in row.iter_mut().zip(&token_part) {
            *c = (*c + t) * input_scale;
        }
    });
    context
}

/// The PLE branch of one layer, fused with the residual add and `layer_scalar`:
/// `h ← (h + RMSNorm_post((gelu(h · gateᵀ) ⊙ ple_l) · projectionᵀ)) · layer_scalar`.
/// `h`: `[T, D]`; `layer_input`: `ple[:, l]` as `[T, P]`.
pub fn add_per_layer_embedding_branch(
    h: &mut [f32],
    tokens: usize,
    layer_input: &[f32],
    weights: &LayerPleWeights,
    eps: f64,
    layer_scalar: f32,
) {
    let d = h.len() / tokens;
    let mut gated = linear(h, tokens, &weights.input_gate); // [T, P]
    crate::simd::geglu(&mut gated, layer_input);
    let projected = linear(&gated, tokens, &weights.projection); // [T, D]
    add_normed_scaled(h, &projected, d, &weights.post_norm, eps, layer_scalar);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Matrix;
    use crate::testing::{assert_close, random_values, to_array2};
    use gemma4_reference::compute_dtype::ComputeDtype;
    use half::bf16;
    use ndarray::Array1;

    #[test]
    fn ple_inputs_and_branch_match_reference_bf16_table() {
        let (tokens, d, layers, p, vocab) = (4, 32, 3, 8, 20);
        let table: Vec<bf16> = random_values(vocab * layers * p, 1, 1.0)
            .iter()
            .map(|&v| bf16::from_f32(v))
            .collect();
        let table_f32: Vec<f32> = table.iter().map(|v| v.to_f32()).collect();
        let projection = random_values(layers * p * d, 2, 0.2);
        let norm = random_values(p, 3, 1.0);
        let x0 = random_values(tokens * d, 4, 1.0);
        let ids = [3, 19, 0, 3];
        let ours = PleWeights {
            table: Matrix::from_bf16(vocab, layers * p, table),
            model_projection: Matrix::from_f32(layers * p, d, projection.clone()),
            projection_norm: norm.clone(),
        };
        let reference_table = to_array2(vocab, layers * p, &table_f32);
        let reference = gemma4_reference::checkpoint::PleWeights {
            model_projection: to_array2(layers * p, d, &projection),
            projection_norm: Array1::from(norm),
        };
        let got = per_layer_inputs(&ids, &x0, d, &ours, 16.0f32.sqrt(), 1e-6);
        // sqrt(8) rounded to bf16, as the reference does when computing as bf16.
        let got_bf16_scale = per_layer_inputs(
            &ids,
            &x0,
            d,
            &ours,
            bf16::from_f32(8f32.sqrt()).to_f32(),
            1e-6,
        );
        let expected = gemma4_reference::ple::per_layer_inputs(
            reference_table.select(ndarray::Axis(0), &ids).view(),
            &to_array2(tokens, d, &x0),
            &reference,
            layers,
            1e-6,
            ComputeDtype::BFloat16,
        );
        assert!(
            got.iter()
                .zip(expected.iter())
                .any(|(a, b)| (a - b).abs() > 1e-3),
            "a wrong token scale must show"
        );
        // Projection over D = 32 terms in another order, then a norm: ≤ a few ulps of O(1) values.
        assert_close(
            "per_layer_inputs",
            &got_bf16_scale,
            expected.as_slice().unwrap(),
            1e-6,
        );

        let gate = random_values(p * d, 5, 0.2);
        let proj = random_values(d * p, 6, 0.3);
        let post = random_values(d, 7, 1.0);
        let h2 = random_values(tokens * d, 8, 1.0);
        let layer_input: Vec<f32> = (0..tokens)
            .flat_map(|t| got_bf16_scale[(t * layers + 1) * p..(t * layers + 2) * p].to_vec())
            .collect();
        let mut ours_h = h2.clone();
        add_per_layer_embedding_branch(
            &mut ours_h,
            tokens,
            &layer_input,
            &LayerPleWeights {
                input_gate: Matrix::from_f32(p, d, gate.clone()),
                projection: Matrix::from_f32(d, p, proj.clone()),
                post_norm: post.clone(),
            },
            1e-6,
            0.8,
        );
        let branch = gemma4_reference::ple::per_layer_embedding_branch(
            &to_array2(tokens, d, &h2),
            to_array2(tokens, p, &layer_input).view(),
            &gemma4_reference::checkpoint::LayerPleWeights {
                input_gate: to_array2(p, d, &gate),
                projection: to_array2(d, p, &proj),
                post_norm: Array1::from(post),
            },
            1e-6,
        );
        let expected_h: Vec<f32> = h2
            .iter()
            .zip(branch.iter())
            .map(|(h, b)| (h + b) * 0.8)
            .collect();
        assert_close("ple branch", &ours_h, &expected_h, 1e-6);
    }
}
