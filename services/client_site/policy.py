"""A site's own policy: what it accepts from the aggregator, and how many evaluations it grants.

The site is sovereign over its data and its encoder. Whatever the aggregator asks, the site checks it against
:class:`SitePolicy` (its settings, ``SITE_POLICY__...``) and refuses with 403 ``policy_violation`` and a body
naming the rule (``detail.rule``):

- ``min_cut_level``: the encoder runs at least this many levels at the site (a deeper cut sends more abstract
  features; cut 0 sends the first convolution block's output, which is close to the image);
- ``allowed_skips``: the skip levels the site is willing to send (``None``: any);
- ``max_width``: the widest encoder level accepted (channels), and ``allowed_spatial_dims``;
- ``lr_min`` / ``lr_max``: bounds of the encoder's learning rate (a huge rate can turn training into probing);
- ``max_batch``: samples in one forward;
- ``leakage``: the site's own leakage gate (:class:`LeakagePolicy`): every ``every``-th train step the site audits
  what it sent (its own white-box attack with its own weights, scored against its own originals) before the next
  activations leave; over a threshold it refuses every forward of the run (rule ``leakage``, the figure in
  ``detail``; :mod:`services.client_site.leakage_gate`);
- ``min_secure_sum_sites``: the fewest sites of a secure sum this site joins (default 3; see
  :mod:`splitunet.secure_sum`);
- ``activations`` / ``norms``: the MONAI activations and normalisations the site builds its encoder with (default:
  the model's own ``LeakyReLU`` and ``ReLU``, instance norm), and ``max_negative_slope``: the largest
  ``LeakyReLU`` slope (an activation close to the identity makes the encoder affine, so its activations invert
  by least squares; slope 1 *is* the identity);
- the **evaluation budget**: samples encoded by ``phase=eval`` forwards (no gradient comes back, so they are pure
  queries of the encoder), per case per run (``eval_per_case_per_run``) and per case per UTC day across runs
  (``eval_per_case_per_day``). Each crop/slice of a case counts once; the defaults leave room for a 2D
  validation of every slice of a 155-slice case with 4 in-plane windows (620 samples) every few hundred steps.

``GET /v1/info`` shows the policy (never secrets), so an aggregator can plan within it.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import Counter
from collections.abc import Callable, Iterable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from splitunet.config import SplitUNetConfig
from splitunet.errors import PolicyError
from splitunet.layer_specs import ACTIVATIONS, NORMS, layer_name
from splitunet.schemas import MAX_BATCH, OptimizerOptions


class LeakagePolicy(BaseModel):
    """The site's leakage thresholds and how often its own audit checks them (``SITE_POLICY__LEAKAGE__EVERY=10``,
    ``SITE_POLICY__LEAKAGE__MAX_SSIM=0.6``, ...).

    Args:
        every: audit every n-th train step before the next forward leaves (0: no gate).
        max_ssim: the best attack's brain SSIM (both images on [0, 1]) above which the site stops releasing.
        max_delta_ssim: the same over the prior image: SSIM(x^, x) - SSIM(prior, x).
        max_semantic: the semantic leakage (Dice of a frozen WT segmenter on the reconstruction vs the original).
        attacks: the gate's attacks (default the white-box inversion: the upper bound, with the site's own weights).
        whitebox_iterations: the white-box budget, an audit's by default (a weaker gate passes what an audit flags).
        max_samples: samples of the recorded batch attacked.
        segmenter_steps: training of the WT segmenter (only with ``max_semantic``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    every: int = Field(default=0, ge=0)
    max_ssim: float | None = Field(default=None, ge=-1, le=1)
    max_delta_ssim: float | None = Field(default=None, ge=-2, le=2)
    max_semantic: float | None = Field(default=None, ge=0, le=1)
    attacks: tuple[str, ...] = ("whitebox",)
    whitebox_iterations: int = Field(default=1000, ge=1)
    max_samples: int = Field(default=2, ge=1, le=32)
    segmenter_steps: int = Field(default=200, ge=1)

    @model_validator(mode="after")
    def _check(self) -> LeakagePolicy:
        thresholds = (self.max_ssim, self.max_delta_ssim, self.max_semantic)
        if self.every and all(t is None for t in thresholds):
            raise ValueError(f"policy.leakage.every={self.every} but no threshold: set max_ssim, max_delta_ssim or "
                             "max_semantic (SITE_POLICY__LEAKAGE__MAX_SSIM=...), or every=0 for no gate")
        if not self.every and any(t is not None for t in thresholds):
            raise ValueError("policy.leakage has thresholds but every=0: the gate would never check them; set "
                             "SITE_POLICY__LEAKAGE__EVERY to the steps between two checks")
        allowed = {"whitebox", "unsplit", "learned"}
        if not self.attacks or not set(self.attacks) <= allowed:
            raise ValueError(f"policy.leakage.attacks must be among {sorted(allowed)}, got {list(self.attacks)}")
        return self


class SitePolicy(BaseModel):
    """A site's rules (see the module docstring); the defaults accept what the project's defaults need."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_cut_level: int = Field(default=0, ge=0, le=16)
    allowed_skips: tuple[int, ...] | None = None
    max_width: int = Field(default=512, ge=1)
    allowed_spatial_dims: tuple[int, ...] = (2, 3)
    lr_min: float = Field(default=1e-7, gt=0)
    lr_max: float = Field(default=0.1, gt=0, le=1.0)
    max_batch: int = Field(default=MAX_BATCH, ge=1, le=MAX_BATCH)
    eval_per_case_per_run: int = Field(default=20_000, ge=0)
    eval_per_case_per_day: int = Field(default=50_000, ge=0)
    leakage: LeakagePolicy = Field(default_factory=LeakagePolicy)
    min_secure_sum_sites: int = Field(default=3, ge=2, le=16)
    activations: tuple[str, ...] = ("leakyrelu", "relu")
    max_negative_slope: float = Field(default=0.3, ge=0.0, lt=1.0)
    norms: tuple[str, ...] = ("instance",)

    @model_validator(mode="after")
    def _check(self) -> SitePolicy:
        for field, known in (("activations", ACTIVATIONS), ("norms", NORMS)):
            unknown = sorted({n.lower() for n in getattr(self, field)} - set(known))
            if unknown:
                raise ValueError(f"policy {field}: {unknown} unknown; choose among {sorted(known)}")
        if self.lr_min > self.lr_max:
            raise ValueError(f"policy lr_min {self.lr_min} exceeds lr_max {self.lr_max}")
        if not set(self.allowed_spatial_dims) <= {2, 3}:
            raise ValueError(f"policy allowed_spatial_dims must be among 2 and 3, got {self.allowed_spatial_dims}")
        return self

    def check_setup(self, model: SplitUNetConfig, optimizer: OptimizerOptions) -> None:
        """Refuse a run whose model or optimizer is outside the policy (403 naming the rule)."""
        if model.spatial_dims not in self.allowed_spatial_dims:
            _refuse("allowed_spatial_dims", f"{model.spatial_dims}D models are not accepted",
                    allowed=list(self.allowed_spatial_dims), got=model.spatial_dims)
        if model.cut_level < self.min_cut_level:
            _refuse("min_cut_level", f"cut level {model.cut_level} is below this site's minimum {self.min_cut_level}",
                    minimum=self.min_cut_level, got=model.cut_level)
        if self.allowed_skips is not None:
            extra = sorted(set(model.sent_skip_levels) - set(self.allowed_skips))
            if extra:
                _refuse("allowed_skips", f"this site does not send skip level(s) {extra}",
                        allowed=list(self.allowed_skips), got=list(model.sent_skip_levels))
        sent_width = max(model.features[: model.cut_level + 1])
        if sent_width > self.max_width:
            _refuse("max_width", f"encoder width {sent_width} exceeds this site's maximum {self.max_width}",
                    maximum=self.max_width, got=sent_width)
        act, norm = layer_name(model.act), layer_name(model.norm)
        if act not in {a.lower() for a in self.activations}:
            _refuse("activations", f"activation {model.act[0]!r} is not accepted",
                    allowed=list(self.activations), got=model.act[0])
        slope = model.act[1].get("negative_slope", 0.01) if act == "leakyrelu" else 0.0
        if slope > self.max_negative_slope:
            _refuse("max_negative_slope", f"LeakyReLU slope {slope} exceeds this site's maximum "
                    f"{self.max_negative_slope} (a slope near 1 makes the encoder affine and invertible)",
                    maximum=self.max_negative_slope, got=slope)
        if norm not in {n.lower() for n in self.norms}:
            _refuse("norms", f"normalisation {model.norm[0]!r} is not accepted", allowed=list(self.norms),
                    got=model.norm[0])
        if not self.lr_min <= optimizer.lr <= self.lr_max:
            _refuse("lr_bounds", f"learning rate {optimizer.lr} is outside [{self.lr_min}, {self.lr_max}]",
                    lr_min=self.lr_min, lr_max=self.lr_max, got=optimizer.lr)

    def check_batch(self, size: int) -> None:
        if size > self.max_batch:
            _refuse("max_batch", f"a forward of {size} samples exceeds this site's maximum {self.max_batch}",
                    maximum=self.max_batch, got=size)


def _refuse(rule: str, message: str, **detail: object) -> None:
    raise PolicyError(f"site policy: {message}", detail={"rule": rule, **detail})


class EvalBudget:
    """Counts ``phase=eval`` forwards per (run, case) and per (UTC day, case); refuses beyond the policy.

    A request is charged all or nothing: if any of its cases is over budget nothing is counted. Thread-safe.

    Args:
        policy: the limits.
        today: the current UTC date (injected by tests).
    """

    def __init__(self, policy: SitePolicy, today: Callable[[], dt.date] | None = None) -> None:
        self.policy = policy
        self._today = today or (lambda: dt.datetime.now(dt.UTC).date())
        self._per_run: dict[str, Counter[str]] = {}
        self._day: dt.date | None = None
        self._per_day: Counter[str] = Counter()
        self._lock = threading.Lock()

    def charge(self, run_id: str, case_ids: Iterable[str]) -> None:
        """Count one evaluation of each case (repeats count repeatedly); 403 if the budget is spent."""
        wanted = Counter(case_ids)
        with self._lock:
            today = self._today()
            if today != self._day:
                self._day, self._per_day = today, Counter()
            run = self._per_run.setdefault(run_id, Counter())
            for case, n in wanted.items():
                if run[case] + n > self.policy.eval_per_case_per_run:
                    _refuse("eval_per_case_per_run", "the evaluation budget of a case in this run is spent",
                            limit=self.policy.eval_per_case_per_run)
                if self._per_day[case] + n > self.policy.eval_per_case_per_day:
                    _refuse("eval_per_case_per_day", "the daily evaluation budget of a case is spent",
                            limit=self.policy.eval_per_case_per_day)
            run.update(wanted)
            self._per_day.update(wanted)

    def forget_run(self, run_id: str) -> None:
        """Drop a run's per-run counts (the daily counts stay)."""
        with self._lock:
            self._per_run.pop(run_id, None)
