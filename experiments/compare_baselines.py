"""Every method under one calibration protocol on the embedded SmolLM2-135M (issue 3's comparison).

    python experiments/compare_baselines.py                          # runs what is missing, writes the table
    python experiments/compare_baselines.py --ratios 0.2 --methods svd saes
    python experiments/compare_baselines.py --render-only            # table from the records alone

Each (method, ratio) is one ``run.py`` job in its own process (peak memory is per run);
finished runs are skipped by ``run.py`` itself (records are keyed by the resolved config).
The table reads only records: a run that is missing shows as missing. Runs whose
calibration tokens or evaluation protocol differ from the first one are flagged.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

METHODS = {  # label -> run.py overrides
    "svd": ["method=svd"],
    "fwsvd": ["method=fwsvd"],
    "asvd": ["method=asvd"],
    "asvd_strs": ["method=asvd_strs"],
    "svdllm": ["method=svdllm"],
    "svdllm_update": ["method=svdllm_update"],
    "adasvd": ["method=adasvd"],
    "saes": ["method=saes"],
}


def overrides_for(label: str, ratio: float, extra: list[str], results_dir: str) -> list[str]:
    return [*METHODS[label], f"ratio={ratio}", *extra, f"results_dir={results_dir}"]


def record_for(overrides: list[str]) -> dict | None:
    """The record ``run.py`` would write for these overrides, or None if it does not exist (yet)."""
    from experiments.tables import resolved
    from saes.io import read_json
    from saes.runs.records import record_path

    config = resolved(overrides)
    path = record_path(config["results_dir"], config)
    return read_json(path) if path.is_file() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--results-dir", default="results")
    ap.add_argument("--extra", nargs="*", default=[], help="Hydra overrides added to every run")
    ap.add_argument("--method-extra", nargs="*", default=[], metavar="LABEL:OVERRIDE",
                    help="an override for one method only, e.g. asvd_strs:method.strs.nsamples=2")
    ap.add_argument("--render-only", action="store_true", help="do not run anything; table from records")
    ap.add_argument("--name", default="compare_baselines", help="table file: <results-dir>/tables/<name>.md")
    args = ap.parse_args()
    per_method: dict[str, list[str]] = {}
    for item in args.method_extra:
        label, _, override = item.partition(":")
        if label not in METHODS or not override:
            raise SystemExit(f"--method-extra wants LABEL:OVERRIDE with LABEL in {list(METHODS)}; got {item!r}")
        per_method.setdefault(label, []).append(override)

    cells: dict[tuple[str, float], dict | None] = {}
    for ratio in args.ratios:
        for label in args.methods:
            ov = overrides_for(label, ratio, args.extra + per_method.get(label, []), args.results_dir)
            if not args.render_only and record_for(ov) is None:
                print("$ python run.py", " ".join(ov), flush=True)
                done = subprocess.run([sys.executable, "run.py", *ov], cwd=ROOT)
                if done.returncode != 0:
                    print(f"!! {label} at ratio {ratio} failed (exit {done.returncode}); it stays missing", flush=True)
            cells[(label, ratio)] = record_for(ov)

    table = render(cells, args.methods, args.ratios)
    print(table)
    out = Path(args.results_dir) / "tables" / f"{args.name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    print(f"written: {out}")


def render(cells: dict[tuple[str, float], dict | None], methods: list[str], ratios: list[float]) -> str:
    """Markdown: PPL per method and ratio, then compression time (pre-pass + calibration + factorisation)."""
    recs = [r for r in cells.values() if r is not None]
    if not recs:
        return "no records yet"
    if str(ROOT) not in sys.path:  # run as a script: the experiments package lives at the repository root
        sys.path.insert(0, str(ROOT))
    from experiments.tables import check_protocol, fnum

    first = recs[0]
    src = next(iter(first["metrics"]["ppl"]))
    calibs = {r["calibration"]["tokens_sha256"] for r in recs} - {None}
    _, warnings = check_protocol(recs, allow_mixed=True)  # an ad-hoc grid: differences are listed, not refused
    cal = next(r["calibration"] for r in recs if r["calibration"]["tokens_sha256"])
    lines = [f"Model {first['config']['model']['name']} ({first['model']['identity'][:28]}...). "
             f"Calibration: {cal['source']}, {cal['nsamples']} x {cal['seqlen']} tokens, sha256 "
             f"{', '.join(sorted(h[:12] for h in calibs))}. Perplexity on {src}: "
             f"{first['metrics']['ppl'][src]['windows']} windows x {first['config']['eval']['ppl']['seqlen']} tokens; "
             f"dense {first['metrics']['ppl'][src]['dense']:.3f}.", ""]
    lines[:0] = [w + "\n" for w in warnings]
    head = "| method | stream | ranks | " + " | ".join(f"PPL @{r}" for r in ratios) + " | " + \
        " | ".join(f"compress s @{r}" for r in ratios) + " |"
    lines += [head, "|---" * (head.count("|") - 1) + "|"]
    for label in methods:
        row = [cells.get((label, r)) for r in ratios]
        any_rec = next((r for r in row if r is not None), None)
        stream = any_rec["calibration"]["stream"] if any_rec else "-"
        alloc = any_rec["params"].get("rank_alloc", "uniform") if any_rec else "-"
        ppl = [fnum(r["metrics"]["ppl"][src]["compressed"]) if r else "missing" for r in row]
        secs = [f"{sum(r['timings'].get(k, 0.0) for k in ('prepare', 'calibration', 'factorisation')):.0f}"
                f"{' (c)' if r['calibration'].get('stats_cached_blocks') else ''} [{r['env'].get('torch_threads', '?')}t]"
                if r else "-" for r in row]
        lines.append(f"| {label} | {stream} | {alloc} | " + " | ".join(ppl) + " | " + " | ".join(secs) + " |")
    lines += ["", "compress s = method pre-pass (Fisher / sensitivity / importance) + calibration forwards and "
              "statistics + factorisation, from each record's timings; [Nt] = torch threads of that run; "
              "(c) = FP-stream statistics read from the cache (calib.reuse_stats), so their calibration time is "
              "missing from the figure.",
              "records: " + ", ".join(f"{k[0]}@{k[1]}:{r['key']}" for k, r in cells.items() if r)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
