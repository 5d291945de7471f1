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

#[test]
fn compare_cli_hf_dump_conformant_exit_0_every_case() {
    for name in [
        "e2b_like",
        "e4b_like",
        "31b_like",
        "26b_a4b_like",
        "e2b_bf16",
    ] {
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
