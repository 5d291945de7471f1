//! The text weights **as stored**: memory-mapped, in their checkpoint dtype (f32, bf16, f16).
//!
//! Validation is the reference's: the config, the layer plan, the shard index and every
//! safetensors header are checked by `gemma4_reference::checkpoint::Checkpoint` and
//! [`check_text_headers`] (every header before any value, as the reference loader does), and
//! values are checked for NaN/inf in the reference loader's order, so a damaged checkpoint fails
//! here with exactly the reference's error. What differs is what happens after the check:
//! - matrices are not converted: a [`Matrix`] points into the mapped file and kernels widen
//!   16-bit values to f32 in registers (`simd`);
//! - vectors (norm weights, scalars, router scales) are small and are copied to f32;
//! - the PLE table (`[262144, L·P]`, 4.7 GB in bf16 for E2B) is never read as a whole: only the
//!   rows of the tokens seen are touched ("PLE in flash", see `ple`).
//!
//! Tensor names and shapes come from the reference ([`LayerNames`], [`text_tensor_specs`]): HF
//! names live there.

use std::any::Any;
use std::sync::Arc;

use gemma4_reference::checkpoint::{
    check_text_headers, text_tensor_specs, CheckedTensor, Checkpoint, LayerNames, TextTensors,
    WeightDtype,
};
use gemma4_reference::config::ModelConfig;
use gemma4_reference::layer_plan::ModelPlan;
use gemma4_reference::Result;
use half::{bf16, f16};
use ndarray::Ix1;

/// A weight matrix `[rows, cols]` (HF layout `[out, in]`) in its storage dtype.
///
/// The data is either a range of a memory-mapped checkpoint file or an owned buffer (tests,
/// misaligned tensors). Sub-matrices (one expert of a `[E, 2I, D]` tensor) share the storage.
/// A mapped matrix points into the maps its model owns: it must not outlive that model.
#[derive(Clone)]
pub struct Matrix {
    ptr: *const u8,
    pub rows: usize,
    pub cols: usize,
    pub dtype: WeightDtype,
    /// Keeps owned storage alive; `None` for mapped data, which the model's `Checkpoint` owns.
    _owner: Option<Arc<dyn Any + Send + Sync>>,
}

// SAFETY: a Matrix is a read-only view; the bytes it points to are never written while any
// Matrix exists (mapped read-only, or owned by the Arc and never mutated).
unsafe impl Send for Matrix {}
unsafe impl Sync for Matrix {}

impl std::fmt::Debug for Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Matrix[{}x{} {:?}]", self.rows, self.cols, self.dtype)
    }
}

/// The elements of a matrix, typed by storage dtype.
pub enum Elements<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
    F16(&'a [f16]),
}

impl Matrix {
    /// An owned f32 matrix (tests and misaligned tensors).
    pub fn from_f32(rows: usize, cols: usize, values: Vec<f32>) -> Matrix {
        Matrix::owned(rows, cols, values, WeightDtype::F32)
    }

    /// An owned bf16 matrix (tests and misaligned tensors).
    pub fn from_bf16(rows: usize, cols: usize, values: Vec<bf16>) -> Matrix {
        Matrix::owned(rows, cols, values, WeightDtype::BF16)
    }

    /// An owned f16 matrix (tests and misaligned tensors).
    pub fn from_f16(rows: usize, cols: usize, values: Vec<f16>) -> Matrix {
        Matrix::owned(rows, cols, values, WeightDtype::F16)
    }

    /// An owned matrix of `T`, the element type of `dtype` (the callers above pair them).
    fn owned<T: Send + Sync + 'static>(
        rows: usize,
        cols: usize,
        values: Vec<T>,
        dtype: WeightDtype,
    ) -> Matrix {
        assert_eq!(values.len(), rows * cols);
        debug_assert_eq!(std::mem::size_of::<T>(), dtype.size());
        let owner: Arc<Vec<T>> = Arc::new(values);
        Matrix {
            ptr: owner.as_ptr() as *const u8,
            rows,
            cols,
            dtype,
            _owner: Some(owner),
        }
    }

    /// A view of little-endian checkpoint bytes. Misaligned data (possible in a hand-made
    /// safetensors file) is copied to an owned, aligned buffer instead.
    ///
    /// # Safety
    /// `bytes` must stay mapped and unchanged for as long as the returned matrix (and its
    /// clones and sub-matrices) are used.
    unsafe fn from_mapped(bytes: &[u8], rows: usize, cols: usize, dtype: WeightDtype) -> Matrix {
        assert_eq!(bytes.len(), rows * cols * dtype.size());
        let aligned = (bytes.as_ptr() as usize).is_multiple_of(dtype.size());
        if !aligned || cfg!(target_endian = "big") {
            return match dtype {
                WeightDtype::F32 => Matrix::from_f32(
                    rows,
                    cols,
                    bytes
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                ),
                WeightDtype::BF16 => Matrix::from_bf16(
                    rows,
                    cols,
                    bytes
                        .chunks_exact(2)
                        .map(|b| bf16::from_le_bytes([b[0], b[1]]))
                        .collect(),
                ),
                WeightDtype::F16 => Matrix::from_f16(
                    rows,
                    cols,
                    bytes
                        .chunks_exact(2)
                        .map(|b| f16::from_le_bytes([b[0], b[1]]))
                        .collect(),
                ),
            };
        }
        Matrix {
            ptr: bytes.as_ptr(),
            rows,
            cols,
            dtype,
            _owner: None,
        }
    }

    /// The elements, typed.
    pub fn elements(&self) -> Elements<'_> {
        let n = self.rows * self.cols;
        // SAFETY: `ptr` is aligned for the dtype and holds `rows·cols` elements (constructors).
        unsafe {
            match self.dtype {
                WeightDtype::F32 => {
                    Elements::F32(std::slice::from_raw_parts(self.ptr as *const f32, n))
                }
                WeightDtype::BF16 => {
                    Elements::BF16(std::slice::from_raw_parts(self.ptr as *const bf16, n))
                }
                WeightDtype::F16 => {
                    Elements::F16(std::slice::from_raw_parts(self.ptr as *const f16, n))
                }
            }
        }
    }

    /// Rows `start..start + count` as a matrix sharing this one's storage (one expert of a
    /// stacked `[E, rows, cols]` tensor viewed as `[E·rows, cols]`).
    pub fn rows_view(&self, start: usize, count: usize) -> Matrix {
        assert!(start + count <= self.rows);
        Matrix {
            // SAFETY: within the same allocation / mapping.
            ptr: unsafe { self.ptr.add(start * self.cols * self.dtype.size()) },
            rows: count,
            cols: self.cols,
            dtype: self.dtype,
            _owner: self._owner.clone(),
        }
    }

    /// Row `r` widened to f32 and multiplied by `scale`, written to `out` (`[cols]`): the
    /// embedding lookup, `table[id] · scale`, one rounding like the reference.
    pub fn row_scaled_into(&self, r: usize, scale: f32, out: &mut [f32]) {
        let range = r * self.cols..(r + 1) * self.cols;
        match self.elements() {
            Elements::F32(v) => {
                for (o, &x) in out.iter_mut().zip(&v[range]) {
                    *o = x * scale;
                }
            }
            Elements::BF16(v) => {
                crate::simd::widen(&v[range], out);
                out.iter_mut().for_each(|o| *o *= scale);
            }
            Elements::F16(v) => {
                crate::simd::widen(&v[range], out);
                out.iter_mut().for_each(|o| *o *= scale);
            }
        }
    }

    /// Bytes this matrix occupies in its storage dtype.
    pub fn bytes(&self) -> usize {
        self.rows * self.cols * self.dtype.size()
    }
}

/// Weights of the dense GeGLU MLP (shared spec: text §8), `[out, in]`.
pub struct MlpWeights {
    /// `[F_l, D]`
    pub gate_proj: Matrix,
    /// `[F_l, D]`
    pub up_proj: Matrix,
    /// `[D, F_l]`
    pub down_proj: Matrix,
}

/// Weights of one layer's attention block (shared spec: text §5).
pub struct AttentionWeights {
    /// `[H·d, D]`
    pub q_proj: Matrix,
    /// `[d]`
    pub q_norm: Vec<f32>,
    /// `[K·d, D]`, absent on KV-shared layers
    pub k_proj: Option<Matrix>,
    /// `[K·d, D]`, absent on KV-shared and K=V layers
    pub v_proj: Option<Matrix>,
    /// `[d]`, absent on KV-shared layers
    pub k_norm: Option<Vec<f32>>,
    /// `[D, H·d]`
    pub o_proj: Matrix,
}

/// Weights of one layer's Per-Layer Embedding branch (shared spec: text §10 step 6).
pub struct LayerPleWeights {
    /// `[P, D]`
    pub input_gate: Matrix,
    /// `[D, P]`
    pub projection: Matrix,
    /// `[D]`
    pub post_norm: Vec<f32>,
}

/// Weights of one layer's mixture-of-experts block (shared spec: text §9).
pub struct MoeWeights {
    /// `[E, D]`
    pub router_proj: Matrix,
    /// `[D]`
    pub router_scale: Vec<f32>,
    /// `[E]`
    pub per_expert_scale: Vec<f32>,
    /// `[E·2I, D]` (the `[E, 2I, D]` tensor, experts stacked): rows `e·2I..e·2I+I` gate,
    /// the next `I` up.
    pub gate_up_proj: Matrix,
    /// `[E·D, I]` (the `[E, D, I]` tensor, experts stacked).
    pub down_proj: Matrix,
    /// `[D]`
    pub pre_feedforward_layernorm_2: Vec<f32>,
    /// `[D]`
    pub post_feedforward_layernorm_1: Vec<f32>,
    /// `[D]`
    pub post_feedforward_layernorm_2: Vec<f32>,
}

/// All weights of one decoder layer.
pub struct LayerWeights {
    pub input_layernorm: Vec<f32>,
    pub attention: AttentionWeights,
    pub post_attention_layernorm: Vec<f32>,
    pub pre_feedforward_layernorm: Vec<f32>,
    pub mlp: MlpWeights,
    pub post_feedforward_layernorm: Vec<f32>,
    pub moe: Option<MoeWeights>,
    pub per_layer_embedding: Option<LayerPleWeights>,
    pub layer_scalar: f32,
}

/// Model-level PLE weights (shared spec: text §4).
pub struct PleWeights {
    /// `[V_ple, L·P]`, left on disk: only looked-up rows are ever read.
    pub table: Matrix,
    /// `[L·P, D]`
    pub model_projection: Matrix,
    /// `[P]`
    pub projection_norm: Vec<f32>,
}

/// Every text weight, as stored.
pub struct TextWeights {
    /// `[V, D]`: the embedding table and the tied LM head.
    pub embed_tokens: Matrix,
    pub per_layer_embeddings: Option<PleWeights>,
    pub layers: Vec<LayerWeights>,
    /// `[D]`
    pub final_norm: Vec<f32>,
    /// `[V, D]` when the head is not tied.
    pub lm_head: Option<Matrix>,
}

/// Reads matrices and vectors from a checkpoint whose headers were all checked (the text
/// weights here, the vision tower's in `vision::weights`).
pub(crate) struct Loader<'a> {
    pub(crate) checkpoint: &'a Checkpoint,
    pub(crate) tensors: TextTensors<'a>,
}

impl Loader<'_> {
    /// A matrix with its spec'd shape (2-D, or 3-D stacked into 2-D), every value checked
    /// finite as the reference loader does.
    pub(crate) fn matrix(&self, spec_name: &str) -> Result<Matrix> {
        let tensor = self.tensors.get(spec_name);
        // Before the first read (the finiteness scan): weights read whole on every pass are
        // best streamed through 2 MiB pages (no TLB miss, no prefetcher stop every 4 KiB).
        // Measured with a read-only stream over 3 GB of the mapped E2B file on this machine,
        // 2 threads: 4 KiB pages 31–34 GB/s, huge pages 34–36 (as fast as anonymous memory)
        // while memory was contended; once it was not, 4 KiB file pages 51–53 GB/s against
        // 68–69 for huge-page anonymous memory. The advice is best effort (a kernel without
        // transparent huge pages refuses it, and the weights then stay in 4 KiB pages).
        if let Some(file) = self.checkpoint.file_of(&tensor.name) {
            let _ = file.advise_huge_pages(&tensor.name);
        }
        self.checkpoint
            .check_finite(&tensor.name, &tensor.shape, tensor.dtype)?;
        Ok(self.map(tensor))
    }

    /// The PLE table: its values are not scanned at load — the table stays on disk and only
    /// the rows of the tokens seen are ever read (a non-finite value there surfaces as a
    /// non-finite `per_layer_inputs`, named by the recorder).
    fn table(&self, spec_name: &str) -> Matrix {
        self.map(self.tensors.get(spec_name))
    }

    fn map(&self, tensor: &CheckedTensor) -> Matrix {
        let bytes = self
            .checkpoint
            .file_of(&tensor.name)
            .and_then(|f| f.bytes(&tensor.name))
            .expect("checked by check_text_headers");
        let cols = *tensor.shape.last().expect("non-empty shape");
        let rows = tensor.shape.iter().product::<usize>() / cols.max(1);
        // SAFETY: the bytes belong to the checkpoint's read-only maps, which the model keeps
        // alive (and unchanged) for as long as its weights exist.
        unsafe { Matrix::from_mapped(bytes, rows, cols, tensor.dtype) }
    }

    /// A vector with its spec'd length, as f32 (the reference's own loader, same checks).
    pub(crate) fn vector(&self, spec_name: &str) -> Result<Vec<f32>> {
        let values = self.tensors.load::<Ix1>(spec_name)?;
        Ok(values.into_raw_vec_and_offset().0)
    }

    /// A scalar clip bound (the reference's own loader: any float but NaN).
    pub(crate) fn bound(&self, spec_name: &str) -> Result<f32> {
        self.tensors.load_bound(spec_name)
    }
}

impl TextWeights {
    /// Loads every text weight the plan needs, with the shapes the reference's
    /// [`text_tensor_specs`] gives them: every header first ([`check_text_headers`]), then the
    /// values in the reference loader's order (so the first problem found is the one the
    /// reference reports).
    pub fn load(checkpoint: &Checkpoint, config: &ModelConfig, plan: &ModelPlan) -> Result<Self> {
        let text = &config.text;
        let specs = text_tensor_specs(text, plan);
        let loader = Loader {
            checkpoint,
            tensors: check_text_headers(checkpoint, checkpoint.text_prefix()?, &specs)?,
        };
        let embed_tokens = loader.matrix("embed_tokens.weight")?;
        let per_layer_embeddings = if text.hidden_size_per_layer_input > 0 {
            Some(PleWeights {
                table: loader.table("embed_tokens_per_layer.weight"),
                model_projection: loader.matrix("per_layer_model_projection.weight")?,
                projection_norm: loader.vector("per_layer_projection_norm.weight")?,
            })
        } else {
            None
        };
        let mut layers = Vec::with_capacity(plan.layers.len());
        for layer in &plan.layers {
            let names = LayerNames::new(layer.index);
            let own_kv = layer.computes_own_kv();
            let attention = AttentionWeights {
                q_proj: loader.matrix(&names.q_proj())?,
                q_norm: loader.vector(&names.q_norm())?,
                k_proj: own_kv.then(|| loader.matrix(&names.k_proj())).transpose()?,
                v_proj: (own_kv && !layer.key_equals_value)
                    .then(|| loader.matrix(&names.v_proj()))
                    .transpose()?,
                k_norm: own_kv.then(|| loader.vector(&names.k_norm())).transpose()?,
                o_proj: loader.matrix(&names.o_proj())?,
            };
            let mlp = MlpWeights {
                gate_proj: loader.matrix(&names.gate_proj())?,
                up_proj: loader.matrix(&names.up_proj())?,
                down_proj: loader.matrix(&names.down_proj())?,
            };
            let per_layer_embedding = layer
                .has_per_layer_embedding
                .then(|| -> Result<LayerPleWeights> {
                    Ok(LayerPleWeights {
                        input_gate: loader.matrix(&names.per_layer_input_gate())?,
                        projection: loader.matrix(&names.per_layer_projection())?,
                        post_norm: loader.vector(&names.post_per_layer_input_norm())?,
                    })
                })
                .transpose()?;
            let moe = layer
                .has_moe
                .then(|| -> Result<MoeWeights> {
                    Ok(MoeWeights {
                        router_proj: loader.matrix(&names.router_proj())?,
                        router_scale: loader.vector(&names.router_scale())?,
                        per_expert_scale: loader.vector(&names.router_per_expert_scale())?,
                        gate_up_proj: loader.matrix(&names.experts_gate_up_proj())?,
                        down_proj: loader.matrix(&names.experts_down_proj())?,
                        pre_feedforward_layernorm_2: loader
                            .vector(&names.pre_feedforward_layernorm_2())?,
                        post_feedforward_layernorm_1: loader
                            .vector(&names.post_feedforward_layernorm_1())?,
                        post_feedforward_layernorm_2: loader
                            .vector(&names.post_feedforward_layernorm_2())?,
                    })
                })
                .transpose()?;
            layers.push(LayerWeights {
                input_layernorm: loader.vector(&names.input_layernorm())?,
                attention,
                post_attention_layernorm: loader.vector(&names.post_attention_layernorm())?,
                pre_feedforward_layernorm: loader.vector(&names.pre_feedforward_layernorm())?,
                mlp,
                post_feedforward_layernorm: loader.vector(&names.post_feedforward_layernorm())?,
                moe,
                per_layer_embedding,
                layer_scalar: loader.vector(&names.layer_scalar())?[0],
            });
        }
        let final_norm = loader.vector("norm.weight")?;
        let lm_head = if text.tie_word_embeddings {
            None
        } else {
            // The untied head never takes the layout prefix (`full_name`).
            Some(loader.matrix("lm_head.weight")?)
        };
        Ok(TextWeights {
            embed_tokens,
            per_layer_embeddings,
            layers,
            final_norm,
            lm_head,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{write_checkpoint, TinyConfig};
    use crate::Gemma4Optimized;
    use gemma4_reference::Gemma4TextModel;

    /// A NaN in the first tensor and a missing later tensor: both engines check every header
    /// before any value, so both report the missing tensor, with the same message.
    #[test]
    fn a_header_problem_anywhere_is_reported_before_a_nan_by_both_engines() {
        let config = TinyConfig {
            vocab_size: 16,
            hidden_size: 8,
            intermediate_size: 6,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            num_global_key_value_heads: 1,
            head_dim: 4,
            global_head_dim: 8,
            full_layers: vec![false, true],
            sliding_window: 3,
            hidden_size_per_layer_input: 2,
            num_kv_shared_layers: 0,
            use_double_wide_mlp: false,
            attention_k_eq_v: false,
            moe: None,
            tie_word_embeddings: true,
            final_logit_softcapping: None,
        };
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &config.config_json(), WeightDtype::F32, 3).unwrap();
        let path = dir.path().join("model.safetensors");
        let mut bytes = std::fs::read(&path).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        // The data section starts with `embed_tokens` (spec order): its first value becomes NaN.
        bytes[8 + header_len..12 + header_len].copy_from_slice(&f32::NAN.to_le_bytes());
        // `model.norm.weight` (the last tensor) is renamed, same length: it is now missing.
        let header = std::str::from_utf8(&bytes[8..8 + header_len]).unwrap();
        let at = 8 + header.find("\"model.norm.weight\"").unwrap();
        bytes[at..at + 19].copy_from_slice(b"\"model.norm.weighX\"");
        std::fs::write(&path, &bytes).unwrap();

        let reference = match Gemma4TextModel::load(dir.path()) {
            Ok(_) => panic!("the reference loaded a damaged checkpoint"),
            Err(e) => e.to_string(),
        };
        let optimized = match Gemma4Optimized::load(dir.path()) {
            Ok(_) => panic!("the optimized engine loaded a damaged checkpoint"),
            Err(e) => e.to_string(),
        };
        assert!(reference.contains("model.norm.weight"), "{reference}");
        assert!(reference.contains("missing"), "{reference}");
        assert_eq!(optimized, reference);
    }
}
