"""``run.py load=<folder>``: evaluate a saved compressed model without compressing again."""

import json
import shutil

import pytest

from saes.runs.checkpoint import MANIFEST, CheckpointError
from saes.runs.pipeline import run

from .conftest import make_cfg


@pytest.fixture
def saved(tmp_path):
    """A compression run with save=true: its record and its folder."""
    rec = run(make_cfg("method=saes", "ratio=0.4", "save=true", results_dir=tmp_path))
    return rec, tmp_path / "models" / "tiny_llama" / "saes" / "ratio0.4" / f"seed0-{rec['key']}"


def test_load_evaluates_the_saved_model_and_records_it_beside_not_over(tmp_path, saved):
    made, folder = saved
    rec = run(make_cfg(f"load={folder}", "method=svd", "ratio=0.8", results_dir=tmp_path))  # method/ratio ignored
    ppl, ppl_made = rec["metrics"]["ppl"]["wiki_books"], made["metrics"]["ppl"]["wiki_books"]
    assert ppl["compressed"] == pytest.approx(ppl_made["compressed"], rel=1e-6)
    assert ppl["dense"] == ppl_made["dense"] and ppl["windows"] == ppl_made["windows"]  # dense from the cache
    assert rec["config"]["method"]["name"] == "saes" and rec["config"]["ratio"] == 0.4 and "calib" not in rec["config"]
    assert rec["loaded_from"]["record_key"] == made["key"] and rec["layers"] == {
        k: {"rank": v["rank"], "in_features": v["n"], "out_features": v["m"], "bias": False}
        for k, v in made["layers"].items()}
    assert "calibration" not in rec["timings"]  # nothing was compressed
    assert rec["calibration"]["tokens_sha256"] == made["calibration"]["tokens_sha256"]
    for k in ("linears_ratio", "model_compressed", "model_dense", "model_ratio"):
        assert rec["params"][k] == pytest.approx(made["params"][k])
    # fp32 weights: the folder's size is the achieved parameter count, plus a small header
    n = made["params"]["model_compressed"]
    assert 4 * n <= rec["params"]["weights_bytes"] < 4 * n + 65536

    runs = sorted(p.name for p in (tmp_path / "runs" / "tiny_llama" / "saes" / "ratio0.4").glob("*.json"))
    assert runs == sorted([f"seed0-{made['key']}.json", f"loaded-{rec['key']}.json"])
    path = tmp_path / "runs" / "tiny_llama" / "saes" / "ratio0.4" / f"loaded-{rec['key']}.json"
    assert json.loads(path.read_text())["key"] == rec["key"]
    mtime = path.stat().st_mtime_ns
    assert run(make_cfg(f"load={folder}", results_dir=tmp_path))["key"] == rec["key"]  # done: skipped
    assert path.stat().st_mtime_ns == mtime


def test_load_refuses_another_base_model_or_a_bad_folder_before_any_work(tmp_path, saved):
    _, folder = saved
    before = sorted((tmp_path / "runs").rglob("*.json"))
    wrong_base = r"compressed from base .*'seed', 0\)\].*model=tiny_llama is .*'seed', 1\)\]"
    with pytest.raises(CheckpointError, match=wrong_base):
        run(make_cfg(f"load={folder}", "model.tiny.seed=1", results_dir=tmp_path))
    with pytest.raises(ValueError, match="save=true with load"):
        run(make_cfg(f"load={folder}", "save=true", results_dir=tmp_path))
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    manifest = json.loads((broken / MANIFEST).read_text())
    (broken / MANIFEST).write_text(json.dumps({k: v for k, v in manifest.items() if k != "base"}))
    with pytest.raises(CheckpointError, match=r"lacks \['base'\]"):
        run(make_cfg(f"load={broken}", results_dir=tmp_path))
    (broken / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="no lowrank_manifest"):
        run(make_cfg(f"load={broken}", results_dir=tmp_path))
    assert sorted((tmp_path / "runs").rglob("*.json")) == before
