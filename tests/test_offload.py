"""Models larger than the GPU: evaluation with offloaded weights, statistics and streams kept on the CPU."""

import pytest
import torch

from saes.engine.config import EngineConfig
from saes.engine.layout import layout_for, plan_ranks
from saes.engine.loop import compress_model
from saes.evaluation.offload import placed
from saes.evaluation.perplexity import perplexity
from saes.inputs.models import tiny_llama
from saes.runs.pipeline import run
from saes.saes import SAES

from .conftest import calib_batch, make_cfg


@pytest.mark.parametrize("tie", [False, True])
def test_offloaded_evaluation_gives_the_same_perplexity_and_leaves_the_model_as_it_was(tie):
    model = tiny_llama(tie_word_embeddings=tie).eval()
    ids = calib_batch(n=1, seqlen=600, seed=2).flatten()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = perplexity(model, ids, 128, 3)
    with placed(model, torch.device("cpu"), offload=True):
        assert {p.device.type for p in model.parameters()} == {"meta"}  # weights live in the hooks' CPU copy
        assert perplexity(model, ids, 128, 3) == expected
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie


def test_a_run_with_offload_and_statistics_on_the_cpu_records_what_a_plain_run_records(tmp_path):
    """Perplexity and zero-shot (dense and compressed, lm-eval on the offloaded model) included."""
    zs = ("eval=zeroshot", "eval.zeroshot.tasks=[piqa]", "eval.zeroshot.limit=4", "eval.zeroshot.offline=true")
    plain = run(make_cfg("method=saes", *zs, results_dir=tmp_path / "plain"))
    low = run(make_cfg("method=saes", *zs, "offload=true", "calib.stats_device=cpu", "calib.stream_device=cpu",
                       results_dir=tmp_path / "low"))
    assert low["metrics"]["zeroshot"]["tasks"]["piqa"]["compressed"]["acc"] is not None
    for r in (low, plain):
        del r["metrics"]["zeroshot"]["seconds"]
    strip = lambda r: {k: {d: v for d, v in x.items() if d != "seconds"} for k, x in r["layers"].items()}  # noqa: E731
    assert low["metrics"] == plain["metrics"] and strip(low) == strip(plain)


class WhereAmI(SAES):
    """Checks, at every factorisation, that only the block being compressed is on the GPU."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, 0

    def factorize(self, W, stats, rank, layer=""):
        current = int(layer.split(".")[2])
        for i, block in enumerate(self.model.model.layers):
            assert {p.device.type for p in block.parameters()} == {"cuda" if i == current else "cpu"}, (i, layer)
        assert stats.H.device.type == "cuda"  # moved to the GPU for this group's factorisation only
        self.seen += 1
        return super().factorize(W, stats, rank, layer)


@pytest.mark.cuda
def test_on_a_gpu_only_the_current_block_is_there_and_the_factors_match_the_cpu_run():
    cpu_model, gpu_model = tiny_llama(num_hidden_layers=3).eval(), tiny_llama(num_hidden_layers=3).eval()
    ranks = plan_ranks(cpu_model, layout_for(cpu_model), 0.4)
    compress_model(cpu_model, SAES(), ranks, calib_batch(), EngineConfig(device=torch.device("cpu")))
    method = WhereAmI(gpu_model)
    compress_model(gpu_model, method, ranks, calib_batch(),
                   EngineConfig(device=torch.device("cuda"), stats_device=torch.device("cpu"),
                                stream_device=torch.device("cpu")))
    assert method.seen == 3 * 7
    assert {p.device.type for p in gpu_model.parameters()} == {"cpu"}
    ids = calib_batch(n=2, seqlen=40, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(gpu_model(ids).logits, cpu_model(ids).logits, rtol=1e-3, atol=1e-3)
