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
//! in place per head with one cos/sin table per pass; attention reads the keys and values straight
//! out of the cache segments (a ring for sliding layers) and only over the visible range
//! (`mask::visible_keys`). Up to [`PER_QUERY_MAX_TOKENS`] query tokens (decode), each query walks
//! its own range; more (prefill) go through blocked products, `S = Q·Kᵀ`, softmax, `O = P·V`,
//! per block of about 128 query rows, which score at most a block's length of keys beyond a
//! row's window (weighted 0), never the whole `T × T` matrix.

use gemma4_reference::dump::Recorder;
use gemma4_reference::layer_plan::LayerPlan;
use gemma4_reference::Result;
use ndarray::{ArrayViewD, IxDyn};
use rayon::prelude::*;

use crate::checkpoint::AttentionWeights;
use crate::kv_cache::{KvCache, Segment};
use crate::linear::{linear, linear_group};
use crate::mask::{visible_keys, ImageBlocks};
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
/// contribute keys and values. `blocks`: the pass's image blocks, which see each other's later
/// tokens on sliding layers (multimodal §3.3). Returns `[T − first_query, D]`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    layer: &LayerPlan,
    weights: &AttentionWeights,
    normed: &[f32],
    positions: &[usize],
    first_query: usize,
    rope: RopeRows,
    blocks: &ImageBlocks,
    eps: f64,
    cache: &mut KvCache,
    recorder: &mut Recorder,
) -> Result<Vec<f32>> {
    let all_tokens = positions.len();
    let (heads, kv_heads, d) = (layer.num_query_heads, layer.num_kv_heads, layer.head_dim);
    let prefix = format!("layers.{}.attn", layer.index);

    let query_positions = &positions[first_query..];
    let tokens = query_positions.len();
    let model_dim = normed.len() / all_tokens.max(1);
    // Raw projections: queries of rows `first_query..`, keys and values (K=V: the key
    // projection only) of every row, unless the layer reads a producer's cache (KV sharing,
    // text §7). When they read the same rows, one parallel loop computes them all.
    let own_projections = weights.k_proj.as_ref().zip(weights.k_norm.as_ref());
    let mut all_rows = Vec::new();
    if first_query == 0 {
        all_rows.push(&weights.q_proj);
    }
    if let Some((k_proj, _)) = own_projections {
        all_rows.push(k_proj);
        all_rows.extend(&weights.v_proj);
    }
    let mut projected = linear_group(normed, all_tokens, &all_rows).into_iter();
    let mut queries = match first_query {
        0 => projected.next().expect("q"),
        _ => linear(&normed[first_query * model_dim..], tokens, &weights.q_proj),
    };
    let own_keys_values =
        own_projections.map(|(_, k_norm)| (projected.next().expect("k"), projected.next(), k_norm));
    // Queries: per-head q_norm, rotate.   [T, H, d]
    rms_norm_in_place(&mut queries, d, Some(&weights.q_norm), eps);
    rope.skip(first_query).apply(&mut queries, heads);
    record(
        recorder,
        &format!("{prefix}.q"),
        &[tokens, heads, d],
        &queries,
    )?;

    // Keys and values of this layer: k_norm and RoPE on keys, a scale-free RMSNorm on values.
    if let Some((raw_keys, raw_values, k_norm)) = own_keys_values {
        let tokens = all_tokens;
        // K=V layers: the raw key projection is also the raw value (text §5.3).
        let mut values = raw_values.unwrap_or_else(|| raw_keys.clone());
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

    // Image blocks only extend a range upwards: the first visible key is the window's.
    let first_visible = *visible_keys(
        query_positions[0],
        layer.sliding_window,
        &ImageBlocks::none(),
    )
    .start();
    let segments = cache.segments(layer.kv_layer(), first_visible);
    let mut output = vec![0.0f32; tokens * heads * d];
    attend(
        &queries,
        query_positions,
        layer,
        &segments,
        blocks,
        &mut output,
    );

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
/// in position order (every key visible to a query must be there: image blocks reach into the
/// staged chunk); `blocks`: the pass's image blocks ([`visible_keys`]); `output`: `[T, H, d]`. The softmax subtracts the maximum, sums the
/// exponentials in key order and scales each value by `w_j / Σw`, as the reference does.
///
/// A parallel task is one token and a run of query heads that read the same KV head: the
/// whole group of `H/K` heads (each key and value row is then read once per token and used by
/// every head of the group while it sits in L1: at long context, decode reads the cache once
/// instead of `H/K` times), unless that leaves fewer tasks than threads — one token on a model
/// with fewer KV heads than threads, e.g. E2B's decode (one KV head): then one head per task.
/// Each head's arithmetic is the same either way, so is the result.
pub fn attend(
    queries: &[f32],
    positions: &[usize],
    layer: &LayerPlan,
    segments: &[Segment],
    blocks: &ImageBlocks,
    output: &mut [f32],
) {
    if positions.len() > PER_QUERY_MAX_TOKENS {
        return attend_blocked(queries, positions, layer, segments, blocks, output);
    }
    let (heads, kv_heads, d) = (layer.num_query_heads, layer.num_kv_heads, layer.head_dim);
    let group = heads / kv_heads;
    let heads_per_task = heads_per_task(positions.len(), kv_heads, group);
    output
        .par_chunks_mut(heads_per_task * d)
        .with_min_len(4usize.div_ceil(heads_per_task))
        .enumerate()
        .for_each_init(Vec::new, |scores: &mut Vec<f32>, (task, out)| {
            let first_head = task * heads_per_task % heads;
            let t = task * heads_per_task / heads;
            let kv_head = first_head / group;
            let visible = visible_keys(positions[t], layer.sliding_window, blocks);
            let query = |h: usize| &queries[(t * heads + first_head + h) * d..][..d];
            // Scores of the visible keys, in position order: scores[h·n + j].
            let n: usize = segments.iter().map(|s| key_range(s, &visible).len()).sum();
            scores.clear();
            scores.resize(heads_per_task * n, 0.0);
            let mut j = 0;
            for segment in segments {
                for key_index in key_range(segment, &visible) {
                    let key = &segment.keys[(key_index * kv_heads + kv_head) * d..][..d];
                    for h in 0..heads_per_task {
                        scores[h * n + j] = dot(key, query(h));
                    }
                    j += 1;
                }
            }
            // Softmax weights per head, divided by their sum.
            for head_scores in scores.chunks_mut(n.max(1)) {
                softmax_in_place(head_scores);
            }
            out.fill(0.0);
            let mut j = 0;
            for segment in segments {
                for key_index in key_range(segment, &visible) {
                    let value = &segment.values[(key_index * kv_heads + kv_head) * d..][..d];
                    for (h, head_out) in out.chunks_mut(d).enumerate() {
                        scaled_add(head_out, scores[h * n + j], value);
                    }
                    j += 1;
                }
            }
        });
}

/// Up to this many query tokens (decode, short continuations) [`attend`] works one query token at
/// a time; more go through blocked products (`attend_blocked`).
pub const PER_QUERY_MAX_TOKENS: usize = 8;

/// Query rows (tokens × heads of one KV group) a task of [`attend_blocked`] aims for: enough
/// for each key and value row to be used by many queries while it sits in cache, and for the
/// products to be large enough to run near the `gemm` crate's speed. Criterion
/// `attend_prefill` (1024 tokens, one E2B sliding layer, 2 threads): 32 rows 23.6 ms, 64 rows
/// 21.1 ms, 128 rows 20.3 ms; past a token's window a block scores at most `B − 1` extra keys
/// per row at each end (B = 16 tokens here), a few percent of a 512-key window.
const BLOCK_QUERY_ROWS: usize = 128;

/// [`attend`] for many query tokens: the same attention as matrix products over blocks.
///
/// A task takes a block of `B` consecutive query tokens (`B·(H/K)` ≈ 128 query rows per KV head)
/// and, per KV head, computes
///
/// ```text
/// S = Q_block · K_visibleᵀ        [B·H/K, n]   (n: the keys visible to any token of the block)
/// P = softmax of each row over its own visible keys (the rest weigh 0)
/// O = P · V_visible               [B·H/K, d]
/// ```
///
/// with the `gemm` crate (single-threaded inside the task; tasks run in parallel). Each score
/// and output is a dot product summed in another order than the per-query path's, so the two
/// agree to f32 rounding, not bit for bit (tested); the keys outside a token's own window that
/// a block computes (at most `B − 1` per row at each end) are never weighted.
///
/// Image blocks (bidirectional on sliding layers) extend a token's range to the end of its
/// image: the block's key columns then run to the largest visible end of its tokens, so a block
/// of query rows holding the start of an image scores the whole image (the spec's "the first
/// image token sees the whole image").
fn attend_blocked(
    queries: &[f32],
    positions: &[usize],
    layer: &LayerPlan,
    segments: &[Segment],
    blocks: &ImageBlocks,
    output: &mut [f32],
) {
    let (heads, kv_heads, d) = (layer.num_query_heads, layer.num_kv_heads, layer.head_dim);
    let group = heads / kv_heads;
    let block_tokens = (BLOCK_QUERY_ROWS / group).max(1);
    output
        .par_chunks_mut(block_tokens * heads * d)
        .zip(queries.par_chunks(block_tokens * heads * d))
        .zip(positions.par_chunks(block_tokens))
        .for_each_init(
            BlockScratch::default,
            |scratch, ((out, block_queries), block_positions)| {
                let tokens = block_positions.len();
                let rows = tokens * group;
                // Keys visible to some token of the block: a contiguous run of positions.
                let visible = |p: usize| visible_keys(p, layer.sliding_window, blocks);
                let first = *visible(block_positions[0]).start();
                let last = block_positions
                    .iter()
                    .map(|&p| *visible(p).end())
                    .max()
                    .expect("a block has tokens");
                let union = first..=last;
                // (segment, its visible keys, their first column in S) for each non-empty part.
                let mut parts = Vec::with_capacity(segments.len());
                let mut n = 0;
                for segment in segments {
                    let range = key_range(segment, &union);
                    if !range.is_empty() {
                        let len = range.len();
                        parts.push((segment, range, n));
                        n += len;
                    }
                }
                let first_key_position = parts.first().map_or(first, |(segment, range, _)| {
                    segment.first_position + range.start
                });
                scratch.queries.resize(rows * d, 0.0);
                scratch.scores.resize(rows * n, 0.0);
                scratch.outputs.resize(rows * d, 0.0);
                for kv_head in 0..kv_heads {
                    // Q_block: row i·G + h = query head kv_head·G + h of token i.   [rows, d]
                    for i in 0..tokens {
                        let from = (i * heads + kv_head * group) * d;
                        scratch.queries[i * group * d..(i + 1) * group * d]
                            .copy_from_slice(&block_queries[from..from + group * d]);
                    }
                    // S = Q_block · K_visibleᵀ, segment by segment into its columns.
                    for &(segment, ref range, column) in &parts {
                        let keys = &segment.keys[(range.start * kv_heads + kv_head) * d..];
                        // SAFETY: S is [rows, n] and the columns written, column..column +
                        // range.len(), are inside it; Q_block is [rows, d]; Kᵀ's columns are the
                        // range's key rows, d floats each, kv_heads·d apart, inside `keys`.
                        unsafe {
                            matrix_product(
                                [rows, range.len(), d],
                                scratch.scores.as_mut_ptr().add(column),
                                n,
                                false,
                                Strided::rows(scratch.queries.as_ptr(), d),
                                Strided::columns(keys.as_ptr(), kv_heads * d),
                            )
                        };
                    }
                    // P: each row's softmax over its own token's visible keys, zero elsewhere.
                    let token_rows = scratch.scores.chunks_mut(group * n.max(1));
                    for (rows_of_token, &position) in token_rows.zip(block_positions) {
                        let visible = visible(position);
                        let lo = visible.start().max(&first_key_position) - first_key_position;
                        let hi = (visible.end() + 1 - first_key_position).min(n);
                        for row in rows_of_token.chunks_mut(n.max(1)) {
                            softmax_in_place(&mut row[lo..hi]);
                            row[..lo].fill(0.0);
                            row[hi..].fill(0.0);
                        }
                    }
                    // O = P · V_visible, accumulated over the segments.
                    for (part, &(segment, ref range, column)) in parts.iter().enumerate() {
                        let values = &segment.values[(range.start * kv_heads + kv_head) * d..];
                        // SAFETY: O is [rows, d]; P's columns column..column + range.len() (row
                        // stride n); the range's value rows, d floats each, kv_heads·d apart.
                        unsafe {
                            matrix_product(
                                [rows, d, range.len()],
                                scratch.outputs.as_mut_ptr(),
                                d,
                                part > 0,
                                Strided::rows(scratch.scores.as_ptr().add(column), n),
                                Strided::rows(values.as_ptr(), kv_heads * d),
                            )
                        };
                    }
                    if parts.is_empty() {
                        scratch.outputs.fill(0.0);
                    }
                    for i in 0..tokens {
                        let to = (i * heads + kv_head * group) * d;
                        out[to..to + group * d]
                            .copy_from_slice(&scratch.outputs[i * group * d..(i + 1) * group * d]);
                    }
                }
            },
        );
}

/// Per-thread buffers of [`attend_blocked`].
#[derive(Default)]
struct BlockScratch {
    queries: Vec<f32>,
    scores: Vec<f32>,
    outputs: Vec<f32>,
}

/// A matrix operand of [`matrix_product`]: element `(i, j)` at `start + i·row_stride +
/// j·column_stride` (floats).
#[derive(Clone, Copy)]
pub(crate) struct Strided {
    start: *const f32,
    row_stride: usize,
    column_stride: usize,
}

impl Strided {
    /// Rows `row_stride` apart, each contiguous.
    pub(crate) fn rows(start: *const f32, row_stride: usize) -> Strided {
        Strided {
            start,
            row_stride,
            column_stride: 1,
        }
    }

    /// The transpose of rows `column_stride` apart: column `j` is stored row `j`.
    pub(crate) fn columns(start: *const f32, column_stride: usize) -> Strided {
        Strided {
            start,
            row_stride: 1,
            column_stride,
        }
    }
}

/// `dst ← lhs · rhs` (or `dst + lhs · rhs` when `accumulate`) for `[m, n, k]`: `dst` `[m, n]`
/// with rows `dst_row_stride` apart, `lhs` `[m, k]`, `rhs` `[k, n]`; the `gemm` crate on this
/// thread.
///
/// # Safety
/// Every element addressed by the three shapes and strides is valid (`dst` for writes).
pub(crate) unsafe fn matrix_product(
    [m, n, k]: [usize; 3],
    dst: *mut f32,
    dst_row_stride: usize,
    accumulate: bool,
    lhs: Strided,
    rhs: Strided,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_row_stride as isize,
        accumulate,
        lhs.start,
        lhs.column_stride as isize,
        lhs.row_stride as isize,
        rhs.start,
        rhs.column_stride as isize,
        rhs.row_stride as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// `w_j = exp(s_j − max s) / Σ exp(s − max s)` ([`crate::simd::softmax_in_place`]: the `exp`
/// vectorised within 2 ulp of the reference's, the sum in 8 partial sums).
pub(crate) fn softmax_in_place(scores: &mut [f32]) {
    crate::simd::softmax_in_place(scores);
}

/// Query heads per parallel task of [`attend`] on the current rayon pool: the whole group of
/// heads sharing a KV head, unless `tokens · kv_heads` tasks would leave threads idle.
fn heads_per_task(tokens: usize, kv_heads: usize, group: usize) -> usize {
    if tokens * kv_heads >= rayon::current_num_threads() {
        group
    } else {
        1
    }
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
    use gemma4_reference::layer_plan::ModelPlan;
    use gemma4_reference::rope::inverse_frequencies;

    use crate::rope::RopeTable;
    use ndarray::Array1;

    /// Keys and values of positions `0..n` (`row` floats each) as two cache segments split at
    /// position `split`, as a ring buffer presents them.
    fn split_at_position<'a>(
        keys: &'a [f32],
        values: &'a [f32],
        row: usize,
        split: usize,
    ) -> [Segment<'a>; 2] {
        let n = keys.len() / row;
        [
            Segment {
                first_position: 0,
                len: split,
                keys: &keys[..split * row],
                values: &values[..split * row],
            },
            Segment {
                first_position: split,
                len: n - split,
                keys: &keys[split * row..],
                values: &values[split * row..],
            },
        ]
    }

    /// `attend` splits its work by (token, KV-head group) or, when that leaves threads idle, by
    /// (token, head): every head's output must be the same bit for bit either way. The same
    /// queries are attended as one 7-token call on one thread (grouped) and as seven 1-token
    /// calls on four threads (per head) over the same cache segments (two segments, as a ring
    /// buffer gives), with 2 KV heads of 3 query heads each, sliding window 4 and full attention.
    #[test]
    fn attend_grouped_by_kv_head_equals_one_head_per_task() {
        let (heads, kv_heads, d, tokens) = (6, 2, 16, 7);
        for window in [Some(4), None] {
            let layer = crate::synthetic::attention_layer(d, heads, kv_heads, window);
            let keys = random_values(tokens * kv_heads * d, 31, 1.0);
            let values = random_values(tokens * kv_heads * d, 32, 1.0);
            let queries = random_values(tokens * heads * d, 33, 1.0);
            let segments = split_at_position(&keys, &values, kv_heads * d, 3);
            let positions: Vec<usize> = (0..tokens).collect();
            let pool = |threads| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap()
            };
            // Grouped: 7 tokens · 2 KV heads ≥ 1 thread. Per head: 1 token · 2 KV heads < 4.
            let (grouped_pool, per_head_pool) = (pool(1), pool(4));
            assert_eq!(
                grouped_pool.install(|| heads_per_task(tokens, kv_heads, 3)),
                3
            );
            assert_eq!(per_head_pool.install(|| heads_per_task(1, kv_heads, 3)), 1);
            let mut together = vec![0.0f32; tokens * heads * d];
            let none = ImageBlocks::none();
            grouped_pool.install(|| {
                attend(
                    &queries,
                    &positions,
                    &layer,
                    &segments,
                    &none,
                    &mut together,
                )
            });
            let row = heads * d;
            for t in 0..tokens {
                let mut alone = vec![0.0f32; row];
                per_head_pool.install(|| {
                    attend(
                        &queries[t * row..(t + 1) * row],
                        &positions[t..t + 1],
                        &layer,
                        &segments,
                        &none,
                        &mut alone,
                    )
                });
                for (i, (a, b)) in together[t * row..(t + 1) * row]
                    .iter()
                    .zip(&alone)
                    .enumerate()
                {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "window {window:?}: token {t} head {} element {}: grouped {a} vs per-head {b}",
                        i / d,
                        i % d
                    );
                }
            }
            // And the values are attention, not zeros: the last token sees several keys.
            assert!(together.iter().any(|v| *v != 0.0));
        }
    }

    /// The blocked path (more than `PER_QUERY_MAX_TOKENS` query tokens) against the per-query
    /// path, one token at a time: 21 queries at positions 6..27 after a cache of 6 positions, keys
    /// in two segments (a ring's split at position 11, inside a block), for a sliding window
    /// narrower than a block (so blocks compute keys outside some rows' windows), one wider, and
    /// full attention; KV groups of 3 (one block of all 21 tokens) and of 8 (blocks of 16 and 5);
    /// without image blocks, with one image of 12 tokens (longer than the window 4, crossing the
    /// boundary between the two query blocks of the 8-group case) and with two images.
    #[test]
    #[allow(clippy::single_range_in_vec_init)] // one block, positions 8..20
    fn attend_blocked_equals_per_query_attention() {
        let (d, first, tokens) = (16, 6, 21);
        let total = first + tokens;
        let layouts = [
            ImageBlocks::none(),
            ImageBlocks::from_ranges(vec![8..20]),
            ImageBlocks::from_ranges(vec![7..12, 13..26]),
        ];
        for (heads, kv_heads) in [(6, 2), (8, 1)] {
            for window in [Some(4), Some(15), None] {
                for blocks in &layouts {
                    let layer = crate::synthetic::attention_layer(d, heads, kv_heads, window);
                    let keys = random_values(total * kv_heads * d, 41, 1.0);
                    let values = random_values(total * kv_heads * d, 42, 1.0);
                    let queries = random_values(tokens * heads * d, 43, 1.0);
                    let segments = split_at_position(&keys, &values, kv_heads * d, 11);
                    let positions: Vec<usize> = (first..total).collect();
                    assert!(tokens > PER_QUERY_MAX_TOKENS);
                    let mut blocked = vec![f32::NAN; tokens * heads * d];
                    attend(
                        &queries,
                        &positions,
                        &layer,
                        &segments,
                        blocks,
                        &mut blocked,
                    );
                    let row = heads * d;
                    let mut per_query = vec![f32::NAN; tokens * row];
                    for t in 0..tokens {
                        attend(
                            &queries[t * row..(t + 1) * row],
                            &positions[t..t + 1],
                            &layer,
                            &segments,
                            blocks,
                            &mut per_query[t * row..(t + 1) * row],
                        );
                    }
                    // Both are softmax-weighted sums of the same f32 products, summed in other
                    // orders (16-term scores; up to 27 weighted values, fused vs unfused): a few
                    // ulps of the largest output (≈ 1), far below any indexing or masking slip
                    // (which moves outputs by ≈ 0.1).
                    assert_close(
                        &format!(
                            "heads {heads}, KV heads {kv_heads}, window {window:?}, blocks {:?}",
                            blocks.ranges()
                        ),
                        &blocked,
                        &per_query,
                        2e-6,
                    );
                }
            }
        }
    }

    /// One layer (sliding with window 3, or full with K=V), fed `tokens` in `chunks` (a prefill,
    /// then single tokens through the cache), through both engines with the image blocks of each
    /// chunk's tokens (`"vision"` config: image id 9, video id 8): every recorded tensor and the
    /// output must agree.
    fn check(
        attention_type: AttentionType,
        key_equals_value: bool,
        tokens: &[usize],
        chunks: &[usize],
    ) {
        let config = crate::testing::vision_config(Some("vision"), true);
        assert_eq!(chunks.iter().sum::<usize>(), tokens.len());
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
        let window = (attention_type == AttentionType::Sliding).then_some(3);
        let layer = LayerPlan {
            key_equals_value,
            rope: rope.clone(),
            ..crate::synthetic::attention_layer(d, heads, kv_heads, window)
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
        let input = random_values(tokens.len() * d_model, 7, 1.5);
        let mut start = 0;
        for &chunk in chunks {
            let positions: Vec<usize> = (start..start + chunk).collect();
            let ids = &tokens[start..start + chunk];
            let reference_blocks = gemma4_reference::mask::ImageBlocks::of(&config, ids, start);
            let blocks = ImageBlocks::of(&config, ids, start);
            let x = &input[start * d_model..(start + chunk) * d_model];
            let mut our_dump = ActivationDump::new();
            let got = attention(
                &layer,
                &ours,
                x,
                &positions,
                0,
                RopeTable::new(&inv, &positions).rows_from(0),
                &blocks,
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
                &reference_blocks,
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

    const TEXT: [usize; 8] = [1; 8];

    #[test]
    fn attention_matches_reference_sliding_window_through_ring() {
        check(AttentionType::Sliding, false, &TEXT, &[5, 1, 1, 1]);
    }

    #[test]
    fn attention_matches_reference_full_key_equals_value() {
        check(AttentionType::Full, true, &TEXT, &[5, 1, 1, 1]);
    }

    #[test]
    fn attention_matches_reference_full_separate_values() {
        check(AttentionType::Full, false, &TEXT, &[5, 1, 1, 1]);
    }

    /// Two images in a 20-token prefill (blocked path), the first of 7 tokens, longer than the
    /// window 3, the second a video frame of 4, then decode steps through the ring: sliding
    /// layers attend bidirectionally inside each image, full layers stay causal.
    #[test]
    fn attention_matches_reference_image_blocks_prefill_then_decode() {
        let tokens =
            crate::testing::layout_tokens(2, &[(7, 1, false), (4, 2, true), (0, 2, false)]);
        assert_eq!(tokens.len(), 24);
        for (attention_type, key_equals_value) in
            [(AttentionType::Sliding, false), (AttentionType::Full, true)]
        {
            check(attention_type, key_equals_value, &tokens, &[20, 1, 1, 1, 1]);
            // A short prefill (per-query path) and one that ends inside the first image.
            check(
                attention_type,
                key_equals_value,
                &tokens,
                &[6, 14, 1, 1, 1, 1],
            );
            check(attention_type, key_equals_value, &tokens, &[7, 17]);
        }
    }
}
