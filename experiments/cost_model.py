"""Predicted compression time and peak GPU memory of SAES-SVD and SVD-LLM for LLaMA-7B/13B/30B (issue 12).

    python -m experiments.cost_model                              # from results/bench/block-4096-cpu.json
    python -m experiments.cost_model --gpu-fp16 150 --gpu-fp32 17 --gpu-fp64 9

The model (its formulas in ``saes/engine/cost.py``, shared with the planner; assumptions in
``docs/cost-model.md``): the statistics passes are matrix products whose FLOPs
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
from pathlib import Path

import torch

from saes.engine.cost import BENCH_CPU_FP64_TFLOPS, Shape, factorisation_seconds, forward_flops, peak_gb, stats_flops

ROOT = Path(__file__).resolve().parent.parent


MODELS = (Shape("LLaMA-7B", 4096, 11008, 32), Shape("LLaMA-13B", 5120, 13824, 40),
          Shape("LLaMA-30B", 6656, 17920, 60))
# For the memory table only (no time predicted): LLaMA-65B and LLaMA-2-70B (grouped-query attention, 8 kv heads).
LARGE = (Shape("LLaMA-65B", 8192, 22016, 80), Shape("LLaMA-2-70B", 8192, 28672, 80, kv_hidden=1024))
MEMORY_GB = (24, 40, 48, 80, 141)  # RTX 4090 / A100-40 / A6000, L40 / A100-80, H100 / H200


def fp64_gflops(n: int = 2048) -> float:
    """This machine's float64 matrix-product throughput (GFLOP/s)."""
    a = torch.randn(n, n, dtype=torch.float64)
    a @ a
    t0 = time.perf_counter()
    for _ in range(3):
        a @ a
    return 3 * 2 * n**3 / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default=str(ROOT / "results" / "bench" / "block-4096-cpu.json"))
    ap.add_argument("--tokens", type=int, nargs=2, default=[128, 2048], metavar=("NSAMPLES", "SEQLEN"))
    ap.add_argument("--gpu-fp16", type=float, default=150.0, help="effective TFLOP/s of fp16 forwards (assumed)")
    ap.add_argument("--gpu-fp32", type=float, default=17.0, help="effective TFLOP/s of fp32 H/Delta products")
    ap.add_argument("--gpu-fp64", type=float, default=9.0, help="effective TFLOP/s of float64 products")
    ap.add_argument("--measure-fp64", action="store_true",
                    help=f"measure this CPU's float64 rate (default: the committed "
                         f"{BENCH_CPU_FP64_TFLOPS * 1e3:g} GFLOP/s)")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench" / "cost-model.md"))
    args = ap.parse_args()
    bench = json.loads(Path(args.bench).read_text())
    cpu_fp64 = fp64_gflops() if args.measure_fp64 else BENCH_CPU_FP64_TFLOPS * 1e3
    nsamples, seqlen = args.tokens
    tokens = nsamples * seqlen
    lines = [f"Predicted compression of LLaMA models on one 80 GB GPU, {nsamples} x {seqlen} calibration tokens "
             f"(fp16 forwards at {args.gpu_fp16:g} TFLOP/s, fp32 statistics at {args.gpu_fp32:g}, float64 at "
             f"{args.gpu_fp64:g}; this CPU's float64: {cpu_fp64:.0f} GFLOP/s). Model: `experiments/cost_model.py`, "
             "`docs/cost-model.md`.", "",
             "| model | method | forwards [h] | statistics [h] | factorisation [h] | total [h] | peak GPU [GB] | "
             "reference path [GB] |",
             "|---|---|---|---|---|---|---|---|"]
    for s in MODELS:
        for method, streams in (("saes", 2), ("svdllm", 1)):
            fwd = streams * forward_flops(s, seqlen) * tokens * s.blocks / (args.gpu_fp16 * 1e12)
            stats = stats_flops(s, delta=method == "saes") * tokens * s.blocks / (args.gpu_fp32 * 1e12)
            fact = s.blocks * factorisation_seconds(bench, s, method, cpu_fp64, args.gpu_fp64 * 1e3)
            total = fwd + stats + fact
            lines.append(f"| {s.name} | {'SAES-SVD' if method == 'saes' else 'SVD-LLM'} | {fwd / 3600:.2f} | "
                         f"{stats / 3600:.2f} | {fact / 3600:.2f} | {total / 3600:.2f} | "
                         f"{peak_gb(s, tokens, method):.1f} | {peak_gb(s, tokens, method, staged=False):.1f} |")
    lines += ["", "Paper (Table 11, LLaMA-7B, one A6000): SAES-SVD 0.30 h data collection + 0.20 h compression; "
              "SVD-LLM 0.45 h + 0.15 h (256 samples).", ""]
    lines += fits_table(tokens)
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text + "\n")


def fits_table(tokens: int) -> list[str]:
    """The largest model whose one-block peak (fp16, everything on the GPU) fits each memory size, per path."""
    shapes = (*MODELS, *LARGE)
    out = [f"Largest model whose block fits, {tokens:,} calibration tokens, fp16, streams on the GPU (peak in GB; "
           "staged / the reference path that calib.max_buffer_gb selects when the staged one does not fit; "
           "calib.stream_device=cpu moves the streams off the GPU):", "",
           "| GPU memory [GB] | SAES-SVD, staged | SAES-SVD, reference | SVD-LLM |", "|---|---|---|---|"]
    for gb in MEMORY_GB:
        def largest(method: str, staged: bool) -> str:
            fit = [s for s in shapes if peak_gb(s, tokens, method, staged=staged) <= gb]
            return f"{fit[-1].name} ({peak_gb(fit[-1], tokens, method, staged=staged):.1f})" if fit else "none"
        out.append(f"| {gb} | {largest('saes', True)} | {largest('saes', False)} | {largest('svdllm', True)} |")
    out += ["", "| model | SAES-SVD staged [GB] | SAES-SVD reference [GB] | SVD-LLM [GB] |", "|---|---|---|---|"]
    out += [f"| {s.name} | {peak_gb(s, tokens, 'saes'):.1f} | {peak_gb(s, tokens, 'saes', staged=False):.1f} | "
            f"{peak_gb(s, tokens, 'svdllm'):.1f} |" for s in shapes]
    return out


if __name__ == "__main__":
    main()
