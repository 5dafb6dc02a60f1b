"""AdaSVD: adaComp's monotone refit (checked on explicit activations) and adaCR's budget-keeping ranks."""

from itertools import islice

import pytest
import torch

from baselines.adasvd import AdaSVD, adacomp, als_steps
from saes.engine.allocators import AdaCR, adacr_keep, adacr_ratios, layer_importance
from saes.core.linalg import damped_cholesky, truncated_svd
from saes.core.lowrank import rank_for_ratio
from saes.core.stats import SiteStats
from saes.engine.allocation import ranks_for_layer_ratios
from saes.engine.config import EngineConfig
from saes.engine.layout import check_plan, layout_for, plan_ranks
from saes.runs.pipeline import run
from saes.saes import cealc_factors, whitened_targets

from .conftest import calib_batch, make_cfg

F64 = torch.float64
CPU = torch.device("cpu")


def two_streams(m=14, n=10, N=400, seed=0):
    """``W``, FP-stream inputs ``Xf`` and compressed-stream inputs ``X`` (columns are tokens).

    ``X`` is ``Xf`` distorted as upstream compression would: a systematic linear error plus noise.
    """
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=F64)
    Xf = torch.randn(n, N, generator=g, dtype=F64) * torch.logspace(0, 1.5, n, dtype=F64)[:, None]
    E = 0.3 * torch.randn(n, n, generator=g, dtype=F64)
    X = Xf + E @ Xf + 0.2 * torch.randn(n, N, generator=g, dtype=F64)
    return W, Xf, X


def gram(Xf, X):
    N = X.shape[1]
    return SiteStats(N, H=X @ X.T / N, Delta=(Xf - X) @ X.T / N)


def calib_err2(W, Xf, X, A, B):
    """``||W X^f - A B X||_F^2 / N`` from the activations themselves."""
    return float((W @ Xf - A @ B @ X).square().sum()) / X.shape[1]


def test_no_adacomp_step_increases_the_calibration_error_and_gram_matches_activations():
    W, Xf, X = two_streams()
    stats, rank = gram(Xf, X), 3
    wh = damped_cholesky(stats.H, 0.0)
    S, D = whitened_targets(W, wh, stats.Delta)
    G = S + D
    A, Bt = truncated_svd(S, rank).factors()  # SVD-LLM's whitened truncation
    # irreducible part: the best unconstrained map M = W (H + Delta) H^{-1} on these inputs
    M = torch.linalg.solve(stats.H, (W @ (stats.H + stats.Delta)).T).T
    floor = calib_err2(W, Xf, X, M, torch.eye(W.shape[1], dtype=F64))
    errs = [calib_err2(W, Xf, X, A, wh.right_inv(Bt))]
    gram_errs = [float((A @ Bt - G).square().sum())]
    for A, Bt in islice(als_steps(G, A, Bt), 20):  # 10 iterations = 20 half-steps
        errs.append(calib_err2(W, Xf, X, A, wh.right_inv(Bt)))
        gram_errs.append(float((A @ Bt - G).square().sum()))
    for before, after in zip(errs, errs[1:]):
        assert after <= before * (1 + 1e-12)
    assert errs[-1] - floor < 0.5 * (errs[0] - floor)  # compensation does something on the compressed stream
    torch.testing.assert_close(torch.tensor(errs, dtype=F64) - floor, torch.tensor(gram_errs, dtype=F64), rtol=1e-8, atol=1e-8)


def test_factorize_reports_the_gram_error_and_converges_to_the_alignment_optimum():
    W, Xf, X = two_streams(seed=1)
    stats, rank = gram(Xf, X), 4
    f0 = AdaSVD(iters=0, damp=0.0).factorize(W, stats, rank)
    f = AdaSVD(iters=2, damp=0.0).factorize(W, stats, rank)
    M = torch.linalg.solve(stats.H, (W @ (stats.H + stats.Delta)).T).T
    floor = calib_err2(W, Xf, X, M, torch.eye(W.shape[1], dtype=F64))
    scale = (calib_err2(W, Xf, X, torch.zeros_like(W), torch.eye(W.shape[1], dtype=F64)) - floor) ** 0.5
    for fac in (f0, f):  # the recorded relative error is the explicit excess calibration error
        explicit = (calib_err2(W, Xf, X, fac.A, fac.B) - floor) ** 0.5 / scale
        assert fac.diagnostics["calib_err_after"] == pytest.approx(explicit, rel=1e-7)
    assert f.diagnostics["calib_err_before"] == pytest.approx(f0.diagnostics["calib_err_after"], rel=1e-10)
    assert f.diagnostics["calib_err_after"] < f.diagnostics["calib_err_before"]
    assert f.A.shape == (14, rank) and f.B.shape == (rank, 10)
    # many iterations reach the closed-form optimum of the same objective (CEALC at beta = 1)
    far = AdaSVD(iters=300, damp=0.0).factorize(W, stats, rank)
    A1, B1 = cealc_factors(W, stats.H, stats.Delta, rank, beta=1.0)
    torch.testing.assert_close(far.A @ far.B, A1 @ B1, rtol=1e-7, atol=1e-9)


def test_adacomp_is_a_no_op_on_the_fp_stream():
    """Delta = 0: the whitened truncation is already optimal, so adaComp must leave it alone."""
    W, Xf, _ = two_streams(seed=2)
    stats = gram(Xf, Xf)
    wh = damped_cholesky(stats.H, 0.01)
    S, _ = whitened_targets(W, wh, stats.Delta)
    A, Bt = truncated_svd(S, 3).factors()
    out = adacomp(S, A, Bt, iters=5)
    torch.testing.assert_close(out.A @ out.Bt, A @ Bt, rtol=1e-9, atol=1e-9)
    assert max(out.errors) - min(out.errors) < 1e-9 * out.errors[0]


def test_adacr_keeps_the_global_ratio_and_gives_important_layers_less_compression():
    importance = [0.30, 0.05, 0.08, 0.12, 0.02, 0.25]
    for ratio in (0.2, 0.4, 0.6):
        keep = adacr_keep(importance, ratio)
        assert sum(keep) / len(keep) == pytest.approx(1 - ratio, abs=1e-9)
        ratios = adacr_ratios(importance, ratio)
        order = sorted(range(6), key=lambda i: importance[i])  # least important first
        for a, b in zip(order, order[1:]):  # ... most compressed (ties only where both hit max_keep = 1)
            assert ratios[a] > ratios[b] or keep[a] == keep[b] == 1.0
        assert min(keep) >= 0.5 * (1 - ratio) - 1e-12 and max(keep) <= 1.0
    # no clipping: exactly the paper's mrr + I/mean(I) * (trr - mrr)
    keep = adacr_keep([1.0, 2.0, 3.0], 0.4, min_keep=0.5)
    assert keep == pytest.approx([0.3 + 0.5 * 0.3, 0.3 + 1.0 * 0.3, 0.3 + 1.5 * 0.3])
    # clipping at max_keep: the slope is re-solved so that the mean still holds
    keep = adacr_keep([0.01, 0.01, 1.0], 0.2, max_keep=0.9)
    assert keep[2] == pytest.approx(0.9) and sum(keep) / 3 == pytest.approx(0.8)
    with pytest.raises(ValueError, match="max_keep"):
        adacr_keep([1.0, 2.0], 0.2, max_keep=0.7)


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_layer_ranks_keep_the_uniform_parameter_total_within_one_rank(tiny_gqa, ratio):
    layout = layout_for(tiny_gqa)
    uniform = plan_ranks(tiny_gqa, layout, ratio)
    shapes = {p: (*tiny_gqa.get_submodule(p).weight.shape, int(p.split(".")[2])) for p in uniform}
    budget = sum(r * (shapes[p][0] + shapes[p][1]) for p, r in uniform.items())
    for importance in ([0.9, 0.1], [0.1, 0.9], [0.5, 0.5]):
        ranks = ranks_for_layer_ratios(shapes, adacr_ratios(importance, ratio), budget)
        check_plan(tiny_gqa, layout, ranks)
        total = sum(r * (shapes[p][0] + shapes[p][1]) for p, r in ranks.items())
        assert 0 <= budget - total < max(m + n for m, n, _ in shapes.values())
        if importance[0] != importance[1]:  # the important block gets more rank in every projection
            hi, lo = (0, 1) if importance[0] > importance[1] else (1, 0)
            for name in layout.projections:
                assert ranks[f"model.layers.{hi}.{name}"] > ranks[f"model.layers.{lo}.{name}"]


def test_importance_ranks_a_block_that_passes_its_input_through_lowest(tiny_gqa):
    """A block whose attention and MLP write nothing (o, down = 0) has output = input: importance 0."""
    model = tiny_gqa
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layout = layout_for(model)
    cfg = EngineConfig(device=CPU, batch_size=2)
    imp = layer_importance(model, layout, calib_batch(), cfg)
    assert imp[0] == pytest.approx(0.0, abs=1e-6) and imp[1] > 1e-3
    plan = AdaCR(importance="one_minus_cos").plan(model, layout, 0.4, calib_batch(), cfg, AdaSVD())
    ranks = plan.ranks
    check_plan(model, layout, ranks)
    assert set(ranks) == set(plan_ranks(model, layout, 0.4))
    assert all(ranks[f"model.layers.0.{p}"] < ranks[f"model.layers.1.{p}"] for p in layout.projections)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the plan leaves the weights alone


@pytest.mark.parametrize("kwargs,match", [({"iters": -1}, "iters"), ({"iters": 1.5}, "iters"), ({"damp": -0.1}, "damp")])
def test_bad_hyper_parameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaSVD(**kwargs)


@pytest.mark.parametrize("kwargs,match", [({"min_keep": 0.0}, "min_keep"), ({"max_keep": 1.5}, "max_keep"),
                                          ({"importance": "sin"}, "method.importance")])
def test_bad_adacr_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaCR(**kwargs)


def test_end_to_end_run_with_adacr_and_adacomp(tmp_path):
    """The first reading (least-squares V-step, 1 - cos importance, 3 iterations): the objective never rises."""
    rec = run(make_cfg("method=adasvd", "ratio=0.4", "method.adacomp=activations", "method.importance=one_minus_cos",
                       "method.iters=3", results_dir=tmp_path))
    assert rec["calibration"]["stream"] == "compressed" and rec["params"]["rank_alloc"] == "mixed"
    layers = rec["layers"]
    assert len(layers) == 2 * 7 and len({d["rank"] for n, d in layers.items() if n.endswith("q_proj")}) == 2
    uniform_total = sum(rank_for_ratio(d["m"], d["n"], 0.4) * (d["m"] + d["n"]) for d in layers.values())
    assert 0 <= uniform_total - rec["params"]["linears_compressed"] < 64 + 160  # one rank of one projection
    for d in layers.values():
        assert d["calib_err_after"] <= d["calib_err_before"] * (1 + 1e-9) and d["adacomp_iters"] == 3
        assert {"layer_importance", "layer_ratio", "damp", "rer"} <= set(d)
    assert 1 < rec["metrics"]["ppl"]["wiki_books"]["compressed"] < float("inf")


def test_end_to_end_run_with_the_published_reading(tmp_path):
    rec = run(make_cfg("method=adasvd", "ratio=0.4", results_dir=tmp_path))
    assert rec["config"]["method"]["adacomp"] == "published" and rec["params"]["rank_alloc"] == "mixed"
    assert {d["adacomp_iters"] for d in rec["layers"].values()} == {1}
    assert 1 < rec["metrics"]["ppl"]["wiki_books"]["compressed"] < float("inf")


def test_uniform_rank_alloc_switches_adacr_off(tmp_path):
    rec = run(make_cfg("method=adasvd", "ratio=0.4", "method.rank_alloc=uniform", results_dir=tmp_path))
    assert rec["params"]["rank_alloc"] == "uniform"
    assert not any("layer_importance" in d for d in rec["layers"].values())


# ------------------------------------------------------------------ the published reading vs the first one
def test_published_v_step_projects_the_weight_onto_the_left_factor():
    """``B = A^+ W``: the product is ``W`` projected onto ``A``'s columns (no activations in the V-step)."""
    W, Xf, X = two_streams()
    f = AdaSVD(adacomp="published", iters=1, damp=0.0).factorize(W, gram(Xf, X), 4)
    AB = f.A @ f.B
    torch.testing.assert_close(AB, f.A @ torch.linalg.pinv(f.A) @ W, rtol=1e-8, atol=1e-9)
    mine = AdaSVD(adacomp="activations", iters=1, damp=0.0).factorize(W, gram(Xf, X), 4)
    assert not torch.allclose(AB, mine.A @ mine.B)  # the two V-steps differ once Delta != 0


def test_the_two_v_steps_agree_on_the_fp_stream():
    W, Xf, _ = two_streams(seed=3)
    stats = gram(Xf, Xf)  # Delta = 0: G = S
    pub = AdaSVD(adacomp="published", iters=2).factorize(W, stats, 5)
    act = AdaSVD(adacomp="activations", iters=2).factorize(W, stats, 5)
    torch.testing.assert_close(pub.A @ pub.B, act.A @ act.B, rtol=1e-8, atol=1e-9)


def test_the_two_importance_readings_are_complements(tiny_gqa):
    model = tiny_gqa
    layout, cfg = layout_for(model), EngineConfig(device=CPU, batch_size=2)
    cos = layer_importance(model, layout, calib_batch(), cfg, "cos")
    one_minus = layer_importance(model, layout, calib_batch(), cfg, "one_minus_cos")
    for a, b in zip(cos, one_minus):
        assert a + b == pytest.approx(1.0, abs=1e-9)


def test_unknown_variant_names_are_named():
    with pytest.raises(ValueError, match="method.adacomp"):
        AdaSVD(adacomp="both")
