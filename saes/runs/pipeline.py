"""One run of one resolved config (what ``run.py`` calls), in five steps:

validate -> key / skip -> obtain the model (compress it, or load it from ``load=``) -> evaluate -> record.

The first two are :mod:`saes.runs.job` (everything that can be checked from the config is checked there,
before anything heavy loads); this module runs the :class:`Job`. Below ``saes.runs`` the library takes typed
values (:class:`PplSettings`, :class:`zeroshot.Plan`, :class:`LoraSettings`, :class:`EngineConfig`), never
the whole ``DictConfig``.
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
from omegaconf import DictConfig, OmegaConf
from torch import nn

from saes.core.lowrank import count_parameters
from saes.core.method import DTYPES as PRECISIONS, Method
from saes.core.pruning import Pruner
from saes.core.slicegpt import Slicer
from saes.engine.allocators import Allocator, Plan
from saes.engine.config import CompressionReport, EngineConfig
from saes.engine.layout import BlockLayout, check_plan, layout_for, plan_ranks, projections
from saes.engine.loop import compress_model, needs_calibration
from saes.engine.prune import plan_structures, prune_model
from saes.engine.resume import owned, release
from saes.engine.slicing import plan_width, slice_model
from saes.engine.structure import block_table, pruned_layers
from saes.evaluation import zeroshot
from saes.evaluation.dense import DenseModel, cached_perplexity, dense_perplexity, dense_zeroshot
from saes.evaluation.offload import placed
from saes.evaluation.perplexity import perplexities
from saes.inputs import data as data_mod
from saes.inputs.models import DTYPES, load_model, resolve_device
from saes.io import read_json, token_digest, write_json_atomic
from saes.runs import tracking
from saes.runs.checkpoint import MANIFEST, load_compressed, save_compressed
from saes.runs.finetune import lora_finetune
from saes.runs.job import Job, buffer_budget, check_ranks_before_loading, manifest_shapes, model_spec, prepare
from saes.runs.planner import plan_run
from saes.runs.quantize import memory, quantize_model
from saes.runs.records import SCHEMA_VERSION, environment, run_stem

log = logging.getLogger(__name__)


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
    with owned(claim), tracking.track(cfg, job):  # the W&B run: opened now, finished with the record or as failed
        got = compress(cfg, job, timings) if job.saved is None else load(cfg, job, timings)
        with timings.phase("eval_compressed"):
            metrics = evaluate(got, job, resolve_device(cfg.device), bool(cfg.get("offload")))
        timings.total()
        params = {**parameter_counts(got.shapes, count_parameters(got.model), got.dense_params, got.kept_linears),
                  **got.params_extra}
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
    quant: dict[str, Any] | None = None  # quant=gptq|awq: memory and losses (GPTQ) or scale groups (AWQ)
    loaded_from: dict[str, Any] | None = None  # a load= run
    kept_linears: int | None = None  # a pruned model: linear weights kept (its shapes' ranks are None)
    pruned: dict[str, Any] | None = None  # a pruned model: pruned_layers and structure for its manifest

    @property
    def dense_projections(self) -> list[tuple[str, int, int]]:
        """``(name, m, n)`` of the projections the plan left dense."""
        return [(name, d["m"], d["n"]) for name, d in self.layers.items()
                if d.get("rank", 0) is None and "kept_m" not in d]


def dense_model(cfg: DictConfig, identity: str, device: torch.device) -> DenseModel:
    return DenseModel(Path(cfg.results_dir) / "dense" / str(cfg.model.name), identity, cfg.model.dtype, device)


def compress(cfg: DictConfig, job: Job, timings: Timings) -> Obtained:
    """Load the dense model, score it (cached), compress it in place, fine-tune it if asked."""
    assert job.method is not None
    device = resolve_device(cfg.device)
    with timings.phase("load"):
        loaded = load_model(model_spec(cfg.model))
        layout = layout_for(loaded.model)
    model, tok = loaded.model, loaded.tokenizer
    with timings.phase("data"):
        wants = (needs_calibration(job.method, cfg.calib.track_fidelity) or job.allocator is not None
                 or job.quant is not None)
        calib_ids = calibration_tokens(cfg, tok) if wants else None
        if job.allocator is not None:  # an allocator training on windows of its own length draws them (Dobi-SVD)
            job.allocator.use_text(lambda n, seqlen: calibration_tokens(cfg, tok, n, seqlen))
        eval_ids, skipped = eval_tokens(cfg, tok)
    dense = dense_model(cfg, loaded.identity, device)
    with timings.phase("eval_dense"):
        dense_ppl = dense_perplexity(model, dense, job.ppl, eval_ids, bool(cfg.get("offload")))
        dense_zs = (dense_zeroshot(model, tok, dense, job.zeroshot, bool(cfg.get("offload")))
                    if job.zeroshot is not None else None)
    dense_params = count_parameters(model)
    pruned, allocation = None, None
    if isinstance(job.method, Pruner):  # structures removed instead of factors (saes.engine.prune)
        base = {name: (*model.get_submodule(name).weight.shape, model.get_submodule(name).bias is not None)
                for name in projections(model, layout)}
        engine_cfg = engine_config(cfg, device, loaded.identity, job.key)
        with timings.phase("prepare"):  # the budget and the structure plan (FLAP: every block scored first)
            plan = plan_structures(model, job.method, float(cfg.ratio), calib_ids, engine_cfg)
        report, structure = prune_model(model, job.method, float(cfg.ratio), calib_ids, engine_cfg, plan)
        timings.phases.update(report.timings)
        rank_alloc = "structured"
        pruned = {"pruned_layers": pruned_layers(model, base), "structure": block_table(model, layout.layers),
                  "plan": structure}
    elif isinstance(job.method, Slicer):  # the residual stream rotated and sliced (saes.engine.slicing)
        base = {name: (*model.get_submodule(name).weight.shape, model.get_submodule(name).bias is not None)
                for name in projections(model, layout)}
        engine_cfg = engine_config(cfg, device, loaded.identity, job.key)
        with timings.phase("prepare"):
            width, structure = plan_width(model, job.method, float(cfg.ratio))
        assert calib_ids is not None
        sliced = slice_model(model, width, calib_ids, engine_cfg)
        report = CompressionReport(stream=job.method.stream, tokens=sliced.tokens, layers=sliced.layers,
                                   blocks=sliced.blocks, timings=sliced.timings)
        timings.phases.update(report.timings)
        rank_alloc = "sliced"
        structure["shortcut_parameters"] = sliced.shortcut_parameters
        pruned = {"pruned_layers": pruned_layers(model, base), "structure": block_table(model, layout.layers),
                  "plan": structure, "slicing": {**sliced.spec, **structure, "dense_parameters": dense_params}}
    else:
        report, rank_alloc, allocation = compress_in_place(cfg, model, layout, job.method, job.allocator, calib_ids,
                                                           device, timings, loaded.identity, job.key)
    finetuned = None
    if job.lora is not None:  # SVD-LLM's optional LoRA stage (a dagger in the tables)
        with timings.phase("finetune"):
            finetuned = lora_finetune(model, tok, job.lora, device)
    quantized = None
    if job.quant is not None:  # GPTQ or AWQ of the factors and the dense projections (Table 10, issue 28)
        assert calib_ids is not None
        with timings.phase("quantize"):
            dense_linear = sum(d["m"] * d["n"] for d in report.layers.values())
            done = quantize_model(model, layout, calib_ids, job.quant, device, cfg.calib.batch_size)
            quantized = {**memory(model, layout, job.quant, done["linear_bits"], dense_linear),
                         "seconds": done["seconds"], **done["summary"]}
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
        "engine_path": report.path, "staged_buffer_gb": report.staged_buffer_gb,
        "tokens_sha256": token_digest(calib_ids) if calib_ids is not None else None,
    }
    return Obtained(model, tok, loaded.identity, eval_ids, skipped, dense_ppl, dense_zs, calibration,
                    shapes=[(d["m"], d["n"], d["rank"]) for d in report.layers.values()], dense_params=dense_params,
                    params_extra={"rank_alloc": rank_alloc, **({"allocation": allocation} if allocation else {}),
                                  **({"structure": pruned["plan"]} if pruned else {}), **remap_memory(report.layers)},
                    layers=report.layers, blocks=report.blocks, finetune=finetuned, quant=quantized,
                    kept_linears=None if pruned is None else kept_linears(report.layers) + shortcut_parameters(pruned),
                    pruned=pruned)


def shortcut_parameters(manifest: dict[str, Any]) -> int:
    """The shortcut matrices a sliced model's blocks hold (linear weights beside its projections; 0 otherwise)."""
    return int((manifest.get("slicing") or {}).get("shortcut_parameters", 0))


def kept_linears(layers: dict[str, dict[str, Any]]) -> int:
    """Linear weights a pruned model keeps (``kept_m x kept_n`` per projection)."""
    return sum(d["kept_m"] * d["kept_n"] if "kept_m" in d else d["m"] * d["n"] for d in layers.values())


def remap_memory(layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{"remap": ...}`` when the method recorded a storage transform's bytes per layer (Dobi-SVD's remapping,
    ``method.remap=true``): its bytes beside the fp16 bytes of the same factors and of the dense projections. A
    memory figure, never a parameter count: the parameter budget is unchanged."""
    if not layers or any("remap_bytes" not in d for d in layers.values()):
        return {}
    remap = sum(int(d["remap_bytes"]) for d in layers.values())
    dense = sum(2 * d["m"] * d["n"] for d in layers.values())
    factors = sum(2 * d["rank"] * (d["m"] + d["n"]) for d in layers.values())
    return {"remap": {"bytes": remap, "fp16_factor_bytes": factors, "fp16_dense_bytes": dense,
                      "memory_ratio": remap / dense}}


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
    kept = None
    if manifest.get("pruned_layers"):  # a pruned model: its layers are the projections with their kept shapes
        pruned = manifest["pruned_layers"]
        layers = {name: {"m": d["base_out_features"], "n": d["base_in_features"], "rank": None,
                         "kept_m": d["out_features"], "kept_n": d["in_features"]} for name, d in pruned.items()}
        shapes = [(d["m"], d["n"], None) for d in layers.values()]
        kept = kept_linears(layers)
        dense_params = count_parameters(model) + sum(  # weights and biases each projection had, less what it has
            d["base_out_features"] * (d["base_in_features"] + d["base_bias"])
            - d["out_features"] * (d["in_features"] + d["bias"]) for d in pruned.values())
        if manifest.get("slicing"):  # shortcuts, a narrower embedding and an untied head: the dense count is recorded
            kept += shortcut_parameters(manifest)
            dense_params = int(manifest["slicing"]["dense_parameters"])
    return Obtained(model, tok, saved.identity, eval_ids, skipped, dense_ppl, None, manifest.get("calibration"),
                    shapes=shapes, dense_params=dense_params,
                    params_extra={"weights_bytes": sum(f.stat().st_size for f in saved.folder.glob("*.safetensors"))},
                    layers=layers, kept_linears=kept,
                    loaded_from={"folder": str(saved.folder), "manifest_sha256": saved.manifest_sha256,
                                 "record_key": manifest.get("record_key"), "git_commit": manifest.get("git_commit")})


def calibration_tokens(cfg: DictConfig, tok: Any, nsamples: int | None = None, seqlen: int | None = None
                       ) -> torch.Tensor:
    """The calibration windows (``nsamples`` x ``seqlen``: another draw of the same seeded sampler, default
    ``calib.*``); a hub source that cannot be read names the offline alternatives."""
    calib = cfg.calib
    try:
        return data_mod.calibration_ids(tok, calib.source, nsamples or calib.nsamples, seqlen or calib.seqlen,
                                        calib.seed, calib.get("path"), calib.get("split"))
    except data_mod.DataUnavailable as exc:
        if calib.source not in data_mod.HUB_SOURCES:
            raise
        raise data_mod.DataUnavailable(f"{exc}. Calibrate on the offline text (calib.source=wiki_books) or a "
                                       "local file (calib.source=local calib.path=/some/train.txt)") from exc


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
                        resume_dir=resume_dir(cfg, key) if cfg.get("resume") else None, resume_key=key,
                        max_buffer_bytes=buffer_budget(calib.get("max_buffer_gb", "auto")),
                        on_block=tracking.active().on_block)


def resume_dir(cfg: DictConfig, key: str) -> Path:
    """Per-block checkpoints of the run with config key ``key`` (removed once its record is written)."""
    return Path(cfg.results_dir) / "resume" / key


def compress_in_place(cfg: DictConfig, model: nn.Module, layout: BlockLayout, method: Method,
                      allocator: Allocator | None, calib_ids: torch.Tensor | None, device: torch.device,
                      timings: Timings, identity: str, key: str) -> tuple[CompressionReport, str, dict[str, Any]]:
    """Prepare the method, plan the ranks (the shared allocator's, the method's own or uniform), let the method see
    the final plan (:meth:`Method.prepare_ranks`), compress in place; returns the report (the allocator's
    per-projection diagnostics in its layers), ``uniform``/``mixed`` and the allocator's summary of its plan."""
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
        if ratio != 0.0:
            method.prepare_ranks(model, layout, ranks, calib_ids, engine_cfg,
                                 None if plan is None else plan.rank_ratio)
    report = compress_model(model, method, ranks, calib_ids, engine_cfg)
    if plan is not None:
        for name, diag in plan.diagnostics.items():
            report.layers[name].update(diag)
    timings.phases.update(report.timings)
    return report, rank_alloc, {} if plan is None else dict(plan.summary)


# ------------------------------------------------------------------ evaluate
def evaluate(got: Obtained, job: Job, device: torch.device, offload: bool) -> dict[str, Any]:
    """Every evaluation of the compressed (or loaded) model: the record's ``metrics``."""
    with placed(got.model, device, offload):
        measured = perplexities(got.model, got.eval_ids, job.ppl, device, job.label)
        zs = (zeroshot.evaluate(got.model, got.tokenizer, job.zeroshot, got.dense_zeroshot,
                                on_result=tracking.active().on_result, device=device)
              if job.zeroshot is not None else None)
    ppl: dict[str, dict[str, Any]] = {}
    for src, p in measured.items():
        if not math.isfinite(p.ppl):
            log.warning("compressed perplexity on %s overflows exp (mean NLL %.2f nats): recorded as inf", src, p.nll)
        ppl[src] = {**got.dense_ppl.get(src, {}), "compressed": p.ppl, "compressed_nll": p.nll, "tokens": p.tokens,
                    "windows": p.windows}
    metrics: dict[str, Any] = {"ppl": ppl, "ppl_skipped": got.ppl_skipped}
    if zs is not None:  # accuracies, average, drop vs dense
        metrics["zeroshot"] = zs
    return metrics


# ------------------------------------------------------------------ record
def save(cfg: DictConfig, job: Job, got: Obtained, env: dict[str, Any]) -> Path:
    """``save=true``: the compressed model and its manifest, beside the record's stem under ``models/``."""
    return save_compressed(got.model.to("cpu"), got.tokenizer, Path(cfg.results_dir) / "models" / run_stem(job.config), {
        "base": got.identity, "method": job.config["method"], "ratio": cfg.ratio, "calibration": got.calibration,
        "record_key": job.key, "git_commit": env["git_commit"], **(got.pruned or {}),
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


def parameter_counts(shapes: list[tuple[int, int, int | None]], model_compressed: int,
                     model_dense: int, kept: int | None = None) -> dict[str, Any]:
    """Achieved ratios from the planned projections' ``(m, n, rank)`` (``None``: kept dense), and of the model;
    ``kept``: the linear weights a pruned model keeps (its shapes say only the dense ``m, n``)."""
    lin_dense = sum(m * n for m, n, _ in shapes)
    lin_comp = kept if kept is not None else sum(m * n if r is None else r * (m + n) for m, n, r in shapes)
    return {"linears_dense": lin_dense, "linears_compressed": lin_comp, "linears_ratio": 1 - lin_comp / lin_dense,
            "model_dense": model_dense, "model_compressed": model_compressed,
            "model_ratio": 1 - model_compressed / model_dense}


def peak_memory() -> dict[str, float]:
    memory = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        memory["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return memory


def write_record(cfg: DictConfig, path: Path, record: dict[str, Any], name: str) -> None:
    """Write the record atomically (with its W&B run's id, when one is open) and mirror it to W&B."""
    record.update(tracking.active().record_fields())
    write_json_atomic(path, record)
    tracking.active().finish(record, path)
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
