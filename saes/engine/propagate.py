"""Hidden states into and through the decoder blocks: the pieces every block-by-block pass is made of.

:func:`dense_blocks` is the one dense block-by-block pass for methods' whole-model pre-passes (AdaSVD's
layer importance, ASVD's ``mean|x|`` and sensitivity inputs); the engine's two-stream loop uses the
same pieces (:func:`capture_block_inputs`, :func:`forward_capturing`, :func:`through`).
:func:`sequence_gradients` is the one whole-model backward pass (FWSVD's Fisher, Dip-SVD's block sensitivity,
LLM-Pruner's first-order scores).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from saes.core.lowrank import set_submodule
from saes.engine.config import EngineConfig
from saes.engine.layout import BlockLayout


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted input has been seen."""


def first_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _move(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_move(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def _to_device_except(module: nn.Module, skip: nn.Module, device: torch.device) -> None:
    """Move everything but ``skip`` (the decoder blocks) to ``device``."""
    if module is skip:
        return
    if not any(sub is skip for sub in module.modules()):
        module.to(device)
        return
    for key, buf in module._buffers.items():
        if buf is not None:
            module._buffers[key] = buf.to(device)
    for child in module.children():
        _to_device_except(child, skip, device)


class _Recorder(nn.Module):
    """Stands in for a decoder block during :func:`capture_block_inputs`: keeps its call's kwargs and returns its
    input unchanged; the last one ends the forward. Other attributes are the block's (models may read them)."""

    def __init__(self, block: nn.Module, calls: list[tuple[torch.Tensor, dict]], last: bool) -> None:
        super().__init__()
        object.__setattr__(self, "block", block)  # not a submodule: the recorder holds no weights
        self.calls, self.last = calls, last

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "block"), name)

    def forward(self, *args: Any, **kw: Any) -> torch.Tensor:
        hs = args[0] if args else kw.pop("hidden_states")
        self.calls.append((hs, kw))
        if self.last:
            raise StopForward
        return hs


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor, batch_size: int,
                         device: torch.device,
                         stream_device: torch.device) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Hidden states entering block 0, per batch, and every block's call kwargs, ``kws[block][batch]``.

    The kwargs (masks, rotary embeddings) are per block: a model may give its blocks different ones (Gemma 3's
    sliding-window and full-attention layers). The blocks are replaced by recorders for the model's forward, so
    none of them runs; where blocks share a mask the kwargs share its tensor (no copy on ``device``). The rest of
    the model (embeddings, final norm, head, rotary buffers) runs on ``device`` for the capture and goes back to
    where the input embeddings were afterwards: callers move one block at a time, and a model left half on the GPU
    would make the next whole-model forward (a perplexity, a search's trial) mix devices."""
    home = model.get_input_embeddings().weight.device
    _to_device_except(model, blocks, device)
    calls: list[list[tuple[torch.Tensor, dict]]] = [[] for _ in blocks]
    originals = list(blocks)
    try:
        for i, block in enumerate(originals):
            blocks[i] = _Recorder(block, calls[i], last=i == len(originals) - 1)
        for start in range(0, ids.shape[0], batch_size):
            try:
                model(input_ids=ids[start:start + batch_size].to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
        _to_device_except(model, blocks, home)
    hidden = [hs.detach().to(stream_device) for hs, _ in calls[0]]
    return hidden, [[_move(kw, device) for _, kw in block_calls] for block_calls in calls]


@torch.no_grad()
def forward_capturing(block: nn.Module, x: torch.Tensor, kw: dict, sites: Iterable[str],
                      seen: Callable[[str, torch.Tensor], None]) -> torch.Tensor:
    """The block's output for input ``x``; ``seen(site, input)`` gets the input of each of ``sites`` on the way."""
    handles = [block.get_submodule(site).register_forward_pre_hook(lambda _m, args, site=site: seen(site, args[0]))
               for site in sites]
    try:
        return first_output(block(x, **kw))
    finally:
        for handle in handles:
            handle.remove()


def through(block: nn.Module, xs: list[torch.Tensor], kws: list[dict], device: torch.device,
            stream_device: torch.device) -> list[torch.Tensor]:
    """Every batch of a stream through ``block``: the inputs of the next block. Takes the stream over: each input
    batch is released as its output is made, so a stream and its next never both live whole (``xs`` is left
    empty; every caller replaces its stream by the result)."""
    out = []
    for b, kw in enumerate(kws[:len(xs)]):
        out.append(first_output(block(xs[b].to(device), **kw)).to(stream_device))
        xs[b] = None  # type: ignore[call-overload]  # the batch's input, no longer needed
    xs.clear()
    return out


@dataclass(frozen=True)
class BlockPass:
    """One dense decoder block as :func:`dense_blocks` passes it: per batch its input ``x_l``, output ``x_{l+1}``."""

    index: int
    block: nn.Module  # on cfg.device for the callback's duration
    inputs: list[torch.Tensor]  # on cfg.stream_device (default: cfg.device)
    outputs: list[torch.Tensor]
    kws: list[dict]  # the block's call kwargs per batch (masks, rotary embeddings)


@torch.no_grad()
def dense_blocks(model: nn.Module, layout: BlockLayout, ids: torch.Tensor, cfg: EngineConfig,
                 on_block: Callable[[BlockPass], None] | None = None,
                 on_input: Callable[[str, torch.Tensor], None] | None = None) -> None:
    """Propagate ``ids`` through the dense decoder blocks one block at a time, as the engine's FP stream does.

    Batches of ``cfg.batch_size`` sequences; each block is moved to ``cfg.device`` and back to where it was,
    hidden states live on ``cfg.stream_device``. ``on_input(name, x)`` sees the input of every projection
    (full name, ``model.layers.3.self_attn.q_proj``) batch by batch, ``on_block`` each block once all its
    batches went through. The weights are not changed (a pre-pass on the dense model)."""
    blocks = model.get_submodule(layout.layers)
    stream_device = cfg.stream_device or cfg.device
    xs, block_kws = capture_block_inputs(model, blocks, ids, cfg.batch_size, cfg.device, stream_device)
    sites = layout.projections if on_input is not None else ()
    for i, block in enumerate(blocks):
        home = next(block.parameters()).device
        block.to(cfg.device)
        prefix = f"{layout.layers}.{i}."
        seen = (lambda site, x: on_input(prefix + site, x)) if on_input is not None else None  # noqa: E731
        kws = block_kws[i]
        ys = [forward_capturing(block, x.to(cfg.device), kw, sites, seen).to(stream_device) for x, kw in zip(xs, kws)]
        if on_block is not None:
            on_block(BlockPass(i, block, xs, ys, kws))
        block.to(home)
        xs = ys


@contextmanager
def replaced(root: nn.Module, name: str, module: nn.Module) -> Iterator[nn.Module]:
    """``root.<name>`` is ``module`` inside the ``with`` body; the original object is put back after it."""
    original = root.get_submodule(name)
    set_submodule(root, name, module)
    try:
        yield module
    finally:
        set_submodule(root, name, original)


def sequence_gradients(model: nn.Module, names: Iterable[str], ids: torch.Tensor, device: torch.device | str,
                       on_grad: Callable[[str, torch.Tensor], None], desc: str) -> None:
    """Backpropagate the LM loss of each sequence of ``ids`` alone (one gradient per sequence) on ``device``.

    ``on_grad(name, grad)`` sees the gradient of each named ``nn.Linear``'s weight as soon as it is complete,
    after which it is freed, so at most one such gradient exists at a time; only those weights require grad
    during the pass. The parameters' ``requires_grad`` flags and the model's mode are restored; the model is
    left on ``device``. A non-finite loss is a ``FloatingPointError`` naming ``desc`` and the sequence."""
    linears = {name: model.get_submodule(name) for name in names}
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    hooks = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name, lin in linears.items():
            lin.weight.requires_grad_(True)

            def seen(p: torch.Tensor, name: str = name) -> None:  # runs as soon as the gradient is complete
                on_grad(name, p.grad)
                p.grad = None

            hooks.append(lin.weight.register_post_accumulate_grad_hook(seen))
        model.eval().to(device)
        for i, row in enumerate(tqdm(ids, desc=desc, unit="seq")):
            x = row[None].to(device)
            loss = model(input_ids=x, labels=x, use_cache=False).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: the LM loss on calibration sequence {i} is not finite")
            loss.backward()
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
