//! The KV cache, built for Gemma 4 (shared spec: text §5.3, §7, §12).
//!
//! - **Sliding layers** keep a ring buffer of `W` positions: position `p` lives in slot `p mod W`.
//!   Storage grows in blocks of [`GROWTH_BLOCK`] positions up to `W` and never beyond.
//! - **Full layers** grow, in blocks of [`GROWTH_BLOCK`] positions (exact reservations, so the
//!   allocation is what [`LayerCache::allocated_bytes`] says).
//! - **K=V layers** (full layers of 31B / 26B-A4B) store **one** tensor, `V = RMSNorm_∅(k_raw)`,
//!   and rebuild `K = RoPE(V ⊙ k_norm.weight)` when attending. This is exact in f32: RMSNorm
//!   computes `(x · inverse_rms) · w`, so `V ⊙ w` reproduces the bits of the learned-norm
//!   output, and RoPE is recomputed with the same f32 operations (`rope::RopeTable`). Storing K
//!   and recovering V would need a division by `k_norm.weight` and an inverse rotation, which
//!   round (and break down where a weight is 0). Storing V costs one multiply and one rotation of
//!   64 pairs per cached key per step: the rotation touches a quarter of the coordinates (p-RoPE).
//!   The cos/sin of each stored position are kept beside it (written once with the slot:
//!   `2 · 64 · 4` = 512 bytes per position on 31B, 1/16 of its K=V entry), so a step does no
//!   trigonometry on the cached positions; `gemma4 inspect` reports these bytes separately.
//! - **KV-shared layers** store nothing and read their producer's cache (`LayerPlan::kv_layer`).
//!
//! Entries are f32, so a cached key is bit-identical to the one the reference computes.
//!
//! During a forward pass over `T` new tokens, each producing layer first *stages* the new keys
//! and values ([`KvCache::stage`]); attention reads the stored past plus the staged chunk (so a
//! chunk longer than the window still sees every key it needs); [`KvCache::commit`] then writes the
//! chunk into storage (for a ring, only its last `W` positions) once every layer has run.

use gemma4_reference::config::AttentionType;
use gemma4_reference::layer_plan::ModelPlan;
use rayon::prelude::*;

use crate::rope::RopeTable;

/// Storage grows by this many positions at a time.
pub const GROWTH_BLOCK: usize = 64;

/// Bytes per cached element (f32).
pub const BYTES_PER_ELEMENT: usize = 4;

/// The cache of one K/V-producing layer.
#[derive(Clone, Debug)]
pub struct LayerCache {
    pub attention_type: AttentionType,
    /// `Some(W)` for a ring buffer.
    pub sliding_window: Option<usize>,
    /// `K · d`: floats per position of one tensor.
    pub row: usize,
    pub head_dim: usize,
    /// K=V: only values are stored; keys are rebuilt from them.
    pub key_equals_value: bool,
    /// `k_norm.weight` (K=V layers rebuild keys with it).
    pub k_norm: Vec<f32>,
    /// K=V layers: the RoPE cos/sin of the position held in each slot (row = slot), written
    /// with the slot, so that rebuilding the keys every step rotates with stored angles instead
    /// of recomputing a sin and a cos per cached position and rotated pair.
    key_angles: Option<RopeTable>,
    /// `[slots, K, d]`; empty on K=V layers.
    keys: Vec<f32>,
    /// `[slots, K, d]`
    values: Vec<f32>,
    /// Positions the storage can hold (`≤ W` for a ring).
    slots: usize,
}

impl LayerCache {
    fn slot(&self, position: usize) -> usize {
        match self.sliding_window {
            Some(window) => position % window,
            None => position,
        }
    }

    /// Grows the storage so that `positions` positions fit (a ring caps at `W`).
    fn reserve(&mut self, positions: usize) {
        let mut wanted = positions.div_ceil(GROWTH_BLOCK) * GROWTH_BLOCK;
        if let Some(window) = self.sliding_window {
            wanted = wanted.min(window);
        }
        if wanted <= self.slots {
            return;
        }
        let grow = |v: &mut Vec<f32>, row: usize| {
            v.reserve_exact(wanted * row - v.len());
            v.resize(wanted * row, 0.0);
        };
        if !self.key_equals_value {
            grow(&mut self.keys, self.row);
        }
        grow(&mut self.values, self.row);
        if let Some(angles) = &mut self.key_angles {
            angles.reserve_rows(wanted);
        }
        self.slots = wanted;
    }

    /// Bytes held by this layer's key and value storage (its real allocation).
    pub fn allocated_bytes(&self) -> usize {
        (self.keys.capacity() + self.values.capacity()) * BYTES_PER_ELEMENT
    }

    /// Bytes held by the K=V key-rebuild angle table (0 on other layers).
    pub fn angle_table_bytes(&self) -> usize {
        self.key_angles
            .as_ref()
            .map_or(0, RopeTable::allocated_bytes)
    }

    /// Bytes one cached position costs in the K=V angle table (0 on other layers).
    pub fn angle_bytes_per_position(&self) -> usize {
        self.key_angles.as_ref().map_or(0, RopeTable::bytes_per_row)
    }

    /// Bytes one cached position costs in this layer.
    pub fn bytes_per_position(&self) -> usize {
        let tensors = if self.key_equals_value { 1 } else { 2 };
        tensors * self.row * BYTES_PER_ELEMENT
    }
}

/// New keys and values of one layer for the current chunk, not yet committed.
#[derive(Clone, Debug)]
struct Staged {
    /// `[T, K, d]` after k_norm and RoPE.
    keys: Vec<f32>,
    /// `[T, K, d]` after the weight-free norm.
    values: Vec<f32>,
}

/// A contiguous run of keys and values at consecutive positions, `[n, K, d]` each.
pub struct Segment<'a> {
    pub first_position: usize,
    pub len: usize,
    pub keys: &'a [f32],
    pub values: &'a [f32],
}

/// The cache of a whole decoder.
#[derive(Clone, Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    staged: Vec<Option<Staged>>,
    staged_tokens: usize,
    tokens_seen: usize,
    /// K=V layers' keys rebuilt for the current attention call, kept to be reused (a fresh
    /// buffer of a long context's keys per layer and step would be page-faulted in every time).
    rebuilt_keys: Vec<f32>,
}

impl KvCache {
    /// An empty cache for the K/V-producing layers of `plan`. `k_norm_of(layer)` and
    /// `inverse_frequencies_of(layer)` give what K=V layers need to rebuild keys.
    pub fn new(
        plan: &ModelPlan,
        k_norm_of: impl Fn(usize) -> Vec<f32>,
        inverse_frequencies_of: impl Fn(usize) -> Vec<f32>,
    ) -> KvCache {
        let layers = plan
            .layers
            .iter()
            .map(|layer| {
                layer.computes_own_kv().then(|| LayerCache {
                    attention_type: layer.attention_type,
                    sliding_window: layer.sliding_window,
                    row: layer.num_kv_heads * layer.head_dim,
                    head_dim: layer.head_dim,
                    key_equals_value: layer.key_equals_value,
                    k_norm: if layer.key_equals_value {
                        k_norm_of(layer.index)
                    } else {
                        Vec::new()
                    },
                    key_angles: layer
                        .key_equals_value
                        .then(|| RopeTable::empty(&inverse_frequencies_of(layer.index))),
                    keys: Vec::new(),
                    values: Vec::new(),
                    slots: 0,
                })
            })
            .collect::<Vec<_>>();
        KvCache {
            staged: vec![None; layers.len()],
            layers,
            staged_tokens: 0,
            tokens_seen: 0,
            rebuilt_keys: Vec::new(),
        }
    }

    /// Position of the next token (tokens already committed).
    pub fn tokens_seen(&self) -> usize {
        self.tokens_seen
    }

    /// The storage of a producing layer.
    pub fn layer(&self, layer: usize) -> Option<&LayerCache> {
        self.layers[layer].as_ref()
    }

    /// Stages the chunk's keys and values (`[T, K, d]` each) of `layer`.
    pub fn stage(&mut self, layer: usize, keys: Vec<f32>, values: Vec<f32>) {
        let cache = self.layers[layer]
            .as_ref()
            .expect("only producing layers stage K/V");
        let tokens = values.len() / cache.row;
        assert_eq!(keys.len(), values.len());
        assert!(
            self.staged_tokens == 0 || self.staged_tokens == tokens,
            "one chunk size per pass"
        );
        self.staged_tokens = tokens;
        self.staged[layer] = Some(Staged { keys, values });
    }

    /// The keys and values `layer` (a producer) holds for positions `from..` (stored past, then
    /// the staged chunk), as contiguous segments in position order.
    pub fn segments(&mut self, layer: usize, from: usize) -> Vec<Segment<'_>> {
        let KvCache {
            layers,
            staged,
            staged_tokens,
            tokens_seen,
            rebuilt_keys,
        } = self;
        let (staged_tokens, tokens_seen) = (*staged_tokens, *tokens_seen);
        let cache = layers[layer].as_ref().expect("a producing layer");
        let row = cache.row;
        let stored_from = match cache.sliding_window {
            Some(window) => tokens_seen.saturating_sub(window),
            None => 0,
        };
        // Runs of consecutive slots holding positions `from..tokens_seen`: (position, slot, len).
        let mut runs = Vec::new();
        let mut position = from.max(stored_from);
        while position < tokens_seen {
            let slot = cache.slot(position);
            let run = (tokens_seen - position).min(cache.slots - slot);
            runs.push((position, slot, run));
            position += run;
        }
        // K=V layers: the runs' keys, rebuilt into the reused scratch buffer.
        if cache.key_equals_value {
            rebuilt_keys.clear();
            for &(_, slot, run) in &runs {
                let start = rebuilt_keys.len();
                rebuilt_keys.extend_from_slice(&cache.values[slot * row..(slot + run) * row]);
                rebuild_keys(cache, &mut rebuilt_keys[start..], slot);
            }
        }
        let rebuilt: &[f32] = rebuilt_keys;
        let mut segments = Vec::with_capacity(runs.len() + 1);
        let mut rebuilt_offset = 0;
        for (position, slot, run) in runs {
            let keys = if cache.key_equals_value {
                rebuilt_offset += run * row;
                &rebuilt[rebuilt_offset - run * row..rebuilt_offset]
            } else {
                &cache.keys[slot * row..(slot + run) * row]
            };
            segments.push(Segment {
                first_position: position,
                len: run,
                keys,
                values: &cache.values[slot * row..(slot + run) * row],
            });
        }
        if let Some(staged) = &staged[layer] {
            let skip = from.saturating_sub(tokens_seen).min(staged_tokens);
            let len = staged_tokens - skip;
            if len > 0 {
                segments.push(Segment {
                    first_position: tokens_seen + skip,
                    len,
                    keys: &staged.keys[skip * row..],
                    values: &staged.values[skip * row..],
                });
            }
        }
        segments
    }

    /// Writes every staged chunk into storage and advances the position by the chunk length.
    pub fn commit(&mut self) {
        let tokens = self.staged_tokens;
        for (cache, staged) in self.layers.iter_mut().zip(self.staged.iter_mut()) {
            let (Some(cache), Some(staged)) = (cache.as_mut(), staged.take()) else {
                continue;
            };
            let row = cache.row;
            cache.reserve(self.tokens_seen + tokens);
            // A ring keeps only the last W positions of the chunk.
            let keep_from = match cache.sliding_window {
                Some(window) => tokens.saturating_sub(window),
                None => 0,
            };
            for t in keep_from..tokens {
                let slot = cache.slot(self.tokens_seen + t);
                if !cache.key_equals_value {
                    cache.keys[slot * row..(slot + 1) * row]
                        .copy_from_slice(&staged.keys[t * row..(t + 1) * row]);
                }
                cache.values[slot * row..(slot + 1) * row]
                    .copy_from_slice(&staged.values[t * row..(t + 1) * row]);
                if let Some(angles) = &mut cache.key_angles {
                    angles.set_row(slot, self.tokens_seen + t);
                }
            }
        }
        self.tokens_seen += tokens;
        self.staged_tokens = 0;
    }

    /// Bytes allocated by the whole cache, per attention type: `(sliding, full)`.
    pub fn allocated_bytes(&self) -> (usize, usize) {
        self.sum_per_type(LayerCache::allocated_bytes)
    }

    /// Bytes one position costs, summed over layers, per attention type: `(sliding, full)`.
    pub fn bytes_per_position(&self) -> (usize, usize) {
        self.sum_per_type(LayerCache::bytes_per_position)
    }

    /// Bytes one position costs in the K=V layers' angle tables, per attention type.
    pub fn angle_bytes_per_position(&self) -> (usize, usize) {
        self.sum_per_type(LayerCache::angle_bytes_per_position)
    }

    /// Bytes allocated by the K=V layers' angle tables, per attention type.
    pub fn angle_table_bytes(&self) -> (usize, usize) {
        self.sum_per_type(LayerCache::angle_table_bytes)
    }

    /// `bytes` summed over the layers of each attention type: `(sliding, full)`.
    fn sum_per_type(&self, bytes: impl Fn(&LayerCache) -> usize) -> (usize, usize) {
        let (mut sliding, mut full) = (0, 0);
        for cache in self.layers.iter().flatten() {
            match cache.attention_type {
                AttentionType::Sliding => sliding += bytes(cache),
                AttentionType::Full => full += bytes(cache),
            }
        }
        (sliding, full)
    }
}

/// `K = RoPE(V ⊙ k_norm)`, in place on `keys` (`[n, K, d]`), a copy of the stored values of the
/// consecutive slots `first_slot..` of a K=V layer, rotated by the angles stored with them.
fn rebuild_keys(cache: &LayerCache, keys: &mut [f32], first_slot: usize) {
    let d = cache.head_dim;
    let angles = cache
        .key_angles
        .as_ref()
        .expect("a K=V layer keeps its angles");
    // Positions are independent: split them over the pool (same arithmetic per element).
    keys.par_chunks_exact_mut(cache.row)
        .with_min_len(16)
        .enumerate()
        .for_each(|(t, token)| {
            for head in token.chunks_exact_mut(d) {
                for (k, &w) in head.iter_mut().zip(&cache.k_norm) {
                    *k *= w;
                }
                angles.rotate(head, first_slot + t);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use gemma4_reference::config::{RopeKind, RopeParameters};
    use gemma4_reference::layer_plan::{KvSource, LayerPlan};

    fn plan(window: usize, key_equals_value: bool) -> ModelPlan {
        let layer = |index, attention_type, sliding_window, kve| LayerPlan {
            index,
            attention_type,
            head_dim: 4,
            num_query_heads: 2,
            num_kv_heads: 1,
            key_equals_value: kve,
            kv_source: KvSource::Own {
                shared_with_consumers: false,
            },
            sliding_window,
            rope: RopeParameters {
                kind: RopeKind::Default,
                theta: 1e4,
                factor: 1.0,
            },
            mlp_width: 4,
            has_per_layer_embedding: false,
            has_moe: false,
        };
        ModelPlan {
            layers: vec![
                layer(0, AttentionType::Sliding, Some(window), false),
                layer(1, AttentionType::Full, None, key_equals_value),
            ],
            first_kv_shared_layer: 2,
        }
    }

    /// Appends `tokens` positions whose values encode the position (value = position + 0.5).
    fn feed(cache: &mut KvCache, tokens: usize) {
        let first = cache.tokens_seen();
        let v: Vec<f32> = (0..tokens)
            .flat_map(|t| [(first + t) as f32 + 0.5; 4])
            .collect();
        cache.stage(0, v.clone(), v.clone());
        cache.stage(1, v.clone(), v);
        cache.commit();
    }

    #[test]
    fn kv_cache_ring_holds_the_last_window_positions_in_order() {
        let window = 5;
        let mut cache = KvCache::new(&plan(window, false), |_| vec![1.0; 4], |_| vec![0.0; 2]);
        feed(&mut cache, 3);
        feed(&mut cache, 7); // a chunk longer than the window
        for _ in 0..4 {
            feed(&mut cache, 1);
        }
        let seen = cache.tokens_seen();
        assert_eq!(seen, 14);
        let positions: Vec<(usize, f32)> = cache
            .segments(0, 0)
            .iter()
            .flat_map(|s| (0..s.len).map(move |i| (s.first_position + i, s.values[i * 4])))
            .collect();
        let expected: Vec<(usize, f32)> =
            (seen - window..seen).map(|p| (p, p as f32 + 0.5)).collect();
        assert_eq!(positions, expected, "ring content (position, value)");
        assert_eq!(
            cache.layer(0).unwrap().allocated_bytes(),
            window * 2 * 4 * BYTES_PER_ELEMENT
        );
    }

    #[test]
    fn kv_cache_full_layer_grows_in_blocks_and_keeps_everything() {
        let mut cache = KvCache::new(&plan(3, false), |_| vec![1.0; 4], |_| vec![0.0; 2]);
        feed(&mut cache, GROWTH_BLOCK + 1);
        let full = cache.layer(1).unwrap();
        assert_eq!(
            full.allocated_bytes(),
            2 * GROWTH_BLOCK * full.bytes_per_position()
        );
        let values: Vec<f32> = cache
            .segments(1, 0)
            .iter()
            .flat_map(|s| (0..s.len).map(move |i| s.values[i * 4]))
            .collect();
        assert_eq!(values.len(), GROWTH_BLOCK + 1);
        assert!(values.iter().enumerate().all(|(p, &v)| v == p as f32 + 0.5));
    }

    #[test]
    fn kv_cache_key_equals_value_layer_stores_one_tensor_and_rebuilds_keys() {
        let mut cache = KvCache::new(
            &plan(3, true),
            |_| vec![2.0, 1.0, 0.5, 3.0],
            |_| vec![0.0; 2],
        );
        feed(&mut cache, 2);
        let full = cache.layer(1).unwrap();
        assert_eq!(
            full.bytes_per_position(),
            4 * BYTES_PER_ELEMENT,
            "one tensor"
        );
        // Zero frequencies: K = V ⊙ k_norm exactly.
        let segments = cache.segments(1, 0);
        assert_eq!(&segments[0].keys[..4], &[1.0, 0.5, 0.25, 1.5]);
    }
}
