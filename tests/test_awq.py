"""AWQ (``quant=awq``, issue 28 §2): equal to AutoAWQ 0.2.9 on the stored reference, scaling alone leaves the
model's logits unchanged (dense, low rank, Gemma's ``1 + w`` norms), no worse than round-to-nearest, the search
result re-applies, the scale groups of low-rank blocks, bad settings named before loading, runs end to end."""

from __future__ import annotations

import copy

import pytest
import torch

from baselines.svd import SVD
from saes.core import awq
from saes.core.lowrank import LowRankLinear
from saes.engine.config import EngineConfig
from saes.engine.layout import BlockLayout, layout_for, plan_ranks
from saes.engine.loop import compress_model
from saes.engine.propagate import capture_block_inputs
from saes.runs.awq import apply_block, awq_model, block_linears, is_offset_norm, scale_groups, search_block
from saes.runs.pipeline import run

from .awq_reference import PATH, calibration, tiny_llama
from .conftest import calib_batch, make_cfg

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def reference() -> dict:
    return torch.load(PATH, weights_only=False)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def scales_only(model: torch.nn.Module, ids: torch.Tensor, layout: BlockLayout | None = None) -> None:
    """Search every block on ``ids`` and fold the scales alone (no clip, no rounding) into the model."""
    layout = layout or layout_for(model)
    blocks = model.get_submodule(layout.layers)
    xs, kws = capture_block_inputs(model, blocks, ids, 2, CPU, CPU)
    for i, block in enumerate(blocks):
        found, xs = search_block(block, layout, xs, kws[i], bits=3, group_size=16, clip=False)
        assert found["clips"] == {} and len(found["scales"]) >= 3
        apply_block(block, found, None, 16)


@pytest.mark.parametrize("key", ["4b_g32", "3b_g64"])
def test_awq_equals_autoawq_on_the_stored_reference(reference, key):
    """AutoAWQ 0.2.9's search on the seeded tiny LLaMA (tests/awq_reference.py, run once in a throwaway
    environment) and ours: the same grid point per group, the same scales, grid losses, clips, folded norms and
    fake-quantized weights (bit for bit where it was made; elsewhere float drift may flip a near-tie of the clip
    search or a weight on a rounding boundary: bounded by near_ties and 1 in 1000)."""
    ref = reference["settings"][key]
    model = tiny_llama()
    done = awq_model(model, layout_for(model), reference["calib"], ref["bits"], ref["group_size"], CPU, 8)
    ours = [(i, g) for i, found in enumerate(done["blocks"]) for g in found["scales"]]
    assert [(i, g["prev"], tuple(g["linears"])) for i, g in ours] == \
           [(r["block"], r["prev"], tuple(r["linears"])) for r in ref["groups"]]
    assert any(r["ratio_index"] > 0 for r in ref["groups"])  # the search chose something besides a = 0
    for (i, g), r in zip(ours, ref["groups"]):
        assert round(g["ratio"] * 20) == r["ratio_index"], (i, g["prev"])
        torch.testing.assert_close(g["scales"], r["scales"], rtol=1e-5, atol=1e-6)
        assert g["losses"] == pytest.approx(r["losses"], rel=1e-5)
    clips = {f"model.layers.{i}.{name}": c
             for i, found in enumerate(done["blocks"]) for name, c in found["clips"].items()}
    assert sorted(clips) == sorted(ref["clips"])  # every linear but q and k
    flipped = {name: near_ties(clips[name], c) for name, c in ref["clips"].items()}
    cells = torch.cat([f.flatten() for f in flipped.values()])
    assert cells.float().mean() <= 0.03, f"{int(cells.sum())} of {cells.numel()} clip values differ"
    modules = dict(model.named_modules())
    off = []  # equal outside the (row, group) cells whose clip flipped; a weight on a rounding boundary may round
    for name, w in ref["fake_quantized"].items():  # the other way under float drift: 1 in 1000 at most
        mask = flipped[name].repeat_interleave(ref["group_size"], 1) if name in flipped else torch.zeros_like(w).bool()
        keep = ~mask[:, :w.shape[1]]
        off.append(~torch.isclose(modules[name].weight.detach()[keep], w[keep], rtol=1e-5, atol=1e-6))
    off_all = torch.cat(off)
    assert off_all.float().mean() <= 1e-3, f"{int(off_all.sum())} of {off_all.numel()} weights differ"
    for name, w in ref["norms"].items():
        torch.testing.assert_close(modules[name].weight.detach(), w, rtol=1e-5, atol=1e-6)


def near_ties(ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The clip search takes an argmin over 10 grid points ``(1 - i/20) max|w|`` per (row, group); where the error
    curve is flat, candidates whose errors agree to float rounding can be ordered differently under another
    transformers release or CPU (the reference was made once, elsewhere). Each such cell must move to another point
    of the same grid (the two values' ratio is ``(1 - j/20) / (1 - i/20)``); returned: the cells that differ
    (the caller bounds them at 3% of the model's cells: per tensor, a 64-cell one would allow only one). Not
    checked: that the two errors really tie (the search's inputs are internal to it)."""
    differ = ~torch.isclose(ours, ref, rtol=1e-5, atol=1e-6)
    ratios = torch.minimum(ours, ref)[differ] / torch.maximum(ours, ref)[differ]
    grid = torch.tensor([(1 - j / 20) / (1 - i / 20) for i in range(10) for j in range(i + 1, 10)])
    assert ((ratios[:, None] - grid[None]).abs().amin(dim=1) < 1e-4).all(), "a clip value is off the search grid"
    return differ


@pytest.mark.parametrize("bits", [3, 4])
def test_awq_is_no_worse_than_round_to_nearest_on_the_calibration_inputs(bits):
    dense = tiny_llama()
    ids = calibration()
    rtn, ours = copy.deepcopy(dense), copy.deepcopy(dense)
    with torch.no_grad():
        for name in block_linears(rtn.model.layers):
            W = rtn.model.layers.get_submodule(name).weight
            W.copy_(awq.fake_quantize(W, bits, 32))
    awq_model(ours, layout_for(ours), ids, bits, 32, CPU, 4)
    ref = logits(dense, ids)
    err_rtn, err_awq = ((logits(rtn, ids) - ref) ** 2).mean(), ((logits(ours, ids) - ref) ** 2).mean()
    assert err_awq <= err_rtn, (float(err_awq), float(err_rtn))


def test_awq_of_a_low_rank_model_is_no_worse_than_round_to_nearest(tiny_mha):
    layout = layout_for(tiny_mha)
    dense = low_rank(tiny_mha)
    ids = calib_batch(8, 64, seed=3)
    rtn, ours = copy.deepcopy(dense), copy.deepcopy(dense)
    with torch.no_grad():
        for name in block_linears(rtn.model.layers):
            W = rtn.model.layers.get_submodule(name).weight
            W.copy_(awq.fake_quantize(W, 3, 16))
    awq_model(ours, layout, ids, 3, 16, CPU, 4)
    ref = logits(dense, ids)
    err_rtn, err_awq = ((logits(rtn, ids) - ref) ** 2).mean(), ((logits(ours, ids) - ref) ** 2).mean()
    assert err_awq <= err_rtn, (float(err_awq), float(err_rtn))


def test_the_scales_alone_leave_the_dense_models_logits_unchanged():
    model, ids = tiny_llama(), calibration()
    before = logits(model, ids)
    scales_only(model, ids)
    norm = model.model.layers[0].input_layernorm.weight
    assert not torch.equal(norm, tiny_llama().model.layers[0].input_layernorm.weight)  # the scales were folded in
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-4, atol=1e-4)


def low_rank(model: torch.nn.Module, ratio: float = 0.4) -> torch.nn.Module:
    layout = layout_for(model)
    ranks = plan_ranks(model, layout, ratio)
    ranks[f"{layout.layers}.1.mlp.up_proj"] = None  # one projection left dense: a mixed block
    compress_model(model, SVD("svd"), ranks, calib_batch(), EngineConfig(device=CPU, batch_size=2))
    return model


@pytest.mark.parametrize("fixture", ["tiny_gqa", "tiny_mha"])
def test_the_scales_alone_leave_a_low_rank_models_logits_unchanged(request, fixture):
    model = request.getfixturevalue(fixture)
    layout = layout_for(model)
    low_rank(model)
    ids = calib_batch()
    before = logits(model, ids)
    scales_only(model, ids, layout)
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-4, atol=1e-4)


def test_the_scales_alone_leave_a_gemma3_models_logits_unchanged():
    """Gemma's norms multiply by ``1 + w``: the scales fold as ``(1 + w) / s - 1``."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=2, head_dim=32, sliding_window=16,
                              max_position_embeddings=128)
    model = Gemma3ForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.5)
    assert is_offset_norm(model.model.layers[0].input_layernorm)
    assert not is_offset_norm(tiny_llama().model.layers[0].input_layernorm)
    ids = calib_batch()
    before = logits(model, ids)
    scales_only(model, ids)
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-4, atol=1e-4)


def test_scale_groups_of_a_low_rank_block(tiny_gqa, tiny_mha):
    layout = layout_for(tiny_gqa)
    gqa = low_rank(tiny_gqa)
    block = gqa.model.layers[1]  # up_proj left dense there
    groups = {g.prev: g for g in scale_groups(block, layout)}
    assert groups["input_layernorm"].linears == ("self_attn.q_proj.B", "self_attn.k_proj.B", "self_attn.v_proj.B")
    assert groups["input_layernorm"].inspect == "self_attn"
    assert "self_attn.v_proj.A" not in groups  # grouped-query attention: o is not scaled (AutoAWQ's rule)
    assert groups["mlp.up_proj"].linears == ("mlp.down_proj.B",)  # dense up: its rows take down's scales
    assert groups["mlp.down_proj.B"].linears == ("mlp.down_proj.A",)
    assert groups["mlp.down_proj.B"].inspect == "mlp.down_proj.A"
    assert "mlp.up_proj.B" not in groups
    lowrank = [p for p in layout.projections if isinstance(block.get_submodule(p), LowRankLinear)]
    assert sum(g.prev.endswith(".B") for g in groups.values()) == len(lowrank) == 6
    mha = low_rank(tiny_mha)
    groups = {g.prev: g for g in scale_groups(mha.model.layers[0], layout)}
    assert groups["self_attn.v_proj.A"].linears == ("self_attn.o_proj.B",)  # o after v: v's output side
    assert groups["mlp.up_proj.A"].linears == ("mlp.down_proj.B",)


def test_a_saved_search_result_reapplies_to_the_same_weights(tmp_path):
    model, ids = tiny_llama(), calibration()
    fresh = copy.deepcopy(model)
    done = awq_model(model, layout_for(model), ids, 4, 32, CPU, 4)
    torch.save(done["blocks"], tmp_path / "awq.pt")
    searched = awq_model(copy.deepcopy(fresh), layout_for(fresh), ids, 4, 32, CPU, 4, apply=False)
    assert all(torch.equal(a["scales"], b["scales"]) for x, y in zip(done["blocks"], searched["blocks"])
               for a, b in zip(x["scales"], y["scales"]))  # searching alone changes nothing it reads
    for block, found in zip(fresh.model.layers, torch.load(tmp_path / "awq.pt", weights_only=False)):
        apply_block(block, found, 4, 32)
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), name


def test_partial_groups_and_clips_keep_every_weight_on_its_grid():
    """Widths that are not a multiple of the group (a low-rank factor's rank): a last, smaller group."""
    g = torch.Generator().manual_seed(0)
    W, x = torch.randn(24, 40, generator=g), torch.randn(300, 40, generator=g)
    Q = awq.fake_quantize(W, 3, 16)
    for cols in awq.groups_of(40, 16):
        assert all(len(torch.unique(Q[r, cols])) <= 8 for r in range(24))
    assert [c.stop - c.start for c in awq.groups_of(40, 16)] == [16, 16, 8]
    max_val = awq.search_clip(W, x, 3, 16)
    assert max_val.shape == (24, 3)
    top = torch.stack([W[:, c].abs().amax(1) for c in awq.groups_of(40, 16)], 1)
    assert torch.all(max_val <= top) and torch.all(max_val >= 0.5 * top)
    err = lambda V: ((awq.fake_quantize(V, 3, 16) - W) @ x.T).pow(2).mean()  # noqa: E731
    clipped = W.clone()
    awq.clip_(clipped, max_val, 16)
    assert err(clipped) <= err(W)  # per group the clip is chosen by this error; summed it is no worse


@pytest.mark.parametrize("overrides, match", [
    (("quant.bits=5",), "quant.bits"),
    (("quant.group_size=0",), "quant.group_size"),
    (("quant.sym=true",), "quant.sym"),
    (("quant.grid=0",), "quant.grid"),
    (("quant.max_shrink=1.0",), "quant.max_shrink"),
    (("quant.clip=maybe",), "quant.clip"),
    (("quant.clip_tokens=0",), "quant.clip_tokens"),
    (("+quant.damp=0.01",), "quant.damp"),
    (("save=true",), "save"),
])
def test_bad_awq_settings_are_named_before_the_model_loads(tmp_path, monkeypatch, overrides, match):
    import saes.runs.pipeline as pipeline

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline, "load_model", no_loading)
    with pytest.raises(ValueError, match=match):
        run(make_cfg("ratio=0.4", "quant=awq", *overrides, results_dir=tmp_path))
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_awq_runs_end_to_end_dense_and_low_rank_with_records(tmp_path):
    dense = run(make_cfg("method=svd", "ratio=0", "quant=awq", "quant.group_size=32", results_dir=tmp_path))
    q = dense["quant"]
    assert dense["config"]["quant"]["method"] == "awq" and dense["params"]["rank_alloc"] == "dense"
    assert q["bits"] == 4 and q["bits_per_dense_linear_weight"] == pytest.approx(4 + 20 / 32)
    assert len(q["scale_groups"]) == 2 * 3 and q["clipped_linears"] == 2 * 5  # GQA: no o group; q, k unclipped
    assert all(0 <= g["ratio"] < 1 for g in q["scale_groups"].values())
    assert 1 < dense["metrics"]["ppl"]["wiki_books"]["compressed"] < float("inf")
    gptq = run(make_cfg("method=svd", "ratio=0", "quant=gptq", "quant.bits=4", "quant.group_size=32",
                        results_dir=tmp_path))
    assert gptq["quant"]["bits_per_dense_linear_weight"] == q["bits_per_dense_linear_weight"]  # one accounting
    assert gptq["key"] != dense["key"]
    lr = run(make_cfg("method=saes", "ratio=0.2", "quant=awq", "quant.group_size=32", results_dir=tmp_path))
    ql = lr["quant"]
    bits = sum(m * r * 4 + m * -(-r // 32) * 20 + r * n * 4 + r * -(-n // 32) * 20
               for m, n, r in ((d["m"], d["n"], d["rank"]) for d in lr["layers"].values()))
    assert ql["bits_per_dense_linear_weight"] == pytest.approx(bits / lr["params"]["linears_dense"])
    assert len(ql["scale_groups"]) == 2 * (3 + 7)  # the three dense-input groups and one per factor pair
    assert 1 < lr["metrics"]["ppl"]["wiki_books"]["compressed"] < float("inf")


def test_the_equal_memory_sweep_pairs_awq_with_the_recorded_gptq_runs():
    """``experiment=quant_memory``: 16 runs, AWQ beside every dense and low-rank GPTQ row, and the two pruning methods
    at the low-rank ratios with GPTQ 4-bit; the dense and low-rank GPTQ rows are Table 10's committed records (their
    keys unchanged by quant=awq's arrival), and AWQ 4-bit of the dense model has its record."""
    from experiments import sweeps
    from saes.runs.records import config_key

    from .conftest import ROOT

    js = sweeps.jobs("quant_memory", [], ROOT / "results")
    assert len(js) == 16 and len({config_key(j.config) for j in js}) == 16
    rows = {(j.config["quant"]["method"], j.config["method"]["name"], j.ratio, j.config["quant"]["bits"]) for j in js}
    assert rows == {(q, m, r, b) for q in ("gptq", "awq") for m, r, b in
                    (("svd", 0.0, 4), ("svd", 0.0, 3), ("saes", 0.25, 4), ("svdllm", 0.25, 4), ("saes", 0.5, 4),
                     ("svdllm", 0.5, 4))} | {("gptq", m, r, 4) for m in ("flap", "wanda_sp") for r in (0.25, 0.5)}
    for j in js:
        pruned = j.config["method"]["name"] in ("flap", "wanda_sp")
        if (j.config["quant"]["method"] == "gptq" and not pruned) or "+experiment/quant=awq4_dense" in j.overrides:
            assert j.record is not None and j.record["key"] == config_key(j.config), j.overrides


def test_awq_of_a_float16_model_runs_where_its_clip_search_starts_at_inf():
    """AutoAWQ starts the clip search's best error at 1e9 by a product, which is inf in float16; a fill with 1e9
    raised there (the first float16 run of quant=awq failed before this)."""
    from saes.core.awq import search_clip

    g = torch.Generator().manual_seed(0)
    W, x = torch.randn(8, 64, generator=g), torch.randn(40, 64, generator=g)
    clip16 = search_clip(W.half(), x.half(), 4, 32)
    assert clip16.dtype == torch.float16 and bool(torch.isfinite(clip16).all())
    torch.testing.assert_close(clip16.float(), search_clip(W, x, 4, 32), rtol=0.1, atol=0.05)
