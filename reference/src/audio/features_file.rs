//! Log-mel features from a file (`--audio-features FILE`): skips the audio front end, so a port
//! can feed exactly the frames it computed (like `--pixel-values` for images).
//!
//! One safetensors file: `input_features` `[F, 128]` F32, the valid frames of one clip; with
//! several clips `input_features.0`, `input_features.1`, …

use std::path::Path;

use ndarray::Array2;

use crate::dump::{ActivationDump, DumpTensor};
use crate::error::{Error, Result};

/// The valid log-mel frames of every clip of a features file, in index order.
pub fn read_audio_features(path: &Path) -> Result<Vec<Array2<f32>>> {
    let dump = ActivationDump::read(path)?;
    let names = dump.names_in_model_order();
    let suffixes: Vec<String> = if names.contains(&"input_features") {
        vec![String::new()]
    } else {
        let mut indices: Vec<usize> = names
            .iter()
            .filter_map(|n| n.strip_prefix("input_features.")?.parse().ok())
            .collect();
        indices.sort_unstable();
        if indices.is_empty() {
            return Err(Error::tensor(
                path,
                "input_features",
                "missing: a features file holds `input_features` [frames, 128] (one clip) or `input_features.0`, `input_features.1`, ... (several)",
            ));
        }
        if let Some((expected, &found)) = indices.iter().enumerate().find(|(i, &n)| *i != n) {
            return Err(Error::tensor(
                path,
                format!("input_features.{expected}"),
                format!("missing: clips are numbered 0, 1, ... without gaps (found input_features.{found})"),
            ));
        }
        indices.iter().map(|i| format!(".{i}")).collect()
    };
    suffixes
        .iter()
        .map(|suffix| {
            let name = format!("input_features{suffix}");
            let values = match dump.get(&name) {
                Some(DumpTensor::F32(values)) => values,
                Some(DumpTensor::I64(_)) => {
                    return Err(Error::tensor(
                        path,
                        &name,
                        "is an integer tensor; features are F32",
                    ))
                }
                None => return Err(Error::tensor(path, &name, "missing")),
            };
            let features: Array2<f32> = values
                .clone()
                .into_dimensionality()
                .ok()
                .filter(|f: &Array2<f32>| f.ncols() == 128 && f.nrows() > 0)
                .ok_or_else(|| {
                    Error::tensor(
                        path,
                        &name,
                        format!(
                            "has shape {:?}; expected [frames, 128] with at least one frame",
                            values.shape()
                        ),
                    )
                })?;
            if let Some((index, value)) = features.indexed_iter().find(|(_, v)| !v.is_finite()) {
                return Err(Error::tensor(
                    path,
                    &name,
                    format!("holds the non-finite value {value} at {index:?}"),
                ));
            }
            Ok(features)
        })
        .collect()
}
