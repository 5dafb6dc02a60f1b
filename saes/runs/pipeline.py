"""compress -> evaluate -> record, for one resolved config (what ``run.py`` calls)."""

from __future__ import annotations

import hashlib
import logging
import math
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from saes.core.lowrank import check_ratio, count_parameters, rank_for_ratio
from saes.core.method import DTYPES as PRECISIONS, Method
from saes.engine.config import CompressionReport, EngineConfig
from saes.engine.layout import BlockLayout, check_plan, layout_for, plan_ranks
from saes.engine.loop import compress_model, needs_calibration
from saes.engine.resume import owned, release
from saes.evaluation import zeroshot
from saes.evaluation.offload import placed
from saes.evaluation.perplexity import perplexity
from saes.inputs import data as data_mod
from saes.inputs.models import DTYPES, load_model, model_config, model_identity, resolve_device, skeleton
from saes.io import digest, read_json, write_json_atomic
from saes.runs.checkpoint import MANIFEST, CheckpointError, load_compressed, read_manifest, save_compressed
from saes.runs.finetune import check_finetune, lora_finetune
from saes.runs.records import SCHEMA_VERSION, config_key, environment, flatten, record_path, run_stem, wandb_run

log = logging.getLogger(__name__)


def validate(cfg: DictConfig) -> Method:
    """Cheap checks of everything a run needs, before loading anything heavy."""
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
    try:
        method = instantiate(cfg.method)
    except InstantiationException as exc:  # unwrap Hydra's wrapper so the message names the problem
        cause = exc.__cause__
        if isinstance(cause, (ValueError, TypeError)):
            raise ValueError(f"invalid method config {cfg.method.get('name')!r}: {cause}") from exc
        raise
    if not isinstance(method, Method):
        raise TypeError(f"method config {cfg.method.name!r} does not build a saes.core.method.Method")
    return method


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
    zeroshot.plan(cfg.eval)  # eval.zeroshot: bad input fails here; offline switches set before datasets/lm-eval load
    resolve_device(cfg.device)


def check_int(key: str, value: Any, minimum: int | None = None) -> int:
    """``value`` of config key ``key`` as an int (not a bool, not a string), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        need = "an integer" + (f" >= {minimum}" if minimum is not None else "")
        raise ValueError(f"{key} must be {need}; got {value!r}")
    return value


def check_ranks_before_loading(cfg: DictConfig) -> None:
    """The uniform rank plan of ``ratio`` from the model's config alone (shapes on the meta device): a ratio
    that rounds a rank to 0 is refused before the weights load, the dense evaluation and any pre-pass. The
    uniform plan's total is every method's budget, so it must exist whatever the allocation."""
    plan_ranks_for(skeleton(model_config(cfg.model)), float(cfg.ratio))


def plan_ranks_for(model: nn.Module, ratio: float) -> dict[str, int]:
    return plan_ranks(model, layout_for(model), ratio)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one job; returns its record (the existing one if it was already done and not forced)."""
    t_start = time.perf_counter()
    if cfg.get("load"):
        return run_loaded(cfg, t_start)
    method = validate(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    key = config_key(resolved)
    path = record_path(cfg.results_dir, resolved)
    done = existing_record(path, cfg.force, bool(cfg.save))
    if done is not None:
        return done
    check_ranks_before_loading(cfg)
    # Another live process compressing this config is refused before anything loads; a failure from here on
    # gives the claim up (finished blocks stay for the rerun).
    folder = resume_dir(cfg, key) if cfg.get("resume") else None
    with owned(folder):
        record = compress_and_evaluate(cfg, method, resolved, key, path, t_start)
    if folder is not None:
        release(folder)
        shutil.rmtree(folder, ignore_errors=True)  # the run is recorded: its checkpoints are done with
    return record


def compress_and_evaluate(cfg: DictConfig, method: Method, resolved: dict[str, Any], key: str, path: Path,
                          t_start: float) -> dict[str, Any]:
    """Load, evaluate dense, compress, evaluate compressed, write the record (which it returns)."""
    device = resolve_device(cfg.device)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    loaded = load_model(cfg.model)
    model, tok = loaded.model, loaded.tokenizer
    layout = layout_for(model)
    timings["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    calib_ids = None
    if needs_calibration(method, cfg.calib.track_fidelity):
        try:
            calib_ids = data_mod.calibration_ids(tok, cfg.calib.source, cfg.calib.nsamples, cfg.calib.seqlen,
                                                 cfg.calib.seed, cfg.calib.get("path"), cfg.calib.get("split"))
        except data_mod.DataUnavailable as exc:
            if cfg.calib.source not in data_mod.HUB_SOURCES:
                raise
            raise data_mod.DataUnavailable(f"{exc}. Calibrate on the offline text (calib.source=wiki_books) or a "
                                           "local file (calib.source=local calib.path=/some/train.txt)") from exc
    eval_ids, skipped = eval_tokens(cfg, tok)
    timings["data"] = time.perf_counter() - t0

    metrics: dict[str, Any] = {"ppl": {}, "ppl_skipped": skipped}
    t0 = time.perf_counter()
    metrics["ppl"] = dense_perplexity(cfg, model, loaded.identity, eval_ids, device)
    zeroshot.dense(cfg, model, tok, loaded.identity, device, metrics)  # eval.zeroshot (cached); no-op when off
    timings["eval_dense"] = time.perf_counter() - t0

    dense_params = count_parameters(model)
    report, rank_alloc = compress(cfg, model, layout, method, calib_ids, device, timings, loaded.identity, key)
    finetuned = None
    if cfg.get("finetune"):  # SVD-LLM's optional LoRA stage (a dagger in the tables)
        t0 = time.perf_counter()
        finetuned = lora_finetune(model, tok, cfg.finetune, device)
        timings["finetune"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    evaluate(cfg, model, tok, eval_ids, device, metrics, label=method.name)
    timings["eval_compressed"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    params = {**parameter_counts([(d["m"], d["n"], d["rank"]) for d in report.layers.values()],
                                 count_parameters(model), dense_params), "rank_alloc": rank_alloc}
    env = environment()
    calibration = {
        "source": cfg.calib.source, "nsamples": cfg.calib.nsamples, "seqlen": cfg.calib.seqlen,
        "seed": cfg.calib.seed, "split": data_mod.split_mode(cfg.calib.source, cfg.calib.get("split")),
        "stream": report.stream, "tokens": report.tokens,
        "stats_cached_blocks": report.cached_stats_blocks, "resumed_from_block": report.resumed_from,
        "tokens_sha256": data_mod.token_digest(calib_ids) if calib_ids is not None else None,
    }
    saved_to = None
    if cfg.save:
        t0 = time.perf_counter()
        saved_to = save_compressed(model.to("cpu"), tok, Path(cfg.results_dir) / "models" / run_stem(resolved), {
            "base": loaded.identity, "method": resolved["method"], "ratio": cfg.ratio, "calibration": calibration,
            "record_key": key, "git_commit": env["git_commit"]})
        timings["save"] = time.perf_counter() - t0
    record = {
        "schema": SCHEMA_VERSION,
        "key": key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": resolved,
        "model": {"identity": loaded.identity, "model_type": model.config.model_type},
        "calibration": calibration,
        "metrics": metrics,
        "params": params,
        "timings": timings,
        "memory": peak_memory(),
        "finetune": finetuned,
        "layers": report.layers,
        "blocks": report.blocks,
        "saved_to": None if saved_to is None else str(saved_to),
        "env": env,
    }
    write_record(cfg, path, record, f"{cfg.model.name}/{method.name}/r{cfg.ratio}/s{cfg.seed}")
    return record


def run_loaded(cfg: DictConfig, t_start: float) -> dict[str, Any]:
    """``load=<folder>``: evaluate a saved compressed model (no calibration, no compression) and record it.

    The record lives beside the compression records of the manifest's method and ratio, named
    ``loaded-<key>.json`` (``key`` hashes the config as evaluated plus the manifest's SHA-256), so
    it never overwrites the record of the run that made the folder.
    """
    validate_eval(cfg)
    if cfg.save:
        raise ValueError("save=true with load=<folder>: the folder is already saved; drop one of them")
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
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    method_cfg = manifest["method"] if isinstance(manifest["method"], dict) else {"name": str(manifest["method"])}
    config = {**{k: v for k, v in resolved.items() if k != "calib"}, "load": str(folder), "method": method_cfg,
              "ratio": manifest["ratio"]}  # what made the weights; calibration comes from the manifest
    manifest_sha = hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest()
    key = config_key({**config, "manifest_sha256": manifest_sha})
    path = record_path(cfg.results_dir, config).with_name(f"loaded-{key}.json")
    done = existing_record(path, cfg.force)
    if done is not None:
        return done

    device = resolve_device(cfg.device)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model, tok, _ = load_compressed(folder, dtype=DTYPES[cfg.model.dtype])
    timings["load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    eval_ids, skipped = eval_tokens(cfg, tok)
    timings["data"] = time.perf_counter() - t0
    metrics: dict[str, Any] = {"ppl": {}, "ppl_skipped": skipped}
    for src, ids in eval_ids.items():  # the dense perplexity only if a compression run cached it
        protocol = dense_protocol(cfg, identity, src, ids, device)
        cache = dense_ppl_cache(cfg, protocol)
        metrics["ppl"][src] = {"dense": read_json(cache)["ppl"] if cache.is_file() else None,
                               "tokens_sha256": protocol["tokens"]}
    t0 = time.perf_counter()
    evaluate(cfg, model, tok, eval_ids, device, metrics, label=f"{method_cfg['name']} (loaded)")
    timings["eval_compressed"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    layers = manifest["layers"]
    compressed = count_parameters(model)
    shapes = [(d["out_features"], d["in_features"], d["rank"]) for d in layers.values()]
    params = parameter_counts(shapes, compressed, compressed + sum(m * n - r * (m + n) for m, n, r in shapes))
    params["weights_bytes"] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    record = {
        "schema": SCHEMA_VERSION,
        "key": key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
        "loaded_from": {"folder": str(folder), "manifest_sha256": manifest_sha,
                        "record_key": manifest.get("record_key"), "git_commit": manifest.get("git_commit")},
        "model": {"identity": identity, "model_type": model.config.model_type},
        "calibration": manifest.get("calibration"),
        "metrics": metrics,
        "params": params,
        "timings": timings,
        "memory": peak_memory(),
        "layers": layers,
        "blocks": [],
        "saved_to": None,
        "env": environment(),
    }
    write_record(cfg, path, record, f"{cfg.model.name}/{method_cfg['name']}/r{manifest['ratio']}/loaded")
    return record


def check_manifest_ratio(folder: Path, manifest: dict[str, Any]) -> None:
    """The manifest's ratio must be the one its layers were planned with: the record is filed and tabled under
    it. Every plan keeps at most the uniform plan's parameters and misses them by less than one rank of one
    projection (the budget rule shared by every allocator); a ratio its layers do not meet is refused."""
    ratio = check_ratio(manifest["ratio"])
    shapes = [(d["out_features"], d["in_features"], d["rank"]) for d in manifest["layers"].values()]
    if not shapes:
        raise CheckpointError(f"{folder / MANIFEST} lists no low-rank layer")
    kept = sum(r * (m + n) for m, n, r in shapes)
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


def dense_protocol(cfg: DictConfig, identity: str, src: str, ids: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """Everything a dense perplexity depends on (its cache key)."""
    ppl_cfg = cfg.eval.ppl
    return {"model": identity, "dtype": cfg.model.dtype, "device": device.type, "source": src,
            "tokens": data_mod.token_digest(ids), "seqlen": ppl_cfg.seqlen, "max_windows": ppl_cfg.max_windows}


def dense_ppl_cache(cfg: DictConfig, protocol: dict[str, Any]) -> Path:
    return Path(cfg.results_dir) / "dense" / str(cfg.model.name) / f"{protocol['source']}-{digest(protocol)}.json"


def dense_perplexity(cfg: DictConfig, model: nn.Module, identity: str, eval_ids: dict[str, torch.Tensor],
                     device: torch.device) -> dict[str, dict[str, Any]]:
    """Dense perplexity per source, computed once per model, text and protocol (cached as JSON)."""
    ppl_cfg = cfg.eval.ppl
    out: dict[str, dict[str, Any]] = {}
    with placed(model, device, bool(cfg.get("offload"))):
        for src, ids in eval_ids.items():
            protocol = dense_protocol(cfg, identity, src, ids, device)
            cache = dense_ppl_cache(cfg, protocol)
            if cache.is_file():
                dense = read_json(cache)
            else:
                dense = {**perplexity(model, ids, ppl_cfg.seqlen, ppl_cfg.max_windows, ppl_cfg.batch_size, device,
                                      desc=f"ppl dense {src}").as_dict(), "protocol": protocol}
                write_json_atomic(cache, dense)
            out[src] = {"dense": dense["ppl"], "tokens_sha256": protocol["tokens"], "windows": dense["windows"]}
    model.to("cpu")
    return out


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


def compress(cfg: DictConfig, model: nn.Module, layout: BlockLayout, method: Method, calib_ids: torch.Tensor | None,
             device: torch.device, timings: dict[str, float], identity: str, key: str) -> tuple[CompressionReport, str]:
    """Prepare the method, plan the ranks, compress in place; returns the report and ``uniform``/``mixed``."""
    engine_cfg = engine_config(cfg, device, identity, key)
    t0 = time.perf_counter()
    method.prepare(model, layout, calib_ids, engine_cfg)
    ranks = method.allocate(model, layout, float(cfg.ratio), calib_ids, engine_cfg)
    rank_alloc = "uniform" if ranks is None else "mixed"
    ranks = plan_ranks(model, layout, float(cfg.ratio)) if ranks is None else ranks
    check_plan(model, layout, ranks)
    timings["prepare"] = time.perf_counter() - t0
    report = compress_model(model, method, ranks, calib_ids, engine_cfg)
    timings.update(report.timings)
    return report, rank_alloc


def evaluate(cfg: DictConfig, model: nn.Module, tok: Any, eval_ids: dict[str, torch.Tensor], device: torch.device,
             metrics: dict[str, Any], label: str) -> None:
    """Every evaluation of a compressed model, into ``metrics`` (shared by compression runs and ``load=``)."""
    ppl_cfg = cfg.eval.ppl
    with placed(model, device, bool(cfg.get("offload"))):
        for src, ids in eval_ids.items():
            p = perplexity(model, ids, ppl_cfg.seqlen, ppl_cfg.max_windows, ppl_cfg.batch_size, device,
                           desc=f"ppl {label} {src}")
            if not math.isfinite(p.ppl):
                log.warning("compressed perplexity on %s is not finite (mean NLL %.2f)", src, p.nll)
            metrics["ppl"].setdefault(src, {}).update(compressed=p.ppl, compressed_nll=p.nll, tokens=p.tokens,
                                                      windows=p.windows)
    zeroshot.compressed(cfg, model, tok, metrics)  # eval.zeroshot: accuracies, average, drop vs dense; no-op when off


def parameter_counts(shapes: list[tuple[int, int, int]], model_compressed: int, model_dense: int) -> dict[str, Any]:
    """Achieved ratios from the low-rank layers' ``(m, n, rank)``, and of the whole model."""
    lin_dense = sum(m * n for m, n, _ in shapes)
    lin_comp = sum(r * (m + n) for m, n, r in shapes)
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
