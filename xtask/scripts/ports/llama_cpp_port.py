"""llama.cpp as a port of `cargo xtask ports`: building it, converting a golden checkpoint, its C
API through ctypes, and the graph-evaluation callback that records the contract's tensors
(shared contracts §2). Used by `driver_llama_cpp.py`; everything here is llama.cpp's own code,
unmodified, except the one line of the exact-GELU build (`exact_gelu_tree`).

The pinned source is the llama.cpp tree vendored by the PyPI source package
`llama-cpp-python==0.3.36` (fetched and sha256-checked by `bench_llama_cpp.source_dir`, the
benchmark's copy, under the same cache, default `~/.cache/gemma4/llama-cpp`):

- `library(tree)`: a shared `libllama` (CPU backend, `GGML_NATIVE=ON`, Release, no tools, tests,
  examples, server or common library) built once into `<tree>/build-shared`; its directory holds
  `libllama.so`, `libggml.so`, `libggml-base.so` and `libggml-cpu.so`.
- `exact_gelu_tree(tree)`: a copy of the tree (`<cache>/llama.cpp-exact-gelu`) whose
  `ggml/src/ggml-cpu/vec.h` lacks the line `#define GGML_GELU_FP16`, for the `f32` mode (see
  `driver_llama_cpp.py`); built the same way.
- `gguf(model_dir, tree)`: the checkpoint as an F32 GGUF by the tree's own
  `convert_hf_to_gguf.py --outtype f32`, converted once per checkpoint content under
  `<cache>/gguf/`.
- `Model`, `Context`: the model and its contexts through llama-cpp-python's own ctypes bindings
  (`llama_cpp/llama_cpp.py` of the same source package, pointed at the built library with
  `LLAMA_CPP_LIB_PATH`).
- `Tap`: the `cb_eval` callback (`ggml_backend_sched_eval_callback`) that copies the tensors
  that are exactly a contract tensor out of llama.cpp's graph as it is computed.
"""

import ctypes
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench_llama_cpp as bench  # noqa: E402  (source_dir, tool, write_tokenizer, vocab_size)

CACHE = Path.home() / ".cache/gemma4/llama-cpp"
SDIST = f"{bench.SDIST_REQUIREMENT} (sha256 {bench.SDIST_SHA256[:12]}…)"

# The one line the exact-GELU build removes (ggml/src/ggml-cpu/vec.h).
GELU_TABLE_DEFINE = "#define GGML_GELU_FP16\n"
GELU_PATCH_NOTE = "// #define GGML_GELU_FP16  (removed by gemma4's llama_cpp_port.exact_gelu_tree: exact GELU)\n"


def log(message: str):
    print(f"llama.cpp port: {message}", file=sys.stderr, flush=True)


def source_tree() -> Path:
    """The pinned llama.cpp tree (downloaded and unpacked once)."""
    return bench.source_dir(CACHE)


# --------------------------------------------------------------------------------------------
# Building


def exact_gelu_tree(tree: Path) -> Path:
    """A copy of `tree` (build directories, models, docs and media left out) in which
    `ggml/src/ggml-cpu/vec.h` no longer defines `GGML_GELU_FP16`: `ggml_vec_gelu_f32` and
    `ggml_vec_geglu_f32` then take their `#else` branch, `ggml_gelu_f32(x)` on every element,
    instead of rounding x to fp16 and reading an fp16 table. The define is unconditional in the
    header (no compile definition can undo it), so the copy is the smallest change; the original
    tree is never touched."""
    copy = CACHE / "llama.cpp-exact-gelu"
    marker = copy / ".patched"
    note = f"{SDIST}: ggml/src/ggml-cpu/vec.h without `#define GGML_GELU_FP16`\n"
    if marker.exists() and marker.read_text() == note:
        return copy
    shutil.rmtree(copy, ignore_errors=True)
    log(f"copying {tree} to {copy} (exact GELU)")

    def skipped(directory, names):  # at the top only: build directories, test models, docs, media
        if Path(directory) != tree:
            return set()
        return {n for n in names if (tree / n).is_dir()
                and (n in ("models", "docs", "media") or n == "build" or n.startswith("build-"))}

    shutil.copytree(tree, copy, symlinks=True, ignore=skipped)
    header = copy / "ggml/src/ggml-cpu/vec.h"
    text = header.read_text()
    if text.count(GELU_TABLE_DEFINE) != 1:
        raise SystemExit(f"{header}: expected exactly one line `{GELU_TABLE_DEFINE.strip()}`")
    header.write_text(text.replace(GELU_TABLE_DEFINE, GELU_PATCH_NOTE))
    marker.write_text(note)
    return copy


def library(tree: Path) -> Path:
    """Builds llama.cpp's shared libraries from `tree` once (into `<tree>/build-shared`) and
    returns the directory that holds them. One build at a time, every core (2 here)."""
    build = tree / "build-shared"
    lib_dir = build / "bin"
    marker = build / ".built"
    if marker.exists() and (lib_dir / "libllama.so").exists():
        return lib_dir
    cmake, ninja = bench.tool("cmake"), bench.tool("ninja")
    bench.run([
        cmake, "-S", tree, "-B", build, "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}",
        "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=ON",
        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
        "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_COMMON=OFF",
        "-DLLAMA_OPENSSL=OFF",
    ])
    bench.run([cmake, "--build", build, "--target", "llama", "-j", str(os.cpu_count() or 2)])
    if not (lib_dir / "libllama.so").exists():
        raise SystemExit(f"the build gave no {lib_dir / 'libllama.so'}")
    marker.write_text("built\n")
    return lib_dir


# --------------------------------------------------------------------------------------------
# Converting


class ConversionRefused(Exception):
    """`convert_hf_to_gguf.py` failed on the checkpoint; the message is its error's last line."""


def gguf(model: Path, tree: Path) -> Path:
    """The F32 GGUF of the checkpoint directory `model`, by the tree's `convert_hf_to_gguf.py`
    (its own `gguf-py`), converted once: keyed by the content of the checkpoint's files. Text
    only: the converter writes the language model (a separate `--mmproj` run would write the
    towers). The converter needs a tokenizer and a golden model has none, so it reads a staging
    directory of symbolic links to the checkpoint's files plus the benchmark's byte-fallback
    tokenizer of the checkpoint's vocabulary size (the drivers feed token ids, never text)."""
    files = sorted(p for p in model.iterdir() if p.suffix in (".json", ".safetensors"))
    digest = hashlib.sha256(SDIST.encode())
    for p in files:
        digest.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    key = digest.hexdigest()[:16]
    folder = CACHE / "gguf"
    out = folder / f"{model.parent.name}-{key}-f32.gguf"
    if out.exists():
        return out
    staging = folder / f"{model.parent.name}-{key}-hf"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for p in files:
        (staging / p.name).symlink_to(p.resolve())
    bench.write_tokenizer(staging, bench.vocab_size(json.loads((model / "config.json").read_text())))
    partial = out.with_suffix(".partial")
    command = [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(staging), "--outtype", "f32",
               "--outfile", str(partial)]
    log(" ".join(command))
    env = dict(os.environ, PYTHONPATH=str(tree / "gguf-py"))
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    shutil.rmtree(staging)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        lines = [l.strip() for l in (done.stderr + done.stdout).splitlines() if l.strip()]
        sys.stderr.write("\n".join(lines[-20:]) + "\n")
        raise ConversionRefused(lines[-1] if lines else f"exit status {done.returncode}")
    partial.rename(out)
    return out


# --------------------------------------------------------------------------------------------
# The C API


class GgmlTensor(ctypes.Structure):
    """`struct ggml_tensor` of `ggml/include/ggml.h` (GGML_MAX_DIMS 4, GGML_MAX_SRC 10,
    GGML_MAX_OP_PARAMS 64, GGML_MAX_NAME 64): what the evaluation callback receives."""


GgmlTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * 4),
    ("nb", ctypes.c_size_t * 4),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * 16),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GgmlTensor) * 10),
    ("view_src", ctypes.POINTER(GgmlTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * 64),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]


def bindings(lib_dir: Path):
    """llama-cpp-python's ctypes module `llama_cpp.llama_cpp` (the bindings of exactly this llama.cpp
    version) on the library in `lib_dir`, and `libggml-base` for the tensor accessors. The
    package's `__init__` (which pulls in the high-level `Llama` class and its dependencies) is
    bypassed: only the binding module itself is imported, from the unpacked source package."""
    package_dir = source_tree().parent.parent / "llama_cpp"
    os.environ["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
    if "llama_cpp" not in sys.modules:
        package = types.ModuleType("llama_cpp")
        package.__path__ = [str(package_dir)]
        sys.modules["llama_cpp"] = package
    import llama_cpp.llama_cpp as llama  # noqa: E402

    if Path(llama._lib._name).resolve().parent != lib_dir.resolve():
        raise SystemExit(f"the bindings loaded {llama._lib._name}, not the library of {lib_dir}")
    ggml = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
    ggml.ggml_nbytes.argtypes = [ctypes.POINTER(GgmlTensor)]
    ggml.ggml_nbytes.restype = ctypes.c_size_t
    ggml.ggml_op_name.argtypes = [ctypes.c_int]
    ggml.ggml_op_name.restype = ctypes.c_char_p
    ggml.ggml_type_name.argtypes = [ctypes.c_int]
    ggml.ggml_type_name.restype = ctypes.c_char_p
    ggml.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_buffer_is_host.restype = ctypes.c_bool
    return llama, ggml


class LogCapture:
    """llama.cpp's log: kept in memory (the last error explains a refused model), warnings and
    errors echoed to stderr."""

    LEVELS = {1: "debug", 2: "info", 3: "warn", 4: "error"}

    def __init__(self, llama):
        self.lines = []
        self.level = 2

        def callback(level, text, _user_data):
            if level != 5:  # GGML_LOG_LEVEL_CONT continues the previous message
                self.level = level
            message = text.decode(errors="replace")
            self.lines.append((self.level, message))
            if self.level >= 3:
                sys.stderr.write(f"llama.cpp {self.LEVELS.get(self.level, '?')}: {message}")

        self.callback = llama.llama_log_callback(callback)
        llama.llama_log_set(self.callback, ctypes.c_void_p())

    def last(self, level: int) -> str:
        found = [text.strip() for lvl, text in self.lines if lvl == level and text.strip()]
        return found[-1] if found else ""

    def find(self, pattern: str) -> list[str]:
        return [text.strip() for _, text in self.lines if re.search(pattern, text)]


class Tap:
    """The graph-evaluation callback (`cb_eval`): on the `ask` call it says which nodes to hand
    over, on the second call it copies the node's data into `recorder` under its contract name.
    A node is taken only where it is exactly a contract tensor (shared contracts §2; ggml's `ne0`
    is the fastest axis, so a `[D, T]` ggml tensor is a `[T, D]` array):

    | llama.cpp node (src/models/gemma4.cpp, src/llama-graph.cpp) | contract tensor |
    |---|---|
    | `inp_scaled` (token embeddings × √D) `[D, T]` | `embeddings` |
    | `inp_per_layer` ((projection + table) × 2^-1/2) `[P, L, T]` | `per_layer_inputs` |
    | `Qcur_pos-i` (after q_norm and RoPE) `[d, H, T]` | `layers.i.attn.q` |
    | `Kcur_pos-i` (after k_norm and RoPE; layers with their own K/V) `[d, K, T]` | `layers.i.attn.k` |
    | `Vcur_normed-i` (after the weight-free v_norm) `[d, K, T]` | `layers.i.attn.v` |
    | the MUL_MAT by `blk.i.attn_output.weight` (o_proj) `[D, T]` | `layers.i.attn.output` |
    | the MUL_MAT by `blk.i.ffn_down.weight` (dense MLP down projection) `[D, T]` | `layers.i.mlp.output` |
    | `ffn_moe_topk-i` (argsort of the router probabilities, descending, first k) `[k, T]` | `layers.i.router.top_k_index` |
    | `ffn_moe_out-i` (sum of the weighted, per-expert-scaled experts) `[D, T]` | `layers.i.moe.output` |
    | `l_out-i` (after the PLE branch and layer_scalar) `[D, T]` | `layers.i.output` |
    | `result_norm` (final RMSNorm, all rows kept when every position is an output) `[D, T]` | `final_norm` |

    On MoE layers `mlp.output` is the shared dense MLP, as in Hugging Face. Not taken:
    `router.top_k_weights` (llama.cpp's `ffn_moe_weights_norm` lacks the per-expert scale, which it
    applies to the experts' down projections instead: no node holds the contract's weights).
    Asking for a node only splits the scheduler's graph into consecutive pieces (the same
    operations on the same data); `driver_llama_cpp.py` checks that the logits of a recorded
    forward are bit-identical to those of an unrecorded one. Every tensor must be seen once per
    forward with all `T` rows (the prompt is one micro-batch), else the driver fails."""

    NAMED = {
        "inp_scaled": "embeddings",
        "inp_per_layer": "per_layer_inputs",
        "result_norm": "final_norm",
    }
    PER_LAYER = {
        "l_out": "output",
        "Qcur_pos": "attn.q",
        "Kcur_pos": "attn.k",
        "Vcur_normed": "attn.v",
        "ffn_moe_out": "moe.output",
        "ffn_moe_topk": "router.top_k_index",
    }
    WEIGHTS = {"attn_output": "attn.output", "ffn_down": "mlp.output"}

    def __init__(self, llama, ggml, recorder, n_tokens: int):
        self.ggml, self.recorder, self.n_tokens = ggml, recorder, n_tokens
        self.error = None

        def callback(tensor, ask, _user_data):
            try:
                t = ctypes.cast(tensor, ctypes.POINTER(GgmlTensor))
                if ask:
                    return self.contract_name(t.contents) is not None
                self.take(t)
                return True
            except Exception as error:  # never raise through C; report after llama_decode
                self.error = self.error or error
                return True

        self.callback = llama.ggml_backend_sched_eval_callback(callback)

    def op(self, t: GgmlTensor) -> str:
        return self.ggml.ggml_op_name(t.op).decode()

    def contract_name(self, t: GgmlTensor):
        name = t.name.decode(errors="replace")
        if name in self.NAMED:
            return self.NAMED[name]
        m = re.fullmatch(r"(.+)-(\d+)", name)
        if m and m.group(1) in self.PER_LAYER:
            return f"layers.{m.group(2)}.{self.PER_LAYER[m.group(1)]}"
        if self.op(t) == "MUL_MAT" and t.src[0]:
            weight = t.src[0].contents.name.decode(errors="replace")
            m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", weight)
            if m and m.group(2) in self.WEIGHTS:
                return f"layers.{m.group(1)}.{self.WEIGHTS[m.group(2)]}"
        return None

    def take(self, pointer):
        t = pointer.contents
        name = self.contract_name(t)
        if not self.ggml.ggml_backend_buffer_is_host(t.buffer):
            raise AssertionError(f"{name}: not in host memory")
        dtype = {"f32": np.float32, "i32": np.int32}[self.ggml.ggml_type_name(t.type).decode()]
        raw = np.frombuffer(ctypes.string_at(t.data, self.ggml.ggml_nbytes(pointer)), dtype=dtype)
        # ggml's ne0 is the fastest axis: reversed, (ne3, ne2, ne1, ne0) with byte strides nb.
        array = np.lib.stride_tricks.as_strided(
            raw, shape=tuple(reversed(list(t.ne))), strides=tuple(reversed(list(t.nb)))).copy()
        ndim = 3 if name == "per_layer_inputs" or name.split(".")[-1] in ("q", "k", "v") else 2
        if any(n != 1 for n in array.shape[:-ndim]):
            raise AssertionError(f"{name}: unexpected ggml shape {list(t.ne)}")
        array = array.reshape(array.shape[-ndim:])
        if array.shape[0] != self.n_tokens:
            raise AssertionError(f"{name}: {array.shape[0]} rows, the prompt has {self.n_tokens} "
                                 "(the forward was split into micro-batches, or rows were dropped)")
        tensor = torch.from_numpy(array.astype(np.int64) if dtype == np.int32 else array)
        self.recorder.put(name, tensor)


class Model:
    """A llama.cpp model on the CPU and its contexts, through the C API."""

    def __init__(self, llama, gguf_path: Path, log_capture: LogCapture):
        self.llama = llama
        self.log = log_capture
        llama.llama_backend_init()
        params = llama.llama_model_default_params()
        self.model = llama.llama_model_load_from_file(str(gguf_path).encode(), params)
        if not self.model:
            raise ModelRefused(self.log.last(4) or "llama_model_load_from_file failed")
        vocab = llama.llama_model_get_vocab(self.model)
        self.n_vocab = llama.llama_vocab_n_tokens(vocab)
        self.n_layer = llama.llama_model_n_layer(self.model)

    def context(self, params):
        ctx = self.llama.llama_init_from_model(self.model, params)
        if not ctx:
            raise ModelRefused(self.log.last(4) or "llama_init_from_model failed")
        return Context(self, ctx)


class ModelRefused(Exception):
    """llama.cpp's loader refused the GGUF (its last logged error)."""


class Context:
    """One llama.cpp context (its own KV cache) on sequence 0."""

    def __init__(self, owner: Model, ctx):
        self.owner, self.llama, self.ctx = owner, owner.llama, ctx

    def decode(self, tokens: list[int], start: int) -> np.ndarray:
        """One `llama_decode` of `tokens` at positions `start, start + 1, …`, logits requested
        for every token; returns them `[len(tokens), V]` (float32, llama.cpp's own buffer
        copied)."""
        llama = self.llama
        batch = llama.llama_batch_init(len(tokens), 0, 1)
        try:
            batch.n_tokens = len(tokens)
            for i, token in enumerate(tokens):
                batch.token[i] = token
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1
            status = llama.llama_decode(self.ctx, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode returned {status}: {self.owner.log.last(4)}")
            rows = []
            for i in range(len(tokens)):
                pointer = llama.llama_get_logits_ith(self.ctx, i)
                rows.append(np.ctypeslib.as_array(pointer, shape=(self.owner.n_vocab,)).copy())
            return np.stack(rows)
        finally:
            llama.llama_batch_free(batch)

    def free(self):
        self.llama.llama_free(self.ctx)
