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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from saes.core.linalg import FactorizationError
from saes.core.lowrank import LowRankLinear, cast_factors, set_submodule
from saes.core.method import Method, Stream
from saes.core.pruning import Pruner
from saes.core.stats import SiteStats, StreamingStats
from saes.engine.config import BlockReport, CompressionReport, EngineConfig
from saes.engine.cost import GB, clock, factorisation_bytes
from saes.engine.layout import BlockLayout, layout_for
from saes.engine.propagate import StopForward, capture_block_inputs, forward_capturing, through
from saes.engine.resume import BlockCheckpoints, owned
from saes.engine.stats_cache import CACHED, FREE, FPStatsCache
from saes.engine.structure import prune_group
from saes.io import token_digest

log = logging.getLogger(__name__)


@torch.no_grad()
def _site_input(block: nn.Module, site: str, x: torch.Tensor, kw: dict) -> torch.Tensor:
    """Input of ``block.<site>`` for block input ``x``; the forward stops right there."""
    seen: list[torch.Tensor] = []

    def hook(_mod: nn.Module, args: tuple) -> None:
        seen.append(args[0])
        raise StopForward

    handle = block.get_submodule(site).register_forward_pre_hook(hook)
    try:
        block(x, **kw)
    except StopForward:
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
                     stats.absmean if "absmean" in needs else None, stats.mean if "mean" in needs else None,
                     stats.var if "var" in needs else None)


def needs_calibration(method: Method, track_fidelity: bool) -> bool:
    """Whether the engine runs calibration forwards at all (data-free methods skip them)."""
    return method.needs_data or track_fidelity


@dataclass
class _Streams:
    X: list[torch.Tensor]  # compressed stream: block inputs per batch
    Xf: list[torch.Tensor]  # FP stream
    kws: list[dict]  # the current block's call kwargs per batch (masks, rotary embeddings)


@dataclass
class _Run:
    """What every block of one :func:`compress_model` call shares."""

    layout: BlockLayout
    method: Method
    ranks: dict[str, int]
    stream: Stream
    cfg: EngineConfig
    keep_comp: bool  # propagate the compressed stream X
    keep_fp: bool  # propagate the FP stream X^f
    staged: bool  # one forward per stream and block (else the reference path)
    ckpt: BlockCheckpoints | None
    cache: FPStatsCache | None
    timings: dict[str, float]

    @property
    def stream_device(self) -> torch.device:
        return self.cfg.stream_device or self.cfg.device

    @property
    def extra(self) -> frozenset[str]:
        """Statistics computed beyond the method's needs, for the cache (those that cost next to nothing)."""
        return FREE if self.cache is not None else frozenset()

    def propagate(self, block: nn.Module, xs: list[torch.Tensor], kws: list[dict], keep: bool) -> list[torch.Tensor]:
        return through(block, xs, kws, self.cfg.device, self.stream_device) if keep else []


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
                     stats: SiteStats, timings: dict[str, float],
                     layers: dict[str, dict[str, Any]]) -> torch.Tensor | None:
    """Replace each projection of ``group`` by the method's factors (checked before they become a layer); a
    :class:`Pruner` removes structures instead (:func:`saes.engine.structure.prune_group`); then the input
    channels the group's projection keeps are returned (None: its input width is unchanged)."""
    if isinstance(method, Pruner):
        return prune_group(block, group, prefix, method, stats, timings, layers)
    for name in group:
        full = f"{prefix}.{name}"
        dense: nn.Linear = block.get_submodule(name)
        t0 = clock(dense.weight.device)
        if ranks[full] is None:  # planned to stay dense
            layers[full] = {"m": dense.out_features, "n": dense.in_features, "rank": None}
            continue
        W = dense.weight.to(method.compute_dtype)
        m, n = W.shape
        dt = dense.weight.dtype
        try:
            f = method.factorize(W, stats, ranks[full], layer=full)
            if f.A.shape != (m, ranks[full]) or f.B.shape != (ranks[full], n):
                raise FactorizationError(f"{method.name} returned A {tuple(f.A.shape)}, B {tuple(f.B.shape)}")
        except FactorizationError as exc:
            raise FactorizationError(f"{full}: {exc}") from exc
        A, B = cast_factors(f.A, f.B, dt, full)  # checked in the model's dtype: FactorOverflow names the layer
        set_submodule(block, name, LowRankLinear.from_factors(A, B, dense.bias))
        seconds = clock(dense.weight.device) - t0
        timings["factorisation"] += seconds
        layers[full] = {"m": m, "n": n, "rank": ranks[full], "seconds": seconds, **f.diagnostics}
    return None


def _compress_block_rerun(run: _Run, block: nn.Module, ref: nn.Module | None, prefix: str, streams: _Streams,
                          cached: dict[str, SiteStats]) -> tuple[dict[str, dict[str, Any]], dict[str, SiteStats]]:
    """The reference path: compress one block group by group, re-running the block (and ``ref``, the original)
    from its input up to each group's input site; returns its layers' diagnostics and the statistics it computed.

    ``cached``: statistics per site (``self_attn.q_proj``) from the FP-stream cache."""
    layout, method, ranks, stream, cfg, timings = run.layout, run.method, run.ranks, run.stream, run.cfg, run.timings
    needs = method.needs | run.extra
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
                stats = _group_stats(block, ref, site, streams.X, streams.Xf, streams.kws, stream, needs,
                                     cfg.stats_dtype, cfg.device, cfg.stats_device or cfg.device, f"{prefix}.{site}")
                if run.cache is not None:  # else not held beside their cast while the group is factorised
                    fresh[site] = stats
            stats = _only(stats, method.needs).to(method.compute_dtype, cfg.device)
        timings["calibration"] += clock(cfg.device) - t0
        _factorize_group(block, group, prefix, method, ranks, stats, timings, layers)
    return layers, fresh


@torch.no_grad()
def _compress_block_staged(run: _Run, block: nn.Module, prefix: str, streams: _Streams,
                           cached: dict[str, SiteStats]) -> tuple[dict[str, dict[str, Any]], dict[str, SiteStats],
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
    layout, method, ranks, stream, cfg, timings = run.layout, run.method, run.ranks, run.stream, run.cfg, run.timings
    keep_comp, keep_fp = run.keep_comp, run.keep_fp
    stages = layout.stages
    assert stages is not None
    dev, stream_dev, stats_dev = cfg.device, cfg.stream_device or cfg.device, cfg.stats_device or cfg.device
    sites = [group[0] for group in layout.groups]
    needs = method.needs | run.extra
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
            y = forward_capturing(block, xf.to(dev), kw, list(fp_acc or fp_in), seen_fp)
            if keep_fp:
                Xf_next.append(y.to(stream_dev))
    timings["calibration"] += clock(dev) - t0

    def statistics(site: str, acc: StreamingStats | None) -> SiteStats:
        if not method.needs:
            return SiteStats(tokens=0)
        if site in cached:
            stats = cached[site]
        else:
            assert acc is not None
            stats = acc.finalize(f"{prefix}.{site}")
            if run.cache is not None:
                fresh[site] = stats
        return _only(stats, method.needs).to(method.compute_dtype, dev)

    if stream == "fp" or not method.needs:
        for site, group in zip(sites, layout.groups):  # each accumulator is dropped once its statistics are cast
            t0 = time.perf_counter()
            stats = statistics(site, fp_acc.pop(site, None))
            timings["calibration"] += clock(dev) - t0
            _factorize_group(block, group, prefix, method, ranks, stats, timings, layers)
            del stats
        t0 = time.perf_counter()
        X_next = through(block, streams.X, streams.kws, dev, stream_dev) if keep_comp else []
        timings["calibration"] += clock(dev) - t0
        return layers, fresh, X_next, Xf_next

    def group_step(gi: int, inputs: Any) -> torch.Tensor | None:
        """Accumulate group ``gi``'s statistics over the batches ``inputs`` yields, then factorise the group
        (a pruner: the input channels of the group's projection it keeps, to narrow the stored input)."""
        t0 = time.perf_counter()
        acc = new_acc(sites[gi])
        for b, x in enumerate(inputs):
            acc.update(x, fp_in[sites[gi]][b].to(dev) if with_delta else None)
        fp_in.pop(sites[gi], None)
        stats = statistics(sites[gi], acc)
        del acc  # the float32 sums: not held while the group is factorised
        timings["calibration"] += clock(dev) - t0
        return _factorize_group(block, layout.groups[gi], prefix, method, ranks, stats, timings, layers)

    def narrowed(xs: list[torch.Tensor], kept: torch.Tensor | None) -> list[torch.Tensor]:
        return xs if kept is None else [xb[..., kept.to(xb.device)] for xb in xs]

    X, kws = streams.X, streams.kws
    group_step(0, (_site_input(block, sites[0], x.to(dev), kw) for x, kw in zip(X, kws)))
    z = [_site_input(block, sites[1], x.to(dev), kw).to(stream_dev) for x, kw in zip(X, kws)]
    z = narrowed(z, group_step(1, (zb.to(dev) for zb in z)))
    hu = [stages.mlp_input(block, x.to(dev), zb.to(dev)) for x, zb in zip(X, z)]
    del z
    h = [hb.to(stream_dev) for hb, _ in hu]
    u = [ub.to(stream_dev) for _, ub in hu]
    del hu
    group_step(2, (ub.to(dev) for ub in u))
    d = [stages.down_input(block, ub.to(dev)).to(stream_dev) for ub in u]
    del u
    d = narrowed(d, group_step(3, (db.to(dev) for db in d)))
    t0 = time.perf_counter()
    X_next = [stages.output(block, hb.to(dev), db.to(dev)).to(stream_dev) for hb, db in zip(h, d)]
    timings["calibration"] += clock(dev) - t0
    return layers, fresh, X_next, Xf_next


Kind = Literal["restored", "dense", "cached", "fresh"]


def block_kinds(n_blocks: int, ckpt: BlockCheckpoints | None, cache: FPStatsCache | None, sites: list[str],
                wanted: frozenset[str], dense: frozenset[int] = frozenset()) -> list[Kind]:
    """What happens to each block: ``restored`` from its checkpoint (the leading finished blocks), left ``dense``
    (the plan keeps every projection of it), else compressed from ``cached`` FP-stream statistics (every site's
    ``wanted`` ones are stored) or ``fresh`` ones."""
    done = ckpt.done if ckpt is not None else 0
    return ["restored" if i < done else "dense" if i in dense
            else "cached" if cache is not None and cache.has(i, sites, wanted) else "fresh" for i in range(n_blocks)]


def _dense_block(run: _Run, i: int, block: nn.Module,
                 streams: _Streams) -> tuple[dict[str, dict[str, Any]], list[torch.Tensor], list[torch.Tensor]]:
    """A block the plan leaves dense: no statistics, no factors; both streams go through it."""
    t0 = time.perf_counter()
    X = run.propagate(block, streams.X, streams.kws, run.keep_comp)
    Xf = run.propagate(block, streams.Xf, streams.kws, run.keep_fp)
    run.timings["calibration"] += clock(run.cfg.device) - t0
    prefix = f"{run.layout.layers}.{i}"
    layers = {f"{prefix}.{name}": {"m": block.get_submodule(name).out_features,
                                   "n": block.get_submodule(name).in_features, "rank": None}
              for name in run.layout.projections}
    return layers, X, Xf


def _restore_block(run: _Run, i: int, block: nn.Module,
                   streams: _Streams) -> tuple[dict[str, dict[str, Any]], list[torch.Tensor], list[torch.Tensor]]:
    """A checkpointed block: the FP stream through it while dense, then its low-rank layers back, then ``X``."""
    assert run.ckpt is not None
    t0 = time.perf_counter()
    Xf = run.propagate(block, streams.Xf, streams.kws, run.keep_fp)
    layers = run.ckpt.restore(i, block, f"{run.layout.layers}.{i}", run.layout.projections, run.ranks)
    X = run.propagate(block, streams.X, streams.kws, run.keep_comp)
    run.timings["calibration"] += clock(run.cfg.device) - t0
    return layers, X, Xf


def _compress_block(run: _Run, i: int, kind: Kind, block: nn.Module,
                    streams: _Streams) -> tuple[dict[str, dict[str, Any]], list[torch.Tensor], list[torch.Tensor]]:
    """Compress block ``i`` (staged or reference path); statistics it computed go to the cache."""
    cfg, prefix = run.cfg, f"{run.layout.layers}.{i}"
    wanted = run.method.needs & CACHED
    cached = run.cache.load(i, wanted, cfg.stats_device or cfg.device) if kind == "cached" else {}
    if run.staged:
        layers, fresh, X, Xf = _compress_block_staged(run, block, prefix, streams, cached)
    else:
        ref = copy.deepcopy(block) if run.keep_fp else None  # original weights: the FP stream's block
        layers, fresh = _compress_block_rerun(run, block, ref, prefix, streams, cached)
        t0 = time.perf_counter()
        X = run.propagate(block, streams.X, streams.kws, run.keep_comp)
        Xf = run.propagate(ref, streams.Xf, streams.kws, run.keep_fp)
        run.timings["calibration"] += clock(cfg.device) - t0
        del ref
    if run.cache is not None and fresh:
        run.cache.save(i, fresh)
    return layers, X, Xf


def _cosine(X: list[torch.Tensor], Xf: list[torch.Tensor]) -> float:
    """Mean token cosine similarity of the two streams (the per-block fidelity)."""
    cos = [torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean() for a, b in zip(X, Xf)]
    return float(torch.stack(cos).mean())


def staged_buffer_bytes(block: nn.Module, layout: BlockLayout, stream: Stream, with_delta: bool, tokens: int,
                        act_bytes: int) -> int:
    """The staged path's own buffers at their peak in one block, beyond the two streams both paths keep: on the
    compressed stream the FP inputs of every site, kept from the dense forward to pair with the compressed ones
    for ``Delta`` (``3h + i`` values a token for LLaMA), and the compressed intermediates (the residual and the
    MLP's input, ``h + i``); on the FP stream nothing (statistics accumulate in hooks)."""
    if stream == "fp":
        return 0
    widths = [block.get_submodule(group[0]).in_features for group in layout.groups]
    per_token = (sum(widths) if with_delta else 0) + widths[0] + widths[-1]
    return tokens * per_token * act_bytes


def available_bytes(device: torch.device) -> int:
    """Memory free on ``device`` now: CUDA's free memory plus what torch's allocator holds cached but unused there
    (``mem_get_info`` counts that as taken; the dense evaluation before compression leaves a model's worth), else
    the host's available memory."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0]) + int(cached)
    import psutil

    return int(psutil.virtual_memory().available)


def _choose_path(cfg: EngineConfig, layout: BlockLayout, block: nn.Module, stream: Stream, method: Method,
                 calib_ids: torch.Tensor | None, stream_device: torch.device, streams: int) -> tuple[bool, int]:
    """(staged?, the staged buffers' bytes): staged unless asked not to, without stages, or over the budget.

    ``auto`` leaves room for what is not there yet when it measures the free memory: the ``streams`` kept (captured
    after this check), on the staged path each next stream built beside its input, and the widest site's
    factorisation (its float64 statistics and workspace, :func:`saes.engine.cost.factorisation_bytes`)."""
    staged = layout.stages is not None and not cfg.rerun
    if not staged or calib_ids is None or not method.needs:  # data-free (fidelity only): both paths stage nothing
        return staged, 0
    act_bytes = next(block.parameters()).element_size()
    need = staged_buffer_bytes(block, layout, stream, "Delta" in method.needs and stream == "compressed",
                               int(calib_ids.numel()), act_bytes)
    budget, why = cfg.max_buffer_bytes, ""
    if budget == "auto":
        one = int(calib_ids.numel()) * block.get_submodule(layout.groups[0][0]).in_features * act_bytes
        n = max(block.get_submodule(group[0]).in_features for group in layout.groups)
        factor = int(factorisation_bytes(n, delta="Delta" in method.needs))
        free = available_bytes(stream_device)
        budget = int(0.8 * free) - 2 * streams * one - factor
        why = (f"=auto: 80% of {free / GB:.1f} GB free, less {2 * streams * one / GB:.1f} GB for the streams and "
               f"{factor / GB:.1f} GB for the factorisation")
    if budget is not None and need > int(budget):
        log.warning("the staged path would hold %.1f GB of buffers on %s, over the %.1f GB budget "
                    "(calib.max_buffer_gb%s): re-running each block per group instead (the same result; about 2-3x "
                    "the statistics time)", need / GB, stream_device, int(budget) / GB, why)
        return False, need
    return True, need


@torch.no_grad()
def compress_model(model: nn.Module, method: Method, ranks: dict[str, int], calib_ids: torch.Tensor | None,
                   cfg: EngineConfig) -> CompressionReport:
    """Replace every planned projection by a :class:`LowRankLinear` from ``method``; in place.

    With ``cfg.resume_dir`` each finished block is checkpointed and a rerun restores the
    finished blocks instead of recompressing them (:mod:`saes.engine.resume`); with ``cfg.reuse_stats``
    FP-stream statistics come from / go to a cache (:mod:`saes.engine.stats_cache`). Neither changes
    the result: both only decide each block's kind (:func:`block_kinds`) before the loop."""
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
        cache = _fp_stats_cache(model, layout, method, stream, calib_ids, cfg)
        # a cache hit needs the cacheable statistics the method wants (Delta is zero on the FP stream)
        dense = frozenset(i for i in range(len(blocks))
                          if all(ranks[f"{layout.layers}.{i}.{name}"] is None for name in layout.projections))
        kinds = block_kinds(len(blocks), ckpt, cache, [group[0] for group in layout.groups], method.needs & CACHED,
                            dense)
        start = kinds.count("restored")
        if start:
            log.info("resuming %s: blocks 0..%d restored from %s", method.name, start - 1, ckpt.folder)
        # the streams are needed unless every block left to compress has cached statistics
        need_streams = not data_free and (cfg.track_fidelity or "fresh" in kinds)
        keep_comp = need_streams and (stream == "compressed" or cfg.track_fidelity)
        keep_fp = need_streams and (stream == "fp" or needs_delta or cfg.track_fidelity)
        staged, buffers = _choose_path(cfg, layout, blocks[0], stream, method, calib_ids if need_streams else None,
                                       cfg.stream_device or cfg.device, int(keep_comp) + int(keep_fp))
        run = _Run(layout, method, ranks, stream, cfg, keep_comp, keep_fp, staged=staged, ckpt=ckpt, cache=cache,
                   timings={"calibration": 0.0, "factorisation": 0.0})
        timings = run.timings

        streams, block_kws = _Streams([], [], []), [[] for _ in blocks]
        if need_streams:
            t0 = time.perf_counter()
            first, block_kws = capture_block_inputs(model, blocks, calib_ids, cfg.batch_size, cfg.device,
                                                    run.stream_device)
            Xf = [x.clone() for x in first] if (keep_fp and keep_comp) else (first if keep_fp else [])
            streams = _Streams(first if keep_comp else [], Xf, [])
            timings["calibration"] += clock(cfg.device) - t0

        layers: dict[str, dict[str, Any]] = {}
        block_diag: list[dict[str, Any]] = []
        bar = tqdm(kinds, desc=f"compress[{method.name}]", unit="block")
        t_start = time.perf_counter()
        for i, kind in enumerate(bar):
            block, streams.kws = blocks[i].to(cfg.device), block_kws[i]
            if kind == "restored":
                block_layers, X, Xf = _restore_block(run, i, block, streams)
            elif kind == "dense":
                block_layers, X, Xf = _dense_block(run, i, block, streams)
            else:
                block_layers, X, Xf = _compress_block(run, i, kind, block, streams)
            layers.update(block_layers)
            t0 = time.perf_counter()
            streams = _Streams(X, Xf, streams.kws)
            info: dict[str, Any] = {"index": i}
            if keep_comp and keep_fp:
                info["cosine_fp"] = _cosine(X, Xf)
                bar.set_postfix(cos=f"{info['cosine_fp']:.4f}")
            block_diag.append(info)
            blocks[i] = block.to(cfg.offload_device)
            timings["calibration"] += clock(cfg.device) - t0
            if ckpt is not None and kind != "restored":
                t0 = time.perf_counter()
                ckpt.save(i, blocks[i], block_layers)
                timings["checkpoint"] = timings.get("checkpoint", 0.0) + time.perf_counter() - t0
            if cfg.on_block is not None:
                cfg.on_block(BlockReport(i, len(blocks), kind, time.perf_counter() - t_start, dict(timings),
                                         info.get("cosine_fp"), block_layers))
        return CompressionReport(stream=stream if not data_free else "none",
                                 tokens=0 if data_free else int(calib_ids.numel()), layers=layers, blocks=block_diag,
                                 timings=timings, resumed_from=start, cached_stats_blocks=kinds.count("cached"),
                                 path="staged" if staged else "rerun", staged_buffer_gb=round(buffers / GB, 3))
