//! Preprocessed images from a file (`gemma4 dump --pixel-values FILE`, shared contracts §1):
//! skips the image preprocessing, so a port can feed exactly the pixels it computed.
//!
//! One safetensors file: `pixel_values` `[n, 3·p²]` F32 in [0, 1] (row in patch, column in
//! patch, channel) and `image_position_ids` `[n, 2]` I64 (x, y), valid patches only; with
//! several images `pixel_values.0`, `image_position_ids.0`, `pixel_values.1`, ….

use std::path::Path;

use ndarray::Array2;

use crate::dump::{ActivationDump, DumpTensor};
use crate::error::{Error, Result};
use crate::vision::ImageInput;

/// Reads the images of a pixel-values file, in index order.
pub fn read_pixel_values(path: &Path) -> Result<Vec<ImageInput>> {
    let dump = ActivationDump::read(path)?;
    let names: Vec<&str> = dump.names_in_model_order();
    let single = names.contains(&"pixel_values");
    let suffixes: Vec<String> = if single {
        vec![String::new()]
    } else {
        let mut indices: Vec<usize> = names
            .iter()
            .filter_map(|n| n.strip_prefix("pixel_values.")?.parse().ok())
            .collect();
        indices.sort_unstable();
        if indices.is_empty() {
            return Err(Error::tensor(
                path,
                "pixel_values",
                "missing: a pixel-values file holds `pixel_values` and `image_position_ids` (one image) or `pixel_values.0`, `image_position_ids.0`, ... (several)",
            ));
        }
        if let Some((expected, &found)) = indices.iter().enumerate().find(|(i, &n)| *i != n) {
            return Err(Error::tensor(
                path,
                format!("pixel_values.{expected}"),
                format!("missing: images are numbered 0, 1, ... without gaps (found pixel_values.{found})"),
            ));
        }
        indices.iter().map(|i| format!(".{i}")).collect()
    };
    suffixes
        .iter()
        .map(|suffix| read_one(path, &dump, suffix))
        .collect()
}

/// One image's `pixel_values{suffix}` and `image_position_ids{suffix}`.
fn read_one(path: &Path, dump: &ActivationDump, suffix: &str) -> Result<ImageInput> {
    let pixel_name = format!("pixel_values{suffix}");
    let position_name = format!("image_position_ids{suffix}");
    let pixels = match dump.get(&pixel_name) {
        Some(DumpTensor::F32(values)) => values,
        Some(DumpTensor::I64(_)) => {
            return Err(Error::tensor(
                path,
                &pixel_name,
                "is an integer tensor; pixel values are F32 in [0, 1]",
            ))
        }
        None => return Err(Error::tensor(path, &pixel_name, "missing")),
    };
    let positions = match dump.get(&position_name) {
        Some(DumpTensor::I64(values)) => values,
        Some(DumpTensor::F32(_)) => {
            return Err(Error::tensor(
                path,
                &position_name,
                "is a float tensor; positions are I64 (x, y)",
            ))
        }
        None => return Err(Error::tensor(path, &position_name, "missing")),
    };
    let pixel_values: Array2<f32> = pixels.clone().into_dimensionality().map_err(|_| {
        Error::tensor(
            path,
            &pixel_name,
            format!("has shape {:?}; expected [patches, 3·p²]", pixels.shape()),
        )
    })?;
    if let Some((index, &value)) = pixel_values
        .indexed_iter()
        .find(|(_, v)| !(0.0..=1.0).contains(*v))
    {
        return Err(Error::tensor(
            path,
            &pixel_name,
            format!("holds {value} at {index:?}; pixel values are in [0, 1] (the model maps them to [-1, 1] itself)"),
        ));
    }
    let shape = positions.shape();
    if shape != [pixel_values.nrows(), 2] {
        return Err(Error::tensor(
            path,
            &position_name,
            format!(
                "has shape {shape:?}; expected [{}, 2] (one (x, y) per patch of {pixel_name})",
                pixel_values.nrows()
            ),
        ));
    }
    let positions = positions
        .outer_iter()
        .enumerate()
        .map(|(i, row)| match (usize::try_from(row[0]), usize::try_from(row[1])) {
            (Ok(x), Ok(y)) => Ok([x, y]),
            _ => Err(Error::tensor(
                path,
                &position_name,
                format!(
                    "patch {i} is at ({}, {}); only valid patches belong in the file (no -1 padding)",
                    row[0], row[1]
                ),
            )),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ImageInput {
        pixel_values,
        positions,
    })
}
