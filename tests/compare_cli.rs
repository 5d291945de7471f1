//! `gemma4 compare` as a command: exit codes, the `--json` object, dumps stored in bf16/f16,
//! partial dumps, and unusable inputs (shared contracts §1).

mod common;

use std::path::{Path, PathBuf};

use gemma4::golden::GoldenCase;
use gemma4_reference::dump::DumpTensor;
use gemma4_reference::faults::{with_faults, Fault};
use gemma4_reference::{ActivationDump, Gemma4TextModel};
use serde_json::Value;

use common::golden_case;

fn token_list(case: &GoldenCase) -> String {
    case.tokens
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The reference's dump of a golden case with `faults` on.
fn reference_dump(case: &GoldenCase, faults: &[Fault], decode_steps: usize) -> ActivationDump {
    with_faults(faults, || {
        Gemma4TextModel::load(&case.model_dir())
            .and_then(|m| m.dump(&case.tokens, decode_steps))
            .expect("reference runs")
    })
}

/// Runs `gemma4 compare ARGS`; returns the exit code, stdout and stderr.
fn run_compare(args: &[&str]) -> (i32, String, String) {
    common::run_gemma4(&[&["compare"], args].concat(), &[])
}

fn json(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

fn write_dump(dir: &Path, name: &str, dump: &ActivationDump) -> PathBuf {
    let path = dir.join(name);
    dump.write(&path, &[]).expect("dump written");
    path
}

/// Writes `dump` with every float tensor stored as `dtype` ("BF16" or "F16").
fn write_dump_low_precision(dir: &Path, name: &str, dump: &ActivationDump, dtype: &str) -> PathBuf {
    let path = write_dump(dir, name, dump);
    let mut raw = common::RawSafetensors::read(&path);
    for tensor in raw.tensor_names() {
        if let Some(DumpTensor::F32(values)) = dump.get(&tensor) {
            let bytes: Vec<u8> = values
                .iter()
                .flat_map(|&v| match dtype {
                    "BF16" => half::bf16::from_f32(v).to_le_bytes(),
                    _ => half::f16::from_f32(v).to_le_bytes(),
                })
                .collect();
            let shape = values.shape().to_vec();
            raw.replace(&tensor, dtype, &shape, bytes);
        }
    }
    raw.write(&path);
    path
}

/// Every text golden case (their Hugging Face dumps hold `generate`'s decode rows).
const CASES: [&str; 6] = common::TEXT_CASES;

#[test]
fn compare_cli_hf_dump_conformant_exit_0_every_case() {
    for name in CASES {
        let case = golden_case(name);
        let (code, stdout, stderr) = run_compare(&[
            "--model",
            path_str(&case.model_dir()),
            "--tokens",
            &token_list(&case),
            "--candidate",
            path_str(&case.expected_path()),
            "--json",
        ]);
        let report = json(&stdout);
        assert_eq!(
            code, 0,
            "{name}: exit {code}, first divergence {}, stderr {stderr}",
            report["first_divergence"]
        );
        assert_eq!(report["conformant"], Value::Bool(true), "{name}");
        assert_eq!(report["first_divergence"], Value::Null, "{name}");
        assert_eq!(report["diagnosis"], Value::Null, "{name}");
        assert_eq!(report["decode_convention"], "generate", "{name}");
        assert_eq!(report["compute_dtype"], "float32", "{name}");
        let tensors = report["tensors"].as_array().expect("tensors array");
        assert!(tensors.len() > 10, "{name}: {} tensors", tensors.len());
        for field in ["name", "status", "max_abs", "max_rel", "tolerance"] {
            assert!(
                tensors.iter().all(|t| t.get(field).is_some()),
                "{name}: a tensor lacks `{field}`"
            );
        }
    }
}

#[test]
fn compare_cli_faulty_dump_diagnosed_exit_1_31b_like() {
    let case = golden_case("31b_like");
    let dir = tempfile::tempdir().unwrap();
    let dump = reference_dump(&case, &[Fault::GeluExact], case.decode_steps);
    let candidate = write_dump(dir.path(), "gelu.safetensors", &dump);
    let model = case.model_dir();
    let args = [
        "--model",
        path_str(&model),
        "--tokens",
        &token_list(&case),
        "--candidate",
        path_str(&candidate),
    ];
    let (code, stdout, stderr) = run_compare(&[&args[..], &["--json"]].concat());
    let report = json(&stdout);
    assert_eq!(code, 1, "exit {code}: {stderr}");
    assert_eq!(report["conformant"], Value::Bool(false));
    assert_eq!(report["first_divergence"], "layers.0.mlp.output");
    assert_eq!(
        report["diagnosis"], "gelu_exact",
        "{}",
        report["diagnosis_details"]["verdict"]
    );
    // The text report says the same.
    let (code, text, _) = run_compare(&args);
    assert_eq!(code, 1);
    assert!(
        text.contains("First divergence: layers.0.mlp.output")
            && text.contains("DIAGNOSIS: gelu_exact"),
        "text report:\n{text}"
    );
}

#[test]
fn compare_cli_expected_file_no_diagnosis_e2b_like() {
    let case = golden_case("e2b_like");
    let dir = tempfile::tempdir().unwrap();
    let dump = reference_dump(&case, &[Fault::SoftcapMissing], case.decode_steps);
    let candidate = write_dump(dir.path(), "softcap.safetensors", &dump);
    let (code, stdout, stderr) = run_compare(&[
        "--expected",
        path_str(&case.expected_path()),
        "--candidate",
        path_str(&candidate),
        "--json",
    ]);
    let report = json(&stdout);
    assert_eq!(code, 1, "exit {code}: {stderr}");
    assert_eq!(report["first_divergence"], "logits");
    assert_eq!(report["diagnosis"], Value::Null);
    assert_eq!(report["num_layers_source"], "expected_dump");
    assert_eq!(report["num_layers"], 10);
}

#[test]
fn compare_cli_logits_only_dumps_fallback_depth_e4b_like() {
    // Neither dump has a layer tensor: tolerances assume the deepest released model.
    let case = golden_case("e4b_like");
    let dir = tempfile::tempdir().unwrap();
    let full = ActivationDump::read(&case.expected_path()).unwrap();
    let mut logits_only = ActivationDump::new();
    logits_only.insert("logits", full.get("logits").unwrap().clone());
    let expected = write_dump(dir.path(), "expected.safetensors", &logits_only);
    let ours = reference_dump(&case, &[], 0);
    let mut candidate_dump = ActivationDump::new();
    candidate_dump.insert("logits", ours.get("logits").unwrap().clone());
    let candidate = write_dump(dir.path(), "candidate.safetensors", &candidate_dump);
    let (code, stdout, stderr) = run_compare(&[
        "--expected",
        path_str(&expected),
        "--candidate",
        path_str(&candidate),
        "--json",
    ]);
    let report = json(&stdout);
    assert_eq!(
        code, 0,
        "exit {code}: {stderr}; {}",
        report["first_divergence"]
    );
    assert_eq!(report["num_layers_source"], "fallback");
    assert_eq!(report["num_layers"], 60);
    assert_eq!(report["compared"], 1);
}

#[test]
fn compare_cli_partial_candidate_with_model_decodes_its_steps_26b_a4b_like() {
    // A candidate with only logits and 3 decode steps: the reference decodes 3 steps too, the
    // other tensors are reported missing, not failed.
    let case = golden_case("26b_a4b_like");
    let dir = tempfile::tempdir().unwrap();
    let ours = reference_dump(&case, &[], 3);
    let mut partial = ActivationDump::new();
    for name in ["logits", "decode_logits", "greedy_continuation"] {
        partial.insert(name, ours.get(name).unwrap().clone());
    }
    let candidate = write_dump(dir.path(), "partial.safetensors", &partial);
    let (code, stdout, stderr) = run_compare(&[
        "--model",
        path_str(&case.model_dir()),
        "--tokens",
        &token_list(&case),
        "--candidate",
        path_str(&candidate),
        "--json",
    ]);
    let report = json(&stdout);
    assert_eq!(
        code, 0,
        "exit {code}: {stderr}; {}",
        report["first_divergence"]
    );
    // `compared` counts activations: logits and decode_logits (greedy_continuation is an index
    // tensor, checked but not counted).
    assert_eq!(report["compared"], 2);
    assert!(
        report["missing"].as_array().unwrap().len() > 10,
        "missing: {}",
        report["missing"]
    );
    let decode = report["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "decode_logits")
        .expect("decode_logits compared");
    assert_eq!(decode["status"], "pass");
}

#[test]
fn compare_cli_low_precision_storage_widened_e2b_like() {
    let case = golden_case("e2b_like");
    let dir = tempfile::tempdir().unwrap();
    let ours = reference_dump(&case, &[], case.decode_steps);
    for (dtype, precision) in [("BF16", "bfloat16"), ("F16", "float16")] {
        let candidate = write_dump_low_precision(dir.path(), "low.safetensors", &ours, dtype);
        let (code, stdout, stderr) = run_compare(&[
            "--model",
            path_str(&case.model_dir()),
            "--tokens",
            &token_list(&case),
            "--candidate",
            path_str(&candidate),
            "--json",
        ]);
        let report = json(&stdout);
        assert_eq!(
            code, 0,
            "{dtype}: exit {code}: {stderr}; first divergence {}",
            report["first_divergence"]
        );
        assert_eq!(report["precision"]["candidate"], precision, "{dtype}");
        assert_eq!(report["precision"]["applied"], precision, "{dtype}");
    }
}

#[test]
fn compare_cli_unusable_inputs_exit_2() {
    let case = golden_case("e2b_like");
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"not a safetensors file").unwrap();
    let mut unrelated = ActivationDump::new();
    unrelated.insert_f32("not_a_contract_name", ndarray::ArrayD::zeros(vec![2, 2]));
    let unrelated = write_dump(dir.path(), "unrelated.safetensors", &unrelated);
    let missing = dir.path().join("missing.safetensors");
    let model = path_str(&case.model_dir()).to_string();
    let expected = path_str(&case.expected_path()).to_string();
    let cases: [(&str, Vec<&str>, &str); 5] = [
        (
            "unreadable candidate",
            vec!["--expected", &expected, "--candidate", path_str(&garbage)],
            "garbage.safetensors",
        ),
        (
            "missing candidate",
            vec!["--expected", &expected, "--candidate", path_str(&missing)],
            "missing.safetensors",
        ),
        (
            "no tensor in common",
            vec!["--expected", &expected, "--candidate", path_str(&unrelated)],
            "none of the",
        ),
        (
            "bad token list",
            vec![
                "--model",
                &model,
                "--tokens",
                "1,x",
                "--candidate",
                &expected,
            ],
            "--tokens",
        ),
        (
            "token outside the vocabulary",
            vec![
                "--model",
                &model,
                "--tokens",
                "1,100000",
                "--candidate",
                &expected,
            ],
            "vocabulary",
        ),
    ];
    for (what, args, message) in cases {
        let (code, stdout, stderr) = run_compare(&args);
        assert_eq!(
            code, 2,
            "{what}: exit {code}, stdout {stdout}, stderr {stderr}"
        );
        assert!(
            stderr.contains(message),
            "{what}: stderr should mention `{message}`: {stderr}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Decode conventions: generate's (the contract's) and the steps-only one, either way round
// ---------------------------------------------------------------------------------------------

/// `dump` (generate's convention) in the steps-only convention: one row per single-token step
/// after the prefill, so its decode rows and tokens are generate's from row 1 on.
fn steps_only(dump: &ActivationDump) -> ActivationDump {
    let mut old = dump.clone();
    let rows = dump.get("decode_logits").unwrap().as_f32().unwrap();
    old.insert_f32(
        "decode_logits",
        rows.slice_axis(ndarray::Axis(0), ndarray::Slice::from(1..))
            .to_owned(),
    );
    let tokens = dump.get("greedy_continuation").unwrap().as_i64().unwrap();
    old.insert_i64(
        "greedy_continuation",
        tokens
            .slice_axis(ndarray::Axis(0), ndarray::Slice::from(1..))
            .to_owned(),
    );
    old
}

#[test]
fn compare_cli_steps_only_candidate_realigned_not_a_cache_bug_every_case() {
    // Hugging Face's own dump recorded in the other convention: every row is one of ours,
    // shifted by one. Judged against the reference (--model) and against HF's file.
    let dir = tempfile::tempdir().unwrap();
    for name in CASES {
        let case = golden_case(name);
        let hf = ActivationDump::read(&case.expected_path()).unwrap();
        let candidate = write_dump(dir.path(), "steps_only.safetensors", &steps_only(&hf));
        let (model_dir, expected_path) = (case.model_dir(), case.expected_path());
        let model_args = [
            "--model",
            path_str(&model_dir),
            "--tokens",
            &token_list(&case),
        ];
        let expected_args = ["--expected", path_str(&expected_path)];
        for expected in [&model_args[..], &expected_args[..]] {
            let args = [expected, &["--candidate", path_str(&candidate)]].concat();
            let (code, stdout, stderr) = run_compare(&[&args[..], &["--json"]].concat());
            let report = json(&stdout);
            assert_eq!(
                code, 0,
                "{name} ({}): exit {code}, first divergence {}: {stderr}",
                expected[0], report["first_divergence"]
            );
            assert_eq!(report["decode_convention"], "steps_only", "{name}");
            assert_eq!(report["decode_alignment"]["rows"], case.decode_steps - 1);
            let (_, text, _) = run_compare(&args);
            assert!(
                text.contains("steps_only")
                    && text.contains("generate")
                    && text.contains("realigned"),
                "{name}: the report names both conventions:\n{text}"
            );
            assert!(!text.contains("KV cache"), "{name}: no cache hint:\n{text}");
        }
    }
}

#[test]
fn compare_cli_generate_candidate_against_steps_only_expected_e2b_like() {
    // The other way round: an expected dump in the steps-only convention (an older dump) and a
    // candidate in generate's: realigned, conformant.
    let case = golden_case("e2b_like");
    let dir = tempfile::tempdir().unwrap();
    let hf = ActivationDump::read(&case.expected_path()).unwrap();
    let expected = write_dump(dir.path(), "old.safetensors", &steps_only(&hf));
    let (code, stdout, stderr) = run_compare(&[
        "--expected",
        path_str(&expected),
        "--candidate",
        path_str(&case.expected_path()),
        "--json",
    ]);
    let report = json(&stdout);
    assert_eq!(
        code, 0,
        "exit {code}: {stderr}; {}",
        report["first_divergence"]
    );
    assert_eq!(report["decode_convention"], "generate");
    assert_eq!(
        report["decode_alignment"]["expected_convention"],
        "steps_only"
    );
}

#[test]
fn compare_cli_broken_cache_still_reported_in_either_convention_31b_like() {
    // Decode rows from step 2 on are off (what a cache bug does): not conformant and a cache
    // hint, whichever convention the port records.
    let case = golden_case("31b_like");
    let dir = tempfile::tempdir().unwrap();
    let hf = ActivationDump::read(&case.expected_path()).unwrap();
    let mut broken = hf.clone();
    let mut rows = hf.get("decode_logits").unwrap().as_f32().unwrap().clone();
    rows.slice_mut(ndarray::s![2.., ..])
        .mapv_inplace(|v| v * 0.9 + 0.2);
    broken.insert_f32("decode_logits", rows);
    for (convention, dump) in [
        ("generate", broken.clone()),
        ("steps_only", steps_only(&broken)),
    ] {
        let candidate = write_dump(dir.path(), "broken.safetensors", &dump);
        let (code, text, stderr) = run_compare(&[
            "--model",
            path_str(&case.model_dir()),
            "--tokens",
            &token_list(&case),
            "--candidate",
            path_str(&candidate),
            "--no-diagnosis",
        ]);
        assert_eq!(code, 1, "{convention}: exit {code}: {stderr}\n{text}");
        assert!(
            text.contains("First divergence: decode_logits") && text.contains("KV cache"),
            "{convention}:\n{text}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The compute dtype: a bf16 checkpoint checked in float32, and ports imitating the other one
// ---------------------------------------------------------------------------------------------

#[test]
fn compare_cli_other_arithmetic_is_said_not_diagnosed_e4b_bf16_as_f32() {
    // HF's float32 run of a bf16 checkpoint: conformant by default (above); declared as bf16,
    // it is not, and the report says it conforms as float32 instead of naming a fault.
    let case = golden_case("e4b_bf16_as_f32");
    let model_dir = case.model_dir();
    let base = [
        "--model",
        path_str(&model_dir),
        "--tokens",
        &token_list(&case),
    ];
    let hf = path_str(&case.expected_path()).to_string();
    let args = [&base[..], &["--candidate", &hf, "--compute-dtype", "bf16"]].concat();
    let (code, stdout, stderr) = run_compare(&[&args[..], &["--json"]].concat());
    let report = json(&stdout);
    assert_eq!(code, 1, "exit {code}: {stderr}");
    assert_eq!(report["compute_dtype"], "bf16");
    assert_eq!(report["first_divergence"], "embeddings");
    assert_eq!(report["conformant_with_compute_dtype"], "float32");
    assert_eq!(
        report["diagnosis"],
        Value::Null,
        "no fault for another arithmetic"
    );
    let (_, text, _) = run_compare(&args);
    assert!(
        text.contains("CONFORMANT when judged as a float32 computation")
            && !text.contains("embed_scale_not_rounded"),
        "{text}"
    );

    // A float32 port that rounds sqrt(D) and sqrt(P) to bf16 (what a bf16 run does), judged as
    // float32: the same, the other way round.
    let dir = tempfile::tempdir().unwrap();
    let rounding = Gemma4TextModel::load(&case.model_dir())
        .unwrap()
        .with_compute_dtype(gemma4_reference::ComputeDtype::BFloat16)
        .dump(&case.tokens, case.decode_steps)
        .unwrap();
    let candidate = write_dump(dir.path(), "rounding.safetensors", &rounding);
    let (code, stdout, stderr) =
        run_compare(&[&base[..], &["--candidate", path_str(&candidate), "--json"]].concat());
    let report = json(&stdout);
    assert_eq!(code, 1, "exit {code}: {stderr}");
    assert_eq!(report["first_divergence"], "embeddings");
    assert_eq!(report["conformant_with_compute_dtype"], "bf16");
    assert_eq!(report["diagnosis"], Value::Null);
}

#[test]
fn compare_cli_bf16_oracle_judged_in_bf16_names_unrounded_scale_e2b_bf16() {
    // Declared bf16 (the oracle's arithmetic): HF's dump is conformant, and a port computing in
    // bf16 that forgets to round sqrt(D) is diagnosed, exactly; the same values unrounded (a
    // float32 computation) are said to conform as float32 instead.
    let case = golden_case("e2b_bf16");
    let model_dir = case.model_dir();
    let base = [
        "--model",
        path_str(&model_dir),
        "--tokens",
        &token_list(&case),
        "--compute-dtype",
        "bf16",
        "--json",
    ];
    let (code, stdout, stderr) =
        run_compare(&[&base[..], &["--candidate", path_str(&case.expected_path())]].concat());
    assert_eq!(
        code,
        0,
        "exit {code}: {stderr}; {}",
        json(&stdout)["first_divergence"]
    );
    let dir = tempfile::tempdir().unwrap();
    let unrounded = with_faults(&[Fault::EmbedScaleNotRounded], || {
        Gemma4TextModel::load(&case.model_dir())
            .unwrap()
            .with_compute_dtype(gemma4_reference::ComputeDtype::BFloat16)
            .dump(&case.tokens, case.decode_steps)
            .unwrap()
    });
    let as_float32 = write_dump(dir.path(), "unrounded.safetensors", &unrounded);
    let (code, stdout, stderr) =
        run_compare(&[&base[..], &["--candidate", path_str(&as_float32)]].concat());
    let report = json(&stdout);
    assert_eq!(code, 1, "exit {code}: {stderr}");
    assert_eq!(report["conformant_with_compute_dtype"], "float32");
    assert_eq!(report["diagnosis"], Value::Null);
    // Stored in BF16: a bf16 computation.
    let as_bf16 = write_dump_low_precision(dir.path(), "bf16.safetensors", &unrounded, "BF16");
    let (code, stdout, stderr) =
        run_compare(&[&base[..], &["--candidate", path_str(&as_bf16)]].concat());
    let report = json(&stdout);
    assert_eq!(code, 1, "exit {code}: {stderr}");
    assert_eq!(report["first_divergence"], "embeddings");
    assert_eq!(report["conformant_with_compute_dtype"], Value::Null);
    assert_eq!(
        report["diagnosis"], "embed_scale_not_rounded",
        "{}",
        report["diagnosis_details"]["verdict"]
    );
}

// ---------------------------------------------------------------------------------------------
// Index tensors: counts and ids, not a relative error
// ---------------------------------------------------------------------------------------------

#[test]
fn compare_cli_index_tensor_report_counts_and_ids_26b_a4b_like() {
    let case = golden_case("26b_a4b_like");
    let dir = tempfile::tempdir().unwrap();
    let hf = ActivationDump::read(&case.expected_path()).unwrap();
    let mut dump = hf.clone();
    let mut index = hf
        .get("layers.0.router.top_k_index")
        .unwrap()
        .as_i64()
        .unwrap()
        .clone();
    // Token 2: the first two experts swapped, their weights with them (same set, another order:
    // conforming, the ranking is not part of the model); token 5: one expert replaced by one no
    // row of it holds.
    index.swap([2, 0], [2, 1]);
    let mut weights = hf
        .get("layers.0.router.top_k_weights")
        .unwrap()
        .as_f32()
        .unwrap()
        .clone();
    weights.swap([2, 0], [2, 1]);
    dump.insert_f32("layers.0.router.top_k_weights", weights);
    let row5: Vec<i64> = index.slice(ndarray::s![5, ..]).iter().copied().collect();
    let unused = (0..128).find(|e| !row5.contains(e)).unwrap();
    let replaced = index[[5, 3]];
    index[[5, 3]] = unused;
    dump.insert_i64("layers.0.router.top_k_index", index);
    let candidate = write_dump(dir.path(), "index.safetensors", &dump);
    let expected_path = case.expected_path();
    let args = [
        "--expected",
        path_str(&expected_path),
        "--candidate",
        path_str(&candidate),
    ];
    let (code, stdout, _) = run_compare(&[&args[..], &["--json"]].concat());
    let report = json(&stdout);
    assert_eq!(code, 1);
    assert_eq!(report["first_divergence"], "layers.0.router.top_k_index");
    let tensor = report["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "layers.0.router.top_k_index")
        .unwrap();
    let mismatch = &tensor["index_mismatch"];
    assert_eq!(mismatch["differing"], 1);
    assert_eq!(mismatch["differing_rows"], 1);
    assert_eq!(mismatch["reordered_rows"], 0);
    assert_eq!(mismatch["first_index"], serde_json::json!([5, 3]));
    let weights_report = report["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "layers.0.router.top_k_weights")
        .unwrap();
    assert_eq!(
        weights_report["status"], "pass",
        "weights follow their experts"
    );
    let (_, text, _) = run_compare(&args);
    let k = hf.get("layers.0.router.top_k_index").unwrap().shape()[1];
    let want = format!(
        "1 of {} entries differ, in 1 of {} tokens; first at [5, 3]",
        case.tokens.len() * k,
        case.tokens.len()
    );
    assert!(text.contains(&want), "want `{want}` in:\n{text}");
    assert!(replaced != unused);
}

#[test]
fn compare_cli_greedy_choice_not_a_tie_reported_as_ids_e4b_like() {
    // The prompt and every logits row right, but the token chosen at decode row 3 is another
    // one (not a near tie): greedy_continuation diverges, with the step and both ids.
    let case = golden_case("e4b_like");
    let dir = tempfile::tempdir().unwrap();
    let hf = ActivationDump::read(&case.expected_path()).unwrap();
    let mut dump = hf.clone();
    let mut tokens = hf
        .get("greedy_continuation")
        .unwrap()
        .as_i64()
        .unwrap()
        .clone();
    let rows = hf.get("decode_logits").unwrap().as_f32().unwrap();
    let worst = gemma4_reference::model::argmax(rows.slice(ndarray::s![3, ..]).mapv(|v| -v).view());
    let expected_token = tokens[3];
    tokens[3] = worst as i64;
    dump.insert_i64("greedy_continuation", tokens);
    let candidate = write_dump(dir.path(), "choice.safetensors", &dump);
    let expected_path = case.expected_path();
    let args = [
        "--expected",
        path_str(&expected_path),
        "--candidate",
        path_str(&candidate),
    ];
    let (code, text, _) = run_compare(&args);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("First divergence: greedy_continuation")
            && text.contains(&format!(
                "1 of {} entries differ; first at [3]: expected {expected_token}, got {worst}",
                case.decode_steps
            ))
            && text.contains("not a near tie"),
        "{text}"
    );
}

/// `--precision`: a port at llama.cpp's precision (the reference imitating it) is named a
/// precision choice at float32 (exit 1, no fault) and is conformant judged at that precision
/// (exit 0); `--precision` without `--model`, and an unknown precision, are unusable input
/// (exit 2), the latter naming the known ones.
#[test]
fn compare_cli_precision_choice_named_then_judged_31b_like() {
    use gemma4_reference::precision::{with_precision, PrecisionChoice};
    let case = golden_case("31b_like");
    let dir = tempfile::tempdir().expect("temporary directory");
    let at_precision = with_precision(
        &[
            PrecisionChoice::KvCacheF16,
            PrecisionChoice::FlashAttentionF16,
            PrecisionChoice::GeluF16Table,
        ],
        || reference_dump(&case, &[], case.decode_steps),
    );
    let candidate = write_dump(dir.path(), "llama.safetensors", &at_precision);
    let model = case.model_dir();
    let tokens = token_list(&case);
    let common = [
        "--model",
        path_str(&model),
        "--tokens",
        tokens.as_str(),
        "--candidate",
        path_str(&candidate),
    ];

    let (code, stdout, stderr) = run_compare(&[&common[..], &["--json"]].concat());
    assert_eq!(code, 1, "stderr: {stderr}");
    let report = json(&stdout);
    assert_eq!(report["diagnosis"], Value::Null, "{stdout}");
    assert_eq!(
        report["precision_choice"]["name"], "llama-cpp-cpu",
        "{stdout}"
    );
    assert_eq!(report["judged_at_precision"], "float32");
    let (_, text, _) = run_compare(&common);
    assert!(text.contains("a precision choice, not a bug"), "{text}");

    let (code, stdout, stderr) =
        run_compare(&[&common[..], &["--json", "--precision", "llama-cpp-cpu"]].concat());
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert_eq!(json(&stdout)["judged_at_precision"], "llama-cpp-cpu");

    let expected = write_dump(dir.path(), "expected.safetensors", &at_precision);
    let (code, _, stderr) = run_compare(&[
        "--expected",
        path_str(&expected),
        "--candidate",
        path_str(&candidate),
        "--precision",
        "llama-cpp-cpu",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("needs --model"), "{stderr}");

    let (code, _, stderr) = run_compare(&[&common[..], &["--precision", "fp8_cache"]].concat());
    assert_eq!(code, 2);
    assert!(
        stderr.contains("fp8_cache") && stderr.contains("llama-cpp-cpu"),
        "{stderr}"
    );
}
