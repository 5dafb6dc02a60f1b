"""The paper's numbers: ``results/reference/*.csv`` (transcribed once), printed beside ours where rows match."""

from __future__ import annotations

import csv
from typing import Sequence

from experiments.sweeps import ROOT

REFERENCE = ROOT / "results" / "reference"


def reference(filename: str) -> list[dict[str, str]]:
    """Rows of ``results/reference/<filename>`` (the paper's numbers); empty if the file is absent."""
    path = REFERENCE / filename
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def ref_value(rows: Sequence[dict[str, str]], method: str, metric: str, ratio: str | None = None,
              setting: str | None = None) -> str | None:
    for r in rows:
        if r["method"] == method and r["metric"] == metric and (ratio is None or _same_ratio(r["ratio"], ratio)) \
                and (setting is None or r["setting"] == setting):
            return r["value"]
    return None


def _same_ratio(a: str, b: str | float) -> bool:
    try:
        return abs(float(a) - float(b)) < 1e-9
    except ValueError:
        return False


def as_float(x: str | None) -> float | None:
    try:
        return None if x is None else float(x)
    except ValueError:
        return None


def marks(rows: Sequence[dict[str, str]], method: str) -> str:
    """The paper's marks on a row name (``*`` mixed ranks, ``†`` fine-tuned), as transcribed."""
    return next((r["marks"] for r in rows if r["method"] == method and r["marks"]), "")


TABLE3_TASKS = ("piqa", "arc_easy", "hellaswag", "winogrande")  # the paper's Tables 3 and 4 average these four
