"""Where a model sits while it is evaluated: on the device, or on the CPU with one module at a time on the device.

``offload=true`` (models larger than the GPU): the weights stay on the CPU and accelerate's
``cpu_offload`` hooks move each module's weights to the device for its own forward and drop
them after, so the GPU holds about one layer. Compression never needs this: the engine keeps
the model on the CPU and moves one decoder block at a time (``calib.stream_device=cpu`` and
``calib.stats_device=cpu`` keep the activations and statistics off the GPU too).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


@contextmanager
def placed(model: nn.Module, device: torch.device, offload: bool = False) -> Iterator[nn.Module]:
    """The model ready to run on ``device``. Without ``offload`` it is moved there (and stays);
    with it the hooks are removed on exit and the weights are plain CPU tensors again."""
    if not offload:
        model.to(device)
        yield model
        return
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module

    model.to("cpu")
    cpu_offload(model, execution_device=device)
    try:
        yield model
    finally:
        remove_hook_from_module(model, recurse=True)
        if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
            model.tie_weights()  # the hooks' restore unties shared embeddings
