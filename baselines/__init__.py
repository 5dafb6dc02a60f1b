"""Baseline compression methods, each behind :class:`saes.core.method.Method`."""
