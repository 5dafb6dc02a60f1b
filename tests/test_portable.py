"""A saved folder leaves the harness: transformers and lm-eval's command line load it without this project.

Each check runs in a subprocess (``python -I``, cwd a temporary folder) whose first lines remove the
editable install's finder and every path holding the ``saes`` package, and assert that ``import saes``
fails: only the folder's own ``modeling_saes_lowrank.py`` (plus torch and transformers) builds the model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saes.core.lowrank import LowRankLinear, set_submodule
from saes.engine.config import EngineConfig
from saes.engine.layout import layout_for, plan_ranks
from saes.engine.loop import compress_model
from saes.evaluation import tasks as task_data, zeroshot
from saes.inputs.models import tiny_llama, tiny_tokenizer
from saes.runs.checkpoint import MANIFEST, PORTABLE_KEYS, PORTABLE_MODULE, load_compressed, save_compressed
from saes.saes import SAES

from .conftest import calib_batch

NO_PROJECT = '''\
import sys
from pathlib import Path

sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in (getattr(f, "__module__", "") or "")]
sys.path[:] = [p for p in sys.path if "__editable__" not in p and not (Path(p or ".") / "saes").is_dir()]
try:
    import saes  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    raise SystemExit(f"the SAES harness is importable here ({saes.__file__}): the check would prove nothing")
'''

LOAD = NO_PROJECT + '''
import json
import torch
from transformers import AutoModelForCausalLM

out, ids = Path(sys.argv[1]), torch.tensor(json.loads(sys.argv[2]))
report = {}
for folder in sys.argv[3:]:
    try:
        AutoModelForCausalLM.from_pretrained(folder)
        refused = None
    except ValueError as exc:
        refused = str(exc)
    model, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    with torch.no_grad():
        torch.save(model.eval()(ids).logits, out / (Path(folder).name + ".pt"))
    report[folder] = {"refused": refused, "class": type(model).__name__,
                      "info": {k: sorted(map(str, v)) for k, v in info.items()}}
(out / "report.json").write_text(json.dumps(report))
'''

LM_EVAL = NO_PROJECT + '''
from lm_eval.__main__ import cli_evaluate

sys.argv = ["lm_eval", *sys.argv[1:]]
sys.exit(cli_evaluate())
'''


def compressed(tie: bool) -> torch.nn.Module:
    model = tiny_llama(tie_word_embeddings=tie).eval()
    compress_model(model, SAES(), plan_ranks(model, layout_for(model), 0.4), calib_batch(),
                   EngineConfig(device=torch.device("cpu")))
    return model


def factorised(arch: str, config: str, rank: int = 8, **extra: object) -> torch.nn.Module:
    """A tiny random ``transformers.<arch>`` with every projection replaced by its rank-``rank`` truncated SVD."""
    import transformers

    cfg = getattr(transformers, config)(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=258,
                                        max_position_embeddings=512, **extra)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = getattr(transformers, arch)(cfg).eval()
    for name, dense in list(model.named_modules()):
        if name.rpartition(".")[2] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            u, s, vh = torch.linalg.svd(dense.weight.detach(), full_matrices=False)
            set_submodule(model, name, LowRankLinear.from_factors(u[:, :rank] * s[:rank], vh[:rank], dense.bias))
    return model


def outside(script: str, args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in an isolated interpreter (no project on the path), offline, in ``cwd``."""
    (cwd / "script.py").write_text(script)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "HF_MODULES_CACHE": str(cwd / "hf_modules"), "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-I", "script.py", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def logits_outside(folder: Path, ids: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    """The logits transformers alone (``trust_remote_code=True``, no project on the path) gives for ``folder`` on
    ``ids``, after checking it loaded the portable class with every weight in place."""
    work = tmp_path / "outside"
    work.mkdir()
    outside(LOAD, [str(work), json.dumps(ids.tolist()), str(folder)], work)
    got = json.loads((work / "report.json").read_text())[str(folder)]
    assert got["class"] == "SaesLowRankForCausalLM"
    assert got["info"]["missing_keys"] == got["info"]["unexpected_keys"] == got["info"]["mismatched_keys"] == []
    return torch.load(work / f"{folder.name}.pt")


@pytest.mark.slow
def test_transformers_alone_loads_the_folder_with_the_same_logits(tmp_path):
    ids = calib_batch(n=2, seqlen=40, seed=5)
    models = {**{f"llama-tie{t}": compressed(t) for t in (False, True)},  # SAES-SVD, as run.py save=true
              "qwen2": factorised("Qwen2ForCausalLM", "Qwen2Config"),  # q/k/v biases: A.bias
              "gemma3_text": factorised("Gemma3ForCausalLM", "Gemma3TextConfig", head_dim=16, sliding_window=16)}
    folders = [save_compressed(m, tiny_tokenizer(), tmp_path / name, {"method": "saes"}) for name, m in models.items()]
    config = json.loads((folders[0] / "config.json").read_text())
    assert config["model_type"] == "saes_lowrank" and config["architectures"] == ["SaesLowRankForCausalLM"]
    assert config["lowrank_base_model_type"] == "llama" and config["lowrank_base_architecture"] == "LlamaForCausalLM"
    assert config["lowrank_layers"] == json.loads((folders[0] / MANIFEST).read_text())["layers"]
    assert 'BASE_MODEL_TYPE = "llama"' in (folders[0] / f"{PORTABLE_MODULE}.py").read_text()

    work = tmp_path / "outside"
    work.mkdir()
    outside(LOAD, [str(work), json.dumps(ids.tolist()), *map(str, folders)], work)
    report = json.loads((work / "report.json").read_text())
    qwen2 = json.loads((folders[2] / "config.json").read_text())
    assert qwen2["lowrank_base_architecture"] == "Qwen2ForCausalLM" and qwen2["lowrank_layers"][
        "model.layers.0.self_attn.q_proj"]["bias"]
    for (name, model), folder in zip(models.items(), folders):
        got = report[str(folder)]
        assert got["class"] == "SaesLowRankForCausalLM"
        assert got["info"]["missing_keys"] == got["info"]["unexpected_keys"] == got["info"]["mismatched_keys"] == []
        assert "trust_remote_code=True" in got["refused"]  # no silent dense model with random projections
        with torch.no_grad():
            assert torch.equal(torch.load(work / f"{name}.pt"), model(ids).logits), name
        reloaded, _, _ = load_compressed(folder)  # the project's own loader never runs the folder's code
        with torch.no_grad():
            assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_folders_saved_before_the_portable_files_still_load(tmp_path):
    model = compressed(tie=False)
    folder = save_compressed(model, tiny_tokenizer(), tmp_path / "m", {})
    config = json.loads((folder / "config.json").read_text())
    base = {k: v for k, v in config.items() if k not in PORTABLE_KEYS}
    base.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (folder / "config.json").write_text(json.dumps(base))
    (folder / f"{PORTABLE_MODULE}.py").unlink()
    ids = calib_batch(n=1, seqlen=24, seed=3)
    with torch.no_grad():
        assert torch.equal(load_compressed(folder)[0](ids).logits, model(ids).logits)


@pytest.mark.slow
def test_lm_eval_command_line_scores_the_folder_like_the_in_memory_model(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setenv("SAES_CACHE", str(tmp_path / "cache"))  # the converted task data, fresh
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # offline, as a run sets it, restored afterwards
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    model = compressed(tie=True)
    tok = tiny_tokenizer()
    folder = save_compressed(model, tok, tmp_path / "model", {})
    plan = zeroshot.Plan(tasks=("arc_easy",), offline=True, limit=20, batch_size=8)
    in_memory, failed = zeroshot.accuracy(model, tok, plan)
    assert not failed and in_memory["arc_easy"]["n"] == 20

    (tasks,) = task_data.task_folders(["arc_easy"], offline=True)  # lm-eval's own task, reading the local copy
    work = tmp_path / "outside"
    work.mkdir()
    outside(LM_EVAL, ["--model", "hf", "--model_args", f"pretrained={folder},trust_remote_code=True",
                      "--tasks", "arc_easy", "--include_path", str(tasks), "--limit", "20", "--device", "cpu",
                      "--batch_size", "8", "--output_path", str(work / "results")], work)
    (results,) = (work / "results").rglob("results_*.json")
    cli = json.loads(results.read_text())
    assert cli["n-samples"]["arc_easy"]["effective"] == 20
    scores = {k.split(",")[0]: v for k, v in cli["results"]["arc_easy"].items() if k.endswith(",none")}
    for metric in ("acc", "acc_norm"):
        assert scores[metric] == in_memory["arc_easy"]["metrics"][metric], metric
