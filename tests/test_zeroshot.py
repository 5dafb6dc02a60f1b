"""Zero-shot accuracy through lm-evaluation-harness: local task copies, evaluation, record, bad input.

Everything runs offline on the tiny random model with a few examples per task; a socket guard
fails any test that tries to open a network connection.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import math
import socket
import sys

import pytest
import torch

from experiments import records

from saes.evaluation import tasks as task_data, zeroshot
from saes.inputs import data
from saes.inputs.models import tiny_llama
from saes.runs import pipeline
from saes.runs.job import zeroshot_plan
from saes.runs.pipeline import run, summary

from .conftest import make_cfg

# The original datasets' sizes (the splits lm-eval evaluates), independent of the code under test.
ORIGINAL = {"openbookqa": ("test", 500), "arc_easy": ("test", 2376), "arc_challenge": ("test", 1172),
            "winogrande": ("validation", 1267), "hellaswag": ("validation", 10042),
            "piqa": ("validation", 1838), "boolq": ("validation", 3270), "lambada_openai": ("test", 5153)}


@pytest.fixture(scope="module", autouse=True)
def offline_cache(tmp_path_factory):
    """A fresh converted-data cache for this module, the offline switches on, all restored afterwards."""
    import datasets
    import huggingface_hub

    mp = pytest.MonkeyPatch()
    mp.setenv("SAES_CACHE", str(tmp_path_factory.mktemp("saes-cache")))
    for var in data.OFFLINE_SWITCHES:
        mp.setenv(var, "1")
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    yield
    mp.undo()


@pytest.fixture
def no_network(monkeypatch):
    """Record and refuse every attempt to open a network connection."""
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def test_local_copies_have_the_original_rows_and_splits():
    assert {n for n, s in task_data.TASKS.items() if s.local is not None} == set(ORIGINAL)
    assert set(task_data.PAPER_TASKS) - set(ORIGINAL) == {"mathqa"}  # the one paper task with no offline copy
    for name, (split, rows) in ORIGINAL.items():
        path = task_data.local_data(name)
        lines = path.read_text(encoding="utf-8").splitlines()
        assert len(lines) == rows, name
        assert path.name == f"{name}.{split}.jsonl"
        yaml_cfg = task_data.local_task_yaml(name, path)
        assert yaml_cfg["dataset_kwargs"]["data_files"] == {split: str(path)}
        assert {yaml_cfg["validation_split"], yaml_cfg["test_split"]} == {split, None}
        assert yaml_cfg["include"].endswith(task_data.TASKS[name].lm_eval_yaml)  # lm-eval's own definition
        row = json.loads(lines[0])
        if name.startswith("arc") or name == "openbookqa":
            assert row["answerKey"] in row["choices"]["label"]
            assert len(row["choices"]["label"]) == len(row["choices"]["text"]) >= 3
    assert not list(task_data.local_dir().glob(".tmp-*"))


@pytest.mark.parametrize("request_set,arrow,question_key", [
    ("arc_easy/rc_0shot", "ai2_arc/ARC-Easy/validation", "question"),
    ("arc_challenge/rc_0shot", "ai2_arc/ARC-Challenge/validation", "question"),
    ("openbookqa/rc_0shot", "openbookqa/main/validation", "question_stem"),
])
def test_decoded_request_files_reproduce_the_hub_rows(request_set, arrow, question_key):
    """The ARC / OpenBookQA test splits exist only as OLMES request files: decoding the validation
    request files must give back, row by row, the validation splits that ship as Hugging Face datasets."""
    decoded = list(task_data.olmes_choice_rows(request_set, question_key))
    original = list(task_data._arrow_rows(arrow)())
    assert len(decoded) == len(original) > 200
    for d, o in zip(decoded, original):
        assert d["id"] == o["id"] and d[question_key] == o[question_key]
        assert d["choices"]["text"] == o["choices"]["text"]
        assert d["choices"]["label"].index(d["answerKey"]) == o["choices"]["label"].index(o["answerKey"].strip())


def test_boolq_copy_matches_google_boolq():
    decoded = list(task_data._boolq_rows())
    google = list(task_data._arrow_rows("boolq/none/validation")())
    assert len(decoded) == len(google) == 3270
    for d, g in zip(decoded, google):
        assert d["question"] == g["question"] and d["passage"].endswith(g["passage"])
        assert d["label"] == int(g["answer"])


def test_simple_evaluate_runs_every_local_task_offline_without_network(tokenizer, no_network):
    plan = zeroshot.Plan(tasks=tuple(ORIGINAL), offline=True, limit=2, batch_size=8)
    scores, failed = zeroshot.accuracy(tiny_llama().eval(), tokenizer, plan)
    assert not failed and set(scores) == set(ORIGINAL)
    for name, (split, rows) in ORIGINAL.items():
        s = scores[name]
        assert (s["n"], s["n_total"], s["split"]) == (2, rows, split), name  # lm-eval sees the full split
        assert 0.0 <= s["metrics"]["acc"] <= 1.0
        assert s["data"].startswith("local:")
    for name in ("openbookqa", "arc_easy", "arc_challenge", "hellaswag", "piqa"):
        assert "acc_norm" in scores[name]["metrics"]  # lm-eval reports both for these
    assert "acc_norm" not in scores["winogrande"]["metrics"] and "perplexity" in scores["lambada_openai"]["metrics"]
    assert no_network == []


def test_a_run_records_per_task_accuracy_average_drop_and_the_missing_task(tmp_path, no_network, monkeypatch):
    calls: list[list[str]] = []
    real = zeroshot.accuracy

    def counting(model, tok, plan, names=None, on_result=None, device=None):
        calls.append(list(names))
        return real(model, tok, plan, names, on_result, device)

    monkeypatch.setattr(zeroshot, "accuracy", counting)
    over = ["method=svd", "eval=zeroshot", "eval.zeroshot.tasks=[arc_easy,mathqa,piqa]", "eval.zeroshot.limit=4",
            "eval.zeroshot.offline=true"]
    rec = run(make_cfg(*over, results_dir=tmp_path))
    zs = rec["metrics"]["zeroshot"]
    assert calls == [["arc_easy", "piqa"], ["arc_easy", "piqa"]]  # dense, then compressed; mathqa never tried
    assert list(zs["tasks"]) == ["arc_easy", "piqa"] and list(zs["missing"]) == ["mathqa"]
    assert "no offline copy" in zs["missing"]["mathqa"]
    for t in zs["tasks"].values():
        assert t["n"] == 4 and {"acc", "acc_norm"} <= set(t["dense"]) and {"acc", "acc_norm"} <= set(t["compressed"])
    accs = [t["compressed"]["acc"] for t in zs["tasks"].values()]
    dense = [t["dense"]["acc"] for t in zs["tasks"].values()]
    assert zs["average"]["compressed"] == pytest.approx(sum(accs) / 2)
    assert zs["average"]["dense"] == pytest.approx(sum(dense) / 2)
    assert zs["average_complete"] is False and zs["average_over"] == ["arc_easy", "piqa"]
    # the average's standard error from lm-eval's per-task ones (independent tasks): sqrt(se_1^2 + se_2^2) / 2
    se = [t["compressed"]["acc_stderr"] for t in zs["tasks"].values()]
    assert zs["average_stderr"]["compressed"] == pytest.approx(math.hypot(*se) / 2)
    assert records.mean_acc_stderr(rec, ["arc_easy", "piqa"]) == pytest.approx(zs["average_stderr"]["compressed"])
    if zs["average"]["dense"]:
        assert zs["relative_drop"] == pytest.approx(1 - zs["average"]["compressed"] / zs["average"]["dense"])
    assert zs["lm_eval_version"] == md.version("lm_eval") and zs["limit"] == 4 and zs["data"] == "local"
    on_disk = json.loads(next((tmp_path / "runs").rglob("*.json")).read_text())
    assert on_disk["metrics"]["zeroshot"] == json.loads(json.dumps(zs))
    text = summary(rec)
    assert "0-shot arc_easy" in text and "mathqa" in text and "missing" in text and "INCOMPLETE" in text
    assert len(list((tmp_path / "dense" / "tiny_llama").glob("zeroshot-*.json"))) == 2

    calls.clear()  # a rerun reads the dense accuracies from the cache: only the compressed model is scored
    again = run(make_cfg(*over, "force=true", results_dir=tmp_path))
    assert calls == [["arc_easy", "piqa"]]
    assert {n: t["dense"] for n, t in again["metrics"]["zeroshot"]["tasks"].items()} == \
        {n: t["dense"] for n, t in zs["tasks"].items()}
    assert no_network == []


@pytest.mark.parametrize("override,match", [
    ("eval.zeroshot.tasks=[arc_easy,nosuch]", "unknown zero-shot task"),
    ("eval.zeroshot.limit=0", "limit must be a positive integer"),
    ("eval.zeroshot.limit=0.5", "limit must be a positive integer"),
    ("eval.zeroshot.batch_size=0", "batch_size must be a positive integer"),
    ("eval.zeroshot.offline=maybe", "offline must be auto, true or false"),
    ("eval.zeroshot.average_metric=f1", "average_metric"),
    ("eval.zeroshot.tasks=[mathqa]", "none of the zero-shot tasks .* mathqa"),
    ("eval.zeroshot.offline=false", "offline=false but the hub is switched off"),
])
def test_bad_zero_shot_input_fails_before_the_model_is_loaded(tmp_path, monkeypatch, override, match):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded despite bad input")

    monkeypatch.setattr("saes.runs.pipeline.load_model", no_load)
    with pytest.raises(ValueError, match=match):
        run(make_cfg("method=svd", "eval=zeroshot", override, results_dir=tmp_path))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "dense").exists()


def test_a_model_that_is_not_a_causal_lm_is_refused(tokenizer):
    from transformers import BertConfig, BertForMaskedLM

    bert = BertForMaskedLM(BertConfig(vocab_size=258, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32))
    with pytest.raises(TypeError, match="causal LM.*BertForMaskedLM"):
        zeroshot.accuracy(bert, tokenizer, zeroshot.Plan(tasks=("piqa",), limit=1))


def test_logits_that_overflow_float16_stop_the_evaluation_by_name(tokenizer, no_network):
    """lm-eval would turn inf logits into NaN log-likelihoods and score them; the run stops, naming the fix."""
    from saes.evaluation.perplexity import NonFiniteLogits

    model = tiny_llama().to(torch.float16).eval()
    model.model.norm.weight.data *= 3e4  # the final norm's outputs pass 65504
    with pytest.raises(NonFiniteLogits, match=r"zero-shot piqa: .*torch\.float16.*model\.dtype=bfloat16"):
        zeroshot.accuracy(model, tokenizer, zeroshot.Plan(tasks=("piqa",), offline=True, limit=2))
    assert not model._forward_hooks  # the check is removed with the evaluation


def test_offline_is_decided_without_a_network_timeout_and_switched_once_by_the_run(no_network, monkeypatch):
    import datasets
    import huggingface_hub

    assert zeroshot.resolve_offline("auto") is True  # the env switch answers; no connection test
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # as if imported before going offline
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    cfg = make_cfg("eval=zeroshot", "eval.zeroshot.offline=true")
    p = zeroshot_plan(cfg.eval)
    assert p is not None and p.offline and p.tasks == task_data.PAPER_TASKS[:-1] and "mathqa" in p.missing
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # planning decides, it switches nothing
    assert pipeline.prepare(cfg).zeroshot == p  # the run switches the hub off, once, before anything loads
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True
    assert sys.modules["datasets"].config.HF_DATASETS_OFFLINE is True
    assert no_network == []


def test_configs_paper_runs_the_seven_tasks_and_the_default_job_none():
    assert tuple(make_cfg("eval=paper").eval.zeroshot.tasks) == task_data.PAPER_TASKS
    assert list(make_cfg("eval=paper").eval.ppl.sources) == ["wikitext2", "ptb", "c4"]
    assert zeroshot_plan(make_cfg().eval) is None  # eval=ppl: perplexity only
    assert zeroshot_plan(make_cfg("eval=zeroshot", "eval.zeroshot.tasks=[]").eval) is None
    assert zeroshot.plan([]) is None and zeroshot.plan(None) is None


def test_hub_mode_indexes_only_the_folders_of_the_tasks_asked_for():
    from lm_eval.tasks import TaskManager

    folders = task_data.task_folders(["arc_easy", "mathqa"], offline=False)
    assert [f.name for f in folders] == ["arc", "mathqa"]
    manager = TaskManager(include_path=[str(f) for f in folders], include_defaults=False)
    assert {"arc_easy", "mathqa"} <= set(manager.all_subtasks) and len(manager.all_tasks) < 10


def test_the_stderr_of_a_mean_combines_independent_task_errors_and_needs_every_one():
    assert zeroshot.stderr_of_mean([0.03, 0.04]) == pytest.approx(0.05 / 2)
    assert zeroshot.stderr_of_mean([0.03, None]) is None and zeroshot.stderr_of_mean([]) is None
    assert zeroshot.stderr_of_mean([float("nan")]) is None


def test_zero_shot_of_an_offloaded_model_equals_the_in_memory_one(tokenizer, no_network):
    """offload=true: lm-eval takes its device from the model, which accelerate's cpu_offload leaves on ``meta``;
    the scores must be the in-memory model's (the inputs go to the execution device)."""
    import torch

    from saes.evaluation.offload import placed

    plan = zeroshot.Plan(tasks=("piqa", "winogrande"), offline=True, limit=4, batch_size=8)
    model = tiny_llama().eval()
    plain, _ = zeroshot.accuracy(model, tokenizer, plan)
    with placed(model, torch.device("cpu"), offload=True):
        offloaded, _ = zeroshot.accuracy(model, tokenizer, plan, device=torch.device("cpu"))
    assert offloaded == plain
