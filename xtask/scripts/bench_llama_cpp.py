"""llama.cpp on the `cargo xtask bench` workload (run by `cargo xtask bench`).

llama.cpp is the peer the benchmark compares against. It is built here from source, the copy
vendored by the PyPI source package `llama-cpp-python` (pinned below with its sha256, fetched by
`pip download` through whatever package index the user has configured), with
`GGML_NATIVE=ON` (every SIMD extension this CPU has), into a cache directory outside the
repository. The checkpoint directory made by `cargo xtask synth` is converted to a bf16 GGUF by
that copy's `convert_hf_to_gguf.py`; the converter needs a tokenizer, and a random model has
none, so a byte-fallback BPE tokenizer with the checkpoint's vocabulary size is written next to
symbolic links to the weights (the token strings do not matter: the benchmark feeds token ids).

Then `llama-bench -t THREADS -p PROMPT -n DECODE -r 3 -o json` runs: `pp` = a PROMPT-token
prompt (logits of the last position only) and `tg` = DECODE single-token steps, each repeated 3
times after a warm-up run; the median of the repetitions is reported (as for the Rust engines).
Its `tg` test starts from an empty context, ours after the prompt: at E2B's size that is 128
more cached positions to attend over, well under 1% of a decode step. Peak resident memory is
llama-bench's own (`wait4`). Prints one JSON line.

Usage: python bench_llama_cpp.py --model DIR [--cache DIR] [--threads 2] [--prompt 128] [--decode 32] [--prepare]
(`--prepare`: only build and convert, so that the measurement itself runs on a quiet machine.)
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

SDIST_REQUIREMENT = "llama-cpp-python==0.3.36"
SDIST_NAME = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"


def log(message):
    print(f"bench_llama_cpp: {message}", file=sys.stderr, flush=True)


def run(command, **kwargs):
    """Runs a preparation step; its output goes to stderr (stdout carries only the result line)."""
    log(" ".join(str(c) for c in command))
    subprocess.run(command, check=True, stdout=sys.stderr, **kwargs)


def source_dir(cache: Path) -> Path:
    """The vendored llama.cpp tree, fetched with pip (the source package, no dependencies) and
    unpacked once."""
    tree = cache / SDIST_NAME.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
    if (tree / "CMakeLists.txt").exists():
        return tree
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / SDIST_NAME
    if not archive.exists():
        download = cache / "pip-download"
        shutil.rmtree(download, ignore_errors=True)
        # The source package only (`--no-binary` for it alone: with `:all:`, pip would also build
        # the build backend's own dependencies, cmake included, from source to read the metadata).
        run([
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
            "--dest", download, SDIST_REQUIREMENT,
        ])
        fetched = download / SDIST_NAME
        if not fetched.exists():
            raise SystemExit(f"pip download {SDIST_REQUIREMENT} gave {sorted(os.listdir(download))}, not {SDIST_NAME}")
        fetched.rename(archive)
        shutil.rmtree(download, ignore_errors=True)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        archive.unlink()
        raise SystemExit(f"{archive}: sha256 {digest}, expected {SDIST_SHA256} (deleted; rerun)")
    with tarfile.open(archive) as tar:
        tar.extractall(cache, filter="data")
    return tree


def tool(name: str) -> str:
    """`cmake` / `ninja` from PATH, else from this virtualenv (installed with pip if missing)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    run([sys.executable, "-m", "pip", "install", "cmake", "ninja"])
    return shutil.which(name, path=str(Path(sys.executable).parent))


def llama_bench(tree: Path) -> Path:
    """Builds `llama-bench` (CPU backend, native SIMD) once."""
    binary = tree / "build" / "bin" / "llama-bench"
    if binary.exists():
        return binary
    cmake, ninja = tool("cmake"), tool("ninja")
    run([
        cmake, "-S", tree, "-B", tree / "build", "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}",
        "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
    ])
    run([cmake, "--build", tree / "build", "--target", "llama-bench", "-j", str(os.cpu_count() or 2)])
    return binary


def vocab_size(config: dict) -> int:
    text = config.get("text_config") or config
    return int(text["vocab_size"])


def write_tokenizer(directory: Path, size: int):
    """A byte-fallback BPE tokenizer with `size` entries (what the converter reads for Gemma 4)."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    # llama.cpp refuses a BPE vocabulary without merges: give it three real ones.
    merges = []
    for left, right in [("\u2581", "a"), ("a", "b"), ("b", "c")]:
        for token in (left, right, left + right):
            vocab.setdefault(token, len(vocab))
        merges.append((left, right))
    filler = 0
    while len(vocab) < size:
        vocab[f"tok{filler}"] = len(vocab)
        filler += 1
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens(specials)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }))


def gguf_of(model: Path, tree: Path, cache: Path) -> Path:
    """The bf16 GGUF of `model`, converted once per checkpoint (keyed by its files' sizes and times)."""
    files = sorted(p for p in model.iterdir() if p.suffix in (".json", ".safetensors"))
    key = hashlib.sha256(
        "".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns};" for p in files).encode()
    ).hexdigest()[:16]
    out = cache / "gguf" / f"{model.name}-{key}-bf16.gguf"
    if out.exists():
        return out
    staging = cache / "gguf" / f"{model.name}-{key}-hf"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for p in files:
        (staging / p.name).symlink_to(p.resolve())
    write_tokenizer(staging, vocab_size(json.loads((model / "config.json").read_text())))
    partial = out.with_suffix(".partial")
    env = dict(os.environ, PYTHONPATH=str(tree / "gguf-py"))
    run([sys.executable, tree / "convert_hf_to_gguf.py", staging, "--outtype", "bf16", "--outfile", partial], env=env)
    partial.rename(out)
    shutil.rmtree(staging)
    return out


def median(values):
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/gemma4/llama-cpp")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--prepare", action="store_true", help="only build llama-bench and convert the checkpoint")
    args = parser.parse_args()

    tree = source_dir(args.cache)
    binary = llama_bench(tree)
    gguf = gguf_of(args.model.resolve(), tree, args.cache)
    if args.prepare:
        log(f"ready: {binary} {gguf}")
        return

    command = [
        binary, "-m", gguf, "-t", str(args.threads), "-p", str(args.prompt), "-n", str(args.decode),
        "-r", str(args.repetitions), "-o", "json",
    ]
    log(" ".join(str(c) for c in command))
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"llama-bench failed ({status}): {output[-2000:]!r}")
    results = json.loads(output)
    prefill = next(r for r in results if r["n_prompt"] == args.prompt and r["n_gen"] == 0)
    decode = next(r for r in results if r["n_gen"] == args.decode and r["n_prompt"] == 0)
    print(json.dumps({
        "engine": "llama.cpp",
        "build": f"{prefill.get('build_commit')}, vendored by llama-cpp-python 0.3.36",
        "cpu_info": prefill.get("cpu_info"),
        "type": prefill.get("model_type"),
        "threads": args.threads,
        "prompt": args.prompt,
        "decode": args.decode,
        "prefill_samples_tok_s": prefill["samples_ts"],
        "decode_samples_tok_s": decode["samples_ts"],
        "prefill_tok_s": median(prefill["samples_ts"]),
        "decode_tok_s": median(decode["samples_ts"]),
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "wall_s": time.perf_counter() - started,
    }))


if __name__ == "__main__":
    main()
