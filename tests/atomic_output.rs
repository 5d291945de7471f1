//! Atomic outputs: a dump is written to a hidden temporary file and renamed into place, so a
//! failure leaves the destination as it was and no stray temporary file, and a reader never
//! sees a half-written dump. (`cargo xtask golden` writes fixtures the same way:
//! `atomic_write` in `golden/generate.py`. The kill-midway case is tested through the CLI in
//! `tests/bad_input.rs`.)

use std::path::Path;

use gemma4_reference::ActivationDump;
use ndarray::ArrayD;

fn small_dump(value: f32) -> ActivationDump {
    let mut dump = ActivationDump::new();
    dump.insert_f32("logits", ArrayD::from_elem(vec![2, 3], value));
    dump.insert_i64("input_ids", ArrayD::from_elem(vec![2], 7));
    dump
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn dump_write_into_missing_directory_fails_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing").join("dump.safetensors");
    let error = small_dump(1.0).write(&path, &[]).unwrap_err().to_string();
    assert!(error.contains("dump.safetensors"), "{error}");
    assert_eq!(entries(dir.path()), Vec::<String>::new());
}

#[test]
fn dump_write_failing_at_the_rename_leaves_no_temporary_file() {
    // The destination is a non-empty directory: the data is written, then the rename fails.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dump.safetensors");
    std::fs::create_dir(&path).unwrap();
    std::fs::write(path.join("keep"), b"x").unwrap();
    let error = small_dump(1.0).write(&path, &[]).unwrap_err().to_string();
    assert!(error.contains("dump.safetensors"), "{error}");
    assert_eq!(entries(dir.path()), vec!["dump.safetensors".to_string()]);
    assert_eq!(
        entries(&path),
        vec!["keep".to_string()],
        "the directory is untouched"
    );
}

#[test]
fn dump_write_replaces_an_existing_dump_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dump.safetensors");
    small_dump(1.0).write(&path, &[]).unwrap();
    small_dump(2.0).write(&path, &[]).unwrap();
    let read = ActivationDump::read(&path).unwrap();
    assert_eq!(read.get("logits").unwrap().as_f32().unwrap()[[1, 2]], 2.0);
    assert_eq!(entries(dir.path()), vec!["dump.safetensors".to_string()]);
}

#[test]
fn dump_write_from_concurrent_threads_never_interleaves() {
    // Many writers of the same path at once: the survivor is one whole dump, and no
    // temporary file is left behind (each write has its own temporary name).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dump.safetensors");
    std::thread::scope(|scope| {
        for writer in 0..8 {
            let path = &path;
            scope.spawn(move || {
                for round in 0..10 {
                    small_dump((writer * 100 + round) as f32)
                        .write(path, &[])
                        .expect("each write succeeds");
                }
            });
        }
    });
    let read = ActivationDump::read(&path).expect("a whole dump");
    let logits = read.get("logits").unwrap().as_f32().unwrap();
    let first = logits[[0, 0]];
    assert!(
        logits.iter().all(|&v| v == first),
        "mixed writers: {logits:?}"
    );
    assert_eq!(entries(dir.path()), vec!["dump.safetensors".to_string()]);
}

#[test]
fn dump_write_refuses_to_replace_a_pipe() {
    // Renaming over a special file replaces it (as root, `--out /dev/null` would); a named
    // pipe stands in for the device here.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pipe");
    let made = std::process::Command::new("mkfifo").arg(&path).status();
    if !made.is_ok_and(|s| s.success()) {
        eprintln!("mkfifo unavailable; skipping");
        return;
    }
    let error = small_dump(1.0).write(&path, &[]).unwrap_err().to_string();
    assert!(error.contains("not a regular file"), "{error}");
    use std::os::unix::fs::FileTypeExt;
    let kind = std::fs::symlink_metadata(&path).unwrap().file_type();
    assert!(kind.is_fifo(), "the pipe was replaced");
    assert_eq!(entries(dir.path()), vec!["pipe".to_string()]);
}
