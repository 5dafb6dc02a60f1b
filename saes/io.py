"""Files written whole or not at all, content digests, and JSON caches keyed by what they depend on.

Every file the harness writes (records, caches, checkpoints, task data) goes through :func:`atomic_write`:
a crash or a full disk leaves the old file or none, never half of one. Every key (a record's config key,
a cache's protocol) is :func:`digest` of a JSON-able description of what the content depends on.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

T = TypeVar("T")


def atomic_write(path: Path, write: Callable[[Path], None], suffix: str | None = None) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it into place (readable by all).

    ``suffix``: the temporary file's (default: ``path``'s), for folders that others scan by suffix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix if suffix is None else suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str, suffix: str | None = None) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), suffix)


def write_json_atomic(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON (the records' format: one space, keys in insertion order, NaN allowed)."""
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=False, allow_nan=True) + "\n")


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def token_digest(ids: torch.Tensor) -> str:
    """sha256 of token ids as int64 bytes: which tokens a number was computed on (records, cache keys)."""
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def digest(obj: Any, length: int = 12) -> str:
    """The first ``length`` hex digits of sha256 of ``obj`` as canonical JSON (sorted keys; non-JSON as str)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def cached_json(path: Path, compute: Callable[[], T]) -> T:
    """The JSON at ``path`` if it exists, else ``compute()`` written there atomically (the path carries the key)."""
    if path.is_file():
        return read_json(path)
    value = compute()
    write_json_atomic(path, value)
    return value
