//! Attention masks of the text decoder (shared spec: text §5.5, §15.5).
//!
//! Keys and queries are identified by absolute positions `j` and `i`.
//! - Full layers: key `j` is visible to query `i` iff `j ≤ i` (causal).
//! - Sliding layers: iff `j ≤ i` **and** `i − j < W`: the window holds exactly `W` keys, the
//!   query itself included; `i − j = W` is masked.

use crate::faults::{fault_active, Fault};
use crate::layer_plan::LayerPlan;

/// May the query at `query_position` attend to the key at `key_position` in this layer?
pub fn key_is_visible(layer: &LayerPlan, query_position: usize, key_position: usize) -> bool {
    if key_position > query_position {
        return false;
    }
    match layer.sliding_window {
        None => true,
        Some(window) => {
            let window = if fault_active(Fault::SlidingWindowPlusOne) {
                window + 1
            } else if fault_active(Fault::SlidingWindowMinusOne) {
                window.saturating_sub(1).max(1)
            } else {
                window
            };
            query_position - key_position < window
        }
    }
}
