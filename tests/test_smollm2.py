"""End to end on the embedded SmolLM2-135M (real weights, grouped-query attention 9/3), small calibration."""

import math

import pytest

from saes.pipeline import run

from .conftest import make_cfg

pytestmark = pytest.mark.slow
SMALL = ["model=smollm2_135m", "calib.nsamples=8", "calib.seqlen=128", "eval.ppl.seqlen=256",
         "eval.ppl.max_windows=4", "ratio=0.2"]


def test_saes_beats_plain_svd_on_the_embedded_model(tmp_path):
    saes = run(make_cfg(*SMALL, "method=saes", "calib.track_fidelity=true", results_dir=tmp_path))
    svd = run(make_cfg(*SMALL, "method=svd", results_dir=tmp_path))
    assert saes["model"]["identity"].startswith("gguf:") and saes["model"]["model_type"] == "llama"
    ppl_s, ppl_v = (r["metrics"]["ppl"]["wiki_books"] for r in (saes, svd))
    assert ppl_s["dense"] == ppl_v["dense"] and 5 < ppl_s["dense"] < 100
    assert math.isfinite(ppl_s["compressed"]) and ppl_s["dense"] < ppl_s["compressed"] < ppl_v["compressed"]
    p = saes["params"]
    assert 0.2 <= p["linears_ratio"] < 0.21 and p["model_ratio"] < p["linears_ratio"]  # embeddings kept
    assert len(saes["layers"]) == 30 * 7
    k = saes["layers"]["model.layers.14.self_attn.k_proj"]
    assert (k["m"], k["n"], k["rank"]) == (192, 576, 115)
    assert all(0.25 <= d["beta"] <= 0.75 for d in saes["layers"].values())
    cos = [b["cosine_fp"] for b in saes["blocks"]]
    assert len(cos) == 30 and all(0 < c <= 1 for c in cos)


def test_saved_smollm2_reloads_with_identical_logits(tmp_path):
    import torch
    from omegaconf import OmegaConf

    from baselines.svd import SVD
    from saes.checkpoint import load_compressed, save_compressed
    from saes.engine import EngineConfig, compress_model, layout_for, plan_ranks
    from saes.models import load_model

    loaded = load_model(OmegaConf.load("conf/model/smollm2_135m.yaml"))
    model = loaded.model
    compress_model(model, SVD("svd"), plan_ranks(model, layout_for(model), 0.4), None,
                   EngineConfig(device=torch.device("cpu")))
    folder = save_compressed(model, loaded.tokenizer, tmp_path / "smollm2-svd", {"method": "svd"})
    again, _, manifest = load_compressed(folder)
    ids = torch.arange(100, 356).view(2, 128)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    # tied embeddings are stored once: the file holds the achieved parameter count in fp32
    size = (folder / "model.safetensors").stat().st_size
    assert manifest["parameters"] * 4 <= size < manifest["parameters"] * 4 + 1_000_000
