//! Chunked local self-attention with a relative position term (shared spec: multimodal §2.4,
//! §5 item 8), in blocks: each chunk of queries attends only to its own window of keys, so a
//! clip of `T` frames costs `O(T · context)`, never `O(T²)`.
//!
//! ```text
//! q = q_proj(x) · (H^−½ / ln 2) · softplus(per_dim_scale)      [T, N, H]   (clipped linears)
//! k = k_proj(x) · (ln(1 + e) / ln 2)                            [T, N, H]
//! v = v_proj(x)                                                 [T, N, H]
//! R = relative_k_proj(S)                                        [P, N, H]   (not clipped)
//!     S[p] = [sin(z_p·τ), cos(z_p·τ)],  z_p = c/2 − p,  τ_i = 10⁴^(−i/(Da/2 − 1)),  P = c/2 + 1
//! logit(t, s) = 50 · tanh( (q_t·k_s + q_t·R[(L−1) − (t−s)]) / 50 )     soft-cap before the mask
//! allowed(t, s) = 0 ≤ t − s < L − 1                                    12 keys, causal
//! logit(t, s) = −1e9 where not allowed                                 finite, as Hugging Face
//! out_t = post( Σ_s softmax_s(logit) · v_s )
//! ```
//!
//! `c = chunk + (L − 1) + right` is the context of Hugging Face's blocks (24), `L` =
//! `attention_context_left` (13); the relative term is zero where `(L − 1) − (t − s)` falls
//! outside `0..P`. Hugging Face admits 12 keys per query (distances 0…11), Google's JAX code 13;
//! this follows Hugging Face, like the reference (`gemma4_reference::audio::attention`, which
//! writes the same sum densely).
//!
//! Blocked form: the queries are cut into chunks of `attention_chunk_size` (12); chunk
//! `[t₀, t₀ + C)` sees keys `[t₀ + 1 − (L − 1), t₀ + C)` (at most `C + L − 2` = 23). Per chunk
//! and head, the position scores `q_t · R[p]` of its queries are computed once for all `P` rows
//! (`[C, P]`), the content scores `q_t · k_s` over the window, and the window's masked,
//! soft-capped softmax weights the values. Chunks run in parallel on the pool; the four
//! products (q/k/v grouped on one clamped input, and `post`) are GEMMs on the weights as stored.

use gemma4_reference::audio::attention::relative_position_rows;
use gemma4_reference::config::AudioConfig;
use rayon::prelude::*;

use crate::audio::weights::AudioAttentionWeights;
use crate::linear::linear;
use crate::parallel::for_each_row;
use crate::simd::dot;
use crate::vision::clipped_linear::ClippedLinear;

/// The logit of a masked key (Hugging Face's `attention_invalid_logits_value`): finite, so a
/// masked key weighs exactly `e^{−1e9 − max} = 0`.
pub const MASKED_LOGIT: f32 = -1e9;

/// `softplus(x) = ln(1 + eˣ)` as torch computes it (`x` itself above 20).
fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// `chunk + (L − 1) + right`: the keys a block of queries sees in Hugging Face's blocked form.
fn context_size(config: &AudioConfig) -> usize {
    config.attention_chunk_size + config.attention_context_left - 1 + config.attention_context_right
}

/// Self-attention over `normed` (`[T, Da]`, valid frames only); returns the `post` output
/// `[T, Da]`.
pub fn audio_attention(
    normed: &[f32],
    steps: usize,
    weights: &AudioAttentionWeights,
    config: &AudioConfig,
) -> Vec<f32> {
    let width = config.hidden_size;
    let heads = config.num_attention_heads;
    let head_dim = width / heads;
    assert_eq!(normed.len(), steps * width, "normed is [T, Da]");
    let [mut queries, mut keys, values]: [Vec<f32>; 3] = ClippedLinear::apply_group(
        &[&weights.q_proj, &weights.k_proj, &weights.v_proj],
        normed,
        steps,
    )
    .try_into()
    .expect("three products");
    // q ← q · (H^−½ / ln 2) · softplus(per_dim_scale), k ← k · (ln(1 + e) / ln 2).
    let query_scale = ((head_dim as f64).powf(-0.5) / std::f64::consts::LN_2) as f32;
    let key_scale = ((1.0 + std::f64::consts::E).ln() / std::f64::consts::LN_2) as f32;
    let per_dim: Vec<f32> = weights.per_dim_scale.iter().map(|&s| softplus(s)).collect();
    for_each_row(&mut queries, head_dim, |_, q| {
        for (v, &s) in q.iter_mut().zip(&per_dim) {
            *v = *v * query_scale * s;
        }
    });
    keys.par_chunks_mut(16 * 1024)
        .for_each(|chunk| chunk.iter_mut().for_each(|k| *k *= key_scale));
    // R = relative_k_proj(S): [P, N·H], the same for every chunk.
    let rows = relative_position_rows(config);
    let positions = rows.nrows();
    let rows = rows.as_standard_layout();
    let relative = linear(
        rows.as_slice().expect("standard layout"),
        positions,
        &weights.relative_k_proj,
    );
    let mut output = vec![0.0f32; steps * width];
    attend_chunks(
        [&queries, &keys, &values, &relative],
        steps,
        [heads, head_dim, positions],
        config,
        &mut output,
    );
    weights.post.apply(&output, steps)
}

/// `buffer[start..start + len]`: one head of one row.
#[inline]
fn head_of(buffer: &[f32], start: usize, len: usize) -> &[f32] {
    &buffer[start..start + len]
}

/// The blocked attention core: `queries`, `keys`, `values` `[T, N, H]` (scaled), `relative`
/// `[P, N, H]`; writes `output` `[T, N, H]`. Chunks of `attention_chunk_size` queries run in
/// parallel, each over its own key window (see the module documentation).
pub fn attend_chunks(
    [queries, keys, values, relative]: [&[f32]; 4],
    steps: usize,
    [heads, head_dim, positions]: [usize; 3],
    config: &AudioConfig,
    output: &mut [f32],
) {
    let width = heads * head_dim;
    assert_eq!(relative.len(), positions * width, "relative is [P, N·H]");
    for (buffer, what) in [(queries, "queries"), (keys, "keys"), (values, "values")] {
        assert_eq!(buffer.len(), steps * width, "{what} are [T, N·H]");
    }
    assert_eq!(output.len(), steps * width, "output is [T, N·H]");
    let chunk = config.attention_chunk_size.max(1);
    // Keys per query: distances 0 … L − 2; the one before the first is the last one allowed.
    let keys_per_query = config.attention_context_left - 1;
    let left = config.attention_context_left - 1;
    let cap = config.attention_logit_cap as f32;
    // A chunk's window is inside Hugging Face's block context (23 of 24 keys).
    debug_assert!(chunk + keys_per_query - 1 <= context_size(config));
    output
        .par_chunks_mut(chunk * width)
        .enumerate()
        .for_each_init(
            || (Vec::new(), Vec::new()),
            |(position_scores, logits): &mut (Vec<f32>, Vec<f32>), (c, out)| {
                let first_query = c * chunk;
                let queries_here = out.len() / width;
                let end = first_query + queries_here;
                // The chunk's key window.
                let first_key = (first_query + 1).saturating_sub(keys_per_query);
                let window = end - first_key;
                out.fill(0.0);
                for h in 0..heads {
                    let head = |buffer, row| head_of(buffer, row * width + h * head_dim, head_dim);
                    // Position scores q_t · R[p] of this chunk's queries: [C, P].
                    position_scores.clear();
                    for i in 0..queries_here {
                        let q = head(queries, first_query + i);
                        position_scores.extend((0..positions).map(|p| dot(head(relative, p), q)));
                    }
                    for i in 0..queries_here {
                        let t = first_query + i;
                        let q = head(queries, t);
                        logits.clear();
                        logits.extend((first_key..end).map(|s| {
                            if s > t || t - s >= keys_per_query {
                                return MASKED_LOGIT;
                            }
                            let content = dot(head(keys, s), q);
                            let position = left
                                .checked_sub(t - s)
                                .filter(|&p| p < positions)
                                .map_or(0.0, |p| position_scores[i * positions + p]);
                            let logit = content + position;
                            cap * (logit / cap).tanh()
                        }));
                        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        logits.iter_mut().for_each(|l| *l = (*l - max).exp());
                        let total: f32 = logits.iter().sum();
                        let o = &mut out[i * width + h * head_dim..][..head_dim];
                        for (j, &weight) in logits.iter().enumerate().take(window) {
                            if weight == 0.0 {
                                continue;
                            }
                            let a = weight / total;
                            for (ov, &vv) in o.iter_mut().zip(head(values, first_key + j)) {
                                *ov += a * vv;
                            }
                        }
                    }
                }
            },
        );
}
