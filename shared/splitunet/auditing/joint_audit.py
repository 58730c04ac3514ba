"""What an audit of a secure-sum run attacks: the decoded sum, not the masked parts.

On a run with secure-sum fusion every recorded activation bundle is ``M_k = enc(F_k) + m_k (mod 2**bits)``, uniform
on its own; inverting it measures nothing. The transcript holds every site's ``M_k`` of each forward, so its holder
decodes the sum as the aggregator does (:func:`splitunet.attacks.secure_sum_joint.decode_sum`) and inverts it
jointly with every site's encoder (:class:`~splitunet.attacks.secure_sum_joint.JointSumInversion`).
:func:`secure_sum_options` says whether a transcript is such a run (its run description records the job's
``secure_sum`` options); :func:`decoded_sum` reads one step's sum.
"""

from __future__ import annotations

from typing import Any

import torch

from splitunet.attacks.secure_sum_joint import decode_sum
from splitunet.config import SplitUNetConfig
from splitunet.errors import DataError, NotFoundError
from splitunet.recorder import Flow
from splitunet.secure_sum import SecureSumOptions
from splitunet.transcript import Transcript
from splitunet.wire import DEFAULT_MAX_BYTES, decode_bundle


def secure_sum_options(run: dict[str, Any]) -> SecureSumOptions | None:
    """The run's secure-sum options from its transcript's run description, or ``None`` (no secure sum)."""
    options = run.get("secure_sum")
    return None if options is None else SecureSumOptions.model_validate(options)


def decoded_sum(transcript: Transcript, config: SplitUNetConfig, step: int, phase: str,
                options: SecureSumOptions) -> tuple[dict[str, torch.Tensor], tuple]:
    """The decoded sum of the first recorded forward of ``step`` (``{name: B, C, *spatial}``) and its samples."""
    order = [s.name for s in config.sites]
    masked, samples = {}, None
    for site in order:
        recs = [r for r in transcript.records(step=step, site=site, flow=Flow.RECEIVED, phase=phase) if r.samples]
        if not recs:
            raise NotFoundError(f"the secure sum of step {step} needs every site's masked bundle; the transcript has "
                                f"no {phase} record of site {site!r} at that step")
        rec = recs[0]
        if samples is None:
            samples = rec.samples
        elif [s.case_id for s in rec.samples] != [s.case_id for s in samples]:
            raise DataError(f"the sites' records of step {step} are not of the same forward (other samples); the "
                            "masks would not cancel")
        masked[site] = decode_bundle(transcript.frame(rec), max_bytes=max(rec.nbytes, DEFAULT_MAX_BYTES)).tensors
    return decode_sum(masked, options, order), tuple(samples or ())
