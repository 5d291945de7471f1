"""Port driver: DeepMind's `gemma` (PyPI `gemma` 4.0.1), the JAX/Flax library whose Gemma 4 code
is `gemma/gm/nn/gemma4/` (`_config.py`, `_transformer.py`, `_modules.py`, `_layers.py`,
`_moe.py`; RoPE in `gemma/gm/math/_positional_embeddings.py`).

It needs Python >= 3.12, so it runs in its own virtualenv (JAX on CPU, no torch): it imports the
torch-free `port_base` instead of `port_common` and writes the dump with `safetensors.numpy`
(same names and dtypes: float32 tensors, int64 ids, no batch axis).

The model is the library's own `Transformer` (`_transformer.py`) built from its own
`TransformerConfig` with the case's sizes (translated from `gemma4 inspect --json`'s normalised
config and layer plan in `transformer_config`), float32 parameters and activations, matmuls at
`highest` precision. The library loads only its own Orbax checkpoints, so the Hugging Face
weights are put into its parameter tree by the mapping below; every shape is checked against
the tree `Transformer.init` builds, every parameter of the tree must be set and every
checkpoint tensor used.

Weight mapping (HF name without its `model.` / `model.language_model.` prefix → gemma parameter
path under `params/`; `D` hidden, `H` query heads, `K` KV heads, `d` head dim of the layer,
`F` MLP width, `P` PLE width, `L` layers, `E` experts, `I` expert width):

| Hugging Face | gemma | transform |
|---|---|---|
| `embed_tokens.weight` `[V, D]` | `embedder/input_embedding` `[V, D]` | as is (also the tied output projection: `Embedder.decode`) |
| `embed_tokens_per_layer.weight` `[V, L·P]` | `embedder/per_layer_embeddings` `[V, L, P]` | reshape (layer-major columns) |
| `per_layer_model_projection.weight` `[L·P, D]` | `embedder/per_layer_model_projection/w` `[D, L, P]` | transpose, reshape; gemma applies its `D^-1/2` itself (`Einsum(w_scale=...)`) |
| `per_layer_projection_norm.weight` `[P]` | `embedder/per_layer_projection_norm/scale` | as is |
| `norm.weight` | `final_norm/scale` | as is |
| `layers.i.layer_scalar` `[1]` | `layer_i/skip_scale` `[1]` | as is |
| `layers.i.input_layernorm.weight` | `layer_i/pre_attention_norm/scale` | as is |
| `layers.i.post_attention_layernorm.weight` | `layer_i/post_attention_norm/scale` | as is |
| `layers.i.self_attn.q_proj.weight` `[H·d, D]` | `layer_i/attn/q_einsum/w` `[H, D, d]` | reshape `[H, d, D]`, swap the last two axes |
| `layers.i.self_attn.{k,v}_proj.weight` `[K·d, D]` | `layer_i/attn/kv_einsum/w` `[2, K, D, d]` | each as `q_proj`, stacked k then v |
| `layers.i.self_attn.k_proj.weight` (K=V full layer, no `v_proj`) | `layer_i/attn/k_einsum/w` `[K, D, d]` | as `q_proj` |
| `layers.i.self_attn.o_proj.weight` `[D, H·d]` | `layer_i/attn/attn_vec_einsum/w` `[H, d, D]` | transpose, reshape |
| `layers.i.self_attn.q_norm.weight`, `k_norm.weight` `[d]` | `layer_i/attn/query_norm/scale`, `key_norm/scale` | as is (`value_norm` has no scale) |
| `layers.i.mlp.{gate,up}_proj.weight` `[F, D]` | `layer_i/mlp/gating_einsum` `[2, F, D]` (MoE: `mlp2/`) | stacked gate then up (`FeedForward`: GELU on index 0) |
| `layers.i.mlp.down_proj.weight` `[D, F]` | `layer_i/mlp/linear` `[F, D]` (MoE: `mlp2/`) | transpose |
| `layers.i.pre_feedforward_layernorm.weight` | `layer_i/pre_ffw_norm/scale` (MoE: `pre_ffw2_norm`) | as is |
| `layers.i.post_feedforward_layernorm.weight` | `layer_i/post_ffw_norm/scale` | as is |
| `layers.i.pre_feedforward_layernorm_2.weight` (MoE) | `layer_i/pre_ffw_norm/scale` | as is (names crossed: DM `mlp` is the expert block) |
| `layers.i.post_feedforward_layernorm_1.weight` (MoE) | `layer_i/post_ffw2_norm/scale` | as is |
| `layers.i.post_feedforward_layernorm_2.weight` (MoE) | `layer_i/post_ffw1_norm/scale` | as is |
| `layers.i.router.proj.weight` `[E, D]` | `layer_i/mlp/router_logits/w` `[D, E]` | transpose |
| `layers.i.router.scale` `[D]` | `layer_i/mlp/router_scale` | as is |
| `layers.i.router.per_expert_scale` `[E]` | `layer_i/mlp/per_expert_scale` | as is (gemma scales expert outputs, HF routing weights: same product) |
| `layers.i.experts.gate_up_proj` `[E, 2I, D]` | `layer_i/mlp/gating_einsum/w` `[E, 2, I, D]` | reshape (rows `0..I−1` gate, `I..2I−1` up; `MoERagged`: GELU on index 0) |
| `layers.i.experts.down_proj` `[E, D, I]` | `layer_i/mlp/linear/w` `[E, I, D]` | swap the last two axes |
| `layers.i.per_layer_input_gate.weight` `[P, D]` | `layer_i/per_layer_input_gate/w` `[D, P]` | transpose |
| `layers.i.per_layer_projection.weight` `[D, P]` | `layer_i/per_layer_projection/w` `[P, D]` | transpose |
| `layers.i.post_per_layer_input_norm.weight` | `layer_i/post_per_layer_input_norm/scale` | as is |

- Norm scales go in unchanged: gemma's Gemma 4 `RMSNorm` (`_layers.py`, `RMSNorm.__call__`)
  multiplies the normalised input by `scale` itself (no `1 + scale`, unlike its Gemma 1-3
  norm), as Hugging Face's Gemma 4 norm multiplies by its weight.
- Einsum weights are gemma's `[in…, out…]` layouts: head-major packing (HF feature `n·d + j`
  is head `n`, dim `j`), the same reshape as the transformers converter
  (`convert_gemma4_weights.py`) applied backwards.
- A KV-sharing consumer layer has no K/V weights in the checkpoint, but gemma still builds
  `kv_einsum` / `k_einsum` and `key_norm` there and computes K/V from them before replacing
  them with the producer's (`_modules.py`, `Attention.__call__`): they are filled with NaN, so
  that any use would show in the dump.
- bf16 checkpoints are widened to float32 exactly; the model computes in float32, as the
  reference's default `--compute-dtype float32` (Hugging Face loading with
  `dtype=torch.float32`).

Recorded (flax `capture_intermediates`, the library's own modules unchanged): `embeddings`
(`Embedder.encode`), `per_layer_inputs` (`Embedder.encode_per_layer_input`),
`layers.{i}.attn.q` (the captured `query_norm` output rotated by the library's own `apply_rope`
with the layer's `Attention` attributes: the next line of `Attention.__call__`),
`layers.{i}.attn.k` / `.v` (the prefill's KV cache slots of the layers computing their own K/V:
after `key_norm` and RoPE, after `value_norm`), `layers.{i}.attn.output` (`Attention.__call__`),
`layers.{i}.mlp.output` (`FeedForward.__call__`: DM `mlp`, on MoE layers `mlp2`),
`layers.{i}.moe.output` (`MoERagged.__call__`), `layers.{i}.router.top_k_index` /
`top_k_weights` (`MoERagged._router`: its chosen experts and renormalised weights, sorted highest
first, times `per_expert_scale` as the contract has them), `layers.{i}.output`
(`Block.__call__`), `final_norm`, `logits`.

Decode rows: the library's KV cache (`TransformerConfig.init_cache`, full-length buffers with
per-slot positions; the sliding window is enforced by mask). The prefill runs the prompt into
it with the positions and causal mask gemma's own `_types.Input` derives (padded to the cache
length with False, as `gm.text`'s prefill does); each step feeds one token at slot
`end_index` with the step mask of `gm.text`'s sampling loop (`arange(cache) < used + 1`).
Row 0 is the prefill's last row (gemma's sampler instead re-feeds the last prompt token; the
contract's convention is `generate`'s).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # kauldron.typing imports tensorflow

import glob  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from port_base import arguments, plan_producers, unsupported  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from gemma.gm.math import _positional_embeddings  # noqa: E402
from gemma.gm.nn.gemma4 import _config, _layers, _modules, _moe, _transformer  # noqa: E402
from gemma.gm.utils import _types  # noqa: E402

SLIDING, FULL = _modules.AttentionType.LOCAL_SLIDING, _modules.AttentionType.GLOBAL


def rope_proportion(rope: dict, where: str) -> tuple[float, float]:
    """(rope_proportion, scale_factor) of gemma's `apply_rope` for one layer type's RoPE."""
    kind = rope["kind"]
    if kind == "Default":
        proportion = 1.0
    elif isinstance(kind, dict) and "Proportional" in kind:
        proportion = kind["Proportional"]["partial_rotary_factor"]
    else:
        unsupported(f"{where} RoPE {kind}: gemma's `apply_rope` (gemma/gm/math/_positional_embeddings.py) has no such scaling")
    if rope["factor"] < 1.0:
        unsupported(f"{where} RoPE factor {rope['factor']} < 1: refused by `apply_rope`")
    return proportion, rope["factor"]


def theta(value: float):
    """A RoPE base as gemma's configs spell it (an int when it is one)."""
    return int(value) if float(value).is_integer() else value


def transformer_config(plan: dict) -> _config.TransformerConfig:
    """The library's TransformerConfig for the case's text model, field by field from the
    normalised config and layer plan; what gemma hard-codes differently ends the driver."""
    text = plan["config"]["text"]
    layers = plan["plan"]["layers"]
    num_layers = text["num_hidden_layers"]
    sliding = [l for l in layers if l["attention_type"] == "Sliding"]
    full = [l for l in layers if l["attention_type"] == "Full"]
    if text["rms_norm_eps"] != 1e-6:
        unsupported(f"rms_norm_eps {text['rms_norm_eps']}: gemma's `RMSNorm.__call__` (gemma4/_layers.py) hard-codes 1e-6")
    if not text["tie_word_embeddings"]:
        unsupported("untied output projection: gemma's `Embedder.decode` (gemma4/_modules.py) always uses the input embedding")
    if len({l["num_query_heads"] for l in layers}) != 1:
        unsupported("query heads differ between layers: gemma's `Block` takes one `num_heads`")
    # Per-type geometry: gemma has one (head_dim, num_kv_heads) for sliding layers and one
    # (global_key_size, num_global_kv_heads, k_eq_v_global) for all full layers.
    for kind, group in (("sliding", sliding), ("full", full)):
        shapes = {(l["head_dim"], l["num_kv_heads"], l["key_equals_value"]) for l in group}
        if len(shapes) > 1:
            unsupported(f"the {kind} layers differ in head dim / KV heads / K=V {sorted(shapes)}: gemma's `Block.setup` has one geometry per attention type")
    if any(l["key_equals_value"] for l in sliding):
        unsupported("K=V on a sliding layer: gemma's `Block.setup` applies K=V to full layers only")
    base = (sliding or layers)[0]
    local_proportion, local_scale = rope_proportion(text["rope_sliding"], "sliding")
    global_proportion, global_scale = rope_proportion(text["rope_full"], "full")
    moe = text.get("moe")
    if any(l["has_moe"] != bool(moe) for l in layers):
        unsupported("MoE on some layers only: gemma's `TransformerConfig.enable_moe` covers every layer")
    P = text["hidden_size_per_layer_input"] or 0
    if P and text["vocab_size_per_layer_input"] != text["vocab_size"]:
        unsupported(f"PLE vocabulary {text['vocab_size_per_layer_input']} != vocabulary {text['vocab_size']}: gemma's `Embedder.setup` (gemma4/_modules.py) sizes the PLE table by `vocab_size`")
    shared = text["num_kv_shared_layers"]
    kv_sharing = None
    if shared:
        # gemma keeps `int(L − frac·L)` layers unshared: a fraction for which that is exactly
        # L − shared (shared/L itself can land a hair above and lose a layer).
        kv_sharing = _config.KVCacheSharingConfig(
            frac_shared_layers=(shared - 0.25) / num_layers, share_global=True, share_local=True
        )
    return _config.TransformerConfig(
        num_embed=text["vocab_size"],
        embed_dim=text["hidden_size"],
        hidden_dim=text["intermediate_size"],
        num_heads=layers[0]["num_query_heads"],
        head_dim=base["head_dim"],
        num_kv_heads=base["num_kv_heads"],
        final_logit_softcap=text["final_logit_softcapping"],
        use_post_attn_norm=True,
        use_post_ffw_norm=True,
        attention_types=tuple(FULL if l["attention_type"] == "Full" else SLIDING for l in layers),
        attn_logits_soft_cap=None,
        sliding_window_size=text["sliding_window"],
        qk_norm_with_scale=True,
        num_global_kv_heads=full[0]["num_kv_heads"] if full else None,
        global_key_size=full[0]["head_dim"] if full else None,
        k_eq_v_global=bool(full and full[0]["key_equals_value"]),
        global_rope_proportion=global_proportion,
        local_rope_proportion=local_proportion,
        local_base_frequency=theta(text["rope_sliding"]["theta"]),
        global_base_frequency=theta(text["rope_full"]["theta"]),
        local_scale_factor=local_scale,
        global_scale_factor=global_scale,
        per_layer_input_dim=P,
        kv_cache_sharing_config=kv_sharing,
        override_kv_shared_ffw_hidden=2 * text["intermediate_size"] if text["use_double_wide_mlp"] else None,
        enable_moe=bool(moe),
        num_experts=moe["num_experts"] if moe else 0,
        expert_dim=moe["moe_intermediate_size"] if moe else 0,
        top_k_experts=moe["top_k_experts"] if moe else 8,
        moe_dense_hidden_dim=text["intermediate_size"] if moe else 0,
        use_bidirectional_attention=text["use_bidirectional_attention"],
    )


def check_layout(config: _config.TransformerConfig, plan: dict, model):
    """The library's own KV-sharing rule and MLP widths against the case's layer plan: a port
    that would read another producer or build another width cannot run this layout."""
    ours = plan_producers(plan)
    theirs = _config.create_kv_cache_sharing_patterns(
        config.kv_cache_sharing_config, config.num_layers, config.attention_types
    )
    if list(theirs) != ours:
        unsupported(
            f"unsupported layout: gemma's KV-sharing producers {list(theirs)} "
            f"(gemma4/_config.py, `create_kv_cache_sharing_patterns`: a shared full layer reads layer "
            f"num_unshared − 1, a shared sliding layer num_unshared − 2) differ from the config's {ours}"
        )
    for layer in plan["plan"]["layers"]:
        i = layer["index"]
        width = config.moe_dense_hidden_dim if config.enable_moe else model._get_hidden_dim(layer_number=i)
        if width != layer["mlp_width"]:
            unsupported(f"layer {i}: gemma's MLP width {width} (`Transformer._get_hidden_dim`) differs from the config's {layer['mlp_width']}")


def check_prompt(case, plan: dict):
    """gemma's text path embeds every id as a token: a multimodal placeholder id without its
    image or clip (Hugging Face embeds the pad row there) has no counterpart in its API, whose
    own placeholders (-2 / -4) only its multimodal path writes and fills."""
    special = plan["config"]["special_tokens"]
    ids = {special.get(k) for k in ("image_token_id", "audio_token_id", "video_token_id")} - {None}
    found = sorted(ids & set(case.tokens))
    if found:
        unsupported(
            f"the prompt holds multimodal placeholder ids {found} without their image or clip: gemma's text path "
            "(gemma4/_transformer.py, `Transformer._encode_and_get_inputs`) embeds them as ordinary tokens"
        )


def read_checkpoint(model_dir) -> dict:
    """The text model's tensors as float32 numpy arrays, by name without the layout's prefix."""
    files = sorted(glob.glob(str(model_dir / "*.safetensors")))
    prefixes = ("model.language_model.", "model.")
    skipped = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")
    tensors = {}
    for path in files:
        with safe_open(path, framework="flax") as f:  # flax: bf16 has no numpy dtype
            for name in f.keys():
                if name.startswith(skipped):
                    continue
                short = next((name[len(p):] for p in prefixes if name.startswith(p)), name)
                tensors[short] = np.asarray(f.get_tensor(name).astype(jnp.float32))
    head = tensors.pop("lm_head.weight", None)
    if head is not None and not np.array_equal(head, tensors["embed_tokens.weight"]):
        unsupported("the checkpoint's lm_head differs from embed_tokens: gemma's `Embedder.decode` is tied")
    return tensors


def gemma_params(plan: dict, hf: dict, shapes) -> dict:
    """The library's parameter tree filled from the checkpoint by the mapping of the module
    docstring. `shapes` is the tree of `Transformer.init` (shapes only)."""
    params = jax.tree.map(lambda s: None, shapes)
    used = set()

    def take(name):
        used.add(name)
        return hf[name]

    def put(path: str, value):
        keys = path.split("/")
        node, expected = params, shapes
        for key in keys[:-1]:
            node, expected = node[key], expected[key]
        expected = tuple(expected[keys[-1]].shape)
        if tuple(value.shape) != expected:
            raise ValueError(f"{path}: mapped shape {value.shape}, gemma builds {expected}")
        node[keys[-1]] = np.ascontiguousarray(value, dtype=np.float32)

    def heads_in(w, heads):  # [heads·d, D] → [heads, D, d]
        return w.reshape(heads, -1, w.shape[-1]).transpose(0, 2, 1)

    text = plan["config"]["text"]
    L, P = text["num_hidden_layers"], text["hidden_size_per_layer_input"] or 0
    put("embedder/input_embedding", take("embed_tokens.weight"))
    put("final_norm/scale", take("norm.weight"))
    if P:
        V = text["vocab_size"]
        put("embedder/per_layer_embeddings", take("embed_tokens_per_layer.weight").reshape(V, L, P))
        put("embedder/per_layer_model_projection/w", take("per_layer_model_projection.weight").T.reshape(-1, L, P))
        put("embedder/per_layer_projection_norm/scale", take("per_layer_projection_norm.weight"))
    for layer in plan["plan"]["layers"]:
        i, H, K = layer["index"], layer["num_query_heads"], layer["num_kv_heads"]
        src, dst = f"layers.{i}.", f"layer_{i}/"
        put(dst + "skip_scale", take(src + "layer_scalar"))
        put(dst + "pre_attention_norm/scale", take(src + "input_layernorm.weight"))
        put(dst + "post_attention_norm/scale", take(src + "post_attention_layernorm.weight"))
        put(dst + "attn/q_einsum/w", heads_in(take(src + "self_attn.q_proj.weight"), H))
        put(dst + "attn/query_norm/scale", take(src + "self_attn.q_norm.weight"))
        put(dst + "attn/attn_vec_einsum/w", take(src + "self_attn.o_proj.weight").T.reshape(H, -1, text["hidden_size"]))
        if "Own" in layer["kv_source"]:
            k = heads_in(take(src + "self_attn.k_proj.weight"), K)
            if layer["key_equals_value"]:
                put(dst + "attn/k_einsum/w", k)
            else:
                put(dst + "attn/kv_einsum/w", np.stack([k, heads_in(take(src + "self_attn.v_proj.weight"), K)]))
            put(dst + "attn/key_norm/scale", take(src + "self_attn.k_norm.weight"))
        dense = dst + ("mlp2/" if layer["has_moe"] else "mlp/")
        put(dense + "gating_einsum", np.stack([take(src + "mlp.gate_proj.weight"), take(src + "mlp.up_proj.weight")]))
        put(dense + "linear", take(src + "mlp.down_proj.weight").T)
        put(dst + "post_ffw_norm/scale", take(src + "post_feedforward_layernorm.weight"))
        if layer["has_moe"]:
            put(dst + "pre_ffw2_norm/scale", take(src + "pre_feedforward_layernorm.weight"))
            put(dst + "pre_ffw_norm/scale", take(src + "pre_feedforward_layernorm_2.weight"))
            put(dst + "post_ffw2_norm/scale", take(src + "post_feedforward_layernorm_1.weight"))
            put(dst + "post_ffw1_norm/scale", take(src + "post_feedforward_layernorm_2.weight"))
            put(dst + "mlp/router_logits/w", take(src + "router.proj.weight").T)
            put(dst + "mlp/router_scale", take(src + "router.scale"))
            put(dst + "mlp/per_expert_scale", take(src + "router.per_expert_scale"))
            gate_up = take(src + "experts.gate_up_proj")
            E, two_I, D = gate_up.shape
            put(dst + "mlp/gating_einsum/w", gate_up.reshape(E, 2, two_I // 2, D))
            put(dst + "mlp/linear/w", take(src + "experts.down_proj").transpose(0, 2, 1))
        else:
            put(dst + "pre_ffw_norm/scale", take(src + "pre_feedforward_layernorm.weight"))
        if P:
            put(dst + "per_layer_input_gate/w", take(src + "per_layer_input_gate.weight").T)
            put(dst + "per_layer_projection/w", take(src + "per_layer_projection.weight").T)
            put(dst + "post_per_layer_input_norm/scale", take(src + "post_per_layer_input_norm.weight"))

    # What the checkpoint cannot set: the K/V weights gemma builds on KV-sharing consumers
    # (computed, then replaced by the producer's K/V): NaN. Anything else is a mapping error.
    consumers = {l["index"] for l in plan["plan"]["layers"] if "Own" not in l["kv_source"]}
    unset = [
        [p.key for p in path]
        for path, value in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: x is None)[0]
        if value is None
    ]
    for keys in unset:
        if keys[0] in {f"layer_{i}" for i in consumers} and keys[1] == "attn" and keys[2] in ("kv_einsum", "k_einsum", "key_norm"):
            shape = shapes[keys[0]]["attn"][keys[2]][keys[3]].shape
            put("/".join(keys), np.full(shape, np.nan, dtype=np.float32))
        else:
            raise ValueError(f"gemma parameter {'/'.join(keys)} not set by the mapping")
    # Stray K/V tensors of consumer layers are ignored (as Hugging Face ignores them).
    left = [n for n in hf if n not in used and not any(
        n.startswith(f"layers.{i}.self_attn.{w}") for i in consumers for w in ("k_proj", "v_proj", "k_norm"))]
    if left:
        raise ValueError(f"checkpoint tensors without a gemma parameter: {left}")
    return params


def captured(module, method: str) -> bool:
    """The module outputs `capture_intermediates` keeps (the library's modules, unchanged)."""
    if isinstance(module, _modules.Embedder):
        return method in ("encode", "encode_per_layer_input")
    if isinstance(module, (_modules.Block, _modules.Attention, _modules.FeedForward)):
        return method == "__call__"
    if isinstance(module, _moe.MoERagged):
        return method in ("__call__", "_router")
    if isinstance(module, _layers.RMSNorm):
        return method == "__call__" and module.name in ("final_norm", "query_norm")
    return False


def record(inter: dict, params: dict, bound, positions, cache, T: int, plan: dict) -> dict:
    """The contract's tensors from the prefill's intermediates and cache (batch row 0)."""
    out = {}

    def put(name, value):
        value = np.asarray(value)
        out[name] = value.astype(np.int64) if np.issubdtype(value.dtype, np.integer) else value.astype(np.float32)

    put("embeddings", inter["embedder"]["encode"][0][0])
    if "encode_per_layer_input" in inter["embedder"]:
        put("per_layer_inputs", inter["embedder"]["encode_per_layer_input"][0][0])
    for layer in plan["plan"]["layers"]:
        i = layer["index"]
        mine = inter[f"layer_{i}"]
        attn = bound.blocks[i].attn
        q = _positional_embeddings.apply_rope(
            mine["attn"]["query_norm"]["__call__"][0], positions,
            base_frequency=attn.rope_base_frequency, scale_factor=attn.rope_scale_factor,
            rope_proportion=attn.rope_proportion,
        )
        put(f"layers.{i}.attn.q", q[0])
        if "Own" in layer["kv_source"]:
            put(f"layers.{i}.attn.k", cache[f"layer_{i}"]["k"][0, :T])
            put(f"layers.{i}.attn.v", cache[f"layer_{i}"]["v"][0, :T])
        put(f"layers.{i}.attn.output", mine["attn"]["__call__"][0][1][0])
        if layer["has_moe"]:
            put(f"layers.{i}.mlp.output", mine["mlp2"]["__call__"][0][0])
            weights, choices = (np.asarray(a[0]) for a in mine["mlp"]["_router"][0])
            chosen = np.take_along_axis(weights, choices, axis=-1)
            order = np.argsort(-chosen, axis=-1, kind="stable")  # highest first
            choices = np.take_along_axis(choices, order, axis=-1)
            chosen = np.take_along_axis(chosen, order, axis=-1)
            scale = np.asarray(params[f"layer_{i}"]["mlp"]["per_expert_scale"])
            put(f"layers.{i}.router.top_k_index", choices)
            put(f"layers.{i}.router.top_k_weights", chosen * scale[choices])
            put(f"layers.{i}.moe.output", mine["mlp"]["__call__"][0][0])
        else:
            put(f"layers.{i}.mlp.output", mine["mlp"]["__call__"][0][0])
        put(f"layers.{i}.output", mine["__call__"][0][1][0])
    put("final_norm", inter["final_norm"]["__call__"][0][0])
    return out


def greedy_decode_rows(prefill_last_row: np.ndarray, steps: int, step):
    """port_common.greedy_decode_rows in numpy: row 0 is the prefill's last logits row; row s
    is the logits of the single-token step that fed token s − 1 through the port's cache."""
    rows, tokens = [], []
    row = prefill_last_row
    for s in range(steps):
        rows.append(np.asarray(row, dtype=np.float32))
        token = int(np.argmax(row))
        tokens.append(token)
        if s + 1 < steps:
            row = step(token)
    return rows, tokens


def main():
    case, plan, out = arguments()
    if case.meta.get("images") or case.meta.get("audio"):
        unsupported("multimodal cases are not driven yet")
    config = transformer_config(plan)
    model = _transformer.Transformer(config=config, dtype=jnp.float32)
    check_layout(config, plan, model.bind({}))
    check_prompt(case, plan)

    T, steps = len(case.tokens), case.decode_steps
    tokens = jnp.asarray([case.tokens], dtype=jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens))["params"]
    params = gemma_params(plan, read_checkpoint(case.model_dir), shapes)
    variables = {"params": params}

    # The prompt's positions and causal mask as gemma derives them (`_types.Input`), the mask
    # padded to the cache length (`gm.text` prefill); the library's own cache.
    cache_length = T + steps
    inputs = _types.Input(text=tokens, images=None, config=config.input_config)
    positions = inputs.positions
    mask = jnp.pad(inputs.attention_mask, ((0, 0), (0, 0), (0, cache_length - T)), constant_values=False)
    cache = config.init_cache(batch_size=1, dtype=jnp.float32, cache_length=cache_length)
    result, state = model.apply(
        variables, tokens, cache=cache, positions=positions, attention_mask=mask,
        capture_intermediates=captured, mutable=["intermediates"],
    )
    logits = np.asarray(result.logits[0], dtype=np.float32)
    tensors = record(state["intermediates"], params, model.bind(variables), positions, result.cache, T, plan)
    tensors["logits"] = logits
    tensors["input_ids"] = np.asarray(case.tokens, dtype=np.int64)

    run = {"cache": result.cache, "used": T}

    def step(token):
        # `_sampler_loop.SamplingState.attention_mask_for_step`: the slots written so far and
        # this token's own (the prompt has no padding, so the full mask is all True).
        slot = run["used"]
        step_mask = (jnp.arange(cache_length) < slot + 1)[None, None, :]
        res = model.apply(
            variables, jnp.asarray([[token]], dtype=jnp.int32), cache=run["cache"],
            positions=jnp.asarray([[slot]], dtype=jnp.int32), attention_mask=step_mask,
        )
        run["cache"], run["used"] = res.cache, slot + 1
        return np.asarray(res.logits[0, -1], dtype=np.float32)

    if steps:
        rows, generated = greedy_decode_rows(logits[-1], steps, step)
        tensors["decode_logits"] = np.stack(rows)
        tensors["greedy_continuation"] = np.asarray(generated, dtype=np.int64)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, out)


if __name__ == "__main__":
    main()
