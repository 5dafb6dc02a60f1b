"""SliceGPT's layer surgery and its sequential calibration pass (the maths: :mod:`saes.core.slicegpt`).

:func:`slice_model` folds every RMSNorm scale into the linears it feeds (untying a tied head first), then walks
the residual stream front to back on the shared calibration tokens, as the reference's
``rotate_and_slice_sequential`` does: the PCA of the embeddings gives ``Q_0``; in block ``l`` the PCA of the
signal entering the MLP norm (computed with the block's attention already reading the sliced stream) gives
``Q_mid``, and the PCA of the block's output (with its MLP reading the sliced ``Q_mid`` stream) gives the next
block's ``Q``. Each block becomes a :class:`SlicedDecoderLayer`: the same modules plus two shortcut linears on
the residual path (``attn_shortcut: Q_in -> Q_mid``, ``mlp_shortcut: Q_mid -> Q_out``). The last block's output
and the head keep the full width ``d`` (the reference's default, ``do_slice_head=False``).

Every in-block RMSNorm then reads ``d'`` channels; its weight becomes the constant ``sqrt(d / d')`` and its
epsilon ``eps d / d'`` (:func:`saes.core.slicegpt.norm_correction`), so it divides by the mean square over ``d``
as the reference's ``RMSN(mean_dim=d)`` does, with the model's own epsilon. A saved folder records all of it in
its manifest's ``slicing`` entry; :func:`rebuild_sliced` gives a freshly built base model the same modules.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from saes.core.lowrank import set_submodule
from saes.core.slicegpt import (SliceShape, Slicer, fold_scale, kept_variance, norm_correction, principal_directions,
                                rotate_input, rotate_output, shortcut, solve_width)
from saes.engine.config import EngineConfig
from saes.engine.layout import BlockLayout, layout_for, projections
from saes.engine.propagate import StopForward, capture_block_inputs, first_output
from saes.engine.prune import budget

INPUT_SIDE = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}


class SlicedDecoderLayer(nn.Module):
    """Mixin class a LLaMA decoder layer is switched to (:func:`to_sliced`): its forward is the pre-norm block's
    with the residual carried through ``attn_shortcut`` and ``mlp_shortcut`` (``nn.Linear`` without bias)."""

    attn_shortcut: nn.Linear
    mlp_shortcut: nn.Linear

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # (B, T, d_in) -> (B, T, d_out)
        attn, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        mid = self.attn_shortcut(hidden_states) + attn  # (B, T, d_mid)
        return self.mlp_shortcut(mid) + self.mlp(self.post_attention_layernorm(mid))


_SLICED_CLASSES: dict[type, type] = {}


def to_sliced(block: nn.Module, d_in: int, d_mid: int, d_out: int) -> nn.Module:
    """Switch ``block`` (in place) to a subclass of its own class with :class:`SlicedDecoderLayer`'s forward and
    two shortcut linears ``d_in -> d_mid``, ``d_mid -> d_out`` (on the block's device and dtype; weights to be set).
    Module names stay those of the base model, so the layout, hooks and the saved state dict keep their keys."""
    base = type(block)
    if not issubclass(base, SlicedDecoderLayer):
        if base not in _SLICED_CLASSES:
            _SLICED_CLASSES[base] = type(f"Sliced{base.__name__}", (SlicedDecoderLayer, base), {})
        block.__class__ = _SLICED_CLASSES[base]
    w = block.self_attn.q_proj.weight
    block.attn_shortcut = nn.Linear(d_in, d_mid, bias=False, device=w.device, dtype=w.dtype)
    block.mlp_shortcut = nn.Linear(d_mid, d_out, bias=False, device=w.device, dtype=w.dtype)
    return block


def slice_shape(model: nn.Module, layout: BlockLayout) -> SliceShape:
    """The widths of the model's blocks (the same in every block, as the uniform width needs)."""
    blocks = model.get_submodule(layout.layers)
    shapes = {(b.self_attn.q_proj.out_features + b.self_attn.k_proj.out_features + b.self_attn.v_proj.out_features,
               b.self_attn.o_proj.in_features, b.mlp.down_proj.in_features, b.self_attn.q_proj.in_features)
              for b in blocks}
    if len(shapes) != 1:
        raise ValueError(f"SliceGPT's uniform width needs every block to have the same shapes; got {sorted(shapes)}")
    qkv, o_in, mlp, hidden = shapes.pop()
    return SliceShape(hidden=hidden, qkv_rows=qkv, o_in=o_in, mlp=mlp, blocks=len(blocks))


def plan_width(model: nn.Module, method: Slicer, ratio: float) -> tuple[int, dict[str, Any]]:
    """The width for the SVD plan's parameter count at ``ratio`` and the budget's numbers for the record (from the
    model's shapes alone: runs on the meta-device skeleton before the weights load). Named errors for an
    architecture ``method`` does not support and for a ratio no width reaches."""
    method.check_model(getattr(model.config, "model_type", None))
    layout = layout_for(model)
    shape = slice_shape(model, layout)
    target = budget(model, layout, ratio)
    width = solve_width(shape, target, ratio)
    removed = shape.removed(width)
    return width, {"width": width, "hidden": shape.hidden, "sliced_fraction": 1 - width / shape.hidden,
                   "target": target, "removed": removed, "overshoot": removed - target,
                   "max_structure": shape.dim_cost(width)}


def _linear(W: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(W.shape[1], W.shape[0], bias=b is not None, device=W.device, dtype=W.dtype)
    lin.weight.data.copy_(W)
    if b is not None:
        lin.bias.data.copy_(b)
    return lin


def _set_input(root: nn.Module, name: str, Q: torch.Tensor) -> None:
    lin = root.get_submodule(name)
    set_submodule(root, name, _linear(rotate_input(lin.weight.data, Q.to(lin.weight.device)),
                                      None if lin.bias is None else lin.bias.data))


def _set_output(root: nn.Module, name: str, Q: torch.Tensor) -> None:
    lin = root.get_submodule(name)
    Q = Q.to(lin.weight.device)
    set_submodule(root, name, _linear(rotate_output(lin.weight.data, Q),
                                      None if lin.bias is None else rotate_output(lin.bias.data[:, None], Q)[:, 0]))


def _set_shortcut(block: nn.Module, name: str, S: torch.Tensor) -> None:
    """The block's shortcut ``name`` becomes ``x -> x S`` (an ``nn.Linear`` without bias holding ``S^T``)."""
    w = block.self_attn.q_proj.weight
    setattr(block, name, _linear(S.T.to(w.device, w.dtype), None))


def _replace_norm(root: nn.Module, name: str, width: int, scale: float, eps: float) -> None:
    """A scale-free norm of the same class over ``width`` channels: weight the constant ``scale``, epsilon ``eps``."""
    old = root.get_submodule(name)
    new = type(old)(width, eps=eps)
    if getattr(new, "variance_epsilon", None) is None:
        raise ValueError(f"{name}: SliceGPT needs an RMSNorm with variance_epsilon; got {type(old).__name__}")
    w = old.weight
    new.weight = nn.Parameter(torch.full((width,), scale, dtype=w.dtype, device=w.device))
    set_submodule(root, name, new)


@torch.no_grad()
def fold_norms(model: nn.Module, layout: BlockLayout) -> None:
    """Move every RMSNorm's scale into the linears it feeds (q,k,v; gate,up; the final norm into the head) and set
    the scales to one; a tied head is untied first (it keeps the embedding's values in its own parameter). The
    model computes the same function."""
    head = model.get_output_embeddings()
    if head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    for block in model.get_submodule(layout.layers):
        for norm_name, readers in INPUT_SIDE.items():
            norm = block.get_submodule(norm_name)
            for name in readers:
                lin = block.get_submodule(name)
                lin.weight.data = fold_scale(lin.weight.data, norm.weight.data)
            norm.weight.data.fill_(1.0)
    final = model.get_submodule(layout.layers.rsplit(".", 1)[0] + ".norm")
    head.weight.data = fold_scale(head.weight.data, final.weight.data)
    final.weight.data.fill_(1.0)


def _gram(xs: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``H = sum_n x_n^T x_n`` over every token of the batches ``xs`` (float64)."""
    H: torch.Tensor | None = None
    for x in xs:
        f = x.reshape(-1, x.shape[-1]).to(device, torch.float64)
        H = f.T @ f if H is None else H + f.T @ f
    assert H is not None
    return H


@dataclass
class SliceResult:
    """What :func:`slice_model` did: the width, per projection its dense and kept shapes (the engine's report
    format), per block the energy its positions kept, and the manifest's ``slicing`` entry."""

    width: int
    layers: dict[str, dict[str, Any]]
    blocks: list[dict[str, Any]]
    spec: dict[str, Any]
    shortcut_parameters: int
    tokens: int
    timings: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def slice_model(model: nn.Module, width: int, calib_ids: torch.Tensor, cfg: EngineConfig) -> SliceResult:
    """Fold, rotate and slice ``model`` in place to ``width`` (``width = d``: rotation only, the same function)."""
    layout = layout_for(model)
    shape = slice_shape(model, layout)
    d = shape.hidden
    if not 1 <= width <= d:
        raise ValueError(f"SliceGPT's width must be in [1, {d}]; got {width}")
    blocks = model.get_submodule(layout.layers)
    base = {p: tuple(model.get_submodule(p).weight.shape) for p in projections(model, layout)}
    eps = float(blocks[0].input_layernorm.variance_epsilon)
    scale, eps_sliced = norm_correction(d, width, eps)
    stream_device = cfg.stream_device or cfg.device
    t_fwd = t_rot = 0.0

    t0 = time.perf_counter()
    fold_norms(model, layout)
    xs, kws = capture_block_inputs(model, blocks, calib_ids, cfg.batch_size, cfg.device, stream_device)
    t_fwd += time.perf_counter() - t0

    t0 = time.perf_counter()
    vals, Q = principal_directions(_gram(xs, cfg.device))
    Q_in = Q[:, :width]
    embed = model.get_input_embeddings()
    home = embed.weight.device  # the product on the compute device (vocab x d x width flops), the weight back home
    embed.weight = nn.Parameter(rotate_input(embed.weight.data.to(cfg.device), Q_in.to(cfg.device)).to(home))
    embed.embedding_dim = width
    xs = [rotate_input(x.to(cfg.device), Q_in.to(cfg.device)).to(x.device) for x in xs]  # on the compute device
    energy_in = kept_variance(vals, width)
    block_energy: list[dict[str, Any]] = []
    t_rot += time.perf_counter() - t0

    for i, block in enumerate(blocks):
        home = next(block.parameters()).device
        block.to(cfg.device)
        last = i == len(blocks) - 1
        t0 = time.perf_counter()
        to_sliced(block, width, d, d)  # the shortcuts map back to the dense basis until the next Q is known
        for name in INPUT_SIDE["input_layernorm"]:
            _set_input(block, name, Q_in)
        _replace_norm(block, "input_layernorm", width, scale, eps_sliced)
        _set_shortcut(block, "attn_shortcut", Q_in.T)  # x_in Q_in^T: the residual in the dense basis
        t_rot += time.perf_counter() - t0

        # the signal entering the MLP norm, with the attention reading the sliced stream
        t0 = time.perf_counter()
        mids: list[torch.Tensor] = []

        def seen(_m: nn.Module, args: tuple, mids: list[torch.Tensor] = mids) -> None:
            mids.append(args[0].detach().to(stream_device))
            raise StopForward

        hook = block.post_attention_layernorm.register_forward_pre_hook(seen)
        try:
            for x, kw in zip(xs, kws[i]):
                try:
                    block(x.to(cfg.device), **kw)
                except StopForward:
                    pass
        finally:
            hook.remove()
        t_fwd += time.perf_counter() - t0

        t0 = time.perf_counter()
        vals_mid, Q = principal_directions(_gram(mids, cfg.device))
        del mids
        Q_mid = Q[:, :width]
        _set_shortcut(block, "attn_shortcut", shortcut(Q_in, Q_mid))
        _set_output(block, "self_attn.o_proj", Q_mid)
        for name in INPUT_SIDE["post_attention_layernorm"]:
            _set_input(block, name, Q_mid)
        _replace_norm(block, "post_attention_layernorm", width, scale, eps_sliced)
        _set_shortcut(block, "mlp_shortcut", Q_mid.T)
        t_rot += time.perf_counter() - t0

        # the block's output, with the MLP reading the sliced stream
        t0 = time.perf_counter()
        ys = [first_output(block(x.to(cfg.device), **kw)).to(stream_device) for x, kw in zip(xs, kws[i])]
        t_fwd += time.perf_counter() - t0

        t0 = time.perf_counter()
        vals_out, Q = principal_directions(_gram(ys, cfg.device))
        Q_out = Q[:, :d if last else width]  # the last block's output and the head keep the full width
        _set_shortcut(block, "mlp_shortcut", shortcut(Q_mid, Q_out))
        _set_output(block, "mlp.down_proj", Q_out)
        xs = [rotate_input(y.to(cfg.device), Q_out.to(cfg.device)).to(y.device) for y in ys]
        block_energy.append({"kept_variance_attn_in": energy_in,
                             "kept_variance_mlp_in": kept_variance(vals_mid, width)})
        energy_in = kept_variance(vals_out, Q_out.shape[1])
        Q_in = Q_out
        block.to(home)
        t_rot += time.perf_counter() - t0

    head = model.get_output_embeddings()
    home = head.weight.device
    head.weight = nn.Parameter(rotate_input(head.weight.data.to(cfg.device), Q_in.to(cfg.device)).to(home))
    model.config.tie_word_embeddings = False

    layers = {}
    for name, (m, n) in base.items():
        kept_m, kept_n = model.get_submodule(name).weight.shape
        layers[name] = {"m": m, "n": n, "rank": None, "kept_m": int(kept_m), "kept_n": int(kept_n)}
    shortcuts = sum(b.attn_shortcut.weight.numel() + b.mlp_shortcut.weight.numel() for b in blocks)
    spec = {"width": width, "hidden": d, "head_width": d, "norm_scale": scale, "norm_eps": eps_sliced,
            "base_norm_eps": eps, "shortcut_parameters": shortcuts, "untied_head": True,
            "shortcuts": [[list(b.attn_shortcut.weight.shape[::-1]), list(b.mlp_shortcut.weight.shape[::-1])]
                          for b in blocks]}
    return SliceResult(width, layers, block_energy, spec, shortcuts, int(calib_ids.numel()),
                       {"calibration": t_fwd, "factorisation": t_rot})


def rebuild_sliced(model: nn.Module, spec: dict[str, Any]) -> None:
    """Give a freshly built base model (untied head; its projections already at their pruned shapes by
    :func:`saes.engine.structure.rebuild`) the modules a sliced model has: the embeddings at the sliced width, the
    in-block norms over ``width`` channels with the recorded epsilon, the shortcut linears. Weights are loaded
    afterwards."""
    layout = layout_for(model)
    blocks = model.get_submodule(layout.layers)
    if len(spec["shortcuts"]) != len(blocks):
        raise ValueError(f"slicing lists {len(spec['shortcuts'])} blocks, the model has {len(blocks)}")
    width = int(spec["width"])
    old = model.get_input_embeddings()
    model.set_input_embeddings(nn.Embedding(old.num_embeddings, width, padding_idx=old.padding_idx,
                                            device=old.weight.device, dtype=old.weight.dtype))
    for block, ((a_in, a_out), (m_in, m_out)) in zip(blocks, spec["shortcuts"]):
        to_sliced(block, a_in, a_out, m_out)
        if m_in != a_out:
            raise ValueError(f"slicing: the MLP shortcut reads {m_in} channels, the attention's writes {a_out}")
        for name in INPUT_SIDE:
            _replace_norm(block, name, a_in if name == "input_layernorm" else a_out, float(spec["norm_scale"]),
                          float(spec["norm_eps"]))
    model.config.tie_word_embeddings = False
