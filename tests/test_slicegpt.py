"""SliceGPT: folding and rotation leave the function unchanged, the PCA and what slicing keeps, the sequential
pass (every sliced position's calibration signal decorrelated), the parameter count against the solver and the
SVD plan, save -> reload, bad settings named before the model loads, and more slicing costing more."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from baselines.slicegpt import SliceGPT
from saes.core.lowrank import count_parameters
from saes.core.slicegpt import SliceShape, norm_correction, principal_directions, shortcut, solve_width
from saes.engine.config import EngineConfig
from saes.engine.layout import layout_for, projections
from saes.engine.prune import budget
from saes.engine.slicing import fold_norms, plan_width, slice_model, slice_shape
from saes.engine.structure import block_table, pruned_layers
from saes.inputs.models import tiny_llama
from saes.runs.checkpoint import load_compressed, save_compressed
from saes.runs.pipeline import run
from tests.conftest import calib_batch, make_cfg

CPU = EngineConfig(device=torch.device("cpu"), batch_size=2)


def tied_model(blocks: int = 3, seed: int = 3) -> torch.nn.Module:
    """Tied embeddings (as SmolLM2), grouped-query attention 4 / 2, norm scales away from one (so folding them
    is not vacuous)."""
    model = tiny_llama(num_hidden_layers=blocks, tie_word_embeddings=True, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data = 1 + 0.3 * torch.randn(p.shape, generator=g)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def sliced_folder(model: torch.nn.Module, tokenizer, path) -> Path:
    """``model`` sliced to 0.2 on a calibration batch, saved to ``path`` with its slicing manifest."""
    layout = layout_for(model)
    base = {p: (*model.get_submodule(p).weight.shape, False) for p in projections(model, layout)}
    width, plan = plan_width(model, SliceGPT(), 0.2)
    result = slice_model(model, width, calib_batch(4, 32), CPU)
    return save_compressed(model, tokenizer, path, {
        "method": "slicegpt", "pruned_layers": pruned_layers(model, base),
        "structure": block_table(model, layout.layers), "slicing": {**result.spec, **plan}})


def test_folding_the_norms_and_rotating_without_slicing_keep_the_logits():
    model, ids, test = tied_model(), calib_batch(4, 32), calib_batch(2, 32, seed=7)
    dense = logits(model, test)
    folded = copy.deepcopy(model)
    fold_norms(folded, layout_for(folded))
    assert folded.lm_head.weight is not folded.model.embed_tokens.weight
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in folded.named_parameters() if n.endswith("norm.weight"))
    torch.testing.assert_close(logits(folded, test), dense, rtol=0, atol=2e-5)
    d = model.config.hidden_size
    result = slice_model(model, d, ids, CPU)  # every position rotated by its own Q, nothing sliced
    assert not model.config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight
    assert all(b.attn_shortcut.weight.shape == (d, d) for b in model.model.layers)
    # the shortcuts are real rotations between different bases (not identities), the logits the dense ones
    assert not torch.allclose(model.model.layers[0].attn_shortcut.weight, torch.eye(d), atol=1e-2)
    torch.testing.assert_close(logits(model, test), dense, rtol=0, atol=2e-5)
    assert result.spec["norm_scale"] == 1.0 and result.width == d


def test_pca_is_orthogonal_descending_and_keeps_the_most_energy():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(500, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    H = X.T @ X
    vals, Q = principal_directions(H)
    torch.testing.assert_close(Q.T @ Q, torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.all(vals[:-1] >= vals[1:])
    torch.testing.assert_close(H @ Q, Q * vals, rtol=1e-10, atol=1e-8)
    k = 5
    kept = (X @ Q[:, :k]).pow(2).sum()  # slicing keeps the top-k directions: their energy is the top-k eigenvalues
    torch.testing.assert_close(kept, vals[:k].sum(), rtol=1e-10, atol=0)
    for seed in range(5):  # and no other k-dimensional subspace keeps more
        R, _ = torch.linalg.qr(torch.randn(12, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
        assert (X @ R).pow(2).sum() < kept
    S = shortcut(Q[:, :k], Q[:, :k])
    torch.testing.assert_close(S, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)
    scale, eps = norm_correction(64, 16, 1e-6)  # RMSNorm over 16 channels normalising by the mean over 64
    x = torch.randn(16, dtype=torch.float64)
    torch.testing.assert_close(scale * x / torch.sqrt(x.pow(2).sum() / 16 + eps),
                               x / torch.sqrt(x.pow(2).sum() / 64 + 1e-6))


def test_every_sliced_position_sees_its_calibration_signal_in_principal_axes():
    """Sequential PCA: each position's Q is taken on the model as already sliced up to it, so on the calibration
    tokens the sliced model's signal entering every norm has a diagonal Gram matrix with a descending diagonal
    (which a PCA of the dense model's activations would not give after the first block). The embedding position
    keeps exactly its top eigenvalues."""
    model, ids = tied_model(), calib_batch(4, 32)
    width = 40
    emb = model.model.embed_tokens.weight[ids].reshape(-1, 64).double()
    top = principal_directions(emb.T @ emb)[0][:width]
    slice_model(model, width, ids, CPU)
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [model.get_submodule(f"model.layers.{i}.{norm}").register_forward_pre_hook(
        lambda _m, a, key=f"{i}.{norm}": seen.setdefault(key, []).append(a[0].reshape(-1, a[0].shape[-1])))
        for i in range(3) for norm in ("input_layernorm", "post_attention_layernorm")]
    with torch.no_grad():
        for b in ids.split(2):
            model(b)
    for h in hooks:
        h.remove()
    for key, xs in seen.items():
        X = torch.cat(xs).double()
        G = X.T @ X
        diag = torch.diagonal(G)
        assert G.shape == (width, width), key
        assert (G - torch.diag(diag)).abs().max() < 1e-4 * diag.max(), key
        assert torch.all(diag[:-1] >= diag[1:] * (1 - 1e-4)), key
    torch.testing.assert_close(torch.cat(seen["0.input_layernorm"]).double().pow(2).sum(0), top, rtol=1e-4, atol=0)
    # every in-block norm divides by the mean square over the dense width d (the reference's RMSN(mean_dim=d))
    eps = model.config.rms_norm_eps
    for key, xs in seen.items():
        x = torch.cat(xs)
        norm = model.get_submodule(f"model.layers.{key}")
        with torch.no_grad():
            torch.testing.assert_close(norm(x), x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) / 64 + eps),
                                       rtol=1e-5, atol=1e-6)



@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.4])
def test_parameter_count_is_the_solvers_and_removes_the_svd_count_within_one_dimension(ratio):
    model, ids = tied_model(), calib_batch(4, 32)
    layout = layout_for(model)
    V, d, L = model.config.vocab_size, model.config.hidden_size, 3
    shape = slice_shape(model, layout)
    linears = sum(model.get_submodule(p).weight.numel() for p in projections(model, layout))
    assert shape.dense == linears
    width, plan = plan_width(model, SliceGPT(), ratio)
    target = budget(model, layout, ratio)
    assert plan["target"] == target and width < d
    assert 0 <= plan["removed"] - target < shape.dim_cost(width)  # within one hidden dimension's worth
    assert shape.removed(width + 1) < target  # and the next width would not reach it
    result = slice_model(model, width, ids, CPU)
    kept = sum(model.get_submodule(p).weight.numel() for p in projections(model, layout)) + result.shortcut_parameters
    assert kept == shape.kept(width) and linears - kept == plan["removed"]
    # the whole model: embeddings at the width, an untied full-width head, norms at the width but the final one
    assert count_parameters(model) == V * width + V * d + 2 * L * width + d + shape.kept(width)
    assert torch.isfinite(logits(model, ids)).all()


def test_width_solver_on_hand_made_shapes():
    s = SliceShape(hidden=576, qkv_rows=960, o_in=576, mlp=1536, blocks=30)  # SmolLM2-135M's blocks
    assert s.dense == 30 * 6144 * 576
    assert s.kept(576) - s.dense == 30 * 2 * 576 * 576  # no slicing: the shortcuts are pure overhead
    w = solve_width(s, int(0.2 * s.dense), 0.2)
    assert s.removed(w) >= 0.2 * s.dense > s.removed(w + 1)
    assert 0.98 < s.removed(1) / s.dense < 0.995  # the last block's down_proj keeps the full width
    with pytest.raises(ValueError, match="ratio=0.995"):
        solve_width(s, int(0.995 * s.dense), 0.995)


def test_a_sliced_model_saves_and_reloads_to_the_same_logits(tmp_path, tokenizer):
    model, ids = tied_model(), calib_batch(4, 32)
    layout = layout_for(model)
    base = {p: (*model.get_submodule(p).weight.shape, False) for p in projections(model, layout)}
    width, plan = plan_width(model, SliceGPT(), 0.2)
    result = slice_model(model, width, ids, CPU)
    folder = save_compressed(model, tokenizer, tmp_path / "m", {
        "base": "tiny", "method": {"name": "slicegpt"}, "ratio": 0.2, "pruned_layers": pruned_layers(model, base),
        "structure": block_table(model, layout.layers), "slicing": {**result.spec, **plan}})
    loaded, _, manifest = load_compressed(folder)
    assert manifest["slicing"]["width"] == width
    assert loaded.model.embed_tokens.weight.shape == (258, width) and loaded.lm_head.weight.shape == (258, 64)
    eps = [m.model.layers[1].input_layernorm.variance_epsilon for m in (loaded, model)]
    assert eps[0] == eps[1] == result.spec["norm_eps"]
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_device_map_auto_keeps_each_sliced_block_of_a_portable_folder_on_one_device(tmp_path, tokenizer):
    """accelerate splits a model by module class name (``_no_split_modules``); a sliced block's class is
    ``Sliced<Base>``, and split across devices its shortcut would add tensors on two of them."""
    from accelerate import infer_auto_device_map
    from transformers import AutoModelForCausalLM

    portable = AutoModelForCausalLM.from_pretrained(sliced_folder(tied_model(), tokenizer, tmp_path / "m"),
                                                    trust_remote_code=True)
    names = {type(b).__name__ for b in portable.model.layers}
    assert names == {"SlicedLlamaDecoderLayer"} and names <= set(portable._no_split_modules)
    block = sum(p.numel() * p.element_size() for p in portable.model.layers[0].parameters())
    # the CPU holds the embeddings and one and a half blocks (accelerate keeps room for the largest unsplittable
    # module), the rest goes to disk: unless its class is listed, block 0 straddles the two
    embed = portable.model.embed_tokens.weight
    device_map = infer_auto_device_map(
        portable, max_memory={"cpu": embed.numel() * embed.element_size() + 3 * block // 2},
        no_split_module_classes=sorted(portable._no_split_modules))
    assert device_map["model.embed_tokens"] == "cpu"
    for i in range(len(portable.model.layers)):
        name = f"model.layers.{i}"
        placed = {d for k, d in device_map.items() if k in ("", name) or name.startswith(k + ".") or
                  k.startswith(name + ".")}
        assert len(placed) == 1, (prefix, device_map)

def test_run_saves_and_a_load_run_reproduces_it(tmp_path):
    rec = run(make_cfg("method=slicegpt", "ratio=0.2", "save=true", results_dir=tmp_path))
    p, s = rec["params"], rec["params"]["structure"]
    assert p["rank_alloc"] == "sliced"
    assert p["linears_dense"] - p["linears_compressed"] == s["removed"] and 0 <= s["overshoot"] < s["max_structure"]
    again = run(make_cfg(f"load={rec['saved_to']}", results_dir=tmp_path))
    assert again["metrics"]["ppl"]["wiki_books"]["compressed"] == rec["metrics"]["ppl"]["wiki_books"]["compressed"]
    counts = ("linears_compressed", "model_dense", "model_compressed")
    assert [again["params"][k] for k in counts] == [p[k] for k in counts]


def _gemma_config():
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, vocab_size=258)


@pytest.mark.parametrize("overrides, match", [
    (("method=slicegpt", "ratio=0.9"), "ratio=0.9"),
    (("method=slicegpt", "finetune=lora"), "drop finetune"),
    (("method=slicegpt", "quant=gptq"), "drop quant"),
    (("method=slicegpt", "calib.propagate=fp"), "calib.propagate=fp"),
    (("method=slicegpt", "ratio=0.2", "gemma"), "model_type='gemma3_text'"),
])
def test_bad_settings_fail_before_the_model_loads(tmp_path, monkeypatch, overrides, match):
    import saes.runs.job as job
    import saes.runs.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    if "gemma" in overrides:  # a Gemma 3 config (sandwich norms) where the tiny LLaMA's would be
        monkeypatch.setattr(job, "model_config", lambda *a, **k: _gemma_config())
        overrides = overrides[:-1]
    with pytest.raises(ValueError, match=match):
        run(make_cfg(*overrides, results_dir=tmp_path))
    assert not (tmp_path / "runs").exists()


def test_slicing_a_little_costs_less_than_slicing_a_lot():
    """On the calibration tokens, the sliced model's logits move further from the dense ones as the width falls."""
    dense, ids = tied_model(), calib_batch(4, 32)
    ref = logits(dense, ids)
    errors = []
    for width in (60, 48, 32, 16):
        model = copy.deepcopy(dense)
        slice_model(model, width, ids, CPU)
        errors.append(float((logits(model, ids) - ref).pow(2).mean()))
    assert errors == sorted(errors) and errors[0] < 0.5 * errors[-1], errors


@pytest.mark.slow
def test_transformers_alone_loads_a_sliced_folder_with_the_same_logits(tmp_path, tokenizer):
    from tests.test_portable import logits_outside

    model, ids = tied_model(), calib_batch(2, 24, seed=5)
    folder = sliced_folder(model, tokenizer, tmp_path / "slicegpt")
    assert torch.equal(logits_outside(folder, ids, tmp_path), logits(model, ids))


def test_a_sliced_folder_refuses_transformers_4_rather_than_reading_layer_outputs_0(monkeypatch):
    """transformers 4.x models take ``layer_outputs[0]`` of a decoder block; the sliced block returns the hidden
    states themselves (transformers 5), so under 4.x the portable code would keep the first sequence only."""
    import transformers

    from saes.runs import hf_portable

    monkeypatch.setattr(transformers, "__version__", "4.46.3")
    with pytest.raises(ImportError, match="needs transformers >= 5"):
        hf_portable._slice(tied_model(), {"width": 48, "shortcuts": [], "norm_eps": 1e-6})
