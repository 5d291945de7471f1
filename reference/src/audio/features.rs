//! The audio front end: a 16 kHz waveform to log-mel features (shared spec: multimodal §2.1,
//! §2.6, §5 item 9), as Hugging Face's `Gemma4AudioFeatureExtractor` (transformers 5.23.0,
//! `feature_extraction_gemma4.py`) computes them for one clip.
//!
//! ```text
//! x[0..N]            the clip, truncated to 480 000 samples (30 s)
//! x' = [0; 160] ++ x                                  semicausal left pad (frame_length / 2)
//! frame_i[n] = x'[160·i + n] · w[n],  n < 320         321-sample frames, hop 160, the 321st dropped
//!     w[n] = 0.5 − 0.5·cos(2πn/320)                   periodic Hann(320), w[0] = 0, Σw = 160
//! S_i[k] = | rfft(frame_i, 512)[k] |,  k < 257        magnitude, not power
//! M_i[j] = Σ_k S_i[k] · W[k, j],  j < 128             HTK mel, 0–8000 Hz, norm=None (filter 0 is 0)
//! f_i[j] = ln(M_i[j] + 0.001)                         float64, then cast to float32
//! ```
//!
//! Frame `i` is valid when the last sample of its 321-sample window, `x'[160·i + 320]`, is a real
//! sample: `F = (N + 160 − 321) div 160 + 1` valid frames. Hugging Face also pads the batch with
//! zeros to a multiple of 128 samples and returns the frames past `F` zeroed, with a frame mask;
//! valid frames see only real samples, so they are the same in any batch (the golden script
//! `golden/audio_features.py` asserts it), and this module returns the valid frames alone.
//!
//! **Precision.** Hugging Face multiplies frame and window in float32 (its window is stored as
//! float32), then numpy ≥ 2 runs the FFT in float32 (complex64) because its input is float32; the
//! mel product and the log are float64. Here the windowed samples are the same float32 products,
//! but the FFT and everything after it run in float64, one rounding to float32 at the end.
//! Measured on the clips of `golden/audio_features.py` (speech-like, chirps, silence, 0.25–31 s):
//! the result is bit-identical to Hugging Face's own pipeline with its FFT in float64, and differs
//! from Hugging Face as shipped by at most 4.8e-7 (2⁻²¹, about one float32 ulp of the features'
//! magnitude; in the log domain that is also the relative difference of the mel energies): that
//! is the float32 error of numpy's FFT. A float32 `realfft` instead differs from Hugging Face by
//! up to 1.3e-5 on speech and 2.0e-3 on chirps (the quiet bins far from the tone).
//!
//! DM (Google's JAX code) differs: no semicausal pad (one frame fewer, shifted by one hop) and a
//! window with a half-sample offset; Hugging Face is the parity target.

use std::f64::consts::PI;

use ndarray::{Array1, Array2};
use realfft::RealFftPlanner;

use crate::error::{Error, Result};
use crate::faults::{fault_active, Fault};

/// Samples per second the front end takes (16 kHz).
pub const SAMPLE_RATE: u32 = 16_000;
/// Mel bins per frame, the features' width.
pub const MEL_BINS: usize = 128;
/// Samples per analysis frame after the dropped 321st sample: 20 ms.
pub const FRAME_LENGTH: usize = 320;
/// Samples between frame starts: 10 ms.
pub const HOP_LENGTH: usize = 160;
/// Zeros put before the clip ("semicausal" padding): half a frame.
pub const SEMICAUSAL_PAD: usize = FRAME_LENGTH / 2;
/// Samples a frame is cut with: one more than [`FRAME_LENGTH`]; the last one is dropped (it would
/// feed the preemphasis filter, which is off).
pub const FRAME_WINDOW: usize = FRAME_LENGTH + 1;
/// FFT size: the next power of two above the frame length.
pub const FFT_LENGTH: usize = 512;
/// Frequency bins of the real FFT: `FFT_LENGTH / 2 + 1`.
pub const FREQUENCY_BINS: usize = FFT_LENGTH / 2 + 1;
/// Lowest and highest edge of the mel filter bank, in Hz.
pub const MIN_FREQUENCY_HZ: f64 = 0.0;
pub const MAX_FREQUENCY_HZ: f64 = 8000.0;
/// Added to the mel energies before the log (`mel_floor`).
pub const MEL_FLOOR: f64 = 1e-3;
/// Hugging Face truncates a clip to this many samples (30 s) before anything else.
pub const MAX_SAMPLES: usize = 480_000;
/// Hugging Face pads a batch to a multiple of this many samples.
pub const PAD_TO_MULTIPLE_OF: usize = 128;
/// The cap on a clip's soft tokens (`audio_seq_length`).
pub const MAX_SOFT_TOKENS: usize = 750;

/// The log-mel features of one clip.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioFeatures {
    /// `[F, 128]`: the valid frames only, `F` = [`valid_frame_count`] of the clip's length.
    pub features: Array2<f32>,
    /// How many audio soft tokens the clip becomes: [`soft_token_count`] (spec §2.6).
    pub soft_tokens: usize,
}

/// The clip length Hugging Face works on: at most [`MAX_SAMPLES`] (30 s); longer clips are cut.
pub fn truncated_length(num_samples: usize) -> usize {
    num_samples.min(MAX_SAMPLES)
}

/// Frames `n` samples give when cut after `left_pad` zeros: `(n + left_pad − 321) div 160 + 1`,
/// or 0 when not even one frame fits.
fn frames_after_pad(n: usize, left_pad: usize) -> usize {
    (n + left_pad)
        .checked_sub(FRAME_WINDOW)
        .map_or(0, |rest| rest / HOP_LENGTH + 1)
}

/// Frames `n` samples give with the semicausal pad: `(n + 160 − 321) div 160 + 1`.
fn frames_in(n: usize) -> usize {
    frames_after_pad(n, SEMICAUSAL_PAD)
}

/// The valid frames of a clip of `num_samples` samples (spec §2.1 item 8, §2.6):
/// `F = (N + 160 − 321) div 160 + 1` with `N` truncated to 30 s, 0 below 161 samples.
/// 16 000 samples (1 s) give 99, 8000 give 49, 30 s gives 2999.
pub fn valid_frame_count(num_samples: usize) -> usize {
    frames_in(truncated_length(num_samples))
}

/// The frames Hugging Face returns for this clip alone, invalid ones included: the length of its
/// `input_features_mask` (the clip is zero-padded to a multiple of 128 samples first).
/// 8000 samples give 50 (49 valid).
pub fn padded_frame_count(num_samples: usize) -> usize {
    frames_in(truncated_length(num_samples).div_ceil(PAD_TO_MULTIPLE_OF) * PAD_TO_MULTIPLE_OF)
}

/// The number of audio soft tokens of a clip of `num_samples` samples (spec §2.6): its valid
/// frames halved twice by the subsampling convolutions, `t ← (t + 2 − 3) div 2 + 1`, i.e.
/// `⌈⌈F/2⌉/2⌉`, capped at 750. 1 s → 25 (40 ms per token), 0.5 s → 13, 30 s → 750.
pub fn soft_token_count(num_samples: usize) -> usize {
    let frames = valid_frame_count(num_samples);
    frames.div_ceil(2).div_ceil(2).min(MAX_SOFT_TOKENS)
}

/// The periodic Hann window of 320 samples as Hugging Face holds it (`[320]`, float32):
/// `w[n] = 0.5 − 0.5·cos(2πn/320)`, computed as numpy's `np.hanning(321)[:-1]` does
/// (`0.5 + 0.5·cos(π·(2n − 320)/320)` in float64), then rounded to float32.
/// `w[0] = 0`, `w[160] = 1`, and the window sums to 160.
pub fn hann_window() -> Array1<f32> {
    let span = (FRAME_LENGTH) as f64; // M − 1 for numpy's M = 321
    Array1::from_iter((0..FRAME_LENGTH).map(|n| {
        let centred = 2.0 * n as f64 - span; // numpy's arange(1 − M, M, 2)
        (0.5 + 0.5 * (PI * centred / span).cos()) as f32
    }))
}

/// Hertz to mels on the HTK scale: `2595 · log10(1 + f/700)`.
pub fn hertz_to_mel(hertz: f64) -> f64 {
    2595.0 * (1.0 + hertz / 700.0).log10()
}

/// Mels to hertz on the HTK scale: `700 · (10^(m/2595) − 1)`.
pub fn mel_to_hertz(mel: f64) -> f64 {
    700.0 * (10f64.powf(mel / 2595.0) - 1.0)
}

/// `num` evenly spaced values from `start` to `stop` inclusive, as numpy's `linspace` computes
/// them (`i · step + start`, the last one set to `stop` exactly).
fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    let step = (stop - start) / (num - 1) as f64;
    let mut values: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    values[num - 1] = stop;
    values
}

/// The mel filter bank `W` (`[257, 128]`, float64; spec §2.1 item 5), Hugging Face's
/// `mel_filter_bank(257, 128, 0, 8000, 16000, norm=None, mel_scale="htk")`:
///
/// ```text
/// c_m  = mel_to_hertz(m · mel(8000)/129),  m = 0 … 129     filter edges, even in mel
/// ν_k  = k · 8000/256,                     k = 0 … 256     the rfft bins' frequencies
/// W[k, j] = max(0, min( (ν_k − c_j)/(c_{j+1} − c_j),  (c_{j+2} − ν_k)/(c_{j+2} − c_{j+1}) ))
/// ```
///
/// Triangles in hertz with peak 1 at `c_{j+1}`, not area-normalised. Filter 0 (edges 0, 13.8 and
/// 27.9 Hz) falls between bins 0 and 1 and is all zero, so feature 0 is always `ln(0.001)`.
///
/// Measured against Hugging Face's matrix: 32 833 of the 32 896 weights are bit-identical, the
/// rest differ by at most 1.1e-14. numpy's vectorised `np.power` (on an AVX-512 machine) rounds 8
/// of the 130 edges one ulp away from the correctly rounded `pow` used here; that is far below
/// anything float32 features can show.
pub fn mel_filter_bank() -> Array2<f64> {
    let mel_edges = linspace(
        hertz_to_mel(MIN_FREQUENCY_HZ),
        hertz_to_mel(MAX_FREQUENCY_HZ),
        MEL_BINS + 2,
    );
    let edges_hz: Vec<f64> = mel_edges.into_iter().map(mel_to_hertz).collect();
    let bins_hz = linspace(0.0, (SAMPLE_RATE / 2) as f64, FREQUENCY_BINS);
    Array2::from_shape_fn((FREQUENCY_BINS, MEL_BINS), |(k, j)| {
        let (lower, centre, upper) = (edges_hz[j], edges_hz[j + 1], edges_hz[j + 2]);
        let rising = (bins_hz[k] - lower) / (centre - lower);
        let falling = (upper - bins_hz[k]) / (upper - centre);
        rising.min(falling).max(0.0)
    })
}

/// The log-mel features of one clip (spec §2.1): `samples` is a 16 kHz mono waveform in [−1, 1]
/// (`[N]`); the result holds its `F` valid frames `[F, 128]` (float32) and its soft-token count.
///
/// A clip longer than 30 s is truncated to its first 480 000 samples, as Hugging Face does
/// (`max_length=480000, truncation=True`): its features are those of the first 30 s (2999
/// frames, 750 soft tokens).
///
/// Errors: an empty clip; a clip shorter than 161 samples (it has no complete frame: Hugging Face
/// returns no valid frame and the tower could not run); a non-finite sample.
///
/// Faults (contracts §4): `audio_power_spectrum` squares the magnitudes; `audio_no_left_pad`
/// drops the semicausal pad (`(N − 321) div 160 + 1` frames; `soft_tokens` still counts as the
/// processor does).
pub fn log_mel_features(samples: &[f32]) -> Result<AudioFeatures> {
    if samples.is_empty() {
        return Err(Error::input(
            "empty audio clip: no samples to extract features from",
        ));
    }
    let samples = &samples[..truncated_length(samples.len())];
    if let Some(index) = samples.iter().position(|s| !s.is_finite()) {
        return Err(Error::input(format!(
            "audio sample {index} is {} (not a finite number)",
            samples[index]
        )));
    }
    // The semicausal left pad (spec §2.1 step 1).
    let mut left_pad = SEMICAUSAL_PAD;
    if fault_active(Fault::AudioNoLeftPad) {
        left_pad = 0; // frames start at the first sample: one frame fewer, shifted by a hop
    }
    let frames = frames_after_pad(samples.len(), left_pad);
    if frames == 0 {
        return Err(Error::input(format!(
            "audio clip of {} samples is shorter than one frame: at least {} samples \
             ({} with the {SEMICAUSAL_PAD}-sample left pad) are needed",
            samples.len(),
            FRAME_WINDOW - SEMICAUSAL_PAD,
            FRAME_WINDOW
        )));
    }

    let window = hann_window();
    let filters = mel_filter_bank();
    let fft = RealFftPlanner::<f64>::new().plan_fft_forward(FFT_LENGTH);
    let mut frame = fft.make_input_vec(); // [512]
    let mut spectrum = fft.make_output_vec(); // [257]

    // |rfft| of every valid frame: [F, 257].
    let mut magnitudes = Array2::<f64>::zeros((frames, FREQUENCY_BINS));
    for (i, mut row) in magnitudes.rows_mut().into_iter().enumerate() {
        // Frame i covers padded positions 160·i … 160·i + 319; padded position p is sample
        // p − 160 (the first 160 are the semicausal zeros).
        for (n, value) in frame.iter_mut().enumerate() {
            *value = if n < FRAME_LENGTH {
                let sample = (HOP_LENGTH * i + n)
                    .checked_sub(left_pad)
                    .map_or(0.0, |t| samples[t]);
                // The window product in float32, as Hugging Face (both operands are float32).
                f64::from(sample * window[n])
            } else {
                0.0 // zero-padded to the FFT length
            };
        }
        fft.process(&mut frame, &mut spectrum)
            .expect("buffers come from the plan");
        for (magnitude, bin) in row.iter_mut().zip(&spectrum) {
            *magnitude = bin.re.hypot(bin.im); // |X[k]|, not |X[k]|²
            if fault_active(Fault::AudioPowerSpectrum) {
                *magnitude *= *magnitude;
            }
        }
    }

    // Mel energies [F, 128], then ln(· + 0.001) in float64, cast to float32.
    let mel = magnitudes.dot(&filters);
    let features = mel.mapv(|energy| (energy + MEL_FLOOR).ln() as f32);
    Ok(AudioFeatures {
        features,
        soft_tokens: soft_token_count(samples.len()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `seconds` of a sine of `hertz` at amplitude `amplitude`.
    fn tone(hertz: f64, amplitude: f64, seconds: f64) -> Vec<f32> {
        let n = (seconds * SAMPLE_RATE as f64).round() as usize;
        (0..n)
            .map(|t| (amplitude * (2.0 * PI * hertz * t as f64 / SAMPLE_RATE as f64).sin()) as f32)
            .collect()
    }

    #[test]
    fn features_soft_token_count_spec_examples() {
        for (samples, expected) in [
            (16_000, 25),   // 1 s: 99 frames → 50 → 25
            (8_000, 13),    // 0.5 s: 49 → 25 → 13
            (480_000, 750), // 30 s: 2999 → 1500 → 750
            (496_000, 750), // 31 s: truncated to 30 s
            (11_680, 18),   // 0.73 s: 72 → 36 → 18
            (161, 1),
            (160, 0),
            (0, 0),
        ] {
            assert_eq!(
                soft_token_count(samples),
                expected,
                "soft tokens of {samples} samples"
            );
        }
    }

    #[test]
    fn features_soft_token_count_matches_closed_formula() {
        // HF's `_compute_audio_num_tokens`: frames, then twice (t + 2 − 3) div 2 + 1, cap 750
        // (on the untruncated length: the cap makes it agree).
        for n in (0..600_000).step_by(97) {
            let frames = (n as i64 + 160 - 321).div_euclid(160) + 1;
            let mut t = frames.max(0);
            if frames > 0 {
                for _ in 0..2 {
                    t = (t + 2 - 3).div_euclid(2) + 1;
                }
            }
            assert_eq!(
                soft_token_count(n) as i64,
                t.min(750),
                "soft tokens of {n} samples"
            );
        }
    }

    #[test]
    fn features_frame_counts() {
        for (samples, valid, padded) in [
            (16_000, 99, 99), // 16 000 is a multiple of 128
            (8_000, 49, 50),  // padded to 8064
            (11_680, 72, 73),
            (4_000, 24, 25),
            (3_200, 19, 19),
            (480_000, 2999, 2999),
            (496_000, 2999, 2999),
            (161, 1, 1),
            (320, 1, 2), // padded to 384
            (321, 2, 2),
            (160, 0, 1), // padded to 256: one frame, all of it past the clip
            (129, 0, 1),
            (100, 0, 0),
            (1, 0, 0),
        ] {
            assert_eq!(
                valid_frame_count(samples),
                valid,
                "valid frames of {samples}"
            );
            assert_eq!(
                padded_frame_count(samples),
                padded,
                "padded frames of {samples}"
            );
        }
    }

    #[test]
    fn features_hann_window_periodic_320() {
        let window = hann_window();
        assert_eq!(window.len(), 320);
        let sum: f64 = window.iter().map(|&w| w as f64).sum();
        assert!(
            (sum - 160.0).abs() < 1e-5,
            "window sums to {sum}, expected 160"
        );
        assert_eq!(window[0], 0.0, "w[0]");
        assert_eq!(window[160], 1.0, "w[160]");
        for n in 1..320 {
            assert_eq!(window[n], window[320 - n], "periodic symmetry at n = {n}");
        }
    }

    #[test]
    fn features_mel_filter_bank_shape_and_filter_0() {
        let filters = mel_filter_bank();
        assert_eq!(filters.dim(), (257, 128));
        let column0_max = filters.column(0).iter().cloned().fold(0.0, f64::max);
        assert_eq!(column0_max, 0.0, "filter 0 must be all zero");
        for ((k, j), &w) in filters.indexed_iter() {
            assert!((0.0..=1.0).contains(&w), "W[{k}, {j}] = {w} outside [0, 1]");
        }
        // Every other filter has weight, and the filters' peaks move up in frequency.
        let peak = |j: usize| {
            let column = filters.column(j);
            (0..257)
                .max_by(|&a, &b| column[a].total_cmp(&column[b]))
                .unwrap()
        };
        for j in 1..128 {
            assert!(filters.column(j).sum() > 0.0, "filter {j} is all zero");
        }
        for j in 2..128 {
            assert!(
                peak(j) >= peak(j - 1),
                "filter {j} peaks below filter {}",
                j - 1
            );
        }
        // The top edge is 8000 Hz (bin 256): the last filter falls to (almost) 0 there; the
        // edge is 8000 Hz after a mel round trip, so the weight is 1e-14, not 0, in HF too.
        assert!(
            filters[[256, 127]] < 1e-12,
            "W[256, 127] = {}",
            filters[[256, 127]]
        );
        assert!(filters[[255, 127]] > 0.1);
    }

    #[test]
    fn features_htk_mel_scale() {
        assert_eq!(hertz_to_mel(0.0), 0.0);
        assert!((hertz_to_mel(700.0) - 2595.0 * 2f64.log10()).abs() < 1e-9);
        for hz in [13.8, 440.0, 1000.0, 8000.0] {
            assert!(
                (mel_to_hertz(hertz_to_mel(hz)) - hz).abs() < 1e-9,
                "round trip {hz}"
            );
        }
    }

    #[test]
    fn features_silence_is_log_floor() {
        let out = log_mel_features(&vec![0.0; 8_000]).unwrap();
        assert_eq!(out.features.dim(), (49, 128));
        assert_eq!(out.soft_tokens, 13);
        let floor = (MEL_FLOOR).ln() as f32;
        assert!(
            out.features.iter().all(|&f| f == floor),
            "silence must give ln(0.001)"
        );
    }

    #[test]
    fn features_bin_0_always_log_floor() {
        let out = log_mel_features(&tone(100.0, 0.9, 0.3)).unwrap();
        let floor = (MEL_FLOOR).ln() as f32;
        for (i, &f) in out.features.column(0).iter().enumerate() {
            assert_eq!(f, floor, "frame {i}, bin 0");
        }
    }

    #[test]
    fn features_tone_peaks_at_its_mel_bin() {
        // Filter j peaks at the (j + 1)-th of 130 edges spaced evenly in mel.
        let step = hertz_to_mel(MAX_FREQUENCY_HZ) / (MEL_BINS + 1) as f64;
        let centre = |j: usize| mel_to_hertz((j + 1) as f64 * step);
        // (Below about 500 Hz the filters are narrower than the 31.25 Hz bins and the window's
        // main lobe decides: not a clean test there.)
        for hertz in [1000.0, 3000.0, 6000.0] {
            let out = log_mel_features(&tone(hertz, 0.5, 0.2)).unwrap();
            let nearest = (0..128)
                .min_by(|&a, &b| {
                    (centre(a) - hertz)
                        .abs()
                        .total_cmp(&(centre(b) - hertz).abs())
                })
                .unwrap();
            let frame = out.features.row(10);
            let loudest = (0..128)
                .max_by(|&a, &b| frame[a].total_cmp(&frame[b]))
                .unwrap();
            assert!(
                loudest.abs_diff(nearest) <= 1,
                "{hertz} Hz is loudest in mel bin {loudest} (centre {:.1} Hz), expected {nearest} ({:.1} Hz)",
                centre(loudest),
                centre(nearest)
            );
        }
    }

    #[test]
    fn features_magnitude_not_power() {
        // Doubling the amplitude doubles the mel energy (power would quadruple it).
        let quiet = log_mel_features(&tone(1000.0, 0.2, 0.2)).unwrap();
        let loud = log_mel_features(&tone(1000.0, 0.4, 0.2)).unwrap();
        let energy = |f: f32| (f as f64).exp() - MEL_FLOOR;
        let (i, j) = (10, 35);
        let ratio = energy(loud.features[[i, j]]) / energy(quiet.features[[i, j]]);
        assert!(
            (ratio - 2.0).abs() < 1e-4,
            "energy ratio {ratio}, expected 2"
        );
    }

    #[test]
    fn features_semicausal_pad_and_dropped_321st_sample() {
        let base = tone(440.0, 0.5, 0.1);
        let out = log_mel_features(&base).unwrap();
        // Frame 0 covers the 160 pad zeros and samples 0…159; sample 160 would be its 321st
        // (dropped): changing it leaves frame 0 alone and changes frame 1.
        let mut changed = base.clone();
        changed[160] += 0.25;
        let other = log_mel_features(&changed).unwrap();
        assert_eq!(
            other.features.row(0),
            out.features.row(0),
            "frame 0 changed"
        );
        assert_ne!(
            other.features.row(1),
            out.features.row(1),
            "frame 1 unchanged"
        );
        // Sample 159 is frame 0's last windowed sample (w[319] > 0).
        let mut changed = base.clone();
        changed[159] += 0.25;
        let other = log_mel_features(&changed).unwrap();
        assert_ne!(
            other.features.row(0),
            out.features.row(0),
            "frame 0 unchanged"
        );
    }

    #[test]
    fn features_longer_than_30s_truncated() {
        let long = tone(523.25, 0.3, 30.5);
        let out = log_mel_features(&long).unwrap();
        let first_30s = log_mel_features(&long[..MAX_SAMPLES]).unwrap();
        assert_eq!(out.features.dim(), (2999, 128));
        assert_eq!(out.soft_tokens, 750);
        assert_eq!(out, first_30s, "a 30.5 s clip must equal its first 30 s");
    }

    #[test]
    fn features_shape_and_soft_tokens_follow_length() {
        for n in [161, 320, 321, 1_000, 16_000, 11_680] {
            let out = log_mel_features(&vec![0.01; n]).unwrap();
            assert_eq!(
                out.features.dim(),
                (valid_frame_count(n), 128),
                "{n} samples"
            );
            assert_eq!(out.soft_tokens, soft_token_count(n), "{n} samples");
            assert!(out.features.iter().all(|f| f.is_finite()));
        }
    }

    #[test]
    fn features_error_empty_short_or_non_finite() {
        let text = log_mel_features(&[]).unwrap_err().to_string();
        assert!(text.contains("empty audio clip"), "{text}");
        let text = log_mel_features(&[0.1; 160]).unwrap_err().to_string();
        assert!(text.contains("shorter than one frame"), "{text}");
        let mut samples = vec![0.0; 1000];
        samples[7] = f32::INFINITY;
        let text = log_mel_features(&samples).unwrap_err().to_string();
        assert!(text.contains("sample 7 is inf"), "{text}");
    }

    #[test]
    fn features_faults_change_the_frames() {
        use crate::faults::with_faults;
        let clip = tone(1000.0, 0.5, 1.0);
        let clean = log_mel_features(&clip).unwrap();
        let power = with_faults(&[Fault::AudioPowerSpectrum], || log_mel_features(&clip)).unwrap();
        assert_eq!(power.features.dim(), (99, 128));
        assert!(
            (power.features[[10, 35]] - clean.features[[10, 35]]).abs() > 1.0,
            "audio_power_spectrum: {} vs {}",
            power.features[[10, 35]],
            clean.features[[10, 35]]
        );
        // Without the left pad: 98 frames for 1 s, frame i is the clean frame i + 1.
        let unpadded = with_faults(&[Fault::AudioNoLeftPad], || log_mel_features(&clip)).unwrap();
        assert_eq!(unpadded.features.dim(), (98, 128));
        assert_eq!(unpadded.features.row(0), clean.features.row(1));
        assert_eq!(unpadded.soft_tokens, 25);
    }
}
