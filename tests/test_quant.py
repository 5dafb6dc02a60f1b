"""GPTQ after compression (``quant=gptq``, issue 16 §1): the solver's properties, every factor on the asked grid,
the record's memory, ``quant`` off leaves keys and results as they were, bad input named before loading."""

from __future__ import annotations

import pytest
import torch

from baselines.svd import SVD
from saes.core.gptq import grid, gptq, quantize
from saes.core.lowrank import LowRankLinear
from saes.engine.config import EngineConfig
from saes.engine.layout import layout_for, plan_ranks
from saes.engine.loop import compress_model
from saes.runs.pipeline import prepare, run
from saes.runs.quantize import QuantSettings, block_linears, quantize_model

from .conftest import calib_batch, make_cfg

CPU = torch.device("cpu")


def problem(m: int = 24, n: int = 96, tokens: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, tokens, generator=g) * torch.logspace(0, 1, n)[:, None]
    X[:, :] += 0.5 * X[torch.randperm(n, generator=g)]  # correlated inputs: the error feedback has work to do
    return torch.randn(m, n, generator=g), X


def distinct_per_group(W: torch.Tensor, group: int | None) -> int:
    cols = W.shape[1] if group is None else group
    return max(len(torch.unique(W[r, c:c + cols])) for r in range(W.shape[0]) for c in range(0, W.shape[1], cols))


@pytest.mark.parametrize("bits, group, sym", [(3, 32, False), (4, None, False), (2, 16, True), (8, 64, False)])
def test_gptq_puts_every_weight_on_its_group_grid(bits, group, sym):
    W, X = problem()
    res = gptq(W, X @ X.T, bits, group, sym)
    assert distinct_per_group(res.weight, group) <= 2 ** bits
    groups = 1 if group is None else -(-W.shape[1] // group)
    assert res.scale.shape == res.zero.shape == (W.shape[0], groups)
    for k in range(groups):  # each group's values are its own grid's points
        cols = slice(None) if group is None else slice(k * group, (k + 1) * group)
        Wk = res.weight[:, cols]
        torch.testing.assert_close(quantize(Wk, res.scale[:, k], res.zero[:, k], bits), Wk)


def test_gptq_is_round_to_nearest_when_the_inputs_are_uncorrelated():
    """With ``H`` diagonal there is no error to feed forward: GPTQ is round-to-nearest on the same grid."""
    W, _ = problem()
    H = torch.diag(torch.logspace(0, 2, W.shape[1]))
    res = gptq(W, H, 4, None)
    scale, zero = grid(W, 4, False)
    torch.testing.assert_close(res.weight, quantize(W, scale, zero, 4))


@pytest.mark.parametrize("seed", range(3))
def test_gptq_beats_round_to_nearest_on_the_calibration_output(seed):
    W, X = problem(seed=seed)
    res = gptq(W, X @ X.T, 3, None)
    scale, zero = grid(W, 3, False)
    rtn = quantize(W, scale, zero, 3)
    assert torch.linalg.norm((W - res.weight) @ X) < torch.linalg.norm((W - rtn) @ X)  # not a theorem: typical


def test_gptq_does_not_depend_on_the_scale_of_h_and_keeps_dead_inputs_at_zero():
    W, X = problem()
    X[5] = 0.0
    a, b = gptq(W, X @ X.T, 4, 32), gptq(W, 7.0 * X @ X.T / X.shape[1], 4, 32)
    torch.testing.assert_close(a.weight, b.weight)
    assert torch.all(a.weight[:, 5] == 0)


def test_quantize_model_quantizes_every_factor_and_dense_projection(tiny_gqa):
    model, layout = tiny_gqa, layout_for(tiny_gqa)
    ranks = plan_ranks(model, layout, 0.4)
    ranks[f"{layout.layers}.1.mlp.down_proj"] = None  # one projection left dense
    compress_model(model, SVD("svd"), ranks, calib_batch(), EngineConfig(device=CPU, batch_size=2))
    q = QuantSettings("gptq", bits=3, group_size=16, sym=False, damp=0.01, block=128)
    done = quantize_model(model, layout, calib_batch(), q, CPU, 2)
    blocks = model.get_submodule(layout.layers)
    names = [f"{layout.layers}.{i}.{s}" for i, b in enumerate(blocks) for s in block_linears(b)]
    assert sorted(done["losses"]) == sorted(names)
    assert any(n.endswith("down_proj") for n in names) and any(n.endswith("q_proj.A") for n in names)
    for i, block in enumerate(blocks):
        for s in block_linears(block):
            assert distinct_per_group(block.get_submodule(s).weight.detach(), 16) <= 8, s
    assert isinstance(blocks[0].self_attn.q_proj, LowRankLinear)
    expected = sum(q.storage_bits(*blocks[i].get_submodule(s).weight.shape)
                   for i in range(len(blocks)) for s in block_linears(blocks[i]))
    assert done["linear_bits"] == expected


def test_a_gptq_run_records_its_memory_and_ratio_zero_is_the_quantized_dense_model(tmp_path):
    rec = run(make_cfg("method=svdllm", "ratio=0.4", "quant=gptq", "quant.bits=4", "quant.group_size=32",
                       results_dir=tmp_path))
    qr = rec["quant"]
    assert qr["bits"] == 4 and 0 < qr["bits_per_dense_linear_weight"] < qr["bits_per_linear_weight"]
    # 4 bits per weight and a 16-bit scale plus a 4-bit zero per row and group of 32 columns, both factors
    bits = sum(m * r * 4 + m * -(-r // 32) * 20 + r * n * 4 + r * -(-n // 32) * 20
               for m, n, r in ((d["m"], d["n"], d["rank"]) for d in rec["layers"].values()))
    assert qr["bits_per_dense_linear_weight"] == pytest.approx(bits / rec["params"]["linears_dense"])
    assert all("gptq_loss_A" in d and "gptq_loss_B" in d for d in rec["layers"].values())
    assert 1 < rec["metrics"]["ppl"]["wiki_books"]["compressed"] < float("inf")
    dense = run(make_cfg("method=svd", "ratio=0", "quant=gptq", "quant.bits=4", "quant.group_size=32",
                         results_dir=tmp_path))
    assert dense["params"]["rank_alloc"] == "dense" and dense["params"]["linears_ratio"] == 0
    assert dense["quant"]["bits_per_dense_linear_weight"] == pytest.approx(4 + 20 / 32)
    assert all("gptq_loss" in d and d["rank"] is None for d in dense["layers"].values())


def test_quant_off_leaves_the_record_key_as_it_was(tmp_path):
    cfg = make_cfg("method=saes", "ratio=0.4", results_dir=tmp_path)
    job = prepare(cfg)
    assert "quant" not in job.config and job.quant is None  # an unset config group: absent, the key as before
    assert prepare(make_cfg("method=saes", "ratio=0.4", "quant=gptq", results_dir=tmp_path)).key != job.key


@pytest.mark.parametrize("overrides, match", [
    (("quant=gptq", "quant.bits=5"), "quant.bits"),
    (("quant=gptq", "quant.group_size=0"), "quant.group_size"),
    (("quant=gptq", "quant.damp=0"), "quant.damp"),
    (("quant=gptq", "quant.sym=maybe"), "quant.sym"),
    (("quant=gptq", "save=true"), "save"),
    (("quant=gptq", "finetune=lora"), "finetune"),
    (("ratio=0",), "quant=gptq"),
    (("quant=gptq", "ratio=0", "method.rank_alloc=adacr"), "rank_alloc"),
])
def test_bad_quant_settings_are_named_before_the_model_loads(tmp_path, monkeypatch, overrides, match):
    import saes.runs.pipeline as pipeline

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline, "load_model", no_loading)
    with pytest.raises(ValueError, match=match):
        run(make_cfg("ratio=0.4", *overrides, results_dir=tmp_path))
    assert not (tmp_path / "runs").exists()


def test_gptq_gives_the_field_librarys_quantized_weights():
    """The same ``W`` and ``H`` through llm-compressor 0.14.0.1's ``quantize_weight`` (run on CPU in a separate
    environment; its output stored in tests/data) and through ours: the same weights, bit for bit."""
    from pathlib import Path

    ref = torch.load(Path(__file__).parent / "data" / "gptq_reference.pt", weights_only=False)
    for name, s in ref["settings"].items():
        ours = gptq(ref["W"], ref["H"], s["bits"], s["group_size"], sym=False, damp=0.01, block=128)
        assert torch.equal(ours.weight, s["Q"]), name
        assert ours.loss == pytest.approx(s["loss"], rel=1e-5)
