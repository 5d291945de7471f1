//! Near ties at the top-k boundary of a mixture-of-experts router (26B-A4B): when a correct
//! port's float rounding chooses another expert than ours, and how `compare` keeps judging it.
//!
//! Each token's router keeps the `k` experts of largest probability `p`. Where the k-th and the
//! (k+1)-th are nearly equal, a port within float noise of the reference may keep the other
//! one; its `top_k_index` then holds a different *set* of experts for that token, and its MoE
//! output, and everything after, is that of another valid computation. Measured on a
//! real-dimension 26B-A4B with random weights (`cargo xtask memory --variant 26b-a4b`), our own
//! optimized engine does this at one token of 128 by layer 7: a fixed comparison calls the
//! correct engine broken.
//!
//! So a set difference is judged as a near tie when
//!
//! ```text
//! ln p_d − ln p_c ≤ 4 · max(δ, τ)        for the expected-only experts d and candidate-only c
//! ```
//!
//! with `δ` the largest `|ln w_cand − ln w_exp|` over the *same* layer's tokens whose set
//! agrees (the router noise this port actually shows: a log-weight difference is a difference
//! of two logit errors, as `ln p_d − ln p_c` is) and `τ` the fixed tolerance of that layer's
//! `top_k_weights`. The factor 4 leaves room for the tipping token's own noise being larger
//! than the largest elsewhere in the layer (two logits moving apart, each up to twice the
//! typical worst). The reference applies the rule as it reaches each MoE layer
//! ([`candidate_referee`]): when every differing token of the layer is such a tie, it follows
//! the candidate's experts there ([`gemma4_reference::forced_routing`]) and goes on, so one run
//! follows every tipped tie; the report names every followed token. ([`judge_layer`] applies
//! the same rule to a finished run, the fallback `compare` re-runs with [`force_ties`].) A router bug (the wrong input, a missing scale, a wrong top-k) changes
//! the set of many tokens by wide gaps, or leaves no agreeing token to measure noise on, and is
//! still reported.

use gemma4_reference::dump::ActivationDump;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use gemma4_reference::forced_routing::{ForcedRouting, Referee, RouterLog};
use ndarray::{Array2, ArrayView1, ArrayView2, Ix2};

/// How much wider than the measured router noise a tipped tie may be (see the module docs).
const TIE_NOISE_FACTOR: f64 = 4.0;

/// One token whose experts the candidate chose differently, in a near tie.
#[derive(Clone, Debug, PartialEq)]
pub struct TippedTie {
    pub position: usize,
    /// The expected set's experts the candidate did not choose, and the candidate's in their
    /// place.
    pub expected_only: Vec<usize>,
    pub candidate_only: Vec<usize>,
    /// `max ln p_d − min ln p_c` in the expected router's probabilities.
    pub gap: f64,
    /// The candidate's whole set (what the reference is re-run with).
    pub candidate_set: Vec<usize>,
}

/// The verdict on one layer's set differences.
#[derive(Clone, Debug, PartialEq)]
pub enum LayerTies {
    /// Every differing token is a near tie; `allowance` is `4 · max(δ, τ)`.
    NearTies {
        layer: usize,
        ties: Vec<TippedTie>,
        allowance: f64,
    },
    /// Not (all) near ties: why, for the report.
    Not(String),
}

/// The MoE layer whose `router.top_k_index` is `name` (`layers.{i}.router.top_k_index`).
pub fn router_index_layer(name: &str) -> Option<usize> {
    name.strip_prefix("layers.")?
        .strip_suffix(".router.top_k_index")?
        .parse()
        .ok()
}

/// Judges the set differences of `layer`'s `router.top_k_index` between `expected` (with the
/// router probabilities `log` of the run that made it) and `candidate`; `tolerance` is the fixed
/// tolerance of that layer's `top_k_weights`. Row `t` of a prompt tensor is position `t`.
pub fn judge_layer(
    layer: usize,
    expected: &ActivationDump,
    candidate: &ActivationDump,
    log: &RouterLog,
    tolerance: f64,
) -> LayerTies {
    let index_name = format!("layers.{layer}.router.top_k_index");
    let weights_name = format!("layers.{layer}.router.top_k_weights");
    let ids = |dump: &ActivationDump| -> Option<Array2<i64>> {
        dump.get(&index_name)?
            .as_i64()?
            .view()
            .into_dimensionality::<Ix2>()
            .ok()
            .map(|a| a.to_owned())
    };
    let weights = |dump: &ActivationDump| -> Option<Array2<f32>> {
        dump.get(&weights_name)?
            .as_f32()?
            .view()
            .into_dimensionality::<Ix2>()
            .ok()
            .map(|a| a.to_owned())
    };
    let (Some(expected_ids), Some(candidate_ids)) = (ids(expected), ids(candidate)) else {
        return LayerTies::Not(format!(
            "{index_name} is not a [T, k] index tensor on both sides"
        ));
    };
    let (Some(expected_weights), Some(candidate_weights)) = (weights(expected), weights(candidate))
    else {
        return LayerTies::Not(format!(
            "{weights_name} is missing on one side: the router noise cannot be measured"
        ));
    };
    judge_sets(
        layer,
        RouterChoice {
            ids: expected_ids.view(),
            weights: expected_weights.view(),
        },
        RouterChoice {
            ids: candidate_ids.view(),
            weights: candidate_weights.view(),
        },
        |t| log.probabilities(layer, t).map(|p| p.view()),
        tolerance,
    )
}

/// One side's router choice for the rows of a layer: `top_k_index` and `top_k_weights`, both
/// `[T, k]`, each row in that side's own order.
#[derive(Clone, Copy, Debug)]
pub struct RouterChoice<'a> {
    pub ids: ArrayView2<'a, i64>,
    pub weights: ArrayView2<'a, f32>,
}

/// The judgement of [`judge_layer`] on arrays: `expected` is the reference's choice, with its
/// router probabilities `[E]` of row `t` given by `probabilities(t)`, `candidate` the port's.
pub fn judge_sets<'p>(
    layer: usize,
    expected: RouterChoice,
    candidate: RouterChoice,
    probabilities: impl Fn(usize) -> Option<ArrayView1<'p, f32>>,
    tolerance: f64,
) -> LayerTies {
    let index_name = format!("layers.{layer}.router.top_k_index");
    let weights_name = format!("layers.{layer}.router.top_k_weights");
    if expected.ids.dim() != candidate.ids.dim() {
        return LayerTies::Not(format!("{index_name} differs in shape"));
    }
    if expected.weights.dim() != expected.ids.dim() || candidate.weights.dim() != expected.ids.dim()
    {
        return LayerTies::Not(format!(
            "{weights_name} does not match {index_name} in shape"
        ));
    }
    let set = |row: ArrayView1<i64>| {
        let mut s: Vec<i64> = row.to_vec();
        s.sort_unstable();
        s
    };
    let (agreeing, differing): (Vec<usize>, Vec<usize>) = (0..expected.ids.nrows())
        .partition(|&t| set(expected.ids.row(t)) == set(candidate.ids.row(t)));
    if differing.is_empty() {
        return LayerTies::Not(format!(
            "{index_name}: the same experts, ranked differently"
        ));
    }
    if agreeing.is_empty() {
        return LayerTies::Not(format!(
            "{index_name}: every token's experts differ, which no near tie explains"
        ));
    }

    // δ: the router noise on the tokens whose set agrees, each candidate weight set against the
    // expected weight of the same expert.
    let Some(noise) = log_weight_noise(expected, candidate, &agreeing) else {
        return LayerTies::Not(format!(
            "{weights_name} holds a zero, negative or non-finite weight where the experts agree"
        ));
    };
    let allowance = TIE_NOISE_FACTOR * noise.max(tolerance);

    let mut ties = Vec::new();
    for &t in &differing {
        let Some(probabilities) = probabilities(t) else {
            return LayerTies::Not(format!(
                "the reference's router probabilities of layer {layer}, token {t} were not recorded"
            ));
        };
        let (expected_set, candidate_set) = (set(expected.ids.row(t)), set(candidate.ids.row(t)));
        let expected_only: Vec<usize> = expected_set
            .iter()
            .filter(|e| !candidate_set.contains(e))
            .map(|&e| e as usize)
            .collect();
        let candidate_only: Vec<usize> = candidate_set
            .iter()
            .filter(|c| !expected_set.contains(c))
            .map(|&c| c as usize)
            .collect();
        let experts = probabilities.len();
        if candidate_set
            .iter()
            .any(|&c| c < 0 || c as usize >= experts)
            || has_duplicates(&candidate_set)
        {
            return LayerTies::Not(format!(
                "{index_name}, token {t}: the candidate's experts {candidate_set:?} are not {} distinct ids below {experts}",
                candidate_set.len()
            ));
        }
        let ln = |e: usize| f64::from(probabilities[e]).ln();
        // The worst swap: our most probable expert that the candidate dropped against the
        // least probable one it took instead.
        let most_probable_dropped = expected_only
            .iter()
            .map(|&d| ln(d))
            .fold(f64::NEG_INFINITY, f64::max);
        let least_probable_taken = candidate_only
            .iter()
            .map(|&c| ln(c))
            .fold(f64::INFINITY, f64::min);
        let gap = most_probable_dropped - least_probable_taken;
        // A NaN gap (no probabilities) is not a near tie either.
        if gap.is_nan() || gap > allowance {
            return LayerTies::Not(format!(
                "{index_name}, token {t}: the candidate chose expert(s) {candidate_only:?} over {expected_only:?}, {gap:.2e} below them in log-probability, beyond a near tie (4 × the router noise elsewhere in the layer, {allowance:.2e})"
            ));
        }
        ties.push(TippedTie {
            position: t,
            expected_only,
            candidate_only,
            gap,
            candidate_set: candidate_set.iter().map(|&c| c as usize).collect(),
        });
    }
    LayerTies::NearTies {
        layer,
        ties,
        allowance,
    }
}

/// `max |ln c − ln e|` over `rows` of the two sides' weights, each candidate weight set against
/// the expected weight of the same expert (`None` when a weight there is not positive and
/// finite: no noise estimate then).
fn log_weight_noise(
    expected: RouterChoice,
    candidate: RouterChoice,
    rows: &[usize],
) -> Option<f64> {
    let mut noise = 0.0f64;
    for &t in rows {
        for (slot, &expert) in expected.ids.row(t).iter().enumerate() {
            let other = candidate.ids.row(t).iter().position(|&c| c == expert)?;
            let e = f64::from(expected.weights[[t, slot]]);
            let c = f64::from(candidate.weights[[t, other]]);
            if !(e > 0.0 && c > 0.0 && e.is_finite() && c.is_finite()) {
                return None;
            }
            noise = noise.max((c.ln() - e.ln()).abs());
        }
    }
    Some(noise)
}

fn has_duplicates(sorted: &[i64]) -> bool {
    sorted.windows(2).any(|w| w[0] == w[1])
}

/// Adds `ties` to `forced` and says what was done, for the report.
pub fn force_ties(
    forced: &mut ForcedRouting,
    layer: usize,
    ties: &[TippedTie],
    allowance: f64,
) -> String {
    for tie in ties {
        forced.force(layer, tie.position, tie.candidate_set.clone());
    }
    describe_ties(layer, ties, allowance)
}

/// The report's note on `ties` followed at `layer`.
fn describe_ties(layer: usize, ties: &[TippedTie], allowance: f64) -> String {
    let described: Vec<String> = ties
        .iter()
        .map(|tie| {
            format!(
                "token {} chose {:?} over {:?} (log-probability gap {:.2e})",
                tie.position, tie.candidate_only, tie.expected_only, tie.gap
            )
        })
        .collect();
    format!(
        "layers.{layer}.router: the candidate chose other experts at {} token(s), each a near tie in the reference's router (gap within {allowance:.2e}, 4 × the router noise on the layer's other tokens): {}; the reference followed the candidate's choice there, and everything after is judged against that run",
        ties.len(),
        described.join("; ")
    )
}

/// A [`Referee`] that follows `candidate`'s expert choices wherever they differ from the
/// reference's by near ties only (the rule of [`judge_sets`], applied to each MoE layer as the
/// reference reaches it), so that one reference run follows every tipped tie of the prompt.
/// `tolerance(layer)` is the fixed tolerance of that layer's `top_k_weights`; each layer it
/// follows adds its note to `notes`. A layer whose differences are not all near ties is left
/// alone (the comparison then reports it).
pub fn candidate_referee(
    candidate: &ActivationDump,
    tolerance: impl Fn(usize) -> f64,
    notes: Rc<RefCell<Vec<String>>>,
) -> Referee {
    let mut layers: BTreeMap<usize, (Array2<i64>, Array2<f32>, f64)> = BTreeMap::new();
    for name in candidate.names_in_model_order() {
        let Some(layer) = router_index_layer(name) else {
            continue;
        };
        let weights_name = format!("layers.{layer}.router.top_k_weights");
        let ids = candidate.get(name).and_then(|t| t.as_i64()).and_then(|a| {
            a.view()
                .into_dimensionality::<Ix2>()
                .ok()
                .map(|a| a.to_owned())
        });
        let weights = candidate
            .get(&weights_name)
            .and_then(|t| t.as_f32())
            .and_then(|a| {
                a.view()
                    .into_dimensionality::<Ix2>()
                    .ok()
                    .map(|a| a.to_owned())
            });
        if let (Some(ids), Some(weights)) = (ids, weights) {
            layers.insert(layer, (ids, weights, tolerance(layer)));
        }
    }
    Box::new(move |layer, positions, routing| {
        let Some((candidate_ids, candidate_weights, tolerance)) = layers.get(&layer) else {
            return Vec::new();
        };
        // The rows the candidate has (prompt positions; decode steps are not in its dump).
        let rows: Vec<usize> = (0..positions.len())
            .filter(|&r| positions[r] < candidate_ids.nrows())
            .collect();
        let k = routing.top_k_index.ncols();
        if rows.is_empty()
            || candidate_ids.ncols() != k
            || candidate_weights.dim() != candidate_ids.dim()
        {
            return Vec::new();
        }
        let ours_ids = Array2::from_shape_fn((rows.len(), k), |(i, s)| {
            routing.top_k_index[[rows[i], s]] as i64
        });
        let ours_weights = Array2::from_shape_fn((rows.len(), k), |(i, s)| {
            routing.top_k_weights[[rows[i], s]]
        });
        let theirs_ids = Array2::from_shape_fn((rows.len(), k), |(i, s)| {
            candidate_ids[[positions[rows[i]], s]]
        });
        let theirs_weights = Array2::from_shape_fn((rows.len(), k), |(i, s)| {
            candidate_weights[[positions[rows[i]], s]]
        });
        let verdict = judge_sets(
            layer,
            RouterChoice {
                ids: ours_ids.view(),
                weights: ours_weights.view(),
            },
            RouterChoice {
                ids: theirs_ids.view(),
                weights: theirs_weights.view(),
            },
            |i| rows.get(i).map(|&r| routing.probabilities.row(r)),
            *tolerance,
        );
        let LayerTies::NearTies {
            layer,
            mut ties,
            allowance,
        } = verdict
        else {
            return Vec::new();
        };
        let decisions = ties
            .iter_mut()
            .map(|tie| {
                let row = rows[tie.position];
                tie.position = positions[row];
                (row, tie.candidate_set.clone())
            })
            .collect();
        notes
            .borrow_mut()
            .push(describe_ties(layer, &ties, allowance));
        decisions
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use gemma4_reference::forced_routing::{steer, with_forced_routing};
    use gemma4_reference::moe::Routing;
    use ndarray::{arr2, Array1, Array2};

    /// Router probabilities over 4 experts for 3 tokens, k = 2; token 1's 2nd and 3rd experts
    /// are within `gap` in log-probability.
    fn probabilities(gap: f32) -> Array2<f32> {
        let near = 0.3 * (-gap).exp();
        arr2(&[
            [0.5, 0.3, 0.15, 0.05],
            [0.4, 0.3, near, 0.3 - near],
            [0.05, 0.15, 0.3, 0.5],
        ])
    }

    /// The reference's dump and router log (the router's own choice everywhere).
    fn reference(gap: f32) -> (ActivationDump, RouterLog) {
        let routing = Routing {
            top_k_index: Array2::zeros((3, 2)),
            top_k_weights: Array2::zeros((3, 2)),
            probabilities: probabilities(gap),
        };
        let (routing, log) = with_forced_routing(ForcedRouting::default(), || {
            let mut routing = routing;
            for (t, set) in [[0usize, 1], [0, 1], [3, 2]].iter().enumerate() {
                routing.choose(t, set, Array1::ones(4).view());
            }
            steer(5, &[0, 1, 2], routing, Array1::ones(4).view())
        });
        (dump_of(&routing), log)
    }

    fn dump_of(routing: &Routing) -> ActivationDump {
        let mut dump = ActivationDump::default();
        dump.insert_i64(
            "layers.5.router.top_k_index",
            routing.top_k_index.mapv(|e| e as i64).into_dyn(),
        );
        dump.insert_f32(
            "layers.5.router.top_k_weights",
            routing.top_k_weights.clone().into_dyn(),
        );
        dump
    }

    /// A candidate that chose experts `{0, 2}` for token 1, its weights off by `noise`
    /// (relative) elsewhere.
    fn candidate(gap: f32, noise: f32) -> ActivationDump {
        let mut routing = Routing {
            top_k_index: Array2::zeros((3, 2)),
            top_k_weights: Array2::zeros((3, 2)),
            probabilities: probabilities(gap),
        };
        for (t, set) in [[0usize, 1], [0, 2], [3, 2]].iter().enumerate() {
            routing.choose(t, set, Array1::ones(4).view());
        }
        routing
            .top_k_weights
            .row_mut(0)
            .mapv_inplace(|w| w * (1.0 + noise));
        dump_of(&routing)
    }

    #[test]
    fn a_tipped_near_tie_is_forgiven_and_forced() {
        let (expected, log) = reference(1e-4);
        let verdict = judge_layer(5, &expected, &candidate(1e-4, 1e-4), &log, 1e-5);
        let LayerTies::NearTies { ties, .. } = verdict else {
            panic!("{verdict:?}")
        };
        assert_eq!(ties.len(), 1);
        assert_eq!(
            (ties[0].position, ties[0].candidate_set.clone()),
            (1, vec![0, 2])
        );
        assert_eq!(
            (
                ties[0].expected_only.clone(),
                ties[0].candidate_only.clone()
            ),
            (vec![1], vec![2])
        );
        let mut forced = ForcedRouting::default();
        let note = force_ties(&mut forced, 5, &ties, 4e-4);
        assert_eq!(forced.get(5, 1), Some(&[0, 2][..]));
        assert!(note.contains("token 1 chose [2] over [1]"), "{note}");
    }

    #[test]
    fn a_wide_gap_is_a_divergence() {
        // The same swap with a gap of 0.1 in log-probability, router noise 1e-4 elsewhere.
        let (expected, log) = reference(0.1);
        let verdict = judge_layer(5, &expected, &candidate(0.1, 1e-4), &log, 1e-5);
        assert!(
            matches!(&verdict, LayerTies::Not(why) if why.contains("beyond a near tie")),
            "{verdict:?}"
        );
    }

    #[test]
    fn noisy_weights_elsewhere_widen_the_allowance() {
        // Gap 1e-2: beyond 4 × 1e-4 noise, within 4 × 1e-2.
        let (expected, log) = reference(1e-2);
        assert!(matches!(
            judge_layer(5, &expected, &candidate(1e-2, 1e-4), &log, 1e-5),
            LayerTies::Not(_)
        ));
        assert!(matches!(
            judge_layer(5, &expected, &candidate(1e-2, 1e-2), &log, 1e-5),
            LayerTies::NearTies { .. }
        ));
    }

    #[test]
    fn every_token_differing_is_not_a_tie() {
        let (expected, log) = reference(1e-4);
        let mut all = candidate(1e-4, 0.0);
        all.insert_i64(
            "layers.5.router.top_k_index",
            arr2(&[[2i64, 3], [2, 3], [0, 1]]).into_dyn(),
        );
        let verdict = judge_layer(5, &expected, &all, &log, 1e-5);
        assert!(
            matches!(&verdict, LayerTies::Not(why) if why.contains("every token")),
            "{verdict:?}"
        );
    }

    #[test]
    fn layer_of_an_index_tensor_name() {
        assert_eq!(router_index_layer("layers.17.router.top_k_index"), Some(17));
        assert_eq!(router_index_layer("layers.17.router.top_k_weights"), None);
        assert_eq!(router_index_layer("input_ids"), None);
    }
}
