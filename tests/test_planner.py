"""``run.py ... plan=true``: the rank plan, parameter counts and predicted cost from the model's config alone."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from saes.inputs import data
from saes.inputs.models import ModelUnavailable
from saes.runs import pipeline
from saes.runs.pipeline import run

from .conftest import make_cfg


@pytest.fixture
def nothing_loads(monkeypatch):
    """The planner never loads a model, and never tries the network."""
    attempts: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> None:
        attempts.append(args)
        raise OSError("network guard")

    monkeypatch.setattr(pipeline, "load_model", lambda *_: pytest.fail("the planner loaded the model"))
    monkeypatch.setattr(data, "_hub_reachable", lambda: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield
    assert not attempts


def written(results: Path) -> list[Path]:
    return [p for p in results.rglob("*") if p.is_file()] if results.exists() else []


@pytest.mark.parametrize("method", ["saes", "svdllm"])
def test_the_plans_parameter_counts_are_the_records(tmp_path, method):
    rec = run(make_cfg(f"method={method}", "ratio=0.4", results_dir=tmp_path / "run"))
    plan = run(make_cfg(f"method={method}", "ratio=0.4", "plan=true", results_dir=tmp_path / "run"))
    for key in ("linears_dense", "linears_compressed", "model_dense", "model_compressed"):
        assert plan["params"][key] == rec["params"][key], key
    assert {k: v["rank"] for k, v in plan["projections"].items()} == \
        {name.rsplit(".", 1)[1]: d["rank"] for name, d in rec["layers"].items()}


def test_planning_llama7b_shape_needs_no_weights_network_or_record(tmp_path, nothing_loads, capsys):
    plan = run(make_cfg("model=llama7b_shape", "method=saes", "ratio=0.4", "device=cuda", "scale=paper",
                        "calib.source=wiki_books", "plan=true", results_dir=tmp_path))
    assert not written(tmp_path)
    assert plan["projections"]["down_proj"] == {"rank": 1791, "m": 4096, "n": 11008, "count": 32}
    assert plan["params"]["model_dense"] == 6_738_415_616
    secs = plan["predicted_seconds"]
    assert plan["device"] == "cuda" and plan["calibration_tokens"] == 4 * 64  # make_cfg's calib overrides win over scale=paper
    assert all(v is None or v > 0 for v in secs.values()) and plan["peak_device_gb"] > 1
    assert "nothing loaded, no record written" in capsys.readouterr().out


def test_planning_a_hub_model_offline_names_model_path(tmp_path, nothing_loads):
    """LLaMA-7B's config is on the hub (conf/model/llama7b.yaml: huggyllama/llama-7b); offline and not cached, the
    planner says so, naming model.path (model=llama7b_shape plans the same shapes offline)."""
    with pytest.raises(ModelUnavailable, match=r"(?s)huggyllama/llama-7b.*model\.path="):
        run(make_cfg("model=llama7b", "method=saes", "ratio=0.4", "plan=true", results_dir=tmp_path))
    assert not written(tmp_path)


def test_plan_refuses_bad_input_naming_the_key(tmp_path, nothing_loads):
    with pytest.raises(ValueError, match=r"ratio must lie in \(0, 1\)"):
        run(make_cfg("model=llama7b_shape", "ratio=1.5", "plan=true", results_dir=tmp_path))
    with pytest.raises(ModelUnavailable, match="model.blocks must be an integer >= 1"):
        run(make_cfg("model=llama7b_shape", "model.blocks=0", "plan=true", results_dir=tmp_path))


def test_the_memory_models_factorisation_workspace_covers_the_committed_measurement():
    """``FACTOR_WORKSPACE`` is what ``bench-block --only-factorisation`` measured at the down_proj's aspect (the
    widest site, the peak): never below it (the planner would promise memory that is not there), and within 0.2
    of a matrix above it (a stale constant after the engine got leaner)."""
    import json

    from saes.engine.cost import FACTOR_WORKSPACE

    bench = Path(__file__).resolve().parents[1] / "results" / "bench" / "factorisation-2048x5504-cpu.json"
    down = json.loads(bench.read_text())["factorisation"]["down"]
    for family in ("saes", "svdllm"):
        measured = down[f"{family}_factorize_peak_nn"]
        assert measured <= FACTOR_WORKSPACE[family] <= measured + 0.2, (family, measured)


@pytest.mark.parametrize("overrides, named", [
    (("method=fwsvd",), "FWSVD's Fisher gradients"),
    (("method=dobisvd",), "Dobi-SVD's stage-1 training"),
    (("method=saes", "method.rank_alloc=dip"), "Dip-SVD's gradient sensitivities"),
    (("method=svdllm", "finetune=lora"), "LoRA fine-tuning"),
])
def test_the_plan_says_which_passes_put_the_whole_model_on_the_device(tmp_path, nothing_loads, overrides, named):
    """The one-block peak is not the run's where a pass needs the whole model there (offload does not apply)."""
    plan = run(make_cfg("model=llama7b_shape", "model.dtype=float16", *overrides, "ratio=0.4", "device=cuda",
                        "plan=true", results_dir=tmp_path))
    assert f"the whole model goes on cuda for {named} (its weights, 12.6 GB" in plan["plan_note"]
    assert "whole model" not in (run(make_cfg("model=llama7b_shape", "method=saes", "ratio=0.4", "device=cuda",
                                              "plan=true", results_dir=tmp_path))["plan_note"] or "")
