//! The shape of a divergence: which tokens, heads, channels or PLE layers of a tensor are off,
//! and whether the candidate is a plain rescaling of the expected tensor.
//!
//! `gemma4 compare` runs this on the first divergent tensor. Most porting bugs leave a
//! recognisable pattern there, long before the logits mix everything up:
//!
//! | pattern | typical cause |
//! |---|---|
//! | every token but position 0, on `attn.q`/`attn.k` | RoPE (position 0 is never rotated) |
//! | only positions ≥ W−1 or ≥ W, on `attn.output` | sliding window off by one |
//! | only the non-rotated channels of a full layer's `q`/`k` | p-RoPE: pass-through pairs rotated |
//! | only the rotated channels | RoPE frequencies (θ, exponent) |
//! | some heads only | GQA head mapping, head packing |
//! | only the decode steps | KV cache, positions of incremental steps |
//! | a constant factor (e.g. √2) | a missing or extra scale |
//!
//! An element "diverges" when its error exceeds the tensor's tolerance times the tensor's
//! largest expected magnitude: the same yardstick as the pass/fail verdict, so the pattern is
//! exactly the set of places that made the tensor fail.

use gemma4_reference::config::{AttentionType, RopeKind};
use gemma4_reference::dump::DumpTensor;

pub use crate::compare::ModelFacts;
use ndarray::{ArrayD, Axis};

/// Which rows (prompt positions, or decode steps) of a tensor diverge.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RowPattern {
    /// `prompt_positions` or `decode_steps`.
    pub axis: &'static str,
    /// Indices of the diverging rows.
    pub diverging: Vec<usize>,
    /// Number of rows.
    pub of: usize,
    /// One phrase: "all 17 positions", "positions 6..16 (from 6 on)", ...
    pub summary: String,
}

/// Which entries along one axis (heads, channels, PLE layers) diverge.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct AxisPattern {
    pub diverging: Vec<usize>,
    pub of: usize,
    pub summary: String,
}

/// The error structure of one tensor.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ErrorStructure {
    pub tensor: String,
    /// Prompt positions (or decode steps for `decode_logits`).
    pub rows: Option<RowPattern>,
    /// Attention heads (`attn.q`: query heads; `attn.k` / `attn.v`: KV heads).
    pub heads: Option<AxisPattern>,
    /// Channels within a head (`attn.q/k/v`), as ranges of the head dim.
    pub channels: Option<AxisPattern>,
    /// Layers of `per_layer_inputs`.
    pub ple_layers: Option<AxisPattern>,
    /// `c` when the candidate is `c × expected` up to the tolerance (a pure rescaling).
    pub scale_factor: Option<f64>,
    /// Readable interpretations of the pattern (hints, not a diagnosis).
    pub hints: Vec<String>,
}

/// Analyses where `candidate` departs from `expected` in tensor `name` (same shapes, finite).
/// `tolerance` is the tensor's bound on `max_rel`.
pub fn error_structure(
    name: &str,
    expected: &DumpTensor,
    candidate: &DumpTensor,
    tolerance: f64,
    facts: &ModelFacts,
) -> ErrorStructure {
    let expected = expected.to_f64();
    let candidate = candidate.to_f64();
    let mut structure = ErrorStructure {
        tensor: name.to_string(),
        rows: None,
        heads: None,
        channels: None,
        ple_layers: None,
        scale_factor: None,
        hints: Vec::new(),
    };
    if expected.shape() != candidate.shape() || expected.is_empty() {
        return structure;
    }
    let scale = expected.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let threshold = tolerance * scale;
    let error = (&candidate - &expected).mapv(f64::abs);

    // Rows: axis 0 of every dump tensor is the token (or decode step, patch, soft token) axis.
    let row_axis = if name == "decode_logits" || name == "greedy_continuation" {
        "decode_steps"
    } else if (name.starts_with("vision.") || name.starts_with("audio."))
        && name.ends_with("soft_tokens")
    {
        "soft_tokens"
    } else if name.starts_with("vision.") {
        "patches"
    } else if name.starts_with("audio.") {
        "audio_frames"
    } else {
        "prompt_positions"
    };
    let rows = diverging_along(&error, 0, threshold);
    structure.rows = Some(row_pattern(row_axis, rows, error.shape()[0], facts));

    if let Some((layer, part)) = gemma4_reference::dump::layer_and_part(name) {
        if matches!(part, "attn.q" | "attn.k" | "attn.v") && error.ndim() == 3 {
            let heads = diverging_along(&error, 1, threshold);
            let head_count = error.shape()[1];
            structure.heads = Some(AxisPattern {
                summary: index_set_summary(&heads, head_count, "heads", "head"),
                diverging: heads,
                of: head_count,
            });
            let channels = diverging_along(&error, 2, threshold);
            let head_dim = error.shape()[2];
            let (summary, hint) = channel_summary(&channels, head_dim, layer, part, facts);
            structure.channels = Some(AxisPattern {
                summary,
                diverging: channels,
                of: head_dim,
            });
            structure.hints.extend(hint);
        }
    }
    if name == "per_layer_inputs" && error.ndim() == 3 {
        let layers = diverging_along(&error, 1, threshold);
        let count = error.shape()[1];
        structure.ple_layers = Some(AxisPattern {
            summary: index_set_summary(&layers, count, "layers", "layer"),
            diverging: layers,
            of: count,
        });
    }

    // A pure rescaling: candidate ≈ c · expected. The least-squares c, accepted when the
    // rescaled expected tensor is within the tolerance and c itself is not 1 within it.
    let dot: f64 = expected.iter().zip(&candidate).map(|(e, c)| e * c).sum();
    let norm: f64 = expected.iter().map(|e| e * e).sum();
    if norm > 0.0 && !crate::comparison::is_index_tensor(name) {
        let c = dot / norm;
        let residual = expected
            .iter()
            .zip(&candidate)
            .fold(0.0f64, |m, (e, v)| m.max((v - c * e).abs()));
        if residual <= threshold && (c - 1.0).abs() > tolerance {
            structure.scale_factor = Some(c);
        }
    }

    structure.hints.extend(hints(name, &structure, facts));
    structure
}

/// Indices along `axis` where some element's error exceeds `threshold`.
fn diverging_along(error: &ArrayD<f64>, axis: usize, threshold: f64) -> Vec<usize> {
    error
        .axis_iter(Axis(axis))
        .enumerate()
        .filter(|(_, slice)| slice.iter().any(|&e| e > threshold))
        .map(|(i, _)| i)
        .collect()
}

/// Compact ranges: `[0, 1, 2, 5]` → `"0..2, 5"`.
pub fn ranges(indices: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut iter = indices.iter().copied().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while iter.peek() == Some(&(end + 1)) {
            end = iter.next().expect("peeked");
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}..{end}")
        });
    }
    parts.join(", ")
}

fn index_set_summary(indices: &[usize], count: usize, plural: &str, singular: &str) -> String {
    if indices.len() == count {
        format!("all {count} {plural}")
    } else if indices.len() == 1 {
        format!("only {singular} {} of {count}", indices[0])
    } else {
        format!("{plural} {} of {count}", ranges(indices))
    }
}

fn row_pattern(
    axis: &'static str,
    diverging: Vec<usize>,
    count: usize,
    facts: &ModelFacts,
) -> RowPattern {
    let (noun, singular) = match axis {
        "decode_steps" => ("decode steps", "step"),
        "patches" => ("patches", "patch"),
        "soft_tokens" => ("soft tokens", "soft token"),
        "audio_frames" => ("audio frames", "audio frame"),
        _ => ("positions", "position"),
    };
    let summary = if diverging.is_empty() {
        format!("no single {singular} exceeds the tolerance")
    } else if diverging.len() == count {
        format!("all {count} {noun}")
    } else if diverging == [0] {
        format!("only {singular} 0")
    } else if every_row_but_first(&diverging, count) {
        format!("every {singular} but the first ({noun} 1..{})", count - 1)
    } else if let Some(from) = diverging_suffix(&diverging, count) {
        let window = facts
            .sliding_window
            .filter(|_| axis == "prompt_positions")
            .map(|w| format!(" (sliding window W = {w})"))
            .unwrap_or_default();
        format!("{noun} {from}..{} only, from {from} on{window}", count - 1)
    } else {
        format!("{noun} {} of {count}", ranges(&diverging))
    };
    RowPattern {
        axis,
        diverging,
        of: count,
        summary,
    }
}

/// Do exactly the rows `1..count` diverge (every row but the first, of at least two)?
fn every_row_but_first(diverging: &[usize], count: usize) -> bool {
    count > 1 && diverging.len() == count - 1 && diverging.first() == Some(&1)
}

/// `Some(from)` when exactly the rows `from..count` diverge, some but not all (`diverging`:
/// ascending indices below `count`).
fn diverging_suffix(diverging: &[usize], count: usize) -> Option<usize> {
    let &from = diverging.first()?;
    (diverging.len() < count
        && diverging.last() == Some(&(count - 1))
        && diverging.len() == count - from)
        .then_some(from)
}

/// Describes diverging channels of a q/k/v tensor, relating them to RoPE's rotate-half pairs
/// and, on full layers, to the rotated / pass-through channels of p-RoPE.
fn channel_summary(
    channels: &[usize],
    head_dim: usize,
    layer: usize,
    part: &str,
    facts: &ModelFacts,
) -> (String, Option<String>) {
    let base = index_set_summary(channels, head_dim, "channels", "channel");
    let layer_plan = facts.plan.as_ref().and_then(|p| p.layers.get(layer));
    let Some(layer_plan) = layer_plan else {
        return (base, None);
    };
    if layer_plan.head_dim != head_dim || channels.len() == head_dim || channels.is_empty() {
        return (base, None);
    }
    let half = head_dim / 2;
    let rotated_pairs = match (&layer_plan.rope.kind, layer_plan.attention_type) {
        (
            RopeKind::Proportional {
                partial_rotary_factor,
            },
            AttentionType::Full,
        ) => ((partial_rotary_factor * head_dim as f64) / 2.0).floor() as usize,
        _ => half,
    };
    let is_rotated = |c: usize| (c % half) < rotated_pairs;
    let all_rotated = channels.iter().all(|&c| is_rotated(c));
    let all_pass_through = channels.iter().all(|&c| !is_rotated(c));
    let pair_zero_matches = !channels.contains(&0) && !channels.contains(&half);
    if part == "attn.v" {
        return (base, None);
    }
    let layer_name = format!("layer {} ({part})", layer_plan.index);
    if rotated_pairs < half && all_pass_through {
        (
            format!(
                "{base}: only p-RoPE pass-through channels (pairs {rotated_pairs}..{} of each half are not rotated on full layers)",
                half - 1
            ),
            Some(format!(
                "{layer_name}: only channels that p-RoPE leaves unrotated diverge: the port rotates pairs it must pass through (as the fault rope_full_on_global does)"
            )),
        )
    } else if all_rotated && pair_zero_matches {
        (
            format!("{base}: rotated channels only, pair 0 (channels 0 and {half}) matches"),
            Some(format!(
                "{layer_name}: rotated pairs diverge except pair 0, whose frequency is 1 for every theta and exponent: the RoPE frequencies differ (theta, exponent denominator)"
            )),
        )
    } else if all_rotated && rotated_pairs < half {
        (
            format!("{base}: only rotated channels (the first {rotated_pairs} pairs of each half)"),
            Some(format!(
                "{layer_name}: only the rotated channels diverge: RoPE pairing or positions"
            )),
        )
    } else {
        (base, None)
    }
}

fn hints(name: &str, structure: &ErrorStructure, facts: &ModelFacts) -> Vec<String> {
    let mut hints = Vec::new();
    let is_qk = name.ends_with(".attn.q") || name.ends_with(".attn.k");
    if let Some(rows) = &structure.rows {
        if is_qk && every_row_but_first(&rows.diverging, rows.of) {
            hints.push(
                "every position but 0 diverges: position-dependent, as RoPE is (position 0 is not rotated)"
                    .to_string(),
            );
        }
        let suffix =
            diverging_suffix(&rows.diverging, rows.of).filter(|_| rows.axis == "prompt_positions");
        if let (Some(from), Some(window)) = (suffix, facts.sliding_window) {
            if name.ends_with(".attn.output") && (from == window || from + 1 == window) {
                hints.push(format!(
                    "only queries from position {from} on diverge, and W = {window}: the sliding window admits a different number of keys (W+1 keys first matters at position W, W-1 keys at W-1)"
                ));
            }
        }
        if rows.axis == "decode_steps" {
            hints.push(
                "the prompt's tensors conform and only incremental decoding diverges: suspect the KV cache (eviction, sliding-window bookkeeping, KV sharing) or the positions of decode steps"
                    .to_string(),
            );
        }
    }
    if let Some(heads) = &structure.heads {
        if !heads.diverging.is_empty() && heads.diverging.len() < heads.of {
            hints.push(format!(
                "{} diverge and the others match: a per-head slip (GQA head-to-KV mapping, head packing, one head's weights)",
                heads.summary
            ));
        }
    }
    if let Some(c) = structure.scale_factor {
        let named = [
            (std::f64::consts::SQRT_2, "sqrt(2)"),
            (std::f64::consts::FRAC_1_SQRT_2, "1/sqrt(2)"),
            (2.0, "2"),
            (0.5, "1/2"),
        ]
        .iter()
        .find(|(value, _)| (c / value - 1.0).abs() < 1e-3)
        .map(|(_, text)| format!(" = {text}"))
        .unwrap_or_default();
        hints.push(format!(
            "the candidate is the expected tensor times {c:.6}{named}: a missing or extra constant factor"
        ));
    }
    hints
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    fn tensor(shape: &[usize], values: impl Fn(usize) -> f32) -> DumpTensor {
        let count: usize = shape.iter().product();
        DumpTensor::F32(
            ArrayD::from_shape_vec(IxDyn(shape), (0..count).map(values).collect()).unwrap(),
        )
    }

    #[test]
    fn structure_ranges_compact_runs() {
        assert_eq!(ranges(&[0, 1, 2, 5, 7, 8]), "0..2, 5, 7..8");
        assert_eq!(ranges(&[]), "");
    }

    #[test]
    fn structure_rows_from_position_on() {
        let expected = tensor(&[6, 4], |i| 1.0 + i as f32 * 0.01);
        let candidate = tensor(&[6, 4], |i| {
            1.0 + i as f32 * 0.01 + if i / 4 >= 3 { 0.1 } else { 0.0 }
        });
        let facts = ModelFacts {
            sliding_window: Some(3),
            ..ModelFacts::default()
        };
        let s = error_structure("layers.0.attn.output", &expected, &candidate, 1e-5, &facts);
        let rows = s.rows.unwrap();
        assert_eq!(rows.diverging, vec![3, 4, 5], "rows: {}", rows.summary);
        assert!(
            s.hints.iter().any(|h| h.contains("sliding window")),
            "hints: {:?}",
            s.hints
        );
    }

    #[test]
    fn structure_scale_factor_sqrt_two() {
        let expected = tensor(&[3, 2, 4], |i| (i as f32 * 0.37).sin());
        let candidate = tensor(&[3, 2, 4], |i| {
            (i as f32 * 0.37).sin() * std::f32::consts::SQRT_2
        });
        let s = error_structure(
            "per_layer_inputs",
            &expected,
            &candidate,
            5e-6,
            &ModelFacts::default(),
        );
        let c = s.scale_factor.expect("a pure rescaling");
        assert!((c - std::f64::consts::SQRT_2).abs() < 1e-6, "factor {c}");
        assert!(
            s.hints.iter().any(|h| h.contains("sqrt(2)")),
            "hints: {:?}",
            s.hints
        );
        assert_eq!(s.ple_layers.unwrap().diverging, vec![0, 1]);
    }

    #[test]
    fn structure_heads_subset() {
        // [T=2, H=4, d=2]; only head 2 is off.
        let expected = tensor(&[2, 4, 2], |i| 1.0 + i as f32);
        let candidate = tensor(&[2, 4, 2], |i| {
            1.0 + i as f32 + if (i / 2) % 4 == 2 { 0.5 } else { 0.0 }
        });
        let s = error_structure(
            "layers.1.attn.q",
            &expected,
            &candidate,
            1e-5,
            &ModelFacts::default(),
        );
        assert_eq!(s.heads.unwrap().diverging, vec![2]);
        assert_eq!(s.channels.unwrap().diverging, vec![0, 1]);
    }
}
