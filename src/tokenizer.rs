//! The checkpoint's tokenizer: `tokenizer.json` (the `tokenizers` crate) with the BOS rule of
//! `tokenizer_config.json`, and Gemma 4's special tokens looked up by their strings in the
//! checkpoint's own files (shared spec: multimodal §3.1; nothing here hard-codes an id).
//!
//! BOS: added in front when `add_bos_token` says so (Gemma's tokenizers do), never twice — a
//! text that already starts with the BOS token (a rendered chat template does) gets none, where
//! Hugging Face's `tokenizer(text)` would give two; `--no-bos` turns it off. Special tokens
//! written in the text (`<|turn>`, `<|image|>`, …) become their ids, as in Hugging Face.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::Tokenizer;

/// A checkpoint's tokenizer and its BOS rule.
pub struct CheckpointTokenizer {
    tokenizer: Tokenizer,
    /// `tokenizer.json`, for messages.
    pub path: PathBuf,
    /// Whether [`CheckpointTokenizer::encode`] puts BOS in front (`add_bos_token`).
    pub add_bos: bool,
    /// The BOS token and its id, if the tokenizer has one.
    pub bos: Option<(String, usize)>,
    /// The EOS token of `tokenizer_config.json` and its id, if any.
    pub eos: Option<(String, usize)>,
}

/// Gemma 4's end of turn, by its string in the tokenizer (the id from the checkpoint's files):
/// a stop token of chat generation.
pub const TURN_END: &str = "<turn|>";

impl CheckpointTokenizer {
    /// Loads `dir/tokenizer.json` and, if present, `dir/tokenizer_config.json` (`add_bos_token`,
    /// `bos_token`, `eos_token`). The BOS token is `bos_token`, else the tokenizer's `<bos>`, else
    /// the token of `model_bos` (config.json's `bos_token_id`); without `add_bos_token`, BOS is
    /// added when there is one, as Gemma's tokenizers do. Errors name the file and the field.
    pub fn load(dir: &Path, model_bos: Option<usize>) -> Result<Self, String> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(format!(
                "{}: missing; text prompts need the checkpoint's tokenizer (`dump --tokens` takes raw ids)",
                path.display()
            ));
        }
        let tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| format!("{}: not a usable tokenizer: {e}", path.display()))?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = if config_path.exists() {
            let text = std::fs::read_to_string(&config_path)
                .map_err(|e| format!("{}: {e}", config_path.display()))?;
            serde_json::from_str(&text)
                .map_err(|e| format!("{}: not JSON: {e}", config_path.display()))?
        } else {
            Value::Null
        };
        let token_field = |field: &str| -> Result<Option<(String, usize)>, String> {
            let content = match config.get(field) {
                None | Some(Value::Null) => return Ok(None),
                Some(Value::String(s)) => s.clone(),
                // An AddedToken object: {"content": "<bos>", ...}.
                Some(Value::Object(o)) => match o.get("content").and_then(Value::as_str) {
                    Some(s) => s.to_string(),
                    None => {
                        return Err(format!(
                            "{}: `{field}` has no `content`",
                            config_path.display()
                        ))
                    }
                },
                Some(other) => {
                    return Err(format!(
                        "{}: `{field}` should be a token string, found {other}",
                        config_path.display()
                    ))
                }
            };
            match tokenizer.token_to_id(&content) {
                Some(id) => Ok(Some((content, id as usize))),
                None => Err(format!(
                    "{}: `{field}` is {content:?}, which {} does not contain",
                    config_path.display(),
                    path.display()
                )),
            }
        };
        let bos = match token_field("bos_token")? {
            Some(bos) => Some(bos),
            None => tokenizer
                .token_to_id("<bos>")
                .map(|id| ("<bos>".to_string(), id as usize))
                .or_else(|| {
                    let id = model_bos?;
                    Some((tokenizer.id_to_token(id as u32).unwrap_or_default(), id))
                }),
        };
        let eos = token_field("eos_token")?;
        let add_bos = match config.get("add_bos_token") {
            None | Some(Value::Null) => bos.is_some(),
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(format!(
                    "{}: `add_bos_token` should be true or false, found {other}",
                    config_path.display()
                ))
            }
        };
        if add_bos && bos.is_none() {
            return Err(format!(
                "{}: `add_bos_token` is true but the tokenizer has no BOS token",
                config_path.display()
            ));
        }
        Ok(CheckpointTokenizer {
            tokenizer,
            path,
            add_bos,
            bos,
            eos,
        })
    }

    /// The token ids of `text`: special tokens in the text recognised, BOS in front if
    /// `add_bos` (and the checkpoint adds one) unless the text already starts with it.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<usize>, String> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| format!("{}: cannot tokenize the text: {e}", self.path.display()))?;
        let mut ids: Vec<usize> = encoding.get_ids().iter().map(|&id| id as usize).collect();
        if let (true, true, Some((_, bos))) = (add_bos, self.add_bos, &self.bos) {
            if ids.first() != Some(bos) {
                ids.insert(0, *bos);
            }
        }
        Ok(ids)
    }

    /// The text of `ids`; special tokens dropped if `skip_special`.
    pub fn decode(&self, ids: &[usize], skip_special: bool) -> Result<String, String> {
        let ids: Vec<u32> = ids.iter().map(|&id| id as u32).collect();
        self.tokenizer
            .decode(&ids, skip_special)
            .map_err(|e| format!("{}: cannot decode ids: {e}", self.path.display()))
    }

    /// The id of the token `content` (a special token's string), if the tokenizer has it.
    pub fn token_id(&self, content: &str) -> Option<usize> {
        self.tokenizer.token_to_id(content).map(|id| id as usize)
    }

    /// The string of token `id`, if any.
    pub fn token(&self, id: usize) -> Option<String> {
        self.tokenizer.id_to_token(id as u32)
    }
}
