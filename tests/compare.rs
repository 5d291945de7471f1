//! `gemma4 compare`: first divergence, error structure and diagnosis, on dumps made by the
//! reference with each fault of the catalogue switched on, on every golden model.

mod common;

use std::sync::OnceLock;

use gemma4::compare::{compare, compare_and_diagnose, CompareReport, ModelFacts};
use gemma4::compare_diagnosis::{perturb_weights, FaultLibrary, FaultRun};
use gemma4::compare_structure::ErrorStructure;
use gemma4::comparison::Status;
use gemma4::golden::GoldenCase;
use gemma4_reference::faults::{with_faults, Fault};
use gemma4_reference::{ActivationDump, Gemma4TextModel};

use common::logits_only;

/// A golden case's model, clean reference dump and fault library, built once per test binary.
struct Fixture {
    case: GoldenCase,
    clean: ActivationDump,
    facts: ModelFacts,
    library: FaultLibrary,
}

fn fixture(name: &str) -> &'static Fixture {
    static FIXTURES: [OnceLock<Fixture>; CASES.len()] = [const { OnceLock::new() }; CASES.len()];
    let slot = CASES
        .iter()
        .position(|c| *c == name)
        .unwrap_or_else(|| panic!("{name} is not one of {CASES:?}"));
    FIXTURES[slot].get_or_init(|| build_fixture(name))
}

fn build_fixture(name: &str) -> Fixture {
    let case = common::golden_case(name);
    let prompt = case.prompt().expect("golden prompt");
    let (model, clean) = with_faults(&[], || {
        let model = Gemma4TextModel::load_for(&case.model_dir(), &prompt)
            .expect("golden model loads")
            .with_compute_dtype(case.compute_dtype());
        let clean = model
            .dump_prompt(&prompt, case.decode_steps)
            .expect("reference runs");
        (model, clean)
    });
    let library = FaultLibrary::build(
        &model,
        &case.model_dir(),
        &prompt,
        case.decode_steps,
        clean.clone(),
    );
    Fixture {
        facts: ModelFacts::of_model(&model),
        case,
        clean,
        library,
    }
}

/// The reference's dump of a golden case with `faults` on, the weights perturbed by
/// `noise` (relative; 0 for none) and `edit` applied to the loaded model.
fn candidate(
    fixture: &Fixture,
    faults: &[Fault],
    noise: f32,
    edit: impl FnOnce(&mut Gemma4TextModel),
) -> ActivationDump {
    let case = &fixture.case;
    let prompt = case.prompt().expect("golden prompt");
    with_faults(faults, || {
        let mut model = Gemma4TextModel::load_for(&case.model_dir(), &prompt)
            .expect("golden model loads")
            .with_compute_dtype(case.compute_dtype());
        if noise > 0.0 {
            perturb_weights(&mut model, noise, 0x5eed);
        }
        edit(&mut model);
        model
            .dump_prompt(&prompt, case.decode_steps)
            .expect("reference runs")
    })
}

fn judge(fixture: &Fixture, candidate: &ActivationDump) -> CompareReport {
    compare_and_diagnose(&fixture.clean, candidate, &fixture.facts, &fixture.library)
}

const CASES: [&str; 10] = [
    "e2b_like",
    "e4b_like",
    "31b_like",
    "26b_a4b_like",
    "e2b_bf16",
    "e4b_bf16_as_f32",
    "e2b_vision",
    "31b_vision",
    "e2b_audio",
    "e4b_audio",
];

#[test]
#[ignore = "calibration table for the diagnosis thresholds; run with --ignored --nocapture"]
fn diagnosis_calibration_table() {
    for case in CASES {
        let fixture = fixture(case);
        for entry in &fixture.library.entries {
            let FaultRun::Dump { first_changed, .. } = &entry.run else {
                continue;
            };
            let partial = std::env::var("PARTIAL").is_ok();
            for noise in [0.0, 1e-7, 3e-7, 1e-6] {
                let mut dump = candidate(fixture, &[entry.fault], noise, |_| {});
                if partial {
                    dump = logits_only(&dump);
                }
                let report = judge(fixture, &dump);
                let d = report.diagnosis_details.as_ref();
                let best = d.and_then(|d| d.ranking.first());
                let second = d.and_then(|d| d.ranking.get(1));
                println!(
                    "{case:<13} {:<34} noise {noise:.0e}  first {:<24} (fault changes {:<22}) diag {:<34} best {:>9.3} second {:>11.3} ({:<30}) clean {:>11.3}",
                    entry.fault.id(),
                    report.first_divergence.as_deref().unwrap_or("-"),
                    first_changed,
                    report.diagnosis.as_deref().unwrap_or("-"),
                    best.map_or(f64::NAN, |b| b.misfit),
                    second.map_or(f64::NAN, |b| b.misfit),
                    second.map_or("-", |b| b.hypothesis.as_str()),
                    d.map_or(f64::NAN, |d| d.clean.misfit),
                );
            }
        }
    }
}

#[test]
#[ignore = "calibration of the noise stand-in; run with --ignored --nocapture"]
fn diagnosis_noise_calibration() {
    for case in CASES {
        let fixture = fixture(case);
        let hf = ActivationDump::read(&fixture.case.expected_path()).unwrap();
        let misfit = |report: &CompareReport| {
            report
                .tensors
                .iter()
                .filter(|r| r.tolerance > 0.0 && r.status != Status::Missing)
                .map(|r| (r.max_rel / r.tolerance, r.name.clone()))
                .fold((0.0, String::new()), |a, b| if b.0 > a.0 { b } else { a })
        };
        let r = compare(&fixture.clean, &hf, &fixture.facts);
        println!(
            "{case:<13} HF vs ours: misfit {:?} precision {}",
            misfit(&r),
            r.precision.applied
        );
        for noise in [3e-8, 1e-7, 3e-7, 1e-6] {
            let dump = candidate(fixture, &[], noise, |_| {});
            let r = compare(&fixture.clean, &dump, &fixture.facts);
            println!("{case:<13} perturbed {noise:.0e}: misfit {:?}", misfit(&r));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Diagnosis of every fault of the catalogue, on every golden model where it applies
// ---------------------------------------------------------------------------------------------

/// Relative weight noise of the "independent implementation" candidates: 2–3 times what
/// Hugging Face's float32 run shows against ours (`diagnosis_noise_calibration`: HF matches a
/// 1e-7..3e-7 perturbation), so the diagnosis is tested with more noise than real ports have.
const PORT_NOISE: f32 = 3e-7;

/// The PLE scale slips an RMSNorm absorbs (shared spec text §14.3, bold rows): below the
/// tolerance at the logits, so a logits-only dump cannot reveal them.
const INVISIBLE_AT_LOGITS: [Fault; 2] = [Fault::PleNoInputScale, Fault::PleNoProjectionScale];

/// Faults that no golden model can run: every golden KV-sharing model has different sliding
/// and full head dims, so a consumer reading the other type's K/V fails outright (as a port
/// with that bug would).
const NOT_RUNNABLE_ON_GOLDEN: [Fault; 1] = [Fault::KvSharedWrongSource];

/// For every fault that applies to `case`: its dump, exact and with [`PORT_NOISE`], is not
/// conformant, diverges first where the fault first moves a tensor beyond tolerance, and is
/// diagnosed as that fault; its logits-only version is diagnosed as that fault or, for the
/// faults invisible at the logits, at least not as another one.
fn assert_each_fault_diagnosed(case: &str) {
    let fixture = fixture(case);
    let mut failures = Vec::new();
    let mut diagnosed = Vec::new();
    for entry in &fixture.library.entries {
        let FaultRun::Dump { .. } = &entry.run else {
            continue;
        };
        let fault = entry.fault;
        let exact = candidate(fixture, &[fault], 0.0, |_| {});
        let expected_first = compare(&fixture.clean, &exact, &fixture.facts).first_divergence;
        let noised = candidate(fixture, &[fault], PORT_NOISE, |_| {});
        for (label, dump) in [("exact", &exact), ("noised", &noised)] {
            let report = judge(fixture, dump);
            if report.conformant
                || report.first_divergence != expected_first
                || report.diagnosis.as_deref() != Some(fault.id())
            {
                failures.push(format!(
                    "  {} ({label}): conformant {}, first divergence {:?} (want {:?}), diagnosis {:?}: {}",
                    fault.id(),
                    report.conformant,
                    report.first_divergence,
                    expected_first,
                    report.diagnosis,
                    verdict(&report)
                ));
            }
            let partial = judge(fixture, &logits_only(dump));
            let named = partial.diagnosis.as_deref();
            let acceptable = named == Some(fault.id())
                || (named.is_none() && INVISIBLE_AT_LOGITS.contains(&fault));
            if !acceptable {
                failures.push(format!(
                    "  {} ({label}, logits only): conformant {}, diagnosis {:?}: {}",
                    fault.id(),
                    partial.conformant,
                    named,
                    verdict(&partial)
                ));
            }
        }
        diagnosed.push(fault.id());
    }
    assert!(
        failures.is_empty(),
        "{case}: {} of {} fault checks failed:\n{}",
        failures.len(),
        4 * diagnosed.len(),
        failures.join("\n")
    );
    assert!(!diagnosed.is_empty(), "{case}: no fault applies");
}

fn verdict(report: &CompareReport) -> String {
    report
        .diagnosis_details
        .as_ref()
        .map_or("no diagnosis ran".to_string(), |d| d.verdict.clone())
}

#[test]
fn diagnosis_names_each_fault_e2b_like() {
    assert_each_fault_diagnosed("e2b_like");
}

#[test]
fn diagnosis_names_each_fault_e4b_like() {
    assert_each_fault_diagnosed("e4b_like");
}

#[test]
fn diagnosis_names_each_fault_31b_like() {
    assert_each_fault_diagnosed("31b_like");
}

#[test]
fn diagnosis_names_each_fault_26b_a4b_like() {
    assert_each_fault_diagnosed("26b_a4b_like");
}

#[test]
fn diagnosis_names_each_fault_e2b_bf16() {
    assert_each_fault_diagnosed("e2b_bf16");
}

#[test]
fn diagnosis_names_each_fault_e4b_bf16_as_f32() {
    assert_each_fault_diagnosed("e4b_bf16_as_f32");
}

#[test]
fn diagnosis_names_each_fault_e2b_vision() {
    assert_each_fault_diagnosed("e2b_vision");
}

#[test]
fn diagnosis_names_each_fault_31b_vision() {
    assert_each_fault_diagnosed("31b_vision");
}

#[test]
fn diagnosis_names_each_fault_e2b_audio() {
    assert_each_fault_diagnosed("e2b_audio");
}

#[test]
fn diagnosis_names_each_fault_e4b_audio() {
    assert_each_fault_diagnosed("e4b_audio");
}

#[test]
fn diagnosis_covers_every_fault_of_the_catalogue() {
    let mut uncovered = Vec::new();
    for &fault in Fault::ALL {
        let runs: Vec<(&str, &FaultRun)> = CASES
            .iter()
            .map(|case| {
                let entry = fixture(case)
                    .library
                    .entries
                    .iter()
                    .find(|e| e.fault == fault)
                    .expect("every fault has an entry");
                (*case, &entry.run)
            })
            .collect();
        let runnable = runs
            .iter()
            .any(|(_, run)| matches!(run, FaultRun::Dump { .. }));
        if runnable == NOT_RUNNABLE_ON_GOLDEN.contains(&fault) {
            let reasons: Vec<String> = runs
                .iter()
                .map(|(case, run)| match run {
                    FaultRun::Dump { first_changed, .. } => {
                        format!("{case}: runs, first changes {first_changed}")
                    }
                    FaultRun::NotApplicable(reason) => format!("{case}: {reason}"),
                })
                .collect();
            uncovered.push(format!(
                "  {} (runnable somewhere: {runnable}; listed as not runnable: {}):\n    {}",
                fault.id(),
                !runnable,
                reasons.join("\n    ")
            ));
        }
    }
    assert!(
        uncovered.is_empty(),
        "faults whose golden coverage is not as declared:\n{}",
        uncovered.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Conformant candidates: no divergence, no diagnosis
// ---------------------------------------------------------------------------------------------

/// `dump` with every float tensor moved by up to `fraction` of its tolerance (relative to its
/// largest element), element by element, not propagated.
fn noised_elementwise(fixture: &Fixture, dump: &ActivationDump, fraction: f64) -> ActivationDump {
    let tolerances = compare(&fixture.clean, dump, &fixture.facts);
    let mut noised = dump.clone();
    let mut state = 0x0123_4567_89ab_cdefu64;
    for report in &tolerances.tensors {
        let Some(gemma4_reference::dump::DumpTensor::F32(values)) = dump.get(&report.name) else {
            continue;
        };
        let scale = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let step = (fraction * report.tolerance) as f32 * scale;
        let moved = values.mapv(|v| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let unit = (state >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
            v + step * (2.0 * unit - 1.0)
        });
        noised.insert_f32(report.name.clone(), moved);
    }
    noised
}

#[test]
fn compare_conformant_candidates_every_case() {
    let mut failures = Vec::new();
    for case in CASES {
        let fixture = fixture(case);
        let hf = ActivationDump::read(&fixture.case.expected_path()).expect("golden dump");
        let candidates = [
            ("our own clean dump", fixture.clean.clone()),
            ("Hugging Face's dump (an independent implementation)", hf),
            (
                "clean reference on weights perturbed by 3e-7",
                candidate(fixture, &[], PORT_NOISE, |_| {}),
            ),
            (
                "clean dump noised element-wise at 0.5 tolerance",
                noised_elementwise(fixture, &fixture.clean, 0.5),
            ),
        ];
        for (what, dump) in candidates {
            let report = judge(fixture, &dump);
            if !report.conformant || report.first_divergence.is_some() || report.diagnosis.is_some()
            {
                let first = report
                    .tensors
                    .iter()
                    .find(|r| r.status != Status::Pass && r.status != Status::Missing)
                    .map(|r| r.describe());
                failures.push(format!(
                    "  {case}, {what}: conformant {}, first divergence {first:?}, diagnosis {:?}",
                    report.conformant, report.diagnosis
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Bugs outside the catalogue: not conformant, and no (wrong) diagnosis
// ---------------------------------------------------------------------------------------------

#[test]
fn diagnosis_out_of_catalogue_bugs_not_named_every_case() {
    type Edit = fn(&mut Gemma4TextModel);
    let bugs: [(&str, Option<&str>, Edit); 5] = [
        (
            "layer 0's MLP output x 1.01",
            Some("layers.0.mlp.output"),
            |m| {
                m.weights.in_memory_mut().unwrap().layers[0].mlp.down_proj *= 1.01;
            },
        ),
        ("the last layer's MLP output x 1.01", None, |m| {
            let last = m.weights.in_memory_mut().unwrap().layers.len() - 1;
            m.weights.in_memory_mut().unwrap().layers[last]
                .mlp
                .down_proj *= 1.01;
        }),
        (
            "head 1 of layer 0 zeroed",
            Some("layers.0.attn.output"),
            |m| {
                let layer = &m.plan.layers[0];
                let d = layer.head_dim;
                m.weights.in_memory_mut().unwrap().layers[0]
                    .attention
                    .o_proj
                    .slice_mut(ndarray::s![.., d..2 * d])
                    .fill(0.0);
            },
        ),
        ("final softcap 25 instead of 30", Some("logits"), |m| {
            m.config.text.final_logit_softcapping = Some(25.0);
        }),
        ("RMSNorm epsilon 1e-5 instead of 1e-6", None, |m| {
            m.config.text.rms_norm_eps = 1e-5;
        }),
    ];
    let mut failures = Vec::new();
    for case in CASES {
        let fixture = fixture(case);
        let mut candidates: Vec<(String, Option<&str>, ActivationDump)> = bugs
            .iter()
            .map(|(what, first, edit)| {
                (what.to_string(), *first, candidate(fixture, &[], 0.0, edit))
            })
            .collect();
        candidates.push((
            "two catalogue bugs at once (gelu_exact and softcap_missing)".to_string(),
            None,
            candidate(
                fixture,
                &[Fault::GeluExact, Fault::SoftcapMissing],
                0.0,
                |_| {},
            ),
        ));
        candidates.push((
            "clean dump noised element-wise at 3 tolerances".to_string(),
            None,
            noised_elementwise(fixture, &fixture.clean, 3.0),
        ));
        for (what, first, dump) in candidates {
            let report = judge(fixture, &dump);
            let first_ok = first.is_none_or(|f| report.first_divergence.as_deref() == Some(f));
            if report.conformant || report.diagnosis.is_some() || !first_ok {
                failures.push(format!(
                    "  {case}, {what}: conformant {}, first divergence {:?} (want {first:?}), diagnosis {:?}: {}",
                    report.conformant,
                    report.first_divergence,
                    report.diagnosis,
                    verdict(&report)
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Error structure of the first divergence
// ---------------------------------------------------------------------------------------------

/// The report of the exact dump of `faults` on `case`, with its error structure.
fn structure_of(case: &str, faults: &[Fault]) -> (CompareReport, ErrorStructure) {
    let fixture = fixture(case);
    let report = compare(
        &fixture.clean,
        &candidate(fixture, faults, 0.0, |_| {}),
        &fixture.facts,
    );
    let structure = report
        .error_structure
        .clone()
        .unwrap_or_else(|| panic!("{case} {faults:?}: no error structure in {report:#?}"));
    (report, structure)
}

#[test]
fn structure_p_rope_pass_through_channels_e2b_like() {
    let (report, s) = structure_of("e2b_like", &[Fault::RopeFullOnGlobal]);
    assert_eq!(report.first_divergence.as_deref(), Some("layers.4.attn.q"));
    let channels = s.channels.expect("q has channels");
    // d_g = 32, p-RoPE rotates pairs 0..3 of each half: channels 0..3 and 16..19.
    let rotated: Vec<usize> = channels
        .diverging
        .iter()
        .copied()
        .filter(|c| c % 16 < 4)
        .collect();
    assert!(
        rotated.is_empty() && !channels.diverging.is_empty(),
        "diverging channels {:?} should all be pass-through ({})",
        channels.diverging,
        channels.summary
    );
    assert!(
        s.hints.iter().any(|h| h.contains("unrotated")),
        "hints: {:?}",
        s.hints
    );
    let rows = s.rows.expect("rows");
    assert!(
        !rows.diverging.contains(&0),
        "position 0 is never rotated, yet diverges: {}",
        rows.summary
    );
}

#[test]
fn structure_rope_frequencies_rotated_channels_e2b_like() {
    let (report, s) = structure_of("e2b_like", &[Fault::RopeExponentOverRotatedWidth]);
    assert_eq!(report.first_divergence.as_deref(), Some("layers.4.attn.q"));
    let channels = s.channels.expect("q has channels");
    assert!(
        channels.diverging.iter().all(|c| c % 16 < 4) && !channels.diverging.contains(&0),
        "diverging channels {:?} should be rotated ones other than pair 0 ({})",
        channels.diverging,
        channels.summary
    );
    assert!(
        s.hints.iter().any(|h| h.contains("frequencies differ")),
        "hints: {:?}",
        s.hints
    );
}

#[test]
fn structure_sliding_window_positions_e2b_like() {
    let window = fixture("e2b_like").facts.sliding_window.expect("W");
    for (fault, from) in [
        (Fault::SlidingWindowPlusOne, window),
        (Fault::SlidingWindowMinusOne, window - 1),
    ] {
        let (report, s) = structure_of("e2b_like", &[fault]);
        assert_eq!(
            report.first_divergence.as_deref(),
            Some("layers.0.attn.output")
        );
        let rows = s.rows.expect("rows");
        let want: Vec<usize> = (from..rows.of).collect();
        assert_eq!(rows.diverging, want, "{}: {}", fault.id(), rows.summary);
        assert!(
            s.hints.iter().any(|h| h.contains("sliding window")),
            "{}: hints {:?}",
            fault.id(),
            s.hints
        );
    }
}

#[test]
fn structure_constant_factor_sqrt_two_e4b_like() {
    let (report, s) = structure_of("e4b_like", &[Fault::PleNoInputScale]);
    assert_eq!(report.first_divergence.as_deref(), Some("per_layer_inputs"));
    let factor = s.scale_factor.expect("a pure rescaling");
    assert!(
        (factor - std::f64::consts::SQRT_2).abs() < 1e-5,
        "factor {factor}, want sqrt(2)"
    );
}

#[test]
fn structure_single_head_31b_like() {
    // Query head 2 of layer 0 projects to zero: only that head of layers.0.attn.q diverges.
    let fixture = fixture("31b_like");
    let d = fixture.facts.plan.as_ref().unwrap().layers[0].head_dim;
    let dump = candidate(fixture, &[], 0.0, |m| {
        m.weights.in_memory_mut().unwrap().layers[0]
            .attention
            .q_proj
            .slice_mut(ndarray::s![2 * d..3 * d, ..])
            .fill(0.0);
    });
    let report = judge(fixture, &dump);
    assert_eq!(report.first_divergence.as_deref(), Some("layers.0.attn.q"));
    let heads = report.error_structure.unwrap().heads.expect("heads");
    assert_eq!(heads.diverging, vec![2], "{}", heads.summary);
    assert_eq!(
        report.diagnosis, None,
        "a zeroed head is not in the catalogue"
    );
}

#[test]
fn structure_decode_steps_only_26b_a4b_like() {
    // The prompt's tensors are right; decode_logits rows 3.. are off (a cache bug's signature).
    let fixture = fixture("26b_a4b_like");
    let mut dump = fixture.clean.clone();
    let decode = dump.get("decode_logits").unwrap().as_f32().unwrap().clone();
    let mut moved = decode.clone();
    moved
        .slice_mut(ndarray::s![3.., ..])
        .mapv_inplace(|v| v + 0.05);
    dump.insert_f32("decode_logits", moved);
    let report = judge(fixture, &dump);
    assert_eq!(report.first_divergence.as_deref(), Some("decode_logits"));
    let rows = report
        .error_structure
        .as_ref()
        .unwrap()
        .rows
        .clone()
        .unwrap();
    assert_eq!(rows.axis, "decode_steps");
    assert_eq!(rows.diverging, (3..decode.shape()[0]).collect::<Vec<_>>());
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("only the decode steps")),
        "notes: {:?}",
        report.notes
    );
    assert_eq!(report.diagnosis, None);
}

#[test]
fn compare_non_finite_candidate_not_conformant_e2b_like() {
    let fixture = fixture("e2b_like");
    let mut dump = fixture.clean.clone();
    let mut logits = dump.get("logits").unwrap().as_f32().unwrap().clone();
    logits[[3, 7]] = f32::NAN;
    dump.insert_f32("logits", logits);
    let report = judge(fixture, &dump);
    assert!(!report.conformant);
    assert_eq!(report.first_divergence.as_deref(), Some("logits"));
    assert_eq!(report.non_finite, vec!["logits".to_string()]);
    let logits_report = report.tensors.iter().find(|r| r.name == "logits").unwrap();
    assert_eq!(logits_report.status, Status::NonFinite);
    assert_eq!(logits_report.worst_index, vec![3, 7]);
    assert_eq!(report.diagnosis, None, "{}", verdict(&report));
}

#[test]
fn compare_bf16_candidate_uses_bf16_policy_e2b_like() {
    // Our clean dump rounded to bf16 (what a port storing bf16 gives): recognised as bfloat16
    // from its values alone, judged by the bfloat16 policy, conformant.
    let fixture = fixture("e2b_like");
    let mut rounded = ActivationDump::new();
    for name in fixture.clean.names_in_model_order() {
        let tensor = fixture.clean.get(name).unwrap().clone();
        match tensor {
            gemma4_reference::dump::DumpTensor::F32(a) => {
                rounded.insert_f32(name, gemma4::comparison::round_to_bf16(&a))
            }
            other => rounded.insert(name, other),
        }
    }
    let report = judge(fixture, &rounded);
    assert_eq!(report.precision.candidate, "bfloat16");
    assert_eq!(report.precision.applied, "bfloat16");
    assert!(
        report.conformant,
        "first divergence {:?}",
        report.first_divergence
    );
}

/// `dump` with every float value rounded to bfloat16, as a port computing in bf16 stores it.
fn rounded_to_bf16(dump: &ActivationDump) -> ActivationDump {
    let mut out = ActivationDump::new();
    for name in dump.names_in_model_order() {
        match dump.get(name).unwrap().clone() {
            gemma4_reference::dump::DumpTensor::F32(a) => {
                out.insert_f32(name, gemma4::comparison::round_to_bf16(&a))
            }
            other => out.insert(name, other),
        }
    }
    out
}

/// Weight noise standing in for a bfloat16 port's rounding (one bf16 rounding is 2^-9 ≈ 2e-3
/// relative): with it (and up to 4e-3) the clean model, rounded to bf16, stays conformant
/// under the bfloat16 policy, as Hugging Face's own bf16 run does (misfit 0.63 against ours).
const BF16_PORT_NOISE: f32 = 1e-3;

#[test]
fn diagnosis_bf16_port_never_wrong_e2b_bf16() {
    // A bf16 candidate is judged with the bfloat16 tolerances, which hide the subtlest faults;
    // whatever is named must be right, and a fault whose clean misfit is large (>= 10: the
    // evidence is plain) must be named.
    let fixture = fixture("e2b_bf16");
    let mut failures = Vec::new();
    for entry in &fixture.library.entries {
        let FaultRun::Dump { .. } = &entry.run else {
            continue;
        };
        let fault = entry.fault;
        let dump = rounded_to_bf16(&candidate(fixture, &[fault], BF16_PORT_NOISE, |_| {}));
        let report = judge(fixture, &dump);
        let clean_misfit = report
            .diagnosis_details
            .as_ref()
            .map_or(0.0, |d| d.clean.misfit);
        let named = report.diagnosis.as_deref();
        let wrong = named.is_some_and(|id| id != fault.id());
        let missed = named.is_none() && clean_misfit >= 10.0;
        if report.precision.applied != "bfloat16" || wrong || missed {
            failures.push(format!(
                "  {}: precision {}, conformant {}, diagnosis {named:?}, clean misfit {clean_misfit:.3}: {}",
                fault.id(),
                report.precision.applied,
                report.conformant,
                verdict(&report)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Decode rows: conventions and near ties
// ---------------------------------------------------------------------------------------------

/// `dump` (generate's convention) recorded in the steps-only convention: its decode rows and
/// tokens from row 1 on.
fn steps_only(dump: &ActivationDump) -> ActivationDump {
    let mut old = dump.clone();
    for name in ["decode_logits", "greedy_continuation"] {
        let tensor = match dump.get(name).unwrap() {
            gemma4_reference::dump::DumpTensor::F32(a) => gemma4_reference::dump::DumpTensor::F32(
                a.slice_axis(ndarray::Axis(0), ndarray::Slice::from(1..))
                    .to_owned(),
            ),
            gemma4_reference::dump::DumpTensor::I64(a) => gemma4_reference::dump::DumpTensor::I64(
                a.slice_axis(ndarray::Axis(0), ndarray::Slice::from(1..))
                    .to_owned(),
            ),
        };
        old.insert(name, tensor);
    }
    old
}

#[test]
fn diagnosis_steps_only_candidate_realigned_then_diagnosed_e2b_like() {
    // A port with a bug that also records the other decode convention: realigned, then the bug
    // is named as for a generate-convention dump.
    let fixture = fixture("e2b_like");
    for fault in [Fault::GeluExact, Fault::SoftcapMissing] {
        let dump = steps_only(&candidate(fixture, &[fault], PORT_NOISE, |_| {}));
        let report = judge(fixture, &dump);
        assert_eq!(report.decode_convention, Some("steps_only"));
        assert_eq!(
            report.diagnosis.as_deref(),
            Some(fault.id()),
            "{}",
            verdict(&report)
        );
    }
}

#[test]
fn compare_near_tie_in_a_greedy_choice_is_not_a_divergence_e2b_like() {
    let fixture = fixture("e2b_like");
    let step = 2;
    let rows = fixture
        .clean
        .get("decode_logits")
        .unwrap()
        .as_f32()
        .unwrap()
        .clone();
    let row = rows.index_axis(ndarray::Axis(0), step).to_owned();
    let scale = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let best = gemma4_reference::model::argmax(row.view().into_dimensionality().unwrap());
    let other = (best + 1) % row.len();
    let top = row[[best]];
    // The expected row: `other` `gap` (relative to the row's scale) below the winner. The
    // candidate picks `other` (a hair above the winner), and its later rows and tokens follow
    // another sequence.
    let judge_choice = |gap: f32| {
        let mut expected = fixture.clean.clone();
        let mut expected_rows = rows.clone();
        expected_rows[[step, other]] = top - gap * scale;
        expected.insert_f32("decode_logits", expected_rows.clone());
        let mut candidate = expected.clone();
        let mut candidate_rows = expected_rows;
        candidate_rows[[step, other]] = top + 1e-6 * scale;
        candidate_rows
            .slice_mut(ndarray::s![step + 1.., ..])
            .mapv_inplace(|v| 0.5 * v - 1.0);
        candidate.insert_f32("decode_logits", candidate_rows);
        let mut tokens = expected
            .get("greedy_continuation")
            .unwrap()
            .as_i64()
            .unwrap()
            .clone();
        tokens[step] = other as i64;
        tokens
            .slice_mut(ndarray::s![step + 1..])
            .mapv_inplace(|t| (t + 7) % 512);
        candidate.insert_i64("greedy_continuation", tokens);
        compare(&expected, &candidate, &fixture.facts)
    };
    // 1e-6 of the scale, far inside the tolerance: either choice is right.
    let tie = judge_choice(1e-6);
    assert!(
        tie.conformant,
        "a near tie is either choice: {:?} {:?}",
        tie.first_divergence, tie.notes
    );
    assert!(
        tie.notes.iter().any(|n| n.contains("near tie")),
        "{:?}",
        tie.notes
    );
    // The same choice where the expected winner leads by far more than the tolerance.
    let report = judge_choice(0.1);
    assert!(!report.conformant);
    assert!(
        matches!(
            report.first_divergence.as_deref(),
            Some("decode_logits" | "greedy_continuation")
        ),
        "{:?}",
        report.first_divergence
    );
    assert!(
        report.notes.iter().any(|n| n.contains("not a near tie")),
        "{:?}",
        report.notes
    );
}
