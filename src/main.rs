//! The `gemma4` command (shared contracts §1).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use gemma4::compare::{format_report, run_compare, CompareOptions, ExpectedSource};
use gemma4::conform::{format_table, run_case_on_engines};
use gemma4::engine::{DumpOptions, Engine};
use gemma4::golden::{golden_dir, load_cases};
use gemma4::inspect::{format_inspection, inspect};
use gemma4::prompt::{build_prompt, MediaOptions};
use gemma4::reference::dump::TensorFilter;
use gemma4::reference::memory_plan::{format_bytes, peak_resident_bytes};
use gemma4::reference::weight_stream::Residence;
use gemma4::reference::ComputeDtype;
use gemma4::tokens::parse_token_list;
use gemma4_reference::precision::PrecisionSet;

#[derive(Parser)]
#[command(
    name = "gemma4",
    version,
    about = "Gemma 4 reference implementation and conformance suite"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every bundled golden case through the engines and print one table; exit 0 only if all pass.
    Conform(ConformArgs),
    /// Write the activation dump of a checkpoint for some token ids.
    Dump(DumpArgs),
    /// Compare a candidate dump with an expected one and report the first divergence.
    Compare(CompareArgs),
    /// Print the layer plan, parameter counts and KV-cache sizes of a checkpoint (config.json suffices).
    Inspect(InspectArgs),
    /// Generate text from a prompt or a chat (the checkpoint's tokenizer, chat template and
    /// sampling settings; images and audio in the prompt), streamed, with the speeds at the end.
    Generate(GenerateArgs),
}

#[derive(Args)]
struct GenerateArgs {
    /// Checkpoint directory (config.json, weights, tokenizer.json; chat_template.jinja or
    /// tokenizer_config.json for --chat; generation_config.json for the sampling defaults).
    #[arg(long)]
    model: PathBuf,
    /// The prompt: sent as is, or with --chat as the user's message.
    #[arg(long, required_unless_present = "messages")]
    prompt: Option<String>,
    /// Render the conversation with the checkpoint's chat template (generation prompt added).
    #[arg(long)]
    chat: bool,
    /// With --chat: a system message before the prompt.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// With --chat: the conversation as a JSON file, `[{"role": "user", "content": "..."}]`;
    /// content may be a list of parts `{"type": "text", "text": ...}`, `{"type": "image",
    /// "path": FILE}`, `{"type": "audio", "path": FILE.wav}`. --prompt, if given, is added as a
    /// last user message.
    #[arg(long, requires = "chat")]
    messages: Option<PathBuf>,
    /// With --chat: Gemma 4's thinking mode (`enable_thinking`).
    #[arg(long, requires = "chat")]
    thinking: bool,
    /// Never put BOS in front of the prompt (the tokenizer's config adds one otherwise).
    #[arg(long)]
    no_bos: bool,
    /// Print the prompt as rendered and its token ids (stderr), then generate.
    #[arg(long)]
    show_prompt: bool,
    /// Print the generated token ids at the end (stderr; special and unknown tokens included).
    #[arg(long)]
    show_ids: bool,
    /// An image (PNG, JPEG, WebP, GIF) for the prompt (repeatable, in order). With --chat it
    /// goes before the prompt's text; without, at each `<|image|>` of the prompt.
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// Soft tokens per image: 70, 140, 280, 560 or 1120.
    #[arg(long, default_value_t = 280)]
    image_budget: usize,
    /// A WAV file (16 kHz mono) for the prompt (repeatable), placed like --image at `<|audio|>`.
    #[arg(long = "audio")]
    audio: Vec<PathBuf>,
    /// At most this many new tokens (fewer if an end-of-sequence id comes first).
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Take the most likely token at every step, whatever generation_config.json says.
    #[arg(long)]
    greedy: bool,
    /// Sampling temperature (sets sampling on; default: generation_config.json's).
    #[arg(long)]
    temperature: Option<f32>,
    /// Keep the K most likely tokens (0: all).
    #[arg(long)]
    top_k: Option<usize>,
    /// Keep the most likely tokens up to this probability mass.
    #[arg(long)]
    top_p: Option<f32>,
    /// Drop tokens less likely than this fraction of the most likely one.
    #[arg(long)]
    min_p: Option<f32>,
    /// Penalise tokens already in the sequence (HF's repetition penalty; 1: off).
    #[arg(long)]
    repetition_penalty: Option<f32>,
    /// Seed of the sampler: the same seed gives the same tokens, on any thread count.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Which engine computes the logits.
    #[arg(long, value_enum, default_value = "optimized")]
    engine: Engine,
    /// Threads of the optimized engine (default: RAYON_NUM_THREADS, else one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Optimized engine on bf16 weights: run the prompt's matrix products (the towers' too) on
    /// bf16-rounded activations (AMX or AVX-512 BF16), as torch and llama.cpp do; faster, not
    /// the reference's float32 arithmetic.
    #[arg(long)]
    fast_prefill: bool,
    /// No progress display and no speed line (errors still go to stderr).
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct ConformArgs {
    /// Golden directory (default: ./golden, or the one next to the sources).
    #[arg(long)]
    golden: Option<PathBuf>,
    /// Engines to run (repeatable; default: reference and optimized).
    #[arg(long, value_enum)]
    engine: Vec<Engine>,
    /// Only the cases whose name contains this string.
    #[arg(long)]
    case: Option<String>,
    /// Threads of the optimized engine (default: RAYON_NUM_THREADS, else one per core).
    #[arg(long)]
    threads: Option<usize>,
    #[command(flatten)]
    memory: MemoryArgs,
}

/// Memory: a limit, and where the reference keeps its weights (shared contracts §1).
#[derive(Args)]
struct MemoryArgs {
    /// The most memory the run may use, in bytes (suffixes K, M, G, T: powers of 1024, e.g.
    /// 6G). The plan's peak is checked against it (and GEMMA4_MEMORY_LIMIT and the memory
    /// available) before any weight is read; the peak reached is printed at the end.
    #[arg(long, value_parser = parse_bytes)]
    max_memory: Option<u64>,
    /// Where the reference keeps the text weights: in memory (widened to f32 at load), streamed
    /// (each layer read from disk when the pass reaches it), or auto (in memory if the plan fits
    /// the limit, else streamed).
    #[arg(long, value_parser = parse_residence, default_value = "auto")]
    weights: Residence,
}

impl MemoryArgs {
    /// Applies `--max-memory` to this process.
    fn apply(&self) {
        if let Some(bytes) = self.max_memory {
            gemma4::reference::memory::set_memory_limit(bytes);
        }
    }
}

/// `auto`, `in-memory` or `streamed`.
fn parse_residence(text: &str) -> Result<Residence, String> {
    match text {
        "auto" => Ok(Residence::Auto),
        "in-memory" => Ok(Residence::InMemory),
        "streamed" => Ok(Residence::Streamed),
        _ => Err(format!("`{text}`: expected auto, in-memory or streamed")),
    }
}

/// `6442450944`, `6G`, `512M`, `1.5G` (powers of 1024; an optional trailing `B` or `iB`).
fn parse_bytes(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let body = trimmed
        .strip_suffix("iB")
        .or_else(|| trimmed.strip_suffix('B'))
        .unwrap_or(trimmed);
    let (number, scale) = match body.char_indices().last() {
        Some((at, unit)) if unit.is_ascii_alphabetic() => {
            let power = match unit.to_ascii_uppercase() {
                'K' => 1,
                'M' => 2,
                'G' => 3,
                'T' => 4,
                _ => return Err(format!("`{text}`: unknown unit `{unit}` (K, M, G or T)")),
            };
            (&body[..at], 1024f64.powi(power))
        }
        _ => (body, 1.0),
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number of bytes (e.g. 6442450944 or 6G)"))?;
    let bytes = value * scale;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!(
            "`{text}`: a memory limit must be a positive number of bytes"
        ));
    }
    Ok(bytes as u64)
}

/// Prints the peak resident memory of this process (stderr), as `dump`, `compare` and
/// `conform` do at the end of a run that worked (exit 0 or 1; not after an error, exit 2).
fn report_peak_memory(command: &str, code: ExitCode) -> ExitCode {
    if code == ExitCode::from(2) {
        return code;
    }
    if let Some(peak) = peak_resident_bytes() {
        eprintln!("{command}: peak resident memory {}", format_bytes(peak));
    }
    code
}

/// The images and audio clips of a prompt (shared contracts §1).
#[derive(Args)]
struct MediaArgs {
    /// An image file (PNG, JPEG, WebP, GIF) whose soft tokens fill the next run of image
    /// placeholders in --tokens (repeatable, in order).
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// Soft tokens per image: 70, 140, 280, 560 or 1120.
    #[arg(long, default_value_t = 280)]
    image_budget: usize,
    /// Preprocessed images instead of files: `pixel_values` [n, 768] F32 in [0, 1] and
    /// `image_position_ids` [n, 2] I64 (x, y), valid patches only (`.0`, `.1`, ... for several).
    #[arg(long, conflicts_with = "images")]
    pixel_values: Option<PathBuf>,
    /// A WAV file (16 kHz mono; 8/16/24/32-bit integer or 32-bit float) whose soft tokens fill
    /// the next run of audio placeholders in --tokens (repeatable, in order).
    #[arg(long = "audio")]
    audio: Vec<PathBuf>,
    /// Log-mel features of audio clips instead of WAV files: `input_features` [frames, 128] F32,
    /// valid frames only (`.0`, `.1`, ... for several clips); their soft tokens fill the runs
    /// of audio placeholders in --tokens, in order.
    #[arg(long, conflicts_with = "audio")]
    audio_features: Option<PathBuf>,
}

impl MediaArgs {
    fn options(&self) -> MediaOptions {
        MediaOptions {
            images: self.images.clone(),
            image_budget: self.image_budget,
            pixel_values: self.pixel_values.clone(),
            audio: self.audio.clone(),
            audio_features: self.audio_features.clone(),
        }
    }
}

#[derive(Args)]
struct DumpArgs {
    /// Checkpoint directory (config.json + safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Comma-separated token ids, e.g. 2,17,301.
    #[arg(long)]
    tokens: String,
    /// Output safetensors file.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "reference")]
    engine: Engine,
    /// Also generate N tokens greedily as Hugging Face `generate` does: `decode_logits` holds the
    /// logits row that chose each of them (row 0 is the prefill's last row), then N - 1 single
    /// tokens go through the KV cache.
    #[arg(long, default_value_t = 0)]
    decode: usize,
    /// Threads of the optimized engine (default: RAYON_NUM_THREADS, else one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// The arithmetic to imitate: float32 (default, what Hugging Face computes with
    /// torch_dtype=float32, whatever dtype the checkpoint is stored in), or bf16 / f16 for a
    /// model run in that dtype (the embedding scales are then rounded to it).
    #[arg(long, default_value = "float32")]
    compute_dtype: ComputeDtype,
    /// Keep only these tensors (and input_ids): comma-separated names, where `*` matches within
    /// one dot-separated part and `**` across parts, e.g. `logits,layers.*.output` or
    /// `vision.**`. Everything is still computed and checked.
    #[arg(long)]
    tensors: Option<String>,
    #[command(flatten)]
    memory: MemoryArgs,
    #[command(flatten)]
    media: MediaArgs,
}

#[derive(Args)]
struct CompareArgs {
    /// The expected dump.
    #[arg(long, conflicts_with_all = ["model", "tokens"])]
    expected: Option<PathBuf>,
    /// Compute the expected dump with the reference from this checkpoint...
    #[arg(long, requires = "tokens")]
    model: Option<PathBuf>,
    /// ...for these token ids.
    #[arg(long, requires = "model")]
    tokens: Option<String>,
    /// The candidate dump (a port's), F32, BF16 or F16.
    #[arg(long)]
    candidate: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Skip the diagnosis (re-running the reference once per known fault) with --model.
    #[arg(long)]
    no_diagnosis: bool,
    /// With --model: the arithmetic the reference imitates. float32 (default) is what Hugging
    /// Face computes with torch_dtype=float32, whatever dtype the checkpoint is stored in; bf16
    /// or f16 judge a port that runs the model in that dtype (embedding scales rounded to it).
    #[arg(long, default_value = "float32")]
    compute_dtype: ComputeDtype,
    /// With --model: judge the port at a runtime's precision choices instead of float32 — a
    /// profile (llama-cpp-cpu, llama-cpp-cpu-no-flash-attention, llama-cpp-cpu-q8-cache,
    /// llama-cpp-cpu-f32-cache-no-flash-attention) or choice ids separated by commas (kv_cache_f16, kv_cache_q8_0,
    /// attention_f16_operands, flash_attention_f16, gelu_f16_table, bf16_activations). The
    /// reference rounds where that runtime rounds, and each tensor may differ by twice what
    /// the rounding moves it (docs/conformance.md, "Precision choices").
    #[arg(long, default_value = "float32")]
    precision: PrecisionSet,
    #[command(flatten)]
    memory: MemoryArgs,
    #[command(flatten)]
    media: MediaArgs,
}

#[derive(Args)]
struct InspectArgs {
    /// Checkpoint directory; only config.json is required.
    #[arg(long)]
    model: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Also print the resized size and soft-token count of a WIDTHxHEIGHT image at every budget.
    #[arg(long, value_parser = parse_image_size)]
    image_size: Option<(usize, usize)>,
    /// Also print the samples, log-mel frames and soft tokens of an audio clip of this many
    /// seconds (16 kHz; clips are cut to 30 s).
    #[arg(long, value_parser = parse_seconds)]
    audio_seconds: Option<f64>,
}

/// A clip length in seconds: a finite number ≥ 0.
fn parse_seconds(text: &str) -> Result<f64, String> {
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0 && *s <= 1e6)
        .ok_or_else(|| format!("`{text}` is not a number of seconds between 0 and 1000000"))
}

/// `WIDTHxHEIGHT` (e.g. `640x480`) as `(width, height)`.
fn parse_image_size(text: &str) -> Result<(usize, usize), String> {
    let (w, h) = text
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("`{text}` is not WIDTHxHEIGHT (e.g. 640x480)"))?;
    let parse = |v: &str, what: &str| {
        v.trim()
            .parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("the {what} `{v}` of `{text}` is not a positive integer"))
    };
    Ok((parse(w, "width")?, parse(h, "height")?))
}

fn main() -> ExitCode {
    gemma4_optimized::allocator::reuse_freed_buffers();
    let cli = Cli::parse();
    match cli.command {
        Command::Conform(args) => {
            args.memory.apply();
            report_peak_memory("gemma4 conform", conform(args))
        }
        Command::Dump(args) => {
            args.memory.apply();
            report_peak_memory("gemma4 dump", dump(args))
        }
        Command::Compare(args) => {
            args.memory.apply();
            report_peak_memory("gemma4 compare", compare(args))
        }
        Command::Inspect(args) => inspect_command(args),
        Command::Generate(args) => generate_command(args),
    }
}

fn conform(args: ConformArgs) -> ExitCode {
    let golden = args.golden.unwrap_or_else(golden_dir);
    let cases = match load_cases(&golden) {
        Ok(cases) => cases,
        Err(e) => {
            eprintln!("gemma4 conform: {e}");
            return ExitCode::from(2);
        }
    };
    let engines = if args.engine.is_empty() {
        vec![Engine::Reference, Engine::Optimized]
    } else {
        args.engine
    };
    let options = DumpOptions {
        threads: args.threads,
        residence: args.memory.weights,
        ..DumpOptions::default()
    };
    let mut outcomes = Vec::new();
    for case in cases.iter().filter(|c| {
        args.case
            .as_ref()
            .is_none_or(|f| c.name.contains(f.as_str()))
    }) {
        outcomes.extend(run_case_on_engines(case, &engines, &options));
    }
    if outcomes.is_empty() {
        eprintln!(
            "gemma4 conform: no golden case selected in {}",
            golden.display()
        );
        return ExitCode::from(2);
    }
    print!("{}", format_table(&outcomes));
    let failed = outcomes.iter().filter(|o| !o.passed()).count();
    if failed == 0 {
        println!("\nall {} case x engine runs conform", outcomes.len());
        ExitCode::SUCCESS
    } else {
        println!(
            "\n{failed} of {} case x engine runs do NOT conform",
            outcomes.len()
        );
        ExitCode::from(1)
    }
}

fn dump(args: DumpArgs) -> ExitCode {
    let tokens = match parse_token_list(&args.tokens) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("gemma4 dump: --tokens: {e}");
            return ExitCode::from(2);
        }
    };
    let tensors = match args.tensors.as_deref().map(TensorFilter::parse).transpose() {
        Ok(filter) => filter.unwrap_or_default(),
        Err(e) => {
            eprintln!("gemma4 dump: {e}");
            return ExitCode::from(2);
        }
    };
    let options = DumpOptions {
        threads: args.threads,
        compute_dtype: args.compute_dtype,
        residence: args.memory.weights,
        tensors: tensors.clone(),
        report_memory: true,
    };
    let result = build_prompt(tokens, &args.media.options())
        .and_then(|prompt| {
            args.engine
                .dump_prompt(&args.model, &prompt, args.decode, &options)
        })
        .and_then(|dump| {
            // A pattern that kept nothing is a typo, not a request for an empty dump.
            let unmatched = tensors.unmatched(&dump.names_in_model_order());
            if unmatched.is_empty() {
                Ok(dump)
            } else {
                Err(gemma4::reference::Error::Input {
                    message: format!(
                    "--tensors: `{}` matched no tensor of this run (names: shared contracts §2, \
                     e.g. logits, layers.0.output, layers.*.attn.q)",
                    unmatched.join("`, `")
                ),
                })
            }
        })
        .and_then(|dump| {
            dump.write(&args.out, &[("engine", args.engine.name())])
                .map(|()| dump.len())
        });
    match result {
        Ok(n) => {
            eprintln!("wrote {n} tensors to {}", args.out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gemma4 dump: {e}");
            ExitCode::from(2)
        }
    }
}

fn compare(args: CompareArgs) -> ExitCode {
    let tokens = match &args.tokens {
        Some(text) => match parse_token_list(text) {
            Ok(tokens) => Some(tokens),
            Err(e) => {
                eprintln!("gemma4 compare: --tokens: {e}");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let prompt = match tokens
        .map(|t| build_prompt(t, &args.media.options()))
        .transpose()
    {
        Ok(prompt) => prompt,
        Err(e) => {
            eprintln!("gemma4 compare: {e}");
            return ExitCode::from(2);
        }
    };
    let source = match (&args.expected, &args.model, &prompt) {
        (Some(path), _, _) => ExpectedSource::File(path),
        (None, Some(model), Some(prompt)) => ExpectedSource::Reference { model, prompt },
        _ => {
            eprintln!("gemma4 compare: give --expected FILE, or --model DIR with --tokens LIST");
            return ExitCode::from(2);
        }
    };
    if !args.precision.is_float32() && args.model.is_none() {
        // The precision is imitated by the reference: an expected dump read from a file has none.
        eprintln!(
            "gemma4 compare: --precision {} needs --model and --tokens (the reference rounds where that runtime rounds); an --expected dump is judged at its own precision",
            args.precision
        );
        return ExitCode::from(2);
    }
    let options = CompareOptions {
        compute_dtype: args.compute_dtype,
        precision: args.precision,
        diagnose: !args.no_diagnosis,
        residence: args.memory.weights,
    };
    match run_compare(source, &args.candidate, options) {
        Err(e) => {
            eprintln!("gemma4 compare: {e}");
            ExitCode::from(2)
        }
        Ok(report) => {
            let text = if args.json {
                serde_json::to_string_pretty(&report).expect("serialisable") + "\n"
            } else {
                format_report(&report)
            };
            // A closed pipe (`| head`) is not an error of the comparison.
            let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
            if report.conformant {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
    }
}

fn inspect_command(args: InspectArgs) -> ExitCode {
    match inspect(&args.model) {
        Ok(mut inspection) => {
            if let Some((width, height)) = args.image_size {
                inspection.image_sizes = gemma4::inspect::image_sizes(height, width);
            }
            if let Some(seconds) = args.audio_seconds {
                inspection.audio_clip = Some(gemma4::inspect::audio_clip(seconds));
            }
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&inspection).expect("serialisable")
                );
            } else {
                print!("{}", format_inspection(&inspection));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gemma4 inspect: {e}");
            ExitCode::from(2)
        }
    }
}

fn generate_command(args: GenerateArgs) -> ExitCode {
    use gemma4::generate_cli::GenerateCommand;
    let sampling = gemma4::generate::SamplingOverrides {
        greedy: args.greedy,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repetition_penalty: args.repetition_penalty,
    };
    gemma4::generate_cli::run(GenerateCommand {
        model: args.model,
        prompt: args.prompt,
        chat: args.chat,
        system: args.system,
        messages: args.messages,
        thinking: args.thinking,
        no_bos: args.no_bos,
        show_prompt: args.show_prompt,
        show_ids: args.show_ids,
        images: args.images,
        image_budget: args.image_budget,
        audio: args.audio,
        options: gemma4::generate::GenerateOptions {
            engine: args.engine,
            threads: args.threads,
            fast_prefill: args.fast_prefill,
            max_new_tokens: args.max_new_tokens,
            sampling,
            seed: args.seed,
        },
        quiet: args.quiet,
    })
}
