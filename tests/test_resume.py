"""A compression interrupted after block k restarts from block k and ends where an uninterrupted run ends."""

import json
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from saes.engine.config import EngineConfig
from saes.engine.layout import layout_for, plan_ranks
from saes.engine.loop import compress_model
from saes.engine.resume import OWNER, PROGRESS, ResumeError, claim, release
from saes.inputs.models import tiny_llama
from saes.saes import SAES

from .conftest import calib_batch, make_cfg

CPU = torch.device("cpu")


class Crash(RuntimeError):
    pass


class CountingSAES(SAES):
    """SAES that counts its factorisations and can crash at the first layer of a given block."""

    def __init__(self, crash_at_block: int | None = None):
        super().__init__()
        self.crash_at, self.calls = crash_at_block, []

    def factorize(self, W, stats, rank, layer=""):
        if self.crash_at is not None and layer.startswith(f"model.layers.{self.crash_at}."):
            raise Crash(layer)
        self.calls.append(layer)
        return super().factorize(W, stats, rank, layer)


def strip(layers):
    """Per-layer diagnostics without the wall-clock seconds."""
    return {k: {d: v for d, v in diag.items() if d != "seconds"} for k, diag in layers.items()}


def four_blocks():
    return tiny_llama(num_hidden_layers=4).eval()


def run_engine(model, method, resume_dir, key="k", track_fidelity=True):
    ranks = plan_ranks(model, layout_for(model), 0.4)
    cfg = EngineConfig(device=CPU, batch_size=2, resume_dir=resume_dir, resume_key=key, track_fidelity=track_fidelity)
    return compress_model(model, method, ranks, calib_batch(), cfg)


def test_a_crash_after_block_k_resumes_at_k_with_the_same_factors(tmp_path):
    reference = four_blocks()
    ref_report = run_engine(reference, CountingSAES(), None)

    crashed = four_blocks()
    with pytest.raises(Crash, match="layers.2.self_attn.q_proj"):
        run_engine(crashed, CountingSAES(crash_at_block=2), tmp_path / "ckpt")
    # the finished blocks stay for the rerun; the crashed run's claim does not
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["block_0.safetensors", "block_1.safetensors",
                                                                      PROGRESS]

    resumed, method = four_blocks(), CountingSAES()
    report = run_engine(resumed, method, tmp_path / "ckpt")
    assert report.resumed_from == 2
    assert {c.split(".")[2] for c in method.calls} == {"2", "3"}  # blocks 0 and 1 were restored, not recompressed
    assert resumed.state_dict().keys() == reference.state_dict().keys()
    for name, t in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], t), name
    ids = calib_batch(n=2, seqlen=40, seed=7)
    with torch.no_grad():
        assert torch.equal(resumed(ids).logits, reference(ids).logits)
    assert strip(report.layers) == strip(ref_report.layers)
    assert report.blocks == ref_report.blocks  # the streams were rebuilt exactly: same per-block fidelity


def test_checkpoints_of_another_config_are_refused(tmp_path):
    with pytest.raises(Crash):
        run_engine(four_blocks(), CountingSAES(crash_at_block=1), tmp_path / "ckpt", key="config-a")
    with pytest.raises(ResumeError, match=r"another config.*'key': \('config-a', 'config-b'\)"):
        run_engine(four_blocks(), CountingSAES(), tmp_path / "ckpt", key="config-b")
    model = four_blocks()
    ranks = plan_ranks(model, layout_for(model), 0.2)  # same key, another rank plan
    with pytest.raises(ResumeError, match="ranks_sha256"):
        compress_model(model, CountingSAES(), ranks, calib_batch(),
                       EngineConfig(device=CPU, resume_dir=tmp_path / "ckpt", resume_key="config-a"))
    (tmp_path / "ckpt" / PROGRESS).write_text("{truncated")
    with pytest.raises(ResumeError, match="damaged"):
        run_engine(four_blocks(), CountingSAES(), tmp_path / "ckpt", key="config-a")


def hold_claim(folder: Path) -> subprocess.Popen:
    """Another process that claims ``folder`` and keeps it until killed (returns once it holds the claim)."""
    code = (f"import sys, time; from saes.engine.resume import claim; claim({str(folder)!r}); "
            "print('claimed', flush=True); time.sleep(120)")
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert other.stdout is not None and other.stdout.readline().strip() == "claimed"
    return other


def test_a_folder_a_live_process_is_writing_is_refused_and_a_dead_owner_is_taken_over(tmp_path):
    with pytest.raises(Crash):  # a crashed run leaves its checkpoints and gives up its claim
        run_engine(four_blocks(), CountingSAES(crash_at_block=2), tmp_path / "ckpt", key="config-a")
    folder = tmp_path / "ckpt"
    assert json.loads((folder / PROGRESS).read_text())["key"] == "config-a"
    other = hold_claim(folder)
    try:  # another live process is compressing the same config: refused before any work
        with pytest.raises(ResumeError, match=f"process {other.pid} on .*same config"):
            run_engine(four_blocks(), CountingSAES(), folder, key="config-a")
        assert (folder / "block_0.safetensors").is_file()  # its checkpoints are left alone
    finally:
        other.kill()
        other.wait()
    # the owner was killed (no clean exit): its claim died with it; the folder is taken over and the run resumes
    method = CountingSAES()
    run_engine(four_blocks(), method, folder, key="config-a")
    assert method.calls and all(c.startswith(("model.layers.2.", "model.layers.3.")) for c in method.calls)


def test_a_stale_owner_file_naming_a_live_pid_does_not_block_a_run(tmp_path):
    """Ownership is the lock, not the text: a leftover owner.json naming any live PID (a recycled one) is free."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid()}))
    claim(folder)
    release(folder)
    assert not folder.exists()  # nothing was checkpointed: the released folder is removed


def _claim_at_once(folder: str, barrier: Any, won: Any) -> None:
    barrier.wait()
    try:
        claim(Path(folder))
        won.put(os.getpid())
    except ResumeError:
        pass
    barrier.wait()  # hold the claim until both have tried


def test_two_processes_claiming_at_the_same_instant_never_both_win(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for trial in range(30):
        barrier, won = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_claim_at_once, args=(str(tmp_path / f"f{trial}"), barrier, won))
                 for _ in range(2)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(30)
            assert proc.exitcode == 0
        winners = []
        while not won.empty():
            winners.append(won.get())
        assert len(winners) == 1, f"trial {trial}: {len(winners)} processes own one folder"


def test_a_pipeline_run_of_a_config_a_live_process_is_compressing_stops_before_loading_the_model(tmp_path,
                                                                                                  monkeypatch):
    from omegaconf import OmegaConf

    from saes.runs import pipeline
    from saes.runs.records import config_key

    cfg = make_cfg("method=saes", results_dir=tmp_path)
    folder = pipeline.resume_dir(cfg, config_key(OmegaConf.to_container(cfg, resolve=True)))
    monkeypatch.setattr(pipeline, "load_model", lambda *_: pytest.fail("the model was loaded"))
    other = hold_claim(folder)
    try:
        with pytest.raises(ResumeError, match=f"process {other.pid} on .*same config"):
            pipeline.run(cfg)
    finally:
        other.kill()
        other.wait()
    assert not list(tmp_path.glob("runs/**/*.json"))


def test_a_run_that_fails_before_compressing_leaves_no_claim_behind(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from saes.runs import pipeline
    from saes.runs.records import config_key

    cfg = make_cfg("method=saes", results_dir=tmp_path)
    folder = pipeline.resume_dir(cfg, config_key(OmegaConf.to_container(cfg, resolve=True)))

    def fail(*_: Any) -> None:
        assert (folder / OWNER).is_file()  # claimed while it runs
        raise RuntimeError("model load failed")

    monkeypatch.setattr(pipeline, "load_model", fail)
    with pytest.raises(RuntimeError, match="model load failed"):
        pipeline.run(cfg)
    assert not folder.exists()
    other = hold_claim(folder)  # and another process can take the config at once
    other.kill()
    other.wait()


def test_a_pipeline_run_that_crashed_resumes_records_the_same_and_cleans_up(tmp_path, monkeypatch):
    from saes import saes as saes_mod
    from saes.runs.pipeline import run

    whole = run(make_cfg("method=saes", results_dir=tmp_path / "whole"))

    original = saes_mod.SAES.factorize

    def crash_in_block_1(self, W, stats, rank, layer=""):
        if layer.startswith("model.layers.1."):
            raise Crash(layer)
        return original(self, W, stats, rank, layer)

    monkeypatch.setattr(saes_mod.SAES, "factorize", crash_in_block_1)
    with pytest.raises(Crash):
        run(make_cfg("method=saes", results_dir=tmp_path / "split"))
    assert (tmp_path / "split" / "resume" / whole["key"] / "block_0.safetensors").is_file()
    assert not list((tmp_path / "split").glob("runs/**/*.json"))  # a crash leaves no record
    monkeypatch.setattr(saes_mod.SAES, "factorize", original)
    resumed = run(make_cfg("method=saes", results_dir=tmp_path / "split"))

    assert resumed["key"] == whole["key"] and resumed["calibration"]["resumed_from_block"] == 1
    assert resumed["metrics"] == whole["metrics"]
    assert strip(resumed["layers"]) == strip(whole["layers"])
    assert not (tmp_path / "split" / "resume" / whole["key"]).exists()  # removed once the record is written
