"""Leakage attacks replayed on recorded traffic: one protocol (:mod:`splitunet.attacks.base`), one module each."""
