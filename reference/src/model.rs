//! The Gemma 4 text decoder, top to bottom (shared spec: text §4, §10, §11, §12).
//!
//! ```text
//! ids ──► scaled embedding x⁰ ──► PLE tensor ple [T, L, P]      (E2B / E4B)
//!      ──► L decoder layers (layer plan: sliding/full, KV sharing, MoE, PLE)
//!      ──► RMSNorm_{norm} ──► logits = h · embed_tokensᵀ ──► c·tanh(logits / c)
//! ```
//!
//! Positions continue from the cache: a forward pass over `T` new tokens after `S` cached ones
//! uses positions `S..S+T`, so a prefill followed by single-token steps equals one full pass.

use std::path::Path;

use ndarray::{s, Array1, Array2, ArrayView1};

use crate::audio::tower::{soft_tokens_of_frames, AudioTower};
use crate::checkpoint::Checkpoint;
use crate::compute_dtype::ComputeDtype;
use crate::config::{AttentionType, CheckpointLayout, ModelConfig, RopeParameters};
use crate::decoder_layer::decoder_layer;
use crate::dump::{input_ids_tensor, ActivationDump, Recorder, TensorFilter};
use crate::embedding::{embedding_scale, scaled_embedding};
use crate::error::{Error, Result};
use crate::faults::{fault_active, Fault};
use crate::kv_cache::KvCache;
use crate::layer_plan::ModelPlan;
use crate::mask::ImageBlocks;
use crate::memory::{array_bytes, available_memory};
use crate::memory_plan::{memory_limit, MemoryPlan};
use crate::merge::{
    audio_placeholder_runs, clip_prefix, image_placeholder_runs, merge_soft_tokens, Prompt,
};
use crate::ple::per_layer_inputs;
use crate::rms_norm::rms_norm;
use crate::rope::inverse_frequencies;
use crate::vision::VisionTower;
use crate::weight_stream::{DecoderWeights, Residence};

/// A loaded Gemma 4 model: config, layer plan and f32 weights of the text decoder (in memory,
/// or streamed from disk layer by layer: [`crate::weight_stream`]), and the towers when they
/// were asked for ([`Gemma4TextModel::load_for`]).
pub struct Gemma4TextModel {
    pub config: ModelConfig,
    pub plan: ModelPlan,
    pub weights: DecoderWeights,
    /// The vision tower, loaded only for prompts with images.
    pub vision: Option<VisionTower>,
    /// The audio tower, loaded only for prompts with audio.
    pub audio: Option<AudioTower>,
    /// The arithmetic this run imitates: which dtype the embedding scales are rounded to
    /// ([`ComputeDtype`]; float32 unless declared otherwise).
    pub compute_dtype: ComputeDtype,
    /// The memory plan the model was loaded under ([`Gemma4TextModel::load_with`]).
    pub memory_plan: Option<MemoryPlan>,
}

/// How a run wants the model loaded: where the weights live, and what the run will do (for its
/// memory plan, checked before the first weight is read).
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// In memory, streamed, or whichever fits ([`Residence::Auto`]).
    pub residence: Residence,
    /// Greedy steps the run will take (they grow the KV cache and the dump).
    pub decode_steps: usize,
    /// The dump tensors the run keeps.
    pub tensors: TensorFilter,
}

impl Gemma4TextModel {
    /// Loads `dir/config.json` and the checkpoint's text weights, in memory.
    pub fn load(dir: &Path) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        let checkpoint = Checkpoint::open(dir)?;
        Self::from_checkpoint(config, checkpoint, Residence::InMemory)
    }

    /// Derives the layer plan of `config` and loads the text weights it needs from `checkpoint`
    /// (in memory, or opened for streaming; `Auto` loads them in memory).
    pub fn from_checkpoint(
        config: ModelConfig,
        checkpoint: Checkpoint,
        residence: Residence,
    ) -> Result<Self> {
        let plan = ModelPlan::from_config(&config.text);
        let streamed = residence == Residence::Streamed;
        let weights = DecoderWeights::load(checkpoint, &config, &plan, streamed)?;
        Ok(Gemma4TextModel {
            config,
            plan,
            weights,
            vision: None,
            audio: None,
            compute_dtype: ComputeDtype::Float32,
            memory_plan: None,
        })
    }

    /// Where the text weights are: in memory or streamed from disk.
    pub fn residence(&self) -> Residence {
        if self.weights.is_streamed() {
            Residence::Streamed
        } else {
            Residence::InMemory
        }
    }

    /// Loads `dir` with the towers `prompt` needs: the text decoder, and the vision tower when
    /// the prompt has images (an error naming what is missing if the checkpoint has none). The
    /// weights go in memory when they fit ([`LoadOptions`] with `Auto`).
    pub fn load_for(dir: &Path, prompt: &Prompt) -> Result<Self> {
        Self::load_with(dir, prompt, &LoadOptions::default())
    }

    /// [`Gemma4TextModel::load_for`] with explicit options: the run's [`MemoryPlan`] is made
    /// from the config alone and checked against the memory limit
    /// ([`crate::memory_plan::memory_limit`]) before any weight is read; `Auto` picks in memory
    /// when that fits, else streamed; a plan that does not fit at all is an error giving its
    /// parts.
    pub fn load_with(dir: &Path, prompt: &Prompt, options: &LoadOptions) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        let checkpoint = Checkpoint::open(dir)?;
        let plan = ModelPlan::from_config(&config.text);
        let memory = MemoryPlan::of_dump(
            &config,
            &plan,
            prompt,
            options.decode_steps,
            &options.tensors,
        );
        let residence = memory
            .choose(options.residence, memory_limit())
            .map_err(|e| Error::input(format!("model {}: {e}", dir.display())))?;
        // The towers read the checkpoint before the text decoder may take it over.
        let vision = (!prompt.images.is_empty())
            .then(|| VisionTower::load(&checkpoint, &config))
            .transpose()?;
        let audio = (!prompt.audio.is_empty())
            .then(|| AudioTower::load(&checkpoint, &config))
            .transpose()?;
        let mut model = Self::from_checkpoint(config, checkpoint, residence)?;
        model.vision = vision;
        model.audio = audio;
        model.memory_plan = Some(memory);
        Ok(model)
    }

    /// The same model imitating a `compute` run ([`ComputeDtype`]).
    pub fn with_compute_dtype(mut self, compute: ComputeDtype) -> Self {
        self.compute_dtype = compute;
        self
    }

    /// An empty KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.text.num_hidden_layers)
    }

    /// Checks token ids against the vocabularies: non-empty, every id `< vocab_size` (and
    /// `< vocab_size_per_layer_input` where the PLE table is read).
    pub fn validate_token_ids(&self, token_ids: &[usize]) -> Result<()> {
        validate_token_ids(&self.config, token_ids)
    }

    /// Ids for the embedding lookups: placeholders read the pad row (multimodal spec §3.2).
    fn embedding_token_ids(&self, token_ids: &[usize]) -> Vec<usize> {
        embedding_token_ids(&self.config, token_ids)
    }

    /// Ids for the PLE table: placeholders use the pad row (text §4).
    fn ple_token_ids(&self, token_ids: &[usize]) -> Vec<usize> {
        ple_token_ids(&self.config, token_ids)
    }

    /// The scaled main embedding `x⁰` `[T, D]` (text §4): the table's rows of the tokens
    /// (read from disk for a streamed model), times `√D`.
    pub fn embed(&self, token_ids: &[usize]) -> Result<Array2<f32>> {
        let scale = embedding_scale(self.config.text.hidden_size, self.compute_dtype);
        let rows = self
            .weights
            .embedding_rows(&self.embedding_token_ids(token_ids))?;
        Ok(scaled_embedding(rows.view(), scale))
    }

    /// RoPE parameters of a layer type (with the `rope_theta_swapped` fault applied if on).
    fn rope_of(&self, kind: AttentionType) -> RopeParameters {
        let text = &self.config.text;
        let (own, other) = match kind {
            AttentionType::Sliding => (&text.rope_sliding, &text.rope_full),
            AttentionType::Full => (&text.rope_full, &text.rope_sliding),
        };
        let mut rope = own.clone();
        if fault_active(Fault::RopeThetaSwapped) {
            rope.theta = other.theta;
        }
        rope
    }

    /// The embeddings of a prompt `[T, D]`: text tokens scaled by `√D`, each image (audio clip)
    /// encoded by the vision (audio) tower and its soft tokens written over its run of
    /// placeholders (multimodal §3.2). The towers' tensors and `embeddings` go to `recorder`.
    pub fn embed_prompt(&self, prompt: &Prompt, recorder: &mut Recorder) -> Result<Array2<f32>> {
        self.validate_token_ids(&prompt.tokens)?;
        let mut embeddings = self.embed(&prompt.tokens)?;
        if !prompt.images.is_empty() {
            let vision = self.vision.as_ref().ok_or_else(|| {
                Error::input(
                    "the prompt has images but the vision tower was not loaded (load the model with Gemma4TextModel::load_for)",
                )
            })?;
            let kernel = vision.config.pooling_kernel_size;
            let counts: Vec<usize> = prompt
                .images
                .iter()
                .map(|i| i.soft_tokens(kernel))
                .collect();
            let runs = image_placeholder_runs(&self.config, &prompt.tokens, &counts)?;
            let count = prompt.images.len();
            let soft_tokens = prompt
                .images
                .iter()
                .enumerate()
                .map(|(i, image)| vision.encode(image, &clip_prefix("vision", i, count), recorder))
                .collect::<Result<Vec<_>>>()?;
            merge_soft_tokens(&mut embeddings, &runs, &soft_tokens);
        }
        if !prompt.audio.is_empty() {
            let audio = self.audio.as_ref().ok_or_else(|| {
                Error::input(
                    "the prompt has audio but the audio tower was not loaded (load the model with Gemma4TextModel::load_for)",
                )
            })?;
            // The front end (from waveforms) runs here, under whatever faults are on.
            let features = prompt
                .audio
                .iter()
                .map(|clip| clip.features())
                .collect::<Result<Vec<_>>>()?;
            let counts: Vec<usize> = features
                .iter()
                .map(|features| soft_tokens_of_frames(features.nrows()))
                .collect();
            let runs = audio_placeholder_runs(&self.config, &prompt.tokens, &counts)?;
            let count = prompt.audio.len();
            let soft_tokens = features
                .iter()
                .enumerate()
                .map(|(i, features)| {
                    audio.encode(features, &clip_prefix("audio", i, count), recorder)
                })
                .collect::<Result<Vec<_>>>()?;
            merge_soft_tokens(&mut embeddings, &runs, &soft_tokens);
        }
        recorder.record("embeddings", embeddings.view().into_dyn())?;
        Ok(embeddings)
    }

    /// Runs `token_ids` (new tokens, after whatever `cache` holds) through the decoder and
    /// returns the logits `[T, V]`. Every intermediate goes to `recorder`.
    pub fn forward(
        &self,
        token_ids: &[usize],
        cache: &mut KvCache,
        recorder: &mut Recorder,
    ) -> Result<Array2<f32>> {
        self.validate_token_ids(token_ids)?;
        let embeddings = self.embed(token_ids)?;
        recorder.record("embeddings", embeddings.view().into_dyn())?;
        self.forward_from_embeddings(embeddings, token_ids, cache, recorder)
    }

    /// The decoder after the embedding: `embeddings` `[T, D]` (soft tokens already merged in) and
    /// the token ids they came from (for the PLE table).
    pub fn forward_from_embeddings(
        &self,
        embeddings: Array2<f32>,
        token_ids: &[usize],
        cache: &mut KvCache,
        recorder: &mut Recorder,
    ) -> Result<Array2<f32>> {
        let text = &self.config.text;
        let tokens = embeddings.nrows();
        let first_position = cache.tokens_seen();
        let positions: Vec<usize> = (first_position..first_position + tokens).collect();
        // Image blocks attend bidirectionally on sliding layers ("vision" models).
        let blocks = ImageBlocks::of(&self.config, token_ids, first_position);

        // Per-Layer Embeddings, computed once for all layers.
        let ple = match self.weights.per_layer_embeddings() {
            Some(ple_weights) if !fault_active(Fault::PleMissing) => {
                let table_rows = self
                    .weights
                    .per_layer_rows(&self.ple_token_ids(token_ids))?
                    .expect("a model with PLE weights has a PLE table");
                let ple = per_layer_inputs(
                    table_rows.view(),
                    &embeddings,
                    ple_weights,
                    text.num_hidden_layers,
                    text.rms_norm_eps,
                    self.compute_dtype,
                );
                recorder.record("per_layer_inputs", ple.view().into_dyn())?;
                Some(ple)
            }
            _ => None,
        };

        let rope_tables: Vec<Vec<f32>> = self
            .plan
            .layers
            .iter()
            .map(|layer| inverse_frequencies(&self.rope_of(layer.attention_type), layer.head_dim))
            .collect();

        let mut hidden = embeddings;
        for layer in &self.plan.layers {
            // A streamed model reads this layer's weights now and drops them after it.
            let weights = self.weights.layer(layer)?;
            let layer_input = ple.as_ref().map(|p| p.slice(s![.., layer.index, ..]));
            hidden = decoder_layer(
                layer,
                &weights,
                text,
                &hidden,
                layer_input,
                &positions,
                &rope_tables[layer.index],
                &blocks,
                cache,
                recorder,
            )?;
        }
        cache.advance(tokens);

        let normed = rms_norm(&hidden, self.weights.final_norm(), text.rms_norm_eps);
        recorder.record("final_norm", normed.view().into_dyn())?;
        // Tied LM head: the embedding table, without the √D scale (text §11).
        let mut logits = self
            .weights
            .lm_head(normed.view(), text.tie_word_embeddings)?;
        if let (Some(cap), false) = (
            text.final_logit_softcapping,
            fault_active(Fault::SoftcapMissing),
        ) {
            let cap = cap as f32;
            logits.mapv_inplace(|z| cap * (z / cap).tanh());
        }
        recorder.record("logits", logits.view().into_dyn())?;
        Ok(logits)
    }

    /// The full activation dump of shared contracts §2 for `token_ids`, plus, when
    /// `decode_steps = N > 0`, greedy decoding through the KV cache as Hugging Face
    /// `generate(output_logits=True)` records it (see [`greedy_steps`]): `decode_logits` `[N, V]`
    /// holds the logits row that chose each generated token and `greedy_continuation` `[N]`
    /// the tokens `f₀ … f_{N−1}`.
    pub fn dump(&self, token_ids: &[usize], decode_steps: usize) -> Result<ActivationDump> {
        self.dump_prompt(&Prompt::text(token_ids), decode_steps)
    }

    /// [`Gemma4TextModel::dump`] of a prompt with images: the vision tensors of each image, then
    /// the text tensors of the merged sequence, then the decode rows.
    pub fn dump_prompt(&self, prompt: &Prompt, decode_steps: usize) -> Result<ActivationDump> {
        self.dump_prompt_keeping(prompt, decode_steps, &TensorFilter::all())
    }

    /// [`Gemma4TextModel::dump_prompt`] keeping only the tensors `filter` selects (and
    /// `input_ids`): every tensor is still computed and checked.
    pub fn dump_prompt_keeping(
        &self,
        prompt: &Prompt,
        decode_steps: usize,
        filter: &TensorFilter,
    ) -> Result<ActivationDump> {
        let mut dump = ActivationDump::new();
        dump.insert_i64("input_ids", input_ids_tensor(&prompt.tokens));
        let mut cache = self.new_cache();
        let mut recorder = Recorder::new(&mut dump).keeping(filter);
        // `embed_prompt` validates the token ids first.
        let embeddings = self.embed_prompt(prompt, &mut recorder)?;
        let logits =
            self.forward_from_embeddings(embeddings, &prompt.tokens, &mut cache, &mut recorder)?;
        if decode_steps > 0 {
            let (decode_logits, continuation) =
                self.greedy_decode(&logits, &mut cache, decode_steps)?;
            dump.insert_f32("decode_logits", decode_logits.into_dyn());
            dump.insert_i64(
                "greedy_continuation",
                continuation.mapv(|t| t as i64).into_dyn(),
            );
        }
        dump.retain(filter);
        Ok(dump)
    }

    /// Greedy decoding after a prefill whose logits are `prefill_logits` and whose keys and
    /// values are in `cache` ([`greedy_steps`]: `N − 1` single-token steps through the cache).
    /// Returns `decode_logits` `[N, V]` and `greedy_continuation` `[N]`.
    pub fn greedy_decode(
        &self,
        prefill_logits: &Array2<f32>,
        cache: &mut KvCache,
        steps: usize,
    ) -> Result<(Array2<f32>, Array1<usize>)> {
        greedy_steps(
            prefill_logits.row(prefill_logits.nrows() - 1),
            self.config.text.vocab_size,
            steps,
            |next| {
                let logits = self.forward(&[next], cache, &mut Recorder::checking_only())?;
                Ok(logits.row(0).to_owned())
            },
        )
    }
}

/// The greedy decoding loop of a dump (shared with the optimized engine), in the convention of
/// Hugging Face `generate(output_logits=True)`, llama.cpp's and mistral.rs's generation loops
/// and DeepMind's sampler: one logits row per generated token.
///
/// ```text
/// decode_logits[0] = last_logits                       (the prefill's last row)
/// f₀               = argmax(decode_logits[0])
/// decode_logits[s] = forward_one(f_{s−1})  for s ≥ 1   (position T + s − 1, through the cache)
/// f_s              = argmax(decode_logits[s])
/// ```
///
/// `forward_one(token)` returns the next position's logits `[V]`; it runs `N − 1` times (the
/// last generated token is chosen, not fed). Returns `decode_logits` `[N, V]` and
/// `greedy_continuation` `[N]` = `f₀ … f_{N−1}`.
pub fn greedy_steps(
    last_logits: ArrayView1<f32>,
    vocab: usize,
    steps: usize,
    mut forward_one: impl FnMut(usize) -> Result<Array1<f32>>,
) -> Result<(Array2<f32>, Array1<usize>)> {
    check_decode_logits_fit(steps, vocab)?;
    let mut decode_logits = Array2::<f32>::zeros((steps, vocab));
    let mut continuation = Array1::<usize>::zeros(steps);
    for step in 0..steps {
        let logits = if step == 0 {
            last_logits.to_owned()
        } else {
            forward_one(continuation[step - 1])?
        };
        decode_logits.row_mut(step).assign(&logits);
        continuation[step] = argmax(logits.view());
    }
    Ok((decode_logits, continuation))
}

/// Refuses `steps` decode steps whose `[steps, vocab]` f32 logits would not fit in the memory
/// available, before allocating them. Shared with the optimized engine.
pub fn check_decode_logits_fit(steps: usize, vocab: usize) -> Result<()> {
    let bytes = array_bytes(&[steps, vocab], 4);
    if bytes.is_none_or(|b| available_memory().is_some_and(|available| b > available)) {
        return Err(Error::input(format!(
            "{steps} decode steps need a [{steps}, {vocab}] f32 logits array ({} bytes), \
             more than the memory available",
            bytes.map_or("too many".to_string(), |b| b.to_string())
        )));
    }
    Ok(())
}

/// Checks token ids against the vocabularies of `config`: non-empty, every id `< vocab_size`
/// (and `< vocab_size_per_layer_input` where the PLE table is read). Shared with the optimized
/// engine, so that both reject the same inputs with the same message.
pub fn validate_token_ids(config: &ModelConfig, token_ids: &[usize]) -> Result<()> {
    let text = &config.text;
    if token_ids.is_empty() {
        return Err(Error::input(
            "the token list is empty; at least one token id is needed",
        ));
    }
    // Placeholders are looked up as the pad token, so only the ids actually read count.
    for (position, &id) in embedding_token_ids(config, token_ids).iter().enumerate() {
        if id >= text.vocab_size {
            return Err(Error::input(format!(
                "token id {id} at position {position} is outside the vocabulary (vocab_size = {})",
                text.vocab_size
            )));
        }
    }
    if text.hidden_size_per_layer_input > 0 {
        for (position, &id) in ple_token_ids(config, token_ids).iter().enumerate() {
            if id >= text.vocab_size_per_layer_input {
                return Err(Error::input(format!(
                    "token id {id} at position {position} has no Per-Layer Embedding row (vocab_size_per_layer_input = {})",
                    text.vocab_size_per_layer_input
                )));
            }
        }
    }
    Ok(())
}

/// Is `id` a multimodal soft-token placeholder (image, video or audio)? Only the
/// conditional-generation model treats them specially (multimodal spec §3.2).
pub fn is_placeholder(config: &ModelConfig, id: usize) -> bool {
    let tokens = &config.special_tokens;
    config.layout == CheckpointLayout::ConditionalGeneration
        && [
            tokens.image_token_id,
            tokens.video_token_id,
            tokens.audio_token_id,
        ]
        .contains(&Some(id))
}

/// Ids for the embedding lookups: placeholders read the pad row (multimodal spec §3.2).
pub fn embedding_token_ids(config: &ModelConfig, token_ids: &[usize]) -> Vec<usize> {
    let pad = config.text.pad_token_id;
    token_ids
        .iter()
        .map(|&id| if is_placeholder(config, id) { pad } else { id })
        .collect()
}

/// Ids for the PLE table: placeholders use the pad row (text §4).
pub fn ple_token_ids(config: &ModelConfig, token_ids: &[usize]) -> Vec<usize> {
    if fault_active(Fault::PlePlaceholderNotPad) {
        return token_ids.to_vec();
    }
    embedding_token_ids(config, token_ids)
}

/// Index of the largest value (the first one on ties, as `torch.argmax`). NaN entries are
/// skipped (a candidate dump may hold some; our own logits are checked finite before), and an
/// all-NaN or empty row gives 0.
pub fn argmax(values: ndarray::ArrayView1<f32>) -> usize {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in values.iter().enumerate() {
        if !v.is_nan() && best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map_or(0, |(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::argmax;
    use ndarray::ArrayView1;

    #[test]
    fn argmax_first_maximum_skipping_nan() {
        let at = |v: &[f32]| argmax(ArrayView1::from(v));
        assert_eq!(at(&[1.0, 3.0, 3.0, 2.0]), 1, "first of tied maxima");
        assert_eq!(at(&[f32::NAN, 1.0, 5.0]), 2, "a leading NaN is skipped");
        assert_eq!(at(&[0.5, f32::NAN, -1.0]), 0);
        assert_eq!(at(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
        assert_eq!(at(&[f32::NAN, f32::NAN]), 0, "all NaN");
        assert_eq!(at(&[]), 0, "empty");
    }
}
