"""Text sources, the seeded calibration sampler and the perplexity protocol."""

import math
import socket
from typing import Any, Callable

import pytest
import torch
from torch import nn

from saes.evaluation.perplexity import NonFiniteLogits, finite_logits, perplexity, windows
from saes.inputs import data
from saes.inputs.models import tiny_llama


def test_calibration_windows_are_seeded_distinct_and_from_the_calibration_part(tokenizer):
    a = data.calibration_ids(tokenizer, "wiki_books", 6, 64, seed=3)
    b = data.calibration_ids(tokenizer, "wiki_books", 6, 64, seed=3)
    c = data.calibration_ids(tokenizer, "wiki_books", 6, 64, seed=4)
    assert a.shape == (6, 64) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(r.tolist()) for r in a}) == 6
    calib = data.tokenize(tokenizer, data.load_text("wiki_books", "calib"))
    stream = calib.tolist()
    for row in a.tolist():  # every window is a slot of the calibration stream
        starts = [i for i in range(0, len(stream) - 63, 64) if stream[i:i + 64] == row]
        assert starts


def test_calibration_and_evaluation_parts_are_disjoint_and_deduplicated():
    docs = data.wiki_books_documents()
    calib, ev = data.hash_split(docs, "calib"), data.hash_split(docs, "eval")
    assert not set(calib) & set(ev)
    assert len(calib) == len(set(calib)) and len(ev) == len(set(ev))
    assert set(calib) | set(ev) == {d for d in docs if d.strip()}
    assert 0.15 < len(ev) / (len(ev) + len(calib)) < 0.25


def test_local_text_file_source(tmp_path, tokenizer):
    paragraphs = [f"Paragraph {i} talks about topic {i * 7}." * 5 for i in range(200)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs + paragraphs[:20]))  # duplicates are dropped
    calib, ev = data.load_text("local", "calib", str(path), "hash"), data.load_text("local", "eval", str(path), "hash")
    assert len(calib.docs) + len(ev.docs) == 200 and not set(calib.docs) & set(ev.docs)
    assert data.calibration_ids(tokenizer, "local", 4, 32, 0, str(path)).shape == (4, 32)
    with pytest.raises(data.DataUnavailable, match="no such file"):
        data.load_text("local", "calib", str(tmp_path / "missing.txt"))
    for not_a_file in ("/dev/null", str(tmp_path)):  # a device, a folder: named as such, not as missing
        with pytest.raises(data.DataUnavailable, match="is not a regular file"):
            data.load_text("local", "eval", not_a_file, key="eval.ppl")
        with pytest.raises(ValueError, match=f"calib.path='{not_a_file}' is not a regular file"):
            data.check_source("calib", "local", not_a_file)


def test_too_little_text_is_a_clear_error(tokenizer, tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("\n\n".join(f"tiny {i}" for i in range(50)))
    with pytest.raises(data.DataUnavailable, match="lower calib.nsamples"):
        data.calibration_ids(tokenizer, "local", 1000, 512, 0, str(path))


@pytest.mark.parametrize("source", ["wikitext2", "ptb", "c4"])
def test_hub_sources_offline_fail_fast_without_touching_the_network(monkeypatch, source):
    """With HF_HUB_OFFLINE=1 a hub source raises the offline error and never opens a connection or resolves a name."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts: list[str] = []

    def recorder(name: str) -> Callable[..., Any]:
        def attempt(*args: Any, **kwargs: Any) -> Any:
            attempts.append(f"{name}{args!r}")
            raise OSError(f"test: {name} is disabled")
        return attempt

    monkeypatch.setattr(socket, "create_connection", recorder("socket.create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", recorder("socket.getaddrinfo"))
    monkeypatch.setattr(socket.socket, "connect", recorder("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", recorder("socket.connect_ex"))
    # a reachability probe cached by an earlier test would hide an attempt; clear it before and after
    probe_cache_clear = getattr(getattr(data, "_hub_reachable", None), "cache_clear", lambda: None)
    probe_cache_clear()
    try:
        with pytest.raises(data.DataUnavailable, match="hub is offline or unreachable"):
            data.load_text(source, "eval")
    finally:
        probe_cache_clear()
    assert attempts == []


class Uniform(nn.Module):
    """Equal logits over the vocabulary: perplexity must be exactly the vocabulary size."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, use_cache=False):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()


def test_perplexity_protocol_windows_and_value():
    ids = torch.arange(1000) % 50
    w = windows(ids, 128)
    assert w.shape == (7, 128) and torch.equal(w.flatten(), ids[:896])  # last partial window dropped
    assert windows(ids, 128, max_windows=3).shape == (3, 128)
    p = perplexity(Uniform(50), ids, 128, batch_size=2)
    assert p.windows == 7 and p.tokens == 7 * 127
    assert p.ppl == pytest.approx(50.0) and p.nll == pytest.approx(math.log(50))
    with pytest.raises(ValueError, match="fewer than one window"):
        windows(ids[:100], 128)


class Sure(Uniform):
    """All the probability on token 0, in ``dtype``: the NLL of any other token is about ``margin`` nats."""

    def __init__(self, vocab: int, margin: float, dtype: torch.dtype = torch.float32):
        super().__init__(vocab)
        self.margin, self.dtype = margin, dtype

    def forward(self, input_ids, use_cache=False):
        logits = torch.zeros(*input_ids.shape, self.vocab, dtype=self.dtype)
        logits[..., 0] = self.margin
        return type("Out", (), {"logits": logits})()


def test_overflowed_logits_are_a_named_error_and_a_huge_finite_nll_is_a_measurement():
    ids = 1 + torch.arange(600) % 49  # never token 0
    sure = perplexity(Sure(50, 1000.0), ids, 128)
    assert sure.ppl == math.inf and sure.nll == pytest.approx(1000.0)  # exp(1000) overflows; the NLL is recorded
    with pytest.raises(NonFiniteLogits, match=r"ppl dense x, windows 0\.\.1: the logits are not finite in the "
                                              r"model's torch\.float16.*set model\.dtype=bfloat16"):
        perplexity(Sure(50, 7e4, torch.float16), ids, 128, batch_size=2, desc="ppl dense x")  # 7e4 > 65504: inf
    # a real model whose activations overflow float16: the final norm's gain takes them past 65504
    model = tiny_llama().to(torch.float16).eval()
    model.model.norm.weight.data *= 3e4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(NonFiniteLogits, match=r"ppl, window 0: .*torch\.float16"):
        perplexity(model, ids, 128, 4)


def test_the_logit_check_takes_nan_and_plus_inf_and_leaves_masked_tokens():
    ids = torch.zeros(2, 8, dtype=torch.long)
    for margin, bad in ((-math.inf, False), (1e4, False), (math.inf, True), (math.nan, True)):
        model = Sure(50, margin)
        with finite_logits(model, "zero-shot x"):
            if bad:
                with pytest.raises(NonFiniteLogits, match="zero-shot x: .*torch.float32"):
                    model(ids)
            else:
                model(ids)
        assert not model._forward_hooks


def test_wiki_qa_is_the_wikipedia_part_of_wiki_books_split_the_same_way():
    calib, evaluation = data.load_text("wiki_qa", "calib").docs, data.load_text("wiki_qa", "eval").docs
    assert calib and evaluation and not set(calib) & set(evaluation)
    assert set(calib) <= set(data.load_text("wiki_books", "calib").docs)
    assert set(evaluation) <= set(data.load_text("wiki_books", "eval").docs)
    assert data.split_mode("wiki_qa", None) == "hash"
