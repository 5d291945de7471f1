//! Figure `ple-data-flow`: Per-Layer Embeddings from token ids to each layer's residual stream
//! (shared spec: text §4 and §10 step 6), with E2B's shapes read from its config.

use gemma4_reference::ModelConfig;
use plotters::prelude::*;

use super::draw::{self, Canvas, GRID};
use super::Result;

const BOX_HEIGHT: i32 = 44;

/// A box with up to two centred lines of text; returns its (top centre, bottom centre).
fn node(
    canvas: &Canvas,
    centre: (i32, i32),
    width: i32,
    lines: &[&str],
    fill: RGBColor,
) -> Result<((i32, i32), (i32, i32))> {
    let (x, y) = centre;
    let half = BOX_HEIGHT / 2;
    draw::rect(
        canvas,
        (x - width / 2, y - half),
        (x + width / 2, y + half),
        fill,
        Some(RGBColor(120, 120, 120)),
    )?;
    let offsets: &[i32] = if lines.len() == 1 { &[0] } else { &[-8, 9] };
    for (line, offset) in lines.iter().zip(offsets) {
        draw::centred(canvas, line, (x, y + offset), 11)?;
    }
    Ok(((x, y - half), (x, y + half)))
}

pub fn draw(released: &[(&str, ModelConfig)]) -> Result<String> {
    let (label, config) = &released[0];
    let text = &config.text;
    let (d, l, p, v_ple, v) = (
        text.hidden_size,
        text.num_hidden_layers,
        text.hidden_size_per_layer_input,
        text.vocab_size_per_layer_input,
        text.vocab_size,
    );
    if p == 0 {
        return Err(format!("{label} has no Per-Layer Embeddings").into());
    }
    let table = RGBColor(253, 208, 162);
    let step = RGBColor(239, 243, 255);
    let result = RGBColor(199, 233, 192);
    draw::svg(1000, 640, |canvas| {
        draw::text(canvas, &format!("Per-Layer Embeddings in {label}: D = {d}, L = {l}, P = {p}, V = {v}, V_ple = {v_ple}; T tokens"), (10, 16), 14)?;
        let ids = node(canvas, (500, 60), 220, &["token ids", "[T]"], step)?;
        // Token part (left).
        let lookup = node(
            canvas,
            (230, 150),
            400,
            &[
                "embed_tokens_per_layer[ids]  (a table on disk)",
                &format!("[T, L·P] = [T, {}]", l * p),
            ],
            table,
        )?;
        let token_part = node(
            canvas,
            (230, 240),
            400,
            &[
                "× √P (exact), reshape layer-major",
                &format!("token part [T, L, P] = [T, {l}, {p}]"),
            ],
            step,
        )?;
        // Context part (right).
        let embed = node(
            canvas,
            (770, 150),
            400,
            &[
                "embed_tokens[ids] × √D  (merged soft tokens too)",
                &format!("x⁰ [T, D] = [T, {d}]"),
            ],
            table,
        )?;
        let project = node(
            canvas,
            (770, 240),
            400,
            &[
                "per_layer_model_projection, × D^-1/2",
                &format!("[T, D] → [T, L·P] = [T, {}]", l * p),
            ],
            step,
        )?;
        let context = node(
            canvas,
            (770, 330),
            400,
            &[
                "reshape, RMSNorm over P (one [P] weight)",
                &format!("context part [T, L, P] = [T, {l}, {p}]"),
            ],
            step,
        )?;
        let joined = node(
            canvas,
            (500, 420),
            460,
            &[
                "(token part + context part) × 2^-1/2",
                "per_layer_inputs [T, L, P]: slice l goes to layer l",
            ],
            result,
        )?;
        arrow_between(canvas, ids.1, lookup.0)?;
        arrow_between(canvas, ids.1, embed.0)?;
        arrow_between(canvas, lookup.1, token_part.0)?;
        arrow_between(canvas, embed.1, project.0)?;
        arrow_between(canvas, project.1, context.0)?;
        arrow_between(canvas, token_part.1, joined.0)?;
        arrow_between(canvas, context.1, joined.0)?;
        // Inside layer l.
        canvas.draw(&Rectangle::new(
            [(20, 470), (980, 630)],
            GRID.stroke_width(1),
        ))?;
        draw::text(canvas, "inside decoder layer l, after the feed-forward block (h₂ [T, D] is the residual stream)", (30, 486), 12)?;
        let gate = node(
            canvas,
            (120, 560),
            190,
            &["gelu_tanh(h₂ · gateᵀ)", &format!("[T, D] → [T, {p}]")],
            step,
        )?;
        let times = node(
            canvas,
            (330, 560),
            180,
            &["⊙ per_layer_inputs[:, l]", &format!("[T, {p}]")],
            result,
        )?;
        let back = node(
            canvas,
            (535, 560),
            190,
            &["per_layer_projection", &format!("[T, {p}] → [T, {d}]")],
            step,
        )?;
        let norm = node(
            canvas,
            (735, 560),
            170,
            &["RMSNorm", "post_per_layer_input_norm"],
            step,
        )?;
        let add = node(
            canvas,
            (905, 560),
            120,
            &["h₃ = h₂ + ·", "then × layer_scalar"],
            result,
        )?;
        arrow_between(canvas, (gate.1 .0 + 95, 560), (times.0 .0 - 90, 560))?;
        arrow_between(canvas, (times.0 .0 + 90, 560), (back.0 .0 - 95, 560))?;
        arrow_between(canvas, (back.0 .0 + 95, 560), (norm.0 .0 - 85, 560))?;
        arrow_between(canvas, (norm.0 .0 + 85, 560), (add.0 .0 - 60, 560))?;
        arrow_between(canvas, joined.1, times.0)?;
        Ok(())
    })
}

fn arrow_between(canvas: &Canvas, from: (i32, i32), to: (i32, i32)) -> Result<()> {
    draw::arrow(canvas, from, to)
}
