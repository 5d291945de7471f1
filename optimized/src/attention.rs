//! Self-attention of one decoder layer (shared spec: text §5, §15.2, §15.3).
//!
//! For head dim `d`, `H` query heads, `K` KV heads, on the normed input `a` `[T, D]`:
//!
//! ```text
//! q = RoPE(RMSNorm_{q_norm}(a · q_projᵀ))                 [T, H, d]
//! k = RoPE(RMSNorm_{k_norm}(a · k_projᵀ))                 [T, K, d]   (own K/V only)
//! v = RMSNorm_∅(a · v_projᵀ)   or, K=V:  RMSNorm_∅(a · k_projᵀ)   — never rotated
//! s[n, i, j] = q[i, n] · k[j, ⌊n / (H/K)⌋]                (scale 1.0)
//! o[i, n] = Σ_j softmax_j(s[n, i, ·]) · v[j, ⌊n / (H/K)⌋]   over the visible keys only
//! output = concat_heads(o) · o_projᵀ                       [T, D]
//! ```
//!
//! What is fast about it: projections through `linear` (weights as stored); norms and RoPE applied
//! in place per head with one cos/sin table per pass; each query walks only its visible key range
//! (`mask::visible_keys`), straight out of the cache segments (a ring for sliding layers), so
//! nothing outside the window is ever scored; (query, head) pairs run in parallel.

use gemma4_reference::dump::Recorder;
use gemma4_reference::layer_plan::LayerPlan;
use gemma4_reference::Result;
use ndarray::{ArrayViewD, IxDyn};
use rayon::prelude::*;

use crate::checkpoint::AttentionWeights;
use crate::kv_cache::{KvCache, Segment};
use crate::linear::linear;
use crate::mask::visible_keys;
use crate::rms_norm::rms_norm_in_place;
use crate::rope::RopeRows;
use crate::simd::{dot, scaled_add};

/// Records a row-major tensor of `shape` held in `data` through the reference's recorder (which
/// checks it is finite, naming the tensor and the first bad index).
pub(crate) fn record(
    recorder: &mut Recorder,
    name: &str,
    shape: &[usize],
    data: &[f32],
) -> Result<()> {
    recorder.record(
        name,
        ArrayViewD::from_shape(IxDyn(shape), data).expect("shape matches the buffer"),
    )
}

/// Runs the attention block for the tokens at `positions` (`normed`: `[T, D]`), staging this
/// layer's new keys and values in `cache` when it owns them, `rope` the RoPE rows of these
/// tokens. Queries (and the output) are computed for rows `first_query..T` only; the rows before
/// contribute keys and values. Returns `[T − first_query, D]`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    layer: &LayerPlan,
    weights: &AttentionWeights,
    normed: &[f32],
    positions: &[usize],
    first_query: usize,
    rope: RopeRows,
    eps: f64,
    cache: &mut KvCache,
    recorder: &mut Recorder,
) -> Result<Vec<f32>> {
    let all_tokens = positions.len();
    let (heads, kv_heads, d) = (layer.num_query_heads, layer.num_kv_heads, layer.head_dim);
    let prefix = format!("layers.{}.attn", layer.index);

    // Queries: project, per-head q_norm, rotate.   [T, H, d]
    let query_positions = &positions[first_query..];
    let tokens = query_positions.len();
    let model_dim = normed.len() / all_tokens.max(1);
    let mut queries = linear(&normed[first_query * model_dim..], tokens, &weights.q_proj);
    rms_norm_in_place(&mut queries, d, Some(&weights.q_norm), eps);
    rope.skip(first_query).apply(&mut queries, heads);
    record(
        recorder,
        &format!("{prefix}.q"),
        &[tokens, heads, d],
        &queries,
    )?;

    // Keys and values of this layer, unless it reads a producer's (KV sharing, text §7).
    if let (Some(k_proj), Some(k_norm)) = (&weights.k_proj, &weights.k_norm) {
        let tokens = all_tokens;
        let raw_keys = linear(normed, tokens, k_proj);
        // K=V layers: the raw key projection is also the raw value (text §5.3).
        let mut values = match &weights.v_proj {
            Some(v_proj) => linear(normed, tokens, v_proj),
            None => raw_keys.clone(),
        };
        let mut keys = raw_keys;
        rms_norm_in_place(&mut keys, d, Some(k_norm), eps);
        rope.apply(&mut keys, kv_heads);
        rms_norm_in_place(&mut values, d, None, eps);
        record(
            recorder,
            &format!("{prefix}.k"),
            &[tokens, kv_heads, d],
            &keys,
        )?;
        record(
            recorder,
            &format!("{prefix}.v"),
            &[tokens, kv_heads, d],
            &values,
        )?;
        cache.stage(layer.index, keys, values);
    }

    let first_visible = *visible_keys(query_positions[0], layer.sliding_window).start();
    let segments = cache.segments(layer.kv_layer(), first_visible);
    let mut output = vec![0.0f32; tokens * heads * d];
    attend(&queries, query_positions, layer, &segments, &mut output);

    let attention_output = linear(&output, tokens, &weights.o_proj);
    record(
        recorder,
        &format!("{prefix}.output"),
        &[tokens, attention_output.len() / tokens],
        &attention_output,
    )?;
    Ok(attention_output)
}

/// `o[i, n] = softmax(q[i, n] · K_visibleᵀ) · V_visible` for every query token and head.
///
/// `queries`: `[T, H, d]`; `segments`: the keys/values `[n, K, d]` at consecutive positions,
/// in position order; `output`: `[T, H, d]`. The softmax subtracts the maximum, sums the
/// exponentials in key order and scales each value by `w_j / Σw`, as the reference does.
pub fn attend(
    queries: &[f32],
    positions: &[usize],
    layer: &LayerPlan,
    segments: &[Segment],
    output: &mut [f32],
) {
    let (heads, kv_heads, d) = (layer.num_query_heads, layer.num_kv_heads, layer.head_dim);
    let group = heads / kv_heads;
    output
        .par_chunks_mut(d)
        .with_min_len(4)
        .enumerate()
        .for_each_init(Vec::new, |scores: &mut Vec<f32>, (index, out)| {
            let (t, n) = (index / heads, index % heads);
            let kv_head = n / group;
            let query = &queries[index * d..(index + 1) * d];
            let visible = visible_keys(positions[t], layer.sliding_window);
            // Scores of the visible keys, in position order.
            scores.clear();
            for segment in segments {
                for j in key_range(segment, &visible) {
                    let key = &segment.keys[(j * kv_heads + kv_head) * d..][..d];
                    scores.push(dot(key, query));
                }
            }
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
            }
            let total: f32 = scores.iter().sum();
            out.fill(0.0);
            let mut k = 0;
            for segment in segments {
                for j in key_range(segment, &visible) {
                    let value = &segment.values[(j * kv_heads + kv_head) * d..][..d];
                    scaled_add(out, scores[k] / total, value);
                    k += 1;
                }
            }
        });
}

/// Indices (within `segment`) of the keys whose positions are in `visible`.
fn key_range(
    segment: &Segment,
    visible: &std::ops::RangeInclusive<usize>,
) -> std::ops::Range<usize> {
    let start = visible
        .start()
        .saturating_sub(segment.first_position)
        .min(segment.len);
    let end = (visible.end() + 1)
        .saturating_sub(segment.first_position)
        .min(segment.len);
    start..end.max(start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Matrix;
    use crate::testing::{assert_close, random_values, to_array2};
    use gemma4_reference::config::{AttentionType, RopeKind, RopeParameters};
    use gemma4_reference::dump::ActivationDump;
    use gemma4_reference::kv_cache::KvCache as ReferenceCache;
    use gemma4_reference::layer_plan::{KvSource, ModelPlan};
    use gemma4_reference::rope::inverse_frequencies;

    use crate::rope::RopeTable;
    use ndarray::Array1;

    /// One layer (sliding with window 3, or full with K=V), fed a 5-token prefill then 3 single
    /// tokens, through both engines: every recorded tensor and the output must agree.
    fn check(attention_type: AttentionType, key_equals_value: bool) {
        let (d_model, heads, kv_heads, d) = (24, 4, 2, 8);
        let rope = match attention_type {
            AttentionType::Sliding => RopeParameters {
                kind: RopeKind::Default,
                theta: 1e4,
                factor: 1.0,
            },
            AttentionType::Full => RopeParameters {
                kind: RopeKind::Proportional {
                    partial_rotary_factor: 0.5,
                },
                theta: 1e6,
                factor: 1.0,
            },
        };
        let layer = LayerPlan {
            index: 0,
            attention_type,
            head_dim: d,
            num_query_heads: heads,
            num_kv_heads: kv_heads,
            key_equals_value,
            kv_source: KvSource::Own {
                shared_with_consumers: false,
            },
            sliding_window: (attention_type == AttentionType::Sliding).then_some(3),
            rope: rope.clone(),
            mlp_width: 8,
            has_per_layer_embedding: false,
            has_moe: false,
        };
        let plan = ModelPlan {
            layers: vec![layer.clone()],
            first_kv_shared_layer: 1,
        };
        let q = random_values(heads * d * d_model, 1, 0.3);
        let k = random_values(kv_heads * d * d_model, 2, 0.3);
        let v = random_values(kv_heads * d * d_model, 3, 0.3);
        let o = random_values(d_model * heads * d, 4, 0.2);
        let q_norm: Vec<f32> = random_values(d, 5, 0.3).iter().map(|x| 1.0 + x).collect();
        let k_norm: Vec<f32> = random_values(d, 6, 0.3).iter().map(|x| 1.0 + x).collect();
        let ours = AttentionWeights {
            q_proj: Matrix::from_f32(heads * d, d_model, q.clone()),
            q_norm: q_norm.clone(),
            k_proj: Some(Matrix::from_f32(kv_heads * d, d_model, k.clone())),
            v_proj: (!key_equals_value).then(|| Matrix::from_f32(kv_heads * d, d_model, v.clone())),
            k_norm: Some(k_norm.clone()),
            o_proj: Matrix::from_f32(d_model, heads * d, o.clone()),
        };
        let reference = gemma4_reference::checkpoint::AttentionWeights {
            q_proj: to_array2(heads * d, d_model, &q),
            q_norm: Array1::from(q_norm),
            k_proj: Some(to_array2(kv_heads * d, d_model, &k)),
            v_proj: (!key_equals_value).then(|| to_array2(kv_heads * d, d_model, &v)),
            k_norm: Some(Array1::from(k_norm.clone())),
            o_proj: to_array2(d_model, heads * d, &o),
        };
        let inv = inverse_frequencies(&rope, d);
        let mut our_cache = KvCache::new(&plan, |_| k_norm.clone(), |_| inv.clone());
        let mut reference_cache = ReferenceCache::new(1);
        let input = random_values(8 * d_model, 7, 1.5);
        let mut start = 0;
        for chunk in [5, 1, 1, 1] {
            let positions: Vec<usize> = (start..start + chunk).collect();
            let x = &input[start * d_model..(start + chunk) * d_model];
            let mut our_dump = ActivationDump::new();
            let got = attention(
                &layer,
                &ours,
                x,
                &positions,
                0,
                RopeTable::new(&inv, &positions).rows_from(0),
                1e-6,
                &mut our_cache,
                &mut Recorder::new(&mut our_dump),
            )
            .unwrap();
            our_cache.commit();
            let mut reference_dump = ActivationDump::new();
            let expected = gemma4_reference::attention::attention(
                &layer,
                &reference,
                &to_array2(chunk, d_model, x),
                &positions,
                &inv,
                1e-6,
                &mut reference_cache,
                &mut Recorder::new(&mut reference_dump),
            )
            .unwrap();
            reference_cache.advance(chunk);
            for name in ["q", "k", "v", "output"] {
                let name = format!("layers.0.attn.{name}");
                let a = our_dump.get(&name).unwrap().as_f32().unwrap();
                let b = reference_dump.get(&name).unwrap().as_f32().unwrap();
                // Projections over D = 24 in another summation order, then norms: a few ulps.
                assert_close(&format!("{name} ({attention_type:?}, K=V {key_equals_value}, positions {positions:?})"), a.as_slice().unwrap(), b.as_slice().unwrap(), 2e-6);
            }
            assert_close("attention output", &got, expected.as_slice().unwrap(), 2e-6);
            start += chunk;
        }
    }

    #[test]
    fn attention_matches_reference_sliding_window_through_ring() {
        check(AttentionType::Sliding, false);
    }

    #[test]
    fn attention_matches_reference_full_key_equals_value() {
        check(AttentionType::Full, true);
    }

    #[test]
    fn attention_matches_reference_full_separate_values() {
        check(AttentionType::Full, false);
    }
}
