//! Expert choices imposed from outside, and the router's probabilities kept for inspection: the
//! hooks `gemma4 compare` needs to judge a mixture-of-experts port fairly (26B-A4B; shared spec
//! text §9).
//!
//! Top-k routing is discontinuous. When two experts' router probabilities are nearly equal at
//! the k-th place, float rounding decides which one is chosen, and a correct port may pick the
//! other one. From there on its activations are those of a *different* (equally valid)
//! computation: the MoE output of that token changes by `w·(y_a − y_b)`, far beyond rounding.
//! To keep judging such a port, `compare` has the reference follow that token's experts to the
//! port's choice, as it reaches the layer ([`Referee`], see `gemma4::compare_routing`), or
//! re-runs it with them forced ([`ForcedRouting`]); everything the port computes afterwards must
//! then match that run.
//!
//! Like [`crate::faults`], the hook is per thread and scoped ([`with_forced_routing`]); outside
//! a scope the model routes as usual and nothing is recorded. Inside the model it is one call,
//! [`steer`], right after the router.

use std::cell::RefCell;
use std::collections::BTreeMap;

use ndarray::{Array1, ArrayView1};

use crate::moe::Routing;

/// Expert sets to impose: `(layer, position) → experts` (any order; they are ranked by the
/// router's own probabilities, as the router ranks its choice).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ForcedRouting {
    experts: BTreeMap<(usize, usize), Vec<usize>>,
}

impl ForcedRouting {
    /// Imposes `experts` on the token at absolute `position` in MoE layer `layer`.
    pub fn force(&mut self, layer: usize, position: usize, experts: Vec<usize>) {
        self.experts.insert((layer, position), experts);
    }

    /// The experts imposed at `(layer, position)`, if any.
    pub fn get(&self, layer: usize, position: usize) -> Option<&[usize]> {
        self.experts.get(&(layer, position)).map(Vec::as_slice)
    }

    /// How many tokens have their experts imposed.
    pub fn len(&self) -> usize {
        self.experts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.experts.is_empty()
    }
}

/// The router's probabilities `softmax(r · router.projᵀ)` `[E]` of every token routed inside a
/// [`with_forced_routing`] scope, by `(layer, position)`, and the expert sets that were imposed.
/// A position routed twice (a prompt dumped twice) keeps its last row.
#[derive(Clone, Debug, Default)]
pub struct RouterLog {
    probabilities: BTreeMap<(usize, usize), Array1<f32>>,
    imposed: ForcedRouting,
}

impl RouterLog {
    /// The router probabilities `[E]` of the token at `position` in layer `layer`.
    pub fn probabilities(&self, layer: usize, position: usize) -> Option<&Array1<f32>> {
        self.probabilities.get(&(layer, position))
    }

    /// Every expert set that was imposed (given in advance or decided by the referee): running
    /// again under exactly these reproduces the run.
    pub fn imposed(&self) -> &ForcedRouting {
        &self.imposed
    }
}

/// Decides during the run which tokens to steer: given the MoE layer, the absolute positions of
/// the rows being routed and the router's own choice for them, returns `(row, experts)` pairs to
/// impose. `gemma4 compare` uses one to follow a port's near-tie choices layer by layer in a
/// single run, instead of one run per layer.
pub type Referee = Box<dyn Fn(usize, &[usize], &Routing) -> Vec<(usize, Vec<usize>)>>;

struct Scope {
    forced: ForcedRouting,
    referee: Option<Referee>,
    log: RouterLog,
}

thread_local! {
    static SCOPE: RefCell<Option<Scope>> = const { RefCell::new(None) };
}

/// Runs `body` with `forced` imposed on the router in this thread, and returns what the router
/// saw meanwhile. The previous scope (if any) is restored afterwards, also on panic.
pub fn with_forced_routing<R>(forced: ForcedRouting, body: impl FnOnce() -> R) -> (R, RouterLog) {
    with_refereed_routing(forced, None, body)
}

/// [`with_forced_routing`], and `referee` consulted at every MoE layer for more tokens to steer
/// (those `forced` already fixes excepted).
pub fn with_refereed_routing<R>(
    forced: ForcedRouting,
    referee: Option<Referee>,
    body: impl FnOnce() -> R,
) -> (R, RouterLog) {
    let previous = SCOPE.with(|scope| {
        scope.replace(Some(Scope {
            forced,
            referee,
            log: RouterLog::default(),
        }))
    });
    struct Restore(Option<Option<Scope>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(previous) = self.0.take() {
                SCOPE.with(|scope| *scope.borrow_mut() = previous);
            }
        }
    }
    let restore = Restore(Some(previous));
    let result = body();
    let log = SCOPE.with(|scope| {
        scope
            .borrow_mut()
            .as_mut()
            .map(|scope| std::mem::take(&mut scope.log))
            .unwrap_or_default()
    });
    drop(restore);
    (result, log)
}

/// The router's step for diagnosis: inside a [`with_forced_routing`] scope, records each token's
/// probabilities and replaces the choice of the tokens it forces, then of those its referee (if
/// any) picks (their weights computed from the same probabilities by the same rule,
/// [`Routing::choose`]); outside a scope, `routing` unchanged. `positions` are the rows'
/// absolute positions.
pub fn steer(
    layer: usize,
    positions: &[usize],
    mut routing: Routing,
    per_expert_scale: ArrayView1<f32>,
) -> Routing {
    SCOPE.with(|scope| {
        let mut scope = scope.borrow_mut();
        let Some(Scope {
            forced,
            referee,
            log,
        }) = scope.as_mut()
        else {
            return;
        };
        let k = routing.top_k_index.ncols();
        for (row, &position) in positions.iter().enumerate() {
            log.probabilities
                .insert((layer, position), routing.probabilities.row(row).to_owned());
            if let Some(experts) = forced.get(layer, position) {
                if experts.len() == k {
                    let experts = experts.to_vec();
                    routing.choose(row, &experts, per_expert_scale);
                    log.imposed.force(layer, position, experts);
                }
            }
        }
        let Some(referee) = referee else {
            return;
        };
        for (row, experts) in referee(layer, positions, &routing) {
            let Some(&position) = positions.get(row) else {
                continue;
            };
            if forced.get(layer, position).is_some() || experts.len() != k {
                continue;
            }
            routing.choose(row, &experts, per_expert_scale);
            log.imposed.force(layer, position, experts);
        }
    });
    routing
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{arr1, arr2, Array2};

    fn routing() -> Routing {
        let probabilities = arr2(&[[0.5f32, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]]);
        let ones = Array1::from_elem(4, 1.0f32);
        let mut routing = Routing {
            top_k_index: Array2::zeros((2, 2)),
            top_k_weights: Array2::zeros((2, 2)),
            probabilities,
        };
        routing.choose(0, &[0, 1], ones.view());
        routing.choose(1, &[3, 2], ones.view());
        routing
    }

    #[test]
    fn outside_a_scope_nothing_changes() {
        let steered = steer(0, &[0, 1], routing(), Array1::ones(4).view());
        assert_eq!(steered.top_k_index, routing().top_k_index);
    }

    #[test]
    fn forced_experts_are_ranked_and_weighted_by_the_router() {
        let mut forced = ForcedRouting::default();
        forced.force(3, 7, vec![2, 0]);
        let (steered, log) = with_forced_routing(forced, || {
            steer(3, &[6, 7], routing(), arr1(&[1.0, 1.0, 2.0, 1.0]).view())
        });
        // Position 6 (row 0) is not forced; position 7 (row 1) gets experts 0 and 2, ranked by
        // probability (0.3 > 0.1), renormalised over the pair, expert 2 scaled by 2.
        assert_eq!(steered.top_k_index.row(0).to_vec(), vec![0, 1]);
        assert_eq!(steered.top_k_index.row(1).to_vec(), vec![2, 0]);
        let weights = steered.top_k_weights.row(1).to_vec();
        assert!((weights[0] - 2.0 * 0.75).abs() < 1e-6 && (weights[1] - 0.25).abs() < 1e-6);
        assert_eq!(
            log.probabilities(3, 7).unwrap().to_vec(),
            vec![0.1, 0.2, 0.3, 0.4]
        );
        assert!(log.probabilities(3, 8).is_none());
        // The scope is gone afterwards.
        let after = steer(3, &[6, 7], routing(), Array1::ones(4).view());
        assert_eq!(after.top_k_index.row(1).to_vec(), vec![3, 2]);
    }
}
