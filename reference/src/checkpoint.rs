//! Reading Hugging Face safetensors checkpoints. All knowledge of HF tensor names lives here.
//!
//! A checkpoint directory holds `model.safetensors`, or `model.safetensors.index.json` plus the
//! shards it lists (shared contracts §1). Files are memory-mapped; a tensor is converted to f32
//! only when it is loaded, so reading a header (for `gemma4 inspect`) touches almost nothing.
//!
//! Tensor names (shared spec: text §3): the text weights are under `model.language_model.`
//! (`Gemma4ForConditionalGeneration`) or `model.` (`Gemma4ForCausalLM`); the LM head is tied to
//! `embed_tokens.weight` unless `tie_word_embeddings` is false; KV-shared layers have no
//! `k_proj`/`v_proj`/`k_norm` (stray ones are ignored); K=V layers have no `v_proj`.
//! Weights may be F32, BF16 or F16; the reference converts them all to f32.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use ndarray::{Array, Array1, Array2, Array3, ArrayD, Dimension, Ix1, IxDyn};
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use serde_json::Value;

use crate::config::{CheckpointLayout, ModelConfig, TextConfig};
use crate::error::{Error, Result};
use crate::layer_plan::{LayerPlan, ModelPlan};
use crate::memory::{array_bytes, check_allocation, read_bounded, MAX_JSON_FILE_BYTES};

/// The storage dtype of a weight. It matters beyond loading: the embedding scale `sqrt(D)` is
/// rounded to the embedding table's dtype (shared spec: text §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum WeightDtype {
    F32,
    BF16,
    F16,
}

impl WeightDtype {
    /// Rounds an f32 value to this dtype and back (what `tensor.to(dtype)` does in torch).
    pub fn round(self, value: f32) -> f32 {
        match self {
            WeightDtype::F32 => value,
            WeightDtype::BF16 => half::bf16::from_f32(value).to_f32(),
            WeightDtype::F16 => half::f16::from_f32(value).to_f32(),
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            WeightDtype::F32 => 4,
            WeightDtype::BF16 | WeightDtype::F16 => 2,
        }
    }

    /// The values of little-endian bytes stored in this dtype, widened to f32 (exactly: every
    /// BF16 and F16 value is an f32 value). A trailing partial element is ignored.
    pub fn decode(self, bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
        bytes.chunks_exact(self.size()).map(move |b| match self {
            WeightDtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            WeightDtype::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            WeightDtype::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
        })
    }

    /// The weight dtype of a safetensors dtype (`None` for non-float dtypes and F64).
    pub(crate) fn from_safetensors(dtype: Dtype) -> Option<WeightDtype> {
        match dtype {
            Dtype::F32 => Some(WeightDtype::F32),
            Dtype::BF16 => Some(WeightDtype::BF16),
            Dtype::F16 => Some(WeightDtype::F16),
            _ => None,
        }
    }
}

/// Where one tensor lives in a file: dtype, shape and byte range inside the data section.
type TensorEntry = (Dtype, Vec<usize>, (usize, usize));

/// The bytes of a safetensors file: memory-mapped from disk, or owned (in-memory inputs).
enum Storage {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Storage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Storage::Mapped(mmap) => mmap,
            Storage::Owned(bytes) => bytes,
        }
    }
}

/// One safetensors file (memory-mapped or in memory) whose header has been validated.
pub struct SafetensorsFile {
    pub path: PathBuf,
    storage: Storage,
    /// The open file behind a mapped one, for ordinary reads ([`SafetensorsFile::read`]).
    file: Option<File>,
    /// Byte offset of the data section (8 + header length).
    data_start: usize,
    tensors: HashMap<String, TensorEntry>,
}

impl SafetensorsFile {
    /// Maps a file and validates its header (see [`SafetensorsFile::from_bytes`]).
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: the map is read-only; a file truncated by another process while mapped is
        // outside what we defend against (as for every mmap-based loader).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut parsed = Self::parse(path, Storage::Mapped(mmap))?;
        parsed.file = Some(file);
        Ok(parsed)
    }

    /// Validates the header of a whole safetensors file held in memory: JSON, dtypes, shapes,
    /// and offsets that tile the data section exactly. Any inconsistency is an error naming
    /// `path` (only a label here) and the tensor if one is at fault. [`SafetensorsFile::open`]
    /// runs the same checks on a mapped file.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(path, Storage::Owned(bytes))
    }

    fn parse(path: &Path, storage: Storage) -> Result<Self> {
        check_offsets_within_file(path, &storage)?;
        let (header_len, metadata) = SafeTensors::read_metadata(&storage)
            .map_err(|e| describe_safetensors_error(path, &storage, e))?;
        let mut tensors = HashMap::new();
        for (name, info) in metadata.tensors() {
            tensors.insert(name, (info.dtype, info.shape.clone(), info.data_offsets));
        }
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            storage,
            file: None,
            data_start: 8 + header_len,
            tensors,
        })
    }

    /// Names of every tensor in the file.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// `(dtype, shape)` of a tensor, if present.
    pub fn info(&self, name: &str) -> Option<(Dtype, &[usize])> {
        self.tensors
            .get(name)
            .map(|(dtype, shape, _)| (*dtype, shape.as_slice()))
    }

    /// Asks the kernel to back a mapped tensor's pages with transparent huge pages
    /// (`MADV_HUGEPAGE` on its byte range; nothing for in-memory files or other systems). Only
    /// advice: it shapes pages read from disk from now on (Linux then reads the file in 2 MiB
    /// folios and maps them whole), not ones already in the page cache.
    pub fn advise_huge_pages(&self, name: &str) -> std::io::Result<()> {
        #[cfg(target_os = "linux")]
        if let (Storage::Mapped(mmap), Some((_, _, (start, end)))) =
            (&self.storage, self.tensors.get(name))
        {
            return mmap.advise_range(
                memmap2::Advice::HugePage,
                self.data_start + start,
                end - start,
            );
        }
        let _ = name;
        Ok(())
    }

    /// Bytes `range` (relative to the start of the tensor's data) of a tensor, read from disk
    /// with an ordinary read rather than through the memory map: a read that fails (a disk
    /// error, a file truncated since it was opened) is an error naming the file and the tensor,
    /// not a `SIGBUS`, and none of the file's pages stays in this process's resident memory
    /// once the bytes are converted (the layer-streamed reference relies on both). In-memory
    /// files are copied from memory.
    pub fn read(&self, name: &str, range: std::ops::Range<usize>) -> Result<Vec<u8>> {
        let (_, _, (start, end)) = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::tensor(&self.path, name, "not in this file"))?;
        let length = end - start;
        if range.start > range.end || range.end > length {
            return Err(Error::tensor(
                &self.path,
                name,
                format!("bytes {range:?} asked of a tensor holding {length}"),
            ));
        }
        let offset = self.data_start + start + range.start;
        let count = range.len();
        let mut buffer = vec![0u8; count];
        match &self.file {
            #[cfg(unix)]
            Some(file) => {
                use std::os::unix::fs::FileExt;
                file.read_exact_at(&mut buffer, offset as u64)
                    .map_err(|e| {
                        Error::tensor(
                            &self.path,
                            name,
                            format!(
                                "reading {count} bytes at byte {offset} failed: {e} (the file \
                                 changed on disk since it was opened, or the disk failed)"
                            ),
                        )
                    })?;
            }
            _ => buffer.copy_from_slice(&self.storage[offset..offset + count]),
        }
        Ok(buffer)
    }

    /// Raw little-endian bytes of a tensor, through the memory map (the pages read stay mapped).
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        let (_, _, (start, end)) = self.tensors.get(name)?;
        // The header validation made every range lie inside the data section.
        self.storage
            .get(self.data_start.checked_add(*start)?..self.data_start.checked_add(*end)?)
    }
}

/// Refuses a header whose `data_offsets` point past the end of the file, naming the tensor,
/// before the safetensors crate sees it (its own check adds the largest offset to the header
/// length, which overflows for offsets near 2^64). Headers that are not readable JSON are left
/// to the safetensors crate, which describes them.
fn check_offsets_within_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let Some(map) = header_json(bytes) else {
        return Ok(());
    };
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("header_json read 8 bytes"));
    let data_len = (bytes.len() as u64)
        .saturating_sub(8)
        .saturating_sub(header_len);
    for (name, info) in &map {
        if name == "__metadata__" {
            continue;
        }
        let offsets = info.get("data_offsets").and_then(Value::as_array);
        let end = offsets.and_then(|o| o.get(1)).and_then(Value::as_u64);
        if let Some(end) = end.filter(|&end| end > data_len) {
            return Err(Error::tensor(
                path,
                name,
                format!(
                    "data_offsets end at byte {end} of the data section, but the file holds only \
                     {data_len} bytes of data (truncated, or a lying header)"
                ),
            ));
        }
    }
    Ok(())
}

/// Turns a safetensors parsing error into a message a user can act on.
fn describe_safetensors_error(path: &Path, bytes: &[u8], error: SafeTensorError) -> Error {
    let declared_header = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    let message = match error {
        SafeTensorError::HeaderTooSmall => format!("file is {} bytes, too short for the 8-byte header length", bytes.len()),
        SafeTensorError::HeaderTooLarge | SafeTensorError::InvalidHeaderLength => format!(
            "header length field says {} bytes but the file has {} bytes (truncated or not a safetensors file)",
            declared_header.unwrap_or(0),
            bytes.len()
        ),
        SafeTensorError::InvalidHeader(e) => format!("header is not UTF-8: {e}"),
        SafeTensorError::InvalidHeaderDeserialization(e) => format!("header is not valid safetensors JSON: {e}"),
        SafeTensorError::InvalidOffset(name) => format!(
            "tensor `{name}`: data_offsets do not follow the previous tensor (overlapping, gapped or reversed ranges)"
        ),
        SafeTensorError::TensorInvalidInfo => {
            format!("a tensor's byte range does not match its shape and dtype{}", find_size_mismatch(bytes))
        }
        SafeTensorError::ValidationOverflow => "a declared shape is so large that its byte size overflows".to_string(),
        SafeTensorError::MisalignedSlice => "a tensor's bit size is not a whole number of bytes".to_string(),
        SafeTensorError::MetadataIncompleteBuffer => {
            let header = declared_header.unwrap_or(0) as usize;
            format!(
                "the header's data_offsets end at {} bytes of data but the file holds {} bytes of data (truncated or padded)",
                declared_data_end(bytes).map_or("?".to_string(), |n| n.to_string()),
                bytes.len().saturating_sub(header.saturating_add(8))
            )
        }
        other => other.to_string(),
    };
    Error::Safetensors {
        path: path.to_path_buf(),
        message,
    }
}

/// The largest header the safetensors crate accepts (100 MB); larger ones are not parsed here.
const MAX_HEADER_BYTES: u64 = 100_000_000;

fn header_json(bytes: &[u8]) -> Option<serde_json::Map<String, Value>> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    if n > MAX_HEADER_BYTES {
        return None;
    }
    let n = n as usize;
    let header = bytes.get(8..8usize.checked_add(n)?)?;
    match serde_json::from_slice::<Value>(header).ok()? {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

fn declared_data_end(bytes: &[u8]) -> Option<u64> {
    header_json(bytes)?
        .values()
        .filter_map(|v| v.get("data_offsets")?.get(1)?.as_u64())
        .max()
}

/// Names the first tensor whose byte range disagrees with shape x dtype size.
fn find_size_mismatch(bytes: &[u8]) -> String {
    let Some(map) = header_json(bytes) else {
        return String::new();
    };
    for (name, info) in &map {
        if name == "__metadata__" {
            continue;
        }
        let (Some(dtype), Some(shape), Some(offsets)) = (
            info.get("dtype").and_then(Value::as_str),
            info.get("shape").and_then(Value::as_array),
            info.get("data_offsets").and_then(Value::as_array),
        ) else {
            continue;
        };
        let bytes_per = match dtype {
            "F64" | "I64" | "U64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            _ => 1,
        };
        let elements = shape
            .iter()
            .filter_map(Value::as_u64)
            .try_fold(1u64, |a, b| a.checked_mul(b));
        let (Some(start), Some(end)) = (
            offsets.first().and_then(Value::as_u64),
            offsets.get(1).and_then(Value::as_u64),
        ) else {
            continue;
        };
        if let Some(elements) = elements {
            if end.checked_sub(start) != elements.checked_mul(bytes_per) {
                return format!(
                    " (tensor `{name}`: {dtype} {shape:?} needs {} bytes, data_offsets [{start}, {end}] give {})",
                    elements.saturating_mul(bytes_per),
                    end as i128 - start as i128,
                    shape = shape.iter().filter_map(Value::as_u64).collect::<Vec<_>>()
                );
            }
        }
    }
    String::new()
}

/// `model.safetensors.index.json`: the shard file that holds each tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardIndex {
    /// Tensor name -> shard file name (a plain file name inside the checkpoint directory).
    pub weight_map: BTreeMap<String, String>,
}

impl ShardIndex {
    /// Parses and checks an index file's bytes; `path` labels errors. The `weight_map` must be a
    /// non-empty object of tensor name -> plain file name (no directories, no `..`).
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let entries = value
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| {
                Error::config(
                    path,
                    "weight_map",
                    "missing, or not an object mapping tensor names to shard files",
                )
            })?;
        if entries.is_empty() {
            return Err(Error::config(
                path,
                "weight_map",
                "is empty: the index lists no tensor, so no shard would be read",
            ));
        }
        let mut weight_map = BTreeMap::new();
        for (tensor, shard) in entries {
            let field = || format!("weight_map.{tensor}");
            let shard = shard.as_str().ok_or_else(|| {
                Error::config(
                    path,
                    field(),
                    format!("expected a shard file name, found {shard}"),
                )
            })?;
            let plain = !shard.is_empty()
                && shard != "."
                && shard != ".."
                && !shard.contains(['/', '\\', '\0']);
            if !plain {
                return Err(Error::config(
                    path,
                    field(),
                    format!("shard name `{shard}` must be a plain file name inside the checkpoint directory"),
                ));
            }
            weight_map.insert(tensor.clone(), shard.to_string());
        }
        Ok(ShardIndex { weight_map })
    }

    /// The distinct shard file names, sorted.
    pub fn shard_names(&self) -> Vec<&str> {
        let names: std::collections::BTreeSet<&str> =
            self.weight_map.values().map(String::as_str).collect();
        names.into_iter().collect()
    }
}

/// A checkpoint directory: one or more safetensors files, indexed by tensor name.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub files: Vec<SafetensorsFile>,
    /// tensor name -> index into `files`
    index: BTreeMap<String, usize>,
}

impl Checkpoint {
    /// Opens `dir/model.safetensors`, or the shards listed by `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single_path = dir.join("model.safetensors");
        if index_path.exists() {
            let bytes = read_bounded(&index_path, MAX_JSON_FILE_BYTES)?;
            let shard_index = ShardIndex::parse(&bytes, &index_path)?;
            let files = shard_index
                .shard_names()
                .into_iter()
                .map(|shard| SafetensorsFile::open(&dir.join(shard)))
                .collect::<Result<Vec<_>>>()?;
            let checkpoint = Checkpoint::from_files(dir, files)?;
            checkpoint.check_shard_index(&shard_index, &index_path)?;
            Ok(checkpoint)
        } else if single_path.exists() {
            Checkpoint::from_files(dir, vec![SafetensorsFile::open(&single_path)?])
        } else {
            Err(Error::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors or model.safetensors.index.json in this directory",
                ),
            })
        }
    }

    /// A checkpoint made of already-validated files (the shards, or one `model.safetensors`);
    /// `dir` labels errors. A tensor name present in two files is an error naming both.
    pub fn from_files(dir: &Path, files: Vec<SafetensorsFile>) -> Result<Self> {
        let mut index = BTreeMap::new();
        for (file_index, file) in files.iter().enumerate() {
            for name in file.names() {
                if let Some(previous) = index.insert(name.to_string(), file_index) {
                    return Err(Error::tensor(
                        &file.path,
                        name,
                        format!("also present in {}", files[previous].path.display()),
                    ));
                }
            }
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files,
            index,
        })
    }

    /// Checks that every tensor of the index is in the shard the index names (`index_path`
    /// labels errors).
    pub fn check_shard_index(&self, shard_index: &ShardIndex, index_path: &Path) -> Result<()> {
        for (tensor, shard) in &shard_index.weight_map {
            let holder = self
                .file_of(tensor)
                .and_then(|file| file.path.file_name())
                .and_then(|name| name.to_str());
            if holder != Some(shard.as_str()) {
                return Err(Error::tensor(
                    index_path,
                    tensor,
                    format!("the index places it in `{shard}`, but that shard does not contain it"),
                ));
            }
        }
        Ok(())
    }

    /// Every tensor name in the checkpoint, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// The file holding a tensor.
    pub fn file_of(&self, name: &str) -> Option<&SafetensorsFile> {
        self.index.get(name).map(|&i| &self.files[i])
    }

    /// `(dtype, shape)` of a tensor, if present.
    pub fn info(&self, name: &str) -> Option<(Dtype, &[usize])> {
        self.file_of(name)?.info(name)
    }

    /// Checks that a tensor exists with exactly `shape` and a float dtype; returns its dtype.
    pub fn check(&self, name: &str, shape: &[usize]) -> Result<WeightDtype> {
        let Some(file) = self.file_of(name) else {
            return Err(Error::tensor(
                &self.dir,
                name,
                format!("missing from the checkpoint (expected shape {shape:?})"),
            ));
        };
        let (dtype, found) = file.info(name).expect("indexed tensor exists");
        let weight_dtype = WeightDtype::from_safetensors(dtype).ok_or_else(|| {
            Error::tensor(
                &file.path,
                name,
                format!("dtype {dtype:?} is not supported (expected F32, BF16 or F16)"),
            )
        })?;
        if found != shape {
            return Err(Error::tensor(
                &file.path,
                name,
                format!("shape {found:?} does not match the config, which implies {shape:?}"),
            ));
        }
        Ok(weight_dtype)
    }

    /// Loads a tensor as f32 after checking its shape; returns its storage dtype too.
    ///
    /// Refuses (naming the tensor) a conversion that needs more memory than is available
    /// ([`crate::memory`]) and a tensor holding NaN or infinity: no Gemma 4 text weight is
    /// non-finite, and catching it here names the damaged tensor rather than the first
    /// activation it spoils.
    pub fn load_f32(&self, name: &str, shape: &[usize]) -> Result<(ArrayD<f32>, WeightDtype)> {
        let dtype = self.check(name, shape)?;
        Ok((self.convert(name, shape, dtype)?, dtype))
    }

    /// [`Checkpoint::load_f32`] after the header check: `name` is present with `shape` and the
    /// float `dtype` ([`Checkpoint::check`] said so). The bytes are read from disk
    /// ([`SafetensorsFile::read`]), checked finite and widened; only the f32 array stays.
    fn convert(&self, name: &str, shape: &[usize], dtype: WeightDtype) -> Result<ArrayD<f32>> {
        let file = self.file_of(name).expect("checked by Checkpoint::check");
        check_allocation(
            &file.path,
            name,
            array_bytes(shape, 4),
            &format!("loading {dtype:?} {shape:?} as f32"),
        )?;
        let length =
            array_bytes(shape, dtype.size()).expect("checked by check_allocation") as usize;
        let bytes = file.read(name, 0..length)?;
        check_finite_bytes(&file.path, name, shape, dtype, &bytes, 0)?;
        ArrayD::from_shape_vec(IxDyn(shape), dtype.decode(&bytes).collect()).map_err(|e| {
            Error::tensor(
                &file.path,
                name,
                format!("{} bytes cannot hold shape {shape:?}: {e}", bytes.len()),
            )
        })
    }

    /// Rows `rows` of a (header-checked) matrix `name` `[R, C]` of `dtype`, read from disk and
    /// widened to f32: `[rows.len(), C]`. What the layer-streamed reference uses to look up
    /// embedding rows and to apply the LM head block by block without holding the table.
    pub fn read_rows_f32(
        &self,
        name: &str,
        shape: [usize; 2],
        dtype: WeightDtype,
        rows: std::ops::Range<usize>,
    ) -> Result<Array2<f32>> {
        let file = self.file_of(name).expect("checked by Checkpoint::check");
        let [row_count, columns] = shape;
        assert!(
            rows.end <= row_count,
            "rows {rows:?} of a [{row_count}, {columns}] table"
        );
        let row_bytes = columns * dtype.size();
        let bytes = file.read(name, rows.start * row_bytes..rows.end * row_bytes)?;
        check_finite_bytes(
            &file.path,
            name,
            &shape,
            dtype,
            &bytes,
            rows.start * columns,
        )?;
        Ok(
            Array2::from_shape_vec((rows.len(), columns), dtype.decode(&bytes).collect())
                .expect("whole rows were read"),
        )
    }

    /// Checks that a (shape-checked) float tensor holds no NaN or infinity, straight from its
    /// mapped bytes (no conversion, no allocation): the error names the tensor and the first
    /// bad element's index. Both engines' loaders refuse the same weights this way (the
    /// reference through [`check_finite_bytes`] on the bytes it reads).
    pub fn check_finite(&self, name: &str, shape: &[usize], dtype: WeightDtype) -> Result<()> {
        let file = self.file_of(name).expect("checked by Checkpoint::check");
        let bytes = file.bytes(name).expect("checked by Checkpoint::check");
        check_finite_bytes(&file.path, name, shape, dtype, bytes, 0)
    }

    /// Finds the prefix of the text weights (`model.language_model.` or `model.`) by looking for
    /// the embedding table under each known prefix.
    pub fn text_prefix(&self) -> Result<&'static str> {
        for prefix in TEXT_PREFIXES {
            if self
                .index
                .contains_key(&format!("{prefix}embed_tokens.weight"))
            {
                return Ok(prefix);
            }
        }
        Err(Error::tensor(
            &self.dir,
            "embed_tokens.weight",
            format!(
                "not found under any known prefix ({})",
                TEXT_PREFIXES.join(", ")
            ),
        ))
    }
}

/// Refuses stored values holding NaN or infinity: `bytes` are elements `first_element..` (flat,
/// row-major) of the tensor `name` of `shape` and `dtype` in `path`. The error names the tensor
/// and the first bad element's multi-index. No Gemma 4 weight is non-finite, and catching it
/// here names the damaged tensor rather than the first activation it spoils.
pub fn check_finite_bytes(
    path: &Path,
    name: &str,
    shape: &[usize],
    dtype: WeightDtype,
    bytes: &[u8],
    first_element: usize,
) -> Result<()> {
    // A value is NaN or infinite exactly when all its exponent bits are set.
    let first_bad = match dtype {
        WeightDtype::F32 => bytes.chunks_exact(4).position(|b| {
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7f80_0000 == 0x7f80_0000
        }),
        WeightDtype::BF16 => bytes
            .chunks_exact(2)
            .position(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7f80 == 0x7f80),
        WeightDtype::F16 => bytes
            .chunks_exact(2)
            .position(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7c00 == 0x7c00),
    };
    let Some(position) = first_bad else {
        return Ok(());
    };
    let size = dtype.size();
    let value = dtype
        .decode(&bytes[position * size..(position + 1) * size])
        .next()
        .expect("one whole element");
    // Row-major multi-index of the flat position.
    let mut index = vec![0; shape.len()];
    let mut rest = first_element + position;
    for (slot, &extent) in index.iter_mut().zip(shape).rev() {
        *slot = rest % extent.max(1);
        rest /= extent.max(1);
    }
    Err(Error::tensor(
        path,
        name,
        format!("holds the non-finite value {value} at index {index:?}; a weight must be finite"),
    ))
}

/// Prefixes under which Gemma 4 text weights are stored, most specific first: those of the two
/// layouts, then none.
pub const TEXT_PREFIXES: [&str; 3] = [
    CheckpointLayout::ConditionalGeneration.text_prefix(),
    CheckpointLayout::CausalLm.text_prefix(),
    "",
];

/// The role of a text tensor, so that a loader can find the HF name of every weight.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TensorSpec {
    /// Name without the layout prefix, e.g. `layers.3.self_attn.q_proj.weight`
    /// (`lm_head.weight` is the one name that never takes a prefix).
    pub name: String,
    pub shape: Vec<usize>,
}

/// Names and shapes of every text tensor the config implies (shared spec: text §3), in the
/// order of the architecture. Buffers (`layer_scalar`) are included; the tied LM head is not.
///
/// This is the one inventory of the text weights: the loaders of both engines read each weight
/// with the shape given here (through [`check_text_headers`]).
pub fn text_tensor_specs(config: &TextConfig, plan: &ModelPlan) -> Vec<TensorSpec> {
    let d = config.hidden_size;
    let v = config.vocab_size;
    let mut specs = Vec::new();
    let mut push = |name: String, shape: &[usize]| {
        specs.push(TensorSpec {
            name,
            shape: shape.to_vec(),
        })
    };
    push("embed_tokens.weight".into(), &[v, d]);
    let num_layers = config.num_hidden_layers;
    let p = config.hidden_size_per_layer_input;
    if p > 0 {
        push(
            "embed_tokens_per_layer.weight".into(),
            &[config.vocab_size_per_layer_input, num_layers * p],
        );
        push(
            "per_layer_model_projection.weight".into(),
            &[num_layers * p, d],
        );
        push("per_layer_projection_norm.weight".into(), &[p]);
    }
    for layer in &plan.layers {
        let i = layer.index;
        let names = LayerNames::new(i);
        let (h, k, hd) = (layer.num_query_heads, layer.num_kv_heads, layer.head_dim);
        push(names.layer_scalar(), &[1]);
        push(names.input_layernorm(), &[d]);
        push(names.q_proj(), &[h * hd, d]);
        push(names.q_norm(), &[hd]);
        if layer.computes_own_kv() {
            push(names.k_proj(), &[k * hd, d]);
            if !layer.key_equals_value {
                push(names.v_proj(), &[k * hd, d]);
            }
            push(names.k_norm(), &[hd]);
        }
        push(names.o_proj(), &[d, h * hd]);
        push(names.post_attention_layernorm(), &[d]);
        push(names.pre_feedforward_layernorm(), &[d]);
        push(names.gate_proj(), &[layer.mlp_width, d]);
        push(names.up_proj(), &[layer.mlp_width, d]);
        push(names.down_proj(), &[d, layer.mlp_width]);
        push(names.post_feedforward_layernorm(), &[d]);
        if layer.has_per_layer_embedding {
            push(names.per_layer_input_gate(), &[p, d]);
            push(names.per_layer_projection(), &[d, p]);
            push(names.post_per_layer_input_norm(), &[d]);
        }
        if layer.has_moe {
            let moe = config
                .moe
                .as_ref()
                .expect("the plan gives a MoE block only to layers of a MoE config");
            let (e, inner) = (moe.num_experts, moe.moe_intermediate_size);
            push(names.router_proj(), &[e, d]);
            push(names.router_scale(), &[d]);
            push(names.router_per_expert_scale(), &[e]);
            push(names.experts_gate_up_proj(), &[e, 2 * inner, d]);
            push(names.experts_down_proj(), &[e, d, inner]);
            push(names.pre_feedforward_layernorm_2(), &[d]);
            push(names.post_feedforward_layernorm_1(), &[d]);
            push(names.post_feedforward_layernorm_2(), &[d]);
        }
    }
    push("norm.weight".into(), &[d]);
    if !config.tie_word_embeddings {
        push("lm_head.weight".into(), &[v, d]);
    }
    specs
}

/// A text tensor whose header passed [`Checkpoint::check`]: present under `name`, with `shape`
/// and the float `dtype`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedTensor {
    /// The full HF name (layout prefix included).
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: WeightDtype,
}

/// The text tensors of a checkpoint, every header checked ([`check_text_headers`]), looked up
/// by spec name (the name without the layout prefix, as in [`TensorSpec`]).
pub struct TextTensors<'a> {
    checkpoint: &'a Checkpoint,
    by_spec_name: Cow<'a, HashMap<String, CheckedTensor>>,
}

/// Checks the header of every tensor of `specs` under the layout `prefix`, in spec order, before
/// any value is read: each must be present with its spec'd shape and a float dtype, and the
/// first that is not is the error. Both engines' loaders start with this, so a damaged
/// checkpoint fails with the same error in both (a wrong shape anywhere is reported before a
/// NaN in an earlier tensor).
pub fn check_text_headers<'a>(
    checkpoint: &'a Checkpoint,
    prefix: &str,
    specs: &[TensorSpec],
) -> Result<TextTensors<'a>> {
    let mut by_spec_name = HashMap::with_capacity(specs.len());
    for spec in specs {
        let name = full_name(prefix, &spec.name);
        let dtype = checkpoint.check(&name, &spec.shape)?;
        let tensor = CheckedTensor {
            name,
            shape: spec.shape.clone(),
            dtype,
        };
        by_spec_name.insert(spec.name.clone(), tensor);
    }
    Ok(TextTensors {
        checkpoint,
        by_spec_name: Cow::Owned(by_spec_name),
    })
}

impl<'a> TextTensors<'a> {
    /// The checked tensors, without the checkpoint (to keep while the checkpoint is owned
    /// elsewhere; [`TextTensors::with`] joins them again).
    pub fn into_checked(self) -> HashMap<String, CheckedTensor> {
        self.by_spec_name.into_owned()
    }

    /// Tensors checked earlier ([`TextTensors::into_checked`]) of `checkpoint`.
    pub fn with(checkpoint: &'a Checkpoint, checked: &'a HashMap<String, CheckedTensor>) -> Self {
        TextTensors {
            checkpoint,
            by_spec_name: Cow::Borrowed(checked),
        }
    }

    /// The checkpoint the tensors are in.
    pub fn checkpoint(&self) -> &'a Checkpoint {
        self.checkpoint
    }
}

impl TextTensors<'_> {
    /// The checked tensor of a spec name. A name [`text_tensor_specs`] does not list is a bug
    /// of the loader asking for it (a panic, not an error of the checkpoint).
    pub fn get(&self, spec_name: &str) -> &CheckedTensor {
        self.by_spec_name
            .get(spec_name)
            .unwrap_or_else(|| panic!("`{spec_name}` is not in text_tensor_specs"))
    }

    /// Loads a tensor as f32 with its spec'd shape, `D` being its rank: what
    /// [`Checkpoint::load_f32`] does after its header check, which was done already (memory
    /// check, then every value finite, then the conversion).
    pub fn load<D: Dimension>(&self, spec_name: &str) -> Result<Array<f32, D>> {
        let tensor = self.get(spec_name);
        let values = self
            .checkpoint
            .convert(&tensor.name, &tensor.shape, tensor.dtype)?;
        Ok(values.into_dimensionality().expect("the spec'd rank"))
    }
}

impl TextTensors<'_> {
    /// A scalar clip bound (shape `[]`): any float but NaN. Bounds are ±∞ where a linear is not
    /// clipped on that side (Hugging Face initialises them so), so unlike weights they may be
    /// infinite.
    pub fn load_bound(&self, spec_name: &str) -> Result<f32> {
        let tensor = self.get(spec_name);
        let file = self
            .checkpoint
            .file_of(&tensor.name)
            .expect("checked by Checkpoint::check");
        let bytes = file
            .bytes(&tensor.name)
            .expect("checked by Checkpoint::check");
        let value = tensor.dtype.decode(bytes).next().ok_or_else(|| {
            Error::tensor(
                &file.path,
                &tensor.name,
                "holds no value (expected one scalar)",
            )
        })?;
        if value.is_nan() {
            return Err(Error::tensor(
                &file.path,
                &tensor.name,
                "is NaN; a clip bound must be a number (±inf for no bound)",
            ));
        }
        Ok(value)
    }
}

/// Refuses to start loading when all the weights of `specs` together (`what`: "text", "vision
/// tower"), as f32, need more memory than is available; the error names the largest tensor.
pub fn check_total_allocation(
    checkpoint: &Checkpoint,
    specs: &[TensorSpec],
    prefix: &str,
    what: &str,
) -> Result<()> {
    let bytes = |spec: &TensorSpec| array_bytes(&spec.shape, 4).unwrap_or(u64::MAX);
    let Some(largest) = specs.iter().max_by_key(|spec| bytes(spec)) else {
        return Ok(());
    };
    let total = specs.iter().try_fold(0u64, |sum, spec| {
        sum.checked_add(array_bytes(&spec.shape, 4)?)
    });
    let name = full_name(prefix, &largest.name);
    let path = checkpoint
        .file_of(&name)
        .map_or(checkpoint.dir.as_path(), |file| file.path.as_path());
    check_allocation(
        path,
        &name,
        total,
        &format!(
            "loading the {} {what} weights as f32 (this one, {:?}, is the largest at {} bytes)",
            specs.len(),
            largest.shape,
            bytes(largest)
        ),
    )
}

/// HF names of one decoder layer's tensors (without the layout prefix).
pub struct LayerNames {
    base: String,
}

macro_rules! layer_tensor_names {
    ($( $method:ident => $suffix:literal ),* $(,)?) => {
        impl LayerNames {
            $( pub fn $method(&self) -> String { format!("{}{}", self.base, $suffix) } )*
        }
    };
}

impl LayerNames {
    pub fn new(layer: usize) -> Self {
        LayerNames {
            base: format!("layers.{layer}."),
        }
    }
}

layer_tensor_names! {
    layer_scalar => "layer_scalar",
    input_layernorm => "input_layernorm.weight",
    q_proj => "self_attn.q_proj.weight",
    q_norm => "self_attn.q_norm.weight",
    k_proj => "self_attn.k_proj.weight",
    v_proj => "self_attn.v_proj.weight",
    k_norm => "self_attn.k_norm.weight",
    o_proj => "self_attn.o_proj.weight",
    post_attention_layernorm => "post_attention_layernorm.weight",
    pre_feedforward_layernorm => "pre_feedforward_layernorm.weight",
    gate_proj => "mlp.gate_proj.weight",
    up_proj => "mlp.up_proj.weight",
    down_proj => "mlp.down_proj.weight",
    post_feedforward_layernorm => "post_feedforward_layernorm.weight",
    per_layer_input_gate => "per_layer_input_gate.weight",
    per_layer_projection => "per_layer_projection.weight",
    post_per_layer_input_norm => "post_per_layer_input_norm.weight",
    router_proj => "router.proj.weight",
    router_scale => "router.scale",
    router_per_expert_scale => "router.per_expert_scale",
    experts_gate_up_proj => "experts.gate_up_proj",
    experts_down_proj => "experts.down_proj",
    pre_feedforward_layernorm_2 => "pre_feedforward_layernorm_2.weight",
    post_feedforward_layernorm_1 => "post_feedforward_layernorm_1.weight",
    post_feedforward_layernorm_2 => "post_feedforward_layernorm_2.weight",
}

/// The full HF name of a spec'd tensor under a layout prefix.
pub fn full_name(prefix: &str, spec_name: &str) -> String {
    if spec_name == "lm_head.weight" {
        spec_name.to_string()
    } else {
        format!("{prefix}{spec_name}")
    }
}

// ------------------------------------------------------------------------------------------
// The text weights, converted to f32
// ------------------------------------------------------------------------------------------

/// Weights of the dense GeGLU MLP (shared spec: text §8), HF layout `[out, in]`.
pub struct MlpWeights {
    /// `[F_l, D]`
    pub gate_proj: Array2<f32>,
    /// `[F_l, D]`
    pub up_proj: Array2<f32>,
    /// `[D, F_l]`
    pub down_proj: Array2<f32>,
}

/// Weights of one layer's attention block (shared spec: text §5).
pub struct AttentionWeights {
    /// `[H*d, D]`
    pub q_proj: Array2<f32>,
    /// `[d]`
    pub q_norm: Array1<f32>,
    /// `[K*d, D]`, absent on KV-shared layers
    pub k_proj: Option<Array2<f32>>,
    /// `[K*d, D]`, absent on KV-shared and K=V layers
    pub v_proj: Option<Array2<f32>>,
    /// `[d]`, absent on KV-shared layers
    pub k_norm: Option<Array1<f32>>,
    /// `[D, H*d]`
    pub o_proj: Array2<f32>,
}

/// Weights of one layer's Per-Layer Embedding branch (shared spec: text §10 step 6).
pub struct LayerPleWeights {
    /// `[P, D]`
    pub input_gate: Array2<f32>,
    /// `[D, P]`
    pub projection: Array2<f32>,
    /// `[D]`
    pub post_norm: Array1<f32>,
}

/// Weights of one layer's mixture-of-experts block (shared spec: text §9).
pub struct MoeWeights {
    /// `[E, D]`
    pub router_proj: Array2<f32>,
    /// `[D]`
    pub router_scale: Array1<f32>,
    /// `[E]`
    pub per_expert_scale: Array1<f32>,
    /// `[E, 2I, D]`: rows `0..I` gate, `I..2I` up
    pub gate_up_proj: Array3<f32>,
    /// `[E, D, I]`
    pub down_proj: Array3<f32>,
    /// `[D]` the experts' pre-norm
    pub pre_feedforward_layernorm_2: Array1<f32>,
    /// `[D]` the dense branch's post-norm
    pub post_feedforward_layernorm_1: Array1<f32>,
    /// `[D]` the expert branch's post-norm
    pub post_feedforward_layernorm_2: Array1<f32>,
}

/// All weights of one decoder layer.
pub struct LayerWeights {
    pub input_layernorm: Array1<f32>,
    pub attention: AttentionWeights,
    pub post_attention_layernorm: Array1<f32>,
    pub pre_feedforward_layernorm: Array1<f32>,
    pub mlp: MlpWeights,
    pub post_feedforward_layernorm: Array1<f32>,
    pub moe: Option<MoeWeights>,
    pub per_layer_embedding: Option<LayerPleWeights>,
    /// Multiplies the whole residual stream at the end of the layer (a trained buffer).
    pub layer_scalar: f32,
}

/// Model-level Per-Layer Embedding weights (shared spec: text §4), the table aside (it is a
/// lookup table, read one row per token: [`TextWeights::per_layer_table`]).
pub struct PleWeights {
    /// `[L*P, D]`
    pub model_projection: Array2<f32>,
    /// `[P]`, shared by all layers
    pub projection_norm: Array1<f32>,
}

/// Every weight of the text decoder, as f32, held in memory.
pub struct TextWeights {
    /// `[V, D]`
    pub embed_tokens: Array2<f32>,
    pub embed_dtype: WeightDtype,
    /// `[V_ple, L*P]`, layer-major columns (E2B / E4B)
    pub per_layer_table: Option<Array2<f32>>,
    pub per_layer_embeddings: Option<PleWeights>,
    pub layers: Vec<LayerWeights>,
    /// `[D]`
    pub final_norm: Array1<f32>,
    /// `[V, D]` when the LM head is not tied to `embed_tokens`
    pub lm_head: Option<Array2<f32>>,
}

impl TextWeights {
    /// Loads and checks every text weight the plan needs, each with the shape
    /// [`text_tensor_specs`] gives it.
    pub fn load(checkpoint: &Checkpoint, config: &ModelConfig, plan: &ModelPlan) -> Result<Self> {
        let text = &config.text;
        // Every tensor present with its planned shape and a float dtype (headers only), then
        // enough memory for all of them as f32, before the first conversion.
        let (tensors, specs, prefix) = check_text_checkpoint(checkpoint, config, plan)?;
        check_total_allocation(checkpoint, &specs, prefix, "text")?;

        let has_ple = text.hidden_size_per_layer_input > 0;
        Ok(TextWeights {
            embed_tokens: tensors.load("embed_tokens.weight")?,
            embed_dtype: tensors.get("embed_tokens.weight").dtype,
            per_layer_table: has_ple
                .then(|| tensors.load("embed_tokens_per_layer.weight"))
                .transpose()?,
            per_layer_embeddings: load_ple_weights(&tensors, text)?,
            layers: plan
                .layers
                .iter()
                .map(|layer| load_layer(&tensors, layer))
                .collect::<Result<_>>()?,
            final_norm: tensors.load("norm.weight")?,
            lm_head: (!text.tie_word_embeddings)
                .then(|| tensors.load("lm_head.weight"))
                .transpose()?,
        })
    }
}

/// Checks the header of every text tensor the plan needs ([`check_text_headers`] under the
/// checkpoint's layout prefix); returns the checked tensors, their specs and the prefix.
pub fn check_text_checkpoint<'a>(
    checkpoint: &'a Checkpoint,
    config: &ModelConfig,
    plan: &ModelPlan,
) -> Result<(TextTensors<'a>, Vec<TensorSpec>, &'static str)> {
    let prefix = checkpoint.text_prefix()?;
    let specs = text_tensor_specs(&config.text, plan);
    let tensors = check_text_headers(checkpoint, prefix, &specs)?;
    Ok((tensors, specs, prefix))
}

/// The model-level PLE weights (the table aside), when the model has PLE.
pub fn load_ple_weights(tensors: &TextTensors, text: &TextConfig) -> Result<Option<PleWeights>> {
    if text.hidden_size_per_layer_input == 0 {
        return Ok(None);
    }
    Ok(Some(PleWeights {
        model_projection: tensors.load("per_layer_model_projection.weight")?,
        projection_norm: tensors.load("per_layer_projection_norm.weight")?,
    }))
}

/// Loads the weights of one decoder layer, as f32.
pub fn load_layer(tensors: &TextTensors, layer: &LayerPlan) -> Result<LayerWeights> {
    let names = LayerNames::new(layer.index);
    let own_kv = layer.computes_own_kv();
    let attention = AttentionWeights {
        q_proj: tensors.load(&names.q_proj())?,
        q_norm: tensors.load(&names.q_norm())?,
        k_proj: own_kv.then(|| tensors.load(&names.k_proj())).transpose()?,
        v_proj: (own_kv && !layer.key_equals_value)
            .then(|| tensors.load(&names.v_proj()))
            .transpose()?,
        k_norm: own_kv.then(|| tensors.load(&names.k_norm())).transpose()?,
        o_proj: tensors.load(&names.o_proj())?,
    };
    let mlp = MlpWeights {
        gate_proj: tensors.load(&names.gate_proj())?,
        up_proj: tensors.load(&names.up_proj())?,
        down_proj: tensors.load(&names.down_proj())?,
    };
    let per_layer_embedding = layer
        .has_per_layer_embedding
        .then(|| -> Result<LayerPleWeights> {
            Ok(LayerPleWeights {
                input_gate: tensors.load(&names.per_layer_input_gate())?,
                projection: tensors.load(&names.per_layer_projection())?,
                post_norm: tensors.load(&names.post_per_layer_input_norm())?,
            })
        })
        .transpose()?;
    let moe = layer
        .has_moe
        .then(|| -> Result<MoeWeights> {
            Ok(MoeWeights {
                router_proj: tensors.load(&names.router_proj())?,
                router_scale: tensors.load(&names.router_scale())?,
                per_expert_scale: tensors.load(&names.router_per_expert_scale())?,
                gate_up_proj: tensors.load(&names.experts_gate_up_proj())?,
                down_proj: tensors.load(&names.experts_down_proj())?,
                pre_feedforward_layernorm_2: tensors.load(&names.pre_feedforward_layernorm_2())?,
                post_feedforward_layernorm_1: tensors
                    .load(&names.post_feedforward_layernorm_1())?,
                post_feedforward_layernorm_2: tensors
                    .load(&names.post_feedforward_layernorm_2())?,
            })
        })
        .transpose()?;
    Ok(LayerWeights {
        input_layernorm: tensors.load(&names.input_layernorm())?,
        attention,
        post_attention_layernorm: tensors.load(&names.post_attention_layernorm())?,
        pre_feedforward_layernorm: tensors.load(&names.pre_feedforward_layernorm())?,
        mlp,
        post_feedforward_layernorm: tensors.load(&names.post_feedforward_layernorm())?,
        moe,
        per_layer_embedding,
        layer_scalar: tensors.load::<Ix1>(&names.layer_scalar())?[0],
    })
}
