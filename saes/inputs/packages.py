"""Files shipped inside installed distributions (the embedded model, offline text), found without importing them."""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path


def packaged_file(package: str, relpath: str, error: type[Exception], *, check_size: bool = False) -> Path:
    """Path of ``relpath`` (a file name or a path tail) inside the installed ``package``.

    Raises ``error`` naming what to do when the package or the file is missing, or (``check_size``) when the
    file's size differs from the one the package's ``RECORD`` lists (a truncated or replaced file).
    """
    try:
        dist = md.distribution(package)
    except md.PackageNotFoundError:
        raise error(f"package {package!r} is not installed; run `make setup` (it installs {package} with --no-deps)") from None
    for f in dist.files or []:
        if str(f) == relpath or str(f).endswith("/" + relpath):
            path = Path(f.locate())
            if path.is_file():
                if check_size and f.size is not None and path.stat().st_size != f.size:
                    raise error(f"{relpath!r} inside the installed package {package!r} is {path.stat().st_size} "
                                f"bytes, its RECORD says {f.size}; reinstall it "
                                f"(pip install --force-reinstall --no-deps {package}=={dist.version})")
                return path
    raise error(f"{relpath!r} not found inside the installed package {package!r}; reinstall it")
