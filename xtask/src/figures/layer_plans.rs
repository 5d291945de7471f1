//! Figure `layer-plans`: every layer of the four released models, as their `LayerPlan`s say —
//! attention type, where the layer's keys and values come from, and the MLP / MoE width.

use gemma4_reference::config::AttentionType;
use gemma4_reference::layer_plan::KvSource;
use gemma4_reference::{ModelConfig, ModelPlan};
use plotters::style::text_anchor::{HPos, VPos};

use super::draw::{self, Canvas, DENSE, FULL, MOE, OWN_KV, PRODUCER_KV, SHARED_KV, SLIDING};
use super::Result;

const LEFT: i32 = 120;
const CELL: i32 = 14;
const ROW: i32 = 150;

pub fn draw(released: &[(&str, ModelConfig)]) -> Result<String> {
    let deepest = released
        .iter()
        .map(|(_, c)| c.text.num_hidden_layers)
        .max()
        .unwrap_or(1) as i32;
    let width = (LEFT + deepest * CELL + 30) as u32;
    let height = (40 + ROW * released.len() as i32 + 70) as u32;
    draw::svg(width, height, |canvas| {
        draw::text(
            canvas,
            "The released layer plans (from each config.json, via ModelPlan::from_config)",
            (10, 18),
            15,
        )?;
        for (row, (label, config)) in released.iter().enumerate() {
            let top = 40 + ROW * row as i32;
            model_row(canvas, label, config, top)?;
        }
        legend(canvas, 40 + ROW * released.len() as i32 + 10)
    })
}

fn model_row(canvas: &Canvas, label: &str, config: &ModelConfig, top: i32) -> Result<()> {
    let plan = ModelPlan::from_config(&config.text);
    let widest_mlp = plan.layers.iter().map(|l| l.mlp_width).max().unwrap_or(1) as f64;
    draw::text(canvas, label, (10, top + 20), 15)?;
    draw::text(
        canvas,
        &format!("{} layers", plan.layers.len()),
        (10, top + 40),
        11,
    )?;
    let strips = [
        ("attention", top + 8),
        ("keys/values", top + 34),
        ("MLP width", top + 60),
    ];
    for (name, y) in strips {
        draw::label(
            canvas,
            name,
            (LEFT - 6, y + 10),
            10,
            HPos::Right,
            VPos::Center,
        )?;
    }
    for layer in &plan.layers {
        let x = LEFT + CELL * layer.index as i32;
        let attention = match layer.attention_type {
            AttentionType::Sliding => SLIDING,
            AttentionType::Full => FULL,
        };
        draw::rect(
            canvas,
            (x, top + 8),
            (x + CELL - 1, top + 28),
            attention,
            None,
        )?;
        let kv = match layer.kv_source {
            KvSource::Own {
                shared_with_consumers: false,
            } => OWN_KV,
            KvSource::Own {
                shared_with_consumers: true,
            } => PRODUCER_KV,
            KvSource::SharedFrom { .. } => SHARED_KV,
        };
        draw::rect(canvas, (x, top + 34), (x + CELL - 1, top + 54), kv, None)?;
        let bar = ((layer.mlp_width as f64 / widest_mlp) * 36.0)
            .round()
            .max(2.0) as i32;
        let colour = if layer.has_moe { MOE } else { DENSE };
        draw::rect(
            canvas,
            (x + 2, top + 96 - bar),
            (x + CELL - 3, top + 96),
            colour,
            None,
        )?;
        if layer.index % 5 == 0 {
            draw::centred(
                canvas,
                &layer.index.to_string(),
                (x + CELL / 2, top + 106),
                9,
            )?;
        }
    }
    draw::text(canvas, &facts(config, &plan), (LEFT, top + 124), 11)?;
    Ok(())
}

/// One line of the plan's facts under the row: head dims, KV heads, window, sharing, MLP.
fn facts(config: &ModelConfig, plan: &ModelPlan) -> String {
    let of = |kind: AttentionType| plan.layers.iter().find(|l| l.attention_type == kind);
    let mut parts = Vec::new();
    if let Some(s) = of(AttentionType::Sliding) {
        parts.push(format!(
            "sliding: window {}, head dim {}, {} KV heads",
            config.text.sliding_window, s.head_dim, s.num_kv_heads
        ));
    }
    if let Some(f) = of(AttentionType::Full) {
        parts.push(format!(
            "full: head dim {}, {} KV heads{}",
            f.head_dim,
            f.num_kv_heads,
            if f.key_equals_value { ", K=V" } else { "" }
        ));
    }
    let shared = plan.layers.len() - plan.first_kv_shared_layer;
    if shared > 0 {
        parts.push(format!("layers {}+ share K/V", plan.first_kv_shared_layer));
    }
    let mut widths: Vec<usize> = plan.layers.iter().map(|l| l.mlp_width).collect();
    widths.sort_unstable();
    widths.dedup();
    let widths: Vec<String> = widths.iter().map(usize::to_string).collect();
    parts.push(format!("MLP width {}", widths.join(" / ")));
    if let Some(moe) = &config.text.moe {
        parts.push(format!(
            "+ MoE top-{} of {}",
            moe.top_k_experts, moe.num_experts
        ));
    }
    parts.join(";  ")
}

fn legend(canvas: &Canvas, top: i32) -> Result<()> {
    let entries = [
        (SLIDING, "sliding-window layer"),
        (FULL, "full (global) layer"),
        (OWN_KV, "own K/V"),
        (PRODUCER_KV, "own K/V, read by later layers"),
        (SHARED_KV, "reads another layer's K/V"),
        (DENSE, "dense MLP (bar height = width)"),
        (MOE, "dense MLP + MoE"),
    ];
    let mut x = 10;
    for (index, (colour, name)) in entries.iter().enumerate() {
        let y = top + if index < 4 { 0 } else { 24 };
        if index == 4 {
            x = 10;
        }
        draw::rect(canvas, (x, y), (x + 14, y + 14), *colour, None)?;
        draw::text(canvas, name, (x + 20, y + 7), 11)?;
        x += 40 + 7 * name.len() as i32;
    }
    Ok(())
}
