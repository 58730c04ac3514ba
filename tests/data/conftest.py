"""Fixtures of the data tests; the case generators live in ``tests/conftest.py`` (the ``brats`` fixture)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def cohort2021(tmp_path: Path, brats) -> Path:
    """Three complete BraTS 2021 cases (.nii.gz, RAS)."""
    root = tmp_path / "brats2021"
    brats.write_cohort(root, 3, "brats2021")
    return root
