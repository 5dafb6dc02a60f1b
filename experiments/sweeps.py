"""The one way to find a sweep's records: an experiment's Hydra sweep, expanded as ``run.py -m`` expands it.

Every job of ``run.py -m experiment=<name> [overrides]`` is composed exactly as ``run.py`` composes it and
its record is read from where ``run.py`` writes it (:func:`saes.runs.records.record_path`). Which row of a
table a job is (:func:`row_id`) and how it is named (:func:`label`) come from its resolved config: the
method's ``display`` name (``conf/method/*.yaml``), its SAES-SVD variant, its fine-tuning.
"""

from __future__ import annotations

import functools
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from saes.io import read_json
from saes.runs.records import record_path

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
DEFAULT_VIEW = ("smollm2_135m", "cpu")  # (model, scale) whose tables go straight into results/tables/


def compose(overrides: Sequence[str], hydra: bool = False) -> Any:
    """``conf/config.yaml`` composed with ``overrides`` (with the ``hydra`` node when asked)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A composed config as the pipeline records it (resolved, plain containers)."""
    from omegaconf import OmegaConf

    out = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(out, dict)
    return out


@functools.lru_cache(maxsize=None)
def _resolved_json(overrides: tuple[str, ...]) -> str:
    return json.dumps(to_dict(compose(overrides)))


def resolved(overrides: Sequence[str]) -> dict[str, Any]:
    """The resolved config of ``overrides`` as a fresh dict (composed once per process: Hydra takes ~0.1 s)."""
    return json.loads(_resolved_json(tuple(overrides)))


def sweep_overrides(experiment: str, overrides: Sequence[str] = ()) -> tuple[list[list[str]], str | None]:
    """The jobs of ``run.py -m experiment=<experiment> <overrides>`` (one override list each) and the scale preset.

    As Hydra's basic sweeper does: each key of ``hydra.sweeper.params`` is one dimension (its
    comma list expanded by Hydra's own parser), a key also given in ``overrides`` takes that value
    instead, and the jobs are the Cartesian product, parameters first, then the given overrides.
    """
    jobs_, scale = _sweep(experiment, tuple(overrides))
    return [list(j) for j in jobs_], scale


@functools.lru_cache(maxsize=None)
def _sweep(experiment: str, overrides: tuple[str, ...]) -> tuple[tuple[tuple[str, ...], ...], str | None]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    given = parser.parse_overrides(list(overrides))
    if any(o.is_sweep_override() for o in given):
        raise ValueError(f"a table reads the experiment's own sweep; give single values, not sweeps: {list(overrides)}")
    given_keys = {o.get_key_element() for o in given}
    cfg = compose([f"experiment={experiment}", *overrides], hydra=True)
    dims: list[list[str]] = []
    for key, values in (cfg.hydra.sweeper.params or {}).items():
        parsed = parser.parse_override(f"{key}={values}")
        element = parsed.get_key_element()
        if element in given_keys:
            continue
        dims.append([f"{element}={v}" for v in parsed.sweep_string_iterator()] if parsed.is_sweep_override()
                    else [f"{element}={parsed.get_value_element_as_str()}"])
    out = tuple((*job, f"experiment={experiment}", *overrides) for job in itertools.product(*dims))
    return out, cfg.hydra.runtime.choices.get("scale")


@dataclass
class Job:
    """One job of an experiment's sweep: its overrides, resolved config, record path and record (or None)."""

    experiment: str
    overrides: list[str]
    config: dict[str, Any]
    scale: str | None
    path: Path
    record: dict[str, Any] | None

    @property
    def ratio(self) -> float:
        return float(self.config["ratio"])

    @property
    def row(self) -> str:
        return row_id(self.config)

    @property
    def own_overrides(self) -> list[str]:
        """The overrides the sweep gives this job (before ``experiment=...``): what tells it from its siblings."""
        return self.overrides[:self.overrides.index(f"experiment={self.experiment}")]


def jobs(experiment: str, overrides: Sequence[str], results_dir: Path) -> list[Job]:
    """Every job of the experiment's sweep with the record ``run.py`` would have written for it."""
    out = []
    overrides_per_job, scale = sweep_overrides(experiment, overrides)
    for job in overrides_per_job:
        config = resolved(job)  # results_dir is not part of a record's key: the path is rooted at ours
        path = record_path(results_dir, config)
        out.append(Job(experiment, job, config, scale, path, read_json(path) if path.is_file() else None))
    return out


# ------------------------------------------------------------------------------------------- rows and names
def beta_of(alpha: float) -> float:
    return alpha / (1.0 + alpha)


def _aces_setting(aces: dict[str, Any]) -> tuple:
    return tuple(aces.get(k) for k in ("beta_min", "beta_max", "space", "objective", "cap", "shrink"))


@functools.lru_cache(maxsize=1)
def _saes_defaults_json() -> str:
    from omegaconf import OmegaConf

    return json.dumps(OmegaConf.to_container(OmegaConf.load(CONF / "method" / "saes.yaml").method.aces))


def saes_defaults() -> dict[str, Any]:
    """``method.aces`` of conf/method/saes.yaml: what "SAES-SVD" without qualification means."""
    return json.loads(_saes_defaults_json())


def saes_variant(method: dict[str, Any]) -> tuple[str, str] | None:
    """``(row id, display name)`` of a method with ACES settings that is not SAES-SVD as configured; None if it is
    (or if the method has no ACES settings)."""
    aces = method.get("aces")
    if aces is None:
        return None
    if not aces.get("enabled", True):
        alpha = float(method["alpha"])
        return (f"{method['name']}:beta={beta_of(alpha):.3f}",
                "β = 0 (neither CEALC nor ACES)" if alpha == 0 else f"CEALC, fixed β = {beta_of(alpha):.2f}")
    if _aces_setting(aces) != _aces_setting(saes_defaults()):
        lo, hi, space = aces["beta_min"], aces["beta_max"], aces.get("space", "beta")
        return f"{method['name']}:[{lo},{hi}]/{space}", f"SAES-SVD, ACES [{lo}, {hi}] ({space})"
    return None


DEFAULT_ALLOCATOR = {"asvd_strs": "strs", "adasvd": "adacr", "dobisvd": "dobi"}  # what conf/method/<name>.yaml sets (else uniform)
ALLOCATOR_NAMES = {"uniform": "uniform ranks", "strs": "STRS", "adacr": "adaCR", "dip": "global protection",
                   "dobi": "Dobi-SVD ranks", "record": "a record's ranks",
                   "adacr:one_minus_cos": "adaCR (1 - cos)"}


def shared_allocator(method: dict[str, Any]) -> str | None:
    """The shared rank allocator a method config takes beyond its own default (None: its own ranks), with adaCR's
    importance when it is not the default ``cos``."""
    alloc = method.get("rank_alloc")
    if alloc in (None, DEFAULT_ALLOCATOR.get(str(method.get("name")), "uniform")):
        return None
    if alloc == "adacr" and method.get("importance", "cos") != "cos":
        return f"adacr:{method['importance']}"
    return str(alloc)


def row_id(cfg: dict[str, Any]) -> str:
    """Which row of a table a config is: the method, its SAES variant, ``+<allocator>`` with a shared rank allocator,
    ``+lora`` when fine-tuned."""
    variant = saes_variant(cfg["method"])
    alloc = shared_allocator(cfg["method"])
    return ((variant[0] if variant else str(cfg["method"]["name"])) + (f"+{alloc}" if alloc else "")
            + ("+lora" if cfg.get("finetune") else ""))


def display(cfg: dict[str, Any]) -> str:
    """The method's display name: ``display`` of its method config (the method's name if it has none)."""
    return str(cfg.get("display") or cfg["method"]["name"])


def label(job: Job) -> str:
    """Display name with the paper's marks: ``*`` mixed ranks, ``†`` fine-tuned."""
    m, rec = job.config["method"], job.record
    variant = saes_variant(m)
    text = variant[1] if variant else display(job.config)
    alloc = shared_allocator(m)
    text += f" + {ALLOCATOR_NAMES[alloc]}" if alloc else ""
    mixed = (rec is not None and rec["params"].get("rank_alloc") == "mixed") or \
        m.get("rank_alloc") not in (None, "uniform")
    tuned = bool(job.config.get("finetune")) or (rec is not None and bool(rec.get("finetune")))
    return text + ("*" if mixed else "") + ("†" if tuned else "")


def unique_rows(js: Sequence[Job]) -> list[str]:
    return list(dict.fromkeys(j.row for j in js))


def cell(js: Sequence[Job], row: str, ratio: float) -> Job | None:
    return next((j for j in js if j.row == row and abs(j.ratio - ratio) < 1e-9), None)


# ------------------------------------------------------------------------------------------------- context
@dataclass
class Context:
    """What every table and figure of one build shares: the results folder, the overrides, the sweeps read."""

    results_dir: Path
    overrides: list[str]
    allow_mixed: bool = False
    _cache: dict[str, list[Job]] = field(default_factory=dict)

    def jobs(self, *experiments: str) -> list[Job]:
        out = []
        for e in experiments:
            if e not in self._cache:
                self._cache[e] = jobs(e, self.overrides, self.results_dir)
            out += self._cache[e]
        return out

    @property
    def view(self) -> tuple[str, str]:
        j = self.jobs("table1")[0]
        return str(j.config["model"]["name"]), str(j.scale)

    @property
    def tables_dir(self) -> Path:
        base = self.results_dir / "tables"
        return base if self.view == DEFAULT_VIEW else base / "-".join(self.view)

    @property
    def figures_dir(self) -> Path:
        base = self.results_dir / "figures"
        return base if self.view == DEFAULT_VIEW else base / "-".join(self.view)
