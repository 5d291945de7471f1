//! Conformance of the optimized engine: every golden case through `--engine optimized`, against
//! the Hugging Face oracle's dump (the same checks and tolerances as `gemma4 conform`), with the
//! checkpoints as shipped (f32; one bf16 case) and with the f32 checkpoints cast to bf16.

mod common;

use std::path::Path;

use common::RawSafetensors;
use gemma4::comparison::{
    compare_dumps, depth_of, is_index_tensor, tolerance_for, Precision, Status,
};
use gemma4::conform::compare_with_case;
use gemma4::engine::Engine;
use gemma4::golden::{load_cases, GoldenCase};
use gemma4_optimized::Gemma4Optimized;
use gemma4_reference::{ActivationDump, Gemma4TextModel};

fn cases() -> Vec<GoldenCase> {
    load_cases(&common::golden_dir()).expect("golden fixtures intact")
}

fn failures(reports: &[gemma4::comparison::TensorReport]) -> Vec<String> {
    reports
        .iter()
        .filter(|r| r.status != Status::Pass)
        .map(|r| format!("  {:?} {}", r.status, r.describe()))
        .collect()
}

#[test]
fn optimized_conforms_to_oracle_every_golden_case() {
    for case in cases() {
        let expected = ActivationDump::read(&case.expected_path()).unwrap();
        let candidate = Engine::Optimized
            .dump_case(&case, None)
            .unwrap_or_else(|e| panic!("{}: the optimized engine failed: {e}", case.name));
        let reports = compare_with_case(&case, &expected, &candidate);
        let failed = failures(&reports);
        assert!(
            failed.is_empty(),
            "{}: {} tensors of the optimized dump do not match the oracle:\n{}",
            case.name,
            failed.len(),
            failed.join("\n")
        );
        // The oracle's dump leaves out the images' pixels: they are the input (its
        // `pixel_values.safetensors`), not an activation.
        let mut ours: Vec<&str> = candidate
            .names_in_model_order()
            .into_iter()
            .filter(|name| !name.ends_with("pixel_values"))
            .collect();
        let mut theirs: Vec<&str> = expected.names_in_model_order();
        ours.sort_unstable();
        theirs.sort_unstable();
        assert_eq!(
            ours, theirs,
            "{}: tensor names differ from the oracle's",
            case.name
        );
    }
}

/// Copies a golden model directory with every F32 tensor rounded to BF16 (what
/// `model.to(torch.bfloat16).save_pretrained(...)` writes).
fn cast_to_bf16(model: &Path) -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(model).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_owned();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let mut raw = RawSafetensors::read(&path);
            for tensor in raw.tensor_names() {
                if raw.header[&tensor]["dtype"] != "F32" {
                    continue;
                }
                let shape = raw.shape(&tensor);
                let (start, end) = raw.offsets(&tensor);
                let bytes: Vec<u8> = raw.data[start..end]
                    .chunks_exact(4)
                    .flat_map(|b| {
                        half::bf16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                            .to_le_bytes()
                    })
                    .collect();
                raw.replace(&tensor, "BF16", &shape, bytes);
            }
            raw.write(&out.path().join(name));
        } else {
            std::fs::copy(&path, out.path().join(name)).unwrap();
        }
    }
    out
}

#[test]
fn optimized_bf16_weights_match_reference_and_f32_oracle_every_golden_case() {
    for case in cases()
        .into_iter()
        .filter(|c| c.checkpoint_dtype == "float32")
    {
        let cast = cast_to_bf16(&case.model_dir());
        // 1. Same bf16 weights, both engines: the optimized engine widens bf16 in its kernels,
        //    the reference converts at load; the arithmetic after that is f32 in both, so the
        //    float32 tolerance applies (`tolerance_for`, justified in src/comparison.rs).
        let prompt = case.prompt().unwrap();
        let ours = Gemma4Optimized::load_for(cast.path(), &prompt, None)
            .unwrap()
            .dump_prompt(&prompt, case.decode_steps)
            .unwrap();
        let reference = Gemma4TextModel::load_for(cast.path(), &prompt)
            .unwrap()
            .dump_prompt(&prompt, case.decode_steps)
            .unwrap();
        let f32_case = GoldenCase {
            dtype: "float32".into(),
            ..case.clone()
        };
        let reports = compare_with_case(&f32_case, &reference, &ours);
        let failed = failures(&reports);
        assert!(
            failed.is_empty(),
            "{} cast to bf16: optimized vs reference on the same weights:\n{}",
            case.name,
            failed.join("\n")
        );

        // 2. Against the f32 oracle. Rounding the weights to bf16 (up to 2^-8 ≈ 3.9e-3 relative each)
        //    changes the model itself, and the random tiny models amplify that change layer
        //    after layer (unscaled, peaky attention; norms of cancelling branches): measured,
        //    the prefill tensors move by 1e-2..4e-2 of their largest element at layer 0 and by
        //    up to 0.5 on e2b_like's deepest layers, where one token's attention pattern flips.
        //    No fixed tolerance separates that from a bug, but the reference run on the same
        //    bf16 weights measures exactly how far bf16 weights put *any* correct engine from the
        //    oracle. So each tensor may differ from the oracle by that measured gap plus the
        //    float32 allowance of `tolerance_for` — and never by more than the project's bf16
        //    policy when that is looser (`Precision::BFloat16`, src/comparison.rs). Index tensors
        //    and the greedy decode are compared only where the reference on bf16 weights still
        //    makes the oracle's choices (a bf16 perturbation may legitimately flip a near-tied
        //    expert or argmax; step 1 already checks them against the reference exactly), and a
        //    router's weights only where its experts do not flip.
        let expected = ActivationDump::read(&case.expected_path()).unwrap();
        let num_layers = gemma4::comparison::layers_in_dump(&expected).unwrap_or(0);
        let inherent = compare_dumps(&expected, &reference, |_| 0.0);
        let inherent_gap = |name: &str| {
            inherent
                .iter()
                .find(|r| r.name == name)
                .map_or(f64::INFINITY, |r| r.max_rel)
        };
        let mut selected = ActivationDump::new();
        for name in expected.names_in_model_order() {
            // A router's weights go with its choice: where the experts flip, so do they.
            let choice = name.replace("router.top_k_weights", "router.top_k_index");
            let flips = (is_index_tensor(name) || name == "decode_logits")
                && inherent_gap(name) > 0.0
                || name == "decode_logits" && inherent_gap("greedy_continuation") > 0.0
                || name.ends_with("router.top_k_weights") && inherent_gap(&choice) > 0.0;
            if !flips {
                selected.insert(name, expected.get(name).unwrap().clone());
            }
        }
        let reports = compare_dumps(&selected, &ours, |name| {
            if is_index_tensor(name) {
                return 0.0;
            }
            let depth = depth_of(name, num_layers);
            (inherent_gap(name) + tolerance_for(name, Precision::Float32, depth))
                .max(tolerance_for(name, Precision::BFloat16, depth))
        });
        let failed = failures(&reports);
        assert!(
            failed.is_empty(),
            "{} cast to bf16: optimized vs the f32 oracle:\n{}",
            case.name,
            failed.join("\n")
        );
    }
}
