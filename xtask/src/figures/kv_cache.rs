//! Figures `kv-cache-per-token` and `kv-cache-vs-context`: the KV cache of the released models in
//! bf16, from `kv_cache::cache_footprint` on their layer plans, three ways: every layer keeping
//! its own K and V (no sharing), with KV sharing (as Hugging Face caches), and with KV sharing
//! plus a single tensor on K=V layers (as the optimized engine caches).

use gemma4_reference::kv_cache::{cache_footprint, CacheFootprint};
use gemma4_reference::layer_plan::KvSource;
use gemma4_reference::{ModelConfig, ModelPlan};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, VPos};

use super::draw::{self, FONT, SERIES};
use super::Result;

const BF16: u64 = 2;

/// The three footprints of one model: (no sharing, sharing, sharing + one tensor for K=V).
pub struct ModelCache {
    pub label: String,
    pub window: usize,
    pub max_context: usize,
    pub unshared: CacheFootprint,
    pub shared: CacheFootprint,
}

impl ModelCache {
    pub fn of(label: &str, config: &ModelConfig) -> ModelCache {
        let plan = ModelPlan::from_config(&config.text);
        let mut unshared_plan = plan.clone();
        for layer in &mut unshared_plan.layers {
            layer.kv_source = KvSource::Own {
                shared_with_consumers: false,
            };
        }
        let window = config.text.sliding_window;
        ModelCache {
            label: label.to_string(),
            window,
            max_context: config.text.max_position_embeddings,
            unshared: cache_footprint(&unshared_plan, window, BF16),
            shared: cache_footprint(&plan, window, BF16),
        }
    }

    /// Bytes per token while the context is shorter than the window: (no sharing, sharing,
    /// sharing + K=V single tensor).
    pub fn per_token(&self) -> [u64; 3] {
        [
            self.unshared.full_bytes_per_token + self.unshared.sliding_bytes_per_token,
            self.shared.full_bytes_per_token + self.shared.sliding_bytes_per_token,
            self.shared.full_bytes_per_token_single_tensor_k_eq_v
                + self.shared.sliding_bytes_per_token,
        ]
    }

    /// Cache bytes for `tokens` of context, the optimized engine's way (sliding layers hold at
    /// most `window` positions).
    pub fn bytes_at(&self, tokens: usize, footprint: &CacheFootprint, single_tensor: bool) -> f64 {
        let full = if single_tensor {
            footprint.full_bytes_per_token_single_tensor_k_eq_v
        } else {
            footprint.full_bytes_per_token
        };
        full as f64 * tokens as f64
            + footprint.sliding_bytes_per_token as f64 * tokens.min(self.window) as f64
    }
}

pub fn draw_per_token(released: &[(&str, ModelConfig)]) -> Result<String> {
    let caches: Vec<ModelCache> = released.iter().map(|(l, c)| ModelCache::of(l, c)).collect();
    let largest = caches.iter().map(|c| c.per_token()[0]).max().unwrap_or(1) as f64;
    let names = [
        "every layer its own K and V",
        "with KV sharing (as Hugging Face caches)",
        "KV sharing + one tensor on K=V layers (optimized engine)",
    ];
    let shades = [RGBColor(189, 189, 189), SERIES[0], SERIES[2]];
    draw::svg(900, 420, |canvas| {
        draw::text(
            canvas,
            "KV-cache bytes per token of context (bf16, context shorter than the sliding window)",
            (10, 16),
            14,
        )?;
        let (left, bottom, height) = (80, 330, 270.0);
        let group = 200;
        for (index, cache) in caches.iter().enumerate() {
            let x0 = left + group * index as i32;
            for (bar, bytes) in cache.per_token().iter().enumerate() {
                let x = x0 + 10 + 50 * bar as i32;
                let top = bottom - (*bytes as f64 / largest * height).round() as i32;
                draw::rect(canvas, (x, top), (x + 44, bottom), shades[bar], None)?;
                draw::label(
                    canvas,
                    &draw::binary_size(*bytes as f64),
                    (x + 22, top - 3),
                    10,
                    HPos::Center,
                    VPos::Bottom,
                )?;
            }
            draw::centred(canvas, &cache.label, (x0 + 84, bottom + 14), 13)?;
        }
        canvas.draw(&PathElement::new(
            vec![(left, bottom), (left + group * caches.len() as i32, bottom)],
            BLACK,
        ))?;
        for (index, name) in names.iter().enumerate() {
            let y = 370 + 16 * index as i32;
            draw::rect(
                canvas,
                (left, y - 6),
                (left + 12, y + 6),
                shades[index],
                None,
            )?;
            draw::text(canvas, name, (left + 18, y), 11)?;
        }
        Ok(())
    })
}

pub fn draw_vs_context(released: &[(&str, ModelConfig)]) -> Result<String> {
    let caches: Vec<ModelCache> = released.iter().map(|(l, c)| ModelCache::of(l, c)).collect();
    let longest = caches.iter().map(|c| c.max_context).max().unwrap_or(1);
    let gib = (1u64 << 30) as f64;
    let top = caches
        .iter()
        .map(|c| c.bytes_at(c.max_context, &c.shared, false) / gib)
        .fold(0.0, f64::max);
    draw::svg(900, 480, |canvas| {
        let mut chart = ChartBuilder::on(canvas)
            .caption(
                "KV cache vs context length (bf16; sliding layers hold at most their window)",
                (FONT, 15),
            )
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..longest as f64 / 1024.0, 0f64..top * 1.05)?;
        chart
            .configure_mesh()
            .x_desc("context length (thousands of tokens, 1 K = 1024)")
            .y_desc("GiB")
            .draw()?;
        for (index, cache) in caches.iter().enumerate() {
            let colour = SERIES[index % SERIES.len()];
            let steps = 256;
            let points = |single: bool| -> Vec<(f64, f64)> {
                (0..=steps)
                    .map(|s| {
                        let tokens = cache.max_context * s / steps;
                        (
                            tokens as f64 / 1024.0,
                            cache.bytes_at(tokens, &cache.shared, single) / gib,
                        )
                    })
                    .collect()
            };
            chart
                .draw_series(LineSeries::new(points(true), colour.stroke_width(2)))?
                .label(format!("{} (optimized engine)", cache.label))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
                });
            if cache.shared.full_bytes_per_token
                != cache.shared.full_bytes_per_token_single_tensor_k_eq_v
            {
                chart
                    .draw_series(LineSeries::new(
                        points(false),
                        colour.mix(0.5).stroke_width(1),
                    ))?
                    .label(format!(
                        "{} with K and V both stored (Hugging Face)",
                        cache.label
                    ))
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], colour.mix(0.5).stroke_width(1))
                    });
            }
        }
        draw::legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        Ok(())
    })
}
