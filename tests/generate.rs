//! `gemma4 generate`: tokenizer in, greedy KV-cache decoding, text out. A word-level tokenizer
//! (`w0` … `w511`) stands in for the real Gemma tokenizer on a golden model, so the expected text
//! follows from the reference's greedy continuation.

mod common;

use std::collections::HashMap;
use std::path::Path;

use gemma4_reference::model::argmax;
use gemma4_reference::Gemma4TextModel;
use ndarray::s;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::Tokenizer;

fn word_level_tokenizer(vocab_size: u32) -> Tokenizer {
    let vocab: HashMap<String, u32> = (0..vocab_size).map(|i| (format!("w{i}"), i)).collect();
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("w3".into())
        .build()
        .unwrap();
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(Whitespace {}));
    tokenizer
}

/// Runs `gemma4 generate --model MODEL --prompt PROMPT EXTRA...`; returns the exit code, stdout
/// and stderr.
fn run_generate(model: &Path, prompt: &str, extra: &[&str]) -> (i32, String, String) {
    let model = model.to_str().unwrap();
    let args = [&["generate", "--model", model, "--prompt", prompt], extra].concat();
    common::run_gemma4(&args, &[])
}

#[test]
fn generate_streams_the_greedy_continuation_e2b_like_both_engines() {
    let dir = common::copy_golden_model("e2b_like");
    word_level_tokenizer(512)
        .save(dir.path().join("tokenizer.json"), false)
        .unwrap();

    // Expected: BOS (2) + the prompt's ids, then greedy argmax steps. Twelve prompt tokens: the
    // optimized engine's prefill takes its matrix-product (not its single-row) kernels.
    let model = Gemma4TextModel::load(dir.path()).unwrap();
    let words = [5usize, 9, 12, 100, 7, 301, 44, 17, 250, 3, 88];
    let prompt: Vec<usize> = std::iter::once(2).chain(words).collect();
    let dump = model.dump(&prompt, 5).unwrap();
    // The dump's continuation starts with the argmax of the prompt's last logits (generate's
    // convention).
    let logits = dump.get("logits").unwrap().as_f32().unwrap();
    let first = argmax(logits.slice(s![prompt.len() - 1, ..]).view());
    let expected: Vec<usize> = dump
        .get("greedy_continuation")
        .unwrap()
        .as_i64()
        .unwrap()
        .iter()
        .map(|&t| t as usize)
        .collect();
    assert_eq!(expected[0], first);
    let eos = &model.config.special_tokens.eos_token_ids;
    let expected_words: Vec<String> = expected
        .iter()
        .take(5)
        .take_while(|id| !eos.contains(id))
        .map(|id| format!("w{id}"))
        .collect();
    let prompt_text = words.map(|w| format!("w{w}")).join(" ");

    for engine in ["reference", "optimized"] {
        let (code, stdout, stderr) = run_generate(
            dir.path(),
            &prompt_text,
            &["--max-new-tokens", "5", "--engine", engine],
        );
        assert_eq!(code, 0, "{engine}: generate failed: {stderr}");
        assert_eq!(
            stdout.split_whitespace().collect::<Vec<_>>(),
            expected_words,
            "{engine}: stderr: {stderr}"
        );
        assert!(stderr.contains("prefill: 12 tokens"), "{engine}: {stderr}");
    }
}

#[test]
fn generate_fast_prefill_needs_the_optimized_engine() {
    let (code, _, stderr) = run_generate(
        &common::golden_model("e2b_like"),
        "hi",
        &["--engine", "reference", "--fast-prefill"],
    );
    assert_eq!(code, 2);
    assert!(
        stderr.contains("--fast-prefill needs --engine optimized"),
        "{stderr}"
    );
}

#[test]
fn generate_without_tokenizer_names_the_missing_file() {
    let (code, _, stderr) = run_generate(&common::golden_model("e2b_like"), "hi", &[]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("tokenizer.json") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

/// A tiny random model with the fixture tokenizer's full vocabulary (262 144 ids, bf16, 16
/// wide: 8 MB), written to a temporary directory with `golden/chat/`'s tokenizer, template and
/// generation config: `generate --chat` end to end with real Gemma-style token ids.
fn chat_model() -> tempfile::TempDir {
    use gemma4_optimized::synthetic::{write_checkpoint, TinyConfig};
    let config = TinyConfig {
        vocab_size: 262_144,
        hidden_size: 16,
        intermediate_size: 32,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        num_global_key_value_heads: 1,
        head_dim: 8,
        global_head_dim: 16,
        full_layers: vec![false, true],
        sliding_window: 4,
        hidden_size_per_layer_input: 0,
        num_kv_shared_layers: 0,
        use_double_wide_mlp: false,
        attention_k_eq_v: false,
        moe: None,
        tie_word_embeddings: true,
        final_logit_softcapping: Some(30.0),
    };
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(
        dir.path(),
        &config.config_json(),
        gemma4_reference::checkpoint::WeightDtype::BF16,
        11,
    )
    .unwrap();
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    ] {
        std::fs::copy(
            common::golden_dir().join("chat").join(file),
            dir.path().join(file),
        )
        .unwrap();
    }
    dir
}

/// `--chat --show-prompt`: the rendered prompt (with the closed thought channel) and its ids on
/// stderr, the speed line at the end; seeded sampling gives the same text on 1 and 3 threads
/// and across runs; greedy decoding gives the same text on both engines.
#[test]
fn generate_chat_renders_samples_reproducibly_and_reports_speeds() {
    let dir = chat_model();
    let chat = |extra: &[&str]| {
        let base = [
            "--chat",
            "--system",
            "Be brief.",
            "--max-new-tokens",
            "12",
            "--quiet",
        ];
        let args: Vec<&str> = base.iter().copied().chain(extra.iter().copied()).collect();
        run_generate(dir.path(), "What is 2+2?", &args)
    };
    let (code, _, stderr) = run_generate(
        dir.path(),
        "What is 2+2?",
        &[
            "--chat",
            "--show-prompt",
            "--max-new-tokens",
            "3",
            "--system",
            "Be brief.",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nWhat is 2+2?<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"),
        "{stderr}"
    );
    assert!(
        stderr.contains("2, 105, "),
        "the ids start with BOS and <|turn>: {stderr}"
    );
    assert!(
        stderr.contains("prefill:") && stderr.contains("tok/s"),
        "{stderr}"
    );

    // The random model's tokens are mostly outside the fixture tokenizer's trimmed vocabulary
    // (empty text), so runs are compared by their ids (`--show-ids`) and text.
    let ids_line = |stderr: &str| {
        stderr
            .lines()
            .find(|l| l.starts_with("generated ids: "))
            .unwrap_or_else(|| panic!("no generated ids in {stderr}"))
            .to_string()
    };
    let sampled = |seed: &str, threads: &str| {
        let (code, stdout, stderr) = chat(&[
            "--seed",
            seed,
            "--threads",
            threads,
            "--temperature",
            "1.5",
            "--show-ids",
        ]);
        assert_eq!(code, 0, "{stderr}");
        (ids_line(&stderr), stdout)
    };
    let one = sampled("17", "1");
    assert_eq!(
        one,
        sampled("17", "3"),
        "seeded sampling differs between 1 and 3 threads"
    );
    assert_eq!(
        one,
        sampled("17", "1"),
        "seeded sampling differs between runs"
    );
    assert_ne!(
        one.0,
        sampled("18", "1").0,
        "two seeds gave the same sampled tokens"
    );

    let greedy = |engine: &str| {
        let (code, stdout, stderr) = chat(&["--greedy", "--engine", engine, "--show-ids"]);
        assert_eq!(code, 0, "{engine}: {stderr}");
        (ids_line(&stderr), stdout)
    };
    assert_eq!(greedy("reference"), greedy("optimized"));
}

/// An image for a model without a vision tower, an unknown role, a prompt without the
/// placeholders of its images: exit 2 with the reason, no panic.
#[test]
fn generate_chat_bad_input_exits_2_with_the_reason() {
    let dir = chat_model();
    let image = common::golden_dir().join("chat/images/chelsea.png");
    let (code, _, stderr) = run_generate(
        dir.path(),
        "Describe.",
        &["--chat", "--image", image.to_str().unwrap()],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("no vision tower") && !stderr.contains("panicked"),
        "{stderr}"
    );
    let messages = dir.path().join("messages.json");
    std::fs::write(&messages, r#"[{"role": "robot", "content": "hi"}]"#).unwrap();
    let model = dir.path().to_str().unwrap();
    let (code, _, stderr) = common::run_gemma4(
        &[
            "generate",
            "--model",
            model,
            "--chat",
            "--messages",
            messages.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("messages.json") && stderr.contains("robot"),
        "{stderr}"
    );
}
