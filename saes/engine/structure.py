"""Layer surgery of structured pruning: which rows and columns an attention group or an MLP channel owns, how a
block loses them, and how a pruned model's shapes are written down and rebuilt.

An attention group ``j`` (key/value head ``j`` and the ``g`` query heads sharing it) owns rows
``[j g d_h, (j + 1) g d_h)`` of ``q_proj``, rows ``[j d_h, (j + 1) d_h)`` of ``k_proj`` and ``v_proj`` and the same
columns of ``o_proj`` as of ``q_proj``'s rows; an MLP channel ``c`` owns row ``c`` of ``gate_proj`` and ``up_proj``
and column ``c`` of ``down_proj``. Query heads stay ``g`` x key/value heads in every block, so transformers'
attention (which infers the head counts from the projections' shapes and keeps ``num_key_value_groups``) runs
the pruned block unchanged; only the manifest can say the per-block counts, since the config cannot.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from saes.core.lowrank import set_submodule
from saes.core.pruning import BlockShape, Kind, Pruner, compensation_bias
from saes.core.stats import SiteStats
from saes.engine.cost import clock

ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
OUTPUT = {"self_attn.o_proj": "attention", "mlp.down_proj": "mlp"}  # the projection each kind is scored on


def head_dim(block: nn.Module) -> int:
    return int(block.self_attn.head_dim)


def block_shape(block: nn.Module) -> BlockShape:
    """The prunable structures of one LLaMA-like block, from its projections' shapes."""
    a, mlp, dh = block.self_attn, block.mlp, head_dim(block)
    groups, heads = a.k_proj.out_features // dh, a.q_proj.out_features // dh
    if heads % groups or a.v_proj.out_features != groups * dh or a.o_proj.in_features != heads * dh:
        raise ValueError(f"attention shapes q {a.q_proj.out_features}, k {a.k_proj.out_features}, v "
                         f"{a.v_proj.out_features}, o {a.o_proj.in_features} do not form whole head groups of {dh}")
    d_in, d_out = a.q_proj.in_features, a.o_proj.out_features
    group = (heads // groups) * dh * d_in + 2 * dh * d_in + d_out * (heads // groups) * dh
    return BlockShape(groups=groups, heads_per_group=heads // groups, head_dim=dh, group_params=group,
                      channels=mlp.down_proj.in_features,
                      channel_params=mlp.gate_proj.in_features + mlp.up_proj.in_features + mlp.down_proj.out_features)


def _sliced(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
            bias: torch.Tensor | None = None) -> nn.Linear:
    """A new ``nn.Linear`` with the kept ``rows`` (outputs) / ``cols`` (inputs); ``bias`` is added to the bias
    (one is made where there was none)."""
    W = lin.weight.data
    W = W if rows is None else W[rows.to(W.device)]
    W = W if cols is None else W[:, cols.to(W.device)]
    b = lin.bias.data if lin.bias is not None else None
    b = b if (b is None or rows is None) else b[rows.to(b.device)]
    if bias is not None:
        b = bias.to(W.dtype) if b is None else b + bias.to(b.dtype)
    new = nn.Linear(W.shape[1], W.shape[0], bias=b is not None, device=W.device, dtype=W.dtype)
    new.weight.data.copy_(W)
    if b is not None:
        new.bias.data.copy_(b)
    return new


def _rows(keep: torch.Tensor, width: int) -> torch.Tensor:
    """Row indices of the kept structures when each owns ``width`` consecutive rows."""
    return (keep[:, None] * width + torch.arange(width)[None, :]).reshape(-1)


@torch.no_grad()
def prune_block(block: nn.Module, kind: Kind, keep: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Remove every structure of ``kind`` not in ``keep`` (sorted indices); ``bias`` joins the output projection."""
    keep = keep.to("cpu", torch.long)
    if kind == "attention":
        s = block_shape(block)
        q_rows, kv_rows = _rows(keep, s.heads_per_group * s.head_dim), _rows(keep, s.head_dim)
        a = block.self_attn
        set_submodule(block, "self_attn.q_proj", _sliced(a.q_proj, rows=q_rows))
        set_submodule(block, "self_attn.k_proj", _sliced(a.k_proj, rows=kv_rows))
        set_submodule(block, "self_attn.v_proj", _sliced(a.v_proj, rows=kv_rows))
        set_submodule(block, "self_attn.o_proj", _sliced(a.o_proj, cols=q_rows, bias=bias))
    else:
        m = block.mlp
        set_submodule(block, "mlp.gate_proj", _sliced(m.gate_proj, rows=keep))
        set_submodule(block, "mlp.up_proj", _sliced(m.up_proj, rows=keep))
        set_submodule(block, "mlp.down_proj", _sliced(m.down_proj, cols=keep, bias=bias))


def channels_of(kind: Kind, keep: torch.Tensor, shape: BlockShape) -> torch.Tensor:
    """The output projection's input channels the kept structures own."""
    return _rows(keep.cpu(), shape.heads_per_group * shape.head_dim) if kind == "attention" else keep.cpu()


def prune_group(block: nn.Module, group: tuple[str, ...], prefix: str, method: Pruner, stats: SiteStats,
                timings: dict[str, float], layers: dict[str, dict[str, Any]]) -> torch.Tensor | None:
    """The engine's step for a pruner at one true-sequential group: at ``o_proj`` / ``down_proj`` the method
    selects the structures to keep (scored on the statistics of that projection's input) and the block loses
    the others; ``q,k,v`` and ``gate,up`` are pruned with them. Each projection's entry in ``layers`` gives its
    dense shape ``m, n`` (``rank`` None: no factors) and the kept ``kept_m, kept_n``. Returns the input channels
    of ``o_proj`` / ``down_proj`` that stay (the engine narrows the inputs it stored to them), else None."""
    kind: Kind | None = OUTPUT.get(group[-1]) if len(group) == 1 else None
    if kind is None:
        return None  # q,k,v / gate,up: pruned with their output projection
    out = block.get_submodule(group[0])
    t0 = clock(out.weight.device)
    shape = block_shape(block)
    names = ATTENTION if kind == "attention" else MLP
    dense = {name: tuple(block.get_submodule(name).weight.shape) for name in names}
    W = out.weight.to(method.compute_dtype)
    keep = method.select(int(prefix.rsplit(".", 1)[1]), kind, W, stats, shape.groups)
    if keep.numel() == 0:
        raise ValueError(f"{prefix}: {method.name} kept no {kind} structure")
    bias = None
    channels = channels_of(kind, keep, shape)
    if method.compensate:
        if stats.mean is None:
            raise ValueError(f"{method.name}'s bias compensation needs the statistic mean")
        bias = compensation_bias(W, stats.mean.to(W.device, W.dtype), channels.to(W.device))
    prune_block(block, kind, keep, bias)
    seconds = clock(out.weight.device) - t0
    timings["factorisation"] += seconds
    for name in names:
        m, n = dense[name]
        kept_m, kept_n = block.get_submodule(name).weight.shape
        layers[f"{prefix}.{name}"] = {"m": m, "n": n, "rank": None, "kept_m": int(kept_m), "kept_n": int(kept_n),
                                      "kept": int(keep.numel()), "of": shape.count(kind),
                                      **({"seconds": seconds} if name == group[0] else {})}
    return channels


# ------------------------------------------------------------------ what a saved folder says
def pruned_layers(model: nn.Module, base: dict[str, tuple[int, int, bool]]) -> dict[str, dict[str, Any]]:
    """Every planned projection (``base``: name -> dense ``(out, in, bias)``) with its shape and bias now."""
    out: dict[str, dict[str, Any]] = {}
    for name, (m, n, had_bias) in base.items():
        lin = model.get_submodule(name)
        out[name] = {"out_features": lin.out_features, "in_features": lin.in_features, "bias": lin.bias is not None,
                     "base_out_features": m, "base_in_features": n, "base_bias": had_bias}
    return out


def block_table(model: nn.Module, layers: str) -> list[dict[str, int]]:
    """Per block: query heads, key/value heads, MLP channels (the manifest's ``structure``)."""
    table = []
    for block in model.get_submodule(layers):
        s = block_shape(block)
        table.append({"heads": s.groups * s.heads_per_group, "kv_heads": s.groups, "head_dim": s.head_dim,
                      "intermediate": s.channels, "group_params": s.group_params,
                      "channel_params": s.channel_params})
    return table


def rebuild(model: nn.Module, layers: dict[str, dict[str, Any]]) -> None:
    """Give a freshly built base model the pruned shapes of ``layers`` (:func:`pruned_layers`), on the device
    and dtype of the module each replaces (the meta device for :func:`saes.runs.checkpoint.load_compressed`)."""
    for name, spec in layers.items():
        old = model.get_submodule(name)
        if (old.out_features, old.in_features) != (spec["base_out_features"], spec["base_in_features"]):
            raise ValueError(f"pruned layer {name}: the base model has {old.out_features}x{old.in_features}, the "
                             f"manifest says {spec['base_out_features']}x{spec['base_in_features']}")
        set_submodule(model, name, nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"],
                                             device=old.weight.device, dtype=old.weight.dtype))
