"""The pieces of fault tolerance on their own: the SQLite stores, failure classification, waiting for sites."""

from __future__ import annotations

import json
import stat
import threading
from pathlib import Path

import pytest
from federation_testkit import model_config, peers

from services.aggregator.recovery import RecoveryPolicy, recoverable, unreachable, wait_for_sites
from services.aggregator.store import JobStore, spec_document
from services.client_site.store import RunStore
from splitunet.errors import PeerError
from splitunet.federation import FederationSpec, JobState, JobStatus
from splitunet.schemas import RunSetup


def test_the_job_store_keeps_spec_status_and_complete_checkpoints_across_reopening(tmp_path: Path) -> None:
    spec = FederationSpec.model_validate({"sites": peers(), "steps": 7, "roi": [32, 32], "run_id": "j1"})
    store = JobStore(tmp_path)
    store.create("j1", spec_document(spec), JobStatus(job_id="j1", state=JobState.PENDING, steps=7))
    store.record_checkpoint("j1", 0, {"aggregator": "a" * 64}, JobStatus(job_id="j1", state=JobState.RUNNING,
                                                                       steps=7))
    store.record_checkpoint("j1", 4, {"aggregator": "b" * 64}, JobStatus(job_id="j1", state=JobState.RUNNING,
                                                                       steps=7, step=4, losses=[1.0, 0.9, 0.8, 0.7]))
    store.close()
    assert stat.S_IMODE((tmp_path / "jobs.sqlite").stat().st_mode) == 0o600

    [job] = JobStore(tmp_path).jobs()
    assert job.job_id == "j1" and job.checkpoint_steps == [0, 4]
    assert job.status.state == JobState.RUNNING and job.status.losses == [1.0, 0.9, 0.8, 0.7]
    rebuilt = FederationSpec.model_validate(job.spec)  # the spec as posted rebuilds the job
    assert rebuilt == spec and "token" not in json.dumps(job.spec)  # registry names only: no secret in the store


def test_the_run_store_keeps_setups_and_latest_checkpoints(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    setup = RunSetup(run_id="r1", model=model_config())
    store.save_run(setup, "f" * 16, created=10.0)
    store.save_run(RunSetup(run_id="r2", model=model_config()), "e" * 16, created=20.0)
    store.record_checkpoint("r1", 6, tmp_path / "x.safetensors", "c" * 64)
    store.delete_run("r2")
    store.close()
    [run] = RunStore(tmp_path).runs()
    assert run.setup == setup and run.checkpoint_step == 6 and run.checkpoint_sha256 == "c" * 64


def _peer_error(status: int | None, code: str | None = None) -> PeerError:
    return PeerError("site t1: failed", detail={"peer": "site t1", "method": "POST", "url": "http://t1/x",
                                                "status": status, "attempts": 3, "code": code, "message": None,
                                                "detail": None})


@pytest.mark.parametrize(
    ("error", "is_recoverable", "is_unreachable"),
    [
        pytest.param(_peer_error(None), True, True, id="connection-refused"),
        pytest.param(_peer_error(503, "not_ready"), True, True, id="503"),
        pytest.param(_peer_error(409, "out_of_order"), True, False, id="site-lost-its-step"),
        pytest.param(_peer_error(404, "not_found"), True, False, id="site-lost-its-run"),
        pytest.param(_peer_error(422, "bad_data"), False, False, id="corrupt-checkpoint"),
        pytest.param(_peer_error(400, "bad_bundle"), False, False, id="bad-bundle"),
        pytest.param(PeerError("site t1 sent a bad activation bundle", detail={"code": "bad_bundle"}), False, False,
                     id="bad-bundle-from-the-site"),
    ],
)
def test_which_failures_are_recovered_from(error: PeerError, is_recoverable: bool, is_unreachable: bool) -> None:
    assert recoverable(error) is is_recoverable
    assert unreachable(error) is is_unreachable


class FakeSite:
    def __init__(self, answers_after: int) -> None:
        self.calls, self.answers_after = 0, answers_after

    def info(self) -> None:
        self.calls += 1
        if self.calls <= self.answers_after:
            raise _peer_error(None)


def test_waiting_for_a_site_backs_off_and_reports_who_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    delays: list[float] = []
    stop = threading.Event()
    monkeypatch.setattr(stop, "wait", lambda delay: delays.append(delay) or False)
    sites = {"t1": FakeSite(0), "t2": FakeSite(5)}
    reported: list[list[str]] = []
    policy = RecoveryPolicy(site_wait_s=1000, backoff_s=0.5, backoff_max_s=4.0)
    assert wait_for_sites(sites, policy, stop=stop, on_waiting=reported.append) is True
    assert reported == [["t2"]] * 5
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0]  # doubling, capped: no hot loop


def test_waiting_gives_up_after_the_deadline_and_honours_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    stop = threading.Event()
    monkeypatch.setattr(stop, "wait", lambda delay: False)
    with pytest.raises(PeerError, match="t2 did not answer") as info:
        wait_for_sites({"t2": FakeSite(10**9)}, RecoveryPolicy(site_wait_s=0.01, backoff_s=0.5, backoff_max_s=0.5),
                       stop=stop, on_waiting=lambda names: None)
    assert not recoverable(info.value)  # giving up fails the job (resume it later)

    stopping = threading.Event()
    stopping.set()
    assert wait_for_sites({"t2": FakeSite(10**9)}, RecoveryPolicy(), stop=stopping, on_waiting=lambda n: None) is False


def test_a_recovery_policy_validates_its_bounds() -> None:
    with pytest.raises(ValueError, match="backoff"):
        RecoveryPolicy(backoff_s=2.0, backoff_max_s=1.0)
    with pytest.raises(ValueError, match="max_recoveries"):
        RecoveryPolicy(max_recoveries=-1)
