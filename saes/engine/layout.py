"""Where each architecture keeps its compressible projections, and the rank plans over them.

The layout table (:data:`LAYOUTS`) is the only architecture-specific code in the project: a
decoder block's projections in true-sequential groups, and (:class:`BlockStages`) how the block
goes on from ``o_proj``'s input to its output, which lets the engine compute each group's input
from the previous one instead of re-running the block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from saes.core.lowrank import rank_for_ratio


class UnsupportedModelError(ValueError):
    """The engine does not know this architecture's decoder blocks."""


@dataclass(frozen=True)
class BlockStages:
    """How a pre-norm decoder block goes on from the input of ``o_proj`` to its output, as module names.

    With ``z`` the input of ``o_proj`` and ``x`` the block's input::

        h = x + attn_out_norm(o_proj(z))          # attn_out_norm absent: identity
        u = mlp_in_norm(h)                        # input of gate_proj/up_proj
        d = act(gate_proj(u)) * up_proj(u)        # input of down_proj
        y = h + mlp_out_norm(down_proj(d))        # the block's output

    The engine uses this to compute each group's input from the previous group's intermediate,
    so a block costs one forward on each stream (the inputs of ``q,k,v`` and ``o`` still come from
    the block's own forward, stopped at the site: the attention is not rewritten here). A layout
    without stages is compressed by re-running the block per group (the reference path).
    """

    mlp_in_norm: str
    attn_in_norm: str = "input_layernorm"  # the norm whose output q,k,v read (AWQ folds its scales into it)
    attn_out_norm: str | None = None
    mlp_out_norm: str | None = None
    act: str = "mlp.act_fn"

    def _norm(self, block: nn.Module, name: str | None, x: torch.Tensor) -> torch.Tensor:
        return x if name is None else block.get_submodule(name)(x)

    def mlp_input(self, block: nn.Module, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, u)`` from the block input ``x`` and the ``o_proj`` input ``z``."""
        h = x + self._norm(block, self.attn_out_norm, block.self_attn.o_proj(z))
        return h, block.get_submodule(self.mlp_in_norm)(h)

    def down_input(self, block: nn.Module, u: torch.Tensor) -> torch.Tensor:
        return block.get_submodule(self.act)(block.mlp.gate_proj(u)) * block.mlp.up_proj(u)

    def output(self, block: nn.Module, h: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return h + self._norm(block, self.mlp_out_norm, block.mlp.down_proj(d))


@dataclass(frozen=True)
class BlockLayout:
    layers: str  # dotted path from the causal LM to the ModuleList of decoder blocks
    groups: tuple[tuple[str, ...], ...]  # true-sequential groups; members of a group share one input
    stages: BlockStages | None = None  # the block after o_proj's input (q,k,v / o / gate,up / down groups only)

    @property
    def projections(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)


_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
_LLAMA_LIKE = BlockLayout("model.layers", _LLAMA_GROUPS, BlockStages(mlp_in_norm="post_attention_layernorm"))
# Gemma 3 normalises the attention and MLP outputs before each residual sum (sandwich norms).
_GEMMA3 = BlockLayout("model.layers", _LLAMA_GROUPS, BlockStages(
    mlp_in_norm="pre_feedforward_layernorm", attn_out_norm="post_attention_layernorm",
    mlp_out_norm="post_feedforward_layernorm"))

# The only architecture-specific names in the project: ``config.model_type`` -> layout.
LAYOUTS: dict[str, BlockLayout] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma3_text": _GEMMA3,
}


def layout_for(model: nn.Module) -> BlockLayout:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LAYOUTS:
        raise UnsupportedModelError(
            f"the engine does not know the decoder blocks of model_type={model_type!r}; "
            f"known: {sorted(LAYOUTS)}. Add its layout to saes.engine.layout.LAYOUTS"
        )
    layout = LAYOUTS[model_type]
    blocks = model.get_submodule(layout.layers)
    for i, block in enumerate(blocks):
        for name in layout.projections:
            try:
                mod = block.get_submodule(name)
            except AttributeError:
                raise UnsupportedModelError(f"block {i} of {model_type!r} has no {name}") from None
            if not isinstance(mod, nn.Linear):
                raise UnsupportedModelError(f"{layout.layers}.{i}.{name} is {type(mod).__name__}, not nn.Linear")
    return layout


def projections(model: nn.Module, layout: BlockLayout) -> list[str]:
    """Full names of every compressible projection (``model.layers.3.self_attn.q_proj``): block by block, each
    block's in the layout's true-sequential order (the order of every rank plan)."""
    n = len(model.get_submodule(layout.layers))
    return [f"{layout.layers}.{i}.{name}" for i in range(n) for name in layout.projections]


def check_plan(model: nn.Module, layout: BlockLayout, ranks: dict[str, int | None]) -> None:
    """A rank plan names every projection exactly once, each with ``1 <= r <= min(m, n)`` or ``None`` (it stays
    dense: ERC-SVD's partial-layer compression)."""
    want = projections(model, layout)
    if set(ranks) != set(want):
        missing, extra = sorted(set(want) - set(ranks)), sorted(set(ranks) - set(want))
        raise ValueError(f"rank plan does not match the model: missing {missing[:3]}, unknown {extra[:3]}")
    for name, r in ranks.items():
        m, n = model.get_submodule(name).weight.shape
        if r is not None and not (isinstance(r, int) and 1 <= r <= min(m, n)):
            raise ValueError(f"rank plan gives {name} [{m}x{n}] rank {r!r}; need an int in [1, {min(m, n)}] "
                             "or None (dense)")


def plan_parameters(shapes: dict[str, tuple[int, int]], ranks: dict[str, int | None]) -> int:
    """Parameters a plan keeps: ``r (m + n)`` per low-rank projection, ``m n`` per dense one (biases aside)."""
    return sum(m * n if ranks[name] is None else ranks[name] * (m + n) for name, (m, n) in shapes.items())


def plan_ranks(model: nn.Module, layout: BlockLayout, ratio: float) -> dict[str, int]:
    """Uniform ranks for every projection of every block (raises before any work on bad ratios)."""
    return {name: rank_for_ratio(*model.get_submodule(name).weight.shape, ratio) for name in projections(model, layout)}
