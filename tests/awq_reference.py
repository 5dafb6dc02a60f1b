"""The AWQ reference of ``tests/test_awq.py``: a tiny seeded LLaMA, its calibration tokens, and (``main``) AutoAWQ
0.2.9's search on them, stored in ``tests/data/awq_reference.pt``.

The model and the tokens are built here from seeds alone (every weight drawn from one ``torch.Generator``, not
from transformers' initialisers), so the test rebuilds exactly what AutoAWQ saw. Widths are multiples of 64
(AutoAWQ's clip search batches output channels by 64) and no grouped-query attention, so all four of AutoAWQ's
LLaMA scale groups occur (``o_proj`` after ``v_proj`` included).

Regenerate (AutoAWQ is deprecated upstream and pins old dependencies, so it lives in a throwaway environment that
sees this project's torch and transformers through a ``.pth`` file and never touches ``.venv``)::

    python -m venv /tmp/awqenv
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/awqenv/lib/python3.11/site-packages/main.pth
    /tmp/awqenv/bin/pip install autoawq==0.2.9 --no-deps
    OMP_NUM_THREADS=1 /tmp/awqenv/bin/python -m tests.awq_reference      # from the repository root

What is stored, per setting (bits, group size): for every scale group (in AutoAWQ's order, block by block) the
previous op, the scaled linears, the 20 grid losses and the chosen scales; for every clipped linear its per-group
clip values; every norm's weight after the scales are folded in, and every linear's fake-quantized weight
after scaling and clipping (AutoAWQ's ``pseudo_quantize_tensor`` of those, in float32: AutoAWQ's own packing step,
which casts to float16 first, is skipped with ``export_compatible=True``).

Two faults of AutoAWQ 0.2.9 run on a CPU beside transformers 5 are worked around in :func:`main` (each says why):
the weights it restores after each grid point alias the live ones on a CPU, and it hands the blocks' KV cache to
every forward of its search. Without the two fixes its grid losses differ from the paper's definition (and from
ours) after the first grid point; with them ours equals it bit for bit here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

SETTINGS = {"4b_g32": {"bits": 4, "group_size": 32}, "3b_g64": {"bits": 3, "group_size": 64}}
NSAMPLES, SEQLEN, VOCAB = 8, 32, 128
PATH = Path(__file__).parent / "data" / "awq_reference.pt"


def tiny_llama() -> torch.nn.Module:
    """A 2-block LLaMA (hidden 64, MLP 128, 2 heads of 32, no GQA) with seeded weights and a few loud channels."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=SEQLEN,
                         rms_norm_eps=1e-6, tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).float().eval()
    g = torch.Generator().manual_seed(28)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
                p[torch.randperm(p.numel(), generator=g)[:4]] *= 6.0  # salient input channels, AWQ's premise
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return model


def calibration() -> torch.Tensor:
    return torch.randint(0, VOCAB, (NSAMPLES, SEQLEN), generator=torch.Generator().manual_seed(280))


def main() -> None:  # pragma: no cover - runs in AutoAWQ's throwaway environment only
    import awq
    import awq.quantize.quantizer as qz
    from torch import nn
    from awq.models.llama import LlamaAWQForCausalLM

    out: dict[str, Any] = {"autoawq": getattr(awq, "__version__", "0.2.9"), "calib": calibration(), "settings": {}}
    for key, s in SETTINGS.items():
        model = tiny_llama()
        groups: list[dict[str, Any]] = []
        clips: dict[str, torch.Tensor] = {}
        orig_best, orig_loss = qz.AwqQuantizer._compute_best_scale, qz.AwqQuantizer._compute_loss
        orig_apply_scale, orig_apply_clip = qz.apply_scale, qz.apply_clip
        orig_init = qz.AwqQuantizer.init_quant
        block = {"i": -1}

        def best_scale(self, x, w_mean, x_mean, module2inspect, *args, **kw):  # one call per scale group
            groups.append({"losses": []})
            # AutoAWQ keeps the weights to restore after each grid point as ``{k: v.cpu()}``: a copy on a GPU, but
            # on the CPU the same storage, which the next ``weight.mul_(scales)`` scales in place, so every grid
            # point would compound the scales of the ones before (and leave the block scaled). The state dict
            # is made a copy here, as it is on the GPU AutoAWQ is written for.
            module2inspect.state_dict = lambda *a, **k: {n: v.clone() for n, v in
                                                         nn.Module.state_dict(module2inspect, *a, **k).items()}
            try:
                return orig_best(self, x, w_mean, x_mean, module2inspect, *args, **kw)
            finally:
                del module2inspect.state_dict

        def loss(self, *args, **kw):
            value = orig_loss(self, *args, **kw)
            groups[-1]["losses"].append(value)
            return value

        def apply_scale(module, scales_list, input_feat_dict=None):
            block["i"] += 1
            done = [g for g in groups if "prev" in g]
            for g, (prev, layers, scales) in zip(groups[len(done):], scales_list):
                g.update(block=block["i"], prev=prev, linears=list(layers), scales=scales.clone().float())
            return orig_apply_scale(module, scales_list, input_feat_dict=input_feat_dict)

        def apply_clip(module, clip_list):
            for name, max_val in clip_list:
                clips[f"model.layers.{block['i']}.{name}"] = max_val.clone().float().squeeze(-1)
            return orig_apply_clip(module, clip_list)

        def init_quant(self, *args, **kw):
            # transformers 5 hands the blocks a KV cache (``cache``, a DynamicCache) that AutoAWQ 0.2.9 (tested up to
            # transformers 4.51) passes on to every forward of its search: each call would append its keys and
            # values to the last ones'. The search's forwards are independent passes over the calibration
            # sequences, so the cache is dropped, as AutoAWQ drops ``use_cache``.
            modules, kwargs, inps = orig_init(self, *args, **kw)
            for name in ("cache", "past_key_values", "past_key_value"):
                kwargs.pop(name, None)
            return modules, kwargs, inps

        qz.AwqQuantizer._compute_best_scale, qz.AwqQuantizer._compute_loss = best_scale, loss
        qz.AwqQuantizer.init_quant = init_quant
        qz.apply_scale, qz.apply_clip = apply_scale, apply_clip
        try:
            wrapper = LlamaAWQForCausalLM(model, "llama", False, model.config, None, None)
            wrapper.quantize(None, quant_config={"w_bit": s["bits"], "q_group_size": s["group_size"],
                                                 "zero_point": True, "version": "gemm"},
                             calib_data=calibration().tolist(), max_calib_samples=NSAMPLES,
                             max_calib_seq_len=SEQLEN, export_compatible=True)
        finally:
            qz.AwqQuantizer._compute_best_scale, qz.AwqQuantizer._compute_loss = orig_best, orig_loss
            qz.AwqQuantizer.init_quant = orig_init
            qz.apply_scale, qz.apply_clip = orig_apply_scale, orig_apply_clip
        for g in groups:
            g["ratio_index"] = min(range(len(g["losses"])), key=lambda k: (g["losses"][k], k))
        grid = type("Grid", (), {"w_bit": s["bits"], "group_size": s["group_size"], "zero_point": True})()
        norms, fake = {}, {}
        for name, mod in model.named_modules():
            if name.startswith("model.layers.") and isinstance(mod, torch.nn.Linear):
                fake[name] = qz.AwqQuantizer.pseudo_quantize_tensor(grid, mod.weight.detach().clone())[0]
            elif name.startswith("model.layers.") and name.endswith("norm"):
                norms[name] = mod.weight.detach().clone()
        out["settings"][key] = {**s, "groups": groups, "clips": clips, "norms": norms, "fake_quantized": fake}
        print(key, [(g["block"], g["prev"], g["ratio_index"]) for g in groups])
    torch.save(out, PATH)
    print("wrote", PATH, PATH.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
