"""The inference-speed table (Figure 4's numbers) from ``python -m experiments.bench_speed``'s JSON.

Kept apart from the benchmark so that ``python -m experiments.tables`` rebuilds ``bench_speed.md`` from
``<results>/bench/bench_speed-<model>-<device>.json`` without importing torch or measuring anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from experiments.render import Document, Table
from experiments.sweeps import Context

NAME = "bench_speed"
HEADER = ["model", "method", "ratio", "projections removed", "params (M)", "weights MB", "folder MB", "peak MB",
          "prefill ms", "prefill x", "decode tok/s", "decode x", "ideal x (projections)", "ideal x (matmuls)"]


def bench_json(results_dir: Path, model: str) -> tuple[Path, dict[str, Any]] | None:
    """The newest ``bench/bench_speed-<model>-<device>.json`` (``python -m experiments.bench_speed``), if any."""
    files = sorted((results_dir / "bench").glob(f"bench_speed-{model}-*.json"), key=lambda p: p.stat().st_mtime)
    return (files[-1], json.loads(files[-1].read_text())) if files else None


def row(r: dict[str, Any]) -> list[str]:
    return [r["model"], r["method"], str(r["ratio"]), f"{r['linears_ratio']:.3f}", f"{r['parameters'] / 1e6:.2f}",
            f"{r['weights_mb']:.1f}", "-" if r["folder_mb"] is None else f"{r['folder_mb']:.1f}",
            f"{r['peak_mb']:.0f}", f"{r['prefill_ms']:.1f}", f"{r['prefill_speedup']:.2f}",
            f"{r['decode_tokens_per_s']:.1f}", f"{r['decode_speedup']:.2f}", f"{r['ideal_projections']:.2f}",
            f"{r['ideal_matmuls']:.2f}"]


def document(rows: list[dict[str, Any]], setup: str) -> Document:
    return Document(NAME, None, [setup, "", Table(HEADER, [row(r) for r in rows])], latex_too=False, separator="\n")


def build(ctx: Context) -> list[Document]:
    """The table of the view's model, if it was benchmarked (nothing otherwise: the benchmark is not a sweep)."""
    found = bench_json(ctx.results_dir, ctx.view[0])
    return [document(found[1]["rows"], found[1]["setup"])] if found else []
