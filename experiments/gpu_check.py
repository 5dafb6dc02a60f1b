"""Everything that needs a GPU, in one command for the day one is lent (``make gpu-check``), within 10 minutes.

    python -m experiments.gpu_check            # refuses at once (exit 2) where torch sees no CUDA device

Steps, each in its own process with its own timeout (the sum stays within ``--budget``, 600 s):

1. ``pytest -m cuda``: the CUDA-only tests (the offload test; the half-precision runs of every method family,
   bf16 and fp16, and the bf16 save/load/portable/GPTQ round trip, on ``device=cuda``).
2. The README's main job (``python run.py``: SAES-SVD, SmolLM2-135M, ratio 0.2) with ``device=cuda`` into a
   scratch ``results_dir``; its perplexities are compared with the committed CPU record (:data:`REFERENCE`).
   Tolerances: dense within a relative 1e-4 (float32 forwards; only the summation order differs);
   compressed within a relative 1e-2 (the float32 statistics are summed in another order, and ACES picks a
   beta per layer from a grid: a near-tie may flip, moving the result more than rounding would).
3. The same job in ``model.dtype=bfloat16`` (finite perplexity, reported beside the float32 one).
4. ``python -m experiments.bench_block --device cuda`` (what ``make bench-block ARGS="--device cuda"`` runs):
   ``results/bench/block-4096-cuda.json``.
5. One LLaMA-7B-shaped block (random weights, float16) at ``scale=paper`` (128 x 2048 calibration tokens) on CUDA,
   with the offline text: ``results/bench/llama7b_shape-block-paper-cuda.json`` (phase times, peak memory).

A summary goes to ``results/bench/gpu-check-cuda.json``; the exit status is non-zero if any step failed.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "results/runs/smollm2_135m/saes/ratio0.2/seed0-09c12ef4f69b.json"
DENSE_RTOL, COMPRESSED_RTOL = 1e-4, 1e-2
NO_CUDA = 2  # exit status of the refusal


def refusal() -> str | None:
    """Why this machine cannot run the check (None: it can)."""
    import torch

    if torch.cuda.is_available():
        return None
    build = torch.__version__ + (" (a CPU-only build: install a CUDA build of torch)" if torch.version.cuda is None
                                 else f" (built for CUDA {torch.version.cuda}, but no device is visible)")
    return f"make gpu-check needs a CUDA device; torch {build} sees none. Nothing was run."


def step(name: str, argv: list[str], timeout: float, log: Path) -> dict[str, Any]:
    """Run ``argv`` in the project root with a timeout; its output goes to ``log``."""
    t0 = time.perf_counter()
    print(f"== {name} (timeout {timeout:.0f} s): {' '.join(argv)}", flush=True)
    with log.open("w") as out:
        try:
            rc = subprocess.run(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = None
    seconds = time.perf_counter() - t0
    status = "timeout" if rc is None else ("ok" if rc == 0 else f"exit {rc}")
    print(f"   {status} in {seconds:.0f} s (log: {log})", flush=True)
    return {"step": name, "status": status, "seconds": round(seconds, 1), "log": str(log)}


def record_in(results: Path, model: str, method: str) -> dict[str, Any]:
    found = sorted((results / "runs" / model / method).rglob("seed*.json"))
    if not found:
        raise FileNotFoundError(f"no record under {results / 'runs' / model / method}")
    return json.loads(found[-1].read_text())


def compare(record: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """The run's perplexities against the reference record's, with the tolerances above."""
    got, want = record["metrics"]["ppl"]["wiki_books"], reference["metrics"]["ppl"]["wiki_books"]
    out: dict[str, Any] = {}
    for key, rtol in (("dense", DENSE_RTOL), ("compressed", COMPRESSED_RTOL)):
        rel = abs(got[key] - want[key]) / abs(want[key])
        out[key] = {"cuda": got[key], "cpu_record": want[key], "rel_diff": rel, "rtol": rtol, "ok": rel <= rtol}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=600.0, help="seconds for all steps together")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench"))
    args = ap.parse_args(argv)
    why = refusal()
    if why is not None:
        print(why, file=sys.stderr)
        return NO_CUDA
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    py, start = sys.executable, time.perf_counter()
    run_py = [py, "run.py", "device=cuda", "logger=none", "resume=false", "force=true"]
    block = scratch / "llama7b_shape"
    plan: list[tuple[str, list[str], float]] = [
        ("cuda tests", [py, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider"], 120),
        ("main job, float32", [*run_py, f"results_dir={scratch / 'fp32'}"], 150),
        ("main job, bfloat16", [*run_py, "model.dtype=bfloat16", f"results_dir={scratch / 'bf16'}"], 110),
        ("bench-block", [py, "-m", "experiments.bench_block", "--device", "cuda", "--out", str(out)], 110),
        ("llama7b_shape block, scale=paper", [*run_py, "model=llama7b_shape", "model.blocks=1", "model.dtype=float16",
                                              "scale=paper", "calib.source=wiki_books", "eval.ppl.sources=[wiki_books]",
                                              "method=saes", "ratio=0.4", f"results_dir={block}"], 110),
    ]
    steps = []
    for name, cmd, timeout in plan:
        left = args.budget - (time.perf_counter() - start)
        if left < 10:
            steps.append({"step": name, "status": "not run (budget spent)"})
            continue
        steps.append(step(name, cmd, min(timeout, left), scratch / f"{len(steps) + 1}.log"))
    summary: dict[str, Any] = {"steps": steps, "scratch": str(scratch)}
    failed = [s["step"] for s in steps if s["status"] != "ok"]
    try:
        summary["main_job_vs_cpu_record"] = cmp = compare(record_in(scratch / "fp32", "smollm2_135m", "saes"),
                                                          json.loads(REFERENCE.read_text()))
        failed += [f"main job {k} PPL" for k, v in cmp.items() if not v["ok"]]
        bf16 = record_in(scratch / "bf16", "smollm2_135m", "saes")["metrics"]["ppl"]["wiki_books"]
        summary["main_job_bfloat16"] = {k: bf16[k] for k in ("dense", "compressed")}
        failed += [] if all(math.isfinite(bf16[k]) for k in ("dense", "compressed")) else ["bf16 PPL not finite"]
        rec = record_in(block, "llama7b_shape", "saes")
        (out / "llama7b_shape-block-paper-cuda.json").write_text(json.dumps(
            {k: rec.get(k) for k in ("config", "timings", "memory", "params", "calibration", "env")}, indent=1))
    except (FileNotFoundError, KeyError) as exc:
        summary["missing"] = str(exc)
        failed.append(f"records: {exc}")
    summary["failed"] = failed
    (out / "gpu-check-cuda.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
