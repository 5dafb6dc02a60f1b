"""Shared fixtures: tiny random LLaMAs built in code and composed Hydra configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from saes.core.stats import SiteStats
from saes.inputs.models import tiny_llama, tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
os.environ.setdefault("WANDB_MODE", "disabled")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on a 2-core machine: one thread each (and in the processes they start), or
    # the two OpenMP pools fight over the cores and both slow down several times over.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` are skipped without a CUDA device (``make gpu-check`` runs them on one). The slow
    tests (the embedded models first, then the subprocess end-to-ends) go first: with two workers the long ones
    start at once instead of trailing after the short ones."""
    embedded = tuple(f"tests/{f}" for f in ("test_smollm2.py", "test_gemma3.py"))
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None, not item.nodeid.startswith(embedded)))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (make gpu-check)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_gqa() -> torch.nn.Module:
    """2 blocks, 4 query heads sharing 2 kv heads (grouped-query attention)."""
    return tiny_llama(num_key_value_heads=2).eval()


@pytest.fixture
def tiny_mha() -> torch.nn.Module:
    return tiny_llama(num_key_value_heads=4, seed=1).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


def make_cfg(*overrides: str, results_dir: Path | None = None) -> DictConfig:
    """Compose ``conf/config.yaml`` as ``run.py`` would, with fast defaults for the tiny model."""
    base = ["model=tiny_llama", "logger=none", "calib.nsamples=4", "calib.seqlen=64", "calib.batch_size=2",
            "eval.ppl.seqlen=128", "eval.ppl.max_windows=3"]
    if results_dir is not None:
        base.append(f"results_dir={results_dir}")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=base + list(overrides))


def calib_batch(n: int = 4, seqlen: int = 32, vocab: int = 258, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=g)


def layer_problem(m: int, n: int, tokens: int, seed: int, spread: float) -> tuple[torch.Tensor, SiteStats]:
    """A random float64 weight ``[m, n]`` and FP-stream statistics of inputs whose channel scales span
    ``10^spread`` in a random order (outlier channels), for per-layer property tests."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, spread, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    X = torch.randn(n, tokens, generator=g, dtype=torch.float64) * scales[:, None]
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    return W, SiteStats(tokens, X @ X.T / tokens, None, None)
