//! `gemma4 generate`: tokenize a prompt, decode greedily through the KV cache, stream the text.

use std::path::Path;

use gemma4_optimized::linear::Precision;
use gemma4_optimized::{Gemma4Optimized, Logits};
use gemma4_reference::dump::Recorder;
use gemma4_reference::Gemma4TextModel;
use gemma4_reference::ModelConfig;
use tokenizers::Tokenizer;

use crate::engine::Engine;

/// How `generate` runs the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenerateOptions {
    /// Which implementation computes the logits.
    pub engine: Engine,
    /// Threads of the optimized engine (`None`: `RAYON_NUM_THREADS`, else one per core).
    pub threads: Option<usize>,
    /// Optimized engine, bf16 weights: the prompt's matrix products on activations rounded to
    /// bf16 ([`Precision::Bf16Activations`]), as torch and llama.cpp do for bf16 models. Faster
    /// prefill on AVX-512 BF16 and AMX CPUs; not the reference's arithmetic (the greedy continuation may
    /// differ where two candidates are nearly tied).
    pub fast_prefill: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            engine: Engine::Optimized,
            threads: None,
            fast_prefill: false,
        }
    }
}

/// A loaded model and its KV cache, of either engine: the next token's logits for each call.
enum Session {
    Reference(Box<Gemma4TextModel>, gemma4_reference::kv_cache::KvCache),
    Optimized(Box<Gemma4Optimized>, gemma4_optimized::kv_cache::KvCache),
}

impl Session {
    fn load(dir: &Path, options: GenerateOptions) -> Result<Session, String> {
        let text = |e: gemma4_reference::Error| e.to_string();
        Ok(match options.engine {
            Engine::Reference => {
                let model = Gemma4TextModel::load(dir).map_err(text)?;
                let cache = model.new_cache();
                Session::Reference(Box::new(model), cache)
            }
            Engine::Optimized => {
                let precision = if options.fast_prefill {
                    Precision::Bf16Activations
                } else {
                    Precision::F32
                };
                let model = Gemma4Optimized::load_with_threads(dir, options.threads)
                    .map_err(text)?
                    .with_precision(precision);
                let cache = model.new_cache();
                Session::Optimized(Box::new(model), cache)
            }
        })
    }

    fn config(&self) -> &ModelConfig {
        match self {
            Session::Reference(model, _) => &model.config,
            Session::Optimized(model, _) => &model.config,
        }
    }

    /// Runs `ids` after everything before them and returns the last position's logits.
    fn next_logits(&mut self, ids: &[usize]) -> Result<Vec<f32>, String> {
        let text = |e: gemma4_reference::Error| e.to_string();
        match self {
            Session::Reference(model, cache) => {
                let logits = model
                    .forward(ids, cache, &mut Recorder::checking_only())
                    .map_err(text)?;
                Ok(logits.row(logits.nrows() - 1).to_vec())
            }
            Session::Optimized(model, cache) => model
                .forward(ids, cache, &mut Recorder::checking_only(), Logits::Last)
                .map_err(text),
        }
    }
}

/// What a generation produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// The prompt's token ids (BOS included).
    pub prompt_ids: Vec<usize>,
    /// The generated ids (an end-of-sequence id, if reached, is included).
    pub generated_ids: Vec<usize>,
    /// The generated text.
    pub text: String,
}

/// Loads `dir/tokenizer.json`, naming the file in the error.
pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer, String> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Err(format!(
            "{}: missing; `generate` needs the checkpoint's tokenizer (use `dump --tokens` to run raw ids)",
            path.display()
        ));
    }
    Tokenizer::from_file(&path)
        .map_err(|e| format!("{}: not a usable tokenizer: {e}", path.display()))
}

/// Greedy generation of up to `max_new_tokens` tokens after `prompt`, calling `on_text` with
/// each new piece of text as soon as it is decodable. Stops early at an end-of-sequence id
/// (`eos_token_id` of config.json). The prompt runs in one pass (prefill), then one token at a
/// time through the KV cache.
pub fn generate(
    dir: &Path,
    prompt: &str,
    max_new_tokens: usize,
    options: GenerateOptions,
    mut on_text: impl FnMut(&str),
) -> Result<Generation, String> {
    let tokenizer = load_tokenizer(dir)?;
    let mut session = Session::load(dir, options)?;
    let encoding = tokenizer
        .encode(prompt, true)
        .map_err(|e| format!("cannot tokenize the prompt: {e}"))?;
    let mut prompt_ids: Vec<usize> = encoding.get_ids().iter().map(|&id| id as usize).collect();
    // Gemma expects a leading BOS; add it if the tokenizer's post-processor did not.
    if let Some(bos) = session.config().special_tokens.bos_token_id {
        if prompt_ids.first() != Some(&bos) {
            prompt_ids.insert(0, bos);
        }
    }
    let eos = session.config().special_tokens.eos_token_ids.clone();

    let mut logits = session.next_logits(&prompt_ids)?;
    let mut generated_ids = Vec::new();
    let mut text = String::new();
    for _ in 0..max_new_tokens {
        let next = gemma4_optimized::model::argmax(&logits);
        generated_ids.push(next);
        if eos.contains(&next) {
            break;
        }
        // Decode everything generated so far and emit the new suffix: pieces that only form
        // a character together (byte-fallback tokens) come out once complete.
        let ids: Vec<u32> = generated_ids
            .iter()
            .filter(|id| !eos.contains(id))
            .map(|&id| id as u32)
            .collect();
        let decoded = tokenizer
            .decode(&ids, true)
            .map_err(|e| format!("cannot decode the generated ids: {e}"))?;
        if decoded.len() > text.len()
            && decoded.starts_with(&text)
            && !decoded.ends_with('\u{FFFD}')
        {
            on_text(&decoded[text.len()..]);
            text = decoded;
        }
        logits = session.next_logits(&[next])?;
    }
    Ok(Generation {
        prompt_ids,
        generated_ids,
        text,
    })
}
