"""A training step over mutual TLS between real uvicorn processes, through the aggregator's own site-client
settings (``AGG_SITE_CA_FILE``, ``AGG_SITE_CLIENT_CERT_FILE``/``KEY_FILE``); a client certificate from another CA
is refused by the site."""

from __future__ import annotations

import httpx
import pytest
from federation_testkit import Cohort, run_job

from splitunet.launcher import LocalFederation
from splitunet.service.client import tls_context
from splitunet.service.pki import ThrowawayCA


def test_training_step_over_mutual_tls(cohort: Cohort, tmp_path, security) -> None:
    with LocalFederation(tmp_path / "fed", torch_threads=1, tls=True) as federation:
        site = federation.start_site("t1", ["t1"], cohort.site_dirs["t1"])
        aggregator = federation.start_aggregator(cohort.labels_dir)
        assert site.url.startswith("https://") and aggregator.url.startswith("https://")
        federation.wait_ready(timeout_s=180)
        spec = {"sites": ["t1"], "model": {"spatial_dims": 2, "features": [4, 8, 16]}, "roi": [16, 16],
                "batch_size": 2, "steps": 1, "val_cases": 1, "seed": 1}
        with federation.client(aggregator) as client:
            status = run_job(client, spec, timeout_s=240, headers=federation.operator_headers())
        assert status["state"] == "succeeded", status
        assert len(status["losses"]) == 1 and status["bytes_sent"] > 0

        # a client certificate from another CA: the site refuses the TLS handshake
        rogue = ThrowawayCA(tmp_path / "rogue", "rogue-ca")
        files = rogue.client("rogue-client")
        context = tls_context(ca_file=federation.ca_file, cert_file=files.cert, key_file=files.key)
        headers = {"Authorization": f"Bearer {federation.site_tokens['t1']}"}
        with httpx.Client(verify=context, timeout=10) as client, pytest.raises(httpx.TransportError):
            client.get(f"{site.url}/v1/info", headers=headers)
        security.blocked("foreign_client_certificate")
        # no client certificate at all: refused too
        with httpx.Client(verify=tls_context(ca_file=federation.ca_file), timeout=10) as client:
            with pytest.raises(httpx.TransportError):
                client.get(f"{site.url}/v1/info", headers=headers)
        security.blocked("missing_client_certificate")
        # plain HTTP to a TLS service gets no answer
        with httpx.Client(timeout=10) as client, pytest.raises(httpx.TransportError):
            client.get(site.url.replace("https://", "http://") + "/healthz")
