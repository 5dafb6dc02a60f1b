"""One decoder block with LLaMA-7B's shapes (random weights), measured phase by phase (issue 12's cost model).

    python -m experiments.bench_block                       # this CPU: 4 x 512 calibration tokens, float32
    python -m experiments.bench_block --tokens 16 2048 --dtype float16 --device cuda   # a GPU

Measures, on one block of ``--hidden`` / ``--intermediate`` / ``--heads`` (LLaMA-7B's 4096 / 11008 / 32):

* the block's forward over the calibration tokens (the unit of the statistics passes);
* the statistics passes of SAES-SVD (compressed stream, ``H`` and ``Delta``) and SVD-LLM (FP stream, ``H``),
  staged and by the reference re-run path, with a method whose factorisation costs nothing (so the time is
  the passes' alone);
* each factorisation path per projection shape (4096 x 4096, 11008 x 4096, 4096 x 11008): float64 and
  float32 ``torch.linalg.svd``, and the Gram eigendecomposition in float64 (``saes.core.linalg.truncated_svd``);
  and the whole SAES-SVD and SVD-LLM factorisation of each shape (Cholesky, whitening, ACES, CEALC);
* peak memory of the staged SAES-SVD pass (process RSS on a CPU, ``max_memory_allocated`` on a GPU).

Writes ``results/bench/block-<hidden>-<device>.json``. ``docs/cost-model.md`` turns these figures into
predicted compression times and memory for LLaMA-7B/13B/30B.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Any, Callable

import torch

from baselines.svdllm import SVDLLM
from saes.core.linalg import truncated_svd
from saes.core.method import Factors, Method
from saes.core.stats import SiteStats
from saes.engine.config import EngineConfig
from saes.engine.layout import layout_for, plan_ranks
from saes.engine.loop import compress_model
from saes.runs.records import environment
from saes.saes import SAES

from .callbacks import reset_peak_rss

ROOT = Path(__file__).resolve().parent.parent


class StatsOnly(Method):
    """Asks for the statistics of ``inner`` on its stream; factorises by slicing (no cost), so the engine's
    time is the statistics passes'."""

    def __init__(self, needs: frozenset[str], stream: str) -> None:
        super().__init__("stats-only", "float32")
        self.needs, self.stream = needs, stream  # type: ignore[assignment]

    def factorize(self, W: torch.Tensor, stats: SiteStats, rank: int, layer: str = "") -> Factors:
        return Factors(W[:, :rank].contiguous(), torch.zeros(rank, W.shape[1], dtype=W.dtype, device=W.device))


def one_block_model(hidden: int, intermediate: int, heads: int, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                      num_key_value_heads=heads, num_hidden_layers=1, vocab_size=512, max_position_embeddings=4096)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device: torch.device) -> float:
    """Start a peak-memory window; returns the memory in use now (MB)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    reset_peak_rss()
    return _status_mb("VmRSS")


def peak_mb(device: torch.device) -> float:
    """The peak since :func:`reset_peak` (MB): CUDA allocations, or the process's resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _status_mb("VmHWM")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--tokens", type=int, nargs=2, default=[4, 512], metavar=("NSAMPLES", "SEQLEN"))
    ap.add_argument("--batch", type=int, default=1, help="calibration sequences per forward")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-svd", action="store_true", help="skip the (slow on a CPU) float64/float32 full SVDs")
    ap.add_argument("--only-factorisation", action="store_true",
                    help="section 3 alone (times and peak memory per shape), to factorisation-<h>x<i>-<device>.json")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    nsamples, seqlen = args.tokens
    ids = torch.randint(0, 512, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    result: dict[str, Any] = {"shape": {"hidden": args.hidden, "intermediate": args.intermediate, "heads": args.heads},
                              "tokens": nsamples * seqlen, "nsamples": nsamples, "seqlen": seqlen,
                              "batch": args.batch, "dtype": args.dtype, "device": device.type,
                              "threads": args.threads, "env": environment()}

    if args.only_factorisation:
        result["factorisation"] = factorisation(args, device)
        write(result, Path(args.out) / f"factorisation-{args.hidden}x{args.intermediate}-{device.type}.json")
        return

    # 1. the block's forward over the calibration tokens
    model = one_block_model(args.hidden, args.intermediate, args.heads, dtype)
    block = model.model.layers[0].to(device)
    captured: dict[str, Any] = {}
    hook = block.register_forward_pre_hook(lambda _m, a, kw: captured.update(call=(a[0], kw)), with_kwargs=True)
    with torch.no_grad():
        model.to(device)(input_ids=ids[: args.batch].to(device), use_cache=False)
    hook.remove()
    x, kw = captured["call"]
    with torch.no_grad():
        block(x, **kw)  # warm-up
        result["block_forward_s"] = timed(lambda: [block(x, **kw) for _ in range(0, nsamples, args.batch)], device)
    print("block forward", result["block_forward_s"], flush=True)

    # 2. statistics passes, staged and reference (the block compressed by a free factorisation)
    passes: dict[str, Any] = {}
    for label, needs, stream in (("saes", frozenset({"H", "Delta"}), "compressed"), ("svdllm", frozenset({"H"}), "fp")):
        for rerun in (False, True):
            fresh = one_block_model(args.hidden, args.intermediate, args.heads, dtype)
            ranks = plan_ranks(fresh, layout_for(fresh), 0.4)
            base = reset_peak(device)
            ecfg = EngineConfig(device=device, batch_size=args.batch, rerun=rerun)
            report = compress_model(fresh, StatsOnly(needs, stream), ranks, ids, ecfg)
            passes[f"{label}/{'reference' if rerun else 'staged'}"] = {
                "statistics_s": report.timings["calibration"], "peak_mb": peak_mb(device), "base_mb": base}
            print(label, "reference" if rerun else "staged", passes[f"{label}/{'reference' if rerun else 'staged'}"],
                  flush=True)
            del fresh
    result["statistics"] = passes

    result["factorisation"] = factorisation(args, device)
    write(result, Path(args.out) / f"block-{args.hidden}-{device.type}.json")


def warm_up(device: torch.device) -> None:
    """One small call of each kernel family the timings use, untimed: the first call in a process pays for the
    library's set-up (on CUDA, cuBLAS and cuSOLVER handles and lazily loaded kernels), not the shape timed."""
    small = torch.randn(96, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device)
    for x in (small, small.float()):
        H = x.mT @ x
        torch.linalg.cholesky(H)
        torch.linalg.eigh(H)
        torch.linalg.svd(x, full_matrices=False)
        torch.linalg.solve_triangular(torch.linalg.cholesky(H), x.mT, upper=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def factorisation(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """3. Each factorisation path per projection shape, in float64 unless stated; for SAES-SVD and SVD-LLM also
    the peak memory of one factorize call above its inputs, in float64 ``n x n`` matrices (``*_peak_nn``: the
    cost model's ``FACTOR_WORKSPACE``)."""
    h, i = args.hidden, args.intermediate
    shapes = {"q/k/v/o": (h, h), "gate/up": (i, h), "down": (h, i)}
    g = torch.Generator().manual_seed(1)
    fact: dict[str, Any] = {}
    warm_up(device)
    for name, (m, n) in shapes.items():
        W = (torch.randn(m, n, generator=g, dtype=torch.float64) * 0.02).to(device)
        X = torch.randn(n + 64, n, generator=g, dtype=torch.float64).to(device)  # full-rank activations
        Xc = X + 0.05 * torch.randn(n + 64, n, generator=g, dtype=torch.float64).to(device)
        stats = SiteStats(tokens=X.shape[0], H=Xc.mT @ Xc / X.shape[0], Delta=(X - Xc).mT @ Xc / X.shape[0])
        del X, Xc
        rank = int((1 - 0.4) * m * n / (m + n))
        row: dict[str, float] = {"m": m, "n": n, "rank": rank}
        row["gram_eigh_f64_s"] = timed(lambda: truncated_svd(W, rank), device)
        if not args.skip_svd:
            row["svd_f64_s"] = timed(lambda: torch.linalg.svd(W, full_matrices=False), device)
            row["svd_f32_s"] = timed(lambda: torch.linalg.svd(W.float(), full_matrices=False), device)
        for label, method in (("saes", SAES()), ("svdllm", SVDLLM("svdllm"))):
            base = reset_peak(device)
            row[f"{label}_factorize_s"] = timed(lambda: method.factorize(W, stats, rank), device)
            row[f"{label}_factorize_peak_nn"] = (peak_mb(device) - base) * 2**20 / (n * n * 8)
        fact[name] = row
        print(name, row, flush=True)
    return fact


def write(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
