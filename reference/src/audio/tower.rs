//! The audio tower, end to end: log-mel features to soft tokens in the text width (shared
//! spec: multimodal §2).
//!
//! ```text
//! features [F, 128] ──► subsampling ──► [F', Da] ──► conformer layers ──► output_proj (+bias)
//!                   ──► projector (RMSNorm_∅, then a bias-free linear into Dt) ──► [F', Dt]
//! ```
//!
//! Hugging Face norms, then projects; Google's JAX code projects, then norms (same direction,
//! another per-token magnitude). This follows Hugging Face.

use ndarray::Array2;

use crate::audio::conformer_layer::conformer_layer;
use crate::audio::subsampling::subsample;
use crate::audio::weights::{AudioWeights, MEL_BINS};
use crate::checkpoint::Checkpoint;
use crate::config::{AudioConfig, ModelConfig};
use crate::dump::Recorder;
use crate::error::{Error, Result};
use crate::faults::{fault_active, Fault};
use crate::linear::linear;
use crate::projector::project_soft_tokens;
use crate::rms_norm::rms_norm_rows;

/// The audio tower of a checkpoint, weights as f32.
pub struct AudioTower {
    pub config: AudioConfig,
    pub weights: AudioWeights,
}

impl AudioTower {
    /// Loads the tower of `config` from `checkpoint` (an error if the model has none).
    pub fn load(checkpoint: &Checkpoint, config: &ModelConfig) -> Result<Self> {
        let weights = AudioWeights::load(checkpoint, config)?;
        let audio = config.audio.clone().expect("AudioWeights::load checked it");
        Ok(AudioTower {
            config: audio,
            weights,
        })
    }

    /// Encodes one clip's valid log-mel frames (`[F, 128]`) into soft tokens `[F', Dt]`,
    /// `F' = ⌈⌈F/2⌉/2⌉`. Intermediates go to `recorder` under `prefix` (`audio.` or `audio.{i}.`).
    pub fn encode(
        &self,
        features: &Array2<f32>,
        prefix: &str,
        recorder: &mut Recorder,
    ) -> Result<Array2<f32>> {
        if features.ncols() != MEL_BINS || features.nrows() == 0 {
            return Err(Error::input(format!(
                "audio features are [frames, {MEL_BINS}] with at least one frame; found {:?}",
                features.shape()
            )));
        }
        let config = &self.config;
        recorder.record(&format!("{prefix}features"), features.view().into_dyn())?;
        let mut hidden = subsample(features, &self.weights.subsampling, config.rms_norm_eps);
        recorder.record(&format!("{prefix}subsample"), hidden.view().into_dyn())?;
        for (i, layer) in self.weights.layers.iter().enumerate() {
            hidden = conformer_layer(&hidden, layer, config);
            recorder.record(
                &format!("{prefix}layers.{i}.output"),
                hidden.view().into_dyn(),
            )?;
        }
        let mut output = linear(hidden.view(), &self.weights.output_proj);
        output += &self.weights.output_bias;
        let soft = if fault_active(Fault::AudioProjectThenNorm) {
            // Bug (JAX's order): project, then norm.
            rms_norm_rows(
                linear(output.view(), &self.weights.projection).view(),
                None,
                config.rms_norm_eps,
            )
        } else {
            project_soft_tokens(&output, &self.weights.projection, config.rms_norm_eps)
        };
        recorder.record(&format!("{prefix}soft_tokens"), soft.view().into_dyn())?;
        Ok(soft)
    }
}

/// Soft tokens of `frames` valid log-mel frames: two halvings, `⌈⌈F/2⌉/2⌉` (spec §2.6).
pub fn soft_tokens_of_frames(frames: usize) -> usize {
    frames.div_ceil(2).div_ceil(2)
}
