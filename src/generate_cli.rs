//! The `gemma4 generate` command around [`crate::generate`]: the conversation from the flags,
//! `--show-prompt`, a progress display on a terminal (`indicatif`; nothing when piped or with
//! `--quiet`), streamed text on stdout, Ctrl-C stopping cleanly, and the speed line on stderr.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use gemma4_reference::ModelConfig;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::engine::Engine;
use crate::generate::{
    generate, prepare_prompt, GenerateOptions, GenerateRequest, Generation, PromptText, StopReason,
    TextSide,
};
use crate::prompt::MediaOptions;

/// Everything the command line gives `generate`.
#[derive(Clone, Debug, Default)]
pub struct GenerateCommand {
    pub model: PathBuf,
    pub prompt: Option<String>,
    pub chat: bool,
    pub system: Option<String>,
    pub messages: Option<PathBuf>,
    pub thinking: bool,
    pub no_bos: bool,
    pub show_prompt: bool,
    pub show_ids: bool,
    pub images: Vec<PathBuf>,
    pub image_budget: usize,
    pub audio: Vec<PathBuf>,
    pub options: GenerateOptions,
    pub quiet: bool,
}

/// Runs the command: 0 on success (also when stopped by Ctrl-C), 2 on bad input.
pub fn run(command: GenerateCommand) -> ExitCode {
    match run_inner(&command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("gemma4 generate: {message}");
            ExitCode::from(2)
        }
    }
}

fn run_inner(command: &GenerateCommand) -> Result<(), String> {
    let options = &command.options;
    if options.fast_prefill && options.engine != Engine::Optimized {
        return Err("--fast-prefill needs --engine optimized".into());
    }
    let config = ModelConfig::from_dir(&command.model).map_err(|e| e.to_string())?;
    let text_side = TextSide::load(&command.model, &config)?;
    let request = request_of(command)?;
    let prepared = prepare_prompt(&command.model, &config, &text_side, &request)?;
    if command.show_prompt {
        eprintln!("--- prompt ({} tokens) ---", prepared.prompt.tokens.len());
        eprintln!("{}", prepared.text);
        eprintln!("--- token ids ---");
        eprintln!("{}", compact_ids(&prepared.prompt.tokens));
        eprintln!("---");
    }

    // Ctrl-C: the first stops generation after the current token; a second one exits.
    let stop = Arc::new(AtomicBool::new(false));
    let handler_flag = Arc::clone(&stop);
    let _ = ctrlc::set_handler(move || {
        if handler_flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    });

    let show_progress = !command.quiet && std::io::stderr().is_terminal();
    let spinner = show_progress.then(|| {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("a valid template"),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        bar
    });
    let mut stdout = std::io::stdout();
    let generation = generate(
        &command.model,
        &config,
        &text_side,
        &prepared,
        options,
        &stop,
        |stage| {
            if let Some(bar) = &spinner {
                if stage.is_empty() {
                    bar.finish_and_clear();
                } else {
                    bar.set_message(format!("{stage}…"));
                }
            }
        },
        |piece| {
            let _ = write!(stdout, "{piece}");
            let _ = stdout.flush();
        },
    )?;
    println!();
    if command.show_ids {
        eprintln!("generated ids: {}", compact_ids(&generation.generated_ids));
    }
    if !command.quiet {
        eprintln!("{}", speed_line(&generation));
    }
    Ok(())
}

/// The conversation (or raw text) and media of the command.
fn request_of(command: &GenerateCommand) -> Result<GenerateRequest, String> {
    let mut media = MediaOptions {
        images: Vec::new(),
        image_budget: command.image_budget,
        audio: Vec::new(),
        ..MediaOptions::default()
    };
    let prompt = if command.chat {
        let mut messages = match &command.messages {
            Some(path) => read_messages(path, &mut media)?,
            None => Vec::new(),
        };
        if let Some(system) = &command.system {
            messages.insert(0, json!({"role": "system", "content": system}));
        }
        if let Some(text) = &command.prompt {
            let mut parts: Vec<Value> = Vec::new();
            for image in &command.images {
                parts.push(json!({"type": "image", "path": image}));
                media.images.push(image.clone());
            }
            for clip in &command.audio {
                parts.push(json!({"type": "audio", "path": clip}));
                media.audio.push(clip.clone());
            }
            let content = if parts.is_empty() {
                json!(text)
            } else {
                parts.push(json!({"type": "text", "text": text}));
                Value::Array(parts)
            };
            messages.push(json!({"role": "user", "content": content}));
        } else if !command.images.is_empty() || !command.audio.is_empty() {
            return Err("--image/--audio with --chat go with --prompt (in a --messages file, give them as parts)".into());
        }
        if messages.is_empty() {
            return Err("the conversation is empty: give --prompt or --messages".into());
        }
        PromptText::Chat(Value::Array(messages))
    } else {
        media.images = command.images.clone();
        media.audio = command.audio.clone();
        PromptText::Raw(command.prompt.clone().unwrap_or_default())
    };
    Ok(GenerateRequest {
        prompt,
        media,
        thinking: command.thinking,
        no_bos: command.no_bos,
    })
}

/// The messages of a `--messages` file; the files of its image and audio parts (`path`, or
/// `image` / `audio` / `url` holding a local path) are appended to `media` in order. Errors name
/// the file and the message.
fn read_messages(path: &Path, media: &mut MediaOptions) -> Result<Vec<Value>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let value: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
    let Value::Array(messages) = value else {
        return Err(format!(
            "{}: expected a JSON array of messages",
            path.display()
        ));
    };
    let base = path.parent().unwrap_or(Path::new("."));
    for (i, message) in messages.iter().enumerate() {
        let at = |what: &str| format!("{}: message {i}: {what}", path.display());
        let role = message
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| at("no `role` string"))?;
        if !["system", "user", "assistant", "model"].contains(&role) {
            return Err(at(&format!(
                "unknown role {role:?} (expected system, user or assistant)"
            )));
        }
        match message.get("content") {
            Some(Value::String(_)) => {}
            Some(Value::Array(parts)) => {
                for (j, part) in parts.iter().enumerate() {
                    let kind = part
                        .get("type")
                        .and_then(Value::as_str)
                        .ok_or_else(|| at(&format!("part {j} has no `type`")))?;
                    let file = || -> Result<PathBuf, String> {
                        ["path", kind, "url"]
                            .iter()
                            .find_map(|k| part.get(*k).and_then(Value::as_str))
                            .map(|f| base.join(f))
                            .ok_or_else(|| at(&format!("{kind} part {j} has no `path`")))
                    };
                    match kind {
                        "text" => {
                            if part.get("text").and_then(Value::as_str).is_none() {
                                return Err(at(&format!("text part {j} has no `text` string")));
                            }
                        }
                        "image" => media.images.push(file()?),
                        "audio" => media.audio.push(file()?),
                        other => {
                            return Err(at(&format!(
                            "part {j} has unknown type {other:?} (expected text, image or audio)"
                        )))
                        }
                    }
                }
            }
            _ => return Err(at("`content` should be a string or a list of parts")),
        }
    }
    Ok(messages)
}

/// `2, 105, 2364, … (12 ids)`, runs of one id shortened: `258880 ×64`.
fn compact_ids(ids: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        let run = ids[i..].iter().take_while(|&&id| id == ids[i]).count();
        parts.push(if run > 3 {
            format!("{} ×{run}", ids[i])
        } else {
            vec![ids[i].to_string(); run].join(", ")
        });
        i += run;
    }
    parts.join(", ")
}

/// `prefill: 31 tokens in 0.42 s (73.8 tok/s) · decode: 12 tokens in 1.10 s (10.9 tok/s) ·
/// load 0.8 s · stopped: end of turn`.
pub fn speed_line(generation: &Generation) -> String {
    let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { f64::NAN };
    let decoded = generation.generated_ids.len().saturating_sub(1);
    format!(
        "prefill: {} tokens in {:.2} s ({:.1} tok/s) · decode: {} tokens in {:.2} s ({:.1} tok/s) · load {:.1} s · {} generated, stopped: {}",
        generation.prompt_ids.len(),
        generation.prefill_seconds,
        rate(generation.prompt_ids.len(), generation.prefill_seconds),
        decoded,
        generation.decode_seconds,
        rate(decoded, generation.decode_seconds),
        generation.load_seconds,
        generation.generated_ids.len(),
        match generation.stop {
            StopReason::EndOfSequence => "end of sequence",
            StopReason::MaxNewTokens => "--max-new-tokens",
            StopReason::ContextFull => "context full",
            StopReason::Interrupted => "interrupted",
        }
    )
}
