"""Discovery of BraTS cases on disk: which folders are cases, which layout, which files.

Two layouts are recognised, per case, from the file names (not from the folder name), ``.nii`` or ``.nii.gz``:

- :attr:`BratsLayout.BRATS2021` (BraTS 2018-2022): ``<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz``, labels
  ``{0, 1, 2, 4}``, enhancing tumour (ET) = 4.
- :attr:`BratsLayout.BRATS2023` (BraTS 2023 glioma, ``BraTS-GLI-00000-000``; SSA, MEN and MET use the same
  naming and labels): ``<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz``, labels ``{0, 1, 2, 3}``, ET = 3.

Modalities always get their canonical names of :data:`splitunet.config.MODALITIES` (``t1, t1ce, t2, flair``);
the 2023 names ``t1n, t1c, t2w, t2f`` are accepted as aliases everywhere a modality is named.

A party's folder may be partial: a site's folder holds only its modalities, the aggregator's only the
segmentations. :func:`discover_cases` therefore accepts any subset of files per case and checks only what the
caller ``require``\\ s. Case folders are looked for directly under the root; if there are none, one level
deeper (a download that unpacks into one extra folder).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

from splitunet.config import MODALITIES
from splitunet.errors import CaseNotFoundError, DataError

logger = logging.getLogger(__name__)

_E = TypeVar("_E", bound=StrEnum)

#: Name of the segmentation "file kind" in ``require`` lists and in :meth:`BratsCase.expected_name`.
SEG = "seg"

#: Alias -> canonical modality name (canonical names map to themselves).
MODALITY_ALIASES: Mapping[str, str] = MappingProxyType(
    {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair"}
)

_NIFTI = re.compile(r"^(?P<stem>.+?)\.nii(?:\.gz)?$", re.IGNORECASE)


class BratsLayout(StrEnum):
    """File naming and label convention of a BraTS release."""

    BRATS2021 = "brats2021"
    BRATS2023 = "brats2023"

    @property
    def separator(self) -> str:
        """Separator between the case id and the file suffix (``_`` in 2021, ``-`` in 2023)."""
        return "_" if self is BratsLayout.BRATS2021 else "-"

    @property
    def suffixes(self) -> Mapping[str, str]:
        """Canonical modality (or ``"seg"``) -> file suffix in this layout."""
        if self is BratsLayout.BRATS2021:
            return {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", SEG: "seg"}
        return {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", SEG: "seg"}

    @property
    def et_label(self) -> int:
        """Label value of the enhancing tumour: 4 (2021) or 3 (2023)."""
        return 4 if self is BratsLayout.BRATS2021 else 3

    @property
    def label_values(self) -> frozenset[int]:
        """The label values a segmentation of this layout may contain."""
        return frozenset({0, 1, 2, self.et_label})


class OnBadCase(StrEnum):
    """What a cohort-level operation does with an unusable case: ``raise`` a :class:`DataError` (default) or
    ``skip`` it, logging the reason and counting it."""

    RAISE = "raise"
    SKIP = "skip"


def parse_option(enum_cls: type[_E], value: _E | str, param: str) -> _E:
    """``enum_cls(value)``, with a ``ValueError`` naming ``param`` and the allowed values if it is not one."""
    try:
        return enum_cls(value)
    except ValueError:
        raise ValueError(f"{param} must be one of {[e.value for e in enum_cls]}, got {value!r}") from None


def canonical_modality(name: str) -> str:
    """The canonical modality name (``t1, t1ce, t2, flair``) for a canonical name or a 2023 alias."""
    key = name.strip().lower()
    if key not in MODALITY_ALIASES:
        raise ValueError(f"unknown modality {name!r}; allowed: {list(MODALITIES)} or aliases t1n, t1c, t2w, t2f")
    return MODALITY_ALIASES[key]


def canonical_requirements(require: Iterable[str]) -> tuple[str, ...]:
    """Normalise a ``require`` list (modality names, aliases, ``"seg"``) to canonical names, in the order
    ``t1, t1ce, t2, flair, seg``, without repeats."""
    wanted = {SEG if r.strip().lower() == SEG else canonical_modality(r) for r in require}
    return tuple(k for k in (*MODALITIES, SEG) if k in wanted)


@dataclass(frozen=True)
class BratsCase:
    """One patient's files as found on disk (possibly a subset: a site holds only its modalities).

    Attributes:
        case_id: the case folder name, e.g. ``BraTS2021_00000`` or ``BraTS-GLI-00000-000``.
        layout: the file naming and label convention.
        directory: the case folder.
        images: canonical modality -> file, for the modalities present.
        seg: the segmentation file, if present.
    """

    case_id: str
    layout: BratsLayout
    directory: Path
    images: Mapping[str, Path] = field(default_factory=dict, hash=False)
    seg: Path | None = None

    def __post_init__(self) -> None:
        unknown = [m for m in self.images if m not in MODALITIES]
        if unknown:
            raise ValueError(f"images has unknown modality keys {unknown}; allowed: {list(MODALITIES)}")
        object.__setattr__(self, "images", MappingProxyType(dict(self.images)))

    @property
    def et_label(self) -> int:
        """Label value of the enhancing tumour in this case's segmentation (4 or 3)."""
        return self.layout.et_label

    @property
    def label_values(self) -> frozenset[int]:
        return self.layout.label_values

    @property
    def modalities(self) -> tuple[str, ...]:
        """The canonical modalities present, in canonical order."""
        return tuple(m for m in MODALITIES if m in self.images)

    def expected_name(self, kind: str, suffix: str = ".nii.gz") -> str:
        """The file name this case's layout uses for a modality (canonical or alias) or ``"seg"``."""
        key = SEG if kind == SEG else canonical_modality(kind)
        return f"{self.case_id}{self.layout.separator}{self.layout.suffixes[key]}{suffix}"

    def image_path(self, modality: str) -> Path:
        """The file of one modality; :class:`DataError` naming the case and the expected file if absent."""
        key = canonical_modality(modality)
        path = self.images.get(key)
        if path is None:
            raise DataError(
                f"case {self.case_id}: modality {key!r} is missing: no file "
                f"{self.directory / self.expected_name(key)} (or .nii)",
                detail={"case_id": self.case_id, "file": str(self.directory / self.expected_name(key))},
            )
        return path

    def seg_path(self) -> Path:
        """The segmentation file; :class:`DataError` naming the case and the expected file if absent."""
        if self.seg is None:
            expected = self.directory / self.expected_name(SEG)
            raise DataError(
                f"case {self.case_id}: segmentation is missing: no file {expected} (or .nii)",
                detail={"case_id": self.case_id, "file": str(expected)},
            )
        return self.seg

    def missing(self, require: Iterable[str]) -> list[str]:
        """The required kinds (canonical modalities or ``"seg"``) this case lacks."""
        out = []
        for key in canonical_requirements(require):
            present = self.seg is not None if key == SEG else key in self.images
            if not present:
                out.append(key)
        return out

    def check(self, require: Iterable[str]) -> None:
        """Raise :class:`DataError` naming the case and the first missing file among ``require``."""
        for key in self.missing(require):
            if key == SEG:
                self.seg_path()
            else:
                self.image_path(key)


@dataclass(frozen=True)
class CohortScan:
    """Result of scanning a cohort: the usable cases (sorted by id) and the skipped ones with their reason."""

    root: Path
    cases: Mapping[str, BratsCase]
    skipped: Mapping[str, str] = field(default_factory=dict)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def case(self, case_id: str) -> BratsCase:
        """One case by id; :class:`CaseNotFoundError` if it is not (or no longer) in the cohort."""
        try:
            return self.cases[case_id]
        except KeyError:
            why = f" (skipped: {self.skipped[case_id]})" if case_id in self.skipped else ""
            raise CaseNotFoundError(
                f"case {case_id!r} is not in the cohort at {self.root}{why}", detail={"case_id": case_id}
            ) from None

    def __len__(self) -> int:
        return len(self.cases)


def _match(case_id: str, filename: str) -> tuple[BratsLayout, str] | None:
    """``(layout, canonical kind)`` if ``filename`` is one of this case's BraTS files, else ``None``."""
    m = _NIFTI.match(filename)
    if m is None:
        return None
    stem = m.group("stem")
    for layout in BratsLayout:
        prefix = case_id + layout.separator
        if stem.startswith(prefix):
            suffix = stem[len(prefix) :].lower()
            for kind, expected in layout.suffixes.items():
                if suffix == expected:
                    return layout, kind
    return None


def _read_case(directory: Path) -> tuple[BratsCase | None, DataError | None]:
    """Parse one folder: ``(case, None)``, ``(None, problem)``, or ``(None, None)`` if it is not a case."""
    case_id = directory.name
    found: dict[str, list[Path]] = {}
    layouts: set[BratsLayout] = set()
    for entry in sorted(directory.iterdir()):
        hit = _match(case_id, entry.name)
        if hit is None:
            continue
        if not entry.is_file():
            return None, _case_error(case_id, entry, f"{entry} is not a regular file")
        layouts.add(hit[0])
        found.setdefault(hit[1], []).append(entry)
    if not found:
        return None, None
    if len(layouts) > 1:
        return None, _case_error(
            case_id,
            directory,
            f"files of both the BraTS 2021 ('{case_id}_t1.nii.gz') and the 2023 ('{case_id}-t1n.nii.gz') "
            f"naming in {directory}; keep one",
        )
    for kind, paths in found.items():
        if len(paths) > 1:
            return None, _case_error(
                case_id, paths[0], f"several files for {kind!r}: {[p.name for p in paths]}; keep one"
            )
    layout = layouts.pop()
    images = {k: found[k][0] for k in MODALITIES if k in found}
    seg = found[SEG][0] if SEG in found else None
    return BratsCase(case_id=case_id, layout=layout, directory=directory, images=images, seg=seg), None


def _case_error(case_id: str, path: Path, message: str) -> DataError:
    return DataError(f"case {case_id}: {message}", detail={"case_id": case_id, "file": str(path)})


def _scan_dirs(dirs: list[Path]) -> tuple[dict[str, BratsCase], dict[str, DataError]]:
    cases: dict[str, BratsCase] = {}
    problems: dict[str, DataError] = {}
    for d in dirs:
        case, problem = _read_case(d)
        if problem is not None:
            problems[d.name] = problem
        elif case is not None:
            cases[case.case_id] = case
    return cases, problems


def scan_layout(
    root: Path | str, require: Iterable[str] = (), on_bad_case: OnBadCase | str = OnBadCase.RAISE
) -> CohortScan:
    """Find the BraTS cases under ``root`` (see the module docstring) and check the required files.

    Args:
        root: the cohort folder (one sub-folder per case).
        require: kinds every case must have: modality names (or aliases) and/or ``"seg"``.
        on_bad_case: ``raise`` the first problem as a :class:`DataError`, or ``skip`` the case and log it.

    Raises:
        DataError: the root does not exist, holds no BraTS case, or (``raise``) a case is unusable.
    """
    policy = parse_option(OnBadCase, on_bad_case, "on_bad_case")
    required = canonical_requirements(require)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"cohort folder {root} does not exist or is not a folder", detail={"file": str(root)})
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    cases, problems = _scan_dirs(subdirs)
    if not cases and not problems:
        deeper = sorted(q for p in subdirs for q in p.iterdir() if q.is_dir())
        cases, problems = _scan_dirs(deeper)
    if not cases and not problems:
        raise DataError(
            f"no BraTS case found in {root}: expected one folder per case, e.g. "
            "BraTS2021_00000/BraTS2021_00000_t1.nii.gz or BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz",
            detail={"file": str(root)},
        )
    for case_id, case in list(cases.items()):
        if case.missing(required):
            try:
                case.check(required)
            except DataError as exc:
                problems[case_id] = exc
                del cases[case_id]
    if problems and policy is OnBadCase.RAISE:
        raise problems[sorted(problems)[0]]
    for case_id in sorted(problems):
        logger.warning("skipping case %s: %s", case_id, problems[case_id].message)
    if problems:
        logger.warning("skipped %d of %d cases in %s", len(problems), len(problems) + len(cases), root)
    if not cases:
        raise DataError(f"no usable BraTS case left in {root}: all {len(problems)} were skipped")
    skipped = {case_id: problems[case_id].message for case_id in sorted(problems)}
    return CohortScan(root=root, cases=dict(sorted(cases.items())), skipped=skipped)


def discover_cases(
    root: Path | str, require: Iterable[str] = (), on_bad_case: OnBadCase | str = OnBadCase.RAISE
) -> dict[str, BratsCase]:
    """Cases under ``root`` by id (sorted), each having every kind in ``require``; see :func:`scan_layout`."""
    return dict(scan_layout(root, require, on_bad_case).cases)
