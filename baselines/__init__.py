"""Baseline compression methods, each behind :class:`saes.method.Method`."""
