import pytest
import torch
from torch import nn

from saes import LowRankLinear, rank_for_ratio
from saes.core.linalg import truncated_svd
from saes.core.lowrank import set_submodule
from saes.engine.layout import layout_for


@pytest.mark.parametrize("m,n", [(576, 576), (192, 576), (1536, 576), (4096, 11008), (70, 30), (64, 64)])
@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.4, 0.5, 0.6, 0.8])
def test_rank_for_ratio_is_the_largest_rank_within_the_parameter_budget(m, n, ratio):
    r = rank_for_ratio(m, n, ratio)
    budget = (1 - ratio) * m * n
    assert r * (m + n) <= budget + 1e-6
    assert (r + 1) * (m + n) > budget
    # the parameter count the engine will report
    assert 1 - r * (m + n) / (m * n) >= ratio - 1e-9


def test_rank_for_ratio_exact_products_do_not_lose_a_rank():
    assert rank_for_ratio(64, 64, 0.5) == 16  # 0.5 * 64 * 64 / 128 exactly


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_rank_for_ratio_rejects_ratios_outside_the_open_interval(ratio):
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        rank_for_ratio(64, 64, ratio)


def test_rank_for_ratio_rejects_a_rank_that_rounds_to_zero():
    with pytest.raises(ValueError, match="rank 0"):
        rank_for_ratio(3, 3, 0.9)


def test_low_rank_linear_keeps_the_bias_and_is_exact_at_full_rank():
    torch.manual_seed(0)
    dense = nn.Linear(12, 8, bias=True).double()
    A, B = truncated_svd(dense.weight.detach(), 8).factors()
    lr = LowRankLinear.from_factors(A, B, dense.bias.detach())
    x = torch.randn(5, 3, 12, dtype=torch.float64)
    torch.testing.assert_close(lr(x), dense(x))
    assert lr.A.bias is not None and sum(p.numel() for p in lr.parameters()) == 8 * (12 + 8) + 8


def test_full_rank_low_rank_model_gives_the_dense_logits(tiny_gqa):
    ids = torch.randint(0, 258, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_gqa(ids).logits
        layout = layout_for(tiny_gqa)
        for block in tiny_gqa.get_submodule(layout.layers):
            for name in layout.projections:
                W = block.get_submodule(name).weight.detach().double()
                A, B = truncated_svd(W, min(W.shape)).factors()
                set_submodule(block, name, LowRankLinear.from_factors(A.float(), B.float()))
        out = tiny_gqa(ids).logits
    assert all(isinstance(block.self_attn.k_proj, LowRankLinear) for block in tiny_gqa.model.layers)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
