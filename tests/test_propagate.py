"""The dense block-by-block pass (saes.engine.propagate) is the model's own forward, one block at a time."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from saes.engine.allocators import strs as strs_allocator
from saes.engine.allocators import STRS
from saes.engine.config import EngineConfig
from saes.engine.layout import layout_for, plan_ranks, projections
from saes.engine.loop import block_kinds
from saes.engine.propagate import BlockPass, dense_blocks, replaced
from saes.inputs.models import tiny_llama
from saes.io import read_json

from .conftest import calib_batch

CPU = torch.device("cpu")


def tiny_gemma3() -> nn.Module:
    """Sliding-window and full-attention blocks mixed: their masks and rotary embeddings differ per block."""
    cfg = transformers.Gemma3TextConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=258,
                                        max_position_embeddings=512, sliding_window=8,
                                        layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.Gemma3ForCausalLM(cfg).eval()


@pytest.mark.parametrize("make", [lambda: tiny_llama(num_hidden_layers=3).eval(), tiny_gemma3], ids=["llama", "gemma3"])
def test_dense_blocks_give_the_hidden_states_of_the_models_own_forward(make):
    model = make()
    layout = layout_for(model)
    ids = calib_batch(n=5, seqlen=24)
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states  # hs[l]: input of block l; hs[-1] normed
    steps: list[BlockPass] = []
    dense_blocks(model, layout, ids, EngineConfig(device=CPU, batch_size=2), on_block=steps.append)
    assert [s.index for s in steps] == [0, 1, 2] and [len(s.inputs) for s in steps] == [3, 3, 3]
    for s in steps:
        assert torch.equal(torch.cat(s.inputs), hs[s.index])
        if s.index + 1 < len(steps):
            assert torch.equal(torch.cat(s.outputs), hs[s.index + 1])


def test_on_input_sees_every_projection_once_per_batch_and_the_weights_stay():
    model = tiny_llama().eval()
    layout = layout_for(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[str] = []
    dense_blocks(model, layout, calib_batch(n=4), EngineConfig(device=CPU, batch_size=2),
                 on_input=lambda name, x: seen.append(name))
    names = projections(model, layout)
    assert sorted(seen) == sorted(names * 2) and seen[:len(layout.projections)] == names[:len(layout.projections)]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_projections_are_the_rank_plans_names_in_order():
    model = tiny_llama().eval()
    layout = layout_for(model)
    assert projections(model, layout) == list(plan_ranks(model, layout, 0.3))


def test_replaced_puts_the_original_module_back_even_on_error():
    model = tiny_llama().eval()
    name = "model.layers.1.mlp.down_proj"
    original, other = model.get_submodule(name), nn.Identity()
    with pytest.raises(KeyError):
        with replaced(model, name, other):
            assert model.get_submodule(name) is other
            raise KeyError
    assert model.get_submodule(name) is original


def test_the_strs_sensitivity_pass_leaves_the_model_as_it_was():
    model = tiny_llama().eval()
    layout = layout_for(model)
    modules = dict(model.named_modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = STRS(nsamples=2, seqlen=16).sensitivity(model, layout, calib_batch(), EngineConfig(device=CPU, batch_size=2),
                                                    0.5, 1e-6, torch.float64)
    assert list(table) == projections(model, layout)
    assert dict(model.named_modules()) == modules  # the same objects: nothing swapped in and left behind
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_stopped_strs_table_resumes_to_the_table_an_unstopped_run_makes(tmp_path, monkeypatch):
    """The table's rows land in a partial file as they are measured; a run stopped mid-table measures only the
    rows it lacks and ends with the same table as one that never stopped (and no partial file)."""
    model = tiny_llama().eval()
    layout = layout_for(model)
    strs, ids = STRS(candidates=(0.3, 0.7), nsamples=2, seqlen=16), calib_batch()
    args = (0.5, 1e-6, torch.float64)
    whole = strs.sensitivity(model, layout, ids, EngineConfig(device=CPU, batch_size=2), *args)  # nothing cached
    cfg = EngineConfig(device=CPU, batch_size=2, cache_dir=tmp_path)
    real, calls = strs_allocator._tail_nll, {"n": 0}

    def stop_at_the_sixth(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:  # the third projection's second candidate
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(strs_allocator, "_tail_nll", stop_at_the_sixth)
    with pytest.raises(KeyboardInterrupt):
        strs.sensitivity(model, layout, ids, cfg, *args)
    [partial] = (tmp_path / "asvd_strs").glob("*.partial.json")
    assert list(read_json(partial)["table"]) == list(whole)[:2]

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    calls["n"] = 0
    monkeypatch.setattr(strs_allocator, "_tail_nll", counting)
    assert strs.sensitivity(model, layout, ids, cfg, *args) == whole
    assert calls["n"] == 2 * (len(whole) - 2)  # only the missing rows were measured
    assert not partial.exists() and len(list((tmp_path / "asvd_strs").glob("*.json"))) == 1


class _Done:
    def __init__(self, done: int) -> None:
        self.done = done


class _Cache:
    def __init__(self, hits: set[int]) -> None:
        self.hits = hits

    def has(self, i: int, sites: list[str], stats: frozenset[str]) -> bool:
        return i in self.hits


def test_block_kinds_restore_the_finished_prefix_then_use_the_cache_where_it_holds_the_block():
    kinds = block_kinds(5, _Done(2), _Cache({1, 3}), ["q"], frozenset({"H"}))  # type: ignore[arg-type]
    assert kinds == ["restored", "restored", "fresh", "cached", "fresh"]
    assert block_kinds(2, None, None, ["q"], frozenset()) == ["fresh", "fresh"]
