//! Conformance: the reference engine against the Hugging Face oracle's golden dumps, tensor by
//! tensor, for every bundled case. One test per case and part of the model, so a failure says
//! where the reference went wrong (and `cargo xtask mutants` can say which test caught a fault).
//!
//! Tolerances come from `gemma4::comparison::tolerance_for` (justified there): 3e-5 of each
//! tensor's largest element for float32 cases, exact equality for index tensors.

mod common;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use gemma4::comparison::{Status, TensorReport};
use gemma4::conform::compare_with_case;
use gemma4::engine::Engine;
use gemma4::golden::load_cases;
use gemma4_reference::ActivationDump;

use common::golden_case;

/// Per-tensor reports of the reference engine on a case (computed once per case).
fn reports(case_name: &str, engine: Engine) -> Vec<TensorReport> {
    type Cache = Mutex<HashMap<(String, &'static str), Vec<TensorReport>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let key = (case_name.to_string(), engine.name());
    if let Some(hit) = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap()
        .get(&key)
    {
        return hit.clone();
    }
    let case = golden_case(case_name);
    let expected = ActivationDump::read(&case.expected_path()).expect("expected dump readable");
    let candidate = engine
        .dump_case(&case, None)
        .unwrap_or_else(|e| panic!("{case_name}: the {} engine failed: {e}", engine.name()));
    let result = compare_with_case(&case, &expected, &candidate);
    CACHE
        .get()
        .unwrap()
        .lock()
        .unwrap()
        .insert(key, result.clone());
    result
}

/// Asserts that every expected tensor selected by `select` matches; lists every failure.
fn assert_conforms(case_name: &str, engine: Engine, select: impl Fn(&str) -> bool, what: &str) {
    let reports = reports(case_name, engine);
    let selected: Vec<&TensorReport> = reports.iter().filter(|r| select(&r.name)).collect();
    assert!(
        !selected.is_empty(),
        "{case_name}: the golden dump has no {what} tensors"
    );
    let failures: Vec<String> = selected
        .iter()
        .filter(|r| r.status != Status::Pass)
        .map(|r| format!("  {:?} {}", r.status, r.describe()))
        .collect();
    assert!(
        failures.is_empty(),
        "{case_name} ({} engine): {} of {} {what} tensors do not match the oracle:\n{}",
        engine.name(),
        failures.len(),
        selected.len(),
        failures.join("\n")
    );
}

fn is_attention(name: &str) -> bool {
    name.contains(".attn.")
}

fn is_router_or_moe(name: &str) -> bool {
    name.contains(".router.") || name.ends_with(".moe.output")
}

/// `layers.{i}.output` (not `attn.output`, `mlp.output` or `moe.output`).
fn is_layer_output(name: &str) -> bool {
    let parts: Vec<&str> = name.split('.').collect();
    parts.len() == 3 && parts[0] == "layers" && parts[2] == "output"
}

macro_rules! conformance_tests {
    ($module:ident, $case:literal, ple: $ple:literal, moe: $moe:literal) => {
        mod $module {
            use super::*;

            #[test]
            fn embeddings_match_oracle() {
                assert_conforms(
                    $case,
                    Engine::Reference,
                    |n| n == "embeddings" || n == "input_ids",
                    "embedding",
                );
            }

            #[test]
            fn per_layer_inputs_match_oracle() {
                if $ple {
                    assert_conforms($case, Engine::Reference, |n| n == "per_layer_inputs", "PLE");
                } else {
                    let reports = reports($case, Engine::Reference);
                    assert!(
                        reports.iter().all(|r| r.name != "per_layer_inputs"),
                        "{}: no PLE expected",
                        $case
                    );
                }
            }

            #[test]
            fn attention_matches_oracle() {
                assert_conforms(
                    $case,
                    Engine::Reference,
                    is_attention,
                    "attention (q, k, v, output)",
                );
            }

            #[test]
            fn mlp_matches_oracle() {
                assert_conforms(
                    $case,
                    Engine::Reference,
                    |n| n.ends_with(".mlp.output"),
                    "dense MLP",
                );
            }

            #[test]
            fn router_and_experts_match_oracle() {
                if $moe {
                    assert_conforms($case, Engine::Reference, is_router_or_moe, "router / MoE");
                }
            }

            #[test]
            fn layer_outputs_match_oracle() {
                assert_conforms($case, Engine::Reference, is_layer_output, "layer output");
            }

            #[test]
            fn final_norm_and_logits_match_oracle() {
                assert_conforms(
                    $case,
                    Engine::Reference,
                    |n| n == "final_norm" || n == "logits",
                    "final norm / logits",
                );
            }

            #[test]
            fn decode_matches_oracle() {
                assert_conforms(
                    $case,
                    Engine::Reference,
                    |n| n == "decode_logits" || n == "greedy_continuation",
                    "decode",
                );
            }

            #[test]
            fn dump_has_exactly_the_oracle_tensor_names() {
                let case = golden_case($case);
                let expected = ActivationDump::read(&case.expected_path()).unwrap();
                let ours = Engine::Reference.dump_case(&case, None).unwrap();
                let mut expected_names: Vec<&str> = expected.names_in_model_order();
                // The golden dumps leave the pixels to `pixel_values.safetensors` (the input
                // the engines read), to keep the fixtures small.
                let mut our_names: Vec<&str> = ours
                    .names_in_model_order()
                    .into_iter()
                    .filter(|n| !(n.starts_with("vision.") && n.ends_with("pixel_values")))
                    .collect();
                expected_names.sort_unstable();
                our_names.sort_unstable();
                assert_eq!(
                    our_names, expected_names,
                    "{}: tensor names differ from the oracle's dump",
                    $case
                );
            }
        }
    };
}

conformance_tests!(e2b_like, "e2b_like", ple: true, moe: false);
conformance_tests!(e4b_like, "e4b_like", ple: true, moe: false);
conformance_tests!(case_31b_like, "31b_like", ple: false, moe: false);
conformance_tests!(case_26b_a4b_like, "26b_a4b_like", ple: false, moe: true);
conformance_tests!(e2b_bf16, "e2b_bf16", ple: true, moe: false);
conformance_tests!(e4b_bf16_as_f32, "e4b_bf16_as_f32", ple: true, moe: false);
conformance_tests!(e2b_vision, "e2b_vision", ple: true, moe: false);
conformance_tests!(e2b_vision_two_images, "e2b_vision_two_images", ple: true, moe: false);
conformance_tests!(case_31b_vision, "31b_vision", ple: false, moe: false);
conformance_tests!(case_31b_vision_two_images, "31b_vision_two_images", ple: false, moe: false);
conformance_tests!(e2b_audio, "e2b_audio", ple: true, moe: false);
conformance_tests!(e2b_audio_two_clips, "e2b_audio_two_clips", ple: true, moe: false);
conformance_tests!(e2b_image_and_audio, "e2b_image_and_audio", ple: true, moe: false);
conformance_tests!(e4b_audio, "e4b_audio", ple: true, moe: false);

/// The vision tensors of every vision case, per part of the tower.
macro_rules! vision_conformance_tests {
    ($module:ident, $case:literal) => {
        mod $module {
            use super::*;

            #[test]
            fn vision_patch_embeddings_match_oracle() {
                assert_conforms(
                    $case,
                    Engine::Reference,
                    |n| n.starts_with("vision.") && n.ends_with("patch_embeddings"),
                    "patch embedding",
                );
            }

            #[test]
            fn vision_encoder_layers_match_oracle() {
                assert_conforms(
                    $case,
                    Engine::Reference,
                    |n| n.starts_with("vision.") && n.contains("layers."),
                    "vision encoder layer",
                );
            }

            #[test]
            fn vision_soft_tokens_match_oracle() {
                assert_conforms(
                    $case,
                    Engine::Reference,
                    |n| n.starts_with("vision.") && n.ends_with("soft_tokens"),
                    "soft token",
                );
            }
        }
    };
}

vision_conformance_tests!(vision_e2b_vision, "e2b_vision");
vision_conformance_tests!(vision_e2b_vision_two_images, "e2b_vision_two_images");
vision_conformance_tests!(vision_31b_vision, "31b_vision");
vision_conformance_tests!(vision_31b_vision_two_images, "31b_vision_two_images");
vision_conformance_tests!(vision_e2b_image_and_audio, "e2b_image_and_audio");

/// The audio tensors of every audio case, per part of the tower (shared spec: multimodal §2):
/// the log-mel features of each clip, the subsampling output, every conformer layer, the soft
/// tokens in the text width.
macro_rules! audio_conformance_tests {
    ($module:ident, $case:literal) => {
        mod $module {
            use super::*;

            #[test]
            fn audio_features_match_oracle() {
                assert_conforms(
                    $case,
                    Engine::Reference,
                    |n| n.starts_with("audio.") && n.ends_with("features"),
                    "log-mel feature",
                );
            }

            #[test]
            fn audio_subsampling_matches_oracle() {
                assert_conforms(
                    $case,
                    Engine::Reference,
                    |n| n.starts_with("audio.") && n.ends_with("subsample"),
                    "subsampling",
                );
            }

            #[test]
            fn audio_conformer_layers_match_oracle() {
                assert_conforms(
                    $case,
                    Engine::Reference,
                    |n| n.starts_with("audio.") && n.contains("layers."),
                    "conformer layer",
                );
            }

            #[test]
            fn audio_soft_tokens_match_oracle() {
                assert_conforms(
                    $case,
                    Engine::Reference,
                    |n| n.starts_with("audio.") && n.ends_with("soft_tokens"),
                    "soft token",
                );
            }
        }
    };
}

audio_conformance_tests!(audio_e2b_audio, "e2b_audio");
audio_conformance_tests!(audio_e2b_audio_two_clips, "e2b_audio_two_clips");
audio_conformance_tests!(audio_e2b_image_and_audio, "e2b_image_and_audio");
audio_conformance_tests!(audio_e4b_audio, "e4b_audio");

#[test]
fn golden_cases_cover_every_variant_family() {
    let cases = load_cases(&common::golden_dir()).unwrap();
    for family in ["e2b", "e4b", "31b", "26b-a4b"] {
        assert!(
            cases.iter().any(|c| c.family == family),
            "no golden case of family {family}"
        );
    }
    for case in &cases {
        let config = gemma4_reference::ModelConfig::from_dir(&case.model_dir()).unwrap();
        // The manifest's description of the case agrees with its checkpoint.
        let layout = match config.layout {
            gemma4_reference::config::CheckpointLayout::ConditionalGeneration => {
                "conditional_generation"
            }
            gemma4_reference::config::CheckpointLayout::CausalLm => "causal_lm",
        };
        assert_eq!(case.layout, layout, "{}: layout", case.name);
        let raw: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(case.model_dir().join("config.json")).unwrap(),
        )
        .unwrap();
        let text_config = raw.get("text_config").unwrap_or(&raw);
        let spelling = if text_config.get("per_layer_config").is_some() {
            "per_layer_config"
        } else {
            "released"
        };
        assert_eq!(
            case.config_spelling, spelling,
            "{}: config spelling",
            case.name
        );
        assert!(
            !case.exercises.is_empty(),
            "{}: exercises listed",
            case.name
        );
        let window = config.text.sliding_window;
        assert!(
            case.tokens.len() > 2 * window,
            "{}: {} tokens do not cross the sliding window ({window}) twice",
            case.name,
            case.tokens.len()
        );
    }
}
