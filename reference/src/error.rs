//! Errors of the reference crate.
//!
//! Every error names the file, tensor or config field it is about and says what was expected,
//! so that a user who hands us a damaged checkpoint learns what to fix without a debugger.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong when loading a Gemma 4 checkpoint or running it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read (missing, permissions, ...).
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A JSON file (config.json, the shard index) is not valid JSON.
    #[error("{path}: invalid JSON: {message}")]
    Json { path: PathBuf, message: String },

    /// A config.json field is missing, has the wrong type, or contradicts another field.
    #[error("{path}: config field `{field}`: {message}")]
    Config {
        path: PathBuf,
        field: String,
        message: String,
    },

    /// A safetensors file is malformed as a whole (header length, JSON, offsets).
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },

    /// One tensor of a checkpoint is missing, mis-shaped or of an unsupported dtype.
    #[error("{path}: tensor `{tensor}`: {message}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        message: String,
    },

    /// The inputs of a forward pass are unusable (empty, token id out of range, ...).
    #[error("invalid input: {message}")]
    Input { message: String },

    /// An image file is unreadable, truncated, of an unsupported format, or too large to decode.
    #[error("{path}: {message}")]
    Image { path: PathBuf, message: String },

    /// An audio file is unreadable, truncated, empty, of an unsupported encoding, or not 16 kHz mono.
    #[error("{path}: {message}")]
    Audio { path: PathBuf, message: String },

    /// The forward pass produced a NaN or an infinity.
    #[error("non-finite value in `{tensor}` at index {index:?}: {value}")]
    NonFinite {
        tensor: String,
        index: Vec<usize>,
        value: f32,
    },
}

impl Error {
    pub(crate) fn config(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Config {
            path: path.into(),
            field: field.into(),
            message: message.into(),
        }
    }

    pub(crate) fn tensor(
        path: impl Into<PathBuf>,
        tensor: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Tensor {
            path: path.into(),
            tensor: tensor.into(),
            message: message.into(),
        }
    }

    pub(crate) fn image(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Image {
            path: path.into(),
            message: message.into(),
        }
    }

    pub(crate) fn audio(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Audio {
            path: path.into(),
            message: message.into(),
        }
    }

    pub(crate) fn input(message: impl Into<String>) -> Self {
        Error::Input {
            message: message.into(),
        }
    }
}
