//! Reading a WAV file into the waveform the audio front end takes (shared spec: multimodal §2.1:
//! "a 16 kHz mono float waveform").
//!
//! Hugging Face's feature extractor is handed floats in [−1, 1]; how a file becomes those floats
//! is the loader's business (soundfile, librosa). This module decodes the common uncompressed
//! encodings as they do:
//!
//! | encoding (WAV format tag) | sample | float |
//! |---|---|---|
//! | 8-bit PCM (unsigned) | `u` | `(u − 128) / 128` |
//! | 16-bit PCM | `i` | `i / 32768` |
//! | 24-bit PCM (3- or 4-byte container) | `i` | `i / 2²³` |
//! | 32-bit PCM | `i` | `i / 2³¹` (one rounding to f32) |
//! | 32-bit IEEE float | `x` | `x` as stored |
//!
//! `WAVE_FORMAT_EXTENSIBLE` files of these encodings are read too. Nothing is resampled or
//! down-mixed: a file that is not mono at 16 kHz is refused with an error naming the file and
//! the value found. Truncated, empty and malformed files are errors, never panics
//! ([`decode_wav`] is the entry point for fuzzing).

use std::io::Cursor;
use std::path::Path;

use hound::{SampleFormat, WavReader};

use crate::audio::features::SAMPLE_RATE;
use crate::error::{Error, Result};

/// A mono waveform, samples in [−1, 1] as f32 (what Hugging Face's feature extractor takes).
///
/// [`read_wav`] only returns 16 kHz ([`SAMPLE_RATE`]) waveforms; `sample_rate` is kept so that a
/// waveform built by hand says what it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Waveform {
    /// `[N]` samples, one channel.
    pub samples: Vec<f32>,
    /// Samples per second.
    pub sample_rate: u32,
}

impl Waveform {
    /// The duration in seconds.
    pub fn seconds(&self) -> f64 {
        self.samples.len() as f64 / self.sample_rate as f64
    }
}

/// Reads the WAV file at `path` as a 16 kHz mono waveform.
///
/// Errors (all naming `path`): the file cannot be read; it is not a WAV file, is truncated or
/// malformed; its encoding is not one of the table in the module doc; it has no samples; it is
/// not mono; it is not sampled at 16 kHz.
pub fn read_wav(path: &Path) -> Result<Waveform> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode_wav(&bytes, path)
}

/// Decodes the bytes of a WAV file as a 16 kHz mono waveform; `path` only names the file in
/// errors. See [`read_wav`] for what is accepted.
pub fn decode_wav(bytes: &[u8], path: &Path) -> Result<Waveform> {
    let malformed = |e: hound::Error| Error::audio(path, format!("not a readable WAV file: {e}"));
    let mut reader = WavReader::new(Cursor::new(bytes)).map_err(malformed)?;
    let spec = reader.spec();
    if spec.channels != 1 {
        return Err(Error::audio(
            path,
            format!(
                "has {} channels; the audio tower takes mono audio (mix it down first)",
                spec.channels
            ),
        ));
    }
    if spec.sample_rate != SAMPLE_RATE {
        return Err(Error::audio(
            path,
            format!(
                "is sampled at {} Hz; the audio tower takes {SAMPLE_RATE} Hz (resample it first)",
                spec.sample_rate
            ),
        ));
    }
    let declared = reader.len() as usize;
    if declared == 0 {
        return Err(Error::audio(
            path,
            "has no samples (its data chunk is empty)",
        ));
    }
    // Never trust the header's length for an allocation: a sample takes at least one byte.
    let mut samples = Vec::with_capacity(declared.min(bytes.len()));
    let truncated = |read: usize, e: hound::Error| {
        Error::audio(
            path,
            format!(
                "truncated or unreadable data: sample {read} of the {declared} its header declares: {e}"
            ),
        )
    };
    match (spec.sample_format, spec.bits_per_sample) {
        (SampleFormat::Float, 32) => {
            for sample in reader.samples::<f32>() {
                samples.push(sample.map_err(|e| truncated(samples.len(), e))?);
            }
        }
        (SampleFormat::Int, bits @ (8 | 16 | 24 | 32)) => {
            // soundfile/librosa scaling: full scale 2^(bits−1) maps to 1.
            let full_scale = (1u64 << (bits - 1)) as f64;
            for sample in reader.samples::<i32>() {
                let value = sample.map_err(|e| truncated(samples.len(), e))?;
                samples.push((value as f64 / full_scale) as f32);
            }
        }
        (format, bits) => {
            return Err(Error::audio(
                path,
                format!(
                    "unsupported sample encoding: {bits}-bit {}; supported are 8/16/24/32-bit integer PCM and 32-bit float",
                    match format {
                        SampleFormat::Float => "float",
                        SampleFormat::Int => "integer",
                    }
                ),
            ));
        }
    }
    if let Some(index) = samples.iter().position(|s| !s.is_finite()) {
        return Err(Error::audio(
            path,
            format!("sample {index} is {} (not a finite number)", samples[index]),
        ));
    }
    Ok(Waveform {
        samples,
        sample_rate: spec.sample_rate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A WAV file: `format` 1 (PCM) or 3 (float), `data` the data chunk's bytes; `declared`
    /// overrides the data chunk's declared length.
    fn wav_bytes(
        format: u16,
        channels: u16,
        rate: u32,
        bits: u16,
        data: &[u8],
        declared: Option<u32>,
    ) -> Vec<u8> {
        let block = channels * bits / 8;
        let mut fmt = Vec::new();
        fmt.extend_from_slice(&format.to_le_bytes());
        fmt.extend_from_slice(&channels.to_le_bytes());
        fmt.extend_from_slice(&rate.to_le_bytes());
        fmt.extend_from_slice(&(rate * block as u32).to_le_bytes());
        fmt.extend_from_slice(&block.to_le_bytes());
        fmt.extend_from_slice(&bits.to_le_bytes());
        let mut body = b"WAVEfmt ".to_vec();
        body.extend_from_slice(&(fmt.len() as u32).to_le_bytes());
        body.extend_from_slice(&fmt);
        body.extend_from_slice(b"data");
        body.extend_from_slice(&declared.unwrap_or(data.len() as u32).to_le_bytes());
        body.extend_from_slice(data);
        let mut file = b"RIFF".to_vec();
        file.extend_from_slice(&(body.len() as u32).to_le_bytes());
        file.extend_from_slice(&body);
        file
    }

    fn pcm16(values: &[i16]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn decode(bytes: &[u8]) -> Result<Waveform> {
        decode_wav(bytes, Path::new("clip.wav"))
    }

    fn error_text(bytes: &[u8]) -> String {
        match decode(bytes) {
            Ok(w) => panic!("expected an error, decoded {} samples", w.samples.len()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn wav_int16_scaled_by_32768() {
        let data = pcm16(&[0, 16384, -32768, 32767, -1]);
        let wave = decode(&wav_bytes(1, 1, 16_000, 16, &data, None)).unwrap();
        assert_eq!(wave.sample_rate, 16_000);
        assert_eq!(
            wave.samples,
            vec![0.0, 0.5, -1.0, 32767.0 / 32768.0, -1.0 / 32768.0]
        );
    }

    #[test]
    fn wav_int8_unsigned_offset_128() {
        let wave = decode(&wav_bytes(1, 1, 16_000, 8, &[128, 0, 255, 192], None)).unwrap();
        assert_eq!(wave.samples, vec![0.0, -1.0, 127.0 / 128.0, 0.5]);
    }

    #[test]
    fn wav_int24_scaled_by_2_pow_23() {
        // −2²³, 2²³ − 1, −1, 2²²
        let data = [
            0x00, 0x00, 0x80, 0xff, 0xff, 0x7f, 0xff, 0xff, 0xff, 0x00, 0x00, 0x40,
        ];
        let wave = decode(&wav_bytes(1, 1, 16_000, 24, &data, None)).unwrap();
        let full = 8_388_608.0f64;
        let expected: Vec<f32> = [-8_388_608.0, 8_388_607.0, -1.0, 4_194_304.0]
            .iter()
            .map(|v: &f64| (v / full) as f32)
            .collect();
        assert_eq!(wave.samples, expected);
    }

    #[test]
    fn wav_int32_scaled_by_2_pow_31() {
        let values = [i32::MIN, i32::MAX, 1 << 30, -1];
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let wave = decode(&wav_bytes(1, 1, 16_000, 32, &data, None)).unwrap();
        assert_eq!(wave.samples, vec![-1.0, 1.0, 0.5, -1.0 / 2_147_483_648.0]);
    }

    #[test]
    fn wav_float32_as_stored() {
        let values = [0.25f32, -0.75, 1.0, 1e-9];
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let wave = decode(&wav_bytes(3, 1, 16_000, 32, &data, None)).unwrap();
        assert_eq!(wave.samples, values.to_vec());
        assert!((wave.seconds() - 4.0 / 16_000.0).abs() < 1e-12);
    }

    #[test]
    fn wav_error_stereo_names_file_and_channels() {
        let text = error_text(&wav_bytes(1, 2, 16_000, 16, &pcm16(&[1, 2, 3, 4]), None));
        assert!(
            text.contains("clip.wav") && text.contains("2 channels"),
            "{text}"
        );
    }

    #[test]
    fn wav_error_44k_names_rate() {
        let text = error_text(&wav_bytes(1, 1, 44_100, 16, &pcm16(&[1, 2]), None));
        assert!(
            text.contains("clip.wav") && text.contains("44100 Hz"),
            "{text}"
        );
    }

    #[test]
    fn wav_error_empty_data_chunk() {
        let text = error_text(&wav_bytes(1, 1, 16_000, 16, &[], None));
        assert!(text.contains("no samples"), "{text}");
    }

    #[test]
    fn wav_error_truncated_data_chunk() {
        let text = error_text(&wav_bytes(1, 1, 16_000, 16, &pcm16(&[1, 2, 3]), Some(600)));
        assert!(
            text.contains("truncated") && text.contains("of the 300"),
            "{text}"
        );
    }

    #[test]
    fn wav_error_non_finite_float_sample() {
        let data: Vec<u8> = [0.5f32, f32::NAN]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let text = error_text(&wav_bytes(3, 1, 16_000, 32, &data, None));
        assert!(text.contains("sample 1 is NaN"), "{text}");
    }

    #[test]
    fn wav_error_not_a_wav_file() {
        for bytes in [
            &b""[..],
            b"RIFF",
            b"not a wav file at all, just text",
            b"\x89PNG\r\n",
        ] {
            let text = error_text(bytes);
            assert!(text.contains("not a readable WAV file"), "{text}");
        }
    }

    #[test]
    fn wav_error_unsupported_encoding() {
        // 64-bit float is refused by the parser, 12-bit integer by the format check.
        let text = error_text(&wav_bytes(3, 1, 16_000, 64, &[0; 16], None));
        assert!(text.contains("clip.wav"), "{text}");
        let text = error_text(&wav_bytes(1, 1, 16_000, 12, &[0; 4], None));
        assert!(text.contains("clip.wav"), "{text}");
    }

    #[test]
    fn wav_error_missing_file_names_it() {
        let path = Path::new("/nonexistent/dir/clip.wav");
        let text = read_wav(path).unwrap_err().to_string();
        assert!(text.contains("/nonexistent/dir/clip.wav"), "{text}");
    }

    mod garbage {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// Random bytes: an error or a waveform, never a panic.
            #[test]
            fn wav_garbage_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
                let _ = decode(&bytes);
            }

            /// A valid header with random damage (every field of it reachable): never a panic,
            /// and a decoded waveform is always 16 kHz mono with finite samples.
            #[test]
            fn wav_damaged_header_never_panics(
                edits in proptest::collection::vec((0usize..48, any::<u8>()), 1..6),
                cut in 0usize..80,
            ) {
                let mut bytes = wav_bytes(1, 1, 16_000, 16, &pcm16(&[7, -7, 300, -300, 1, 2, 3, 4]), None);
                for (at, value) in edits {
                    bytes[at] = value;
                }
                bytes.truncate(bytes.len().saturating_sub(cut));
                if let Ok(wave) = decode(&bytes) {
                    prop_assert_eq!(wave.sample_rate, SAMPLE_RATE);
                    prop_assert!(!wave.samples.is_empty());
                    prop_assert!(wave.samples.iter().all(|s| s.is_finite()));
                }
            }
        }
    }
}
