"""Fixtures of the Kubernetes tests: each overlay rendered once per session from a copy of ``k8s/``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from manifests import K8S, Rendered, fill_secrets, render


@pytest.fixture(scope="session")
def k8s_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``k8s/`` copied to a temporary folder, with throwaway credentials and certificates in its secrets/."""
    copy = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, copy, ignore=shutil.ignore_patterns("secrets"))
    fill_secrets(copy)
    return copy


@pytest.fixture(scope="session")
def rendered_overlays(k8s_copy: Path) -> dict[str, Rendered]:
    """Every overlay, rendered lazily and cached for the session."""
    return _Cache(k8s_copy)


class _Cache(dict):
    def __init__(self, k8s: Path) -> None:
        super().__init__()
        self.k8s = k8s

    def __missing__(self, overlay: str) -> Rendered:
        value = Rendered(overlay, render(self.k8s, overlay))
        self[overlay] = value
        return value
