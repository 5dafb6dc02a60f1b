"""The README's first two commands, as a newcomer meets them: ``make run`` never touches a tracked file, so
``make run`` then ``make test`` passes and leaves ``git status`` as it was (issue 24 §1)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from .conftest import ROOT

GIT = shutil.which("git")
needs_git = pytest.mark.skipif(GIT is None or not (ROOT / ".git").exists(), reason="needs a git checkout")


def make_run_command(*args: str) -> str:
    out = subprocess.run(["make", "-n", "run", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    [line] = [x for x in out.stdout.splitlines() if "run.py" in x]
    return line


def git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout


@needs_git
def test_make_run_records_into_an_ignored_folder_not_over_the_committed_records():
    line = make_run_command()
    [run_dir] = re.findall(r"results_dir=(\S+)", line)
    assert "force=true" in line and not (ROOT / run_dir).resolve().is_relative_to(ROOT / "results")
    record = f"{run_dir}/runs/smollm2_135m/saes/ratio0.2/seed0-0123456789ab.json"
    ignored = subprocess.run(["git", "check-ignore", "-q", record], cwd=ROOT)
    assert ignored.returncode == 0, f"{record} would be a tracked path"
    # ARGS still reach run.py after the folder (a user's results_dir=... wins: Hydra takes the last value)
    assert make_run_command("ARGS=ratio=0.4").endswith("ratio=0.4")


@needs_git
@pytest.mark.slow
def test_make_run_leaves_git_status_as_it_was(tmp_path):
    """The real target on the tiny model (the embedded one takes minutes): the record lands under the target's
    folder, and no tracked or unignored file changes."""
    before = git_status()
    tiny = "model=tiny_llama logger=none calib.nsamples=2 calib.seqlen=32 eval.ppl.seqlen=64 eval.ppl.max_windows=2"
    out = subprocess.run(["make", "run", f"ARGS={tiny} hydra.run.dir={tmp_path / 'hydra'}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = ROOT / re.findall(r"results_dir=(\S+)", make_run_command())[0]
    try:
        assert list((run_dir / "runs" / "tiny_llama" / "saes" / "ratio0.2").glob("seed0-*.json"))
        assert f"record written under {run_dir.relative_to(ROOT)}/runs/" in out.stdout
        assert git_status() == before
    finally:
        shutil.rmtree(run_dir / "runs" / "tiny_llama", ignore_errors=True)
        shutil.rmtree(run_dir / "dense" / "tiny_llama", ignore_errors=True)
