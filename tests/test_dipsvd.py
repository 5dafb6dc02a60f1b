"""Dip-SVD's local protection against its defining properties (baselines/dipsvd.py)."""

from __future__ import annotations

import pytest
import torch

from baselines.dipsvd import DipSVD, protected_channels, weighted_whitener
from baselines.svdllm import SVDLLM
from saes.core.stats import SiteStats

from .conftest import layer_problem


def _problem(m: int = 24, n: int = 32, tokens: int = 256, seed: int = 0) -> tuple[torch.Tensor, SiteStats]:
    return layer_problem(m, n, tokens, seed, spread=2)


def _loss(W: torch.Tensor, AB: torch.Tensor, P: torch.Tensor) -> float:
    """``tr((W - AB) P (W - AB)^T)``: the whitened truncation loss for the Gram ``P``."""
    E = W - AB
    return float((E @ P * E).sum())


def test_weight_one_is_svdllm() -> None:
    W, stats = _problem()
    for rank in (1, 5, 12):
        dip = DipSVD(channel_weight=1.0).factorize(W, stats, rank)
        ref = SVDLLM().factorize(W, stats, rank)
        torch.testing.assert_close(dip.A @ dip.B, ref.A @ ref.B, rtol=1e-9, atol=1e-9)


def test_whitener_squares_to_the_weighted_gram_and_inverts() -> None:
    _, stats = _problem()
    C, C_inv = weighted_whitener(stats.H, 0.1, 30.0)
    d = torch.ones(stats.H.shape[0], dtype=torch.float64)
    d[protected_channels(stats.H, 0.1)] = 30.0
    M = stats.H * d[None, :]
    P = C @ C.mT  # = (M M^T)^{1/2}
    torch.testing.assert_close(P @ P, M @ M.mT, rtol=1e-8, atol=1e-6)
    torch.testing.assert_close(C @ C_inv, torch.eye(C.shape[0], dtype=torch.float64), rtol=0, atol=1e-8)


def test_each_method_wins_its_own_loss() -> None:
    """Dip-SVD is the exact minimiser of the protected loss, SVD-LLM of the plain one: neither beats the other there."""
    W, stats = _problem(seed=1)
    rank = 6
    dip = DipSVD(channel_bar=0.1, channel_weight=30.0).factorize(W, stats, rank)
    ref = SVDLLM().factorize(W, stats, rank)
    C, _ = weighted_whitener(stats.H, 0.1, 30.0)
    P = C @ C.mT
    assert _loss(W, dip.A @ dip.B, P) < _loss(W, ref.A @ ref.B, P)
    assert _loss(W, ref.A @ ref.B, stats.H) < _loss(W, dip.A @ dip.B, stats.H)
    # and no other rank-r factor beats the closed form on its own loss
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        AB = (dip.A + 0.01 * torch.randn(dip.A.shape, generator=g, dtype=torch.float64)) @ dip.B
        assert _loss(W, dip.A @ dip.B, P) <= _loss(W, AB, P)


def test_protected_channels_are_the_largest_columns() -> None:
    _, stats = _problem(n=40)
    idx = protected_channels(stats.H, 0.1)
    assert len(idx) == 4  # floor(0.1 * 40)
    norms = torch.linalg.vector_norm(stats.H, dim=0)
    assert norms[idx].min() >= norms[[j for j in range(40) if j not in set(idx.tolist())]].max()


@pytest.mark.parametrize("kw, key", [({"channel_bar": 0.0}, "channel_bar"), ({"channel_bar": 1.0}, "channel_bar"),
                                     ({"channel_weight": 0.5}, "channel_weight")])
def test_bad_hyper_parameters_are_named(kw: dict, key: str) -> None:
    with pytest.raises(ValueError, match=f"method.{key}"):
        DipSVD(**kw)


# ---- global protection (method.rank_alloc=dip, saes/engine/allocators/dip.py) -------------------------------
def test_dip_retentions_keep_the_budget_mean_and_the_clip() -> None:
    from saes.engine.allocators import dip_keep
    gen = torch.Generator().manual_seed(0)
    g, e = (torch.rand(30, generator=gen) + 0.1).tolist(), (torch.rand(30, generator=gen) * 100).tolist()
    sizes = (torch.rand(30, generator=gen) + 0.5).tolist()
    for ratio in (0.2, 0.4, 0.6):
        keep = torch.tensor(dip_keep(g, e, ratio, weights=sizes), dtype=torch.float64)
        w = torch.tensor(sizes, dtype=torch.float64)
        assert float((w * keep).sum() / w.sum()) == pytest.approx(1 - ratio, abs=1e-9)
        assert 0.3 - 1e-12 <= float(keep.min()) and float(keep.max()) <= 0.98 + 1e-12
        assert float(keep.max() - keep.min()) > 0.1  # the scores do tell the blocks apart
    # 1 - ratio at or below the clip's floor: its code's rescaling ends with every block at 1 - ratio
    assert dip_keep(g, e, 0.8, weights=sizes) == pytest.approx([0.2] * 30)


def _source_normalisation(a: list[float], target_sum: float) -> list[float]:
    """Dip-SVD's own rescaling loop as its heuristic describes it (25 clipped rescalings to [0.3, 0.98] until the
    sum is within 1e-5, then one more rescaling clipped to [0, 1]), restated to check our bisection against."""
    x = torch.tensor(a, dtype=torch.float64)
    for _ in range(25):
        if abs(float(x.sum()) - target_sum) < 1e-5:
            break
        x = (x * target_sum / x.sum()).clamp(0.3, 0.98)
    if abs(float(x.sum()) - target_sum) > 1e-5:
        x = (x + (target_sum - x.sum()) * x / x.sum()).clamp(0.0, 1.0)
    return x.tolist()


def test_dip_rescaling_matches_its_codes_loop_where_that_converges() -> None:
    from saes.engine.allocators import dip_keep, dip_spread
    gen = torch.Generator().manual_seed(4)
    g, e = (torch.rand(32, generator=gen) + 0.1).tolist(), (torch.rand(32, generator=gen) * 100).tolist()
    for ratio in (0.2, 0.4, 0.6):
        spread = dip_spread(g, e, ratio)
        assert dip_keep(g, e, ratio) == pytest.approx(_source_normalisation(spread, 32 * (1 - ratio)), abs=1e-4)


def test_dip_retentions_follow_both_scores() -> None:
    """Within one depth segment, a block with a smaller gradient sensitivity and a smaller effective rank than
    another keeps more; only the segments' relative sensitivities matter (each is normalised within its segment)."""
    from saes.engine.allocators import dip_keep
    gen = torch.Generator().manual_seed(1)
    g, e = (torch.rand(16, generator=gen) + 0.1), (torch.rand(16, generator=gen) * 50 + 10)
    keep = dip_keep(g.tolist(), e.tolist(), 0.4, min_keep=0.0, max_keep=1.0)
    for seg in range(4):
        idx = range(4 * seg, 4 * seg + 4)
        for a in idx:
            for b in idx:
                if g[a] < g[b] and e[a] < e[b]:
                    assert keep[a] > keep[b]
    scaled = g.clone()
    scaled[4:8] *= 7.0  # one segment's sensitivities in other units
    assert dip_keep(scaled.tolist(), e.tolist(), 0.4) == pytest.approx(dip_keep(g.tolist(), e.tolist(), 0.4), abs=1e-7)
    assert dip_keep([1.0] * 8, [5.0] * 8, 0.4) == pytest.approx([0.6] * 8)  # nothing tells them apart: uniform


@pytest.mark.parametrize("energy, want", [(0.95, 4), (0.85, 3), (0.6, 2), (0.3, 1)])
def test_effective_rank_counts_singular_values_to_the_energy(energy: float, want: int) -> None:
    from saes.engine.allocators import effective_rank
    q1, _ = torch.linalg.qr(torch.randn(40, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    q2, _ = torch.linalg.qr(torch.randn(12, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    h = q1 @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)) @ q2.T  # sums .4 .7 .9 1
    assert effective_rank(h, energy) == want


def test_dip_gradient_sensitivity_is_the_plain_sum_of_relative_gradient_norms(tiny_gqa) -> None:
    from saes.engine.allocators import DipGlobal, block_gradient_sensitivity
    from saes.engine.config import EngineConfig
    from saes.engine.layout import check_plan, layout_for, plan_ranks
    from tests.conftest import calib_batch
    model, ids = tiny_gqa, calib_batch(3, 16)
    layout = layout_for(model)
    cfg = EngineConfig(device=torch.device("cpu"), batch_size=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = block_gradient_sensitivity(model, layout, ids, cfg)
    want = [0.0] * len(model.model.layers)
    for row in ids:
        model.zero_grad()
        model(input_ids=row[None], labels=row[None]).loss.backward()
        for i, block in enumerate(model.model.layers):
            for p in layout.projections:
                W = block.get_submodule(p).weight
                want[i] += float(W.grad.double().norm()) / (float(W.detach().double().norm()) + 1e-8)
    model.zero_grad()
    assert got == pytest.approx(want, rel=1e-5)
    plan = DipGlobal(nsamples=3).plan(model, layout, 0.4, ids, cfg, DipSVD())
    check_plan(model, layout, plan.ranks)
    assert set(plan.ranks) == set(plan_ranks(model, layout, 0.4))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the plan leaves the weights alone
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # flags put back


@pytest.mark.parametrize("kwargs, match", [({"beta": 1.5}, "method.dip.beta"), ({"energy": 1.0}, "method.dip.energy"),
                                           ({"min_keep": 0.9, "max_keep": 0.5}, "min_keep"),
                                           ({"nsamples": 0}, "method.dip.nsamples")])
def test_bad_dip_settings_are_named(kwargs, match) -> None:
    from saes.engine.allocators import DipGlobal
    with pytest.raises(ValueError, match=match):
        DipGlobal(**kwargs)
