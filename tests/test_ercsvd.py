"""ERC-SVD's residual compensation against its defining properties (baselines/ercsvd.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from baselines.ercsvd import ERCSVD, rec_ranks
from baselines.svdllm import SVDLLM
from saes.core.stats import SiteStats

from .conftest import layer_problem


def _problem(m: int = 40, n: int = 48, tokens: int = 400, seed: int = 0) -> tuple[torch.Tensor, SiteStats]:
    return layer_problem(m, n, tokens, seed, spread=1.5)


def _hloss(W: torch.Tensor, AB: torch.Tensor, H: torch.Tensor) -> float:
    E = W - AB
    return float((E @ H * E).sum())


def test_rank_split_follows_the_effective_size() -> None:
    assert rec_ranks(4096, 4096, 1638, 0.05) == (1638 - 102, 102)  # floor(0.05 * 2048)
    assert rec_ranks(40, 48, 5, 0.05) == (4, 1)
    assert rec_ranks(40, 48, 1, 0.05) == (1, 0)  # never below one first-stage rank


def test_rec_in_the_whitened_space_is_one_rank_r_truncation() -> None:
    """The reviewer's claim, for this reading: the residual's top triplets are the next ones of W C."""
    W, stats = _problem()
    for rank in (4, 10, 20):
        rec = ERCSVD(rec_space="whitened", beta=0.2).factorize(W, stats, rank)
        ref = SVDLLM().factorize(W, stats, rank)
        assert rec.A.shape[1] == rank and rec.diagnostics["r_res"] > 0
        torch.testing.assert_close(rec.A @ rec.B, ref.A @ ref.B, rtol=1e-8, atol=1e-8)


def test_rec_in_the_weight_space_differs_and_cannot_beat_svdllm_on_its_loss() -> None:
    W, stats = _problem(seed=1)
    rank = 10
    rec = ERCSVD(rec_space="weight", beta=0.2).factorize(W, stats, rank)
    ref = SVDLLM().factorize(W, stats, rank)
    first = ERCSVD(rec=False).factorize(W, stats, rec.diagnostics["r1"])
    assert rec.A.shape[1] == rank
    assert _hloss(W, ref.A @ ref.B, stats.H) < _hloss(W, rec.A @ rec.B, stats.H)  # SVD-LLM is the minimiser
    # the residual stage can only shrink the plain Frobenius error of stage 1
    assert torch.linalg.norm(W - rec.A @ rec.B) < torch.linalg.norm(W - first.A @ first.B)


def test_rec_off_is_svdllm() -> None:
    W, stats = _problem(seed=2)
    off = ERCSVD(rec=False).factorize(W, stats, 7)
    ref = SVDLLM().factorize(W, stats, 7)
    torch.testing.assert_close(off.A @ off.B, ref.A @ ref.B, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kw, key", [({"beta": 0.0}, "method.beta"), ({"beta": 1.0}, "method.beta"),
                                     ({"rec_space": "both"}, "method.rec_space")])
def test_bad_hyper_parameters_are_named(kw: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        ERCSVD(**kw)


# ------------------------------------------------------------------ partial-layer compression (PLC)
def _tiny():
    from saes.engine.layout import layout_for
    from saes.inputs.models import tiny_llama

    model = tiny_llama(seed=0)
    return model, layout_for(model)


def test_partial_layer_plan_keeps_the_budget_and_leaves_the_first_blocks_dense() -> None:
    from saes.engine.allocation import partial_layer_plan
    from saes.engine.layout import check_plan, plan_parameters, plan_ranks

    model, layout = _tiny()
    blocks = len(model.get_submodule(layout.layers))
    uniform = plan_ranks(model, layout, 0.3)
    shapes = {p: tuple(model.get_submodule(p).weight.shape) for p in uniform}
    budget = plan_parameters(shapes, uniform)
    for k in range(blocks, 0, -1):
        if not blocks * 0.3 < k:
            with pytest.raises(ValueError, match="method.plc.k"):
                partial_layer_plan(model, layout, 0.3, k)
            continue
        plan = partial_layer_plan(model, layout, 0.3, k)
        check_plan(model, layout, plan)
        kept = plan_parameters(shapes, plan)
        assert budget - max(m + n for m, n in shapes.values()) < kept <= budget
        dense_blocks = {int(p.split(".")[2]) for p, r in plan.items() if r is None}
        assert dense_blocks == set(range(blocks - k))


def test_plc_run_keeps_dense_blocks_and_equals_full_compression_after_them() -> None:
    """On the FP stream a block's statistics do not depend on what precedes it: the compressed blocks of a PLC
    run get exactly the factors the full run gives them at the same ranks; the dense ones keep their weights."""
    from saes.core.lowrank import LowRankLinear
    from saes.engine.allocation import partial_layer_plan
    from saes.engine.config import EngineConfig
    from saes.engine.loop import compress_model

    model, layout = _tiny()
    blocks = len(model.get_submodule(layout.layers))
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    plan = partial_layer_plan(model, layout, 0.3, blocks - 1)
    method = ERCSVD(plc={"k": blocks - 1})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plc_model = copy.deepcopy(model)
    report = compress_model(plc_model, method, plan, ids, EngineConfig(device=torch.device("cpu")))
    full = {p: (r if r is not None else 1) for p, r in plan.items()}
    compress_model(model, ERCSVD(), full, ids, EngineConfig(device=torch.device("cpu")))
    for name, r in plan.items():
        mod = plc_model.get_submodule(name)
        if r is None:
            assert isinstance(mod, torch.nn.Linear) and torch.equal(mod.weight, before[f"{name}.weight"])
            assert report.layers[name]["rank"] is None
        else:
            assert isinstance(mod, LowRankLinear)
            ref = model.get_submodule(name)
            torch.testing.assert_close(mod.A.weight @ mod.B.weight, ref.A.weight @ ref.B.weight)


@pytest.mark.parametrize("plc, match", [({"k": "some"}, "method.plc.k"), ({"k": "search", "candidates": [1.5]},
                                                                           "method.plc.candidates")])
def test_bad_plc_settings_are_named(plc: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ERCSVD(plc=plc)


def test_plc_k_outside_its_range_is_named() -> None:
    with pytest.raises(ValueError, match="method.plc.k=3"):
        ERCSVD(plc={"k": 3}).check_setting(30, 0.2)  # N R = 6
    ERCSVD(plc={"k": 7}).check_setting(30, 0.2)


# ------------------------------------------------------------------ end to end on the tiny model
def test_plc_runs_end_to_end_saves_loads_and_keeps_the_ratio(tmp_path) -> None:
    import json

    from saes.runs.pipeline import run
    from tests.conftest import make_cfg

    rec = run(make_cfg("method=ercsvd", "method.plc.k=1", "ratio=0.4", "save=true", results_dir=tmp_path))
    dense = [n for n, d in rec["layers"].items() if d["rank"] is None]
    assert dense and all(n.startswith("model.layers.0.") for n in dense)
    assert rec["params"]["linears_ratio"] == pytest.approx(0.4, abs=0.02)
    folder = tmp_path / "models" / "tiny_llama" / "ercsvd" / "ratio0.4" / f"seed0-{rec['key']}"
    manifest = json.loads((folder / "lowrank_manifest.json").read_text())
    assert set(manifest["dense_layers"]) == set(dense)
    loaded = run(make_cfg("method=ercsvd", "method.plc.k=1", "ratio=0.4", f"load={folder}", results_dir=tmp_path))
    assert loaded["metrics"]["ppl"] == rec["metrics"]["ppl"]
    assert loaded["params"]["linears_ratio"] == rec["params"]["linears_ratio"]


def test_plc_search_picks_the_best_candidate_and_caches_it(tmp_path) -> None:
    from saes.runs.pipeline import run
    from tests.conftest import make_cfg

    rec = run(make_cfg("method=ercsvd", "method.plc.k=search", "method.plc.candidates=[1.0,0.5]", "ratio=0.3",
                       results_dir=tmp_path))
    [cache] = (tmp_path / "cache" / "ercsvd_plc").glob("*.json")
    import json

    ppl = json.loads(cache.read_text())["ppl"]
    best = int(min(ppl, key=ppl.get))
    assert {d["plc_k"] for d in rec["layers"].values() if d["rank"] is not None} == {best}


def test_plc_k_out_of_range_is_refused_before_the_model_loads(tmp_path, monkeypatch) -> None:
    from saes.runs import pipeline
    from tests.conftest import make_cfg

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(ValueError, match="method.plc.k=1"):
        pipeline.run(make_cfg("method=ercsvd", "method.plc.k=1", "ratio=0.6", results_dir=tmp_path))  # N R = 1.2
    assert not (tmp_path / "runs").exists()
