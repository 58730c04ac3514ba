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


class Adjacency(StrEnum):
    """Which pairs of cohorts an epsilon compares (see :mod:`splitunet.defenses.accountant`).

    - ``add_remove``: one patient's data present or absent; a release clipped to ``C`` has sensitivity ``C``.
    - ``replace_one``: one patient's data replaced by any other; sensitivity ``2C`` (the same noise buys half
      the noise multiplier).
    """

    ADD_REMOVE = "add_remove"
    REPLACE_ONE = "replace_one"


class BudgetBasis(StrEnum):
    """Which epsilon a budget limits (see :mod:`splitunet.defenses.dp`).

    - ``subsampled``: the accountant's epsilon with the plan's sampling rate (amplification by subsampling),
      add/remove adjacency: holds only against a party that does not know the batches (not the aggregator).
    - ``worst_patient``: the largest epsilon of any single patient from its own release count (training and
      evaluation), without amplification, add/remove adjacency.
    - ``aggregator``: as ``worst_patient`` under replace-one adjacency (sensitivity ``2C``): what holds against
      the aggregator, who plans the batches.
    """

    SUBSAMPLED = "subsampled"
    WORST_PATIENT = "worst_patient"
    AGGREGATOR = "aggregator"


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


class LabelDPConfig(_Defense):
    """Label DP on the aggregator's gradients (:mod:`splitunet.defenses.label_dp`): per-patient clip to ``clip``,
    Gaussian noise calibrated to ``epsilon`` over ``releases`` unsubsampled releases of one patient (replace-one)."""

    name: Literal["label_dp"] = "label_dp"
    epsilon: float = Field(gt=0, le=64, description="target epsilon against one site (the study uses <= 8)")
    delta: float = Field(default=1e-5, gt=0, lt=1)
    clip: float = Field(gt=0, description="L2 norm bound C of one patient's gradients to one site in one step")
    releases: int = Field(ge=1, le=1_000_000, description="most releases of one patient to one site (e.g. the "
                          "job's steps): the noise is calibrated for them and the next one is refused")
    sites: int = Field(default=1, ge=1, le=64, description="sites whose pooled gradients the epsilon holds against "
                       "(1: each site alone; the federation's site count: every site colluding)")
    accountant: AccountantKind = AccountantKind.RDP
    seed: int | None = None


class DPSGDConfig(_Defense):
    """DP-SGD of the site's encoder (:mod:`splitunet.defenses.dpsgd`, Opacus): per-patient gradient clip to
    ``clip``, Gaussian noise of std ``noise_multiplier * clip`` on the summed gradient, every training step.

    Needs the synchronous step schedule, no NoPeek (its loss couples the samples of a batch) and a ``dp`` entry
    (noise on what is sent): the encoder's updates and the releases compose in one accountant."""

    name: Literal["dpsgd"] = "dpsgd"
    clip: float = Field(gt=0, description="L2 norm bound of one patient's encoder gradient in one step")
    noise_multiplier: float = Field(gt=0, le=1000)
    delta: float = Field(default=1e-5, gt=0, lt=1)
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
    GaussianConfig | LaplaceConfig | DPConfig | QuantizeConfig | TopKConfig | NoPeekConfig | DPSGDConfig,
    Field(discriminator="name"),
]
#: Defenses the aggregator may run on the gradients it returns (label protection).
GradientDefenseConfig = Annotated[
    DPConfig | LabelDPConfig | NormEqualizeConfig | SmoothConfig | GaussianConfig | LaplaceConfig,
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
    """Validate a site's defense list (any form :func:`load_defense_list` accepts).

    Raises ``ValueError`` for a list pydantic accepts entry by entry but that does not hold together
    (:func:`check_site_combination`)."""
    return check_site_combination(_SITE_LIST.validate_python(load_defense_list(value)))


def check_site_combination(configs: Any) -> Any:
    """Return a site's validated defense list ``configs`` if its entries hold together, else raise ``ValueError``
    naming the conflict (DP-SGD without a ``dp`` entry, with NoPeek, or twice)."""
    names = [c.name for c in configs]
    if "dpsgd" in names:
        if names.count("dpsgd") > 1:
            raise ValueError("defenses: give `dpsgd` once (one encoder, one DP-SGD)")
        if "dp" not in names:
            raise ValueError("defenses: `dpsgd` bounds the encoder's training, not what is sent; add a `dp` entry "
                             "(clip and noise on the activations) so the releases are bounded too")
        if "nopeek" in names:
            raise ValueError("defenses: `dpsgd` cannot run with `nopeek` (its dCor loss couples the samples of a "
                             "batch, so a patient's gradient is no longer its own); remove one of them")
    return configs
