"""The experiments themselves, run as dry sweeps on the tiny random model (slow: every job of every sweep's rows in
process, and one sweep through ``run.py -m``), with a small local text and one zero-shot task; the tables they
fill are read back by the same builders as the committed ones (:mod:`tests.test_experiments`)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import ablation, aces_bounds, cost, figures, sweeps, table1
from experiments.rer_curve import run_curve
from saes.runs.pipeline import run, summary
from saes.runs.records import config_key

from .conftest import ROOT
from .test_experiments import EXPERIMENTS, TINY, has_cells, row_cells

# -------------------------------------------------------------------------------- dry sweeps on the tiny model
@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """Enough plain text for the tiny model's calibration and evaluation (seconds, not wiki_books' minute)."""
    rng = random.Random(0)
    words = [w for w in "the a model layer rank energy error block weight beta alpha value stream token".split()]
    paras = [" ".join(rng.choice(words) for _ in range(60)) + "." for _ in range(400)]
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("\n\n".join(paras))
    return path


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """Zero-shot tasks from the local copies, converted into a fresh cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SAES_CACHE", str(tmp_path_factory.mktemp("saes-cache")))
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        mp.setenv(var, "1")
    yield
    mp.undo()


DOBI_DRY = ["method.dobi.windows=2", "method.dobi.seqlen=64", "method.dobi.select_windows=1", "method.dobi.epochs=1",
            "method.dobi.accum=2"]  # Dobi-SVD's stage 1 in one step (the preset's 640 x 32 windows take ~2 h)


def dry(text: Path, experiment: str = "ablation") -> list[str]:
    """Overrides for a dry run at ratio 0.2: the tiny preset, a local text; table1 scores one zero-shot task
    (four examples), the other accuracy experiments none (the same code path, already covered); cost has none."""
    table1_family = ("table1", "table1_lora", "table1_dip", "table1_strs", "table1_dobi", "table1_dobi_grid")
    tasks = (["eval.zeroshot.tasks=[arc_easy]", *DOBI_DRY] if experiment in table1_family  # (unused settings: no key)
             else [] if experiment == "cost" else ["eval.zeroshot.tasks=[]"])
    return [*TINY, "scale=tiny", "calib.source=local", f"calib.path={text}", "eval.ppl.sources=[local]",
            f"eval.ppl.path={text}", *tasks, "ratio=0.2"]


@pytest.mark.slow
def test_dry_sweep_of_every_experiment_runs_and_fills_its_tables(tmp_path, text_file, offline):
    """Every row of every experiment, at ratio 0.2, through the pipeline on the tiny model (zero-shot in table1).

    LoRA jobs get a smaller fine-tuning set than the experiment's (seconds instead of ten): their records
    then have another key, and the tables must show exactly those runs as missing."""
    small_lora = ["finetune.source=local", f"finetune.path={text_file}", "finetune.nsamples=2",
                  "finetune.seqlen=32", "finetune.epochs=1", "finetune.batch_size=2"]
    overrides = {e: dry(text_file, e) for e in EXPERIMENTS}
    for experiment in EXPERIMENTS:
        for j in sweeps.jobs(experiment, overrides[experiment], tmp_path):
            lora = small_lora if j.config.get("finetune") else []
            rec = run(sweeps.compose([*j.overrides, *lora, f"results_dir={tmp_path}"]))
            assert summary(rec) and (lora or rec["key"] == config_key(j.config))  # found where the tables look
    md = {}
    for build, experiment, recorded in ((table1.build, "table1", "12 of 13"), (ablation.build, "ablation", "5 of 5"),
                                        (aces_bounds.build, "aces_bounds", "12 of 12"), (cost.build, "cost", "2 of 4")):
        doc = build(sweeps.Context(tmp_path, overrides[experiment]))
        md[experiment] = doc.markdown()
        assert not doc.refused and f"Runs recorded: {recorded}." in md[experiment]
    assert row_cells(md["table1"], "0.2", "SVD-LLM†")[2:] == ["missing"] * 4
    assert row_cells(md["table1"], "0.2", "SAES-SVD")[2:4] != ["missing"] * 2
    assert has_cells(md["cost"], "| SVD-LLM† | missing |") and has_cells(md["cost"], "| SAES-SVD† | missing |")
    ctx = sweeps.Context(tmp_path, overrides["table1"])
    saes = next(j for j in ctx.jobs("table1") if j.row == "saes")
    assert len(saes.record["blocks"]) == 2 and all("cosine_fp" in b for b in saes.record["blocks"])
    assert saes.record["metrics"]["zeroshot"]["tasks"]["arc_easy"]["n"] == 4

    # the RER curve replays that SAES run up to block 1's k_proj: ACES's beta and the retained energy there
    # are the ones the run recorded
    path, out = run_curve(["experiment=table1", "method=saes", *overrides["table1"], f"results_dir={tmp_path}"],
                          layer=1, proj="self_attn.k_proj", points=11)
    layer = saes.record["layers"][out["layer"]]
    assert out["recorded_beta"] == pytest.approx(layer["beta"]) and out["aces"]["beta"] == pytest.approx(layer["beta"])
    assert out["aces"]["rer_at_beta"] == pytest.approx(layer["rer"], rel=1e-9)
    assert len(out["rer"]) == 11 and all(0 < r <= 1 for r in out["rer"])
    assert figures.curves_for(ctx, ctx.jobs("table1")) and path.is_file()


@pytest.mark.slow
def test_a_sweep_through_run_py_writes_the_records_the_tables_read(tmp_path, text_file):
    cmd = [sys.executable, "run.py", "experiment=ablation", *dry(text_file), f"results_dir={tmp_path}",
           f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "SAES_CACHE": str(tmp_path / "cache")}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    js = sweeps.jobs("ablation", dry(text_file), tmp_path)
    assert len(js) == 5 and all(j.record is not None for j in js)
    assert {j.row for j in js} == {"saes:beta=0.000", "saes:beta=0.250", "saes:beta=0.500", "saes:beta=0.750", "saes"}
