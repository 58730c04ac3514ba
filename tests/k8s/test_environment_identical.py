"""The dev overlay configures the code: its workloads run here with exactly their environment and files.

The phantom Job fills the volumes (8 cases instead of 24, to keep the test short), the four sites, the
aggregator and the audit start as local processes from the rendered manifests (see ``local_pods``), and an
operator trains a few steps through the aggregator's REST API and audits the recorded traffic, through the
audit service and through the audit's Job form.
"""

from __future__ import annotations

import json
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


def _wait(client: httpx.Client, path: str, final: tuple[str, ...], cluster: LocalCluster, who: str,
          timeout_s: float = 420) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get(path)
        assert status.status_code == 200, status.text
        doc = status.json()
        if doc["state"] in final:
            return doc
        assert time.monotonic() < deadline, f"{path} not finished: {doc}\n{cluster.log_tail(who)}"
        time.sleep(1)


def test_dev_overlay_trains_and_audits_as_configured(dev_cluster: LocalCluster) -> None:
    cluster = dev_cluster
    cluster.run_job("phantom-data", replace={"--cases 24": "--cases 8"})
    for m in SITES:
        assert any(cluster.claim(f"site-data-{m}").iterdir()), f"the phantom job left site {m}'s volume empty"
    services = [f"site-{m}" for m in SITES] + ["aggregator", "audit"]
    for name in services:
        cluster.start(name)
    _wait_ready(cluster, services)

    # the operator's token, as an operator would read it from the Secret the overlay generated
    operator = secret_value(cluster, _secret_name(cluster, "aggregator-credentials"), "operator-token")
    headers = {"Authorization": f"Bearer {operator}"}
    spec = {
        "sites": list(SITES),  # names of the registry the overlay mounts (AGG_SITES)
        "model": {"spatial_dims": 2, "features": [4, 8, 16], "cut_level": 0},
        # whole slices resized to 32x32 keep the validation to a few requests (sliding windows over a 96^2 slice
        # would be hundreds on two shared cores)
        "roi": [32, 32], "resize_slices": True, "batch_size": 8, "steps": 3, "val_cases": 2, "max_val_cases": 1,
    }
    with httpx.Client(base_url=cluster.url("aggregator"), headers=headers, timeout=60) as client:
        created = client.post("/v1/jobs", json=spec)
        assert created.status_code == 202, created.text
        job_id = created.json()["job_id"]
        status = _wait(client, f"/v1/jobs/{job_id}", ("succeeded", "failed", "stopped"), cluster, "aggregator")
    assert status["state"] == "succeeded", f"{status.get('error')}\n{cluster.log_tail('aggregator')}"
    assert status["step"] == 3

    # the central audit reads the transcript from the aggregator's volume and asks site t1 (AUDIT_SITES) to
    # audit its own record: only the figures come back
    audit_spec = {"steps": [3], "attacks": ["whitebox", "label_leakage"], "budgets": {"whitebox_iterations": 50}}
    with httpx.Client(base_url=cluster.url("audit"), headers=headers, timeout=60) as client:
        created = client.post("/v1/audits", json={"run_id": job_id, "sites": ["t1"], "spec": audit_spec})
        assert created.status_code == 202, created.text
        audit_id = created.json()["audit_id"]
        audit = _wait(client, f"/v1/audits/{audit_id}", ("succeeded", "failed"), cluster, "audit")
        assert audit["state"] == "succeeded", f"{audit.get('error')}\n{cluster.log_tail('audit')}"
        findings = audit["result"]["findings"]
        # t1's own audit (figures) and the aggregator's label audit on its labels volume, assembled
        assert [(f["site"], f["attack"]) for f in findings] == [("t1", "whitebox"), ("t1", "label_leakage")]
        assert findings[0]["ssim"] is not None
        assert [p["party"] for p in audit["parties"]] == ["site:t1", "aggregator"], audit["parties"]
        report = client.get(f"/v1/audits/{audit_id}/report")
        assert report.status_code == 200 and "text/html" in report.headers["content-type"]

    # the audit's Job form (a Job created from the CronJob template): the operator names the run in the optional
    # ConfigMap `audit-run`; the Job reads the service's configuration, asks t1, writes to its reports volume
    request = {"AUDIT_RUN_ID": job_id, "AUDIT_RUN_SITES": "t1", "AUDIT_RUN_SPEC": json.dumps(audit_spec)}
    once = json.loads(cluster.run_job("audit-once", configmaps={"audit-run": request}, timeout=420))
    assert once["state"] == "succeeded" and once["run_id"] == job_id, once
    assert [(f["site"], f["attack"]) for f in once["result"]["findings"]] == [("t1", "whitebox"),
                                                                          ("t1", "label_leakage")]
    written = cluster.claim("audit-reports") / job_id / once["audit_id"]
    assert json.loads((written / "result.json").read_text())["findings"] == once["result"]["findings"]
    assert "<html" in (written / "report.html").read_text().lower()
