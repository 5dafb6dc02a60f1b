"""The one sequential block loop with two activation streams (GPTQ's scheme).

For the same calibration tokens the engine keeps

* the **FP stream** ``X^f``: hidden states propagated through the original blocks;
* the **compressed stream** ``X``: hidden states propagated through the blocks as
  compressed so far.

Inside a block the projections are compressed group by group in the order of the
architecture's layout (``[q,k,v] -> [o] -> [gate,up] -> [down]`` for LLaMA), so the
input of ``o`` already sees the compressed ``q,k,v`` ("true sequential"). Statistics
are streamed batch by batch per input site (projections of one group share one
input); no activations beyond the two streams' block inputs are stored. One block at
a time lives on the compute device.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .linalg import FactorizationError, check_finite
from .lowrank import LowRankLinear, rank_for_ratio, set_submodule
from .method import Method, Stream
from .stats import SiteStats, StreamingStats

log = logging.getLogger(__name__)


class UnsupportedModelError(ValueError):
    """The engine does not know this architecture's decoder blocks."""


@dataclass(frozen=True)
class BlockLayout:
    layers: str  # dotted path from the causal LM to the ModuleList of decoder blocks
    groups: tuple[tuple[str, ...], ...]  # true-sequential groups; members of a group share one input

    @property
    def projections(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)


_LLAMA_LIKE = BlockLayout(
    layers="model.layers",
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)

# The only architecture-specific names in the project: ``config.model_type`` -> layout.
LAYOUTS: dict[str, BlockLayout] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
}


def layout_for(model: nn.Module) -> BlockLayout:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LAYOUTS:
        raise UnsupportedModelError(
            f"the engine does not know the decoder blocks of model_type={model_type!r}; "
            f"known: {sorted(LAYOUTS)}. Add its layout to saes.engine.LAYOUTS"
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


def check_plan(model: nn.Module, layout: BlockLayout, ranks: dict[str, int]) -> None:
    """A rank plan names every projection exactly once, each with ``1 <= r <= min(m, n)``."""
    want = plan_ranks(model, layout, 0.5).keys()
    if set(ranks) != set(want):
        missing, extra = sorted(set(want) - set(ranks)), sorted(set(ranks) - set(want))
        raise ValueError(f"rank plan does not match the model: missing {missing[:3]}, unknown {extra[:3]}")
    for name, r in ranks.items():
        m, n = model.get_submodule(name).weight.shape
        if not (isinstance(r, int) and 1 <= r <= min(m, n)):
            raise ValueError(f"rank plan gives {name} [{m}x{n}] rank {r!r}; need an int in [1, {min(m, n)}]")


def plan_ranks(model: nn.Module, layout: BlockLayout, ratio: float) -> dict[str, int]:
    """Uniform ranks for every projection of every block (raises before any work on bad ratios)."""
    ranks = {}
    for i, block in enumerate(model.get_submodule(layout.layers)):
        for name in layout.projections:
            m, n = block.get_submodule(name).weight.shape
            ranks[f"{layout.layers}.{i}.{name}"] = rank_for_ratio(m, n, ratio)
    return ranks


@dataclass
class EngineConfig:
    device: torch.device
    batch_size: int = 8
    stats_dtype: torch.dtype = torch.float32
    stream: Stream | None = None  # None: the method's own choice; "fp"/"compressed" override it
    stream_device: torch.device | None = None  # where the two streams live (default: device)
    offload_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    track_fidelity: bool = False  # propagate both streams to record per-block cosine similarity
    cache_dir: Path | None = None  # where methods may cache model-level pre-pass results (e.g. ASVD's STRS table)
    model_identity: str = ""  # what the weights are (part of every cache key)


@dataclass
class CompressionReport:
    stream: str
    tokens: int
    layers: dict[str, dict[str, Any]]  # per projection: shape, rank, method diagnostics, seconds
    blocks: list[dict[str, Any]]  # per block: cosine similarity of the two streams' outputs (if both kept)
    timings: dict[str, float]  # calibration (forwards + statistics), factorisation


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted input has been seen."""


def _first(out: Any) -> torch.Tensor:
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
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, ids.shape[0], batch_size):
            try:
                model(input_ids=ids[start:start + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return hidden, kwargs


@torch.no_grad()
def _site_input(block: nn.Module, site: str, x: torch.Tensor, kw: dict) -> torch.Tensor:
    """Input of ``block.<site>`` for block input ``x``; the forward stops right there."""
    seen: list[torch.Tensor] = []

    def hook(_mod: nn.Module, args: tuple) -> None:
        seen.append(args[0])
        raise _Stop

    handle = block.get_submodule(site).register_forward_pre_hook(hook)
    try:
        block(x, **kw)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"the forward pass of the block never reached {site}")
    return seen[0]


@torch.no_grad()
def _group_stats(block: nn.Module, ref: nn.Module | None, site: str, X: list[torch.Tensor], Xf: list[torch.Tensor],
                 kws: list[dict], stream: Stream, needs: frozenset[str], dtype: torch.dtype, device: torch.device,
                 where: str) -> SiteStats:
    """``H`` (and ``Delta``) at the input of ``site``, streamed over all calibration batches.

    On the compressed stream ``X`` comes from the block as compressed so far and ``X^f``
    from ``ref`` (the original block); on the FP stream ``X = X^f``, so ``Delta = 0``.
    """
    needs_delta = "Delta" in needs
    with_delta = needs_delta and stream == "compressed"
    site_block, inputs = (block, X) if stream == "compressed" else (ref, Xf)
    wanted = needs if with_delta else needs - {"Delta"}
    acc = StreamingStats(block.get_submodule(site).in_features, wanted, dtype=dtype, device=device)
    for b, kw in enumerate(kws):
        x = _site_input(site_block, site, inputs[b].to(device), kw)
        acc.update(x, _site_input(ref, site, Xf[b].to(device), kw) if with_delta else None)
    stats = acc.finalize(where)
    if needs_delta and not with_delta:  # X = X^f on the FP stream
        n = block.get_submodule(site).in_features
        stats = SiteStats(stats.tokens, stats.H, torch.zeros(n, n, dtype=dtype, device=device), stats.absmean)
    return stats


def needs_calibration(method: Method, track_fidelity: bool) -> bool:
    """Whether the engine runs calibration forwards at all (data-free methods skip them)."""
    return method.needs_data or track_fidelity


@torch.no_grad()
def compress_model(model: nn.Module, method: Method, ranks: dict[str, int], calib_ids: torch.Tensor | None,
                   cfg: EngineConfig) -> CompressionReport:
    """Replace every planned projection by a :class:`LowRankLinear` from ``method``; in place."""
    layout = layout_for(model)
    blocks = model.get_submodule(layout.layers)
    stream = cfg.stream or method.stream
    needs_delta = "Delta" in method.needs
    data_free = not needs_calibration(method, cfg.track_fidelity)
    keep_comp = not data_free and (stream == "compressed" or cfg.track_fidelity)
    keep_fp = not data_free and (stream == "fp" or needs_delta or cfg.track_fidelity)
    if stream == "fp" and needs_delta:
        log.warning("%s needs Delta but runs on the FP stream: Delta is identically zero", method.name)
    stream_device = cfg.stream_device or cfg.device
    timings = {"calibration": 0.0, "factorisation": 0.0}

    X: list[torch.Tensor] = []
    Xf: list[torch.Tensor] = []
    kws: list[dict] = []
    tokens = 0
    if not data_free:
        if calib_ids is None:
            raise ValueError(f"method {method.name!r} needs calibration data")
        t0 = time.perf_counter()
        first, kws = capture_block_inputs(model, blocks, calib_ids, cfg.batch_size, cfg.device, stream_device)
        X = first if keep_comp else []
        Xf = [x.clone() for x in first] if (keep_fp and keep_comp) else (first if keep_fp else [])
        tokens = int(calib_ids.numel())
        timings["calibration"] += time.perf_counter() - t0

    layers: dict[str, dict[str, Any]] = {}
    block_diag: list[dict[str, Any]] = []
    bar = tqdm(range(len(blocks)), desc=f"compress[{method.name}]", unit="block")
    for i in bar:
        block = blocks[i].to(cfg.device)
        ref = copy.deepcopy(block) if keep_fp else None  # original weights: the FP stream's block
        for group in layout.groups:
            t0 = time.perf_counter()
            stats = SiteStats(tokens=0)
            if method.needs:
                stats = _group_stats(block, ref, group[0], X, Xf, kws, stream, method.needs, cfg.stats_dtype,
                                     cfg.device, f"{layout.layers}.{i}.{group[0]}").to(method.compute_dtype)
            timings["calibration"] += time.perf_counter() - t0
            for name in group:
                full = f"{layout.layers}.{i}.{name}"
                t0 = time.perf_counter()
                dense: nn.Linear = block.get_submodule(name)
                W = dense.weight.to(method.compute_dtype)
                m, n = W.shape
                try:
                    f = method.factorize(W, stats, ranks[full], layer=full)
                    if f.A.shape != (m, ranks[full]) or f.B.shape != (ranks[full], n):
                        raise FactorizationError(f"{method.name} returned A {tuple(f.A.shape)}, B {tuple(f.B.shape)}")
                    check_finite(A=f.A, B=f.B)
                except FactorizationError as exc:
                    raise FactorizationError(f"{full}: {exc}") from exc
                dt = dense.weight.dtype
                set_submodule(block, name, LowRankLinear.from_factors(f.A.to(dt), f.B.to(dt), dense.bias))
                seconds = time.perf_counter() - t0
                timings["factorisation"] += seconds
                layers[full] = {"m": m, "n": n, "rank": ranks[full], "seconds": seconds, **f.diagnostics}
        t0 = time.perf_counter()
        if keep_comp:
            X = [_first(block(x.to(cfg.device), **kw)).to(stream_device) for x, kw in zip(X, kws)]
        if keep_fp:
            Xf = [_first(ref(x.to(cfg.device), **kw)).to(stream_device) for x, kw in zip(Xf, kws)]
        info: dict[str, Any] = {"index": i}
        if keep_comp and keep_fp:
            cos = [torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean() for a, b in zip(X, Xf)]
            info["cosine_fp"] = float(torch.stack(cos).mean())
            bar.set_postfix(cos=f"{info['cosine_fp']:.4f}")
        block_diag.append(info)
        del ref
        blocks[i] = block.to(cfg.offload_device)
        timings["calibration"] += time.perf_counter() - t0
    return CompressionReport(stream=stream if not data_free else "none", tokens=tokens, layers=layers,
                             blocks=block_diag, timings=timings)
