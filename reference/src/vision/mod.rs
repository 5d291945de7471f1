//! The vision tower: from an image file to soft tokens in the text model's width (shared
//! spec: multimodal §1). E2B/E4B carry the on-device tower (768 wide, 16 layers, clipped
//! linears), 31B/26B-A4B the large one (1152 wide, 27 layers, standardize).
//!
//! Reading order, following the data:
//! 1. [`preprocessing`]: the file decoded to RGB, resized for a soft-token budget (bicubic with
//!    antialias, as PIL does), rescaled to [0, 1], cut into 16×16 patches with (x, y) positions;
//! 2. [`patch_embedding`](mod@patch_embedding): `input_proj(2p − 1)` plus the factorised x/y position tables;
//! 3. [`encoder_layer`](mod@encoder_layer) (×L): sandwich-normed bidirectional attention with [`rope_2d`] and a
//!    gated MLP, every projection a [`clipped_linear`];
//! 4. [`pooling`]: 3×3 cells by position, `× √Dv`, standardize (large tower);
//! 5. the projector into the text model ([`crate::projector`]), then the merge
//!    ([`crate::merge`]).
//!
//! [`weights`] is the only module that knows the tower's checkpoint names.
//!
//! Where Hugging Face and Google's JAX code differ (multimodal §1.9), this follows Hugging
//! Face: padded patches are left out entirely (JAX only down-weights them), the pooling kernel
//! is always 3 (JAX derives it from its default budget), degenerate image sizes are errors (JAX
//! returns 48×48).

pub mod clipped_linear;
pub mod encoder_layer;
pub mod patch_embedding;
pub mod pixel_values;
pub mod pooling;
pub mod preprocessing;
pub mod rope_2d;
pub mod weights;

use ndarray::Array2;

use crate::checkpoint::Checkpoint;
use crate::config::{ModelConfig, VisionConfig};
use crate::dump::Recorder;
use crate::error::{Error, Result};
use crate::projector::project_soft_tokens;
use encoder_layer::encoder_layer;
use patch_embedding::patch_embedding;
use pooling::pool_to_soft_tokens;
use rope_2d::inverse_frequencies_2d;
use weights::VisionWeights;

/// One image as the tower takes it: its valid patches and their positions.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageInput {
    /// `[n, 3·p²]` pixels in [0, 1], flattened (row in patch, column in patch, channel).
    pub pixel_values: Array2<f32>,
    /// `[x, y]` (column, row) of each patch in the patch grid.
    pub positions: Vec<[usize; 2]>,
}

impl ImageInput {
    /// Soft tokens this image becomes: one per `k × k` cell of patches.
    pub fn soft_tokens(&self, kernel: usize) -> usize {
        self.positions.len() / (kernel * kernel)
    }
}

impl From<preprocessing::ImagePatches> for ImageInput {
    fn from(patches: preprocessing::ImagePatches) -> Self {
        ImageInput {
            pixel_values: patches.pixel_values,
            positions: patches.positions,
        }
    }
}

/// The vision tower of a checkpoint, weights as f32.
pub struct VisionTower {
    pub config: VisionConfig,
    pub weights: VisionWeights,
}

impl VisionTower {
    /// Loads the tower of `config` from `checkpoint` (an error if the model has none).
    pub fn load(checkpoint: &Checkpoint, config: &ModelConfig) -> Result<Self> {
        let weights = VisionWeights::load(checkpoint, config)?;
        let vision = config
            .vision
            .clone()
            .expect("VisionWeights::load checked it");
        Ok(VisionTower {
            config: vision,
            weights,
        })
    }

    /// Encodes one image into soft tokens in the text width, `[S, Dt]`. Every intermediate goes
    /// to `recorder` under `vision.{name}` (`prefix` = `vision.` for a single image,
    /// `vision.{i}.` for image `i` of several; shared contracts §2).
    pub fn encode(
        &self,
        image: &ImageInput,
        prefix: &str,
        recorder: &mut Recorder,
    ) -> Result<Array2<f32>> {
        let config = &self.config;
        let expected_width = 3 * config.patch_size * config.patch_size;
        let (n, width) = image.pixel_values.dim();
        if width != expected_width || image.positions.len() != n {
            return Err(Error::input(format!(
                "an image is given as {n} patches of {width} values with {} positions; the vision tower takes [n, {expected_width}] pixel values and one (x, y) position per patch",
                image.positions.len()
            )));
        }
        recorder.record(
            &format!("{prefix}pixel_values"),
            image.pixel_values.view().into_dyn(),
        )?;
        let mut hidden = patch_embedding(
            &image.pixel_values,
            &image.positions,
            &self.weights.patch_embedder,
        )?;
        recorder.record(
            &format!("{prefix}patch_embeddings"),
            hidden.view().into_dyn(),
        )?;
        let inverse_frequencies = inverse_frequencies_2d(config.head_dim, config.rope_theta);
        for (i, layer) in self.weights.layers.iter().enumerate() {
            hidden = encoder_layer(
                &hidden,
                &image.positions,
                layer,
                config,
                &inverse_frequencies,
            );
            recorder.record(
                &format!("{prefix}layers.{i}.output"),
                hidden.view().into_dyn(),
            )?;
        }
        let pooled = pool_to_soft_tokens(
            &hidden,
            &image.positions,
            config.pooling_kernel_size,
            self.weights.standardize.as_ref(),
        )?;
        let soft = project_soft_tokens(&pooled, &self.weights.projection, config.rms_norm_eps);
        recorder.record(&format!("{prefix}soft_tokens"), soft.view().into_dyn())?;
        Ok(soft)
    }
}

/// The dump-name prefix of image `index` of `count` (shared contracts §2): `vision.` for a
/// single image, `vision.{index}.` for several.
pub fn dump_prefix(index: usize, count: usize) -> String {
    crate::merge::clip_prefix("vision", index, count)
}
