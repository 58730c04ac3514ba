"""Vertical partition of a BraTS download into one folder per party.

Output layout (the original file names are kept, so :func:`~splitunet.data.layout.discover_cases` still
recognises the layout in every party's folder)::

    OUT/sites/<site>/<case>/<case>_<modality>.nii.gz   only the modalities of that site
    OUT/aggregator/<case>/<case>_seg.nii.gz            only the segmentations
    OUT/validation.txt                                 held-out case ids, one per line (may be empty)
    OUT/partition.json                                 a small manifest (source, mode, sites, counts, seed)

Files are symbolic links to the source (``link``, the default: no extra disk) or copies (``copy``: the
parties' folders can then be moved to other machines). Every site gets every case here; in a real federation
each party's folder would simply lack some patients, which private set intersection resolves.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np

from splitunet.config import SiteSpec, default_sites
from splitunet.data.cohort import CaseCheck, scan_cohort
from splitunet.data.layout import OnBadCase, parse_option

logger = logging.getLogger(__name__)

#: Version of ``partition.json``.
MANIFEST_VERSION = 1
VALIDATION_FILE = "validation.txt"
MANIFEST_FILE = "partition.json"


class TransferMode(StrEnum):
    """How files reach the parties' folders: ``link`` (absolute symbolic links) or ``copy``."""

    LINK = "link"
    COPY = "copy"


@dataclass(frozen=True)
class PartitionResult:
    """What :func:`partition_cohort` wrote: the folders, the cases, the held-out ids and the skipped cases."""

    out: Path
    sites: tuple[SiteSpec, ...]
    case_ids: tuple[str, ...]
    validation: tuple[str, ...]
    skipped: dict[str, str] = field(default_factory=dict)

    def site_dir(self, name: str) -> Path:
        return self.out / "sites" / name

    @property
    def aggregator_dir(self) -> Path:
        return self.out / "aggregator"

    @property
    def manifest(self) -> Path:
        return self.out / MANIFEST_FILE


def split_validation(case_ids: Sequence[str], val_fraction: float, seed: int) -> tuple[str, ...]:
    """Held-out ids: ``round(val_fraction * n)`` cases (at least 1 if ``val_fraction > 0``, and at most
    ``n - 1``) drawn with ``np.random.default_rng(seed)`` from the sorted ids; returned sorted."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ids = sorted(case_ids)
    if val_fraction == 0.0 or not ids:
        return ()
    n_val = min(max(1, round(val_fraction * len(ids))), len(ids) - 1)
    if n_val < 1:
        raise ValueError(f"val_fraction={val_fraction} needs at least 2 cases to hold one out; there are {len(ids)}")
    chosen = np.random.default_rng(seed).choice(len(ids), size=n_val, replace=False)
    return tuple(sorted(ids[i] for i in chosen))


def read_case_list(path: Path | str) -> tuple[str, ...]:
    """Case ids from a one-id-per-line file such as ``validation.txt`` (blank lines and ``#`` comments skipped)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return tuple(s for s in (line.strip() for line in lines) if s and not s.startswith("#"))


def _place(src: Path, dst: Path, mode: TransferMode) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode is TransferMode.LINK:
        os.symlink(src.resolve(), dst)
    else:
        shutil.copy2(src, dst)


def partition_cohort(
    brats: Path | str,
    out: Path | str,
    sites: Sequence[SiteSpec] | None = None,
    *,
    mode: TransferMode | str = TransferMode.LINK,
    val_fraction: float = 0.0,
    seed: int = 0,
    on_bad_case: OnBadCase | str = OnBadCase.RAISE,
    check: CaseCheck | str = CaseCheck.HEADER,
) -> PartitionResult:
    """Split the BraTS cohort at ``brats`` into per-party folders under ``out`` (see the module docstring).

    Args:
        brats: the BraTS folder (one sub-folder per case, all modalities and segmentations).
        out: the output folder; must not exist or be empty.
        sites: the sites and their modalities (default: one site per modality, named after it).
        mode: ``link`` or ``copy``.
        val_fraction: fraction of cases listed in ``validation.txt`` (held out from training).
        seed: seed of the validation draw.
        on_bad_case: ``raise`` on an unusable case, or ``skip`` it (logged, listed in the manifest).
        check: ``header`` (fast) or ``full`` (decode every file) case check.

    Raises:
        ValueError: bad arguments or a non-empty ``out``.
        DataError: an unusable case with ``on_bad_case="raise"``, or no usable case.
    """
    transfer = parse_option(TransferMode, mode, "mode")
    site_specs = tuple(sites) if sites is not None else default_sites()
    if not site_specs:
        raise ValueError("sites must name at least one site, e.g. t1,t1ce,t2,flair")
    names = [s.name for s in site_specs]
    if len(set(names)) != len(names):
        raise ValueError(f"site names must be unique, got {names}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out folder {out} exists and is not empty; choose a new folder")
    modalities = sorted({m for s in site_specs for m in s.modalities})
    scan = scan_cohort(brats, modalities=modalities, seg=True, on_bad_case=on_bad_case, check=check)
    case_ids = tuple(scan.cases)
    validation = split_validation(case_ids, val_fraction, seed)

    out.mkdir(parents=True, exist_ok=True)
    for case in scan.cases.values():
        for site in site_specs:
            for m in site.modalities:
                src = case.image_path(m)
                _place(src, out / "sites" / site.name / case.case_id / src.name, transfer)
        seg = case.seg_path()
        _place(seg, out / "aggregator" / case.case_id / seg.name, transfer)
    (out / VALIDATION_FILE).write_text("".join(f"{c}\n" for c in validation), encoding="utf-8")
    manifest = {
        "format_version": MANIFEST_VERSION,
        "source": str(Path(brats).resolve()),
        "mode": transfer.value,
        "layouts": sorted({c.layout.value for c in scan.cases.values()}),
        "sites": {s.name: list(s.modalities) for s in site_specs},
        "cases": len(case_ids),
        "validation_cases": len(validation),
        "val_fraction": val_fraction,
        "seed": seed,
        "skipped": dict(scan.skipped),
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    logger.info(
        "partitioned %d cases (%d held out, %d skipped) into %d sites + aggregator under %s",
        len(case_ids),
        len(validation),
        len(scan.skipped),
        len(site_specs),
        out,
    )
    return PartitionResult(
        out=out, sites=site_specs, case_ids=case_ids, validation=validation, skipped=dict(scan.skipped)
    )
