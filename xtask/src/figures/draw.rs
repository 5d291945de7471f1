//! Drawing helpers shared by the figures: an SVG canvas, boxes, labels, arrows, a colour ramp.

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::Result;

/// The drawing area every figure draws on (pixel coordinates, origin top left).
pub type Canvas<'a> = DrawingArea<SVGBackend<'a>, Shift>;

pub const FONT: &str = "sans-serif";
pub const SLIDING: RGBColor = RGBColor(158, 202, 225);
pub const FULL: RGBColor = RGBColor(230, 85, 13);
pub const OWN_KV: RGBColor = RGBColor(116, 196, 118);
pub const PRODUCER_KV: RGBColor = RGBColor(35, 139, 69);
pub const SHARED_KV: RGBColor = RGBColor(189, 189, 189);
pub const MOE: RGBColor = RGBColor(117, 107, 177);
pub const DENSE: RGBColor = RGBColor(99, 99, 99);
pub const GRID: RGBColor = RGBColor(220, 220, 220);
pub const INK: RGBColor = RGBColor(40, 40, 40);
/// Line colours for one series per released model.
pub const SERIES: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];

/// Draws a `width × height` SVG with `body` and returns its text.
pub fn svg(width: u32, height: u32, body: impl FnOnce(&Canvas) -> Result<()>) -> Result<String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (width, height)).into_drawing_area();
        root.fill(&WHITE)?;
        body(&root)?;
        root.present()?;
    }
    Ok(out)
}

/// A filled rectangle from `(x0, y0)` to `(x1, y1)`, optionally outlined.
pub fn rect(
    canvas: &Canvas,
    corner: (i32, i32),
    opposite: (i32, i32),
    fill: RGBColor,
    outline: Option<RGBColor>,
) -> Result<()> {
    canvas.draw(&Rectangle::new([corner, opposite], fill.filled()))?;
    if let Some(line) = outline {
        canvas.draw(&Rectangle::new([corner, opposite], line.stroke_width(1)))?;
    }
    Ok(())
}

/// Text with its anchor: `h` = left/center/right, `v` = top/center/bottom of the text.
pub fn label(
    canvas: &Canvas,
    text: &str,
    at: (i32, i32),
    size: i32,
    h: HPos,
    v: VPos,
) -> Result<()> {
    let style = TextStyle::from((FONT, size).into_font())
        .color(&INK)
        .pos(Pos::new(h, v));
    canvas.draw(&Text::new(text.to_string(), at, style))?;
    Ok(())
}

/// Left-aligned text, vertically centred on `at`.
pub fn text(canvas: &Canvas, text: &str, at: (i32, i32), size: i32) -> Result<()> {
    label(canvas, text, at, size, HPos::Left, VPos::Center)
}

/// Centred text.
pub fn centred(canvas: &Canvas, text: &str, at: (i32, i32), size: i32) -> Result<()> {
    label(canvas, text, at, size, HPos::Center, VPos::Center)
}

/// A straight arrow from `from` to `to` with a filled head.
pub fn arrow(canvas: &Canvas, from: (i32, i32), to: (i32, i32)) -> Result<()> {
    canvas.draw(&PathElement::new(vec![from, to], INK.stroke_width(1)))?;
    let (dx, dy) = ((to.0 - from.0) as f64, (to.1 - from.1) as f64);
    let length = (dx * dx + dy * dy).sqrt().max(1.0);
    let (ux, uy) = (dx / length, dy / length);
    let back = (to.0 as f64 - 8.0 * ux, to.1 as f64 - 8.0 * uy);
    let left = (
        (back.0 - 4.0 * uy).round() as i32,
        (back.1 + 4.0 * ux).round() as i32,
    );
    let right = (
        (back.0 + 4.0 * uy).round() as i32,
        (back.1 - 4.0 * ux).round() as i32,
    );
    canvas.draw(&Polygon::new(vec![to, left, right], INK.filled()))?;
    Ok(())
}

/// A colour ramp from white through blue to dark blue for `value` in `[0, 1]`.
pub fn ramp(value: f64) -> RGBColor {
    let stops = [
        (255.0, 255.0, 255.0),
        (107.0, 174.0, 214.0),
        (8.0, 48.0, 107.0),
    ];
    let v = value.clamp(0.0, 1.0) * 2.0;
    let (i, t) = if v >= 1.0 { (1, v - 1.0) } else { (0, v) };
    let mix = |a: f64, b: f64| (a + (b - a) * t).round() as u8;
    RGBColor(
        mix(stops[i].0, stops[i + 1].0),
        mix(stops[i].1, stops[i + 1].1),
        mix(stops[i].2, stops[i + 1].2),
    )
}

/// `bytes` as "12.5 KiB", "3.1 GiB", ...
pub fn binary_size(bytes: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value >= 100.0 || value.fract() == 0.0 {
        format!("{value:.0} {}", units[unit])
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

/// The legend of a chart's labelled series, boxed, at `position`.
pub fn legend<'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, CT>,
    position: SeriesLabelPosition,
) -> Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font((FONT, 12))
        .draw()?;
    Ok(())
}
