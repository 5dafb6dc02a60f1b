"""Run records as data: :func:`load_records` (one ``DataFrame`` row per record) and the values tables read.

    from experiments.records import load_records
    df = load_records("results", model="smollm2_135m")
    df.pivot_table(index="config.method.name", columns="config.ratio", values="metrics.ppl.wiki_books.compressed")

Also here: a record's protocol (what its numbers depend on besides the method) and the check that the
records of one table share it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from saes.io import read_json

FLATTENED = ("config", "metrics", "params", "timings")  # the parts of a record that become columns


def flatten(obj: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    """Nested dicts as dotted keys (lists and scalars are values)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = obj
    return out


def load_records(results_dir: str | Path = "results", model: str | None = None, method: str | None = None,
                 parts: Sequence[str] = FLATTENED) -> pd.DataFrame:
    """Every record under ``<results_dir>/runs/`` as one row: ``key``, ``created``, ``path`` and the dotted
    columns of the record's ``parts`` (``config.method.name``, ``metrics.ppl.wiki_books.compressed``,
    ``params.linears_ratio``, ``timings.total``, ...); ``model``/``method``: only that model's or method's
    records. Rows are sorted by path; a value a record lacks is NaN/None."""
    runs = Path(results_dir) / "runs"
    folder = runs / model if model else runs
    rows = []
    for path in sorted(folder.rglob("*.json")) if folder.is_dir() else []:
        rec = read_json(path)
        if method is not None and rec["config"]["method"]["name"] != method:
            continue
        row: dict[str, Any] = {"key": rec.get("key"), "created": rec.get("created"), "path": str(path)}
        for part in parts:
            flatten(rec.get(part) or {}, part, row)
        rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------ record values
def ppl_of(rec: dict[str, Any] | None, src: str, which: str = "compressed") -> float | None:
    if rec is None:
        return None
    v = rec["metrics"]["ppl"].get(src, {}).get(which)
    return None if v is None else float(v)


def acc_of(rec: dict[str, Any] | None, task: str, which: str = "compressed") -> float | None:
    """A task's accuracy in the record (the metric its average used: ``acc``, or ``acc_norm`` if configured)."""
    zs = (rec or {}).get("metrics", {}).get("zeroshot") or {}
    t = (zs.get("tasks") or {}).get(task)
    if not t or not t.get(which):
        return None
    metric = (zs.get("average_metrics") or {}).get(task) or zs.get("average_metric", "acc")
    v = t[which].get(metric, t[which].get("acc"))
    return None if v is None else float(v)


def mean_acc(rec: dict[str, Any] | None, tasks: Sequence[str], which: str = "compressed") -> float | None:
    """Mean over ``tasks``; None unless every one of them is in the record."""
    vals = [acc_of(rec, t, which) for t in tasks]
    return sum(vals) / len(vals) if vals and all(v is not None for v in vals) else None  # type: ignore[arg-type]


def mean_acc_stderr(rec: dict[str, Any] | None, tasks: Sequence[str], which: str = "compressed") -> float | None:
    """Standard error of :func:`mean_acc` from lm-eval's per-task errors in the record (None unless every task has
    one): :func:`saes.evaluation.zeroshot.stderr_of_mean`."""
    from saes.evaluation.zeroshot import stderr_of_mean

    zs = (rec or {}).get("metrics", {}).get("zeroshot") or {}
    errs: list[float | None] = []
    for task in tasks:
        t = (zs.get("tasks") or {}).get(task) or {}
        metric = (zs.get("average_metrics") or {}).get(task) or zs.get("average_metric", "acc")
        values = t.get(which) or {}
        errs.append(values.get(f"{metric}_stderr", values.get("acc_stderr")) if metric in values else
                    values.get("acc_stderr"))
    return stderr_of_mean(errs)


def rel_drop(dense: float | None, comp: float | None) -> float | None:
    return (dense - comp) / dense if dense and comp is not None else None


def gap_closed(base: float | None, ours: float | None, dense: float | None) -> float | None:
    """``(PPL_baseline - PPL_saes) / (PPL_baseline - PPL_dense)``: the share of the baseline's gap SAES-SVD closes
    (None when there is no gap: the baseline is not worse than the dense model)."""
    if base is None or ours is None or dense is None or not all(map(math.isfinite, (base, ours, dense))) \
            or base <= dense:
        return None
    return (base - ours) / (base - dense)


def tasks_run(records: Iterable[dict[str, Any]]) -> list[str]:
    """Tasks with a score in every record that has zero-shot results (configured order)."""
    recs = [r for r in records if (r["metrics"].get("zeroshot") or {}).get("tasks")]
    if not recs:
        return []
    order = list(recs[0]["config"]["eval"].get("zeroshot", {}).get("tasks") or recs[0]["metrics"]["zeroshot"]["tasks"])
    return [t for t in order if all(acc_of(r, t) is not None and acc_of(r, t, "dense") is not None for r in recs)]


def mean_beta(rec: dict[str, Any]) -> float | None:
    """Mean β over the record's compressed projections (None if the method records none)."""
    betas = [d["beta"] for d in rec["layers"].values() if d.get("beta") is not None]
    return sum(betas) / len(betas) if betas else None


# ------------------------------------------------------------------------------------------------ protocol
class ProtocolMismatch(ValueError):
    """Records that may not share a table: they differ in what was measured or how."""


# aspects (prefixes) that refuse a table when they differ; the others (library versions, device) are named
STRICT = ("model", "model dtype", "calibration", "perplexity", "zero-shot")


def protocol(rec: dict[str, Any]) -> dict[str, str]:
    """What a record's numbers depend on besides the method: one short string per aspect."""
    cfg, cal, env = rec["config"], rec.get("calibration") or {}, rec.get("env") or {}
    p = {"model": str(rec["model"]["identity"]), "model dtype": str(cfg["model"]["dtype"])}
    if cal.get("tokens_sha256"):  # data-free methods read no calibration tokens: nothing to compare
        p["calibration"] = (f"{cal['source']}, {cal['nsamples']} x {cal['seqlen']} tokens, seed {cal['seed']}, "
                            f"sha256 {cal['tokens_sha256'][:12]}")
    seqlen = cfg["eval"]["ppl"]["seqlen"]
    for src, m in rec["metrics"]["ppl"].items():
        p[f"perplexity {src}"] = f"{m['windows']} windows x {seqlen} tokens, sha256 {str(m['tokens_sha256'])[:12]}"
    zs = rec["metrics"].get("zeroshot")
    if zs:
        limit = "all examples" if zs.get("limit") is None else f"first {zs['limit']} examples per task"
        p["zero-shot"] = f"{limit}, {zs.get('num_fewshot', 0)}-shot, {zs.get('data')} data"
    versions = env.get("versions") or {}
    for pkg in ("torch", "transformers") + (("lm-eval",) if zs else ()):
        p[pkg] = str(versions.get(pkg))
    p["device"] = env.get("cuda") or f"cpu ({env.get('torch_threads')} threads)"
    return p


def check_protocol(records: Sequence[dict[str, Any]], allow_mixed: bool = False,
                   varies: Sequence[str] = ()) -> tuple[dict[str, str], list[str]]:
    """The shared protocol of ``records`` and warning lines for what differs.

    Raises :class:`ProtocolMismatch` when a strict aspect differs (unless ``allow_mixed``). ``varies``: aspects
    the table varies on purpose (its columns, e.g. ``model dtype``), left out of both.
    """
    seen: dict[str, dict[str, list[str]]] = {}
    for rec in records:
        for k, v in protocol(rec).items():
            if k in varies:
                continue
            seen.setdefault(k, {}).setdefault(v, []).append(str(rec.get("key")))
    shared = {k: next(iter(v)) for k, v in seen.items() if len(v) == 1}
    strict, flagged = [], []
    for k, values in seen.items():
        if len(values) < 2:
            continue
        line = f"{k} differs: " + "; ".join(f"{v} (records {', '.join(keys)})" for v, keys in values.items())
        (strict if k.startswith(STRICT) else flagged).append(line)
    if strict and not allow_mixed:
        raise ProtocolMismatch("\n".join(strict))
    return shared, [f"**WARNING (mixed protocol): {line}**" for line in strict] + \
        [f"**Note: {line}**" for line in flagged]
