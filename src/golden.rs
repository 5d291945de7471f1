//! The bundled golden fixtures (`golden/`, shared contracts §3): cases made by the Hugging Face
//! oracle, each a tiny checkpoint, its token ids and the oracle's activation dump.

use std::path::{Path, PathBuf};

use gemma4_reference::audio::features_file::read_audio_features;
use gemma4_reference::audio::load_clip;
use gemma4_reference::merge::Prompt;
use gemma4_reference::vision::pixel_values::read_pixel_values;
use gemma4_reference::ComputeDtype;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// One golden case, as described by its `case.json`.
#[derive(Clone, Debug)]
pub struct GoldenCase {
    pub name: String,
    /// `golden/<case>/`
    pub dir: PathBuf,
    /// Variant family: `e2b`, `e4b`, `31b` or `26b-a4b`.
    pub family: String,
    /// `causal_lm` or `conditional_generation`.
    pub layout: String,
    /// `released` or `per_layer_config`.
    pub config_spelling: String,
    /// `float32` or `bfloat16`: the oracle's compute dtype.
    pub dtype: String,
    /// `float32` or `bfloat16`: the dtype the checkpoint is stored in (`dtype` if not given).
    pub checkpoint_dtype: String,
    pub tokens: Vec<usize>,
    pub decode_steps: usize,
    pub exercises: Vec<String>,
    /// The checkpoint, when the case runs on another case's (`model_dir` in case.json).
    pub shared_model_dir: Option<PathBuf>,
    /// The prompt's images (vision cases), in placeholder-run order.
    pub images: Vec<GoldenImage>,
    /// The oracle's preprocessed pixels of the images (`--pixel-values` format).
    pub pixel_values: Option<PathBuf>,
    /// The prompt's audio clips (audio cases), in placeholder-run order.
    pub audio: Vec<GoldenAudio>,
    /// The oracle's log-mel features of the clips (`--audio-features` format).
    pub audio_features: Option<PathBuf>,
}

/// One audio clip of an audio case.
#[derive(Clone, Debug)]
pub struct GoldenAudio {
    /// The WAV file.
    pub file: PathBuf,
    /// Soft tokens it became.
    pub soft_tokens: usize,
}

/// One image of a vision case, as its oracle preprocessed it.
#[derive(Clone, Debug)]
pub struct GoldenImage {
    /// The source image file.
    pub file: PathBuf,
    /// The soft-token budget it was preprocessed for.
    pub budget: usize,
    /// Soft tokens it became.
    pub soft_tokens: usize,
    /// `[height, width]` after the resize.
    pub resized: [usize; 2],
}

impl GoldenCase {
    pub fn model_dir(&self) -> PathBuf {
        self.shared_model_dir
            .clone()
            .unwrap_or_else(|| self.dir.join("model"))
    }

    /// The case's prompt: its tokens; for vision cases, the oracle's pixels of its images; for
    /// audio cases, our front end's features of its WAV files (`load_clip`: the whole audio
    /// path, as `gemma4 dump --audio` runs it; the oracle's features are
    /// [`GoldenCase::oracle_audio_features`]).
    pub fn prompt(&self) -> gemma4_reference::Result<Prompt> {
        let images = match &self.pixel_values {
            Some(path) => read_pixel_values(path)?,
            None => Vec::new(),
        };
        let audio = self
            .audio
            .iter()
            .map(|clip| load_clip(&clip.file))
            .collect::<gemma4_reference::Result<_>>()?;
        Ok(Prompt {
            tokens: self.tokens.clone(),
            images,
            audio,
        })
    }

    /// The oracle's log-mel features of the case's clips (`audio_features.safetensors`, what
    /// the oracle's tower was fed), to check our front end against; empty without audio.
    pub fn oracle_audio_features(&self) -> gemma4_reference::Result<Vec<ndarray::Array2<f32>>> {
        match &self.audio_features {
            Some(path) => read_audio_features(path),
            None => Ok(Vec::new()),
        }
    }

    pub fn expected_path(&self) -> PathBuf {
        self.dir.join("expected.safetensors")
    }

    /// The arithmetic the oracle ran in, which our engines imitate for this case.
    pub fn compute_dtype(&self) -> ComputeDtype {
        ComputeDtype::from_name(&self.dtype).unwrap_or_default()
    }
}

/// The golden directory: `$GEMMA4_GOLDEN`, else `./golden` if it has a manifest, else the one
/// next to this crate's sources.
pub fn golden_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("GEMMA4_GOLDEN") {
        return PathBuf::from(dir);
    }
    let local = PathBuf::from("golden");
    if local.join("manifest.json").exists() {
        return local;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("golden")
}

fn read_json(path: &Path) -> Result<Value, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: invalid JSON: {e}", path.display()))
}

/// Reads `manifest.json`, checks the sha256 of every listed file, and returns the cases.
pub fn load_cases(golden: &Path) -> Result<Vec<GoldenCase>, String> {
    let manifest_path = golden.join("manifest.json");
    let manifest = read_json(&manifest_path)?;
    let cases = manifest
        .get("cases")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("{}: no `cases` list", manifest_path.display()))?;
    let mut result = Vec::new();
    for case in cases {
        let name = case
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{}: a case without a name", manifest_path.display()))?;
        if let Some(files) = case.get("files").and_then(Value::as_object) {
            for (relative, sha) in files {
                let path = golden.join(relative);
                let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                let digest = format!("{:x}", Sha256::digest(&bytes));
                if Some(digest.as_str()) != sha.as_str() {
                    return Err(format!(
                        "{}: sha256 {digest} does not match the manifest ({}); fixtures are only written by `cargo xtask golden`",
                        path.display(),
                        sha
                    ));
                }
            }
        }
        let dir = golden.join(name);
        let description = read_json(&dir.join("case.json"))?;
        let text = |key: &str| {
            description
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let tokens = description
            .get("tokens")
            .and_then(Value::as_array)
            .ok_or_else(|| format!("{}: no `tokens`", dir.join("case.json").display()))?
            .iter()
            .map(|t| {
                t.as_u64()
                    .map(|t| t as usize)
                    .ok_or_else(|| format!("{name}: bad token {t}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let dtype = text("dtype");
        let case_file = dir.join("case.json");
        let images = match description.get("images") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| golden_image(&dir, &case_file, item))
                .collect::<Result<Vec<_>, _>>()?,
            Some(other) => {
                return Err(format!(
                    "{}: `images` is {other}, expected a list",
                    case_file.display()
                ))
            }
        };
        let relative = |key: &str| {
            description
                .get(key)
                .and_then(Value::as_str)
                .map(|p| dir.join(p))
        };
        let (shared_model_dir, pixel_values) = (relative("model_dir"), relative("pixel_values"));
        let audio_features = relative("audio_features");
        let audio = match description.get("audio") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| {
                    let file = item.get("file").and_then(Value::as_str);
                    let soft_tokens = item.get("soft_tokens").and_then(Value::as_u64);
                    match (file, soft_tokens) {
                        (Some(file), Some(n)) => Ok(GoldenAudio {
                            file: dir.join(file),
                            soft_tokens: n as usize,
                        }),
                        _ => Err(format!(
                            "{}: an audio entry lacks `file` or `soft_tokens`: {item}",
                            case_file.display()
                        )),
                    }
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(other) => {
                return Err(format!(
                    "{}: `audio` is {other}, expected a list",
                    case_file.display()
                ))
            }
        };
        let checkpoint_dtype = match text("checkpoint_dtype") {
            stored if stored.is_empty() => dtype.clone(),
            stored => stored,
        };
        result.push(GoldenCase {
            name: name.to_string(),
            dir,
            family: text("family"),
            layout: text("layout"),
            config_spelling: text("config_spelling"),
            dtype,
            checkpoint_dtype,
            tokens,
            decode_steps: description
                .get("decode_steps")
                .and_then(Value::as_u64)
                .unwrap_or(0) as usize,
            shared_model_dir,
            images,
            pixel_values,
            audio,
            audio_features,
            exercises: description
                .get("exercises")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default(),
        });
    }
    Ok(result)
}

/// One entry of a case's `images` list.
fn golden_image(dir: &Path, case_file: &Path, item: &Value) -> Result<GoldenImage, String> {
    let bad = |what: &str| format!("{}: an image entry {what}: {item}", case_file.display());
    let number = |key: &str| {
        item.get(key)
            .and_then(Value::as_u64)
            .map(|n| n as usize)
            .ok_or_else(|| bad(&format!("lacks `{key}`")))
    };
    let resized = item
        .get("resized")
        .and_then(Value::as_array)
        .filter(|a| a.len() == 2)
        .and_then(|a| Some([a[0].as_u64()? as usize, a[1].as_u64()? as usize]))
        .ok_or_else(|| bad("lacks `resized` [height, width]"))?;
    Ok(GoldenImage {
        file: dir.join(
            item.get("file")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("lacks `file`"))?,
        ),
        budget: number("budget")?,
        soft_tokens: number("soft_tokens")?,
        resized,
    })
}
