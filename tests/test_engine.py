"""The two-stream sequential engine on tiny random LLaMAs."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from baselines.svd import SVD
from saes.engine import EngineConfig, UnsupportedModelError, compress_model, layout_for, plan_ranks
from saes.lowrank import LowRankLinear
from saes.method import Factors, Method
from saes.saes import SAES
from saes.stats import SiteStats

from .conftest import calib_batch

CPU = torch.device("cpu")


class Spy(Method):
    """Records the statistics the engine hands over, then factorises by plain SVD."""

    def __init__(self, stream="compressed", needs=("H", "Delta")):
        super().__init__("spy")
        self.stream, self.needs, self.seen = stream, frozenset(needs), {}
        self.calls = 0

    def factorize(self, W, stats: SiteStats, rank, layer=""):
        self.calls += 1
        self.seen.setdefault(self.calls, stats)
        return SVD("svd").factorize(W, stats, rank)


def spy_stats(spy, block, group):
    """Stats seen by the first projection of ``group`` in ``block`` (7 projections per block)."""
    offsets = {"qkv": 1, "o": 4, "gate_up": 5, "down": 7}
    return spy.seen[7 * block + offsets[group]]


def test_every_projection_becomes_low_rank_with_the_planned_rank(tiny_gqa):
    layout = layout_for(tiny_gqa)
    ranks = plan_ranks(tiny_gqa, layout, 0.4)
    report = compress_model(tiny_gqa, SAES(), ranks, calib_batch(), EngineConfig(device=CPU, batch_size=2))
    for name, r in ranks.items():
        mod = tiny_gqa.get_submodule(name)
        assert isinstance(mod, LowRankLinear) and mod.rank == r
    assert tiny_gqa.model.layers[0].self_attn.k_proj.out_features == 32  # 2 kv heads x 16
    assert set(report.layers) == set(ranks)
    diag = report.layers["model.layers.1.mlp.down_proj"]
    assert 0.25 <= diag["beta"] <= 0.75 and 0 < diag["rer"] <= 1
    assert report.stream == "compressed" and report.tokens == 4 * 32


def test_delta_is_zero_with_nothing_compressed_upstream_and_not_after(tiny_gqa):
    spy = Spy()
    ranks = plan_ranks(tiny_gqa, layout_for(tiny_gqa), 0.5)
    compress_model(tiny_gqa, spy, ranks, calib_batch(), EngineConfig(device=CPU, batch_size=2))
    assert torch.count_nonzero(spy_stats(spy, 0, "qkv").Delta) == 0
    assert spy_stats(spy, 0, "o").Delta.abs().max() > 0  # o sees the compressed q, k, v
    assert spy_stats(spy, 1, "qkv").Delta.abs().max() > 0


def test_statistics_match_a_direct_computation_on_both_streams(tiny_mha):
    ids = calib_batch(n=3, seqlen=24)
    with torch.no_grad():
        hidden = tiny_mha(ids, output_hidden_states=True).hidden_states  # dense model: the FP stream
        x0 = tiny_mha.model.layers[0].input_layernorm(hidden[0]).reshape(-1, 64).double()
        x1 = tiny_mha.model.layers[1].input_layernorm(hidden[1]).reshape(-1, 64).double()
    spy = Spy(stream="fp", needs=("H",))
    ranks = plan_ranks(tiny_mha, layout_for(tiny_mha), 0.3)
    compress_model(tiny_mha, spy, ranks, ids, EngineConfig(device=CPU, batch_size=2))
    torch.testing.assert_close(spy_stats(spy, 0, "qkv").H, x0.T @ x0 / x0.shape[0], rtol=1e-5, atol=1e-6)
    # FP stream: block 1 statistics come from the dense block 0, although block 0 is compressed now
    torch.testing.assert_close(spy_stats(spy, 1, "qkv").H, x1.T @ x1 / x1.shape[0], rtol=1e-5, atol=1e-6)


def test_stream_override_and_fidelity_tracking(tiny_gqa):
    ranks = plan_ranks(tiny_gqa, layout_for(tiny_gqa), 0.5)
    spy = Spy(stream="compressed", needs=("H",))
    report = compress_model(tiny_gqa, spy, ranks, calib_batch(),
                            EngineConfig(device=CPU, stream="fp", track_fidelity=True))
    assert report.stream == "fp"
    cos = [b["cosine_fp"] for b in report.blocks]
    assert len(cos) == 2 and all(0 < c <= 1 for c in cos)


def test_data_free_method_needs_no_calibration(tiny_gqa):
    ranks = plan_ranks(tiny_gqa, layout_for(tiny_gqa), 0.2)
    report = compress_model(tiny_gqa, SVD("svd"), ranks, None, EngineConfig(device=CPU))
    assert report.stream == "none" and report.tokens == 0


def test_unknown_architecture_is_rejected_by_name():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        layout_for(gpt2)


def test_bad_factors_never_become_a_layer(tiny_gqa):
    class Broken(Method):
        def factorize(self, W, stats, rank, layer=""):
            return Factors(torch.full((W.shape[0], rank), float("nan"), dtype=W.dtype),
                           torch.zeros(rank, W.shape[1], dtype=W.dtype))

    ranks = plan_ranks(tiny_gqa, layout_for(tiny_gqa), 0.2)
    with pytest.raises(Exception, match="non-finite"):
        compress_model(tiny_gqa, Broken("broken"), ranks, None, EngineConfig(device=CPU))


def test_saes_on_the_fp_stream_sees_zero_delta_and_keeps_the_lower_bound(tiny_gqa):
    ranks = plan_ranks(tiny_gqa, layout_for(tiny_gqa), 0.4)
    report = compress_model(tiny_gqa, SAES(), ranks, calib_batch(), EngineConfig(device=CPU, stream="fp"))
    assert report.stream == "fp"
    assert {d["beta"] for d in report.layers.values()} == {0.25}  # Delta = 0: every beta ties, ACES keeps beta_min
