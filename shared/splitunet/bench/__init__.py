"""Benchmarks, run as modules (``python -m splitunet.bench.<name>``); none of them is a test."""
