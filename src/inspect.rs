//! `gemma4 inspect`: the derived layer plan, exact parameter counts and KV-cache sizes of a
//! checkpoint, from `config.json` alone; weights, when present, are checked against the plan.

use std::path::Path;

use gemma4_reference::audio::weights::audio_tensor_specs;
use gemma4_reference::checkpoint::{full_name, text_tensor_specs, Checkpoint};
use gemma4_reference::config::{AttentionType, RopeKind};
use gemma4_reference::config::{AudioConfig, VisionConfig};
use gemma4_reference::dump::TensorFilter;
use gemma4_reference::kv_cache::{cache_footprint, CacheFootprint};
use gemma4_reference::layer_plan::KvSource;
use gemma4_reference::memory_plan::{memory_limit, MemoryPlan};
use gemma4_reference::merge::Prompt;
use gemma4_reference::parameter_count::{count_parameters, ParameterCounts};
use gemma4_reference::rope::inverse_frequencies;
use gemma4_reference::vision::preprocessing::{resized_size, SUPPORTED_BUDGETS};
use gemma4_reference::vision::weights::vision_tensor_specs;
use gemma4_reference::weight_stream::Residence;
use gemma4_reference::{Error, ModelConfig, ModelPlan};

/// Everything `inspect` reports.
#[derive(Debug, serde::Serialize)]
pub struct Inspection {
    pub config: ModelConfig,
    pub plan: ModelPlan,
    pub parameters: ParameterCounts,
    /// KV cache with bf16 entries.
    pub kv_cache_bf16: CacheFootprint,
    /// KV cache with f32 entries.
    pub kv_cache_f32: CacheFootprint,
    /// The optimized engine's cache layout (f32 entries, one tensor on K=V layers, a ring of W
    /// positions on sliding layers): bytes per position, `(sliding layers, full layers)`. Its
    /// real allocation is checked against `kv_cache_f32` in `tests/optimized_kv_cache.rs`.
    pub optimized_kv_cache_bytes_per_token: (usize, usize),
    /// K=V layers of the optimized cache also keep the RoPE cos/sin of every cached position
    /// (for rebuilding keys without trigonometry): bytes per position, `(sliding, full)`.
    pub optimized_kv_angle_bytes_per_token: (usize, usize),
    /// `None` when the directory has no weights; otherwise the number of text tensors checked.
    pub weights_checked: Option<usize>,
    /// With weights: what the optimized engine maps and keeps resident.
    pub memory: Option<EngineMemory>,
    /// Checkpoint tensors that are not text tensors of the plan (towers, stray KV of shared layers).
    pub tensors_not_used_by_text_model: usize,
    /// The vision tower, when the model has one.
    pub vision: Option<VisionInspection>,
    /// With `--image-size`: the resized size and soft tokens of that image at every budget.
    pub image_sizes: Vec<ImageAtBudget>,
    /// The audio tower, when the model has one.
    pub audio: Option<AudioInspection>,
    /// With `--audio-seconds`: the samples, frames and soft tokens of a clip of that length.
    pub audio_clip: Option<AudioClip>,
    /// The reference's memory plan for a dump of [`PLAN_TOKENS`] tokens and [`PLAN_DECODE`]
    /// greedy steps (every tensor kept), from the config alone.
    pub reference_memory: MemoryPlan,
}

/// Prompt length of the memory plan `inspect` prints.
pub const PLAN_TOKENS: usize = 128;
/// Decode steps of the memory plan `inspect` prints.
pub const PLAN_DECODE: usize = 4;

/// The audio tower's plan (shared spec: multimodal §0, §2).
#[derive(Debug, serde::Serialize)]
pub struct AudioInspection {
    pub config: AudioConfig,
    /// The tower and its projector (`embed_audio`), exact.
    pub parameters: u64,
    /// With weights: the audio tensors checked.
    pub tensors_checked: Option<usize>,
}

/// What the audio front end makes of a clip of a given length (shared spec: multimodal §2.1,
/// §2.6): 16 kHz samples (cut to 30 s), valid log-mel frames, soft tokens.
#[derive(Debug, serde::Serialize)]
pub struct AudioClip {
    pub seconds: f64,
    /// `round(seconds · 16 000)`.
    pub samples: usize,
    /// The samples the front end keeps (at most 30 s).
    pub samples_used: usize,
    /// Valid frames: `(N + 160 − 321) div 160 + 1`.
    pub frames: usize,
    /// `⌈⌈F/2⌉/2⌉`, at most 750.
    pub soft_tokens: usize,
}

/// The front end's arithmetic on a clip of `seconds` (16 kHz).
pub fn audio_clip(seconds: f64) -> AudioClip {
    use gemma4_reference::audio::features::{
        soft_token_count, truncated_length, valid_frame_count, SAMPLE_RATE,
    };
    let samples = (seconds * f64::from(SAMPLE_RATE)).round() as usize;
    AudioClip {
        seconds,
        samples,
        samples_used: truncated_length(samples),
        frames: valid_frame_count(samples),
        soft_tokens: soft_token_count(samples),
    }
}

/// The vision tower's plan (shared spec: multimodal §0, §1).
#[derive(Debug, serde::Serialize)]
pub struct VisionInspection {
    pub config: VisionConfig,
    /// The tower and its projector (`embed_vision`), exact.
    pub parameters: u64,
    /// With weights: the vision tensors checked (present, planned shape, float dtype).
    pub tensors_checked: Option<usize>,
}

/// One budget's preprocessing of an image of a given size (multimodal spec §1.1).
#[derive(Debug, serde::Serialize)]
pub struct ImageAtBudget {
    pub budget: usize,
    /// `[height, width]` after the resize, or why the image cannot be processed at this budget.
    pub resized: Result<[usize; 2], String>,
    pub patches: usize,
    pub soft_tokens: usize,
}

/// Memory of the optimized engine on a checkpoint. Weights are memory-mapped as stored, so a
/// checkpoint larger than RAM still runs (the kernel pages weights in from disk as they are
/// read); what stays resident is what the forward pass touches.
#[derive(Debug, serde::Serialize)]
pub struct EngineMemory {
    /// Bytes of every text tensor the engine maps (as stored: bf16, f16 or f32).
    pub text_weight_bytes: u64,
    /// The PLE table among them: only the rows of the tokens seen are read, so it stays on disk.
    pub ple_table_bytes: u64,
    /// One row of the PLE table: read once per distinct token id.
    pub ple_row_bytes: u64,
    /// MoE expert weights among them: a token reads `top_k` of `num_experts`, but every expert
    /// a prompt routes to stays resident, so over a long run all of them are.
    pub expert_bytes: u64,
    /// Weights resident while running: everything but the PLE table.
    pub resident_weight_bytes: u64,
    /// The checkpoint's safetensors files (every shard), towers included.
    pub checkpoint_file_bytes: u64,
    /// This machine's RAM (`MemTotal` of `/proc/meminfo`), when it can be read.
    pub machine_memory_bytes: Option<u64>,
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn machine_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Inspects a model directory. Weights are optional; if present, every text tensor the plan
/// needs must exist with the right shape and a float dtype.
pub fn inspect(dir: &Path) -> Result<Inspection, Error> {
    let mut inspection = inspect_config(ModelConfig::from_dir(dir)?);
    let has_weights =
        dir.join("model.safetensors").exists() || dir.join("model.safetensors.index.json").exists();
    if has_weights {
        let checkpoint = Checkpoint::open(dir)?;
        let prefix = checkpoint.text_prefix()?;
        let specs = text_tensor_specs(&inspection.config.text, &inspection.plan);
        let mut used = std::collections::BTreeSet::new();
        let mut memory = EngineMemory {
            text_weight_bytes: 0,
            ple_table_bytes: 0,
            ple_row_bytes: 0,
            expert_bytes: 0,
            resident_weight_bytes: 0,
            checkpoint_file_bytes: 0,
            machine_memory_bytes: machine_memory_bytes(),
        };
        for spec in &specs {
            let name = full_name(prefix, &spec.name);
            let dtype = checkpoint.check(&name, &spec.shape)?;
            let bytes = (spec.shape.iter().product::<usize>() * dtype.size()) as u64;
            memory.text_weight_bytes += bytes;
            if spec.name == "embed_tokens_per_layer.weight" {
                memory.ple_table_bytes = bytes;
                memory.ple_row_bytes = bytes / spec.shape[0].max(1) as u64;
            }
            if spec.name.contains(".experts.") {
                memory.expert_bytes += bytes;
            }
            used.insert(name);
        }
        memory.resident_weight_bytes = memory.text_weight_bytes - memory.ple_table_bytes;
        memory.checkpoint_file_bytes = checkpoint
            .files
            .iter()
            .map(|file| {
                std::fs::metadata(&file.path)
                    .map(|m| m.len())
                    .map_err(|source| Error::Io {
                        path: file.path.clone(),
                        source,
                    })
            })
            .sum::<Result<u64, Error>>()?;
        inspection.memory = Some(memory);
        if let Some(vision) = inspection.vision.as_mut() {
            let specs = vision_tensor_specs(&vision.config, inspection.config.text.hidden_size);
            for spec in &specs {
                let name = full_name("model.", &spec.name);
                checkpoint.check(&name, &spec.shape)?;
                used.insert(name);
            }
            vision.tensors_checked = Some(specs.len());
        }
        if let Some(audio) = inspection.audio.as_mut() {
            let specs = audio_tensor_specs(&audio.config, inspection.config.text.hidden_size);
            for spec in &specs {
                let name = full_name("model.", &spec.name);
                checkpoint.check(&name, &spec.shape)?;
                used.insert(name);
            }
            audio.tensors_checked = Some(specs.len());
        }
        inspection.tensors_not_used_by_text_model =
            checkpoint.names().filter(|n| !used.contains(*n)).count();
        inspection.weights_checked = Some(specs.len());
    }
    Ok(inspection)
}

/// Everything `inspect` derives from a config alone (no weights checked).
pub fn inspect_config(config: ModelConfig) -> Inspection {
    let plan = ModelPlan::from_config(&config.text);
    let window = config.text.sliding_window;
    // An empty cache allocates nothing; its layout gives the bytes per position.
    let empty_cache = gemma4_optimized::kv_cache::KvCache::new(
        &plan,
        |_| Vec::new(),
        |i| inverse_frequencies(&plan.layers[i].rope, plan.layers[i].head_dim),
    );
    let parameters = count_parameters(&config);
    let vision = config.vision.clone().map(|vision| VisionInspection {
        config: vision,
        parameters: parameters.vision,
        tensors_checked: None,
    });
    let audio = config.audio.clone().map(|audio| AudioInspection {
        config: audio,
        parameters: parameters.audio,
        tensors_checked: None,
    });
    let plan_prompt = Prompt::text(&vec![config.text.pad_token_id; PLAN_TOKENS]);
    let reference_memory = MemoryPlan::of_dump(
        &config,
        &plan,
        &plan_prompt,
        PLAN_DECODE,
        &TensorFilter::all(),
    );
    Inspection {
        parameters,
        audio,
        reference_memory,
        optimized_kv_cache_bytes_per_token: empty_cache.bytes_per_position(),
        optimized_kv_angle_bytes_per_token: empty_cache.angle_bytes_per_position(),
        kv_cache_bf16: cache_footprint(&plan, window, 2),
        kv_cache_f32: cache_footprint(&plan, window, 4),
        config,
        plan,
        weights_checked: None,
        memory: None,
        tensors_not_used_by_text_model: 0,
        vision,
        image_sizes: Vec::new(),
        audio_clip: None,
    }
}

/// The resized size and soft tokens of a `height × width` image at every budget.
pub fn image_sizes(height: usize, width: usize) -> Vec<ImageAtBudget> {
    SUPPORTED_BUDGETS
        .iter()
        .map(|&budget| {
            let resized = resized_size(height, width, budget)
                .map(|(h, w)| [h, w])
                .map_err(|e| e.to_string());
            let patches = resized.as_ref().map_or(0, |[h, w]| (h / 16) * (w / 16));
            ImageAtBudget {
                budget,
                resized,
                patches,
                soft_tokens: patches / 9,
            }
        })
        .collect()
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The human-readable report.
pub fn format_inspection(inspection: &Inspection) -> String {
    let text = &inspection.config.text;
    let plan = &inspection.plan;
    let mut out = String::new();
    out.push_str(&format!(
        "layout {:?}; D={} L={} H={} V={} W={} P={} softcap={}\n",
        inspection.config.layout,
        text.hidden_size,
        text.num_hidden_layers,
        text.num_attention_heads,
        text.vocab_size,
        text.sliding_window,
        text.hidden_size_per_layer_input,
        text.final_logit_softcapping
            .map_or("none".to_string(), |c| c.to_string()),
    ));
    out.push_str(&format!("pattern: {}\n\n", plan.pattern()));
    out.push_str(&format!(
        "{:>5}  {:<7} {:>8} {:>8} {:>8} {:>4}  {:<22} {:>7} {:<26} {:>9} {:>4} {:>4}\n",
        "layer",
        "type",
        "head_dim",
        "q_heads",
        "kv_heads",
        "K=V",
        "kv source",
        "window",
        "rope",
        "mlp_width",
        "ple",
        "moe"
    ));
    for layer in &plan.layers {
        let kv = match layer.kv_source {
            KvSource::Own {
                shared_with_consumers: true,
            } => "own (shared onward)".to_string(),
            KvSource::Own { .. } => "own".to_string(),
            KvSource::SharedFrom { producer } => format!("shared from {producer}"),
        };
        let rope = match layer.rope.kind {
            RopeKind::Default => format!("default θ={}", layer.rope.theta),
            RopeKind::Proportional {
                partial_rotary_factor,
            } => {
                format!(
                    "proportional ρ={partial_rotary_factor} θ={}",
                    layer.rope.theta
                )
            }
        };
        out.push_str(&format!(
            "{:>5}  {:<7} {:>8} {:>8} {:>8} {:>4}  {:<22} {:>7} {:<26} {:>9} {:>4} {:>4}\n",
            layer.index,
            match layer.attention_type {
                AttentionType::Sliding => "sliding",
                AttentionType::Full => "full",
            },
            layer.head_dim,
            layer.num_query_heads,
            layer.num_kv_heads,
            if layer.key_equals_value { "yes" } else { "no" },
            kv,
            layer
                .sliding_window
                .map_or("-".to_string(), |w| w.to_string()),
            rope,
            layer.mlp_width,
            if layer.has_per_layer_embedding {
                "yes"
            } else {
                "no"
            },
            if layer.has_moe { "yes" } else { "no" },
        ));
    }
    let p = &inspection.parameters;
    out.push_str("\nparameters (exact; tied LM head counted once)\n");
    for (label, value) in [
        ("total", p.total),
        ("text", p.text),
        ("  embeddings (embed_tokens)", p.embeddings),
        ("  PLE table", p.per_layer_embedding_table),
        ("vision (tower + embed_vision)", p.vision),
        ("audio (tower + embed_audio)", p.audio),
        ("active per token (text)", p.active_per_token),
        ("persistent buffers (not parameters)", p.buffers),
    ] {
        out.push_str(&format!("  {label:<38} {:>17}\n", thousands(value)));
    }
    for (label, kv) in [
        ("bf16", &inspection.kv_cache_bf16),
        ("f32", &inspection.kv_cache_f32),
    ] {
        out.push_str(&format!(
            "\nKV cache ({label}): {} sliding + {} full layers own a cache\n  full layers:    {} bytes per token ({} with one tensor on K=V layers)\n  sliding layers: {} bytes per token, at most {} bytes once the window of {} is full\n",
            kv.sliding_layers_with_cache,
            kv.full_layers_with_cache,
            thousands(kv.full_bytes_per_token),
            thousands(kv.full_bytes_per_token_single_tensor_k_eq_v),
            thousands(kv.sliding_bytes_per_token),
            thousands(kv.sliding_bytes_at_full_window),
            text.sliding_window,
        ));
    }
    let (sliding, full) = inspection.optimized_kv_cache_bytes_per_token;
    out.push_str(&format!(
        "\nKV cache of the optimized engine (f32, one tensor on K=V layers, ring of {} on sliding layers):\n  full layers:    {} bytes per token\n  sliding layers: {} bytes per token, at most {} bytes\n",
        text.sliding_window,
        thousands(full as u64),
        thousands(sliding as u64),
        thousands((sliding * text.sliding_window) as u64),
    ));
    let (sliding_angles, full_angles) = inspection.optimized_kv_angle_bytes_per_token;
    if sliding_angles + full_angles > 0 {
        out.push_str(&format!(
            "  plus, on K=V layers, the RoPE cos/sin of each cached position (keys are rebuilt from the one tensor): {} bytes per token\n",
            thousands((sliding_angles + full_angles) as u64),
        ));
    }
    if let Some(vision) = &inspection.vision {
        out.push_str(&format_vision(vision, text.hidden_size));
    }
    if let Some(audio) = &inspection.audio {
        let c = &audio.config;
        out.push_str(&format!(
            "\naudio tower: {} conformer layers, width {}, {} heads x {}, feed-forward {} (SiLU), light conv k={}{}\n  subsampling 2 x conv 3x3/2 ({} -> {} channels): 128 mel bins -> 32, 4 frames (40 ms) per soft token; attention over {} keys (chunks of {}), soft-cap {}\n  output {} -> {} -> {} (projector: weight-free RMSNorm, bias-free linear); {} parameters\n",
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.hidden_size / c.num_attention_heads,
            4 * c.hidden_size,
            c.conv_kernel_size,
            if c.use_clipped_linears { ", clipped linears" } else { "" },
            c.subsampling_conv_channels[0],
            c.subsampling_conv_channels[1],
            c.attention_context_left - 1,
            c.attention_chunk_size,
            c.attention_logit_cap,
            c.hidden_size,
            c.output_proj_dims,
            text.hidden_size,
            thousands(audio.parameters),
        ));
    }
    if let Some(clip) = &inspection.audio_clip {
        out.push_str(&format!(
            "\naudio clip of {} s: {} samples at 16 kHz{}, {} valid log-mel frames (10 ms hop), {} soft tokens{}\n",
            clip.seconds,
            clip.samples,
            if clip.samples_used < clip.samples {
                format!(" (cut to the first {} = 30 s)", clip.samples_used)
            } else {
                String::new()
            },
            clip.frames,
            clip.soft_tokens,
            if inspection.audio.is_none() {
                " (this model has no audio tower: it cannot take the clip)"
            } else {
                ""
            },
        ));
    }
    if !inspection.image_sizes.is_empty() {
        out.push_str(
            "\nimage preprocessing (resize to multiples of 48, aspect kept; up-scaled too):\n",
        );
        out.push_str(&format!(
            "  {:>6}  {:>11}  {:>8}  {:>11}\n",
            "budget", "resized HxW", "patches", "soft tokens"
        ));
        for size in &inspection.image_sizes {
            match &size.resized {
                Ok([h, w]) => out.push_str(&format!(
                    "  {:>6}  {:>11}  {:>8}  {:>11}\n",
                    size.budget,
                    format!("{h}x{w}"),
                    size.patches,
                    size.soft_tokens
                )),
                Err(e) => out.push_str(&format!("  {:>6}  {e}\n", size.budget)),
            }
        }
    }
    match inspection.weights_checked {
        Some(n) => out.push_str(&format!(
            "\nweights: all {n} text tensors present with the planned shapes{}{} ({} other tensors not used)\n",
            inspection
                .vision
                .as_ref()
                .and_then(|v| v.tensors_checked)
                .map_or(String::new(), |v| format!(", all {v} vision tensors")),
            inspection
                .audio
                .as_ref()
                .and_then(|a| a.tensors_checked)
                .map_or(String::new(), |a| format!(", all {a} audio tensors")),
            inspection.tensors_not_used_by_text_model
        )),
        None => out.push_str("\nweights: none in this directory (config only)\n"),
    }
    out.push_str(&format_reference_memory(&inspection.reference_memory));
    if let Some(memory) = &inspection.memory {
        out.push_str(&format_memory(memory, inspection.config.text.moe.as_ref()));
    }
    out
}

/// The reference's planned peak, in memory and streamed, and what this machine can do.
fn format_reference_memory(plan: &MemoryPlan) -> String {
    let mut out = format!(
        "\nmemory of the reference (f32), for a dump of {PLAN_TOKENS} tokens + {PLAN_DECODE} decode steps:\n  \
         weights in memory:       peak {} ({})\n  weights streamed:        peak {} ({})\n",
        bytes_and_gib(plan.in_memory_peak()),
        plan.describe(Residence::InMemory),
        bytes_and_gib(plan.streamed_peak()),
        plan.describe(Residence::Streamed),
    );
    if let Some(limit) = memory_limit() {
        let verdict = match plan.choose(Residence::Auto, Some(limit)) {
            Ok(residence) => format!("runs with the weights {}", residence.name()),
            Err(_) => {
                "does not fit even streamed (use --tensors to keep a smaller dump)".to_string()
            }
        };
        out.push_str(&format!(
            "  under {} ({}): {verdict}\n",
            bytes_and_gib(limit.bytes),
            limit.source
        ));
    }
    out
}

/// The vision tower's plan.
fn format_vision(vision: &VisionInspection, text_hidden: usize) -> String {
    let c = &vision.config;
    let kind = if c.standardize {
        "large (standardize)"
    } else if c.use_clipped_linears {
        "on-device (clipped linears)"
    } else {
        "plain"
    };
    format!(
        "\nvision tower: {kind}; {} layers, width {}, {} heads x {} (KV heads {}), MLP {} (gated GELU-tanh)\n  patches {}x{} px, pooled {}x{} into a soft token, position tables 2 x {}, 2D RoPE theta {}, RMSNorm eps {}\n  projector {} -> {} (weight-free RMSNorm, bias-free linear); {} parameters\n",
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.head_dim,
        c.num_key_value_heads,
        c.intermediate_size,
        c.patch_size,
        c.patch_size,
        c.pooling_kernel_size,
        c.pooling_kernel_size,
        c.position_embedding_size,
        c.rope_theta,
        c.rms_norm_eps,
        c.hidden_size,
        text_hidden,
        thousands(vision.parameters),
    )
}

/// `bytes` with its GiB value.
fn bytes_and_gib(bytes: u64) -> String {
    format!(
        "{} bytes ({:.2} GiB)",
        thousands(bytes),
        bytes as f64 / (1u64 << 30) as f64
    )
}

/// The optimized engine's memory on this checkpoint, and whether it fits this machine.
fn format_memory(
    memory: &EngineMemory,
    moe: Option<&gemma4_reference::config::MoeConfig>,
) -> String {
    let mut out = String::from(
        "\nmemory of the optimized engine (weights memory-mapped as stored, never copied):\n",
    );
    out.push_str(&format!(
        "  checkpoint files:        {}\n  text weights mapped:     {}\n",
        bytes_and_gib(memory.checkpoint_file_bytes),
        bytes_and_gib(memory.text_weight_bytes)
    ));
    if memory.ple_table_bytes > 0 {
        out.push_str(&format!(
            "  PLE table:               {}, stays on disk: {} bytes read per distinct token\n",
            bytes_and_gib(memory.ple_table_bytes),
            thousands(memory.ple_row_bytes)
        ));
    }
    if let (Some(moe), true) = (moe, memory.expert_bytes > 0) {
        out.push_str(&format!(
            "  MoE experts:             {}; a token reads {} of {} experts, but routed experts stay resident\n",
            bytes_and_gib(memory.expert_bytes),
            moe.top_k_experts,
            moe.num_experts
        ));
    }
    out.push_str(&format!(
        "  resident while running:  {} of weights (all but the PLE table), plus the KV cache above and a few MB of activations\n",
        bytes_and_gib(memory.resident_weight_bytes)
    ));
    if let Some(ram) = memory.machine_memory_bytes {
        let verdict = if memory.resident_weight_bytes < ram {
            "fits".to_string()
        } else {
            format!(
                "does not fit: the engine still runs, reading the {} that do not fit from disk on every pass \
                 (speed then bounded by the disk's read rate)",
                bytes_and_gib(memory.resident_weight_bytes - ram)
            )
        };
        out.push_str(&format!(
            "  this machine:            {} of RAM: {verdict}\n",
            bytes_and_gib(ram)
        ));
    }
    out
}
