"""Predicted compression time and peak GPU memory of SAES-SVD and SVD-LLM for LLaMA-7B/13B/30B (issue 12).

    python -m experiments.cost_model                              # from results/bench/block-4096-cpu.json
    python -m experiments.cost_model --gpu-fp16 150 --gpu-fp32 17 --gpu-fp64 9

The model (assumptions in ``docs/cost-model.md``): the statistics passes are matrix products whose FLOPs
follow from the shapes and the token count (block forwards in the model's dtype; ``H``/``Delta``
accumulation in float32); the factorisation costs what the block benchmark measured per projection shape
on this CPU, scaled by the ratio of float64 matrix-product throughput (measured here, assumed there) and by
``n^3`` to the other models' shapes; memory is the sum of the tensors the staged engine holds at its peak.
Every measured input comes from ``experiments/bench_block.py``'s JSON; every assumed one is a flag.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from saes.core.stats import block_rows

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    blocks: int


MODELS = (Shape("LLaMA-7B", 4096, 11008, 32), Shape("LLaMA-13B", 5120, 13824, 40),
          Shape("LLaMA-30B", 6656, 17920, 60))


def forward_flops(s: Shape, seqlen: int) -> float:
    """One block, one token: the seven projections plus attention scores and values (2 flops a multiply-add)."""
    h, i = s.hidden, s.intermediate
    return 2 * (4 * h * h + 3 * h * i) + 4 * seqlen * h


def stats_flops(s: Shape, delta: bool) -> float:
    """``H`` at the four input sites of a block, one token, by its upper block triangle
    (:func:`saes.core.stats.block_rows`); ``Delta`` (not symmetric) costs the full product."""
    def h_part(n: int) -> float:
        k = len(block_rows(n))
        return 2 * n * n * (k + 1) / (2 * k)

    h, i = s.hidden, s.intermediate
    flops = 3 * h_part(h) + h_part(i)
    return flops + (2 * (3 * h * h + i * i) if delta else 0)


def fp64_gflops(n: int = 2048) -> float:
    """This machine's float64 matrix-product throughput (GFLOP/s)."""
    a = torch.randn(n, n, dtype=torch.float64)
    a @ a
    t0 = time.perf_counter()
    for _ in range(3):
        a @ a
    return 3 * 2 * n**3 / (time.perf_counter() - t0) / 1e9


def factorisation_seconds(bench: dict, s: Shape, method: str, cpu_fp64: float, gpu_fp64: float) -> float:
    """A block's seven factorisations: the measured per-shape CPU time, scaled by n^3 of the model's own
    shape (every step is cubic in the projection's dimensions) and by GPU/CPU float64 throughput."""
    base = bench["shape"]
    fact = bench["factorisation"]
    key = f"{method}_factorize_s"
    scale_h = (s.hidden / base["hidden"]) ** 3
    scale_i = (s.hidden * s.intermediate ** 2) / (base["hidden"] * base["intermediate"] ** 2)
    cpu = 4 * fact["q/k/v/o"][key] * scale_h + 2 * fact["gate/up"][key] * scale_h + fact["down"][key] * scale_i
    return cpu * cpu_fp64 / gpu_fp64


def peak_gb(s: Shape, tokens: int, method: str, act_bytes: int = 2) -> float:
    """The staged engine's peak on the GPU with everything there (calib.stream_device unset): the block in
    fp16, the two streams' inputs and next inputs, SAES-SVD's stored FP site inputs (for Delta) and the
    compressed intermediates, float32 statistics of the largest site, float64 factorisation workspace."""
    h, i = s.hidden, s.intermediate
    block = (4 * h * h + 3 * h * i) * 2
    stream = tokens * h * act_bytes
    if method == "saes":
        fp_sites = tokens * (3 * h + i) * act_bytes  # kept after the FP pass, freed site by site
        acts = 4 * stream + fp_sites  # X, X^f, next X^f, (z | h, u): at most about two hidden-size lists
        stats = 2 * i * i * 4  # H and Delta of the down_proj site
    else:
        acts = 2 * stream  # X^f and the next X^f; statistics accumulate in the hooks
        stats = i * i * 4
    workspace = 4 * i * i * 8  # Cholesky factor, whitened target, Gram matrix, eigenvectors (float64)
    return (block + acts + stats + workspace) / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default=str(ROOT / "results" / "bench" / "block-4096-cpu.json"))
    ap.add_argument("--tokens", type=int, nargs=2, default=[128, 2048], metavar=("NSAMPLES", "SEQLEN"))
    ap.add_argument("--gpu-fp16", type=float, default=150.0, help="effective TFLOP/s of fp16 forwards (assumed)")
    ap.add_argument("--gpu-fp32", type=float, default=17.0, help="effective TFLOP/s of fp32 H/Delta products")
    ap.add_argument("--gpu-fp64", type=float, default=9.0, help="effective TFLOP/s of float64 products")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench" / "cost-model.md"))
    args = ap.parse_args()
    bench = json.loads(Path(args.bench).read_text())
    cpu_fp64 = fp64_gflops()
    nsamples, seqlen = args.tokens
    tokens = nsamples * seqlen
    lines = [f"Predicted compression of LLaMA models on one 80 GB GPU, {nsamples} x {seqlen} calibration tokens "
             f"(fp16 forwards at {args.gpu_fp16:g} TFLOP/s, fp32 statistics at {args.gpu_fp32:g}, float64 at "
             f"{args.gpu_fp64:g}; this CPU's float64: {cpu_fp64:.0f} GFLOP/s). Model: `experiments/cost_model.py`, "
             "`docs/cost-model.md`.", "",
             "| model | method | forwards [h] | statistics [h] | factorisation [h] | total [h] | peak GPU [GB] |",
             "|---|---|---|---|---|---|---|"]
    for s in MODELS:
        for method, streams in (("saes", 2), ("svdllm", 1)):
            fwd = streams * forward_flops(s, seqlen) * tokens * s.blocks / (args.gpu_fp16 * 1e12)
            stats = stats_flops(s, delta=method == "saes") * tokens * s.blocks / (args.gpu_fp32 * 1e12)
            fact = s.blocks * factorisation_seconds(bench, s, method, cpu_fp64, args.gpu_fp64 * 1e3)
            total = fwd + stats + fact
            lines.append(f"| {s.name} | {'SAES-SVD' if method == 'saes' else 'SVD-LLM'} | {fwd / 3600:.2f} | "
                         f"{stats / 3600:.2f} | {fact / 3600:.2f} | {total / 3600:.2f} | "
                         f"{peak_gb(s, tokens, method):.1f} |")
    lines += ["", "Paper (Table 11, LLaMA-7B, one A6000): SAES-SVD 0.30 h data collection + 0.20 h compression; "
              "SVD-LLM 0.45 h + 0.15 h (256 samples)."]
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
