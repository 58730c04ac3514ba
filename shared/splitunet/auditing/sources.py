"""Where an audit gets the encoder weights (white-box) and how it scores reconstructions.

- Federated mode: :class:`SiteAuditClient` asks each site for its weight snapshot
  (``GET /v1/runs/{run}/audit/encoder``) and sends reconstructions to ``POST /v1/score``, which compares them with
  the site's own originals and returns numbers only. Both calls need the site's ``audit`` credential. The audit's
  frozen WT segmenters travel in the same bundle (``segmenter/<modality>/<key>`` tensors, annotation
  ``x.segmenter``; see :mod:`splitunet.auditing.segmenter`), so the site computes semantic leakage in place.
- Lab mode (phantom, tests): :class:`LabScorer` reads the cohort directly; :class:`SnapshotDirSource` reads the
  sites' snapshot folders.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import load, load_file

from splitunet.auditing.cohorts import LabCohort
from splitunet.auditing.segmenter import ARCHITECTURE, WTSegmenter, semantic_score, to_wire_tensors
from splitunet.data.sampling import Sample
from splitunet.errors import NotFoundError
from splitunet.federation import SitePeer
from splitunet.leakage import brain_nmse, brain_psnr, brain_ssim
from splitunet.service.client import PeerClient, PeerTimeouts
from splitunet.wire import DEFAULT_MAX_BYTES, BundleKind, BundleMeta, WireDtype, encode_bundle

#: Per reconstruction tensor name: one ``{"index", "case_id", "modality", "ssim", "psnr", "nmse", "semantic"}`` per
#: sample and modality (``semantic`` is ``None`` without a segmenter of that modality or a tumour it finds).
Scores = dict[str, list[dict]]


class WeightSource(Protocol):
    def encoder_state(self, site: str, run_id: str, step: int, phase: str) -> dict[str, torch.Tensor]:
        ...


class Scorer(Protocol):
    def score(self, site: str, modalities: Sequence[str], run_id: str, step: int, samples: Sequence[Sample],
              tensors: Mapping[str, torch.Tensor], *,
              segmenters: Mapping[str, WTSegmenter] | None = None) -> Scores:
        ...


def score_arrays(recon: np.ndarray, originals: np.ndarray, samples: Sequence[Sample], modalities: Sequence[str],
                 segmenters: Mapping[str, WTSegmenter] | None = None) -> list[dict]:
    """Scores of ``recon`` against ``originals`` (both ``B, C, *spatial``), per sample and modality."""
    segmenters = segmenters or {}
    out = []
    for i, s in enumerate(samples):
        for c, m in enumerate(modalities):
            x = originals[i, c]
            if not (x != 0).any():
                continue
            out.append({"index": i, "case_id": s.case_id, "modality": m, "ssim": brain_ssim(recon[i, c], x),
                        "psnr": brain_psnr(recon[i, c], x), "nmse": brain_nmse(recon[i, c], x),
                        "semantic": semantic_score(segmenters.get(m), recon[i, c], x)})
    return out


class LabScorer:
    """Scores against the cohort read from disk (lab mode)."""

    def __init__(self, cohort: LabCohort) -> None:
        self.cohort = cohort

    def score(self, site: str, modalities: Sequence[str], run_id: str, step: int, samples: Sequence[Sample],
              tensors: Mapping[str, torch.Tensor], *,
              segmenters: Mapping[str, WTSegmenter] | None = None) -> Scores:
        originals = self.cohort.images(samples, modalities)
        return {name: score_arrays(t.numpy(), originals, samples, modalities, segmenters)
                for name, t in tensors.items()}


class SnapshotDirSource:
    """Weights from the sites' state folders (lab mode): ``{site: <SITE_STATE_DIR>}``."""

    def __init__(self, state_dirs: Mapping[str, Path | str]) -> None:
        self.state_dirs = {k: Path(v) for k, v in state_dirs.items()}

    def encoder_state(self, site: str, run_id: str, step: int, phase: str) -> dict[str, torch.Tensor]:
        path = self.state_dirs.get(site, Path("/nonexistent")) / run_id / "audit" / (
            f"encoder-{phase}-{step:08d}.safetensors")
        if not path.is_file():
            raise NotFoundError(f"no encoder snapshot of site {site!r} at {phase} step {step} ({path})")
        return load_file(str(path))


#: Extra attempts of an audit's call to a site that could not be reached (backoff 0.2 s doubling, capped at 5 s:
#: about 21 s in all), so an audit rides over a site's restart (maintenance, another ``SITE_DEFENSES``).
SITE_RETRIES = 8


class SiteAuditClient:
    """Federated mode: the sites' audit endpoints, one :class:`PeerClient` per site (audit credential); calls that
    could not reach a site are retried for about 20 s (:data:`SITE_RETRIES`)."""

    def __init__(self, peers: Sequence[SitePeer], *, timeout_s: float = 120.0, transport_factory=None,
                 max_bytes: int = DEFAULT_MAX_BYTES, verify: object = True) -> None:
        self.max_bytes = max_bytes
        self.clients = {
            p.name: PeerClient(p.url, name=f"site {p.name}", token=p.bearer(),
                               timeouts=PeerTimeouts(connect=10.0, read=timeout_s, write=timeout_s, pool=timeout_s),
                               retries=SITE_RETRIES, max_response_bytes=max_bytes, verify=verify,
                               transport=transport_factory(p) if transport_factory else None)
            for p in peers
        }

    def _client(self, site: str) -> PeerClient:
        if site not in self.clients:
            raise NotFoundError(f"the audit has no credential for site {site!r}; add it to the audit's sites")
        return self.clients[site]

    def encoder_state(self, site: str, run_id: str, step: int, phase: str) -> dict[str, torch.Tensor]:
        response = self._client(site).request("GET", f"/v1/runs/{run_id}/audit/encoder",
                                              params={"step": step, "phase": phase},
                                              accept="application/octet-stream")
        return load(response.content)

    def score(self, site: str, modalities: Sequence[str], run_id: str, step: int, samples: Sequence[Sample],
              tensors: Mapping[str, torch.Tensor], *,
              segmenters: Mapping[str, WTSegmenter] | None = None) -> Scores:
        """The site's scores of ``tensors``; with ``segmenters`` their weights go along (semantic leakage)."""
        extra = {"samples": json.dumps([s.model_dump(mode="json") for s in samples])}
        if segmenters:
            extra["segmenter"] = ARCHITECTURE
        meta = BundleMeta(run_id=run_id, step=step, site=site, kind=BundleKind.ACTIVATIONS, extra=extra)
        data = encode_bundle({**tensors, **to_wire_tensors(segmenters or {})}, meta=meta, dtype=WireDtype.FP32,
                             max_bytes=self.max_bytes)
        reply = self._client(site).post_bundle("/v1/score", data, idempotent=True)
        return {name: list(rows) for name, rows in reply["scores"].items()}

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
