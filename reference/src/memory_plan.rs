//! How much memory a reference run needs, known before it starts.
//!
//! A run's resident memory is, at its peak,
//!
//! ```text
//! in memory:  all text weights in f32                + towers + activations + dump
//! streamed:   largest layer in f32 + one tensor read + towers + activations + dump
//!             + small model-level weights (final norm, PLE projection) + one LM-head block
//! ```
//!
//! where the activations are those of the reference's forward pass over `T` tokens (the
//! hidden state and its copies, one layer's queries, keys, values and `[H, T, T]` scores, the MLP
//! intermediates, the PLE tensor, every layer's KV cache, the logits), and the dump is every
//! tensor the run records (shared contracts §2, only those `--tensors` keeps), held until it is
//! written. [`MemoryPlan::choose`] picks in memory when it fits the limit, else streamed, else
//! refuses with the numbers. Each figure is an upper estimate (it counts the intermediates the
//! reference keeps alive together); `gemma4 dump` prints the measured peak next to it.

use crate::audio::weights::audio_tensor_specs;
use crate::checkpoint::text_tensor_specs;
use crate::config::ModelConfig;
use crate::dump::TensorFilter;
use crate::error::{Error, Result};
use crate::layer_plan::ModelPlan;
use crate::memory::{mem_available_from_meminfo, memory_limit_env, memory_limit_flag};
use crate::merge::Prompt;
use crate::vision::weights::vision_tensor_specs;
use crate::weight_stream::{Residence, LM_HEAD_BLOCK_ROWS};

/// Bytes of one f32.
const F32: u64 = 4;

/// Memory taken before any tensor: the program, its libraries, the allocator's reserve (a
/// measured `gemma4 dump` of a tiny golden model peaks at about 20 MB; 64 MB leaves room).
pub const BASE_BYTES: u64 = 64 << 20;

/// The memory a reference run needs, part by part (bytes).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MemoryPlan {
    /// Every text weight in f32 (an in-memory model).
    pub text_weights: u64,
    /// The largest decoder layer's weights in f32, and its index.
    pub largest_layer: (usize, u64),
    /// What a streamed model keeps besides one layer: the PLE projection and norms, the final
    /// norm, one LM-head block, and the raw bytes of the largest tensor while it is widened.
    pub streamed_overhead: u64,
    /// The vision and audio towers' weights in f32 (only those the prompt needs).
    pub towers: u64,
    /// The forward pass's live intermediates and the KV cache.
    pub activations: u64,
    /// The tensors the dump keeps.
    pub dump: u64,
}

impl MemoryPlan {
    /// The plan of a reference dump of `prompt` with `decode_steps` greedy steps on `config`,
    /// keeping the dump tensors `filter` selects.
    pub fn of_dump(
        config: &ModelConfig,
        plan: &ModelPlan,
        prompt: &Prompt,
        decode_steps: usize,
        filter: &TensorFilter,
    ) -> MemoryPlan {
        let text = &config.text;
        let specs = text_tensor_specs(text, plan);
        let bytes = |shape: &[usize]| shape.iter().product::<usize>() as u64 * F32;
        let text_weights = specs.iter().map(|s| bytes(&s.shape)).sum::<u64>();
        let mut per_layer = vec![0u64; plan.layers.len()];
        let mut largest_tensor = 0u64;
        let mut model_level = 0u64;
        for spec in &specs {
            let size = bytes(&spec.shape);
            match layer_of(&spec.name) {
                Some(layer) => {
                    // Read whole (the tables are read by rows): its raw bytes sit beside its
                    // f32 copy while it is widened.
                    largest_tensor = largest_tensor.max(size);
                    per_layer[layer] += size
                }
                None if spec.name.starts_with("per_layer_model_projection")
                    || spec.name.ends_with("norm.weight") =>
                {
                    model_level += size
                }
                None => {}
            }
        }
        let largest_layer = per_layer
            .iter()
            .copied()
            .enumerate()
            .max_by_key(|&(_, size)| size)
            .unwrap_or((0, 0));
        let head_block =
            LM_HEAD_BLOCK_ROWS.min(text.vocab_size) as u64 * text.hidden_size as u64 * F32;
        let streamed_overhead = model_level + head_block + largest_tensor;

        let mut towers = 0;
        if !prompt.images.is_empty() {
            if let Some(vision) = &config.vision {
                towers += vision_tensor_specs(vision, text.hidden_size)
                    .iter()
                    .map(|s| bytes(&s.shape))
                    .sum::<u64>();
            }
        }
        if !prompt.audio.is_empty() {
            if let Some(audio) = &config.audio {
                towers += audio_tensor_specs(audio, text.hidden_size)
                    .iter()
                    .map(|s| bytes(&s.shape))
                    .sum::<u64>();
            }
        }

        let tokens = prompt.tokens.len();
        MemoryPlan {
            text_weights,
            largest_layer,
            streamed_overhead,
            towers: towers + tower_activations(config, prompt),
            activations: text_activations(config, plan, tokens, decode_steps),
            dump: text_dump_tensors(config, plan, tokens, decode_steps)
                .iter()
                .filter(|(name, _)| filter.keeps(name))
                .map(|(_, shape)| bytes(shape))
                .sum(),
        }
    }

    /// Peak bytes with every weight in memory.
    pub fn in_memory_peak(&self) -> u64 {
        BASE_BYTES + self.text_weights + self.towers + self.activations + self.dump
    }

    /// Peak bytes with the layers streamed.
    pub fn streamed_peak(&self) -> u64 {
        BASE_BYTES
            + self.largest_layer.1
            + self.streamed_overhead
            + self.towers
            + self.activations
            + self.dump
    }

    /// Peak bytes of a residence (in memory or streamed; `Auto` is not a residence).
    pub fn peak(&self, residence: Residence) -> u64 {
        match residence {
            Residence::Streamed => self.streamed_peak(),
            Residence::InMemory | Residence::Auto => self.in_memory_peak(),
        }
    }

    /// The residence to run with under `limit` bytes (`None`: no limit known): the asked one
    /// if it fits, or, for `Auto`, in memory when it fits, else streamed. An error giving the
    /// plan when nothing asked for fits.
    pub fn choose(&self, asked: Residence, limit: Option<MemoryLimit>) -> Result<Residence> {
        let fits = |residence| limit.is_none_or(|l| self.peak(residence) <= l.bytes);
        let chosen = match asked {
            Residence::Auto if fits(Residence::InMemory) => Residence::InMemory,
            Residence::Auto => Residence::Streamed,
            other => other,
        };
        match limit {
            Some(limit) if !fits(chosen) => Err(Error::input(format!(
                "the run needs about {} at its peak with the weights {} ({}), more than the {} \
                 bytes ({}) allowed by {}{}",
                format_bytes(self.peak(chosen)),
                chosen.name(),
                self.describe(chosen),
                limit.bytes,
                format_bytes(limit.bytes),
                limit.source,
                if chosen == Residence::InMemory {
                    "; --weights streamed (or auto) needs less"
                } else {
                    ""
                }
            ))),
            _ => Ok(chosen),
        }
    }

    /// The parts of a residence's peak, in words.
    pub fn describe(&self, residence: Residence) -> String {
        let weights = match residence {
            Residence::Streamed => format!(
                "largest layer (layers.{}) {} + streaming buffers {}",
                self.largest_layer.0,
                format_bytes(self.largest_layer.1),
                format_bytes(self.streamed_overhead)
            ),
            _ => format!("text weights {}", format_bytes(self.text_weights)),
        };
        format!(
            "{weights}, towers {}, activations {}, dump {}, program {}",
            format_bytes(self.towers),
            format_bytes(self.activations),
            format_bytes(self.dump),
            format_bytes(BASE_BYTES)
        )
    }
}

/// A memory limit and where it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryLimit {
    pub bytes: u64,
    /// `--max-memory`, `GEMMA4_MEMORY_LIMIT` or `MemAvailable`.
    pub source: &'static str,
}

/// The limit a run must stay under: the smallest of `--max-memory`
/// ([`crate::memory::set_memory_limit`]), the environment variable `GEMMA4_MEMORY_LIMIT` and
/// the memory the system says is available.
pub fn memory_limit() -> Option<MemoryLimit> {
    let system = available_memory_of_system();
    [
        memory_limit_flag().map(|bytes| MemoryLimit {
            bytes,
            source: "--max-memory",
        }),
        memory_limit_env().map(|bytes| MemoryLimit {
            bytes,
            source: "GEMMA4_MEMORY_LIMIT",
        }),
        system.map(|bytes| MemoryLimit {
            bytes,
            source: "the memory available (MemAvailable)",
        }),
    ]
    .into_iter()
    .flatten()
    .min_by_key(|limit| limit.bytes)
}

/// `MemAvailable` alone (without `GEMMA4_MEMORY_LIMIT`, which [`memory_limit`] names itself).
fn available_memory_of_system() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    mem_available_from_meminfo(&text)
}

/// The layer index of a layer tensor's spec name (`layers.{i}.…`).
fn layer_of(spec_name: &str) -> Option<usize> {
    spec_name
        .strip_prefix("layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// The live intermediates of the reference's forward pass over `tokens` new tokens after
/// `decode_steps` more (the KV cache grows to `tokens + decode_steps`), in bytes: a dozen
/// `[T, D]` hidden-state copies, one layer's q/k/v and attention output, its `[H, T, T]`
/// scores twice (scores and probabilities), the MLP's three `[T, F]` intermediates (MoE: the
/// same for the shared branch plus one expert's), the PLE tensor twice, every layer's cached
/// keys and values, and the logits twice (before and after softcapping) plus the decode rows.
pub fn text_activations(
    config: &ModelConfig,
    plan: &ModelPlan,
    tokens: usize,
    decode_steps: usize,
) -> u64 {
    let text = &config.text;
    let t = tokens as u64;
    let d = text.hidden_size as u64;
    let total = (tokens + decode_steps) as u64;
    let mut layer_peak = 0u64;
    let mut cache = 0u64;
    for layer in &plan.layers {
        let (h, k, hd) = (
            layer.num_query_heads as u64,
            layer.num_kv_heads as u64,
            layer.head_dim as u64,
        );
        let attention = t * (h * hd) * 3 + t * k * hd * 4 + 2 * h * t * t;
        let mlp = 3 * t * layer.mlp_width as u64
            + text
                .moe
                .as_ref()
                .filter(|_| layer.has_moe)
                .map_or(0, |moe| {
                    3 * t * moe.moe_intermediate_size as u64 + t * moe.num_experts as u64
                });
        layer_peak = layer_peak.max(attention.max(mlp));
        if layer.computes_own_kv() {
            cache += 2 * total * k * hd;
        }
    }
    let ple = 2 * t * (text.num_hidden_layers * text.hidden_size_per_layer_input) as u64;
    let logits = 2 * t * text.vocab_size as u64 + decode_steps as u64 * text.vocab_size as u64;
    F32 * (12 * t * d + layer_peak + cache + ple + logits)
}

/// The towers' live intermediates for the prompt's images and clips: per image, a dozen
/// `[n, Dv]` arrays and the `[heads, n, n]` scores twice (`n` patches: soft tokens × k²); per
/// audio clip, the conformer's `[F', Da]` arrays (its attention is chunked: no `n²` term).
fn tower_activations(config: &ModelConfig, prompt: &Prompt) -> u64 {
    let mut largest = 0u64;
    if let Some(vision) = &config.vision {
        let kernel = vision.pooling_kernel_size;
        for image in &prompt.images {
            let n = (image.soft_tokens(kernel) * kernel * kernel) as u64;
            let heads = vision.num_attention_heads as u64;
            let width = (vision.hidden_size.max(vision.intermediate_size)) as u64;
            largest = largest.max(F32 * (12 * n * width + 2 * heads * n * n));
        }
    }
    if let (Some(audio), false) = (&config.audio, prompt.audio.is_empty()) {
        // A clip is 30 s at most: 3000 feature frames of 128 bins.
        let frames = 3000u64;
        largest = largest.max(F32 * (16 * frames * audio.hidden_size as u64 + frames * 128));
    }
    largest
}

/// Name and shape of every text tensor a dump of `tokens` tokens with `decode_steps` greedy
/// steps records (shared contracts §2), in model order.
pub fn text_dump_tensors(
    config: &ModelConfig,
    plan: &ModelPlan,
    tokens: usize,
    decode_steps: usize,
) -> Vec<(String, Vec<usize>)> {
    let text = &config.text;
    let (t, d) = (tokens, text.hidden_size);
    let mut out = vec![
        ("input_ids".to_string(), vec![t]),
        ("embeddings".to_string(), vec![t, d]),
    ];
    if text.hidden_size_per_layer_input > 0 {
        out.push((
            "per_layer_inputs".to_string(),
            vec![t, text.num_hidden_layers, text.hidden_size_per_layer_input],
        ));
    }
    for layer in &plan.layers {
        let i = layer.index;
        let (h, k, hd) = (layer.num_query_heads, layer.num_kv_heads, layer.head_dim);
        out.push((format!("layers.{i}.attn.q"), vec![t, h, hd]));
        if layer.computes_own_kv() {
            out.push((format!("layers.{i}.attn.k"), vec![t, k, hd]));
            out.push((format!("layers.{i}.attn.v"), vec![t, k, hd]));
        }
        out.push((format!("layers.{i}.attn.output"), vec![t, d]));
        out.push((format!("layers.{i}.mlp.output"), vec![t, d]));
        if let Some(moe) = text.moe.as_ref().filter(|_| layer.has_moe) {
            let k = moe.top_k_experts;
            out.push((format!("layers.{i}.router.top_k_index"), vec![t, k]));
            out.push((format!("layers.{i}.router.top_k_weights"), vec![t, k]));
            out.push((format!("layers.{i}.moe.output"), vec![t, d]));
        }
        out.push((format!("layers.{i}.output"), vec![t, d]));
    }
    out.push(("final_norm".to_string(), vec![t, d]));
    out.push(("logits".to_string(), vec![t, text.vocab_size]));
    if decode_steps > 0 {
        out.push((
            "decode_logits".to_string(),
            vec![decode_steps, text.vocab_size],
        ));
        out.push(("greedy_continuation".to_string(), vec![decode_steps]));
    }
    out
}

/// `1.23 GiB`, `456.0 MiB`, `789 KiB`, `12 B`.
pub fn format_bytes(bytes: u64) -> String {
    const KIB: f64 = 1024.0;
    let b = bytes as f64;
    if b >= KIB * KIB * KIB {
        format!("{:.2} GiB", b / (KIB * KIB * KIB))
    } else if b >= KIB * KIB {
        format!("{:.1} MiB", b / (KIB * KIB))
    } else if b >= KIB {
        format!("{:.0} KiB", b / KIB)
    } else {
        format!("{bytes} B")
    }
}

/// The peak resident memory of this process so far (`VmHWM` of `/proc/self/status`: every
/// resident page counted, mapped file pages included), if the system reports it.
pub fn peak_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kilobytes: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kilobytes * 1024)
}
