//! The activation dump (shared contracts §2): named intermediate tensors of one run, stored as a
//! safetensors file. Float tensors are F32 and index tensors I64, with no batch axis.
//!
//! The forward pass reports every intermediate through a [`Recorder`], which also checks it for
//! NaN and infinity, so a non-finite value is reported at the first tensor where it appears.

use std::collections::HashMap;
use std::path::Path;

use ndarray::{ArrayD, ArrayViewD, Dimension, IxDyn};
use safetensors::Dtype;

use crate::checkpoint::{SafetensorsFile, WeightDtype};
use crate::error::{Error, Result};
use crate::memory::{array_bytes, check_allocation};

/// One tensor of a dump.
#[derive(Clone, Debug, PartialEq)]
pub enum DumpTensor {
    F32(ArrayD<f32>),
    I64(ArrayD<i64>),
}

impl DumpTensor {
    pub fn shape(&self) -> &[usize] {
        match self {
            DumpTensor::F32(a) => a.shape(),
            DumpTensor::I64(a) => a.shape(),
        }
    }

    /// The values as f64, whatever the dtype (for comparisons).
    pub fn to_f64(&self) -> ArrayD<f64> {
        match self {
            DumpTensor::F32(a) => a.mapv(f64::from),
            DumpTensor::I64(a) => a.mapv(|v| v as f64),
        }
    }

    pub fn as_f32(&self) -> Option<&ArrayD<f32>> {
        match self {
            DumpTensor::F32(a) => Some(a),
            DumpTensor::I64(_) => None,
        }
    }

    pub fn as_i64(&self) -> Option<&ArrayD<i64>> {
        match self {
            DumpTensor::I64(a) => Some(a),
            DumpTensor::F32(_) => None,
        }
    }
}

/// A set of named tensors, kept in the order they were recorded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ActivationDump {
    entries: Vec<(String, DumpTensor)>,
    /// Dtype of each tensor as it was stored on disk (for dumps read from a file).
    stored_dtypes: HashMap<String, Dtype>,
}

impl ActivationDump {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a tensor.
    pub fn insert(&mut self, name: impl Into<String>, tensor: DumpTensor) {
        let name = name.into();
        match self.entries.iter_mut().find(|(n, _)| *n == name) {
            Some(entry) => entry.1 = tensor,
            None => self.entries.push((name, tensor)),
        }
    }

    pub fn insert_f32(&mut self, name: impl Into<String>, tensor: ArrayD<f32>) {
        self.insert(name, DumpTensor::F32(tensor));
    }

    pub fn insert_i64(&mut self, name: impl Into<String>, tensor: ArrayD<i64>) {
        self.insert(name, DumpTensor::I64(tensor));
    }

    pub fn get(&self, name: &str) -> Option<&DumpTensor> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// Removes and returns a tensor.
    pub fn remove(&mut self, name: &str) -> Option<DumpTensor> {
        let index = self.entries.iter().position(|(n, _)| n == name)?;
        Some(self.entries.remove(index).1)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The first NaN or infinity in model order: `(tensor, index, value)`.
    pub fn first_non_finite(&self) -> Option<(&str, Vec<usize>, f32)> {
        self.names_in_model_order().into_iter().find_map(|name| {
            let values = self.get(name)?.as_f32()?;
            let (index, &value) = values.indexed_iter().find(|(_, v)| !v.is_finite())?;
            Some((name, index.slice().to_vec(), value))
        })
    }

    /// Names in model order (see [`model_order_key`]).
    pub fn names_in_model_order(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.entries.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_by_cached_key(|n| model_order_key(n));
        names
    }

    /// The dtype a tensor had in the file it was read from (F32/I64 for dumps made in memory).
    pub fn stored_dtype(&self, name: &str) -> Option<Dtype> {
        self.stored_dtypes.get(name).copied().or_else(|| {
            self.get(name).map(|t| match t {
                DumpTensor::F32(_) => Dtype::F32,
                DumpTensor::I64(_) => Dtype::I64,
            })
        })
    }

    /// Writes the dump as safetensors, atomically: a temporary file next to `path` is written,
    /// flushed and renamed, so an interrupted run never leaves a half-written dump. Tensors are
    /// written one at a time: the file is never held whole in memory (a large model's dump is
    /// GBs).
    pub fn write(&self, path: &Path, metadata: &[(&str, &str)]) -> Result<()> {
        write_atomically_with(path, |temporary| {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(temporary)?;
            let mut writer = std::io::BufWriter::with_capacity(1 << 20, file);
            self.serialize_into(&mut writer, metadata)?;
            let file = writer.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()
        })
    }

    /// The dump as the bytes of a safetensors file (what [`ActivationDump::write`] writes).
    pub fn to_bytes(&self, metadata: &[(&str, &str)]) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        self.serialize_into(&mut bytes, metadata)
            .map_err(|e| Error::Safetensors {
                path: Path::new("<in memory>").to_path_buf(),
                message: format!("cannot serialise the dump: {e}"),
            })?;
        Ok(bytes)
    }

    /// Writes the safetensors format: the 8-byte little-endian header length, the JSON header
    /// (`__metadata__`, then per tensor its dtype, shape and `data_offsets`; padded with spaces
    /// to a multiple of 8 bytes), then every tensor's little-endian bytes in the order the
    /// header lists them (by name). One tensor's bytes are made at a time.
    fn serialize_into(
        &self,
        out: &mut impl std::io::Write,
        metadata: &[(&str, &str)],
    ) -> std::io::Result<()> {
        let mut entries: Vec<&(String, DumpTensor)> = self.entries.iter().collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let mut header = serde_json::Map::new();
        let mut info: std::collections::BTreeMap<String, String> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        info.entry("format".into())
            .or_insert_with(|| "gemma4-activation-dump".into());
        header.insert("__metadata__".into(), serde_json::json!(info));
        let mut offset = 0usize;
        for (name, tensor) in &entries {
            let (dtype, size) = match tensor {
                DumpTensor::F32(_) => ("F32", 4),
                DumpTensor::I64(_) => ("I64", 8),
            };
            let length = tensor.shape().iter().product::<usize>() * size;
            header.insert(
                name.clone(),
                serde_json::json!({
                    "dtype": dtype,
                    "shape": tensor.shape(),
                    "data_offsets": [offset, offset + length],
                }),
            );
            offset += length;
        }
        let mut header =
            serde_json::to_vec(&serde_json::Value::Object(header)).expect("a JSON map serialises");
        header.resize(header.len().next_multiple_of(8), b' ');
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&header)?;
        for (_, tensor) in &entries {
            let bytes: Vec<u8> = match tensor {
                DumpTensor::F32(a) => a.iter().flat_map(|v| v.to_le_bytes()).collect(),
                DumpTensor::I64(a) => a.iter().flat_map(|v| v.to_le_bytes()).collect(),
            };
            out.write_all(&bytes)?;
        }
        Ok(())
    }

    /// Keeps only the tensors `filter` selects (and `input_ids`, always kept).
    pub fn retain(&mut self, filter: &TensorFilter) {
        self.entries
            .retain(|(name, _)| name == "input_ids" || filter.keeps(name));
    }

    /// Reads a dump. Float tensors stored as F32, BF16, F16 or F64 are widened (or narrowed) to
    /// f32, integer tensors (I64, I32, U32, ...) become i64; other dtypes are an error naming the
    /// tensor, and so is a contract tensor in the wrong kind of dtype (see
    /// [`ActivationDump::from_bytes`]).
    pub fn read(path: &Path) -> Result<Self> {
        Self::from_file(SafetensorsFile::open(path)?)
    }

    /// Reads a dump held in memory (`path` only labels errors); the same checks as
    /// [`ActivationDump::read`]: the safetensors header is validated, every tensor's dtype must
    /// be a dump dtype, the contract's index tensors (`input_ids`, `greedy_continuation`,
    /// `*.router.top_k_index`) must be integers and every other contract tensor a float, and a
    /// tensor too large for the available memory is refused before it is converted.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        Self::from_file(SafetensorsFile::from_bytes(path, bytes)?)
    }

    fn from_file(file: SafetensorsFile) -> Result<Self> {
        let path = file.path.as_path();
        let mut names: Vec<&str> = file.names().collect();
        names.sort_by_cached_key(|n| model_order_key(n));
        let mut dump = ActivationDump::new();
        for name in names {
            let (dtype, shape) = file.info(name).expect("listed");
            let shape = shape.to_vec();
            let bytes = file.bytes(name).expect("listed");
            check_dump_dtype(path, name, dtype)?;
            check_allocation(
                path,
                name,
                array_bytes(&shape, if is_float_dtype(dtype) { 4 } else { 8 }),
                &format!("reading {dtype:?} {shape:?}"),
            )?;
            let tensor = match dtype {
                Dtype::F32 | Dtype::BF16 | Dtype::F16 => {
                    let weight_dtype =
                        WeightDtype::from_safetensors(dtype).expect("F32, BF16 and F16");
                    DumpTensor::F32(to_array(path, name, &shape, weight_dtype.decode(bytes))?)
                }
                Dtype::F64 => DumpTensor::F32(to_array(
                    path,
                    name,
                    &shape,
                    bytes
                        .chunks_exact(8)
                        .map(|b| f64::from_le_bytes(b.try_into().expect("8")) as f32),
                )?),
                Dtype::I64 => DumpTensor::I64(to_array(
                    path,
                    name,
                    &shape,
                    bytes
                        .chunks_exact(8)
                        .map(|b| i64::from_le_bytes(b.try_into().expect("8"))),
                )?),
                Dtype::I32 => DumpTensor::I64(to_array(
                    path,
                    name,
                    &shape,
                    bytes
                        .chunks_exact(4)
                        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64),
                )?),
                Dtype::U32 => DumpTensor::I64(to_array(
                    path,
                    name,
                    &shape,
                    bytes
                        .chunks_exact(4)
                        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64),
                )?),
                Dtype::I16 => DumpTensor::I64(to_array(
                    path,
                    name,
                    &shape,
                    bytes
                        .chunks_exact(2)
                        .map(|b| i16::from_le_bytes([b[0], b[1]]) as i64),
                )?),
                Dtype::U8 => DumpTensor::I64(to_array(
                    path,
                    name,
                    &shape,
                    bytes.iter().map(|&b| b as i64),
                )?),
                _ => unreachable!("check_dump_dtype admits only the dtypes above"),
            };
            dump.stored_dtypes.insert(name.to_string(), dtype);
            // The names of a file are unique: no entry to replace.
            dump.entries.push((name.to_string(), tensor));
        }
        Ok(dump)
    }
}

/// Is `name` one of the contract's index tensors (ids, chosen experts), stored as integers?
pub fn is_index_tensor_name(name: &str) -> bool {
    name == "input_ids" || name == "greedy_continuation" || name.ends_with("router.top_k_index")
}

/// Is `name` a float tensor of the dump contract (shared contracts §2)?
fn is_contract_float_tensor(name: &str) -> bool {
    // Rank 10: not a contract name; rank 5 with part rank 99: an unknown part of a layer.
    let known = !matches!(model_order_key(name), (10, ..) | (5, _, 99, _));
    known && !is_index_tensor_name(name)
}

fn is_float_dtype(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F32 | Dtype::F64 | Dtype::BF16 | Dtype::F16)
}

/// Refuses dtypes a dump cannot hold, and contract tensors stored in the wrong kind of dtype
/// (e.g. `logits` as I32, or `input_ids` as F32): comparing those would mislead.
fn check_dump_dtype(path: &Path, name: &str, dtype: Dtype) -> Result<()> {
    let float = is_float_dtype(dtype);
    let integer = matches!(
        dtype,
        Dtype::I64 | Dtype::I32 | Dtype::U32 | Dtype::I16 | Dtype::U8
    );
    let message = if !float && !integer {
        format!(
            "dtype {dtype:?} is not a dump dtype (use F32, BF16, F16 for values, I64 for indices)"
        )
    } else if is_index_tensor_name(name) && !integer {
        format!("is an index tensor stored as {dtype:?}; indices must be integers (I64)")
    } else if is_contract_float_tensor(name) && !float {
        format!(
            "is an activation stored as {dtype:?}; activations must be floats (F32, BF16 or F16)"
        )
    } else {
        return Ok(());
    };
    Err(Error::tensor(path, name, message))
}

/// Builds an array of `shape` from its values; a shape the values cannot fill (only possible
/// for shapes whose size does not fit in memory, e.g. `[0, 2^63]`) is an error naming the tensor.
fn to_array<T>(
    path: &Path,
    name: &str,
    shape: &[usize],
    values: impl Iterator<Item = T>,
) -> Result<ArrayD<T>> {
    ArrayD::from_shape_vec(IxDyn(shape), values.collect()).map_err(|e| {
        Error::tensor(
            path,
            name,
            format!("shape {shape:?} cannot be represented as an array: {e}"),
        )
    })
}

/// The `input_ids` tensor of a dump: `[T]`, I64.
pub fn input_ids_tensor(token_ids: &[usize]) -> ArrayD<i64> {
    ArrayD::from_shape_vec(
        IxDyn(&[token_ids.len()]),
        token_ids.iter().map(|&t| t as i64).collect(),
    )
    .expect("a 1-D shape holds its own length")
}

/// Writes `bytes` to `path` atomically ([`write_atomically_with`]).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    write_atomically_with(path, |temporary| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(temporary)?;
        file.write_all(bytes)?;
        file.sync_all()
    })
}

/// Writes `path` through a temporary file in the same directory and a rename: `write` fills
/// the (created, empty) temporary file and flushes it to disk.
///
/// The temporary file (`.<name>.<pid>.<n>.partial`, unique per process and call) is written,
/// flushed to disk and renamed over `path`; on any failure it is removed and `path` is left
/// as it was. A process killed midway leaves at most the hidden `.partial` file, never a
/// half-written file under `path`. An existing `path` that is not a regular file (a directory,
/// a device such as `/dev/null`, a pipe) is refused rather than replaced.
pub fn write_atomically_with(
    path: &Path,
    write: impl FnOnce(&Path) -> std::io::Result<()>,
) -> Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let io_error = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let directory = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // Renaming over a device or a pipe (`--out /dev/null` as root) would replace it.
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
        return Err(io_error(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "exists and is not a regular file (a directory, device or pipe); refusing to replace it",
        )));
    }
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("dump");
    let temporary = directory.join(format!(
        ".{file_name}.{}.{}.partial",
        std::process::id(),
        CALLS.fetch_add(1, Ordering::Relaxed)
    ));
    let mut created = false;
    let result = (|| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temporary)?;
        created = true;
        write(&temporary)?;
        std::fs::rename(&temporary, path)?;
        created = false;
        // Make the rename itself durable (best effort: not every file system syncs directories).
        if let Ok(dir) = std::fs::File::open(directory) {
            let _ = dir.sync_all();
        }
        Ok(())
    })();
    if created {
        let _ = std::fs::remove_file(&temporary);
    }
    result.map_err(io_error)
}

/// `(i, part)` of a decoder-layer tensor name `layers.{i}.{part}` (shared contracts §2), e.g.
/// `layers.3.attn.q` → `(3, "attn.q")`; `None` for any other name.
pub fn layer_and_part(name: &str) -> Option<(usize, &str)> {
    let (index, part) = name.strip_prefix("layers.")?.split_once('.')?;
    Some((index.parse().ok()?, part))
}

/// Sort key putting dump names in model order: inputs, vision, audio, embeddings, PLE, then each
/// layer (q, k, v, attention output, MLP, router, MoE, layer output), final norm, logits, decode.
pub fn model_order_key(name: &str) -> (u32, u64, u32, String) {
    const LAYER_PARTS: [&str; 9] = [
        "attn.q",
        "attn.k",
        "attn.v",
        "attn.output",
        "mlp.output",
        "router.top_k_index",
        "router.top_k_weights",
        "moe.output",
        "output",
    ];
    let part_rank = |part: &str| {
        LAYER_PARTS
            .iter()
            .position(|p| *p == part)
            .map_or(99, |i| i as u32)
    };
    // `<tower>.<clip>.layers.<i>.<part>` or `<tower>.layers.<i>.<part>`
    let layered = |rest: &str| -> Option<(u64, String)> {
        let (index, part) = layer_and_part(rest)?;
        Some((index as u64, part.to_string()))
    };
    let group = |tower_rank: u32, rest: &str| -> (u32, u64, u32, String) {
        // Sub-order inside a tower: inputs, embeddings, layers, soft tokens.
        let (clip, rest) = match rest.split_once('.') {
            Some((clip, tail)) if clip.parse::<u64>().is_ok() => {
                (clip.parse::<u64>().unwrap_or(0), tail)
            }
            _ => (0, rest),
        };
        let inner = match rest {
            "pixel_values" | "features" => (0, 0),
            "patch_embeddings" | "subsample" => (1, 0),
            "soft_tokens" => (3, 0),
            other => match layered(other) {
                Some((i, _)) => (2, i),
                None => (4, 0),
            },
        };
        (
            tower_rank,
            clip * 1_000_000 + inner.0 * 100_000 + inner.1,
            0,
            rest.to_string(),
        )
    };
    match name {
        "input_ids" => (0, 0, 0, String::new()),
        "embeddings" => (3, 0, 0, String::new()),
        "per_layer_inputs" => (4, 0, 0, String::new()),
        "final_norm" => (6, 0, 0, String::new()),
        "logits" => (7, 0, 0, String::new()),
        "decode_logits" => (8, 0, 0, String::new()),
        "greedy_continuation" => (9, 0, 0, String::new()),
        _ => {
            if let Some(rest) = name.strip_prefix("vision.") {
                group(1, rest)
            } else if let Some(rest) = name.strip_prefix("audio.") {
                group(2, rest)
            } else if let Some((index, part)) = layered(name) {
                (5, index, part_rank(&part), part)
            } else {
                (10, 0, 0, name.to_string())
            }
        }
    }
}

/// Receives every intermediate tensor of a forward pass: checks it is finite and, when a dump is
/// attached, stores it under its contract name.
pub struct Recorder<'a> {
    dump: Option<&'a mut ActivationDump>,
    filter: TensorFilter,
}

impl<'a> Recorder<'a> {
    /// A recorder that stores into `dump`.
    pub fn new(dump: &'a mut ActivationDump) -> Self {
        Recorder {
            dump: Some(dump),
            filter: TensorFilter::all(),
        }
    }

    /// The same recorder storing only the tensors `filter` keeps (all are still checked).
    pub fn keeping(mut self, filter: &TensorFilter) -> Self {
        self.filter = filter.clone();
        self
    }

    /// A recorder that only checks finiteness.
    pub fn checking_only() -> Self {
        Recorder {
            dump: None,
            filter: TensorFilter::all(),
        }
    }

    /// Checks `tensor` for NaN/inf (an error naming it and the first bad index) and stores it.
    pub fn record(&mut self, name: &str, tensor: ArrayViewD<f32>) -> Result<()> {
        // A fast scan first; the (slower) indexed scan only runs to locate a bad element.
        let finite = match tensor.as_slice() {
            Some(values) => all_finite(values),
            None => tensor.iter().all(|v| v.is_finite()),
        };
        if !finite {
            let (index, &value) = tensor
                .indexed_iter()
                .find(|(_, v)| !v.is_finite())
                .expect("the scan above found a non-finite element");
            return Err(Error::NonFinite {
                tensor: name.to_string(),
                index: index.as_array_view().to_vec(),
                value,
            });
        }
        if let Some(dump) = self.dump.as_deref_mut().filter(|_| self.filter.keeps(name)) {
            dump.insert_f32(name, tensor.to_owned());
        }
        Ok(())
    }

    /// Stores an index tensor (no finiteness to check).
    pub fn record_indices(&mut self, name: &str, tensor: ArrayD<i64>) {
        if let Some(dump) = self.dump.as_deref_mut().filter(|_| self.filter.keeps(name)) {
            dump.insert_i64(name, tensor);
        }
    }
}

/// True when every value is finite. Checks blocks without stopping early inside one (`&`, not
/// `&&`), which the compiler turns into SIMD: the engines record every intermediate, so this
/// scan runs on all of them.
fn all_finite(values: &[f32]) -> bool {
    values
        .chunks(1024)
        .all(|block| block.iter().fold(true, |ok, v| ok & v.is_finite()))
}

/// Which dump tensors to keep (`gemma4 dump --tensors PATTERN`): comma-separated patterns in
/// which `*` stands for any run of characters inside one dot-separated part and `**` for any
/// run at all, e.g. `logits,layers.*.output` (every layer's output) or `vision.**`; a pattern
/// without `*` names one tensor. The empty filter keeps everything. Every tensor is
/// still computed and checked finite; only the kept ones are stored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TensorFilter {
    patterns: Vec<String>,
}

impl TensorFilter {
    /// Keeps every tensor.
    pub fn all() -> Self {
        Self::default()
    }

    /// Parses `logits,layers.*.output`: an error for an empty pattern (`a,,b`) or one with
    /// characters no tensor name has.
    pub fn parse(text: &str) -> Result<Self> {
        let mut patterns = Vec::new();
        for pattern in text.split(',').map(str::trim) {
            if pattern.is_empty() {
                return Err(Error::input(format!(
                    "--tensors `{text}`: an empty pattern (names are separated by single commas)"
                )));
            }
            if let Some(bad) = pattern
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '*')))
            {
                return Err(Error::input(format!(
                    "--tensors: pattern `{pattern}` holds `{bad}`; tensor names (shared contracts \
                     §2) have letters, digits, `_` and `.`; `*` matches within one dot-separated \
                     part, `**` across parts"
                )));
            }
            patterns.push(pattern.to_string());
        }
        Ok(TensorFilter { patterns })
    }

    /// Does the filter keep the tensor `name`?
    pub fn keeps(&self, name: &str) -> bool {
        self.patterns.is_empty() || self.patterns.iter().any(|p| glob_matches(p, name))
    }

    /// The patterns that select none of `names` (a typo the caller should refuse).
    pub fn unmatched<'a>(&'a self, names: &[&str]) -> Vec<&'a str> {
        self.patterns
            .iter()
            .filter(|p| !names.iter().any(|name| glob_matches(p, name)))
            .map(String::as_str)
            .collect()
    }

    /// Is this the keep-everything filter?
    pub fn is_all(&self) -> bool {
        self.patterns.is_empty()
    }
}

/// Does `name` match `pattern`? `*` matches any run of characters within one dot-separated
/// part of the name (`layers.*.output` is every layer's output, not `layers.0.attn.output`);
/// `**` matches any run, dots included (`**.output` is every tensor ending in `.output`).
fn glob_matches(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    // Classic backtracking wildcard matching over bytes (names are ASCII).
    fn matches(p: &[u8], n: &[u8]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some(b'*') => {
                let across_dots = p.get(1) == Some(&b'*');
                let rest = if across_dots { &p[2..] } else { &p[1..] };
                for skip in 0..=n.len() {
                    if skip > 0 && !across_dots && n[skip - 1] == b'.' {
                        break;
                    }
                    if matches(rest, &n[skip..]) {
                        return true;
                    }
                }
                false
            }
            Some(&c) => n.first() == Some(&c) && matches(&p[1..], &n[1..]),
        }
    }
    matches(p, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_filter_patterns() {
        let filter = TensorFilter::parse("logits,layers.*.output,**top_k_index").unwrap();
        for kept in [
            "logits",
            "layers.0.output",
            "layers.12.output",
            "layers.3.router.top_k_index",
        ] {
            assert!(filter.keeps(kept), "{kept}");
        }
        for dropped in [
            "layers.0.attn.output",
            "final_norm",
            "logits2",
            "vision.layers.0.output",
        ] {
            assert!(!filter.keeps(dropped), "{dropped}");
        }
        let across = TensorFilter::parse("**.output").unwrap();
        assert!(across.keeps("vision.layers.0.output") && across.keeps("layers.1.mlp.output"));
        assert!(!across.keeps("logits"));
        assert!(TensorFilter::all().keeps("anything"));
        assert_eq!(
            filter.unmatched(&["logits", "layers.0.output"]),
            vec!["**top_k_index"]
        );
        assert!(TensorFilter::parse("a,,b").is_err());
        assert!(TensorFilter::parse("layers.[0-3].output").is_err());
    }

    #[test]
    fn recorder_names_the_first_non_finite_element_wherever_it_is() {
        // Positions at both ends of the 1024-value blocks of the fast scan, and the last one.
        for (at, bad) in [
            (0, f32::NAN),
            (1023, f32::INFINITY),
            (1024, f32::NEG_INFINITY),
            (2999, f32::NAN),
        ] {
            let mut values = vec![1.0f32; 3000];
            values[at] = bad;
            let tensor = ArrayViewD::from_shape(IxDyn(&[3, 1000]), &values).unwrap();
            match Recorder::checking_only().record("t", tensor) {
                Err(Error::NonFinite {
                    tensor,
                    index,
                    value,
                }) => {
                    assert_eq!((tensor.as_str(), index), ("t", vec![at / 1000, at % 1000]));
                    assert_eq!(value.to_bits(), bad.to_bits());
                }
                other => panic!("{bad} at {at}: expected NonFinite, got {other:?}"),
            }
        }
        let finite = vec![f32::MAX; 3000];
        let view = ArrayViewD::from_shape(IxDyn(&[3000]), &finite).unwrap();
        assert!(Recorder::checking_only().record("t", view).is_ok());
    }

    #[test]
    fn layer_and_part_parses_decoder_layer_names_only() {
        assert_eq!(layer_and_part("layers.3.attn.q"), Some((3, "attn.q")));
        assert_eq!(layer_and_part("layers.12.output"), Some((12, "output")));
        assert_eq!(layer_and_part("layers.x.output"), None);
        assert_eq!(layer_and_part("layers.3"), None);
        assert_eq!(layer_and_part("logits"), None);
        assert_eq!(layer_and_part("vision.layers.0.output"), None);
    }
}
