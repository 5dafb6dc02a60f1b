"""``python run.py model=... method=... ratio=... plan=true``: what a run will compute and what it will cost,
from the model's config alone (a local folder, the hub cache, or built in code), without its weights.

The model is the meta-device skeleton (:func:`saes.inputs.models.skeleton`): every projection's shape, no
memory. Printed: the uniform rank plan per projection type (a method's own allocator, adaCR, STRS, Dip-SVD,
ERC-SVD's partial layers, moves ranks between projections within the same budget, measured on calibration
data, so only the budget is known here), the parameter counts a run's record will hold (``params``), and the
cost model's prediction per phase (:mod:`saes.engine.cost`, ``docs/cost-model.md``) on the chosen device.
Nothing is loaded and no record is written.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from saes.core.lowrank import check_ratio, count_parameters
from saes.core.pruning import Pruner
from saes.core.slicegpt import Slicer
from saes.engine.cost import BENCH_CPU_FP64_TFLOPS, GB, RATES, Rates, Shape, cpu_rates, factorisation_seconds, \
    forward_flops, peak_gb, stats_flops
from saes.engine.layout import layout_for, plan_ranks
from saes.engine.loop import needs_calibration
from saes.inputs.models import DTYPES, model_config, skeleton

BENCH = Path("bench") / "block-4096-cpu.json"  # under results_dir: the measured block (make bench-block)


def plan_device(device: Any) -> str:
    """``cpu`` or ``cuda``: the device the prediction is for. ``device=cuda`` plans for a GPU on any machine;
    ``auto`` is the one a run here would use."""
    text = str(device)
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu" or text == "cuda" or text.startswith("cuda:"):
        return text.split(":")[0]
    raise ValueError(f"device={device!r} is not supported; use device=auto, cpu, cuda or cuda:<index>")


def model_shape(config: Any, name: str) -> Shape:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return Shape(name, config.hidden_size, config.intermediate_size, config.num_hidden_layers, kv * head_dim)


def plan_run(cfg: DictConfig) -> dict[str, Any]:
    """The plan of ``cfg``'s run (printed and returned); bad input is refused naming its key."""
    from saes.runs.job import build_method, model_spec  # job and pipeline import this module
    from saes.runs.pipeline import parameter_counts

    ratio = check_ratio(cfg.ratio)
    if cfg.model.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}; got {cfg.model.dtype!r}")
    device = plan_device(cfg.device)
    method = build_method(cfg)
    config = model_config(model_spec(cfg.model))  # ModelUnavailable (naming model.path) where it cannot be read offline
    model = skeleton(config)
    layout = layout_for(model)
    ranks = plan_ranks(model, layout, ratio)
    types: dict[str, dict[str, int]] = {}
    count: dict[str, int] = defaultdict(int)
    shapes = []
    for name, rank in ranks.items():
        m, n = model.get_submodule(name).weight.shape
        shapes.append((m, n, rank))
        kind = name.rsplit(".", 1)[1]
        types[kind] = {"rank": rank, "m": m, "n": n}
        count[kind] += 1
    dense = count_parameters(model)
    kept = dense - sum(m * n - r * (m + n) for m, n, r in shapes)
    params = parameter_counts(shapes, kept, dense)

    shape = model_shape(config, str(cfg.model.name))
    nbytes = torch.finfo(DTYPES[cfg.model.dtype]).bits // 8
    seqlen, tokens = cfg.calib.seqlen, cfg.calib.nsamples * cfg.calib.seqlen
    bench_path = Path(cfg.results_dir) / BENCH
    bench = json.loads(bench_path.read_text()) if bench_path.is_file() else None
    rates: Rates | None = RATES["cuda"] if device == "cuda" else (cpu_rates(bench) if bench else None)
    calibrated = needs_calibration(method, cfg.calib.track_fidelity)
    delta = "Delta" in method.needs
    family = "saes" if delta else "svdllm"  # the measured factorisation closest to the method's
    seconds: dict[str, float | None] = {}
    if rates is not None:
        streams = (2 if delta else 1) if calibrated else 0
        seconds["forwards"] = streams * forward_flops(shape, seqlen) * tokens * shape.blocks / (rates.forward * 1e12)
        seconds["statistics"] = (stats_flops(shape, delta) * tokens * shape.blocks / (rates.stats * 1e12)
                                 if method.needs else 0.0)
        seconds["factorisation"] = (shape.blocks * factorisation_seconds(bench, shape, family, BENCH_CPU_FP64_TFLOPS,
                                                                         rates.fp64) if bench else None)
        ppl = cfg.eval.ppl
        windows = ppl.max_windows if ppl.max_windows is not None else 0
        eval_tokens = windows * ppl.seqlen * len(ppl.sources)
        per_token = shape.blocks * forward_flops(shape, ppl.seqlen) + 2 * shape.hidden * config.vocab_size
        seconds["eval_ppl_one_model"] = eval_tokens * per_token / (rates.forward * 1e12) if windows else None
    note = None
    if isinstance(method, Slicer):
        from saes.engine.slicing import plan_width

        width, budget = plan_width(model, method, ratio)
        note = (f"{method.name} slices the residual stream to width {width} of {budget['hidden']} (its blocks' "
                f"projections plus shortcut matrices remove {budget['removed']:,} parameters, this plan "
                f"{budget['target']:,}); the head stays {budget['hidden']} wide and is untied (no ranks)")
    elif isinstance(method, Pruner):
        note = "a pruner removes head groups and MLP channels holding this plan's removed parameters (no ranks)"
        if method.scores_from == "gradients":
            note += ("; its scores take a backward pass of the whole model per calibration sequence first: the "
                     "weights on the device, float32 sums of every projection's gradient on stats_device (2x the "
                     "weights in fp16), above the peak below")
    elif cfg.method.get("rank_alloc") == "record":
        note = f"the ranks of the record {cfg.method.ranks_from}, within this budget"
    elif method.plans_ranks or cfg.method.get("rank_alloc", "uniform") != "uniform":
        note = "the method's allocator moves ranks within this budget (decided on calibration data)"
    whole = whole_model_passes(cfg)
    if whole:
        note = ((note + "; ") if note else "") + (
            f"the whole model goes on {device} for {', '.join(whole)} (its weights, {dense * nbytes / GB:.1f} GB, "
            "and their activations), beyond the one-block peak below")
    plan = {
        "model": str(cfg.model.name), "method": method.name, "ratio": ratio, "device": device,
        "dtype": str(cfg.model.dtype), "blocks": shape.blocks, "calibration_tokens": tokens if calibrated else 0,
        "projections": {k: {**v, "count": count[k]} for k, v in types.items()}, "params": params,
        "plan_note": note,
        "predicted_seconds": seconds or None, "rates_tflops": vars(rates) if rates else None,
        "bench": str(bench_path) if bench else None,
        "peak_device_gb": peak_gb(shape, tokens, family, act_bytes=nbytes, weight_bytes=nbytes) if calibrated else None,
        "peak_device_gb_rerun": (peak_gb(shape, tokens, family, act_bytes=nbytes, weight_bytes=nbytes, staged=False)
                                 if calibrated else None),
        "host_weights_gb": dense * nbytes / GB,
    }
    print(render(plan))
    return plan


def whole_model_passes(cfg: DictConfig) -> list[str]:
    """The passes that run the whole model on the device (not one block at a time): gradients of the model's loss,
    tail forwards, a trial model's perplexity, LoRA training; ``offload=true`` does not apply to them."""
    name, alloc = str(cfg.method.name), cfg.method.get("rank_alloc", "uniform")
    out = ["FWSVD's Fisher gradients"] if name == "fwsvd" else []  # LLM-Pruner's gradients: its own note above
    out += [{"dobi": "Dobi-SVD's stage-1 training", "dip": "Dip-SVD's gradient sensitivities",
             "strs": "STRS's tail forwards"}[alloc]] if alloc in ("dobi", "dip", "strs") else []
    if name == "ercsvd" and cfg.method.get("plc", {}).get("k") == "search":
        out.append("ERC-SVD's k search (a compressed trial model per candidate)")
    if cfg.get("finetune") is not None:
        out.append("LoRA fine-tuning")
    return out


def render(plan: dict[str, Any]) -> str:
    p = plan["params"]
    lines = [f"== plan: {plan['model']} | {plan['method']} | ratio {plan['ratio']} | {plan['device']} | "
             f"{plan['dtype']} | {plan['blocks']} blocks (nothing loaded, no record written)",
             "   projection   rank      m      n  per model"]
    lines += [f"   {k:<10} {v['rank']:>6} {v['m']:>6} {v['n']:>6}  x{v['count']}" for k, v in plan["projections"].items()]
    lines.append(f"   params: projections {p['linears_dense']:,} -> {p['linears_compressed']:,} "
                 f"({p['linears_ratio']:.4f} removed); model {p['model_dense']:,} -> {p['model_compressed']:,} "
                 f"({p['model_ratio']:.4f} removed)")
    if plan["plan_note"]:
        lines.append(f"   note: {plan['plan_note']}")
    secs = plan["predicted_seconds"]
    if secs is None:
        lines.append(f"   predicted time: no block benchmark found ({BENCH} under results_dir; make bench-block)")
    else:
        shown = ", ".join(f"{k} {'?' if v is None else f'{v:.0f} s'}" for k, v in secs.items())
        lines.append(f"   predicted time ({plan['calibration_tokens']:,} calibration tokens): {shown}")
        lines.append("   rates [TFLOP/s]: " + ", ".join(f"{k} {v:.3g}" for k, v in plan["rates_tflops"].items())
                     + ("" if plan["device"] == "cuda" else " (measured on the development CPU in float32; "
                        "bf16/fp16 matmuls on a CPU without native half support are 5-8x slower)"))
    if plan["peak_device_gb"] is not None:
        lines.append(f"   peak memory on {plan['device']}: {plan['peak_device_gb']:.1f} GB (staged engine, one block "
                     f"there); the model's weights in host memory: {plan['host_weights_gb']:.1f} GB")
        if plan["peak_device_gb_rerun"] < plan["peak_device_gb"] - 0.05:
            lines.append(f"   where that does not fit (calib.max_buffer_gb, auto: 80% of the free memory), the "
                         f"reference path: {plan['peak_device_gb_rerun']:.1f} GB, the same result, 2-3x the "
                         "statistics time")
    return "\n".join(lines)
