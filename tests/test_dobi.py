"""Dobi-SVD (issue 27): the tanh mask and its gradient, the guarded SVD backward, the budget and its projection, the
stage-2 PCA update, the allocator with every method, bad settings named before the model loads, and a stopped
stage-1 training that resumes to the uninterrupted result."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from torch import nn

from baselines.dobisvd import _Collecting, truncated_stream_subspaces
from saes.core.dobi import (SVDGuard, guarded_svd, kept_fraction, pca_factors, principal_subspace, svd_backward,
                            tanh_mask, truncate_activation)
from saes.core.lowrank import rank_for_ratio
from saes.engine.allocation import fit_ranks
from saes.engine.allocators.dobi_train import DobiTraining, train_positions
from saes.engine.config import EngineConfig
from saes.engine.layout import layout_for, plan_ranks
from saes.inputs.models import tiny_llama
from saes.runs.pipeline import run

from .conftest import calib_batch, make_cfg

SMALL = ("method.dobi.windows=4", "method.dobi.seqlen=64", "method.dobi.select_windows=2", "method.dobi.epochs=2",
         "method.dobi.accum=2", "method.dobi.select_every=2")


def _svd_loss(U, S, V, gU, gS, gV):
    return (U * gU).sum() + (S * gS).sum() + (V * gV).sum()


def test_mask_and_its_gradient_match_finite_differences():
    """``d loss / d gamma`` through the tanh mask of a truncated activation (a tiny layer, exact SVD, float64)
    equals the central difference; the mask is 1/2 at ``gamma``, ~1 before, ~0 after."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 8, generator=g, dtype=torch.float64)
    x = torch.randn(10, 8, generator=g, dtype=torch.float64)
    target = torch.randn(10, 6, generator=g, dtype=torch.float64)

    def loss(gamma: torch.Tensor) -> torch.Tensor:
        y = truncate_activation(x @ W.T, gamma)
        return torch.exp(((y - target) ** 2).mean())

    for value in (1.7, 2.4, 3.05, 4.5):
        gamma = torch.tensor(value, dtype=torch.float64, requires_grad=True)
        loss(gamma).backward()
        h = 1e-5  # about eps^(1/3): truncation ~h^2, rounding ~eps/h (at 1e-6 the latter reached 1e-6 relative)
        up, down = (torch.tensor(value + s, dtype=torch.float64) for s in (h, -h))
        fd = (loss(up) - loss(down)) / (2 * h)
        assert float(gamma.grad) == pytest.approx(float(fd), rel=1e-6, abs=1e-9)
        assert float(gamma.grad) != 0.0
    T = tanh_mask(torch.tensor(3.0, dtype=torch.float64), 6)
    assert float(T[2]) == 0.5 and float(T[0]) > 1 - 1e-12 and float(T[5]) < 1e-12


@pytest.mark.parametrize("shape", [(9, 5), (4, 7)])
def test_guarded_backward_equals_autograd_away_from_ties(shape):
    torch.manual_seed(1)
    A = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    g = [torch.randn_like(t) for t in (U, S, Vh.T)]
    _svd_loss(U, S, Vh.T, *g).backward()
    for guard in (SVDGuard(), None):
        B = A.detach().clone().requires_grad_()
        _svd_loss(*guarded_svd(B, min(shape), guard=guard), *g).backward()
        assert torch.allclose(B.grad, A.grad, atol=1e-10), guard


def test_guarded_backward_stays_finite_at_ties_and_zeros():
    """Repeated and zero singular values: the plain formula gives inf/NaN, the guarded one finite values, and it
    equals the plain one on a pair that is not tied."""
    Q1 = torch.linalg.qr(torch.randn(8, 4, dtype=torch.float64)).Q
    Q2 = torch.linalg.qr(torch.randn(6, 4, dtype=torch.float64)).Q
    S = torch.tensor([3.0, 2.0, 2.0, 0.0], dtype=torch.float64)  # a tie and a zero
    gU, gS, gV = (torch.randn(*shape, dtype=torch.float64) for shape in ((8, 4), (4,), (6, 4)))
    plain = svd_backward(Q1, S, Q2, gU, gS, gV, guard=None)
    guarded = svd_backward(Q1, S, Q2, gU, gS, gV)
    assert not torch.isfinite(plain).all()
    assert torch.isfinite(guarded).all()
    S2 = torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    assert torch.allclose(svd_backward(Q1, S2, Q2, gU, gS, gV), svd_backward(Q1, S2, Q2, gU, gS, gV, guard=None))
    # through the forward as well: an activation with a repeated singular value and a zero one
    A = (Q1 * S) @ Q2.T
    A.requires_grad_()
    y = truncate_activation(A, torch.tensor(2.5, dtype=torch.float64, requires_grad=True))
    (y ** 2).sum().backward()
    assert torch.isfinite(A.grad).all()


def test_budget_term_and_projection_keep_every_plan_within_the_rule():
    """``kept_fraction`` of integer ranks is the plan's parameter share; ``fit_ranks`` of any continuous targets
    never exceeds the uniform budget and misses it by less than one rank of one projection."""
    rnd = random.Random(0)
    shapes = {f"p{i}": (rnd.choice([32, 64, 96, 160]), rnd.choice([32, 64, 160])) for i in range(20)}
    for ratio in (0.2, 0.4, 0.6):
        uniform = {p: rank_for_ratio(m, n, ratio) for p, (m, n) in shapes.items()}
        budget = sum(r * (m + n) for r, (m, n) in zip(uniform.values(), shapes.values()))
        m = torch.tensor([mn[0] for mn in shapes.values()], dtype=torch.float64)
        n = torch.tensor([mn[1] for mn in shapes.values()], dtype=torch.float64)
        k = torch.tensor(list(uniform.values()), dtype=torch.float64)
        assert float(kept_fraction(k, m, n)) == pytest.approx(budget / float((m * n).sum()))
        for spread in (0.05, 0.3, 2.0):
            target = {p: r * rnd.uniform(1 - spread, 1 + spread) for p, r in uniform.items()}
            ranks = fit_ranks(target, shapes, budget)
            used = sum(ranks[p] * sum(shapes[p]) for p in shapes)
            assert used <= budget and budget - used < max(m + n for m, n in shapes.values())
            assert all(1 <= ranks[p] <= min(shapes[p]) for p in shapes)


def test_pca_update_is_a_rank_k_projection_and_the_truncation_for_a_shared_subspace():
    """Sequences whose inputs are orthonormal (``X^T X = c^2 I``) share one output subspace, ``W``'s top-k left
    singular vectors: the stage-2 update ``V V^T W`` is then ``W``'s rank-k truncation; it is idempotent, rank k."""
    torch.manual_seed(2)
    m, n, k, L = 12, 10, 4, 16
    Uw = torch.linalg.qr(torch.randn(m, n, dtype=torch.float64)).Q
    Vw = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64)).Q
    s = torch.tensor([10.0, 9.0, 8.0, 7.0, 0.1, 0.09, 0.08, 0.07, 0.06, 0.05], dtype=torch.float64)
    lin = nn.Linear(n, m, bias=False).double()
    lin.weight.data = (Uw * s) @ Vw.T  # a clear gap after k: the randomized SVD finds the top-k subspace
    mod = _Collecting(lin, k, float(k), beta=10.0, niter=2, dtype=torch.float64, seed=0)
    for c in range(1, 6):
        mod(torch.linalg.qr(torch.randn(L, n, dtype=torch.float64)).Q[None] * c)
    assert mod.count == 5 * k
    W = lin.weight.detach()
    V = principal_subspace(mod.moment, k)
    A, B = pca_factors(W, V)
    P = V @ V.T
    assert torch.allclose(P @ P, P, atol=1e-12) and int(torch.linalg.matrix_rank(A @ B)) == k
    assert torch.allclose(A @ B, (Uw[:, :k] * s[:k]) @ Vw[:, :k].T, atol=1e-6)
    # a plain projection of rank k for any moment (random vectors): idempotent, rank k
    R = torch.randn(m, 30, dtype=torch.float64)
    V2 = principal_subspace(R @ R.T, k, R.sum(1), 30)
    P2 = V2 @ V2.T
    assert torch.allclose(P2 @ P2, P2, atol=1e-12) and int(torch.linalg.matrix_rank(P2)) == k


def test_stage2_truncates_at_the_activation_rank_rr_stands_for():
    """Under ``rr=true`` a weight rank ``k`` stands for activation rank ``k / RR``: each sequence gives
    ``ceil(k / RR)`` directions (its code's ``ceil(gamma)``) and the PCA still keeps ``k``; without a rank ratio the
    stream is the ``RR = 1`` one, draw for draw."""
    torch.manual_seed(3)
    model = tiny_llama(num_key_value_heads=2).eval()
    layout = layout_for(model)
    ids = calib_batch(n=3, seqlen=32)
    ranks = plan_ranks(model, layout, 0.4)
    cfg = EngineConfig(device=torch.device("cpu"), batch_size=3)
    plain = truncated_stream_subspaces(model, layout, ranks, ids, cfg, 10.0, 2, False, torch.float32, 0)
    ones = truncated_stream_subspaces(model, layout, ranks, ids, cfg, 10.0, 2, False, torch.float32, 0,
                                      {p: 1.0 for p in ranks})
    assert all(torch.equal(plain[p], ones[p]) for p in ranks)
    counts: dict[str, int] = {}
    original = _Collecting.forward

    def counting(self, x):
        out = original(self, x)
        counts[id(self.lin)] = self.count
        return out

    rr = {p: 2.5 for p in ranks}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_Collecting, "forward", counting)
        halved = truncated_stream_subspaces(model, layout, ranks, ids, cfg, 10.0, 2, False, torch.float32, 0, rr)
    for p, k in ranks.items():
        m = model.get_submodule(p).weight.shape[0]
        assert halved[p].shape == plain[p].shape == (m, k)
        assert counts[id(model.get_submodule(p))] == 3 * min(math.ceil(k / 2.5), 32, m)


def test_trainings_of_another_precision_or_device_do_not_share_a_cache_entry(tmp_path, monkeypatch):
    """The learned positions depend on the forward they are learned through: a float64 model (or another device)
    gets its own cache entry, while a float32 CPU training keeps the key it had before either entered it."""
    import saes.engine.allocators.dobi as dobi

    keys: list[dict] = []

    def capture(*args):
        keys.append(args[-1])
        raise KeyboardInterrupt

    monkeypatch.setattr(dobi, "train_positions", capture)
    allocator = dobi.Dobi(windows=2, seqlen=64, select_windows=1)
    allocator.use_text(lambda n, L: calib_batch(n=n, seqlen=L))
    model = tiny_llama(num_key_value_heads=2).eval()
    layout = layout_for(model)
    for dtype, device in ((torch.float32, "cpu"), (torch.float64, "cpu"), (torch.float32, "meta")):
        cfg = EngineConfig(device=torch.device(device), cache_dir=tmp_path, model_identity="tiny")
        with pytest.raises(KeyboardInterrupt):
            allocator.plan(model.to(dtype), layout, 0.4, calib_batch(), cfg, None)
    float32, float64, other_device = keys
    assert "model_dtype" not in float32 and "device" not in float32
    assert float64["model_dtype"] == "torch.float64" and other_device["device"] == "meta"
    assert len({json.dumps(k, sort_keys=True) for k in keys}) == 3


def test_training_resumes_to_the_uninterrupted_result(tmp_path):
    """Stage 1 stopped after step 2 of 4 and resumed from its per-step checkpoint ends where an uninterrupted
    run ends (the same gammas, snapshot and history), and the gammas moved."""
    model = tiny_llama(num_key_value_heads=2).eval()
    layout = layout_for(model)
    uniform = plan_ranks(model, layout, 0.4)
    names = list(uniform)
    shapes = {p: tuple(model.get_submodule(p).weight.shape) for p in names}
    budget = sum(r * sum(shapes[p]) for p, r in uniform.items())
    total = sum(a * b for a, b in shapes.values())
    rho0 = torch.tensor([uniform[p] / min(shapes[p]) for p in names], dtype=torch.float64)
    ids = calib_batch(n=6, seqlen=64)
    settings = DobiTraining(epochs=2, accum=2, select_every=2, lr=0.05, min_lr=0.04)

    def train(path, on_step=None):
        return train_positions(model, names, shapes, {p: 1.0 for p in names}, rho0, budget / total, ids[:4], ids[4:],
                               settings, torch.device("cpu"), torch.float32, path, {"k": 1}, on_step)

    whole = train(tmp_path / "whole.json")

    def stop(step):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "stopped.json", stop)
    resumed = train(tmp_path / "stopped.json")
    assert resumed["final_rho"] == whole["final_rho"] and resumed["best"] == whole["best"]
    assert resumed["history"] == whole["history"] and len(whole["history"]) == 4
    assert resumed["lam"] == whole["lam"] and whole["lam"] > 0  # lam=auto: set at the first step, kept on resume
    assert max(abs(a - b) for a, b in zip(whole["final_rho"], rho0.tolist())) > 1e-3
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_a_non_finite_gradient_stops_training_before_the_step_and_the_checkpoint_stays_finite(tmp_path):
    """A gradient that overflows (here: an infinite one injected behind a finite loss from step 2 on) is refused
    before Adam's step, so the per-step checkpoint, which a rerun resumes, keeps step 1's finite state."""
    model = tiny_llama(num_key_value_heads=2).eval()
    layout = layout_for(model)
    uniform = plan_ranks(model, layout, 0.4)
    names = list(uniform)
    shapes = {p: tuple(model.get_submodule(p).weight.shape) for p in names}
    rho0 = torch.tensor([uniform[p] / min(shapes[p]) for p in names], dtype=torch.float64)
    ids = calib_batch(n=6, seqlen=64)
    armed = {"on": False}

    class InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("inf") if armed["on"] else g

    hook = model.model.norm.register_forward_hook(lambda _m, _a, out: InfGrad.apply(out))
    path = tmp_path / "stage1.json"
    try:
        with pytest.raises(FloatingPointError, match=r"gradient at step 1 is not finite$"):
            train_positions(model, names, shapes, {p: 1.0 for p in names}, rho0, 0.6, ids[:4], ids[4:],
                            DobiTraining(epochs=2, accum=2, select_every=2), torch.device("cpu"), torch.float32,
                            path, {"k": 1}, lambda step: armed.update(on=True))
    finally:
        hook.remove()
    saved = json.loads(path.read_text())
    assert saved["step"] == 1 and all(math.isfinite(r) for r in saved["rho"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ("dobisvd", "svd", "fwsvd", "asvd", "svdllm", "svdllm_update", "adasvd", "saes",
                                    "dipsvd", "ercsvd"))
def test_dobi_ranks_with_every_method_keep_the_budget(tmp_path_factory, method):
    """``method.rank_alloc=dobi`` with any method (one training, cached for all of them), and ``method=dobisvd``:
    the plan keeps the budget rule, the record holds the kept fraction before and after the projection."""
    results = tmp_path_factory.getbasetemp() / "dobi_every_method"
    extra = ["method.plc.k=null"] if method == "ercsvd" else []
    rec = run(make_cfg(f"method={method}", "ratio=0.4", "method.rank_alloc=dobi", *SMALL, *extra,
                       results_dir=results))
    layers = rec["layers"].values()
    budget = sum(rank_for_ratio(d["m"], d["n"], 0.4) * (d["m"] + d["n"]) for d in layers)
    used = sum(d["rank"] * (d["m"] + d["n"]) for d in layers)
    assert used <= budget and budget - used < max(d["m"] + d["n"] for d in layers)
    alloc = rec["params"]["allocation"]
    assert alloc["kept_after_projection"] <= alloc["target_kept"] and 0 < alloc["kept_before_projection"] < 1
    assert len(list((results / "cache" / "dobi").glob("*.json"))) == 1
    assert 1 < rec["metrics"]["ppl"]["wiki_books"]["compressed"] < float("inf")


def test_dobisvd_end_to_end_records_remap_as_memory(tmp_path):
    rec = run(make_cfg("method=dobisvd", "ratio=0.2", "method.remap=true", *SMALL, results_dir=tmp_path))
    params = rec["params"]
    assert params["rank_alloc"] == "mixed" and 0.2 <= params["linears_ratio"] < 0.25  # parameters: the budget
    remap = params["remap"]
    assert remap["bytes"] < remap["fp16_factor_bytes"] and remap["memory_ratio"] < 1 - params["linears_ratio"]
    assert all(0 < d["retained_energy"] <= 1 + 1e-9 for d in rec["layers"].values())


@pytest.mark.parametrize("overrides, match", [
    (("method.rank_alloc=dobi", "method.dobi.lam=0"), "method.dobi.lam"),
    (("method.rank_alloc=dobi", "method.dobi.lam=-3"), "method.dobi.lam"),
    (("method.rank_alloc=dobi", "method.dobi.seqlen=48"), "method.dobi.seqlen"),  # below 64 without rr
    (("method=dobisvd", "method.dobi.seqlen=48"), "method.dobi.seqlen"),
    (("method.rank_alloc=dobi", "ratio=0.999"), "ratio"),  # an impossible target: ranks round to 0
    (("method.rank_alloc=dobi", "method.dobi.epochs=0"), "method.dobi.epochs"),
    (("method.rank_alloc=dobi", "+method.dobi.size=3"), "method.rank_alloc=dobi"),
])
def test_bad_dobi_settings_are_named_before_the_model_loads(tmp_path, monkeypatch, overrides, match):
    import saes.runs.pipeline as pipeline

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline, "load_model", no_loading)
    ratio = [o for o in overrides if o.startswith("ratio=")] or ["ratio=0.4"]
    cfg = make_cfg(*(o for o in overrides if o.startswith("method=")), *ratio,
                   *(o for o in overrides if not o.startswith(("method=", "ratio="))), results_dir=tmp_path)
    with pytest.raises(ValueError, match=match):
        run(cfg)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("method", ("svdllm", "dobisvd"))
def test_rr_allows_short_windows(tmp_path, monkeypatch, method):
    """With ``rr=true`` a window shorter than a projection's smaller dimension is accepted (``RR = min / L``): the
    weight rank is ``RR gamma``, the plan keeps the budget, and Dobi-SVD's stage 2 receives the plan's ``RR``."""
    import baselines.dobisvd
    from saes.runs.job import prepare
    seen: dict[str, float] = {}
    stream = baselines.dobisvd.truncated_stream_subspaces

    def recording(*args):
        seen.update(args[-1])
        return stream(*args)

    monkeypatch.setattr(baselines.dobisvd, "truncated_stream_subspaces", recording)
    cfg = make_cfg(f"method={method}", "method.rank_alloc=dobi", *SMALL, "method.dobi.seqlen=48",
                   "method.dobi.rr=true", results_dir=tmp_path)
    allocator = prepare(cfg).allocator
    assert allocator.rank_ratio(64, 160) == pytest.approx(64 / 48) and allocator.rank_ratio(32, 64) == 1.0
    rec = run(cfg)
    if method == "dobisvd":
        assert seen["model.layers.0.self_attn.q_proj"] == pytest.approx(64 / 48)
    q = rec["layers"]["model.layers.0.self_attn.q_proj"]
    assert q["dobi_rank"] == pytest.approx(q["dobi_gamma"] * 64 / 48)
    alloc = rec["params"]["allocation"]
    assert alloc["kept_after_projection"] <= alloc["target_kept"] and abs(alloc["gap_before_projection"]) < 0.01


def test_lam_auto_holds_the_budget_within_0002():
    """``lam=auto`` (2 x the multiplier estimated at the first step) keeps the continuous plan's kept fraction within
    0.002 of the target once the first steps' swing is over (24 steps on the tiny model, ratios 0.2 and 0.4)."""
    model = tiny_llama(num_key_value_heads=2).eval()
    layout = layout_for(model)
    ids = calib_batch(n=10, seqlen=64)
    for ratio in (0.2, 0.4):
        uniform = plan_ranks(model, layout, ratio)
        names = list(uniform)
        shapes = {p: tuple(model.get_submodule(p).weight.shape) for p in names}
        target = sum(r * sum(shapes[p]) for p, r in uniform.items()) / sum(a * b for a, b in shapes.values())
        rho0 = torch.tensor([uniform[p] / min(shapes[p]) for p in names], dtype=torch.float64)
        out = train_positions(model, names, shapes, {p: 1.0 for p in names}, rho0, target, ids[:8], ids[8:],
                              DobiTraining(epochs=6, accum=2, select_every=4), torch.device("cpu"), torch.float32,
                              None, {})
        assert all(abs(h["kept"] - target) < 0.002 for h in out["history"][8:]), [h["kept"] for h in out["history"]]
        assert abs(out["best"]["kept"] - target) < 0.003
