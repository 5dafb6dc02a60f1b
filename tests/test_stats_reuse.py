"""FP-stream statistics are computed once per model and calibration set and reused, exactly."""

import torch

from baselines.asvd import ASVD
from baselines.svdllm import SVDLLM
from saes.engine import loop as engine
from saes.engine.config import EngineConfig
from saes.engine.layout import layout_for, plan_ranks
from saes.engine.loop import compress_model
from saes.inputs.models import tiny_llama
from saes.runs.pipeline import run

from .conftest import calib_batch, make_cfg

CPU = torch.device("cpu")


def compress(method, ratio, ids, cache_dir, reuse=True):
    model = tiny_llama().eval()
    cfg = EngineConfig(device=CPU, batch_size=2, cache_dir=cache_dir, model_identity="tiny:test", reuse_stats=reuse)
    report = compress_model(model, method, plan_ranks(model, layout_for(model), ratio), ids, cfg)
    return model, report


def test_a_cache_hit_skips_every_calibration_forward_and_gives_the_same_factors(tmp_path, monkeypatch):
    ids = calib_batch()
    _, first = compress(SVDLLM(), 0.2, ids, tmp_path)
    assert first.cached_stats_blocks == 0 and len(list((tmp_path / "stats").rglob("block_*.safetensors"))) == 2

    def no_forwards(*args, **kwargs):
        raise AssertionError("statistics were cached: no calibration forward should run")

    monkeypatch.setattr(engine, "capture_block_inputs", no_forwards)
    for method in (SVDLLM(), ASVD()):  # another ratio, and another method on the same FP stream
        reused, report = compress(method, 0.4, ids, tmp_path)
        assert report.cached_stats_blocks == 2 and report.stream == "fp" and report.tokens == ids.numel()
        monkeypatch.undo()
        fresh, _ = compress(type(method)(), 0.4, ids, tmp_path / "elsewhere", reuse=False)
        monkeypatch.setattr(engine, "capture_block_inputs", no_forwards)
        for name, t in fresh.state_dict().items():
            assert torch.equal(reused.state_dict()[name], t), name
    monkeypatch.undo()
    # other calibration tokens are another cache entry, never a hit
    _, other = compress(SVDLLM(), 0.4, calib_batch(seed=3), tmp_path)
    assert other.cached_stats_blocks == 0 and len(list((tmp_path / "stats").iterdir())) == 2


def test_a_method_needing_other_statistics_adds_them_to_the_same_block_files(tmp_path):
    ids = calib_batch()
    _, first = compress(ASVD(), 0.2, ids, tmp_path)  # stores mean|x| only (H would cost n^2 per token)
    _, second = compress(SVDLLM(), 0.2, ids, tmp_path)  # misses H: computes it and adds it
    _, third = compress(ASVD(), 0.4, ids, tmp_path)
    _, fourth = compress(SVDLLM(), 0.4, ids, tmp_path)
    assert [r.cached_stats_blocks for r in (first, second, third, fourth)] == [0, 0, 2, 2]
    assert len(list((tmp_path / "stats").rglob("block_*.safetensors"))) == 2


def strip(record):
    layers = {k: {d: v for d, v in diag.items() if d != "seconds"} for k, diag in record["layers"].items()}
    return record["metrics"], layers, record["params"]


def test_a_two_run_sweep_with_reuse_records_what_recomputation_records(tmp_path):
    sweep = [("svdllm", 0.2), ("asvd", 0.4)]
    reused = [run(make_cfg(f"method={m}", f"ratio={r}", results_dir=tmp_path / "reuse")) for m, r in sweep]
    fresh = [run(make_cfg(f"method={m}", f"ratio={r}", "calib.reuse_stats=false", results_dir=tmp_path / "fresh"))
             for m, r in sweep]
    assert [r["calibration"]["stats_cached_blocks"] for r in reused] == [0, 2]
    assert [r["calibration"]["stats_cached_blocks"] for r in fresh] == [0, 0]
    assert not (tmp_path / "fresh" / "cache" / "stats").exists()
    for a, b in zip(reused, fresh):
        assert a["key"] == b["key"]  # reuse is how, not what: the same record key
        assert strip(a) == strip(b)
