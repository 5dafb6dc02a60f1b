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
    rerun: bool = False  # the reference path: re-run the block per group (layouts without stages always do)


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


def _factorize_group(block: nn.Module, group: tuple[str, ...], prefix: str, method: Method, ranks: dict[str, int],
                     stats: SiteStats, timings: dict[str, float], layers: dict[str, dict[str, Any]]) -> None:
    """Replace each projection of ``group`` by the method's factors (checked before they become a layer)."""
    for name in group:
        full = f"{prefix}.{name}"
        t0 = time.perf_counter()
        dense: nn.Linear = block.get_submodule(name)
        W = dense.weight.to(method.compute_dtype)
        m, n = W.shape
        dt = dense.weight.dtype
        try:
            f = method.factorize(W, stats, ranks[full], layer=full)
            if f.A.shape != (m, ranks[full]) or f.B.shape != (ranks[full], n):
                raise FactorizationError(f"{method.name} returned A {tuple(f.A.shape)}, B {tuple(f.B.shape)}")
            A, B = f.A.to(dt), f.B.to(dt)
            check_finite(A=A, B=B)  # in the model's dtype: float64-finite factors can overflow in fp16/fp32
        except FactorizationError as exc:
            raise FactorizationError(f"{full}: {exc}") from exc
        set_submodule(block, name, LowRankLinear.from_factors(A, B, dense.bias))
        seconds = time.perf_counter() - t0
        timings["factorisation"] += seconds
        layers[full] = {"m": m, "n": n, "rank": ranks[full], "seconds": seconds, **f.diagnostics}


def _compress_block_rerun(block: nn.Module, ref: nn.Module | None, prefix: str, layout: BlockLayout, method: Method,
                          ranks: dict[str, int], streams: _Streams, stream: Stream, cfg: EngineConfig,
                          cached: dict[str, SiteStats], extra: frozenset[str],
                          timings: dict[str, float]) -> tuple[dict[str, dict[str, Any]], dict[str, SiteStats]]:
    """The reference path: compress one block group by group, re-running the block (and ``ref``, the original)
    from its input up to each group's input site; returns its layers' diagnostics and the statistics it computed.

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
        _factorize_group(block, group, prefix, method, ranks, stats, timings, layers)
    return layers, fresh


@torch.no_grad()
def _forward_capturing(block: nn.Module, x: torch.Tensor, kw: dict, sites: list[str],
                       seen: Any) -> torch.Tensor:
    """The block's output for input ``x``; ``seen(site, input)`` gets the input of each of ``sites`` on the way."""
    handles = [block.get_submodule(site).register_forward_pre_hook(lambda _m, args, site=site: seen(site, args[0]))
               for site in sites]
    try:
        return _first(block(x, **kw))
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def _compress_block_staged(block: nn.Module, prefix: str, layout: BlockLayout, method: Method,
                           ranks: dict[str, int], streams: _Streams, stream: Stream, cfg: EngineConfig,
                           cached: dict[str, SiteStats], extra: frozenset[str], timings: dict[str, float],
                           keep_comp: bool, keep_fp: bool) -> tuple[dict[str, dict[str, Any]], dict[str, SiteStats],
                                                                     list[torch.Tensor], list[torch.Tensor]]:
    """One block at about one forward per stream; returns (layers, fresh statistics, next X, next X^f).

    1. The block is still dense: one forward of it over ``X^f`` gives the FP stream's next input and, through
       hooks, every site's FP input, accumulated at once on the FP stream, or kept to pair with the compressed
       inputs for ``Delta`` (SAES-SVD).
    2. FP stream: every group is factorised from those statistics (nothing depends on the order). Compressed
       stream, true sequential: the ``q,k,v`` and ``o`` inputs come from the block's forward stopped at the site
       (``q,k,v`` already compressed for ``o``); ``gate,up``, ``down`` and the block output follow from the
       previous intermediate by :class:`BlockStages`, the same operations the block's forward performs.
    Equals :func:`_compress_block_rerun` (tests compare them)."""
    stages = layout.stages
    assert stages is not None
    dev, stream_dev, stats_dev = cfg.device, cfg.stream_device or cfg.device, cfg.stats_device or cfg.device
    sites = [group[0] for group in layout.groups]
    needs = method.needs | extra
    with_delta = "Delta" in needs and stream == "compressed"
    wanted = needs if with_delta else needs - {"Delta"}
    todo = [site for site in sites if method.needs and site not in cached]  # statistics computed here
    new_acc = lambda site: StreamingStats(block.get_submodule(site).in_features, wanted,  # noqa: E731
                                          dtype=cfg.stats_dtype, device=stats_dev)
    layers: dict[str, dict[str, Any]] = {}
    fresh: dict[str, SiteStats] = {}

    t0 = time.perf_counter()
    fp_acc = {site: new_acc(site) for site in todo} if stream == "fp" else {}
    fp_in: dict[str, list[torch.Tensor]] = {site: [] for site in todo} if with_delta else {}

    def seen_fp(site: str, x: torch.Tensor) -> None:
        if site in fp_acc:
            fp_acc[site].update(x)
        if site in fp_in:
            fp_in[site].append(x.to(stream_dev))

    Xf_next: list[torch.Tensor] = []
    if fp_acc or fp_in or keep_fp:
        for xf, kw in zip(streams.Xf, streams.kws):
            y = _forward_capturing(block, xf.to(dev), kw, list(fp_acc or fp_in), seen_fp)
            if keep_fp:
                Xf_next.append(y.to(stream_dev))
    timings["calibration"] += time.perf_counter() - t0

    def statistics(site: str, acc: StreamingStats | None) -> SiteStats:
        if not method.needs:
            return SiteStats(tokens=0)
        if site in cached:
            stats = cached[site]
        else:
            assert acc is not None
            stats = fresh[site] = acc.finalize(f"{prefix}.{site}")
        return _only(stats, method.needs).to(method.compute_dtype, dev)

    if stream == "fp" or not method.needs:
        for site, group in zip(sites, layout.groups):
            _factorize_group(block, group, prefix, method, ranks, statistics(site, fp_acc.get(site)), timings, layers)
        t0 = time.perf_counter()
        X_next = _through(block, streams.X, streams.kws, dev, stream_dev) if keep_comp else []
        timings["calibration"] += time.perf_counter() - t0
        return layers, fresh, X_next, Xf_next

    def group_step(gi: int, inputs: Any) -> None:
        """Accumulate group ``gi``'s statistics over the batches ``inputs`` yields, then factorise the group."""
        t0 = time.perf_counter()
        acc = new_acc(sites[gi])
        for b, x in enumerate(inputs):
            acc.update(x, fp_in[sites[gi]][b].to(dev) if with_delta else None)
        fp_in.pop(sites[gi], None)
        stats = statistics(sites[gi], acc)
        timings["calibration"] += time.perf_counter() - t0
        _factorize_group(block, layout.groups[gi], prefix, method, ranks, stats, timings, layers)

    X, kws = streams.X, streams.kws
    group_step(0, (_site_input(block, sites[0], x.to(dev), kw) for x, kw in zip(X, kws)))
    z = [_site_input(block, sites[1], x.to(dev), kw).to(stream_dev) for x, kw in zip(X, kws)]
    group_step(1, (zb.to(dev) for zb in z))
    hu = [stages.mlp_input(block, x.to(dev), zb.to(dev)) for x, zb in zip(X, z)]
    del z
    h = [hb.to(stream_dev) for hb, _ in hu]
    u = [ub.to(stream_dev) for _, ub in hu]
    del hu
    group_step(2, (ub.to(dev) for ub in u))
    d = [stages.down_input(block, ub.to(dev)).to(stream_dev) for ub in u]
    del u
    group_step(3, (db.to(dev) for db in d))
    t0 = time.perf_counter()
    X_next = [stages.output(block, hb.to(dev), db.to(dev)).to(stream_dev) for hb, db in zip(h, d)]
    timings["calibration"] += time.perf_counter() - t0
    return layers, fresh, X_next, Xf_next


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
            prefix = f"{layout.layers}.{i}"
            staged = layout.stages is not None and not cfg.rerun
            if i < start:
                t0 = time.perf_counter()
                Xf_next = _through(block, streams.Xf, streams.kws, cfg.device, stream_device) if keep_fp else []
                block_layers = ckpt.restore(i, block, prefix, layout.projections, ranks)
                X_next = _through(block, streams.X, streams.kws, cfg.device, stream_device) if keep_comp else []
                timings["calibration"] += time.perf_counter() - t0
            else:
                site_stats = cache.load(i, wanted, cfg.stats_device or cfg.device) if i in cached else {}
                extra = FREE if cache is not None else frozenset()
                if staged:
                    block_layers, fresh, X_next, Xf_next = _compress_block_staged(
                        block, prefix, layout, method, ranks, streams, stream, cfg, site_stats, extra, timings,
                        keep_comp, keep_fp)
                else:
                    ref = copy.deepcopy(block) if keep_fp else None  # original weights: the FP stream's block
                    block_layers, fresh = _compress_block_rerun(block, ref, prefix, layout, method, ranks, streams,
                                                                stream, cfg, site_stats, extra, timings)
                    t0 = time.perf_counter()
                    X_next = _through(block, streams.X, streams.kws, cfg.device, stream_device) if keep_comp else []
                    Xf_next = _through(ref, streams.Xf, streams.kws, cfg.device, stream_device) if keep_fp else []
                    timings["calibration"] += time.perf_counter() - t0
                    del ref
                if cache is not None and fresh:
                    cache.save(i, fresh)
            layers.update(block_layers)
            t0 = time.perf_counter()
            streams.X, streams.Xf = X_next, Xf_next
            info: dict[str, Any] = {"index": i}
            if keep_comp and keep_fp:
                cos = [torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean()
                       for a, b in zip(streams.X, streams.Xf)]
                info["cosine_fp"] = float(torch.stack(cos).mean())
                bar.set_postfix(cos=f"{info['cosine_fp']:.4f}")
            block_diag.append(info)
            blocks[i] = block.to(cfg.offload_device)
            timings["calibration"] += time.perf_counter() - t0
            if ckpt is not None and i >= start:
                t0 = time.perf_counter()
                ckpt.save(i, blocks[i], block_layers)
                timings["checkpoint"] = timings.get("checkpoint", 0.0) + time.perf_counter() - t0
        return CompressionReport(stream=stream if not data_free else "none",
                                 tokens=0 if data_free else int(calib_ids.numel()), layers=layers, blocks=block_diag,
                                 timings=timings, resumed_from=start, cached_stats_blocks=len(cached))
