"""Sweeps through Hydra's submitit launcher: submitit_local runs here; the Slurm config composes."""

import json
import subprocess
import sys

import pytest

from hydra import compose, initialize_config_dir

from .conftest import CONF, ROOT


@pytest.mark.slow
def test_a_submitit_local_sweep_of_two_jobs_records_both_and_a_rerun_skips_them(tmp_path):
    cmd = [sys.executable, "run.py", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
           f"hydra.sweep.dir={tmp_path / 'multirun'}", "model=tiny_llama", "logger=none", "method=svd",
           "ratio=0.2,0.4", "eval.ppl.seqlen=64", "eval.ppl.max_windows=2", f"results_dir={tmp_path}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    paths = sorted((tmp_path / "runs").rglob("*.json"))
    assert [p.parent.name for p in paths] == ["ratio0.2", "ratio0.4"]
    assert {json.loads(p.read_text())["config"]["ratio"] for p in paths} == {0.2, 0.4}
    assert len(list((tmp_path / "multirun" / ".submitit").iterdir())) >= 2  # the jobs really went through submitit
    mtimes = [p.stat().st_mtime_ns for p in paths]

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "runs").rglob("*.json"))] == mtimes  # skipped
    logs = "".join(p.read_text() for p in (tmp_path / "multirun").rglob("*.log"))
    assert logs.count("already done, skipping") >= 2


def test_the_slurm_gpu_launcher_config_composes_with_gpu_time_and_memory():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm_gpu", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.partition, launcher.max_num_timeout) == (1, "gpu", 3)
    assert launcher.timeout_min > 0 and launcher.mem_gb > 0
