//! `gemma4 compare`: a port's activation dump against ours, tensor by tensor in model order
//! (shared contracts §1, §2).
//!
//! 1. Precision. Each dump is classified as float32, float16 or bfloat16: by the dtype its
//!    tensors were stored in, or, for F32-stored dumps, by whether every value is exactly a
//!    bfloat16 (a bf16 computation upcast for storage, like the `e2b_bf16` oracle). The
//!    coarser of the two sides picks the tolerance policy ([`tolerance_for`]).
//! 2. Depth. Tolerances grow with the layer index, and the final norm, logits and decode steps
//!    sit at depth `L`. `L` comes from `--model`'s config, else from the expected dump's layer
//!    tensors, else from the candidate's; failing all three, [`FALLBACK_NUM_LAYERS`].
//! 3. Walk. Every tensor of the expected dump, in model order, is compared with the
//!    candidate's (missing ones are listed, not failed; NaN or infinity always fails). The first
//!    tensor that fails is the *first divergence*, and [`error_structure`] says which tokens,
//!    heads or channels of it are off.
//! 4. Diagnosis (with `--model`): see [`crate::compare_diagnosis`].

use std::path::{Path, PathBuf};

use gemma4_reference::checkpoint::WeightDtype;
use gemma4_reference::dump::{ActivationDump, DumpTensor};
use gemma4_reference::faults::with_faults;
use gemma4_reference::{Gemma4TextModel, ModelPlan};
use safetensors::Dtype;

use crate::compare_diagnosis::{
    comparable_decode_rows, diagnose, Diagnosis, FaultLibrary, ScoredTensor,
};
use crate::compare_structure::{error_structure, ErrorStructure};
use crate::comparison::{
    bf16_rounded, compare_dumps, compare_dumps_exact_bf16_embeddings, depth_of, is_index_tensor,
    layers_in_dump, tolerance_for, Bf16Rounding, Precision, Status, TensorReport,
};

/// Depth assumed for the final norm, logits and decode steps when nothing says how many layers
/// the model has (no `--model`, and neither dump holds a layer tensor): 60, the deepest
/// released Gemma 4 (31B). It gives the widest tolerance a real model can need, so a correct
/// port is never failed for our lack of information; the report says the fallback was used.
pub const FALLBACK_NUM_LAYERS: usize = 60;

/// What `compare` knows about the model beyond the dumps (from `--model`).
#[derive(Clone, Debug, Default)]
pub struct ModelFacts {
    /// `L`.
    pub num_layers: Option<usize>,
    /// `W` of sliding layers.
    pub sliding_window: Option<usize>,
    /// The layer plan (attention type, head dim and RoPE of every layer).
    pub plan: Option<ModelPlan>,
    /// Dtype of the embedding table.
    pub embed_dtype: Option<WeightDtype>,
}

impl ModelFacts {
    /// The facts a loaded model provides.
    pub fn of_model(model: &Gemma4TextModel) -> Self {
        ModelFacts {
            num_layers: Some(model.config.text.num_hidden_layers),
            sliding_window: Some(model.config.text.sliding_window),
            plan: Some(model.plan.clone()),
            embed_dtype: Some(model.weights.embed_dtype),
        }
    }
}

/// Where the layer count used for depth-aware tolerances came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerCountSource {
    ModelConfig,
    ExpectedDump,
    CandidateDump,
    Fallback,
}

/// The precision each side was judged to have, and the policy applied.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct PrecisionReport {
    pub expected: &'static str,
    pub candidate: &'static str,
    pub applied: &'static str,
}

/// Everything `gemma4 compare` reports (the `--json` object).
#[derive(Clone, Debug, serde::Serialize)]
pub struct CompareReport {
    /// Every compared tensor within tolerance, none non-finite, at least one compared.
    pub conformant: bool,
    /// The first tensor, in model order, that is not within tolerance.
    pub first_divergence: Option<String>,
    /// The fault id (shared contracts §4) that explains the candidate, if one clearly does.
    pub diagnosis: Option<String>,
    /// Per expected tensor, in model order.
    pub tensors: Vec<TensorReport>,
    pub precision: PrecisionReport,
    pub num_layers: usize,
    pub num_layers_source: LayerCountSource,
    /// Activation tensors compared (present on both sides; index tensors are checked but not
    /// counted, since a copy of `input_ids` alone proves nothing).
    pub compared: usize,
    /// Expected tensors the candidate does not hold (reported, not failed).
    pub missing: Vec<String>,
    /// Candidate tensors the expected dump does not hold (not compared).
    pub not_in_expected: Vec<String>,
    /// Candidate tensors holding NaN or infinity.
    pub non_finite: Vec<String>,
    /// Which tokens, heads, channels of the first divergent tensor are off.
    pub error_structure: Option<ErrorStructure>,
    /// The fault ranking behind `diagnosis` (only with `--model`).
    pub diagnosis_details: Option<Diagnosis>,
    /// Remarks on how the comparison was made.
    pub notes: Vec<String>,
    /// Where the expected dump came from (a file, or the reference on a model).
    pub expected_source: String,
    /// The candidate dump's file.
    pub candidate_source: String,
}

/// Errors that make the inputs unusable (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error("candidate dump {path}: {source}")]
    Candidate {
        path: PathBuf,
        #[source]
        source: gemma4_reference::Error,
    },
    #[error("expected dump {path}: {source}")]
    Expected {
        path: PathBuf,
        #[source]
        source: gemma4_reference::Error,
    },
    #[error("model {path}: {source}")]
    Model {
        path: PathBuf,
        #[source]
        source: gemma4_reference::Error,
    },
    #[error("--tokens: {0}")]
    Tokens(String),
    #[error("the candidate dump {path} holds none of the {expected} expected activations (names must follow shared contracts §2, e.g. `logits`, `layers.0.output`; index tensors alone prove nothing)")]
    NothingInCommon { path: PathBuf, expected: usize },
    #[error("expected dump {path}: tensor `{tensor}` holds the non-finite value {value} at {index:?}; an expected dump must be finite (a NaN would make every comparison with it vacuous)")]
    ExpectedNotFinite {
        path: PathBuf,
        tensor: String,
        index: Vec<usize>,
        value: f32,
    },
    #[error("candidate dump {path}: holds no tensors (an empty dump)")]
    EmptyCandidate { path: PathBuf },
    #[error("candidate dump {path}: tensor `decode_logits` has shape {shape:?}, expected [N, vocab_size] with vocab_size > 0")]
    BadDecodeShape { path: PathBuf, shape: Vec<usize> },
}

/// Where the expected dump comes from.
pub enum ExpectedSource<'a> {
    /// A dump file (`--expected`).
    File(&'a Path),
    /// The reference on a checkpoint (`--model`, `--tokens`).
    Reference {
        model: &'a Path,
        tokens: &'a [usize],
    },
}

/// Reads both dumps (or computes the expected one), compares, and diagnoses when a model is
/// given and `diagnose_faults` is set.
pub fn run_compare(
    source: ExpectedSource,
    candidate_path: &Path,
    diagnose_faults: bool,
) -> Result<CompareReport, CompareError> {
    let candidate =
        ActivationDump::read(candidate_path).map_err(|source| CompareError::Candidate {
            path: candidate_path.to_path_buf(),
            source,
        })?;
    if candidate.is_empty() {
        return Err(CompareError::EmptyCandidate {
            path: candidate_path.to_path_buf(),
        });
    }
    if let Some(shape) = candidate.get("decode_logits").map(|t| t.shape().to_vec()) {
        // A zero-width tensor could claim any number of decode steps without data behind it.
        if shape.len() != 2 || shape[1] == 0 {
            return Err(CompareError::BadDecodeShape {
                path: candidate_path.to_path_buf(),
                shape,
            });
        }
    }
    let report = match source {
        ExpectedSource::File(path) => {
            let expected = ActivationDump::read(path).map_err(|source| CompareError::Expected {
                path: path.to_path_buf(),
                source,
            })?;
            if let Some((tensor, index, value)) = expected.first_non_finite() {
                return Err(CompareError::ExpectedNotFinite {
                    path: path.to_path_buf(),
                    tensor: tensor.to_string(),
                    index,
                    value,
                });
            }
            let mut report = compare(&expected, &candidate, &ModelFacts::default());
            report.expected_source = path.display().to_string();
            if !report.conformant {
                report
                    .notes
                    .push("no diagnosis: it needs --model and --tokens".to_string());
            }
            report
        }
        ExpectedSource::Reference { model, tokens } => {
            let model_error = |source| CompareError::Model {
                path: model.to_path_buf(),
                source,
            };
            // The reference proper: no fault on, whatever GEMMA4_FAULTS says.
            let loaded = with_faults(&[], || Gemma4TextModel::load(model)).map_err(model_error)?;
            let decode_steps = decode_rows(&candidate);
            let expected =
                with_faults(&[], || loaded.dump(tokens, decode_steps)).map_err(model_error)?;
            let facts = ModelFacts::of_model(&loaded);
            let mut report = compare(&expected, &candidate, &facts);
            report.expected_source = format!(
                "the reference on {} ({} tokens, {decode_steps} decode steps)",
                model.display(),
                tokens.len()
            );
            if decode_steps > 0 {
                report.notes.push(format!(
                    "the reference decoded {decode_steps} greedy steps, as many as the candidate has"
                ));
            }
            if diagnose_faults && needs_diagnosis(&report) {
                let library = FaultLibrary::build(&loaded, model, tokens, decode_steps, expected);
                attach_diagnosis(&mut report, &library, &candidate);
            }
            report
        }
    };
    let mut report = report;
    report.candidate_source = candidate_path.display().to_string();
    if report.compared == 0 {
        return Err(CompareError::NothingInCommon {
            path: candidate_path.to_path_buf(),
            expected: report.tensors.len(),
        });
    }
    Ok(report)
}

/// Is there a divergence for the diagnosis to explain? (Not when the dumps are of different
/// token sequences: no fault changes `input_ids`.)
pub fn needs_diagnosis(report: &CompareReport) -> bool {
    !report.conformant
        && report
            .first_divergence
            .as_deref()
            .is_some_and(|first| first != "input_ids")
}

/// [`compare`], then, if the candidate diverges, [`attach_diagnosis`] with `library` (whose
/// clean dump must be `expected`).
pub fn compare_and_diagnose(
    expected: &ActivationDump,
    candidate: &ActivationDump,
    facts: &ModelFacts,
    library: &FaultLibrary,
) -> CompareReport {
    let mut report = compare(expected, candidate, facts);
    if needs_diagnosis(&report) {
        attach_diagnosis(&mut report, library, candidate);
    }
    report
}

/// Runs the diagnosis on a report's first divergence and records it.
pub fn attach_diagnosis(
    report: &mut CompareReport,
    library: &FaultLibrary,
    candidate: &ActivationDump,
) {
    let Some(first) = report.first_divergence.clone() else {
        return;
    };
    // Float tensors both sides hold with matching, finite values (index tensors are left out:
    // a different expert choice shows in `top_k_weights` and `moe.output` anyway).
    let scored: Vec<ScoredTensor> = report
        .tensors
        .iter()
        .filter(|r| matches!(r.status, Status::Pass | Status::Fail))
        .filter(|r| !is_index_tensor(&r.name))
        .map(|r| ScoredTensor {
            name: r.name.clone(),
            tolerance: r.tolerance,
        })
        .collect();
    let diagnosis = diagnose(library, candidate, &scored, &first);
    report.diagnosis = diagnosis.fault.clone();
    report.diagnosis_details = Some(diagnosis);
}

/// Decode steps in the candidate: rows of its `decode_logits`, else the length of its
/// `greedy_continuation`, else 0.
pub fn decode_rows(candidate: &ActivationDump) -> usize {
    ["decode_logits", "greedy_continuation"]
        .iter()
        .find_map(|name| candidate.get(name).and_then(|t| t.shape().first().copied()))
        .unwrap_or(0)
}

/// Is every value of this float tensor exactly a bfloat16?
fn is_bf16_exact(tensor: &DumpTensor) -> bool {
    match tensor {
        DumpTensor::F32(values) => values.iter().all(|v| v.to_bits() & 0xffff == 0),
        DumpTensor::I64(_) => false,
    }
}

/// The precision of the computation behind a dump.
///
/// Any tensor stored as F16 or BF16 makes the dump float16 or bfloat16. An F32-stored dump
/// whose float tensors (other than `embeddings`) all hold exact bfloat16 values is a bf16
/// computation upcast for storage: a float32 computation produces such values by chance with
/// probability 2^-16 per element. `embeddings` is left out because a float32 engine can
/// produce exact bf16 values there (bf16 weights times a power-of-two `sqrt(D)`).
pub fn dump_precision(dump: &ActivationDump) -> Precision {
    let names = dump.names_in_model_order();
    let floats: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| matches!(dump.get(n), Some(DumpTensor::F32(_))))
        .collect();
    let stored = |dtype: Dtype| floats.iter().any(|n| dump.stored_dtype(n) == Some(dtype));
    if stored(Dtype::BF16) {
        return Precision::BFloat16;
    }
    if stored(Dtype::F16) {
        return Precision::Float16;
    }
    let judged: Vec<&str> = floats
        .iter()
        .copied()
        .filter(|n| *n != "embeddings")
        .collect();
    let values: usize = judged
        .iter()
        .map(|n| {
            dump.get(n)
                .map_or(0, |t| t.shape().iter().product::<usize>())
        })
        .sum();
    // At least 64 values, so that a tiny dump is not judged by chance (2^-16 per value).
    if values >= 64
        && judged
            .iter()
            .all(|n| dump.get(n).is_some_and(is_bf16_exact))
    {
        Precision::BFloat16
    } else {
        Precision::Float32
    }
}

/// Compares `candidate` with `expected` (see the module documentation).
pub fn compare(
    expected: &ActivationDump,
    candidate: &ActivationDump,
    facts: &ModelFacts,
) -> CompareReport {
    let expected_precision = dump_precision(expected);
    let candidate_precision = dump_precision(candidate);
    let precision = expected_precision.max(candidate_precision);
    let mut notes = Vec::new();

    let (num_layers, num_layers_source) = match (
        facts.num_layers,
        layers_in_dump(expected),
        layers_in_dump(candidate),
    ) {
        (Some(l), _, _) => (l, LayerCountSource::ModelConfig),
        (None, Some(l), _) => (l, LayerCountSource::ExpectedDump),
        (None, None, Some(l)) => (l, LayerCountSource::CandidateDump),
        (None, None, None) => {
            notes.push(format!(
                "neither --model nor the dumps tell the number of layers; tolerances assume {FALLBACK_NUM_LAYERS} (the deepest released Gemma 4), the widest a real model needs"
            ));
            (FALLBACK_NUM_LAYERS, LayerCountSource::Fallback)
        }
    };

    // Embeddings of a bf16 computation are exact after one rounding: the oracle computes
    // bf16(row · bf16(sqrt(D))), and a bf16 x bf16 product is exact in f32, so both sides
    // rounded to bf16 must be equal (see `compare_dumps_exact_bf16_embeddings`). This holds
    // when the table is bf16: known from --model, or evident from an expected dump holding
    // bf16 values.
    let exact_bf16_embeddings = precision == Precision::BFloat16
        && (facts.embed_dtype == Some(WeightDtype::BF16)
            || expected.get("embeddings").is_some_and(is_bf16_exact));
    let tolerance = |name: &str| tolerance_for(name, precision, depth_of(name, num_layers));
    let tensors = if exact_bf16_embeddings {
        notes.push(
            "bfloat16: embeddings compared exactly after rounding both sides to bf16".to_string(),
        );
        compare_dumps_exact_bf16_embeddings(expected, candidate, Bf16Rounding::Both, tolerance)
    } else {
        compare_dumps(expected, candidate, tolerance)
    };

    let missing: Vec<String> = tensors
        .iter()
        .filter(|r| r.status == Status::Missing)
        .map(|r| r.name.clone())
        .collect();
    let non_finite: Vec<String> = tensors
        .iter()
        .filter(|r| r.status == Status::NonFinite)
        .map(|r| r.name.clone())
        .collect();
    let not_in_expected: Vec<String> = candidate
        .names_in_model_order()
        .into_iter()
        .filter(|n| expected.get(n).is_none())
        .map(String::from)
        .collect();
    // Only activations count: index tensors alone (a copy of `input_ids`) prove nothing.
    let compared = tensors
        .iter()
        .filter(|r| r.status != Status::Missing && !is_index_tensor(&r.name))
        .count();
    let first = tensors
        .iter()
        .find(|r| !matches!(r.status, Status::Pass | Status::Missing));
    let error_structure = first.and_then(|r| {
        if r.status != Status::Fail {
            return None;
        }
        let (e, c) = (expected.get(&r.name)?, candidate.get(&r.name)?);
        if exact_bf16_embeddings && r.name == "embeddings" {
            // The structure of what was compared: both sides rounded to bf16.
            let (e, c) = (bf16_rounded(e), bf16_rounded(c));
            return Some(error_structure(&r.name, &e, &c, r.tolerance, facts));
        }
        Some(error_structure(&r.name, e, c, r.tolerance, facts))
    });
    if first.is_some_and(|r| r.name == "input_ids") {
        notes.push(
            "the candidate's input_ids differ from the expected ones: the dumps are of different token sequences (check --tokens, BOS handling, multimodal expansion), so later tensors are not comparable".to_string(),
        );
    }
    if let (Some(_), Some(rows)) = (
        candidate.get("decode_logits"),
        comparable_decode_rows(expected, candidate),
    ) {
        notes.push(if rows == 0 {
            "the candidate's first greedy token (argmax of the last prompt logits) differs from the expected one: its decode steps run on another token sequence".to_string()
        } else {
            format!(
                "the candidate's greedy choice after decode step {} differs from the expected one: decode_logits rows after {} are on another token sequence",
                rows - 1,
                rows - 1
            )
        });
    }
    if let Some(first) = first {
        let prefill_conforms = tensors
            .iter()
            .filter(|r| !matches!(r.name.as_str(), "decode_logits" | "greedy_continuation"))
            .all(|r| matches!(r.status, Status::Pass | Status::Missing));
        if first.name == "decode_logits" && prefill_conforms {
            notes.push(
                "only the decode steps diverge: the prompt's tensors all conform".to_string(),
            );
        }
    }
    CompareReport {
        conformant: compared > 0 && first.is_none(),
        first_divergence: first.map(|r| r.name.clone()),
        diagnosis: None,
        precision: PrecisionReport {
            expected: expected_precision.name(),
            candidate: candidate_precision.name(),
            applied: precision.name(),
        },
        num_layers,
        num_layers_source,
        compared,
        missing,
        not_in_expected,
        non_finite,
        error_structure,
        diagnosis_details: None,
        notes,
        tensors,
        expected_source: String::new(),
        candidate_source: String::new(),
    }
}

/// The human-readable report.
pub fn format_report(report: &CompareReport) -> String {
    let mut out = String::new();
    if !report.expected_source.is_empty() {
        out.push_str(&format!("expected:  {}\n", report.expected_source));
    }
    if !report.candidate_source.is_empty() {
        out.push_str(&format!("candidate: {}\n", report.candidate_source));
    }
    out.push_str(&format!(
        "precision: {} (expected {}, candidate {}); depth-aware tolerances with L = {} ({})\n\n",
        report.precision.applied,
        report.precision.expected,
        report.precision.candidate,
        report.num_layers,
        match report.num_layers_source {
            LayerCountSource::ModelConfig => "from the model config",
            LayerCountSource::ExpectedDump => "from the expected dump",
            LayerCountSource::CandidateDump => "from the candidate dump",
            LayerCountSource::Fallback => "fallback",
        }
    ));
    out.push_str(&format!(
        "{:<14} {:<34} {:>10} {:>10} {:>10}\n",
        "status", "tensor", "max_abs", "max_rel", "tolerance"
    ));
    for r in report
        .tensors
        .iter()
        .filter(|r| r.status != Status::Missing)
    {
        let status = match r.status {
            Status::Pass => "pass",
            Status::Fail => "FAIL",
            Status::ShapeMismatch => "SHAPE",
            Status::NonFinite => "NON-FINITE",
            Status::Missing => "missing",
        };
        out.push_str(&format!(
            "{:<14} {:<34} {:>10.3e} {:>10.3e} {:>10.1e}\n",
            status, r.name, r.max_abs, r.max_rel, r.tolerance
        ));
    }
    if !report.missing.is_empty() {
        out.push_str(&format!(
            "\nnot in the candidate (reported, not a failure): {} tensors: {}\n",
            report.missing.len(),
            abbreviate(&report.missing, 12)
        ));
    }
    if !report.not_in_expected.is_empty() {
        out.push_str(&format!(
            "not compared (not in the expected dump): {}\n",
            abbreviate(&report.not_in_expected, 12)
        ));
    }
    for note in &report.notes {
        out.push_str(&format!("note: {note}\n"));
    }
    out.push('\n');
    match (&report.first_divergence, report.conformant) {
        (None, true) => out.push_str(&format!(
            "CONFORMANT: {} tensors within tolerance\n",
            report.compared
        )),
        (None, false) => out.push_str("NOT CONFORMANT: nothing to compare\n"),
        (Some(first), _) => {
            let detail = report
                .tensors
                .iter()
                .find(|r| &r.name == first)
                .map(|r| r.describe())
                .unwrap_or_default();
            out.push_str(&format!(
                "NOT CONFORMANT. First divergence: {first}\n  {detail}\n"
            ));
            if !report.non_finite.is_empty() {
                out.push_str(&format!(
                    "  NaN or infinity in: {}\n",
                    abbreviate(&report.non_finite, 8)
                ));
            }
            if let Some(s) = &report.error_structure {
                if let Some(rows) = &s.rows {
                    out.push_str(&format!(
                        "  {}: {}\n",
                        rows.axis.replace('_', " "),
                        rows.summary
                    ));
                }
                if let Some(heads) = &s.heads {
                    out.push_str(&format!("  heads: {}\n", heads.summary));
                }
                if let Some(channels) = &s.channels {
                    out.push_str(&format!("  channels: {}\n", channels.summary));
                }
                if let Some(layers) = &s.ple_layers {
                    out.push_str(&format!("  PLE layers: {}\n", layers.summary));
                }
                for hint in &s.hints {
                    out.push_str(&format!("  hint: {hint}\n"));
                }
            }
        }
    }
    if let Some(d) = &report.diagnosis_details {
        out.push('\n');
        out.push_str(&crate::compare_diagnosis::format_diagnosis(d));
    }
    out
}

fn abbreviate(names: &[String], shown: usize) -> String {
    if names.len() <= shown {
        names.join(", ")
    } else {
        format!(
            "{}, ... ({} more)",
            names[..shown].join(", "),
            names.len() - shown
        )
    }
}
