"""FP-stream statistics computed once per model and calibration set, reused across a sweep.

On the FP stream the inputs of every site come from the *dense* model, so ``H`` and
``mean|x|`` there depend only on the weights (the model's identity and dtype), the
calibration token ids, the accumulation dtype, the batch size (summation order), the
compute device type and the block layout; not on the method or the ratio. They are
stored per block as ``<cache_dir>/stats/<key>/block_<i>.safetensors`` (tensors named
``<site>.<statistic>``, token counts in the metadata), written atomically; a block file
gains the statistics later runs compute (svdllm's ``H`` beside asvd's ``mean|x|``). A hit
gives bit-identical statistics, so a run with reuse records exactly what a recomputation
would. Assumes ``Method.prepare`` does not change the dense weights (none does).
Size: ``4 sum_sites n^2`` bytes per block for ``H`` in fp32 (about 13 MB for SmolLM2-135M,
0.7 GB for LLaMA-7B, 22 GB per calibration set); delete ``<cache_dir>/stats/<key>`` to reclaim it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from saes.core.stats import SiteStats
from saes.io import atomic_write, digest

log = logging.getLogger(__name__)
VERSION = 2  # bump when the statistics' definition or summation changes (2: H by its upper block triangle)
CACHED = frozenset({"H", "absmean"})  # what can be stored; Delta is identically zero on the FP stream
FREE = frozenset({"absmean"})  # computed and stored whatever the method needs: it costs next to nothing


class FPStatsCache:
    def __init__(self, root: Path, protocol: dict[str, Any]) -> None:
        self.folder = Path(root) / digest({"version": VERSION, **protocol}, 16)
        self.protocol = protocol

    def _path(self, block: int) -> Path:
        return self.folder / f"block_{block}.safetensors"

    def has(self, block: int, sites: list[str], stats: frozenset[str]) -> bool:
        """Whether ``stats`` of every site of ``block`` are stored."""
        from safetensors import safe_open

        path = self._path(block)
        if not path.is_file():
            return False
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
        return all(f"{site}.{stat}" in keys for site in sites for stat in stats)

    def load(self, block: int, stats: frozenset[str], device: torch.device) -> dict[str, SiteStats]:
        """``stats`` per site (``self_attn.q_proj``) of ``block``."""
        from safetensors import safe_open

        out: dict[str, SiteStats] = {}
        with safe_open(str(self._path(block)), "pt", device=str(device)) as f:
            tokens = json.loads(f.metadata()["tokens"])
            for site, n in tokens.items():
                out[site] = SiteStats(tokens=n, **{s: f.get_tensor(f"{site}.{s}") for s in stats})
        return out

    def save(self, block: int, stats: dict[str, SiteStats]) -> None:
        """Store the statistics of ``block`` that are in ``CACHED``, beside those already stored."""
        from safetensors.torch import load_file, save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(block)
        tensors = load_file(str(path)) if path.is_file() else {}
        tensors.update({f"{site}.{s}": getattr(st, s).detach().to("cpu").contiguous()
                        for site, st in stats.items() for s in CACHED if getattr(st, s) is not None})
        meta = {"tokens": json.dumps({site: st.tokens for site, st in stats.items()}),
                "protocol": json.dumps(self.protocol, default=str)}
        atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))
