"""End-to-end runs of the pipeline (``run.py``) on the tiny model, sweeps, and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from saes.inputs.models import ModelUnavailable
from saes.runs.pipeline import run

from .conftest import ROOT, make_cfg


def records(results: Path) -> list[Path]:
    return sorted((results / "runs").rglob("*.json"))


def test_end_to_end_run_writes_a_valid_record_and_skips_when_done(tmp_path):
    cfg = make_cfg("method=saes", "ratio=0.4", results_dir=tmp_path)
    rec = run(cfg)
    [path] = records(tmp_path)
    on_disk = json.loads(path.read_text())
    assert on_disk["key"] == rec["key"] and path.name == f"seed0-{rec['key']}.json"
    assert path.parts[-4:-1] == ("tiny_llama", "saes", "ratio0.4")
    ppl = on_disk["metrics"]["ppl"]["wiki_books"]
    assert ppl["dense"] > 1 and ppl["compressed"] > 1 and ppl["windows"] == 3
    p = on_disk["params"]
    assert p["linears_ratio"] >= 0.4 and p["model_compressed"] < p["model_dense"]
    assert len(on_disk["layers"]) == 2 * 7
    layer = on_disk["layers"]["model.layers.1.self_attn.o_proj"]
    assert {"rank", "beta", "alpha", "surrogate", "rer", "damp", "damp_escalations"} <= set(layer)
    cal = on_disk["calibration"]
    assert cal["stream"] == "compressed" and cal["tokens"] == 4 * 64 and len(cal["tokens_sha256"]) == 64
    assert {"load", "calibration", "factorisation", "eval_dense", "eval_compressed", "total"} <= set(on_disk["timings"])
    assert on_disk["env"]["versions"]["torch"].startswith("2.13.0")
    assert on_disk["config"]["method"]["aces"]["beta_min"] == 0.25
    assert not list(path.parent.glob(".tmp-*")) and path.stat().st_mode & 0o777 == 0o644
    # dense perplexity is cached per model/data/protocol
    assert len(list((tmp_path / "dense" / "tiny_llama").glob("*.json"))) == 1

    mtime = path.stat().st_mtime_ns
    assert run(cfg)["key"] == rec["key"] and path.stat().st_mtime_ns == mtime  # skipped
    rerun = run(make_cfg("method=saes", "ratio=0.4", "force=true", results_dir=tmp_path))
    assert rerun["key"] == rec["key"] and path.stat().st_mtime_ns != mtime
    assert rerun["metrics"]["ppl"]["wiki_books"] == rec["metrics"]["ppl"]["wiki_books"]  # deterministic


def test_saes_ablation_and_svd_configs_run(tmp_path):
    fixed = run(make_cfg("method=saes", "method.aces.enabled=false", "method.alpha=1.0", results_dir=tmp_path))
    assert {d["beta"] for d in fixed["layers"].values()} == {0.5}
    svd = run(make_cfg("method=svd", "ratio=0.4", results_dir=tmp_path))
    assert svd["calibration"]["stream"] == "none" and svd["calibration"]["tokens_sha256"] is None
    assert len(records(tmp_path)) == 2


@pytest.mark.parametrize("override,match", [
    ("ratio=1.2", r"ratio must lie in \(0, 1\)"),
    ("ratio=0", r"ratio=0 compresses nothing.*quant=gptq"),
    ("ratio=0.999", "rank 0"),
    ("eval.ppl.sources=[nowhere]", "unknown text source"),
    ("method.aces.beta_min=0.9", "beta_min <= beta_max"),
    ("method.aces.space=gamma", "space"),
    ("calib.propagate=sideways", "calib.propagate"),
])
def test_bad_input_raises_a_named_error_and_leaves_no_record(tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        run(make_cfg(override, results_dir=tmp_path))
    assert not records(tmp_path)


@pytest.mark.parametrize("where,match", [
    ("/proc/x", r"results_dir='/proc/x': cannot create a folder in /proc \(No such file or directory\)"),
    ("file", r"results_dir=.* is not a folder"),
    ("file/sub", r"results_dir=.* cannot be created: .*file is a file"),
])
def test_a_results_dir_that_cannot_be_made_is_named_before_the_model_loads(tmp_path, monkeypatch, where, match):
    from saes.runs import pipeline

    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setattr(pipeline, "load_model", lambda *_: pytest.fail("the model was loaded before the error"))
    results_dir = where if where.startswith("/") else str(tmp_path / where)
    with pytest.raises(ValueError, match=match):
        run(make_cfg("method=svd", f"results_dir={results_dir}"))
    assert [p.name for p in tmp_path.iterdir()] == ["file"]  # the check leaves nothing behind


@pytest.mark.parametrize("group", ["calib", "eval.ppl"])
def test_a_local_text_path_that_is_not_a_regular_file_is_named(tmp_path, group):
    sources = "calib.source=local" if group == "calib" else "eval.ppl.sources=[local]"
    for path, match in (("/dev/null", "is not a regular file"), (str(tmp_path), "is not a regular file"),
                        (str(tmp_path / "missing.txt"), "no such file")):
        with pytest.raises(ValueError, match=f"{group}.path='{path}'.* {match}"):
            run(make_cfg("method=saes", sources, f"{group}.path={path}", results_dir=tmp_path))
    assert not records(tmp_path)


def test_missing_packaged_model_is_named(tmp_path):
    cfg = make_cfg("model=smollm2_135m", "model.gguf.package=llm-not-installed", results_dir=tmp_path)
    with pytest.raises(ModelUnavailable, match="llm-not-installed.*make setup"):
        run(cfg)
    assert not records(tmp_path)


@pytest.mark.slow
def test_unknown_model_or_method_is_refused_by_hydra(tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    for bad in ("model=llama99b", "method=nosuch"):
        out = subprocess.run([sys.executable, "run.py", bad, f"results_dir={tmp_path}"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode != 0 and "Could not find" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_multirun_sweep_writes_one_record_per_job(tmp_path):
    cmd = [sys.executable, "run.py", "-m", "model=tiny_llama", "logger=none", "method=saes",
           "method.aces.beta_min=0,0.25", "ratio=0.2,0.4", "calib.nsamples=2", "calib.seqlen=32",
           "eval.ppl.seqlen=64", "eval.ppl.max_windows=2", f"results_dir={tmp_path}",
           f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    recs = [json.loads(p.read_text()) for p in records(tmp_path)]
    assert len(recs) == 4
    grid = {(r["config"]["ratio"], r["config"]["method"]["aces"]["beta_min"]) for r in recs}
    assert grid == {(0.2, 0), (0.2, 0.25), (0.4, 0), (0.4, 0.25)}
    assert len({r["calibration"]["tokens_sha256"] for r in recs}) == 1  # one calibration protocol


def test_a_failing_svd_stops_the_run_naming_the_layer_and_leaves_no_record(tmp_path, monkeypatch):
    import torch

    from saes.core.linalg import FactorizationError

    def no_convergence(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", no_convergence)
    monkeypatch.setattr(torch.linalg, "eigh", no_convergence)  # the Gram path fails too, then the SVD it falls back to
    with pytest.raises(FactorizationError, match=r"model\.layers\.0\.self_attn\.q_proj.*did not converge"):
        run(make_cfg("method=saes", results_dir=tmp_path))
    assert not records(tmp_path)


def test_fp_stream_baselines_run_on_the_shared_calibration_set(tmp_path):
    recs = [run(make_cfg(f"method={m}", results_dir=tmp_path)) for m in ("svdllm", "asvd", "saes")]
    assert [r["calibration"]["stream"] for r in recs] == ["fp", "fp", "compressed"]
    assert len({r["calibration"]["tokens_sha256"] for r in recs}) == 1
    assert all(r["metrics"]["ppl"]["wiki_books"]["compressed"] > 1 for r in recs)


def test_a_paper_model_config_runs_from_local_weights(tmp_path):
    """``model=llama7b model.path=DIR``: the hub code path (from_pretrained), with tiny weights saved locally."""
    from saes.inputs.models import tiny_llama, tiny_tokenizer

    weights = tmp_path / "weights"
    tiny_llama().save_pretrained(weights)
    tiny_tokenizer().save_pretrained(weights)
    rec = run(make_cfg("model=llama7b", f"model.path={weights}", "model.dtype=float32", results_dir=tmp_path))
    assert rec["model"]["identity"] == f"path:{weights.resolve()}" and rec["model"]["model_type"] == "llama"
    assert records(tmp_path)[0].parts[-4] == "llama7b"
    first = run(make_cfg("model=llama7b", f"model.path={weights}", "model.dtype=float32", "+model.blocks=1",
                         results_dir=tmp_path))  # a real model cut to its first block (smoke tests)
    assert first["model"]["identity"] == f"path:{weights.resolve()}|blocks:1" and first["key"] != rec["key"]
    assert sorted(first["layers"]) == sorted(n for n in rec["layers"] if n.startswith("model.layers.0."))
    with pytest.raises(ModelUnavailable, match=r"model.blocks=3, but the model has 2 decoder blocks"):
        run(make_cfg("model=llama7b", f"model.path={weights}", "+model.blocks=3", results_dir=tmp_path))
    with pytest.raises(ModelUnavailable, match="not a Hugging Face model folder"):
        run(make_cfg("model=llama7b", f"model.path={tmp_path / 'nowhere'}", results_dir=tmp_path / "other"))
