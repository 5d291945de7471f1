//! The audio tower of E2B/E4B: from a 16 kHz WAV file to soft tokens in the text model's width
//! (shared spec: multimodal §2). The larger models (26B-A4B, 31B) have no audio tower.
//!
//! Reading order, following the data:
//! 1. [`wav`]: the file decoded to a mono 16 kHz waveform in [−1, 1] (as soundfile/librosa);
//! 2. [`features`]: the log-mel front end, Hugging Face's `Gemma4AudioFeatureExtractor`
//!    (semicausal pad, 320-sample Hann frames, |rfft 512|, 128 HTK mel bins, `ln(· + 0.001)`),
//!    and the soft-token count of a clip; [`features_file`] reads precomputed features instead;
//! 3. [`subsampling`]: two stride-2 convolutions (time and mel ÷ 4), projected to the tower width;
//! 4. [`conformer_layer`] (×12): [`feed_forward`] halves around chunked local [`attention`] and a
//!    [`light_conv`];
//! 5. [`tower`]: the whole stack, its output projection and the projector into the text width.
//!
//! [`weights`] is the only module that knows the tower's checkpoint names.

pub mod attention;
pub mod conformer_layer;
pub mod features;
pub mod features_file;
pub mod feed_forward;
pub mod light_conv;
pub mod subsampling;
pub mod tower;
pub mod wav;
pub mod weights;

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use ndarray::Array2;

use crate::error::{Error, Result};

/// One audio clip of a prompt, as the audio tower receives it.
#[derive(Clone, Debug, PartialEq)]
pub enum AudioInput {
    /// A decoded WAV file (16 kHz mono, [`wav::read_wav`]): the log-mel front end runs when the
    /// model embeds the prompt, so a dump's `audio.features` is our front end's, and the front
    /// end's faults (`audio_power_spectrum`, `audio_no_left_pad`) show in it.
    Waveform {
        waveform: wav::Waveform,
        /// The file it came from, named in errors.
        source: PathBuf,
    },
    /// Precomputed log-mel features `[F, 128]`, valid frames only (`--audio-features`,
    /// [`features_file::read_audio_features`]): the front end is skipped.
    Features(Array2<f32>),
}

impl AudioInput {
    /// The clip's log-mel features `[F, 128]` (shared spec: multimodal §2.1): computed by
    /// [`features::log_mel_features`] from a waveform, as given otherwise. Errors name the file
    /// (a clip shorter than one frame, a non-finite sample).
    pub fn features(&self) -> Result<Cow<'_, Array2<f32>>> {
        match self {
            AudioInput::Features(features) => Ok(Cow::Borrowed(features)),
            AudioInput::Waveform { waveform, source } => {
                match features::log_mel_features(&waveform.samples) {
                    Ok(features) => Ok(Cow::Owned(features.features)),
                    Err(Error::Input { message }) => Err(Error::audio(source, message)),
                    Err(other) => Err(other),
                }
            }
        }
    }
}

/// The clip of the WAV file at `path` (what `gemma4 dump --audio FILE.wav` feeds the tower):
/// [`wav::read_wav`], checked now to give at least one frame of finite samples, so that a bad
/// file is refused before any model work.
///
/// Errors name `path`: everything [`wav::read_wav`] refuses, a clip shorter than one frame
/// (161 samples), a non-finite sample.
pub fn load_clip(path: &Path) -> Result<AudioInput> {
    let waveform = wav::read_wav(path)?;
    if features::valid_frame_count(waveform.samples.len()) == 0 {
        return Err(Error::audio(
            path,
            format!(
                "{} samples make no complete 20 ms frame: a clip needs at least 161 samples at 16 kHz",
                waveform.samples.len()
            ),
        ));
    }
    if let Some(index) = waveform.samples.iter().position(|s| !s.is_finite()) {
        return Err(Error::audio(
            path,
            format!(
                "sample {index} is {} (not a finite number)",
                waveform.samples[index]
            ),
        ));
    }
    Ok(AudioInput::Waveform {
        waveform,
        source: path.to_path_buf(),
    })
}
