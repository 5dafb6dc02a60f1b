"""The two-stream sequential engine on tiny random LLaMAs."""

import copy

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from baselines.svd import SVD
from saes.core.linalg import FactorizationError
from saes.core.lowrank import LowRankLinear
from saes.core.method import Factors, Method
from saes.core.stats import SiteStats
from saes.engine.config import EngineConfig
from saes.engine.layout import UnsupportedModelError, layout_for, plan_ranks
from saes.engine.loop import compress_model
from saes.saes import SAES

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


# the first projection of each true-sequential group of a block: its input site
SITES = {"qkv": "self_attn.q_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_proj", "down": "mlp.down_proj"}


def site_inputs(model: nn.Module, block: int, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs ``[N, n]`` (float64) of every input site of ``block``, read by pre-hooks in a plain forward."""
    seen: dict[str, torch.Tensor] = {}

    def keep(group: str):
        def hook(_mod: nn.Module, args: tuple) -> None:
            seen[group] = args[0].reshape(-1, args[0].shape[-1]).double()
        return hook

    layer = model.model.layers[block]
    handles = [layer.get_submodule(site).register_forward_pre_hook(keep(group)) for group, site in SITES.items()]
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def assert_matches(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = 1e-5) -> None:
    """``got == want`` up to ``rtol`` of ``want``'s largest entry (the sites' scales differ by 10^4)."""
    err, scale = float((got - want).abs().max()), float(want.abs().max())
    assert scale > 0 and err <= rtol * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("rerun", [False, True], ids=["staged", "rerun"])
def test_statistics_match_a_direct_computation_on_both_streams(tiny_mha, rerun):
    """Block 1's H on both streams and Delta equal x^T x / N and (x_f - x_c)^T x_c / N of explicit forwards."""
    ids = calib_batch(n=3, seqlen=24)
    ranks = plan_ranks(tiny_mha, layout_for(tiny_mha), 0.3)
    cfg = EngineConfig(device=CPU, batch_size=2, rerun=rerun)
    x_f = site_inputs(copy.deepcopy(tiny_mha), 1, ids)  # dense block 0 (and dense block 1 up to each site)

    fp_spy = Spy(stream="fp", needs=("H",))
    compress_model(copy.deepcopy(tiny_mha), fp_spy, ranks, ids, cfg)
    spy = Spy(stream="compressed", needs=("H", "Delta"))
    compress_model(tiny_mha, spy, ranks, ids, cfg)
    # The compressed model run by hand: at each site of block 1 the engine had compressed block 0 and exactly
    # the projections upstream of that site, which is what the finished model computes there too.
    x_c = site_inputs(tiny_mha, 1, ids)

    for group in SITES:
        n_tokens = x_f[group].shape[0]
        assert n_tokens == ids.numel()
        assert_matches(spy_stats(fp_spy, 1, group).H, x_f[group].T @ x_f[group] / n_tokens, f"FP H at {group}")
        xc = x_c[group]
        assert (x_f[group] - xc).abs().max() > 1e-3 * xc.abs().max()  # the streams really differ here
        assert_matches(spy_stats(spy, 1, group).H, xc.T @ xc / n_tokens, f"compressed H at {group}")
        assert_matches(spy_stats(spy, 1, group).Delta, (x_f[group] - xc).T @ xc / n_tokens, f"Delta at {group}")


def test_stream_override_and_fidelity_tracking(tiny_gqa):
    """``stream="fp"`` overrides the method's stream; the tracked cosine shows the compressed stream drifting."""
    ranks = plan_ranks(tiny_gqa, layout_for(tiny_gqa), 0.5)
    spy = Spy(stream="compressed", needs=("H",))
    report = compress_model(tiny_gqa, spy, ranks, calib_batch(),
                            EngineConfig(device=CPU, stream="fp", track_fidelity=True))
    assert report.stream == "fp"
    cos = [b["cosine_fp"] for b in report.blocks]
    # every block is compressed (rank 0.5, plain SVD): after each, the streams differ, but not wildly
    assert len(cos) == 2 and all(0.5 < c < 0.99 for c in cos), cos


def test_each_finished_block_is_reported_to_on_block_without_changing_the_result(tiny_gqa):
    """``EngineConfig.on_block`` (the W&B mirror's live feed) gets each block's figures as the loop goes."""
    ranks = plan_ranks(tiny_gqa, layout_for(tiny_gqa), 0.5)
    plain = copy.deepcopy(tiny_gqa)
    seen: list = []
    report = compress_model(tiny_gqa, SVD("svd"), ranks, calib_batch(),
                            EngineConfig(device=CPU, track_fidelity=True, on_block=seen.append))
    assert [(b.index, b.blocks, b.kind) for b in seen] == [(0, 2, "fresh"), (1, 2, "fresh")]
    assert [b.cosine_fp for b in seen] == [b["cosine_fp"] for b in report.blocks]
    assert {n: d for b in seen for n, d in b.layers.items()} == report.layers
    assert seen[0].elapsed <= seen[1].elapsed and set(seen[1].timings) >= {"calibration", "factorisation"}
    compress_model(plain, SVD("svd"), ranks, calib_batch(), EngineConfig(device=CPU, track_fidelity=True))
    for a, b in zip(tiny_gqa.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)


def test_data_free_method_needs_no_calibration(tiny_gqa):
    ranks = plan_ranks(tiny_gqa, layout_for(tiny_gqa), 0.2)
    report = compress_model(tiny_gqa, SVD("svd"), ranks, None, EngineConfig(device=CPU))
    assert report.stream == "none" and report.tokens == 0


def test_unknown_architecture_is_rejected_by_name():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        layout_for(gpt2)


def test_bad_factors_never_become_a_layer(tiny_gqa):
    """Non-finite factors raise FactorizationError naming the layer; the dense nn.Linear stays, weights unchanged."""
    class Broken(Method):
        def factorize(self, W, stats, rank, layer=""):
            return Factors(torch.full((W.shape[0], rank), float("nan"), dtype=W.dtype),
                           torch.zeros(rank, W.shape[1], dtype=W.dtype))

    ranks = plan_ranks(tiny_gqa, layout_for(tiny_gqa), 0.2)
    before = {name: tiny_gqa.get_submodule(name) for name in ranks}
    weights = {name: mod.weight.detach().clone() for name, mod in before.items()}
    with pytest.raises(FactorizationError, match=r"model\.layers\.0\.self_attn\.q_proj: A has non-finite"):
        compress_model(tiny_gqa, Broken("broken"), ranks, None, EngineConfig(device=CPU))
    for name, dense in before.items():
        now = tiny_gqa.get_submodule(name)
        assert now is dense and type(now) is nn.Linear, f"{name} is {type(now).__name__}"
        assert torch.equal(now.weight, weights[name])


def test_factors_that_overflow_the_model_dtype_never_become_a_layer(tiny_gqa):
    """Factors finite in float64 but not in the model's float32 (1e60) are refused, not installed as inf."""
    class Huge(Method):
        def __init__(self):
            super().__init__("huge", "float64")

        def factorize(self, W, stats, rank, layer=""):
            return Factors(torch.full((W.shape[0], rank), 1e60, dtype=W.dtype),
                           torch.full((rank, W.shape[1]), 1e-60, dtype=W.dtype))

    ranks = plan_ranks(tiny_gqa, layout_for(tiny_gqa), 0.2)
    with pytest.raises(FactorizationError, match=r"model\.layers\.0\.self_attn\.q_proj: A has non-finite"):
        compress_model(tiny_gqa, Huge(), ranks, None, EngineConfig(device=CPU))
    assert type(tiny_gqa.get_submodule("model.layers.0.self_attn.q_proj")) is nn.Linear


def test_saes_on_the_fp_stream_sees_zero_delta_and_keeps_the_lower_bound(tiny_gqa):
    ranks = plan_ranks(tiny_gqa, layout_for(tiny_gqa), 0.4)
    report = compress_model(tiny_gqa, SAES(), ranks, calib_batch(), EngineConfig(device=CPU, stream="fp"))
    assert report.stream == "fp"
    assert {d["beta"] for d in report.layers.values()} == {0.25}  # Delta = 0: every beta ties, ACES keeps beta_min
