//! The text weights **as stored**: memory-mapped, in their checkpoint dtype (f32, bf16, f16).
//!
//! Validation is the reference's: the config, the layer plan, the shard index and every
//! safetensors header are checked by `gemma4_reference::checkpoint::Checkpoint` and
//! `Checkpoint::check`, in the reference loader's order, so a damaged checkpoint fails here with
//! exactly the reference's error. What differs is what happens after the check:
//! - matrices are not converted: a [`Matrix`] points into the mapped file and kernels widen
//!   16-bit values to f32 in registers (`simd`);
//! - vectors (norm weights, scalars, router scales) are small and are copied to f32;
//! - the PLE table (`[262144, L·P]`, 4.7 GB in bf16 for E2B) is never read as a whole: only the
//!   rows of the tokens seen are touched ("PLE in flash", see `ple`).
//!
//! Tensor names come from the reference ([`LayerNames`], [`full_name`]): HF names live there.

use std::any::Any;
use std::sync::Arc;

use gemma4_reference::checkpoint::{full_name, Checkpoint, LayerNames, WeightDtype};
use gemma4_reference::config::ModelConfig;
use gemma4_reference::layer_plan::ModelPlan;
use gemma4_reference::Result;
use half::{bf16, f16};

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
        assert_eq!(values.len(), rows * cols);
        let owner: Arc<Vec<f32>> = Arc::new(values);
        Matrix {
            ptr: owner.as_ptr() as *const u8,
            rows,
            cols,
            dtype: WeightDtype::F32,
            _owner: Some(owner),
        }
    }

    /// An owned bf16 matrix (tests).
    pub fn from_bf16(rows: usize, cols: usize, values: Vec<bf16>) -> Matrix {
        assert_eq!(values.len(), rows * cols);
        let owner: Arc<Vec<bf16>> = Arc::new(values);
        Matrix {
            ptr: owner.as_ptr() as *const u8,
            rows,
            cols,
            dtype: WeightDtype::BF16,
            _owner: Some(owner),
        }
    }

    /// An owned f16 matrix (tests).
    pub fn from_f16(rows: usize, cols: usize, values: Vec<f16>) -> Matrix {
        assert_eq!(values.len(), rows * cols);
        let owner: Arc<Vec<f16>> = Arc::new(values);
        Matrix {
            ptr: owner.as_ptr() as *const u8,
            rows,
            cols,
            dtype: WeightDtype::F16,
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

    /// The whole matrix as f32 (tests and tiny tensors only).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for r in 0..self.rows {
            self.row_scaled_into(r, 1.0, &mut out[r * self.cols..(r + 1) * self.cols]);
        }
        out
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

/// Reads matrices and vectors from a validated checkpoint.
struct Loader<'a> {
    checkpoint: &'a Checkpoint,
    prefix: &'static str,
}

impl Loader<'_> {
    fn name(&self, n: &str) -> String {
        full_name(self.prefix, n)
    }

    /// A matrix of `shape` (2-D, or 3-D stacked into 2-D), after the reference's checks
    /// (shape, dtype, and every value finite).
    fn matrix(&self, spec_name: &str, shape: &[usize]) -> Result<Matrix> {
        let name = self.name(spec_name);
        let dtype = self.checkpoint.check(&name, shape)?;
        self.checkpoint.check_finite(&name, shape, dtype)?;
        self.map(&name, shape, dtype)
    }

    /// The PLE table: shape and dtype checked, but its values are not scanned at load — the
    /// table stays on disk and only the rows of the tokens seen are ever read (a non-finite
    /// value there surfaces as a non-finite `per_layer_inputs`, named by the recorder).
    fn table(&self, spec_name: &str, shape: &[usize]) -> Result<Matrix> {
        let name = self.name(spec_name);
        let dtype = self.checkpoint.check(&name, shape)?;
        self.map(&name, shape, dtype)
    }

    fn map(&self, name: &str, shape: &[usize], dtype: WeightDtype) -> Result<Matrix> {
        let bytes = self
            .checkpoint
            .file_of(name)
            .and_then(|f| f.bytes(name))
            .expect("checked above");
        let cols = *shape.last().expect("non-empty shape");
        let rows = shape.iter().product::<usize>() / cols.max(1);
        // SAFETY: the bytes belong to the checkpoint's read-only maps, which the model keeps
        // alive (and unchanged) for as long as its weights exist.
        Ok(unsafe { Matrix::from_mapped(bytes, rows, cols, dtype) })
    }

    /// A vector of `n` values as f32 (the reference's own loader, same checks).
    fn vector(&self, spec_name: &str, n: usize) -> Result<Vec<f32>> {
        let (values, _) = self.checkpoint.load_f32(&self.name(spec_name), &[n])?;
        Ok(values.into_raw_vec_and_offset().0)
    }
}

impl TextWeights {
    /// Loads every text weight the plan needs, checking them in the reference loader's order
    /// (so the first problem found is the one the reference reports).
    pub fn load(checkpoint: &Checkpoint, config: &ModelConfig, plan: &ModelPlan) -> Result<Self> {
        let text = &config.text;
        let loader = Loader {
            checkpoint,
            prefix: checkpoint.text_prefix()?,
        };
        let d = text.hidden_size;
        let v = text.vocab_size;
        let embed_tokens = loader.matrix("embed_tokens.weight", &[v, d])?;
        let p = text.hidden_size_per_layer_input;
        let num_layers = text.num_hidden_layers;
        let per_layer_embeddings = if p > 0 {
            Some(PleWeights {
                table: loader.table(
                    "embed_tokens_per_layer.weight",
                    &[text.vocab_size_per_layer_input, num_layers * p],
                )?,
                model_projection: loader
                    .matrix("per_layer_model_projection.weight", &[num_layers * p, d])?,
                projection_norm: loader.vector("per_layer_projection_norm.weight", p)?,
            })
        } else {
            None
        };
        let mut layers = Vec::with_capacity(num_layers);
        for layer in &plan.layers {
            let names = LayerNames::new(layer.index);
            let (h, k, hd, f) = (
                layer.num_query_heads,
                layer.num_kv_heads,
                layer.head_dim,
                layer.mlp_width,
            );
            let own_kv = layer.computes_own_kv();
            let attention = AttentionWeights {
                q_proj: loader.matrix(&names.q_proj(), &[h * hd, d])?,
                q_norm: loader.vector(&names.q_norm(), hd)?,
                k_proj: own_kv
                    .then(|| loader.matrix(&names.k_proj(), &[k * hd, d]))
                    .transpose()?,
                v_proj: (own_kv && !layer.key_equals_value)
                    .then(|| loader.matrix(&names.v_proj(), &[k * hd, d]))
                    .transpose()?,
                k_norm: own_kv
                    .then(|| loader.vector(&names.k_norm(), hd))
                    .transpose()?,
                o_proj: loader.matrix(&names.o_proj(), &[d, h * hd])?,
            };
            let mlp = MlpWeights {
                gate_proj: loader.matrix(&names.gate_proj(), &[f, d])?,
                up_proj: loader.matrix(&names.up_proj(), &[f, d])?,
                down_proj: loader.matrix(&names.down_proj(), &[d, f])?,
            };
            let per_layer_embedding = layer
                .has_per_layer_embedding
                .then(|| -> Result<LayerPleWeights> {
                    Ok(LayerPleWeights {
                        input_gate: loader.matrix(&names.per_layer_input_gate(), &[p, d])?,
                        projection: loader.matrix(&names.per_layer_projection(), &[d, p])?,
                        post_norm: loader.vector(&names.post_per_layer_input_norm(), d)?,
                    })
                })
                .transpose()?;
            let moe = match (&text.moe, layer.has_moe) {
                (Some(moe), true) => {
                    let (e, inner) = (moe.num_experts, moe.moe_intermediate_size);
                    Some(MoeWeights {
                        router_proj: loader.matrix(&names.router_proj(), &[e, d])?,
                        router_scale: loader.vector(&names.router_scale(), d)?,
                        per_expert_scale: loader.vector(&names.router_per_expert_scale(), e)?,
                        gate_up_proj: loader
                            .matrix(&names.experts_gate_up_proj(), &[e, 2 * inner, d])?,
                        down_proj: loader.matrix(&names.experts_down_proj(), &[e, d, inner])?,
                        pre_feedforward_layernorm_2: loader
                            .vector(&names.pre_feedforward_layernorm_2(), d)?,
                        post_feedforward_layernorm_1: loader
                            .vector(&names.post_feedforward_layernorm_1(), d)?,
                        post_feedforward_layernorm_2: loader
                            .vector(&names.post_feedforward_layernorm_2(), d)?,
                    })
                }
                _ => None,
            };
            layers.push(LayerWeights {
                input_layernorm: loader.vector(&names.input_layernorm(), d)?,
                attention,
                post_attention_layernorm: loader.vector(&names.post_attention_layernorm(), d)?,
                pre_feedforward_layernorm: loader.vector(&names.pre_feedforward_layernorm(), d)?,
                mlp,
                post_feedforward_layernorm: loader
                    .vector(&names.post_feedforward_layernorm(), d)?,
                moe,
                per_layer_embedding,
                layer_scalar: loader.vector(&names.layer_scalar(), 1)?[0],
            });
        }
        let final_norm = loader.vector("norm.weight", d)?;
        let lm_head = if text.tie_word_embeddings {
            None
        } else {
            // The untied head never takes the layout prefix (reference: `checkpoint.rs`).
            let dtype = checkpoint.check("lm_head.weight", &[v, d])?;
            checkpoint.check_finite("lm_head.weight", &[v, d], dtype)?;
            let bytes = checkpoint
                .file_of("lm_head.weight")
                .and_then(|f| f.bytes("lm_head.weight"))
                .expect("checked above");
            // SAFETY: as in `Loader::matrix`.
            Some(unsafe { Matrix::from_mapped(bytes, v, d, dtype) })
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
