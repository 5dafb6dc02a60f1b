"""Inference cost of dense vs compressed models: weight memory, peak memory, prefill latency, decode throughput.

    python -m experiments.bench_speed                                  # SmolLM2, ratios 0.2 0.4 0.6 0.8
    python -m experiments.bench_speed --batch 4 --prefill 1024 --decode 128 --repeats 7
    python -m experiments.bench_speed --ratios --load results/models/smollm2_135m/saes/ratio0.4/seed0-<key>
    python -m experiments.bench_speed --model tiny_llama --ratios 0.5 --prefill 64 --decode 8   # smoke run

Speed does not depend on how the factors were computed, so the compressed models are made by
plain SVD (``method=svd``, composed and instantiated as ``run.py`` does; data-free, seconds), saved once under ``<results-dir>/cache/bench_models/`` and reused;
``--load`` adds folders written by ``run.py save=true``. Each model is measured in a fresh
process (``--worker``) so that its peak memory is its own: peak RSS of the process that loads
the model and runs the benchmark on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA.
Timings are medians over ``--repeats`` after ``--warmup`` runs: prefill = one forward of
``batch x prefill`` tokens; decode = greedy steps with the KV cache after a ``--prompt``-token prompt.

The ideal speed-up of the compressed projections is ``1 / (1 - ratio)``: at rank
``r = floor((1 - ratio) m n / (m + n))`` their FLOPs ``r (m + n)`` are ``(1 - ratio) m n``. The whole
model gains less (embeddings, ``lm_head``, attention scores, norms stay dense): the column
``ideal (matmuls)`` is the ratio of all matmul weights, ``lm_head`` included. Prints a table and
writes ``<results-dir>/tables/bench_speed.md`` and ``<results-dir>/bench/bench_speed-<model>-<device>.json``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from experiments.speed import document
from experiments.sweeps import ROOT, compose
from saes.inputs.models import DTYPES, ModelSpec, load_model, resolve_device
from saes.runs.checkpoint import load_compressed, read_manifest, save_compressed
from saes.runs.job import model_spec


def model_cfg(name: str, dtype: str | None = None) -> ModelSpec:
    """The ``model`` config group entry ``name`` (conf/model/<name>.yaml), as run.py composes it."""
    return model_spec(compose([f"model={name}"] + ([f"model.dtype={dtype}"] if dtype else [])).model)


def svd_folders(name: str, ratios: list[float], out: Path) -> dict[float, Path]:
    """SVD-compressed copies of model ``name`` at each ratio, saved once (keyed by the model's identity)."""
    from saes.runs.job import build_method

    from saes.engine.config import EngineConfig
    from saes.engine.layout import layout_for, plan_ranks
    from saes.engine.loop import compress_model

    run_cfg = compose([f"model={name}", "model.dtype=float32", "method=svd"])
    cfg = model_spec(run_cfg.model)
    folders: dict[float, Path] = {}
    dense = None
    for ratio in ratios:
        if dense is None:
            dense = load_model(cfg)
        tag = hashlib.sha256(dense.identity.encode()).hexdigest()[:8]
        folder = out / f"{name}-{tag}" / f"svd-ratio{ratio}"
        folders[ratio] = folder
        if (folder / "lowrank_manifest.json").is_file():
            continue
        print(f"compressing {name} with svd at ratio {ratio} (once) -> {folder}", flush=True)
        model = copy.deepcopy(dense.model)
        compress_model(model, build_method(run_cfg), plan_ranks(model, layout_for(model), ratio), None,
                       EngineConfig(device=torch.device("cpu")))
        save_compressed(model, dense.tokenizer, folder, {"base": dense.identity, "method": {"name": "svd"},
                                                         "ratio": ratio})
        del model
    return folders


def matmul_weights(model: nn.Module) -> int:
    """Weights of every ``nn.Linear`` (the low-rank factors included, ``lm_head`` counted even when tied)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters (shared tensors once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], float | None], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` (or of the part it times itself, when it returns seconds)."""
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        t0 = time.perf_counter()
        inner = fn()
        _sync(device)
        if i >= warmup:
            times.append(inner if inner is not None else time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def prefill_seconds(model: nn.Module, ids: torch.Tensor, device: torch.device, warmup: int, repeats: int) -> float:
    def run() -> None:
        model(input_ids=ids, use_cache=False)

    return median_seconds(run, device, warmup, repeats)


@torch.no_grad()
def decode_seconds(model: nn.Module, prompt: torch.Tensor, steps: int, device: torch.device, warmup: int,
                   repeats: int) -> float:
    """Median seconds of ``steps`` greedy decoding steps with the KV cache (the prompt's prefill not timed)."""

    def run() -> float:
        out = model(input_ids=prompt, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)  # (B, 1)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        return time.perf_counter() - t0

    return median_seconds(run, device, warmup, repeats)


def measure(model: nn.Module, device: torch.device, batch: int, prefill: int, prompt: int, decode: int,
            warmup: int, repeats: int, seed: int = 0) -> dict[str, float]:
    """Timings of one model already on ``device``."""
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, prefill), generator=g).to(device)
    prompt_ids = torch.randint(0, vocab, (batch, prompt), generator=g).to(device)
    t_prefill = prefill_seconds(model, ids, device, warmup, repeats)
    t_decode = decode_seconds(model, prompt_ids, decode, device, warmup, repeats)
    return {"prefill_ms": 1e3 * t_prefill, "prefill_tokens_per_s": batch * prefill / t_prefill,
            "decode_tokens_per_s": batch * decode / t_decode}


def rss_mb(field: str) -> float:
    """``VmHWM`` (peak) or ``VmRSS`` (current) of this process, from /proc (Linux).

    Not ``getrusage``: Linux carries ``ru_maxrss`` across fork and exec, so a worker would report
    its parent's peak; ``VmHWM`` belongs to the process's own address space."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Load one model (dense, or a saved folder), measure it; meant for a fresh process."""
    device = resolve_device(spec["device"])
    torch.manual_seed(0)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    rss_start = rss_mb("VmRSS")
    if spec["folder"]:
        model, _, manifest = load_compressed(spec["folder"], dtype=DTYPES[spec["dtype"]])
        ratio, method = manifest["ratio"], manifest["method"]
        method = method["name"] if isinstance(method, dict) else str(method)
    else:
        model, ratio, method = load_model(model_cfg(spec["model"], spec["dtype"])).model, 0.0, "dense"
    model.eval().to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timing = measure(model, device, spec["batch"], spec["prefill"], spec["prompt"], spec["decode"],
                     spec["warmup"], spec["repeats"])
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else rss_mb("VmHWM")
    low = [m for m in model.modules() if type(m).__name__ == "LowRankLinear"]
    lin_dense = sum(m.in_features * m.out_features for m in low)
    lin_comp = sum(m.rank * (m.in_features + m.out_features) for m in low)
    return {"model": spec["model"], "method": method, "ratio": ratio, "folder": spec["folder"],
            "linears_ratio": 1 - lin_comp / lin_dense if low else 0.0,
            "parameters": sum(p.numel() for p in model.parameters()), "matmul_weights": matmul_weights(model),
            "weights_mb": weight_bytes(model) / 2**20,
            "folder_mb": (sum(f.stat().st_size for f in Path(spec["folder"]).glob("*.safetensors")) / 2**20
                          if spec["folder"] else None),
            "peak_mb": peak, "rss_at_start_mb": rss_start if device.type == "cpu" else None, **timing,
            "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                       else f"cpu x{torch.get_num_threads()}")}


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "experiments.bench_speed", "--worker", json.dumps(spec)], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark worker failed for {spec}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def with_speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Speed-ups against the dense row, and the ideal ones."""
    dense = next(r for r in rows if r["method"] == "dense")
    for r in rows:
        r["prefill_speedup"] = dense["prefill_ms"] / r["prefill_ms"]
        r["decode_speedup"] = r["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
        r["ideal_projections"] = 1 / (1 - r["ratio"])
        r["ideal_matmuls"] = dense["matmul_weights"] / r["matmul_weights"]
    return rows


def render(rows: list[dict[str, Any]], setup: str) -> str:
    """The table as ``bench_speed.md`` holds it (also rebuilt from the JSON by ``python -m experiments.tables``)."""
    return document(rows, setup).markdown().rstrip("\n")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2_135m", help="a conf/model entry")
    ap.add_argument("--ratios", type=float, nargs="*", default=[0.2, 0.4, 0.6, 0.8],
                    help="SVD-compressed ratios (none: only --load folders)")
    ap.add_argument("--load", nargs="*", default=[], help="folders written by run.py save=true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="model dtype (default: the model config's)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prefill", type=int, default=512, help="tokens per sequence in the timed prefill")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens before the timed decode steps")
    ap.add_argument("--decode", type=int, default=64, help="timed greedy decode steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--results-dir", default="results")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return []
    for folder in args.load:
        read_manifest(folder)  # a bad folder fails before any measurement
    results = Path(args.results_dir)
    dtype = args.dtype or model_cfg(args.model).dtype
    folders = [None, *map(str, svd_folders(args.model, args.ratios, results / "cache" / "bench_models").values()),
               *args.load]
    base = {k: getattr(args, k) for k in ("model", "device", "batch", "prefill", "prompt", "decode", "warmup",
                                          "repeats", "threads")}
    rows = []
    for folder in folders:
        print(f"measuring {folder or 'dense ' + args.model} ...", flush=True)
        rows.append(run_worker({**base, "dtype": dtype, "folder": folder}))
    rows = with_speedups(rows)
    setup = (f"{args.model} ({dtype}) on {rows[0]['device']}: prefill {args.batch} x {args.prefill} tokens, "
             f"decode {args.decode} greedy steps after a {args.prompt}-token prompt (batch {args.batch}, KV cache); "
             f"medians of {args.repeats} after {args.warmup} warm-up runs; peak = "
             + ("torch.cuda.max_memory_allocated" if rows[0]["rss_at_start_mb"] is None
                else "peak RSS of the process that loads and runs the model"))
    table = render(rows, setup)
    print(table)
    (results / "tables").mkdir(parents=True, exist_ok=True)
    (results / "tables" / "bench_speed.md").write_text(table + "\n")
    device = "cuda" if rows[0]["rss_at_start_mb"] is None else "cpu"
    out = results / "bench" / f"bench_speed-{args.model}-{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "setup": setup, "rows": rows,
                               "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1) + "\n")
    print(f"wrote {results / 'tables' / 'bench_speed.md'} and {out}")
    return rows


if __name__ == "__main__":
    main()
