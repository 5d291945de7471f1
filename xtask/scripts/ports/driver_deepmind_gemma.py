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

Images (`run_images`). The library's own multimodal path: `Transformer.__call__` with
`images=PreprocessedVisionInput` and the prompt's `image_token_id` runs replaced by gemma's
placeholder id −2 (`vision/_encoder.py`, `TOKEN_PLACEHOLDER`); the model then runs its
`VisionEncoder` (`vision/_encoder.py`: `VisionEntry`, the scanned `VisionTransformer`,
`VisionExit` pooling by position and ×√D, `Standardize` when the tower has it),
`Embedder.encode_vision` (weight-free RMSNorm, then `mm_input_projection`),
`_token_utils.merge_flat_embeddings` at the placeholders, PLE with id 0 at the placeholders, and
its own masks (causal; with `use_bidirectional_attention='vision'` a second mask with each
contiguous image run bidirectional, used on the sliding layers). The prefill is the one
`gm.text`'s `_prefill.prefill` runs for a first multimodal turn: positions and masks left to the
model, a cache of the prompt's length, merged into the full-length cache (`_merge_cache`) for the
decode steps (as in the text path). The `VisionEncoder` is built from the case's vision config
(`vision_encoder_config`; what gemma hard-codes is checked: θ = 100, head dim `D / heads`, KV
heads = heads, GELU-tanh, eps 1e-6); its `output_length` is the case's budget.

The patches are the oracle's preprocessed ones (`pixel_values.safetensors`: valid patches only,
row-major, positions (x, y)), not gemma's own resizing (`vision/_preprocessing.py`, a PIL
bicubic resize of its own): the comparison is of the tower, the merge and the text model, not
of resizing. They are padded as gemma pads every image it is given (`patchify_and_pad`: zero
patches at position (−1, −1) up to `9 · budget` slots; every image of the golden cases leaves
some slots empty). `GEMMA4_DM_VISION_UNPADDED=1` (diagnostic, not what a gemma user gets) feeds
the valid patches only (`output_length` = the soft-token count), which takes gemma's padding
mask out of the comparison.

| Hugging Face (`model.` prefix) | gemma (`params/`) | transform |
|---|---|---|
| `vision_tower.patch_embedder.input_proj.weight` `[Dv, 768]` | `vision_encoder/entry/input_projection/w` `[768, Dv]` | transpose |
| `vision_tower.patch_embedder.position_embedding_table` `[2, S, Dv]` | `vision_encoder/entry/pos_emb` `[S, 2, Dv]` | swap the first two axes (x table at index 0 in both) |
| `vision_tower.std_bias`, `std_scale` `[Dv]` | `vision_encoder/standardize/bias`, `scale` | as is (`(x − bias) · scale` in both) |
| `embed_vision.embedding_projection.weight` `[D, Dv]` | `embedder/mm_input_projection/w` `[Dv, D]` | transpose |
| `vision_tower.encoder.layers.i.input_layernorm.weight` | `…/stacked_layers/block/pre_attention_norm/scale` `[L, Dv]` | stacked over the layers (`nn.scan`), as is |
| `….post_attention_layernorm`, `pre_feedforward_layernorm`, `post_feedforward_layernorm` | `…/post_attention_norm`, `pre_ffw_norm`, `post_ffw_norm` | stacked, as is |
| `….self_attn.q_norm.weight`, `k_norm.weight` `[H]` | `…/attn/query_norm/scale`, `key_norm/scale` | stacked, as is (`value_norm` has no scale in either) |
| `….self_attn.q_proj.linear.weight` `[N·H, Dv]` | `…/attn/q_einsum/w` `[L, N, Dv, H]` | as the text `q_proj`, stacked |
| `….self_attn.{k,v}_proj.linear.weight` | `…/attn/kv_einsum/w` `[L, 2, N, Dv, H]` | each as `q_proj`, k then v, stacked |
| `….self_attn.o_proj.linear.weight` `[Dv, N·H]` | `…/attn/attn_vec_einsum/w` `[L, N, H, Dv]` | transpose, reshape, stacked |
| `….mlp.{gate,up}_proj.linear.weight` `[F, Dv]` | `…/mlp/gating_einsum/w` `[L, 2, F, Dv]` | gate then up (GELU on index 0), stacked |
| `….mlp.down_proj.linear.weight` `[Dv, F]` | `…/mlp/linear/w` `[L, F, Dv]` | transpose, stacked |
| `….{q,o}_proj.{input,output}_{min,max}` (clipped towers) | `…/attn/{q,attn_vec}_einsum/clip_{input,output}_{min,max}` `[L]` | stacked scalars |
| `….{k,v}_proj.*_{min,max}`, `….{gate,up}_proj.*_{min,max}` | `…/attn/kv_einsum/clip_*`, `…/mlp/gating_einsum/clip_*` | one bound for the pair: the pair must agree, else UNSUPPORTED |
| `….down_proj.*_{min,max}` | `…/mlp/linear/clip_*` | stacked scalars |

Recorded besides the text tensors (with `vision.{i}.` for several images, as the oracle's
`Recorder`): `vision.pixel_values` (the valid patches fed), `vision.patch_embeddings`
(`VisionEntry`, valid slots), `vision.layers.{k}.output` (valid slots; the scan keeps no
per-layer outputs, so the library's own vision `Block` is applied layer by layer with each
layer's parameter slice and `VisionTransformer`'s mask, the last checked against the captured
stack output and replaced by it), `vision.soft_tokens` (`Embedder.encode_vision`, split by the
images' soft-token counts), `embeddings` (`merge_flat_embeddings` of the captured text
embeddings and soft tokens: layer 0's input). `Transformer.__call__` re-indexes the logits rows
of a call with images at Gemma 3's `<start_of_image>` id (`remove_mm_logits`): the identity for
prompts without that id (checked).

Not representable (UNSUPPORTED): clipped towers whose k/v or gate/up bounds differ (gemma's
`ClippedEinsum` on `kv_einsum` / `gating_einsum`, one set of bounds per fused einsum, as the
released checkpoints have them; the random tiny on-device tower does not). Audio: not driven.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # kauldron.typing imports tensorflow

import dataclasses  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from port_base import arguments, plan_producers, unsupported  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from gemma.gm.math import _pos_utils, _positional_embeddings  # noqa: E402
from gemma.gm.nn.gemma4 import _config, _layers, _modules, _moe, _transformer  # noqa: E402
from gemma.gm.nn.gemma4.vision import _encoder as _vision_encoder  # noqa: E402
from gemma.gm.nn.gemma4.vision import _layers as _vision_layers  # noqa: E402
from gemma.gm.nn.gemma4.vision import _modules as _vision_modules  # noqa: E402
from gemma.gm.nn.gemma4.vision import _transformer as _vision_transformer  # noqa: E402
from gemma.gm.utils import _types  # noqa: E402
from gemma.gm.vision import _token_utils  # noqa: E402

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


def read_checkpoint(model_dir, vision: dict | None = None) -> dict:
    """The text model's tensors as float32 numpy arrays, by name without the layout's prefix;
    with `vision` (a dict), the vision tower's and projector's go there, by full name."""
    files = sorted(glob.glob(str(model_dir / "*.safetensors")))
    prefixes = ("model.language_model.", "model.")
    towers = ("model.vision_tower.", "model.embed_vision.")
    skipped = towers + ("model.audio_tower.", "model.embed_audio.")
    tensors = {}
    for path in files:
        with safe_open(path, framework="flax") as f:  # flax: bf16 has no numpy dtype
            for name in f.keys():
                if vision is not None and name.startswith(towers):
                    vision[name] = np.asarray(f.get_tensor(name).astype(jnp.float32))
                    continue
                if name.startswith(skipped):
                    continue
                short = next((name[len(p):] for p in prefixes if name.startswith(p)), name)
                tensors[short] = np.asarray(f.get_tensor(name).astype(jnp.float32))
    head = tensors.pop("lm_head.weight", None)
    if head is not None and not np.array_equal(head, tensors["embed_tokens.weight"]):
        unsupported("the checkpoint's lm_head differs from embed_tokens: gemma's `Embedder.decode` is tied")
    return tensors


class Filler:
    """Fills a parameter tree from checkpoint tensors: `take(name)` reads a tensor and remembers
    it (every one must be used), `put(path, value)` stores a value at a `/`-separated path after
    checking it has the shape gemma builds there."""

    def __init__(self, params: dict, shapes, hf: dict):
        self.params, self.shapes, self.hf, self.used = params, shapes, hf, set()

    @classmethod
    def over(cls, params: dict, shapes, hf: dict):
        """`(take, put, used)` of a new filler."""
        filler = cls(params, shapes, hf)
        return filler.take, filler.put, filler.used

    def take(self, name: str):
        self.used.add(name)
        return self.hf[name]

    def put(self, path: str, value):
        keys = path.split("/")
        node, expected = self.params, self.shapes
        for key in keys[:-1]:
            node, expected = node[key], expected[key]
        expected = tuple(expected[keys[-1]].shape)
        if tuple(value.shape) != expected:
            raise ValueError(f"{path}: mapped shape {value.shape}, gemma builds {expected}")
        node[keys[-1]] = np.ascontiguousarray(value, dtype=np.float32)


def gemma_params(plan: dict, hf: dict, shapes, vision: dict | None = None) -> dict:
    """The library's parameter tree filled from the checkpoint by the mapping of the module
    docstring. `shapes` is the tree of `Transformer.init` (shapes only); `vision` (full HF
    names) fills the vision encoder and the projector (`vision_params`)."""
    params = jax.tree.map(lambda s: None, shapes)
    if vision is not None:
        vision_params(plan, vision, shapes, params)
    take, put, used = Filler.over(params, shapes, hf)

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
        return method in ("encode", "encode_per_layer_input", "encode_vision")
    if isinstance(module, (_vision_layers.VisionEntry, _vision_transformer.VisionTransformer)):
        return method == "__call__"
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


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

# Diagnostic switch: feed each image's valid patches only (no padding slots), instead of the
# library's own padding to the budget (`patchify_and_pad`). See `vision_input`.
UNPADDED = os.environ.get("GEMMA4_DM_VISION_UNPADDED") == "1"


def vision_encoder_config(case, plan: dict, counts: list[int], valid: list[int]):
    """The library's `VisionEncoder` (gemma4/vision/_encoder.py) for the case's tower: what it
    hard-codes (θ = 100 axial RoPE, gated GELU-tanh, head dim `d_model / num_heads`, as many KV
    heads as heads, eps 1e-6) checked against the checkpoint's config."""
    vision = plan["config"].get("vision")
    if not vision:
        unsupported("the case has images but the checkpoint has no vision tower")
    raw = json.loads((case.model_dir / "config.json").read_text()).get("vision_config", {})
    D, heads = vision["hidden_size"], vision["num_attention_heads"]
    if vision["head_dim"] * heads != D:
        unsupported(f"vision head_dim {vision['head_dim']} × {heads} heads != hidden {D}: gemma's `VisionTransformer.setup` (gemma4/vision/_transformer.py) uses key_size = d_model // num_heads")
    if vision["num_key_value_heads"] != heads:
        unsupported("vision KV heads differ from heads: gemma's `VisionTransformer.setup` sets num_kv_heads = num_heads")
    if vision["rope_theta"] != 100.0:
        unsupported(f"vision RoPE θ {vision['rope_theta']}: gemma's `VisionBlock.setup` (gemma4/vision/_transformer.py) hard-codes 100")
    if (raw.get("rope_parameters") or {}).get("rope_type", "axial") != "axial":
        unsupported(f"vision RoPE {raw['rope_parameters']}: gemma's vision `Attention` only has axial 2D RoPE")
    if raw.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        unsupported(f"vision activation {raw['hidden_activation']}: gemma's vision `FeedForward` uses `nn.gelu` (tanh)")
    if vision["rms_norm_eps"] != 1e-6:
        unsupported(f"vision rms_norm_eps {vision['rms_norm_eps']}: gemma's vision `_norms.RMSNorm` hard-codes 1e-6")
    if vision["patch_size"] ** 2 * 3 != 768:
        unsupported(f"patch size {vision['patch_size']}: the case's patches are 16×16×3")
    k = vision["pooling_kernel_size"]
    if UNPADDED:
        if len(set(valid)) != 1:
            unsupported(f"GEMMA4_DM_VISION_UNPADDED with images of {valid} patches: `Transformer._encode_vision` batches images of one length")
        output_length = counts[0]
    else:
        output_length = max(img["budget"] for img in case.meta["images"])
    return _vision_encoder.VisionEncoder(
        d_model=D,
        num_layers=vision["num_hidden_layers"],
        num_heads=heads,
        ffw_hidden=vision["intermediate_size"],
        patch_size=vision["patch_size"],
        output_length=output_length,
        pos_emb_shape_yx=(vision["position_embedding_size"], 2),
        pooling_kernel_size=k,
        use_clipped_linears=vision["use_clipped_linears"],
        standardize_embeddings=vision["standardize"],
    )


def vision_params(plan: dict, hf: dict, shapes, params: dict):
    """The vision tower and projector of the mapping table (module docstring, "Images") put
    into `params`; every tensor must be used, every parameter set. The encoder's layers are
    stacked on a leading axis (`nn.scan` in `VisionTransformer.setup`)."""
    vision = plan["config"]["vision"]
    L, D, heads = vision["num_hidden_layers"], vision["hidden_size"], vision["num_attention_heads"]
    take, put, used = Filler.over(params, shapes, hf)

    def heads_in(w):  # [N·H, D] → [N, D, H]
        return w.reshape(heads, -1, w.shape[-1]).transpose(0, 2, 1)

    tower, blocks = "model.vision_tower.", "vision_encoder/transformer/stacked_layers/block/"
    put("vision_encoder/entry/input_projection/w", take(tower + "patch_embedder.input_proj.weight").T)
    put("vision_encoder/entry/pos_emb", take(tower + "patch_embedder.position_embedding_table").transpose(1, 0, 2))
    if vision["standardize"]:
        put("vision_encoder/standardize/bias", take(tower + "std_bias"))
        put("vision_encoder/standardize/scale", take(tower + "std_scale"))
    put("embedder/mm_input_projection/w", take("model.embed_vision.embedding_projection.weight").T)

    def stacked(fn):
        return np.stack([fn(f"{tower}encoder.layers.{i}.") for i in range(L)])

    put(blocks + "pre_attention_norm/scale", stacked(lambda s: take(s + "input_layernorm.weight")))
    put(blocks + "post_attention_norm/scale", stacked(lambda s: take(s + "post_attention_layernorm.weight")))
    put(blocks + "pre_ffw_norm/scale", stacked(lambda s: take(s + "pre_feedforward_layernorm.weight")))
    put(blocks + "post_ffw_norm/scale", stacked(lambda s: take(s + "post_feedforward_layernorm.weight")))
    put(blocks + "attn/query_norm/scale", stacked(lambda s: take(s + "self_attn.q_norm.weight")))
    put(blocks + "attn/key_norm/scale", stacked(lambda s: take(s + "self_attn.k_norm.weight")))
    put(blocks + "attn/q_einsum/w", stacked(lambda s: heads_in(take(s + "self_attn.q_proj.linear.weight"))))
    put(blocks + "attn/kv_einsum/w", stacked(lambda s: np.stack(
        [heads_in(take(s + "self_attn.k_proj.linear.weight")), heads_in(take(s + "self_attn.v_proj.linear.weight"))])))
    put(blocks + "attn/attn_vec_einsum/w", stacked(lambda s: take(s + "self_attn.o_proj.linear.weight").T.reshape(heads, -1, D)))
    put(blocks + "mlp/gating_einsum/w", stacked(lambda s: np.stack(
        [take(s + "mlp.gate_proj.linear.weight"), take(s + "mlp.up_proj.linear.weight")])))
    put(blocks + "mlp/linear/w", stacked(lambda s: take(s + "mlp.down_proj.linear.weight").T))
    if vision["use_clipped_linears"]:
        # gemma: one `ClippedEinsum` per einsum, so k/v (one `kv_einsum`) and gate/up (one
        # `gating_einsum`) share one set of bounds; a checkpoint whose pairs differ cannot be
        # represented.
        pairs = {
            "attn/q_einsum": ("self_attn.q_proj",),
            "attn/kv_einsum": ("self_attn.k_proj", "self_attn.v_proj"),
            "attn/attn_vec_einsum": ("self_attn.o_proj",),
            "mlp/gating_einsum": ("mlp.gate_proj", "mlp.up_proj"),
            "mlp/linear": ("mlp.down_proj",),
        }
        for dst, sources in pairs.items():
            for bound in ("input_min", "input_max", "output_min", "output_max"):
                values = []
                for i in range(L):
                    found = [float(take(f"{tower}encoder.layers.{i}.{src}.{bound}")) for src in sources]
                    if len(set(found)) != 1:
                        unsupported(
                            f"vision layer {i}: {' and '.join(sources)} have different {bound} clip bounds {found}: gemma "
                            f"computes them in one clipped einsum (gemma4/vision/_modules.py, `Attention.setup` / `FeedForward.setup`: "
                            f"one `ClippedEinsum` for `kv_einsum` and for `gating_einsum`, gemma4/_layers.py) with one set of bounds"
                        )
                    values.append(found[0])
                put(blocks + f"{dst}/clip_{bound}", np.asarray(values, dtype=np.float32))
    left = [n for n in hf if n not in used]
    if left:
        raise ValueError(f"vision checkpoint tensors without a gemma parameter: {left}")


def vision_input(case, counts: list[int]):
    """The oracle's preprocessed patches (valid patches only, row-major, positions (x, y)) as
    the library's `PreprocessedVisionInput` (gemma4/_transformer.py): each image padded to
    `9 · budget` slots with zero patches at position (−1, −1), as gemma's own
    `patchify_and_pad` (gemma4/vision/_encoder.py) pads them, flattened over the images as
    `Gemma4Sampler._preprocess_images` does. With GEMMA4_DM_VISION_UNPADDED=1, no padding."""
    path = case.dir / case.meta.get("pixel_values", "pixel_values.safetensors")
    files = {}
    with safe_open(str(path), framework="numpy") as f:
        for name in f.keys():
            files[name] = f.get_tensor(name)
    n = len(counts)
    patches, positions, valid = [], [], []
    for i in range(n):
        suffix = "" if n == 1 and "pixel_values" in files else f".{i}"
        p = np.asarray(files["pixel_values" + suffix], dtype=np.float32)
        xy = np.asarray(files["image_position_ids" + suffix], dtype=np.int32)
        if (xy < 0).any():
            raise ValueError(f"{path}: image {i} holds padding positions (valid patches only expected)")
        if len(p) != 9 * counts[i]:
            raise ValueError(f"image {i}: {len(p)} patches for {counts[i]} soft tokens")
        patches.append(p)
        positions.append(xy)
        valid.append(len(p))
    return patches, positions, valid


def pad_images(patches, positions, max_patches: int):
    out_p, out_xy = [], []
    for p, xy in zip(patches, positions):
        pad = max_patches - len(p)
        if pad < 0:
            raise ValueError(f"{len(p)} patches exceed the {max_patches} slots")
        out_p.append(np.concatenate([p, np.zeros((pad, p.shape[1]), np.float32)]))
        out_xy.append(np.concatenate([xy, np.full((pad, 2), _vision_layers.POSITIONS_PAD_VALUE, np.int32)]))
    return np.stack(out_p), np.stack(out_xy)


def vision_layer_outputs(bound_model, params: dict, entry_out, positions_xy, L: int):
    """Every encoder layer's output: the library's own vision `Block` (the module
    `VisionBlock` wraps) applied layer by layer with that layer's slice of the stacked
    parameters and `VisionTransformer.__call__`'s mask; `nn.scan` keeps no per-layer outputs.
    The caller checks the last against the captured `VisionTransformer` output."""
    encoder = bound_model.config.vision_encoder
    block = _vision_modules.Block(
        num_heads=encoder.num_heads, num_kv_heads=encoder.num_heads, embed_dim=encoder.d_model,
        head_dim=encoder.d_model // encoder.num_heads, hidden_dim=encoder.ffw_hidden,
        rope_base_frequency=100, rope_scale_factor=1.0, use_qk_norm=True,
        use_clipped_linears=encoder.use_clipped_linears,
    )
    stacked = params["vision_encoder"]["transformer"]["stacked_layers"]["block"]
    input_mask = jnp.logical_not((positions_xy == _vision_layers.POSITIONS_PAD_VALUE).all(axis=-1))
    attn_mask = input_mask[:, :, None] * input_mask[:, None, :]
    x, outs = entry_out, []
    apply = jax.jit(lambda p, x: block.apply({"params": p}, x, positions_xy, attn_mask))
    for i in range(L):
        x = apply(jax.tree.map(lambda a: a[i], stacked), x)
        outs.append(np.asarray(x))
    return outs


def run_images(case, plan: dict, out: str):
    """An image case through the library's multimodal path: `Transformer.__call__` with
    `images=PreprocessedVisionInput` (the vision encoder, `Embedder.encode_vision`,
    `merge_flat_embeddings` at the placeholders, gemma's own masks including the bidirectional
    sliding mask of `use_bidirectional_attention='vision'`), prefilled as `gm.text`'s
    `_prefill.prefill` does a first multimodal turn (positions and masks left to the model, a
    cache of the prompt's length, then merged into the full cache)."""
    special = plan["config"]["special_tokens"]
    image_id = special["image_token_id"]
    counts = [int(img["soft_tokens"]) for img in case.meta["images"]]
    tokens_list = list(case.tokens)
    for other in ("audio_token_id", "video_token_id"):
        if special.get(other) is not None and special[other] in tokens_list:
            unsupported(f"the prompt holds {other} {special[other]} in an image case")
    if tokens_list.count(image_id) != sum(counts):
        raise ValueError(f"{tokens_list.count(image_id)} placeholders for {sum(counts)} soft tokens")
    if 0 in tokens_list:
        unsupported("the prompt holds token id 0: gemma's multimodal path (`Transformer._encode_and_get_inputs`) takes id 0 for padding and masks it out")
    if tokens_list[0] == image_id:
        unsupported("the prompt starts with an image placeholder: gemma's `merge_flat_embeddings` (gm/vision/_token_utils.py) restores row 0's text embedding")
    # `Transformer.__call__` re-indexes the logits rows of a call with images by Gemma 3's
    # `<start_of_image>` (`remove_mm_logits`); with no such id in the prompt it is the identity.
    start_of_image = _token_utils._tokenizer.Gemma3Tokenizer.special_tokens.START_OF_IMAGE
    if start_of_image in tokens_list:
        unsupported(f"the prompt holds id {start_of_image}: `Transformer.__call__` (gemma4/_transformer.py) re-indexes the logits rows at Gemma 3's <start_of_image> (`_token_utils.remove_mm_logits`)")

    patches, positions, valid = vision_input(case, counts)
    encoder = vision_encoder_config(case, plan, counts, valid)
    config = dataclasses.replace(transformer_config(plan), vision_encoder=encoder)
    model = _transformer.Transformer(config=config, dtype=jnp.float32)
    check_layout(config, plan, model.bind({}))

    padded_p, padded_xy = pad_images(patches, positions, encoder.max_patches)
    n = len(counts)
    images = _transformer.PreprocessedVisionInput(
        patches=jnp.asarray(padded_p.reshape(1, n * encoder.max_patches, -1)),
        positions_xy=jnp.asarray(padded_xy.reshape(1, n * encoder.max_patches, 2)),
        soft_token_counts=tuple(counts),
    )
    # gemma's placeholder id for an image soft token (`SOFT_TOKEN_PLACEHOLDER`, −2), where the
    # checkpoint's `image_token_id` stands.
    mm_ids = [_vision_encoder.TOKEN_PLACEHOLDER if t == image_id else t for t in tokens_list]
    tokens = jnp.asarray([mm_ids], dtype=jnp.int32)
    T, steps = len(mm_ids), case.decode_steps

    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, images=images))["params"]
    hf_vision = {}
    hf = read_checkpoint(case.model_dir, vision=hf_vision)
    params = gemma_params(plan, hf, shapes, vision=hf_vision)
    variables = {"params": params}

    prefill_cache = config.init_cache(batch_size=1, dtype=jnp.float32, cache_length=T)
    result, state = model.apply(
        variables, tokens, images=images, cache=prefill_cache,
        capture_intermediates=captured, mutable=["intermediates"],
    )
    logits = np.asarray(result.logits[0], dtype=np.float32)
    if logits.shape[0] != T:
        raise ValueError(f"{logits.shape[0]} logits rows for {T} tokens")
    inter = state["intermediates"]
    # The positions the multimodal path derives (`_pos_utils.build_positions_from_mask`).
    positions_text = _pos_utils.build_positions_from_mask(tokens != 0)
    bound = model.bind(variables)
    tensors = record(inter, params, bound, positions_text, result.cache, T, plan)

    # The merged embeddings: `Transformer._merge_mm_embeddings` on the captured text
    # embeddings and projected soft tokens (the input of layer 0).
    text_embeddings = inter["embedder"]["encode"][0]
    soft = inter["embedder"]["encode_vision"][0][:, 0]  # [1, S, D]
    merged = _token_utils.merge_flat_embeddings(
        text_embeddings=text_embeddings, multimodal_embeddings=soft,
        mask=tokens == _vision_encoder.TOKEN_PLACEHOLDER,
    )
    tensors["embeddings"] = np.asarray(merged[0], dtype=np.float32)

    entry = np.asarray(inter["vision_encoder"]["entry"]["__call__"][0])
    last = np.asarray(inter["vision_encoder"]["transformer"]["__call__"][0])
    layers = vision_layer_outputs(bound, params, jnp.asarray(entry), jnp.asarray(padded_xy), config.vision_encoder.num_layers)
    # Same module, same weights, another XLA program than the scan: float32 rounding only.
    drift = np.abs(layers[-1] - last).max() / max(1.0, np.abs(last).max())
    if drift > 1e-5:
        raise ValueError(f"layer-by-layer vision blocks differ from the scanned stack by {drift} (relative)")
    layers[-1] = last  # the last layer as the stack computed it (what the exit pooled)
    prefix = (lambda i: "vision.") if n == 1 else (lambda i: f"vision.{i}.")
    start = 0
    soft = np.asarray(soft[0])
    for i in range(n):
        tensors[prefix(i) + "pixel_values"] = patches[i]  # what the encoder is fed (before its 2p − 1)
        tensors[prefix(i) + "patch_embeddings"] = entry[i, : valid[i]].astype(np.float32)
        for k, layer in enumerate(layers):
            tensors[prefix(i) + f"layers.{k}.output"] = layer[i, : valid[i]].astype(np.float32)
        tensors[prefix(i) + "soft_tokens"] = soft[start : start + counts[i]].astype(np.float32)
        start += counts[i]
    if start != soft.shape[0]:
        raise ValueError(f"{soft.shape[0]} soft tokens for {start}")
    tensors["logits"] = logits
    tensors["input_ids"] = np.asarray(case.tokens, dtype=np.int64)

    # The prefill cache merged into the full-length cache (`_prefill._merge_cache`).
    cache_length = T + steps
    full = config.init_cache(batch_size=1, dtype=jnp.float32, cache_length=cache_length)
    for name, layer in full.items():
        filled = result.cache[name]
        for key in ("k", "v", "positions"):
            layer[key] = layer[key].at[:, :T].set(filled[key])
        layer["end_index"] = filled["end_index"]
    decode(model, variables, full, T, cache_length, steps, logits, tensors)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, out)


def decode(model, variables, cache, T: int, cache_length: int, steps: int, logits, tensors: dict):
    """Greedy decode rows through the library's cache (see the module docstring)."""
    run = {"cache": cache, "used": T}

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


def main():
    case, plan, out = arguments()
    if case.meta.get("audio"):
        unsupported("audio cases are not driven yet")
    if case.meta.get("images"):
        return run_images(case, plan, out)
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

    decode(model, variables, result.cache, T, cache_length, steps, logits, tensors)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, out)


if __name__ == "__main__":
    main()
