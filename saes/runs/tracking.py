"""The harness's W&B mirror of one job (``logger=wandb``): opened when the job starts, fed live, finished with
the record or as failed.

What a run holds:

* at the start: the resolved config plus ``record_key`` and ``git_commit``; name ``model-method-ratio-seed``;
  group = the sweep (``experiment=<name>``, else the Hydra multirun folder; ``logger.group`` overrides; a single
  run has none); job type ``compress`` or ``load``; tags: method, model, scale preset, ``logger.tags``;
* per block, live (the engine's ``EngineConfig.on_block``): ``block/*`` against the step metric ``block``;
* at the end: the ``layers`` table (a row per projection), the summary (the record's metrics, params, timings and
  memory, flattened with ``/``: equal to the JSON), lm-eval's own W&B logging of the zero-shot result, the record
  as an artifact and a saved model folder as a reference artifact (nothing copied); a failure finishes the run
  with exit code 1, keeping what it had logged.

W&B never changes a record's key or numbers: the record only gains a ``wandb`` field (id, dir, mode) when a run
was opened, and every W&B call that fails is logged as a warning, never raised. The engine and the evaluation do
not import W&B: they get plain callbacks, reached through :func:`active` (the job's tracker, so that the hooks in
:mod:`saes.runs.pipeline` stay one line each).
"""

from __future__ import annotations

import logging
import os
import resource
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from saes.engine.config import BlockReport
from saes.runs.records import environment, flatten

if TYPE_CHECKING:  # pipeline imports this module
    from omegaconf import DictConfig

    from saes.runs.job import Job

log = logging.getLogger(__name__)

SUMMARY_PARTS = ("metrics", "params", "timings", "memory")  # the record's parts mirrored as the run's summary
LAYER_COLUMNS = ("name", "m", "n", "rank")  # the layers table's first columns; the method's diagnostics follow
# Offline must mean no connection at all. W&B's service process reads these from the environment when it starts:
# with error reporting on, it looks up an external host even offline (strace: a DNS query for its reporting
# endpoint); with it off, an offline run connects only to its own service over Unix sockets.
OFFLINE_ENV = {"WANDB_MODE": "offline", "WANDB_ERROR_REPORTING": "false"}


@dataclass
class Tracker:
    """One job's W&B run; ``run`` is None when the logger is off or W&B could not start (every method is then a
    no-op)."""
    run: Any = None
    mode: str = "disabled"
    zeroshot_result: dict[str, Any] | None = None  # simple_evaluate's result, logged once at the end
    finished: bool = field(default=False, repr=False)

    # ---------------------------------------------------------------- hooks
    @property
    def on_block(self) -> Callable[[BlockReport], None] | None:
        """``EngineConfig.on_block`` (None without a run: the engine reports nothing)."""
        return self.block if self.run is not None else None

    @property
    def on_result(self) -> Callable[[dict[str, Any]], None] | None:
        """``zeroshot.evaluate``'s ``on_result`` (None without a run)."""
        return self.keep_zeroshot if self.run is not None else None

    def block(self, b: BlockReport) -> None:
        """``EngineConfig.on_block``: one history row per block, against the step metric ``block``."""
        if self.run is not None:
            _safe("per-block log", lambda: self.run.log(block_row(b)))

    def keep_zeroshot(self, result: dict[str, Any]) -> None:
        """``zeroshot.evaluate``'s ``on_result``: kept, logged with lm-eval's logger when the run finishes (the
        evaluation's timings stay W&B's-free). Only the compressed model's result comes here (dense scores are
        cached), and the first one is kept."""
        if self.run is not None and self.zeroshot_result is None:
            self.zeroshot_result = result

    def record_fields(self) -> dict[str, Any]:
        """What the record says of its run (``{"wandb": {id, dir, mode, project}}``; nothing when none is open)."""
        if self.run is None:
            return {}
        return {"wandb": {"id": self.run.id, "dir": str(Path(self.run.dir).parent), "mode": self.mode,
                          "project": self.run.project}}

    def finish(self, record: dict[str, Any], path: Path) -> None:
        """The written record's mirror: layers table, summary, zero-shot, artifacts; then the run is finished."""
        if self.run is None or self.finished:
            return
        run = self.run
        _safe("layers table", lambda: run.log({"layers": layers_table(record.get("layers") or {})}))
        _safe("summary", lambda: run.summary.update({**summary(record), "record_path": str(path)}))
        self._log_zeroshot()
        _safe("record artifact", lambda: run.log_artifact(record_artifact(record, path)))
        if record.get("saved_to"):
            _safe("model artifact", lambda: run.log_artifact(model_artifact(record)))
        self.close(0)

    def close(self, exit_code: int) -> None:
        """Finish the run (exit code != 0: marked failed, what it logged kept)."""
        if self.run is None or self.finished:
            return
        self.finished = True
        self._log_zeroshot()  # what the job evaluated, also when it failed after (or without a record)
        _safe("finish", lambda: self.run.finish(exit_code=exit_code))

    def _log_zeroshot(self) -> None:
        result, self.zeroshot_result = self.zeroshot_result, None
        if result is not None:
            _safe("lm-eval's W&B logger", lambda: log_lm_eval(self.run, result))


NULL = Tracker()
_ACTIVE: ContextVar[Tracker] = ContextVar("saes_tracker", default=NULL)


def active() -> Tracker:
    """The tracker of the job running here (:func:`track`); a no-op one outside a job."""
    return _ACTIVE.get()


@contextmanager
def track(cfg: DictConfig, job: Job) -> Iterator[Tracker]:
    """Open the job's W&B run (per ``cfg.logger``) and make it :func:`active`; a failure finishes it as failed."""
    from omegaconf import OmegaConf

    logger_cfg = OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") else {}
    assert isinstance(logger_cfg, dict)
    tracker = open_tracker(logger_cfg, job, hydra_context())
    token = _ACTIVE.set(tracker)
    try:
        yield tracker
    except BaseException:
        tracker.close(1)
        raise
    finally:
        _ACTIVE.reset(token)
    tracker.close(0)


# ------------------------------------------------------------------ opening
@dataclass(frozen=True)
class Context:
    """Where the job runs in Hydra's terms: its sweep (None: a single run) and scale preset."""
    group: str | None = None
    scale: str | None = None


def hydra_context() -> Context:
    """The sweep and scale preset from Hydra's runtime (nothing when the config was composed without Hydra's
    app, as in tests): ``experiment=<name>`` names the group, else a multirun's sweep folder does."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return Context()
    hc = HydraConfig.get()
    choices = hc.runtime.choices
    experiment = choices.get("experiment")
    group = experiment if experiment else (str(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None)
    return Context(group, choices.get("scale"))


def run_name(config: dict[str, Any], loaded: bool) -> str:
    """``model-method-ratio-seed`` (a ``load=`` run: ``...-loaded``)."""
    last = "loaded" if loaded else config["seed"]
    return f"{config['model']['name']}-{config['method']['name']}-{config['ratio']}-{last}"


def open_tracker(logger_cfg: dict[str, Any], job: Job, context: Context,
                 init: Callable[..., Any] | None = None) -> Tracker:
    """Start the job's W&B run (``init``: ``wandb.init``, replaceable in tests); logger off: the no-op tracker.
    A W&B that cannot start is a warning: the job goes on without it."""
    mode = str(logger_cfg.get("mode", "disabled"))
    if mode == "disabled":
        return Tracker()
    if mode == "offline":
        os.environ.update(OFFLINE_ENV)  # before W&B's service starts (it inherits this environment)
    config, loaded = job.config, job.saved is not None
    tags = [str(config["method"]["name"]), str(config["model"]["name"])]
    tags += [f"scale:{context.scale}"] if context.scale else []
    tags += [str(t) for t in logger_cfg.get("tags") or [] if str(t) not in tags]
    try:
        if init is None:
            import wandb

            init = wandb.init
            settings: Any = wandb.Settings(quiet=True)
        else:
            settings = None
        out_dir = Path(logger_cfg.get("dir") or config["results_dir"])
        out_dir.mkdir(parents=True, exist_ok=True)
        run = init(project=logger_cfg.get("project", "saes-svd"), entity=logger_cfg.get("entity"), mode=mode,
                   name=run_name(config, loaded), group=logger_cfg.get("group") or context.group,
                   job_type="load" if loaded else "compress", tags=tags, dir=str(out_dir),
                   config={**config, "record_key": job.key, "git_commit": environment()["git_commit"]},
                   reinit="finish_previous",  # Hydra's multirun: every job its own run, in one process
                   settings=settings)
        run.define_metric("block")
        run.define_metric("block/*", step_metric="block")
    except Exception as exc:  # noqa: BLE001 - a logger failure must not lose the job
        log.warning("W&B init failed (%s); continuing without it", exc)
        return Tracker()
    return Tracker(run, mode)


# ------------------------------------------------------------------ what is logged
def block_row(b: BlockReport) -> dict[str, Any]:
    """One block's history row: time so far (total and per phase), fidelity, ranks per projection, the mean of
    each numeric diagnostic of the method (``beta``, ``alpha``, ...), peak memory so far."""
    row: dict[str, Any] = {"block": b.index, "block/elapsed_s": b.elapsed}
    row.update({f"block/time/{k}": v for k, v in b.timings.items()})
    if b.cosine_fp is not None:
        row["block/cosine_fp"] = b.cosine_fp
    values: dict[str, list[float]] = {}
    for name, d in b.layers.items():
        if d.get("rank") is not None:
            row[f"block/rank/{name.rsplit('.', 1)[-1]}"] = d["rank"]
        for k, v in d.items():
            if k not in LAYER_COLUMNS and k != "seconds" and _number(v):
                values.setdefault(k, []).append(float(v))
    row.update({f"block/{k}_mean": sum(v) / len(v) for k, v in values.items()})
    row.update({f"block/{k}": v for k, v in peak_memory().items()})
    return row


def layers_table(layers: dict[str, dict[str, Any]]) -> Any:
    """A ``wandb.Table`` with a row per projection: name, shape, rank, then the union of the diagnostics present
    (in first-seen order; empty where a projection lacks one)."""
    import wandb

    extra: list[str] = []
    for d in layers.values():
        extra += [k for k in d if k not in LAYER_COLUMNS and k not in extra]
    columns = [*LAYER_COLUMNS, *extra]
    rows = [[name, *(_cell(d.get(c)) for c in columns[1:])] for name, d in layers.items()]
    return wandb.Table(columns=columns, data=rows)


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """The run's summary: the record's metrics, params, timings and memory, flattened with ``/``."""
    return flatten({k: record[k] for k in SUMMARY_PARTS if k in record})


def record_artifact(record: dict[str, Any], path: Path) -> Any:
    import wandb

    artifact = wandb.Artifact(f"record-{record['key']}", type="record", metadata={"key": record["key"]})
    artifact.add_file(str(path), name="record.json")
    return artifact


def model_artifact(record: dict[str, Any]) -> Any:
    """The saved folder by reference (``file://``): nothing is copied. No checksum: a folder of a 7B model is
    gigabytes, and its manifest already carries the record key and each file's identity."""
    import wandb

    folder = Path(record["saved_to"]).resolve()
    artifact = wandb.Artifact(f"model-{record['key']}", type="model", metadata={"key": record["key"]})
    artifact.add_reference(folder.as_uri(), checksum=False)
    return artifact


def log_lm_eval(run: Any, result: dict[str, Any]) -> None:
    """lm-eval's own W&B logging of a ``simple_evaluate`` result (its metrics, per-task tables, results artifact),
    on this job's run: its logger attaches to ``wandb.run``, which must be this run."""
    import wandb
    from lm_eval.loggers import WandbLogger

    if wandb.run is not run:
        raise RuntimeError("the job's run is not wandb.run")
    logger = WandbLogger()
    logger.post_init(result)
    logger.log_eval_result()
    if result.get("samples"):
        logger.log_eval_samples(result["samples"])


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process, and of CUDA when present (the record's ``memory`` fields)."""
    import torch

    memory = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        memory["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return memory


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _cell(v: Any) -> Any:
    """A table cell: numbers and strings as they are, anything else as text (W&B tables want one type a column)."""
    return v if v is None or isinstance(v, (int, float, str)) else str(v)


def _safe(what: str, fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - W&B must never fail a job
        log.warning("W&B %s failed: %s", what, exc)
