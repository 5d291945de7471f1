//! Diagnosis: which known porting bug (a fault of `reference/src/faults.rs`, shared contracts §4)
//! explains a diverging candidate dump.
//!
//! The method is to *reproduce* the candidate. The reference is re-run once per fault of the
//! catalogue, with that fault switched on ([`with_faults`]), on the same model, tokens and
//! number of decode steps; each of these faulty dumps is a hypothesis, as is the clean dump.
//!
//! 1. Applicability. A fault is not run when its nature rules it out on this model (a PLE fault
//!    on a model without PLE, a router fault without MoE, a KV-sharing fault without shared
//!    layers, a K=V fault without K=V layers, ...), or when the reference cannot run it (a
//!    KV-sharing fault that makes a layer read K/V of another head dim: a port with it fails
//!    outright). A fault whose dump equals the clean dump bit for bit has no effect on this
//!    model and these tokens and cannot explain anything.
//! 2. Position. A fault first changes some tensor (in model order); everything before it is
//!    bit-identical to the clean run. It cannot explain a divergence that starts earlier, so
//!    only faults whose first changed tensor is at or before the candidate's first divergence
//!    are candidates (an MoE fault cannot explain `layers.0.attn.q`).
//! 3. Fit. For each hypothesis, the *misfit* is the largest, over the float tensors the
//!    candidate and the expected dump share, of `max_rel(candidate, hypothesis) / allowance`:
//!    the candidate's error against that hypothesis in units of the tensor's tolerance —
//!    widened to the hypothesis' own noise envelope where that is larger (a faulty model can
//!    amplify float noise more than the correct one; [`Hypothesis::envelope`]). Decode rows
//!    count only while the two greedy continuations agree
//!    ([`crate::compare_decode::comparable_decode_rows`]). The clean dump's misfit is above 1 (the candidate does not conform); the right fault brings
//!    it down to float noise, about what a correct port shows against the clean dump.
//! 4. Verdict. The best fault is named only if it reproduces the candidate closely
//!    (misfit ≤ [`CLOSE`]) and every alternative — the clean reference and every other fault —
//!    fits at least [`SEPARATION`] times worse (with the best misfit counted as at least
//!    [`NOISE_FLOOR`], so that two faults both within noise of the candidate are a tie, not a
//!    win). Otherwise the answer is "no known fault explains this", with the ranking shown.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use gemma4_reference::audio::AudioInput;
use gemma4_reference::checkpoint::LayerWeights;
use gemma4_reference::config::{AttentionType, RopeKind};
use gemma4_reference::dump::{model_order_key, ActivationDump, DumpTensor};
use gemma4_reference::faults::{with_faults, Fault};
use gemma4_reference::forced_routing::{with_forced_routing, ForcedRouting};
use gemma4_reference::layer_plan::KvSource;
use gemma4_reference::mask::ImageBlocks;
use gemma4_reference::merge::Prompt;
use gemma4_reference::model::{is_placeholder, LoadOptions};
use gemma4_reference::precision::{active_precision, with_precision, with_rounding_dither};
use gemma4_reference::ComputeDtype;
use gemma4_reference::{Gemma4TextModel, ModelPlan};
use rayon::prelude::*;

use crate::compare_decode::{comparable_decode_rows, DecodeAlignment, DecodeInputs};
use crate::comparison::bf16_rounded;

/// A fault is named only if its dump reproduces the candidate within this many allowances
/// (tolerance, or the fault's noise envelope where larger; see [`Hypothesis::envelope`]) on
/// every compared tensor. An independent implementation of a bug differs from our faulty run
/// by its own float32 rounding, which a faulty model may amplify more than the correct one,
/// and by the order of its arithmetic. Measured on every fault of every golden model
/// (`tests/compare.rs`, `diagnosis_calibration_table`), with candidates made from weights
/// perturbed by 1e-7 relative (the level at which the clean model lands as far from ours as
/// Hugging Face's float32 run does) the right fault's misfit is at most 1.35, and at 3e-7 at
/// most 3.4 (`post_norm_after_residual` on `26b_a4b_like`). 4 covers the latter; a bug outside
/// the catalogue that leaves more than 4 allowances unexplained somewhere is not named.
pub const CLOSE: f64 = 4.0;

/// Every alternative explanation — the clean reference and every other fault — must misfit at
/// least this many times more than the named fault. Between faults of the catalogue the gap is
/// orders of magnitude on the golden models; it is smallest against the clean reference for
/// the subtlest fault, `ple_no_projection_scale` on `e2b_like`, whose clean misfit is about
/// 3.2 against 0.56–0.63 for the fault itself under 1e-7–3e-7 weight noise (a factor 5.3).
/// 3 keeps margin for noisier ports while a factor below 3 — two explanations of about equal
/// merit — is refused.
pub const SEPARATION: f64 = 3.0;

/// The best misfit is counted as at least this much when comparing it with the alternatives:
/// misfits below it are float noise (a correct port reaches 0.1–0.3 against the clean
/// reference on the golden models), so two hypotheses both under it cannot be told apart.
pub const NOISE_FLOOR: f64 = 0.25;

/// Relative weight perturbation of the noise probe (see [`Hypothesis::envelope`]). Perturbing
/// every weight by 1e-7 to 3e-7 relative moves the clean golden dumps as far from ours as
/// Hugging Face's float32 run is (misfit 0.1–0.3 tolerances; `tests/compare.rs`,
/// `diagnosis_noise_calibration`), so 3e-7 is an upper estimate of an independent float32
/// implementation's rounding noise.
pub const PROBE_NOISE: f32 = 3e-7;

/// The widest matrix product (input width `K`) of the golden models, on which [`PROBE_NOISE`]
/// was calibrated: `e2b_like`'s double-wide MLP down projection, K = 192.
pub const PROBE_CALIBRATION_WIDTH: usize = 192;

/// The probe's relative noise for a weight matrix with input width `width`:
/// `relative · max(1, 3·√(K / 192) − 2)`.
///
/// Float32 rounding in a length-K dot product accumulates like a random walk, growing as √K.
/// [`PROBE_NOISE`] matches Hugging Face's deviation from the reference on the golden models,
/// whose widest product is K = 192, and there it is unchanged. At real dimensions every
/// float32 implementation moves further: on an E2B-dimension random model (K = 1536 to 12288,
/// `docs/conformance.md`) Hugging Face's own float32 run left the fixed tolerances from layer 2
/// on, and 3e-7 probes did not cover it. Beyond K = 192 the noise grows as three times √K
/// (continuous at K = 192): the weight noise stands in for rounding the probes do not model,
/// the attention softmax's above all, where a port with a vectorised `exp` and blocked sums
/// (our optimized engine) lands several times farther from the reference than Hugging Face.
/// With 2√K it reached 0.82 of the envelope at an early attention output, with 3√K 0.5.
pub fn probe_noise_for_width(relative: f32, width: usize) -> f32 {
    let ratio = width as f32 / PROBE_CALIBRATION_WIDTH as f32;
    relative * (3.0 * ratio.sqrt() - 2.0).max(1.0)
}

/// Seeds of the noise probes: two draws, and the envelope takes the larger deviation of the two
/// per tensor (with one draw, the golden models' worst case under 3e-7 noise was 3.7
/// tolerances; one draw can be quiet exactly where another is loud).
const PROBE_SEEDS: [u64; 2] = [0x6e6f_6973_6520_7072, 0x7072_6f62_6520_3262];

/// One hypothesis about the candidate: the reference's dump with some fault (or none) on.
pub struct Hypothesis {
    pub dump: ActivationDump,
    /// Per float tensor, how far float noise moves it under this hypothesis: `max_rel` between
    /// this dump and the same run on weights perturbed by [`PROBE_NOISE`]. A faulty model can
    /// amplify rounding differences much more than the correct one (a norm after the residual
    /// add, a `1 + w` norm: up to 12x on the golden models), so an independent implementation
    /// of the same bug lands farther from our faulty dump than a correct port lands from the
    /// clean one. The fit allows `max(tolerance, envelope)` per tensor.
    pub envelope: HashMap<String, f64>,
}

impl Hypothesis {
    /// The envelope is the probe's `max_rel` per tensor, made non-decreasing along model order
    /// (noise never shrinks with depth): one probe is one random draw, and at a single tensor
    /// — an attention output near a softmax tie — another draw can land several times farther,
    /// while the running maximum over everything before it bounds such draws (the golden
    /// models' worst case under 3e-7 noise goes from 4.6 to 1.8 tolerances).
    fn new(dump: ActivationDump, probes: Vec<ActivationDump>) -> Self {
        let mut envelope = HashMap::new();
        let mut running = 0.0f64;
        for name in dump.names_in_model_order() {
            let Some(DumpTensor::F32(_)) = dump.get(name) else {
                continue;
            };
            let deviation = probes
                .iter()
                .filter_map(|probe| same_sequence_decode_rows(&dump, probe, name))
                .filter_map(|(exact, noisy)| relative_error(&exact, &noisy))
                .filter(|d| d.is_finite())
                .fold(None, |m: Option<f64>, d| Some(m.map_or(d, |m| m.max(d))))
                // Every probe decoded another sequence: the noise so far still bounds it.
                .or((name == "decode_logits").then_some(0.0));
            if let Some(deviation) = deviation {
                running = running.max(deviation);
                envelope.insert(name.to_string(), running);
            }
        }
        Hypothesis { dump, envelope }
    }
}

/// `name`'s tensor in `exact` and in `probe`, for the envelope: whole, except the decode rows,
/// which are cut to those fed the same tokens on both sides (a probe whose noise tips a
/// near-tie greedy choice decodes another sequence, whose logits say nothing about noise).
fn same_sequence_decode_rows<'a>(
    exact: &'a ActivationDump,
    probe: &'a ActivationDump,
    name: &str,
) -> Option<(Cow<'a, DumpTensor>, Cow<'a, DumpTensor>)> {
    let (e, p) = (exact.get(name)?, probe.get(name)?);
    if name != "decode_logits" {
        return Some((Cow::Borrowed(e), Cow::Borrowed(p)));
    }
    let Some(rows) = comparable_decode_rows(exact, probe) else {
        return Some((Cow::Borrowed(e), Cow::Borrowed(p)));
    };
    if rows == 0 {
        return None;
    }
    let cut = |t: &DumpTensor| match t {
        DumpTensor::F32(a) if !a.shape().is_empty() => Some(DumpTensor::F32(
            a.slice_axis(
                ndarray::Axis(0),
                ndarray::Slice::from(..rows.min(a.shape()[0])),
            )
            .to_owned(),
        )),
        _ => None,
    };
    Some((Cow::Owned(cut(e)?), Cow::Owned(cut(p)?)))
}

/// The hypotheses the diagnosis compares a candidate with: the clean reference and one per
/// applicable fault.
pub struct FaultLibrary {
    pub clean: Hypothesis,
    pub entries: Vec<LibraryEntry>,
}

/// One fault's hypothesis, or why there is none.
pub struct LibraryEntry {
    pub fault: Fault,
    pub run: FaultRun,
}

pub enum FaultRun {
    /// The fault's dump; `first_changed` is the first tensor (model order) that differs from
    /// the clean dump.
    Dump {
        hypothesis: Hypothesis,
        first_changed: String,
    },
    /// The fault cannot apply here (the reason says why).
    NotApplicable(String),
}

impl FaultLibrary {
    /// Runs the reference once per fault of the catalogue on `prompt` with `decode_steps`
    /// greedy steps, plus the noise probes of each run. `model` was loaded from `model_dir`
    /// without faults and `clean` is its dump. Faults that change the layer plan reload the
    /// checkpoint with the fault on. The runs of one stage go in parallel (each run is
    /// single-threaded and switches its fault on in its own thread); the probes load one
    /// perturbed copy of the weights at a time, so memory peaks at about twice the model.
    pub fn build(
        model: &Gemma4TextModel,
        model_dir: &Path,
        prompt: &Prompt,
        decode_steps: usize,
        clean: ActivationDump,
    ) -> FaultLibrary {
        // The precision choices this thread imitates (`compare --precision`), passed on to the
        // worker threads with each fault.
        let precision = active_precision();
        // 1. One exact run per applicable fault.
        let exact: Vec<Result<ExactRun, String>> = Fault::ALL
            .par_iter()
            .map(|&fault| {
                with_precision(&precision, || {
                    exact_run(model, model_dir, prompt, decode_steps, fault, &clean)
                })
            })
            .collect();

        // 2. The noise probes, one perturbed copy of the weights at a time. The copy is loaded
        //    with no fault on, whatever GEMMA4_FAULTS says: the layer plan is derived at load
        //    time, and it serves the clean run and every fault that keeps the clean plan.
        let mut clean_probes = Vec::new();
        let mut probes: Vec<Vec<ActivationDump>> = vec![Vec::new(); Fault::ALL.len()];
        for &seed in &PROBE_SEEDS {
            let Some(probe) = with_faults(&[], || probe_model(model, model_dir, prompt, seed))
            else {
                continue;
            };
            let dithered = |body: &dyn Fn() -> Option<ActivationDump>| {
                with_precision(&precision, || with_rounding_dither(seed, body))
            };
            if let Some(dump) =
                dithered(&|| with_faults(&[], || probe.dump_prompt(prompt, decode_steps)).ok())
            {
                clean_probes.push(dump);
            }
            let runs: Vec<Option<ActivationDump>> = Fault::ALL
                .par_iter()
                .zip(&exact)
                .map(|(&fault, run)| {
                    let run = run.as_ref().ok()?;
                    dithered(&|| {
                        with_faults(&[fault], || {
                            if run.plan_changed {
                                probe_model(model, model_dir, prompt, seed)?
                                    .dump_prompt(prompt, decode_steps)
                                    .ok()
                            } else {
                                probe.dump_prompt(prompt, decode_steps).ok()
                            }
                        })
                    })
                })
                .collect();
            for (slot, run) in probes.iter_mut().zip(runs) {
                slot.extend(run);
            }
        }

        // 3. The hypotheses.
        let entries = Fault::ALL
            .iter()
            .zip(exact)
            .zip(probes)
            .map(|((&fault, run), probes)| LibraryEntry {
                fault,
                run: match run {
                    Ok(run) => FaultRun::Dump {
                        hypothesis: Hypothesis::new(run.dump, probes),
                        first_changed: run.first_changed,
                    },
                    Err(reason) => FaultRun::NotApplicable(reason),
                },
            })
            .collect();
        FaultLibrary {
            clean: Hypothesis::new(clean, clean_probes),
            entries,
        }
    }
}

/// Per float tensor, how far float noise moves the clean reference's dump `clean` of this model
/// (the clean [`Hypothesis::envelope`]: two runs on weights perturbed by [`PROBE_NOISE`], the
/// running maximum along model order). `compare --model` admits a tensor beyond its fixed
/// tolerance when it stays within this: on a model that amplifies rounding differences that
/// much, an independent float32 implementation lands there (measured: Hugging Face's own dump
/// of a random E2B-like model reaches 1.05 tolerances at a KV-shared layer's attention output,
/// 0.33 of this envelope), while every fault of the catalogue misfits the clean reference by
/// more than 3 envelopes on every golden model (`tests/compare.rs`).
pub fn clean_noise_envelope(
    model: &Gemma4TextModel,
    model_dir: &Path,
    prompt: &Prompt,
    decode_steps: usize,
    clean: &ActivationDump,
    forced: &ForcedRouting,
) -> HashMap<String, f64> {
    // At a precision, the probes keep the clean run's expert choices on the prompt: their
    // dithered roundings tip near-tie routing decisions far more often than float32 noise
    // does, and a tipped choice is judged by the router's near-tie rule, not by the envelope.
    let forced = if active_precision().is_empty() {
        forced.clone()
    } else {
        routing_of(clean, forced)
    };
    let probes = PROBE_SEEDS
        .iter()
        .filter_map(|&seed| {
            let probe = with_faults(&[], || probe_model(model, model_dir, prompt, seed))?;
            let (dump, _) = with_forced_routing(forced.clone(), || {
                with_rounding_dither(seed, || {
                    with_faults(&[], || probe.dump_prompt(prompt, decode_steps))
                })
            });
            dump.ok()
        })
        .collect();
    Hypothesis::new(clean.clone(), probes).envelope
}

/// `forced` with, for every MoE layer and prompt position of `dump` it does not already force,
/// the experts `dump` chose there (`layers.{ℓ}.router.top_k_index`, `[T, k]`).
fn routing_of(dump: &ActivationDump, forced: &ForcedRouting) -> ForcedRouting {
    let mut routing = forced.clone();
    for name in dump.names_in_model_order() {
        let Some(layer) = name
            .strip_prefix("layers.")
            .and_then(|rest| rest.strip_suffix(".router.top_k_index"))
            .and_then(|index| index.parse::<usize>().ok())
        else {
            continue;
        };
        let Some(DumpTensor::I64(choices)) = dump.get(name) else {
            continue;
        };
        if choices.ndim() != 2 {
            continue;
        }
        for (position, row) in choices.outer_iter().enumerate() {
            if routing.get(layer, position).is_none() {
                let experts = row
                    .iter()
                    .filter_map(|&e| usize::try_from(e).ok())
                    .collect();
                routing.force(layer, position, experts);
            }
        }
    }
    routing
}

/// A fault's exact run.
struct ExactRun {
    dump: ActivationDump,
    /// The first tensor (model order) that differs from the clean dump.
    first_changed: String,
    /// The fault changes the layer plan (the model had to be reloaded with it on).
    plan_changed: bool,
}

/// The model of `model_dir` with its weights perturbed for a noise probe (loaded with the
/// faults currently on in this thread, so that a fault changing the layer plan is in it), in
/// the compute dtype of `clean` and with the towers `prompt` needs.
fn probe_model(
    clean: &Gemma4TextModel,
    model_dir: &Path,
    prompt: &Prompt,
    seed: u64,
) -> Option<Gemma4TextModel> {
    // Held as the clean model is (a streamed model's probe is streamed too).
    let options = LoadOptions {
        residence: clean.residence(),
        ..LoadOptions::default()
    };
    let mut model = Gemma4TextModel::load_with(model_dir, prompt, &options)
        .ok()?
        .with_compute_dtype(clean.compute_dtype);
    perturb_weights(&mut model, PROBE_NOISE, seed);
    Some(model)
}

/// Runs `fault` on the clean model (or on a reload, if it changes the layer plan); `Err` says
/// why the fault cannot apply here.
fn exact_run(
    model: &Gemma4TextModel,
    model_dir: &Path,
    prompt: &Prompt,
    decode_steps: usize,
    fault: Fault,
    clean: &ActivationDump,
) -> Result<ExactRun, String> {
    if let Some(reason) = not_applicable(fault, model, prompt) {
        return Err(reason);
    }
    let (dump, plan_changed) = with_faults(&[fault], || {
        let plan = ModelPlan::from_config(&model.config.text);
        if plan == model.plan {
            return model
                .dump_prompt(prompt, decode_steps)
                .map(|d| (d, false))
                .map_err(|e| e.to_string());
        }
        if let Some(reason) = kv_geometry_mismatch(&plan) {
            return Err(reason);
        }
        Gemma4TextModel::load_for(model_dir, prompt)
            .and_then(|faulty| {
                faulty
                    .with_compute_dtype(model.compute_dtype)
                    .dump_prompt(prompt, decode_steps)
            })
            .map(|d| (d, true))
            .map_err(|e| e.to_string())
    })
    .map_err(|reason| format!("the reference cannot run it: {reason}"))?;
    let first_changed = first_difference(clean, &dump).ok_or_else(|| {
        "no effect on this model and these tokens (its dump equals the clean one)".to_string()
    })?;
    Ok(ExactRun {
        dump,
        first_changed,
        plan_changed,
    })
}

/// A deterministic uniform generator (SplitMix64) with zero mean and unit variance.
struct ProbeNoise(u64);

impl ProbeNoise {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let unit = (z >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
        (2.0 * unit - 1.0) * 3f32.sqrt()
    }

    /// Multiplies every element of `a` by `1 + σ·u`, `σ` = [`probe_noise_for_width`] of its
    /// input width (the last axis of a matrix `[out, in]` or an expert stack `[E, out, in]`;
    /// vectors, norms and scales, are not summed over and keep `relative`).
    fn perturb<D: ndarray::Dimension>(&mut self, a: &mut ndarray::Array<f32, D>, relative: f32) {
        let width = if a.ndim() >= 2 {
            a.shape()[a.ndim() - 1]
        } else {
            1
        };
        let sigma = probe_noise_for_width(relative, width);
        a.mapv_inplace(|v| v * (1.0 + sigma * self.next()));
    }
}

/// Multiplies every weight of `model` except the embedding lookup tables (token and PLE; they
/// are read, not computed with) by `1 + relative · u`, `u` uniform with unit variance from
/// `seed`: a stand-in for an independent implementation's float32 rounding noise, which, like
/// this, enters every matrix product and norm and then propagates through the layers.
///
/// A model streamed from disk has its small model-level weights perturbed now and each layer's
/// as it is read (its own noise stream per layer, seeded from `seed` and the layer index).
pub fn perturb_weights(model: &mut Gemma4TextModel, relative: f32, seed: u64) {
    let mut noise = ProbeNoise(seed);
    if let Some(ple) = model.weights.per_layer_embeddings_mut() {
        noise.perturb(&mut ple.model_projection, relative);
        noise.perturb(&mut ple.projection_norm, relative);
    }
    noise.perturb(model.weights.final_norm_mut(), relative);
    match model.weights.in_memory_mut() {
        Some(weights) => {
            for layer in weights.layers.iter_mut() {
                perturb_layer(&mut noise, layer, relative);
            }
        }
        None => model
            .weights
            .set_layer_transform(std::sync::Arc::new(move |index, layer| {
                let layer_seed = seed ^ (index as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
                perturb_layer(&mut ProbeNoise(layer_seed), layer, relative);
            })),
    }
}

/// [`perturb_weights`] on one layer's weights, drawing from `noise`.
fn perturb_layer(noise: &mut ProbeNoise, layer: &mut LayerWeights, relative: f32) {
    noise.perturb(&mut layer.input_layernorm, relative);
    noise.perturb(&mut layer.post_attention_layernorm, relative);
    noise.perturb(&mut layer.pre_feedforward_layernorm, relative);
    noise.perturb(&mut layer.post_feedforward_layernorm, relative);
    let attention = &mut layer.attention;
    noise.perturb(&mut attention.q_proj, relative);
    noise.perturb(&mut attention.q_norm, relative);
    noise.perturb(&mut attention.o_proj, relative);
    for projection in [attention.k_proj.as_mut(), attention.v_proj.as_mut()]
        .into_iter()
        .flatten()
    {
        noise.perturb(projection, relative);
    }
    if let Some(k_norm) = attention.k_norm.as_mut() {
        noise.perturb(k_norm, relative);
    }
    noise.perturb(&mut layer.mlp.gate_proj, relative);
    noise.perturb(&mut layer.mlp.up_proj, relative);
    noise.perturb(&mut layer.mlp.down_proj, relative);
    if let Some(moe) = layer.moe.as_mut() {
        noise.perturb(&mut moe.router_proj, relative);
        noise.perturb(&mut moe.router_scale, relative);
        noise.perturb(&mut moe.per_expert_scale, relative);
        noise.perturb(&mut moe.gate_up_proj, relative);
        noise.perturb(&mut moe.down_proj, relative);
        noise.perturb(&mut moe.pre_feedforward_layernorm_2, relative);
        noise.perturb(&mut moe.post_feedforward_layernorm_1, relative);
        noise.perturb(&mut moe.post_feedforward_layernorm_2, relative);
    }
    if let Some(ple) = layer.per_layer_embedding.as_mut() {
        noise.perturb(&mut ple.input_gate, relative);
        noise.perturb(&mut ple.projection, relative);
        noise.perturb(&mut ple.post_norm, relative);
    }
    layer.layer_scalar *= 1.0 + relative * noise.next();
}

/// A KV-sharing plan where a layer would read keys and values of another shape.
fn kv_geometry_mismatch(plan: &ModelPlan) -> Option<String> {
    plan.layers.iter().find_map(|layer| match layer.kv_source {
        KvSource::SharedFrom { producer } => {
            let source = &plan.layers[producer];
            (source.head_dim != layer.head_dim || source.num_kv_heads != layer.num_kv_heads)
                .then(|| {
                    format!(
                        "layer {} would read layer {producer}'s K/V ({} heads x {}) with {} heads x {}; a port with this bug fails outright here",
                        layer.index,
                        source.num_kv_heads,
                        source.head_dim,
                        layer.num_kv_heads,
                        layer.head_dim
                    )
                })
        }
        KvSource::Own { .. } => None,
    })
}

/// Why a fault cannot apply to this model and these tokens, judged from its nature and the
/// layer plan (running the fault and finding its dump equal to the clean one catches what this
/// misses).
fn not_applicable(fault: Fault, model: &Gemma4TextModel, prompt: &Prompt) -> Option<String> {
    let tokens = &prompt.tokens;
    let text = &model.config.text;
    let plan = &model.plan;
    let no_ple = text.hidden_size_per_layer_input == 0;
    let no_moe = text.moe.is_none();
    let reason = |applies: bool, why: &str| (!applies).then(|| why.to_string());
    match fault {
        Fault::PleMissing
        | Fault::PleNoInputScale
        | Fault::PleNoTokenScale
        | Fault::PleNoProjectionScale => reason(!no_ple, "the model has no Per-Layer Embeddings"),
        Fault::PlePlaceholderNotPad => {
            let has_placeholder = tokens.iter().any(|&t| is_placeholder(&model.config, t));
            reason(!no_ple, "the model has no Per-Layer Embeddings").or_else(|| {
                reason(
                    has_placeholder,
                    "no multimodal placeholder token among the tokens",
                )
            })
        }
        Fault::RouterOnNormedInput
        | Fault::RouterNoRenormalize
        | Fault::RouterPerExpertScaleIgnored
        | Fault::SharedMlpMissing => reason(!no_moe, "the model has no mixture-of-experts block"),
        Fault::KvSharedWrongSource | Fault::KvSharedFirstProducer => reason(
            text.num_kv_shared_layers > 0,
            "the model has no KV-shared layers",
        ),
        Fault::KeyEqualsValueFromFinalKey => reason(
            plan.layers.iter().any(|l| l.key_equals_value),
            "the model has no K=V layer",
        ),
        Fault::RopeFullOnGlobal | Fault::RopeExponentOverRotatedWidth => reason(
            plan.layers.iter().any(|l| {
                l.attention_type == AttentionType::Full
                    && matches!(l.rope.kind, RopeKind::Proportional { .. })
            }),
            "the model has no full layer with proportional RoPE",
        ),
        Fault::GqaHeadModulo => reason(
            plan.layers
                .iter()
                .any(|l| l.num_kv_heads > 1 && l.num_kv_heads < l.num_query_heads),
            "every layer has one KV head, or one per query head, where n mod K = floor(n / (H/K))",
        ),
        Fault::SlidingWindowPlusOne | Fault::SlidingWindowMinusOne => reason(
            plan.layers.iter().any(|l| l.sliding_window.is_some()),
            "the model has no sliding layer",
        ),
        Fault::EmbedScaleNotRounded => {
            let scale = (text.hidden_size as f64).sqrt() as f32;
            let compute = model.compute_dtype;
            reason(
                compute != ComputeDtype::Float32,
                "the run is judged in float32 arithmetic, where sqrt(D) is not rounded (--compute-dtype bf16 judges a bf16 computation)",
            )
            .or_else(|| {
                reason(
                    compute.round(scale) != scale,
                    &format!("sqrt(D) is exact in {compute}"),
                )
            })
        }
        Fault::SoftcapMissing => reason(
            text.final_logit_softcapping.is_some(),
            "the model has no final logit softcapping",
        ),
        Fault::RopeThetaSwapped => reason(
            text.rope_sliding.theta != text.rope_full.theta
                && plan
                    .layers
                    .iter()
                    .any(|l| l.attention_type == AttentionType::Sliding),
            "sliding and full layers share one theta",
        ),
        Fault::VisionAttentionScaleInvSqrtD
        | Fault::VisionRopeAxesSwapped
        | Fault::VisionPixelsNotRescaled => reason(!prompt.images.is_empty(), "the prompt has no image"),
        Fault::VisionPoolScaleMissing => reason(!prompt.images.is_empty(), "the prompt has no image")
            .or_else(|| {
                reason(
                    model.config.vision.as_ref().is_some_and(|v| v.standardize),
                    "without standardize the projector's weight-free RMSNorm cancels the sqrt(Dv) (it only shifts epsilon's share)",
                )
            }),
        Fault::VisionStandardizeMissing => reason(!prompt.images.is_empty(), "the prompt has no image")
            .or_else(|| {
                reason(
                    model.config.vision.as_ref().is_some_and(|v| v.standardize),
                    "the vision tower does not standardize (on-device tower)",
                )
            }),
        Fault::VisionClipIgnored => {
            let clipped_images = !prompt.images.is_empty()
                && model.config.vision.as_ref().is_some_and(|v| v.use_clipped_linears);
            let clipped_audio = !prompt.audio.is_empty()
                && model.config.audio.as_ref().is_some_and(|a| a.use_clipped_linears);
            reason(
                clipped_images || clipped_audio,
                "no tower with clipped linears runs on this prompt (no image or audio, or the large vision tower)",
            )
        }
        Fault::AudioWindow13 | Fault::AudioSoftcapMissing | Fault::AudioProjectThenNorm => {
            reason(!prompt.audio.is_empty(), "the prompt has no audio")
        }
        Fault::AudioPowerSpectrum | Fault::AudioNoLeftPad => reason(
            prompt
                .audio
                .iter()
                .any(|clip| matches!(clip, AudioInput::Waveform { .. })),
            "no audio clip of the prompt runs the front end (no audio, or precomputed features)",
        ),
        Fault::VisionPositionTablesSwapped | Fault::VisionSoftTokensScaled => {
            reason(!prompt.images.is_empty(), "the prompt has no image")
        }
        Fault::VisionBidirectionalOnGlobal
        | Fault::VisionBidirectionalMissing
        | Fault::VisionBlockIncludesBoiEoi
        | Fault::SlidingWindowTwoSided => reason(
            !ImageBlocks::of(&model.config, tokens, 0).is_empty(),
            "no bidirectional image block: the model is not a \"vision\" one, or the tokens hold no image placeholder",
        ),
        Fault::PleProjectionScaleFoldedBf16 => {
            let projection = model.weights.per_layer_embeddings().map(|ple| &ple.model_projection);
            let scale = (text.hidden_size as f32).powf(-0.5);
            reason(!no_ple, "the model has no Per-Layer Embeddings")
                .or_else(|| {
                    reason(
                        projection.is_some_and(|w| w.iter().all(|v| v.to_bits() & 0xffff == 0)),
                        "the PLE projection is not stored in bfloat16 (folding the scale in float32 is float32 noise)",
                    )
                })
                .or_else(|| {
                    reason(
                        scale.log2().fract() != 0.0,
                        "D^-1/2 is a power of two: folding it into the weights is exact",
                    )
                })
        }
        Fault::LayerScalarIgnored => reason(
            model
                .weights
                .in_memory()
                .is_none_or(|weights| weights.layers.iter().any(|l| l.layer_scalar != 1.0)),
            "every layer_scalar is 1",
        ),
        _ => None,
    }
}

/// The first tensor, in model order, present in only one dump or different between them.
fn first_difference(clean: &ActivationDump, other: &ActivationDump) -> Option<String> {
    let mut names: Vec<&str> = clean.names_in_model_order();
    names.extend(
        other
            .names_in_model_order()
            .into_iter()
            .filter(|n| clean.get(n).is_none()),
    );
    names.sort_by_key(|n| model_order_key(n));
    names
        .into_iter()
        .find(|n| clean.get(n) != other.get(n))
        .map(String::from)
}

/// A tensor the diagnosis scores, with its tolerance.
#[derive(Clone, Debug)]
pub struct ScoredTensor {
    pub name: String,
    pub tolerance: f64,
}

impl ScoredTensor {
    /// Compared after rounding both sides to bf16, where any difference is a real one: the
    /// tensors with tolerance 0 (bf16 embeddings; index tensors are not scored).
    pub fn exact_bf16(&self) -> bool {
        self.tolerance == 0.0
    }
}

/// How well one hypothesis reproduces the candidate.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Fit {
    /// A fault id, or `clean` for the clean reference.
    pub hypothesis: String,
    /// Largest `max_rel / tolerance` over the scored tensors.
    pub misfit: f64,
    /// `misfit` divided by the clean reference's misfit.
    pub relative_to_clean: f64,
    /// Where the misfit is largest.
    pub worst_tensor: Option<String>,
    /// The first tensor (model order) the hypothesis does not reproduce within tolerance.
    pub first_unexplained: Option<String>,
    /// Tensors scored (present in the candidate and the hypothesis).
    pub tensors: usize,
}

/// A fault left out of the ranking, and why.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Excluded {
    pub fault: String,
    pub reason: String,
}

/// The thresholds of the verdict (documented on the constants).
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Thresholds {
    pub close: f64,
    pub separation: f64,
    pub noise_floor: f64,
}

/// The outcome of a diagnosis.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Diagnosis {
    /// The fault id named, or `None` ("no known fault explains this").
    pub fault: Option<String>,
    pub description: Option<String>,
    pub spec_section: Option<String>,
    /// One sentence: the verdict and its evidence.
    pub verdict: String,
    /// The first divergent tensor the faults were asked to explain.
    pub first_divergence: String,
    pub clean: Fit,
    /// Faults that can explain the first divergence, best first.
    pub ranking: Vec<Fit>,
    /// Faults that ran but change nothing up to the first divergence.
    pub cannot_explain: Vec<Excluded>,
    /// Faults that do not apply to this model and these tokens.
    pub not_applicable: Vec<Excluded>,
    pub thresholds: Thresholds,
}

/// `max|candidate − expected| / max|expected|` (the `max_rel` of [`crate::comparison::compare_tensor`], without
/// its bookkeeping: the diagnosis computes it thousands of times). `None` if the shapes or
/// kinds differ; infinite if a value is not finite or `expected` is all zero and they differ.
fn relative_error(expected: &DumpTensor, candidate: &DumpTensor) -> Option<f64> {
    if expected.shape() != candidate.shape() {
        return None;
    }
    let (DumpTensor::F32(e), DumpTensor::F32(c)) = (expected, candidate) else {
        return None;
    };
    let (mut scale, mut error) = (0.0f64, 0.0f64);
    for (&e, &c) in e.iter().zip(c.iter()) {
        let (e, c) = (f64::from(e), f64::from(c));
        if !c.is_finite() {
            return Some(f64::INFINITY);
        }
        scale = scale.max(e.abs());
        error = error.max((c - e).abs());
    }
    Some(if scale > 0.0 {
        error / scale
    } else if error > 0.0 {
        f64::INFINITY
    } else {
        0.0
    })
}

/// How well `hypothesis` reproduces `candidate` over `scored` tensors; `candidate_inputs` are
/// the candidate's [`DecodeInputs`].
fn fit(
    label: &str,
    candidate: &ActivationDump,
    candidate_inputs: &DecodeInputs,
    hypothesis: &Hypothesis,
    scored: &[ScoredTensor],
) -> Fit {
    let mut result = Fit {
        hypothesis: label.to_string(),
        misfit: 0.0,
        relative_to_clean: f64::NAN,
        worst_tensor: None,
        first_unexplained: None,
        tensors: 0,
    };
    let decode_rows = candidate_inputs.comparable_rows(&DecodeInputs::of(&hypothesis.dump));
    for tensor in scored {
        let (Some(c), Some(h)) = (
            candidate.get(&tensor.name),
            hypothesis.dump.get(&tensor.name),
        ) else {
            continue;
        };
        let (c, h) = match (tensor.name.as_str(), decode_rows) {
            ("decode_logits", Some(0)) => continue,
            ("decode_logits", Some(rows)) => (first_rows(c, rows), first_rows(h, rows)),
            _ => (Cow::Borrowed(c), Cow::Borrowed(h)),
        };
        let (c, h) = (c.as_ref(), h.as_ref());
        let misfit = if tensor.exact_bf16() {
            // In units of one bf16 rounding (2^-9 relative): any difference is at least that.
            relative_error(&bf16_rounded(h), &bf16_rounded(c)).unwrap_or(f64::INFINITY)
                / 2f64.powi(-9)
        } else {
            let allowance = hypothesis
                .envelope
                .get(&tensor.name)
                .map_or(tensor.tolerance, |&e| e.max(tensor.tolerance));
            let error = relative_error(h, c).unwrap_or(f64::INFINITY);
            if allowance > 0.0 {
                error / allowance
            } else if error == 0.0 {
                0.0
            } else {
                f64::INFINITY
            }
        };
        result.tensors += 1;
        if misfit > 1.0 && result.first_unexplained.is_none() {
            result.first_unexplained = Some(tensor.name.clone());
        }
        if misfit > result.misfit {
            result.misfit = misfit;
            result.worst_tensor = Some(tensor.name.clone());
        }
    }
    result
}

/// The first `rows` rows of a float tensor (the tensor itself otherwise).
fn first_rows(tensor: &DumpTensor, rows: usize) -> Cow<'_, DumpTensor> {
    match tensor {
        DumpTensor::F32(a) if a.ndim() >= 1 && a.shape()[0] > rows => Cow::Owned(DumpTensor::F32(
            a.slice_axis(ndarray::Axis(0), ndarray::Slice::from(0..rows))
                .to_owned(),
        )),
        other => Cow::Borrowed(other),
    }
}

/// Ranks the faults of `library` by how well they reproduce `candidate` and names the best one
/// if the evidence supports it (see the module documentation). `scored`: the float tensors to
/// compare, in model order, with their tolerances; `first_divergence`: the candidate's first
/// divergent tensor.
pub fn diagnose(
    library: &FaultLibrary,
    candidate: &ActivationDump,
    scored: &[ScoredTensor],
    first_divergence: &str,
    decode: Option<&DecodeAlignment>,
) -> Diagnosis {
    // Decode rows lined up as the comparison did: the candidate's once, each hypothesis' as
    // the expected dump's.
    let candidate = match decode {
        Some(alignment) => alignment.candidate_side(candidate),
        None => Cow::Borrowed(candidate),
    };
    let candidate = candidate.as_ref();
    let fit = |label: &str, hypothesis: &Hypothesis| {
        let aligned;
        let hypothesis = match decode.map(|a| a.expected_side(&hypothesis.dump)) {
            Some(Cow::Owned(dump)) => {
                aligned = Hypothesis {
                    dump,
                    envelope: hypothesis.envelope.clone(),
                };
                &aligned
            }
            _ => hypothesis,
        };
        fit(
            label,
            candidate,
            &DecodeInputs::of(candidate),
            hypothesis,
            scored,
        )
    };
    let mut clean = fit("clean", &library.clean);
    clean.relative_to_clean = 1.0;
    let divergence_key = model_order_key(first_divergence);
    let mut ranking = Vec::new();
    let mut cannot_explain = Vec::new();
    let mut not_applicable = Vec::new();
    for entry in &library.entries {
        match &entry.run {
            FaultRun::NotApplicable(reason) => not_applicable.push(Excluded {
                fault: entry.fault.id().to_string(),
                reason: reason.clone(),
            }),
            FaultRun::Dump {
                hypothesis,
                first_changed,
            } => {
                if model_order_key(first_changed) > divergence_key {
                    cannot_explain.push(Excluded {
                        fault: entry.fault.id().to_string(),
                        reason: format!(
                            "first changes {first_changed}, after the first divergence {first_divergence}"
                        ),
                    });
                    continue;
                }
                let mut f = fit(entry.fault.id(), hypothesis);
                f.relative_to_clean = f.misfit / clean.misfit;
                ranking.push(f);
            }
        }
    }
    ranking.sort_by(|a, b| a.misfit.total_cmp(&b.misfit));

    let thresholds = Thresholds {
        close: CLOSE,
        separation: SEPARATION,
        noise_floor: NOISE_FLOOR,
    };
    let best = ranking.first();
    let runner_up = ranking.get(1).map_or(&clean, |second| {
        if second.misfit < clean.misfit {
            second
        } else {
            &clean
        }
    });
    let named = best.filter(|best| {
        best.misfit <= CLOSE && runner_up.misfit >= SEPARATION * best.misfit.max(NOISE_FLOOR)
    });
    let verdict = match (named, best) {
        (Some(best), _) => format!(
            "{}: reproduces the candidate within {:.2} tolerances on {} tensors; the next best explanation ({}) misfits by {:.3}",
            best.hypothesis, best.misfit, best.tensors, runner_up.hypothesis, runner_up.misfit
        ),
        (None, None) => format!(
            "no known fault explains this: no fault of the catalogue changes anything up to {first_divergence} on this model"
        ),
        (None, Some(best)) if best.misfit > CLOSE => {
            let partial = best
                .first_unexplained
                .as_deref()
                .filter(|t| model_order_key(t) > divergence_key)
                .map(|t| {
                    format!(
                        "; it reproduces every tensor before {t}, so the port may have it plus another bug, or a variant of it"
                    )
                })
                .unwrap_or_default();
            format!(
                "no known fault explains this: the closest, {}, still misfits by {:.3} tolerances (at {}; needs <= {CLOSE}){partial}",
                best.hypothesis,
                best.misfit,
                best.worst_tensor.as_deref().unwrap_or("-")
            )
        }
        (None, Some(best)) => format!(
            "no known fault explains this unambiguously: {} (misfit {:.3}) and {} (misfit {:.3}) fit about as well (needs a factor {SEPARATION})",
            best.hypothesis, best.misfit, runner_up.hypothesis, runner_up.misfit
        ),
    };
    let fault = named.and_then(|f| Fault::from_id(&f.hypothesis));
    Diagnosis {
        fault: fault.map(|f| f.id().to_string()),
        description: fault.map(|f| f.description().to_string()),
        spec_section: fault.map(|f| f.spec_section().to_string()),
        verdict,
        first_divergence: first_divergence.to_string(),
        clean,
        ranking,
        cannot_explain,
        not_applicable,
        thresholds,
    }
}

/// The diagnosis as text.
pub fn format_diagnosis(d: &Diagnosis) -> String {
    let mut out = String::new();
    match (&d.fault, &d.description, &d.spec_section) {
        (Some(id), Some(description), Some(section)) => out.push_str(&format!(
            "DIAGNOSIS: {id} — {description} (shared spec: {section})\n"
        )),
        _ => out.push_str("DIAGNOSIS: none — no known fault explains this\n"),
    }
    out.push_str(&format!("  {}\n", d.verdict));
    out.push_str(&format!(
        "  misfit = max over tensors of max_rel(candidate, hypothesis) / tolerance; clean reference: {:.3}\n",
        d.clean.misfit
    ));
    for f in d.ranking.iter().take(6) {
        out.push_str(&format!(
            "  {:<36} misfit {:>10.3}  ({:.2e} x clean)  worst at {}\n",
            f.hypothesis,
            f.misfit,
            f.relative_to_clean,
            f.worst_tensor.as_deref().unwrap_or("-")
        ));
    }
    if d.ranking.len() > 6 {
        out.push_str(&format!(
            "  ... {} more faults ranked\n",
            d.ranking.len() - 6
        ));
    }
    if !d.cannot_explain.is_empty() {
        out.push_str(&format!(
            "  cannot explain {} (they change nothing before it): {}\n",
            d.first_divergence,
            d.cannot_explain
                .iter()
                .map(|e| e.fault.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !d.not_applicable.is_empty() {
        out.push_str(&format!(
            "  not applicable here: {}\n",
            d.not_applicable
                .iter()
                .map(|e| e.fault.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    out
}
