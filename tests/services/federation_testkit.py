"""Constants and helpers shared by the service tests (fixtures are in this folder's ``conftest.py``)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from safetensors.torch import load_file

from services.aggregator.labels import LabelStore
from services.aggregator.trainer import TrainingJob
from splitunet.config import SiteSpec, SplitUNetConfig
from splitunet.data.grid import CaseGrid, case_grid, combine_grids
from splitunet.data.layout import discover_cases
from splitunet.data.loader import load_images
from splitunet.data.sampling import Sample, extract
from splitunet.federation import FederationSpec
from splitunet.training import InProcessFederation

#: One site per modality, named after it.
SITES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
#: Every site has its own token (scope ``aggregator``): the aggregator holds one per site.
SITE_TOKENS: Mapping[str, str] = {m: f"site-{m}-token-0123456789abcdef" for m in SITES}
#: The ``t1`` site's token (the ``site`` fixture) and the headers carrying it.
SITE_TOKEN = SITE_TOKENS["t1"]
SITE_HEADERS = {"Authorization": f"Bearer {SITE_TOKEN}"}
#: The operator token of the aggregator's job API (scope ``operator``).
AGG_TOKEN = "operator-token-0123456789abcdef"
AGG_HEADERS = {"Authorization": f"Bearer {AGG_TOKEN}"}
#: The audit service's token at the sites (scope ``audit``).
AUDIT_TOKEN = "audit-token-0123456789abcdef"
AUDIT_HEADERS = {"Authorization": f"Bearer {AUDIT_TOKEN}"}
#: The seed the test sites build their encoders from (``SITE_SEED``; a real site draws a secret one).
SITE_SEED = 11


def site_headers(name: str) -> dict[str, str]:
    """The headers the aggregator sends to site ``name`` (its own token)."""
    return {"Authorization": f"Bearer {SITE_TOKENS[name]}"}


def write_registry(folder: Path, tokens: Mapping[str, str] | None = None,
                   urls: Mapping[str, str] | None = None) -> Path:
    """Write an aggregator site registry (``AGG_SITES``) and one token file per site into ``folder``.

    ``tokens``: the token the aggregator holds for each site (default :data:`SITE_TOKENS`); ``urls``: each site's
    URL (default ``http://<name>.test``, never dialled by the in-process transports).
    """
    tokens = dict(SITE_TOKENS if tokens is None else tokens)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, token in tokens.items():
        (folder / f"{name}-token").write_text(token + "\n")
        url = (urls or {}).get(name, f"http://{name}.test")
        entries.append({"name": name, "url": url, "token_file": f"{name}-token"})
    path = folder / "sites.json"
    path.write_text(json.dumps({"sites": entries}))
    return path
#: RAS cases written in every party's folder; one more is stored in LPS orientation.
N_RAS_CASES = 4


@dataclass(frozen=True)
class Cohort:
    """Where the parties' data lies: one folder per site (its modality only) and the labels folder.

    ``shape`` is the cases' RAS ``(X, Y, Z)`` voxel shape.
    """

    site_dirs: Mapping[str, Path]
    labels_dir: Path
    case_ids: Sequence[str]
    lps_case: str
    shape: tuple[int, int, int]


def model_config(spatial_dims: int = 2, features: tuple[int, ...] = (4, 8, 16), **kwargs: Any) -> SplitUNetConfig:
    """A tiny Split-U-Net over the four one-modality sites."""
    sites = tuple(SiteSpec(name=m, modalities=(m,)) for m in SITES)
    return SplitUNetConfig(spatial_dims=spatial_dims, features=features, sites=sites, **kwargs)


def identity_aligner(clients: Mapping[str, Any], label_ids: Sequence[str]) -> list[str]:
    """The aggregator's real PSI alignment (the tests' cohorts are complete, so every labelled case is shared):
    the sites accept forwards only for a cohort aligned through their own PSI session."""
    from services.aggregator.alignment import psi_align

    return psi_align(clients, label_ids)


def align_site(
    client: httpx.Client, case_ids: Sequence[str], headers: Mapping[str, str] = SITE_HEADERS,
    claim: Sequence[str] | None = None,
) -> Any:
    """Align ``case_ids`` at one site over HTTP as the aggregator does: PSI, then the alignment naming the
    session. ``claim``: the ids to send as aligned (default: the PSI's intersection; an attacker sends others).
    Returns the alignment response."""
    from splitunet.psi import PsiClient, PsiResponse

    session = PsiClient(case_ids)
    reply = client.post("/v1/psi", json=session.request().model_dump(mode="json"), headers=dict(headers))
    assert reply.status_code == 200, reply.text
    shared = session.intersect(PsiResponse.model_validate(reply.json()))
    body = {"case_ids": list(claim) if claim is not None else shared, "session": session.session}
    return client.post("/v1/alignment", json=body, headers=dict(headers))


def peers(names: Sequence[str] = SITES) -> list[str]:
    """The ``sites`` of a federation spec: names from the aggregator's registry (see :func:`write_registry`)."""
    return list(names)


# ---------------------------------------------------------------------------------------------- jobs over HTTP
FINAL_STATES = ("succeeded", "failed", "stopped")


def wait_for_job(
    client: httpx.Client, job_id: str, states: Sequence[str] = FINAL_STATES, *, timeout_s: float = 120.0,
    headers: Mapping[str, str] = AGG_HEADERS,
) -> dict[str, Any]:
    """Poll ``GET /v1/jobs/{job_id}`` until the state is one of ``states``; return the status.

    ``client`` is any ``httpx.Client`` pointed at an aggregator: a ``TestClient`` or a real one (uvicorn).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get(f"/v1/jobs/{job_id}", headers=dict(headers))
        assert response.status_code == 200, response.text
        status = response.json()
        if status["state"] in states:
            return status
        assert time.monotonic() < deadline, f"job {job_id} still {status['state']} after {timeout_s} s: {status}"
        time.sleep(0.05)


def run_job(
    client: httpx.Client, spec: Mapping[str, Any], *, timeout_s: float = 120.0,
    headers: Mapping[str, str] = AGG_HEADERS,
) -> dict[str, Any]:
    """``POST /v1/jobs`` then wait until the job is over; return its final status."""
    response = client.post("/v1/jobs", json=dict(spec), headers=dict(headers))
    assert response.status_code == 202, response.text
    return wait_for_job(client, response.json()["job_id"], timeout_s=timeout_s, headers=headers)


# ---------------------------------------------------------------------------------------------- the reference
def site_specs(spec: FederationSpec) -> tuple[SiteSpec, ...]:
    """The sites as the aggregator builds them: in the spec's order, each with the modality its folder holds."""
    return tuple(SiteSpec(name=name, modalities=(name,)) for name in spec.sites)


def site_grids(cohort: Cohort, case_ids: Sequence[str]) -> dict[str, CaseGrid]:
    """What the sites of ``cohort`` report for ``case_ids`` (``POST /v1/grids``), combined, computed offline."""
    cases = {m: discover_cases(cohort.site_dirs[m]) for m in cohort.site_dirs}
    return {
        c: combine_grids(c, {m: case_grid(cases[m][c], (m,)) for m in cohort.site_dirs}) for c in case_ids
    }


def derive_plans(
    spec: FederationSpec, labels: LabelStore, train_cases: Sequence[str], steps: int, cohort: Cohort
) -> list[list[Sample]]:
    """The samples a job with ``spec`` plans for steps ``1..steps``, derived offline (no site is called).

    A job's plan depends only on the spec's seed, its training cases, the labels and the brain extents the sites
    report, so a test can learn what a job in another process trained on from its status (``val_case_ids``) alone.
    """
    job = TrainingJob("plan", spec, labels=labels, clients={}, aligner=identity_aligner,
                      device=torch.device("cpu"), state_dir=Path("unused"), max_workers=1)
    try:
        job.train_cases = list(train_cases)
        job.grids = site_grids(cohort, train_cases)
        return [job.plan(step) for step in range(1, steps + 1)]
    finally:
        job.close()


def reference_batch(
    samples: Sequence[Sample], config: SplitUNetConfig, cohort: Cohort, labels: LabelStore
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the parties cut for ``samples``: images ``B, C, *roi`` (``config.modalities`` order, each site's
    channels loaded from its own folder as the site does) and regions ``B, 3, *roi`` float 0/1."""
    cases = {s.name: discover_cases(cohort.site_dirs[s.name], require=s.modalities) for s in config.sites}
    images = [
        np.concatenate([
            extract(load_images(cases[s.name][sample.case_id], s.modalities).array, sample) for s in config.sites
        ])
        for sample in samples
    ]
    regions = [extract(labels.regions(sample.case_id), sample) for sample in samples]
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(regions).astype(np.float32))


def replay_in_process(
    spec: FederationSpec, config: SplitUNetConfig, plans: Sequence[Sequence[Sample]], cohort: Cohort,
    labels: LabelStore,
) -> tuple[list[float], InProcessFederation]:
    """Train the in-process step protocol on exactly ``plans`` (one list of samples per step)."""
    if spec.site_optimizer.weight_decay != spec.server_optimizer.weight_decay:
        raise ValueError("the in-process reference takes one weight_decay for every party")
    federation = InProcessFederation(
        config, seed=spec.seed, lr_site=spec.site_optimizer.lr, lr_server=spec.server_optimizer.lr,
        weight_decay=spec.site_optimizer.weight_decay, loss=spec.loss,
    )
    losses = []
    for step, samples in enumerate(plans, start=1):
        images, regions = reference_batch(samples, config, cohort, labels)
        losses.append(federation.train_step(images, regions, step))
    return losses, federation


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """The module weights stored in a party's checkpoint (``model.<name>`` tensors), by parameter name."""
    tensors = load_file(str(path))
    return {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}


def max_weight_difference(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> float:
    """Largest absolute difference between two state dicts with the same keys and shapes."""
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    worst = 0.0
    for name, tensor in want.items():
        assert got[name].shape == tensor.shape, name
        worst = max(worst, (got[name].double() - tensor.double()).abs().max().item() if tensor.numel() else 0.0)
    return worst
