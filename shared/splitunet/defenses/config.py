"""Validated configuration of the defenses: one pydantic model per defense, discriminated by ``name``.

A site lists its activation defenses in ``SITE_DEFENSES`` (JSON, or the path of a YAML/JSON file), the
aggregator's gradient defenses come with each job (``FederationSpec.gradient_defenses``); both are applied in
the order given. An unknown ``name`` or a bad parameter fails at start-up (or with a 422 on ``POST /v1/jobs``)
with pydantic's message, which names the field and the allowed values, e.g.::

    defenses.0: Input tag 'gausian' found using 'name' does not match any of the expected tags: 'gaussian', ...
    defenses.1.dp.clip: Input should be greater than 0

Example ``SITE_DEFENSES``::

    [{"name": "dp", "clip": 20.0, "noise_multiplier": 1.0, "epsilon_budget": 8.0},
     {"name": "quantize", "mode": "int8"},
     {"name": "nopeek", "alpha": 0.1}]
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator


class _Defense(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GaussianConfig(_Defense):
    """Calibrated Gaussian noise: ``sigma = sigma0 * P95(|F|)`` per tensor."""

    name: Literal["gaussian"] = "gaussian"
    sigma0: float = Field(gt=0, le=100)
    seed: int | None = Field(default=None, description="noise seed for reproducible tests; leave unset in use")


class LaplaceConfig(_Defense):
    """Calibrated Laplace noise: ``b = b0 * P95(|F|)`` per tensor."""

    name: Literal["laplace"] = "laplace"
    b0: float = Field(gt=0, le=100)
    seed: int | None = None


class AccountantKind(StrEnum):
    """Opacus accountants: Rényi DP (``rdp``) or privacy random variables (``prv``, tighter, slower)."""

    RDP = "rdp"
    PRV = "prv"


class BudgetBasis(StrEnum):
    """Which epsilon a budget limits (see :mod:`splitunet.defenses.dp`).

    - ``subsampled``: the accountant's epsilon with the plan's sampling rate (amplification by subsampling).
    - ``worst_patient``: the largest epsilon of any single patient from its own release count, without
      amplification (what holds against a party that knows which patients each batch holds).
    """

    SUBSAMPLED = "subsampled"
    WORST_PATIENT = "worst_patient"


class DPConfig(_Defense):
    """Per-patient L2 clipping to ``clip`` then Gaussian noise of std ``noise_multiplier * clip``."""

    name: Literal["dp"] = "dp"
    clip: float = Field(gt=0, description="L2 norm bound C of one patient's tensors in one release")
    noise_multiplier: float = Field(gt=0, le=1000, description="z: noise std = z * C")
    delta: float = Field(default=1e-5, gt=0, lt=1)
    epsilon_budget: float | None = Field(default=None, gt=0, description="refuse releases past this epsilon")
    budget_basis: BudgetBasis = BudgetBasis.SUBSAMPLED
    accountant: AccountantKind = AccountantKind.RDP
    seed: int | None = None


class QuantMode(StrEnum):
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"


class QuantizeConfig(_Defense):
    """Round to fp16, or to ``int8`` / ``int4`` levels with one symmetric scale per tensor (straight-through)."""

    name: Literal["quantize"] = "quantize"
    mode: QuantMode = QuantMode.INT8


class TopKConfig(_Defense):
    """Keep the largest ``keep`` fraction (by magnitude) of every sample's tensor entries, zero the rest."""

    name: Literal["topk"] = "topk"
    keep: float = Field(gt=0, le=1, description="fraction kept per sample and tensor, e.g. 0.1 for 10 %")


class NoPeekConfig(_Defense):
    """Site loss term ``alpha * dCor(x, F)`` on subsampled patches (a training-time defense, not a filter)."""

    name: Literal["nopeek"] = "nopeek"
    alpha: float = Field(gt=0, le=100)
    patch: int = Field(default=8, ge=1, le=64, description="input patch edge in voxels (one dCor point)")
    points: int = Field(default=256, ge=8, le=4096, description="patches sampled per step")
    seed: int | None = None

    @field_validator("patch")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"patch must be a power of two (1, 2, 4, 8, ...), got {value}")
        return value


class NormEqualizeConfig(_Defense):
    """Scale every sample's gradient to the batch's mean per-sample norm (hides which samples matter)."""

    name: Literal["norm_equalize"] = "norm_equalize"


class SmoothConfig(_Defense):
    """Gaussian smoothing of gradient maps over the spatial axes (MONAI ``GaussianFilter``)."""

    name: Literal["smooth"] = "smooth"
    sigma: float = Field(gt=0, le=32, description="standard deviation in voxels of each tensor's grid")


#: Defenses a site may run on its outbound activations (and NoPeek, a loss term).
SiteDefenseConfig = Annotated[
    GaussianConfig | LaplaceConfig | DPConfig | QuantizeConfig | TopKConfig | NoPeekConfig,
    Field(discriminator="name"),
]
#: Defenses the aggregator may run on the gradients it returns (label protection).
GradientDefenseConfig = Annotated[
    DPConfig | NormEqualizeConfig | SmoothConfig | GaussianConfig | LaplaceConfig,
    Field(discriminator="name"),
]

_SITE_LIST = TypeAdapter(list[SiteDefenseConfig])


def load_defense_list(value: Any) -> Any:
    """Accept a list, a JSON string, or the path of a YAML/JSON file holding the list; return the raw list.

    Raises ``ValueError`` saying what was given and what is expected.
    """
    if value is None or isinstance(value, list | tuple):
        return list(value or [])
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not text:
        return []
    if text[0] in "[{":
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"defenses: not valid JSON ({exc}); give a JSON list or a YAML file path") from None
    else:
        path = Path(text)
        if not path.is_file():
            raise ValueError(f"defenses: {text!r} is neither a JSON list nor an existing YAML/JSON file")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"defenses: cannot read {text!r}: {exc}") from None
    if isinstance(loaded, dict):
        loaded = loaded.get("defenses", [loaded])
    if not isinstance(loaded, list):
        raise ValueError(f"defenses: expected a list of defenses, got {type(loaded).__name__}")
    return loaded


def parse_site_defenses(value: Any) -> list[SiteDefenseConfig]:
    """Validate a site's defense list (any form :func:`load_defense_list` accepts)."""
    return _SITE_LIST.validate_python(load_defense_list(value))
