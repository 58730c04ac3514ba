"""The closed set of MONAI activation and normalisation specs a Split-U-Net may be built with.

A model's ``act`` and ``norm`` are MONAI layer specs, ``(name, {keyword: value})`` as in ``BasicUNet``. They cross
the network (an aggregator's ``POST /v1/runs`` names them), so they are validated here, before any layer is built:
an unknown name or keyword, or a value MONAI would reject, is a ``ValueError`` naming the allowed set (422 at a
service), never an exception out of MONAI's constructors (a 500).

Names are MONAI's (case-insensitive); keyword arguments are checked by one small pydantic model per name:

- activations: ``leakyrelu`` (``negative_slope`` in ``[0, 1)``), ``relu``, ``prelu``, ``elu``, ``gelu``;
- norms: ``instance`` and ``batch`` (``affine``, ``eps``, ``momentum``, ``track_running_stats``), ``group``
  (``num_groups``, which must divide every level's channel count: checked by :class:`~splitunet.config.
  SplitUNetConfig`).

A *site* further narrows the set with its policy (:mod:`services.client_site.policy`): by default only the
non-linear activation the model ships with, because an activation close to the identity (e.g. ``LeakyReLU`` with
slope 1) makes the encoder affine and its activations trivially invertible.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class _Kwargs(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class LeakyReLUArgs(_Kwargs):
    negative_slope: float = Field(default=0.01, ge=0.0, lt=1.0)
    inplace: bool = False


class ReLUArgs(_Kwargs):
    inplace: bool = False


class PReLUArgs(_Kwargs):
    num_parameters: int = Field(default=1, ge=1, le=1)
    init: float = Field(default=0.25, ge=0.0, lt=1.0)


class ELUArgs(_Kwargs):
    alpha: float = Field(default=1.0, gt=0.0, le=10.0)
    inplace: bool = False


class GELUArgs(_Kwargs):
    approximate: str = Field(default="none", pattern="^(none|tanh)$")


class NormArgs(_Kwargs):
    affine: bool = True
    eps: float = Field(default=1e-5, gt=0.0, le=1.0)
    momentum: float = Field(default=0.1, ge=0.0, le=1.0)
    track_running_stats: bool = False


class GroupNormArgs(_Kwargs):
    num_groups: int = Field(ge=1, le=4096)
    affine: bool = True
    eps: float = Field(default=1e-5, gt=0.0, le=1.0)


#: Activation name (MONAI's, lower case) -> the model of its keyword arguments.
ACTIVATIONS: dict[str, type[_Kwargs]] = {
    "leakyrelu": LeakyReLUArgs, "relu": ReLUArgs, "prelu": PReLUArgs, "elu": ELUArgs, "gelu": GELUArgs,
}
#: Normalisation name (MONAI's, lower case) -> the model of its keyword arguments.
NORMS: dict[str, type[_Kwargs]] = {"instance": NormArgs, "batch": NormArgs, "group": GroupNormArgs}


def check_layer_spec(kind: str, value: Any) -> tuple[str, dict[str, Any]]:
    """Validate an ``act`` (``kind="act"``) or ``norm`` spec; return it unchanged as a ``(name, kwargs)`` tuple.

    Raises:
        ValueError: not a ``[name, {kwargs}]`` pair, an unknown name, or a keyword MONAI's layer would refuse;
            the message lists what is allowed.
    """
    table = ACTIVATIONS if kind == "act" else NORMS
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not isinstance(value[0], str) \
            or not isinstance(value[1], dict):
        raise ValueError(f"{kind} must be a pair [name, {{keyword: value}}], e.g. {_example(kind)}; got {value!r:.80}")
    name, kwargs = value[0].lower(), value[1]
    if name not in table:
        raise ValueError(f"{kind} {value[0]!r:.40} is not supported; choose one of {sorted(table)}")
    try:
        table[name].model_validate(kwargs)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_input=False))
        raise ValueError(f"{kind} {name}: {problems}") from None
    return value[0], dict(kwargs)


def layer_name(spec: tuple[str, dict[str, Any]]) -> str:
    """The canonical (lower-case) name of a validated spec."""
    return spec[0].lower()


def _example(kind: str) -> str:
    return '["LeakyReLU", {"negative_slope": 0.1}]' if kind == "act" else '["instance", {"affine": true}]'
