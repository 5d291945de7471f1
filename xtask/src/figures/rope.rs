//! Figure `rope-frequencies`: the rotation frequency of every pair of a head, default RoPE on a
//! sliding layer against proportional p-RoPE on a full layer (`rope::inverse_frequencies` on
//! E2B's layer plan). Pairs that do not rotate have frequency 0; the log axis cannot show 0,
//! so they are drawn as crosses on its floor.

use gemma4_reference::config::AttentionType;
use gemma4_reference::rope::inverse_frequencies;
use gemma4_reference::{ModelConfig, ModelPlan};
use plotters::prelude::*;

use super::draw::{self, FONT};
use super::Result;

const FLOOR: f64 = 1e-7;

pub fn draw(released: &[(&str, ModelConfig)]) -> Result<String> {
    let (label, config) = &released[0];
    let plan = ModelPlan::from_config(&config.text);
    let layer_of = |kind: AttentionType| {
        plan.layers
            .iter()
            .find(|l| l.attention_type == kind)
            .ok_or_else(|| format!("{label} has no {kind:?} layer"))
    };
    let sliding = layer_of(AttentionType::Sliding)?;
    let full = layer_of(AttentionType::Full)?;
    let sliding_frequencies = inverse_frequencies(&sliding.rope, sliding.head_dim);
    let full_frequencies = inverse_frequencies(&full.rope, full.head_dim);
    let rotating = full_frequencies.iter().filter(|&&f| f > 0.0).count();

    draw::svg(900, 480, |canvas| {
        let mut chart = ChartBuilder::on(canvas)
            .caption(
                format!(
                    "{label}: rotation frequency per pair (radians per position); {rotating} of {} full-layer pairs rotate",
                    full_frequencies.len()
                ),
                (FONT, 15),
            )
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..1f64, (FLOOR * 0.5..2.0).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("pair k / (d/2)  (position of the pair within the head)")
            .y_desc("frequency")
            .y_label_formatter(&|v| format!("{v:.0e}"))
            .draw()?;
        let series = |frequencies: &[f32]| -> Vec<(f64, f64)> {
            let half = frequencies.len() as f64;
            frequencies
                .iter()
                .enumerate()
                .filter(|(_, &f)| f > 0.0)
                .map(|(k, &f)| (k as f64 / half, f as f64))
                .collect()
        };
        let blue = draw::SERIES[0];
        let orange = draw::SERIES[1];
        chart
            .draw_series(LineSeries::new(
                series(&sliding_frequencies),
                blue.stroke_width(2),
            ))?
            .label(format!(
                "sliding layer: default RoPE, theta {}, head dim {}",
                sliding.rope.theta, sliding.head_dim
            ))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], blue.stroke_width(2))
            });
        chart
            .draw_series(LineSeries::new(
                series(&full_frequencies),
                orange.stroke_width(2),
            ))?
            .label(format!(
                "full layer: proportional p-RoPE, theta {}, head dim {}",
                full.rope.theta, full.head_dim
            ))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], orange.stroke_width(2))
            });
        let half = full_frequencies.len() as f64;
        let frozen: Vec<(f64, f64)> = full_frequencies
            .iter()
            .enumerate()
            .filter(|(_, &f)| f == 0.0)
            .map(|(k, _)| (k as f64 / half, FLOOR))
            .collect();
        chart
            .draw_series(
                frozen
                    .into_iter()
                    .map(|p| Cross::new(p, 3, orange.stroke_width(1))),
            )?
            .label("full layer: frequency 0 (the pair is not rotated)")
            .legend(move |(x, y)| Cross::new((x + 10, y), 3, orange.stroke_width(1)));
        draw::legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        Ok(())
    })
}
