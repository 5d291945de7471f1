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
        assert!(stderr.contains("12 prompt tokens"), "{engine}: {stderr}");
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
