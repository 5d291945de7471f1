//! Figure `moe-routing`: which 8 of the 128 experts each token of a prompt picked, with their
//! routing weights, in the first and last layer of the golden 26B-A4B-like model. The choices
//! are the oracle's (`router.top_k_index` and `router.top_k_weights` of the fixture, recorded by
//! Hugging Face), which the reference reproduces exactly (`tests/conformance.rs`).

use std::path::Path;

use gemma4_reference::ActivationDump;
use plotters::style::text_anchor::{HPos, VPos};

use super::draw::{self, Canvas, GRID};
use super::Result;

const CELL_WIDTH: i32 = 6;
const CELL_HEIGHT: i32 = 14;

struct LayerRouting {
    layer: usize,
    /// Per token: (expert, weight) for its k experts.
    choices: Vec<Vec<(usize, f32)>>,
}

fn routing(dump: &ActivationDump, layer: usize) -> Result<LayerRouting> {
    let name = |part: &str| format!("layers.{layer}.router.{part}");
    let index = dump
        .get(&name("top_k_index"))
        .and_then(|t| t.as_i64())
        .ok_or_else(|| format!("golden 26b_a4b_like lacks {}", name("top_k_index")))?;
    let weights = dump
        .get(&name("top_k_weights"))
        .and_then(|t| t.as_f32())
        .ok_or_else(|| format!("golden 26b_a4b_like lacks {}", name("top_k_weights")))?;
    let shape = index.shape().to_vec();
    if shape.len() != 2 || weights.shape() != shape.as_slice() {
        return Err(format!(
            "layer {layer}: router tensors of shapes {shape:?} and {:?}",
            weights.shape()
        )
        .into());
    }
    let choices = (0..shape[0])
        .map(|t| {
            (0..shape[1])
                .map(|s| (index[[t, s]] as usize, weights[[t, s]]))
                .collect()
        })
        .collect();
    Ok(LayerRouting { layer, choices })
}

pub fn draw(root: &Path) -> Result<String> {
    let case = root.join("golden/26b_a4b_like");
    let dump = ActivationDump::read(&case.join("expected.safetensors"))?;
    let config = gemma4_reference::ModelConfig::from_dir(&case.join("model"))?;
    let moe = config
        .text
        .moe
        .as_ref()
        .ok_or("golden 26b_a4b_like has no MoE")?;
    let experts = moe.num_experts;
    let last = config.text.num_hidden_layers - 1;
    let layers = [routing(&dump, 0)?, routing(&dump, last)?];
    let tokens = layers[0].choices.len() as i32;
    let panel_height = 40 + tokens * CELL_HEIGHT + 30;
    let width = 80 + experts as i32 * CELL_WIDTH + 20;
    draw::svg(
        width as u32,
        (40 + 2 * panel_height + 30) as u32,
        |canvas| {
            draw::text(
            canvas,
            &format!("MoE routing in the golden 26B-A4B-like model: top-{} of {experts} experts per token (darker = larger weight)", moe.top_k_experts),
            (10, 16),
            13,
        )?;
            for (index, routing) in layers.iter().enumerate() {
                panel(canvas, 40 + panel_height * index as i32, routing, experts)?;
            }
            Ok(())
        },
    )
}

fn panel(canvas: &Canvas, top: i32, routing: &LayerRouting, experts: usize) -> Result<()> {
    let left = 80;
    draw::text(
        canvas,
        &format!("layer {}", routing.layer),
        (10, top + 10),
        13,
    )?;
    let largest = routing
        .choices
        .iter()
        .flatten()
        .map(|&(_, w)| w)
        .fold(0f32, f32::max)
        .max(f32::MIN_POSITIVE);
    let grid_top = top + 26;
    for expert in (0..experts).step_by(16) {
        let x = left + CELL_WIDTH * expert as i32;
        draw::label(
            canvas,
            &expert.to_string(),
            (x, grid_top - 3),
            9,
            HPos::Left,
            VPos::Bottom,
        )?;
    }
    for (token, choices) in routing.choices.iter().enumerate() {
        let y = grid_top + CELL_HEIGHT * token as i32;
        draw::label(
            canvas,
            &format!("token {token}"),
            (left - 6, y + CELL_HEIGHT / 2),
            9,
            HPos::Right,
            VPos::Center,
        )?;
        draw::rect(
            canvas,
            (left, y),
            (left + CELL_WIDTH * experts as i32, y + CELL_HEIGHT),
            plotters::style::WHITE,
            Some(GRID),
        )?;
        for &(expert, weight) in choices {
            let x = left + CELL_WIDTH * expert as i32;
            let shade = draw::ramp(0.25 + 0.75 * (weight / largest) as f64);
            draw::rect(
                canvas,
                (x, y + 1),
                (x + CELL_WIDTH, y + CELL_HEIGHT - 1),
                shade,
                None,
            )?;
        }
    }
    let bottom = grid_top + CELL_HEIGHT * routing.choices.len() as i32;
    draw::text(canvas, "expert index →", (left, bottom + 12), 10)?;
    Ok(())
}
