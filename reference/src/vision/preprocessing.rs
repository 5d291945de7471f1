//! Placeholder while the preprocessing module is being written (helper in progress).
use std::path::Path;

use crate::error::{Error, Result};

pub const SUPPORTED_BUDGETS: [usize; 5] = [70, 140, 280, 560, 1120];

pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

pub struct ImagePatches {
    pub pixel_values: ndarray::Array2<f32>,
    pub positions: Vec<[usize; 2]>,
    pub resized_height: usize,
    pub resized_width: usize,
    pub soft_tokens: usize,
}

pub fn load_image(path: &Path) -> Result<RgbImage> {
    Err(Error::input(format!(
        "{}: image decoding not built yet",
        path.display()
    )))
}

pub fn resized_size(_height: usize, _width: usize, _budget: usize) -> Result<(usize, usize)> {
    Err(Error::input("not built yet"))
}

pub fn preprocess(_image: &RgbImage, _budget: usize) -> Result<ImagePatches> {
    Err(Error::input("not built yet"))
}
