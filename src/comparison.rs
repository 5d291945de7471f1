//! Tensor-by-tensor comparison of activation dumps, and the tolerance policy.
//!
//! Every float tensor is judged by its largest absolute error **relative to its largest
//! element**: `max|candidate − expected| / max|expected| ≤ tolerance`. Scaling by the tensor's
//! own magnitude makes one number meaningful for logits (≈ 5–30), normalised activations (≈ 1)
//! and tiny router weights alike, and is immune to the near-zero elements that make an
//! element-wise relative error explode. The element-wise relative error is reported too.
//! Index tensors (`input_ids`, `router.top_k_index`, `greedy_continuation`) must match exactly.

use gemma4_reference::dump::{ActivationDump, DumpTensor};
use ndarray::ArrayD;

/// Why a tensor passed or failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Within tolerance.
    Pass,
    /// Beyond the fixed tolerance, but within this model's own float-noise envelope at this
    /// tensor (`compare --model` only; see `crate::compare_diagnosis::clean_noise_envelope`):
    /// conformant.
    WithinNoise,
    /// Outside tolerance.
    Fail,
    /// Shapes differ.
    ShapeMismatch,
    /// The candidate holds NaN or infinity.
    NonFinite,
    /// In the expected dump, not in the candidate (reported, not a failure).
    Missing,
}

/// The comparison of one tensor.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TensorReport {
    pub name: String,
    pub status: Status,
    /// Largest `|candidate − expected|`.
    pub max_abs: f64,
    /// `max_abs / max|expected|`: the number the tolerance applies to.
    pub max_rel: f64,
    /// Largest element-wise `|candidate − expected| / |expected|` over elements with
    /// `|expected| ≥ 1e-3 · max|expected|` (informative only).
    pub max_elementwise_rel: f64,
    pub tolerance: f64,
    /// Index of the element with the largest absolute error.
    pub worst_index: Vec<usize>,
    pub expected_at_worst: f64,
    pub candidate_at_worst: f64,
    pub expected_shape: Vec<usize>,
    pub candidate_shape: Vec<usize>,
    /// For an index tensor that differs: which entries, and the first one's ids.
    pub index_mismatch: Option<IndexMismatch>,
    /// The float-noise envelope that admitted a [`Status::WithinNoise`] tensor.
    pub noise_allowance: Option<f64>,
}

/// Where an index tensor (`input_ids`, `router.top_k_index`, `greedy_continuation`) differs:
/// ids are either equal or not, so a count and the first difference say more than an error.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct IndexMismatch {
    /// Entries that differ, of `total`.
    pub differing: usize,
    pub total: usize,
    /// Rows (tokens, decode steps) holding a differing entry, of `rows`.
    pub differing_rows: usize,
    pub rows: usize,
    /// Of the differing rows of a 2-D tensor (`top_k_index`), those holding the same ids in
    /// another order (a different ranking of the same experts).
    pub reordered_rows: usize,
    /// The first differing entry (row-major), and the ids there.
    pub first_index: Vec<usize>,
    pub expected: i64,
    pub got: i64,
}

impl IndexMismatch {
    /// Compares two index tensors of one shape (`None` if they are equal).
    pub fn of(expected: &ArrayD<i64>, candidate: &ArrayD<i64>) -> Option<IndexMismatch> {
        let shape = expected.shape().to_vec();
        let flat_expected: Vec<i64> = expected.iter().copied().collect();
        let flat_candidate: Vec<i64> = candidate.iter().copied().collect();
        let first = flat_expected
            .iter()
            .zip(&flat_candidate)
            .position(|(e, c)| e != c)?;
        let row_length = shape.iter().skip(1).product::<usize>().max(1);
        let rows: Vec<(&[i64], &[i64])> = flat_expected
            .chunks(row_length)
            .zip(flat_candidate.chunks(row_length))
            .collect();
        let differing_rows: Vec<&(&[i64], &[i64])> = rows.iter().filter(|(e, c)| e != c).collect();
        let reordered_rows = if shape.len() == 2 {
            differing_rows
                .iter()
                .filter(|(e, c)| {
                    let (mut e, mut c) = (e.to_vec(), c.to_vec());
                    e.sort_unstable();
                    c.sort_unstable();
                    e == c
                })
                .count()
        } else {
            0
        };
        Some(IndexMismatch {
            differing: flat_expected
                .iter()
                .zip(&flat_candidate)
                .filter(|(e, c)| e != c)
                .count(),
            total: flat_expected.len(),
            differing_rows: differing_rows.len(),
            rows: rows.len(),
            reordered_rows,
            first_index: unravel(first, &shape),
            expected: flat_expected[first],
            got: flat_candidate[first],
        })
    }

    /// One phrase, e.g. "3 of 96 entries differ, in 2 of 12 rows (1 the same ids in another
    /// order); first at [4, 2]: expected 17, got 93".
    pub fn describe(&self, row_noun: &str) -> String {
        let reordered = if self.reordered_rows > 0 {
            format!(
                " ({} of them the same ids in another order)",
                self.reordered_rows
            )
        } else {
            String::new()
        };
        let rows = if self.total > self.rows {
            format!(
                ", in {} of {} {row_noun}{reordered}",
                self.differing_rows, self.rows
            )
        } else {
            String::new()
        };
        format!(
            "{} of {} entries differ{rows}; first at {:?}: expected {}, got {}",
            self.differing, self.total, self.first_index, self.expected, self.got
        )
    }
}

impl TensorReport {
    /// A one-line human description, with the worst element.
    pub fn describe(&self) -> String {
        match self.status {
            Status::Missing => format!("{}: not in the candidate dump", self.name),
            Status::ShapeMismatch => format!(
                "{}: shape {:?}, expected {:?}",
                self.name, self.candidate_shape, self.expected_shape
            ),
            Status::NonFinite => format!(
                "{}: non-finite value {} at {:?}",
                self.name, self.candidate_at_worst, self.worst_index
            ),
            Status::Fail if self.index_mismatch.is_some() => {
                let mismatch = self.index_mismatch.as_ref().expect("checked");
                let noun = if self.name == "greedy_continuation" {
                    "decode steps"
                } else {
                    "tokens"
                };
                format!("{}: {}", self.name, mismatch.describe(noun))
            }
            _ => format!(
                "{}: max_abs {:.3e}, max_rel {:.3e} (tolerance {:.1e}), worst at {:?}: expected {:.6}, got {:.6}",
                self.name,
                self.max_abs,
                self.max_rel,
                self.tolerance,
                self.worst_index,
                self.expected_at_worst,
                self.candidate_at_worst
            ),
        }
    }
}

/// Compares one tensor. `tolerance` bounds `max_rel` (0 demands equality, used for indices).
pub fn compare_tensor(
    name: &str,
    expected: &DumpTensor,
    candidate: &DumpTensor,
    tolerance: f64,
) -> TensorReport {
    let expected_values = expected.to_f64();
    let candidate_values = candidate.to_f64();
    let mut report = TensorReport {
        name: name.to_string(),
        status: Status::Pass,
        max_abs: 0.0,
        max_rel: 0.0,
        max_elementwise_rel: 0.0,
        tolerance,
        worst_index: Vec::new(),
        expected_at_worst: 0.0,
        candidate_at_worst: 0.0,
        expected_shape: expected.shape().to_vec(),
        candidate_shape: candidate.shape().to_vec(),
        index_mismatch: None,
        noise_allowance: None,
    };
    if expected.shape() != candidate.shape() {
        report.status = Status::ShapeMismatch;
        report.max_abs = f64::INFINITY;
        report.max_rel = f64::INFINITY;
        return report;
    }
    // Flat (logical-order) indices, turned into a multi-index only for the one element
    // reported: indexing every element with a dynamic-rank index is slow on large tensors.
    let shape = expected.shape().to_vec();
    if let Some((flat, &value)) = candidate_values
        .iter()
        .enumerate()
        .find(|(_, v)| !v.is_finite())
    {
        report.status = Status::NonFinite;
        report.worst_index = unravel(flat, &shape);
        report.candidate_at_worst = value;
        report.expected_at_worst = expected_values.iter().nth(flat).copied().unwrap_or(0.0);
        report.max_abs = f64::INFINITY;
        report.max_rel = f64::INFINITY;
        return report;
    }
    let scale = expected_values.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let mut worst: Option<(usize, f64, f64)> = None;
    for (flat, (&e, &c)) in expected_values
        .iter()
        .zip(candidate_values.iter())
        .enumerate()
    {
        let error = (c - e).abs();
        if worst.is_none() || error > report.max_abs {
            report.max_abs = error;
            worst = Some((flat, e, c));
        }
        if e.abs() >= 1e-3 * scale && e != 0.0 {
            report.max_elementwise_rel = report.max_elementwise_rel.max(error / e.abs());
        }
    }
    if let Some((flat, e, c)) = worst {
        report.worst_index = unravel(flat, &shape);
        report.expected_at_worst = e;
        report.candidate_at_worst = c;
    }
    report.max_rel = if scale > 0.0 {
        report.max_abs / scale
    } else if report.max_abs > 0.0 {
        f64::INFINITY
    } else {
        0.0
    };
    if report.max_rel > tolerance {
        report.status = Status::Fail;
    }
    if let (DumpTensor::I64(e), DumpTensor::I64(c)) = (expected, candidate) {
        report.index_mismatch = IndexMismatch::of(e, c);
        if report.index_mismatch.is_some() {
            report.status = Status::Fail;
        }
    }
    report
}

/// The multi-index of logical (row-major) position `flat` in an array of `shape`.
fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for (slot, &extent) in index.iter_mut().zip(shape).rev() {
        if extent > 0 {
            *slot = flat % extent;
            flat /= extent;
        }
    }
    index
}

/// Numeric precision of a computation whose dump is compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Precision {
    /// float32 computation (the oracle's default, and our reference).
    Float32,
    /// float16 computation, or float32 values stored as F16.
    Float16,
    /// bfloat16 computation (e.g. Hugging Face run in bf16), or values stored as BF16.
    BFloat16,
}

impl Precision {
    /// The name used in reports: `float32`, `float16`, `bfloat16`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Float32 => "float32",
            Precision::Float16 => "float16",
            Precision::BFloat16 => "bfloat16",
        }
    }
}

/// How deep in the model a tensor is: its layer index for `layers.{i}.*`, 0 for the
/// embeddings and PLE inputs, `num_layers` for the final norm, the logits and the decode steps.
pub fn depth_of(name: &str, num_layers: usize) -> usize {
    if let Some((index, _)) = gemma4_reference::dump::layer_and_part(name) {
        return index;
    }
    match name {
        "final_norm" | "logits" | "decode_logits" | "greedy_continuation" => num_layers,
        _ => 0,
    }
}

/// The tolerance on `max_rel` for a tensor at `depth` (see [`depth_of`]).
///
/// Float32: `2e-5 + 1e-5 · depth`. Two correct float32 implementations start about 4e-7 apart
/// (our reference vs Hugging Face eager on layer 0 of every golden case) and drift apart as
/// rounding differences are amplified layer after layer — by about 3e-6 per layer on these
/// random tiny models, most visibly on attention outputs, whose unscaled softmax is peaky
/// (measured: 2.7e-5 at layer 9 of `e2b_like`; run `gemma4 conform` to see the worst per case).
/// The allowance of 1e-5 per layer keeps a 3x margin over that drift, while the first layers
/// stay tight enough to catch the smallest bug we know of — exact instead of tanh GELU, which
/// moves a layer's output by about 1e-4 relative — at the first tensor it touches.
///
/// Float32, `embeddings` and `per_layer_inputs`: `5e-6`. These come before any layer: one
/// multiply by the embedding scale, and for PLE one projection over `D`, an RMSNorm over `P`
/// and an add. Our reference and Hugging Face agree on them to 0 and 1e-7 (every golden case);
/// a sequential float32 sum over the released `D` (≤ 2560 on the PLE models) drifts by about
/// `2^-24 · sqrt(D/2)` ≈ 2e-6 per element, less relative to the tensor's largest element. The
/// tight bound is what makes the PLE scale slips visible where they happen: a missing
/// `D^-1/2` on the PLE projection only changes the RMSNorm's epsilon share and moves
/// `per_layer_inputs` by 1.4e-5 (`e2b_like`) to 4.3e-5 (`e4b_like`).
///
/// BFloat16: `5e-2 + 4e-2 · depth`. One bf16 rounding is 2^-9 ≈ 2e-3 relative and a bf16
/// oracle rounds after every operation; against a float32 engine the measured gap grows from
/// 1e-2 (layer 0) to 1.3e-1 (layer 4 attention output) on `e2b_bf16`. Such a case catches
/// structural bugs and bf16 loading errors (O(1) effects), not percent-level slips; exact
/// checks ([`compare_dumps_exact_bf16_embeddings`]) cover what bf16 can pin down.
///
/// Float16: the bfloat16 policy divided by 8, the ratio of the two formats' unit roundoffs
/// (2^-9 for bf16, 2^-12 for f16): `6.25e-3 + 5e-3 · depth`.
pub fn tolerance_for(name: &str, precision: Precision, depth: usize) -> f64 {
    if is_index_tensor(name) {
        return 0.0;
    }
    match precision {
        Precision::Float32 if is_before_layers(name) => 5e-6,
        Precision::Float32 => 2e-5 + 1e-5 * depth as f64,
        Precision::BFloat16 => 5e-2 + 4e-2 * depth as f64,
        Precision::Float16 => (5e-2 + 4e-2 * depth as f64) / 8.0,
    }
}

/// The tolerance of a tensor of a dump that may hold vision tensors: [`tolerance_for`] at the
/// tensor's depth counted from the first computation it depends on.
///
/// `vision_layers` is `Some(L_v)` when the dumps hold a tower's encoder (`L_v` layers of the
/// deepest one, vision or audio; the expected dump's `vision.*layers.{i}.output` and
/// `audio.*layers.{i}.output` tell). The same holds for the audio tower's tensors (`features`
/// and `subsample` at depth 0, like the patch embeddings). Then:
/// - `vision.*patch_embeddings` sits at depth 0, `vision.*layers.{k}.output` at depth `k`, and
///   `vision.*soft_tokens` at depth `L_v`: the tower's layers amplify rounding differences as
///   the decoder's do (measured on the golden towers: 3e-7 at the patch embeddings, 4e-6 at
///   the soft tokens);
/// - `embeddings` and `per_layer_inputs` keep a tight bound grown by the tower: `5e-6 + 1e-6 ·
///   L_v` in float32. Their soft-token rows (and the PLE context part computed from them) carry
///   the tower's noise after the projector's RMSNorm: measured 1.1e-6 after the golden towers'
///   2 layers (0.5e-6 per layer; 1e-6 per layer keeps a 2x margin), while a missing `D^-1/2` on
///   the PLE projection still moves `per_layer_inputs` by 1.4e-5 or more;
/// - every other text tensor sits `L_v` deeper than in a text-only prompt.
pub fn tolerance_with_vision(
    name: &str,
    precision: Precision,
    text_layers: usize,
    vision_layers: Option<usize>,
) -> f64 {
    let Some(tower) = vision_layers else {
        return tolerance_for(name, precision, depth_of(name, text_layers));
    };
    if let Some(rest) = name
        .strip_prefix("vision.")
        .or_else(|| name.strip_prefix("audio."))
    {
        // `vision.[i.]<part>`: the image index, if any, is not part of the depth.
        let part = match rest.split_once('.') {
            Some((index, tail)) if index.parse::<usize>().is_ok() => tail,
            _ => rest,
        };
        let depth = match gemma4_reference::dump::layer_and_part(part) {
            Some((layer, _)) => layer,
            None if part == "soft_tokens" => tower,
            None => 0,
        };
        return tolerance_for(name, precision, depth);
    }
    if is_index_tensor(name) {
        return 0.0;
    }
    if is_before_layers(name) {
        return match precision {
            Precision::Float32 => 5e-6 + 1e-6 * tower as f64,
            _ => tolerance_for(name, precision, 0),
        };
    }
    tolerance_for(name, precision, tower + depth_of(name, text_layers))
}

/// Layers of the deepest tower (vision or audio encoder) a dump holds: one more than its
/// largest `vision.*layers.{i}.output` or `audio.*layers.{i}.output` index, if any.
pub fn vision_layers_in_dump(dump: &ActivationDump) -> Option<usize> {
    dump.names_in_model_order()
        .iter()
        .filter_map(|n| {
            let rest = n
                .strip_prefix("vision.")
                .or_else(|| n.strip_prefix("audio."))?;
            let part = match rest.split_once('.') {
                Some((index, tail)) if index.parse::<usize>().is_ok() => tail,
                _ => rest,
            };
            gemma4_reference::dump::layer_and_part(part).map(|(i, _)| i)
        })
        .max()
        .map(|i| i + 1)
}

/// Text tensors computed before the first decoder layer (`embeddings`, `per_layer_inputs`).
pub fn is_before_layers(name: &str) -> bool {
    name == "embeddings" || name == "per_layer_inputs"
}

/// Number of decoder layers a dump covers (one more than its largest layer index), if any.
pub fn layers_in_dump(dump: &ActivationDump) -> Option<usize> {
    dump.names_in_model_order()
        .iter()
        .filter_map(|n| gemma4_reference::dump::layer_and_part(n).map(|(i, _)| i))
        .max()
        .map(|i| i + 1)
}

/// Tensors of integer ids that must match exactly (the dump contract's index tensors).
pub fn is_index_tensor(name: &str) -> bool {
    gemma4_reference::dump::is_index_tensor_name(name)
}

/// Compares every tensor of `expected` (in model order) with `candidate`.
pub fn compare_dumps(
    expected: &ActivationDump,
    candidate: &ActivationDump,
    tolerance: impl Fn(&str) -> f64,
) -> Vec<TensorReport> {
    compare_dumps_by(expected, candidate, &tolerance, |name, e, c| {
        compare_tensor(name, e, c, tolerance(name))
    })
}

/// Which sides of an exact bf16 `embeddings` comparison are rounded to bfloat16 first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Rounding {
    /// Only the candidate's (the expected tensor is a bf16 oracle's, exact bf16 already).
    Candidate,
    /// Both sides'.
    Both,
}

/// Like [`compare_dumps`], but `embeddings` is compared with tolerance 0 after rounding it to
/// bf16 (on the sides `rounding` says). A bf16 oracle computes `bf16(row · bf16(√D))`, and a
/// float32 engine that uses the bf16-rounded scale gets the same bits after one rounding (the
/// bf16 x bf16 product is exact in f32), so any difference is a real bug (e.g. an unrounded
/// embedding scale).
pub fn compare_dumps_exact_bf16_embeddings(
    expected: &ActivationDump,
    candidate: &ActivationDump,
    rounding: Bf16Rounding,
    tolerance: impl Fn(&str) -> f64,
) -> Vec<TensorReport> {
    let tolerance = |name: &str| {
        if name == "embeddings" {
            0.0
        } else {
            tolerance(name)
        }
    };
    compare_dumps_by(expected, candidate, &tolerance, |name, e, c| {
        if name == "embeddings" {
            let c = bf16_rounded(c);
            match rounding {
                Bf16Rounding::Candidate => compare_tensor(name, e, &c, 0.0),
                Bf16Rounding::Both => compare_tensor(name, &bf16_rounded(e), &c, 0.0),
            }
        } else {
            compare_tensor(name, e, c, tolerance(name))
        }
    })
}

/// Walks `expected` in model order, comparing each tensor the candidate holds with `compare`
/// and reporting the others as missing (with their `tolerance`).
fn compare_dumps_by(
    expected: &ActivationDump,
    candidate: &ActivationDump,
    tolerance: &impl Fn(&str) -> f64,
    compare: impl Fn(&str, &DumpTensor, &DumpTensor) -> TensorReport,
) -> Vec<TensorReport> {
    expected
        .names_in_model_order()
        .into_iter()
        .map(|name| {
            let expected_tensor = expected.get(name).expect("listed");
            match candidate.get(name) {
                Some(candidate_tensor) => {
                    let aligned = router_ranking_aligned(name, expected, candidate);
                    compare(
                        name,
                        expected_tensor,
                        aligned.as_ref().unwrap_or(candidate_tensor),
                    )
                }
                None => TensorReport {
                    name: name.to_string(),
                    status: Status::Missing,
                    max_abs: 0.0,
                    max_rel: 0.0,
                    max_elementwise_rel: 0.0,
                    tolerance: tolerance(name),
                    worst_index: Vec::new(),
                    expected_at_worst: 0.0,
                    candidate_at_worst: 0.0,
                    expected_shape: expected_tensor.shape().to_vec(),
                    candidate_shape: Vec::new(),
                    index_mismatch: None,
                    noise_allowance: None,
                },
            }
        })
        .collect()
}

/// The candidate's `…router.top_k_index` or `…router.top_k_weights` (for `name`) with each
/// token's experts put in the expected order where the candidate chose the same experts in
/// another order; `None` when nothing needs reordering (or `name` is another tensor).
///
/// The ranking inside a token's top-k is not part of the model: the MoE output is a sum over
/// the chosen experts, and two experts with nearly equal router probabilities come out of
/// `torch.topk` in either order (measured on a held-out HF-made 26B-A4B-like checkpoint: one
/// token whose 5th and 6th experts had equal weights up to float rounding, ranked one way by HF
/// and the other by both our engines). A different *set* of experts is still a mismatch, and the
/// weights are compared expert by expert after the reordering.
pub fn router_ranking_aligned(
    name: &str,
    expected: &ActivationDump,
    candidate: &ActivationDump,
) -> Option<DumpTensor> {
    let prefix = name
        .strip_suffix("top_k_index")
        .or_else(|| name.strip_suffix("top_k_weights"))
        .filter(|p| p.ends_with("router."))?;
    let index_name = format!("{prefix}top_k_index");
    let (Some(DumpTensor::I64(expected_ids)), Some(DumpTensor::I64(candidate_ids))) =
        (expected.get(&index_name), candidate.get(&index_name))
    else {
        return None;
    };
    if expected_ids.shape() != candidate_ids.shape() || expected_ids.ndim() != 2 {
        return None;
    }
    // Per row, the candidate's column that holds each expected column's expert.
    let mut permutations: Vec<(usize, Vec<usize>)> = Vec::new();
    for (row, (e, c)) in expected_ids
        .outer_iter()
        .zip(candidate_ids.outer_iter())
        .enumerate()
    {
        let (e, c): (Vec<i64>, Vec<i64>) =
            (e.iter().copied().collect(), c.iter().copied().collect());
        if e == c {
            continue;
        }
        let (mut sorted_e, mut sorted_c) = (e.clone(), c.clone());
        sorted_e.sort_unstable();
        sorted_c.sort_unstable();
        if sorted_e != sorted_c {
            continue;
        }
        let mut taken = vec![false; c.len()];
        let order: Vec<usize> = e
            .iter()
            .map(|id| {
                let column = (0..c.len())
                    .find(|&j| !taken[j] && c[j] == *id)
                    .expect("the same multiset");
                taken[column] = true;
                column
            })
            .collect();
        permutations.push((row, order));
    }
    if permutations.is_empty() {
        return None;
    }
    let reorder = |tensor: &DumpTensor| -> Option<DumpTensor> {
        match tensor {
            DumpTensor::I64(source) if source.ndim() == 2 => {
                Some(DumpTensor::I64(reordered_rows(source, &permutations)))
            }
            DumpTensor::F32(source) if source.shape() == candidate_ids.shape() => {
                Some(DumpTensor::F32(reordered_rows(source, &permutations)))
            }
            _ => None,
        }
    };
    reorder(candidate.get(name)?)
}

/// `source` with row `r`'s entries taken in `order` (`out[r, k] = source[r, order[k]]`) for each
/// `(r, order)` of `permutations`.
fn reordered_rows<T: Clone>(
    source: &ndarray::ArrayD<T>,
    permutations: &[(usize, Vec<usize>)],
) -> ndarray::ArrayD<T> {
    let mut out = source.clone();
    for (row, order) in permutations {
        for (k, &j) in order.iter().enumerate() {
            out[[*row, k]] = source[[*row, j]].clone();
        }
    }
    out
}

/// Rounds every float value of a tensor to bfloat16 (used to compare an f32 computation with a
/// bf16 oracle where the oracle's only rounding is one bf16 store).
pub fn round_to_bf16(tensor: &ArrayD<f32>) -> ArrayD<f32> {
    tensor.mapv(|v| half::bf16::from_f32(v).to_f32())
}

/// A dump tensor with every float value rounded to bfloat16 (an index tensor as it is).
pub fn bf16_rounded(tensor: &DumpTensor) -> DumpTensor {
    match tensor {
        DumpTensor::F32(values) => DumpTensor::F32(round_to_bf16(values)),
        DumpTensor::I64(_) => tensor.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::arr2;

    fn dump(ids: [[i64; 3]; 2], weights: [[f32; 3]; 2]) -> ActivationDump {
        let mut dump = ActivationDump::new();
        dump.insert_i64("layers.0.router.top_k_index", arr2(&ids).into_dyn());
        dump.insert_f32("layers.0.router.top_k_weights", arr2(&weights).into_dyn());
        dump
    }

    fn statuses(expected: &ActivationDump, candidate: &ActivationDump) -> Vec<Status> {
        compare_dumps(expected, candidate, |name| {
            if is_index_tensor(name) {
                0.0
            } else {
                1e-6
            }
        })
        .into_iter()
        .map(|r| r.status)
        .collect()
    }

    /// The same experts ranked in another order, weights following their experts: conforming.
    /// Another expert, or weights left in place while the ids move: not.
    #[test]
    fn router_rankings_of_the_same_experts_conform_other_sets_do_not() {
        let expected = dump([[1, 2, 3], [4, 5, 6]], [[0.5, 0.3, 0.2], [0.6, 0.25, 0.15]]);
        let reordered = dump([[1, 2, 3], [5, 4, 6]], [[0.5, 0.3, 0.2], [0.25, 0.6, 0.15]]);
        assert_eq!(
            statuses(&expected, &reordered),
            vec![Status::Pass, Status::Pass]
        );
        let other_expert = dump([[1, 2, 3], [4, 5, 7]], [[0.5, 0.3, 0.2], [0.6, 0.25, 0.15]]);
        assert_eq!(statuses(&expected, &other_expert)[0], Status::Fail);
        let weights_unmoved = dump([[1, 2, 3], [5, 4, 6]], [[0.5, 0.3, 0.2], [0.6, 0.25, 0.15]]);
        assert_eq!(
            statuses(&expected, &weights_unmoved),
            vec![Status::Pass, Status::Fail]
        );
        // Repeated ids (not a valid top-k, but the alignment must not panic on them).
        let repeated = dump([[1, 1, 3], [4, 5, 6]], [[0.5, 0.3, 0.2], [0.6, 0.25, 0.15]]);
        let repeated_swapped = dump([[1, 3, 1], [4, 5, 6]], [[0.5, 0.2, 0.3], [0.6, 0.25, 0.15]]);
        assert_eq!(
            statuses(&repeated, &repeated_swapped),
            vec![Status::Pass, Status::Pass]
        );
    }
}
