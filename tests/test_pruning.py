"""Structured pruning (Wanda-sp, FLAP): the SVD plan's parameter count, grouped-query attention kept whole, the
importance scores against a direct computation, FLAP's bias compensation, save -> load, and bad settings."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch

from baselines.flap import FLAP
from baselines.llm_pruner import LLMPruner
from baselines.wanda_sp import WandaSP
from saes.core.pruning import (BlockShape, blockwise_plan, channel_groups, compensation_bias, flap_scores, global_plan,
                               svd_removal, top_structures, uniform_plan, wanda_sp_scores)
from saes.core.stats import StreamingStats
from saes.engine.config import EngineConfig
from saes.engine.layout import layout_for, projections
from saes.engine.prune import budget, gradient_scores, prune_model
from saes.engine.structure import OUTPUT, block_shape, block_table, channels_of, pruned_layers
from saes.inputs.models import tiny_llama
from saes.runs.checkpoint import load_compressed, save_compressed
from saes.runs.pipeline import run
from tests.conftest import calib_batch, make_cfg

CPU = EngineConfig(device=torch.device("cpu"), batch_size=2)


def gqa_model(heads: int = 8, kv_heads: int = 4) -> torch.nn.Module:
    """3 blocks, 8 query heads on 4 key/value heads (g = 2) by default, head_dim 64 / heads; the MLP small enough
    that both kinds of structure are pruned at the ratios below."""
    return tiny_llama(hidden_size=64 if heads == 8 else 48, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, seed=3).eval()


def linear_params(model: torch.nn.Module) -> int:
    layout = layout_for(model)
    return sum(model.get_submodule(p).weight.numel() for p in projections(model, layout))


LLMP = functools.partial(LLMPruner, first=0, last=0)  # every block (the end blocks: a test below)


@pytest.mark.parametrize("method", [WandaSP, FLAP, LLMP], ids=["wanda_sp", "flap", "llm_pruner"])
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.4, 0.6])
@pytest.mark.parametrize("heads, kv_heads", [(8, 4), (6, 2)])  # g = 2; g = 3 as SmolLM2's 9 / 3
def test_plan_removes_the_svd_count_within_one_structure_and_keeps_gqa_whole(method, ratio, heads, kv_heads):
    model = gqa_model(heads, kv_heads)
    layout = layout_for(model)
    target = budget(model, layout, ratio)
    largest = max(max(s.group_params, s.channel_params) for s in map(block_shape, model.model.layers))
    before = linear_params(model)
    ids = calib_batch(4, 24)
    prune_model(model, method(), ratio, ids, CPU)
    removed = before - linear_params(model)
    assert 0 <= removed - target < largest, (removed, target)
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    for block in model.model.layers:
        a, dh = block.self_attn, block.self_attn.head_dim
        kv = a.k_proj.out_features // dh
        assert kv >= 1 and a.k_proj.out_features == a.v_proj.out_features == kv * dh
        assert a.q_proj.out_features == kv * groups * dh == a.o_proj.in_features
        assert block.mlp.gate_proj.out_features == block.mlp.up_proj.out_features == block.mlp.down_proj.in_features
    assert torch.isfinite(model(ids).logits).all()


def test_some_plan_removes_heads_and_channels():
    """The property above is not vacuous: attention groups go as well as MLP channels."""
    for method in (WandaSP(), FLAP(), LLMPruner(first=0, last=0)):
        model = gqa_model()
        prune_model(model, method, 0.4, calib_batch(4, 24), CPU)
        assert any(r["attention"] > 0 for r in method.structure.remove), method.name
        assert any(r["mlp"] > 0 for r in method.structure.remove), method.name


def _stats(X: torch.Tensor):
    acc = StreamingStats(X.shape[1], {"mean", "var"}, dtype=torch.float64)
    for chunk in X.split([3, 5, 9, 7]):  # uneven batches
        acc.update(chunk)
    return acc.finalize("hand-made")


def test_streaming_mean_and_variance_equal_the_batch_ones():
    X = torch.randn(24, 6, dtype=torch.float64) * 3 + 100  # a mean that dwarfs the spread
    s = _stats(X)
    assert torch.allclose(s.mean, X.mean(0), rtol=0, atol=1e-12)
    assert torch.allclose(s.var, X.var(0, unbiased=False), rtol=1e-10)


def test_wanda_sp_scores_equal_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 8, generator=g, dtype=torch.float64)
    X = torch.randn(24, 8, generator=g, dtype=torch.float64)
    s = wanda_sp_scores(W, _stats(X))
    direct = torch.tensor([sum(abs(W[i, j]) * X[:, j].norm() for i in range(5)) / 5 for j in range(8)])
    assert torch.allclose(s, direct.double(), rtol=1e-10)
    heads = WandaSP().scores("attention", W, _stats(X), groups=2)  # two groups of four channels: sums
    assert torch.allclose(heads, torch.stack([direct[:4].sum(), direct[4:].sum()]).double(), rtol=1e-10)


def test_flap_scores_equal_a_direct_computation():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(5, 8, generator=g, dtype=torch.float64)
    X = torch.randn(24, 8, generator=g, dtype=torch.float64) * torch.arange(1, 9)
    stats = _stats(X)
    f = torch.tensor([X[:, j].var(unbiased=False) * (W[:, j] ** 2).sum() for j in range(8)], dtype=torch.float64)
    z = lambda v: (v - v.mean()) / v.std(unbiased=True)  # noqa: E731
    assert torch.allclose(flap_scores("mlp", W, stats, 2), z(f), rtol=1e-10)
    za = z(f**2)
    assert torch.allclose(flap_scores("attention", W, stats, 2), torch.stack([za[:4].mean(), za[4:].mean()]),
                          rtol=1e-10)
    assert torch.allclose(channel_groups(torch.arange(8.0), 4, "mean"), torch.tensor([0.5, 2.5, 4.5, 6.5]))


def test_budget_rules_on_hand_made_shapes():
    shapes = [BlockShape(groups=3, heads_per_group=3, head_dim=64, group_params=8 * 64 * 576, channels=1536,
                         channel_params=3 * 576)] * 4
    target = 4 * 700_000
    for plan in (uniform_plan(shapes, 0.4, target),
                 global_plan([{"attention": torch.rand(3), "mlp": torch.rand(1536)} for _ in shapes], shapes, target)):
        assert 0 <= plan.removed(shapes) - target < 8 * 64 * 576
    uniform = uniform_plan(shapes, 0.4, target)
    assert [r["attention"] for r in uniform.remove] == [1] * 4  # floor(0.4 * 3) groups per block
    assert max(r["mlp"] for r in uniform.remove) - min(r["mlp"] for r in uniform.remove) <= 1
    assert svd_removal([(576, 576)], 0.2) == 576 * 576 - 230 * 1152  # r = floor(0.8 * 576 / 2)


def test_flap_bias_keeps_the_mean_output_on_the_calibration_inputs():
    dense = gqa_model()
    ids = calib_batch(4, 24)
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = [dense.get_submodule(f"model.layers.{i}.{site}").register_forward_pre_hook(
        lambda _m, a, key=f"{i}.{site}": inputs.setdefault(key, []).append(a[0].reshape(-1, a[0].shape[-1])))
        for i in range(3) for site in OUTPUT]
    with torch.no_grad():
        for b in ids.split(2):  # the engine's batches (the FP stream: every block's dense inputs)
            dense(b)
    for h in hooks:
        h.remove()
    method = FLAP()
    pruned = copy.deepcopy(dense)
    prune_model(pruned, method, 0.4, ids, CPU)
    for i in range(3):
        shape = block_shape(dense.model.layers[i])
        for site, kind in OUTPUT.items():
            X = torch.cat(inputs[f"{i}.{site}"])
            kept = channels_of(kind, method.structure.keep[i][kind], shape)
            want = dense.get_submodule(f"model.layers.{i}.{site}")(X).mean(0)
            got = pruned.get_submodule(f"model.layers.{i}.{site}")(X[:, kept]).mean(0)
            assert torch.allclose(got, want, atol=1e-5), (i, site)
            if kept.numel() < X.shape[1]:  # without the bias the mean output moves
                W = dense.get_submodule(f"model.layers.{i}.{site}").weight
                assert not torch.allclose(X[:, kept].mean(0) @ W[:, kept].T, want, atol=1e-5)
    W, mean = torch.randn(3, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    assert torch.allclose(compensation_bias(W, mean, torch.tensor([1, 3])), W[:, [0, 2]] @ mean[[0, 2]])


@pytest.mark.parametrize("method", [WandaSP, FLAP])
def test_save_then_load_gives_the_same_logits(tmp_path, tokenizer, method):
    model = gqa_model()
    layout = layout_for(model)
    base = {p: (*model.get_submodule(p).weight.shape, model.get_submodule(p).bias is not None)
            for p in projections(model, layout)}
    ids = calib_batch(4, 24)
    prune_model(model, method(), 0.4, ids, CPU)
    folder = save_compressed(model, tokenizer, tmp_path / "m", {
        "base": "tiny", "method": {"name": method().name}, "ratio": 0.4,
        "pruned_layers": pruned_layers(model, base), "structure": block_table(model, layout.layers)})
    loaded, _, manifest = load_compressed(folder)
    assert [b["kv_heads"] for b in manifest["structure"]] == [b.self_attn.k_proj.out_features // 8
                                                              for b in model.model.layers]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("method", ["wanda_sp", "flap", "llm_pruner"])
def test_run_saves_and_a_load_run_reproduces_it(tmp_path, method):
    every_block = ("method.first=0", "method.last=0") if method == "llm_pruner" else ()  # the tiny model has 2
    rec = run(make_cfg(f"method={method}", "ratio=0.4", "save=true", *every_block, results_dir=tmp_path))
    p = rec["params"]
    assert p["linears_compressed"] < p["linears_dense"] and p["structure"]["overshoot"] >= 0
    assert p["linears_dense"] - p["linears_compressed"] == p["structure"]["removed"]
    again = run(make_cfg(f"load={rec['saved_to']}", results_dir=tmp_path))
    assert again["metrics"]["ppl"]["wiki_books"]["compressed"] == rec["metrics"]["ppl"]["wiki_books"]["compressed"]
    assert again["params"]["linears_compressed"] == p["linears_compressed"]
    assert again["params"]["model_dense"] == p["model_dense"]
    if method == "flap":  # a manifest whose ratio its pruned layers do not meet is refused
        import shutil

        from saes.runs.checkpoint import MANIFEST, CheckpointError

        edited = tmp_path / "edited"
        shutil.copytree(rec["saved_to"], edited)
        manifest = json.loads((edited / MANIFEST).read_text())
        (edited / MANIFEST).write_text(json.dumps({**manifest, "ratio": 0.2}))
        with pytest.raises(CheckpointError, match="ratio 0.2"):
            run(make_cfg(f"load={edited}", results_dir=tmp_path))


@pytest.mark.parametrize("overrides, match", [
    (("method=flap", "method.compensate=yes"), "method.compensate"),
    (("method=wanda_sp", "ratio=0.9"), "ratio=0.9"),
    (("method=flap", "ratio=0.9"), "ratio=0.9"),
    (("method=wanda_sp", "finetune=lora"), "drop finetune"),
    (("method=llm_pruner", "method.first=-1"), "method.first"),
    (("method=llm_pruner",), "keep all 2 blocks whole"),  # its recipe's 4 + 2 blocks on the 2-block tiny model
    (("method=llm_pruner", "method.first=0", "method.last=0", "offload=true"), "drop offload"),
    (("method=llm_pruner", "method.first=1", "method.last=0", "ratio=0.6"), "method.first, method.last"),
])
def test_bad_pruning_settings_fail_before_the_model_loads(tmp_path, monkeypatch, overrides, match):
    import saes.runs.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(ValueError, match=match):
        run(make_cfg(*overrides, results_dir=tmp_path))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("experiment, zeroshot, low_rank", [("paradigms_pruning", True, ["slicegpt"]),
                                                             ("paradigms_params", False, ["saes", "svdllm", "slicegpt"])])
def test_pruning_sweeps_expand_to_both_methods_at_both_ratios(experiment, zeroshot, low_rank):
    from experiments import sweeps
    from saes.runs.records import config_key

    overrides, _ = sweeps.sweep_overrides(experiment)
    configs = [sweeps.compose(o) for o in overrides]
    assert sorted((c.method.name, c.ratio) for c in configs) == sorted(
        (m, r) for m in ["flap", "wanda_sp", "llm_pruner", *low_rank] for r in (0.2, 0.4))
    assert len({config_key(sweeps.to_dict(c)) for c in configs}) == len(configs)
    for c in configs:
        assert (c.calib.nsamples, c.calib.seqlen, c.model.name) == (32, 512, "smollm2_135m")
        assert bool(c.eval.get("zeroshot") and c.eval.zeroshot.get("tasks")) == zeroshot


@pytest.mark.parametrize("method", [WandaSP, FLAP])
def test_the_staged_loop_prunes_as_the_reference_path_does(method):
    """The staged block pass narrows the stored inputs of o_proj / down_proj to the channels kept; re-running the
    block per group (the reference path) must agree."""
    ids = calib_batch(4, 24)
    models = []
    for rerun in (False, True):
        model, m = gqa_model(), method()
        prune_model(model, m, 0.4, ids, EngineConfig(device=torch.device("cpu"), batch_size=2, rerun=rerun,
                                                     track_fidelity=True))
        models.append((model, m.structure.remove))
    assert models[0][1] == models[1][1]
    with torch.no_grad():
        assert torch.allclose(models[0][0](ids).logits, models[1][0](ids).logits, atol=1e-5)


@pytest.mark.slow
def test_transformers_alone_loads_a_pruned_folder_with_the_same_logits(tmp_path, tokenizer):
    from tests.test_portable import logits_outside

    model = gqa_model()
    layout = layout_for(model)
    base = {p: (*model.get_submodule(p).weight.shape, False) for p in projections(model, layout)}
    ids = calib_batch(2, 24, seed=5)
    prune_model(model, FLAP(), 0.4, calib_batch(4, 24), CPU)
    folder = save_compressed(model, tokenizer, tmp_path / "flap", {
        "method": "flap", "pruned_layers": pruned_layers(model, base), "structure": block_table(model, layout.layers)})
    with torch.no_grad():
        assert torch.equal(logits_outside(folder, ids, tmp_path), model(ids).logits)


def test_wanda_sp_scores_each_block_on_the_outputs_of_the_blocks_pruned_before_it():
    """Sequential pruning: the last block's o_proj / down_proj statistics are the pruned model's own inputs there
    (on the kept channels), not the dense model's."""
    model, method = gqa_model(), WandaSP()
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    select = method.select

    def recording(block, kind, W, stats, groups):
        keep = select(block, kind, W, stats, groups)
        if block == 2:
            seen[kind] = (stats.mean, channels_of(kind, keep, block_shape(model.model.layers[2])))
        return keep

    method.select = recording
    ids = calib_batch(4, 24)
    dense = copy.deepcopy(model)
    prune_model(model, method, 0.4, ids, CPU)
    for net, pruned in ((model, True), (dense, False)):
        inputs: dict[str, list[torch.Tensor]] = {}
        hooks = [net.get_submodule(f"model.layers.2.{site}").register_forward_pre_hook(
            lambda _m, a, site=site: inputs.setdefault(site, []).append(a[0].reshape(-1, a[0].shape[-1])))
            for site in OUTPUT]
        with torch.no_grad():
            for b in ids.split(2):
                net(b)
        for h in hooks:
            h.remove()
        for site, kind in OUTPUT.items():
            mean, kept = seen[kind]
            got = torch.cat(inputs[site]).double().mean(0)
            if pruned:
                assert torch.allclose(mean[kept], got, atol=1e-5), site
            else:
                assert not torch.allclose(mean, got, atol=1e-4), site


@pytest.mark.parametrize("method", ["wanda_sp", "flap"])
def test_pruning_then_gptq_stores_its_kept_weights_at_the_bits_it_counts(tmp_path, method):
    """Pruning + quantization (issue 28's equal-memory rows): the same structures as the unquantized plan are
    kept, and the memory counted is that of the kept weights alone (b bits each, plus a 16-bit scale and a b-bit
    zero point per row and group), far below the dense model's at the same bits."""
    plain = run(make_cfg(f"method={method}", "ratio=0.25", results_dir=tmp_path))
    rec = run(make_cfg(f"method={method}", "ratio=0.25", "quant=gptq", "quant.bits=4", "quant.group_size=32",
                       results_dir=tmp_path))
    assert rec["params"]["structure"] == plain["params"]["structure"]
    assert rec["params"]["linears_compressed"] == plain["params"]["linears_compressed"]
    kept = [(d["kept_m"], d["kept_n"]) for d in rec["layers"].values()]
    assert sum(m * n for m, n in kept) == rec["params"]["linears_compressed"]
    bits = sum(m * n * 4 + m * -(-n // 32) * 20 for m, n in kept)
    assert rec["quant"]["bits_per_dense_linear_weight"] == pytest.approx(bits / rec["params"]["linears_dense"])
    assert rec["quant"]["bits_per_dense_linear_weight"] < 0.8 * (4 + 20 / 32)
    assert 1 < rec["metrics"]["ppl"]["wiki_books"]["compressed"] < float("inf")


def _direct_taylor(model: torch.nn.Module, ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """LLM-Pruner's element1 scores written out: one backward of the mean loss over all of ``ids``, then per
    structure the sum of |W * G| over the rows and columns it owns, index by index."""
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    out = []
    for block in model.model.layers:
        a, mlp, dh = block.self_attn, block.mlp, block.self_attn.head_dim
        g = a.q_proj.out_features // a.k_proj.out_features

        def s(lin: torch.nn.Linear) -> torch.Tensor:
            return (lin.weight.detach().double() * lin.weight.grad.double()).abs()

        att = torch.tensor([s(a.q_proj)[j * g * dh:(j + 1) * g * dh].sum() + s(a.k_proj)[j * dh:(j + 1) * dh].sum()
                            + s(a.v_proj)[j * dh:(j + 1) * dh].sum() + s(a.o_proj)[:, j * g * dh:(j + 1) * g * dh].sum()
                            for j in range(a.k_proj.out_features // dh)], dtype=torch.float64)
        ch = torch.tensor([s(mlp.gate_proj)[c].sum() + s(mlp.up_proj)[c].sum() + s(mlp.down_proj)[:, c].sum()
                           for c in range(mlp.gate_proj.out_features)], dtype=torch.float64)
        out.append({"attention": att, "mlp": ch})
    model.zero_grad()
    return out


def test_llm_pruner_scores_equal_a_direct_computation():
    """Per-sequence gradients averaged (the harness's backward pass) equal one backward of the mean loss over all
    the (equal-length) sequences, the reference's single batch; the flags and gradients are left as they were."""
    model = gqa_model(6, 2)  # g = 3, as SmolLM2
    ids = calib_batch(4, 24)
    want = _direct_taylor(model, ids)
    flags = [p.requires_grad for p in model.parameters()]
    got = gradient_scores(model, layout_for(model), LLMPruner(), ids, CPU)
    assert [p.requires_grad for p in model.parameters()] == flags and all(p.grad is None for p in model.parameters())
    for w, g in zip(want, got):
        for kind in ("attention", "mlp"):
            assert torch.allclose(g[kind], w[kind], rtol=1e-4), kind


def test_llm_pruner_removes_the_structures_its_scores_rank_lowest():
    """The plan follows the scores: a head group and an MLP channel with zero weights (zero |W G|) are the ones
    removed where one of their kind goes, every kept set is the top of the scores, and the kept rows are the
    dense model's own."""
    model = gqa_model()
    a, mlp, dh = model.model.layers[1].self_attn, model.model.layers[1].mlp, model.model.layers[1].self_attn.head_dim
    with torch.no_grad():  # group 2 of block 1 (g = 2), MLP channel 5 of block 1
        for lin in (a.q_proj,):
            lin.weight[2 * 2 * dh:3 * 2 * dh] = 0
        for lin in (a.k_proj, a.v_proj):
            lin.weight[2 * dh:3 * dh] = 0
        a.o_proj.weight[:, 2 * 2 * dh:3 * 2 * dh] = 0
        mlp.gate_proj.weight[5] = 0
        mlp.up_proj.weight[5] = 0
        mlp.down_proj.weight[:, 5] = 0
    dense = copy.deepcopy(model)
    ids = calib_batch(4, 24)
    scores = gradient_scores(dense, layout_for(dense), LLMPruner(), ids, CPU)
    method = LLMPruner(first=0, last=0)
    prune_model(model, method, 0.4, ids, CPU)
    plan = method.structure
    assert plan.remove[1]["attention"] >= 1 and plan.remove[1]["mlp"] >= 1
    assert 2 not in plan.keep[1]["attention"].tolist() and 5 not in plan.keep[1]["mlp"].tolist()
    for per, keep, r in zip(scores, plan.keep, plan.remove):
        for kind in ("attention", "mlp"):
            assert torch.equal(keep[kind], top_structures(per[kind], r[kind]))
    kept = plan.keep[1]["mlp"]
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, dense.model.layers[1].mlp.up_proj.weight[kept])


def test_blockwise_plan_spares_the_end_blocks_and_meets_the_budget_within_one_channel():
    shapes = [BlockShape(groups=3, heads_per_group=3, head_dim=64, group_params=4 * 64 * 3 * 576 // 3,
                         channels=1536, channel_params=3 * 576)] * 30
    for target in (3_000_000, 9_000_000):
        plan = blockwise_plan(shapes, target, range(4, 28))
        assert all(plan.remove[i] == {"attention": 0, "mlp": 0} for i in (0, 1, 2, 3, 28, 29))
        assert 0 <= plan.removed(shapes) - target < shapes[0].channel_params
        assert len({(r["attention"], r["mlp"]) for r in plan.remove[4:28]}) <= 2  # even: at most one channel apart
    with pytest.raises(ValueError, match="method.first, method.last"):
        blockwise_plan(shapes, 80_000_000, range(4, 28))  # more than the 24 blocks hold


def test_llm_pruner_keeps_its_end_blocks_whole():
    model = gqa_model()
    before = [tuple(block_shape(b).count(k) for k in ("attention", "mlp")) for b in model.model.layers]
    method = LLMPruner(first=1, last=1)
    prune_model(model, method, 0.2, calib_batch(4, 24), CPU)
    after = [tuple(block_shape(b).count(k) for k in ("attention", "mlp")) for b in model.model.layers]
    assert after[0] == before[0] and after[2] == before[2] and after[1] != before[1]
    assert method.structure.remove[0] == method.structure.remove[2] == {"attention": 0, "mlp": 0}
