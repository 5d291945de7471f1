//! Where the decoder's weights are while it runs: all in memory, or streamed from disk layer by
//! layer (shared spec: text §3 for the names; nothing here changes the arithmetic).
//!
//! A real 31B checkpoint holds 62 GB of bf16 weights, 124 GB once widened to f32: far more than
//! a workstation's memory. The reference still verifies it, because a forward pass needs only
//! one layer's weights at a time:
//!
//! ```text
//! ids ──► embedding rows   (read from disk, one row per token: [T, D])
//!     ──► PLE table rows   (read from disk, one row per token: [T, L·P])
//!     ──► for each layer l: read layer l's tensors, widen to f32, run the layer, drop them
//!     ──► final norm ──► LM head, applied LM_HEAD_BLOCK_ROWS vocabulary rows at a time
//! ```
//!
//! Every tensor is read with an ordinary read ([`SafetensorsFile::read`]), not through the memory
//! map, so no page of the checkpoint stays in this process's resident memory after its layer:
//! the peak is the largest layer in f32 plus the activations and the dump, whatever the size of
//! the checkpoint ([`crate::memory_plan`]). The values, and so the dump, are bit for bit those of
//! [`Residence::InMemory`]: the same bytes are widened the same way and fed to the same
//! components.
//!
//! [`SafetensorsFile::read`]: crate::checkpoint::SafetensorsFile::read

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::Arc;

use ndarray::{s, Array1, Array2, ArrayView2};

use crate::checkpoint::{
    check_text_checkpoint, load_layer, load_ple_weights, CheckedTensor, Checkpoint, LayerWeights,
    PleWeights, TextTensors, TextWeights, WeightDtype,
};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::layer_plan::{LayerPlan, ModelPlan};
use crate::linear::linear;

/// How the reference holds the text decoder's weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Residence {
    /// In memory when they fit (the model's weights in f32, plus the run, within the memory
    /// limit), else streamed; an error when neither fits ([`crate::memory_plan`]).
    #[default]
    Auto,
    /// Every weight widened to f32 once, at load: fast for repeated passes, needs the whole
    /// model in memory.
    InMemory,
    /// Each layer read from disk when the forward pass reaches it, and dropped after it.
    Streamed,
}

impl Residence {
    pub fn name(self) -> &'static str {
        match self {
            Residence::Auto => "auto",
            Residence::InMemory => "in-memory",
            Residence::Streamed => "streamed",
        }
    }
}

/// Vocabulary rows of the LM head applied at a time by a streamed model: 8192 rows are 176 MB
/// of f32 for the 31B (`D` = 5376), small beside a layer (its MLP alone is 1.4 GB in f32), and
/// few enough reads (32 for a 262144-token vocabulary) to cost nothing.
pub const LM_HEAD_BLOCK_ROWS: usize = 8192;

/// A change applied to each layer's weights as a streamed model reads them (layer index,
/// weights): how a streamed model's weights are perturbed (`compare`'s float-noise probes)
/// without holding them.
pub type LayerTransform = Arc<dyn Fn(usize, &mut LayerWeights) + Send + Sync>;

/// The text decoder's weights: in memory, or on disk and read as the forward pass goes.
pub enum DecoderWeights {
    InMemory(TextWeights),
    Streamed(StreamedTextWeights),
}

/// A streamed model's weights: the checkpoint (headers checked, values on disk) and the few
/// small tensors every pass needs.
pub struct StreamedTextWeights {
    checkpoint: Checkpoint,
    /// Every text tensor's header, checked when the model was opened: a missing or misshapen
    /// tensor in the last layer is refused before the first layer runs.
    checked: HashMap<String, CheckedTensor>,
    embed_dtype: WeightDtype,
    per_layer_embeddings: Option<PleWeights>,
    final_norm: Array1<f32>,
    /// Applied to every layer as it is read.
    transform: Option<LayerTransform>,
}

impl StreamedTextWeights {
    /// Opens the text weights of `checkpoint` for streaming: every header checked, the small
    /// model-level tensors (PLE projection and norm, final norm) loaded, nothing else read.
    pub fn open(checkpoint: Checkpoint, config: &ModelConfig, plan: &ModelPlan) -> Result<Self> {
        let (tensors, _, _) = check_text_checkpoint(&checkpoint, config, plan)?;
        let embed_dtype = tensors.get("embed_tokens.weight").dtype;
        let per_layer_embeddings = load_ple_weights(&tensors, &config.text)?;
        let final_norm = tensors.load("norm.weight")?;
        let checked = tensors.into_checked();
        Ok(StreamedTextWeights {
            checkpoint,
            checked,
            embed_dtype,
            per_layer_embeddings,
            final_norm,
            transform: None,
        })
    }

    fn tensors(&self) -> TextTensors<'_> {
        TextTensors::with(&self.checkpoint, &self.checked)
    }

    /// Rows `ids` of the 2-D table `spec_name`, read from disk: `[ids.len(), C]`.
    fn rows(&self, spec_name: &str, ids: &[usize]) -> Result<Array2<f32>> {
        let tensor = self.tensors().get(spec_name).clone();
        let shape = [tensor.shape[0], tensor.shape[1]];
        let mut out = Array2::<f32>::zeros((ids.len(), shape[1]));
        for (row, &id) in ids.iter().enumerate() {
            let values =
                self.checkpoint
                    .read_rows_f32(&tensor.name, shape, tensor.dtype, id..id + 1)?;
            out.row_mut(row).assign(&values.row(0));
        }
        Ok(out)
    }
}

/// One layer's weights: borrowed from an in-memory model, or just read for a streamed one (and
/// dropped, with the memory they hold, when this goes out of scope).
pub enum LayerRef<'a> {
    Borrowed(&'a LayerWeights),
    Read(Box<LayerWeights>),
}

impl Deref for LayerRef<'_> {
    type Target = LayerWeights;
    fn deref(&self) -> &LayerWeights {
        match self {
            LayerRef::Borrowed(weights) => weights,
            LayerRef::Read(weights) => weights,
        }
    }
}

impl DecoderWeights {
    /// Loads the text weights of `checkpoint` in memory, or opens them for streaming.
    pub fn load(
        checkpoint: Checkpoint,
        config: &ModelConfig,
        plan: &ModelPlan,
        streamed: bool,
    ) -> Result<Self> {
        Ok(if streamed {
            DecoderWeights::Streamed(StreamedTextWeights::open(checkpoint, config, plan)?)
        } else {
            DecoderWeights::InMemory(TextWeights::load(&checkpoint, config, plan)?)
        })
    }

    /// Is the model streamed from disk?
    pub fn is_streamed(&self) -> bool {
        matches!(self, DecoderWeights::Streamed(_))
    }

    /// The in-memory weights (`None` for a streamed model), e.g. to perturb them.
    pub fn in_memory(&self) -> Option<&TextWeights> {
        match self {
            DecoderWeights::InMemory(weights) => Some(weights),
            DecoderWeights::Streamed(_) => None,
        }
    }

    /// [`DecoderWeights::in_memory`], mutably.
    pub fn in_memory_mut(&mut self) -> Option<&mut TextWeights> {
        match self {
            DecoderWeights::InMemory(weights) => Some(weights),
            DecoderWeights::Streamed(_) => None,
        }
    }

    /// The storage dtype of the embedding table.
    pub fn embed_dtype(&self) -> WeightDtype {
        match self {
            DecoderWeights::InMemory(weights) => weights.embed_dtype,
            DecoderWeights::Streamed(streamed) => streamed.embed_dtype,
        }
    }

    /// Rows `ids` of the token embedding table, unscaled: `[T, D]`.
    pub fn embedding_rows(&self, ids: &[usize]) -> Result<Array2<f32>> {
        match self {
            DecoderWeights::InMemory(weights) => Ok(select_rows(&weights.embed_tokens, ids)),
            DecoderWeights::Streamed(streamed) => streamed.rows("embed_tokens.weight", ids),
        }
    }

    /// Rows `ids` of the PLE table, unscaled: `[T, L·P]` (`None` without PLE).
    pub fn per_layer_rows(&self, ids: &[usize]) -> Result<Option<Array2<f32>>> {
        match self {
            DecoderWeights::InMemory(weights) => Ok(weights
                .per_layer_table
                .as_ref()
                .map(|table| select_rows(table, ids))),
            DecoderWeights::Streamed(streamed) => streamed
                .per_layer_embeddings
                .as_ref()
                .map(|_| streamed.rows("embed_tokens_per_layer.weight", ids))
                .transpose(),
        }
    }

    /// The model-level PLE weights (projection and norm), when the model has PLE.
    pub fn per_layer_embeddings(&self) -> Option<&PleWeights> {
        match self {
            DecoderWeights::InMemory(weights) => weights.per_layer_embeddings.as_ref(),
            DecoderWeights::Streamed(streamed) => streamed.per_layer_embeddings.as_ref(),
        }
    }

    /// The weights of `layer`: borrowed, or read from disk now.
    pub fn layer(&self, layer: &LayerPlan) -> Result<LayerRef<'_>> {
        match self {
            DecoderWeights::InMemory(weights) => {
                Ok(LayerRef::Borrowed(&weights.layers[layer.index]))
            }
            DecoderWeights::Streamed(streamed) => {
                let mut weights = load_layer(&streamed.tensors(), layer)?;
                if let Some(transform) = &streamed.transform {
                    transform(layer.index, &mut weights);
                }
                Ok(LayerRef::Read(Box::new(weights)))
            }
        }
    }

    /// The model-level PLE weights, mutably (to perturb them).
    pub fn per_layer_embeddings_mut(&mut self) -> Option<&mut PleWeights> {
        match self {
            DecoderWeights::InMemory(weights) => weights.per_layer_embeddings.as_mut(),
            DecoderWeights::Streamed(streamed) => streamed.per_layer_embeddings.as_mut(),
        }
    }

    /// The final norm's weight, mutably (to perturb it).
    pub fn final_norm_mut(&mut self) -> &mut Array1<f32> {
        match self {
            DecoderWeights::InMemory(weights) => &mut weights.final_norm,
            DecoderWeights::Streamed(streamed) => &mut streamed.final_norm,
        }
    }

    /// Has a streamed model apply `transform` to every layer it reads (nothing for an
    /// in-memory model, whose weights are changed in place instead).
    pub fn set_layer_transform(&mut self, transform: LayerTransform) {
        if let DecoderWeights::Streamed(streamed) = self {
            streamed.transform = Some(transform);
        }
    }

    /// The final norm's weight `[D]`.
    pub fn final_norm(&self) -> &Array1<f32> {
        match self {
            DecoderWeights::InMemory(weights) => &weights.final_norm,
            DecoderWeights::Streamed(streamed) => &streamed.final_norm,
        }
    }

    /// The LM head `logits = h · Wᵀ` (`W` = `lm_head.weight`, or the embedding table unscaled
    /// when tied; text §11) for `normed` `[T, D]`: `[T, V]`. A streamed model reads `W`
    /// [`LM_HEAD_BLOCK_ROWS`] rows at a time; each logit is the same dot product either way.
    pub fn lm_head(&self, normed: ArrayView2<f32>, tied: bool) -> Result<Array2<f32>> {
        match self {
            DecoderWeights::InMemory(weights) => {
                let head = weights.lm_head.as_ref().unwrap_or(&weights.embed_tokens);
                Ok(linear(normed, head))
            }
            DecoderWeights::Streamed(streamed) => {
                let spec = if tied {
                    "embed_tokens.weight"
                } else {
                    "lm_head.weight"
                };
                let tensor = streamed.tensors().get(spec).clone();
                let (vocab, width) = (tensor.shape[0], tensor.shape[1]);
                let mut logits = Array2::<f32>::zeros((normed.nrows(), vocab));
                for start in (0..vocab).step_by(LM_HEAD_BLOCK_ROWS) {
                    let end = (start + LM_HEAD_BLOCK_ROWS).min(vocab);
                    let block = streamed.checkpoint.read_rows_f32(
                        &tensor.name,
                        [vocab, width],
                        tensor.dtype,
                        start..end,
                    )?;
                    logits
                        .slice_mut(s![.., start..end])
                        .assign(&linear(normed, &block));
                }
                Ok(logits)
            }
        }
    }
}

/// Rows `ids` of `table` (`[R, C]`): `[ids.len(), C]`. The ids were checked by the caller.
fn select_rows(table: &Array2<f32>, ids: &[usize]) -> Array2<f32> {
    table.select(ndarray::Axis(0), ids)
}
