"""Optional LoRA fine-tuning after compression (``finetune=lora``; off by default).

SVD-LLM (arXiv 2403.07378, Sec. 3.2 of v5) fine-tunes the compressed factors with LoRA,
sequentially: first the left factors ``A`` (``W_u``) with ``B`` frozen, then ``B`` (``W_v``)
with the updated ``A`` frozen. The SAES paper marks such fine-tuned baselines with a
dagger; records carry the ``finetune`` config and the tables mark it. Adapters are merged
into the factors at the end, so the parameter count is unchanged.

Choices (ours): the adapters sit on the ``LowRankLinear`` factors only; the text is drawn
from a configurable source with its own seed (default: the offline ``wiki_books``
calibration part, which never overlaps the evaluation part; SVD-LLM used Alpaca, which is
not available offline); plain AdamW, constant learning rate, no weight decay.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, fields
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from tqdm.auto import tqdm

from saes.core.lowrank import LowRankLinear
from saes.inputs import data as data_mod
from saes.io import token_digest

log = logging.getLogger(__name__)
MODES = ("sequential", "joint")


@dataclass(frozen=True)
class LoraSettings:
    """The ``finetune`` config group (``conf/finetune/lora.yaml`` says what each value means)."""
    mode: str
    r: int
    alpha: float
    dropout: float
    lr: float
    epochs: int
    batch_size: int
    source: str
    nsamples: int
    seqlen: int
    seed: int
    path: str | None = None
    split: str | None = None

    @classmethod
    def from_config(cls, ft: DictConfig) -> "LoraSettings":
        """The values of the config group (checked by :func:`check_finetune` when the run is validated)."""
        return cls(**{f.name: ft.get(f.name) for f in fields(cls)})


def check_finetune(ft: DictConfig) -> None:
    """Cheap checks before any work."""
    if ft.mode not in MODES:
        raise ValueError(f"finetune.mode must be one of {MODES}; got {ft.mode!r}")
    if ft.r < 1 or ft.epochs < 1 or ft.nsamples < 1 or ft.seqlen < 2 or ft.batch_size < 1 or not ft.lr > 0:
        raise ValueError("finetune needs r, epochs, nsamples, batch_size >= 1, seqlen >= 2 and lr > 0; got "
                         f"r={ft.r}, epochs={ft.epochs}, nsamples={ft.nsamples}, seqlen={ft.seqlen}, "
                         f"batch_size={ft.batch_size}, lr={ft.lr}")
    data_mod.check_source("finetune", ft.source, ft.get("path"), ft.get("split"))


def _factor_names(model: nn.Module, which: str) -> list[str]:
    return [f"{name}.{which}" for name, mod in model.named_modules() if isinstance(mod, LowRankLinear)]


def lora_finetune(model: nn.Module, tokenizer: Any, ft: LoraSettings, device: torch.device) -> dict[str, Any]:
    """Fine-tune the low-rank factors in place with LoRA adapters, merged back at the end. Seeded by
    ``finetune.seed`` (data order, adapter initialisation, dropout), without touching the caller's RNG."""
    if not _factor_names(model, "A"):
        raise ValueError("finetune=lora needs a compressed model (no LowRankLinear layers found)")
    ids = data_mod.calibration_ids(tokenizer, ft.source, ft.nsamples, ft.seqlen, ft.seed, ft.path, ft.split,
                                   "finetune")
    phases = [("A",), ("B",)] if ft.mode == "sequential" else [("A", "B")]
    report: dict[str, Any] = {"tokens_sha256": token_digest(ids), "phases": []}
    model.to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the caller's RNG untouched
        torch.manual_seed(int(ft.seed))  # the adapters' initialisation and dropout: the same run, the same result
        model = _train_phases(model, ids, ft, phases, device, report)
    return report


def _train_phases(model: nn.Module, ids: torch.Tensor, ft: LoraSettings, phases: list[tuple[str, ...]],
                  device: torch.device, report: dict[str, Any]) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    for phase in phases:
        t0 = time.perf_counter()
        targets = [n for which in phase for n in _factor_names(model, which)]
        peft_model = get_peft_model(model, LoraConfig(r=ft.r, lora_alpha=ft.alpha, lora_dropout=ft.dropout,
                                                      target_modules=targets, bias="none"))
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=ft.lr, weight_decay=0.0)
        # A float16 base on CUDA: its activation gradients underflow without loss scaling (the adapters are float32
        # either way); disabled, the scaler passes everything through unchanged.
        half = next(p.dtype for p in model.parameters() if p.is_floating_point()) == torch.float16
        scaler = torch.amp.GradScaler(device.type, enabled=half and device.type == "cuda")
        g = torch.Generator().manual_seed(int(ft.seed))
        losses: list[float] = []
        peft_model.train()
        steps = ft.epochs * -(-ids.shape[0] // ft.batch_size)
        bar = tqdm(total=steps, desc=f"lora[{'+'.join(phase)}]", unit="step")
        for _ in range(ft.epochs):
            order = torch.randperm(ids.shape[0], generator=g)
            for start in range(0, ids.shape[0], ft.batch_size):
                x = ids[order[start:start + ft.batch_size]].to(device)
                loss = peft_model(input_ids=x, labels=x, use_cache=False).loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"LoRA fine-tuning diverged (loss {float(loss)})")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                losses.append(float(loss.detach()))
                bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.close()
        model = peft_model.merge_and_unload()
        model.eval()
        per_epoch = len(losses) // ft.epochs
        report["phases"].append({"targets": "+".join(phase), "steps": len(losses),
                                 "loss_first_epoch": sum(losses[:per_epoch]) / per_epoch,
                                 "loss_last_epoch": sum(losses[-per_epoch:]) / per_epoch,
                                 "seconds": time.perf_counter() - t0})
    for p in model.parameters():
        p.requires_grad_(True)
    return model
