//! Figure `attention-masks`: which keys each query sees, from `mask::key_is_visible`, on a
//! 12-token prompt holding a 4-token image, for a full layer and a sliding layer of a model with
//! `use_bidirectional_attention = "vision"` (31B-like golden model; window shrunk to 5 so that
//! it shows on 12 tokens).

use std::path::Path;

use gemma4_reference::config::AttentionType;
use gemma4_reference::layer_plan::LayerPlan;
use gemma4_reference::mask::{key_is_visible, ImageBlocks};
use gemma4_reference::{ModelConfig, ModelPlan};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, VPos};

use super::draw::{self, Canvas, GRID};
use super::Result;

const WINDOW: usize = 5;
const CELL: i32 = 20;

pub fn draw(root: &Path) -> Result<String> {
    let config = ModelConfig::from_dir(&root.join("golden/31b_vision/model"))?;
    let plan = ModelPlan::from_config(&config.text);
    let layer_of = |kind: AttentionType| -> Result<LayerPlan> {
        plan.layers
            .iter()
            .find(|l| l.attention_type == kind)
            .cloned()
            .ok_or_else(|| "the 31b_vision golden model lacks a layer type".into())
    };
    let full = layer_of(AttentionType::Full)?;
    let mut sliding = layer_of(AttentionType::Sliding)?;
    sliding.sliding_window = Some(WINDOW);

    let tokens = &config.special_tokens;
    let missing = || "the 31b_vision golden config lacks an image token id".to_string();
    let (image, boi, eoi) = (
        tokens.image_token_id.ok_or_else(missing)?,
        tokens.boi_token_id.ok_or_else(missing)?,
        tokens.eoi_token_id.ok_or_else(missing)?,
    );
    let bos = tokens.bos_token_id.unwrap_or(2);
    let text = 10;
    let prompt = [
        bos, text, boi, image, image, image, image, eoi, text, text, text, text,
    ];
    let marks: Vec<&str> = prompt
        .iter()
        .map(|&t| match t {
            t if t == image => "img",
            t if t == boi => "BOI",
            t if t == eoi => "EOI",
            t if t == bos => "BOS",
            _ => "txt",
        })
        .collect();
    let text_only = ImageBlocks::none();
    let with_image = ImageBlocks::of(&config, &prompt, 0);
    let panels = [
        (&full, &text_only, "full layer: causal".to_string()),
        (
            &sliding,
            &text_only,
            format!("sliding layer: window {WINDOW}"),
        ),
        (
            &sliding,
            &with_image,
            format!("sliding layer, image block (window {WINDOW})"),
        ),
        (
            &full,
            &with_image,
            "full layer, same image: still causal".to_string(),
        ),
    ];
    let n = prompt.len() as i32;
    let panel_width = 60 + n * CELL + 40;
    draw::svg(
        (panel_width * 2 + 20) as u32,
        (2 * (70 + n * CELL + 30) + 40) as u32,
        |canvas| {
            draw::text(
                canvas,
                "Query i (row) may attend to key j (column): filled = visible",
                (10, 16),
                14,
            )?;
            for (index, (layer, blocks, title)) in panels.iter().enumerate() {
                let left = 10 + (index as i32 % 2) * panel_width;
                let top = 40 + (index as i32 / 2) * (70 + n * CELL + 30);
                panel(canvas, (left, top), layer, blocks, title, &marks)?;
            }
            Ok(())
        },
    )
}

fn panel(
    canvas: &Canvas,
    (left, top): (i32, i32),
    layer: &LayerPlan,
    blocks: &ImageBlocks,
    title: &str,
    marks: &[&str],
) -> Result<()> {
    draw::text(canvas, title, (left, top + 8), 13)?;
    let n = marks.len();
    let grid_left = left + 40;
    let grid_top = top + 50;
    for (column, mark) in marks.iter().enumerate() {
        let x = grid_left + CELL * column as i32 + CELL / 2;
        draw::label(
            canvas,
            mark,
            (x, grid_top - 6),
            8,
            HPos::Center,
            VPos::Bottom,
        )?;
    }
    for (query, mark) in marks.iter().enumerate() {
        let y = grid_top + CELL * query as i32;
        draw::label(
            canvas,
            &format!("{mark} {query}"),
            (grid_left - 4, y + CELL / 2),
            8,
            HPos::Right,
            VPos::Center,
        )?;
        for key in 0..n {
            let x = grid_left + CELL * key as i32;
            let visible = key_is_visible(layer, query, key, blocks);
            let fill = match (visible, key > query) {
                (true, true) => RGBColor(230, 85, 13),
                (true, false) => RGBColor(49, 130, 189),
                (false, _) => WHITE,
            };
            draw::rect(canvas, (x, y), (x + CELL, y + CELL), fill, Some(GRID))?;
        }
    }
    let legend_y = grid_top + CELL * n as i32 + 14;
    draw::rect(
        canvas,
        (grid_left, legend_y - 6),
        (grid_left + 12, legend_y + 6),
        RGBColor(49, 130, 189),
        None,
    )?;
    draw::text(canvas, "visible, j <= i", (grid_left + 16, legend_y), 10)?;
    draw::rect(
        canvas,
        (grid_left + 120, legend_y - 6),
        (grid_left + 132, legend_y + 6),
        RGBColor(230, 85, 13),
        None,
    )?;
    draw::text(
        canvas,
        "visible, j > i (image block)",
        (grid_left + 136, legend_y),
        10,
    )?;
    Ok(())
}
