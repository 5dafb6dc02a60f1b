"""Save / reload of compressed models: identical logits, and named errors on bad folders."""

import json

import pytest
import torch

from saes.engine.config import EngineConfig
from saes.engine.layout import layout_for, plan_ranks
from saes.engine.loop import compress_model
from saes.inputs.models import tiny_llama, tiny_tokenizer
from saes.runs.checkpoint import MANIFEST, CheckpointError, load_compressed, lowrank_layers, save_compressed
from saes.saes import SAES

from .conftest import calib_batch


def compressed(tie: bool = False):
    model = tiny_llama(tie_word_embeddings=tie).eval()
    ranks = plan_ranks(model, layout_for(model), 0.4)
    compress_model(model, SAES(), ranks, calib_batch(), EngineConfig(device=torch.device("cpu")))
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_gives_identical_logits(tmp_path, tie):
    model = compressed(tie)
    folder = save_compressed(model, tiny_tokenizer(), tmp_path / "m", {"method": "saes", "ratio": 0.4})
    loaded, tok, manifest = load_compressed(folder)
    ids = calib_batch(n=2, seqlen=40, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert manifest["method"] == "saes" and lowrank_layers(loaded) == manifest["layers"] == lowrank_layers(model)
    assert manifest["parameters"] == sum(p.numel() for p in loaded.parameters())
    weights = (folder / "model.safetensors").stat().st_size
    stored = sum(p.numel() for p in model.state_dict().values()) if not tie else manifest["parameters"]
    assert stored * 4 <= weights < stored * 4 + 64 * 1024  # fp32 tensors plus a small header
    assert tok("abc").input_ids == tiny_tokenizer()("abc").input_ids


def test_bad_folders_are_rejected_by_name(tmp_path):
    folder = save_compressed(compressed(), tiny_tokenizer(), tmp_path / "m", {})
    manifest = json.loads((folder / MANIFEST).read_text())

    def write(m):
        (folder / MANIFEST).write_text(json.dumps(m))

    write({**manifest, "layers": {**manifest["layers"], "model.layers.0.mlp.down_proj": {
        **manifest["layers"]["model.layers.0.mlp.down_proj"], "rank": 3}}})
    with pytest.raises(CheckpointError, match="wrong shapes.*down_proj"):
        load_compressed(folder)
    write({**manifest, "layers": {"model.layers.9.self_attn.q_proj": manifest["layers"]["model.layers.0.self_attn.q_proj"]}})
    with pytest.raises(CheckpointError, match="does not exist"):
        load_compressed(folder)
    write({**manifest, "model_type": "qwen2"})
    with pytest.raises(CheckpointError, match="two architectures"):
        load_compressed(folder)
    (folder / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_compressed(folder)
    (folder / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="no lowrank_manifest"):
        load_compressed(folder)
    with pytest.raises(CheckpointError, match="nothing compressed"):
        save_compressed(tiny_llama(), tiny_tokenizer(), tmp_path / "dense", {})


def test_run_with_save_writes_a_folder_that_reproduces_the_recorded_perplexity(tmp_path):
    from saes.evaluation.perplexity import perplexity
    from saes.inputs import data
    from saes.runs.pipeline import run

    from .conftest import make_cfg

    rec = run(make_cfg("method=saes", "save=true", results_dir=tmp_path))
    folder = tmp_path / "models" / "tiny_llama" / "saes" / "ratio0.2" / f"seed0-{rec['key']}"
    assert rec["saved_to"] == str(folder) and "save" in rec["timings"]
    model, tok, manifest = load_compressed(folder)
    assert manifest["calibration"]["tokens_sha256"] == rec["calibration"]["tokens_sha256"]
    assert manifest["record_key"] == rec["key"] and manifest["method"]["name"] == "saes"
    ids = data.tokenize(tok, data.load_text("wiki_books", "eval"))
    again = perplexity(model, ids, 128, 3)
    assert again.ppl == pytest.approx(rec["metrics"]["ppl"]["wiki_books"]["compressed"], rel=1e-6)
