"""Port driver: `gemma4-pytorch-codex` (PyPI, module `gemma4_pt_codex`), an independent PyTorch
implementation of Gemma 4, loaded through its own Hugging Face conversion (the config
translation and weight mapping its `convert_hf_checkpoint` uses), in float32. Recorded
with forward hooks and by wrapping two text-tower methods (the port's own modules, unmodified):
`embeddings`, `per_layer_inputs`, `layers.{i}.output`, `final_norm`, `logits`, and the decode
rows through the port's KV cache.
"""

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

from gemma4_pt_codex.config import create_kv_sharing_patterns
from gemma4_pt_codex.convert import (
    convert_hf_state_dict_to_native,
    load_hf_state_dict,
    native_config_from_hf_path,
)
from gemma4_pt_codex.model import Gemma4Model


def check_layout(model, plan: dict):
    """The port's KV-sharing producers against the case's layer plan (an unsupported layout is
    reported as such, not judged)."""
    ours = plan_producers(plan)
    text = model.config.text
    try:
        theirs = list(create_kv_sharing_patterns(text.kv_sharing, text.num_layers, tuple(text.layer_types)))
    except ValueError as error:
        unsupported(f"unsupported layout: {error}")
    if theirs != ours:
        unsupported(f"unsupported layout (hard-coded producer rule): KV producers {theirs}, the config's {ours}")


def add_unused_kv_projections(hf_state: dict, plan: dict):
    """Hugging Face saves no K/V projections for KV-shared layers (they read their producer's
    cache); the port's converter demands them. They are added as NaN, so that any use of one
    shows in the dump instead of passing silently."""
    prefix = "model.language_model." if any(k.startswith("model.language_model.") for k in hf_state) else "model."
    width = plan["config"]["text"]["hidden_size"]
    for layer in plan["plan"]["layers"]:
        if "SharedFrom" not in layer["kv_source"]:
            continue
        i, rows, d = layer["index"], layer["num_kv_heads"] * layer["head_dim"], layer["head_dim"]
        base = f"{prefix}layers.{i}.self_attn."
        for name, shape in (("k_proj.weight", (rows, width)), ("v_proj.weight", (rows, width)), ("k_norm.weight", (d,))):
            hf_state.setdefault(base + name, torch.full(shape, float("nan")))


def main():
    case, plan, out = arguments()
    if case.meta.get("images") or case.meta.get("audio"):
        unsupported("multimodal cases are not driven yet")
    try:
        config = native_config_from_hf_path(case.model_dir)
    except Exception as error:  # the port's config translation refusing the config is a finding
        unsupported(f"the port's config translation failed: {type(error).__name__}: {error}")
    model = Gemma4Model(config)
    hf_state = load_hf_state_dict(case.model_dir)
    add_unused_kv_projections(hf_state, plan)
    try:
        native = convert_hf_state_dict_to_native(config, hf_state)
        model.load_state_dict(native, strict=True)
    except Exception as error:  # the port's weight mapping refusing the checkpoint is a finding
        unsupported(f"the port's weight conversion failed: {type(error).__name__}: {error}")
    model.eval()
    check_layout(model, plan)

    recorder = Recorder()
    text = model.text
    methods = [(text, "embed_tokens", "embeddings"), (text, "_build_per_layer_inputs", "per_layer_inputs")]
    ids = torch.tensor([case.tokens])
    with recording(recorder, methods, text.final_norm, text.layers, lambda o: o[0]), torch.no_grad():
        output = model(ids, return_kv_cache=True)
    recorder.put("logits", output.logits[0])

    state = {"cache": output.kv_cache}

    def step(token):
        with torch.no_grad():
            result = model(torch.tensor([[token]]), kv_cache=state["cache"], return_kv_cache=True)
        state["cache"] = result.kv_cache
        return result.logits[0, -1]

    rows, tokens = greedy_decode_rows(output.logits[0, -1], case.decode_steps, step)
    save_dump(recorder, case, rows, tokens, out)


if __name__ == "__main__":
    main()
