//! `gemma4 generate`: tokenize a prompt, decode greedily through the KV cache, stream the text.

use std::path::Path;

use gemma4_reference::dump::Recorder;
use gemma4_reference::model::argmax;
use gemma4_reference::Gemma4TextModel;
use tokenizers::Tokenizer;

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
/// (`eos_token_id` of config.json).
pub fn generate(
    dir: &Path,
    prompt: &str,
    max_new_tokens: usize,
    mut on_text: impl FnMut(&str),
) -> Result<Generation, String> {
    let tokenizer = load_tokenizer(dir)?;
    let model = Gemma4TextModel::load(dir).map_err(|e| e.to_string())?;
    let encoding = tokenizer
        .encode(prompt, true)
        .map_err(|e| format!("cannot tokenize the prompt: {e}"))?;
    let mut prompt_ids: Vec<usize> = encoding.get_ids().iter().map(|&id| id as usize).collect();
    // Gemma expects a leading BOS; add it if the tokenizer's post-processor did not.
    if let Some(bos) = model.config.special_tokens.bos_token_id {
        if prompt_ids.first() != Some(&bos) {
            prompt_ids.insert(0, bos);
        }
    }
    let eos = &model.config.special_tokens.eos_token_ids;

    let mut cache = model.new_cache();
    let mut logits = model
        .forward(&prompt_ids, &mut cache, &mut Recorder::checking_only())
        .map_err(|e| e.to_string())?;
    let mut generated_ids = Vec::new();
    let mut text = String::new();
    for _ in 0..max_new_tokens {
        let next = argmax(logits.row(logits.nrows() - 1));
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
        logits = model
            .forward(&[next], &mut cache, &mut Recorder::checking_only())
            .map_err(|e| e.to_string())?;
    }
    Ok(Generation {
        prompt_ids,
        generated_ids,
        text,
    })
}
