"""Vertical partition: each site gets only its modalities, the aggregator only the segmentations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from splitunet.cli.partition import partition_command
from splitunet.config import parse_sites
from splitunet.data.layout import discover_cases
from splitunet.data.loader import load_images, load_label_map
from splitunet.data.partition import partition_cohort, read_case_list, split_validation
from splitunet.errors import DataError


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.rglob("*") if not p.is_dir()}


@pytest.mark.parametrize("mode", ["link", "copy"])
@pytest.mark.parametrize("layout", ["brats2021", "brats2023"])
def test_each_party_gets_only_its_files(tmp_path: Path, brats, mode: str, layout: str) -> None:
    src = tmp_path / "brats"
    ids = brats.write_cohort(src, 4, layout)
    sep, names = (
        ("_", {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"})
        if layout == "brats2021"
        else (
            "-",
            {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"},
        )
    )
    out = tmp_path / "out"
    sites = parse_sites("a=t1,t1ce b=t2,flair")
    result = partition_cohort(src, out, sites, mode=mode)
    assert result.case_ids == tuple(ids) and result.validation == ()
    for site in sites:
        folder = out / "sites" / site.name
        expected = {f"{c}{sep}{names[m]}.nii.gz" for c in ids for m in site.modalities}
        assert _files(folder) == expected
        assert all(p.is_symlink() == (mode == "link") for p in folder.rglob("*.nii.gz"))
        cases = discover_cases(folder, require=site.modalities)
        assert list(cases) == ids
        assert all(c.modalities == site.modalities and c.seg is None for c in cases.values())
        # the site's copy loads exactly as the original
        orig = discover_cases(src)[ids[0]]
        np.testing.assert_array_equal(load_images(cases[ids[0]]).array, load_images(orig, site.modalities).array)
    agg = discover_cases(out / "aggregator", require=("seg",))
    assert _files(out / "aggregator") == {f"{c}{sep}seg.nii.gz" for c in ids}
    assert all(c.modalities == () for c in agg.values())
    np.testing.assert_array_equal(load_label_map(agg[ids[1]]), load_label_map(discover_cases(src)[ids[1]]))
    manifest = json.loads((out / "partition.json").read_text())
    assert manifest["sites"] == {"a": ["t1", "t1ce"], "b": ["t2", "flair"]}
    assert manifest["cases"] == 4 and manifest["mode"] == mode and manifest["layouts"] == [layout]
    assert read_case_list(out / "validation.txt") == ()


def test_validation_split_is_deterministic() -> None:
    ids = [f"c{i:03d}" for i in range(50)]
    val = split_validation(ids, 0.2, seed=1)
    assert len(val) == 10 and val == split_validation(list(reversed(ids)), 0.2, seed=1)
    assert val != split_validation(ids, 0.2, seed=2)
    assert split_validation(ids[:3], 0.01, seed=0) != ()  # at least one
    assert len(split_validation(ids[:2], 0.9, seed=0)) == 1  # never all
    with pytest.raises(ValueError, match="val_fraction"):
        split_validation(ids, 1.0, seed=0)


def test_skip_bad_cases_and_refuse_nonempty_out(tmp_path: Path, brats) -> None:
    src = tmp_path / "brats"
    ids = brats.write_cohort(src, 3)
    (src / ids[1] / f"{ids[1]}_seg.nii.gz").unlink()
    with pytest.raises(DataError, match=f"{ids[1]}: segmentation is missing"):
        partition_cohort(src, tmp_path / "o1")
    result = partition_cohort(src, tmp_path / "o2", on_bad_case="skip", val_fraction=0.5, seed=0)
    assert result.case_ids == (ids[0], ids[2]) and list(result.skipped) == [ids[1]]
    assert len(result.validation) == 1
    assert read_case_list(tmp_path / "o2" / "validation.txt") == result.validation
    assert not (tmp_path / "o2" / "sites" / "t1" / ids[1]).exists()
    assert json.loads((tmp_path / "o2" / "partition.json").read_text())["skipped"].keys() == {ids[1]}
    with pytest.raises(ValueError, match="not empty"):
        partition_cohort(src, tmp_path / "o2", on_bad_case="skip")
    with pytest.raises(ValueError, match=r"mode must be one of \['link', 'copy'\]"):
        partition_cohort(src, tmp_path / "o3", mode="move")


def test_cli(tmp_path: Path, brats) -> None:
    src = tmp_path / "brats"
    ids = brats.write_cohort(src, 3, "brats2023")
    app = typer.Typer()
    app.command()(partition_command)
    runner = CliRunner()
    out = tmp_path / "out"
    res = runner.invoke(
        app,
        [
            "--brats",
            str(src),
            "--out",
            str(out),
            "--sites",
            "x=t1,t2",
            "--sites",
            "y=t1ce,flair",
            "--mode",
            "copy",
            "--val-fraction",
            "0.34",
            "--seed",
            "3",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "3 cases (1 held out, 0 skipped)" in res.output
    assert _files(out / "sites" / "x") == {f"{c}-{s}.nii.gz" for c in ids for s in ("t1n", "t2w")}
    assert _files(out / "sites" / "y") == {f"{c}-{s}.nii.gz" for c in ids for s in ("t1c", "t2f")}
    assert len(read_case_list(out / "validation.txt")) == 1
    # default: one site per modality
    res = runner.invoke(app, ["--brats", str(src), "--out", str(tmp_path / "out2")])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "out2" / "sites").iterdir()) == ["flair", "t1", "t1ce", "t2"]
    # errors: bad site spec, empty source folder
    res = runner.invoke(app, ["--brats", str(src), "--out", str(tmp_path / "o3"), "--sites", "a=t1,dwi"])
    assert res.exit_code != 0 and "unknown modality" in res.output
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["--brats", str(tmp_path / "empty"), "--out", str(tmp_path / "o4")])
    assert res.exit_code == 1 and "no BraTS case found" in res.output
