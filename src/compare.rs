//! `gemma4 compare`: a port's activation dump against ours, tensor by tensor in model order
//! (shared contracts §1, §2).
//!
//! 1. Precision. Each dump is classified as float32, float16 or bfloat16: by the dtype its
//!    tensors were stored in, or, for F32-stored dumps, by whether every value is exactly a
//!    bfloat16 (a bf16 computation upcast for storage, like the `e2b_bf16` oracle). The
//!    coarser of the two sides picks the tolerance policy ([`tolerance_for`](crate::comparison::tolerance_for)).
//! 2. Depth. Tolerances grow with the layer index, and the final norm, logits and decode steps
//!    sit at depth `L`. `L` comes from `--model`'s config, else from the expected dump's layer
//!    tensors, else from the candidate's; failing all three, [`FALLBACK_NUM_LAYERS`].
//! 3. Walk. Every tensor of the expected dump, in model order, is compared with the
//!    candidate's (missing ones are listed, not failed; NaN or infinity always fails). The first
//!    tensor that fails is the *first divergence*, and [`error_structure`] says which tokens,
//!    heads or channels of it are off.
//! 4. Diagnosis (with `--model`): see [`crate::compare_diagnosis`].

use std::path::{Path, PathBuf};

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use gemma4_reference::checkpoint::WeightDtype;
use gemma4_reference::dump::{ActivationDump, DumpTensor};
use gemma4_reference::embedding::embedding_scale;
use gemma4_reference::faults::with_faults;
use gemma4_reference::forced_routing::{with_forced_routing, with_refereed_routing, ForcedRouting};
use gemma4_reference::merge::Prompt;
use gemma4_reference::model::{argmax, LoadOptions};
use gemma4_reference::precision::{
    active_precision_set, with_precision, PrecisionScope, PrecisionSet,
};
use gemma4_reference::weight_stream::Residence;
use gemma4_reference::{ComputeDtype, Gemma4TextModel, ModelPlan};
use ndarray::{ArrayView2, Axis, Ix1, Ix2};
use safetensors::Dtype;

use crate::compare_decode::{comparable_decode_rows, is_near_tie, DecodeAlignment};
use crate::compare_diagnosis::{
    clean_noise_envelope, diagnose, Diagnosis, FaultLibrary, ScoredTensor, SEPARATION,
};
use crate::compare_routing::{
    candidate_referee, force_ties, judge_layer, router_index_layer, LayerTies,
};
use crate::compare_structure::{error_structure, ErrorStructure};
use crate::comparison::{
    bf16_rounded, compare_dumps, compare_dumps_exact_bf16_embeddings, is_index_tensor,
    layers_in_dump, tolerance_with_vision, vision_layers_in_dump, Bf16Rounding, Precision, Status,
    TensorReport,
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
    /// The arithmetic the expected dump imitates (`--compute-dtype`).
    pub compute_dtype: Option<ComputeDtype>,
    /// Per float tensor, how far float noise moves the expected dump on this model (see
    /// [`clean_noise_envelope`]): a tensor beyond its tolerance but within this is conformant.
    pub noise_envelope: Option<HashMap<String, f64>>,
    /// The precision choices the expected dump imitates (`--precision`; float32: none). Its
    /// noise envelope is then measured at that precision too: the probes round where the
    /// runtime rounds, so the envelope holds the rounding-boundary flips an independent port
    /// at that precision shows.
    pub precision: PrecisionSet,
}

/// At a precision (`--precision`), a tensor may differ by this many times the noise envelope
/// measured at that precision. The envelope is the larger deviation of two probe runs, and at a
/// precision most of it comes from a few rounding-boundary flips, whose effect depends on where
/// they land: one draw bounds another less tightly than float32 noise, which is spread over
/// every element. Measured on the golden models with independent ports imitated at llama.cpp's
/// precision (five weight-noise seeds at 1e-7, `tests/precision.rs`,
/// `precision_margin_calibration`): their deviation reached 1.19 envelopes at most (7.5 when
/// the probes do not dither their roundings); 2 leaves margin, and every fault of the catalogue
/// whose effect on the logits exceeds the precision's own still stands out
/// (`precision_hides_no_fault_*`).
pub const PRECISION_ENVELOPE_MARGIN: f64 = 2.0;

impl ModelFacts {
    /// The noise envelope of `name` (times [`PRECISION_ENVELOPE_MARGIN`] at a precision other
    /// than float32), if measured.
    pub fn envelope(&self, name: &str) -> Option<f64> {
        let margin = if self.precision.is_float32() {
            1.0
        } else {
            PRECISION_ENVELOPE_MARGIN
        };
        self.noise_envelope
            .as_ref()
            .and_then(|envelope| envelope.get(name))
            .map(|e| e * margin)
    }

    /// The facts a loaded model provides.
    pub fn of_model(model: &Gemma4TextModel) -> Self {
        ModelFacts {
            num_layers: Some(model.config.text.num_hidden_layers),
            sliding_window: Some(model.config.text.sliding_window),
            plan: Some(model.plan.clone()),
            embed_dtype: Some(model.weights.embed_dtype()),
            compute_dtype: Some(model.compute_dtype),
            noise_envelope: None,
            precision: active_precision_set(),
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
    /// The candidate's decode convention (`generate`, the contract's, or `steps_only`), when it
    /// has decode rows; a candidate in the other convention is realigned before judging.
    pub decode_convention: Option<&'static str>,
    /// How the candidate's decode rows were lined up with the expected ones.
    pub decode_alignment: Option<DecodeAlignment>,
    /// The arithmetic the expected dump was computed in (`float32`, `bf16`, `f16`; with
    /// `--model`; `None` for an expected dump read from a file).
    pub compute_dtype: Option<&'static str>,
    /// Set when the candidate is not conformant in `compute_dtype` but is in this other one (the
    /// diagnosis then names no fault: the port imitates another arithmetic).
    pub conformant_with_compute_dtype: Option<&'static str>,
    /// The precision choices the expected dump imitates (`--precision`; `float32`: none).
    pub judged_at_precision: String,
    /// Set when the candidate is not conformant as judged but is at these precision choices:
    /// a precision choice, not a bug (the diagnosis then names no fault).
    pub precision_choice: Option<PrecisionVerdict>,
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
    /// The reference on a checkpoint (`--model`, `--tokens`, and the prompt's images).
    Reference { model: &'a Path, prompt: &'a Prompt },
}

/// The precision choices that reproduce a candidate (a precision choice, not a bug).
#[derive(Clone, Debug, serde::Serialize)]
pub struct PrecisionVerdict {
    /// The profile's name, or the choices' ids joined by `+`.
    pub name: String,
    /// The catalogue ids of its choices.
    pub choices: Vec<&'static str>,
    /// What it imitates.
    pub about: String,
    /// How closely each tried set reproduces the candidate, best first: the largest error
    /// against that set's imitating run in units of the float32 allowance (tolerance or noise
    /// envelope), and, for the best few, whether the candidate is conformant at that precision.
    pub ranking: Vec<PrecisionFit>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct PrecisionFit {
    pub name: String,
    /// Judged at that precision (only the best few are: `None` for the others).
    pub conformant: Option<bool>,
    pub misfit: f64,
    pub worst_tensor: Option<String>,
}

/// How `gemma4 compare` judges (`--compute-dtype`, `--precision`, `--no-diagnosis`, `--weights`).
#[derive(Clone, Copy, Debug)]
pub struct CompareOptions {
    /// The arithmetic the reference imitates with `--model` (float32 by default).
    pub compute_dtype: ComputeDtype,
    /// The precision choices the reference imitates with `--model` (none by default).
    pub precision: PrecisionSet,
    /// With `--model`: name the likely fault of a diverging candidate.
    pub diagnose: bool,
    /// With `--model`: where the reference keeps its weights.
    pub residence: Residence,
}

impl Default for CompareOptions {
    fn default() -> Self {
        CompareOptions {
            compute_dtype: ComputeDtype::Float32,
            precision: PrecisionSet::FLOAT32,
            diagnose: true,
            residence: Residence::Auto,
        }
    }
}

/// Reads both dumps (or computes the expected one), compares, and diagnoses when a model is
/// given and `options.diagnose` is set.
pub fn run_compare(
    source: ExpectedSource,
    candidate_path: &Path,
    options: CompareOptions,
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
        ExpectedSource::Reference { model, prompt } => {
            let tokens = &prompt.tokens;
            // Every reference run of this comparison imitates the chosen precision (none:
            // float32); the fault library passes it on to its worker threads.
            let _precision = PrecisionScope::enter(&options.precision.choices());
            let model_error = |source| CompareError::Model {
                path: model.to_path_buf(),
                source,
            };
            // One generated token more than the candidate's decode rows: a candidate recording
            // the steps-only convention holds our rows 1..=N (crate::compare_decode).
            let candidate_rows = decode_rows(&candidate);
            let decode_steps = if candidate_rows > 0 {
                candidate_rows + 1
            } else {
                0
            };
            // The reference proper: no fault on, whatever GEMMA4_FAULTS says.
            let load = LoadOptions {
                residence: options.residence,
                decode_steps,
                ..LoadOptions::default()
            };
            let mut loaded = with_faults(&[], || Gemma4TextModel::load_with(model, prompt, &load))
                .map_err(model_error)?
                .with_compute_dtype(options.compute_dtype);
            // The reference runs inside a forced-routing scope: it records the router's
            // probabilities (MoE models), and imposes the candidate's near-tie expert choices
            // once they are found (crate::compare_routing).
            let run_reference = |loaded: &Gemma4TextModel, forced: &ForcedRouting| {
                let (dump, log) = with_forced_routing(forced.clone(), || {
                    with_faults(&[], || loaded.dump_prompt(prompt, decode_steps))
                });
                dump.map(|dump| (dump, log))
            };
            // The first run follows the candidate's near-tie expert choices as it reaches each
            // MoE layer (crate::compare_routing::candidate_referee): one run, however many
            // layers tipped a tie.
            let routing_notes = Rc::new(RefCell::new(Vec::new()));
            let referee = {
                let precision = dump_precision(&candidate);
                let num_layers = loaded.config.text.num_hidden_layers;
                let vision_layers = vision_layers_in_dump(&candidate);
                candidate_referee(
                    &candidate,
                    move |layer| {
                        tolerance_with_vision(
                            &format!("layers.{layer}.router.top_k_weights"),
                            precision,
                            num_layers,
                            vision_layers,
                        )
                    },
                    Rc::clone(&routing_notes),
                )
            };
            let (dump, first_log) =
                with_refereed_routing(ForcedRouting::default(), Some(referee), || {
                    with_faults(&[], || loaded.dump_prompt(prompt, decode_steps))
                });
            let (mut expected, mut router_log) = (dump.map_err(model_error)?, first_log);
            let mut forced = router_log.imposed().clone();
            let mut routing_notes = routing_notes.take();
            let mut facts = ModelFacts::of_model(&loaded);
            let mut report = compare(&expected, &candidate, &facts);
            // A streamed model is re-read from disk by every extra run: it gets the two
            // float-noise probes (streamed too), not the fault library (dozens of runs).
            let streamed = loaded.weights.is_streamed();
            for _ in 0..MAX_ROUTER_RERUNS {
                if let Some(layer) = first_router_set_divergence(&report) {
                    let tolerance = report
                        .tensors
                        .iter()
                        .find(|r| r.name == format!("layers.{layer}.router.top_k_weights"))
                        .map_or(0.0, |r| r.tolerance);
                    match judge_layer(layer, &expected, &candidate, &router_log, tolerance) {
                        LayerTies::NearTies {
                            layer,
                            ties,
                            allowance,
                        } => {
                            if streamed {
                                // Each extra run re-reads the checkpoint: say why it is made.
                                eprintln!(
                                    "gemma4 compare: layer {layer}: {} token(s) chose other experts by a near tie; running the reference again with the candidate's choices there",
                                    ties.len()
                                );
                            }
                            routing_notes.push(force_ties(&mut forced, layer, &ties, allowance));
                            (expected, router_log) =
                                run_reference(&loaded, &forced).map_err(model_error)?;
                            report = compare(&expected, &candidate, &facts);
                            continue;
                        }
                        LayerTies::Not(reason) => {
                            routing_notes.push(format!("not a near tie of the router: {reason}"));
                            break;
                        }
                    }
                }
                if report.conformant || !needs_diagnosis(&report) || facts.noise_envelope.is_some()
                {
                    break;
                }
                // Judged again with this model's float-noise envelope (two reference runs on
                // perturbed weights): a chaotic random model can amplify an independent float32
                // implementation's rounding beyond the fixed tolerance.
                if streamed {
                    eprintln!(
                        "gemma4 compare: beyond the fixed tolerance at {}; measuring this model's float-noise envelope (two more reference runs)",
                        report.first_divergence.as_deref().unwrap_or("a tensor")
                    );
                }
                facts.noise_envelope = Some(clean_noise_envelope(
                    &loaded,
                    model,
                    prompt,
                    decode_steps,
                    &expected,
                    &forced,
                ));
                report = compare(&expected, &candidate, &facts);
            }
            report.notes.extend(routing_notes);
            report.expected_source = format!(
                "the reference on {} ({} tokens, {} arithmetic{})",
                model.display(),
                tokens.len(),
                options.compute_dtype,
                if decode_steps > 0 {
                    format!(", {decode_steps} tokens generated greedily")
                } else {
                    String::new()
                }
            );
            if streamed && options.diagnose && needs_diagnosis(&report) {
                report.notes.push(
                    "no diagnosis: the model is streamed from disk (larger than the memory \
                     limit), and the diagnosis re-runs it once per known fault; diagnose on a \
                     smaller model of the same family"
                        .to_string(),
                );
            }
            // (A streamed model is not re-run in the other arithmetics either.)
            if !streamed && !report.conformant && needs_diagnosis(&report) {
                report.conformant_with_compute_dtype =
                    conformant_in_other_arithmetic(&mut loaded, prompt, decode_steps, &candidate)
                        .map_err(model_error)?;
            }
            // A port right at its own precision (a float16 KV cache, a GELU table) is not buggy:
            // before any fault is named, the catalogue's precision choices are tried.
            if options.diagnose
                && !streamed
                && needs_diagnosis(&report)
                && report.conformant_with_compute_dtype.is_none()
            {
                report.precision_choice = explain_by_precision(
                    &loaded,
                    model,
                    prompt,
                    decode_steps,
                    &forced,
                    (&expected, &report),
                    &candidate,
                    &facts,
                )
                .map_err(model_error)?;
            }
            if options.diagnose
                && !streamed
                && needs_diagnosis(&report)
                && report.conformant_with_compute_dtype.is_none()
                && report.precision_choice.is_none()
            {
                let library = FaultLibrary::build(&loaded, model, prompt, decode_steps, expected);
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

/// The other arithmetic (`ComputeDtype`) in which `candidate` is conformant, if any: a port
/// imitating a bf16 computation (the embedding scales rounded to bf16) against a float32
/// reference, or the reverse, is not buggy, and the diagnosis must not name a fault for it
/// (`embed_scale_not_rounded` would be the opposite of the truth). Only modes that change
/// this model's constants are tried, and for a bf16 (f16) candidate only the bf16 (f16) mode:
/// a port that computes in bf16 is no float32 or f16 computation, whatever the bf16
/// tolerances let through (its unrounded scale is a real slip); `model` is left in its own
/// mode.
fn conformant_in_other_arithmetic(
    model: &mut Gemma4TextModel,
    prompt: &Prompt,
    decode_steps: usize,
    candidate: &ActivationDump,
) -> gemma4_reference::Result<Option<&'static str>> {
    let own = model.compute_dtype;
    let text = &model.config.text;
    let widths: Vec<usize> = [text.hidden_size, text.hidden_size_per_layer_input]
        .into_iter()
        .filter(|&width| width > 0)
        .collect();
    let scales = |mode: ComputeDtype| -> Vec<f32> {
        with_faults(&[], || {
            widths.iter().map(|&w| embedding_scale(w, mode)).collect()
        })
    };
    let candidate_arithmetic = match dump_precision(candidate) {
        Precision::Float32 => None,
        Precision::BFloat16 => Some(ComputeDtype::BFloat16),
        Precision::Float16 => Some(ComputeDtype::Float16),
    };
    let mut found = None;
    for mode in ComputeDtype::ALL {
        if mode == own
            || scales(mode) == scales(own)
            || candidate_arithmetic.is_some_and(|arithmetic| arithmetic != mode)
        {
            continue;
        }
        model.compute_dtype = mode;
        let expected = with_faults(&[], || model.dump_prompt(prompt, decode_steps));
        let facts = ModelFacts::of_model(model);
        model.compute_dtype = own;
        if compare(&expected?, candidate, &facts).conformant {
            found = Some(mode.name());
            break;
        }
    }
    Ok(found)
}

/// How many of the best-reproducing precision hypotheses get their own noise envelope (two
/// more reference runs each) to judge the candidate at that precision: the choices of one
/// runtime differ in where they round, so the candidate's true precision reproduces it several
/// times more closely than the others (measured on llama.cpp's dumps, docs/ports.md), and three
/// leaves room for near ties between a profile and its own subsets.
const PRECISION_FINALISTS: usize = 3;

/// The precision choices that explain a candidate that is not conformant as judged (at
/// `facts.precision`, float32 by default; `judged` is that expected dump and the candidate's
/// report against it), if any. The reference runs once per hypothesis of
/// [`PrecisionSet::hypotheses`] (every profile of a real runtime, every single choice). A set
/// is a candidate explanation only if
/// - its run leaves the tolerance exactly where the candidate does (its first divergence from
///   the judged dump is the candidate's): a port that matches the judged reference until some
///   later tensor does not round where that runtime rounds, whatever its later error; and
/// - at that first divergent tensor it reproduces the candidate at least [`SEPARATION`] times
///   better than the judged dump does (the error in units of the float32 allowance), as a
///   fault must: a faint bug of a float32 port, seen in its logits alone, is no closer to a
///   rounding run than to the exact one. (Only there: deeper in a model that amplifies every
///   rounding, the flips of a port at that precision move it as far from our rounding run as
///   the rounding itself moves it from the exact one; that is judged with the noise envelope
///   at that precision.)
///
/// The candidates are ranked by that error; the best [`PRECISION_FINALISTS`] are judged as
/// `--precision` would judge them, with the noise envelope measured at that precision, and the
/// best-reproducing one at which the candidate is conformant is named.
#[allow(clippy::too_many_arguments)]
fn explain_by_precision(
    model: &Gemma4TextModel,
    model_dir: &Path,
    prompt: &Prompt,
    decode_steps: usize,
    forced: &ForcedRouting,
    judged: (&ActivationDump, &CompareReport),
    candidate: &ActivationDump,
    facts: &ModelFacts,
) -> gemma4_reference::Result<Option<PrecisionVerdict>> {
    let (expected, report) = judged;
    let Some(first) = report.first_divergence.as_deref() else {
        return Ok(None);
    };
    let misfit_at_first = |report: &CompareReport| {
        report
            .tensors
            .iter()
            .find(|r| r.name == first && !is_index_tensor(&r.name))
            .map_or(0.0, |r| tensor_misfit(r, facts.noise_envelope.as_ref()))
    };
    let judged_misfit = misfit_at_first(report);
    let mut runs = Vec::new();
    for set in PrecisionSet::hypotheses() {
        if set == facts.precision {
            continue;
        }
        let (dump, _) = with_precision(&set.choices(), || {
            with_forced_routing(forced.clone(), || {
                with_faults(&[], || model.dump_prompt(prompt, decode_steps))
            })
        });
        let dump = dump?;
        let departs_where_the_candidate_does =
            compare(expected, &dump, facts).first_divergence == report.first_divergence;
        let fit = compare(&dump, candidate, facts);
        let (misfit, worst_tensor) = reproduction_misfit(&fit, facts.noise_envelope.as_ref());
        if departs_where_the_candidate_does && misfit_at_first(&fit) * SEPARATION <= judged_misfit {
            runs.push((set, dump, misfit, worst_tensor));
        }
    }
    runs.sort_by(|a, b| a.2.total_cmp(&b.2));
    let mut ranking = Vec::new();
    let mut named = None;
    for (rank, (set, dump, misfit, worst_tensor)) in runs.into_iter().enumerate() {
        let conformant = (rank < PRECISION_FINALISTS).then(|| {
            let envelope = with_precision(&set.choices(), || {
                clean_noise_envelope(model, model_dir, prompt, decode_steps, &dump, forced)
            });
            let at_precision = ModelFacts {
                noise_envelope: Some(envelope),
                precision: set,
                ..facts.clone()
            };
            compare(&dump, candidate, &at_precision).conformant
        });
        if conformant == Some(true) && named.is_none() {
            named = Some(set);
        }
        ranking.push(PrecisionFit {
            name: set.name(),
            conformant,
            misfit,
            worst_tensor,
        });
    }
    Ok(named.map(|best| PrecisionVerdict {
        name: best.name(),
        choices: best.choices().iter().map(|c| c.id()).collect(),
        about: best.about(),
        ranking,
    }))
}

/// How closely a run reproduces the candidate: the largest `max_rel` of a compared activation
/// in units of its float32 allowance (tolerance, or the noise envelope where larger), and where.
fn reproduction_misfit(
    report: &CompareReport,
    envelope: Option<&HashMap<String, f64>>,
) -> (f64, Option<String>) {
    report
        .tensors
        .iter()
        .filter(|r| r.status != Status::Missing && !is_index_tensor(&r.name))
        .map(|r| (tensor_misfit(r, envelope), Some(r.name.clone())))
        .fold(
            (0.0, None),
            |best, next| if next.0 > best.0 { next } else { best },
        )
}

/// One tensor's `max_rel` in units of its float32 allowance (tolerance, or the noise envelope
/// where larger).
fn tensor_misfit(r: &TensorReport, envelope: Option<&HashMap<String, f64>>) -> f64 {
    let noise = envelope
        .and_then(|e| e.get(&r.name))
        .copied()
        .unwrap_or(0.0);
    let allowance = r.tolerance.max(noise);
    if allowance > 0.0 {
        r.max_rel / allowance
    } else if r.max_rel == 0.0 {
        0.0
    } else {
        f64::INFINITY
    }
}

/// Is there a divergence for the diagnosis to explain? (Not when the dumps are of different
/// token sequences: no fault changes `input_ids`.)
/// How many times `compare --model` re-runs the reference with a port's near-tie expert choices
/// forced (one MoE layer each): a correct port tips a handful of ties in a deep model (one in 20
/// layers of a real-dimension 26B-A4B); more than this is no longer noise.
const MAX_ROUTER_RERUNS: usize = 8;

/// The MoE layer whose `router.top_k_index` is the first divergence, when the candidate chose
/// another *set* of experts there (not merely another ranking of the same ones).
fn first_router_set_divergence(report: &CompareReport) -> Option<usize> {
    let first = report.first_divergence.as_deref()?;
    let layer = router_index_layer(first)?;
    let mismatch = report
        .tensors
        .iter()
        .find(|r| r.name == first)?
        .index_mismatch
        .as_ref()?;
    (mismatch.differing_rows > mismatch.reordered_rows).then_some(layer)
}

pub fn needs_diagnosis(report: &CompareReport) -> bool {
    !report.conformant
        && report
            .first_divergence
            .as_deref()
            .is_some_and(|first| first != "input_ids")
}

/// What `compare --model` does with a fault library at hand (whose clean dump must be
/// `expected`): [`compare`]; if the candidate diverges, again with the clean reference's
/// float-noise envelope (the library's); if it still diverges, [`attach_diagnosis`].
pub fn compare_and_diagnose(
    expected: &ActivationDump,
    candidate: &ActivationDump,
    facts: &ModelFacts,
    library: &FaultLibrary,
) -> CompareReport {
    let mut report = compare(expected, candidate, facts);
    if needs_diagnosis(&report) {
        let facts = ModelFacts {
            noise_envelope: Some(library.clean.envelope.clone()),
            ..facts.clone()
        };
        report = compare(expected, candidate, &facts);
    }
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
    let candidate = single_clip_names(candidate).unwrap_or(Cow::Borrowed(candidate));
    let candidate = candidate.as_ref();
    // Float tensors both sides hold with matching, finite values (index tensors are left out:
    // a different expert choice shows in `top_k_weights` and `moe.output` anyway).
    let scored: Vec<ScoredTensor> = report
        .tensors
        .iter()
        .filter(|r| matches!(r.status, Status::Pass | Status::WithinNoise | Status::Fail))
        .filter(|r| !is_index_tensor(&r.name))
        .map(|r| ScoredTensor {
            name: r.name.clone(),
            tolerance: r.tolerance,
        })
        .collect();
    let diagnosis = diagnose(
        library,
        candidate,
        &scored,
        &first,
        report.decode_alignment.as_ref(),
    );
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
    // `vision.0.soft_tokens` of a one-image dump is `vision.soft_tokens` (shared contracts §2).
    let (expected, candidate) = (
        single_clip_names(expected).unwrap_or(Cow::Borrowed(expected)),
        single_clip_names(candidate).unwrap_or(Cow::Borrowed(candidate)),
    );
    let (expected, candidate) = (expected.as_ref(), candidate.as_ref());
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
    let vision_layers = vision_layers_in_dump(expected);
    let tolerance = |name: &str| tolerance_with_vision(name, precision, num_layers, vision_layers);

    // Decode rows: line the candidate's convention up with the expected one's, then keep the
    // rows both computed on the same token sequence (crate::compare_decode).
    let decode_alignment = DecodeAlignment::detect(expected, candidate, tolerance("decode_logits"));
    let (mut expected_view, mut candidate_view) = match &decode_alignment {
        Some(alignment) => (
            alignment.expected_side(expected),
            alignment.candidate_side(candidate),
        ),
        None => (Cow::Borrowed(expected), Cow::Borrowed(candidate)),
    };
    notes.extend(decode_alignment.as_ref().and_then(DecodeAlignment::note));
    // A greedy choice is a near tie within the fixed tolerance, or, once this model's
    // float-noise envelope is known, within how far that noise moves the decode logits.
    let tie_tolerance = |name: &str| tolerance(name).max(facts.envelope(name).unwrap_or(0.0));
    if let Some(cut) = decode_rows_to_judge(&expected_view, &candidate_view, &tie_tolerance) {
        notes.push(cut.note.clone());
        cut.apply(expected_view.to_mut());
        cut.apply(candidate_view.to_mut());
    }
    let (expected, candidate) = (expected_view.as_ref(), candidate_view.as_ref());

    // Embeddings of a bf16 computation are exact after one rounding: the oracle computes
    // bf16(row · bf16(sqrt(D))), and a bf16 x bf16 product is exact in f32, so both sides
    // rounded to bf16 must be equal (see `compare_dumps_exact_bf16_embeddings`). This holds
    // when the table is bf16 and the reference imitates a bf16 computation (known from
    // --model), or when the expected dump's embeddings are bf16 values (no --model).
    let exact_bf16_embeddings = precision == Precision::BFloat16
        && match facts.compute_dtype {
            Some(compute) => {
                compute == ComputeDtype::BFloat16 && facts.embed_dtype == Some(WeightDtype::BF16)
            }
            None => expected.get("embeddings").is_some_and(is_bf16_exact),
        };
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
    let mut tensors = tensors;
    if facts.noise_envelope.is_some() {
        for r in tensors.iter_mut().filter(|r| r.status == Status::Fail) {
            let allowance = facts.envelope(&r.name).unwrap_or(0.0);
            if r.index_mismatch.is_none() && r.tolerance > 0.0 && r.max_rel <= allowance {
                r.status = Status::WithinNoise;
                r.noise_allowance = Some(allowance);
            }
        }
        let admitted: Vec<String> = tensors
            .iter()
            .filter(|r| r.status == Status::WithinNoise)
            .map(|r| {
                format!(
                    "{} ({:.2e} > tolerance {:.1e}, envelope {:.2e})",
                    r.name,
                    r.max_rel,
                    r.tolerance,
                    r.noise_allowance.unwrap_or(0.0)
                )
            })
            .collect();
        if !admitted.is_empty() {
            let at_precision = if facts.precision.is_float32() {
                String::new()
            } else {
                format!(
                    ", with the reference rounding where {} rounds and each rounding dithered, so that the envelope holds the rounding-boundary flips a port at that precision shows, times {PRECISION_ENVELOPE_MARGIN}",
                    facts.precision
                )
            };
            notes.push(format!(
                "{} tensors exceed the fixed tolerance but stay within this model's float-noise envelope (how far the reference itself moves when every weight is perturbed by {:.0e}, times 3·√(K/192) − 2 for products wider than K = 192, an upper estimate of an independent float32 implementation's rounding{at_precision}; this model amplifies rounding differences there): {}",
                admitted.len(),
                crate::compare_diagnosis::PROBE_NOISE,
                admitted.join(", ")
            ));
        }
    }
    if let (false, Some(resolution)) = (facts.precision.is_float32(), facts.envelope("logits")) {
        notes.push(format!(
            "judged at {}: on this model a port's logits may differ by up to {resolution:.2e} (relative) from the reference rounding where it rounds; a bug that moves them less cannot be told from that rounding here, and shows in the float32 verdict only",
            facts.precision
        ));
    }
    let first = tensors.iter().find(|r| {
        !matches!(
            r.status,
            Status::Pass | Status::WithinNoise | Status::Missing
        )
    });
    let error_structure = first.and_then(|r| {
        if r.status != Status::Fail || r.index_mismatch.is_some() {
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
    if let Some(first) = first {
        let prefill_conforms = tensors
            .iter()
            .filter(|r| !matches!(r.name.as_str(), "decode_logits" | "greedy_continuation"))
            .all(|r| {
                matches!(
                    r.status,
                    Status::Pass | Status::WithinNoise | Status::Missing
                )
            });
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
        decode_convention: decode_alignment
            .as_ref()
            .map(|a| a.candidate_convention.name()),
        decode_alignment,
        compute_dtype: facts.compute_dtype.map(ComputeDtype::name),
        conformant_with_compute_dtype: None,
        judged_at_precision: facts.precision.name(),
        precision_choice: None,
        notes,
        tensors,
        expected_source: String::new(),
        candidate_source: String::new(),
    }
}

/// A dump whose `vision.` (or `audio.`) tensors carry the index of one single clip (`vision.0.*`
/// and no `vision.1.*`), renamed to the single-input form (`vision.*`); `None` when there is
/// nothing to rename.
fn single_clip_names(dump: &ActivationDump) -> Option<Cow<'_, ActivationDump>> {
    let mut renamed: Option<ActivationDump> = None;
    for tower in ["vision.", "audio."] {
        let names: Vec<&str> = dump
            .names_in_model_order()
            .into_iter()
            .filter(|n| n.starts_with(tower))
            .collect();
        let index_of = |name: &str| {
            name[tower.len()..]
                .split_once('.')
                .and_then(|(i, _)| i.parse::<usize>().ok())
        };
        let indexed_zero = names.iter().filter(|n| index_of(n) == Some(0)).count();
        if indexed_zero == 0 || names.iter().any(|n| index_of(n).is_some_and(|i| i > 0)) {
            continue;
        }
        let out = renamed.get_or_insert_with(|| dump.clone());
        for name in names.into_iter().filter(|n| index_of(n) == Some(0)) {
            let short = format!("{tower}{}", &name[tower.len() + 2..]);
            if let Some(tensor) = out.remove(name) {
                out.insert(short, tensor);
            }
        }
    }
    renamed.map(Cow::Owned)
}

/// Decode rows left out of the judgement: those after the first greedy choice where the two
/// dumps part (their later rows are logits of different token sequences).
struct DecodeCut {
    /// `decode_logits` rows kept (the row that made the differing choice is still compared).
    logits_rows: usize,
    /// `greedy_continuation` entries kept: up to the differing choice when it is a near tie
    /// (either token is right), all of them otherwise (the choice itself is a divergence).
    continuation_rows: Option<usize>,
    note: String,
}

impl DecodeCut {
    fn apply(&self, dump: &mut ActivationDump) {
        let cut = |tensor: &DumpTensor, rows: usize| match tensor {
            DumpTensor::F32(a) => DumpTensor::F32(
                a.slice_axis(Axis(0), ndarray::Slice::from(..rows.min(a.shape()[0])))
                    .to_owned(),
            ),
            DumpTensor::I64(a) => DumpTensor::I64(
                a.slice_axis(Axis(0), ndarray::Slice::from(..rows.min(a.shape()[0])))
                    .to_owned(),
            ),
        };
        let mut cuts = vec![("decode_logits", self.logits_rows)];
        cuts.extend(
            self.continuation_rows
                .map(|rows| ("greedy_continuation", rows)),
        );
        for (name, rows) in cuts {
            if let Some(tensor) = dump.get(name).filter(|t| !t.shape().is_empty()) {
                let tensor = cut(tensor, rows);
                dump.insert(name, tensor);
            }
        }
    }
}

/// Where the two (aligned) dumps' greedy choices part, and what to judge of the rows after it
/// (`None` when they never part).
fn decode_rows_to_judge(
    expected: &ActivationDump,
    candidate: &ActivationDump,
    tolerance: &impl Fn(&str) -> f64,
) -> Option<DecodeCut> {
    let rows = comparable_decode_rows(expected, candidate)?;
    fn matrix<'a>(dump: &'a ActivationDump, name: &str) -> Option<ArrayView2<'a, f32>> {
        dump.get(name)
            .and_then(DumpTensor::as_f32)
            .and_then(|t| t.view().into_dimensionality::<Ix2>().ok())
    }
    // The choice that differs: the first generated token (from the last prompt row), or the
    // token chosen by decode row `rows − 1`.
    let (expected_row, candidate_choice, what) = if rows == 0 {
        let last = |dump| {
            matrix(dump, "logits")
                .filter(|l| l.nrows() > 0)
                .map(|l| l.row(l.nrows() - 1).to_owned())
        };
        (
            last(expected)?,
            argmax(last(candidate)?.view()),
            "the first generated token (argmax of the last prompt logits)".to_string(),
        )
    } else {
        let step = rows - 1;
        let choice = candidate
            .get("greedy_continuation")
            .and_then(DumpTensor::as_i64)
            .and_then(|t| t.view().into_dimensionality::<Ix1>().ok())
            .and_then(|t| t.get(step).map(|&id| id as usize))
            .or_else(|| {
                matrix(candidate, "decode_logits")
                    .filter(|l| l.nrows() > step)
                    .map(|l| argmax(l.row(step)))
            })?;
        let expected_logits = matrix(expected, "decode_logits").filter(|l| l.nrows() > step)?;
        (
            expected_logits.row(step).to_owned(),
            choice,
            format!("the greedy choice of decode row {step}"),
        )
    };
    let expected_choice = argmax(expected_row.view());
    let tie = is_near_tie(
        expected_row.view(),
        candidate_choice,
        tolerance("decode_logits"),
    );
    let (continuation_rows, verdict) = if tie {
        (
            Some(rows.saturating_sub(1)),
            "a near tie in the expected logits (within tolerance of the maximum), so either choice conforms",
        )
    } else {
        (None, "not a near tie")
    };
    Some(DecodeCut {
        logits_rows: rows,
        continuation_rows,
        note: format!(
            "{what} differs: expected token {expected_choice}, the candidate's {candidate_choice}, {verdict}; decode rows after it are logits of another token sequence and are not compared"
        ),
    })
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
        "precision: {} (expected {}, candidate {}); depth-aware tolerances with L = {} ({})\n",
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
    if let Some(compute) = report.compute_dtype {
        out.push_str(&format!(
            "arithmetic: the reference imitates a {compute} computation ({})\n",
            if compute == ComputeDtype::Float32.name() {
                "the default; --compute-dtype bf16 judges a port that runs the model in bf16"
            } else {
                "--compute-dtype; float32 is the default"
            }
        ));
    }
    if let Some(convention) = report.decode_convention {
        out.push_str(&format!(
            "decode convention of the candidate: {convention}\n"
        ));
    }
    out.push('\n');
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
            Status::WithinNoise => "pass (noise)",
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
    if let Some(other) = report.conformant_with_compute_dtype {
        out.push_str(&format!(
            "\nDIAGNOSIS: none — the candidate is CONFORMANT when judged as a {other} computation (--compute-dtype {other}); judged as {} it differs only in the constants that arithmetic rounds (the embedding scales sqrt(D) and sqrt(P) {}). No porting bug: rerun with --compute-dtype {other} if the port computes in {other}.\n",
            report.compute_dtype.unwrap_or("float32"),
            if other == ComputeDtype::Float32.name() {
                "kept in float32, as Hugging Face does with torch_dtype=float32"
            } else {
                "rounded to that dtype, as Hugging Face does when the model runs in it"
            }
        ));
    }
    if let Some(verdict) = &report.precision_choice {
        out.push_str(&format!(
            "\nDIAGNOSIS: a precision choice, not a bug — the candidate is CONFORMANT when the reference imitates {} ({}; choices: {}). Judged at {} it differs by that rounding only. Rerun with --precision {} to judge the port at its precision.\n",
            verdict.name,
            verdict.about,
            verdict.choices.join(", "),
            report.judged_at_precision,
            verdict.name,
        ));
        out.push_str("  precision choices tried (error against each imitating run, in float32 allowances):\n");
        for fit in &verdict.ranking {
            out.push_str(&format!(
                "    {:<40} {:>10.2}  {}{}\n",
                fit.name,
                fit.misfit,
                match fit.conformant {
                    Some(true) => "conformant at it",
                    Some(false) => "not conformant at it",
                    None => "not judged",
                },
                fit.worst_tensor
                    .as_ref()
                    .map_or_else(String::new, |t| format!(" (worst: {t})"))
            ));
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
