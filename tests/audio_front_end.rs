//! The audio front end against the oracle (shared spec: multimodal §2.1, §2.6): our WAV reader
//! and log-mel features against what `golden/audio_features.py` recorded in
//! `golden/audio_front_end/` — Hugging Face's `Gemma4AudioFeatureExtractor` (transformers
//! 5.23.0, numpy) on synthesized clips (speech-like, chirps, silence; 0.2 s to 31 s, past the
//! 30 s cap) in every WAV encoding we read (8-bit unsigned, 16/24/32-bit PCM, 32-bit
//! `WAVE_FORMAT_EXTENSIBLE`, float), and files the reader must refuse.
//!
//! - the decoded waveform: bit-exact (its sha256 is the one soundfile/librosa scaling gives);
//! - the window: bit-exact; the mel filters within 1.1e-14 (numpy's vectorised `pow`);
//! - frame counts, the frame mask and soft tokens: exact;
//! - the features: within [`FEATURE_TOLERANCE`] (justified there);
//! - bad files: refused, with an error naming the file and saying what is wrong.
//!
//! A failure names the clip and the worst element `[frame, mel bin]`.

mod common;

use std::path::PathBuf;

use gemma4_reference::audio::features::{
    hann_window, log_mel_features, mel_filter_bank, padded_frame_count, soft_token_count,
    valid_frame_count, MEL_BINS, MEL_FLOOR,
};
use gemma4_reference::audio::wav::read_wav;
use safetensors::SafeTensors;
use serde_json::Value;
use sha2::{Digest, Sha256};

use common::{golden_dir, read_json};

/// Largest absolute difference allowed between our features and Hugging Face's.
///
/// Hugging Face multiplies frame and window in float32, runs the FFT in float32 (numpy ≥ 2
/// keeps complex64 for float32 input), then the mel product and `ln` in float64 and casts to
/// float32; `features.rs` does the same products but its FFT in float64. So the two differ by
/// numpy's float32 FFT error, seen through `ln` (an absolute error in the log domain is the
/// relative error of the mel energy), plus the final float32 rounding. Measured on every clip
/// here (`cargo test --release --test audio_front_end -- --nocapture` prints it): at most
/// 4.77e-7 = 2⁻²¹ absolute, one float32 ulp of values in [4, 8) and 6.9e-8 of the largest
/// feature magnitude (ln 0.001 = −6.9 is in every clip); on most clips far less. 2e-6 is four
/// such ulps: room for another CPU's FFT kernels, while every front-end bug we know moves
/// features by far more (no left pad: frames shift by a hop, errors of order 1; a symmetric
/// Hann window: ~1e-2 and up; power spectrum: ×2 in the log domain).
const FEATURE_TOLERANCE: f32 = 2e-6;

/// The bad files and the words our error must contain (besides the file's path).
const BAD_FILES: [(&str, &str); 4] = [
    (
        "bad_stereo",
        "has 2 channels; the audio tower takes mono audio",
    ),
    (
        "bad_44k",
        "is sampled at 44100 Hz; the audio tower takes 16000 Hz",
    ),
    ("bad_truncated", "truncated or unreadable data"),
    ("bad_empty", "has no samples"),
];

fn fixture_dir() -> PathBuf {
    golden_dir().join("audio_front_end")
}

fn manifest() -> Value {
    read_json(&fixture_dir().join("manifest.json"))
}

fn wav_path(name: &str) -> PathBuf {
    fixture_dir().join("wav").join(format!("{name}.wav"))
}

fn number(value: &Value, key: &str) -> usize {
    value[key]
        .as_u64()
        .unwrap_or_else(|| panic!("manifest: `{key}` is not a number in {value}")) as usize
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `features.safetensors`, read whole.
struct Tensors(Vec<u8>);

impl Tensors {
    fn read() -> Self {
        let path = fixture_dir().join("features.safetensors");
        Tensors(std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
    }

    fn get(&self, name: &str) -> Option<(Vec<usize>, Vec<u8>)> {
        let parsed = SafeTensors::deserialize(&self.0).expect("valid safetensors");
        let view = parsed.tensor(name).ok()?;
        Some((view.shape().to_vec(), view.data().to_vec()))
    }

    fn f32s(&self, name: &str) -> Option<Vec<f32>> {
        self.get(name).map(|(_, data)| {
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
    }

    fn f64s(&self, name: &str) -> Vec<f64> {
        let (_, data) = self.get(name).unwrap_or_else(|| panic!("no tensor {name}"));
        data.chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn mask(&self, name: &str) -> Vec<bool> {
        let (_, data) = self.get(name).unwrap_or_else(|| panic!("no tensor {name}"));
        data.iter().map(|&b| b != 0).collect()
    }
}

/// The clips of the manifest, in name order.
fn clips() -> Vec<(String, Value)> {
    let manifest = manifest();
    let clips = manifest["clips"].as_object().expect("clips");
    clips.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Errors of our rows against Hugging Face's, which are rows `frames` of the clip.
struct RowErrors {
    max_abs: f32,
    /// `(frame, bin)` of `max_abs`.
    worst: (usize, usize),
    ours: f32,
    theirs: f32,
    /// The largest |HF feature| among the compared rows.
    scale: f32,
    values: usize,
}

fn row_errors(ours: &ndarray::Array2<f32>, theirs: &[f32], frames: &[usize]) -> RowErrors {
    assert_eq!(theirs.len(), frames.len() * MEL_BINS);
    let mut errors = RowErrors {
        max_abs: 0.0,
        worst: (0, 0),
        ours: 0.0,
        theirs: 0.0,
        scale: 0.0,
        values: theirs.len(),
    };
    for (row, &frame) in frames.iter().enumerate() {
        for bin in 0..MEL_BINS {
            let (a, b) = (ours[[frame, bin]], theirs[row * MEL_BINS + bin]);
            errors.scale = errors.scale.max(b.abs());
            let d = (a - b).abs();
            if d > errors.max_abs || d.is_nan() {
                errors.max_abs = d;
                errors.worst = (frame, bin);
                (errors.ours, errors.theirs) = (a, b);
            }
        }
    }
    errors
}

// ------------------------------------------------------------------------------------------------
// The tests
// ------------------------------------------------------------------------------------------------

#[test]
fn audio_front_end_fixture_covers_every_encoding() {
    let clips = clips();
    let encodings: Vec<&str> = clips
        .iter()
        .map(|(_, c)| c["encoding"].as_str().unwrap())
        .collect();
    for encoding in ["pcm8", "pcm16", "pcm24", "pcm32", "float32"] {
        assert!(encodings.contains(&encoding), "no {encoding} clip");
    }
    assert!(
        clips
            .iter()
            .any(|(_, c)| number(c, "samples") > number(c, "samples_after_truncation")),
        "no clip past the 30 s cap"
    );
    let manifest = manifest();
    let bad: Vec<&String> = manifest["bad_files"].as_object().unwrap().keys().collect();
    let mut ours: Vec<&str> = BAD_FILES.iter().map(|(name, _)| *name).collect();
    ours.sort_unstable();
    assert_eq!(
        bad, ours,
        "every bad file of the fixture has an expected error here"
    );
}

#[test]
fn audio_front_end_wav_decoding_bit_exact() {
    for (name, clip) in clips() {
        let wave = read_wav(&wav_path(&name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(wave.sample_rate, 16_000, "{name}");
        assert_eq!(
            wave.samples.len(),
            number(&clip, "samples"),
            "{name}: samples"
        );
        let bytes: Vec<u8> = wave.samples.iter().flat_map(|s| s.to_le_bytes()).collect();
        assert_eq!(
            sha256_hex(&bytes),
            clip["waveform_sha256"].as_str().unwrap(),
            "{name} ({}): decoded samples differ from soundfile's scaling",
            clip["encoding"]
        );
    }
}

#[test]
fn audio_front_end_window_and_mel_filters_match_hf() {
    let tensors = Tensors::read();
    let window = hann_window();
    let theirs = tensors.f32s("hf.window").unwrap();
    assert_eq!(theirs.len(), window.len());
    for (n, (a, b)) in window.iter().zip(&theirs).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "window[{n}]: ours {a}, HF {b}");
    }
    // numpy's vectorised `pow` rounds a few filter edges one ulp away from the correctly
    // rounded `pow`: 63 of the 32 896 weights differ, by at most 1.1e-14 (features.rs).
    let filters = mel_filter_bank();
    let theirs = tensors.f64s("hf.mel_filters");
    assert_eq!(theirs.len(), filters.len());
    let (mut worst, mut at) = (0.0f64, 0);
    for (i, (a, b)) in filters.iter().zip(&theirs).enumerate() {
        if (a - b).abs() > worst {
            (worst, at) = ((a - b).abs(), i);
        }
    }
    assert!(
        worst <= 2e-14,
        "mel filter [{}, {}] differs from HF's by {worst:e}",
        at / MEL_BINS,
        at % MEL_BINS
    );
}

/// `gemma4 inspect --audio-seconds S` reports Hugging Face's valid frames and soft tokens for
/// every fixture clip (S = samples / 16 000, which `{}` prints exactly enough to round back to
/// the same sample count), and refuses a negative length.
#[test]
fn inspect_audio_seconds_matches_hf_counts() {
    let model = common::golden_case("e2b_audio").model_dir();
    for (name, clip) in clips() {
        let samples = number(&clip, "samples");
        let seconds = format!("{}", samples as f64 / 16_000.0);
        let (code, stdout, stderr) = common::run_gemma4(
            &[
                "inspect",
                "--json",
                "--model",
                &model.to_string_lossy(),
                "--audio-seconds",
                &seconds,
            ],
            &[],
        );
        assert_eq!(code, 0, "{name}: {stderr}");
        let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let got = &report["audio_clip"];
        assert_eq!(got["samples"].as_u64(), Some(samples as u64), "{name}");
        assert_eq!(
            got["frames"].as_u64(),
            Some(number(&clip, "valid_frames") as u64),
            "{name}: valid frames"
        );
        assert_eq!(
            got["soft_tokens"].as_u64(),
            Some(number(&clip, "soft_tokens") as u64),
            "{name}: soft tokens"
        );
    }
    let (code, _, stderr) = common::run_gemma4(
        &[
            "inspect",
            "--model",
            &model.to_string_lossy(),
            "--audio-seconds=-1",
        ],
        &[],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("is not a number of seconds"), "{stderr}");
}

#[test]
fn audio_front_end_frames_mask_and_soft_tokens_match_hf() {
    let tensors = Tensors::read();
    for (name, clip) in clips() {
        let samples = number(&clip, "samples");
        let valid = number(&clip, "valid_frames");
        let mask = tensors.mask(&format!("{name}.input_features_mask"));
        assert_eq!(
            mask.len(),
            number(&clip, "total_frames"),
            "{name}: mask length"
        );
        assert_eq!(
            padded_frame_count(samples),
            mask.len(),
            "{name}: padded frames"
        );
        assert_eq!(valid_frame_count(samples), valid, "{name}: valid frames");
        assert!(
            mask.iter().take(valid).all(|&m| m) && !mask.iter().skip(valid).any(|&m| m),
            "{name}: HF's mask is not {valid} valid frames then padding"
        );
        assert_eq!(
            soft_token_count(samples),
            number(&clip, "soft_tokens"),
            "{name}: soft tokens"
        );
    }
}

#[test]
fn audio_front_end_features_match_hf() {
    let tensors = Tensors::read();
    let stride = number(&manifest(), "stride");
    let mut failures = Vec::new();
    let mut worst_overall = 0.0f32;
    for (name, clip) in clips() {
        let wave = read_wav(&wav_path(&name)).unwrap();
        let ours = log_mel_features(&wave.samples).unwrap_or_else(|e| panic!("{name}: {e}"));
        let valid = number(&clip, "valid_frames");
        assert_eq!(
            ours.features.dim(),
            (valid, MEL_BINS),
            "{name}: features shape"
        );
        assert_eq!(
            ours.soft_tokens,
            number(&clip, "soft_tokens"),
            "{name}: soft tokens"
        );

        // Hugging Face's rows: all of them, or the head, the tail and every `stride`-th row.
        let (frames, theirs): (Vec<usize>, Vec<f32>) =
            match tensors.f32s(&format!("{name}.input_features")) {
                Some(all) => ((0..valid).collect(), all),
                None => {
                    let head = tensors
                        .f32s(&format!("{name}.input_features_head"))
                        .unwrap();
                    let tail = tensors
                        .f32s(&format!("{name}.input_features_tail"))
                        .unwrap();
                    let strided = tensors
                        .f32s(&format!("{name}.input_features_strided"))
                        .unwrap();
                    let rows = head.len() / MEL_BINS;
                    let mut frames: Vec<usize> = (0..rows).collect();
                    frames.extend(valid - rows..valid);
                    frames.extend((0..valid).step_by(stride));
                    (frames, [head, tail, strided].concat())
                }
            };
        let errors = row_errors(&ours.features, &theirs, &frames);
        worst_overall = worst_overall.max(errors.max_abs);
        eprintln!(
            "{name:12} {:8} {valid:5} frames ({} values compared): max abs error {:.3e} at \
             [{}, {}], relative to the largest |feature| ({:.2}) {:.3e}",
            clip["encoding"].as_str().unwrap(),
            errors.values,
            errors.max_abs,
            errors.worst.0,
            errors.worst.1,
            errors.scale,
            errors.max_abs / errors.scale
        );
        if errors.max_abs > FEATURE_TOLERANCE || errors.max_abs.is_nan() {
            failures.push(format!(
                "{name}: features differ from HF's by {:.3e} (tolerance {FEATURE_TOLERANCE:e}) \
                 at [frame {}, bin {}]: ours {}, HF {}",
                errors.max_abs, errors.worst.0, errors.worst.1, errors.ours, errors.theirs
            ));
        }
        if clip["kind"] == "silence" {
            let floor = MEL_FLOOR.ln() as f32;
            assert!(
                theirs.iter().all(|&f| f == floor),
                "{name}: HF's silence is ln(0.001)"
            );
            assert!(
                ours.features.iter().all(|&f| f == floor),
                "{name}: silence is ln(0.001)"
            );
        }
    }
    eprintln!("largest error over every clip: {worst_overall:.3e}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn audio_front_end_bad_wav_files_refused() {
    for (name, expected) in BAD_FILES {
        let path = wav_path(name);
        assert!(
            path.exists(),
            "{}: missing from the fixture",
            path.display()
        );
        let message = match read_wav(&path) {
            Ok(wave) => panic!(
                "{name}: read {} samples, expected an error",
                wave.samples.len()
            ),
            Err(e) => e.to_string(),
        };
        assert!(
            message.contains(&path.display().to_string()) && message.contains(expected),
            "{name}: the error should name {} and say `{expected}`; it says: {message}",
            path.display()
        );
        let message = gemma4_reference::audio::load_clip(&path)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains(expected),
            "{name} through load_clip: {message}"
        );
    }
    // And through the command line: exit 2, the file named.
    let path = wav_path("bad_stereo");
    let case = common::golden_case("e2b_audio");
    let tokens = case
        .tokens
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let model = case.model_dir();
    let scratch = tempfile::tempdir().unwrap();
    let out = scratch.path().join("dump.safetensors");
    let (code, _, stderr) = common::run_gemma4(
        &[
            "dump",
            "--model",
            &model.to_string_lossy(),
            "--tokens",
            &tokens,
            "--audio",
            &path.to_string_lossy(),
            "--out",
            &out.to_string_lossy(),
        ],
        &[],
    );
    assert_eq!(code, 2, "gemma4 dump --audio bad_stereo.wav: {stderr}");
    assert!(
        stderr.contains(&path.display().to_string()) && stderr.contains("has 2 channels"),
        "{stderr}"
    );
}
