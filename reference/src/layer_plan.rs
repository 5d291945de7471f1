//! The layer plan: every per-layer decision of Gemma 4, derived once from the config.
//!
//! Gemma 4's layers differ from each other in six ways (shared spec: text §1, §5, §7, §8, §9):
//! attention type (sliding or full), head dim, number of KV heads, K=V or not, where the layer's
//! keys and values come from (its own projections, or a KV-sharing producer), and MLP width.
//! This module turns the config into a [`LayerPlan`] per layer; the forward pass reads the plan
//! and never re-derives a rule. The plan of the four released models is snapshot-tested.

use crate::config::{last_layer_of, AttentionType, RopeParameters, TextConfig};
use crate::faults::{fault_active, Fault};

/// Where a layer's keys and values come from (shared spec: text §7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum KvSource {
    /// The layer projects its own K/V and keeps them in its own cache.
    /// `shared_with_consumers` is true for the producers that KV-shared layers read
    /// (Hugging Face's `"store"` mode).
    Own { shared_with_consumers: bool },
    /// A KV-shared ("consumer") layer: no K/V projections and no cache of its own; it attends
    /// over the cached keys and values of `producer`, the last non-shared layer of its type.
    SharedFrom { producer: usize },
}

/// Everything that distinguishes one decoder layer from another.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LayerPlan {
    pub index: usize,
    pub attention_type: AttentionType,
    /// `d`: head dim of this layer (256 sliding / 512 full in the released models).
    pub head_dim: usize,
    /// `H`: query heads.
    pub num_query_heads: usize,
    /// `K`: key/value heads; query head `n` reads KV head `floor(n / (H / K))`.
    pub num_kv_heads: usize,
    /// K=V: there is no `v_proj`; V is the weight-free RMSNorm of the raw `k_proj` output.
    pub key_equals_value: bool,
    pub kv_source: KvSource,
    /// `Some(W)` on sliding layers: a query at position i sees keys j with `0 <= i - j < W`.
    pub sliding_window: Option<usize>,
    /// RoPE of this layer's type.
    pub rope: RopeParameters,
    /// Width of the dense GeGLU MLP (`2F` on double-wide KV-shared layers).
    pub mlp_width: usize,
    /// The layer adds its Per-Layer Embedding branch after the feed-forward block.
    pub has_per_layer_embedding: bool,
    /// The layer runs the mixture-of-experts block next to the dense MLP.
    pub has_moe: bool,
}

impl LayerPlan {
    /// The layer whose cache this layer's attention reads (itself unless KV-shared).
    pub fn kv_layer(&self) -> usize {
        match self.kv_source {
            KvSource::Own { .. } => self.index,
            KvSource::SharedFrom { producer } => producer,
        }
    }

    /// True when the layer computes K and V itself.
    pub fn computes_own_kv(&self) -> bool {
        matches!(self.kv_source, KvSource::Own { .. })
    }
}

/// The plan of the whole decoder.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ModelPlan {
    pub layers: Vec<LayerPlan>,
    /// Index of the first KV-shared layer (`L - num_kv_shared_layers`).
    pub first_kv_shared_layer: usize,
}

impl ModelPlan {
    /// Derives the per-layer plan. The config was validated when parsed, so this cannot fail.
    pub fn from_config(config: &TextConfig) -> ModelPlan {
        let num_layers = config.num_hidden_layers;
        let first_kv_shared_layer = num_layers - config.num_kv_shared_layers;

        // The producer of each layer type: the last non-shared layer of that type (text §7).
        // Faults cannot change during this call, so each type's producer is found once.
        let find_producer = |kind: AttentionType| -> Option<usize> {
            if fault_active(Fault::KvSharedWrongSource) {
                // Bug: the last non-shared layer, whatever its type.
                return first_kv_shared_layer.checked_sub(1);
            }
            if fault_active(Fault::KvSharedFirstProducer) {
                // Bug: the first layer of that type.
                return (0..first_kv_shared_layer).find(|&i| config.layer_types[i] == kind);
            }
            last_layer_of(&config.layer_types, first_kv_shared_layer, kind)
        };
        let (sliding_producer, full_producer) = (
            find_producer(AttentionType::Sliding),
            find_producer(AttentionType::Full),
        );
        let producer_of = |kind: AttentionType| match kind {
            AttentionType::Sliding => sliding_producer,
            AttentionType::Full => full_producer,
        };
        // The producers some KV-shared layer actually reads (Hugging Face's `"store"` layers):
        // those of the layer types that occur among the KV-shared layers (at most two).
        let shared_types = &config.layer_types[first_kv_shared_layer..];
        let read_producers: Vec<usize> = [AttentionType::Sliding, AttentionType::Full]
            .into_iter()
            .filter(|kind| shared_types.contains(kind))
            .filter_map(producer_of)
            .collect();

        let layers = (0..num_layers)
            .map(|index| {
                let attention_type = config.layer_types[index];
                let geometry = config.layer_geometry[index];
                let is_consumer = index >= first_kv_shared_layer;
                let kv_source = if is_consumer {
                    KvSource::SharedFrom {
                        producer: producer_of(attention_type).expect(
                            "config validation guarantees a producer for every consumed layer type",
                        ),
                    }
                } else {
                    KvSource::Own {
                        shared_with_consumers: read_producers.contains(&index),
                    }
                };
                let (sliding_window, rope) = match attention_type {
                    AttentionType::Sliding => {
                        (Some(config.sliding_window), config.rope_sliding.clone())
                    }
                    AttentionType::Full => (None, config.rope_full.clone()),
                };
                let double_wide = config.use_double_wide_mlp && is_consumer;
                LayerPlan {
                    index,
                    attention_type,
                    head_dim: geometry.head_dim,
                    num_query_heads: config.num_attention_heads,
                    num_kv_heads: geometry.num_key_value_heads,
                    key_equals_value: config.attention_k_eq_v
                        && attention_type == AttentionType::Full,
                    kv_source,
                    sliding_window,
                    rope,
                    mlp_width: config.intermediate_size * if double_wide { 2 } else { 1 },
                    has_per_layer_embedding: config.hidden_size_per_layer_input > 0,
                    has_moe: config.moe.is_some(),
                }
            })
            .collect();
        ModelPlan {
            layers,
            first_kv_shared_layer,
        }
    }

    /// A one-letter-per-layer picture of the attention pattern, e.g. `SSSSF SSSSF ...`
    /// (S sliding, F full), in groups ending at each full layer.
    pub fn pattern(&self) -> String {
        let mut out = String::new();
        for layer in &self.layers {
            out.push(match layer.attention_type {
                AttentionType::Sliding => 'S',
                AttentionType::Full => 'F',
            });
            if layer.attention_type == AttentionType::Full && layer.index + 1 < self.layers.len() {
                out.push(' ');
            }
        }
        out
    }
}
