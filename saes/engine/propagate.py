"""Hidden states into and through the decoder blocks: the pieces every block-by-block pass is made of."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


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


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor, batch_size: int,
                         device: torch.device, stream_device: torch.device) -> tuple[list[torch.Tensor], list[dict]]:
    """Hidden states (and call kwargs: masks, rotary embeddings) entering block 0, per batch."""
    _to_device_except(model, blocks, device)
    hidden, kwargs = [], []

    def hook(_mod: nn.Module, args: tuple, kw: dict) -> None:
        kw = dict(kw)
        hs = args[0] if args else kw.pop("hidden_states")
        hidden.append(hs.detach().to(stream_device))
        kwargs.append(_move(kw, device))
        raise StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, ids.shape[0], batch_size):
            try:
                model(input_ids=ids[start:start + batch_size].to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    return hidden, kwargs
