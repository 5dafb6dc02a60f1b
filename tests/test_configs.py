"""Every config in conf/ composes, and the paper's models resolve to their hub ids."""


import pytest

from saes.core.method import Method
from saes.runs.job import build_method

from .conftest import CONF, make_cfg

GROUPS = ["model", "method", "calib", "eval", "logger", "quant", "finetune"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_composes(group, option):
    cfg = make_cfg(f"{group}={option}")
    assert cfg[group] is not None
    if group == "method":
        assert isinstance(build_method(cfg), Method)
        assert cfg.method.name == option


@pytest.mark.parametrize("option,hub_id", [
    ("llama7b", "huggyllama/llama-7b"), ("llama13b", "huggyllama/llama-13b"), ("llama30b", "huggyllama/llama-30b"),
    ("llama2_7b", "meta-llama/Llama-2-7b-hf"), ("llama3_8b", "meta-llama/Meta-Llama-3-8B"),
    ("qwen25_7b", "Qwen/Qwen2.5-7B"),
])
def test_paper_models_compose_with_their_hub_ids(option, hub_id):
    cfg = make_cfg(f"model={option}", "method=saes", "ratio=0.4")
    assert cfg.model.source == "hub" and cfg.model.hub_id == hub_id and cfg.model.name == option
    assert make_cfg(f"model={option}", "model.path=/data/w").model.path == "/data/w"


def test_default_config_is_saes_on_the_embedded_model():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config")
    assert (cfg.model.name, cfg.method.name, cfg.ratio, cfg.logger.mode) == ("smollm2_135m", "saes", 0.2, "offline")
    assert (cfg.method.aces.beta_min, cfg.method.aces.beta_max, cfg.method.aces.space) == (0.25, 0.75, "beta")
