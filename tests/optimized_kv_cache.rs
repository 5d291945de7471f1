//! The optimized KV cache's real allocation agrees with the footprint formula that
//! `gemma4 inspect` prints (`gemma4_reference::kv_cache::cache_footprint`, f32 entries, one
//! tensor on K=V layers), for every released variant's layer plan.

mod common;

use gemma4_optimized::kv_cache::{KvCache, BYTES_PER_ELEMENT, GROWTH_BLOCK};
use gemma4_reference::kv_cache::cache_footprint;
use gemma4_reference::rope::inverse_frequencies;
use gemma4_reference::{ModelConfig, ModelPlan};

/// Stages and commits `tokens` zero positions in every K/V-producing layer.
fn feed(cache: &mut KvCache, plan: &ModelPlan, tokens: usize) {
    for layer in plan.layers.iter().filter(|l| l.computes_own_kv()) {
        let n = tokens * layer.num_kv_heads * layer.head_dim;
        cache.stage(layer.index, vec![0.0; n], vec![0.0; n]);
    }
    cache.commit();
}

#[test]
fn kv_cache_bytes_per_token_match_formula_every_released_variant() {
    for variant in ["e2b", "e4b", "31b", "26b-a4b"] {
        let config =
            ModelConfig::from_dir(&common::test_data_dir().join("released").join(variant)).unwrap();
        let plan = ModelPlan::from_config(&config.text);
        let window = config.text.sliding_window;
        let formula = cache_footprint(&plan, window, BYTES_PER_ELEMENT as u64);
        let mut cache = KvCache::new(
            &plan,
            |i| vec![1.0; plan.layers[i].head_dim],
            |i| inverse_frequencies(&plan.layers[i].rope, plan.layers[i].head_dim),
        );
        // Per position, before anything is allocated: the layout.
        let (sliding, full) = cache.bytes_per_position();
        assert_eq!(
            sliding as u64, formula.sliding_bytes_per_token,
            "{variant}: sliding bytes per token"
        );
        assert_eq!(
            full as u64, formula.full_bytes_per_token_single_tensor_k_eq_v,
            "{variant}: full-layer bytes per token (one tensor on K=V layers)"
        );
        // The real allocation after one growth block of positions.
        feed(&mut cache, &plan, GROWTH_BLOCK);
        let (sliding_bytes, full_bytes) = cache.allocated_bytes();
        assert_eq!(
            full_bytes as u64,
            GROWTH_BLOCK as u64 * formula.full_bytes_per_token_single_tensor_k_eq_v,
            "{variant}: full layers allocate exactly their bytes per token"
        );
        assert_eq!(
            sliding_bytes as u64,
            GROWTH_BLOCK.min(window) as u64 * formula.sliding_bytes_per_token,
            "{variant}: sliding layers allocate exactly their bytes per token"
        );
        // K=V layers (the global layers of 31B and 26B-A4B: head dim 512, p-RoPE 0.25, so
        // 64 rotated pairs) keep a cos and a sin per rotated pair and cached position:
        // 512 bytes per position and layer; 10 such layers on 31B, 5 on 26B-A4B.
        let k_eq_v_layers = match variant {
            "31b" => 10,
            "26b-a4b" => 5,
            _ => 0,
        };
        assert_eq!(
            cache.angle_bytes_per_position(),
            (0, k_eq_v_layers * 512),
            "{variant}: K=V angle bytes per position"
        );
        assert_eq!(
            cache.angle_table_bytes(),
            (0, GROWTH_BLOCK * k_eq_v_layers * 512),
            "{variant}: K=V angle tables allocate exactly their bytes per position"
        );
    }
}

#[test]
fn kv_cache_sliding_layers_stop_at_the_window_e2b() {
    let config = ModelConfig::from_dir(&common::test_data_dir().join("released/e2b")).unwrap();
    let plan = ModelPlan::from_config(&config.text);
    let window = config.text.sliding_window;
    let formula = cache_footprint(&plan, window, BYTES_PER_ELEMENT as u64);
    let mut cache = KvCache::new(&plan, |_| Vec::new(), |_| Vec::new());
    for _ in 0..5 {
        feed(&mut cache, &plan, 150); // 750 positions > W = 512
    }
    let (sliding_bytes, full_bytes) = cache.allocated_bytes();
    assert_eq!(
        sliding_bytes as u64, formula.sliding_bytes_at_full_window,
        "sliding layers hold exactly W positions"
    );
    assert_eq!(
        full_bytes as u64,
        750u64.div_ceil(GROWTH_BLOCK as u64) * GROWTH_BLOCK as u64 * formula.full_bytes_per_token,
        "full layers grow with the sequence, in blocks"
    );
}
