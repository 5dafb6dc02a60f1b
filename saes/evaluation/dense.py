"""The dense model's results, computed once per model, data and protocol, and cached as JSON.

A compression run scores the dense model before compressing it; every other run of the same model and
protocol reads the numbers back. Each cache file lives under ``<results_dir>/dense/<model name>/`` and
carries in its name :func:`saes.io.digest` of everything its value depends on (its protocol).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saes.evaluation import zeroshot
from saes.evaluation.offload import placed
from saes.evaluation.perplexity import PplSettings, perplexity
from saes.evaluation.tasks import local_data
from saes.io import cached_json, digest, read_json, sha256_file, token_digest, write_json_atomic


@dataclass(frozen=True)
class DenseModel:
    """The dense model as the cache keys see it: which weights, in which dtype, on which kind of device."""
    folder: Path  # <results_dir>/dense/<model name>
    identity: str
    dtype: str
    device: torch.device


def ppl_protocol(dense: DenseModel, ppl: PplSettings, src: str, ids: torch.Tensor) -> dict[str, Any]:
    """Everything a dense perplexity depends on (its cache key)."""
    return {"model": dense.identity, "dtype": dense.dtype, "device": dense.device.type, "source": src,
            "tokens": token_digest(ids), "seqlen": ppl.seqlen, "max_windows": ppl.max_windows}


def ppl_cache(dense: DenseModel, protocol: dict[str, Any]) -> Path:
    return dense.folder / f"{protocol['source']}-{digest(protocol)}.json"


def dense_perplexity(model: nn.Module, dense: DenseModel, ppl: PplSettings, eval_ids: dict[str, torch.Tensor],
                     offload: bool = False) -> dict[str, dict[str, Any]]:
    """Dense perplexity per source (``{src: {"dense", "tokens_sha256", "windows"}}``), from the cache or computed."""
    out: dict[str, dict[str, Any]] = {}
    with placed(model, dense.device, offload):
        for src, ids in eval_ids.items():
            protocol = ppl_protocol(dense, ppl, src, ids)

            def compute(src: str = src, ids: torch.Tensor = ids, protocol: dict[str, Any] = protocol) -> dict[str, Any]:
                return {**perplexity(model, ids, ppl.seqlen, ppl.max_windows, ppl.batch_size, dense.device,
                                     desc=f"ppl dense {src}").as_dict(), "protocol": protocol}

            value = cached_json(ppl_cache(dense, protocol), compute)
            out[src] = {"dense": value["ppl"], "tokens_sha256": protocol["tokens"], "windows": value["windows"]}
    model.to("cpu")
    return out


def cached_perplexity(dense: DenseModel, ppl: PplSettings, eval_ids: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Dense perplexity per source only where a compression run cached it (else None): for a loaded model,
    whose dense weights are not at hand."""
    out: dict[str, dict[str, Any]] = {}
    for src, ids in eval_ids.items():
        protocol = ppl_protocol(dense, ppl, src, ids)
        cache = ppl_cache(dense, protocol)
        out[src] = {"dense": read_json(cache)["ppl"] if cache.is_file() else None, "tokens_sha256": protocol["tokens"]}
    return out


def dense_zeroshot(model: nn.Module, tokenizer: Any, dense: DenseModel, plan: zeroshot.Plan,
                   offload: bool = False) -> zeroshot.DenseScores:
    """Dense accuracies per task, cached as ``zeroshot-<task>-<key>.json``, keyed by the model identity, dtype,
    device type, task, data (hub, or the local copy's hash), limit and lm-eval version."""
    t0 = time.perf_counter()
    version = zeroshot.lm_eval_version()
    caches: dict[str, Path] = {}
    for name in plan.tasks:
        protocol = {"model": dense.identity, "dtype": dense.dtype, "device": dense.device.type, "task": name,
                    "data": f"local:{sha256_file(local_data(name))}" if plan.offline else "hub", "limit": plan.limit,
                    "num_fewshot": 0, "lm_eval": version}
        caches[name] = dense.folder / f"zeroshot-{name}-{digest(protocol)}.json"
    # All uncached tasks are scored in one lm-eval call (not cached_json task by task); a task that fails to load
    # from the hub is missing, not cached.
    todo = [n for n in plan.tasks if not caches[n].is_file()]
    fresh: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    if todo:
        with placed(model, dense.device, offload):
            fresh, failed = zeroshot.accuracy(model, tokenizer, plan, todo, device=dense.device)
        model.to("cpu")
        for name, score in fresh.items():
            write_json_atomic(caches[name], score)
    tasks = {}
    for name in plan.tasks:
        if name in failed:
            continue
        score = fresh[name] if name in fresh else read_json(caches[name])
        tasks[name] = {"dense": score["metrics"], **{k: score[k] for k in ("n", "n_total", "split", "data")}}
    return zeroshot.DenseScores(tasks, {**plan.missing, **failed}, time.perf_counter() - t0)
