//! The mixture-of-experts block of 26B-A4B (shared spec: text §9, §15.13).
//!
//! ```text
//! r = RMSNorm_∅(h₁) ⊙ router.scale · D^(−1/2)
//! p = softmax(r · router.projᵀ)                      over all E experts, float32
//! S = the k experts of largest p, highest first (ties: lower index first)
//! w_e = p_e / Σ_{e'∈S} p_e' · per_expert_scale[e]
//! y_e = down_proj[e] · (gelu_tanh(g) ⊙ u),  [g; u] = gate_up_proj[e] · x₂
//! moe = Σ_{e∈S} w_e · y_e                            (slot order)
//! ```
//!
//! Only the chosen experts run (8 of 128 per token in 26B-A4B). Tokens are **grouped by expert**:
//! each used expert multiplies all of its tokens at once (its weights are read once per pass, not
//! once per token), experts run in parallel, and the weighted sum is then taken per token in slot
//! order, independent of the thread count.

use rayon::prelude::*;

use crate::checkpoint::MoeWeights;
use crate::linear::{current_precision, linear, linear_into, with_precision, Threads};
use crate::rms_norm::rms_norm_in_place;

/// The router's choice for every token.
#[derive(Clone, Debug)]
pub struct Routing {
    /// `[T, k]` chosen experts, highest probability first.
    pub top_k_index: Vec<usize>,
    /// `[T, k]` their final weights.
    pub top_k_weights: Vec<f32>,
    pub k: usize,
}

/// Chooses `k` experts per token from the un-normalised residual `h1` (`[T, D]`).
pub fn route(h1: &[f32], tokens: usize, weights: &MoeWeights, k: usize, eps: f64) -> Routing {
    let d = h1.len() / tokens;
    let root_size = (d as f64).powf(-0.5) as f32;
    let mut router_input = h1.to_vec();
    rms_norm_in_place(&mut router_input, d, None, eps);
    for row in router_input.chunks_exact_mut(d) {
        for (value, &scale) in row.iter_mut().zip(&weights.router_scale) {
            *value = *value * scale * root_size;
        }
    }
    let experts = weights.router_proj.rows;
    let logits = linear(&router_input, tokens, &weights.router_proj); // [T, E]
    let mut top_k_index = Vec::with_capacity(tokens * k);
    let mut top_k_weights = Vec::with_capacity(tokens * k);
    for row in logits.chunks_exact(experts) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f32> = row.iter().map(|&z| (z - max).exp()).collect();
        let total: f32 = exps.iter().sum();
        let probabilities: Vec<f32> = exps.iter().map(|&e| e / total).collect();
        let mut order: Vec<usize> = (0..experts).collect();
        order.sort_by(|&a, &b| {
            probabilities[b]
                .total_cmp(&probabilities[a])
                .then(a.cmp(&b))
        });
        let chosen = &order[..k];
        let chosen_total: f32 = chosen.iter().map(|&e| probabilities[e]).sum();
        for &expert in chosen {
            top_k_index.push(expert);
            top_k_weights
                .push(probabilities[expert] / chosen_total * weights.per_expert_scale[expert]);
        }
    }
    Routing {
        top_k_index,
        top_k_weights,
        k,
    }
}

/// `Σ_slot w · expert(x)` per token, computing only the chosen experts, grouped by expert.
/// `x`: `[T, D]` (the experts' pre-normed input) → `[T, D]`.
pub fn experts(
    x: &[f32],
    tokens: usize,
    routing: &Routing,
    weights: &MoeWeights,
    inner: usize,
) -> Vec<f32> {
    let d = x.len() / tokens;
    let k = routing.k;
    // (token, slot) pairs of every expert, in token order.
    let num_experts = weights.router_proj.rows;
    let mut assignments: Vec<Vec<(usize, usize)>> = vec![Vec::new(); num_experts];
    for t in 0..tokens {
        for slot in 0..k {
            assignments[routing.top_k_index[t * k + slot]].push((t, slot));
        }
    }
    let used: Vec<(usize, &Vec<(usize, usize)>)> = assignments
        .iter()
        .enumerate()
        .filter(|(_, a)| !a.is_empty())
        .collect();
    // Each used expert: gather its tokens, [g; u] = X · gate_upᵀ, GeGLU, · downᵀ.
    // The experts run on the pool's threads: each task takes this thread's matrix-product
    // precision with it, so the kernel does not depend on which thread picks a task up.
    let precision = current_precision();
    let outputs: Vec<Vec<f32>> = used
        .par_iter()
        .map(|&(expert, pairs)| {
            with_precision(precision, || {
                let n = pairs.len();
                let mut gathered = Vec::with_capacity(n * d);
                for &(t, _) in pairs {
                    gathered.extend_from_slice(&x[t * d..(t + 1) * d]);
                }
                let gate_up = weights
                    .gate_up_proj
                    .rows_view(expert * 2 * inner, 2 * inner);
                let mut hidden = vec![0.0f32; n * 2 * inner];
                linear_into(&gathered, n, &gate_up, &mut hidden, Threads::Current);
                let mut activated = vec![0.0f32; n * inner];
                for (row, out) in hidden
                    .chunks_exact(2 * inner)
                    .zip(activated.chunks_exact_mut(inner))
                {
                    out.copy_from_slice(&row[..inner]);
                    crate::simd::geglu(out, &row[inner..]);
                }
                let down = weights.down_proj.rows_view(expert * d, d);
                let mut y = vec![0.0f32; n * d];
                linear_into(&activated, n, &down, &mut y, Threads::Current);
                y
            })
        })
        .collect();
    // Per (token, slot) expert outputs, then the weighted sum in slot order.
    let mut per_slot: Vec<Option<&[f32]>> = vec![None; tokens * k];
    for ((_, pairs), y) in used.iter().zip(&outputs) {
        for (i, &(t, slot)) in pairs.iter().enumerate() {
            per_slot[t * k + slot] = Some(&y[i * d..(i + 1) * d]);
        }
    }
    let mut output = vec![0.0f32; tokens * d];
    for t in 0..tokens {
        let row = &mut output[t * d..(t + 1) * d];
        for slot in 0..k {
            let y = per_slot[t * k + slot].expect("every slot has an expert output");
            crate::simd::scaled_add(row, routing.top_k_weights[t * k + slot], y);
        }
    }
    output
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Matrix;
    use crate::testing::{assert_close, random_values, to_array2};
    use gemma4_reference::config::MoeConfig;
    use ndarray::{Array1, Array3};

    #[test]
    fn moe_routing_and_experts_match_reference_random_weights() {
        let (tokens, d, e, k, inner) = (7, 32, 16, 4, 12);
        let router = random_values(e * d, 1, 0.5);
        let scale = random_values(d, 2, 1.0)
            .iter()
            .map(|v| 1.0 + 0.3 * v)
            .collect::<Vec<_>>();
        let per_expert: Vec<f32> = random_values(e, 3, 0.5).iter().map(|v| 1.0 + v).collect();
        let gate_up = random_values(e * 2 * inner * d, 4, 0.2);
        let down = random_values(e * d * inner, 5, 0.3);
        let h1 = random_values(tokens * d, 6, 2.0);
        let ours = MoeWeights {
            router_proj: Matrix::from_f32(e, d, router.clone()),
            router_scale: scale.clone(),
            per_expert_scale: per_expert.clone(),
            gate_up_proj: Matrix::from_f32(e * 2 * inner, d, gate_up.clone()),
            down_proj: Matrix::from_f32(e * d, inner, down.clone()),
            pre_feedforward_layernorm_2: vec![1.0; d],
            post_feedforward_layernorm_1: vec![1.0; d],
            post_feedforward_layernorm_2: vec![1.0; d],
        };
        let reference = gemma4_reference::checkpoint::MoeWeights {
            router_proj: to_array2(e, d, &router),
            router_scale: Array1::from(scale),
            per_expert_scale: Array1::from(per_expert),
            gate_up_proj: Array3::from_shape_vec((e, 2 * inner, d), gate_up).unwrap(),
            down_proj: Array3::from_shape_vec((e, d, inner), down).unwrap(),
            pre_feedforward_layernorm_2: Array1::ones(d),
            post_feedforward_layernorm_1: Array1::ones(d),
            post_feedforward_layernorm_2: Array1::ones(d),
        };
        let config = MoeConfig {
            num_experts: e,
            top_k_experts: k,
            moe_intermediate_size: inner,
        };
        let h1_array = to_array2(tokens, d, &h1);
        let expected_routing = gemma4_reference::moe::route(&h1_array, &reference, &config, 1e-6);
        let routing = route(&h1, tokens, &ours, k, 1e-6);
        let expected_index: Vec<usize> = expected_routing.top_k_index.iter().copied().collect();
        assert_eq!(routing.top_k_index, expected_index, "chosen experts");
        // Router logits are f32 dot products over D = 32 in another order (a few ulps); the
        // softmax and renormalisation keep that relative size.
        assert_close(
            "top_k_weights",
            &routing.top_k_weights,
            expected_routing.top_k_weights.as_slice().unwrap(),
            1e-6,
        );
        let got = experts(&h1, tokens, &routing, &ours, inner);
        let expected =
            gemma4_reference::moe::experts(&h1_array, &expected_routing, &reference, &config);
        assert_close("moe output", &got, expected.as_slice().unwrap(), 2e-6);
    }
}
