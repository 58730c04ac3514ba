"""The dev overlay configures the code: its workloads run here with exactly their environment and files.

The phantom Job fills the volumes (8 cases instead of 24, to keep the test short), the four sites, the
aggregator and the audit start as local processes from the rendered manifests (see ``local_pods``), and an
operator trains a few steps through the aggregator's REST API and audits the recorded traffic.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from local_pods import LocalCluster, secret_value
from manifests import SITES


def _secret_name(cluster: LocalCluster, prefix: str) -> str:
    names = [n for n in cluster.rendered.names("Secret") if n.startswith(prefix + "-") or n == prefix]
    assert len(names) == 1, f"expected one Secret {prefix}-<hash>, got {names}"
    return names[0]


def _wait_ready(cluster: LocalCluster, names: list[str], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(names)
    with httpx.Client(timeout=2.0) as client:
        while pending:
            for name in list(pending):
                pod = cluster.pods[name]
                assert pod.process is not None and pod.process.poll() is None, (
                    f"{name} exited during start-up:\n{cluster.log_tail(name)}"
                )
                try:
                    if client.get(f"{cluster.url(name)}/readyz").status_code == 200:
                        pending.remove(name)
                except httpx.TransportError:
                    pass
            assert time.monotonic() < deadline, f"not ready: {pending}\n{cluster.log_tail(pending[0])}"
            time.sleep(0.3)


@pytest.fixture
def dev_cluster(rendered_overlays, tmp_path: Path) -> Iterator[LocalCluster]:
    cluster = LocalCluster(rendered_overlays["dev"], tmp_path)
    try:
        yield cluster
    finally:
        cluster.stop()


def test_dev_overlay_trains_and_audits_as_configured(dev_cluster: LocalCluster) -> None:
    cluster = dev_cluster
    cluster.run_job("phantom-data", replace={"--cases 24": "--cases 8"})
    for m in SITES:
        assert any(cluster.claim(f"site-data-{m}").iterdir()), f"the phantom job left site {m}'s volume empty"
    services = [f"site-{m}" for m in SITES] + ["aggregator"]
    for name in services:
        cluster.start(name)
    _wait_ready(cluster, services)

    operator = secret_value(cluster, _secret_name(cluster, "aggregator-credentials"), "operator-token")
    headers = {"Authorization": f"Bearer {operator}"}
    sites = [
        {"name": m, "url": f"http://{cluster.pods[f'site-{m}'].service}:8101",
         "token": secret_value(cluster, _secret_name(cluster, "aggregator-credentials"), f"site-{m}-token")}
        for m in SITES
    ]
    sites = [{**s, "url": cluster._rewrite_text(s["url"])} for s in sites]
    spec = {
        "sites": sites,
        "model": {"spatial_dims": 2, "features": [4, 8, 16], "cut_level": 0},
        "roi": [32, 32], "batch_size": 2, "steps": 3, "val_cases": 2, "max_val_cases": 1,
    }
    with httpx.Client(base_url=cluster.url("aggregator"), headers=headers, timeout=30) as client:
        created = client.post("/v1/jobs", json=spec)
        assert created.status_code == 202, created.text
        job_id = created.json()["job_id"]
        deadline = time.monotonic() + 300
        while True:
            status = client.get(f"/v1/jobs/{job_id}").json()
            if status["state"] in ("succeeded", "failed", "stopped"):
                break
            assert time.monotonic() < deadline, f"job not finished: {status}\n{cluster.log_tail('aggregator')}"
            time.sleep(1)
    assert status["state"] == "succeeded", f"{status.get('error')}\n{cluster.log_tail('aggregator')}"
    assert status["step"] == 3
