//! One layer of the vision encoder (shared spec: multimodal §1.3, §5 items 1 and 7).
//!
//! A pre-norm plus post-norm ("sandwich") block, no layer scalar, over the `n` valid patches:
//!
//! ```text
//! h = x + RMSNorm_{post_attention_layernorm}( Attention( RMSNorm_{input_layernorm}(x) ) )
//! y = h + RMSNorm_{post_feedforward_layernorm}( MLP( RMSNorm_{pre_feedforward_layernorm}(h) ) )
//!
//! Attention:  q = RoPE2D(RMSNorm_{q_norm}(q_proj(a)))     [n, H, d]   norm first, then RoPE
//!             k = RoPE2D(RMSNorm_{k_norm}(k_proj(a)))     [n, K, d]
//!             v = RMSNorm_∅(v_proj(a))                     [n, K, d]   weight-free, never rotated
//!             o[i, h] = Σ_j softmax_j(q[i, h] · k[j, h']) · v[j, h']   scale 1.0, every patch
//!             out = o_proj(concat_heads(o))                            (h' = ⌊h / (H/K)⌋)
//! MLP:        down_proj( gelu_tanh(gate_proj(x)) · up_proj(x) )
//! ```
//!
//! Every projection is a [`ClippedLinear`](crate::vision::clipped_linear::ClippedLinear)
//! (clipped on the on-device tower). Attention is bidirectional; only valid patches take part,
//! so padding has no influence (Hugging Face masks the padded keys out, with the same result).

use ndarray::{Array2, Array3, Axis};

use crate::config::VisionConfig;
use crate::faults::{fault_active, Fault};
use crate::gelu::gelu_tanh;
use crate::rms_norm::{rms_norm, rms_norm_heads};
use crate::vision::rope_2d::apply_rope_2d;
use crate::vision::weights::EncoderLayerWeights;

/// Runs one encoder layer on `x` (`[n, Dv]`) with patch `positions`. Returns `[n, Dv]`.
pub fn encoder_layer(
    x: &Array2<f32>,
    positions: &[[usize; 2]],
    weights: &EncoderLayerWeights,
    config: &VisionConfig,
    inverse_frequencies: &[f32],
) -> Array2<f32> {
    let eps = config.rms_norm_eps;
    let attended = attention(
        &rms_norm(x, &weights.input_layernorm, eps),
        positions,
        weights,
        config,
        inverse_frequencies,
    );
    let h = x + &rms_norm(&attended, &weights.post_attention_layernorm, eps);
    let normed = rms_norm(&h, &weights.pre_feedforward_layernorm, eps);
    let gate = weights.gate_proj.apply(normed.view()).mapv(gelu_tanh);
    let up = weights.up_proj.apply(normed.view());
    let mlp = weights.down_proj.apply((gate * up).view());
    &h + &rms_norm(&mlp, &weights.post_feedforward_layernorm, eps)
}

/// Bidirectional multi-head attention over the patches (see the module documentation).
/// `normed`: `[n, Dv]`; returns the `o_proj` output `[n, Dv]`.
fn attention(
    normed: &Array2<f32>,
    positions: &[[usize; 2]],
    weights: &EncoderLayerWeights,
    config: &VisionConfig,
    inverse_frequencies: &[f32],
) -> Array2<f32> {
    let n = normed.nrows();
    let (heads, kv_heads, head_dim) = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    );
    let eps = config.rms_norm_eps;
    let split = |x: Array2<f32>, count: usize| -> Array3<f32> {
        x.into_shape_with_order((n, count, head_dim))
            .expect("projections have count · d columns")
    };
    // Queries and keys: per-head RMSNorm with the learned weight, then 2D RoPE.
    let mut queries = rms_norm_heads(
        &split(weights.q_proj.apply(normed.view()), heads),
        Some(&weights.q_norm),
        eps,
    );
    apply_rope_2d(&mut queries, positions, inverse_frequencies);
    let mut keys = rms_norm_heads(
        &split(weights.k_proj.apply(normed.view()), kv_heads),
        Some(&weights.k_norm),
        eps,
    );
    apply_rope_2d(&mut keys, positions, inverse_frequencies);
    // Values: a weight-free RMSNorm, no rotation.
    let values = rms_norm_heads(
        &split(weights.v_proj.apply(normed.view()), kv_heads),
        None,
        eps,
    );

    // Scale 1.0: q_norm and k_norm take the place of 1/√d.
    let scale = if fault_active(Fault::VisionAttentionScaleInvSqrtD) {
        1.0 / (head_dim as f32).sqrt()
    } else {
        1.0
    };
    let group = heads / kv_heads;
    let mut output = Array3::<f32>::zeros((n, heads, head_dim));
    for h in 0..heads {
        let q = queries.index_axis(Axis(1), h); // [n, d]
        let k = keys.index_axis(Axis(1), h / group); // [n, d]
        let v = values.index_axis(Axis(1), h / group); // [n, d]
        let mut scores = q.dot(&k.t()) * scale; // [n, n]
        for mut row in scores.outer_iter_mut() {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            row.mapv_inplace(|s| (s - max).exp());
            let total: f32 = row.sum();
            row.mapv_inplace(|w| w / total);
        }
        output.index_axis_mut(Axis(1), h).assign(&scores.dot(&v));
    }
    // Concatenate heads head-major ([n, H·d]) and project back.
    let concatenated = output
        .into_shape_with_order((n, heads * head_dim))
        .expect("contiguous");
    weights.o_proj.apply(concatenated.view())
}
