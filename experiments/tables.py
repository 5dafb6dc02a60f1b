"""The paper's tables and figures, rebuilt from run records alone (nothing is run).

    python -m experiments.tables                              # SmolLM2-135M, CPU preset: results/tables, results/figures
    python -m experiments.tables model=llama7b scale=paper    # another model or preset: results/tables/llama7b-paper/ ...
    python -m experiments.tables --allow-mixed                # render mixed protocols with a warning instead of refusing
    make tables

Every table is the sweep of one or more experiment configs (``conf/experiment/*.yaml``), found by
:mod:`experiments.sweeps` where ``run.py`` writes its records; a table is a small module
(:mod:`experiments.table1`, :mod:`~experiments.ablation`, :mod:`~experiments.aces_bounds`,
:mod:`~experiments.cost`, :mod:`~experiments.compare_baselines`, :mod:`~experiments.bench_foundation`,
:mod:`~experiments.speed`, :mod:`~experiments.table8`, :mod:`~experiments.table10`, :mod:`~experiments.paradigms`,
:mod:`~experiments.seeds`, :mod:`~experiments.half_precision`)
with a ``build(ctx)``. A job without a record prints as ``missing``; no number is ever filled in. The
records of one paper table must share one protocol (model, calibration tokens, evaluation texts,
windows and caps, zero-shot limit): otherwise the table is refused (``--allow-mixed``: rendered with
the differences listed). Differing library versions or devices are always listed. The paper's numbers
come from ``results/reference/*.csv`` (:mod:`experiments.paper`) and are printed beside ours only where
the paper has a matching row; ours are on a different model, so the tables compare shapes (ordering,
the relative gap SAES-SVD closes), not values.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

from experiments import (ablation, aces_bounds, aces_selector, bench_foundation, compare_baselines, cost, figures,
                         half_precision, paradigms, seeds, speed, table1, table8, table10)
from experiments.render import Document, write_document
from experiments.sweeps import ROOT, Context

Builder = Callable[[Context], "Document | list[Document]"]
BUILDERS: tuple[Builder, ...] = (table1.build, ablation.build, aces_bounds.build, cost.build,
                                 compare_baselines.build, bench_foundation.build, speed.build, aces_selector.build,
                                 table8.build, table10.build, paradigms.build, seeds.build, half_precision.build)


def build_documents(ctx: Context) -> list[Document]:
    docs: list[Document] = []
    for build in BUILDERS:
        out = build(ctx)
        docs += out if isinstance(out, list) else [out]
    return docs


def build_all(results_dir: Path, overrides: Sequence[str] = (), allow_mixed: bool = False,
              figures_too: bool = True) -> tuple[list[Document], list[Path]]:
    """Every document and figure; returns the documents and the files written."""
    ctx = Context(Path(results_dir), list(overrides), allow_mixed)
    docs = build_documents(ctx)
    written = [p for d in docs if not d.unbuilt for p in write_document(d, ctx.tables_dir)]
    if figures_too:
        written += figures.build_all(ctx, skip={d.name for d in docs if d.refused or d.unbuilt})
    return docs, written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides applied to every experiment (model=..., scale=...)")
    ap.add_argument("--results-dir", default=str(ROOT / "results"))
    ap.add_argument("--allow-mixed", action="store_true", help="render mixed protocols with a warning")
    ap.add_argument("--no-figures", action="store_true")
    args = ap.parse_args(argv)
    docs, written = build_all(Path(args.results_dir), args.overrides, args.allow_mixed, not args.no_figures)
    for p in written:
        print(f"written: {p}")
    for d in docs:
        if d.unbuilt:
            print(f"{d.name}: {d.blocks[0]}", file=sys.stderr)
    bad = [d.name for d in docs if d.refused]
    if bad:
        print(f"refused (mixed protocols): {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
