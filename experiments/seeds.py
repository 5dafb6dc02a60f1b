"""Claims with their uncertainty (issue 29): the cells the README's claims rest on at calibration seeds 0, 1, 2.

    python run.py experiment=seeds          # SmolLM2, wiki_books and wiki_qa, ratios 0.2/0.4
    python run.py experiment=seeds_gemma    # Gemma-3-270M, wiki_books, ratios 0.2/0.4
    python run.py experiment=seeds_high     # SmolLM2, wiki_books, ratios 0.6/0.8 (ACES vs the best fixed β)
    python -m experiments.tables            # results/tables/seeds.md, results/figures/seeds_gap_closed.png

The seed draws other calibration windows from the same calibration text (``calib.seed``); the evaluation text is
the same for every seed. Within one seed every configuration sees the same calibration tokens, so differences
between configurations are paired: a claim "A beats B" is reported with its per-seed differences and holds
only if it has the same sign on every seed. Gap closed against SVD-LLM is taken per seed (SVD-LLM on the same
tokens): ``(PPL_svdllm - PPL) / (PPL_svdllm - PPL_dense)`` (Table 1's convention, :mod:`experiments.table1`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from experiments.records import ProtocolMismatch, check_protocol, ppl_of
from experiments.render import Document, Table, commands, fnum, fpct, found, sweep_jobs
from experiments.sweeps import Context, Job

NAME, TITLE = "seeds", "Claims with their uncertainty: calibration seeds 0, 1, 2"
EXPERIMENTS = ("seeds", "seeds_gemma", "seeds_high")
GROUP = "+experiment/seeded="  # the sweep dimension naming a job's configuration (conf/experiment/seeded/)
LABELS = {"svdllm": "SVD-LLM", "aces": "SAES-SVD (ACES)", "beta05": "CEALC, fixed β = 0.5",
          "beta025": "CEALC, fixed β = 0.25", "adacr_bi": "SAES-SVD + adaCR (1 - cos)",
          "adacr_bi_beta05": "CEALC β = 0.5 + adaCR (1 - cos)"}
BASELINE = "svdllm"
TARGET = 0.55  # the moonshot: gap closed at 0.2, averaged over seeds, on both models and both texts


@dataclass(frozen=True)
class Claim:
    """``better`` has a lower perplexity than ``worse`` at these ratios (every cell of the sweeps that has both)."""
    better: str
    worse: str
    ratios: tuple[float, ...]
    says: str  # where the README makes it


CLAIMS = (
    Claim("aces", "svdllm", (0.2, 0.4, 0.6, 0.8), "SAES-SVD beats SVD-LLM (the paper's claim)"),
    Claim("beta05", "aces", (0.2, 0.4), "ACES loses to fixed β = 0.5 at 0.2 and 0.4 (ablation)"),
    Claim("aces", "beta05", (0.6,), "ACES beats the best fixed β at 0.6 (ablation: β = 0.5)"),
    Claim("aces", "beta025", (0.8,), "ACES beats the best fixed β at 0.8 (ablation: β = 0.25)"),
    Claim("adacr_bi", "aces", (0.2, 0.4), "adaCR (1 - cos) ranks improve SAES-SVD (table8)"),
    Claim("adacr_bi", "beta05", (0.2, 0.4), "SAES-SVD + adaCR (1 - cos) beats CEALC at fixed β = 0.5 (table8)"),
    Claim("adacr_bi_beta05", "adacr_bi", (0.2, 0.4), "fixed β = 0.5 improves on ACES under adaCR (1 - cos) ranks"),
)


def frame(js: Sequence[Job]) -> pd.DataFrame:
    """One row per recorded job: model, text, ratio, seed, config, ppl, dense, and gap closed vs SVD-LLM."""
    rows = []
    for j in js:
        if j.record is None:
            continue
        src = str(j.config["eval"]["ppl"]["sources"][0])
        config = next(o[len(GROUP):] for o in j.overrides if o.startswith(GROUP))
        rows.append({"model": str(j.config["model"]["name"]), "text": src, "ratio": j.ratio,
                     "seed": int(j.config["seed"]), "config": config, "ppl": ppl_of(j.record, src),
                     "dense": ppl_of(j.record, src, "dense")})
    df = pd.DataFrame(rows, columns=["model", "text", "ratio", "seed", "config", "ppl", "dense"])
    cell = ["model", "text", "ratio", "seed"]
    base = df[df.config == BASELINE].set_index(cell)["ppl"].rename("baseline")
    df = df.join(base, on=cell)
    df["gap_closed"] = (df.baseline - df.ppl) / (df.baseline - df.dense)
    return df


def spread(df: pd.DataFrame) -> pd.DataFrame:
    """Per (model, text, ratio, config): PPL and gap closed over seeds (mean, min, max, std) and the seeds seen."""
    g = df.groupby(["model", "text", "ratio", "config"], sort=False)
    out = g.agg(n=("seed", "nunique"), ppl_mean=("ppl", "mean"), ppl_min=("ppl", "min"), ppl_max=("ppl", "max"),
                ppl_std=("ppl", "std"), gap_mean=("gap_closed", "mean"), gap_min=("gap_closed", "min"),
                gap_max=("gap_closed", "max"))
    return out.reset_index()


def paired(df: pd.DataFrame, claim: Claim) -> pd.DataFrame:
    """Per (model, text, ratio): the claim's per-seed relative differences ``PPL_worse / PPL_better - 1``."""
    cell = ["model", "text", "ratio", "seed"]
    a = df[df.config == claim.better].set_index(cell)["ppl"]
    b = df[df.config == claim.worse].set_index(cell)["ppl"]
    d = (b / a - 1).dropna().rename("diff").reset_index()
    return d[d.ratio.isin(claim.ratios)]


def verdict(diffs: Sequence[float], seeds: int = 3) -> str:
    """Holds (same sign, better, on every seed), fails (the other way on every seed), or a tie."""
    if len(diffs) < seeds:
        return f"only {len(diffs)} of {seeds} seeds"
    if all(d > 0 for d in diffs):
        return "holds on every seed"
    if all(d < 0 for d in diffs):
        return "reversed on every seed"
    return "tie (sign changes with the seed)"


def _range(lo: float, hi: float, pct: bool = False) -> str:
    return f"[{fpct(lo)}, {fpct(hi)}]" if pct else f"[{fnum(lo)}, {fnum(hi)}]"


def spread_tables(s: pd.DataFrame) -> list[str | Table]:
    blocks: list[str | Table] = []
    for (model, text), part in s.groupby(["model", "text"], sort=False):
        t = Table(["ratio", "configuration", "seeds", "PPL mean", "PPL [min, max]", "PPL std",
                   "gap closed vs SVD-LLM: mean", "gap closed [min, max]"], caption=f"{model}, {text}")
        for r in part.itertuples():
            gap = r.config != BASELINE and pd.notna(r.gap_mean)
            t.rows.append([f"{r.ratio:g}", LABELS.get(r.config, r.config), str(r.n), fnum(r.ppl_mean),
                           _range(r.ppl_min, r.ppl_max), fnum(r.ppl_std) if r.n > 1 else "-",
                           fpct(r.gap_mean) if gap else "-", _range(r.gap_min, r.gap_max, True) if gap else "-"])
        blocks += [t, ""]
    return blocks


def claims_table(df: pd.DataFrame) -> Table:
    t = Table(["claim", "model, text", "ratio", "per-seed PPL(worse) / PPL(better) - 1", "verdict"],
              caption="Paired differences (same calibration tokens for both sides of a claim)")
    for claim in CLAIMS:
        d = paired(df, claim)
        for (model, text, ratio), part in d.groupby(["model", "text", "ratio"], sort=False):
            diffs = list(part.sort_values("seed")["diff"])
            t.rows.append([f"{LABELS[claim.better]} < {LABELS[claim.worse]}: {claim.says}", f"{model}, {text}",
                           f"{ratio:g}", ", ".join(f"{100 * x:+.1f}%" for x in diffs), verdict(diffs)])
    return t


def moonshot(s: pd.DataFrame, cells: int) -> str:
    """Which configuration closes >= 55% of SVD-LLM's gap at 0.2 averaged over seeds, in each of the sweeps'
    ``cells`` (model, text) pairs."""
    at = s[(s.ratio == 0.2) & (s.config != BASELINE)]
    lines = []
    for config, part in at.groupby("config", sort=False):
        worst = part.gap_mean.min()
        seen = f"{len(part)} of {cells} (model, text) cells"
        ok = worst >= TARGET and len(part) == cells and (part.n >= 3).all()
        lines.append(f"{LABELS.get(config, config)}: lowest mean gap closed {fpct(worst)} over {seen}"
                     + (" - reaches the target" if ok else ""))
    return (f"**Moonshot (gap closed >= {TARGET:.0%} at 0.2, mean over seeds, every model and text):** "
            + "; ".join(lines) + ".")


def build(ctx: Context) -> Document:
    if ctx.overrides:  # the seed sweeps fix their own models and texts: one view
        return Document(NAME, TITLE, ["not built: the seed study has one view (no overrides)"], unbuilt=True)
    js = sweep_jobs(ctx, NAME, TITLE, EXPERIMENTS)
    if isinstance(js, Document):
        return js
    blocks: list[str | Table] = []
    for model in dict.fromkeys(str(j.config["model"]["name"]) for j in js):
        for seed in (0, 1, 2):  # one calibration protocol per (model, seed): text and tokens are the record's
            for text in dict.fromkeys(str(j.config["calib"]["source"]) for j in js):
                group = [j for j in js if j.config["model"]["name"] == model and j.config["seed"] == seed
                         and j.config["calib"]["source"] == text]
                try:
                    check_protocol(found(group), ctx.allow_mixed)
                except ProtocolMismatch as exc:
                    return Document(NAME, TITLE, [f"REFUSED: {model}, {text}, seed {seed}: {exc}"], refused=True)
    df = frame(js)
    missing = [j for j in js if j.record is None]
    blocks.append("Made by " + ", ".join(f"`{c}`" for c in commands(EXPERIMENTS, ctx.overrides))
                  + "; rebuilt from the records by `python -m experiments.tables`. Default protocol: 32 x 512 "
                  "calibration tokens drawn with the seed, perplexity on 16 windows x 2048 of the same evaluation "
                  "text for every seed.")
    per = {e: sum(j.experiment == e for j in missing) for e in EXPERIMENTS}
    blocks.append(f"Runs recorded: {len(js) - len(missing)} of {len(js)}."
                  + (" Missing: " + ", ".join(f"{n} of `experiment={e}`" for e, n in per.items() if n)
                     + " (rerun its command: finished runs are skipped)." if missing else ""))
    if df.empty:
        return Document(NAME, TITLE, blocks)
    s = spread(df)
    blocks += spread_tables(s)
    cells = len({(j.config["model"]["name"], j.config["calib"]["source"]) for j in js if j.ratio == 0.2})
    blocks += [claims_table(df), "", moonshot(s, cells)]
    return Document(NAME, TITLE, blocks, latex_too=False)


def figure(js: Sequence[Job], path: Path) -> Path | None:
    """Gap closed vs SVD-LLM per configuration, mean over seeds with min-max bars, one panel per (model, text)."""
    import matplotlib.pyplot as plt

    from experiments.figures import _save

    df = frame(js)
    if df.empty:
        return None
    s = spread(df)
    s = s[s.config != BASELINE]
    panels = list(s.groupby(["model", "text"], sort=False))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), sharey=True, squeeze=False)
    configs = list(dict.fromkeys(s.config))
    for ax, ((model, text), part) in zip(axes[0], panels):
        ratios = sorted(part.ratio.unique())
        width = 0.8 / max(len(configs), 1)
        for i, config in enumerate(configs):
            c = part[part.config == config].set_index("ratio").reindex(ratios)
            xs = [k + (i - (len(configs) - 1) / 2) * width for k in range(len(ratios))]
            err = [(c.gap_mean - c.gap_min).fillna(0), (c.gap_max - c.gap_mean).fillna(0)]
            ax.bar(xs, c.gap_mean * 100, width, yerr=[e * 100 for e in err], capsize=2, label=LABELS.get(config))
        ax.axhline(TARGET * 100, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(ratios)), [f"{r:g}" for r in ratios])
        ax.set_xlabel("ratio")
        ax.set_title(f"{model}, {text}", fontsize=9)
    axes[0][0].set_ylabel("% of SVD-LLM's gap closed (seeds: mean, min-max)")
    axes[0][-1].legend(fontsize=6)
    return _save(fig, path)
