//! Refusing allocations that cannot succeed, before making them.
//!
//! The reference converts every weight (and every dump tensor) to an owned `f32` array. A header
//! that lies about a shape is caught by the safetensors validation when the bytes are missing,
//! but a sparse file can back a declared terabyte without using any disk. So before converting,
//! the bytes needed are compared with the memory available: `MemAvailable` of `/proc/meminfo`,
//! lowered by the environment variable `GEMMA4_MEMORY_LIMIT` (bytes) when it is set. Where
//! neither is known (not Linux, no limit set) only arithmetic overflow is refused.

use std::path::Path;

use crate::error::{Error, Result};

/// Bytes of memory this process may still allocate, if known: the smaller of `MemAvailable`
/// (Linux) and `GEMMA4_MEMORY_LIMIT`.
pub fn available_memory() -> Option<u64> {
    let limit = memory_limit_from_env();
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| mem_available_from_meminfo(&text));
    match (available, limit) {
        (Some(a), Some(l)) => Some(a.min(l)),
        (a, l) => a.or(l),
    }
}

/// The `--max-memory` of this process, once set ([`set_memory_limit`]).
static MEMORY_LIMIT_FLAG: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// Sets this process's memory limit in bytes (the CLI's `--max-memory`; the first call wins).
/// It applies wherever `GEMMA4_MEMORY_LIMIT` does, the smaller of the two counting.
pub fn set_memory_limit(bytes: u64) {
    let _ = MEMORY_LIMIT_FLAG.set(bytes);
}

/// The `--max-memory` of this process, if set.
pub fn memory_limit_flag() -> Option<u64> {
    MEMORY_LIMIT_FLAG.get().copied()
}

/// `GEMMA4_MEMORY_LIMIT` in bytes, if set.
pub fn memory_limit_env() -> Option<u64> {
    std::env::var("GEMMA4_MEMORY_LIMIT")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// The smaller of `--max-memory` and `GEMMA4_MEMORY_LIMIT`, if either is set.
fn memory_limit_from_env() -> Option<u64> {
    match (memory_limit_flag(), memory_limit_env()) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Allocations up to this size (16 MiB) are not checked against `/proc/meminfo` (reading it
/// for every small tensor would cost more than the allocation); `GEMMA4_MEMORY_LIMIT` still
/// applies to them, and the total of a model's weights is checked as one allocation.
pub const SMALL_ALLOCATION_BYTES: u64 = 16 << 20;

/// Parses the `MemAvailable:  123456 kB` line of `/proc/meminfo` into bytes.
pub(crate) fn mem_available_from_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut fields = line["MemAvailable:".len()..].split_whitespace();
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") | None => value.checked_mul(1024),
        Some(_) => None,
    }
}

/// Bytes of an array of `elements` values of `bytes_per_element` each; `None` on overflow.
pub fn array_bytes(elements: &[usize], bytes_per_element: usize) -> Option<u64> {
    elements
        .iter()
        .try_fold(bytes_per_element as u64, |acc, &n| {
            acc.checked_mul(n as u64)
        })
}

/// Refuses to allocate `bytes` for `tensor` (read from `path`) when it overflows or exceeds the
/// available memory. `what` says what the bytes are for (e.g. "as f32").
pub fn check_allocation(path: &Path, tensor: &str, bytes: Option<u64>, what: &str) -> Result<()> {
    let Some(bytes) = bytes.filter(|&b| usize::try_from(b).is_ok_and(|b| b <= isize::MAX as usize))
    else {
        return Err(Error::tensor(
            path,
            tensor,
            format!("{what} would need more bytes than this machine can address"),
        ));
    };
    let available = if bytes > SMALL_ALLOCATION_BYTES {
        available_memory()
    } else {
        memory_limit_from_env()
    };
    if let Some(available) = available {
        if bytes > available {
            return Err(Error::tensor(
                path,
                tensor,
                format!(
                    "{what} needs {bytes} bytes, but only {available} bytes of memory are available \
                     (MemAvailable, GEMMA4_MEMORY_LIMIT or --max-memory); refusing to allocate"
                ),
            ));
        }
    }
    Ok(())
}

/// Largest JSON file of a checkpoint (`config.json`, `model.safetensors.index.json`) that is
/// read: 64 MiB. Real ones are under 100 KB; a larger one is damaged (or a sparse file), and
/// reading it whole would be an absurd allocation.
pub const MAX_JSON_FILE_BYTES: u64 = 64 << 20;

/// Reads a small file whole, refusing (naming it) one larger than `limit` bytes.
pub fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let io_error = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io_error)?;
    let length = file.metadata().map_err(io_error)?.len();
    let too_large = |length: u64| {
        io_error(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "is {length} bytes, more than the {limit} bytes such a file may have (damaged?)"
            ),
        ))
    };
    if length > limit {
        return Err(too_large(length));
    }
    let mut bytes = Vec::with_capacity(length as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error)?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_meminfo_parses_mem_available_in_kb() {
        let text = "MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(mem_available_from_meminfo(text), Some(2048 * 1024));
        assert_eq!(mem_available_from_meminfo("MemFree: 1 kB\n"), None);
        assert_eq!(mem_available_from_meminfo("MemAvailable: x kB\n"), None);
    }

    #[test]
    fn memory_array_bytes_detects_overflow() {
        assert_eq!(array_bytes(&[2, 3], 4), Some(24));
        assert_eq!(array_bytes(&[usize::MAX, 2], 4), None);
        assert_eq!(array_bytes(&[], 4), Some(4));
    }

    #[test]
    fn memory_check_allocation_refuses_unaddressable_sizes() {
        let error = check_allocation(Path::new("f"), "t", None, "loading `t` as f32").unwrap_err();
        assert!(error.to_string().contains("`t`"), "{error}");
        let error = check_allocation(Path::new("f"), "t", Some(u64::MAX), "x").unwrap_err();
        assert!(error.to_string().contains("address"), "{error}");
        check_allocation(Path::new("f"), "t", Some(16), "x").expect("16 bytes are available");
    }
}
