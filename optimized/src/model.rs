//! The Gemma 4 text decoder, fast (shared spec: text §4, §10, §11, §12).
//!
//! ```text
//! ids ──► scaled embedding x⁰ ──► PLE tensor ple [T, L, P]      (E2B / E4B; rows read from disk)
//!      ──► L decoder layers (layer plan: sliding/full, KV sharing, MoE, PLE)
//!      ──► RMSNorm_{norm} ──► logits = h · embed_tokensᵀ ──► c·tanh(logits / c)
//! ```
//!
//! Same model as `gemma4_reference::model`, same validation (config, plan, checkpoint, token
//! ids: the reference's own code), same dump. Faster because weights stay as stored and
//! memory-mapped, kernels are SIMD/GEMM and multi-threaded, the KV cache is a ring on sliding
//! layers and one tensor on K=V layers, MoE runs only the chosen experts, and — when only the
//! last position's logits are wanted ([`Logits::Last`], prefill for generation) — the KV-shared
//! layers and the LM head run on the last position only: consumer layers write no cache, so the
//! other positions' outputs there feed nothing but their own logits (HF `logits_to_keep=1`).
//! The same holds for the last layer that does write a cache, after its key/value projections:
//! its queries, attention output, MLP and PLE branch run on the last position only.
//! A dump ([`Logits::All`]) computes every position of every layer.
//!
//! Images (shared spec: multimodal §3): [`Gemma4Optimized::load_for`] maps the vision tower when a
//! prompt has images; [`Gemma4Optimized::embed_prompt`] encodes each image
//! ([`crate::vision::VisionTower`]) and writes its soft tokens over its run of placeholders (the
//! reference's `image_placeholder_runs` and `merge_soft_tokens`); the PLE's token part reads the
//! pad row at placeholders and its context part the merged embeddings; on `"vision"` models the
//! image blocks attend bidirectionally on sliding layers ([`crate::mask::ImageBlocks`], in every
//! attention path: blocked prefill, per-query, decode through the cache). Audio the same way:
//! the audio tower is mapped when the prompt has clips, each clip is encoded
//! ([`crate::audio::AudioTower`]) and its soft tokens fill its run of audio placeholders (the
//! reference's `audio_placeholder_runs`), images first, then clips, as the reference does.
//!
//! Precision: matrix products run in f32 ([`Precision::F32`], the default); a model may opt in to
//! [`Precision::Bf16Activations`] for its prefill products ([`Gemma4Optimized::with_precision`]),
//! which [`Gemma4Optimized::dump`] never uses.
//!
//! Threads: one rayon pool per model, of `threads` threads (default: `RAYON_NUM_THREADS`, else
//! one per core). Work is split into fixed blocks, so results do not depend on the thread count.

use std::path::Path;

use gemma4_reference::checkpoint::Checkpoint;
use gemma4_reference::compute_dtype::ComputeDtype;
use gemma4_reference::dump::{input_ids_tensor, ActivationDump, Recorder, TensorFilter};
use gemma4_reference::embedding::embedding_scale;
use gemma4_reference::error::Error;
use gemma4_reference::faults::with_faults;
use gemma4_reference::merge::{
    audio_placeholder_runs, clip_prefix, image_placeholder_runs, merge_soft_tokens, Prompt,
};
use gemma4_reference::model::{
    embedding_token_ids, greedy_steps, ple_token_ids, validate_token_ids,
};
use gemma4_reference::rope::inverse_frequencies;
use gemma4_reference::{ModelConfig, ModelPlan, Result};
use ndarray::{Array1, Array2, ArrayView1};
use rayon::prelude::*;

use crate::attention::record;
use crate::audio::{soft_tokens_of_frames, AudioTower};
use crate::checkpoint::TextWeights;
use crate::decoder_layer::decoder_layer;
use crate::embedding::scaled_embedding;
use crate::kv_cache::KvCache;
use crate::linear::{linear, with_precision, Precision};
use crate::mask::ImageBlocks;
use crate::ple::per_layer_inputs;
use crate::rms_norm::rms_norm;
use crate::rope::RopeTable;
use crate::vision::VisionTower;

/// Which positions' logits a forward pass must produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Every position, every layer (dumps, tests).
    All,
    /// Only the last position (generation): KV-shared layers and the LM head skip the rest.
    Last,
}

/// A loaded Gemma 4 text model, weights as stored.
pub struct Gemma4Optimized {
    pub config: ModelConfig,
    pub plan: ModelPlan,
    pub weights: TextWeights,
    /// `√D` in the compute dtype.
    embed_scale: f32,
    /// `√P` in the compute dtype.
    ple_token_scale: f32,
    /// The arithmetic this run imitates (the dtype of the two scales above).
    compute_dtype: ComputeDtype,
    /// The distinct RoPE inverse-frequency tables (one per attention type)...
    inverse_frequencies: Vec<Vec<f32>>,
    /// ... and which one each layer uses.
    rope_of_layer: Vec<usize>,
    /// Arithmetic of the prefill matrix products in [`Gemma4Optimized::forward`].
    precision: Precision,
    /// The vision tower, mapped only for prompts with images ([`Gemma4Optimized::load_for`]).
    pub vision: Option<VisionTower>,
    /// The audio tower, mapped only for prompts with audio ([`Gemma4Optimized::load_for`]).
    pub audio: Option<AudioTower>,
    pool: rayon::ThreadPool,
    /// The mapped checkpoint files the weights point into. Declared last: dropped after them.
    _checkpoint: Checkpoint,
}

impl Gemma4Optimized {
    /// Loads `dir` with the default thread count (`RAYON_NUM_THREADS`, else one per core).
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_with_threads(dir, None)
    }

    /// Loads `dir/config.json` and maps the checkpoint, validating everything exactly as the
    /// reference does; `threads` sizes the model's thread pool.
    pub fn load_with_threads(dir: &Path, threads: Option<usize>) -> Result<Self> {
        // The reference's fault switches are for the reference only: everything reused from it
        // runs with no fault active.
        with_faults(&[], || {
            let config = ModelConfig::from_dir(dir)?;
            let plan = ModelPlan::from_config(&config.text);
            let checkpoint = Checkpoint::open(dir)?;
            let weights = TextWeights::load(&checkpoint, &config, &plan)?;
            let compute_dtype = ComputeDtype::Float32;
            let (embed_scale, ple_token_scale) = embedding_scales(&config, compute_dtype);
            let mut inverse_frequencies_of_types: Vec<Vec<f32>> = Vec::new();
            let rope_of_layer = plan
                .layers
                .iter()
                .map(|layer| {
                    let table = inverse_frequencies(&layer.rope, layer.head_dim);
                    let known = inverse_frequencies_of_types
                        .iter()
                        .position(|t| *t == table);
                    known.unwrap_or_else(|| {
                        inverse_frequencies_of_types.push(table);
                        inverse_frequencies_of_types.len() - 1
                    })
                })
                .collect();
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads.unwrap_or(0))
                .thread_name(|i| format!("gemma4-optimized-{i}"))
                .build()
                .map_err(|e| Error::Input {
                    message: format!("cannot start {threads:?} threads: {e}"),
                })?;
            Ok(Gemma4Optimized {
                config,
                plan,
                weights,
                embed_scale,
                ple_token_scale,
                compute_dtype,
                inverse_frequencies: inverse_frequencies_of_types,
                rope_of_layer,
                precision: Precision::F32,
                vision: None,
                audio: None,
                pool,
                _checkpoint: checkpoint,
            })
        })
    }

    /// Loads `dir` with the towers `prompt` needs: the text decoder, the vision tower when the
    /// prompt has images, the audio tower when it has audio (in the reference's order, with its
    /// errors: a checkpoint without the tower is named as such). `threads` sizes the model's
    /// thread pool.
    pub fn load_for(dir: &Path, prompt: &Prompt, threads: Option<usize>) -> Result<Self> {
        let mut model = Self::load_with_threads(dir, threads)?;
        if !prompt.images.is_empty() {
            let vision = with_faults(&[], || VisionTower::load(&model._checkpoint, &model.config))?;
            model.vision = Some(vision);
        }
        if !prompt.audio.is_empty() {
            let audio = with_faults(&[], || AudioTower::load(&model._checkpoint, &model.config))?;
            model.audio = Some(audio);
        }
        Ok(model)
    }

    /// Threads in this model's pool.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// This model with its prefill matrix products in `precision` (default [`Precision::F32`]).
    /// [`Precision::Bf16Activations`] is an opt-in fast mode for generation, not the
    /// reference's arithmetic; [`Gemma4Optimized::dump`] ignores it and always runs in f32.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// This model imitating a `compute` run: the embedding scales `√D` and `√P` rounded to that
    /// dtype (`gemma4_reference::compute_dtype`; float32 unless declared otherwise).
    pub fn with_compute_dtype(mut self, compute: ComputeDtype) -> Self {
        (self.embed_scale, self.ple_token_scale) = embedding_scales(&self.config, compute);
        self.compute_dtype = compute;
        self
    }

    /// The arithmetic this run imitates.
    pub fn compute_dtype(&self) -> ComputeDtype {
        self.compute_dtype
    }

    /// The precision of [`Gemma4Optimized::forward`]'s matrix products.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Bytes of weights one decode step reads: every layer matrix (of MoE experts, only the `k`
    /// chosen of `E`), the PLE projection and the LM head; not the embedding or PLE tables, of
    /// which one row is read. Divided by the memory bandwidth, this bounds decode speed.
    pub fn decode_weight_bytes(&self) -> u64 {
        let mut bytes = 0usize;
        for layer in &self.weights.layers {
            let a = &layer.attention;
            bytes += a.q_proj.bytes() + a.o_proj.bytes();
            bytes += a.k_proj.as_ref().map_or(0, |m| m.bytes())
                + a.v_proj.as_ref().map_or(0, |m| m.bytes());
            bytes += layer.mlp.gate_proj.bytes()
                + layer.mlp.up_proj.bytes()
                + layer.mlp.down_proj.bytes();
            if let Some(ple) = &layer.per_layer_embedding {
                bytes += ple.input_gate.bytes() + ple.projection.bytes();
            }
            if let (Some(moe), Some(config)) = (&layer.moe, &self.config.text.moe) {
                bytes += moe.router_proj.bytes();
                bytes += (moe.gate_up_proj.bytes() + moe.down_proj.bytes()) / config.num_experts
                    * config.top_k_experts;
            }
        }
        if let Some(ple) = &self.weights.per_layer_embeddings {
            bytes += ple.model_projection.bytes();
        }
        bytes += self
            .weights
            .lm_head
            .as_ref()
            .unwrap_or(&self.weights.embed_tokens)
            .bytes();
        bytes as u64
    }

    /// An empty KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(
            &self.plan,
            |layer| {
                self.weights.layers[layer]
                    .attention
                    .k_norm
                    .clone()
                    .expect("producing layers have k_norm")
            },
            |layer| self.inverse_frequencies[self.rope_of_layer[layer]].clone(),
        )
    }

    /// Checks token ids exactly as the reference does (same errors).
    pub fn validate_token_ids(&self, token_ids: &[usize]) -> Result<()> {
        with_faults(&[], || validate_token_ids(&self.config, token_ids))
    }

    /// Runs `token_ids` (new tokens, after whatever `cache` holds) through the decoder and
    /// returns the logits, `[T, V]` ([`Logits::All`]) or `[1, V]` ([`Logits::Last`]), row-major.
    /// Every intermediate goes to `recorder`.
    pub fn forward(
        &self,
        token_ids: &[usize],
        cache: &mut KvCache,
        recorder: &mut Recorder,
        logits: Logits,
    ) -> Result<Vec<f32>> {
        self.forward_in(token_ids, cache, recorder, logits, self.precision)
    }

    /// [`Gemma4Optimized::forward`] in the given precision.
    fn forward_in(
        &self,
        token_ids: &[usize],
        cache: &mut KvCache,
        recorder: &mut Recorder,
        logits: Logits,
        precision: Precision,
    ) -> Result<Vec<f32>> {
        self.validate_token_ids(token_ids)?;
        let embed_ids = with_faults(&[], || embedding_token_ids(&self.config, token_ids));
        self.pool.install(|| {
            with_precision(precision, || {
                let d = self.config.text.hidden_size;
                let hidden =
                    scaled_embedding(&self.weights.embed_tokens, &embed_ids, self.embed_scale);
                record(recorder, "embeddings", &[token_ids.len(), d], &hidden)?;
                self.forward_from_embeddings_in_pool(hidden, token_ids, cache, recorder, logits)
            })
        })
    }

    /// The embeddings of a prompt `[T, D]` (row-major): text tokens scaled by `√D`, each image
    /// (audio clip) encoded by the vision (audio) tower and its soft tokens written over its run
    /// of placeholders (shared spec: multimodal §3.2; the reference's `embed_prompt`, same
    /// checks and errors). The towers' tensors and `embeddings` go to `recorder`. The towers'
    /// matrix products run in the model's precision ([`Gemma4Optimized::with_precision`]: f32 by
    /// default; with `Bf16Activations`, bf16 products on AMX as in the fast prefill).
    pub fn embed_prompt(&self, prompt: &Prompt, recorder: &mut Recorder) -> Result<Vec<f32>> {
        self.validate_token_ids(&prompt.tokens)?;
        self.pool.install(|| {
            with_precision(self.precision, || {
                self.embed_prompt_in_pool(prompt, recorder)
            })
        })
    }

    fn embed_prompt_in_pool(&self, prompt: &Prompt, recorder: &mut Recorder) -> Result<Vec<f32>> {
        let d = self.config.text.hidden_size;
        let tokens = prompt.tokens.len();
        let embed_ids = with_faults(&[], || embedding_token_ids(&self.config, &prompt.tokens));
        let hidden = scaled_embedding(&self.weights.embed_tokens, &embed_ids, self.embed_scale);
        // A view of the same buffer (no copy), for the merges.
        let mut embeddings =
            Array2::from_shape_vec((tokens, d), hidden).expect("[T, D] embeddings");
        if !prompt.images.is_empty() {
            let vision = self.vision.as_ref().ok_or_else(|| Error::Input {
                message: "the prompt has images but the vision tower was not loaded (load the model with Gemma4Optimized::load_for)".into(),
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
            with_faults(&[], || {
                merge_soft_tokens(&mut embeddings, &runs, &soft_tokens)
            });
        }
        if !prompt.audio.is_empty() {
            let audio = self.audio.as_ref().ok_or_else(|| Error::Input {
                message: "the prompt has audio but the audio tower was not loaded (load the model with Gemma4Optimized::load_for)".into(),
            })?;
            // The log-mel front end (for clips given as waveforms) is the reference's own, run
            // once per clip with no fault active.
            let features = with_faults(&[], || {
                prompt
                    .audio
                    .iter()
                    .map(|clip| clip.features())
                    .collect::<Result<Vec<_>>>()
            })?;
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
            with_faults(&[], || {
                merge_soft_tokens(&mut embeddings, &runs, &soft_tokens)
            });
        }
        let hidden = embeddings.into_raw_vec_and_offset().0;
        record(recorder, "embeddings", &[tokens, d], &hidden)?;
        Ok(hidden)
    }

    /// The decoder after the embedding: `embeddings` `[T, D]` (soft tokens already merged in)
    /// and the token ids they came from (for the PLE table and the image blocks), after
    /// whatever `cache` holds. Returns the logits as [`Gemma4Optimized::forward`] does.
    pub fn forward_from_embeddings(
        &self,
        embeddings: Vec<f32>,
        token_ids: &[usize],
        cache: &mut KvCache,
        recorder: &mut Recorder,
        logits: Logits,
    ) -> Result<Vec<f32>> {
        assert_eq!(
            embeddings.len(),
            token_ids.len() * self.config.text.hidden_size,
            "embeddings are [T, D]"
        );
        self.pool.install(|| {
            with_precision(self.precision, || {
                self.forward_from_embeddings_in_pool(embeddings, token_ids, cache, recorder, logits)
            })
        })
    }

    fn forward_from_embeddings_in_pool(
        &self,
        mut hidden: Vec<f32>,
        token_ids: &[usize],
        cache: &mut KvCache,
        recorder: &mut Recorder,
        logits: Logits,
    ) -> Result<Vec<f32>> {
        let text = &self.config.text;
        let (d, num_layers) = (text.hidden_size, text.num_hidden_layers);
        let tokens = token_ids.len();
        let eps = text.rms_norm_eps;
        let ple_ids = with_faults(&[], || ple_token_ids(&self.config, token_ids));

        // Per-Layer Embeddings, [T, L·P], computed once for all layers: the token part from the
        // PLE table (placeholders read the pad row), the context part from the (merged)
        // embeddings.
        let ple = match &self.weights.per_layer_embeddings {
            Some(ple_weights) => {
                let ple =
                    per_layer_inputs(&ple_ids, &hidden, d, ple_weights, self.ple_token_scale, eps);
                let p = ple_weights.projection_norm.len();
                record(recorder, "per_layer_inputs", &[tokens, num_layers, p], &ple)?;
                Some((ple, p))
            }
            None => None,
        };

        let first_position = cache.tokens_seen();
        let mut positions: Vec<usize> = (first_position..first_position + tokens).collect();
        // Image blocks attend bidirectionally on sliding layers ("vision" models).
        let blocks = ImageBlocks::of(&self.config, token_ids, first_position);
        // The RoPE cos/sin of the pass's positions, once per attention type.
        let rope_tables: Vec<RopeTable> = self
            .inverse_frequencies
            .iter()
            .map(|inverse_frequencies| RopeTable::new(inverse_frequencies, &positions))
            .collect();
        // Row of the pass (0..T) of each row of `hidden`.
        let mut rows: Vec<usize> = (0..tokens).collect();
        // The last layer that writes a cache: after its key/value projections, only the last
        // position matters when only its logits are wanted (the KV-shared layers after it write
        // no cache, so the other positions' outputs there would feed nothing but their logits).
        let last_producer = self
            .plan
            .layers
            .iter()
            .rposition(|layer| layer.computes_own_kv());
        for (layer, weights) in self.plan.layers.iter().zip(&self.weights.layers) {
            let outputs_from = if logits == Logits::Last && Some(layer.index) == last_producer {
                rows.len() - 1
            } else {
                0
            };
            let layer_input = ple.as_ref().map(|(ple, p)| {
                let mut slice = Vec::with_capacity(rows.len() * p);
                for &t in &rows {
                    let start = (t * num_layers + layer.index) * p;
                    slice.extend_from_slice(&ple[start..start + p]);
                }
                slice
            });
            decoder_layer(
                layer,
                weights,
                text,
                &mut hidden,
                layer_input.as_deref(),
                &positions,
                outputs_from,
                rope_tables[self.rope_of_layer[layer.index]].rows_from(rows[0]),
                &blocks,
                cache,
                recorder,
            )?;
            if outputs_from > 0 {
                hidden.drain(..outputs_from * d);
                positions.drain(..outputs_from);
                rows.drain(..outputs_from);
            }
        }
        cache.commit();
        let kept = rows.len();

        let normed = rms_norm(&hidden, d, &self.weights.final_norm, eps);
        record(recorder, "final_norm", &[kept, d], &normed)?;
        // Tied LM head: the embedding table, without the √D scale (text §11).
        let head = self
            .weights
            .lm_head
            .as_ref()
            .unwrap_or(&self.weights.embed_tokens);
        let mut output = linear(&normed, kept, head);
        if let Some(cap) = text.final_logit_softcapping {
            let cap = cap as f32;
            output
                .par_chunks_mut(8192)
                .for_each(|chunk| chunk.iter_mut().for_each(|z| *z = cap * (*z / cap).tanh()));
        }
        record(recorder, "logits", &[kept, text.vocab_size], &output)?;
        Ok(output)
    }

    /// The full activation dump of shared contracts §2 (every position of every layer), plus
    /// greedy decoding through the KV cache when `decode_steps > 0` — the reference's
    /// conventions (`gemma4_reference::model::Gemma4TextModel::dump`).
    pub fn dump(&self, token_ids: &[usize], decode_steps: usize) -> Result<ActivationDump> {
        self.dump_prompt(&Prompt::text(token_ids), decode_steps)
    }

    /// [`Gemma4Optimized::dump`] of a prompt with images (the reference's `dump_prompt`, same
    /// tensors): the vision tensors of each image, then the text tensors of the merged sequence,
    /// then the decode rows (single tokens through the cache, after the image blocks of the
    /// prefill). Always in f32 arithmetic, whatever [`Gemma4Optimized::with_precision`] set.
    pub fn dump_prompt(&self, prompt: &Prompt, decode_steps: usize) -> Result<ActivationDump> {
        self.dump_prompt_keeping(prompt, decode_steps, &TensorFilter::all())
    }

    /// [`Gemma4Optimized::dump_prompt`] keeping only the tensors `filter` selects (and
    /// `input_ids`), as the reference's `dump_prompt_keeping` does.
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
        self.validate_token_ids(&prompt.tokens)?;
        let logits = self.pool.install(|| {
            with_precision(Precision::F32, || {
                let embeddings = self.embed_prompt_in_pool(prompt, &mut recorder)?;
                self.forward_from_embeddings_in_pool(
                    embeddings,
                    &prompt.tokens,
                    &mut cache,
                    &mut recorder,
                    Logits::All,
                )
            })
        })?;
        if decode_steps > 0 {
            let vocab = self.config.text.vocab_size;
            let last = &logits[logits.len() - vocab..];
            let (decode_logits, continuation) =
                self.greedy_decode(last, &mut cache, decode_steps)?;
            dump.insert_f32("decode_logits", decode_logits.into_dyn());
            dump.insert_i64(
                "greedy_continuation",
                continuation.mapv(|t| t as i64).into_dyn(),
            );
        }
        dump.retain(filter);
        Ok(dump)
    }

    /// Greedy decoding after a prefill whose last logits row is `last_logits`, in the convention
    /// of Hugging Face `generate` (`gemma4_reference::model::greedy_steps`: row 0 is
    /// `last_logits`, then `steps − 1` single tokens through the cache). Returns
    /// `decode_logits` `[N, V]` and `greedy_continuation` `[N]`.
    pub fn greedy_decode(
        &self,
        last_logits: &[f32],
        cache: &mut KvCache,
        steps: usize,
    ) -> Result<(Array2<f32>, Array1<usize>)> {
        greedy_steps(
            ArrayView1::from(last_logits),
            self.config.text.vocab_size,
            steps,
            |next| {
                let logits =
                    self.forward(&[next], cache, &mut Recorder::checking_only(), Logits::Last)?;
                Ok(Array1::from(logits))
            },
        )
    }
}

/// `(√D, √P)` as a `compute` run applies them (the reference's `embedding_scale`); `√P` is 1
/// without PLE. (The reference's faults never reach the optimized engine.)
fn embedding_scales(config: &ModelConfig, compute: ComputeDtype) -> (f32, f32) {
    let text = &config.text;
    with_faults(&[], || {
        let ple = match text.hidden_size_per_layer_input {
            0 => 1.0,
            width => embedding_scale(width, compute),
        };
        (embedding_scale(text.hidden_size, compute), ple)
    })
}

/// Index of the largest value (the first one on ties, as `torch.argmax`): the reference's
/// `argmax` on a slice.
pub fn argmax(values: &[f32]) -> usize {
    gemma4_reference::model::argmax(ndarray::ArrayView1::from(values))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{write_checkpoint, TinyMultimodalConfig};
    use crate::testing::{assert_close, row_major};
    use crate::vision::tests::random_image;
    use gemma4_reference::audio::features_file::read_audio_features;
    use gemma4_reference::audio::AudioInput;
    use gemma4_reference::checkpoint::WeightDtype;
    use gemma4_reference::dump::DumpTensor;
    use gemma4_reference::vision::pixel_values::read_pixel_values;
    use gemma4_reference::Gemma4TextModel;

    /// Depth of a dump tensor: 0 before the decoder (vision tensors are checked apart), `i + 1`
    /// in layer `i`, `L + 1` after the last layer.
    fn depth(name: &str, layers: usize) -> usize {
        match name.strip_prefix("layers.") {
            Some(rest) => rest.split('.').next().unwrap().parse::<usize>().unwrap() + 1,
            None if name == "embeddings" || name == "per_layer_inputs" => 0,
            None => layers + 1,
        }
    }

    /// Audio tensors: the tower's f32 drift (measured ≤ 1.1e-6 on the golden clips, ≤ 1.6e-6 on
    /// random tiny towers, see `audio::tests::audio_tower_matches_reference_tiny_towers`) with
    /// room for other seeds; a bug in the tower moves its outputs by ≥ 1e-3.
    const AUDIO_TOLERANCE: f32 = 1e-5;

    /// Both engines' dumps of `prompt` (with `decode` steps): the same names, index tensors
    /// equal, every float tensor within tolerance of the reference's.
    ///
    /// Tolerances: vision tensors 5e-5 (the tower's f32 drift, see
    /// `vision::tests::vision_tower_matches_reference_tiny_towers`); text tensors
    /// `1e-4 + 5e-5 · depth` of the largest element, the bound of the root package's
    /// `tests/optimized_equivalence.rs` for random tiny models (summation orders differ, the
    /// unscaled attention and the RMSNorms amplify it layer after layer), which real bugs
    /// (a missing block, a scaled soft token, a wrong PLE row) exceed by orders of magnitude.
    fn check_dumps(dir: &Path, prompt: &Prompt, decode: usize, what: &str) {
        let reference = Gemma4TextModel::load_for(dir, prompt)
            .and_then(|m| m.dump_prompt(prompt, decode))
            .unwrap_or_else(|e| panic!("{what}: reference: {e}"));
        let model = Gemma4Optimized::load_for(dir, prompt, Some(2)).unwrap();
        let ours = model
            .dump_prompt(prompt, decode)
            .unwrap_or_else(|e| panic!("{what}: optimized: {e}"));
        assert_eq!(
            ours.names_in_model_order(),
            reference.names_in_model_order(),
            "{what}: tensor names"
        );
        let layers = model.config.text.num_hidden_layers;
        for name in reference.names_in_model_order() {
            match (ours.get(name).unwrap(), reference.get(name).unwrap()) {
                (DumpTensor::I64(a), DumpTensor::I64(b)) => assert_eq!(a, b, "{what}: {name}"),
                (DumpTensor::F32(a), DumpTensor::F32(b)) => {
                    assert_eq!(a.shape(), b.shape(), "{what}: {name}");
                    let tolerance = if name.starts_with("vision.") {
                        5e-5
                    } else if name.starts_with("audio.") {
                        AUDIO_TOLERANCE
                    } else {
                        1e-4 + 5e-5 * depth(name, layers) as f32
                    };
                    assert_close(
                        &format!("{what}: {name}"),
                        &row_major(a),
                        &row_major(b),
                        tolerance,
                    );
                }
                _ => panic!("{what}: {name} has different dtypes"),
            }
        }
    }

    /// `lead` text tokens, then per image BOI, its soft-token placeholders, EOI and two text
    /// tokens.
    fn prompt_tokens(model: &TinyMultimodalConfig, lead: &[usize], soft: &[usize]) -> Vec<usize> {
        let mut tokens = lead.to_vec();
        for (i, &count) in soft.iter().enumerate() {
            tokens.push(model.boi_token_id());
            tokens.extend(std::iter::repeat_n(model.image_token_id(), count));
            tokens.push(model.eoi_token_id());
            tokens.extend([5 + i, 9]);
        }
        tokens
    }

    /// Tiny random models of both towers — on-device-like (clipped, PLE, causal over images) and
    /// large-like (standardize, bidirectional image blocks on its sliding layers of window 4) —
    /// with one image in a prompt of 8 tokens (the per-query attention path), and two images
    /// (6 and 12 soft tokens: the second longer than the window) in 28 tokens (the blocked
    /// path), each followed by 3 decode steps through the cache.
    #[test]
    fn model_dump_prompt_matches_reference_tiny_vision_models() {
        for (clipped, standardize) in [(true, false), (false, true)] {
            let model = TinyMultimodalConfig::small(clipped, standardize);
            let dir = tempfile::tempdir().unwrap();
            write_checkpoint(dir.path(), &model.config_json(), WeightDtype::F32, 21).unwrap();
            let (small, large) = (random_image(6, 9, 1), random_image(9, 12, 2));
            let one = Prompt {
                tokens: prompt_tokens(&model, &[], &[6])[..8].to_vec(),
                images: vec![small.clone()],
                audio: Vec::new(),
            };
            let two = Prompt {
                tokens: prompt_tokens(&model, &[2, 17], &[6, 12]),
                images: vec![small, large],
                audio: Vec::new(),
            };
            assert_eq!(two.tokens.len(), 28);
            let what = format!("clipped {clipped}, standardize {standardize}");
            check_dumps(dir.path(), &one, 3, &format!("{what}, one image"));
            check_dumps(dir.path(), &two, 3, &format!("{what}, two images"));
        }
    }

    /// The golden vision cases (tiny models the oracle ran: E2B-like with the on-device tower,
    /// 31B-like with the large tower and bidirectional blocks longer than the window; one and
    /// two images) through both engines.
    #[test]
    fn model_dump_prompt_matches_reference_golden_vision_cases() {
        for case in [
            "e2b_vision",
            "e2b_vision_two_images",
            "31b_vision",
            "31b_vision_two_images",
        ] {
            let (model_dir, prompt, decode) = golden_prompt(case);
            check_dumps(&model_dir, &prompt, decode, case);
        }
    }

    /// The prompt of golden case `case` (its tokens, images and audio clips, as the oracle ran
    /// it), its model directory and its decode steps.
    fn golden_prompt(case: &str) -> (std::path::PathBuf, Prompt, usize) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../golden")
            .join(case);
        let description: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("case.json")).unwrap()).unwrap();
        let tokens: Vec<usize> = description["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as usize)
            .collect();
        let images = match description["pixel_values"].as_str() {
            Some(pixels) => read_pixel_values(&dir.join(pixels)).unwrap(),
            None => Vec::new(),
        };
        let audio = match description["audio_features"].as_str() {
            Some(features) => read_audio_features(&dir.join(features))
                .unwrap()
                .into_iter()
                .map(AudioInput::Features)
                .collect(),
            None => Vec::new(),
        };
        let decode = description["decode_steps"].as_u64().unwrap() as usize;
        let model_dir = match description["model_dir"].as_str() {
            Some(shared) => dir.join(shared),
            None => dir.join("model"),
        };
        (
            model_dir,
            Prompt {
                tokens,
                images,
                audio,
            },
            decode,
        )
    }

    /// The golden audio cases (the E2B-like tiny model with both towers, as the oracle ran it:
    /// one clip of 99 frames, two clips of 72 and 49 frames, an image then a clip in one
    /// prompt), the oracle's features fed to both engines, full dumps with the decode steps.
    #[test]
    fn model_dump_prompt_matches_reference_golden_audio_cases() {
        for case in ["e2b_audio", "e2b_audio_two_clips", "e2b_image_and_audio"] {
            let (model_dir, prompt, decode) = golden_prompt(case);
            assert!(!prompt.audio.is_empty(), "{case} has audio");
            check_dumps(&model_dir, &prompt, decode, case);
        }
    }

    /// A tiny random model with both towers (the golden-like audio tower, chunks of 12): one
    /// clip of 250 frames (63 soft tokens, six chunks) after an image, and two clips (47 and 5
    /// frames) alone, each with 3 decode steps, both engines' full dumps.
    #[test]
    fn model_dump_prompt_matches_reference_tiny_audio_models() {
        use crate::audio::tests::random_features;
        use crate::synthetic::TinyAudioTower;
        let model = TinyMultimodalConfig::small_with_audio(TinyAudioTower::small());
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &model.config_json(), WeightDtype::F32, 23).unwrap();
        let clip = |tokens: &mut Vec<usize>, soft: usize| {
            tokens.push(model.boa_token_id());
            tokens.extend(std::iter::repeat_n(model.audio_token_id(), soft));
            tokens.extend([model.eoa_token_id(), 7]);
        };
        let mut tokens = prompt_tokens(&model, &[2, 17], &[6]);
        clip(&mut tokens, 63);
        let image_and_clip = Prompt {
            tokens,
            images: vec![random_image(6, 9, 1)],
            audio: vec![AudioInput::Features(random_features(250, 1))],
        };
        let mut tokens = vec![2, 3];
        clip(&mut tokens, 12);
        clip(&mut tokens, 2);
        let two_clips = Prompt {
            tokens,
            images: Vec::new(),
            audio: vec![
                AudioInput::Features(random_features(47, 2)),
                AudioInput::Features(random_features(5, 3)),
            ],
        };
        check_dumps(dir.path(), &image_and_clip, 3, "image and clip");
        check_dumps(dir.path(), &two_clips, 3, "two clips");

        // Bad audio prompts, refused in the reference's words: a run of the wrong length, a
        // missing run, a checkpoint without an audio tower.
        let mut no_audio = model.clone();
        no_audio.audio = None;
        let text_dir = tempfile::tempdir().unwrap();
        write_checkpoint(
            text_dir.path(),
            &no_audio.config_json(),
            WeightDtype::F32,
            3,
        )
        .unwrap();
        let mut short = two_clips.clone();
        short.audio[1] = AudioInput::Features(random_features(9, 4));
        let mut missing = two_clips.clone();
        missing.tokens = vec![2, 3, 4];
        for (i, (dir, prompt)) in [
            (dir.path(), short),
            (dir.path(), missing),
            (text_dir.path(), two_clips.clone()),
        ]
        .iter()
        .enumerate()
        {
            let reference = Gemma4TextModel::load_for(dir, prompt)
                .and_then(|m| m.dump_prompt(prompt, 0))
                .err()
                .map(|e| e.to_string());
            let optimized = Gemma4Optimized::load_for(dir, prompt, Some(1))
                .and_then(|m| m.dump_prompt(prompt, 0))
                .err()
                .map(|e| e.to_string());
            assert!(
                reference.is_some(),
                "audio case {i}: the reference accepted it"
            );
            assert_eq!(optimized, reference, "audio case {i}");
        }
    }

    /// Bad prompts are refused with the reference's errors: images for a checkpoint without a
    /// tower, a placeholder run of the wrong length, a missing run, and images when the tower
    /// was not loaded.
    #[test]
    fn model_bad_image_prompts_refused_like_reference() {
        let model = TinyMultimodalConfig::small(true, false);
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &model.config_json(), WeightDtype::F32, 3).unwrap();
        let mut text_only = model.clone();
        text_only.vision = None;
        let text_dir = tempfile::tempdir().unwrap();
        write_checkpoint(
            text_dir.path(),
            &text_only.config_json(),
            WeightDtype::F32,
            3,
        )
        .unwrap();
        let image = random_image(3, 6, 1);
        let prompt = |tokens: Vec<usize>| Prompt {
            tokens,
            images: vec![image.clone()],
            audio: Vec::new(),
        };
        let cases = [
            (text_dir.path(), prompt(prompt_tokens(&model, &[2], &[2]))),
            (dir.path(), prompt(prompt_tokens(&model, &[2], &[3]))),
            (dir.path(), prompt(vec![2, 3, 4])),
            (dir.path(), {
                let mut p = prompt(prompt_tokens(&model, &[2], &[2]));
                p.images[0].positions[4] = [70, 0]; // outside the 64-entry tables
                p
            }),
        ];
        for (i, (dir, prompt)) in cases.iter().enumerate() {
            let reference = Gemma4TextModel::load_for(dir, prompt)
                .and_then(|m| m.dump_prompt(prompt, 0))
                .err()
                .map(|e| e.to_string());
            let optimized = Gemma4Optimized::load_for(dir, prompt, Some(1))
                .and_then(|m| m.dump_prompt(prompt, 0))
                .err()
                .map(|e| e.to_string());
            assert!(reference.is_some(), "case {i}: the reference accepted it");
            assert_eq!(optimized, reference, "case {i}");
        }
        // A model loaded without its tower.
        let image_prompt = prompt(prompt_tokens(&model, &[2], &[2]));
        let error = Gemma4Optimized::load_with_threads(dir.path(), Some(1))
            .unwrap()
            .dump_prompt(&image_prompt, 0)
            .unwrap_err()
            .to_string();
        assert!(error.contains("load_for"), "{error}");
    }
}
