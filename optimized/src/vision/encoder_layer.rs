//! One layer of the vision encoder (shared spec: multimodal §1.3, §5 items 1 and 7).
//!
//! ```text
//! h = x + RMSNorm_{post_attention_layernorm}( Attention( RMSNorm_{input_layernorm}(x) ) )     fused: norm + add
//! y = h + RMSNorm_{post_feedforward_layernorm}( MLP( RMSNorm_{pre_feedforward_layernorm}(h) ) ) fused: norm + add
//!
//! Attention:  q = RoPE2D(RMSNorm_{q_norm}(q_proj(a)))     [n, H, d]   norm first, then RoPE
//!             k = RoPE2D(RMSNorm_{k_norm}(k_proj(a)))     [n, K, d]
//!             v = RMSNorm_∅(v_proj(a))                     [n, K, d]
//!             o = softmax(q · kᵀ) · v      scale 1.0, bidirectional over every patch
//!             out = o_proj(concat_heads(o))
//! MLP:        down_proj( gelu_tanh(gate_proj(x)) · up_proj(x) )
//! ```
//!
//! What is fast: q/k/v (and gate/up) as one parallel group of products on the weights as stored
//! ([`ClippedLinear::apply_group`]; unclipped gate/up fused with the GeGLU, [`linear_geglu`]);
//! the MLP half in chunks of [`MLP_CHUNK_PATCHES`] patches; norms and 2D RoPE in place with one
//! cos/sin table per image;
//! the residual adds fused into the post-norms; attention as blocked matrix products
//! ([`attend_patches`]), never a per-query loop.

use gemma4_reference::config::VisionConfig;
use rayon::prelude::*;

use crate::attention::{matrix_product, softmax_in_place, Strided};
use crate::gelu::geglu_in_place;
use crate::linear::linear_geglu;
use crate::rms_norm::{add_normed, rms_norm, rms_norm_in_place};
use crate::vision::clipped_linear::ClippedLinear;
use crate::vision::rope_2d::Rope2dTable;
use crate::vision::weights::EncoderLayerWeights;

/// Runs one encoder layer on `hidden` (`[n, Dv]`, updated in place); `rope`: the image's 2D
/// RoPE table.
pub fn encoder_layer(
    hidden: &mut [f32],
    n: usize,
    weights: &EncoderLayerWeights,
    config: &VisionConfig,
    rope: &Rope2dTable,
) {
    let eps = config.rms_norm_eps;
    let width = config.hidden_size;
    // Attention block, then its post-norm fused with the residual add.
    let normed = rms_norm(hidden, width, &weights.input_layernorm, eps);
    let attended = attention(&normed, n, weights, config, rope);
    add_normed(
        hidden,
        &attended,
        width,
        &weights.post_attention_layernorm,
        eps,
    );
    // Gated MLP: the clamped gate and up products, GeGLU, the clamped down product; patches
    // are independent here, so it runs in chunks of patches.
    for chunk in hidden.chunks_mut(MLP_CHUNK_PATCHES * width) {
        let rows = chunk.len() / width;
        let normed = rms_norm(chunk, width, &weights.pre_feedforward_layernorm, eps);
        let gate = if weights.gate_proj.bounds.is_none() && weights.up_proj.bounds.is_none() {
            // Unclipped (the large tower): the products and GeGLU fused where the route allows.
            linear_geglu(
                &normed,
                rows,
                &weights.gate_proj.weight,
                &weights.up_proj.weight,
            )
        } else {
            let [mut gate, up]: [Vec<f32>; 2] =
                ClippedLinear::apply_group(&[&weights.gate_proj, &weights.up_proj], &normed, rows)
                    .try_into()
                    .expect("two products");
            geglu_in_place(&mut gate, &up);
            gate
        };
        let mlp = weights.down_proj.apply(&gate, rows);
        add_normed(chunk, &mlp, width, &weights.post_feedforward_layernorm, eps);
    }
}

/// Patches per chunk of the MLP half of [`encoder_layer`]: its `[chunk, F]` gate and up products
/// stay small enough to be reused from the heap layer after layer (at 2304 patches of the large
/// tower, F = 4304, the whole image's were two 40 MB buffers, mapped fresh every layer: 8.7% of
/// the fast tower's time went to their page faults, `perf`) and to stay in cache between the
/// products and the GeGLU. A multiple of the products' token passes (`linear::TOKEN_PASS_ROWS`),
/// so the products are the same bits as on the whole image.
pub const MLP_CHUNK_PATCHES: usize = 512;
const _: () = assert!(MLP_CHUNK_PATCHES.is_multiple_of(crate::linear::TOKEN_PASS_ROWS));

/// The attention block on the normed input `normed` (`[n, Dv]`): returns the `o_proj` output
/// `[n, Dv]`.
pub fn attention(
    normed: &[f32],
    n: usize,
    weights: &EncoderLayerWeights,
    config: &VisionConfig,
    rope: &Rope2dTable,
) -> Vec<f32> {
    let (heads, kv_heads, d) = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    );
    let eps = config.rms_norm_eps;
    let [mut queries, mut keys, mut values]: [Vec<f32>; 3] = ClippedLinear::apply_group(
        &[&weights.q_proj, &weights.k_proj, &weights.v_proj],
        normed,
        n,
    )
    .try_into()
    .expect("three products");
    // Queries and keys: per-head RMSNorm with the learned weight, then 2D RoPE.
    rms_norm_in_place(&mut queries, d, Some(&weights.q_norm), eps);
    rope.apply(&mut queries, heads);
    rms_norm_in_place(&mut keys, d, Some(&weights.k_norm), eps);
    rope.apply(&mut keys, kv_heads);
    // Values: a weight-free RMSNorm, no rotation.
    rms_norm_in_place(&mut values, d, None, eps);
    let mut output = vec![0.0f32; n * heads * d];
    attend_patches(
        &queries,
        &keys,
        &values,
        n,
        [heads, kv_heads, d],
        &mut output,
    );
    // Heads concatenated head-major (`[n, H·d]` is the row-major layout already).
    weights.o_proj.apply(&output, n)
}

/// Query patches per task of [`attend_patches`]: a block's scores are `[B, n]` (at 2520 patches,
/// the budget-280 maximum, 64 rows are 645 KB, in L2) and each key and value row is read once
/// per block and head instead of once per query.
pub const PATCH_BLOCK_ROWS: usize = 128;

/// Bidirectional multi-head attention over all `n` patches, scale 1.0, no mask (only valid
/// patches are given):
///
/// ```text
/// for each block of B query patches and each head h (KV head h' = ⌊h / (H/K)⌋):
///     S = Q[block, h] · K[:, h']ᵀ        [B, n]   (gemm, single-threaded inside the task)
///     P = row softmax of S
///     O[block, h] = P · V[:, h']          [B, d]   written straight into `output`
/// ```
///
/// `queries`: `[n, H, d]`; `keys`, `values`: `[n, K, d]`; `output`: `[n, H, d]`. Blocks run in
/// parallel. Scores and outputs are the reference's dot products summed in another order (and
/// the softmax's `exp` is vectorised), so the two agree to f32 rounding, not bit for bit.
pub fn attend_patches(
    queries: &[f32],
    keys: &[f32],
    values: &[f32],
    n: usize,
    [heads, kv_heads, d]: [usize; 3],
    output: &mut [f32],
) {
    assert_eq!(queries.len(), n * heads * d, "queries are [n, H, d]");
    assert_eq!(keys.len(), n * kv_heads * d, "keys are [n, K, d]");
    assert_eq!(values.len(), n * kv_heads * d, "values are [n, K, d]");
    assert_eq!(output.len(), n * heads * d, "output is [n, H, d]");
    if n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::linear::current_precision() == crate::linear::Precision::Bf16Activations
        && crate::amx::has_amx_bf16()
    {
        return attend_patches_amx(queries, keys, values, n, [heads, kv_heads, d], output);
    }
    #[cfg(target_arch = "x86_64")]
    if crate::gemm512::has_avx512() {
        return attend_patches_avx512(queries, keys, values, n, [heads, kv_heads, d], output);
    }
    attend_patches_portable(queries, keys, values, n, [heads, kv_heads, d], output);
}

/// [`attend_patches`] on any CPU: the `gemm` crate's f32 products on strided views of the heads
/// (no copies).
fn attend_patches_portable(
    queries: &[f32],
    keys: &[f32],
    values: &[f32],
    n: usize,
    [heads, kv_heads, d]: [usize; 3],
    output: &mut [f32],
) {
    let group = heads / kv_heads;
    let row = heads * d;
    output
        .par_chunks_mut(PATCH_BLOCK_ROWS * row)
        .zip(queries.par_chunks(PATCH_BLOCK_ROWS * row))
        .for_each_init(Vec::new, |scores: &mut Vec<f32>, (out, block_queries)| {
            let rows = block_queries.len() / row;
            scores.resize(rows * n, 0.0);
            for h in 0..heads {
                let kv_head = h / group;
                // SAFETY: S is [rows, n] (row stride n); Q_block's rows are `row` floats apart,
                // each head `d` long at h·d; Kᵀ's column j is key j's head kv_head, `kv_heads·d`
                // floats apart, inside `keys`.
                unsafe {
                    matrix_product(
                        [rows, n, d],
                        scores.as_mut_ptr(),
                        n,
                        false,
                        Strided::rows(block_queries.as_ptr().add(h * d), row),
                        Strided::columns(keys.as_ptr().add(kv_head * d), kv_heads * d),
                    )
                };
                for query_scores in scores.chunks_exact_mut(n) {
                    softmax_in_place(query_scores);
                }
                // SAFETY: O_block is this task's `out` ([rows, H, d]): rows `row` floats apart,
                // head h at h·d; P is [rows, n]; V's rows are value heads kv_head, `kv_heads·d`
                // floats apart, inside `values`.
                unsafe {
                    matrix_product(
                        [rows, d, n],
                        out.as_mut_ptr().add(h * d),
                        row,
                        false,
                        Strided::rows(scores.as_ptr(), n),
                        Strided::rows(values.as_ptr().add(kv_head * d), kv_heads * d),
                    )
                };
            }
        });
}

/// [`attend_patches`] on the packed AVX-512 f32 GEMM of the linears ([`crate::gemm512`]), twice
/// the width of the `gemm` crate's AVX2 kernel that the portable path uses (on the E2B tower at
/// budget 280 the attention products took 29% of the time with it). The kernel reads its
/// left operand with contiguous rows and its right operand as the rows of a row-major matrix, so
/// the heads are first copied out head-major (`Q`, `K` as `[H, n, d]`) and the values transposed
/// (`Vᵀ` as `[K, d, n]`): 3·n·H·d floats per layer, against n²·H·d multiply-adds per product.
/// Every score and output element is one sequential f32 FMA chain (the kernel's guarantee).
#[cfg(target_arch = "x86_64")]
fn attend_patches_avx512(
    queries: &[f32],
    keys: &[f32],
    values: &[f32],
    n: usize,
    [heads, kv_heads, d]: [usize; 3],
    output: &mut [f32],
) {
    use crate::gemm512::gemm_rows_f32;
    let group = heads / kv_heads;
    let row = heads * d;
    let queries = head_major(queries, n, heads, d);
    let keys = head_major(keys, n, kv_heads, d);
    let values_t = values_transposed(values, n, kv_heads, d);
    output
        .par_chunks_mut(PATCH_BLOCK_ROWS * row)
        .enumerate()
        .for_each_init(Vec::new, |scores: &mut Vec<f32>, (block, out)| {
            let rows = out.len() / row;
            let first = block * PATCH_BLOCK_ROWS;
            scores.resize(rows * n, 0.0);
            for h in 0..heads {
                let kv_head = h / group;
                // SAFETY: the CPU has AVX-512F (checked by the caller). S = Q_block · Kᵀ:
                // `keys` head kv_head holds n rows of d; the block's queries are `rows` rows of
                // d from row `first` of head h; `scores` is [rows, n].
                unsafe {
                    gemm_rows_f32::<f32>(
                        keys.as_ptr().add(kv_head * n * d),
                        d,
                        0..n,
                        queries.as_ptr().add((h * n + first) * d),
                        rows,
                        scores.as_mut_ptr(),
                        n,
                    )
                };
                for query_scores in scores.chunks_exact_mut(n) {
                    softmax_in_place(query_scores);
                }
                // SAFETY: O_block[:, h] = P · V: `values_t` head kv_head holds d rows of n
                // (Vᵀ); P is [rows, n]; output rows are `row` floats apart, head h at h·d.
                unsafe {
                    gemm_rows_f32::<f32>(
                        values_t.as_ptr().add(kv_head * d * n),
                        n,
                        0..d,
                        scores.as_ptr(),
                        rows,
                        out.as_mut_ptr().add(h * d),
                        row,
                    )
                };
            }
        });
}

/// `[heads, n, d]` of a `[n, heads, d]` buffer (each head's rows contiguous).
fn head_major(x: &[f32], n: usize, heads: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    if n == 0 || d == 0 {
        return out;
    }
    out.par_chunks_mut(n * d).enumerate().for_each(|(h, head)| {
        for (i, dst) in head.chunks_exact_mut(d).enumerate() {
            let at = (i * heads + h) * d;
            dst.copy_from_slice(&x[at..at + d]);
        }
    });
    out
}

/// `[kv_heads, d, n]` of the values `[n, kv_heads, d]`: value head h's column c is row c of its
/// block (`Vᵀ`, the right operand of `P · V` as the kernels read it).
fn values_transposed(values: &[f32], n: usize, kv_heads: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; values.len()];
    if n == 0 || d == 0 {
        return out;
    }
    out.par_chunks_mut(d * n)
        .enumerate()
        .for_each(|(h, block)| {
            for (i, value) in values.chunks_exact(kv_heads * d).enumerate() {
                for (c, &v) in value[h * d..(h + 1) * d].iter().enumerate() {
                    block[c * n + i] = v;
                }
            }
        });
    out
}

/// [`attend_patches`] in the fast mode (`Precision::Bf16Activations` on a CPU with AMX): both
/// products on the tile unit with bf16 operands and f32 sums, as torch's bf16 attention does;
/// the softmax itself in f32. Each product runs with the block's queries (softmax weights) as
/// the tile kernel's "weight" rows and the keys (`Vᵀ`) as its rounded "tokens", so that scores
/// and outputs come out query-major ([`crate::amx::gemm_rows_amx_row_major`]) and each KV head's
/// keys and `Vᵀ` are rounded to bf16 (nearest even) once per layer, not once per block. Not the
/// reference's arithmetic (scores carry relative errors of about 2⁻⁸); never used for dumps,
/// which run in f32.
#[cfg(target_arch = "x86_64")]
fn attend_patches_amx(
    queries: &[f32],
    keys: &[f32],
    values: &[f32],
    n: usize,
    [heads, kv_heads, d]: [usize; 3],
    output: &mut [f32],
) {
    use crate::amx::gemm_rows_amx_row_major;
    use crate::gemm512::{round_to_bf16, round_to_bf16_token_groups_here, softmax_row_to_bf16};
    use half::bf16;
    let group = heads / kv_heads;
    let row = heads * d;
    let queries = head_major(queries, n, heads, d);
    let keys = head_major(keys, n, kv_heads, d);
    let values_t = values_transposed(values, n, kv_heads, d);
    // Per KV head: its keys as n rounded "tokens" of d columns, its `Vᵀ` as d of n.
    let rounded = |x: &[f32], tokens: usize, cols: usize| -> Vec<Vec<u32>> {
        x.par_chunks(tokens * cols)
            .map(|head| {
                let mut out = Vec::new();
                // SAFETY: AVX-512 BF16 is available (AMX implies it, checked by the caller).
                unsafe { round_to_bf16_token_groups_here(head, tokens, cols, &mut out) };
                out
            })
            .collect()
    };
    let key_groups = rounded(&keys, n, d);
    let value_groups = rounded(&values_t, d, n);
    output
        .par_chunks_mut(PATCH_BLOCK_ROWS * row)
        .enumerate()
        .for_each_init(
            || (Vec::new(), Vec::new()),
            |(scores, rows_bf16): &mut (Vec<f32>, Vec<bf16>), (block, out)| {
                let rows = out.len() / row;
                let first = block * PATCH_BLOCK_ROWS;
                scores.resize(rows * n, 0.0);
                for h in 0..heads {
                    let kv_head = h / group;
                    let block_queries = &queries[(h * n + first) * d..(h * n + first + rows) * d];
                    // SAFETY: AMX (and so AVX-512 BF16) is available (checked by the caller).
                    // S = Q_block · Kᵀ, query rows of d bf16 against the head's n rounded keys,
                    // into `scores` [rows, n].
                    unsafe {
                        round_to_bf16(block_queries, rows_bf16);
                        gemm_rows_amx_row_major(
                            rows_bf16.as_ptr(),
                            d,
                            0..rows,
                            key_groups[kv_head].as_ptr(),
                            n,
                            scores.as_mut_ptr(),
                            n,
                        )
                    };
                    // P = softmax rows of S, rounded to bf16 row by row while in cache.
                    rows_bf16.resize(rows * n, bf16::ZERO);
                    for (query_scores, weights) in scores
                        .chunks_exact_mut(n)
                        .zip(rows_bf16.chunks_exact_mut(n))
                    {
                        // SAFETY: AVX-512 BF16 is available (AMX implies it).
                        unsafe { softmax_row_to_bf16(query_scores, weights) };
                    }
                    // SAFETY: O_block[:, h] = P · V: weight rows of n bf16 against the head's d
                    // rounded `Vᵀ` rows; output rows are `row` floats apart, head h at h·d.
                    unsafe {
                        gemm_rows_amx_row_major(
                            rows_bf16.as_ptr(),
                            n,
                            0..rows,
                            value_groups[kv_head].as_ptr(),
                            d,
                            out.as_mut_ptr().add(h * d),
                            row,
                        )
                    };
                }
            },
        );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, random_values, row_major};
    use crate::vision::rope_2d::Rope2dTable;
    use crate::vision::tests::{random_layer, small_vision_config};
    use gemma4_reference::vision::encoder_layer::encoder_layer as reference_encoder_layer;
    use gemma4_reference::vision::rope_2d::inverse_frequencies_2d;
    use proptest::prelude::*;

    /// `o[i, h] = Σ_j softmax_j(q[i, h] · k[j, h']) · v[j, h']` in f64, one query at a time:
    /// the definition, as an oracle for the blocked products.
    fn naive_attention(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        n: usize,
        [heads, kv_heads, d]: [usize; 3],
    ) -> Vec<f32> {
        let group = heads / kv_heads;
        let mut out = vec![0.0f32; n * heads * d];
        for i in 0..n {
            for h in 0..heads {
                let kv = h / group;
                let query = &q[(i * heads + h) * d..][..d];
                let scores: Vec<f64> = (0..n)
                    .map(|j| {
                        let key = &k[(j * kv_heads + kv) * d..][..d];
                        query
                            .iter()
                            .zip(key)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for c in 0..d {
                    let value: f64 = (0..n)
                        .map(|j| weights[j] / total * v[(j * kv_heads + kv) * d + c] as f64)
                        .sum();
                    out[(i * heads + h) * d + c] = value as f32;
                }
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Random patch counts (1–150: one to three query blocks, a partial last one), heads,
        /// KV heads (GQA groups) and head dims, against the f64 definition. Queries and keys of
        /// amplitude 1.2 over d ≤ 24 give scores up to ~10, peaked softmaxes as after q/k norms.
        #[test]
        fn attend_patches_matches_definition_random_shapes(
            n in 1usize..150,
            kv_heads in 1usize..4,
            group in 1usize..3,
            d in 1usize..25,
            seed in 0u64..1000,
        ) {
            let heads = kv_heads * group;
            let q = random_values(n * heads * d, seed, 1.2);
            let k = random_values(n * kv_heads * d, seed + 1, 1.2);
            let v = random_values(n * kv_heads * d, seed + 2, 1.0);
            let expected = naive_attention(&q, &k, &v, n, [heads, kv_heads, d]);
            for (path, run) in f32_paths() {
                let mut got = vec![f32::NAN; n * heads * d];
                run(&q, &k, &v, n, [heads, kv_heads, d], &mut got);
                // f32 scores (≤ 24 terms) and weighted sums (≤ 150 terms) against f64: a
                // score's rounding (~1e-7 of ~10) moves its softmax weight by ~1e-6 relative,
                // and outputs are ≤ 1 (measured ≤ 1e-6). A wrong key, head, scale or
                // normalisation moves outputs by ≥ 1e-2.
                assert_close(&format!("attend_patches ({path})"), &got, &expected, 1e-5);
            }
        }

        /// The fast mode's AMX path (bf16 operands, f32 sums and softmax) against the f64
        /// definition, where the CPU has AMX.
        #[test]
        fn attend_patches_amx_matches_definition_within_bf16_rounding(
            n in 1usize..300,
            kv_heads in 1usize..4,
            group in 1usize..3,
            d in 1usize..25,
            seed in 0u64..1000,
        ) {
            if !crate::amx::has_amx_bf16() {
                return Ok(());
            }
            let heads = kv_heads * group;
            let q = random_values(n * heads * d, seed, 1.2);
            let k = random_values(n * kv_heads * d, seed + 1, 1.2);
            let v = random_values(n * kv_heads * d, seed + 2, 1.0);
            let expected = naive_attention(&q, &k, &v, n, [heads, kv_heads, d]);
            let mut got = vec![f32::NAN; n * heads * d];
            crate::linear::with_precision(crate::linear::Precision::Bf16Activations, || {
                attend_patches(&q, &k, &v, n, [heads, kv_heads, d], &mut got)
            });
            // bf16 operands (unit roundoff 2⁻⁹ = 0.002): a score of ≤ 24 products of ≤ 1.44 moves
            // by ≤ 2·2⁻⁹·Σ|q·k| (~0.05 at most, far less on average), which moves the softmax
            // weights by as much relative; rounding the weights and values adds 2·2⁻⁹. Outputs
            // are ≤ 1: bound 0.03 (measured ≤ 6.2e-3 over 24 random shapes). A wrong key, head or
            // normalisation moves outputs by ≥ 0.1 (the f32 test's 1e-2 floor, at bf16 scale).
            assert_close("attend_patches (AMX)", &got, &expected, 3e-2);
        }
    }

    /// The f32 paths of [`attend_patches`] this CPU can run, by name.
    #[allow(clippy::type_complexity)]
    fn f32_paths() -> Vec<(
        &'static str,
        fn(&[f32], &[f32], &[f32], usize, [usize; 3], &mut [f32]),
    )> {
        let mut paths: Vec<(
            &'static str,
            fn(&[f32], &[f32], &[f32], usize, [usize; 3], &mut [f32]),
        )> = vec![("portable", attend_patches_portable)];
        #[cfg(target_arch = "x86_64")]
        if crate::gemm512::has_avx512() {
            paths.push(("AVX-512", attend_patches_avx512));
        }
        paths
    }

    /// Both engines' encoder layer on a `rows × columns` grid of random patches (layer weights
    /// from `seed`, inputs from `input_seed`): ours and the reference's outputs, row-major.
    fn both_layers(
        config: &VisionConfig,
        rows: usize,
        columns: usize,
        [seed, input_seed]: [u64; 2],
    ) -> (Vec<f32>, Vec<f32>) {
        let positions: Vec<[usize; 2]> = (0..rows * columns)
            .map(|i| [i % columns, i / columns])
            .collect();
        let n = positions.len();
        let (ours, reference) = random_layer(config, seed);
        let x = random_values(n * config.hidden_size, input_seed, 2.0);
        let frequencies = inverse_frequencies_2d(config.head_dim, config.rope_theta);
        let mut got = x.clone();
        encoder_layer(
            &mut got,
            n,
            &ours,
            config,
            &Rope2dTable::new(&frequencies, &positions),
        );
        let expected = reference_encoder_layer(
            &crate::testing::to_array2(n, config.hidden_size, &x),
            &positions,
            &reference,
            config,
            &frequencies,
        );
        (got, row_major(&expected))
    }

    /// More patches than one MLP chunk ([`MLP_CHUNK_PATCHES`]): three chunks, the last one
    /// partial, clipped (the GeGLU after the clamps) and not (the fused product), against the
    /// reference on the whole image. A chunk that skips, repeats or misplaces patches moves
    /// whole rows by the MLP's size.
    #[test]
    fn encoder_layer_in_mlp_chunks_matches_reference() {
        let (rows, columns) = (25, 44);
        let n = rows * columns;
        assert!(n > 2 * MLP_CHUNK_PATCHES && !n.is_multiple_of(MLP_CHUNK_PATCHES));
        for clipped in [true, false] {
            let (got, expected) =
                both_layers(&small_vision_config(clipped, 2), rows, columns, [77, 78]);
            // As the random-layer test below, with attention sums over 1100 patches instead of
            // ≤ 84 (f32 summation error grows with the count, still far below a misplaced row).
            assert_close(
                &format!("encoder_layer ({n} patches, clipped {clipped})"),
                &got,
                &expected,
                5e-6,
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]

        /// A whole encoder layer (clipped or not; 4 query heads on 1, 2 or 4 KV heads) on random
        /// patches of a random grid, against the reference's `encoder_layer`.
        #[test]
        fn encoder_layer_matches_reference_random_layers(
            rows in 1usize..8,
            columns in 1usize..12,
            clipped in any::<bool>(),
            kv_heads in prop::sample::select(vec![1usize, 2, 4]),
            seed in 0u64..1000,
        ) {
            let (got, expected) = both_layers(&small_vision_config(clipped, kv_heads), rows, columns, [seed, seed + 9]);
            let n = rows * columns;
            // Same operations with products (≤ 48 terms) and attention sums (≤ 84 patches) in
            // other orders, amplified by the q/k norms and two post-norms; the residual (≈ 2)
            // dominates the scale. Measured ≤ 1e-6; a dropped clamp, a wrong norm or RoPE axis
            // moves outputs by ≥ 1e-3.
            assert_close(&format!("encoder_layer ({n} patches, clipped {clipped}, KV heads {kv_heads})"), &got, &expected, 5e-6);
        }
    }
}
