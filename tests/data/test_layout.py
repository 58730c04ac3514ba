"""Case discovery: both BraTS layouts, .nii / .nii.gz, aliases, partial folders, bad folders."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from splitunet.data.layout import (
    BratsCase,
    BratsLayout,
    OnBadCase,
    canonical_modality,
    canonical_requirements,
    discover_cases,
    scan_layout,
)
from splitunet.errors import CaseNotFoundError, DataError


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
@pytest.mark.parametrize(
    ("layout", "et", "first_id"),
    [("brats2021", 4, "BraTS2021_00000"), ("brats2023", 3, "BraTS-GLI-00000-000")],
)
def test_discovers_both_layouts(tmp_path: Path, brats, layout: str, et: int, first_id: str, ext: str) -> None:
    ids = brats.write_cohort(tmp_path, 2, layout, ext=ext)
    cases = discover_cases(tmp_path, require=("t1", "t1ce", "t2", "flair", "seg"))
    assert list(cases) == sorted(ids) and ids[0] == first_id
    case = cases[first_id]
    assert case.layout is BratsLayout(layout)
    assert case.et_label == et
    assert case.label_values == frozenset({0, 1, 2, et})
    assert case.modalities == ("t1", "t1ce", "t2", "flair")
    assert all(p.name.endswith(ext) for p in (*case.images.values(), case.seg))
    if layout == "brats2023":
        assert case.images["t1ce"].name == f"{first_id}-t1c{ext}"
        assert case.image_path("t2f") == case.images["flair"]  # alias
    else:
        assert case.images["t1ce"].name == f"{first_id}_t1ce{ext}"


def test_aliases() -> None:
    aliases = ("t1n", "t1c", "t2w", "t2f", "FLAIR")
    assert [canonical_modality(m) for m in aliases] == ["t1", "t1ce", "t2", "flair", "flair"]
    assert canonical_requirements(["seg", "t2f", "t1n", "flair"]) == ("t1", "flair", "seg")
    with pytest.raises(ValueError, match="unknown modality 'dwi'"):
        canonical_modality("dwi")


def test_partial_folders_site_and_aggregator(tmp_path: Path, brats) -> None:
    site = tmp_path / "site"
    agg = tmp_path / "agg"
    for i in range(2):
        brats.write_case(site, i, "brats2023", modalities=("t2", "flair"), seg=False)
        brats.write_case(agg, i, "brats2023", modalities=(), seg=True)
    site_cases = discover_cases(site, require=("t2w", "t2f"))
    assert {c.modalities for c in site_cases.values()} == {("t2", "flair")}
    assert all(c.seg is None and c.layout is BratsLayout.BRATS2023 for c in site_cases.values())
    agg_cases = discover_cases(agg, require=("seg",))
    assert all(c.modalities == () and c.seg is not None and c.et_label == 3 for c in agg_cases.values())
    # a site asked for a modality it does not hold: the error names the case and the expected file
    with pytest.raises(DataError, match=r"BraTS-GLI-00000-000.*'t1'.*BraTS-GLI-00000-000-t1n\.nii\.gz") as err:
        discover_cases(site, require=("t1",))
    assert err.value.detail["case_id"] == "BraTS-GLI-00000-000"
    assert err.value.detail["file"].endswith("BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz")


def test_missing_modality_file_raises_or_skips(tmp_path: Path, brats, caplog) -> None:
    ids = brats.write_cohort(tmp_path, 3)
    (tmp_path / ids[1] / f"{ids[1]}_t1ce.nii.gz").unlink()
    with pytest.raises(DataError, match=rf"case {ids[1]}: modality 't1ce' is missing.*{ids[1]}_t1ce\.nii\.gz"):
        discover_cases(tmp_path, require=("t1", "t1ce", "seg"))
    # other requirements are unaffected
    assert len(discover_cases(tmp_path, require=("t1", "seg"))) == 3
    with caplog.at_level(logging.WARNING, logger="splitunet.data.layout"):
        scan = scan_layout(tmp_path, require=("t1ce",), on_bad_case="skip")
    assert list(scan.cases) == [ids[0], ids[2]]
    assert scan.num_skipped == 1 and "t1ce" in scan.skipped[ids[1]]
    assert ids[1] in caplog.text and "skipped 1 of 3" in caplog.text
    with pytest.raises(CaseNotFoundError, match="skipped"):
        scan.case(ids[1])


def test_empty_and_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no BraTS case found"):
        discover_cases(tmp_path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="no BraTS case found"):
        discover_cases(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        discover_cases(tmp_path / "nope")


def test_nested_download_folder_and_stray_files(tmp_path: Path, brats) -> None:
    inner = tmp_path / "RSNA_ASNR_MICCAI_BraTS2021_TrainingData"
    ids = brats.write_cohort(inner, 2)
    (inner / ids[0] / "notes.txt").write_text("ignored")
    (inner / ids[0] / "other_t1.nii.gz").write_bytes(b"not this case's file")
    cases = discover_cases(tmp_path, require=("t1", "seg"))
    assert list(cases) == ids
    assert cases[ids[0]].directory == inner / ids[0]


def test_duplicate_and_mixed_files_are_bad_cases(tmp_path: Path, brats) -> None:
    d = brats.write_case(tmp_path, 0)
    (d / "BraTS2021_00000_t1.nii").write_bytes((d / "BraTS2021_00000_t1.nii.gz").read_bytes())
    with pytest.raises(DataError, match="several files for 't1'"):
        discover_cases(tmp_path)
    (d / "BraTS2021_00000_t1.nii").unlink()
    (d / "BraTS2021_00000-t2w.nii.gz").write_bytes(b"x")
    with pytest.raises(DataError, match="both the BraTS 2021"):
        discover_cases(tmp_path)


def test_on_bad_case_option_is_validated(tmp_path: Path, brats) -> None:
    brats.write_cohort(tmp_path, 1)
    with pytest.raises(ValueError, match=r"on_bad_case must be one of \['raise', 'skip'\]"):
        scan_layout(tmp_path, on_bad_case="ignore")
    assert OnBadCase("skip") is OnBadCase.SKIP


def test_case_is_frozen_and_hashable(tmp_path: Path) -> None:
    case = BratsCase("c", BratsLayout.BRATS2021, tmp_path, {"t1": tmp_path / "c_t1.nii.gz"})
    assert hash(case) == hash(BratsCase("c", BratsLayout.BRATS2021, tmp_path, {"t1": tmp_path / "c_t1.nii.gz"}))
    with pytest.raises(TypeError):
        case.images["t2"] = tmp_path  # type: ignore[index]
    with pytest.raises(ValueError, match="unknown modality keys"):
        BratsCase("c", BratsLayout.BRATS2021, tmp_path, {"dwi": tmp_path})
    assert case.expected_name("t2f") == "c_flair.nii.gz"
