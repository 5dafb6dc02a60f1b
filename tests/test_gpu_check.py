"""``make gpu-check`` refuses at once, with a clear message and a non-zero exit, where torch sees no CUDA device."""

import os
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
