"""Where an audit gets the encoder weights (white-box), how it scores reconstructions, and the sites' findings.

- Where the data is (a site-local audit, :mod:`splitunet.auditing.site_local`): :class:`LabScorer` over the
  site's own data folder and :class:`SnapshotDirSource` over the site's own state folder. Nothing leaves.
- Federated mode (the central audit): :class:`SiteFindingsClient` asks each site to run that audit and collects
  the figures it publishes. No site endpoint returns its weights or scores tensors a caller supplies: the
  routes that did (``GET /v1/runs/{run}/audit/encoder``, ``POST /v1/score``) are gone (docs/threat-model.md).
- Lab mode (phantom, tests: one operator holds everything): the same :class:`LabScorer` and
  :class:`SnapshotDirSource` over every party's folders.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import load_file

from splitunet.auditing.cohorts import LabCohort
from splitunet.auditing.segmenter import WTSegmenter, semantic_score
from splitunet.data.sampling import Sample
from splitunet.errors import ConfigurationError, NotFoundError, PeerError
from splitunet.federation import SitePeer
from splitunet.leakage import brain_nmse, brain_psnr, brain_ssim
from splitunet.service.client import PeerClient, PeerTimeouts

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


class NoScorer:
    """For audits that score no image (the aggregator's label-leakage audit holds no original)."""

    def score(self, site: str, modalities: Sequence[str], run_id: str, step: int, samples: Sequence[Sample],
              tensors: Mapping[str, torch.Tensor], *,
              segmenters: Mapping[str, WTSegmenter] | None = None) -> Scores:
        raise ConfigurationError("this audit holds no original image to score reconstructions against: image "
                                 "attacks are each site's own audit")


class AggregatorLabels(LabCohort):
    """The aggregator's own segmentations for its label-leakage audit: tumour masks, never an image (``images``
    returns ``None``, so the runner computes no image figure from them).

    Args:
        labels_dir: the aggregator's BraTS-layout folder of segmentations (``AGG_DATA_DIR``).
    """

    def __init__(self, labels_dir: Path | str) -> None:
        super().__init__(labels_dir, labels_dir)

    def images(self, samples: Sequence[Sample], modalities: Sequence[str]) -> None:  # type: ignore[override]
        return None

    def case_ids(self) -> list[str]:
        return sorted(self._label_cases)


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


class SiteFindingsClient:
    """Federated mode: asks each site to audit its own traffic on its own premises and collects the figures it
    publishes (``POST /v1/runs/{run}/audits``, then ``GET /v1/runs/{run}/audits/{id}``; the site's ``audit``
    credential, one per site). No weight, image or reconstruction crosses: only the site's findings (brain SSIM,
    PSNR, NMSE, RDLV, semantic leakage, dCor, re-identification rate, per attack and step).

    Calls that could not reach a site are retried for about 20 s (:data:`SITE_RETRIES`).
    """

    def __init__(self, peers: Sequence[SitePeer], *, timeout_s: float = 120.0, transport_factory=None,
                 verify: object = True, poll_s: float = 0.5, audit_timeout_s: float = 3600.0) -> None:
        self.poll_s, self.audit_timeout_s = poll_s, audit_timeout_s
        self.clients = {
            p.name: PeerClient(p.url, name=f"site {p.name}", token=p.bearer(),
                               timeouts=PeerTimeouts(connect=10.0, read=timeout_s, write=timeout_s, pool=timeout_s),
                               retries=SITE_RETRIES, max_response_bytes=2**22, verify=verify,
                               transport=transport_factory(p) if transport_factory else None)
            for p in peers
        }

    def _client(self, site: str) -> PeerClient:
        if site not in self.clients:
            raise NotFoundError(f"the audit has no credential for site {site!r}; add it to the audit's sites")
        return self.clients[site]

    def start(self, site: str, run_id: str, request: Mapping) -> str:
        """Ask ``site`` to audit its record of ``run_id``; the site's audit id."""
        return self._client(site).post_json(f"/v1/runs/{run_id}/audits", dict(request))["audit_id"]

    def wait(self, site: str, run_id: str, audit_id: str, progress=None) -> dict:
        """The site's final audit status (JSON); raises when it failed or did not finish in time."""
        deadline = time.monotonic() + self.audit_timeout_s
        while True:
            status = self._client(site).get_json(f"/v1/runs/{run_id}/audits/{audit_id}")
            if status["state"] not in ("pending", "running"):
                break
            if progress is not None:
                progress(float(status.get("progress") or 0.0), status.get("message") or "")
            if time.monotonic() > deadline:
                raise PeerError(f"site {site}'s audit {audit_id} of run {run_id} did not finish in "
                                f"{self.audit_timeout_s:.0f} s", detail={"site": site})
            time.sleep(self.poll_s)
        if status["state"] != "succeeded":
            error = status.get("error") or {}
            raise PeerError(f"site {site}'s own audit of run {run_id} failed: {error.get('message')}",
                            detail={"site": site, "error": error})
        return status

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
