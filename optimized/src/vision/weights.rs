//! The vision tower's weights **as stored** (shared spec: multimodal §1.8): memory-mapped
//! matrices ([`Matrix`]), vectors and clip bounds copied to f32.
//!
//! Names and shapes are the reference's (`gemma4_reference::vision::weights::vision_tensor_specs`),
//! and so is the validation: every header first (`check_text_headers`: present, shaped as the
//! config implies, a float dtype), then the values in the reference loader's order (matrices
//! scanned for NaN/inf, vectors loaded by the reference's own loader, bounds any float but NaN),
//! so a damaged tower fails here with exactly the reference's error. The one check the reference
//! makes that this does not: memory for the whole tower as f32 (`check_total_allocation`), since
//! nothing is converted here (the text loader skips it for the same reason).

use gemma4_reference::checkpoint::{check_text_headers, Checkpoint};
use gemma4_reference::config::{CheckpointLayout, ModelConfig};
use gemma4_reference::error::Error;
use gemma4_reference::vision::clipped_linear::ClipBounds;
use gemma4_reference::vision::weights::vision_tensor_specs;
use gemma4_reference::Result;

use crate::checkpoint::{Loader, Matrix};
use crate::vision::clipped_linear::ClippedLinear;

/// Prefix of every vision tensor name (`model.vision_tower.…`, `model.embed_vision.…`).
const PREFIX: &str = "model.";

/// The name of encoder layer `i`'s tensor `part` (without [`PREFIX`]), as the reference spells it.
fn layer_name(i: usize, part: &str) -> String {
    format!("vision_tower.encoder.layers.{i}.{part}")
}

/// The patch embedder (multimodal §1.2).
pub struct PatchEmbedderWeights {
    /// `[Dv, 3·p²]`
    pub input_proj: Matrix,
    /// The `[2, P, Dv]` tables viewed as `[2·P, Dv]`: rows `0..P` the x (column) table, rows
    /// `P..2P` the y (row) table.
    pub position_table: Matrix,
    /// `P` (`position_embedding_size`): entries per table.
    pub table_size: usize,
}

/// One encoder layer (multimodal §1.3).
pub struct EncoderLayerWeights {
    /// `[Dv]`
    pub input_layernorm: Vec<f32>,
    /// `[H·d, Dv]`
    pub q_proj: ClippedLinear,
    /// `[K·d, Dv]`
    pub k_proj: ClippedLinear,
    /// `[K·d, Dv]`
    pub v_proj: ClippedLinear,
    /// `[Dv, H·d]`
    pub o_proj: ClippedLinear,
    /// `[d]`
    pub q_norm: Vec<f32>,
    /// `[d]`
    pub k_norm: Vec<f32>,
    /// `[Dv]`
    pub post_attention_layernorm: Vec<f32>,
    /// `[Dv]`
    pub pre_feedforward_layernorm: Vec<f32>,
    /// `[F, Dv]`
    pub gate_proj: ClippedLinear,
    /// `[F, Dv]`
    pub up_proj: ClippedLinear,
    /// `[Dv, F]`
    pub down_proj: ClippedLinear,
    /// `[Dv]`
    pub post_feedforward_layernorm: Vec<f32>,
}

/// The large tower's standardize buffers (multimodal §1.6 step 8).
pub struct StandardizeWeights {
    /// `[Dv]`
    pub bias: Vec<f32>,
    /// `[Dv]`
    pub scale: Vec<f32>,
}

/// Every weight of the vision tower and its projector, as stored.
pub struct VisionWeights {
    pub patch_embedder: PatchEmbedderWeights,
    pub layers: Vec<EncoderLayerWeights>,
    pub standardize: Option<StandardizeWeights>,
    /// `embed_vision.embedding_projection`: `[Dt, Dv]`
    pub projection: Matrix,
}

impl VisionWeights {
    /// Maps the vision tower of `config` from `checkpoint`, validating it exactly as the
    /// reference's `VisionWeights::load` does (same errors, same order). The matrices point into
    /// `checkpoint`'s maps: they must not outlive it.
    pub fn load(checkpoint: &Checkpoint, config: &ModelConfig) -> Result<Self> {
        let vision = config.vision.as_ref().ok_or_else(|| Error::Config {
            path: config.path.clone(),
            field: "vision_config".into(),
            message:
                "the checkpoint has no vision tower (no vision_config), so it cannot take an image"
                    .into(),
        })?;
        if config.layout != CheckpointLayout::ConditionalGeneration {
            return Err(Error::Config {
                path: config.path.clone(),
                field: "architectures".into(),
                message:
                    "a vision tower is only stored by Gemma4ForConditionalGeneration checkpoints"
                        .into(),
            });
        }
        let specs = vision_tensor_specs(vision, config.text.hidden_size);
        let loader = Loader {
            checkpoint,
            tensors: check_text_headers(checkpoint, PREFIX, &specs)?,
        };

        // Values in the reference loader's order: layers, standardize, patch embedder, projector.
        let linear = |i: usize, name: &str| -> Result<ClippedLinear> {
            let weight = loader.matrix(&layer_name(i, &format!("{name}.linear.weight")))?;
            let bounds = if vision.use_clipped_linears {
                let bound = |b: &str| loader.bound(&layer_name(i, &format!("{name}.{b}")));
                Some(ClipBounds {
                    input_min: bound("input_min")?,
                    input_max: bound("input_max")?,
                    output_min: bound("output_min")?,
                    output_max: bound("output_max")?,
                })
            } else {
                None
            };
            Ok(ClippedLinear { weight, bounds })
        };
        let vector = |i: usize, name: &str| loader.vector(&layer_name(i, name));
        let layers = (0..vision.num_hidden_layers)
            .map(|i| {
                Ok(EncoderLayerWeights {
                    input_layernorm: vector(i, "input_layernorm.weight")?,
                    q_proj: linear(i, "self_attn.q_proj")?,
                    k_proj: linear(i, "self_attn.k_proj")?,
                    v_proj: linear(i, "self_attn.v_proj")?,
                    o_proj: linear(i, "self_attn.o_proj")?,
                    q_norm: vector(i, "self_attn.q_norm.weight")?,
                    k_norm: vector(i, "self_attn.k_norm.weight")?,
                    post_attention_layernorm: vector(i, "post_attention_layernorm.weight")?,
                    pre_feedforward_layernorm: vector(i, "pre_feedforward_layernorm.weight")?,
                    gate_proj: linear(i, "mlp.gate_proj")?,
                    up_proj: linear(i, "mlp.up_proj")?,
                    down_proj: linear(i, "mlp.down_proj")?,
                    post_feedforward_layernorm: vector(i, "post_feedforward_layernorm.weight")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let standardize = if vision.standardize {
            Some(StandardizeWeights {
                bias: loader.vector("vision_tower.std_bias")?,
                scale: loader.vector("vision_tower.std_scale")?,
            })
        } else {
            None
        };
        Ok(VisionWeights {
            patch_embedder: PatchEmbedderWeights {
                input_proj: loader.matrix("vision_tower.patch_embedder.input_proj.weight")?,
                position_table: loader
                    .matrix("vision_tower.patch_embedder.position_embedding_table")?,
                table_size: vision.position_embedding_size,
            },
            layers,
            standardize,
            projection: loader.matrix("embed_vision.embedding_projection.weight")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{write_checkpoint, TinyMultimodalConfig};
    use gemma4_reference::checkpoint::WeightDtype;

    /// Loads a tower in both engines and returns both errors as text (`None` if it loaded).
    fn both_errors(dir: &std::path::Path) -> (Option<String>, Option<String>) {
        let config = ModelConfig::from_dir(dir).unwrap();
        let checkpoint = Checkpoint::open(dir).unwrap();
        let reference =
            gemma4_reference::vision::weights::VisionWeights::load(&checkpoint, &config)
                .err()
                .map(|e| e.to_string());
        let optimized = VisionWeights::load(&checkpoint, &config)
            .err()
            .map(|e| e.to_string());
        (reference, optimized)
    }

    /// A change to a safetensors file: `(header, bytes, data_start)`.
    type Edit = dyn FnOnce(&str, &mut Vec<u8>, usize);

    /// Rewrites `dir/model.safetensors` with `edit(header, bytes, data_start)` applied.
    fn damage(dir: &std::path::Path, edit: impl FnOnce(&str, &mut Vec<u8>, usize)) {
        let path = dir.join("model.safetensors");
        let mut bytes = std::fs::read(&path).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&bytes[8..8 + header_len])
            .unwrap()
            .to_string();
        edit(&header, &mut bytes, 8 + header_len);
        std::fs::write(&path, &bytes).unwrap();
    }

    /// The data offset of tensor `name` in a header.
    fn offset_of(header: &str, name: &str) -> usize {
        let value: serde_json::Value = serde_json::from_str(header).unwrap();
        value[name]["data_offsets"][0].as_u64().unwrap() as usize
    }

    /// Damaged towers — a NaN in a weight, a NaN clip bound, a NaN in the position table, two
    /// NaNs (the first in the reference's loading order is named), a renamed (missing) tensor —
    /// are refused by both engines with the same message; the
    /// undamaged tower loads in both.
    #[test]
    fn vision_weights_refused_like_reference_damaged_towers() {
        let tower = TinyMultimodalConfig::small(true, false);
        let write = || {
            let dir = tempfile::tempdir().unwrap();
            write_checkpoint(dir.path(), &tower.config_json(), WeightDtype::F32, 5).unwrap();
            dir
        };
        let intact = write();
        assert_eq!(both_errors(intact.path()), (None, None));

        let nan_at = |name: &'static str, index: usize| {
            move |header: &str, bytes: &mut Vec<u8>, data: usize| {
                let at = data + offset_of(header, name) + 4 * index;
                bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
            }
        };
        let layer1 = "model.vision_tower.encoder.layers.1.";
        let two = |first: Box<Edit>, second: Box<Edit>| -> Box<Edit> {
            Box::new(move |header: &str, bytes: &mut Vec<u8>, data: usize| {
                first(header, bytes, data);
                second(header, bytes, data);
            })
        };
        let cases: Vec<(&str, Box<Edit>)> = vec![
            (
                "NaN in layer 1's up_proj",
                Box::new(nan_at(
                    "model.vision_tower.encoder.layers.1.mlp.up_proj.linear.weight",
                    7,
                )),
            ),
            (
                "NaN bound",
                Box::new(nan_at(
                    "model.vision_tower.encoder.layers.0.self_attn.k_proj.output_max",
                    0,
                )),
            ),
            (
                "NaN in the position table",
                Box::new(nan_at(
                    "model.vision_tower.patch_embedder.position_embedding_table",
                    100,
                )),
            ),
            // Two NaNs: the one the reference loads first is named (layers before the patch
            // embedder; within a layer, linears before q_norm).
            (
                "NaNs in input_proj and in layer 1's down_proj",
                two(
                    Box::new(nan_at(
                        "model.vision_tower.patch_embedder.input_proj.weight",
                        3,
                    )),
                    Box::new(nan_at(
                        "model.vision_tower.encoder.layers.1.mlp.down_proj.linear.weight",
                        3,
                    )),
                ),
            ),
            (
                "NaNs in layer 1's q_norm and o_proj",
                two(
                    Box::new(nan_at(
                        "model.vision_tower.encoder.layers.1.self_attn.q_norm.weight",
                        0,
                    )),
                    Box::new(nan_at(
                        "model.vision_tower.encoder.layers.1.self_attn.o_proj.linear.weight",
                        0,
                    )),
                ),
            ),
            (
                "missing q_norm",
                Box::new(move |header: &str, bytes: &mut Vec<u8>, _| {
                    let name = format!("\"{layer1}self_attn.q_norm.weight\"");
                    let at = 8 + header.find(&name).unwrap();
                    let renamed = name.replace("q_norm", "q_morn");
                    bytes[at..at + renamed.len()].copy_from_slice(renamed.as_bytes());
                }),
            ),
        ];
        for (what, edit) in cases {
            let dir = write();
            damage(dir.path(), edit);
            let (reference, optimized) = both_errors(dir.path());
            assert!(reference.is_some(), "{what}: the reference loaded it");
            assert_eq!(optimized, reference, "{what}");
        }
    }

    /// A text-only checkpoint has no tower: both engines say so in the same words.
    #[test]
    fn vision_weights_refused_like_reference_no_tower() {
        let mut tower = TinyMultimodalConfig::small(false, true);
        tower.vision = None;
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &tower.config_json(), WeightDtype::F32, 5).unwrap();
        let (reference, optimized) = both_errors(dir.path());
        assert!(
            reference.as_deref().unwrap().contains("vision_config"),
            "{reference:?}"
        );
        assert_eq!(optimized, reference);
    }
}
