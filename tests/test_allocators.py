"""The shared rank allocators (``method.rank_alloc``, issue 15 §1): any method takes any allocator, the plan keeps
the one budget rule and passes the plan check, uniform ranks leave the record key as it was, bad input is named
before the model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from saes.core.lowrank import rank_for_ratio
from saes.runs.pipeline import prepare, run
from saes.runs.records import config_key

from .conftest import make_cfg

METHODS = ("svd", "fwsvd", "asvd", "svdllm", "svdllm_update", "adasvd", "saes", "dipsvd", "ercsvd")
STRS_SMALL = ("method.strs.nsamples=2", "method.strs.seqlen=32", "method.strs.candidates=[0.2,0.4,0.6,0.8]")


def _budget(rec: dict, ratio: float) -> tuple[int, int]:
    layers = rec["layers"].values()
    budget = sum(rank_for_ratio(d["m"], d["n"], ratio) * (d["m"] + d["n"]) for d in layers)
    return budget, sum(d["rank"] * (d["m"] + d["n"]) for d in layers)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("alloc", ("strs", "adacr", "dip"))
def test_every_allocator_with_every_method_keeps_the_budget(tmp_path, method, alloc):
    ratio = 0.4
    extra = ["method.plc.k=null"] if method == "ercsvd" else []
    rec = run(make_cfg(f"method={method}", f"ratio={ratio}", f"method.rank_alloc={alloc}", *extra,
                       *(STRS_SMALL if alloc == "strs" else ()), results_dir=tmp_path))
    assert rec["params"]["rank_alloc"] == "mixed"
    budget, used = _budget(rec, ratio)
    widest = max(d["m"] + d["n"] for d in rec["layers"].values())
    assert used <= budget and budget - used < widest  # never over, short by less than one rank of one projection
    assert all(1 <= d["rank"] <= min(d["m"], d["n"]) for d in rec["layers"].values())
    if alloc == "adacr":  # the allocator's per-projection record
        assert all({"layer_importance", "layer_ratio"} <= set(d) for d in rec["layers"].values())
    if alloc == "dip":
        assert all({"grad_sensitivity", "effective_rank", "layer_ratio"} <= set(d) for d in rec["layers"].values())
    assert 1 < rec["metrics"]["ppl"]["wiki_books"]["compressed"] < float("inf")


def test_the_strs_table_is_shared_by_methods_and_ratios(tmp_path):
    """SAES-SVD with STRS reuses the sensitivity table ASVD computed (same scaling, tokens, candidates): one file."""
    run(make_cfg("method=asvd", "ratio=0.4", "method.rank_alloc=strs", *STRS_SMALL, results_dir=tmp_path))
    saes = run(make_cfg("method=saes", "ratio=0.2", "method.rank_alloc=strs", *STRS_SMALL, results_dir=tmp_path))
    assert len(list((tmp_path / "cache" / "asvd_strs").glob("*.json"))) == 1
    assert saes["params"]["rank_alloc"] == "mixed"


def test_uniform_allocation_keeps_the_record_key_and_the_result(tmp_path):
    """``rank_alloc=uniform`` (the default) hashes as absent for methods that never had it, and an unused
    allocator's settings never enter the key; a mixed-rank config has its own key."""
    cfg = make_cfg("method=saes", "ratio=0.4", results_dir=tmp_path)
    resolved = json.loads(json.dumps(prepare(cfg).config))
    method = {k: v for k, v in resolved["method"].items()
              if k not in ("rank_alloc", "strs", "min_keep", "max_keep", "importance", "dip")}
    assert config_key({**resolved, "method": method}) == config_key(resolved)  # as before the allocators existed
    moved = make_cfg("method=saes", "ratio=0.4", "method.min_keep=0.3", "method.strs.nsamples=3", results_dir=tmp_path)
    assert prepare(moved).key == prepare(cfg).key  # unused settings: same run
    mixed = make_cfg("method=saes", "ratio=0.4", "method.rank_alloc=adacr", results_dir=tmp_path)
    assert prepare(mixed).key != prepare(cfg).key
    tuned = make_cfg("method=saes", "ratio=0.4", "method.rank_alloc=adacr", "method.min_keep=0.3", results_dir=tmp_path)
    assert prepare(tuned).key != prepare(mixed).key
    a = run(cfg)
    b = run(make_cfg("method=saes", "ratio=0.4", "method.rank_alloc=uniform", "force=true", results_dir=tmp_path))
    assert a["key"] == b["key"] and a["metrics"]["ppl"] == b["metrics"]["ppl"]


def test_own_allocators_still_hash_their_settings(tmp_path):
    """ASVD and AdaSVD held ``rank_alloc`` and their allocator's settings before the allocators were shared; their
    committed records hash them, so they stay in those methods' keys."""
    asvd = make_cfg("method=asvd", "ratio=0.4", results_dir=tmp_path)
    assert prepare(asvd).key != prepare(make_cfg("method=asvd", "ratio=0.4", "method.strs.nsamples=3",
                                                 results_dir=tmp_path)).key
    ada = make_cfg("method=adasvd", "ratio=0.4", results_dir=tmp_path)
    assert prepare(ada).key != prepare(make_cfg("method=adasvd", "ratio=0.4", "method.min_keep=0.3",
                                                results_dir=tmp_path)).key


@pytest.mark.parametrize("overrides, match", [
    (("method.rank_alloc=greedy",), "method.rank_alloc"),
    (("method.rank_alloc=adacr", "method.min_keep=0"), "method.min_keep"),
    (("method.rank_alloc=adacr", "method.importance=sin"), "method.importance"),
    (("method.rank_alloc=adacr", "method.max_keep=0.5"), "max_keep"),  # below 1 - ratio: checked before loading
    (("method.rank_alloc=strs", "method.strs.candidates=[0.5,0.2]"), "method.strs.candidates"),
    (("method.rank_alloc=strs", "+method.strs.size=3"), "method.rank_alloc=strs"),
    (("method.rank_alloc=dip", "method.dip.beta=2"), "method.dip.beta"),
    (("method.rank_alloc=dip", "+method.dip.size=3"), "method.rank_alloc=dip"),
    (("method=ercsvd", "method.rank_alloc=adacr"), "method.plc.k=null"),
])
def test_bad_allocator_settings_are_named_before_the_model_loads(tmp_path, monkeypatch, overrides, match):
    import saes.runs.pipeline as pipeline

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline, "load_model", no_loading)
    cfg = make_cfg(*(o for o in overrides if o.startswith("method=")), "ratio=0.4",
                   *(o for o in overrides if not o.startswith("method=")), results_dir=tmp_path)
    with pytest.raises(ValueError, match=match):
        run(cfg)
    assert not (tmp_path / "runs").exists()


def record_file(results, rec: dict) -> str:
    from saes.runs.records import record_path

    return str(record_path(results, rec["config"]))


def test_a_records_ranks_pin_another_method_to_exactly_its_plan(tmp_path):
    """``rank_alloc=record``: SAES-SVD at the ranks adaCR gave SVD-LLM, read from SVD-LLM's record (no allocation)."""
    src = run(make_cfg("method=svdllm", "ratio=0.4", "method.rank_alloc=adacr", results_dir=tmp_path))
    path = record_file(tmp_path, src)
    saes = run(make_cfg("method=saes", "ratio=0.4", "method.rank_alloc=record", f"method.ranks_from={path}",
                        results_dir=tmp_path))
    assert {n: d["rank"] for n, d in saes["layers"].items()} == {n: d["rank"] for n, d in src["layers"].items()}
    assert len({d["rank"] for d in saes["layers"].values()}) > 2  # a mixed plan, not the uniform one
    assert saes["params"]["linears_compressed"] == src["params"]["linears_compressed"]
    assert saes["params"]["rank_alloc"] == "mixed"
    assert saes["params"]["allocation"] == {"ranks_from": path, "key": src["key"], "method": "svdllm",
                                            "rank_alloc": "mixed"}
    key = lambda p: prepare(make_cfg("method=saes", "ratio=0.4", "method.rank_alloc=record",  # noqa: E731
                                     f"method.ranks_from={p}", results_dir=tmp_path)).key
    copy = tmp_path / "copy.json"
    copy.write_text(Path(path).read_text())
    assert key(copy) == saes["key"]  # the key holds the ranks, not the path
    fewer = json.loads(copy.read_text())
    next(iter(fewer["layers"].values()))["rank"] -= 1
    copy.write_text(json.dumps(fewer))
    assert key(copy) != saes["key"]  # other ranks: another run


def test_a_record_that_does_not_fit_the_run_is_named_before_the_model_loads(tmp_path, monkeypatch):
    import saes.runs.pipeline as pipeline

    src = run(make_cfg("method=svdllm", "ratio=0.4", results_dir=tmp_path / "src"))
    good = json.loads(Path(record_file(tmp_path / "src", src)).read_text())

    def variant(name: str, edit) -> str:
        rec = json.loads(json.dumps(good))
        edit(rec)
        (tmp_path / name).write_text(json.dumps(rec))
        return str(tmp_path / name)

    first = next(iter(good["layers"]))
    grown = lambda r: r["layers"].values()  # noqa: E731
    cases = [
        ("method.ranks_from=null", "set method.ranks_from"),
        (f"method.ranks_from={tmp_path / 'none.json'}", "no such file"),
        (f"method.ranks_from={variant('bad.json', lambda r: r.pop('layers'))}", "not a run record with per-layer"),
        (f"method.ranks_from={variant('r02.json', lambda r: r['config'].update(ratio=0.2))}", "set ratio=0.2"),
        (f"method.ranks_from={variant('less.json', lambda r: r['layers'].pop(first))}", r"it lacks \['model[^,]*\]$"),
        (f"method.ranks_from={variant('m.json', lambda r: r['layers'][first].update(m=7))}", "another model"),
        (f"method.ranks_from={variant('r0.json', lambda r: r['layers'][first].update(rank=0))}", "rank 0, outside"),
        (f"method.ranks_from={variant('big.json', lambda r: [d.update(rank=d['rank'] + 1) for d in grown(r)])}",
         "above the"),
        # a source given without the allocator that reads it
        (f"method.ranks_from={variant('ok.json', lambda r: None)} method.rank_alloc=adacr",
         "method.rank_alloc=record to"),
    ]
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    for override, match in cases:
        with pytest.raises(ValueError, match=match):
            run(make_cfg("method=saes", "ratio=0.4", "method.rank_alloc=record", *override.split(),
                         results_dir=tmp_path / "x"))
    assert not (tmp_path / "x" / "runs").exists()
