"""The privacy gate: thresholds that fail an audit, and the decision naming the site and the figure.

A gate fails when, for any site, the best attack's brain SSIM exceeds ``max_ssim`` or its RDLV exceeds
``max_rdlv`` (RDLV > 0: the attack learned more than the prior), or the lower bound of its ΔSSIM 95 % interval
exceeds ``max_delta_ssim`` (0: the attack beats the prior beyond sampling noise; the study's rule), or the
label-leakage Dice exceeds ``max_label_dice``. SSIM is :func:`splitunet.leakage.brain_ssim` ([0, 1] scale).
Unset thresholds are not checked; with none set the audit always passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from splitunet.auditing.runner import Finding


class GateDecision(BaseModel):
    """``passed`` or the first violation: site, attack, figure (``ssim``, ``rdlv``, ``dice``), value, threshold."""

    passed: bool
    site: str | None = None
    attack: str | None = None
    figure: str | None = None
    value: float | None = None
    threshold: float | None = None
    step: int | None = None

    def message(self) -> str:
        if self.passed:
            return "the privacy gate passed"
        return (f"site {self.site}: {self.attack} attack reached {self.figure} {self.value:.3f} > {self.threshold} "
                f"at step {self.step}")


class GateThreshold(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_ssim: float | None = Field(default=None, ge=-1, le=1)
    max_rdlv: float | None = None
    max_delta_ssim: float | None = Field(default=None, ge=-1, le=1)
    max_label_dice: float | None = Field(default=None, ge=0, le=1)

    def evaluate(self, findings: Sequence[Finding]) -> GateDecision:
        for f in findings:
            for figure, limit in (("ssim", self.max_ssim), ("rdlv", self.max_rdlv),
                                  ("delta_ssim_low", self.max_delta_ssim), ("dice", self.max_label_dice)):
                value = getattr(f, figure)
                if limit is not None and value is not None and value > limit:
                    return GateDecision(passed=False, site=f.site, attack=f.attack.value, figure=figure,
                                        value=value, threshold=limit, step=f.step)
        return GateDecision(passed=True)
