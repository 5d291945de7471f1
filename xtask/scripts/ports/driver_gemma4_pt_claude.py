"""Port driver: `gemma4-pt-claude` (PyPI), an independent PyTorch implementation of Gemma 4.

Its own loader (`load_weights(..., format="hf")`) reads the Hugging Face checkpoint; its
factories only know the released shapes, so the model is built from its own config classes
with the case's dimensions (translated from the normalised config and layer plan of
`gemma4 inspect --json`, field by field below). Recorded with forward hooks and by wrapping two
embedder methods (the port's own modules, unmodified): `embeddings`, `per_layer_inputs`,
`layers.{i}.output`, `final_norm`, `logits`, and the decode rows through the port's KV cache.
"""

import warnings

import torch

from port_common import (
    Recorder,
    arguments,
    greedy_decode_rows,
    plan_producers,
    recording,
    save_dump,
    unsupported,
)

from gemma4_pt_claude.config import (
    AttentionType,
    Gemma4Config,
    KVCacheSharingConfig,
    MoEConfig,
    TextConfig,
    build_kv_sharing_patterns,
)
from gemma4_pt_claude.generate import init_cache
from gemma4_pt_claude.load import load_weights
from gemma4_pt_claude.model import Gemma4Model


def text_config(plan: dict) -> TextConfig:
    """The port's TextConfig for the case's text model."""
    text = plan["config"]["text"]
    layers = plan["plan"]["layers"]
    sliding = [l for l in layers if l["attention_type"] == "Sliding"]
    full = [l for l in layers if l["attention_type"] == "Full"]
    kind = text["rope_full"]["kind"]
    global_proportion = kind["Proportional"]["partial_rotary_factor"] if isinstance(kind, dict) else 1.0
    shared = text["num_kv_shared_layers"]
    num_layers = text["num_hidden_layers"]
    kv_sharing = None
    if shared:
        # The port keeps `int(L - frac·L)` layers unshared: pick a fraction for which that is
        # exactly L − shared (k/L itself can land a hair above k and lose a layer).
        fraction = (shared - 0.25) / num_layers
        kv_sharing = KVCacheSharingConfig(frac_shared_layers=fraction, share_global=True, share_local=True)
    moe = None
    if text.get("moe"):
        moe = MoEConfig(
            num_experts=text["moe"]["num_experts"],
            top_k=text["moe"]["top_k_experts"],
            expert_dim=text["moe"]["moe_intermediate_size"],
            dense_hidden_dim=text["intermediate_size"],
        )
    return TextConfig(
        vocab_size=text["vocab_size"],
        embed_dim=text["hidden_size"],
        hidden_dim=text["intermediate_size"],
        num_heads=text["num_attention_heads"],
        head_dim=(sliding or layers)[0]["head_dim"],
        num_kv_heads=(sliding or layers)[0]["num_kv_heads"],
        num_layers=num_layers,
        sliding_window_size=text["sliding_window"],
        final_logit_softcap=text["final_logit_softcapping"],
        local_rope_base=text["rope_sliding"]["theta"],
        global_rope_base=text["rope_full"]["theta"],
        rope_proportion=1.0,
        global_rope_proportion=global_proportion,
        per_layer_input_dim=text["hidden_size_per_layer_input"],
        attention_pattern=tuple(
            AttentionType.GLOBAL if l["attention_type"] == "Full" else AttentionType.LOCAL_SLIDING
            for l in layers
        ),
        kv_sharing=kv_sharing,
        moe=moe,
        k_eq_v_global=bool(text["attention_k_eq_v"]),
        num_global_kv_heads=full[0]["num_kv_heads"] if full else None,
        global_head_dim=full[0]["head_dim"] if full else None,
        override_kv_shared_ffw_hidden=2 * text["intermediate_size"] if text["use_double_wide_mlp"] else None,
        attn_impl="eager",
    )


def check_layout(config: TextConfig, plan: dict):
    """The port's own KV-sharing rule against the case's layer plan: a port that would read
    another producer cannot run this layout (reported as unsupported, not judged)."""
    ours = plan_producers(plan)
    theirs = build_kv_sharing_patterns(config.num_layers, config.attention_pattern, config.kv_sharing)
    if list(theirs) != ours:
        unsupported(f"unsupported layout: the port's KV-sharing producers {list(theirs)} differ from the config's {ours}")


def placeholder_masks(ids: torch.Tensor, plan: dict) -> dict:
    """The port's `image_mask` / `audio_mask` arguments: True where the prompt holds the
    config's image or audio placeholder id. The port asks its caller for them (Hugging Face
    derives them from the ids); without them it would embed a placeholder's own row instead of
    the pad row that a placeholder without its image or clip gets."""
    special = plan["config"]["special_tokens"]
    masks = {}
    for argument, key in (("image_mask", "image_token_id"), ("audio_mask", "audio_token_id")):
        if special.get(key) is not None and bool((ids == special[key]).any()):
            masks[argument] = ids == special[key]
    return masks


def main():
    case, plan, out = arguments()
    if case.meta.get("images") or case.meta.get("audio"):
        unsupported("multimodal cases are not driven yet")
    config = text_config(plan)
    check_layout(config, plan)
    torch.manual_seed(0)
    model = Gemma4Model(Gemma4Config(text=config, vision=None, audio=None))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            missing, _unexpected = load_weights(model, str(case.model_dir), format="hf", strict=False)
    except Exception as error:  # the port's loader refusing the checkpoint is a finding
        unsupported(f"the port's loader failed: {type(error).__name__}: {error}")
    # The port builds K/V projections on KV-shared layers too, which the checkpoint does not
    # hold (the layers read their producer's cache): NaN in every parameter the checkpoint did
    # not set, so that any use of one shows in the dump instead of random values.
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name in missing:
            parameters[name].fill_(float("nan"))
    model.eval()

    recorder = Recorder()
    decoder = model.text_decoder
    embedder = decoder.embedder
    methods = [(embedder, "encode", "embeddings"), (embedder, "encode_per_layer_input", "per_layer_inputs")]
    ids = torch.tensor([case.tokens])
    # The port's own cache, as its `generate` makes it (rolling caches on sliding layers).
    cache = init_cache(
        model.cfg, 1, len(case.tokens) + case.decode_steps, dtype=torch.float32,
        prefill_len=len(case.tokens),
    )
    with recording(recorder, methods, decoder.final_norm, decoder.blocks, lambda o: o[1]), torch.no_grad():
        logits, cache = model(ids, cache=cache, **placeholder_masks(ids, plan))
    recorder.put("logits", logits[0])

    state = {"cache": cache}

    def step(token):
        with torch.no_grad():
            ids = torch.tensor([[token]])
            row, state["cache"] = model(ids, cache=state["cache"], **placeholder_masks(ids, plan))
        return row[0, -1]

    rows, tokens = greedy_decode_rows(logits[0, -1], case.decode_steps, step)
    save_dump(recorder, case, rows, tokens, out)


if __name__ == "__main__":
    main()
