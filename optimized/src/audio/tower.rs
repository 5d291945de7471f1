//! The audio tower, end to end: log-mel features to soft tokens in the text width (shared
//! spec: multimodal §2).
//!
//! ```text
//! features [F, 128] ──► subsampling ──► [F', Da] ──► conformer layers ──► output_proj (+bias) [F', O]
//!                   ──► projector (RMSNorm_∅, then a bias-free linear into Dt) ──► [F', Dt]
//! ```
//!
//! `F' = ⌈⌈F/2⌉/2⌉`. Hugging Face norms, then projects; Google's JAX code projects, then norms
//! (same direction, another per-token magnitude). This follows Hugging Face, like the reference
//! (`gemma4_reference::audio::tower`), and records the same tensors under the same names.

use gemma4_reference::audio::weights::MEL_BINS;
use gemma4_reference::checkpoint::Checkpoint;
use gemma4_reference::config::{AudioConfig, ModelConfig};
use gemma4_reference::dump::Recorder;
use gemma4_reference::error::Error;
use gemma4_reference::Result;
use ndarray::Array2;

pub use gemma4_reference::audio::tower::soft_tokens_of_frames;

use crate::attention::record;
use crate::audio::conformer_layer::conformer_layer;
use crate::audio::subsampling::subsample;
use crate::audio::weights::AudioWeights;
use crate::linear::linear;
use crate::parallel::for_each_row;
use crate::projector::project_soft_tokens;

/// The audio tower of a checkpoint, weights as stored (memory-mapped: the tower must not
/// outlive the [`Checkpoint`] it was loaded from; [`crate::Gemma4Optimized`] keeps both).
pub struct AudioTower {
    pub config: AudioConfig,
    pub weights: AudioWeights,
}

impl AudioTower {
    /// Maps the tower of `config` from `checkpoint`, with the reference's validation (same
    /// errors: no `audio_config`, a causal-LM layout, a first channel count other than 128, a
    /// missing or mis-shaped tensor, a non-finite weight, a NaN clip bound).
    pub fn load(checkpoint: &Checkpoint, config: &ModelConfig) -> Result<Self> {
        let weights = AudioWeights::load(checkpoint, config)?;
        let audio = config.audio.clone().expect("AudioWeights::load checked it");
        Ok(AudioTower {
            config: audio,
            weights,
        })
    }

    /// Encodes one clip's valid log-mel frames (`[F, 128]`) into soft tokens `[F', Dt]`,
    /// `F' = ⌈⌈F/2⌉/2⌉`. Intermediates go to `recorder` under the reference's names
    /// (`{prefix}features`, `{prefix}subsample`, `{prefix}layers.{i}.output`,
    /// `{prefix}soft_tokens`; `prefix` is `audio.` or `audio.{i}.`, from
    /// `gemma4_reference::merge::clip_prefix`). Runs on the current rayon pool.
    pub fn encode(
        &self,
        features: &Array2<f32>,
        prefix: &str,
        recorder: &mut Recorder,
    ) -> Result<Array2<f32>> {
        if features.ncols() != MEL_BINS || features.nrows() == 0 {
            return Err(Error::Input {
                message: format!(
                    "audio features are [frames, {MEL_BINS}] with at least one frame; found {:?}",
                    features.shape()
                ),
            });
        }
        let config = &self.config;
        let eps = config.rms_norm_eps;
        let frames = features.nrows();
        let features = features.as_standard_layout();
        let features = features.as_slice().expect("standard layout");
        record(
            recorder,
            &format!("{prefix}features"),
            &[frames, MEL_BINS],
            features,
        )?;
        let width = config.hidden_size;
        let mut hidden = subsample(features, frames, MEL_BINS, &self.weights.subsampling, eps);
        let steps = hidden.len() / width;
        record(
            recorder,
            &format!("{prefix}subsample"),
            &[steps, width],
            &hidden,
        )?;
        for (i, layer) in self.weights.layers.iter().enumerate() {
            conformer_layer(&mut hidden, steps, layer, config);
            record(
                recorder,
                &format!("{prefix}layers.{i}.output"),
                &[steps, width],
                &hidden,
            )?;
        }
        // output_proj with its bias, then the projector (RMSNorm_∅, linear into Dt).
        let mut output = linear(&hidden, steps, &self.weights.output_proj);
        let bias = &self.weights.output_bias;
        for_each_row(&mut output, bias.len(), |_, row| {
            row.iter_mut().zip(bias).for_each(|(v, &b)| *v += b);
        });
        let soft = project_soft_tokens(&output, steps, &self.weights.projection, eps);
        let text_width = self.weights.projection.rows;
        record(
            recorder,
            &format!("{prefix}soft_tokens"),
            &[steps, text_width],
            &soft,
        )?;
        Ok(Array2::from_shape_vec((steps, text_width), soft).expect("[F', Dt]"))
    }
}
