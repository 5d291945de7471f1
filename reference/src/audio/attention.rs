//! Chunked local self-attention with a relative position term (shared spec: multimodal §2.4,
//! §5 item 8), written densely: Hugging Face computes it in blocks of 12 queries over 24
//! context keys with a Transformer-XL `rel_shift`, which gives exactly this.
//!
//! ```text
//! q = q_proj(x) · (H^−½ / ln 2) · softplus(per_dim_scale)      [T, N, H]   (clipped linears)
//! k = k_proj(x) · (ln(1 + e) / ln 2)
//! v = v_proj(x)
//! R = relative_k_proj(S)                                        [P, N, H]   (not clipped)
//!     S[p] = [sin(z_p·τ), cos(z_p·τ)],  z_p = c/2 − p,  τ_i = 10⁴^(−i/(Da/2 − 1)),  P = c/2 + 1
//! logit(t, s) = 50 · tanh( (q_t·k_s + q_t·R[(L−1) − (t−s)]) / 50 )     soft-cap before the mask
//! allowed(t, s) = 0 ≤ t − s < L − 1                                    12 keys, causal
//! out_t = post( Σ_s softmax_s(logit) · v_s )                            masked keys weigh 0
//! ```
//!
//! with `c = chunk + (L − 1) + right` the context of a block (24) and `L` = `attention_context_left`
//! (13). The relative term is zero when `(L − 1) − (t − s)` falls outside `0..P`. **Hugging Face
//! admits 12 keys per query (distances 0…11); Google's JAX code admits 13 (0…12), matching its 13
//! position rows.** This follows Hugging Face. Masked keys take the finite −1e9 in HF, which
//! gives them exactly zero weight: they are left out of the softmax here.

use ndarray::{Array1, Array2, Array3, Axis};

use crate::config::AudioConfig;
use crate::faults::{fault_active, Fault};
use crate::linear::linear;
use crate::vision::clipped_linear::ClippedLinear;

/// The attention block's weights.
pub struct AudioAttentionWeights {
    /// `[Da, Da]` each (q/k/v share their clip bounds in the released checkpoints).
    pub q_proj: ClippedLinear,
    pub k_proj: ClippedLinear,
    pub v_proj: ClippedLinear,
    /// The output projection `[Da, Da]`.
    pub post: ClippedLinear,
    /// `[Da, Da]`, not clipped.
    pub relative_k_proj: Array2<f32>,
    /// `[H]`
    pub per_dim_scale: Array1<f32>,
}

/// `softplus(x) = ln(1 + eˣ)` as torch computes it (`x` itself above 20).
fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// The sinusoid rows `S` `[P, Da]` of the relative positions (see the module documentation).
pub fn relative_position_rows(config: &AudioConfig) -> Array2<f32> {
    let width = config.hidden_size;
    let timescales = width / 2;
    let increment = (1e4f64.ln() / (timescales.saturating_sub(1).max(1)) as f64) as f32;
    let inverse: Vec<f32> = (0..timescales)
        .map(|i| (i as f32 * -increment).exp())
        .collect();
    let half_context = context_size(config) / 2;
    Array2::from_shape_fn((half_context + 1, width), |(p, column)| {
        let position = (half_context - p) as f32;
        if column < timescales {
            (position * inverse[column]).sin()
        } else {
            (position * inverse[column - timescales]).cos()
        }
    })
}

/// `chunk + (L − 1) + right`: the keys a block of queries sees in Hugging Face's blocked form.
fn context_size(config: &AudioConfig) -> usize {
    config.attention_chunk_size + config.attention_context_left - 1 + config.attention_context_right
}

/// Self-attention over `normed` (`[T, Da]`, valid frames only); returns the `post` output.
pub fn audio_attention(
    normed: &Array2<f32>,
    weights: &AudioAttentionWeights,
    config: &AudioConfig,
) -> Array2<f32> {
    let steps = normed.nrows();
    let heads = config.num_attention_heads;
    let head_dim = config.hidden_size / heads;
    let split = |x: Array2<f32>| -> Array3<f32> {
        x.into_shape_with_order((steps, heads, head_dim))
            .expect("Da = N · H")
    };
    let query_scale = ((head_dim as f64).powf(-0.5) / std::f64::consts::LN_2) as f32;
    let key_scale = ((1.0 + std::f64::consts::E).ln() / std::f64::consts::LN_2) as f32;
    let per_dim: Vec<f32> = weights.per_dim_scale.iter().map(|&s| softplus(s)).collect();
    let mut queries = split(weights.q_proj.apply(normed.view()));
    for mut row in queries.lanes_mut(Axis(2)) {
        for (q, &s) in row.iter_mut().zip(&per_dim) {
            *q = *q * query_scale * s;
        }
    }
    let keys = split(weights.k_proj.apply(normed.view())).mapv(|k| k * key_scale);
    let values = split(weights.v_proj.apply(normed.view()));
    let relative = linear(
        relative_position_rows(config).view(),
        &weights.relative_k_proj,
    );
    let relative = relative
        .into_shape_with_order((context_size(config) / 2 + 1, heads, head_dim))
        .expect("P rows of N · H");

    // Keys per query: distances 0 … L − 2 (12), or L − 1 (13) with the fault.
    let keys_per_query = if fault_active(Fault::AudioWindow13) {
        config.attention_context_left
    } else {
        config.attention_context_left - 1
    };
    let cap = config.attention_logit_cap as f32;
    let left = config.attention_context_left - 1;
    let mut output = Array3::<f32>::zeros((steps, heads, head_dim));
    for h in 0..heads {
        for t in 0..steps {
            let q = queries.slice(ndarray::s![t, h, ..]);
            let first = (t + 1).saturating_sub(keys_per_query);
            let logits: Vec<f32> = (first..=t)
                .map(|s| {
                    let content = q.dot(&keys.slice(ndarray::s![s, h, ..]));
                    let position = left
                        .checked_sub(t - s)
                        .filter(|&p| p < relative.shape()[0])
                        .map_or(0.0, |p| q.dot(&relative.slice(ndarray::s![p, h, ..])));
                    let logit = content + position;
                    if fault_active(Fault::AudioSoftcapMissing) {
                        logit
                    } else {
                        cap * (logit / cap).tanh()
                    }
                })
                .collect();
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let weights_of: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
            let total: f32 = weights_of.iter().sum();
            let mut out = output.slice_mut(ndarray::s![t, h, ..]);
            for (s, w) in (first..=t).zip(&weights_of) {
                out.scaled_add(w / total, &values.slice(ndarray::s![s, h, ..]));
            }
        }
    }
    let concatenated = output
        .into_shape_with_order((steps, heads * head_dim))
        .expect("contiguous");
    weights.post.apply(concatenated.view())
}
