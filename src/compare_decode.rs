//! Decode rows: which convention a dump follows, lining a candidate's rows up with ours, and
//! which rows are logits of the same token sequence.
//!
//! Shared contracts §2 records greedy decoding as Hugging Face `generate(output_logits=True)`
//! does (so do llama.cpp's and mistral.rs's generation loops and DeepMind's sampler): one logits
//! row per generated token, row 0 being the prefill's last row.
//!
//! ```text
//! generate   (the contract): decode_logits[s] chose f_s;  row 0 = logits[T−1]; continuation f₀ … f_{N−1}
//! steps_only (older dumps):  decode_logits[s] = the step feeding f_s at T+s;     continuation f₁ … f_N
//! ```
//!
//! A correct port that records the other convention has every row of ours, shifted by one. So
//! before judging, [`DecodeAlignment::detect`] finds the shift (none, or one row either way)
//! from the rows themselves, and the comparison runs on the rows that line up; the report names
//! both conventions. A really broken KV cache matches neither shift and is still reported.

use std::borrow::Cow;

use gemma4_reference::dump::{ActivationDump, DumpTensor};
use gemma4_reference::model::argmax;
use ndarray::{ArrayView1, ArrayView2, Axis, Ix1, Ix2, Slice};

/// How a dump records greedy decoding (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DecodeConvention {
    /// One row per generated token, row 0 = the prefill's last row (Hugging Face `generate`,
    /// shared contracts §2).
    Generate,
    /// One row per single-token step through the cache after the prefill (the first generated
    /// token is in no tensor).
    StepsOnly,
}

impl DecodeConvention {
    pub fn name(self) -> &'static str {
        match self {
            DecodeConvention::Generate => "generate",
            DecodeConvention::StepsOnly => "steps_only",
        }
    }

    /// A phrase saying what row 0 is in this convention.
    fn describe(self) -> &'static str {
        match self {
            DecodeConvention::Generate => {
                "generate: one row per generated token, row 0 = the prefill's last row, as Hugging Face generate(output_logits=True) records them"
            }
            DecodeConvention::StepsOnly => {
                "steps_only: one row per single-token step after the prefill, the first generated token in no row"
            }
        }
    }

    /// The convention one row later (`shift = 1`: the candidate's row `i` is the expected row
    /// `i + 1`) or earlier (`shift = −1`) than `self`.
    fn shifted(self, shift: i8) -> DecodeConvention {
        match (self, shift) {
            (DecodeConvention::Generate, 1) => DecodeConvention::StepsOnly,
            (DecodeConvention::StepsOnly, -1) => DecodeConvention::Generate,
            (convention, _) => convention,
        }
    }
}

/// How a candidate's decode rows line up with the expected ones: candidate row
/// `candidate_start + i` is expected row `expected_start + i`, for `i < rows`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DecodeAlignment {
    pub expected_start: usize,
    pub candidate_start: usize,
    pub rows: usize,
    /// The expected dump's convention (`generate` unless its rows show otherwise).
    pub expected_convention: DecodeConvention,
    /// The candidate's convention.
    pub candidate_convention: DecodeConvention,
}

/// The decode tensors, whose axis 0 is the decode row.
const DECODE_TENSORS: [&str; 2] = ["decode_logits", "greedy_continuation"];

impl DecodeAlignment {
    /// Finds how `candidate`'s decode rows line up with `expected`'s (`None` when either has no
    /// decode tensor). `tolerance` bounds the relative error of a `decode_logits` row
    /// (`max|c − e| / max|e|`), as for the whole tensor.
    ///
    /// With logits rows on both sides, the first candidate row decides: the alignment whose
    /// first pair of rows agrees within `tolerance` (no shift first, then the candidate one row
    /// behind, then one row ahead). When no row agrees (token ids only, or a port with a bug
    /// upstream), the alignment whose overlapping token ids all agree. When nothing lines up,
    /// the rows stay unshifted and are judged as they are (a broken cache).
    pub fn detect(
        expected: &ActivationDump,
        candidate: &ActivationDump,
        tolerance: f64,
    ) -> Option<DecodeAlignment> {
        let rows_of = |dump: &ActivationDump| {
            DECODE_TENSORS
                .iter()
                .filter_map(|name| dump.get(name).and_then(|t| t.shape().first().copied()))
                .max()
        };
        let (expected_rows, candidate_rows) = (rows_of(expected)?, rows_of(candidate)?);
        let row_agrees = |candidate_row: usize, expected_row: usize| -> Option<bool> {
            let (c, e) = (logits_rows(candidate)?, logits_rows(expected)?);
            if c.ncols() != e.ncols() || candidate_row >= c.nrows() || expected_row >= e.nrows() {
                return Some(false);
            }
            Some(row_error(c.row(candidate_row), e.row(expected_row)) <= tolerance)
        };
        let tokens_agree = |shift: i8| -> Option<bool> {
            let (c, e) = (continuation(candidate)?, continuation(expected)?);
            let (c, e) = match shift {
                1 => (&c[..], e.get(1..)?),
                -1 => (c.get(1..)?, &e[..]),
                _ => (&c[..], &e[..]),
            };
            let overlap = c.len().min(e.len());
            Some(overlap > 0 && c[..overlap] == e[..overlap])
        };
        let rows_line_up = |shift: i8| -> bool {
            let (candidate_row, expected_row) = match shift {
                1 => (0, 1),
                -1 => (1, 0),
                _ => (0, 0),
            };
            row_agrees(candidate_row, expected_row).unwrap_or(false)
        };
        let expected_convention = own_convention(expected, tolerance);
        // A candidate whose first decode row is its own last prompt row follows the generate
        // convention: that says more than how its rows resemble the expected dump's. A model
        // whose logits hardly depend on the latest token has near-identical rows, and a wrong
        // candidate's first row can then agree with an expected row one step ahead (e4b_audio
        // with attention scaled by 1/sqrt(d): realigned by one step and judged as a false
        // decode mismatch).
        let known = (starts_with_last_prompt_row(candidate, tolerance) == Some(true)).then_some(
            match expected_convention {
                DecodeConvention::Generate => 0i8,
                DecodeConvention::StepsOnly => -1,
            },
        );
        // Then rows; then the token ids (a port with a bug upstream has no row within
        // tolerance, but its greedy choices usually survive the bug).
        let shift = known
            .or_else(|| [0i8, 1, -1].into_iter().find(|&shift| rows_line_up(shift)))
            .or_else(|| {
                [0i8, 1, -1]
                    .into_iter()
                    .find(|&shift| tokens_agree(shift).unwrap_or(false))
            })
            .unwrap_or(0);
        let (expected_start, candidate_start) = match shift {
            1 => (1, 0),
            -1 => (0, 1),
            _ => (0, 0),
        };
        Some(DecodeAlignment {
            expected_start,
            candidate_start,
            rows: (expected_rows.saturating_sub(expected_start))
                .min(candidate_rows.saturating_sub(candidate_start)),
            expected_convention,
            candidate_convention: expected_convention.shifted(shift),
        })
    }

    /// Are the two conventions different (the candidate's rows were shifted by one)?
    pub fn shifted(&self) -> bool {
        self.expected_start != self.candidate_start
    }

    /// One line naming both conventions, when they differ.
    pub fn note(&self) -> Option<String> {
        self.shifted().then(|| {
            format!(
                "decode rows: the candidate follows the {} convention ({}), the expected dump the {} one ({}); the candidate's rows were realigned by one step before judging ({} rows compared)",
                self.candidate_convention.name(),
                self.candidate_convention.describe(),
                self.expected_convention.name(),
                self.expected_convention.describe(),
                self.rows
            )
        })
    }

    /// The expected dump with its decode tensors cut to the aligned rows.
    pub fn expected_side<'a>(&self, dump: &'a ActivationDump) -> Cow<'a, ActivationDump> {
        slice_decode_rows(dump, self.expected_start, self.rows)
    }

    /// The candidate dump with its decode tensors cut to the aligned rows.
    pub fn candidate_side<'a>(&self, dump: &'a ActivationDump) -> Cow<'a, ActivationDump> {
        slice_decode_rows(dump, self.candidate_start, self.rows)
    }
}

/// Whether the dump's `decode_logits[0]` is its own `logits[T−1]` within `tolerance` (the mark
/// of the generate convention); `None` when the dump cannot tell (either tensor missing, empty,
/// or of another width).
fn starts_with_last_prompt_row(dump: &ActivationDump, tolerance: f64) -> Option<bool> {
    let decode = logits_rows(dump)?;
    let logits = dump
        .get("logits")?
        .as_f32()?
        .view()
        .into_dimensionality::<Ix2>()
        .ok()?;
    if decode.nrows() == 0 || logits.nrows() == 0 || decode.ncols() != logits.ncols() {
        return None;
    }
    Some(row_error(decode.row(0), logits.row(logits.nrows() - 1)) <= tolerance)
}

/// The convention a dump follows by itself: `generate` when its `decode_logits[0]` is its own
/// `logits[T−1]` within `tolerance` (or when it cannot tell), `steps_only` otherwise.
pub fn own_convention(dump: &ActivationDump, tolerance: f64) -> DecodeConvention {
    match starts_with_last_prompt_row(dump, tolerance) {
        Some(false) => DecodeConvention::StepsOnly,
        Some(true) | None => DecodeConvention::Generate,
    }
}

/// `decode_logits` as `[N, V]`, if the dump has it in that shape.
fn logits_rows(dump: &ActivationDump) -> Option<ArrayView2<'_, f32>> {
    dump.get("decode_logits")?
        .as_f32()?
        .view()
        .into_dimensionality::<Ix2>()
        .ok()
}

/// `greedy_continuation` as ids, else the argmax of each `decode_logits` row.
fn continuation(dump: &ActivationDump) -> Option<Vec<i64>> {
    if let Some(tokens) = dump.get("greedy_continuation").and_then(DumpTensor::as_i64) {
        return Some(tokens.iter().copied().collect());
    }
    let rows = logits_rows(dump)?;
    Some(rows.outer_iter().map(|row| argmax(row) as i64).collect())
}

/// `max|c − e| / max|e|` of two rows (infinite when they differ and `e` is all zero).
fn row_error(candidate: ArrayView1<f32>, expected: ArrayView1<f32>) -> f64 {
    let (mut scale, mut error) = (0.0f64, 0.0f64);
    for (&c, &e) in candidate.iter().zip(expected.iter()) {
        let (c, e) = (f64::from(c), f64::from(e));
        scale = scale.max(e.abs());
        error = error.max((c - e).abs());
    }
    if error.is_nan() {
        f64::INFINITY
    } else if scale > 0.0 {
        error / scale
    } else if error > 0.0 {
        f64::INFINITY
    } else {
        0.0
    }
}

/// `dump` with rows `start .. start + rows` of each decode tensor (axis 0), the rest as is;
/// borrowed when nothing is cut.
fn slice_decode_rows(dump: &ActivationDump, start: usize, rows: usize) -> Cow<'_, ActivationDump> {
    let cut = |tensor: &DumpTensor| {
        let n = tensor.shape().first().copied().unwrap_or(0);
        let range = start.min(n)..(start + rows).min(n);
        (range.start != 0 || range.end != n).then(|| match tensor {
            DumpTensor::F32(a) => {
                DumpTensor::F32(a.slice_axis(Axis(0), Slice::from(range)).to_owned())
            }
            DumpTensor::I64(a) => {
                DumpTensor::I64(a.slice_axis(Axis(0), Slice::from(range)).to_owned())
            }
        })
    };
    let changes: Vec<(&str, DumpTensor)> = DECODE_TENSORS
        .iter()
        .filter_map(|&name| Some((name, cut(dump.get(name)?)?)))
        .collect();
    if changes.is_empty() {
        return Cow::Borrowed(dump);
    }
    let mut sliced = dump.clone();
    for (name, tensor) in changes {
        sliced.insert(name, tensor);
    }
    Cow::Owned(sliced)
}

/// The tokens fed to the decode rows: `f₀ = argmax(logits[T−1])` (when the dump has logits),
/// then the greedy continuation (`greedy_continuation`, else the argmax of each decode row).
pub struct DecodeInputs {
    first: Option<usize>,
    continuation: Vec<usize>,
}

impl DecodeInputs {
    pub fn of(dump: &ActivationDump) -> Self {
        let first = dump
            .get("logits")
            .and_then(DumpTensor::as_f32)
            .filter(|l| l.ndim() == 2 && l.shape()[0] > 0)
            .and_then(|l| {
                l.index_axis(Axis(0), l.shape()[0] - 1)
                    .into_dimensionality::<Ix1>()
                    .ok()
                    .map(argmax)
            });
        DecodeInputs {
            first,
            continuation: continuation(dump)
                .unwrap_or_default()
                .into_iter()
                .map(|t| t as usize)
                .collect(),
        }
    }

    /// See [`comparable_decode_rows`].
    pub fn comparable_rows(&self, other: &DecodeInputs) -> Option<usize> {
        if let (Some(x), Some(y)) = (self.first, other.first) {
            if x != y {
                return Some(0);
            }
        }
        self.continuation
            .iter()
            .zip(&other.continuation)
            .position(|(x, y)| x != y)
            .map(|s| s + 1)
    }
}

/// How many leading `decode_logits` rows of two (aligned) dumps are logits of the same token
/// sequence (`None`: all of them, or unknown). A row is fed the tokens chosen before it, so once
/// the two greedy choices differ the later rows are on different sequences; a port whose float
/// noise tips a near-tie that way is not contradicting anything. The row where the choices
/// first differ is still comparable (it produced them). Conservative by one row in the
/// `generate` convention when `f₀` differs (row 0, the prefill's, would still be comparable;
/// `logits` covers it).
pub fn comparable_decode_rows(a: &ActivationDump, b: &ActivationDump) -> Option<usize> {
    DecodeInputs::of(a).comparable_rows(&DecodeInputs::of(b))
}

/// Is the candidate's choice at a decode row a near tie in the expected logits? `expected_row`
/// is the expected logits row that made the choice; a tie when the expected logit of the
/// candidate's token is within `tolerance · max|row|` of the expected maximum, i.e. a port
/// within tolerance could have picked either.
pub fn is_near_tie(expected_row: ArrayView1<f32>, candidate_choice: usize, tolerance: f64) -> bool {
    let Some(&chosen) = expected_row.get(candidate_choice) else {
        return false;
    };
    let scale = expected_row
        .iter()
        .fold(0.0f64, |m, &v| m.max(f64::from(v).abs()));
    let best = f64::from(expected_row[argmax(expected_row)]);
    best - f64::from(chosen) <= tolerance * scale
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array1, Array2};

    /// A dump with `logits` `[T, V]`, `decode_logits` and `greedy_continuation` in the generate
    /// convention: row 0 is the last prompt row, each row's argmax its token.
    fn generate_dump(rows: usize) -> ActivationDump {
        let vocab = 6;
        let row = |s: usize| {
            Array1::from_iter((0..vocab).map(|v| {
                if v == (s * 5 + 1) % vocab {
                    3.0
                } else {
                    0.1 * (v + s) as f32
                }
            }))
        };
        let mut logits = Array2::<f32>::zeros((3, vocab));
        logits.row_mut(2).assign(&row(0));
        let mut decode = Array2::<f32>::zeros((rows, vocab));
        for s in 0..rows {
            decode.row_mut(s).assign(&row(s));
        }
        let tokens: Vec<i64> = (0..rows).map(|s| ((s * 5 + 1) % vocab) as i64).collect();
        let mut dump = ActivationDump::new();
        dump.insert_f32("logits", logits.into_dyn());
        dump.insert_f32("decode_logits", decode.into_dyn());
        dump.insert_i64("greedy_continuation", Array1::from(tokens).into_dyn());
        dump
    }

    /// The same dump in the steps-only convention: rows 1.. of the generate dump.
    fn steps_only(dump: &ActivationDump) -> ActivationDump {
        slice_decode_rows(dump, 1, usize::MAX / 2).into_owned()
    }

    #[test]
    fn decode_alignment_finds_each_convention() {
        let ours = generate_dump(5);
        let same = DecodeAlignment::detect(&ours, &ours, 1e-6).unwrap();
        assert!(!same.shifted());
        assert_eq!(
            (same.rows, same.candidate_convention),
            (5, DecodeConvention::Generate)
        );
        assert_eq!(own_convention(&ours, 1e-6), DecodeConvention::Generate);

        // A steps-only candidate against our 5 rows: its 4 rows are our rows 1..5.
        let old = steps_only(&ours);
        assert_eq!(own_convention(&old, 1e-6), DecodeConvention::StepsOnly);
        let behind = DecodeAlignment::detect(&ours, &old, 1e-6).unwrap();
        assert_eq!(
            (behind.expected_start, behind.candidate_start, behind.rows),
            (1, 0, 4)
        );
        assert_eq!(behind.candidate_convention, DecodeConvention::StepsOnly);
        assert!(behind.note().unwrap().contains("steps_only"));
        let (e, c) = (behind.expected_side(&ours), behind.candidate_side(&old));
        assert_eq!(e.get("decode_logits"), c.get("decode_logits"));
        assert_eq!(e.get("greedy_continuation"), c.get("greedy_continuation"));

        // The other way: a generate candidate against a steps-only expected dump.
        let ahead = DecodeAlignment::detect(&old, &ours, 1e-6).unwrap();
        assert_eq!(
            (ahead.expected_start, ahead.candidate_start, ahead.rows),
            (0, 1, 4)
        );
        assert_eq!(ahead.expected_convention, DecodeConvention::StepsOnly);
        assert_eq!(ahead.candidate_convention, DecodeConvention::Generate);

        // Token ids alone decide as well.
        let mut ids_only = old.clone();
        ids_only.remove("decode_logits");
        let by_ids = DecodeAlignment::detect(&ours, &ids_only, 1e-6).unwrap();
        assert_eq!((by_ids.expected_start, by_ids.rows), (1, 4));
    }

    #[test]
    fn decode_alignment_leaves_a_broken_cache_unshifted() {
        let ours = generate_dump(5);
        let mut broken = ours.clone();
        let mut rows = ours.get("decode_logits").unwrap().as_f32().unwrap().clone();
        // Every row after the prefill's is off (a cache bug); row 0 is the prefill's own.
        rows.slice_mut(ndarray::s![1.., ..])
            .mapv_inplace(|v| v + 1.0);
        broken.insert_f32("decode_logits", rows);
        let alignment = DecodeAlignment::detect(&ours, &broken, 1e-6).unwrap();
        assert!(!alignment.shifted());
        // A steps-only dump of a broken cache: no row agrees, its greedy tokens still line up
        // one row behind, so it is realigned (and then judged, row by row, as broken).
        let old_broken = steps_only(&broken);
        let alignment = DecodeAlignment::detect(&ours, &old_broken, 1e-6).unwrap();
        assert_eq!(alignment.expected_start, 1);
        // With its tokens off too, nothing lines up: left unshifted.
        let mut lost = old_broken.clone();
        let tokens = lost
            .get("greedy_continuation")
            .unwrap()
            .as_i64()
            .unwrap()
            .mapv(|t| t + 1);
        lost.insert_i64("greedy_continuation", tokens);
        let alignment = DecodeAlignment::detect(&ours, &lost, 1e-6).unwrap();
        assert!(!alignment.shifted());
    }

    #[test]
    fn decode_alignment_trusts_a_candidate_that_starts_with_its_last_prompt_row() {
        // Expected: rows 1.. all alike (logits that hardly depend on the latest token).
        let mut expected = generate_dump(5);
        let mut rows = expected
            .get("decode_logits")
            .unwrap()
            .as_f32()
            .unwrap()
            .clone();
        let flat = rows.slice(ndarray::s![1, ..]).to_owned();
        for s in 2..5 {
            rows.slice_mut(ndarray::s![s, ..]).assign(&flat);
        }
        expected.insert_f32("decode_logits", rows.clone());
        // A wrong candidate in the generate convention whose prompt ends on that same flat row:
        // its row 0 agrees with the expected row 1, but it is its own last prompt row.
        let mut candidate = expected.clone();
        let mut logits = candidate.get("logits").unwrap().as_f32().unwrap().clone();
        logits.slice_mut(ndarray::s![2, ..]).assign(&flat);
        candidate.insert_f32("logits", logits);
        let mut candidate_rows = rows.clone();
        candidate_rows.slice_mut(ndarray::s![0, ..]).assign(&flat);
        candidate.insert_f32("decode_logits", candidate_rows);
        let alignment = DecodeAlignment::detect(&expected, &candidate, 1e-6).unwrap();
        assert!(!alignment.shifted(), "{:?}", alignment.note());
        // A steps-only candidate (its row 0 is not its last prompt row) is still realigned.
        let old = steps_only(&generate_dump(5));
        let alignment = DecodeAlignment::detect(&generate_dump(5), &old, 1e-6).unwrap();
        assert_eq!(alignment.expected_start, 1);
    }

    #[test]
    fn near_tie_is_within_the_tolerance_of_the_maximum() {
        let row = Array1::from(vec![1.0f32, 4.0, 3.9999]);
        assert!(is_near_tie(row.view(), 2, 1e-4));
        assert!(!is_near_tie(row.view(), 0, 1e-4));
        assert!(is_near_tie(row.view(), 1, 0.0), "the maximum itself");
        assert!(!is_near_tie(row.view(), 7, 1.0), "out of range");
    }
}
