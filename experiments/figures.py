"""The paper's figures from run records (called by ``python -m experiments.tables``; matplotlib, Agg).

    fig1a_cosine.png        per-block cosine similarity to the dense model, SVD-LLM against SAES-SVD (table1)
    fig1b_ppl_vs_ratio.png  perplexity against ratio, every method (table1, table1_lora)
    fig1c_rer_vs_beta.png   retained-energy ratio against beta for one projection (experiments/rer_curve.py)
    fig1d_fixed_vs_adaptive.png  accuracy and perplexity against ratio, fixed beta against ACES (ablation)
    fig4_speed_memory.png   memory and speed-up against ratio (python -m experiments.bench_speed's JSON)
    fig6_aces_beta.png      the beta ACES chose for each block's k_proj (table1's SAES-SVD runs)
    paradigms_ppl_vs_memory.png  perplexity against bits per dense linear weight, every paradigm (experiments/paradigms.py)
    seeds_gap_closed.png    gap closed vs SVD-LLM over calibration seeds 0-2 (experiments/seeds.py)

A value a record lacks is never drawn: the point is left out and the legend says which ratios are
missing; a panel without any data says "missing" and what would produce it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import matplotlib
import matplotlib.pyplot as plt  # noqa: E402

from experiments.records import mean_acc, ppl_of, tasks_run
from experiments.render import found
from experiments.speed import bench_json
from experiments.sweeps import label

matplotlib.use("Agg")


if TYPE_CHECKING:
    from experiments.sweeps import Context, Job


def _subtitle(js: Sequence["Job"]) -> str:
    j = js[0]
    return f"ours: {j.config['model']['name']}, scale preset {j.scale} (not the paper's model)"


def _missing(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"missing:\n{what}", ha="center", va="center", transform=ax.transAxes, color="firebrick")
    # hide this panel's ticks only: set_*ticks([]) would empty every panel sharing the axis
    ax.tick_params(left=False, bottom=False, labelleft=False, labelbottom=False)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def series(js: Sequence["Job"], row: str, value: Any) -> tuple[list[float], list[float], list[float]]:
    """``(ratios, values, missing ratios)`` of one row: ``value(record)`` where the record has it."""
    xs, ys, lost = [], [], []
    for j in sorted((j for j in js if j.row == row), key=lambda j: j.ratio):
        v = value(j.record) if j.record is not None else None
        if v is None:
            lost.append(j.ratio)
        else:
            xs.append(j.ratio)
            ys.append(v)
    return xs, ys, lost


def _legend(name: str, lost: list[float]) -> str:
    return name + (f" (missing at {', '.join(map(str, lost))})" if lost else "")


def _rows(js: Sequence["Job"]) -> list[str]:
    return list(dict.fromkeys(j.row for j in js))


def _label_of(js: Sequence["Job"], row: str) -> str:
    return label(next(j for j in js if j.row == row))


def fig1b(js: Sequence["Job"], path: Path) -> Path:
    src = js[0].config["eval"]["ppl"]["sources"][0]
    fig, ax = plt.subplots(figsize=(8.4, 4.4))
    drawn = False
    for row in _rows(js):
        xs, ys, lost = series(js, row, lambda r: ppl_of(r, src))
        if xs:
            ax.plot(xs, ys, marker="o", label=_legend(_label_of(js, row), lost))
            drawn = True
    dense = next((ppl_of(r, src, "dense") for r in found(js)), None)
    if dense is not None:
        ax.axhline(dense, color="k", ls=":", label=f"dense ({dense:.2f})")
    if drawn:
        ax.set_yscale("log")
        ax.set_xlabel("compression ratio (fraction of projection parameters removed)")
        ax.set_ylabel(f"perplexity on {src}")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        _missing(ax, "python run.py experiment=table1")
    ax.set_title(f"Figure 1b: perplexity against ratio\n{_subtitle(js)}", fontsize=9)
    return _save(fig, path)


def _cosines(rec: dict[str, Any] | None) -> list[float] | None:
    if rec is None:
        return None
    cos = [b.get("cosine_fp") for b in rec.get("blocks") or []]
    return cos if cos and all(c is not None for c in cos) else None


def fig1a(js: Sequence["Job"], path: Path, rows: Sequence[str] = ("svdllm", "saes")) -> Path:
    ratios = sorted({j.ratio for j in js})
    fig, axes = plt.subplots(1, len(ratios), figsize=(3.4 * len(ratios), 3.4), squeeze=False, sharey=True)
    for ax, ratio in zip(axes[0], ratios):
        drawn = False
        for row in rows:
            j = next((j for j in js if j.row == row and abs(j.ratio - ratio) < 1e-9), None)
            cos = _cosines(j.record if j else None)
            if cos is None:
                continue
            ax.plot(range(len(cos)), cos, marker=".", label=label(j))
            drawn = True
        if drawn:
            ax.set_xlabel("block")
            ax.legend(fontsize=7)
        else:
            _missing(ax, "records with per-block cosine\n(experiment=table1)")
        ax.set_title(f"ratio {ratio}", fontsize=9)
    axes[0][0].set_ylabel("cosine similarity to the dense model")
    fig.suptitle(f"Figure 1a: block outputs against the dense model's — {_subtitle(js)}", fontsize=9)
    return _save(fig, path)


def _k_proj_betas(rec: dict[str, Any] | None) -> tuple[list[int], list[float]] | None:
    if rec is None:
        return None
    pts = []
    for name, d in rec.get("layers", {}).items():
        if name.endswith(".k_proj") and d.get("beta") is not None:
            m = re.search(r"\.(\d+)\.", name)
            if m:
                pts.append((int(m.group(1)), float(d["beta"])))
    return (sorted(p[0] for p in pts), [b for _, b in sorted(pts)]) if pts else None


def fig6(js: Sequence["Job"], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    saes = sorted((j for j in js if j.row == "saes"), key=lambda j: j.ratio)
    drawn = False
    for j in saes:
        pts = _k_proj_betas(j.record)
        if pts:
            ax.plot(*pts, marker="o", ms=3, label=f"ratio {j.ratio}")
            drawn = True
    lost = [str(j.ratio) for j in saes if _k_proj_betas(j.record) is None]
    if drawn:
        aces = saes[0].config["method"]["aces"]
        ax.axhspan(aces["beta_min"], aces["beta_max"], color="0.9", zorder=0, label="ACES interval")
        ax.set_xlabel("block")
        ax.set_ylabel("β chosen by ACES (k_proj)")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7, title=("missing: ratio " + ", ".join(lost)) if lost else None, title_fontsize=7)
    else:
        _missing(ax, "SAES-SVD records (experiment=table1)")
    ax.set_title(f"Figure 6: ACES's β per block, k_proj\n{_subtitle(js) if js else ''}", fontsize=9)
    return _save(fig, path)


def fig_surrogate_error(js: Sequence["Job"], path: Path) -> Path:
    """ACES's robustness: per projection, the surrogate's error at the chosen β against the spectral gap of S."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    runs = [j for j in js if j.record is not None and j.config["method"]["aces"]["enabled"]
            and j.config["method"]["aces"].get("selector", "surrogate") == "surrogate"
            and any("gap" in d for d in j.record["layers"].values())]
    for j in sorted(runs, key=lambda j: (str(j.config["calib"]["source"]), j.ratio)):
        pts = [(d["gap"], d["surrogate_error"]) for d in j.record["layers"].values() if "gap" in d]
        ax.scatter(*zip(*pts), s=6, alpha=0.6, label=f"{j.config['calib']['source']}, ratio {j.ratio}")
    if runs:
        ax.set_yscale("symlog", linthresh=1e-6)
        ax.set_ylim(bottom=0)  # never negative for the ratio objective
        ax.set_xlabel("spectral gap s_r / s_(r+1) of S")
        ax.set_ylabel("surrogate − true tail ratio at β*")
        ax.legend(fontsize=7)
    else:
        _missing(ax, "SAES-SVD records with ACES diagnostics (experiment=aces_selector)")
    ax.set_title("ACES's surrogate error against the spectral gap, per projection", fontsize=9)
    return _save(fig, path)


def fig1d(js: Sequence["Job"], path: Path) -> Path:
    src = js[0].config["eval"]["ppl"]["sources"][0]
    tasks = tasks_run(found(js))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 3.8))
    drawn = False
    for row in _rows(js):
        style = dict(marker="o", lw=2.2, color="k") if row == "saes" else dict(marker=".", ls="--")
        xs, ys, lost = series(js, row, lambda r: mean_acc(r, tasks))
        if xs:
            a1.plot(xs, ys, label=_legend(_label_of(js, row), lost), **style)
            drawn = True
        xs, ys, lost = series(js, row, lambda r: ppl_of(r, src))
        if xs:
            a2.plot(xs, ys, label=_legend(_label_of(js, row), lost), **style)
    if drawn and tasks:
        a1.set_ylabel(f"mean accuracy ({len(tasks)} tasks)")
        a2.set_ylabel(f"perplexity on {src}")
        a2.set_yscale("log")
        for ax in (a1, a2):
            ax.set_xlabel("compression ratio")
        a2.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        _missing(a1, "python run.py experiment=ablation")
        _missing(a2, "python run.py experiment=ablation")
    fig.suptitle(f"Figure 1d: fixed β against ACES\n{_subtitle(js)}", fontsize=9)
    return _save(fig, path)


def curves_for(ctx: "Context", js: Sequence["Job"]) -> list[dict[str, Any]]:
    """The RER curves written by experiments/rer_curve.py for this model and calibration protocol."""
    model = js[0].config["model"]["name"]
    calib = js[0].config["calib"]
    out = []
    for p in sorted((ctx.results_dir / "curves" / str(model)).glob("rer-*.json")):
        c = json.loads(p.read_text())
        cc = c["config"]["calib"]
        if all(cc.get(k) == calib.get(k) for k in ("source", "nsamples", "seqlen", "seed")):
            out.append(c)
    return out


def fig1c(curves: list[dict[str, Any]], js: Sequence["Job"], path: Path) -> Path:
    n = max(1, len(curves))
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 3.8), squeeze=False)
    if not curves:
        _missing(axes[0][0], "python -m experiments.rer_curve")
    for ax, c in zip(axes[0], curves):
        ax.plot(c["betas"], c["rer"], label="retained-energy ratio of G(β)")
        ax.plot(c["betas"], c["rer_surrogate"], ls="--", label="ACES's fixed-subspace estimate")
        lo, hi = c["aces"]["interval"]
        ax.axvspan(lo, hi, color="0.92", zorder=0, label="ACES interval")
        ax.axvline(c["aces"]["beta"], color="firebrick", label=f"β chosen by ACES ({c['aces']['beta']:.3f})")
        if c.get("recorded_beta") is not None:
            ax.plot([c["recorded_beta"]], [c["aces"]["rer_at_beta"]], "kx", label="β in the run's record")
        ax.set_xlabel("β = α / (1 + α)")
        ax.set_ylabel(f"top-{c['rank']} energy / total")
        ax.set_title(f"{c['layer']} (rank {c['rank']} of {c['shape'][0]}x{c['shape'][1]}), ratio "
                     f"{c['config']['ratio']}", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(f"Figures 1c / 5: retained energy against β\n{_subtitle(js)}", fontsize=9)
    return _save(fig, path)


def fig4(bench: tuple[Path, dict[str, Any]] | None, model: str, path: Path) -> Path:
    """Reads ``rows[*]``: ratio, method, weights_mb, peak_mb, prefill_speedup, decode_speedup, ideal_matmuls,
    device; the dense row is the one with ``method == "dense"``."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    if bench is None:
        for ax in (a1, a2):
            _missing(ax, f"python -m experiments.bench_speed --model {model}")
        fig.suptitle(f"Figure 4: memory and speed-up against ratio — {model}", fontsize=9)
        return _save(fig, path)
    src, data = bench
    rows = sorted(data["rows"], key=lambda r: r["ratio"])
    xs = [r["ratio"] for r in rows]
    a1.plot(xs, [r["weights_mb"] for r in rows], marker="o", label="weights")
    a1.plot(xs, [r["peak_mb"] for r in rows], marker="s", label="peak while running")
    a1.set_ylabel("MB")
    a2.plot(xs, [r["prefill_speedup"] for r in rows], marker="o", label="prefill")
    a2.plot(xs, [r["decode_speedup"] for r in rows], marker="s", label="decode")
    a2.plot(xs, [r["ideal_matmuls"] for r in rows], ls=":", color="k", label="ideal (matmul weights)")
    a2.set_ylabel("speed-up against dense")
    for ax in (a1, a2):
        ax.set_xlabel("compression ratio (0 = dense)")
        ax.legend(fontsize=7)
    fig.suptitle(f"Figure 4: {model} measured on {rows[0].get('device', '?')} ({src.name})", fontsize=9)
    return _save(fig, path)


def build_all(ctx: "Context", skip: set[str]) -> list[Path]:
    """Every figure whose table was built and not refused (``skip``: their names); returns the files written."""
    out_dir = ctx.figures_dir
    t1 = ctx.jobs("table1", "table1_lora", "table1_strs")
    written = []
    if "table1" not in skip:
        written += [fig1a(ctx.jobs("table1"), out_dir / "fig1a_cosine.png"),
                    fig1b(t1, out_dir / "fig1b_ppl_vs_ratio.png"),
                    fig6(ctx.jobs("table1"), out_dir / "fig6_aces_beta.png"),
                    fig1c(curves_for(ctx, t1), t1, out_dir / "fig1c_rer_vs_beta.png")]
    if "ablation" not in skip:
        written.append(fig1d(ctx.jobs("ablation"), out_dir / "fig1d_fixed_vs_adaptive.png"))
    if "aces_selector" not in skip:
        written.append(fig_surrogate_error(ctx.jobs("aces_selector"), out_dir / "aces_surrogate_error.png"))
    if "paradigms" not in skip:
        from experiments import paradigms  # it draws with this module's helpers

        fig = paradigms.figure(ctx.jobs(*paradigms.EXPERIMENTS), out_dir / "paradigms_ppl_vs_memory.png")
        written += [fig] if fig else []
    if "seeds" not in skip and not ctx.overrides:
        from experiments import seeds  # it draws with this module's helpers

        fig = seeds.figure(ctx.jobs(*seeds.EXPERIMENTS), out_dir / "seeds_gap_closed.png")
        written += [fig] if fig else []
    model = str(t1[0].config["model"]["name"])
    written.append(fig4(bench_json(ctx.results_dir, model), model, out_dir / "fig4_speed_memory.png"))
    return written
