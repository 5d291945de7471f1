"""Port driver: Hugging Face transformers, the control of the table (the oracle's own library,
the pinned version of golden/requirements.txt): it must be conformant everywhere, and it shows
that the recording recipe of docs/conformance.md ("From PyTorch (Hugging Face-style modules)")
gives a dump `compare` accepts. float32, eager attention; forward hooks on the unmodified
modules for every tensor of the recipe; the decode rows from `generate(output_logits=True)`.
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Gemma4ForCausalLM, Gemma4ForConditionalGeneration
from transformers.models.gemma4 import modeling_gemma4 as hf

from port_common import Recorder, arguments, save_dump, unsupported


def main():
    case, _plan, out = arguments()
    if case.meta.get("images") or case.meta.get("audio"):
        return media_case(case, out)
    model_class = Gemma4ForCausalLM if case.meta["layout"] == "causal_lm" else Gemma4ForConditionalGeneration
    model = model_class.from_pretrained(
        case.model_dir, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    tm = model.model if hasattr(model.model, "layers") else model.model.language_model
    recorder = Recorder()
    put = recorder.put

    original_attention = hf.eager_attention_forward

    def attention(module, query, key, value, mask, **kw):  # q [B,H,T,d], k/v [B,K,T,d]
        i = module.layer_idx
        put(f"layers.{i}.attn.q", query[0].transpose(0, 1))
        if not module.is_kv_shared_layer:
            put(f"layers.{i}.attn.k", key[0].transpose(0, 1))
            put(f"layers.{i}.attn.v", value[0].transpose(0, 1))
        return original_attention(module, query, key, value, mask, **kw)

    hf.eager_attention_forward = attention
    if tm.hidden_size_per_layer_input:
        project = tm.project_per_layer_inputs

        def project_and_record(*a, **kw):
            result = project(*a, **kw)
            put("per_layer_inputs", result[0])
            return result

        tm.project_per_layer_inputs = project_and_record

    hooks = [(tm.embed_tokens, "embeddings", lambda o: o[0]), (tm.norm, "final_norm", lambda o: o[0])]
    for i, layer in enumerate(tm.layers):
        hooks += [(layer, f"layers.{i}.output", lambda o: o[0]),
                  (layer.self_attn, f"layers.{i}.attn.output", lambda o: o[0][0]),
                  (layer.mlp, f"layers.{i}.mlp.output", lambda o: o[0])]
        if layer.enable_moe_block:
            hooks += [(layer.router, f"layers.{i}.router.top_k_weights", lambda o: o[1]),
                      (layer.experts, f"layers.{i}.moe.output", lambda o: o)]
    handles = [m.register_forward_hook(lambda m, a, o, n=n, pick=pick: put(n, pick(o))) for m, n, pick in hooks]
    for i, layer in enumerate(tm.layers):
        if layer.enable_moe_block:
            handles.append(layer.router.register_forward_hook(
                lambda m, a, o, i=i: put(f"layers.{i}.router.top_k_index", o[2])))
    ids = torch.tensor([case.tokens])
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits[0]
    finally:
        hf.eager_attention_forward = original_attention
        tm.__dict__.pop("project_per_layer_inputs", None)
        for handle in handles:
            handle.remove()
    put("logits", logits)

    rows, tokens = [], []
    if case.decode_steps:
        with torch.no_grad():
            result = model.generate(
                ids, max_new_tokens=case.decode_steps, do_sample=False, output_logits=True,
                return_dict_in_generate=True, eos_token_id=None, pad_token_id=0,
            )
        rows = [row[0].float() for row in result.logits]
        tokens = result.sequences[0, len(case.tokens):].tolist()
    save_dump(recorder, case, rows, tokens, out)


def media_case(case, out: str):
    """Image and audio cases: the oracle's own recording, `golden/generate.py` (its Hugging Face
    image processor and audio feature extractor on the case's sources, its `Recorder`, whose
    hooks add the tower tensors of contracts §2, and its greedy decode with the media inputs).
    The recipe is the one the conformance guide's "Images" section describes; as the control,
    the table shows that `compare` accepts such a dump, the tower tensors, the merge and the
    decode rows after the media included, with `--pixel-values` / `--audio-features`."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "golden"))
    import generate as oracle

    oracle_case = next((c for c in oracle.CASES if c.name == case.name), None)
    if oracle_case is None:
        unsupported(f"golden/generate.py has no case {case.name}")
    oracle.set_determinism()
    images = audio = None
    if oracle_case.images:
        (budget,) = {budget for _, budget in oracle_case.images}
        images = oracle.preprocess([oracle.image_of(name) for name, _ in oracle_case.images], budget)
    if oracle_case.clips:
        audio = oracle.extract_audio(oracle_case.clips)
    model = oracle.load_model(oracle_case, case.model_dir)
    with torch.no_grad():
        dump = oracle.run_case(oracle_case, model, case.tokens, images, audio)
    if dump["input_ids"].tolist() != case.tokens:
        raise AssertionError(f"{case.name}: the oracle's prompt differs from case.json's")
    save_file({name: tensor.contiguous() for name, tensor in dump.items()}, out)


if __name__ == "__main__":
    main()
