"""``model=llama7b_shape|llama70b_shape``: the paper's widths built in code (random weights), checked on the meta
device: exact projection shapes and parameter counts, nothing allocated."""

import pytest
import torch

from saes.inputs.models import ModelUnavailable, model_config, skeleton
from saes.runs.job import model_spec

from .conftest import make_cfg

PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def block_shapes(option: str, blocks: int) -> tuple[torch.nn.Module, dict[str, tuple[int, ...]]]:
    cfg = make_cfg(f"model={option}", f"model.blocks={blocks}")
    model = skeleton(model_config(model_spec(cfg.model)))
    assert all(p.is_meta for p in model.parameters())  # no weights allocated
    return model, {name: tuple(model.get_submodule(f"model.layers.0.{name}").weight.shape) for name in PROJ}


def test_llama7b_shape_has_llama7b_projections_and_parameter_count():
    model, shapes = block_shapes("llama7b_shape", 1)
    h, i = 4096, 11008
    assert shapes == {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
                      "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h),
                      "mlp.down_proj": (h, i)}
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    assert block == 4 * h * h + 3 * h * i + 2 * h == 202_383_360
    assert len(model.model.layers) == 1 and model.config.vocab_size == 32000
    assert type(model.model.norm).__name__ == "LlamaRMSNorm" and model.config.rope_parameters["rope_theta"] == 10000.0
    full = skeleton(model_config(model_spec(make_cfg("model=llama7b_shape").model)))
    assert len(full.model.layers) == 32
    assert sum(p.numel() for p in full.parameters()) == 6_738_415_616  # LLaMA-7B's published count


def test_llama70b_shape_has_grouped_query_attention():
    model, shapes = block_shapes("llama70b_shape", 1)
    h, i, kv = 8192, 28672, 8 * 128
    assert shapes == {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                      "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h),
                      "mlp.down_proj": (h, i)}
    assert sum(p.numel() for p in model.model.layers[0].parameters()) == 2 * h * h + 2 * kv * h + 3 * h * i + 2 * h


@pytest.mark.parametrize("blocks", ["0", "two", "1.5"])
def test_bad_block_count_is_refused_naming_the_key(blocks):
    cfg = make_cfg("model=llama7b_shape", f"model.blocks={blocks}")
    with pytest.raises(ModelUnavailable, match="model.blocks must be an integer >= 1"):
        model_spec(cfg.model)
