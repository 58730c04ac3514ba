"""``splitunet phantom`` through typer's CliRunner, on a tiny shape."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from splitunet.cli import app


def test_phantom_command_writes_a_brats2023_cohort(tmp_path: Path) -> None:
    out = tmp_path / "cohort"
    result = CliRunner().invoke(
        app,
        ["phantom", "--out", str(out), "--cases", "2", "--seed", "4", "--layout", "brats2023", "--shape", "32,32,24"],
    )
    assert result.exit_code == 0, result.output
    assert "2 phantom cases" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["BraTS-GLI-00000-000", "BraTS-GLI-00001-000"]
    files = sorted(p.name for p in (out / "BraTS-GLI-00001-000").iterdir())
    assert files == [f"BraTS-GLI-00001-000-{s}.nii.gz" for s in ("seg", "t1c", "t1n", "t2f", "t2w")]
    seg = nib.load(out / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-seg.nii.gz")
    assert seg.shape == (32, 32, 24)
    assert set(np.unique(np.asarray(seg.dataobj)).tolist()) == {0, 1, 2, 3}  # 2023: ET = 3
    assert nib.aff2axcodes(seg.affine) == ("L", "P", "S")


def test_phantom_command_ras_uncompressed_with_start_index(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "phantom", "--out", str(tmp_path), "--cases", "1", "--shape", "32x32x24",
            "--start-index", "7", "--orientation", "RAS", "--no-compress",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    t1 = nib.load(tmp_path / "BraTS2021_00007" / "BraTS2021_00007_t1.nii")
    assert nib.aff2axcodes(t1.affine) == ("R", "A", "S")
    assert t1.get_data_dtype() == np.int16


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cases", "1", "--shape", "32,32"], "--shape"),
        (["--cases", "1", "--shape", "8,8,8"], "shape"),
        (["--cases", "1", "--shape", "32,32,24", "--layout", "brats2019"], "layout"),
        (["--cases", "0", "--shape", "32,32,24"], "cases"),
    ],
)
def test_phantom_command_rejects_bad_options(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["phantom", "--out", str(tmp_path / "x"), *args])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "x").exists()
