//! One decoder layer, in the order of operations of Gemma 4 (shared spec: text §10).
//!
//! ```text
//! a  = RMSNorm_{input_layernorm}(h)
//! h₁ = h  + RMSNorm_{post_attention_layernorm}(Attention(a))          sandwich norm: on the branch
//! m  = mlp(RMSNorm_{pre_feedforward_layernorm}(h₁))                     dense models
//!    = RMSNorm_{post_feedforward_layernorm_1}(mlp(...))                 MoE models: dense (shared) branch
//!      + RMSNorm_{post_feedforward_layernorm_2}(moe(h₁))                 plus the experts (text §9)
//! h₂ = h₁ + RMSNorm_{post_feedforward_layernorm}(m)
//! h₃ = h₂ + PLE branch(h₂, ple[:, l])                                  E2B / E4B only
//! out = h₃ · layer_scalar                                              the whole residual stream
//! ```

use ndarray::{Array2, ArrayView2};

use crate::attention::attention;
use crate::checkpoint::LayerWeights;
use crate::config::TextConfig;
use crate::dump::Recorder;
use crate::error::Result;
use crate::faults::{fault_active, Fault};
use crate::forced_routing::steer;
use crate::kv_cache::KvCache;
use crate::layer_plan::LayerPlan;
use crate::mask::ImageBlocks;
use crate::mlp::mlp;
use crate::moe::{experts, route};
use crate::ple::per_layer_embedding_branch;
use crate::rms_norm::rms_norm;

/// `residual + RMSNorm_w(branch)`: the sandwich post-norm sits on the branch, before the add.
fn add_normed_branch(
    residual: &Array2<f32>,
    branch: &Array2<f32>,
    weight: &ndarray::Array1<f32>,
    eps: f64,
) -> Array2<f32> {
    if fault_active(Fault::PostNormAfterResidual) {
        // Bug: norm after the residual add.
        return rms_norm(&(residual + branch), weight, eps);
    }
    residual + &rms_norm(branch, weight, eps)
}

/// Runs layer `layer.index` on the residual stream `hidden` (`[T, D]`).
///
/// `per_layer_input`: this layer's PLE slice `[T, P]` (PLE models only); `positions`: the
/// tokens' absolute positions; `inverse_frequencies`: RoPE table of this layer's type;
/// `blocks`: the pass's image blocks (bidirectional on sliding layers).
#[allow(clippy::too_many_arguments)]
pub fn decoder_layer(
    layer: &LayerPlan,
    weights: &LayerWeights,
    config: &TextConfig,
    hidden: &Array2<f32>,
    per_layer_input: Option<ArrayView2<f32>>,
    positions: &[usize],
    inverse_frequencies: &[f32],
    blocks: &ImageBlocks,
    cache: &mut KvCache,
    recorder: &mut Recorder,
) -> Result<Array2<f32>> {
    let eps = config.rms_norm_eps;
    let name = |part: &str| format!("layers.{}.{part}", layer.index);

    // 1–3. Attention block with sandwich norms.
    let normed = rms_norm(hidden, &weights.input_layernorm, eps);
    let attention_output = attention(
        layer,
        &weights.attention,
        &normed,
        positions,
        inverse_frequencies,
        blocks,
        eps,
        cache,
        recorder,
    )?;
    let h1 = add_normed_branch(
        hidden,
        &attention_output,
        &weights.post_attention_layernorm,
        eps,
    );

    // 4. Feed-forward block: the dense MLP, plus the experts in MoE models.
    let moe_weights = weights.moe.as_ref().filter(|_| layer.has_moe);
    let dense_missing = moe_weights.is_some() && fault_active(Fault::SharedMlpMissing);
    let dense_output = if dense_missing {
        None
    } else {
        let output = mlp(
            &rms_norm(&h1, &weights.pre_feedforward_layernorm, eps),
            &weights.mlp,
        );
        recorder.record(&name("mlp.output"), output.view().into_dyn())?;
        Some(output)
    };
    let feed_forward = match (moe_weights, &config.moe) {
        (Some(moe_weights), Some(moe_config)) => {
            let expert_input = rms_norm(&h1, &moe_weights.pre_feedforward_layernorm_2, eps);
            // The router reads the un-normalised residual h₁ (text §9 step 2).
            let router_input = if fault_active(Fault::RouterOnNormedInput) {
                &expert_input
            } else {
                &h1
            };
            let routing = route(router_input, moe_weights, moe_config, eps);
            // Diagnosis only (`gemma4 compare`): a no-op outside a forced-routing scope.
            let routing = steer(
                layer.index,
                positions,
                routing,
                moe_weights.per_expert_scale.view(),
            );
            recorder.record_indices(
                &name("router.top_k_index"),
                routing.top_k_index.mapv(|e| e as i64).into_dyn(),
            );
            recorder.record(
                &name("router.top_k_weights"),
                routing.top_k_weights.view().into_dyn(),
            )?;
            let expert_output = experts(&expert_input, &routing, moe_weights, moe_config);
            recorder.record(&name("moe.output"), expert_output.view().into_dyn())?;
            let expert_branch = rms_norm(
                &expert_output,
                &moe_weights.post_feedforward_layernorm_2,
                eps,
            );
            match dense_output {
                Some(dense) => {
                    rms_norm(&dense, &moe_weights.post_feedforward_layernorm_1, eps) + expert_branch
                }
                None => expert_branch,
            }
        }
        _ => dense_output.expect("dense models always run the MLP"),
    };
    // 5. Feed-forward residual.
    let h2 = add_normed_branch(&h1, &feed_forward, &weights.post_feedforward_layernorm, eps);

    // 6. Per-Layer Embedding branch.
    let h3 = match (&weights.per_layer_embedding, per_layer_input) {
        (Some(ple_weights), Some(layer_input)) if !fault_active(Fault::PleMissing) => {
            &h2 + &per_layer_embedding_branch(&h2, layer_input, ple_weights, eps)
        }
        _ => h2,
    };

    // 7. layer_scalar scales the whole residual stream.
    let output = if fault_active(Fault::LayerScalarIgnored) {
        h3
    } else {
        h3 * weights.layer_scalar
    };
    recorder.record(&name("output"), output.view().into_dyn())?;
    Ok(output)
}
