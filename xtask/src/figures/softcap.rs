//! Figure `softcap`: final logit softcapping, `c · tanh(z / c)`, against the identity, with the
//! cap `c` of the released configs (shared spec: text §11).

use gemma4_reference::ModelConfig;
use plotters::prelude::*;

use super::draw::{self, FONT, SERIES};
use super::Result;

pub fn draw(released: &[(&str, ModelConfig)]) -> Result<String> {
    let caps: Vec<f64> = released
        .iter()
        .filter_map(|(_, c)| c.text.final_logit_softcapping)
        .collect();
    let cap = *caps
        .first()
        .ok_or("no released config softcaps its logits")?;
    if caps.iter().any(|&c| c != cap) {
        return Err(format!("the released configs disagree on the softcap: {caps:?}").into());
    }
    let span = 3.0 * cap;
    draw::svg(760, 460, |canvas| {
        let mut chart = ChartBuilder::on(canvas)
            .caption(
                format!("Final logit softcapping, cap c = {cap} (all four released models)"),
                (FONT, 15),
            )
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(-span..span, -span..span)?;
        chart
            .configure_mesh()
            .x_desc("logit z before the cap")
            .y_desc("logit after")
            .draw()?;
        let points = |f: &dyn Fn(f64) -> f64| -> Vec<(f64, f64)> {
            (0..=400)
                .map(|i| -span + 2.0 * span * i as f64 / 400.0)
                .map(|z| (z, f(z)))
                .collect()
        };
        let grey = RGBColor(150, 150, 150);
        chart
            .draw_series(LineSeries::new(points(&|z| z), grey.stroke_width(1)))?
            .label("identity (no cap)")
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], grey.stroke_width(1))
            });
        let blue = SERIES[0];
        chart
            .draw_series(LineSeries::new(
                points(&|z| cap * (z / cap).tanh()),
                blue.stroke_width(2),
            ))?
            .label(format!("{cap} · tanh(z / {cap})"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], blue.stroke_width(2))
            });
        for bound in [cap, -cap] {
            chart.draw_series(LineSeries::new(
                vec![(-span, bound), (span, bound)],
                blue.mix(0.4).stroke_width(1),
            ))?;
        }
        draw::legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        Ok(())
    })
}
