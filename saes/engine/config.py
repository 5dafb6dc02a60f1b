"""The engine's settings (typed, no config objects) and what it reports back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from saes.core.method import Stream


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
    # The most the staged path's own buffers may hold on the stream device (bytes; "auto": 80% of the memory free
    # there when compression starts, less the room of the streams and their next copies and of the widest site's
    # factorisation; None: no bound). Above it the engine takes the reference path (the same result; it keeps only
    # the two streams): :func:`saes.engine.loop.staged_buffer_bytes`, :func:`saes.engine.loop._choose_path`.
    max_buffer_bytes: int | str | None = None
    on_block: Callable[[BlockReport], None] | None = None  # called after each block (live logging); no effect on results


@dataclass(frozen=True)
class BlockReport:
    """One finished block, as :func:`saes.engine.loop.compress_model` hands it to ``EngineConfig.on_block``."""
    index: int
    blocks: int  # blocks in the model
    kind: str  # restored, dense, cached or fresh (``saes.engine.loop.block_kinds``)
    elapsed: float  # seconds since compress_model started
    timings: dict[str, float]  # the engine's phase seconds so far (calibration, factorisation[, checkpoint])
    cosine_fp: float | None  # fidelity of the two streams' outputs (track_fidelity), else None
    layers: dict[str, dict[str, Any]]  # this block's projections: shape, rank, the method's diagnostics


@dataclass
class CompressionReport:
    stream: str
    tokens: int
    layers: dict[str, dict[str, Any]]  # per projection: shape, rank, method diagnostics, seconds
    blocks: list[dict[str, Any]]  # per block: cosine similarity of the two streams' outputs (if both kept)
    timings: dict[str, float]  # calibration (forwards + statistics), factorisation
    resumed_from: int = 0  # blocks restored from per-block checkpoints
    path: str = "staged"  # staged, or rerun (the reference path: asked for, no stages, or the buffers over budget)
    staged_buffer_gb: float = 0.0  # what the staged path's own buffers would hold at their peak (GB = 2^30 bytes)
    cached_stats_blocks: int = 0  # blocks whose FP-stream statistics came from the cache
