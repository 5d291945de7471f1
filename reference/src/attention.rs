//! Self-attention of one decoder layer (shared spec: text §5, §15.2, §15.3).
//!
//! For a layer with head dim `d`, `H` query heads and `K` KV heads, on the normed input
//! `a` (`[T, D]`):
//!
//! ```text
//! q = RoPE(RMSNorm_{q_norm}(a · q_projᵀ))                 [T, H, d]
//! k = RoPE(RMSNorm_{k_norm}(a · k_projᵀ))                 [T, K, d]   (own K/V only)
//! v = RMSNorm_∅(a · v_projᵀ)   or, K=V:  RMSNorm_∅(a · k_projᵀ)   — never rotated
//! s[n, i, j] = q[i, n] · k[j, ⌊n / (H/K)⌋]                (scale 1.0: no 1/√d)
//! o[i, n] = Σ_j softmax_j(s[n, i, ·] over visible keys) · v[j, ⌊n / (H/K)⌋]
//! output = concat_heads(o) · o_projᵀ                       [T, D]
//! ```
//!
//! A KV-shared layer computes only `q` and attends over its producer's cached keys and values.

use ndarray::{Array2, Array3, Axis};

use crate::checkpoint::AttentionWeights;
use crate::dump::Recorder;
use crate::error::{Error, Result};
use crate::faults::{fault_active, Fault};
use crate::kv_cache::KvCache;
use crate::layer_plan::LayerPlan;
use crate::linear::linear;
use crate::mask::{key_is_visible, ImageBlocks};
use crate::precision::{
    flash_attention_row, precision_active, round_f16, store_cache_row, PrecisionChoice,
    FLASH_ATTENTION_TILE_ROWS,
};
use crate::rms_norm::rms_norm_heads;
use crate::rope::apply_rope;

/// Runs the attention block; appends this layer's new K/V to the cache when it owns them.
///
/// `normed_input`: `[T, D]` (after `input_layernorm`); `positions`: absolute position of each of
/// the `T` tokens; `inverse_frequencies`: this layer type's RoPE table; `blocks`: the image
/// blocks of this pass (bidirectional on sliding layers, [`crate::mask`]). Returns `[T, D]`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    layer: &LayerPlan,
    weights: &AttentionWeights,
    normed_input: &Array2<f32>,
    positions: &[usize],
    inverse_frequencies: &[f32],
    blocks: &ImageBlocks,
    eps: f64,
    cache: &mut KvCache,
    recorder: &mut Recorder,
) -> Result<Array2<f32>> {
    let tokens = normed_input.nrows();
    let (heads, kv_heads, head_dim) = (layer.num_query_heads, layer.num_kv_heads, layer.head_dim);
    let prefix = format!("layers.{}.attn", layer.index);

    // Queries: project, per-head RMSNorm with the learned q_norm, rotate.   [T, H, d]
    let mut queries = linear(normed_input.view(), &weights.q_proj)
        .into_shape_with_order((tokens, heads, head_dim))
        .expect("q_proj has H·d rows");
    queries = rms_norm_heads(&queries, Some(&weights.q_norm), eps);
    apply_rope(&mut queries, positions, inverse_frequencies);
    recorder.record(&format!("{prefix}.q"), queries.view().into_dyn())?;

    // Keys and values of this layer, unless it reads a producer's (KV sharing, text §7).
    if let (Some(k_proj), Some(k_norm)) = (&weights.k_proj, &weights.k_norm) {
        let raw_keys = linear(normed_input.view(), k_proj)
            .into_shape_with_order((tokens, kv_heads, head_dim))
            .expect("k_proj has K·d rows");
        // K=V layers have no v_proj: the raw key projection is also the raw value (text §5.3).
        let raw_values = match &weights.v_proj {
            Some(v_proj) => linear(normed_input.view(), v_proj)
                .into_shape_with_order((tokens, kv_heads, head_dim))
                .expect("v_proj has K·d rows"),
            None => raw_keys.clone(),
        };
        let mut keys = rms_norm_heads(&raw_keys, Some(k_norm), eps);
        apply_rope(&mut keys, positions, inverse_frequencies);
        // V: a weight-free RMSNorm, and no RoPE.
        let mut values = if fault_active(Fault::VNormMissing) {
            raw_values
        } else {
            rms_norm_heads(&raw_values, None, eps)
        };
        if fault_active(Fault::KeyEqualsValueFromFinalKey) && layer.key_equals_value {
            values = keys.clone();
        }
        if fault_active(Fault::ValueRotated) {
            apply_rope(&mut values, positions, inverse_frequencies);
        }
        recorder.record(&format!("{prefix}.k"), keys.view().into_dyn())?;
        recorder.record(&format!("{prefix}.v"), values.view().into_dyn())?;
        // A runtime with a float16 or Q8_0 cache reads back what it stored, the prompt's own
        // keys and values included (precision choices; float32: unchanged).
        for row in keys.outer_iter_mut().chain(values.outer_iter_mut()) {
            store_cache_row(row.into_slice().expect("contiguous [K, d] row"));
        }
        cache.append(layer.index, keys, values);
    }

    let cached = cache
        .layer(layer.kv_layer())
        .expect("the producer layer runs before its consumers and fills the cache");
    let (all_keys, all_values) = (&cached.keys, &cached.values);
    let key_count = all_keys.len_of(Axis(0));
    let (_, cached_kv_heads, cached_head_dim) = all_keys.dim();
    if (cached_kv_heads, cached_head_dim) != (kv_heads, head_dim) {
        // Config validation rules this out; a fault that picks another producer can break it.
        return Err(Error::input(format!(
            "layer {} reads the K/V cache of layer {}, which holds {cached_kv_heads} heads of dim {cached_head_dim}, but it needs {kv_heads} heads of dim {head_dim}",
            layer.index,
            layer.kv_layer()
        )));
    }

    // The scores are not scaled: q_norm and k_norm take that role (text §5.4).
    let scale = if fault_active(Fault::AttentionScaleInvSqrtD) {
        1.0 / (head_dim as f32).sqrt()
    } else {
        1.0
    };
    let group_size = heads / kv_heads;
    // Precision choices of the attention arithmetic (float32 when none is on).
    let flash_vector_path = precision_active(PrecisionChoice::FlashAttentionF16)
        && (tokens < FLASH_ATTENTION_TILE_ROWS || precision_active(PrecisionChoice::KvCacheQ8_0));
    let f16_operands =
        !flash_vector_path && precision_active(PrecisionChoice::AttentionF16Operands);
    let mut output = Array3::<f32>::zeros((tokens, heads, head_dim));
    for n in 0..heads {
        // Contiguous GQA groups: query head n reads KV head ⌊n / (H/K)⌋.
        let kv_head = if fault_active(Fault::GqaHeadModulo) {
            n % kv_heads
        } else {
            n / group_size
        };
        for (i, &query_position) in positions.iter().enumerate() {
            // The visible keys; masked keys are left out of the softmax entirely.
            let visible: Vec<usize> = (0..key_count)
                .filter(|&j| key_is_visible(layer, query_position, j, blocks))
                .collect();
            if flash_vector_path {
                // Precision choice: ggml's flash-attention vector path (precision.rs).
                let rows = |cache: &Array3<f32>| -> Vec<Vec<f32>> {
                    visible
                        .iter()
                        .map(|&j| cache.slice(ndarray::s![j, kv_head, ..]).to_vec())
                        .collect()
                };
                let (key_rows, value_rows) = (rows(all_keys), rows(all_values));
                let row = flash_attention_row(
                    &queries.slice(ndarray::s![i, n, ..]).to_vec(),
                    &key_rows.iter().map(Vec::as_slice).collect::<Vec<_>>(),
                    &value_rows.iter().map(Vec::as_slice).collect::<Vec<_>>(),
                    scale,
                );
                output
                    .slice_mut(ndarray::s![i, n, ..])
                    .assign(&ndarray::ArrayView1::from(&row));
                continue;
            }
            let mut query = queries.slice(ndarray::s![i, n, ..]).to_owned();
            if f16_operands {
                // Precision choice: q meets a float16 cache as a float16 operand.
                query.mapv_inplace(round_f16);
            }
            let scores: Vec<(usize, f32)> = visible
                .iter()
                .map(|&j| {
                    let key = all_keys.slice(ndarray::s![j, kv_head, ..]);
                    (j, query.dot(&key) * scale)
                })
                .collect();
            let max = scores
                .iter()
                .map(|&(_, s)| s)
                .fold(f32::NEG_INFINITY, f32::max);
            let weights: Vec<f32> = scores.iter().map(|&(_, s)| (s - max).exp()).collect();
            let total: f32 = weights.iter().sum();
            let mut out = output.slice_mut(ndarray::s![i, n, ..]);
            for (&(j, _), &w) in scores.iter().zip(&weights) {
                let mut probability = w / total;
                if f16_operands {
                    // Precision choice: p meets a float16 cache as a float16 operand.
                    probability = round_f16(probability);
                }
                out.scaled_add(probability, &all_values.slice(ndarray::s![j, kv_head, ..]));
            }
        }
    }

    // Concatenate heads head-major ([T, H·d]) and project back to D.
    let concatenated = output
        .into_shape_with_order((tokens, heads * head_dim))
        .expect("contiguous");
    let attention_output = linear(concatenated.view(), &weights.o_proj);
    recorder.record(
        &format!("{prefix}.output"),
        attention_output.view().into_dyn(),
    )?;
    Ok(attention_output)
}
