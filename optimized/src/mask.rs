//! Attention masks as key ranges (shared spec: text §5.5, §15.5).
//!
//! The reference asks "is key j visible to query i?" for every pair; here a query asks once for
//! its visible range and never touches the keys outside it (no masked-out score is computed,
//! which is what keeps sliding-window attention O(W) per query):
//! - full layers: `0 ..= i`;
//! - sliding layers: `i + 1 − W ..= i` (clamped at 0): exactly `W` keys, the query's own included.

/// The visible key positions of a query at `query_position`: `first..=query_position`.
#[inline]
pub fn visible_keys(
    query_position: usize,
    sliding_window: Option<usize>,
) -> std::ops::RangeInclusive<usize> {
    let first = match sliding_window {
        Some(window) => (query_position + 1).saturating_sub(window),
        None => 0,
    };
    first..=query_position
}

#[cfg(test)]
mod tests {
    use super::*;
    use gemma4_reference::mask::{key_is_visible, ImageBlocks};

    #[test]
    fn mask_visible_range_equals_reference_mask_sliding_and_full() {
        for window in [None, Some(1), Some(4), Some(6)] {
            let layer = crate::synthetic::attention_layer(8, 2, 1, window);
            for i in 0..20 {
                for j in 0..25 {
                    assert_eq!(
                        visible_keys(i, window).contains(&j),
                        key_is_visible(&layer, i, j, &ImageBlocks::none()),
                        "window {window:?}, query {i}, key {j}"
                    );
                }
            }
        }
    }
}
