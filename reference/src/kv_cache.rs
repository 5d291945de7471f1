//! The reference KV cache: every key and value ever computed, per cache-owning layer
//! (shared spec: text §12).
//!
//! This is the simplest cache that is exactly right: it keeps the whole history of every layer
//! that computes its own K/V, and the attention mask (not the cache) enforces the sliding
//! window. Hugging Face keeps only the last `W − 1` entries of sliding layers and the optimized
//! engine a ring buffer of `W`; both see exactly the keys this cache lets the mask admit.
//! KV-shared layers own no entry: they read their producer's (shared spec: text §7).

use ndarray::{concatenate, Array3, Axis};

/// Cached keys and values of one layer: `[S, K, d]` each, row `j` = absolute position `j`.
#[derive(Clone, Debug)]
pub struct LayerCache {
    pub keys: Array3<f32>,
    pub values: Array3<f32>,
}

/// The cache of a whole decoder.
#[derive(Clone, Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    /// Tokens already processed; the next token's position.
    tokens_seen: usize,
}

impl KvCache {
    /// An empty cache for `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: vec![None; num_layers],
            tokens_seen: 0,
        }
    }

    /// Position of the next token (= number of tokens already processed).
    pub fn tokens_seen(&self) -> usize {
        self.tokens_seen
    }

    /// Appends new keys and values (`[T, K, d]`) of `layer`.
    pub fn append(&mut self, layer: usize, keys: Array3<f32>, values: Array3<f32>) {
        self.layers[layer] = Some(match self.layers[layer].take() {
            None => LayerCache { keys, values },
            Some(cached) => LayerCache {
                keys: concatenate(Axis(0), &[cached.keys.view(), keys.view()])
                    .expect("same K and d"),
                values: concatenate(Axis(0), &[cached.values.view(), values.view()])
                    .expect("same K and d"),
            },
        });
    }

    /// Everything cached for `layer` (its own K/V, or a producer's).
    pub fn layer(&self, layer: usize) -> Option<&LayerCache> {
        self.layers[layer].as_ref()
    }

    /// Marks `count` more tokens as processed (called once per forward pass, after all layers).
    pub fn advance(&mut self, count: usize) {
        self.tokens_seen += count;
    }
}

/// KV-cache footprint of a model, in bytes, for `bytes_per_element` (2 for bf16, 4 for f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CacheFootprint {
    /// Layers that own a cache (KV-shared layers own none).
    pub sliding_layers_with_cache: usize,
    pub full_layers_with_cache: usize,
    /// Growth per token of the full layers, K and V both stored (as Hugging Face stores them).
    pub full_bytes_per_token: u64,
    /// Bytes per cached token of one sliding position summed over sliding layers; a sliding
    /// layer holds at most `W` positions, so this stops growing after `W` tokens.
    pub sliding_bytes_per_token: u64,
    /// Same as `full_bytes_per_token` when K=V layers store a single tensor (V; K is
    /// `RoPE(V ⊙ k_norm)`), as the optimized engine does.
    pub full_bytes_per_token_single_tensor_k_eq_v: u64,
    /// Sliding footprint at a full window: `W · sliding_bytes_per_token`.
    pub sliding_bytes_at_full_window: u64,
}

/// Computes the cache footprint from the layer plan (shared spec: text §12).
pub fn cache_footprint(
    plan: &crate::layer_plan::ModelPlan,
    sliding_window: usize,
    bytes_per_element: u64,
) -> CacheFootprint {
    use crate::config::AttentionType;
    let mut footprint = CacheFootprint {
        sliding_layers_with_cache: 0,
        full_layers_with_cache: 0,
        full_bytes_per_token: 0,
        sliding_bytes_per_token: 0,
        full_bytes_per_token_single_tensor_k_eq_v: 0,
        sliding_bytes_at_full_window: 0,
    };
    for layer in plan.layers.iter().filter(|l| l.computes_own_kv()) {
        let one_tensor = (layer.num_kv_heads * layer.head_dim) as u64 * bytes_per_element;
        match layer.attention_type {
            AttentionType::Sliding => {
                footprint.sliding_layers_with_cache += 1;
                footprint.sliding_bytes_per_token += 2 * one_tensor;
            }
            AttentionType::Full => {
                footprint.full_layers_with_cache += 1;
                footprint.full_bytes_per_token += 2 * one_tensor;
                footprint.full_bytes_per_token_single_tensor_k_eq_v += if layer.key_equals_value {
                    one_tensor
                } else {
                    2 * one_tensor
                };
            }
        }
    }
    footprint.sliding_bytes_at_full_window =
        footprint.sliding_bytes_per_token * sliding_window as u64;
    footprint
}
