"""A site protects itself: its own seed, its policy, its evaluation budget, PSI-bound alignment, no eviction of a
training run, a disk budget, typed errors for corrupt checkpoints and hostile bundles."""

from __future__ import annotations

import datetime as dt
import json
import struct
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from federation_testkit import AGG_HEADERS, AUDIT_HEADERS, SITE_HEADERS, Cohort, align_site, model_config
from safetensors.torch import save as safetensors_save

from services.client_site.app import create_app as create_site_app
from services.client_site.policy import EvalBudget, SitePolicy
from splitunet.schemas import RunSetup
from splitunet.wire import CONTENT_TYPE, FORMAT_VERSION, pack_frame

RUN = "run-b"
MODEL = model_config(cut_level=2)


def setup_body(run_id: str = RUN, **kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("model", MODEL)
    return RunSetup(run_id=run_id, **kwargs).model_dump(mode="json")


def sample(case_id: str, z: int = 6) -> dict[str, Any]:
    return {"case_id": case_id, "start": [4, 2], "size": [16, 16], "axial_index": z}


def forward(client: TestClient, case_ids: list[str], *, run_id: str = RUN, phase: str = "train", step: int = 1):
    body = {"step": step, "phase": phase, "samples": [sample(c, 6 + i) for i, c in enumerate(case_ids)]}
    return client.post(f"/v1/runs/{run_id}/forward", json=body, headers=SITE_HEADERS)


def started(start_app, site_settings, **overrides: Any) -> TestClient:
    return start_app(create_site_app(site_settings("t1", **overrides)))


def aligned_run(client: TestClient, run_id: str = RUN, **setup: Any) -> None:
    assert align_site(client, client.app.state.runtime.case_ids()).status_code == 200
    response = client.post("/v1/runs", json=setup_body(run_id, **setup), headers=SITE_HEADERS)
    assert response.status_code == 200, response.text


def rule_of(response) -> str:
    assert response.status_code == 403 and response.json()["code"] == "policy_violation", response.text
    return response.json()["detail"]["rule"]


# ---------------------------------------------------------------------------------------------- the seed
def test_encoder_comes_from_the_sites_own_randomness(start_app, site_settings, security) -> None:
    fingerprints = []
    for _ in range(2):
        client = started(start_app, site_settings, seed=None)
        aligned_run(client)
        fingerprints.append(client.get("/v1/info", headers=SITE_HEADERS).json()["runs"][RUN]["fingerprint"])
        weights = client.app.state.runtime.encoder(RUN).state_dict()
        fingerprints.append(tuple(float(v.float().sum()) for v in weights.values()))
    assert fingerprints[1] != fingerprints[3], "two sites without SITE_SEED built the same encoder"
    # the aggregator cannot impose a seed: the field does not exist any more
    client = started(start_app, site_settings, seed=None)
    body = setup_body("run-seeded") | {"seed": 0}
    security.refused("imposed_seed", client.post("/v1/runs", json=body, headers=SITE_HEADERS).status_code,
                     expected=422)


def test_site_seed_makes_the_encoder_reproducible(start_app, site_settings) -> None:
    a, b = started(start_app, site_settings, seed=5), started(start_app, site_settings, seed=5)
    for client in (a, b):
        aligned_run(client)
    wa, wb = (c.app.state.runtime.encoder(RUN).state_dict() for c in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------------------------------------- the policy
@pytest.mark.parametrize(
    ("policy", "setup", "rule"),
    [
        pytest.param({"min_cut_level": 2}, {"model": model_config(cut_level=1)}, "min_cut_level", id="cut"),
        pytest.param({"allowed_skips": [1]}, {"model": model_config(cut_level=2)}, "allowed_skips", id="skips"),
        pytest.param({"max_width": 8}, {"model": model_config(cut_level=2)}, "max_width", id="width"),
        pytest.param({"allowed_spatial_dims": [3]}, {}, "allowed_spatial_dims", id="dims"),
        pytest.param({"lr_max": 1e-3}, {"optimizer": {"lr": 0.5}}, "lr_bounds", id="lr-high"),
        pytest.param({"lr_min": 1e-4}, {"optimizer": {"lr": 1e-6}}, "lr_bounds", id="lr-low"),
    ],
)
def test_setups_outside_the_policy_are_403_naming_the_rule(
    start_app, site_settings, policy, setup, rule, security
) -> None:
    client = started(start_app, site_settings, policy=policy)
    assert align_site(client, client.app.state.runtime.case_ids()).status_code == 200
    response = client.post("/v1/runs", json=setup_body(**setup), headers=SITE_HEADERS)
    assert rule_of(response) == rule
    security.refused("policy_violation", response.status_code, expected=403)


def test_info_shows_the_policy_and_no_secret(start_app, site_settings) -> None:
    client = started(start_app, site_settings, policy={"min_cut_level": 1, "eval_per_case_per_run": 3})
    info = client.get("/v1/info", headers=SITE_HEADERS)
    policy = info.json()["policy"]
    assert policy["min_cut_level"] == 1 and policy["eval_per_case_per_run"] == 3
    assert "token" not in info.text and "seed" not in info.text


def test_batch_and_evaluation_budget(start_app, site_settings, cohort: Cohort, security) -> None:
    client = started(start_app, site_settings, policy={"max_batch": 2, "eval_per_case_per_run": 2,
                                                       "eval_per_case_per_day": 3})
    aligned_run(client)
    case = cohort.case_ids[0]
    security.refused("policy_violation", forward(client, [case] * 3).status_code, expected=403)
    assert forward(client, [case], phase="eval").status_code == 200
    assert forward(client, [case, cohort.case_ids[1]], phase="eval").status_code == 200
    over_run = forward(client, [case], phase="eval")
    assert rule_of(over_run) == "eval_per_case_per_run"
    security.refused("eval_budget_spent", over_run.status_code, expected=403)
    assert forward(client, [cohort.case_ids[1]], phase="eval").status_code == 200  # another case still has budget
    assert forward(client, [case]).status_code == 200  # training forwards are not evaluations
    aligned_run(client, "run-c")  # a new run: the run budget is fresh, the daily one is not
    assert forward(client, [case], run_id="run-c", phase="eval").status_code == 200
    assert rule_of(forward(client, [case], run_id="run-c", phase="eval")) == "eval_per_case_per_day"


def test_daily_budget_renews_the_next_day() -> None:
    today = [dt.date(2026, 1, 1)]
    budget = EvalBudget(SitePolicy(eval_per_case_per_run=10, eval_per_case_per_day=1), today=lambda: today[0])
    budget.charge("r", ["a"])
    with pytest.raises(Exception, match="daily"):
        budget.charge("r", ["a"])
    today[0] = dt.date(2026, 1, 2)
    budget.charge("r", ["a"])


# ---------------------------------------------------------------------------------------------- alignment
def test_alignment_without_the_callers_psi_session_is_refused(
    start_app, site_settings, cohort: Cohort, security
) -> None:
    other = "second-aggregator-token-0123456789"
    client = started(start_app, site_settings, auth_tokens=[other])
    ids = client.app.state.runtime.case_ids()
    no_psi = client.post("/v1/alignment", json={"case_ids": ids[:1], "session": "0" * 32}, headers=SITE_HEADERS)
    assert rule_of(no_psi) == "alignment_after_psi"
    security.refused("alignment_without_psi", no_psi.status_code, expected=403)
    # another caller's session cannot be used
    from splitunet.psi import PsiClient

    session = PsiClient(ids)
    assert client.post("/v1/psi", json=session.request().model_dump(mode="json"), headers=SITE_HEADERS).is_success
    stolen = client.post("/v1/alignment", json={"case_ids": ids, "session": session.session},
                         headers={"Authorization": f"Bearer {other}"})
    security.refused("alignment_other_callers_psi", stolen.status_code, expected=403)
    # the rightful caller can, once
    body = {"case_ids": ids, "session": session.session}
    assert client.post("/v1/alignment", json=body, headers=SITE_HEADERS).status_code == 200
    security.refused("alignment_session_reused",
                     client.post("/v1/alignment", json=body, headers=SITE_HEADERS).status_code, expected=403)


def test_alignment_with_unknown_ids_is_one_uniform_refusal(start_app, site_settings, cohort: Cohort, security):
    client = started(start_app, site_settings)
    ids = client.app.state.runtime.case_ids()
    bodies = []
    for claim in (["BraTS2021_99998"], ["BraTS2021_99998", "BraTS2021_99999", ids[0]]):
        response = align_site(client, [*ids, *claim], claim=claim)
        security.refused("alignment_probe", response.status_code, expected=403)
        bodies.append(response.json())
    assert bodies[0] == bodies[1], "the refusal must not depend on which or how many ids are unknown"
    assert "99998" not in json.dumps(bodies)
    # more ids than the caller's PSI set had are refused too
    response = align_site(client, ids[:1], claim=ids)
    security.refused("alignment_probe", response.status_code, expected=403)


def test_forward_error_is_the_same_for_unknown_and_not_aligned(start_app, site_settings, cohort, security):
    client = started(start_app, site_settings)
    ids = client.app.state.runtime.case_ids()
    assert align_site(client, ids[:2]).status_code == 200
    assert client.post("/v1/runs", json=setup_body(), headers=SITE_HEADERS).status_code == 200
    unknown, not_aligned = forward(client, ["BraTS2021_99999"]), forward(client, [ids[3]])
    for r in (unknown, not_aligned):
        security.refused("forward_outside_cohort", r.status_code, expected=409)
    strip = [{k: v for k, v in r.json().items() if k != "detail"} for r in (unknown, not_aligned)]
    assert strip[0] == strip[1]


def test_a_new_alignment_never_replaces_a_running_runs_cohort(start_app, site_settings, cohort: Cohort) -> None:
    client = started(start_app, site_settings)
    ids = client.app.state.runtime.case_ids()
    aligned_run(client)  # the run's cohort: every case
    assert align_site(client, ids[:1]).status_code == 200  # a later, narrower alignment
    assert forward(client, [ids[2]]).status_code == 200  # the running run keeps its cohort
    assert client.post("/v1/runs", json=setup_body("run-new"), headers=SITE_HEADERS).status_code == 200
    assert forward(client, [ids[2]], run_id="run-new").status_code == 409  # new runs get the new one


# ---------------------------------------------------------------------------------------------- runs, disk
def test_a_training_run_is_never_evicted(start_app, site_settings, monkeypatch, security) -> None:
    import services.client_site.runtime as runtime_module

    monkeypatch.setattr(runtime_module, "MAX_RUNS", 2)
    client = started(start_app, site_settings)
    aligned_run(client, "run-1")
    assert client.post("/v1/runs", json=setup_body("run-2"), headers=SITE_HEADERS).status_code == 200
    third = client.post("/v1/runs", json=setup_body("run-3"), headers=SITE_HEADERS)
    security.refused("evict_training_run", third.status_code, expected=409)
    assert "never evicts" in third.json()["message"]
    assert client.get("/v1/info", headers=SITE_HEADERS).json()["runs"].keys() == {"run-1", "run-2"}
    # the aggregator releases the run of a job that ended: it makes room at once, nothing else is dropped
    assert client.post("/v1/runs/nope/release", headers=SITE_HEADERS).status_code == 404
    released = client.post("/v1/runs/run-1/release", headers=SITE_HEADERS)
    assert released.status_code == 200 and released.json()["run_id"] == "run-1", released.text
    assert client.post("/v1/runs", json=setup_body("run-3"), headers=SITE_HEADERS).status_code == 200
    assert client.get("/v1/info", headers=SITE_HEADERS).json()["runs"].keys() == {"run-2", "run-3"}
    idle = started(start_app, site_settings, run_idle_s=1e-6)  # runs idle at once may make room
    aligned_run(idle, "run-1")
    assert idle.post("/v1/runs", json=setup_body("run-2"), headers=SITE_HEADERS).status_code == 200
    assert idle.post("/v1/runs", json=setup_body("run-3"), headers=SITE_HEADERS).status_code == 200


def test_runs_rebuilt_after_a_restart_make_room_until_restored(start_app, site_settings, monkeypatch) -> None:
    import services.client_site.runtime as runtime_module

    monkeypatch.setattr(runtime_module, "MAX_RUNS", 2)
    client = started(start_app, site_settings)
    aligned_run(client, "run-1")
    assert client.post("/v1/runs", json=setup_body("run-2"), headers=SITE_HEADERS).status_code == 200
    assert client.post("/v1/runs/run-2/checkpoint", json={"step": 0}, headers=SITE_HEADERS).status_code == 200
    assert client.post("/v1/runs", json=setup_body("run-3"), headers=SITE_HEADERS).status_code == 409  # full
    # the site restarts (same state folder): its two runs are rebuilt, neither trains until restored, so a new
    # run is admitted at once (before, the table stayed full for SITE_RUN_IDLE_S and every new run got 409)
    restarted = started(start_app, site_settings)
    assert restarted.get("/v1/info", headers=SITE_HEADERS).json()["runs"].keys() == {"run-1", "run-2"}
    assert restarted.post("/v1/runs/run-2/restore", json={"step": 0}, headers=SITE_HEADERS).status_code == 200
    assert restarted.post("/v1/runs", json=setup_body("run-3"), headers=SITE_HEADERS).status_code == 200
    # the restored run trains again: the rebuilt, unrestored one made room
    assert restarted.get("/v1/info", headers=SITE_HEADERS).json()["runs"].keys() == {"run-2", "run-3"}
    assert restarted.post("/v1/runs", json=setup_body("run-4"), headers=SITE_HEADERS).status_code == 409


def test_checkpoints_count_against_a_disk_budget(start_app, site_settings, cohort: Cohort, security) -> None:
    client = started(start_app, site_settings, checkpoint_budget_bytes=200_000)
    aligned_run(client)
    assert client.post(f"/v1/runs/{RUN}/checkpoint", json={"step": 0}, headers=SITE_HEADERS).status_code == 200
    # every run checkpoints the step it holds (step 0 here): each new run's checkpoint is a new file
    steps = []
    for k in range(1, 7):
        assert client.post("/v1/runs", json=setup_body(f"{RUN}-{k}"), headers=SITE_HEADERS).status_code == 200
        steps.append(client.post(f"/v1/runs/{RUN}-{k}/checkpoint", json={"step": 0}, headers=SITE_HEADERS))
    refused = [r for r in steps if r.status_code != 200]
    assert refused and rule_of(refused[0]) == "checkpoint_budget_bytes"
    security.refused("disk_budget", refused[0].status_code, expected=403)


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_corrupt_checkpoint_is_a_typed_error(start_app, site_settings, damage, security) -> None:
    client = started(start_app, site_settings)
    aligned_run(client)
    saved = client.post(f"/v1/runs/{RUN}/checkpoint", json={"step": 0}, headers=SITE_HEADERS)
    name = saved.json()["path"]
    assert "/" not in name  # a basename: the reply never shows the site's own file system
    path = client.app.state.settings.state_dir / RUN / name
    data = open(path, "rb").read()
    broken = {"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"\x00" * 64 + data[64:]}[damage]
    open(path, "wb").write(broken)
    response = client.post(f"/v1/runs/{RUN}/restore", json={"step": 0}, headers=SITE_HEADERS)
    security.refused("corrupt_checkpoint", response.status_code, expected=422)
    assert response.json()["code"] == "bad_data"


# ---------------------------------------------------------------------------------------------- hostile bundles
def _deep_header_bundle() -> bytes:
    header = b'{"__metadata__":{"format":"x"},"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    return pack_frame(struct.pack("<Q", len(header)) + header, compressed=False)


def _deep_names_bundle() -> bytes:
    metadata = {"format": FORMAT_VERSION, "run_id": RUN, "step": "1", "site": "t1", "kind": "gradients",
                "dtype": "fp32", "names": "[" * 50_000 + "]" * 50_000}
    return pack_frame(safetensors_save({"level0": torch.zeros(1)}, metadata=metadata), compressed=False)


@pytest.mark.parametrize("make", [_deep_header_bundle, _deep_names_bundle], ids=["nested-header", "nested-names"])
def test_deeply_nested_bundle_json_is_400(start_app, site_settings, cohort: Cohort, make, security) -> None:
    client = started(start_app, site_settings)
    aligned_run(client)
    assert forward(client, [cohort.case_ids[0]]).status_code == 200
    response = client.post(f"/v1/runs/{RUN}/backward", params={"step": 1}, content=make(),
                           headers=SITE_HEADERS | {"Content-Type": CONTENT_TYPE})
    security.refused("nested_json_bundle", response.status_code, expected=400)
    assert response.json()["code"] == "bad_bundle" and len(response.text) < 2000


# ---------------------------------------------------------------------------------------------- scopes at a site
def test_site_training_api_takes_only_the_aggregator_credential(site: TestClient, security) -> None:
    for headers, status in ((AGG_HEADERS, 401), (AUDIT_HEADERS, 403), ({}, 401)):
        # the operator token is not a credential of the site at all; the audit token is, of another scope
        response = site.post("/v1/runs", json=setup_body(), headers=headers)
        security.refused("wrong_scope" if status == 403 else "unauthenticated", response.status_code, expected=status)
    assert site.get("/v1/info", headers=SITE_HEADERS).status_code == 200
