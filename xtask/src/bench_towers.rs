//! The tower rows of `cargo xtask bench` (`--part towers`): seconds per image through the vision
//! towers and per clip through the audio tower, for the optimized engine, the reference and
//! Hugging Face transformers, measured in the same run (multimodal spec §1 and §2).
//!
//! Checkpoints: `cargo xtask synth --variant e2b --towers --layers 1` (the on-device vision
//! tower, 768 wide, 16 layers, and the audio tower, 1024 wide, 12 conformer layers, at their real
//! dimensions; the text decoder cut to one layer, which no workload here runs) and
//! `--variant 31b --towers --layers 1` (the large vision tower, 1152 wide, 27 layers).
//!
//! What is timed, the same for every engine:
//! - an image: its preprocessed patches to soft tokens in the text width (patch embedding,
//!   encoder layers, 3×3 pooling, standardize where the tower has it, the projector). Decoding and
//!   resizing the file are not timed for any engine;
//! - a clip: its waveform to soft tokens in the text width (the log-mel front end, the
//!   subsampling convolutions, the conformer layers, the output projection, the projector).
//!
//! Our engines time `embed_prompt` on a prompt of BOI + the image's (clip's) placeholders + EOI
//! (the text part of that is a table lookup per token); Hugging Face's script
//! (`xtask/scripts/bench_hf_towers.py`) times `get_image_features` (`get_audio_features` after
//! its feature extractor), in float32 and in bfloat16.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use gemma4::generate::expand_placeholders;
use gemma4::prompt::{build_prompt, MediaOptions};
use gemma4_optimized::linear::Precision;
use gemma4_optimized::Gemma4Optimized;
use gemma4_reference::audio::AudioInput;
use gemma4_reference::dump::Recorder;
use gemma4_reference::merge::Prompt;
use gemma4_reference::{Gemma4TextModel, ModelConfig};
use serde_json::{json, Value};

use crate::bench::{
    cpu_description, measure, median, own_niceness, peak_rss, BenchArgs, BenchEngineArgs,
};
use crate::golden::venv_dir;
use crate::process::repo_root;

/// The image of the vision rows: scikit-image's `astronaut` photograph (public domain, NASA),
/// 512×512, as committed under `golden/image_preprocessing/` (square: 16×16 soft tokens at
/// budget 280, 32×32 at 1120).
const IMAGE: &str = "golden/image_preprocessing/images/astronaut.png";
/// The speech of the audio rows: the 31 s speech-like clip of `golden/audio_front_end/`, cut to
/// the row's length (written under `target/bench-media/`).
const SPEECH: &str = "golden/audio_front_end/wav/voice_31s.wav";

/// What one row feeds its tower.
#[derive(Clone, Debug)]
enum Media {
    Image { budget: usize },
    Audio { seconds: usize },
}

/// One row of the tower table.
struct Row {
    tower: &'static str,
    model: PathBuf,
    media: Media,
}

/// The child process of a tower row (`bench-engine --image FILE --budget B` or `--audio FILE`):
/// loads the engine with the tower, then times `embed_prompt` (a warm-up pass first for the
/// optimized engine, whose weights are mapped; the reference holds them in RAM from the load).
pub fn run_engine(args: &BenchEngineArgs) -> Result<(), String> {
    let err = |e: gemma4_reference::Error| e.to_string();
    let config = ModelConfig::from_dir(&args.model).map_err(err)?;
    let media = MediaOptions {
        images: args.image.iter().cloned().collect(),
        image_budget: args.budget,
        audio: args.audio.iter().cloned().collect(),
        ..MediaOptions::default()
    };
    let mut prompt = build_prompt(Vec::new(), &media).map_err(err)?;
    let (soft_tokens, input_size) = placeholders(&config, &mut prompt).map_err(err)?;
    let started = Instant::now();
    let mut times = Vec::new();
    let threads = match args.engine.as_str() {
        "optimized" => {
            let precision = match args.precision.as_str() {
                "f32" => Precision::F32,
                "bf16" => Precision::Bf16Activations,
                other => return Err(format!("--precision {other}: expected f32 or bf16")),
            };
            let model = Gemma4Optimized::load_for(&args.model, &prompt, Some(args.threads))
                .map_err(err)?
                .with_precision(precision);
            let load_s = started.elapsed().as_secs_f64();
            model
                .embed_prompt(&prompt, &mut Recorder::checking_only())
                .map_err(err)?;
            for _ in 0..args.runs.max(1) {
                let t0 = Instant::now();
                model
                    .embed_prompt(&prompt, &mut Recorder::checking_only())
                    .map_err(err)?;
                times.push(t0.elapsed().as_secs_f64());
            }
            (model.threads(), load_s)
        }
        "reference" => {
            let model = Gemma4TextModel::load_for(&args.model, &prompt).map_err(err)?;
            let load_s = started.elapsed().as_secs_f64();
            for _ in 0..args.runs.max(1) {
                let t0 = Instant::now();
                model
                    .embed_prompt(&prompt, &mut Recorder::checking_only())
                    .map_err(err)?;
                times.push(t0.elapsed().as_secs_f64());
            }
            (1, load_s)
        }
        other => return Err(format!("--engine {other}: expected reference or optimized")),
    };
    let (threads, load_s) = threads;
    println!(
        "{}",
        json!({
            "engine": args.engine,
            "precision": args.precision,
            "threads": threads,
            "load_s": load_s,
            "seconds": median(&times),
            "runs_s": times,
            "soft_tokens": soft_tokens,
            "input": input_size,
            "peak_rss_bytes": peak_rss(),
        })
    );
    Ok(())
}

/// Fills `prompt.tokens` with BOI + one placeholder per soft token + EOI for its one image or
/// clip (`gemma4::generate::expand_placeholders`, ids from `config.json`); returns the
/// soft-token count and the input's size (`patches` of the image, `samples` of the clip).
fn placeholders(
    config: &ModelConfig,
    prompt: &mut Prompt,
) -> gemma4_reference::Result<(usize, Value)> {
    let ids = &config.special_tokens;
    let (placeholder, size) = match (prompt.images.first(), prompt.audio.first()) {
        (Some(image), _) => (
            ids.image_token_id,
            json!({"patches": image.positions.len()}),
        ),
        (None, Some(AudioInput::Waveform { waveform, .. })) => (
            ids.audio_token_id,
            json!({"samples": waveform.samples.len()}),
        ),
        _ => (ids.audio_token_id, json!({})),
    };
    let placeholder = placeholder.ok_or_else(|| gemma4_reference::Error::Input {
        message: format!(
            "{}: no placeholder id for the input in config.json",
            config.path.display()
        ),
    })?;
    prompt.tokens = expand_placeholders(config, &[placeholder], prompt)?;
    // BOI and EOI around the soft tokens.
    Ok((prompt.tokens.len() - 2, size))
}

/// The first `seconds` of [`SPEECH`] as a WAV file under `target/bench-media/` (written once).
fn speech_clip(seconds: usize) -> Result<PathBuf, String> {
    let source = repo_root().join(SPEECH);
    fn fail(path: &std::path::Path) -> impl Fn(hound::Error) -> String + '_ {
        move |e| format!("{}: {e}", path.display())
    }
    let mut reader = hound::WavReader::open(&source).map_err(fail(&source))?;
    let spec = reader.spec();
    let wanted = seconds * spec.sample_rate as usize;
    let samples: Vec<i16> = reader
        .samples::<i16>()
        .take(wanted)
        .collect::<Result<_, _>>()
        .map_err(fail(&source))?;
    if samples.len() < wanted {
        return Err(format!("{}: shorter than {seconds} s", source.display()));
    }
    let dir = repo_root().join("target/bench-media");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join(format!("speech_{seconds}s.wav"));
    let mut writer = hound::WavWriter::create(&path, spec).map_err(fail(&path))?;
    for sample in samples {
        writer.write_sample(sample).map_err(fail(&path))?;
    }
    writer.finalize().map_err(fail(&path))?;
    Ok(path)
}

/// The media arguments of a row, for our child and for Hugging Face's script.
fn media_args(media: &Media) -> Result<Vec<String>, String> {
    Ok(match media {
        Media::Image { budget } => vec![
            "--image".into(),
            repo_root().join(IMAGE).display().to_string(),
            "--budget".into(),
            budget.to_string(),
        ],
        Media::Audio { seconds } => vec![
            "--audio".into(),
            speech_clip(*seconds)?.display().to_string(),
        ],
    })
}

/// One of our engines on a row.
fn measure_ours(
    engine: &str,
    precision: &str,
    row: &Row,
    runs: usize,
    args: &BenchArgs,
) -> Result<Value, String> {
    let mut command = Command::new(std::env::current_exe().expect("own path"));
    command
        .arg("bench-engine")
        .args(["--engine", engine])
        .args(["--precision", precision])
        .arg("--model")
        .arg(&row.model)
        .args(["--threads", &args.threads.to_string()])
        .args(["--runs", &runs.to_string()])
        .args(media_args(&row.media)?)
        .env("RAYON_NUM_THREADS", args.threads.to_string());
    measure(
        command,
        args,
        &format!("{engine} {precision}, {}", describe(row)),
    )
}

/// Hugging Face on a row, weights and compute in `dtype`; `None` (reason on stderr) if it fails.
fn measure_hf(dtype: &str, row: &Row, args: &BenchArgs) -> Option<Value> {
    let mut command = Command::new(venv_dir(args.venv.as_deref()).join("bin/python"));
    command
        .arg(repo_root().join("xtask/scripts/bench_hf_towers.py"))
        .arg("--model")
        .arg(&row.model)
        .args(["--threads", &args.threads.to_string()])
        .args(["--dtype", dtype])
        .args(media_args(&row.media).ok()?);
    measure(command, args, &format!("HF {dtype}, {}", describe(row)))
        .map_err(|e| eprintln!("xtask bench: {e}"))
        .ok()
}

fn describe(row: &Row) -> String {
    match row.media {
        Media::Image { budget } => format!("{}, image at budget {budget}", row.tower),
        Media::Audio { seconds } => format!("{}, {seconds} s of speech", row.tower),
    }
}

/// The measured values of one row.
struct Measured {
    optimized: Value,
    /// `--precision bf16` (the fast prefill's bf16 products on AMX).
    fast: Value,
    reference: Value,
    hf_f32: Option<Value>,
    hf_bf16: Option<Value>,
}

/// Runs every tower row (ours and HF `--rounds` times in rotation, the reference once) and
/// returns the report section.
pub fn run(args: &BenchArgs) -> Result<String, String> {
    for (dir, variant) in [
        (&args.towers_model, "e2b"),
        (&args.large_towers_model, "31b"),
    ] {
        if !dir.join("config.json").exists() {
            return Err(format!(
                "{} has no checkpoint: make it with `cargo xtask synth --variant {variant} --towers --layers 1 --out {}`",
                dir.display(),
                dir.display()
            ));
        }
    }
    let on_device = "E2B on-device vision tower (768 wide, 16 layers)";
    let rows = [
        Row {
            tower: on_device,
            model: args.towers_model.clone(),
            media: Media::Image { budget: 280 },
        },
        Row {
            tower: on_device,
            model: args.towers_model.clone(),
            media: Media::Image { budget: 1120 },
        },
        Row {
            tower: "31B large vision tower (1152 wide, 27 layers)",
            model: args.large_towers_model.clone(),
            media: Media::Image { budget: 280 },
        },
        Row {
            tower: "E2B audio tower (1024 wide, 12 conformer layers)",
            model: args.towers_model.clone(),
            media: Media::Audio { seconds: 10 },
        },
        Row {
            tower: "E2B audio tower (1024 wide, 12 conformer layers)",
            model: args.towers_model.clone(),
            media: Media::Audio { seconds: 30 },
        },
    ];
    let mut measured = Vec::new();
    for row in &rows {
        let (mut optimized, mut fast) = (Vec::new(), Vec::new());
        let (mut hf_f32, mut hf_bf16) = (Vec::new(), Vec::new());
        for _ in 0..args.rounds.max(1) {
            optimized.push(measure_ours("optimized", "f32", row, 3, args)?);
            fast.push(measure_ours("optimized", "bf16", row, 3, args)?);
            if !args.skip_hf {
                hf_f32.extend(measure_hf("float32", row, args));
                hf_bf16.extend(measure_hf("bfloat16", row, args));
            }
        }
        let reference = measure_ours("reference", "f32", row, 1, args)?;
        let pick = |runs: Vec<Value>| -> Option<Value> {
            let mut runs = runs;
            runs.sort_by(|a, b| seconds(a).total_cmp(&seconds(b)));
            let middle = runs.len() / 2;
            (!runs.is_empty()).then(|| runs.swap_remove(middle))
        };
        measured.push(Measured {
            optimized: pick(optimized).expect("at least one round"),
            fast: pick(fast).expect("at least one round"),
            reference,
            hf_f32: pick(hf_f32),
            hf_bf16: pick(hf_bf16),
        });
    }
    Ok(report(args, &rows, &measured))
}

fn seconds(v: &Value) -> f64 {
    v["seconds"].as_f64().unwrap_or(f64::NAN)
}

fn report(args: &BenchArgs, rows: &[Row], measured: &[Measured]) -> String {
    let mut out = String::new();
    out.push_str(TOWERS_MARKER);
    out.push_str("\n## Vision and audio towers\n\n");
    out.push_str(&format!(
        "Measured by `cargo xtask bench --part towers` on this project's machine ({}), {} threads, niceness {}, \
         random-weight bf16 checkpoints with the real tower dimensions made by `cargo xtask synth --towers --layers 1` \
         (the text decoder cut to one layer; no row runs it). An image row times the image's preprocessed patches to \
         soft tokens in the text width (patch embedding, encoder layers, 3×3 pooling, standardize on the large tower, \
         the projector); decoding and resizing the file are not timed for any engine. An audio row times a clip's \
         waveform to soft tokens (the log-mel front end, subsampling, conformer layers, output projection, projector). \
         Ours and Hugging Face: one warm-up pass, then the median of 3 passes{}; the reference: one pass. The image is \
         scikit-image's `astronaut` photograph (512×512, public domain; `{IMAGE}`), the speech the first 10 s / 30 s of \
         `{SPEECH}`.\n\n",
        cpu_description(),
        args.threads,
        own_niceness(),
        if args.rounds > 1 {
            format!(", the median run of {} rounds in rotation", args.rounds)
        } else {
            String::new()
        },
    ));
    out.push_str(
        "| tower | input | soft tokens | gemma4-optimized (f32) | gemma4-optimized `--fast-prefill` (bf16 products) | gemma4-reference (f32, 1 thread) | HF f32 | HF bf16 |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    let time =
        |v: Option<&Value>| v.map_or("failed".to_string(), |v| format!("{:.3} s", seconds(v)));
    let input = |row: &Row, m: &Measured| match row.media {
        Media::Image { budget } => format!(
            "image, budget {budget} ({} patches)",
            m.optimized["input"]["patches"]
        ),
        Media::Audio { seconds } => format!("{seconds} s of speech"),
    };
    for (row, m) in rows.iter().zip(measured) {
        out.push_str(&format!(
            "| {} | {} | {} | **{}** | **{}** | {} | {} | {} |\n",
            row.tower,
            input(row, m),
            m.optimized["soft_tokens"],
            time(Some(&m.optimized)),
            time(Some(&m.fast)),
            time(Some(&m.reference)),
            time(m.hf_f32.as_ref()),
            time(m.hf_bf16.as_ref()),
        ));
    }
    out.push_str(
        "\n| tower | input | f32: optimized vs HF f32 | f32: optimized vs reference | fast vs HF bf16 | fast vs best HF | fast vs reference | real time / f32 | real time / fast |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    let ratio =
        |a: Option<f64>, b: f64| a.map_or("—".to_string(), |a| format!("**{:.2}x**", a / b));
    for (row, m) in rows.iter().zip(measured) {
        let (ours, fast) = (seconds(&m.optimized), seconds(&m.fast));
        let hf_f32 = m.hf_f32.as_ref().map(seconds);
        let hf_bf16 = m.hf_bf16.as_ref().map(seconds);
        let best_hf = [hf_f32, hf_bf16]
            .into_iter()
            .flatten()
            .min_by(f64::total_cmp);
        let real_time = |t: f64| match row.media {
            Media::Audio { seconds } => format!("**{:.0}x**", seconds as f64 / t),
            Media::Image { .. } => "—".into(),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            row.tower,
            input(row, m),
            ratio(hf_f32, ours),
            ratio(Some(seconds(&m.reference)), ours),
            ratio(hf_bf16, fast),
            ratio(best_hf, fast),
            ratio(Some(seconds(&m.reference)), fast),
            real_time(ours),
            real_time(fast),
        ));
    }
    out.push_str(
        "\nRatios are the other engine's seconds over ours (above 1: ours is faster); \"best HF\" is the faster of Hugging \
         Face's two runs; \"real time\" is the clip's length over our time. Soft tokens are the same for every engine (HF's \
         count is in the raw results). The f32 rows are the reference's arithmetic (what dumps use); `--fast-prefill` rounds \
         the products' inputs to bf16 (torch's bf16 arithmetic), attention included, on AMX tiles where the CPU has them.\n\n\
         ### Raw results (towers)\n\n```\n",
    );
    for m in measured {
        for v in [
            Some(&m.optimized),
            Some(&m.reference),
            m.hf_f32.as_ref(),
            m.hf_bf16.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            out.push_str(&format!("{v}\n"));
        }
    }
    out.push_str(&format!(
        "```\n\n### Rerun (towers)\n\n```sh\ncargo xtask synth --variant e2b --towers --layers 1 --out {}\n\
         cargo xtask synth --variant 31b --towers --layers 1 --out {}\n\
         cargo xtask bench --part towers --towers-model {} --large-towers-model {}{}\n```\n\n\
         Hugging Face's script is `xtask/scripts/bench_hf_towers.py` (the oracle virtualenv of `cargo xtask golden`).\n",
        args.towers_model.display(),
        args.large_towers_model.display(),
        args.towers_model.display(),
        args.large_towers_model.display(),
        if args.rounds > 1 { format!(" --rounds {}", args.rounds) } else { String::new() },
    ));
    out
}

/// The line where the tower section of `docs/performance.md` starts: `--part text` keeps what
/// follows it, `--part towers` keeps what precedes it.
pub const TOWERS_MARKER: &str = "<!-- cargo xtask bench: tower rows below -->\n";

/// `existing` split into its text part, its tower part (from [`TOWERS_MARKER`] on) and what
/// other tasks wrote after the tower part (`cargo xtask memory`'s section): the tower part holds
/// one level-2 heading, so the next one starts the rest, which both `--part`s keep.
pub fn split_report(existing: &str) -> (String, String, String) {
    let Some(at) = existing.find(TOWERS_MARKER) else {
        return (existing.to_string(), String::new(), String::new());
    };
    let towers = &existing[at..];
    let end = towers
        .match_indices("\n## ")
        .nth(1)
        .map_or(towers.len(), |(i, _)| i + 1);
    (
        existing[..at].to_string(),
        towers[..end].to_string(),
        towers[end..].to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_report_keeps_the_sections_after_the_towers() {
        let doc = format!(
            "# Performance\ntext rows\n\n{TOWERS_MARKER}\n## Vision and audio towers\nrows\n### Raw results (towers)\nraw\n\n## Checkpoints larger than memory\nmemory rows\n"
        );
        let (text, towers, rest) = split_report(&doc);
        assert_eq!(text, "# Performance\ntext rows\n\n");
        assert!(
            towers.starts_with(TOWERS_MARKER)
                && towers.contains("### Raw results (towers)\nraw\n\n")
        );
        assert!(!towers.contains("Checkpoints"));
        assert_eq!(rest, "## Checkpoints larger than memory\nmemory rows\n");
        assert_eq!(format!("{text}{towers}{rest}"), doc);
        // No section after the towers.
        let (_, towers, rest) = split_report(&doc[..doc.find("## Checkpoints").unwrap()]);
        assert!(towers.ends_with("raw\n\n") && rest.is_empty());
    }
}
