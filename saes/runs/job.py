"""A run's config, checked and described before anything heavy loads: :func:`prepare` validates it (every
error names the config key to change), builds the method and its shared rank allocator, keys the job and
converts the config groups into the typed settings the library below ``saes.runs`` takes.

:mod:`saes.runs.pipeline` then runs the :class:`Job` (obtain the model, evaluate, record).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from saes.core.lowrank import check_ratio, rank_for_ratio
from saes.core.method import DTYPES as PRECISIONS, Method
from saes.core.pruning import Pruner, svd_removal
from saes.core.slicegpt import Slicer
from saes.engine.allocators import RANK_ALLOCS, STRS, AdaCR, Allocator, DipGlobal, Dobi, FromRecord
from saes.engine.cost import GB
from saes.engine.layout import layout_for, plan_ranks, projections
from saes.engine.prune import budget
from saes.engine.structure import block_shape
from saes.evaluation import zeroshot
from saes.evaluation.perplexity import PplSettings
from saes.inputs import data as data_mod
from saes.inputs.models import (DTYPES, Chunk, GGUFSource, ModelSpec, check_blocks, check_tiny, model_config, model_identity,
                                resolve_device, skeleton)
from saes.io import sha256_file
from saes.runs.checkpoint import MANIFEST, CheckpointError, read_manifest
from saes.runs.finetune import LoraSettings, check_finetune
from saes.runs.quantize import QuantSettings
from saes.runs.records import config_key, record_path


# ------------------------------------------------------------------ validate
def validate(cfg: DictConfig) -> None:
    """Cheap checks of everything a compression run needs, before loading anything heavy."""
    if cfg.get("quant"):
        check_quant(cfg)
    if not (cfg.ratio == 0 and cfg.get("quant")):  # ratio=0: the dense model, only worth a run when quantized
        if cfg.ratio == 0:
            raise ValueError("ratio=0 compresses nothing; it is a run only with quant=gptq or quant=awq "
                             "(the dense model quantized)")
        check_ratio(cfg.ratio)
    check_int("seed", cfg.seed)
    check_int("calib.seed", cfg.calib.seed)
    if cfg.calib.propagate not in (None, "fp", "compressed"):
        raise ValueError(f"calib.propagate must be null, fp or compressed; got {cfg.calib.propagate!r}")
    if cfg.calib.stats_dtype not in PRECISIONS:
        raise ValueError(f"calib.stats_dtype must be one of {sorted(PRECISIONS)}; got {cfg.calib.stats_dtype!r}")
    if cfg.calib.nsamples < 1 or cfg.calib.seqlen < 2 or cfg.calib.batch_size < 1:
        raise ValueError("calib.nsamples and calib.batch_size must be >= 1 and calib.seqlen >= 2")
    buffer_budget(cfg.calib.get("max_buffer_gb", "auto"))
    data_mod.check_source("calib", cfg.calib.source, cfg.calib.get("path"), cfg.calib.get("split"))
    validate_eval(cfg)


def buffer_budget(gb: Any) -> int | str | None:
    """``calib.max_buffer_gb`` for the engine: ``auto``, null (no bound) or a positive number of GB (2^30 bytes,
    :data:`saes.engine.cost.GB`, the planner's unit), in bytes."""
    if gb is None or gb == "auto":
        return gb
    if isinstance(gb, bool) or not isinstance(gb, (int, float)) or gb <= 0:
        raise ValueError(f"calib.max_buffer_gb must be auto, null or a positive number of GB; got {gb!r}")
    return int(gb * GB)


def check_quant(cfg: DictConfig) -> QuantSettings:
    """``quant=gptq|awq``: its settings, and the settings it cannot be combined with, named before any work."""
    q = QuantSettings.from_config(cfg.quant)
    for key, clash, why in (("save", bool(cfg.save), "a saved folder holds factors, not packed low-bit weights"),
                            ("finetune", bool(cfg.get("finetune")), "LoRA on fake-quantized factors is not a stage here")):
        if clash:
            raise ValueError(f"quant={q.method} with {key}={cfg.get(key)}: not supported ({why}); drop one of them")
    if cfg.ratio == 0 and cfg.method.get("rank_alloc", "uniform") != "uniform":
        raise ValueError(f"ratio=0 (no compression) with method.rank_alloc={cfg.method.rank_alloc}: nothing to allocate")
    return q


def validate_eval(cfg: DictConfig) -> None:
    """Checks shared by compression runs and ``load=`` runs: the results folder, evaluation, model dtype,
    device."""
    check_results_dir(cfg.results_dir)
    ppl = cfg.eval.ppl
    if ppl.seqlen < 2 or (ppl.max_windows is not None and ppl.max_windows < 1):
        raise ValueError(f"eval.ppl.seqlen must be >= 2 and eval.ppl.max_windows >= 1 or null; got {ppl.seqlen}, {ppl.max_windows}")
    check_int("eval.ppl.batch_size", ppl.batch_size, minimum=1)
    for src in ppl.sources:
        data_mod.check_source("eval.ppl", src, ppl.get("path"), ppl.get("split"))
    if cfg.model.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}; got {cfg.model.dtype!r}")
    if cfg.get("finetune"):
        check_finetune(cfg.finetune)
    zeroshot_plan(cfg.eval)  # eval.zeroshot: bad input fails here
    resolve_device(cfg.device)


def check_results_dir(value: Any) -> Path:
    """``results_dir`` can take the run's caches and record: a writable folder, or one that can be made. Probed
    by making and removing a folder in it or in its nearest existing parent, so bad input leaves nothing behind
    and a folder that cannot be made (``/proc/x``) is named now, not by a traceback once the dense model has
    been scored."""
    folder = Path(str(value)).expanduser().absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        why = "is not a folder" if existing == folder else f"cannot be created: {existing} is a file"
        raise ValueError(f"results_dir={value!r} {why}; set results_dir to a folder this user can write")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".results-dir-check-", dir=existing))
    except OSError as exc:
        raise ValueError(f"results_dir={value!r}: cannot create a folder in {existing} ({exc.strerror}); set "
                         "results_dir to a folder this user can write") from None
    return folder


def build_method(cfg: DictConfig) -> Method:
    """The method of ``cfg.method`` (its rank allocator's keys aside: :func:`build_allocator`); a constructor's
    ``ValueError``/``TypeError`` becomes a ``ValueError`` naming the method config (unwrapped from Hydra's wrapper)."""
    node = OmegaConf.to_container(cfg.method, resolve=True)
    assert isinstance(node, dict)
    try:
        method = instantiate({k: v for k, v in node.items() if k not in ALLOCATOR_KEYS})
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, (ValueError, TypeError)):
            raise ValueError(f"invalid method config {cfg.method.get('name')!r}: {cause}") from exc
        raise
    if not isinstance(method, Method):
        raise TypeError(f"method config {cfg.method.name!r} does not build a saes.core.method.Method")
    return method


# Each shared allocator's settings: keys of the method config (conf/rank_alloc/shared.yaml), not the method's.
ALLOCATOR_SETTINGS: dict[str, tuple[str, ...]] = {"strs": ("strs",), "adacr": ("min_keep", "max_keep", "importance"),
                                                  "dip": ("dip",), "dobi": ("dobi",), "record": ("ranks_from",)}
ALLOCATOR_KEYS = ("rank_alloc", *(k for keys in ALLOCATOR_SETTINGS.values() for k in keys))


def build_allocator(method_cfg: DictConfig) -> Allocator | None:
    """The allocator ``method.rank_alloc`` names with its settings (``None`` for uniform ranks); a bad name or
    setting is a ``ValueError`` naming the key."""
    name = method_cfg.get("rank_alloc", "uniform")
    if name not in RANK_ALLOCS:
        raise ValueError(f"method.rank_alloc must be one of {RANK_ALLOCS}; got {name!r}")
    if name != "record" and method_cfg.get("ranks_from") is not None:  # else ignored, and the key would not show it
        raise ValueError(f"method.ranks_from is set but method.rank_alloc={name}: set method.rank_alloc=record to "
                         "take the record's ranks, or drop method.ranks_from")
    try:
        if name == "strs":
            return STRS(**dict(method_cfg.get("strs") or {}))
        if name == "adacr":
            return AdaCR(**{k: method_cfg[k] for k in ALLOCATOR_SETTINGS["adacr"] if k in method_cfg})
        if name == "dip":
            return DipGlobal(**dict(method_cfg.get("dip") or {}))
        if name == "dobi":
            return Dobi(**dict(method_cfg.get("dobi") or {}))
        if name == "record":
            return FromRecord(method_cfg.get("ranks_from"))
    except TypeError as exc:  # an unknown key under method.strs / method.dip
        raise ValueError(f"method.rank_alloc={name}: {exc}") from exc
    return None


def shared_allocator(cfg: DictConfig, method: Method) -> Allocator | None:
    """The shared rank allocator ``method.rank_alloc`` names (None: uniform ranks or the method's own plan)."""
    allocator = build_allocator(cfg.method)
    if allocator is not None and method.plans_ranks:
        raise ValueError(f"method.rank_alloc={allocator.name} and {cfg.method.name}'s own rank plan exclude each "
                         f"other: set method.rank_alloc=uniform, or turn the method's plan off (for ERC-SVD: "
                         f"method.plc.k=null)")
    return allocator


def check_int(key: str, value: Any, minimum: int | None = None) -> int:
    """``value`` of config key ``key`` as an int (not a bool, not a string), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        need = "an integer" + (f" >= {minimum}" if minimum is not None else "")
        raise ValueError(f"{key} must be {need}; got {value!r}")
    return value


def check_ranks_before_loading(cfg: DictConfig, method: Method, allocator: Allocator | None) -> None:
    """The uniform rank plan of ``ratio`` from the model's config alone (shapes on the meta device): a ratio
    that rounds a rank to 0 is refused before the weights load, the dense evaluation and any pre-pass. The
    uniform plan's total is every method's budget, so it must exist whatever the allocation. The method's
    depth-dependent settings (ERC-SVD's ``plc.k``) are checked against the same skeleton."""
    if isinstance(method, Pruner) and method.scores_from == "gradients" and cfg.get("offload"):
        raise ValueError(f"method={cfg.method.name} takes the gradients of the whole model on the device; offload=true "
                         "keeps the weights off it between blocks, where no backward pass can reach them: drop offload")
    if float(cfg.ratio) == 0.0:  # nothing is compressed (quant=gptq of the dense model)
        return
    model = skeleton(model_config(model_spec(cfg.model)))
    if isinstance(method, Slicer):  # the architecture, then a width that gives the SVD plan's parameter count
        from saes.engine.slicing import plan_width

        plan_width(model, method, float(cfg.ratio))
    plan_ranks_for(model, float(cfg.ratio))
    method.check_setting(len(model.get_submodule(layout_for(model).layers)), float(cfg.ratio))
    if isinstance(method, Pruner):  # the structures can give the SVD plan's parameter count
        layout = layout_for(model)
        method.check_budget([block_shape(b) for b in model.get_submodule(layout.layers)], float(cfg.ratio),
                            budget(model, layout, float(cfg.ratio)))
    if allocator is not None:
        allocator.check(float(cfg.ratio))
        allocator.check_shapes({p: tuple(model.get_submodule(p).weight.shape)
                                for p in projections(model, layout_for(model))}, float(cfg.ratio))


def plan_ranks_for(model: nn.Module, ratio: float) -> dict[str, int]:
    return plan_ranks(model, layout_for(model), ratio)


# ------------------------------------------------------------------ the job: key, record path, typed settings
@dataclass(frozen=True)
class Saved:
    """A folder written by ``save=true``, checked against the config's base model (``load=`` runs)."""
    folder: Path
    manifest: dict[str, Any]
    manifest_sha256: str
    identity: str  # of the base model


@dataclass(frozen=True)
class Job:
    """What one run computes and where its record goes, all known before anything heavy loads."""
    config: dict[str, Any]  # the record's config (its key hashes it)
    key: str
    path: Path  # of the record
    name: str  # the run's name for W&B
    label: str  # the evaluated model's name in progress bars
    ppl: PplSettings
    zeroshot: zeroshot.Plan | None
    method: Method | None = None  # a compression run
    allocator: Allocator | None = None  # its shared rank allocator (None: uniform or the method's own plan)
    quant: QuantSettings | None = None  # quantization after compression (and LoRA)
    lora: LoraSettings | None = None
    saved: Saved | None = None  # a load= run


def prepare(cfg: DictConfig) -> Job:
    """Validate the config and describe the run; then switch the hub off once if zero-shot runs offline,
    before ``datasets`` or lm-eval load anything."""
    job = loaded_job(cfg) if cfg.get("load") else compression_job(cfg)
    if job.zeroshot is not None and job.zeroshot.offline:
        data_mod.set_offline_switches()
    return job


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    return resolved


def model_spec(model_cfg: DictConfig) -> ModelSpec:
    """The ``model`` config group as the :class:`ModelSpec` the loaders of :mod:`saes.inputs.models` take."""
    gguf = model_cfg.get("gguf")
    return ModelSpec(
        source=model_cfg.source, dtype=model_cfg.dtype, path=model_cfg.get("path"), hub_id=model_cfg.get("hub_id"),
        revision=model_cfg.get("revision"),
        tiny=check_tiny(model_cfg.get("blocks"), dict(model_cfg.get("tiny") or {})) if model_cfg.source == "tiny" else {},
        # a tiny model builds model.blocks blocks itself (its tiny parameters interpolate it); any other is cut
        blocks=None if model_cfg.source == "tiny" else check_blocks(model_cfg.get("blocks")),
        gguf=None if gguf is None else GGUFSource(gguf.package, gguf.file, gguf.get("checksums"),
                                                  tuple(Chunk(c.package, c.file) for c in gguf.get("chunks") or ())))


def zeroshot_plan(eval_cfg: DictConfig) -> zeroshot.Plan | None:
    """``eval.zeroshot`` as a :class:`zeroshot.Plan` (None: zero-shot is off); bad settings are named here."""
    zs = eval_cfg.get("zeroshot")
    if zs is None:
        return None
    return zeroshot.plan(zs.get("tasks"), limit=zs.get("limit"), batch_size=zs.get("batch_size", 16),
                         offline=zs.get("offline", "auto"), average_metric=zs.get("average_metric", "acc"),
                         bootstrap_iters=zs.get("bootstrap_iters", 1000))


def ppl_settings(cfg: DictConfig) -> PplSettings:
    ppl = cfg.eval.ppl
    return PplSettings(seqlen=ppl.seqlen, max_windows=ppl.max_windows, batch_size=ppl.batch_size)


def compression_job(cfg: DictConfig) -> Job:
    validate(cfg)
    method = build_method(cfg)
    if isinstance(method, Slicer) and cfg.calib.propagate == "fp":
        raise ValueError(f"calib.propagate=fp with method={cfg.method.name}: each block's PCA is taken on the model "
                         "as already sliced (the compressed stream) by construction; drop calib.propagate")
    if isinstance(method, Slicer) and cfg.get("quant"):
        raise ValueError(f"quant={cfg.quant.get('method')} with method={cfg.method.name}: quantizing a sliced model "
                         "(its shortcut matrices included) is not implemented; drop quant")
    if isinstance(method, (Pruner, Slicer)) and cfg.get("finetune"):
        raise ValueError(f"finetune={cfg.finetune.get('name', 'lora')} with method={cfg.method.name}: the LoRA stage "
                         "adapts low-rank factors and a pruned model has none; drop finetune")
    allocator = shared_allocator(cfg, method)
    resolved = resolved_config(cfg)
    return Job(config=resolved, key=config_key(resolved), path=record_path(cfg.results_dir, resolved),
               name=f"{cfg.model.name}/{method.name}/r{cfg.ratio}/s{cfg.seed}", label=method.name,
               ppl=ppl_settings(cfg), zeroshot=zeroshot_plan(cfg.eval), method=method, allocator=allocator,
               lora=LoraSettings.from_config(cfg.finetune) if cfg.get("finetune") else None,
               quant=QuantSettings.from_config(cfg.quant) if cfg.get("quant") else None)


def loaded_job(cfg: DictConfig) -> Job:
    """``load=<folder>``: evaluate a saved compressed model (no calibration, no compression).

    The record lives beside the compression records of the manifest's method and ratio, named
    ``loaded-<key>.json`` (``key`` hashes the config as evaluated plus the manifest's SHA-256), so
    it never overwrites the record of the run that made the folder.
    """
    validate_eval(cfg)
    if cfg.save:
        raise ValueError("save=true with load=<folder>: the folder is already saved; drop one of them")
    if cfg.get("quant"):
        raise ValueError(f"quant={cfg.quant.method} with load=<folder>: quantization is a stage of a compression run; "
                         "drop load=")
    folder = Path(cfg.load).expanduser().resolve()
    manifest = read_manifest(folder)
    lacking = [k for k in ("base", "method", "ratio") if manifest.get(k) is None]
    if lacking:
        raise CheckpointError(f"{folder / MANIFEST} lacks {lacking}: it was not written by run.py save=true")
    check_manifest_ratio(folder, manifest)
    identity = model_identity(model_spec(cfg.model))
    if manifest["base"] != identity:
        raise CheckpointError(f"{folder} was compressed from base {manifest['base']!r}, but model={cfg.model.name} "
                              f"is {identity!r}: pass the model it was made from (model=... or model.path=...)")
    resolved = resolved_config(cfg)
    method_cfg = manifest["method"] if isinstance(manifest["method"], dict) else {"name": str(manifest["method"])}
    config = {**{k: v for k, v in resolved.items() if k != "calib"}, "load": str(folder), "method": method_cfg,
              "ratio": manifest["ratio"]}  # what made the weights; calibration comes from the manifest
    manifest_sha = sha256_file(folder / MANIFEST)
    key = config_key({**config, "manifest_sha256": manifest_sha})
    return Job(config=config, key=key, path=record_path(cfg.results_dir, config).with_name(f"loaded-{key}.json"),
               name=f"{cfg.model.name}/{method_cfg['name']}/r{manifest['ratio']}/loaded",
               label=f"{method_cfg['name']} (loaded)", ppl=ppl_settings(cfg), zeroshot=zeroshot_plan(cfg.eval),
               saved=Saved(folder, manifest, manifest_sha, identity))


def check_manifest_ratio(folder: Path, manifest: dict[str, Any]) -> None:
    """The manifest's ratio must be the one its layers were planned with: the record is filed and tabled under
    it. Every plan keeps at most the uniform plan's parameters and misses them by less than one rank of one
    projection (the budget rule shared by every allocator); a ratio its layers do not meet is refused."""
    ratio = check_ratio(manifest["ratio"])
    if manifest.get("pruned_layers"):
        check_pruned_ratio(folder, manifest, ratio)
        return
    shapes = manifest_shapes(manifest)
    if not manifest["layers"]:
        raise CheckpointError(f"{folder / MANIFEST} lists no low-rank layer")
    kept = sum(m * n if r is None else r * (m + n) for m, n, r in shapes)
    budget = sum(rank_for_ratio(m, n, ratio) * (m + n) for m, n, _ in shapes)
    if not budget - max(m + n for m, n, _ in shapes) < kept <= budget:
        removed = 1 - kept / sum(m * n for m, n, _ in shapes)
        raise CheckpointError(f"{folder / MANIFEST} says ratio {ratio}, but its layers remove {removed:.4f} of the "
                              f"projections' parameters (kept {kept:,}; a plan at ratio {ratio} keeps at most "
                              f"{budget:,}, within one rank of it): the manifest was edited or does not belong "
                              "to these weights")



def check_pruned_ratio(folder: Path, manifest: dict[str, Any], ratio: float) -> None:
    """A pruned folder removes the SVD plan's parameter count at its ratio, overshooting by less than one
    structure (:mod:`saes.core.pruning`'s budget rule)."""
    layers = manifest["pruned_layers"].values()
    target = svd_removal([(d["base_out_features"], d["base_in_features"]) for d in layers], ratio)
    removed = sum(d["base_out_features"] * d["base_in_features"] - d["out_features"] * d["in_features"]
                  for d in layers)
    largest = max(max(b["group_params"], b["channel_params"]) for b in manifest.get("structure") or [{}])
    if manifest.get("slicing"):  # SliceGPT: its shortcut matrices count; its structure is one hidden dimension
        removed -= int(manifest["slicing"]["shortcut_parameters"])
        largest = int(manifest["slicing"]["max_structure"])
    if not 0 <= removed - target < largest:
        raise CheckpointError(f"{folder / MANIFEST} says ratio {ratio}, but its pruned layers remove {removed:,} "
                              f"parameters (the SVD plan at ratio {ratio} removes {target:,}; a pruned plan removes "
                              "that to within one structure): the manifest was edited or does not belong to these "
                              "weights")


def manifest_shapes(manifest: dict[str, Any]) -> list[tuple[int, int, int | None]]:
    """``(m, n, rank)`` of every planned projection of a saved folder (``None``: planned to stay dense)."""
    return ([(d["out_features"], d["in_features"], d["rank"]) for d in manifest["layers"].values()]
            + [(d["out_features"], d["in_features"], None) for d in manifest.get("dense_layers", {}).values()])


