"""The W&B mirror of a job (saes.runs.tracking), offline: what a run holds is read back from its ``.wandb`` file with
W&B's own CLI (``wandb leet inspect``), as a researcher would see it after ``wandb sync``."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from saes.engine.config import BlockReport
from saes.runs import pipeline, tracking
from saes.runs.pipeline import run
from saes.runs.records import config_key

from .conftest import CONF, ROOT, make_cfg

OFFLINE = ["logger=wandb", "logger.mode=offline"]


@pytest.fixture
def offline_env(monkeypatch, tmp_path):
    """W&B's offline switches for this test only (the tracker sets them; monkeypatch puts the old ones back)."""
    for k, v in tracking.OFFLINE_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # artifact staging, not the home folder


def inspect(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The run's state, config and summary, and every record of its ``.wandb`` file (W&B's CLI, offline)."""
    def cli(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", *args, str(run_dir)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout

    return json.loads(cli("--summary", "--json")), [json.loads(line) for line in cli("--json").splitlines() if line]


def run_dirs(results: Path) -> list[Path]:
    return sorted((results / "wandb").glob("offline-run-*"))


def of_type(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r[kind] for r in records if r.get("type") == kind]


def test_a_job_s_run_holds_config_blocks_layers_summary_zeroshot_and_artifacts(tmp_path, offline_env):
    zs = ["eval=zeroshot", "eval.zeroshot.tasks=[arc_easy]", "eval.zeroshot.limit=2", "eval.zeroshot.offline=true"]
    rec = run(make_cfg("method=svd", "calib.track_fidelity=true", "save=true", *zs, *OFFLINE, results_dir=tmp_path))
    # the key hashes the config alone (logger is not part of it); the numbers as without W&B: the multirun test
    assert rec["key"] == config_key({**rec["config"], "logger": {"mode": "disabled"}})

    [run_dir] = run_dirs(tmp_path)
    assert rec["wandb"]["mode"] == "offline" and Path(rec["wandb"]["dir"]) == run_dir.resolve()
    state, records = inspect(run_dir)
    assert state["state"] == "finished" and state["exit_code"] == 0 and state["run_id"] == rec["wandb"]["id"]
    assert state["name"] == "tiny_llama-svd-0.2-0" and {"svd", "tiny_llama"} <= set(state["tags"])
    assert state["config"]["record_key"] == rec["key"] and state["config"]["method"]["name"] == "svd"
    assert state["config"]["git_commit"] == rec["env"]["git_commit"]
    [started] = of_type(records, "run")
    assert started["job_type"] == "compress" and not started.get("run_group")  # a single run: no sweep

    blocks = [h["item"] for h in of_type(records, "history") if "block" in h["item"]]
    assert [b["block"] for b in blocks] == [0, 1]  # one row per block, live
    for b, kept in zip(blocks, rec["blocks"]):
        assert b["block/cosine_fp"] == pytest.approx(kept["cosine_fp"])
        assert {"block/elapsed_s", "block/time/factorisation", "block/rank/q_proj",
                "block/peak_rss_mb"} <= set(b)

    summary = state["summary"]
    assert summary["layers"]["nrows"] == len(rec["layers"]) == 14  # the per-projection table
    for key, value in tracking.summary(rec).items():  # the summary is the record's numbers (W&B drops None)
        assert summary.get(key) == value, key
    assert "arc_easy/acc" in summary  # lm-eval's own logger, on this run

    artifacts = {a["name"]: a for a in of_type(records, "artifact")}
    assert f"record-{rec['key']}" in artifacts
    model = artifacts[f"model-{rec['key']}"]["manifest"]["contents"]
    assert model and all(e["ref"].startswith("file://" + rec["saved_to"]) for e in model)  # a reference, no copy


def test_a_failed_job_finishes_its_run_failed_keeping_the_blocks_it_logged(tmp_path, offline_env, monkeypatch):
    def broken(*_: Any) -> None:
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(pipeline, "evaluate", broken)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        run(make_cfg("method=svd", *OFFLINE, results_dir=tmp_path))
    assert not list((tmp_path / "runs").rglob("*.json"))
    [run_dir] = run_dirs(tmp_path)
    state, records = inspect(run_dir)
    assert state["exit_code"] != 0 and state["state"] != "finished"
    assert [h["item"]["block"] for h in of_type(records, "history") if "block" in h["item"]] == [0, 1]


class FakeRun:
    """What the tracker calls on a W&B run, recorded."""

    def __init__(self, **init: Any) -> None:
        self.init, self.logged, self.finished, self.metrics = init, [], [], []
        self.summary: dict[str, Any] = {}
        self.id, self.dir, self.project = "abc", "/tmp/wandb/run-abc/files", init.get("project")

    def define_metric(self, *args: Any, **kwargs: Any) -> None:
        self.metrics.append((args, kwargs))

    def log(self, row: dict[str, Any]) -> None:
        self.logged.append(row)

    def log_artifact(self, artifact: Any) -> None:
        self.logged.append({"artifact": artifact.name})

    def finish(self, exit_code: int) -> None:
        self.finished.append(exit_code)


def test_the_tracker_names_groups_and_tags_the_run_and_never_fails_the_job(caplog):
    job = pipeline.prepare(make_cfg("method=svd", "ratio=0.4", "seed=3"))
    fake: list[FakeRun] = []
    tracker = tracking.open_tracker({"mode": "offline", "tags": ["mine"]}, job,
                                    tracking.Context(group="table1", scale="cpu"),
                                    init=lambda **kw: fake.append(FakeRun(**kw)) or fake[-1])
    init = fake[0].init
    assert (init["name"], init["group"], init["job_type"]) == ("tiny_llama-svd-0.4-3", "table1", "compress")
    assert init["tags"] == ["svd", "tiny_llama", "scale:cpu", "mine"] and init["reinit"] == "finish_previous"
    assert init["config"]["record_key"] == job.key and (("block/*",), {"step_metric": "block"}) in fake[0].metrics
    assert tracking.open_tracker({"mode": "disabled"}, job, tracking.Context()).on_block is None
    assert tracking.run_name(job.config, loaded=True) == "tiny_llama-svd-0.4-loaded"

    layers = {"model.layers.0.mlp.down_proj": {"m": 8, "n": 4, "rank": 2, "beta": 0.5},
              "model.layers.0.mlp.up_proj": {"m": 4, "n": 8, "rank": None}}
    tracker.block(BlockReport(0, 2, "fresh", 1.5, {"calibration": 1.0}, None, layers))
    assert fake[0].logged[0]["block/rank/down_proj"] == 2 and fake[0].logged[0]["block/beta_mean"] == 0.5
    # lm-eval's logger attaches to wandb.run, which is not this fake run: a warning, and the run still finishes
    tracker.keep_zeroshot({"results": {}})
    with caplog.at_level(logging.WARNING):
        tracker.close(0)
    assert "lm-eval's W&B logger failed" in caplog.text and fake[0].finished == [0]


@pytest.mark.parametrize("overrides, group", [(["experiment=table1", "scale=cpu"], "table1"),
                                              (["hydra.mode=MULTIRUN", "hydra.sweep.dir=/sweeps/a"], "/sweeps/a"),
                                              ([], None)])
def test_the_group_is_the_experiment_else_the_multirun_folder(overrides, group):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        context = tracking.hydra_context()
    finally:
        HydraConfig.instance().cfg = None  # type: ignore[assignment]
    assert context.group == group and context.scale == ("cpu" if "scale=cpu" in overrides else None)


@pytest.mark.slow
def test_a_hydra_multirun_gives_one_run_per_job_in_one_group(tmp_path):
    sweep = tmp_path / "sweep"
    tiny = ["model=tiny_llama", "calib.nsamples=4", "calib.seqlen=64", "calib.batch_size=2", "eval.ppl.seqlen=128",
            "eval.ppl.max_windows=3"]  # make_cfg's
    out = subprocess.run([sys.executable, "run.py", "-m", *tiny, "method=svd", "ratio=0.2,0.4,0.6",
                          *OFFLINE, f"results_dir={tmp_path / 'results'}", f"hydra.sweep.dir={sweep}"],
                         cwd=ROOT, env={**tracking.OFFLINE_ENV, "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    dirs = run_dirs(tmp_path / "results")
    assert len(dirs) == 3
    states = [inspect(d) for d in dirs]
    assert len({s["run_id"] for s, _ in states}) == 3 and all(s["state"] == "finished" for s, _ in states)
    assert {of_type(r, "run")[0]["run_group"] for _, r in states} == {str(sweep)}
    assert sorted(s["config"]["ratio"] for s, _ in states) == [0.2, 0.4, 0.6]

    # the mirror changes neither a record's key nor its numbers: the same job without W&B
    plain = run(make_cfg("method=svd", "ratio=0.2", results_dir=tmp_path / "plain"))
    [mirrored] = [json.loads(p.read_text()) for p in (tmp_path / "results" / "runs").rglob("*.json")
                  if json.loads(p.read_text())["config"]["ratio"] == 0.2]
    assert mirrored["key"] == plain["key"] and "wandb" in mirrored and "wandb" not in plain
    for part in ("metrics", "params", "calibration", "layers"):
        assert _without_seconds(mirrored[part]) == _without_seconds(plain[part]), part


def _without_seconds(d: Any) -> Any:
    """A record part without wall-clock figures (the per-layer ``seconds``)."""
    if isinstance(d, dict):
        return {k: _without_seconds(v) for k, v in d.items() if k != "seconds"}
    return d
