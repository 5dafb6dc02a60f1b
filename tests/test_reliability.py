"""What a careful user hit (issue 11): bad input found before the model loads, with the key to change;
nothing half-done reported as done; offline means no connection attempt at all."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from saes.inputs import data
from saes.inputs.models import ModelUnavailable, model_config
from saes.io import token_digest
from saes.runs import pipeline
from saes.runs.checkpoint import MANIFEST, CheckpointError
from saes.runs.job import model_spec, plan_ranks_for
from saes.runs.pipeline import run

from .conftest import ROOT, make_cfg

GUARD = Path(__file__).with_name("netguard.py")
TINY = ["model=tiny_llama", "calib.nsamples=4", "calib.seqlen=64", "eval.ppl.seqlen=128", "eval.ppl.max_windows=2"]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the pipeline gets as far as loading the model."""
    monkeypatch.setattr(pipeline, "load_model", lambda *_: pytest.fail("the model was loaded before the error"))


def records(results: Path) -> list[Path]:
    return sorted((results / "runs").rglob("*.json"))


# ----------------------------------------------------------------------------- network
@pytest.mark.parametrize("mode", ["offline", pytest.param("disabled", marks=pytest.mark.slow)])
def test_a_run_with_the_wandb_logger_offline_or_disabled_never_touches_the_network(tmp_path, mode):
    """run.py under a socket guard that records (and refuses) every non-loopback lookup or connection."""
    log = tmp_path / "attempts.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    out = subprocess.run([sys.executable, str(GUARD), "run.py", *TINY, "method=svd", "logger=wandb",
                          f"logger.mode={mode}", f"results_dir={tmp_path / 'results'}"],
                         cwd=ROOT, env={**env, "NETGUARD_LOG": str(log)}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert records(tmp_path / "results")
    assert not log.exists(), f"connection attempts: {log.read_text()}"


def test_a_hub_model_offline_fails_at_once_naming_the_local_alternatives(tmp_path, monkeypatch, no_model_load):
    """No route to the hub: the same 2-second decision the text sources use, then a named error, no timeouts."""
    attempts: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> None:
        attempts.append(args)
        raise OSError("network guard")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(data, "_hub_reachable", lambda: False)  # the decision itself, without a probe
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    t0 = time.perf_counter()
    with pytest.raises(ModelUnavailable, match="model.path=.*smollm2_135m"):
        run(make_cfg("model=llama7b", results_dir=tmp_path))
    assert time.perf_counter() - t0 < 10 and not attempts
    assert not records(tmp_path) and not (tmp_path / "resume").exists()  # refused before the claim


# ------------------------------------------------------------------------- save=true
def test_save_on_a_recorded_run_without_a_saved_model_is_refused_naming_force(tmp_path, monkeypatch):
    run(make_cfg("method=svd", "ratio=0.3", results_dir=tmp_path))
    monkeypatch.setattr(pipeline, "load_model", lambda *_: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match="without a saved model.*force=true"):
        run(make_cfg("method=svd", "ratio=0.3", "save=true", results_dir=tmp_path))
    assert not (tmp_path / "models").exists()


def test_save_on_a_recorded_and_saved_run_returns_its_record(tmp_path, monkeypatch):
    made = run(make_cfg("method=svd", "ratio=0.3", "save=true", results_dir=tmp_path))
    assert (Path(made["saved_to"]) / MANIFEST).is_file()
    monkeypatch.setattr(pipeline, "load_model", lambda *_: pytest.fail("the model was loaded"))
    assert run(make_cfg("method=svd", "ratio=0.3", "save=true", results_dir=tmp_path))["key"] == made["key"]


# ----------------------------------------------------------- bad input before the load
@pytest.mark.parametrize("method", ["saes", "asvd_strs", "adasvd"])
def test_a_ratio_that_rounds_a_rank_to_zero_is_refused_before_the_model_loads(tmp_path, method, no_model_load):
    with pytest.raises(ValueError, match="rank 0"):
        run(make_cfg(f"method={method}", "ratio=0.999", results_dir=tmp_path))
    assert not (tmp_path / "resume").exists() and not (tmp_path / "dense").exists()


def test_the_rank_plan_from_the_config_equals_the_plan_from_the_weights():
    """The pre-load check plans from shapes on the meta device: the same plan as the loaded model's."""
    from saes.engine.layout import layout_for, plan_ranks
    from saes.inputs.models import load_model, skeleton

    cfg = make_cfg()
    loaded = load_model(model_spec(cfg.model))
    want = plan_ranks(loaded.model, layout_for(loaded.model), 0.4)
    assert plan_ranks_for(skeleton(model_config(model_spec(cfg.model))), 0.4) == want


@pytest.mark.parametrize("overrides,match", [
    (["calib.source=local"], r"local text source of calib needs a file: set calib.path="),
    (["calib.source=local", "calib.path=/no/such/file.txt"], r"calib.path='/no/such/file.txt': no such file"),
    (["calib.source=local", "calib.path=EMPTY"], r"calib.path=.* is empty"),
    (["calib.source=local", "calib.path=TEXT", "calib.split=thirds"], r"calib.split must be one of"),
    (["calib.split=hash"], r"calib.split='hash' applies to calib.source=local only"),
    (["eval.ppl.sources=[local]"], r"local text source of eval.ppl needs a file: set eval.ppl.path="),
    (["eval.ppl.batch_size=0"], r"eval.ppl.batch_size must be an integer >= 1; got 0"),
    (["eval.ppl.batch_size=-1"], r"eval.ppl.batch_size must be an integer >= 1; got -1"),
    (["seed=abc"], r"seed must be an integer; got 'abc'"),
    (["calib.seed=1.5"], r"calib.seed must be an integer; got 1.5"),
    (["device=tpu"], r"device='tpu' is not supported; use device=auto, cpu, cuda"),
    (["device=mps"], r"device='mps' is not supported"),
    (["device=meta"], r"device='meta' is not supported"),
    (["device=warp9"], r"device='warp9' is not supported"),
])
def test_bad_input_is_named_with_its_key_before_the_model_loads(tmp_path, overrides, match, no_model_load):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    (tmp_path / "text.txt").write_text("Some text.\n\nMore text.\n")
    overrides = [o.replace("EMPTY", str(tmp_path / "empty.txt")).replace("TEXT", str(tmp_path / "text.txt"))
                 for o in overrides]
    with pytest.raises(ValueError, match=match):
        run(make_cfg(*overrides, results_dir=tmp_path / "results"))
    assert not (tmp_path / "results").exists()  # nothing written: no record, no claim, no cache


def test_an_offline_hub_evaluation_text_is_advised_with_the_evaluation_key(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_hub_reachable", lambda: False)
    with pytest.raises(data.DataUnavailable, match=r"eval.ppl.sources=\[wiki_books\]") as err:
        run(make_cfg("method=svd", "eval.ppl.sources=[wikitext2]", results_dir=tmp_path))
    assert "calib.source" not in str(err.value)
    assert not records(tmp_path) and not list((tmp_path / "resume").iterdir())  # the failed run's claim is gone


# ------------------------------------------------------------------- local text files
def test_a_local_file_is_used_whole_by_default_and_the_record_says_so(tmp_path, tokenizer):
    train, test = tmp_path / "train.txt", tmp_path / "test.txt"
    train.write_text("\n\n".join(f"Training paragraph {i} about subject {i * 3}." * 6 for i in range(300)))
    test.write_text("\n\n".join(f"Test paragraph {i} on matter {i * 5}." * 6 for i in range(60)))
    whole = data.load_text("local", "calib", str(train))
    assert len(whole.docs) == 300  # all of it, not an 80% part
    assert data.load_text("local", "eval", str(test)).docs == data.load_text("local", "calib", str(test)).docs
    hashed = data.load_text("local", "calib", str(train), "hash")
    assert 0.7 < len(hashed.docs) / 300 < 0.9  # the hash split, when asked for
    rec = run(make_cfg("method=svdllm", "calib.source=local", f"calib.path={train}", "eval.ppl.sources=[local]",
                       f"eval.ppl.path={test}", results_dir=tmp_path / "results"))
    assert rec["calibration"]["split"] == "whole"
    ids = data.tokenize(tokenizer, data.load_text("local", "eval", str(test)))
    assert rec["metrics"]["ppl"]["local"]["tokens_sha256"] == token_digest(ids)


def test_the_split_key_leaves_existing_record_keys_unchanged():
    """``calib.split``/``eval.ppl.split`` are null by default and hash as absent: committed records keep their keys."""
    from omegaconf import OmegaConf

    from saes.runs.records import config_key

    cfg = OmegaConf.to_container(make_cfg(), resolve=True)
    without = json.loads(json.dumps(cfg))
    del without["calib"]["split"], without["eval"]["ppl"]["split"]
    assert config_key(cfg) == config_key(without)
    cfg["calib"]["split"] = "hash"
    assert config_key(cfg) != config_key(without)


# -------------------------------------------------------------------------- manifests
def test_a_manifest_whose_ratio_disagrees_with_its_layers_is_refused(tmp_path):
    made = run(make_cfg("method=svd", "ratio=0.3", "save=true", results_dir=tmp_path))
    folder = Path(made["saved_to"])
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, "ratio": 0.6}))
    with pytest.raises(CheckpointError, match="says ratio 0.6, but its layers remove 0.3"):
        run(make_cfg(f"load={folder}", results_dir=tmp_path))
    (folder / MANIFEST).write_text(json.dumps({**manifest, "ratio": 0.2}))
    with pytest.raises(CheckpointError, match="says ratio 0.2"):
        run(make_cfg(f"load={folder}", results_dir=tmp_path))
    (folder / MANIFEST).write_text(json.dumps(manifest))
    assert run(make_cfg(f"load={folder}", results_dir=tmp_path))["config"]["ratio"] == 0.3
