"""In-process site and aggregator services over a tiny generated cohort.

Every site holds one modality in its own folder, the aggregator only the segmentations, as in a real
deployment. Apps run in process (Starlette ``TestClient``); the aggregator reaches the sites through their
``TestClient`` transports, so no socket is opened. Alignment is injected (identity on the aggregator's case
ids): the PSI protocol is tested on its own.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from federation_testkit import (
    AGG_TOKEN,
    AUDIT_TOKEN,
    N_RAS_CASES,
    SITE_SEED,
    SITE_TOKENS,
    SITES,
    Cohort,
    identity_aligner,
    write_registry,
)

from services.aggregator.app import create_app as create_aggregator_app
from services.aggregator.settings import AggregatorSettings
from services.client_site.app import create_app as create_site_app
from services.client_site.settings import SiteSettings


@pytest.fixture(scope="session", autouse=True)
def _few_torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory, brats) -> Cohort:
    """Five 24x24x16 cases (the last one stored LPS), split across four site folders and the labels folder."""
    root = tmp_path_factory.mktemp("cohort")
    ids = []
    for index in range(N_RAS_CASES + 1):
        orientation = "LPS" if index == N_RAS_CASES else "RAS"
        for m in SITES:
            brats.write_case(root / f"site-{m}", index, modalities=(m,), seg=False, orientation=orientation)
        ids.append(brats.write_case(root / "labels", index, modalities=(), orientation=orientation).name)
    return Cohort(
        site_dirs={m: root / f"site-{m}" for m in SITES},
        labels_dir=root / "labels",
        case_ids=ids,
        lps_case=ids[-1],
        shape=tuple(brats.SHAPE),
    )


@pytest.fixture(scope="session")
def identities(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each site's Ed25519 identity key file, and under ``"peers"`` the file pinning all four public keys (what
    every site's ``SITE_PEER_KEYS`` holds)."""
    from splitunet.signing import IdentityKey

    root = tmp_path_factory.mktemp("identities")
    keys = {m: IdentityKey.load_or_create(root / f"{m}.key") for m in SITES}
    peers = root / "peer-keys.json"
    peers.write_text(json.dumps({"keys": {m: k.public_key for m, k in keys.items()}}))
    return {**{m: root / f"{m}.key" for m in SITES}, "peers": peers}


@pytest.fixture
def site_settings(cohort: Cohort, tmp_path: Path, identities: dict[str, Path]) -> Callable[..., SiteSettings]:
    """``site_settings(name, **overrides)``: the settings of one site over the cohort (its own token, the audit
    token, and the reproducible ``SITE_SEED`` the equivalence tests need)."""

    def make(name: str = "t1", **overrides: Any) -> SiteSettings:
        values: dict[str, Any] = {
            "site_id": name,
            "modalities": name,
            "data_dir": cohort.site_dirs[name],
            "state_dir": tmp_path / f"site-{name}-state",
            "auth_token": SITE_TOKENS[name],
            "scope_tokens": {"audit": AUDIT_TOKEN},
            "seed": SITE_SEED,
            "device": "cpu",
            "transcript": {"enabled": True, "fsync": False},
            "identity_key_file": identities[name],
            "peer_keys": identities["peers"],
        }
        return SiteSettings(**(values | overrides))

    return make


@pytest.fixture
def start_app(security) -> Iterator[Callable[[Any], TestClient]]:
    """``start_app(app)``: a started ``TestClient`` (lifespan entered), closed after the test; every response the
    app gave is counted in the security summary (its 5xx too)."""
    apps: list[Any] = []

    def start(app: Any) -> TestClient:
        apps.append(app)
        return stack.enter_context(TestClient(app, raise_server_exceptions=False))

    with ExitStack() as stack:
        yield start
    for app in apps:
        security.observe_app(app)


@pytest.fixture
def site(start_app, site_settings) -> TestClient:
    """The ``t1`` site service, started."""
    return start_app(create_site_app(site_settings("t1")))


@pytest.fixture
def sites(start_app, site_settings) -> dict[str, TestClient]:
    """All four site services, started."""
    return {m: start_app(create_site_app(site_settings(m))) for m in SITES}


@pytest.fixture
def recording_sites(start_app, site_settings) -> dict[str, TestClient]:
    """All four site services, started, each recording every train step of its own traffic (its own audits)."""
    transcript = {"enabled": True, "every": 1, "fsync": False}
    return {m: start_app(create_site_app(site_settings(m, transcript=transcript))) for m in SITES}


@pytest.fixture
def aggregator_settings(cohort: Cohort, tmp_path: Path) -> Callable[..., AggregatorSettings]:
    def make(**overrides: Any) -> AggregatorSettings:
        values: dict[str, Any] = {
            "data_dir": cohort.labels_dir,
            "state_dir": tmp_path / "aggregator-state",
            "sites": write_registry(tmp_path / "registry"),
            "auth_token": AGG_TOKEN,
            "device": "cpu",
        }
        return AggregatorSettings(**(values | overrides))

    return make


@pytest.fixture
def aggregator(start_app, aggregator_settings, sites) -> TestClient:
    """The aggregator service, started, reaching the four in-process sites (its registry: :func:`write_registry`)
    through their transports."""
    app = create_aggregator_app(
        aggregator_settings(),
        aligner=identity_aligner,
        transport_factory=lambda peer: sites[peer.name]._transport,
    )
    return start_app(app)

