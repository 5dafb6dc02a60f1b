"""Per-block checkpoints, so a compression interrupted after block k restarts from block k.

After each block the engine writes ``block_<i>.safetensors`` (the compressed block's
weights) and then ``progress.json`` (which blocks are done, their per-layer diagnostics,
and what the run is: its config key, method, stream and a hash of the rank plan), each
atomically. On restart the finished blocks get their low-rank layers back from the
files, and the streams are recomputed through them, so the result equals an
uninterrupted run. A folder written by another run (another key or plan) is refused.
The pipeline removes the folder once the run's record is written.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from torch import nn

from saes.core.lowrank import LowRankLinear, set_submodule
from saes.io import atomic_write, digest

log = logging.getLogger(__name__)
PROGRESS = "progress.json"
OWNER = "owner.json"  # {"host", "pid"} of the process compressing into the folder


class ResumeError(ValueError):
    """A resume folder was written by another configuration, or is damaged."""


class BlockCheckpoints:
    """The per-block checkpoints of one compression run under ``folder``."""

    def __init__(self, folder: Path, key: str, method: str, stream: str, ranks: dict[str, int]) -> None:
        self.folder = Path(folder)
        plan = digest(sorted(ranks.items()), 16)
        self.identity = {"key": key, "method": method, "stream": stream, "ranks_sha256": plan}
        self.layers: dict[str, dict[str, dict[str, Any]]] = {}  # block index (str) -> layer diagnostics
        path = self.folder / PROGRESS
        if path.is_file():
            try:
                progress = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise ResumeError(f"{path} is damaged ({exc}); delete {self.folder} to start over") from exc
            theirs = {k: progress.get(k) for k in self.identity}
            if theirs != self.identity:
                diff = {k: (theirs[k], v) for k, v in self.identity.items() if theirs[k] != v}
                raise ResumeError(f"{self.folder} holds checkpoints of another config (saved vs this run: {diff}); "
                                  "refusing to mix them: delete the folder or point resume elsewhere")
            self.layers = progress["blocks"]

    @property
    def done(self) -> int:
        """How many leading blocks are checkpointed (they are restored, not recompressed)."""
        n = 0
        while str(n) in self.layers and (self.folder / f"block_{n}.safetensors").is_file():
            n += 1
        return n

    def save(self, index: int, block: nn.Module, layers: dict[str, dict[str, Any]]) -> None:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in block.state_dict().items()}
        atomic_write(self.folder / f"block_{index}.safetensors", lambda p: save_file(state, str(p)))
        self.layers[str(index)] = layers
        progress = json.dumps({**self.identity, "blocks": self.layers}, default=str)
        atomic_write(self.folder / PROGRESS, lambda p: p.write_text(progress))

    def restore(self, index: int, block: nn.Module, prefix: str, projections: tuple[str, ...],
                ranks: dict[str, int]) -> dict[str, dict[str, Any]]:
        """Swap the block's projections for the saved low-rank layers; returns their diagnostics."""
        from safetensors.torch import load_file

        weight = next(block.parameters())
        for name in projections:
            if ranks[f"{prefix}.{name}"] is None:  # planned to stay dense: its weights are in the checkpoint as they are
                continue
            dense = block.get_submodule(name)
            set_submodule(block, name, LowRankLinear(dense.in_features, dense.out_features, ranks[f"{prefix}.{name}"],
                                                     bias=dense.bias is not None, dtype=weight.dtype,
                                                     device=weight.device))
        state = load_file(str(self.folder / f"block_{index}.safetensors"), device=str(weight.device))
        try:
            block.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ResumeError(f"{self.folder}/block_{index}.safetensors does not fit block {index}: {exc}") from exc
        return self.layers[str(index)]

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)



_HELD: dict[Path, int] = {}  # folders this process owns -> the open, locked descriptor of their OWNER file


def claim(folder: Path) -> None:
    """Own ``folder`` for this process, or refuse it if another live process holds it (two jobs of one config
    at once: the first would delete the checkpoints the second is restoring).

    Ownership is an exclusive ``flock`` on ``<folder>/owner.json``, taken without waiting: atomic (two
    processes claiming at the same instant cannot both win) and released by the kernel when the owner exits,
    however it exits, so a crashed or killed owner never blocks a rerun and a recycled PID means nothing. The
    file's text (host, pid) only names the owner in the refusal. The pipeline claims before loading the model,
    the engine again when it opens the checkpoints; a second claim by the same process is a no-op.
    """
    folder = Path(folder).resolve()
    if folder in _HELD:
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / OWNER
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                owner = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                owner = {}
            raise ResumeError(f"{folder} is being written by process {owner.get('pid', '?')} on "
                              f"{owner.get('host', '?')}, which is compressing the same config now; wait for its "
                              "record instead of running it twice") from None
        try:  # the file may have been released and removed between our open and our lock: lock the live one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
    _HELD[folder] = fd


def release(folder: Path) -> None:
    """Give up ``folder`` (a no-op if this process does not own it); remove it if it holds no checkpoint.

    Called when a run fails after its claim: its finished blocks stay for the rerun, the claim does not.
    """
    folder = Path(folder).resolve()
    fd = _HELD.pop(folder, None)
    if fd is None:
        return
    (folder / OWNER).unlink(missing_ok=True)  # while still locked: a waiting claimer re-opens the new file
    os.close(fd)
    if not any(folder.glob("block_*.safetensors")) and not (folder / PROGRESS).exists():
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def owned(folder: Path | None) -> Iterator[None]:
    """Claim ``folder`` for the ``with`` body (nothing if ``None``); if the body raises, release it (its
    checkpoints stay for the rerun). On success the claim is kept: the caller releases when it is done."""
    if folder is None:
        yield
        return
    claim(folder)
    try:
        yield
    except BaseException:
        release(folder)
        raise
