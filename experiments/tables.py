"""The paper's tables and figures, rebuilt from run records alone (nothing is run).

    python -m experiments.tables                              # SmolLM2-135M, CPU preset: results/tables, results/figures
    python -m experiments.tables model=llama7b scale=paper    # another model or preset: results/tables/llama7b-paper/ ...
    python -m experiments.tables --allow-mixed                # render mixed protocols with a warning instead of refusing
    make tables

Every table is the sweep of one or more experiment configs (``conf/experiment/*.yaml``): each job of the
sweep is composed exactly as ``run.py -m experiment=<name>`` composes it, and its record is read from
where ``run.py`` writes it (:func:`saes.runs.records.record_path`). A job without a record prints as
``missing``; no number is ever filled in. The records of one table must share one protocol (model,
calibration tokens, evaluation texts, windows and caps, zero-shot limit): otherwise the table is refused
(``--allow-mixed``: rendered with the differences listed). Differing library versions or devices are
always listed. The paper's numbers come from ``results/reference/*.csv`` (transcribed once) and are
printed beside ours only where the paper has a matching row; ours are on a different model, so the
tables compare shapes (ordering, the relative gap SAES-SVD closes), not values.
"""

from __future__ import annotations

import argparse
import csv
import functools
import itertools
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from saes.io import read_json  # noqa: E402
from saes.runs.records import record_path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))


CONF = ROOT / "conf"
REFERENCE = ROOT / "results" / "reference"
DEFAULT_VIEW = ("smollm2_135m", "cpu")  # (model, scale) whose tables go straight into results/tables/

NAMES = {"svd": "SVD", "fwsvd": "FWSVD", "asvd": "ASVD", "asvd_strs": "ASVD (STRS)", "svdllm": "SVD-LLM",
         "svdllm_update": "SVD-LLM (update)", "adasvd": "AdaSVD", "saes": "SAES-SVD"}
TASKS = {"openbookqa": "OpenbookQA", "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "winogrande": "WinoG.",
         "hellaswag": "HellaS.", "piqa": "PIQA", "mathqa": "MathQA", "boolq": "BoolQ", "lambada_openai": "LAMBADA"}
TABLE3_TASKS = ("piqa", "arc_easy", "hellaswag", "winogrande")  # Tables 3 and 4 average these four
MISSING = "missing"


# ---------------------------------------------------------------------------------------- sweeps and records
def compose(overrides: Sequence[str], hydra: bool = False) -> Any:
    """``conf/config.yaml`` composed with ``overrides`` (with the ``hydra`` node when asked)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)


@functools.lru_cache(maxsize=None)
def _resolved_json(overrides: tuple[str, ...]) -> str:
    return json.dumps(to_dict(compose(overrides)))


def resolved(overrides: Sequence[str]) -> dict[str, Any]:
    """The resolved config of ``overrides`` as a fresh dict (composed once per process: Hydra takes ~0.1 s)."""
    return json.loads(_resolved_json(tuple(overrides)))


def to_dict(cfg: Any) -> dict[str, Any]:
    """A composed config as the pipeline records it (resolved, plain containers)."""
    from omegaconf import OmegaConf

    out = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(out, dict)
    return out


def sweep_overrides(experiment: str, overrides: Sequence[str] = ()) -> tuple[list[list[str]], str | None]:
    """The jobs of ``run.py -m experiment=<experiment> <overrides>`` (one override list each) and the scale preset.

    As Hydra's basic sweeper does: each key of ``hydra.sweeper.params`` is one dimension (its
    comma list expanded by Hydra's own parser), a key also given in ``overrides`` takes that value
    instead, and the jobs are the Cartesian product, parameters first, then the given overrides.
    """
    jobs, scale = _sweep(experiment, tuple(overrides))
    return [list(j) for j in jobs], scale


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
    jobs = tuple((*job, f"experiment={experiment}", *overrides) for job in itertools.product(*dims))
    return jobs, cfg.hydra.runtime.choices.get("scale")


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


def jobs(experiment: str, overrides: Sequence[str], results_dir: Path) -> list[Job]:
    """Every job of the experiment's sweep with the record ``run.py`` would have written for it."""
    out = []
    overrides_per_job, scale = sweep_overrides(experiment, overrides)
    for job in overrides_per_job:
        config = resolved(job)  # results_dir is not part of a record's key: the path is rooted at ours
        path = record_path(results_dir, config)
        out.append(Job(experiment, job, config, scale, path, read_json(path) if path.is_file() else None))
    return out


def saes_variant(method: dict[str, Any]) -> tuple[str, str] | None:
    """``(row id, display name)`` of a SAES config that is not SAES-SVD as configured; None if it is."""
    aces = method.get("aces") or {}
    if not aces.get("enabled", True):
        alpha = float(method["alpha"])
        return (f"saes:beta={beta_of(alpha):.3f}",
                "β = 0 (neither CEALC nor ACES)" if alpha == 0 else f"CEALC, fixed β = {beta_of(alpha):.2f}")
    if _aces_setting(aces) != _aces_setting(saes_defaults()):
        lo, hi, space = aces["beta_min"], aces["beta_max"], aces.get("space", "beta")
        return f"saes:[{lo},{hi}]/{space}", f"SAES-SVD, ACES [{lo}, {hi}] ({space})"
    return None


def row_id(cfg: dict[str, Any]) -> str:
    """Which row of a table a config is: the method, its SAES variant, ``+lora`` when fine-tuned."""
    m = cfg["method"]
    variant = saes_variant(m) if m["name"] == "saes" else None
    return (variant[0] if variant else str(m["name"])) + ("+lora" if cfg.get("finetune") else "")


def _aces_setting(aces: dict[str, Any]) -> tuple:
    return tuple(aces.get(k) for k in ("beta_min", "beta_max", "space", "objective", "cap", "shrink"))


@functools.lru_cache(maxsize=1)
def _saes_defaults_json() -> str:
    from omegaconf import OmegaConf

    return json.dumps(OmegaConf.to_container(OmegaConf.load(CONF / "method" / "saes.yaml").aces))


def saes_defaults() -> dict[str, Any]:
    """``method.aces`` of conf/method/saes.yaml: what "SAES-SVD" without qualification means."""
    return json.loads(_saes_defaults_json())


def beta_of(alpha: float) -> float:
    return alpha / (1.0 + alpha)


def label(job: Job) -> str:
    """Display name with the paper's marks: ``*`` mixed ranks, ``†`` fine-tuned."""
    m, rec = job.config["method"], job.record
    variant = saes_variant(m) if m["name"] == "saes" else None
    text = variant[1] if variant else NAMES.get(str(m["name"]), str(m["name"]))
    mixed = (rec is not None and rec["params"].get("rank_alloc") == "mixed") or \
        m.get("rank_alloc") not in (None, "uniform")
    tuned = bool(job.config.get("finetune")) or (rec is not None and bool(rec.get("finetune")))
    return text + ("*" if mixed else "") + ("†" if tuned else "")


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


def check_protocol(records: Sequence[dict[str, Any]], allow_mixed: bool = False) -> tuple[dict[str, str], list[str]]:
    """The shared protocol of ``records`` and warning lines for what differs.

    Raises :class:`ProtocolMismatch` when a strict aspect differs (unless ``allow_mixed``).
    """
    seen: dict[str, dict[str, list[str]]] = {}
    for rec in records:
        for k, v in protocol(rec).items():
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


# -------------------------------------------------------------------------------------------- documents
@dataclass
class Table:
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    caption: str = ""

    def markdown(self) -> str:
        esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
        lines = ([f"**{self.caption}**", ""] if self.caption else [])
        lines += ["| " + " | ".join(map(esc, self.header)) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(map(esc, r)) + " |" for r in self.rows]
        return "\n".join(lines)

    def latex(self) -> str:
        lines = ["\\begin{table}[t]", "\\centering", "\\small",
                 "\\begin{tabular}{" + "l" * 2 + "r" * (len(self.header) - 2) + "}", "\\toprule",
                 " & ".join(map(tex, self.header)) + " \\\\", "\\midrule"]
        lines += [" & ".join(map(tex, r)) + " \\\\" for r in self.rows]
        lines += ["\\bottomrule", "\\end{tabular}"]
        if self.caption:
            lines.append("\\caption{" + tex(self.caption) + "}")
        return "\n".join(lines + ["\\end{table}"])


TEX = {"\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "$": "\\$", "#": "\\#", "_": "\\_", "{": "\\{",
       "}": "\\}", "~": "\\textasciitilde{}", "^": "\\^{}", "†": "$^\\dagger$", "*": "$^*$", "β": "$\\beta$",
       "α": "$\\alpha$", "±": "$\\pm$", "≤": "$\\le$", "×": "$\\times$", "–": "--", "→": "$\\to$", "<": "$<$",
       ">": "$>$", "‡": "$^\\ddagger$"}


def tex(s: Any) -> str:
    return "".join(TEX.get(c, c) for c in str(s).replace("**", ""))  # markdown bold first, then the characters


@dataclass
class Document:
    """One output: a markdown file (and a LaTeX file with the same tables) under the tables folder."""

    name: str
    title: str
    blocks: list[str | Table] = field(default_factory=list)
    refused: bool = False  # the records did not share a protocol: no numbers, only the reason
    unbuilt: bool = False  # the experiment could not be composed with the given overrides: nothing is written

    def markdown(self) -> str:
        parts = [f"# {self.title}"] + [b.markdown() if isinstance(b, Table) else b for b in self.blocks]
        return "\n\n".join(parts) + "\n"

    def latex(self) -> str:
        out = [f"% {self.title}", "% generated by python -m experiments.tables from run records; needs booktabs"]
        for b in self.blocks:
            if isinstance(b, Table):
                out.append(b.latex())
            else:
                out += ["% " + line for line in b.splitlines()]
        return "\n".join(out) + "\n"


def refusal(name: str, title: str, why: str, commands: Iterable[str]) -> Document:
    """The document written instead of a table whose records do not share one protocol: no numbers, the reason."""
    return Document(name, title, refused=True, blocks=[
        "**REFUSED: the records of this table do not share one protocol.** Rerun the differing runs, or build "
        "with `--allow-mixed` to see them side by side.",
        "```\n" + why + "\n```", "Made by: " + ", ".join(f"`{c}`" for c in commands)])


# ------------------------------------------------------------------------------------------ record values
def fnum(x: float | None, digits: int = 2) -> str:
    """Perplexities: fixed below 10^4, else scientific; None is n/a (the record lacks it)."""
    if x is None:
        return "n/a"
    if not math.isfinite(x):
        return "inf" if x > 0 else "nan"
    return f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:.1e}".replace("e+0", "e").replace("e+", "e")


def avg_head(tasks: Sequence[str], what: str = "") -> str:
    return f"Avg ({what or len(tasks)} tasks)" if tasks else "Avg"


def facc(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def fpct(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


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


def rel_drop(dense: float | None, comp: float | None) -> float | None:
    return (dense - comp) / dense if dense and comp is not None else None


def gap_closed(base: float | None, ours: float | None, dense: float | None) -> float | None:
    """``(PPL_baseline - PPL_saes) / (PPL_baseline - PPL_dense)``: the share of the baseline's gap SAES-SVD closes
    (None when there is no gap: the baseline is not worse than the dense model)."""
    if None in (base, ours, dense) or not all(math.isfinite(v) for v in (base, ours, dense)) or base <= dense:
        return None
    return (base - ours) / (base - dense)


def tasks_run(records: Iterable[dict[str, Any]]) -> list[str]:
    """Tasks with a score in every record that has zero-shot results (configured order)."""
    recs = [r for r in records if (r["metrics"].get("zeroshot") or {}).get("tasks")]
    if not recs:
        return []
    order = list(recs[0]["config"]["eval"].get("zeroshot", {}).get("tasks") or recs[0]["metrics"]["zeroshot"]["tasks"])
    return [t for t in order if all(acc_of(r, t) is not None and acc_of(r, t, "dense") is not None for r in recs)]


def standard_error(rec: dict[str, Any], tasks: Sequence[str]) -> float | None:
    """Binomial standard error of the dense model's mean accuracy over ``tasks`` (n examples each)."""
    zs = rec["metrics"].get("zeroshot") or {}
    terms = []
    for t in tasks:
        p, n = acc_of(rec, t, "dense"), (zs.get("tasks") or {}).get(t, {}).get("n")
        if p is None or not n:
            return None
        terms.append(p * (1 - p) / n)
    return math.sqrt(sum(terms)) / len(terms) if terms else None


# ------------------------------------------------------------------------------------------------ reference
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


# ------------------------------------------------------------------------------------------------- context
@dataclass
class Context:
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


def found(js: Iterable[Job]) -> list[dict[str, Any]]:
    return [j.record for j in js if j.record is not None]


def commands(experiments: Sequence[str], overrides: Sequence[str]) -> list[str]:
    extra = "".join(f" {o}" for o in overrides if not o.startswith("results_dir="))
    return [f"python run.py experiment={e}{extra}" for e in experiments]


def header(js: Sequence[Job], experiments: Sequence[str], ctx: Context, shared: dict[str, str],
           warnings: list[str]) -> list[str]:
    """The lines every document opens with: what made it, on what, and what is missing."""
    model, scale = js[0].config["model"]["name"], js[0].scale
    missing = [j for j in js if j.record is None]

    def missing_id(j: Job) -> str:  # the sweep's own overrides, named by experiment when several share a table
        own = " ".join(j.overrides[:j.overrides.index(f"experiment={j.experiment}")])
        return f"{j.experiment}: {own}" if len(experiments) > 1 else own

    lines = [f"Ours: **{model}**, scale preset **{scale}** (`conf/scale/{scale}.yaml`). Made by "
             + ", ".join(f"`{c}`" for c in commands(experiments, ctx.overrides))
             + "; rebuilt from the records by `python -m experiments.tables`. These are our numbers on this model, "
             "not the paper's on LLaMA: compare shapes (ordering, gaps closed), not values.",
             f"Runs recorded: {len(js) - len(missing)} of {len(js)}."
             + (" None yet: run the command above." if len(missing) == len(js) else
                " Missing: " + "; ".join(map(missing_id, missing)) + "." if missing else "")]
    if shared:
        lines.append("Protocol shared by every record: " + "; ".join(f"{k}: {v}" for k, v in shared.items()) + ".")
    return warnings + lines


def prepare(ctx: Context, name: str, title: str, experiments: Sequence[str],
            build: Callable[[list[Job], list[str]], list[str | Table]]) -> Document:
    """Jobs of ``experiments``, their protocol check, the header, then ``build``'s blocks (or a refusal)."""
    from hydra.errors import ConfigCompositionException

    try:
        js = ctx.jobs(*experiments)
    except ConfigCompositionException as exc:  # an override that this experiment's config cannot take
        return Document(name, title, [f"not built: {exc}"], unbuilt=True)
    try:
        shared, warnings = check_protocol(found(js), ctx.allow_mixed)
    except ProtocolMismatch as exc:
        return refusal(name, title, str(exc), commands(experiments, ctx.overrides))
    head = header(js, experiments, ctx, shared, warnings)
    return Document(name, title, [*map(str, head), *build(js, head)])


def unique_rows(js: Sequence[Job]) -> list[str]:
    seen: list[str] = []
    for j in js:
        if j.row not in seen:
            seen.append(j.row)
    return seen


def cell(js: Sequence[Job], row: str, ratio: float) -> Job | None:
    return next((j for j in js if j.row == row and abs(j.ratio - ratio) < 1e-9), None)


def dense_record(js: Sequence[Job]) -> dict[str, Any] | None:
    return next((j.record for j in js if j.record is not None), None)


# --------------------------------------------------------------------------------------------------- table 1
TABLE1_MATCH = {  # our row id per paper row name, per reference table (our reading; Dobi-SVD, Dip-SVD: none here)
    "table1_llama7b.csv": {"Baseline": "dense", "FWSVD": "fwsvd", "ASVD": "asvd_strs", "SVD-LLM": "svdllm+lora",
                           "Ours": "saes"},
    "table5_llama2_7b.csv": {"Original": "dense", "SVD": "svd", "FWSVD": "fwsvd", "ASVD": "asvd_strs",
                             "SVD-LLM": "svdllm", "AdaSVD": "adasvd", "Ours": "saes"},
    "table6_llama3_8b.csv": {"SVD-LLM": "svdllm", "Ours": "saes"},
}


def build_table1(ctx: Context) -> Document:
    experiments = ("table1", "table1_lora")

    def build(js: list[Job], _: list[str]) -> list[str | Table]:
        recs = found(js)
        sources = list(js[0].config["eval"]["ppl"]["sources"])
        tasks = tasks_run(recs)
        asked = list(js[0].config["eval"].get("zeroshot", {}).get("tasks") or [])
        dense = dense_record(js)
        ratios = sorted({j.ratio for j in js})
        table = Table(["ratio", "method", *[f"PPL {s}" for s in sources], *[TASKS.get(t, t) for t in tasks],
                       avg_head(tasks), "Drop"], caption="Ours: perplexity and zero-shot accuracy")
        if dense is not None:
            d_avg = mean_acc(dense, tasks, "dense")
            table.rows.append(["0.0", "dense", *[fnum(ppl_of(dense, s, "dense")) for s in sources],
                               *[facc(acc_of(dense, t, "dense")) for t in tasks], facc(d_avg), "-"])
        for ratio in ratios:
            for row in unique_rows(js):
                j = cell(js, row, ratio)
                if j is None:
                    continue
                if j.record is None:
                    table.rows.append([str(ratio), label(j), *[MISSING] * (len(table.header) - 2)])
                    continue
                avg = mean_acc(j.record, tasks)
                table.rows.append([str(ratio), label(j), *[fnum(ppl_of(j.record, s)) for s in sources],
                                   *[facc(acc_of(j.record, t)) for t in tasks], facc(avg),
                                   fpct(rel_drop(mean_acc(j.record, tasks, "dense"), avg))])
        notes = ["Avg: mean accuracy (lm-eval's `acc`, or the metric the runs averaged) over the tasks every run "
                 "scored; Drop: its relative drop from the dense model's. * mixed ranks, † LoRA fine-tuning after "
                 "compression."]
        lost = [t for t in asked if t not in tasks]
        if lost:
            notes.append(f"Tasks asked for but not scored in every run: {', '.join(lost)} "
                         "(see each record's `metrics.zeroshot.missing`; offline, MathQA has no local copy).")
        se = standard_error(dense, tasks) if dense is not None and tasks else None
        if se is not None:
            notes.append(f"Binomial standard error of the dense average: ±{se:.3f} (differences smaller than about "
                         "twice this are not resolved by this many examples).")
        blocks: list[str | Table] = [table, " ".join(notes)]
        for ref in TABLE1_MATCH:
            blocks += compare_with_paper(js, ref, sources[0], tasks)
        return blocks

    return prepare(ctx, "table1", "Table 1: every method at four ratios (with Tables 5/6 and Figure 1b)",
                   experiments, build)


def compare_with_paper(js: list[Job], ref_file: str, src: str, tasks: list[str]) -> list[str | Table]:
    """Our rows beside one reference table's matching rows: PPL, gap closed by SAES-SVD, average accuracy, drop."""
    rows = reference(ref_file)
    if not rows:
        return [f"(reference `{ref_file}` not found: no paper numbers beside ours)"]
    match = TABLE1_MATCH[ref_file]
    source, model = rows[0]["source"], rows[0]["model"]
    dense = dense_record(js)
    four = "acc_average4" in {r["metric"] for r in rows}
    our_tasks = [t for t in (TABLE3_TASKS if four else tasks) if t in tasks]
    paper_dense_ppl = next((as_float(ref_value(rows, m, "ppl_wikitext2")) for m, rid in match.items()
                            if rid == "dense"), None)
    table = Table(["ratio", "paper row", "ours", f"PPL {src}", "gap closed by SAES-SVD", "Avg", "Drop",
                   "paper Wiki2 PPL", "paper gap closed", "paper Avg", "paper Drop"],
                  caption=f"Beside {source} ({model}, the paper's numbers)")
    orders = []
    ours_ratios = {j.ratio for j in js}
    paper_ratios = sorted({float(r["ratio"]) for r in rows if r["ratio"] and float(r["ratio"]) > 0})
    for ratio in (r for r in paper_ratios if r in ours_ratios):
        ours_saes = cell(js, "saes", ratio)
        paper_saes = as_float(ref_value(rows, "Ours", "ppl_wikitext2", str(ratio)))
        ours_ppl, paper_ppl = {}, {}
        for paper_name, rid in match.items():
            if rid == "dense" or ref_value(rows, paper_name, "ppl_wikitext2", str(ratio)) is None:
                continue
            j = cell(js, rid, ratio)
            rec = j.record if j else None
            p = ppl_of(rec, src)
            pp = as_float(ref_value(rows, paper_name, "ppl_wikitext2", str(ratio)))
            if p is not None:
                ours_ppl[paper_name] = p
            if pp is not None:
                paper_ppl[paper_name] = pp
            is_saes = rid == "saes"
            avg = mean_acc(rec, our_tasks)
            p_avg = ref_value(rows, paper_name, "acc_average4" if four else "acc_average", str(ratio))
            p_drop = ref_value(rows, paper_name, "drop", str(ratio))
            table.rows.append([
                str(ratio), paper_name + _marks(rows, paper_name), label(j) if j else "not run here",
                (fnum(p) if rec else MISSING) if j else "-",
                "-" if is_saes or not j else (fpct(gap_closed(p, ppl_of(ours_saes.record if ours_saes else None, src),
                                                            ppl_of(dense, src, "dense"))) if rec else MISSING),
                (facc(avg) if rec else MISSING) if j else "-",
                (fpct(rel_drop(mean_acc(rec, our_tasks, "dense"), avg)) if rec else MISSING) if j else "-",
                ref_value(rows, paper_name, "ppl_wikitext2", str(ratio)) or "n/a",
                "-" if is_saes else fpct(gap_closed(pp, paper_saes, paper_dense_ppl)),
                p_avg or "n/a", (p_drop + "%") if p_drop else "n/a"])
        common = [n for n in paper_ppl if n in ours_ppl]
        if len(common) > 1:
            ours_order = sorted(common, key=lambda n: ours_ppl[n])
            paper_order = sorted(common, key=lambda n: paper_ppl[n])
            orders.append(f"ratio {ratio}: ours {' < '.join(ours_order)}; paper {' < '.join(paper_order)}"
                          f" ({'same order' if ours_order == paper_order else 'different order'})")
    notes = [f"Rows: the paper's {source} rows with a counterpart here (our reading: "
             + ", ".join(f"{k} = {v}" for k, v in match.items()) + "). Gap closed = (PPL_baseline - PPL_SAES) / "
             "(PPL_baseline - PPL_dense); ours on "
             f"{src}, the paper's on WikiText-2 from its printed numbers. Avg: ours over "
             f"{', '.join(our_tasks) or 'no task'}"
             + (" (the paper's four)" if four else "") + f"; the paper's as printed ({'%' if four else 'fraction'})."]
    if orders:
        notes.append("Ordering by perplexity (paper row names), " + "; ".join(orders) + ".")
    skipped = [str(r) for r in paper_ratios if r not in ours_ratios]
    if skipped:
        notes.append(f"The paper's ratios {', '.join(skipped)} are not in our sweep.")
    return [table, " ".join(notes)]


def _marks(rows: Sequence[dict[str, str]], method: str) -> str:
    return next((r["marks"] for r in rows if r["method"] == method and r["marks"]), "")


# ------------------------------------------------------------------------------------------ table 3 / 1d
ABLATION_ROWS = {"saes:beta=0.000": ("no", "no"), "saes:beta=0.500": ("yes (β = 0.5)", "no"), "saes": ("yes", "yes")}


def build_ablation(ctx: Context) -> Document:
    def build(js: list[Job], _: list[str]) -> list[str | Table]:
        recs = found(js)
        src = js[0].config["eval"]["ppl"]["sources"][0]
        tasks = tasks_run(recs)
        four = [t for t in TABLE3_TASKS if t in tasks]
        dense = dense_record(js)
        table = Table(["ratio", "variant", "CEALC", "ACES", f"PPL {src}", avg_head(four, f"Table 3's {len(four)}"),
                       avg_head(tasks, f"all {len(tasks)}"), "PPL reduction vs β = 0"],
                      caption="Ours: SAES-SVD's components (Table 3) and fixed β against ACES (Figure 1d)")
        if dense is not None:
            table.rows.append(["0.0", "dense", "-", "-", fnum(ppl_of(dense, src, "dense")),
                               facc(mean_acc(dense, four, "dense")), facc(mean_acc(dense, tasks, "dense")), "-"])
        for ratio in sorted({j.ratio for j in js}):
            base = cell(js, "saes:beta=0.000", ratio)
            base_ppl = ppl_of(base.record if base else None, src)
            for row in unique_rows(js):
                j = cell(js, row, ratio)
                if j is None:
                    continue
                cealc, aces = ABLATION_ROWS.get(row, ("yes (β = %s)" % row.split("=")[-1][:4], "no"))
                if j.record is None:
                    table.rows.append([str(ratio), label(j), cealc, aces, *[MISSING] * 4])
                    continue
                p = ppl_of(j.record, src)
                red = (base_ppl - p) / base_ppl if base_ppl and p is not None and row != "saes:beta=0.000" else None
                table.rows.append([str(ratio), label(j), cealc, aces, fnum(p), facc(mean_acc(j.record, four)),
                                   facc(mean_acc(j.record, tasks)), "-" if red is None else fpct(red)])
        paper = reference("table3_ablation.csv")
        ptable = Table(["model", "ratio", "CEALC", "ACES", "Wiki PPL", "Avg Acc (4 tasks, %)", "PPL reduction vs neither"],
                       caption="Table 3 (the paper's numbers)")
        for model in dict.fromkeys(r["model"] for r in paper):
            rows = [r for r in paper if r["model"] == model]
            neither = as_float(ref_value(rows, "neither", "ppl_wikitext2"))
            for meth, (c, a) in (("neither", ("no", "no")), ("CEALC", ("yes", "no")), ("CEALC+ACES", ("yes", "yes"))):
                p = as_float(ref_value(rows, meth, "ppl_wikitext2"))
                red = (neither - p) / neither if neither and p is not None and meth != "neither" else None
                ptable.rows.append([model, rows[0]["ratio"] or "n/a", c, a, ref_value(rows, meth, "ppl_wikitext2") or "n/a",
                                    ref_value(rows, meth, "acc_average4") or "n/a", "-" if red is None else fpct(red)])
        text = ("Variants: β = 0 is truncation-aware whitening on compressed-stream statistics (neither component); "
                "CEALC with a fixed β (α = β / (1 - β)); SAES-SVD adds ACES's per-layer β in [0.25, 0.75]. "
                f"The four-task average is Table 3's (PIQA, ARC-e, HellaSwag, WinoGrande; here: {', '.join(four) or 'none'}). "
                "The paper states no ratio for Table 3 (its LLaMA2-7B CEALC+ACES row is Table 4's, at 0.2).")
        return [table, text, ptable if paper else "(reference table3_ablation.csv not found)"]

    return prepare(ctx, "ablation", "Table 3 and Figure 1d: CEALC and ACES, fixed β against adaptive", ("ablation",),
                   build)


# ------------------------------------------------------------------------------------------------ table 4
def build_aces_bounds(ctx: Context) -> Document:
    def build(js: list[Job], _: list[str]) -> list[str | Table]:
        recs = found(js)
        src = js[0].config["eval"]["ppl"]["sources"][0]
        four = [t for t in TABLE3_TASKS if t in tasks_run(recs)]
        paper = reference("table4_aces_bounds.csv")
        table = Table(["bounds", "read as", "β interval", f"PPL {src}", avg_head(four, f"Table 4's {len(four)}"), "mean β",
                       "projections at an end", "paper Wiki PPL", "paper Avg Acc (%)"],
                      caption="Ours beside Table 4 (the paper's numbers: LLaMA2-7B, ratio 0.2, bounds labelled α)")
        for j in js:
            aces = j.config["method"]["aces"]
            lo, hi, space = float(aces["beta_min"]), float(aces["beta_max"]), aces["space"]
            blo, bhi = (beta_of(lo), beta_of(hi)) if space == "alpha" else (lo, hi)
            setting = f"{_num(lo)}-{_num(hi)}"
            head = [f"({_num(lo)}, {_num(hi)})", space, f"[{blo:.3f}, {bhi:.3f}]"]
            paper_cols = [ref_value(paper, "Ours", "ppl_wikitext2", setting=setting) or "n/a",
                          ref_value(paper, "Ours", "acc_average4", setting=setting) or "n/a"]
            if j.record is None:
                table.rows.append([*head, *[MISSING] * 4, *paper_cols])
                continue
            betas = [d["beta"] for d in j.record["layers"].values() if d.get("beta") is not None]
            ends = sum(1 for b in betas if min(abs(b - blo), abs(b - bhi)) < 1e-9)
            table.rows.append([*head, fnum(ppl_of(j.record, src)), facc(mean_acc(j.record, four)),
                               f"{sum(betas) / len(betas):.3f}" if betas else "n/a",
                               f"{ends} of {len(betas)}" if betas else "n/a", *paper_cols])
        return [table, "β interval: the bounds as ACES clips β (read as α bounds they map through β = α / (1 + α)). "
                       "Mean β and ends: over every compressed projection of the run. The paper's values are printed "
                       "once per bounds pair; which reading the paper used is not stated."]

    return prepare(ctx, "aces_bounds", "Table 4: ACES's bounds, read as β and as α", ("aces_bounds",), build)


def _num(x: float) -> str:
    return f"{x:g}"


# ----------------------------------------------------------------------------------------------- table 11
def build_cost(ctx: Context) -> Document:
    def build(js: list[Job], _: list[str]) -> list[str | Table]:
        table = Table(["method", "calibration s", "pre-pass s", "factorisation s", "fine-tuning s",
                       "compression s", "end-to-end s", "peak RSS MB", "clean timing"],
                      caption="Ours: time of each phase and peak memory (Table 11)")
        totals: dict[str, float] = {}
        for j in js:
            rec = j.record
            if rec is None:
                table.rows.append([label(j), *[MISSING] * 8])
                continue
            t, cal = rec["timings"], rec.get("calibration") or {}
            comp = sum(t.get(k, 0.0) for k in ("prepare", "calibration", "factorisation", "checkpoint", "finetune"))
            totals[j.row] = comp
            clean = not cal.get("stats_cached_blocks") and not cal.get("resumed_from_block")
            table.rows.append([label(j), f"{t.get('calibration', 0.0):.1f}", f"{t.get('prepare', 0.0):.1f}",
                               f"{t.get('factorisation', 0.0):.1f}", f"{t['finetune']:.1f}" if "finetune" in t else "0",
                               f"{comp:.1f}", f"{t['total']:.1f}", f"{rec['memory']['peak_rss_mb']:.0f}",
                               "yes" if clean else "no (cached statistics or resumed blocks)"])
        paper = reference("table11_cost.csv")
        ptable = Table(["method", "data collection h", "compression h", "fine-tuning h", "total h"],
                       caption="Table 11 (the paper's numbers: LLaMA-7B, NVIDIA A6000)")
        for meth in dict.fromkeys(r["method"] for r in paper):
            ptable.rows.append([meth + _marks(paper, meth), *[ref_value(paper, meth, f"hours_{k}") or "n/a" for k in
                                                              ("data_collection", "compression", "finetune", "total")]])
        shape = []
        if "saes" in totals and "svdllm+lora" in totals and totals["svdllm+lora"] > 0:
            shape.append(f"ours: SAES-SVD's compression time is {totals['saes'] / totals['svdllm+lora']:.2f} x "
                         "SVD-LLM†'s (with its LoRA stage)")
        if "saes" in totals and "svdllm" in totals and totals["svdllm"] > 0:
            shape.append(f"{totals['saes'] / totals['svdllm']:.2f} x SVD-LLM's without it")
        p_saes, p_svdllm = (as_float(ref_value(paper, m, "hours_total")) for m in ("Ours", "SVD-LLM"))
        if p_saes and p_svdllm:
            shape.append(f"the paper: {p_saes / p_svdllm:.2f} x (SAES-SVD against SVD-LLM†)")
        rec = dense_record(js)
        env = (rec or {}).get("env") or {}
        hw = env.get("cuda") or f"CPU ({env.get('platform', '?')}, {env.get('torch_threads', '?')} torch threads)"
        text = (f"Measured on {hw}. calibration = forwards of both streams and statistics; pre-pass = a method's "
                "whole-model pass before compression (none for these two); compression = pre-pass + calibration + "
                "factorisation + fine-tuning; end-to-end adds loading and evaluation. Both methods use the same "
                "calibration tokens (the paper's SVD-LLM used 256 samples, SAES-SVD 128). Peak RSS is per job (the "
                "experiment resets the process peak before each job). Clean: no statistics reused from another "
                "run and no resumed blocks (the experiment turns both off). " + ("; ".join(shape) + "." if shape else ""))
        return [table, text, ptable if paper else "(reference table11_cost.csv not found)"]

    return prepare(ctx, "cost", "Table 11: compression cost of SAES-SVD against SVD-LLM", ("cost",), build)


# -------------------------------------------------------------------------------------------------- main
BUILDERS: tuple[Callable[[Context], Document], ...] = (build_table1, build_ablation, build_aces_bounds, build_cost)


def write_document(doc: Document, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    md, tx = folder / f"{doc.name}.md", folder / f"{doc.name}.tex"
    md.write_text(doc.markdown())
    tx.write_text(doc.latex())
    return [md, tx]


def build_all(results_dir: Path, overrides: Sequence[str] = (), allow_mixed: bool = False,
              figures: bool = True) -> tuple[list[Document], list[Path]]:
    """Every document and figure; returns the documents and the files written."""
    ctx = Context(Path(results_dir), list(overrides), allow_mixed)
    docs = [b(ctx) for b in BUILDERS]
    written = [p for d in docs if not d.unbuilt for p in write_document(d, ctx.tables_dir)]
    if figures:
        from experiments import figures as figs

        written += figs.build_all(ctx, skip={d.name for d in docs if d.refused or d.unbuilt})
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
    from experiments.tables import main as _main  # one module object, whether run with -m or as a script

    raise SystemExit(_main())
