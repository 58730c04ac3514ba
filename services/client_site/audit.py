"""The site's side of an audit: the encoder weights it held at a step, and scoring reconstructions in place.

- **Snapshots.** Before each forward the site keeps the weights that forward uses (safetensors, no pickle, no
  optimizer state): every train step in a ring of the last ``audit_keep_last``, every ``audit_snapshot_every``-th
  train step and the first evaluation forward of a step up to ``audit_max_snapshots`` per run (oldest dropped).
  An audit (white-box inversion, the upper bound) asks for them with the ``audit`` credential.
- **Scoring.** ``POST /v1/score`` takes a wire bundle of reconstructions (one or more tensors
  ``B, C_site, *spatial``, e.g. ``reconstruction`` and ``prior``) whose metadata annotation ``x.samples`` lists the
  recorded samples (JSON); the site cuts its own originals for those samples and returns only numbers (brain
  SSIM, PSNR, NMSE per sample and modality). No image leaves the site. The bundle may also carry the audit's
  frozen whole-tumour segmenters (tensors ``segmenter/<modality>/<key>``, annotation ``x.segmenter =
  "wt-unet/1"``, :mod:`splitunet.auditing.segmenter`): the site rebuilds that fixed architecture, checks every
  weight's name and shape (422 naming the problem), segments its original and each reconstruction and returns
  ``semantic``, the Dice of the two masks (``null`` without a segmenter or when it finds no tumour in the
  original).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ValidationError
from safetensors.torch import save_file

from splitunet.auditing.segmenter import WTSegmenter, from_wire_tensors, semantic_score, split_wire_tensors
from splitunet.data.loader import load_images
from splitunet.data.sampling import Sample, extract
from splitunet.errors import CaseNotFoundError, NotFoundError, WireFormatError
from splitunet.leakage import brain_nmse, brain_psnr, brain_ssim
from splitunet.schemas import Phase
from splitunet.wire import BundleKind, decode_bundle

if TYPE_CHECKING:
    from services.client_site.runtime import SiteRun, SiteRuntime

logger = logging.getLogger(__name__)


class SampleScore(BaseModel):
    index: int
    case_id: str
    modality: str
    ssim: float | None
    psnr: float | None
    nmse: float | None
    semantic: float | None = None


class ScoreResponse(BaseModel):
    """``POST /v1/score``: per reconstruction tensor, one score per sample and modality."""

    run_id: str
    step: int
    site: str
    scores: dict[str, list[SampleScore]]


class SiteAuditor:
    """Keeps encoder snapshots and scores reconstructions for one site runtime."""

    def __init__(self, runtime: SiteRuntime) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self._lock = threading.Lock()
        self._kept: dict[str, list[Path]] = {}
        self._ring: dict[str, list[Path]] = {}

    def snapshot_path(self, run_id: str, step: int, phase: Phase) -> Path:
        return self.settings.state_dir / run_id / "audit" / f"encoder-{phase.value}-{step:08d}.safetensors"

    def on_forward(self, run_id: str, run: SiteRun, step: int, phase: Phase) -> None:
        """Snapshot the weights this forward will use (see the module docstring)."""
        every = self.settings.audit_snapshot_every
        if every == 0:
            return
        path = self.snapshot_path(run_id, step, phase)
        if path.is_file():
            return
        keep = phase == Phase.EVAL or step % every == 0
        with run.step.lock:
            state = {k: v.detach().cpu().contiguous().clone() for k, v in run.step.encoder.state_dict().items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(state, str(tmp), metadata={"run_id": run_id, "step": str(step), "phase": phase.value,
                                             "site": self.settings.site_id, "fingerprint": run.fingerprint})
        os.replace(tmp, path)
        with self._lock:
            if keep:
                kept = self._kept.setdefault(run_id, [])
                kept.append(path)
                while len(kept) > self.settings.audit_max_snapshots:
                    kept.pop(0).unlink(missing_ok=True)
            else:
                ring = self._ring.setdefault(run_id, [])
                ring.append(path)
                while len(ring) > self.settings.audit_keep_last:
                    ring.pop(0).unlink(missing_ok=True)

    def encoder_weights(self, run_id: str, step: int, phase: Phase) -> bytes:
        """The safetensors bytes of the snapshot the forward of ``(step, phase)`` used."""
        self.runtime._run(run_id)  # 404 for an unknown run
        path = self.snapshot_path(run_id, step, phase)
        if not path.is_file():
            raise NotFoundError(
                f"site {self.settings.site_id} kept no encoder snapshot of run {run_id!r} at {phase.value} step "
                f"{step}; it keeps every SITE_AUDIT_SNAPSHOT_EVERY-th step, evaluation steps and the last "
                "SITE_AUDIT_KEEP_LAST steps",
                detail={"step": step, "phase": phase.value},
            )
        return path.read_bytes()

    def score(self, body: bytes) -> ScoreResponse:
        """Compare reconstructions with this site's own originals; return numbers only. Runs on the site's compute
        thread (:class:`~splitunet.service.compute.ComputeThread`)."""
        return self.runtime.compute.call(self._score, body)

    def _score(self, body: bytes) -> ScoreResponse:
        bundle = decode_bundle(body, max_bytes=self.settings.max_bundle_bytes)
        meta = bundle.meta
        if meta.site != self.settings.site_id or meta.kind != BundleKind.ACTIVATIONS:
            raise WireFormatError(f"a score request must be an activations bundle for site "
                                  f"{self.settings.site_id!r}; got site {meta.site!r}, kind {meta.kind}")
        try:
            samples = [Sample.model_validate(s) for s in json.loads(meta.extra.get("samples", "null") or "null")]
        except (ValueError, TypeError, ValidationError) as exc:
            raise WireFormatError(f"the bundle's x.samples annotation must be a JSON list of samples: {exc}") from None
        modalities = self.settings.modalities
        expected = (len(samples), len(modalities), *samples[0].output_size) if samples else None
        images, weights = split_wire_tensors(bundle.tensors)
        if not images:
            raise WireFormatError("a score request needs at least one reconstruction tensor besides segmenter weights")
        for name, t in images.items():
            if expected is None or tuple(t.shape) != expected:
                raise WireFormatError(f"tensor {name!r} has shape {tuple(t.shape)}; expected {expected} "
                                      "(one reconstruction per sample in x.samples, this site's modalities)")
        assert expected is not None
        segmenters = from_wire_tensors(weights, architecture=meta.extra.get("segmenter"), modalities=modalities,
                                       spatial_dims=len(expected) - 2)
        originals = []
        for s in samples:
            case = self.runtime.cases.get(s.case_id)
            if case is None:
                raise CaseNotFoundError(f"site {self.settings.site_id} has no case {s.case_id!r}")
            originals.append(extract(load_images(case, modalities, cache=self.runtime.cache).array, s))
        scores: dict[str, list[SampleScore]] = {}
        for name, t in images.items():
            recon = t.numpy()
            scores[name] = [
                _score(i, s.case_id, m, recon[i, c], originals[i][c], segmenters.get(m))
                for i, s in enumerate(samples) for c, m in enumerate(modalities)
            ]
        logger.info("site %s scored %d reconstructions of run %s step %d (segmenters: %s)", self.settings.site_id,
                    len(samples) * len(images), meta.run_id, meta.step, sorted(segmenters) or "none")
        return ScoreResponse(run_id=meta.run_id, step=meta.step, site=self.settings.site_id, scores=scores)


def _score(index: int, case_id: str, modality: str, recon: np.ndarray, original: np.ndarray,
           segmenter: WTSegmenter | None) -> SampleScore:
    if not (original != 0).any():  # no brain in this crop: nothing to compare (JSON has no NaN)
        return SampleScore(index=index, case_id=case_id, modality=modality, ssim=None, psnr=None, nmse=None)
    return SampleScore(index=index, case_id=case_id, modality=modality, ssim=brain_ssim(recon, original),
                       psnr=brain_psnr(recon, original), nmse=brain_nmse(recon, original),
                       semantic=semantic_score(segmenter, recon, original))
