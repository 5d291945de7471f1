//! `gemma4 generate`: a prompt as people write it (text, or a chat rendered with the checkpoint's
//! template; images and audio in it) to streamed text, as Hugging Face's `generate` would produce
//! it: the checkpoint's tokenizer and BOS rule ([`crate::tokenizer`]), its chat template
//! ([`crate::chat_template`]), each image or audio placeholder expanded to BOI + one placeholder
//! per soft token + EOI as HF's processor does (multimodal spec §3.1), the soft tokens merged
//! before the prefill, then one token at a time through the KV cache, chosen greedily or by
//! seeded sampling ([`crate::sampling`], defaults from `generation_config.json`), until an
//! end-of-sequence id (`generation_config.json`, `config.json`, the tokenizer's EOS and `<turn|>`),
//! `--max-new-tokens`, the model's context, or a stop request (Ctrl-C).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use gemma4_optimized::linear::Precision;
use gemma4_optimized::{Gemma4Optimized, Logits};
use gemma4_reference::audio::tower::soft_tokens_of_frames;
use gemma4_reference::dump::Recorder;
use gemma4_reference::merge::Prompt;
use gemma4_reference::{Gemma4TextModel, ModelConfig};
use serde_json::Value;

use crate::chat_template::{ChatTemplate, RenderOptions};
use crate::engine::Engine;
use crate::prompt::{build_prompt, MediaOptions};
use crate::sampling::{GenerationConfig, Sampler, SamplingConfig};
use crate::tokenizer::{CheckpointTokenizer, TURN_END};

/// The prompt as given: text sent as is, or chat messages for the checkpoint's template.
#[derive(Clone, Debug)]
pub enum PromptText {
    /// Tokenized as is (BOS added per the tokenizer's config); images and audio are placed at
    /// the text's `<|image|>` / `<|audio|>` placeholders.
    Raw(String),
    /// A JSON array of `{role, content}` messages, rendered by the chat template with the
    /// generation prompt.
    Chat(Value),
}

/// What to generate from.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: PromptText,
    /// The image and audio files of the prompt's placeholders, in order.
    pub media: MediaOptions,
    /// Gemma 4's thinking mode (the template's `enable_thinking`).
    pub thinking: bool,
    /// Never put BOS in front (overrides the tokenizer's config).
    pub no_bos: bool,
}

/// Overrides of `generation_config.json`'s sampling settings (`None`: the checkpoint's value).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SamplingOverrides {
    /// Take the most likely token whatever the config says.
    pub greedy: bool,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

impl SamplingOverrides {
    /// `config` with these overrides applied; setting a sampling parameter turns sampling on.
    pub fn apply(&self, mut config: SamplingConfig) -> SamplingConfig {
        if let Some(t) = self.temperature {
            config.temperature = t;
            config.do_sample = true;
        }
        if let Some(k) = self.top_k {
            config.top_k = k;
            config.do_sample = true;
        }
        if let Some(p) = self.top_p {
            config.top_p = p;
            config.do_sample = true;
        }
        if let Some(p) = self.min_p {
            config.min_p = p;
            config.do_sample = true;
        }
        if let Some(r) = self.repetition_penalty {
            config.repetition_penalty = r;
        }
        if self.greedy {
            config.do_sample = false;
        }
        config
    }
}

/// How `generate` runs the model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GenerateOptions {
    /// Which implementation computes the logits.
    pub engine: Engine,
    /// Threads of the optimized engine (`None`: `RAYON_NUM_THREADS`, else one per core).
    pub threads: Option<usize>,
    /// Optimized engine, bf16 weights: the prompt's matrix products (the towers' included) on
    /// activations rounded to bf16 ([`Precision::Bf16Activations`]), as torch and llama.cpp do
    /// for bf16 models; not the reference's arithmetic.
    pub fast_prefill: bool,
    /// At most this many new tokens.
    pub max_new_tokens: usize,
    pub sampling: SamplingOverrides,
    /// Seed of the sampler's random stream.
    pub seed: u64,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            engine: Engine::Optimized,
            threads: None,
            fast_prefill: false,
            max_new_tokens: 64,
            sampling: SamplingOverrides::default(),
            seed: 0,
        }
    }
}

/// A prompt ready for the model: the text that was tokenized and the expanded ids with their
/// images and clips.
#[derive(Clone, Debug)]
pub struct PreparedPrompt {
    /// The text as tokenized (the rendered chat, or the raw prompt).
    pub text: String,
    /// The token ids before the expansion of placeholders.
    pub unexpanded: Vec<usize>,
    /// The expanded ids and the media.
    pub prompt: Prompt,
}

/// The checkpoint's files needed for text: tokenizer, template (for chat), generation config.
pub struct TextSide {
    pub tokenizer: CheckpointTokenizer,
    pub generation: GenerationConfig,
}

impl TextSide {
    pub fn load(dir: &Path, config: &ModelConfig) -> Result<Self, String> {
        Ok(TextSide {
            tokenizer: CheckpointTokenizer::load(dir, config.special_tokens.bos_token_id)?,
            generation: GenerationConfig::load(dir)?,
        })
    }
}

/// Renders (for chat), tokenizes and expands the request's prompt; reads and preprocesses its
/// images and clips. Errors: a template that fails, placeholder counts that do not match the
/// media, a prompt over the model's context, media for a model without that tower.
pub fn prepare_prompt(
    dir: &Path,
    config: &ModelConfig,
    text_side: &TextSide,
    request: &GenerateRequest,
) -> Result<PreparedPrompt, String> {
    let tokenizer = &text_side.tokenizer;
    let (text, chat) = match &request.prompt {
        PromptText::Raw(text) => (text.clone(), false),
        PromptText::Chat(messages) => {
            let template = ChatTemplate::load(dir)?;
            let options = RenderOptions {
                add_generation_prompt: true,
                enable_thinking: request.thinking,
                bos_token: tokenizer
                    .bos
                    .as_ref()
                    .map(|b| b.0.clone())
                    .unwrap_or_default(),
                eos_token: tokenizer
                    .eos
                    .as_ref()
                    .map(|e| e.0.clone())
                    .unwrap_or_default(),
            };
            (template.render(messages, &options)?, true)
        }
    };
    // A rendered chat carries its own BOS (HF tokenizes it without special tokens).
    let mut ids = tokenizer.encode(&text, !chat && !request.no_bos)?;
    if request.no_bos {
        if let (Some((_, bos)), Some(first)) = (&tokenizer.bos, ids.first()) {
            if first == bos {
                ids.remove(0);
            }
        }
    }
    if ids.is_empty() {
        return Err("the prompt is empty: nothing to generate from".into());
    }
    let unexpanded = ids.clone();
    let media = build_prompt(Vec::new(), &request.media).map_err(|e| e.to_string())?;
    let expanded = expand_placeholders(config, &ids, &media).map_err(|e| e.to_string())?;
    let limit = config.text.max_position_embeddings;
    if expanded.len() >= limit {
        return Err(format!(
            "the prompt is {} tokens{}, the model's context ({}: max_position_embeddings) is {limit}: shorten it",
            expanded.len(),
            if expanded.len() != unexpanded.len() {
                format!(" with its soft tokens ({} before expansion)", unexpanded.len())
            } else {
                String::new()
            },
            config.path.display()
        ));
    }
    Ok(PreparedPrompt {
        text,
        unexpanded,
        prompt: Prompt {
            tokens: expanded,
            ..media
        },
    })
}

/// Each image placeholder of `ids` (`image_token_id` of config.json) replaced by BOI + one
/// placeholder per soft token of the next image + EOI, and each audio placeholder likewise with
/// BOA/EOA and the next clip's count (`Gemma4Processor.replace_image_token` /
/// `replace_audio_token`, on ids instead of text: the markers are special tokens, so both give
/// the same ids). The number of placeholders must equal the number of images (clips).
pub fn expand_placeholders(
    config: &ModelConfig,
    ids: &[usize],
    media: &Prompt,
) -> gemma4_reference::Result<Vec<usize>> {
    let input = |message: String| gemma4_reference::Error::Input { message };
    let special = &config.special_tokens;
    let mut image_counts = Vec::new();
    if !media.images.is_empty() {
        let vision = config.vision.as_ref().ok_or_else(|| {
            input(format!(
                "{}: the model has no vision tower (no vision_config), but the prompt has {} image(s)",
                config.path.display(),
                media.images.len()
            ))
        })?;
        image_counts = media
            .images
            .iter()
            .map(|i| i.soft_tokens(vision.pooling_kernel_size))
            .collect();
    }
    let mut audio_counts = Vec::new();
    if !media.audio.is_empty() {
        if config.audio.is_none() {
            return Err(input(format!(
                "{}: the model has no audio tower (no audio_config), but the prompt has {} audio clip(s)",
                config.path.display(),
                media.audio.len()
            )));
        }
        for clip in &media.audio {
            audio_counts.push(soft_tokens_of_frames(clip.features()?.nrows()));
        }
    }
    let kinds = [
        (
            "image",
            "<|image|>",
            special.image_token_id,
            special.boi_token_id,
            special.eoi_token_id,
            &image_counts,
        ),
        (
            "audio",
            "<|audio|>",
            special.audio_token_id,
            special.boa_token_id,
            special.eoa_token_id,
            &audio_counts,
        ),
    ];
    for (kind, marker, placeholder, _, _, counts) in &kinds {
        let found = placeholder.map_or(0, |p| ids.iter().filter(|&&t| t == p).count());
        if found != counts.len() {
            return Err(input(format!(
                "the prompt has {found} {kind} placeholder(s) ({marker}) but {} {kind} input(s) were given; put one {marker} where each goes (--chat places them for you)",
                counts.len()
            )));
        }
    }
    let mut next = [0usize; 2];
    let mut out = Vec::with_capacity(ids.len());
    for &id in ids {
        let kind = kinds
            .iter()
            .position(|k| k.2 == Some(id) && !k.5.is_empty());
        match kind {
            Some(k) => {
                let (kind, _, placeholder, open, close, counts) = &kinds[k];
                let missing = |what: &str| {
                    input(format!(
                        "{}: no {what} for the {kind} placeholders",
                        config.path.display()
                    ))
                };
                out.push(open.ok_or_else(|| missing("begin marker id"))?);
                out.extend(std::iter::repeat_n(
                    placeholder.expect("matched"),
                    counts[next[k]],
                ));
                out.push(close.ok_or_else(|| missing("end marker id"))?);
                next[k] += 1;
            }
            None => out.push(id),
        }
    }
    Ok(out)
}

/// A loaded model and its KV cache, of either engine.
enum Session {
    Reference(Box<Gemma4TextModel>, gemma4_reference::kv_cache::KvCache),
    Optimized(Box<Gemma4Optimized>, gemma4_optimized::kv_cache::KvCache),
}

impl Session {
    fn load(dir: &Path, prompt: &Prompt, options: &GenerateOptions) -> Result<Session, String> {
        let text = |e: gemma4_reference::Error| e.to_string();
        Ok(match options.engine {
            Engine::Reference => {
                let model = Gemma4TextModel::load_for(dir, prompt).map_err(text)?;
                let cache = model.new_cache();
                Session::Reference(Box::new(model), cache)
            }
            Engine::Optimized => {
                let precision = if options.fast_prefill {
                    Precision::Bf16Activations
                } else {
                    Precision::F32
                };
                let model = Gemma4Optimized::load_for(dir, prompt, options.threads)
                    .map_err(text)?
                    .with_precision(precision);
                let cache = model.new_cache();
                Session::Optimized(Box::new(model), cache)
            }
        })
    }

    /// The prompt (soft tokens merged) through the model; the last position's logits.
    fn prefill(&mut self, prompt: &Prompt) -> Result<Vec<f32>, String> {
        let text = |e: gemma4_reference::Error| e.to_string();
        let mut recorder = Recorder::checking_only();
        match self {
            Session::Reference(model, cache) => {
                let embeddings = model.embed_prompt(prompt, &mut recorder).map_err(text)?;
                let logits = model
                    .forward_from_embeddings(embeddings, &prompt.tokens, cache, &mut recorder)
                    .map_err(text)?;
                Ok(logits.row(logits.nrows() - 1).to_vec())
            }
            Session::Optimized(model, cache) => {
                let embeddings = model.embed_prompt(prompt, &mut recorder).map_err(text)?;
                model
                    .forward_from_embeddings(
                        embeddings,
                        &prompt.tokens,
                        cache,
                        &mut recorder,
                        Logits::Last,
                    )
                    .map_err(text)
            }
        }
    }

    /// One token after everything before it; its logits.
    fn step(&mut self, id: usize) -> Result<Vec<f32>, String> {
        let text = |e: gemma4_reference::Error| e.to_string();
        match self {
            Session::Reference(model, cache) => {
                let logits = model
                    .forward(&[id], cache, &mut Recorder::checking_only())
                    .map_err(text)?;
                Ok(logits.row(0).to_vec())
            }
            Session::Optimized(model, cache) => model
                .forward(&[id], cache, &mut Recorder::checking_only(), Logits::Last)
                .map_err(text),
        }
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// An end-of-sequence or end-of-turn id (included in `generated_ids`).
    EndOfSequence,
    /// `--max-new-tokens` reached.
    MaxNewTokens,
    /// The model's context is full.
    ContextFull,
    /// A stop request (Ctrl-C).
    Interrupted,
}

/// What a generation produced, and how fast.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The prompt's ids as the model saw them (expanded).
    pub prompt_ids: Vec<usize>,
    /// The generated ids (an end-of-sequence id, if reached, is included).
    pub generated_ids: Vec<usize>,
    /// The generated text (special tokens left out).
    pub text: String,
    pub stop: StopReason,
    /// Seconds of the prefill (towers included) and of the decode steps.
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// Seconds to load the model.
    pub load_seconds: f64,
}

/// The stop ids: `generation_config.json`'s EOS ids, config.json's, the tokenizer's EOS and
/// `<turn|>` (Gemma 4's end of turn), deduplicated.
pub fn stop_ids(config: &ModelConfig, text_side: &TextSide) -> Vec<usize> {
    let mut ids = text_side.generation.eos_token_ids.clone();
    ids.extend(&config.special_tokens.eos_token_ids);
    ids.extend(text_side.tokenizer.eos.as_ref().map(|e| e.1));
    ids.extend(text_side.tokenizer.token_id(TURN_END));
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Generates after `prepared`: loads the model (`on_stage` is told when loading and the
/// prefill start), prefills, then decodes one token at a time, calling `on_text` with each new
/// piece of text as soon as it is whole UTF-8 (pieces of one character split over tokens come
/// out together). `stop` is polled between tokens.
#[allow(clippy::too_many_arguments)]
pub fn generate(
    dir: &Path,
    config: &ModelConfig,
    text_side: &TextSide,
    prepared: &PreparedPrompt,
    options: &GenerateOptions,
    stop: &AtomicBool,
    mut on_stage: impl FnMut(&str),
    mut on_text: impl FnMut(&str),
) -> Result<Generation, String> {
    let started = Instant::now();
    on_stage("loading the model");
    let mut session = Session::load(dir, &prepared.prompt, options)?;
    let load_seconds = started.elapsed().as_secs_f64();
    on_stage("reading the prompt");
    let sampling = options
        .sampling
        .apply(text_side.generation.sampling.clone());
    let mut sampler = Sampler::new(sampling, options.seed);
    let stops = stop_ids(config, text_side);
    let prompt_ids = prepared.prompt.tokens.clone();
    let context = config.text.max_position_embeddings;

    let t0 = Instant::now();
    let mut logits = session.prefill(&prepared.prompt)?;
    let prefill_seconds = t0.elapsed().as_secs_f64();
    on_stage("");

    let t1 = Instant::now();
    let mut sequence = prompt_ids.clone();
    let mut generated_ids = Vec::new();
    let mut stream = TextStream::new(&text_side.tokenizer);
    let mut reason = StopReason::MaxNewTokens;
    for step in 0..options.max_new_tokens {
        if stop.load(Ordering::Relaxed) {
            reason = StopReason::Interrupted;
            break;
        }
        let next = sampler.next(&logits, &sequence);
        generated_ids.push(next);
        sequence.push(next);
        if stops.contains(&next) {
            reason = StopReason::EndOfSequence;
            break;
        }
        if let Some(piece) = stream.push(next)? {
            on_text(&piece);
        }
        if step + 1 == options.max_new_tokens {
            break;
        }
        if sequence.len() >= context {
            reason = StopReason::ContextFull;
            break;
        }
        logits = session.step(next)?;
    }
    if let Some(rest) = stream.finish()? {
        on_text(&rest);
    }
    Ok(Generation {
        prompt_ids,
        generated_ids,
        text: stream.text,
        stop: reason,
        prefill_seconds,
        decode_seconds: t1.elapsed().as_secs_f64(),
        load_seconds,
    })
}

/// Generated text as it becomes whole: tokens are decoded together (special tokens left out)
/// and each new suffix is released only when it does not end in a replacement character, so a
/// character whose UTF-8 bytes come in several byte-fallback tokens comes out once, complete.
pub struct TextStream<'a> {
    tokenizer: &'a CheckpointTokenizer,
    ids: Vec<usize>,
    /// The text released so far.
    pub text: String,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a CheckpointTokenizer) -> Self {
        TextStream {
            tokenizer,
            ids: Vec::new(),
            text: String::new(),
        }
    }

    /// Adds a token; the new whole text, if any.
    pub fn push(&mut self, id: usize) -> Result<Option<String>, String> {
        self.ids.push(id);
        let decoded = self.tokenizer.decode(&self.ids, true)?;
        if decoded.len() > self.text.len()
            && decoded.starts_with(&self.text)
            && !decoded.ends_with('\u{FFFD}')
        {
            let piece = decoded[self.text.len()..].to_string();
            self.text = decoded;
            return Ok(Some(piece));
        }
        Ok(None)
    }

    /// At the end: whatever is still held back (an incomplete character, shown as decoded).
    pub fn finish(&mut self) -> Result<Option<String>, String> {
        let decoded = self.tokenizer.decode(&self.ids, true)?;
        if decoded.len() > self.text.len() && decoded.starts_with(&self.text) {
            let piece = decoded[self.text.len()..].to_string();
            self.text = decoded;
            return Ok(Some(piece));
        }
        Ok(None)
    }
}
