//! Figures `image-budgets` and `image-pooling`: an image's way to soft tokens. The resized sizes
//! come from `vision::preprocessing::resized_size` at every budget, the patch grid from
//! `patchify`, and the patch → soft token assignment from `vision::pooling::pool_to_soft_tokens`
//! itself (pooling an identity matrix shows where each patch goes).

use gemma4_reference::vision::pooling::pool_to_soft_tokens;
use gemma4_reference::vision::preprocessing::{
    patchify, resized_size, RgbImage, PATCH_SIZE, POOLING_KERNEL, SUPPORTED_BUDGETS,
};
use ndarray::Array2;
use plotters::prelude::*;

use super::draw::{self, GRID};
use super::Result;

/// The sample photo's size, width × height (a 3:2 landscape photo).
pub const SAMPLE_IMAGE: (usize, usize) = (640, 427);
const SCALE: f64 = 0.16;

pub fn draw_budgets() -> Result<String> {
    let (width, height) = SAMPLE_IMAGE;
    let cell = PATCH_SIZE * POOLING_KERNEL;
    let sizes: Vec<(usize, usize, usize)> = SUPPORTED_BUDGETS
        .iter()
        .map(|&budget| resized_size(height, width, budget).map(|(h, w)| (budget, h, w)))
        .collect::<gemma4_reference::Result<_>>()?;
    let total_width: i32 = sizes
        .iter()
        .map(|&(_, _, w)| (w as f64 * SCALE) as i32 + 30)
        .sum();
    let tallest = sizes
        .iter()
        .map(|&(_, h, _)| (h as f64 * SCALE) as i32)
        .max()
        .unwrap_or(0);
    draw::svg(
        (total_width + 20) as u32,
        (tallest + 110) as u32,
        |canvas| {
            draw::text(
            canvas,
            &format!("A {width}×{height} image at each soft-token budget: resized (aspect kept, sides multiples of {cell}), one square per soft token ({cell}×{cell} px = 3×3 patches)"),
            (10, 16),
            12,
        )?;
            let mut left = 15;
            for &(budget, h, w) in &sizes {
                let (pw, ph) = ((w as f64 * SCALE) as i32, (h as f64 * SCALE) as i32);
                let top = 50;
                draw::rect(
                    canvas,
                    (left, top),
                    (left + pw, top + ph),
                    RGBColor(222, 235, 247),
                    Some(RGBColor(49, 130, 189)),
                )?;
                for column in 1..w / cell {
                    let x = left + (column as f64 * cell as f64 * SCALE) as i32;
                    canvas.draw(&PathElement::new(
                        vec![(x, top), (x, top + ph)],
                        RGBColor(158, 202, 225),
                    ))?;
                }
                for row in 1..h / cell {
                    let y = top + (row as f64 * cell as f64 * SCALE) as i32;
                    canvas.draw(&PathElement::new(
                        vec![(left, y), (left + pw, y)],
                        RGBColor(158, 202, 225),
                    ))?;
                }
                let tokens = (h / cell) * (w / cell);
                draw::text(
                    canvas,
                    &format!("budget {budget}"),
                    (left, top + ph + 14),
                    12,
                )?;
                draw::text(canvas, &format!("{w}×{h} px"), (left, top + ph + 30), 11)?;
                draw::text(
                    canvas,
                    &format!("{}×{} = {tokens} tokens", w / cell, h / cell),
                    (left, top + ph + 46),
                    11,
                )?;
                left += pw + 30;
            }
            Ok(())
        },
    )
}

pub fn draw_pooling() -> Result<String> {
    // A 144 × 96 image: 9 × 6 patches, pooled to 3 × 2 soft tokens.
    let (width, height) = (
        3 * PATCH_SIZE * POOLING_KERNEL,
        2 * PATCH_SIZE * POOLING_KERNEL,
    );
    let image = RgbImage::new(width, height, vec![128; width * height * 3])?;
    let patches = patchify(&image)?;
    let n = patches.positions.len();
    let identity = Array2::<f32>::eye(n);
    let pooled = pool_to_soft_tokens(&identity, &patches.positions, POOLING_KERNEL, None)?;
    // Column i of `pooled` is non-zero only in the soft token patch i was pooled into.
    let soft_token_of: Vec<usize> = (0..n)
        .map(|i| {
            (0..pooled.nrows())
                .find(|&c| pooled[[c, i]] > 0.0)
                .ok_or_else(|| format!("patch {i} was pooled into no soft token"))
        })
        .collect::<std::result::Result<_, _>>()?;
    let palette = [
        RGBColor(166, 206, 227),
        RGBColor(178, 223, 138),
        RGBColor(251, 154, 153),
        RGBColor(253, 191, 111),
        RGBColor(202, 178, 214),
        RGBColor(255, 255, 153),
    ];
    let columns = width / PATCH_SIZE;
    let rows = height / PATCH_SIZE;
    let cell = 44;
    draw::svg(900, (90 + rows as i32 * cell + 40) as u32, |canvas| {
        draw::text(
            canvas,
            &format!("{width}×{height} px image: {n} patches of {PATCH_SIZE}×{PATCH_SIZE} (row-major, labelled with their index and (x, y)) → {} soft tokens", pooled.nrows()),
            (10, 16),
            13,
        )?;
        let (left, top) = (20, 50);
        for (i, &[x, y]) in patches.positions.iter().enumerate() {
            let (cx, cy) = (left + x as i32 * cell, top + y as i32 * cell);
            draw::rect(
                canvas,
                (cx, cy),
                (cx + cell, cy + cell),
                palette[soft_token_of[i] % palette.len()],
                Some(GRID),
            )?;
            draw::centred(
                canvas,
                &i.to_string(),
                (cx + cell / 2, cy + cell / 2 - 7),
                12,
            )?;
            draw::centred(
                canvas,
                &format!("({x},{y})"),
                (cx + cell / 2, cy + cell / 2 + 9),
                9,
            )?;
        }
        let pooled_left = left + columns as i32 * cell + 110;
        draw::arrow(
            canvas,
            (
                left + columns as i32 * cell + 15,
                top + rows as i32 * cell / 2,
            ),
            (pooled_left - 15, top + rows as i32 * cell / 2),
        )?;
        draw::centred(
            canvas,
            "3×3 mean",
            (
                left + columns as i32 * cell + 55,
                top + rows as i32 * cell / 2 - 12,
            ),
            11,
        )?;
        let big = cell * POOLING_KERNEL as i32;
        for token in 0..pooled.nrows() {
            let members: Vec<usize> = (0..n).filter(|&i| soft_token_of[i] == token).collect();
            let [x, y] = patches.positions[members[0]];
            let (gx, gy) = ((x / POOLING_KERNEL) as i32, (y / POOLING_KERNEL) as i32);
            let (cx, cy) = (pooled_left + gx * big / 2, top + gy * big / 2);
            draw::rect(
                canvas,
                (cx, cy),
                (cx + big / 2, cy + big / 2),
                palette[token % palette.len()],
                Some(RGBColor(120, 120, 120)),
            )?;
            draw::centred(
                canvas,
                &format!("soft token {token}"),
                (cx + big / 4, cy + big / 4),
                10,
            )?;
        }
        draw::text(
            canvas,
            "each soft token = mean of its 9 patches × √Dv (then standardize on the large tower); cells in row-major order",
            (left, top + rows as i32 * cell + 24),
            11,
        )?;
        Ok(())
    })
}
