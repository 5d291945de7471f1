//! The mixture-of-experts block of 26B-A4B (shared spec: text §9, §15.13).
//!
//! With `h₁` the residual stream after attention (**not** normalised):
//!
//! ```text
//! r = RMSNorm_∅(h₁) ⊙ router.scale · D^(−1/2)
//! p = softmax(r · router.projᵀ)                      over all E experts, float32
//! S = the k experts of largest p, highest first
//! w_e = p_e / Σ_{e'∈S} p_e' · per_expert_scale[e]    (renormalise, then scale)
//! x₂ = RMSNorm_{pre_feedforward_layernorm_2}(h₁)
//! y_e = down_proj[e] · (gelu_tanh(g) ⊙ u),  [g; u] = gate_up_proj[e] · x₂  (gate rows first)
//! moe(h₁) = Σ_{e∈S} w_e · y_e
//! ```
//!
//! The layer then adds this to the dense (shared) MLP branch, each after its own post-norm
//! (`post_feedforward_layernorm_2` here, `_1` for the dense branch; see `decoder_layer`).

use ndarray::{s, Array1, Array2, ArrayView1};

use crate::checkpoint::MoeWeights;
use crate::config::MoeConfig;
use crate::faults::{fault_active, Fault};
use crate::gelu::gelu_tanh;
use crate::linear::linear;
use crate::rms_norm::rms_norm_rows;

/// The router's choice for every token.
#[derive(Clone, Debug)]
pub struct Routing {
    /// `[T, k]`: chosen experts, highest probability first.
    pub top_k_index: Array2<usize>,
    /// `[T, k]`: their final weights (renormalised, per-expert scale applied).
    pub top_k_weights: Array2<f32>,
    /// `[T, E]`: the router's probabilities `p` over all experts.
    pub probabilities: Array2<f32>,
}

impl Routing {
    /// Sets token `t`'s choice to `chosen` (ranked here by descending probability, ties to the
    /// lower expert index) with the weights `w_e = p_e / Σ_{e'∈S} p_e' · per_expert_scale[e]`.
    pub fn choose(&mut self, t: usize, chosen: &[usize], per_expert_scale: ArrayView1<f32>) {
        let probabilities = self.probabilities.row(t);
        let mut ranked = chosen.to_vec();
        ranked.sort_by(|&a, &b| {
            probabilities[b]
                .total_cmp(&probabilities[a])
                .then(a.cmp(&b))
        });
        let total: f32 = ranked.iter().map(|&e| probabilities[e]).sum();
        for (slot, &expert) in ranked.iter().enumerate() {
            let mut weight = probabilities[expert];
            if !fault_active(Fault::RouterNoRenormalize) {
                weight /= total;
            }
            if !fault_active(Fault::RouterPerExpertScaleIgnored) {
                weight *= per_expert_scale[expert];
            }
            self.top_k_index[[t, slot]] = expert;
            self.top_k_weights[[t, slot]] = weight;
        }
    }
}

/// Chooses `k` experts per token from the un-normalised residual `h1` (`[T, D]`).
pub fn route(h1: &Array2<f32>, weights: &MoeWeights, moe: &MoeConfig, eps: f64) -> Routing {
    let hidden_size = h1.ncols();
    let root_size = (hidden_size as f64).powf(-0.5) as f32;
    let mut router_input = rms_norm_rows(h1.view(), None, eps);
    for mut row in router_input.rows_mut() {
        for (value, &scale) in row.iter_mut().zip(weights.router_scale.iter()) {
            *value = *value * scale * root_size;
        }
    }
    let logits = linear(router_input.view(), &weights.router_proj); // [T, E]

    let (tokens, k) = (h1.nrows(), moe.top_k_experts);
    let mut routing = Routing {
        top_k_index: Array2::zeros((tokens, k)),
        top_k_weights: Array2::zeros((tokens, k)),
        probabilities: Array2::zeros(logits.dim()),
    };
    for t in 0..tokens {
        let probabilities = softmax(logits.row(t).to_owned());
        // Experts by descending probability; ties keep the lower expert index first.
        let mut order: Vec<usize> = (0..probabilities.len()).collect();
        order.sort_by(|&a, &b| {
            probabilities[b]
                .total_cmp(&probabilities[a])
                .then(a.cmp(&b))
        });
        routing.probabilities.row_mut(t).assign(&probabilities);
        routing.choose(t, &order[..k], weights.per_expert_scale.view());
    }
    routing
}

/// Weighted sum of the chosen experts' GeGLU outputs. `x`: `[T, D]` (the experts' pre-normed
/// input) → `[T, D]`.
pub fn experts(
    x: &Array2<f32>,
    routing: &Routing,
    weights: &MoeWeights,
    moe: &MoeConfig,
) -> Array2<f32> {
    let inner = moe.moe_intermediate_size;
    let mut output = Array2::<f32>::zeros(x.dim());
    for t in 0..x.nrows() {
        let token = x.row(t);
        for slot in 0..routing.top_k_index.ncols() {
            let expert = routing.top_k_index[[t, slot]];
            let gate_up = weights.gate_up_proj.slice(s![expert, .., ..]).dot(&token); // [2I]
            let hidden: Array1<f32> = (0..inner)
                .map(|r| gelu_tanh(gate_up[r]) * gate_up[inner + r])
                .collect();
            let expert_output = weights.down_proj.slice(s![expert, .., ..]).dot(&hidden); // [D]
            output
                .row_mut(t)
                .scaled_add(routing.top_k_weights[[t, slot]], &expert_output);
        }
    }
    output
}

/// Softmax of a vector in float32 (max subtracted first).
fn softmax(logits: Array1<f32>) -> Array1<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps = logits.mapv(|z| (z - max).exp());
    let total: f32 = exps.sum();
    exps / total
}
