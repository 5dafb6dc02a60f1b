"""One run of one resolved config (what ``run.py`` calls), in five steps:

validate -> key / skip -> obtain the model (compress it, or load it from ``load=``) -> evaluate -> record.

Everything that can be checked from the config is checked before anything heavy loads; below this module the
library takes typed values (:class:`PplSettings`, :class:`zeroshot.Plan`, :class:`LoraSettings`,
:class:`EngineConfig`), never the whole ``DictConfig``.
"""

from __future__ import annotations

import logging
import math
import resource
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from saes.core.lowrank import check_ratio, count_parameters, rank_for_ratio
from saes.core.method import DTYPES as PRECISIONS, Method
from saes.engine.allocators import ALLOCATOR_KEYS, Allocator, Plan, build_allocator
from saes.engine.config import CompressionReport, EngineConfig
from saes.engine.layout import BlockLayout, check_plan, layout_for, plan_ranks, projections
from saes.engine.loop import compress_model, needs_calibration
from saes.engine.resume import owned, release
from saes.evaluation import zeroshot
from saes.evaluation.dense import DenseModel, cached_perplexity, dense_perplexity, dense_zeroshot
from saes.evaluation.offload import placed
from saes.evaluation.perplexity import PplSettings, perplexities
from saes.inputs import data as data_mod
from saes.inputs.models import DTYPES, load_model, model_config, model_identity, resolve_device, skeleton
from saes.io import read_json, sha256_file, token_digest, write_json_atomic
from saes.runs.checkpoint import MANIFEST, CheckpointError, load_compressed, read_manifest, save_compressed
from saes.runs.finetune import LoraSettings, check_finetune, lora_finetune
from saes.runs.planner import plan_run
from saes.runs.quantize import QuantSettings, memory, quantize_model
from saes.runs.records import SCHEMA_VERSION, config_key, environment, flatten, record_path, run_stem, wandb_run

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ validate
def validate(cfg: DictConfig) -> None:
    """Cheap checks of everything a compression run needs, before loading anything heavy."""
    if cfg.get("quant"):
        check_quant(cfg)
    if not (cfg.ratio == 0 and cfg.get("quant")):  # ratio=0: the dense model, only worth a run when quantized
        if cfg.ratio == 0:
            raise ValueError("ratio=0 compresses nothing; it is a run only with quant=gptq (GPTQ of the dense model)")
        check_ratio(cfg.ratio)
    check_int("seed", cfg.seed)
    check_int("calib.seed", cfg.calib.seed)
    if cfg.calib.propagate not in (None, "fp", "compressed"):
        raise ValueError(f"calib.propagate must be null, fp or compressed; got {cfg.calib.propagate!r}")
    if cfg.calib.stats_dtype not in PRECISIONS:
        raise ValueError(f"calib.stats_dtype must be one of {sorted(PRECISIONS)}; got {cfg.calib.stats_dtype!r}")
    if cfg.calib.nsamples < 1 or cfg.calib.seqlen < 2 or cfg.calib.batch_size < 1:
        raise ValueError("calib.nsamples and calib.batch_size must be >= 1 and calib.seqlen >= 2")
    data_mod.check_source(cfg.calib, "calib", cfg.calib.source)
    validate_eval(cfg)


def check_quant(cfg: DictConfig) -> QuantSettings:
    """``quant=gptq``: its settings, and the settings it cannot be combined with, named before any work."""
    q = QuantSettings.from_config(cfg.quant)
    for key, clash, why in (("save", bool(cfg.save), "a saved folder holds factors, not packed low-bit weights"),
                            ("finetune", bool(cfg.get("finetune")), "LoRA on fake-quantized factors is not a stage here")):
        if clash:
            raise ValueError(f"quant={q.method} with {key}={cfg.get(key)}: not supported ({why}); drop one of them")
    if cfg.ratio == 0 and cfg.method.get("rank_alloc", "uniform") != "uniform":
        raise ValueError(f"ratio=0 (no compression) with method.rank_alloc={cfg.method.rank_alloc}: nothing to allocate")
    return q


def validate_eval(cfg: DictConfig) -> None:
    """Checks shared by compression runs and ``load=`` runs: evaluation, model dtype, device."""
    ppl = cfg.eval.ppl
    if ppl.seqlen < 2 or (ppl.max_windows is not None and ppl.max_windows < 1):
        raise ValueError(f"eval.ppl.seqlen must be >= 2 and eval.ppl.max_windows >= 1 or null; got {ppl.seqlen}, {ppl.max_windows}")
    check_int("eval.ppl.batch_size", ppl.batch_size, minimum=1)
    for src in ppl.sources:
        data_mod.check_source(ppl, "eval.ppl", src)
    if cfg.model.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}; got {cfg.model.dtype!r}")
    if cfg.get("finetune"):
        check_finetune(cfg.finetune)
    zeroshot.plan(cfg.eval)  # eval.zeroshot: bad input fails here
    resolve_device(cfg.device)


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
    if float(cfg.ratio) == 0.0:  # nothing is compressed (quant=gptq of the dense model)
        return
    model = skeleton(model_config(cfg.model))
    plan_ranks_for(model, float(cfg.ratio))
    method.check_setting(len(model.get_submodule(layout_for(model).layers)), float(cfg.ratio))
    if allocator is not None:
        allocator.check(float(cfg.ratio))


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


def ppl_settings(cfg: DictConfig) -> PplSettings:
    ppl = cfg.eval.ppl
    return PplSettings(seqlen=ppl.seqlen, max_windows=ppl.max_windows, batch_size=ppl.batch_size)


def compression_job(cfg: DictConfig) -> Job:
    validate(cfg)
    method = build_method(cfg)
    allocator = shared_allocator(cfg, method)
    resolved = resolved_config(cfg)
    return Job(config=resolved, key=config_key(resolved), path=record_path(cfg.results_dir, resolved),
               name=f"{cfg.model.name}/{method.name}/r{cfg.ratio}/s{cfg.seed}", label=method.name,
               ppl=ppl_settings(cfg), zeroshot=zeroshot.plan(cfg.eval), method=method, allocator=allocator,
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
        raise ValueError("quant=gptq with load=<folder>: quantization is a stage of a compression run; drop load=")
    folder = Path(cfg.load).expanduser().resolve()
    manifest = read_manifest(folder)
    lacking = [k for k in ("base", "method", "ratio") if manifest.get(k) is None]
    if lacking:
        raise CheckpointError(f"{folder / MANIFEST} lacks {lacking}: it was not written by run.py save=true")
    check_manifest_ratio(folder, manifest)
    identity = model_identity(cfg.model)
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
               label=f"{method_cfg['name']} (loaded)", ppl=ppl_settings(cfg), zeroshot=zeroshot.plan(cfg.eval),
               saved=Saved(folder, manifest, manifest_sha, identity))


# ------------------------------------------------------------------ the run
class Timings:
    """Seconds per phase, in the order the phases ran (``with timings.phase("load"): ...``)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.phases: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.phases[name] = time.perf_counter() - t0

    def total(self) -> None:
        self.phases["total"] = time.perf_counter() - self.start


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one job; returns its record (the existing one if it was already done and not forced)."""
    if cfg.get("plan"):  # plan=true: ranks, parameters, predicted cost from the config alone; no record
        return plan_run(cfg)
    timings = Timings()
    job = prepare(cfg)
    done = existing_record(job.path, cfg.force, bool(cfg.save))
    if done is not None:
        return done
    # Another live process compressing this config is refused before anything loads; a failure from here on
    # gives the claim up (finished blocks stay for the rerun).
    claim = None
    if job.saved is None:
        check_ranks_before_loading(cfg, job.method, job.allocator)
        claim = resume_dir(cfg, job.key) if cfg.get("resume") else None
    with owned(claim):
        got = compress(cfg, job, timings) if job.saved is None else load(cfg, job, timings)
        with timings.phase("eval_compressed"):
            metrics = evaluate(got, job, resolve_device(cfg.device), bool(cfg.get("offload")))
        timings.total()
        params = {**parameter_counts(got.shapes, count_parameters(got.model), got.dense_params), **got.params_extra}
        env = environment()
        saved_to = None
        if cfg.save:
            with timings.phase("save"):
                saved_to = save(cfg, job, got, env)
        record = build_record(job, got, metrics, params, timings, saved_to, env)
        write_record(cfg, job.path, record, job.name)
    if claim is not None:
        release(claim)
        shutil.rmtree(claim, ignore_errors=True)  # the run is recorded: its checkpoints are done with
    return record


# ------------------------------------------------------------------ obtain the model
@dataclass
class Obtained:
    """The model to evaluate, its evaluation data, the dense results to compare with, and what the record
    says about how the model was made."""
    model: nn.Module
    tokenizer: Any
    identity: str  # of the base model
    eval_ids: dict[str, torch.Tensor]
    ppl_skipped: dict[str, str]  # perplexity sources that could not be loaded here, and why
    dense_ppl: dict[str, dict[str, Any]]  # per source: dense, tokens_sha256[, windows]
    dense_zeroshot: zeroshot.DenseScores | None
    calibration: dict[str, Any] | None
    shapes: list[tuple[int, int, int | None]]  # (m, n, rank) of every planned projection (None: kept dense)
    dense_params: int  # parameters of the dense model
    params_extra: dict[str, Any]  # rank_alloc (compressed here) or weights_bytes (loaded)
    layers: dict[str, Any]
    blocks: list[Any] = field(default_factory=list)
    finetune: dict[str, Any] | None = None
    quant: dict[str, Any] | None = None  # quant=gptq: memory and losses
    loaded_from: dict[str, Any] | None = None  # a load= run

    @property
    def dense_projections(self) -> list[tuple[str, int, int]]:
        """``(name, m, n)`` of the projections the plan left dense."""
        return [(name, d["m"], d["n"]) for name, d in self.layers.items() if d.get("rank", 0) is None]


def dense_model(cfg: DictConfig, identity: str, device: torch.device) -> DenseModel:
    return DenseModel(Path(cfg.results_dir) / "dense" / str(cfg.model.name), identity, cfg.model.dtype, device)


def compress(cfg: DictConfig, job: Job, timings: Timings) -> Obtained:
    """Load the dense model, score it (cached), compress it in place, fine-tune it if asked."""
    assert job.method is not None
    device = resolve_device(cfg.device)
    with timings.phase("load"):
        loaded = load_model(cfg.model)
        layout = layout_for(loaded.model)
    model, tok = loaded.model, loaded.tokenizer
    with timings.phase("data"):
        wants = (needs_calibration(job.method, cfg.calib.track_fidelity) or job.allocator is not None
                 or job.quant is not None)
        calib_ids = calibration_tokens(cfg, tok) if wants else None
        eval_ids, skipped = eval_tokens(cfg, tok)
    dense = dense_model(cfg, loaded.identity, device)
    with timings.phase("eval_dense"):
        dense_ppl = dense_perplexity(model, dense, job.ppl, eval_ids, bool(cfg.get("offload")))
        dense_zs = dense_zeroshot(model, tok, dense, job.zeroshot) if job.zeroshot is not None else None
    dense_params = count_parameters(model)
    report, rank_alloc = compress_in_place(cfg, model, layout, job.method, job.allocator, calib_ids, device,
                                           timings, loaded.identity, job.key)
    finetuned = None
    if job.lora is not None:  # SVD-LLM's optional LoRA stage (a dagger in the tables)
        with timings.phase("finetune"):
            finetuned = lora_finetune(model, tok, job.lora, device)
    quantized = None
    if job.quant is not None:  # GPTQ of the factors and the dense projections (Table 10)
        assert calib_ids is not None
        with timings.phase("quantize"):
            dense_linear = sum(d["m"] * d["n"] for d in report.layers.values())
            done = quantize_model(model, layout, calib_ids, job.quant, device, cfg.calib.batch_size)
            quantized = {**memory(model, layout, job.quant, done["linear_bits"], dense_linear),
                         "seconds": done["seconds"], "loss_total": sum(done["losses"].values())}
            for name, loss in done["losses"].items():  # per projection: gptq_loss (dense), gptq_loss_A/_B (factors)
                proj, _, factor = name.rpartition(".")
                if factor in ("A", "B") and proj in report.layers:
                    report.layers[proj][f"gptq_loss_{factor}"] = loss
                else:
                    report.layers[name]["gptq_loss"] = loss
    calibration = {
        "source": cfg.calib.source, "nsamples": cfg.calib.nsamples, "seqlen": cfg.calib.seqlen,
        "seed": cfg.calib.seed, "split": data_mod.split_mode(cfg.calib.source, cfg.calib.get("split")),
        "stream": report.stream, "tokens": report.tokens,
        "stats_cached_blocks": report.cached_stats_blocks, "resumed_from_block": report.resumed_from,
        "tokens_sha256": token_digest(calib_ids) if calib_ids is not None else None,
    }
    return Obtained(model, tok, loaded.identity, eval_ids, skipped, dense_ppl, dense_zs, calibration,
                    shapes=[(d["m"], d["n"], d["rank"]) for d in report.layers.values()], dense_params=dense_params,
                    params_extra={"rank_alloc": rank_alloc}, layers=report.layers, blocks=report.blocks,
                    finetune=finetuned, quant=quantized)


def load(cfg: DictConfig, job: Job, timings: Timings) -> Obtained:
    """Load the saved compressed model; its dense perplexity only if a compression run cached it."""
    saved = job.saved
    assert saved is not None
    with timings.phase("load"):
        model, tok, _ = load_compressed(saved.folder, dtype=DTYPES[cfg.model.dtype])
    with timings.phase("data"):
        eval_ids, skipped = eval_tokens(cfg, tok)
    dense_ppl = cached_perplexity(dense_model(cfg, saved.identity, resolve_device(cfg.device)), job.ppl, eval_ids)
    layers = saved.manifest["layers"]
    shapes = manifest_shapes(saved.manifest)
    dense_params = count_parameters(model) + sum(m * n - r * (m + n) for m, n, r in shapes if r is not None)
    manifest = saved.manifest
    return Obtained(model, tok, saved.identity, eval_ids, skipped, dense_ppl, None, manifest.get("calibration"),
                    shapes=shapes, dense_params=dense_params,
                    params_extra={"weights_bytes": sum(f.stat().st_size for f in saved.folder.glob("*.safetensors"))},
                    layers=layers, loaded_from={"folder": str(saved.folder), "manifest_sha256": saved.manifest_sha256,
                                                "record_key": manifest.get("record_key"),
                                                "git_commit": manifest.get("git_commit")})


def calibration_tokens(cfg: DictConfig, tok: Any) -> torch.Tensor:
    """The calibration windows; a hub source that cannot be read names the offline alternatives."""
    calib = cfg.calib
    try:
        return data_mod.calibration_ids(tok, calib.source, calib.nsamples, calib.seqlen, calib.seed,
                                        calib.get("path"), calib.get("split"))
    except data_mod.DataUnavailable as exc:
        if calib.source not in data_mod.HUB_SOURCES:
            raise
        raise data_mod.DataUnavailable(f"{exc}. Calibrate on the offline text (calib.source=wiki_books) or a "
                                       "local file (calib.source=local calib.path=/some/train.txt)") from exc


def check_manifest_ratio(folder: Path, manifest: dict[str, Any]) -> None:
    """The manifest's ratio must be the one its layers were planned with: the record is filed and tabled under
    it. Every plan keeps at most the uniform plan's parameters and misses them by less than one rank of one
    projection (the budget rule shared by every allocator); a ratio its layers do not meet is refused."""
    ratio = check_ratio(manifest["ratio"])
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


def existing_record(path: Path, force: bool, save: bool = False) -> dict[str, Any] | None:
    """The finished run's record, unless ``force`` (then None: run again).

    ``save=true`` on a recorded run whose model was not saved is refused (never exit 0 without doing what was
    asked): compressing again is the user's call, ``force=true``."""
    if not path.is_file() or force:
        return None
    record = read_json(path)
    if save:
        saved = record.get("saved_to")
        if not saved or not (Path(saved) / MANIFEST).is_file():
            raise ValueError(f"save=true, but this config's run is recorded ({path}) without a saved model "
                             f"(saved_to: {saved}); add force=true to compress it again and save it")
        log.info("the model is saved already: %s", saved)
    log.info("already done, skipping (force=true to rerun): %s", path)
    print(summary(record))
    return record


def eval_tokens(cfg: DictConfig, tok: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Token ids of every perplexity source that can be loaded here, and why the others were skipped."""
    eval_ids: dict[str, torch.Tensor] = {}
    skipped: dict[str, str] = {}
    ppl = cfg.eval.ppl
    for src in ppl.sources:
        try:
            eval_ids[src] = data_mod.tokenize(tok, data_mod.load_text(src, "eval", ppl.get("path"), ppl.get("split"),
                                                                      "eval.ppl"))
        except data_mod.DataUnavailable as exc:
            log.warning("perplexity on %s skipped: %s", src, exc)
            skipped[src] = str(exc)
    if not eval_ids and ppl.sources:
        raise data_mod.DataUnavailable(
            f"no perplexity source could be loaded: {skipped}. Evaluate on the offline text "
            "(eval.ppl.sources=[wiki_books]) or a local file (eval.ppl.sources=[local] eval.ppl.path=/some/test.txt)")
    return eval_ids, skipped


def engine_config(cfg: DictConfig, device: torch.device, identity: str, key: str) -> EngineConfig:
    calib = cfg.calib
    return EngineConfig(device=device, batch_size=calib.batch_size,
                        stats_dtype=PRECISIONS[calib.stats_dtype], stream=calib.propagate,
                        stream_device=torch.device(calib.stream_device) if calib.stream_device else None,
                        track_fidelity=calib.track_fidelity,
                        cache_dir=Path(cfg.results_dir) / "cache", model_identity=identity,
                        stats_device=torch.device(calib.stats_device) if calib.get("stats_device") else None,
                        reuse_stats=bool(calib.get("reuse_stats", False)),
                        resume_dir=resume_dir(cfg, key) if cfg.get("resume") else None, resume_key=key)


def resume_dir(cfg: DictConfig, key: str) -> Path:
    """Per-block checkpoints of the run with config key ``key`` (removed once its record is written)."""
    return Path(cfg.results_dir) / "resume" / key


def compress_in_place(cfg: DictConfig, model: nn.Module, layout: BlockLayout, method: Method,
                      allocator: Allocator | None, calib_ids: torch.Tensor | None, device: torch.device,
                      timings: Timings, identity: str, key: str) -> tuple[CompressionReport, str]:
    """Prepare the method, plan the ranks (the shared allocator's, the method's own or uniform), compress in
    place; returns the report (the allocator's per-projection diagnostics in its layers) and ``uniform``/``mixed``."""
    engine_cfg = engine_config(cfg, device, identity, key)
    ratio = float(cfg.ratio)
    with timings.phase("prepare"):
        plan: Plan | None
        if ratio == 0.0:  # quant=gptq of the dense model: every projection stays dense
            plan = Plan({p: None for p in projections(model, layout)})
        else:
            method.prepare(model, layout, calib_ids, engine_cfg)
            if allocator is not None:
                assert calib_ids is not None
                plan = allocator.plan(model, layout, ratio, calib_ids, engine_cfg, method)
            else:
                own = method.allocate(model, layout, ratio, calib_ids, engine_cfg)
                plan = None if own is None else Plan(own)
        rank_alloc = "dense" if ratio == 0.0 else "uniform" if plan is None else "mixed"
        ranks = plan_ranks(model, layout, ratio) if plan is None else plan.ranks
        check_plan(model, layout, ranks)
    report = compress_model(model, method, ranks, calib_ids, engine_cfg)
    if plan is not None:
        for name, diag in plan.diagnostics.items():
            report.layers[name].update(diag)
    timings.phases.update(report.timings)
    return report, rank_alloc


# ------------------------------------------------------------------ evaluate
def evaluate(got: Obtained, job: Job, device: torch.device, offload: bool) -> dict[str, Any]:
    """Every evaluation of the compressed (or loaded) model: the record's ``metrics``."""
    with placed(got.model, device, offload):
        measured = perplexities(got.model, got.eval_ids, job.ppl, device, job.label)
    ppl: dict[str, dict[str, Any]] = {}
    for src, p in measured.items():
        if not math.isfinite(p.ppl):
            log.warning("compressed perplexity on %s is not finite (mean NLL %.2f)", src, p.nll)
        ppl[src] = {**got.dense_ppl.get(src, {}), "compressed": p.ppl, "compressed_nll": p.nll, "tokens": p.tokens,
                    "windows": p.windows}
    metrics: dict[str, Any] = {"ppl": ppl, "ppl_skipped": got.ppl_skipped}
    if job.zeroshot is not None:  # accuracies, average, drop vs dense
        metrics["zeroshot"] = zeroshot.evaluate(got.model, got.tokenizer, job.zeroshot, got.dense_zeroshot)
    return metrics


# ------------------------------------------------------------------ record
def save(cfg: DictConfig, job: Job, got: Obtained, env: dict[str, Any]) -> Path:
    """``save=true``: the compressed model and its manifest, beside the record's stem under ``models/``."""
    return save_compressed(got.model.to("cpu"), got.tokenizer, Path(cfg.results_dir) / "models" / run_stem(job.config), {
        "base": got.identity, "method": job.config["method"], "ratio": cfg.ratio, "calibration": got.calibration,
        "record_key": job.key, "git_commit": env["git_commit"],
        **({"dense_layers": dense} if (dense := {f"{name}": {"out_features": m, "in_features": n}
                                                   for name, m, n in got.dense_projections}) else {})})


def build_record(job: Job, got: Obtained, metrics: dict[str, Any], params: dict[str, Any], timings: Timings,
                 saved_to: Path | None, env: dict[str, Any]) -> dict[str, Any]:
    """The run's record. Its fields keep the order records have always had (the JSON is written in insertion
    order): ``loaded_from`` only in ``load=`` records, right after ``config``; ``finetune`` only in compression
    records."""
    record: dict[str, Any] = {"schema": SCHEMA_VERSION, "key": job.key, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "config": job.config}
    if got.loaded_from is not None:
        record["loaded_from"] = got.loaded_from
    record.update(model={"identity": got.identity, "model_type": got.model.config.model_type},
                  calibration=got.calibration, metrics=metrics, params=params, timings=timings.phases,
                  memory=peak_memory())
    if got.loaded_from is None:
        record["finetune"] = got.finetune
    if got.quant is not None:
        record["quant"] = got.quant
    record.update(layers=got.layers, blocks=got.blocks, saved_to=None if saved_to is None else str(saved_to), env=env)
    return record


def manifest_shapes(manifest: dict[str, Any]) -> list[tuple[int, int, int | None]]:
    """``(m, n, rank)`` of every planned projection of a saved folder (``None``: planned to stay dense)."""
    return ([(d["out_features"], d["in_features"], d["rank"]) for d in manifest["layers"].values()]
            + [(d["out_features"], d["in_features"], None) for d in manifest.get("dense_layers", {}).values()])


def parameter_counts(shapes: list[tuple[int, int, int | None]], model_compressed: int,
                     model_dense: int) -> dict[str, Any]:
    """Achieved ratios from the planned projections' ``(m, n, rank)`` (``None``: kept dense), and of the model."""
    lin_dense = sum(m * n for m, n, _ in shapes)
    lin_comp = sum(m * n if r is None else r * (m + n) for m, n, r in shapes)
    return {"linears_dense": lin_dense, "linears_compressed": lin_comp, "linears_ratio": 1 - lin_comp / lin_dense,
            "model_dense": model_dense, "model_compressed": model_compressed,
            "model_ratio": 1 - model_compressed / model_dense}


def peak_memory() -> dict[str, float]:
    memory = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        memory["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return memory


def write_record(cfg: DictConfig, path: Path, record: dict[str, Any], name: str) -> None:
    """Write the record atomically and mirror it to W&B."""
    with wandb_run(OmegaConf.to_container(cfg.logger), record["config"], name, Path(cfg.results_dir)) as wb:
        write_json_atomic(path, record)
        if wb is not None:
            wb.log(flatten({k: record[k] for k in ("metrics", "params", "timings", "memory")}))
            wb.summary["record_path"] = str(path)
    log.info("record: %s", path)
    print(summary(record))


def summary(record: dict[str, Any]) -> str:
    cfg, p, t = record["config"], record["params"], record["timings"]
    lines = [f"== {cfg['model']['name']} | {cfg['method']['name']} | ratio {cfg['ratio']} | seed {cfg['seed']}"]
    if record.get("loaded_from"):
        lines[0] += f" | loaded from {record['loaded_from']['folder']}"
    for src, m in record["metrics"]["ppl"].items():
        dense = "n/a" if m.get("dense") is None else f"{m['dense']:.3f}"  # a loaded model: dense PPL only if cached
        lines.append(f"   PPL {src:<10} dense {dense}  compressed {m.get('compressed', float('nan')):.3f}  ({m['windows']} windows)")
    for src, why in record["metrics"].get("ppl_skipped", {}).items():
        lines.append(f"   PPL {src:<10} skipped: {why}")
    lines += zeroshot.summary_lines(record["metrics"].get("zeroshot"))
    lines.append(f"   params: projections {p['linears_ratio']:.4f} removed; whole model {p['model_ratio']:.4f} removed "
                 f"({p['model_compressed']:,} of {p['model_dense']:,})")
    lines.append("   time [s]: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    lines.append(f"   peak RSS {record['memory']['peak_rss_mb']:.0f} MB")
    return "\n".join(lines)
