"""Half precision end to end on the tiny model: ``model.dtype=bfloat16|float16`` through every method family,
perplexity, ``save=true``, ``load=``, the portable folder and ``quant=gptq``; and the named error when a factor
that is finite in float64 overflows the model's dtype.

Statistics and factorisation keep their own dtypes (``calib.stats_dtype``, ``method.compute_dtype``); factors
are cast to the model's dtype and checked finite after the cast (``saes.core.lowrank.cast_factors``).
The calibration and evaluation tokens are tokenized once for the module (the same for every run here).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

from saes.core.lowrank import FactorOverflow, LowRankLinear, cast_factors
from saes.core.method import Factors, Method
from saes.engine.config import EngineConfig
from saes.engine.layout import layout_for, plan_ranks
from saes.engine.loop import compress_model
from saes.runs import pipeline
from saes.runs.checkpoint import load_compressed
from saes.runs.pipeline import run

from .conftest import calib_batch, make_cfg
from .test_portable import LOAD, outside

FAMILIES = ["saes", "svdllm", "asvd", "adasvd", "ercsvd", "dipsvd"]
HALF = ["bfloat16", "float16"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]  # make gpu-check runs the CUDA ones
_TOKENS: dict[str, object] = {}


@pytest.fixture(autouse=True)
def tokenized_once(monkeypatch):
    """Every run here reads the same windows of wiki_books: tokenize them once (7 s each time otherwise)."""
    calib, evals = pipeline.calibration_tokens, pipeline.eval_tokens

    def cached(name, fn):
        def wrapper(cfg, tok):
            key = f"{name}:{cfg.calib.nsamples}x{cfg.calib.seqlen}:{cfg.calib.seed}"
            if key not in _TOKENS:
                _TOKENS[key] = fn(cfg, tok)
            return _TOKENS[key]
        return wrapper

    monkeypatch.setattr(pipeline, "calibration_tokens", cached("calib", calib))
    monkeypatch.setattr(pipeline, "eval_tokens", cached("eval", evals))


def half_cfg(dtype: str, *overrides: str, results_dir, device: str = "cpu"):
    return make_cfg(f"model.dtype={dtype}", "ratio=0.4", "resume=false", f"device={device}", *overrides,
                    results_dir=results_dir)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("method", FAMILIES)
def test_every_method_family_compresses_and_evaluates_in_half_precision(tmp_path, dtype, method, device):
    rec = run(half_cfg(dtype, f"method={method}", results_dir=tmp_path, device=device))
    ppl = rec["metrics"]["ppl"]["wiki_books"]
    assert math.isfinite(ppl["dense"]) and math.isfinite(ppl["compressed"]) and ppl["compressed"] > 1
    assert rec["config"]["model"]["dtype"] == dtype
    assert any(d["rank"] is not None for d in rec["layers"].values())
    assert rec["params"]["model_compressed"] < rec["params"]["model_dense"]


# The passes outside the block-by-block engine, each of which moves the whole model or its own state across devices
# (where the reviews of the never-run CUDA paths found device mixes): float16 on CUDA, at tiny settings.
BEYOND_ENGINE = {
    "dobisvd": ("method=dobisvd", "method.dobi.windows=4", "method.dobi.seqlen=64", "method.dobi.select_windows=2",
                "method.dobi.epochs=2", "method.dobi.accum=2", "method.dobi.select_every=2"),
    "asvd_strs": ("method=asvd_strs", "method.strs.nsamples=2", "method.strs.seqlen=32"),
    "fwsvd": ("method=fwsvd",),
    "slicegpt": ("method=slicegpt", "ratio=0.2"),
    "llm_pruner": ("method=llm_pruner", "method.first=0", "method.last=0"),
    "lora": ("method=svdllm", "finetune=lora", "finetune.nsamples=8", "finetune.seqlen=64", "finetune.epochs=1",
             "finetune.batch_size=8"),
    "awq": ("method=saes", "quant=awq", "quant.group_size=32"),
}


@pytest.mark.cuda
@pytest.mark.parametrize("case", list(BEYOND_ENGINE))
def test_the_passes_beyond_the_engine_run_on_cuda_in_float16(tmp_path, case):
    rec = run(half_cfg("float16", *BEYOND_ENGINE[case], results_dir=tmp_path, device="cuda"))
    ppl = rec["metrics"]["ppl"]["wiki_books"]
    assert math.isfinite(ppl["dense"]) and math.isfinite(ppl["compressed"]) and ppl["compressed"] > 1
    assert rec["params"]["model_compressed"] < rec["params"]["model_dense"]


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_save_load_portable_round_trip(tmp_path, device):
    """bf16 factors saved, loaded by ``load=`` (same perplexity), by transformers alone on the CPU (same logits,
    bf16), and GPTQ of a bf16 compression."""
    rec = run(half_cfg("bfloat16", "method=svdllm", "save=true", results_dir=tmp_path, device=device))
    folder = rec["saved_to"]
    with safe_open(f"{folder}/model.safetensors", "pt") as f:
        factor = next(k for k in f.keys() if k.endswith("q_proj.A.weight"))
        assert f.get_tensor(factor).dtype == torch.bfloat16
    loaded = run(half_cfg("bfloat16", f"load={folder}", results_dir=tmp_path, device=device))
    assert loaded["metrics"]["ppl"]["wiki_books"]["compressed"] == rec["metrics"]["ppl"]["wiki_books"]["compressed"]

    model, _, _ = load_compressed(folder, dtype=torch.bfloat16)
    ids = [[256, 72, 101, 108, 108, 111, 32, 119]]
    with torch.no_grad():
        want = model(torch.tensor(ids)).logits
    done = outside(LOAD, [str(tmp_path), json.dumps(ids), folder], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())[folder]
    assert report["class"] == "SaesLowRankForCausalLM"
    got = torch.load(tmp_path / (folder.rsplit("/", 1)[1] + ".pt"))
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)

    quant = run(half_cfg("bfloat16", "method=svdllm", "quant=gptq", results_dir=tmp_path, device=device))
    assert math.isfinite(quant["metrics"]["ppl"]["wiki_books"]["compressed"]) and quant["quant"]


class Huge(Method):
    """Factors of entries 1e5 and 1e-5: finite in float64, bfloat16 and float32, not in float16 (max 65504)."""

    def __init__(self) -> None:
        super().__init__("huge", "float64")

    def factorize(self, W, stats, rank, layer=""):
        return Factors(torch.full((W.shape[0], rank), 1e5, dtype=W.dtype),
                       torch.full((rank, W.shape[1]), 1e-5, dtype=W.dtype))


def test_a_factor_that_overflows_float16_is_a_named_error_and_never_a_layer():
    model = pytest.importorskip("saes.inputs.models").tiny_llama().to(torch.float16).eval()
    ranks = plan_ranks(model, layout_for(model), 0.4)
    with pytest.raises(FactorOverflow, match=r"model\.layers\.0\.self_attn\.q_proj: A has non-finite entries in the "
                                             r"model's torch\.float16 .*model\.dtype=bfloat16"):
        compress_model(model, Huge(), ranks, calib_batch(), EngineConfig(device=torch.device("cpu")))
    assert type(model.get_submodule("model.layers.0.self_attn.q_proj")) is nn.Linear


def test_cast_factors_checks_the_cast_values():
    A, B = torch.full((4, 2), 1e5, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64)
    a, b = cast_factors(A, B, torch.bfloat16, "x")  # bf16 has float32's range
    assert a.dtype == b.dtype == torch.bfloat16 and torch.isfinite(a).all()
    with pytest.raises(FactorOverflow, match=r"x: A .*torch\.float16.*65504.*model\.dtype=bfloat16"):
        cast_factors(A, B, torch.float16, "x")
    with pytest.raises(FactorOverflow, match=r"y: B .*torch\.bfloat16.*set model\.dtype=float32"):
        cast_factors(B.T, torch.full((2, 2), 1e300, dtype=torch.float64), torch.bfloat16, "y")
    nan = torch.full((4, 2), float("nan"), dtype=torch.float64)
    with pytest.raises(Exception, match="before the cast") as err:
        cast_factors(nan, B, torch.float16, "z")
    assert not isinstance(err.value, FactorOverflow)


def test_loading_a_float32_folder_as_float16_refuses_overflowing_factors(tmp_path):
    """``load=`` casts a saved model to ``model.dtype``: factors beyond float16's range are named, not inf."""
    from saes.inputs.models import tiny_llama, tiny_tokenizer
    from saes.runs.checkpoint import save_compressed

    model = tiny_llama().eval()
    layer = LowRankLinear.from_factors(torch.full((64, 2), 1e6), torch.ones(2, 64))
    model.model.layers[0].self_attn.q_proj = layer
    save_compressed(model, tiny_tokenizer(), tmp_path / "m", {"base": "x", "method": "svd", "ratio": 0.4})
    with pytest.raises(FactorOverflow, match=r"model\.layers\.0\.self_attn\.q_proj: A .*torch\.float16"):
        load_compressed(tmp_path / "m", dtype=torch.float16)
