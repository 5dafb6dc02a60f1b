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
from .data import token_digest
from .method import Method, Stream
from .resume import BlockCheckpoints, owned
from .stats import SiteStats, StreamingStats
from .stats_cache import CACHED, FREE, FPStatsCache

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
    stats_device: torch.device | None = None  # where statistics accumulate and are kept (default: device)
    reuse_stats: bool = False  # FP-stream statistics from/to <cache_dir>/stats (needs cache_dir and model_identity)
    resume_dir: Path | None = None  # per-block checkpoints: a rerun restarts after the last finished block
    resume_key: str = ""  # the run's config key: checkpoints of another key are refused


@dataclass
class CompressionReport:
    stream: str
    tokens: int
    layers: dict[str, dict[str, Any]]  # per projection: shape, rank, method diagnostics, seconds
    blocks: list[dict[str, Any]]  # per block: cosine similarity of the two streams' outputs (if both kept)
    timings: dict[str, float]  # calibration (forwards + statistics), factorisation
    resumed_from: int = 0  # blocks restored from per-block checkpoints
    cached_stats_blocks: int = 0  # blocks whose FP-stream statistics came from the cache


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
                 stats_device: torch.device, where: str) -> SiteStats:
    """``H`` (and ``Delta``) at the input of ``site``, streamed over all calibration batches.

    On the compressed stream ``X`` comes from the block as compressed so far and ``X^f``
    from ``ref`` (the original block); on the FP stream ``X = X^f``: ``Delta`` is left out
    (:func:`_only` fills in the zeros). Forwards run on ``device``, sums on ``stats_device``.
    """
    with_delta = "Delta" in needs and stream == "compressed"
    site_block, inputs = (block, X) if stream == "compressed" else (ref, Xf)
    wanted = needs if with_delta else needs - {"Delta"}
    acc = StreamingStats(block.get_submodule(site).in_features, wanted, dtype=dtype, device=stats_device)
    for b, kw in enumerate(kws):
        x = _site_input(site_block, site, inputs[b].to(device), kw)
        acc.update(x, _site_input(ref, site, Xf[b].to(device), kw) if with_delta else None)
    return acc.finalize(where)


def _only(stats: SiteStats, needs: frozenset[str]) -> SiteStats:
    """Just the statistics a method asked for (a cache entry holds more); ``Delta = 0`` where ``X = X^f``."""
    delta = stats.Delta
    if "Delta" in needs and delta is None:
        delta = torch.zeros_like(stats.H)
    return SiteStats(stats.tokens, stats.H if "H" in needs else None, delta if "Delta" in needs else None,
                     stats.absmean if "absmean" in needs else None)


def needs_calibration(method: Method, track_fidelity: bool) -> bool:
    """Whether the engine runs calibration forwards at all (data-free methods skip them)."""
    return method.needs_data or track_fidelity


def _through(block: nn.Module, xs: list[torch.Tensor], kws: list[dict], device: torch.device,
             stream_device: torch.device) -> list[torch.Tensor]:
    """Every batch of a stream through ``block``: the inputs of the next block."""
    return [_first(block(x.to(device), **kw)).to(stream_device) for x, kw in zip(xs, kws)]


@dataclass
class _Streams:
    X: list[torch.Tensor]  # compressed stream: block inputs per batch
    Xf: list[torch.Tensor]  # FP stream
    kws: list[dict]  # block call kwargs per batch (masks, rotary embeddings)


def _fp_stats_cache(model: nn.Module, layout: BlockLayout, method: Method, stream: Stream,
                    calib_ids: torch.Tensor | None, cfg: EngineConfig) -> FPStatsCache | None:
    """The FP-stream statistics cache of this model and calibration set, when reuse applies."""
    if not (cfg.reuse_stats and stream == "fp" and method.needs and calib_ids is not None):
        return None
    if cfg.cache_dir is None or not cfg.model_identity:
        log.info("statistics reuse needs EngineConfig.cache_dir and model_identity: computing them")
        return None
    if not method.needs <= CACHED | {"Delta"}:
        return None
    return FPStatsCache(Path(cfg.cache_dir) / "stats", {
        "model": cfg.model_identity, "dtype": str(next(model.parameters()).dtype), "tokens": token_digest(calib_ids),
        "batch_size": cfg.batch_size, "stats_dtype": str(cfg.stats_dtype), "device": cfg.device.type,
        "stats_device": (cfg.stats_device or cfg.device).type, "layers": layout.layers, "groups": layout.groups})


def _compress_block(block: nn.Module, ref: nn.Module | None, prefix: str, layout: BlockLayout, method: Method,
                    ranks: dict[str, int], streams: _Streams, stream: Stream, cfg: EngineConfig,
                    cached: dict[str, SiteStats], extra: frozenset[str],
                    timings: dict[str, float]) -> tuple[dict[str, dict[str, Any]], dict[str, SiteStats]]:
    """Compress one block group by group, in place; returns its layers' diagnostics and the statistics it computed.

    ``cached``: statistics per site (``self_attn.q_proj``) from the FP-stream cache; ``extra``:
    statistics to compute beyond the method's needs, for the cache (those that cost next to nothing)."""
    needs = method.needs | extra
    layers: dict[str, dict[str, Any]] = {}
    fresh: dict[str, SiteStats] = {}
    for group in layout.groups:
        t0 = time.perf_counter()
        stats = SiteStats(tokens=0)
        if method.needs:
            site = group[0]
            if site in cached:
                stats = cached[site]
            else:
                stats = fresh[site] = _group_stats(block, ref, site, streams.X, streams.Xf, streams.kws, stream, needs,
                                                   cfg.stats_dtype, cfg.device, cfg.stats_device or cfg.device,
                                                   f"{prefix}.{site}")
            stats = _only(stats, method.needs).to(method.compute_dtype, cfg.device)
        timings["calibration"] += time.perf_counter() - t0
        for name in group:
            full = f"{prefix}.{name}"
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
    return layers, fresh


@torch.no_grad()
def compress_model(model: nn.Module, method: Method, ranks: dict[str, int], calib_ids: torch.Tensor | None,
                   cfg: EngineConfig) -> CompressionReport:
    """Replace every planned projection by a :class:`LowRankLinear` from ``method``; in place.

    With ``cfg.resume_dir`` each finished block is checkpointed and a rerun restores the
    finished blocks instead of recompressing them (:mod:`saes.resume`); with ``cfg.reuse_stats``
    FP-stream statistics come from / go to a cache (:mod:`saes.stats_cache`). Neither changes
    the result."""
    layout = layout_for(model)
    blocks = model.get_submodule(layout.layers)
    stream = cfg.stream or method.stream
    needs_delta = "Delta" in method.needs
    data_free = not needs_calibration(method, cfg.track_fidelity)
    if not data_free and calib_ids is None:
        raise ValueError(f"method {method.name!r} needs calibration data")
    if stream == "fp" and needs_delta:
        log.warning("%s needs Delta but runs on the FP stream: Delta is identically zero", method.name)
    with owned(cfg.resume_dir):  # a failure gives the folder up (its finished blocks stay)
        ckpt = BlockCheckpoints(cfg.resume_dir, cfg.resume_key, method.name, stream, ranks) if cfg.resume_dir else None
        start = ckpt.done if ckpt is not None else 0
        if start:
            log.info("resuming %s: blocks 0..%d restored from %s", method.name, start - 1, ckpt.folder)
        cache = _fp_stats_cache(model, layout, method, stream, calib_ids, cfg)
        sites = [group[0] for group in layout.groups]
        wanted = method.needs & CACHED  # what must be in the cache for a hit (Delta is zero on the FP stream)
        cached = {i for i in range(start, len(blocks)) if cache is not None and cache.has(i, sites, wanted)}
        # the streams are needed unless every block left to compress has cached statistics
        need_streams = not data_free and (cfg.track_fidelity or len(cached) < len(blocks) - start)
        keep_comp = need_streams and (stream == "compressed" or cfg.track_fidelity)
        keep_fp = need_streams and (stream == "fp" or needs_delta or cfg.track_fidelity)
        stream_device = cfg.stream_device or cfg.device
        timings = {"calibration": 0.0, "factorisation": 0.0}

        streams = _Streams([], [], [])
        if need_streams:
            t0 = time.perf_counter()
            first, streams.kws = capture_block_inputs(model, blocks, calib_ids, cfg.batch_size, cfg.device, stream_device)
            streams.X = first if keep_comp else []
            streams.Xf = [x.clone() for x in first] if (keep_fp and keep_comp) else (first if keep_fp else [])
            timings["calibration"] += time.perf_counter() - t0

        layers: dict[str, dict[str, Any]] = {}
        block_diag: list[dict[str, Any]] = []
        bar = tqdm(range(len(blocks)), desc=f"compress[{method.name}]", unit="block")
        for i in bar:
            block = blocks[i].to(cfg.device)
            ref = copy.deepcopy(block) if keep_fp else None  # original weights: the FP stream's block
            prefix = f"{layout.layers}.{i}"
            if i < start:
                block_layers = ckpt.restore(i, block, prefix, layout.projections, ranks)
            else:
                site_stats = cache.load(i, wanted, cfg.stats_device or cfg.device) if i in cached else {}
                block_layers, fresh = _compress_block(block, ref, prefix, layout, method, ranks, streams, stream, cfg,
                                                      site_stats, FREE if cache is not None else frozenset(), timings)
                if cache is not None and fresh:
                    cache.save(i, fresh)
            layers.update(block_layers)
            t0 = time.perf_counter()
            if keep_comp:
                streams.X = _through(block, streams.X, streams.kws, cfg.device, stream_device)
            if keep_fp:
                streams.Xf = _through(ref, streams.Xf, streams.kws, cfg.device, stream_device)
            info: dict[str, Any] = {"index": i}
            if keep_comp and keep_fp:
                cos = [torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean()
                       for a, b in zip(streams.X, streams.Xf)]
                info["cosine_fp"] = float(torch.stack(cos).mean())
                bar.set_postfix(cos=f"{info['cosine_fp']:.4f}")
            block_diag.append(info)
            del ref
            blocks[i] = block.to(cfg.offload_device)
            timings["calibration"] += time.perf_counter() - t0
            if ckpt is not None and i >= start:
                t0 = time.perf_counter()
                ckpt.save(i, blocks[i], block_layers)
                timings["checkpoint"] = timings.get("checkpoint", 0.0) + time.perf_counter() - t0
        return CompressionReport(stream=stream if not data_free else "none",
                                 tokens=0 if data_free else int(calib_ids.numel()), layers=layers, blocks=block_diag,
                                 timings=timings, resumed_from=start, cached_stats_blocks=len(cached))
