"""The experiment layer: experiment and scale configs, table and figure builders, the RER curve.

Builders are tested on synthetic records written where ``run.py`` would write them (one run left
missing, one with other calibration tokens, one with another library version) and on the committed
records; the experiments themselves run as dry sweeps in :mod:`tests.test_experiment_runs`.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from experiments import ablation, aces_bounds, cost, figures, paper, records, sweeps, table1, tables
from saes.core.method import Method
from saes.runs.job import build_method
from saes.runs.records import config_key

from .conftest import CONF, ROOT

EXPERIMENTS = {"table1": 28, "table1_lora": 4, "table1_dip": 4, "table1_strs": 4, "table1_dobi": 2, "table1_dobi_grid": 4,
               "ablation": 20, "aces_bounds": 12, "cost": 4}
TINY = ["model=tiny_llama", "logger=none"]
TASKS = ["arc_easy", "piqa", "mathqa"]


# ----------------------------------------------------------------------------------------- synthetic records
def synthetic_record(config: dict[str, Any], ppl: float, acc: dict[str, float] | None = None, *,
                     dense_ppl: float = 10.0, dense_acc: dict[str, float] | None = None,
                     calib_sha: str = "c" * 64, eval_sha: str = "e" * 64, torch_version: str = "2.13.0+cpu",
                     betas: dict[str, float] | None = None, cosines: list[float] | None = None,
                     timings: dict[str, float] | None = None, cached_blocks: int = 0) -> dict[str, Any]:
    """A minimal record with the fields the pipeline writes and the builders read."""
    src = config["eval"]["ppl"]["sources"][0]
    metrics: dict[str, Any] = {"ppl": {src: {"dense": dense_ppl, "tokens_sha256": eval_sha, "windows": 3,
                                             "compressed": ppl, "compressed_nll": math.log(ppl), "tokens": 381}},
                               "ppl_skipped": {}}
    if acc is not None:
        dense_acc = dense_acc or {t: 0.5 for t in acc}
        metrics["zeroshot"] = {
            "lm_eval_version": "0.4.13", "data": "local", "limit": 4, "num_fewshot": 0, "average_metric": "acc",
            "average_metrics": {t: "acc" for t in acc}, "missing": {"mathqa": "no offline copy"},
            "tasks": {t: {"dense": {"acc": dense_acc[t]}, "compressed": {"acc": a}, "n": 4, "n_total": 100,
                          "split": "test", "data": "local:x"} for t, a in acc.items()}}
    layers = {f"model.layers.{i}.self_attn.k_proj": {"m": 32, "n": 64, "rank": 8, "beta": b}
              for i, b in enumerate((betas or {}).values())}
    return {
        "schema": 1, "key": config_key(config), "created": "2026-01-01T00:00:00+0000", "config": config,
        "model": {"identity": "tiny:seed0", "model_type": "llama"},
        "calibration": {"source": config["calib"]["source"], "nsamples": config["calib"]["nsamples"],
                        "seqlen": config["calib"]["seqlen"], "seed": 0, "stream": "compressed", "tokens": 256,
                        "stats_cached_blocks": cached_blocks, "resumed_from_block": 0, "tokens_sha256": calib_sha},
        "metrics": metrics,
        "params": {"linears_dense": 100, "linears_compressed": 80, "linears_ratio": 0.2, "model_dense": 200,
                   "model_compressed": 180, "model_ratio": 0.1,
                   "rank_alloc": "mixed" if config["method"].get("rank_alloc") in ("strs", "adacr") else "uniform"},
        "timings": timings or {"load": 1.0, "data": 1.0, "eval_dense": 1.0, "prepare": 0.0, "calibration": 2.0,
                               "factorisation": 3.0, "eval_compressed": 1.0, "total": 9.0},
        "memory": {"peak_rss_mb": 1000.0}, "finetune": {"steps": 1} if config.get("finetune") else None,
        "layers": layers, "blocks": [{"index": i, "cosine_fp": c} for i, c in enumerate(cosines or [0.99, 0.98])],
        "saved_to": None,
        "env": {"versions": {"torch": torch_version, "transformers": "5.23.0", "lm-eval": "0.4.13"},
                "git_commit": "0" * 40, "git_dirty": False, "python": "3.11", "platform": "linux",
                "torch_threads": 1, "cuda": None},
    }


def write(job: sweeps.Job, rec: dict[str, Any]) -> None:
    job.path.parent.mkdir(parents=True, exist_ok=True)
    job.path.write_text(json.dumps(rec))


PPL = {"svd": 1e6, "fwsvd": 5e4, "asvd": 300.0, "asvd_strs": 200.0, "svdllm": 40.0, "svdllm_update": 35.0,
       "adasvd": 30.0, "dipsvd": 38.0, "saes": 20.0, "dobisvd": 25.0}


def fill_table1(results: Path, skip: tuple[str, float] | None = ("adasvd", 0.4), **kw: Any) -> list[sweeps.Job]:
    """Synthetic records for every job of Table 1's sweeps except ``skip``; PPL grows with the ratio."""
    js = [j for e in table1.EXPERIMENTS for j in sweeps.jobs(e, TINY, results)]
    for j in js:
        if skip and (j.row, j.ratio) == skip:
            continue
        base = PPL[j.config["method"]["name"]] * (0.5 if j.config.get("finetune") else 1.0)
        write(j, synthetic_record(j.config, base * (1 + j.ratio), {"arc_easy": 0.4, "piqa": 0.6},
                                  betas={"0": 0.25, "1": 0.75}, **kw))
    return [j for e in table1.EXPERIMENTS for j in sweeps.jobs(e, TINY, results)]


def has_cells(md: str, line: str) -> bool:
    """Whether ``line`` ("| a | b |") is a run of consecutive cells of some table row (padding ignored)."""
    want = [c.strip() for c in line.strip().strip("|").split("|")]
    for row in (r for t in table_cells(md)[0] for r in t):
        if any(row[i:i + len(want)] == want for i in range(len(row) - len(want) + 1)):
            return True
    return False


def row_cells(md: str, ratio: str, method: str) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 2 and cells[0] == ratio and cells[1] == method:
            return cells
    raise AssertionError(f"no row {ratio} / {method}")


# -------------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("experiment,n_jobs", EXPERIMENTS.items())
def test_every_experiment_composes_and_its_sweep_expands(experiment, n_jobs):
    cfg = sweeps.compose([f"experiment={experiment}"], hydra=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.callbacks.peak_memory._target_ == "experiments.callbacks.ResetPeakMemory"
    overrides, scale = sweeps.sweep_overrides(experiment)
    assert scale == "cpu" and len(overrides) == n_jobs
    configs = [sweeps.compose(o) for o in overrides]
    assert len({config_key(sweeps.to_dict(c)) for c in configs}) == n_jobs  # every job is a distinct run
    for c in configs:
        assert isinstance(build_method(c), Method)
        assert (c.calib.nsamples, c.calib.seqlen, c.eval.ppl.max_windows, c.eval.zeroshot.limit) == (32, 512, 16, 100)
        if experiment == "cost":
            assert not c.calib.reuse_stats and not c.resume and not c.calib.track_fidelity and c.ratio == 0.2
            assert not c.eval.zeroshot.get("tasks")
        else:
            assert c.calib.track_fidelity and "piqa" in c.eval.zeroshot.tasks


def test_a_run_shared_by_experiments_has_one_key_and_variants_match_their_override_forms():
    key = lambda *o: config_key(sweeps.to_dict(sweeps.compose(o)))  # noqa: E731
    saes = key("experiment=table1", "method=saes", "ratio=0.2")
    assert saes == key("experiment=ablation", "+experiment/variant=aces", "ratio=0.2")
    assert saes == key("experiment=aces_bounds", "+experiment/bounds=b025_075", "method.aces.space=beta")
    assert key("experiment=aces_bounds", "+experiment/bounds=b0_1", "method.aces.space=alpha") != saes
    for variant, alpha in (("beta0", "0.0"), ("cealc", "1.0"), ("beta075", "3.0")):
        assert key("experiment=ablation", f"+experiment/variant={variant}", "ratio=0.4") == key(
            "experiment=ablation", "method.aces.enabled=false", f"method.alpha={alpha}", "ratio=0.4")
    assert key("experiment=table1_lora", "method=svdllm", "ratio=0.6") == key(
        "experiment=table1", "method=svdllm", "finetune=lora", "ratio=0.6")


def test_scale_presets_leave_the_default_config_alone_and_paper_is_the_papers_protocol():
    default = sweeps.to_dict(sweeps.compose([]))
    assert "scale" not in default and "experiment" not in default
    with_cpu = sweeps.to_dict(sweeps.compose(["scale=cpu"]))
    assert with_cpu["calib"] == default["calib"] and with_cpu["eval"]["ppl"] == default["eval"]["ppl"]
    assert config_key(sweeps.to_dict(sweeps.compose(["scale=paper", "eval=zeroshot"]))) == \
        config_key(sweeps.to_dict(sweeps.compose(["calib=wikitext2", "eval=paper"])))
    paper = sweeps.compose(["experiment=table1", "scale=paper", "model=llama7b"])  # the command line wins
    assert (paper.calib.nsamples, paper.calib.seqlen, paper.eval.zeroshot.limit) == (128, 2048, None)
    assert list(paper.eval.ppl.sources) == ["wikitext2", "ptb", "c4"]
    assert sorted(p.stem for p in (CONF / "scale").glob("*.yaml")) == ["cpu", "paper", "tiny"]


def test_peak_memory_is_reset_between_jobs_of_a_sweep():
    import resource

    from experiments.callbacks import ResetPeakMemory

    block = b"\x01" * (300 * 2**20)  # 300 MB written, then freed
    del block
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ResetPeakMemory().on_job_start(config=None)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert after < before - 200 * 1024  # KiB: the earlier peak no longer counts


# -------------------------------------------------------------------------------------------------- builders
def test_table1_shows_every_recorded_number_and_a_missing_run_as_missing(tmp_path):
    js = fill_table1(tmp_path)
    doc = table1.build(sweeps.Context(tmp_path, TINY))
    assert not doc.refused
    md = doc.markdown()
    assert row_cells(md, "0.4", "AdaSVD*")[2:] == ["missing"] * 5
    assert "Runs recorded: 45 of 46. Missing: table1: method=adasvd ratio=0.4." in md  # which sweep makes it
    assert row_cells(md, "0.2", "Dobi-SVD*")[2] == "30.00" and row_cells(md, "0.4", "SAES-SVD + Dobi-SVD ranks*")
    assert "Dobi-SVD*: ranks learned on 32 windows x 640 tokens, 8 epochs, accumulation 4" in md
    assert "not reimplemented" not in md
    saes = row_cells(md, "0.2", "SAES-SVD")
    assert saes[2:] == ["24.00", "0.400", "0.600", "0.500", "0.0%"]
    assert row_cells(md, "0.0", "dense")[2] == "10.00"
    assert row_cells(md, "0.2", "SVD-LLM†")[2] == "24.00"  # fine-tuned: its own row, with a dagger
    assert row_cells(md, "0.8", "ASVD (STRS)*")[2] == "360.00"
    # beside the paper: gap closed = (48 - 24) / (48 - 10) for SVD-LLM without LoRA (Table 6's SVD-LLM)
    assert f"{100 * (48 - 24) / (48 - 10):.1f}%" in md
    assert "Beside Table 1 (LLaMA-7B" in md and "Beside Table 6 (LLaMA-3-8B" in md
    assert "7.17" in md  # the paper's SAES-SVD at 0.2, from results/reference
    assert "ratio 0.2: ours Ours < SVD-LLM; paper Ours < SVD-LLM (same order)" in md
    assert all(j.record is not None for j in js if (j.row, j.ratio) != ("adasvd", 0.4))
    assert "ASVD (STRS)* missing" not in md  # the reason is given only where its cells are missing
    # the sensitivity set its records used, read from them (table1_strs: 2 of the cpu preset's 512-token sequences)
    assert "measured on 2 x 512 calibration tokens (`method.strs`; `conf/experiment/table1_strs.yaml`" in md
    fill_table1(tmp_path / "no_strs", skip=("asvd_strs", 0.6))
    assert "ASVD (STRS)* missing: not run" in table1.build(sweeps.Context(tmp_path / "no_strs", TINY)).markdown()
    tex = doc.latex()
    assert "\\begin{tabular}" in tex and "SVD-LLM$^\\dagger$" in tex and "\\%" in tex


def test_other_calibration_tokens_refuse_the_table_or_are_named_with_allow_mixed(tmp_path):
    js = fill_table1(tmp_path)
    odd = next(j for j in js if j.row == "svdllm" and j.ratio == 0.6)
    rec = copy.deepcopy(odd.record)
    rec["calibration"]["tokens_sha256"] = "d" * 64
    write(odd, rec)
    doc = table1.build(sweeps.Context(tmp_path, TINY))
    assert doc.refused and "calibration differs" in doc.markdown() and "24.00" not in doc.markdown()
    assert tables.main([*TINY, "--results-dir", str(tmp_path), "--no-figures"]) == 1
    mixed = table1.build(sweeps.Context(tmp_path, TINY, allow_mixed=True)).markdown()
    assert "WARNING (mixed protocol): calibration differs" in mixed and rec["key"] in mixed and "24.00" in mixed


def test_a_different_library_version_is_named_but_not_refused(tmp_path):
    js = fill_table1(tmp_path)
    odd = next(j for j in js if j.row == "saes" and j.ratio == 0.8)
    write(odd, synthetic_record(odd.config, 99.0, {"arc_easy": 0.4, "piqa": 0.6}, torch_version="2.99.0"))
    doc = table1.build(sweeps.Context(tmp_path, TINY))
    assert not doc.refused
    assert "Note: torch differs: 2.13.0+cpu" in doc.markdown() and "2.99.0" in doc.markdown()


def test_protocol_check_passes_data_free_runs_and_refuses_other_eval_windows():
    cfg = sweeps.to_dict(sweeps.compose(TINY))
    a, b = synthetic_record(cfg, 20.0), synthetic_record(cfg, 30.0, calib_sha=None)  # b: a data-free method
    shared, warnings = records.check_protocol([a, b])
    assert not warnings and "calibration" in shared
    b["metrics"]["ppl"]["wiki_books"]["windows"] = 16
    with pytest.raises(records.ProtocolMismatch, match="perplexity wiki_books differs"):
        records.check_protocol([a, b])


def test_ablation_bounds_and_cost_tables_from_synthetic_records(tmp_path):
    for j in sweeps.jobs("ablation", TINY, tmp_path):
        m = j.config["method"]
        ppl = 20.0 if m["aces"]["enabled"] else 40.0 - 20 * sweeps.beta_of(m["alpha"])
        write(j, synthetic_record(j.config, ppl, {"arc_easy": 0.4, "piqa": 0.6, "hellaswag": 0.3, "winogrande": 0.5}))
    md = ablation.build(sweeps.Context(tmp_path, TINY)).markdown()
    assert row_cells(md, "0.2", "β = 0 (neither CEALC nor ACES)")[4] == "40.00"
    assert row_cells(md, "0.2", "CEALC, fixed β = 0.50")[4:] == ["30.00", "0.450", "0.450", "25.0%"]
    assert row_cells(md, "0.6", "SAES-SVD")[-1] == "50.0%"
    assert has_cells(md, "| LLaMA2-7B | 0.2 | yes | yes | 7.37 | 63.03 |")  # Table 3 beside ours

    bounds = sweeps.jobs("aces_bounds", TINY, tmp_path)
    for j in bounds:
        lo, hi = j.config["method"]["aces"]["beta_min"], j.config["method"]["aces"]["beta_max"]
        if j.config["method"]["aces"]["space"] == "alpha":
            lo, hi = sweeps.beta_of(lo), sweeps.beta_of(hi)
        write(j, synthetic_record(j.config, 20.0, {"piqa": 0.6}, betas={"0": lo, "1": (lo + hi) / 2, "2": hi}))
    md = aces_bounds.build(sweeps.Context(tmp_path, TINY)).markdown()
    assert has_cells(md, "| (0, 1) | alpha | [0.000, 0.500] | 20.00 |") and has_cells(md, "| 2 of 3 | 8.96 | 58.47 |")

    for j in sweeps.jobs("cost", TINY, tmp_path):
        t = {"load": 1.0, "prepare": 0.0, "calibration": 10.0, "factorisation": 5.0, "total": 30.0}
        if j.config.get("finetune"):
            t["finetune"] = 100.0
        write(j, synthetic_record(j.config, 20.0, timings=t, cached_blocks=2 if j.row == "saes" else 0))
    md = cost.build(sweeps.Context(tmp_path, TINY)).markdown()
    assert has_cells(md, "| SVD-LLM† | 10.0 | 0.0 | 5.0 | 100.0 | 115.0 | 30.0 | 1000 | yes |")
    assert has_cells(md, "| SAES-SVD | 10.0 | 0.0 | 5.0 | 0 | 15.0 | 30.0 | 1000 | no (cached statistics or resumed blocks) |")
    assert f"{15 / 115:.2f} x SVD-LLM†'s" in md and "the paper: 0.12 x" in md


def test_figures_leave_out_what_is_missing_and_are_written(tmp_path):
    js = fill_table1(tmp_path, skip=("saes", 0.6))
    xs, ys, lost = figures.series(js, "saes", lambda r: records.ppl_of(r, "wiki_books"))
    assert xs == [0.2, 0.4, 0.8] and lost == [0.6] and ys == [24.0, 28.0, 36.0]
    _, written = tables.build_all(tmp_path, TINY)
    pngs = {p.name for p in written if p.suffix == ".png"}
    assert pngs == {"fig1a_cosine.png", "fig1b_ppl_vs_ratio.png", "fig1c_rer_vs_beta.png",
                    "fig1d_fixed_vs_adaptive.png", "fig4_speed_memory.png", "fig6_aces_beta.png",
                    "aces_surrogate_error.png"}
    for p in written:
        assert p.parent.name == "tiny_llama-cpu" and p.stat().st_size > 0  # not the committed SmolLM2 folder
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_missing_panel_keeps_the_shared_axis_ticks_of_the_drawn_one():
    import matplotlib.pyplot as plt

    fig, (drawn, empty) = plt.subplots(1, 2, sharey=True)
    drawn.plot([0, 1, 2], [0.2, 0.5, 0.9])
    figures._missing(empty, "nothing")
    fig.canvas.draw()
    labels = [t.get_text() for t in drawn.get_yticklabels() if t.get_visible()]
    assert len(drawn.get_yticks()) > 1 and any(labels)  # the drawn panel's values stay readable
    assert not any(t.get_visible() and t.get_text() for t in empty.get_yticklabels())
    plt.close(fig)


def test_reference_tables_are_the_papers_numbers():
    t1 = paper.reference("table1_llama7b.csv")
    assert paper.ref_value(t1, "Ours", "ppl_wikitext2", "0.2") == "7.17"
    assert paper.ref_value(t1, "Ours", "ppl_wikitext2", "0.4") == "10.42"
    assert paper.ref_value(t1, "SVD-LLM", "drop", "0.6") == "39.9"
    assert paper.ref_value(t1, "Baseline", "acc_average", "0.0") == "0.52"
    assert paper.ref_value(paper.reference("table4_aces_bounds.csv"), "Ours", "acc_average4", setting="0.25-0.75") == "63.03"
    assert paper.ref_value(paper.reference("table11_cost.csv"), "Ours", "hours_total") == "0.5"
    assert paper.ref_value(paper.reference("table6_llama3_8b.csv"), "SVD-LLM", "ppl_wikitext2", "0.8") == "6971.65"
    for f in (ROOT / "results" / "reference").glob("*.csv"):
        rows = paper.reference(f.name)
        ours = f.name.startswith("table")  # the SAES-SVD paper's tables; other files cite other papers by name
        assert rows and all(r["source"] and (r["source"].startswith("Table ") or not ours) and r["model"] and r["unit"]
                            for r in rows)
        assert all(paper.as_float(r["value"]) is not None for r in rows)


# ------------------------------------------------------------------------ comparison sweeps and committed tables
def table_cells(md: str) -> tuple[list[list[list[str]]], list[str]]:
    """A markdown document as its tables (rows of stripped cells; alignment rows dropped) and its other lines
    (verbatim, a table standing as one ``<table>`` line): what must not change when only the padding does."""
    tables_, other, current = [], [], None
    for line in md.splitlines():
        if not line.startswith("|"):
            current = None
            other.append(line)
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
        if all(re.fullmatch(r":?-+:?", c) for c in cells):
            continue
        if current is None:
            current = []
            tables_.append(current)
            other.append("<table>")
        current.append(cells)
    return tables_, other


COMMITTED_RECORDS = ROOT / "results"


@pytest.mark.parametrize("experiment,n_jobs", {"compare_baselines": 42, "foundation": 8, "foundation_damp": 6,
                                               "table1": 28, "table1_lora": 4, "table1_dip": 4, "table1_strs": 4,
                                               "half_precision": 18}.items())
def test_comparison_sweeps_find_the_committed_records(experiment, n_jobs):
    """The sweeps that replaced compare_baselines.py and bench_foundation.py, and Table 1's, give the keys of the
    records they made (nothing to rerun; a config change that moves a committed record's key fails here), and each
    job's method builds."""
    js = sweeps.jobs(experiment, [], COMMITTED_RECORDS)
    assert len(js) == n_jobs and len({config_key(j.config) for j in js}) == n_jobs
    for j in js:
        assert j.record is not None and j.record["key"] == config_key(j.config), j.overrides
    assert isinstance(build_method(sweeps.compose(js[0].overrides)), Method)


def test_comparison_tables_rebuild_the_committed_ones_cell_for_cell():
    from experiments import bench_foundation, compare_baselines, half_precision, speed

    ctx = sweeps.Context(COMMITTED_RECORDS, [])
    docs = [compare_baselines.build(ctx), *bench_foundation.build(ctx), *speed.build(ctx), half_precision.build(ctx)]
    assert [d.name for d in docs] == ["compare_baselines", "bench_foundation", "bench_foundation_damp0.001",
                                      "bench_foundation_damp0.0001", "bench_speed", "half_precision"]
    for d in docs:
        committed = (ROOT / "results" / "tables" / f"{d.name}.md").read_text()
        assert table_cells(d.markdown()) == table_cells(committed), d.name


def test_display_names_come_from_the_method_configs_and_leave_record_keys_alone():
    cfg = sweeps.to_dict(sweeps.compose(["method=asvd_strs"]))
    assert cfg["display"] == "ASVD (STRS)" and "display" not in cfg["method"]
    without = {k: v for k, v in cfg.items() if k != "display"}
    assert config_key(cfg) == config_key(without)
    for p in sorted((CONF / "method").glob("*.yaml")):
        assert sweeps.to_dict(sweeps.compose([f"method={p.stem}"])).get("display"), p.name


def test_load_records_flattens_each_record_into_one_row(tmp_path):
    fill_table1(tmp_path, skip=("saes", 0.6))
    df = records.load_records(tmp_path, model="tiny_llama")
    assert len(df) == 45 and df["key"].is_unique
    assert {"config.method.name", "config.ratio", "metrics.ppl.wiki_books.compressed", "params.linears_ratio",
            "timings.total"} <= set(df.columns)
    saes = df[(df["config.method.name"] == "saes") & (df["config.ratio"] == 0.2)
              & (df["config.method.rank_alloc"] != "dobi")]  # table1_dobi_grid's SAES-SVD at Dobi-SVD's ranks aside
    assert saes["metrics.ppl.wiki_books.compressed"].tolist() == [24.0]
    assert len(records.load_records(tmp_path, method="svdllm")) == 10 and records.load_records(tmp_path / "none").empty


# -------------------------------------------------------------------------------------------- Tables 8 and 10
def test_table8_rows_name_the_allocator_and_the_gap_closed_against_svdllm(tmp_path):
    from experiments import table8

    js = sweeps.jobs("table8", TINY, tmp_path)
    assert len(js) == 16 and {j.row for j in js} == {"asvd_strs", "saes", "saes+strs", "saes+adacr",
                                                     "saes+adacr:one_minus_cos", "svdllm", "svdllm+strs",
                                                     "svdllm+adacr"}
    ppl = {"asvd_strs": 500.0, "saes": 60.0, "saes+strs": 50.0, "saes+adacr": 55.0, "saes+adacr:one_minus_cos": 52.0,
           "svdllm": 100.0, "svdllm+strs": 90.0, "svdllm+adacr": 95.0}
    for j in js:
        if (j.row, j.ratio) != ("svdllm+adacr", 0.4):
            write(j, synthetic_record(j.config, ppl[j.row] * (1 + j.ratio), dense_ppl=20.0))
    md = table8.build(sweeps.Context(tmp_path, TINY)).markdown()
    # gap closed at 0.2: (120 - 60) / (120 - 20) for SAES + STRS
    assert row_cells(md, "0.2", "SAES-SVD + STRS*")[3:5] == ["60.00", "60.0%"]
    assert row_cells(md, "0.2", "SAES-SVD")[6] == "7.17"  # the paper's Table 8 beside ours
    assert row_cells(md, "0.4", "SVD-LLM + adaCR*")[3] == "missing"
    assert row_cells(md, "0.2", "SAES-SVD + adaCR (1 - cos)*")[3] == "62.40"


def test_table10_compares_at_the_bits_stored_per_dense_linear_weight(tmp_path):
    from experiments import table10

    js = sweeps.jobs("table10", TINY, tmp_path)
    assert len(js) == 7 and {j.ratio for j in js} == {0.0, 0.25, 0.5}
    for j in js[:-1]:
        rec = synthetic_record(j.config, 10.0 + j.config["quant"]["bits"] + j.ratio)
        bits = (1 - j.ratio) * (j.config["quant"]["bits"] + 20 / 128)
        rec["quant"] = {"bits": j.config["quant"]["bits"], "bits_per_dense_linear_weight": bits, "model_megabytes": bits}
        write(j, rec)
    md = table10.build(sweeps.Context(tmp_path, TINY)).markdown()
    lines = [line for line in md.splitlines() if line.startswith("| GPTQ") or " + GPTQ" in line]
    bits = [float(line.split("|")[2]) for line in lines if "missing" not in line]
    assert bits == sorted(bits, reverse=True) and len(bits) == 6  # most bits first
    assert has_cells(md, "| GPTQ (3-bit) | 3.16 |") and has_cells(md, "| SVD-LLM @0.5 + GPTQ (4-bit) | missing |")
    assert has_cells(md, "| LLaMA2-7B | SAES+GPTQ (equal 3bit) | 7.64 | 0.44 |")


@pytest.mark.parametrize("overrides, expected", [
    (["method=asvd"], "ASVD"), (["method=asvd_strs"], "ASVD (STRS)*"), (["method=adasvd"], "AdaSVD*"),
    (["method=adasvd", "method.rank_alloc=uniform"], "AdaSVD + uniform ranks"),
    (["method=saes", "method.rank_alloc=adacr"], "SAES-SVD + adaCR*"),
    (["method=saes", "method.rank_alloc=adacr", "method.importance=one_minus_cos"], "SAES-SVD + adaCR (1 - cos)*"),
])
def test_labels_name_a_shared_allocator_only_beyond_the_methods_own_default(overrides, expected):
    cfg = sweeps.to_dict(sweeps.compose(overrides))
    assert sweeps.label(sweeps.Job("x", overrides, cfg, None, Path("nowhere.json"), None)) == expected


def test_rank_profile_sums_kept_parameters_per_projection_type_and_depth_band():
    from experiments.table1 import rank_profile

    # 4 blocks, 2 bands; q_proj 8x8 keeps rank 2 (32 of 64) in blocks 0-1 and rank 1 (16 of 64) in blocks 2-3;
    # down_proj 8x4 keeps rank 2 (24 of 32) in block 0 only and rank 1 (12 of 32) elsewhere
    layers = {}
    for b in range(4):
        layers[f"model.layers.{b}.self_attn.q_proj"] = {"m": 8, "n": 8, "rank": 2 if b < 2 else 1}
        layers[f"model.layers.{b}.mlp.down_proj"] = {"m": 8, "n": 4, "rank": 2 if b == 0 else 1}
    t = rank_profile({"layers": layers}, "x", bands=2)
    assert t.header == ["projection", "blocks 0-1", "blocks 2-3", "all"]
    assert t.rows == [["q_proj", "0.500", "0.250", "0.375"], ["down_proj", "0.562", "0.375", "0.469"]]
    assert "overall 0.406" in t.caption  # (64 + 32 + 36 + 24) / 384


# ------------------------------------------------------------------------------------------- half precision
def test_half_precision_table_puts_each_dtype_beside_float32_and_refuses_other_tokens(tmp_path):
    from experiments import half_precision

    js = sweeps.jobs("half_precision", TINY, tmp_path)
    assert len(js) == 18 and {j.config["model"]["dtype"] for j in js} == {"float32", "bfloat16", "float16"}
    factor = {"float32": 1.0, "bfloat16": 1.01, "float16": 0.998}
    for j in js:
        if (j.config["method"]["name"], j.config["model"]["dtype"]) != ("asvd", "float16"):  # e.g. a FactorOverflow
            d = j.config["model"]["dtype"]
            write(j, synthetic_record(j.config, 50.0 * factor[d], dense_ppl=10.0 * factor[d]))
    doc = half_precision.build(sweeps.Context(tmp_path, TINY))
    md = doc.markdown()
    assert not doc.refused and "model dtype" not in md  # the table's own variable is neither refused nor listed
    assert has_cells(md, "| dense | 10.000 | 10.100 | +1.00% | 9.980 | -0.20% |")
    assert has_cells(md, "| SAES-SVD | 50.00 | 50.50 | +1.00% | 49.90 | -0.20% |")
    assert has_cells(md, "| ASVD | 50.00 | 50.50 | +1.00% | missing | n/a |")
    assert "bfloat16: compressed PPL within 1.00% of float32 over 6 methods" in md
    assert "float16: compressed PPL within 0.20% of float32 over 5 methods" in md
    odd = next(j for j in js if j.config["model"]["dtype"] == "bfloat16")
    write(odd, synthetic_record(odd.config, 50.0, calib_sha="d" * 64))
    assert half_precision.build(sweeps.Context(tmp_path, TINY)).refused
