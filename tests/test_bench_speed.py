"""Smoke test of experiments/bench_speed.py on the tiny model (no timing asserts: speed is machine-dependent)."""

import json

import pytest
import torch

from experiments import bench_speed
from saes.inputs.models import tiny_llama


def test_measure_reports_positive_finite_timings():
    out = bench_speed.measure(tiny_llama().eval(), torch.device("cpu"), batch=2, prefill=32, prompt=8, decode=4,
                              warmup=1, repeats=2)
    assert set(out) == {"prefill_ms", "prefill_tokens_per_s", "decode_tokens_per_s"}
    assert all(0 < v < float("inf") for v in out.values())


@pytest.mark.slow
def test_the_script_measures_dense_and_compressed_and_writes_its_table(tmp_path):
    rows = bench_speed.main(["--model", "tiny_llama", "--ratios", "0.5", "--prefill", "32", "--prompt", "8",
                             "--decode", "4", "--warmup", "1", "--repeats", "2", "--threads", "1",
                             "--results-dir", str(tmp_path)])
    dense, half = rows
    assert (dense["method"], half["method"], half["ratio"]) == ("dense", "svd", 0.5)
    assert half["linears_ratio"] == pytest.approx(0.5, abs=0.02) and half["ideal_projections"] == 2
    assert half["weights_mb"] < dense["weights_mb"] and 1 < half["ideal_matmuls"] < 2  # lm_head stays dense
    assert half["folder_mb"] == pytest.approx(half["weights_mb"], rel=0.05)  # the saved size is the parameter count
    assert dense["prefill_speedup"] == 1 and half["prefill_speedup"] > 0 and half["decode_speedup"] > 0
    table = (tmp_path / "tables" / "bench_speed.md").read_text()
    assert table.count("| tiny_llama |") == 2 and "ideal x (projections)" in table
    saved = json.loads((tmp_path / "bench" / "bench_speed-tiny_llama-cpu.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    # the SVD folder is made once and reused
    folder = next((tmp_path / "cache" / "bench_models").glob("tiny_llama-*/svd-ratio0.5"))
    mtime = folder.stat().st_mtime_ns
    bench_speed.svd_folders("tiny_llama", [0.5], tmp_path / "cache" / "bench_models")
    assert folder.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_a_worker_reports_its_own_peak_memory_not_its_parents():
    hog = torch.ones(64 * 2**20)  # 256 MB in this (parent) process
    row = bench_speed.run_worker({"model": "tiny_llama", "device": "cpu", "dtype": "float32", "folder": None,
                                  "batch": 1, "prefill": 16, "prompt": 4, "decode": 2, "warmup": 0, "repeats": 1,
                                  "threads": 1})
    # getrusage would report at least the parent's resident size at fork time, hog included
    assert row["peak_mb"] < bench_speed.rss_mb("VmRSS") and row["peak_mb"] >= row["rss_at_start_mb"]
    del hog
