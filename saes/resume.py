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

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .lowrank import LowRankLinear, set_submodule

log = logging.getLogger(__name__)
PROGRESS = "progress.json"
OWNER = "owner.json"  # {"host", "pid"} of the process compressing into the folder


class ResumeError(ValueError):
    """A resume folder was written by another configuration, or is damaged."""


def atomic_write(path: Path, write: Any) -> None:
    """``write(tmp_path)`` then rename into place: a crash never leaves a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class BlockCheckpoints:
    """The per-block checkpoints of one compression run under ``folder``."""

    def __init__(self, folder: Path, key: str, method: str, stream: str, ranks: dict[str, int]) -> None:
        self.folder = Path(folder)
        plan = hashlib.sha256(json.dumps(sorted(ranks.items())).encode()).hexdigest()[:16]
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
        claim(self.folder)

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



def claim(folder: Path) -> None:
    """Own ``folder`` for this process, or refuse it if a live process on this host is writing it (two jobs of
    one config at once: the first would delete the checkpoints the second is restoring). A dead owner, or one
    on another host (a requeued job), is taken over. The pipeline claims before loading the model, the
    engine again when it opens the checkpoints; a second claim by the same process is a no-op."""
    path, host = Path(folder) / OWNER, socket.gethostname()
    try:
        owner = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        owner = {}
    pid = owner.get("pid")
    if owner.get("host") == host and isinstance(pid, int) and pid != os.getpid() and _alive(pid):
        raise ResumeError(f"{folder} is being written by process {pid} on {host}, which is compressing "
                          "the same config now; wait for its record instead of running it twice")
    Path(folder).mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: p.write_text(json.dumps({"host": host, "pid": os.getpid()})))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    return True
