"""Save a compressed model as a Hugging Face-style folder, and rebuild it exactly.

A folder holds ``model.safetensors`` (sharded with an index when large), ``config.json``,
the tokenizer, ``lowrank_manifest.json``: every low-rank layer (dotted name, rank, shapes,
bias) plus what made it (method, ratio, calibration protocol, git commit), and
``modeling_saes_lowrank.py`` (from :mod:`saes.runs.hf_portable`), the code transformers runs for
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` without this project.
``config.json`` is the base architecture's, with ``model_type: "saes_lowrank"``, ``auto_map``,
``architectures`` and the ``lowrank_*`` keys added (:func:`portable_config`). No pickles.

:func:`load_compressed` never runs the folder's code: it rebuilds the base config from
``config.json`` (:func:`base_config`), builds the base skeleton on the meta device (buffers such
as rotary frequencies stay real), swaps in ``LowRankLinear`` modules from the manifest, checks
every tensor's name and shape, and assigns the weights. Folders saved before the portable files
existed (a plain base ``config.json``) load the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saes.core.lowrank import LowRankLinear, check_installed, set_submodule
from saes.engine.structure import rebuild

MANIFEST = "lowrank_manifest.json"
FORMAT_VERSION = 1
PORTABLE_MODULE = "modeling_saes_lowrank"  # the copy of saes/hf_portable.py in a saved folder
PORTABLE_MODEL_TYPE = "saes_lowrank"
PORTABLE_KEYS = ("auto_map", "lowrank_base_model_type", "lowrank_base_architecture", "lowrank_layers",
                 "pruned_layers", "slicing")


class CheckpointError(ValueError):
    """A saved folder is missing, inconsistent with its manifest, or of another architecture."""


def lowrank_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    return {name: {"rank": mod.rank, "in_features": mod.in_features, "out_features": mod.out_features,
                   "bias": mod.A.bias is not None}
            for name, mod in model.named_modules() if isinstance(mod, LowRankLinear)}


def save_compressed(model: nn.Module, tokenizer: Any, folder: str | Path, provenance: dict[str, Any]) -> Path:
    """Write the folder atomically (a temporary sibling renamed into place)."""
    folder = Path(folder)
    layers = lowrank_layers(model)
    pruned = bool(provenance.get("pruned_layers"))
    if not layers and not pruned:
        raise CheckpointError("the model has no LowRankLinear layer: nothing compressed to save")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".tmp-{folder.name}-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        arch = type(model).__name__
        (tmp / f"{PORTABLE_MODULE}.py").write_text(portable_source(config["model_type"], arch))
        portable = portable_config(config, arch, layers)
        if pruned:  # the kept shapes of a pruned model's projections
            portable["pruned_layers"] = provenance["pruned_layers"]
        if provenance.get("slicing"):  # SliceGPT's widths, norms and shortcuts
            portable["slicing"] = provenance["slicing"]
        (tmp / "config.json").write_text(json.dumps(portable, indent=2, sort_keys=True) + "\n")
        manifest = {"format": FORMAT_VERSION, "model_type": model.config.model_type,
                    "parameters": sum(p.numel() for p in model.parameters()), "layers": layers, **provenance}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def portable_source(base_model_type: str, base_architecture: str) -> str:
    """``saes/hf_portable.py`` with its ``BASE_*`` constants set to this base model (checked, not guessed)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if base_model_type not in CONFIG_MAPPING_NAMES or not hasattr(transformers, base_architecture):
        raise CheckpointError(f"{base_architecture} (model_type {base_model_type!r}) is not a transformers "
                              "architecture: the folder could not be loaded without this project")
    text = (Path(__file__).with_name("hf_portable.py")).read_text()
    for key, value in (("BASE_MODEL_TYPE", base_model_type), ("BASE_ARCHITECTURE", base_architecture)):
        lines = [line for line in text.splitlines() if line.startswith(f"{key} = ")]
        if len(lines) != 1:
            raise RuntimeError(f"saes/hf_portable.py must define {key} on exactly one line")
        text = text.replace(lines[0], f"{key} = {json.dumps(value)}  # written by saes.runs.checkpoint", 1)
    return text


def portable_config(config: dict[str, Any], base_architecture: str, layers: dict[str, dict[str, Any]]
                    ) -> dict[str, Any]:
    """The base ``config.json`` as the portable model's: its own model type and classes, plus the layer table."""
    return {**config, "model_type": PORTABLE_MODEL_TYPE, "architectures": ["SaesLowRankForCausalLM"],
            "auto_map": {"AutoConfig": f"{PORTABLE_MODULE}.SaesLowRankConfig",
                         "AutoModelForCausalLM": f"{PORTABLE_MODULE}.SaesLowRankForCausalLM"},
            "lowrank_base_model_type": config["model_type"], "lowrank_base_architecture": base_architecture,
            "lowrank_layers": layers}


def base_config(folder: str | Path) -> Any:
    """The base architecture's config from ``folder/config.json``, without running the folder's code."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json")
    config = json.loads(path.read_text())
    if config.get("model_type") != PORTABLE_MODEL_TYPE:
        return AutoConfig.from_pretrained(folder)  # a folder saved before the portable files
    base = {k: v for k, v in config.items() if k not in PORTABLE_KEYS}
    base["model_type"], base["architectures"] = config["lowrank_base_model_type"], [config["lowrank_base_architecture"]]
    if base["model_type"] not in CONFIG_MAPPING:
        raise CheckpointError(f"{path}: unknown base model_type {base['model_type']!r}")
    return CONFIG_MAPPING[base["model_type"]].from_dict(base, name_or_path=str(folder))


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {MANIFEST}: not a compressed-model folder saved by this harness")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if manifest.get("format") != FORMAT_VERSION or not isinstance(manifest.get("layers"), dict):
        raise CheckpointError(f"{path}: unknown manifest format {manifest.get('format')!r} or no 'layers' table")
    for name, spec in manifest["layers"].items():
        if not {"rank", "in_features", "out_features", "bias"} <= set(spec):
            raise CheckpointError(f"{path}: layer {name} lacks rank/in_features/out_features/bias")
    pruned = manifest.get("pruned_layers") or {}
    wanted = {"in_features", "out_features", "bias", "base_in_features", "base_out_features", "base_bias"}
    for name, spec in pruned.items():
        if not isinstance(spec, dict) or not wanted <= set(spec):
            raise CheckpointError(f"{path}: pruned layer {name} lacks one of {sorted(wanted)}")
    return manifest


def _state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(folder / shard).items()}
    raise CheckpointError(f"{folder} has no model.safetensors (or sharded index)")


def load_compressed(folder: str | Path, dtype: torch.dtype | None = None) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Rebuild ``(model, tokenizer, manifest)`` from a folder written by :func:`save_compressed`."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    manifest = read_manifest(folder)
    config = base_config(folder)
    if config.model_type != manifest["model_type"]:
        raise CheckpointError(f"config.json says model_type={config.model_type!r}, the manifest "
                              f"{manifest['model_type']!r}: the folder mixes two architectures")
    with init_empty_weights(include_buffers=False):
        # Built in ``dtype`` as from_pretrained(dtype=...) builds it (rotary frequencies stay float32; a later
        # model.to(dtype) would round them, and the logits would differ from the portable folder's).
        model = AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype is not None else {}))
    try:  # a pruned model: each block's projections take the shapes the manifest records
        rebuild(model, manifest.get("pruned_layers") or {})
        if manifest.get("slicing"):  # SliceGPT: narrower embeddings and norms, the shortcut matrices
            from saes.engine.slicing import rebuild_sliced

            rebuild_sliced(model, manifest["slicing"])
    except (AttributeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{folder / MANIFEST}: {exc}") from None
    for name, spec in manifest["layers"].items():
        try:
            dense = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"manifest layer {name} does not exist in a {config.model_type} model") from None
        if (getattr(dense, "in_features", None), getattr(dense, "out_features", None)) != \
                (spec["in_features"], spec["out_features"]):
            raise CheckpointError(f"manifest layer {name} is {spec['out_features']}x{spec['in_features']}, "
                                  f"the base architecture has {type(dense).__name__} of another shape")
        set_submodule(model, name, LowRankLinear(spec["in_features"], spec["out_features"], spec["rank"],
                                                 bias=spec["bias"], device="meta"))
    state = _state_dict(folder)
    expected = model.state_dict()
    tied = set((getattr(model, "_tied_weights_keys", None) or {})) if config.tie_word_embeddings else set()
    missing = set(expected) - set(state) - tied
    unexpected = set(state) - set(expected)
    wrong = [f"{k}: saved {tuple(state[k].shape)}, expected {tuple(expected[k].shape)}"
             for k in set(state) & set(expected) if state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"weights do not match the manifest: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}, wrong shapes {wrong[:5]}")
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    if dtype is not None:
        check_installed(model, dtype)  # a float32 folder loaded as float16 can overflow
    return model.eval(), AutoTokenizer.from_pretrained(folder, config=config), manifest  # no remote-code prompt
