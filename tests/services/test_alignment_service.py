"""Patient alignment over the services: PSI with every site, partial overlap, and sites serving only the
aligned cohort."""

from __future__ import annotations

import os
from pathlib import Path

from federation_testkit import AGG_HEADERS, SITE_HEADERS, SITES, Cohort, align_site, peers, run_job, site_headers

from services.aggregator.app import create_app as create_aggregator_app
from services.client_site.app import create_app as create_site_app


def _without(source: Path, dest: Path, drop: str) -> Path:
    """A copy (by symbolic links) of a party's folder that lacks case ``drop``."""
    dest.mkdir(parents=True)
    for case in source.iterdir():
        if case.name != drop:
            os.symlink(case.resolve(), dest / case.name, target_is_directory=True)
    return dest


def test_psi_alignment_with_partial_overlap(start_app, site_settings, aggregator_settings, cohort: Cohort, tmp_path):
    missing_at_t2, missing_at_labels = cohort.case_ids[0], cohort.case_ids[1]
    data = {name: cohort.site_dirs[name] for name in SITES}
    data["t2"] = _without(cohort.site_dirs["t2"], tmp_path / "t2-partial", missing_at_t2)
    labels = _without(cohort.labels_dir, tmp_path / "labels-partial", missing_at_labels)
    sites = {name: start_app(create_site_app(site_settings(name, data_dir=data[name]))) for name in SITES}
    aggregator = start_app(create_aggregator_app(  # the real PSI aligner (the default), sites in process
        aggregator_settings(data_dir=labels), transport_factory=lambda peer: sites[peer.name]._transport
    ))
    spec = {"sites": peers(), "model": {"spatial_dims": 2, "features": [4, 8, 16]}, "roi": [16, 16],
            "batch_size": 2, "steps": 2, "val_cases": 1, "seed": 1}
    status = run_job(aggregator, spec, headers=AGG_HEADERS)
    assert status["state"] == "succeeded", status
    expected = sorted(set(cohort.case_ids) - {missing_at_t2, missing_at_labels})
    assert status["aligned_cases"] == len(expected)
    assert set(status["val_case_ids"]) <= set(expected)

    # the sites now serve only the aligned cohort: a case outside it is refused even where the site has it
    run_id = status["job_id"]
    sample = {"case_id": missing_at_labels, "start": [0, 0], "size": [16, 16], "axial_index": 3}
    response = sites["t1"].post(f"/v1/runs/{run_id}/forward", json={"step": 99, "phase": "eval", "samples": [sample]},
                                headers=SITE_HEADERS)
    assert response.status_code == 409 and response.json()["code"] == "not_aligned", response.text
    # and an alignment naming a case the site does not hold is refused, without saying which or how many
    claim = [missing_at_t2, expected[0]]
    refused = align_site(sites["t2"], claim, headers=site_headers("t2"), claim=claim)
    assert refused.status_code == 403 and refused.json()["code"] == "policy_violation", refused.text
    assert missing_at_t2 not in refused.text and "unknown" not in refused.text
