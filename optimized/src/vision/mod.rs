//! The vision tower, fast: from preprocessed patches to soft tokens in the text model's width
//! (shared spec: multimodal §1). The same model as `gemma4_reference::vision`, module for module:
//!
//! 1. [`patch_embedding`](mod@patch_embedding): `input_proj(2p − 1)` plus the factorised x/y position tables;
//! 2. [`encoder_layer`](mod@encoder_layer) (×L): sandwich-normed bidirectional attention with [`rope_2d`] and a
//!    gated MLP, every projection a [`clipped_linear`];
//! 3. [`pooling`]: 3×3 cells by position, `× √Dv`, standardize (large tower);
//! 4. the projector into the text model ([`crate::projector`]), then the merge
//!    ([`crate::model::Gemma4Optimized::embed_prompt`]).
//!
//! [`weights`] maps the tower as stored and validates it with the reference's names, shapes and
//! checks. Preprocessing (decoding, resizing, patchifying an image file) is the reference's own
//! (`gemma4_reference::vision::preprocessing`): it runs once per image and is not a hot path.
//!
//! What is fast: weights as stored (bf16/f16 widened inside the kernels), the products on the
//! rayon pool (q/k/v and gate/up grouped), fused norms and residual adds, one 2D RoPE table per
//! image, and attention over the patches as blocked matrix products
//! ([`encoder_layer::attend_patches`]).

pub mod clipped_linear;
pub mod encoder_layer;
pub mod patch_embedding;
pub mod pooling;
pub mod rope_2d;
pub mod weights;

use gemma4_reference::checkpoint::Checkpoint;
use gemma4_reference::config::{ModelConfig, VisionConfig};
use gemma4_reference::dump::Recorder;
use gemma4_reference::error::Error;
use gemma4_reference::vision::rope_2d::inverse_frequencies_2d;
use gemma4_reference::Result;
use ndarray::Array2;

pub use gemma4_reference::vision::{dump_prefix, ImageInput};

use crate::attention::record;
use crate::projector::project_soft_tokens;
use encoder_layer::encoder_layer;
use patch_embedding::patch_embedding;
use pooling::pool_to_soft_tokens;
use rope_2d::Rope2dTable;
use weights::VisionWeights;

/// The vision tower of a checkpoint, weights as stored (memory-mapped: the tower must not
/// outlive the [`Checkpoint`] it was loaded from; [`crate::Gemma4Optimized`] keeps both).
pub struct VisionTower {
    pub config: VisionConfig,
    pub weights: VisionWeights,
}

impl VisionTower {
    /// Maps the tower of `config` from `checkpoint`, with the reference's validation (same
    /// errors: no `vision_config`, a causal-LM layout, a missing or mis-shaped tensor, a
    /// non-finite weight, a NaN clip bound).
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
    /// to `recorder` under the reference's names (`{prefix}pixel_values`,
    /// `{prefix}patch_embeddings`, `{prefix}layers.{i}.output`, `{prefix}soft_tokens`; `prefix`
    /// from [`dump_prefix`]). Runs on the current rayon pool.
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
            return Err(Error::Input {
 message: format!(
                "an image is given as {n} patches of {width} values with {} positions; the vision tower takes [n, {expected_width}] pixel values and one (x, y) position per patch",
                image.positions.len()
            ),
 });
        }
        let pixels = image.pixel_values.as_standard_layout();
        let pixels = pixels.as_slice().expect("standard layout");
        record(
            recorder,
            &format!("{prefix}pixel_values"),
            &[n, width],
            pixels,
        )?;
        let hidden_size = config.hidden_size;
        let mut hidden = patch_embedding(pixels, &image.positions, &self.weights.patch_embedder)?;
        record(
            recorder,
            &format!("{prefix}patch_embeddings"),
            &[n, hidden_size],
            &hidden,
        )?;
        // The cos/sin of every patch, once for all heads and layers.
        let rope = Rope2dTable::new(
            &inverse_frequencies_2d(config.head_dim, config.rope_theta),
            &image.positions,
        );
        for (i, layer) in self.weights.layers.iter().enumerate() {
            encoder_layer(&mut hidden, n, layer, config, &rope);
            record(
                recorder,
                &format!("{prefix}layers.{i}.output"),
                &[n, hidden_size],
                &hidden,
            )?;
        }
        let pooled = pool_to_soft_tokens(
            &hidden,
            hidden_size,
            &image.positions,
            config.pooling_kernel_size,
            self.weights.standardize.as_ref(),
        )?;
        let tokens = pooled.len() / hidden_size;
        let soft = project_soft_tokens(
            &pooled,
            tokens,
            &self.weights.projection,
            config.rms_norm_eps,
        );
        let text_width = self.weights.projection.rows;
        record(
            recorder,
            &format!("{prefix}soft_tokens"),
            &[tokens, text_width],
            &soft,
        )?;
        Ok(Array2::from_shape_vec((tokens, text_width), soft).expect("[S, Dt]"))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::checkpoint::Matrix;
    use crate::synthetic::{write_checkpoint, TinyMultimodalConfig};
    use crate::testing::{assert_close, random_values, row_major, to_array2};
    use crate::vision::clipped_linear::ClippedLinear;
    use crate::vision::weights::EncoderLayerWeights;
    use gemma4_reference::checkpoint::WeightDtype;
    use gemma4_reference::dump::ActivationDump;
    use gemma4_reference::vision::clipped_linear::{ClipBounds, ClippedLinear as ReferenceLinear};
    use gemma4_reference::vision::weights::EncoderLayerWeights as ReferenceLayer;
    use ndarray::Array1;

    /// A small tower config: 32 wide, 4 heads × 8, `kv_heads` KV heads (1, 2 or 4), MLP 48.
    pub(crate) fn small_vision_config(clipped: bool, kv_heads: usize) -> VisionConfig {
        VisionConfig {
            hidden_size: 32,
            intermediate_size: 48,
            num_hidden_layers: 1,
            num_attention_heads: 4,
            num_key_value_heads: kv_heads,
            head_dim: 8,
            patch_size: 16,
            position_embedding_size: 64,
            pooling_kernel_size: 3,
            use_clipped_linears: clipped,
            standardize: false,
            rms_norm_eps: 1e-6,
            rope_theta: 100.0,
        }
    }

    /// One random encoder layer of `config` in both engines (same values; bounds near ±1 when
    /// clipped, k/v and gate/up sharing theirs).
    pub(crate) fn random_layer(
        config: &VisionConfig,
        seed: u64,
    ) -> (EncoderLayerWeights, ReferenceLayer) {
        let (width, f) = (config.hidden_size, config.intermediate_size);
        let (q_rows, kv_rows) = (
            config.num_attention_heads * config.head_dim,
            config.num_key_value_heads * config.head_dim,
        );
        let bounds = |group: u64| {
            let r = random_values(4, seed * 31 + group, 0.3);
            config.use_clipped_linears.then_some(ClipBounds {
                input_min: -1.0 - r[0].abs(),
                input_max: 0.9 + r[1].abs(),
                output_min: -0.8 - r[2].abs(),
                output_max: 0.7 + r[3].abs(),
            })
        };
        let shapes = [
            (q_rows, width, 0),
            (kv_rows, width, 1),
            (kv_rows, width, 1),
            (width, q_rows, 2),
            (f, width, 3),
            (f, width, 3),
            (width, f, 4),
        ];
        let linears: Vec<(ClippedLinear, ReferenceLinear)> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(rows, cols, group))| {
                let w = random_values(
                    rows * cols,
                    seed + 100 + i as u64,
                    1.7 / (cols as f32).sqrt(),
                );
                (
                    ClippedLinear {
                        weight: Matrix::from_f32(rows, cols, w.clone()),
                        bounds: bounds(group),
                    },
                    ReferenceLinear {
                        weight: to_array2(rows, cols, &w),
                        bounds: bounds(group),
                    },
                )
            })
            .collect();
        let norm = |i: u64, len: usize| -> Vec<f32> {
            random_values(len, seed + 200 + i, 0.5)
                .iter()
                .map(|v| 1.0 + v)
                .collect()
        };
        let norms: Vec<Vec<f32>> = vec![
            norm(0, width),
            norm(1, config.head_dim),
            norm(2, config.head_dim),
            norm(3, width),
            norm(4, width),
            norm(5, width),
        ];
        let [q, k, v, o, gate, up, down]: [(ClippedLinear, ReferenceLinear); 7] =
            linears.try_into().unwrap();
        let ours = EncoderLayerWeights {
            input_layernorm: norms[0].clone(),
            q_proj: q.0,
            k_proj: k.0,
            v_proj: v.0,
            o_proj: o.0,
            q_norm: norms[1].clone(),
            k_norm: norms[2].clone(),
            post_attention_layernorm: norms[3].clone(),
            pre_feedforward_layernorm: norms[4].clone(),
            gate_proj: gate.0,
            up_proj: up.0,
            down_proj: down.0,
            post_feedforward_layernorm: norms[5].clone(),
        };
        let a = |i: usize| Array1::from(norms[i].clone());
        let reference = ReferenceLayer {
            input_layernorm: a(0),
            q_proj: q.1,
            k_proj: k.1,
            v_proj: v.1,
            o_proj: o.1,
            q_norm: a(1),
            k_norm: a(2),
            post_attention_layernorm: a(3),
            pre_feedforward_layernorm: a(4),
            gate_proj: gate.1,
            up_proj: up.1,
            down_proj: down.1,
            post_feedforward_layernorm: a(5),
        };
        (ours, reference)
    }

    /// A random image of a `rows × columns` patch grid (row-major positions, pixels in [0, 1]).
    pub(crate) fn random_image(rows: usize, columns: usize, seed: u64) -> ImageInput {
        let n = rows * columns;
        let pixels = random_values(n * 768, seed, 0.5)
            .iter()
            .map(|v| v + 0.5)
            .collect();
        ImageInput {
            pixel_values: Array2::from_shape_vec((n, 768), pixels).unwrap(),
            positions: (0..n).map(|i| [i % columns, i / columns]).collect(),
        }
    }

    /// The whole tower on a random tiny checkpoint (on-device-like: clipped; large-like:
    /// standardize; both as f32 and the clipped one in bf16, weights as stored), one image of
    /// 21 × 30 = 630 patches (70 soft tokens), against the reference: every recorded tensor.
    #[test]
    fn vision_tower_matches_reference_tiny_towers() {
        for (clipped, standardize, dtype) in [
            (true, false, WeightDtype::F32),
            (false, true, WeightDtype::F32),
            (true, false, WeightDtype::BF16),
        ] {
            let model = TinyMultimodalConfig::small(clipped, standardize);
            let dir = tempfile::tempdir().unwrap();
            write_checkpoint(dir.path(), &model.config_json(), dtype, 11).unwrap();
            let config = ModelConfig::from_dir(dir.path()).unwrap();
            let checkpoint = Checkpoint::open(dir.path()).unwrap();
            let ours = VisionTower::load(&checkpoint, &config).unwrap();
            let reference =
                gemma4_reference::vision::VisionTower::load(&checkpoint, &config).unwrap();
            let image = random_image(21, 30, 3);
            let (mut our_dump, mut reference_dump) = (ActivationDump::new(), ActivationDump::new());
            let soft = ours
                .encode(&image, "vision.", &mut Recorder::new(&mut our_dump))
                .unwrap();
            let expected = reference
                .encode(&image, "vision.", &mut Recorder::new(&mut reference_dump))
                .unwrap();
            assert_eq!(soft.dim(), (70, model.text.hidden_size));
            assert_eq!(
                our_dump.names_in_model_order(),
                reference_dump.names_in_model_order()
            );
            let what = format!("clipped {clipped}, standardize {standardize}, {dtype:?}");
            let tensor = |dump: &ActivationDump, name: &str| {
                row_major(dump.get(name).unwrap().as_f32().unwrap())
            };
            for name in reference_dump.names_in_model_order() {
                let (a, b) = (tensor(&our_dump, name), tensor(&reference_dump, name));
                assert_eq!(a.len(), b.len(), "{name}");
                // End to end: the tower is ill-conditioned in f32 — the reference itself, fed
                // its pixels × (1 + 2⁻²³) (one ulp), moves by 3e-6 at layer 0 and 1.4e-5 at
                // layer 1 (measured on this image) — so two summation orders drift apart by as
                // much. 5e-5 is the size of that drift with room for other seeds and bf16; a
                // bug (a clamp, a norm, a RoPE axis, a table) moves outputs by ≥ 1e-3.
                assert_close(&format!("{name} ({what})"), &a, &b, 5e-5);
            }
            assert_close(
                &format!("soft tokens ({what})"),
                &row_major(&soft),
                &row_major(&expected),
                5e-5,
            );
            // Layer by layer, from the reference's own input to that layer: the precise check
            // (products and attention sums in other orders: measured ≤ 1e-6).
            let rope = Rope2dTable::new(
                &inverse_frequencies_2d(ours.config.head_dim, ours.config.rope_theta),
                &image.positions,
            );
            for (i, layer) in ours.weights.layers.iter().enumerate() {
                let input = match i {
                    0 => "vision.patch_embeddings".to_string(),
                    _ => format!("vision.layers.{}.output", i - 1),
                };
                let mut hidden = tensor(&reference_dump, &input);
                encoder_layer(
                    &mut hidden,
                    image.positions.len(),
                    layer,
                    &ours.config,
                    &rope,
                );
                let expected = tensor(&reference_dump, &format!("vision.layers.{i}.output"));
                assert_close(
                    &format!("layer {i} alone ({what})"),
                    &hidden,
                    &expected,
                    5e-6,
                );
            }
        }
    }

    /// Linear `index` (q, k, v, o, gate, up, down) of layer `layer`.
    fn linear_slot(tower: &mut VisionTower, layer: usize, index: usize) -> &mut ClippedLinear {
        let l = &mut tower.weights.layers[layer];
        [
            &mut l.q_proj,
            &mut l.k_proj,
            &mut l.v_proj,
            &mut l.o_proj,
            &mut l.gate_proj,
            &mut l.up_proj,
            &mut l.down_proj,
        ]
        .into_iter()
        .nth(index)
        .expect("7 linears")
    }

    /// The synthetic tower's clip bounds really clip: on a small image, lifting any one clamp
    /// (the input or the output side of any of the 7 linears of any layer) changes the soft
    /// tokens, so the comparisons above would see a missing clamp.
    #[test]
    fn vision_synthetic_clip_bounds_bite_on_every_linear() {
        let model = TinyMultimodalConfig::small(true, false);
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &model.config_json(), WeightDtype::F32, 11).unwrap();
        let config = ModelConfig::from_dir(dir.path()).unwrap();
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        let mut tower = VisionTower::load(&checkpoint, &config).unwrap();
        let image = random_image(6, 9, 4);
        let encode = |tower: &VisionTower| {
            tower
                .encode(&image, "vision.", &mut Recorder::checking_only())
                .unwrap()
                .into_raw_vec_and_offset()
                .0
        };
        let baseline = encode(&tower);
        for layer in 0..tower.weights.layers.len() {
            let l = &tower.weights.layers[layer];
            // k/v and gate/up share bounds, as in the released towers; q has its own.
            assert_eq!(l.k_proj.bounds, l.v_proj.bounds);
            assert_eq!(l.gate_proj.bounds, l.up_proj.bounds);
            assert_ne!(l.q_proj.bounds, l.k_proj.bounds);
            for linear in 0..7 {
                for input_side in [true, false] {
                    let original = linear_slot(&mut tower, layer, linear).bounds.unwrap();
                    let mut lifted = original;
                    if input_side {
                        (lifted.input_min, lifted.input_max) = (f32::NEG_INFINITY, f32::INFINITY);
                    } else {
                        (lifted.output_min, lifted.output_max) = (f32::NEG_INFINITY, f32::INFINITY);
                    }
                    linear_slot(&mut tower, layer, linear).bounds = Some(lifted);
                    let changed = encode(&tower);
                    linear_slot(&mut tower, layer, linear).bounds = Some(original);
                    let scale = baseline.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    let moved = baseline
                        .iter()
                        .zip(&changed)
                        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
                    assert!(
                        moved > 1e-4 * scale,
                        "layer {layer}, linear {linear}, {} clamp: lifting it moves the soft tokens by only {moved:e} (max {scale:e})",
                        if input_side { "input" } else { "output" }
                    );
                }
            }
        }
    }
}
