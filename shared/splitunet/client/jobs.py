"""Training jobs on the aggregator's job API (``/v1/jobs``, ``/v1/infer``), typed by the service's own schemas.

The spec is :class:`splitunet.federation.FederationSpec` and the status :class:`splitunet.federation.JobStatus`,
the models the aggregator's routes parse and return, so a spec this client accepts is one the service accepts
(the service still validates it: the client's check only reports a mistake before anything is sent).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from splitunet.client.http import ServiceClient
from splitunet.errors import ConfigurationError
from splitunet.federation import FederationSpec, InferRequest, JobCreated, JobState, JobStatus

#: States after which a job does nothing more until an operator acts.
FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.STOPPED})
#: States :meth:`Job.wait` returns at: the final ones and a pause the privacy gate holds until ``resume``.
SETTLED_STATES = FINAL_STATES | {JobState.PAUSED_BY_PRIVACY_GATE}
_STATUS_LIST = TypeAdapter(list[JobStatus])


def validation_message(exc: ValidationError) -> str:
    """One line per failing field: ``model.cut_level: Value error, ...``."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in exc.errors())


def parse_spec(spec: FederationSpec | Mapping[str, Any]) -> FederationSpec:
    """``spec`` as a :class:`FederationSpec`; :class:`ConfigurationError` naming every bad field otherwise."""
    if isinstance(spec, FederationSpec):
        return spec
    try:
        return FederationSpec.model_validate(dict(spec))
    except ValidationError as exc:
        raise ConfigurationError(f"invalid job spec: {validation_message(exc)}",
                                 detail=[{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]) from None


class Job:
    """One job of the aggregator: a handle (its id) and the calls about it. Nothing is cached: every call asks."""

    def __init__(self, client: ServiceClient, job_id: str) -> None:
        self._client = client
        self.job_id = job_id

    def __repr__(self) -> str:
        return f"Job({self.job_id!r})"

    def status(self) -> JobStatus:
        """``GET /v1/jobs/{id}``: state, step, loss, throughput, bytes, last validation, errors."""
        return self._client.get_model(f"/v1/jobs/{self.job_id}", JobStatus)

    def stop(self) -> JobStatus:
        """``POST /v1/jobs/{id}/stop``: ask a running job to stop (it goes ``stopping`` -> ``stopped``)."""
        return self._client.post_model(f"/v1/jobs/{self.job_id}/stop", None, JobStatus)

    def resume(self) -> JobStatus:
        """``POST /v1/jobs/{id}/resume``: continue a job the privacy gate paused, or restart a failed or stopped
        one from the latest step every party checkpointed (:class:`~splitunet.errors.ConflictError` otherwise)."""
        return self._client.post_model(f"/v1/jobs/{self.job_id}/resume", None, JobStatus)

    def wait(
        self,
        progress: Callable[[JobStatus], None] | None = None,
        *,
        poll_s: float = 1.0,
        timeout_s: float | None = None,
        until: frozenset[JobState] = SETTLED_STATES,
    ) -> JobStatus:
        """Poll the status every ``poll_s`` seconds until its state is in ``until`` (default: succeeded, failed,
        stopped, or paused by the privacy gate); call ``progress`` with every status; return the last one.

        Raises ``TimeoutError`` after ``timeout_s`` seconds (``None``: wait as long as it takes). A failed job is
        returned, not raised: its ``error`` says why.
        """
        if poll_s <= 0:
            raise ValueError(f"poll_s must be positive, got {poll_s}")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            status = self.status()
            if progress is not None:
                progress(status)
            if status.state in until:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.job_id} is still {status.state.value} after {timeout_s} s")
            time.sleep(poll_s)

    def infer(self, case_id: str, out: str | Path) -> Path:
        """``POST /v1/infer``: segment ``case_id`` with this job's model and write the NIfTI (``.nii.gz``: BraTS
        labels on the case's own grid) to ``out``; returns ``out``. Only the most recent finished job keeps its
        model (:class:`~splitunet.errors.ConflictError` for an older one)."""
        return infer(self._client, case_id, out, job_id=self.job_id)


def infer(client: ServiceClient, case_id: str, out: str | Path, *, job_id: str | None = None,
          sites: list[str] | None = None) -> Path:
    """``POST /v1/infer`` with ``job_id`` (``None``: the latest job with a model) through ``sites`` (``None``: all;
    the aggregator leaves out any that does not answer); write the NIfTI to ``out``."""
    body = InferRequest(case_id=case_id, job_id=job_id, sites=sites).model_dump(mode="json", exclude_none=True)
    # inference changes nothing at the aggregator: a timed-out call may be retried
    response = client.request("POST", "/v1/infer", json=body, idempotent=True, accept="application/gzip")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(response.content)
    return out


class Jobs:
    """The aggregator's job API (``Federation.jobs``)."""

    def __init__(self, client: ServiceClient) -> None:
        self._client = client

    def submit(self, spec: FederationSpec | Mapping[str, Any]) -> Job:
        """``POST /v1/jobs``: start a training job (one at a time per aggregator: a second one while a job runs is
        a :class:`~splitunet.errors.ConflictError`). ``spec`` is validated against :class:`FederationSpec` first;
        only the fields it sets are sent, so the service applies its own defaults."""
        body = parse_spec(spec).model_dump(mode="json", exclude_unset=True)
        created: JobCreated = self._client.post_model("/v1/jobs", body, JobCreated)
        return Job(self._client, created.job_id)

    def get(self, job_id: str) -> Job:
        """A handle on job ``job_id`` (no call is made: ``.status()`` asks)."""
        return Job(self._client, job_id)

    def infer(self, case_id: str, out: str | Path, *, job_id: str | None = None) -> Path:
        """Segment ``case_id`` with job ``job_id``'s model (default: the latest job that has one); see
        :meth:`Job.infer`."""
        return infer(self._client, case_id, out, job_id=job_id)

    def list(self) -> list[JobStatus]:
        """``GET /v1/jobs``: every job the aggregator knows, oldest first."""
        return self._client.get_model("/v1/jobs", _STATUS_LIST)
