//! One decoder layer, in Gemma 4's order of operations (shared spec: text §10).
//!
//! ```text
//! a  = RMSNorm_{input_layernorm}(h)
//! h₁ = h  + RMSNorm_{post_attention_layernorm}(Attention(a))            fused: norm + add
//! m  = mlp(RMSNorm_{pre_feedforward_layernorm}(h₁))                       dense models
//!    = RMSNorm_{post_feedforward_layernorm_1}(mlp(...)) + RMSNorm_{..._2}(moe(h₁))   MoE models
//! h₂ = h₁ + RMSNorm_{post_feedforward_layernorm}(m)                       fused: norm + add
//! out = (h₂ + PLE branch(h₂, ple[:, l])) · layer_scalar                   fused: norm + add + scale
//! ```

use gemma4_reference::config::TextConfig;
use gemma4_reference::dump::Recorder;
use gemma4_reference::layer_plan::LayerPlan;
use gemma4_reference::Result;
use ndarray::{ArrayD, IxDyn};

use crate::attention::{attention, record};
use crate::checkpoint::LayerWeights;
use crate::kv_cache::KvCache;
use crate::mask::ImageBlocks;
use crate::mlp::mlp;
use crate::moe::{experts, route};
use crate::ple::add_per_layer_embedding_branch;
use crate::rms_norm::{add_normed, rms_norm, rms_norm_in_place};
use crate::rope::RopeRows;

/// Runs layer `layer.index` on the residual stream `hidden` (`[T, D]`, updated in place).
///
/// `per_layer_input`: this layer's PLE slice `[T, P]` (PLE models); `positions`: the tokens'
/// absolute positions; `rope`: their rows of the pass's RoPE table of this layer's type;
/// `blocks`: the pass's image blocks (bidirectional on sliding layers, multimodal §3.3).
///
/// `outputs_from`: the rows before it only give their keys and values to the cache (a producer
/// layer whose later outputs are wanted for the last rows only, `Logits::Last`); the layer's
/// output is computed, and `hidden` updated, for rows `outputs_from..` only (the rows before are
/// left as they were).
#[allow(clippy::too_many_arguments)]
pub fn decoder_layer(
    layer: &LayerPlan,
    weights: &LayerWeights,
    config: &TextConfig,
    hidden: &mut [f32],
    per_layer_input: Option<&[f32]>,
    positions: &[usize],
    outputs_from: usize,
    rope: RopeRows,
    blocks: &ImageBlocks,
    cache: &mut KvCache,
    recorder: &mut Recorder,
) -> Result<()> {
    let eps = config.rms_norm_eps;
    let d = config.hidden_size;
    let name = |part: &str| format!("layers.{}.{part}", layer.index);

    // 1–3. Attention block with sandwich norms.
    let normed = rms_norm(hidden, d, &weights.input_layernorm, eps);
    let attention_output = attention(
        layer,
        &weights.attention,
        &normed,
        positions,
        outputs_from,
        rope,
        blocks,
        eps,
        cache,
        recorder,
    )?;
    drop(normed);
    // From here on, rows `outputs_from..` only.
    let all_tokens = positions.len();
    let hidden = &mut hidden[outputs_from * d..];
    let per_layer_input =
        per_layer_input.map(|ple| &ple[outputs_from * (ple.len() / all_tokens)..]);
    let tokens = all_tokens - outputs_from;
    add_normed(
        hidden,
        &attention_output,
        d,
        &weights.post_attention_layernorm,
        eps,
    );

    // 4. Feed-forward block: the dense MLP, plus the experts in MoE models.
    let dense_input = rms_norm(hidden, d, &weights.pre_feedforward_layernorm, eps);
    let mut feed_forward = mlp(&dense_input, tokens, &weights.mlp);
    record(recorder, &name("mlp.output"), &[tokens, d], &feed_forward)?;
    if let (Some(moe_weights), Some(moe_config), true) = (&weights.moe, &config.moe, layer.has_moe)
    {
        let expert_input = rms_norm(hidden, d, &moe_weights.pre_feedforward_layernorm_2, eps);
        // The router reads the un-normalised residual h₁ (text §9 step 2).
        let routing = route(hidden, tokens, moe_weights, moe_config.top_k_experts, eps);
        let k = routing.k;
        recorder.record_indices(
            &name("router.top_k_index"),
            ArrayD::from_shape_vec(
                IxDyn(&[tokens, k]),
                routing.top_k_index.iter().map(|&e| e as i64).collect(),
            )
            .expect("[T, k]"),
        );
        record(
            recorder,
            &name("router.top_k_weights"),
            &[tokens, k],
            &routing.top_k_weights,
        )?;
        let mut expert_output = experts(
            &expert_input,
            tokens,
            &routing,
            moe_weights,
            moe_config.moe_intermediate_size,
        );
        record(recorder, &name("moe.output"), &[tokens, d], &expert_output)?;
        // m = RMSNorm_1(dense) + RMSNorm_2(experts)
        rms_norm_in_place(
            &mut feed_forward,
            d,
            Some(&moe_weights.post_feedforward_layernorm_1),
            eps,
        );
        rms_norm_in_place(
            &mut expert_output,
            d,
            Some(&moe_weights.post_feedforward_layernorm_2),
            eps,
        );
        for (m, e) in feed_forward.iter_mut().zip(&expert_output) {
            *m += e;
        }
    }
    // 5. Feed-forward residual.
    add_normed(
        hidden,
        &feed_forward,
        d,
        &weights.post_feedforward_layernorm,
        eps,
    );

    // 6–7. PLE branch and layer_scalar (the whole residual stream).
    match (&weights.per_layer_embedding, per_layer_input) {
        (Some(ple_weights), Some(layer_input)) => add_per_layer_embedding_branch(
            hidden,
            tokens,
            layer_input,
            ple_weights,
            eps,
            weights.layer_scalar,
        ),
        _ => hidden.iter_mut().for_each(|v| *v *= weights.layer_scalar),
    }
    record(recorder, &name("output"), &[tokens, d], hidden)
}
