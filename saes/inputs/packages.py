"""Files shipped inside installed distributions (the embedded model, offline text), found without importing them."""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path


def packaged_file(package: str, relpath: str, error: type[Exception]) -> Path:
    """Path of ``relpath`` (a file name or a path tail) inside the installed ``package``.

    Raises ``error`` naming what to do when the package or the file is missing.
    """
    try:
        files = md.distribution(package).files or []
    except md.PackageNotFoundError:
        raise error(f"package {package!r} is not installed; run `make setup` (it installs {package} with --no-deps)") from None
    for f in files:
        if str(f) == relpath or str(f).endswith("/" + relpath):
            path = Path(f.locate())
            if path.is_file():
                return path
    raise error(f"{relpath!r} not found inside the installed package {package!r}; reinstall it")
