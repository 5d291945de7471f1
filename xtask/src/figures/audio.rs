//! Figure `audio-front-end`: a real speech clip (the golden `voice_31s.wav`, espeak-ng speech)
//! through the audio front end: its waveform (`audio::wav::read_wav`), its log-mel features
//! (`audio::features::log_mel_features`, `[frames, 128]`, 10 ms per frame) and the soft tokens
//! the tower makes of it (`soft_token_count`: 40 ms each after two stride-2 convolutions).

use std::path::Path;

use gemma4_reference::audio::features::{log_mel_features, soft_token_count};
use gemma4_reference::audio::wav::read_wav;
use plotters::prelude::*;

use super::draw::{self, SERIES};
use super::Result;

/// The clip drawn, relative to the repository root.
pub const CLIP: &str = "golden/audio_front_end/wav/voice_31s.wav";
const WIDTH: i32 = 900;
const LEFT: i32 = 70;
/// Mel bands are averaged in groups of this many (128 / 4 = 32 rows), and frames in groups of
/// as many as keep at most `MAX_COLUMNS` columns, so that the SVG stays small.
const MEL_GROUP: usize = 4;
const MAX_COLUMNS: usize = 120;

pub fn draw(root: &Path) -> Result<String> {
    let waveform = read_wav(&root.join(CLIP))?;
    let features = log_mel_features(&waveform.samples)?;
    let tokens = soft_token_count(waveform.samples.len());
    let seconds = waveform.seconds();
    let plot_width = WIDTH - LEFT - 20;
    let frames = features.features.nrows();
    let mels = features.features.ncols();
    draw::svg(WIDTH as u32, 560, |canvas| {
        draw::text(
            canvas,
            &format!("{CLIP}: {seconds:.2} s at {} Hz", waveform.sample_rate),
            (10, 16),
            13,
        )?;
        // 1. Waveform: min/max of the samples under each pixel column.
        let (wave_top, wave_height) = (40, 110);
        draw::text(canvas, "waveform", (10, wave_top + wave_height / 2), 11)?;
        let samples = &waveform.samples;
        let peak = samples.iter().fold(0f32, |m, s| m.max(s.abs())).max(1e-6);
        for column in 0..plot_width {
            let start = samples.len() * column as usize / plot_width as usize;
            let end = (samples.len() * (column as usize + 1) / plot_width as usize)
                .max(start + 1)
                .min(samples.len());
            let slice = &samples[start.min(samples.len() - 1)..end];
            let (low, high) = slice
                .iter()
                .fold((f32::MAX, f32::MIN), |(l, h), &s| (l.min(s), h.max(s)));
            let y = |v: f32| {
                wave_top + wave_height / 2 - (v / peak * (wave_height as f32 / 2.0)).round() as i32
            };
            let x = LEFT + column;
            canvas.draw(&PathElement::new(
                vec![(x, y(high)), (x, y(low).max(y(high) + 1))],
                SERIES[0],
            ))?;
        }
        // 2. Log-mel features: rows = mel bands (low at the bottom), columns = frames.
        let (mel_top, mel_height) = (175, 256);
        draw::text(canvas, "log-mel", (10, mel_top + mel_height / 2 - 8), 11)?;
        draw::text(
            canvas,
            &format!("[{frames}, {mels}]"),
            (10, mel_top + mel_height / 2 + 8),
            10,
        )?;
        let (low, high) = features
            .features
            .iter()
            .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
        let frame_group = frames.div_ceil(MAX_COLUMNS).max(1);
        let columns = frames.div_ceil(frame_group);
        let rows = mels / MEL_GROUP;
        // Every panel shares one time axis: 10 ms per frame, 40 ms per soft token.
        let pixels_per_second = plot_width as f64 / seconds;
        let features_width = frames as f64 * 0.010 * pixels_per_second;
        let cell_width = features_width / columns as f64;
        let cell_height = mel_height as f64 / rows as f64;
        for column in 0..columns {
            for row in 0..rows {
                let frame_range = column * frame_group..((column + 1) * frame_group).min(frames);
                let mel_range = row * MEL_GROUP..(row + 1) * MEL_GROUP;
                let count = (frame_range.len() * mel_range.len()) as f32;
                let mean: f32 = frame_range
                    .clone()
                    .flat_map(|f| mel_range.clone().map(move |m| (f, m)))
                    .map(|(f, m)| features.features[[f, m]])
                    .sum::<f32>()
                    / count;
                let value = ((mean - low) / (high - low).max(1e-6)) as f64;
                let x0 = LEFT + (column as f64 * cell_width).round() as i32;
                let x1 = LEFT + ((column + 1) as f64 * cell_width).round() as i32;
                let y1 = mel_top + mel_height - (row as f64 * cell_height).round() as i32;
                let y0 = mel_top + mel_height - ((row + 1) as f64 * cell_height).round() as i32;
                draw::rect(canvas, (x0, y0), (x1, y1), draw::ramp(value), None)?;
            }
        }
        draw::text(
            canvas,
            "0 Hz",
            (LEFT + plot_width + 2, mel_top + mel_height - 4),
            9,
        )?;
        draw::text(canvas, "8 kHz", (LEFT + plot_width + 2, mel_top + 4), 9)?;
        // 3. Soft tokens: one per 4 valid frames (two stride-2 convolutions).
        let (token_top, token_height) = (460, 30);
        draw::text(
            canvas,
            "soft tokens",
            (10, token_top + token_height / 2),
            11,
        )?;
        for token in 0..tokens {
            let x0 = LEFT + (token as f64 * 0.040 * pixels_per_second).round() as i32;
            let x1 = LEFT + ((token + 1) as f64 * 0.040 * pixels_per_second).round() as i32;
            let fill = if token % 2 == 0 {
                RGBColor(253, 208, 162)
            } else {
                RGBColor(253, 174, 107)
            };
            draw::rect(
                canvas,
                (x0, token_top),
                (x1, token_top + token_height),
                fill,
                None,
            )?;
        }
        draw::text(
            canvas,
            &format!("{frames} valid frames of 10 ms → ⌈⌈{frames}/2⌉/2⌉ = {tokens} soft tokens (40 ms each), each one placeholder in the prompt"),
            (LEFT, token_top + token_height + 18),
            11,
        )?;
        let note = if features_width + 1.0 < plot_width as f64 {
            format!(
                "time → ({seconds:.2} s; features stop at {:.2} s: clips are cut to 30 s)",
                frames as f64 * 0.010
            )
        } else {
            format!("time → ({seconds:.2} s)")
        };
        draw::text(canvas, &note, (LEFT, 540), 10)?;
        Ok(())
    })
}
