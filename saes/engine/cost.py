"""The cost model of ``docs/cost-model.md``: FLOPs and memory of a compression from the shapes alone.

Used by the planner (``run.py ... plan=true``, :mod:`saes.runs.planner`) and by ``experiments/cost_model.py``
(the predictions table). Measured inputs come from ``experiments/bench_block.py``'s JSON (one LLaMA-7B-shaped
block on the development CPU); assumed device throughputs are :data:`RATES`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from saes.core.stats import block_rows

# The project's memory unit: every "GB" it reads or writes (calib.max_buffer_gb, the records' staged_buffer_gb, the
# planner, this model, docs/cost-model.md) is 2^30 bytes, like its "MB" (peak_rss_mb) is 2^20; GPUs' "80 GB" are
# this unit too (an H100 80GB reports 79.6 of them).
GB = 2**30


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` once ``device``'s queued work is done: CUDA runs kernels asynchronously, so a phase
    read without it would count its launches, and its kernels would land in the next phase."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    blocks: int
    kv_hidden: int | None = None  # width of k_proj/v_proj outputs (grouped-query attention); None: hidden

    @property
    def block_params(self) -> int:
        """The seven projections' weights of one block."""
        h, i, kv = self.hidden, self.intermediate, self.kv_hidden or self.hidden
        return 2 * h * h + 2 * h * kv + 3 * h * i


@dataclass(frozen=True)
class Rates:
    """Effective throughputs (TFLOP/s) of the three kinds of work in a compression."""
    forward: float  # block forwards in the model's dtype
    stats: float  # H / Delta accumulation in float32
    fp64: float  # float64 matrix products (the factorisation scales with them)


# A GPU: the cost model's assumptions for an A100 (docs/cost-model.md); an H100/H200 is faster. The CPU's
# rates are measured (bench_block.py's block forward), see :func:`cpu_rates`.
RATES = {"cuda": Rates(forward=150.0, stats=17.0, fp64=9.0)}
BENCH_CPU_FP64_TFLOPS = 0.147  # float64 matrix products on the development CPU (docs/cost-model.md)


def forward_flops(s: Shape, seqlen: int) -> float:
    """One block, one token: the seven projections plus attention scores and values (2 flops a multiply-add)."""
    return 2 * s.block_params + 4 * seqlen * s.hidden


def stats_flops(s: Shape, delta: bool) -> float:
    """``H`` at the four input sites of a block, one token, by its upper block triangle
    (:func:`saes.core.stats.block_rows`); ``Delta`` (not symmetric) costs the full product."""
    def h_part(n: int) -> float:
        k = len(block_rows(n))
        return 2 * n * n * (k + 1) / (2 * k)

    h, i = s.hidden, s.intermediate
    flops = 3 * h_part(h) + h_part(i)
    return flops + (2 * (3 * h * h + i * i) if delta else 0)


def factorisation_seconds(bench: dict[str, Any], s: Shape, method: str, cpu_fp64: float, fp64: float) -> float:
    """A block's seven factorisations: the measured per-shape CPU time, scaled by n^3 of the model's own
    shape (every step is cubic in the projection's dimensions; k/v under grouped-query attention are counted
    as q, an overestimate) and by the float64 throughput there against the CPU's (``cpu_fp64``, ``fp64``:
    the same unit)."""
    base = bench["shape"]
    fact = bench["factorisation"]
    key = f"{method}_factorize_s"
    scale_h = (s.hidden / base["hidden"]) ** 3
    scale_i = (s.hidden * s.intermediate ** 2) / (base["hidden"] * base["intermediate"] ** 2)
    cpu = 4 * fact["q/k/v/o"][key] * scale_h + 2 * fact["gate/up"][key] * scale_h + fact["down"][key] * scale_i
    return cpu * cpu_fp64 / fp64


# The widest site's factorisation (down_proj: n = intermediate), in float64 n x n matrices: the method's
# statistics cast to float64 (SAES-SVD: H and Delta; SVD-LLM: H) and its own temporaries beside them (Cholesky
# factor, whitened matrices, Gram, eigenvectors, ACES/CEALC's corrections), measured as the peak above the inputs of
# one factorize call at LLaMA-7B's down_proj aspect, 2048 x 5504: SAES-SVD 3.6, SVD-LLM 2.1 (rounded up)
# (results/bench/factorisation-2048x5504-cpu.json: make bench-block ARGS="--only-factorisation --hidden 2048
# --intermediate 5504 --skip-svd"; 5.3 and 4.4 before the whitening was done in place).
FACTOR_STATS = {"saes": 2.0, "svdllm": 1.0}
FACTOR_WORKSPACE = {"saes": 3.6, "svdllm": 2.1}


def factorisation_bytes(n: int, delta: bool) -> float:
    """The widest site's factorisation (input width ``n``): SAES-SVD's figures where the method needs ``Delta``,
    else SVD-LLM's."""
    family = "saes" if delta else "svdllm"
    return (FACTOR_STATS[family] + FACTOR_WORKSPACE[family]) * n * n * 8


def peak_gb(s: Shape, tokens: int, method: str, act_bytes: int = 2, weight_bytes: int = 2,
            staged: bool = True) -> float:
    """The engine's peak (in :data:`GB`) on the compute device with everything there (calib.stream_device unset), as
    the sum of each phase's largest term (an upper bound: the staged buffers and the factorisation never peak
    together): the block in the model's dtype; the two streams' inputs and next inputs; for SAES-SVD, staged, the FP
    site inputs stored for Delta and the compressed intermediates (the reference path instead recomputes what it
    needs per group and batch, keeps a copy of the dense block, and each next stream replaces its input); the widest
    site's factorisation (:data:`FACTOR_STATS`, :data:`FACTOR_WORKSPACE`; the float32 sums are released before it).
    The rest of the model stays in host memory. Measured against it: docs/cost-model.md."""
    h, i = s.hidden, s.intermediate
    block = s.block_params * weight_bytes
    stream = tokens * h * act_bytes
    if method == "saes" and not staged:
        acts = 2 * stream + block  # X and X^f (each next stream replaces its input batch by batch); the FP block copy
    elif method == "saes":
        fp_sites = tokens * (3 * h + i) * act_bytes  # kept after the FP pass, freed site by site
        acts = 4 * stream + fp_sites  # X, X^f, next X^f, (z | h, u): at most about two hidden-size lists
    else:
        acts = 2 * stream  # X^f and the next X^f; statistics accumulate in the hooks
    return (block + acts + factorisation_bytes(i, delta=method == "saes")) / GB


def cpu_rates(bench: dict[str, Any]) -> Rates:
    """The development CPU's rates, from the block benchmark: forwards and statistics at the measured block
    forward's throughput (the passes ran at about that rate, docs/cost-model.md), float64 as measured there."""
    shape = Shape("bench", bench["shape"]["hidden"], bench["shape"]["intermediate"], 1)
    measured = forward_flops(shape, bench["seqlen"]) * bench["tokens"] / bench["block_forward_s"] / 1e12
    return Rates(forward=measured, stats=measured, fp64=BENCH_CPU_FP64_TFLOPS)
