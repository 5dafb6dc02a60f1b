import pytest
import torch

from saes.core.stats import StatisticsError, StreamingStats


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streaming_statistics_equal_batch_statistics(dtype):
    g = torch.Generator().manual_seed(0)
    n, N = 24, 1000
    x = torch.randn(N, n, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, n, dtype=torch.float64)
    xf = x + 0.1 * torch.randn(N, n, generator=g, dtype=torch.float64)
    acc = StreamingStats(n, {"H", "Delta", "absmean"}, dtype=dtype)
    start = 0
    for size in (1, 7, 300, 92, 600):  # uneven batches, 3-d shapes as the engine sees them
        acc.update(x[start:start + size].to(dtype).reshape(1, size, n), xf[start:start + size].to(dtype))
        start += size
    assert start == N
    stats = acc.finalize("site")
    H_ref = x.T @ x / N  # paper: X X^T with tokens as columns
    D_ref = (xf - x).T @ x / N  # (X^f - X) X^T
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    assert stats.tokens == N
    torch.testing.assert_close(stats.H.double(), H_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(stats.Delta.double(), D_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(stats.absmean.double(), x.abs().mean(0), rtol=tol, atol=tol)


def test_delta_is_zero_when_both_streams_agree():
    x = torch.randn(50, 8)
    acc = StreamingStats(8, {"H", "Delta"})
    acc.update(x, x.clone())
    assert torch.count_nonzero(acc.finalize().Delta) == 0


def test_non_finite_statistics_are_rejected_with_the_site_name():
    acc = StreamingStats(4, {"H"})
    acc.update(torch.tensor([[1.0, float("inf"), 0.0, 0.0]]))
    with pytest.raises(StatisticsError, match="layers.3.q_proj"):
        acc.finalize("layers.3.q_proj")


def test_empty_statistics_are_rejected():
    with pytest.raises(StatisticsError, match="no tokens"):
        StreamingStats(4, {"H"}).finalize("x")


def test_delta_without_fp_input_is_an_error():
    with pytest.raises(StatisticsError, match="FP-stream"):
        StreamingStats(4, {"H", "Delta"}).update(torch.randn(3, 4))


def test_only_the_requested_statistics_are_kept():
    acc = StreamingStats(4, {"absmean"})
    acc.update(torch.randn(10, 4))
    stats = acc.finalize()
    assert stats.H is None and stats.Delta is None and stats.absmean.shape == (4,)
    with pytest.raises(StatisticsError, match="unknown statistics"):
        StreamingStats(4, {"fisher"})


@pytest.mark.parametrize("n", [64, 300, 576, 1000, 3100])
def test_h_by_upper_block_rows_is_the_symmetric_full_product(n):
    """H accumulates only its upper block triangle (fewer flops) and is mirrored at the end: exactly
    symmetric, and equal to the full x^T x / N over all batches."""
    g = torch.Generator().manual_seed(n)
    batches = [torch.randn(40, n, generator=g) for _ in range(3)]
    acc = StreamingStats(n, {"H"}, dtype=torch.float64)
    for x in batches:
        acc.update(x)
    H = acc.finalize().H
    x = torch.cat(batches).double()
    assert torch.equal(H, H.mT)
    torch.testing.assert_close(H, x.mT @ x / x.shape[0], rtol=1e-12, atol=1e-12)
