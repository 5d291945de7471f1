"""Port driver: llama.cpp, the C/C++ runtime most people run GGUF models with, as vendored by the
PyPI source package `llama-cpp-python==0.3.36` (built here from source, never by pip), on the
checkpoint converted by its own `convert_hf_to_gguf.py` to an F32 GGUF (text only), through its
C API (llama-cpp-python's ctypes bindings), on the CPU with 2 threads. Build, conversion,
bindings and the recording callback: `llama_cpp_port.py`; cache: `~/.cache/gemma4/llama-cpp/`.

    python driver_llama_cpp.py --case golden/<case> --plan PLAN.json --out DUMP.safetensors [--mode default|f32]

What it records: the logits of every prompt position (one `llama_decode` of the whole prompt,
logits requested on every token, `n_batch = n_ubatch = n_ctx >= prompt + decode steps`, so the
prompt is one micro-batch); the decode rows through llama.cpp's own KV cache (one 1-token
`llama_decode` per step at the next position, `port_common.greedy_decode_rows`); and, through the
graph-evaluation callback `cb_eval`, the graph nodes that are exactly a contract tensor
(`llama_cpp_port.Tap`: embeddings, per_layer_inputs, attention q/k/v and output, mlp.output,
router.top_k_index, moe.output, layer outputs, final_norm). The recorded prompt forward runs in
its own context; a second context without a callback runs the prompt again (its logits must be
bit-identical: recording changes nothing) and then the decode steps.

Modes (`--mode`; `driver_llama_cpp_f32.py` and `driver_llama_cpp_no_flash_attention.py` run the
other two under port ids of their own):

- `default`: llama.cpp as its users run it: the normal build and `llama_context_default_params()`
  as it comes (F16 K and V cache, flash attention `auto`, which resolves to enabled on the CPU),
  only the sizes and the thread count set.
- `f32`: everything llama.cpp lets one switch to float32: F32 K and V cache, flash attention
  disabled (its CPU kernel converts K/V, and Q on short prompts, to F16 whatever the cache type),
  and exact GELU. Exact GELU needs a compile-time change: `ggml/src/ggml-cpu/vec.h` line 46
  `#define GGML_GELU_FP16` is unconditional (no compile definition can undo it), so a copy of
  the tree (`~/.cache/gemma4/llama-cpp/llama.cpp-exact-gelu`, the original untouched) has that
  one line commented out and is built into a second library; `ggml_vec_gelu_f32` and
  `ggml_vec_geglu_f32` then compute `ggml_gelu_f32(x)` (the tanh formula in float32) on every
  element. Nothing else differs from `default`. (With the F32 cache and no flash attention but
  the table's GELU, every golden case it runs still diverges at `layers.0.mlp.output`: the patch
  is needed to show that the rest of llama.cpp computes Gemma 4 as the reference does.)
- `no-flash-attention`: the defaults with flash attention disabled (`-fa off`), the F16 cache
  kept: attention as F16 matrix products (shortcut 4 below).

(A Q8_0 cache, `-ctk q8_0 -ctv q8_0`, is not a mode: llama.cpp refuses it on every golden model
it runs, whose sliding layers' head dim, 16, is not a multiple of Q8_0's 32-value block:
`llama_init_from_model`, "K cache type q8_0 with block size 32 does not divide
n_embd_head_k=16".)

The precision shortcuts llama.cpp takes by default (read in the pinned tree; `ggml-cpu` is
`ggml/src/ggml-cpu`), each switched off by `f32`:

1. F16 KV cache: `src/llama-context.cpp`, `llama_context_default_params`, lines 3780-3781
   (`type_k = type_v = GGML_TYPE_F16`): keys and values are rounded to fp16 when stored
   (`src/llama-kv-cache.cpp`, `llama_kv_cache::cpy_k` / `cpy_v`, `ggml_set_rows` at lines 1360,
   1395/1416).
2. GELU through an fp16 table: `ggml-cpu/vec.h` line 46 `#define GGML_GELU_FP16`; with it
   `ggml_vec_gelu_f32` (vec.h 1000-1022) and `ggml_vec_geglu_f32` (vec.h 1446-1467) round x to
   fp16, read `ggml_table_gelu_f16` (filled in `ggml-cpu/ggml-cpu.c`, `ggml_cpu_init`, line 3883,
   with the fp16 rounding of `ggml_gelu_f32`) and return x itself for x >= 10 and 0 for x <= -10.
   It hits the dense MLP (`ggml_geglu_split`, `src/llama-graph.cpp` `build_ffn` line 1874), the
   experts (`build_moe_ffn`, line 2283), and the PLE gate (`ggml_gelu`, `src/models/gemma4.cpp`
   line 374); the kernels are `ggml-cpu/ops.cpp` `ggml_compute_forward_geglu_f32` (3224) and
   `ggml_compute_forward_gelu_f32` (2183).
3. Flash attention on by default: `llama_context_default_params` line 3769 (`flash_attn_type =
   LLAMA_FLASH_ATTN_TYPE_AUTO`), resolved in `llama_context::resolve_fused_ops`
   (`src/llama-context.cpp` 557-558) to enabled when the CPU backend takes the op (it does).
   Then `src/llama-graph.cpp`, `build_attn_mha`, lines 2652-2658, casts an F32 K or V to F16
   before `ggml_flash_attn_ext` (an F32 cache does not escape fp16 under flash attention), and the
   KQ mask is F16 (`build_attn_inp_kq_mask`, line 39; exact: 0 or -inf). In `ggml-cpu/ops.cpp`,
   `ggml_compute_forward_flash_attn_ext_f16` (9441) takes the tiled kernel only for 64 or more
   query rows (`use_tiled`, 9547-9551,
   `GGML_FA_TILE_Q` = 64 in `ggml-cpu/common.h`): the golden prompts (and every decode step) run
   `ggml_compute_forward_flash_attn_ext_f16_one_chunk` (8843), which converts each query row to
   fp16 (`q_to_vec_dot`, line 8961), takes Q·K with `ggml_vec_dot_f16` (8976; fp16 inputs, f32
   sums), and, for an F16 V, accumulates the softmax-weighted values in an fp16 vector
   (`VKQ16`, `ggml_vec_scale_f16` / `ggml_vec_mad_f16` at 9000 and 9007, converted back at
   9036) despite the `// uses F32 accumulators` of `ggml_compute_forward_flash_attn_ext` (9584).
   The tiled kernel (9081; prompts of 64+ tokens) keeps Q and the accumulators in f32 and only
   widens the fp16 K/V (9256, 9319). Decode steps with 512+ cached positions split the keys
   across threads (`use_split_kv_path`, 9490) and merge partial softmaxes.
4. Without flash attention but with the F16 cache (flash attention resolved off, or disabled by
   the user): `build_attn_mha`'s `ggml_mul_mat(k, q)` (2688) and `ggml_mul_mat(v, kq)` (2732)
   multiply an F16 matrix, so `ggml_compute_forward_mul_mat` (`ggml-cpu/ggml-cpu.c` 1255,
   conversion at 1328) rounds the F32 operand to fp16 (`vec_dot_type` of F16 is F16,
   ggml-cpu.c 222-227): the queries, and the softmax probabilities. (`f32` avoids both: F32
   cache, no flash attention.)

Not shortcuts, only other roundings: the softmax's vectorised `ggml_v_expf` (`ggml-cpu/vec.h`
1191/1234, a polynomial exp); RoPE angles built by repeated multiplication
(`ggml-cpu/ops.cpp`, `ggml_rope_cache_init`, 6204-6218, `theta *= theta_scale`); RMSNorm sums
in double. The matmuls are F32 x F32 (the GGUF is F32: no conversion of activations), and the
PLE path is all F32 apart from its GELU (shortcut 2).

KV sharing: llama.cpp hard-codes the producer of a KV-shared layer (`src/llama-model.cpp`,
`llama_model::create_memory`, lines 2780-2788: layer `il >= n_layer_kv_from_start` reads layer
`n_layer_kv_from_start - 2` if sliding, `- 1` if full; `n_layer_kv_from_start = n_layer -
num_kv_shared_layers`, `src/models/gemma4.cpp` line 11). That is the config's rule (the last
unshared layer of the layer's own type) only when the last unshared layer is full and the one
before it sliding, as in the released E2B/E4B; elsewhere llama.cpp would fail an assertion
(`src/llama-kv-cache.cpp` line 268) or read a cache of the wrong type, so the driver reports
such a case unsupported before running it.
"""

import argparse
import re
import sys

import numpy as np
import torch

from port_common import Recorder, arguments, greedy_decode_rows, plan_producers, save_dump, unsupported

import llama_cpp_port as port

MODES = ("default", "f32", "no-flash-attention")
THREADS = 2


def mode_argument(default: str) -> str:
    """Takes `--mode` off the command line (the rest is `port_common.arguments`')."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--mode", choices=MODES, default=default)
    known, rest = parser.parse_known_args()
    sys.argv = [sys.argv[0]] + rest
    return known.mode


def llama_cpp_producers(plan: dict) -> list[int]:
    """The KV producer llama.cpp gives every layer (`llama_model::create_memory`'s `reuse`)."""
    layers = plan["plan"]["layers"]
    shared = sum(1 for layer in layers if "SharedFrom" in layer["kv_source"])
    first = len(layers) - shared  # n_layer_kv_from_start
    return [
        layer["index"] if layer["index"] < first
        else first - (2 if layer["attention_type"] == "Sliding" else 1)
        for layer in layers
    ]


def check_layout(plan: dict):
    """llama.cpp's hard-coded producers against the case's layer plan."""
    ours, theirs = plan_producers(plan), llama_cpp_producers(plan)
    if ours != theirs:
        shared = [i for i, layer in enumerate(plan["plan"]["layers"]) if "SharedFrom" in layer["kv_source"]]
        port.log(f"KV producers of every layer: llama.cpp's {theirs}, the config's {ours} "
                 f"(KV-shared layers {shared[0]}..{shared[-1]})")
        unsupported(
            "unsupported layout: hard-coded producer rule (src/llama-model.cpp, llama_model::create_memory): "
            f"llama.cpp's producers {[theirs[i] for i in shared]} vs the config's {[ours[i] for i in shared]}; "
            "harmless on released layouts"
        )


def context_params(llama, mode: str, n_ctx: int, tap=None):
    """`llama_context_default_params()` with the sizes, the threads and the mode's settings:
    `f32`, the F32 cache and flash attention off; `no-flash-attention`, flash attention off (`-fa
    off`); the recording callback if given."""
    params = llama.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = n_ctx
    params.n_ubatch = n_ctx
    params.n_threads = THREADS
    params.n_threads_batch = THREADS
    if mode == "f32":
        params.type_k = llama.GGML_TYPE_F32
        params.type_v = llama.GGML_TYPE_F32
        params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
    elif mode == "no-flash-attention":
        params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
    if tap is not None:
        params.cb_eval = tap.callback
    return params


def main(default_mode: str = "default"):
    mode = mode_argument(default_mode)
    case, plan, out = arguments()
    if case.meta.get("images") or case.meta.get("audio"):
        unsupported("multimodal cases are not driven yet")
    check_layout(plan)

    tree = port.source_tree()
    lib_dir = port.library(port.exact_gelu_tree(tree) if mode == "f32" else tree)
    try:
        gguf = port.gguf(case.model_dir, tree)
    except port.ConversionRefused as refusal:
        unsupported(f"convert_hf_to_gguf.py refused the checkpoint: {refusal}")
    llama, ggml = port.bindings(lib_dir)
    log = port.LogCapture(llama)
    try:
        model = port.Model(llama, gguf, log)
    except port.ModelRefused as refusal:
        unsupported(f"llama.cpp refused the GGUF: {refusal}")

    tokens = case.tokens
    n_ctx = len(tokens) + max(case.decode_steps, 1)

    # The recorded prompt forward, in a context of its own.
    recorder = Recorder()
    tap = port.Tap(llama, ggml, recorder, len(tokens))
    try:
        recorded = model.context(context_params(llama, mode, n_ctx, tap))
    except port.ModelRefused as refusal:
        unsupported(f"llama.cpp refused the context: {refusal}")
    recorded_logits = recorded.decode(tokens, 0)
    recorded.free()
    if tap.error is not None:
        raise tap.error
    for name in ["embeddings", "final_norm"] + [f"layers.{i}.output" for i in range(model.n_layer)]:
        if name not in recorder.tensors:
            raise AssertionError(f"the evaluation callback never saw {name}")

    # The same prompt without the callback, then the decode steps through its KV cache.
    ctx = model.context(context_params(llama, mode, n_ctx))
    logits = ctx.decode(tokens, 0)
    if not np.array_equal(logits.view(np.uint32), recorded_logits.view(np.uint32)):
        raise AssertionError("recording changed llama.cpp's logits")
    recorder.put("logits", torch.from_numpy(logits))
    position = len(tokens)

    def step(token: int) -> torch.Tensor:
        nonlocal position
        row = ctx.decode([token], position)[0]
        position += 1
        return torch.from_numpy(row)

    rows, continuation = greedy_decode_rows(torch.from_numpy(logits[-1]), case.decode_steps, step)
    ctx.free()
    save_dump(recorder, case, rows, continuation, out)

    attention = "enabled (auto)" if log.find(r"Flash Attention enabled") else "disabled"
    cache = sorted({kv for line in log.find(r"K \(\w+\):") for kv in re.findall(r"([KV]) \((\w+)\):", line)})
    cache_types = ", ".join(f"{name} {kind}" for name, kind in cache)
    port.log(f"{case.name}, mode {mode}: {lib_dir / 'libllama.so'}, {gguf.name}; flash attention {attention}, "
             f"cache {cache_types}; {len(recorder.tensors)} tensors recorded")


if __name__ == "__main__":
    main()
