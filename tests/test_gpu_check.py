"""``make gpu-check`` refuses at once, with a clear message and a non-zero exit, where torch sees no CUDA device."""

import os
import re
import subprocess
import sys

import pytest
import torch

from .conftest import ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_gpu_check_refuses_without_cuda(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "experiments.gpu_check", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "needs a CUDA device" in done.stderr and "Nothing was run" in done.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_the_cuda_step_collects_every_file_that_holds_a_cuda_test():
    """gpu_check collects only CUDA_TESTS (all of tests/ would import what only the CPU suite needs): a new CUDA
    test in another file must be added there, or it never runs on a GPU."""
    from experiments import gpu_check

    mark = re.compile(r"(@|marks=)pytest\.mark\.cuda\b")
    marked = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py") if mark.search(p.read_text())}
    assert marked == set(gpu_check.CUDA_TESTS)


def test_the_preflight_names_what_is_missing_before_any_step(monkeypatch):
    from experiments import gpu_check

    env, problems = gpu_check.preflight()
    assert problems == [] and env["the offline text wiki_books (documents)"] > 1000
    assert env["transformers"] == __import__("transformers").__version__
    monkeypatch.setattr(gpu_check, "NEEDED", (*gpu_check.NEEDED, "no_such_module_here"))
    _, problems = gpu_check.preflight()
    assert len(problems) == 1 and "import no_such_module_here: ModuleNotFoundError" in problems[0]


def test_the_comparison_checks_the_tokens_first_and_each_record_is_read_on_its_own(tmp_path):
    """The committed record against itself passes; the same perplexities on other tokens (another tokenizer)
    are reported as such; a missing float32 record does not hide the bfloat16 one."""
    import json

    from experiments import gpu_check

    ref = json.loads(gpu_check.REFERENCE.read_text())
    same = gpu_check.compare(ref, ref)
    assert same["same_tokens"] == {"eval": True, "calibration": True}
    assert same["dense"]["ok"] and same["compressed"]["ok"]
    other = json.loads(gpu_check.REFERENCE.read_text())
    other["metrics"]["ppl"]["wiki_books"]["tokens_sha256"] = "0" * 64
    assert gpu_check.compare(other, ref)["same_tokens"]["eval"] is False

    bf16 = tmp_path / "scratch" / "bf16" / "runs" / "smollm2_135m" / "saes" / "ratio0.2"
    bf16.mkdir(parents=True)
    (bf16 / "seed0-x.json").write_text(json.dumps(ref))
    found, failed = gpu_check.findings(tmp_path / "scratch", tmp_path / "block", tmp_path / "out")
    assert found["main_job_bfloat16"]["compressed"] == ref["metrics"]["ppl"]["wiki_books"]["compressed"]
    assert found["main_job_vs_cpu_record"].startswith("missing") and found["llama7b_shape_block"].startswith("missing")
    assert failed == []  # missing records fail through their steps' statuses


def test_the_steps_share_the_budget_in_order_and_the_summary_is_rewritten_after_each(tmp_path, monkeypatch):
    """Without running anything: the steps come most valuable first, their timeouts are their shares of --budget,
    and before each step the summary already holds every step before it (a kill loses only the running one)."""
    import json

    from experiments import gpu_check

    calls: list[tuple[str, float, int]] = []

    def fake_step(name, argv, timeout, log):
        summary = tmp_path / "gpu-check-cuda.json"
        calls.append((name, timeout, len(json.loads(summary.read_text())["steps"]) if summary.exists() else 0))
        return {"step": name, "status": "ok" if name != "cuda tests" else "exit 1", "seconds": 0.0}

    monkeypatch.setattr(gpu_check, "refusal", lambda: None)
    monkeypatch.setattr(gpu_check, "preflight", lambda: ({"device": "stand-in"}, []))
    monkeypatch.setattr(gpu_check, "step", fake_step)
    assert gpu_check.main(["--budget", "60", "--out", str(tmp_path), "--log", str(tmp_path / "g.log")]) == 1
    assert [c[0] for c in calls] == [name for name, _ in gpu_check.PLAN]
    assert [c[2] for c in calls] == [0, 1, 2, 3, 4]
    assert sum(c[1] for c in calls) == pytest.approx(60)
    summary = json.loads((tmp_path / "gpu-check-cuda.json").read_text())
    assert summary["failed"] == ["cuda tests"] and summary["environment"] == {"device": "stand-in"}


@pytest.mark.slow
def test_every_steps_command_is_accepted_before_any_gpu_time(tmp_path):
    """What a CPU can check of the steps' command lines, so that the one GPU try fails on no typo: each ``run.py``
    step composes and plans (``plan=true``: every override parsed and validated, no weights loaded, nothing
    written), the CUDA tests are collected from their files, and bench-block's whole flow runs on the CPU at a
    tiny width (``--device cpu`` and the widths the only changes)."""
    import json

    from hydra import compose, initialize_config_dir

    from experiments import gpu_check
    from saes.runs.pipeline import run

    scratch, block, out = tmp_path / "scratch", tmp_path / "block", tmp_path / "out"
    argvs = gpu_check.commands(sys.executable, scratch, block, out)
    assert list(argvs) == [name for name, _ in gpu_check.PLAN]
    planned = {}
    for name, argv in argvs.items():
        if argv[1] != "run.py":
            continue
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[*argv[2:], "plan=true"])
        planned[name] = run(cfg)
        assert planned[name]["device"] == "cuda"
    assert len(planned) == 3 and not scratch.exists() and not block.exists()
    paper = planned["llama7b_shape block, scale=paper"]
    assert paper["calibration_tokens"] == 128 * 2048 and paper["projections"]["down_proj"]["count"] == 1

    tests = subprocess.run([*argvs["cuda tests"], "--collect-only"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert tests.returncode == 0, tests.stdout[-2000:] + tests.stderr[-2000:]
    collected = re.search(r"(\d+)/\d+ tests collected", tests.stdout)
    assert collected and int(collected.group(1)) >= 20, tests.stdout[-500:]

    bench = argvs["bench-block"]
    i = bench.index("--device")
    bench = [*bench[:i + 1], "cpu", *bench[i + 2:], "--hidden", "64", "--intermediate", "160", "--heads", "4",
             "--tokens", "2", "32"]
    done = subprocess.run(bench, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    written = json.loads((out / "block-64-cpu.json").read_text())
    assert written["device"] == "cpu" and written["tokens"] == 64
