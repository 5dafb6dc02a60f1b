"""Dense vs SVD vs SAES-SVD on the embedded SmolLM2-135M: perplexity, phase times, peak memory.

    python experiments/bench_foundation.py                 # runs what is missing, prints the table
    python experiments/bench_foundation.py --ratios 0.2 0.4 --extra calib.nsamples=32

Each configuration is one ``run.py`` job in its own process (so peak memory is per
run); finished runs are read back from their records, never recomputed. Every
number printed comes from a record under ``results/runs/``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = {  # label -> overrides
    "svd": ["method=svd"],
    "saes: beta=0 (neither CEALC nor ACES)": ["method=saes", "method.aces.enabled=false", "method.alpha=0.0"],
    "saes: CEALC, fixed alpha=1 (ACES off)": ["method=saes", "method.aces.enabled=false", "method.alpha=1.0"],
    "saes: CEALC + ACES": ["method=saes"],
}


def run_one(overrides: list[str], results_dir: str) -> dict:
    cmd = [sys.executable, "run.py", *overrides, f"results_dir={results_dir}"]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    # the record path is derived from the resolved config: ask the pipeline's own function
    from experiments.tables import resolved
    from saes.io import read_json
    from saes.runs.records import record_path

    return read_json(record_path(results_dir, resolved([*overrides, f"results_dir={results_dir}"])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--results-dir", default="results")
    ap.add_argument("--extra", nargs="*", default=[], help="Hydra overrides added to every run")
    ap.add_argument("--name", default="bench_foundation", help="table file: <results-dir>/tables/<name>.md")
    args = ap.parse_args()

    rows = []
    for ratio in args.ratios:
        for label in args.variants:
            rec = run_one([*VARIANTS[label], f"ratio={ratio}", *args.extra], args.results_dir)
            rows.append((label, ratio, rec))

    table = render(rows)
    print(table)
    out = Path(args.results_dir) / "tables" / f"{args.name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    print(f"written: {out}")


def render(rows: list[tuple[str, float, dict]]) -> str:
    """A markdown table of the records, with the protocol they share (or a warning if they do not)."""
    src = next(iter(rows[0][2]["metrics"]["ppl"]))
    first = rows[0][2]
    cal = next((r["calibration"] for _, _, r in rows if r["calibration"]["tokens_sha256"]), first["calibration"])
    lines = [f"model {first['config']['model']['name']} ({first['model']['identity'][:24]}...), "
             f"calibration {cal['source']} {cal['nsamples']}x{cal['seqlen']} tokens "
             f"(sha256 {str(cal['tokens_sha256'])[:12]}), eval {src}: "
             f"{first['metrics']['ppl'][src]['windows']} windows x {first['config']['eval']['ppl']['seqlen']} tokens",
             f"dense PPL: {first['metrics']['ppl'][src]['dense']:.3f}", ""]
    hashes = {r["calibration"]["tokens_sha256"] for _, _, r in rows} - {None}
    if len(hashes) > 1:
        lines.insert(0, "WARNING: these runs used different calibration tokens")
    head = ("| method | ratio | PPL | removed (proj / model) | calibration s | factorisation s | eval s | total s | "
            "peak RSS MB | mean beta |")
    lines += [head, "|---" * (head.count("|") - 1) + "|"]
    for label, ratio, r in rows:
        t, p = r["timings"], r["params"]
        betas = [d["beta"] for d in r["layers"].values() if "beta" in d]
        mean_beta = f"{sum(betas) / len(betas):.3f}" if betas else "-"
        lines.append(f"| {label} | {ratio} | {r['metrics']['ppl'][src]['compressed']:.3f} | "
                     f"{p['linears_ratio']:.3f} / {p['model_ratio']:.3f} | {t['calibration']:.1f} | "
                     f"{t['factorisation']:.1f} | {t['eval_compressed']:.1f} | {t['total']:.1f} | "
                     f"{r['memory']['peak_rss_mb']:.0f} | {mean_beta} |")
    lines.append("records: " + ", ".join(str(r["key"]) for _, _, r in rows))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
