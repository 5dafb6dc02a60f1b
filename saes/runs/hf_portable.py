"""Low-rank causal LM loadable with transformers alone (``trust_remote_code=True``), no SAES harness needed.

This file is the source of ``modeling_saes_lowrank.py``, which ``saes.runs.checkpoint.save_compressed``
writes into every saved folder, with the two ``BASE_*`` lines below set to the base model's
architecture. It imports only torch and transformers. ``config.json`` then has
``model_type: "saes_lowrank"``, ``auto_map`` naming the two classes of this file,
``lowrank_base_model_type`` / ``lowrank_base_architecture`` (the same values), and
``lowrank_layers``: dotted projection name -> ``{rank, in_features, out_features, bias}``; a structurally
pruned model has ``pruned_layers`` instead: name -> its kept ``{in_features, out_features, bias}`` and base shape;
a SliceGPT model also has ``slicing`` (its width, its norms' scale and epsilon, each block's shortcut shapes):
its embeddings and in-block norms are built at the sliced width and each decoder block carries the two shortcut
linears on its residual path (``attn_shortcut``, ``mlp_shortcut``), as ``saes.engine.slicing`` builds them.

:class:`SaesLowRankForCausalLM` is the base architecture's own ``*ForCausalLM`` class in which
every listed projection ``y = W x + b`` is ``y = A (B x) + b`` (``B: [rank, in]``, ``A: [out, rank]``),
with the parameter names of ``saes.core.lowrank.LowRankLinear`` (``<name>.B.weight``, ``<name>.A.weight``,
``<name>.A.bias``): the saved safetensors load unchanged. Because the model type is not a built-in
one, loading without ``trust_remote_code=True`` fails with transformers' own error instead of
building the dense base model with random projections.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

BASE_MODEL_TYPE = "llama"  # set on save: the base config's model_type
BASE_ARCHITECTURE = "LlamaForCausalLM"  # set on save: the base model's *ForCausalLM class in transformers
MODEL_TYPE = "saes_lowrank"


class SaesLowRankConfig(CONFIG_MAPPING[BASE_MODEL_TYPE]):  # type: ignore[misc]
    """The base architecture's config; ``lowrank_layers`` and the ``lowrank_base_*`` keys ride along as extras."""

    model_type = MODEL_TYPE


class LowRankLinear(nn.Module):
    """``y = A (B x) + bias``: ``B`` (in -> rank) then ``A`` (rank -> out), as in ``saes.core.lowrank``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.B = nn.Linear(in_features, rank, bias=False)
        self.A = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.A(self.B(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class SlicedBlock(nn.Module):
    """Mixin of a sliced decoder block: the pre-norm block with the residual carried through two shortcuts."""

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        attn, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        mid = self.attn_shortcut(hidden_states) + attn
        return self.mlp_shortcut(mid) + self.mlp(self.post_attention_layernorm(mid))


def _slice(model: nn.Module, slicing: dict[str, Any]) -> None:
    # transformers 5 decoder layers return the hidden states; 4.x models read layer_outputs[0], which on this
    # block's tensor would be the first sequence: refuse rather than compute something else
    if int(transformers.__version__.split(".")[0]) < 5:
        raise ImportError(f"this SliceGPT folder needs transformers >= 5 (found {transformers.__version__}): its "
                          "sliced decoder blocks return a tensor, as transformers 5's do")
    width = int(slicing["width"])
    old = model.get_input_embeddings()
    model.set_input_embeddings(nn.Embedding(old.num_embeddings, width, padding_idx=old.padding_idx))
    blocks = model.model.layers
    if len(blocks) != len(slicing["shortcuts"]):
        raise ValueError(f"slicing lists {len(slicing['shortcuts'])} blocks, the model has {len(blocks)}")
    for block, ((a_in, a_out), (_, m_out)) in zip(blocks, slicing["shortcuts"]):
        block.__class__ = type(f"Sliced{type(block).__name__}", (SlicedBlock, type(block)), {})
        block.attn_shortcut = nn.Linear(a_in, a_out, bias=False)
        block.mlp_shortcut = nn.Linear(a_out, m_out, bias=False)
        for name, n in (("input_layernorm", a_in), ("post_attention_layernorm", a_out)):
            setattr(block, name, type(getattr(block, name))(n, eps=float(slicing["norm_eps"])))


class SaesLowRankForCausalLM(getattr(transformers, BASE_ARCHITECTURE)):  # type: ignore[misc]
    """The base ``*ForCausalLM`` with the projections of ``config.lowrank_layers`` factorised."""

    config_class = SaesLowRankConfig

    def __init__(self, config: SaesLowRankConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        layers: dict[str, dict[str, Any]] = getattr(config, "lowrank_layers", None) or {}
        pruned: dict[str, dict[str, Any]] = getattr(config, "pruned_layers", None) or {}
        if not layers and not pruned:
            raise ValueError("config.json has no lowrank_layers: not a folder saved by the SAES harness")
        for name, spec in pruned.items():  # a pruned model: the projections take their kept shapes
            parent, _, child = name.rpartition(".")
            dense = self.get_submodule(name)
            if (dense.in_features, dense.out_features) != (spec["base_in_features"], spec["base_out_features"]):
                raise ValueError(f"pruned_layers[{name!r}] was pruned from {spec['base_out_features']}x"
                                 f"{spec['base_in_features']}, the {BASE_ARCHITECTURE} module there is another shape")
            setattr(self.get_submodule(parent) if parent else self, child,
                    nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"]))
        if getattr(config, "slicing", None):  # SliceGPT: sliced embeddings and norms, shortcut linears
            _slice(self, config.slicing)
            # device_map="auto" matches these by class name: a sliced block must stay on one device too (its
            # shortcuts add the residual to its attention's and MLP's outputs)
            self._no_split_modules = set(self._no_split_modules or ()) | {type(b).__name__ for b in self.model.layers}
        for name, spec in layers.items():
            parent, _, child = name.rpartition(".")
            dense = self.get_submodule(name)
            if (getattr(dense, "in_features", None), getattr(dense, "out_features", None)) != \
                    (spec["in_features"], spec["out_features"]):
                raise ValueError(f"lowrank_layers[{name!r}] is {spec['out_features']}x{spec['in_features']}, "
                                 f"the {BASE_ARCHITECTURE} module there is {type(dense).__name__} of another shape")
            setattr(self.get_submodule(parent) if parent else self, child,
                    LowRankLinear(spec["in_features"], spec["out_features"], spec["rank"], bias=spec["bias"]))
